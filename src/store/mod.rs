//! ClickHouse access: the client built from `app.clickhouse`, server version, error
//! classification, and reads of stored klines. Schema changes live in `migrate`, batched kline
//! inserts in `writer`, the tracking of partitions that need an `OPTIMIZE` in `partitions`,
//! pages of candles as Binance's klines endpoint pages them (the REST facade's reads) in
//! `pages`. Exchange I/O is not here.

pub mod backtests;
pub mod indicators;
pub mod migrate;
mod native;
mod pages;
pub mod partitions;
pub mod replay;
pub mod state;
pub mod writer;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Client;
use serde::{Deserialize, Serialize};

use crate::config::{is_identifier, ClickHouseConfig};
use crate::market::{Decimal, Kline, PairKey, Source};

/// A ClickHouse failure, classified so callers know whether retrying can help.
/// Messages never contain the password (they are scrubbed before they are built).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("ClickHouse at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("ClickHouse at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("ClickHouse refused the credentials of user {user:?} at {url}: {message}")]
    Auth {
        url: String,
        user: String,
        message: String,
    },
    #[error("ClickHouse error {code}: {message}")]
    Server { code: u32, message: String },
    #[error("unexpected reply from ClickHouse: {0}")]
    Protocol(String),
    #[error("{0}")]
    Invalid(String),
    #[error("migration {name} failed: {source}")]
    Migration {
        name: String,
        source: Box<StoreError>,
    },
}

