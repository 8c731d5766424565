//! The operator's tables: reading desired state (`trading_pairs`, `proxy_config`, latest row
//! per key) and writing observed state (`pair_status`, `proxy_status`, `task_status`). Deciding
//! what the rows mean is the operator's job (`operator::desired`), not this module's.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// One `trading_pairs` row as stored (strings unvalidated: a bad row must not hide the others).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct PairRow {
    pub market: String,
    pub symbol: String,
    pub period: String,
    pub enabled: u8,
    pub backfill_from: i64,
    pub stream: u8,
    /// Comma-separated indicator specs (`rsi(14),macd(12,26,9)`); empty: `app.indicators.default`.
    pub indicators: String,
}

/// One `proxy_config` row as stored (the password is only ever handed to the proxy pool).
#[derive(Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct ProxyRow {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub enabled: u8,
}

impl std::fmt::Debug for ProxyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyRow")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() { "" } else { "***" },
            )
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// One `pair_status` row.
#[derive(Debug, Clone, PartialEq, Eq, Default, clickhouse::Row, Serialize, Deserialize)]
pub struct StatusRow {
    pub market: String,
    pub symbol: String,
    pub period: String,
    pub phase: String,
    pub backfilled_from: i64,
    pub backfilled_to: i64,
    pub last_closed_open_time: i64,
    pub lag_ms: i64,
    pub open_gaps: u64,
    pub reconnects: u64,
    pub restarts: u64,
    pub last_error: String,
    /// Unix seconds.
    pub updated_at: u32,
}

/// One `proxy_status` row.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct ProxyStatusRow {
    pub host: String,
    pub port: u16,
    /// `healthy`, `failing`, `quarantined` or `unchecked`.
    pub state: String,
    pub last_error: String,
    pub requests: u64,
    pub failures: u64,
    /// Request weight sent through it since start, all markets.
    pub weight_used: u64,
    /// Unix seconds.
    pub updated_at: u32,
}

/// One `task_status` row: a long-lived task of the daemon's own (not a pair's).
#[derive(Debug, Clone, PartialEq, Eq, Default, clickhouse::Row, Serialize, Deserialize)]
pub struct TaskStatusRow {
    pub task: String,
    /// `running`, `restarting`, `failed` or `disabled`.
    pub state: String,
    pub restarts: u64,
    pub last_error: String,
    /// Unix seconds.
    pub updated_at: u32,
}

const STATUS_COLUMNS: &str = "market, symbol, period, phase, backfilled_from, backfilled_to, \
    last_closed_open_time, lag_ms, open_gaps, reconnects, restarts, last_error, updated_at";

impl Store {
    /// The latest `trading_pairs` row per (market, symbol, period).
    pub async fn trading_pairs(&self) -> Result<Vec<PairRow>, StoreError> {
        self.call(
            self.client()
                .query(
                    "SELECT market, symbol, period, enabled, backfill_from, stream, indicators \
                     FROM trading_pairs FINAL ORDER BY market, symbol, period",
                )
                .fetch_all::<PairRow>(),
        )
        .await
    }

    /// The latest `proxy_config` row per (host, port).
    pub async fn proxy_config(&self) -> Result<Vec<ProxyRow>, StoreError> {
        self.call(
            self.client()
                .query(
                    "SELECT host, port, username, password, enabled \
                     FROM proxy_config FINAL ORDER BY host, port",
                )
                .fetch_all::<ProxyRow>(),
        )
        .await
    }

    /// Appends status rows (the latest per pair wins).
    pub async fn write_status(&self, rows: &[StatusRow]) -> Result<(), StoreError> {
        self.append("pair_status", rows).await
    }

    /// Appends proxy status rows (the latest per proxy wins).
    pub async fn write_proxy_status(&self, rows: &[ProxyStatusRow]) -> Result<(), StoreError> {
        self.append("proxy_status", rows).await
    }

    /// Appends task status rows (the latest per task wins).
    pub async fn write_task_status(&self, rows: &[TaskStatusRow]) -> Result<(), StoreError> {
        self.append("task_status", rows).await
    }

    /// Inserts owned rows into `table` in one statement (nothing for an empty slice).
    async fn append<T>(&self, table: &str, rows: &[T]) -> Result<(), StoreError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite + Sync,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let client = self.client().clone();
        self.call(async move {
            let mut insert = client.insert::<T>(table).await?;
            for r in rows {
                insert.write(r).await?;
            }
            insert.end().await
        })
        .await
    }

    /// The latest status row of every pair.
    pub async fn statuses(&self) -> Result<Vec<StatusRow>, StoreError> {
        self.call(
            self.client()
                .query(&format!(
                    "SELECT {STATUS_COLUMNS} FROM pair_status FINAL ORDER BY market, symbol, period"
                ))
                .fetch_all::<StatusRow>(),
        )
        .await
    }
}
