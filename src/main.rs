//! The `quantservice` binary: parses the command line, loads the config, runs the command and
//! maps the outcome to an exit code (0 success, 1 failure, 2 usage error from clap; `ready`
//! also 3: the ops endpoint is disabled).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use quantservice::app;
use quantservice::config::{Config, ENV_CONFIG_PATH};
use quantservice::logging::{self, Console};
use quantservice::server::ops::ReadyError;

/// `--version`: the crate version, the git commit (`-dirty` when built from modified sources,
/// `unknown` without git) and the UTC build date, all set by build.rs.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("QS_GIT_COMMIT"),
    ", built ",
    env!("QS_BUILD_DATE"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "quantservice",
    version = VERSION,
    about = "Keeps ClickHouse full of correct, complete Binance candlestick data.",
    long_about = "Without a command, runs the daemon: applies migrations, then converges to the \
                  desired state until SIGTERM or Ctrl-C."
)]
struct Cli {
    /// Config file. Default: $QS_CONFIG_PATH, else ./config/app.yaml, else
    /// /opt/quantservice/config/app.yaml.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Validate the config, connect to ClickHouse, print the effective config with secrets as
    /// ***; exit 0 if all is well, 1 otherwise.
    #[arg(long)]
    check_config: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon (the default when no command is given).
    Run,
    /// Create the database and apply pending schema migrations, then exit.
    Migrate,
    /// Same as --check-config.
    CheckConfig,
    /// Backfill every closed candle of one pair in [start_ms, end_ms) into ClickHouse.
    BackfillGap(BackfillArgs),
    /// Stream one pair live: print each closed candle and write it to ClickHouse until Ctrl-C.
    WsStart(WsStartArgs),
    /// OPTIMIZE, one partition at a time, the partitions that received late or replaced rows
    /// since their last optimize (tracked by the writer), and mark them done.
    Optimize(OptimizeArgs),
    /// Compute indicators over a pair's stored candles (warm-up from its first candle) and
    /// write the values of [start_ms, end_ms) to the indicators table, or to a CSV.
    Indicators(IndicatorsArgs),
    /// Run the client server alone, serving from ClickHouse only: WebSocket push at /ws
    /// (replay, then live by following new rows) and the Binance-compatible REST facade.
    /// Address and limits default to app.clientserver; run several in front of one ClickHouse.
    Clientserver(ClientServerArgs),
    /// Backtest a strategy (built-in, or a rule file) over stored candles or a CSV file, with
    /// backtesting.py's accounting and statistics; a parameter grid runs every combination in
    /// parallel and ranks them.
    Backtest(Box<BacktestArgs>),
    /// Run the built-in Binance simulator (REST, archives) for local runs and benchmarks.
    SimExchange(qs_sim::cli::SimArgs),
    /// Wait until the running daemon is ready (its /readyz on app.http.listen answers 200):
    /// exit 0 when ready, 1 on timeout (the last reason on stderr), 3 if the endpoint is
    /// disabled.
    Ready(ReadyArgs),
}

