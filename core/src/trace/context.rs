//! W3C trace context (`traceparent`): ids made, the header parsed as the recommendation says
//! (an invalid one is a trace to restart), and written back as version `00`.

use http::{HeaderMap, HeaderValue};

/// The header that carries the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The header of vendor-specific trace data, passed on unchanged with a valid `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// A trace's id: 16 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A span's id: 8 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A new random id.
    pub fn random() -> Self {
        TraceId(fastrand::u128(1..).to_be_bytes())
    }

    /// The id as 32 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl SpanId {
    /// A new random id.
    pub fn random() -> Self {
        SpanId(fastrand::u64(1..).to_be_bytes())
    }

    /// The id as 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: TraceId,
    /// The span of the sender that this request is a child of.
    pub parent_id: SpanId,
    /// The sender's sampling decision (flag bit 0).
    pub sampled: bool,
}

impl TraceParent {
    /// Parses one header value: `version-traceid-parentid-flags`, lowercase hex. Version `ff`,
    /// all-zero ids, uppercase hex or a version-`00` value of another length are invalid; a
    /// later version is read by its first four fields when what follows them starts with `-`.
    pub fn parse(v: &[u8]) -> Option<TraceParent> {
        if v.len() < 55 {
            return None;
        }
        let version = unhex::<1>(&v[0..2])?;
        match version[0] {
            0xff => return None,
            0 if v.len() != 55 => return None,
            _ if v.len() > 55 && v[55] != b'-' => return None,
            _ => {}
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let trace_id = unhex::<16>(&v[3..35])?;
        let parent_id = unhex::<8>(&v[36..52])?;
        let flags = unhex::<1>(&v[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id: TraceId(trace_id),
            parent_id: SpanId(parent_id),
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The request's `traceparent`, when it has exactly one valid value.
    pub fn of(headers: &HeaderMap) -> Option<TraceParent> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        TraceParent::parse(first.as_bytes())
    }

    /// The header value (version `00`).
    pub fn header_value(&self) -> HeaderValue {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id.0);
        s.push('-');
        push_hex(&mut s, &self.parent_id.0);
        s.push_str(if self.sampled { "-01" } else { "-00" });
        HeaderValue::from_str(&s).expect("hex and dashes are a valid header value")
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

/// `2 * N` lowercase hex digits as bytes.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_recommendations_example_and_writes_it_back() {
        let tp = TraceParent::parse(VALID.as_bytes()).expect("valid");
        assert!(tp.sampled);
        assert_eq!(tp.trace_id.hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.hex(), "00f067aa0ba902b7");
        assert_eq!(tp.header_value(), VALID);
        let unsampled = VALID.replace("-01", "-00");
        assert!(!TraceParent::parse(unsampled.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn refuses_what_the_recommendation_calls_invalid() {
        let cases = [
            ("", "empty"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "short",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "zero trace",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "zero parent",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "uppercase",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "00 with more",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separator",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                "not hex",
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                "later, no dash",
            ),
        ];
        for (v, why) in cases {
            assert!(TraceParent::parse(v.as_bytes()).is_none(), "{why}: {v}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        let tp = TraceParent::parse(later.as_bytes()).expect("readable");
        assert_eq!(tp.header_value(), VALID);
    }

    #[test]
    fn two_traceparent_headers_are_none() {
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(TraceParent::of(&h).is_some());
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(TraceParent::of(&h).is_none());
    }

    #[test]
    fn random_ids_are_never_zero_and_differ() {
        let a = TraceId::random();
        assert_ne!(a.0, [0; 16]);
        assert_ne!(a, TraceId::random());
        assert_ne!(SpanId::random().0, [0; 8]);
    }
}
