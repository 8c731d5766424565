//! The client WebSocket endpoint (`/ws`): one session per connection, speaking [`protocol`]
//! and fed by the [`Hub`]. A session answers every frame (a bad one gets an error frame and the
//! connection stays open), queues live frames in one bounded queue per connection, pings the
//! client and drops it when it stops answering, and closes with 1008 `slow consumer` when the
//! hub cut it off (its queue was full) or 1001 when the server shuts down. A send never waits
//! past those: a client that stops reading delays only itself.
//!
//! The handshake checks the bearer token (`Authorization: Bearer T` or `?token=T`, when tokens
//! are configured: 401 otherwise) and the connection limits, in total and per IP (429).
//!
//! A subscription with `since` first replays the stored rows (see [`replay`](super::replay));
//! one for a pair with nothing stored and nothing declared is refused (`unknown_pair`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::mpsc;

use futures_util::SinkExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use super::hub::{Frame, Hub, SubId, Target};
use super::protocol::{self, Channel, ErrorCode, Op, Subscribe};
use super::replay::{Replay, ReplayError};
use crate::config::ClientServerConfig;
use crate::lock;
use crate::store::Store;

/// Frames written to the socket before one flush (a replay's frames go out in large writes).
const FLUSH_EVERY: usize = 256;

/// How long a closing session waits for its close frame to go out (a slow consumer's socket
/// is full; it gets the frame if it reads again within this time).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections, in total and from one IP address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub send_queue: usize,
    pub max_subscriptions: usize,
    /// Client frames per second; more are answered with a `limit` error and not acted on.
    pub max_messages_per_second: u32,
    /// Largest client frame accepted.
    pub max_frame_bytes: usize,
    pub ping_interval: Duration,
    /// A client silent (no frame, no pong) this long is dropped.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_connections_per_ip: 1_000,
            send_queue: 1024,
            max_subscriptions: 200,
            max_messages_per_second: 50,
            max_frame_bytes: 64 * 1024,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What every session shares.
#[derive(Debug, Clone)]
pub struct ClientState {
    pub hub: Hub,
    /// Where replays read and pairs are looked up; `None` = live only (no `since`, every
    /// pair accepted).
    pub store: Option<Store>,
    pub limits: Limits,
    /// Accepted bearer tokens; empty = open.
    pub tokens: Arc<Vec<String>>,
    /// Cancelled when the server stops: sessions send 1001 and end.
    pub shutdown: CancellationToken,
    pub connections: Connections,
}

impl ClientState {
    pub fn new(
        hub: Hub,
        store: Option<Store>,
        limits: Limits,
        tokens: Vec<String>,
        shutdown: CancellationToken,
    ) -> Self {
        ClientState {
            hub,
            store,
            limits,
            tokens: Arc::new(tokens),
            shutdown,
            connections: Connections::default(),
        }
    }
}

/// Open connections per peer address.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Told when the last connection closed.
    closed: Arc<tokio::sync::Notify>,
}

impl Connections {
    /// Open connections in total.
    pub fn total(&self) -> usize {
        lock(&self.open).values().sum()
    }

    /// Waits until no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let closed = self.closed.notified();
            if self.total() == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Counts a new connection from `ip` unless a limit is reached.
    fn admit(&self, ip: IpAddr, limits: &Limits) -> Result<Admitted, String> {
        let mut open = lock(&self.open);
        let total: usize = open.values().sum();
        if total >= limits.max_connections {
            return Err(format!(
                "the server holds its limit of {} connections",
                limits.max_connections
            ));
        }
        let n = open.entry(ip).or_default();
        if *n >= limits.max_connections_per_ip {
            return Err(format!(
                "at most {} connections per IP address",
                limits.max_connections_per_ip
            ));
        }
        *n += 1;
        crate::metrics::clients::CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted {
            connections: self.clone(),
            ip,
        })
    }
}

/// One admitted connection; uncounted when dropped.
struct Admitted {
    connections: Connections,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        crate::metrics::clients::CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
        let mut open = lock(&self.connections.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
        if open.is_empty() {
            self.connections.closed.notify_waiters();
        }
    }
}

impl Limits {
    /// The limits `app.clientserver` sets.
    pub fn from_config(cfg: &ClientServerConfig) -> Limits {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Limits {
            max_connections: n(cfg.max_connections),
            max_connections_per_ip: n(cfg.max_connections_per_ip),
            send_queue: n(cfg.send_queue),
            max_subscriptions: n(cfg.max_subscriptions),
            max_messages_per_second: u32::try_from(cfg.max_messages_per_second).unwrap_or(u32::MAX),
            max_frame_bytes: n(cfg.max_frame_bytes),
            ping_interval: cfg.ping_interval,
            idle_timeout: cfg.idle_timeout,
        }
    }
}

