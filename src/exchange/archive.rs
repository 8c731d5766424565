//! Bulk archives (data.binance.vision layout): which monthly and daily kline files exist for a
//! pair, downloading one, verifying its `.CHECKSUM` (sha256) and stream-decoding its CSV with
//! every format quirk (no header on spot, a header on futures from 2022, microsecond spot
//! timestamps from 2025, COIN-M volume columns by position). Deciding which files to use is
//! the backfill's job.

use std::io::{BufRead, BufReader, Cursor};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::warn;

use crate::market::{day_label, month_label, next_month_start, Kline, PairKey, Source, DAY_MS};

/// Refuse archive files larger than this (a sane upper bound for one monthly `1s` file).
const MAX_ARCHIVE_BYTES: usize = 1 << 30;

/// One archive file: a calendar month or a day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArchiveFile {
    /// Starts at midnight UTC of the 1st.
    Month(i64),
    /// Starts at midnight UTC.
    Day(i64),
}

impl ArchiveFile {
    pub fn start(&self) -> i64 {
        match *self {
            ArchiveFile::Month(t) | ArchiveFile::Day(t) => t,
        }
    }

    /// Exclusive end.
    pub fn end(&self) -> i64 {
        match *self {
            ArchiveFile::Month(t) => next_month_start(t),
            ArchiveFile::Day(t) => t + DAY_MS,
        }
    }

    /// `BTCUSDT-1h-2022-01.zip` or `BTCUSDT-1m-2024-02-15.zip`.
    pub fn name(&self, pair: &PairKey) -> String {
        let date = match *self {
            ArchiveFile::Month(t) => month_label(t),
            ArchiveFile::Day(t) => day_label(t),
        };
        format!("{}-{}-{date}.zip", pair.symbol, pair.period.archive_name())
    }

    /// `{base}/data/{spot|futures/um|futures/cm}/{monthly|daily}/klines/{SYMBOL}/{interval}/{name}`.
    pub fn url(&self, base: &str, pair: &PairKey) -> String {
        let kind = match self {
            ArchiveFile::Month(_) => "monthly",
            ArchiveFile::Day(_) => "daily",
        };
        format!(
            "{}/data/{}/{kind}/klines/{}/{}/{}",
            base.trim_end_matches('/'),
            pair.market.archive_dir(),
            pair.symbol,
            pair.period.archive_name(),
            self.name(pair)
        )
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive {0} does not exist")]
    NotFound(String),
    #[error(
        "checksum mismatch for {file}: .CHECKSUM says {expected}, the file hashes to {actual}"
    )]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("archive {url}: {msg}")]
    Http { url: String, msg: String },
    #[error("archive {file} is corrupt: {msg}")]
    Corrupt { file: String, msg: String },
}

pub struct ArchiveClient {
    http: reqwest::Client,
    base: String,
}

