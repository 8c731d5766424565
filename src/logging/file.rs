//! `DIR/quantservice.log`: the thread that owns it, fed through a bounded queue (no line is
//! dropped: a full queue makes loggers wait), and its rotation — between whole lines, before a
//! line would take it past `max_size` and at midnight UTC by an injected [`Clock`] — into
//! `DIR/archived/` (names, compression and retention are `archive`'s).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qs_core::time::{day_label, DAY_MS};
use tracing_subscriber::fmt::MakeWriter;

use super::archive::{self, ArchiveName, Archiver, Job, Stage, STEM};

/// Events queued for the file before loggers wait.
const QUEUE: usize = 8192;
/// After a failed rotation, the next attempt waits this long (the lines keep going to the
/// current file meanwhile).
const RETRY_MS: i64 = 60_000;
/// The writer thread looks at the clock at least this often (midnight without a line).
const MAX_IDLE: Duration = Duration::from_secs(60);
/// At shutdown, how long queued compressions may take before they are left for the next start.
const ARCHIVE_WAIT: Duration = Duration::from_secs(5);
/// At shutdown, how long the queued lines and compressions may take in all.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

/// The time rotation goes by, injected so tests can cross midnight without waiting.
pub trait Clock: Send + Sync {
    /// Now, in Unix milliseconds UTC.
    fn now_ms(&self) -> i64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        qs_core::time::now_ms()
    }
}

/// `max_size` and `keep_days`, shared with the writer thread so a config reload applies them
/// to the running file.
#[derive(Clone, Debug)]
pub struct FileLimits {
    max_size: Arc<AtomicU64>,
    keep_days: Arc<AtomicU32>,
}

impl FileLimits {
    pub fn new(max_size: u64, keep_days: u32) -> FileLimits {
        FileLimits {
            max_size: Arc::new(AtomicU64::new(max_size)),
            keep_days: Arc::new(AtomicU32::new(keep_days)),
        }
    }

    pub fn set(&self, max_size: u64, keep_days: u32) {
        self.max_size.store(max_size, Ordering::Relaxed);
        self.keep_days.store(keep_days, Ordering::Relaxed);
    }

    fn max_size(&self) -> u64 {
        self.max_size.load(Ordering::Relaxed)
    }

