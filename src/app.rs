//! The commands behind the CLI: the daemon, `--check-config`, `migrate`, `backfill-gap`,
//! `ws-start`, `optimize` and `ready`, and the signal watcher. Each returns a result the binary
//! maps to an exit code; argument parsing lives in `main.rs`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::store::writer::Writer;
use crate::store::{migrate, Store};

/// `--check-config`: validate (done by the caller's load), connect to ClickHouse, read its
/// version, print the effective config with secrets as `***`. Returns the problems found.
pub async fn check_config(cfg: &Config, path: &str, out: &mut impl Write) -> Vec<String> {
    let mut problems = Vec::new();
    let _ = writeln!(out, "# config file: {path}");
    let _ = writeln!(out, "# effective configuration (secrets shown as ***):");
    let _ = write!(out, "{}", cfg.redacted_yaml());
    let _ = writeln!(out, "# logs: {}", logs_summary(&cfg.logging));
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

/// Where the logs go, in one line for `--check-config`.
fn logs_summary(lg: &crate::config::LoggingConfig) -> String {
    match &lg.dir {
        Some(dir) => format!(
            "the console and {} (rotated at {} and at midnight UTC into {}/quantservice-YYYY-MM-DD[.N].log.gz, kept {} days)",
            dir.join("quantservice.log").display(),
            crate::config::format_size(lg.max_size),
            dir.join("archived").display(),
            lg.keep_days
        ),
        None => "the console only (app.logging.dir is not set and the binary is not in an install layout PREFIX/bin with PREFIX/logs)".to_string(),
    }
}

/// `migrate`: create the database and apply pending migrations.
pub async fn migrate(cfg: &Config) -> anyhow::Result<migrate::MigrationReport> {
    let store = Store::new(&cfg.clickhouse)?;
    let report = migrate::run(&store).await?;
    Ok(report)
}

/// The daemon: migrate (waiting for ClickHouse if it is not up yet), then run the operator —
/// reconcile `trading_pairs`/`proxy_config`/`app.yaml` (watched at `path`) into running
/// streams, backfills and gap scans — until SIGTERM/SIGINT; then stop the tasks, flush the
/// writer and return. What became of each edit of `app.yaml` is published on `reloads`.
pub async fn run_daemon(
    cfg: Config,
    path: std::path::PathBuf,
    reloads: crate::config_watch::Reloads,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use crate::config_watch::{spawn, Confirm};
    let watch_cancel = shutdown.child_token();
    // The runtime says whether a valid edit was applied: it may still refuse one that does
    // not work.
    let cfg_rx = spawn(
        path,
        cfg,
        reloads.clone(),
        Confirm::ByConsumer,
        watch_cancel.clone(),
    );
    let result = crate::operator::runtime::run(cfg_rx, reloads, shutdown).await;
    watch_cancel.cancel();
    result?;
    info!("QuantService stopped.");
    Ok(())
}

/// `ready`: polls the running daemon's `/readyz` (on `app.http.listen`, a wildcard address
/// reached on loopback) until it answers 200, for at most `timeout`.
/// `quantservice clientserver`: the client server alone, fed by following ClickHouse, until
/// `cancel` (clients then get 1001). `host`/`port` override `app.clientserver`.
pub async fn clientserver(
    cfg: &Config,
    host: Option<String>,
    port: Option<u16>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut cs = cfg.clientserver.clone();
    if let Some(h) = host {
        if !crate::config::is_bare_host(&h) {
            anyhow::bail!("--host must be an IP address or host name like 0.0.0.0, got {h:?}");
        }
        cs.host = h;
    }
    if let Some(p) = port {
        cs.port = p;
    }
    let store = Store::new(&cfg.clickhouse)?;
    // Not fatal: the server answers (replays fail with `unavailable`) and follows once
    // ClickHouse is back.
    if let Err(e) = store.ping(cfg.clickhouse.timeout).await {
        tracing::warn!(error = %e, "ClickHouse does not answer yet; serving anyway.");
    }
    let hub = crate::server::hub::Hub::default();
    let follower = crate::server::follow::Follower {
        store: store.clone(),
        hub: hub.clone(),
        interval: cs.follow_interval,
    };
    let mut follow =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(follower.run(cancel.child_token())));
    let facade = crate::server::facade::router(store.clone());
    let stop = cancel.child_token();
    let server = crate::server::client::run(&cs, hub, Some(store), facade, stop.clone());
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served.map_err(Into::into),
        ended = &mut follow => {
            // The follower only ends when cancelled; anything else is a bug: stop serving
            // (clients get 1001) and exit non-zero, so a service manager restarts us.
            stop.cancel();
            let _ = server.await;
            if cancel.is_cancelled() {
                return Ok(());
            }
            let why = match ended {
                Ok(()) => "it returned".to_string(),
                Err(e) => crate::join_error_text(e),
            };
            anyhow::bail!("the ClickHouse follower stopped ({why})")
        }
    }
}

