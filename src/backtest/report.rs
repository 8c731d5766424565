//! A backtest as one self-contained HTML file: the price (close) with the trades drawn on it,
//! the equity curve, the drawdown, backtesting.py's statistics table, the run's parameters and
//! the trade list. No network: inline CSS and inline SVG (no script, no `xmlns` either, so the
//! file names no URL at all); hovering a trade shows its details (SVG `<title>`).
//!
//! Long runs stay small: every line is downsampled to at most [`MAX_POINTS`] points (the
//! minimum and the maximum of each bucket, in order, so spikes survive), at most
//! [`MAX_MARKERS`] trades are drawn (those with the largest absolute return) and the table
//! lists the last [`MAX_TRADE_ROWS`]; the page says so when it leaves some out.
//!
//! [`format_stats`] gives the statistics as backtesting.py prints them (the CLI prints it too).

use std::fmt::Write as _;

use qs_core::backtest::{Outcome, Series, Stats, Trade};

/// Points per drawn line, at most.
pub const MAX_POINTS: usize = 2000;
/// Trades drawn on the price chart, at most.
pub const MAX_MARKERS: usize = 2000;
/// Rows of the trade table, at most (the last ones).
pub const MAX_TRADE_ROWS: usize = 5000;

/// backtesting.py's statistics, in its order and with its labels, formatted as it prints them
/// (a pandas object `Series`): floats with up to five decimals, trailing zeros trimmed but one
/// kept (`display.precision` 5); durations as a pandas `Timedelta` (`584 days 00:00:00`);
/// times as a pandas `Timestamp` (`2004-08-19 00:00:00`); `--` for an undefined value (0.6.6's
/// `na_rep`). `Commissions [$]` only when there were some, as backtesting.py.
pub fn format_stats(s: &Stats) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("Start", timestamp(s.start)),
        ("End", timestamp(s.end)),
        ("Duration", timedelta(Some(s.duration_ms))),
        ("Exposure Time [%]", float(s.exposure_pct)),
        ("Equity Final [$]", float(s.equity_final)),
        ("Equity Peak [$]", float(s.equity_peak)),
        ("Commissions [$]", float(s.commissions)),
        ("Return [%]", float(s.return_pct)),
        ("Buy & Hold Return [%]", float(s.buy_hold_return_pct)),
        ("Return (Ann.) [%]", float(s.return_ann_pct)),
        ("Volatility (Ann.) [%]", float(s.volatility_ann_pct)),
        ("CAGR [%]", float(s.cagr_pct)),
        ("Sharpe Ratio", float(s.sharpe)),
        ("Sortino Ratio", float(s.sortino)),
        ("Calmar Ratio", float(s.calmar)),
        ("Alpha [%]", float(s.alpha_pct)),
        ("Beta", float(s.beta)),
        ("Max. Drawdown [%]", float(s.max_drawdown_pct)),
        ("Avg. Drawdown [%]", float(s.avg_drawdown_pct)),
        (
            "Max. Drawdown Duration",
            timedelta(s.max_drawdown_duration_ms),
        ),
        (
            "Avg. Drawdown Duration",
            timedelta(s.avg_drawdown_duration_ms),
        ),
        ("# Trades", s.trades.to_string()),
        ("Win Rate [%]", float(s.win_rate_pct)),
        ("Best Trade [%]", float(s.best_trade_pct)),
        ("Worst Trade [%]", float(s.worst_trade_pct)),
        ("Avg. Trade [%]", float(s.avg_trade_pct)),
        ("Max. Trade Duration", timedelta(s.max_trade_duration_ms)),
        ("Avg. Trade Duration", timedelta(s.avg_trade_duration_ms)),
        ("Profit Factor", float(s.profit_factor)),
        ("Expectancy [%]", float(s.expectancy_pct)),
        ("SQN", float(s.sqn)),
        ("Kelly Criterion", float(s.kelly)),
    ];
    if s.commissions == 0.0 {
        rows.retain(|r| r.0 != "Commissions [$]");
    }
    rows
}