/// How long a stopping server waits for its clients to get their close frames (1001).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Why the client server cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("serving on {addr} failed: {source}")]
    Serve {
        addr: String,
        source: std::io::Error,
    },
}

/// Runs the client server `cfg` describes until `cancel`: `/ws` fed by `hub` (replays and
/// pair lookups in `store`), plus `extra` routes (the REST facade) on the same port. On
/// `cancel` every client gets a 1001 close frame before this returns (within a few seconds).
pub async fn run(
    cfg: &ClientServerConfig,
    hub: Hub,
    store: Option<Store>,
    extra: Router,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let addr = cfg.listen();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_or_else(|_| addr.clone(), |a| a.to_string());
    let tokens: Vec<String> = cfg.tokens.iter().map(|t| t.expose().to_string()).collect();
    if tokens.is_empty() && !cfg.is_loopback() {
        tracing::warn!(listen = %bound,
            "The client server is open to anyone who can reach this address: set app.clientserver.tokens (or QS_CLIENTSERVER_TOKENS).");
    }
    let state = ClientState::new(
        hub.clone(),
        store,
        Limits::from_config(cfg),
        tokens,
        cancel.clone(),
    );
    let connections = state.connections.clone();
    let app = router(state).merge(extra);
    hub.set_active(true);
    crate::metrics::clients::RUNNING.store(true, Ordering::Relaxed);
    tracing::info!(listen = %bound, "Client server listening (WebSocket /ws, REST facade).");
    let served = serve(listener, app, cancel.clone()).await;
    // The sessions saw `cancel` too: they send 1001 and end.
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, connections.all_closed()).await;
    hub.set_active(false);
    tracing::info!(listen = %bound, "Client server stopped.");
    served.map_err(|source| ServeError::Serve {
        addr: bound,
        source,
    })
}

/// `/ws`. Serve it with [`serve`] (the connection limits need the peer's address).
pub fn router(state: ClientState) -> Router {
    Router::new().route("/ws", get(upgrade)).with_state(state)
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// The token a request presents: `Authorization: Bearer T`, else `?token=T`.
fn presented<'a>(headers: &'a HeaderMap, query: &'a HashMap<String, String>) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .or_else(|| query.get("token").map(String::as_str))
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<ClientState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !state.tokens.is_empty() {
        let ok = presented(&headers, &query)
            .is_some_and(|t| state.tokens.iter().any(|known| same(known, t)));
        if !ok {
            debug!(%peer, "Client refused: no valid token.");
            return (
                StatusCode::UNAUTHORIZED,
                "a valid token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)\n",
            )
                .into_response();
        }
    }
    let admitted = match state.connections.admit(peer.ip(), &state.limits) {
        Ok(a) => a,
        Err(why) => {
            debug!(%peer, why, "Client refused: connection limit.");
            return (StatusCode::TOO_MANY_REQUESTS, format!("{why}\n")).into_response();
        }
    };
    debug!(%peer, "Client connected.");
    // Small buffers: thousands of connections, small frames.
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_message_size(state.limits.max_frame_bytes)
        .max_frame_size(state.limits.max_frame_bytes)
        .on_upgrade(move |socket| async move {
            session(socket, state).await;
            debug!(%peer, "Client disconnected.");
            drop(admitted);
        })
}

/// How a session ended.
enum End {
    Shutdown,
    Slow,
    Gone,
}

/// One subscription of a session.
struct Sub {
    id: SubId,
    /// The subscribe request's id (for a replay's error frame).
    request: Option<u64>,
    /// The replay still running, if any (aborted when dropped: on unsubscribe or at the end
    /// of the session).
    replay: Option<AbortOnDropHandle<()>>,
}

/// A replay that finished: the channel, its subscription and how it ended.
type ReplayDone = (Channel, SubId, Result<u64, ReplayError>);

/// Counts client frames per one-second window.
struct RateLimit {
    window: Instant,
    count: u32,
}

impl RateLimit {
    fn allow(&mut self, max: u32) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count <= max
    }
}

