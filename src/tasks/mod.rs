//! Tasks: units of work the daemon (and the CLI) run — historical backfill, a pair's history
//! and gap scans, and the live stream sink. Only the operator's supervisor (or a CLI command)
//! starts them.

pub mod backfill;
pub mod live;
pub mod pair;
