//! backtesting.py 0.6.6's statistics (`backtesting/_stats.py`), formula for formula and in
//! the same operation order: sums are numpy's pairwise sums, means and variances pandas'
//! (`sum / n`, `Σ(avg - x)² / (n - ddof)`), resampling by UTC calendar day (or week ending
//! Sunday, month, year, as backtesting.py picks from the candles' spacing), durations rounded
//! up to the data's resolution as `Timedelta.ceil` does.

use super::Trade;

/// The statistics backtesting.py prints, in its order. Durations in milliseconds; `NaN`
/// where backtesting.py gives `NaN` (no trades, no drawdown, ...).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    pub start: i64,
    pub end: i64,
    pub duration_ms: i64,
    pub exposure_pct: f64,
    pub equity_final: f64,
    pub equity_peak: f64,
    pub commissions: f64,
    pub return_pct: f64,
    pub buy_hold_return_pct: f64,
    pub return_ann_pct: f64,
    pub volatility_ann_pct: f64,
    pub cagr_pct: f64,
    pub sharpe: f64,
    pub sortino: f64,
    pub calmar: f64,
    pub alpha_pct: f64,
    pub beta: f64,
    pub max_drawdown_pct: f64,
    pub avg_drawdown_pct: f64,
    pub max_drawdown_duration_ms: Option<i64>,
    pub avg_drawdown_duration_ms: Option<i64>,
    pub trades: usize,
    pub win_rate_pct: f64,
    pub best_trade_pct: f64,
    pub worst_trade_pct: f64,
    pub avg_trade_pct: f64,
    pub max_trade_duration_ms: Option<i64>,
    pub avg_trade_duration_ms: Option<i64>,
    pub profit_factor: f64,
    pub expectancy_pct: f64,
    pub sqn: f64,
    pub kelly: f64,
}

/// numpy's pairwise summation (`add.reduce` over a contiguous float64 array).
pub fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// pandas' `Series.mean()` (NaN for none).
pub fn mean(a: &[f64]) -> f64 {
    if a.is_empty() {
        return f64::NAN;
    }
    pairwise_sum(a) / a.len() as f64
}

/// pandas' `Series.var(ddof)`.
pub fn var(a: &[f64], ddof: usize) -> f64 {
    let n = a.len();
    if n <= ddof {
        return f64::NAN;
    }
    let avg = pairwise_sum(a) / n as f64;
    let sqr: Vec<f64> = a.iter().map(|x| (avg - x) * (avg - x)).collect();
    pairwise_sum(&sqr) / (n - ddof) as f64
}

/// backtesting.py's `geometric_mean` (0 if a return is -100 % or worse).
pub fn geometric_mean(returns: &[f64]) -> f64 {
    let r: Vec<f64> = returns
        .iter()
        .map(|x| if x.is_nan() { 1.0 } else { x + 1.0 })
        .collect();
    if r.iter().any(|&x| x <= 0.0) {
        return 0.0;
    }
    let logs: Vec<f64> = r.iter().map(|x| x.ln()).collect();
    let n = if logs.is_empty() {
        f64::NAN
    } else {
        logs.len() as f64
    };
    (pairwise_sum(&logs) / n).exp() - 1.0
}

/// `x or nan` in Python: NaN for zero.
fn or_nan(x: f64) -> f64 {
    if x == 0.0 {
        f64::NAN
    } else {
        x
    }
}

const DAY_MS: i64 = 86_400_000;

/// backtesting.py's `_data_period`: the median spacing of the last 100 candles, in ms.
fn data_period(time: &[i64]) -> f64 {
    let tail = &time[time.len().saturating_sub(100)..];
    let mut d: Vec<f64> = tail.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
    if d.is_empty() {
        return f64::NAN;
    }
    d.sort_by(f64::total_cmp);
    let m = d.len();
    if m % 2 == 1 {
        d[m / 2]
    } else {
        (d[m / 2 - 1] + d[m / 2]) / 2.0
    }
}

