//! WebSocket kline streams of the simulator, per market behind `/spot`, `/um` and `/cm` on the
//! one server: raw `/ws/<stream>` and combined `/stream?streams=…` connections (USD-M pushes
//! klines only on its routed `/um/market/…` paths), the control messages, kline events built
//! from the same candles and digits as REST, server pings, message-rate and stream limits, the
//! lifetime cap and the WebSocket fault switches. Owns the connection registry and one task per
//! connection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::SinkExt as _;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use qs_core::market::{Kline, Market, PairKey, Period, Symbol};

use super::book::PairView;
use super::rest::write_decimal;
use super::{lock, now_ms, Shared};

/// Binance's connection lifetime.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Durations set through the handle are kept within [1 ms, 30 days].
const LONGEST: Duration = Duration::from_secs(30 * 86_400);
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most control records kept; older ones are dropped.
const CONTROL_LOG_CAP: usize = 100_000;
/// Most finals sent for one stream at one tick (only reached when the update interval is
/// longer than the candle).
const MAX_CATCH_UP: usize = 100;
/// Unanswered ping payloads remembered per connection.
const MAX_OUTSTANDING_PINGS: usize = 16;

/// Streams one connection may hold: spot 1024, futures 200.
pub(crate) fn max_streams(market: Market) -> usize {
    match market {
        Market::Spot => 1024,
        Market::Um | Market::Cm => 200,
    }
}

/// Incoming messages (text, binary, ping, pong) allowed per second: spot 5, futures 10.
pub(crate) fn max_messages_per_sec(market: Market) -> usize {
    match market {
        Market::Spot => 5,
        Market::Um | Market::Cm => 10,
    }
}

fn default_ping_interval(market: Market) -> Duration {
    match market {
        Market::Spot => Duration::from_secs(20),
        Market::Um | Market::Cm => Duration::from_secs(180),
    }
}

fn default_pong_deadline(market: Market) -> Duration {
    match market {
        Market::Spot => Duration::from_secs(60),
        Market::Um | Market::Cm => Duration::from_secs(600),
    }
}

/// Binance's kline update speed: spot 1000 ms for `1s`, 2000 ms otherwise; futures 250 ms.
fn default_update_ms(market: Market, period: Period) -> i64 {
    match (market, period) {
        (Market::Spot, Period::S1) => 1000,
        (Market::Spot, _) => 2000,
        (Market::Um | Market::Cm, _) => 250,
    }
}

fn clamp(d: Duration) -> Duration {
    d.clamp(Duration::from_millis(1), LONGEST)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(clamp(d).as_millis()).unwrap_or(i64::MAX)
}

/// Overrides and fault switches, changeable while running (every connection watches them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct WsSettings {
    pub update_interval: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub pong_deadline: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub stall: bool,
    pub skip_finals: bool,
}

impl WsSettings {
    fn update_ms(&self, market: Market, period: Period) -> i64 {
        self.update_interval
            .map_or_else(|| default_update_ms(market, period), millis)
    }

    fn ping_interval(&self, market: Market) -> Duration {
        clamp(
            self.ping_interval
                .unwrap_or_else(|| default_ping_interval(market)),
        )
    }

    fn pong_deadline(&self, market: Market) -> Duration {
        clamp(
            self.pong_deadline
                .unwrap_or_else(|| default_pong_deadline(market)),
        )
    }

    fn max_lifetime(&self) -> Duration {
        clamp(self.max_lifetime.unwrap_or(MAX_LIFETIME))
    }
}

/// One open WebSocket connection, as [`super::SimHandle::ws_open_connections`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsConnInfo {
    /// Unique, increasing from 1 in accept order.
    pub id: u64,
    pub market: Market,
    /// Opened on a routed path (`/um/market/…`). Spot and COIN-M have no routed paths, so this
    /// is always false for them (and their connections push klines all the same).
    pub routed: bool,
    /// When the upgrade was accepted, Unix ms.
    pub opened_at_ms: i64,
    /// Current subscriptions, sorted.
    pub subscriptions: Vec<String>,
}

