//! A faithful Binance simulator (REST klines/exchangeInfo/time/ping for spot, um and cm,
//! data.binance.vision-style archives and WebSocket kline streams) for tests, benchmarks and
//! local runs. Owns the server, its clock, its fault switches and its request log.
//!
//! Behaviour follows `binance-api.md`: per-market pagination (COIN-M anchors at `endTime` and
//! caps ranges at 200 days), request weights and 429 → 418 escalation per client IP, 451/403/5xx
//! faults, maintenance gaps, archive quirks (spot µs timestamps from 2025, futures headers from
//! 2022) and checksums. Candles are [`synthetic`] unless a real CSV series is configured.
//!
//! WebSocket streams live on the same server, one prefix per market (see
//! [`SimHandle::ws_url`]): `/spot/ws[/<stream>]`, `/spot/stream?streams=…`; USD-M on
//! `/um/market/ws…` and `/um/market/stream…` (the unrouted `/um/ws…` and `/um/stream…` accept
//! connections and subscriptions but push no klines, as Binance since 2026-04-23); `/cm/ws…`
//! and `/cm/stream…`. Kline events carry the same candles and digits as REST, pushed at Binance's
//! update speeds, with its control messages, pings, limits and lifetime, plus fault switches
//! (drop all, stall, skip finals).

pub mod cli;
pub mod clock;
pub mod synthetic;

mod archive;
mod book;
mod limiter;
mod rest;
mod ws;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts as _, Request, State};
use axum::http::Method;
use axum::response::{IntoResponse as _, Response};
use axum::Router;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use qs_core::market::{Market, PairKey, Symbol};

pub use book::Maintenance;
pub use clock::{ManualClock, OffsetClock, SimClock};
pub use ws::{WsConnInfo, WsControlRecord};

use archive::ZipCache;
use book::Series;
use limiter::{Budget, Limiter};

/// 2020-01-01T00:00:00Z, when the default spot and um symbols are listed.
pub const DEFAULT_LISTING_MS: i64 = 1_577_836_800_000;
/// 2020-08-10T00:00:00Z, when the default cm perpetuals are listed.
pub const DEFAULT_CM_LISTING_MS: i64 = 1_597_017_600_000;

/// The simulator's data clock (candles, `serverTime`, streams, the request log): the real wall
/// clock, in Unix milliseconds. Rate windows and bans follow [`SimConfig::with_clock`].
pub use qs_core::market::now_ms;

/// What the simulator serves. `Default` is realistic: budgets spot 6000/60 s, um and cm
/// 2400/60 s, 120 s bans, spot BTCUSDT/ETHUSDT/BNBBTC and um BTCUSDT/ETHUSDT listed
/// 2020-01-01, cm BTCUSD_PERP/ETHUSD_PERP listed 2020-08-10; rate windows on the wall clock.
#[derive(Debug, Clone)]
pub struct SimConfig {
    budgets: HashMap<Market, Budget>,
    ban: Duration,
    clock: SimClock,
    listings: BTreeMap<(Market, Symbol), i64>,
    series: HashMap<PairKey, Arc<Series>>,
}

impl Default for SimConfig {
    fn default() -> Self {
        let mut cfg = SimConfig {
            budgets: Market::ALL
                .iter()
                .map(|&m| (m, limiter::default_budget(m)))
                .collect(),
            ban: Duration::from_secs(120),
            clock: SimClock::System,
            listings: BTreeMap::new(),
            series: HashMap::new(),
        };
        for (market, symbol, listed) in [
            (Market::Spot, "BTCUSDT", DEFAULT_LISTING_MS),
            (Market::Spot, "ETHUSDT", DEFAULT_LISTING_MS),
            (Market::Spot, "BNBBTC", DEFAULT_LISTING_MS),
            (Market::Um, "BTCUSDT", DEFAULT_LISTING_MS),
            (Market::Um, "ETHUSDT", DEFAULT_LISTING_MS),
            (Market::Cm, "BTCUSD_PERP", DEFAULT_CM_LISTING_MS),
            (Market::Cm, "ETHUSD_PERP", DEFAULT_CM_LISTING_MS),
        ] {
            cfg = cfg.with_symbol(market, symbol, listed);
        }
        cfg
    }
}

