//! The archives of `quantservice.log` in `DIR/archived/`: their names
//! (`quantservice-YYYY-MM-DD[.N].log.gz`), gzip compression on a background thread, the
//! recovery of what a crash left half done, and retention by the day in the name.
//!
//! An archive goes through three names, so that a crash at any point loses nothing: the
//! rotated file is renamed to `….log` (staged), compressed to `….log.gz.tmp`, synced, renamed
//! to `….log.gz`, and only then is the staged file deleted. At start, staged files are
//! compressed again and a `.tmp` next to its staged file is discarded.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;

/// The stem of the live file and of every archive name.
pub(super) const STEM: &str = "quantservice";

/// Where an archive file is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `….log`: rotated, not compressed yet.
    Staged,
    /// `….log.gz.tmp`: being compressed (incomplete until renamed).
    Partial,
    /// `….log.gz`: the archive.
    Done,
}

/// An archive's identity: the UTC day its lines were written (`YYYY-MM-DD`) and its number
/// within that day (0 for the first, which has no `.N`; 1 for the second, ...). Orders
/// chronologically (four-digit years compare as text).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArchiveName {
    pub day: String,
    pub n: u32,
}

impl ArchiveName {
    /// `quantservice-2024-05-10.log.gz`, `quantservice-2024-05-10.2.log.gz`, ...
    pub fn file_name(&self, stage: Stage) -> String {
        let n = if self.n == 0 {
            String::new()
        } else {
            format!(".{}", self.n)
        };
        let ext = match stage {
            Stage::Staged => "log",
            Stage::Partial => "log.gz.tmp",
            Stage::Done => "log.gz",
        };
        format!("{STEM}-{}{n}.{ext}", self.day)
    }

    /// The archive a file name belongs to, or `None` for any other file (left alone).
    pub fn parse(file_name: &str) -> Option<(ArchiveName, Stage)> {
        let rest = file_name.strip_prefix(STEM)?.strip_prefix('-')?;
        let (base, stage) = if let Some(b) = rest.strip_suffix(".log.gz.tmp") {
            (b, Stage::Partial)
        } else if let Some(b) = rest.strip_suffix(".log.gz") {
            (b, Stage::Done)
        } else {
            (rest.strip_suffix(".log")?, Stage::Staged)
        };
        let day = base.get(..10).filter(|d| is_day(d))?;
        let n = match &base[10..] {
            "" => 0,
            suffix => {
                let digits = suffix.strip_prefix('.')?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                digits.parse::<u32>().ok().filter(|n| *n > 0)?
            }
        };
        Some((
            ArchiveName {
                day: day.to_string(),
                n,
            },
            stage,
        ))
    }
}

/// `YYYY-MM-DD` in digits.
fn is_day(s: &str) -> bool {
    s.len() == 10
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        })
}

/// What `archived/` holds at start: the highest number used per day, and the staged files
/// (rotated but not compressed when the last process ended) to compress now. A `.tmp` whose
/// staged file is still there is an interrupted compression and is deleted.
pub(super) fn scan(archived: &Path) -> io::Result<(BTreeMap<String, u32>, Vec<PathBuf>)> {
    let mut highest: BTreeMap<String, u32> = BTreeMap::new();
    let mut staged = Vec::new();
    for entry in fs::read_dir(archived)? {
        let entry = entry?;
        let Some((name, stage)) = entry.file_name().to_str().and_then(ArchiveName::parse) else {
            continue;
        };
        match stage {
            Stage::Staged => staged.push(entry.path()),
            Stage::Partial => {
                if archived.join(name.file_name(Stage::Staged)).exists() {
                    let _ = fs::remove_file(entry.path());
                }
            }
            Stage::Done => {}
        }
        let h = highest.entry(name.day).or_insert(name.n);
        *h = (*h).max(name.n);
    }
    staged.sort();
    Ok((highest, staged))
}

/// Work for the archiver thread, done in order.
pub(super) enum Job {
    /// Compress a staged file into its `.log.gz`.
    Compress(PathBuf),
    /// Delete every archive whose day is before this `YYYY-MM-DD`.
    Prune { before: String },
}

/// The background thread that compresses and prunes, so a rotation never waits for gzip.
pub(super) struct Archiver {
    tx: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<()>,
}