/// One control message a connection received (also invalid ones: `method` is then empty
/// unless the JSON object named one).
#[derive(Debug, Clone, PartialEq)]
pub struct WsControlRecord {
    /// [`WsConnInfo::id`] of the connection.
    pub conn: u64,
    /// Arrival time, Unix ms.
    pub at_ms: i64,
    pub method: String,
    /// The `params` value as sent (`Null` when absent or unparseable).
    pub params: Value,
    /// The `id` value as sent, if any.
    pub id: Option<Value>,
}

struct ConnEntry {
    info: WsConnInfo,
    kill: CancellationToken,
}

/// The registry, counters and settings of every WebSocket connection of one simulator.
pub(crate) struct WsHub {
    settings: watch::Sender<WsSettings>,
    /// The simulator's life: every connection ends when it is cancelled.
    cancel: CancellationToken,
    next_id: AtomicU64,
    conns: Mutex<BTreeMap<u64, ConnEntry>>,
    opened: [AtomicUsize; 3],
    closed_for_rate: AtomicUsize,
    finals_sent: AtomicU64,
    control_log: Mutex<VecDeque<WsControlRecord>>,
}

fn market_index(market: Market) -> usize {
    match market {
        Market::Spot => 0,
        Market::Um => 1,
        Market::Cm => 2,
    }
}

impl WsHub {
    pub(crate) fn new(cancel: CancellationToken) -> WsHub {
        WsHub {
            settings: watch::Sender::new(WsSettings::default()),
            cancel,
            next_id: AtomicU64::new(1),
            conns: Mutex::new(BTreeMap::new()),
            opened: Default::default(),
            closed_for_rate: AtomicUsize::new(0),
            finals_sent: AtomicU64::new(0),
            control_log: Mutex::new(VecDeque::new()),
        }
    }

    /// Changes the settings; connections pick the change up at once.
    pub(crate) fn update(&self, change: impl FnOnce(&mut WsSettings)) {
        self.settings.send_if_modified(|s| {
            let before = s.clone();
            change(s);
            *s != before
        });
    }

    /// Drops every open connection without a close frame.
    pub(crate) fn drop_all(&self) {
        for entry in lock(&self.conns).values() {
            entry.kill.cancel();
        }
    }

    pub(crate) fn opened(&self, market: Market) -> usize {
        self.opened[market_index(market)].load(Ordering::Relaxed)
    }

    pub(crate) fn open_connections(&self) -> Vec<WsConnInfo> {
        lock(&self.conns).values().map(|e| e.info.clone()).collect()
    }

    pub(crate) fn control_log(&self) -> Vec<WsControlRecord> {
        lock(&self.control_log).iter().cloned().collect()
    }

    pub(crate) fn closed_for_rate(&self) -> usize {
        self.closed_for_rate.load(Ordering::Relaxed)
    }

    pub(crate) fn finals_sent(&self) -> u64 {
        self.finals_sent.load(Ordering::Relaxed)
    }

    fn register(&self, info: WsConnInfo) -> CancellationToken {
        let kill = self.cancel.child_token();
        self.opened[market_index(info.market)].fetch_add(1, Ordering::Relaxed);
        lock(&self.conns).insert(
            info.id,
            ConnEntry {
                info,
                kill: kill.clone(),
            },
        );
        kill
    }

    fn unregister(&self, id: u64) {
        lock(&self.conns).remove(&id);
    }

    fn set_subscriptions(&self, id: u64, subs: Vec<String>) {
        if let Some(e) = lock(&self.conns).get_mut(&id) {
            e.info.subscriptions = subs;
        }
    }

    fn record(&self, rec: WsControlRecord) {
        let mut log = lock(&self.control_log);
        if log.len() >= CONTROL_LOG_CAP {
            log.pop_front();
        }
        log.push_back(rec);
    }
}

