//! The request loop. Two halves run side by side: the request side reads
//! the caller's messages, decides each statement and forwards it (or a
//! denial in its place); the response side forwards the upstream's answers
//! in order, tracking result shapes and putting each denial's ErrorResponse
//! where the upstream's answer to it would have been.
//!
//! A denial is sent upstream as a statement that fails with a marker only
//! portcullis knows (`SELECT '<marker>'::int4`, which fails while the server
//! analyses it, so also at Parse time). The upstream therefore fails exactly
//! where the denied statement would have: inside a transaction the
//! transaction is aborted (a later COMMIT cannot commit what came before),
//! in the extended protocol the server skips to Sync, and the order of
//! answers in a pipeline is kept without portcullis having to count them.
//! The response side swaps the marked error for the denial (SQLSTATE 42501,
//! naming the rule); the marker never reaches the caller.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tracing::{debug, warn};

use super::{
    classify::{self, class, ClassifyError, FunctionUse, Namespace, StatementInfo},
    denial_message,
    rows::{bind_fields, Pending, Tracker},
    wire::{self, cstr, cstr_utf8, i32_at, Frame, FrameReader, FrameWriter, Severity, WireError},
};
use crate::{
    audit::{DecisionInfo, Event, RequestInfo},
    ids::SessionId,
    policy::{decide::rule_of, decide_sql, Decision, Policy, SqlRequest, Verdict},
    protocols::{Outcome, Session},
};

/// Entries kept in the per-session classification cache.
const CACHE_ENTRIES: usize = 512;
/// Longest SQL text cached.
const CACHE_TEXT: usize = 4096;

#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected message {0:?} from the client")]
    Unexpected(char),
    #[error("audit log unavailable: {0}")]
    Audit(String),
}

/// SQLSTATE sent when the audit log refuses a record (system_error class:
/// the enforcer's own I/O failed, not the statement).
pub const AUDIT_UNAVAILABLE: &str = "58030";

/// Runs a started session until either side ends it.
pub async fn run<C, U>(session: &Session, client: FrameReader<C>, upstream: FrameReader<U>) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (c_stream, c_buf) = client.into_parts();
    let (u_stream, u_buf) = upstream.into_parts();
    let (cr, cw) = tokio::io::split(c_stream);
    let (ur, uw) = tokio::io::split(u_stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let nonce = SessionId::random().0;
    let txn = Arc::new(AtomicU64::new(0));
    let mut front = Front {
        session,
        from: FrameReader::with_buffer(cr, c_buf),
        to: FrameWriter::new(uw),
        events: tx,
        nonce,
        next_denial: 0,
        prepared: HashMap::new(),
        portals: HashMap::new(),
        cache: HashMap::new(),
        bytes: 0,
        cycles: 0,
        txn: txn.clone(),
        deferred: false,
    };
    let mut back = Back {
        from: FrameReader::with_buffer(ur, u_buf),
        to: FrameWriter::new(cw),
        events: rx,
        tracker: Tracker::default(),
        marker: marker_prefix(nonce),
        bytes: 0,
        txn,
        ready: 0,
    };
    let mut audit_failed = false;
    let reason = tokio::select! {
        r = front.run() => match r {
            Ok(why) => why.to_string(),
            Err(e) => {
                audit_failed = matches!(e, ProxyError::Audit(_));
                format!("client side: {e}")
            }
        },
        r = back.run() => match r {
            Ok(why) => why.to_string(),
            Err(e) => format!("upstream side: {e}"),
        },
    };
    if audit_failed {
        // The statement was not forwarded: tell the caller why before the
        // session closes, rather than leaving it with a bare disconnect.
        let mut out = BytesMut::new();
        wire::error_response(
            &mut out,
            Severity::Fatal,
            AUDIT_UNAVAILABLE,
            "portcullis: the audit log cannot be written; statements that change state are refused",
            None,
        );
        back.to.push(&out);
        let _ = back.to.flush().await;
    }
    Outcome { reason, bytes_up: front.bytes, bytes_down: back.bytes }
}

fn marker_prefix(nonce: u64) -> String {
    format!("pcx{nonce:016x}n")
}

/// What a statement name refers to, as far as decisions go.
#[derive(Clone)]
struct Prepared {
    /// None: the empty statement.
    info: Option<Arc<StatementInfo>>,
    /// Refused at Parse: executing it is refused too.
    denied: bool,
    /// The policy it was decided under.
    policy: Arc<Policy>,
}

