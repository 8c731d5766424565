//! The daemon's runtime: one generation of clients and tasks built from a config (ClickHouse
//! store and writer, REST client, backfill engine, stream managers, live task, gap-scan
//! scheduler, scheduled maintenance, supervisor), and the reconcile loop that drives it. A
//! config edit that only touches the operator, gap-scan, maintenance or logging settings is
//! applied in place; one that changes how we reach ClickHouse or Binance (or the writer,
//! backfill or stream settings) replaces the generation in-process: tasks stop, the writer
//! flushes, new clients start. Never a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::daemon::Services;
use super::desired::{desired, Desired};
use super::plan::{plan, State};
use super::supervisor::{Factory, Fatal, OnFailure, Policy, ServiceFactory, Supervisor};
use crate::config::Config;
use crate::config_watch::Reloads;
use crate::exchange::archive::ArchiveClient;
use crate::exchange::egress::ProxyPool;
use crate::exchange::governor::Governors;
use crate::exchange::rest::RestClient;
use crate::exchange::ws::{LiveEvent, MarketStreams};
use crate::market::{Market, PairKey};
use crate::server::hub::Hub;
use crate::server::ops::OpsState;
use crate::status::{phase, StatusHub};
use crate::store::migrate;
use crate::store::state::ProxyRow;
use crate::store::writer::{Writer, WriterError, WriterHandle, WriterSummary};
use crate::store::Store;
use crate::tasks::backfill::Backfill;
use crate::tasks::live::Live;
use crate::tasks::maintenance::{Maintenance, MAINTENANCE};
use crate::tasks::pair::PairTask;
use crate::tasks::scan_schedule::{ScanScheduler, Ticks};
use crate::tasks::{TaskKey, TaskSpec};

/// Why the reconcile loop returned.
enum Exit {
    Shutdown,
    Rebuild(Arc<Config>),
    /// A task the daemon cannot run without failed: stop and exit non-zero, so the service
    /// manager starts a fresh process.
    Fatal(String),
}

/// Runs the operator until `shutdown`: migrate, reconcile, follow config edits (reporting
/// whether each was applied or refused on `reloads`). The daemon's own services (the ops
/// endpoint) run beside the generations from the start to the very end.
pub async fn run(
    mut cfg_rx: watch::Receiver<Arc<Config>>,
    reloads: Reloads,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metrics::mark_start();
    let status = StatusHub::default();
    let cfg = cfg_rx.borrow_and_update().clone();
    let notifier = crate::systemd::Notifier::from_env();
    let mut services = Services::start(&cfg, status.clone(), policy(&cfg), notifier);
    let result = run_generations(cfg, cfg_rx, reloads, status, &mut services, shutdown).await;
    services.stopping();
    services.stop().await;
    result
}

