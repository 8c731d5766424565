//! `app.yaml`: loading, defaults, env overrides for secrets, validation that reports every
//! problem at once, and the redacted dump `--check-config` prints. Watching the file for live
//! reloads is not here (that belongs to the operator).
//!
//! The YAML is read through a small path-tracking walker instead of `serde(deny_unknown_fields)`
//! because serde stops at the first problem; users fixing a config want the whole list, each
//! with its key path and the bad value.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};
use yaml_serde::{Mapping, Value};

use crate::market::Market;

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
    #[serde(serialize_with = "ser_duration")]
    pub health_interval: Duration,
    /// How long a request waits for a usable egress before it fails.
    #[serde(serialize_with = "ser_duration")]
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
    #[serde(serialize_with = "ser_duration")]
    pub poll_interval: Duration,
    /// How long a stopping task may take after cancellation before it is aborted.
    #[serde(serialize_with = "ser_duration")]
    pub stop_timeout: Duration,
    /// First restart delay of a failed task (jittered, doubling per failure).
    #[serde(serialize_with = "ser_duration")]
    pub restart_backoff: Duration,
    /// Upper bound of the restart delay.
    #[serde(serialize_with = "ser_duration")]
    pub max_restart_backoff: Duration,
    /// A task that ran this long without failing has its backoff reset.
    #[serde(serialize_with = "ser_duration")]
    pub healthy_after: Duration,
    /// How often the `Metrics:` log line is written.
    #[serde(serialize_with = "ser_duration")]
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
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Connections are replaced make-before-break after this long (Binance cuts at 24 h).
    #[serde(serialize_with = "ser_duration")]
    pub max_lifetime: Duration,
    /// A closed candle not received this long after its close time is fetched by REST.
    #[serde(serialize_with = "ser_duration")]
    pub late_grace: Duration,
    /// First reconnect delay (jittered, doubling per failed attempt).
    #[serde(serialize_with = "ser_duration")]
    pub reconnect_backoff: Duration,
    /// Upper bound of the reconnect delay.
    #[serde(serialize_with = "ser_duration")]
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
    #[serde(serialize_with = "ser_duration")]
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
    #[serde(serialize_with = "ser_duration")]
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
    #[serde(serialize_with = "ser_duration")]
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
    /// When set, logs also go to daily-rotated files in this directory.
    pub dir: Option<PathBuf>,
    /// How many daily files to keep.
    pub keep_days: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WriterConfig {
    /// Flush when this many rows are buffered.
    pub batch_rows: usize,
    /// Flush at least this often when rows are buffered.
    #[serde(serialize_with = "ser_duration")]
    pub flush_interval: Duration,
    /// Rows the channel holds before senders wait (back-pressure).
    pub channel_capacity: usize,
    /// Upper bound of the jittered retry backoff while ClickHouse fails.
    #[serde(serialize_with = "ser_duration")]
    pub max_backoff: Duration,
    /// How long shutdown keeps retrying the final flush before giving up loudly.
    #[serde(serialize_with = "ser_duration")]
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

const DEFAULT_ENDPOINTS: [(&str, &str); 3] = [
    (
        "wss://stream.binance.com:9443/ws/",
        "https://data-api.binance.vision/api/v3/klines",
    ),
    (
        "wss://fstream.binance.com/ws/",
        "https://fapi.binance.com/fapi/v1/klines",
    ),
    (
        "wss://dstream.binance.com/ws/",
        "https://dapi.binance.com/dapi/v1/klines",
    ),
];

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
        let root: Value = yaml_serde::from_str(text).map_err(|e| ConfigError::Yaml {
            path: path.to_path_buf(),
            message: hide_quoted(&e.to_string()),
        })?;
        let mut errs = Vec::new();
        let cfg = parse_root(&root, &mut errs);
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

    /// The secrets in this config, for scrubbing them out of error text and logs. Secrets
    /// shorter than 4 characters are left out: replacing every `8` or `ab` in a log line would
    /// garble it and point at the secret instead of hiding it.
    pub fn secrets(&self) -> Vec<String> {
        [&self.clickhouse.password]
            .into_iter()
            .filter(|s| s.expose().chars().count() >= 4)
            .map(|s| s.expose().to_string())
            .collect()
    }
}

