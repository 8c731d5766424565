//! The operator: reads desired state (`trading_pairs`, `proxy_config`, `app.yaml`), computes
//! the plan and has the supervisor and the stream managers converge to it, level-triggered,
//! every poll or config change. See `run` for the daemon's runtime around it.

pub mod daemon;
pub mod desired;
pub mod observe;
pub mod plan;
pub mod proxies;
pub mod runtime;
pub mod supervisor;
