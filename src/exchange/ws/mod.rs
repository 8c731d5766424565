//! Binance kline WebSocket streams. [`MarketStreams`] keeps one market's wanted stream set on
//! as few connections as the per-connection limits allow: which stream goes where is the pure
//! [`assign::assign`]; changes go out as SUBSCRIBE/UNSUBSCRIBE on the open sockets (within the
//! control-message rate). Each connection is a task (`conn`) that replaces a socket that dies
//! or goes quiet (pings do not count) with jittered backoff and renews it make-before-break
//! before Binance's 24 h cut; `socket` opens sockets (directly or through a SOCKS5 proxy of
//! the egress pool) and reads them; `wire` is the frame format. Closed candles leave as
//! [`LiveEvent`]s; storing them, deduplicating and healing what was missed is the live task's
//! job, not this module's.

pub mod assign;
mod conn;
mod socket;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::conn::{Cmd, Shared};
use super::egress::ProxyPool;
use crate::config::StreamsConfig;
use crate::market::{Kline, Market, PairKey};

pub use self::socket::Io;
use self::wire::pair_of;
pub use self::wire::{combined_url, parse_frame, stream_name, Incoming};

/// Most streams Binance allows on one connection.
pub fn streams_per_connection(market: Market) -> usize {
    match market {
        Market::Spot => 1024,
        Market::Um | Market::Cm => 200,
    }
}

/// The gap we leave between two control messages we send (Binance allows 5/s on spot and 10/s
/// on futures, pongs included): at most 4 and 7 in any second, leaving room for a pong.
pub fn control_gap(market: Market) -> Duration {
    match market {
        Market::Spot => Duration::from_millis(300),
        Market::Um | Market::Cm => Duration::from_millis(150),
    }
}

/// Told of every in-progress candle update the streams receive (the client server pushes them
/// to clients that asked for `partial`). Called on the socket's reader: keep it short.
pub type PartialHook = Arc<dyn Fn(&crate::market::Kline) + Send + Sync>;

/// What the streams hand to the live task.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// A closed candle (`x == true`) and the event time Binance stamped on it.
    Final { kline: Kline, event_ms: i64 },
    /// A socket carrying these pairs (re)opened; `reconnect` is false for the first open of a
    /// connection and for make-before-break renewals.
    Connected {
        market: Market,
        pairs: Vec<PairKey>,
        reconnect: bool,
    },
}

/// The manager's handle on one connection task.
struct Conn {
    id: u64,
    streams: BTreeSet<String>,
    cmd: mpsc::UnboundedSender<Cmd>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// One market's streams. Not a task itself: [`MarketStreams::apply`] is called by the
/// reconcile pass; the connection tasks it starts are owned (and stopped) by it.
pub struct MarketStreams {
    shared: Shared,
    conns: Vec<Conn>,
    next_id: u64,
    cancel: CancellationToken,
    /// Connections found dead in a row (reset after a quiet minute), and when the last was:
    /// their replacements back off like reconnects, so a connection that keeps dying cannot
    /// hammer Binance's connection limit.
    deaths: u32,
    last_death: Option<Instant>,
}

impl MarketStreams {
    /// Streams open their sockets through `pool` (SOCKS5) instead of directly.
    pub fn with_pool(mut self, pool: Option<Arc<ProxyPool>>) -> MarketStreams {
        self.shared.pool = pool;
        self
    }

    /// In-progress candle updates go to `hook` (they are dropped otherwise).
    pub fn with_partials(mut self, hook: Option<PartialHook>) -> MarketStreams {
        self.shared.partials = hook;
        self
    }

    pub fn new(
        market: Market,
        ws_url: &str,
        cfg: StreamsConfig,
        out: mpsc::Sender<LiveEvent>,
        cancel: CancellationToken,
    ) -> MarketStreams {
        let (url, warning) = combined_url(market, ws_url);
        if let Some(w) = warning {
            warn!(%market, "{w}");
        }
        MarketStreams {
            shared: Shared {
                market,
                url,
                cfg,
                out,
                pool: None,
                partials: None,
            },
            conns: Vec::new(),
            next_id: 1,
            cancel,
            deaths: 0,
            last_death: None,
        }
    }

