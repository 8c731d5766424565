//! The commands behind the CLI: the daemon, `--check-config` and `migrate`. Each returns a
//! result the binary maps to an exit code; argument parsing lives in `main.rs`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::store::writer::Writer;
use crate::store::{migrate, Store, StoreError};

/// `--check-config`: validate (done by the caller's load), connect to ClickHouse, read its
/// version, print the effective config with secrets as `***`. Returns the problems found.
pub async fn check_config(cfg: &Config, path: &str, out: &mut impl Write) -> Vec<String> {
    let mut problems = Vec::new();
    let _ = writeln!(out, "# config file: {path}");
    let _ = writeln!(out, "# effective configuration (secrets shown as ***):");
    let _ = write!(out, "{}", cfg.redacted_yaml());
    match Store::new(&cfg.clickhouse) {
        Ok(store) => match store.server_version().await {
            Ok(v) => {
                let _ = writeln!(
                    out,
                    "# ClickHouse {v} at {} as user {:?}: connected",
                    store.url(),
                    cfg.clickhouse.username
                );
            }
            Err(e) => problems.push(format!("app.clickhouse: cannot connect: {e}")),
        },
        Err(e) => problems.push(format!("app.clickhouse: {e}")),
    }
    problems
}

/// `migrate`: create the database and apply pending migrations.
pub async fn migrate(cfg: &Config) -> anyhow::Result<migrate::MigrationReport> {
    let store = Store::new(&cfg.clickhouse)?;
    let report = migrate::run(&store).await?;
    Ok(report)
}

/// The daemon: migrate (waiting for ClickHouse if it is not up yet), start the writer, run
/// until SIGTERM/SIGINT, then flush and exit. Later issues add the reconciler here.
pub async fn run_daemon(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    info!(environment = %cfg.environment, clickhouse = %cfg.clickhouse.url(),
        database = %cfg.clickhouse.database, "QuantService starting.");
    let store = Store::new(&cfg.clickhouse)?;
    let report = migrate_when_ready(&store, &shutdown).await?;
    let Some(report) = report else {
        info!("Shutdown requested before ClickHouse became ready.");
        return Ok(());
    };
    let server = report
        .server_version
        .map_or_else(|| "unknown".to_string(), |v| v.to_string());
    info!(%server, applied = report.applied.len(), skipped = report.skipped.len(),
        "Schema up to date.");

    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let writer_cancel = shutdown.child_token();
    let writer_task = tokio::spawn(writer.run(writer_cancel.clone()));
    info!("Ready; idling until the operator has work (stop with SIGTERM or Ctrl-C).");
    shutdown.cancelled().await;
    info!("Shutting down.");
    drop(handle);
    writer_cancel.cancel();
    let summary = writer_task
        .await
        .context("writer task panicked")?
        .context("writer did not flush")?;
    info!(rows = summary.rows_written, "QuantService stopped.");
    Ok(())
}

/// Applies migrations, retrying while ClickHouse is unreachable (it may still be starting);
/// a non-retryable error (bad credentials, SQL error) ends the daemon with that error.
async fn migrate_when_ready(
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<Option<migrate::MigrationReport>, StoreError> {
    let mut attempt: u32 = 0;
    loop {
        match migrate::run(store).await {
            Ok(r) => return Ok(Some(r)),
            Err(e) if e.is_retryable() => {
                let delay = crate::backoff::delay(
                    attempt,
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                    &mut rand::rng(),
                );
                attempt = attempt.saturating_add(1);
                warn!(error = %e, retry_in = ?delay, "ClickHouse not ready; retrying.");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                error!(error = %e, "Cannot prepare the ClickHouse schema.");
                return Err(e);
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
