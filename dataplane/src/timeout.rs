//! The `grpc-timeout` header (gRPC's PROTOCOL-HTTP2.md): 1 to 8 ASCII
//! digits, then one unit of `H M S m u n`; nothing else.
//!
//! The sidecar reads the caller's timeout to know its deadline, and writes
//! what is left of it on every attempt it sends upstream.

use std::fmt;
use std::time::Duration;

/// The most digits the spec allows (`TimeoutValue`).
const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeoutError {
    Empty,
    /// No digit before the unit, or more than eight.
    BadDigits,
    /// Not one of `H M S m u n` (or characters after it).
    BadUnit,
}

impl fmt::Display for TimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutError::Empty => "empty grpc-timeout",
            TimeoutError::BadDigits => "grpc-timeout needs 1 to 8 digits before its unit",
            TimeoutError::BadUnit => "grpc-timeout unit must be one of H M S m u n",
        })
    }
}

impl std::error::Error for TimeoutError {}

/// Units from the most precise, with their length in nanoseconds.
const UNITS: [(u8, u128); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

fn unit_nanos(unit: u8) -> Option<u128> {
    UNITS.iter().find(|(u, _)| *u == unit).map(|(_, n)| *n)
}

pub fn parse(value: &[u8]) -> Result<Duration, TimeoutError> {
    let Some((&unit, digits)) = value.split_last() else {
        return Err(TimeoutError::Empty);
    };
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        // A unit where a digit should be reads better as a bad unit: "5Sx".
        if unit_nanos(unit).is_none() {
            return Err(TimeoutError::BadUnit);
        }
        return Err(TimeoutError::BadDigits);
    }
    let nanos = unit_nanos(unit).ok_or(TimeoutError::BadUnit)?;
    let count = digits
        .iter()
        .fold(0u128, |n, d| n * 10 + u128::from(d - b'0'));
    // At most 99,999,999 hours: about 3.6e20 ns, well within Duration.
    let total = count * nanos;
    let secs = u64::try_from(total / 1_000_000_000).unwrap_or(u64::MAX);
    let sub = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, sub))
}

/// `d` in the most precise unit that fits in 8 digits, rounded up (so the
/// value never reads less than `d`, and is less than `d` plus one unit).
/// Longer than 99,999,999 hours: that, the most the header can say.
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit, len) in UNITS {
        let count = nanos.div_ceil(len);
        if count <= u128::from(MAX_VALUE) {
            return format!("{count}{}", char::from(unit));
        }
    }
    format!("{MAX_VALUE}H")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX_DURATION: u64 = 99_999_999 * 3600; // seconds

    #[test]
    fn every_unit_parses() {
        assert_eq!(parse(b"1H"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse(b"2M"), Ok(Duration::from_secs(120)));
        assert_eq!(parse(b"3S"), Ok(Duration::from_secs(3)));
        assert_eq!(parse(b"4m"), Ok(Duration::from_millis(4)));
        assert_eq!(parse(b"5u"), Ok(Duration::from_micros(5)));
        assert_eq!(parse(b"6n"), Ok(Duration::from_nanos(6)));
        assert_eq!(parse(b"0n"), Ok(Duration::ZERO));
        assert_eq!(parse(b"00000010S"), Ok(Duration::from_secs(10)));
        assert_eq!(parse(b"99999999H"), Ok(Duration::from_secs(MAX_DURATION)));
    }

    #[test]
    fn anything_else_is_refused() {
        use TimeoutError::*;
        for (value, error) in [
            (&b""[..], Empty),
            (b"S", BadDigits),
            (b"123456789S", BadDigits),
            (b"+1S", BadDigits),
            (b"-1S", BadDigits),
            (b" 1S", BadDigits),
            (b"1 S", BadDigits),
            (b"1.5S", BadDigits),
            (b"1s", BadUnit),
            (b"1", BadUnit),
            (b"1S ", BadUnit),
            (b"1Sx", BadUnit),
            (b"1h", BadUnit),
            ("１S".as_bytes(), BadDigits), // a full-width digit
        ] {
            assert_eq!(
                parse(value),
                Err(error),
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        assert!(TimeoutError::BadUnit.to_string().contains("H M S m u n"));
    }

    #[test]
    fn format_picks_the_most_precise_unit_that_fits() {
        assert_eq!(format(Duration::ZERO), "0n");
        assert_eq!(format(Duration::from_nanos(1)), "1n");
        assert_eq!(format(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(format(Duration::from_nanos(100_000_000)), "100000u");
        assert_eq!(
            format(Duration::from_nanos(100_000_001)),
            "100001u",
            "rounded up"
        );
        assert_eq!(format(Duration::from_secs(1)), "1000000u");
        assert_eq!(format(Duration::from_secs(100)), "100000m");
        assert_eq!(format(Duration::from_secs(100_000)), "100000S");
        assert_eq!(format(Duration::from_secs(100_000_000)), "1666667M");
        assert_eq!(format(Duration::from_secs(MAX_DURATION)), "99999999H");
        assert_eq!(
            format(Duration::MAX),
            "99999999H",
            "the most the header can say"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(value in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = parse(&value);
        }

        #[test]
        fn parse_never_panics_on_near_misses(value in "[0-9+\\- ]{0,10}[HMSmunsx ]?") {
            let _ = parse(value.as_bytes());
        }

        #[test]
        fn format_never_gives_less_and_never_a_unit_more(
            secs in 0u64..=MAX_DURATION,
            sub in 0u32..1_000_000_000,
        ) {
            let d = Duration::new(secs, sub).min(Duration::from_secs(MAX_DURATION));
            let text = format(d);
            let back = parse(text.as_bytes()).unwrap();
            let unit = unit_nanos(*text.as_bytes().last().unwrap()).unwrap();
            prop_assert!(back >= d, "{text}");
            prop_assert!(back.as_nanos() < d.as_nanos() + unit, "{text}");
            prop_assert!(text.len() <= 9);
        }

        #[test]
        fn parse_format_parse_is_parse(count in 0u64..=99_999_999, unit in "[HMSmun]") {
            let value = format!("{count}{unit}");
            let once = parse(value.as_bytes()).unwrap();
            prop_assert_eq!(parse(format(once).as_bytes()).unwrap(), once);
        }
    }
}
