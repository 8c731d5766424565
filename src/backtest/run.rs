//! `quantservice backtest`: candles from a CSV file or ClickHouse, one run or a parameter grid
//! (every combination, in parallel on every core), the statistics table or JSON on stdout,
//! an HTML report, and the results saved to `backtest_results`/`backtest_trades`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context};
use qs_core::backtest::rules::{self, RuleSet};
use qs_core::backtest::{
    self as bt, strategies, Fill, Options, Outcome, Series, Sizing, Stats, Strategy,
};
use qs_core::indicators::Bar;
use serde_json::{json, Value};

use crate::market::PairKey;
use crate::store::backtests::tsv_escape;
use crate::store::Store;

/// Where the candles come from.
#[derive(Debug, Clone)]
pub enum Source {
    Csv(PathBuf),
    Stored {
        pair: PairKey,
        start_ms: Option<i64>,
        end_ms: Option<i64>,
    },
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Csv(p) => format!("csv:{}", p.display()),
            Source::Stored { pair, .. } => format!("clickhouse:{pair}"),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Maker {
    Builtin(String),
    Rules { path: PathBuf, rules: RuleSet },
}

impl Maker {
    pub fn name(&self) -> String {
        match self {
            Maker::Builtin(n) => n.clone(),
            Maker::Rules { path, .. } => format!("rules:{}", path.display()),
        }
    }

    pub fn make(&self, params: &[(String, f64)]) -> anyhow::Result<Box<dyn Strategy>> {
        match self {
            Maker::Builtin(name) => Ok(strategies::build(name, params)?),
            Maker::Rules { path, rules } => {
                let compiled = rules::compile(rules)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Ok(Box::new(compiled))
            }
        }
    }
}

/// One axis of a grid: a parameter and its values.
pub type Axis = (String, Vec<f64>);

/// Most combinations a grid may have.
pub const MAX_COMBINATIONS: usize = 100_000;

/// `--param name=value` or `--param name=start:end:step` (end included).
pub fn parse_params(raw: &[String]) -> anyhow::Result<Vec<Axis>> {
    let mut axes: Vec<Axis> = Vec::new();
    for p in raw {
        let Some((name, value)) = p.split_once('=') else {
            bail!("--param {p:?}: expected name=value or name=start:end:step");
        };
        let name = name.trim();
        if name.is_empty() {
            bail!("--param {p:?}: the parameter name is empty");
        }
        if axes.iter().any(|a| a.0 == name) {
            bail!("--param {name} is given twice");
        }
        let num = |s: &str| -> anyhow::Result<f64> {
            let x: f64 = s
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--param {p:?}: {s:?} is not a number"))?;
            if !x.is_finite() {
                bail!("--param {p:?}: {s:?} is not a finite number");
            }
            Ok(x)
        };
        let parts: Vec<&str> = value.split(':').collect();
        let values = match parts.as_slice() {
            [v] => vec![num(v)?],
            [a, b, step] => {
                let (a, b, step) = (num(a)?, num(b)?, num(step)?);
                if step <= 0.0 {
                    bail!("--param {p:?}: the step must be positive");
                }
                if a > b {
                    bail!("--param {p:?}: the range is empty (start {a} is after end {b})");
                }
                let count = ((b - a) / step + 1e-9).floor() + 1.0;
                if count.is_nan() || count > MAX_COMBINATIONS as f64 {
                    bail!("--param {p:?}: more than {MAX_COMBINATIONS} values");
                }
                let n = count as usize;
                // start + k·step, rounded to the step's decimals (0.1 steps stay 0.3, not 0.30000000000000004).
                let decimals = [a, step]
                    .iter()
                    .map(|x| {
                        let s = format!("{x}");
                        s.split_once('.').map_or(0, |(_, f)| f.len())
                    })
                    .max()
                    .unwrap_or(0) as i32;
                let scale = 10f64.powi(decimals);
                (0..n)
                    .map(|k| ((a + k as f64 * step) * scale).round() / scale)
                    .collect()
            }
            _ => bail!("--param {p:?}: expected name=value or name=start:end:step"),
        };
        axes.push((name.to_string(), values));
    }
    Ok(axes)
}

/// Every combination of the axes' values, the first axis varying slowest.
pub fn combinations(axes: &[Axis]) -> anyhow::Result<Vec<Vec<(String, f64)>>> {
    let total = axes
        .iter()
        .try_fold(1usize, |n, a| n.checked_mul(a.1.len()))
        .filter(|&n| n <= MAX_COMBINATIONS)
        .ok_or_else(|| anyhow::anyhow!("the grid has more than {MAX_COMBINATIONS} combinations"))?;
    let mut out = Vec::with_capacity(total);
    for mut k in 0..total {
        let mut combo = vec![(String::new(), 0.0); axes.len()];
        for (j, (name, values)) in axes.iter().enumerate().rev() {
            combo[j] = (name.clone(), values[k % values.len()]);
            k /= values.len();
        }
        out.push(combo);
    }
    Ok(out)
}

/// The run settings as the command line gives them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cash: f64,
    pub commission: f64,
    pub slippage_bps: f64,
    pub sizing: String,
    pub step: f64,
    pub fill: String,
    pub exclusive: bool,
    pub long_only: bool,
    pub finalize: bool,
}

