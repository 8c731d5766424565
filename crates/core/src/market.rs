//! Domain types shared by every module: markets, symbols, periods, exact decimals and klines.
//! Owns input validation for anything that can reach SQL; owns no I/O.

use std::fmt;
use std::str::FromStr;

/// Why a market, symbol, period or decimal was rejected. Never retryable: the input is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("unknown market {0:?}: expected one of spot, um, cm")]
    Market(String),
    #[error("invalid symbol {0:?}: expected 2 to 32 characters of A-Z, 0-9 and _ (e.g. BTCUSDT, BTCUSD_PERP)")]
    Symbol(String),
    #[error("invalid period {0:?}: expected one of {1}")]
    Period(String, String),
    #[error("period {period} is not offered on market {market} (only spot has 1s)")]
    PeriodNotOnMarket { period: Period, market: Market },
    #[error("invalid decimal {0:?}: {1}")]
    Decimal(String, &'static str),
}

/// The three Binance markets QuantService collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Market {
    /// Spot (`api/v3`).
    Spot,
    /// USD-M futures (`fapi`).
    Um,
    /// COIN-M futures (`dapi`).
    Cm,
}

impl Market {
    pub const ALL: [Market; 3] = [Market::Spot, Market::Um, Market::Cm];

    pub fn as_str(self) -> &'static str {
        match self {
            Market::Spot => "spot",
            Market::Um => "um",
            Market::Cm => "cm",
        }
    }

    /// The REST path prefix (`/api/v3/klines` → `/api/v3`).
    pub fn rest_prefix(self) -> &'static str {
        match self {
            Market::Spot => "/api/v3",
            Market::Um => "/fapi/v1",
            Market::Cm => "/dapi/v1",
        }
    }

    /// The archive folder below `data/` on data.binance.vision.
    pub fn archive_dir(self) -> &'static str {
        match self {
            Market::Spot => "spot",
            Market::Um => "futures/um",
            Market::Cm => "futures/cm",
        }
    }

    /// The largest `limit` a klines request may ask for.
    pub fn max_klines_limit(self) -> u32 {
        match self {
            Market::Spot => 1000,
            Market::Um | Market::Cm => 1500,
        }
    }

    /// The page size that gets the most candles per unit of weight: spot weighs 2 whatever
    /// the limit (so 1000); futures weigh 2 up to 499 rows and 10 for 1500 (so 499: 249.5
    /// candles per weight instead of 150).
    pub fn efficient_klines_limit(self) -> u32 {
        match self {
            Market::Spot => 1000,
            Market::Um | Market::Cm => 499,
        }
    }

    /// Request weight of one klines call: spot 2 flat; futures 1/2/5/10 by `limit`.
    pub fn klines_weight(self, limit: u32) -> u32 {
        match self {
            Market::Spot => 2,
            Market::Um | Market::Cm => match limit {
                0..=99 => 1,
                100..=499 => 2,
                500..=1000 => 5,
                _ => 10,
            },
        }
    }

    /// Request weight of `exchangeInfo`.
    pub fn exchange_info_weight(self) -> u32 {
        match self {
            Market::Spot => 20,
            Market::Um | Market::Cm => 1,
        }
    }
}

impl fmt::Display for Market {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Market {
    type Err = InputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spot" => Ok(Market::Spot),
            "um" => Ok(Market::Um),
            "cm" => Ok(Market::Cm),
            _ => Err(InputError::Market(s.to_string())),
        }
    }
}

/// A validated Binance symbol: `^[A-Z0-9_]{2,32}$`. Safe to use in identifiers (view names).
/// Shared (`Arc<str>`): every kline carries its pair, and cloning must not allocate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Symbol(std::sync::Arc<str>);

impl Symbol {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Symbol {
    type Err = InputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (2..=32).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Symbol(std::sync::Arc::from(s)))
        } else {
            Err(InputError::Symbol(s.to_string()))
        }
    }
}

