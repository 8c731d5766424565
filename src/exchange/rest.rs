//! Binance REST client for spot, USD-M and COIN-M: klines with each market's own rules,
//! `exchangeInfo` (symbol status, onboard dates, the REQUEST_WEIGHT budget), server time and
//! the first available candle. Every request goes out through an egress the pool picks and the
//! rate governor of its (market, egress). What an answer means is the pure [`classify`]: 5xx
//! and network errors are retried with jittered backoff, 429/418 are waited out, 403/451 block
//! the egress, other rejections (-1121 unknown symbol, -1120 unknown interval) are permanent.
//! Not here: choosing and health-checking egresses (`egress`), deciding what to fetch (tasks).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::egress::{Egress, ProxyPool};
use super::governor::{Budget, Governor, GovernorStats, Governors};
use super::ExchangeError;
use crate::config::Config;
use crate::market::{now_ms, Kline, Market, PairKey, Period, Source, CM_MAX_RANGE_MS};

/// The egress name of direct connections (each proxy's is its `host:port`).
pub use super::egress::DIRECT;

/// How long a proxy that failed to connect (down, refused auth) stays out of rotation before
/// it is tried again (its health checks may bring it back sooner).
const PROXY_QUARANTINE: Duration = Duration::from_secs(60);

/// How long an `exchangeInfo` answer is trusted.
const EXCHANGE_INFO_TTL: Duration = Duration::from_secs(3600);

/// Request counters (for summaries and the metrics line).
#[derive(Debug, Default)]
pub struct RestStats {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

impl RestStats {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// One symbol in `exchangeInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolInfo {
    /// `status` (spot, um) or `contractStatus` (cm), e.g. `TRADING`, `BREAK`.
    pub status: String,
    /// Futures only: when the contract was listed (ms).
    pub onboard_ms: Option<i64>,
}

/// The parts of `exchangeInfo` QuantService uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeInfo {
    pub weight_budget: Option<Budget>,
    pub symbols: HashMap<String, SymbolInfo>,
}

/// Klines as returned by one request, with the server time they were judged against.
#[derive(Debug, Clone)]
pub struct KlinePage {
    pub rows: Vec<Kline>,
    /// Estimated server time when the reply arrived; rows closing at or after it are not final.
    pub server_now: i64,
}

pub struct RestClient {
    pool: Arc<ProxyPool>,
    bases: HashMap<Market, String>,
    governors: Arc<Governors>,
    max_retries: u32,
    stats: Arc<RestStats>,
    /// server time − local time, per market, once measured, and when.
    offsets: Mutex<HashMap<Market, i64>>,
    measured: Mutex<HashMap<Market, Instant>>,
    /// First candle per spot/um pair (a fact that never changes once known).
    firsts: Mutex<HashMap<PairKey, i64>>,
    /// Single flight: a thousand tasks starting at once wait for one `exchangeInfo` (or one
    /// `time`) request instead of sending a thousand.
    info_flight: [tokio::sync::Mutex<()>; 3],
    time_flight: [tokio::sync::Mutex<()>; 3],
    infos: Mutex<HashMap<Market, (Instant, Arc<ExchangeInfo>)>>,
    /// Per market: whether replies carry `X-MBX-USED-WEIGHT-*` (`None`: no reply yet).
    weight_headers: Mutex<HashMap<Market, bool>>,
}

impl RestClient {
    /// A client with its own egress pool (direct only until declared proxies are applied to
    /// it, see [`RestClient::pool`]).
    pub fn new(cfg: &Config, governors: Arc<Governors>) -> Result<RestClient, ExchangeError> {
        let pool = Arc::new(ProxyPool::new(cfg, governors)?);
        RestClient::with_pool(cfg, pool)
    }

    /// A client sending through `pool` (shared with the health checks and the operator).
    pub fn with_pool(cfg: &Config, pool: Arc<ProxyPool>) -> Result<RestClient, ExchangeError> {
        let governors = pool.governors().clone();
        let bases = Market::ALL
            .into_iter()
            .map(|m| (m, cfg.binance.market(m).rest_base().to_string()))
            .collect();
        Ok(RestClient {
            pool,
            bases,
            governors,
            max_retries: cfg.backfill.max_retries,
            stats: Arc::new(RestStats::default()),
            offsets: Mutex::new(HashMap::new()),
            measured: Mutex::new(HashMap::new()),
            firsts: Mutex::new(HashMap::new()),
            info_flight: Default::default(),
            time_flight: Default::default(),
            infos: Mutex::new(HashMap::new()),
            weight_headers: Mutex::new(HashMap::new()),
        })
    }

    pub fn stats(&self) -> &RestStats {
        &self.stats
    }

    /// The governor of the direct egress.
    pub fn governor(&self, market: Market) -> Arc<Governor> {
        self.governors.get(market, DIRECT)
    }

    pub fn pool(&self) -> &Arc<ProxyPool> {
        &self.pool
    }

