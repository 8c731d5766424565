//! The daemon's runtime: one generation of clients and tasks built from a config (ClickHouse
//! store and writer, REST client, backfill engine, stream managers, live task, gap-scan
//! scheduler, supervisor), and the reconcile loop that drives it. A config edit that only
//! touches the operator, gap-scan or logging settings is applied in place; one that changes
//! how we reach ClickHouse or Binance (or the writer, backfill or stream settings) replaces the
//! generation in-process: tasks stop, the writer flushes, new clients start. Never a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::desired::{desired, Desired, PairSpec};
use super::plan::plan;
use super::status::{phase, StatusHub};
use super::supervisor::{Factory, Policy, Supervisor};
use crate::config::{Config, GapScanConfig};
use crate::exchange::archive::ArchiveClient;
use crate::exchange::egress::ProxyPool;
use crate::exchange::governor::Governors;
use crate::exchange::rest::RestClient;
use crate::exchange::ws::{LiveEvent, MarketStreams};
use crate::market::{Market, PairKey, Period};
use crate::store::migrate;
use crate::store::writer::{Writer, WriterError, WriterHandle, WriterSummary};
use crate::store::{Store, StoreError};
use crate::tasks::backfill::Backfill;
use crate::tasks::live::Live;
use crate::tasks::pair::PairTask;

/// Why the reconcile loop returned.
enum Exit {
    Shutdown,
    Rebuild(Arc<Config>),
}

/// Runs the operator until `shutdown`: migrate, reconcile, follow config edits.
pub async fn run(
    mut cfg_rx: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let status = StatusHub::default();
    let mut cfg = cfg_rx.borrow_and_update().clone();
    let Some(mut gen) = Generation::start(cfg.clone(), status.clone(), &shutdown).await? else {
        info!("Shutdown requested before ClickHouse became ready.");
        return Ok(());
    };
    loop {
        let new = match gen.reconcile_loop(&mut cfg_rx, &shutdown).await {
            Exit::Shutdown => {
                log_flushed(gen.stop().await);
                return Ok(());
            }
            Exit::Rebuild(new) => new,
        };
        // The new settings must work before the running generation is given up: a wrong
        // password or an unreachable host in an edit changes nothing (the last good config
        // keeps running, and the error says why).
        if let Err(e) = preflight(&new, &shutdown).await {
            error!(error = %format!("{e:#}"), "The edited config does not work; keeping the running config.");
            continue;
        }
        info!("Rebuilding clients and tasks for the new config.");
        log_flushed(gen.stop().await);
        gen = match Generation::start(new.clone(), status.clone(), &shutdown).await {
            Ok(Some(g)) => {
                cfg = new;
                g
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                error!(error = %format!("{e:#}"), "Cannot start with the edited config; going back to the last good one.");
                match Generation::start(cfg.clone(), status.clone(), &shutdown).await? {
                    Some(g) => g,
                    None => return Ok(()),
                }
            }
        };
    }
}

fn log_flushed(summary: anyhow::Result<WriterSummary>) {
    match summary {
        Ok(s) => info!(rows = s.rows_written, "Writer flushed."),
        Err(e) => error!(error = %format!("{e:#}"), "The writer could not flush everything."),
    }
}

/// How long an edited config gets to prove its ClickHouse settings before it is refused.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(15);

/// Checks that `cfg` reaches ClickHouse and prepares the schema, and that its clients build.
async fn preflight(cfg: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse)?;
    let cancel = shutdown.child_token();
    let migrated =
        tokio::time::timeout(PREFLIGHT_TIMEOUT, migrate_when_ready(&store, &cancel)).await;
    cancel.cancel();
    match migrated {
        Ok(Ok(Some(_))) => {}
        Ok(Ok(None)) => anyhow::bail!("shutting down"),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => anyhow::bail!(
            "ClickHouse at {} not reachable within {PREFLIGHT_TIMEOUT:?}",
            store.url()
        ),
    }
    RestClient::new(
        cfg,
        Arc::new(Governors::new(cfg.backfill.weight_budget_ratio)),
    )?;
    ArchiveClient::new(&cfg.binance.archive_url, cfg.backfill.request_timeout)?;
    Ok(())
}

/// Whether moving from `old` to `new` needs new clients (and so a new generation).
fn needs_rebuild(old: &Config, new: &Config) -> bool {
    old.clickhouse != new.clickhouse
        || old.binance != new.binance
        || old.writer != new.writer
        || old.backfill != new.backfill
        || old.streams != new.streams
        || old.proxy.websocket != new.proxy.websocket
}

