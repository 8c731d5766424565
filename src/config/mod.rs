//! `app.yaml`: the config types, their defaults, loading (path resolution, env overrides for
//! secrets) and the redacted dump `--check-config` prints. Watching the file for live reloads
//! is not here (see `config_watch`).
//!
//! The YAML is read through a small path-tracking walker (`walker`) instead of
//! `serde(deny_unknown_fields)` because serde stops at the first problem; users fixing a config
//! want the whole list, each with its key path and the bad value. `sections` holds one parse
//! function per section, `duration` and `size` the duration and size syntax.

mod duration;
mod sections;
mod size;
mod walker;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};
use yaml_serde::Value;

use crate::market::Market;

pub use duration::{format_duration, parse_duration, MAX_DURATION};
pub use sections::{is_bare_host, is_identifier, validate_cron, validate_listen};
pub use size::{format_size, parse_size};

/// Env var that names the config file (the systemd unit sets it).
pub const ENV_CONFIG_PATH: &str = "QS_CONFIG_PATH";
/// Env var that overrides `app.clickhouse.password`.
pub const ENV_CLICKHOUSE_PASSWORD: &str = "QS_CLICKHOUSE_PASSWORD";
/// Where the config is looked for when neither `--config` nor `QS_CONFIG_PATH` is given.
pub const DEFAULT_PATHS: [&str; 2] = ["./config/app.yaml", "/opt/quantservice/config/app.yaml"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no config file given and none found (tried {tried}); pass --config PATH or set {ENV_CONFIG_PATH}")]
    NotFound { tried: String },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl ConfigError {
    /// Every problem as its own line (one for I/O and YAML errors).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems, .. } => problems.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// A secret string (password, API key). Never printed: `Debug`, `Display` and `Serialize` show
/// `***` when it is set and `""` when it is empty.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The real value, for the one place that must send it (an auth header).
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            "***"
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.shown())
    }
}

/// The whole effective configuration (the `app:` section).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub environment: String,
    pub clickhouse: ClickHouseConfig,
    pub binance: BinanceConfig,
    pub logging: LoggingConfig,
    pub writer: WriterConfig,
    pub backfill: BackfillConfig,
    pub operator: OperatorConfig,
    pub streams: StreamsConfig,
    pub gap_scan: GapScanConfig,
    pub proxy: ProxyConfig,
    pub maintenance: MaintenanceConfig,
    pub http: HttpConfig,
    pub indicators: IndicatorsConfig,
    pub clientserver: ClientServerConfig,
}

/// Env var with more client server tokens, comma-separated (added to
/// `app.clientserver.tokens`).
pub const ENV_CLIENTSERVER_TOKENS: &str = "QS_CLIENTSERVER_TOKENS";

/// `app.clientserver`: the embedded client server (WebSocket push at `/ws` and the
/// Binance-compatible REST facade), and the limits the standalone `clientserver` command uses
/// too.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientServerConfig {
    /// Run it inside the daemon.
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Accepted bearer tokens (and those of `$QS_CLIENTSERVER_TOKENS`); none = open.
    pub tokens: Vec<Secret>,
    pub max_connections: u64,
    pub max_connections_per_ip: u64,
    pub max_subscriptions: u64,
    pub max_messages_per_second: u64,
    /// Largest client frame accepted, in bytes.
    #[serde(serialize_with = "size::ser_size")]
    pub max_frame_bytes: u64,
    /// Frames queued for one connection before it is closed as a slow consumer.
    pub send_queue: u64,
    #[serde(serialize_with = "duration::ser_duration")]
    pub ping_interval: Duration,
    #[serde(serialize_with = "duration::ser_duration")]
    pub idle_timeout: Duration,
    /// The standalone server's poll of ClickHouse for new rows.
    #[serde(serialize_with = "duration::ser_duration")]
    pub follow_interval: Duration,
}

impl Default for ClientServerConfig {
    fn default() -> Self {
        ClientServerConfig {
            enabled: false,
            host: "127.0.0.1".to_string(),
            port: 8765,
            tokens: Vec::new(),
            max_connections: 20_000,
            max_connections_per_ip: 1_000,
            max_subscriptions: 200,
            max_messages_per_second: 50,
            max_frame_bytes: 64 * 1024,
            send_queue: 1024,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            follow_interval: Duration::from_millis(500),
        }
    }
}

