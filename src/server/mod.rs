//! The daemon's HTTP servers: the ops endpoint (`ops`: health, readiness, Prometheus metrics).
//! The client server is being built here (issue 11): its wire protocol (`protocol`), its
//! fan-out hub (`hub`: one render per event, bounded queues, slow consumers cut off), the
//! `/ws` session (`client`: requests answered, live frames from the hub, pings, 1008/1001
//! closes) and the Binance-compatible REST facade (`facade`: Binance's klines, exchangeInfo,
//! time and ping served from ClickHouse, a `Router` to merge into the client server's). Not yet
//! wired into the daemon or a command, so no user reaches it yet. These servers are services of the
//! daemon itself, started by the operator beside the generations of clients (so a rebuilt
//! generation never cuts them) and reconfigured by config edits; they decide nothing about
//! what runs.

pub mod client;
pub mod facade;
pub mod follow;
pub mod hub;
pub mod ops;
pub mod protocol;
pub mod replay;