/// The connection a WebSocket path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WsRoute {
    pub market: Market,
    /// `/um/market/…`: USD-M's routed path for market data.
    pub routed: bool,
    /// `/stream` (events wrapped with their stream name) rather than `/ws` (bare payloads).
    pub combined: bool,
    /// Streams named in a raw path (`/ws/<s1>/<s2>`).
    pub path_streams: Vec<String>,
}

/// `/spot/ws/btcusdt@kline_1m`, `/um/market/stream`, `/cm/ws` … → the route; `None` for any
/// other path.
pub(crate) fn route(path: &str) -> Option<WsRoute> {
    let (market, rest) = [
        ("/spot/", Market::Spot),
        ("/um/", Market::Um),
        ("/cm/", Market::Cm),
    ]
    .into_iter()
    .find_map(|(prefix, m)| Some((m, path.strip_prefix(prefix)?)))?;
    let (routed, rest) = match rest.strip_prefix("market/") {
        Some(r) if market == Market::Um => (true, r),
        _ => (false, rest),
    };
    let (combined, streams) = match rest {
        "stream" | "stream/" => (true, ""),
        "ws" => (false, ""),
        _ => (false, rest.strip_prefix("ws/")?),
    };
    Some(WsRoute {
        market,
        routed,
        combined,
        path_streams: split_streams(streams),
    })
}

fn split_streams(s: &str) -> Vec<String> {
    s.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `btcusdt@kline_1m` → (BTCUSDT, 1m) if it is a kline stream of `market` (symbol lowercase).
fn parse_kline_stream(market: Market, name: &str) -> Option<(Symbol, Period)> {
    let (symbol, rest) = name.split_once('@')?;
    let interval = rest.strip_prefix("kline_")?;
    if symbol.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let symbol: Symbol = symbol.to_ascii_uppercase().parse().ok()?;
    let period = Period::parse_for(interval, market).ok()?;
    Some((symbol, period))
}

/// Answers a request on a WebSocket path: upgrades it (101) and starts the connection task, or
/// answers why not (no upgrade headers; more initial streams than a connection may hold: 400).
pub(crate) fn accept(
    shared: &Arc<Shared>,
    route: WsRoute,
    query: &str,
    upgrade: Result<WebSocketUpgrade, Response>,
    now: i64,
) -> Response {
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let mut streams: BTreeSet<String> = route.path_streams.iter().cloned().collect();
    if route.combined {
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if k == "streams" {
                streams.extend(split_streams(&v));
            }
        }
    }
    let max = max_streams(route.market);
    if streams.len() > max {
        let body = error_reply(
            2,
            &format!("Invalid request: too many streams; a connection holds at most {max}"),
            None,
        );
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        return resp;
    }
    let hub = &shared.ws;
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let kill = hub.register(WsConnInfo {
        id,
        market: route.market,
        routed: route.routed,
        opened_at_ms: now,
        subscriptions: streams.iter().cloned().collect(),
    });
    let on_fail = shared.clone();
    let task_shared = shared.clone();
    upgrade
        .on_failed_upgrade(move |error| {
            tracing::debug!(%error, "WebSocket upgrade failed.");
            on_fail.ws.unregister(id);
        })
        .on_upgrade(move |socket| run(task_shared, id, route, streams, kill, socket))
}

/// Removes the connection from the registry however its task ends.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.ws.unregister(self.id);
    }
}

