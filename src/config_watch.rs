//! Live reload of `app.yaml`: watches the file's directory (so editors that write a new file
//! and rename it over the old one, and symlink swaps, are seen), debounces bursts of events,
//! re-reads and validates the file, and publishes a new config only when it is valid. An
//! invalid edit is logged with every problem and the last good config stays. A slow poll backs
//! the watcher up (a symlink into a directory we do not watch, a lost event).
//!
//! What became of each edit is published as a [`ReloadOutcome`] ([`Reloads`]): the watcher
//! reports the edits it rejects (invalid files), and the consumer of the config (the daemon's
//! runtime, which may still refuse a well-formed edit that does not work) reports the rest.
//! Tests and operators wait for an outcome instead of guessing how long a reload takes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;

/// Quiet time after the last file event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(300);
/// The backup poll.
pub const POLL: Duration = Duration::from_secs(2);
/// A burst of events delays a reload at most this long.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// One outcome of a config reload. `seq` counts outcomes (0 is the config loaded at start), so
/// a waiter can tell a new outcome from the one it saw before making an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub seq: u64,
    pub result: ReloadResult,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadResult {
    /// The edited file is what runs now. `changed` names the top-level sections that differ
    /// from the config that ran before (`["gap_scan", "logging"]`); empty when the file
    /// changed but the config it means did not (a comment, the same values).
    Applied { changed: Vec<String> },
    /// The edit was refused and the last good config keeps running: the problems of an
    /// invalid file, or why a well-formed one could not be used. Never contains a secret.
    Rejected { errors: Vec<String> },
}

/// Where reload outcomes are published; clones share one channel.
#[derive(Clone, Debug)]
pub struct Reloads(Arc<watch::Sender<ReloadOutcome>>);

impl Default for Reloads {
    fn default() -> Self {
        Reloads::new()
    }
}

impl Reloads {
    /// A channel whose first outcome (seq 0) is the config loaded at start.
    pub fn new() -> Reloads {
        let first = ReloadOutcome {
            seq: 0,
            result: ReloadResult::Applied {
                changed: Vec::new(),
            },
        };
        Reloads(Arc::new(watch::channel(first).0))
    }

    /// Follows the outcomes (the receiver starts at the latest one).
    pub fn subscribe(&self) -> watch::Receiver<ReloadOutcome> {
        self.0.subscribe()
    }

    /// The latest outcome.
    pub fn latest(&self) -> ReloadOutcome {
        self.0.borrow().clone()
    }

    /// Publishes the next outcome; returns its `seq`.
    pub fn report(&self, result: ReloadResult) -> u64 {
        let outcome = match &result {
            ReloadResult::Applied { .. } => "applied",
            ReloadResult::Rejected { .. } => "rejected",
        };
        crate::metrics::CONFIG_RELOADS.inc(&[outcome], 1);
        let mut seq = 0;
        self.0.send_modify(|o| {
            o.seq += 1;
            o.result = result;
            seq = o.seq;
        });
        seq
    }

    /// Publishes `Applied` with the sections in which `new` differs from `old`.
    pub fn applied(&self, old: &Config, new: &Config) -> u64 {
        let changed = old
            .changed_sections(new)
            .into_iter()
            .map(str::to_string)
            .collect();
        self.report(ReloadResult::Applied { changed })
    }

    /// Publishes `Rejected` with `why`, with the secrets of `configs` blanked out.
    pub fn rejected(&self, why: &str, configs: &[&Config]) -> u64 {
        let why = configs
            .iter()
            .flat_map(|c| c.secrets())
            .fold(why.to_string(), |acc, s| acc.replace(s.as_str(), "***"));
        self.report(ReloadResult::Rejected { errors: vec![why] })
    }

    /// Waits for the first outcome after `seq` (e.g. the `latest().seq` read before an edit);
    /// `None` if nobody can publish anymore.
    pub async fn next_after(&self, seq: u64) -> Option<ReloadOutcome> {
        let mut rx = self.subscribe();
        rx.wait_for(|o| o.seq > seq).await.ok().map(|o| o.clone())
    }
}

