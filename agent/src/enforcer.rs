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

use crate::{
    audit::Audit,
    ids::{OrigDst, SessionId},
    intercept::{cgroup::CgroupResolver, probes::ConnTable},
    policy::{Decision, Policy},
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
    pub stats: Stats,
    live: Mutex<BTreeMap<SessionId, LiveSession>>,
}

impl Enforcer {
    pub fn new(
        policy: Policy,
        audit: Audit,
        cgroups: CgroupResolver,
        conns: ConnTable,
        settings: Settings,
    ) -> Enforcer {
        Enforcer {
            policy: RwLock::new(Arc::new(policy)),
            audit,
            cgroups,
            conns,
            settings,
            stats: Stats::default(),
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

    pub fn session_opened(&self, s: LiveSession) {
        self.live.lock().expect("live lock").insert(s.session, s);
    }

    pub fn session_closed(&self, id: SessionId) {
        self.live.lock().expect("live lock").remove(&id);
    }

    pub fn live_sessions(&self) -> Vec<LiveSession> {
        self.live.lock().expect("live lock").values().cloned().collect()
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
    /// Every decision (session-level and per request), by labels.
    decisions: Mutex<BTreeMap<DecisionKey, u64>>,
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
        let key = DecisionKey {
            verdict: decision.verdict.to_string(),
            role: decision.role.clone().unwrap_or_default(),
            target: target.to_string(),
            protocol: protocol.to_string(),
        };
        *self.decisions.lock().expect("decisions lock").entry(key).or_default() += 1;
    }

    pub fn decisions(&self) -> Vec<(DecisionKey, u64)> {
        self.decisions.lock().expect("decisions lock").iter().map(|(k, n)| (k.clone(), *n)).collect()
    }
}
