//! Historical backfill end to end: the simulator (real HTTP on loopback) as Binance, a real
//! ClickHouse, the real engine, governor, archive reader and writer.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use common::{binance_data, TestDb};
use indicatif::ProgressBar;
use qs_sim::{self as sim, synthetic, RequestKind, SimConfig, SimHandle};
use quantservice::app::{backfill_gap, BackfillOutcome, BackfillRequest};
use quantservice::market::{Kline, Market, PairKey, Period};
use quantservice::store::Store;
use tokio_util::sync::CancellationToken;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

async fn start_sim(cfg: SimConfig) -> SimHandle {
    sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// Config lines pointing every market and the archives at `sim`, plus `extra`.
fn sim_yaml(sim: &SimHandle, extra: &str) -> String {
    sim_yaml_with(sim, "", extra)
}

/// Like `sim_yaml`, with `um_extra` lines added to the `um` section.
fn sim_yaml_with(sim: &SimHandle, um_extra: &str, extra: &str) -> String {
    format!(
        "{}  writer:\n    flush_interval: 100ms\n{extra}",
        common::sim_binance_yaml(sim, um_extra)
    )
}

async fn backfill(
    db: &TestDb,
    sim: &SimHandle,
    extra: &str,
    pair: &PairKey,
    start: i64,
    end: i64,
    source: &str,
) -> BackfillOutcome {
    let cfg = db.config(&sim_yaml(sim, extra));
    backfill_with(cfg, pair, start, end, source, CancellationToken::new())
        .await
        .unwrap()
}

async fn backfill_with(
    cfg: quantservice::config::Config,
    pair: &PairKey,
    start: i64,
    end: i64,
    source: &str,
    cancel: CancellationToken,
) -> anyhow::Result<BackfillOutcome> {
    let req = BackfillRequest {
        market: pair.market.to_string(),
        symbol: pair.symbol.to_string(),
        period: pair.period.to_string(),
        start_ms: start,
        end_ms: end,
        source: Some(source.to_string()),
    };
    backfill_gap(cfg, req, ProgressBar::hidden(), cancel).await
}

fn load_csv(rel: &str, pair: &PairKey) -> Vec<Kline> {
    let text = std::fs::read_to_string(binance_data(rel)).unwrap();
    text.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[0].parse::<i64>().is_ok())
        .map(|f| {
            Kline::from_fields(pair.clone(), &f, true, quantservice::market::Source::Rest).unwrap()
        })
        .collect()
}

/// Everything but the source, which differs by path.
fn values(k: &[Kline]) -> Vec<String> {
    k.iter()
        .map(|k| {
            format!(
                "{} {} {} {} {} {} {} {} {} {} {} {} {}",
                k.pair,
                k.open_time,
                k.close_time,
                k.open,
                k.high,
                k.low,
                k.close,
                k.volume,
                k.quote_volume,
                k.trades,
                k.taker_buy_volume,
                k.taker_buy_quote_volume,
                k.is_final
            )
        })
        .collect()
}

async fn stored(db: &TestDb, pair: &PairKey) -> Vec<Kline> {
    let store = Store::new(&db.config("").clickhouse).unwrap();
    store.klines(pair, i64::MIN, i64::MAX).await.unwrap()
}

fn raw_count(db: &TestDb, pair: &PairKey) -> u64 {
    db.sql(&format!(
        "SELECT count() FROM klines WHERE market = '{}' AND symbol = '{}' AND period = '{}'",
        pair.market, pair.symbol, pair.period
    ))
    .trim()
    .parse()
    .unwrap()
}

fn klines_requests(sim: &SimHandle) -> Vec<sim::RequestRecord> {
    sim.requests()
        .into_iter()
        .filter(|r| r.kind == RequestKind::Rest && r.path.ends_with("/klines"))
        .collect()
}

