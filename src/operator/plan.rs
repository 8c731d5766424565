//! `plan()`: one diff, over every kind of declared thing, from what runs to what is desired —
//! keyed tasks (started, restarted with a new spec, stopped), live streams (subscribed,
//! unsubscribed) and the proxy rows the egress pool works from. Like Vector's `ConfigDiff`:
//! pure and level-triggered, it looks only at the two states, never at what happened, and the
//! runtime only carries it out.

use std::collections::{BTreeMap, BTreeSet};

use crate::market::PairKey;
use crate::store::state::ProxyRow;
use crate::tasks::{TaskKey, TaskSpec};

/// What runs (or, for the desired side, should run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub tasks: BTreeMap<TaskKey, TaskSpec>,
    /// Pairs streamed live.
    pub streams: BTreeSet<PairKey>,
    /// `proxy_config` rows; `None` on the desired side when they could not be read (unknown
    /// is not empty: the pool is left as it is).
    pub proxies: Option<Vec<ProxyRow>>,
}

/// The difference between desired and running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<(TaskKey, TaskSpec)>,
    /// Running with another spec: stopped, then started with the new one.
    pub change: Vec<(TaskKey, TaskSpec)>,
    pub remove: Vec<TaskKey>,
    pub subscribe: Vec<PairKey>,
    pub unsubscribe: Vec<PairKey>,
    /// The rows the egress pool must now work from, when they changed.
    pub proxies: Option<Vec<ProxyRow>>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.change.is_empty()
            && self.remove.is_empty()
            && self.subscribe.is_empty()
            && self.unsubscribe.is_empty()
            && self.proxies.is_none()
    }

    /// The desired stream set changed.
    pub fn streams_changed(&self) -> bool {
        !self.subscribe.is_empty() || !self.unsubscribe.is_empty()
    }
}

pub fn plan(desired: &State, running: &State) -> Plan {
    let mut p = Plan::default();
    for (k, spec) in &desired.tasks {
        match running.tasks.get(k) {
            None => p.add.push((k.clone(), spec.clone())),
            Some(r) if r != spec => p.change.push((k.clone(), spec.clone())),
            Some(_) => {}
        }
    }
    for k in running.tasks.keys() {
        if !desired.tasks.contains_key(k) {
            p.remove.push(k.clone());
        }
    }
    p.subscribe = desired
        .streams
        .difference(&running.streams)
        .cloned()
        .collect();
    p.unsubscribe = running
        .streams
        .difference(&desired.streams)
        .cloned()
        .collect();
    if let Some(rows) = &desired.proxies {
        if running.proxies.as_ref() != Some(rows) {
            p.proxies = Some(rows.clone());
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::PairSpec;

    fn k(s: &str) -> PairKey {
        PairKey::parse("um", s, "1m").unwrap()
    }

    fn spec(from: i64, stream: bool) -> TaskSpec {
        TaskSpec::Pair(PairSpec {
            backfill_from: from,
            stream,
        })
    }

    fn proxy(host: &str) -> ProxyRow {
        ProxyRow {
            host: host.into(),
            port: 1080,
            username: "u".into(),
            password: "p".into(),
            enabled: 1,
        }
    }

    /// Pairs as (symbol, spec); a streamed pair is one whose spec says so.
    fn state(pairs: &[(&str, TaskSpec)], proxies: Option<Vec<ProxyRow>>) -> State {
        State {
            tasks: pairs
                .iter()
                .map(|(s, p)| (TaskKey::Pair(k(s)), p.clone()))
                .collect(),
            streams: pairs
                .iter()
                .filter(|(_, p)| matches!(p, TaskSpec::Pair(p) if p.stream))
                .map(|(s, _)| k(s))
                .collect(),
            proxies,
        }
    }

    struct Case {
        name: &'static str,
        desired: State,
        running: State,
        add: Vec<&'static str>,
        change: Vec<&'static str>,
        remove: Vec<&'static str>,
        subscribe: Vec<&'static str>,
        unsubscribe: Vec<&'static str>,
        proxies: Option<Vec<&'static str>>,
    }

    fn names<'a>(keys: impl Iterator<Item = &'a TaskKey>) -> Vec<String> {
        keys.map(|k| k.pair().unwrap().symbol.to_string()).collect()
    }

    #[test]
    fn plans_from_tables() {
        let none = Vec::<&'static str>::new;
        let cases = vec![
            Case {
                name: "nothing",
                desired: state(&[], None),
                running: state(&[], None),
                add: none(),
                change: none(),
                remove: none(),
                subscribe: none(),
                unsubscribe: none(),
                proxies: None,
            },
            Case {
                name: "start one, streamed",
                desired: state(&[("BTCUSDT", spec(0, true))], None),
                running: state(&[], None),
                add: vec!["BTCUSDT"],
                change: none(),
                remove: none(),
                subscribe: vec!["BTCUSDT"],
                unsubscribe: none(),
                proxies: None,
            },
            Case {
                name: "steady",
                desired: state(&[("BTCUSDT", spec(0, true))], Some(vec![proxy("a")])),
                running: state(&[("BTCUSDT", spec(0, true))], Some(vec![proxy("a")])),
                add: none(),
                change: none(),
                remove: none(),
                subscribe: none(),
                unsubscribe: none(),
                proxies: None,
            },
            Case {
                name: "stop one",
                desired: state(&[], None),
                running: state(&[("BTCUSDT", spec(0, true))], None),
                add: none(),
                change: none(),
                remove: vec!["BTCUSDT"],
                subscribe: none(),
                unsubscribe: vec!["BTCUSDT"],
                proxies: None,
            },
            Case {
                name: "spec changed; streaming turned off for one",
                desired: state(
                    &[("BTCUSDT", spec(5, true)), ("ETHUSDT", spec(0, false))],
                    None,
                ),
                running: state(
                    &[("BTCUSDT", spec(0, true)), ("ETHUSDT", spec(0, true))],
                    None,
                ),
                add: none(),
                change: vec!["BTCUSDT", "ETHUSDT"],
                remove: none(),
                subscribe: none(),
                unsubscribe: vec!["ETHUSDT"],
                proxies: None,
            },
            Case {
                name: "mixed",
                desired: state(
                    &[("ADAUSDT", spec(0, true)), ("BTCUSDT", spec(0, true))],
                    None,
                ),
                running: state(
                    &[("BTCUSDT", spec(0, true)), ("XRPUSDT", spec(0, true))],
                    None,
                ),
                add: vec!["ADAUSDT"],
                change: none(),
                remove: vec!["XRPUSDT"],
                subscribe: vec!["ADAUSDT"],
                unsubscribe: vec!["XRPUSDT"],
                proxies: None,
            },
            Case {
                name: "a proxy added",
                desired: state(&[], Some(vec![proxy("a"), proxy("b")])),
                running: state(&[], Some(vec![proxy("a")])),
                add: none(),
                change: none(),
                remove: none(),
                subscribe: none(),
                unsubscribe: none(),
                proxies: Some(vec!["a", "b"]),
            },
            Case {
                name: "first proxy read, even when empty",
                desired: state(&[], Some(vec![])),
                running: state(&[], None),
                add: none(),
                change: none(),
                remove: none(),
                subscribe: none(),
                unsubscribe: none(),
                proxies: Some(vec![]),
            },
            Case {
                name: "proxy_config unreadable: the pool is left alone",
                desired: state(&[], None),
                running: state(&[], Some(vec![proxy("a")])),
                add: none(),
                change: none(),
                remove: none(),
                subscribe: none(),
                unsubscribe: none(),
                proxies: None,
            },
        ];
        for c in cases {
            let p = plan(&c.desired, &c.running);
            assert_eq!(names(p.add.iter().map(|(k, _)| k)), c.add, "{}", c.name);
            assert_eq!(
                names(p.change.iter().map(|(k, _)| k)),
                c.change,
                "{}",
                c.name
            );
            assert_eq!(names(p.remove.iter()), c.remove, "{}", c.name);
            let syms = |v: &[PairKey]| v.iter().map(|k| k.symbol.to_string()).collect::<Vec<_>>();
            assert_eq!(syms(&p.subscribe), c.subscribe, "{}", c.name);
            assert_eq!(syms(&p.unsubscribe), c.unsubscribe, "{}", c.name);
            assert_eq!(
                p.proxies
                    .as_ref()
                    .map(|r| r.iter().map(|r| r.host.clone()).collect::<Vec<_>>()),
                c.proxies
                    .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>()),
                "{}",
                c.name
            );
            let empty = c.add.is_empty()
                && c.change.is_empty()
                && c.remove.is_empty()
                && c.subscribe.is_empty()
                && c.unsubscribe.is_empty()
                && p.proxies.is_none();
            assert_eq!(p.is_empty(), empty, "{}", c.name);
        }
    }
}