type Classified = Arc<Result<Vec<StatementInfo>, ClassifyError>>;

struct Front<'s, R, W> {
    session: &'s Session,
    from: FrameReader<R>,
    to: FrameWriter<W>,
    events: mpsc::UnboundedSender<Pending>,
    nonce: u64,
    next_denial: u64,
    /// Statement namespace (protocol Parse and SQL PREPARE share it).
    prepared: HashMap<String, Prepared>,
    /// Portal → statement.
    portals: HashMap<String, String>,
    cache: HashMap<Box<str>, Classified>,
    bytes: u64,
    /// Exchanges sent that end with ReadyForQuery.
    cycles: u64,
    /// ReadyForQuery count and last status, from the response side.
    txn: Arc<AtomicU64>,
    /// Authorisations queued (not yet known to be on disk) inside the
    /// current transaction block.
    deferred: bool,
}

/// One statement's decision, before it is recorded.
struct Decided {
    info: Arc<StatementInfo>,
    decision: Decision,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Front<'_, R, W> {
    async fn run(&mut self) -> Result<&'static str, ProxyError> {
        loop {
            while let Some(frame) = self.from.try_frame()? {
                self.bytes += frame.raw.len() as u64;
                if frame.tag == b'X' {
                    self.to.push(&frame.raw);
                    self.to.flush().await?;
                    return Ok("client terminated");
                }
                self.handle(frame).await?;
            }
            self.to.flush().await?;
            if !self.from.fill().await? {
                return Ok("client closed the connection");
            }
        }
    }

    fn expect(&mut self, p: Pending) {
        if matches!(p, Pending::Query | Pending::Sync | Pending::FunctionCall | Pending::Denial { simple: true, .. }) {
            self.cycles += 1;
        }
        // The response side outlives every send; a failure means it ended,
        // and so will this side at its next read.
        let _ = self.events.send(p);
    }

    /// Whether the session is inside a transaction block, as of the last
    /// ReadyForQuery, with every exchange sent so far answered (otherwise
    /// the state is unknown and taken as "not in a block").
    fn in_block(&self) -> bool {
        let s = self.txn.load(Ordering::Acquire);
        s >> 8 == self.cycles && (s & 0xff) as u8 == b'T'
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), ProxyError> {
        match frame.tag {
            b'Q' => self.simple_query(frame).await,
            b'P' => self.parse(frame).await,
            b'B' => {
                let (portal, statement, formats) = bind_fields(frame.body())?;
                self.portals.insert(portal.clone(), statement.clone());
                self.expect(Pending::Bind { portal, statement, formats });
                self.to.push(&frame.raw);
                Ok(())
            }
            b'D' => {
                let mut body = frame.body();
                let kind = *body.first().ok_or(WireError::Malformed("describe"))?;
                body = &body[1..];
                let name = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
                self.expect(if kind == b'S' {
                    Pending::DescribeStatement(name)
                } else {
                    Pending::DescribePortal(name)
                });
                self.to.push(&frame.raw);
                Ok(())
            }
            b'E' => self.execute(frame).await,
            b'C' => {
                let mut body = frame.body();
                let kind = *body.first().ok_or(WireError::Malformed("close"))?;
                body = &body[1..];
                let name = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
                if kind == b'S' {
                    self.prepared.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
                self.expect(Pending::Close { portal: kind != b'S', name });
                self.to.push(&frame.raw);
                Ok(())
            }
            b'S' => {
                self.expect(Pending::Sync);
                self.to.push(&frame.raw);
                Ok(())
            }
            // Flush, and COPY data from the caller: the COPY itself was decided.
            b'H' | b'd' | b'c' | b'f' => {
                self.to.push(&frame.raw);
                Ok(())
            }
            b'F' => self.function_call(frame).await,
            other => Err(ProxyError::Unexpected(other as char)),
        }
    }

    /// Classifies SQL text, from the cache when seen before.
    fn classify(&mut self, sql: &str) -> Classified {
        if let Some(c) = self.cache.get(sql) {
            return c.clone();
        }
        let c: Classified = Arc::new(classify::classify(sql));
        if sql.len() <= CACHE_TEXT {
            if self.cache.len() >= CACHE_ENTRIES {
                self.cache.clear();
            }
            self.cache.insert(sql.into(), c.clone());
        }
        c
    }

    /// Decides one classified statement under `policy`, resolving `EXECUTE`
    /// to what was prepared.
    fn decide(&self, policy: &Policy, info: &StatementInfo) -> Decided {
        let mut info = info.clone();
        if let Namespace::Execute(name) = &info.namespace {
            match self.prepared.get(name) {
                Some(Prepared { info: Some(p), denied: false, .. }) => info.absorb(p),
                Some(Prepared { info: None, denied: false, .. }) => {}
                _ => {
                    let d = self.fail_closed(policy, &format!("prepared statement {name} is unknown or was refused"));
                    return Decided { info: Arc::new(info), decision: d };
                }
            }
        }
        let decision = if info.foreign {
            self.fail_closed(policy, &format!("{} is not a PostgreSQL statement portcullis accepts", info.kind))
        } else {
            let classes: Vec<&str> = info.classes.iter().copied().collect();
            let tables: Vec<&str> = info.tables.iter().map(String::as_str).collect();
            let functions: Vec<(&str, Option<&str>)> =
                info.functions.iter().map(|f| (f.name.as_str(), f.class)).collect();
            let req = SqlRequest { classes, tables, functions };
            decide_sql(policy, self.session.role.as_deref(), &self.session.target, &req)
        };
        Decided { info: Arc::new(info), decision: settle(decision) }
    }

    /// A denial that names the role's rule for this target (or why there is
    /// none), for requests refused before any rule could apply.
    fn fail_closed(&self, policy: &Policy, reason: &str) -> Decision {
        let role = self.session.role.as_deref();
        match rule_of(policy, role, &self.session.target) {
            Ok((r, rule)) => Decision::deny(Some(&r.name), crate::policy::decide::rule_ref(r, rule), reason),
            Err(d) => d,
        }
    }

    async fn simple_query(&mut self, frame: Frame) -> Result<(), ProxyError> {
        let policy = self.session.enforcer.policy();
        let mut body = frame.body();
        let sql = match cstr_utf8(&mut body) {
            Ok(s) => s,
            Err(_) => {
                let d = self.fail_closed(&policy, "query text is not valid UTF-8");
                self.record_unparsed("", &d);
                self.deny(true, &d);
                return Ok(());
            }
        };
        let classified = self.classify(sql);
        let statements = match classified.as_ref() {
            Err(e) => {
                let d = self.fail_closed(&policy, &format!("{e}; SQL portcullis cannot read is denied"));
                self.record_unparsed(sql, &d);
                self.deny(true, &d);
                return Ok(());
            }
            Ok(s) => s,
        };
        let decided: Vec<Decided> = statements.iter().map(|s| self.decide(&policy, s)).collect();
        let refused = decided.iter().position(|d| d.decision.verdict != Verdict::Allow);
        let single = decided.len() == 1;
        match refused {
            None => {
                self.record_all(&decided, single.then_some(sql)).await?;
                for d in &decided {
                    self.apply_namespace(&d.info, &policy);
                }
                self.expect(Pending::Query);
                self.to.push(&frame.raw);
            }
            Some(i) => {
                let why = decided[i].decision.clone();
                let n = decided.len();
                let decided: Vec<Decided> = decided
                    .into_iter()
                    .map(|d| {
                        if d.decision.verdict == Verdict::Allow {
                            let decision = Decision {
                                verdict: Verdict::Deny,
                                reason: format!("not run: statement {} of {n} in the same query was denied", i + 1),
                                ..d.decision
                            };
                            Decided { info: d.info, decision }
                        } else {
                            d
                        }
                    })
                    .collect();
                self.record_all(&decided, single.then_some(sql)).await?;
                self.deny(true, &why);
            }
        }
        Ok(())
    }

    async fn parse(&mut self, frame: Frame) -> Result<(), ProxyError> {
        let policy = self.session.enforcer.policy();
        let mut body = frame.body();
        let name = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
        let sql = match cstr_utf8(&mut body) {
            Ok(s) => s,
            Err(_) => {
                let d = self.fail_closed(&policy, "query text is not valid UTF-8");
                return self.refuse_parse(name, "", d);
            }
        };
        let classified = self.classify(sql);
        let statements = match classified.as_ref() {
            Err(e) => {
                let d = self.fail_closed(&policy, &format!("{e}; SQL portcullis cannot read is denied"));
                let sql = sql.to_string();
                return self.refuse_parse(name, &sql, d);
            }
            Ok(s) => s,
        };
        match statements.as_slice() {
            [] => {
                self.prepared.insert(name, Prepared { info: None, denied: false, policy });
                self.expect(Pending::Parse);
                self.to.push(&frame.raw);
            }
            [one] => {
                let d = self.decide(&policy, one);
                let sql = sql.to_string();
                self.record_all(std::slice::from_ref(&d), Some(&sql)).await?;
                if d.decision.verdict == Verdict::Allow {
                    self.prepared.insert(name, Prepared { info: Some(d.info), denied: false, policy });
                    self.expect(Pending::Parse);
                    self.to.push(&frame.raw);
                } else {
                    self.prepared.insert(name, Prepared { info: Some(d.info), denied: true, policy });
                    self.deny(false, &d.decision);
                }
            }
            _ => {
                let d = self.fail_closed(&policy, "a prepared statement holds one statement");
                let sql = sql.to_string();
                return self.refuse_parse(name, &sql, d);
            }
        }
        Ok(())
    }

    fn refuse_parse(&mut self, name: String, sql: &str, d: Decision) -> Result<(), ProxyError> {
        self.record_unparsed(sql, &d);
        let policy = self.session.enforcer.policy();
        self.prepared.insert(name, Prepared { info: None, denied: true, policy });
        self.deny(false, &d);
        Ok(())
    }

    async fn execute(&mut self, frame: Frame) -> Result<(), ProxyError> {
        let mut body = frame.body();
        let portal = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
        let statement = self.portals.get(&portal).cloned();
        if let Some(p) = statement.as_ref().and_then(|s| self.prepared.get(s)).cloned() {
            if p.denied {
                let policy = self.session.enforcer.policy();
                let d = self.fail_closed(&policy, "the statement of this portal was denied");
                self.deny(false, &d);
                return Ok(());
            }
            let policy = self.session.enforcer.policy();
            if let (Some(info), false) = (&p.info, Arc::ptr_eq(&policy, &p.policy)) {
                // The policy changed since Parse: decide again.
                let d = self.decide(&policy, info);
                self.record_all(std::slice::from_ref(&d), None).await?;
                let name = statement.expect("found by name");
                if d.decision.verdict != Verdict::Allow {
                    self.prepared.insert(name, Prepared { info: p.info.clone(), denied: true, policy });
                    self.deny(false, &d.decision);
                    return Ok(());
                }
                self.prepared.insert(name, Prepared { policy, ..p });
            }
        }
        // Unknown portals are SQL cursors (decided at DECLARE) or do not
        // exist (the server says so).
        self.expect(Pending::Execute(portal));
        self.to.push(&frame.raw);
        Ok(())
    }

    async fn function_call(&mut self, frame: Frame) -> Result<(), ProxyError> {
        let policy = self.session.enforcer.policy();
        let mut body = frame.body();
        let oid = i32_at(&mut body)? as u32;
        let info = StatementInfo {
            kind: "FunctionCall",
            sql: format!("FunctionCall oid {oid}"),
            classes: [class::FUNCTION_CALL].into_iter().collect(),
            tables: Default::default(),
            functions: [FunctionUse { name: format!("oid:{oid}"), class: Some(class::FUNCTION_CALL) }]
                .into_iter()
                .collect(),
            namespace: Namespace::None,
            foreign: false,
        };
        let d = self.decide(&policy, &info);
        self.record_all(std::slice::from_ref(&d), None).await?;
        if d.decision.verdict == Verdict::Allow {
            self.expect(Pending::FunctionCall);
            self.to.push(&frame.raw);
        } else {
            self.deny(true, &d.decision);
        }
        Ok(())
    }

    /// Effects of an allowed statement on the statement namespace.
    fn apply_namespace(&mut self, info: &Arc<StatementInfo>, policy: &Arc<Policy>) {
        match &info.namespace {
            Namespace::Prepare(name) => {
                self.prepared
                    .insert(name.clone(), Prepared { info: Some(info.clone()), denied: false, policy: policy.clone() });
            }
            Namespace::Deallocate(Some(name)) => {
                self.prepared.remove(name);
            }
            Namespace::DiscardAll => {
                // Protocol-level statements survive DEALLOCATE ALL in
                // PostgreSQL, but not DISCARD ALL; forgetting too much only
                // makes a later EXECUTE fail closed.
                self.prepared.clear();
            }
            Namespace::Deallocate(None) | Namespace::Execute(_) | Namespace::None => {}
        }
    }

    /// Sends a denial upstream in place of the request: a statement that
    /// fails with this session's marker, whose error the response side
    /// replaces with the denial.
    fn deny(&mut self, simple: bool, d: &Decision) {
        let id = self.next_denial;
        self.next_denial += 1;
        let mut error = BytesMut::new();
        let detail = format!("rule: {}", d.rule);
        wire::error_response(&mut error, Severity::Error, "42501", &denial_message(d), Some(&detail));
        self.expect(Pending::Denial { id, simple, error: error.freeze() });
        let sql = format!("SELECT '{}{id}'::pg_catalog.int4", marker_prefix(self.nonce));
        if simple {
            wire::query(&mut self.to.buf, &sql);
        } else {
            wire::parse(&mut self.to.buf, &format!("pcx{:016x}", self.nonce), &sql);
        }
    }

    /// Records each statement with its decision. The authorisation of a
    /// statement that may change state is on disk before it is forwarded;
    /// inside a transaction block, where a statement whose effects are
    /// transactional takes effect only at COMMIT, it is on disk before the
    /// COMMIT is forwarded instead.
    async fn record_all(&mut self, decided: &[Decided], original: Option<&str>) -> Result<(), ProxyError> {
        let in_block = self.in_block();
        let mut durable = false;
        for d in decided.iter().filter(|d| d.decision.verdict == Verdict::Allow) {
            let all = d.info.all_classes();
            if all.contains(class::TRANSACTION) && self.deferred {
                durable = true;
            }
            if !changes_state(&all) {
                continue;
            }
            if in_block && transactional(&d.info) {
                self.deferred = true;
            } else {
                durable = true;
            }
        }
        // Records are written in order: the last one on disk means all are.
        for (i, d) in decided.iter().enumerate() {
            let sql = match original {
                Some(o) if decided.len() == 1 => o.to_string(),
                _ => d.info.sql.clone(),
            };
            debug!(session = %self.session.id, kind = d.info.kind, verdict = %d.decision.verdict, rule = %d.decision.rule, "statement");
            let event = Event::Decision {
                session: self.session.id,
                request: RequestInfo::Postgres {
                    sql,
                    kind: d.info.kind.to_string(),
                    classes: d.info.all_classes().iter().map(|c| c.to_string()).collect(),
                    tables: d.info.tables.iter().cloned().collect(),
                    functions: d.info.functions.iter().map(|f| f.name.clone()).collect(),
                },
                decision: DecisionInfo::from(&d.decision),
            };
            if durable && i + 1 == decided.len() {
                self.deferred = false;
                return self.durable(event).await;
            }
            self.session.enforcer.audit.record(event);
        }
        Ok(())
    }

    async fn durable(&self, event: Event) -> Result<(), ProxyError> {
        self.session.enforcer.audit.record_durable(event).await.map_err(|e| {
            warn!(session = %self.session.id, error = %e, "audit write failed; closing the session");
            ProxyError::Audit(e.to_string())
        })
    }

    fn record_unparsed(&self, sql: &str, d: &Decision) {
        self.session.enforcer.audit.record(Event::Decision {
            session: self.session.id,
            request: RequestInfo::Postgres {
                sql: sql.to_string(),
                kind: "UNPARSED".into(),
                classes: Vec::new(),
                tables: Vec::new(),
                functions: Vec::new(),
            },
            decision: DecisionInfo::from(d),
        });
    }
}

