//! The Prometheus text exposition format (version 0.0.4): metric families with `# HELP` and
//! `# TYPE`, samples with escaped label values, and the labelled counters and gauges
//! ([`CounterVec`], [`GaugeVec`]) that modules declare as statics. Knows nothing of what is
//! measured: families come from whoever collects into a [`Scrape`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One metric family: its samples in the order they were added.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    help: String,
    kind: Kind,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

impl Family {
    /// Adds a sample with these labels (`[("market", "spot"), ("egress", "direct")]`).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Family {
        debug_assert!(
            labels.iter().all(|(n, _)| is_label_name(n)),
            "bad label name in {labels:?}"
        );
        self.samples.push((
            labels
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            value,
        ));
        self
    }

    /// Adds the one sample of a family without labels.
    pub fn value(&mut self, value: f64) -> &mut Family {
        self.sample(&[], value)
    }
}

/// What one scrape collects: families by name. Collectors add to it; [`Scrape::render`]
/// writes the exposition text.
#[derive(Debug, Default)]
pub struct Scrape {
    families: BTreeMap<String, Family>,
}

impl Scrape {
    /// The counter family `name` (created with `help` if new). Counter names end in `_total`.
    pub fn counter(&mut self, name: &str, help: &str) -> &mut Family {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        self.family(name, help, Kind::Counter)
    }

    /// The gauge family `name` (created with `help` if new).
    pub fn gauge(&mut self, name: &str, help: &str) -> &mut Family {
        self.family(name, help, Kind::Gauge)
    }

    fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Family {
        debug_assert!(is_metric_name(name), "bad metric name {name:?}");
        let f = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                samples: Vec::new(),
            });
        debug_assert_eq!(f.kind, kind, "{name} collected as two types");
        f
    }

    /// The value of the sample of `name` with exactly these labels, if collected.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families.get(name)?.samples.iter().find_map(|(l, v)| {
            (l.len() == labels.len()
                && l.iter()
                    .zip(labels)
                    .all(|((n, v), (n2, v2))| n == n2 && v == v2))
            .then_some(*v)
        })
    }

    /// The exposition text: families by name, each with HELP and TYPE; families without
    /// samples are left out.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            if f.samples.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
            for (labels, value) in &f.samples {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (n, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{n}=\"{}\"", escape_label_value(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", format_value(*value));
            }
        }
        out
    }
}

/// `\` and line breaks escaped, as HELP text needs.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `\`, `"` and line breaks escaped, as label values need.
pub fn escape_label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value: integers without a fraction, `+Inf`/`-Inf`/`NaN` as Prometheus spells them.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        v.to_string()
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
pub fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    !s.starts_with("__")
        && matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Label values → value, behind a lock.
type Series<V> = Mutex<BTreeMap<Vec<String>, V>>;

fn key(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// A counter family with labels, declared as a static:
/// `static SENT: CounterVec = CounterVec::new("x_sent_total", "…", &["peer"]);`, counted with
/// `SENT.inc(&["a"], 1)` and collected with `SENT.collect(scrape)`.
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Series<u64>,
}

impl CounterVec {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> CounterVec {
        CounterVec {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<String>, u64>> {
        self.series.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `n` to the series with these label values (one per label name, in order).
    pub fn inc(&self, values: &[&str], n: u64) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        *self.lock().entry(key(values)).or_insert(0) += n;
    }

    /// The series' value (0 if it does not exist).
    pub fn get(&self, values: &[&str]) -> u64 {
        self.lock().get(&key(values)).copied().unwrap_or(0)
    }

    pub fn collect(&self, scrape: &mut Scrape) {
        let series = self.lock().clone();
        let f = scrape.counter(self.name, self.help);
        for (values, v) in series {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            f.sample(&labels, v as f64);
        }
    }
}

/// A gauge family with labels, declared as a static; see [`CounterVec`].
pub struct GaugeVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Series<f64>,
}

impl GaugeVec {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> GaugeVec {
        GaugeVec {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<String>, f64>> {
        self.series.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set(&self, values: &[&str], v: f64) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        self.lock().insert(key(values), v);
    }

    pub fn get(&self, values: &[&str]) -> Option<f64> {
        self.lock().get(&key(values)).copied()
    }

    pub fn collect(&self, scrape: &mut Scrape) {
        let series = self.lock().clone();
        let f = scrape.gauge(self.name, self.help);
        for (values, v) in series {
            let labels: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            f.sample(&labels, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_help_type_and_escaped_labels() {
        let mut s = Scrape::default();
        s.gauge("b_gauge", "A gauge.\nSecond line \\ here.")
            .sample(&[("name", "a\"b\\c\nd")], 1.5)
            .sample(&[("name", "plain")], f64::INFINITY);
        s.counter("a_things_total", "Things.").value(3.0);
        s.gauge("c_empty", "Nothing collected.");
        assert_eq!(
            s.render(),
            "# HELP a_things_total Things.\n\
             # TYPE a_things_total counter\n\
             a_things_total 3\n\
             # HELP b_gauge A gauge.\\nSecond line \\\\ here.\n\
             # TYPE b_gauge gauge\n\
             b_gauge{name=\"a\\\"b\\\\c\\nd\"} 1.5\n\
             b_gauge{name=\"plain\"} +Inf\n"
        );
        assert_eq!(s.get("b_gauge", &[("name", "plain")]), Some(f64::INFINITY));
        assert_eq!(s.get("b_gauge", &[("name", "other")]), None);
    }

    #[test]
    fn labelled_counters_and_gauges() {
        static C: CounterVec = CounterVec::new("t_sent_total", "Sent.", &["market", "egress"]);
        static G: GaugeVec = GaugeVec::new("t_depth", "Depth.", &["market"]);
        C.inc(&["spot", "direct"], 2);
        C.inc(&["spot", "direct"], 1);
        C.inc(&["um", "10.0.0.1:1080"], 0);
        G.set(&["spot"], 7.0);
        G.set(&["spot"], 4.0);
        let mut s = Scrape::default();
        C.collect(&mut s);
        G.collect(&mut s);
        assert_eq!(
            s.render(),
            "# HELP t_depth Depth.\n# TYPE t_depth gauge\nt_depth{market=\"spot\"} 4\n\
             # HELP t_sent_total Sent.\n# TYPE t_sent_total counter\n\
             t_sent_total{market=\"spot\",egress=\"direct\"} 3\n\
             t_sent_total{market=\"um\",egress=\"10.0.0.1:1080\"} 0\n"
        );
        assert_eq!(C.get(&["spot", "direct"]), 3);
    }

    #[test]
    fn names() {
        for ok in ["a", "quantservice_rows_total", "a:b_c9", "_x"] {
            assert!(is_metric_name(ok), "{ok}");
        }
        for bad in ["", "9a", "a-b", "a b", "é"] {
            assert!(!is_metric_name(bad), "{bad}");
        }
        for ok in ["market", "_x", "a9"] {
            assert!(is_label_name(ok), "{ok}");
        }
        for bad in ["", "__name", "a:b", "9a"] {
            assert!(!is_label_name(bad), "{bad}");
        }
    }
}