/// Moves the subscriptions gauge.
fn subscriptions(delta: i64) {
    let g = &crate::metrics::clients::SUBSCRIPTIONS;
    if delta >= 0 {
        g.fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
    } else {
        g.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

/// What one session owns.
struct Session {
    state: ClientState,
    /// Live and replayed frames for this connection.
    target: Target,
    subs: BTreeMap<Channel, Sub>,
    done: mpsc::UnboundedSender<ReplayDone>,
}

async fn session(mut socket: WebSocket, state: ClientState) {
    let (queue, mut frames) = mpsc::channel::<Frame>(state.limits.send_queue.max(1));
    let slow = CancellationToken::new();
    let (done, mut replays) = mpsc::unbounded_channel::<ReplayDone>();
    let mut me = Session {
        target: Target {
            queue,
            slow: slow.clone(),
        },
        state: state.clone(),
        subs: BTreeMap::new(),
        done,
    };
    let mut ping = tokio::time::interval(state.limits.ping_interval);
    ping.tick().await;
    let mut heard = Instant::now();
    let mut rate = RateLimit {
        window: Instant::now(),
        count: 0,
    };
    let end = loop {
        let step = tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => Err(End::Shutdown),
            _ = slow.cancelled() => Err(End::Slow),
            msg = socket.recv() => {
                heard = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        let reply = if rate.allow(state.limits.max_messages_per_second) {
                            me.handle(text.as_str()).await
                        } else {
                            protocol::error(None, ErrorCode::Limit, &format!(
                                "at most {} messages per second; this one was ignored",
                                state.limits.max_messages_per_second
                            ))
                        };
                        send(&mut socket, reply, &state.shutdown, &slow).await
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let reply = protocol::error(None, ErrorCode::BadRequest,
                            "frames are JSON text, not binary");
                        send(&mut socket, reply, &state.shutdown, &slow).await
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Err(End::Gone),
                    Some(Ok(_)) => Ok(()), // ping (answered by the library) or pong
                }
            }
            Some(frame) = frames.recv() => {
                send_queued(&mut socket, frame, &mut frames, &state.shutdown, &slow).await
            }
            Some((channel, id, result)) = replays.recv() => {
                match me.replay_done(channel, id, result) {
                    Some(reply) => send(&mut socket, reply, &state.shutdown, &slow).await,
                    None => Ok(()),
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > state.limits.idle_timeout {
                    Err(End::Gone)
                } else {
                    match socket.send(Message::Ping(Default::default())).await {
                        Ok(()) => Ok(()),
                        Err(_) => Err(End::Gone),
                    }
                }
            }
        };
        if let Err(end) = step {
            break end;
        }
    };
    for (channel, sub) in std::mem::take(&mut me.subs) {
        state.hub.unsubscribe(&channel, sub.id);
        subscriptions(-1);
    }
    if matches!(end, End::Slow) {
        crate::metrics::clients::SLOW.fetch_add(1, Ordering::Relaxed);
    }
    let (code, reason) = match end {
        End::Shutdown => (1001, "server shutting down"),
        End::Slow => (1008, "slow consumer"),
        End::Gone => return,
    };
    debug!(code, reason, "Closing a client connection.");
    let close = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    // A client that stopped reading gets it once it reads again (within CLOSE_TIMEOUT).
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(close)).await;
}

/// Sends one text frame unless the session must end first (a send to a client that stopped
/// reading would otherwise wait for ever).
async fn send(
    socket: &mut WebSocket,
    text: String,
    shutdown: &CancellationToken,
    slow: &CancellationToken,
) -> Result<(), End> {
    let len = text.len();
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(End::Shutdown),
        _ = slow.cancelled() => Err(End::Slow),
        sent = socket.send(Message::Text(text.into())) => {
            count_sent(1, len);
            sent.map_err(|_| End::Gone)
        }
    }
}

fn count_sent(frames: u64, bytes: usize) {
    use crate::metrics::clients::{BYTES, MESSAGES};
    MESSAGES.fetch_add(frames, Ordering::Relaxed);
    BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Writes `first` and whatever else is queued already (up to [`FLUSH_EVERY`]), then flushes
/// once: a replay's frames go out in large writes, a live frame at once.
async fn send_queued(
    socket: &mut WebSocket,
    first: Frame,
    frames: &mut mpsc::Receiver<Frame>,
    shutdown: &CancellationToken,
    slow: &CancellationToken,
) -> Result<(), End> {
    let write = async {
        let (mut n, mut bytes) = (1u64, first.text.len());
        socket.feed(Message::Text(first.text)).await?;
        for _ in 1..FLUSH_EVERY {
            let Ok(f) = frames.try_recv() else { break };
            n += 1;
            bytes += f.text.len();
            socket.feed(Message::Text(f.text)).await?;
        }
        count_sent(n, bytes);
        socket.flush().await
    };
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(End::Shutdown),
        _ = slow.cancelled() => Err(End::Slow),
        sent = write => sent.map_err(|_| End::Gone),
    }
}

