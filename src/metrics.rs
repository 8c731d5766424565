//! Process-wide metrics: the counters behind the `Metrics:` log line (`req=… ok=… fail=…
//! rows=…`, counted since the process started, across live reconfigurations that rebuild the
//! clients), the labelled families of the Prometheus endpoint, and the registry of collectors
//! through which other modules add families read at scrape time (observed state, the running
//! generation; later the client server's connections and messages). A module adds a family by
//! declaring a static [`CounterVec`]/[`GaugeVec`] or registering a collector — never by
//! editing this file's internals. Serving `/metrics` is not here (`server::ops`).

mod exposition;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

pub use exposition::{escape_label_value, CounterVec, Family, GaugeVec, Kind, Scrape};

/// REST requests sent to Binance.
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// REST requests answered with success.
pub static OK: AtomicU64 = AtomicU64::new(0);
/// REST requests that failed (HTTP error, timeout, network).
pub static FAIL: AtomicU64 = AtomicU64::new(0);
/// Kline rows committed to ClickHouse.
pub static ROWS: AtomicU64 = AtomicU64::new(0);
/// Closed candles received on WebSocket streams.
pub static WS_FINALS: AtomicU64 = AtomicU64::new(0);
/// Stream socket reconnects.
pub static WS_RECONNECTS: AtomicU64 = AtomicU64::new(0);

/// Failures of supervised tasks (errors, panics, unexpected exits), restarted or not.
pub static TASK_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Failed ClickHouse insert attempts of the kline writer (each batch is retried).
pub static WRITER_INSERT_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Generations of clients and tasks started (1 at start, one more per rebuilding edit).
pub static GENERATIONS: AtomicU64 = AtomicU64::new(0);
/// Reconcile passes completed.
pub static RECONCILE_PASSES: AtomicU64 = AtomicU64::new(0);

const MARKET_EGRESS: &[&str] = &["market", "egress"];

/// REST requests by market and egress (`direct`, or a proxy's `host:port`).
pub static REST_REQUESTS: CounterVec = CounterVec::new(
    "quantservice_rest_requests_total",
    "REST requests sent to Binance, by market and egress (direct or proxy host:port).",
    MARKET_EGRESS,
);
pub static REST_OK: CounterVec = CounterVec::new(
    "quantservice_rest_requests_ok_total",
    "REST requests answered with HTTP 200.",
    MARKET_EGRESS,
);
pub static REST_FAILED: CounterVec = CounterVec::new(
    "quantservice_rest_requests_failed_total",
    "REST requests that failed (an HTTP error status, a timeout, a network or proxy error).",
    MARKET_EGRESS,
);
/// Counted by the rate governor when it reserves weight for a request.
pub static REST_WEIGHT: CounterVec = CounterVec::new(
    "quantservice_rest_weight_used_total",
    "REQUEST_WEIGHT spent by the requests sent.",
    MARKET_EGRESS,
);
pub static REST_429: CounterVec = CounterVec::new(
    "quantservice_rest_http_429_total",
    "HTTP 429 answers (request weight exceeded; the market pauses).",
    MARKET_EGRESS,
);
pub static REST_418: CounterVec = CounterVec::new(
    "quantservice_rest_http_418_total",
    "HTTP 418 answers (the address is banned for a while).",
    MARKET_EGRESS,
);
/// Outcomes of `app.yaml` edits: `applied` or `rejected`.
pub static CONFIG_RELOADS: CounterVec = CounterVec::new(
    "quantservice_config_reloads_total",
    "Outcomes of app.yaml edits (result: applied or rejected; a rejected edit changes nothing).",
    &["result"],
);
/// Streams subscribed and connections open, per market (set by the reconcile loop).
pub static STREAMS: GaugeVec = GaugeVec::new(
    "quantservice_streams",
    "Kline streams subscribed on the WebSocket connections.",
    &["market"],
);
pub static STREAM_CONNECTIONS: GaugeVec = GaugeVec::new(
    "quantservice_stream_connections",
    "WebSocket connections open for kline streams.",
    &["market"],
);

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A REST request goes out through `egress`: counted for the metrics line and by market and
/// egress (the answer counters of the pair start at 0, so they exist before the first one).
pub fn rest_sent(market: &str, egress: &str) {
    add(&REQUESTS, 1);
    let labels = [market, egress];
    REST_REQUESTS.inc(&labels, 1);
    for zero in [&REST_OK, &REST_FAILED, &REST_WEIGHT, &REST_429, &REST_418] {
        zero.inc(&labels, 0);
    }
}

