//! The operator end to end: the daemon (in-process, or the binary) against the simulator's
//! REST and WebSocket endpoints and a real ClickHouse. Pairs are declared with plain SQL and
//! `app.yaml` edits; every check waits on an observable condition with a deadline.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{count, wait_for, wait_stored, TestDb};
use qs_sim::{self as sim, synthetic, SimConfig, SimHandle};
use quantservice::config_watch::{ReloadResult, Reloads};
use quantservice::market::{Market, PairKey, Period};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

async fn start_sim(cfg: SimConfig) -> SimHandle {
    let sim = sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    sim
}

/// Fast settings for tests: poll 200 ms, 1 s gap scans of 1s candles, short watchdogs.
const FAST: &str = "  writer:\n    flush_interval: 100ms\n  operator:\n    poll_interval: 200ms\n    stop_timeout: 2s\n    restart_backoff: 200ms\n  streams:\n    idle_timeout: 3s\n    late_grace: 1s\n    reconnect_backoff: 200ms\n    max_reconnect_backoff: 1s\n  gap_scan:\n    grace: 3s\n    schedules:\n      1s: \"* * * * * *\"\n";

struct Daemon {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    path: PathBuf,
    reloads: Reloads,
    /// What the daemon's own future logged (not its spawned tasks).
    log: Log,
    _dir: tempfile::TempDir,
}

/// Log lines captured from one future (`WithSubscriber`), so parallel tests do not mix.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Daemon {
    async fn start(yaml: &str) -> Daemon {
        use tracing::instrument::WithSubscriber;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.yaml");
        std::fs::write(&path, yaml).unwrap();
        let cfg = quantservice::config::Config::load(&path).unwrap();
        let shutdown = CancellationToken::new();
        let reloads = Reloads::new();
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let task = tokio::spawn(
            quantservice::app::run_daemon(cfg, path.clone(), reloads.clone(), shutdown.clone())
                .with_subscriber(subscriber),
        );
        Daemon {
            shutdown,
            task,
            path,
            reloads,
            log,
            _dir: dir,
        }
    }

    /// Makes an edit and waits for the daemon's verdict on it.
    async fn edit_and_wait(&self, yaml: &str) -> ReloadResult {
        let seq = self.reloads.latest().seq;
        self.edit(yaml);
        tokio::time::timeout(Duration::from_secs(30), self.reloads.next_after(seq))
            .await
            .expect("no reload outcome within 30 s")
            .expect("the daemon stopped publishing outcomes")
            .result
    }

    /// Replaces the config the way editors do: write a new file, rename it over the old one.
    fn edit(&self, yaml: &str) {
        let tmp = self.path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("daemon stops within 10 s")
            .unwrap();
        r.unwrap();
    }
}

fn where_pair(p: &PairKey) -> String {
    format!(
        "market = '{}' AND symbol = '{}' AND period = '{}'",
        p.market, p.symbol, p.period
    )
}

fn ws_rows(db: &TestDb, p: &PairKey) -> u64 {
    count(
        db,
        &format!(
            "SELECT count() FROM klines WHERE {} AND source = 'ws'",
            where_pair(p)
        ),
    )
}

fn status_of(db: &TestDb, p: &PairKey) -> Option<(String, String, u64)> {
    let out = db
        .try_sql(&format!(
            "SELECT phase, last_error, reconnects FROM pair_status FINAL WHERE {} FORMAT TSV",
            where_pair(p)
        ))
        .ok()?;
    let line = out.lines().next()?;
    let f: Vec<&str> = line.split('\t').collect();
    Some((f[0].to_string(), f[1].to_string(), f[2].parse().ok()?))
}