/// How a connection ends.
enum Exit {
    /// Drop the socket: no close frame (faults, shutdown, peer gone).
    Drop,
    /// The peer sent a close frame: finish the handshake.
    PeerClosed,
    /// The server closes: close frame, then wait briefly for the peer's.
    Close(u16, &'static str),
}

async fn run(
    shared: Arc<Shared>,
    id: u64,
    route: WsRoute,
    initial: BTreeSet<String>,
    kill: CancellationToken,
    mut socket: WebSocket,
) {
    let _registered = Registered {
        shared: shared.clone(),
        id,
    };
    let mut rx = shared.ws.settings.subscribe();
    let settings = rx.borrow_and_update().clone();
    let now = Instant::now();
    let mut conn = Conn {
        shared: shared.clone(),
        id,
        market: route.market,
        pushes: route.market != Market::Um || route.routed,
        combined: route.combined,
        subs: BTreeMap::new(),
        rate: VecDeque::new(),
        opened: now,
        last_ping: now,
        outstanding: VecDeque::new(),
        unanswered_since: None,
        settings,
    };
    let wall = now_ms();
    for name in initial {
        conn.add(name, wall);
    }
    let exit = conn.serve(&mut socket, &mut rx, &kill).await;
    match exit {
        Exit::Drop => {}
        Exit::PeerClosed => {
            let _ = tokio::time::timeout(CLOSE_GRACE, socket.flush()).await;
        }
        Exit::Close(code, reason) => close(&mut socket, code, reason, &kill).await,
    }
    tracing::debug!(id, market = %route.market, "WebSocket connection ended.");
}

/// Sends a close frame, then reads until the peer's close frame (bounded by [`CLOSE_GRACE`]) so
/// that unread input does not turn the close into a reset.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str, kill: &CancellationToken) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let handshake = async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    tokio::select! {
        biased;
        () = kill.cancelled() => {}
        _ = tokio::time::timeout(CLOSE_GRACE, handshake) => {}
    }
}

/// Sends `msgs` in one flush; false if the socket failed, the connection was killed, or the
/// peer took longer than `limit` to take the data (a reader that stopped reading).
async fn send_all(
    socket: &mut WebSocket,
    msgs: Vec<Message>,
    kill: &CancellationToken,
    limit: Duration,
) -> bool {
    let send = async {
        for m in msgs {
            socket.feed(m).await?;
        }
        socket.flush().await
    };
    tokio::select! {
        biased;
        () = kill.cancelled() => false,
        sent = tokio::time::timeout(limit, send) => matches!(sent, Ok(Ok(()))),
    }
}

/// A subscribed kline stream that exists (known symbol and interval).
struct KlineStream {
    pair: PairKey,
    listed: i64,
    /// `{"stream":"<name>","data":` for combined payloads.
    prefix: String,
    /// Update interval, ms; pushes happen on this grid of the wall clock.
    every_ms: i64,
    next_due: i64,
    /// The candle in progress at the last tick (or at subscription).
    cur_open: Option<i64>,
}

/// The first point of the `every_ms` grid after `now`.
fn next_grid(now: i64, every_ms: i64) -> i64 {
    (now.div_euclid(every_ms) + 1) * every_ms
}

/// The state of one connection, owned by its task.
struct Conn {
    shared: Arc<Shared>,
    id: u64,
    market: Market,
    /// False on unrouted USD-M connections: they accept everything but push no klines.
    pushes: bool,
    combined: bool,
    /// Every subscription; `None` for names that are no kline stream of this market.
    subs: BTreeMap<String, Option<KlineStream>>,
    /// Arrival times of the incoming messages of the last second.
    rate: VecDeque<Instant>,
    opened: Instant,
    last_ping: Instant,
    outstanding: VecDeque<Bytes>,
    /// When the oldest unanswered ping was sent.
    unanswered_since: Option<Instant>,
    settings: WsSettings,
}

