//! The standalone client server's source of live data: it follows ClickHouse. Every
//! `follow_interval` it reads the rows of the subscribed series that were stored since the last
//! look (klines by `ingested_at`, indicator values by `version`) and publishes them to the hub,
//! so several servers on other machines can serve clients in front of one ClickHouse that a
//! daemon fills.
//!
//! Rows are read again for [`LAG`] after their ingest stamp (an insert stamped before a look
//! may become visible after it); the hub sends a candle once, and a value again only if a newer
//! computation replaced it (a correction). Only rows with `open_time` in the last
//! [`WINDOW_PERIODS`] periods are followed (the primary key bounds each look): a hole healed
//! further back reaches clients by replay, not live.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::hub::{Hub, IndicatorEvent};
use super::protocol::Channel;
use crate::market::{now_ms, PairKey};
use crate::store::replay::{Followed, FollowedValue};
use crate::store::{Store, StoreError};
use qs_core::indicators::Spec;

/// How long after its ingest stamp a row is still looked for.
pub const LAG: Duration = Duration::from_secs(30);

/// How far back (in periods of the pair) new rows are followed.
pub const WINDOW_PERIODS: i64 = 100;

/// Indicator values remembered per series to send each computation once.
const SENT_MEMORY: usize = 4096;

pub struct Follower {
    pub store: Store,
    pub hub: Hub,
    pub interval: Duration,
}

impl Follower {
    /// Follows until `cancel`. Read errors are logged and retried at the next look (clients
    /// keep their connections; nothing is skipped: the marks only move with rows read).
    pub async fn run(self, cancel: CancellationToken) {
        let (mut kline_mark, mut value_mark) = loop {
            match self.store.follow_marks().await {
                Ok(m) => break m,
                Err(e) => {
                    warn!(error = %e, "Client server: cannot read where to follow from; retrying.");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(self.interval.max(Duration::from_secs(1))) => {}
                    }
                }
            }
        };
        self.hub.attach_follower();
        let mut sent: HashMap<Channel, BTreeMap<i64, u64>> = HashMap::new();
        let mut tick = crate::ticker(self.interval);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let look = self.hub.look_started();
            match self.look(&mut kline_mark, &mut value_mark, &mut sent).await {
                Ok(n) => {
                    self.hub.look_done(look);
                    if n > 0 {
                        debug!(rows = n, "Client server: followed new rows.");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "Client server: following ClickHouse failed; retrying.")
                }
            }
        }
    }

    /// One look: publishes what is new; the number of rows read.
    async fn look(
        &self,
        kline_mark: &mut i64,
        value_mark: &mut u64,
        sent: &mut HashMap<Channel, BTreeMap<i64, u64>>,
    ) -> Result<usize, StoreError> {
        let now = now_ms();
        let channels = self.hub.subscribed_channels();
        sent.retain(|ch, _| channels.contains(ch));
        let followed: Vec<Followed> = channels
            .iter()
            .map(|ch| {
                let (pair, indicator) = match ch {
                    Channel::Klines(p) => (p.clone(), None),
                    Channel::Indicator(p, s) => (p.clone(), Some(s.clone())),
                };
                let period = pair.period.longest_ms();
                Followed {
                    floor: now.saturating_sub(period.saturating_mul(WINDOW_PERIODS)),
                    pair,
                    indicator,
                }
            })
            .collect();
        let lag_ms = i64::try_from(LAG.as_millis()).unwrap_or(i64::MAX);
        let lag_us = u64::try_from(LAG.as_micros()).unwrap_or(u64::MAX);
        let kline_series: Vec<&Followed> =
            followed.iter().filter(|f| f.indicator.is_none()).collect();
        let rows = self
            .store
            .klines_ingested_after(&kline_series, kline_mark.saturating_sub(lag_ms))
            .await?;
        let mut n = rows.len();
        for (k, ingested) in rows {
            *kline_mark = (*kline_mark).max(ingested);
            self.hub.publish_stored_kline(&k);
        }
        let value_series: Vec<&Followed> =
            followed.iter().filter(|f| f.indicator.is_some()).collect();
        let values = self
            .store
            .indicator_values_after(&value_series, value_mark.saturating_sub(lag_us))
            .await?;
        n += values.len();
        for v in &values {
            *value_mark = (*value_mark).max(v.version);
        }
        for (channel, events) in group(&values) {
            let Channel::Indicator(pair, spec) = &channel else {
                continue;
            };
            let seen = sent.entry(channel.clone()).or_default();
            let mut new = Vec::new();
            let mut corrected: Option<i64> = None;
            for (event, version) in events {
                match seen.get(&event.open_time) {
                    Some(&v) if v >= version => continue,
                    Some(_) => corrected = corrected.max(Some(event.open_time)),
                    None => {}
                }
                seen.insert(event.open_time, version);
                new.push(event);
            }
            while seen.len() > SENT_MEMORY {
                seen.pop_first();
            }
            self.hub
                .publish_indicators(pair, spec, &new, corrected, true);
        }
        Ok(n)
    }
}

/// Values grouped by series, then by candle (outputs in the spec's order), with the newest
/// version among a candle's rows.
fn group(values: &[FollowedValue]) -> Vec<(Channel, Vec<(IndicatorEvent, u64)>)> {
    // Per series: its events, and each event's newest version.
    let mut out: Vec<(Channel, Vec<IndicatorEvent>, Vec<u64>)> = Vec::new();
    let mut key: Option<(&str, &str, &str, &str)> = None;
    // Whether the current series could be read (rows of one that cannot are skipped).
    let mut usable = false;
    for v in values {
        let k = (
            v.market.as_str(),
            v.symbol.as_str(),
            v.period.as_str(),
            v.indicator.as_str(),
        );
        if key != Some(k) {
            key = Some(k);
            usable = match (
                PairKey::parse(&v.market, &v.symbol, &v.period),
                Spec::parse(&v.indicator),
            ) {
                (Ok(pair), Ok(spec)) => {
                    out.push((Channel::Indicator(pair, spec), Vec::new(), Vec::new()));
                    true
                }
                _ => false,
            };
        }
        let Some((Channel::Indicator(_, spec), events, versions)) =
            out.last_mut().filter(|_| usable)
        else {
            continue;
        };
        if IndicatorEvent::add(events, spec.outputs(), v.open_time, &v.output, v.value) {
            if versions.len() < events.len() {
                versions.push(v.version);
            } else if let Some(last) = versions.last_mut() {
                *last = (*last).max(v.version);
            }
        }
    }
    out.into_iter()
        .map(|(channel, events, versions)| (channel, events.into_iter().zip(versions).collect()))
        .collect()
}
