//! Schema migrations: the `sql/NNNN_name.sql` files embedded in the binary, applied in order,
//! recorded in `schema_migrations`. Running them again is a no-op. Does not own table contents.
//!
//! A file whose first lines hold `-- requires-clickhouse: MAJOR.MINOR` is an optional
//! improvement for newer servers: skipped (not recorded) on older ones, so it applies after a
//! server upgrade; if it fails it is logged and retried at the next start.

use serde::Deserialize;
use tracing::{info, warn};

use super::{ServerVersion, Store, StoreError};

/// One embedded migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every file in `sql/`, in order. A unit test checks this list against the directory.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init.sql",
        sql: include_str!("../../sql/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_newer_server_improvements.sql",
        sql: include_str!("../../sql/0002_newer_server_improvements.sql"),
    },
    Migration {
        version: 3,
        name: "0003_exchange_gaps.sql",
        sql: include_str!("../../sql/0003_exchange_gaps.sql"),
    },
    Migration {
        version: 4,
        name: "0004_proxy_status.sql",
        sql: include_str!("../../sql/0004_proxy_status.sql"),
    },
    Migration {
        version: 5,
        name: "0005_task_status.sql",
        sql: include_str!("../../sql/0005_task_status.sql"),
    },
    Migration {
        version: 6,
        name: "0006_partition_maintenance.sql",
        sql: include_str!("../../sql/0006_partition_maintenance.sql"),
    },
    Migration {
        version: 7,
        name: "0007_indicators.sql",
        sql: include_str!("../../sql/0007_indicators.sql"),
    },
    Migration {
        version: 8,
        name: "0008_backtests.sql",
        sql: include_str!("../../sql/0008_backtests.sql"),
    },
];

/// Error codes that mean "this statement already took effect" (a migration interrupted half
/// way and run again): column, table or database already exists.
const ALREADY_APPLIED_CODES: &[u32] = &[15, 57, 82];

impl Migration {
    /// The minimum server version from `-- requires-clickhouse: X.Y`, if any.
    pub fn requires(&self) -> Option<ServerVersion> {
        self.sql
            .lines()
            .take_while(|l| l.trim_start().starts_with("--") || l.trim().is_empty())
            .find_map(|l| {
                l.trim_start()
                    .trim_start_matches('-')
                    .trim()
                    .strip_prefix("requires-clickhouse:")
                    .and_then(|v| ServerVersion::parse(v.trim()))
            })
    }

    /// The statements, without comments, split at `;` ending a line.
    pub fn statements(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for line in self.sql.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with("--") || trimmed.is_empty() {
                continue;
            }
            cur.push_str(line);
            cur.push('\n');
            if trimmed.ends_with(';') {
                let stmt = cur.trim().trim_end_matches(';').trim().to_string();
                if !stmt.is_empty() {
                    out.push(stmt);
                }
                cur.clear();
            }
        }
        let tail = cur.trim();
        if !tail.is_empty() {
            out.push(tail.to_string());
        }
        out
    }

    /// FNV-1a of the file text, recorded to notice files edited after they were applied.
    pub fn checksum(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.sql.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// What one `migrate` run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub server_version: Option<ServerVersion>,
    pub applied: Vec<String>,
    pub already: Vec<String>,
    /// Optional migrations skipped (older server) or failed (logged; retried next start).
    pub skipped: Vec<String>,
}

#[derive(clickhouse::Row, Deserialize)]
struct AppliedRow {
    version: u32,
    checksum: String,
}

/// Creates the database if needed and applies every pending migration in order.
pub async fn run(store: &Store) -> Result<MigrationReport, StoreError> {
    let version = store.server_version().await?;
    store.ensure_database().await?;
    store
        .execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version UInt32, name String, checksum String, applied_at DateTime DEFAULT now()) \
             ENGINE = MergeTree ORDER BY version",
        )
        .await?;
    let applied: Vec<AppliedRow> = store
        .call(
            store
                .client()
                .query("SELECT version, any(checksum) FROM schema_migrations GROUP BY version")
                .fetch_all::<AppliedRow>(),
        )
        .await?;

    let mut report = MigrationReport {
        server_version: Some(version),
        ..Default::default()
    };
    for m in MIGRATIONS {
        if let Some(done) = applied.iter().find(|a| a.version == m.version) {
            if done.checksum != m.checksum() {
                warn!(
                    migration = m.name,
                    "Migration file changed after it was applied; the change is not re-applied."
                );
            }
            report.already.push(m.name.to_string());
            continue;
        }
        let optional = m.requires();
        if let Some(min) = optional {
            if version < min {
                info!(migration = m.name, server = %version, needs = %min,
                    "Skipping migration for newer ClickHouse servers.");
                report.skipped.push(m.name.to_string());
                continue;
            }
        }
        match apply(store, m).await {
            Ok(()) => {
                info!(migration = m.name, "Applied migration.");
                report.applied.push(m.name.to_string());
            }
            Err(e) if optional.is_some() && !e.is_retryable() => {
                warn!(migration = m.name, error = %e,
                    "Optional migration failed; will retry at the next start.");
                report.skipped.push(m.name.to_string());
            }
            Err(e) => {
                return Err(StoreError::Migration {
                    name: m.name.to_string(),
                    source: Box::new(e),
                })
            }
        }
    }
    verify_layout(store).await?;
    Ok(report)
}

