//! Candles for a backtest from a CSV file, in either of two layouts:
//!
//! - **Binance klines**, as in the public archives: positional columns `open_time, open, high,
//!   low, close, volume, close_time, quote_volume, ...` (only the first six are needed), with or
//!   without a header line. Header names are not trusted (COIN-M's lie about two columns, as
//!   [`crate::exchange::archive`] notes), so the layout is recognised by the first data row's
//!   first field being an integer. Timestamps of 2025's spot archives are microseconds; they
//!   are divided down with [`normalize_ms`], the archive reader's rule.
//! - **backtesting.py style**: a header whose first column holds dates (`,Open,High,Low,Close,
//!   Volume` in its `GOOG.csv`), the other columns found by name, case-insensitively (`Open`,
//!   `High`, `Low`, `Close`, `Volume` required, the rest ignored). Dates are `YYYY-MM-DD` or
//!   `YYYY-MM-DD HH:MM[:SS[.fff]]` (or with `T`), taken as UTC.
//!
//! Prices are parsed from their text straight to `f64` (correctly rounded, as Python's
//! `float()`), not through the service's exact decimals: the archive reader's
//! [`Kline::from_fields`](qs_core::market::Kline::from_fields) would round twice and insists on
//! eleven columns. Errors name the line (1-based, as an editor shows it) and what is wrong.

use std::path::{Path, PathBuf};

use qs_core::backtest::Series;
use qs_core::indicators::Bar;
use qs_core::time::{normalize_ms, UnixMs};

/// Why a CSV file gives no series.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An error inside a file, with the file's name.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: Box<CsvError>,
    },
    #[error("no candles (the file is empty or has only a header)")]
    Empty,
    #[error("line {line}: {column} {text:?} is not a number")]
    BadNumber {
        line: usize,
        column: &'static str,
        text: String,
    },
    #[error("line {line}: {column} is {value}: prices must be positive")]
    NotPositive {
        line: usize,
        column: &'static str,
        value: f64,
    },
    #[error("line {line}: {column} is {value}, not a finite number")]
    NotFinite {
        line: usize,
        column: &'static str,
        value: f64,
    },
    #[error(
        "line {line}: {text:?} is not a date (YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS[.fff]], UTC)"
    )]
    BadDate { line: usize, text: String },
    #[error("line {line}: the header has no {column} column (it has: {found})")]
    MissingColumn {
        line: usize,
        column: &'static str,
        found: String,
    },
    #[error("line {line}: dates without a header line naming the columns (Open, High, Low, Close, Volume)")]
    NoHeader { line: usize },
    #[error("line {line}: {got} fields, expected at least {want}")]
    TooFewFields {
        line: usize,
        got: usize,
        want: usize,
    },
    #[error("line {line}: time {time} is not after the previous candle's {prev}")]
    NotIncreasing {
        line: usize,
        time: UnixMs,
        prev: UnixMs,
    },
}

