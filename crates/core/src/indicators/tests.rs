//! Unit tests: spec parsing table, hand-computed SMA/EMA, update == batch, checkpoint round
//! trips. The TA-Lib comparison lives in crates/core/tests/indicators_golden.rs.

use super::*;

fn spec(s: &str) -> Spec {
    Spec::parse(s).unwrap()
}

/// A deterministic pseudo-random OHLCV series (xorshift), with some flat and zero-volume bars.
pub(crate) fn series(n: usize, seed: u64) -> Vec<Bar> {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut price = 100.0;
    (0..n)
        .map(|i| {
            let open = price;
            if i % 37 < 3 {
                // a flat, volumeless stretch
                return Bar {
                    open,
                    high: open,
                    low: open,
                    close: open,
                    volume: 0.0,
                    quote_volume: 0.0,
                };
            }
            price *= 1.0 + (rnd() - 0.5) * 0.02;
            let close = price;
            let high = open.max(close) * (1.0 + rnd() * 0.005);
            let low = open.min(close) * (1.0 - rnd() * 0.005);
            let volume = rnd() * 1000.0;
            Bar {
                open,
                high,
                low,
                close,
                volume,
                quote_volume: volume * (high + low) / 2.0,
            }
        })
        .collect()
}

/// Beyond the standard set: the smallest periods and other edges.
const MORE: &[&str] = &[
    "sma(2)",
    "ema(2)",
    "atr(1)",
    "stoch(1,1,1)",
    "stoch(5,3,4)",
    "macd(2,3,1)",
    "bbands(5,1.5,0.5)",
    "vwap(1)",
    "donchian(1)",
    "adx(2)",
    "mfi(2)",
];

#[test]
fn specs_normalise() {
    let cases = [
        ("MACD(12, 26, 9)", "macd(12,26,9)"),
        (" rsi( 14 ) ", "rsi(14)"),
        ("obv", "obv"),
        ("OBV()", "obv"),
        ("bbands(20,2,2)", "bbands(20,2,2)"),
        ("bbands(20, 2.0, 2.50)", "bbands(20,2,2.5)"),
        ("bbands(20,0.1,-0)", "bbands(20,0.1,0)"),
        ("Stoch(14,3,3)", "stoch(14,3,3)"),
        ("donchian(20)", "donchian(20)"),
        ("vwap(1)", "vwap(1)"),
        ("atr(1)", "atr(1)"),
        ("macd(2,3,1)", "macd(2,3,1)"),
    ];
    for (input, want) in cases {
        let s = spec(input);
        assert_eq!(s.to_string(), want, "{input}");
        assert_eq!(spec(want), s, "round trip of {want}");
        assert_eq!(want.parse::<Spec>().unwrap(), s);
    }
}

#[test]
fn bad_specs_name_the_rule() {
    let cases = [
        ("rsi(0)", "period must be from 2 to 100000, got 0"),
        ("rsi(1)", "period must be from 2 to 100000"),
        ("sma(100001)", "period must be from 2 to 100000"),
        (
            "macd(26,12,9)",
            "fast period (26) must be less than the slow period (12)",
        ),
        ("macd(12,12,9)", "must be less than"),
        ("foo(3)", "unknown indicator \"foo\""),
        ("rsi(14,2)", "rsi takes 1 parameter(s) (period), got 2"),
        ("rsi", "rsi takes 1 parameter(s)"),
        (
            "macd(12,26)",
            "macd takes 3 parameter(s) (fast, slow, signal), got 2",
        ),
        ("obv(3)", "obv takes 0 parameter(s)"),
        ("rsi(14.5)", "period must be an integer, got \"14.5\""),
        ("rsi(-3)", "period must be an integer"),
        ("rsi(x)", "period must be an integer"),
        ("bbands(20,2)", "bbands takes 3 parameter(s)"),
        ("bbands(20.0,2,2)", "period must be an integer"),
        ("bbands(20,two,2)", "up must be a finite number"),
        ("bbands(20,inf,2)", "up must be a finite number"),
        ("bbands(20,2,1e38)", "down must be from"),
        ("stoch(0,3,3)", "fastk must be from 1 to 100000"),
        ("donchian(0)", "period must be from 1"),
        ("rsi(14", "ending with ')'"),
        ("rsi(1(4))", "nested parentheses"),
        ("", "empty indicator spec"),
    ];
    for (input, want) in cases {
        let err = Spec::parse(input).unwrap_err().to_string();
        assert!(err.contains(want), "{input}: {err:?} lacks {want:?}");
    }
}

