//! The egress pool: the direct connection plus one SOCKS5 proxy per enabled `proxy_config`
//! row, each its own source address with its own Binance weight budget (one governor per
//! (market, egress)). It picks the egress for each request (the usable one with the most
//! weight left), quarantines proxies that fail (403/451, 418 for the ban's length, connect or
//! auth failures), checks every proxy periodically (SOCKS5 connect plus Binance `time`) with
//! jittered backoff for failing ones, and reports each proxy in `proxy_status`. Passwords
//! live only inside the HTTP clients; names are `host:port`. Sending requests and reacting to
//! replies is the REST client's job.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ProxyConfig, ProxyMode, Secret};
use crate::exchange::governor::Governors;
use crate::exchange::ExchangeError;
use crate::market::Market;
use crate::store::state::ProxyRow;

/// The egress name of direct connections.
pub const DIRECT: &str = "direct";

/// A SOCKS5 proxy as declared.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyEndpoint {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: Secret,
}

impl std::fmt::Debug for ProxyEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} (user {:?})", self.host, self.port, self.username)
    }
}

/// Env var overriding a proxy's password: `QS_PROXY_PASSWORD_<HOST>_<PORT>`, the host upper-
/// cased with every character that is not a letter or digit as `_`.
pub fn password_env(host: &str, port: u16) -> String {
    let h: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("QS_PROXY_PASSWORD_{h}_{port}")
}

#[derive(Debug, Default)]
struct EgressState {
    quarantined_until: Option<Instant>,
    last_error: String,
    requests: u64,
    failures: u64,
    health_failures: u32,
    next_check: Option<Instant>,
    /// Whether the last health check passed (`None`: not checked yet).
    healthy: Option<bool>,
    /// During a 418 ban nothing goes through it, health checks included.
    banned_until: Option<Instant>,
}

/// One way out: direct, or through one proxy.
pub struct Egress {
    pub name: String,
    pub proxy: Option<ProxyEndpoint>,
    pub http: reqwest::Client,
    state: Mutex<EgressState>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").field("name", &self.name).finish()
    }
}

impl Egress {
    fn lock(&self) -> std::sync::MutexGuard<'_, EgressState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_proxy(&self) -> bool {
        self.proxy.is_some()
    }

    fn quarantined(&self, now: Instant) -> bool {
        self.lock().quarantined_until.is_some_and(|t| t > now)
    }

    /// Counts one request sent through this egress.
    pub fn record(&self, ok: bool, error: Option<&str>) {
        let mut st = self.lock();
        st.requests += 1;
        if !ok {
            st.failures += 1;
        }
        if let Some(e) = error {
            st.last_error = e.to_string();
        }
    }

    /// (state, last error, requests, failures) for `proxy_status`.
    pub fn report(&self) -> (String, String, u64, u64) {
        let st = self.lock();
        let now = Instant::now();
        let state = if st.quarantined_until.is_some_and(|t| t > now) {
            "quarantined"
        } else {
            match st.healthy {
                Some(true) => "healthy",
                Some(false) => "failing",
                None => "unchecked",
            }
        };
        (
            state.to_string(),
            st.last_error.clone(),
            st.requests,
            st.failures,
        )
    }
}

fn build_client(
    proxy: Option<&ProxyEndpoint>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("quantservice/", env!("CARGO_PKG_VERSION")));
    match proxy {
        Some(p) => {
            // socks5h: the proxy resolves Binance's host names (no DNS leak, and the proxy's
            // view of DNS is the one that matters for its region).
            let host = if p.host.contains(':') {
                format!("[{}]", p.host)
            } else {
                p.host.clone()
            };
            let mut url = url::Url::parse(&format!("socks5h://{host}:{}", p.port))
                .map_err(|e| format!("proxy {}:{}: bad address ({e})", p.host, p.port))?;
            if !p.username.is_empty() {
                url.set_username(&p.username)
                    .map_err(|()| format!("proxy {}:{}: bad user name", p.host, p.port))?;
                url.set_password(Some(p.password.expose()))
                    .map_err(|()| format!("proxy {}:{}: bad password", p.host, p.port))?;
            }
            let proxy = reqwest::Proxy::all(url.as_str())
                .map_err(|_| format!("proxy {}:{}: not a usable SOCKS5 address", p.host, p.port))?;
            b = b.proxy(proxy);
        }
        None => b = b.no_proxy(),
    }
    b.build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// What a health check found.