#[derive(clap::Args, Debug)]
struct BacktestArgs {
    /// A built-in strategy: sma_cross, ema_cross, rsi_reversion, macd_cross, bbands_breakout,
    /// donchian_breakout.
    #[arg(long)]
    strategy: Option<String>,
    /// A strategy parameter, `name=value`, or a grid axis `name=start:end:step` (end
    /// included); repeatable.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// A rule file (YAML: long_entry, long_exit, short_entry, short_exit, stop_loss_pct,
    /// take_profit_pct) instead of --strategy.
    #[arg(long, value_name = "FILE.yaml")]
    rules: Option<PathBuf>,
    /// Binance symbol of stored candles, e.g. BTCUSDT.
    #[arg(long)]
    symbol: Option<String>,
    /// spot, um or cm.
    #[arg(long)]
    market: Option<String>,
    /// Kline interval, e.g. 1m, 1h, 1d.
    #[arg(long)]
    period: Option<String>,
    /// First candle (open time, Unix ms, inclusive); default: the first stored.
    #[arg(
        long = "start_ms",
        visible_alias = "start-ms",
        allow_negative_numbers = true
    )]
    start_ms: Option<i64>,
    /// End (open time, Unix ms, exclusive); default: after the last stored.
    #[arg(
        long = "end_ms",
        visible_alias = "end-ms",
        allow_negative_numbers = true
    )]
    end_ms: Option<i64>,
    /// Candles from a CSV file instead: a Binance kline CSV (with or without header) or a
    /// backtesting.py-style one (date, Open, High, Low, Close, Volume).
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Starting cash.
    #[arg(long, default_value_t = 10_000.0, allow_negative_numbers = true)]
    cash: f64,
    /// Commission as a fraction of the notional, on entry and on exit (0.001 = 0.1 %).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    commission: f64,
    /// Slippage in basis points: buys fill that much higher, sells lower.
    #[arg(
        long = "slippage_bps",
        visible_alias = "slippage-bps",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    slippage_bps: f64,
    /// whole (all equity in whole units, as backtesting.py), fraction (all equity, rounded
    /// down to --step) or a fixed quantity in units.
    #[arg(long, default_value = "whole")]
    sizing: String,
    /// The quantity step for --sizing fraction (the symbol's LOT_SIZE stepSize).
    #[arg(long, default_value_t = 0.00001)]
    step: f64,
    /// next_open (market orders fill at the next candle's open) or close (at the deciding
    /// candle's close).
    #[arg(long, default_value = "next_open")]
    fill: String,
    /// A new order closes the open position first (backtesting.py's exclusive_orders=True).
    #[arg(long)]
    exclusive: bool,
    /// Never short: sell signals only close long positions.
    #[arg(long = "long-only", visible_alias = "long_only")]
    long_only: bool,
    /// Close trades still open at the end at the last candle (they then count in the trade
    /// statistics).
    #[arg(long)]
    finalize: bool,
    /// Write a self-contained HTML report (the best combination of a grid).
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Save every run to backtest_results and its trades to backtest_trades.
    #[arg(long)]
    save: bool,
    /// The statistic a grid is ranked by, best first (descending), e.g. sharpe, return_pct.
    #[arg(long, default_value = "sharpe")]
    rank: String,
    /// How many of a grid's best runs to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Threads for a grid (default: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl BacktestArgs {
    fn request(&self) -> anyhow::Result<quantservice::backtest::command::Request> {
        use quantservice::backtest::run::{Settings, Source};
        let source = match (&self.csv, &self.symbol, &self.market, &self.period) {
            (Some(path), None, None, None) => {
                if self.start_ms.is_some() || self.end_ms.is_some() {
                    anyhow::bail!(
                        "--start_ms/--end_ms select stored candles; they do not apply to --csv"
                    );
                }
                Source::Csv(path.clone())
            }
            (Some(_), ..) => {
                anyhow::bail!("give either --csv or --symbol/--market/--period, not both")
            }
            (None, Some(symbol), Some(market), Some(period)) => Source::Stored {
                pair: quantservice::market::PairKey::parse(market, symbol, period)?,
                start_ms: self.start_ms,
                end_ms: self.end_ms,
            },
            (None, ..) => anyhow::bail!(
                "no candles: pass --csv FILE, or --symbol, --market and --period for stored ones"
            ),
        };
        Ok(quantservice::backtest::command::Request {
            strategy: self.strategy.clone(),
            rules: self.rules.clone(),
            params: self.params.clone(),
            source,
            settings: Settings {
                cash: self.cash,
                commission: self.commission,
                slippage_bps: self.slippage_bps,
                sizing: self.sizing.clone(),
                step: self.step,
                fill: self.fill.clone(),
                exclusive: self.exclusive,
                long_only: self.long_only,
                finalize: self.finalize,
            },
            report: self.report.clone(),
            json: self.json,
            save: self.save,
            rank: self.rank.clone(),
            top: self.top,
            threads: self.threads,
        })
    }
}

