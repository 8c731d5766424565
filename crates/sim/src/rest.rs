//! The REST side of the simulator: routing under `/api/v3`, `/fapi/v1` and `/dapi/v1`,
//! parameter validation with Binance's error codes, klines windows per market, exchangeInfo,
//! time and ping, and the faults and weight checks in front of them. Owns no state.

use qs_core::market::CM_MAX_RANGE_MS;
use std::fmt::Write as _;
use std::net::IpAddr;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::json;

use qs_core::market::{Decimal, Kline, Market, PairKey, Period, Symbol};

use super::book::PairView;
use super::limiter::Admission;
use super::{lock, Shared};

/// COIN-M's longest `endTime - startTime`.
const DEFAULT_LIMIT: u32 = 500;

/// A Binance API error: HTTP 400 with `{"code":…,"msg":…}`. Never retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ApiError {
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
    fn code(&self) -> i64 {
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
}

/// `/fapi/v1/klines` → `(Um, "klines")`.
pub(crate) fn route(path: &str) -> Option<(Market, &str)> {
    Market::ALL.into_iter().find_map(|m| {
        let endpoint = path.strip_prefix(m.rest_prefix())?.strip_prefix('/')?;
        (!endpoint.is_empty() && !endpoint.contains('/')).then_some((m, endpoint))
    })
}

/// Answers one REST request; returns the response and the weight charged.
pub(crate) fn serve(
    sim: &Shared,
    market: Market,
    endpoint: &str,
    query: &str,
    headers: &HeaderMap,
    ip: IpAddr,
    now: i64,
) -> (Response, u32) {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let budget = lock(&sim.limiter).budget(market);
    let header = budget.header_name();
    // Windows and bans follow the limiter's clock (the wall clock unless a test injected one).
    let limit_now = sim.clock.now_ms();
    let used_now = || lock(&sim.limiter).used(market, ip, limit_now);

    let (deny, forbid) = {
        let f = lock(&sim.faults);
        (f.deny_451.contains(&ip), f.forbid_403)
    };
    if deny {
        let body = json!({"code": 0, "msg": "Service unavailable from a restricted location according to 'b. Eligibility' in https://www.binance.com/en/terms. Please contact customer service if you believe you received this message in error."});
        return (
            with_weight(json_response(451, &body.to_string()), &header, used_now()),
            0,
        );
    }
    if forbid {
        let resp = super::plain(403, "<html><body><h1>403 Forbidden</h1></body></html>");
        return (with_weight(resp, &header, used_now()), 0);
    }
    if sim.take_5xx() {
        let body = match market {
            Market::Spot => {
                json!({"code": -1008, "msg": "Server is currently overloaded with other requests. Please try again in a few minutes."})
            }
            Market::Um | Market::Cm => {
                json!({"code": -1000, "msg": "Unknown error, please check your request or try again later."})
            }
        };
        return (
            with_weight(json_response(503, &body.to_string()), &header, used_now()),
            0,
        );
    }

    let weight = match endpoint {
        "klines" => {
            let limit = param("limit")
                .and_then(|l| l.parse::<u32>().ok())
                .unwrap_or(DEFAULT_LIMIT);
            market.klines_weight(limit)
        }
        "exchangeInfo" => market.exchange_info_weight(),
        "time" | "ping" => 1,
        _ => {
            let resp = json_response(404, "");
            return (with_weight(resp, &header, used_now()), 0);
        }
    };

    let (nominal, interval_name) = {
        let (n, _, name) = budget.interval();
        (n, name)
    };
    // Bind first: a guard in the match scrutinee would live through the handlers.
    let admission = lock(&sim.limiter).admit(market, ip, weight, limit_now);
    match admission {
        Admission::Allowed { used } => {
            let result = match endpoint {
                "klines" => klines(sim, market, &param, headers, now),
                "exchangeInfo" => exchange_info(sim, market, &param, now),
                "time" => Ok(json!({"serverTime": now}).to_string()),
                _ => Ok("{}".to_string()),
            };
            let resp = match result {
                Ok(body) => json_response(200, &body),
                Err(e) => json_response(400, &error_body(e.code(), &e.to_string())),
            };
            (with_weight(resp, &header, used), weight)
        }
        Admission::Limited {
            used,
            retry_after_s,
        } => {
            let msg = format!(
                "Too much request weight used; current limit is {} request weight per {nominal} {interval_name}. Please use WebSocket Streams for live updates to avoid polling the API.",
                budget.limit
            );
            let resp = json_response(429, &error_body(-1003, &msg));
            (
                with_retry_after(with_weight(resp, &header, used), retry_after_s),
                0,
            )
        }
        Admission::Banned {
            used,
            retry_after_s,
        } => {
            let until = limit_now + i64::try_from(retry_after_s).unwrap_or(0) * 1000;
            let msg = format!(
                "Way too much request weight used; IP banned until {until}. Please use WebSocket Streams for live updates to avoid bans."
            );
            let resp = json_response(418, &error_body(-1003, &msg));
            (
                with_retry_after(with_weight(resp, &header, used), retry_after_s),
                0,
            )
        }
    }
}

