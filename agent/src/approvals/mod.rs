//! Just-in-time approval: a request a rule marks `approve` is held, with the
//! caller's connection kept open, until a human approves or denies it
//! through the control socket, or its timeout denies it.
//!
//! Approvals can widen to the same request *shape* (a normalised statement,
//! a ref pattern) for the rest of the session (`--session`) or for a while
//! (`--for`). Webhooks are told about held requests but can never approve.
pub mod notify;

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};
use tracing::{info, warn};

use crate::{
    audit::{now_ms, Audit, CallerInfo, Event},
    ids::SessionId,
};

/// Id of a held request, shown to the caller and typed by the approver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApprovalId(pub u64);

impl fmt::Display for ApprovalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What is being held, as the protocol module describes it.
#[derive(Debug, Clone, Serialize)]
pub struct HoldRequest {
    pub session: SessionId,
    pub caller: CallerInfo,
    pub role: Option<String>,
    pub target: String,
    pub protocol: String,
    /// Human-readable request: the SQL text, `DELETE /v1/items/7`, `force
    /// push refs/heads/main`.
    pub request: String,
    /// The request's shape for widened approvals: equal shapes are "the
    /// same request" (normalised SQL, method and path pattern, ref).
    pub shape: String,
    /// The rule that asked for approval.
    pub rule: String,
    #[serde(skip)]
    pub timeout: Duration,
}

/// How far an approval reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "seconds")]
pub enum GrantScope {
    /// This request only.
    Once,
    /// This request and the same shape for the rest of the session.
    Session,
    /// This request and the same shape (same target and role) for a while.
    For(u64),
}

/// Who answered, from the kernel's peer credentials on the control socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approver {
    pub uid: u32,
    pub pid: u32,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    Approved {
        by: Option<Approver>,
        scope: GrantScope,
        standing: bool,
    },
    Denied {
        by: Approver,
        reason: String,
    },
    TimedOut,
    /// The caller went away while waiting.
    Cancelled,
}

impl Outcome {
    pub fn approved(&self) -> bool {
        matches!(self, Outcome::Approved { .. })
    }
    /// A sentence for the caller and the logs.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Approved { by: Some(a), .. } => format!("approved by uid {}", a.uid),
            Outcome::Approved { by: None, .. } => "approved by a standing approval".into(),
            Outcome::Denied { by, reason } if reason.is_empty() => format!("denied by uid {}", by.uid),
            Outcome::Denied { by, reason } => format!("denied by uid {}: {reason}", by.uid),
            Outcome::TimedOut => "approval timed out".into(),
            Outcome::Cancelled => "caller went away".into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("no pending request {0}")]
    NotFound(ApprovalId),
}

/// A pending request as listed.
#[derive(Debug, Clone, Serialize)]
pub struct PendingView {
    pub id: ApprovalId,
    #[serde(flatten)]
    pub request: HoldRequest,
    pub requested_ms: u64,
    pub expires_ms: u64,
}

/// Events for `approvals list --watch`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WatchEvent {
    Held(Box<PendingView>),
    Resolved { id: ApprovalId, outcome: Outcome },
}

struct Pending {
    view: PendingView,
    answer: oneshot::Sender<Outcome>,
}

struct Grant {
    scope: GrantScope,
    session: SessionId,
    target: String,
    role: Option<String>,
    shape: String,
    until: Option<Instant>,
    by: Approver,
}

/// A request waiting for its answer.
pub struct Ticket {
    pub id: ApprovalId,
    pub expires_ms: u64,
    wait: TicketWait,
}

impl Ticket {
    /// Whether the answer is already known (a standing approval matched):
    /// nobody needs to be asked.
    pub fn is_settled(&self) -> bool {
        matches!(self.wait, TicketWait::Ready(_))
    }
}

enum TicketWait {
    Ready(Outcome),
    Pending { rx: oneshot::Receiver<Outcome>, timeout: Duration },
}