impl Settings {
    /// The sizing as given, with the step for `fraction` (`fraction:0.00001`).
    pub fn sizing_text(&self) -> String {
        if self.sizing == "fraction" {
            format!("fraction:{}", self.step)
        } else {
            self.sizing.clone()
        }
    }

    pub fn options(&self) -> anyhow::Result<Options> {
        let sizing = match self.sizing.as_str() {
            "whole" => Sizing::Whole,
            "fraction" => Sizing::Fraction { step: self.step },
            q => Sizing::Fixed(q.parse().map_err(|_| {
                anyhow::anyhow!("--sizing {q:?}: expected whole, fraction or a quantity in units")
            })?),
        };
        let fill = match self.fill.as_str() {
            "next_open" | "next-open" | "open" => Fill::NextOpen,
            "close" => Fill::Close,
            f => bail!("--fill {f:?}: expected next_open or close"),
        };
        let o = Options {
            cash: self.cash,
            commission: self.commission,
            spread: self.slippage_bps / 10_000.0,
            sizing,
            fill,
            exclusive: self.exclusive,
            long_only: self.long_only,
            finalize: self.finalize,
        };
        o.check().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(o)
    }
}

/// A combination's parameters, `name = value`.
pub type Params = Vec<(String, f64)>;

/// A combination the strategy refused, and why.
pub type Skipped = (Params, String);

/// One run of a grid.
#[derive(Debug)]
pub struct RunResult {
    pub params: Vec<(String, f64)>,
    pub outcome: Outcome,
    /// Set once saved to `backtest_results`.
    pub run_id: Option<String>,
}

/// Runs every combination on `threads` threads; combinations the strategy refuses
/// (fast >= slow, ...) are skipped and returned with their reason. Equity curves are dropped
/// unless `keep_equity` (a grid keeps only statistics and trades).
pub fn run_grid(
    maker: &Maker,
    combos: &[Vec<(String, f64)>],
    series: &Series,
    o: &Options,
    threads: usize,
    keep_equity: bool,
    progress: &(dyn Fn() + Sync),
) -> (Vec<RunResult>, Vec<Skipped>) {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, RunResult)>> = Mutex::new(Vec::new());
    let skipped: Mutex<Vec<(usize, Skipped)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(combos.len().max(1)) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(params) = combos.get(k) else {
                    break;
                };
                match maker.make(params) {
                    Ok(mut strategy) => {
                        let mut outcome = bt::run(strategy.as_mut(), series, o);
                        if !keep_equity {
                            outcome.equity = Vec::new();
                        }
                        crate::lock(&results).push((
                            k,
                            RunResult {
                                params: params.clone(),
                                outcome,
                                run_id: None,
                            },
                        ));
                    }
                    Err(e) => crate::lock(&skipped).push((k, (params.clone(), format!("{e:#}")))),
                }
                progress();
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| r.0);
    let mut skipped = skipped.into_inner().unwrap_or_else(|p| p.into_inner());
    skipped.sort_by_key(|r| r.0);
    (
        results.into_iter().map(|r| r.1).collect(),
        skipped.into_iter().map(|r| r.1).collect(),
    )
}

/// The statistics with snake_case keys (JSON, ranking, ClickHouse columns); NaN = null.
pub fn stats_fields(s: &Stats) -> Vec<(&'static str, Value)> {
    let d = |x: Option<i64>| x.map_or(Value::Null, Value::from);
    let f = float_json;
    vec![
        ("start", Value::from(s.start)),
        ("end", Value::from(s.end)),
        ("duration_ms", Value::from(s.duration_ms)),
        ("exposure_pct", f(s.exposure_pct)),
        ("equity_final", f(s.equity_final)),
        ("equity_peak", f(s.equity_peak)),
        ("commissions", f(s.commissions)),
        ("return_pct", f(s.return_pct)),
        ("buy_hold_return_pct", f(s.buy_hold_return_pct)),
        ("return_ann_pct", f(s.return_ann_pct)),
        ("volatility_ann_pct", f(s.volatility_ann_pct)),
        ("cagr_pct", f(s.cagr_pct)),
        ("sharpe", f(s.sharpe)),
        ("sortino", f(s.sortino)),
        ("calmar", f(s.calmar)),
        ("alpha_pct", f(s.alpha_pct)),
        ("beta", f(s.beta)),
        ("max_drawdown_pct", f(s.max_drawdown_pct)),
        ("avg_drawdown_pct", f(s.avg_drawdown_pct)),
        ("max_drawdown_duration_ms", d(s.max_drawdown_duration_ms)),
        ("avg_drawdown_duration_ms", d(s.avg_drawdown_duration_ms)),
        ("trades", Value::from(s.trades)),
        ("win_rate_pct", f(s.win_rate_pct)),
        ("best_trade_pct", f(s.best_trade_pct)),
        ("worst_trade_pct", f(s.worst_trade_pct)),
        ("avg_trade_pct", f(s.avg_trade_pct)),
        ("max_trade_duration_ms", d(s.max_trade_duration_ms)),
        ("avg_trade_duration_ms", d(s.avg_trade_duration_ms)),
        ("profit_factor", f(s.profit_factor)),
        ("expectancy_pct", f(s.expectancy_pct)),
        ("sqn", f(s.sqn)),
        ("kelly", f(s.kelly)),
    ]
}

