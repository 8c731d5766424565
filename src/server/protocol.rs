//! The client server's wire protocol (JSON text frames), pure: what a client may send, parsed
//! into [`Request`]s with errors that say which rule failed, and the frames the server sends,
//! rendered once per event so that one candle fanned out to thousands of clients is serialised
//! once. Prices and volumes travel as exact decimal strings, as Binance sends them.
//!
//! Client → server (`id` optional, echoed back):
//! `{"op":"subscribe","id":1,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m","since":1700000000000,"partial":false}`,
//! `{"op":"subscribe","channel":"indicators",…,"indicator":"macd(12,26,9)"}`,
//! `{"op":"unsubscribe","id":2,"channel":…}` (the same channel fields), `{"op":"list"}`,
//! `{"op":"ping"}`.

use serde_json::{Map, Value};

use crate::market::{Kline, PairKey};
use qs_core::indicators::Spec;

/// What a subscription is to: a pair's candles, or one indicator of a pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Klines(PairKey),
    Indicator(PairKey, Spec),
}

impl Channel {
    pub fn pair(&self) -> &PairKey {
        match self {
            Channel::Klines(p) | Channel::Indicator(p, _) => p,
        }
    }

    /// The channel's fields as a client writes them (for `list` and `subscribed`).
    fn fields(&self, out: &mut Map<String, Value>) {
        let pair = self.pair();
        let name = match self {
            Channel::Klines(_) => "klines",
            Channel::Indicator(..) => "indicators",
        };
        out.insert("channel".into(), name.into());
        out.insert("market".into(), pair.market.as_str().into());
        out.insert("symbol".into(), pair.symbol.as_str().into());
        out.insert("period".into(), pair.period.as_str().into());
        if let Channel::Indicator(_, spec) = self {
            out.insert("indicator".into(), spec.to_string().into());
        }
    }
}

/// A subscription request.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub channel: Channel,
    /// Replay stored rows with `open_time >= since` before the live ones; `None` = live only.
    pub since: Option<i64>,
    /// Also push in-progress candles (`is_final: false`), where the server has them.
    pub partial: bool,
}

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Subscribe(Subscribe),
    Unsubscribe(Channel),
    List,
    Ping,
}

/// A parsed client frame with its optional `id`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<u64>,
    pub op: Op,
}

/// The error codes of `{"op":"error"}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownPair,
    Unauthorized,
    Limit,
    /// The server cannot answer now (ClickHouse is unreachable during a replay).
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownPair => "unknown_pair",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Limit => "limit",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// A frame the client got wrong: the `id` when it could be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame {
    pub id: Option<u64>,
    pub message: String,
}

impl BadFrame {
    /// The error frame to send back.
    pub fn frame(&self) -> String {
        error(self.id, ErrorCode::BadRequest, &self.message)
    }
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Request, BadFrame> {
    let value: Value = serde_json::from_str(text).map_err(|e| BadFrame {
        id: None,
        message: format!("not JSON: {e}"),
    })?;
    let Value::Object(obj) = value else {
        return Err(BadFrame {
            id: None,
            message: "a request is a JSON object".into(),
        });
    };
    // The id first, so every later error can carry it.
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| BadFrame {
            id: None,
            message: format!("\"id\" must be a non-negative integer, not {v}"),
        })?),
    };
    let bad = |message: String| BadFrame { id, message };
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(v) => return Err(bad(format!("\"op\" must be a string, not {v}"))),
        None => return Err(bad("missing \"op\"".into())),
    };
    let op = match op {
        "subscribe" => {
            let channel = channel(&obj).map_err(bad)?;
            let since = match obj.get("since") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_i64().ok_or_else(|| {
                    bad(format!(
                        "\"since\" must be an open time in milliseconds, not {v}"
                    ))
                })?),
            };
            let partial = match obj.get("partial") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(bad(format!("\"partial\" must be true or false, not {v}"))),
            };
            Op::Subscribe(Subscribe {
                channel,
                since,
                partial,
            })
        }
        "unsubscribe" => Op::Unsubscribe(channel(&obj).map_err(bad)?),
        "list" => Op::List,
        "ping" => Op::Ping,
        other => {
            return Err(bad(format!(
                "unknown op {other:?} (expected subscribe, unsubscribe, list or ping)"
            )))
        }
    };
    Ok(Request { id, op })
}