    fn keep_days(&self) -> u32 {
        self.keep_days.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("cannot create log directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot list log archive directory {path}: {source}")]
    ReadArchived { path: PathBuf, source: io::Error },
    #[error("cannot open log file {path} for appending: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write log file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot rotate log file {from} to {to}: {source}")]
    Rotate {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("cannot start the log file threads: {0}")]
    Thread(io::Error),
    /// Another process (a running daemon, when a command is run by hand) owns the directory:
    /// two processes rotating one file would lose each other's lines.
    #[error("log directory {dir} is in use by another quantservice process")]
    InUse { dir: PathBuf },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// The UTC day (days since 1970-01-01) of `ms`.
fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

fn label(day: i64) -> String {
    day_label(day.saturating_mul(DAY_MS))
}

/// `quantservice.log` and its rotation. Every `write_event` is one whole event (one or more
/// whole lines); rotation happens only between them.
pub struct RotatingFile {
    /// `DIR/quantservice.lock`, locked while this value lives (the lock goes with the process).
    _lock: File,
    path: PathBuf,
    archived: PathBuf,
    file: File,
    /// Bytes in the file.
    size: u64,
    /// The UTC day the file's lines were written.
    day: i64,
    /// The last byte written was not a newline (a caller split an event): no rotation until
    /// the line is complete.
    open_line: bool,
    clock: Arc<dyn Clock>,
    limits: FileLimits,
    /// The `keep_days` of the last prune; a different live value prunes again.
    pruned_with: u32,
    /// The highest archive number used per day (absent: none yet).
    highest: BTreeMap<String, u32>,
    archiver: Archiver,
    /// No rotation attempt before this (ms) after one failed.
    retry_at: i64,
}

impl RotatingFile {
    /// Creates `dir` and `dir/archived`, takes the directory's lock (`dir/quantservice.lock`:
    /// one process at a time rotates the file; [`LogFileError::InUse`] when another holds it),
    /// opens `dir/quantservice.log` for appending, finishes what a previous process left half
    /// archived, deletes archives older than `keep_days`, and rotates at once if the file holds
    /// lines of an earlier day (by its mtime: the day of its last line, and so of all of them,
    /// since each day's first line rotates).
    pub fn open(
        dir: &Path,
        limits: FileLimits,
        clock: Arc<dyn Clock>,
    ) -> Result<RotatingFile, LogFileError> {
        let create = |path: &Path| {
            fs::create_dir_all(path).map_err(|source| LogFileError::CreateDir {
                path: path.to_path_buf(),
                source,
            })
        };
        create(dir)?;
        let lock = lock_dir(dir)?;
        let archived = dir.join("archived");
        create(&archived)?;
        let path = dir.join(format!("{STEM}.log"));
        let open_err = |source| LogFileError::Open {
            path: path.clone(),
            source,
        };
        let mut file = open_append(&path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let mut size = meta.len();
        if size > 0 && last_byte(&mut file).map_err(open_err)? != b'\n' {
            // A line cut short (a crash while writing, a full disk): closed, so that the next
            // line starts whole.
            file.write_all(b"\n")
                .map_err(|source| LogFileError::Write {
                    path: path.clone(),
                    source,
                })?;
            size += 1;
        }
        let (highest, staged) =
            archive::scan(&archived).map_err(|source| LogFileError::ReadArchived {
                path: archived.clone(),
                source,
            })?;
        let now = clock.now_ms();
        let day = match meta.modified().ok().and_then(|m| {
            m.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| i64::try_from(d.as_millis()).ok())
        }) {
            Some(mtime) if size > 0 => day_of(mtime),
            _ => day_of(now),
        };
        let archiver = Archiver::start(archived.clone()).map_err(LogFileError::Thread)?;
        for s in staged {
            archiver.submit(Job::Compress(s));
        }
        let pruned_with = limits.keep_days();
        let mut f = RotatingFile {
            _lock: lock,
            path,
            archived,
            file,
            size,
            day,
            open_line: false,
            clock,
            limits,
            pruned_with,
            highest,
            archiver,
            retry_at: i64::MIN,
        };
        f.prune(day_of(now));
        f.check(now, 0)?;
        Ok(f)
    }

    /// Appends one event, rotating first if it is due.
    pub fn write_event(&mut self, buf: &[u8]) -> Result<(), LogFileError> {
        let now = self.clock.now_ms();
        let rotated = self.check(now, buf.len() as u64);
        let written = self.append(buf);
        rotated.and(written)
    }

    /// Rotates if midnight has passed since the file's lines were written (no line needed).
    pub fn tick(&mut self) -> Result<(), LogFileError> {
        let now = self.clock.now_ms();
        self.check(now, 0)
    }

    /// How long the writer thread may wait for a line before it calls [`tick`](Self::tick).
    pub fn until_next_check(&self) -> Duration {
        let now = self.clock.now_ms();
        let to_midnight = (day_of(now) + 1) * DAY_MS - now;
        Duration::from_millis(u64::try_from(to_midnight).unwrap_or(1).max(1)).min(MAX_IDLE)
    }

    /// Lets the archiver finish its queued work, waiting at most `wait`.
    pub fn close(mut self, wait: Duration) -> bool {
        let _ = self.file.flush();
        self.archiver.finish(wait)
    }

