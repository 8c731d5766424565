//! `desired()`: turns the raw `trading_pairs` rows (and `app.indicators.default`) into the set
//! of pairs and pair indicators the daemon should run, plus the rows and indicator specs it must
//! refuse (with why). Pure: no I/O, tested with tables of cases.

use std::collections::{BTreeMap, BTreeSet};

use qs_core::indicators::{parse_list_lenient, Spec};

use super::plan::State;
use crate::market::PairKey;
use crate::store::state::{PairRow, ProxyRow};
pub use crate::tasks::pair::PairSpec;
use crate::tasks::{TaskKey, TaskSpec};

/// A row that cannot be run, kept so it can be reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRow {
    pub market: String,
    pub symbol: String,
    pub period: String,
    pub error: String,
}

/// The desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub pairs: BTreeMap<PairKey, PairSpec>,
    /// Disabled rows (reported as `disabled`).
    pub disabled: Vec<PairKey>,
    pub invalid: Vec<InvalidRow>,
    /// The indicators of the enabled pairs: the row's list, or the default when it is empty.
    pub indicators: BTreeSet<(PairKey, Spec)>,
    /// Bad specs of enabled pairs (the pair's good ones still run), with why.
    pub bad_indicators: Vec<(PairKey, String)>,
}

impl Desired {
    /// Everything the daemon should run for these pairs, with the `proxy_config` rows (`None`:
    /// unreadable, leave the pool as it is), as the one state `plan()` diffs.
    pub fn state(&self, proxies: Option<Vec<ProxyRow>>) -> State {
        State {
            tasks: self
                .pairs
                .iter()
                .map(|(k, s)| (TaskKey::Pair(k.clone()), TaskSpec::Pair(*s)))
                .chain(self.indicators.iter().map(|(k, spec)| {
                    (
                        TaskKey::Indicator(k.clone(), spec.clone()),
                        TaskSpec::Indicator,
                    )
                }))
                .collect(),
            streams: self
                .pairs
                .iter()
                .filter(|(_, s)| s.stream)
                .map(|(k, _)| k.clone())
                .collect(),
            proxies,
        }
    }
}

