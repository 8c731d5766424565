//! The `quantservice` binary as users run it: `--check-config` exit codes and redaction,
//! `migrate` twice, clear errors for bad configs, and the daemon's start and clean SIGTERM exit.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TestDb, PW_PASSWORD, PW_USER};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quantservice"));
    c.env_remove("QS_CONFIG_PATH")
        .env_remove("QS_CLICKHOUSE_PASSWORD")
        .env_remove("RUST_LOG");
    c
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("app.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The seed file with host, port and password pointed at the test server.
fn seed_for(host: &str, port: u16, user: &str, password: &str, database: &str) -> String {
    format!(
        r#"app:
  environment: prod

  clickhouse:
    host: "{host}"          # ClickHouse server address
    port: {port}
    database: "{database}"
    username: "{user}"
    password: "{password}"               # set a password in production

  binance:
    spot:
      ws_url: "wss://stream.binance.com:9443/ws/"
      rest_url: "https://data-api.binance.vision/api/v3/klines"
    um:
      ws_url: "wss://fstream.binance.com/ws/"
      rest_url: "https://fapi.binance.com/fapi/v1/klines"
    cm:
      ws_url: "wss://dstream.binance.com/ws/"
      rest_url: "https://dapi.binance.com/dapi/v1/klines"
"#
    )
}

#[test]
fn check_config_passes_with_a_password_and_never_prints_it() {
    let db = TestDb::new("check_ok");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &seed_for(&db.host, db.port, PW_USER, PW_PASSWORD, &db.name),
    );
    let out = bin()
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("connected"), "{stdout}");
    assert!(stdout.contains("password: '***'"), "{stdout}");
    assert!(stdout.contains(&format!("port: {}", db.port)), "{stdout}");
    assert!(!stdout.contains(PW_PASSWORD) && !stderr.contains(PW_PASSWORD));

    // The same with the password from QS_CLICKHOUSE_PASSWORD and QS_CONFIG_PATH.
    let path = write_config(
        dir.path(),
        &seed_for(&db.host, db.port, PW_USER, "", &db.name),
    );
    let out = bin()
        .arg("--check-config")
        .env("QS_CONFIG_PATH", &path)
        .env("QS_CLICKHOUSE_PASSWORD", PW_PASSWORD)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains(PW_PASSWORD) && !stderr.contains(PW_PASSWORD));
}

#[test]
fn check_config_fails_clearly_on_wrong_password_or_unreachable_server() {
    let db = TestDb::new("check_bad");
    let dir = tempfile::tempdir().unwrap();
    let wrong = "Not-the-Right-0ne";
    let path = write_config(
        dir.path(),
        &seed_for(&db.host, db.port, PW_USER, wrong, &db.name),
    );
    let out = bin()
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("refused the credentials of user \"{PW_USER}\"")),
        "{stderr}"
    );
    assert!(
        !stdout.contains(wrong) && !stderr.contains(wrong),
        "{stdout}\n{stderr}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = write_config(dir.path(), &seed_for("127.0.0.1", port, "default", "", "x"));
    let out = bin()
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
}

#[test]
fn invalid_config_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "app:\n  clickhouse:\n    port: 0\n    pasword: x\n  writer:\n    flush_interval: fast\n",
    );
    for args in [vec!["--check-config"], vec!["migrate"], vec![]] {
        let out = bin()
            .args(&args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("app.clickhouse.port: must be 1..65535, got 0"),
            "{stderr}"
        );
        assert!(
            stderr.contains("app.clickhouse.pasword: unknown key"),
            "{stderr}"
        );
        assert!(stderr.contains("app.writer.flush_interval:"), "{stderr}");
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("--check-config")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("QS_CONFIG_PATH"), "{stderr}");
    let out = bin()
        .args(["--check-config", "--config", "/nonexistent/app.yaml"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("cannot read config file /nonexistent/app.yaml"),
        "{stderr}"
    );
}

#[test]
fn migrate_twice_on_an_empty_database() {
    let db = TestDb::new("cli_migrate");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &seed_for(&db.host, db.port, "default", "", &db.name),
    );
    let run = || {
        let out = bin()
            .arg("migrate")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        stdout
    };
    let first = run();
    assert!(first.contains("1 applied, 0 already applied"), "{first}");
    let second = run();
    assert!(second.contains("0 applied, 1 already applied"), "{second}");
    assert_eq!(db.sql("SELECT count() FROM schema_migrations"), "1\n");
}

#[test]
fn daemon_migrates_idles_and_exits_cleanly_on_sigterm() {
    let db = TestDb::new("daemon");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &seed_for(&db.host, db.port, PW_USER, PW_PASSWORD, &db.name),
    );
    let mut child = bin()
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("Ready") {
            break;
        }
    }
    assert!(log.contains("Ready"), "daemon never became ready:\n{log}");
    assert_eq!(db.sql("SELECT count() FROM schema_migrations"), "1\n");

    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(log.contains("QuantService stopped."), "{log}");
    assert!(!log.contains(PW_PASSWORD), "{log}");
    // Not a TTY: no colour codes for journald.
    assert!(!log.contains('\u{1b}'), "{log}");
}
