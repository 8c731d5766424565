use super::*;
use crate::backtest::{run, strategies, Fill, Options, Series};

fn entry(expr: &str) -> RuleSet {
    RuleSet {
        long_entry: Some(expr.to_string()),
        ..RuleSet::default()
    }
}

/// The expression's value (as `long_entry`) candle by candle.
fn eval(expr: &str, bars: &[Bar]) -> Vec<f64> {
    let mut s = compile(&entry(expr)).unwrap();
    let root = s.roots[0].unwrap();
    bars.iter()
        .map(|b| {
            s.step(b);
            s.values[root]
        })
        .collect()
}

fn eval1(expr: &str) -> f64 {
    eval(expr, &[Bar::from_close(1.0)])[0]
}

fn closes(xs: &[f64]) -> Vec<Bar> {
    xs.iter().map(|&x| Bar::from_close(x)).collect()
}

/// The column and message of the error compiling `expr` as `long_entry`.
fn err(expr: &str) -> (usize, String) {
    let e = compile(&entry(expr)).unwrap_err();
    assert_eq!(e.field, "long_entry");
    assert_eq!(e.expression, expr);
    (e.column, e.message)
}

fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

#[test]
fn parse_errors_have_exact_columns() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "cross_above(sma(close,10) sma(close,20))",
            27,
            "expected ',' or ')' after an argument of cross_above but found 'sma'",
        ),
        (
            "close > ",
            9,
            "expected a number, a name or '(' but found the end of the expression",
        ),
        (
            "rsi(0) < 30",
            1,
            r#""rsi(0)": period must be from 2 to 100000, got 0"#,
        ),
        (
            "close > 1 and macd(26,12,9).macd > 0",
            15,
            r#""macd(26,12,9)": the fast period (26) must be less than the slow period (12)"#,
        ),
        (
            "macd(12,26) > 0",
            1,
            r#""macd(12,26)": macd takes 3 parameter(s) (fast, slow, signal), got 2"#,
        ),
        (
            "macd(12,26,9) > 0",
            1,
            "macd(12,26,9) has several outputs: pick one with .macd, .signal or .hist",
        ),
        (
            "bbands(20,2,2).mid > close",
            16,
            r#"bbands(20,2,2) has no output "mid" (it has .upper, .middle or .lower)"#,
        ),
        (
            "close > 1 1",
            11,
            "unexpected '1' after a complete expression (a missing operator?)",
        ),
        (
            "(close > 1",
            11,
            "expected ')' to close the '(' at column 1 but found the end of the expression",
        ),
        ("", 1, "empty expression"),
        ("   ", 1, "empty expression"),
        (
            "cross_above(close)",
            1,
            "cross_above takes 2 arguments (a, b), got 1",
        ),
        ("prev(close) > 1", 1, "prev takes 2 arguments (x, k), got 1"),
        (
            "prev(close, 0) > 1",
            13,
            "prev's k must be a whole number from 1 to 100000, not 0",
        ),
        (
            "prev(close, 1.5) > 1",
            13,
            "prev's k must be a whole number from 1 to 100000, not 1.5",
        ),
        (
            "prev(close, -2) > 1",
            13,
            "prev's k must be a whole number from 1 to 100000, not -2",
        ),
        (
            "atr(close, 14) > 1",
            5,
            "atr reads the whole candle and takes no source: write atr(period)",
        ),
        (
            "sma(close, volume) > 1",
            12,
            "sma's parameters must be number literals: sma(period) or sma(source, period)",
        ),
        (
            "1 < close < 2",
            11,
            "comparisons do not chain: write a < b and b < c",
        ),
        ("close = 1", 7, "'=' is not an operator: compare with =="),
        ("close > 1 && 1", 11, "'&' is not an operator: use and"),
        ("sma > 1", 1, "sma needs its parameters: sma(period)"),
        (
            "close.value > 1",
            7,
            "the candle field close has no outputs",
        ),
        (
            "close > 1 and",
            14,
            "expected a number, a name or '(' but found the end of the expression",
        ),
        ("close > 1e999", 9, "the number 1e999 is out of range"),
        ("close # 1", 7, "unexpected character '#'"),
    ];
    for &(expr, col, msg) in cases {
        assert_eq!(err(expr), (col, msg.to_string()), "{expr}");
    }
    let (col, msg) = err("clse > 1");
    assert_eq!(col, 1);
    assert!(msg.starts_with(r#"unknown name "clse""#), "{msg}");
    let (col, msg) = err("close > foo(3)");
    assert_eq!(col, 9);
    assert!(
        msg.starts_with(r#"unknown function "foo" (functions: cross_above"#),
        "{msg}"
    );
}

#[test]
fn error_display_points_at_the_column() {
    let e = compile(&entry("cross_above(sma(close,10) sma(close,20))")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "long_entry, column 27: expected ',' or ')' after an argument of cross_above but found \
         'sma'\n  cross_above(sma(close,10) sma(close,20))\n                            ^"
    );
    let e = compile(&RuleSet {
        short_entry: Some("close < 1".into()),
        stop_loss_pct: Some(150.0),
        ..RuleSet::default()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "stop_loss_pct: must be a percent above 0 and below 100 (5 = 5 %), not 150"
    );
    // The field is named; the column counts characters.
    let e = compile(&RuleSet {
        short_entry: Some("close < 1".into()),
        short_exit: Some("«close» > 1".into()),
        ..RuleSet::default()
    })
    .unwrap_err();
    assert_eq!((e.field.as_str(), e.column), ("short_exit", 1));
}

#[test]
fn limits_refuse_what_would_exhaust_the_stack() {
    let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
    let (col, msg) = err(&deep);
    assert_eq!(col, 65);
    assert!(msg.contains("nested too deeply"), "{msg}");
    let (_, msg) = err(&format!("1{}", "+1".repeat(600)));
    assert!(msg.contains("too long"), "{msg}");
    // A long chain within the limit compiles and evaluates.
    assert_eq!(eval1(&format!("1{}", "+1".repeat(499))), 500.0);
    assert_eq!(eval1(&format!("{}1", "-".repeat(64))), 1.0);
}

#[test]
fn rule_set_validation() {
    let e = compile(&RuleSet::default()).unwrap_err();
    assert_eq!((e.field.as_str(), e.column), ("long_entry", 0));
    assert!(e
        .message
        .contains("at least one of long_entry and short_entry"));
    let with = |f: fn(&mut RuleSet)| {
        let mut r = entry("close > 1");
        f(&mut r);
        compile(&r).map(|s| s.stops()).map_err(|e| e.field)
    };
    assert_eq!(
        with(|r| r.stop_loss_pct = Some(0.0)),
        Err("stop_loss_pct".into())
    );
    assert_eq!(
        with(|r| r.stop_loss_pct = Some(100.0)),
        Err("stop_loss_pct".into())
    );
    assert_eq!(
        with(|r| r.stop_loss_pct = Some(f64::NAN)),
        Err("stop_loss_pct".into())
    );
    assert_eq!(
        with(|r| r.take_profit_pct = Some(-1.0)),
        Err("take_profit_pct".into())
    );
    assert_eq!(
        with(|r| r.short_exit = Some("close > 1".into())),
        Err("short_exit".into())
    );
    assert_eq!(
        with(|r| {
            r.stop_loss_pct = Some(2.0);
            r.take_profit_pct = Some(5.0);
        }),
        Ok((Some(0.02), Some(0.05)))
    );
    // A bad exit is reported under its own name.
    let mut r = entry("close > 1");
    r.long_exit = Some("close <".into());
    let e = compile(&r).unwrap_err();
    assert_eq!((e.field.as_str(), e.column), ("long_exit", 8));
}

#[test]
fn precedence_and_associativity() {
    let cases: &[(&str, f64)] = &[
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("2 - 3 - 4", -5.0),
        ("8 / 4 / 2", 1.0),
        ("-2 * 3", -6.0),
        ("- -3", 3.0),
        ("-(1 + 2)", -3.0),
        ("2 * -3", -6.0),
        ("1 + 2 > 2", 1.0),
        ("1 > 2 == 0", 0.0), // not chained: a parse error below, so check via parentheses
        ("(1 > 2) == 0", 1.0),
        ("1 or 0 and 0", 1.0), // and binds tighter than or
        ("(1 or 0) and 0", 0.0),
        ("not 0 and 0", 0.0), // not binds tighter than and
        ("not (0 and 0)", 1.0),
        ("not 1 > 2", 1.0), // comparisons bind tighter than not
        ("not not 2", 1.0),
        ("1 + 2 > 2 and 0 or 1", 1.0),
        ("close * 2 >= close + close", 1.0),
        ("1e-3 * 1000", 1.0),
        (".5 + 1.5", 2.0),
        ("3 != 4", 1.0),
        ("3 <= 3 and 3 >= 3 and 3 == 3 and not 3 < 3", 1.0),
        ("NOT 0 AND Close == 1", 1.0),
    ];
    for &(expr, want) in cases {
        if expr == "1 > 2 == 0" {
            assert_eq!(err(expr).0, 7, "{expr}");
            continue;
        }
        assert_eq!(eval1(expr), want, "{expr}");
    }
}

#[test]
fn nan_semantics() {
    let nan = "(0/0)";
    for op in ["<", "<=", ">", ">=", "==", "!="] {
        assert_eq!(eval1(&format!("{nan} {op} 1")), 0.0, "{op}");
        assert_eq!(eval1(&format!("1 {op} {nan}")), 0.0, "{op}");
        assert_eq!(eval1(&format!("{nan} {op} {nan}")), 0.0, "{op}");
    }
    assert_eq!(eval1(&format!("not {nan}")), 1.0);
    assert_eq!(eval1(&format!("{nan} and 1")), 0.0);
    assert_eq!(eval1(&format!("{nan} or 1")), 1.0);
    assert_eq!(eval1(&format!("{nan} or 0")), 0.0);
    assert!(eval1(&format!("{nan} + 1")).is_nan());
    assert!(eval1(&format!("-{nan}")).is_nan());
    assert_eq!(eval1("1 / 0"), f64::INFINITY);
    // NaN never makes a rule hold: an indicator in its warm-up.
    let mut s = compile(&RuleSet {
        long_entry: Some("not (sma(3) > 0) or sma(3) != 5".into()),
        ..RuleSet::default()
    })
    .unwrap();
    let c = Candle {
        index: 0,
        time: 0,
        bar: Bar::from_close(5.0),
        values: &[],
        prev: &[],
        position: 0.0,
    };
    // not(NaN > 0) is true: `not` of a false comparison.
    assert_eq!(s.on_candle(&c), Action::Buy);
    let mut s = compile(&entry("sma(3) != 5")).unwrap();
    assert_eq!(s.on_candle(&c), Action::Hold);
}

#[test]
fn prev_looks_back_k_candles() {
    let bars = closes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let n = f64::NAN;
    assert!(same(
        &eval("prev(close, 2)", &bars),
        &[n, n, 1.0, 2.0, 3.0, 4.0]
    ));
    assert!(same(
        &eval("prev(close, 1)", &bars),
        &[n, 1.0, 2.0, 3.0, 4.0, 5.0]
    ));
    assert!(same(
        &eval("prev(prev(close, 1), 2) + 10", &bars),
        &[n, n, n, 11.0, 12.0, 13.0]
    ));
    assert!(same(
        &eval("close - prev(close, 3)", &bars),
        &[n, n, n, 3.0, 3.0, 3.0]
    ));
    assert!(same(&eval("prev(close, 6)", &bars), &[n; 6]));
    // Warm-up: k plus the argument's.
    let s = compile(&entry("prev(sma(close,3),2) > 0")).unwrap();
    assert_eq!(s.extra_warmup(), 4);
    let v = eval("prev(sma(close,3),2)", &bars);
    assert!(
        v[..4].iter().all(|x| x.is_nan()) && v[4] == 2.0 && v[5] == 3.0,
        "{v:?}"
    );
}

#[test]
fn cross_above_and_below() {
    let bars = closes(&[1.0, 3.0, 2.0, 2.0, 3.0, 1.0]);
    // close against 2: below, above, equal, equal, above, below.
    assert_eq!(
        eval("cross_above(close, 2)", &bars),
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(
        eval("cross_below(close, 2)", &bars),
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    );
    assert_eq!(
        eval("cross_below(close, prev(close, 1))", &bars),
        [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    );
}

#[test]
fn indicators_fed_from_their_sources() {
    let mut bars = Vec::new();
    let mut x = 100.0f64;
    for i in 0..60 {
        x += ((i * 7919) % 13) as f64 - 6.0;
        bars.push(Bar {
            open: x - 1.5 + (i % 3) as f64,
            high: x + 2.0,
            low: x - 2.5,
            close: x,
            volume: 10.0 + (i % 5) as f64,
            quote_volume: 0.0,
        });
    }
    // Feeds `spec` with `input` (skipping NaN) and reads output `k`.
    let direct = |spec: &str, input: &[Option<Bar>], k: usize| -> Vec<f64> {
        let spec = Spec::parse(spec).unwrap();
        let mut ind = Indicator::new(&spec);
        let mut out = vec![0.0; spec.outputs().len()];
        input
            .iter()
            .map(|b| match b {
                Some(b) => {
                    ind.update(b, &mut out);
                    out[k]
                }
                None => f64::NAN,
            })
            .collect()
    };
    let close: Vec<Option<Bar>> = bars
        .iter()
        .map(|b| Some(Bar::from_close(b.close)))
        .collect();
    let whole: Vec<Option<Bar>> = bars.iter().map(|b| Some(*b)).collect();
    let body: Vec<Option<Bar>> = bars
        .iter()
        .map(|b| Some(Bar::from_close(b.close - b.open)))
        .collect();
    let shifted: Vec<Option<Bar>> = std::iter::once(None)
        .chain(close[..bars.len() - 1].iter().cloned())
        .collect();
    let volume: Vec<Option<Bar>> = bars
        .iter()
        .map(|b| Some(Bar::from_close(b.volume)))
        .collect();
    let cases: Vec<(&str, Vec<f64>)> = vec![
        ("sma(10)", direct("sma(10)", &close, 0)),
        ("sma(close, 10).value", direct("sma(10)", &close, 0)),
        ("ema(close - open, 5)", direct("ema(5)", &body, 0)),
        ("sma(volume, 4)", direct("sma(4)", &volume, 0)),
        ("ema(prev(close, 1), 3)", direct("ema(3)", &shifted, 0)),
        ("macd(12,26,9).signal", direct("macd(12,26,9)", &close, 1)),
        ("MACD(5, 9, 3).Hist", direct("macd(5,9,3)", &close, 2)),
        ("bbands(20,2,2).upper", direct("bbands(20,2,2)", &close, 0)),
        (
            "bbands(close,20,1.5,2).lower",
            direct("bbands(20,1.5,2)", &close, 2),
        ),
        ("atr(14)", direct("atr(14)", &whole, 0)),
        ("stoch(14,3,3).k", direct("stoch(14,3,3)", &whole, 0)),
        ("obv", direct("obv", &whole, 0)),
        ("obv()", direct("obv", &whole, 0)),
        ("obv.value", direct("obv", &whole, 0)),
    ];
    for (expr, want) in cases {
        let got = eval(expr, &bars);
        assert!(same(&got, &want), "{expr}: {got:?} != {want:?}");
        assert!(got.iter().any(|x| !x.is_nan()), "{expr}");
    }
    // Warm-ups: the indicator's lookback plus its source's.
    let warm = |e: &str| compile(&entry(e)).unwrap().extra_warmup();
    assert_eq!(warm("sma(10) > 0"), 9);
    assert_eq!(warm("ema(prev(close, 1), 3) > 0"), 3);
    assert_eq!(warm("sma(sma(close,5),4) > 0"), 7);
    assert_eq!(warm("macd(12,26,9).signal > atr(14)"), 33);
    let mut r = entry("close > 0");
    r.long_exit = Some("atr(14) > 1".into());
    assert_eq!(compile(&r).unwrap().extra_warmup(), 14);
}

#[test]
fn a_nan_source_restarts_the_indicator() {
    let bars: Vec<Bar> = [
        (2.0, 1.0),
        (4.0, 1.0),
        (0.0, 0.0),
        (6.0, 1.0),
        (8.0, 1.0),
        (10.0, 1.0),
    ]
    .iter()
    .map(|&(c, v)| Bar {
        volume: v,
        ..Bar::from_close(c)
    })
    .collect();
    let n = f64::NAN;
    assert!(same(
        &eval("sma(close / volume, 2)", &bars),
        &[n, 3.0, n, n, 7.0, 9.0]
    ));
}

#[test]
fn action_per_candle() {
    let mut s = compile(&RuleSet {
        long_entry: Some("close > 10".into()),
        short_entry: Some("close < 5".into()),
        long_exit: Some("close < 8".into()),
        short_exit: Some("close > 6".into()),
        ..RuleSet::default()
    })
    .unwrap();
    use Action::*;
    let cases = [
        (12.0, 0.0, Buy),
        (12.0, -1.0, Buy),
        (12.0, 1.0, Hold),
        (4.0, 0.0, Sell),
        (4.0, 1.0, Sell),
        (4.0, -1.0, Hold),
        (7.0, 1.0, Close),
        (7.0, -1.0, Close),
        (7.0, 0.0, Hold),
        (9.0, 1.0, Hold),
        (9.0, -1.0, Close),
    ];
    for (i, &(close, position, want)) in cases.iter().enumerate() {
        let c = Candle {
            index: i,
            time: 0,
            bar: Bar::from_close(close),
            values: &[],
            prev: &[],
            position,
        };
        assert_eq!(s.on_candle(&c), want, "close {close}, position {position}");
    }
    assert!(s.indicators().is_empty());
}

/// A deterministic random walk (xorshift64*).
fn walk(n: usize, seed: u64) -> Series {
    let mut state = seed;
    let mut rand = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut s = Series::default();
    let mut close = 100.0;
    for i in 0..n {
        let open = close;
        close = open * (1.0 + 0.02 * (rand() - 0.5));
        let high = open.max(close) * (1.0 + 0.005 * rand());
        let low = open.min(close) * (1.0 - 0.005 * rand());
        let bar = Bar {
            open,
            high,
            low,
            close,
            volume: 1000.0 * rand(),
            quote_volume: 0.0,
        };
        s.push(i as i64 * 60_000, &bar);
    }
    s
}

#[test]
fn rules_trade_exactly_as_the_built_in_strategies() {
    let series = walk(3000, 0x9e37_79b9_7f4a_7c15);
    type Pair<'a> = (&'a str, &'a [(&'a str, f64)], &'a str, &'a str);
    let pairs: [Pair; 2] = [
        (
            "sma_cross",
            &[("fast", 10.0), ("slow", 20.0)],
            "cross_above(sma(close,10), sma(close,20))",
            "cross_below(sma(close,10), sma(close,20))",
        ),
        (
            "macd_cross",
            &[],
            "cross_above(macd(12,26,9).macd, macd(12,26,9).signal)",
            "cross_below(macd(12,26,9).macd, macd(12,26,9).signal)",
        ),
    ];
    let options = [
        Options {
            exclusive: true,
            ..Options::default()
        },
        Options {
            exclusive: true,
            fill: Fill::Close,
            commission: 0.001,
            finalize: true,
            ..Options::default()
        },
    ];
    for (name, params, long, short) in pairs {
        let params: Vec<(String, f64)> = params.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mut rules = compile(&RuleSet {
            long_entry: Some(long.into()),
            short_entry: Some(short.into()),
            ..RuleSet::default()
        })
        .unwrap();
        for o in &options {
            let mut built = strategies::build(name, &params).unwrap();
            let want = run(built.as_mut(), &series, o);
            rules.reset();
            let got = run(&mut rules, &series, o);
            assert!(want.trades.len() > 50, "{name}: {}", want.trades.len());
            assert_eq!(got.start, want.start, "{name}");
            assert_eq!(got.trades, want.trades, "{name}");
            assert!(same(&got.equity, &want.equity), "{name}");
            assert_eq!(got.open_trades, want.open_trades, "{name}");
            assert_eq!(
                format!("{:?}", got.stats),
                format!("{:?}", want.stats),
                "{name}"
            );
        }
    }
}

#[test]
fn trades_exit_at_the_stop() {
    // Flat at 100, then a candle falling through 98 (the 2 % stop), then flat at 91.
    let mut s = Series::default();
    let flat = |x: f64| Bar {
        open: x,
        high: x + 0.5,
        low: x - 0.5,
        close: x,
        volume: 1.0,
        quote_volume: 0.0,
    };
    for i in 0..10 {
        s.push(i * 60_000, &flat(100.0));
    }
    s.push(
        10 * 60_000,
        &Bar {
            open: 100.0,
            high: 100.5,
            low: 90.0,
            close: 91.0,
            volume: 1.0,
            quote_volume: 0.0,
        },
    );
    for i in 11..15 {
        s.push(i * 60_000, &flat(91.0));
    }
    let rules = |sl: Option<f64>| RuleSet {
        long_entry: Some("close > 0".into()),
        stop_loss_pct: sl,
        ..RuleSet::default()
    };
    let o = Options::default();
    let out = run(&mut compile(&rules(Some(2.0))).unwrap(), &s, &o);
    let t = &out.trades[0];
    let stop = 100.0 * (1.0 - 0.02);
    assert_eq!((t.entry_bar, t.entry_price), (2, 100.0));
    assert_eq!((t.exit_bar, t.exit_price, t.sl), (10, stop, Some(stop)));
    assert!(t.pnl < 0.0);
    // Flat again after the stop, so the rule buys again (at 91, the next open).
    assert_eq!(out.open_trades, 1);
    // Without the stop the first trade is still open at the end.
    let out = run(&mut compile(&rules(None)).unwrap(), &s, &o);
    assert!(out.trades.is_empty());
    assert_eq!(out.open_trades, 1);
}

#[test]
fn a_series_shorter_than_the_warm_up_runs_without_trades() {
    let series = walk(15, 7);
    let mut rules = compile(&RuleSet {
        long_entry: Some("cross_above(close, sma(close, 20))".into()),
        short_entry: Some("prev(close, 30) > close".into()),
        ..RuleSet::default()
    })
    .unwrap();
    assert_eq!(rules.extra_warmup(), 30);
    let out = run(&mut rules, &series, &Options::default());
    assert!(out.trades.is_empty());
    assert_eq!(out.open_trades, 0);
    assert_eq!(out.equity, vec![10_000.0; 15]);
}
