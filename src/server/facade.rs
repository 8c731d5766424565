//! The Binance-compatible REST facade: `GET {prefix}/klines`, `ping`, `time` and
//! `exchangeInfo` under `/api/v3` (spot), `/fapi/v1` (USD-M) and `/dapi/v1` (COIN-M), served
//! from ClickHouse, so an unmodified Binance client (ccxt, freqtrade) pointed at QuantService
//! reads stored candles without spending the user's Binance weight. The pure half checks
//! parameters as Binance checks them (same error codes and messages), picks the page Binance's
//! rules for the market select, and renders stored candles in Binance's exact array format;
//! [`router`] is the HTTP half. The renderer is written apart from the simulator's on purpose:
//! the tests compare the two. Not here: reading ClickHouse (`store::pages`), the port it is
//! served on (the client server's).

use std::fmt::Write;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use tracing::warn;

use crate::market::{now_ms, Decimal, Kline, Market, PairKey, Period, Symbol, CM_MAX_RANGE_MS};
use crate::store::{Store, StoreError};

/// Rows when `limit` is not given (Binance's default).
pub const DEFAULT_LIMIT: u32 = 500;

/// A Binance error answer: HTTP 400 with `{"code":…,"msg":…}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("Mandatory parameter '{0}' was not sent, was empty/null, or malformed.")]
    Mandatory(&'static str),
    #[error("Illegal characters found in parameter '{0}'; legal range is '{1}'.")]
    Illegal(&'static str, &'static str),
    #[error("Data sent for parameter '{0}' is not valid.")]
    InvalidValue(&'static str),
    #[error("Invalid interval.")]
    Interval,
    #[error("Invalid symbol.")]
    Symbol,
    #[error("Start time is greater than end time.")]
    StartAfterEnd,
    #[error("Maximum time interval is 200 days.")]
    CmRange,
}

impl ApiError {
    pub fn code(&self) -> i64 {
        match self {
            ApiError::Mandatory(_) => -1102,
            ApiError::Illegal(..) => -1100,
            ApiError::InvalidValue(_) => -1130,
            ApiError::Interval => -1120,
            ApiError::Symbol => -1121,
            ApiError::StartAfterEnd => -1023,
            ApiError::CmRange => -4088,
        }
    }

    /// The JSON body Binance sends with it.
    pub fn body(&self) -> String {
        serde_json::json!({"code": self.code(), "msg": self.to_string()}).to_string()
    }
}

/// A checked klines request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KlinesQuery {
    pub pair: PairKey,
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub limit: u32,
}

/// Parses `symbol`, `interval`, `startTime`, `endTime` and `limit` for `market`, in Binance's
/// order of checks. `param` looks a parameter up by name. Binance checks next that the symbol
/// exists, then the range ([`KlinesQuery::page`]).
pub fn klines_query<'p>(
    market: Market,
    param: impl Fn(&str) -> Option<&'p str>,
) -> Result<KlinesQuery, ApiError> {
    let symbol = param("symbol")
        .filter(|s| !s.is_empty())
        .ok_or(ApiError::Mandatory("symbol"))?;
    let interval = param("interval")
        .filter(|s| !s.is_empty())
        .ok_or(ApiError::Mandatory("interval"))?;
    let time = |name: &'static str| -> Result<Option<i64>, ApiError> {
        param(name)
            .map(|v| {
                let t = number(v).ok_or(ApiError::Illegal(name, "^[0-9]{1,20}$"))?;
                // Spot accepts milliseconds or microseconds.
                Ok(if market == Market::Spot {
                    crate::market::normalize_ms(t)
                } else {
                    t
                })
            })
            .transpose()
    };
    let start = time("startTime")?;
    let end = time("endTime")?;
    let limit = match param("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => {
            let l = number(v).ok_or(ApiError::Illegal("limit", "^[0-9]{1,20}$"))?;
            u32::try_from(l)
                .ok()
                .filter(|l| (1..=market.max_klines_limit()).contains(l))
                .ok_or(ApiError::InvalidValue("limit"))?
        }
    };
    let symbol: Symbol = symbol
        .parse()
        .map_err(|_| ApiError::Illegal("symbol", "^[A-Z0-9-_.]{1,20}$"))?;
    let period = Period::parse_for(interval, market).map_err(|_| ApiError::Interval)?;
    Ok(KlinesQuery {
        pair: PairKey {
            market,
            symbol,
            period,
        },
        start,
        end,
        limit,
    })
}