impl SimConfig {
    /// Sets a market's REQUEST_WEIGHT budget (window rounded up to whole seconds, at least 1 s).
    pub fn with_budget(mut self, market: Market, limit: u32, window: Duration) -> Self {
        self.budgets.insert(market, Budget::new(limit, window));
        self
    }

    /// The clock of the rate limiter (weight windows, `Retry-After`, bans); the wall clock by
    /// default. A test keeps a clone of a [`ManualClock`] or [`OffsetClock`] to move it.
    pub fn with_clock(mut self, clock: SimClock) -> Self {
        self.clock = clock;
        self
    }

    /// How long an IP stays banned (418) after ignoring 429s.
    pub fn with_ban_duration(mut self, ban: Duration) -> Self {
        self.ban = ban;
        self
    }

    /// Serves a real klines CSV (12 columns, optional header, ms or µs times) for `pair`
    /// instead of synthetic candles. The pair starts at the first row; rows missing inside the
    /// file are gaps; after the last row synthetic candles continue. Lists the symbol if needed
    /// (from the first row).
    pub fn with_csv_series(mut self, pair: PairKey, path: &Path) -> std::io::Result<Self> {
        let series = Series::load(&pair, path)?;
        let key = (pair.market, pair.symbol.clone());
        let first = series.first();
        let listed = self.listings.get(&key).map_or(first, |&l| l.min(first));
        self.listings.insert(key, listed);
        self.series.insert(pair, Arc::new(series));
        Ok(self)
    }

    /// Lists (or re-lists) `symbol` on `market` with its first candle at `listed_ms`.
    /// An invalid symbol is logged and ignored.
    pub fn with_symbol(mut self, market: Market, symbol: &str, listed_ms: i64) -> Self {
        match symbol.parse::<Symbol>() {
            Ok(s) => {
                self.listings.insert((market, s), listed_ms);
            }
            Err(error) => tracing::warn!(%market, %error, "Ignoring simulator symbol."),
        }
        self
    }
}

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Arrival time, Unix ms.
    pub at_ms: i64,
    pub peer: IpAddr,
    /// The market of a REST or archive path; `None` for anything else.
    pub market: Option<Market>,
    pub kind: RequestKind,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (empty if none).
    pub query: String,
    pub status: u16,
    /// Weight charged (0 for refused, faulted, archive and WebSocket requests).
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Rest,
    Archive,
    /// A request on a WebSocket path (101 when upgraded).
    Ws,
    Other,
}

/// Fault switches, changeable while the simulator runs.
#[derive(Debug, Clone)]
pub(crate) struct Faults {
    pub deny_451: Vec<IpAddr>,
    pub forbid_403: bool,
    pub fail_5xx: u32,
    pub maintenance: Vec<Maintenance>,
    pub bad_checksum: bool,
    pub archives_available: bool,
    /// At most this many klines per reply, whatever `limit` asks (a stricter stand-in).
    pub page_cap: Option<usize>,
    /// Closed candles younger than this are not served yet (Binance's database lag).
    pub lag_ms: i64,
    /// Send no `X-MBX-USED-WEIGHT-*` and no `Retry-After` headers.
    pub no_weight_headers: bool,
}

/// Most requests kept in the log; older ones are dropped (status counts stay exact).
const LOG_CAP: usize = 250_000;

#[derive(Debug, Default)]
struct RequestLog {
    records: VecDeque<RequestRecord>,
    by_status: HashMap<u16, usize>,
}

/// State shared by the server and the handles.
pub(crate) struct Shared {
    pub listings: BTreeMap<(Market, Symbol), i64>,
    pub series: HashMap<PairKey, Arc<Series>>,
    pub faults: Mutex<Faults>,
    pub limiter: Mutex<Limiter>,
    /// The limiter's clock.
    pub clock: SimClock,
    pub zips: Mutex<ZipCache>,
    pub ws: ws::WsHub,
    log: Mutex<RequestLog>,
}