/// A statistic as JSON: a number, `null` when undefined (NaN), `"inf"`/`"-inf"` when infinite
/// (a Sortino ratio without a losing day), as Python's `float()` reads them.
pub fn float_json(x: f64) -> Value {
    if x.is_nan() {
        Value::Null
    } else if x.is_infinite() {
        Value::from(if x > 0.0 { "inf" } else { "-inf" })
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// [`float_json`] read back.
fn json_float(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        _ => f64::NAN,
    }
}

/// A float as ClickHouse's TabSeparated reads it back exactly (`nan`, `inf`, `-inf`).
fn tsv_float(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        x.to_string()
    }
}

/// The names `--rank` accepts.
pub fn rank_keys() -> Vec<&'static str> {
    stats_fields(&Stats::default())
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !matches!(*k, "start" | "end" | "duration_ms"))
        .collect()
}

/// A statistic by its snake_case name, as f64 (NaN if undefined).
pub fn stat_value(s: &Stats, key: &str) -> Option<f64> {
    stats_fields(s)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| json_float(&v))
}

/// Parameters as `fast=10 slow=20`.
pub fn describe_params(params: &[(String, f64)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn params_json(params: &[(String, f64)]) -> Value {
    Value::Object(params.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// One run as JSON: the statistics, the strategy and its parameters, and the trade list.
pub fn run_json(strategy: &str, r: &RunResult, bars: usize) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("strategy".into(), json!(strategy));
    m.insert("params".into(), params_json(&r.params));
    m.insert("bars".into(), json!(bars));
    for (k, v) in stats_fields(&r.outcome.stats) {
        m.insert(k.into(), v);
    }
    m.insert("open_trades".into(), json!(r.outcome.open_trades));
    if let Some(id) = &r.run_id {
        m.insert("run_id".into(), json!(id));
    }
    let f = float_json;
    let trades: Vec<Value> = r
        .outcome
        .trades
        .iter()
        .map(|t| {
            json!({
                "entry_bar": t.entry_bar,
                "exit_bar": t.exit_bar,
                "entry_time": t.entry_time,
                "exit_time": t.exit_time,
                "size": f(t.size),
                "entry_price": f(t.entry_price),
                "exit_price": f(t.exit_price),
                "pnl": f(t.pnl),
                "return_pct": f(t.return_pct * 100.0),
                "commission": f(t.commission),
            })
        })
        .collect();
    m.insert("trade_list".into(), Value::Array(trades));
    Value::Object(m)
}

/// The statistics table as backtesting.py prints it.
pub fn stats_table(stats: &Stats) -> String {
    let rows = super::report::format_stats(stats);
    let w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let v = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in rows {
        let _ = writeln!(out, "{label:<w$}  {value:>v$}");
    }
    out
}

/// The ranking order: descending by `key`, undefined values last.
pub fn rank(results: &mut [RunResult], key: &str) {
    results.sort_by(|a, b| {
        let x = stat_value(&a.outcome.stats, key).unwrap_or(f64::NAN);
        let y = stat_value(&b.outcome.stats, key).unwrap_or(f64::NAN);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => y.total_cmp(&x),
        }
    });
}

/// A pair's stored closed candles in `[from, to)` as a series: read chunk by chunk (in
/// primary-key windows, see [`Store::final_klines_after`]) by a reader task that fetches the
/// next chunk while this one is converted.
pub async fn load_stored(
    store: &Store,
    pair: &PairKey,
    from: Option<i64>,
    to: Option<i64>,
) -> anyhow::Result<Series> {
    const CHUNK: u64 = 50_000;
    let to = to.unwrap_or(i64::MAX);
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let reader = {
        let (store, pair) = (store.clone(), pair.clone());
        let mut after = from.map_or(i64::MIN, |f| f.saturating_sub(1));
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                let rows = store.final_klines_after(&pair, after, CHUNK).await;
                let next = match &rows {
                    Ok(r) if r.len() as u64 == CHUNK => r.last().map(|k| k.open_time),
                    _ => None,
                };
                if tx.send(rows).await.is_err() {
                    return;
                }
                match next {
                    Some(t) if t < to => after = t,
                    _ => return,
                }
            }
        }))
    };
    let mut s = Series::default();
    while let Some(rows) = rx.recv().await {
        let rows = rows.with_context(|| format!("cannot read the candles of {pair}"))?;
        for k in &rows {
            if k.open_time >= to {
                return Ok(s);
            }
            s.push(k.open_time, &Bar::from_kline(k));
        }
    }
    drop(reader);
    Ok(s)
}