impl ClientServerConfig {
    /// `host:port`, bracketed for IPv6.
    pub fn listen(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether `host` is a loopback address (an open server there is only reachable locally).
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// `app.indicators`: the indicators of pairs that declare none in `trading_pairs.indicators`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IndicatorsConfig {
    /// Normalised specs (`rsi(14)`, `macd(12,26,9)`), validated, without duplicates.
    pub default: Vec<String>,
}

/// `app.maintenance`: the scheduled `OPTIMIZE` of the partitions that received late or
/// replaced rows (see `tasks::maintenance`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MaintenanceConfig {
    /// When the scheduled run starts: cron with seconds, UTC; empty disables it.
    pub optimize: String,
    /// The scheduled run uses `OPTIMIZE … FINAL` (every duplicate removed, one part per
    /// partition) rather than a plain `OPTIMIZE` (merges the parts).
    #[serde(rename = "final")]
    pub use_final: bool,
    /// How long one partition's `OPTIMIZE` may take before it is given up (it stays dirty).
    #[serde(serialize_with = "duration::ser_duration")]
    pub timeout: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            optimize: "0 30 3 * * *".to_string(),
            use_final: true,
            timeout: Duration::from_secs(3600),
        }
    }
}

/// `app.http`: the ops endpoint (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpConfig {
    /// `HOST:PORT` to listen on (validated); empty disables the endpoint.
    pub listen: String,
}

/// Where the ops endpoint listens unless `app.http.listen` says otherwise.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9108";

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_HTTP_LISTEN.to_string(),
        }
    }
}

/// `app.proxy`: the SOCKS5 pool declared in `proxy_config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyConfig {
    pub mode: ProxyMode,
    /// In `auto` mode, fall back to the direct connection when no proxy is usable.
    pub allow_direct: bool,
    /// Open WebSocket streams through the pool too (REST always uses it).
    pub websocket: bool,
    /// How often each proxy is checked (SOCKS5 connect plus Binance `time`).
    #[serde(serialize_with = "duration::ser_duration")]
    pub health_interval: Duration,
    /// How long a request waits for a usable egress before it fails.
    #[serde(serialize_with = "duration::ser_duration")]
    pub max_wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// The pool when it has usable members; direct only as a fallback (`allow_direct`).
    Auto,
    /// Only the pool; never direct.
    Always,
    /// Never the pool.
    Never,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            mode: ProxyMode::Auto,
            allow_direct: true,
            websocket: false,
            health_interval: Duration::from_secs(30),
            max_wait: Duration::from_secs(60),
        }
    }
}

/// `app.operator`: the reconcile loop and the task supervisor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperatorConfig {
    /// How often `trading_pairs` and `proxy_config` are read.
    #[serde(serialize_with = "duration::ser_duration")]
    pub poll_interval: Duration,
    /// How long a stopping task may take after cancellation before it is aborted.
    #[serde(serialize_with = "duration::ser_duration")]
    pub stop_timeout: Duration,
    /// First restart delay of a failed task (jittered, doubling per failure).
    #[serde(serialize_with = "duration::ser_duration")]
    pub restart_backoff: Duration,
    /// Upper bound of the restart delay.
    #[serde(serialize_with = "duration::ser_duration")]
    pub max_restart_backoff: Duration,
    /// A task that ran this long without failing has its backoff reset.
    #[serde(serialize_with = "duration::ser_duration")]
    pub healthy_after: Duration,
    /// How often the `Metrics:` log line is written.
    #[serde(serialize_with = "duration::ser_duration")]
    pub metrics_interval: Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            poll_interval: Duration::from_secs(5),
            stop_timeout: Duration::from_secs(5),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(300),
            healthy_after: Duration::from_secs(60),
            metrics_interval: Duration::from_secs(60),
        }
    }
}