/// Locks a mutex, recovering the data if another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// 503 fault: consumes one of the "next N requests fail" if any are left.
    pub(crate) fn take_5xx(&self) -> bool {
        let mut f = lock(&self.faults);
        if f.fail_5xx > 0 {
            f.fail_5xx -= 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn maintenance(&self) -> Vec<Maintenance> {
        lock(&self.faults).maintenance.clone()
    }

    pub(crate) fn listed(&self, market: Market, symbol: &Symbol) -> Option<i64> {
        self.listings.get(&(market, symbol.clone())).copied()
    }
}

/// A running simulator. Clones share it; it stops on [`SimHandle::shutdown`] or when the last
/// clone is dropped.
#[derive(Clone)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    life: Arc<Life>,
}

struct Life {
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Life {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts the simulator on `listen` (port 0 picks a free port).
pub async fn start(cfg: SimConfig, listen: SocketAddr) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared {
        listings: cfg.listings,
        series: cfg.series,
        faults: Mutex::new(Faults {
            deny_451: Vec::new(),
            forbid_403: false,
            fail_5xx: 0,
            maintenance: Vec::new(),
            bad_checksum: false,
            archives_available: true,
            page_cap: None,
            lag_ms: 0,
            no_weight_headers: false,
        }),
        limiter: Mutex::new(Limiter::new(cfg.budgets, cfg.ban)),
        clock: cfg.clock,
        zips: Mutex::new(ZipCache::default()),
        ws: ws::WsHub::new(cancel.clone()),
        log: Mutex::new(RequestLog::default()),
    });
    let app = Router::new().fallback(dispatch).with_state(shared.clone());
    let stop = cancel.clone();
    let task = tokio::spawn(async move {
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
        if let Err(error) = served {
            tracing::warn!(%error, "Simulator server stopped with an error.");
        }
    });
    tracing::info!(%addr, "Binance simulator listening.");
    Ok(SimHandle {
        addr,
        shared,
        life: Arc::new(Life {
            cancel,
            task: Mutex::new(Some(task)),
        }),
    })
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The klines URL of `market`, e.g. `http://127.0.0.1:9090/api/v3/klines`.
    pub fn rest_url(&self, market: Market) -> String {
        format!("http://{}{}/klines", self.addr, market.rest_prefix())
    }

    /// The REST base of `market`, e.g. `http://127.0.0.1:9090/fapi/v1`.
    pub fn rest_base(&self, market: Market) -> String {
        format!("http://{}{}", self.addr, market.rest_prefix())
    }

    /// The archive host: files live below `{archive_url}/data/...`.
    pub fn archive_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The raw-stream WebSocket base of `market` as a client config holds it:
    /// `ws://ADDR/spot/ws/`, `ws://ADDR/um/market/ws/` or `ws://ADDR/cm/ws/`. Append a stream
    /// name for a raw connection; replace the trailing `ws/` with `stream` for combined ones.
    pub fn ws_url(&self, market: Market) -> String {
        let path = match market {
            Market::Spot => "spot/ws/",
            Market::Um => "um/market/ws/",
            Market::Cm => "cm/ws/",
        };
        format!("ws://{}/{path}", self.addr)
    }

    /// Pushes every kline stream every `every` instead of Binance's speeds (spot 2000 ms, spot
    /// `1s` 1000 ms, futures 250 ms); `None` restores them. Applies to open connections too.
    pub fn set_ws_update_interval(&self, every: Option<Duration>) {
        self.shared.ws.update(|s| s.update_interval = every);
    }

    /// Server ping interval for every market (Binance: spot 20 s, futures 180 s). The WebSocket
    /// durations set here are kept within 1 ms and 30 days.
    pub fn set_ws_ping_interval(&self, every: Duration) {
        self.shared.ws.update(|s| s.ping_interval = Some(every));
    }

    /// How long a ping may stay unanswered before the server closes the connection (Binance:
    /// spot 60 s, futures 600 s). Only a pong echoing a ping's payload answers it.
    pub fn set_ws_pong_deadline(&self, deadline: Duration) {
        self.shared.ws.update(|s| s.pong_deadline = Some(deadline));
    }

    /// Connections are closed (close frame 1001) this long after they opened (Binance: 24 h).
    pub fn set_ws_max_lifetime(&self, lifetime: Duration) {
        self.shared.ws.update(|s| s.max_lifetime = Some(lifetime));
    }

