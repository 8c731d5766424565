//! Log output: tracing to stdout (no colour unless a TTY, so journald stays clean) and, when
//! `app.logging.dir` is set, to `DIR/quantservice.log`, rotated by size and at midnight UTC
//! into `DIR/archived/` (`file`: the file, its writer thread and rotation; `archive`: archive
//! names, compression, retention). Every line passes through a scrubber that replaces known
//! secrets with `***`, a last line of defence behind the rule that secrets are never logged.
//! The level, `max_size` and `keep_days` can change while running. Does not decide what is
//! logged.

mod archive;
mod file;

pub use archive::{ArchiveName, Stage};
pub use file::{Clock, FileLimits, LogFileError, RotatingFile, SystemClock};

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, OnceLock, RwLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LoggingConfig;
use file::FileGuard;

/// Keeps the file writer's thread alive; drop it last: dropping it writes the lines still
/// queued and lets the archiver finish (each bounded in time).
pub struct LogGuard {
    _file: Option<FileGuard>,
}

/// Where console logs go: stdout for the daemon, stderr for commands whose stdout is output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    Stdout,
    Stderr,
}

/// Installs the global subscriber. `secrets` are scrubbed from every line.
pub fn init(
    cfg: &LoggingConfig,
    console: Console,
    secrets: Vec<String>,
) -> anyhow::Result<LogGuard> {
    let secrets: Secrets = Arc::new(RwLock::new(
        secrets.into_iter().filter(|s| !s.is_empty()).collect(),
    ));
    let _ = SECRETS.set(secrets.clone());
    let (level_filter, handle) = tracing_subscriber::reload::Layer::new(
        EnvFilter::try_new(directives(&cfg.level)).unwrap_or_else(|_| EnvFilter::new("info")),
    );
    let _ = LEVEL.set(Box::new(move |level: &str| {
        let f = EnvFilter::try_new(directives(level)).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    }));
    let filter = || tracing_subscriber::filter::LevelFilter::TRACE;
    let console_layer = match console {
        Console::Stdout => tracing_subscriber::fmt::layer()
            .with_ansi(io::stdout().is_terminal())
            .with_writer(Scrubbing::new(io::stdout, Arc::clone(&secrets)))
            .with_filter(filter())
            .boxed(),
        Console::Stderr => tracing_subscriber::fmt::layer()
            .with_ansi(io::stderr().is_terminal())
            .with_writer(Scrubbing::new(io::stderr, Arc::clone(&secrets)))
            .with_filter(filter())
            .boxed(),
    };
    let mut guard = None;
    let file_layer = match &cfg.dir {
        Some(dir) => {
            let limits = FileLimits::new(cfg.max_size, cfg.keep_days);
            match file::spawn(dir, limits.clone(), Arc::new(SystemClock)) {
                Ok((writer, g)) => {
                    let _ = LIMITS.set(limits);
                    guard = Some(g);
                    Some(
                        tracing_subscriber::fmt::layer()
                            .with_ansi(false)
                            .with_writer(Scrubbing::new(writer, secrets))
                            .with_filter(filter()),
                    )
                }
                // A command run by hand next to the running daemon: the daemon keeps the file.
                Err(e @ LogFileError::InUse { .. }) => {
                    eprintln!("quantservice: {e}; this process logs to the console only");
                    None
                }
                Err(e) => return Err(anyhow::anyhow!("app.logging.dir: {e}")),
            }
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(level_filter)
        .with(console_layer)
        .with(file_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(LogGuard { _file: guard })
}

/// The user's level plus quieter defaults for chatty dependencies (the cron scheduler logs
/// every job it creates at info), unless the user named them.
fn directives(level: &str) -> String {
    if level.contains("tokio_cron_scheduler") {
        level.to_string()
    } else {
        format!("{level},tokio_cron_scheduler=warn")
    }
}

type Secrets = Arc<RwLock<Vec<String>>>;
type LevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static SECRETS: OnceLock<Secrets> = OnceLock::new();
static LEVEL: OnceLock<LevelSetter> = OnceLock::new();
static LIMITS: OnceLock<FileLimits> = OnceLock::new();

/// Applies a new `app.logging.max_size` and `keep_days` to the running log file (live config
/// reload); `false` when no log file is written.
pub fn set_file_limits(max_size: u64, keep_days: u32) -> bool {
    match LIMITS.get() {
        Some(l) => {
            l.set(max_size, keep_days);
            true
        }
        None => false,
    }
}

/// Applies a new `app.logging.level` to the running logger (live config reload).
pub fn set_level(level: &str) -> Result<(), String> {
    match LEVEL.get() {
        Some(set) => set(level),
        None => Err("the logger is not installed".to_string()),
    }
}

/// Replaces the secrets the scrubber hides (a reloaded config may carry new passwords).
pub fn set_secrets(secrets: Vec<String>) {
    if let Some(s) = SECRETS.get() {
        let mut w = s.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for new in secrets.into_iter().filter(|s| !s.is_empty()) {
            // Old secrets stay hidden too: they may still appear in late lines.
            if !w.contains(&new) {
                w.push(new);
            }
        }
    }
}

/// A `MakeWriter` that replaces secrets in each formatted line before it reaches `inner`.
/// tracing-subscriber formats a whole event into one buffer and writes it in one call.
#[derive(Clone)]
pub struct Scrubbing<M> {
    inner: M,
    secrets: Secrets,
}

impl<M> Scrubbing<M> {
    pub fn new(inner: M, secrets: Secrets) -> Self {
        Scrubbing { inner, secrets }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Scrubbing<M> {
    type Writer = ScrubbingWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        ScrubbingWriter {
            inner: self.inner.make_writer(),
            secrets: Arc::clone(&self.secrets),
        }
    }
}

pub struct ScrubbingWriter<W> {
    inner: W,
    secrets: Secrets,
}

impl<W: Write> Write for ScrubbingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let secrets = self
            .secrets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if secrets.is_empty() {
            return self.inner.write(buf);
        }
        let mut text = String::from_utf8_lossy(buf).into_owned();
        for s in secrets.iter() {
            if text.contains(s.as_str()) {
                text = text.replace(s.as_str(), "***");
            }
        }
        self.inner.write_all(text.as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbing_writer_replaces_secrets() {
        let mut out = Vec::new();
        {
            let mut w = ScrubbingWriter {
                inner: &mut out,
                secrets: Arc::new(RwLock::new(vec!["hunter2".to_string()])),
            };
            w.write_all(b"connect with password hunter2 failed\n")
                .unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "connect with password *** failed\n"
        );
    }
}
