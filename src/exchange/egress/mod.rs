//! Egress, part of the exchange transport: the ways out to Binance — the direct connection plus
//! one SOCKS5 proxy per declared proxy — each its own source address with its own weight
//! budget (one governor per (market, egress)), and [`ProxyPool`], which holds them with their
//! state (quarantine, 418 bans, health, counters). It applies declared proxies
//! ([`ProxyPool::apply`]), picks the egress for each request (the rules are the pure
//! [`select::select`]), takes failing ones out of rotation and health-checks them (`health`).
//! Not here: reading `proxy_config` (the store does, the operator feeds the rows in), logging
//! (the pool returns problems and events; its callers log them, naming proxies `host:port`,
//! never with a password), sending requests and reacting to replies (the REST client and the
//! streams). Passwords live only inside the HTTP clients and the endpoints, whose `Debug`
//! hides them.

mod health;
pub mod select;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use self::health::HealthEvent;
use self::select::{select, Candidate, Choice, Rules};
use super::governor::Governors;
use super::ExchangeError;
use crate::config::{Config, ProxyConfig, Secret};
use crate::market::Market;

/// The egress name of direct connections.
pub const DIRECT: &str = "direct";

/// A SOCKS5 proxy as declared (a `proxy_config` row, as plain data).
#[derive(Clone, PartialEq, Eq)]
pub struct DeclaredProxy {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: Secret,
    pub enabled: bool,
}

impl std::fmt::Debug for DeclaredProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} (user {:?}, enabled {})",
            self.host, self.port, self.username, self.enabled
        )
    }
}

/// A SOCKS5 proxy in use.
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

