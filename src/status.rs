//! Observed state, kept in memory and written on change (batched by the flusher, never per
//! message): per pair (`pair_status`) and per long-lived task of the daemon's own
//! (`task_status`). Tasks and the supervisor update it; the operator decides nothing from it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use crate::market::PairKey;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::state::{ProxyStatusRow, StatusRow, TaskStatusRow};
use crate::store::Store;

/// Lifecycle phases shown in `pair_status.phase`.
pub mod phase {
    pub const BACKFILLING: &str = "backfilling";
    pub const STREAMING: &str = "streaming";
    /// Declared streamed, but its closed candles stopped arriving on the WebSocket (the socket
    /// is down or stalled): `lag_ms` grows until they come back; REST fills in meanwhile.
    pub const STREAM_DOWN: &str = "stream_down";
    pub const HEALING: &str = "healing";
    pub const ERROR: &str = "error";
    /// A permanent error (an unknown or delisted symbol): not retried until the row changes.
    pub const PARKED: &str = "parked";
    pub const DISABLED: &str = "disabled";
    /// History only (`stream = 0`), kept complete by gap scans.
    pub const IDLE: &str = "idle";
}

/// States shown in `task_status.state`.
pub mod task_state {
    pub const RUNNING: &str = "running";
    /// It failed (error, panic or unexpected exit) and is restarted after a backoff.
    pub const RESTARTING: &str = "restarting";
    /// Its loss was fatal: the process is shutting down (systemd restarts it).
    pub const FAILED: &str = "failed";
    /// Switched off by its config (an empty `app.maintenance.optimize`, or the ops endpoint with
    /// an empty `app.http.listen`).
    pub const DISABLED: &str = "disabled";
}

type Key = (String, String, String);

/// Rows by key, and the keys changed since they were last taken for writing.
struct Table<K, R> {
    rows: BTreeMap<K, R>,
    dirty: BTreeSet<K>,
}

impl<K, R> Default for Table<K, R> {
    fn default() -> Self {
        Table {
            rows: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone, R: Clone + PartialEq> Table<K, R> {
    /// Changes `key`'s row (made by `new` if absent); marks it dirty only if it changed.
    fn update(&mut self, key: K, new: impl FnOnce() -> R, f: impl FnOnce(&mut R)) {
        let row = self.rows.entry(key.clone()).or_insert_with(new);
        let before = row.clone();
        f(row);
        if *row != before {
            self.dirty.insert(key);
        }
    }

    /// The dirty rows, each passed through `stamp`; none is dirty afterwards.
    fn take_dirty(&mut self, stamp: impl Fn(&R) -> R) -> Vec<R> {
        std::mem::take(&mut self.dirty)
            .iter()
            .filter_map(|k| self.rows.get(k))
            .map(stamp)
            .collect()
    }

    fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.rows.keys().cloned());
    }
}

#[derive(Default)]
struct Inner {
    pairs: Table<Key, StatusRow>,
    tasks: Table<String, TaskStatusRow>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct StatusHub {
    inner: Arc<Mutex<Inner>>,
}

fn key_of(pair: &PairKey) -> Key {
    (
        pair.market.as_str().to_string(),
        pair.symbol.to_string(),
        pair.period.as_str().to_string(),
    )
}

impl StatusHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes a pair's row; it is written only if something changed.
    pub fn update(&self, pair: &PairKey, f: impl FnOnce(&mut StatusRow)) {
        self.update_raw(key_of(pair), f);
    }

    /// Same, for rows that are not valid pairs (reported bad `trading_pairs` rows).
    pub fn update_raw(&self, key: (String, String, String), f: impl FnOnce(&mut StatusRow)) {
        let new = || StatusRow {
            market: key.0.clone(),
            symbol: key.1.clone(),
            period: key.2.clone(),
            ..StatusRow::default()
        };
        self.lock().pairs.update(key.clone(), new, f);
    }

    /// Every pair's row (for metrics).
    pub fn pairs(&self) -> Vec<StatusRow> {
        self.lock().pairs.rows.values().cloned().collect()
    }

    /// Every task's row (for metrics).
    pub fn tasks(&self) -> Vec<TaskStatusRow> {
        self.lock().tasks.rows.values().cloned().collect()
    }

    pub fn get(&self, pair: &PairKey) -> Option<StatusRow> {
        self.lock().pairs.rows.get(&key_of(pair)).cloned()
    }

    /// Rows changed since the last call, stamped with `now_s`.
    pub fn take_dirty(&self, now_s: u32) -> Vec<StatusRow> {
        self.lock().pairs.take_dirty(|r| StatusRow {
            updated_at: now_s,
            ..r.clone()
        })
    }

