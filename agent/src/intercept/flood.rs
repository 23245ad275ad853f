//! Connections that reach the enforcer without a kernel record can come
//! from anyone on the host, and a guarded caller can loop on a connect the
//! kernel refuses or on one its role is denied. Each is recorded up to a
//! rate (denied connections per caller), so a flood of them cannot fill the
//! audit log (and push older records out through retention); past the rate
//! they are counted, and the count is recorded once a second while there
//! is one.
use std::{
    collections::HashMap,
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

impl State {
    fn new(now: Instant) -> State {
        State { window: now, in_window: 0, suppressed: 0 }
    }

    fn admit(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window < PER_SECOND {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

impl Default for FloodGate {
    fn default() -> Self {
        FloodGate { state: Mutex::new(State::new(Instant::now())) }
    }
}

impl FloodGate {
    /// Whether a connection seen at `now` is recorded on its own (else it
    /// is only counted).
    pub fn admit(&self, now: Instant) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).admit(now)
    }

    /// The connections counted and not recorded since the last call.
    pub fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).suppressed)
    }
}

/// Callers followed at once; past it, new callers share one gate.
const MAX_CALLERS: usize = 4096;
const OTHERS: &str = "*";

/// A [`FloodGate`] per caller: one caller's flood does not silence the
/// records of another.
#[derive(Debug, Default)]
pub struct CallerGates {
    gates: Mutex<HashMap<String, State>>,
}

impl CallerGates {
    pub fn admit(&self, caller: &str, now: Instant) -> bool {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        let key = if gates.len() < MAX_CALLERS || gates.contains_key(caller) { caller } else { OTHERS };
        gates.entry(key.to_string()).or_insert_with(|| State::new(now)).admit(now)
    }

    /// Each caller's count since the last call; callers quiet for a while
    /// are forgotten.
    pub fn take_suppressed(&self, now: Instant) -> Vec<(String, u64)> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        let out = gates
            .iter_mut()
            .filter(|(_, s)| s.suppressed > 0)
            .map(|(k, s)| (k.clone(), std::mem::take(&mut s.suppressed)))
            .collect();
        gates.retain(|_, s| now.duration_since(s.window) < Duration::from_secs(10));
        out
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

    #[test]
    fn each_caller_has_its_own_rate() {
        let g = CallerGates::default();
        let t0 = Instant::now();
        assert_eq!((0..50).filter(|_| g.admit("a", t0)).count(), PER_SECOND as usize);
        assert!(g.admit("b", t0), "another caller is still recorded");
        assert_eq!(g.take_suppressed(t0), vec![("a".to_string(), 50 - PER_SECOND as u64)]);
        assert!(g.take_suppressed(t0).is_empty());
        // Forgotten once quiet.
        g.take_suppressed(t0 + Duration::from_secs(11));
        assert!(g.gates.lock().unwrap().is_empty());
    }
}
