//! Unix times as UTC text (RFC 3339), without a calendar library: for tables, records and
//! log lines.

/// Unix ms as UTC to the second: `2026-12-02T20:58:29Z`.
pub fn utc(unix_ms: u64) -> String {
    let (date, rem) = civil(unix_ms);
    format!(
        "{date}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix ms as UTC to the millisecond: `2026-12-02T20:58:29.042Z`.
pub fn utc_ms(unix_ms: u64) -> String {
    let (date, rem) = civil(unix_ms);
    format!(
        "{date}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// The date (`YYYY-MM-DD`) of `unix_ms`, and the seconds since its midnight.
fn civil(unix_ms: u64) -> (String, u64) {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}-{month:02}-{day:02}"), rem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_across_years_and_leap_days() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_ms(1_796_544_905_272), "2026-12-06T08:15:05.272Z");
    }
}
