//! One WebSocket to Binance: opening it (TCP directly or through a SOCKS5 proxy, then TLS and
//! the WebSocket handshake), its reader task (closed candles out to the live task, replies and
//! the close back to the connection), and its outgoing control queue paced to Binance's
//! message rate. Not here: which streams a socket carries, replacing or renewing sockets (the
//! connection task does that), choosing the proxy (the egress pool).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::debug;

use super::wire::{control_message, parse_frame, Incoming};
use super::LiveEvent;
use crate::exchange::egress::ProxyEndpoint;
use crate::market::{now_ms, Market};

/// Streams per SUBSCRIBE/UNSUBSCRIBE message.
const BATCH: usize = 100;

/// A byte stream to the exchange: a TCP connection, direct or through a SOCKS5 proxy.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub(super) type WsStream = WebSocketStream<MaybeTlsStream<Box<dyn Io>>>;

/// Opens the TCP connection for `url`: directly, or through `proxy` (SOCKS5, the proxy
/// resolving the host name), then the WebSocket handshake (TLS for `wss`).
pub(super) async fn open_ws(url: &str, proxy: Option<&ProxyEndpoint>) -> Result<WsStream, String> {
    let u = url::Url::parse(url).map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = u
        .host_str()
        .ok_or_else(|| format!("no host in {url}"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = u
        .port_or_known_default()
        .ok_or_else(|| format!("no port for {url}"))?;
    let io: Box<dyn Io> = match proxy {
        None => Box::new(
            TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?,
        ),
        Some(p) => {
            let proxy_addr = (p.host.as_str(), p.port);
            let target = (host.as_str(), port);
            let s = if p.username.is_empty() {
                tokio_socks::tcp::Socks5Stream::connect(proxy_addr, target).await
            } else {
                tokio_socks::tcp::Socks5Stream::connect_with_password(
                    proxy_addr,
                    target,
                    &p.username,
                    p.password.expose(),
                )
                .await
            };
            Box::new(s.map_err(|e| format!("proxy {}:{} failed: {e}", p.host, p.port))?)
        }
    };
    let (ws, _) = tokio_tungstenite::client_async_tls(url, io)
        .await
        .map_err(|e| format!("WebSocket handshake with {host}:{port} failed: {e}"))?;
    Ok(ws)
}

/// What a socket's reader tells its connection task.
pub(super) enum SockEvent {
    Reply {
        gen: u64,
        id: Option<u64>,
        error: Option<String>,
    },
    Closed {
        gen: u64,
        why: String,
    },
}

/// One open socket of a connection.
pub(super) struct Sock {
    /// Which of its connection's sockets this is (events name it).
    pub gen: u64,
    write: SplitSink<WsStream, Message>,
    reader: JoinHandle<()>,
    /// Wall-clock ms of the last data frame (pings and pongs do not count).
    last_data: Arc<AtomicI64>,
    pub opened: Instant,
    opened_ms: i64,
    /// Control messages not yet sent, and ids sent but not yet acknowledged.
    queue: VecDeque<(u64, String)>,
    pending: HashSet<u64>,
    last_sent: Option<Instant>,
}

impl Drop for Sock {
    fn drop(&mut self) {
        // An aborted connection task must not leave its reader (and socket) behind.
        self.reader.abort();
    }
}

impl Sock {
    /// Wraps an open WebSocket and starts its reader: closed candles go to `out`, replies and
    /// the close to `events` (tagged `gen`).
    pub fn start(
        ws: WsStream,
        gen: u64,
        market: Market,
        events: mpsc::UnboundedSender<SockEvent>,
        out: mpsc::Sender<LiveEvent>,
        partials: Option<super::PartialHook>,
    ) -> Sock {
        let (write, read) = ws.split();
        let opened_ms = now_ms();
        let last_data = Arc::new(AtomicI64::new(opened_ms));
        let reader = tokio::spawn(read_loop(
            read,
            gen,
            market,
            events,
            out,
            partials,
            last_data.clone(),
        ));
        Sock {
            gen,
            write,
            reader,
            last_data,
            opened: Instant::now(),
            opened_ms,
            queue: VecDeque::new(),
            pending: HashSet::new(),
            last_sent: None,
        }
    }

    /// Sends a close frame (waiting at most a second) and stops the reader.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.write.send(Message::Close(None)),
        )
        .await;
        self.reader.abort();
    }

    /// Every queued request sent and acknowledged.
    pub fn settled(&self) -> bool {
        self.queue.is_empty() && self.pending.is_empty()
    }

    /// Binance acknowledged (or refused) request `id`.
    pub fn acknowledged(&mut self, id: u64) {
        self.pending.remove(&id);
    }

    /// How long since the last data frame (ms, wall clock).
    pub fn idle_ms(&self) -> i64 {
        now_ms() - self.last_data.load(Ordering::Relaxed)
    }

    /// Whether any data frame arrived since it opened.
    pub fn delivered(&self) -> bool {
        self.last_data.load(Ordering::Relaxed) > self.opened_ms
    }

    /// Queues `method` (SUBSCRIBE/UNSUBSCRIBE) for `names`, in batches, with ids from
    /// `next_id`.
    pub fn enqueue(&mut self, method: &str, names: &[String], next_id: &mut u64) {
        for chunk in names.chunks(BATCH) {
            let id = *next_id;
            *next_id += 1;
            self.queue
                .push_back((id, control_message(method, chunk, id)));
        }
    }

    /// Sends the next queued control message if `gap` has passed since the last one.
    pub async fn flush_one(&mut self, gap: Duration) -> Result<(), String> {
        if self.last_sent.is_some_and(|t| t.elapsed() < gap) {
            return Ok(());
        }
        let Some((id, text)) = self.queue.pop_front() else {
            return Ok(());
        };
        self.pending.insert(id);
        self.last_sent = Some(Instant::now());
        self.write
            .send(Message::text(text))
            .await
            .map_err(|e| format!("cannot send a control message: {e}"))
    }
}

