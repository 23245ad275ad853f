//! What the audit log records.
use serde::{Deserialize, Serialize};

use crate::ids::{OrigDst, SessionId};

/// One line of the log: when, and what.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

impl Record {
    pub fn now(event: Event) -> Record {
        Record { time_ms: super::now_ms(), event }
    }
}

/// The caller of a session, as established from the kernel's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallerInfo {
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub scope: Option<String>,
}

/// A decision as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecisionInfo {
    pub verdict: String,
    pub role: Option<String>,
    pub rule: String,
    pub reason: String,
}

impl From<&crate::policy::Decision> for DecisionInfo {
    fn from(d: &crate::policy::Decision) -> Self {
        DecisionInfo {
            verdict: d.verdict.to_string(),
            role: d.role.clone(),
            rule: d.rule.clone(),
            reason: d.reason.clone(),
        }
    }
}

/// A request as recorded, by protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "protocol", rename_all = "lowercase")]
pub enum RequestInfo {
    /// Opening a session to a target (every protocol's first decision).
    Session,
    Tcp {
        classes: Vec<String>,
    },
    /// One PostgreSQL statement (or FunctionCall message).
    Postgres {
        /// The statement's SQL text (for a FunctionCall: the function's oid).
        sql: String,
        /// What it is: SELECT, INSERT, CREATE TABLE, FunctionCall...
        kind: String,
        /// Every class it carries, its functions' included.
        classes: Vec<String>,
        /// Tables it touches, `schema.name`.
        tables: Vec<String>,
        /// Functions it calls, `schema.name`.
        functions: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    AgentStart {
        version: String,
        listen_port: u16,
    },
    AgentStop {
        reason: String,
    },
    PolicyLoaded {
        source: String,
        digest: String,
    },
    PolicyRejected {
        source: String,
        errors: Vec<String>,
    },
    SessionStart {
        session: SessionId,
        caller: CallerInfo,
        target: String,
        protocol: String,
        orig_dst: OrigDst,
        role: Option<String>,
    },
    Decision {
        session: SessionId,
        request: RequestInfo,
        decision: DecisionInfo,
    },
    SessionEnd {
        session: SessionId,
        reason: String,
        bytes_up: u64,
        bytes_down: u64,
    },
    /// A connection to the enforcer with no kernel record: closed.
    Unattributed {
        peer: String,
        reason: String,
    },
    /// A request held for approval.
    ApprovalRequested {
        id: u64,
        session: SessionId,
        target: String,
        request: String,
        rule: String,
        expires_ms: u64,
    },
    /// A webhook notification attempt.
    ApprovalNotified {
        id: u64,
        url: String,
        attempt: u32,
        ok: bool,
        error: Option<String>,
    },
    /// How a held request ended: approved (by whom, how widely), denied (by
    /// whom, why), timed out, or cancelled.
    ApprovalDecided {
        id: u64,
        session: SessionId,
        outcome: serde_json::Value,
    },
    /// An approve/deny from a process that may not answer (inside a guarded
    /// scope, or unidentifiable).
    ApprovalRefused {
        id: u64,
        uid: u32,
        pid: u32,
        exe: Option<String>,
        cgroup: Option<String>,
        reason: String,
    },
    /// A connect the kernel refused (egress deny, non-TCP to a target, the
    /// enforcer's port directly).
    KernelRefusal {
        kind: String,
        transport: String,
        dst: OrigDst,
        caller: CallerInfo,
    },
}