/// The three real datasets, through REST and through the archives: ClickHouse holds exactly
/// the CSV's candles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_datasets_round_trip_exactly_through_rest_and_archives() {
    let sets = [
        ("um/BTCUSDT-1h-2024-01-01_2025-12-20.csv", "um", "BTCUSDT"),
        ("um/ETHUSDT-1h-2024-01-01_2025-12-20.csv", "um", "ETHUSDT"),
        ("spot/BTCUSDT-1h-2022-01.csv", "spot", "BTCUSDT"),
    ];
    let mut cfg = SimConfig::default();
    let mut expected = Vec::new();
    for (file, market, symbol) in sets {
        let pair = PairKey::parse(market, symbol, "1h").unwrap();
        cfg = cfg
            .with_csv_series(pair.clone(), &binance_data(file))
            .unwrap();
        expected.push((pair.clone(), load_csv(file, &pair)));
    }
    let sim = start_sim(cfg).await;
    for source in ["rest", "archive"] {
        let db = TestDb::new(source);
        for (pair, rows) in &expected {
            let start = rows[0].open_time;
            let end = rows.last().unwrap().open_time + HOUR;
            let out = backfill(&db, &sim, "", pair, start, end, source).await;
            assert_eq!(
                out.rows_written,
                rows.len() as u64,
                "{source} {pair}: {out}"
            );
            if source == "archive" {
                assert_eq!(out.summary.rows_archive, rows.len() as u64, "{out}");
                assert_eq!(out.summary.rows_rest, 0, "{out}");
            } else {
                assert_eq!(out.summary.rows_rest, rows.len() as u64, "{out}");
            }
            let got = stored(&db, pair).await;
            assert_eq!(values(&got), values(rows), "{source} {pair}");
            assert_eq!(raw_count(&db, pair), rows.len() as u64, "no duplicates");
        }
    }
}

#[tokio::test]
async fn coin_m_over_more_than_200_days_is_complete() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("cm");
    let pair = PairKey::parse("cm", "BTCUSD_PERP", "1h").unwrap();
    // 2020-09-01 .. 2021-06-01: 273 days of hourly candles, beyond COIN-M's 200-day window.
    let (start, end) = (1_598_918_400_000, 1_622_505_600_000);
    let out = backfill(&db, &sim, "", &pair, start, end, "rest").await;
    let expected: Vec<Kline> = (0..(end - start) / HOUR)
        .map(|i| synthetic::candle(&pair, start + i * HOUR))
        .collect();
    assert_eq!(out.rows_written, expected.len() as u64, "{out}");
    assert_eq!(values(&stored(&db, &pair).await), values(&expected));
    assert_eq!(sim.count_status(400), 0, "no -4088 or other rejection");
}

#[tokio::test]
async fn a_small_budget_is_never_exceeded() {
    // 120 weight per 2 s window; each 499-row request costs 2: ~90 requests needed.
    let sim =
        start_sim(SimConfig::default().with_budget(Market::Um, 120, Duration::from_secs(2))).await;
    let db = TestDb::new("budget");
    let pair = PairKey::parse("um", "ETHUSDT", "1m").unwrap();
    let start = 1_640_995_200_000; // 2022-01-01
    let end = start + 31 * DAY;
    let out = backfill(
        &db,
        &sim,
        "  backfill:\n    concurrency: 8\n",
        &pair,
        start,
        end,
        "rest",
    )
    .await;
    assert_eq!(out.rows_written, 31 * 1440, "{out}");
    assert!(out.requests >= 30, "{out}");
    assert_eq!(sim.count_status(429), 0, "{out}");
    assert_eq!(sim.count_status(418), 0, "{out}");
    assert_eq!((out.http_429, out.http_418), (0, 0));
    // Per window, the weight the simulator charged stayed within the budget.
    let mut per_window = std::collections::HashMap::new();
    for r in sim.requests() {
        *per_window.entry(r.at_ms.div_euclid(2000)).or_insert(0u32) += r.weight;
    }
    assert!(per_window.values().all(|w| *w <= 120), "{per_window:?}");
}

