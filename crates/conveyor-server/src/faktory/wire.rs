//! The Faktory wire format: one command per line from the client (CRLF, or LF alone as the Ruby
//! client sends), one RESP reply per command from the server.

use std::fmt;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// The longest command line accepted (a `PUSHB` of 1,000 jobs fits well).
pub(crate) const MAX_LINE: usize = 16 * 1024 * 1024;
/// The longest line before `HELLO` succeeded: a stranger may not make the server hold 16 MiB.
pub(crate) const MAX_HELLO_LINE: usize = 64 * 1024;

/// Why a line could not be read.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The client closed the connection (before a complete line).
    Closed,
    /// The line passed the limit; the rest of it was read and dropped.
    TooLong,
    /// The line is not UTF-8.
    NotUtf8,
    Io(std::io::Error),
}

/// Reads one line without its end (`\r\n` or `\n`) and trailing spaces. A line longer than
/// `max` is consumed to its end and refused, so the connection stays in step.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> Result<String, LineError> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().await.map_err(LineError::Io)?;
        if chunk.is_empty() {
            return Err(LineError::Closed);
        }
        let (used, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + used > max + 2 {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..used]);
            }
        }
        r.consume(used);
        if done {
            break;
        }
    }
    if too_long {
        return Err(LineError::TooLong);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r' | b' ' | b'\t')) {
        buf.pop();
    }
    String::from_utf8(std::mem::take(buf)).map_err(|_| LineError::NotUtf8)
}

/// A reply to one command.
#[derive(Debug, PartialEq)]
pub(crate) enum Reply {
    /// `+OK`.
    Ok,
    /// `+<text>` (the greeting).
    Simple(String),
    /// `-ERR <reason>`, or another code such as `NOTUNIQUE`.
    Error { code: &'static str, reason: String },
    /// `$<len>` and the bytes: every JSON answer (clients such as pyfaktory insist on it).
    Bulk(String),
    /// `$-1`: no job.
    Null,
}

impl Reply {
    pub(crate) fn err(reason: impl fmt::Display) -> Reply {
        Reply::Error { code: "ERR", reason: reason.to_string() }
    }

    pub(crate) fn json(v: &serde_json::Value) -> Reply {
        Reply::Bulk(v.to_string())
    }

    pub(crate) async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        match self {
            Reply::Ok => w.write_all(b"+OK\r\n").await,
            Reply::Simple(s) => w.write_all(format!("+{}\r\n", one_line(s)).as_bytes()).await,
            Reply::Error { code, reason } => w.write_all(format!("-{code} {}\r\n", one_line(reason)).as_bytes()).await,
            Reply::Bulk(s) => {
                w.write_all(format!("${}\r\n", s.len()).as_bytes()).await?;
                w.write_all(s.as_bytes()).await?;
                w.write_all(b"\r\n").await
            }
            Reply::Null => w.write_all(b"$-1\r\n").await,
        }
    }
}

/// A simple string or error may not contain a line break: it would end the reply early.
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_end_with_crlf_or_lf_and_lose_trailing_spaces() {
        let mut input: &[u8] = b"PUSH {}\r\nFETCH \nINFO";
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut input, &mut buf, MAX_LINE).await.unwrap(), "PUSH {}");
        assert_eq!(read_line(&mut input, &mut buf, MAX_LINE).await.unwrap(), "FETCH");
        // An unterminated last line is a closed connection, not a command.
        assert!(matches!(read_line(&mut input, &mut buf, MAX_LINE).await, Err(LineError::Closed)));
    }

    #[tokio::test]
    async fn an_oversized_line_is_refused_and_the_next_one_still_reads() {
        let mut data = vec![b'x'; MAX_LINE + 10];
        data.extend_from_slice(b"\r\nEND\r\n");
        let mut input: &[u8] = &data;
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut input, &mut buf, MAX_LINE).await, Err(LineError::TooLong)));
        assert_eq!(read_line(&mut input, &mut buf, MAX_LINE).await.unwrap(), "END");
    }

    #[tokio::test]
    async fn replies_are_resp() {
        let mut out = Vec::new();
        for r in [Reply::Ok, Reply::err("bad\r\nline"), Reply::Bulk("{\"a\":1}".into()), Reply::Null] {
            r.write(&mut out).await.unwrap();
        }
        assert_eq!(String::from_utf8(out).unwrap(), "+OK\r\n-ERR bad  line\r\n$7\r\n{\"a\":1}\r\n$-1\r\n");
    }
}
