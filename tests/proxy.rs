//! The SOCKS5 egress pool with real `microsocks` servers, each binding its outgoing connections
//! to its own loopback address (127.0.0.2, .3, ...), against the simulator answering 451 to
//! direct requests from 127.0.0.1 — so a request that succeeds went through a proxy, and the
//! simulator's log says which.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Socks, TestDb, SOCKS_PASSWORD, SOCKS_USER};
use indicatif::ProgressBar;
use qs_sim::{self as sim, synthetic, RequestKind, SimConfig, SimHandle};
use quantservice::app::{backfill_gap, BackfillRequest};
use quantservice::market::{Market, PairKey, Period};
use tokio_util::sync::CancellationToken;

const HOUR: i64 = 3_600_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn refusing_sim() -> SimHandle {
    let sim = sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_deny_451(vec![ip("127.0.0.1")]);
    sim
}

fn config_yaml(db: &TestDb, sim: &SimHandle, extra: &str) -> String {
    db.yaml(&format!(
        "{}  writer:\n    flush_interval: 100ms\n  logging:\n    level: debug\n{extra}",
        common::sim_binance_yaml(sim, "")
    ))
}

fn add_proxy(db: &TestDb, port: u16, user: &str, password: &str, enabled: u8) {
    // The seed's statement, as users type it.
    db.sql(&format!(
        "INSERT INTO proxy_config (host, port, username, password, enabled, created_at) VALUES ('127.0.0.1', {port}, '{user}', '{password}', {enabled}, now());"
    ));
}

/// REST requests the simulator answered with `status` from `peer`.
fn rest_from(sim: &SimHandle, peer: &str, status: u16) -> Vec<sim::RequestRecord> {
    sim.requests()
        .into_iter()
        .filter(|r| r.kind == RequestKind::Rest && r.peer == ip(peer) && r.status == status)
        .collect()
}