#[tokio::test]
async fn a_418_ban_is_respected() {
    // The client believes it may use 100000 weight and sends 32 requests at once; the
    // simulator allows 4 per 2 s and bans for 3 s after repeated 429s in a window.
    let sim = start_sim(
        SimConfig::default()
            .with_budget(Market::Um, 4, Duration::from_secs(2))
            .with_ban_duration(Duration::from_secs(3)),
    )
    .await;
    let db = TestDb::new("ban");
    let start = 1_609_459_200_000; // 2021-01-01
    let end = start + 3 * DAY; // 9 requests of up to 499 1m candles, 2 weight each
    let yaml = sim_yaml_with(
        &sim,
        "      weight_limit: 100000\n",
        "  backfill:\n    concurrency: 32\n",
    );
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let out = backfill_with(
        db.config(&yaml),
        &pair,
        start,
        end,
        "rest",
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(out.rows_written, 3 * 1440, "{out}");
    assert!(out.http_418 >= 1, "the test must provoke a ban: {out}");
    // After the first 418, nothing reached the simulator until the ban was over (requests
    // already in flight when it was issued arrive within a few ms).
    let log = sim.requests();
    let first_ban = log.iter().find(|r| r.status == 418).unwrap().at_ms;
    let during: Vec<_> = log
        .iter()
        .filter(|r| r.at_ms > first_ban + 200 && r.at_ms < first_ban + 3000)
        .collect();
    assert!(during.is_empty(), "requests during the ban: {during:?}");
}

#[tokio::test]
async fn an_aborted_backfill_resumes_without_duplicates_or_holes() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("resume");
    let pair = PairKey::parse("spot", "ETHUSDT", "1m").unwrap();
    let start = 1_577_836_800_000 + 40 * DAY; // 2020-02-10
    let end = start + 20 * DAY;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let sim_probe = sim.clone();
    // Abort once a few requests have been answered.
    tokio::spawn(async move {
        while klines_requests(&sim_probe).len() < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        trigger.cancel();
    });
    let cfg = db.config(&sim_yaml(&sim, ""));
    let first = backfill_with(cfg, &pair, start, end, "rest", cancel).await;
    assert!(first.is_err(), "the first run must have been cut short");
    let partial = raw_count(&db, &pair);
    assert!(partial > 0 && partial < 20 * 1440, "{partial}");

    let out = backfill(&db, &sim, "", &pair, start, end, "rest").await;
    assert_eq!(out.summary.present, partial, "{out}");
    assert_eq!(out.rows_written + partial, 20 * 1440, "{out}");
    assert_eq!(raw_count(&db, &pair), 20 * 1440, "no duplicate rows");
    let expected: Vec<Kline> = (0..20 * 1440)
        .map(|i| synthetic::candle(&pair, start + i * 60_000))
        .collect();
    assert_eq!(values(&stored(&db, &pair).await), values(&expected));
}

#[tokio::test]
async fn a_bad_checksum_falls_back_to_rest() {
    let sim = start_sim(SimConfig::default()).await;
    sim.set_bad_checksum(true);
    let db = TestDb::new("checksum");
    let pair = PairKey::parse("um", "BTCUSDT", "1h").unwrap();
    let start = 1_609_459_200_000; // 2021-01 and 2021-02
    let end = 1_614_556_800_000;
    let out = backfill(&db, &sim, "", &pair, start, end, "auto").await;
    let n = ((end - start) / HOUR) as u64;
    assert_eq!(out.rows_written, n, "{out}");
    assert_eq!(out.summary.rows_archive, 0, "{out}");
    assert_eq!(out.summary.rows_rest, n, "{out}");
    assert_eq!(out.summary.archive_fallbacks, 2, "{out}");
    let archive_hits = sim
        .requests()
        .iter()
        .filter(|r| r.kind == RequestKind::Archive && r.path.ends_with(".CHECKSUM"))
        .count();
    assert_eq!(archive_hits, 2);
}

#[tokio::test]
async fn spot_2025_archives_in_microseconds_are_normalised() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("micros");
    let pair = PairKey::parse("spot", "BTCUSDT", "1h").unwrap();
    let start = 1_738_368_000_000; // 2025-02-01
    let end = 1_740_787_200_000; // 2025-03-01
    let out = backfill(&db, &sim, "", &pair, start, end, "archive").await;
    assert_eq!(out.summary.rows_archive, 28 * 24, "{out}");
    let expected: Vec<Kline> = (0..28 * 24)
        .map(|i| synthetic::candle(&pair, start + i * HOUR))
        .collect();
    assert_eq!(values(&stored(&db, &pair).await), values(&expected));
    // The simulator really served microseconds (16-digit times) in that file.
    let archive = sim
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("BTCUSDT-1h-2025-02.zip"));
    assert!(archive.is_some_and(|r| r.status == 200));
}

#[tokio::test]
async fn a_maintenance_gap_is_recorded_and_not_fetched_again() {
    let sim = start_sim(SimConfig::default()).await;
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let start = 1_612_137_600_000; // 2021-02-01
    let end = start + DAY;
    let (gs, ge) = (start + 6 * HOUR, start + 8 * HOUR);
    sim.add_maintenance(Market::Um, Some(pair.symbol.clone()), gs, ge);
    let db = TestDb::new("gap");
    let out = backfill(&db, &sim, "", &pair, start, end, "rest").await;
    assert_eq!(out.rows_written, 1440 - 120, "{out}");
    assert_eq!(out.summary.gap_candles, 120, "{out}");
    assert_eq!(
        db.sql(&format!(
            "SELECT start_ms, end_ms FROM exchange_gaps FINAL WHERE symbol = '{}'",
            pair.symbol
        )),
        format!("{gs}\t{ge}\n")
    );
    let before = klines_requests(&sim).len();
    let again = backfill(&db, &sim, "", &pair, start, end, "rest").await;
    assert_eq!(again.rows_written, 0, "{again}");
    assert_eq!(again.summary.present, 1440, "{again}");
    // Only the first-candle probe: no klines request for the range or the gap.
    assert_eq!(klines_requests(&sim).len() - before, 1);
}