/// Columns the code relies on, per table. A table created by an older deployment under the same
/// name (`CREATE TABLE IF NOT EXISTS` leaves it alone) is caught here instead of failing later.
const REQUIRED_COLUMNS: &[(&str, &[&str])] = &[
    (
        "klines",
        &[
            "market",
            "symbol",
            "period",
            "open_time",
            "close_time",
            "open",
            "high",
            "low",
            "close",
            "volume",
            "quote_volume",
            "trades",
            "taker_buy_volume",
            "taker_buy_quote_volume",
            "is_final",
            "source",
            "ingested_at",
            "version",
        ],
    ),
    (
        "trading_pairs",
        &[
            "market",
            "symbol",
            "period",
            "enabled",
            "backfill_from",
            "stream",
            "indicators",
            "updated_at",
        ],
    ),
    (
        "exchange_gaps",
        &["market", "symbol", "period", "start_ms", "end_ms"],
    ),
    (
        "proxy_config",
        &[
            "host",
            "port",
            "username",
            "password",
            "enabled",
            "created_at",
        ],
    ),
    (
        "indicators",
        &[
            "market",
            "symbol",
            "period",
            "open_time",
            "indicator",
            "output",
            "value",
            "version",
        ],
    ),
    (
        "indicator_checkpoints",
        &[
            "market",
            "symbol",
            "period",
            "indicator",
            "open_time",
            "bars",
            "state",
            "version",
        ],
    ),
    (
        "partition_maintenance",
        &["table_name", "partition_id", "event", "event_time"],
    ),
    (
        "pair_status",
        &[
            "market",
            "symbol",
            "period",
            "phase",
            "last_closed_open_time",
            "last_error",
            "updated_at",
        ],
    ),
];

#[derive(clickhouse::Row, Deserialize)]
struct ColumnRow {
    table: String,
    name: String,
}

/// Fails with the missing columns of every table that does not have the expected layout.
async fn verify_layout(store: &Store) -> Result<(), StoreError> {
    let columns: Vec<ColumnRow> = store
        .call(
            store
                .client()
                .query("SELECT table, name FROM system.columns WHERE database = ?")
                .bind(store.database())
                .fetch_all::<ColumnRow>(),
        )
        .await?;
    let mut problems = Vec::new();
    for (table, required) in REQUIRED_COLUMNS {
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|c| !columns.iter().any(|r| r.table == *table && r.name == *c))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "table {}.{table} has an older layout (missing columns: {}); rename it and run migrate again to recreate it",
                store.database(),
                missing.join(", ")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Invalid(problems.join("; ")))
    }
}

async fn apply(store: &Store, m: &Migration) -> Result<(), StoreError> {
    for stmt in m.statements() {
        match store.execute(&stmt).await {
            Ok(()) => {}
            Err(e) if e.code().is_some_and(|c| ALREADY_APPLIED_CODES.contains(&c)) => {
                info!(migration = m.name, error = %e, "Statement had already taken effect.");
            }
            Err(e) => return Err(e),
        }
    }
    store
        .call(
            store
                .client()
                .query("INSERT INTO schema_migrations (version, name, checksum) VALUES (?, ?, ?)")
                .bind(m.version)
                .bind(m.name)
                .bind(m.checksum())
                .execute(),
        )
        .await
}

/// Applies migrations, retrying while ClickHouse is unreachable (it may still be starting);
/// a non-retryable error (bad credentials, SQL error) ends the daemon with that error.
pub async fn migrate_when_ready(
    store: &Store,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Option<MigrationReport>, StoreError> {
    let mut attempt: u32 = 0;
    loop {
        match run(store).await {
            Ok(r) => return Ok(Some(r)),
            Err(e) if e.is_retryable() => {
                let delay = crate::backoff::delay(
                    attempt,
                    std::time::Duration::from_millis(500),
                    std::time::Duration::from_secs(30),
                    &mut rand::rng(),
                );
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in = ?delay, "ClickHouse not ready; retrying.");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot prepare the ClickHouse schema.");
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_list_matches_sql_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS.iter().map(|m| m.name.to_string()).collect();
        assert_eq!(files, embedded, "add new sql/ files to MIGRATIONS");
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{} out of order", m.name);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
            let on_disk = std::fs::read_to_string(format!("{dir}/{}", m.name)).unwrap();
            assert_eq!(on_disk, m.sql);
        }
    }

    #[test]
    fn statements_split_and_gates_parse() {
        let base = &MIGRATIONS[0];
        assert!(base.requires().is_none());
        let stmts = base.statements();
        assert_eq!(stmts.len(), 4);
        assert!(stmts
            .iter()
            .all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
        assert!(stmts.iter().all(|s| !s.ends_with(';')));
        let newer = &MIGRATIONS[1];
        assert_eq!(
            newer.requires(),
            Some(ServerVersion {
                major: 21,
                minor: 8,
                patch: 0
            })
        );
        assert_eq!(newer.statements().len(), 5);
        assert_ne!(base.checksum(), newer.checksum());
    }
}