    fn append(&mut self, buf: &[u8]) -> Result<(), LogFileError> {
        if buf.is_empty() {
            return Ok(());
        }
        match self.file.write_all(buf) {
            Ok(()) => {
                self.size += buf.len() as u64;
                self.open_line = buf.last() != Some(&b'\n');
                Ok(())
            }
            Err(source) => {
                // Part of the event may be in the file (a full disk): cut it off, so the file
                // keeps whole lines.
                let _ = self.file.set_len(self.size);
                Err(LogFileError::Write {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Rotates when the file has lines and either their day is over or `incoming` more bytes
    /// would take it past `max_size`. Also prunes again after a live `keep_days` change.
    fn check(&mut self, now: i64, incoming: u64) -> Result<(), LogFileError> {
        let today = day_of(now);
        if self.limits.keep_days() != self.pruned_with {
            self.prune(today);
        }
        if self.size == 0 {
            self.day = today;
            return Ok(());
        }
        let due = today != self.day || self.size.saturating_add(incoming) > self.limits.max_size();
        if !due || self.open_line || now < self.retry_at {
            return Ok(());
        }
        match self.rotate(today) {
            Ok(()) => {
                self.retry_at = i64::MIN;
                self.prune(today);
                Ok(())
            }
            Err(e) => {
                self.retry_at = now.saturating_add(RETRY_MS);
                Err(e)
            }
        }
    }

    /// Renames the file to the next free staged archive name of its day, starts a new file
    /// and hands the staged one to the archiver.
    fn rotate(&mut self, today: i64) -> Result<(), LogFileError> {
        let day = label(self.day);
        let mut name = ArchiveName {
            n: self.highest.get(&day).map_or(0, |h| h + 1),
            day,
        };
        // Never overwrite: skip a number something else took.
        while [Stage::Staged, Stage::Partial, Stage::Done]
            .iter()
            .any(|s| self.archived.join(name.file_name(*s)).exists())
        {
            name.n += 1;
        }
        let staged = self.archived.join(name.file_name(Stage::Staged));
        fs::rename(&self.path, &staged).map_err(|source| LogFileError::Rotate {
            from: self.path.clone(),
            to: staged.clone(),
            source,
        })?;
        match open_append(&self.path) {
            Ok(f) => self.file = f,
            Err(source) => {
                // Keep writing to the old file under its old name rather than into an
                // archive being compressed.
                let _ = fs::rename(&staged, &self.path);
                return Err(LogFileError::Open {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        self.highest.insert(name.day, name.n);
        self.size = 0;
        self.day = today;
        self.archiver.submit(Job::Compress(staged));
        Ok(())
    }

    /// Queues the deletion of archives whose day is more than `keep_days` before `today`.
    fn prune(&mut self, today: i64) {
        let keep = self.limits.keep_days();
        self.pruned_with = keep;
        let before = label(today - i64::from(keep));
        self.highest.retain(|day, _| *day >= before);
        self.archiver.submit(Job::Prune { before });
    }
}

/// `File::try_lock` is Rust 1.89, above the workspace's `rust-version` (1.85); zip 9 and
/// clickhouse 0.15 already need 1.89 to build, so the build floor is 1.89 in fact.
#[allow(clippy::incompatible_msrv)]
fn lock_dir(dir: &Path) -> Result<File, LogFileError> {
    let path = dir.join(format!("{STEM}.lock"));
    let lock_err = |source| LogFileError::Lock {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(LOG_FILE_MODE)
        .open(&path)
        .map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(LogFileError::InUse {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(lock_err(e)),
    }
}

/// Log files and archives are `rw-r-----` (the umask may narrow it further): logs can hold
/// symbols, pairs and addresses an operator may not want world-readable, whatever the umask of
/// the service manager (Supervisor's is 022).
pub(crate) const LOG_FILE_MODE: u32 = 0o640;

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(LOG_FILE_MODE)
        .open(path)
}

fn last_byte(file: &mut File) -> io::Result<u8> {
    let mut b = [0u8];
    file.seek(SeekFrom::End(-1))?;
    file.read_exact(&mut b)?;
    Ok(b[0])
}

enum Msg {
    Line(Vec<u8>),
    Shutdown,
}

/// The file log's `MakeWriter`: each write (tracing-subscriber writes one formatted event per
/// call) is queued whole for the writer thread. When the queue is full the caller waits.
#[derive(Clone)]
pub struct FileLog {
    tx: SyncSender<Msg>,
}

/// Stops the writer thread when dropped, after every line queued before is in the file and
/// the archiver has finished (each bounded, see `SHUTDOWN_WAIT`).
pub struct FileGuard {
    tx: SyncSender<Msg>,
    done: Receiver<()>,
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        if self.tx.send(Msg::Shutdown).is_ok() {
            let _ = self.done.recv_timeout(SHUTDOWN_WAIT);
        }
    }
}

/// Opens the file (errors here are the start-up errors: an unwritable directory, ...) and
/// starts its writer thread.
pub fn spawn(
    dir: &Path,
    limits: FileLimits,
    clock: Arc<dyn Clock>,
) -> Result<(FileLog, FileGuard), LogFileError> {
    let file = RotatingFile::open(dir, limits, clock)?;
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let (done_tx, done) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("log-file".into())
        .spawn(move || {
            run(file, rx);
            let _ = done_tx.send(());
        })
        .map_err(LogFileError::Thread)?;
    Ok((FileLog { tx: tx.clone() }, FileGuard { tx, done }))
}

fn run(mut file: RotatingFile, rx: Receiver<Msg>) {
    let mut errors = ErrorReport::default();
    loop {
        let result = match rx.recv_timeout(file.until_next_check()) {
            Ok(Msg::Line(buf)) => file.write_event(&buf),
            Err(RecvTimeoutError::Timeout) => file.tick(),
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Err(e) = result {
            errors.report(&e);
        }
    }
    file.close(ARCHIVE_WAIT);
}

/// File errors go to stderr (the journal): the first at once, then at most one a minute with
/// the count of those not shown. Logging them through tracing would feed them back here.
#[derive(Default)]
struct ErrorReport {
    last: Option<Instant>,
    unshown: u64,
}

impl ErrorReport {
    fn report(&mut self, e: &LogFileError) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            self.unshown += 1;
            return;
        }
        let more = match std::mem::take(&mut self.unshown) {
            0 => String::new(),
            n => format!(" ({n} more log file errors since the last one shown)"),
        };
        eprintln!("quantservice: {e}; the lines still go to stdout{more}");
        self.last = Some(Instant::now());
    }
}

impl<'a> MakeWriter<'a> for FileLog {
    type Writer = LineSender<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LineSender { tx: &self.tx }
    }
}

pub struct LineSender<'a> {
    tx: &'a SyncSender<Msg>,
}

impl Write for LineSender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .send(Msg::Line(buf.to_vec()))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the log file is closed"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::AtomicI64;

    /// 2024-05-10T00:00:00Z.
    const MAY10: i64 = 1_715_299_200_000;
    const HOUR: i64 = 3_600_000;

    struct FakeClock(AtomicI64);

    impl FakeClock {
        fn at(ms: i64) -> Arc<FakeClock> {
            Arc::new(FakeClock(AtomicI64::new(ms)))
        }
        fn set(&self, ms: i64) {
            self.0.store(ms, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn open(dir: &Path, max_size: u64, keep_days: u32, clock: &Arc<FakeClock>) -> RotatingFile {
        RotatingFile::open(dir, FileLimits::new(max_size, keep_days), clock.clone()).unwrap()
    }

    fn close(f: RotatingFile) {
        assert!(
            f.close(Duration::from_secs(30)),
            "the archiver did not finish"
        );
    }

    /// Sets a file's mtime, as if it was last written at `ms` (the fake clock's time).
    fn touch(path: &Path, ms: i64) {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// Every file in `archived/` that is an archive, oldest first.
    fn archives(dir: &Path) -> Vec<(ArchiveName, Stage, PathBuf)> {
        let mut out: Vec<_> = fs::read_dir(dir.join("archived"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter_map(|e| {
                let (n, s) = ArchiveName::parse(e.file_name().to_str()?)?;
                Some((n, s, e.path()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn names(dir: &Path) -> Vec<String> {
        archives(dir)
            .iter()
            .map(|(n, s, _)| n.file_name(*s))
            .collect()
    }

    fn gunzip(path: &Path) -> String {
        let mut out = String::new();
        flate2::read::GzDecoder::new(File::open(path).unwrap())
            .read_to_string(&mut out)
            .unwrap();
        out
    }

    fn current(dir: &Path) -> String {
        fs::read_to_string(dir.join("quantservice.log")).unwrap()
    }

    /// The archives' lines, oldest first, then the live file's: what was logged, if nothing
    /// was lost, split or reordered. Every archive must be compressed and end with a newline.
    fn everything(dir: &Path) -> String {
        let mut all = String::new();
        for (name, stage, path) in archives(dir) {
            assert_eq!(stage, Stage::Done, "{} left uncompressed", path.display());
            let text = gunzip(&path);
            assert!(text.ends_with('\n'), "{name:?} ends mid-line: {text:?}");
            all.push_str(&text);
        }
        all + &current(dir)
    }

    #[test]
    fn size_rotation_keeps_whole_lines_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("logs");
        let clock = FakeClock::at(MAY10 + 12 * HOUR);
        let mut f = open(&dir, 300, 7, &clock);
        let mut expected = String::new();
        let big = format!("big {}\n", "y".repeat(500));
        for i in 0..200 {
            let line = if i == 100 {
                big.clone()
            } else {
                format!("line {i:04} {}\n", "x".repeat(i % 37))
            };
            f.write_event(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        close(f);
        assert_eq!(everything(&dir), expected);
        let list = archives(&dir);
        assert!(list.len() > 10, "{:?}", names(&dir));
        for (i, (name, _, path)) in list.iter().enumerate() {
            // Numbered in order within the day: none, .1, .2, ...
            assert_eq!((name.day.as_str(), name.n), ("2024-05-10", i as u32));
            let text = gunzip(path);
            assert!(
                text.len() <= 300 || text == big,
                "{} holds {} bytes",
                path.display(),
                text.len()
            );
        }
        // The line longer than max_size went alone into its file.
        assert!(list.iter().any(|(_, _, p)| gunzip(p) == big));
        assert!(
            names(&dir)[..3]
                == [
                    "quantservice-2024-05-10.log.gz",
                    "quantservice-2024-05-10.1.log.gz",
                    "quantservice-2024-05-10.2.log.gz"
                ]
        );
    }

    #[test]
    fn midnight_rotation_names_the_archive_with_the_previous_day() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let clock = FakeClock::at(MAY10 + DAY_MS - 1000);
        let mut f = open(dir, 1 << 20, 7, &clock);
        f.write_event(b"on the 10th\n").unwrap();
        // Just before midnight nothing happens.
        f.tick().unwrap();
        assert!(archives(dir).is_empty());
        // Midnight passes without a line: the writer thread's tick rotates.
        clock.set(MAY10 + DAY_MS + 500);
        f.tick().unwrap();
        f.write_event(b"on the 11th\n").unwrap();
        // The next day's first line rotates by itself too.
        clock.set(MAY10 + 2 * DAY_MS + 1);
        f.write_event(b"on the 12th\n").unwrap();
        // A day without lines leaves no (empty) archive.
        clock.set(MAY10 + 5 * DAY_MS);
        f.tick().unwrap();
        close(f);
        assert_eq!(
            names(dir),
            [
                "quantservice-2024-05-10.log.gz",
                "quantservice-2024-05-11.log.gz",
                "quantservice-2024-05-12.log.gz"
            ]
        );
        let texts: Vec<String> = archives(dir).iter().map(|a| gunzip(&a.2)).collect();
        assert_eq!(texts, ["on the 10th\n", "on the 11th\n", "on the 12th\n"]);
        assert_eq!(current(dir), "");
    }

    #[test]
    fn a_restart_appends_and_numbers_continue_without_overwriting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let clock = FakeClock::at(MAY10 + 9 * HOUR);
        let mut expected = String::new();
        let mut f = open(dir, 100, 7, &clock);
        for i in 0..12 {
            let line = format!("first run {i:02} ........\n");
            f.write_event(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        close(f);
        let first = names(dir);
        assert_eq!(first.len(), 2, "{first:?}");
        let before = current(dir);
        assert!(!before.is_empty());
        touch(&dir.join("quantservice.log"), clock.now_ms());

        clock.set(MAY10 + 10 * HOUR);
        let mut f = open(dir, 100, 7, &clock);
        // Appended to, not rotated at start.
        assert_eq!(names(dir), first);
        f.write_event(b"second run\n").unwrap();
        expected.push_str("second run\n");
        assert_eq!(current(dir), before + "second run\n");
        for i in 0..12 {
            let line = format!("second run {i:02} .......\n");
            f.write_event(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        close(f);
        assert_eq!(everything(dir), expected);
        let all = names(dir);
        assert_eq!(&all[..2], &first[..]);
        assert_eq!(
            all[2..4],
            [
                "quantservice-2024-05-10.2.log.gz",
                "quantservice-2024-05-10.3.log.gz"
            ]
        );
    }

    #[test]
    fn a_cut_line_is_closed_and_an_old_file_is_archived_under_its_day_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("quantservice.log"), "whole\ncut sho").unwrap();
        touch(&dir.join("quantservice.log"), MAY10 + 20 * HOUR);
        let clock = FakeClock::at(MAY10 + 2 * DAY_MS + HOUR);
        let mut f = open(dir, 1 << 20, 7, &clock);
        f.write_event(b"today\n").unwrap();
        close(f);
        assert_eq!(names(dir), ["quantservice-2024-05-10.log.gz"]);
        assert_eq!(gunzip(&archives(dir)[0].2), "whole\ncut sho\n");
        assert_eq!(current(dir), "today\n");
    }

    #[test]
    fn old_archives_are_deleted_by_the_day_in_their_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let archived = dir.join("archived");
        fs::create_dir_all(&archived).unwrap();
        // Archives of 2024-05-08 .. 2024-05-19, all just written (mtime: now, real time).
        for d in 8..=19 {
            let name = ArchiveName {
                day: format!("2024-05-{d:02}"),
                n: 0,
            };
            let gz = archived.join(name.file_name(Stage::Done));
            let mut enc = flate2::write::GzEncoder::new(
                File::create(&gz).unwrap(),
                flate2::Compression::default(),
            );
            enc.write_all(format!("day {d}\n").as_bytes()).unwrap();
            enc.finish().unwrap();
        }
        // A recent archive with an ancient mtime (restored from a backup) stays.
        touch(&archived.join("quantservice-2024-05-19.log.gz"), 0);
        // An old one a crash left uncompressed goes too; other files stay.
        fs::write(archived.join("quantservice-2024-05-01.1.log"), "old\n").unwrap();
        fs::write(archived.join("notes.txt"), "mine\n").unwrap();
        fs::write(archived.join("quantservice-latest.log.gz"), "mine\n").unwrap();

        // Today 2024-05-20, keep_days 7: the 13th and later stay.
        let clock = FakeClock::at(MAY10 + 10 * DAY_MS + HOUR);
        let limits = FileLimits::new(1 << 20, 7);
        let mut f = RotatingFile::open(dir, limits.clone(), clock.clone()).unwrap();
        f.write_event(b"a line\n").unwrap();
        let days =
            |dir: &Path| -> Vec<String> { archives(dir).into_iter().map(|a| a.0.day).collect() };
        // Wait for the archiver (it works in order) by closing and reopening.
        close(f);
        assert_eq!(
            days(dir),
            (13..=19)
                .map(|d| format!("2024-05-{d:02}"))
                .collect::<Vec<_>>()
        );
        assert!(archived.join("notes.txt").exists());
        assert!(archived.join("quantservice-latest.log.gz").exists());

        // A live change of keep_days applies at the next line.
        touch(&dir.join("quantservice.log"), clock.now_ms());
        let mut f = RotatingFile::open(dir, limits.clone(), clock.clone()).unwrap();
        limits.set(1 << 20, 2);
        f.write_event(b"another\n").unwrap();
        close(f);
        assert_eq!(days(dir), ["2024-05-18", "2024-05-19"]);
        assert_eq!(current(dir), "a line\nanother\n");
    }

    #[test]
    fn a_max_size_change_applies_to_the_running_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let clock = FakeClock::at(MAY10);
        let limits = FileLimits::new(10 * 1024, 7);
        let mut f = RotatingFile::open(dir, limits.clone(), clock.clone()).unwrap();
        for _ in 0..10 {
            f.write_event(&[b'z'; 99].iter().chain(b"\n").copied().collect::<Vec<_>>())
                .unwrap();
        }
        assert!(archives(dir).is_empty());
        limits.set(500, 7);
        f.write_event(b"now too big\n").unwrap();
        close(f);
        assert_eq!(names(dir), ["quantservice-2024-05-10.log.gz"]);
        assert_eq!(current(dir), "now too big\n");
    }

    #[test]
    fn what_a_crash_left_half_archived_is_finished_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let archived = dir.join("archived");
        fs::create_dir_all(&archived).unwrap();
        // Renamed but not compressed.
        fs::write(archived.join("quantservice-2024-05-10.log"), "s1\n").unwrap();
        // Compression interrupted: a partial .tmp next to its staged file.
        fs::write(archived.join("quantservice-2024-05-10.1.log"), "s2\n").unwrap();
        fs::write(
            archived.join("quantservice-2024-05-10.1.log.gz.tmp"),
            b"\x1f\x8b",
        )
        .unwrap();
        // Compressed and renamed, the staged file not yet deleted.
        fs::write(archived.join("quantservice-2024-05-10.2.log"), "s3\n").unwrap();
        let mut enc = flate2::write::GzEncoder::new(
            File::create(archived.join("quantservice-2024-05-10.2.log.gz")).unwrap(),
            flate2::Compression::default(),
        );
        enc.write_all(b"s3\n").unwrap();
        enc.finish().unwrap();

        let clock = FakeClock::at(MAY10 + HOUR);
        let mut f = open(dir, 10, 7, &clock);
        f.write_event(b"live 1\n").unwrap();
        f.write_event(b"live 2\n").unwrap();
        close(f);
        assert_eq!(
            names(dir),
            [
                "quantservice-2024-05-10.log.gz",
                "quantservice-2024-05-10.1.log.gz",
                "quantservice-2024-05-10.2.log.gz",
                "quantservice-2024-05-10.3.log.gz"
            ]
        );
        assert_eq!(everything(dir), "s1\ns2\ns3\nlive 1\nlive 2\n");
    }

    #[test]
    fn an_unusable_directory_is_a_clear_error_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = FakeClock::at(MAY10);
        let file = tmp.path().join("a-file");
        fs::write(&file, "").unwrap();
        let limits = FileLimits::new(1024, 7);
        let err = RotatingFile::open(&file, limits.clone(), clock.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!("cannot create log directory {}: ", file.display())),
            "{err}"
        );
        let dir = tmp.path().join("logs");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("archived"), "").unwrap();
        let err = RotatingFile::open(&dir, limits.clone(), clock.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&dir.join("archived").display().to_string()),
            "{err}"
        );
        fs::remove_file(dir.join("archived")).unwrap();
        fs::create_dir(dir.join("quantservice.log")).unwrap();
        let err = RotatingFile::open(&dir, limits, clock.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "cannot open log file {} for appending: ",
                dir.join("quantservice.log").display()
            )),
            "{err}"
        );
    }

    #[test]
    fn one_process_at_a_time_owns_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = FakeClock::at(MAY10);
        let first = open(tmp.path(), 1024, 7, &clock);
        let second = RotatingFile::open(tmp.path(), FileLimits::new(1024, 7), clock.clone());
        assert!(
            matches!(&second, Err(LogFileError::InUse { dir }) if dir == tmp.path()),
            "{:?}",
            second.err()
        );
        close(first);
        close(open(tmp.path(), 1024, 7, &clock));
    }

    #[test]
    fn the_writer_thread_loses_no_line_and_flushes_on_shutdown() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let clock = FakeClock::at(MAY10 + HOUR);
        let (log, guard) = spawn(dir, FileLimits::new(2048, 7), clock.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let line = format!("thread {t} line {i:05}\n");
                        log.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let all = everything(dir);
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 8000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let want: Vec<String> = (0..2000)
                .map(|i| format!("thread {t} line {i:05}"))
                .collect();
            assert_eq!(mine, want, "thread {t}: lost, split or reordered lines");
        }
        assert!(archives(dir).len() > 50);
    }
}
