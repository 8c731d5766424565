//! The Binance-compatible REST facade against a real ClickHouse and real HTTP: pages of stored
//! candles (`Store::klines_page`) against a model of Binance's rules, through holes wider than
//! the read windows, replaced versions and calendar months; the facade's answers compared field
//! by field with the simulator's own answers for the same candles (every market, with and
//! without startTime/endTime/limit, and the errors); exchangeInfo, ping and time; ClickHouse
//! down; and an unmodified Binance client library (ccxt, from PyPI) pointed at the facade.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{binance_data, TestDb};
use indicatif::ProgressBar;
use qs_sim::{self as sim, synthetic, SimConfig, SimHandle};
use quantservice::app::{backfill_gap, BackfillRequest};
use quantservice::config::Config;
use quantservice::market::{Decimal, Kline, Market, PairKey, Period};
use quantservice::server::facade;
use quantservice::store::writer::Writer;
use quantservice::store::Store;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
/// 2022-01-01T00:00Z
const T2022: i64 = 1_640_995_200_000;
/// 2023-01-01T00:00Z
const T2023: i64 = 1_672_531_200_000;
/// 2024-01-01T00:00Z
const T2024: i64 = 1_704_067_200_000;

const FAST_WRITER: &str = "  writer:\n    batch_rows: 5000\n    flush_interval: 100ms\n";

async fn migrated(db: &TestDb, extra: &str) -> (Config, Store) {
    let cfg = db.config(&format!("{FAST_WRITER}{extra}"));
    quantservice::app::migrate(&cfg).await.unwrap();
    let store = Store::new(&cfg.clickhouse).unwrap();
    (cfg, store)
}

/// Writes `rows` through the real writer in one run (one part per flush), then returns.
async fn write(store: &Store, cfg: &Config, rows: Vec<Kline>) {
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let task = tokio::spawn(writer.run(CancellationToken::new()));
    handle.send_many(rows).await.unwrap();
    drop(handle);
    task.await.unwrap().unwrap();
}

/// Serves the facade on a free loopback port; returns its base URL.
async fn serve_facade(store: Store) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, facade::router(store)).await });
    format!("http://{addr}")
}

/// Binance's rules over an in-memory model of the stored candles (latest version of each).
fn model_page(
    all: &BTreeMap<i64, Kline>,
    start: Option<i64>,
    end: Option<i64>,
    limit: usize,
) -> Vec<Kline> {
    let end = end.unwrap_or(i64::MAX);
    match start {
        Some(s) if s > end => Vec::new(),
        Some(s) => all
            .range(s..=end)
            .take(limit)
            .map(|(_, k)| k.clone())
            .collect(),
        None => {
            let mut v: Vec<Kline> = all
                .range(..=end)
                .rev()
                .take(limit)
                .map(|(_, k)| k.clone())
                .collect();
            v.reverse();
            v
        }
    }
}

fn opens(rows: &[Kline]) -> Vec<i64> {
    rows.iter().map(|k| k.open_time).collect()
}

/// Checks every (start, end, limit) combination against the model.
async fn check_pages(
    store: &Store,
    pair: &PairKey,
    model: &BTreeMap<i64, Kline>,
    starts: &[Option<i64>],
    ends: &[Option<i64>],
    limits: &[u32],
) -> usize {
    let mut nonempty = 0;
    for &start in starts {
        for &end in ends {
            for &limit in limits {
                let want = model_page(model, start, end, limit as usize);
                let got = store.klines_page(pair, start, end, limit).await.unwrap();
                assert_eq!(
                    opens(&got),
                    opens(&want),
                    "{pair} start={start:?} end={end:?} limit={limit}: open times"
                );
                assert_eq!(
                    got, want,
                    "{pair} start={start:?} end={end:?} limit={limit}"
                );
                nonempty += usize::from(!got.is_empty());
            }
        }
    }
    nonempty
}

