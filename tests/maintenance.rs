//! Maintenance against real ClickHouse: the partition IDs the writer computes are the ones
//! ClickHouse gives (`system.parts`); late and replaced rows mark their partitions dirty and
//! plain in-order appends do not; `quantservice optimize --final` (the binary) leaves each dirty
//! partition one part that reads the same without `FINAL`, marks it done, and leaves the other
//! partitions untouched; a mark newer than an optimize's start keeps its partition dirty; the
//! daemon's schedule (hot-reloaded) optimizes dirty partitions and reports a failed one in
//! `task_status` without stopping.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{wait_for, TestDb};
use quantservice::config::Config;
use quantservice::config_watch::{ReloadResult, Reloads};
use quantservice::market::{now_ms, Decimal, Kline, PairKey, Source};
use quantservice::store::migrate;
use quantservice::store::partitions::{PartitionScheme, KLINES};
use quantservice::store::writer::Writer;
use quantservice::store::Store;
use tokio_util::sync::CancellationToken;

const M: i64 = 60_000;
/// 2019-01-01T00:00:00Z, 2020-01-01T00:00:00Z, 2018-06-01T00:00:00Z.
const Y2019: i64 = 1_546_300_800_000;
const Y2020: i64 = 1_577_836_800_000;
const JUN2018: i64 = 1_527_811_200_000;

fn pair(symbol: &str) -> PairKey {
    PairKey::parse("um", symbol, "1m").unwrap()
}

/// A closed 1m candle whose prices depend on `variant`, so two versions of it differ.
fn candle(p: &PairKey, open_time: i64, variant: i128, source: Source) -> Kline {
    let d = Decimal::from_mantissa;
    let base = 4_200_000_000_000 + i128::from(open_time / M) % 1_000_000 + variant * 100;
    Kline {
        pair: p.clone(),
        open_time,
        close_time: open_time + M - 1,
        open: d(base),
        high: d(base + 50),
        low: d(base - 50),
        close: d(base + 1),
        volume: d(123_456_789),
        quote_volume: d(987_654_321_000),
        trades: 42,
        taker_buy_volume: d(61_728_394),
        taker_buy_quote_volume: d(493_827_160_500),
        is_final: true,
        source,
    }
}

fn run(p: &PairKey, from: i64, n: i64, variant: i128, source: Source) -> Vec<Kline> {
    (0..n)
        .map(|i| candle(p, from + i * M, variant, source))
        .collect()
}

