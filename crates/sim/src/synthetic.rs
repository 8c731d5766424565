//! Deterministic synthetic candles: one candle at a time from a hash of (market, symbol,
//! period, open time). Owns no state and no I/O, so tests can compute any expected candle.

use qs_core::market::{Decimal, Kline, Market, PairKey, Source};

const SCALE: i128 = 100_000_000;
use qs_core::market::DAY_MS;

/// The closed candle opening at `open_time` (which should be on the period grid).
///
/// Invariants: `low <= open, close <= high`, at most 8 decimals, positive volumes, taker volumes
/// not above the totals, quote volume ≈ volume × average price (truncated), `trades > 0`.
pub fn candle(pair: &PairKey, open_time: i64) -> Kline {
    let seed = fnv1a(pair, open_time);
    let r = |i: u64| splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let level = price_level(pair, open_time);
    let tick = tick_for(level);
    let floor = |m: i128| (m / tick * tick).max(tick);
    let jitter =
        |x: u64, spread: u64| -> i128 { i128::from(x % (2 * spread + 1)) - i128::from(spread) };

    let open = floor(level * (10_000 + jitter(r(1), 50)) / 10_000);
    let close = floor(level * (10_000 + jitter(r(2), 50)) / 10_000);
    let high =
        floor(open.max(close) * (10_000 + i128::from(r(3) % 31)) / 10_000).max(open.max(close));
    let low =
        floor(open.min(close) * (10_000 - i128::from(r(4) % 31)) / 10_000).min(open.min(close));
    let avg = (open + high + low + close) / 4;
    let taker_share = i128::from(r(6) % 1001);

    let (volume, quote_volume, taker_buy_volume, taker_buy_quote_volume) =
        if pair.market == Market::Cm {
            // Volume in contracts; index 7/10 are the base-asset (coin) volumes.
            let size = contract_size(pair);
            let contracts = 1 + i128::from(r(5) % 100_000);
            let taker = contracts * taker_share / 1000;
            (
                contracts * SCALE,
                contracts * size * SCALE * SCALE / avg,
                taker * SCALE,
                taker * size * SCALE * SCALE / avg,
            )
        } else {
            let scale = (1_000_000_000_000 / level).clamp(1, 100);
            let volume = (1 + i128::from(r(5) % 100_000_000)) * 1000 * scale;
            let taker = volume * taker_share / 1000 / 1000 * 1000;
            (volume, volume * avg / SCALE, taker, taker * avg / SCALE)
        };
    Kline {
        pair: pair.clone(),
        open_time,
        close_time: pair.period.close_time(open_time),
        open: Decimal::from_mantissa(open),
        high: Decimal::from_mantissa(high),
        low: Decimal::from_mantissa(low),
        close: Decimal::from_mantissa(close),
        volume: Decimal::from_mantissa(volume),
        quote_volume: Decimal::from_mantissa(quote_volume),
        trades: 1 + r(7) % 50_000,
        taker_buy_volume: Decimal::from_mantissa(taker_buy_volume),
        taker_buy_quote_volume: Decimal::from_mantissa(taker_buy_quote_volume),
        is_final: true,
        source: Source::Rest,
    }
}

/// The in-progress candle opening at `open_time` as seen at `now_ms` (`open_time <= now_ms <
/// close_time`): a partial version of [`candle`] with `is_final == false`.
pub fn partial(pair: &PairKey, open_time: i64, now_ms: i64) -> Kline {
    partial_of(&candle(pair, open_time), now_ms)
}

/// Derives an in-progress view of a final candle at `now_ms`: volumes and trades scaled by the
/// elapsed share of the period (always below the final ones), close at the open during the first
/// half. Keeps every candle invariant.
pub(crate) fn partial_of(fin: &Kline, now_ms: i64) -> Kline {
    let len = i128::from((fin.close_time + 1 - fin.open_time).max(1));
    let p = (i128::from(now_ms - fin.open_time) * 1000 / len).clamp(0, 999);
    let cm = fin.pair.market == Market::Cm;
    let scale = |d: Decimal, contracts: bool| {
        let m = d.mantissa() * p / 1000;
        Decimal::from_mantissa(if contracts { m / SCALE * SCALE } else { m })
    };
    let close = if p < 500 { fin.open } else { fin.close };
    Kline {
        high: fin.open.max(close),
        low: fin.open.min(close),
        close,
        volume: scale(fin.volume, cm),
        quote_volume: scale(fin.quote_volume, false),
        trades: (u128::from(fin.trades) * p.unsigned_abs() / 1000) as u64,
        taker_buy_volume: scale(fin.taker_buy_volume, cm),
        taker_buy_quote_volume: scale(fin.taker_buy_quote_volume, false),
        is_final: false,
        ..fin.clone()
    }
}