fn stored_exactly(db: &TestDb, pair: &PairKey, from: i64, to: i64) {
    let got = db.sql(&format!(
        "SELECT open_time, toString(close), trades FROM klines FINAL WHERE market = '{}' AND symbol = '{}' AND period = '{}' AND open_time >= {from} AND open_time < {to} ORDER BY open_time FORMAT TSV",
        pair.market, pair.symbol, pair.period
    ));
    let rows: Vec<&str> = got.lines().collect();
    let want = usize::try_from((to - from) / 60_000).unwrap();
    assert_eq!(rows.len(), want, "{pair}: rows");
    for line in rows {
        let f: Vec<&str> = line.split('\t').collect();
        let k = synthetic::candle(pair, f[0].parse().unwrap());
        let close: quantservice::market::Decimal = f[1].parse().unwrap();
        assert_eq!((close, f[2].parse::<u64>().unwrap()), (k.close, k.trades));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_directly_a_backfill_succeeds_through_the_proxy_and_never_prints_its_password() {
    let sim = refusing_sim().await;
    let socks = Socks::start("127.0.0.2");
    let db = TestDb::new("px_only");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, config_yaml(&db, &sim, "")).unwrap();
    let cfg = quantservice::config::Config::load(&path).unwrap();
    quantservice::app::migrate(&cfg).await.unwrap();
    add_proxy(&db, socks.port, SOCKS_USER, SOCKS_PASSWORD, 1);

    let end = Period::M1.align(sim::now_ms()) - HOUR;
    let start = end - 6 * HOUR;
    let out = Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .args([
            "backfill-gap",
            "--market",
            "um",
            "--symbol",
            "BTCUSDT",
            "--period",
            "1m",
        ])
        .args([
            "--start_ms",
            &start.to_string(),
            "--end_ms",
            &end.to_string(),
        ])
        .args(["--source", "rest", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(
        !all.contains(SOCKS_PASSWORD),
        "proxy password printed:\n{all}"
    );
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    stored_exactly(&db, &pair, start, end);
    assert!(!rest_from(&sim, "127.0.0.2", 200).is_empty());
    assert!(
        rest_from(&sim, "127.0.0.1", 200).is_empty(),
        "nothing may succeed directly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_proxy_is_quarantined_until_the_ban_ends_while_another_carries_on() {
    let sim = refusing_sim().await;
    let a = Socks::start("127.0.0.2");
    let b = Socks::start("127.0.0.3");
    let db = TestDb::new("px_ban");
    let cfg = db.config(&format!(
        "{}  writer:\n    flush_interval: 100ms\n",
        common::sim_binance_yaml(&sim, "")
    ));
    quantservice::app::migrate(&cfg).await.unwrap();
    add_proxy(&db, a.port, SOCKS_USER, SOCKS_PASSWORD, 1);
    add_proxy(&db, b.port, SOCKS_USER, SOCKS_PASSWORD, 1);
    let ban = Duration::from_secs(4);
    sim.ban_ip(ip("127.0.0.2"), ban);
    let ban_end = sim::now_ms() + i64::try_from(ban.as_millis()).unwrap();

    let end = Period::M1.align(sim::now_ms()) - HOUR;
    let start = end - 3 * 24 * HOUR;
    let req = BackfillRequest {
        market: "um".into(),
        symbol: "ETHUSDT".into(),
        period: "1m".into(),
        start_ms: start,
        end_ms: end,
        source: Some("rest".into()),
    };
    let out = backfill_gap(cfg, req, ProgressBar::hidden(), CancellationToken::new())
        .await
        .unwrap();
    let pair = PairKey::parse("um", "ETHUSDT", "1m").unwrap();
    stored_exactly(&db, &pair, start, end);
    let banned = rest_from(&sim, "127.0.0.2", 418);
    assert_eq!(banned.len(), 1, "one 418, then quarantined: {out}");
    let after: Vec<i64> = sim
        .requests()
        .into_iter()
        .filter(|r| r.peer == ip("127.0.0.2") && r.at_ms > banned[0].at_ms)
        .map(|r| r.at_ms)
        .collect();
    assert!(
        after.iter().all(|t| *t >= ban_end - 200),
        "requests through the banned proxy before the ban ended: {after:?} (ban end {ban_end})"
    );
    assert!(
        rest_from(&sim, "127.0.0.3", 200).len() > 5,
        "the other proxy did the work"
    );
}

async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn proxy_state(db: &TestDb, port: u16) -> Option<(String, String)> {
    let out = db
        .try_sql(&format!(
            "SELECT state, last_error FROM proxy_status FINAL WHERE port = {port} FORMAT TSV"
        ))
        .ok()?;
    let line = out.lines().next()?;
    let (s, e) = line.split_once('\t')?;
    Some((s.to_string(), e.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_skips_dead_and_misconfigured_proxies_and_follows_rows_at_runtime() {
    let sim = refusing_sim().await;
    let good = Socks::start("127.0.0.2");
    let wrong_pw = Socks::start("127.0.0.4");
    let mut dead = Socks::start("127.0.0.5");
    dead.stop();
    let db = TestDb::new("px_daemon");
    let (_dir, path, cfg) = common::write_config(&config_yaml(
        &db,
        &sim,
        "  operator:\n    poll_interval: 200ms\n  proxy:\n    health_interval: 300ms\n    allow_direct: false\n",
    ));
    quantservice::app::migrate(&cfg).await.unwrap();
    add_proxy(&db, good.port, SOCKS_USER, SOCKS_PASSWORD, 1);
    add_proxy(&db, wrong_pw.port, SOCKS_USER, "not-the-password", 1);
    add_proxy(&db, dead.port, SOCKS_USER, SOCKS_PASSWORD, 1);
    let from = Period::M1.align(sim::now_ms()) - 3 * HOUR;
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from, stream) VALUES ('um', 'BTCUSDT', '1m', {from}, 0)"
    ));
    let (daemon, shutdown) = common::spawn_daemon(cfg, &path);
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let upto = from + 2 * HOUR;
    wait_for(30, "the backfill through the good proxy", || {
        db.try_sql(&format!(
            "SELECT count() FROM klines FINAL WHERE market = 'um' AND symbol = 'BTCUSDT' AND open_time >= {from} AND open_time < {upto}"
        ))
        .is_ok_and(|s| s.trim() == "120")
    })
    .await;
    stored_exactly(&db, &pair, from, upto);
    wait_for(15, "proxy_status for all three", || {
        proxy_state(&db, good.port).is_some_and(|s| s.0 == "healthy")
            && proxy_state(&db, wrong_pw.port).is_some_and(|s| s.0 != "healthy" && !s.1.is_empty())
            && proxy_state(&db, dead.port).is_some_and(|s| s.0 != "healthy" && !s.1.is_empty())
    })
    .await;
    let (_, dead_err) = proxy_state(&db, dead.port).unwrap();
    assert!(!dead_err.contains(SOCKS_PASSWORD), "{dead_err}");
    assert!(rest_from(&sim, "127.0.0.1", 200).is_empty());

    // A proxy added at runtime is used within a poll (its health checks reach the simulator
    // from its own address); one disabled at runtime stops being used.
    let late = Socks::start("127.0.0.3");
    add_proxy(&db, late.port, SOCKS_USER, SOCKS_PASSWORD, 1);
    wait_for(10, "the added proxy in use", || {
        !rest_from(&sim, "127.0.0.3", 200).is_empty()
    })
    .await;
    add_proxy(&db, good.port, SOCKS_USER, SOCKS_PASSWORD, 0);
    // Once two more checks went through the new one, the disabled one must have stopped.
    let n3 = rest_from(&sim, "127.0.0.3", 200).len();
    wait_for(10, "checks through the added proxy", || {
        rest_from(&sim, "127.0.0.3", 200).len() >= n3 + 2
    })
    .await;
    let n2 = rest_from(&sim, "127.0.0.2", 200).len();
    let n3 = rest_from(&sim, "127.0.0.3", 200).len();
    wait_for(10, "more checks through the added proxy", || {
        rest_from(&sim, "127.0.0.3", 200).len() >= n3 + 3
    })
    .await;
    assert_eq!(
        rest_from(&sim, "127.0.0.2", 200).len(),
        n2,
        "the disabled proxy is still used"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = Market::Um;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_go_through_the_proxy_when_asked() {
    let sim = refusing_sim().await;
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    let socks = Socks::start("127.0.0.2");
    let db = TestDb::new("px_ws");
    let (_dir, path, cfg) = common::write_config(&db.yaml(&format!(
        "{}  writer:\n    flush_interval: 100ms\n  operator:\n    poll_interval: 200ms\n  proxy:\n    websocket: true\n    allow_direct: false\n",
        common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
    )));
    quantservice::app::migrate(&cfg).await.unwrap();
    add_proxy(&db, socks.port, SOCKS_USER, SOCKS_PASSWORD, 1);
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from) VALUES ('spot', 'BTCUSDT', '1s', {})",
        Period::S1.align(sim::now_ms()) - 5_000
    ));
    let (daemon, shutdown) = common::spawn_daemon(cfg, &path);
    wait_for(30, "candles from the proxied stream", || {
        db.try_sql("SELECT count() FROM klines WHERE symbol = 'BTCUSDT' AND source = 'ws'")
            .is_ok_and(|s| s.trim().parse::<u64>().unwrap_or(0) >= 3)
    })
    .await;
    let ws: Vec<IpAddr> = sim
        .requests()
        .into_iter()
        .filter(|r| r.kind == RequestKind::Ws && r.status == 101)
        .map(|r| r.peer)
        .collect();
    assert!(!ws.is_empty());
    assert!(ws.iter().all(|p| *p == ip("127.0.0.2")), "{ws:?}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_usable_egress_a_request_waits_then_fails_naming_the_proxy() {
    let sim = refusing_sim().await;
    let mut dead = Socks::start("127.0.0.2");
    dead.stop();
    let db = TestDb::new("px_none");
    let cfg = db.config(&format!(
        "{}  proxy:\n    mode: always\n    max_wait: 1s\n",
        common::sim_binance_yaml(&sim, "")
    ));
    quantservice::app::migrate(&cfg).await.unwrap();
    add_proxy(&db, dead.port, SOCKS_USER, SOCKS_PASSWORD, 1);
    let end = Period::M1.align(sim::now_ms()) - HOUR;
    let req = BackfillRequest {
        market: "um".into(),
        symbol: "BTCUSDT".into(),
        period: "1m".into(),
        start_ms: end - HOUR,
        end_ms: end,
        source: Some("rest".into()),
    };
    let t = Instant::now();
    let err = backfill_gap(cfg, req, ProgressBar::hidden(), CancellationToken::new())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(t.elapsed() >= Duration::from_secs(1), "it waited first");
    assert!(msg.contains("no usable egress"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", dead.port)), "{msg}");
    assert!(!msg.contains(SOCKS_PASSWORD), "{msg}");
    assert!(rest_from(&sim, "127.0.0.1", 200).is_empty());
}
