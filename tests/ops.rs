//! The ops endpoint end to end: `/healthz`, `/readyz` and unknown paths over real HTTP, the
//! `quantservice ready` contract (exit 0 ready, 1 not ready in time with the reason, 3
//! disabled) against the binary, readiness following ClickHouse going away and coming back,
//! and `app.http.listen` edits applied live (rebind, a taken port retried, "" stops it) without
//! touching the streams; `/metrics` checked by promtool and against what happened; and the
//! service manager's notify protocol (`READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`) heard on
//! a real datagram socket. Every wait has a deadline and waits on something observable.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{count, wait_for, ChServer, KillOnDrop, TestDb};
use qs_sim::{self as sim, SimConfig};
use quantservice::config_watch::{ReloadResult, Reloads};
use quantservice::market::{Market, PairKey, Period};
use tokio_util::sync::CancellationToken;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quantservice"))
}

fn free_port() -> u16 {
    common::dead_port()
}

/// GET `path` on 127.0.0.1:`port`: (status, body), or the connection error's text.
fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    common::http("127.0.0.1", port, "GET", path, "", None).map_err(|e| e.to_string())
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `secs`.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ready(config: &Path, timeout: &str) -> Output {
    bin()
        .args(["ready", "--timeout", timeout, "--config"])
        .arg(config)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn ready_says_disabled_with_exit_3_when_the_endpoint_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, "app:\n  http:\n    listen: \"\"\n").unwrap();
    let out = ready(&path, "5s");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        text(&out.stderr).trim(),
        "ops endpoint disabled (app.http.listen is empty)"
    );
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn ready_gives_up_with_exit_1_and_the_reason_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    let port = free_port();
    std::fs::write(
        &path,
        format!("app:\n  http:\n    listen: \"0.0.0.0:{port}\"\n"),
    )
    .unwrap();
    let t = Instant::now();
    let out = ready(&path, "1s");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    // 0.0.0.0 is polled on loopback.
    assert!(
        err.contains(&format!("http://127.0.0.1:{port}/readyz")),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "{err}");
    assert_eq!(text(&out.stdout), "");
}

/// The binary with its own ClickHouse, down at first: alive but not ready, with the reason;
/// ready (and `ready` exits 0) once ClickHouse is up and the schema is in; not ready again
/// while ClickHouse is gone, ready again when it is back; SIGTERM ends it cleanly.
#[test]
fn readiness_follows_clickhouse_and_the_reconcile_loop() {
    let server = ChServer::start();
    let db = TestDb::on_server(&server, "ops_ready");
    server.kill();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    let dead = common::dead_port();
    std::fs::write(
        &path,
        db.yaml(&format!(
            "  http:\n    listen: \"127.0.0.1:{port}\"\n  operator:\n    poll_interval: 200ms\n  binance:\n    spot:\n      rest_url: \"http://127.0.0.1:{dead}/api/v3/klines\"\n"
        )),
    )
    .unwrap();
    let mut daemon = KillOnDrop(
        bin()
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(30, "/healthz", || get(port, "/healthz").is_ok());
    assert_eq!(get(port, "/healthz").unwrap(), (200, "ok\n".to_string()));
    let (status, body) = get(port, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: ClickHouse unreachable: "),
        "{body}"
    );
    assert_eq!(get(port, "/nothing-here").unwrap().0, 404);
    let out = ready(&path, "1s");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("HTTP 503 not ready: ClickHouse unreachable"),
        "{}",
        text(&out.stderr)
    );

    server.restart();
    let out = ready(&path, "60s");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), "ready\n");
    assert!(
        count(&db, "SELECT count() FROM schema_migrations") >= 1,
        "ready before the migrations were applied"
    );
    assert_eq!(get(port, "/readyz").unwrap(), (200, "ready\n".to_string()));

    server.kill();
    wait_until(30, "/readyz to turn 503", || {
        get(port, "/readyz").is_ok_and(|(s, b)| s == 503 && b.starts_with("not ready: "))
    });
    assert_eq!(get(port, "/healthz").unwrap().0, 200, "still alive");
    server.restart();
    wait_until(60, "/readyz to turn 200 again", || {
        get(port, "/readyz").is_ok_and(|(s, _)| s == 200)
    });

    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        get(port, "/healthz").is_err(),
        "the endpoint closed with the process"
    );
}