/// The endpoints of the enabled declarations (passwords overridden by `env`, see
/// [`password_env`]), and a problem for each enabled one that is not a usable address.
pub fn endpoints(
    declared: &[DeclaredProxy],
    env: impl Fn(&str) -> Option<String>,
) -> (Vec<ProxyEndpoint>, Vec<String>) {
    let mut problems = Vec::new();
    let mut wanted = Vec::new();
    for r in declared.iter().filter(|r| r.enabled) {
        let host = r.host.trim();
        if host.is_empty() || r.port == 0 || !crate::config::is_bare_host(host) {
            problems.push(format!(
                "proxy_config row {host:?}:{}: host must be a bare host name or IP address and port 1..65535",
                r.port
            ));
            continue;
        }
        let password =
            env(&password_env(host, r.port)).map_or_else(|| r.password.clone(), Secret::new);
        wanted.push(ProxyEndpoint {
            host: host.to_string(),
            port: r.port,
            username: r.username.clone(),
            password,
        });
    }
    (wanted, problems)
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
    fn new(name: String, proxy: Option<ProxyEndpoint>, http: reqwest::Client) -> Egress {
        Egress {
            name,
            proxy,
            http,
            state: Mutex::new(EgressState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EgressState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_proxy(&self) -> bool {
        self.proxy.is_some()
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

    /// What selection needs to know about this egress now.
    fn candidate(&self, market: Market, governors: &Governors, excluded: bool) -> Candidate {
        let (quarantined, last_error) = {
            let st = self.lock();
            let now = Instant::now();
            (
                st.quarantined_until.is_some_and(|t| t > now),
                st.last_error.clone(),
            )
        };
        let g = governors.get(market, &self.name);
        Candidate {
            name: self.name.clone(),
            quarantined,
            excluded,
            held: g.held_until().is_some(),
            remaining: g.remaining(),
            last_error,
        }
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

/// What [`ProxyPool::apply`] did, for the caller to log. Names are `host:port`; problem texts
/// never hold a password.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Declarations that were skipped, and why.
    pub problems: Vec<String>,
}

/// Every state a proxy is shown in (`proxy_status.state`, the `quantservice_proxy_state` gauge).
pub const PROXY_STATES: [&str; 4] = ["healthy", "failing", "quarantined", "unchecked"];

/// One proxy's observed state, the data of a `proxy_status` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    pub host: String,
    pub port: u16,
    /// `healthy`, `failing`, `quarantined` or `unchecked`.
    pub state: String,
    pub last_error: String,
    pub requests: u64,
    pub failures: u64,
    /// Request weight sent through it since start, all markets.
    pub weight_used: u64,
}

/// The pool. Shared by every REST client (and, with `app.proxy.websocket`, the streams) of a
/// generation.
pub struct ProxyPool {
    cfg: RwLock<ProxyConfig>,
    members: RwLock<Vec<Arc<Egress>>>,
    /// The passwords of the proxies last applied (for the caller's log scrubber).
    secrets: RwLock<Vec<Secret>>,
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
            secrets: RwLock::new(Vec::new()),
            direct: Arc::new(Egress::new(DIRECT.to_string(), None, direct)),
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

    /// Makes the members equal the enabled declarations (one per host and port; passwords may
    /// be overridden by env vars, see [`password_env`]). Unchanged members keep their state and
    /// connections; requests in flight on a removed one finish.
    pub fn apply(&self, declared: &[DeclaredProxy]) -> Applied {
        self.apply_with_env(declared, |k| std::env::var(k).ok())
    }

    /// [`ProxyPool::apply`] with the environment given.
    pub fn apply_with_env(
        &self,
        declared: &[DeclaredProxy],
        env: impl Fn(&str) -> Option<String>,
    ) -> Applied {
        let (wanted, mut problems) = endpoints(declared, env);
        *self.secrets.write().unwrap_or_else(PoisonError::into_inner) = wanted
            .iter()
            .map(|w| w.password.clone())
            .filter(|p| !p.is_empty())
            .collect();
        let old = self.members();
        let mut next = Vec::new();
        let mut added = Vec::new();
        for w in wanted {
            if let Some(e) = old.iter().find(|e| e.proxy.as_ref() == Some(&w)) {
                next.push(e.clone());
                continue;
            }
            match build_client(Some(&w), self.timeout) {
                Ok(http) => {
                    let name = format!("{}:{}", w.host, w.port);
                    added.push(name.clone());
                    next.push(Arc::new(Egress::new(name, Some(w), http)));
                }
                Err(e) => problems.push(e),
            }
        }
        let removed = old
            .iter()
            .filter(|e| !next.iter().any(|n| Arc::ptr_eq(n, e)))
            .map(|e| e.name.clone())
            .collect();
        *self.members.write().unwrap_or_else(PoisonError::into_inner) = next;
        self.changed.notify_waiters();
        Applied {
            added,
            removed,
            problems,
        }
    }

    /// The passwords of the proxies last applied (non-empty ones), for a log scrubber.
    pub fn secrets(&self) -> Vec<String> {
        self.secrets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|s| s.expose().to_string())
            .collect()
    }

    /// Takes `e` out of rotation for `for_` (at least; a longer quarantine stays), with
    /// `reason` as its last error. The caller logs it.
    pub fn quarantine(&self, e: &Egress, for_: Duration, reason: &str) {
        let mut st = e.lock();
        let until = Instant::now() + for_;
        st.quarantined_until = Some(st.quarantined_until.map_or(until, |t| t.max(until)));
        st.last_error = reason.to_string();
    }

    /// A 418 through `e`: out of rotation, and not even health-checked, until the ban ends.
    pub fn ban(&self, e: &Egress, for_: Duration, reason: &str) {
        e.lock().banned_until = Some(Instant::now() + for_);
        self.quarantine(e, for_, reason);
    }

    /// The egress for the next request of `market` (see [`select::select`]). Waits up to
    /// `app.proxy.max_wait` when none is usable — calling `on_wait(reason, max_wait)` once, for
    /// the caller to log — then fails saying why.
    pub async fn pick(
        &self,
        market: Market,
        exclude: &HashSet<String>,
        on_wait: impl FnOnce(&str, Duration),
    ) -> Result<Arc<Egress>, ExchangeError> {
        let deadline = Instant::now() + self.config().max_wait;
        let mut on_wait = Some(on_wait);
        loop {
            // Re-read each turn: a live change of mode or allow_direct applies to waiters.
            let cfg = self.config();
            let now = Instant::now();
            let notified = self.changed.notified();
            let members = self.members();
            let proxies: Vec<Candidate> = members
                .iter()
                .map(|e| e.candidate(market, &self.governors, exclude.contains(&e.name)))
                .collect();
            let direct = self
                .direct
                .candidate(market, &self.governors, exclude.contains(DIRECT));
            let rules = Rules {
                mode: cfg.mode,
                allow_direct: cfg.allow_direct,
            };
            let reason = match select(rules, &proxies, &direct) {
                Choice::Proxy(i) => match members.get(i) {
                    Some(e) => return Ok(e.clone()),
                    None => format!("no member {i}"),
                },
                Choice::Direct => return Ok(self.direct.clone()),
                Choice::None(reason) => reason,
            };
            if now >= deadline {
                return Err(ExchangeError::NoEgress { market, reason });
            }
            if let Some(f) = on_wait.take() {
                f(&reason, cfg.max_wait);
            }
            let next_release = members
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

    /// One status per member, for `proxy_status`.
    pub fn status(&self) -> Vec<ProxyStatus> {
        self.members()
            .iter()
            .filter_map(|e| {
                let p = e.proxy.as_ref()?;
                let (state, last_error, requests, failures) = e.report();
                let weight_used = Market::ALL
                    .iter()
                    .map(|m| self.governors.get(*m, &e.name).stats().weight)
                    .sum();
                Some(ProxyStatus {
                    host: p.host.clone(),
                    port: p.port,
                    state,
                    last_error,
                    requests,
                    failures,
                    weight_used,
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
        let d = DeclaredProxy {
            host: "h".into(),
            port: 1,
            username: "u".into(),
            password: Secret::new("hunter22"),
            enabled: true,
        };
        assert!(!format!("{d:?}").contains("hunter22"));
    }

    fn declared(host: &str, port: u16, password: &str, enabled: bool) -> DeclaredProxy {
        DeclaredProxy {
            host: host.to_string(),
            port,
            username: "u".to_string(),
            password: Secret::new(password),
            enabled,
        }
    }

    struct Case {
        name: &'static str,
        declared: Vec<DeclaredProxy>,
        env: Vec<(&'static str, &'static str)>,
        /// (`host:port`, password) of each endpoint.
        expected: Vec<(&'static str, &'static str)>,
        problems: usize,
    }

    #[test]
    fn declarations_become_endpoints() {
        let cases = vec![
            Case {
                name: "enabled rows, in order",
                declared: vec![
                    declared("10.0.0.1", 1080, "a", true),
                    declared("proxy.example.com", 9050, "b", true),
                ],
                env: vec![],
                expected: vec![("10.0.0.1:1080", "a"), ("proxy.example.com:9050", "b")],
                problems: 0,
            },
            Case {
                name: "disabled rows are left out without a problem",
                declared: vec![
                    declared("10.0.0.1", 1080, "a", false),
                    declared("10.0.0.2", 1080, "b", true),
                ],
                env: vec![],
                expected: vec![("10.0.0.2:1080", "b")],
                problems: 0,
            },
            Case {
                name: "the host is trimmed",
                declared: vec![declared(" 10.0.0.1 ", 1080, "a", true)],
                env: vec![],
                expected: vec![("10.0.0.1:1080", "a")],
                problems: 0,
            },
            Case {
                name: "a bad host or port 0 is a problem, the others stay",
                declared: vec![
                    declared("user@host", 1080, "hunter2a", true),
                    declared("10.0.0.1", 0, "hunter2b", true),
                    declared("", 1080, "hunter2c", true),
                    declared("10.0.0.3", 1080, "d", true),
                ],
                env: vec![],
                expected: vec![("10.0.0.3:1080", "d")],
                problems: 3,
            },
            Case {
                name: "the env var overrides the row's password",
                declared: vec![declared("proxy.example.com", 1080, "row", true)],
                env: vec![("QS_PROXY_PASSWORD_PROXY_EXAMPLE_COM_1080", "env")],
                expected: vec![("proxy.example.com:1080", "env")],
                problems: 0,
            },
        ];
        for c in cases {
            let env = c.env.clone();
            let (got, problems) = endpoints(&c.declared, |k| {
                env.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            });
            let got: Vec<(String, String)> = got
                .iter()
                .map(|e| {
                    (
                        format!("{}:{}", e.host, e.port),
                        e.password.expose().to_string(),
                    )
                })
                .collect();
            let expected: Vec<(String, String)> = c
                .expected
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_string()))
                .collect();
            assert_eq!(got, expected, "case: {}", c.name);
            assert_eq!(problems.len(), c.problems, "case: {}: {problems:?}", c.name);
            for p in &problems {
                assert!(!p.contains("hunter2"), "case: {}: {p}", c.name);
            }
        }
    }
}