/// Which stored candles answer a klines request (bounds on `open_time`, inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The first `limit` candles in `[from, to]`.
    First { from: i64, to: i64 },
    /// The newest `limit` candles in `[from, to]`.
    Last { from: i64, to: i64 },
}

impl KlinesQuery {
    /// The range checks and the paging rule of the query's market, at `now`. Spot and USD-M:
    /// with `startTime`, the first `limit` from it (up to `endTime`); without, the newest up to
    /// `endTime`. COIN-M: always the newest `limit` of a range of at most 200 days, which ends
    /// at `endTime`, else 200 days after `startTime` (at most now), else now. "Now" is no
    /// bound here: stored candles cannot be newer than the exchange's clock, and ours may lag it.
    pub fn page(&self, now: i64) -> Result<Page, ApiError> {
        if let (Some(s), Some(e)) = (self.start, self.end) {
            if s > e {
                return Err(ApiError::StartAfterEnd);
            }
        }
        Ok(match self.pair.market {
            Market::Spot | Market::Um => match self.start {
                Some(from) => Page::First {
                    from,
                    to: self.end.unwrap_or(i64::MAX),
                },
                None => Page::Last {
                    from: i64::MIN,
                    to: self.end.unwrap_or(i64::MAX),
                },
            },
            Market::Cm => match (self.start, self.end) {
                (Some(from), Some(to)) => {
                    if to - from > CM_MAX_RANGE_MS {
                        return Err(ApiError::CmRange);
                    }
                    Page::Last { from, to }
                }
                (Some(from), None) => {
                    let to = from.saturating_add(CM_MAX_RANGE_MS);
                    Page::Last {
                        from,
                        to: if to < now { to } else { i64::MAX },
                    }
                }
                (None, Some(to)) => Page::Last {
                    from: to.saturating_sub(CM_MAX_RANGE_MS),
                    to,
                },
                (None, None) => Page::Last {
                    from: now.saturating_sub(CM_MAX_RANGE_MS),
                    to: i64::MAX,
                },
            },
        })
    }
}

/// A non-negative decimal integer of at most 20 digits.
fn number(v: &str) -> Option<i64> {
    (!v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
        .then(|| v.parse().ok())
        .flatten()
}

/// `[[open_time,"open","high","low","close","volume",close_time,"quote_volume",trades,
/// "taker_buy_volume","taker_buy_quote_volume","0"],…]` as Binance prints it on `market`.
pub fn klines_json(market: Market, rows: &[Kline]) -> String {
    let mut out = String::with_capacity(rows.len() * 170 + 2);
    out.push('[');
    for (i, k) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "[{},", k.open_time);
        for d in [k.open, k.high, k.low, k.close, k.volume] {
            quoted(&mut out, market, d);
            out.push(',');
        }
        let _ = write!(out, "{},", k.close_time);
        quoted(&mut out, market, k.quote_volume);
        let _ = write!(out, ",{},", k.trades);
        quoted(&mut out, market, k.taker_buy_volume);
        out.push(',');
        quoted(&mut out, market, k.taker_buy_quote_volume);
        out.push_str(",\"0\"]");
    }
    out.push(']');
    out
}