    /// Puts rows whose write failed back in the queue.
    pub fn requeue(&self, rows: &[StatusRow]) {
        let mut inner = self.lock();
        for r in rows {
            inner
                .pairs
                .dirty
                .insert((r.market.clone(), r.symbol.clone(), r.period.clone()));
        }
    }

    /// Marks every row (pairs and tasks) to be written again.
    pub fn mark_all_dirty(&self) {
        let mut inner = self.lock();
        inner.pairs.mark_all_dirty();
        inner.tasks.mark_all_dirty();
    }

    /// Changes a daemon task's row; it is written only if something changed.
    pub fn update_task(&self, task: &str, f: impl FnOnce(&mut TaskStatusRow)) {
        let new = || TaskStatusRow {
            task: task.to_string(),
            ..TaskStatusRow::default()
        };
        self.lock().tasks.update(task.to_string(), new, f);
    }

    pub fn task(&self, task: &str) -> Option<TaskStatusRow> {
        self.lock().tasks.rows.get(task).cloned()
    }

    /// Task rows changed since the last call, stamped with `now_s`.
    pub fn take_dirty_tasks(&self, now_s: u32) -> Vec<TaskStatusRow> {
        self.lock().tasks.take_dirty(|r| TaskStatusRow {
            updated_at: now_s,
            ..r.clone()
        })
    }

    /// Puts task rows whose write failed back in the queue.
    pub fn requeue_tasks(&self, rows: &[TaskStatusRow]) {
        let mut inner = self.lock();
        for r in rows {
            inner.tasks.dirty.insert(r.task.clone());
        }
    }

    /// Forgets a pair (it stays in `pair_status` with its last row).
    pub fn forget(&self, pair: &PairKey) {
        let mut inner = self.lock();
        let k = key_of(pair);
        inner.pairs.rows.remove(&k);
        inner.pairs.dirty.remove(&k);
    }
}

/// Writes changed status rows (pairs, tasks and proxies) every second, and once more when
/// stopped. `proxy_rows(now_s)` gives the proxy pool's rows (written when they change).
pub async fn flush(
    store: Store,
    status: StatusHub,
    proxy_rows: impl Fn(u32) -> Vec<ProxyStatusRow>,
    cancel: CancellationToken,
) {
    let mut tick = crate::ticker(Duration::from_secs(1));
    let mut last_proxies: Vec<ProxyStatusRow> = Vec::new();
    // A run that died mid-write (its rows taken, never written) is followed by one that
    // writes everything once.
    status.mark_all_dirty();
    loop {
        let stop = tokio::select! {
            biased;
            _ = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        let now = u32::try_from(crate::market::now_ms() / 1000).unwrap_or(u32::MAX);
        crate::faults::hit("status_flusher");
        let rows = status.take_dirty(now);
        if !rows.is_empty() {
            if let Err(e) = store.write_status(&rows).await {
                warn!(error = %e, rows = rows.len(), "Cannot write pair_status; retrying.");
                status.requeue(&rows);
            }
        }
        let tasks = status.take_dirty_tasks(now);
        if !tasks.is_empty() {
            if let Err(e) = store.write_task_status(&tasks).await {
                warn!(error = %e, rows = tasks.len(), "Cannot write task_status; retrying.");
                status.requeue_tasks(&tasks);
            }
        }
        let proxies = proxy_rows(now);
        let changed: Vec<_> = proxies
            .iter()
            .filter(|r| {
                !last_proxies.iter().any(|l| {
                    l.host == r.host
                        && l.port == r.port
                        && l.state == r.state
                        && l.last_error == r.last_error
                        && l.requests == r.requests
                        && l.failures == r.failures
                        && l.weight_used == r.weight_used
                })
            })
            .cloned()
            .collect();
        if !changed.is_empty() {
            match store.write_proxy_status(&changed).await {
                Ok(()) => last_proxies = proxies,
                Err(e) => warn!(error = %e, "Cannot write proxy_status; retrying."),
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_are_written() {
        let hub = StatusHub::default();
        let p = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
        hub.update(&p, |r| r.phase = phase::STREAMING.into());
        let rows = hub.take_dirty(7);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].phase.as_str(), rows[0].updated_at),
            ("streaming", 7)
        );
        hub.update(&p, |r| r.phase = phase::STREAMING.into());
        assert!(hub.take_dirty(8).is_empty(), "no change, no row");
        hub.update(&p, |r| r.reconnects += 1);
        assert_eq!(hub.take_dirty(9)[0].reconnects, 1);
        hub.requeue(&[hub.get(&p).unwrap()]);
        assert_eq!(hub.take_dirty(10).len(), 1);
    }
}