/// Every candle of `p` with open time in `[from, to)` is stored exactly once, final, with the
/// simulator's values.
fn assert_complete(db: &TestDb, p: &PairKey, from: i64, to: i64) {
    let rows = db.sql(&format!(
        "SELECT open_time, toString(open), toString(close), toString(volume), trades FROM klines FINAL \
         WHERE {} AND open_time >= {from} AND open_time < {to} AND is_final = 1 ORDER BY open_time FORMAT TSV",
        where_pair(p)
    ));
    // ClickHouse prints all 8 decimals; normalise through our exact Decimal.
    let dec = |s: &str| {
        s.parse::<quantservice::market::Decimal>()
            .unwrap()
            .to_string()
    };
    let got: Vec<String> = rows
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            format!(
                "{}\t{}\t{}\t{}\t{}",
                f[0],
                dec(f[1]),
                dec(f[2]),
                dec(f[3]),
                f[4]
            )
        })
        .collect();
    let len = p.period.fixed_ms().unwrap();
    let want: Vec<String> = (0..)
        .map(|i| from + i * len)
        .take_while(|t| *t < to)
        .map(|t| {
            let k = synthetic::candle(p, t);
            format!("{t}\t{}\t{}\t{}\t{}", k.open, k.close, k.volume, k.trades)
        })
        .collect();
    let missing: Vec<&String> = want.iter().filter(|w| !got.contains(w)).collect();
    assert!(
        missing.is_empty(),
        "{p}: {} of {} candles missing or different, first: {:?}",
        missing.len(),
        want.len(),
        missing.first()
    );
    assert_eq!(got.len(), want.len(), "{p}: duplicates or extra rows");
}

fn insert_pair(db: &TestDb, p: &PairKey, enabled: u8, from: i64) {
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, enabled, backfill_from) VALUES ('{}', '{}', '{}', {enabled}, {from})",
        p.market, p.symbol, p.period
    ));
}

fn streams_of(sim: &SimHandle, market: Market) -> Vec<(u64, Vec<String>)> {
    sim.ws_open_connections()
        .into_iter()
        .filter(|c| c.market == market)
        .map(|c| (c.id, c.subscriptions))
        .collect()
}