#[test]
fn lists_split_outside_parentheses_and_dedupe() {
    let l = parse_list("rsi(14),macd(12,26,9), RSI(14) ,ema(3)").unwrap();
    let names: Vec<String> = l.iter().map(|s| s.to_string()).collect();
    assert_eq!(names, ["rsi(14)", "macd(12,26,9)", "ema(3)"]);
    assert!(parse_list("").unwrap().is_empty());
    assert!(parse_list("  ").unwrap().is_empty());
    assert!(parse_list("rsi(14),foo(3)").is_err());
    let (good, bad) = parse_list_lenient("rsi(14),foo(3),rsi(0),sma(5)");
    assert_eq!(good, vec![spec("rsi(14)"), spec("sma(5)")]);
    assert_eq!(bad.len(), 2);
}

#[test]
fn outputs_and_lookbacks() {
    let cases: &[(&str, &[&str], usize)] = &[
        ("sma(20)", &["value"], 19),
        ("ema(20)", &["value"], 19),
        ("wma(20)", &["value"], 19),
        ("rsi(14)", &["value"], 14),
        ("macd(12,26,9)", &["macd", "signal", "hist"], 33),
        ("bbands(20,2,2)", &["upper", "middle", "lower"], 19),
        ("atr(14)", &["value"], 14),
        ("stoch(14,3,3)", &["k", "d"], 17),
        ("obv", &["value"], 0),
        ("cci(20)", &["value"], 19),
        ("adx(14)", &["value"], 27),
        ("mfi(14)", &["value"], 14),
        ("willr(14)", &["value"], 13),
        ("vwap(20)", &["value"], 19),
        ("donchian(20)", &["upper", "lower"], 19),
    ];
    for (s, outs, lb) in cases {
        let sp = spec(s);
        assert_eq!(sp.outputs(), *outs, "{s}");
        assert_eq!(sp.lookback(), *lb, "{s}");
    }
}

#[test]
fn sma_and_ema_by_hand() {
    let closes = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let bars: Vec<Bar> = closes.iter().map(|&c| Bar::from_close(c)).collect();
    let sma = batch(&spec("sma(3)"), &bars);
    assert!(sma[0][0].is_nan() && sma[0][1].is_nan());
    assert_eq!(&sma[0][2..], &[2.0, 3.0, 4.0, 5.0]);
    let ema = batch(&spec("ema(3)"), &bars);
    assert!(ema[0][1].is_nan());
    // Seed = mean(1,2,3) = 2, k = 0.5: 3, 4, 5.
    assert_eq!(&ema[0][2..], &[2.0, 3.0, 4.0, 5.0]);
    let ema = batch(&spec("ema(2)"), &[1.0, 3.0, 6.0].map(Bar::from_close));
    // Seed = 2 at index 1, k = 2/3: (6 − 2)·2/3 + 2.
    assert_eq!(ema[0][1], 2.0);
    assert_eq!(ema[0][2], (6.0 - 2.0) * (2.0 / 3.0) + 2.0);
}