/// Reads the candles of the CSV file at `path` (either layout, see the module's notes).
pub fn read_csv(path: &Path) -> Result<Series, CsvError> {
    let text = std::fs::read_to_string(path).map_err(|source| CsvError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_csv(&text).map_err(|e| CsvError::File {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// Where a row's values are, once the layout is known.
#[derive(Debug, Clone, Copy)]
struct Columns {
    /// Binance's epoch-integer times (else dates).
    epoch: bool,
    time: usize,
    open: usize,
    high: usize,
    low: usize,
    close: usize,
    volume: usize,
    quote_volume: Option<usize>,
}

/// Binance's kline columns by position.
const BINANCE: Columns = Columns {
    epoch: true,
    time: 0,
    open: 1,
    high: 2,
    low: 3,
    close: 4,
    volume: 5,
    quote_volume: Some(7),
};

/// Parses CSV text (either layout, see the module's notes).
pub fn parse_csv(text: &str) -> Result<Series, CsvError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut series = Series::default();
    // The header's fields and line number, until the first data row decides the layout.
    let mut header: Option<(usize, Vec<&str>)> = None;
    let mut columns: Option<Columns> = None;
    let mut fields: Vec<&str> = Vec::with_capacity(12);
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let row = raw.trim();
        if row.is_empty() {
            continue;
        }
        fields.clear();
        fields.extend(row.split(',').map(|f| f.trim().trim_matches('"').trim()));
        let cols = match columns {
            Some(c) => c,
            None => {
                let epoch = fields[0].parse::<i64>().is_ok();
                if header.is_none() && !epoch {
                    // Not a candle: the header, unless it is a date row without one.
                    if parse_date(fields[0]).is_none() {
                        header = Some((line, fields.clone()));
                        continue;
                    }
                }
                let c = if epoch {
                    BINANCE
                } else {
                    match &header {
                        Some((hline, names)) => by_name(*hline, names)?,
                        None => return Err(CsvError::NoHeader { line }),
                    }
                };
                columns = Some(c);
                c
            }
        };
        let (time, bar) = parse_row(line, &fields, &cols)?;
        if let Some(&prev) = series.time.last() {
            if time <= prev {
                return Err(CsvError::NotIncreasing {
                    line,
                    time: UnixMs(time),
                    prev: UnixMs(prev),
                });
            }
        }
        series.push(time, &bar);
    }
    if series.is_empty() {
        return Err(CsvError::Empty);
    }
    Ok(series)
}

/// backtesting.py's layout: the first column holds the dates, the others are found by name.
fn by_name(line: usize, names: &[&str]) -> Result<Columns, CsvError> {
    let find = |column: &'static str| -> Result<usize, CsvError> {
        names
            .iter()
            .skip(1)
            .position(|n| n.eq_ignore_ascii_case(column))
            .map(|p| p + 1)
            .ok_or_else(|| CsvError::MissingColumn {
                line,
                column,
                found: names
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    };
    Ok(Columns {
        epoch: false,
        time: 0,
        open: find("Open")?,
        high: find("High")?,
        low: find("Low")?,
        close: find("Close")?,
        volume: find("Volume")?,
        quote_volume: None,
    })
}

fn parse_row(line: usize, fields: &[&str], c: &Columns) -> Result<(i64, Bar), CsvError> {
    let want = [c.time, c.open, c.high, c.low, c.close, c.volume]
        .into_iter()
        .max()
        .unwrap_or(0)
        + 1;
    if fields.len() < want {
        return Err(CsvError::TooFewFields {
            line,
            got: fields.len(),
            want,
        });
    }
    let time = if c.epoch {
        let t = fields[c.time]
            .parse::<i64>()
            .map_err(|_| CsvError::BadNumber {
                line,
                column: "open_time",
                text: fields[c.time].to_string(),
            })?;
        normalize_ms(t)
    } else {
        parse_date(fields[c.time]).ok_or_else(|| CsvError::BadDate {
            line,
            text: fields[c.time].to_string(),
        })?
    };
    let num = |i: usize, column: &'static str| -> Result<f64, CsvError> {
        let text = fields[i];
        let x = text.parse::<f64>().map_err(|_| CsvError::BadNumber {
            line,
            column,
            text: text.to_string(),
        })?;
        if x.is_finite() {
            Ok(x)
        } else {
            Err(CsvError::NotFinite {
                line,
                column,
                value: x,
            })
        }
    };
    let price = |i: usize, column: &'static str| -> Result<f64, CsvError> {
        let x = num(i, column)?;
        if x > 0.0 {
            Ok(x)
        } else {
            Err(CsvError::NotPositive {
                line,
                column,
                value: x,
            })
        }
    };
    let bar = Bar {
        open: price(c.open, "open")?,
        high: price(c.high, "high")?,
        low: price(c.low, "low")?,
        close: price(c.close, "close")?,
        volume: num(c.volume, "volume")?,
        quote_volume: match c.quote_volume {
            Some(i) if i < fields.len() => num(i, "quote_volume")?,
            _ => 0.0,
        },
    };
    Ok((time, bar))
}

/// `YYYY-MM-DD`, `YYYY-MM-DD HH:MM[:SS[.fff]]` or the same with `T` (a trailing `Z` or
/// `+00:00` allowed), UTC, in Unix milliseconds.
fn parse_date(text: &str) -> Option<i64> {
    use chrono::{NaiveDate, NaiveDateTime};
    let t = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix("+00:00"))
        .unwrap_or(text);
    if t.len() == 10 {
        let d = NaiveDate::parse_from_str(t, "%Y-%m-%d").ok()?;
        return Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis());
    }
    let sep = t.as_bytes().get(10).copied()?;
    if sep != b' ' && sep != b'T' {
        return None;
    }
    let fmt = if sep == b'T' {
        ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"]
    } else {
        ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"]
    };
    fmt.iter()
        .find_map(|f| NaiveDateTime::parse_from_str(t, f).ok())
        .map(|d| d.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn binance_rows_without_a_header() {
        let s = parse_csv(
            "1640995200000,46216.93000000,46731.39000000,46208.37000000,46656.13000000,1503.33095000,1640998799999,69879986.39049930,38608,806.06536000,37462156.91764400,0\n\
             1640998800000,46656.14,46949.99,46574.06,46778.14,943.81539,1641002399999,44127148.1176022,31872,491.18067,22963272.85537420,0\n",
        )
        .unwrap();
        assert_eq!(s.time, vec![1_640_995_200_000, 1_640_998_800_000]);
        assert_eq!(s.open, vec![46216.93, 46656.14]);
        assert_eq!(s.high[0], 46731.39);
        assert_eq!(s.low[1], 46574.06);
        assert_eq!(s.close[1], 46778.14);
        assert_eq!(s.volume[0], 1503.33095);
        assert_eq!(s.quote_volume, vec![69879986.3904993, 44127148.1176022]);
    }

    #[test]
    fn binance_rows_with_a_header_and_microseconds() {
        let s = parse_csv(
            "open_time,open,high,low,close,volume,close_time,quote_volume,count\r\n\
             1735689600000000,1,2,0.5,1.5,10,1735693199999999,15,3\r\n\
             \r\n\
             1735693200000000,1.5,2,1,1.25,4,1735696799999999,5,1\r\n",
        )
        .unwrap();
        assert_eq!(s.time, vec![1_735_689_600_000, 1_735_693_200_000]);
        assert_eq!(s.close, vec![1.5, 1.25]);
        assert_eq!(s.quote_volume, vec![15.0, 5.0]);
        // Six columns are enough (no quote volume: zero).
        let s = parse_csv("1000,1,2,0.5,1.5,10\n2000,1,2,0.5,1.5,10\n").unwrap();
        assert_eq!(s.quote_volume, vec![0.0, 0.0]);
    }

    #[test]
    fn the_repository_spot_archive() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/binance/spot/BTCUSDT-1h-2022-01.csv");
        let s = read_csv(&path).unwrap();
        assert_eq!(s.len(), 744);
        assert_eq!(s.time[0], 1_640_995_200_000);
        assert_eq!(s.time[743], 1_640_995_200_000 + 743 * 3_600_000);
        assert_eq!(s.open[0], 46216.93);
        assert_eq!(s.quote_volume[0], 69879986.3904993);
    }

    #[test]
    fn backtesting_py_dates_by_column_name() {
        let s = parse_csv(
            ",Open,High,Low,Close,Volume\n\
             2004-08-19,100.0,104.06,95.96,100.34,22351900\n\
             2004-08-20,101.01,109.08,100.5,108.31,11428600\n",
        )
        .unwrap();
        let t0 = 1_092_873_600_000; // 2004-08-19 00:00 UTC
        assert_eq!(s.time, vec![t0, t0 + DAY]);
        assert_eq!(s.open, vec![100.0, 101.01]);
        assert_eq!(s.close, vec![100.34, 108.31]);
        assert_eq!(s.volume, vec![22351900.0, 11428600.0]);
        assert_eq!(s.quote_volume, vec![0.0, 0.0]);

        // Any order and case; extra columns ignored; times with seconds, fractions, `T`.
        let s = parse_csv(
            "Date,close,VOLUME,Adj Close,open,low,high\n\
             2024-01-01 00:00,1,10,9,2,0.5,3\n\
             2024-01-01 00:01:30,1,10,9,2,0.5,3\n\
             2024-01-01T00:02:00.250,4,10,9,2,0.5,5\n\
             2024-01-01T00:03Z,4,10,9,2,0.5,5\n",
        )
        .unwrap();
        let t0 = 1_704_067_200_000;
        assert_eq!(s.time, vec![t0, t0 + 90_000, t0 + 120_250, t0 + 180_000]);
        assert_eq!(s.open[0], 2.0);
        assert_eq!(s.high[2], 5.0);
        assert_eq!(s.low[0], 0.5);
        assert_eq!(s.close[2], 4.0);
        assert_eq!(s.volume[0], 10.0);
    }

    #[test]
    fn goog_csv() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/backtest/GOOG.csv");
        let s = read_csv(&path).unwrap();
        assert_eq!(s.len(), 2148);
        assert_eq!(s.time[0], 1_092_873_600_000);
        assert_eq!(
            (s.open[0], s.high[0], s.low[0], s.close[0], s.volume[0]),
            (100.0, 104.06, 95.96, 100.34, 22351900.0)
        );
        assert_eq!(s.time[2147], 1_362_096_000_000); // 2013-03-01
    }

    fn err(text: &str) -> String {
        parse_csv(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        assert_eq!(
            err(""),
            "no candles (the file is empty or has only a header)"
        );
        assert_eq!(
            err("\n,Open,High,Low,Close,Volume\n"),
            "no candles (the file is empty or has only a header)"
        );
        assert_eq!(
            err("1000,1,2,0.5,1.5,10\n2000,1,2,x,1.5,10\n"),
            "line 2: low \"x\" is not a number"
        );
        assert_eq!(
            err("1000,1,2,0.5,1.5,10\n2000,1,2,NaN,1.5,10\n"),
            "line 2: low is NaN, not a finite number"
        );
        assert_eq!(
            err("1000,1,2,0.5,1.5,10\n2000.5,1,2,1,1.5,10\n"),
            "line 2: open_time \"2000.5\" is not a number"
        );
        assert_eq!(
            err("1000,1,2,0.5,1.5,10\n2000,1,2,0.5\n"),
            "line 2: 4 fields, expected at least 6"
        );
        assert_eq!(
            err("Date,Open,High,Low,Close\n2024-01-01,1,2,0.5,1.5\n"),
            "line 1: the header has no Volume column (it has: \"Date\", \"Open\", \"High\", \"Low\", \"Close\")"
        );
        assert_eq!(
            err("Date,Open,High,Low,Close,Volume\n2024-01-01,1,2,0.5,1.5,1\n2024-13-01,1,2,0.5,1.5,1\n"),
            "line 3: \"2024-13-01\" is not a date (YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS[.fff]], UTC)"
        );
        assert_eq!(
            err("Date,Open,High,Low,Close,Volume\n2024-01-02,1,2,0.5,1.5,1\n2024-01-01,1,2,0.5,1.5,1\n"),
            "line 3: time 2024-01-01T00:00:00.000Z is not after the previous candle's 2024-01-02T00:00:00.000Z"
        );
        assert_eq!(
            err("1704067200000,1,2,0.5,1.5,10\n1704067200000,1,2,0.5,1.5,10\n"),
            "line 2: time 2024-01-01T00:00:00.000Z is not after the previous candle's 2024-01-01T00:00:00.000Z"
        );
        assert_eq!(
            err("2024-01-01,1,2,0.5,1.5,1\n"),
            "line 1: dates without a header line naming the columns (Open, High, Low, Close, Volume)"
        );
        // An epoch row after date rows (and the other way round) is refused, not guessed.
        assert_eq!(
            err(",Open,High,Low,Close,Volume\n2024-01-01,1,2,0.5,1.5,1\n1704153600000,1,2,0.5,1.5,1\n"),
            "line 3: \"1704153600000\" is not a date (YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS[.fff]], UTC)"
        );
        assert_eq!(
            err("1704067200000,1,2,0.5,1.5,10\n2024-01-02,1,2,0.5,1.5,1\n"),
            "line 2: open_time \"2024-01-02\" is not a number"
        );
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.csv");
        assert!(read_csv(&missing)
            .unwrap_err()
            .to_string()
            .starts_with(&format!("cannot read {}: ", missing.display())));
        let bad = dir.path().join("bad.csv");
        std::fs::write(&bad, "1000,1,2,0.5,1.5,10\n2000,1,2,0.5,1.5,ten\n").unwrap();
        assert_eq!(
            read_csv(&bad).unwrap_err().to_string(),
            format!("{}: line 2: volume \"ten\" is not a number", bad.display())
        );
    }
}