/// `Timedelta.ceil(period.resolution_string)`: up to the finest unit the period uses.
fn ceil_to_resolution(v: i64, period_ms: f64) -> i64 {
    let p = period_ms as i64;
    let unit = [DAY_MS, 3_600_000, 60_000, 1_000]
        .into_iter()
        .find(|u| p > 0 && p % u == 0)
        .unwrap_or(1);
    v.div_euclid(unit) * unit + if v.rem_euclid(unit) != 0 { unit } else { 0 }
}

/// A day number's weekday, Monday = 0 (1970-01-01 was a Thursday).
fn weekday(day: i64) -> i64 {
    (day + 3).rem_euclid(7)
}

/// The resampling bin of a candle time: backtesting.py's `'D'`, `'W'` (weeks ending Sunday),
/// `'ME'` or `'YE'`.
#[derive(Clone, Copy)]
enum Bin {
    Day,
    Week,
    Month,
    Year,
}

fn bin_of(bin: Bin, t: i64) -> i64 {
    let day = t.div_euclid(DAY_MS);
    match bin {
        Bin::Day => day,
        Bin::Week => day + (6 - weekday(day)),
        Bin::Month | Bin::Year => {
            use chrono::Datelike;
            let d = chrono::DateTime::from_timestamp_millis(t).unwrap_or_default();
            let y = i64::from(d.year());
            if matches!(bin, Bin::Year) {
                y
            } else {
                y * 12 + i64::from(d.month())
            }
        }
    }
}

