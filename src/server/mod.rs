//! The daemon's HTTP servers: the ops endpoint (`ops`: health, readiness, Prometheus metrics).
//! The client WebSocket server joins here; so far its wire protocol (`protocol`: client frames
//! parsed, server frames rendered), its fan-out hub (`hub`: one render per event, bounded
//! queues, slow consumers cut off) and the pure half of the Binance-compatible REST facade
//! (`facade`: parameters checked as Binance does, rows printed as Binance does) are in place;
//! the server itself is not. They are services
//! of the daemon itself, started by the operator beside the generations of clients (so a
//! rebuilt generation never cuts them) and reconfigured by config edits; they decide nothing
//! about what runs.

pub mod facade;
pub mod hub;
pub mod ops;
pub mod protocol;
