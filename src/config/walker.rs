//! The path-tracking walker over parsed YAML: typed reads of one mapping's keys that collect
//! every problem (with its key path and the bad value) instead of stopping at the first, and
//! report the keys nobody read as unknown. Also the blanking of values in parser messages, and
//! finding duplicate keys with their key path and lines (the parser names neither).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use yaml_serde::{Mapping, Value};

use super::duration::{format_duration, parse_duration, MAX_DURATION};
use super::size::parse_size;
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

    /// A size (`10KB`, `100MB`, `1GB`); a bare number is refused (the unit is not guessed).
    pub(super) fn size(&mut self, key: &'static str, default: u64, errs: &mut Vec<String>) -> u64 {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_str().map(parse_size) {
            Some(Ok(n)) => n,
            Some(Err(why)) => {
                errs.push(format!("{path}: {why}, got {}", show(v)));
                default
            }
            None => {
                errs.push(format!(
                    "{path}: expected a size like 10KB, 100MB or 1GB, got {}",
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

/// At most this many duplicate keys are reported (each costs two passes over the text).
const MAX_DUPLICATES: usize = 10;

/// Every duplicate key in `text` as `app.clickhouse.port: duplicate key at line 12 (first at
/// line 8)`, in document order; empty when there is none (or the text does not parse for
/// another reason). Values are never shown.
///
/// The YAML parser refuses duplicates, but reports them at the line of the mapping's first key
/// and names the key inside quotes (which are blanked, as they may hold a secret). Serde gives
/// no positions, except that an error raised while a key is being read carries that key's
/// line: so one pass lists every key occurrence by path, and one pass per occurrence of
/// interest stops at it on purpose to learn its line.
pub(super) fn duplicate_keys(text: &str) -> Vec<String> {
    let Ok(order) = key_occurrences(text) else {
        return Vec::new();
    };
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut dups = Vec::new();
    for path in &order {
        let n = count.entry(path.as_str()).or_default();
        if *n > 0 {
            dups.push((path.as_str(), *n));
        }
        *n += 1;
    }
    dups.into_iter()
        .take(MAX_DUPLICATES)
        .map(|(path, n)| {
            let at =
                |nth| line_of(text, path, nth).map_or_else(|| "?".to_string(), |l| l.to_string());
            format!(
                "{path}: duplicate key at line {} (first at line {})",
                at(n),
                at(0)
            )
        })
        .collect()
}

/// The key path of every key in `text`, in document order (duplicates included).
fn key_occurrences(text: &str) -> Result<Vec<String>, yaml_serde::Error> {
    let probe = Probe::default();
    Node {
        probe: &probe,
        path: String::new(),
    }
    .deserialize(yaml_serde::Deserializer::from_str(text))?;
    Ok(probe.order.into_inner())
}

/// The 1-based line of the `nth` (0-based) occurrence of the key at `path`.
fn line_of(text: &str, path: &str, nth: usize) -> Option<usize> {
    let probe = Probe {
        target: Some((path.to_string(), nth)),
        ..Probe::default()
    };
    let err = Node {
        probe: &probe,
        path: String::new(),
    }
    .deserialize(yaml_serde::Deserializer::from_str(text))
    .err()?;
    if !probe.hit.get() {
        return None;
    }
    err.location().map(|l| l.line())
}

/// What a pass over the key occurrences looks for.
#[derive(Default)]
struct Probe {
    /// Stop with an error at this occurrence (key path, 0-based index) of a key.
    target: Option<(String, usize)>,
    /// Whether the pass stopped at the target.
    hit: std::cell::Cell<bool>,
    /// Occurrences so far per key path.
    seen: RefCell<HashMap<String, usize>>,
    /// Key paths in document order.
    order: RefCell<Vec<String>>,
}

/// A YAML node at `path`, walked for its keys; values themselves are ignored.
struct Node<'p> {
    probe: &'p Probe,
    path: String,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(path) = map.next_key_seed(Key {
            probe: self.probe,
            parent: &self.path,
        })? {
            map.next_value_seed(Node {
                probe: self.probe,
                path,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        while seq
            .next_element_seed(Node {
                probe: self.probe,
                path: format!("{}[{i}]", self.path),
            })?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): its value is walked like any other.
        let (IgnoredAny, variant) = data.variant()?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A mapping key; deserializes to its key path (and stops the pass at the probe's target).
struct Key<'p> {
    probe: &'p Probe,
    parent: &'p str,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl Key<'_> {
    /// Records one occurrence of `key`; the error (raised while the key is being read, so it
    /// carries the key's line) when it is the target.
    fn occurrence<E: de::Error>(self, key: &str) -> Result<String, E> {
        let path = if self.parent.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.parent)
        };
        let mut seen = self.probe.seen.borrow_mut();
        let n = seen.entry(path.clone()).or_default();
        let nth = *n;
        *n += 1;
        if self
            .probe
            .target
            .as_ref()
            .is_some_and(|(p, i)| *p == path && *i == nth)
        {
            self.probe.hit.set(true);
            return Err(E::custom("found the key occurrence looked for"));
        }
        self.probe.order.borrow_mut().push(path.clone());
        Ok(path)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.occurrence(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        self.occurrence(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        self.occurrence(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        self.occurrence(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        self.occurrence(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        self.occurrence("null")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        // A complex key: not something a config has; walked over, never reported.
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(format!("{}.?", self.parent))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(format!("{}.?", self.parent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_found_with_path_and_both_lines() {
        let text = "app:\n  clickhouse:\n    port: 1\n    host: h\n    port: 2\n  writer: {}\n  writer:\n    batch_rows: 1\n";
        assert_eq!(
            duplicate_keys(text),
            vec![
                "app.clickhouse.port: duplicate key at line 5 (first at line 3)",
                "app.writer: duplicate key at line 7 (first at line 6)",
            ]
        );
        // Flow style and keys in lists.
        let text = "a: {x: 1,\n  x: 2}\nl:\n  - k: 1\n    k: 2\n  - k: 3\n";
        assert_eq!(
            duplicate_keys(text),
            vec![
                "a.x: duplicate key at line 2 (first at line 1)",
                "l[0].k: duplicate key at line 5 (first at line 4)",
            ]
        );
        assert!(duplicate_keys("app:\n  a: 1\n  b: 2\n").is_empty());
        assert!(duplicate_keys("app: [unclosed\n").is_empty());
    }

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