async fn read_loop(
    mut read: SplitStream<WsStream>,
    gen: u64,
    market: Market,
    ev_tx: mpsc::UnboundedSender<SockEvent>,
    out: mpsc::Sender<LiveEvent>,
    partials: Option<super::PartialHook>,
    last_data: Arc<AtomicI64>,
) {
    // The connection owns this reader: if it panics, the connection hears at once (the
    // socket is closed and replaced) instead of waiting for its idle watchdog.
    struct OnPanic {
        gen: u64,
        ev_tx: mpsc::UnboundedSender<SockEvent>,
    }
    impl Drop for OnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                crate::metrics::add(&crate::metrics::TASK_FAILURES, 1);
                let _ = self.ev_tx.send(SockEvent::Closed {
                    gen: self.gen,
                    why: "the socket reader panicked".to_string(),
                });
            }
        }
    }
    let _on_panic = OnPanic {
        gen,
        ev_tx: ev_tx.clone(),
    };
    let why = loop {
        let Some(msg) = read.next().await else {
            break "closed by the server".to_string();
        };
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Binary(_)) | Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(Message::Close(frame)) => {
                break format!(
                    "closed by the server ({})",
                    frame.map_or_else(|| "no reason".to_string(), |f| f.reason.to_string())
                )
            }
            Ok(Message::Frame(_)) => continue,
            Err(e) => break format!("read error: {e}"),
        };
        last_data.store(now_ms(), Ordering::Relaxed);
        crate::faults::hit("ws_reader");
        match parse_frame(market, text.as_str()) {
            // Closed candles go to the live task; in-progress updates only to the partial hook
            // (and they keep the watchdog calm).
            Ok(Incoming::Kline { kline, event_ms }) if kline.is_final => {
                if out
                    .send(LiveEvent::Final { kline, event_ms })
                    .await
                    .is_err()
                {
                    break "the live task stopped".to_string();
                }
            }
            Ok(Incoming::Kline { kline, .. }) => {
                if let Some(hook) = &partials {
                    hook(&kline);
                }
            }
            Ok(Incoming::Reply { id, error }) => {
                let _ = ev_tx.send(SockEvent::Reply { gen, id, error });
            }
            Ok(Incoming::Other) => {}
            Err(e) => debug!(%market, error = %e, "Ignoring an unreadable stream frame."),
        }
    };
    let _ = ev_tx.send(SockEvent::Closed { gen, why });
}
