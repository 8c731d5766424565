//! The Binance-compatible REST facade's pure half: `GET {prefix}/klines` parameters parsed and
//! checked as Binance checks them (same error codes and messages), and stored candles rendered
//! in Binance's exact array format, so an unmodified Binance client (ccxt, freqtrade) pointed at
//! QuantService reads stored candles without spending the user's Binance weight.
//! This renderer is written apart from the simulator's on purpose: the tests compare the two.

use std::fmt::Write;

use crate::market::{Decimal, Kline, Market, PairKey, Period, Symbol};

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
/// order of checks. `param` looks a parameter up by name.
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
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(ApiError::StartAfterEnd);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::Source;

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
        ];
        for c in cases {
            let got = klines_query(c.market, params(c.query))
                .map(|q| (q.start, q.end, q.limit))
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
}
