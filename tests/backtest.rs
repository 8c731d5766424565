//! `quantservice backtest` as users run it: the Quick Start on GOOG.csv equal to
//! backtesting.py (the golden file) through the CLI's JSON; stored candles from ClickHouse
//! giving the same run as their CSV; a rule file equal to the built-in; a parameter grid
//! ranked and saved (every valid combination in backtest_results, every trade in
//! backtest_trades); clear errors with exit 1 for bad input.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{binance_data, count, TestDb};
use quantservice::market::PairKey;
use serde_json::Value;

fn data(rel: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "tests", "data", rel]
        .iter()
        .collect()
}

/// Runs the binary; `config` (if any) is written as app.yaml and passed with --config.
fn run(config: Option<&str>, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quantservice"));
    cmd.env_remove("QS_CONFIG_PATH")
        .env_remove("RUST_LOG")
        .current_dir(dir.path());
    if let Some(c) = config {
        let path = dir.path().join("app.yaml");
        std::fs::write(&path, c).unwrap();
        cmd.arg("--config").arg(path);
    }
    let out = cmd.arg("backtest").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(out: &(Option<i32>, String, String)) -> Value {
    assert_eq!(out.0, Some(0), "stdout:\n{}\nstderr:\n{}", out.1, out.2);
    serde_json::from_str(out.1.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.1))
}

fn close(what: &str, ours: &Value, theirs: f64) {
    let ours = ours.as_f64().unwrap_or(f64::NAN);
    let ok = (ours.is_nan() && theirs.is_nan()) || (ours - theirs).abs() <= 1e-9 * theirs.abs();
    assert!(ok, "{what}: ours {ours}, backtesting.py {theirs}");
}

const QUICK_START: &[&str] = &[
    "--strategy",
    "sma_cross",
    "--param",
    "fast=10",
    "--param",
    "slow=20",
    "--cash",
    "10000",
    "--commission",
    "0.002",
    "--exclusive",
    "--json",
];