/// A price or volume in quotes: spot with 8 fixed decimals (`46216.93000000`), futures in the
/// shortest form (`46216.93`).
fn quoted(out: &mut String, market: Market, d: Decimal) {
    out.push('"');
    let _ = match market {
        Market::Spot => {
            let m = d.mantissa();
            let sign = if m < 0 { "-" } else { "" };
            let abs = m.unsigned_abs();
            write!(out, "{sign}{}.{:08}", abs / 100_000_000, abs % 100_000_000)
        }
        Market::Um | Market::Cm => write!(out, "{d}"),
    };
    out.push('"');
}

/// The facade's routes for every market, with their state applied: merge it into the client
/// server's router (it has no fallback of its own).
pub fn router(store: Store) -> Router {
    let mut router = Router::new();
    for market in Market::ALL {
        let prefix = market.rest_prefix();
        router = router
            .route(
                &format!("{prefix}/klines"),
                get(
                    move |State(store): State<Store>, RawQuery(query): RawQuery| async move {
                        klines(&store, market, query.as_deref().unwrap_or("")).await
                    },
                ),
            )
            .route(
                &format!("{prefix}/exchangeInfo"),
                get(
                    move |State(store): State<Store>, RawQuery(query): RawQuery| async move {
                        exchange_info(&store, market, query.as_deref().unwrap_or("")).await
                    },
                ),
            )
            .route(
                &format!("{prefix}/ping"),
                get(|| async { json_ok("{}".into()) }),
            )
            .route(
                &format!("{prefix}/time"),
                get(|| async { json_ok(json!({"serverTime": now_ms()}).to_string()) }),
            );
    }
    router
        .layer(axum::middleware::from_fn(count_request))
        .with_state(store)
}

/// Counts every facade request for the metrics.
async fn count_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    crate::metrics::clients::REST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    next.run(req).await
}

/// Why a request got no answer: a Binance error (400), or ClickHouse failing (503 when it may
/// answer later: down, overloaded, too slow; 500 otherwise).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Failure {
    fn answer(self, market: Market) -> Response {
        match self {
            Failure::Api(e) => json_response(StatusCode::BAD_REQUEST, e.body()),
            Failure::Store(error) => {
                // The details (server URL, ClickHouse's message) go to the log, not to clients.
                warn!(%market, %error, "REST facade could not read ClickHouse; answering with an error.");
                let (status, code, msg) = if error.is_retryable() {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        -1001,
                        "Internal error; unable to process your request. Please try again. \
                         (QuantService's ClickHouse database is unavailable.)",
                    )
                } else {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        -1000,
                        "An unknown error occurred while processing the request. \
                         (QuantService could not read its ClickHouse database; see its log.)",
                    )
                };
                json_response(status, json!({"code": code, "msg": msg}).to_string())
            }
        }
    }
}

/// The query string's parameters, in order (a repeated name: the first one counts).
fn params(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn lookup<'p>(params: &'p [(String, String)], name: &str) -> Option<&'p str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `GET {prefix}/klines`.
async fn klines(store: &Store, market: Market, query: &str) -> Response {
    match klines_body(store, market, query).await {
        Ok(body) => json_ok(body),
        Err(e) => e.answer(market),
    }
}

async fn klines_body(store: &Store, market: Market, query: &str) -> Result<String, Failure> {
    let params = params(query);
    let q = klines_query(market, |name| lookup(&params, name))?;
    let unknown = || async {
        match store.symbol_known(market, &q.pair.symbol).await {
            Ok(true) => Ok(false),
            Ok(false) => Ok(true),
            Err(e) => Err(Failure::Store(e)),
        }
    };
    let page = match q.page(now_ms()) {
        Ok(page) => page,
        // Binance checks the symbol before the range.
        Err(_) if unknown().await? => return Err(ApiError::Symbol.into()),
        Err(e) => return Err(e.into()),
    };
    let rows = match page {
        Page::First { from, to } => store.first_klines(&q.pair, from, to, q.limit).await?,
        Page::Last { from, to } => store.last_klines(&q.pair, from, to, q.limit).await?,
    };
    // A page with candles proves the symbol exists; only an empty one needs the check.
    if rows.is_empty() && unknown().await? {
        return Err(ApiError::Symbol.into());
    }
    Ok(klines_json(market, &rows))
}