#[tokio::test]
async fn the_open_candle_is_never_stored_as_final() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("open");
    let pair = PairKey::parse("spot", "BNBBTC", "1m").unwrap();
    let now = sim::now_ms();
    let out = backfill(&db, &sim, "", &pair, now - 3 * HOUR, now + HOUR, "auto").await;
    let rows = stored(&db, &pair).await;
    assert!(
        rows.len() as u64 == out.rows_written && rows.len() >= 179,
        "{out}"
    );
    assert!(rows.iter().all(|k| k.is_final));
    let last = rows.last().unwrap();
    assert!(last.open_time < Period::M1.align(sim::now_ms()));
    assert_eq!(
        values(std::slice::from_ref(last)),
        values(&[synthetic::candle(&pair, last.open_time)])
    );
}

#[tokio::test]
async fn an_unknown_symbol_fails_clearly_and_costs_at_most_one_probe() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("unknown");
    let pair = PairKey::parse("um", "NOPEUSDT", "1m").unwrap();
    let cfg = db.config(&sim_yaml(&sim, ""));
    let err = backfill_with(cfg, &pair, 0, DAY, "rest", CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("unknown symbol NOPEUSDT on um"),
        "{err:#}"
    );
    // Not in exchangeInfo; the first-candle probe gets -1121 (a delisted contract could still
    // have klines, so exchangeInfo alone does not decide on spot/um).
    let probes = klines_requests(&sim);
    assert!(
        probes.len() <= 1 && probes.iter().all(|r| r.status == 400),
        "{probes:?}"
    );
    assert_eq!(raw_count(&db, &pair), 0);
}

/// Exit code, stdout and stderr of one run of the binary.
type Ran = (Option<i32>, String, String);

