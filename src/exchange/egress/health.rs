//! Health checks of the pool's proxies: each due proxy gets a SOCKS5 connect plus Binance
//! `time` (weight 1); failing ones are quarantined until their next check, which backs off
//! (jittered, doubling up to 10× `health_interval`); a 418 bans the proxy for its
//! `Retry-After`. Owns the check schedule and what a check's outcome does to an egress's state;
//! it does not log: what changed comes back as [`HealthEvent`]s for the caller to log.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Egress, ProxyPool};

/// A change worth telling the operator about (proxies are named `host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// A 418 on a health check: out of rotation, unchecked, for `for_`.
    Banned {
        egress: String,
        for_: Duration,
        reason: String,
    },
    /// A proxy that had failed passed a check.
    Recovered { egress: String },
    /// A check failed (connect, auth, timeout): quarantined until the next check.
    Failed {
        egress: String,
        error: String,
        retry_in: Duration,
    },
}

/// What one health check found.
enum Check {
    Passed,
    /// 418: banned for this long.
    Banned(Duration),
    /// Binance answered through the proxy, with an error status.
    Answered(String),
    /// The proxy failed (connect, auth, timeout).
    Failed(String),
}

async fn check(e: &Egress, time_url: &str) -> Check {
    let res = tokio::time::timeout(Duration::from_secs(10), e.http.get(time_url).send()).await;
    match res {
        Ok(Ok(r)) if r.status().is_success() => Check::Passed,
        Ok(Ok(r)) if r.status().as_u16() == 418 => {
            let secs = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(120);
            Check::Banned(Duration::from_secs(secs.min(4 * 86_400)))
        }
        // Binance answered through the proxy: the proxy works (what the exchange thinks of
        // this address shows in the requests themselves).
        Ok(Ok(r)) => Check::Answered(format!("HTTP {} from Binance", r.status().as_u16())),
        Ok(Err(err)) => Check::Failed(crate::error_chain(&err)),
        Err(_) => Check::Failed("health check timed out".to_string()),
    }
}

impl ProxyPool {
    /// Checks every proxy that is due (not banned, its next check reached); returns what
    /// changed.
    pub async fn check_health(&self, time_url: &str) -> Vec<HealthEvent> {
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
        let checks = due
            .iter()
            .map(|e| async move { (e, check(e, time_url).await) });
        let mut events = Vec::new();
        for (e, found) in futures_util::future::join_all(checks).await {
            match found {
                Check::Banned(for_) => {
                    {
                        let mut st = e.lock();
                        st.healthy = Some(false);
                        st.next_check = Some(Instant::now() + for_);
                    }
                    let reason = "HTTP 418 (banned) on a health check";
                    self.ban(e, for_, reason);
                    events.push(HealthEvent::Banned {
                        egress: e.name.clone(),
                        for_,
                        reason: reason.to_string(),
                    });
                }
                Check::Answered(msg) => {
                    let mut st = e.lock();
                    st.healthy = Some(true);
                    st.health_failures = 0;
                    st.last_error = format!("health check: {msg}");
                    st.next_check = Some(Instant::now() + interval);
                }
                Check::Passed => {
                    let mut st = e.lock();
                    if st.healthy == Some(false) {
                        events.push(HealthEvent::Recovered {
                            egress: e.name.clone(),
                        });
                        // A ban (418) keeps its own end.
                        st.quarantined_until = st.banned_until.filter(|t| *t > Instant::now());
                    }
                    st.healthy = Some(true);
                    st.health_failures = 0;
                    st.next_check = Some(Instant::now() + interval);
                }
                Check::Failed(msg) => {
                    let mut st = e.lock();
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
                    events.push(HealthEvent::Failed {
                        egress: e.name.clone(),
                        error: msg,
                        retry_in: delay,
                    });
                }
            }
        }
        events
    }

    /// Health checks every second for due proxies, until cancelled; each event goes to
    /// `report` (the caller logs it).
    pub async fn run_health(
        self: Arc<Self>,
        time_url: String,
        cancel: CancellationToken,
        report: impl Fn(&HealthEvent) + Send,
    ) {
        let mut tick = crate::ticker(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    crate::faults::hit("proxy_health");
                    for ev in self.check_health(&time_url).await {
                        report(&ev);
                    }
                }
            }
        }
    }
}
