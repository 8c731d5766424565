//! The `quantservice` binary as users run it: `--check-config` exit codes and redaction,
//! `migrate` twice, clear errors for bad configs, and the daemon's start and clean SIGTERM exit.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{seed_for, TestDb, PW_PASSWORD, PW_USER};

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

/// What one run of the binary printed and returned.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn of(cmd: &mut Command) -> Ran {
        let out = cmd.output().unwrap();
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code and that `secret` appears nowhere in the output.
    fn expect(self, code: i32, secret: &str) -> Ran {
        let all = format!("{}\n{}", self.stdout, self.stderr);
        assert_eq!(self.code, Some(code), "{all}");
        assert!(
            secret.is_empty() || !all.contains(secret),
            "secret printed:\n{all}"
        );
        self
    }
}

/// Runs the binary with `args` and `config` written to a temp file passed as `--config`.
fn run_with(config: &str, args: &[&str]) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), config);
    Ran::of(bin().args(args).arg("--config").arg(&path))
}

#[test]
fn check_config_passes_with_a_password_and_never_prints_it() {
    let db = TestDb::new_private("check_ok");
    let config = seed_for(&db.host, db.port, PW_USER, PW_PASSWORD, &db.name);
    let ran = run_with(&config, &["--check-config"]).expect(0, PW_PASSWORD);
    assert!(ran.stdout.contains("connected"), "{}", ran.stdout);
    assert!(ran.stdout.contains("password: '***'"), "{}", ran.stdout);
    assert!(
        ran.stdout.contains(&format!("port: {}", db.port)),
        "{}",
        ran.stdout
    );

    // The same with the password from QS_CLICKHOUSE_PASSWORD and the file from QS_CONFIG_PATH.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &seed_for(&db.host, db.port, PW_USER, "", &db.name),
    );
    Ran::of(
        bin()
            .arg("--check-config")
            .env("QS_CONFIG_PATH", &path)
            .env("QS_CLICKHOUSE_PASSWORD", PW_PASSWORD),
    )
    .expect(0, PW_PASSWORD);
}

#[test]
fn check_config_fails_clearly_on_wrong_password_or_unreachable_server() {
    let db = TestDb::new_private("check_bad");
    let wrong = "Not-the-Right-0ne";
    let config = seed_for(&db.host, db.port, PW_USER, wrong, &db.name);
    let ran = run_with(&config, &["--check-config"]).expect(1, wrong);
    let want = format!("refused the credentials of user \"{PW_USER}\"");
    assert!(ran.stderr.contains(&want), "{}", ran.stderr);

    let config = seed_for("127.0.0.1", common::dead_port(), "default", "", "x");
    let ran = run_with(&config, &["check-config"]).expect(1, wrong);
    assert!(ran.stderr.contains("unreachable"), "{}", ran.stderr);
}

