//! gRPC status codes and the `grpc-status` / `grpc-message` headers.
//!
//! `grpc-message` is percent-encoded (PROTOCOL-HTTP2.md) so any UTF-8 text
//! survives as a header value; decoding is lenient, as grpc's own, because a
//! message garbled by some hop is still worth showing to the caller.

use std::fmt;

/// A gRPC status code. A struct rather than an enum: a peer may send a code
/// this build does not know, and it must be passed on unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(pub u32);

const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl Code {
    pub const OK: Code = Code(0);
    pub const CANCELLED: Code = Code(1);
    pub const UNKNOWN: Code = Code(2);
    pub const INVALID_ARGUMENT: Code = Code(3);
    pub const DEADLINE_EXCEEDED: Code = Code(4);
    pub const NOT_FOUND: Code = Code(5);
    pub const ALREADY_EXISTS: Code = Code(6);
    pub const PERMISSION_DENIED: Code = Code(7);
    pub const RESOURCE_EXHAUSTED: Code = Code(8);
    pub const FAILED_PRECONDITION: Code = Code(9);
    pub const ABORTED: Code = Code(10);
    pub const OUT_OF_RANGE: Code = Code(11);
    pub const UNIMPLEMENTED: Code = Code(12);
    pub const INTERNAL: Code = Code(13);
    pub const UNAVAILABLE: Code = Code(14);
    pub const DATA_LOSS: Code = Code(15);
    pub const UNAUTHENTICATED: Code = Code(16);

    /// The canonical name (as grpc.StatusCode names it); None for a code
    /// outside the 17 defined ones.
    pub fn name(self) -> Option<&'static str> {
        NAMES.get(self.0 as usize).copied()
    }

    pub fn from_name(name: &str) -> Option<Code> {
        NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| u32::try_from(i).ok())
            .map(Code)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "CODE_{}", self.0),
        }
    }
}

impl From<u32> for Code {
    fn from(code: u32) -> Code {
        Code(code)
    }
}

impl From<Code> for u32 {
    fn from(code: Code) -> u32 {
        code.0
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Percent-encodes `message` for `grpc-message`: every UTF-8 byte outside
/// 0x20..=0x7E, and `%` itself, as `%XX` (uppercase).
pub fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0F)]));
        }
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes a `grpc-message` value: `%XX` (either case) becomes its byte, a
/// `%` not followed by two hex digits stays as it is, and bytes that are not
/// UTF-8 after decoding become U+FFFD.
pub fn decode_message(value: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if b == b'%' {
            let hi = value.get(i + 1).copied().and_then(hex_value);
            let lo = value.get(i + 2).copied().and_then(hex_value);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                bytes.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        bytes.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A `grpc-status` value: ASCII decimal digits only (no sign, no spaces),
/// fitting a u32; None otherwise.
pub fn parse_status(value: &[u8]) -> Option<u32> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u32, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u32::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_seventeen_codes_and_their_names() {
        assert_eq!(Code::OK.name(), Some("OK"));
        assert_eq!(Code::UNAVAILABLE.name(), Some("UNAVAILABLE"));
        assert_eq!(Code::UNAUTHENTICATED, Code(16));
        assert_eq!(Code(17).name(), None);
        assert_eq!(Code(17).to_string(), "CODE_17");
        assert_eq!(Code::DEADLINE_EXCEEDED.to_string(), "DEADLINE_EXCEEDED");
        for i in 0..17 {
            let code = Code(i);
            assert_eq!(Code::from_name(code.name().unwrap()), Some(code));
        }
        assert_eq!(Code::from_name("ok"), None);
        assert_eq!(u32::from(Code::from(13)), 13);
    }

    #[test]
    fn messages_are_percent_encoded_as_the_spec_says() {
        assert_eq!(encode_message("plain text: ok!"), "plain text: ok!");
        assert_eq!(encode_message("100%"), "100%25");
        assert_eq!(encode_message("a\nb\tc"), "a%0Ab%09c");
        assert_eq!(encode_message("\u{7f}"), "%7F");
        assert_eq!(encode_message("é"), "%C3%A9");
        assert_eq!(encode_message("键"), "%E9%94%AE");
        assert_eq!(encode_message(""), "");
    }

    #[test]
    fn decoding_is_lenient() {
        assert_eq!(decode_message(b"100%25"), "100%");
        assert_eq!(decode_message(b"%c3%a9"), "é", "lowercase hex too");
        assert_eq!(decode_message(b"50%"), "50%");
        assert_eq!(decode_message(b"%zz%4"), "%zz%4");
        assert_eq!(decode_message(b"%%41"), "%A");
        assert_eq!(decode_message(b"%FF"), "\u{FFFD}");
        assert_eq!(decode_message(b"raw \xE9t\xE9"), "raw \u{FFFD}t\u{FFFD}");
        assert_eq!(
            decode_message("déjà".as_bytes()),
            "déjà",
            "unencoded UTF-8 passes"
        );
    }

    #[test]
    fn status_values_are_plain_decimal() {
        assert_eq!(parse_status(b"0"), Some(0));
        assert_eq!(parse_status(b"14"), Some(14));
        assert_eq!(parse_status(b"007"), Some(7));
        assert_eq!(parse_status(b"4294967295"), Some(u32::MAX));
        for bad in [
            &b""[..],
            b"4294967296",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"1a",
            b"0x1",
        ] {
            assert_eq!(
                parse_status(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn decode_undoes_encode(s in any::<String>()) {
            prop_assert_eq!(decode_message(encode_message(&s).as_bytes()), s);
        }

        #[test]
        fn encoded_messages_are_visible_ascii_header_values(s in any::<String>()) {
            let encoded = encode_message(&s);
            prop_assert!(encoded.bytes().all(|b| (0x20..=0x7E).contains(&b)));
            prop_assert!(http::HeaderValue::from_str(&encoded).is_ok());
        }

        #[test]
        fn decode_never_panics(value in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_message(&value);
        }

        #[test]
        fn decode_never_panics_on_percent_soup(value in "[%0-9a-fA-Fg-z\u{e9}]{0,24}") {
            let _ = decode_message(value.as_bytes());
        }

        #[test]
        fn status_round_trips(n in any::<u32>()) {
            prop_assert_eq!(parse_status(n.to_string().as_bytes()), Some(n));
        }

        #[test]
        fn status_never_panics(value in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = parse_status(&value);
        }
    }
}