/// Starts the daemon on a fresh database and waits until its schema exists.
async fn daemon_on(db: &TestDb, sim: &SimHandle, extra: &str) -> Daemon {
    let yaml = db.yaml(&format!(
        "{}{FAST}{extra}",
        common::sim_endpoints_yaml(sim, &sim.ws_url(Market::Um))
    ));
    let d = Daemon::start(&yaml).await;
    wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM trading_pairs").is_ok()
    })
    .await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_inserted_with_sql_backfill_and_stream_and_disabling_one_leaves_the_socket_alone() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_basic");
    let d = daemon_on(&db, &sim, "").await;
    let btc = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    let eth = PairKey::parse("spot", "ETHUSDT", "1s").unwrap();
    let from = Period::S1.align(sim::now_ms()) - 120_000;
    insert_pair(&db, &btc, 1, from);
    insert_pair(&db, &eth, 1, from);
    // A bad row is reported and blocks nothing.
    db.sql("INSERT INTO trading_pairs (market, symbol, period) VALUES ('spot', 'BTC-USDT', '1m')");

    wait_for(20, "both streams live", || async {
        ws_rows(&db, &btc) >= 2 && ws_rows(&db, &eth) >= 2
    })
    .await;
    let conns = streams_of(&sim, Market::Spot);
    assert_eq!(conns.len(), 1, "one connection for both: {conns:?}");
    let (conn_id, subs) = conns[0].clone();
    assert_eq!(subs, vec!["btcusdt@kline_1s", "ethusdt@kline_1s"]);
    wait_for(10, "the bad row in pair_status", || async {
        db.try_sql("SELECT last_error FROM pair_status FINAL WHERE symbol = 'BTC-USDT'")
            .is_ok_and(|s| s.contains("invalid symbol"))
    })
    .await;

    // Disable ETHUSDT: UNSUBSCRIBE on the same socket; BTCUSDT keeps flowing on it.
    insert_pair(&db, &eth, 0, from);
    wait_for(10, "the UNSUBSCRIBE", || async {
        sim.ws_control_log().iter().any(|r| {
            r.conn == conn_id
                && r.method == "UNSUBSCRIBE"
                && r.params
                    .as_array()
                    .is_some_and(|a| a.iter().any(|p| p == "ethusdt@kline_1s"))
        })
    })
    .await;
    let btc_before = ws_rows(&db, &btc);
    wait_for(10, "BTCUSDT still streaming", || async {
        ws_rows(&db, &btc) >= btc_before + 3
    })
    .await;
    let conns = streams_of(&sim, Market::Spot);
    assert_eq!(
        conns,
        vec![(conn_id, vec!["btcusdt@kline_1s".to_string()])],
        "same socket, one stream left"
    );
    assert_eq!(sim.ws_connections_opened(Market::Spot), 1, "no reconnect");
    wait_for(10, "statuses", || async {
        status_of(&db, &eth).is_some_and(|s| s.0 == "disabled")
            && status_of(&db, &btc).is_some_and(|s| s.0 == "streaming")
    })
    .await;

    // History and live meet without a hole or a duplicate.
    let upto = Period::S1.align(sim::now_ms()) - 4_000;
    wait_stored(&db, &btc, from, upto, 15).await;
    assert_complete(&db, &btc, from, upto);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_stalled_sockets_leave_no_missing_candle() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_heal");
    let d = daemon_on(&db, &sim, "").await;
    let p = PairKey::parse("spot", "BNBBTC", "1s").unwrap();
    let from = Period::S1.align(sim::now_ms()) - 30_000;
    insert_pair(&db, &p, 1, from);
    wait_for(20, "the stream", || async { ws_rows(&db, &p) >= 2 }).await;

    // Dropped: every socket cut without a close frame.
    sim.ws_drop_all();
    wait_for(10, "a reconnect", || async {
        sim.ws_connections_opened(Market::Spot) >= 2 && !streams_of(&sim, Market::Spot).is_empty()
    })
    .await;
    // Stalled: pings keep coming, data does not; the watchdog must notice.
    let opened = sim.ws_connections_opened(Market::Spot);
    sim.set_ws_stall(true);
    wait_for(10, "the watchdog to replace the quiet socket", || async {
        sim.ws_connections_opened(Market::Spot) > opened
    })
    .await;
    sim.set_ws_stall(false);
    // Finals withheld (in-progress updates still flow, so the watchdog stays calm): the late
    // check fetches each closed candle by REST.
    sim.set_ws_skip_finals(true);
    let rest_before = count(
        &db,
        &format!(
            "SELECT count() FROM klines WHERE {} AND source = 'rest'",
            where_pair(&p)
        ),
    );
    wait_for(10, "late candles fetched by REST", || async {
        count(
            &db,
            &format!(
                "SELECT count() FROM klines WHERE {} AND source = 'rest'",
                where_pair(&p)
            ),
        ) >= rest_before + 2
    })
    .await;
    sim.set_ws_skip_finals(false);
    let live = ws_rows(&db, &p);
    wait_for(10, "the stream to flow again", || async {
        ws_rows(&db, &p) >= live + 2
    })
    .await;
    wait_for(10, "reconnects in pair_status", || async {
        status_of(&db, &p).is_some_and(|s| s.2 >= 2)
    })
    .await;
    let upto = Period::S1.align(sim::now_ms()) - 2_000;
    wait_for(15, "healing", || async {
        count(
            &db,
            &format!(
                "SELECT count() FROM klines FINAL WHERE {} AND open_time >= {from} AND open_time < {upto} AND is_final = 1",
                where_pair(&p)
            ),
        ) == u64::try_from((upto - from) / 1000).unwrap()
    })
    .await;
    assert_complete(&db, &p, from, upto);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_renewed_make_before_break_without_gap_or_duplicate() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_rotate");
    // Catch-ups by REST would hide a gap: make them impossible to need by a long grace.
    let d = daemon_on(&db, &sim, "").await;
    d.edit(&db.yaml(&format!(
        "{}{}",
        common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um)),
        FAST.replace("idle_timeout: 3s", "idle_timeout: 3s\n    max_lifetime: 2s")
            .replace("late_grace: 1s", "late_grace: 30s")
            .replace("grace: 3s", "grace: 60s")
    )));
    let p = PairKey::parse("spot", "ETHUSDT", "1s").unwrap();
    let start = Period::S1.align(sim::now_ms());
    insert_pair(&db, &p, 1, start);
    wait_for(20, "three renewals", || async {
        sim.ws_connections_opened(Market::Spot) >= 4
    })
    .await;
    let first_ws: i64 = db
        .sql(&format!(
            "SELECT min(open_time) FROM klines WHERE {} AND source = 'ws'",
            where_pair(&p)
        ))
        .trim()
        .parse()
        .unwrap();
    let upto = Period::S1.align(sim::now_ms()) - 1_000;
    wait_for(5, "the last candles", || async {
        count(
            &db,
            &format!(
                "SELECT count() FROM klines WHERE {} AND open_time >= {first_ws} AND open_time < {upto}",
                where_pair(&p)
            ),
        ) >= u64::try_from((upto - first_ws) / 1000).unwrap()
    })
    .await;
    // Straight from the stream: every candle once (raw rows, not FINAL: no duplicate written).
    let raw = count(
        &db,
        &format!(
            "SELECT count() FROM klines WHERE {} AND open_time >= {first_ws} AND open_time < {upto}",
            where_pair(&p)
        ),
    );
    assert_eq!(raw, u64::try_from((upto - first_ws) / 1000).unwrap());
    assert_complete(&db, &p, first_ws, upto);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_pairs_spread_over_connections_on_the_upgraded_usdm_path() {
    let mut cfg = SimConfig::default();
    let symbols: Vec<String> = (0..300).map(|i| format!("S{i:03}USDT")).collect();
    for s in &symbols {
        cfg = cfg.with_symbol(Market::Um, s, sim::DEFAULT_LISTING_MS);
    }
    let sim = start_sim(cfg).await;
    let db = TestDb::new("op_300");
    // A legacy USD-M URL (no /market route): upgraded with a warning.
    let legacy = sim.ws_url(Market::Um).replace("/market/ws/", "/ws/");
    assert_ne!(legacy, sim.ws_url(Market::Um));
    let yaml = db.yaml(&format!(
        "{}{FAST}",
        common::sim_endpoints_yaml(&sim, &legacy)
    ));
    let d = Daemon::start(&yaml).await;
    wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM trading_pairs").is_ok()
    })
    .await;
    let from = Period::M1.align(sim::now_ms()) - 5 * 60_000;
    let values: Vec<String> = symbols
        .iter()
        .map(|s| format!("('um', '{s}', '1m', 1, {from})"))
        .collect();
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, enabled, backfill_from) VALUES {}",
        values.join(", ")
    ));
    wait_for(30, "300 subscriptions", || async {
        let conns = sim.ws_open_connections();
        conns
            .iter()
            .filter(|c| c.market == Market::Um)
            .map(|c| c.subscriptions.len())
            .sum::<usize>()
            == 300
    })
    .await;
    let conns: Vec<_> = sim
        .ws_open_connections()
        .into_iter()
        .filter(|c| c.market == Market::Um)
        .collect();
    assert_eq!(conns.len(), 2, "200 + 100 streams");
    assert!(conns
        .iter()
        .all(|c| c.routed && c.subscriptions.len() <= 200));
    let all: BTreeSet<String> = conns.iter().flat_map(|c| c.subscriptions.clone()).collect();
    assert_eq!(all.len(), 300);
    // Control messages stayed within 10/s per connection.
    let log = sim.ws_control_log();
    for c in &conns {
        let times: Vec<i64> = log
            .iter()
            .filter(|r| r.conn == c.id)
            .map(|r| r.at_ms)
            .collect();
        for w in times.windows(10) {
            assert!(
                w[9] - w[0] >= 1000,
                "more than 10 control messages in a second"
            );
        }
    }
    assert_eq!(sim.ws_closed_for_rate(), 0);
    // And the backfills all land (a generous bound: the chdb lane's front answers one query at
    // a time, and 2 cores serve it, the daemon and the simulator).
    wait_for(120, "300 backfills", || async {
        count(
            &db,
            &format!("SELECT uniqExact(symbol) FROM klines WHERE market = 'um' AND period = '1m' AND open_time = {from}"),
        ) == 300
    })
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_yaml_edits_apply_live_and_invalid_ones_change_nothing() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_yaml");
    let slow = FAST.replace("poll_interval: 200ms", "poll_interval: 1h");
    let base = |ops: &str| {
        db.yaml(&format!(
            "{}{ops}",
            common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
        ))
    };
    // A bad row declared before the start: once it is reported, the first reconcile (at
    // start) has happened, and the 1 h poll reads nothing new until an edit applies.
    let cfg = quantservice::config::Config::from_yaml_with_env(
        &base(&slow),
        Path::new("app.yaml"),
        |_| None,
    )
    .unwrap();
    quantservice::app::migrate(&cfg).await.unwrap();
    db.sql("INSERT INTO trading_pairs (market, symbol, period) VALUES ('xx', 'BTCUSDT', '1m')");
    let d = Daemon::start(&base(&slow)).await;
    wait_for(10, "the first reconcile", || async {
        db.try_sql("SELECT count() FROM pair_status FINAL WHERE market = 'xx'")
            .is_ok_and(|s| s.trim() == "1")
    })
    .await;
    let p = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    insert_pair(&db, &p, 1, Period::S1.align(sim::now_ms()) - 10_000);

    // An invalid edit (a fast poll plus a bad value) is rejected as a whole.
    let outcome = d
        .edit_and_wait(&base(&format!("{}  backfill:\n    concurrency: 0\n", FAST)))
        .await;
    assert_eq!(
        outcome,
        ReloadResult::Rejected {
            errors: vec!["app.backfill.concurrency: must be 1..64, got 0".to_string()]
        }
    );
    assert_eq!(ws_rows(&db, &p), 0, "invalid edit must not apply");
    assert!(streams_of(&sim, Market::Spot).is_empty());

    // A valid edit applies without a restart: the pair starts within the new poll interval.
    let outcome = d.edit_and_wait(&base(FAST)).await;
    assert_eq!(
        outcome,
        ReloadResult::Applied {
            changed: vec!["operator".to_string()]
        }
    );
    assert!(
        d.log
            .text()
            .contains("New config applied. changed=operator"),
        "{}",
        d.log.text()
    );
    wait_for(15, "the stream after the valid edit", || async {
        ws_rows(&db, &p) >= 1
    })
    .await;

    // A well-formed edit that cannot work (ClickHouse refuses the user) is refused too: the
    // running generation keeps streaming on its socket, and the daemon stays up.
    let opened = sim.ws_connections_opened(Market::Spot);
    let bad: String = base(FAST)
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("username:") {
                "    username: \"no_such_user_qs\"\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_ne!(bad, base(FAST));
    let outcome = d.edit_and_wait(&bad).await;
    let ReloadResult::Rejected { errors } = &outcome else {
        panic!("a config ClickHouse refuses was applied: {outcome:?}");
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("the edited config does not work: ")
            && errors[0].contains("no_such_user_qs"),
        "{errors:?}"
    );
    assert!(
        d.log.text().contains("The edited config does not work"),
        "{}",
        d.log.text()
    );
    let before = ws_rows(&db, &p);
    wait_for(15, "candles after the refused edit", || async {
        ws_rows(&db, &p) >= before + 5
    })
    .await;
    assert!(!d.task.is_finished(), "the daemon must survive a bad edit");
    assert_eq!(
        sim.ws_connections_opened(Market::Spot),
        opened,
        "nothing rebuilt"
    );
    // Back to the running config: nothing to change. Handling it proves the reconcile loop
    // was re-entered after the refusal, and refusing is not a restart: "Ready" was logged once.
    assert_eq!(
        d.edit_and_wait(&base(FAST)).await,
        ReloadResult::Applied { changed: vec![] }
    );
    let log = d.log.text();
    assert_eq!(log.matches("Ready; reconciling").count(), 1, "{log}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_desired_state_stops_nothing() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_unknown");
    // Pings every 200 ms with a 2 s pong deadline: the daemon must answer them all.
    sim.set_ws_ping_interval(Duration::from_millis(200));
    sim.set_ws_pong_deadline(Duration::from_secs(2));
    let d = daemon_on(&db, &sim, "").await;
    let p = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    insert_pair(&db, &p, 1, Period::S1.align(sim::now_ms()) - 5_000);
    wait_for(20, "the stream", || async { ws_rows(&db, &p) >= 2 }).await;
    db.sql("RENAME TABLE trading_pairs TO trading_pairs_away");
    let before = ws_rows(&db, &p);
    // Many polls (200 ms) fail meanwhile; the stream carries on.
    wait_for(10, "candles while the table is away", || async {
        ws_rows(&db, &p) >= before + 5
    })
    .await;
    assert_eq!(streams_of(&sim, Market::Spot).len(), 1);
    assert_eq!(
        sim.ws_connections_opened(Market::Spot),
        1,
        "pings answered, nothing reconnected"
    );
    db.sql("RENAME TABLE trading_pairs_away TO trading_pairs");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_only_pairs_are_kept_complete_by_gap_scans() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_scan");
    let d = daemon_on(&db, &sim, "").await;
    let p = PairKey::parse("spot", "ETHUSDT", "1s").unwrap();
    let from = Period::S1.align(sim::now_ms()) - 10_000;
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from, stream) VALUES ('spot', 'ETHUSDT', '1s', {from}, 0)"
    ));
    wait_for(10, "the backfill", || async {
        status_of(&db, &p).is_some_and(|s| s.0 == "idle")
    })
    .await;
    // No stream: candles closing from now on arrive only through the 1 s gap scans.
    let upto = Period::S1.align(sim::now_ms()) + 4_000;
    wait_stored(&db, &p, from, upto, 20).await;
    assert_complete(&db, &p, from, upto);
    assert_eq!(ws_rows(&db, &p), 0);
    assert!(streams_of(&sim, Market::Spot).is_empty());
    d.stop().await;
}