async fn run_generations(
    mut cfg: Arc<Config>,
    mut cfg_rx: watch::Receiver<Arc<Config>>,
    reloads: Reloads,
    status: StatusHub,
    services: &mut Services,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ops = services.ops().clone();
    let hub = services.hub().clone();
    let notifier = services.notifier().clone();
    let Some(mut gen) = Generation::start(
        cfg.clone(),
        status.clone(),
        &ops,
        &hub,
        &notifier,
        &shutdown,
    )
    .await?
    else {
        info!("Shutdown requested before ClickHouse became ready.");
        return Ok(());
    };
    // "Ready" is logged when a generation starts serving, not when a refused edit returns to
    // the same one.
    let mut announce = true;
    loop {
        let new = match gen
            .reconcile_loop(&mut cfg_rx, &reloads, announce, services, &shutdown)
            .await
        {
            Exit::Shutdown => {
                services.stopping();
                log_flushed(gen.stop().await);
                return Ok(());
            }
            Exit::Fatal(reason) => {
                error!(%reason, "Shutting down after a fatal task failure (exit code 1; systemd restarts the service).");
                services.stopping();
                log_flushed(gen.stop().await);
                anyhow::bail!("fatal task failure: {reason}");
            }
            Exit::Rebuild(new) => new,
        };
        announce = false;
        // The running config (in-place edits may have changed it since the start).
        cfg = gen.cfg.clone();
        // The new settings must work before the running generation is given up: a wrong
        // password or an unreachable host in an edit changes nothing (the last good config
        // keeps running, and the error says why). Each step of a rebuild is bounded; the
        // watchdog hears from us between them.
        notifier.watchdog();
        if let Err(e) = preflight(&new, &shutdown).await {
            if !shutdown.is_cancelled() {
                error!(error = %format!("{e:#}"), "The edited config does not work; keeping the running config.");
                reloads.rejected(
                    &format!("the edited config does not work: {e:#}"),
                    &[&new, &cfg],
                );
            }
            continue;
        }
        let changed = cfg.changed_sections(&new).join(", ");
        info!(%changed, "Rebuilding clients and tasks for the new config.");
        notifier.status("reloading: rebuilding clients and tasks for the new config");
        notifier.watchdog();
        log_flushed(gen.stop().await);
        notifier.watchdog();
        announce = true;
        gen = match Generation::start(
            new.clone(),
            status.clone(),
            &ops,
            &hub,
            &notifier,
            &shutdown,
        )
        .await
        {
            Ok(Some(g)) => {
                apply_logging(&cfg.logging, &new.logging);
                info!(%changed, "New config applied.");
                services.apply(&new, policy(&new)).await;
                reloads.applied(&cfg, &new);
                g
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                error!(error = %format!("{e:#}"), "Cannot start with the edited config; going back to the last good one.");
                reloads.rejected(
                    &format!("cannot start with the edited config: {e:#}"),
                    &[&new, &cfg],
                );
                match Generation::start(
                    cfg.clone(),
                    status.clone(),
                    &ops,
                    &hub,
                    &notifier,
                    &shutdown,
                )
                .await?
                {
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
    let migrated = tokio::time::timeout(
        PREFLIGHT_TIMEOUT,
        migrate::migrate_when_ready(&store, &cancel),
    )
    .await;
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

/// Applies an edit of `app.logging` to the running logger: the level, `max_size` and
/// `keep_days` at once; `dir` only at the next start, which the warning says.
fn apply_logging(old: &crate::config::LoggingConfig, new: &crate::config::LoggingConfig) {
    if new.level != old.level {
        match crate::logging::set_level(&new.level) {
            Ok(()) => info!(level = %new.level, "Log level changed."),
            Err(e) => warn!(error = %e, "Cannot change the log level."),
        }
    }
    if (new.max_size, new.keep_days) != (old.max_size, old.keep_days)
        && crate::logging::set_file_limits(new.max_size, new.keep_days)
    {
        info!(max_size = %crate::config::format_size(new.max_size), keep_days = new.keep_days,
            "Log file limits changed.");
    }
    if new.dir != old.dir {
        let shown = |d: &Option<std::path::PathBuf>| {
            d.as_ref()
                .map_or_else(|| "none".to_string(), |d| d.display().to_string())
        };
        warn!(running = %shown(&old.dir), configured = %shown(&new.dir),
            "app.logging.dir takes effect at the next start; until then the log files stay where they are.");
    }
}

/// Whether `old` and `new` differ only in how streams connect (`app.streams`, the markets'
/// `ws_url`, `app.proxy.websocket`) among the settings that need new clients: then only the
/// stream connections are rebuilt.
fn only_streams_differ(old: &Config, new: &Config) -> bool {
    let mut probe = old.clone();
    probe.streams = new.streams.clone();
    probe.proxy.websocket = new.proxy.websocket;
    probe.binance.spot.ws_url = new.binance.spot.ws_url.clone();
    probe.binance.um.ws_url = new.binance.um.ws_url.clone();
    probe.binance.cm.ws_url = new.binance.cm.ws_url.clone();
    !needs_rebuild(&probe, new)
}

/// One `MarketStreams` per market, sending to `ev_tx`, stopped with `cancel`.
fn build_streams(
    cfg: &Config,
    ev_tx: &mpsc::Sender<LiveEvent>,
    pool: &Arc<ProxyPool>,
    hub: &Hub,
    cancel: &CancellationToken,
) -> BTreeMap<Market, MarketStreams> {
    let partials: crate::exchange::ws::PartialHook = {
        let hub = hub.clone();
        Arc::new(move |k| hub.publish_kline(k))
    };
    Market::ALL
        .into_iter()
        .map(|m| {
            let s = MarketStreams::new(
                m,
                &cfg.binance.market(m).ws_url,
                cfg.streams.clone(),
                ev_tx.clone(),
                cancel.child_token(),
            )
            .with_pool(cfg.proxy.websocket.then(|| pool.clone()))
            .with_partials(Some(partials.clone()));
            (m, s)
        })
        .collect()
}

/// The live sink as a service: each run works from a copy of `live`.
fn live_sink(live: Live) -> ServiceFactory {
    Arc::new(move |c| Box::pin(live.clone().run(c)))
}

fn policy(cfg: &Config) -> Policy {
    Policy {
        stop_timeout: cfg.operator.stop_timeout,
        restart_backoff: cfg.operator.restart_backoff,
        max_restart_backoff: cfg.operator.max_restart_backoff,
        healthy_after: cfg.operator.healthy_after,
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
    /// Watched by the reconcile loop: its unexpected end is fatal (its queue is gone).
    /// (`None` once it has ended.)
    writer_task: Option<WriterTask>,
    streams: BTreeMap<Market, MarketStreams>,
    streamed: watch::Sender<BTreeSet<PairKey>>,
    /// Owns the pair tasks and the services (live sink, status flusher, proxy health).
    supervisor: Supervisor,
    fatal: Fatal,
    scheduler: Option<ScanScheduler>,
    status: StatusHub,
    /// The `proxy_config` rows the pool works from (`None` until first read).
    proxies: Option<Vec<ProxyRow>>,
    /// Last reported problem per bad `trading_pairs` row (logged once per change).
    reported: BTreeMap<(String, String, String), String>,
    grace: Arc<std::sync::atomic::AtomicU64>,
    pool: Arc<ProxyPool>,
    proxy_problems: Vec<String>,
    /// Where stream connections send their events (kept so that new streams can be built
    /// without touching the rest of the generation).
    ev_tx: mpsc::Sender<LiveEvent>,
    /// What the live sink runs with (a changed `late_grace` restarts it with a new one).
    live: Live,
    /// `app.maintenance` as the scheduled optimize follows it (edits apply in place).
    maintenance: watch::Sender<crate::config::MaintenanceConfig>,
    /// Told of completed reconcile passes and of this generation's ClickHouse (readiness).
    ops: OpsState,
    /// The client server's hub (fed by the streams, the live sink, the indicator tasks and
    /// the writer's commits).
    hub: Hub,
    /// The service manager: `READY=1` after the first pass, the pair counts, watchdog pings.
    notifier: crate::systemd::Notifier,
    /// This generation's families on `/metrics` (writer queue, weight windows, proxies);
    /// unregistered with the generation.
    _metrics: crate::metrics::Registration,
}

impl Generation {
    /// Builds everything from `cfg`; `None` if shut down while waiting for ClickHouse.
    async fn start(
        cfg: Arc<Config>,
        status: StatusHub,
        ops: &OpsState,
        hub: &Hub,
        notifier: &crate::systemd::Notifier,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Generation>> {
        info!(environment = %cfg.environment, clickhouse = %cfg.clickhouse.url(),
            database = %cfg.clickhouse.database, "Starting the operator.");
        let store = Store::new(&cfg.clickhouse)?;
        let Some(report) = migrate::migrate_when_ready(&store, shutdown).await? else {
            return Ok(None);
        };
        let server = report
            .server_version
            .map_or_else(|| "unknown".to_string(), |v| v.to_string());
        info!(%server, applied = report.applied.len(), skipped = report.skipped.len(),
            "Schema up to date.");
        ops.set_store(store.clone());
        let cancel = CancellationToken::new();
        let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
        // The client server's hub forgets published candles once stored, and publishes the
        // stored ones that never went live (REST refills, backfill).
        let confirm = hub.clone();
        handle
            .commits()
            .set_hook(Arc::new(move |c| confirm.confirm(c)));
        let writer_cancel = CancellationToken::new();
        let writer_task = tokio::spawn(writer.run(writer_cancel.clone()));

        let mut governors = Governors::new(cfg.backfill.weight_budget_ratio);
        for m in Market::ALL {
            governors = governors.with_override(m, cfg.binance.market(m).weight_limit);
        }
        let pool = Arc::new(ProxyPool::new(&cfg, Arc::new(governors))?);
        // Proxies are known before the first request: a region that refuses direct
        // connections must not see one.
        let (proxies, proxy_problems) = match store.proxy_config().await {
            Ok(rows) => {
                let problems = super::proxies::apply(&pool, &rows);
                for p in &problems {
                    warn!(problem = %p, "Skipping a proxy_config row.");
                }
                (Some(rows), problems)
            }
            Err(e) => {
                warn!(error = %e, "Cannot read proxy_config yet; starting with direct connections only.");
                (None, Vec::new())
            }
        };
        let rest = Arc::new(RestClient::with_pool(&cfg, pool.clone())?);
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
        let streams = build_streams(&cfg, &ev_tx, &pool, hub, &cancel);
        let (streamed, streamed_rx) = watch::channel(BTreeSet::new());
        let live = Live {
            events: Arc::new(tokio::sync::Mutex::new(ev_rx)),
            streamed: streamed_rx,
            writer: handle.clone(),
            backfill: backfill.clone(),
            rest: rest.clone(),
            status: status.clone(),
            late_grace: cfg.streams.late_grace,
            hub: Some(hub.clone()),
            resumed: Arc::default(),
        };

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
        let ind_writer = handle.clone();
        let ind_hub = hub.clone();
        let factory: Factory = Arc::new(move |key: TaskKey, spec: TaskSpec, cancel| {
            let d = deps.clone();
            let writer = ind_writer.clone();
            let hub = ind_hub.clone();
            Box::pin(async move {
                match (key, spec) {
                    (TaskKey::Pair(pair), TaskSpec::Pair(spec)) => {
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
                    }
                    (TaskKey::Indicator(pair, spec), TaskSpec::Indicator) => {
                        crate::tasks::indicators::IndicatorTask::new(pair, spec, d.store, writer)
                            .with_hub(Some(hub))
                            .run(cancel)
                            .await
                    }
                    (key, spec) => Err(crate::tasks::TaskError::Permanent(format!(
                        "{key} cannot run with {spec:?}"
                    ))),
                }
            })
        });
        let fatal = Fatal::default();
        // Its own root: `stop()` stops its children in order (the flusher last), which the
        // generation's token, cancelled half way, must not cut short.
        let mut supervisor = Supervisor::new(
            factory,
            policy(&cfg),
            status.clone(),
            CancellationToken::new(),
            fatal.clone(),
        );
        supervisor.start_service(LIVE_SINK, OnFailure::Restart, live_sink(live.clone()));
        let (s, st, p) = (store.clone(), status.clone(), pool.clone());
        let flusher: ServiceFactory = Arc::new(move |c| {
            let (s, st, p) = (s.clone(), st.clone(), p.clone());
            Box::pin(async move {
                crate::status::flush(s, st, move |now| super::proxies::status_rows(&p, now), c)
                    .await;
                Ok(())
            })
        });
        supervisor.start_service(STATUS_FLUSHER, OnFailure::Restart, flusher);
        let (p, url) = (
            pool.clone(),
            format!("{}/time", cfg.binance.spot.rest_base()),
        );
        let health: ServiceFactory = Arc::new(move |c| {
            let (p, url) = (p.clone(), url.clone());
            Box::pin(async move {
                p.run_health(url, c, super::proxies::log_health).await;
                Ok(())
            })
        });
        supervisor.start_service(PROXY_HEALTH, OnFailure::Restart, health);
        let (maintenance, maintenance_rx) = watch::channel(cfg.maintenance.clone());
        let scheduled = Maintenance {
            store: store.clone(),
            cfg: maintenance_rx,
            status: status.clone(),
            clock: Arc::new(crate::market::now_ms),
        };
        supervisor.start_service(
            MAINTENANCE,
            OnFailure::Restart,
            Arc::new(move |c| Box::pin(scheduled.clone().run(c))),
        );
        crate::metrics::add(&crate::metrics::GENERATIONS, 1);
        let metrics = super::observe::generation_collector(handle.gauge(), Arc::downgrade(&pool));
        Ok(Some(Generation {
            cfg,
            store,
            cancel,
            writer: handle,
            writer_cancel,
            writer_task: Some(writer_task),
            streams,
            streamed,
            supervisor,
            fatal,
            scheduler: Some(scheduler),
            status,
            proxies,
            reported: BTreeMap::new(),
            grace,
            pool,
            proxy_problems,
            ev_tx,
            live,
            maintenance,
            ops: ops.clone(),
            hub: hub.clone(),
            notifier: notifier.clone(),
            _metrics: metrics,
        }))
    }

    /// Reconciles until shutdown or an edit that needs a new generation; edits applied in
    /// place are reported on `reloads`. `announce`: log "Ready" (a new generation).
    async fn reconcile_loop(
        &mut self,
        cfg_rx: &mut watch::Receiver<Arc<Config>>,
        reloads: &Reloads,
        announce: bool,
        services: &mut Services,
        shutdown: &CancellationToken,
    ) -> Exit {
        let services_fatal = services.fatal().clone();
        // WATCHDOG=1 from this loop itself, at least twice per interval: a loop stuck in a
        // pass stops pinging and the service manager restarts the process.
        let mut watchdog = self
            .notifier
            .watchdog_interval()
            .map(|every| crate::ticker(every / 2));
        let mut poll = crate::ticker(self.cfg.operator.poll_interval);
        let mut metrics = crate::ticker(self.cfg.operator.metrics_interval);
        metrics.tick().await;
        if announce {
            info!(poll = ?self.cfg.operator.poll_interval,
                "Ready; reconciling trading_pairs and app.yaml (stop with SIGTERM or Ctrl-C).");
        }
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Exit::Shutdown,
                reason = self.fatal.raised() => return Exit::Fatal(reason),
                reason = services_fatal.raised() => return Exit::Fatal(reason),
                done = writer_ended(&mut self.writer_task) => {
                    self.writer_task = None;
                    let why = match done {
                        Ok(Ok(_)) => "it ended without being asked to".to_string(),
                        Ok(Err(e)) => crate::error_chain(&e),
                        Err(e) => format!("it panicked: {e}"),
                    };
                    self.status.update_task("writer", |r| {
                        r.state = crate::status::task_state::FAILED.into();
                        r.last_error = why.clone();
                    });
                    return Exit::Fatal(format!("the ClickHouse writer stopped: {why}"));
                }
                changed = cfg_rx.changed() => {
                    if changed.is_err() {
                        if shutdown.is_cancelled() {
                            return Exit::Shutdown;
                        }
                        // The watcher is gone: edits would silently stop applying. Loud.
                        self.status.update_task("config_watcher", |r| {
                            r.state = crate::status::task_state::FAILED.into();
                            r.last_error = "the app.yaml watcher stopped".into();
                        });
                        return Exit::Fatal("the app.yaml watcher stopped".into());
                    }
                    let new = cfg_rx.borrow_and_update().clone();
                    crate::logging::set_secrets(new.secrets());
                    if needs_rebuild(&self.cfg, &new) {
                        if !only_streams_differ(&self.cfg, &new) {
                            return Exit::Rebuild(new);
                        }
                        // Only what the edit touches is rebuilt: new sockets, and the pair
                        // tasks, writer and clients carry on.
                        self.rebuild_streams(&new).await;
                    }
                    if let Err(e) = self.apply_in_place(&new).await {
                        error!(error = %format!("{e:#}"), "Cannot apply the new config in place; rebuilding.");
                        return Exit::Rebuild(new);
                    }
                    services.apply(&new, policy(&new)).await;
                    if new.operator.poll_interval != self.cfg.operator.poll_interval {
                        poll = crate::ticker(new.operator.poll_interval);
                    }
                    if new.operator.metrics_interval != self.cfg.operator.metrics_interval {
                        metrics = crate::ticker(new.operator.metrics_interval);
                        metrics.tick().await;
                    }
                    let changed = self.cfg.changed_sections(&new);
                    if changed.is_empty() {
                        info!("The edited file means the running config; nothing to apply.");
                    } else {
                        info!(changed = %changed.join(", "), "New config applied.");
                    }
                    reloads.applied(&self.cfg, &new);
                    self.cfg = new;
                    self.reconcile().await;
                }
                _ = poll.tick() => {
                    self.reap_connections().await;
                    self.reconcile().await;
                }
                _ = tick_if_some(&mut watchdog) => self.notifier.watchdog(),
                _ = metrics.tick() => {
                    let streams: usize = self.streams.values().map(|s| s.connections().iter().map(|c| c.1).sum::<usize>()).sum();
                    info!("{}", crate::metrics::line(streams));
                }
            }
        }
    }

    /// Stream connection tasks are owned by their market's `MarketStreams`; a dead one (panic,
    /// unexpected end) is replaced there and reported here: logged, counted and shown in
    /// `task_status` as `streams_<market>`.
    async fn reap_connections(&mut self) {
        for (market, s) in self.streams.iter_mut() {
            for (conn, why) in s.reap().await {
                crate::metrics::add(&crate::metrics::TASK_FAILURES, 1);
                warn!(%market, conn, error = %why, "A stream connection died; its streams reopen on a new one.");
                let name = format!("streams_{market}");
                self.status.update_task(&name, |r| {
                    r.state = crate::status::task_state::RUNNING.into();
                    r.restarts += 1;
                    r.last_error = why.clone();
                });
            }
        }
    }

    /// Replaces the stream connections (and the live sink, if its `late_grace` changed) for
    /// new stream settings, WebSocket URLs or `proxy.websocket`; they subscribe the streamed
    /// pairs at once, and the live sink heals what the switch made them miss.
    async fn rebuild_streams(&mut self, new: &Config) {
        info!(
            "Reconnecting the streams for the new stream settings; everything else keeps running."
        );
        for (_, s) in std::mem::take(&mut self.streams) {
            s.shutdown(Duration::from_secs(1)).await;
        }
        self.streams = build_streams(new, &self.ev_tx, &self.pool, &self.hub, &self.cancel);
        let wanted = self.streamed.borrow().clone();
        for s in self.streams.values_mut() {
            s.apply(&wanted);
        }
        if new.streams.late_grace != self.live.late_grace {
            self.supervisor.stop_services(&[LIVE_SINK]).await;
            self.live.late_grace = new.streams.late_grace;
            self.supervisor.start_service(
                LIVE_SINK,
                OnFailure::Restart,
                live_sink(self.live.clone()),
            );
        }
    }

    /// Applies the settings that need no new clients.
    async fn apply_in_place(&mut self, new: &Config) -> anyhow::Result<()> {
        apply_logging(&self.cfg.logging, &new.logging);
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
        if new.maintenance != self.cfg.maintenance {
            self.maintenance.send_replace(new.maintenance.clone());
            info!(optimize = %new.maintenance.optimize, with_final = new.maintenance.use_final,
                "Maintenance schedule changed.");
        }
        Ok(())
    }

    /// One level-triggered pass: read desired state, plan, converge. If the desired state
    /// cannot be read, nothing changes (an unreadable `proxy_config` leaves the pool alone).
    async fn reconcile(&mut self) {
        let rows = match self.store.trading_pairs().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "Cannot read trading_pairs; changing nothing until it can be read.");
                return;
            }
        };
        let proxies = match self.store.proxy_config().await {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "Cannot read proxy_config; keeping the current pool.");
                None
            }
        };
        let defaults: Vec<qs_core::indicators::Spec> = self
            .cfg
            .indicators
            .default
            .iter()
            .filter_map(|s| qs_core::indicators::Spec::parse(s).ok())
            .collect();
        let d = desired(&rows, &defaults);
        self.report(&d);
        let running = State {
            tasks: self.supervisor.running(),
            streams: self.streamed.borrow().clone(),
            proxies: self.proxies.clone(),
        };
        let mut want = d.state(proxies);
        // A parked pair (Binance does not know it) keeps no stream: no subscription, and no
        // REST catch-up spending weight on it, until its row changes.
        let parked = self.supervisor.parked();
        want.streams
            .retain(|p| !parked.contains(&TaskKey::Pair(p.clone())));
        let p = plan(&want, &running);
        if !p.add.is_empty() || !p.change.is_empty() || !p.remove.is_empty() || p.streams_changed()
        {
            info!(
                add = p.add.len(),
                change = p.change.len(),
                remove = p.remove.len(),
                subscribe = p.subscribe.len(),
                unsubscribe = p.unsubscribe.len(),
                "Reconciling."
            );
        }
        if let Some(rows) = p.proxies {
            let problems = super::proxies::apply(&self.pool, &rows);
            if problems != self.proxy_problems {
                for p in &problems {
                    warn!(problem = %p, "Skipping a proxy_config row.");
                }
                self.proxy_problems = problems;
            }
            self.proxies = Some(rows);
        }
        let mut stop: Vec<TaskKey> = p.remove.clone();
        stop.extend(p.change.iter().map(|(k, _)| k.clone()));
        self.supervisor.stop(&stop).await;
        for k in &p.remove {
            if let Some(pair) = k.pair() {
                self.status.update(pair, |r| {
                    r.phase = phase::DISABLED.into();
                    r.last_error.clear();
                });
            }
        }
        for (k, spec) in p.add.into_iter().chain(p.change) {
            self.supervisor.start(k, spec);
        }
        if !p.subscribe.is_empty() || !p.unsubscribe.is_empty() {
            for s in self.streams.values_mut() {
                s.apply(&want.streams);
            }
            self.streamed.send_replace(want.streams);
        }
        for (market, s) in &self.streams {
            let conns = s.connections();
            let streams: usize = conns.iter().map(|c| c.1).sum();
            crate::metrics::STREAMS.set(&[market.as_str()], streams as f64);
            crate::metrics::STREAM_CONNECTIONS.set(&[market.as_str()], conns.len() as f64);
        }
        crate::metrics::add(&crate::metrics::RECONCILE_PASSES, 1);
        self.ops.reconciled();
        self.notifier
            .status(&super::observe::status_line(&self.status.pairs()));
        // After the migrations (the generation started) and a completed pass; sent once.
        self.notifier.ready();
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
        // Bad indicator specs: the pair and its good indicators run; the pair's last_error
        // says what is wrong (set again each pass, as the pair task clears it on progress).
        let mut bad: BTreeMap<&PairKey, Vec<&str>> = BTreeMap::new();
        for (pair, e) in &d.bad_indicators {
            bad.entry(pair).or_default().push(e);
        }
        for (pair, errors) in bad {
            let msg = format!(
                "invalid indicator spec in trading_pairs.indicators: {}",
                errors.join("; ")
            );
            if self.status.get(pair).is_none_or(|r| r.last_error != msg) {
                error!(%pair, error = %msg, "Skipping an invalid indicator spec.");
                self.status.update(pair, |r| r.last_error = msg);
            }
        }
        for k in &d.disabled {
            self.status.update(k, |r| {
                r.phase = phase::DISABLED.into();
                r.last_error.clear();
            });
        }
    }

    /// Stops everything of this generation and flushes the writer.
    async fn stop(mut self) -> Result<WriterSummary, anyhow::Error> {
        let pairs: Vec<TaskKey> = self.supervisor.running().into_keys().collect();
        self.supervisor.stop(&pairs).await;
        self.supervisor
            .stop_services(&[PROXY_HEALTH, MAINTENANCE])
            .await;
        // Sockets get a second: nothing they hold is lost by an abort (a closed candle not yet
        // handed on is healed by REST at the next start). Then the live sink drains.
        for (_, s) in std::mem::take(&mut self.streams) {
            s.shutdown(Duration::from_secs(1)).await;
        }
        self.cancel.cancel();
        self.supervisor.stop_services(&[LIVE_SINK]).await;
        if let Some(s) = self.scheduler.take() {
            s.shutdown().await;
        }
        drop(self.writer);
        self.writer_cancel.cancel();
        let summary = match self.writer_task.take() {
            Some(task) => task
                .await
                .context("writer task panicked")
                .and_then(|r| r.context("writer did not flush")),
            None => Err(anyhow::anyhow!("the writer had already stopped")),
        };
        // The last status rows after everything stopped (the flusher writes once more).
        self.supervisor.stop_all().await;
        summary
    }
}