/// Pages through holes far wider than a read window (10,000 minutes against windows of 1 to
/// 1000 minutes), with replaced versions in separate parts: a later final version wins, a
/// final beats a later in-progress one, and the newest candle is served in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_binance_rules_through_holes_and_replaced_versions() {
    let db = TestDb::new("pages");
    let (cfg, store) = migrated(&db, "").await;
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let a0 = T2023;
    let b0 = a0 + 40 * MIN + 10_000 * MIN;
    let c0 = b0 + 25 * MIN + 3 * MIN;
    let grid: Vec<i64> = (0..40)
        .map(|i| a0 + i * MIN)
        .chain((0..25).map(|i| b0 + i * MIN))
        .chain((0..30).map(|i| c0 + i * MIN))
        .collect();
    let newest = *grid.last().unwrap();
    let mut model: BTreeMap<i64, Kline> = grid
        .iter()
        .map(|&t| (t, synthetic::candle(&pair, t)))
        .collect();
    // The newest candle is stored in progress only.
    let partial = synthetic::partial(&pair, newest, newest + 20_000);
    model.insert(newest, partial.clone());
    let first: Vec<Kline> = model.values().cloned().collect();
    write(&store, &cfg, first).await;

    // Later writes, each in a part of its own.
    let replaced_at = b0 + 3 * MIN;
    let mut replaced = model[&replaced_at].clone();
    replaced.close = "12345.67".parse::<Decimal>().unwrap();
    replaced.trades += 1;
    let stale_at = a0 + 5 * MIN;
    let stale = synthetic::partial(&pair, stale_at, stale_at + 1_000);
    let closing_at = c0 + 10 * MIN;
    write(&store, &cfg, vec![replaced.clone(), stale]).await;
    write(
        &store,
        &cfg,
        vec![synthetic::partial(&pair, closing_at, closing_at + 30_000)],
    )
    .await;
    write(&store, &cfg, vec![synthetic::candle(&pair, closing_at)]).await;
    model.insert(replaced_at, replaced);
    let raw: u64 = db.sql("SELECT count() FROM klines").trim().parse().unwrap();
    assert_eq!(raw, grid.len() as u64 + 4, "every version was written");

    let starts = [
        None,
        Some(a0 - HOUR),
        Some(a0),
        Some(a0 + 1),
        Some(a0 + 39 * MIN),
        Some(b0 - 1),
        Some(b0 + 2 * MIN),
        Some(c0 - MIN),
        Some(newest),
        Some(newest + 1),
    ];
    let ends = [
        None,
        Some(a0 + 10 * MIN),
        Some(a0 + 5_000 * MIN),
        Some(b0 + 5 * MIN),
        Some(b0 + 5 * MIN - 1),
        Some(newest),
        Some(newest - 1),
    ];
    let nonempty = check_pages(&store, &pair, &model, &starts, &ends, &[1, 7, 25, 60, 1000]).await;
    assert!(nonempty > 100, "most pages hold candles ({nonempty})");

    // The page readers the facade uses for COIN-M: the newest `limit` of a bounded range.
    let got = store
        .last_klines(&pair, a0 + 30 * MIN, b0 + 2 * MIN, 15)
        .await
        .unwrap();
    let want: Vec<Kline> = {
        let v: Vec<Kline> = model
            .range(a0 + 30 * MIN..=b0 + 2 * MIN)
            .map(|(_, k)| k.clone())
            .collect();
        v[v.len() - 13..].to_vec()
    };
    assert_eq!(got.len(), 13, "10 of block A and 3 of block B");
    assert_eq!(got, want);
    let got = store
        .last_klines(&pair, c0, c0 + 9 * MIN, 1000)
        .await
        .unwrap();
    assert_eq!(
        opens(&got),
        (0..10).map(|i| c0 + i * MIN).collect::<Vec<_>>()
    );
}

/// Calendar months (irregular lengths: windows of 31 days per candle) with a 19-month hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn month_pages_cross_holes() {
    let db = TestDb::new("pages_month");
    let (cfg, store) = migrated(&db, "").await;
    let pair = PairKey::parse("spot", "ETHUSDT", "1M").unwrap();
    let mut t = Period::Mo1.align(T2022 - 4 * 365 * DAY); // 2018-01
    let mut model = BTreeMap::new();
    for i in 0..48 {
        // Stored: 2018-01 .. 2019-06, then 2021-02 .. 2021-12.
        if !(18..37).contains(&i) {
            model.insert(t, synthetic::candle(&pair, t));
        }
        t = Period::Mo1.next_open(t);
    }
    write(&store, &cfg, model.values().cloned().collect()).await;
    let keys: Vec<i64> = model.keys().copied().collect();
    let (first, last) = (keys[0], *keys.last().unwrap());
    let mid_hole = keys[17] + 300 * DAY;
    let starts = [
        None,
        Some(first),
        Some(first + 15 * DAY),
        Some(keys[17]),
        Some(mid_hole),
        Some(last),
    ];
    let ends = [
        None,
        Some(keys[5]),
        Some(mid_hole),
        Some(keys[20]),
        Some(last - 1),
    ];
    let nonempty = check_pages(&store, &pair, &model, &starts, &ends, &[1, 3, 12, 40]).await;
    assert!(nonempty > 50, "most pages hold candles ({nonempty})");
}