/// The binary: SIGTERM ends it cleanly within 10 s with everything flushed; `ws-start`
/// prints closed candles and writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_streams_prints_metrics_and_exits_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_bin");
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("app.yaml");
    std::fs::write(
        path,
        db.yaml(&format!(
            "{}{FAST}  logging:\n    level: info\n",
            common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
        ))
        .replace("  operator:\n", "  operator:\n    metrics_interval: 1s\n"),
    )
    .unwrap();

    // ws-start: two closed candles printed, then Ctrl-C.
    let mut child = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_quantservice"))
            .args([
                "ws-start", "--symbol", "BTCUSDT", "--market", "spot", "--period", "1s", "--config",
            ])
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let printed: Vec<String> = tokio::task::spawn_blocking(move || {
        (0..2).map(|_| lines.next().unwrap().unwrap()).collect()
    })
    .await
    .unwrap();
    assert!(
        printed
            .iter()
            .all(|l| l.starts_with("spot:BTCUSDT:1s open_time=")),
        "{printed:?}"
    );
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let p = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    assert!(ws_rows(&db, &p) >= 2, "ws-start wrote its candles");

    // The daemon: streams, prints the metrics line, exits 0 on SIGTERM with rows flushed.
    let eth = PairKey::parse("spot", "ETHUSDT", "1s").unwrap();
    let mut child = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_quantservice"))
            .arg("--config")
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM trading_pairs").is_ok()
    })
    .await;
    insert_pair(&db, &eth, 1, Period::S1.align(sim::now_ms()) - 5_000);
    wait_for(20, "the daemon's stream", || async {
        ws_rows(&db, &eth) >= 2
    })
    .await;
    let sent_before_stop = sim.ws_finals_sent();
    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let out = reader.join().unwrap();
    let metrics: Vec<&String> = out.iter().filter(|l| l.contains("Metrics: req=")).collect();
    assert!(
        !metrics.is_empty(),
        "no metrics line in:\n{}",
        out.join("\n")
    );
    let m = metrics.last().unwrap();
    let fields: Vec<&str> = m[m.find("Metrics: ").unwrap() + 9..].split(' ').collect();
    for (f, k) in fields.iter().zip(["req", "ok", "fail", "rows"]) {
        assert!(f.starts_with(&format!("{k}=")), "{m}");
        f[k.len() + 1..].parse::<u64>().unwrap();
    }
    assert!(
        out.iter().any(|l| l.contains("Writer flushed")),
        "{}",
        out.join("\n")
    );
    // Every closed candle the daemon received before the stop is stored.
    assert!(ws_rows(&db, &eth) >= 2);
    assert!(sent_before_stop > 0);
}

