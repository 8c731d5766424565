//! The path-tracking walker over parsed YAML: typed reads of one mapping's keys that collect
//! every problem (with its key path and the bad value) instead of stopping at the first, and
//! report the keys nobody read as unknown. Also the blanking of values in parser messages.

use std::collections::BTreeSet;
use std::time::Duration;

use yaml_serde::{Mapping, Value};

use super::duration::{format_duration, parse_duration, MAX_DURATION};
use super::Secret;

/// Replaces every `quoted` or "quoted" span of a parser message with `…`: the YAML parser
/// echoes values, and the value may be a password (secrets are not known before parsing).
pub(super) fn hide_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut open: Option<char> = None;
    for c in msg.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some(c);
                }
            }
        }
    }
    out
}

/// One mapping in the YAML tree, with the keys read so far (the rest are unknown keys).
pub(super) struct Section<'v> {
    path: String,
    map: Option<&'v Mapping>,
    read: BTreeSet<&'static str>,
}

impl<'v> Section<'v> {
    pub(super) fn new(path: String, map: Option<&'v Mapping>) -> Self {
        Section {
            path,
            map,
            read: BTreeSet::new(),
        }
    }

    pub(super) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value at `key`; `None` when absent or null (null means "use the default").
    pub(super) fn get(&mut self, key: &'static str) -> Option<&'v Value> {
        self.read.insert(key);
        self.map?.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn child(&mut self, key: &'static str, errs: &mut Vec<String>) -> Section<'v> {
        let path = self.key_path(key);
        match self.get(key) {
            None => Section::new(path, None),
            Some(Value::Mapping(m)) => Section::new(path, Some(m)),
            Some(other) => {
                errs.push(format!("{path}: expected a mapping, got {}", show(other)));
                Section::new(path, None)
            }
        }
    }

    pub(super) fn string(
        &mut self,
        key: &'static str,
        default: &str,
        errs: &mut Vec<String>,
    ) -> String {
        self.opt_string(key, errs)
            .unwrap_or_else(|| default.to_string())
    }

    /// A string value. Numbers are refused rather than converted (YAML would turn `1e3` into
    /// `1000.0` or `0x1F` into `31`): the user is told to quote it.
    pub(super) fn opt_string(
        &mut self,
        key: &'static str,
        errs: &mut Vec<String>,
    ) -> Option<String> {
        let path = self.key_path(key);
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                errs.push(format!(
                    "{path}: expected a string (quote it), got {}",
                    show(other)
                ));
                None
            }
        }
    }

    /// A secret string: like `opt_string`, but no error ever shows the value.
    pub(super) fn secret(&mut self, key: &'static str, errs: &mut Vec<String>) -> Secret {
        let path = self.key_path(key);
        match self.get(key) {
            None => Secret::default(),
            Some(Value::String(s)) => Secret::new(s.clone()),
            Some(_) => {
                errs.push(format!(
                    "{path}: expected a quoted string (value not shown: it is a secret)"
                ));
                Secret::default()
            }
        }
    }

    pub(super) fn boolean(
        &mut self,
        key: &'static str,
        default: bool,
        errs: &mut Vec<String>,
    ) -> bool {
        let path = self.key_path(key);
        match self.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                errs.push(format!(
                    "{path}: expected true or false, got {}",
                    show(other)
                ));
                default
            }
        }
    }

    pub(super) fn int(
        &mut self,
        key: &'static str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
        errs: &mut Vec<String>,
    ) -> i64 {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_i64() {
            Some(n) if range.contains(&n) => n,
            Some(n) => {
                errs.push(format!(
                    "{path}: must be {}..{}, got {n}",
                    range.start(),
                    range.end()
                ));
                default
            }
            None => {
                errs.push(format!("{path}: expected an integer, got {}", show(v)));
                default
            }
        }
    }

    pub(super) fn opt_int(
        &mut self,
        key: &'static str,
        range: std::ops::RangeInclusive<i64>,
        errs: &mut Vec<String>,
    ) -> Option<i64> {
        self.map?.get(key).filter(|v| !v.is_null())?;
        let n = self.int(key, *range.start(), range.clone(), errs);
        Some(n)
    }

    /// A number in (0, 1].
    pub(super) fn ratio(&mut self, key: &'static str, default: f64, errs: &mut Vec<String>) -> f64 {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_f64() {
            Some(x) if x > 0.0 && x <= 1.0 => x,
            _ => {
                errs.push(format!(
                    "{path}: must be a number in (0, 1], got {}",
                    show(v)
                ));
                default
            }
        }
    }

    pub(super) fn port(&mut self, key: &'static str, default: u16, errs: &mut Vec<String>) -> u16 {
        let n = self.int(key, i64::from(default), 1..=65535, errs);
        u16::try_from(n).unwrap_or(default)
    }

    /// A duration from 0 up to `MAX_DURATION`.
    pub(super) fn duration(
        &mut self,
        key: &'static str,
        default: Duration,
        errs: &mut Vec<String>,
    ) -> Duration {
        self.duration_in(key, default, Duration::ZERO, errs)
    }

    /// A duration from `min` up to `MAX_DURATION`.
    pub(super) fn duration_in(
        &mut self,
        key: &'static str,
        default: Duration,
        min: Duration,
        errs: &mut Vec<String>,
    ) -> Duration {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_str().map(parse_duration) {
            Some(Ok(d)) if d >= min && d <= MAX_DURATION => d,
            Some(Ok(_)) => {
                errs.push(format!(
                    "{path}: must be {}..{}, got {}",
                    format_duration(min),
                    format_duration(MAX_DURATION),
                    show(v)
                ));
                default
            }
            Some(Err(why)) => {
                errs.push(format!("{path}: {why}, got {}", show(v)));
                default
            }
            None => {
                errs.push(format!(
                    "{path}: expected a duration like 500ms, 30s, 5m or 1h, got {}",
                    show(v)
                ));
                default
            }
        }
    }

    pub(super) fn url(
        &mut self,
        key: &'static str,
        default: &str,
        schemes: &[&str],
        errs: &mut Vec<String>,
    ) -> String {
        let path = self.key_path(key);
        let s = self.string(key, default, errs);
        match url::Url::parse(&s) {
            Ok(u) if !u.username().is_empty() || u.password().is_some() => errs.push(format!(
                "{path}: credentials in URLs are not allowed (they would show in logs and errors)"
            )),
            Ok(u) if schemes.contains(&u.scheme()) && u.host_str().is_some() => {}
            Ok(u) => errs.push(format!(
                "{path}: must be a {} URL with a host, got {s:?} (scheme {})",
                schemes.join("/"),
                u.scheme()
            )),
            Err(e) => errs.push(format!("{path}: not a valid URL ({e}), got {s:?}")),
        }
        s
    }

    /// Reports every key in this mapping that no reader asked for.
    pub(super) fn finish(self, errs: &mut Vec<String>) {
        let Some(map) = self.map else { return };
        for key in map.keys() {
            let known = key.as_str().is_some_and(|k| self.read.contains(k));
            if !known {
                let name = key.as_str().map_or_else(|| show(key), str::to_string);
                let expected: Vec<&str> = self.read.iter().copied().collect();
                errs.push(format!(
                    "{}: unknown key (expected one of: {})",
                    self.key_path(&name),
                    expected.join(", ")
                ));
            }
        }
    }
}

/// A short rendering of a YAML value for error messages.
pub(super) fn show(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_parts_of_parser_messages_are_hidden() {
        assert_eq!(
            hide_quoted("invalid value: string \"hunter2xyz\", expected i64 at line 3"),
            "invalid value: string \"…\", expected i64 at line 3"
        );
        assert_eq!(
            hide_quoted("invalid type: integer `123456`"),
            "invalid type: integer `…`"
        );
    }
}