/// `GET {prefix}/exchangeInfo` (optionally `?symbol=`): the symbols QuantService knows on the
/// market (stored candles or declared in `trading_pairs`), Binance-shaped.
async fn exchange_info(store: &Store, market: Market, query: &str) -> Response {
    match exchange_info_body(store, market, query).await {
        Ok(body) => json_ok(body),
        Err(e) => e.answer(market),
    }
}

async fn exchange_info_body(store: &Store, market: Market, query: &str) -> Result<String, Failure> {
    let params = params(query);
    let symbols = match lookup(&params, "symbol") {
        Some(s) => {
            let symbol: Symbol = s
                .parse()
                .map_err(|_| ApiError::Illegal("symbol", "^[A-Z0-9-_.]{1,20}$"))?;
            if !store.symbol_known(market, &symbol).await? {
                return Err(ApiError::Symbol.into());
            }
            vec![symbol]
        }
        None => store.known_symbols(market).await?,
    };
    Ok(exchange_info_json(market, &symbols, now_ms()))
}

/// The `exchangeInfo` document listing `symbols`: what Binance clients read from it (ccxt's
/// `load_markets`: symbol, status, assets, contract type, delivery date, margin asset, contract
/// size), with no rate limits and no filters (the facade limits nothing and trades nothing).
/// Every symbol is `TRADING`: its stored candles can be read.
pub fn exchange_info_json(market: Market, symbols: &[Symbol], server_time: i64) -> String {
    let symbols: Vec<serde_json::Value> = symbols
        .iter()
        .map(|s| symbol_json(market, s.as_str()))
        .collect();
    json!({
        "timezone": "UTC",
        "serverTime": server_time,
        "rateLimits": [],
        "exchangeFilters": [],
        "symbols": symbols,
    })
    .to_string()
}

/// Binance's `deliveryDate` of perpetual contracts (2100-12-25).
const PERPETUAL_DELIVERY_MS: i64 = 4_133_404_800_000;

fn symbol_json(market: Market, symbol: &str) -> serde_json::Value {
    let (pair, suffix) = match symbol.split_once('_') {
        Some((pair, suffix)) => (pair, Some(suffix)),
        None => (symbol, None),
    };
    let (base, quote) = split_assets(pair);
    // `_PERP` (COIN-M) or nothing (USD-M): perpetual; `_YYMMDD`: delivered that day at 08:00.
    let delivery = suffix.and_then(delivery_ms);
    let contract_type = if delivery.is_some() {
        "CURRENT_QUARTER"
    } else {
        "PERPETUAL"
    };
    let delivery = delivery.unwrap_or(PERPETUAL_DELIVERY_MS);
    match market {
        Market::Spot => json!({
            "symbol": symbol,
            "status": "TRADING",
            "baseAsset": base,
            "baseAssetPrecision": 8,
            "quoteAsset": quote,
            "quotePrecision": 8,
            "quoteAssetPrecision": 8,
            "orderTypes": [],
            "permissions": [],
            "filters": [],
        }),
        Market::Um => json!({
            "symbol": symbol,
            "pair": pair,
            "contractType": contract_type,
            "deliveryDate": delivery,
            "status": "TRADING",
            "baseAsset": base,
            "quoteAsset": quote,
            "marginAsset": quote,
            "baseAssetPrecision": 8,
            "quotePrecision": 8,
            "filters": [],
        }),
        Market::Cm => json!({
            "symbol": symbol,
            "pair": pair,
            "contractType": contract_type,
            "deliveryDate": delivery,
            "contractStatus": "TRADING",
            // Binance's contract sizes: 100 USD for BTC, 10 USD for the others.
            "contractSize": if base == "BTC" { 100 } else { 10 },
            "baseAsset": base,
            "quoteAsset": quote,
            "marginAsset": base,
            "baseAssetPrecision": 8,
            "quotePrecision": 8,
            "filters": [],
        }),
    }
}