/// Completes at `ticker`'s next tick; never without one.
async fn tick_if_some(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

type WriterTask = JoinHandle<Result<WriterSummary, WriterError>>;

/// Completes when the writer task has ended (never, once it is known to have ended).
async fn writer_ended(
    task: &mut Option<WriterTask>,
) -> Result<Result<WriterSummary, WriterError>, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// Names of a generation's services in logs and `task_status`.
const LIVE_SINK: &str = "live_sink";
const STATUS_FLUSHER: &str = "status_flusher";
const PROXY_HEALTH: &str = "proxy_health";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_edit_rebuilds() {
        struct Case {
            name: &'static str,
            edit: fn(&mut Config),
            rebuild: bool,
            streams_only: bool,
        }
        let cases = [
            Case {
                name: "operator settings apply in place",
                edit: |c| c.operator.poll_interval = Duration::from_secs(9),
                rebuild: false,
                streams_only: true,
            },
            Case {
                name: "the ops endpoint applies in place",
                edit: |c| c.http.listen = "127.0.0.1:9".into(),
                rebuild: false,
                streams_only: true,
            },
            Case {
                name: "stream settings: the streams only",
                edit: |c| c.streams.idle_timeout = Duration::from_secs(9),
                rebuild: true,
                streams_only: true,
            },
            Case {
                name: "a WebSocket URL: the streams only",
                edit: |c| c.binance.um.ws_url = "ws://127.0.0.1:1/ws/".into(),
                rebuild: true,
                streams_only: true,
            },
            Case {
                name: "streams through the proxies: the streams only",
                edit: |c| c.proxy.websocket = !c.proxy.websocket,
                rebuild: true,
                streams_only: true,
            },
            Case {
                name: "a REST URL: everything",
                edit: |c| c.binance.spot.rest_url = "http://127.0.0.1:1/api/v3".into(),
                rebuild: true,
                streams_only: false,
            },
            Case {
                name: "ClickHouse: everything",
                edit: |c| c.clickhouse.port = c.clickhouse.port.wrapping_add(1),
                rebuild: true,
                streams_only: false,
            },
            Case {
                name: "streams and the writer: everything",
                edit: |c| {
                    c.streams.idle_timeout = Duration::from_secs(9);
                    c.writer.batch_rows = 7;
                },
                rebuild: true,
                streams_only: false,
            },
        ];
        let old =
            Config::from_yaml_with_env("app: {}\n", std::path::Path::new("app.yaml"), |_| None)
                .expect("the defaults");
        for c in cases {
            let mut new = old.clone();
            (c.edit)(&mut new);
            assert_eq!(needs_rebuild(&old, &new), c.rebuild, "{}", c.name);
            assert_eq!(
                only_streams_differ(&old, &new),
                c.streams_only,
                "{}",
                c.name
            );
        }
    }
}
