//! Log files as the deployment lays them out, through the real binary: installed as
//! `PREFIX/bin/quantservice` next to `PREFIX/logs`, with no `app.logging.dir` in app.yaml, it
//! writes `PREFIX/logs/quantservice.log` and rotates it by size into gzip'd archives of whole
//! lines in `PREFIX/logs/archived/`, while stdout/stderr keep every line too. And the daemon
//! applies an edit of `max_size` and `keep_days` live, says that a new `dir` waits for a
//! restart, and keeps its directory to itself while a command runs beside it.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TestDb;
use qs_sim::SimConfig;
use quantservice::logging::{ArchiveName, Stage};

/// An install layout in a temporary prefix (`bin/`, `config/`, `logs/`; `logs/archived/` is
/// left for the binary to create), with the binary linked (or copied) into `bin/`.
fn install(root: &Path) -> PathBuf {
    for d in ["bin", "config", "logs"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let exe = root.join("bin/quantservice");
    let built = Path::new(env!("CARGO_BIN_EXE_quantservice"));
    if std::fs::hard_link(built, &exe).is_err() {
        std::fs::copy(built, &exe).unwrap();
    }
    exe
}

async fn run(exe: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(exe)
            .args(args)
            .env_remove("QS_CONFIG_PATH")
            .env_remove("QS_CLICKHOUSE_PASSWORD")
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the binary did not exit within 120 s")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A log line without its timestamp.
fn untimed(line: &str) -> &str {
    line.split_once(' ').map_or(line, |(_, rest)| rest)
}

/// `2024-05-10T12:34:56.123456Z` at the start of a log line.
fn timestamp(line: &str) -> Option<&str> {
    let ts = line.split(' ').next()?;
    let ok = ts.len() >= 20
        && ts.ends_with('Z')
        && ts.as_bytes()[4] == b'-'
        && ts.as_bytes()[10] == b'T'
        && ts.as_bytes()[..4].iter().all(u8::is_ascii_digit);
    ok.then_some(ts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_binary_rotates_its_log_into_gzipped_archives_of_whole_lines() {
    let sim = qs_sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let db = TestDb::new("logs");
    // In cargo's target tmp dir, so the binary can be hard-linked rather than copied.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let prefix = root.path();
    let exe = install(prefix);
    let config = prefix.join("config/app.yaml");
    std::fs::write(
        &config,
        db.yaml(&format!(
            "{}  logging:\n    level: debug\n    max_size: 10KB\n",
            common::sim_binance_yaml(&sim, "")
        )),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let logs = prefix.join("logs");

    // --check-config shows the directory the install layout gives.
    let (code, out, check_err) = run(&exe, &["--check-config", "--config", config]).await;
    assert_eq!(code, Some(0), "{out}{check_err}");
    assert!(out.contains(&format!("dir: {}", logs.display())), "{out}");
    assert!(out.contains("max_size: 10KB"), "{out}");
    assert!(
        out.contains(&format!(
            "# logs: the console and {}/quantservice.log (rotated at 10KB and at midnight UTC into {}/archived/",
            logs.display(),
            logs.display()
        )),
        "{out}"
    );

    // A backfill at debug level logs a few hundred lines: several times 10KB.
    let start = 1_614_556_800_000_i64; // 2021-03-01
    let end = start + 60 * 86_400_000;
    let (s, e) = (start.to_string(), end.to_string());
    let args = [
        "backfill-gap",
        "--symbol",
        "ETHUSDT",
        "--market",
        "um",
        "--period",
        "1m",
        "--start_ms",
        &s,
        "--end_ms",
        &e,
        "--source",
        "rest",
        "--config",
        config,
    ];
    let (code, out, err) = run(&exe, &args).await;
    assert_eq!(code, Some(0), "{out}{err}");

    let mut archives: Vec<(ArchiveName, Stage, PathBuf)> = std::fs::read_dir(logs.join("archived"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().into_string().unwrap();
            let (n, s) = ArchiveName::parse(&name)
                .unwrap_or_else(|| panic!("unexpected file {name} in logs/archived"));
            (n, s, e.path())
        })
        .collect();
    archives.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(archives.len() >= 2, "{archives:?}");
    let mut all = String::new();
    for (name, stage, path) in &archives {
        // The binary waited for its archiver before exiting: nothing staged or half done.
        assert_eq!(*stage, Stage::Done, "{}", path.display());
        assert_eq!(mode_of(path), 0o640, "{}", path.display());
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("{} is not gzip'd text: {e}", path.display()));
        assert!(text.ends_with('\n'), "{name:?} ends mid-line");
        assert!(
            text.len() <= 10 * 1024,
            "{name:?} holds {} bytes",
            text.len()
        );
        all.push_str(&text);
    }
    let current = std::fs::read_to_string(logs.join("quantservice.log")).unwrap();
    // rw-r----- whatever the umask (the test's is 022, Supervisor's too).
    assert_eq!(mode_of(&logs.join("quantservice.log")), 0o640);
    all.push_str(&current);
    // Every line whole (it starts with its timestamp; the line order within a thread is
    // the unit tests' business, events of different threads may be queued in another order
    // than their timestamps).
    for line in all.lines() {
        assert!(
            timestamp(line).is_some(),
            "a split or foreign line: {line:?}"
        );
    }
    // One line per REST page: 60 days of 1m candles are ~170 pages.
    let pages = all.matches("Parsed klines.").count();
    assert!(pages > 100, "{pages} page lines in the files");
    // Nothing lost, nothing added: the files hold exactly the lines the console (stderr for
    // these commands) got from both runs (each output takes its own timestamp: compared
    // without it).
    let mut in_files: Vec<&str> = all.lines().map(untimed).collect();
    let console = format!("{check_err}{err}");
    let mut on_console: Vec<&str> = console.lines().map(untimed).collect();
    in_files.sort_unstable();
    on_console.sort_unstable();
    assert_eq!(in_files.len(), on_console.len());
    assert!(
        in_files == on_console,
        "the log files and the console differ"
    );
    assert!(!all.contains('\u{1b}'), "colour codes in the log file");
}

/// Waits until `cond` holds, at most `secs`; `what` says what was awaited when it did not.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reload_applies_max_size_and_keep_days_live_and_says_a_new_dir_needs_a_restart() {
    let db = TestDb::new("logreload");
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let elsewhere = tmp.path().join("elsewhere");
    let day =
        |days_ago: i64| qs_core::time::day_label(qs_core::time::now_ms() - days_ago * 86_400_000);
    // An archive of five days ago: kept with keep_days 7, deleted once it is 2.
    std::fs::create_dir_all(logs.join("archived")).unwrap();
    let old = logs
        .join("archived")
        .join(format!("quantservice-{}.log.gz", day(5)));
    std::fs::write(&old, "").unwrap();
    let yaml = |dir: &Path, max_size: &str, keep_days: u32| {
        db.yaml(&format!(
            "  logging:\n    dir: \"{}\"\n    max_size: {max_size}\n    keep_days: {keep_days}\n  operator:\n    metrics_interval: 100ms\n",
            dir.display()
        ))
    };
    let config = tmp.path().join("app.yaml");
    std::fs::write(&config, yaml(&logs, "1MB", 7)).unwrap();
    let mut child = common::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
            .arg("--config")
            .arg(&config)
            .env_remove("QS_CONFIG_PATH")
            .env_remove("QS_CLICKHOUSE_PASSWORD")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let current = || std::fs::read_to_string(logs.join("quantservice.log")).unwrap_or_default();
    let archives = || {
        std::fs::read_dir(logs.join("archived"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .collect::<Vec<_>>()
    };
    wait_until(60, "Ready in quantservice.log", || {
        current().contains("Ready")
    });
    // Written before the edit, so it must still be there: keep_days 7 holds.
    assert!(old.exists());
    assert_eq!(archives().len(), 1, "{:?}", archives());

    // A command run by hand meanwhile leaves the daemon's file alone.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .args(["--check-config", "--config"])
        .arg(&config)
        .env_remove("QS_CONFIG_PATH")
        .env_remove("QS_CLICKHOUSE_PASSWORD")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "quantservice: log directory {} is in use by another quantservice process; this process logs to the console only",
            logs.display()
        )),
        "{stderr}"
    );

    // The edit: a smaller max_size, a shorter keep_days, another dir. Written whole (rename).
    let next = tmp.path().join("app.yaml.new");
    std::fs::write(&next, yaml(&elsewhere, "1KB", 2)).unwrap();
    std::fs::rename(&next, &config).unwrap();
    // The metrics line keeps coming: with 1KB the file rotates within a few lines.
    wait_until(30, "rotation at the new max_size", || {
        archives().iter().any(|a| {
            a.starts_with(&format!("quantservice-{}", day(0)))
                || a.starts_with(&format!("quantservice-{}", day(1)))
        })
    });
    wait_until(30, "deletion by the new keep_days", || !old.exists());
    wait_until(30, "compressed archives", || {
        archives().iter().all(|a| a.ends_with(".log.gz"))
    });
    let mut all = String::new();
    let mut names = archives();
    names.sort_by_key(|a| ArchiveName::parse(a).map(|(n, _)| n));
    for a in names {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(logs.join("archived").join(&a)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.ends_with('\n'), "{a} ends mid-line");
        all.push_str(&text);
    }
    all.push_str(&current());
    assert!(
        all.contains("Log file limits changed. max_size=1KB keep_days=2"),
        "{all}"
    );
    assert!(
        all.contains(&format!(
            "app.logging.dir takes effect at the next start; until then the log files stay where they are. running={} configured={}",
            logs.display(),
            elsewhere.display()
        )),
        "{all}"
    );
    assert!(
        !elsewhere.exists(),
        "the new dir was used without a restart"
    );
    child.kill().unwrap();
}

/// The permission bits of a file.
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}
