//! `desired()`: turns the raw `trading_pairs` rows into the set of pairs the daemon should run,
//! plus the rows it must refuse (with why). Pure: no I/O, tested with tables of cases.

use std::collections::BTreeMap;

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

/// The desired state from the latest row per key (the caller reads them with `FINAL`).
pub fn desired(rows: &[PairRow]) -> Desired {
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
            let state = desired(&rows).state(None);
            assert_eq!(state.tasks.len(), want.len(), "{name}");
            let streamed: Vec<&PairKey> = want
                .iter()
                .filter(|(_, s)| s.stream)
                .map(|(k, _)| k)
                .collect();
            assert_eq!(state.streams.iter().collect::<Vec<_>>(), streamed, "{name}");
            let d = desired(&rows);
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