impl StoreError {
    /// Whether the same request may succeed later (server down, overloaded, timeout).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } | StoreError::Timeout { .. } => true,
            StoreError::Server { code, .. } => RETRYABLE_CODES.contains(code),
            StoreError::Migration { source, .. } => source.is_retryable(),
            StoreError::Auth { .. } | StoreError::Protocol(_) | StoreError::Invalid(_) => false,
        }
    }

    /// The ClickHouse error code, when the server sent one.
    pub fn code(&self) -> Option<u32> {
        match self {
            StoreError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Server error codes that mean "try again": too many parts/queries, memory, timeouts,
/// network between replicas, table read-only during restart, shutdown in progress.
const RETRYABLE_CODES: &[u32] = &[
    3, 159, 160, 164, 202, 203, 209, 210, 241, 242, 252, 285, 319, 425, 999,
];
/// Authentication failures (wrong password, unknown user, required password).
const AUTH_CODES: &[u32] = &[192, 193, 194, 195, 516];

/// A parsed `SELECT version()` (`18.16.1`, `23.8.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ServerVersion {
    pub fn parse(s: &str) -> Option<ServerVersion> {
        let mut parts = s.trim().split('.').map(|p| p.parse::<u32>().ok());
        Some(ServerVersion {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next().flatten().unwrap_or(0),
        })
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The ClickHouse connection the daemon uses: one per effective `app.clickhouse` section.
#[derive(Clone)]
pub struct Store {
    /// Bound to `app.clickhouse.database`.
    client: Client,
    /// Same server, no database (works before the database exists).
    server: Client,
    database: String,
    url: String,
    user: String,
    password: String,
    timeout: Duration,
    /// Bounds the queries in flight (a thousand pair tasks must not open a thousand HTTP
    /// requests at once: ClickHouse refuses more than `max_concurrent_queries`). The writer's
    /// inserts do not wait for it.
    queries: Arc<tokio::sync::Semaphore>,
}

/// Queries in flight per `Store` (the writer's inserts come on top).
pub const MAX_CONCURRENT_QUERIES: usize = 16;

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Builds the clients; performs no I/O. The database name must be an identifier (it is
    /// interpolated into DDL, which cannot bind identifiers).
    pub fn new(cfg: &ClickHouseConfig) -> Result<Store, StoreError> {
        if !is_identifier(&cfg.database) {
            return Err(StoreError::Invalid(format!(
                "database name {:?} is not an identifier",
                cfg.database
            )));
        }
        let url = cfg.url();
        // 18.16 rejects the settings the crate's schema validation sends, and has no
        // RowBinaryWithNamesAndTypes input; validation is off and rows are plain RowBinary.
        let mut server = Client::default()
            .with_url(&url)
            .with_user(&cfg.username)
            .with_validation(false);
        if !cfg.password.is_empty() {
            server = server.with_password(cfg.password.expose());
        }
        let client = server.clone().with_database(&cfg.database);
        Ok(Store {
            client,
            server,
            database: cfg.database.clone(),
            url,
            user: cfg.username.clone(),
            password: cfg.password.expose().to_string(),
            timeout: cfg.timeout,
            queries: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_QUERIES)),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The engine of `name` in the configured database, or `None` if it does not exist.
    pub async fn table_engine(&self, name: &str) -> Result<Option<String>, StoreError> {
        let rows: Vec<String> = self
            .call(
                self.server
                    .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
                    .bind(self.database.as_str())
                    .bind(name)
                    .fetch_all::<String>(),
            )
            .await?;
        Ok(rows.into_iter().next())
    }

    /// Runs `fut` under `app.clickhouse.timeout` (and the bound on queries in flight) and
    /// classifies its error.
    pub async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, StoreError> {
        // The semaphore is never closed; if it were, running unbounded is the safe fallback.
        let _permit = self.queries.acquire().await.ok();
        self.call_with_timeout(self.timeout, fut).await
    }

    pub async fn call_with_timeout<T>(
        &self,
        timeout: Duration,
        fut: impl Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(StoreError::Timeout {
                url: self.url.clone(),
                timeout,
            }),
        }
    }

    /// Maps a client error to a `StoreError`, scrubbing the password from every message.
    pub fn classify(&self, e: &clickhouse::error::Error) -> StoreError {
        use clickhouse::error::Error as E;
        let message = self.scrub(&crate::error_chain(e));
        match e {
            E::Network(_) => StoreError::Unreachable {
                url: self.url.clone(),
                message,
            },
            E::TimedOut => StoreError::Timeout {
                url: self.url.clone(),
                timeout: self.timeout,
            },
            E::BadResponse(text) => match server_code(text) {
                Some(code) if AUTH_CODES.contains(&code) => StoreError::Auth {
                    url: self.url.clone(),
                    user: self.user.clone(),
                    message: self.scrub(&short_server_message(text)),
                },
                Some(code) => StoreError::Server {
                    code,
                    message: self.scrub(&short_server_message(text)),
                },
                None => StoreError::Protocol(message),
            },
            _ => StoreError::Protocol(message),
        }
    }

    fn scrub(&self, s: &str) -> String {
        if self.password.is_empty() {
            s.to_string()
        } else {
            s.replace(&self.password, "***")
        }
    }

    /// `SELECT version()` without needing the database to exist.
    pub async fn server_version(&self) -> Result<ServerVersion, StoreError> {
        let text: String = self
            .call(self.server.query("SELECT version()").fetch_one::<String>())
            .await?;
        ServerVersion::parse(&text)
            .ok_or_else(|| StoreError::Protocol(format!("cannot parse server version {text:?}")))
    }

    /// `SELECT 1` within `timeout`, without the database and outside the bound on queries in
    /// flight (a health probe must not queue behind the pair tasks' reads).
    pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        self.call_with_timeout(timeout, self.server.query("SELECT 1").fetch_one::<u8>())
            .await
            .map(|_| ())
    }

    /// `CREATE DATABASE IF NOT EXISTS` for `app.clickhouse.database`.
    pub async fn ensure_database(&self) -> Result<(), StoreError> {
        let sql = format!("CREATE DATABASE IF NOT EXISTS `{}`", self.database);
        self.call(self.server.query(&sql).execute()).await
    }

    /// Runs one statement against the configured database.
    pub async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        self.call(self.client.query(sql).execute()).await
    }

    /// Runs a `SELECT {KLINE_COLUMNS} …` and converts its rows to candles.
    pub(crate) async fn fetch_klines(
        &self,
        query: clickhouse::query::Query,
    ) -> Result<Vec<Kline>, StoreError> {
        let rows = self.call(query.fetch_all::<KlineRow<String>>()).await?;
        rows.into_iter()
            .map(KlineRow::into_kline)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Protocol)
    }

    /// The stored candles of one pair in `[from, to)`, deduplicated (`FINAL`), by open time.
    pub async fn klines(
        &self,
        pair: &PairKey,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Kline>, StoreError> {
        self.fetch_klines(
            self.client
                .query(&format!(
                    "SELECT {KLINE_COLUMNS} FROM klines FINAL \
                     WHERE market = ? AND symbol = ? AND period = ? \
                     AND open_time >= ? AND open_time < ? ORDER BY open_time"
                ))
                .bind(pair.market.as_str())
                .bind(pair.symbol.as_str())
                .bind(pair.period.as_str())
                .bind(from_ms)
                .bind(to_ms),
        )
        .await
    }
}

impl Store {
    /// Open times of the pair's closed candles stored in `[from, to)`.
    pub async fn final_open_times(
        &self,
        pair: &PairKey,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        self.call(
            self.client
                .query(
                    "SELECT DISTINCT open_time FROM klines \
                     WHERE market = ? AND symbol = ? AND period = ? AND is_final = 1 \
                     AND open_time >= ? AND open_time < ?",
                )
                .bind(pair.market.as_str())
                .bind(pair.symbol.as_str())
                .bind(pair.period.as_str())
                .bind(from_ms)
                .bind(to_ms)
                .fetch_all::<i64>(),
        )
        .await
    }

    /// Exchange-confirmed gaps `[start, end)` of the pair overlapping `[from, to)`.
    pub async fn exchange_gaps(
        &self,
        pair: &PairKey,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        self.call(
            self.client
                .query(
                    "SELECT start_ms, end_ms FROM exchange_gaps FINAL \
                     WHERE market = ? AND symbol = ? AND period = ? \
                     AND end_ms > ? AND start_ms < ? ORDER BY start_ms",
                )
                .bind(pair.market.as_str())
                .bind(pair.symbol.as_str())
                .bind(pair.period.as_str())
                .bind(from_ms)
                .bind(to_ms)
                .fetch_all::<(i64, i64)>(),
        )
        .await
    }

    /// Records that Binance has no candles for the pair in `[start, end)`.
    pub async fn record_gap(
        &self,
        pair: &PairKey,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(
            self.client
                .query(
                    "INSERT INTO exchange_gaps (market, symbol, period, start_ms, end_ms) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(pair.market.as_str())
                .bind(pair.symbol.as_str())
                .bind(pair.period.as_str())
                .bind(start_ms)
                .bind(end_ms)
                .execute(),
        )
        .await
    }
}

/// One `klines` row in column order, used for RowBinary inserts (borrowing the kline's
/// strings: no allocation per row) and reads (owning them) alike.
#[derive(clickhouse::Row, Serialize, Deserialize)]
pub(crate) struct KlineRow<S> {
    market: S,
    symbol: S,
    period: S,
    open_time: i64,
    close_time: i64,
    open: i128,
    high: i128,
    low: i128,
    close: i128,
    volume: i128,
    quote_volume: i128,
    trades: u64,
    taker_buy_volume: i128,
    taker_buy_quote_volume: i128,
    is_final: u8,
    source: S,
    ingested_at: i64,
    version: u64,
}

/// The columns of `KlineRow`, in order, for SELECTs.
const KLINE_COLUMNS: &str = "market, symbol, period, open_time, close_time, open, high, low, \
    close, volume, quote_volume, trades, taker_buy_volume, taker_buy_quote_volume, is_final, \
    source, ingested_at, version";

/// The columns of [`PairKlineRow`], in order: a candle of a pair the query names, without the
/// key and bookkeeping columns (a series or a page decodes no more than it carries).
pub(crate) const PAIR_KLINE_COLUMNS: &str = "open_time, close_time, open, high, low, close, \
    volume, quote_volume, trades, taker_buy_volume, taker_buy_quote_volume, is_final, source";

/// A candle of a known pair, as reads of one pair's rows get it.
#[derive(clickhouse::Row, Deserialize)]
pub(crate) struct PairKlineRow {
    open_time: i64,
    close_time: i64,
    open: i128,
    high: i128,
    low: i128,
    close: i128,
    volume: i128,
    quote_volume: i128,
    trades: u64,
    taker_buy_volume: i128,
    taker_buy_quote_volume: i128,
    is_final: u8,
    source: String,
}

impl PairKlineRow {
    fn into_kline(self, pair: &PairKey) -> Result<Kline, String> {
        let d = Decimal::from_mantissa;
        Ok(Kline {
            pair: pair.clone(),
            open_time: self.open_time,
            close_time: self.close_time,
            open: d(self.open),
            high: d(self.high),
            low: d(self.low),
            close: d(self.close),
            volume: d(self.volume),
            quote_volume: d(self.quote_volume),
            trades: self.trades,
            taker_buy_volume: d(self.taker_buy_volume),
            taker_buy_quote_volume: d(self.taker_buy_quote_volume),
            is_final: self.is_final != 0,
            source: self.source.parse()?,
        })
    }
}

impl Store {
    /// Runs a `SELECT {PAIR_KLINE_COLUMNS} …` of `pair`'s rows.
    pub(crate) async fn fetch_pair_klines(
        &self,
        pair: &PairKey,
        query: clickhouse::query::Query,
    ) -> Result<Vec<Kline>, StoreError> {
        let rows = self.call(query.fetch_all::<PairKlineRow>()).await?;
        rows.into_iter()
            .map(|r| r.into_kline(pair))
            .collect::<Result<_, _>>()
            .map_err(StoreError::Protocol)
    }
}

/// ReplacingMergeTree version: closed candles beat in-progress ones, then newer ingests win.
pub fn row_version(is_final: bool, ingested_us: u64) -> u64 {
    (u64::from(is_final) << 63) | (ingested_us & !(1u64 << 63))
}

impl<'a> KlineRow<&'a str> {
    pub(crate) fn new(k: &'a Kline, ingested_us: u64) -> KlineRow<&'a str> {
        KlineRow {
            market: k.pair.market.as_str(),
            symbol: k.pair.symbol.as_str(),
            period: k.pair.period.as_str(),
            open_time: k.open_time,
            close_time: k.close_time,
            open: k.open.mantissa(),
            high: k.high.mantissa(),
            low: k.low.mantissa(),
            close: k.close.mantissa(),
            volume: k.volume.mantissa(),
            quote_volume: k.quote_volume.mantissa(),
            trades: k.trades,
            taker_buy_volume: k.taker_buy_volume.mantissa(),
            taker_buy_quote_volume: k.taker_buy_quote_volume.mantissa(),
            is_final: u8::from(k.is_final),
            source: k.source.as_str(),
            ingested_at: i64::try_from(ingested_us / 1000).unwrap_or(i64::MAX),
            version: row_version(k.is_final, ingested_us),
        }
    }
}

impl KlineRow<String> {
    fn into_kline(self) -> Result<Kline, String> {
        let d = Decimal::from_mantissa;
        Ok(Kline {
            pair: PairKey::parse(&self.market, &self.symbol, &self.period)
                .map_err(|e| format!("stored row has {e}"))?,
            open_time: self.open_time,
            close_time: self.close_time,
            open: d(self.open),
            high: d(self.high),
            low: d(self.low),
            close: d(self.close),
            volume: d(self.volume),
            quote_volume: d(self.quote_volume),
            trades: self.trades,
            taker_buy_volume: d(self.taker_buy_volume),
            taker_buy_quote_volume: d(self.taker_buy_quote_volume),
            is_final: self.is_final != 0,
            source: self.source.parse::<Source>()?,
        })
    }
}

/// The `Code: N` of a ClickHouse error reply.
fn server_code(text: &str) -> Option<u32> {
    crate::number_after(text, "Code: ").and_then(|n| u32::try_from(n).ok())
}

/// The human part of a ClickHouse error reply, without the stack trace and version noise.
fn short_server_message(text: &str) -> String {
    let line = text.lines().next().unwrap_or(text).trim();
    let line = line
        .split(", e.what()")
        .next()
        .unwrap_or(line)
        .replace("e.displayText() = ", "");
    line.split(" (version ").next().unwrap_or(&line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_parse() {
        let v = ServerVersion::parse("18.16.1").unwrap();
        assert_eq!(v.to_string(), "18.16.1");
        assert!(ServerVersion::parse("23.8.2.7").unwrap() > v);
        assert!(ServerVersion::parse("garbage").is_none());
    }

    #[test]
    fn server_error_text_is_parsed() {
        let text = "Code: 193, e.displayText() = DB::Exception: Wrong password for user default, e.what() = DB::Exception\n";
        assert_eq!(server_code(text), Some(193));
        assert_eq!(
            short_server_message(text),
            "Code: 193, DB::Exception: Wrong password for user default"
        );
        let new = "Code: 516. DB::Exception: default: Authentication failed. (AUTHENTICATION_FAILED) (version 23.8.1)";
        assert_eq!(server_code(new), Some(516));
        assert!(!short_server_message(new).contains("version"));
    }
}