/// Runs `quantservice backfill-gap` with `config` and `args`.
fn run_cli(config: &str, args: &[&str]) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .arg("backfill-gap")
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backfill_then_rerun_leaves_every_candle_exactly_once() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("kill9");
    let pair = PairKey::parse("um", "ETHUSDT", "1m").unwrap();
    let start = 1_614_556_800_000; // 2021-03-01
    let end = start + 60 * DAY;
    let config = db.yaml(&sim_yaml(&sim, "  backfill:\n    concurrency: 2\n"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, &config).unwrap();
    let (s, e) = (start.to_string(), end.to_string());
    let args = [
        "backfill-gap",
        "--symbol",
        "ETHUSDT",
        "--market",
        "um",
        "--period",
        "1m",
        "--start_ms",
        &s,
        "--end_ms",
        &e,
        "--source",
        "rest",
    ];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .args(args)
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some rows are committed, while most are still to come.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = db
            .try_sql("SELECT count() FROM klines")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if n > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no rows were written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::process::Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let partial = raw_count(&db, &pair);
    assert!(
        partial < 60 * 1440,
        "killed too late to test anything ({partial})"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("backfill-gap um:ETHUSDT:1m: rows="),
        "{stdout}"
    );
    assert_eq!(raw_count(&db, &pair), 60 * 1440, "no duplicate, no hole");
    let expected: Vec<Kline> = (0..60 * 1440)
        .map(|i| synthetic::candle(&pair, start + i * 60_000))
        .collect();
    assert_eq!(values(&stored(&db, &pair).await), values(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_1_with_a_clear_message() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("badinput");
    let good = db.yaml(&sim_yaml(&sim, "  backfill:\n    max_retries: 2\n"));
    let run = |config: &str, market: &str, symbol: &str, period: &str, s: &str, e: &str| {
        run_cli(
            config,
            &[
                "--symbol",
                symbol,
                "--market",
                market,
                "--period",
                period,
                "--start_ms",
                s,
                "--end_ms",
                e,
            ],
        )
    };
    let cases: Vec<(String, Ran)> = vec![
        (
            "unknown market \"xx\"".into(),
            run(&good, "xx", "BTCUSDT", "1m", "0", "1000"),
        ),
        (
            "invalid symbol \"btc-usdt\"".into(),
            run(&good, "um", "btc-usdt", "1m", "0", "1000"),
        ),
        (
            "period 1s is not offered on market um".into(),
            run(&good, "um", "BTCUSDT", "1s", "0", "1000"),
        ),
        (
            "range inverted".into(),
            run(&good, "um", "BTCUSDT", "1m", "2000", "1000"),
        ),
        (
            "unknown symbol NOPEUSDT on um".into(),
            run(&good, "um", "NOPEUSDT", "1m", "0", "1000"),
        ),
    ];
    for (want, (code, _, stderr)) in &cases {
        assert_eq!(*code, Some(1), "{want}: {stderr}");
        assert!(stderr.contains(want.as_str()), "want {want:?} in: {stderr}");
    }
    // Unreachable exchange.
    let dead = common::dead_port();
    let down = good.replace(&sim.addr().to_string(), &format!("127.0.0.1:{dead}"));
    let (code, _, stderr) = run(&down, "um", "BTCUSDT", "1m", "0", "1000");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
    // ClickHouse down.
    let ch_down = good.replace(&format!("port: {}", db.port), &format!("port: {dead}"));
    let (code, _, stderr) = run(&ch_down, "um", "BTCUSDT", "1m", "0", "1000");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("ClickHouse"), "{stderr}");
}

/// A stand-in stricter than our default simulator: weight counted over a rolling window, no
/// weight or Retry-After headers, at most 300 rows per page whatever `limit` says, and the
/// newest closed candles served with a 3-minute lag. Still: no 429, every candle exactly, and
/// no lagging candle mistaken for an exchange gap.
#[tokio::test]
async fn a_stricter_stand_in_is_still_filled_exactly_without_429_or_false_gaps() {
    let sim =
        start_sim(SimConfig::default().with_budget(Market::Um, 120, Duration::from_secs(4))).await;
    sim.set_rolling_window(true);
    sim.set_no_weight_headers(true);
    sim.set_page_cap(Some(300));
    sim.set_lag(Duration::from_secs(180));
    let db = TestDb::new("strict");
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    // An aligned end: both runs cover the same slots even if a minute turns between them.
    let now = Period::M1.align(sim::now_ms());
    let start = now - 2 * DAY;
    let out = backfill(
        &db,
        &sim,
        "  backfill:\n    concurrency: 8\n",
        &pair,
        start,
        now,
        "rest",
    )
    .await;
    assert_eq!(
        (sim.count_status(429), sim.count_status(418)),
        (0, 0),
        "{out}"
    );
    assert_eq!(
        out.summary.gap_candles, 0,
        "lagging candles are not gaps: {out}"
    );
    let rows = stored(&db, &pair).await;
    let missing = out.summary.expected - rows.len() as u64;
    assert!((2..=5).contains(&missing), "{missing} missing: {out}");
    let expected: Vec<Kline> = rows
        .iter()
        .map(|k| synthetic::candle(&pair, k.open_time))
        .collect();
    assert_eq!(values(&rows), values(&expected));
    assert_eq!(rows.first().unwrap().open_time, start);

    // Once the lag is over, a rerun fills exactly the rest.
    sim.set_lag(Duration::ZERO);
    let again = backfill(&db, &sim, "", &pair, start, now, "rest").await;
    assert_eq!(again.rows_written, missing, "{again}");
    assert_eq!(raw_count(&db, &pair), out.summary.expected);
}

/// A run that starts right after another one spent the budget (a killed run, another program)
/// against an exchange that reports no used weight: no 429 either, because the first window is
/// given up when the replies carry no weight headers.
#[tokio::test]
async fn a_blind_start_after_a_spent_window_causes_no_429() {
    // The simulator's rate clock is the wall clock shifted so that a window starts now, rather
    // than waiting for a real window boundary.
    let clock = sim::OffsetClock::new();
    let sim = start_sim(
        SimConfig::default()
            .with_budget(Market::Um, 120, Duration::from_secs(4))
            .with_clock(sim::SimClock::Offset(clock.clone())),
    )
    .await;
    sim.set_no_weight_headers(true);
    // At the start of a fresh window, spend 100 of the 120 weight from this address.
    clock.start_window_now(Duration::from_secs(4));
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let url = format!(
            "{}?symbol=ETHUSDT&interval=1h&limit=1000&startTime=1600000000000",
            sim.rest_url(Market::Um)
        );
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        sim.used_weight(Market::Um, "127.0.0.1".parse().unwrap()),
        100
    );
    let db = TestDb::new("blind");
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let start = 1_640_995_200_000;
    let out = backfill(
        &db,
        &sim,
        "  backfill:\n    concurrency: 8\n",
        &pair,
        start,
        start + 10 * DAY, // 29 requests of weight 2: more than the 20 weight left
        "rest",
    )
    .await;
    assert_eq!(out.rows_written, 10 * 1440, "{out}");
    assert_eq!(
        (sim.count_status(429), sim.count_status(418)),
        (0, 0),
        "{out}"
    );
}