/// `app.streams`: live WebSocket kline streams.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamsConfig {
    /// A socket that delivers no data frame for this long is dead (pings and pongs do not
    /// count) and is replaced.
    #[serde(serialize_with = "duration::ser_duration")]
    pub idle_timeout: Duration,
    /// Connections are replaced make-before-break after this long (Binance cuts at 24 h).
    #[serde(serialize_with = "duration::ser_duration")]
    pub max_lifetime: Duration,
    /// A closed candle not received this long after its close time is fetched by REST.
    #[serde(serialize_with = "duration::ser_duration")]
    pub late_grace: Duration,
    /// First reconnect delay (jittered, doubling per failed attempt).
    #[serde(serialize_with = "duration::ser_duration")]
    pub reconnect_backoff: Duration,
    /// Upper bound of the reconnect delay.
    #[serde(serialize_with = "duration::ser_duration")]
    pub max_reconnect_backoff: Duration,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            idle_timeout: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(23 * 3600),
            late_grace: Duration::from_secs(5),
            reconnect_backoff: Duration::from_secs(1),
            max_reconnect_backoff: Duration::from_secs(60),
        }
    }
}

/// `app.gap_scan`: scheduled scans of ClickHouse for missing candles.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GapScanConfig {
    /// A candle missing this long after its close is a gap to heal (younger ones are the live
    /// stream's business).
    #[serde(serialize_with = "duration::ser_duration")]
    pub grace: Duration,
    /// Cron expressions (with seconds) per period; periods not listed use [`default_scan_cron`].
    pub schedules: std::collections::BTreeMap<String, String>,
}

impl Default for GapScanConfig {
    fn default() -> Self {
        GapScanConfig {
            grace: Duration::from_secs(60),
            schedules: std::collections::BTreeMap::new(),
        }
    }
}

impl GapScanConfig {
    /// The cron expression that schedules scans of `period`.
    pub fn cron_for(&self, period: crate::market::Period) -> String {
        self.schedules
            .get(period.as_str())
            .cloned()
            .unwrap_or_else(|| default_scan_cron(period).to_string())
    }
}