/// Whether a statement of these classes may change state (anything beyond
/// reading, session settings and transaction control).
fn changes_state(classes: &std::collections::BTreeSet<&'static str>) -> bool {
    classes.iter().any(|c| ![class::READ, class::SESSION, class::TRANSACTION].contains(c))
}

/// Whether all of a statement's effects wait for COMMIT: its own classes
/// are transactional in PostgreSQL, and it calls no function with an effect
/// of its own (`nextval`, server functions and unknown functions act at
/// once).
fn transactional(info: &StatementInfo) -> bool {
    const TRANSACTIONAL: [&str; 7] =
        [class::READ, class::WRITE, class::DDL, class::DCL, class::COPY_IN, class::SESSION, class::TRANSACTION];
    info.classes.iter().all(|c| TRANSACTIONAL.contains(c))
        && info.functions.iter().all(|f| f.class.is_none() || f.class == Some(class::SESSION))
}

/// The one place a request waits on its decision. Approval holds are not
/// available yet: a request that needs approval is denied, and says so.
fn settle(d: Decision) -> Decision {
    match d.verdict {
        Verdict::Approve => Decision {
            verdict: Verdict::Deny,
            reason: format!("approval required ({}); approval holds are not available, so it is denied", d.reason),
            ..d
        },
        Verdict::Allow | Verdict::Deny => d,
    }
}

