//! Config loading: the seed file unchanged, defaults, env override, all errors at once,
//! unknown keys, path resolution.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::time::Duration;

mod common;

use common::SEED;
use quantservice::config::{Config, ConfigError, ENV_CLICKHOUSE_PASSWORD};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_with_env(text, Path::new("t.yaml"), |_| None)
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.problems(),
    }
}

#[test]
fn seed_file_loads_unchanged() {
    let cfg = parse(SEED).unwrap();
    assert_eq!(cfg.environment, "prod");
    assert_eq!(cfg.clickhouse.host, "localhost");
    assert_eq!(cfg.clickhouse.port, 8123);
    assert_eq!(cfg.clickhouse.database, "maxaira");
    assert_eq!(cfg.clickhouse.username, "default");
    assert!(cfg.clickhouse.password.is_empty());
    assert_eq!(cfg.binance.spot.ws_url, "wss://stream.binance.com:9443/ws/");
    assert_eq!(
        cfg.binance.spot.rest_url,
        "https://data-api.binance.vision/api/v3/klines"
    );
    assert_eq!(
        cfg.binance.um.rest_url,
        "https://fapi.binance.com/fapi/v1/klines"
    );
    assert_eq!(cfg.binance.cm.ws_url, "wss://dstream.binance.com/ws/");
}

#[test]
fn shipped_config_files_load_and_app_yaml_matches_the_seed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let shipped = Config::from_yaml_with_env(
        &std::fs::read_to_string(dir.join("app.yaml")).unwrap(),
        &dir.join("app.yaml"),
        |_| None,
    )
    .unwrap();
    assert_eq!(shipped, parse(SEED).unwrap());
    let local = std::fs::read_to_string(dir.join("local.yaml")).unwrap();
    assert!(parse(&local).is_ok());
}

#[test]
fn defaults_fill_every_optional_section() {
    let cfg = parse("app:\n  environment: dev\n").unwrap();
    assert_eq!(cfg.clickhouse.host, "localhost");
    assert_eq!(cfg.clickhouse.port, 8123);
    assert!(!cfg.clickhouse.secure);
    assert_eq!(cfg.clickhouse.timeout, Duration::from_secs(30));
    assert_eq!(cfg.binance.um.ws_url, "wss://fstream.binance.com/ws/");
    assert_eq!(cfg.logging.level, "info");
    assert_eq!(cfg.logging.dir, None);
    assert_eq!(cfg.logging.keep_days, 7);
    assert_eq!(cfg.logging.max_size, 100 * 1024 * 1024);
    assert_eq!(cfg.writer.batch_rows, 100_000);
    assert_eq!(cfg.writer.flush_interval, Duration::from_secs(1));
    assert_eq!(cfg.writer.channel_capacity, 100_000);
    // Durations are written like 30s / 5m.
    let cfg = parse("app:\n  writer:\n    flush_interval: 250ms\n    max_backoff: 5m\n").unwrap();
    assert_eq!(cfg.writer.flush_interval, Duration::from_millis(250));
    assert_eq!(cfg.writer.max_backoff, Duration::from_secs(300));
}

#[test]
fn env_overrides_the_password() {
    let env = |k: &str| (k == ENV_CLICKHOUSE_PASSWORD).then(|| "from-env-xyz".to_string());
    let cfg = Config::from_yaml_with_env(SEED, Path::new("t.yaml"), env).unwrap();
    assert_eq!(cfg.clickhouse.password.expose(), "from-env-xyz");
    // ...and the redacted dump never shows it.
    let dump = cfg.redacted_yaml();
    assert!(!dump.contains("from-env-xyz"), "{dump}");
    assert!(dump.contains("password: '***'"), "{dump}");
}