/// Default gap-scan schedules (cron with seconds): 1m every 30 s and 1h every 5 min, as users
/// run today; shorter periods more often, longer ones less often.
pub fn default_scan_cron(period: crate::market::Period) -> &'static str {
    use crate::market::Period as P;
    match period {
        P::S1 => "*/10 * * * * *",
        P::M1 => "*/30 * * * * *",
        P::M3 | P::M5 => "0 * * * * *",
        P::M15 | P::M30 => "0 */2 * * * *",
        P::H1 | P::H2 | P::H4 => "0 */5 * * * *",
        P::H6 | P::H8 | P::H12 | P::D1 => "0 */15 * * * *",
        P::D3 | P::W1 | P::Mo1 => "0 0 * * * *",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClickHouseConfig {
    pub host: String,
    pub port: u16,
    /// `true` to talk HTTPS to ClickHouse.
    pub secure: bool,
    pub database: String,
    pub username: String,
    pub password: Secret,
    #[serde(serialize_with = "duration::ser_duration")]
    pub timeout: Duration,
}

impl ClickHouseConfig {
    pub fn url(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        if self.host.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BinanceConfig {
    pub spot: MarketEndpoints,
    pub um: MarketEndpoints,
    pub cm: MarketEndpoints,
    /// Base of the bulk archives (data.binance.vision layout).
    pub archive_url: String,
}

impl BinanceConfig {
    pub fn market(&self, market: Market) -> &MarketEndpoints {
        match market {
            Market::Spot => &self.spot,
            Market::Um => &self.um,
            Market::Cm => &self.cm,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarketEndpoints {
    pub ws_url: String,
    /// The klines endpoint; `exchangeInfo`, `time` and `ping` are derived from it.
    pub rest_url: String,
    /// Overrides the REQUEST_WEIGHT budget per window read from `exchangeInfo`.
    pub weight_limit: Option<u32>,
}

impl MarketEndpoints {
    /// The REST base: `rest_url` without its final `/klines`.
    pub fn rest_base(&self) -> &str {
        self.rest_url
            .trim_end_matches('/')
            .strip_suffix("/klines")
            .unwrap_or(&self.rest_url)
    }
}

/// `app.backfill`: historical backfill (REST and bulk archives).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackfillConfig {
    /// `auto` (archives where they exist, REST for the rest), `archive` or `rest`.
    pub source: BackfillSource,
    /// Fraction of each REQUEST_WEIGHT budget we allow ourselves to use.
    pub weight_budget_ratio: f64,
    /// Concurrent REST requests per backfill (all within the shared weight budget).
    pub concurrency: usize,
    /// Attempts per REST request on 5xx, timeouts and network errors.
    pub max_retries: u32,
    /// Timeout of one REST or archive request.
    #[serde(serialize_with = "duration::ser_duration")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackfillSource {
    Auto,
    Archive,
    Rest,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            source: BackfillSource::Auto,
            weight_budget_ratio: 0.9,
            concurrency: 4,
            max_retries: 5,
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggingConfig {
    /// A level (`info`) or a tracing filter directive (`info,quantservice::store=debug`).
    pub level: String,
    /// Where `quantservice.log` is written and rotated into `archived/`; stdout (the journal)
    /// gets every line in any case. Absent from `app.yaml`: the install layout's `logs/`
    /// ([`install_logs_dir`]), else `None`; `""`: `None`.
    pub dir: Option<PathBuf>,
    /// `quantservice.log` is rotated before a line would make it larger than this (bytes).
    #[serde(serialize_with = "size::ser_size")]
    pub max_size: u64,
    /// Archives whose day is more than this many days before today (UTC) are deleted.
    pub keep_days: u32,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_string(),
            dir: None,
            max_size: 100 * size::MB,
            keep_days: 7,
        }
    }
}

/// The default log directory of an installed binary: `PREFIX/logs` when the executable sits
/// in a directory named `bin` (`PREFIX/bin/quantservice`, as `deploy/install.sh` lays it out)
/// and `PREFIX/logs` is an existing directory; `None` otherwise (a cargo build, `~/.cargo/bin`,
/// `/usr/bin` without `/usr/logs`), so that nothing writes files where nobody asked.
pub fn install_logs_dir(exe: &Path) -> Option<PathBuf> {
    let bin = exe.parent()?;
    if bin.file_name()? != "bin" {
        return None;
    }
    let logs = bin.parent()?.join("logs");
    logs.is_dir().then_some(logs)
}

/// [`install_logs_dir`] of the running executable (symlinks resolved, as the kernel reports it).
fn install_logs_dir_of_current_exe() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| install_logs_dir(&exe))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriterConfig {
    /// Flush when this many rows are buffered.
    pub batch_rows: usize,
    /// Flush at least this often when rows are buffered.
    #[serde(serialize_with = "duration::ser_duration")]
    pub flush_interval: Duration,
    /// Rows the channel holds before senders wait (back-pressure).
    pub channel_capacity: usize,
    /// Upper bound of the jittered retry backoff while ClickHouse fails.
    #[serde(serialize_with = "duration::ser_duration")]
    pub max_backoff: Duration,
    /// How long shutdown keeps retrying the final flush before giving up loudly.
    #[serde(serialize_with = "duration::ser_duration")]
    pub shutdown_timeout: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            batch_rows: 100_000,
            flush_interval: Duration::from_secs(1),
            channel_capacity: 100_000,
            max_backoff: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Finds the config file: `--config`, else `QS_CONFIG_PATH`, else the default paths.
    pub fn resolve_path(
        cli: Option<&Path>,
        env_path: Option<String>,
    ) -> Result<PathBuf, ConfigError> {
        if let Some(p) = cli {
            return Ok(p.to_path_buf());
        }
        if let Some(p) = env_path.filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        DEFAULT_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| ConfigError::NotFound {
                tried: DEFAULT_PATHS.join(", "),
            })
    }

    /// Reads, parses and validates `path`, then applies env overrides (`QS_*`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml_with_env(&text, path, |k| std::env::var(k).ok())
    }

    /// Parses and validates YAML text; `env` looks up override variables (injected for tests).
    pub fn from_yaml_with_env(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let root: Value = match yaml_serde::from_str(text) {
            Ok(root) => root,
            Err(e) => {
                // The parser reports a duplicate key at its mapping's first line, and blanks
                // the key's name with the values: name it and its lines ourselves.
                let duplicates = walker::duplicate_keys(text);
                if !duplicates.is_empty() {
                    return Err(ConfigError::Invalid {
                        path: path.to_path_buf(),
                        problems: duplicates,
                    });
                }
                return Err(ConfigError::Yaml {
                    path: path.to_path_buf(),
                    message: walker::hide_quoted(&e.to_string()),
                });
            }
        };
        let mut errs = Vec::new();
        let cfg = sections::parse_root(&root, &mut errs);
        let mut cfg = match cfg {
            Some(cfg) if errs.is_empty() => cfg,
            _ => {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    problems: errs,
                })
            }
        };
        if let Some(pw) = env(ENV_CLICKHOUSE_PASSWORD) {
            cfg.clickhouse.password = Secret::new(pw);
        }
        if let Some(tokens) = env(ENV_CLIENTSERVER_TOKENS) {
            for t in tokens.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if !cfg.clientserver.tokens.iter().any(|s| s.expose() == t) {
                    cfg.clientserver.tokens.push(Secret::new(t));
                }
            }
        }
        Ok(cfg)
    }

    /// The effective config as YAML with every secret shown as `***`.
    pub fn redacted_yaml(&self) -> String {
        #[derive(Serialize)]
        struct Root<'a> {
            app: &'a Config,
        }
        yaml_serde::to_string(&Root { app: self })
            .unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The top-level sections (`environment`, `clickhouse`, ..., `proxy`) in which `other`
    /// differs from this config, in file order.
    pub fn changed_sections(&self, other: &Config) -> Vec<&'static str> {
        // Destructured, so that a new section cannot be forgotten here.
        let Config {
            environment,
            clickhouse,
            binance,
            logging,
            writer,
            backfill,
            operator,
            streams,
            gap_scan,
            proxy,
            maintenance,
            http,
            indicators,
            clientserver,
        } = self;
        let differs = [
            ("environment", *environment != other.environment),
            ("clickhouse", *clickhouse != other.clickhouse),
            ("binance", *binance != other.binance),
            ("backfill", *backfill != other.backfill),
            ("logging", *logging != other.logging),
            ("writer", *writer != other.writer),
            ("operator", *operator != other.operator),
            ("streams", *streams != other.streams),
            ("gap_scan", *gap_scan != other.gap_scan),
            ("proxy", *proxy != other.proxy),
            ("maintenance", *maintenance != other.maintenance),
            ("http", *http != other.http),
            ("indicators", *indicators != other.indicators),
            ("clientserver", *clientserver != other.clientserver),
        ];
        differs
            .into_iter()
            .filter_map(|(name, d)| d.then_some(name))
            .collect()
    }

    /// The secrets in this config, for scrubbing them out of error text and logs. Secrets
    /// shorter than 4 characters are left out: replacing every `8` or `ab` in a log line would
    /// garble it and point at the secret instead of hiding it.
    pub fn secrets(&self) -> Vec<String> {
        std::iter::once(&self.clickhouse.password)
            .chain(&self.clientserver.tokens)
            .filter(|s| s.expose().chars().count() >= 4)
            .map(|s| s.expose().to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_layout_gives_the_default_log_dir() {
        let root = tempfile::tempdir().unwrap();
        let prefix = root.path().join("opt/quantservice");
        std::fs::create_dir_all(prefix.join("bin")).unwrap();
        let exe = prefix.join("bin/quantservice");
        std::fs::write(&exe, "").unwrap();
        // No logs/ yet: not an install layout.
        assert_eq!(install_logs_dir(&exe), None);
        std::fs::create_dir(prefix.join("logs")).unwrap();
        assert_eq!(install_logs_dir(&exe), Some(prefix.join("logs")));
        // A binary elsewhere (cargo's target/debug) has no default, even next to a logs/.
        std::fs::create_dir_all(root.path().join("target/debug")).unwrap();
        std::fs::create_dir_all(root.path().join("target/logs")).unwrap();
        assert_eq!(
            install_logs_dir(&root.path().join("target/debug/quantservice")),
            None
        );
        assert_eq!(install_logs_dir(Path::new("quantservice")), None);
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** \"***\"");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(Secret::default().to_string(), "");
    }
}