/// `backtest`: without ClickHouse (a CSV, not saved) it needs no configuration at all.
async fn backtest(req: quantservice::backtest::command::Request, cfg: Option<&Config>) -> ExitCode {
    use quantservice::backtest::command;
    let scrub = |s: String| match cfg {
        Some(cfg) => cfg
            .secrets()
            .iter()
            .fold(s, |acc, secret| acc.replace(secret.as_str(), "***")),
        None => s,
    };
    let mut out = std::io::stdout();
    match command::execute(cfg, req, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", scrub(format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

#[derive(clap::Args, Debug)]
struct ClientServerArgs {
    /// Address to listen on (default: app.clientserver.host), e.g. 0.0.0.0.
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (default: app.clientserver.port, 8765).
    #[arg(long)]
    port: Option<u16>,
}

#[derive(clap::Args, Debug)]
struct ReadyArgs {
    /// How long to wait, e.g. 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = quantservice::config::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(clap::Args, Debug)]
struct OptimizeArgs {
    /// OPTIMIZE … FINAL: rewrite each partition into one part, removing every duplicate
    /// version (what the daemon's scheduled run does by default). Without it, a plain OPTIMIZE
    /// merges each partition's parts and leaves a partition that is one part already alone.
    #[arg(long = "final")]
    with_final: bool,
    /// Every partition that has data, tracked as dirty or not.
    #[arg(long)]
    all: bool,
    /// Only this table (default: every tracked table: `klines`, `indicators`).
    #[arg(long, value_name = "TABLE")]
    table: Option<String>,
    /// Print what would be optimized (parts, rows, bytes, dirty since) and change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args, Debug)]
struct WsStartArgs {
    /// Binance symbol, e.g. BTCUSDT or BTCUSD_PERP.
    #[arg(long)]
    symbol: String,
    /// spot, um (USD-M futures) or cm (COIN-M futures).
    #[arg(long, default_value = "spot")]
    market: String,
    /// Kline interval, e.g. 1s (spot), 1m, 1h.
    #[arg(long, default_value = "1m")]
    period: String,
}

#[derive(clap::Args, Debug)]
struct IndicatorsArgs {
    /// Binance symbol, e.g. ETHUSDT or BTCUSD_PERP.
    #[arg(long)]
    symbol: String,
    /// spot, um (USD-M futures) or cm (COIN-M futures).
    #[arg(long)]
    market: String,
    /// Kline interval, e.g. 1m, 1h.
    #[arg(long)]
    period: String,
    /// An indicator spec, e.g. 'rsi(14)' or 'macd(12,26,9)'; repeatable.
    #[arg(long = "indicator", value_name = "SPEC", required = true)]
    indicators: Vec<String>,
    /// First open time written (Unix ms, inclusive); default: the series start.
    #[arg(
        long = "start_ms",
        visible_alias = "start-ms",
        allow_negative_numbers = true
    )]
    start_ms: Option<i64>,
    /// End of the open times written (Unix ms, exclusive); default: the last stored candle.
    #[arg(
        long = "end_ms",
        visible_alias = "end-ms",
        allow_negative_numbers = true
    )]
    end_ms: Option<i64>,
    /// Write the values to this CSV file instead of the indicators table.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct BackfillArgs {
    /// Binance symbol, e.g. ETHUSDT or BTCUSD_PERP.
    #[arg(long)]
    symbol: String,
    /// spot, um (USD-M futures) or cm (COIN-M futures).
    #[arg(long)]
    market: String,
    /// Kline interval, e.g. 1m, 1h, 1d, 1M (1s on spot only).
    #[arg(long)]
    period: String,
    /// First open time (Unix ms, inclusive).
    #[arg(
        long = "start_ms",
        visible_alias = "start-ms",
        allow_negative_numbers = true
    )]
    start_ms: i64,
    /// End (Unix ms, exclusive).
    #[arg(
        long = "end_ms",
        visible_alias = "end-ms",
        allow_negative_numbers = true
    )]
    end_ms: i64,
    /// Override app.backfill.source for this run: auto, archive or rest.
    #[arg(long)]
    source: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut log_guard = None;
    let code = runtime.block_on(run(cli, &mut log_guard));
    // Tasks still alive log while the runtime shuts down: the log file gets those lines too,
    // then the guard writes what is queued.
    drop(runtime);
    drop(log_guard);
    code
}