    /// Governor counters of `market` summed over every egress (direct and proxies).
    pub fn governor_stats(&self, market: Market) -> GovernorStats {
        let mut sum = GovernorStats::default();
        for e in self.pool.all() {
            let s = self.governors.get(market, &e.name).stats();
            sum.weight += s.weight;
            sum.http_429 += s.http_429;
            sum.http_418 += s.http_418;
            sum.waits += s.waits;
        }
        sum
    }

    fn url(&self, market: Market, endpoint: &str) -> String {
        let base = self.bases.get(&market).map_or("", String::as_str);
        format!("{base}/{endpoint}")
    }

    /// `exchangeInfo` of `market` (cached for an hour); also adopts its weight budget.
    pub async fn exchange_info(&self, market: Market) -> Result<Arc<ExchangeInfo>, ExchangeError> {
        if let Some(info) = self.cached_info(market) {
            return Ok(info);
        }
        let _flight = self.info_flight[market_index(market)].lock().await;
        // Someone else may have fetched it while we waited.
        if let Some(info) = self.cached_info(market) {
            return Ok(info);
        }
        let url = self.url(market, "exchangeInfo");
        let v = self
            .get_json(market, &url, &[], market.exchange_info_weight())
            .await?;
        let info =
            Arc::new(
                parse_exchange_info(market, &v).map_err(|msg| ExchangeError::Protocol {
                    url: url.clone(),
                    msg,
                })?,
            );
        if let Some(budget) = info.weight_budget {
            self.governors.adopt(market, budget);
        }
        self.infos
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(market, (Instant::now(), info.clone()));
        Ok(info)
    }

    /// The symbol's `exchangeInfo` entry, or `InvalidSymbol`.
    pub async fn symbol_info(&self, pair: &PairKey) -> Result<SymbolInfo, ExchangeError> {
        let info = self.exchange_info(pair.market).await?;
        info.symbols
            .get(pair.symbol.as_str())
            .cloned()
            .ok_or_else(|| ExchangeError::InvalidSymbol {
                market: pair.market,
                symbol: pair.symbol.to_string(),
                msg: "not listed in exchangeInfo".to_string(),
            })
    }