/// Observed state tells the truth: with the spot WebSocket unreachable (a dead port), a
/// streamed pair is `stream_down`, not `streaming`, and its `lag_ms` grows; REST keeps its
/// candles complete meanwhile (the late check fetches each one `late_grace` after its close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_whose_stream_cannot_connect_is_reported_down_with_a_growing_lag() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_down");
    let dead = common::dead_port();
    let endpoints = common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um)).replace(
        &sim.ws_url(Market::Spot),
        &format!("ws://127.0.0.1:{dead}/ws/"),
    );
    let d = Daemon::start(&db.yaml(&format!("{endpoints}{FAST}"))).await;
    wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM trading_pairs").is_ok()
    })
    .await;
    let p = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    let from = Period::S1.align(sim::now_ms()) - 10_000;
    insert_pair(&db, &p, 1, from);
    let lag = || {
        db.try_sql(&format!(
            "SELECT phase, lag_ms FROM pair_status FINAL WHERE {} FORMAT TSV",
            where_pair(&p)
        ))
        .ok()
        .and_then(|s| {
            let (phase, lag) = s.trim().split_once('\t')?;
            Some((phase.to_string(), lag.parse::<i64>().ok()?))
        })
    };
    wait_for(20, "stream_down in pair_status", || async {
        lag().is_some_and(|(phase, _)| phase == "stream_down")
    })
    .await;
    let (_, first) = lag().unwrap();
    wait_for(10, "the lag to grow by 2 s", || async {
        lag().is_some_and(|(phase, l)| phase == "stream_down" && l >= first + 2_000)
    })
    .await;
    // REST keeps the candles coming: everything closed more than a few seconds ago is stored.
    let upto = Period::S1.align(sim::now_ms()) - 4_000;
    wait_stored(&db, &p, from, upto, 15).await;
    assert_complete(&db, &p, from, upto);
    assert_eq!(ws_rows(&db, &p), 0);
    d.stop().await;
}

