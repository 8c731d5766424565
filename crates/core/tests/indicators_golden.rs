//! Every output of every indicator against TA-Lib 0.8.1 (golden files written by
//! scripts/indicator-golden.py into tests/data/indicators/): the same warm-up (NaN exactly
//! where TA-Lib has none) and every value within a relative 1e-9.
//!
//! Tolerance: |ours − theirs| ≤ 1e-9 · max(|theirs|, FLOOR · scale), where `scale` is the
//! largest |value| of that output over the series. The floor only matters where an output
//! passes through zero (MACD's hist, CCI, OBV): there the value is the difference of two nearly
//! equal terms and a pure relative test would measure rounding noise, so values smaller than
//! FLOOR of the output's own scale are held to 1e-9 of that floor instead.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::io::Read;
use std::path::PathBuf;

use qs_core::indicators::{batch, Bar, Indicator, Spec};

const REL: f64 = 1e-9;
const FLOOR: f64 = 1e-6;

struct Column {
    spec: Spec,
    output: usize,
    name: String,
    values: Vec<f64>,
}

struct Golden {
    bars: Vec<Bar>,
    cols: Vec<Column>,
}

fn load(name: &str) -> Golden {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "tests",
        "data",
        "indicators",
        &format!("{name}.csv.gz"),
    ]
    .iter()
    .collect();
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    let mut lines = text.lines();
    // Column names contain commas inside parentheses: re-join those parts.
    let mut names: Vec<String> = Vec::new();
    let mut depth = 0i32;
    for part in lines.next().unwrap().split(',') {
        if depth > 0 {
            let last = names.last_mut().unwrap();
            last.push(',');
            last.push_str(part);
        } else {
            names.push(part.to_string());
        }
        depth += part.matches('(').count() as i32 - part.matches(')').count() as i32;
    }
    assert_eq!(
        &names[..6],
        ["open", "high", "low", "close", "volume", "quote_volume"]
    );
    let mut cols: Vec<Column> = names[6..]
        .iter()
        .map(|n| {
            let (spec_text, output) = match n.rsplit_once('.') {
                Some((s, o)) if s.ends_with(')') => (s, Some(o)),
                _ => (n.as_str(), None),
            };
            let spec = Spec::parse(spec_text).unwrap();
            assert_eq!(spec.to_string(), spec_text, "golden names are normalised");
            let output = match output {
                Some(o) => spec.outputs().iter().position(|x| *x == o).unwrap(),
                None => {
                    assert_eq!(spec.outputs().len(), 1, "{n}");
                    0
                }
            };
            Column {
                spec,
                output,
                name: n.clone(),
                values: Vec::new(),
            }
        })
        .collect();
    let mut bars = Vec::new();
    for line in lines {
        // Values contain no commas, so a plain split lines up with the re-joined header.
        let f: Vec<f64> = line
            .split(',')
            .map(|c| {
                if c.is_empty() {
                    f64::NAN
                } else {
                    c.parse().unwrap()
                }
            })
            .collect();
        assert_eq!(f.len(), names.len());
        bars.push(Bar {
            open: f[0],
            high: f[1],
            low: f[2],
            close: f[3],
            volume: f[4],
            quote_volume: f[5],
        });
        for (i, c) in cols.iter_mut().enumerate() {
            c.values.push(f[6 + i]);
        }
    }
    Golden { bars, cols }
}

/// Compares every column of one golden file; returns the worst scaled error seen.
fn check(name: &str) -> f64 {
    let g = load(name);
    assert!(!g.bars.is_empty());
    let mut worst: f64 = 0.0;
    let mut failures = Vec::new();
    for c in &g.cols {
        let got = &batch(&c.spec, &g.bars)[c.output];
        let want = &c.values;
        let scale = want
            .iter()
            .filter(|x| !x.is_nan())
            .fold(0.0f64, |m, x| m.max(x.abs()));
        let first = want.iter().position(|x| !x.is_nan()).unwrap_or(want.len());
        assert_eq!(
            first,
            c.spec.lookback().min(want.len()),
            "{name} {}: TA-Lib's warm-up differs from lookback()",
            c.name
        );
        for (i, (&o, &t)) in got.iter().zip(want).enumerate() {
            if t.is_nan() || o.is_nan() {
                if t.is_nan() != o.is_nan() {
                    failures.push(format!("{name} {}[{i}]: ours {o}, TA-Lib {t}", c.name));
                }
                continue;
            }
            let diff = (o - t).abs();
            let err = if diff == 0.0 {
                0.0
            } else {
                diff / t.abs().max(FLOOR * scale)
            };
            worst = worst.max(err);
            if err > REL {
                failures.push(format!(
                    "{name} {}[{i}]: ours {o:e}, TA-Lib {t:e}, err {err:e}",
                    c.name
                ));
            }
        }
    }
    let mut columns: Vec<&str> = failures
        .iter()
        .map(|f| f.split('[').next().unwrap_or(""))
        .collect();
    columns.dedup();
    let shown: Vec<&String> = failures.iter().take(12).collect();
    assert!(
        failures.is_empty(),
        "{} mismatches in {columns:?}, first: {shown:#?}",
        failures.len()
    );
    worst
}

#[test]
fn synthetic_random_walk_matches_talib() {
    eprintln!("synthetic: worst error {:e}", check("synthetic"));
}

#[test]
fn flat_series_matches_talib() {
    check("flat");
}

#[test]
fn tiny_prices_match_talib() {
    eprintln!("tiny: worst error {:e}", check("tiny"));
}

#[test]
fn zero_volume_bars_match_talib() {
    eprintln!("zero_volume: worst error {:e}", check("zero_volume"));
}

#[test]
fn near_flat_windows_match_talib() {
    eprintln!("near_flat: worst error {:e}", check("near_flat"));
}

#[test]
fn real_binance_series_match_talib() {
    for s in ["btcusdt_um_1h", "ethusdt_um_1h", "btcusdt_spot_1h_2022_01"] {
        eprintln!("{s}: worst error {:e}", check(s));
    }
}

/// The online path on a real series: `update` bar by bar, with a checkpoint → restore every
/// 500 bars, equals the batch values bit for bit (which the tests above hold to TA-Lib).
#[test]
fn online_with_restores_equals_batch_on_real_data() {
    let g = load("btcusdt_um_1h");
    for c in &g.cols {
        let want = &batch(&c.spec, &g.bars)[c.output];
        let mut ind = Indicator::new(&c.spec);
        let mut out = [0.0; 3];
        let k = c.spec.outputs().len();
        for (i, b) in g.bars.iter().enumerate() {
            if i % 500 == 0 {
                ind = Indicator::restore(&c.spec, &ind.checkpoint()).unwrap();
            }
            ind.update(b, &mut out[..k]);
            assert_eq!(
                out[c.output].to_bits(),
                want[i].to_bits(),
                "{}[{i}]",
                c.name
            );
        }
    }
}