fn parse_root(root: &Value, errs: &mut Vec<String>) -> Option<Config> {
    let Some(map) = root.as_mapping() else {
        errs.push(format!(
            "top level: expected a mapping with an `app:` section, got {}",
            show(root)
        ));
        return None;
    };
    let mut top = Section::new(String::new(), Some(map));
    let mut app = top.child("app", errs);
    top.finish(errs);

    let environment = app.string("environment", "prod", errs);
    if !environment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        || environment.is_empty()
    {
        errs.push(format!(
            "app.environment: must be a word like prod, staging or dev, got {environment:?}"
        ));
    }

    let mut ch = app.child("clickhouse", errs);
    let host = ch.string("host", "localhost", errs);
    if !is_bare_host(&host) {
        errs.push(format!(
            "app.clickhouse.host: must be a bare host name or IP address (no scheme, port, user or path; set `secure: true` for https), got {host:?}"
        ));
    }
    let port = ch.port("port", 8123, errs);
    let secure = ch.boolean("secure", false, errs);
    let database = ch.string("database", "maxaira", errs);
    if !is_identifier(&database) {
        errs.push(format!(
            "app.clickhouse.database: must match [A-Za-z_][A-Za-z0-9_]* (max 64), got {database:?}"
        ));
    }
    let username = ch.string("username", "default", errs);
    if username.is_empty() {
        errs.push("app.clickhouse.username: must not be empty".to_string());
    }
    let password = ch.secret("password", errs);
    let timeout = ch.duration_in("timeout", Duration::from_secs(30), MIN_TIMEOUT, errs);
    ch.finish(errs);

    let mut bn = app.child("binance", errs);
    let mut endpoints = Vec::new();
    for (market, (ws_default, rest_default)) in Market::ALL.into_iter().zip(DEFAULT_ENDPOINTS) {
        let mut m = bn.child(market.as_str(), errs);
        let ws_url = m.url("ws_url", ws_default, &["ws", "wss"], errs);
        let rest_url = m.url("rest_url", rest_default, &["http", "https"], errs);
        if !rest_url.trim_end_matches('/').ends_with("/klines") {
            errs.push(format!(
                "app.binance.{market}.rest_url: must be the klines endpoint ending in /klines (exchangeInfo, time and ping are derived from it), got {rest_url:?}"
            ));
        }
        let weight_limit = m
            .opt_int("weight_limit", 1..=1_000_000, errs)
            .and_then(|n| u32::try_from(n).ok());
        m.finish(errs);
        endpoints.push(MarketEndpoints {
            ws_url,
            rest_url,
            weight_limit,
        });
    }
    let archive_url = bn.url(
        "archive_url",
        "https://data.binance.vision",
        &["http", "https"],
        errs,
    );
    bn.finish(errs);
    let [spot, um, cm]: [MarketEndpoints; 3] = endpoints.try_into().ok()?;

    let bdef = BackfillConfig::default();
    let mut bf = app.child("backfill", errs);
    let source = match bf.string("source", "auto", errs).as_str() {
        "auto" => BackfillSource::Auto,
        "archive" => BackfillSource::Archive,
        "rest" => BackfillSource::Rest,
        other => {
            errs.push(format!(
                "app.backfill.source: must be auto, archive or rest, got {other:?}"
            ));
            bdef.source
        }
    };
    let weight_budget_ratio = bf.ratio("weight_budget_ratio", bdef.weight_budget_ratio, errs);
    let backfill = BackfillConfig {
        source,
        weight_budget_ratio,
        concurrency: bf.int("concurrency", bdef.concurrency as i64, 1..=64, errs) as usize,
        max_retries: bf.int("max_retries", i64::from(bdef.max_retries), 1..=100, errs) as u32,
        request_timeout: bf.duration_in("request_timeout", bdef.request_timeout, MIN_TIMEOUT, errs),
    };
    bf.finish(errs);

    let mut lg = app.child("logging", errs);
    let level = lg.string("level", "info", errs);
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() || level.trim().is_empty() {
        errs.push(format!(
            "app.logging.level: must be trace, debug, info, warn, error or a tracing filter directive, got {level:?}"
        ));
    }
    let dir = lg.opt_string("dir", errs).map(PathBuf::from);
    let keep_days = lg.int("keep_days", 7, 1..=3650, errs) as u32;
    lg.finish(errs);

    let defaults = WriterConfig::default();
    let mut wr = app.child("writer", errs);
    let writer = WriterConfig {
        batch_rows: wr.int(
            "batch_rows",
            defaults.batch_rows as i64,
            1..=1_000_000,
            errs,
        ) as usize,
        flush_interval: wr.duration_in(
            "flush_interval",
            defaults.flush_interval,
            MIN_TIMEOUT,
            errs,
        ),
        channel_capacity: wr.int(
            "channel_capacity",
            defaults.channel_capacity as i64,
            1..=10_000_000,
            errs,
        ) as usize,
        max_backoff: wr.duration_in("max_backoff", defaults.max_backoff, MIN_TIMEOUT, errs),
        shutdown_timeout: wr.duration("shutdown_timeout", defaults.shutdown_timeout, errs),
    };
    wr.finish(errs);

    let od = OperatorConfig::default();
    let mut op = app.child("operator", errs);
    let operator = OperatorConfig {
        poll_interval: op.duration_in("poll_interval", od.poll_interval, MIN_TIMEOUT, errs),
        stop_timeout: op.duration_in("stop_timeout", od.stop_timeout, MIN_TIMEOUT, errs),
        restart_backoff: op.duration_in("restart_backoff", od.restart_backoff, MIN_TIMEOUT, errs),
        max_restart_backoff: op.duration_in(
            "max_restart_backoff",
            od.max_restart_backoff,
            MIN_TIMEOUT,
            errs,
        ),
        healthy_after: op.duration_in("healthy_after", od.healthy_after, MIN_TIMEOUT, errs),
        metrics_interval: op.duration_in(
            "metrics_interval",
            od.metrics_interval,
            MIN_TIMEOUT,
            errs,
        ),
    };
    op.finish(errs);

    let sd = StreamsConfig::default();
    let mut st = app.child("streams", errs);
    let streams = StreamsConfig {
        idle_timeout: st.duration_in("idle_timeout", sd.idle_timeout, MIN_TIMEOUT, errs),
        max_lifetime: st.duration_in(
            "max_lifetime",
            sd.max_lifetime,
            Duration::from_secs(1),
            errs,
        ),
        late_grace: st.duration("late_grace", sd.late_grace, errs),
        reconnect_backoff: st.duration_in(
            "reconnect_backoff",
            sd.reconnect_backoff,
            MIN_TIMEOUT,
            errs,
        ),
        max_reconnect_backoff: st.duration_in(
            "max_reconnect_backoff",
            sd.max_reconnect_backoff,
            MIN_TIMEOUT,
            errs,
        ),
    };
    st.finish(errs);

    let gd = GapScanConfig::default();
    let mut gs = app.child("gap_scan", errs);
    let grace = gs.duration("grace", gd.grace, errs);
    let mut schedules = std::collections::BTreeMap::new();
    if let Some(v) = gs.get("schedules") {
        match v.as_mapping() {
            Some(m) => {
                for (k, v) in m {
                    let key = k.as_str().map_or_else(|| show(k), str::to_string);
                    let path = format!("app.gap_scan.schedules.{key}");
                    if !crate::market::Period::ALL.iter().any(|p| p.as_str() == key) {
                        errs.push(format!("{path}: unknown period (expected one of 1s, 1m, 3m, 5m, 15m, 30m, 1h, 2h, 4h, 6h, 8h, 12h, 1d, 3d, 1w, 1M)"));
                        continue;
                    }
                    match v.as_str() {
                        Some(expr) => match validate_cron(expr) {
                            Ok(()) => {
                                schedules.insert(key, expr.to_string());
                            }
                            Err(why) => errs.push(format!("{path}: {why}, got {expr:?}")),
                        },
                        None => errs.push(format!(
                            "{path}: expected a cron expression with seconds like \"*/30 * * * * *\", got {}",
                            show(v)
                        )),
                    }
                }
            }
            None => errs.push(format!(
                "app.gap_scan.schedules: expected a mapping of period to cron expression, got {}",
                show(v)
            )),
        }
    }
    gs.finish(errs);
    let gap_scan = GapScanConfig { grace, schedules };

    let pd = ProxyConfig::default();
    let mut px = app.child("proxy", errs);
    let mode = match px.string("mode", "auto", errs).as_str() {
        "auto" => ProxyMode::Auto,
        "always" => ProxyMode::Always,
        "never" => ProxyMode::Never,
        other => {
            errs.push(format!(
                "app.proxy.mode: must be auto, always or never, got {other:?}"
            ));
            pd.mode
        }
    };
    let proxy = ProxyConfig {
        mode,
        allow_direct: px.boolean("allow_direct", pd.allow_direct, errs),
        websocket: px.boolean("websocket", pd.websocket, errs),
        health_interval: px.duration_in(
            "health_interval",
            pd.health_interval,
            Duration::from_millis(100),
            errs,
        ),
        max_wait: px.duration("max_wait", pd.max_wait, errs),
    };
    px.finish(errs);

    app.finish(errs);

    Some(Config {
        environment,
        clickhouse: ClickHouseConfig {
            host,
            port,
            secure,
            database,
            username,
            password,
            timeout,
        },
        binance: BinanceConfig {
            spot,
            um,
            cm,
            archive_url,
        },
        logging: LoggingConfig {
            level,
            dir,
            keep_days,
        },
        writer,
        backfill,
        operator,
        streams,
        gap_scan,
        proxy,
    })
}