/// pandas' float in an object `Series`: `f"{x:.5f}"` with trailing zeros trimmed (one kept).
fn float(x: f64) -> String {
    if x.is_nan() {
        return "--".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let mut t = format!("{x:.5}");
    while t.ends_with('0') {
        t.pop();
    }
    if t.ends_with('.') {
        t.push('0');
    }
    t
}

/// pandas' `str(Timestamp)` of Unix milliseconds: `2004-08-19 00:00:00`, with microseconds
/// when there is a fraction of a second.
fn timestamp(ms: i64) -> String {
    let Some(d) = chrono::DateTime::from_timestamp_millis(ms) else {
        return format!("{ms} ms");
    };
    if ms.rem_euclid(1000) == 0 {
        d.format("%Y-%m-%d %H:%M:%S").to_string()
    } else {
        d.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
    }
}

/// pandas' `str(Timedelta)` of milliseconds: `584 days 00:00:00`, `-1 days +23:59:59`,
/// `0 days 00:00:01.500000`; `NaT` for none.
fn timedelta(ms: Option<i64>) -> String {
    const DAY: i64 = 86_400_000;
    let Some(ms) = ms else {
        return "--".to_string();
    };
    let days = ms.div_euclid(DAY);
    let rest = ms.rem_euclid(DAY);
    let (h, m, s, frac) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    let sign = if days < 0 { "+" } else { "" };
    let mut t = format!("{days} days {sign}{h:02}:{m:02}:{s:02}");
    if frac != 0 {
        let _ = write!(t, ".{:06}", frac * 1000);
    }
    t
}

/// Text for HTML (element content and quoted attribute values).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// At most `max` of the points `(x[i], y[i])`: all of them when they fit, else per bucket of
/// consecutive points its minimum and its maximum, in their order (NaN points are skipped in
/// buckets; kept as gaps when everything fits).
pub fn downsample(x: &[i64], y: &[f64], max: usize) -> Vec<(i64, f64)> {
    let n = x.len().min(y.len());
    if n <= max {
        return (0..n).map(|i| (x[i], y[i])).collect();
    }
    let buckets = (max / 2).max(1);
    let mut out = Vec::with_capacity(buckets * 2);
    for b in 0..buckets {
        let (from, to) = (b * n / buckets, (b + 1) * n / buckets);
        let mut lo: Option<usize> = None;
        let mut hi: Option<usize> = None;
        for i in from..to {
            let v = y[i];
            if v.is_nan() {
                continue;
            }
            if lo.is_none_or(|j| v < y[j]) {
                lo = Some(i);
            }
            if hi.is_none_or(|j| v > y[j]) {
                hi = Some(i);
            }
        }
        match (lo, hi) {
            (Some(a), Some(b)) if a == b => out.push((x[a], y[a])),
            (Some(a), Some(b)) => {
                let (p, q) = if a < b { (a, b) } else { (b, a) };
                out.push((x[p], y[p]));
                out.push((x[q], y[q]));
            }
            _ => {}
        }
    }
    out
}

/// The trades to draw: all, or the `max` with the largest absolute return (in their order).
fn drawn_trades(trades: &[Trade], max: usize) -> Vec<&Trade> {
    if trades.len() <= max {
        return trades.iter().collect();
    }
    let mut idx: Vec<usize> = (0..trades.len()).collect();
    let key = |i: usize| {
        let r = trades[i].return_pct.abs();
        if r.is_nan() {
            -1.0
        } else {
            r
        }
    };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    idx.truncate(max);
    idx.sort_unstable();
    idx.into_iter().map(|i| &trades[i]).collect()
}

const W: f64 = 1200.0;
const LEFT: f64 = 76.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 26.0;

/// A chart's coordinate system.
struct Frame {
    h: f64,
    t0: i64,
    t1: i64,
    lo: f64,
    hi: f64,
}

impl Frame {
    fn new(h: f64, t0: i64, t1: i64, lo: f64, hi: f64) -> Frame {
        let (lo, hi) = if !lo.is_finite() || !hi.is_finite() {
            (0.0, 1.0)
        } else if hi > lo {
            let pad = (hi - lo) * 0.04;
            (lo - pad, hi + pad)
        } else {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.01 };
            (lo - pad, hi + pad)
        };
        Frame { h, t0, t1, lo, hi }
    }

    fn x(&self, t: i64) -> f64 {
        let span = (self.t1 - self.t0).max(1) as f64;
        LEFT + (t - self.t0) as f64 / span * (W - LEFT - RIGHT)
    }

    fn y(&self, v: f64) -> f64 {
        TOP + (self.hi - v) / (self.hi - self.lo) * (self.h - TOP - BOTTOM)
    }

    /// The SVG's opening tag, grid, axes and their labels.
    fn open(&self, out: &mut String, id: &str, label: &str) {
        let _ = write!(
            out,
            r#"<svg class="chart" id="{id}" viewBox="0 0 {W} {h}" role="img" aria-label="{label}"><title>{label}</title>"#,
            h = self.h,
            label = escape(label),
        );
        let bottom = self.h - BOTTOM;
        // Value grid and labels.
        let step = nice_step((self.hi - self.lo) / 5.0);
        let decimals = if step >= 1.0 {
            0
        } else {
            (-step.log10().floor()) as usize
        }
        .min(10);
        let mut v = (self.lo / step).ceil() * step;
        let mut n = 0;
        while v <= self.hi && n < 20 {
            let y = self.y(v);
            let _ = write!(
                out,
                r#"<line class="grid" x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}"/><text class="ylab" x="{lx}" y="{ty:.1}">{v:.decimals$}</text>"#,
                x2 = W - RIGHT,
                lx = LEFT - 6.0,
                ty = y + 4.0,
            );
            v += step;
            n += 1;
        }
        // Time labels.
        let span = self.t1 - self.t0;
        let fmt = if span >= 3 * 86_400_000 {
            "%Y-%m-%d"
        } else {
            "%m-%d %H:%M"
        };
        for k in 0..=5 {
            let t = self.t0 + span / 5 * k;
            let label = chrono::DateTime::from_timestamp_millis(t)
                .map_or_else(|| t.to_string(), |d| d.format(fmt).to_string());
            let anchor = match k {
                0 => "start",
                5 => "end",
                _ => "middle",
            };
            let _ = write!(
                out,
                r#"<text class="xlab" x="{x:.1}" y="{y:.1}" text-anchor="{anchor}">{label}</text>"#,
                x = self.x(t),
                y = bottom + 18.0,
            );
        }
        let _ = write!(
            out,
            r#"<rect class="frame" x="{LEFT}" y="{TOP}" width="{w}" height="{h}"/>"#,
            w = W - LEFT - RIGHT,
            h = bottom - TOP,
        );
    }

    /// A path through `points` (NaN values break it).
    fn path(&self, points: &[(i64, f64)]) -> String {
        let mut d = String::with_capacity(points.len() * 14);
        let mut pen = false;
        for &(t, v) in points {
            if v.is_nan() {
                pen = false;
                continue;
            }
            let _ = write!(
                d,
                "{}{:.1} {:.1}",
                if pen { " L" } else { " M" },
                self.x(t),
                self.y(v)
            );
            pen = true;
        }
        d
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
}

/// A price or a size as Rust prints an `f64` (the shortest text that reads back the same).
fn num(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else {
        format!("{x}")
    }
}

fn side(t: &Trade) -> &'static str {
    if t.size >= 0.0 {
        "Long"
    } else {
        "Short"
    }
}

