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
    /// One HTTP request. In its `decision` record `status` is set only when
    /// portcullis answered itself (a denial); its `request_end` record has
    /// the status and the bytes that passed.
    Http {
        /// Order of the request in its session (HTTP/2 interleaves them).
        seq: u64,
        method: String,
        host: String,
        /// The path, without the query (which may carry secrets).
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        /// Request body bytes forwarded upstream.
        #[serde(default)]
        bytes_up: u64,
        /// Response body bytes passed to the caller.
        #[serde(default)]
        bytes_down: u64,
    },
    /// A git smart-HTTP request: fetch, or a push with its ref updates.
    Git {
        service: String,
        repo: String,
        #[serde(default)]
        refs: Vec<RefUpdate>,
        #[serde(default)]
        classes: Vec<String>,
        /// A push's options (`git push -o ...`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        push_options: Vec<String>,
    },
}

/// One ref a push updates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefUpdate {
    pub name: String,
    pub old: String,
    pub new: String,
    /// create, update, fast-forward, force or delete.
    pub kind: String,
}

/// What came back to the caller for one request, after masking.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResponseSummary {
    /// The outcome in the protocol's terms: `200`, `SELECT 3`, `ERROR 42501`.
    pub status: Option<String>,
    /// Rows returned or affected, where the protocol says.
    pub rows: Option<u64>,
    /// Bytes sent to the caller for this response.
    pub bytes: u64,
    /// The content as the caller saw it (masked), cut at the configured cap.
    pub content: Option<String>,
    /// True when `content` was cut.
    #[serde(default)]
    pub truncated: bool,
}

/// A segment that retention deleted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeletedSegment {
    pub segment: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    pub closed_ms: u64,
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
    /// A forwarded request finished: its status and the bytes that passed.
    /// Its decision was recorded before it was forwarded.
    RequestEnd {
        session: SessionId,
        request: RequestInfo,
        /// Why it ended early, if it did (upstream error, body limit, the
        /// caller went away).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    SessionEnd {
        session: SessionId,
        reason: String,
        bytes_up: u64,
        bytes_down: u64,
    },
    /// A connection to the enforcer closed before it was attributed: no
    /// kernel record, or it could not be served.
    Unattributed {
        peer: String,
        reason: String,
    },
    /// Records past the rate kept one by one (`intercept::flood`), counted
    /// over the last second or so: `of` is `unattributed`,
    /// `kernel_refusal` or `denied_session` (with the caller's cgroup).
    Suppressed {
        of: String,
        count: u64,
        per_second: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caller: Option<String>,
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
    /// What the caller got back for a request (one per request that
    /// reached the upstream).
    Response {
        session: SessionId,
        summary: ResponseSummary,
    },
    /// Retention deleted whole old segments. The log now starts at
    /// `first_seq`, whose previous hash is `anchor`.
    Retention {
        reason: String,
        deleted: Vec<DeletedSegment>,
        first_seq: u64,
        anchor: String,
    },
    /// Opening the log found an incomplete or damaged tail and cut it.
    Recovery {
        segment: String,
        offset: u64,
        cut_bytes: u64,
        reason: String,
        saved_to: Option<String>,
    },
    /// Records that could not be written (disk full, I/O error), counted
    /// once writing works again. `durable` of them guarded state-changing
    /// requests (refused, or let through under `--audit-on-full allow`).
    AuditLoss {
        records: u64,
        durable: u64,
        first_ms: u64,
        last_ms: u64,
        error: String,
    },
    /// A connect the kernel refused (egress deny, non-TCP to a target, the
    /// enforcer's port directly).
    KernelRefusal {
        kind: String,
        transport: String,
        dst: OrigDst,
        caller: CallerInfo,
    },
    /// One ref a git push changes, with the decision on it (recorded
    /// before the push is forwarded or refused).
    GitRefUpdate {
        session: SessionId,
        repo: String,
        update: RefUpdate,
        decision: DecisionInfo,
    },
}
