//! State shared by every connection task: the policy in force, the audit
//! log, the kernel's connection records, counters and live sessions.
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::{
    approvals::Approvals,
    audit::Audit,
    ids::{OrigDst, SessionId},
    intercept::{
        cgroup::CgroupResolver,
        flood::{CallerGates, FloodGate},
        probes::ConnTable,
    },
    policy::{Decision, Policy, Verdict},
    tls::LocalCa,
};

/// Settings fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen_port: u16,
    /// `SO_MARK` on every upstream socket the enforcer opens.
    pub mark: u32,
}

pub struct Enforcer {
    policy: RwLock<Arc<Policy>>,
    pub audit: Audit,
    pub cgroups: CgroupResolver,
    pub conns: ConnTable,
    pub settings: Settings,
    /// Mints the certificates presented to callers that speak TLS.
    pub ca: Arc<LocalCa>,
    /// Requests held for a human's approval.
    pub approvals: Arc<Approvals>,
    pub stats: Stats,
    /// Rates of unattributed connections and kernel refusals recorded one
    /// by one.
    pub unattributed_gate: FloodGate,
    pub refusal_gate: FloodGate,
    /// Rate of denied connections recorded one by one, per caller.
    pub denied_gates: CallerGates,
    live: Mutex<BTreeMap<SessionId, LiveEntry>>,
}

struct LiveEntry {
    info: LiveSession,
    /// Ends the session when a reload revokes it (taken once used).
    revoke: Option<oneshot::Sender<String>>,
}

impl Enforcer {
    pub fn new(
        policy: Policy,
        audit: Audit,
        cgroups: CgroupResolver,
        conns: ConnTable,
        settings: Settings,
        ca: Arc<LocalCa>,
        approvals: Arc<Approvals>,
    ) -> Enforcer {
        Enforcer {
            policy: RwLock::new(Arc::new(policy)),
            audit,
            cgroups,
            conns,
            settings,
            ca,
            approvals,
            stats: Stats::default(),
            unattributed_gate: FloodGate::default(),
            refusal_gate: FloodGate::default(),
            denied_gates: CallerGates::default(),
            live: Mutex::new(BTreeMap::new()),
        }
    }

    /// The policy in force now. Each decision reads it afresh, so a reload
    /// applies to the next request of an already open session too.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    pub fn set_policy(&self, p: Policy) {
        *self.policy.write().expect("policy lock") = Arc::new(p);
    }

    /// Registers a session; the receiver fires if a policy change revokes
    /// the session's right to exist (see `revalidate`).
    pub fn session_opened(&self, s: LiveSession) -> oneshot::Receiver<String> {
        let (tx, rx) = oneshot::channel();
        self.live.lock().expect("live lock").insert(s.session, LiveEntry { info: s, revoke: Some(tx) });
        rx
    }

    pub fn session_closed(&self, id: SessionId) {
        self.live.lock().expect("live lock").remove(&id);
        self.approvals.session_closed(id);
    }

    pub fn live_sessions(&self) -> Vec<LiveSession> {
        self.live.lock().expect("live lock").values().map(|e| e.info.clone()).collect()
    }

    /// Re-decides every open session under the policy now in force and
    /// ends those it no longer admits: a connection opened before a policy
    /// change cannot outlive the access it was opened with. Returns how
    /// many were revoked.
    pub fn revalidate(&self) -> usize {
        let policy = self.policy();
        let mut live = self.live.lock().expect("live lock");
        let mut revoked = 0;
        for e in live.values_mut() {
            let s = &e.info;
            let seen = crate::policy::SessionSeen {
                subject: &s.subject,
                dst: s.orig_dst.0,
                approved: s.approved,
                role: s.role.as_deref(),
                target: &s.target,
            };
            let Some(reason) = crate::policy::revalidate(&policy, &seen) else {
                continue;
            };
            if let Some(tx) = e.revoke.take() {
                let _ = tx.send(reason);
                revoked += 1;
            }
        }
        revoked
    }
}

