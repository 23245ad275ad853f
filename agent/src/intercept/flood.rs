//! Connections that reach the enforcer without a kernel record can come
//! from anyone on the host, and a guarded caller can loop on a connect the
//! kernel refuses. Each is recorded up to a rate, so a flood of them cannot
//! fill the audit log (and push older records out through retention); past
//! the rate they are counted, and the count is recorded once a second
//! while there is one.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Records of one kind kept one by one per second.
pub const PER_SECOND: u32 = 20;

#[derive(Debug)]
pub struct FloodGate {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window: Instant,
    in_window: u32,
    suppressed: u64,
}

impl Default for FloodGate {
    fn default() -> Self {
        FloodGate { state: Mutex::new(State { window: Instant::now(), in_window: 0, suppressed: 0 }) }
    }
}

impl FloodGate {
    /// Whether a connection seen at `now` is recorded on its own (else it
    /// is only counted).
    pub fn admit(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(s.window) >= Duration::from_secs(1) {
            s.window = now;
            s.in_window = 0;
        }
        if s.in_window < PER_SECOND {
            s.in_window += 1;
            true
        } else {
            s.suppressed += 1;
            false
        }
    }

    /// The connections counted and not recorded since the last call.
    pub fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_records_up_to_the_rate_and_counts_the_rest() {
        let g = FloodGate::default();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| g.admit(t0)).count();
        assert_eq!(admitted, PER_SECOND as usize);
        assert_eq!(g.take_suppressed(), 100 - PER_SECOND as u64);
        assert_eq!(g.take_suppressed(), 0, "taken once");
        assert!(!g.admit(t0 + Duration::from_millis(999)), "same second");
        assert!(g.admit(t0 + Duration::from_secs(1)), "a new second");
        assert_eq!(g.take_suppressed(), 1);
    }
}