    fn cached_info(&self, market: Market) -> Option<Arc<ExchangeInfo>> {
        self.infos
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&market)
            .filter(|(at, _)| at.elapsed() < EXCHANGE_INFO_TTL)
            .map(|(_, info)| info.clone())
    }

    /// Server time (ms) of `market`; also records the clock offset used to judge open candles.
    pub async fn server_time(&self, market: Market) -> Result<i64, ExchangeError> {
        let url = self.url(market, "time");
        let before = now_ms();
        let v = self.get_json(market, &url, &[], 1).await?;
        let after = now_ms();
        let server =
            v.get("serverTime")
                .and_then(Value::as_i64)
                .ok_or_else(|| ExchangeError::Protocol {
                    url,
                    msg: "no serverTime".to_string(),
                })?;
        let offset = server - (before + after) / 2;
        self.offsets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(market, offset);
        self.measured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(market, Instant::now());
        Ok(server)
    }

    /// Server time, asking the exchange only when the clock offset is older than `max_age`
    /// (live healing runs often; the offset drifts slowly).
    pub async fn server_time_within(
        &self,
        market: Market,
        max_age: Duration,
    ) -> Result<i64, ExchangeError> {
        let fresh = || {
            self.measured
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&market)
                .is_some_and(|t| t.elapsed() < max_age)
        };
        if fresh() {
            return Ok(self.server_now(market));
        }
        let _flight = self.time_flight[market_index(market)].lock().await;
        if fresh() {
            Ok(self.server_now(market))
        } else {
            self.server_time(market).await
        }
    }

    /// Estimated server time now (local time plus the measured offset, 0 if never measured).
    pub fn server_now(&self, market: Market) -> i64 {
        let offset = self
            .offsets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&market)
            .copied()
            .unwrap_or(0);
        now_ms() + offset
    }

    /// The open time of the pair's first candle (on COIN-M: the first at or after `from` and
    /// before `to`), or `None` if Binance has none. spot/um: `startTime=0&limit=1`; cm: from
    /// `onboardDate` (the startTime=0 trick fails there with -4088), probing windows small
    /// enough that one page holds them whole (COIN-M anchors pages at endTime).
    pub async fn first_open_time(
        &self,
        pair: &PairKey,
        from: i64,
        to: i64,
    ) -> Result<Option<i64>, ExchangeError> {
        match pair.market {
            Market::Spot | Market::Um => {
                let known = self
                    .firsts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(pair)
                    .copied();
                if known.is_some() {
                    return Ok(known);
                }
                let page = self.klines(pair, Some(0), None, 1).await?;
                let first = page.rows.first().map(|k| k.open_time);
                if let Some(f) = first {
                    self.firsts
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(pair.clone(), f);
                }
                Ok(first)
            }
            Market::Cm => {
                let info = self.symbol_info(pair).await?;
                // Without onboardDate (some stand-ins omit it), probe from `from`.
                let lower = info.onboard_ms.map_or(from, |o| o.max(from));
                let now = self.server_now(pair.market);
                let limit = pair.market.max_klines_limit();
                let span = pair
                    .period
                    .fixed_ms()
                    .map_or(CM_MAX_RANGE_MS, |len| len * i64::from(limit))
                    .min(CM_MAX_RANGE_MS);
                let mut start = pair.period.align(lower.max(0));
                let stop = to.min(now);
                while start < stop {
                    let end = (start + span - 1).min(now);
                    let page = self.klines(pair, Some(start), Some(end), limit).await?;
                    if let Some(first) = page.rows.iter().map(|k| k.open_time).min() {
                        return Ok(Some(first));
                    }
                    start = end + 1;
                }
                Ok(None)
            }
        }
    }

    /// One klines request. Rows whose close time is not before the server's now are marked
    /// not final (the in-progress candle).
    pub async fn klines(
        &self,
        pair: &PairKey,
        start: Option<i64>,
        end: Option<i64>,
        limit: u32,
    ) -> Result<KlinePage, ExchangeError> {
        let limit = limit.clamp(1, pair.market.max_klines_limit());
        let url = self.url(pair.market, "klines");
        let mut query = vec![
            ("symbol", pair.symbol.to_string()),
            ("interval", pair.period.to_string()),
            ("limit", limit.to_string()),
        ];
        if let Some(s) = start {
            query.push(("startTime", s.to_string()));
        }
        if let Some(e) = end {
            query.push(("endTime", e.to_string()));
        }
        let v = match self
            .get_json(pair.market, &url, &query, pair.market.klines_weight(limit))
            .await
        {
            Err(ExchangeError::Rejected {
                code: -1121, msg, ..
            }) => {
                return Err(ExchangeError::InvalidSymbol {
                    market: pair.market,
                    symbol: pair.symbol.to_string(),
                    msg,
                })
            }
            Err(ExchangeError::Rejected {
                code: -1120, msg, ..
            }) => {
                return Err(ExchangeError::InvalidInterval {
                    market: pair.market,
                    period: pair.period.to_string(),
                    msg,
                })
            }
            other => other?,
        };
        let server_now = self.server_now(pair.market);
        let rows = parse_klines(pair, &v, server_now)
            .map_err(|msg| ExchangeError::Protocol { url, msg })?;
        Ok(KlinePage { rows, server_now })
    }

    /// GET through the egress pool and its governors, with retries. Returns the parsed JSON
    /// body of a 200. A proxy that fails (connect, auth, 403/451, 418) is quarantined and the
    /// request is retried through another egress.
    async fn get_json(
        &self,
        market: Market,
        url: &str,
        query: &[(&str, String)],
        weight: u32,
    ) -> Result<Value, ExchangeError> {
        let mut failures: u32 = 0;
        let mut limited: u32 = 0;
        let mut exclude: HashSet<String> = HashSet::new();
        loop {
            let egress = self
                .pool
                .pick(market, &exclude, |reason, wait| {
                    warn!(%market, %reason, ?wait, "No usable egress; waiting.");
                })
                .await?;
            let gov = self.governors.get(market, &egress.name);
            let permit = match gov.acquire(weight).await {
                Ok(p) => p,
                Err(e) => {
                    // Blocked (403/451) for a while: another egress, or a bounded wait in
                    // `pick` that says why.
                    exclude.insert(egress.name.clone());
                    debug!(egress = %egress.name, error = %e, "Egress blocked; trying another.");
                    continue;
                }
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            crate::metrics::rest_sent(market.as_str(), &egress.name);
            let sent = egress.http.get(url).query(query).send().await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    if egress.is_proxy() && e.is_connect() {
                        // The proxy itself failed (down, refused auth, unreachable):
                        // quarantine it and go elsewhere at once.
                        let why = format!("proxy failed: {}", crate::error_chain(&e));
                        egress.record(false, Some(&why));
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::rest_failed(market.as_str(), &egress.name);
                        self.quarantine(&egress, PROXY_QUARANTINE, &why, false);
                        exclude.insert(egress.name.clone());
                        continue;
                    }
                    egress.record(false, Some(&crate::error_chain(&e)));
                    self.network_failure(market, &egress, &mut failures, url, &e)
                        .await?;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let used = used_weight(&headers);
            if let Some(used) = used {
                gov.observe_used(&permit, used);
            }
            // The first reply tells whether this exchange reports used weight; if it does not,
            // what was used before we started is unknown: give up the first window.
            let first_reply = self
                .weight_headers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(market, used.is_some())
                .is_none();
            if first_reply && used.is_none() {
                gov.assume_used_up();
            }
            let body = match read_capped(resp, MAX_BODY_BYTES).await {
                Ok(b) => b,
                Err(e) => {
                    egress.record(false, Some(&crate::error_chain(&e)));
                    self.network_failure(market, &egress, &mut failures, url, &e)
                        .await?;
                    continue;
                }
            };
            let answer = classify(status, &headers, &body);
            if status != 200 {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                crate::metrics::rest_failed(market.as_str(), &egress.name);
                egress.record(false, Some(&format!("HTTP {status}: {}", answer.msg())));
            }
            match answer {
                Answer::Ok(v) => {
                    self.count_ok(market, &egress);
                    return Ok(v);
                }
                // A 200 counts as answered even when its body is unreadable.
                Answer::Malformed(msg) => {
                    self.count_ok(market, &egress);
                    return Err(ExchangeError::Protocol {
                        url: url.to_string(),
                        msg,
                    });
                }
                Answer::RateLimited {
                    retry_after,
                    limit,
                    msg,
                } => {
                    // The budget the message announced, when exchangeInfo did not.
                    if let Some(limit) = limit {
                        let mut budget = gov.budget();
                        if budget.limit > limit {
                            budget.limit = limit;
                            self.governors.adopt(market, budget);
                        }
                    }
                    gov.on_429(retry_after);
                    self.limited(&mut limited, url, status, msg)?;
                }
                Answer::Banned { ban, msg } => {
                    let until = match ban {
                        Ban::For(d) => Some(d),
                        Ban::UntilMs(t) => Some(Duration::from_millis(
                            u64::try_from(t - self.server_now(market)).unwrap_or(0),
                        )),
                        Ban::Unknown => None,
                    };
                    gov.on_418(until);
                    if egress.is_proxy() {
                        // Banned: out of rotation for the ban's length; others carry on.
                        self.quarantine(
                            &egress,
                            until.unwrap_or(Duration::from_secs(120)),
                            &format!("HTTP 418 (banned): {msg}"),
                            true,
                        );
                        exclude.insert(egress.name.clone());
                    }
                    self.limited(&mut limited, url, status, msg)?;
                }
                Answer::Refused { block, msg } => {
                    let why = format!("HTTP {status} through {}: {msg}", egress.name);
                    gov.on_blocked(status, block, msg);
                    if egress.is_proxy() {
                        self.quarantine(&egress, block, &why, false);
                    }
                    // Another egress may be allowed; if none is, `pick` says why.
                    exclude.insert(egress.name.clone());
                }
                Answer::Retry { retry_after, msg } => {
                    failures += 1;
                    if failures >= self.max_retries {
                        return Err(ExchangeError::Server {
                            url: url.to_string(),
                            status,
                            attempts: failures,
                            msg,
                        });
                    }
                    // A 503 may say when to come back.
                    if let Some(wait) = retry_after {
                        tokio::time::sleep(wait.min(Duration::from_secs(300))).await;
                    }
                    self.pause(failures, url, &msg).await;
                }
                Answer::Rejected { code, msg } => {
                    return Err(ExchangeError::Rejected {
                        url: url.to_string(),
                        status,
                        code,
                        msg,
                    })
                }
            }
        }
    }

    fn count_ok(&self, market: Market, egress: &Egress) {
        egress.record(true, None);
        self.stats.ok.fetch_add(1, Ordering::Relaxed);
        crate::metrics::rest_ok(market.as_str(), &egress.name);
    }

    /// Counts one 429/418 answer; gives up after 4 × `max_retries` of them.
    fn limited(
        &self,
        limited: &mut u32,
        url: &str,
        status: u16,
        msg: String,
    ) -> Result<(), ExchangeError> {
        *limited += 1;
        if *limited > self.max_retries.saturating_mul(4) {
            return Err(ExchangeError::Server {
                url: url.to_string(),
                status,
                attempts: *limited,
                msg,
            });
        }
        Ok(())
    }

    /// Takes `egress` out of rotation for `for_` (`ban`: a 418, not even health-checked until
    /// it ends) and logs it.
    fn quarantine(&self, egress: &Egress, for_: Duration, reason: &str, ban: bool) {
        if ban {
            self.pool.ban(egress, for_, reason);
        } else {
            self.pool.quarantine(egress, for_, reason);
        }
        warn!(egress = %egress.name, ?for_, %reason, "Egress quarantined.");
    }

    /// Counts a transport failure; waits before the next attempt, or gives up after
    /// `max_retries`.
    async fn network_failure(
        &self,
        market: Market,
        egress: &Egress,
        failures: &mut u32,
        url: &str,
        e: &reqwest::Error,
    ) -> Result<(), ExchangeError> {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        crate::metrics::rest_failed(market.as_str(), &egress.name);
        *failures += 1;
        let msg = crate::error_chain(e);
        if *failures >= self.max_retries {
            return Err(ExchangeError::Network {
                url: url.to_string(),
                attempts: *failures,
                msg,
            });
        }
        self.pause(*failures, url, &msg).await;
        Ok(())
    }

    async fn pause(&self, failures: u32, url: &str, msg: &str) {
        let delay = crate::backoff::delay(
            failures - 1,
            Duration::from_millis(500),
            Duration::from_secs(30),
            &mut rand::rng(),
        );
        warn!(%url, attempt = failures, retry_in = ?delay, error = %msg,
            "Binance request failed; retrying.");
        tokio::time::sleep(delay).await;
    }
}