#[test]
fn every_error_is_reported_at_once_with_path_and_value() {
    let text = r#"app:
  environment: prod
  clickhouse:
    host: "localhost"
    port: 0
    database: "bad-name"
    timeout: soon
  binance:
    um:
      ws_url: "http://fstream.binance.com/ws/"
  logging:
    keep_days: "seven"
  writer:
    batch_rows: -5
"#;
    let p = problems(text);
    let expect = [
        "app.clickhouse.port: must be 1..65535, got 0",
        "app.clickhouse.database: must match [A-Za-z_][A-Za-z0-9_]* (max 64), got \"bad-name\"",
        "app.clickhouse.timeout: expected a duration like 500ms, 30s, 5m or 1h, got \"soon\"",
        "app.binance.um.ws_url: must be a ws/wss URL with a host, got \"http://fstream.binance.com/ws/\" (scheme http)",
        "app.logging.keep_days: expected an integer, got \"seven\"",
        "app.writer.batch_rows: must be 1..1000000, got -5",
    ];
    for e in expect {
        assert!(p.iter().any(|x| x == e), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn unknown_keys_are_errors_naming_them() {
    let text = "app:\n  clickhouse:\n    hots: localhost\n    port: 8123\n  loging:\n    level: info\ntop_level_typo: 1\n";
    let p = problems(text);
    assert!(
        p.iter()
            .any(|x| x.starts_with("app.clickhouse.hots: unknown key")),
        "{p:#?}"
    );
    assert!(
        p.iter().any(|x| x.starts_with("app.loging: unknown key")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|x| x.starts_with("top_level_typo: unknown key")),
        "{p:#?}"
    );
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn wrong_shapes_and_bad_yaml_are_clear() {
    let p = problems("app:\n  clickhouse: localhost\n");
    assert_eq!(
        p,
        vec!["app.clickhouse: expected a mapping, got \"localhost\""]
    );
    let p = problems("- just\n- a list\n");
    assert!(p[0].contains("expected a mapping"), "{p:?}");
    let e = parse("app:\n  clickhouse: [unclosed\n").unwrap_err();
    assert!(matches!(e, ConfigError::Yaml { .. }), "{e}");
    let p = problems("app:\n  logging:\n    level: \"info,,=[\"\n");
    assert!(p[0].starts_with("app.logging.level:"), "{p:?}");
}

#[test]
fn config_path_resolution_order() {
    let cli = Path::new("/tmp/from-cli.yaml");
    assert_eq!(
        Config::resolve_path(Some(cli), Some("/tmp/from-env.yaml".into())).unwrap(),
        cli
    );
    assert_eq!(
        Config::resolve_path(None, Some("/tmp/from-env.yaml".into())).unwrap(),
        Path::new("/tmp/from-env.yaml")
    );
    // Without either, ./config/app.yaml (cargo runs tests from the package root).
    assert_eq!(
        Config::resolve_path(None, None).unwrap(),
        Path::new("./config/app.yaml")
    );
}

#[test]
fn secrets_never_appear_in_config_errors() {
    // Unquoted numbers and wrongly tagged values: the error must not echo the secret.
    for (value, secret) in [
        ("12345678901234567890123", "12345678901234567890123"),
        ("!!int hunter2xyz", "hunter2xyz"),
        ("[hunter2xyz]", "hunter2xyz"),
    ] {
        let text = format!("app:\n  clickhouse:\n    password: {value}\n");
        let err = parse(&text).unwrap_err();
        let all = format!("{err} {:?}", err.problems());
        assert!(!all.contains(secret), "{value}: {all}");
        assert!(
            all.contains("app.clickhouse.password") || all.contains("line"),
            "{all}"
        );
    }
}

#[test]
fn log_files_sizes_and_directory() {
    let cfg =
        parse("app:\n  logging:\n    dir: /var/log/qs\n    max_size: 10KB\n    keep_days: 3\n")
            .unwrap();
    assert_eq!(cfg.logging.dir.as_deref(), Some(Path::new("/var/log/qs")));
    assert_eq!(cfg.logging.max_size, 10 * 1024);
    assert_eq!(cfg.logging.keep_days, 3);
    // --check-config prints sizes the way they are written.
    let dump = cfg.redacted_yaml();
    assert!(dump.contains("max_size: 10KB"), "{dump}");
    assert!(dump.contains("dir: /var/log/qs"), "{dump}");
    assert_eq!(
        parse("app:\n  logging:\n    max_size: 1gb\n")
            .unwrap()
            .logging
            .max_size,
        1 << 30
    );
    // An empty dir means no files (not even the install layout's logs/).
    let cfg = parse("app:\n  logging:\n    dir: \"\"\n").unwrap();
    assert_eq!(cfg.logging.dir, None);
    for (bad, why) in [
        (
            "\"10 MB\"",
            "no space between the number and the unit (write 100MB), got \"10 MB\"",
        ),
        ("-1KB", "a size cannot be negative, got \"-1KB\""),
        ("5XB", "unknown unit \"XB\": use KB, MB or GB, got \"5XB\""),
        ("0", "expected a size like 10KB, 100MB or 1GB, got 0"),
        ("0MB", "a size must be more than 0, got \"0MB\""),
        (
            "1.5GB",
            "a size is a whole number of KB, MB or GB (write 1536MB, not 1.5GB), got \"1.5GB\"",
        ),
    ] {
        let p = problems(&format!("app:\n  logging:\n    max_size: {bad}\n"));
        assert_eq!(p, vec![format!("app.logging.max_size: {why}")], "{bad}");
    }
}

#[test]
fn duplicate_keys_are_reported_at_the_duplicate_with_their_path() {
    let text = r#"app:
  environment: prod
  writer:
    flush_interval: 1s
  logging:
    level: info
  clickhouse:
    port: 8123
    host: localhost
    password: "first-secret-xyz"
    username: default
    port: 9000
    password: "second-secret-xyz"
  writer:
    batch_rows: 10
"#;
    let err = parse(text).unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
    assert_eq!(
        err.problems(),
        vec![
            "app.clickhouse.port: duplicate key at line 12 (first at line 8)",
            "app.clickhouse.password: duplicate key at line 13 (first at line 10)",
            "app.writer: duplicate key at line 14 (first at line 3)",
        ]
    );
    let all = format!("{err} {:?}", err.problems());
    assert!(!all.contains("secret-xyz"), "{all}");
    // A schedule given twice in flow style, a common copy-paste slip.
    let p = problems("app:\n  gap_scan:\n    schedules: {1m: \"* * * * * *\", 1h: \"0 * * * * *\",\n      1m: \"*/5 * * * * *\"}\n");
    assert_eq!(
        p,
        vec!["app.gap_scan.schedules.1m: duplicate key at line 4 (first at line 3)"]
    );
}

#[test]
fn numbers_are_not_silently_turned_into_strings() {
    let p = problems("app:\n  clickhouse:\n    database: 1e3\n    username: 0x1F\n");
    assert!(
        p.contains(
            &"app.clickhouse.database: expected a string (quote it), got 1000.0".to_string()
        ),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x.starts_with("app.clickhouse.username: expected a string (quote it)")),
        "{p:?}"
    );
}

#[test]
fn credentials_or_ports_in_the_host_are_refused() {
    for host in [
        "u:leak@127.0.0.1",
        "http://localhost",
        "localhost:8123",
        "host/path",
    ] {
        let p = problems(&format!("app:\n  clickhouse:\n    host: \"{host}\"\n"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("app.clickhouse.host: must be a bare host name"),
            "{p:?}"
        );
    }
    let cfg = parse("app:\n  clickhouse:\n    host: \"::1\"\n").unwrap();
    assert_eq!(cfg.clickhouse.url(), "http://[::1]:8123");
}

#[test]
fn durations_are_bounded() {
    let p = problems(
        "app:\n  clickhouse:\n    timeout: 0s\n  writer:\n    shutdown_timeout: 200000000000000d\n",
    );
    assert!(
        p.contains(&"app.clickhouse.timeout: must be 1ms..30d, got \"0s\"".to_string()),
        "{p:?}"
    );
    assert!(
        p.contains(
            &"app.writer.shutdown_timeout: must be 0s..30d, got \"200000000000000d\"".to_string()
        ),
        "{p:?}"
    );
}

/// The live reload: edits written as a new file renamed over the old one, a symlink swapped to
/// another directory's file, and an invalid edit that changes nothing. Each edit is followed by
/// waiting for its outcome.
#[tokio::test]
async fn the_watcher_follows_renames_and_symlink_swaps_and_ignores_invalid_edits() {
    use quantservice::config_watch::{spawn, Confirm, ReloadResult, Reloads};
    use tokio_util::sync::CancellationToken;
    let dir = tempfile::tempdir().unwrap();
    let yaml = |env: &str| format!("app:\n  environment: {env}\n");
    let v1 = dir.path().join("v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("app.yaml"), yaml("one")).unwrap();
    let path = dir.path().join("app.yaml");
    std::os::unix::fs::symlink(v1.join("app.yaml"), &path).unwrap();
    let initial = Config::load(&path).unwrap();
    let cancel = CancellationToken::new();
    let reloads = Reloads::new();
    assert_eq!(reloads.latest().seq, 0);
    let rx = spawn(
        path.clone(),
        initial,
        reloads.clone(),
        Confirm::OnPublish,
        cancel.clone(),
    );
    // Makes an edit and returns its outcome.
    let outcome_of = |edit: &dyn Fn()| {
        let seq = reloads.latest().seq;
        edit();
        let reloads = reloads.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), reloads.next_after(seq))
                .await
                .expect("no reload outcome within 10 s")
                .expect("the watcher is gone")
        }
    };
    let applied = |sections: &[&str]| ReloadResult::Applied {
        changed: sections.iter().map(|s| s.to_string()).collect(),
    };

    // Symlink swap: a new link renamed over the old one, pointing into another directory.
    let v2 = dir.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("app.yaml"), yaml("two")).unwrap();
    let tmp_link = dir.path().join("app.yaml.new");
    std::os::unix::fs::symlink(v2.join("app.yaml"), &tmp_link).unwrap();
    let o = outcome_of(&|| std::fs::rename(&tmp_link, &path).unwrap()).await;
    assert_eq!(o.result, applied(&["environment"]));
    assert_eq!(rx.borrow().environment, "two");

    // Editor-style replace: write a new file, rename it over the link.
    let tmp = dir.path().join("app.yaml.tmp");
    let replace = |text: String| {
        let (tmp, path) = (tmp.clone(), path.clone());
        move || {
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    };
    let o = outcome_of(&replace(yaml("three"))).await;
    assert_eq!(o.result, applied(&["environment"]));
    assert_eq!(rx.borrow().environment, "three");

    // Invalid: rejected with its problem, and it changes nothing.
    let o = outcome_of(&replace(
        "app:\n  environment: four\n  clickhouse:\n    port: 0\n".to_string(),
    ))
    .await;
    assert_eq!(
        o.result,
        ReloadResult::Rejected {
            errors: vec!["app.clickhouse.port: must be 1..65535, got 0".to_string()]
        }
    );
    assert_eq!(
        rx.borrow().environment,
        "three",
        "an invalid edit must change nothing"
    );

    // An edit that means the same config (a comment) applies, changing nothing.
    let o = outcome_of(&replace(format!("# a comment\n{}", yaml("three")))).await;
    assert_eq!(o.result, applied(&[]));

    // The next valid edit still applies.
    let o = outcome_of(&replace(format!(
        "{}  logging:\n    level: debug\n",
        yaml("five")
    )))
    .await;
    assert_eq!(o.result, applied(&["environment", "logging"]));
    assert_eq!(rx.borrow().environment, "five");
    cancel.cancel();
}

#[test]
fn the_ops_endpoint_listen_address() {
    assert_eq!(parse("app: {}\n").unwrap().http.listen, "127.0.0.1:9108");
    assert_eq!(
        parse("app:\n  http:\n    listen: \"\"\n")
            .unwrap()
            .http
            .listen,
        ""
    );
    assert_eq!(
        parse("app:\n  http:\n    listen: \"[::]:9108\"\n")
            .unwrap()
            .http
            .listen,
        "[::]:9108"
    );
    assert_eq!(
        problems("app:\n  http:\n    listen: \"9108\"\n"),
        ["app.http.listen: expected HOST:PORT like 127.0.0.1:9108, 0.0.0.0:9108 or [::1]:9108 (\"\" disables it), got \"9108\""]
    );
    assert_eq!(
        problems("app:\n  http:\n    listen: \"127.0.0.1:99999\"\n"),
        ["app.http.listen: expected HOST:PORT like 127.0.0.1:9108, 0.0.0.0:9108 or [::1]:9108 (\"\" disables it); the port must be 0..65535, got \"127.0.0.1:99999\""]
    );
    assert_eq!(
        problems("app:\n  http:\n    listen: 9108\n    port: 1\n"),
        [
            "app.http.listen: expected a string (quote it), got 9108",
            "app.http.port: unknown key (expected one of: listen)"
        ]
    );
}

#[test]
fn default_indicators_are_validated_and_normalised() {
    assert!(parse("app: {}\n").unwrap().indicators.default.is_empty());
    assert_eq!(
        parse(
            "app:\n  indicators:\n    default: [\"RSI(14)\", \"macd(12, 26, 9)\", \"rsi(14)\"]\n"
        )
        .unwrap()
        .indicators
        .default,
        ["rsi(14)", "macd(12,26,9)"]
    );
    let errs = problems(
        "app:\n  indicators:\n    default: [\"rsi(0)\", \"foo(3)\", 7]\n    defaults: []\n",
    );
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert!(
        errs[0].starts_with("app.indicators.default[0]: ") && errs[0].ends_with("got \"rsi(0)\""),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("app.indicators.default[1]: ") && errs[1].contains("foo"),
        "{errs:?}"
    );
    assert!(
        errs[2].starts_with("app.indicators.default[2]: expected an indicator spec"),
        "{errs:?}"
    );
    assert_eq!(
        errs[3],
        "app.indicators.defaults: unknown key (expected one of: default)"
    );
    assert_eq!(
        problems("app:\n  indicators:\n    default: \"rsi(14)\"\n"),
        ["app.indicators.default: expected a list of indicator specs like [\"rsi(14)\", \"macd(12,26,9)\"], got \"rsi(14)\""]
    );
    // --check-config prints it.
    let cfg = parse("app:\n  indicators:\n    default: [\"sma(20)\"]\n").unwrap();
    assert!(
        cfg.redacted_yaml()
            .contains("indicators:\n    default:\n    - sma(20)"),
        "{}",
        cfg.redacted_yaml()
    );
}