/// The channel fields of a subscribe/unsubscribe frame.
fn channel(obj: &Map<String, Value>) -> Result<Channel, String> {
    let field = |name: &str| match obj.get(name) {
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(v) => Err(format!("\"{name}\" must be a string, not {v}")),
        None => Err(format!("missing \"{name}\"")),
    };
    let kind = field("channel")?;
    if kind != "klines" && kind != "indicators" {
        return Err(format!(
            "unknown channel {kind:?} (expected klines or indicators)"
        ));
    }
    let pair = PairKey::parse(field("market")?, field("symbol")?, field("period")?)
        .map_err(|e| e.to_string())?;
    if kind == "klines" {
        return Ok(Channel::Klines(pair));
    }
    let text = field("indicator")?;
    let spec = Spec::parse(text).map_err(|e| format!("bad indicator {text:?}: {e}"))?;
    Ok(Channel::Indicator(pair, spec))
}

fn with_id(mut obj: Map<String, Value>, id: Option<u64>) -> String {
    if let Some(id) = id {
        obj.insert("id".into(), id.into());
    }
    Value::Object(obj).to_string()
}

fn op(name: &str) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("op".into(), name.into());
    obj
}

/// `{"op":"subscribed","id":…}` with the channel's fields.
pub fn subscribed(id: Option<u64>, channel: &Channel) -> String {
    let mut obj = op("subscribed");
    channel.fields(&mut obj);
    with_id(obj, id)
}

/// `{"op":"unsubscribed","id":…}` with the channel's fields.
pub fn unsubscribed(id: Option<u64>, channel: &Channel) -> String {
    let mut obj = op("unsubscribed");
    channel.fields(&mut obj);
    with_id(obj, id)
}

/// `{"op":"list","id":…,"subscriptions":[…]}`.
pub fn list<'a>(id: Option<u64>, channels: impl IntoIterator<Item = &'a Channel>) -> String {
    let subs: Vec<Value> = channels
        .into_iter()
        .map(|c| {
            let mut obj = Map::new();
            c.fields(&mut obj);
            Value::Object(obj)
        })
        .collect();
    let mut obj = op("list");
    obj.insert("subscriptions".into(), subs.into());
    with_id(obj, id)
}

/// `{"op":"pong","id":…}`.
pub fn pong(id: Option<u64>) -> String {
    with_id(op("pong"), id)
}

/// `{"op":"error","id":…,"code":…,"message":…}`.
pub fn error(id: Option<u64>, code: ErrorCode, message: &str) -> String {
    let mut obj = op("error");
    obj.insert("code".into(), code.as_str().into());
    obj.insert("message".into(), message.into());
    with_id(obj, id)
}

/// A candle's data frame: `{"channel":"klines","market":…,"symbol":…,"period":…,"data":{…}}`.
/// Written by hand (a replay renders hundreds of thousands a second): every field is a number,
/// a decimal's digits or a market/symbol/period name, none of which needs escaping.
pub fn kline(k: &Kline) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(320);
    let _ = write!(
        out,
        "{{\"channel\":\"klines\",\"market\":\"{}\",\"symbol\":\"{}\",\"period\":\"{}\",\
         \"data\":{{\"open_time\":{},\"close_time\":{},\"open\":\"{}\",\"high\":\"{}\",\
         \"low\":\"{}\",\"close\":\"{}\",\"volume\":\"{}\",\"quote_volume\":\"{}\",\
         \"trades\":{},\"is_final\":{}}}}}",
        k.pair.market.as_str(),
        json_safe(k.pair.symbol.as_str()),
        k.pair.period.as_str(),
        k.open_time,
        k.close_time,
        k.open,
        k.high,
        k.low,
        k.close,
        k.volume,
        k.quote_volume,
        k.trades,
        k.is_final,
    );
    out
}

/// A symbol as it goes between JSON quotes: symbols are checked to be `[A-Z0-9_-]` when parsed,
/// so this only guards against a future change of that rule.
fn json_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        std::borrow::Cow::Borrowed(s)
    } else {
        let quoted = Value::from(s).to_string();
        std::borrow::Cow::Owned(quoted[1..quoted.len() - 1].to_string())
    }
}