impl Conn {
    async fn serve(
        &mut self,
        socket: &mut WebSocket,
        rx: &mut watch::Receiver<WsSettings>,
        kill: &CancellationToken,
    ) -> Exit {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                () = kill.cancelled() => return Exit::Drop,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Exit::Drop;
                    }
                    let new = rx.borrow_and_update().clone();
                    self.apply(new, now_ms());
                }
                msg = socket.recv() => {
                    let Some(Ok(msg)) = msg else {
                        return Exit::Drop;
                    };
                    if let Some(exit) = self.on_message(msg, socket, kill).await {
                        return exit;
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if let Some(exit) = self.on_timer(socket, kill).await {
                        return exit;
                    }
                }
            }
        }
    }

    /// How long one send may wait for the peer: as long as a ping may stay unanswered.
    fn send_limit(&self) -> Duration {
        self.settings.pong_deadline(self.market)
    }

    /// The earliest of: lifetime end, next ping, pong deadline, next push.
    fn next_wake(&self) -> Instant {
        let mut wake = self.opened + self.settings.max_lifetime();
        wake = wake.min(self.last_ping + self.settings.ping_interval(self.market));
        if let Some(since) = self.unanswered_since {
            wake = wake.min(since + self.settings.pong_deadline(self.market));
        }
        if self.pushes {
            if let Some(due) = self.subs.values().flatten().map(|s| s.next_due).min() {
                let wait = u64::try_from(due - now_ms()).unwrap_or(0);
                wake = wake.min(Instant::now() + Duration::from_millis(wait));
            }
        }
        wake
    }

    /// Takes new settings: re-grids the pushes if the interval changed; when a stall or
    /// skip-finals ends, candles that closed meanwhile are forgotten (never pushed).
    fn apply(&mut self, new: WsSettings, now: i64) {
        let resumed =
            (self.settings.stall && !new.stall) || (self.settings.skip_finals && !new.skip_finals);
        let regrid = self.settings.update_interval != new.update_interval;
        self.settings = new;
        for st in self.subs.values_mut().flatten() {
            if regrid {
                st.every_ms = self.settings.update_ms(self.market, st.pair.period);
                st.next_due = next_grid(now, st.every_ms);
            }
            if resumed {
                st.cur_open = Some(st.pair.period.align(now));
            }
        }
    }

    async fn on_timer(&mut self, socket: &mut WebSocket, kill: &CancellationToken) -> Option<Exit> {
        let now = Instant::now();
        if now >= self.opened + self.settings.max_lifetime() {
            return Some(Exit::Close(1001, "Maximum connection lifetime reached"));
        }
        if let Some(since) = self.unanswered_since {
            if now >= since + self.settings.pong_deadline(self.market) {
                return Some(Exit::Close(1008, "Pong timeout"));
            }
        }
        let mut out = Vec::new();
        if now >= self.last_ping + self.settings.ping_interval(self.market) {
            let payload = Bytes::from(now_ms().to_string());
            out.push(Message::Ping(payload.clone()));
            if self.outstanding.len() >= MAX_OUTSTANDING_PINGS {
                self.outstanding.pop_front();
            }
            self.outstanding.push_back(payload);
            self.unanswered_since.get_or_insert(now);
            self.last_ping = now;
        }
        let finals = if self.pushes {
            self.tick(now_ms(), &mut out)
        } else {
            0
        };
        if !out.is_empty() {
            if !send_all(socket, out, kill, self.send_limit()).await {
                return Some(Exit::Drop);
            }
            self.shared
                .ws
                .finals_sent
                .fetch_add(finals, Ordering::Relaxed);
        }
        None
    }

    /// Builds the events of every stream due at `now`; returns how many are finals.
    fn tick(&mut self, now: i64, out: &mut Vec<Message>) -> u64 {
        let maintenance = self.shared.maintenance();
        let (stall, skip_finals) = (self.settings.stall, self.settings.skip_finals);
        let combined = self.combined;
        let mut finals = 0;
        for st in self.subs.values_mut().flatten() {
            if st.next_due > now {
                continue;
            }
            st.next_due = next_grid(now, st.every_ms);
            let series = self.shared.series.get(&st.pair).map(|s| s.as_ref());
            let view = PairView::new(&st.pair, st.listed, series, &maintenance);
            let period = st.pair.period;
            let open = period.align(now);
            if let Some(prev) = st.cur_open.filter(|&p| p < open) {
                if !stall && !skip_finals {
                    let mut o = prev;
                    for _ in 0..MAX_CATCH_UP {
                        if o >= open {
                            break;
                        }
                        if let Some(k) = view.at(o, now).filter(|k| k.is_final) {
                            out.push(event(st, &k, now, combined));
                            finals += 1;
                        }
                        o = period.next_open(o);
                    }
                }
            }
            st.cur_open = Some(open);
            if !stall {
                if let Some(k) = view.at(open, now) {
                    out.push(event(st, &k, now, combined));
                }
            }
        }
        finals
    }

    async fn on_message(
        &mut self,
        msg: Message,
        socket: &mut WebSocket,
        kill: &CancellationToken,
    ) -> Option<Exit> {
        if matches!(msg, Message::Close(_)) {
            return Some(Exit::PeerClosed);
        }
        let now = Instant::now();
        while self
            .rate
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            self.rate.pop_front();
        }
        self.rate.push_back(now);
        if self.rate.len() > max_messages_per_sec(self.market) {
            self.shared
                .ws
                .closed_for_rate
                .fetch_add(1, Ordering::Relaxed);
            return Some(Exit::Close(1008, "Too many messages"));
        }
        let reply = match msg {
            Message::Text(text) => self.control(text.as_str(), now_ms()),
            Message::Binary(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => self.control(text, now_ms()),
                Err(e) => self.invalid_json(&e.to_string(), now_ms()),
            },
            // tungstenite answers pings itself.
            Message::Ping(_) | Message::Close(_) => return None,
            Message::Pong(payload) => {
                // Only a copy of a ping's payload answers it; unsolicited pongs do not.
                if self.outstanding.contains(&payload) {
                    self.outstanding.clear();
                    self.unanswered_since = None;
                }
                return None;
            }
        };
        if send_all(socket, vec![Message::text(reply)], kill, self.send_limit()).await {
            None
        } else {
            Some(Exit::Drop)
        }
    }

    fn log(&self, at_ms: i64, method: &str, params: Value, id: Option<Value>) {
        self.shared.ws.record(WsControlRecord {
            conn: self.id,
            at_ms,
            method: method.to_string(),
            params,
            id,
        });
    }

    fn invalid_json(&self, why: &str, now: i64) -> String {
        self.log(now, "", Value::Null, None);
        error_reply(3, &format!("Invalid JSON: {why}"), None)
    }

    /// Handles one control message and returns the reply.
    fn control(&mut self, text: &str, now: i64) -> String {
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return self.invalid_json(&e.to_string(), now),
        };
        let Value::Object(obj) = v else {
            self.log(now, "", Value::Null, None);
            return error_reply(2, "Invalid request: expected a JSON object", None);
        };
        let method = obj.get("method");
        let params = obj.get("params").cloned().unwrap_or(Value::Null);
        let id = obj.get("id").cloned();
        let method_name = method.and_then(Value::as_str).unwrap_or("");
        self.log(now, method_name, params.clone(), id.clone());
        let Some(id) = id.filter(valid_id) else {
            return error_reply(
                2,
                "Invalid request: request ID must be an unsigned integer",
                None,
            );
        };
        let id = Some(&id);
        let method = match method {
            None => return error_reply(2, "Invalid request: missing field `method`", id),
            Some(Value::String(m)) => m.as_str(),
            Some(other) => {
                return error_reply(
                    2,
                    &format!("Invalid request: invalid type: {other}, expected a method name"),
                    id,
                )
            }
        };
        let param_list: &[Value] = match &params {
            Value::Array(a) => a,
            _ => &[],
        };
        match method {
            "SUBSCRIBE" | "UNSUBSCRIBE" => {
                let names = match stream_names(&params) {
                    Ok(n) => n,
                    Err(msg) => return error_reply(2, msg, id),
                };
                if method == "SUBSCRIBE" {
                    let new: BTreeSet<&str> = names
                        .iter()
                        .copied()
                        .filter(|n| !self.subs.contains_key(*n))
                        .collect();
                    let max = max_streams(self.market);
                    if self.subs.len() + new.len() > max {
                        return error_reply(
                            2,
                            &format!(
                                "Invalid request: too many streams; a connection holds at most {max}"
                            ),
                            id,
                        );
                    }
                    for name in new {
                        self.add(name.to_string(), now);
                    }
                } else {
                    for name in names {
                        self.subs.remove(name);
                    }
                }
                self.publish_subscriptions();
                ok_reply("null", id)
            }
            "LIST_SUBSCRIPTIONS" => {
                if !param_list.is_empty() {
                    return error_reply(2, "Invalid request: too many parameters", id);
                }
                let names: Vec<&String> = self.subs.keys().collect();
                let list = serde_json::to_string(&names).unwrap_or_else(|_| "[]".to_string());
                ok_reply(&list, id)
            }
            "SET_PROPERTY" | "GET_PROPERTY" => {
                let setting = method == "SET_PROPERTY";
                let Some(name) = param_list.first().and_then(Value::as_str) else {
                    return error_reply(2, "Invalid request: property name must be a string", id);
                };
                if param_list.len() > if setting { 2 } else { 1 } {
                    return error_reply(2, "Invalid request: too many parameters", id);
                }
                if name != "combined" {
                    return error_reply(0, "Unknown property", id);
                }
                if !setting {
                    return ok_reply(if self.combined { "true" } else { "false" }, id);
                }
                match param_list.get(1) {
                    Some(Value::Bool(b)) => {
                        self.combined = *b;
                        ok_reply("null", id)
                    }
                    _ => error_reply(1, "Invalid value type: expected Boolean", id),
                }
            }
            other => error_reply(
                2,
                &format!(
                    "Invalid request: unknown variant `{other}`, expected one of `SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`"
                ),
                id,
            ),
        }
    }

    /// Subscribes `name` (no-op if already subscribed). A candle closing after `now` gets its
    /// final event.
    fn add(&mut self, name: String, now: i64) {
        if self.subs.contains_key(&name) {
            return;
        }
        let stream = parse_kline_stream(self.market, &name).and_then(|(symbol, period)| {
            let listed = self.shared.listed(self.market, &symbol)?;
            let every_ms = self.settings.update_ms(self.market, period);
            let mut prefix = String::with_capacity(name.len() + 24);
            // A parsed kline stream name holds no character JSON would escape.
            let _ = write!(prefix, "{{\"stream\":\"{name}\",\"data\":");
            Some(KlineStream {
                pair: PairKey {
                    market: self.market,
                    symbol,
                    period,
                },
                listed,
                prefix,
                every_ms,
                next_due: next_grid(now, every_ms),
                cur_open: Some(period.align(now)),
            })
        });
        self.subs.insert(name, stream);
    }

    fn publish_subscriptions(&self) {
        self.shared
            .ws
            .set_subscriptions(self.id, self.subs.keys().cloned().collect());
    }
}