/// Position of `market` in `Market::ALL` (per-market arrays).
fn market_index(market: Market) -> usize {
    match market {
        Market::Spot => 0,
        Market::Um => 1,
        Market::Cm => 2,
    }
}

/// What an HTTP answer from Binance means: the policy of [`RestClient::get_json`], as a pure
/// function of the status, the headers and the body.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 200 with a JSON body.
    Ok(Value),
    /// 200 whose body is not JSON.
    Malformed(String),
    /// 429: too much weight; wait `retry_after` (if given). `limit` is the budget Binance's
    /// -1003 message announced ("current limit is N request weight per ..."), if it did.
    RateLimited {
        retry_after: Option<Duration>,
        limit: Option<u32>,
        msg: String,
    },
    /// 418: this address is banned.
    Banned { ban: Ban, msg: String },
    /// 403 (Binance's firewall, usually minutes) or 451 (restricted location, lasting): this
    /// egress is refused for `block`; another may be allowed.
    Refused { block: Duration, msg: String },
    /// 408 or 5xx: worth retrying, after `retry_after` if the server said (a 503 may).
    Retry {
        retry_after: Option<Duration>,
        msg: String,
    },
    /// Anything else (other 4xx, other 2xx): permanent, with Binance's error code (0 if none),
    /// e.g. -1121 invalid symbol, -1120 invalid interval.
    Rejected { code: i64, msg: String },
}

