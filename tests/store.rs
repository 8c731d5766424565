//! ClickHouse store against a real server: migrations (twice), the users' INSERT statements,
//! exact decimal round-trips of real Binance data through the writer, per-pair views and the
//! ReplacingMergeTree version rules.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::{binance_data, TestDb};
use quantservice::market::{Decimal, Kline, PairKey, Source};
use quantservice::store::migrate::{self, MIGRATIONS};
use quantservice::store::writer::Writer;
use quantservice::store::Store;
use tokio_util::sync::CancellationToken;

const FAST_WRITER: &str = "  writer:\n    batch_rows: 5000\n    flush_interval: 100ms\n";

async fn migrated(db: &TestDb) -> Store {
    let store = Store::new(&db.config("").clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    store
}

/// Reads a Binance kline CSV (header optional) into klines, keeping the raw text rows.
fn load_csv(rel: &str, pair: &PairKey) -> (Vec<Kline>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(binance_data(rel)).unwrap();
    let mut klines = Vec::new();
    let mut raw = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').collect();
        if fields[0].parse::<i64>().is_err() {
            continue; // header
        }
        klines.push(Kline::from_fields(pair.clone(), &fields, true, Source::Archive).unwrap());
        raw.push(fields.iter().map(|s| s.to_string()).collect());
    }
    (klines, raw)
}

async fn write_all(store: &Store, db: &TestDb, rows: Vec<Kline>) -> u64 {
    let cfg = db.config(FAST_WRITER);
    let (writer, handle) = Writer::new(store.clone(), cfg.writer);
    let task = tokio::spawn(writer.run(CancellationToken::new()));
    for k in rows {
        handle.send(k).await.unwrap();
    }
    drop(handle);
    task.await.unwrap().unwrap().rows_written
}

#[tokio::test]
async fn migrations_apply_once_and_rerun_as_no_op() {
    let db = TestDb::new("migrate");
    let store = Store::new(&db.config("").clickhouse).unwrap();

    let first = migrate::run(&store).await.unwrap();
    let version = first.server_version.unwrap();
    // On 18.16 the newer-server improvements are skipped (and applied after an upgrade).
    let expected: Vec<&str> = MIGRATIONS
        .iter()
        .filter(|m| m.requires().is_none_or(|min| version >= min))
        .map(|m| m.name)
        .collect();
    let skipped: Vec<&str> = MIGRATIONS
        .iter()
        .filter(|m| !expected.contains(&m.name))
        .map(|m| m.name)
        .collect();
    assert!(expected.contains(&"0001_init.sql"));
    assert_eq!(first.applied, expected);
    assert_eq!(first.skipped, skipped);

    let second = migrate::run(&store).await.unwrap();
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.already, expected);
    assert_eq!(
        second.applied.len() + second.already.len() + second.skipped.len(),
        MIGRATIONS.len()
    );

    let tables = db.sql(&format!(
        "SELECT name FROM system.tables WHERE database = '{}' ORDER BY name",
        db.name
    ));
    assert_eq!(
        tables.lines().collect::<Vec<_>>(),
        vec![
            "backtest_results",
            "backtest_trades",
            "exchange_gaps",
            "indicator_checkpoints",
            "indicator_status",
            "indicators",
            "klines",
            "pair_status",
            "partition_maintenance",
            "proxy_config",
            "proxy_status",
            "schema_migrations",
            "task_status",
            "trading_pairs"
        ]
    );
    let recorded: Vec<String> = MIGRATIONS
        .iter()
        .filter(|m| expected.contains(&m.name))
        .map(|m| format!("{}\t{}\n", m.version, m.name))
        .collect();
    assert_eq!(
        db.sql("SELECT version, name FROM schema_migrations ORDER BY version"),
        recorded.concat()
    );
    let engine = db.sql(&format!(
        "SELECT engine, sorting_key FROM system.tables WHERE database = '{}' AND name = 'klines'",
        db.name
    ));
    assert!(engine.starts_with("ReplacingMergeTree"), "{engine}");
    if expected.contains(&"0002_newer_server_improvements.sql") {
        // Newer servers really got the improvements (TSV escapes the quotes).
        let columns = db.sql(&format!(
            "SELECT name, type, default_kind, compression_codec FROM system.columns \
             WHERE database = '{}' AND table = 'klines' \
             AND name IN ('open_dt', 'close_dt', 'source', 'close_time') ORDER BY name",
            db.name
        ));
        assert_eq!(
            columns,
            "close_dt\tDateTime64(3, \\'UTC\\')\tALIAS\t\n\
             close_time\tInt64\t\tCODEC(DoubleDelta, ZSTD(1))\n\
             open_dt\tDateTime64(3, \\'UTC\\')\tALIAS\t\n\
             source\tLowCardinality(String)\t\t\n"
        );
    }
}

