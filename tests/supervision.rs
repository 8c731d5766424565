//! Every long-lived task of the daemon is owned and watched: a panic injected into each kind
//! (live sink, status flusher, proxy health checks, a stream connection, a socket reader, a
//! REST catch-up, a pair task, the writer) is noticed, counted,
//! shown in observed state, and either repaired (restart with backoff, no candle lost) or, for
//! the writer whose loss cannot be repaired in-process, ends the daemon loudly with an error.
//! A pair whose symbol the exchange does not know is parked, not retried forever.
//!
//! Fault points are process-wide, so this binary holds one test that goes through them in turn.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use common::{count, wait_for, wait_stored, TestDb};
use qs_sim::{self as sim, SimConfig};
use quantservice::faults;
use quantservice::market::{Market, PairKey, Period};

/// Fast settings: poll 200 ms, 1 s gap scans of 1s candles, short backoffs.
const FAST: &str = "  writer:\n    flush_interval: 100ms\n  operator:\n    poll_interval: 200ms\n    stop_timeout: 2s\n    restart_backoff: 200ms\n    max_restart_backoff: 1s\n  streams:\n    idle_timeout: 3s\n    late_grace: 1s\n    reconnect_backoff: 200ms\n    max_reconnect_backoff: 1s\n  gap_scan:\n    grace: 3s\n    schedules:\n      1s: \"* * * * * *\"\n";

fn ws_rows(db: &TestDb, p: &PairKey) -> u64 {
    count(
        db,
        &format!(
            "SELECT count() FROM klines WHERE market = '{}' AND symbol = '{}' AND period = '{}' AND source = 'ws'",
            p.market, p.symbol, p.period
        ),
    )
}

/// `(state, restarts, last_error)` of a daemon task in `task_status`.
fn task(db: &TestDb, name: &str) -> Option<(String, u64, String)> {
    let out = db
        .try_sql(&format!(
            "SELECT state, restarts, last_error FROM task_status FINAL WHERE task = '{name}' FORMAT TSV"
        ))
        .ok()?;
    let line = out.lines().next()?;
    let f: Vec<&str> = line.split('\t').collect();
    Some((f[0].to_string(), f[1].parse().ok()?, f[2].to_string()))
}