/// An indicator's data frame at one candle, every output in one frame: the channel's fields,
/// then `"data":{"open_time":…,"values":{"macd":…,"signal":…,"hist":…}}` (`"value"` for a
/// single-output indicator). A value rewritten after a late candle is sent again, as a
/// correction, with `"correction":true`.
pub fn indicator(
    pair: &PairKey,
    spec: &str,
    open_time: i64,
    values: &[(&str, f64)],
    correction: bool,
) -> String {
    let mut data = Map::new();
    data.insert("open_time".into(), open_time.into());
    let mut vals = Map::new();
    for (name, v) in values {
        // JSON has no NaN: an undefined value is null.
        vals.insert((*name).into(), Value::from(*v));
    }
    data.insert("values".into(), vals.into());
    let mut obj = Map::new();
    obj.insert("channel".into(), "indicators".into());
    obj.insert("market".into(), pair.market.as_str().into());
    obj.insert("symbol".into(), pair.symbol.as_str().into());
    obj.insert("period".into(), pair.period.as_str().into());
    obj.insert("indicator".into(), spec.into());
    obj.insert("data".into(), data.into());
    if correction {
        obj.insert("correction".into(), true.into());
    }
    Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::{Decimal, Source};
    use serde_json::json;

    fn pair() -> PairKey {
        PairKey::parse("um", "BTCUSDT", "1m").unwrap()
    }

    #[test]
    fn good_frames_parse() {
        struct Case {
            name: &'static str,
            text: &'static str,
            want: Request,
        }
        let cases = [
            Case {
                name: "klines with a replay",
                text: r#"{"op":"subscribe","id":1,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m","since":1700000000000}"#,
                want: Request {
                    id: Some(1),
                    op: Op::Subscribe(Subscribe {
                        channel: Channel::Klines(pair()),
                        since: Some(1_700_000_000_000),
                        partial: false,
                    }),
                },
            },
            Case {
                name: "live only, with partial candles, no id",
                text: r#"{"op":"subscribe","channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m","partial":true}"#,
                want: Request {
                    id: None,
                    op: Op::Subscribe(Subscribe {
                        channel: Channel::Klines(pair()),
                        since: None,
                        partial: true,
                    }),
                },
            },
            Case {
                name: "an indicator, spec normalised",
                text: r#"{"op":"subscribe","id":7,"channel":"indicators","market":"um","symbol":"BTCUSDT","period":"1m","indicator":"MACD(12, 26, 9)"}"#,
                want: Request {
                    id: Some(7),
                    op: Op::Subscribe(Subscribe {
                        channel: Channel::Indicator(pair(), Spec::parse("macd(12,26,9)").unwrap()),
                        since: None,
                        partial: false,
                    }),
                },
            },
            Case {
                name: "unsubscribe",
                text: r#"{"op":"unsubscribe","id":2,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m"}"#,
                want: Request {
                    id: Some(2),
                    op: Op::Unsubscribe(Channel::Klines(pair())),
                },
            },
            Case {
                name: "list",
                text: r#"{"op":"list","id":3}"#,
                want: Request {
                    id: Some(3),
                    op: Op::List,
                },
            },
            Case {
                name: "ping",
                text: r#"{"op":"ping"}"#,
                want: Request {
                    id: None,
                    op: Op::Ping,
                },
            },
        ];
        for c in cases {
            assert_eq!(parse(c.text), Ok(c.want), "{}", c.name);
        }
    }

    #[test]
    fn bad_frames_say_which_rule_failed_and_keep_the_id() {
        struct Case {
            name: &'static str,
            text: &'static str,
            id: Option<u64>,
            says: &'static str,
        }
        let cases = [
            Case {
                name: "not JSON",
                text: "{op",
                id: None,
                says: "not JSON",
            },
            Case {
                name: "not an object",
                text: "[1]",
                id: None,
                says: "JSON object",
            },
            Case {
                name: "bad id",
                text: r#"{"op":"ping","id":-1}"#,
                id: None,
                says: "\"id\"",
            },
            Case {
                name: "no op",
                text: r#"{"id":4}"#,
                id: Some(4),
                says: "missing \"op\"",
            },
            Case {
                name: "unknown op",
                text: r#"{"op":"sub","id":5}"#,
                id: Some(5),
                says: "unknown op \"sub\"",
            },
            Case {
                name: "unknown channel",
                text: r#"{"op":"subscribe","id":6,"channel":"trades","market":"um","symbol":"BTCUSDT","period":"1m"}"#,
                id: Some(6),
                says: "unknown channel \"trades\"",
            },
            Case {
                name: "bad market",
                text: r#"{"op":"subscribe","id":8,"channel":"klines","market":"xx","symbol":"BTCUSDT","period":"1m"}"#,
                id: Some(8),
                says: "xx",
            },
            Case {
                name: "missing symbol",
                text: r#"{"op":"subscribe","id":9,"channel":"klines","market":"um","period":"1m"}"#,
                id: Some(9),
                says: "missing \"symbol\"",
            },
            Case {
                name: "bad spec",
                text: r#"{"op":"subscribe","id":10,"channel":"indicators","market":"um","symbol":"BTCUSDT","period":"1m","indicator":"macd(26,12,9)"}"#,
                id: Some(10),
                says: "bad indicator \"macd(26,12,9)\"",
            },
            Case {
                name: "since not a number",
                text: r#"{"op":"subscribe","id":11,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m","since":"yesterday"}"#,
                id: Some(11),
                says: "\"since\"",
            },
        ];
        for c in cases {
            let err = parse(c.text).expect_err(c.name);
            assert_eq!(err.id, c.id, "{}", c.name);
            assert!(err.message.contains(c.says), "{}: {}", c.name, err.message);
            let frame: Value = serde_json::from_str(&err.frame()).unwrap();
            assert_eq!(frame["op"], "error", "{}", c.name);
            assert_eq!(frame["code"], "bad_request", "{}", c.name);
        }
    }

    #[test]
    fn frames_render_exact_decimals_and_echo_ids() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let k = Kline {
            pair: pair(),
            open_time: 1_700_000_000_000,
            close_time: 1_700_000_059_999,
            open: d("37000.10"),
            high: d("37010.00000001"),
            low: d("36999.9"),
            close: d("37005"),
            volume: d("12.345"),
            quote_volume: d("456789.12345678"),
            trades: 321,
            taker_buy_volume: d("1"),
            taker_buy_quote_volume: d("2"),
            is_final: true,
            source: Source::Ws,
        };
        let v: Value = serde_json::from_str(&kline(&k)).unwrap();
        assert_eq!(
            v,
            json!({
                "channel": "klines", "market": "um", "symbol": "BTCUSDT", "period": "1m",
                "data": {
                    "open_time": 1_700_000_000_000i64, "close_time": 1_700_000_059_999i64,
                    "open": "37000.1", "high": "37010.00000001", "low": "36999.9",
                    "close": "37005", "volume": "12.345", "quote_volume": "456789.12345678",
                    "trades": 321, "is_final": true,
                },
            })
        );
        assert_eq!(json_safe("A\"B"), "A\\\"B");
        assert_eq!(v["channel"], "klines");
        assert_eq!(v["symbol"], "BTCUSDT");
        assert_eq!(v["data"]["open_time"], 1_700_000_000_000i64);
        assert_eq!(v["data"]["high"], k.high.to_string());
        assert_eq!(v["data"]["quote_volume"], k.quote_volume.to_string());
        assert_eq!(v["data"]["trades"], 321);
        assert_eq!(v["data"]["is_final"], true);

        let ch = Channel::Indicator(pair(), Spec::parse("rsi(14)").unwrap());
        let s: Value = serde_json::from_str(&subscribed(Some(9), &ch)).unwrap();
        assert_eq!(s["op"], "subscribed");
        assert_eq!(s["id"], 9);
        assert_eq!(s["indicator"], "rsi(14)");
        let l: Value = serde_json::from_str(&list(None, [&ch])).unwrap();
        assert_eq!(l["subscriptions"][0]["channel"], "indicators");
        assert!(l.get("id").is_none());
        let p: Value = serde_json::from_str(&pong(Some(1))).unwrap();
        assert_eq!(
            (p["op"].as_str(), p["id"].as_u64()),
            (Some("pong"), Some(1))
        );
        let e: Value = serde_json::from_str(&error(Some(2), ErrorCode::Limit, "too many")).unwrap();
        assert_eq!(e["code"], "limit");
        let iv: Value = serde_json::from_str(&indicator(
            &pair(),
            "macd(12,26,9)",
            5,
            &[("macd", 0.1 + 0.2), ("signal", f64::NAN), ("hist", -1.5)],
            true,
        ))
        .unwrap();
        assert_eq!(
            iv["data"]["values"]["macd"].as_f64().map(f64::to_bits),
            Some((0.1f64 + 0.2).to_bits())
        );
        assert!(iv["data"]["values"]["signal"].is_null());
        assert_eq!(iv["data"]["values"]["hist"], -1.5);
        assert_eq!(iv["correction"], true);
        assert_eq!(iv["indicator"], "macd(12,26,9)");
        let plain: Value =
            serde_json::from_str(&indicator(&pair(), "rsi(14)", 5, &[("value", 1.0)], false))
                .unwrap();
        assert!(plain.get("correction").is_none());
    }
}