pub async fn ready(cfg: &Config, timeout: Duration) -> Result<(), crate::server::ops::ReadyError> {
    crate::server::ops::wait_ready(&cfg.http.listen, timeout).await
}

/// `ws-start`: a temporary live stream of one pair that prints each closed candle and writes
/// it to ClickHouse until `cancel` (Ctrl-C).
pub async fn ws_start(
    cfg: Config,
    market: &str,
    symbol: &str,
    period: &str,
    out: &mut (impl Write + Send),
    cancel: CancellationToken,
) -> anyhow::Result<u64> {
    use crate::exchange::ws::{LiveEvent, MarketStreams};
    let pair = crate::market::PairKey::parse(market, symbol, period)?;
    let store = Store::new(&cfg.clickhouse)?;
    migrate::run(&store)
        .await
        .context("cannot prepare ClickHouse")?;
    // The same egress pool and governor as the daemon (and backfill-gap): REST always goes
    // through the pool, the stream too with `app.proxy.websocket`.
    let mut governors = crate::exchange::governor::Governors::new(cfg.backfill.weight_budget_ratio);
    for m in crate::market::Market::ALL {
        governors = governors.with_override(m, cfg.binance.market(m).weight_limit);
    }
    let rest = crate::exchange::rest::RestClient::new(&cfg, Arc::new(governors))?;
    for p in crate::operator::proxies::load(&store, rest.pool())
        .await
        .context("cannot read proxy_config")?
    {
        tracing::warn!(problem = %p, "Skipping a proxy_config row.");
    }
    // Binance accepts a subscription to any name and never sends a candle for an unknown one:
    // the symbol is checked against exchangeInfo first, as backfill-gap does.
    let info = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Ok(0),
        info = rest.symbol_info(&pair) => info.with_context(|| format!("cannot stream {pair}"))?,
    };
    if info.status != "TRADING" {
        tracing::warn!(%pair, status = %info.status, "The symbol is not trading; candles arrive only while it trades.");
    }
    let pool = cfg.proxy.websocket.then(|| rest.pool().clone());
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    let writer_cancel = CancellationToken::new();
    let writer_task = tokio::spawn(writer.run(writer_cancel.clone()));
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let mut streams = MarketStreams::new(
        pair.market,
        &cfg.binance.market(pair.market).ws_url,
        cfg.streams.clone(),
        tx,
        cancel.child_token(),
    )
    .with_pool(pool);
    streams.apply(&std::iter::once(pair.clone()).collect());
    info!(%pair, "Streaming; stop with Ctrl-C.");
    let mut seen = std::collections::BTreeSet::new();
    let mut count = 0u64;
    loop {
        let ev = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            ev = rx.recv() => ev,
        };
        let Some(ev) = ev else { break };
        if let LiveEvent::Final { kline: k, .. } = ev {
            // A renewed socket overlaps the old one: print and store each candle once.
            if !seen.insert(k.open_time) {
                continue;
            }
            while seen.len() > 64 {
                seen.pop_first();
            }
            let _ = writeln!(
                out,
                "{} open_time={} open={} high={} low={} close={} volume={} trades={}",
                k.pair, k.open_time, k.open, k.high, k.low, k.close, k.volume, k.trades
            );
            let _ = out.flush();
            count += 1;
            if handle.send(k).await.is_err() {
                break;
            }
        }
    }
    streams.shutdown(Duration::from_secs(2)).await;
    drop(handle);
    writer_cancel.cancel();
    let summary = writer_task
        .await
        .context("writer task panicked")?
        .context("writer did not flush")?;
    info!(
        candles = count,
        rows = summary.rows_written,
        "Stream stopped."
    );
    Ok(count)
}

