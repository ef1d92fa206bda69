//! Reading a CSV upload: bytes counted for progress, line endings normalised (CRLF → LF, so
//! line numbers match an editor's), required columns located.

use super::*;

/// Counts bytes as the CSV reader pulls them, for progress and ETA.
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

pub(super) fn reader<R: Read>(input: R) -> csv::Reader<Lf<R>> {
    // `flexible`: a line with a wrong number of fields is reported, not fatal.
    csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).from_reader(Lf::new(input))
}

/// Streams CRLF as LF, so the CSV reader numbers lines the way an editor shows them (with CRLF
/// it dates a record from the previous line's end).
pub(super) struct Lf<R> {
    pub(super) inner: R,
    pub(super) chunk: Vec<u8>,
    pub(super) out: Vec<u8>,
    pub(super) pos: usize,
    /// A CR at the end of the last chunk: dropped if the next byte is an LF.
    pub(super) held_cr: bool,
    pub(super) eof: bool,
}

impl<R> Lf<R> {
    pub(super) fn new(inner: R) -> Self {
        Lf { inner, chunk: vec![0; 64 * 1024], out: Vec::with_capacity(64 * 1024), pos: 0, held_cr: false, eof: false }
    }
}

impl<R: Read> Read for Lf<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.out.len() {
            if self.eof {
                return Ok(0);
            }
            self.out.clear();
            self.pos = 0;
            let n = self.inner.read(&mut self.chunk)?;
            if n == 0 {
                self.eof = true;
                if std::mem::take(&mut self.held_cr) {
                    self.out.push(b'\r');
                }
                continue;
            }
            for &b in &self.chunk[..n] {
                if std::mem::take(&mut self.held_cr) && b != b'\n' {
                    self.out.push(b'\r');
                }
                if b == b'\r' {
                    self.held_cr = true;
                } else {
                    self.out.push(b);
                }
            }
        }
        let k = buf.len().min(self.out.len() - self.pos);
        buf[..k].copy_from_slice(&self.out[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

/// Column positions by name; a UTF-8 BOM on the first header is ignored.
pub(super) fn columns(headers: &csv::StringRecord, required: &[&str]) -> Result<HashMap<String, usize>, ImportError> {
    let map: HashMap<String, usize> =
        headers.iter().enumerate().map(|(i, h)| (h.trim_start_matches('\u{feff}').trim().to_ascii_lowercase(), i)).collect();
    let missing: Vec<String> = required.iter().filter(|c| !map.contains_key(**c)).map(|c| c.to_string()).collect();
    if missing.is_empty() {
        Ok(map)
    } else {
        Err(ImportError::MissingColumns(missing))
    }
}
