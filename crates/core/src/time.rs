//! Time as QuantService counts it: Unix milliseconds UTC (Binance's unit, and ClickHouse's
//! `Int64` columns), the wall clock, month and day boundaries and their archive labels, and the
//! microsecond normalisation of 2025's spot archives. [`UnixMs`] names an instant where a bare
//! `i64` would leave the unit to guess.

use std::fmt;

/// An instant in Unix milliseconds UTC. Prints as ISO-8601 (`2024-01-01T00:00:00.000Z`), so a
/// log line or an error says when, not just a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UnixMs(pub i64);

impl UnixMs {
    /// The wall clock.
    pub fn now() -> UnixMs {
        UnixMs(now_ms())
    }

    pub fn as_i64(self) -> i64 {
        self.0
    }
}

impl From<i64> for UnixMs {
    fn from(ms: i64) -> UnixMs {
        UnixMs(ms)
    }
}

impl fmt::Display for UnixMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match chrono::DateTime::from_timestamp_millis(self.0) {
            Some(d) => write!(f, "{}", d.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
            None => write!(f, "{} ms", self.0),
        }
    }
}

/// One day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// COIN-M refuses klines windows (endTime − startTime) longer than this.
pub const CM_MAX_RANGE_MS: i64 = 200 * DAY_MS;

/// The wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Midnight UTC of the first day of the month containing `t` (ms).
pub fn month_start(t: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    let Some(dt) = Utc.timestamp_millis_opt(t).single() else {
        return t;
    };
    Utc.with_ymd_and_hms(dt.year(), dt.month(), 1, 0, 0, 0)
        .single()
        .map_or(t, |m| m.timestamp_millis())
}

/// Midnight UTC of the first day of the month after the one containing `t` (ms).
pub fn next_month_start(t: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    let Some(dt) = Utc.timestamp_millis_opt(t).single() else {
        return t;
    };
    let (y, m) = if dt.month() == 12 {
        (dt.year() + 1, 1)
    } else {
        (dt.year(), dt.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .map_or(t, |m| m.timestamp_millis())
}

/// `YYYY-MM` (UTC) of `t` in ms, as archive file names write months.
pub fn month_label(t: i64) -> String {
    chrono::DateTime::from_timestamp_millis(t)
        .map_or_else(|| t.to_string(), |d| d.format("%Y-%m").to_string())
}

/// `YYYY-MM-DD` (UTC) of `t` in ms, as archive file names write days.
pub fn day_label(t: i64) -> String {
    chrono::DateTime::from_timestamp_millis(t)
        .map_or_else(|| t.to_string(), |d| d.format("%Y-%m-%d").to_string())
}

/// Binance's spot archives switched to microseconds on 2025-01-01: any timestamp past the year
/// 5138 in ms is taken as µs and divided down.
#[inline]
pub fn normalize_ms(t: i64) -> i64 {
    const MS_LIMIT: u64 = 100_000_000_000_000; // 1e14 ms ≈ year 5138
    if t.unsigned_abs() >= MS_LIMIT {
        t / 1000
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_print_as_iso_8601_utc() {
        assert_eq!(
            UnixMs(1_704_067_200_000).to_string(),
            "2024-01-01T00:00:00.000Z"
        );
        assert_eq!(
            UnixMs(1_704_067_200_123).to_string(),
            "2024-01-01T00:00:00.123Z"
        );
        assert_eq!(UnixMs(i64::MAX).to_string(), format!("{} ms", i64::MAX));
    }

    #[test]
    fn months_and_labels() {
        let t = 1_706_745_600_000 + 5 * DAY_MS + 3_600_000; // 2024-02-06 01:00
        assert_eq!(month_start(t), 1_706_745_600_000);
        assert_eq!(next_month_start(t), 1_709_251_200_000);
        assert_eq!(month_label(t), "2024-02");
        assert_eq!(day_label(t), "2024-02-06");
        assert_eq!(next_month_start(1_701_388_800_000), 1_704_067_200_000); // Dec → Jan
        assert_eq!(normalize_ms(1_735_689_600_000_000), 1_735_689_600_000);
        assert_eq!(normalize_ms(1_735_689_600_000), 1_735_689_600_000);
    }
}