#[test]
fn invalid_config_lists_every_problem_and_exits_1() {
    let config =
        "app:\n  clickhouse:\n    port: 0\n    pasword: x\n  writer:\n    flush_interval: fast\n";
    for args in [vec!["--check-config"], vec!["migrate"], vec![]] {
        let ran = run_with(config, &args).expect(1, "pasword: x");
        for want in [
            "app.clickhouse.port: must be 1..65535, got 0",
            "app.clickhouse.pasword: unknown key",
            "app.writer.flush_interval:",
        ] {
            assert!(ran.stderr.contains(want), "{args:?}: {}", ran.stderr);
        }
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ran = Ran::of(bin().arg("--check-config").current_dir(dir.path())).expect(1, "");
    assert!(ran.stderr.contains("QS_CONFIG_PATH"), "{}", ran.stderr);
    let ran = Ran::of(bin().args(["--check-config", "--config", "/nonexistent/app.yaml"]));
    let ran = ran.expect(1, "");
    assert!(
        ran.stderr
            .contains("cannot read config file /nonexistent/app.yaml"),
        "{}",
        ran.stderr
    );
}

#[test]
fn migrate_twice_on_an_empty_database() {
    let db = TestDb::new("cli_migrate");
    let config = seed_for(&db.host, db.port, "default", "", &db.name);
    let first = run_with(&config, &["migrate"]).expect(0, "");
    let applied: usize = db
        .sql("SELECT count() FROM schema_migrations")
        .trim()
        .parse()
        .unwrap();
    assert!(applied >= 1);
    let want = format!("{applied} applied, 0 already applied");
    assert!(first.stdout.contains(&want), "{}", first.stdout);
    let second = run_with(&config, &["migrate"]).expect(0, "");
    let want = format!("0 applied, {applied} already applied");
    assert!(second.stdout.contains(&want), "{}", second.stdout);
    assert_eq!(
        db.sql("SELECT count() FROM schema_migrations"),
        format!("{applied}\n")
    );
}

#[test]
fn daemon_migrates_idles_and_exits_cleanly_on_sigterm() {
    let db = TestDb::new_private("daemon");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &seed_for(&db.host, db.port, PW_USER, PW_PASSWORD, &db.name),
    );
    let mut child = common::KillOnDrop(
        bin()
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Both streams are read on threads and handed over line by line, so no read can hang
    // the test: every wait below has a deadline.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut log = String::new();
    let wait_for = |needle: &str, log: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !log.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    log.push_str(&line);
                    log.push('\n');
                }
                Err(_) => panic!("no {needle:?} from the daemon within 60 s:\n{log}"),
            }
        }
    };
    wait_for("Ready", &mut log);
    assert!(
        db.sql("SELECT count() FROM schema_migrations").trim() != "0",
        "daemon did not migrate"
    );

    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("QuantService stopped.", &mut log);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!log.contains(PW_PASSWORD), "{log}");
    // Not a TTY: no colour codes for journald.
    assert!(!log.contains('\u{1b}'), "{log}");
}

/// Runs `cmd` with stdout and stderr captured in files (no pipe can fill up), waiting for its
/// exit at most `secs`; a child still running then is killed and the test fails.
fn run_until_exit(cmd: &mut Command, secs: u64) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = common::KillOnDrop(
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {secs} s:\n{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Ran {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// `ws-start` with a symbol the exchange does not list fails before streaming (Binance would
/// accept the subscription and never send a candle), like `backfill-gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_start_refuses_a_symbol_the_exchange_does_not_list() {
    use quantservice::market::Market;
    let sim = qs_sim::start(qs_sim::SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let db = TestDb::new("cli_ws_unknown");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &db.yaml(&common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))),
    );
    let ran = tokio::task::spawn_blocking(move || {
        run_until_exit(
            bin()
                .args(["ws-start", "--symbol", "NOSUCHCOIN", "--market", "spot"])
                .args(["--period", "1m", "--config"])
                .arg(&path),
            60,
        )
    })
    .await
    .unwrap()
    .expect(1, "");
    assert!(
        ran.stderr
            .contains("error: cannot stream spot:NOSUCHCOIN:1m: unknown symbol NOSUCHCOIN on spot"),
        "{}",
        ran.stderr
    );
    assert!(!ran.stderr.contains("Streaming"), "{}", ran.stderr);
    assert!(ran.stdout.is_empty(), "{}", ran.stdout);
    assert_eq!(
        sim.ws_connections_opened(Market::Spot),
        0,
        "no socket opened"
    );
}

/// Usage errors (a missing required flag, an unknown flag) exit 2 with clap's usage message,
/// before any config is read; everything else that fails exits 1.
#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["backfill-gap", "--symbol", "ETHUSDT", "--market", "um"],
        vec!["ws-start", "--market", "spot"],
        vec!["--no-such-flag"],
    ] {
        let ran = Ran::of(bin().args(&args).current_dir(dir.path())).expect(2, "");
        assert!(ran.stderr.contains("Usage:"), "{args:?}: {}", ran.stderr);
    }
    let ran = Ran::of(
        bin()
            .args(["backfill-gap", "--symbol", "ETHUSDT", "--market", "um"])
            .current_dir(dir.path()),
    );
    assert!(ran.stderr.contains("--period"), "{}", ran.stderr);
}

