//! Binance kline WebSocket streams: the combined-stream URL per market, parsing of kline
//! events, and [`MarketStreams`], which keeps one market's wanted stream set on as few
//! connections as the per-connection limits allow. Changes go out as SUBSCRIBE/UNSUBSCRIBE on
//! the open sockets (within the control-message rate), sockets that die or go quiet (pings do
//! not count) are replaced with jittered backoff, and each connection is renewed
//! make-before-break before Binance's 24 h cut. Closed candles leave as [`LiveEvent`]s; storing
//! them, deduplicating and healing what was missed is the live task's job, not this module's.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::egress::{ProxyEndpoint, ProxyPool};
use crate::config::StreamsConfig;
use crate::market::{now_ms, Decimal, Kline, Market, PairKey, Period, Source, Symbol};

/// Streams named in the connection URL; the rest are subscribed by message (long URLs fail).
const URL_STREAMS: usize = 50;
/// Streams per SUBSCRIBE/UNSUBSCRIBE message.
const BATCH: usize = 100;
/// How long opening a socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A socket that lived this long and delivered data resets the reconnect backoff (longer than
/// the default idle timeout, so a socket that never delivers keeps backing off).
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Most streams Binance allows on one connection.
pub fn streams_per_connection(market: Market) -> usize {
    match market {
        Market::Spot => 1024,
        Market::Um | Market::Cm => 200,
    }
}

/// The gap we leave between two control messages we send (Binance allows 5/s on spot and 10/s
/// on futures, pongs included): at most 4 and 7 in any second, leaving room for a pong.
pub fn control_gap(market: Market) -> Duration {
    match market {
        Market::Spot => Duration::from_millis(300),
        Market::Um | Market::Cm => Duration::from_millis(150),
    }
}

/// `<symbol lowercase>@kline_<interval>`.
pub fn stream_name(pair: &PairKey) -> String {
    format!(
        "{}@kline_{}",
        pair.symbol.as_str().to_ascii_lowercase(),
        pair.period
    )
}

/// The combined-stream endpoint (`…/stream`) for a configured `ws_url` (`…/ws/`, `…/ws`,
/// `…/stream` or a bare host). USD-M klines only flow on the routed `/market` path since
/// 2026-04-23, so an unrouted (or `/public`) USD-M URL is upgraded; the second value says so.
pub fn combined_url(market: Market, ws_url: &str) -> (String, Option<String>) {
    let mut base = ws_url.trim_end_matches('/').to_string();
    for suffix in ["/ws", "/stream"] {
        if let Some(b) = base.strip_suffix(suffix) {
            base = b.to_string();
            break;
        }
    }
    let mut warning = None;
    if market == Market::Um && !base.ends_with("/market") {
        let routed = base
            .strip_suffix("/public")
            .or_else(|| base.strip_suffix("/private"))
            .unwrap_or(&base)
            .to_string();
        let upgraded = format!("{routed}/market");
        warning = Some(format!(
            "app.binance.um.ws_url {ws_url:?} has no /market route; USD-M kline streams only flow on the routed path since 2026-04-23, so {upgraded}/stream is used (update the config to {upgraded}/ws/)"
        ));
        base = upgraded;
    }
    (format!("{base}/stream"), warning)
}

/// What the streams hand to the live task.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// A closed candle (`x == true`) and the event time Binance stamped on it.
    Final { kline: Kline, event_ms: i64 },
    /// A socket carrying these pairs (re)opened; `reconnect` is false for the first open of a
    /// connection and for make-before-break renewals.
    Connected {
        market: Market,
        pairs: Vec<PairKey>,
        reconnect: bool,
    },
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    data: Option<Event<'a>>,
    #[serde(borrow)]
    k: Option<KlineFields<'a>>,
    #[serde(rename = "E")]
    event_time: Option<i64>,
    id: Option<serde_json::Value>,
    code: Option<i64>,
    #[serde(borrow)]
    msg: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "E")]
    event_time: Option<i64>,
    #[serde(borrow)]
    k: Option<KlineFields<'a>>,
}

