//! The ops endpoint on `app.http.listen`: `GET /healthz` (the process is alive), `GET /readyz`
//! (ClickHouse answers and a reconcile pass completed lately), `GET /metrics` (Prometheus text:
//! every family `crate::metrics` collects), and the client side of readiness behind
//! `quantservice ready`. What "a pass completed" and "which ClickHouse" mean is
//! told by the operator through [`OpsState`]; this module only answers. Not here: running or
//! restarting the server (the operator's supervisor does, as the service `ops_endpoint`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::format_duration;
use crate::store::Store;

/// How long `/readyz` waits for ClickHouse's answer to `SELECT 1`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A probe result is reused this long (scrapes in a burst cost ClickHouse one query).
const PROBE_TTL: Duration = Duration::from_secs(1);
/// A reconcile pass older than this many poll intervals makes the daemon not ready.
pub const STALE_PASSES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: String,
        source: std::io::Error,
    },
    #[error("the ops endpoint on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What readiness is judged from, shared by the operator (which updates it) and the server.
/// Cheap to clone.
#[derive(Clone)]
pub struct OpsState {
    inner: Arc<Mutex<Inner>>,
    /// The last ClickHouse probe and when it ran; the lock makes concurrent probes one.
    probe: Arc<tokio::sync::Mutex<Option<Probe>>>,
}

/// When ClickHouse was last probed, and what it said.
type Probe = (Instant, Result<(), String>);

struct Inner {
    /// The ClickHouse the running generation uses (probed by `/readyz`).
    store: Option<Store>,
    last_pass: Option<Instant>,
    /// The same, in Unix seconds (for `/metrics`).
    last_pass_unix: Option<f64>,
    poll_interval: Duration,
    stopping: bool,
    /// Where the server listens now (`None` while it does not).
    bound: Option<SocketAddr>,
}