#[tokio::test]
async fn users_insert_statements_work_verbatim() {
    let db = TestDb::new("inserts");
    migrated(&db).await;

    db.sql("INSERT INTO trading_pairs (market, symbol, period) VALUES ('um','BTCUSDT','1m')");
    assert_eq!(
        db.sql("SELECT market, symbol, period, enabled, backfill_from, stream, indicators, updated_at > toDateTime('2020-01-01 00:00:00') FROM trading_pairs FINAL"),
        "um\tBTCUSDT\t1m\t1\t0\t1\t\t1\n"
    );
    // The latest row per (market, symbol, period) wins.
    db.sql("INSERT INTO trading_pairs (market, symbol, period, enabled, updated_at) VALUES ('um','BTCUSDT','1m', 0, now() + 1)");
    assert_eq!(
        db.sql("SELECT enabled FROM trading_pairs FINAL WHERE symbol = 'BTCUSDT'"),
        "0\n"
    );

    db.sql("INSERT INTO proxy_config (host, port, username, password, enabled, created_at) VALUES ('proxy.example.com', 1080, 'user', 'pass', 1, now());");
    assert_eq!(
        db.sql("SELECT host, port, username, password, enabled FROM proxy_config FINAL"),
        "proxy.example.com\t1080\tuser\tpass\t1\n"
    );
    db.sql("INSERT INTO proxy_config (host, port, username, password, enabled, created_at) VALUES ('proxy.example.com', 1080, 'user', 'pass', 0, now() + 1);");
    assert_eq!(
        db.sql("SELECT count(), any(enabled) FROM proxy_config FINAL"),
        "1\t0\n"
    );

    db.sql("INSERT INTO pair_status (market, symbol, period, phase) VALUES ('um','BTCUSDT','1m','backfilling')");
    assert_eq!(
        db.sql("SELECT phase, last_closed_open_time, last_error FROM pair_status FINAL"),
        "backfilling\t0\t\n"
    );
}