/// The settings and source columns of a saved run.
pub struct SaveMeta<'a> {
    pub batch_id: &'a str,
    pub strategy: &'a str,
    pub source: &'a Source,
    pub series: &'a Series,
    pub settings: &'a Settings,
}

/// Writes every run to `backtest_results` and its trades to `backtest_trades`; the run ids.
pub async fn save(
    store: &Store,
    meta: &SaveMeta<'_>,
    runs: &mut [RunResult],
) -> anyhow::Result<()> {
    let (market, symbol, period) = match meta.source {
        Source::Stored { pair, .. } => (
            pair.market.as_str().to_string(),
            pair.symbol.as_str().to_string(),
            pair.period.as_str().to_string(),
        ),
        Source::Csv(_) => (String::new(), String::new(), String::new()),
    };
    let s = meta.series;
    let (start, end) = (
        s.time.first().copied().unwrap_or(0),
        s.time.last().copied().unwrap_or(0),
    );
    let set = meta.settings;
    let mut results = String::new();
    let mut trades = String::new();
    let mut ids: Vec<String> = Vec::new();
    let mut cols: Vec<&str> = vec![
        "run_id",
        "batch_id",
        "strategy",
        "params",
        "source",
        "market",
        "symbol",
        "period",
        "start_ms",
        "end_ms",
        "bars",
        "cash",
        "commission",
        "slippage_bps",
        "sizing",
        "fill",
        "exclusive",
        "long_only",
        "finalize",
    ];
    // The statistics' columns are the ones `--rank` accepts.
    let stat_cols = rank_keys();
    cols.extend(stat_cols.iter().copied());
    cols.push("open_trades");
    for r in runs.iter() {
        let id = uuid::Uuid::new_v4().to_string();
        let mut line = vec![
            id.clone(),
            meta.batch_id.to_string(),
            tsv_escape(meta.strategy),
            tsv_escape(&params_json(&r.params).to_string()),
            tsv_escape(&meta.source.describe()),
            market.clone(),
            symbol.clone(),
            period.clone(),
            start.to_string(),
            end.to_string(),
            s.len().to_string(),
            set.cash.to_string(),
            set.commission.to_string(),
            set.slippage_bps.to_string(),
            tsv_escape(&set.sizing_text()),
            tsv_escape(&set.fill),
            u8::from(set.exclusive).to_string(),
            u8::from(set.long_only).to_string(),
            u8::from(set.finalize).to_string(),
        ];
        let fields = stats_fields(&r.outcome.stats);
        for c in &stat_cols {
            let v = fields.iter().find(|f| f.0 == *c).map(|f| &f.1);
            line.push(match (c.ends_with("_ms") || *c == "trades", v) {
                (true, Some(Value::Number(n))) => n.to_string(),
                (true, _) => "-1".to_string(),
                (false, Some(v)) => tsv_float(json_float(v)),
                (false, None) => "nan".to_string(),
            });
        }
        line.push(r.outcome.open_trades.to_string());
        results.push_str(&line.join("\t"));
        results.push('\n');
        for (n, t) in r.outcome.trades.iter().enumerate() {
            let _ = writeln!(
                trades,
                "{id}\t{n}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                t.size,
                t.entry_bar,
                t.exit_bar,
                t.entry_time,
                t.exit_time,
                t.entry_price,
                t.exit_price,
                tsv_float(t.pnl),
                tsv_float(t.return_pct * 100.0),
                tsv_float(t.commission)
            );
        }
        ids.push(id);
    }
    store
        .insert_tsv("backtest_results", &cols, results)
        .await
        .context("cannot save to backtest_results")?;
    store
        .insert_tsv(
            "backtest_trades",
            &[
                "run_id",
                "n",
                "size",
                "entry_bar",
                "exit_bar",
                "entry_time",
                "exit_time",
                "entry_price",
                "exit_price",
                "pnl",
                "return_pct",
                "commission",
            ],
            trades,
        )
        .await
        .context("cannot save to backtest_trades")?;
    for (r, id) in runs.iter_mut().zip(ids) {
        r.run_id = Some(id);
    }
    Ok(())
}