fn policy(cfg: &Config) -> Policy {
    Policy {
        stop_timeout: cfg.operator.stop_timeout,
        restart_backoff: cfg.operator.restart_backoff,
        max_restart_backoff: cfg.operator.max_restart_backoff,
        healthy_after: cfg.operator.healthy_after,
    }
}

/// Gap-scan ticks per period, driven by cron jobs of tokio-cron-scheduler. The broadcast
/// senders outlive schedule changes, so pair tasks keep their receivers.
struct ScanScheduler {
    sched: tokio_cron_scheduler::JobScheduler,
    ticks: Ticks,
    jobs: Vec<Uuid>,
}

/// One tick channel per period (every period has one).
#[derive(Clone)]
struct Ticks(Arc<HashMap<Period, broadcast::Sender<()>>>);

impl Ticks {
    fn subscribe(&self, p: Period) -> broadcast::Receiver<()> {
        match self.0.get(&p) {
            Some(tx) => tx.subscribe(),
            // Unreachable; a receiver that never ticks only means no scans.
            None => broadcast::channel(1).1,
        }
    }
}

impl ScanScheduler {
    async fn start(cfg: &GapScanConfig) -> anyhow::Result<ScanScheduler> {
        let sched = tokio_cron_scheduler::JobScheduler::new()
            .await
            .context("cannot create the gap-scan scheduler")?;
        sched
            .start()
            .await
            .context("cannot start the gap-scan scheduler")?;
        let ticks = Ticks(Arc::new(
            Period::ALL
                .iter()
                .map(|p| (*p, broadcast::channel(4).0))
                .collect(),
        ));
        let mut s = ScanScheduler {
            sched,
            ticks,
            jobs: Vec::new(),
        };
        s.set(cfg).await?;
        Ok(s)
    }

    /// Replaces the cron jobs with those of `cfg`.
    async fn set(&mut self, cfg: &GapScanConfig) -> anyhow::Result<()> {
        for id in std::mem::take(&mut self.jobs) {
            let _ = self.sched.remove(&id).await;
        }
        for p in Period::ALL {
            let expr = cfg.cron_for(p);
            let tx = self
                .ticks
                .0
                .get(&p)
                .cloned()
                .context("tick channel missing")?;
            let job = tokio_cron_scheduler::Job::new_async(expr.as_str(), move |_, _| {
                let tx = tx.clone();
                Box::pin(async move {
                    let _ = tx.send(());
                })
            })
            .with_context(|| format!("bad gap-scan schedule {expr:?} for {p}"))?;
            let id = self
                .sched
                .add(job)
                .await
                .context("cannot add a gap-scan job")?;
            self.jobs.push(id);
        }
        Ok(())
    }

    async fn shutdown(mut self) {
        let _ = self.sched.shutdown().await;
    }
}

/// What every pair task of a generation shares.
#[derive(Clone)]
struct PairDeps {
    backfill: Arc<Backfill>,
    rest: Arc<RestClient>,
    store: Store,
    status: StatusHub,
    ticks: Ticks,
    grace: Arc<std::sync::atomic::AtomicU64>,
    backfill_slots: Arc<tokio::sync::Semaphore>,
}

/// One generation of clients and tasks.
struct Generation {
    cfg: Arc<Config>,
    store: Store,
    cancel: CancellationToken,
    writer: WriterHandle,
    writer_cancel: CancellationToken,
    writer_task: JoinHandle<Result<WriterSummary, WriterError>>,
    streams: BTreeMap<Market, MarketStreams>,
    streamed: watch::Sender<BTreeSet<PairKey>>,
    live_task: JoinHandle<()>,
    supervisor: Supervisor,
    scheduler: Option<ScanScheduler>,
    status: StatusHub,
    flusher: JoinHandle<()>,
    flusher_cancel: CancellationToken,
    /// Last reported problem per bad `trading_pairs` row (logged once per change).
    reported: BTreeMap<(String, String, String), String>,
    grace: Arc<std::sync::atomic::AtomicU64>,
    pool: Arc<ProxyPool>,
    proxy_problems: Vec<String>,
}

