//! Live reload of `app.yaml`: watches the file's directory (so editors that write a new file
//! and rename it over the old one, and symlink swaps, are seen), debounces bursts of events,
//! re-reads and validates the file, and publishes a new config only when it is valid and
//! different. An invalid edit is logged with every problem and the last good config stays. A
//! slow poll backs the watcher up (a symlink into a directory we do not watch, a lost event).

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

/// Starts watching `path`; the receiver holds the current good config.
pub fn spawn(
    path: PathBuf,
    initial: Config,
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
    tokio::spawn(run(path, tx, ev_rx, watcher, cancel));
    rx
}

async fn run(
    path: PathBuf,
    tx: watch::Sender<Arc<Config>>,
    events: mpsc::UnboundedReceiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    cancel: CancellationToken,
) {
    let mut last_text = std::fs::read_to_string(&path).ok();
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
        reload(&path, &tx, &mut last_text);
    }
}

async fn recv(events: &mut Option<mpsc::UnboundedReceiver<()>>) -> Option<()> {
    match events {
        Some(rx) => rx.recv().await,
        None => None,
    }
}

/// Reads the file; publishes it if it changed and is valid.
fn reload(path: &Path, tx: &watch::Sender<Arc<Config>>, last_text: &mut Option<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            // Mid-rename the file can be missing for a moment; the next event or poll retries.
            if last_text.is_some() {
                warn!(path = %path.display(), error = %e, "Cannot read the config file; keeping the running config.");
                *last_text = None;
            }
            return;
        }
    };
    // The file is compared as parsed, not as text: the running config may come from an
    // earlier read than ours. The text only keeps an invalid file from being logged each poll.
    let seen = last_text.as_deref() == Some(text.as_str());
    let parsed = Config::from_yaml_with_env(&text, path, |k| std::env::var(k).ok());
    *last_text = Some(text);
    match parsed {
        Ok(cfg) => {
            if **tx.borrow() == cfg {
                return;
            }
            info!(path = %path.display(), "Config changed; applying it.");
            tx.send_replace(Arc::new(cfg));
        }
        Err(_) if seen => {}
        Err(e) => {
            for p in e.problems() {
                error!(path = %path.display(), problem = %p, "Invalid config edit ignored; the last good config stays.");
            }
        }
    }
}
