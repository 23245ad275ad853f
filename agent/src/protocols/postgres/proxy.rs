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
    mask::{Columns, RowMasker},
    rows::{bind_fields, Pending, Tracker},
    wire::{self, cstr, cstr_utf8, i32_at, Frame, FrameReader, FrameWriter, Severity, WireError},
};
use crate::{
    approvals::{self, HoldRequest},
    audit::{DecisionInfo, Event, RequestInfo, ResponseSummary},
    enforcer::{DecisionCounters, Stats},
    ids::SessionId,
    masking::Mode,
    policy::{decide::rule_of, decide_sql, Decision, Policy, SqlRequest, Verdict},
    protocols::{Outcome, Session},
};

/// Bytes a caller may send while one of its statements is held; more ends
/// the session (they would only pile up in memory).
const HELD_INPUT: usize = 16 << 20;

/// What masking a session needs: the column rules for the request side,
/// and the masker for the response side.
pub struct Masking {
    pub columns: Columns,
    pub rows: Option<RowMasker>,
    /// What the masks were made from: the rule's `mask` entries and the
    /// policy's `[masking]` section, under `policy`.
    pub source: MaskSource,
    pub policy: Arc<Policy>,
}

/// The inputs of a session's masks, compared after a reload.
pub type MaskSource = Option<(Vec<String>, crate::masking::MaskSettings)>;

/// The mask inputs of the session's rule under `policy` (None: no rule).
pub fn mask_source(policy: &Policy, session: &Session) -> MaskSource {
    rule_of(policy, session.role.as_deref(), &session.target)
        .ok()
        .map(|(_, r)| (r.mask.clone(), policy.masking.clone()))
}

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
    #[error("{0}")]
    Masking(String),
}

/// SQLSTATE sent when the audit log refuses a record (system_error class:
/// the enforcer's own I/O failed, not the statement).
pub const AUDIT_UNAVAILABLE: &str = "58030";

/// Runs a started session until either side ends it.
pub async fn run<C, U>(session: &Session, client: FrameReader<C>, upstream: FrameReader<U>, masking: Masking) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (c_stream, c_buf) = client.into_parts();
    let (u_stream, u_buf) = upstream.into_parts();
    let (cr, cw) = tokio::io::split(c_stream);
    let (ur, uw) = tokio::io::split(u_stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let (oob_tx, oob_rx) = mpsc::unbounded_channel();
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
        by_numbers: HashMap::new(),
        key: String::new(),
        memo: Memo { policy: None, entries: HashMap::new() },
        bytes: 0,
        cycles: 0,
        txn: txn.clone(),
        deferred: false,
        columns: masking.columns,
        oob: oob_tx,
        mask_source: masking.source,
        mask_policy: masking.policy,
        counters: DecisionCounters::default(),
    };
    let mut back = Back {
        session,
        from: FrameReader::with_buffer(ur, u_buf),
        to: FrameWriter::new(cw),
        events: rx,
        tracker: Tracker::with_masker(masking.rows),
        oob: oob_rx,
        marker: marker_prefix(nonce),
        bytes: 0,
        txn,
        ready: 0,
        answer: Answer::default(),
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

/// A cache key for SQL text that stands for the same text with any
/// unsigned numbers: each number becomes `\u{1}`. Only for text whose lexing is plain: no quotes of any kind, no
/// dollar signs (parameters, dollar quoting), no backslashes, no comments
/// and no control characters; otherwise `None` (cache by exact text only).
/// A number is a run of digits, letters, `_` and `.` that starts with a
/// digit not preceded by a name character (`t1` stays a name), and it must
/// be a plain decimal (`12`, `1.5`, `1.5e3`): any other run (`1FROM`, which
/// older servers read as `1 FROM`; `0x1f`; `1_000`) means no key, since two
/// texts that share a key must lex alike.
#[cfg(test)]
fn numbers_key(sql: &str) -> Option<String> {
    let mut out = String::new();
    numbers_key_into(sql, &mut out).then_some(out)
}

/// [`numbers_key`] written into `out` (cleared first), so that a session
/// reuses one buffer; false when there is no such key.
fn numbers_key_into(sql: &str, out: &mut String) -> bool {
    out.clear();
    let b = sql.as_bytes();
    if b.iter().any(|&c| {
        matches!(c, b'\'' | b'"' | b'$' | b'\\' | b'`') || c < 0x20 && !matches!(c, b' ' | b'\t' | b'\n' | b'\r')
    }) || sql.contains("--")
        || sql.contains("/*")
    {
        return false;
    }
    let mut i = 0;
    let mut replaced = false;
    while i < b.len() {
        let c = b[i];
        let after_name = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] >= 0x80);
        if c.is_ascii_digit() && !after_name {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
            if !plain_decimal(&b[start..i]) {
                return false;
            }
            out.push('\u{1}');
            replaced = true;
            continue;
        }
        // Copy one UTF-8 character.
        let len = match c {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            _ => 4,
        };
        let end = (i + len).min(b.len());
        out.push_str(&sql[i..end]);
        i = end;
    }
    replaced
}

