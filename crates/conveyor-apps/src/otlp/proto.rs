//! The protobuf encoding of OTLP's `ExportTraceServiceRequest`, written by hand (varints and
//! length-delimited fields) for the few messages a trace export needs, and the one field of the
//! response worth reading (`partial_success`).
//!
//! Field numbers (opentelemetry-proto):
//! - `collector/trace/v1/trace_service.proto`: `ExportTraceServiceRequest { repeated
//!   ResourceSpans resource_spans = 1; }`, `ExportTraceServiceResponse { ExportTracePartialSuccess
//!   partial_success = 1; }`, `ExportTracePartialSuccess { int64 rejected_spans = 1; string
//!   error_message = 2; }`.
//! - `trace/v1/trace.proto`: `ResourceSpans { Resource resource = 1; repeated ScopeSpans
//!   scope_spans = 2; }`, `ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2; }`,
//!   `Span { bytes trace_id = 1; bytes span_id = 2; bytes parent_span_id = 4; fixed32 flags = 16;
//!   string name = 5; SpanKind kind = 6; fixed64 start_time_unix_nano = 7; fixed64
//!   end_time_unix_nano = 8; repeated KeyValue attributes = 9; repeated Link links = 13; Status
//!   status = 15; }`, `Link { bytes trace_id = 1; bytes span_id = 2; fixed32 flags = 6; }`,
//!   `Status { string message = 2; StatusCode code = 3; }`.
//! - `common/v1/common.proto`: `KeyValue { string key = 1; AnyValue value = 2; }`, `AnyValue {
//!   oneof value { string string_value = 1; bool bool_value = 2; int64 int_value = 3; } }`,
//!   `InstrumentationScope { string name = 1; string version = 2; }`.
//! - `resource/v1/resource.proto`: `Resource { repeated KeyValue attributes = 1; }`.
//!
//! proto3 leaves fields at their default value out, except inside a `oneof`, where the field's
//! presence is the value's type: an empty string, `false` and `0` attribute values are written.

use conveyor_core::trace::{Span, SpanKind, TraceContext, Value};

/// The W3C `sampled` trace flag, as OTLP's `flags` carries it in its low byte.
const SAMPLED: u32 = 0x01;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u64 = 2;

// Wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from(field << 3 | wire));
}

fn bytes_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(buf, field, LEN);
    varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// A string field, left out when empty (proto3 default).
fn string_field(buf: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        bytes_field(buf, field, s.as_bytes());
    }
}

fn varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    key(buf, field, VARINT);
    varint(buf, v);
}