/// How long a 418 ban lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ban {
    /// `Retry-After`.
    For(Duration),
    /// Without `Retry-After`: the end in Binance's -1003 message ("IP banned until <ms>"),
    /// server time.
    UntilMs(i64),
    /// Not said.
    Unknown,
}

impl Answer {
    /// Binance's message (or the start of the body); empty for [`Answer::Ok`].
    pub fn msg(&self) -> &str {
        match self {
            Answer::Ok(_) => "",
            Answer::Malformed(msg)
            | Answer::RateLimited { msg, .. }
            | Answer::Banned { msg, .. }
            | Answer::Refused { msg, .. }
            | Answer::Retry { msg, .. }
            | Answer::Rejected { msg, .. } => msg,
        }
    }
}

/// Classifies one answer (see [`Answer`]).
pub fn classify(status: u16, headers: &reqwest::header::HeaderMap, body: &str) -> Answer {
    if status == 200 {
        return match serde_json::from_str(body) {
            Ok(v) => Answer::Ok(v),
            Err(e) => Answer::Malformed(format!("invalid JSON: {e}")),
        };
    }
    let retry_after = retry_after(headers);
    let (code, msg) = binance_error(body);
    match status {
        429 => Answer::RateLimited {
            retry_after,
            limit: current_limit(&msg),
            msg,
        },
        418 => {
            let ban = match (retry_after, banned_until(&msg)) {
                (Some(d), _) => Ban::For(d),
                (None, Some(t)) => Ban::UntilMs(t),
                (None, None) => Ban::Unknown,
            };
            Answer::Banned { ban, msg }
        }
        403 | 451 => Answer::Refused {
            block: if status == 451 {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs(300)
            },
            msg,
        },
        408 | 500..=599 => Answer::Retry { retry_after, msg },
        _ => Answer::Rejected { code, msg },
    }
}

/// `Retry-After` in seconds (fractions allowed), capped at four days.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(4.0 * 86_400.0)))
}

/// `X-MBX-USED-WEIGHT-<n><unit>` or the legacy bare `X-MBX-USED-WEIGHT` (the one-minute
/// count), the largest if several.
fn used_weight(headers: &reqwest::header::HeaderMap) -> Option<u32> {
    headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-mbx-used-weight"))
        .filter_map(|(_, v)| v.to_str().ok()?.trim().parse::<u32>().ok())
        .max()
}

/// `{"code": -1121, "msg": "Invalid symbol."}` → (code, msg); other bodies are quoted briefly.
fn binance_error(body: &str) -> (i64, String) {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => (
            v.get("code").and_then(Value::as_i64).unwrap_or(0),
            v.get("msg")
                .and_then(Value::as_str)
                .unwrap_or(body)
                .to_string(),
        ),
        Err(_) => (0, body.chars().take(200).collect()),
    }
}

/// Largest reply body read (a klines page of 1500 rows is about 300 KB); the rest is cut.
const MAX_BODY_BYTES: usize = 16 << 20;

