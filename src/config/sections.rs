//! One parse function per `app.yaml` section: each reads its keys through the walker, checks
//! the values that need more than a type (hosts, identifiers, URLs, cron expressions, enums)
//! and fills its config type with the defaults for what is absent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use yaml_serde::Value;

use super::duration::MIN_TIMEOUT;
use super::walker::{show, Section};
use super::{
    BackfillConfig, BackfillSource, BinanceConfig, ClickHouseConfig, ClientServerConfig, Config,
    GapScanConfig, HttpConfig, IndicatorsConfig, LoggingConfig, MaintenanceConfig, MarketEndpoints,
    OperatorConfig, ProxyConfig, ProxyMode, Secret, StreamsConfig, WriterConfig,
};
use crate::market::{Market, Period};

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

/// The whole file: the `app:` section and every section in it. `None` when the shape is so
/// wrong that no config can be built (`errs` says why).
pub(super) fn parse_root(root: &Value, errs: &mut Vec<String>) -> Option<Config> {
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

    let environment = environment(&mut app, errs);
    let clickhouse = clickhouse(app.child("clickhouse", errs), errs);
    let binance = binance(app.child("binance", errs), errs)?;
    let backfill = backfill(app.child("backfill", errs), errs);
    let logging = logging(app.child("logging", errs), errs);
    let writer = writer(app.child("writer", errs), errs);
    let operator = operator(app.child("operator", errs), errs);
    let streams = streams(app.child("streams", errs), errs);
    let gap_scan = gap_scan(app.child("gap_scan", errs), errs);
    let proxy = proxy(app.child("proxy", errs), errs);
    let maintenance = maintenance(app.child("maintenance", errs), errs);
    let http = http(app.child("http", errs), errs);
    let indicators = indicators(app.child("indicators", errs), errs);
    let clientserver = clientserver(app.child("clientserver", errs), errs);
    app.finish(errs);

    Some(Config {
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
    })
}

/// `app.environment`: a label for logs.
fn environment(app: &mut Section<'_>, errs: &mut Vec<String>) -> String {
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
    environment
}

/// `app.clickhouse`: where and as whom we talk to ClickHouse.
fn clickhouse(mut ch: Section<'_>, errs: &mut Vec<String>) -> ClickHouseConfig {
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
    ClickHouseConfig {
        host,
        port,
        secure,
        database,
        username,
        password,
        timeout,
    }
}

/// `app.binance`: the endpoints of each market and the archive base.
fn binance(mut bn: Section<'_>, errs: &mut Vec<String>) -> Option<BinanceConfig> {
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
    Some(BinanceConfig {
        spot,
        um,
        cm,
        archive_url,
    })
}

/// `app.backfill`: historical backfill.
fn backfill(mut bf: Section<'_>, errs: &mut Vec<String>) -> BackfillConfig {
    let bdef = BackfillConfig::default();
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
    backfill
}

/// `app.logging`: level filter, log files and their rotation.
fn logging(mut lg: Section<'_>, errs: &mut Vec<String>) -> LoggingConfig {
    let defaults = LoggingConfig::default();
    let level = lg.string("level", &defaults.level, errs);
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() || level.trim().is_empty() {
        errs.push(format!(
            "app.logging.level: must be trace, debug, info, warn, error or a tracing filter directive, got {level:?}"
        ));
    }
    // Absent: the install layout's `logs/` (if there is one); "": no files.
    let dir = match lg.get("dir") {
        None => super::install_logs_dir_of_current_exe(),
        Some(_) => lg
            .opt_string("dir", errs)
            .filter(|d| !d.trim().is_empty())
            .map(PathBuf::from),
    };
    let max_size = lg.size("max_size", defaults.max_size, errs);
    let keep_days = lg.int("keep_days", i64::from(defaults.keep_days), 1..=3650, errs) as u32;
    lg.finish(errs);
    LoggingConfig {
        level,
        dir,
        max_size,
        keep_days,
    }
}

/// `app.writer`: the batched ClickHouse writer.
fn writer(mut wr: Section<'_>, errs: &mut Vec<String>) -> WriterConfig {
    let defaults = WriterConfig::default();
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
    writer
}

/// `app.operator`: the reconcile loop and the supervisor.
fn operator(mut op: Section<'_>, errs: &mut Vec<String>) -> OperatorConfig {
    let od = OperatorConfig::default();
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
    operator
}

