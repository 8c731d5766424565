//! The daemon's own services, which outlive the generations of clients: today the ops endpoint
//! (`app.http.listen`). They are started once beside the first generation, owned by a
//! supervisor of their own (a bind failure is logged, shown in `task_status` and retried with
//! backoff, never fatal), reconfigured in place by config edits (a changed listen address
//! rebinds the endpoint and nothing else; an empty one stops it), and stopped last, after the
//! generation, so health stays answerable during shutdown. What they show comes from the
//! running generation through [`OpsState`]. The service manager's notifier ([`Notifier`])
//! lives here too: it is told when the daemon starts waiting, is ready, and stops.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::supervisor::{Fatal, OnFailure, Policy, ServiceFactory, Supervisor};
use crate::config::{ClickHouseConfig, ClientServerConfig, Config, HttpConfig};
use crate::server::hub::Hub;
use crate::server::ops::{self, OpsState};
use crate::status::{task_state, StatusHub};
use crate::store::Store;
use crate::systemd::Notifier;
use crate::tasks::TaskError;

/// The name of the ops endpoint in logs and `task_status`.
pub const OPS_ENDPOINT: &str = "ops_endpoint";

/// The name of the embedded client server in logs and `task_status`.
pub const CLIENT_SERVER: &str = "client_server";

pub struct Services {
    supervisor: Supervisor,
    ops: OpsState,
    http: HttpConfig,
    /// The client server's settings and the ClickHouse it replays from.
    clients: (ClientServerConfig, ClickHouseConfig),
    /// What the generations publish to and the client server serves from.
    hub: Hub,
    status: StatusHub,
    fatal: Fatal,
    notifier: Notifier,
    /// The pairs' and tasks' families on `/metrics`, for the daemon's whole life.
    _metrics: crate::metrics::Registration,
}

impl Services {
    /// Starts the services `cfg` asks for. ClickHouse is probed with `cfg`'s settings until a
    /// generation publishes its own.
    pub fn start(cfg: &Config, status: StatusHub, policy: Policy, notifier: Notifier) -> Services {
        notifier.status("starting: waiting for ClickHouse and the migrations");
        let fatal = Fatal::default();
        let supervisor = Supervisor::services_only(
            policy,
            status.clone(),
            CancellationToken::new(),
            fatal.clone(),
        );
        let ops = OpsState::new(Store::new(&cfg.clickhouse).ok(), cfg.operator.poll_interval);
        let mut services = Services {
            supervisor,
            ops,
            http: cfg.http.clone(),
            clients: (cfg.clientserver.clone(), cfg.clickhouse.clone()),
            hub: Hub::default(),
            _metrics: super::observe::status_collector(status.clone()),
            status,
            fatal,
            notifier,
        };
        services.hub.set_active(false);
        services.start_ops();
        services.start_clients();
        services
    }

    /// The client server's hub (the generations publish to it).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// What the generations tell the ops endpoint (their store, completed passes, shutdown).
    pub fn ops(&self) -> &OpsState {
        &self.ops
    }

    /// The service manager's notifier (a no-op without `$NOTIFY_SOCKET`).
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Shutdown began: `/readyz` says so and the service manager hears `STOPPING=1`.
    pub fn stopping(&self) {
        self.ops.stopping();
        self.notifier.stopping();
    }

    /// Raised when a service the daemon cannot run without fails (none of today's).
    pub fn fatal(&self) -> &Fatal {
        &self.fatal
    }

    fn start_ops(&mut self) {
        let listen = self.http.listen.clone();
        if listen.is_empty() {
            info!("Ops endpoint disabled (app.http.listen is empty).");
            self.status.update_task(OPS_ENDPOINT, |r| {
                r.state = task_state::DISABLED.into();
                r.last_error.clear();
            });
            return;
        }
        let state = self.ops.clone();
        let serve: ServiceFactory = Arc::new(move |cancel| {
            let (listen, state) = (listen.clone(), state.clone());
            Box::pin(async move {
                ops::serve(&listen, state, cancel)
                    .await
                    .map_err(|e| TaskError::Retryable(crate::error_chain(&e)))
            })
        });
        self.supervisor
            .start_service(OPS_ENDPOINT, OnFailure::Restart, serve);
    }

    fn start_clients(&mut self) {
        let (cfg, ch) = self.clients.clone();
        if !cfg.enabled {
            self.status.update_task(CLIENT_SERVER, |r| {
                r.state = task_state::DISABLED.into();
                r.last_error.clear();
            });
            return;
        }
        let hub = self.hub.clone();
        let serve: ServiceFactory = Arc::new(move |cancel| {
            let (cfg, hub) = (cfg.clone(), hub.clone());
            let store = Store::new(&ch).ok();
            let facade = store
                .clone()
                .map_or_else(axum::Router::new, crate::server::facade::router);
            Box::pin(async move {
                crate::server::client::run(&cfg, hub, store, facade, cancel)
                    .await
                    .map_err(|e| TaskError::Retryable(crate::error_chain(&e)))
            })
        });
        self.supervisor
            .start_service(CLIENT_SERVER, OnFailure::Restart, serve);
    }

    /// Applies an edited config: the restart policy, the poll interval readiness is judged
    /// by, and a changed `app.http.listen` (the endpoint rebinds; nothing else restarts).
    pub async fn apply(&mut self, cfg: &Config, policy: Policy) {
        self.supervisor.set_policy(policy);
        self.ops.set_poll_interval(cfg.operator.poll_interval);
        if cfg.http != self.http {
            info!(from = %self.http.listen, to = %cfg.http.listen, "Ops endpoint moving.");
            self.supervisor.stop_services(&[OPS_ENDPOINT]).await;
            self.http = cfg.http.clone();
            self.start_ops();
        }
        let clients = (cfg.clientserver.clone(), cfg.clickhouse.clone());
        if clients != self.clients {
            info!(enabled = clients.0.enabled, listen = %clients.0.listen(),
                "Client server reconfigured; restarting it (clients get 1001 and reconnect).");
            self.supervisor.stop_services(&[CLIENT_SERVER]).await;
            self.clients = clients;
            self.start_clients();
        }
    }

    /// Stops every service (the last thing the daemon does).
    pub async fn stop(mut self) {
        self.supervisor.stop_all().await;
    }
}
