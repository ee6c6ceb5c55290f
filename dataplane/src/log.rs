//! Log lines on stderr in the control plane's format
//! (`%(asctime)s %(levelname)s %(name)s: %(message)s`), written by the data
//! plane itself: tokio threads never call into Python.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

const LOGGER: &str = "ringmesh.dataplane";
static LEVEL: AtomicU8 = AtomicU8::new(WARNING);

pub const DEBUG: u8 = 10;
pub const INFO: u8 = 20;
pub const WARNING: u8 = 30;
pub const ERROR: u8 = 40;

/// The least severe level written (Python's numbers: 10 DEBUG ... 40 ERROR).
pub fn set_level(level: u8) {
    LEVEL.store(level, Relaxed);
}

pub fn info(message: &str) {
    write(INFO, "INFO", message);
}

pub fn warning(message: &str) {
    write(WARNING, "WARNING", message);
}

fn write(level: u8, name: &str, message: &str) {
    if level < LEVEL.load(Relaxed) {
        return;
    }
    let line = format!("{} {name} {LOGGER}: {message}\n", timestamp());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn timestamp() -> String {
    utc(SystemTime::now())
}

/// `2026-12-01 11:05:52,123`, in UTC.
pub fn utc(at: SystemTime) -> String {
    let now = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02},{:03}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        now.subsec_millis()
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
