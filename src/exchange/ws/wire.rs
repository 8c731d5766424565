//! The Binance WebSocket wire format: stream names, the combined-stream URL per market,
//! parsing of incoming frames (kline events from raw `/ws` or combined `/stream` connections,
//! replies to our requests) and serialising our SUBSCRIBE/UNSUBSCRIBE requests. Pure: no
//! sockets, no state; which stream goes where and when messages are sent is decided elsewhere.

use std::borrow::Cow;

use serde::Deserialize;

use crate::market::{Decimal, Kline, Market, PairKey, Period, Source, Symbol};

/// `<symbol lowercase>@kline_<interval>`.
pub fn stream_name(pair: &PairKey) -> String {
    format!(
        "{}@kline_{}",
        pair.symbol.as_str().to_ascii_lowercase(),
        pair.period
    )
}

/// The pair behind a stream name of `market` (the inverse of [`stream_name`]).
pub fn pair_of(market: Market, stream: &str) -> Option<PairKey> {
    let (sym, rest) = stream.split_once("@kline_")?;
    PairKey::parse(market.as_str(), &sym.to_ascii_uppercase(), rest).ok()
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

/// The connection URL carrying `streams` (all of them in the query; empty: the bare endpoint).
pub fn stream_url(combined: &str, streams: &[String]) -> String {
    if streams.is_empty() {
        combined.to_string()
    } else {
        format!("{combined}?streams={}", streams.join("/"))
    }
}

/// A SUBSCRIBE/UNSUBSCRIBE request: `{"method":…,"params":[…],"id":…}`.
pub fn control_message(method: &str, streams: &[String], id: u64) -> String {
    serde_json::json!({"method": method, "params": streams, "id": id}).to_string()
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

    #[test]
    fn requests_and_connection_urls_are_serialised() {
        let names = vec![
            "btcusdt@kline_1m".to_string(),
            "ethusdt@kline_1h".to_string(),
        ];
        let v: serde_json::Value =
            serde_json::from_str(&control_message("SUBSCRIBE", &names, 9)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m", "ethusdt@kline_1h"], "id": 9})
        );
        assert_eq!(
            stream_url("wss://h/stream", &names),
            "wss://h/stream?streams=btcusdt@kline_1m/ethusdt@kline_1h"
        );
        assert_eq!(stream_url("wss://h/stream", &[]), "wss://h/stream");
    }
}
