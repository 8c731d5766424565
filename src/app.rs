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

/// What `backfill-gap` asks for (strings as typed; validated here).
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub market: String,
    pub symbol: String,
    pub period: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Overrides `app.backfill.source` for this run.
    pub source: Option<String>,
}

/// What `backfill-gap` did, for its one-line summary.
#[derive(Debug, Clone)]
pub struct BackfillOutcome {
    pub pair: crate::market::PairKey,
    pub summary: crate::tasks::backfill::BackfillSummary,
    pub rows_written: u64,
    pub requests: u64,
    pub weight: u64,
    pub http_429: u64,
    pub http_418: u64,
    pub seconds: f64,
}

impl std::fmt::Display for BackfillOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.summary;
        write!(
            f,
            "backfill-gap {}: rows={} (archive={} rest={}) already={} gaps={} requests={} weight={} 429={} 418={} archive_files={} archive_fallbacks={} seconds={:.1}",
            self.pair,
            self.rows_written,
            s.rows_archive,
            s.rows_rest,
            s.present,
            s.gap_candles,
            self.requests,
            self.weight,
            self.http_429,
            self.http_418,
            s.archive_files,
            s.archive_fallbacks,
            self.seconds
        )
    }
}

/// `backfill-gap`: every closed candle of one pair in `[start_ms, end_ms)` into ClickHouse.
pub async fn backfill_gap(
    mut cfg: Config,
    req: BackfillRequest,
    progress: indicatif::ProgressBar,
    cancel: CancellationToken,
) -> anyhow::Result<BackfillOutcome> {
    use crate::config::BackfillSource;
    use crate::exchange::archive::ArchiveClient;
    use crate::exchange::governor::Governors;
    use crate::exchange::rest::RestClient;
    use crate::tasks::backfill::Backfill;
    use std::sync::Arc;

    let pair = crate::market::PairKey::parse(&req.market, &req.symbol, &req.period)?;
    if req.start_ms >= req.end_ms {
        anyhow::bail!(
            "range inverted or empty: --start_ms {} must be before --end_ms {}",
            req.start_ms,
            req.end_ms
        );
    }
    if let Some(source) = &req.source {
        cfg.backfill.source = match source.as_str() {
            "auto" => BackfillSource::Auto,
            "archive" => BackfillSource::Archive,
            "rest" => BackfillSource::Rest,
            other => anyhow::bail!("--source must be auto, archive or rest, got {other:?}"),
        };
    }
    let started = std::time::Instant::now();
    let store = Store::new(&cfg.clickhouse)?;
    migrate::run(&store)
        .await
        .context("cannot prepare ClickHouse")?;

    let mut governors = Governors::new(cfg.backfill.weight_budget_ratio);
    for m in crate::market::Market::ALL {
        governors = governors.with_override(m, cfg.binance.market(m).weight_limit);
    }
    let rest = Arc::new(RestClient::new(&cfg, Arc::new(governors))?);
    let archive = Arc::new(ArchiveClient::new(
        &cfg.binance.archive_url,
        cfg.backfill.request_timeout,
    )?);
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let writer_cancel = CancellationToken::new();
    let writer_task = tokio::spawn(writer.run(writer_cancel.clone()));
    let backfill = Backfill::new(
        rest.clone(),
        archive,
        store,
        handle.clone(),
        cfg.backfill.clone(),
    );
    let result = backfill
        .run(&pair, req.start_ms, req.end_ms, &progress, &cancel)
        .await;
    // Whatever happened, what was fetched is flushed before we report.
    drop(backfill);
    drop(handle);
    writer_cancel.cancel();
    let flushed = writer_task.await.context("writer task panicked")?;
    progress.finish_and_clear();
    let summary = result?;
    let written = flushed.context("rows could not be written")?.rows_written;
    let gov = rest.governor(pair.market).stats();
    let (requests, _, _) = rest.stats().snapshot();
    Ok(BackfillOutcome {
        pair,
        summary,
        rows_written: written,
        requests,
        weight: gov.weight,
        http_429: gov.http_429,
        http_418: gov.http_418,
        seconds: started.elapsed().as_secs_f64(),
    })
}