/// Checks a six-field cron expression (seconds first), as the gap-scan scheduler reads it.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    if expr.split_whitespace().count() != 6 {
        return Err(
            "expected six fields, seconds first (sec min hour day month weekday)".to_string(),
        );
    }
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| format!("not a valid cron expression ({e})"))
}

/// Durations above this are refused (they would overflow deadlines and mean nothing useful).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);
/// Timeouts and intervals below this are refused (0 would fail or spin).
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// A host name or IP address with nothing else (no scheme, credentials, port or path), so
/// that no credential can hide in it and end up in a printed URL.
pub fn is_bare_host(host: &str) -> bool {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && !host.contains(['@', ':', '/', '?', '#', ' ', '[', ']'])
        && url::Host::parse(host).is_ok()
}

/// Replaces every `quoted` or "quoted" span of a parser message with `…`: the YAML parser
/// echoes values, and the value may be a password (secrets are not known before parsing).
fn hide_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut open: Option<char> = None;
    for c in msg.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some(c);
                }
            }
        }
    }
    out
}

/// A ClickHouse identifier we may interpolate into DDL (database names cannot be bound).
pub fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= 64
}

/// One mapping in the YAML tree, with the keys read so far (the rest are unknown keys).
struct Section<'v> {
    path: String,
    map: Option<&'v Mapping>,
    read: BTreeSet<&'static str>,
}