/// Reads a body up to `cap` bytes (an error page or a misbehaving server cannot make us
/// buffer without bound); lossy UTF-8.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<String, reqwest::Error> {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= cap {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The budget from Binance's -1003 message "... current limit is 2400 request weight per 1
/// MINUTE. ...".
fn current_limit(msg: &str) -> Option<u32> {
    crate::number_after(msg, "current limit is ")
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
}

/// The end of a ban from Binance's -1003 message "... IP banned until 1712345678901. ...".
fn banned_until(msg: &str) -> Option<i64> {
    crate::number_after(msg, "banned until ").and_then(|n| i64::try_from(n).ok())
}

fn parse_exchange_info(market: Market, v: &Value) -> Result<ExchangeInfo, String> {
    let weight_budget = v
        .get("rateLimits")
        .and_then(Value::as_array)
        .and_then(|limits| {
            limits.iter().find_map(|l| {
                if l.get("rateLimitType")?.as_str()? != "REQUEST_WEIGHT" {
                    return None;
                }
                let unit = match l.get("interval")?.as_str()? {
                    "SECOND" => 1,
                    "MINUTE" => 60,
                    "HOUR" => 3600,
                    "DAY" => 86_400,
                    _ => return None,
                };
                let num = l.get("intervalNum")?.as_u64()?;
                let limit = u32::try_from(l.get("limit")?.as_u64()?).ok()?;
                Some(Budget {
                    limit,
                    window: Duration::from_secs(unit * num.max(1)),
                })
            })
        });
    let status_key = match market {
        Market::Cm => "contractStatus",
        Market::Spot | Market::Um => "status",
    };
    let symbols = v
        .get("symbols")
        .and_then(Value::as_array)
        .ok_or("exchangeInfo has no symbols")?
        .iter()
        .filter_map(|s| {
            let name = s.get("symbol")?.as_str()?.to_string();
            let status = s
                .get(status_key)
                .or_else(|| s.get("status"))
                .and_then(Value::as_str)
                .unwrap_or("UNKNOWN")
                .to_string();
            let onboard_ms = s.get("onboardDate").and_then(Value::as_i64);
            Some((name, SymbolInfo { status, onboard_ms }))
        })
        .collect();
    Ok(ExchangeInfo {
        weight_budget,
        symbols,
    })
}

/// Parses a klines reply: 12-element rows, times and trades as numbers, prices and volumes
/// as strings (kept exact).
pub fn parse_klines(pair: &PairKey, v: &Value, server_now: i64) -> Result<Vec<Kline>, String> {
    let rows = v.as_array().ok_or("klines reply is not an array")?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let f = row
            .as_array()
            .filter(|f| f.len() >= 11)
            .ok_or_else(|| format!("row {i} is not a 12-element array"))?;
        // Times and trade counts are JSON numbers; prices and volumes must be strings (a JSON
        // number would have gone through f64). Then the shared 12-column parser.
        let mut text: Vec<std::borrow::Cow<'_, str>> = Vec::with_capacity(11);
        for (j, v) in f.iter().take(11).enumerate() {
            text.push(match (v, j) {
                (Value::String(s), _) => s.as_str().into(),
                (Value::Number(n), 0 | 6 | 8) => n.to_string().into(),
                _ => {
                    let want = if matches!(j, 0 | 6 | 8) {
                        "an integer"
                    } else {
                        "a decimal string"
                    };
                    return Err(format!("row {i} field {j}: expected {want}, got {v}"));
                }
            });
        }
        let fields: Vec<&str> = text.iter().map(|c| c.as_ref()).collect();
        let mut k = Kline::from_fields(pair.clone(), &fields, false, Source::Rest)
            .map_err(|e| format!("row {i}: {e}"))?;
        k.is_final = k.close_time < server_now;
        out.push(k);
    }
    debug!(%pair, rows = out.len(), "Parsed klines.");
    Ok(out)
}