// ---- The facade over HTTP, against the simulator ----------------------------------------

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Reply {
    let r = client.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    if status == 200 || status == 400 || status == 503 {
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            ct.as_deref(),
            Some("application/json;charset=UTF-8"),
            "{url}"
        );
    }
    Reply {
        status,
        body: r.text().await.unwrap(),
    }
}

/// Both answers, compared: same status, and the same JSON field by field.
fn same_answer(what: &str, sim: &Reply, ours: &Reply) {
    assert_eq!(
        ours.status, sim.status,
        "{what}: status (facade {}, simulator {})",
        ours.body, sim.body
    );
    let (s, o) = (sim.json(), ours.json());
    match (s.as_array(), o.as_array()) {
        (Some(srows), Some(orows)) => {
            let open = |r: &Value| r[0].as_i64().unwrap();
            let first_difference = srows
                .iter()
                .zip(orows)
                .find(|(a, b)| open(a) != open(b))
                .map(|(a, b)| (open(a), open(b)));
            assert_eq!(
                (orows.len(), first_difference),
                (srows.len(), None),
                "{what}: candles (count; first differing open times: simulator's, facade's)"
            );
            for (srow, orow) in srows.iter().zip(orows) {
                let (sf, of) = (srow.as_array().unwrap(), orow.as_array().unwrap());
                assert_eq!(of.len(), 12, "{what}: 12 fields");
                assert_eq!(of.len(), sf.len(), "{what}: field count");
                for (i, (a, b)) in sf.iter().zip(of).enumerate() {
                    assert_eq!(b, a, "{what}: field {i} of the candle at {}", open(srow));
                }
            }
        }
        _ => assert_eq!(o, s, "{what}"),
    }
}

async fn backfill(cfg: &Config, pair: &PairKey, start: i64, end: i64) -> u64 {
    let req = BackfillRequest {
        market: pair.market.to_string(),
        symbol: pair.symbol.to_string(),
        period: pair.period.to_string(),
        start_ms: start,
        end_ms: end,
        source: Some("rest".to_string()),
    };
    backfill_gap(
        cfg.clone(),
        req,
        ProgressBar::hidden(),
        CancellationToken::new(),
    )
    .await
    .unwrap()
    .rows_written
}

fn query(pair: &PairKey, extra: &str) -> String {
    format!(
        "klines?symbol={}&interval={}{extra}",
        pair.symbol, pair.period
    )
}