impl<'v> Section<'v> {
    fn new(path: String, map: Option<&'v Mapping>) -> Self {
        Section {
            path,
            map,
            read: BTreeSet::new(),
        }
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value at `key`; `None` when absent or null (null means "use the default").
    fn get(&mut self, key: &'static str) -> Option<&'v Value> {
        self.read.insert(key);
        self.map?.get(key).filter(|v| !v.is_null())
    }

    fn child(&mut self, key: &'static str, errs: &mut Vec<String>) -> Section<'v> {
        let path = self.key_path(key);
        match self.get(key) {
            None => Section::new(path, None),
            Some(Value::Mapping(m)) => Section::new(path, Some(m)),
            Some(other) => {
                errs.push(format!("{path}: expected a mapping, got {}", show(other)));
                Section::new(path, None)
            }
        }
    }

    fn string(&mut self, key: &'static str, default: &str, errs: &mut Vec<String>) -> String {
        self.opt_string(key, errs)
            .unwrap_or_else(|| default.to_string())
    }

    /// A string value. Numbers are refused rather than converted (YAML would turn `1e3` into
    /// `1000.0` or `0x1F` into `31`): the user is told to quote it.
    fn opt_string(&mut self, key: &'static str, errs: &mut Vec<String>) -> Option<String> {
        let path = self.key_path(key);
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                errs.push(format!(
                    "{path}: expected a string (quote it), got {}",
                    show(other)
                ));
                None
            }
        }
    }

    /// A secret string: like `opt_string`, but no error ever shows the value.
    fn secret(&mut self, key: &'static str, errs: &mut Vec<String>) -> Secret {
        let path = self.key_path(key);
        match self.get(key) {
            None => Secret::default(),
            Some(Value::String(s)) => Secret::new(s.clone()),
            Some(_) => {
                errs.push(format!(
                    "{path}: expected a quoted string (value not shown: it is a secret)"
                ));
                Secret::default()
            }
        }
    }

    fn boolean(&mut self, key: &'static str, default: bool, errs: &mut Vec<String>) -> bool {
        let path = self.key_path(key);
        match self.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                errs.push(format!(
                    "{path}: expected true or false, got {}",
                    show(other)
                ));
                default
            }
        }
    }

    fn int(
        &mut self,
        key: &'static str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
        errs: &mut Vec<String>,
    ) -> i64 {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_i64() {
            Some(n) if range.contains(&n) => n,
            Some(n) => {
                errs.push(format!(
                    "{path}: must be {}..{}, got {n}",
                    range.start(),
                    range.end()
                ));
                default
            }
            None => {
                errs.push(format!("{path}: expected an integer, got {}", show(v)));
                default
            }
        }
    }

    fn opt_int(
        &mut self,
        key: &'static str,
        range: std::ops::RangeInclusive<i64>,
        errs: &mut Vec<String>,
    ) -> Option<i64> {
        self.map?.get(key).filter(|v| !v.is_null())?;
        let n = self.int(key, *range.start(), range.clone(), errs);
        Some(n)
    }

    /// A number in (0, 1].
    fn ratio(&mut self, key: &'static str, default: f64, errs: &mut Vec<String>) -> f64 {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_f64() {
            Some(x) if x > 0.0 && x <= 1.0 => x,
            _ => {
                errs.push(format!(
                    "{path}: must be a number in (0, 1], got {}",
                    show(v)
                ));
                default
            }
        }
    }

    fn port(&mut self, key: &'static str, default: u16, errs: &mut Vec<String>) -> u16 {
        let n = self.int(key, i64::from(default), 1..=65535, errs);
        u16::try_from(n).unwrap_or(default)
    }

    /// A duration from 0 up to `MAX_DURATION`.
    fn duration(
        &mut self,
        key: &'static str,
        default: Duration,
        errs: &mut Vec<String>,
    ) -> Duration {
        self.duration_in(key, default, Duration::ZERO, errs)
    }

    /// A duration from `min` up to `MAX_DURATION`.
    fn duration_in(
        &mut self,
        key: &'static str,
        default: Duration,
        min: Duration,
        errs: &mut Vec<String>,
    ) -> Duration {
        let path = self.key_path(key);
        let Some(v) = self.get(key) else {
            return default;
        };
        match v.as_str().map(parse_duration) {
            Some(Ok(d)) if d >= min && d <= MAX_DURATION => d,
            Some(Ok(_)) => {
                errs.push(format!(
                    "{path}: must be {}..{}, got {}",
                    format_duration(min),
                    format_duration(MAX_DURATION),
                    show(v)
                ));
                default
            }
            Some(Err(why)) => {
                errs.push(format!("{path}: {why}, got {}", show(v)));
                default
            }
            None => {
                errs.push(format!(
                    "{path}: expected a duration like 500ms, 30s, 5m or 1h, got {}",
                    show(v)
                ));
                default
            }
        }
    }

    fn url(
        &mut self,
        key: &'static str,
        default: &str,
        schemes: &[&str],
        errs: &mut Vec<String>,
    ) -> String {
        let path = self.key_path(key);
        let s = self.string(key, default, errs);
        match url::Url::parse(&s) {
            Ok(u) if !u.username().is_empty() || u.password().is_some() => errs.push(format!(
                "{path}: credentials in URLs are not allowed (they would show in logs and errors)"
            )),
            Ok(u) if schemes.contains(&u.scheme()) && u.host_str().is_some() => {}
            Ok(u) => errs.push(format!(
                "{path}: must be a {} URL with a host, got {s:?} (scheme {})",
                schemes.join("/"),
                u.scheme()
            )),
            Err(e) => errs.push(format!("{path}: not a valid URL ({e}), got {s:?}")),
        }
        s
    }

    /// Reports every key in this mapping that no reader asked for.
    fn finish(self, errs: &mut Vec<String>) {
        let Some(map) = self.map else { return };
        for key in map.keys() {
            let known = key.as_str().is_some_and(|k| self.read.contains(k));
            if !known {
                let name = key.as_str().map_or_else(|| show(key), str::to_string);
                let expected: Vec<&str> = self.read.iter().copied().collect();
                errs.push(format!(
                    "{}: unknown key (expected one of: {})",
                    self.key_path(&name),
                    expected.join(", ")
                ));
            }
        }
    }
}

