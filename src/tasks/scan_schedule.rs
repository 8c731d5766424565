//! When gap scans run: one cron job per period (tokio-cron-scheduler, schedules from
//! `app.gap_scan.schedules`) ticking a broadcast channel that every pair task of that period
//! listens to. The scans themselves are the pair task's (`tasks::pair`).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::config::GapScanConfig;
use crate::market::Period;

/// Gap-scan ticks per period, driven by cron jobs of tokio-cron-scheduler. The broadcast
/// senders outlive schedule changes, so pair tasks keep their receivers.
pub struct ScanScheduler {
    sched: tokio_cron_scheduler::JobScheduler,
    pub ticks: Ticks,
    jobs: Vec<Uuid>,
}

/// One tick channel per period (every period has one).
#[derive(Clone)]
pub struct Ticks(Arc<HashMap<Period, broadcast::Sender<()>>>);

impl Ticks {
    pub fn subscribe(&self, p: Period) -> broadcast::Receiver<()> {
        match self.0.get(&p) {
            Some(tx) => tx.subscribe(),
            // Unreachable; a receiver that never ticks only means no scans.
            None => broadcast::channel(1).1,
        }
    }
}

impl ScanScheduler {
    pub async fn start(cfg: &GapScanConfig) -> anyhow::Result<ScanScheduler> {
        let sched = tokio_cron_scheduler::JobScheduler::new()
            .await
            .context("cannot create the gap-scan scheduler")?;
        sched
            .start()
            .await
            .context("cannot start the gap-scan scheduler")?;
        let ticks = Ticks(Arc::new(
            Period::ALL
                .iter()
                .map(|p| (*p, broadcast::channel(4).0))
                .collect(),
        ));
        let mut s = ScanScheduler {
            sched,
            ticks,
            jobs: Vec::new(),
        };
        s.set(cfg).await?;
        Ok(s)
    }

    /// Replaces the cron jobs with those of `cfg`.
    pub async fn set(&mut self, cfg: &GapScanConfig) -> anyhow::Result<()> {
        for id in std::mem::take(&mut self.jobs) {
            let _ = self.sched.remove(&id).await;
        }
        for p in Period::ALL {
            let expr = cfg.cron_for(p);
            let tx = self
                .ticks
                .0
                .get(&p)
                .cloned()
                .context("tick channel missing")?;
            let job = tokio_cron_scheduler::Job::new_async(expr.as_str(), move |_, _| {
                let tx = tx.clone();
                Box::pin(async move {
                    let _ = tx.send(());
                })
            })
            .with_context(|| format!("bad gap-scan schedule {expr:?} for {p}"))?;
            let id = self
                .sched
                .add(job)
                .await
                .context("cannot add a gap-scan job")?;
            self.jobs.push(id);
        }
        Ok(())
    }

    pub async fn shutdown(mut self) {
        let _ = self.sched.shutdown().await;
    }
}