#[derive(Deserialize)]
struct KlineFields<'a> {
    t: i64,
    #[serde(rename = "T")]
    close_time: i64,
    #[serde(borrow)]
    s: Cow<'a, str>,
    #[serde(borrow)]
    i: Cow<'a, str>,
    #[serde(borrow)]
    o: Cow<'a, str>,
    #[serde(borrow)]
    c: Cow<'a, str>,
    #[serde(borrow)]
    h: Cow<'a, str>,
    #[serde(borrow)]
    l: Cow<'a, str>,
    #[serde(borrow)]
    v: Cow<'a, str>,
    n: u64,
    x: bool,
    #[serde(borrow)]
    q: Cow<'a, str>,
    #[serde(rename = "V", borrow)]
    taker_base: Cow<'a, str>,
    #[serde(rename = "Q", borrow)]
    taker_quote: Cow<'a, str>,
}

/// One parsed text frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Kline {
        kline: Kline,
        event_ms: i64,
    },
    Reply {
        id: Option<u64>,
        error: Option<String>,
    },
    Other,
}

/// Parses a text frame from a raw (`/ws`) or combined (`/stream`) connection of `market`.
pub fn parse_frame(market: Market, text: &str) -> Result<Incoming, String> {
    let f: Frame = serde_json::from_str(text).map_err(|e| format!("bad JSON: {e}"))?;
    let (k, event_time) = match f.data {
        Some(ev) => (ev.k, ev.event_time),
        None => (f.k, f.event_time),
    };
    if let Some(k) = k {
        let period = Period::parse_for(&k.i, market).map_err(|e| e.to_string())?;
        let symbol: Symbol =
            k.s.parse()
                .map_err(|e: crate::market::InputError| e.to_string())?;
        let dec = |s: &str| s.parse::<Decimal>().map_err(|e| e.to_string());
        let kline = Kline {
            pair: PairKey {
                market,
                symbol,
                period,
            },
            open_time: k.t,
            close_time: k.close_time,
            open: dec(&k.o)?,
            high: dec(&k.h)?,
            low: dec(&k.l)?,
            close: dec(&k.c)?,
            volume: dec(&k.v)?,
            quote_volume: dec(&k.q)?,
            trades: k.n,
            taker_buy_volume: dec(&k.taker_base)?,
            taker_buy_quote_volume: dec(&k.taker_quote)?,
            is_final: k.x,
            source: Source::Ws,
        };
        return Ok(Incoming::Kline {
            kline,
            event_ms: event_time.unwrap_or(0),
        });
    }
    if f.id.is_some() || f.code.is_some() {
        let id = f.id.as_ref().and_then(serde_json::Value::as_u64);
        let error = f
            .code
            .map(|c| format!("code {c}: {}", f.msg.as_deref().unwrap_or("")));
        return Ok(Incoming::Reply { id, error });
    }
    Ok(Incoming::Other)
}

enum Cmd {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

struct Conn {
    id: u64,
    streams: BTreeSet<String>,
    cmd: mpsc::UnboundedSender<Cmd>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// One market's streams. Not a task itself: [`MarketStreams::apply`] is called by the
/// reconcile pass; the connection tasks it starts are owned (and stopped) by it.
pub struct MarketStreams {
    market: Market,
    url: String,
    cfg: StreamsConfig,
    out: mpsc::Sender<LiveEvent>,
    conns: Vec<Conn>,
    /// Which connection carries each stream, and the pair behind it.
    owner: BTreeMap<String, (u64, PairKey)>,
    next_id: u64,
    cancel: CancellationToken,
    pool: Option<Arc<ProxyPool>>,
}

impl MarketStreams {
    /// Streams open their sockets through `pool` (SOCKS5) instead of directly.
    pub fn with_pool(mut self, pool: Option<Arc<ProxyPool>>) -> MarketStreams {
        self.pool = pool;
        self
    }

