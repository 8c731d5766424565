//! The `backtest` command's flow: load the candles, build the strategy (or every grid
//! combination), run, print, report, save.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use qs_core::backtest::rules::RuleSet;
use qs_core::backtest::{strategies, Series};

use super::run::{self, Maker, RunResult, Settings, Source};
use crate::config::Config;
use crate::store::{migrate, Store};

/// What `quantservice backtest` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub strategy: Option<String>,
    pub rules: Option<PathBuf>,
    pub params: Vec<String>,
    pub source: Source,
    pub settings: Settings,
    pub report: Option<PathBuf>,
    pub json: bool,
    pub save: bool,
    pub rank: String,
    pub top: usize,
    /// Threads for a grid (0 = every core).
    pub threads: usize,
}

/// A rule file: the expressions and the optional stops.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    long_entry: Option<String>,
    long_exit: Option<String>,
    short_entry: Option<String>,
    short_exit: Option<String>,
    stop_loss_pct: Option<f64>,
    take_profit_pct: Option<f64>,
    /// Free text, ignored.
    #[allow(dead_code)]
    description: Option<String>,
}

/// Reads and compiles a rule file (errors name the file, the field and the column).
pub fn read_rules(path: &Path) -> anyhow::Result<RuleSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the rule file {}", path.display()))?;
    let f: RuleFile =
        yaml_serde::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let set = RuleSet {
        long_entry: f.long_entry,
        long_exit: f.long_exit,
        short_entry: f.short_entry,
        short_exit: f.short_exit,
        stop_loss_pct: f.stop_loss_pct,
        take_profit_pct: f.take_profit_pct,
    };
    qs_core::backtest::rules::compile(&set)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(set)
}

/// Whether the request needs ClickHouse (and so the configuration).
pub fn needs_clickhouse(req: &Request) -> bool {
    req.save || matches!(req.source, Source::Stored { .. })
}