/// `app.streams`: the live WebSocket streams.
fn streams(mut st: Section<'_>, errs: &mut Vec<String>) -> StreamsConfig {
    let sd = StreamsConfig::default();
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
    streams
}

/// `app.gap_scan`: the grace period and the cron schedules per period.
fn gap_scan(mut gs: Section<'_>, errs: &mut Vec<String>) -> GapScanConfig {
    let gd = GapScanConfig::default();
    let grace = gs.duration("grace", gd.grace, errs);
    let mut schedules = BTreeMap::new();
    if let Some(v) = gs.get("schedules") {
        match v.as_mapping() {
            Some(m) => {
                for (k, v) in m {
                    let key = k.as_str().map_or_else(|| show(k), str::to_string);
                    let path = format!("app.gap_scan.schedules.{key}");
                    if !Period::ALL.iter().any(|p| p.as_str() == key) {
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
    GapScanConfig { grace, schedules }
}

/// `app.proxy`: how the SOCKS5 pool is used.
fn proxy(mut px: Section<'_>, errs: &mut Vec<String>) -> ProxyConfig {
    let pd = ProxyConfig::default();
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
    proxy
}

/// `app.maintenance`: the scheduled OPTIMIZE of dirty partitions.
fn maintenance(mut mt: Section<'_>, errs: &mut Vec<String>) -> MaintenanceConfig {
    let md = MaintenanceConfig::default();
    let optimize = mt.string("optimize", &md.optimize, errs);
    if !optimize.is_empty() {
        if let Err(why) = validate_cron(&optimize) {
            errs.push(format!(
                "app.maintenance.optimize: {why} (or \"\" to disable), got {optimize:?}"
            ));
        }
    }
    let maintenance = MaintenanceConfig {
        optimize,
        use_final: mt.boolean("final", md.use_final, errs),
        timeout: mt.duration_in("timeout", md.timeout, Duration::from_secs(1), errs),
    };
    mt.finish(errs);
    maintenance
}

/// `app.indicators`: `default`, a list of indicator specs, each validated and normalised.
fn indicators(mut ind: Section<'_>, errs: &mut Vec<String>) -> IndicatorsConfig {
    let mut default: Vec<String> = Vec::new();
    if let Some(v) = ind.get("default") {
        match v.as_sequence() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("app.indicators.default[{i}]");
                    match item.as_str() {
                        Some(text) => match qs_core::indicators::Spec::parse(text) {
                            Ok(spec) => {
                                let spec = spec.to_string();
                                if !default.contains(&spec) {
                                    default.push(spec);
                                }
                            }
                            Err(e) => errs.push(format!("{path}: {e}, got {text:?}")),
                        },
                        None => errs.push(format!(
                            "{path}: expected an indicator spec like \"rsi(14)\", got {}",
                            show(item)
                        )),
                    }
                }
            }
            None if v.is_null() => {}
            None => errs.push(format!(
                "app.indicators.default: expected a list of indicator specs like [\"rsi(14)\", \"macd(12,26,9)\"], got {}",
                show(v)
            )),
        }
    }
    ind.finish(errs);
    IndicatorsConfig { default }
}

/// `app.clientserver`: the client server's address, tokens and limits.
fn clientserver(mut cs: Section<'_>, errs: &mut Vec<String>) -> ClientServerConfig {
    let d = ClientServerConfig::default();
    let enabled = cs.boolean("enabled", d.enabled, errs);
    let host = cs.string("host", &d.host, errs);
    if !is_bare_host(&host) {
        errs.push(format!(
            "app.clientserver.host: must be an IP address or host name to listen on, like 0.0.0.0 or 127.0.0.1, got {host:?}"
        ));
    }
    let port = cs.port("port", d.port, errs);
    let mut tokens: Vec<Secret> = Vec::new();
    if let Some(v) = cs.get("tokens") {
        match v.as_sequence() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(t) if !t.trim().is_empty() && !t.contains(char::is_whitespace) => {
                            tokens.push(Secret::new(t))
                        }
                        // The value is never shown: it is a secret.
                        _ => errs.push(format!(
                            "app.clientserver.tokens[{i}]: expected a quoted token without spaces (value not shown: it is a secret)"
                        )),
                    }
                }
            }
            None if v.is_null() => {}
            None => errs.push(
                "app.clientserver.tokens: expected a list of quoted tokens (value not shown: it is a secret)".to_string(),
            ),
        }
    }
    let mut count = |cs: &mut Section<'_>, key: &'static str, default: u64, max: i64| {
        u64::try_from(cs.int(key, i64::try_from(default).unwrap_or(max), 1..=max, errs))
            .unwrap_or(default)
    };
    let max_connections = count(&mut cs, "max_connections", d.max_connections, 1_000_000);
    let max_connections_per_ip = count(
        &mut cs,
        "max_connections_per_ip",
        d.max_connections_per_ip,
        1_000_000,
    );
    let max_subscriptions = count(&mut cs, "max_subscriptions", d.max_subscriptions, 100_000);
    let max_messages_per_second = count(
        &mut cs,
        "max_messages_per_second",
        d.max_messages_per_second,
        1_000_000,
    );
    let send_queue = count(&mut cs, "send_queue", d.send_queue, 1_000_000);
    let max_frame_bytes = cs.size("max_frame_bytes", d.max_frame_bytes, errs);
    if max_frame_bytes > 16 * 1024 * 1024 {
        errs.push(format!(
            "app.clientserver.max_frame_bytes: must be at most 16MB, got {max_frame_bytes} bytes"
        ));
    }
    let ping_interval = cs.duration_in(
        "ping_interval",
        d.ping_interval,
        Duration::from_millis(100),
        errs,
    );
    let idle_timeout = cs.duration_in(
        "idle_timeout",
        d.idle_timeout,
        Duration::from_millis(100),
        errs,
    );
    if idle_timeout < ping_interval {
        errs.push(format!(
            "app.clientserver.idle_timeout: must be at least ping_interval ({}), got {}",
            super::duration::format_duration(ping_interval),
            super::duration::format_duration(idle_timeout)
        ));
    }
    let follow_interval = cs.duration_in(
        "follow_interval",
        d.follow_interval,
        Duration::from_millis(10),
        errs,
    );
    cs.finish(errs);
    ClientServerConfig {
        enabled,
        host,
        port,
        tokens,
        max_connections,
        max_connections_per_ip,
        max_subscriptions,
        max_messages_per_second,
        max_frame_bytes,
        send_queue,
        ping_interval,
        idle_timeout,
        follow_interval,
    }
}