/// The simulator with the repository's real spot and USD-M series.
async fn start_sim() -> SimHandle {
    let cfg = SimConfig::default()
        .with_csv_series(
            PairKey::parse("spot", "BTCUSDT", "1h").unwrap(),
            &binance_data("spot/BTCUSDT-1h-2022-01.csv"),
        )
        .unwrap()
        .with_csv_series(
            PairKey::parse("um", "BTCUSDT", "1h").unwrap(),
            &binance_data("um/BTCUSDT-1h-2024-01-01_2025-12-20.csv"),
        )
        .unwrap();
    sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// Stores, through the project's own backfill from the simulator: spot BTCUSDT 1h January 2022
/// (real), um BTCUSDT 1h 2024-01..03 (real), cm BTCUSD_PERP 1h 2024-01..03 and 1d 2021-2022
/// (synthetic). Returns the hourly pairs and their stored ranges `[from, to)`.
async fn store_history(cfg: &Config) -> Vec<(PairKey, i64, i64)> {
    let sets = [
        ("spot", "BTCUSDT", "1h", T2022, T2022 + 31 * DAY),
        ("um", "BTCUSDT", "1h", T2024, T2024 + 91 * DAY),
        ("cm", "BTCUSD_PERP", "1h", T2024, T2024 + 91 * DAY),
        ("cm", "BTCUSD_PERP", "1d", T2022 - 365 * DAY, T2023),
    ];
    let mut out = Vec::new();
    for (market, symbol, period, from, to) in sets {
        let pair = PairKey::parse(market, symbol, period).unwrap();
        let rows = backfill(cfg, &pair, from, to).await;
        let len = pair.period.fixed_ms().unwrap();
        assert_eq!(rows, ((to - from) / len) as u64, "{pair} stored");
        out.push((pair, from, to));
    }
    out
}

/// Every market's klines, with and without startTime/endTime/limit, and Binance's errors: the
/// facade's answers are the simulator's, field by field, for the candles both have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn klines_match_the_simulator_field_by_field() {
    let sim = start_sim().await;
    let db = TestDb::new("facade_vs_sim");
    let (cfg, store) = migrated(&db, &common::sim_binance_yaml(&sim, "")).await;
    let stored = store_history(&cfg).await;
    let base = serve_facade(store.clone()).await;
    let client = reqwest::Client::new();
    let mut compared = 0;
    for (pair, from, to) in &stored {
        let (from, to) = (*from, *to);
        let len = pair.period.fixed_ms().unwrap();
        let max = pair.market.max_klines_limit();
        let last = to - len;
        // COIN-M refuses ranges over 200 days.
        let wide = if pair.market == Market::Cm {
            from.max(last - 199 * DAY)
        } else {
            from
        };
        let cases: Vec<(String, bool)> = vec![
            // (query, whether the answer must hold candles)
            (format!("&startTime={from}"), true),
            (format!("&startTime={}&limit=37", from + 5 * len), true),
            (
                format!("&startTime={wide}&endTime={last}&limit={max}"),
                true,
            ),
            (
                format!("&startTime={}&endTime={}", from + len, from + 20 * len),
                true,
            ),
            (
                format!(
                    "&startTime={}&endTime={}&limit=7",
                    from + len,
                    from + 20 * len
                ),
                true,
            ),
            (
                format!("&startTime={}&endTime={}", from + 1, from + 3 * len - 1),
                true,
            ),
            (format!("&startTime={last}&endTime={last}"), true),
            (format!("&endTime={last}"), true),
            (format!("&endTime={}&limit=10", last - 100 * len + 1), true),
            (format!("&endTime={}&limit={max}", last), true),
            (format!("&startTime={}&limit=1", from + 2 * len), true),
            // Errors.
            (format!("&startTime={from}&limit={}", max + 1), false),
            ("&limit=0".to_string(), false),
            ("&limit=-1".to_string(), false),
            ("&limit=abc".to_string(), false),
            (format!("&startTime={}&endTime={from}", from + 1), false),
            ("&startTime=12x".to_string(), false),
        ];
        for (extra, holds) in cases {
            // COIN-M anchors a page without endTime 200 days after startTime: beyond what is
            // stored of the hourly pair (the daily one covers it).
            let anchored_beyond = pair.market == Market::Cm
                && to - from < quantservice::market::CM_MAX_RANGE_MS
                && !extra.contains("endTime");
            if holds && anchored_beyond {
                continue;
            }
            let q = query(pair, &extra);
            let what = format!("{pair} {q}");
            let prefix = pair.market.rest_prefix();
            let s = get(&client, &format!("{}/{q}", sim.rest_base(pair.market))).await;
            let o = get(&client, &format!("{base}{prefix}/{q}")).await;
            same_answer(&what, &s, &o);
            if holds {
                let n = s.json().as_array().map_or(0, Vec::len);
                assert!(n > 0, "{what}: the simulator's answer holds candles");
                // Both answers lie inside what is stored: the comparison is of stored candles.
                assert!(s.json()[0][0].as_i64().unwrap() >= from, "{what}");
                assert!(s.json()[n - 1][0].as_i64().unwrap() < to, "{what}");
            } else {
                assert_eq!(o.status, 400, "{what}: {}", o.body);
            }
            compared += 1;
        }
    }
    // COIN-M: a range over 200 days; spot: microseconds; errors any market gives.
    let cm = &stored[3].0;
    let sp = &stored[0].0;
    let extra_cases = [
        (
            cm.clone(),
            format!("&startTime={}&endTime={}", T2022 - 300 * DAY, T2022),
        ),
        (cm.clone(), format!("&startTime={}", T2022 - 300 * DAY)),
        (cm.clone(), format!("&endTime={}", T2023 - DAY)),
        (
            sp.clone(),
            format!("&startTime={}&limit=5", (T2022 + 3 * HOUR) * 1000),
        ),
    ];
    for (pair, extra) in extra_cases {
        let q = query(&pair, &extra);
        let s = get(&client, &format!("{}/{q}", sim.rest_base(pair.market))).await;
        let o = get(&client, &format!("{base}{}/{q}", pair.market.rest_prefix())).await;
        same_answer(&format!("{pair} {q}"), &s, &o);
        compared += 1;
    }
    let bad = [
        (Market::Um, "klines?symbol=XRPUSDT&interval=1h", -1121),
        (
            Market::Um,
            "klines?symbol=XRPUSDT&interval=1h&startTime=5&endTime=4",
            -1121,
        ),
        (Market::Spot, "klines?symbol=btcusdt&interval=1h", -1100),
        (Market::Spot, "klines?symbol=BTCUSDT&interval=7m", -1120),
        (Market::Um, "klines?symbol=BTCUSDT&interval=1s", -1120),
        (Market::Cm, "klines?interval=1h", -1102),
        (Market::Cm, "klines?symbol=BTCUSD_PERP", -1102),
        (
            Market::Cm,
            "klines?symbol=BTCUSD_PERP&interval=1h&startTime=0&endTime=17280000001",
            -4088,
        ),
    ];
    for (market, q, code) in bad {
        let s = get(&client, &format!("{}/{q}", sim.rest_base(market))).await;
        let o = get(&client, &format!("{base}{}/{q}", market.rest_prefix())).await;
        same_answer(&format!("{market} {q}"), &s, &o);
        assert_eq!(o.json()["code"], code, "{market} {q}: {}", o.body);
        compared += 1;
    }
    assert!(compared > 70);
}