impl Archiver {
    pub(super) fn start(archived: PathBuf) -> io::Result<Archiver> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("log-archiver".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Compress(staged) => {
                            if let Err(e) = compress(&staged) {
                                eprintln!(
                                    "quantservice: cannot compress the log archive {}: {e}; it stays uncompressed and is compressed again at the next start",
                                    staged.display()
                                );
                            }
                        }
                        Job::Prune { before } => prune(&archived, &before),
                    }
                }
                let _ = done_tx.send(());
            })?;
        Ok(Archiver { tx: Some(tx), done })
    }

    pub(super) fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }

    /// Lets the queued jobs finish, waiting at most `wait`; `false` if they did not (what is
    /// left is finished at the next start).
    pub(super) fn finish(&mut self, wait: Duration) -> bool {
        self.tx = None;
        self.done.recv_timeout(wait).is_ok()
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        self.tx = None;
    }
}

/// Compresses a staged archive: `.log` → `.log.gz.tmp` (synced) → `.log.gz`, then deletes the
/// `.log`. If the `.log.gz` already exists, a crash came after its rename: only the delete is
/// left to do.
fn compress(staged: &Path) -> io::Result<()> {
    let dir = staged.parent().unwrap_or(Path::new("."));
    let Some((name, Stage::Staged)) = staged
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(ArchiveName::parse)
    else {
        return Err(io::Error::other("not a staged archive name"));
    };
    let done = dir.join(name.file_name(Stage::Done));
    if done.exists() {
        return fs::remove_file(staged);
    }
    let tmp = dir.join(name.file_name(Stage::Partial));
    let result = gzip_then_rename(staged, &tmp, &done, dir);
    if result.is_err() && !done.exists() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn gzip_then_rename(staged: &Path, tmp: &Path, done: &Path, dir: &Path) -> io::Result<()> {
    let mut input = File::open(staged)?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(super::file::LOG_FILE_MODE)
        .open(tmp)?;
    let mut gz = GzEncoder::new(BufWriter::new(out), Compression::default());
    io::copy(&mut input, &mut gz)?;
    let out = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
    out.sync_all()?;
    fs::rename(tmp, done)?;
    // The rename is made durable before the only other copy goes.
    File::open(dir)?.sync_all()?;
    fs::remove_file(staged)
}

/// Deletes every archive (in any stage) whose day, as its name says, is before `before`.
/// The name, not the file's mtime: the mtime of an archive is when it was compressed (or
/// copied back from a backup), while its name says which day its lines were written.
fn prune(archived: &Path, before: &str) {
    let entries = match fs::read_dir(archived) {
        Ok(e) => e,
        Err(e) => {
            eprintln!(
                "quantservice: cannot list {} to delete old log archives: {e}",
                archived.display()
            );
            return;
        }
    };
    for entry in entries.flatten() {
        let Some((name, _)) = entry.file_name().to_str().and_then(ArchiveName::parse) else {
            continue;
        };
        if name.day.as_str() < before {
            if let Err(e) = fs::remove_file(entry.path()) {
                eprintln!(
                    "quantservice: cannot delete the old log archive {}: {e}",
                    entry.path().display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_ignored() {
        for (file, day, n, stage) in [
            (
                "quantservice-2024-05-10.log.gz",
                "2024-05-10",
                0,
                Stage::Done,
            ),
            (
                "quantservice-2024-05-10.2.log.gz",
                "2024-05-10",
                2,
                Stage::Done,
            ),
            (
                "quantservice-2024-05-10.1.log",
                "2024-05-10",
                1,
                Stage::Staged,
            ),
            (
                "quantservice-2024-05-10.log.gz.tmp",
                "2024-05-10",
                0,
                Stage::Partial,
            ),
        ] {
            let (name, s) = ArchiveName::parse(file).unwrap();
            assert_eq!((name.day.as_str(), name.n, s), (day, n, stage), "{file}");
            assert_eq!(name.file_name(stage), file);
        }
        for other in [
            "quantservice.log",
            "quantservice-2024-5-10.log.gz",
            "quantservice-2024-05-10.0.log.gz",
            "quantservice-2024-05-10..log.gz",
            "quantservice-2024-05-10.x.log.gz",
            "quantservice.2024-05-10.log",
            "other-2024-05-10.log.gz",
            "quantservice-2024-05-10.log.zip",
        ] {
            assert_eq!(ArchiveName::parse(other), None, "{other}");
        }
        let a = ArchiveName::parse("quantservice-2024-05-10.log.gz")
            .unwrap()
            .0;
        let b = ArchiveName::parse("quantservice-2024-05-10.10.log.gz")
            .unwrap()
            .0;
        let c = ArchiveName::parse("quantservice-2024-05-11.log.gz")
            .unwrap()
            .0;
        assert!(a < b && b < c);
    }
}