fn fixed64_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    key(buf, field, FIXED64);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn fixed32_field(buf: &mut Vec<u8>, field: u32, v: u32) {
    key(buf, field, FIXED32);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// An embedded message: `write` encodes its fields, which are then written length-delimited.
fn message(buf: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    bytes_field(buf, field, &inner);
}

/// `KeyValue` with an `AnyValue` (always written: the oneof's field is the value's type).
fn key_value(buf: &mut Vec<u8>, field: u32, k: &str, v: &Value) {
    message(buf, field, |kv| {
        string_field(kv, 1, k);
        message(kv, 2, |any| match v {
            Value::Str(s) => bytes_field(any, 1, s.as_bytes()),
            Value::Bool(b) => varint_field(any, 2, u64::from(*b)),
            // int64: two's complement, ten bytes for a negative number.
            Value::Int(i) => varint_field(any, 3, *i as u64),
        });
    });
}

fn kind(kind: SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn link(buf: &mut Vec<u8>, l: &TraceContext) {
    message(buf, 13, |m| {
        bytes_field(m, 1, &l.trace_id);
        bytes_field(m, 2, &l.span_id);
        if l.sampled {
            fixed32_field(m, 6, SAMPLED);
        }
    });
}

fn span(buf: &mut Vec<u8>, s: &Span) {
    message(buf, 2, |m| {
        bytes_field(m, 1, &s.trace_id);
        bytes_field(m, 2, &s.span_id);
        if let Some(parent) = &s.parent_span_id {
            bytes_field(m, 4, parent);
        }
        string_field(m, 5, &s.name);
        varint_field(m, 6, kind(s.kind));
        fixed64_field(m, 7, s.start_ns);
        fixed64_field(m, 8, s.end_ns);
        for (k, v) in &s.attributes {
            key_value(m, 9, k, v);
        }
        for l in &s.links {
            link(m, l);
        }
        if let Some(error) = &s.error {
            message(m, 15, |st| {
                string_field(st, 2, error);
                varint_field(st, 3, STATUS_CODE_ERROR);
            });
        }
        // Only sampled spans are exported.
        fixed32_field(m, 16, SAMPLED);
    });
}

/// The body of one export: one `ResourceSpans` with `resource` as its attributes and one
/// `ScopeSpans` of `scope` (name, version) holding `spans`.
pub(crate) fn export_request(resource: &[(String, String)], scope: (&str, &str), spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + spans.len() * 320);
    message(&mut out, 1, |rs| {
        message(rs, 1, |r| {
            for (k, v) in resource {
                message(r, 1, |kv| {
                    string_field(kv, 1, k);
                    message(kv, 2, |any| bytes_field(any, 1, v.as_bytes()));
                });
            }
        });
        message(rs, 2, |ss| {
            message(ss, 1, |sc| {
                string_field(sc, 1, scope.0);
                string_field(sc, 2, scope.1);
            });
            for s in spans {
                span(ss, s);
            }
        });
    });
    out
}

/// What an `ExportTraceServiceResponse` says of spans the receiver refused
/// (`partial_success`): how many and why. `None` when it refused none or the body is not a
/// response this decoder understands (an empty body is a full success).
pub(crate) fn rejected_spans(body: &[u8]) -> Option<(i64, String)> {
    let partial = fields(body)?.into_iter().find_map(|(f, v)| match (f, v) {
        (1, Field::Len(b)) => Some(b),
        _ => None,
    })?;
    let (mut rejected, mut message) = (0i64, String::new());
    for (f, v) in fields(partial)? {
        match (f, v) {
            (1, Field::Varint(n)) => rejected = n as i64,
            (2, Field::Len(b)) => message = String::from_utf8_lossy(b).into_owned(),
            _ => {}
        }
    }
    (rejected != 0 || !message.is_empty()).then_some((rejected, message))
}

enum Field<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// A message's top-level fields; `None` when it is malformed.
fn fields(buf: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let k = read_varint(buf, &mut pos)?;
        let value = match k & 7 {
            0 => Field::Varint(read_varint(buf, &mut pos)?),
            1 => {
                pos = pos.checked_add(8).filter(|p| *p <= buf.len())?;
                Field::Fixed
            }
            2 => {
                let n = usize::try_from(read_varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(n).filter(|e| *e <= buf.len())?;
                let b = &buf[pos..end];
                pos = end;
                Field::Len(b)
            }
            5 => {
                pos = pos.checked_add(4).filter(|p| *p <= buf.len())?;
                Field::Fixed
            }
            _ => return None,
        };
        out.push((k >> 3, value));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_base_128() {
        let enc = |v: u64| {
            let mut b = Vec::new();
            varint(&mut b, v);
            b
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(1), [0x01]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(u64::MAX), [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        // Field 16 (flags) needs a two-byte key.
        let mut k = Vec::new();
        key(&mut k, 16, FIXED32);
        assert_eq!(k, [0x85, 0x01]);
    }

    #[test]
    fn a_span_encodes_field_by_field() {
        let s = Span {
            trace_id: [0x11; 16],
            span_id: [0x22; 8],
            parent_span_id: Some([0x33; 8]),
            name: "p q".into(),
            kind: SpanKind::Consumer,
            start_ns: 1,
            end_ns: 0x0102,
            attributes: vec![("a", Value::Str(String::new())), ("b", Value::Int(-1)), ("c", Value::Bool(false))],
            links: vec![TraceContext { trace_id: [0x44; 16], span_id: [0x55; 8], sampled: true }],
            error: Some("no".into()),
        };
        let mut got = Vec::new();
        span(&mut got, &s);

        let mut body: Vec<u8> = Vec::new();
        body.extend([0x0a, 16]);
        body.extend([0x11; 16]);
        body.extend([0x12, 8]);
        body.extend([0x22; 8]);
        // parent_span_id: field 4, LEN.
        body.extend([0x22, 8]);
        body.extend([0x33; 8]);
        body.extend([0x2a, 3]);
        body.extend(b"p q");
        // kind CONSUMER; start and end, fixed64 little-endian.
        body.extend([0x30, 5]);
        body.extend([0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
        body.extend([0x41, 0x02, 0x01, 0, 0, 0, 0, 0, 0]);
        // {key "a", value {string_value ""}}: the empty string is written (oneof).
        body.extend([0x4a, 7, 0x0a, 1, b'a', 0x12, 2, 0x0a, 0]);
        // {key "b", value {int_value -1}}: ten bytes of varint.
        body.extend([0x4a, 16, 0x0a, 1, b'b', 0x12, 11, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        // {key "c", value {bool_value false}}.
        body.extend([0x4a, 7, 0x0a, 1, b'c', 0x12, 2, 0x10, 0]);
        // Link {trace_id, span_id, flags = 1}: field 13.
        body.extend([0x6a, 33, 0x0a, 16]);
        body.extend([0x44; 16]);
        body.extend([0x12, 8]);
        body.extend([0x55; 8]);
        body.extend([0x35, 1, 0, 0, 0]);
        // Status {message "no", code ERROR}: field 15.
        body.extend([0x7a, 6, 0x12, 2, b'n', b'o', 0x18, 2]);
        // flags: field 16, fixed32.
        body.extend([0x85, 0x01, 1, 0, 0, 0]);

        let mut want = vec![0x12];
        varint(&mut want, body.len() as u64);
        want.extend(&body);
        assert_eq!(got, want);
    }

    #[test]
    fn a_root_span_without_error_leaves_parent_and_status_out() {
        let s = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            name: String::new(),
            kind: SpanKind::Producer,
            start_ns: 0,
            end_ns: 0,
            attributes: Vec::new(),
            links: Vec::new(),
            error: None,
        };
        let mut got = Vec::new();
        span(&mut got, &s);
        let mut want = vec![0x12, 54, 0x0a, 16];
        want.extend([1; 16]);
        want.extend([0x12, 8]);
        want.extend([2; 8]);
        want.extend([0x30, 4]);
        want.extend([0x39, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([0x41, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([0x85, 0x01, 1, 0, 0, 0]);
        assert_eq!(got, want);
    }

    #[test]
    fn the_request_wraps_resource_scope_and_spans() {
        let got = export_request(&[("k".into(), "v".into())], ("s", "1"), &[]);
        // ExportTraceServiceRequest { resource_spans { resource { attributes { key "k" value
        // { string_value "v" } } } scope_spans { scope { name "s" version "1" } } } }
        let want = [
            0x0a, 22, // resource_spans
            0x0a, 10, // resource
            0x0a, 8, 0x0a, 1, b'k', 0x12, 3, 0x0a, 1, b'v', // attributes
            0x12, 8, // scope_spans
            0x0a, 6, 0x0a, 1, b's', 0x12, 1, b'1', // scope
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_partial_success_is_read_from_the_response() {
        assert_eq!(rejected_spans(&[]), None);
        // partial_success {} (a full success written explicitly).
        assert_eq!(rejected_spans(&[0x0a, 0]), None);
        // partial_success { rejected_spans 3, error_message "bad" }
        let body = [0x0a, 7, 0x08, 3, 0x12, 3, b'b', b'a', b'd'];
        assert_eq!(rejected_spans(&body), Some((3, "bad".into())));
        // Not protobuf (a JSON answer, a truncated one): nothing is claimed.
        assert_eq!(rejected_spans(b"{\"partialSuccess\":{}}"), None);
        assert_eq!(rejected_spans(&[0x0a, 7, 0x08]), None);
    }
}