/// Every digit of the three real datasets survives the writer and ClickHouse.
#[tokio::test]
async fn real_binance_data_round_trips_exactly_through_the_writer() {
    let db = TestDb::new("roundtrip");
    let store = migrated(&db).await;
    let sets = [
        (
            "um/BTCUSDT-1h-2024-01-01_2025-12-20.csv",
            PairKey::parse("um", "BTCUSDT", "1h").unwrap(),
        ),
        (
            "um/ETHUSDT-1h-2024-01-01_2025-12-20.csv",
            PairKey::parse("um", "ETHUSDT", "1h").unwrap(),
        ),
        (
            "spot/BTCUSDT-1h-2022-01.csv",
            PairKey::parse("spot", "BTCUSDT", "1h").unwrap(),
        ),
    ];
    let mut all = Vec::new();
    let mut expected = Vec::new();
    for (file, pair) in &sets {
        let (klines, raw) = load_csv(file, pair);
        assert!(klines.len() >= 744, "{file}: {} rows", klines.len());
        expected.push((pair.clone(), klines.clone(), raw));
        all.extend(klines);
    }
    let total = all.len() as u64;
    assert_eq!(write_all(&store, &db, all).await, total);

    for (pair, klines, raw) in expected {
        // Through the crate (RowBinary): identical values.
        let stored = store.klines(&pair, 0, i64::MAX).await.unwrap();
        assert_eq!(stored.len(), klines.len(), "{pair}");
        assert_eq!(stored, klines, "{pair}");

        // Through ClickHouse's own text output: the same values as the CSV (exact decimals, so
        // trailing zeros, which ClickHouse prints before 21.9 and not since, do not matter).
        let text = db.sql(&format!(
            "SELECT open_time, open, high, low, close, volume, close_time, quote_volume, trades, \
             taker_buy_volume, taker_buy_quote_volume FROM {} ORDER BY open_time FORMAT TSV",
            pair.view_name()
        ));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), raw.len(), "{pair}");
        for (line, src) in lines.iter().zip(&raw) {
            let got: Vec<&str> = line.split('\t').collect();
            for (i, (g, s)) in got.iter().zip(src.iter()).enumerate() {
                assert!(
                    common::same_value(g, s),
                    "{pair} column {i}: {line} vs {src:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn views_follow_the_seed_names_and_final_candles_win() {
    let db = TestDb::new("versions");
    let store = migrated(&db).await;
    let pair = PairKey::parse("cm", "BTCUSD_PERP", "1m").unwrap();
    let candle = |close: &str, is_final: bool, source: Source| Kline {
        pair: pair.clone(),
        open_time: 1_700_000_040_000,
        close_time: 1_700_000_099_999,
        open: "100".parse().unwrap(),
        high: "110".parse().unwrap(),
        low: "90".parse().unwrap(),
        close: close.parse::<Decimal>().unwrap(),
        volume: "1.5".parse().unwrap(),
        quote_volume: "0.015".parse().unwrap(),
        trades: 7,
        taker_buy_volume: "0.5".parse().unwrap(),
        taker_buy_quote_volume: "0.005".parse().unwrap(),
        is_final,
        source,
    };
    // Final first, then a late in-progress update of the same candle: the final one must win.
    write_all(&store, &db, vec![candle("105", true, Source::Ws)]).await;
    write_all(&store, &db, vec![candle("104", false, Source::Ws)]).await;
    let got = store.klines(&pair, 0, i64::MAX).await.unwrap();
    assert_eq!(got, vec![candle("105", true, Source::Ws)]);
    // A newer final (e.g. a REST correction) replaces the older final.
    write_all(&store, &db, vec![candle("106", true, Source::Rest)]).await;
    let got = store.klines(&pair, 0, i64::MAX).await.unwrap();
    assert_eq!(got, vec![candle("106", true, Source::Rest)]);

    // The per-pair view exists under the seed's name and is deduplicated.
    common::assert_tsv_eq(
        &db.sql(
            "SELECT count(), any(close), any(is_final), any(source) FROM klines_btcusd_perp_cm_1m",
        ),
        "1\t106.00000000\t1\trest\n",
    );
    assert_eq!(db.sql("SELECT count() FROM klines"), "3\n");
}

#[tokio::test]
async fn wrong_password_and_unreachable_server_are_classified() {
    let db = TestDb::new_private("errors");
    let mut cfg = db.config("").clickhouse;
    cfg.username = common::PW_USER.to_string();
    cfg.password = quantservice::config::Secret::new("wrong-Pa55word");
    let err = Store::new(&cfg)
        .unwrap()
        .server_version()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(!err.is_retryable(), "{err:?}");
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(!text.contains("wrong-Pa55word"), "{text}");

    cfg.password = quantservice::config::Secret::new(common::PW_PASSWORD);
    let v = Store::new(&cfg).unwrap().server_version().await.unwrap();
    assert!(v.major >= 18, "{v}");

    let mut down = db.config("").clickhouse;
    down.host = "127.0.0.1".to_string();
    down.port = common::dead_port();
    let err = Store::new(&down)
        .unwrap()
        .server_version()
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("unreachable"), "{err}");
}

#[tokio::test]
async fn a_table_left_by_an_older_deployment_is_reported_not_silently_used() {
    let db = TestDb::new("legacy");
    db.create();
    db.sql("CREATE TABLE trading_pairs (symbol String, market String) ENGINE = MergeTree ORDER BY symbol");
    let store = Store::new(&db.config("").clickhouse).unwrap();
    let err = migrate::run(&store).await.unwrap_err().to_string();
    assert!(
        err.contains("trading_pairs has an older layout")
            && err.contains("missing columns: period, enabled"),
        "{err}"
    );
}
