//! data.binance.vision-style archives: path parsing, file existence rules, CSV quirks (spot µs
//! from 2025 without header, futures header from 2022), zips built on demand with a bounded
//! cache, `.CHECKSUM` files. Owns no HTTP routing and no weight accounting.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};

use qs_core::market::{day_label, month_label, Market, PairKey, Period, Symbol};

use super::book::PairView;
use super::{lock, Shared};

/// 2025-01-01T00:00Z: spot archives of periods from here on use microseconds.
pub const SPOT_MICROS_FROM_MS: i64 = 1_735_689_600_000;
/// 2022-01-01T00:00Z: futures archives of periods from here on have a header row.
pub const FUTURES_HEADER_FROM_MS: i64 = 1_640_995_200_000;
/// The futures archive header.
pub const FUTURES_HEADER: &str = "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,taker_buy_quote_volume,ignore";

const CACHE_MAX_BYTES: usize = 256 << 20;
const CACHE_MAX_FILES: usize = 512;

/// Why an archive path does not name a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ArchiveError {
    #[error("not an archive path")]
    BadPath,
    #[error("no such file")]
    NoSuchFile,
}

/// One archive file, parsed from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileKey {
    pair: PairKey,
    daily: bool,
    start: i64,
    end: i64,
    /// `BTCUSDT-1h-2024-01.zip`
    zip_name: String,
    checksum: bool,
}

/// Built zips, newest last, bounded in count and bytes.
#[derive(Debug, Default)]
pub(crate) struct ZipCache {
    files: HashMap<String, Arc<Built>>,
    order: VecDeque<String>,
    bytes: usize,
}

#[derive(Debug)]
struct Built {
    zip: Vec<u8>,
    sha256: String,
}

impl ZipCache {
    pub(crate) fn clear(&mut self) {
        *self = ZipCache::default();
    }

    fn get(&self, key: &str) -> Option<Arc<Built>> {
        self.files.get(key).cloned()
    }

    fn put(&mut self, key: String, built: Arc<Built>) {
        if built.zip.len() > CACHE_MAX_BYTES || self.files.contains_key(&key) {
            return;
        }
        while self.files.len() >= CACHE_MAX_FILES || self.bytes + built.zip.len() > CACHE_MAX_BYTES
        {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.files.remove(&old) {
                self.bytes -= b.zip.len();
            }
        }
        self.bytes += built.zip.len();
        self.order.push_back(key.clone());
        self.files.insert(key, built);
    }
}

/// Answers one request below `/data/` (`rest` is the path after it).
pub(crate) fn serve(sim: &Shared, rest: &str, now: i64) -> (Response, Option<Market>) {
    let market = market_of(rest);
    if sim.take_5xx() {
        return (
            xml_error(503, "SlowDown", "Please reduce your request rate.", rest),
            market,
        );
    }
    let (available, bad_checksum) = {
        let f = lock(&sim.faults);
        (f.archives_available, f.bad_checksum)
    };
    if !available {
        return (no_such_key(rest), market);
    }
    let built = parse(rest).and_then(|key| build(sim, &key, now).map(|b| (key, b)));
    match built {
        Ok((key, built)) if key.checksum => {
            let sha = if bad_checksum {
                // A well-formed but wrong digest.
                let wrong = Sha256::digest(format!("corrupt {}", key.zip_name).as_bytes());
                hex(&wrong)
            } else {
                built.sha256.clone()
            };
            let body = format!("{sha}  {}\n", key.zip_name);
            (binary(body.into_bytes(), "text/plain"), market)
        }
        Ok((_, built)) => (binary(built.zip.clone(), "application/zip"), market),
        Err(_) => (no_such_key(rest), market),
    }
}

fn market_of(rest: &str) -> Option<Market> {
    Market::ALL
        .into_iter()
        .find(|m| rest.starts_with(&format!("{}/", m.archive_dir())))
}

/// `spot/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2024-01.zip[.CHECKSUM]` → its key.
fn parse(rest: &str) -> Result<FileKey, ArchiveError> {
    let market = market_of(rest).ok_or(ArchiveError::BadPath)?;
    let tail = &rest[market.archive_dir().len() + 1..];
    let parts: Vec<&str> = tail.split('/').collect();
    let [freq, "klines", symbol, interval, file] = parts.as_slice() else {
        return Err(ArchiveError::BadPath);
    };
    let daily = match *freq {
        "daily" => true,
        "monthly" => false,
        _ => return Err(ArchiveError::BadPath),
    };
    let symbol: Symbol = symbol.parse().map_err(|_| ArchiveError::BadPath)?;
    let period = Period::ALL
        .into_iter()
        .find(|p| p.archive_name() == *interval && p.valid_on(market))
        .ok_or(ArchiveError::BadPath)?;
    let (zip_name, checksum) = match file.strip_suffix(".CHECKSUM") {
        Some(z) => (z, true),
        None => (*file, false),
    };
    let label = zip_name
        .strip_suffix(".zip")
        .and_then(|n| n.strip_prefix(&format!("{symbol}-{interval}-")))
        .ok_or(ArchiveError::BadPath)?;
    let start = parse_label(label, daily).ok_or(ArchiveError::BadPath)?;
    let end = if daily {
        start + 86_400_000
    } else {
        qs_core::market::next_month_start(start)
    };
    Ok(FileKey {
        pair: PairKey {
            market,
            symbol,
            period,
        },
        daily,
        start,
        end,
        zip_name: zip_name.to_string(),
        checksum,
    })
}