/// The candles expected on the grid in `[start, end)`, as open times (1M by calendar).
pub fn grid(period: Period, start: i64, end: i64) -> impl Iterator<Item = i64> {
    let first = {
        let a = period.align(start);
        if a < start {
            period.next_open(a)
        } else {
            a
        }
    };
    std::iter::successors(Some(first), move |&t| Some(period.next_open(t)))
        .take_while(move |&t| t < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kline_rows_parse_exactly_and_the_open_candle_is_not_final() {
        let pair = PairKey::parse("spot", "BNBBTC", "1m").unwrap();
        let v: Value = serde_json::from_str(
            r#"[[1499040000000,"0.01634790","0.80000000","0.01575800","0.01577100","148976.11427815",1499040059999,"2434.19055334",308,"1756.87402397","28.46694368","0"],
                [1499040060000,"1","2","0.5","1.5","10",1499040119999,"15",3,"5","7.5","0"]]"#,
        )
        .unwrap();
        let rows = parse_klines(&pair, &v, 1_499_040_100_000).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].open.to_string(), "0.0163479");
        assert_eq!(rows[0].volume.to_string(), "148976.11427815");
        assert_eq!(rows[0].trades, 308);
        assert!(rows[0].is_final);
        assert!(!rows[1].is_final, "closes after server now");
        let bad: Value = serde_json::from_str(r#"[[1, 2.5, "1"]]"#).unwrap();
        assert!(parse_klines(&pair, &bad, 0).is_err());
        let float: Value = serde_json::from_str(
            r#"[[1499040000000,0.1,"0.8","0.01","0.01","1",1499040059999,"1",1,"1","1","0"]]"#,
        )
        .unwrap();
        assert!(parse_klines(&pair, &float, 0)
            .unwrap_err()
            .contains("decimal string"));
    }

    #[test]
    fn ban_ends_and_weight_headers_are_read() {
        assert_eq!(
            banned_until("Way too much request weight used; IP banned until 1712345678901. Please use WebSocket Streams"),
            Some(1_712_345_678_901)
        );
        assert_eq!(banned_until("Too many requests"), None);
        assert_eq!(
            current_limit(
                "Too much request weight used; current limit is 1200 request weight per 1 MINUTE."
            ),
            Some(1200)
        );
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-mbx-used-weight", "17".parse().unwrap());
        assert_eq!(used_weight(&h), Some(17));
        h.insert("x-mbx-used-weight-1m", "21".parse().unwrap());
        assert_eq!(used_weight(&h), Some(21));
    }

    struct Case {
        name: &'static str,
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: &'static str,
        expected: Answer,
    }

    #[test]
    fn answers_are_classified() {
        let ban_msg = "Way too much request weight used; IP banned until 1712345678901. Please use WebSocket Streams for live updates to avoid bans.";
        let limit_msg =
            "Too much request weight used; current limit is 1200 request weight per 1 MINUTE.";
        let cases = vec![
            Case {
                name: "200 with JSON is ok",
                status: 200,
                headers: vec![],
                body: r#"{"serverTime":1}"#,
                expected: Answer::Ok(serde_json::json!({"serverTime": 1})),
            },
            Case {
                name: "200 with a body that is not JSON is malformed",
                status: 200,
                headers: vec![],
                body: "<html>",
                expected: Answer::Malformed(
                    "invalid JSON: expected value at line 1 column 1".to_string(),
                ),
            },
            Case {
                name: "429 with Retry-After and the -1003 budget",
                status: 429,
                headers: vec![("retry-after", "7")],
                body: r#"{"code":-1003,"msg":"Too much request weight used; current limit is 1200 request weight per 1 MINUTE."}"#,
                expected: Answer::RateLimited {
                    retry_after: Some(Duration::from_secs(7)),
                    limit: Some(1200),
                    msg: limit_msg.to_string(),
                },
            },
            Case {
                name: "429 without Retry-After or a budget in the message",
                status: 429,
                headers: vec![],
                body: r#"{"code":-1003,"msg":"Too many requests"}"#,
                expected: Answer::RateLimited {
                    retry_after: None,
                    limit: None,
                    msg: "Too many requests".to_string(),
                },
            },
            Case {
                name: "429 with a fractional Retry-After",
                status: 429,
                headers: vec![("retry-after", " 0.5 ")],
                body: "",
                expected: Answer::RateLimited {
                    retry_after: Some(Duration::from_millis(500)),
                    limit: None,
                    msg: String::new(),
                },
            },
            Case {
                name: "429 with a negative Retry-After: none",
                status: 429,
                headers: vec![("retry-after", "-3")],
                body: "",
                expected: Answer::RateLimited {
                    retry_after: None,
                    limit: None,
                    msg: String::new(),
                },
            },
            Case {
                name: "418 with Retry-After: banned for it (capped at four days)",
                status: 418,
                headers: vec![("retry-after", "999999999")],
                body: r#"{"code":-1003,"msg":"banned"}"#,
                expected: Answer::Banned {
                    ban: Ban::For(Duration::from_secs(4 * 86_400)),
                    msg: "banned".to_string(),
                },
            },
            Case {
                name: "418 without Retry-After: banned until the -1003 message's time",
                status: 418,
                headers: vec![],
                body: r#"{"code":-1003,"msg":"Way too much request weight used; IP banned until 1712345678901. Please use WebSocket Streams for live updates to avoid bans."}"#,
                expected: Answer::Banned {
                    ban: Ban::UntilMs(1_712_345_678_901),
                    msg: ban_msg.to_string(),
                },
            },
            Case {
                name: "418 with Retry-After wins over the message's time",
                status: 418,
                headers: vec![("retry-after", "60")],
                body: r#"{"code":-1003,"msg":"Way too much request weight used; IP banned until 1712345678901. Please use WebSocket Streams for live updates to avoid bans."}"#,
                expected: Answer::Banned {
                    ban: Ban::For(Duration::from_secs(60)),
                    msg: ban_msg.to_string(),
                },
            },
            Case {
                name: "418 saying nothing: ban length unknown",
                status: 418,
                headers: vec![],
                body: "I'm a teapot",
                expected: Answer::Banned {
                    ban: Ban::Unknown,
                    msg: "I'm a teapot".to_string(),
                },
            },
            Case {
                name: "403 from the firewall refuses this egress for 5 minutes",
                status: 403,
                headers: vec![],
                body: "<html>403 Forbidden</html>",
                expected: Answer::Refused {
                    block: Duration::from_secs(300),
                    msg: "<html>403 Forbidden</html>".to_string(),
                },
            },
            Case {
                name: "451 (restricted location) refuses this egress for an hour",
                status: 451,
                headers: vec![],
                body: r#"{"code":0,"msg":"Service unavailable from a restricted location"}"#,
                expected: Answer::Refused {
                    block: Duration::from_secs(3600),
                    msg: "Service unavailable from a restricted location".to_string(),
                },
            },
            Case {
                name: "503 with Retry-After is retried after it",
                status: 503,
                headers: vec![("retry-after", "2")],
                body: "Service Unavailable",
                expected: Answer::Retry {
                    retry_after: Some(Duration::from_secs(2)),
                    msg: "Service Unavailable".to_string(),
                },
            },
            Case {
                name: "500 is retried",
                status: 500,
                headers: vec![],
                body: r#"{"code":-1000,"msg":"An unknown error occurred"}"#,
                expected: Answer::Retry {
                    retry_after: None,
                    msg: "An unknown error occurred".to_string(),
                },
            },
            Case {
                name: "408 is retried",
                status: 408,
                headers: vec![],
                body: "",
                expected: Answer::Retry {
                    retry_after: None,
                    msg: String::new(),
                },
            },
            Case {
                name: "-1121 invalid symbol is a permanent rejection with its code",
                status: 400,
                headers: vec![],
                body: r#"{"code":-1121,"msg":"Invalid symbol."}"#,
                expected: Answer::Rejected {
                    code: -1121,
                    msg: "Invalid symbol.".to_string(),
                },
            },
            Case {
                name: "-1120 invalid interval is a permanent rejection with its code",
                status: 400,
                headers: vec![],
                body: r#"{"code":-1120,"msg":"Invalid interval."}"#,
                expected: Answer::Rejected {
                    code: -1120,
                    msg: "Invalid interval.".to_string(),
                },
            },
            Case {
                name: "a 404 page is rejected with code 0 and the body's start",
                status: 404,
                headers: vec![],
                body: "Not Found",
                expected: Answer::Rejected {
                    code: 0,
                    msg: "Not Found".to_string(),
                },
            },
            Case {
                name: "a 2xx other than 200 is not ok",
                status: 204,
                headers: vec![],
                body: "",
                expected: Answer::Rejected {
                    code: 0,
                    msg: String::new(),
                },
            },
        ];
        for c in cases {
            let mut h = reqwest::header::HeaderMap::new();
            for (k, v) in &c.headers {
                h.insert(*k, v.parse().unwrap());
            }
            assert_eq!(
                classify(c.status, &h, c.body),
                c.expected,
                "case: {}",
                c.name
            );
        }
    }

    #[test]
    fn exchange_info_parses_budgets_and_statuses() {
        let v: Value = serde_json::from_str(
            r#"{"rateLimits":[{"rateLimitType":"ORDERS","interval":"MINUTE","intervalNum":1,"limit":1200},
                              {"rateLimitType":"REQUEST_WEIGHT","interval":"SECOND","intervalNum":2,"limit":120}],
                "symbols":[{"symbol":"BTCUSD_PERP","contractStatus":"TRADING","onboardDate":1597017600000}]}"#,
        )
        .unwrap();
        let info = parse_exchange_info(Market::Cm, &v).unwrap();
        assert_eq!(
            info.weight_budget,
            Some(Budget {
                limit: 120,
                window: Duration::from_secs(2)
            })
        );
        let s = &info.symbols["BTCUSD_PERP"];
        assert_eq!(s.status, "TRADING");
        assert_eq!(s.onboard_ms, Some(1_597_017_600_000));
    }

    #[test]
    fn grid_covers_the_range_on_period_boundaries() {
        let g: Vec<i64> = grid(Period::H1, 1_700_000_000_000, 1_700_010_000_000).collect();
        assert_eq!(g.first(), Some(&1_700_002_800_000));
        assert!(g
            .iter()
            .all(|t| t % 3_600_000 == 0 && *t < 1_700_010_000_000));
        assert_eq!(g.len(), 2);
        let months: Vec<i64> = grid(Period::Mo1, 1_704_067_200_000, 1_711_929_600_000).collect();
        assert_eq!(months.len(), 3); // Jan, Feb, Mar 2024
    }
}