/// A short rendering of a YAML value for error messages.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d` and sums like `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("expected a duration like 500ms, 30s, 5m or 1h".to_string());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err("expected a duration like 500ms, 30s, 5m or 1h".to_string());
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| "duration number too large".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => {
                return Err(
                    "expected a unit ms, s, m, h or d after each number (e.g. 30s)".to_string(),
                )
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Renders a duration the way it is written in `app.yaml` (`1m30s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        for bad in ["", "30", "s", "5 minutes", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        for d in ["30s", "5m", "1h", "1m30s", "500ms", "2d"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn quoted_parts_of_parser_messages_are_hidden() {
        assert_eq!(
            hide_quoted("invalid value: string \"hunter2xyz\", expected i64 at line 3"),
            "invalid value: string \"…\", expected i64 at line 3"
        );
        assert_eq!(
            hide_quoted("invalid type: integer `123456`"),
            "invalid type: integer `…`"
        );
    }

    #[test]
    fn bare_hosts() {
        for ok in ["localhost", "127.0.0.1", "::1", "ch-1.example.com"] {
            assert!(is_bare_host(ok), "{ok}");
        }
        for bad in [
            "",
            "u:pw@host",
            "http://host",
            "host:8123",
            "host/x",
            "a b",
            "h?q",
            "[::1]",
        ] {
            assert!(!is_bare_host(bad), "{bad}");
        }
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("maxaira"));
        assert!(is_identifier("_qs_test_1"));
        for bad in ["", "1db", "a-b", "a;drop", "a b", "`x`"] {
            assert!(!is_identifier(bad), "{bad:?}");
        }
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** \"***\"");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(Secret::default().to_string(), "");
    }
}