/// 08:00 UTC on the `YYMMDD` day, Binance's delivery time of dated futures.
fn delivery_ms(suffix: &str) -> Option<i64> {
    if suffix.len() != 6 || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| suffix.get(r).and_then(|d| d.parse::<u32>().ok());
    let year = 2000 + i32::try_from(n(0..2)?).ok()?;
    let date = chrono::NaiveDate::from_ymd_opt(year, n(2..4)?, n(4..6)?)?;
    Some(date.and_hms_opt(8, 0, 0)?.and_utc().timestamp_millis())
}

/// Quote assets, longest first (`BTCTUSD` is BTC/TUSD, not BTCT/USD).
const QUOTES: [&str; 19] = [
    "FDUSD", "USDT", "USDC", "TUSD", "BUSD", "USDP", "USD", "BTC", "ETH", "BNB", "EUR", "TRY",
    "BRL", "GBP", "JPY", "AUD", "DAI", "XRP", "TRX",
];

/// `BTCUSDT` → (`BTC`, `USDT`); a pair with no known quote asset: (the pair, ``).
fn split_assets(pair: &str) -> (&str, &str) {
    QUOTES
        .iter()
        .find_map(|q| {
            pair.strip_suffix(q)
                .filter(|base| !base.is_empty())
                .map(|base| (base, *q))
        })
        .unwrap_or((pair, ""))
}