/// `digits [. digits] [e|E digits]`.
fn plain_decimal(run: &[u8]) -> bool {
    let digits = |r: &[u8]| r.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut i = digits(run);
    if run.get(i) == Some(&b'.') {
        i += 1;
        i += digits(&run[i..]);
    }
    if matches!(run.get(i), Some(b'e' | b'E')) {
        let n = digits(&run[i + 1..]);
        if n == 0 {
            return false;
        }
        i += 1 + n;
    }
    i == run.len()
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
    /// Needs a human's approval each time it is executed (the decision).
    approve: Option<Decision>,
    /// The policy it was decided under.
    policy: Arc<Policy>,
}

type Classified = Arc<Result<Vec<StatementInfo>, ClassifyError>>;

/// See `Front::memo`.
struct Memo {
    policy: Option<Arc<Policy>>,
    entries: HashMap<usize, (Classified, Arc<Vec<Decided>>)>,
}

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
    /// Classifications by [`numbers_key`].
    by_numbers: HashMap<Box<str>, Classified>,
    /// The buffer [`numbers_key_into`] writes keys into.
    key: String,
    /// Decisions of cached classifications under the policy they were made
    /// under, by the classification's address (each entry keeps it alive).
    memo: Memo,
    bytes: u64,
    /// Exchanges sent that end with ReadyForQuery.
    cycles: u64,
    /// ReadyForQuery count and last status, from the response side.
    txn: Arc<AtomicU64>,
    /// Authorisations queued (not yet known to be on disk) inside the
    /// current transaction block.
    deferred: bool,
    /// The role's column rules (computed fields, COPY out).
    columns: Columns,
    /// Messages for the caller outside the order of answers (notices of
    /// held statements), written by the response side between messages.
    oob: mpsc::UnboundedSender<Bytes>,
    /// The inputs of this session's masks, and the policy last checked.
    mask_source: MaskSource,
    mask_policy: Arc<Policy>,
    counters: DecisionCounters,
}

/// Keeps the held-requests gauge and the pending list right whichever way
/// a hold ends, the session's task being dropped included.
struct HoldGuard<'e> {
    enforcer: &'e crate::enforcer::Enforcer,
    id: approvals::ApprovalId,
    held: bool,
}

impl HoldGuard<'_> {
    /// The wait ended normally (its outcome recorded).
    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.enforcer.stats.approvals_held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        if self.held {
            self.enforcer.approvals.cancel(self.id);
            self.release();
        }
    }
}

/// How a hold ended, for the statement that waited.
enum Held {
    Approved(String),
    Refused(String),
    /// The caller went away: the session ends.
    Gone,
}