/// The statistics of a finished run. `warmup` is backtesting.py's `first_trading_bar` (the
/// slowest indicator's first defined candle) for the buy & hold return.
pub fn compute(
    trades: &[Trade],
    equity: &[f64],
    time: &[i64],
    close: &[f64],
    warmup: usize,
) -> Stats {
    let n = equity.len();
    let mut s = Stats {
        trades: trades.len(),
        ..Stats::default()
    };
    if n == 0 {
        return s;
    }
    // Drawdown.
    let mut peak = f64::NEG_INFINITY;
    let dd: Vec<f64> = equity
        .iter()
        .map(|&e| {
            peak = if e > peak || peak.is_nan() { e } else { peak };
            1.0 - e / peak
        })
        .collect();
    let period = data_period(time);
    let stretches = drawdown_stretches(&dd, time);
    let dd_dur: Vec<i64> = stretches.iter().map(|s| s.duration).collect();
    let dd_peaks: Vec<f64> = if stretches.is_empty() {
        // No stretch: backtesting.py falls back to the drawdown itself with 0 as NaN (its
        // average drawdown is then the mean of the non-zero ones; no duration).
        dd.iter()
            .copied()
            .filter(|&x| x != 0.0 && !x.is_nan())
            .collect()
    } else {
        stretches.iter().map(|s| s.peak).collect()
    };
    // pandas averages the durations over the Series reindexed to every candle, each
    // stretch's at the candle that ends it.
    let placed: Vec<(usize, i64)> = stretches.iter().map(|s| (s.end, s.duration)).collect();
    let dd_dur_mean = mean_duration(&placed, n);
    s.start = time[0];
    s.end = time[n - 1];
    s.duration_ms = s.end - s.start;
    let mut have = vec![0u8; n];
    for t in trades {
        for h in &mut have[t.entry_bar..=t.exit_bar.min(n - 1)] {
            *h = 1;
        }
    }
    s.exposure_pct = have.iter().map(|&h| h as usize).sum::<usize>() as f64 / n as f64 * 100.0;
    s.equity_final = equity[n - 1];
    s.equity_peak = nanmax(equity);
    s.commissions = trades.iter().fold(0.0, |a, t| a + t.commission);
    s.return_pct = (equity[n - 1] - equity[0]) / equity[0] * 100.0;
    let fb = warmup.min(n - 1);
    s.buy_hold_return_pct = (close[n - 1] - close[fb]) / close[fb] * 100.0;

    // Annualised figures from the returns per day (week, month, year).
    let freq_days = (period / DAY_MS as f64).floor() as i64;
    let weekend = time
        .iter()
        .filter(|&&t| weekday(t.div_euclid(DAY_MS)) >= 5)
        .count() as f64
        / n as f64;
    let have_weekends = weekend > 2.0 / 7.0 * 0.6;
    let (annual, bin) = match freq_days {
        7 => (52.0, Bin::Week),
        31 => (12.0, Bin::Month),
        365 => (1.0, Bin::Year),
        _ => (if have_weekends { 365.0 } else { 252.0 }, Bin::Day),
    };
    let mut lasts: Vec<f64> = Vec::new();
    let mut current: Option<i64> = None;
    for (&t, &e) in time.iter().zip(equity) {
        let b = bin_of(bin, t);
        if current == Some(b) {
            if let Some(l) = lasts.last_mut() {
                *l = e;
            }
        } else {
            current = Some(b);
            lasts.push(e);
        }
    }
    let day_returns: Vec<f64> = lasts
        .windows(2)
        .map(|w| w[1] / w[0] - 1.0)
        .filter(|r| !r.is_nan())
        .collect();
    let g = geometric_mean(&day_returns);
    let annualized = (1.0 + g).powf(annual) - 1.0;
    s.return_ann_pct = annualized * 100.0;
    let v = var(&day_returns, 1);
    s.volatility_ann_pct =
        ((v + (1.0 + g).powf(2.0)).powf(annual) - (1.0 + g).powf(2.0 * annual)).sqrt() * 100.0;
    // `Duration.days + Duration.seconds / 86400` (whole seconds) over 365.25.
    let years = (s.duration_ms.div_euclid(DAY_MS) as f64
        + (s.duration_ms.rem_euclid(DAY_MS) / 1000) as f64 / 86400.0)
        / 365.25;
    s.cagr_pct = if years != 0.0 {
        ((s.equity_final / equity[0]).powf(1.0 / years) - 1.0) * 100.0
    } else {
        f64::NAN
    };
    s.sharpe = s.return_ann_pct / or_nan(s.volatility_ann_pct);
    let downside: Vec<f64> = day_returns
        .iter()
        .map(|&r| {
            let c = r.min(0.0);
            c * c
        })
        .collect();
    s.sortino = annualized / (mean(&downside).sqrt() * annual.sqrt());
    let dd_max = nanmax(&dd);
    let max_dd = -(if dd_max.is_nan() { 0.0 } else { dd_max });
    s.calmar = annualized / or_nan(-max_dd);
    // Beta against the close, from log returns (np.cov).
    let eq_log: Vec<f64> = equity.windows(2).map(|w| (w[1] / w[0]).ln()).collect();
    let mk_log: Vec<f64> = close.windows(2).map(|w| (w[1] / w[0]).ln()).collect();
    let beta = if eq_log.len() > 1 {
        let (ma, mb) = (mean(&eq_log), mean(&mk_log));
        let xy: Vec<f64> = eq_log
            .iter()
            .zip(&mk_log)
            .map(|(a, b)| (a - ma) * (b - mb))
            .collect();
        let yy: Vec<f64> = mk_log.iter().map(|b| (b - mb) * (b - mb)).collect();
        pairwise_sum(&xy) / pairwise_sum(&yy)
    } else {
        f64::NAN
    };
    s.alpha_pct = s.return_pct - beta * s.buy_hold_return_pct;
    s.beta = beta;
    s.max_drawdown_pct = max_dd * 100.0;
    s.avg_drawdown_pct = -mean(&dd_peaks) * 100.0;
    s.max_drawdown_duration_ms = dd_dur.iter().max().map(|&d| ceil_to_resolution(d, period));
    s.avg_drawdown_duration_ms = dd_dur_mean.map(|d| ceil_to_resolution(d, period));

    // Trades.
    let pl: Vec<f64> = trades.iter().map(|t| t.pnl).collect();
    let returns: Vec<f64> = trades.iter().map(|t| t.return_pct).collect();
    let durations: Vec<i64> = trades.iter().map(|t| t.exit_time - t.entry_time).collect();
    let nt = trades.len();
    let win_rate = if nt == 0 {
        f64::NAN
    } else {
        pl.iter().filter(|&&p| p > 0.0).count() as f64 / nt as f64
    };
    s.win_rate_pct = win_rate * 100.0;
    s.best_trade_pct = nanmax(&returns) * 100.0;
    s.worst_trade_pct = nanmin(&returns) * 100.0;
    s.avg_trade_pct = geometric_mean(&returns) * 100.0;
    s.max_trade_duration_ms = durations
        .iter()
        .max()
        .map(|&d| ceil_to_resolution(d, period));
    let placed: Vec<(usize, i64)> = durations.iter().copied().enumerate().collect();
    s.avg_trade_duration_ms =
        mean_duration(&placed, durations.len()).map(|d| ceil_to_resolution(d, period));
    let pos: Vec<f64> = returns.iter().copied().filter(|&r| r > 0.0).collect();
    let neg: Vec<f64> = returns.iter().copied().filter(|&r| r < 0.0).collect();
    s.profit_factor = pairwise_sum(&pos) / or_nan(pairwise_sum(&neg).abs());
    s.expectancy_pct = mean(&returns) * 100.0;
    s.sqn = (nt as f64).sqrt() * mean(&pl) / or_nan(var(&pl, 1).sqrt());
    let win: Vec<f64> = pl.iter().copied().filter(|&p| p > 0.0).collect();
    let loss: Vec<f64> = pl.iter().copied().filter(|&p| p < 0.0).collect();
    s.kelly = win_rate - (1.0 - win_rate) / (mean(&win) / -mean(&loss));
    s
}