/// The desired state from the latest row per key (the caller reads them with `FINAL`);
/// `default_indicators` (`app.indicators.default`, already validated) apply to the pairs whose
/// `indicators` is empty.
pub fn desired(rows: &[PairRow], default_indicators: &[Spec]) -> Desired {
    let mut d = Desired::default();
    for r in rows {
        let invalid = |error: String| InvalidRow {
            market: r.market.clone(),
            symbol: r.symbol.clone(),
            period: r.period.clone(),
            error,
        };
        let key = match PairKey::parse(r.market.trim(), r.symbol.trim(), r.period.trim()) {
            Ok(k) => k,
            Err(e) => {
                d.invalid.push(invalid(e.to_string()));
                continue;
            }
        };
        if r.backfill_from < 0 {
            d.invalid.push(invalid(format!(
                "backfill_from must be 0 (from the listing) or a Unix time in ms, got {}",
                r.backfill_from
            )));
            continue;
        }
        if r.enabled == 0 {
            d.disabled.push(key);
            continue;
        }
        if r.indicators.trim().is_empty() {
            for spec in default_indicators {
                d.indicators.insert((key.clone(), spec.clone()));
            }
        } else {
            let (good, bad) = parse_list_lenient(&r.indicators);
            for spec in good {
                d.indicators.insert((key.clone(), spec));
            }
            for e in bad {
                d.bad_indicators.push((key.clone(), e.to_string()));
            }
        }
        d.pairs.insert(
            key,
            PairSpec {
                backfill_from: r.backfill_from,
                stream: r.stream != 0,
            },
        );
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(m: &str, s: &str, p: &str, enabled: u8, from: i64, stream: u8) -> PairRow {
        PairRow {
            market: m.into(),
            symbol: s.into(),
            period: p.into(),
            enabled,
            backfill_from: from,
            stream,
            indicators: String::new(),
        }
    }

    #[test]
    fn rows_become_pairs_disabled_or_invalid() {
        let key = |m, s, p| PairKey::parse(m, s, p).unwrap();
        type Case = (
            &'static str,
            Vec<PairRow>,
            Vec<(PairKey, PairSpec)>,
            usize,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            ("empty", vec![], vec![], 0, vec![]),
            (
                "one enabled pair with defaults",
                vec![row("um", "BTCUSDT", "1m", 1, 0, 1)],
                vec![(
                    key("um", "BTCUSDT", "1m"),
                    PairSpec {
                        backfill_from: 0,
                        stream: true,
                    },
                )],
                0,
                vec![],
            ),
            (
                "disabled is not desired",
                vec![row("spot", "ETHUSDT", "1h", 0, 0, 1)],
                vec![],
                1,
                vec![],
            ),
            (
                "history only",
                vec![row("cm", "BTCUSD_PERP", "1d", 1, 1_600_000_000_000, 0)],
                vec![(
                    key("cm", "BTCUSD_PERP", "1d"),
                    PairSpec {
                        backfill_from: 1_600_000_000_000,
                        stream: false,
                    },
                )],
                0,
                vec![],
            ),
            (
                "bad rows are refused, the others kept",
                vec![
                    row("xx", "BTCUSDT", "1m", 1, 0, 1),
                    row("um", "btc-usdt", "1m", 1, 0, 1),
                    row("um", "BTCUSDT", "1s", 1, 0, 1),
                    row("um", "BTCUSDT", "7m", 1, 0, 1),
                    row("um", "BTCUSDT", "5m", 1, -5, 1),
                    row("spot", "BNBBTC", "1s", 1, 0, 1),
                ],
                vec![(
                    key("spot", "BNBBTC", "1s"),
                    PairSpec {
                        backfill_from: 0,
                        stream: true,
                    },
                )],
                0,
                vec![
                    "unknown market",
                    "invalid symbol",
                    "not offered",
                    "7m",
                    "backfill_from",
                ],
            ),
        ];
        for (name, rows, want, disabled, errors) in cases {
            let state = desired(&rows, &[]).state(None);
            assert_eq!(state.tasks.len(), want.len(), "{name}");
            let streamed: Vec<&PairKey> = want
                .iter()
                .filter(|(_, s)| s.stream)
                .map(|(k, _)| k)
                .collect();
            assert_eq!(state.streams.iter().collect::<Vec<_>>(), streamed, "{name}");
            let d = desired(&rows, &[]);
            let got: Vec<(PairKey, PairSpec)> = d.pairs.into_iter().collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(d.disabled.len(), disabled, "{name}");
            assert_eq!(d.invalid.len(), errors.len(), "{name}: {:?}", d.invalid);
            for (inv, want) in d.invalid.iter().zip(errors) {
                assert!(
                    inv.error.contains(want),
                    "{name}: {:?} lacks {want}",
                    inv.error
                );
            }
        }
    }
}

#[cfg(test)]
mod indicator_tests {
    use super::*;

    fn row(s: &str, enabled: u8, indicators: &str) -> PairRow {
        PairRow {
            market: "um".into(),
            symbol: s.into(),
            period: "1m".into(),
            enabled,
            backfill_from: 0,
            stream: 1,
            indicators: indicators.into(),
        }
    }

    fn spec(s: &str) -> Spec {
        Spec::parse(s).unwrap()
    }

    #[test]
    fn indicators_come_from_the_row_or_the_default_and_bad_specs_block_nothing_else() {
        let default = [spec("rsi(14)")];
        // (name, rows, expected (symbol, spec) tasks, bad (symbol, error fragment))
        type Case = (
            &'static str,
            Vec<PairRow>,
            Vec<(&'static str, &'static str)>,
            Vec<(&'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            ("no row", vec![], vec![], vec![]),
            (
                "empty list takes the default",
                vec![row("BTCUSDT", 1, "")],
                vec![("BTCUSDT", "rsi(14)")],
                vec![],
            ),
            (
                "a declared list replaces the default, normalised and deduplicated",
                vec![row("BTCUSDT", 1, "MACD(12, 26, 9), sma(20),macd(12,26,9)")],
                vec![("BTCUSDT", "macd(12,26,9)"), ("BTCUSDT", "sma(20)")],
                vec![],
            ),
            (
                "a bad spec is reported and the good ones of the pair still run",
                vec![
                    row("BTCUSDT", 1, "rsi(0),ema(10),foo(3)"),
                    row("ETHUSDT", 1, "sma(5)"),
                ],
                vec![("BTCUSDT", "ema(10)"), ("ETHUSDT", "sma(5)")],
                vec![("BTCUSDT", "rsi"), ("BTCUSDT", "foo")],
            ),
            (
                "a disabled pair computes nothing",
                vec![row("BTCUSDT", 0, "sma(5)"), row("ETHUSDT", 0, "")],
                vec![],
                vec![],
            ),
        ];
        for (name, rows, want, bad) in cases {
            let d = desired(&rows, &default);
            let got: BTreeSet<(String, String)> = d
                .indicators
                .iter()
                .map(|(k, s)| (k.symbol.to_string(), s.to_string()))
                .collect();
            let want: BTreeSet<(String, String)> = want
                .iter()
                .map(|(s, i)| (s.to_string(), spec(i).to_string()))
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(
                d.bad_indicators.len(),
                bad.len(),
                "{name}: {:?}",
                d.bad_indicators
            );
            for ((k, e), (s, frag)) in d.bad_indicators.iter().zip(&bad) {
                assert_eq!(k.symbol.as_str(), *s, "{name}");
                assert!(e.contains(frag), "{name}: {e:?} lacks {frag}");
            }
            // Every indicator is a task of its own next to its pair's.
            let state = d.state(None);
            let tasks: Vec<&TaskKey> = state
                .tasks
                .keys()
                .filter(|k| matches!(k, TaskKey::Indicator(..)))
                .collect();
            assert_eq!(tasks.len(), want.len(), "{name}");
            assert_eq!(state.tasks.len(), d.pairs.len() + want.len(), "{name}");
        }
    }
}