fn json_ok(body: String) -> Response {
    json_response(StatusCode::OK, body)
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::Source;

    const NOW: i64 = 1_700_000_000_000;

    fn params(q: &'static str) -> impl Fn(&str) -> Option<&'static str> {
        move |name: &str| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then_some(v)
            })
        }
    }

    #[test]
    fn queries_are_checked_as_binance_checks_them() {
        struct Case {
            name: &'static str,
            market: Market,
            query: &'static str,
            want: Result<(Option<i64>, Option<i64>, u32), i64>,
        }
        let cases = [
            Case {
                name: "defaults",
                market: Market::Um,
                query: "symbol=BTCUSDT&interval=1m",
                want: Ok((None, None, 500)),
            },
            Case {
                name: "a range and a limit",
                market: Market::Um,
                query: "symbol=BTCUSDT&interval=1h&startTime=1000&endTime=2000&limit=1500",
                want: Ok((Some(1000), Some(2000), 1500)),
            },
            Case {
                name: "spot takes microseconds",
                market: Market::Spot,
                query: "symbol=BTCUSDT&interval=1m&startTime=1700000000000000",
                want: Ok((Some(1_700_000_000_000), None, 500)),
            },
            Case {
                name: "no symbol",
                market: Market::Spot,
                query: "interval=1m",
                want: Err(-1102),
            },
            Case {
                name: "no interval",
                market: Market::Spot,
                query: "symbol=BTCUSDT",
                want: Err(-1102),
            },
            Case {
                name: "spot limit above 1000",
                market: Market::Spot,
                query: "symbol=BTCUSDT&interval=1m&limit=1001",
                want: Err(-1130),
            },
            Case {
                name: "limit 0",
                market: Market::Cm,
                query: "symbol=BTCUSD_PERP&interval=1m&limit=0",
                want: Err(-1130),
            },
            Case {
                name: "a negative time",
                market: Market::Um,
                query: "symbol=BTCUSDT&interval=1m&startTime=-5",
                want: Err(-1100),
            },
            Case {
                name: "bad interval",
                market: Market::Um,
                query: "symbol=BTCUSDT&interval=7m",
                want: Err(-1120),
            },
            Case {
                name: "1s is spot only",
                market: Market::Um,
                query: "symbol=BTCUSDT&interval=1s",
                want: Err(-1120),
            },
            Case {
                name: "bad symbol",
                market: Market::Um,
                query: "symbol=btc usdt&interval=1m",
                want: Err(-1100),
            },
            Case {
                name: "start after end",
                market: Market::Um,
                query: "symbol=BTCUSDT&interval=1m&startTime=5&endTime=4",
                want: Err(-1023),
            },
            Case {
                name: "COIN-M: 200 days at most",
                market: Market::Cm,
                query: "symbol=BTCUSD_PERP&interval=1d&startTime=0&endTime=17280000001",
                want: Err(-4088),
            },
            Case {
                name: "COIN-M: exactly 200 days",
                market: Market::Cm,
                query: "symbol=BTCUSD_PERP&interval=1d&startTime=0&endTime=17280000000",
                want: Ok((Some(0), Some(17_280_000_000), 500)),
            },
            Case {
                name: "the range is not checked by USD-M",
                market: Market::Um,
                query: "symbol=BTCUSDT&interval=1d&startTime=0&endTime=17280000001",
                want: Ok((Some(0), Some(17_280_000_001), 500)),
            },
        ];
        for c in cases {
            let got = klines_query(c.market, params(c.query))
                .and_then(|q| q.page(NOW).map(|_| (q.start, q.end, q.limit)))
                .map_err(|e| e.code());
            assert_eq!(got, c.want, "{}", c.name);
        }
        let e = klines_query(Market::Spot, params("interval=1m")).unwrap_err();
        assert_eq!(
            e.body(),
            r#"{"code":-1102,"msg":"Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."}"#
        );
    }

    #[test]
    fn rows_are_printed_as_binance_prints_them() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let k = Kline {
            pair: PairKey::parse("spot", "BTCUSDT", "1m").unwrap(),
            open_time: 1_700_000_000_000,
            close_time: 1_700_000_059_999,
            open: d("46216.93"),
            high: d("46300"),
            low: d("46100.5"),
            close: d("46250.01"),
            volume: d("12.5"),
            quote_volume: d("578125.125"),
            trades: 42,
            taker_buy_volume: d("6"),
            taker_buy_quote_volume: d("277500.06"),
            is_final: true,
            source: Source::Rest,
        };
        assert_eq!(
            klines_json(Market::Spot, std::slice::from_ref(&k)),
            r#"[[1700000000000,"46216.93000000","46300.00000000","46100.50000000","46250.01000000","12.50000000",1700000059999,"578125.12500000",42,"6.00000000","277500.06000000","0"]]"#
        );
        assert_eq!(
            klines_json(Market::Um, &[k.clone(), k]),
            r#"[[1700000000000,"46216.93","46300","46100.5","46250.01","12.5",1700000059999,"578125.125",42,"6","277500.06","0"],[1700000000000,"46216.93","46300","46100.5","46250.01","12.5",1700000059999,"578125.125",42,"6","277500.06","0"]]"#
        );
        assert_eq!(klines_json(Market::Cm, &[]), "[]");
    }

    #[test]
    fn each_market_pages_as_binance_does() {
        struct Case {
            name: &'static str,
            market: Market,
            start: Option<i64>,
            end: Option<i64>,
            want: Page,
        }
        const MAX: i64 = i64::MAX;
        const D200: i64 = CM_MAX_RANGE_MS;
        let cases = [
            Case {
                name: "spot, nothing: the newest",
                market: Market::Spot,
                start: None,
                end: None,
                want: Page::Last {
                    from: i64::MIN,
                    to: MAX,
                },
            },
            Case {
                name: "um, endTime: the newest up to it",
                market: Market::Um,
                start: None,
                end: Some(NOW - 5),
                want: Page::Last {
                    from: i64::MIN,
                    to: NOW - 5,
                },
            },
            Case {
                name: "spot, startTime: the first from it",
                market: Market::Spot,
                start: Some(1000),
                end: None,
                want: Page::First {
                    from: 1000,
                    to: MAX,
                },
            },
            Case {
                name: "um, both: the first of the range",
                market: Market::Um,
                start: Some(1000),
                end: Some(2000),
                want: Page::First {
                    from: 1000,
                    to: 2000,
                },
            },
            Case {
                name: "cm, both: the newest of the range",
                market: Market::Cm,
                start: Some(1000),
                end: Some(2000),
                want: Page::Last {
                    from: 1000,
                    to: 2000,
                },
            },
            Case {
                name: "cm, an old startTime: 200 days from it",
                market: Market::Cm,
                start: Some(1000),
                end: None,
                want: Page::Last {
                    from: 1000,
                    to: 1000 + D200,
                },
            },
            Case {
                name: "cm, a recent startTime: up to now (and whatever is stored)",
                market: Market::Cm,
                start: Some(NOW - 5 * 86_400_000),
                end: None,
                want: Page::Last {
                    from: NOW - 5 * 86_400_000,
                    to: MAX,
                },
            },
            Case {
                name: "cm, endTime: 200 days up to it",
                market: Market::Cm,
                start: None,
                end: Some(NOW - 1000),
                want: Page::Last {
                    from: NOW - 1000 - D200,
                    to: NOW - 1000,
                },
            },
            Case {
                name: "cm, nothing: the last 200 days",
                market: Market::Cm,
                start: None,
                end: None,
                want: Page::Last {
                    from: NOW - D200,
                    to: MAX,
                },
            },
        ];
        for c in cases {
            let q = KlinesQuery {
                pair: PairKey {
                    market: c.market,
                    symbol: "BTCUSDT".parse().unwrap(),
                    period: Period::M1,
                },
                start: c.start,
                end: c.end,
                limit: 500,
            };
            assert_eq!(q.page(NOW), Ok(c.want), "{}", c.name);
        }
    }

    #[test]
    fn exchange_info_lists_symbols_as_binance_does() {
        let symbols =
            |list: &[&str]| -> Vec<Symbol> { list.iter().map(|s| s.parse().unwrap()).collect() };
        let doc: serde_json::Value = serde_json::from_str(&exchange_info_json(
            Market::Spot,
            &symbols(&["BTCUSDT", "ETHBTC", "BTCTUSD", "ABCXYZ"]),
            NOW,
        ))
        .unwrap();
        assert_eq!(doc["serverTime"], NOW);
        assert_eq!(doc["timezone"], "UTC");
        let assets: Vec<(String, String, String)> = doc["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                assert_eq!(s["status"], "TRADING");
                (
                    s["symbol"].as_str().unwrap().to_string(),
                    s["baseAsset"].as_str().unwrap().to_string(),
                    s["quoteAsset"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want = [
            ("BTCUSDT", "BTC", "USDT"),
            ("ETHBTC", "ETH", "BTC"),
            ("BTCTUSD", "BTC", "TUSD"),
            ("ABCXYZ", "ABCXYZ", ""),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
        assert_eq!(assets, want);

        let doc: serde_json::Value = serde_json::from_str(&exchange_info_json(
            Market::Cm,
            &symbols(&["BTCUSD_PERP", "ETHUSD_250328"]),
            NOW,
        ))
        .unwrap();
        let perp = &doc["symbols"][0];
        assert_eq!(perp["pair"], "BTCUSD");
        assert_eq!(perp["contractType"], "PERPETUAL");
        assert_eq!(perp["deliveryDate"], PERPETUAL_DELIVERY_MS);
        assert_eq!(perp["marginAsset"], "BTC");
        assert_eq!(perp["contractSize"], 100);
        let dated = &doc["symbols"][1];
        // 2025-03-28T08:00:00Z
        assert_eq!(dated["deliveryDate"], 1_743_148_800_000i64);
        assert_eq!(dated["contractType"], "CURRENT_QUARTER");
        assert_eq!(dated["contractSize"], 10);
        assert_eq!(dated["quoteAsset"], "USD");

        let doc: serde_json::Value =
            serde_json::from_str(&exchange_info_json(Market::Um, &symbols(&["ETHUSDT"]), NOW))
                .unwrap();
        assert_eq!(doc["symbols"][0]["marginAsset"], "USDT");
        assert_eq!(doc["symbols"][0]["contractType"], "PERPETUAL");
    }
}