/// Only what an edit touches is rebuilt: new stream settings reconnect the streams, while the
/// pair tasks, the REST client (no new `exchangeInfo`) and the writer carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_settings_edit_reconnects_only_the_streams() {
    let sim = start_sim(SimConfig::default()).await;
    let db = TestDb::new("op_streams_edit");
    let yaml = |idle: &str| {
        db.yaml(&format!(
            "{}{}",
            common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um)),
            FAST.replace("idle_timeout: 3s", &format!("idle_timeout: {idle}"))
        ))
    };
    let d = Daemon::start(&yaml("3s")).await;
    wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM trading_pairs").is_ok()
    })
    .await;
    let p = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    let from = Period::S1.align(sim::now_ms()) - 10_000;
    insert_pair(&db, &p, 1, from);
    wait_for(20, "the stream", || async {
        ws_rows(&db, &p) >= 2 && status_of(&db, &p).is_some_and(|s| s.0 == "streaming")
    })
    .await;
    let infos = || {
        sim.requests()
            .iter()
            .filter(|r| r.path.ends_with("/exchangeInfo"))
            .count()
    };
    let (infos_before, opened) = (infos(), sim.ws_connections_opened(Market::Spot));

    let outcome = d.edit_and_wait(&yaml("4s")).await;
    assert_eq!(
        outcome,
        ReloadResult::Applied {
            changed: vec!["streams".to_string()]
        }
    );
    wait_for(10, "a new socket", || async {
        sim.ws_connections_opened(Market::Spot) > opened
    })
    .await;
    let before = ws_rows(&db, &p);
    wait_for(10, "candles on the new socket", || async {
        ws_rows(&db, &p) >= before + 3
    })
    .await;
    assert_eq!(
        infos(),
        infos_before,
        "no new REST client, no pair task restarted"
    );
    assert_eq!(status_of(&db, &p).unwrap().0, "streaming");
    let upto = Period::S1.align(sim::now_ms()) - 4_000;
    wait_stored(&db, &p, from, upto, 15).await;
    assert_complete(&db, &p, from, upto);
    assert!(
        !d.log.text().contains("Rebuilding clients"),
        "{}",
        d.log.text()
    );
    d.stop().await;
}