#[test]
fn warm_up_is_the_lookback_and_update_equals_batch_bit_for_bit() {
    // batch_closes runs separate slice kernels: this is also their proof of equality.
    let bars = series(3000, 7);
    for s in STANDARD_SET.iter().chain(MORE) {
        let sp = spec(s);
        let cols = batch(&sp, &bars);
        let k = sp.outputs().len();
        assert_eq!(cols.len(), k);
        let mut ind = Indicator::new(&sp);
        let mut out = [0.0; 3];
        for (i, b) in bars.iter().enumerate() {
            let ok = ind.update(b, &mut out[..k]);
            assert_eq!(ok, i >= sp.lookback(), "{s} at {i}");
            for j in 0..k {
                assert_eq!(
                    out[j].to_bits(),
                    cols[j][i].to_bits(),
                    "{s} output {j} at {i}"
                );
                assert_eq!(out[j].is_nan(), !ok, "{s} at {i}");
            }
        }
        assert_eq!(ind.bars_seen(), bars.len() as u64);
        if let Some(cc) = batch_closes(&sp, &bars.iter().map(|b| b.close).collect::<Vec<_>>()) {
            for j in 0..k {
                for i in 0..bars.len() {
                    assert_eq!(
                        cc[j][i].to_bits(),
                        cols[j][i].to_bits(),
                        "{s} closes {j} {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn checkpoint_restore_continues_identically() {
    let bars = series(600, 11);
    for s in STANDARD_SET.iter().chain(MORE) {
        let sp = spec(s);
        let full = batch(&sp, &bars);
        let k = sp.outputs().len();
        for cut in [0usize, 1, 5, sp.lookback(), sp.lookback() + 1, 333] {
            let mut ind = Indicator::new(&sp);
            let mut out = [0.0; 3];
            for b in &bars[..cut] {
                ind.update(b, &mut out[..k]);
            }
            let cp = ind.checkpoint();
            let mut back = Indicator::restore(&sp, &cp).unwrap();
            assert_eq!(back.bars_seen(), cut as u64);
            assert_eq!(back.checkpoint(), cp);
            for (i, b) in bars.iter().enumerate().skip(cut) {
                back.update(b, &mut out[..k]);
                for j in 0..k {
                    assert_eq!(
                        out[j].to_bits(),
                        full[j][i].to_bits(),
                        "{s} cut {cut} at {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_checkpoints_are_refused() {
    let sp = spec("sma(3)");
    let mut ind = Indicator::new(&sp);
    let mut out = [0.0];
    ind.update(&Bar::from_close(1.0), &mut out);
    let cp = ind.checkpoint();
    assert!(matches!(
        Indicator::restore(&spec("sma(4)"), &cp),
        Err(CheckpointError::SpecMismatch { .. })
    ));
    assert!(Indicator::restore(&sp, &cp[..cp.len() - 1]).is_err());
    assert!(Indicator::restore(&sp, &format!("{cp}00")).is_err());
    assert!(Indicator::restore(&sp, "v2|sma(3)|").is_err());
    assert!(Indicator::restore(&sp, &cp.replace("v1|sma(3)|", "v1|sma(3)|zz")).is_err());
    // A ring index beyond the window is refused, not trusted.
    let words = &cp["v1|sma(3)|".len()..];
    let bad = format!(
        "v1|sma(3)|{}{}{:016x}{}",
        &words[..16],
        &words[16..32],
        9,
        &words[48..]
    );
    assert!(Indicator::restore(&sp, &bad).is_err());
}

#[test]
fn from_kline_converts_exactly() {
    use crate::market::Decimal;
    for s in [
        "42314.0",
        "0.00000001",
        "359196345.08716",
        "123456789012.12345678",
        "0",
    ] {
        let d: Decimal = s.parse().unwrap();
        assert_eq!(super::dec_to_f64(d), s.parse::<f64>().unwrap(), "{s}");
    }
}

/// The slice kernels behind `batch_closes` against `update`, on every value: random, flat,
/// near-flat (BBANDS' reseed and variance floor), outliers leaving the window, tiny prices, and
/// every length around the warm-up.
#[test]
fn batch_closes_equals_update_bit_for_bit() {
    let mut series: Vec<Vec<f64>> = vec![
        series(5000, 3).iter().map(|b| b.close).collect(),
        vec![100.0; 300],
        (0..400)
            .map(|i| 1.0 + if i % 2 == 0 { 1e-9 } else { -1e-9 })
            .collect(),
        (0..400)
            .map(|i| {
                if i % 97 == 50 {
                    1e9
                } else {
                    40_000.0 + (i % 7) as f64
                }
            })
            .collect(),
        series(800, 5).iter().map(|b| b.close * 1e-10).collect(),
    ];
    let base = series[0].clone();
    for len in 0..45 {
        series.push(base[..len].to_vec());
    }
    let specs = [
        "sma(20)",
        "sma(2)",
        "ema(20)",
        "ema(2)",
        "wma(20)",
        "rsi(14)",
        "rsi(2)",
        "macd(12,26,9)",
        "macd(2,3,1)",
        "macd(5,13,4)",
        "bbands(20,2,2)",
        "bbands(2,1,3)",
        "bbands(5,1.5,0.5)",
    ];
    for s in specs {
        let sp = spec(s);
        let k = sp.outputs().len();
        for (si, xs) in series.iter().enumerate() {
            let cols = batch_closes(&sp, xs).unwrap();
            assert_eq!(cols.len(), k);
            let mut ind = Indicator::new(&sp);
            let mut out = [0.0; 3];
            for (i, &x) in xs.iter().enumerate() {
                ind.update(&Bar::from_close(x), &mut out[..k]);
                for j in 0..k {
                    assert_eq!(cols[j].len(), xs.len());
                    assert_eq!(
                        out[j].to_bits(),
                        cols[j][i].to_bits(),
                        "{s} series {si} output {j} at {i}: {} vs {}",
                        out[j],
                        cols[j][i]
                    );
                }
            }
        }
    }
    assert!(batch_closes(&spec("atr(14)"), &base).is_none());
}