struct Back<R, W> {
    from: FrameReader<R>,
    to: FrameWriter<W>,
    events: mpsc::UnboundedReceiver<Pending>,
    tracker: Tracker,
    marker: String,
    bytes: u64,
    txn: Arc<AtomicU64>,
    ready: u64,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Back<R, W> {
    async fn run(&mut self) -> Result<&'static str, ProxyError> {
        loop {
            self.drain_events();
            while let Some(frame) = self.from.try_frame()? {
                match frame.tag {
                    b'D' => self.tracker.data_row(&frame, &mut self.to.buf),
                    b'E' => {
                        self.drain_events();
                        match self.replacement(&frame) {
                            Some(r) => self.to.push(&r),
                            None => self.to.push(&frame.raw),
                        }
                        self.tracker.observe(&frame)?;
                    }
                    _ => {
                        self.drain_events();
                        self.tracker.observe(&frame)?;
                        if frame.tag == b'Z' {
                            self.ready += 1;
                            let status = frame.body().first().copied().unwrap_or(b'I');
                            self.txn.store(self.ready << 8 | status as u64, Ordering::Release);
                        }
                        self.to.push(&frame.raw);
                    }
                }
                self.to.flush_if_large().await?;
            }
            self.bytes += self.to.buf.len() as u64;
            self.to.flush().await?;
            if !self.from.fill().await? {
                return Ok("upstream closed the connection");
            }
        }
    }