enum Check {
    /// 418: banned for this long.
    Banned(Duration),
    /// Binance answered through the proxy, with an error status.
    Answered(String),
    /// The proxy failed (connect, auth, timeout).
    Failed(String),
}

/// The pool. Shared by every REST client of a generation.
pub struct ProxyPool {
    cfg: RwLock<ProxyConfig>,
    members: RwLock<Vec<Arc<Egress>>>,
    direct: Arc<Egress>,
    governors: Arc<Governors>,
    timeout: Duration,
    changed: Notify,
}

impl ProxyPool {
    pub fn new(cfg: &Config, governors: Arc<Governors>) -> Result<ProxyPool, ExchangeError> {
        let direct = build_client(None, cfg.backfill.request_timeout).map_err(|msg| {
            ExchangeError::Protocol {
                url: String::new(),
                msg,
            }
        })?;
        Ok(ProxyPool {
            cfg: RwLock::new(cfg.proxy.clone()),
            members: RwLock::new(Vec::new()),
            direct: Arc::new(Egress {
                name: DIRECT.to_string(),
                proxy: None,
                http: direct,
                state: Mutex::new(EgressState::default()),
            }),
            governors,
            timeout: cfg.backfill.request_timeout,
            changed: Notify::new(),
        })
    }

    pub fn governors(&self) -> &Arc<Governors> {
        &self.governors
    }

    pub fn config(&self) -> ProxyConfig {
        self.cfg
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_config(&self, cfg: &ProxyConfig) {
        *self.cfg.write().unwrap_or_else(PoisonError::into_inner) = cfg.clone();
        self.changed.notify_waiters();
    }

    pub fn direct(&self) -> Arc<Egress> {
        self.direct.clone()
    }

    pub fn members(&self) -> Vec<Arc<Egress>> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every egress a request may have used (for summing statistics).
    pub fn all(&self) -> Vec<Arc<Egress>> {
        let mut v = vec![self.direct.clone()];
        v.extend(self.members());
        v
    }

    /// Makes the members equal the enabled rows (the latest per host and port). Unchanged
    /// members keep their state and connections; requests in flight on a removed one finish.
    /// Returns the secrets now in use (for the log scrubber) and problems with rows.
    pub fn set_rows(
        &self,
        rows: &[ProxyRow],
        env: impl Fn(&str) -> Option<String>,
    ) -> (Vec<String>, Vec<String>) {
        let mut problems = Vec::new();
        let mut secrets = Vec::new();
        let mut wanted: Vec<ProxyEndpoint> = Vec::new();
        for r in rows.iter().filter(|r| r.enabled != 0) {
            let host = r.host.trim();
            if host.is_empty() || r.port == 0 || !crate::config::is_bare_host(host) {
                problems.push(format!(
                    "proxy_config row {host:?}:{}: host must be a bare host name or IP address and port 1..65535",
                    r.port
                ));
                continue;
            }
            let password = env(&password_env(host, r.port)).unwrap_or_else(|| r.password.clone());
            if !password.is_empty() {
                secrets.push(password.clone());
            }
            wanted.push(ProxyEndpoint {
                host: host.to_string(),
                port: r.port,
                username: r.username.clone(),
                password: Secret::new(password),
            });
        }
        let old = self.members();
        let mut next = Vec::new();
        for w in wanted {
            if let Some(e) = old.iter().find(|e| e.proxy.as_ref() == Some(&w)) {
                next.push(e.clone());
                continue;
            }
            match build_client(Some(&w), self.timeout) {
                Ok(http) => {
                    info!(proxy = %format!("{}:{}", w.host, w.port), "Proxy added to the pool.");
                    next.push(Arc::new(Egress {
                        name: format!("{}:{}", w.host, w.port),
                        proxy: Some(w),
                        http,
                        state: Mutex::new(EgressState::default()),
                    }));
                }
                Err(e) => problems.push(e),
            }
        }
        for e in &old {
            if !next.iter().any(|n| Arc::ptr_eq(n, e)) {
                info!(proxy = %e.name, "Proxy removed from the pool.");
            }
        }
        *self.members.write().unwrap_or_else(PoisonError::into_inner) = next;
        self.changed.notify_waiters();
        (secrets, problems)
    }

    /// Reads `proxy_config` and applies it (passwords go to the log scrubber); returns the
    /// problems with rows that were skipped.
    pub async fn load(
        &self,
        store: &crate::store::Store,
    ) -> Result<Vec<String>, crate::store::StoreError> {
        let rows = store.proxies().await?;
        let (secrets, problems) = self.set_rows(&rows, |k| std::env::var(k).ok());
        crate::logging::set_secrets(secrets);
        Ok(problems)
    }

    /// Takes `e` out of rotation for `for_` (its name and the reason are logged).
    pub fn quarantine(&self, e: &Egress, for_: Duration, reason: &str) {
        {
            let mut st = e.lock();
            let until = Instant::now() + for_;
            st.quarantined_until = Some(st.quarantined_until.map_or(until, |t| t.max(until)));
            st.last_error = reason.to_string();
        }
        warn!(egress = %e.name, ?for_, %reason, "Egress quarantined.");
    }

    /// A 418 through `e`: out of rotation, and not even health-checked, until the ban ends.
    pub fn ban(&self, e: &Egress, for_: Duration, reason: &str) {
        e.lock().banned_until = Some(Instant::now() + for_);
        self.quarantine(e, for_, reason);
    }

    /// The egress for the next request of `market`: the usable one with the most weight left
    /// (held ones — paused by a 429, banned — only if nothing else is usable). Waits up to
    /// `app.proxy.max_wait` when none is usable, then fails saying why.
    pub async fn pick(
        &self,
        market: Market,
        exclude: &HashSet<String>,
    ) -> Result<Arc<Egress>, ExchangeError> {
        let deadline = Instant::now() + self.config().max_wait;
        let mut warned = false;
        loop {
            // Re-read each turn: a live change of mode or allow_direct applies to waiters.
            let cfg = self.config();
            let now = Instant::now();
            let notified = self.changed.notified();
            let members: Vec<Arc<Egress>> = if cfg.mode == ProxyMode::Never {
                Vec::new()
            } else {
                self.members()
                    .into_iter()
                    // A proxy that failed this request is quarantined; once its quarantine
                    // lapses it may serve the request again.
                    .filter(|e| !e.quarantined(now))
                    .collect()
            };
            let mut cands = members;
            let direct_ok = match cfg.mode {
                ProxyMode::Never => true,
                ProxyMode::Always => false,
                ProxyMode::Auto => cfg.allow_direct,
            };
            if cands.is_empty() && direct_ok && !exclude.contains(DIRECT) {
                cands.push(self.direct.clone());
            }
            let best = cands
                .iter()
                .map(|e| {
                    let g = self.governors.get(market, &e.name);
                    (g.held_until().is_none(), g.remaining(), e)
                })
                .max_by_key(|(free, left, _)| (*free, *left))
                .map(|(_, _, e)| e.clone());
            if let Some(e) = best {
                return Ok(e);
            }
            let reason = self.why_none(&cfg, exclude);
            if now >= deadline {
                return Err(ExchangeError::NoEgress { market, reason });
            }
            if !warned {
                warn!(%market, %reason, wait = ?cfg.max_wait, "No usable egress; waiting.");
                warned = true;
            }
            let next_release = self
                .members()
                .iter()
                .filter_map(|e| e.lock().quarantined_until)
                .filter(|t| *t > now)
                .min()
                .unwrap_or(deadline)
                .min(deadline)
                .min(now + Duration::from_secs(1));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(next_release) => {}
            }
        }
    }