/// Binance accepts integer ids, alphanumeric strings up to 36 characters, and `null`.
fn valid_id(id: &Value) -> bool {
    match id {
        Value::Null => true,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::String(s) => s.len() <= 36 && s.bytes().all(|b| b.is_ascii_alphanumeric()),
        _ => false,
    }
}

/// The stream names of a SUBSCRIBE/UNSUBSCRIBE.
fn stream_names(params: &Value) -> Result<Vec<&str>, &'static str> {
    match params {
        Value::Null => Err("Invalid request: missing field `params`"),
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or("Invalid request: stream names must be strings")
            })
            .collect(),
        _ => Err("Invalid request: params must be an array of stream names"),
    }
}

/// `{"result":<result>,"id":<id>}` (`result` already JSON).
fn ok_reply(result: &str, id: Option<&Value>) -> String {
    let id = id.map_or_else(|| "null".to_string(), Value::to_string);
    format!("{{\"result\":{result},\"id\":{id}}}")
}

/// `{"code":…,"msg":…,"id":…}`, without `id` when it is unknown.
fn error_reply(code: i64, msg: &str, id: Option<&Value>) -> String {
    let msg = Value::String(msg.to_string());
    match id {
        Some(id) => format!("{{\"code\":{code},\"msg\":{msg},\"id\":{id}}}"),
        None => format!("{{\"code\":{code},\"msg\":{msg}}}"),
    }
}