impl OpsState {
    pub fn new(store: Option<Store>, poll_interval: Duration) -> OpsState {
        OpsState {
            inner: Arc::new(Mutex::new(Inner {
                store,
                last_pass: None,
                last_pass_unix: None,
                poll_interval,
                stopping: false,
                bound: None,
            })),
            probe: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ClickHouse to probe from now on (a new generation's).
    pub fn set_store(&self, store: Store) {
        self.lock().store = Some(store);
        if let Ok(mut p) = self.probe.try_lock() {
            *p = None;
        }
    }

    pub fn set_poll_interval(&self, poll_interval: Duration) {
        self.lock().poll_interval = poll_interval;
    }

    /// A reconcile pass just completed.
    pub fn reconciled(&self) {
        let mut i = self.lock();
        i.last_pass = Some(Instant::now());
        i.last_pass_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64());
    }

    /// Shutdown began: not ready any more (the process still answers `/healthz`).
    pub fn stopping(&self) {
        self.lock().stopping = true;
    }

    /// Where the endpoint listens now (`None` while it does not): the port actually bound
    /// when `app.http.listen` asks for port 0.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.lock().bound
    }

    fn set_bound(&self, addr: Option<SocketAddr>) {
        self.lock().bound = addr;
    }

    /// `Ok` when ready; otherwise the reason, as `/readyz` prints it (`not ready: …`). Never
    /// contains a secret (store errors are scrubbed of the password).
    pub async fn readiness(&self) -> Result<(), String> {
        let (store, last_pass, poll, stopping) = {
            let i = self.lock();
            (i.store.clone(), i.last_pass, i.poll_interval, i.stopping)
        };
        if stopping {
            return verdict(true, Ok(()), None, poll);
        }
        let Some(store) = store else {
            return Err("not ready: starting".to_string());
        };
        let clickhouse = self.probe(&store).await;
        verdict(false, clickhouse, last_pass.map(|t| t.elapsed()), poll)
    }

    /// `SELECT 1` on `store`, or the result of one that ran less than [`PROBE_TTL`] ago.
    async fn probe(&self, store: &Store) -> Result<(), String> {
        let mut last = self.probe.lock().await;
        if let Some((at, result)) = last.as_ref() {
            if at.elapsed() < PROBE_TTL {
                return result.clone();
            }
        }
        let result = store.ping(PROBE_TIMEOUT).await.map_err(|e| e.to_string());
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// Readiness from what was observed: shutting down, the ClickHouse probe, the age of the last
/// completed reconcile pass (`None`: none yet) and the poll interval. Pure.
pub fn verdict(
    stopping: bool,
    clickhouse: Result<(), String>,
    last_pass_age: Option<Duration>,
    poll_interval: Duration,
) -> Result<(), String> {
    if stopping {
        return Err("not ready: shutting down".to_string());
    }
    if let Err(e) = clickhouse {
        return Err(format!("not ready: ClickHouse unreachable: {e}"));
    }
    let stale_after = poll_interval.saturating_mul(STALE_PASSES);
    match last_pass_age {
        None => Err("not ready: no reconcile pass yet".to_string()),
        Some(age) if age > stale_after => Err(format!(
            "not ready: no reconcile pass in the last {}",
            format_duration(stale_after)
        )),
        Some(_) => Ok(()),
    }
}

/// The content type of the Prometheus text format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The routes: `/healthz`, `/readyz`, `/metrics`; anything else is 404.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, String) {
    match state.readiness().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Every registered family (`crate::metrics::scrape`), plus readiness and the last pass.
async fn metrics(State(state): State<OpsState>) -> impl axum::response::IntoResponse {
    let ready = state.readiness().await.is_ok();
    let mut s = crate::metrics::scrape();
    s.gauge(
        "quantservice_ready",
        "1 when /readyz answers 200 (ClickHouse answers and a reconcile pass is recent).",
    )
    .value(if ready { 1.0 } else { 0.0 });
    if let Some(t) = state.lock().last_pass_unix {
        s.gauge(
            "quantservice_last_reconcile_timestamp_seconds",
            "When the last reconcile pass completed, in Unix seconds.",
        )
        .value(t);
    }
    (
        [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        s.render(),
    )
}

/// Serves the endpoint on `listen` until `cancel`. A bind failure is an error (the supervisor
/// retries it with backoff); the process goes on either way.
pub async fn serve(
    listen: &str,
    state: OpsState,
    cancel: CancellationToken,
) -> Result<(), OpsError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| OpsError::Bind {
            listen: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| OpsError::Bind {
        listen: listen.to_string(),
        source,
    })?;
    state.set_bound(Some(addr));
    info!(%addr, "Ops endpoint listening (/healthz, /readyz, /metrics).");
    let served = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    state.set_bound(None);
    served.map_err(|source| OpsError::Serve { addr, source })
}

/// Why `quantservice ready` gives up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadyError {
    #[error("ops endpoint disabled (app.http.listen is empty)")]
    Disabled,
    #[error("app.http.listen {0:?} has port 0 (a free port picked at start); set a fixed port to poll it")]
    NoFixedPort(String),
    #[error("not ready within {}; last answer from {url}: {last}", format_duration(*.timeout))]
    Timeout {
        url: String,
        timeout: Duration,
        last: String,
    },
}

/// The `/readyz` URL a local client polls for `listen`: a wildcard address is reached on the
/// loopback of its family (`0.0.0.0` → `127.0.0.1`, `[::]` → `[::1]`).
pub fn readyz_url(listen: &str) -> Result<String, ReadyError> {
    if listen.is_empty() {
        return Err(ReadyError::Disabled);
    }
    let (host, port) = match listen.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.ip().is_unspecified() => ("127.0.0.1".to_string(), a.port()),
        Ok(SocketAddr::V6(a)) if a.ip().is_unspecified() => ("[::1]".to_string(), a.port()),
        Ok(SocketAddr::V4(a)) => (a.ip().to_string(), a.port()),
        Ok(SocketAddr::V6(a)) => (format!("[{}]", a.ip()), a.port()),
        Err(_) => match listen.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), port.parse().unwrap_or(0)),
            None => (listen.to_string(), 0),
        },
    };
    if port == 0 {
        return Err(ReadyError::NoFixedPort(listen.to_string()));
    }
    Ok(format!("http://{host}:{port}/readyz"))
}

/// How often `quantservice ready` asks.
const READY_POLL: Duration = Duration::from_millis(250);

