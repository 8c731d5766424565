//! The batched writer against real ClickHouse servers: no row lost when the server is killed
//! mid-stream and restarted, shutdown flushes, back-pressure instead of unbounded memory, and a
//! loud error (never silent loss) when the shutdown deadline passes with the server down.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ChServer, TestDb};
use futures_util::FutureExt;
use quantservice::market::{Decimal, Kline, PairKey, Source};
use quantservice::store::migrate;
use quantservice::store::writer::{IndicatorValue, Writer, WriterError};
use quantservice::store::Store;
use tokio_util::sync::CancellationToken;

/// Deterministic synthetic candle `i` of a pair (prices with 8 decimals to exercise exactness).
fn candle(pair: &PairKey, i: i64) -> Kline {
    let d = |m: i128| Decimal::from_mantissa(m);
    let base = 4_200_000_000_000 + i128::from(i) * 12_345_678;
    Kline {
        pair: pair.clone(),
        open_time: 1_600_000_000_000 + i * 60_000,
        close_time: 1_600_000_000_000 + i * 60_000 + 59_999,
        open: d(base),
        high: d(base + 99_999_999),
        low: d(base - 77_777_777),
        close: d(base + 1),
        volume: d(123_456_789 + i128::from(i)),
        quote_volume: d(987_654_321_000 + i128::from(i)),
        trades: 1000 + i as u64,
        taker_buy_volume: d(61_728_394),
        taker_buy_quote_volume: d(493_827_160_500),
        is_final: true,
        source: Source::Rest,
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_row_is_lost_when_clickhouse_is_killed_mid_stream_and_restarted() {
    let server = Arc::new(ChServer::start());
    let db = TestDb::on_server(&server, "outage");
    let cfg = db.config(
        "  writer:\n    batch_rows: 500\n    flush_interval: 50ms\n    channel_capacity: 2000\n    max_backoff: 300ms\n",
    );
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();

    let pairs = [
        PairKey::parse("spot", "BTCUSDT", "1m").unwrap(),
        PairKey::parse("um", "ETHUSDT", "1m").unwrap(),
    ];
    const PER_PAIR: i64 = 10_000;
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let writer_task = tokio::spawn(writer.run(CancellationToken::new()));
    let producer = {
        let handle = handle.clone();
        let pairs = pairs.clone();
        tokio::spawn(async move {
            for i in 0..PER_PAIR {
                for p in &pairs {
                    handle.send(candle(p, i)).await.unwrap();
                }
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    // Kill the server once some batches are in, while the producer is still busy.
    wait_until("first rows written", || {
        handle.stats().rows_written() >= 2_000
    })
    .await;
    let killed_at = handle.stats().rows_written();
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.kill()).await.unwrap();
    wait_until("inserts failing", || handle.stats().insert_failures() >= 2).await;
    assert!(
        handle.stats().rows_written() < 2 * PER_PAIR as u64,
        "the outage must hit while rows are still flowing"
    );
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.restart())
        .await
        .unwrap();

    producer.await.unwrap();
    drop(handle);
    let summary = writer_task.await.unwrap().unwrap();
    assert!(summary.insert_failures >= 2, "{summary:?}");
    assert!(
        summary.rows_written >= 2 * PER_PAIR as u64,
        "{summary:?} (killed at {killed_at})"
    );

    // Every candle exactly once, exactly as sent.
    for p in &pairs {
        let stored = store.klines(p, 0, i64::MAX).await.unwrap();
        let expected: Vec<Kline> = (0..PER_PAIR).map(|i| candle(p, i)).collect();
        assert_eq!(stored.len(), expected.len(), "{p}");
        assert!(
            stored == expected,
            "{p}: stored rows differ from the rows sent"
        );
    }
    assert_eq!(
        db.sql(
            "SELECT count() FROM (SELECT DISTINCT market, symbol, period, open_time FROM klines)"
        ),
        format!("{}\n", 2 * PER_PAIR)
    );
}

/// Indicator values go through the same channel and retries as klines: none lost either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_indicator_value_is_lost_when_clickhouse_is_killed_and_restarted() {
    let server = Arc::new(ChServer::start());
    let db = TestDb::on_server(&server, "ind_outage");
    let cfg = db.config(
        "  writer:\n    batch_rows: 500\n    flush_interval: 50ms\n    channel_capacity: 2000\n    max_backoff: 300ms\n",
    );
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    let pair = PairKey::parse("um", "ETHUSDT", "1m").unwrap();
    const N: i64 = 8_000;
    let name: Arc<str> = Arc::from("macd(12,26,9)");
    let value = |i: i64, o: usize| (i as f64).sqrt() * 1.000_000_1 + o as f64 / 3.0;
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let writer_task = tokio::spawn(writer.run(CancellationToken::new()));
    let producer = {
        let handle = handle.clone();
        let pair = pair.clone();
        let name = name.clone();
        tokio::spawn(async move {
            for chunk in 0..N / 100 {
                let mut values = Vec::new();
                for i in chunk * 100..(chunk + 1) * 100 {
                    handle.send(candle(&pair, i)).await.unwrap();
                    for (o, output) in ["macd", "signal", "hist"].into_iter().enumerate() {
                        values.push(IndicatorValue {
                            pair: pair.clone(),
                            open_time: candle(&pair, i).open_time,
                            indicator: name.clone(),
                            output,
                            value: value(i, o),
                        });
                    }
                }
                handle.send_indicators(values).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    wait_until("first values written", || {
        handle.stats().indicator_rows_written() >= 3_000
    })
    .await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.kill()).await.unwrap();
    wait_until("inserts failing", || handle.stats().insert_failures() >= 2).await;
    assert!(
        handle.stats().indicator_rows_written() < 3 * N as u64,
        "the outage must hit while values are still flowing"
    );
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.restart())
        .await
        .unwrap();
    producer.await.unwrap();
    drop(handle);
    let summary = writer_task.await.unwrap().unwrap();
    assert!(summary.insert_failures >= 2, "{summary:?}");
    assert!(
        summary.indicator_rows_written >= 3 * N as u64,
        "{summary:?}"
    );

    let rows: Vec<(i64, String, String, f64)> = store
        .client()
        .query(
            "SELECT open_time, indicator, output, value FROM indicators FINAL \
             ORDER BY open_time, output",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 3 * N as usize);
    for (j, (t, ind, output, v)) in rows.iter().enumerate() {
        let i = j as i64 / 3;
        assert_eq!(*t, candle(&pair, i).open_time);
        assert_eq!(ind, "macd(12,26,9)");
        // Sorted by name: hist, macd, signal.
        let o = match output.as_str() {
            "macd" => 0,
            "signal" => 1,
            _ => 2,
        };
        assert_eq!(v.to_bits(), value(i, o).to_bits(), "{t} {output}");
    }
    assert_eq!(
        db.sql("SELECT count() FROM indicators_ethusdt_um_1m")
            .trim(),
        (3 * N).to_string()
    );
    assert_eq!(
        store.klines(&pair, 0, i64::MAX).await.unwrap().len(),
        N as usize
    );
}

/// Batches of indicator values alone go in flight (the next batch is taken while the server
/// finishes one): across an outage none is lost, and a value recomputed later (a late candle)
/// still wins over the first computation when that one's insert had to be retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_indicator_inserts_lose_nothing_and_later_values_win() {
    let server = Arc::new(ChServer::start());
    let db = TestDb::on_server(&server, "ind_in_flight");
    let cfg = db.config(
        "  writer:\n    batch_rows: 400\n    flush_interval: 50ms\n    channel_capacity: 400\n    max_backoff: 300ms\n",
    );
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    let pair = PairKey::parse("um", "ETHUSDT", "1m").unwrap();
    const N: i64 = 6_000;
    let name: Arc<str> = Arc::from("rsi(14)");
    // First computation: `first(i)`; every third value is then recomputed as `second(i)`.
    let first = |i: i64| (i as f64).sqrt() * 1.000_000_1;
    let second = |i: i64| -(i as f64) / 7.0;
    let value = move |pair: &PairKey, i: i64, v: f64| IndicatorValue {
        pair: pair.clone(),
        open_time: candle(pair, i).open_time,
        indicator: name.clone(),
        output: "value",
        value: v,
    };
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let writer_task = tokio::spawn(writer.run(CancellationToken::new()));
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let producer = {
        let (handle, pair) = (handle.clone(), pair.clone());
        tokio::spawn(async move {
            let mut killed = Some(killed_rx);
            for chunk in 0..N / 200 {
                let mut values: Vec<IndicatorValue> = (chunk * 200..(chunk + 1) * 200)
                    .map(|i| value(&pair, i, first(i)))
                    .collect();
                // The recomputation of the previous chunk's every third value.
                values.extend(
                    ((chunk - 1) * 200..chunk * 200)
                        .filter(|i| *i >= 0 && i % 3 == 0)
                        .map(|i| value(&pair, i, second(i))),
                );
                handle.send_indicators(values).await.unwrap();
                if chunk == N / 400 {
                    // Halfway: the rest is sent into the outage.
                    killed.take().unwrap().await.unwrap();
                }
            }
            let tail = ((N / 200 - 1) * 200..N).filter(|i| i % 3 == 0);
            let values = tail.map(|i| value(&pair, i, second(i))).collect();
            handle.send_indicators(values).await.unwrap();
        })
    };
    wait_until("first values written", || {
        handle.stats().indicator_rows_written() >= 1_000
    })
    .await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.kill()).await.unwrap();
    // The producer waits at halfway until now: the second half is sent into the outage.
    killed_tx.send(()).unwrap();
    wait_until("inserts failing", || handle.stats().insert_failures() >= 2).await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.restart())
        .await
        .unwrap();
    producer.await.unwrap();
    drop(handle);
    let summary = writer_task.await.unwrap().unwrap();
    assert!(summary.insert_failures >= 2, "{summary:?}");

    let rows: Vec<(i64, f64)> = store
        .client()
        .query("SELECT open_time, value FROM indicators FINAL ORDER BY open_time")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows.len(), N as usize);
    for (i, (t, v)) in rows.iter().enumerate() {
        let i = i as i64;
        assert_eq!(*t, candle(&pair, i).open_time);
        let want = if i % 3 == 0 { second(i) } else { first(i) };
        assert_eq!(v.to_bits(), want.to_bits(), "value at {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_wait_for_size_or_interval_and_cancellation_flushes_them() {
    let db = TestDb::new("shutdown");
    // Neither the size nor the interval trigger fires for these rows: only shutdown flushes.
    let cfg = db.config(
        "  writer:\n    batch_rows: 100000\n    flush_interval: 1h\n    channel_capacity: 5000\n",
    );
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let (writer, handle) = Writer::new(store.clone(), cfg.writer);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(writer.run(cancel.clone()));
    for i in 0..1234 {
        handle.send(candle(&pair, i)).await.unwrap();
    }
    // The writer has taken every row into its batch (the channel is empty again)...
    wait_until("rows taken by the writer", || {
        handle.free_capacity() == 5000
    })
    .await;
    // ...and holds them: the first row does not trigger an early flush.
    tokio::task::yield_now().await;
    assert_eq!(handle.stats().rows_written(), 0);
    assert_eq!(handle.stats().batches_written(), 0);
    cancel.cancel();
    let summary = task.await.unwrap().unwrap();
    assert_eq!(summary.rows_written, 1234);
    assert_eq!(store.klines(&pair, 0, i64::MAX).await.unwrap().len(), 1234);
    // After shutdown the writer takes no more rows, and hands the row back.
    let err = handle.send(candle(&pair, 9999)).await.unwrap_err();
    assert_eq!(err.0.open_time, candle(&pair, 9999).open_time);
}

#[tokio::test]
async fn a_partial_batch_is_flushed_after_the_interval_not_before() {
    let db = TestDb::new("interval");
    let cfg = db.config("  writer:\n    batch_rows: 100000\n    flush_interval: 700ms\n");
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    let pair = PairKey::parse("spot", "BNBBTC", "1m").unwrap();
    let (writer, handle) = Writer::new(store.clone(), cfg.writer);
    let task = tokio::spawn(writer.run(CancellationToken::new()));
    let started = tokio::time::Instant::now();
    for i in 0..10 {
        handle.send(candle(&pair, i)).await.unwrap();
    }
    wait_until("the partial batch", || handle.stats().rows_written() == 10).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(700),
        "flushed after {waited:?}, before the 700ms interval"
    );
    assert_eq!(handle.stats().batches_written(), 1);
    drop(handle);
    assert_eq!(task.await.unwrap().unwrap().rows_written, 10);
}

#[tokio::test]
async fn back_pressure_then_loud_error_when_clickhouse_stays_down_at_shutdown() {
    // A port nobody listens on: every insert fails (retryable).
    let port = common::dead_port();
    let db_cfg = format!(
        "app:\n  clickhouse:\n    host: 127.0.0.1\n    port: {port}\n  writer:\n    batch_rows: 5\n    flush_interval: 10ms\n    channel_capacity: 10\n    max_backoff: 50ms\n    shutdown_timeout: 300ms\n"
    );
    let cfg = quantservice::config::Config::from_yaml_with_env(
        &db_cfg,
        std::path::Path::new("t.yaml"),
        |_| None,
    )
    .unwrap();
    let store = Store::new(&cfg.clickhouse).unwrap();
    let pair = PairKey::parse("spot", "ETHBTC", "1m").unwrap();
    let (writer, handle) = Writer::new(store, cfg.writer);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(writer.run(cancel.clone()));

    // 5 rows in the failing batch + 10 in the channel; then producers must wait.
    for i in 0..15 {
        handle.send(candle(&pair, i)).await.unwrap();
    }
    wait_until("channel full", || handle.free_capacity() == 0).await;
    wait_until("inserts failing", || handle.stats().insert_failures() >= 1).await;
    assert!(
        handle.send(candle(&pair, 15)).now_or_never().is_none(),
        "a full writer must hold producers back"
    );

    cancel.cancel();
    match task.await.unwrap() {
        Err(WriterError::Unflushed { rows, last_error }) => {
            assert_eq!(rows, 15, "every unwritten row is counted");
            assert!(last_error.is_retryable(), "{last_error}");
        }
        other => panic!("expected Unflushed, got {other:?}"),
    }
}