/// One kline event, wrapped for combined connections. Prices and volumes carry the digits the
/// REST endpoint prints for the same candle; `f`/`L` are 0 and trades-1 (-1/-1 without trades).
fn event(st: &KlineStream, k: &Kline, event_ms: i64, combined: bool) -> Message {
    let market = st.pair.market;
    let symbol = st.pair.symbol.as_str();
    let mut out = String::with_capacity(st.prefix.len() + 360);
    if combined {
        out.push_str(&st.prefix);
    }
    let (first, last) = match i64::try_from(k.trades) {
        Ok(0) | Err(_) => (-1, -1),
        Ok(n) => (0, n - 1),
    };
    let _ = write!(
        out,
        "{{\"e\":\"kline\",\"E\":{event_ms},\"s\":\"{symbol}\",\"k\":{{\"t\":{},\"T\":{},\"s\":\"{symbol}\",\"i\":\"{}\",\"f\":{first},\"L\":{last},\"o\":\"",
        k.open_time,
        k.close_time,
        st.pair.period.as_str(),
    );
    write_decimal(&mut out, market, k.open);
    out.push_str("\",\"c\":\"");
    write_decimal(&mut out, market, k.close);
    out.push_str("\",\"h\":\"");
    write_decimal(&mut out, market, k.high);
    out.push_str("\",\"l\":\"");
    write_decimal(&mut out, market, k.low);
    out.push_str("\",\"v\":\"");
    write_decimal(&mut out, market, k.volume);
    let _ = write!(out, "\",\"n\":{},\"x\":{},\"q\":\"", k.trades, k.is_final);
    write_decimal(&mut out, market, k.quote_volume);
    out.push_str("\",\"V\":\"");
    write_decimal(&mut out, market, k.taker_buy_volume);
    out.push_str("\",\"Q\":\"");
    write_decimal(&mut out, market, k.taker_buy_quote_volume);
    out.push_str("\",\"B\":\"0\"}}");
    if combined {
        out.push('}');
    }
    Message::text(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_per_market() {
        let r = route("/spot/ws/btcusdt@kline_1m").unwrap();
        assert_eq!(
            (r.market, r.routed, r.combined, r.path_streams),
            (Market::Spot, false, false, vec!["btcusdt@kline_1m".into()])
        );
        let r = route("/um/market/stream").unwrap();
        assert!(r.routed && r.combined && r.market == Market::Um);
        let r = route("/um/ws/").unwrap();
        assert!(!r.routed && !r.combined && r.path_streams.is_empty());
        assert_eq!(route("/cm/ws").unwrap().market, Market::Cm);
        assert!(route("/cm/market/ws").is_none());
        assert!(route("/api/v3/klines").is_none());
        assert!(route("/spot/wsx").is_none());
        assert!(route("/um/market").is_none());
    }

    #[test]
    fn parses_kline_streams() {
        assert_eq!(
            parse_kline_stream(Market::Spot, "btcusdt@kline_1s"),
            Some(("BTCUSDT".parse().unwrap(), Period::S1))
        );
        assert_eq!(
            parse_kline_stream(Market::Cm, "btcusd_perp@kline_1M"),
            Some(("BTCUSD_PERP".parse().unwrap(), Period::Mo1))
        );
        for bad in [
            "btcusdt@kline_1s@x",
            "BTCUSDT@kline_1m",
            "btcusdt@trade",
            "btcusdt@kline_1m@+08:00",
            "@kline_1m",
        ] {
            assert_eq!(parse_kline_stream(Market::Spot, bad), None, "{bad}");
        }
        assert_eq!(parse_kline_stream(Market::Um, "btcusdt@kline_1s"), None);
    }

    #[test]
    fn replies_and_grid() {
        assert_eq!(
            ok_reply("null", Some(&Value::from(7))),
            r#"{"result":null,"id":7}"#
        );
        assert_eq!(
            error_reply(3, "Invalid JSON: x", None),
            r#"{"code":3,"msg":"Invalid JSON: x"}"#
        );
        assert!(valid_id(&Value::from("abc1")) && !valid_id(&Value::from(1.5)));
        assert!(!valid_id(&Value::from("a-b")));
        assert_eq!(next_grid(1_000, 250), 1_250);
        assert_eq!(next_grid(1_001, 250), 1_250);
    }
}