async fn migrated(db: &TestDb) -> Store {
    let store = Store::new(&db.config("").clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    store
}

/// One writer (one process's memory of what it committed) writing `phases` in order, each
/// committed before the next is sent; returns when it has stopped (its marks recorded).
async fn write_phases(db: &TestDb, store: &Store, phases: Vec<Vec<Kline>>) {
    let cfg = db.config("  writer:\n    flush_interval: 50ms\n");
    let (writer, handle) = Writer::new(store.clone(), cfg.writer);
    let task = tokio::spawn(writer.run(CancellationToken::new()));
    let mut sent = 0u64;
    for rows in phases {
        sent += rows.len() as u64;
        handle.send_many(rows).await.unwrap();
        wait_for(30, "a phase committed", || async {
            handle.stats().rows_written() >= sent
        })
        .await;
    }
    drop(handle);
    task.await.unwrap().unwrap();
}

/// The IDs of the `klines` partitions marked dirty and not optimized since (read in SQL).
fn dirty(db: &TestDb) -> Vec<String> {
    db.sql(
        "SELECT partition_id FROM partition_maintenance FINAL WHERE table_name = 'klines' \
         GROUP BY partition_id \
         HAVING maxIf(event_time, event = 'dirty') >= maxIf(event_time, event = 'optimized') \
         AND maxIf(event_time, event = 'dirty') > toDateTime(0) ORDER BY partition_id",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Active part names per partition of `klines`.
fn parts(db: &TestDb) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let text = db.sql(&format!(
        "SELECT partition_id, name FROM system.parts WHERE database = '{}' AND table = 'klines' \
         AND active ORDER BY partition_id, name",
        db.name
    ));
    for line in text.lines() {
        let (p, n) = line.split_once('\t').unwrap();
        out.entry(p.to_string()).or_default().push(n.to_string());
    }
    out
}

fn rows_of(db: &TestDb, year: i64, with_final: bool) -> String {
    db.sql(&format!(
        "SELECT market, symbol, period, open_time, open, close, source FROM klines {} \
         WHERE toYear(toDateTime(intDiv(open_time, 1000), 'UTC')) = {year} \
         ORDER BY market, symbol, period, open_time",
        if with_final { "FINAL" } else { "" }
    ))
}

fn bin_optimize(db: &TestDb, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, db.yaml("")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .env_remove("QS_CONFIG_PATH")
        .env_remove("QS_CLICKHOUSE_PASSWORD")
        .arg("--config")
        .arg(&path)
        .arg("optimize")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn partition_ids_are_the_ones_clickhouse_gives() {
    let db = TestDb::new("partition_ids");
    let store = migrated(&db).await;
    let p = pair("BTCUSDT");
    // Year boundaries (2020 a leap year, its 29 February), the epoch's neighbourhood of
    // Binance's first candles, and now.
    let times = [
        1_502_942_400_000, // 2017-08-17T04:00Z, Binance's first spot candle
        Y2019 - M,
        Y2019,
        Y2020 + 59 * 86_400_000, // 2020-02-29
        1_609_459_200_000 - M,   // 2020-12-31T23:59Z
        1_609_459_200_000,       // 2021-01-01
        1_735_689_600_000 - M,   // 2024-12-31T23:59Z
        1_735_689_600_000,       // 2025-01-01
        now_ms() / M * M - M,
    ];
    let rows: Vec<Kline> = times
        .iter()
        .map(|t| candle(&p, *t, 0, Source::Rest))
        .collect();
    write_phases(&db, &store, vec![rows]).await;
    let part_of: BTreeMap<String, String> = db
        .sql(&format!(
            "SELECT name, partition_id FROM system.parts WHERE database = '{}' AND table = 'klines'",
            db.name
        ))
        .lines()
        .map(|l| {
            let (n, p) = l.split_once('\t').unwrap();
            (n.to_string(), p.to_string())
        })
        .collect();
    let stored = db.sql("SELECT open_time, _part FROM klines ORDER BY open_time");
    assert_eq!(stored.lines().count(), times.len(), "{stored}");
    for line in stored.lines() {
        let (t, part) = line.split_once('\t').unwrap();
        let t: i64 = t.parse().unwrap();
        assert_eq!(
            PartitionScheme::YearOfUnixMs.partition_id(t),
            part_of[part],
            "open_time {t} (part {part})"
        );
    }
}

#[tokio::test]
async fn optimize_final_merges_the_dirty_partitions_only_and_marks_them_done() {
    let db = TestDb::new("optimize");
    let store = migrated(&db).await;
    db.sql(&format!("SYSTEM STOP MERGES `{}`.klines", db.name));
    let live = pair("BTCUSDT");
    let now = now_ms() / M * M;
    let current = PartitionScheme::YearOfUnixMs.partition_id(now);
    // Another program's rows in 2018, not through the writer: one part, never marked.
    db.sql(&format!(
        "INSERT INTO klines (market, symbol, period, open_time, close_time, open, high, low, close, \
         volume, quote_volume, trades, taker_buy_volume, taker_buy_quote_volume, is_final, source, \
         ingested_at, version) VALUES ('um', 'OLDUSDT', '1m', {JUN2018}, {}, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 'rest', 0, 1)",
        JUN2018 + M - 1
    ));
    // Plain live appends in the current year, in order, in three commits: nothing is marked.
    // 30 candles of the current year (around New Year's Eve, on the side of now that stays in it).
    let scheme = PartitionScheme::YearOfUnixMs;
    let first = if scheme.partition_id(now - 40 * M) == current {
        now - 40 * M
    } else {
        now
    };
    assert_eq!(scheme.partition_id(first + 30 * M), current);
    write_phases(
        &db,
        &store,
        vec![
            run(&live, first, 10, 0, Source::Ws),
            run(&live, first + 10 * M, 10, 0, Source::Ws),
            run(&live, first + 20 * M, 10, 0, Source::Ws),
        ],
    )
    .await;
    assert_eq!(
        dirty(&db),
        Vec::<String>::new(),
        "plain live appends mark nothing"
    );
    // Settle the current partition into one part (as background merges would), so that its
    // part names can show below that the optimize left it alone.
    db.sql(&format!("SYSTEM START MERGES `{}`.klines", db.name));
    db.sql(&format!(
        "OPTIMIZE TABLE klines PARTITION ID '{current}' FINAL"
    ));
    db.sql(&format!("SYSTEM STOP MERGES `{}`.klines", db.name));
    // Late and replaced rows, as a restarted daemon writes them: a backfill of 2019, the same
    // candles again (a rewrite: new prices, new version), and a heal into 2020.
    let hist = pair("ETHUSDT");
    write_phases(
        &db,
        &store,
        vec![
            run(&hist, Y2019, 30, 0, Source::Archive),
            run(&hist, Y2019 + 10 * M, 10, 1, Source::Rest),
            run(&hist, Y2020 + 5 * M, 1, 0, Source::Rest),
        ],
    )
    .await;
    assert_eq!(dirty(&db), vec!["2019", "2020"]);
    let dirty_listed = store.dirty_partitions(None).await.unwrap();
    assert_eq!(
        dirty_listed
            .iter()
            .map(|d| (d.table.name, d.partition_id.as_str(), d.optimized_at))
            .collect::<Vec<_>>(),
        vec![("klines", "2019", 0), ("klines", "2020", 0)]
    );
    let before = parts(&db);
    assert!(before["2019"].len() >= 2, "{before:?}");
    assert_eq!(before["2018"].len(), 1, "{before:?}");
    assert_eq!(before[&current].len(), 1, "{before:?}");
    // Duplicate versions: 40 rows stored, 30 candles.
    assert_eq!(
        common::count(
            &db,
            "SELECT count() FROM klines WHERE toYear(toDateTime(intDiv(open_time, 1000), 'UTC')) = 2019"
        ),
        40
    );
    assert_ne!(rows_of(&db, 2019, false), rows_of(&db, 2019, true));

    // A dry run lists them and changes nothing.
    let (code, out, err) = bin_optimize(&db, &["--final", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "optimize klines 2019: would run FINAL OPTIMIZE: parts {}, rows 40, bytes ",
            before["2019"].len()
        )),
        "{out}"
    );
    assert!(
        out.contains("optimize klines 2020: would run FINAL OPTIMIZE: parts 1, rows 1"),
        "{out}"
    );
    assert!(
        out.contains("optimize --dry-run: 2 partitions would get a FINAL OPTIMIZE"),
        "{out}"
    );
    assert_eq!(parts(&db), before);

    db.sql(&format!("SYSTEM START MERGES `{}`.klines", db.name));
    let (code, out, err) = bin_optimize(&db, &["--final"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("optimize klines 2019: FINAL, parts ")
            && lines[0].contains(" -> 1, rows 30, seconds=")
            && lines[0].ends_with(": done"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("optimize klines 2020: FINAL, parts 1 -> 1, rows 1, seconds=")
            && lines[1].ends_with(": done"),
        "{out}"
    );
    assert!(
        lines[2].starts_with(
            "optimize: 2 partitions, FINAL: 2 done, 0 still dirty, 0 failed, seconds="
        ),
        "{out}"
    );

    let after = parts(&db);
    // The dirty partitions are one part each, rewritten (no part of before survives) ...
    for p in ["2019", "2020"] {
        assert_eq!(after[p].len(), 1, "{p}: {after:?}");
        assert!(
            !before[p].contains(&after[p][0]),
            "{p} was not rewritten: {after:?}"
        );
    }
    // ... and read the same with and without FINAL: every duplicate is gone.
    assert_eq!(rows_of(&db, 2019, false), rows_of(&db, 2019, true));
    assert_eq!(rows_of(&db, 2019, false).lines().count(), 30);
    assert!(
        rows_of(&db, 2019, false).contains(&format!("{}", Y2019 + 10 * M)),
        "the candles survive"
    );
    // The untouched partitions are exactly as they were (single parts: no background merge
    // renames them).
    assert_eq!(after["2018"], before["2018"]);
    assert_eq!(after[&current], before[&current]);
    // Marked done, with FINAL, and no longer dirty.
    assert_eq!(dirty(&db), Vec::<String>::new());
    assert_eq!(
        db.sql(
            "SELECT partition_id, with_final FROM partition_maintenance FINAL \
             WHERE event = 'optimized' ORDER BY partition_id"
        ),
        "2019\t1\n2020\t1\n"
    );

    // Nothing left: a second run does nothing and touches nothing.
    let (code, out, err) = bin_optimize(&db, &["--final"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(
        out.trim(),
        "optimize: nothing to do (no partition received late or replaced rows since its last optimize)"
    );
    assert_eq!(parts(&db), after);

    // --all takes every partition with data, dirty or not.
    let (code, out, err) = bin_optimize(&db, &["--all", "--dry-run", "--table", "klines"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for p in ["2018", "2019", "2020", current.as_str()] {
        assert!(
            out.contains(&format!("optimize klines {p}: would run plain OPTIMIZE")),
            "{out}"
        );
    }
    assert!(out.contains("not tracked as dirty"), "{out}");

    // A table that is not tracked is refused, with the ones that are.
    let (code, out, err) = bin_optimize(&db, &["--table", "trading_pairs"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(
            "unknown table \"trading_pairs\" (tables whose partitions are tracked: klines, indicators)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_plain_optimize_merges_the_parts_and_a_dead_server_exits_1() {
    let db = TestDb::new("optimize_plain");
    let store = migrated(&db).await;
    db.sql(&format!("SYSTEM STOP MERGES `{}`.klines", db.name));
    let hist = pair("ETHUSDT");
    write_phases(
        &db,
        &store,
        vec![
            run(&hist, Y2019, 5, 0, Source::Archive),
            run(&hist, Y2019, 5, 1, Source::Rest),
        ],
    )
    .await;
    assert_eq!(dirty(&db), vec!["2019"]);
    db.sql(&format!("SYSTEM START MERGES `{}`.klines", db.name));
    let (code, out, err) = bin_optimize(&db, &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("optimize klines 2019: plain, parts 2 -> 1, rows 5, seconds=")
            && out.contains(": done"),
        "{out}"
    );
    assert_eq!(rows_of(&db, 2019, false), rows_of(&db, 2019, true));
    assert_eq!(dirty(&db), Vec::<String>::new());

    // ClickHouse unreachable: exit 1 with the reason.
    let dead = common::dead_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(
        &path,
        format!("app:\n  clickhouse:\n    host: 127.0.0.1\n    port: {dead}\n    timeout: 2s\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quantservice"))
        .env_remove("QS_CONFIG_PATH")
        .args(["--config", path.to_str().unwrap(), "optimize", "--final"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: ") && err.contains("unreachable"),
        "{err}"
    );
}

#[tokio::test]
async fn a_mark_newer_than_the_optimize_start_keeps_the_partition_dirty() {
    let db = TestDb::new("optimize_race");
    let store = migrated(&db).await;
    let hist = pair("ETHUSDT");
    write_phases(&db, &store, vec![run(&hist, Y2019, 5, 0, Source::Rest)]).await;
    assert_eq!(dirty(&db), vec!["2019"]);

    // What the pass does for one partition, with late rows committed between its start and
    // its end: they are marked after the start, so the partition stays dirty.
    let started_at = store.server_now().await.unwrap();
    write_phases(
        &db,
        &store,
        vec![run(&hist, Y2019 + 5 * M, 5, 0, Source::Rest)],
    )
    .await;
    store
        .optimize_partition(&KLINES, "2019", true, Duration::from_secs(60))
        .await
        .unwrap();
    store
        .record_optimized(&KLINES, "2019", started_at, true, 1)
        .await
        .unwrap();
    assert_eq!(dirty(&db), vec!["2019"], "late rows arrived while it ran");

    // Once the server's clock has moved past the last mark, an optimize covers it.
    let marked: u32 = db
        .sql("SELECT toUInt32(max(event_time)) FROM partition_maintenance WHERE event = 'dirty'")
        .trim()
        .parse()
        .unwrap();
    wait_for(10, "the server clock past the mark", || async {
        store.server_now().await.unwrap() > marked
    })
    .await;
    let (code, out, err) = bin_optimize(&db, &["--final"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("optimize klines 2019: FINAL, parts 1 -> 1, rows 10"),
        "{out}"
    );
    assert_eq!(dirty(&db), Vec::<String>::new());
}

/// The daemon in-process on `yaml`, with its reload outcomes.
struct Daemon {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    reloads: Reloads,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(yaml: &str) -> Daemon {
        let (dir, path, cfg) = common::write_config(yaml);
        let shutdown = CancellationToken::new();
        let reloads = Reloads::new();
        let task = tokio::spawn(quantservice::app::run_daemon(
            cfg,
            path.clone(),
            reloads.clone(),
            shutdown.clone(),
        ));
        Daemon {
            shutdown,
            task,
            reloads,
            path,
            _dir: dir,
        }
    }

    async fn edit(&self, yaml: &str) -> ReloadResult {
        let seq = self.reloads.latest().seq;
        let tmp = self.path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.reloads.next_after(seq))
            .await
            .expect("no reload outcome within 30 s")
            .expect("the daemon stopped publishing outcomes")
            .result
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("daemon stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

fn task_row(db: &TestDb) -> String {
    db.try_sql("SELECT state, last_error FROM task_status FINAL WHERE task = 'maintenance'")
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_schedules_optimize_reloads_the_schedule_and_survives_a_failing_partition() {
    let db = TestDb::new("optimize_daemon");
    let store = migrated(&db).await;
    let dead = common::dead_port();
    let base = |maintenance: &str| {
        db.yaml(&format!(
            "  binance:\n    spot:\n      rest_url: \"http://127.0.0.1:{dead}/api/v3/klines\"\n    um:\n      rest_url: \"http://127.0.0.1:{dead}/fapi/v1/klines\"\n    cm:\n      rest_url: \"http://127.0.0.1:{dead}/dapi/v1/klines\"\n  operator:\n    poll_interval: 200ms\n  maintenance:\n{maintenance}"
        ))
    };
    // Disabled at first: dirty partitions wait.
    let d = Daemon::start(&base("    optimize: \"\"\n"));
    wait_for(30, "maintenance shown disabled", || async {
        task_row(&db).starts_with("disabled\t")
    })
    .await;
    let hist = pair("ETHUSDT");
    write_phases(
        &db,
        &store,
        vec![
            run(&hist, Y2019, 5, 0, Source::Archive),
            run(&hist, Y2019, 5, 1, Source::Rest),
        ],
    )
    .await;
    // A mark the pass cannot act on (a partition ID ClickHouse never gives), left by someone
    // else: it fails every pass and must not stop the others.
    db.sql("INSERT INTO partition_maintenance (table_name, partition_id, event) VALUES ('klines', 'bad id', 'dirty')");
    assert_eq!(dirty(&db), vec!["2019", "bad id"]);

    // Enabled by an edit, every second: the daemon optimizes 2019 without a restart.
    let outcome = d
        .edit(&base("    optimize: \"* * * * * *\"\n    timeout: 30s\n"))
        .await;
    assert!(
        matches!(&outcome, ReloadResult::Applied { changed } if changed.contains(&"maintenance".to_string())),
        "{outcome:?}"
    );
    wait_for(60, "2019 optimized by the schedule", || async {
        dirty(&db) == vec!["bad id"]
    })
    .await;
    assert_eq!(parts(&db)["2019"].len(), 1);
    assert_eq!(rows_of(&db, 2019, false), rows_of(&db, 2019, true));
    // The failure is in task_status, the service still running (retried next time).
    wait_for(30, "the failed partition reported", || async {
        let row = task_row(&db);
        row.starts_with("running\t") && row.contains("klines bad id: bad partition ID")
    })
    .await;
    // Retried at the next times, never fatal: a new dirty partition is still taken.
    write_phases(&db, &store, vec![run(&hist, Y2020, 3, 0, Source::Rest)]).await;
    wait_for(60, "2020 optimized by a later pass", || async {
        dirty(&db) == vec!["bad id"]
            && db
                .try_sql("SELECT count() FROM partition_maintenance FINAL WHERE event = 'optimized' AND partition_id = '2020'")
                .is_ok_and(|s| s.trim() == "1")
    })
    .await;
    assert!(!d.task.is_finished(), "the daemon keeps running");
    d.stop().await;
}

#[test]
fn the_maintenance_section_loads_with_defaults_and_validates() {
    let cfg = |extra: &str| {
        Config::from_yaml_with_env(
            &format!("app:\n{extra}"),
            std::path::Path::new("t.yaml"),
            |_| None,
        )
    };
    let d = cfg("").unwrap().maintenance;
    assert_eq!(
        (d.optimize.as_str(), d.use_final, d.timeout),
        ("0 30 3 * * *", true, Duration::from_secs(3600))
    );
    let off = cfg("  maintenance:\n    optimize: \"\"\n    final: false\n    timeout: 10m\n")
        .unwrap()
        .maintenance;
    assert_eq!(
        (off.optimize.as_str(), off.use_final, off.timeout),
        ("", false, Duration::from_secs(600))
    );
    // The commented section of config/app.yaml, uncommented, says the defaults.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/app.yaml"),
    )
    .unwrap();
    let section: String = shipped
        .lines()
        .skip_while(|l| !l.starts_with("  # maintenance:"))
        .take_while(|l| l.starts_with("  #"))
        .map(|l| format!("{}\n", l.replacen("  # ", "  ", 1)))
        .collect();
    assert!(section.contains("optimize:"), "{section}");
    assert_eq!(cfg(&section).unwrap().maintenance, d);
    // --check-config prints the section.
    assert!(
        cfg("").unwrap().redacted_yaml().contains(
            "  maintenance:\n    optimize: 0 30 3 * * *\n    final: true\n    timeout: 1h\n"
        ),
        "{}",
        cfg("").unwrap().redacted_yaml()
    );
    let err = cfg("  maintenance:\n    optimize: \"30 3 * * *\"\n    finall: true\n")
        .unwrap_err()
        .problems();
    assert_eq!(err.len(), 2, "{err:?}");
    assert!(
        err[0].starts_with("app.maintenance.optimize: expected six fields"),
        "{err:?}"
    );
    assert!(
        err[1].starts_with("app.maintenance.finall: unknown key"),
        "{err:?}"
    );
}