    fn why_none(&self, cfg: &ProxyConfig, exclude: &HashSet<String>) -> String {
        let members = self.members();
        if cfg.mode == ProxyMode::Always && members.is_empty() {
            return "app.proxy.mode is always but proxy_config has no enabled proxy".to_string();
        }
        let now = Instant::now();
        let mut parts: Vec<String> = members
            .iter()
            .map(|e| {
                let st = e.lock();
                if st.quarantined_until.is_some_and(|t| t > now) {
                    format!("{} quarantined ({})", e.name, st.last_error)
                } else if exclude.contains(&e.name) {
                    format!("{} failed this request ({})", e.name, st.last_error)
                } else {
                    format!("{} usable", e.name)
                }
            })
            .collect();
        if !cfg.allow_direct && cfg.mode == ProxyMode::Auto {
            parts.push("direct not allowed (app.proxy.allow_direct: false)".to_string());
        } else if exclude.contains(DIRECT) {
            parts.push(format!("direct failed ({})", self.direct.lock().last_error));
        }
        parts.join("; ")
    }

    /// Checks every proxy that is due: GET `time_url` through it (a SOCKS5 connect, auth and
    /// a Binance call of weight 1). Failing proxies are quarantined until their next check,
    /// which backs off (jittered, doubling up to 10× the interval).
    pub async fn check_health(&self, time_url: &str) {
        let interval = self.config().health_interval;
        let now = Instant::now();
        let due: Vec<Arc<Egress>> = self
            .members()
            .into_iter()
            .filter(|e| {
                let st = e.lock();
                st.next_check.is_none_or(|t| t <= now) && st.banned_until.is_none_or(|t| t <= now)
            })
            .collect();
        let checks = due.iter().map(|e| async move {
            let res =
                tokio::time::timeout(Duration::from_secs(10), e.http.get(time_url).send()).await;
            let err = match res {
                Ok(Ok(r)) if r.status().is_success() => None,
                Ok(Ok(r)) if r.status().as_u16() == 418 => {
                    let secs = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(120);
                    Some(Check::Banned(Duration::from_secs(secs.min(4 * 86_400))))
                }
                // Binance answered through the proxy: the proxy works (what the exchange
                // thinks of this address shows in the requests themselves).
                Ok(Ok(r)) => Some(Check::Answered(format!(
                    "HTTP {} from Binance",
                    r.status().as_u16()
                ))),
                Ok(Err(err)) => Some(Check::Failed(crate::error_chain(&err))),
                Err(_) => Some(Check::Failed("health check timed out".to_string())),
            };
            (e.clone(), err)
        });
        for (e, err) in futures_util::future::join_all(checks).await {
            let err = match err {
                Some(Check::Banned(for_)) => {
                    {
                        let mut st = e.lock();
                        st.healthy = Some(false);
                        st.next_check = Some(Instant::now() + for_);
                    }
                    self.ban(&e, for_, "HTTP 418 (banned) on a health check");
                    continue;
                }
                Some(Check::Answered(msg)) => {
                    let mut st = e.lock();
                    st.healthy = Some(true);
                    st.health_failures = 0;
                    st.last_error = format!("health check: {msg}");
                    st.next_check = Some(Instant::now() + interval);
                    continue;
                }
                Some(Check::Failed(msg)) => Some(msg),
                None => None,
            };
            let mut st = e.lock();
            match err {
                None => {
                    if st.healthy == Some(false) {
                        info!(proxy = %e.name, "Proxy healthy again.");
                        // A ban (418) keeps its own end.
                        st.quarantined_until = st.banned_until.filter(|t| *t > Instant::now());
                    }
                    st.healthy = Some(true);
                    st.health_failures = 0;
                    st.next_check = Some(Instant::now() + interval);
                }
                Some(msg) => {
                    let delay = crate::backoff::delay(
                        st.health_failures,
                        interval,
                        interval.saturating_mul(10),
                        &mut rand::rng(),
                    );
                    st.health_failures = st.health_failures.saturating_add(1);
                    st.healthy = Some(false);
                    let until = Instant::now() + delay;
                    st.next_check = Some(until);
                    st.quarantined_until =
                        Some(st.quarantined_until.map_or(until, |t| t.max(until)));
                    st.last_error = format!("health check: {msg}");
                    drop(st);
                    warn!(proxy = %e.name, error = %msg, retry_in = ?delay, "Proxy health check failed; quarantined.");
                }
            }
        }
    }