fn task_row(db: &TestDb, task: &str) -> Option<(String, String)> {
    let out = db
        .try_sql(&format!(
            "SELECT state, last_error FROM task_status FINAL WHERE task = '{task}' FORMAT TSV"
        ))
        .ok()?;
    let line = out.lines().next()?;
    let (state, err) = line.split_once('\t')?;
    Some((state.to_string(), err.to_string()))
}

async fn get_async(port: u16, path: &str) -> Result<(u16, String), String> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || get(port, &path))
        .await
        .unwrap()
}

/// `app.http.listen` edits apply live: the endpoint moves to a new port, a port someone else
/// holds is reported in `task_status` and retried until it is free, and "" stops it — while
/// the stream of a declared pair keeps flowing on its one socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_edits_rebind_retry_and_disable_without_touching_the_streams() {
    let sim = sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    let db = TestDb::new("ops_edit");
    let yaml = |listen: &str| {
        db.yaml(&format!(
            "  http:\n    listen: \"{listen}\"\n{}  writer:\n    flush_interval: 100ms\n  operator:\n    poll_interval: 200ms\n    restart_backoff: 200ms\n    max_restart_backoff: 1s\n",
            common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
        ))
    };
    let (a, b) = (free_port(), free_port());
    let (_dir, path, cfg) = common::write_config(&yaml(&format!("127.0.0.1:{a}")));
    let reloads = Reloads::new();
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(quantservice::app::run_daemon(
        cfg,
        path.clone(),
        reloads.clone(),
        shutdown.clone(),
    ));
    wait_for(30, "/readyz on the first port", || async {
        get_async(a, "/readyz").await.is_ok_and(|(s, _)| s == 200)
    })
    .await;
    let pair = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from) VALUES ('spot', 'BTCUSDT', '1s', {})",
        Period::S1.align(sim::now_ms()) - 5_000
    ));
    let ws_rows = || {
        count(
            &db,
            &format!(
                "SELECT count() FROM klines WHERE symbol = '{}' AND source = 'ws'",
                pair.symbol
            ),
        )
    };
    wait_for(20, "the stream", || async { ws_rows() >= 1 }).await;
    let sockets = sim.ws_connections_opened(Market::Spot);

    let edit = |yaml: String| {
        let (reloads, path) = (reloads.clone(), path.clone());
        async move { common::edit_config(&reloads, &path, &yaml).await }
    };
    let http_only = ReloadResult::Applied {
        changed: vec!["http".to_string()],
    };

    // A new port: the endpoint moves.
    assert_eq!(edit(yaml(&format!("127.0.0.1:{b}"))).await, http_only);
    wait_for(10, "/healthz on the new port", || async {
        get_async(b, "/healthz").await.is_ok_and(|(s, _)| s == 200)
    })
    .await;
    assert!(
        get_async(a, "/healthz").await.is_err(),
        "the old port is closed"
    );

    // A port someone else holds: reported and retried, nothing else disturbed.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = holder.local_addr().unwrap().port();
    assert_eq!(edit(yaml(&format!("127.0.0.1:{c}"))).await, http_only);
    wait_for(10, "the bind failure in task_status", || async {
        task_row(&db, "ops_endpoint").is_some_and(|(state, err)| {
            state == "restarting" && err.contains(&format!("cannot listen on 127.0.0.1:{c}"))
        })
    })
    .await;
    assert!(!daemon.is_finished(), "a bind failure is not fatal");
    drop(holder);
    wait_for(10, "/readyz on the freed port", || async {
        get_async(c, "/readyz").await.is_ok_and(|(s, _)| s == 200)
    })
    .await;

    // "": stopped.
    assert_eq!(edit(yaml("")).await, http_only);
    wait_for(10, "the endpoint to close", || async {
        get_async(c, "/healthz").await.is_err()
    })
    .await;
    wait_for(10, "ops_endpoint disabled in task_status", || async {
        task_row(&db, "ops_endpoint").is_some_and(|(state, _)| state == "disabled")
    })
    .await;

    // The stream went on, on the same socket.
    let before = ws_rows();
    wait_for(10, "the stream still flowing", || async {
        ws_rows() >= before + 2
    })
    .await;
    assert_eq!(
        sim.ws_connections_opened(Market::Spot),
        sockets,
        "no reconnect"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), daemon)
        .await
        .expect("the daemon stops")
        .unwrap()
        .unwrap();
}