/// With neither startTime nor endTime, both serve the newest candles, the open one included:
/// monthly candles (the simulator's in-progress month changes every ~40 minutes) with the open
/// month stored exactly as the simulator printed it. If the simulator's open candle moved on
/// between the store and the comparison, the round is done again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_pages_with_the_open_candle_match_the_simulator() {
    let sim = start_sim().await;
    let db = TestDb::new("facade_newest");
    let (cfg, store) = migrated(&db, &common::sim_binance_yaml(&sim, "")).await;
    let base = serve_facade(store.clone()).await;
    let client = reqwest::Client::new();
    for (market, symbol) in [
        (Market::Spot, "BTCUSDT"),
        (Market::Um, "ETHUSDT"),
        (Market::Cm, "BTCUSD_PERP"),
    ] {
        let pair = PairKey::parse(market.as_str(), symbol, "1M").unwrap();
        let open_month = Period::Mo1.align(sim::now_ms());
        let stored = backfill(&cfg, &pair, sim::DEFAULT_LISTING_MS, open_month).await;
        assert!(stored > 20, "{pair}: {stored} months");
        let q = query(&pair, "&limit=1000");
        let sim_url = format!("{}/{q}", sim.rest_base(market));
        let our_url = format!("{base}{}/{q}", market.rest_prefix());
        let default_q = query(&pair, "");
        let sim_default = format!("{}/{default_q}", sim.rest_base(market));
        let our_default = format!("{base}{}/{default_q}", market.rest_prefix());
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(
                rounds <= 3,
                "{pair}: the simulator's open candle kept moving"
            );
            // Store the open candle exactly as the simulator prints it.
            let before = get(&client, &sim_url).await;
            let row = before.json().as_array().unwrap().last().unwrap().clone();
            let fields: Vec<String> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect();
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            let open = Kline::from_fields(
                pair.clone(),
                &fields,
                false,
                quantservice::market::Source::Ws,
            )
            .unwrap();
            assert_eq!(open.open_time, open_month, "{pair}: the open month is last");
            write(&store, &cfg, vec![open]).await;
            let ours = get(&client, &our_url).await;
            let ours_default = get(&client, &our_default).await;
            let after = get(&client, &sim_url).await;
            let after_default = get(&client, &sim_default).await;
            if after.body != before.body || after_default.body != before.body {
                continue; // the open candle moved on meanwhile
            }
            same_answer(&format!("{pair} {q}"), &after, &ours);
            same_answer(
                &format!("{pair} {default_q}"),
                &after_default,
                &ours_default,
            );
            let n = ours.json().as_array().unwrap().len() as u64;
            if market == Market::Cm {
                // COIN-M: the last 200 days only.
                assert!((6..=8).contains(&n), "{pair}: {n} months");
            } else {
                assert_eq!(n, stored + 1, "{pair}: every stored month and the open one");
            }
            break;
        }
    }
}