#[cfg(test)]
mod indicator_tests {
    use super::*;
    use crate::tasks::PairSpec;
    use qs_core::indicators::Spec;

    fn state(indicators: &[&str]) -> State {
        let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        let mut tasks = BTreeMap::new();
        tasks.insert(
            TaskKey::Pair(pair.clone()),
            TaskSpec::Pair(PairSpec {
                backfill_from: 0,
                stream: true,
            }),
        );
        for i in indicators {
            tasks.insert(
                TaskKey::Indicator(pair.clone(), Spec::parse(i).unwrap()),
                TaskSpec::Indicator,
            );
        }
        State {
            tasks,
            streams: BTreeSet::from([pair]),
            proxies: None,
        }
    }

    fn names(keys: &[TaskKey]) -> Vec<String> {
        keys.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn indicators_start_and_stop_alone() {
        // (name, desired, running, added, removed)
        type Case<'a> = (
            &'a str,
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            ("unchanged", &["rsi(14)"], &["rsi(14)"], &[], &[]),
            (
                "declared",
                &["rsi(14)", "macd(12,26,9)"],
                &["rsi(14)"],
                &["macd(12,26,9)"],
                &[],
            ),
            (
                "removed",
                &["rsi(14)"],
                &["rsi(14)", "sma(5)"],
                &[],
                &["sma(5)"],
            ),
            (
                "replaced",
                &["sma(6)"],
                &["sma(5)"],
                &["sma(6)"],
                &["sma(5)"],
            ),
        ];
        for (name, want, running, added, removed) in cases {
            let p = plan(&state(want), &state(running));
            let label = |specs: &[&str]| -> Vec<String> {
                specs
                    .iter()
                    .map(|s| format!("indicator {s} of um:BTCUSDT:1m"))
                    .collect()
            };
            let add: Vec<TaskKey> = p.add.iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(names(&add), label(added), "{name}");
            assert_eq!(names(&p.remove), label(removed), "{name}");
            assert!(p.change.is_empty(), "{name}: the pair task is untouched");
            assert!(!p.streams_changed(), "{name}");
        }
    }
}
