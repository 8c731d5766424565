//! Client server benchmark (issue 11, §6). Two parts, chosen by `QS_BENCH_PART`
//! (`fanout`, `replay` or `all`, the default):
//!
//! - **Fan-out**: the embedded-style server (`router` + `serve` over a `Hub`, no ClickHouse) in
//!   this process; `QS_BENCH_CLIENTS` (default 10,000) WebSocket clients over loopback in a
//!   child process (this binary run again in client mode: the fd limit is per process), each
//!   subscribed live to one of `QS_BENCH_PAIRS` (default 100) um 1m pairs. Every 250 ms the
//!   server publishes one closed candle per pair (the next minute's: successive `open_time`s
//!   from the current minute on, each a new final candle) for `QS_BENCH_SECONDS` (default 15)
//!   seconds, every pair at the start of each tick (a burst of one frame per client), or,
//!   with `QS_BENCH_SPREAD=1`, the pairs spread evenly over the tick. Each candle's `trades`
//!   field carries the instant it was handed to the hub (µs since the epoch); each client
//!   takes now − that on receipt (one machine, one clock).
//!   Reported: latency p50/p99/max (target p99 < 50 ms), frames received vs expected (all
//!   must arrive), the server process's CPU while publishing and delivering, and its RSS per
//!   connection (VmRSS with every client connected and subscribed − VmRSS before, over N;
//!   target < 30 KB).
//! - **Replay**: `QS_BENCH_ROWS` (default 1,000,000) um BTCUSDT 1m synthetic candles written
//!   through the writer into a private ClickHouse, served with a store; one client subscribes
//!   with `since` = the first candle and reads until the last. Reported: candles/s delivered,
//!   median of `QS_BENCH_RUNS` (default 3) runs (target ≥ 500,000/s), and where the time goes:
//!   the same rows read from ClickHouse alone (`final_klines_after` in replay-sized chunks) and
//!   rendered alone (`protocol::kline`).
//!
//! Run: `cargo bench --bench clientserver` (the replay part starts a private ClickHouse; the
//! chdb lane with `QS_TEST_CLICKHOUSE_ENGINE=chdb`), e.g.
//! `QS_BENCH_PART=fanout QS_BENCH_CLIENTS=2000 cargo bench --bench clientserver`.
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

#[path = "../tests/common/mod.rs"]
mod common;

use common::median;

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::TestDb;
use futures_util::{SinkExt, StreamExt};
use qs_sim::synthetic;
use quantservice::market::{PairKey, Period};
use quantservice::server::client::{router, serve, ClientState, Limits};
use quantservice::server::hub::Hub;
use quantservice::server::{protocol, replay};
use quantservice::store::writer::Writer;
use quantservice::store::Store;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000;
/// 2023-01-01T00:00Z, the first stored candle of the replay part.
const FIRST: i64 = 1_672_531_200_000;
/// Set in the child process: the server's `/ws` URL (client mode).
const CLIENT_MODE: &str = "QS_BENCH_CLIENT_URL";
const TICK: Duration = Duration::from_millis(250);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// utime + stime of this process, in seconds.
fn cpu_secs() -> f64 {
    let (user, sys) = cpu_user_sys();
    user + sys
}