/// Runs the request; the report (table or JSON) goes to `out`, progress to stderr.
pub async fn execute(
    cfg: Option<&Config>,
    req: Request,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let maker = match (&req.strategy, &req.rules) {
        (Some(_), Some(_)) => bail!("give either --strategy or --rules, not both"),
        (None, None) => bail!(
            "no strategy: pass --strategy NAME (built-in: {}) or --rules FILE.yaml",
            strategies::NAMES.join(", ")
        ),
        (Some(name), None) => {
            if strategies::params(name).is_none() {
                bail!(strategies::StrategyError::Unknown(name.clone()));
            }
            Maker::Builtin(name.clone())
        }
        (None, Some(path)) => {
            if !req.params.is_empty() {
                bail!("--param does not apply to --rules (a rule file has its numbers in its expressions)");
            }
            Maker::Rules {
                path: path.clone(),
                rules: read_rules(path)?,
            }
        }
    };
    let axes = run::parse_params(&req.params)?;
    if let Maker::Builtin(name) = &maker {
        let known = strategies::params(name).unwrap_or(&[]);
        for (p, _) in &axes {
            if !known.iter().any(|k| k.0 == p) {
                bail!(strategies::StrategyError::UnknownParam {
                    strategy: name.clone(),
                    param: p.clone(),
                    takes: known.iter().map(|k| k.0).collect::<Vec<_>>().join(", "),
                });
            }
        }
    }
    if !run::rank_keys().contains(&req.rank.as_str()) {
        bail!(
            "--rank {:?}: not a statistic (one of: {})",
            req.rank,
            run::rank_keys().join(", ")
        );
    }
    let combos = run::combinations(&axes)?;
    let options = req.settings.options()?;

    let store = match (needs_clickhouse(&req), cfg) {
        (true, Some(cfg)) => {
            let store = Store::new(&cfg.clickhouse)?;
            migrate::run(&store)
                .await
                .context("cannot prepare ClickHouse")?;
            Some(store)
        }
        (true, None) => bail!("reading or saving in ClickHouse needs the configuration (app.yaml)"),
        (false, _) => None,
    };
    let load_started = std::time::Instant::now();
    let series: Series = match (&req.source, &store) {
        (Source::Csv(path), _) => super::csv::read_csv(path)?,
        (
            Source::Stored {
                pair,
                start_ms,
                end_ms,
            },
            Some(store),
        ) => {
            if let (Some(a), Some(b)) = (start_ms, end_ms) {
                if a >= b {
                    bail!("range inverted or empty: --start_ms {a} must be before --end_ms {b}");
                }
            }
            let s = run::load_stored(store, pair, *start_ms, *end_ms).await?;
            if s.is_empty() {
                bail!("no stored candles of {pair} in the range: backfill them first (quantservice backfill-gap), or check --start_ms/--end_ms");
            }
            s
        }
        (Source::Stored { .. }, None) => bail!("reading candles needs ClickHouse"),
    };
    if series.is_empty() {
        bail!("no candles to test on");
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    let threads = if req.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        req.threads
    };
    let grid = combos.len() > 1;
    let bar = progress(grid, combos.len() as u64);
    let run_started = std::time::Instant::now();
    let (mut results, skipped) = run::run_grid(
        &maker,
        &combos,
        &series,
        &options,
        threads,
        !grid || req.report.is_some() && combos.len() == 1,
        &|| bar.inc(1),
    );
    bar.finish_and_clear();
    let run_secs = run_started.elapsed().as_secs_f64();
    if results.is_empty() {
        let reasons: Vec<String> = skipped
            .iter()
            .take(3)
            .map(|(p, why)| format!("{}: {why}", run::describe_params(p)))
            .collect();
        bail!("no valid parameter combination ({})", reasons.join("; "));
    }
    tracing::debug!(load_secs, run_secs, runs = results.len(), "Backtest done.");
    let strategy = maker.name();
    let batch = uuid::Uuid::new_v4().to_string();
    if let (Some(store), true) = (&store, req.save) {
        let meta = run::SaveMeta {
            batch_id: &batch,
            strategy: &strategy,
            source: &req.source,
            series: &series,
            settings: &req.settings,
        };
        run::save(store, &meta, &mut results).await?;
    }
    if grid {
        run::rank(&mut results, &req.rank);
    }
    if let Some(path) = &req.report {
        let mut shown: Vec<(String, String)> = vec![
            ("data".into(), req.source.describe()),
            ("strategy".into(), strategy.clone()),
        ];
        shown.extend(
            results[0]
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string())),
        );
        let set = &req.settings;
        shown.extend([
            ("cash".into(), set.cash.to_string()),
            ("commission".into(), set.commission.to_string()),
            ("slippage_bps".into(), set.slippage_bps.to_string()),
            ("sizing".into(), set.sizing_text()),
            ("fill".into(), set.fill.clone()),
            ("exclusive".into(), set.exclusive.to_string()),
            ("long_only".into(), set.long_only.to_string()),
            ("finalize".into(), set.finalize.to_string()),
        ]);
        if grid {
            shown.push((
                "grid".into(),
                format!("best of {} by {}", results.len(), req.rank),
            ));
        }
        write_report(
            path,
            &maker,
            &results[0],
            &series,
            &options,
            &strategy,
            &shown,
        )?;
    }
    if req.json {
        let value = if grid {
            serde_json::json!({
                "strategy": strategy,
                "combinations": combos.len(),
                "skipped": skipped.len(),
                "rank": req.rank,
                "batch_id": if req.save { Some(&batch) } else { None },
                "runs": results.iter().take(req.top).map(|r| run::run_json(&strategy, r, series.len())).collect::<Vec<_>>(),
            })
        } else {
            let mut v = run::run_json(&strategy, &results[0], series.len());
            if let (true, Some(m)) = (req.save, v.as_object_mut()) {
                m.insert("batch_id".into(), serde_json::json!(batch));
            }
            v
        };
        writeln!(out, "{value}")?;
    } else if grid {
        writeln!(
            out,
            "{strategy}: {} combinations ({} skipped as invalid), {} candles, ranked by {}:",
            combos.len(),
            skipped.len(),
            series.len(),
            req.rank
        )?;
        let keys = [
            "return_pct",
            "sharpe",
            "max_drawdown_pct",
            "win_rate_pct",
            "trades",
        ];
        write!(out, "{:>4}  {:<28}", "#", "parameters")?;
        let mut cols: Vec<&str> = vec![req.rank.as_str()];
        cols.extend(keys.iter().filter(|k| **k != req.rank));
        for k in &cols {
            write!(out, "  {k:>16}")?;
        }
        writeln!(out)?;
        for (i, r) in results.iter().take(req.top).enumerate() {
            write!(out, "{:>4}  {:<28}", i + 1, run::describe_params(&r.params))?;
            for k in &cols {
                let v = run::stat_value(&r.outcome.stats, k).unwrap_or(f64::NAN);
                let text = if *k == "trades" {
                    format!("{v}")
                } else {
                    format!("{v:.4}")
                };
                write!(out, "  {text:>16}")?;
            }
            writeln!(out)?;
        }
        if req.save {
            writeln!(
                out,
                "saved {} runs to backtest_results (batch_id {batch})",
                results.len()
            )?;
        }
    } else {
        let r = &results[0];
        if !r.params.is_empty() {
            writeln!(out, "{strategy} {}", run::describe_params(&r.params))?;
        } else {
            writeln!(out, "{strategy}")?;
        }
        write!(out, "{}", run::stats_table(&r.outcome.stats))?;
        if r.outcome.open_trades > 0 && !req.settings.finalize {
            writeln!(
                out,
                "({} trade(s) still open at the end: marked to market in the equity, not in the trade statistics; --finalize closes them)",
                r.outcome.open_trades
            )?;
        }
        if let Some(id) = &r.run_id {
            writeln!(out, "saved to backtest_results (run_id {id})")?;
        }
    }
    if let Some(path) = &req.report {
        if !req.json {
            writeln!(out, "report: {}", path.display())?;
        }
    }
    Ok(())
}

fn write_report(
    path: &Path,
    maker: &Maker,
    best: &RunResult,
    series: &Series,
    options: &qs_core::backtest::Options,
    strategy: &str,
    shown: &[(String, String)],
) -> anyhow::Result<()> {
    // A grid drops equity curves: run the best combination again for its report.
    let outcome = if best.outcome.equity.is_empty() {
        let mut s = maker.make(&best.params)?;
        qs_core::backtest::run(s.as_mut(), series, options)
    } else {
        best.outcome.clone()
    };
    let title = format!("{strategy} {}", run::describe_params(&best.params));
    let html = super::report::render(title.trim(), series, &outcome, shown);
    std::fs::write(path, html)
        .with_context(|| format!("cannot write the report {}", path.display()))
}

/// A progress bar for a grid on a terminal's stderr; hidden otherwise.
fn progress(grid: bool, n: u64) -> indicatif::ProgressBar {
    if !grid || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} runs eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}