/// A Binance kline interval. `1s` exists on spot only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    S1,
    M1,
    M3,
    M5,
    M15,
    M30,
    H1,
    H2,
    H4,
    H6,
    H8,
    H12,
    D1,
    D3,
    W1,
    Mo1,
}

impl Period {
    pub const ALL: [Period; 16] = [
        Period::S1,
        Period::M1,
        Period::M3,
        Period::M5,
        Period::M15,
        Period::M30,
        Period::H1,
        Period::H2,
        Period::H4,
        Period::H6,
        Period::H8,
        Period::H12,
        Period::D1,
        Period::D3,
        Period::W1,
        Period::Mo1,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::S1 => "1s",
            Period::M1 => "1m",
            Period::M3 => "3m",
            Period::M5 => "5m",
            Period::M15 => "15m",
            Period::M30 => "30m",
            Period::H1 => "1h",
            Period::H2 => "2h",
            Period::H4 => "4h",
            Period::H6 => "6h",
            Period::H8 => "8h",
            Period::H12 => "12h",
            Period::D1 => "1d",
            Period::D3 => "3d",
            Period::W1 => "1w",
            Period::Mo1 => "1M",
        }
    }

    /// Length in milliseconds, the longest month (31 days) for `1M`: for windows of `n`
    /// periods that must never be too narrow.
    pub fn longest_ms(self) -> i64 {
        self.fixed_ms().unwrap_or(31 * 86_400_000)
    }

    /// Fixed length in milliseconds, or `None` for `1M` (calendar months vary).
    pub fn fixed_ms(self) -> Option<i64> {
        const MIN: i64 = 60_000;
        Some(match self {
            Period::S1 => 1_000,
            Period::M1 => MIN,
            Period::M3 => 3 * MIN,
            Period::M5 => 5 * MIN,
            Period::M15 => 15 * MIN,
            Period::M30 => 30 * MIN,
            Period::H1 => 60 * MIN,
            Period::H2 => 120 * MIN,
            Period::H4 => 240 * MIN,
            Period::H6 => 360 * MIN,
            Period::H8 => 480 * MIN,
            Period::H12 => 720 * MIN,
            Period::D1 => 1_440 * MIN,
            Period::D3 => 3 * 1_440 * MIN,
            Period::W1 => 7 * 1_440 * MIN,
            Period::Mo1 => return None,
        })
    }

    /// The interval's name in archive paths: `1mo` for `1M`, the API name otherwise.
    pub fn archive_name(self) -> &'static str {
        match self {
            Period::Mo1 => "1mo",
            other => other.as_str(),
        }
    }

    /// Whether data.binance.vision publishes daily files for it (only `1s` up to `1d`).
    pub fn has_daily_archive(self) -> bool {
        !matches!(self, Period::D3 | Period::W1 | Period::Mo1)
    }

    /// The open time of the candle containing `t` (ms). Weeks start on Monday 00:00 UTC,
    /// months on the 1st; other periods are multiples of their length since the epoch.
    pub fn align(self, t: i64) -> i64 {
        const DAY: i64 = DAY_MS;
        match self {
            Period::Mo1 => month_start(t),
            // 1970-01-05 was the first Monday after the epoch.
            Period::W1 => (t - 4 * DAY).div_euclid(7 * DAY) * 7 * DAY + 4 * DAY,
            other => {
                let len = other.fixed_ms().unwrap_or(DAY);
                t.div_euclid(len) * len
            }
        }
    }

    /// The open time of the candle after the one opening at `open_time`.
    pub fn next_open(self, open_time: i64) -> i64 {
        match self.fixed_ms() {
            Some(len) => open_time.saturating_add(len),
            None => next_month_start(open_time),
        }
    }

    /// Binance's close time for a candle: the next open minus 1 ms.
    pub fn close_time(self, open_time: i64) -> i64 {
        self.next_open(open_time) - 1
    }

    /// Whether Binance offers this interval on `market`.
    pub fn valid_on(self, market: Market) -> bool {
        self != Period::S1 || market == Market::Spot
    }

    /// Parses and checks that the interval exists on `market`.
    pub fn parse_for(s: &str, market: Market) -> Result<Period, InputError> {
        let period: Period = s.parse()?;
        if period.valid_on(market) {
            Ok(period)
        } else {
            Err(InputError::PeriodNotOnMarket { period, market })
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Period {
    type Err = InputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Period::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = Period::ALL.iter().map(|p| p.as_str()).collect();
                InputError::Period(s.to_string(), all.join(", "))
            })
    }
}