/// utime and stime of this process, in seconds.
fn cpu_user_sys() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| f[i].parse::<u64>().unwrap() as f64 / clk_tck();
    (ticks(11), ticks(12))
}

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn rss_kb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The soft limit on open files, from /proc/self/limits.
fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The integer after `"key":` in a frame (no full JSON parse: 40,000 frames/s on a shared core).
fn field(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn subscribe(id: u64, symbol: &str, since: Option<i64>) -> String {
    let since = since.map_or(String::new(), |s| format!(",\"since\":{s}"));
    format!(
        r#"{{"op":"subscribe","id":{id},"channel":"klines","market":"um","symbol":"{symbol}","period":"1m"{since}}}"#
    )
}

/// The next text frame (pings and pongs skipped).
async fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.next().await.expect("connection open").unwrap() {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn symbol(i: usize) -> String {
    format!("SYM{i}USDT")
}

fn main() {
    if let Ok(url) = std::env::var(CLIENT_MODE) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(clients(url));
        return;
    }
    let part = std::env::var("QS_BENCH_PART").unwrap_or_else(|_| "all".to_string());
    assert!(
        ["fanout", "replay", "all"].contains(&part.as_str()),
        "QS_BENCH_PART must be fanout, replay or all, not {part:?}"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if part != "replay" {
        rt.block_on(fanout());
    }
    if part != "fanout" {
        rt.block_on(replay_bench());
    }
}

// ---------------------------------------------------------------------------------------------
// Fan-out

async fn fanout() {
    let n: usize = env_num("QS_BENCH_CLIENTS", 10_000);
    let pairs: usize = env_num("QS_BENCH_PAIRS", 100);
    let secs: f64 = env_num("QS_BENCH_SECONDS", 15.0);
    let rounds = ((secs / TICK.as_secs_f64()).round() as u64).max(1);
    // Every pair's candle at the start of each tick (a burst of N frames), or the pairs
    // spread evenly over the tick.
    let spread = std::env::var("QS_BENCH_SPREAD").is_ok_and(|v| v == "1");
    if let Some(limit) = fd_limit() {
        assert!(
            limit as usize > n + 64,
            "{n} connections need more than the open-file limit of {limit}: raise it (ulimit -n)"
        );
    }

    let hub = Hub::default();
    let limits = Limits {
        max_connections: n + 16,
        max_connections_per_ip: n + 16,
        ..Limits::default()
    };
    let stop = CancellationToken::new();
    let state = ClientState::new(hub.clone(), None, limits, vec![], stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let serving = tokio::spawn(serve(listener, router(state), stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_kb();
    // Other work on the machine skews every figure here: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_string();

    let t = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env(CLIENT_MODE, &url)
        .env("QS_BENCH_CLIENTS", n.to_string())
        .env("QS_BENCH_PAIRS", pairs.to_string())
        .env("QS_BENCH_ROUNDS", rounds.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .next_line()
        .await
        .unwrap()
        .expect("the clients' ready line");
    assert_eq!(ready, "ready", "{ready}");
    assert_eq!(hub.subscriptions(), n, "every client subscribed");
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_kb();

    let keys: Vec<PairKey> = (0..pairs)
        .map(|i| PairKey::parse("um", &symbol(i), "1m").unwrap())
        .collect();
    let base = Period::M1.align(quantservice::market::now_ms());
    let ((user0, sys0), t0) = (cpu_user_sys(), Instant::now());
    let start = tokio::time::Instant::now();
    for round in 0..rounds {
        let at = start + TICK * round as u32;
        for (j, key) in keys.iter().enumerate() {
            if spread {
                tokio::time::sleep_until(at + TICK * j as u32 / pairs as u32).await;
            } else if j == 0 {
                tokio::time::sleep_until(at).await;
            }
            let mut k = synthetic::candle(key, base + round as i64 * MIN);
            k.trades = now_us();
            hub.publish_kline(&k);
        }
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    let result = lines
        .next_line()
        .await
        .unwrap()
        .expect("the clients' result line");
    let ((user1, sys1), wall) = (cpu_user_sys(), t0.elapsed().as_secs_f64());
    let rss_after = rss_kb();
    let child_cpu = lines.next_line().await.unwrap().unwrap_or_default();
    child.wait().await.unwrap();
    stop.cancel();
    let _ = serving.await;

    let get = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    let received = get(&result, "received");
    let expected = n as u64 * rounds;
    let ms = |us: u64| us as f64 / 1000.0;
    let (user, sys) = (user1 - user0, sys1 - sys0);
    let cpu = user + sys;
    let per_conn = |rss: f64| (rss - rss_before) / n as f64;
    println!(
        "Client server fan-out: {n} WebSocket clients over loopback (a separate process), \
         {pairs} um 1m pairs, one closed candle per pair every 250 ms for {publish_secs:.1} s \
         ({rounds} rounds, {}), {} cores, load average {load} before the run\n",
        if spread {
            "the pairs spread over each 250 ms"
        } else {
            "every pair at the start of each 250 ms: a burst of one frame per client"
        },
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!("| connect + subscribe {n} clients | {connect_secs:.1} s | |");
    println!("| frames received / expected | {received} / {expected} | all |");
    println!(
        "| latency p50 / p99 / p99.9 / max | {:.2} / {:.2} / {:.2} / {:.2} ms | p99 < 50 ms |",
        ms(get(&result, "p50")),
        ms(get(&result, "p99")),
        ms(get(&result, "p999")),
        ms(get(&result, "max"))
    );
    println!(
        "| server CPU over {wall:.1} s (publish → last frame received) | {cpu:.2} s ({user:.2} user + {sys:.2} sys) = {:.0} % of one core, {:.1} µs per frame | |",
        100.0 * cpu / wall,
        1e6 * cpu / expected as f64
    );
    println!("| client process CPU over the same | {child_cpu} | |");
    println!(
        "| server RSS before / connected / after the run | {:.1} / {:.1} / {:.1} MB | |",
        rss_before / 1024.0,
        rss_connected / 1024.0,
        rss_after / 1024.0
    );
    println!(
        "| RSS per connection, connected and subscribed | {:.1} KB | < 30 KB |",
        per_conn(rss_connected)
    );
    println!(
        "| RSS per connection, after the run | {:.1} KB | |\n",
        per_conn(rss_after)
    );
    assert_eq!(received, expected, "frames missing: {result}");
}

/// Client mode (the child process): connects `QS_BENCH_CLIENTS` clients, subscribes each to
/// one pair, prints `ready`, then reads `QS_BENCH_ROUNDS` candles on every connection and
/// prints `result received=… p50=… p99=… p999=… max=…` (µs), then its CPU line.
async fn clients(url: String) {
    let n: usize = env_num("QS_BENCH_CLIENTS", 10_000);
    let pairs: usize = env_num("QS_BENCH_PAIRS", 100);
    let rounds: u64 = env_num("QS_BENCH_ROUNDS", 60);
    let subscribed = Arc::new(AtomicUsize::new(0));
    let all_subscribed = Arc::new(tokio::sync::Notify::new());
    let go = CancellationToken::new();
    // A few connects at a time (the accept queue is finite).
    let connecting = Arc::new(tokio::sync::Semaphore::new(64));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (url, subscribed, all_subscribed, go, connecting) = (
                url.clone(),
                subscribed.clone(),
                all_subscribed.clone(),
                go.clone(),
                connecting.clone(),
            );
            tokio::spawn(async move {
                let permit = connecting.acquire().await.unwrap();
                let mut ws = tokio_tungstenite::connect_async(&url).await.unwrap().0;
                ws.send(Message::text(subscribe(i as u64, &symbol(i % pairs), None)))
                    .await
                    .unwrap();
                let reply = next_text(&mut ws).await;
                assert!(reply.contains("\"subscribed\""), "{reply}");
                drop(permit);
                if subscribed.fetch_add(1, Ordering::SeqCst) + 1 == n {
                    all_subscribed.notify_one();
                }
                let mut lat = Vec::with_capacity(rounds as usize);
                while (lat.len() as u64) < rounds {
                    let msg = tokio::select! {
                        m = ws.next() => m,
                        _ = go.cancelled() => break, // the deadline
                    };
                    let Some(Ok(Message::Text(t))) = msg else {
                        match msg {
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                            other => panic!("client {i}: {other:?}"),
                        }
                    };
                    let stamp = field(t.as_str(), "\"trades\":").unwrap();
                    lat.push(now_us().saturating_sub(stamp));
                }
                (ws, lat)
            })
        })
        .collect();
    if tokio::time::timeout(Duration::from_secs(300), all_subscribed.notified())
        .await
        .is_err()
    {
        panic!(
            "only {} of {n} clients subscribed within 300 s",
            subscribed.load(Ordering::SeqCst)
        );
    }
    println!("ready");
    let cpu0 = cpu_secs();
    let t0 = Instant::now();
    // Generous: the whole run plus 30 s.
    let deadline = TICK * rounds as u32 + Duration::from_secs(30);
    let cancel = go.clone();
    tokio::spawn(async move {
        tokio::time::sleep(deadline).await;
        cancel.cancel();
    });
    let mut all = Vec::with_capacity(n * rounds as usize);
    let mut sockets = Vec::with_capacity(n);
    for task in tasks {
        let (ws, lat) = task.await.unwrap();
        all.extend(lat);
        sockets.push(ws);
    }
    let (cpu, wall) = (cpu_secs() - cpu0, t0.elapsed().as_secs_f64());
    all.sort_unstable();
    let received = all.len();
    if all.is_empty() {
        all.push(0); // nothing arrived: the parent reports the count
    }
    println!(
        "result received={received} p50={} p99={} p999={} max={}",
        pct(&all, 0.5),
        pct(&all, 0.99),
        pct(&all, 0.999),
        all[all.len() - 1]
    );
    println!(
        "{cpu:.2} s over {wall:.1} s = {:.0} % of one core",
        100.0 * cpu / wall
    );
    drop(sockets);
}

// ---------------------------------------------------------------------------------------------
// Replay

async fn replay_bench() {
    let rows: i64 = env_num("QS_BENCH_ROWS", 1_000_000);
    let runs: usize = env_num("QS_BENCH_RUNS", 3);

    let db = TestDb::new("bench_clientserver");
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
    let last = FIRST + (rows - 1) * MIN;

    let stop = CancellationToken::new();
    let state = ClientState::new(
        Hub::default(),
        Some(store.clone()),
        Limits::default(),
        vec![],
        stop.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let serving = tokio::spawn(serve(listener, router(state), stop.clone()));

    // Whole replays through one client.
    let mut rates = Vec::new();
    let mut bytes = 0usize;
    for _ in 0..runs {
        let mut ws = tokio_tungstenite::connect_async(&url).await.unwrap().0;
        let t = Instant::now();
        ws.send(Message::text(subscribe(1, "BTCUSDT", Some(FIRST))))
            .await
            .unwrap();
        let reply = next_text(&mut ws).await;
        assert!(reply.contains("\"subscribed\""), "{reply}");
        let (mut got, mut expect) = (0i64, FIRST);
        bytes = 0;
        loop {
            let text = next_text(&mut ws).await;
            let open_time = field(&text, "\"open_time\":").unwrap() as i64;
            assert_eq!(open_time, expect, "candles in order, none missing");
            got += 1;
            bytes += text.len();
            if open_time == last {
                break;
            }
            expect += MIN;
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(got, rows);
        rates.push(rows as f64 / secs);
        eprintln!("replay: {rows} candles in {secs:.2} s");
        let _ = ws.close(None).await;
    }
    let rate = median(&mut rates);

    // Where the time goes: the ClickHouse reads alone, then the rendering alone.
    let t = Instant::now();
    let mut read = Vec::with_capacity(rows as usize);
    let mut after = FIRST - 1;
    loop {
        let chunk = store
            .final_klines_after(&pair, after, replay::CHUNK)
            .await
            .unwrap();
        let done = (chunk.len() as u64) < replay::CHUNK;
        if let Some(k) = chunk.last() {
            after = k.open_time;
        }
        read.extend(chunk);
        if done {
            break;
        }
    }
    let read_secs = t.elapsed().as_secs_f64();
    assert_eq!(read.len() as i64, rows);
    let t = Instant::now();
    let rendered: usize = read.iter().map(|k| protocol::kline(k).len()).sum();
    let render_secs = t.elapsed().as_secs_f64();
    assert_eq!(rendered, bytes);

    // The reads' two queries per chunk, timed alone over ClickHouse's HTTP interface: the
    // next stored candle after the cursor (`count(), min(open_time)` without `FINAL`), then
    // the chunk's window with `FINAL`, in RowBinary like the clickhouse crate's.
    let clickhouse = format!(
        "http://{}:{}/?database={}",
        db.host,
        db.port,
        common::percent_encode(&db.name)
    );
    let http = reqwest::Client::new();
    let pair_sql = "market = 'um' AND symbol = 'BTCUSDT' AND period = '1m' AND is_final = 1";
    let (mut window_secs, mut window_bytes) = (0.0, 0usize);
    let chunk = replay::CHUNK as i64;
    let mut after = FIRST - 1;
    while after < last {
        // The query `final_klines_after` sends for a window (no hole here: no lookup).
        let t = Instant::now();
        let sql = format!(
            "SELECT open_time, close_time, open, high, low, close, volume, quote_volume, trades, \
             taker_buy_volume, taker_buy_quote_volume, source FROM klines FINAL WHERE {pair_sql} \
             AND open_time > {after} AND open_time < {} ORDER BY open_time LIMIT {chunk} \
             FORMAT RowBinary",
            after + chunk * MIN + 1
        );
        let resp = http.post(&clickhouse).body(sql).send().await.unwrap();
        assert!(resp.status().is_success());
        window_bytes += resp.bytes().await.unwrap().len();
        window_secs += t.elapsed().as_secs_f64();
        after += chunk * MIN;
    }

    stop.cancel();
    let _ = serving.await;

    println!(
        "Client server replay: one client, `since` = {rows} candles ago (um BTCUSDT 1m), \
         ClickHouse {version}\n"
    );
    println!("| measure | candles/s | time for {rows} | target |");
    println!("|---|---|---|---|");
    println!(
        "| replay delivered over WebSocket (median of {runs}) | {rate:.0} | {:.2} s | ≥ 500,000/s |",
        rows as f64 / rate
    );
    println!(
        "| ClickHouse reads alone (`final_klines_after`, chunks of {}) | {:.0} | {read_secs:.2} s | |",
        replay::CHUNK,
        rows as f64 / read_secs
    );
    println!(
        "| rendering alone (`protocol::kline`) | {:.0} | {render_secs:.2} s | |",
        rows as f64 / render_secs
    );
    println!(
        "| of which, over HTTP: the chunk's window with `FINAL` (RowBinary, {:.0} MB) | | {window_secs:.2} s | |",
        window_bytes as f64 / 1e6
    );
    println!(
        "\n{:.0} bytes per frame, {:.0} MB/s of JSON delivered",
        bytes as f64 / rows as f64,
        bytes as f64 * rate / rows as f64 / 1e6
    );
}
