//! The `quantservice` binary: parses the command line, loads the config, runs the command and
//! maps the outcome to an exit code (0 success, 1 failure, 2 usage error from clap).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use quantservice::app;
use quantservice::config::{Config, ENV_CONFIG_PATH};
use quantservice::logging::{self, Console};

#[derive(Parser, Debug)]
#[command(
    name = "quantservice",
    version,
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
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    if cli.check_config && matches!(cli.command, Some(Command::Run) | Some(Command::Migrate)) {
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
    let secrets = cfg.secrets();
    let scrub = |s: String| {
        secrets
            .iter()
            .fold(s, |acc, secret| acc.replace(secret.as_str(), "***"))
    };

    let check = cli.check_config || matches!(cli.command, Some(Command::CheckConfig));
    // Commands whose stdout is their output log to stderr.
    let console = if check {
        Console::Stderr
    } else {
        Console::Stdout
    };
    let _guard = match logging::init(&cfg.logging, console, cfg.secrets()) {
        Ok(g) => g,
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
            tokio::spawn(async move {
                app::shutdown_signal().await;
                trigger.cancel();
            });
            app::run_daemon(cfg, shutdown).await
        }
        Some(Command::CheckConfig) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", scrub(format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
