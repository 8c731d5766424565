//! Durations in `app.yaml`: parsing `500ms`/`30s`/`1m30s`, rendering them back, their bounds,
//! and serializing config durations the way they are written.

use std::time::Duration;

use serde::Serializer;

/// Durations above this are refused (they would overflow deadlines and mean nothing useful).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);
/// Timeouts and intervals below this are refused (0 would fail or spin).
pub(crate) const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d` and sums like `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("expected a duration like 500ms, 30s, 5m or 1h".to_string());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err("expected a duration like 500ms, 30s, 5m or 1h".to_string());
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| "duration number too large".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => {
                return Err(
                    "expected a unit ms, s, m, h or d after each number (e.g. 30s)".to_string(),
                )
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Renders a duration the way it is written in `app.yaml` (`1m30s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        for bad in ["", "30", "s", "5 minutes", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        for d in ["30s", "5m", "1h", "1m30s", "500ms", "2d"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }
}