    /// Drops every open WebSocket connection abruptly (TCP close, no close frame).
    pub fn ws_drop_all(&self) {
        self.shared.ws.drop_all();
    }

    /// While on, no kline event is sent on any connection (pings and control replies go on);
    /// candles that close meanwhile are never pushed.
    pub fn set_ws_stall(&self, on: bool) {
        self.shared.ws.update(|s| s.stall = on);
    }

    /// While on, final (`x: true`) kline events are not sent; in-progress ones still are.
    /// Candles that close meanwhile never get their final event.
    pub fn set_ws_skip_finals(&self, on: bool) {
        self.shared.ws.update(|s| s.skip_finals = on);
    }

    /// WebSocket connections accepted on `market` since start.
    pub fn ws_connections_opened(&self, market: Market) -> usize {
        self.shared.ws.opened(market)
    }

    /// The open WebSocket connections, by id.
    pub fn ws_open_connections(&self) -> Vec<WsConnInfo> {
        self.shared.ws.open_connections()
    }

    /// Every control message received (the newest 100,000), oldest first.
    pub fn ws_control_log(&self) -> Vec<WsControlRecord> {
        self.shared.ws.control_log()
    }

    /// Connections closed for sending more than 5 (spot) / 10 (futures) messages per second.
    pub fn ws_closed_for_rate(&self) -> usize {
        self.shared.ws.closed_for_rate()
    }

    /// Final (`x: true`) kline events sent since start.
    pub fn ws_finals_sent(&self) -> u64 {
        self.shared.ws.finals_sent()
    }

    /// Bans `ip` (418 with Retry-After on every REST request) for `for_`.
    pub fn ban_ip(&self, ip: IpAddr, for_: Duration) {
        let until = self
            .shared
            .clock
            .now_ms()
            .saturating_add(i64::try_from(for_.as_millis()).unwrap_or(i64::MAX));
        lock(&self.shared.limiter).ban_ip(ip, until);
    }

    /// Answers 451 (restricted location) to REST requests from these client IPs.
    pub fn set_deny_451(&self, ips: Vec<IpAddr>) {
        lock(&self.shared.faults).deny_451 = ips;
    }

    /// Answers 403 (WAF) to every REST request while set.
    pub fn set_forbid_403(&self, on: bool) {
        lock(&self.shared.faults).forbid_403 = on;
    }

    /// The next `n` requests (REST or archive) answer 503.
    pub fn fail_next_5xx(&self, n: u32) {
        lock(&self.shared.faults).fail_5xx = n;
    }

    /// Ban length for future bans.
    pub fn set_ban_duration(&self, ban: Duration) {
        lock(&self.shared.limiter).set_ban(ban);
    }

    /// Lifts every current ban.
    pub fn clear_bans(&self) {
        lock(&self.shared.limiter).clear_bans();
    }

    /// Changes a market's budget; resets that market's current windows.
    pub fn set_budget(&self, market: Market, limit: u32, window: Duration) {
        lock(&self.shared.limiter).set_budget(market, Budget::new(limit, window));
    }

    /// No candle lying entirely in `[start_ms, end_ms)` exists (REST and archives) for `symbol`
    /// on `market`, or for every symbol of the market when `symbol` is `None`.
    pub fn add_maintenance(
        &self,
        market: Market,
        symbol: Option<Symbol>,
        start_ms: i64,
        end_ms: i64,
    ) {
        lock(&self.shared.faults).maintenance.push(Maintenance {
            market,
            symbol,
            start_ms,
            end_ms,
        });
        lock(&self.shared.zips).clear();
    }

    /// Removes every maintenance window.
    pub fn clear_maintenance(&self) {
        lock(&self.shared.faults).maintenance.clear();
        lock(&self.shared.zips).clear();
    }

    /// Serves wrong `.CHECKSUM` contents for every archive file while set.
    pub fn set_bad_checksum(&self, on: bool) {
        lock(&self.shared.faults).bad_checksum = on;
    }

    /// When false, every archive request answers 404.
    pub fn set_archives_available(&self, on: bool) {
        lock(&self.shared.faults).archives_available = on;
    }

