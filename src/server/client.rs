//! The client WebSocket endpoint (`/ws`): one session per connection, speaking [`protocol`]
//! and fed by the [`Hub`]. A session answers every frame (a bad one gets an error frame and the
//! connection stays open), queues live frames in one bounded queue per connection, pings the
//! client and drops it when it stops answering, and closes with 1008 `slow consumer` when the
//! hub cut it off (its queue was full) or 1001 when the server shuts down. A send never waits
//! past those: a client that stops reading delays only itself.
//!
//! Not here yet: replay (`since`), auth, connection limits, the REST facade routes.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::sync::mpsc;
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
    /// Cancelled when the server stops: sessions send 1001 and end.
    pub shutdown: CancellationToken,
}

/// `/ws`.
pub fn router(state: ClientState) -> Router {
    Router::new().route("/ws", get(upgrade)).with_state(state)
}

async fn upgrade(ws: WebSocketUpgrade, State(state): State<ClientState>) -> Response {
    // Small buffers: thousands of connections, small frames.
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_message_size(state.limits.max_frame_bytes)
        .max_frame_size(state.limits.max_frame_bytes)
        .on_upgrade(move |socket| session(socket, state))
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