    /// Health checks every second for due proxies, until cancelled.
    pub async fn run_health(self: Arc<Self>, time_url: String, cancel: CancellationToken) {
        let mut tick = crate::ticker(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.check_health(&time_url).await,
            }
        }
    }

    /// One `proxy_status` row per member.
    pub fn status_rows(&self, now_s: u32) -> Vec<crate::store::state::ProxyStatusRow> {
        self.members()
            .iter()
            .filter_map(|e| {
                let p = e.proxy.as_ref()?;
                let (state, last_error, requests, failures) = e.report();
                let weight_used = Market::ALL
                    .iter()
                    .map(|m| self.governors.get(*m, &e.name).stats().weight)
                    .sum();
                Some(crate::store::state::ProxyStatusRow {
                    host: p.host.clone(),
                    port: p.port,
                    state,
                    last_error,
                    requests,
                    failures,
                    weight_used,
                    updated_at: now_s,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_env_names() {
        assert_eq!(
            password_env("proxy.example.com", 1080),
            "QS_PROXY_PASSWORD_PROXY_EXAMPLE_COM_1080"
        );
        assert_eq!(
            password_env("10.0.0.1", 9050),
            "QS_PROXY_PASSWORD_10_0_0_1_9050"
        );
    }

    #[test]
    fn endpoints_never_print_passwords() {
        let p = ProxyEndpoint {
            host: "h".into(),
            port: 1,
            username: "u".into(),
            password: Secret::new("hunter22"),
        };
        assert!(!format!("{p:?}").contains("hunter22"));
    }
}