/// A REST request was answered with success.
pub fn rest_ok(market: &str, egress: &str) {
    add(&OK, 1);
    REST_OK.inc(&[market, egress], 1);
}

/// A REST request failed.
pub fn rest_failed(market: &str, egress: &str) {
    add(&FAIL, 1);
    REST_FAILED.inc(&[market, egress], 1);
}

/// The client server's figures (set while one runs; see `server::client`).
pub mod clients {
    use std::sync::atomic::{AtomicBool, AtomicU64};

    /// Whether a client server runs in this process (its fields appear on the metrics line
    /// and its families on `/metrics` only then).
    pub static RUNNING: AtomicBool = AtomicBool::new(false);
    /// Open client connections.
    pub static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
    /// Subscriptions of all connections.
    pub static SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(0);
    /// Data and reply frames written to client sockets, and their bytes.
    pub static MESSAGES: AtomicU64 = AtomicU64::new(0);
    pub static BYTES: AtomicU64 = AtomicU64::new(0);
    /// Connections closed as slow consumers (1008).
    pub static SLOW: AtomicU64 = AtomicU64::new(0);
    /// REST facade requests answered.
    pub static REST: AtomicU64 = AtomicU64::new(0);
}

/// The metrics line, e.g. `Metrics: req=1250 ok=1248 fail=2 rows=124800 ws_finals=… reconnects=…
/// task_failures=… streams=…`.
pub fn line(streams: usize) -> String {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "Metrics: req={} ok={} fail={} rows={} ws_finals={} reconnects={} task_failures={} streams={streams}",
        g(&REQUESTS),
        g(&OK),
        g(&FAIL),
        g(&ROWS),
        g(&WS_FINALS),
        g(&WS_RECONNECTS),
        g(&TASK_FAILURES)
    ) + &client_fields()
}

/// ` clients=… subs=… sent=… sent_bytes=… slow_consumers=…` while a client server runs.
fn client_fields() -> String {
    use clients::*;
    if !RUNNING.load(Ordering::Relaxed) {
        return String::new();
    }
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        " clients={} subs={} sent={} sent_bytes={} slow_consumers={} rest={}",
        g(&CONNECTIONS),
        g(&SUBSCRIPTIONS),
        g(&MESSAGES),
        g(&BYTES),
        g(&SLOW),
        g(&REST)
    )
}

/// The build the binary reports (`--version`): the git commit and the build date. The binary sets
/// it at start (build.rs gives them to the binary only, so the library does not recompile on
/// every commit); `unknown` until then.
static BUILD: OnceLock<(String, String)> = OnceLock::new();

/// Records the running build's git commit and build date for `quantservice_build_info`; the
/// first call wins.
pub fn set_build(commit: &str, date: &str) {
    let _ = BUILD.set((commit.to_string(), date.to_string()));
}

/// Unix seconds when the daemon started (see [`mark_start`]).
static STARTED: OnceLock<f64> = OnceLock::new();

/// Records the process start time (`process_start_time_seconds`); the first call wins.
pub fn mark_start() {
    STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    });
}

type Collector = Arc<dyn Fn(&mut Scrape) + Send + Sync>;

static COLLECTORS: Mutex<BTreeMap<u64, Collector>> = Mutex::new(BTreeMap::new());
static NEXT_COLLECTOR: AtomicU64 = AtomicU64::new(0);

/// A registered collector; dropping it unregisters it (a generation's collector goes with the
/// generation).
#[must_use = "the collector is unregistered when this is dropped"]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        COLLECTORS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// Registers `collect`, called at every scrape to add families read from live state (it must
/// be quick and must not block: it runs on the server's request).
pub fn register(collect: impl Fn(&mut Scrape) + Send + Sync + 'static) -> Registration {
    let id = NEXT_COLLECTOR.fetch_add(1, Ordering::Relaxed);
    COLLECTORS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, Arc::new(collect));
    Registration(id)
}