impl Generation {
    /// Builds everything from `cfg`; `None` if shut down while waiting for ClickHouse.
    async fn start(
        cfg: Arc<Config>,
        status: StatusHub,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Generation>> {
        info!(environment = %cfg.environment, clickhouse = %cfg.clickhouse.url(),
            database = %cfg.clickhouse.database, "Starting the operator.");
        let store = Store::new(&cfg.clickhouse)?;
        let Some(report) = migrate_when_ready(&store, shutdown).await? else {
            return Ok(None);
        };
        let server = report
            .server_version
            .map_or_else(|| "unknown".to_string(), |v| v.to_string());
        info!(%server, applied = report.applied.len(), skipped = report.skipped.len(),
            "Schema up to date.");
        let cancel = CancellationToken::new();
        let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
        let writer_cancel = CancellationToken::new();
        let writer_task = tokio::spawn(writer.run(writer_cancel.clone()));

        let mut governors = Governors::new(cfg.backfill.weight_budget_ratio);
        for m in Market::ALL {
            governors = governors.with_override(m, cfg.binance.market(m).weight_limit);
        }
        let pool = Arc::new(ProxyPool::new(&cfg, Arc::new(governors))?);
        // Proxies are known before the first request: a region that refuses direct
        // connections must not see one.
        match super::proxies::load(&store, &pool).await {
            Ok(problems) => {
                for p in problems {
                    warn!(problem = %p, "Skipping a proxy_config row.");
                }
            }
            Err(e) => {
                warn!(error = %e, "Cannot read proxy_config yet; starting with direct connections only.")
            }
        }
        let rest = Arc::new(RestClient::with_pool(&cfg, pool.clone())?);
        let health_cancel = cancel.child_token();
        tokio::spawn(pool.clone().run_health(
            format!("{}/time", cfg.binance.spot.rest_base()),
            health_cancel,
            super::proxies::log_health,
        ));
        let archive = Arc::new(ArchiveClient::new(
            &cfg.binance.archive_url,
            cfg.backfill.request_timeout,
        )?);
        let backfill = Arc::new(Backfill::new(
            rest.clone(),
            archive,
            store.clone(),
            handle.clone(),
            cfg.backfill.clone(),
        ));

        let (ev_tx, ev_rx) = mpsc::channel::<LiveEvent>(16_384);
        let mut streams = BTreeMap::new();
        for m in Market::ALL {
            let s = MarketStreams::new(
                m,
                &cfg.binance.market(m).ws_url,
                cfg.streams.clone(),
                ev_tx.clone(),
                cancel.child_token(),
            )
            .with_pool(cfg.proxy.websocket.then(|| pool.clone()));
            streams.insert(m, s);
        }
        drop(ev_tx);
        let (streamed, streamed_rx) = watch::channel(BTreeSet::new());
        let live = Live {
            events: ev_rx,
            streamed: streamed_rx,
            writer: handle.clone(),
            backfill: backfill.clone(),
            rest: rest.clone(),
            status: status.clone(),
            late_grace: cfg.streams.late_grace,
        };
        let live_task = tokio::spawn(live.run(cancel.child_token()));

        let scheduler = ScanScheduler::start(&cfg.gap_scan).await?;
        let grace = Arc::new(std::sync::atomic::AtomicU64::new(
            u64::try_from(cfg.gap_scan.grace.as_millis()).unwrap_or(u64::MAX),
        ));
        let deps = PairDeps {
            backfill: backfill.clone(),
            rest: rest.clone(),
            store: store.clone(),
            status: status.clone(),
            ticks: scheduler.ticks.clone(),
            grace: grace.clone(),
            backfill_slots: Arc::new(tokio::sync::Semaphore::new(
                crate::tasks::pair::PARALLEL_BACKFILLS,
            )),
        };
        let factory: Factory = Arc::new(move |pair: PairKey, spec: PairSpec, cancel| {
            let d = deps.clone();
            Box::pin(async move {
                PairTask {
                    ticks: d.ticks.subscribe(pair.period),
                    pair,
                    spec,
                    backfill: d.backfill,
                    rest: d.rest,
                    store: d.store,
                    status: d.status,
                    grace: d.grace,
                    backfill_slots: d.backfill_slots,
                }
                .run(cancel)
                .await
            })
        });
        let supervisor =
            Supervisor::new(factory, policy(&cfg), status.clone(), cancel.child_token());
        let flusher_cancel = CancellationToken::new();
        let flusher = tokio::spawn(flush_status(
            store.clone(),
            status.clone(),
            pool.clone(),
            flusher_cancel.clone(),
        ));
        Ok(Some(Generation {
            cfg,
            store,
            cancel,
            writer: handle,
            writer_cancel,
            writer_task,
            streams,
            streamed,
            live_task,
            supervisor,
            scheduler: Some(scheduler),
            status,
            flusher,
            flusher_cancel,
            reported: BTreeMap::new(),
            grace,
            pool,
            proxy_problems: Vec::new(),
        }))
    }

    async fn reconcile_loop(
        &mut self,
        cfg_rx: &mut watch::Receiver<Arc<Config>>,
        shutdown: &CancellationToken,
    ) -> Exit {
        let mut poll = crate::ticker(self.cfg.operator.poll_interval);
        let mut metrics = crate::ticker(self.cfg.operator.metrics_interval);
        metrics.tick().await;
        info!(poll = ?self.cfg.operator.poll_interval,
            "Ready; reconciling trading_pairs and app.yaml (stop with SIGTERM or Ctrl-C).");
        let mut watching = true;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Exit::Shutdown,
                changed = cfg_rx.changed(), if watching => {
                    if changed.is_err() {
                        // The watcher is gone: keep the running config.
                        watching = false;
                        continue;
                    }
                    let new = cfg_rx.borrow_and_update().clone();
                    crate::logging::set_secrets(new.secrets());
                    if needs_rebuild(&self.cfg, &new) {
                        return Exit::Rebuild(new);
                    }
                    if let Err(e) = self.apply_in_place(&new).await {
                        error!(error = %format!("{e:#}"), "Cannot apply the new config in place; rebuilding.");
                        return Exit::Rebuild(new);
                    }
                    if new.operator.poll_interval != self.cfg.operator.poll_interval {
                        poll = crate::ticker(new.operator.poll_interval);
                    }
                    if new.operator.metrics_interval != self.cfg.operator.metrics_interval {
                        metrics = crate::ticker(new.operator.metrics_interval);
                        metrics.tick().await;
                    }
                    self.cfg = new;
                    info!("New config applied.");
                    self.reconcile().await;
                }
                _ = poll.tick() => self.reconcile().await,
                _ = metrics.tick() => {
                    let streams: usize = self.streams.values().map(|s| s.connections().iter().map(|c| c.1).sum::<usize>()).sum();
                    info!("{}", crate::metrics::line(streams));
                }
            }
        }
    }

    /// Applies the settings that need no new clients.
    async fn apply_in_place(&mut self, new: &Config) -> anyhow::Result<()> {
        if new.logging.level != self.cfg.logging.level {
            match crate::logging::set_level(&new.logging.level) {
                Ok(()) => info!(level = %new.logging.level, "Log level changed."),
                Err(e) => warn!(error = %e, "Cannot change the log level."),
            }
        }
        if new.logging.dir != self.cfg.logging.dir
            || new.logging.keep_days != self.cfg.logging.keep_days
        {
            warn!("app.logging.dir and keep_days take effect at the next start; the level applies now.");
        }
        self.supervisor.set_policy(policy(new));
        if new.proxy != self.cfg.proxy {
            self.pool.set_config(&new.proxy);
            info!("Proxy settings changed.");
        }
        if new.gap_scan != self.cfg.gap_scan {
            self.grace.store(
                u64::try_from(new.gap_scan.grace.as_millis()).unwrap_or(u64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Some(s) = self.scheduler.as_mut() {
                s.set(&new.gap_scan).await?;
            }
            info!("Gap-scan schedules changed.");
        }
        Ok(())
    }

    /// One level-triggered pass: read desired state, plan, converge. If the desired state
    /// cannot be read, nothing changes.
    async fn reconcile(&mut self) {
        let rows = match self.store.trading_pairs().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "Cannot read trading_pairs; changing nothing until it can be read.");
                return;
            }
        };
        match super::proxies::load(&self.store, &self.pool).await {
            Ok(problems) => {
                if problems != self.proxy_problems {
                    for p in &problems {
                        warn!(problem = %p, "Skipping a proxy_config row.");
                    }
                    self.proxy_problems = problems;
                }
            }
            Err(e) => warn!(error = %e, "Cannot read proxy_config; keeping the current pool."),
        }
        let d = desired(&rows);
        self.report(&d);
        let running = self.supervisor.running();
        let p = plan(&d.pairs, &running);
        if !p.is_empty() {
            info!(
                add = p.add.len(),
                change = p.change.len(),
                remove = p.remove.len(),
                "Reconciling."
            );
        }
        let mut stop: Vec<PairKey> = p.remove.clone();
        stop.extend(p.change.iter().map(|(k, _)| k.clone()));
        self.supervisor.stop(&stop).await;
        for k in &p.remove {
            self.status.update(k, |r| {
                r.phase = phase::DISABLED.into();
                r.last_error.clear();
            });
        }
        for (k, spec) in p.add.iter().chain(p.change.iter()) {
            self.supervisor.start(k.clone(), *spec);
        }
        let live: BTreeSet<PairKey> = d
            .pairs
            .iter()
            .filter(|(_, s)| s.stream)
            .map(|(k, _)| k.clone())
            .collect();
        for s in self.streams.values_mut() {
            s.apply(&live);
        }
        self.streamed.send_if_modified(|cur| {
            if *cur == live {
                false
            } else {
                *cur = live;
                true
            }
        });
    }

    /// Bad and disabled rows go to `pair_status` (and the log, once per change).
    fn report(&mut self, d: &Desired) {
        let mut seen = BTreeMap::new();
        for inv in &d.invalid {
            let key = (inv.market.clone(), inv.symbol.clone(), inv.period.clone());
            if self.reported.get(&key) != Some(&inv.error) {
                error!(market = %inv.market, symbol = %inv.symbol, period = %inv.period,
                    error = %inv.error, "Skipping an invalid trading_pairs row.");
            }
            seen.insert(key.clone(), inv.error.clone());
            self.status.update_raw(key, |r| {
                r.phase = phase::ERROR.into();
                r.last_error = format!("invalid trading_pairs row: {}", inv.error);
            });
        }
        self.reported = seen;
        for k in &d.disabled {
            self.status.update(k, |r| {
                r.phase = phase::DISABLED.into();
                r.last_error.clear();
            });
        }
    }

    /// Stops everything of this generation and flushes the writer.
    async fn stop(mut self) -> Result<WriterSummary, anyhow::Error> {
        self.supervisor.stop_all().await;
        // Sockets and the live task get a second each: nothing they hold is lost by an abort
        // (a closed candle not yet handed on is healed by REST at the next start).
        for (_, s) in std::mem::take(&mut self.streams) {
            s.shutdown(Duration::from_secs(1)).await;
        }
        self.cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(1), &mut self.live_task)
            .await
            .is_err()
        {
            self.live_task.abort();
        }
        if let Some(s) = self.scheduler.take() {
            s.shutdown().await;
        }
        drop(self.writer);
        self.writer_cancel.cancel();
        let summary = self
            .writer_task
            .await
            .context("writer task panicked")?
            .context("writer did not flush")?;
        // The last status rows after everything stopped.
        self.flusher_cancel.cancel();
        let _ = self.flusher.await;
        Ok(summary)
    }
}

