//! Glue between the stored `proxy_config`/`proxy_status` tables and the exchange's egress
//! pool: reads the declared proxies from the store and feeds them to the pool, turns the
//! pool's reports into `proxy_status` rows, and logs what the pool returns (proxies named
//! `host:port`, never with a password; passwords go to the log scrubber). Owns no policy:
//! what a row means is the pool's business, storing rows the store's.

use tracing::{info, warn};

use crate::config::Secret;
use crate::exchange::egress::{DeclaredProxy, HealthEvent, ProxyPool};
use crate::store::state::{ProxyRow, ProxyStatusRow};
use crate::store::{Store, StoreError};

/// The stored rows as the pool's declarations.
pub fn declared(rows: &[ProxyRow]) -> Vec<DeclaredProxy> {
    rows.iter()
        .map(|r| DeclaredProxy {
            host: r.host.clone(),
            port: r.port,
            username: r.username.clone(),
            password: Secret::new(r.password.clone()),
            enabled: r.enabled != 0,
        })
        .collect()
}

/// Reads `proxy_config` and applies it to `pool` (see [`apply`]); for the commands that run
/// without the reconcile loop (`backfill-gap`, `ws-start`).
pub async fn load(store: &Store, pool: &ProxyPool) -> Result<Vec<String>, StoreError> {
    let rows = store.proxy_config().await?;
    Ok(apply(pool, &rows))
}

/// Applies `proxy_config` rows to `pool` (passwords go to the log scrubber; added and removed
/// proxies are logged); returns the problems with rows that were skipped, for the caller to
/// log.
pub fn apply(pool: &ProxyPool, rows: &[ProxyRow]) -> Vec<String> {
    let applied = pool.apply(&declared(rows));
    crate::logging::set_secrets(pool.secrets());
    for name in &applied.added {
        info!(proxy = %name, "Proxy added to the pool.");
    }
    for name in &applied.removed {
        info!(proxy = %name, "Proxy removed from the pool.");
    }
    applied.problems
}

/// One `proxy_status` row per member of `pool`, stamped `now_s` (Unix seconds).
pub fn status_rows(pool: &ProxyPool, now_s: u32) -> Vec<ProxyStatusRow> {
    pool.status()
        .into_iter()
        .map(|s| ProxyStatusRow {
            host: s.host,
            port: s.port,
            state: s.state,
            last_error: s.last_error,
            requests: s.requests,
            failures: s.failures,
            weight_used: s.weight_used,
            updated_at: now_s,
        })
        .collect()
}

/// Logs one health-check event of the pool.
pub fn log_health(ev: &HealthEvent) {
    match ev {
        HealthEvent::Banned {
            egress,
            for_,
            reason,
        } => warn!(%egress, ?for_, %reason, "Egress quarantined."),
        HealthEvent::Recovered { egress } => info!(proxy = %egress, "Proxy healthy again."),
        HealthEvent::Failed {
            egress,
            error,
            retry_in,
        } => warn!(proxy = %egress, %error, ?retry_in, "Proxy health check failed; quarantined."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_declarations_field_by_field() {
        let rows = vec![
            ProxyRow {
                host: "10.0.0.1".into(),
                port: 1080,
                username: "u".into(),
                password: "p".into(),
                enabled: 1,
            },
            ProxyRow {
                host: "h".into(),
                port: 2,
                username: String::new(),
                password: String::new(),
                enabled: 0,
            },
        ];
        let d = declared(&rows);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].host.as_str(), d[0].port, d[0].username.as_str()),
            ("10.0.0.1", 1080, "u")
        );
        assert_eq!(d[0].password.expose(), "p");
        assert!(d[0].enabled);
        assert!(!d[1].enabled);
        assert!(d[1].password.is_empty());
    }
}