/// Everything measured now: this module's families, then every registered collector's.
pub fn scrape() -> Scrape {
    let mut s = Scrape::default();
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    let (commit, built) = BUILD
        .get()
        .map_or(("unknown", "unknown"), |(c, d)| (c.as_str(), d.as_str()));
    s.gauge(
        "quantservice_build_info",
        "The running build (always 1; version, git commit and build date are labels).",
    )
    .sample(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", commit),
            ("built", built),
        ],
        1.0,
    );
    if let Some(t) = STARTED.get() {
        s.gauge(
            "process_start_time_seconds",
            "When the process started, in Unix seconds.",
        )
        .value(*t);
    }
    if clients::RUNNING.load(Ordering::Relaxed) {
        for (name, help, c) in [
            (
                "quantservice_client_connections",
                "Open client server connections (WebSocket /ws).",
                &clients::CONNECTIONS,
            ),
            (
                "quantservice_client_subscriptions",
                "Subscriptions of the client server's connections.",
                &clients::SUBSCRIPTIONS,
            ),
        ] {
            s.gauge(name, help).value(g(c));
        }
        for (name, help, c) in [
            (
                "quantservice_client_messages_sent_total",
                "Frames written to client server connections.",
                &clients::MESSAGES,
            ),
            (
                "quantservice_client_bytes_sent_total",
                "Bytes of the frames written to client server connections.",
                &clients::BYTES,
            ),
            (
                "quantservice_client_slow_consumers_total",
                "Client connections closed as slow consumers (1008).",
                &clients::SLOW,
            ),
            (
                "quantservice_client_rest_requests_total",
                "Requests answered by the Binance-compatible REST facade.",
                &clients::REST,
            ),
        ] {
            s.counter(name, help).value(g(c));
        }
    }
    for (name, help, c) in [
        (
            "quantservice_kline_rows_written_total",
            "Kline rows committed to ClickHouse by the writer.",
            &ROWS,
        ),
        (
            "quantservice_writer_insert_failures_total",
            "Failed ClickHouse insert attempts of the kline writer (the batch is kept and retried).",
            &WRITER_INSERT_FAILURES,
        ),
        (
            "quantservice_ws_closed_candles_total",
            "Closed candles received on the WebSocket streams (repeats included).",
            &WS_FINALS,
        ),
        (
            "quantservice_stream_reconnects_total",
            "WebSocket stream connections re-established after a loss.",
            &WS_RECONNECTS,
        ),
        (
            "quantservice_task_failures_total",
            "Failures of supervised tasks (errors, panics, unexpected exits), restarted or not.",
            &TASK_FAILURES,
        ),
        (
            "quantservice_generations_total",
            "Generations of clients and tasks started: 1 at start, one more per edit that rebuilds them.",
            &GENERATIONS,
        ),
        (
            "quantservice_reconcile_passes_total",
            "Reconcile passes completed.",
            &RECONCILE_PASSES,
        ),
    ] {
        s.counter(name, help).value(g(c));
    }
    for c in [
        &REST_REQUESTS,
        &REST_OK,
        &REST_FAILED,
        &REST_WEIGHT,
        &REST_429,
        &REST_418,
        &CONFIG_RELOADS,
    ] {
        c.collect(&mut s);
    }
    STREAMS.collect(&mut s);
    STREAM_CONNECTIONS.collect(&mut s);
    let collectors: Vec<Collector> = COLLECTORS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    for c in collectors {
        c(&mut s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_starts_with_the_four_fields_users_parse() {
        let l = super::line(3);
        let fields: Vec<&str> = l.split(' ').collect();
        assert_eq!(fields[0], "Metrics:");
        for (f, name) in fields[1..5].iter().zip(["req", "ok", "fail", "rows"]) {
            let (k, v) = f.split_once('=').unwrap();
            assert_eq!(k, name);
            v.parse::<u64>().unwrap();
        }
        assert!(l.ends_with("streams=3"));
    }

    #[test]
    fn collectors_add_families_until_dropped() {
        let reg = register(|s| {
            s.gauge("t_collected", "From a collector.").value(42.0);
        });
        assert_eq!(scrape().get("t_collected", &[]), Some(42.0));
        drop(reg);
        assert_eq!(scrape().get("t_collected", &[]), None);
    }

    #[test]
    fn a_request_makes_every_answer_series_exist() {
        rest_sent("cm", "t-egress:1");
        rest_failed("cm", "t-egress:1");
        let s = scrape();
        let l = [("market", "cm"), ("egress", "t-egress:1")];
        assert!(s.get("quantservice_rest_requests_total", &l).unwrap() >= 1.0);
        assert!(
            s.get("quantservice_rest_requests_failed_total", &l)
                .unwrap()
                >= 1.0
        );
        for zero in [
            "quantservice_rest_requests_ok_total",
            "quantservice_rest_http_429_total",
            "quantservice_rest_http_418_total",
        ] {
            assert_eq!(s.get(zero, &l), Some(0.0), "{zero}");
        }
    }
}