pub struct Approvals {
    next: AtomicU64,
    pending: Mutex<BTreeMap<ApprovalId, Pending>>,
    grants: Mutex<Vec<Grant>>,
    audit: Audit,
    notifier: std::sync::RwLock<notify::Notifier>,
    watch: broadcast::Sender<WatchEvent>,
}

impl Approvals {
    pub fn new(audit: Audit, notifier: notify::Notifier) -> Approvals {
        // Ids start from the clock so they do not repeat across restarts.
        let start = now_ms() % 1_000_000 * 1000;
        Approvals {
            next: AtomicU64::new(start.max(1)),
            pending: Mutex::new(BTreeMap::new()),
            grants: Mutex::new(Vec::new()),
            audit,
            notifier: std::sync::RwLock::new(notifier),
            watch: broadcast::channel(256).0,
        }
    }

    /// Replaces the webhook (on policy reload).
    pub fn set_notifier(&self, n: notify::Notifier) {
        *self.notifier.write().expect("notifier") = n;
    }

    /// Holds `req`. A standing grant of the same shape answers at once; else
    /// the request is recorded, announced (log, webhook, watchers) and
    /// waits. The returned ticket carries the id to show the caller.
    pub fn submit(&self, req: HoldRequest) -> Ticket {
        let id = ApprovalId(self.next.fetch_add(1, Ordering::Relaxed));
        let now = now_ms();
        let expires_ms = now + req.timeout.as_millis() as u64;
        if let Some((scope, by)) = self.standing_grant(&req) {
            let outcome = Outcome::Approved { by: Some(by), scope, standing: true };
            self.audit.record(Event::ApprovalRequested {
                id: id.0,
                session: req.session,
                target: req.target.clone(),
                request: req.request.clone(),
                rule: req.rule.clone(),
                expires_ms,
            });
            self.audit.record(Event::ApprovalDecided {
                id: id.0,
                session: req.session,
                outcome: serde_json::to_value(&outcome).unwrap_or_default(),
            });
            info!(approval = %id, session = %req.session, target = %req.target, "held request matches a standing approval");
            return Ticket { id, expires_ms, wait: TicketWait::Ready(outcome) };
        }
        warn!(approval = %id, session = %req.session, target = %req.target, role = req.role.as_deref().unwrap_or("-"),
              rule = %req.rule, request = %req.request, timeout_s = req.timeout.as_secs(),
              "request held for approval: portcullis approvals approve {id}");
        self.audit.record(Event::ApprovalRequested {
            id: id.0,
            session: req.session,
            target: req.target.clone(),
            request: req.request.clone(),
            rule: req.rule.clone(),
            expires_ms,
        });
        let view = PendingView { id, request: req.clone(), requested_ms: now, expires_ms };
        self.notifier.read().expect("notifier").notify(&view, self.audit.clone());
        let _ = self.watch.send(WatchEvent::Held(Box::new(view.clone())));
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, Pending { view, answer: tx });
        Ticket { id, expires_ms, wait: TicketWait::Pending { rx, timeout: req.timeout } }
    }

    /// Waits for the answer, the timeout, or `gone` (the caller went away),
    /// and records the outcome.
    pub async fn wait(&self, ticket: Ticket, gone: impl std::future::Future<Output = ()>) -> Outcome {
        let (rx, timeout) = match ticket.wait {
            TicketWait::Ready(o) => return o,
            TicketWait::Pending { rx, timeout } => (rx, timeout),
        };
        let outcome = tokio::select! {
            answer = rx => answer.unwrap_or(Outcome::Cancelled),
            _ = tokio::time::sleep(timeout) => Outcome::TimedOut,
            _ = gone => Outcome::Cancelled,
        };
        // Whoever resolved it, it is no longer pending.
        if let Some(p) = self.pending.lock().expect("pending").remove(&ticket.id) {
            self.finish(&p.view, &outcome);
        }
        outcome
    }

    fn finish(&self, view: &PendingView, outcome: &Outcome) {
        info!(approval = %view.id, session = %view.request.session, outcome = %outcome.describe(), "approval resolved");
        self.audit.record(Event::ApprovalDecided {
            id: view.id.0,
            session: view.request.session,
            outcome: serde_json::to_value(outcome).unwrap_or_default(),
        });
        let _ = self.watch.send(WatchEvent::Resolved { id: view.id, outcome: outcome.clone() });
    }

    pub fn list(&self) -> Vec<PendingView> {
        self.pending.lock().expect("pending").values().map(|p| p.view.clone()).collect()
    }

    pub fn get(&self, id: ApprovalId) -> Option<PendingView> {
        self.pending.lock().expect("pending").get(&id).map(|p| p.view.clone())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.watch.subscribe()
    }

    pub fn approve(&self, id: ApprovalId, scope: GrantScope, by: Approver) -> Result<(), ApprovalError> {
        let p = self.pending.lock().expect("pending").remove(&id).ok_or(ApprovalError::NotFound(id))?;
        if scope != GrantScope::Once {
            let r = &p.view.request;
            self.grants.lock().expect("grants").push(Grant {
                scope,
                session: r.session,
                target: r.target.clone(),
                role: r.role.clone(),
                shape: r.shape.clone(),
                until: match scope {
                    GrantScope::For(s) => Some(Instant::now() + Duration::from_secs(s)),
                    _ => None,
                },
                by: by.clone(),
            });
        }
        let outcome = Outcome::Approved { by: Some(by), scope, standing: false };
        self.finish(&p.view, &outcome);
        let _ = p.answer.send(outcome);
        Ok(())
    }

    pub fn deny(&self, id: ApprovalId, reason: String, by: Approver) -> Result<(), ApprovalError> {
        let p = self.pending.lock().expect("pending").remove(&id).ok_or(ApprovalError::NotFound(id))?;
        let outcome = Outcome::Denied { by, reason };
        self.finish(&p.view, &outcome);
        let _ = p.answer.send(outcome);
        Ok(())
    }

    /// Cancels a pending request whose waiter is gone without waiting
    /// (its session was ended while it was held): recorded as cancelled.
    /// Nothing happens when it was already resolved.
    pub fn cancel(&self, id: ApprovalId) {
        let p = self.pending.lock().expect("pending").remove(&id);
        if let Some(p) = p {
            self.finish(&p.view, &Outcome::Cancelled);
        }
    }

    /// Forgets session-scoped grants when a session ends.
    pub fn session_closed(&self, session: SessionId) {
        self.grants.lock().expect("grants").retain(|g| !(g.scope == GrantScope::Session && g.session == session));
    }

    fn standing_grant(&self, req: &HoldRequest) -> Option<(GrantScope, Approver)> {
        let now = Instant::now();
        let mut grants = self.grants.lock().expect("grants");
        grants.retain(|g| g.until.is_none_or(|u| u > now));
        grants
            .iter()
            .find(|g| {
                g.shape == req.shape
                    && g.target == req.target
                    && match g.scope {
                        GrantScope::Session => g.session == req.session,
                        GrantScope::For(_) => g.role == req.role,
                        GrantScope::Once => false,
                    }
            })
            .map(|g| (g.scope, g.by.clone()))
    }
}

