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
//! Not here yet: replay (`since`), inbound message rate limits, the REST facade routes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::mpsc;

use crate::lock;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::hub::{Frame, Hub, SubId, Target};
use super::protocol::{self, Channel, ErrorCode, Op};

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
    pub limits: Limits,
    /// Accepted bearer tokens; empty = open.
    pub tokens: Arc<Vec<String>>,
    /// Cancelled when the server stops: sessions send 1001 and end.
    pub shutdown: CancellationToken,
    pub connections: Connections,
}

impl ClientState {
    pub fn new(hub: Hub, limits: Limits, tokens: Vec<String>, shutdown: CancellationToken) -> Self {
        ClientState {
            hub,
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
}

impl Connections {
    /// Open connections in total.
    pub fn total(&self) -> usize {
        lock(&self.open).values().sum()
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
        let mut open = lock(&self.connections.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
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

async fn session(mut socket: WebSocket, state: ClientState) {
    let (queue, mut frames) = mpsc::channel::<Frame>(state.limits.send_queue.max(1));
    let slow = CancellationToken::new();
    let target = Target {
        queue,
        slow: slow.clone(),
    };
    let mut subs: BTreeMap<Channel, SubId> = BTreeMap::new();
    let mut ping = tokio::time::interval(state.limits.ping_interval);
    ping.tick().await;
    let mut heard = Instant::now();
    let end = loop {
        let step = tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => Err(End::Shutdown),
            _ = slow.cancelled() => Err(End::Slow),
            msg = socket.recv() => {
                heard = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        let reply = handle(&state, &target, &mut subs, text.as_str());
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
                send(&mut socket, frame.text.to_string(), &state.shutdown, &slow).await
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
    for (channel, id) in &subs {
        state.hub.unsubscribe(channel, *id);
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
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(End::Shutdown),
        _ = slow.cancelled() => Err(End::Slow),
        sent = socket.send(Message::Text(text.into())) => sent.map_err(|_| End::Gone),
    }
}

/// Answers one client frame.
fn handle(
    state: &ClientState,
    target: &Target,
    subs: &mut BTreeMap<Channel, SubId>,
    text: &str,
) -> String {
    let req = match protocol::parse(text) {
        Ok(req) => req,
        Err(bad) => return bad.frame(),
    };
    match req.op {
        Op::Ping => protocol::pong(req.id),
        Op::List => protocol::list(req.id, subs.keys()),
        Op::Subscribe(sub) => {
            if sub.since.is_some() {
                return protocol::error(
                    req.id,
                    ErrorCode::BadRequest,
                    "replay (\"since\") is not supported by this server yet; subscribe without it for live data",
                );
            }
            if subs.contains_key(&sub.channel) {
                return protocol::subscribed(req.id, &sub.channel);
            }
            if subs.len() >= state.limits.max_subscriptions {
                return protocol::error(
                    req.id,
                    ErrorCode::Limit,
                    &format!(
                        "at most {} subscriptions per connection",
                        state.limits.max_subscriptions
                    ),
                );
            }
            let id = state
                .hub
                .subscribe(sub.channel.clone(), sub.partial, target.clone());
            let reply = protocol::subscribed(req.id, &sub.channel);
            subs.insert(sub.channel, id);
            reply
        }
        Op::Unsubscribe(channel) => match subs.remove(&channel) {
            Some(id) => {
                state.hub.unsubscribe(&channel, id);
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