/// `app.http`: the ops endpoint.
fn http(mut h: Section<'_>, errs: &mut Vec<String>) -> HttpConfig {
    let listen = h.string("listen", super::DEFAULT_HTTP_LISTEN, errs);
    if let Err(why) = validate_listen(&listen) {
        errs.push(format!("app.http.listen: {why}, got {listen:?}"));
    }
    h.finish(errs);
    HttpConfig { listen }
}

/// Checks a listen address: `HOST:PORT` with an IP address (`127.0.0.1:9108`, `[::]:9108`) or
/// a bare host name (`localhost:9108`), or `""` (disabled). Port 0 picks a free port.
pub fn validate_listen(listen: &str) -> Result<(), String> {
    const EXPECTED: &str =
        "expected HOST:PORT like 127.0.0.1:9108, 0.0.0.0:9108 or [::1]:9108 (\"\" disables it)";
    if listen.is_empty() || listen.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(EXPECTED.to_string());
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("{EXPECTED}; the port must be 0..65535"));
    }
    // An IPv6 address needs brackets; anything else must be a bare host name.
    if host.contains(':') || host.parse::<std::net::IpAddr>().is_ok() || !is_bare_host(host) {
        return Err(EXPECTED.to_string());
    }
    Ok(())
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

/// A ClickHouse identifier we may interpolate into DDL (database names cannot be bound).
pub fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= 64
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn listen_addresses() {
        for ok in [
            "",
            "127.0.0.1:9108",
            "0.0.0.0:9108",
            "[::]:9108",
            "[::1]:0",
            "localhost:9108",
            "ops.example.com:80",
        ] {
            assert_eq!(validate_listen(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "9108",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:65536",
            ":9108",
            "::1:9108",
            "[::1]",
            "http://127.0.0.1:9108",
            "localhost:http",
            "300.1.1.1:9108",
            "a b:9108",
        ] {
            assert!(validate_listen(bad).is_err(), "{bad:?} accepted");
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
}