/// One validated (market, symbol, period) triple: the key of everything per pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    pub market: Market,
    pub symbol: Symbol,
    pub period: Period,
}

impl PairKey {
    /// Validates all three parts; the error names the first bad one.
    pub fn parse(market: &str, symbol: &str, period: &str) -> Result<PairKey, InputError> {
        let market: Market = market.parse()?;
        let symbol: Symbol = symbol.parse()?;
        let period = Period::parse_for(period, market)?;
        Ok(PairKey {
            market,
            symbol,
            period,
        })
    }

    /// The per-pair view name existing users query, e.g. `klines_btcusdt_spot_1m`.
    /// Built only from validated parts, so it is a safe identifier.
    pub fn view_name(&self) -> String {
        format!(
            "klines_{}_{}_{}",
            self.symbol.as_str().to_ascii_lowercase(),
            self.market,
            self.period
        )
    }
}

impl fmt::Display for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.market, self.symbol, self.period)
    }
}

/// An exact decimal with 8 fractional digits, stored as ClickHouse `Decimal(38, 8)`.
///
/// Binance prints prices and volumes with at most 8 decimals. Parsing is exact: a value with a
/// non-zero ninth decimal is rejected rather than rounded, so no digit is ever lost silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Decimal(i128);

impl Decimal {
    pub const SCALE: u32 = 8;
    const FACTOR: i128 = 100_000_000;
    /// Decimal(38, _) holds at most 38 digits in total.
    const MAX_ABS: i128 = 10i128.pow(38) - 1;

    pub const ZERO: Decimal = Decimal(0);

    /// The raw value scaled by 10^8 (what ClickHouse stores).
    #[inline]
    pub fn mantissa(self) -> i128 {
        self.0
    }

    #[inline]
    pub fn from_mantissa(m: i128) -> Decimal {
        Decimal(m)
    }
}

impl FromStr for Decimal {
    type Err = InputError;
    // Hot in every decode path (archives, REST, WebSocket): inlinable across the crate line.
    #[inline]
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| InputError::Decimal(s.to_string(), why);
        let (neg, body) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = match body.split_once('.') {
            Some((i, f)) => (i, f),
            None => (body, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad("no digits"));
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("only digits, one '.' and a leading sign are allowed"));
        }
        let frac_trimmed = frac.trim_end_matches('0');
        if frac_trimmed.len() > Self::SCALE as usize {
            return Err(bad("more than 8 significant decimals would be rounded"));
        }
        let int_trimmed = int.trim_start_matches('0');
        if int_trimmed.len() > 30 {
            return Err(bad("more than 30 integer digits do not fit Decimal(38, 8)"));
        }
        let mut m: i128 = 0;
        for b in int_trimmed.bytes() {
            m = m * 10 + i128::from(b - b'0');
        }
        let mut frac_m: i128 = 0;
        for i in 0..Self::SCALE as usize {
            let d = frac_trimmed.as_bytes().get(i).map_or(0, |b| b - b'0');
            frac_m = frac_m * 10 + i128::from(d);
        }
        let m = m * Self::FACTOR + frac_m;
        if m > Self::MAX_ABS {
            return Err(bad("does not fit Decimal(38, 8)"));
        }
        Ok(Decimal(if neg { -m } else { m }))
    }
}