fn klines<'p>(
    sim: &Shared,
    market: Market,
    param: &impl Fn(&str) -> Option<&'p str>,
    headers: &HeaderMap,
    now: i64,
) -> Result<String, ApiError> {
    let symbol = param("symbol")
        .filter(|s| !s.is_empty())
        .ok_or(ApiError::Mandatory("symbol"))?;
    let interval = param("interval")
        .filter(|s| !s.is_empty())
        .ok_or(ApiError::Mandatory("interval"))?;
    let time_param = |name: &'static str| -> Result<Option<i64>, ApiError> {
        let Some(v) = param(name) else {
            return Ok(None);
        };
        let t = number(v).ok_or(ApiError::Illegal(name, "^[0-9]{1,20}$"))?;
        // Spot accepts ms or µs.
        Ok(Some(if market == Market::Spot {
            qs_core::market::normalize_ms(t)
        } else {
            t
        }))
    };
    let start = time_param("startTime")?;
    let end = time_param("endTime")?;
    let limit = match param("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => {
            let l = number(v).ok_or(ApiError::Illegal("limit", "^[0-9]{1,20}$"))?;
            match u32::try_from(l) {
                Ok(l) if (1..=market.max_klines_limit()).contains(&l) => l,
                _ => return Err(ApiError::InvalidValue("limit")),
            }
        }
    };
    let symbol: Symbol = symbol
        .parse()
        .map_err(|_| ApiError::Illegal("symbol", "^[A-Z0-9-_.]{1,20}$"))?;
    let period = Period::parse_for(interval, market).map_err(|_| ApiError::Interval)?;
    let listed = sim.listed(market, &symbol).ok_or(ApiError::Symbol)?;
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(ApiError::StartAfterEnd);
        }
    }
    let pair = PairKey {
        market,
        symbol,
        period,
    };
    let maintenance = sim.maintenance();
    let view = PairView::new(
        &pair,
        listed,
        sim.series.get(&pair).map(|s| s.as_ref()),
        &maintenance,
    );
    let limit = limit as usize;
    let rows = match market {
        Market::Spot | Market::Um => match (start, end) {
            (Some(s), e) => view.forward(s, e.unwrap_or(i64::MAX), limit, now),
            (None, e) => view.backward(i64::MIN, e.unwrap_or(now), limit, now),
        },
        Market::Cm => {
            let (lo, hi) = match (start, end) {
                (Some(s), Some(e)) => {
                    if e - s > CM_MAX_RANGE_MS {
                        return Err(ApiError::CmRange);
                    }
                    (s, e)
                }
                (Some(s), None) => (s, s.saturating_add(CM_MAX_RANGE_MS).min(now)),
                (None, Some(e)) => (e.saturating_sub(CM_MAX_RANGE_MS), e),
                (None, None) => (now - CM_MAX_RANGE_MS, now),
            };
            view.backward(lo, hi, limit, now)
        }
    };
    let (page_cap, lag_ms) = {
        let f = lock(&sim.faults);
        (f.page_cap, f.lag_ms)
    };
    let mut rows = rows;
    if lag_ms > 0 {
        rows.retain(|k| !(k.is_final && k.close_time >= now - lag_ms));
    }
    if let Some(cap) = page_cap.filter(|c| rows.len() > *c) {
        match market {
            // Forward pages keep their oldest rows, COIN-M's endTime-anchored ones the newest.
            Market::Spot | Market::Um => rows.truncate(cap),
            Market::Cm => {
                rows.drain(..rows.len() - cap);
            }
        }
    }
    let micros = market == Market::Spot
        && headers
            .get("x-mbx-time-unit")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("MICROSECOND"));
    Ok(klines_json(market, &rows, micros))
}