/// `2024-01` (monthly) or `2024-01-31` (daily) → midnight UTC in ms; strict round trip.
fn parse_label(label: &str, daily: bool) -> Option<i64> {
    let full = if daily {
        label.to_string()
    } else {
        format!("{label}-01")
    };
    let date = chrono::NaiveDate::parse_from_str(&full, "%Y-%m-%d").ok()?;
    let ms = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis();
    let back = if daily {
        day_label(ms)
    } else {
        month_label(ms)
    };
    (back == label).then_some(ms)
}

/// The zip for `key`, from the cache or built now; `NoSuchFile` if it does not exist.
fn build(sim: &Shared, key: &FileKey, now: i64) -> Result<Arc<Built>, ArchiveError> {
    let listed = sim
        .listed(key.pair.market, &key.pair.symbol)
        .ok_or(ArchiveError::NoSuchFile)?;
    if key.end > now || (key.daily && !key.pair.period.has_daily_archive()) {
        return Err(ArchiveError::NoSuchFile);
    }
    let cache_key = format!("{}:{}", key.pair, key.zip_name);
    if let Some(b) = lock(&sim.zips).get(&cache_key) {
        return Ok(b);
    }
    let maintenance = sim.maintenance();
    let view = PairView::new(
        &key.pair,
        listed,
        sim.series.get(&key.pair).map(|s| s.as_ref()),
        &maintenance,
    );
    let rows = view.forward(key.start, key.end - 1, usize::MAX, now);
    if rows.is_empty() {
        return Err(ArchiveError::NoSuchFile);
    }
    let market = key.pair.market;
    let micros = market == Market::Spot && key.start >= SPOT_MICROS_FROM_MS;
    let mut csv = String::with_capacity(rows.len() * 140 + 160);
    if market != Market::Spot && key.start >= FUTURES_HEADER_FROM_MS {
        csv.push_str(FUTURES_HEADER);
        csv.push('\n');
    }
    for k in &rows {
        super::rest::write_row(&mut csv, market, k, micros, "");
        csv.push('\n');
    }
    let csv_name = format!("{}.csv", key.zip_name.trim_end_matches(".zip"));
    let zip = zip_one(&csv_name, csv.as_bytes()).map_err(|error| {
        tracing::warn!(%error, file = %key.zip_name, "Cannot build archive zip.");
        ArchiveError::NoSuchFile
    })?;
    let sha256 = hex(&Sha256::digest(&zip));
    let built = Arc::new(Built { zip, sha256 });
    lock(&sim.zips).put(cache_key, built.clone());
    Ok(built)
}

/// A deflated zip holding one file (fixed 1980 timestamps, so the bytes are deterministic).
fn zip_one(name: &str, content: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    w.start_file(name, options)?;
    w.write_all(content)?;
    Ok(w.finish()?.into_inner())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn binary(body: Vec<u8>, content_type: &'static str) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}

fn no_such_key(rest: &str) -> Response {
    xml_error(404, "NoSuchKey", "The specified key does not exist.", rest)
}

/// S3-style XML error.
fn xml_error(status: u16, code: &str, message: &str, rest: &str) -> Response {
    let key: String = rest
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "/-_.".contains(*c))
        .collect();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Key>data/{key}</Key></Error>"
    );
    let mut resp = binary(body.into_bytes(), "application/xml");
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_archive_paths_strictly() {
        let k =
            parse("futures/cm/daily/klines/BTCUSD_PERP/1h/BTCUSD_PERP-1h-2023-10-27.zip.CHECKSUM")
                .unwrap();
        assert_eq!(k.pair.market, Market::Cm);
        assert!(k.daily && k.checksum);
        assert_eq!(k.zip_name, "BTCUSD_PERP-1h-2023-10-27.zip");
        assert_eq!(k.end - k.start, 86_400_000);
        let k = parse("spot/monthly/klines/BTCUSDT/1mo/BTCUSDT-1mo-2024-02.zip").unwrap();
        assert_eq!(k.pair.period, Period::Mo1);
        assert_eq!(k.start, 1_706_745_600_000);
        for bad in [
            "spot/monthly/klines/BTCUSDT/1M/BTCUSDT-1M-2024-02.zip",
            "futures/um/monthly/klines/BTCUSDT/1s/BTCUSDT-1s-2024-02.zip",
            "spot/monthly/klines/BTCUSDT/1h/ETHUSDT-1h-2024-02.zip",
            "spot/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2024-2.zip",
            "spot/weekly/klines/BTCUSDT/1h/BTCUSDT-1h-2024-02.zip",
            "spot/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2024-02-30.zip",
        ] {
            assert_eq!(parse(bad), Err(ArchiveError::BadPath), "{bad}");
        }
    }
}