/// Writes changed status rows (pairs and proxies) every second, and once more when stopped.
async fn flush_status(
    store: Store,
    status: StatusHub,
    pool: Arc<ProxyPool>,
    cancel: CancellationToken,
) {
    let mut tick = crate::ticker(Duration::from_secs(1));
    let mut last_proxies: Vec<crate::store::state::ProxyStatusRow> = Vec::new();
    loop {
        let stop = tokio::select! {
            biased;
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        let now = u32::try_from(crate::market::now_ms() / 1000).unwrap_or(u32::MAX);
        let rows = status.take_dirty(now);
        if !rows.is_empty() {
            if let Err(e) = store.write_status(&rows).await {
                warn!(error = %e, rows = rows.len(), "Cannot write pair_status; retrying.");
                status.requeue(&rows);
            }
        }
        let proxies = super::proxies::status_rows(&pool, now);
        let changed: Vec<_> = proxies
            .iter()
            .filter(|r| {
                !last_proxies.iter().any(|l| {
                    l.host == r.host
                        && l.port == r.port
                        && l.state == r.state
                        && l.last_error == r.last_error
                        && l.requests == r.requests
                        && l.failures == r.failures
                        && l.weight_used == r.weight_used
                })
            })
            .cloned()
            .collect();
        if !changed.is_empty() {
            match store.write_proxy_status(&changed).await {
                Ok(()) => last_proxies = proxies,
                Err(e) => warn!(error = %e, "Cannot write proxy_status; retrying."),
            }
        }
        if stop {
            return;
        }
    }
}

/// Applies migrations, retrying while ClickHouse is unreachable (it may still be starting);
/// a non-retryable error (bad credentials, SQL error) ends the daemon with that error.
pub async fn migrate_when_ready(
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