/// What `optimize` was asked to do (the table name as typed; checked here).
#[derive(Debug, Clone, Default)]
pub struct OptimizeRequest {
    /// `OPTIMIZE … FINAL` rather than a plain `OPTIMIZE`.
    pub with_final: bool,
    /// Every partition with parts, not only the dirty ones.
    pub all: bool,
    /// Only this tracked table.
    pub table: Option<String>,
    pub dry_run: bool,
}

/// `optimize`: `OPTIMIZE` the partitions that received late or replaced rows (every partition
/// with `all`), one at a time, printing a line per partition and a summary on `out`. An error
/// (exit 1) when a partition failed or ClickHouse cannot be reached; Ctrl-C (`cancel`) stops
/// the pass (the partition in flight stays dirty).
pub async fn optimize(
    cfg: &Config,
    req: OptimizeRequest,
    out: &mut (impl Write + Send),
    cancel: CancellationToken,
) -> anyhow::Result<crate::tasks::maintenance::Summary> {
    use crate::store::partitions::{tracked, TRACKED};
    use crate::tasks::maintenance;
    let table = match req.table.as_deref() {
        None => None,
        Some(name) => Some(tracked(name).with_context(|| {
            let names: Vec<&str> = TRACKED.iter().map(|t| t.name).collect();
            format!(
                "unknown table {name:?} (tables whose partitions are tracked: {})",
                names.join(", ")
            )
        })?),
    };
    let store = Store::new(&cfg.clickhouse)?;
    migrate::run(&store)
        .await
        .context("cannot prepare ClickHouse")?;
    let opts = maintenance::Options {
        with_final: req.with_final,
        all: req.all,
        table,
        dry_run: req.dry_run,
        timeout: cfg.maintenance.timeout,
    };
    let summary = maintenance::optimize(&store, &opts, &cancel, &mut |r| {
        let _ = writeln!(out, "{r}");
        let _ = out.flush();
    })
    .await?;
    let _ = writeln!(out, "{summary}");
    let _ = out.flush();
    summary
        .result()
        .map_err(|e| anyhow::anyhow!("optimize: {e}"))?;
    Ok(summary)
}

/// Resolves on SIGTERM or SIGINT.
/// Set when the signal watcher died (it panicked) instead of seeing a signal.
static SIGNAL_WATCHER_DIED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the signal watcher died: the binary then exits non-zero even if the command it ran
/// ended cleanly, so the service manager restarts QuantService.
pub fn signal_watcher_died() -> bool {
    SIGNAL_WATCHER_DIED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Spawns the owner of the process's shutdown signals: SIGTERM or Ctrl-C (`signal`) cancels
/// `trigger`. If the watcher dies instead (it panics), `trigger` is cancelled too, with an
/// error in the log, and [`signal_watcher_died`] says so: a process that could no longer be
/// stopped cleanly shuts down now, exiting 1 so systemd restarts it, rather than ignoring
/// SIGTERM later. (The watcher merely dropped at the end of the process is no death.)
pub fn watch_signals<F>(signal: F, trigger: CancellationToken) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    struct Guard(CancellationToken);
    impl Drop for Guard {
        fn drop(&mut self) {
            if std::thread::panicking() {
                SIGNAL_WATCHER_DIED.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::error!("The signal watcher died; shutting down (exit code 1).");
                self.0.cancel();
            }
        }
    }
    tokio::spawn(async move {
        let _guard = Guard(trigger.clone());
        signal.await;
        trigger.cancel();
    })
}

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
    // The same egress pool as the daemon: the enabled proxy_config rows.
    for p in crate::operator::proxies::load(&store, rest.pool())
        .await
        .context("cannot read proxy_config")?
    {
        tracing::warn!(problem = %p, "Skipping a proxy_config row.");
    }
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
    let gov = rest.governor_stats(pair.market);
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

/// What `indicators` asks for (strings as typed; validated here).
#[derive(Debug, Clone)]
pub struct IndicatorsRequest {
    pub market: String,
    pub symbol: String,
    pub period: String,
    /// Specs as typed (`rsi(14)`, `MACD(12, 26, 9)`).
    pub indicators: Vec<String>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    /// Write a CSV there instead of the `indicators` table.
    pub csv: Option<std::path::PathBuf>,
}

/// What `indicators` did, for its one-line summary.
#[derive(Debug, Clone)]
pub struct IndicatorsOutcome {
    pub pair: crate::market::PairKey,
    pub specs: Vec<String>,
    pub summary: crate::tasks::indicators::OfflineSummary,
    /// `indicators` rows written (0 with `--csv`).
    pub rows_written: u64,
    pub csv: Option<std::path::PathBuf>,
    pub seconds: f64,
}

