//! Jittered exponential backoff, shared by every retry loop (writer, REST client, daemon start,
//! the supervisor's restarts, stream reconnects, catch-ups).

use std::time::Duration;

use rand::Rng;

/// "Equal jitter" exponential backoff: attempt 0 waits between `base/2` and `base`, doubling each
/// attempt up to `max`.
pub fn delay(attempt: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let cap = base.saturating_mul(1u32 << attempt.min(20)).min(max);
    let lo = cap / 2;
    lo + cap.saturating_sub(lo).mul_f64(rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_bounded() {
        let mut rng = rand::rng();
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut seen = std::collections::HashSet::new();
        for attempt in 0..40 {
            let d = delay(attempt, base, max, &mut rng);
            assert!(d <= max, "attempt {attempt}: {d:?}");
            let cap = base.saturating_mul(1u32 << attempt.min(20)).min(max);
            assert!(d >= cap / 2, "attempt {attempt}: {d:?} < {:?}", cap / 2);
            seen.insert(d);
        }
        assert!(seen.len() > 20, "no jitter");
    }
}