    pub fn new(
        market: Market,
        ws_url: &str,
        cfg: StreamsConfig,
        out: mpsc::Sender<LiveEvent>,
        cancel: CancellationToken,
    ) -> MarketStreams {
        let (url, warning) = combined_url(market, ws_url);
        if let Some(w) = warning {
            warn!(%market, "{w}");
        }
        MarketStreams {
            market,
            url,
            cfg,
            out,
            conns: Vec::new(),
            owner: BTreeMap::new(),
            next_id: 1,
            cancel,
            pool: None,
        }
    }

    /// Open connections and the streams each carries.
    pub fn connections(&self) -> Vec<(u64, usize)> {
        self.conns.iter().map(|c| (c.id, c.streams.len())).collect()
    }

    /// Makes the streamed set equal `wanted` (pairs of this market): unsubscribes what is no
    /// longer wanted and subscribes what is new on connections with room, opening connections
    /// only when all are full. Untouched streams keep their sockets.
    pub fn apply(&mut self, wanted: &BTreeSet<PairKey>) {
        let wanted: BTreeMap<String, PairKey> = wanted
            .iter()
            .filter(|p| p.market == self.market)
            .map(|p| (stream_name(p), p.clone()))
            .collect();
        // Removals, grouped per connection.
        let mut removals: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (name, (conn, _)) in &self.owner {
            if !wanted.contains_key(name) {
                removals.entry(*conn).or_default().push(name.clone());
            }
        }
        for (conn_id, names) in removals {
            for n in &names {
                self.owner.remove(n);
            }
            if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn_id) {
                for n in &names {
                    c.streams.remove(n);
                }
                if c.streams.is_empty() {
                    c.cancel.cancel();
                } else {
                    let _ = c.cmd.send(Cmd::Unsubscribe(names));
                }
            }
        }
        self.conns.retain(|c| !c.streams.is_empty());
        // Additions: fill connections with room first.
        let cap = streams_per_connection(self.market);
        let mut added: Vec<(String, PairKey)> = wanted
            .into_iter()
            .filter(|(n, _)| !self.owner.contains_key(n))
            .collect();
        added.reverse();
        for i in 0..self.conns.len() {
            let room = cap.saturating_sub(self.conns[i].streams.len());
            if room == 0 || added.is_empty() {
                continue;
            }
            let take: Vec<(String, PairKey)> = (0..room.min(added.len()))
                .filter_map(|_| added.pop())
                .collect();
            let c = &mut self.conns[i];
            for (n, p) in &take {
                c.streams.insert(n.clone());
                self.owner.insert(n.clone(), (c.id, p.clone()));
            }
            let _ = c
                .cmd
                .send(Cmd::Subscribe(take.into_iter().map(|(n, _)| n).collect()));
        }
        while !added.is_empty() {
            let take: Vec<(String, PairKey)> = (0..cap.min(added.len()))
                .filter_map(|_| added.pop())
                .collect();
            self.open(take);
        }
    }

    fn open(&mut self, streams: Vec<(String, PairKey)>) {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = self.cancel.child_token();
        let mut pairs = BTreeMap::new();
        for (n, p) in &streams {
            self.owner.insert(n.clone(), (id, p.clone()));
            pairs.insert(n.clone(), p.clone());
        }
        let task = ConnTask {
            id,
            market: self.market,
            url: self.url.clone(),
            cfg: self.cfg.clone(),
            streams: pairs,
            cmd: rx,
            out: self.out.clone(),
            next_msg_id: 1,
            pool: self.pool.clone(),
        };
        info!(market = %self.market, conn = id, streams = streams.len(), "Opening a stream connection.");
        let handle = tokio::spawn(task.run(cancel.clone()));
        self.conns.push(Conn {
            id,
            streams: streams.into_iter().map(|(n, _)| n).collect(),
            cmd: tx,
            cancel,
            task: handle,
        });
    }