/// A session in progress, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSession {
    pub session: SessionId,
    pub target: String,
    pub protocol: String,
    pub orig_dst: OrigDst,
    pub role: Option<String>,
    pub tgid: u32,
    pub comm: String,
    pub unit: Option<String>,
    pub since_ms: u64,
    #[serde(skip)]
    pub subject: crate::policy::Subject,
    /// The session was admitted by a human's approval (its rule says
    /// `approve`), which a reload keeps as long as the rule still does.
    #[serde(skip)]
    pub approved: bool,
}

/// Labels of a decision counter: what was decided, for whom, where.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DecisionKey {
    pub verdict: String,
    /// Empty when the caller has no role.
    pub role: String,
    /// Empty when the destination matched no target.
    pub target: String,
    pub protocol: String,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub unattributed: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub kernel_refusals: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Times a scope was attached again because its cgroup was recreated
    /// (a unit restarted) or appeared.
    pub reattachments: AtomicU64,
    /// Requests held for a human now (a gauge).
    pub approvals_held: AtomicU64,
    /// Every decision (session-level and per request), by labels. Sessions
    /// keep the counters they use, so counting takes no lock.
    decisions: Mutex<BTreeMap<DecisionKey, Arc<AtomicU64>>>,
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BTreeMap::from([
            ("accepted", l(&self.accepted)),
            ("unattributed", l(&self.unattributed)),
            ("allowed", l(&self.allowed)),
            ("denied", l(&self.denied)),
            ("kernel_refusals", l(&self.kernel_refusals)),
            ("upstream_failures", l(&self.upstream_failures)),
            ("bytes_up", l(&self.bytes_up)),
            ("bytes_down", l(&self.bytes_down)),
            ("reloads", l(&self.reloads)),
            ("reload_failures", l(&self.reload_failures)),
            ("reattachments", l(&self.reattachments)),
            ("approvals_held", l(&self.approvals_held)),
        ])
    }

    /// Counts one decision. Every place that decides (the session check
    /// and each protocol's per-request check) reports here, so the metrics
    /// see every decision by verdict, role, target and protocol.
    pub fn decision(&self, decision: &Decision, target: &str, protocol: &str) {
        Stats::inc(&self.decision_counter(decision, target, protocol));
    }

    /// The counter of decisions with these labels, for a caller that counts
    /// many (see [`DecisionCounters`]).
    pub fn decision_counter(&self, decision: &Decision, target: &str, protocol: &str) -> Arc<AtomicU64> {
        let key = DecisionKey {
            verdict: decision.verdict.to_string(),
            role: decision.role.clone().unwrap_or_default(),
            target: target.to_string(),
            protocol: protocol.to_string(),
        };
        self.decisions.lock().expect("decisions lock").entry(key).or_default().clone()
    }

    pub fn decisions(&self) -> Vec<(DecisionKey, u64)> {
        self.decisions
            .lock()
            .expect("decisions lock")
            .iter()
            .map(|(k, n)| (k.clone(), n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// One session's decision counters for a target and protocol, by verdict:
/// counting a request's decision is then one atomic add.
#[derive(Default)]
pub struct DecisionCounters {
    /// (verdict, role) and its counter.
    known: Vec<(Verdict, Option<String>, Arc<AtomicU64>)>,
}

impl DecisionCounters {
    pub fn count(&mut self, stats: &Stats, decision: &Decision, target: &str, protocol: &str) {
        let found =
            self.known.iter().find(|(v, r, _)| *v == decision.verdict && r.as_deref() == decision.role.as_deref());
        match found {
            Some((_, _, c)) => Stats::inc(c),
            None => {
                let c = stats.decision_counter(decision, target, protocol);
                Stats::inc(&c);
                self.known.push((decision.verdict, decision.role.clone(), c));
            }
        }
    }
}

/// Counts a request in the `approvals_held` gauge for as long as it lives,
/// whichever way the wait ends (the session's task dropped included).
pub struct HeldGauge<'s>(&'s AtomicU64);

impl<'s> HeldGauge<'s> {
    pub fn new(stats: &'s Stats) -> HeldGauge<'s> {
        Stats::inc(&stats.approvals_held);
        HeldGauge(&stats.approvals_held)
    }
}

impl Drop for HeldGauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