impl ArchiveClient {
    pub fn new(base: &str, timeout: Duration) -> Result<ArchiveClient, ArchiveError> {
        let http = reqwest::Client::builder()
            // Whole files: allow far longer than one REST call.
            .timeout(timeout.saturating_mul(20))
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("quantservice/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ArchiveError::Http {
                url: base.to_string(),
                msg: e.to_string(),
            })?;
        Ok(ArchiveClient {
            http,
            base: base.to_string(),
        })
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, ArchiveError> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| ArchiveError::Http {
                url: url.to_string(),
                msg: e.to_string(),
            })?;
        match resp.status().as_u16() {
            200 => {}
            404 | 403 => return Err(ArchiveError::NotFound(url.to_string())),
            s => {
                return Err(ArchiveError::Http {
                    url: url.to_string(),
                    msg: format!("HTTP {s}"),
                })
            }
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_ARCHIVE_BYTES as u64)
        {
            return Err(ArchiveError::Http {
                url: url.to_string(),
                msg: "file too large".to_string(),
            });
        }
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| ArchiveError::Http {
                url: url.to_string(),
                msg: e.to_string(),
            })
    }

    /// Downloads `file`, checks it against its `.CHECKSUM`, and sends every row to `tx` as it
    /// is decoded (memory: the compressed file, not its rows). Returns the number of rows.
    pub async fn fetch(
        &self,
        pair: &PairKey,
        file: ArchiveFile,
        tx: mpsc::Sender<Vec<Kline>>,
    ) -> Result<u64, ArchiveError> {
        let url = file.url(&self.base, pair);
        let name = file.name(pair);
        let zip = self.get(&url).await?;
        let sums = self.get(&format!("{url}.CHECKSUM")).await?;
        let expected = String::from_utf8_lossy(&sums)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let actual = hex(&Sha256::digest(&zip));
        if expected != actual {
            warn!(%pair, file = %name, %expected, %actual,
                "Archive checksum mismatch; this range will come from REST.");
            return Err(ArchiveError::ChecksumMismatch {
                file: name,
                expected,
                actual,
            });
        }
        let pair = pair.clone();
        let file_name = name.clone();
        tokio::task::spawn_blocking(move || decode(&pair, &file_name, zip, &tx))
            .await
            .map_err(|e| ArchiveError::Corrupt {
                file: name,
                msg: format!("decoder failed: {e}"),
            })?
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Rows per message from the decoder (one channel hop per row would dominate the cost).
const DECODE_CHUNK: usize = 1024;

/// Decodes the single CSV inside `zip`, sending rows to `tx` in chunks (blocking). Skips a
/// header line.
fn decode(
    pair: &PairKey,
    file: &str,
    zip: Vec<u8>,
    tx: &mpsc::Sender<Vec<Kline>>,
) -> Result<u64, ArchiveError> {
    let corrupt = |msg: String| ArchiveError::Corrupt {
        file: file.to_string(),
        msg,
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(zip)).map_err(|e| corrupt(e.to_string()))?;
    if archive.is_empty() {
        return Err(corrupt("empty zip".to_string()));
    }
    let entry = archive.by_index(0).map_err(|e| corrupt(e.to_string()))?;
    let mut rows = 0u64;
    let mut chunk = Vec::with_capacity(DECODE_CHUNK);
    let mut reader = BufReader::with_capacity(1 << 16, entry);
    let mut line = String::new();
    for i in 0.. {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| corrupt(format!("line {}: {e}", i + 1)))?;
        if n == 0 {
            break;
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let mut parts = [""; 12];
        let mut n = 0;
        for (j, part) in text.split(',').take(12).enumerate() {
            parts[j] = part;
            n = j + 1;
        }
        let fields = &parts[..n];
        if i == 0 && fields[0].trim().parse::<i64>().is_err() {
            continue; // header row (futures files from 2022 on)
        }
        // Columns by position: COIN-M's header names lie about columns 7 and 10.
        let k = Kline::from_fields(pair.clone(), fields, true, Source::Archive)
            .map_err(|e| corrupt(format!("line {}: {e}", i + 1)))?;
        chunk.push(k);
        rows += 1;
        if chunk.len() == DECODE_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(DECODE_CHUNK));
            if tx.blocking_send(full).is_err() {
                return Ok(rows); // the consumer stopped
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_binance_layout() {
        let pair = PairKey::parse("um", "BTCUSDT", "1M").unwrap();
        let f = ArchiveFile::Month(1_640_995_200_000);
        assert_eq!(
            f.url("https://data.binance.vision/", &pair),
            "https://data.binance.vision/data/futures/um/monthly/klines/BTCUSDT/1mo/BTCUSDT-1mo-2022-01.zip"
        );
        let pair = PairKey::parse("cm", "BTCUSD_PERP", "1h").unwrap();
        let d = ArchiveFile::Day(1_698_364_800_000);
        assert_eq!(
            d.url("http://x", &pair),
            "http://x/data/futures/cm/daily/klines/BTCUSD_PERP/1h/BTCUSD_PERP-1h-2023-10-27.zip"
        );
        assert_eq!(d.end() - d.start(), DAY_MS);
        assert_eq!(f.end(), 1_643_673_600_000);
    }
}