    /// Serve at most `cap` klines per reply, whatever `limit` asks (`None`: no cap).
    pub fn set_page_cap(&self, cap: Option<usize>) {
        lock(&self.shared.faults).page_cap = cap;
    }

    /// Hide closed candles that closed less than `lag` ago (Binance's database lag).
    pub fn set_lag(&self, lag: Duration) {
        lock(&self.shared.faults).lag_ms = i64::try_from(lag.as_millis()).unwrap_or(i64::MAX);
    }

    /// Send no weight headers and no `Retry-After` (a terser stand-in).
    pub fn set_no_weight_headers(&self, on: bool) {
        lock(&self.shared.faults).no_weight_headers = on;
    }

    /// Count weight over a rolling window instead of fixed epoch-aligned windows.
    pub fn set_rolling_window(&self, on: bool) {
        lock(&self.shared.limiter).set_rolling(on);
    }

    /// Every request so far (the newest 250,000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).records.iter().cloned().collect()
    }

    /// How many responses had `status` (exact, never truncated).
    pub fn count_status(&self, status: u16) -> usize {
        lock(&self.shared.log)
            .by_status
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    /// Weight `peer` has used on `market` in the current window.
    pub fn used_weight(&self, market: Market, peer: IpAddr) -> u32 {
        lock(&self.shared.limiter).used(market, peer, self.shared.clock.now_ms())
    }

    /// Stops the server and waits (up to 5 s) for it to finish.
    pub async fn shutdown(self) {
        self.life.cancel.cancel();
        let task = lock(&self.life.task).take();
        if let Some(mut task) = task {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

/// The one handler: routes by path, records the request.
async fn dispatch(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let now = now_ms();
    let ip = peer.ip().to_canonical();
    let (mut parts, _body) = request.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let ws_route = if method == Method::GET {
        ws::route(&path)
    } else {
        None
    };
    let (response, market, kind, weight) = if method != Method::GET && method != Method::HEAD {
        (
            plain(405, "Method Not Allowed"),
            None,
            RequestKind::Other,
            0,
        )
    } else if let Some(route) = ws_route {
        let market = route.market;
        let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .map_err(|rejection| rejection.into_response());
        let resp = ws::accept(&shared, route, &query, upgrade, now);
        (resp, Some(market), RequestKind::Ws, 0)
    } else if let Some(rest) = path.strip_prefix("/data/") {
        let shared = shared.clone();
        let rest = rest.to_string();
        // Zips are built on a blocking thread: big files take a while.
        let served = tokio::task::spawn_blocking(move || archive::serve(&shared, &rest, now)).await;
        match served {
            Ok((resp, market)) => (resp, market, RequestKind::Archive, 0),
            Err(error) => {
                tracing::warn!(%error, "Archive task failed.");
                (
                    plain(500, "Internal Server Error"),
                    None,
                    RequestKind::Archive,
                    0,
                )
            }
        }
    } else if let Some((market, endpoint)) = rest::route(&path) {
        let (mut resp, weight) =
            rest::serve(&shared, market, endpoint, &query, &parts.headers, ip, now);
        if lock(&shared.faults).no_weight_headers {
            let names: Vec<_> = resp
                .headers()
                .keys()
                .filter(|n| {
                    n.as_str().starts_with("x-mbx-used-weight") || n.as_str() == "retry-after"
                })
                .cloned()
                .collect();
            for n in names {
                resp.headers_mut().remove(n);
            }
        }
        (resp, Some(market), RequestKind::Rest, weight)
    } else {
        (plain(404, "Not Found"), None, RequestKind::Other, 0)
    };
    let status = response.status().as_u16();
    tracing::debug!(%ip, %path, %query, status, weight, "Simulator request.");
    let mut log = lock(&shared.log);
    *log.by_status.entry(status).or_default() += 1;
    if log.records.len() >= LOG_CAP {
        log.records.pop_front();
    }
    log.records.push_back(RequestRecord {
        at_ms: now,
        peer: ip,
        market,
        kind,
        path,
        query,
        status,
        weight,
    });
    response
}

/// A plain-text response.
pub(crate) fn plain(status: u16, text: &str) -> Response {
    let mut resp = Response::new(Body::from(text.to_string()));
    *resp.status_mut() = axum::http::StatusCode::from_u16(status)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