/// `promtool` (Debian package `prometheus`); the test fails with an install hint without it.
fn promtool() -> std::path::PathBuf {
    ["promtool", "/usr/bin/promtool"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect(
            "promtool is needed to check /metrics: run scripts/install-deps (it installs Debian's \
             prometheus package with --no-install-recommends, without starting its server)",
        )
}

/// `promtool check metrics` on `text` (stdin): its verdict.
fn promtool_check(metrics: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
    }
}

/// The value of the series `name{labels}` in an exposition `text` (labels in the order the
/// family declares them).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_string()
    } else {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{name}{{{}}}", l.join(","))
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// GET /metrics: the content type and the text.
async fn scrape(port: u16) -> (String, String) {
    let r = tokio::task::spawn_blocking(move || {
        common::http_reply("127.0.0.1", port, "GET", "/metrics", "", None).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    (
        r.header("content-type").unwrap_or_default().to_string(),
        r.body,
    )
}

/// Scrapes until `cond` holds for the text; panics with `what` and the last text after `secs`.
async fn scrape_until(port: u16, secs: u64, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let m = scrape(port).await.1;
        if cond(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pair's labels, as the per-pair families have them.
fn pair_labels(p: &PairKey) -> Vec<(&'static str, String)> {
    vec![
        ("market", p.market.as_str().to_string()),
        ("symbol", p.symbol.as_str().to_string()),
        ("period", p.period.as_str().to_string()),
    ]
}

fn refs<'a>(l: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    l.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The binary against the simulator and ClickHouse, scraped over HTTP: `promtool check
/// metrics` passes at start and with every family populated, and the values are the truth:
/// requests, answers, the one 418 and the weight per market and egress match what the
/// simulator saw; rows written match the rows stored; a streamed pair has its lag and candle
/// age, a history-only one has none; streams, phases, task states and reload outcomes count
/// right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_match_what_happened() {
    // The checker itself can fail: a counter without `_total` and without HELP is refused.
    assert!(promtool_check("# TYPE bad counter\nbad 1\n").is_err());
    let sim = sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    let db = TestDb::new("ops_metrics");
    let port = free_port();
    let yaml = db.yaml(&format!(
        "  http:\n    listen: \"127.0.0.1:{port}\"\n{}  writer:\n    flush_interval: 100ms\n  operator:\n    poll_interval: 200ms\n  streams:\n    late_grace: 2s\n",
        common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
    ));
    let (_dir, path, _) = common::write_config(&yaml);
    let mut daemon = KillOnDrop(
        bin()
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(30, "/readyz", || async {
        get_async(port, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 200)
    })
    .await;
    let (content_type, m) = scrape(port).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    promtool_check(&m).unwrap_or_else(|e| panic!("promtool at start: {e}\n{m}"));
    let v = |m: &str, name: &str, labels: &[(&str, &str)]| sample(m, name, labels);
    assert_eq!(v(&m, "quantservice_ready", &[]), Some(1.0), "{m}");
    // The build labels are what `--version` says: "quantservice 0.1.0 (commit C, built D)".
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    let (commit, built) = version
        .trim()
        .strip_suffix(')')
        .and_then(|s| s.split_once(" (commit "))
        .and_then(|(_, s)| s.split_once(", built "))
        .unwrap_or_else(|| panic!("--version: {version}"));
    assert_eq!(
        v(
            &m,
            "quantservice_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", commit),
                ("built", built)
            ]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(v(&m, "process_start_time_seconds", &[]).unwrap() > 1.7e9);
    assert!(v(&m, "quantservice_reconcile_passes_total", &[]).unwrap() >= 1.0);
    assert_eq!(v(&m, "quantservice_generations_total", &[]), Some(1.0));
    assert_eq!(
        v(&m, "quantservice_kline_rows_written_total", &[]),
        Some(0.0)
    );
    let running = |m: &str, task: &str| {
        v(
            m,
            "quantservice_task_state",
            &[("task", task), ("state", "running")],
        )
    };
    assert_eq!(running(&m, "ops_endpoint"), Some(1.0), "{m}");
    assert_eq!(running(&m, "live_sink"), Some(1.0), "{m}");

    // History only, and the first REST request meets a 418 ban.
    sim.ban_ip("127.0.0.1".parse().unwrap(), Duration::from_secs(2));
    let eth = PairKey::parse("spot", "ETHUSDT", "1h").unwrap();
    let from = Period::H1.align(sim::now_ms()) - 24 * 3_600_000;
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, stream, backfill_from) VALUES ('spot', 'ETHUSDT', '1h', 0, {from})"
    ));
    let stored = || {
        count(
            &db,
            "SELECT count() FROM klines FINAL WHERE symbol = 'ETHUSDT' AND period = '1h'",
        )
    };
    wait_for(60, "24 hourly candles stored", || async { stored() >= 24 }).await;
    let spot = [("market", "spot"), ("egress", "direct")];
    // Requests may still be in flight: wait until the scrape and the simulator agree.
    let m = scrape_until(
        port,
        10,
        "the metrics to match the simulator and ClickHouse",
        |m| {
            let rest: Vec<_> = sim
                .requests()
                .into_iter()
                .filter(|r| r.kind == sim::RequestKind::Rest && r.market == Some(Market::Spot))
                .collect();
            let ok = rest.iter().filter(|r| r.status == 200).count() as f64;
            v(m, "quantservice_rest_requests_total", &spot) == Some(rest.len() as f64)
                && v(m, "quantservice_rest_requests_ok_total", &spot) == Some(ok)
                && v(m, "quantservice_rest_requests_failed_total", &spot)
                    == Some(rest.len() as f64 - ok)
                && v(m, "quantservice_kline_rows_written_total", &[]) == Some(stored() as f64)
        },
    )
    .await;
    assert_eq!(sim.count_status(418), 1, "one request met the ban");
    assert_eq!(
        v(&m, "quantservice_rest_http_418_total", &spot),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        v(&m, "quantservice_rest_http_429_total", &spot),
        Some(0.0),
        "{m}"
    );
    let charged: u32 = sim
        .requests()
        .iter()
        .filter(|r| r.market == Some(Market::Spot))
        .map(|r| r.weight)
        .sum();
    let spent = v(&m, "quantservice_rest_weight_used_total", &spot).unwrap();
    assert!(
        spent >= f64::from(charged) && charged > 0,
        "spent {spent}, charged {charged}"
    );
    assert!(v(&m, "quantservice_rest_weight_window_budget", &spot).unwrap() > 0.0);
    assert!(
        v(&m, "quantservice_writer_queue_capacity_rows", &[]).unwrap() > 0.0,
        "{m}"
    );
    assert_eq!(
        v(&m, "quantservice_writer_queued_rows", &[]),
        Some(0.0),
        "{m}"
    );

    // A streamed pair: lag and candle age for it, none for the history-only one.
    let btc = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from) VALUES ('spot', 'BTCUSDT', '1s', {})",
        Period::S1.align(sim::now_ms()) - 5_000
    ));
    let (btc_l, eth_l) = (pair_labels(&btc), pair_labels(&eth));
    let m = scrape_until(port, 30, "the stream's lag on /metrics", |m| {
        v(m, "quantservice_pair_lag_seconds", &refs(&btc_l)).is_some()
    })
    .await;
    let lag = v(&m, "quantservice_pair_lag_seconds", &refs(&btc_l)).unwrap();
    assert!((0.0..5.0).contains(&lag), "lag {lag}");
    let age = v(
        &m,
        "quantservice_pair_last_closed_candle_age_seconds",
        &refs(&btc_l),
    )
    .unwrap();
    assert!((0.0..10.0).contains(&age), "age {age}");
    assert!(v(&m, "quantservice_pair_open_gaps", &refs(&btc_l)).is_some());
    assert_eq!(v(&m, "quantservice_pair_lag_seconds", &refs(&eth_l)), None);
    assert_eq!(
        v(&m, "quantservice_pair_open_gaps", &refs(&eth_l)),
        Some(0.0)
    );
    assert_eq!(
        v(&m, "quantservice_pairs", &[("phase", "streaming")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        v(&m, "quantservice_pairs", &[("phase", "idle")]),
        Some(1.0),
        "{m}"
    );
    scrape_until(port, 10, "the stream counted", |m| {
        v(m, "quantservice_streams", &[("market", "spot")]) == Some(1.0)
            && v(m, "quantservice_stream_connections", &[("market", "spot")]) == Some(1.0)
            && v(m, "quantservice_ws_closed_candles_total", &[]).unwrap_or(0.0) >= 1.0
    })
    .await;

    // Reload outcomes: one applied edit, one rejected; neither rebuilds anything.
    let edit = |yaml: &str| {
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    edit(&yaml.replace(
        "late_grace: 2s",
        "late_grace: 2s\n  gap_scan:\n    grace: 90s",
    ));
    let reloads = |m: &str, result: &str| {
        v(
            m,
            "quantservice_config_reloads_total",
            &[("result", result)],
        )
    };
    scrape_until(port, 20, "the applied edit counted", |m| {
        reloads(m, "applied") == Some(1.0)
    })
    .await;
    edit(&yaml.replace("late_grace: 2s", "late_grace: soon"));
    let m = scrape_until(port, 20, "the rejected edit counted", |m| {
        reloads(m, "rejected") == Some(1.0)
    })
    .await;
    assert_eq!(reloads(&m, "applied"), Some(1.0));
    assert_eq!(v(&m, "quantservice_generations_total", &[]), Some(1.0));
    promtool_check(&m).unwrap_or_else(|e| panic!("promtool with every family: {e}\n{m}"));

    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || daemon.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// What the binary tells the service manager, heard on a datagram socket bound by the test
/// (as systemd's `$NOTIFY_SOCKET`, with a 1 s watchdog): a `STATUS=` while it waits for
/// ClickHouse (down at first) and no `READY=1` before the migrations are in ClickHouse; the
/// pair counts once a pair streams; `WATCHDOG=1` pings; `STOPPING=1` on SIGTERM, then exit 0.
#[test]
fn the_service_manager_hears_ready_status_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(sim::start(
            SimConfig::default(),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .unwrap();
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    let server = ChServer::start();
    let db = TestDb::on_server(&server, "ops_notify");
    server.kill();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(
        &path,
        db.yaml(&format!(
            "{}  operator:\n    poll_interval: 200ms\n",
            common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
        )),
    )
    .unwrap();
    let mut daemon = KillOnDrop(
        bin()
            .arg("--config")
            .arg(&path)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut heard: Vec<String> = Vec::new();
    // Reads messages until one satisfies `want`; panics with all heard after `secs`.
    let mut hear = |secs: u64, what: &str, want: &mut dyn FnMut(&str) -> bool| -> usize {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut buf = [0u8; 1024];
        loop {
            if let Ok(n) = socket.recv(&mut buf) {
                heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                if want(heard.last().unwrap()) {
                    return heard.len() - 1;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {secs} s; heard {heard:?}"
            );
        }
    };

    let waiting = hear(30, "waiting status", &mut |m| {
        m == "STATUS=starting: waiting for ClickHouse and the migrations"
    });
    assert_eq!(waiting, 0, "the first thing said");
    server.restart();
    let ready = hear(60, "READY=1", &mut |m| m == "READY=1");
    assert!(
        count(&db, "SELECT count() FROM schema_migrations") >= 1,
        "READY=1 before the migrations were applied"
    );
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from) VALUES ('spot', 'BTCUSDT', '1s', {})",
        Period::S1.align(sim::now_ms()) - 5_000
    ));
    hear(30, "the pair streaming in STATUS", &mut |m| {
        m == "STATUS=1 pair: 1 streaming, 0 backfilling, 0 failed"
    });
    let mut pings = 0;
    hear(10, "three watchdog pings after READY=1", &mut |m| {
        pings += usize::from(m == "WATCHDOG=1");
        pings >= 3
    });
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    let stopping = hear(10, "STOPPING=1", &mut |m| m.starts_with("STOPPING=1"));
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        heard.iter().filter(|m| *m == "READY=1").count(),
        1,
        "READY=1 once: {heard:?}"
    );
    assert!(ready < stopping);
    assert!(
        heard[..ready].iter().all(|m| m.starts_with("STATUS=")),
        "only the status before READY=1: {heard:?}"
    );
}