impl fmt::Display for Decimal {
    /// Shortest exact form: trailing fractional zeros are dropped (`46216.93`, `0`, `-1.5`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let abs = self.0.unsigned_abs();
        let factor = Self::FACTOR.unsigned_abs();
        let int = abs / factor;
        let frac = abs % factor;
        if self.0 < 0 {
            f.write_str("-")?;
        }
        write!(f, "{int}")?;
        if frac != 0 {
            let digits = format!("{frac:08}");
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        Ok(())
    }
}

/// Where a candle came from; stored in `klines.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Rest,
    Archive,
    Ws,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Rest => "rest",
            Source::Archive => "archive",
            Source::Ws => "ws",
        }
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rest" => Ok(Source::Rest),
            "archive" => Ok(Source::Archive),
            "ws" => Ok(Source::Ws),
            other => Err(format!("unknown kline source {other:?}")),
        }
    }
}

/// One candle exactly as Binance printed it. Times are Unix milliseconds UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kline {
    pub pair: PairKey,
    pub open_time: i64,
    pub close_time: i64,
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    pub volume: Decimal,
    pub quote_volume: Decimal,
    pub trades: u64,
    pub taker_buy_volume: Decimal,
    pub taker_buy_quote_volume: Decimal,
    /// `true` once the candle has closed (Binance's `x`); in-progress candles are provisional.
    pub is_final: bool,
    pub source: Source,
}

impl Kline {
    /// Parses one row of Binance's 12-column kline layout (archive CSV or REST array as
    /// strings): open_time, open, high, low, close, volume, close_time, quote_volume, trades,
    /// taker_buy_volume, taker_buy_quote_volume, ignore. Microsecond times are normalised to ms.
    #[inline]
    pub fn from_fields(
        pair: PairKey,
        fields: &[&str],
        is_final: bool,
        source: Source,
    ) -> Result<Kline, String> {
        if fields.len() < 11 {
            return Err(format!(
                "expected at least 11 kline fields, got {}",
                fields.len()
            ));
        }
        let int = |i: usize, name: &str| -> Result<i64, String> {
            fields[i]
                .trim()
                .parse::<i64>()
                .map_err(|e| format!("{name} {:?}: {e}", fields[i]))
        };
        let dec = |i: usize| -> Result<Decimal, String> {
            fields[i]
                .trim()
                .parse::<Decimal>()
                .map_err(|e| e.to_string())
        };
        let trades = fields[8]
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("trades {:?}: {e}", fields[8]))?;
        Ok(Kline {
            pair,
            open_time: normalize_ms(int(0, "open_time")?),
            open: dec(1)?,
            high: dec(2)?,
            low: dec(3)?,
            close: dec(4)?,
            volume: dec(5)?,
            close_time: normalize_ms(int(6, "close_time")?),
            quote_volume: dec(7)?,
            trades,
            taker_buy_volume: dec(9)?,
            taker_buy_quote_volume: dec(10)?,
            is_final,
            source,
        })
    }
}