/// Parses `30s`, `5m`, `2h` (for `approve --for`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approvals() -> (Approvals, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(crate::audit::AuditConfig::new(dir.path().to_path_buf())).unwrap();
        (Approvals::new(audit, notify::Notifier::disabled()), dir)
    }

    fn req(session: u64, shape: &str, timeout: Duration) -> HoldRequest {
        HoldRequest {
            session: SessionId(session),
            caller: CallerInfo::default(),
            role: Some("ci".into()),
            target: "db".into(),
            protocol: "postgres".into(),
            request: format!("{shape};"),
            shape: shape.into(),
            rule: "roles.ci.rules[0]".into(),
            timeout,
        }
    }

    fn approver() -> Approver {
        Approver { uid: 1000, pid: 42, ..Default::default() }
    }

    #[tokio::test]
    async fn approve_releases_the_waiter() {
        let (a, _d) = approvals();
        let t = a.submit(req(1, "create table t", Duration::from_secs(60)));
        let id = t.id;
        assert_eq!(a.list().len(), 1);
        a.approve(id, GrantScope::Once, approver()).unwrap();
        let o = a.wait(t, std::future::pending()).await;
        assert!(o.approved(), "{o:?}");
        assert!(a.list().is_empty());
        assert_eq!(a.approve(id, GrantScope::Once, approver()), Err(ApprovalError::NotFound(id)));
    }

    #[tokio::test]
    async fn deny_timeout_and_cancel() {
        let (a, _d) = approvals();
        let t = a.submit(req(1, "drop table t", Duration::from_secs(60)));
        a.deny(t.id, "not today".into(), approver()).unwrap();
        assert!(
            matches!(a.wait(t, std::future::pending()).await, Outcome::Denied { reason, .. } if reason == "not today")
        );

        let t = a.submit(req(1, "drop table t", Duration::from_millis(10)));
        assert_eq!(a.wait(t, std::future::pending()).await, Outcome::TimedOut);
        assert!(a.list().is_empty(), "a timed-out request is no longer pending");

        let t = a.submit(req(1, "drop table t", Duration::from_secs(60)));
        assert_eq!(a.wait(t, async {}).await, Outcome::Cancelled);
        assert!(a.list().is_empty());
    }

    #[tokio::test]
    async fn session_grants_cover_the_same_shape_in_the_same_session_only() {
        let (a, _d) = approvals();
        let t = a.submit(req(7, "alter table t", Duration::from_secs(60)));
        a.approve(t.id, GrantScope::Session, approver()).unwrap();
        assert!(a.wait(t, std::future::pending()).await.approved());
        let again = a.submit(req(7, "alter table t", Duration::from_secs(60)));
        assert!(matches!(a.wait(again, std::future::pending()).await, Outcome::Approved { standing: true, .. }));
        // Another shape, or another session, is held again.
        let other = a.submit(req(7, "drop table t", Duration::from_millis(5)));
        assert_eq!(a.wait(other, std::future::pending()).await, Outcome::TimedOut);
        let other = a.submit(req(8, "alter table t", Duration::from_millis(5)));
        assert_eq!(a.wait(other, std::future::pending()).await, Outcome::TimedOut);
        a.session_closed(SessionId(7));
        let after = a.submit(req(7, "alter table t", Duration::from_millis(5)));
        assert_eq!(a.wait(after, std::future::pending()).await, Outcome::TimedOut);
    }

    #[tokio::test]
    async fn duration_grants_cover_other_sessions_until_they_expire() {
        let (a, _d) = approvals();
        let t = a.submit(req(1, "alter table t", Duration::from_secs(60)));
        a.approve(t.id, GrantScope::For(3600), approver()).unwrap();
        a.wait(t, std::future::pending()).await;
        let other = a.submit(req(2, "alter table t", Duration::from_secs(60)));
        assert!(a.wait(other, std::future::pending()).await.approved());
        // Expired grants are dropped.
        a.grants.lock().unwrap()[0].until = Some(Instant::now() - Duration::from_secs(1));
        let late = a.submit(req(3, "alter table t", Duration::from_millis(5)));
        assert_eq!(a.wait(late, std::future::pending()).await, Outcome::TimedOut);
    }

    #[tokio::test]
    async fn cancel_removes_a_pending_request_once() {
        let (a, _d) = approvals();
        let t = a.submit(req(1, "drop table t", Duration::from_secs(60)));
        let id = t.id;
        drop(t);
        a.cancel(id);
        assert!(a.list().is_empty());
        a.cancel(id);
        assert_eq!(a.approve(id, GrantScope::Once, approver()), Err(ApprovalError::NotFound(id)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("soon"), None);
    }
}