    /// Closes every connection (cancel, then one shared `timeout`, then abort).
    pub async fn shutdown(self, timeout: Duration) {
        for c in &self.conns {
            c.cancel.cancel();
        }
        let deadline = Instant::now() + timeout;
        for c in self.conns {
            let mut task = c.task;
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

/// A byte stream to the exchange: a TCP connection, direct or through a SOCKS5 proxy.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type WsStream = WebSocketStream<MaybeTlsStream<Box<dyn Io>>>;

/// Opens the TCP connection for `url`: directly, or through `proxy` (SOCKS5, the proxy
/// resolving the host name), then the WebSocket handshake (TLS for `wss`).
async fn open_ws(url: &str, proxy: Option<&ProxyEndpoint>) -> Result<WsStream, String> {
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
enum SockEvent {
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
struct Sock {
    gen: u64,
    write: SplitSink<WsStream, Message>,
    reader: JoinHandle<()>,
    /// Wall-clock ms of the last data frame (pings and pongs do not count).
    last_data: Arc<AtomicI64>,
    opened: Instant,
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
    async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.write.send(Message::Close(None)),
        )
        .await;
        self.reader.abort();
    }

    fn settled(&self) -> bool {
        self.queue.is_empty() && self.pending.is_empty()
    }
}

struct ConnTask {
    id: u64,
    market: Market,
    url: String,
    cfg: StreamsConfig,
    streams: BTreeMap<String, PairKey>,
    cmd: mpsc::UnboundedReceiver<Cmd>,
    out: mpsc::Sender<LiveEvent>,
    next_msg_id: u64,
    /// Set when streams go through the proxy pool (`app.proxy.websocket`).
    pool: Option<Arc<ProxyPool>>,
}

impl ConnTask {
    async fn run(mut self, cancel: CancellationToken) {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<SockEvent>();
        let mut gen = 0u64;
        let mut attempt = 0u32;
        let mut reconnect = false;
        'outer: loop {
            if cancel.is_cancelled() {
                return;
            }
            gen += 1;
            let mut cur = match self.connect(gen, &ev_tx, &cancel).await {
                Some(s) => s,
                None => return,
            };
            let _ = self
                .out
                .send(LiveEvent::Connected {
                    market: self.market,
                    pairs: self.streams.values().cloned().collect(),
                    reconnect,
                })
                .await;
            let mut next: Option<Sock> = None;
            let mut rotate_attempt = 0u32;
            let mut rotate_not_before = Instant::now();
            let mut tick = crate::ticker(control_gap(self.market));
            let why: String = loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {
                        cur.close().await;
                        if let Some(n) = next.take() { n.close().await; }
                        return;
                    }
                    cmd = self.cmd.recv() => {
                        let Some(cmd) = cmd else {
                            cur.close().await;
                            if let Some(n) = next.take() { n.close().await; }
                            return;
                        };
                        let (method, names) = match cmd {
                            Cmd::Subscribe(names) => {
                                for n in &names {
                                    if let Some(p) = pair_of(self.market, n) {
                                        self.streams.insert(n.clone(), p);
                                    }
                                }
                                ("SUBSCRIBE", names)
                            }
                            Cmd::Unsubscribe(names) => {
                                for n in &names { self.streams.remove(n); }
                                ("UNSUBSCRIBE", names)
                            }
                        };
                        self.enqueue(&mut cur, method, &names);
                        if let Some(n) = next.as_mut() { self.enqueue(n, method, &names); }
                    }
                    ev = ev_rx.recv() => {
                        let Some(ev) = ev else { break "event channel closed".to_string() };
                        match ev {
                            SockEvent::Reply { gen: g, id, error } => {
                                let sock = if g == cur.gen { Some(&mut cur) } else { next.as_mut().filter(|n| n.gen == g) };
                                if let Some(s) = sock {
                                    if let Some(id) = id { s.pending.remove(&id); }
                                }
                                if let Some(e) = error {
                                    warn!(market = %self.market, conn = self.id, error = %e, "Binance refused a stream request.");
                                }
                            }
                            SockEvent::Closed { gen: g, why } => {
                                if g == cur.gen {
                                    match next.take() {
                                        Some(n) => {
                                            // The replacement is already open: switch to it.
                                            cur.reader.abort();
                                            cur = n;
                                        }
                                        None => break why,
                                    }
                                } else if next.as_ref().is_some_and(|n| n.gen == g) {
                                    warn!(market = %self.market, conn = self.id, %why, "The replacement socket closed before taking over.");
                                    next = None;
                                }
                            }
                        }
                    }
                    _ = tick.tick() => {
                        if let Err(e) = self.flush_one(&mut cur).await {
                            break e;
                        }
                        if let Some(n) = next.as_mut() {
                            if self.flush_one(n).await.is_err() {
                                next = None;
                            }
                        }
                        // Make-before-break: the new socket takes over once all its
                        // subscriptions are acknowledged.
                        if next.as_ref().is_some_and(Sock::settled) {
                            if let Some(n) = next.take() {
                                let old = std::mem::replace(&mut cur, n);
                                old.close().await;
                                info!(market = %self.market, conn = self.id, "Stream connection renewed.");
                            }
                        }
                        let idle = now_ms() - cur.last_data.load(Ordering::Relaxed);
                        if !self.streams.is_empty() && idle > self.cfg.idle_timeout.as_millis() as i64 {
                            break format!("no data for {idle} ms (only pings or nothing)");
                        }
                        if next.is_none()
                            && cur.opened.elapsed() >= self.cfg.max_lifetime
                            && Instant::now() >= rotate_not_before
                        {
                            gen += 1;
                            match self.open_sock(gen, &ev_tx).await {
                                Ok(n) => {
                                    next = Some(n);
                                    rotate_attempt = 0;
                                }
                                Err(e) => {
                                    let delay = crate::backoff::delay(
                                        rotate_attempt,
                                        self.cfg.reconnect_backoff,
                                        self.cfg.max_reconnect_backoff,
                                        &mut rand::rng(),
                                    );
                                    rotate_attempt = rotate_attempt.saturating_add(1);
                                    rotate_not_before = Instant::now() + delay;
                                    warn!(market = %self.market, conn = self.id, error = %e, retry_in = ?delay, "Cannot open the replacement socket; retrying.");
                                }
                            }
                        }
                    }
                }
            };
            let lived = cur.opened.elapsed();
            let delivered = cur.last_data.load(Ordering::Relaxed) > cur.opened_ms;
            cur.close().await;
            if let Some(n) = next.take() {
                n.close().await;
            }
            if lived >= STABLE_AFTER && delivered {
                attempt = 0;
            }
            let delay = crate::backoff::delay(
                attempt,
                self.cfg.reconnect_backoff,
                self.cfg.max_reconnect_backoff,
                &mut rand::rng(),
            );
            attempt = attempt.saturating_add(1);
            warn!(market = %self.market, conn = self.id, %why, retry_in = ?delay, "Stream socket lost; reconnecting.");
            reconnect = true;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break 'outer,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Opens a socket, retrying with backoff; `None` when cancelled.
    async fn connect(
        &mut self,
        gen: u64,
        ev_tx: &mpsc::UnboundedSender<SockEvent>,
        cancel: &CancellationToken,
    ) -> Option<Sock> {
        let mut attempt = 0u32;
        loop {
            let opened = tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                r = self.open_sock(gen, ev_tx) => r,
            };
            match opened {
                Ok(s) => return Some(s),
                Err(e) => {
                    let delay = crate::backoff::delay(
                        attempt,
                        self.cfg.reconnect_backoff,
                        self.cfg.max_reconnect_backoff,
                        &mut rand::rng(),
                    );
                    attempt = attempt.saturating_add(1);
                    warn!(market = %self.market, conn = self.id, error = %e, retry_in = ?delay, "Cannot open a stream socket; retrying.");
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Opens one socket carrying the current stream set (the first streams in the URL, the
    /// rest queued as SUBSCRIBE messages) and starts its reader.
    async fn open_sock(
        &mut self,
        gen: u64,
        ev_tx: &mpsc::UnboundedSender<SockEvent>,
    ) -> Result<Sock, String> {
        let names: Vec<String> = self.streams.keys().cloned().collect();
        let (in_url, rest) = names.split_at(names.len().min(URL_STREAMS));
        let url = if in_url.is_empty() {
            self.url.clone()
        } else {
            format!("{}?streams={}", self.url, in_url.join("/"))
        };
        // Through the pool when `app.proxy.websocket` is on (the pool may still say direct).
        let egress = match &self.pool {
            Some(pool) => Some(
                pool.pick(self.market, &HashSet::new(), |reason, wait| {
                    warn!(market = %self.market, %reason, ?wait, "No usable egress; waiting.");
                })
                .await
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let proxy = egress.as_ref().and_then(|e| e.proxy.clone());
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, open_ws(&url, proxy.as_ref())).await;
        let ws = match opened {
            Ok(Ok(ws)) => ws,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => format!("connecting to {} timed out", self.url),
                };
                if let (Some(pool), Some(e)) = (&self.pool, &egress) {
                    if e.is_proxy() {
                        let for_ = Duration::from_secs(60);
                        pool.quarantine(e, for_, &why);
                        warn!(egress = %e.name, ?for_, reason = %why, "Egress quarantined.");
                    }
                }
                return Err(why);
            }
        };
        let (write, read) = ws.split();
        let opened_ms = now_ms();
        let last_data = Arc::new(AtomicI64::new(opened_ms));
        let reader = tokio::spawn(read_loop(
            read,
            gen,
            self.market,
            ev_tx.clone(),
            self.out.clone(),
            last_data.clone(),
        ));
        debug!(market = %self.market, conn = self.id, gen, streams = names.len(), "Stream socket open.");
        let mut sock = Sock {
            gen,
            write,
            reader,
            last_data,
            opened: Instant::now(),
            opened_ms,
            queue: VecDeque::new(),
            pending: HashSet::new(),
            last_sent: None,
        };
        self.enqueue(&mut sock, "SUBSCRIBE", rest);
        Ok(sock)
    }

    fn enqueue(&mut self, sock: &mut Sock, method: &str, names: &[String]) {
        for chunk in names.chunks(BATCH) {
            let id = self.next_msg_id;
            self.next_msg_id += 1;
            let msg = serde_json::json!({"method": method, "params": chunk, "id": id});
            sock.queue.push_back((id, msg.to_string()));
        }
    }

    /// Sends the next queued control message if the rate allows.
    async fn flush_one(&mut self, sock: &mut Sock) -> Result<(), String> {
        let gap = control_gap(self.market);
        if sock.last_sent.is_some_and(|t| t.elapsed() < gap) {
            return Ok(());
        }
        let Some((id, text)) = sock.queue.pop_front() else {
            return Ok(());
        };
        sock.pending.insert(id);
        sock.last_sent = Some(Instant::now());
        sock.write
            .send(Message::text(text))
            .await
            .map_err(|e| format!("cannot send a control message: {e}"))
    }
}

fn pair_of(market: Market, stream: &str) -> Option<PairKey> {
    let (sym, rest) = stream.split_once("@kline_")?;
    PairKey::parse(market.as_str(), &sym.to_ascii_uppercase(), rest).ok()
}

async fn read_loop(
    mut read: SplitStream<WsStream>,
    gen: u64,
    market: Market,
    ev_tx: mpsc::UnboundedSender<SockEvent>,
    out: mpsc::Sender<LiveEvent>,
    last_data: Arc<AtomicI64>,
) {
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
        match parse_frame(market, text.as_str()) {
            // Only closed candles leave; in-progress updates just keep the watchdog calm.
            Ok(Incoming::Kline { kline, event_ms }) if kline.is_final => {
                if out
                    .send(LiveEvent::Final { kline, event_ms })
                    .await
                    .is_err()
                {
                    break "the live task stopped".to_string();
                }
            }
            Ok(Incoming::Kline { .. }) => {}
            Ok(Incoming::Reply { id, error }) => {
                let _ = ev_tx.send(SockEvent::Reply { gen, id, error });
            }
            Ok(Incoming::Other) => {}
            Err(e) => debug!(%market, error = %e, "Ignoring an unreadable stream frame."),
        }
    };
    let _ = ev_tx.send(SockEvent::Closed { gen, why });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_urls_and_the_usdm_upgrade() {
        let (u, w) = combined_url(Market::Spot, "wss://stream.binance.com:9443/ws/");
        assert_eq!(u, "wss://stream.binance.com:9443/stream");
        assert!(w.is_none());
        let (u, w) = combined_url(Market::Um, "wss://fstream.binance.com/ws/");
        assert_eq!(u, "wss://fstream.binance.com/market/stream");
        assert!(w.unwrap().contains("/market"));
        let (u, w) = combined_url(Market::Um, "wss://fstream.binance.com/market/ws");
        assert_eq!(u, "wss://fstream.binance.com/market/stream");
        assert!(w.is_none());
        let (u, _) = combined_url(Market::Um, "wss://fstream.binance.com/public/ws/");
        assert_eq!(u, "wss://fstream.binance.com/market/stream");
        let (u, w) = combined_url(Market::Cm, "wss://dstream.binance.com/ws/");
        assert_eq!(u, "wss://dstream.binance.com/stream");
        assert!(w.is_none());
    }

    #[test]
    fn kline_frames_raw_and_combined_and_replies() {
        let raw = r#"{"e":"kline","E":1672515782136,"s":"BNBBTC","k":{"t":1672515780000,"T":1672515839999,"s":"BNBBTC","i":"1m","f":100,"L":200,"o":"0.0010","c":"0.0020","h":"0.0025","l":"0.0015","v":"1000","n":100,"x":true,"q":"1.0000","V":"500","Q":"0.500","B":"123456"}}"#;
        let combined = format!(r#"{{"stream":"bnbbtc@kline_1m","data":{raw}}}"#);
        for text in [raw.to_string(), combined] {
            let Incoming::Kline { kline, event_ms } = parse_frame(Market::Spot, &text).unwrap()
            else {
                panic!("not a kline")
            };
            assert_eq!(event_ms, 1672515782136);
            assert_eq!(kline.pair.to_string(), "spot:BNBBTC:1m");
            assert_eq!(kline.open_time, 1672515780000);
            assert_eq!(kline.close_time, 1672515839999);
            assert_eq!(kline.high.to_string(), "0.0025");
            assert_eq!(kline.taker_buy_quote_volume.to_string(), "0.5");
            assert_eq!(kline.trades, 100);
            assert!(kline.is_final);
        }
        assert_eq!(
            parse_frame(Market::Spot, r#"{"result":null,"id":7}"#).unwrap(),
            Incoming::Reply {
                id: Some(7),
                error: None
            }
        );
        assert!(matches!(
            parse_frame(Market::Spot, r#"{"code":2,"msg":"Invalid request","id":3}"#).unwrap(),
            Incoming::Reply {
                id: Some(3),
                error: Some(_)
            }
        ));
        assert!(parse_frame(Market::Spot, "not json").is_err());
        assert_eq!(
            stream_name(&PairKey::parse("cm", "BTCUSD_PERP", "1m").unwrap()),
            "btcusd_perp@kline_1m"
        );
        assert_eq!(
            pair_of(Market::Cm, "btcusd_perp@kline_1m").unwrap(),
            PairKey::parse("cm", "BTCUSD_PERP", "1m").unwrap()
        );
    }
}