/// `(phase, restarts, last_error)` of a pair in `pair_status`.
fn pair(db: &TestDb, p: &PairKey) -> Option<(String, u64, String)> {
    let out = db
        .try_sql(&format!(
            "SELECT phase, restarts, last_error FROM pair_status FINAL WHERE market = '{}' AND symbol = '{}' AND period = '{}' FORMAT TSV",
            p.market, p.symbol, p.period
        ))
        .ok()?;
    let line = out.lines().next()?;
    let f: Vec<&str> = line.split('\t').collect();
    Some((f[0].to_string(), f[1].parse().ok()?, f[2].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_task_that_panics_is_restarted_or_ends_the_daemon_loudly() {
    let sim = sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    let db = TestDb::new("supervision");
    let (_dir, path, cfg) = common::write_config(&db.yaml(&format!(
        "{}{FAST}",
        common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
    )));
    let (daemon, shutdown) = common::spawn_daemon(cfg, &path);
    wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM task_status").is_ok()
    })
    .await;

    let p = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    let from = Period::S1.align(sim::now_ms()) - 10_000;
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from) VALUES ('spot', 'BTCUSDT', '1s', {from})"
    ));
    wait_for(20, "the stream", || async {
        ws_rows(&db, &p) >= 2 && pair(&db, &p).is_some_and(|s| s.0 == "streaming")
    })
    .await;

    let failures =
        || quantservice::metrics::TASK_FAILURES.load(std::sync::atomic::Ordering::Relaxed);
    // Each fault fired (no longer armed), was counted, and the row says which it was.
    let fired = |point: &str, since: u64| {
        assert!(!faults::is_armed(point), "{point} never fired");
        assert!(failures() > since, "{point}: task_failures not counted");
    };

    // The live sink: restarted, and candles keep reaching ClickHouse from the stream.
    let n = failures();
    faults::arm("live_sink");
    wait_for(10, "the live sink's restart in task_status", || async {
        task(&db, "live_sink").is_some_and(|t| t.1 >= 1 && t.0 == "running")
    })
    .await;
    fired("live_sink", n);
    let t = task(&db, "live_sink").unwrap();
    assert!(
        t.2.contains("injected fault at live_sink"),
        "last_error says why: {t:?}"
    );
    let before = ws_rows(&db, &p);
    wait_for(
        10,
        "streamed candles after the live sink's restart",
        || async { ws_rows(&db, &p) >= before + 3 },
    )
    .await;

    // The status flusher and the proxy health checks: restarted; the row saying so is written
    // by the flusher's next run.
    for point in ["status_flusher", "proxy_health"] {
        let n = failures();
        faults::arm(point);
        wait_for(10, &format!("{point}'s restart in task_status"), || async {
            task(&db, point).is_some_and(|t| {
                t.1 >= 1 && t.0 == "running" && t.2.contains(&format!("injected fault at {point}"))
            })
        })
        .await;
        fired(point, n);
    }

    // A stream connection: noticed within a poll, its streams reopened on a new socket.
    let opened = sim.ws_connections_opened(Market::Spot);
    let n = failures();
    faults::arm("ws_connection");
    wait_for(
        10,
        "the dead connection reported in task_status",
        || async {
            task(&db, "streams_spot")
                .is_some_and(|t| t.1 >= 1 && t.2.contains("injected fault at ws_connection"))
        },
    )
    .await;
    fired("ws_connection", n);
    let before = ws_rows(&db, &p);
    wait_for(10, "streamed candles on the new connection", || async {
        ws_rows(&db, &p) >= before + 3
    })
    .await;
    assert!(sim.ws_connections_opened(Market::Spot) > opened);

    // A socket's reader: its connection hears at once and opens a new socket.
    let opened = sim.ws_connections_opened(Market::Spot);
    let n = failures();
    faults::arm("ws_reader");
    wait_for(10, "a new socket after the reader's panic", || async {
        sim.ws_connections_opened(Market::Spot) > opened
    })
    .await;
    fired("ws_reader", n);
    let before = ws_rows(&db, &p);
    wait_for(10, "streamed candles on the new socket", || async {
        ws_rows(&db, &p) >= before + 3
    })
    .await;

    // A REST catch-up (finals withheld, so the late check fetches them): the failed one is
    // reported and retried, and the candles arrive.
    let n = failures();
    faults::arm("catch_up");
    sim.set_ws_skip_finals(true);
    wait_for(15, "the catch-up's panic in pair_status", || async {
        pair(&db, &p).is_some_and(|s| s.2.contains("injected fault at catch_up"))
    })
    .await;
    fired("catch_up", n);
    let skipped_from = Period::S1.align(sim::now_ms());
    wait_for(15, "candles fetched by REST while the stream withholds them", || async {
        count(
            &db,
            &format!(
                "SELECT count() FROM klines FINAL WHERE symbol = 'BTCUSDT' AND source = 'rest' AND open_time >= {skipped_from}"
            ),
        ) >= 3
    })
    .await;
    sim.set_ws_skip_finals(false);

    // A pair task (in its gap-scan loop): restarted with backoff, counted in pair_status.
    let n = failures();
    faults::arm("pair_task");
    wait_for(10, "the pair task's restart", || async {
        pair(&db, &p).is_some_and(|s| s.1 >= 1 && s.0 == "streaming")
    })
    .await;
    fired("pair_task", n);

    // A pair Binance does not know, declared streamed (the default): parked after one try,
    // reported, its stream dropped, and no request for it again.
    let bad = PairKey::parse("spot", "NOSUCHCOIN", "1s").unwrap();
    db.sql(
        "INSERT INTO trading_pairs (market, symbol, period) VALUES ('spot', 'NOSUCHCOIN', '1s')",
    );
    wait_for(10, "the unknown pair parked", || async {
        pair(&db, &bad).is_some_and(|s| s.0 == "parked")
    })
    .await;
    let s = pair(&db, &bad).unwrap();
    assert!(s.2.contains("NOSUCHCOIN"), "{s:?}");
    wait_for(10, "the parked pair's stream dropped", || async {
        !sim.ws_open_connections()
            .iter()
            .any(|c| c.subscriptions.iter().any(|s| s.starts_with("nosuchcoin@")))
    })
    .await;
    let asked = || {
        sim.requests()
            .iter()
            .filter(|r| r.query.contains("NOSUCHCOIN"))
            .count()
    };
    let asked_before = asked();
    // Several seconds of streaming and gap scans (of the good pair) later: still parked,
    // never restarted, never asked for again.
    let scans_before = ws_rows(&db, &p);
    wait_for(15, "more candles meanwhile", || async {
        ws_rows(&db, &p) >= scans_before + 5
    })
    .await;
    assert_eq!(
        pair(&db, &bad).unwrap().1,
        0,
        "a parked task is not restarted"
    );
    assert_eq!(asked(), asked_before, "no request for a parked pair");

    // The stored series is complete: whatever a failure dropped was fetched again.
    let upto = Period::S1.align(sim::now_ms()) - 4_000;
    wait_stored(&db, &p, from, upto, 20).await;

    // The writer: its queue cannot be rebuilt in-process, so the daemon ends with an error
    // (exit code 1 in the binary; systemd restarts it) — never a silent stop.
    assert!(!faults::is_armed("writer"));
    faults::arm("writer");
    let result = tokio::time::timeout(Duration::from_secs(20), daemon)
        .await
        .expect("the daemon ends after the writer's panic")
        .unwrap();
    let err = format!("{:#}", result.expect_err("a fatal failure is an error"));
    assert!(
        err.contains("fatal task failure") && err.contains("writer"),
        "{err}"
    );
    // The flusher, stopped last, wrote why.
    let w = task(&db, "writer").expect("a task_status row for the writer");
    assert_eq!(w.0, "failed", "{w:?}");
    assert!(w.2.contains("injected fault at writer"), "{w:?}");
    shutdown.cancel();
}
