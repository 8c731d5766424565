//! Tasks: units of work the daemon (and the CLI) run — for now the historical backfill.
//! Streams, gap scans and indicator jobs join them with the operator.

pub mod backfill;