/// Polls `/readyz` on `listen` until it answers 200 or `timeout` passes.
pub async fn wait_ready(listen: &str, timeout: Duration) -> Result<(), ReadyError> {
    let url = readyz_url(listen)?;
    let deadline = Instant::now() + timeout;
    // No proxy from the environment: this is a local endpoint.
    let client =
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| ReadyError::Timeout {
                url: url.clone(),
                timeout,
                last: crate::error_chain(&e),
            })?;
    let mut last = "no answer yet".to_string();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadyError::Timeout { url, timeout, last });
        }
        let attempt = client
            .get(&url)
            .timeout(left.min(PROBE_TIMEOUT * 3))
            .send()
            .await;
        match attempt {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                if status == reqwest::StatusCode::OK {
                    return Ok(());
                }
                last = format!("HTTP {} {}", status.as_u16(), body.trim());
            }
            Err(e) => last = connect_error_text(&e),
        }
        tokio::time::sleep(READY_POLL.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

/// The useful end of a request error ("Connection refused (os error 111)"), not reqwest's
/// wrapping of it.
fn connect_error_text(e: &reqwest::Error) -> String {
    let mut innermost = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = cur {
        innermost = s.to_string();
        cur = s.source();
    }
    if e.is_timeout() {
        format!("no answer (timed out): {innermost}")
    } else {
        innermost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_urls() {
        struct Case {
            listen: &'static str,
            url: Result<&'static str, ReadyError>,
        }
        let cases = [
            Case {
                listen: "127.0.0.1:9108",
                url: Ok("http://127.0.0.1:9108/readyz"),
            },
            Case {
                listen: "0.0.0.0:9108",
                url: Ok("http://127.0.0.1:9108/readyz"),
            },
            Case {
                listen: "[::]:9109",
                url: Ok("http://[::1]:9109/readyz"),
            },
            Case {
                listen: "[::1]:9109",
                url: Ok("http://[::1]:9109/readyz"),
            },
            Case {
                listen: "10.1.2.3:80",
                url: Ok("http://10.1.2.3:80/readyz"),
            },
            Case {
                listen: "localhost:9108",
                url: Ok("http://localhost:9108/readyz"),
            },
            Case {
                listen: "",
                url: Err(ReadyError::Disabled),
            },
            Case {
                listen: "127.0.0.1:0",
                url: Err(ReadyError::NoFixedPort("127.0.0.1:0".into())),
            },
        ];
        for c in cases {
            assert_eq!(
                readyz_url(c.listen),
                c.url.map(str::to_string),
                "{}",
                c.listen
            );
        }
    }

    #[test]
    fn readiness_verdicts() {
        struct Case {
            name: &'static str,
            stopping: bool,
            clickhouse: Result<(), String>,
            age: Option<Duration>,
            expected: Result<(), &'static str>,
        }
        let secs = Duration::from_secs;
        let down = || Err("ClickHouse at http://h:8123 is unreachable: refused".to_string());
        let cases = [
            Case {
                name: "fresh pass, ClickHouse answers",
                stopping: false,
                clickhouse: Ok(()),
                age: Some(secs(14)),
                expected: Ok(()),
            },
            Case {
                name: "exactly three polls old is still fresh",
                stopping: false,
                clickhouse: Ok(()),
                age: Some(secs(15)),
                expected: Ok(()),
            },
            Case {
                name: "stale pass",
                stopping: false,
                clickhouse: Ok(()),
                age: Some(secs(16)),
                expected: Err("not ready: no reconcile pass in the last 15s"),
            },
            Case {
                name: "no pass yet",
                stopping: false,
                clickhouse: Ok(()),
                age: None,
                expected: Err("not ready: no reconcile pass yet"),
            },
            Case {
                name: "ClickHouse down comes first",
                stopping: false,
                clickhouse: down(),
                age: None,
                expected: Err("not ready: ClickHouse unreachable: ClickHouse at http://h:8123 is unreachable: refused"),
            },
            Case {
                name: "shutting down beats everything",
                stopping: true,
                clickhouse: down(),
                age: Some(secs(1)),
                expected: Err("not ready: shutting down"),
            },
        ];
        for c in cases {
            assert_eq!(
                verdict(c.stopping, c.clickhouse, c.age, secs(5)),
                c.expected.map_err(str::to_string),
                "{}",
                c.name
            );
        }
    }
}
