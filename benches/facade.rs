//! REST facade benchmark (issue 11, §6): requests/s for 1000-candle pages from the facade
//! (`GET /fapi/v1/klines?…&startTime=…&limit=1000`, served in-process over loopback HTTP) against
//! ClickHouse's own HTTP interface answering the equivalent query (the same primary-key window,
//! `FINAL`, `ORDER BY open_time LIMIT 1000 FORMAT JSONCompact`), with N concurrent keep-alive
//! clients asking for pages at random start times. Also shown: the naive query without the
//! window (`FINAL … WHERE open_time >= X ORDER BY open_time LIMIT 1000`), which 18.16 answers
//! by merging every row after X.
//!
//! Data: `QS_BENCH_ROWS` (default 525,600: one year) um BTCUSDT 1m synthetic candles written
//! through the writer, then `OPTIMIZE … FINAL` (both sides read the same merged parts).
//! Each cell is the median of `QS_BENCH_RUNS` (default 3) runs of `QS_BENCH_SECONDS` (default
//! 3) seconds, the sides interleaved; `QS_BENCH_CLIENTS` lists the concurrencies (default
//! `1,8,32`).
//!
//! Run: `cargo bench --bench facade` (starts a private ClickHouse; the chdb lane with
//! `QS_TEST_CLICKHOUSE_ENGINE=chdb`).
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

#[path = "../tests/common/mod.rs"]
mod common;

use common::median;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDb;
use qs_sim::synthetic;
use quantservice::market::PairKey;
use quantservice::server::facade;
use quantservice::store::writer::Writer;
use quantservice::store::Store;
use rand::Rng;
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000;
/// 2023-01-01T00:00Z, the first stored candle.
const FIRST: i64 = 1_672_531_200_000;
const PAGE: i64 = 1000;

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Which server answers, and how.
#[derive(Clone, Copy)]
enum Side {
    Facade,
    ClickHouse,
    ClickHouseNaive,
}

/// One request for the page starting at `start`; returns its body.
async fn request(
    client: &reqwest::Client,
    side: Side,
    facade: &str,
    clickhouse: &str,
    start: i64,
) -> String {
    let resp = match side {
        Side::Facade => client
            .get(format!(
                "{facade}/fapi/v1/klines?symbol=BTCUSDT&interval=1m&startTime={start}&limit={PAGE}"
            ))
            .send()
            .await
            .unwrap(),
        Side::ClickHouse | Side::ClickHouseNaive => {
            let window = match side {
                Side::ClickHouse => format!("AND open_time <= {}", start + PAGE * MIN - 1),
                _ => String::new(),
            };
            let sql = format!(
                "SELECT open_time, open, high, low, close, volume, close_time, quote_volume, \
                 trades, taker_buy_volume, taker_buy_quote_volume FROM klines FINAL \
                 WHERE market = 'um' AND symbol = 'BTCUSDT' AND period = '1m' \
                 AND open_time >= {start} {window} ORDER BY open_time LIMIT {PAGE} \
                 FORMAT JSONCompact"
            );
            client.post(clickhouse).body(sql).send().await.unwrap()
        }
    };
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.text().await.unwrap()
}

/// Requests/s of `clients` concurrent clients for `secs` seconds.
async fn run(
    side: Side,
    clients: usize,
    secs: f64,
    facade: &str,
    clickhouse: &str,
    rows: i64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (done, stop) = (done.clone(), stop.clone());
            let (facade, clickhouse) = (facade.to_string(), clickhouse.to_string());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    // A start with a whole page after it.
                    let i = rand::rng().random_range(0..rows - PAGE);
                    request(&client, side, &facade, &clickhouse, FIRST + i * MIN).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let rows: i64 = env_num("QS_BENCH_ROWS", 525_600);
    let runs: usize = env_num("QS_BENCH_RUNS", 3);
    let secs: f64 = env_num("QS_BENCH_SECONDS", 3.0);
    let concurrency: Vec<usize> = std::env::var("QS_BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,8,32".to_string())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();

    let db = TestDb::new("bench_facade");
    let cfg = db.config("  writer:\n    batch_rows: 50000\n    flush_interval: 200ms\n");
    quantservice::app::migrate(&cfg).await.unwrap();
    let store = Store::new(&cfg.clickhouse).unwrap();
    let version = store.server_version().await.unwrap();
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let t = Instant::now();
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let writing = tokio::spawn(writer.run(CancellationToken::new()));
    for i in 0..rows {
        handle
            .send(synthetic::candle(&pair, FIRST + i * MIN))
            .await
            .unwrap();
    }
    drop(handle);
    writing.await.unwrap().unwrap();
    db.sql("OPTIMIZE TABLE klines FINAL");
    eprintln!(
        "loaded {rows} candles in {:.1} s (ClickHouse {version})",
        t.elapsed().as_secs_f64()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let facade_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, facade::router(store)).await });
    let clickhouse_url = format!(
        "http://{}:{}/?database={}",
        db.host,
        db.port,
        common::percent_encode(&db.name)
    );

    // The same page both ways, to be sure both answer 1000 candles.
    let client = reqwest::Client::new();
    let ours = request(&client, Side::Facade, &facade_url, &clickhouse_url, FIRST).await;
    let page: serde_json::Value = serde_json::from_str(&ours).unwrap();
    assert_eq!(page.as_array().unwrap().len(), PAGE as usize);
    let theirs = request(
        &client,
        Side::ClickHouse,
        &facade_url,
        &clickhouse_url,
        FIRST,
    )
    .await;
    let theirs: serde_json::Value = serde_json::from_str(&theirs).unwrap();
    assert_eq!(theirs["rows"], PAGE);

    println!(
        "REST facade vs ClickHouse HTTP, 1000-candle pages at random starts over {rows} stored \
         candles, ClickHouse {version}, requests/s (median of {runs} runs of {secs} s)\n"
    );
    println!("| clients | facade | ClickHouse HTTP, same window | facade / ClickHouse | ClickHouse HTTP, naive `ORDER BY … LIMIT` |");
    println!("|---|---|---|---|---|");
    for &clients in &concurrency {
        let (mut f, mut c, mut n) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            f.push(
                run(
                    Side::Facade,
                    clients,
                    secs,
                    &facade_url,
                    &clickhouse_url,
                    rows,
                )
                .await,
            );
            c.push(
                run(
                    Side::ClickHouse,
                    clients,
                    secs,
                    &facade_url,
                    &clickhouse_url,
                    rows,
                )
                .await,
            );
            n.push(
                run(
                    Side::ClickHouseNaive,
                    clients,
                    secs,
                    &facade_url,
                    &clickhouse_url,
                    rows,
                )
                .await,
            );
        }
        let (f, c, n) = (median(&mut f), median(&mut c), median(&mut n));
        println!("| {clients} | {f:.0} | {c:.0} | {:.2}× | {n:.1} |", f / c);
    }
}
