//! Sizes in `app.yaml`: parsing `10KB`/`100MB`/`1GB`, rendering them back, and serializing
//! config sizes the way they are written. Units are binary, as logrotate counts them:
//! 1KB = 1024 bytes, 1MB = 1024KB, 1GB = 1024MB.

use serde::Serializer;

pub const KB: u64 = 1024;
pub const MB: u64 = 1024 * KB;
pub const GB: u64 = 1024 * MB;

const EXPECTED: &str = "expected a size like 10KB, 100MB or 1GB (1KB = 1024 bytes)";

/// Parses a whole number directly followed by `KB`, `MB` or `GB` (any letter case), more than
/// zero: `10KB`, `100MB`, `1GB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err("a size cannot be negative".to_string());
    }
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(EXPECTED.to_string());
    }
    let (number, unit) = s.split_at(digits);
    if unit.is_empty() {
        return Err("a unit KB, MB or GB is needed after the number (e.g. 100MB)".to_string());
    }
    if unit.starts_with(char::is_whitespace) {
        return Err("no space between the number and the unit (write 100MB)".to_string());
    }
    if unit.starts_with(['.', ',']) {
        return Err(
            "a size is a whole number of KB, MB or GB (write 1536MB, not 1.5GB)".to_string(),
        );
    }
    let scale = match unit.to_ascii_uppercase().as_str() {
        "KB" => KB,
        "MB" => MB,
        "GB" => GB,
        _ => return Err(format!("unknown unit {unit:?}: use KB, MB or GB")),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| "size number too large".to_string())?;
    if n == 0 {
        return Err("a size must be more than 0".to_string());
    }
    n.checked_mul(scale)
        .ok_or_else(|| "size too large".to_string())
}

/// Renders a size the way it is written in `app.yaml`: the largest unit that divides it
/// (`100MB`, `1536KB`); a size that is no whole number of KB shows its bytes (`1000 bytes`).
pub fn format_size(bytes: u64) -> String {
    for (unit, scale) in [("GB", GB), ("MB", MB), ("KB", KB)] {
        if bytes > 0 && bytes % scale == 0 {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes} bytes")
}

pub(crate) fn ser_size<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_size(*bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_size("10KB").unwrap(), 10 * 1024);
        assert_eq!(parse_size("100MB").unwrap(), 100 * 1024 * 1024);
        assert_eq!(parse_size("1GB").unwrap(), 1024 * 1024 * 1024);
        assert_eq!(parse_size("1gb").unwrap(), GB);
        assert_eq!(parse_size(" 5mb ").unwrap(), 5 * MB);
        for s in ["10KB", "100MB", "1GB", "1536KB", "3GB"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
        assert_eq!(format_size(1000), "1000 bytes");
        assert_eq!(format_size(2048 * MB), "2GB");
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        let err = |s: &str| parse_size(s).unwrap_err();
        assert!(err("10 MB").contains("no space"), "{}", err("10 MB"));
        assert!(err("-1KB").contains("negative"), "{}", err("-1KB"));
        assert!(err("5XB").contains("unknown unit \"XB\""), "{}", err("5XB"));
        assert!(err("0").contains("unit"), "{}", err("0"));
        assert!(err("0KB").contains("more than 0"), "{}", err("0KB"));
        assert!(err("1.5GB").contains("whole number"), "{}", err("1.5GB"));
        assert!(err("").contains("expected a size"), "{}", err(""));
        assert!(err("MB").contains("expected a size"), "{}", err("MB"));
        assert!(err("100").contains("unit"), "{}", err("100"));
        assert!(err("10B").contains("unknown unit"), "{}", err("10B"));
        assert!(err("99999999999999999999KB").contains("too large"));
        assert!(err("18014398509481984KB").contains("too large"));
    }
}