/// Who reports the outcome of a valid edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The watcher, as soon as it publishes the config (nothing else decides).
    OnPublish,
    /// The consumer of the config channel, once it has tried the config (the daemon's runtime
    /// may refuse one whose ClickHouse settings do not work). Every changed file is then
    /// published, even one equal to the last published config: the consumer compares it with
    /// the config that actually runs.
    ByConsumer,
}

/// Starts watching `path`; the receiver holds the latest valid config read. Outcomes go to
/// `reloads` (valid edits by whoever `confirm` says).
pub fn spawn(
    path: PathBuf,
    initial: Config,
    reloads: Reloads,
    confirm: Confirm,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<Config>> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    let (ev_tx, ev_rx) = mpsc::unbounded_channel::<()>();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = ev_tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "Cannot watch the config directory; polling it instead.");
            None
        }
    };
    let publish = Publish {
        path,
        tx,
        reloads,
        confirm,
        last_text: None,
        unreadable: false,
    };
    tokio::spawn(run(publish, ev_rx, watcher, cancel));
    rx
}

/// The watcher's side of the channels.
struct Publish {
    path: PathBuf,
    tx: watch::Sender<Arc<Config>>,
    reloads: Reloads,
    confirm: Confirm,
    /// The text last read.
    last_text: Option<String>,
    /// The last read failed (its warning is logged once).
    unreadable: bool,
}

async fn run(
    mut publish: Publish,
    events: mpsc::UnboundedReceiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    cancel: CancellationToken,
) {
    publish.last_text = std::fs::read_to_string(&publish.path).ok();
    let mut events = Some(events);
    let mut poll = crate::ticker(POLL);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            ev = recv(&mut events), if events.is_some() => {
                if ev.is_none() {
                    // The watcher is gone; the poll carries on alone.
                    events = None;
                    continue;
                }
                // Debounce: wait until the events stop for a moment, but never longer than
                // MAX_DEBOUNCE (another file in the directory may change all the time).
                let until = tokio::time::Instant::now() + MAX_DEBOUNCE;
                loop {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return,
                        more = tokio::time::timeout(DEBOUNCE, recv(&mut events)) => {
                            if !matches!(more, Ok(Some(()))) || tokio::time::Instant::now() >= until {
                                break;
                            }
                        }
                    }
                }
            }
            _ = poll.tick() => {}
        }
        publish.reload();
    }
}

async fn recv(events: &mut Option<mpsc::UnboundedReceiver<()>>) -> Option<()> {
    match events {
        Some(rx) => rx.recv().await,
        None => None,
    }
}

impl Publish {
    /// Reads the file; publishes it if it changed and is valid, reports it if it is not.
    fn reload(&mut self) {
        let path = &self.path;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                // Mid-rename the file can be missing for a moment; the next event or poll
                // retries.
                if !self.unreadable {
                    warn!(path = %path.display(), error = %e, "Cannot read the config file; keeping the running config.");
                    self.unreadable = true;
                }
                return;
            }
        };
        self.unreadable = false;
        // The file is compared as parsed, not as text: the running config may come from an
        // earlier read than ours. The text tells an edit from a poll of the same file.
        let seen = self.last_text.as_deref() == Some(text.as_str());
        let parsed = Config::from_yaml_with_env(&text, path, |k| std::env::var(k).ok());
        self.last_text = Some(text);
        match parsed {
            Ok(cfg) => {
                let differs = **self.tx.borrow() != cfg;
                match self.confirm {
                    Confirm::ByConsumer if differs || !seen => {
                        info!(path = %path.display(), "Config file changed; applying it.");
                        self.tx.send_replace(Arc::new(cfg));
                    }
                    Confirm::OnPublish if differs => {
                        info!(path = %path.display(), "Config changed; applying it.");
                        let old = self.tx.send_replace(Arc::new(cfg));
                        self.reloads.applied(&old, &self.tx.borrow());
                    }
                    Confirm::OnPublish if !seen => {
                        // Edited, but it means the same config: nothing to do.
                        self.reloads.report(ReloadResult::Applied {
                            changed: Vec::new(),
                        });
                    }
                    _ => {}
                }
            }
            Err(_) if seen => {}
            Err(e) => {
                let problems = e.problems();
                for p in &problems {
                    error!(path = %path.display(), problem = %p, "Invalid config edit ignored; the last good config stays.");
                }
                self.reloads
                    .report(ReloadResult::Rejected { errors: problems });
            }
        }
    }
}