    /// Open connections and the streams each carries.
    pub fn connections(&self) -> Vec<(u64, usize)> {
        self.conns.iter().map(|c| (c.id, c.streams.len())).collect()
    }

    /// Makes the streamed set equal `wanted` (pairs of this market; others are ignored):
    /// unsubscribes what is no longer wanted and subscribes what is new on connections with
    /// room, opening connections only when all are full (see [`assign::assign`]). Untouched
    /// streams keep their sockets.
    pub fn apply(&mut self, wanted: &BTreeSet<PairKey>) {
        let market = self.shared.market;
        let wanted: BTreeMap<String, PairKey> = wanted
            .iter()
            .filter(|p| p.market == market)
            .map(|p| (stream_name(p), p.clone()))
            .collect();
        let current: Vec<BTreeSet<String>> = self.conns.iter().map(|c| c.streams.clone()).collect();
        let desired: BTreeSet<String> = wanted.keys().cloned().collect();
        let changes = assign::assign(&current, &desired, streams_per_connection(market));
        for (i, names) in changes.unsubscribe {
            if let Some(c) = self.conns.get_mut(i) {
                for n in &names {
                    c.streams.remove(n);
                }
                let _ = c.cmd.send(Cmd::Unsubscribe(names));
            }
        }
        for &i in &changes.close {
            if let Some(c) = self.conns.get_mut(i) {
                c.streams.clear();
                c.cancel.cancel();
            }
        }
        for (i, names) in changes.subscribe {
            if let Some(c) = self.conns.get_mut(i) {
                c.streams.extend(names.iter().cloned());
                let _ = c.cmd.send(Cmd::Subscribe(names));
            }
        }
        self.conns.retain(|c| !c.streams.is_empty());
        for names in changes.open {
            let streams = names
                .into_iter()
                .filter_map(|n| wanted.get(&n).map(|p| (n, p.clone())))
                .collect();
            self.open(streams, Duration::ZERO);
        }
    }

    fn open(&mut self, streams: BTreeMap<String, PairKey>, delay: Duration) {
        let id = self.next_id;
        self.next_id += 1;
        let cancel = self.cancel.child_token();
        info!(market = %self.shared.market, conn = id, streams = streams.len(), "Opening a stream connection.");
        let names = streams.keys().cloned().collect();
        let (cmd, task) = conn::spawn(id, self.shared.clone(), streams, delay, cancel.clone());
        self.conns.push(Conn {
            id,
            streams: names,
            cmd,
            cancel,
            task,
        });
    }

    /// Finds connection tasks that ended without being asked (a panic, an unexpected return),
    /// opens their streams again on a fresh connection, and says which died and why (for the
    /// caller's log, counters and observed state). Called by the owner on every poll, so a
    /// dead connection is noticed and replaced within one poll interval.
    pub async fn reap(&mut self) -> Vec<(u64, String)> {
        let mut dead = Vec::new();
        let mut i = 0;
        while i < self.conns.len() {
            let c = &self.conns[i];
            if !c.task.is_finished() || c.cancel.is_cancelled() {
                i += 1;
                continue;
            }
            let c = self.conns.remove(i);
            let why = match c.task.await {
                Ok(()) => "the connection task ended without being asked to".to_string(),
                Err(e) => format!("connection: {}", crate::join_error_text(e)),
            };
            dead.push((c.id, why));
            if self
                .last_death
                .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
            {
                self.deaths = 0;
            }
            let delay = crate::backoff::delay(
                self.deaths,
                self.shared.cfg.reconnect_backoff,
                self.shared.cfg.max_reconnect_backoff,
                &mut rand::rng(),
            );
            self.deaths = self.deaths.saturating_add(1);
            self.last_death = Some(Instant::now());
            let streams: BTreeMap<String, PairKey> = c
                .streams
                .iter()
                .filter_map(|n| pair_of(self.shared.market, n).map(|p| (n.clone(), p)))
                .collect();
            if !streams.is_empty() {
                self.open(streams, delay);
            }
        }
        dead
    }

    /// Closes every connection (cancel, then one shared `timeout`, then abort).
    pub async fn shutdown(self, timeout: Duration) {
        for c in &self.conns {
            c.cancel.cancel();
        }
        let deadline = Instant::now() + timeout;
        for c in self.conns {
            let mut task = c.task;
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}