// Time helpers live in `crate::time`; re-exported here for the many callers that import them
// with the other market types.
pub use crate::time::{
    day_label, month_label, month_start, next_month_start, normalize_ms, now_ms, CM_MAX_RANGE_MS,
    DAY_MS,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_round_trips_binance_digits() {
        for (input, printed) in [
            ("46216.93000000", "46216.93"),
            ("0.00000001", "0.00000001"),
            ("0", "0"),
            ("-1.50", "-1.5"),
            (
                "1234567890123456789012.12345678",
                "1234567890123456789012.12345678",
            ),
            (".5", "0.5"),
            ("7.", "7"),
        ] {
            let d: Decimal = input.parse().unwrap();
            assert_eq!(d.to_string(), printed, "{input}");
        }
        assert_eq!(
            "46216.93".parse::<Decimal>().unwrap().mantissa(),
            4_621_693_000_000
        );
    }

    #[test]
    fn decimal_rejects_lossy_or_malformed_input() {
        for bad in [
            "",
            ".",
            "-",
            "1.000000001",
            "1e5",
            "1,5",
            "abc",
            " 1",
            "1234567890123456789012345678901",
        ] {
            assert!(bad.parse::<Decimal>().is_err(), "{bad:?} accepted");
        }
        // Trailing zeros beyond 8 decimals lose nothing and are accepted.
        assert_eq!("1.0000000000".parse::<Decimal>().unwrap().to_string(), "1");
    }

    #[test]
    fn symbols_markets_periods_validate() {
        assert!("BTCUSDT".parse::<Symbol>().is_ok());
        assert!("BTCUSD_PERP".parse::<Symbol>().is_ok());
        for bad in ["btcusdt", "B", "BTC-USDT", "BTC'; DROP TABLE klines;--", ""] {
            assert!(bad.parse::<Symbol>().is_err(), "{bad:?} accepted");
        }
        assert!("xx".parse::<Market>().is_err());
        assert_eq!(Period::parse_for("1s", Market::Spot).unwrap(), Period::S1);
        assert!(matches!(
            Period::parse_for("1s", Market::Um),
            Err(InputError::PeriodNotOnMarket { .. })
        ));
        assert!(Period::parse_for("2m", Market::Spot).is_err());
        assert_eq!(Period::parse_for("1M", Market::Cm).unwrap(), Period::Mo1);
    }

    #[test]
    fn view_names_follow_the_seed_convention() {
        let key = PairKey::parse("spot", "BTCUSDT", "1m").unwrap();
        assert_eq!(key.view_name(), "klines_btcusdt_spot_1m");
        let key = PairKey::parse("cm", "BTCUSD_PERP", "1h").unwrap();
        assert_eq!(key.view_name(), "klines_btcusd_perp_cm_1h");
    }

    #[test]
    fn period_alignment_and_steps() {
        // 2024-02-15 13:37:00 UTC
        let t = 1_708_004_220_000;
        assert_eq!(Period::H1.align(t), 1_708_002_000_000);
        assert_eq!(Period::D1.align(t), 1_707_955_200_000);
        // Monday 2024-02-12 00:00 UTC.
        assert_eq!(Period::W1.align(t), 1_707_696_000_000);
        // 2024-02-01, then 2024-03-01 (leap February).
        assert_eq!(Period::Mo1.align(t), 1_706_745_600_000);
        assert_eq!(Period::Mo1.next_open(1_706_745_600_000), 1_709_251_200_000);
        assert_eq!(Period::Mo1.close_time(1_706_745_600_000), 1_709_251_199_999);
        // December rolls over the year.
        assert_eq!(next_month_start(1_703_980_800_000), 1_704_067_200_000);
        assert_eq!(Period::M1.close_time(1_640_995_200_000), 1_640_995_259_999);
        assert_eq!(month_label(t), "2024-02");
        assert_eq!(day_label(t), "2024-02-15");
        assert_eq!(Period::Mo1.archive_name(), "1mo");
        assert!(Period::D1.has_daily_archive() && !Period::W1.has_daily_archive());
    }

    #[test]
    fn weights_follow_the_fact_sheet() {
        assert_eq!(Market::Spot.klines_weight(1000), 2);
        assert_eq!(Market::Um.klines_weight(99), 1);
        assert_eq!(Market::Um.klines_weight(100), 2);
        assert_eq!(Market::Cm.klines_weight(499), 2);
        assert_eq!(Market::Cm.klines_weight(1000), 5);
        assert_eq!(Market::Um.klines_weight(1500), 10);
    }

    #[test]
    fn microsecond_timestamps_are_normalised() {
        assert_eq!(normalize_ms(1_735_689_600_000_000), 1_735_689_600_000);
        assert_eq!(normalize_ms(1_735_689_600_000), 1_735_689_600_000);
        assert_eq!(normalize_ms(i64::MIN), i64::MIN / 1000);
    }
}