/// build.rs itself, to test how it names the commit and formats the date.
#[allow(dead_code)]
#[path = "../build.rs"]
mod build_script;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .args(["-c", "user.name=qs", "-c", "user.email=qs@example.invalid"])
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `--version` names the version, the commit this checkout is at (`-dirty` exactly when the
/// binary's sources differ from it) and a UTC build date ($SOURCE_DATE_EPOCH when it was set).
#[test]
fn version_names_the_commit_and_the_build_date() {
    let ran = Ran::of(bin().arg("--version")).expect(0, "");
    let line = ran.stdout.trim();
    let prefix = format!("quantservice {} (commit ", env!("CARGO_PKG_VERSION"));
    let rest = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{line:?}"));
    let (commit, rest) = rest.split_once(", built ").unwrap();
    let date = rest.strip_suffix(')').unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let is_checkout = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && Path::new(String::from_utf8_lossy(&o.stdout).trim()) == root
        });
    if is_checkout {
        let head = git(root, &["rev-parse", "--short", "HEAD"]);
        let mut args = vec!["status", "--porcelain", "--untracked-files=no", "--"];
        args.extend_from_slice(build_script::SOURCES);
        let dirty = !git(root, &args).is_empty();
        let want = if dirty { format!("{head}-dirty") } else { head };
        assert_eq!(commit, want, "{line}");
    } else {
        assert_eq!(commit, "unknown", "{line}");
    }

    // YYYY-MM-DDTHH:MM:SSZ, not in the future.
    assert_eq!(date.len(), 20, "{date}");
    assert!(date.ends_with('Z') && date.as_bytes()[10] == b'T', "{date}");
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => assert_eq!(date, build_script::format_utc(epoch.parse().unwrap())),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            assert!(date <= build_script::format_utc(now).as_str(), "{date}");
        }
    }
}

#[test]
fn build_date_format() {
    for (secs, want) in [
        (0, "1970-01-01T00:00:00Z"),
        (951_782_400, "2000-02-29T00:00:00Z"),
        (1_709_251_199, "2024-02-29T23:59:59Z"),
        (1_735_689_600, "2025-01-01T00:00:00Z"),
        (4_107_542_400, "2100-03-01T00:00:00Z"),
    ] {
        assert_eq!(build_script::format_utc(secs), want);
    }
}

/// The commit as build.rs names it: the short hash, `-dirty` only when a source file (not,
/// say, the README) differs, and `unknown` outside a repository or in a directory that is not
/// the repository's top (a source tarball unpacked inside another checkout).
#[test]
fn build_script_names_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    assert_eq!(build_script::git_commit(repo), None, "not a repository");

    git(repo, &["init", "-q"]);
    std::fs::create_dir(repo.join("src")).unwrap();
    std::fs::write(repo.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(repo.join("README.md"), "readme\n").unwrap();
    assert_eq!(build_script::git_commit(repo), None, "no commit yet");
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "one"]);
    let head = git(repo, &["rev-parse", "--short", "HEAD"]);
    assert_eq!(build_script::git_commit(repo), Some(head.clone()));

    std::fs::write(repo.join("README.md"), "edited\n").unwrap();
    std::fs::write(repo.join("src/new.rs"), "// untracked\n").unwrap();
    assert_eq!(build_script::git_commit(repo), Some(head.clone()));
    std::fs::write(repo.join("src/main.rs"), "fn main() { }\n").unwrap();
    assert_eq!(
        build_script::git_commit(repo),
        Some(format!("{head}-dirty"))
    );

    let unpacked = repo.join("quantservice-0.1.0");
    std::fs::create_dir(&unpacked).unwrap();
    assert_eq!(
        build_script::git_commit(&unpacked),
        None,
        "inside another repository"
    );
}