const CSS: &str = r#"
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:16px 24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}
.sub{color:#666;margin-bottom:8px}
.chart{display:block;width:100%;height:auto;background:#fcfcfd}
.grid{stroke:#e6e6ea;stroke-width:1}.frame{fill:none;stroke:#bbb}
.ylab{font-size:11px;fill:#666;text-anchor:end}.xlab{font-size:11px;fill:#666}
.close{fill:none;stroke:#3b6ea8;stroke-width:1.2}
.equity{fill:none;stroke:#2a7a3b;stroke-width:1.4}.base{stroke:#999;stroke-dasharray:4 3}
.dd{fill:#d9534f33;stroke:#c9302c;stroke-width:1}
.win{stroke:#1a9850;stroke-width:1.6}.loss{stroke:#d73027;stroke-width:1.6}
.long{fill:#1a9850;stroke:#0b4d27;stroke-width:.6}.short{fill:#f46d43;stroke:#8c2d04;stroke-width:.6}
.exit{stroke:#222;stroke-width:1.4}
.legend{font-size:12px;color:#555;margin:2px 0 8px}
.note{color:#8a6d3b;background:#fcf8e3;padding:4px 8px;border-radius:3px;display:inline-block;margin:4px 0}
.row{display:flex;flex-wrap:wrap;gap:32px;align-items:flex-start}
table{border-collapse:collapse;font-size:13px}
td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f4f4f6;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}
.stats td:first-child{color:#444}
.scroll{max-height:480px;overflow:auto;border:1px solid #ddd}
.pos{color:#1a7f37}.neg{color:#c9302c}
"#;

/// The report: `title`, the run's `params` (name, value) as given, the charts, statistics and
/// trades of `outcome` over `series`.
pub fn render(
    title: &str,
    series: &Series,
    outcome: &Outcome,
    params: &[(String, String)],
) -> String {
    let mut out = String::with_capacity(256 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{t}</title><style>{CSS}</style></head><body>\n<h1>{t}</h1>",
        t = escape(title)
    );
    let n = series.len();
    if n == 0 {
        out.push_str("<p class=\"sub\">No candles.</p>");
    } else {
        let _ = write!(
            out,
            "<div class=\"sub\">{n} candles, {} to {} (UTC); {} trades",
            escape(&timestamp(series.time[0])),
            escape(&timestamp(series.time[n - 1])),
            outcome.trades.len(),
        );
        if outcome.open_trades > 0 {
            let _ = write!(
                out,
                ", {} still open at the end (not counted)",
                outcome.open_trades
            );
        }
        out.push_str("</div>\n");
        charts(&mut out, series, outcome);
    }

    out.push_str(
        "<div class=\"row\"><div><h2>Statistics</h2><table class=\"stats\" id=\"stats\"><tbody>",
    );
    for (label, value) in format_stats(&outcome.stats) {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(label),
            escape(&value)
        );
    }
    out.push_str("</tbody></table></div>\n<div><h2>Parameters</h2><table class=\"params\" id=\"params\"><tbody>");
    for (k, v) in params {
        let _ = write!(out, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(v));
    }
    if params.is_empty() {
        out.push_str("<tr><td>(none)</td><td></td></tr>");
    }
    out.push_str("</tbody></table></div></div>\n");

    trade_table(&mut out, &outcome.trades);
    out.push_str("</body></html>\n");
    out
}

fn charts(out: &mut String, series: &Series, outcome: &Outcome) {
    let n = series.len();
    let (t0, t1) = (series.time[0], series.time[n - 1]);

    // Price with the trades.
    let drawn = drawn_trades(&outcome.trades, MAX_MARKERS);
    let close = downsample(&series.time, &series.close, MAX_POINTS);
    let (lo, hi) = min_max(
        close.iter().map(|p| p.1).chain(
            drawn
                .iter()
                .flat_map(|t| [t.entry_price, t.exit_price].into_iter()),
        ),
    );
    let f = Frame::new(420.0, t0, t1, lo, hi);
    out.push_str("<h2>Price</h2><div class=\"legend\">close; ▲ long entry, ▼ short entry, × exit; the line from entry to exit is green for a profit, red for a loss</div>");
    if drawn.len() < outcome.trades.len() {
        let _ = write!(
            out,
            "<div class=\"note\">Showing {} of {} trades: those with the largest absolute return.</div>",
            drawn.len(),
            outcome.trades.len()
        );
    }
    f.open(out, "price", "Price (close) with trades");
    let _ = write!(
        out,
        r#"<path class="close" d="{}"/><g id="trades">"#,
        f.path(&close)
    );
    for t in &drawn {
        let (x0, y0, x1, y1) = (
            f.x(t.entry_time),
            f.y(t.entry_price),
            f.x(t.exit_time),
            f.y(t.exit_price),
        );
        if !(y0.is_finite() && y1.is_finite()) {
            continue;
        }
        let long = t.size >= 0.0;
        let tri = if long {
            format!(
                "{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}",
                x0,
                y0 - 6.0,
                x0 - 5.0,
                y0 + 4.0,
                x0 + 5.0,
                y0 + 4.0
            )
        } else {
            format!(
                "{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}",
                x0,
                y0 + 6.0,
                x0 - 5.0,
                y0 - 4.0,
                x0 + 5.0,
                y0 - 4.0
            )
        };
        let tip = format!(
            "{} {} @ {} ({}) → {} ({}): P&L {:.2}, {:+.2} %",
            side(t),
            num(t.size.abs()),
            num(t.entry_price),
            timestamp(t.entry_time),
            num(t.exit_price),
            timestamp(t.exit_time),
            t.pnl,
            t.return_pct * 100.0
        );
        let _ = write!(
            out,
            r#"<g class="trade"><title>{tip}</title><line class="{pl}" x1="{x0:.1}" y1="{y0:.1}" x2="{x1:.1}" y2="{y1:.1}"/><polygon class="{cls}" points="{tri}"/><path class="exit" d="M{a:.1} {b:.1} L{c:.1} {d:.1} M{a:.1} {d:.1} L{c:.1} {b:.1}"/></g>"#,
            tip = escape(&tip),
            pl = if t.pnl > 0.0 { "win" } else { "loss" },
            cls = if long { "long" } else { "short" },
            a = x1 - 4.0,
            b = y1 - 4.0,
            c = x1 + 4.0,
            d = y1 + 4.0,
        );
    }
    out.push_str("</g></svg>\n");

    // Equity.
    let m = n.min(outcome.equity.len());
    if m == 0 {
        out.push_str("<p class=\"sub\">No equity curve.</p>");
        return;
    }
    let time = &series.time[..m];
    let equity = &outcome.equity[..m];
    let eq = downsample(time, equity, MAX_POINTS);
    let (lo, hi) = min_max(eq.iter().map(|p| p.1));
    let f = Frame::new(260.0, t0, t1, lo, hi);
    out.push_str("<h2>Equity</h2>");
    f.open(out, "equity", "Equity");
    let base = f.y(equity[0]);
    if base.is_finite() {
        let _ = write!(
            out,
            r#"<line class="base" x1="{LEFT}" x2="{x2}" y1="{base:.1}" y2="{base:.1}"/>"#,
            x2 = W - RIGHT
        );
    }
    let _ = write!(out, r#"<path class="equity" d="{}"/></svg>"#, f.path(&eq));
    out.push('\n');

    // Drawdown (%), negative below the running peak.
    let mut peak = f64::NEG_INFINITY;
    let dd: Vec<f64> = equity
        .iter()
        .map(|&e| {
            peak = peak.max(e);
            if peak > 0.0 {
                (e / peak - 1.0) * 100.0
            } else {
                f64::NAN
            }
        })
        .collect();
    let pts = downsample(time, &dd, MAX_POINTS);
    let (lo, _) = min_max(pts.iter().map(|p| p.1));
    let f = Frame::new(200.0, t0, t1, lo.min(-1e-9), 0.0);
    out.push_str("<h2>Drawdown [%]</h2>");
    f.open(out, "drawdown", "Drawdown [%]");
    let line = f.path(&pts);
    let zero = f.y(0.0);
    // Closed along the zero line so it fills (only when the line is unbroken).
    let area = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) if !line.is_empty() && pts.iter().all(|p| p.1.is_finite()) => {
            format!(
                "M{:.1} {zero:.1}{} L{:.1} {zero:.1} Z",
                f.x(a.0),
                line.replacen(" M", " L", 1),
                f.x(b.0)
            )
        }
        _ => line,
    };
    let _ = write!(out, r#"<path class="dd" d="{area}"/></svg>"#);
    out.push('\n');
}

fn trade_table(out: &mut String, trades: &[Trade]) {
    out.push_str("<h2>Trades</h2>");
    let skip = trades.len().saturating_sub(MAX_TRADE_ROWS);
    if skip > 0 {
        let _ = write!(
            out,
            "<div class=\"note\">Listing the last {MAX_TRADE_ROWS} of {} trades.</div>",
            trades.len()
        );
    }
    if trades.is_empty() {
        out.push_str("<p class=\"sub\">No trades.</p>");
        return;
    }
    out.push_str(
        "<div class=\"scroll\"><table class=\"trades\" id=\"trades-table\"><thead><tr>\
         <th>#</th><th>Side</th><th>Size</th><th>Entry time</th><th>Entry price</th>\
         <th>Exit time</th><th>Exit price</th><th>P&amp;L</th><th>Return [%]</th>\
         <th>Commission</th><th>Duration</th><th>SL</th><th>TP</th></tr></thead><tbody>",
    );
    for (i, t) in trades.iter().enumerate().skip(skip) {
        let opt = |x: Option<f64>| x.map_or_else(String::new, num);
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"{c}\">{:.2}</td><td class=\"{c}\">{:.2}</td><td>{:.2}</td><td>{}</td>\
             <td>{}</td><td>{}</td></tr>",
            i + 1,
            side(t),
            escape(&num(t.size.abs())),
            escape(&timestamp(t.entry_time)),
            escape(&num(t.entry_price)),
            escape(&timestamp(t.exit_time)),
            escape(&num(t.exit_price)),
            t.pnl,
            t.return_pct * 100.0,
            t.commission,
            escape(&timedelta(Some(t.exit_time - t.entry_time))),
            escape(&opt(t.sl)),
            escape(&opt(t.tp)),
            c = if t.pnl > 0.0 { "pos" } else { "neg" },
        );
    }
    out.push_str("</tbody></table></div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_as_pandas_prints_them() {
        assert_eq!(float(589.3496), "589.3496");
        assert_eq!(float(2.0), "2.0");
        assert_eq!(float(0.123456789), "0.12346");
        assert_eq!(float(-33.08), "-33.08");
        assert_eq!(float(68935.12000001), "68935.12");
        assert_eq!(float(f64::NAN), "--");
        assert_eq!(float(f64::INFINITY), "inf");
        assert_eq!(float(0.0), "0.0");
    }

    #[test]
    fn times_and_durations_as_pandas_prints_them() {
        assert_eq!(timestamp(1_092_873_600_000), "2004-08-19 00:00:00");
        assert_eq!(timestamp(1_092_873_600_500), "2004-08-19 00:00:00.500000");
        assert_eq!(timedelta(Some(584 * 86_400_000)), "584 days 00:00:00");
        assert_eq!(
            timedelta(Some(3 * 86_400_000 + 3_723_000)),
            "3 days 01:02:03"
        );
        assert_eq!(timedelta(Some(1500)), "0 days 00:00:01.500000");
        assert_eq!(timedelta(Some(-1000)), "-1 days +23:59:59");
        assert_eq!(timedelta(None), "--");
    }

    #[test]
    fn stats_in_backtesting_py_order() {
        let s = Stats {
            start: 1_092_873_600_000,
            end: 1_362_096_000_000,
            duration_ms: 3116 * 86_400_000,
            trades: 93,
            sqn: f64::NAN,
            max_drawdown_duration_ms: Some(688 * 86_400_000),
            commissions: 12.5,
            ..Stats::default()
        };
        let rows = format_stats(&s);
        let labels: Vec<&str> = rows.iter().map(|r| r.0).collect();
        assert_eq!(labels.len(), 32);
        assert_eq!(labels[0], "Start");
        assert_eq!(labels[7], "Return [%]");
        assert_eq!(labels[21], "# Trades");
        assert_eq!(labels[31], "Kelly Criterion");
        assert_eq!(rows[0].1, "2004-08-19 00:00:00");
        assert_eq!(rows[1].1, "2013-03-01 00:00:00");
        assert_eq!(rows[2].1, "3116 days 00:00:00");
        assert_eq!(rows[19].1, "688 days 00:00:00");
        assert_eq!(rows[20].1, "--");
        assert_eq!(rows[21].1, "93");
        assert_eq!(rows[30].1, "--");
        // Without commissions backtesting.py leaves the row out.
        let none = format_stats(&Stats::default());
        assert_eq!(none.len(), 31);
        assert!(none.iter().all(|r| r.0 != "Commissions [$]"));
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape(r#"<b a="x">'&'</b>"#),
            "&lt;b a=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn downsampling_keeps_spikes_and_order() {
        let n = 100_000;
        let x: Vec<i64> = (0..n as i64).collect();
        let mut y: Vec<f64> = (0..n).map(|i| (i % 7) as f64).collect();
        y[12_345] = 1000.0;
        y[77_777] = -1000.0;
        let d = downsample(&x, &y, 2000);
        assert!(d.len() <= 2000, "{}", d.len());
        assert!(d.len() > 1000);
        assert!(d.contains(&(12_345, 1000.0)));
        assert!(d.contains(&(77_777, -1000.0)));
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0));
        // Short series: untouched.
        assert_eq!(
            downsample(&x[..3], &y[..3], 2000),
            vec![(0, 0.0), (1, 1.0), (2, 2.0)]
        );
    }

    fn trade(i: usize, ret: f64) -> Trade {
        Trade {
            size: if i % 2 == 0 { 1.0 } else { -1.0 },
            entry_bar: i,
            exit_bar: i + 1,
            entry_time: i as i64 * 60_000,
            exit_time: (i as i64 + 1) * 60_000,
            entry_price: 100.0,
            exit_price: 100.0 * (1.0 + ret),
            pnl: 100.0 * ret,
            return_pct: ret,
            commission: 0.0,
            sl: None,
            tp: None,
        }
    }

    #[test]
    fn a_million_candles_stay_small() {
        let n = 1_000_000;
        let mut series = Series::default();
        for i in 0..n {
            let c = 100.0 + ((i as f64) / 1000.0).sin() * 10.0;
            let bar = qs_core::indicators::Bar {
                open: c,
                high: c + 1.0,
                low: c - 1.0,
                close: c,
                volume: 1.0,
                quote_volume: c,
            };
            series.push(i as i64 * 60_000, &bar);
        }
        let trades: Vec<Trade> = (0..50_000)
            .map(|k| trade(k * 20, ((k % 13) as f64 - 6.0) / 100.0))
            .collect();
        let equity: Vec<f64> = series.close.iter().map(|c| c * 100.0).collect();
        let outcome = Outcome {
            trades,
            equity,
            stats: Stats::default(),
            open_trades: 1,
            start: 0,
        };
        let html = render("big <run>", &series, &outcome, &[]);
        assert!(html.len() < 2_500_000, "{} bytes", html.len());
        assert_eq!(html.matches("class=\"trade\"").count(), MAX_MARKERS);
        assert!(html.contains("Showing 2000 of 50000 trades"));
        assert!(html.contains("Listing the last 5000 of 50000 trades"));
        // The trades, the statistics (no commissions: 31) and the parameters' header row.
        assert_eq!(html.matches("<tr><td>").count(), MAX_TRADE_ROWS + 31 + 1);
        assert!(html.contains("<title>big &lt;run&gt;</title>"));
        assert!(html.contains("1 still open at the end"));
        // Each line has at most MAX_POINTS points.
        for class in ["close", "equity"] {
            let at = html.find(&format!("class=\"{class}\" d=\"")).unwrap();
            let d = &html[at..html[at..].find("\"/>").unwrap() + at];
            let points = d.matches(" L").count() + d.matches(" M").count();
            assert!(
                points <= MAX_POINTS && points > MAX_POINTS / 2,
                "{class}: {points}"
            );
        }
    }

    #[test]
    fn empty_and_degenerate_inputs_render() {
        let outcome = Outcome {
            trades: vec![],
            equity: vec![],
            stats: Stats::default(),
            open_trades: 0,
            start: 0,
        };
        let html = render("t", &Series::default(), &outcome, &[]);
        assert!(html.contains("No candles."));
        let mut series = Series::default();
        let flat = qs_core::indicators::Bar {
            open: 1.0,
            high: 1.0,
            low: 1.0,
            close: 1.0,
            volume: 0.0,
            quote_volume: 0.0,
        };
        series.push(0, &flat);
        let outcome = Outcome {
            equity: vec![f64::NAN],
            ..outcome
        };
        let html = render("t", &series, &outcome, &[("a".into(), "<b>".into())]);
        assert!(html.contains("<td>&lt;b&gt;</td>"));
        assert!(html.contains("No trades."));
    }
}