/// `[[open_time,"open",…,"0"],…]` exactly as Binance prints it.
fn klines_json(market: Market, rows: &[Kline], micros: bool) -> String {
    let mut out = String::with_capacity(rows.len() * 160 + 2);
    out.push('[');
    for (i, k) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        write_row(&mut out, market, k, micros, "\"");
        out.push(']');
    }
    out.push(']');
    out
}

/// One kline's 12 fields as Binance prints them, comma-separated: times and trades as
/// numbers, prices and volumes (and the ignored last field) wrapped in `quote` (`"` in JSON,
/// nothing in archive CSV). `micros`: times in microseconds (spot archives from 2025).
pub(crate) fn write_row(out: &mut String, market: Market, k: &Kline, micros: bool, quote: &str) {
    let (open_time, close_time) = if micros {
        (k.open_time * 1000, (k.close_time + 1) * 1000 - 1)
    } else {
        (k.open_time, k.close_time)
    };
    let d = |x: Decimal| format_decimal(market, x);
    let q = quote;
    let _ = write!(
        out,
        "{open_time},{q}{}{q},{q}{}{q},{q}{}{q},{q}{}{q},{q}{}{q},{close_time},{q}{}{q},{},{q}{}{q},{q}{}{q},{q}0{q}",
        d(k.open),
        d(k.high),
        d(k.low),
        d(k.close),
        d(k.volume),
        d(k.quote_volume),
        k.trades,
        d(k.taker_buy_volume),
        d(k.taker_buy_quote_volume),
    );
}

/// Spot prints 8 fixed decimals (`46216.93000000`); futures print the shortest form.
fn format_decimal(market: Market, d: Decimal) -> String {
    let mut out = String::new();
    write_decimal(&mut out, market, d);
    out
}

/// Appends `d` as Binance prints it on `market` (REST rows, archive CSV and WebSocket events).
pub(crate) fn write_decimal(out: &mut String, market: Market, d: Decimal) {
    let _ = match market {
        Market::Spot => {
            let m = d.mantissa();
            let abs = m.unsigned_abs();
            let sign = if m < 0 { "-" } else { "" };
            write!(out, "{sign}{}.{:08}", abs / 100_000_000, abs % 100_000_000)
        }
        Market::Um | Market::Cm => write!(out, "{d}"),
    };
}

fn exchange_info<'p>(
    sim: &Shared,
    market: Market,
    param: &impl Fn(&str) -> Option<&'p str>,
    now: i64,
) -> Result<String, ApiError> {
    let only: Option<Symbol> = match param("symbol") {
        Some(s) => {
            let s: Symbol = s
                .parse()
                .map_err(|_| ApiError::Illegal("symbol", "^[A-Z0-9-_.]{1,20}$"))?;
            sim.listed(market, &s).ok_or(ApiError::Symbol)?;
            Some(s)
        }
        None => None,
    };
    let budget = lock(&sim.limiter).budget(market);
    let (n, _, interval) = budget.interval();
    let symbols: Vec<serde_json::Value> = sim
        .listings
        .iter()
        .filter(|((m, s), _)| *m == market && only.as_ref().is_none_or(|o| o == s))
        .map(|((_, s), &listed)| symbol_json(market, s.as_str(), listed))
        .collect();
    Ok(json!({
        "timezone": "UTC",
        "serverTime": now,
        "rateLimits": [{
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": interval,
            "intervalNum": n,
            "limit": budget.limit,
        }],
        "exchangeFilters": [],
        "symbols": symbols,
    })
    .to_string())
}