impl Session {
    /// Answers one client frame.
    async fn handle(&mut self, text: &str) -> String {
        let req = match protocol::parse(text) {
            Ok(req) => req,
            Err(bad) => return bad.frame(),
        };
        match req.op {
            Op::Ping => protocol::pong(req.id),
            Op::List => protocol::list(req.id, self.subs.keys()),
            Op::Subscribe(sub) => self.subscribe(req.id, sub).await,
            Op::Unsubscribe(channel) => match self.subs.remove(&channel) {
                Some(sub) => {
                    self.state.hub.unsubscribe(&channel, sub.id);
                    subscriptions(-1);
                    protocol::unsubscribed(req.id, &channel)
                }
                None => protocol::error(
                    req.id,
                    ErrorCode::BadRequest,
                    "not subscribed to that channel",
                ),
            },
        }
    }

    async fn subscribe(&mut self, id: Option<u64>, sub: Subscribe) -> String {
        let limits = &self.state.limits;
        if self.subs.contains_key(&sub.channel) {
            return protocol::error(
                id,
                ErrorCode::BadRequest,
                "already subscribed to that channel (unsubscribe first to replay again)",
            );
        }
        if self.subs.len() >= limits.max_subscriptions {
            return protocol::error(
                id,
                ErrorCode::Limit,
                &format!(
                    "at most {} subscriptions per connection",
                    limits.max_subscriptions
                ),
            );
        }
        if let Some(store) = &self.state.store {
            match store.pair_known(sub.channel.pair()).await {
                Ok(true) => {}
                Ok(false) => {
                    return protocol::error(
                        id,
                        ErrorCode::UnknownPair,
                        &format!(
                            "{} has no stored candles and is not declared in trading_pairs",
                            sub.channel.pair()
                        ),
                    )
                }
                Err(e) => {
                    return protocol::error(
                        id,
                        ErrorCode::Unavailable,
                        &format!("cannot look the pair up: {e}"),
                    )
                }
            }
        }
        let reply = protocol::subscribed(id, &sub.channel);
        let Some(since) = sub.since else {
            let sub_id =
                self.state
                    .hub
                    .subscribe(sub.channel.clone(), sub.partial, self.target.clone());
            self.subs.insert(
                sub.channel,
                Sub {
                    id: sub_id,
                    request: id,
                    replay: None,
                },
            );
            subscriptions(1);
            return reply;
        };
        let Some(store) = self.state.store.clone() else {
            return protocol::error(
                id,
                ErrorCode::BadRequest,
                "this server keeps no history: subscribe without \"since\" for live data",
            );
        };
        let replay = Replay::start(
            &self.state.hub,
            sub.channel.clone(),
            sub.partial,
            since,
            &self.target,
        );
        let sub_id = replay.id;
        let (hub, conn, done, channel) = (
            self.state.hub.clone(),
            self.target.clone(),
            self.done.clone(),
            sub.channel.clone(),
        );
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            let result = replay.run(store, hub, since, conn).await;
            let _ = done.send((channel, sub_id, result));
        }));
        self.subs.insert(
            sub.channel,
            Sub {
                id: sub_id,
                request: id,
                replay: Some(task),
            },
        );
        subscriptions(1);
        reply
    }

    /// A replay ended: on a read failure the subscription is dropped and the client told.
    fn replay_done(
        &mut self,
        channel: Channel,
        id: SubId,
        result: Result<u64, ReplayError>,
    ) -> Option<String> {
        let sub = self.subs.get_mut(&channel).filter(|s| s.id == id)?;
        match result {
            Ok(sent) => {
                debug!(channel = ?channel, sent, "Replay done; live from here.");
                sub.replay = None;
                None
            }
            Err(ReplayError::Closed) => None,
            Err(e) => {
                let request = sub.request;
                self.subs.remove(&channel);
                self.state.hub.unsubscribe(&channel, id);
                subscriptions(-1);
                Some(protocol::error(
                    request,
                    ErrorCode::Unavailable,
                    &format!("the replay stopped and the subscription was dropped: {e}"),
                ))
            }
        }
    }
}
