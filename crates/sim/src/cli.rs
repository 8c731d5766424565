//! The `sim-exchange` command: turns command-line flags into a [`SimConfig`] and fault
//! settings, runs the simulator until Ctrl-C or SIGTERM. Owns no simulator behaviour.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use qs_core::market::{Market, PairKey, Symbol};

use super::{start, SimConfig};

/// Flags of `quantservice sim-exchange`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Spot REQUEST_WEIGHT budget per window.
    #[arg(long, default_value_t = 6000)]
    pub budget_spot: u32,
    /// USD-M REQUEST_WEIGHT budget per window.
    #[arg(long, default_value_t = 2400)]
    pub budget_um: u32,
    /// COIN-M REQUEST_WEIGHT budget per window.
    #[arg(long, default_value_t = 2400)]
    pub budget_cm: u32,
    /// Weight window for all markets: `60s`, `2s`, `1m`, `1h` or plain seconds.
    #[arg(long, default_value = "60s", value_parser = parse_window)]
    pub window: Duration,
    /// How long an IP stays banned (418) after ignoring 429s.
    #[arg(long, default_value_t = 120)]
    pub ban_seconds: u64,
    /// Answer 451 to REST requests from this client IP (repeatable).
    #[arg(long = "deny-451", value_name = "IP")]
    pub deny_451: Vec<IpAddr>,
    /// Maintenance gap `market:SYMBOL:start_ms:end_ms` (SYMBOL `*` = every symbol; repeatable).
    #[arg(long, value_name = "MARKET:SYMBOL:START_MS:END_MS", value_parser = parse_maintenance)]
    pub maintenance: Vec<MaintenanceArg>,
    /// Serve wrong `.CHECKSUM` files.
    #[arg(long)]
    pub bad_checksum: bool,
    /// Serve a real klines CSV for a pair: `market:SYMBOL:period:PATH` (repeatable).
    #[arg(long, value_name = "MARKET:SYMBOL:PERIOD:PATH", value_parser = parse_csv)]
    pub csv: Vec<CsvArg>,
    /// Count weight over a rolling window instead of fixed epoch-aligned windows.
    #[arg(long)]
    pub rolling_window: bool,
    /// Serve at most N klines per reply, whatever `limit` asks.
    #[arg(long, value_name = "N")]
    pub page_cap: Option<usize>,
    /// Serve closed candles only once they closed this many seconds ago.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub lag_seconds: u64,
    /// Send no weight headers and no Retry-After.
    #[arg(long)]
    pub no_weight_headers: bool,
    /// Push every WebSocket kline stream every N ms instead of Binance's speeds (spot 2000 ms,
    /// spot `1s` 1000 ms, futures 250 ms).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_update_ms: Option<u64>,
    /// Close WebSocket connections this many seconds after they opened instead of 24 h.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_max_lifetime_secs: Option<u64>,
}

/// A parsed `--maintenance` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceArg {
    pub market: Market,
    pub symbol: Option<Symbol>,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// A parsed `--csv` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvArg {
    pub pair: PairKey,
    pub path: PathBuf,
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid window {s:?}: expected e.g. 60s, 2s, 1m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("invalid window unit in {s:?}: use s, m, h or d")),
    };
    if secs == 0 {
        return Err("the window must be at least 1s".to_string());
    }
    Ok(Duration::from_secs(secs))
}

fn parse_maintenance(s: &str) -> Result<MaintenanceArg, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [market, symbol, start, end] = parts.as_slice() else {
        return Err(format!("expected market:SYMBOL:start_ms:end_ms, got {s:?}"));
    };
    let market: Market = market.parse().map_err(|e| format!("{e}"))?;
    let symbol = match *symbol {
        "*" | "" => None,
        sym => Some(sym.parse::<Symbol>().map_err(|e| format!("{e}"))?),
    };
    let start_ms: i64 = start
        .parse()
        .map_err(|e| format!("start_ms {start:?}: {e}"))?;
    let end_ms: i64 = end.parse().map_err(|e| format!("end_ms {end:?}: {e}"))?;
    if end_ms <= start_ms {
        return Err(format!(
            "maintenance end {end_ms} is not after start {start_ms}"
        ));
    }
    Ok(MaintenanceArg {
        market,
        symbol,
        start_ms,
        end_ms,
    })
}