/// 2100-12-25, Binance's delivery date for perpetuals.
const PERPETUAL_DELIVERY_MS: i64 = 4_133_404_800_000;

fn symbol_json(market: Market, symbol: &str, listed: i64) -> serde_json::Value {
    let (base, quote) = split_assets(symbol);
    match market {
        Market::Spot => json!({
            "symbol": symbol,
            "status": "TRADING",
            "baseAsset": base,
            "baseAssetPrecision": 8,
            "quoteAsset": quote,
            "quoteAssetPrecision": 8,
            "isSpotTradingAllowed": true,
        }),
        Market::Um => json!({
            "symbol": symbol,
            "pair": symbol,
            "contractType": "PERPETUAL",
            "deliveryDate": PERPETUAL_DELIVERY_MS,
            "onboardDate": listed,
            "status": "TRADING",
            "baseAsset": base,
            "quoteAsset": quote,
            "marginAsset": quote,
            "underlyingType": "COIN",
        }),
        Market::Cm => {
            let pair = symbol.split('_').next().unwrap_or(symbol);
            let perpetual = symbol.ends_with("_PERP") || !symbol.contains('_');
            json!({
                "symbol": symbol,
                "pair": pair,
                "contractType": if perpetual { "PERPETUAL" } else { "CURRENT_QUARTER" },
                "deliveryDate": PERPETUAL_DELIVERY_MS,
                "onboardDate": listed,
                "contractStatus": "TRADING",
                "contractSize": if symbol.starts_with("BTC") { 100 } else { 10 },
                "baseAsset": base,
                "quoteAsset": quote,
                "marginAsset": base,
            })
        }
    }
}

/// `BTCUSDT` → (`BTC`, `USDT`); `BTCUSD_PERP` → (`BTC`, `USD`).
fn split_assets(symbol: &str) -> (String, String) {
    let core = symbol.split('_').next().unwrap_or(symbol);
    for quote in [
        "USDT", "FDUSD", "USDC", "BUSD", "USD", "BTC", "ETH", "BNB", "EUR", "TRY",
    ] {
        if let Some(base) = core.strip_suffix(quote) {
            if !base.is_empty() {
                return (base.to_string(), quote.to_string());
            }
        }
    }
    (core.to_string(), String::new())
}

/// Binance's unsigned integer parameters: 1 to 20 digits.
fn number(v: &str) -> Option<i64> {
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn error_body(code: i64, msg: &str) -> String {
    json!({"code": code, "msg": msg}).to_string()
}

fn json_response(status: u16, body: &str) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}

fn with_weight(mut resp: Response, header: &str, used: u32) -> Response {
    if let Ok(name) = HeaderName::from_bytes(header.as_bytes()) {
        resp.headers_mut().insert(name, HeaderValue::from(used));
    }
    resp
}

fn with_retry_after(mut resp: Response, secs: u64) -> Response {
    resp.headers_mut()
        .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_formats() {
        assert_eq!(route("/api/v3/klines"), Some((Market::Spot, "klines")));
        assert_eq!(
            route("/dapi/v1/exchangeInfo"),
            Some((Market::Cm, "exchangeInfo"))
        );
        assert_eq!(route("/fapi/v1/"), None);
        assert_eq!(route("/fapi/v2/klines"), None);
        let d: Decimal = "46216.93".parse().unwrap();
        assert_eq!(format_decimal(Market::Spot, d), "46216.93000000");
        assert_eq!(format_decimal(Market::Um, d), "46216.93");
        assert_eq!(split_assets("BTCUSD_PERP"), ("BTC".into(), "USD".into()));
        assert_eq!(split_assets("BNBBTC"), ("BNB".into(), "BTC".into()));
        assert_eq!(number("01"), Some(1));
        assert_eq!(number("-1"), None);
    }
}
