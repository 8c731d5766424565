//! Fault points: named places where a test running in this process can make the code panic
//! once, to prove that the task's owner notices (restarts it, or shuts down loudly). Inert
//! unless a test arms them — no config key, environment variable or flag can — and cheap when
//! inert (one relaxed atomic load per hit).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

static ARMED: AtomicBool = AtomicBool::new(false);
static POINTS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Makes the next [`hit`] of `point` panic (once).
pub fn arm(point: &'static str) {
    POINTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(point);
    ARMED.store(true, Ordering::SeqCst);
}

/// Whether `point` is still armed (not hit yet).
pub fn is_armed(point: &str) -> bool {
    POINTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&point)
}

/// Panics if a test armed `point` and it has not fired yet.
pub fn hit(point: &'static str) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    let fire = {
        let mut points = POINTS.lock().unwrap_or_else(PoisonError::into_inner);
        match points.iter().position(|p| *p == point) {
            Some(i) => {
                points.swap_remove(i);
                if points.is_empty() {
                    ARMED.store(false, Ordering::SeqCst);
                }
                true
            }
            None => false,
        }
    };
    if fire {
        panic!("injected fault at {point}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_point_panics_once_and_others_never() {
        hit("faults_test_a");
        arm("faults_test_a");
        assert!(is_armed("faults_test_a"));
        hit("faults_test_b");
        let r = std::panic::catch_unwind(|| hit("faults_test_a"));
        assert!(r.is_err());
        assert!(!is_armed("faults_test_a"));
        hit("faults_test_a");
    }
}