/// exchangeInfo lists stored and declared symbols per market; ping and time answer like
/// Binance's; a declared symbol with nothing stored pages as empty, an unknown one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_info_ping_and_time() {
    let db = TestDb::new("facade_info");
    let (cfg, store) = migrated(&db, "").await;
    let spot = PairKey::parse("spot", "ETHBTC", "1h").unwrap();
    let cm = PairKey::parse("cm", "ETHUSD_PERP", "1d").unwrap();
    write(
        &store,
        &cfg,
        vec![
            synthetic::candle(&spot, T2023),
            synthetic::candle(&cm, T2023),
        ],
    )
    .await;
    db.sql(
        "INSERT INTO trading_pairs (market, symbol, period) VALUES \
         ('spot', 'SOLUSDT', '1m'), ('um', 'BNBUSDT', '1h'), ('cm', 'BTCUSD_250328', '1d')",
    );
    let base = serve_facade(store).await;
    let client = reqwest::Client::new();
    let listed = |v: &Value| -> Vec<String> {
        v["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["symbol"].as_str().unwrap().to_string())
            .collect()
    };
    for (market, want) in [
        (Market::Spot, vec!["ETHBTC", "SOLUSDT"]),
        (Market::Um, vec!["BNBUSDT"]),
        (Market::Cm, vec!["BTCUSD_250328", "ETHUSD_PERP"]),
    ] {
        let prefix = market.rest_prefix();
        let before = sim::now_ms();
        let info = get(&client, &format!("{base}{prefix}/exchangeInfo")).await;
        assert_eq!(info.status, 200, "{}", info.body);
        let v = info.json();
        assert_eq!(listed(&v), want, "{market}");
        assert_eq!(v["timezone"], "UTC");
        assert!(v["serverTime"].as_i64().unwrap() >= before);
        assert_eq!(v["rateLimits"], serde_json::json!([]));
        let one = get(
            &client,
            &format!("{base}{prefix}/exchangeInfo?symbol={}", want[0]),
        )
        .await;
        assert_eq!(listed(&one.json()), vec![want[0]], "{market}");
        let unknown = get(
            &client,
            &format!("{base}{prefix}/exchangeInfo?symbol=DOGEUSDT"),
        )
        .await;
        assert_eq!(
            (unknown.status, unknown.json()["code"].clone()),
            (400, (-1121).into())
        );

        let ping = get(&client, &format!("{base}{prefix}/ping")).await;
        assert_eq!((ping.status, ping.body.as_str()), (200, "{}"));
        let time = get(&client, &format!("{base}{prefix}/time")).await;
        let t = time.json()["serverTime"].as_i64().unwrap();
        assert!((before..=sim::now_ms()).contains(&t), "{t}");
    }
    // Declared, nothing stored: an empty page. Stored: the candle. Unknown: -1121.
    let r = get(
        &client,
        &format!("{base}/api/v3/klines?symbol=SOLUSDT&interval=1m"),
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
    let r = get(
        &client,
        &format!("{base}/api/v3/klines?symbol=ETHBTC&interval=1h"),
    )
    .await;
    assert_eq!(r.json()[0][0], T2023);
    let r = get(
        &client,
        &format!("{base}/api/v3/klines?symbol=ETHBTC&interval=1m"),
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "[]"),
        "known symbol, other period"
    );
    let r = get(
        &client,
        &format!("{base}/fapi/v1/klines?symbol=ETHBTC&interval=1h"),
    )
    .await;
    assert_eq!(r.json()["code"], -1121, "known on spot only: {}", r.body);
}

