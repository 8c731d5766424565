//! Tasks: units of work the daemon (and the CLI) run — historical backfill, a pair's history
//! and gap scans, the live stream sink, maintenance (`OPTIMIZE` of dirty partitions), a pair's
//! indicators (offline over the stored series, and online per (pair, indicator)) — and the
//! vocabulary the supervisor runs them by: [`TaskKey`] and [`TaskSpec`] (one enum variant per
//! kind of keyed task) and [`TaskError`] (retry with backoff, or park until the spec changes).
//! Only the operator's supervisor (or a CLI command) starts them; nothing here spawns a
//! long-lived task.

use std::fmt;

use crate::market::PairKey;

pub mod backfill;
pub mod indicators;
pub mod live;
pub mod maintenance;
pub mod pair;
pub mod scan_schedule;

pub use pair::PairSpec;

/// The identity of a task the reconcile loop declares: at most one runs per key. One variant
/// per kind; indicator, strategy-runner and backtest-job tasks join as variants of their own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKey {
    /// A pair's history: backfill, then scheduled gap scans.
    Pair(PairKey),
    /// One indicator of a pair (its normalised spec): the stored history, then online.
    Indicator(PairKey, qs_core::indicators::Spec),
}

/// What a keyed task was started with; a changed spec restarts it (and un-parks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskSpec {
    Pair(PairSpec),
    /// An indicator task has nothing to change: declared or not.
    Indicator,
}

impl TaskKey {
    /// The pair this task belongs to (its observed state goes to that pair's `pair_status`).
    pub fn pair(&self) -> Option<&PairKey> {
        match self {
            TaskKey::Pair(p) => Some(p),
            // Reports to `indicator_status` itself; the pair's phase is the pair task's.
            TaskKey::Indicator(..) => None,
        }
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskKey::Pair(p) => write!(f, "pair {p}"),
            TaskKey::Indicator(p, spec) => write!(f, "indicator {spec} of {p}"),
        }
    }
}

/// Why a task stopped, as the supervisor needs to know it: try again later, or never with
/// this spec (an invalid or delisted symbol: retrying would only spend weight).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// Restarted after the key's backoff.
    #[error("{0}")]
    Retryable(String),
    /// Parked: not restarted until its spec changes; reported in observed state meanwhile.
    #[error("{0}")]
    Permanent(String),
}

impl TaskError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, TaskError::Retryable(_))
    }

    /// The same error with `context: ` in front of its text.
    pub fn context(self, context: &str) -> TaskError {
        match self {
            TaskError::Retryable(m) => TaskError::Retryable(format!("{context}: {m}")),
            TaskError::Permanent(m) => TaskError::Permanent(format!("{context}: {m}")),
        }
    }
}

impl From<backfill::BackfillError> for TaskError {
    fn from(e: backfill::BackfillError) -> TaskError {
        use backfill::BackfillError as B;
        let retryable = match &e {
            B::Exchange(x) => x.is_retryable(),
            // ClickHouse trouble is never the spec's fault: retry, whatever the code.
            B::Store(_) => true,
            // A range the task computed itself cannot be fixed by waiting, but a later run
            // computes it anew (the clock moved): retry.
            B::InvalidRange { .. } | B::WriterClosed | B::Cancelled => true,
        };
        let text = e.to_string();
        if retryable {
            TaskError::Retryable(text)
        } else {
            TaskError::Permanent(text)
        }
    }
}
