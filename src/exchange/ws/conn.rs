//! The lifecycle of one stream connection, as a task: keep a socket open carrying the
//! connection's streams (reconnecting with jittered backoff when it dies or goes quiet), apply
//! SUBSCRIBE/UNSUBSCRIBE commands from the stream manager, and renew the socket
//! make-before-break before Binance's 24 h cut. Not here: which streams the connection
//! carries (the manager decides, see `assign`), the socket itself (`socket`), frames (`wire`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::socket::{open_ws, Sock, SockEvent};
use super::wire::{pair_of, stream_url};
use super::{control_gap, LiveEvent};
use crate::config::StreamsConfig;
use crate::exchange::egress::ProxyPool;
use crate::market::{Market, PairKey};

/// Streams named in the connection URL; the rest are subscribed by message (long URLs fail).
const URL_STREAMS: usize = 50;
/// How long opening a socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A socket that lived this long and delivered data resets the reconnect backoff (longer than
/// the default idle timeout, so a socket that never delivers keeps backing off).
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a proxy that failed to open a socket stays out of rotation.
const PROXY_QUARANTINE: Duration = Duration::from_secs(60);

/// A change of a connection's streams, from the stream manager.
pub(super) enum Cmd {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

/// What every connection of one market shares.
#[derive(Clone)]
pub(super) struct Shared {
    pub market: Market,
    /// The combined-stream endpoint.
    pub url: String,
    pub cfg: StreamsConfig,
    pub out: mpsc::Sender<LiveEvent>,
    /// Set when streams go through the proxy pool (`app.proxy.websocket`).
    pub pool: Option<Arc<ProxyPool>>,
    /// Where in-progress candle updates go, if anywhere.
    pub partials: Option<super::PartialHook>,
}

/// Starts connection `id` carrying `streams`, connecting after `delay` (a connection that
/// replaces a dead one backs off); returns its command sender and its task.
pub(super) fn spawn(
    id: u64,
    shared: Shared,
    streams: BTreeMap<String, PairKey>,
    delay: Duration,
    cancel: CancellationToken,
) -> (mpsc::UnboundedSender<Cmd>, JoinHandle<()>) {
    let (cmd_tx, cmd) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let task = ConnTask {
        id,
        shared,
        streams,
        cmd,
        events_tx,
        next_msg_id: 1,
        gen: 0,
    };
    (cmd_tx, tokio::spawn(task.run(events, delay, cancel)))
}

/// What a handler tells the serving loop.
enum Flow {
    Continue,
    /// The current socket is lost (and no replacement is ready): reconnect.
    Lost(String),
    /// Cancelled, or the manager dropped the connection: close and stop.
    Stop,
}

/// The sockets of a connection while it is up: the current one and, during a renewal, its
/// replacement.
struct Session {
    cur: Sock,
    next: Option<Sock>,
    rotate_attempt: u32,
    rotate_not_before: Instant,
}

impl Session {
    async fn close(self) {
        self.cur.close().await;
        if let Some(n) = self.next {
            n.close().await;
        }
    }
}

struct ConnTask {
    id: u64,
    shared: Shared,
    streams: BTreeMap<String, PairKey>,
    cmd: mpsc::UnboundedReceiver<Cmd>,
    /// Given to each socket's reader.
    events_tx: mpsc::UnboundedSender<SockEvent>,
    next_msg_id: u64,
    /// Number of the last socket opened.
    gen: u64,
}

impl ConnTask {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<SockEvent>,
        delay: Duration,
        cancel: CancellationToken,
    ) {
        if !delay.is_zero() {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let market = self.shared.market;
        let mut attempt = 0u32;
        let mut reconnect = false;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let Some(cur) = self.connect(&cancel).await else {
                return;
            };
            let _ = self
                .shared
                .out
                .send(LiveEvent::Connected {
                    market,
                    pairs: self.streams.values().cloned().collect(),
                    reconnect,
                })
                .await;
            let mut session = Session {
                cur,
                next: None,
                rotate_attempt: 0,
                rotate_not_before: Instant::now(),
            };
            let Some(why) = self.serve(&mut session, &mut events, &cancel).await else {
                session.close().await;
                return;
            };
            let lived = session.cur.opened.elapsed();
            let delivered = session.cur.delivered();
            session.close().await;
            if lived >= STABLE_AFTER && delivered {
                attempt = 0;
            }
            let delay = self.backoff(&mut attempt);
            warn!(%market, conn = self.id, %why, retry_in = ?delay, "Stream socket lost; reconnecting.");
            reconnect = true;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The next reconnect delay (jittered, doubling from `reconnect_backoff` up to
    /// `max_reconnect_backoff`); counts the attempt.
    fn backoff(&self, attempt: &mut u32) -> Duration {
        let delay = crate::backoff::delay(
            *attempt,
            self.shared.cfg.reconnect_backoff,
            self.shared.cfg.max_reconnect_backoff,
            &mut rand::rng(),
        );
        *attempt = attempt.saturating_add(1);
        delay
    }

    /// Serves `s` until its socket is lost (`Some(why)`) or the connection stops (`None`).
    async fn serve(
        &mut self,
        s: &mut Session,
        events: &mut mpsc::UnboundedReceiver<SockEvent>,
        cancel: &CancellationToken,
    ) -> Option<String> {
        let mut tick = crate::ticker(control_gap(self.shared.market));
        loop {
            let flow = tokio::select! {
                biased;
                _ = cancel.cancelled() => Flow::Stop,
                cmd = self.cmd.recv() => match cmd {
                    Some(cmd) => {
                        self.on_command(s, cmd);
                        Flow::Continue
                    }
                    None => Flow::Stop,
                },
                ev = events.recv() => match ev {
                    Some(ev) => self.on_socket_event(s, ev),
                    None => Flow::Lost("event channel closed".to_string()),
                },
                _ = tick.tick() => self.on_tick(s).await,
            };
            match flow {
                Flow::Continue => {}
                Flow::Lost(why) => return Some(why),
                Flow::Stop => return None,
            }
        }
    }

    /// A change of streams from the manager: remembered (for reconnects) and queued on the
    /// socket and on its replacement, if one is being opened.
    fn on_command(&mut self, s: &mut Session, cmd: Cmd) {
        let (method, names) = match cmd {
            Cmd::Subscribe(names) => {
                for n in &names {
                    if let Some(p) = pair_of(self.shared.market, n) {
                        self.streams.insert(n.clone(), p);
                    }
                }
                ("SUBSCRIBE", names)
            }
            Cmd::Unsubscribe(names) => {
                for n in &names {
                    self.streams.remove(n);
                }
                ("UNSUBSCRIBE", names)
            }
        };
        s.cur.enqueue(method, &names, &mut self.next_msg_id);
        if let Some(n) = s.next.as_mut() {
            n.enqueue(method, &names, &mut self.next_msg_id);
        }
    }

    /// A reply or a close from one of the session's sockets.
    fn on_socket_event(&mut self, s: &mut Session, ev: SockEvent) -> Flow {
        let market = self.shared.market;
        match ev {
            SockEvent::Reply { gen, id, error } => {
                let sock = if gen == s.cur.gen {
                    Some(&mut s.cur)
                } else {
                    s.next.as_mut().filter(|n| n.gen == gen)
                };
                if let (Some(sock), Some(id)) = (sock, id) {
                    sock.acknowledged(id);
                }
                if let Some(e) = error {
                    warn!(%market, conn = self.id, error = %e, "Binance refused a stream request.");
                }
                Flow::Continue
            }
            SockEvent::Closed { gen, why } => {
                if gen == s.cur.gen {
                    match s.next.take() {
                        // The replacement is already open: switch to it (dropping the old
                        // socket stops its reader).
                        Some(n) => s.cur = n,
                        None => return Flow::Lost(why),
                    }
                } else if s.next.as_ref().is_some_and(|n| n.gen == gen) {
                    warn!(%market, conn = self.id, %why, "The replacement socket closed before taking over.");
                    s.next = None;
                }
                Flow::Continue
            }
        }
    }

    /// Every control gap: send the next queued request on each socket, hand over to a settled
    /// replacement, check the idle watchdog, and start a renewal when the socket is old.
    async fn on_tick(&mut self, s: &mut Session) -> Flow {
        crate::faults::hit("ws_connection");
        let market = self.shared.market;
        let gap = control_gap(market);
        if let Err(e) = s.cur.flush_one(gap).await {
            return Flow::Lost(e);
        }
        if let Some(n) = s.next.as_mut() {
            if n.flush_one(gap).await.is_err() {
                s.next = None;
            }
        }
        // Make-before-break: the new socket takes over once all its subscriptions are
        // acknowledged.
        if s.next.as_ref().is_some_and(Sock::settled) {
            if let Some(n) = s.next.take() {
                let old = std::mem::replace(&mut s.cur, n);
                old.close().await;
                info!(%market, conn = self.id, "Stream connection renewed.");
            }
        }
        let idle = s.cur.idle_ms();
        if !self.streams.is_empty() && idle > self.shared.cfg.idle_timeout.as_millis() as i64 {
            return Flow::Lost(format!("no data for {idle} ms (only pings or nothing)"));
        }
        if s.next.is_none()
            && s.cur.opened.elapsed() >= self.shared.cfg.max_lifetime
            && Instant::now() >= s.rotate_not_before
        {
            self.renew(s).await;
        }
        Flow::Continue
    }

    /// Opens the replacement socket of a renewal (or schedules the next try).
    async fn renew(&mut self, s: &mut Session) {
        match self.open_sock().await {
            Ok(n) => {
                s.next = Some(n);
                s.rotate_attempt = 0;
            }
            Err(e) => {
                let delay = self.backoff(&mut s.rotate_attempt);
                s.rotate_not_before = Instant::now() + delay;
                warn!(market = %self.shared.market, conn = self.id, error = %e, retry_in = ?delay,
                    "Cannot open the replacement socket; retrying.");
            }
        }
    }

    /// Opens a socket, retrying with backoff; `None` when cancelled.
    async fn connect(&mut self, cancel: &CancellationToken) -> Option<Sock> {
        let mut attempt = 0u32;
        loop {
            let opened = tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                r = self.open_sock() => r,
            };
            match opened {
                Ok(s) => return Some(s),
                Err(e) => {
                    let delay = self.backoff(&mut attempt);
                    warn!(market = %self.shared.market, conn = self.id, error = %e, retry_in = ?delay,
                        "Cannot open a stream socket; retrying.");
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Opens one socket carrying the current stream set (the first streams in the URL, the
    /// rest queued as SUBSCRIBE messages) and starts its reader.
    async fn open_sock(&mut self) -> Result<Sock, String> {
        let market = self.shared.market;
        self.gen += 1;
        let gen = self.gen;
        let names: Vec<String> = self.streams.keys().cloned().collect();
        let (in_url, rest) = names.split_at(names.len().min(URL_STREAMS));
        let url = stream_url(&self.shared.url, in_url);
        // Through the pool when `app.proxy.websocket` is on (the pool may still say direct).
        let egress = match &self.shared.pool {
            Some(pool) => Some(
                pool.pick(market, &Default::default(), |reason, wait| {
                    warn!(%market, %reason, ?wait, "No usable egress; waiting.");
                })
                .await
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let proxy = egress.as_ref().and_then(|e| e.proxy.clone());
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, open_ws(&url, proxy.as_ref())).await;
        let ws = match opened {
            Ok(Ok(ws)) => ws,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => format!("connecting to {} timed out", self.shared.url),
                };
                if let (Some(pool), Some(e)) = (&self.shared.pool, &egress) {
                    if e.is_proxy() {
                        pool.quarantine(e, PROXY_QUARANTINE, &why);
                        warn!(egress = %e.name, for_ = ?PROXY_QUARANTINE, reason = %why,
                            "Egress quarantined.");
                    }
                }
                return Err(why);
            }
        };
        let mut sock = Sock::start(
            ws,
            gen,
            market,
            self.events_tx.clone(),
            self.shared.out.clone(),
            self.shared.partials.clone(),
        );
        debug!(%market, conn = self.id, gen, streams = names.len(), "Stream socket open.");
        sock.enqueue("SUBSCRIBE", rest, &mut self.next_msg_id);
        Ok(sock)
    }
}