impl std::fmt::Display for IndicatorsOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.summary;
        write!(
            f,
            "indicators {} [{}]: candles={} in_range={} values={} ",
            self.pair,
            self.specs.join(" "),
            s.candles,
            s.in_range,
            s.values
        )?;
        match &self.csv {
            Some(path) => write!(f, "csv={}", path.display())?,
            None => write!(f, "rows={}", self.rows_written)?,
        }
        write!(f, " seconds={:.1}", self.seconds)
    }
}

/// `indicators`: computes indicators over a pair's stored series (warm-up from its first
/// closed candle) and writes the values of `[start_ms, end_ms)` to `indicators` or a CSV.
pub async fn indicators(
    cfg: Config,
    req: IndicatorsRequest,
    progress: indicatif::ProgressBar,
    cancel: CancellationToken,
) -> anyhow::Result<IndicatorsOutcome> {
    use crate::tasks::indicators::{api::Spec, compute_stored, Output};

    let pair = crate::market::PairKey::parse(&req.market, &req.symbol, &req.period)?;
    if req.indicators.is_empty() {
        anyhow::bail!("no indicator given: pass --indicator 'rsi(14)' (repeatable)");
    }
    let mut specs: Vec<Spec> = Vec::new();
    for text in &req.indicators {
        let spec = Spec::parse(text).with_context(|| format!("bad indicator spec {text:?}"))?;
        if !specs.contains(&spec) {
            specs.push(spec);
        }
    }
    let from = req.start_ms.unwrap_or(i64::MIN);
    let to = req.end_ms.unwrap_or(i64::MAX);
    if from >= to {
        anyhow::bail!("range inverted or empty: --start_ms {from} must be before --end_ms {to}");
    }
    let started = std::time::Instant::now();
    let store = Store::new(&cfg.clickhouse)?;
    migrate::run(&store)
        .await
        .context("cannot prepare ClickHouse")?;
    let total = store
        .count_final_klines(&pair)
        .await
        .with_context(|| format!("cannot read the candles of {pair}"))?;
    if total == 0 {
        anyhow::bail!(crate::tasks::indicators::IndicatorError::NoCandles(pair));
    }
    progress.set_length(total);
    let report = |n: u64| progress.set_position(n);
    let names: Vec<String> = specs.iter().map(ToString::to_string).collect();
    let (summary, rows_written) = match &req.csv {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let summary = compute_stored(
                &store,
                &pair,
                &specs,
                (from, to),
                Output::Csv(&mut out),
                &report,
                &cancel,
            )
            .await?;
            (summary, 0)
        }
        None => {
            let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
            let writer_cancel = CancellationToken::new();
            let writer_task = tokio::spawn(writer.run(writer_cancel.clone()));
            let result = compute_stored(
                &store,
                &pair,
                &specs,
                (from, to),
                Output::Writer(&handle),
                &report,
                &cancel,
            )
            .await;
            // Whatever happened, what was computed is flushed before we report.
            drop(handle);
            writer_cancel.cancel();
            let flushed = writer_task.await.context("writer task panicked")?;
            let summary = result?;
            let written = flushed
                .context("indicator values could not be written")?
                .indicator_rows_written;
            (summary, written)
        }
    };
    progress.finish_and_clear();
    Ok(IndicatorsOutcome {
        pair,
        specs: names,
        summary,
        rows_written,
        csv: req.csv,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signal_watcher_that_dies_shuts_the_process_down() {
        let trigger = CancellationToken::new();
        assert!(!signal_watcher_died());
        let h = watch_signals(async { panic!("injected") }, trigger.clone());
        assert!(h.await.unwrap_err().is_panic());
        assert!(trigger.is_cancelled());
        assert!(signal_watcher_died(), "the binary will exit 1");
    }

    #[tokio::test]
    async fn a_signal_cancels_the_trigger_and_nothing_else_does() {
        let trigger = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = watch_signals(
            async {
                let _ = rx.await;
            },
            trigger.clone(),
        );
        tokio::task::yield_now().await;
        assert!(!trigger.is_cancelled());
        tx.send(()).unwrap();
        h.await.unwrap();
        assert!(trigger.is_cancelled());
    }
}