/// pandas' mean of a timedelta Series of `len` values, `placed` the defined ones at their
/// positions (NaT elsewhere): the nanoseconds, NaT as 0, cast to float64 in numpy's buffers of
/// 8192 and summed pairwise within each, over the count of defined ones; truncated to whole
/// nanoseconds; in ms (rounded up: the result is rounded up to the data's resolution anyway).
fn mean_duration(placed: &[(usize, i64)], len: usize) -> Option<i64> {
    if placed.is_empty() {
        return None;
    }
    let mut ns = vec![0.0f64; len];
    for &(i, d) in placed {
        ns[i] = d as f64 * 1e6;
    }
    let mut sum = 0.0;
    for chunk in ns.chunks(8192) {
        sum += pairwise_sum(chunk);
    }
    let m = (sum / placed.len() as f64) as i64;
    Some(m.div_euclid(1_000_000) + i64::from(m.rem_euclid(1_000_000) > 0))
}

/// The largest value, NaN ignored (pandas' `max()`); NaN if there is none.
fn nanmax(a: &[f64]) -> f64 {
    a.iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f64::NAN, |m, x| if m.is_nan() || x > m { x } else { m })
}

/// The smallest value, NaN ignored (pandas' `min()`); NaN if there is none.
fn nanmin(a: &[f64]) -> f64 {
    a.iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f64::NAN, |m, x| if m.is_nan() || x < m { x } else { m })
}

/// One stretch between two candles at a peak (see [`drawdown_stretches`]).
struct Stretch {
    /// The candle that ends it.
    end: usize,
    duration: i64,
    /// Its deepest drawdown.
    peak: f64,
}

/// backtesting.py's `compute_drawdown_duration_peaks`: each stretch between two candles at a
/// peak (drawdown 0; the last candle counts as one) that has candles between them.
fn drawdown_stretches(dd: &[f64], time: &[i64]) -> Vec<Stretch> {
    let n = dd.len();
    let mut iloc: Vec<usize> = (0..n).filter(|&i| dd[i] == 0.0).collect();
    if iloc.last() != Some(&(n - 1)) {
        iloc.push(n - 1);
    }
    iloc.windows(2)
        .filter(|w| w[1] > w[0] + 1)
        .map(|w| Stretch {
            end: w[1],
            duration: time[w[1]] - time[w[0]],
            peak: nanmax(&dd[w[0]..=w[1]]),
        })
        .collect()
}