/// ClickHouse down: 503 with Binance's error shape and a clear message, nothing leaked, no
/// panic; parameter errors and ping still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_is_a_503() {
    let db = TestDb::new("facade_down");
    let mut cfg = db.config("");
    cfg.clickhouse.port = common::dead_port();
    let store = Store::new(&cfg.clickhouse).unwrap();
    let base = serve_facade(store).await;
    let client = reqwest::Client::new();
    for path in [
        "/api/v3/klines?symbol=BTCUSDT&interval=1m",
        "/fapi/v1/klines?symbol=BTCUSDT&interval=1m&startTime=0",
        "/dapi/v1/klines?symbol=BTCUSD_PERP&interval=1m&startTime=5&endTime=4",
        "/api/v3/exchangeInfo",
    ] {
        let r = get(&client, &format!("{base}{path}")).await;
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        let v = r.json();
        assert_eq!(v["code"], -1001, "{path}");
        let msg = v["msg"].as_str().unwrap();
        assert!(msg.contains("ClickHouse database is unavailable"), "{msg}");
        assert!(
            !msg.contains("127.0.0.1"),
            "no internals in the answer: {msg}"
        );
    }
    // Parameter errors need no database.
    let r = get(
        &client,
        &format!("{base}/api/v3/klines?symbol=BTCUSDT&interval=2m"),
    )
    .await;
    assert_eq!((r.status, r.json()["code"].clone()), (400, (-1120).into()));
    let r = get(&client, &format!("{base}/api/v3/ping")).await;
    assert_eq!(r.status, 200);
}

// ---- ccxt ------------------------------------------------------------------------------

const CCXT_HINT: &str = "This test runs the PyPI package ccxt (an unmodified Binance client) \
    against the facade: run scripts/install-deps (it installs ccxt for python3), or \
    `python3 -m pip install ccxt`.";

/// Runs tests/ccxt_ohlcv.py with `args`; its stdout is JSON.
fn run_ccxt(args: &[String]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ccxt_ohlcv.py");
    let probe = Command::new("python3")
        .args(["-c", "import ccxt"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}). {CCXT_HINT}"));
    assert!(
        probe.status.success(),
        "python3 cannot import ccxt: {}\n{CCXT_HINT}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// ccxt's `fetch_ohlcv` pointed at the facade (binance for spot, USD-M and COIN-M, and
/// binanceusdm) returns exactly the candles ClickHouse stores: every open time, price and
/// volume digit for digit (ccxt's COIN-M volume is the base-asset volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ccxt_reads_the_stored_candles() {
    let sim = start_sim().await;
    let db = TestDb::new("facade_ccxt");
    let (cfg, store) = migrated(&db, &common::sim_binance_yaml(&sim, "")).await;
    let stored = store_history(&cfg).await;
    let base = serve_facade(store.clone()).await;
    let cases = [
        ("binance", "BTC/USDT", &stored[0].0, T2022 + 7 * HOUR, 100),
        (
            "binance",
            "BTC/USDT:USDT",
            &stored[1].0,
            T2024 + 50 * HOUR,
            500,
        ),
        (
            "binance",
            "BTC/USD:BTC",
            &stored[2].0,
            T2024 + 3 * HOUR,
            200,
        ),
        (
            "binanceusdm",
            "BTC/USDT:USDT",
            &stored[1].0,
            T2024 + 900 * HOUR,
            1000,
        ),
    ];
    for (exchange, symbol, pair, since, limit) in cases {
        let got = run_ccxt(&[
            base.clone(),
            exchange.to_string(),
            symbol.to_string(),
            pair.period.to_string(),
            since.to_string(),
            limit.to_string(),
        ]);
        let want = store
            .klines(pair, since, since + i64::from(limit) * HOUR)
            .await
            .unwrap();
        assert_eq!(want.len(), limit as usize, "{pair}: stored");
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{exchange} {symbol}: candles");
        for (g, k) in got.iter().zip(&want) {
            let what = format!("{exchange} {symbol} at {}", k.open_time);
            assert_eq!(g[0].as_i64(), Some(k.open_time), "{what}");
            let volume = if pair.market == Market::Cm {
                k.quote_volume
            } else {
                k.volume
            };
            for (i, d) in [k.open, k.high, k.low, k.close, volume].iter().enumerate() {
                let text = g[i + 1].as_str().unwrap();
                assert_eq!(
                    text.parse::<Decimal>().unwrap(),
                    *d,
                    "{what}: field {}",
                    i + 1
                );
            }
        }
    }
}