async fn run(cli: Cli, log_guard: &mut Option<logging::LogGuard>) -> ExitCode {
    quantservice::metrics::set_build(env!("QS_GIT_COMMIT"), env!("QS_BUILD_DATE"));
    let cli = match cli.command {
        Some(Command::SimExchange(args)) => return run_sim(args).await,
        // Bad arguments are reported before the configuration is looked for, and a backtest
        // of a CSV file that saves nothing needs no configuration at all.
        Some(Command::Backtest(args)) => match args.request() {
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
            Ok(req) if !quantservice::backtest::command::needs_clickhouse(&req) => {
                return backtest(req, None).await
            }
            Ok(_) => Cli {
                command: Some(Command::Backtest(args)),
                ..cli
            },
        },
        command => Cli { command, ..cli },
    };
    if cli.check_config
        && cli.command.is_some()
        && !matches!(cli.command, Some(Command::CheckConfig))
    {
        eprintln!("error: --check-config cannot be combined with a command");
        return ExitCode::from(2);
    }
    let path =
        match Config::resolve_path(cli.config.as_deref(), std::env::var(ENV_CONFIG_PATH).ok()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
    let cfg = match Config::load(&path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: invalid configuration ({}):", path.display());
            for p in e.problems() {
                eprintln!("  {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Ready(args)) = &cli.command {
        // No logging set up: this command must not open the daemon's log files.
        return match app::ready(&cfg, args.timeout).await {
            Ok(()) => {
                println!("ready");
                ExitCode::SUCCESS
            }
            Err(e @ ReadyError::Disabled) => {
                eprintln!("{e}");
                ExitCode::from(3)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let secrets = cfg.secrets();
    let scrub = |s: String| {
        secrets
            .iter()
            .fold(s, |acc, secret| acc.replace(secret.as_str(), "***"))
    };

    let check = cli.check_config || matches!(cli.command, Some(Command::CheckConfig));
    // Commands whose stdout is their output (the config dump, the summary) log to stderr.
    let console = if check
        || matches!(
            cli.command,
            Some(Command::BackfillGap(_))
                | Some(Command::WsStart(_))
                | Some(Command::Optimize(_))
                | Some(Command::Indicators(_))
                | Some(Command::Clientserver(_))
                | Some(Command::Backtest(_))
        ) {
        Console::Stderr
    } else {
        Console::Stdout
    };
    *log_guard = match logging::init(&cfg.logging, console, cfg.secrets()) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("error: {}", scrub(format!("{e:#}")));
            return ExitCode::FAILURE;
        }
    };

    if check {
        let mut out = Vec::new();
        let problems = app::check_config(&cfg, &path.display().to_string(), &mut out).await;
        // Already redacted (secrets print as ***); scrubbing it again could garble it.
        print!("{}", String::from_utf8_lossy(&out));
        if problems.is_empty() {
            println!("# OK");
            return ExitCode::SUCCESS;
        }
        for p in problems {
            eprintln!("error: {}", scrub(p));
        }
        return ExitCode::FAILURE;
    }

    let result = match cli.command {
        Some(Command::Migrate) => app::migrate(&cfg).await.map(|r| {
            let version = r.server_version.map(|v| v.to_string()).unwrap_or_default();
            println!(
                "migrate: ClickHouse {version}, database {}: {} applied, {} already applied, {} skipped",
                cfg.clickhouse.database,
                r.applied.len(),
                r.already.len(),
                r.skipped.len()
            );
        }),
        Some(Command::Run) | None => {
            let shutdown = CancellationToken::new();
            let trigger = shutdown.clone();
            app::watch_signals(app::shutdown_signal(), trigger);
            app::run_daemon(
                cfg,
                path.clone(),
                quantservice::config_watch::Reloads::new(),
                shutdown,
            )
            .await
        }
        Some(Command::WsStart(args)) => {
            let shutdown = CancellationToken::new();
            let trigger = shutdown.clone();
            app::watch_signals(app::shutdown_signal(), trigger);
            let mut out = std::io::stdout();
            app::ws_start(cfg, &args.market, &args.symbol, &args.period, &mut out, shutdown)
                .await
                .map(|_| ())
        }
        Some(Command::CheckConfig) | Some(Command::SimExchange(_)) | Some(Command::Ready(_)) => {
            Ok(())
        }
        // Checked before the configuration was read.
        Some(Command::Backtest(args)) => match args.request() {
            Ok(req) => return backtest(req, Some(&cfg)).await,
            Err(e) => Err(e),
        },
        Some(Command::Clientserver(args)) => {
            let cancel = CancellationToken::new();
            app::watch_signals(app::shutdown_signal(), cancel.clone());
            app::clientserver(&cfg, args.host, args.port, cancel).await
        }
        Some(Command::Optimize(args)) => {
            let cancel = CancellationToken::new();
            app::watch_signals(app::shutdown_signal(), cancel.clone());
            let req = app::OptimizeRequest {
                with_final: args.with_final,
                all: args.all,
                table: args.table,
                dry_run: args.dry_run,
            };
            app::optimize(&cfg, req, &mut std::io::stdout(), cancel)
                .await
                .map(|_| ())
        }
        Some(Command::Indicators(args)) => {
            let progress = candle_progress();
            let cancel = CancellationToken::new();
            app::watch_signals(app::shutdown_signal(), cancel.clone());
            let req = app::IndicatorsRequest {
                market: args.market,
                symbol: args.symbol,
                period: args.period,
                indicators: args.indicators,
                start_ms: args.start_ms,
                end_ms: args.end_ms,
                csv: args.csv,
            };
            app::indicators(cfg, req, progress, cancel)
                .await
                .map(|outcome| println!("{outcome}"))
        }
        Some(Command::BackfillGap(args)) => {
            let progress = candle_progress();
            let cancel = CancellationToken::new();
            let trigger = cancel.clone();
            app::watch_signals(app::shutdown_signal(), trigger);
            let req = app::BackfillRequest {
                market: args.market,
                symbol: args.symbol,
                period: args.period,
                start_ms: args.start_ms,
                end_ms: args.end_ms,
                source: args.source,
            };
            app::backfill_gap(cfg, req, progress, cancel)
                .await
                .map(|outcome| println!("{outcome}"))
        }
    };
    let result = match result {
        Ok(()) if app::signal_watcher_died() => Err(anyhow::anyhow!(
            "the signal watcher died; exiting with an error so that the service manager restarts QuantService"
        )),
        other => other,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", scrub(format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// A progress bar counting candles on a terminal's stderr; hidden when stderr is not a TTY.
fn candle_progress() -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {bar:40} {pos}/{len} candles {per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// `sim-exchange`: needs no app.yaml; logs to stderr.
async fn run_sim(args: qs_sim::cli::SimArgs) -> ExitCode {
    let logging = quantservice::config::LoggingConfig {
        level: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string()),
        ..Default::default()
    };
    let _guard = logging::init(&logging, Console::Stderr, Vec::new());
    match qs_sim::cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