    fn drain_events(&mut self) {
        while let Ok(p) = self.events.try_recv() {
            self.tracker.expect(p);
        }
    }

    /// The denial that replaces a marked error.
    fn replacement(&self, frame: &Frame) -> Option<Bytes> {
        let message = wire::error_field(frame.body(), b'M')?;
        let marker = self.marker.as_bytes();
        let at = message.windows(marker.len()).position(|w| w == marker)?;
        let digits: String =
            message[at + marker.len()..].iter().take_while(|b| b.is_ascii_digit()).map(|&b| b as char).collect();
        let id: u64 = digits.parse().ok()?;
        Some(self.tracker.denial(id).unwrap_or_else(|| {
            // Cannot happen while the two sides agree; never show the marker.
            let mut b = BytesMut::new();
            wire::error_response(&mut b, Severity::Error, "42501", "permission denied by portcullis", None);
            b.freeze()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sql: &str) -> StatementInfo {
        classify::classify(sql).unwrap().remove(0)
    }

    #[test]
    fn effects_that_wait_for_commit() {
        assert!(transactional(&info("INSERT INTO t VALUES (1)")));
        assert!(transactional(&info("CREATE TABLE x (a int)")));
        assert!(!transactional(&info("SELECT nextval('s')")), "sequences move at once");
        assert!(!transactional(&info("SELECT my_func()")), "unknown functions may act at once");
        assert!(!transactional(&info("VACUUM t")));
        assert!(!transactional(&info("COPY t TO PROGRAM 'x'")));
        assert!(changes_state(&info("UPDATE t SET a = 1").all_classes()));
        assert!(!changes_state(&info("SELECT 1").all_classes()));
        assert!(!changes_state(&info("BEGIN").all_classes()));
        assert!(!changes_state(&info("SET work_mem = '1MB'").all_classes()));
    }

    #[test]
    fn approval_is_a_denial_that_says_so() {
        let d = Decision {
            verdict: Verdict::Approve,
            role: Some("r".into()),
            rule: "roles.r.rules[0]".into(),
            reason: "ddl is in approve".into(),
            mask: Vec::new(),
            approval_timeout: std::time::Duration::from_secs(1),
        };
        let s = settle(d);
        assert_eq!(s.verdict, Verdict::Deny);
        assert!(s.reason.contains("approval required") && s.reason.contains("ddl is in approve"));
        assert!(denial_message(&s).contains("roles.r.rules[0]"));
    }

    #[test]
    fn markers_are_per_session() {
        assert_ne!(marker_prefix(1), marker_prefix(2));
        assert!(marker_prefix(0xab).starts_with("pcx00000000000000abn"));
    }
}