/// One statement's decision, before it is recorded.
#[derive(Clone)]
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
                if matches!(frame.tag, b'Q' | b'P' | b'E' | b'F') && !self.masks_current() {
                    return Ok("a policy reload changed the session's masks; the session is closed");
                }
                if !self.handle(frame).await? {
                    return Ok("client went away while a statement was held for approval");
                }
            }
            self.to.flush().await?;
            if !self.from.fill().await? {
                return Ok("client closed the connection");
            }
        }
    }

    /// Whether the masks the session started with are still the rule's
    /// (checked again only when the policy was reloaded).
    fn masks_current(&mut self) -> bool {
        let policy = self.session.enforcer.policy();
        if Arc::ptr_eq(&policy, &self.mask_policy) {
            return true;
        }
        if mask_source(&policy, self.session) != self.mask_source {
            warn!(session = %self.session.id, "the session's masks changed with a policy reload; closing it");
            return false;
        }
        self.mask_policy = policy;
        true
    }

    fn expect(&mut self, p: Pending) {
        if matches!(p, Pending::Query(_) | Pending::Sync | Pending::FunctionCall | Pending::Denial { simple: true, .. })
        {
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

    /// Handles one caller message; `false` when the caller went away
    /// while a statement was held.
    async fn handle(&mut self, frame: Frame) -> Result<bool, ProxyError> {
        match frame.tag {
            b'Q' => return self.simple_query(frame).await,
            b'E' => return self.execute(frame).await,
            b'F' => return self.function_call(frame).await,
            _ => {}
        }
        self.handle_other(frame).await.map(|()| true)
    }

    async fn handle_other(&mut self, frame: Frame) -> Result<(), ProxyError> {
        match frame.tag {
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
            other => Err(ProxyError::Unexpected(other as char)),
        }
    }

    /// Classifies SQL text, from the cache when seen before: the same text,
    /// or the same text but for its numbers (see [`numbers_key`]). With
    /// `own_text`, a classification found by its numbers is given this
    /// statement's own text; otherwise it is the shared one, whose `sql` is
    /// the text first seen (the caller records the text it has). The flag
    /// says whether the answer is a cached (shared) one.
    fn classify(&mut self, sql: &str, own_text: bool) -> (Classified, bool) {
        if let Some(c) = self.cache.get(sql) {
            return (c.clone(), true);
        }
        let keyed = sql.len() <= CACHE_TEXT && numbers_key_into(sql, &mut self.key);
        if let Some(c) = keyed.then(|| self.by_numbers.get(self.key.as_str())).flatten() {
            if !own_text {
                return (c.clone(), true);
            }
            if let Ok(one) = c.as_ref() {
                // The classification of the same statement with other
                // numbers, with this statement's own text.
                let info = StatementInfo { sql: sql.to_string(), ..one[0].clone() };
                return (Arc::new(Ok(vec![info])), false);
            }
        }
        let c: Classified = Arc::new(classify::classify(sql));
        if sql.len() > CACHE_TEXT {
            return (c, false);
        }
        if self.cache.len() >= CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(sql.into(), c.clone());
        // Numbers cannot change what a plain read or write is when it
        // calls no function (a number could be a sleep, a setting's
        // value...): then the key stands for it with any numbers.
        if let (true, Ok(v)) = (keyed, c.as_ref()) {
            let plain = v.len() == 1
                && v[0].functions.is_empty()
                && !v[0].foreign
                && v[0].namespace == Namespace::None
                && v[0].classes.iter().all(|c| *c == class::READ || *c == class::WRITE);
            if plain {
                if self.by_numbers.len() >= CACHE_ENTRIES {
                    self.by_numbers.clear();
                }
                self.by_numbers.insert(self.key.as_str().into(), c.clone());
            }
        }
        (c, true)
    }

    /// Decides every statement of a classification; a cached one is decided
    /// once per policy. Statements that refer to prepared ones (`EXECUTE`)
    /// are decided each time, as what they refer to may change.
    fn decide_all(&mut self, policy: &Arc<Policy>, classified: &Classified, cached: bool) -> Arc<Vec<Decided>> {
        let statements = classified.as_ref().as_ref().map(Vec::as_slice).unwrap_or_default();
        let memoable = cached && statements.iter().all(|s| s.namespace == Namespace::None);
        let key = Arc::as_ptr(classified) as usize;
        if memoable {
            if !self.memo.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, policy)) {
                self.memo.entries.clear();
                self.memo.policy = Some(policy.clone());
            }
            if let Some((_, d)) = self.memo.entries.get(&key) {
                return d.clone();
            }
        }
        let decided: Arc<Vec<Decided>> = Arc::new(statements.iter().map(|s| self.decide(policy, s)).collect());
        if memoable {
            if self.memo.entries.len() >= CACHE_ENTRIES {
                self.memo.entries.clear();
            }
            self.memo.entries.insert(key, (classified.clone(), decided.clone()));
        }
        decided
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
        let decision = if decision.verdict != Verdict::Deny && self.columns.copy_refused(&info) {
            Decision {
                verdict: Verdict::Deny,
                reason: "COPY out of a relation with masked columns is refused (SELECT it instead)".into(),
                ..decision
            }
        } else {
            decision
        };
        Decided { info: Arc::new(info), decision }
    }

    /// Holds a request for a human: tells the caller (a NoticeResponse with
    /// the id, sent at once), waits for the answer, the rule's timeout or
    /// the caller going away (input the caller sends meanwhile is kept for
    /// after), and records the outcome.
    async fn hold(&mut self, request: &str, shape: String, d: &Decision) -> Result<Held, ProxyError> {
        // What came before the held statement goes on.
        self.to.flush().await?;
        let session = self.session;
        let enforcer = &session.enforcer;
        let ticket = enforcer.approvals.submit(HoldRequest {
            session: session.id,
            caller: session.caller.clone(),
            role: session.role.clone(),
            target: session.target.name.clone(),
            protocol: "postgres".into(),
            request: request.to_string(),
            shape,
            rule: d.rule.clone(),
            timeout: d.approval_timeout,
        });
        let settled = ticket.is_settled();
        // Should this session be ended while the request is held (a reload
        // revoking it), the request must not stay pending.
        let mut guard = HoldGuard { enforcer, id: ticket.id, held: !settled };
        if !settled {
            let id = ticket.id;
            let mut notice = BytesMut::new();
            wire::notice_response(
                &mut notice,
                "01000",
                &format!("statement awaits approval {id}; ask an approver: portcullis approvals approve {id}"),
            );
            let _ = self.oob.send(notice.freeze());
            Stats::inc(&enforcer.stats.approvals_held);
        }
        let from = &mut self.from;
        let gone = async move {
            loop {
                match from.fill().await {
                    Ok(true) if from.buffered() <= HELD_INPUT => continue,
                    _ => return,
                }
            }
        };
        let outcome = enforcer.approvals.wait(ticket, gone).await;
        guard.release();
        Ok(match outcome {
            approvals::Outcome::Approved { .. } => Held::Approved(outcome.describe()),
            approvals::Outcome::Cancelled => Held::Gone,
            approvals::Outcome::Denied { .. } | approvals::Outcome::TimedOut => Held::Refused(outcome.describe()),
        })
    }

    /// Turns a held decision into its final one.
    fn settle(d: Decision, held: &Held) -> Decision {
        if d.verdict != Verdict::Approve {
            return d;
        }
        match held {
            Held::Approved(why) => Decision { verdict: Verdict::Allow, reason: format!("{}: {why}", d.reason), ..d },
            Held::Refused(why) => Decision { verdict: Verdict::Deny, reason: format!("{}: {why}", d.reason), ..d },
            Held::Gone => Decision {
                verdict: Verdict::Deny,
                reason: format!("{}: the caller went away while held", d.reason),
                ..d
            },
        }
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

    async fn simple_query(&mut self, frame: Frame) -> Result<bool, ProxyError> {
        let policy = self.session.enforcer.policy();
        let mut body = frame.body();
        let sql = match cstr_utf8(&mut body) {
            Ok(s) => s,
            Err(_) => {
                let d = self.fail_closed(&policy, "query text is not valid UTF-8");
                self.record_unparsed("", &d);
                self.deny(true, &d);
                return Ok(true);
            }
        };
        // A statement shared by its numbers carries the text first seen:
        // `sql` is what is recorded and held (single statements only share).
        let (classified, cached) = self.classify(sql, false);
        if let Err(e) = classified.as_ref() {
            let d = self.fail_closed(&policy, &format!("{e}; SQL portcullis cannot read is denied"));
            self.record_unparsed(sql, &d);
            self.deny(true, &d);
            return Ok(true);
        }
        let mut decided = self.decide_all(&policy, &classified, cached);
        let single = decided.len() == 1;
        let denied = decided.iter().any(|d| d.decision.verdict == Verdict::Deny);
        if !denied && decided.iter().any(|d| d.decision.verdict == Verdict::Approve) {
            let shape = decided.iter().map(|d| classify::shape(&d.info.sql)).collect::<Vec<_>>().join("; ");
            let held = decided.iter().find(|d| d.decision.verdict == Verdict::Approve).expect("found").decision.clone();
            let sql = sql.to_string();
            let outcome = self.hold(&sql, shape, &held).await?;
            decided = Arc::new(
                decided
                    .iter()
                    .cloned()
                    .map(|d| Decided { info: d.info, decision: Self::settle(d.decision, &outcome) })
                    .collect(),
            );
            if matches!(outcome, Held::Gone) {
                self.record_all(&decided, single.then_some(&sql)).await?;
                return Ok(false);
            }
        }
        let refused = decided.iter().position(|d| d.decision.verdict != Verdict::Allow);
        match refused {
            None => {
                self.record_all(&decided, single.then_some(sql)).await?;
                for d in decided.iter() {
                    self.apply_namespace(&d.info, &policy);
                }
                let computed = decided.iter().filter_map(|d| self.columns.computed(&d.info)).reduce(Mode::stricter);
                self.expect(Pending::Query(computed));
                self.to.push(&frame.raw);
            }
            Some(i) => {
                let why = decided[i].decision.clone();
                let n = decided.len();
                let decided: Vec<Decided> = decided
                    .iter()
                    .cloned()
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
        Ok(true)
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
        let (classified, _) = self.classify(sql, true);
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
                self.prepared.insert(name, Prepared { info: None, denied: false, approve: None, policy });
                self.expect(Pending::Parse);
                self.to.push(&frame.raw);
            }
            [one] => {
                let d = self.decide(&policy, one);
                if d.decision.verdict == Verdict::Approve {
                    // Parsing runs nothing: the hold comes at Execute, so
                    // that the whole batch waits and each run is approved.
                    self.prepared.insert(
                        name,
                        Prepared { info: Some(d.info), denied: false, approve: Some(d.decision), policy },
                    );
                    self.expect(Pending::Parse);
                    self.to.push(&frame.raw);
                    return Ok(());
                }
                let sql = sql.to_string();
                self.record_all(std::slice::from_ref(&d), Some(&sql)).await?;
                if d.decision.verdict == Verdict::Allow {
                    self.prepared.insert(name, Prepared { info: Some(d.info), denied: false, approve: None, policy });
                    self.expect(Pending::Parse);
                    self.to.push(&frame.raw);
                } else {
                    self.prepared.insert(name, Prepared { info: Some(d.info), denied: true, approve: None, policy });
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
        self.prepared.insert(name, Prepared { info: None, denied: true, approve: None, policy });
        self.deny(false, &d);
        Ok(())
    }

    async fn execute(&mut self, frame: Frame) -> Result<bool, ProxyError> {
        let mut body = frame.body();
        let portal = String::from_utf8_lossy(cstr(&mut body)?).into_owned();
        let statement = self.portals.get(&portal).cloned();
        let computed;
        if let Some(p) = statement.as_ref().and_then(|s| self.prepared.get(s)).cloned() {
            if p.denied {
                let policy = self.session.enforcer.policy();
                let d = self.fail_closed(&policy, "the statement of this portal was denied");
                self.deny(false, &d);
                return Ok(true);
            }
            let policy = self.session.enforcer.policy();
            let name = statement.clone().expect("found by name");
            let mut held = p.approve.clone();
            if let (Some(info), false) = (&p.info, Arc::ptr_eq(&policy, &p.policy)) {
                // The policy changed since Parse: decide again.
                let d = self.decide(&policy, info);
                match d.decision.verdict {
                    Verdict::Deny => {
                        self.record_all(std::slice::from_ref(&d), None).await?;
                        self.prepared
                            .insert(name, Prepared { info: p.info.clone(), denied: true, approve: None, policy });
                        self.deny(false, &d.decision);
                        return Ok(true);
                    }
                    Verdict::Approve => held = Some(d.decision),
                    Verdict::Allow => {
                        self.record_all(std::slice::from_ref(&d), None).await?;
                        held = None;
                    }
                }
                self.prepared.insert(name, Prepared { policy, approve: held.clone(), ..p.clone() });
            }
            if let (Some(decision), Some(info)) = (held, &p.info) {
                let outcome = self.hold(&info.sql, classify::shape(&info.sql), &decision).await?;
                let d = Decided { info: info.clone(), decision: Self::settle(decision, &outcome) };
                self.record_all(std::slice::from_ref(&d), None).await?;
                match outcome {
                    Held::Gone => return Ok(false),
                    Held::Refused(_) => {
                        self.deny(false, &d.decision);
                        return Ok(true);
                    }
                    Held::Approved(_) => {}
                }
            }
            computed = p.info.as_ref().and_then(|i| self.columns.computed(i));
        } else {
            // SQL cursors (decided at DECLARE): what they read is not known
            // here.
            computed = self.columns.unknown();
        }
        // Unknown portals are SQL cursors (decided at DECLARE) or do not
        // exist (the server says so).
        self.expect(Pending::Execute(portal, computed));
        self.to.push(&frame.raw);
        Ok(true)
    }

    async fn function_call(&mut self, frame: Frame) -> Result<bool, ProxyError> {
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
        let mut d = self.decide(&policy, &info);
        if d.decision.verdict == Verdict::Approve {
            let outcome = self.hold(&d.info.sql, d.info.sql.clone(), &d.decision).await?;
            d.decision = Self::settle(d.decision, &outcome);
            if matches!(outcome, Held::Gone) {
                self.record_all(std::slice::from_ref(&d), None).await?;
                return Ok(false);
            }
        }
        self.record_all(std::slice::from_ref(&d), None).await?;
        if d.decision.verdict == Verdict::Allow {
            self.expect(Pending::FunctionCall);
            self.to.push(&frame.raw);
        } else {
            self.deny(true, &d.decision);
        }
        Ok(true)
    }

    /// Effects of an allowed statement on the statement namespace.
    fn apply_namespace(&mut self, info: &Arc<StatementInfo>, policy: &Arc<Policy>) {
        match &info.namespace {
            Namespace::Prepare(name) => {
                self.prepared.insert(
                    name.clone(),
                    Prepared { info: Some(info.clone()), denied: false, approve: None, policy: policy.clone() },
                );
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
            self.count(&d.decision);
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

    /// Counts a statement's decision in the metrics.
    fn count(&mut self, d: &Decision) {
        let stats = &self.session.enforcer.stats;
        self.counters.count(stats, d, &self.session.target.name, "postgres");
        match d.verdict {
            Verdict::Allow => Stats::inc(&stats.allowed),
            Verdict::Deny => Stats::inc(&stats.denied),
            Verdict::Approve => {}
        }
    }

    fn record_unparsed(&mut self, sql: &str, d: &Decision) {
        self.count(d);
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

struct Back<'s, R, W> {
    session: &'s Session,
    from: FrameReader<R>,
    to: FrameWriter<W>,
    events: mpsc::UnboundedReceiver<Pending>,
    tracker: Tracker,
    /// Out-of-order messages for the caller (see `Front::oob`).
    oob: mpsc::UnboundedReceiver<Bytes>,
    marker: String,
    bytes: u64,
    txn: Arc<AtomicU64>,
    ready: u64,
    /// What the caller has been sent for the statement being answered.
    answer: Answer,
}

/// Rows and bytes sent to the caller since the last statement's answer
/// ended (see [`Back::answered`]).
#[derive(Default)]
struct Answer {
    rows: u64,
    bytes: u64,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Back<'_, R, W> {
    async fn run(&mut self) -> Result<&'static str, ProxyError> {
        loop {
            self.drain_events();
            while let Some(frame) = self.from.try_frame()? {
                let before = self.to.buf.len();
                match frame.tag {
                    b'D' => self.tracker.data_row(&frame, &mut self.to.buf).map_err(ProxyError::Masking)?,
                    b'd' => self.tracker.copy_data(&frame, &mut self.to.buf).map_err(ProxyError::Masking)?,
                    b'N' => self.tracker.notice(&frame, &mut self.to.buf),
                    b'V' => self.tracker.function_result(&frame, &mut self.to.buf),
                    b'E' => {
                        self.drain_events();
                        match self.replacement(&frame) {
                            Some(r) => self.to.push(&r),
                            None => self.tracker.notice(&frame, &mut self.to.buf),
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
                // What the caller got, after masking and replacements
                // (counted here: a large answer is flushed as it goes).
                let sent = (self.to.buf.len() - before) as u64;
                self.bytes += sent;
                self.answer.bytes += sent;
                self.answered(&frame, before);
                self.to.flush_if_large().await?;
            }
            self.to.flush().await?;
            tokio::select! {
                filled = self.from.fill() => {
                    if !filled? {
                        return Ok("upstream closed the connection");
                    }
                }
                Some(message) = self.oob.recv() => {
                    self.bytes += message.len() as u64;
                    self.to.push(&message);
                }
            }
        }
    }

    /// Counts rows and, where a statement's answer ends, records its
    /// summary: the command tag or the error's SQLSTATE, rows, bytes (never
    /// row content or error text).
    fn answered(&mut self, frame: &Frame, sent_from: usize) {
        let status = match frame.tag {
            b'D' => {
                self.answer.rows += 1;
                return;
            }
            b'Z' => {
                // Not part of any one statement's answer.
                self.answer = Answer::default();
                return;
            }
            b'C' => {
                let mut body = frame.body();
                wire::cstr_utf8(&mut body).unwrap_or("").to_string()
            }
            b'E' => {
                // The error as sent: a denial's replacement, not the
                // upstream error it stands in for.
                let sent = &self.to.buf[sent_from..];
                let code = sent.get(5..).and_then(|body| wire::error_field(body, b'C')).unwrap_or(b"");
                format!("ERROR {}", String::from_utf8_lossy(code))
            }
            b's' => "SUSPENDED".to_string(),
            b'I' => "EMPTY".to_string(),
            b'V' => "FUNCTION RESULT".to_string(),
            _ => return,
        };
        let Answer { rows, bytes } = std::mem::take(&mut self.answer);
        // The tag's count where it has one (INSERT 0 5, UPDATE 3, COPY 7),
        // else the rows sent.
        let tagged = match frame.tag {
            b'C' => status.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()),
            _ => None,
        };
        let rows = tagged.or((rows > 0 || frame.tag == b's').then_some(rows));
        self.session.enforcer.audit.record(Event::Response {
            session: self.session.id,
            summary: ResponseSummary { status: Some(status), rows, bytes, content: None, truncated: false },
        });
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
    fn numbers_keys_stand_for_any_numbers_in_plain_text_only() {
        let a = numbers_key("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;").unwrap();
        assert_eq!(Some(a.clone()), numbers_key("SELECT abalance FROM pgbench_accounts WHERE aid = 7;"));
        assert_eq!(a, "SELECT abalance FROM pgbench_accounts WHERE aid = \u{1};");
        assert_ne!(Some(a), numbers_key("SELECT abalance FROM pgbench_accounts2 WHERE aid = 7;"));
        // Names with digits stay names; numbers with dots or exponents are one number.
        assert_eq!(numbers_key("SELECT t1.a FROM t1 LIMIT 10").unwrap(), "SELECT t1.a FROM t1 LIMIT \u{1}");
        assert_eq!(numbers_key("SELECT 1.5e3, x FROM t").unwrap(), "SELECT \u{1}, x FROM t");
        // A run that is not a plain decimal may lex otherwise (`1FROM` is
        // `1 FROM` to PostgreSQL 14 and older): no key.
        for sql in ["SELECT token, 1FROM secrets", "SELECT 0x1f", "SELECT 1_000", "SELECT 1e", "SELECT 1.2.3"] {
            assert_eq!(numbers_key(sql), None, "{sql}");
        }
        // On its own, the parser names the table (or refuses the text).
        if let Ok(v) = classify::classify("SELECT token, 1FROM secrets") {
            assert!(v[0].tables.contains("public.secrets"), "{:?}", v[0].tables);
        }
        // Anything whose lexing is not plain is cached by exact text only.
        for sql in [
            "SELECT 1 FROM t WHERE a = 'x'",
            "SELECT \"a\" FROM t LIMIT 1",
            "SELECT $1::int",
            "SELECT $$x$$, 1",
            "SELECT 1 -- comment",
            "SELECT 1 /* c */",
            "SELECT E'\\x', 1",
        ] {
            assert_eq!(numbers_key(sql), None, "{sql}");
        }
        assert_eq!(numbers_key("SELECT a FROM t"), None, "nothing to stand for");
        assert_eq!(numbers_key("SELECT é, 1 FROM t").unwrap(), "SELECT é, \u{1} FROM t");
    }

    #[test]
    fn markers_are_per_session() {
        assert_ne!(marker_prefix(1), marker_prefix(2));
        assert!(marker_prefix(0xab).starts_with("pcx00000000000000abn"));
    }
}