/// Price level (mantissa, 8 decimals) around which the candle at `t` trades: a symbol's base
/// price moved by a ±30 % triangle wave over 180 days.
fn price_level(pair: &PairKey, t: i64) -> i128 {
    let base = base_price(pair);
    let period = 180 * DAY_MS;
    let offset = (hash_bytes(pair.symbol.as_str().as_bytes()) % 180) as i64 * DAY_MS;
    let phase = i128::from((t + offset).rem_euclid(period));
    let x = phase * 1200 / i128::from(period);
    let tri = if x < 600 { x - 300 } else { 900 - x };
    (base * (1000 + tri) / 1000).max(1)
}

/// A realistic base price (mantissa) per symbol.
fn base_price(pair: &PairKey) -> i128 {
    let s = pair.symbol.as_str();
    let fiat = |rest: &str| {
        ["USDT", "USD", "BUSD", "USDC", "FDUSD", "USD_PERP"]
            .iter()
            .any(|q| {
                rest.strip_prefix(q)
                    .is_some_and(|r| r.is_empty() || r.starts_with('_'))
            })
    };
    let whole = |v: i128| v * SCALE;
    if let Some(rest) = s.strip_prefix("BTC") {
        if fiat(rest) {
            return whole(30_000);
        }
    }
    if let Some(rest) = s.strip_prefix("ETH") {
        if fiat(rest) {
            return whole(2_000);
        }
        if rest == "BTC" {
            return 5_000_000; // 0.05
        }
    }
    if let Some(rest) = s.strip_prefix("BNB") {
        if fiat(rest) {
            return whole(300);
        }
        if rest == "BTC" {
            return 800_000; // 0.008
        }
    }
    let h = hash_bytes(s.as_bytes());
    if s.ends_with("BTC") {
        // 0.00001 .. 0.01 BTC
        return 1_000 + i128::from(h % 1_000_000);
    }
    // 0.5 .. 500 in the quote asset.
    SCALE / 2 + i128::from(h % 500) * SCALE
}

fn contract_size(pair: &PairKey) -> i128 {
    if pair.symbol.as_str().starts_with("BTC") {
        100
    } else {
        10
    }
}

/// Price step: about 7 significant digits, never below 1e-8.
fn tick_for(level: i128) -> i128 {
    let digits = level.max(1).ilog10() as i32 + 1;
    10i128.pow((digits - 7).max(0) as u32)
}

fn fnv1a(pair: &PairKey, open_time: i64) -> u64 {
    let mut bytes = Vec::with_capacity(48);
    bytes.extend_from_slice(pair.market.as_str().as_bytes());
    bytes.push(0xff);
    bytes.extend_from_slice(pair.symbol.as_str().as_bytes());
    bytes.push(0xff);
    bytes.extend_from_slice(pair.period.as_str().as_bytes());
    bytes.push(0xff);
    bytes.extend_from_slice(&open_time.to_le_bytes());
    hash_bytes(&bytes)
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix64(h)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qs_core::market::{PairKey, Period};

    #[test]
    fn candles_are_deterministic_and_valid() {
        for (m, s, p) in [
            ("spot", "BTCUSDT", "1m"),
            ("spot", "BNBBTC", "1h"),
            ("um", "ETHUSDT", "1d"),
            ("cm", "BTCUSD_PERP", "1M"),
            ("spot", "XYZUSDT", "1s"),
        ] {
            let pair = PairKey::parse(m, s, p).unwrap();
            let mut t = pair.period.align(1_700_000_000_000);
            for _ in 0..200 {
                let k = candle(&pair, t);
                assert_eq!(k, candle(&pair, t));
                assert!(
                    k.low <= k.open && k.low <= k.close && k.open <= k.high && k.close <= k.high
                );
                assert!(
                    k.low > Decimal::ZERO
                        && k.volume > Decimal::ZERO
                        && k.quote_volume > Decimal::ZERO
                );
                assert!(
                    k.taker_buy_volume <= k.volume && k.taker_buy_quote_volume <= k.quote_volume
                );
                assert!(k.trades > 0 && k.is_final);
                assert_eq!(k.close_time, pair.period.close_time(t));
                let part = partial(&pair, t, t + 1);
                assert!(!part.is_final && part != k);
                assert!(part.low <= part.open && part.close <= part.high);
                t = pair.period.next_open(t);
            }
        }
        assert_eq!(Period::M1.as_str(), "1m");
    }
}