fn parse_csv(s: &str) -> Result<CsvArg, String> {
    let mut it = s.splitn(4, ':');
    let (Some(market), Some(symbol), Some(period), Some(path)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(format!("expected market:SYMBOL:period:PATH, got {s:?}"));
    };
    let pair = PairKey::parse(market, symbol, period).map_err(|e| e.to_string())?;
    Ok(CsvArg {
        pair,
        path: PathBuf::from(path),
    })
}

impl SimArgs {
    /// The simulator configuration these flags describe (CSV files are read here).
    pub fn config(&self) -> anyhow::Result<SimConfig> {
        let mut cfg = SimConfig::default()
            .with_budget(Market::Spot, self.budget_spot, self.window)
            .with_budget(Market::Um, self.budget_um, self.window)
            .with_budget(Market::Cm, self.budget_cm, self.window)
            .with_ban_duration(Duration::from_secs(self.ban_seconds));
        for csv in &self.csv {
            cfg = cfg
                .with_csv_series(csv.pair.clone(), &csv.path)
                .with_context(|| format!("cannot load {} for {}", csv.path.display(), csv.pair))?;
        }
        Ok(cfg)
    }
}

/// Runs the simulator until Ctrl-C or SIGTERM; prints `sim-exchange listening on http://ADDR`.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let sim = start(cfg, args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    if !args.deny_451.is_empty() {
        sim.set_deny_451(args.deny_451.clone());
    }
    for m in &args.maintenance {
        sim.add_maintenance(m.market, m.symbol.clone(), m.start_ms, m.end_ms);
    }
    sim.set_bad_checksum(args.bad_checksum);
    sim.set_rolling_window(args.rolling_window);
    sim.set_page_cap(args.page_cap);
    sim.set_lag(Duration::from_secs(args.lag_seconds));
    sim.set_no_weight_headers(args.no_weight_headers);
    if let Some(ms) = args.ws_update_ms {
        sim.set_ws_update_interval(Some(Duration::from_millis(ms)));
    }
    if let Some(secs) = args.ws_max_lifetime_secs {
        sim.set_ws_max_lifetime(Duration::from_secs(secs));
    }
    tracing::info!(
        spot = %sim.ws_url(Market::Spot),
        um = %sim.ws_url(Market::Um),
        cm = %sim.ws_url(Market::Cm),
        "WebSocket stream bases."
    );
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "sim-exchange listening on {}", sim.archive_url())?;
        out.flush()?;
    }
    wait_for_stop().await?;
    tracing::info!("Stopping the simulator.");
    sim.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_stop() -> anyhow::Result<()> {
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn parses_flags() {
        let cli = Cli::try_parse_from([
            "x",
            "--window",
            "2s",
            "--budget-um",
            "10",
            "--deny-451",
            "127.0.0.2",
            "--maintenance",
            "um:*:1000:2000",
            "--maintenance",
            "spot:BTCUSDT:1000:2000",
            "--csv",
            "spot:BTCUSDT:1h:/tmp/a:b.csv",
            "--bad-checksum",
            "--ws-update-ms",
            "100",
            "--ws-max-lifetime-secs",
            "30",
        ])
        .unwrap();
        let a = cli.sim;
        assert_eq!(a.window, Duration::from_secs(2));
        assert_eq!(a.budget_um, 10);
        assert_eq!(a.budget_spot, 6000);
        assert_eq!(a.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(a.maintenance[0].symbol, None);
        assert_eq!(a.maintenance[1].symbol, Some("BTCUSDT".parse().unwrap()));
        assert_eq!(a.csv[0].path, PathBuf::from("/tmp/a:b.csv"));
        assert!(a.bad_checksum);
        assert_eq!(
            (a.ws_update_ms, a.ws_max_lifetime_secs),
            (Some(100), Some(30))
        );
        assert!(Cli::try_parse_from(["x", "--ws-update-ms", "0"]).is_err());
        assert_eq!(parse_window("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_window("90"), Ok(Duration::from_secs(90)));
        assert!(parse_window("0s").is_err() && parse_window("5x").is_err());
        assert!(parse_maintenance("um:BTCUSDT:2000:1000").is_err());
    }
}
