//! `plan()`: what to start, restart and stop to get from the running pair tasks to the desired
//! ones. Pure and level-triggered: it looks only at the two states, never at what happened.

use std::collections::BTreeMap;

use super::desired::PairSpec;
use crate::market::PairKey;

/// The difference between desired and running pair tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<(PairKey, PairSpec)>,
    /// Running with another spec: stopped, then started with the new one.
    pub change: Vec<(PairKey, PairSpec)>,
    pub remove: Vec<PairKey>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.change.is_empty() && self.remove.is_empty()
    }
}

pub fn plan(desired: &BTreeMap<PairKey, PairSpec>, running: &BTreeMap<PairKey, PairSpec>) -> Plan {
    let mut p = Plan::default();
    for (k, spec) in desired {
        match running.get(k) {
            None => p.add.push((k.clone(), *spec)),
            Some(r) if r != spec => p.change.push((k.clone(), *spec)),
            Some(_) => {}
        }
    }
    for k in running.keys() {
        if !desired.contains_key(k) {
            p.remove.push(k.clone());
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_from_tables() {
        let k = |s: &str| PairKey::parse("um", s, "1m").unwrap();
        let spec = |from: i64, stream: bool| PairSpec {
            backfill_from: from,
            stream,
        };
        type Case = (
            &'static str,
            Vec<(&'static str, PairSpec)>,
            Vec<(&'static str, PairSpec)>,
            Vec<&'static str>,
            Vec<&'static str>,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            ("nothing", vec![], vec![], vec![], vec![], vec![]),
            (
                "start one",
                vec![("BTCUSDT", spec(0, true))],
                vec![],
                vec!["BTCUSDT"],
                vec![],
                vec![],
            ),
            (
                "steady",
                vec![("BTCUSDT", spec(0, true))],
                vec![("BTCUSDT", spec(0, true))],
                vec![],
                vec![],
                vec![],
            ),
            (
                "stop one",
                vec![],
                vec![("BTCUSDT", spec(0, true))],
                vec![],
                vec![],
                vec!["BTCUSDT"],
            ),
            (
                "spec changed",
                vec![("BTCUSDT", spec(5, true)), ("ETHUSDT", spec(0, false))],
                vec![("BTCUSDT", spec(0, true)), ("ETHUSDT", spec(0, true))],
                vec![],
                vec!["BTCUSDT", "ETHUSDT"],
                vec![],
            ),
            (
                "mixed",
                vec![("ADAUSDT", spec(0, true)), ("BTCUSDT", spec(0, true))],
                vec![("BTCUSDT", spec(0, true)), ("XRPUSDT", spec(0, true))],
                vec!["ADAUSDT"],
                vec![],
                vec!["XRPUSDT"],
            ),
        ];
        for (name, want, run, add, change, remove) in cases {
            let d: BTreeMap<_, _> = want.into_iter().map(|(s, p)| (k(s), p)).collect();
            let r: BTreeMap<_, _> = run.into_iter().map(|(s, p)| (k(s), p)).collect();
            let p = plan(&d, &r);
            let names = |v: Vec<PairKey>| {
                v.into_iter()
                    .map(|k| k.symbol.to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                names(p.add.iter().map(|(k, _)| k.clone()).collect()),
                add,
                "{name}"
            );
            assert_eq!(
                names(p.change.iter().map(|(k, _)| k.clone()).collect()),
                change,
                "{name}"
            );
            assert_eq!(names(p.remove.clone()), remove, "{name}");
            assert_eq!(
                p.is_empty(),
                add.is_empty() && change.is_empty() && remove.is_empty()
            );
        }
    }
}