#[test]
fn the_quick_start_through_the_cli_equals_backtesting_py() {
    let goog = data("backtest/GOOG.csv");
    let mut args = vec!["--csv", goog.to_str().unwrap()];
    args.extend(QUICK_START);
    // No configuration anywhere: a CSV backtest needs none.
    let v = json_of(&run(None, &args));
    let g: Value = {
        use std::io::Read;
        let file = std::fs::File::open(data("backtest/goog_sma_cross_10_20.json.gz")).unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let gs = &g["stats"];
    let f = |k: &str| gs[k].as_f64().unwrap();
    assert_eq!(v["trades"], 93);
    close("return_pct", &v["return_pct"], f("Return [%]"));
    close(
        "buy_hold_return_pct",
        &v["buy_hold_return_pct"],
        f("Buy & Hold Return [%]"),
    );
    close(
        "max_drawdown_pct",
        &v["max_drawdown_pct"],
        f("Max. Drawdown [%]"),
    );
    close("sharpe", &v["sharpe"], f("Sharpe Ratio"));
    close("sortino", &v["sortino"], f("Sortino Ratio"));
    close("calmar", &v["calmar"], f("Calmar Ratio"));
    close("win_rate_pct", &v["win_rate_pct"], f("Win Rate [%]"));
    close("equity_final", &v["equity_final"], f("Equity Final [$]"));
    close("equity_peak", &v["equity_peak"], f("Equity Peak [$]"));
    close("exposure_pct", &v["exposure_pct"], f("Exposure Time [%]"));
    close("commissions", &v["commissions"], f("Commissions [$]"));
    close("profit_factor", &v["profit_factor"], f("Profit Factor"));
    close("expectancy_pct", &v["expectancy_pct"], f("Expectancy [%]"));
    close("sqn", &v["sqn"], f("SQN"));
    // The published Quick Start figures.
    assert!((v["return_pct"].as_f64().unwrap() - 462.635).abs() < 5e-4);
    assert!((v["sharpe"].as_f64().unwrap() - 0.6007).abs() < 5e-5);
    let trades = v["trade_list"].as_array().unwrap();
    assert_eq!(trades.len(), 93);
    for (i, (t, w)) in trades
        .iter()
        .zip(g["trades"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(t["entry_bar"], w["entry_bar"], "trade {i}");
        assert_eq!(t["exit_bar"], w["exit_bar"], "trade {i}");
        close(
            &format!("trade {i} size"),
            &t["size"],
            w["size"].as_f64().unwrap(),
        );
        close(
            &format!("trade {i} entry"),
            &t["entry_price"],
            w["entry_price"].as_f64().unwrap(),
        );
        close(
            &format!("trade {i} exit"),
            &t["exit_price"],
            w["exit_price"].as_f64().unwrap(),
        );
        close(
            &format!("trade {i} pnl"),
            &t["pnl"],
            w["pnl"].as_f64().unwrap(),
        );
        close(
            &format!("trade {i} return"),
            &t["return_pct"],
            w["return_pct"].as_f64().unwrap() * 100.0,
        );
    }

    // The table as backtesting.py prints it.
    let mut table_args = vec!["--csv", goog.to_str().unwrap()];
    table_args.extend(&QUICK_START[..QUICK_START.len() - 1]);
    let (code, out, err) = run(None, &table_args);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "# Trades",
        "Return [%]",
        "Sharpe Ratio",
        "Max. Drawdown Duration",
    ] {
        assert!(out.contains(line), "{line} missing:\n{out}");
    }
    assert!(out.contains("462.635"), "{out}");
}

#[test]
fn a_rule_file_gives_the_built_in_strategys_run() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("cross.yaml");
    std::fs::write(
        &rules,
        "description: SmaCross as rules\n\
         long_entry: \"cross_above(sma(close,10), sma(close,20))\"\n\
         short_entry: \"cross_below(sma(close,10), sma(close,20))\"\n",
    )
    .unwrap();
    let goog = data("backtest/GOOG.csv");
    let base = [
        "--csv",
        goog.to_str().unwrap(),
        "--cash",
        "10000",
        "--commission",
        "0.002",
        "--exclusive",
        "--json",
    ];
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--rules", rules.to_str().unwrap()]);
    let from_rules = json_of(&run(None, &a));
    let mut b: Vec<&str> = base.to_vec();
    b.extend([
        "--strategy",
        "sma_cross",
        "--param",
        "fast=10",
        "--param",
        "slow=20",
    ]);
    let builtin = json_of(&run(None, &b));
    for k in [
        "trades",
        "return_pct",
        "sharpe",
        "equity_final",
        "max_drawdown_pct",
        "trade_list",
    ] {
        assert_eq!(from_rules[k], builtin[k], "{k}");
    }

    // A bad expression: the file, the field and the column.
    std::fs::write(&rules, "long_entry: \"close > sma(close,10) and\"\n").unwrap();
    let mut c: Vec<&str> = base.to_vec();
    c.extend(["--rules", rules.to_str().unwrap()]);
    let (code, _, err) = run(None, &c);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cross.yaml") && err.contains("long_entry") && err.contains("column"),
        "{err}"
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let goog = data("backtest/GOOG.csv");
    let g = goog.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bad_csv = dir.path().join("bad.csv");
    std::fs::write(
        &bad_csv,
        "1700000000000,1,2,0.5,1.5,10,1700000059999,15,3,5,7,0\n\
         1700000060000,1,2,oops,1.5,10,1700000119999,15,3,5,7,0\n",
    )
    .unwrap();
    let b = bad_csv.to_str().unwrap();
    let zero_csv = dir.path().join("zero.csv");
    std::fs::write(
        &zero_csv,
        ",Open,High,Low,Close,Volume\n2020-01-01,1,2,0.5,1.5,10\n2020-01-02,1,2,0,1.5,10\n",
    )
    .unwrap();
    let z = zero_csv.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--csv", g, "--strategy", "nope"], "unknown strategy"),
        (
            vec!["--csv", g, "--strategy", "sma_cross", "--param", "speed=3"],
            "no parameter",
        ),
        (
            vec![
                "--csv",
                g,
                "--strategy",
                "sma_cross",
                "--param",
                "fast=50:5:5",
            ],
            "range is empty",
        ),
        (
            vec!["--csv", g, "--strategy", "sma_cross", "--param", "fast=30"],
            "fast (30) must be less than slow (20)",
        ),
        (
            vec!["--csv", g, "--strategy", "sma_cross", "--rank", "luck"],
            "not a statistic",
        ),
        (
            vec!["--csv", g, "--strategy", "sma_cross", "--sizing", "lots"],
            "--sizing",
        ),
        (
            vec!["--csv", g, "--strategy", "sma_cross", "--fill", "later"],
            "--fill",
        ),
        (
            vec!["--csv", g, "--strategy", "sma_cross", "--cash", "0"],
            "cash",
        ),
        (
            vec!["--csv", g, "--strategy", "sma_cross", "--cash", "-5"],
            "cash",
        ),
        (
            vec![
                "--csv",
                g,
                "--strategy",
                "sma_cross",
                "--slippage_bps",
                "-1",
            ],
            "slippage",
        ),
        (
            vec![
                "--csv",
                g,
                "--strategy",
                "sma_cross",
                "--param",
                "fast=1:2:1e-300",
            ],
            "more than",
        ),
        (vec!["--csv", b, "--strategy", "sma_cross"], "line 2"),
        (
            vec!["--csv", z, "--strategy", "sma_cross"],
            "line 3: low is 0: prices must be positive",
        ),
        (
            vec!["--csv", "/nonexistent/x.csv", "--strategy", "sma_cross"],
            "x.csv",
        ),
        (vec!["--strategy", "sma_cross"], "no candles"),
        (vec!["--csv", g], "no strategy"),
    ];
    for (args, want) in cases {
        let (code, out, err) = run(None, &args);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

fn csv_path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_candles_run_like_their_csv_and_a_grid_is_saved() {
    let db = TestDb::new("backtest");
    let pair = PairKey::parse("um", "BTCUSDT", "1h").unwrap();
    let rel = "um/BTCUSDT-1h-2024-01-01_2025-12-20.csv";
    common::store_klines(&db, common::binance_klines(rel, &pair)).await;
    let yaml = db.yaml("");
    let csv = binance_data(rel);
    let common = [
        "--cash",
        "1000000",
        "--commission",
        "0.0004",
        "--exclusive",
        "--json",
    ];
    let strat = [
        "--strategy",
        "sma_cross",
        "--param",
        "fast=24",
        "--param",
        "slow=72",
    ];
    let mut a: Vec<&str> = vec!["--csv", csv_path(&csv)];
    a.extend(common);
    a.extend(strat);
    let from_csv = json_of(&run(None, &a));
    let mut b: Vec<&str> = vec!["--symbol", "BTCUSDT", "--market", "um", "--period", "1h"];
    b.extend(common);
    b.extend(strat);
    let from_ch = json_of(&run(Some(&yaml), &b));
    assert_eq!(
        from_csv, from_ch,
        "ClickHouse and the CSV give the same run"
    );
    assert_eq!(from_ch["trades"], 280, "the golden file's count");

    // A range of the stored candles.
    let mut c = b.clone();
    c.extend(["--start_ms", "1704067200000", "--end_ms", "1706745600000"]);
    let january = json_of(&run(Some(&yaml), &c));
    assert_eq!(january["bars"], 31 * 24);
    assert_eq!(january["start"], 1_704_067_200_000i64);

    // Nothing stored in the range: a clear error.
    let mut d = b.clone();
    d.extend(["--start_ms", "1000", "--end_ms", "2000"]);
    let (code, _, err) = run(Some(&yaml), &d);
    assert_eq!(code, Some(1));
    assert!(err.contains("no stored candles"), "{err}");

    // A grid: 4 × 3 combinations, fast >= slow skipped, every valid one saved.
    let mut g: Vec<&str> = vec!["--symbol", "BTCUSDT", "--market", "um", "--period", "1h"];
    g.extend(common);
    g.extend([
        "--strategy",
        "sma_cross",
        "--param",
        "fast=10:40:10",
        "--param",
        "slow=20:60:20",
        "--rank",
        "return_pct",
        "--top",
        "3",
        "--save",
    ]);
    let grid = json_of(&run(Some(&yaml), &g));
    // fast in {10,20,30,40}, slow in {20,40,60}: valid when fast < slow.
    let valid = [10, 20, 30, 40]
        .iter()
        .flat_map(|f| [20, 40, 60].iter().map(move |s| (*f, *s)))
        .filter(|(f, s)| f < s)
        .count();
    assert_eq!(grid["combinations"], 12);
    assert_eq!(grid["skipped"], 12 - valid);
    let runs = grid["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "--top 3");
    let r: Vec<f64> = runs
        .iter()
        .map(|r| r["return_pct"].as_f64().unwrap())
        .collect();
    assert!(r.windows(2).all(|w| w[0] >= w[1]), "ranked: {r:?}");
    let batch = grid["batch_id"].as_str().unwrap();
    let best_id = runs[0]["run_id"].as_str().unwrap();
    assert_eq!(
        count(
            &db,
            &format!("SELECT count() FROM backtest_results WHERE batch_id = '{batch}'")
        ),
        valid as u64
    );
    // Every saved run's trades, and its figures as the JSON gave them.
    let saved_trades = count(
        &db,
        &format!(
            "SELECT count() FROM backtest_trades WHERE run_id IN \
             (SELECT run_id FROM backtest_results WHERE batch_id = '{batch}')"
        ),
    );
    let stated = count(
        &db,
        &format!("SELECT sum(trades) FROM backtest_results WHERE batch_id = '{batch}'"),
    );
    assert_eq!(saved_trades, stated);
    assert!(stated > 0);
    let best = db.sql(&format!(
        "SELECT params, return_pct, trades, run_id FROM backtest_results \
         WHERE batch_id = '{batch}' ORDER BY return_pct DESC LIMIT 1"
    ));
    let f: Vec<&str> = best.trim().split('\t').collect();
    assert_eq!(f[3], best_id, "the JSON names the saved run");
    // Its trades, returns in percent as in the JSON.
    let first = db.sql(&format!(
        "SELECT pnl, return_pct FROM backtest_trades WHERE run_id = '{best_id}' AND n = 0"
    ));
    let t: Vec<f64> = first
        .trim()
        .split('\t')
        .map(|x| x.parse().unwrap())
        .collect();
    let want = &runs[0]["trade_list"][0];
    assert_eq!(t[0], want["pnl"].as_f64().unwrap());
    assert_eq!(t[1], want["return_pct"].as_f64().unwrap());
    let params: Value = serde_json::from_str(&f[0].replace("\\\\", "\\")).unwrap();
    assert_eq!(params, runs[0]["params"], "{best}");
    let ret: f64 = f[1].parse().unwrap();
    assert_eq!(
        ret,
        runs[0]["return_pct"].as_f64().unwrap(),
        "stored exactly"
    );
    assert_eq!(f[2], runs[0]["trades"].to_string());
}
