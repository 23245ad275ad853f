//! The audit log: every connection, request, decision, approval, response
//! summary and refusal, appended in order to a hash-chained, checksummed,
//! segmented log (see `format`). Writers never block the data path:
//! `record` queues (written at once, fsynced within the sync interval), and
//! `record_durable` waits until its record is fsynced (group commit: one
//! fsync for everything queued meanwhile). One writer thread owns the file.
pub mod config;
pub mod event;
pub mod format;
pub mod log;
pub mod query;
mod queue;
pub mod read;
pub mod scrub;

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

pub use config::{AuditConfig, FsyncPolicy, FullPolicy};
pub use event::*;

use crate::{credentials::Secret, metrics::AuditMetrics};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("audit log {path} is full: {error}")]
    Full { path: PathBuf, error: io::Error },
    #[error("audit log {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("audit log {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the audit writer is behind ({0} bytes queued): records cannot be queued until it catches up")]
    Behind(usize),
}

impl AuditError {
    /// Whether the disk (or quota) is full.
    pub fn is_full(&self) -> bool {
        matches!(self, AuditError::Full { .. })
    }
}

/// Why a write failed, as told to the waiters.
#[derive(Debug, Clone)]
struct Failure {
    kind: io::ErrorKind,
    raw: Option<i32>,
    message: String,
}

impl Failure {
    fn from_io(e: &io::Error) -> Failure {
        Failure { kind: e.kind(), raw: e.raw_os_error(), message: e.to_string() }
    }
    fn is_full(&self) -> bool {
        self.kind == io::ErrorKind::StorageFull || matches!(self.raw, Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
    fn into_error(self, path: &Path) -> AuditError {
        let full = self.is_full();
        let source = match self.raw {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.message),
        };
        if full {
            AuditError::Full { path: path.into(), error: source }
        } else {
            AuditError::Io { path: path.into(), error: source }
        }
    }
}

type Ack = oneshot::Sender<Result<u64, Failure>>;

enum Cmd {
    Record(Vec<u8>),
    Durable(Vec<u8>, Ack),
    Sync(oneshot::Sender<Result<(), Failure>>),
}

/// Counters for `status` and metrics.
#[derive(Debug, Default)]
pub struct AuditStats {
    pub written: AtomicU64,
    pub fsyncs: AtomicU64,
    pub lost: AtomicU64,
    pub write_errors: AtomicU64,
    pub queued: AtomicU64,
}

struct Shared {
    dir: PathBuf,
    scrubber: RwLock<scrub::Scrubber>,
    response_cap: usize,
    queue_bytes: usize,
    on_full: FullPolicy,
    stats: AuditStats,
    /// Set by the writer thread when it has stopped (log closed, lock freed).
    stopped: (std::sync::Mutex<bool>, std::sync::Condvar),
    /// Plain records refused by a full queue since the writer last saw it:
    /// (count, time of the first), recorded as a loss.
    dropped: std::sync::Mutex<(u64, u64)>,
}

/// The sending side of the writer's queue; the queue closes when the last
/// handle is gone.
struct Sender(Arc<queue::Queue<Cmd>>);

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: Arc<Sender>,
    shared: Arc<Shared>,
    /// Queue depth and write latency, for the metrics endpoint.
    pub metrics: Arc<AuditMetrics>,
}

impl Audit {
    /// Opens (creating if needed, recovering a torn tail) the log and
    /// starts its writer thread. Fails when another process writes there.
    pub fn open(cfg: AuditConfig) -> Result<Audit, AuditError> {
        let (log, recovery) = log::LogWriter::open(&cfg.dir, cfg.segment_bytes, now_ms())?;
        let shared = Arc::new(Shared {
            dir: cfg.dir.clone(),
            scrubber: RwLock::new(scrub::Scrubber::default()),
            response_cap: cfg.response_cap,
            queue_bytes: cfg.queue_bytes,
            on_full: cfg.on_full,
            stats: AuditStats::default(),
            stopped: Default::default(),
            dropped: Default::default(),
        });
        let rx = Arc::new(queue::Queue::new(cfg.queue_bytes));
        let tx = Arc::new(Sender(rx.clone()));
        let metrics = Arc::new(AuditMetrics::default());
        let audit = Audit { tx, shared: shared.clone(), metrics: metrics.clone() };
        if let Some(r) = recovery {
            audit.record(Event::Recovery {
                segment: r.segment.display().to_string(),
                offset: r.offset,
                cut_bytes: r.cut_bytes,
                reason: r.reason,
                saved_to: r.saved_to.map(|p| p.display().to_string()),
            });
        }
        info!(dir = %cfg.dir.display(), next_seq = log.next_seq(), fsync = %cfg.fsync, "audit log open");
        let mut writer =
            Writer { log, cfg, shared, metrics, loss: None, last_sync: Instant::now(), last_retention: None };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                // Should the writer die, whoever waits on it must hear so:
                // the queue is closed and what it holds dropped (their
                // replies fail as `Stopped`), rather than waiting forever.
                struct Abandon(Arc<queue::Queue<Cmd>>);
                impl Drop for Abandon {
                    fn drop(&mut self) {
                        drop(self.0.shut());
                    }
                }
                let _abandon = Abandon(rx.clone());
                writer.run(rx);
                let shared = writer.shared.clone();
                drop(writer);
                *shared.stopped.0.lock().expect("stopped flag") = true;
                shared.stopped.1.notify_all();
            })
            .map_err(|source| AuditError::Io { path: PathBuf::from("audit-writer thread"), error: source })?;
        Ok(audit)
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Drops this handle and waits (at most `wait`) until the writer has
    /// written everything queued and closed the log, which happens once
    /// every handle is gone. True when it has.
    pub fn close(self, wait: std::time::Duration) -> bool {
        let shared = self.shared.clone();
        drop(self);
        let (lock, cv) = &shared.stopped;
        let guard = lock.lock().expect("stopped flag");
        let (guard, _) = cv.wait_timeout_while(guard, wait, |stopped| !*stopped).expect("stopped flag");
        *guard
    }

    pub fn stats(&self) -> &AuditStats {
        &self.shared.stats
    }

    /// For `portcullis status`.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.shared.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "dir": self.shared.dir,
            "written": l(&s.written),
            "queued": l(&s.queued),
            "fsyncs": l(&s.fsyncs),
            "lost": l(&s.lost),
            "write_errors": l(&s.write_errors),
        })
    }

    /// Queues a record; written within a few milliseconds (batched with
    /// the others queued meanwhile) and fsynced within the sync interval.
    pub fn record(&self, event: Event) {
        let payload = self.encode(event);
        let len = payload.len();
        // Counted before it is queued: the writer may take it (and count it
        // off) before push returns.
        self.shared.stats.queued.fetch_add(1, Ordering::Relaxed);
        let pushed = self.tx.0.push(Cmd::Record(payload), len, false);
        if pushed.is_err() {
            self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
        match pushed {
            Ok(()) => self.metrics.queued(),
            Err(queue::Refused::Closed) => {}
            Err(queue::Refused::Full) => {
                self.shared.stats.lost.fetch_add(1, Ordering::Relaxed);
                let mut d = self.shared.dropped.lock().unwrap_or_else(|e| e.into_inner());
                if d.0 == 0 {
                    error!(
                        queued_bytes = self.shared.queue_bytes,
                        "audit writer is behind; records are lost (and counted) until it catches up"
                    );
                    d.1 = now_ms();
                }
                d.0 += 1;
            }
        }
    }

    /// Writes a record and returns once it is on disk. Callers forward a
    /// state-changing request only after this succeeds. With
    /// `--audit-on-full allow`, a full disk is reported as success (and
    /// logged, and counted in the log once there is room again).
    pub async fn record_durable(&self, event: Event) -> Result<(), AuditError> {
        match self.append_durable(event).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_full() && self.shared.on_full == FullPolicy::Allow => {
                error!(error = %e, "audit log full: a state-changing request goes ahead unrecorded (--audit-on-full allow)");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Like `record_durable`, and says the record's sequence number.
    pub async fn append_durable(&self, event: Event) -> Result<u64, AuditError> {
        let payload = self.encode(event);
        let (done, wait) = oneshot::channel();
        let len = payload.len();
        self.shared.stats.queued.fetch_add(1, Ordering::Relaxed);
        let pushed = self.tx.0.push(Cmd::Durable(payload, done), len, true);
        if pushed.is_err() {
            self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
        match pushed {
            Ok(()) => self.metrics.queued(),
            Err(queue::Refused::Closed) => return Err(AuditError::Stopped),
            Err(queue::Refused::Full) => return Err(AuditError::Behind(self.shared.queue_bytes)),
        }
        match wait.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(f)) => Err(f.into_error(&self.shared.dir)),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Waits until everything queued so far is on disk.
    pub async fn sync(&self) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        match self.tx.0.push(Cmd::Sync(done), 0, true) {
            Ok(()) => {}
            Err(queue::Refused::Closed) => return Err(AuditError::Stopped),
            Err(queue::Refused::Full) => return Err(AuditError::Behind(self.shared.queue_bytes)),
        }
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(f)) => Err(f.into_error(&self.shared.dir)),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Registers a credential a protocol module sends upstream: from now
    /// on, its raw, base64, hex and URL-encoded forms are replaced with
    /// `[REDACTED]` in every record before it is written.
    pub fn register_secret(&self, secret: &Secret) {
        let value = secret.expose();
        if value.is_empty() {
            return;
        }
        if self.shared.scrubber.read().expect("scrubber lock").contains(value) {
            return;
        }
        self.shared.scrubber.write().expect("scrubber lock").register(value);
    }

    /// Serialises a record: response content capped, credentials scrubbed,
    /// oversized strings cut so a record stays under the size limit.
    fn encode(&self, mut event: Event) -> Vec<u8> {
        if let Event::Response { summary, .. } = &mut event {
            if let Some(c) = &mut summary.content {
                if c.len() > self.shared.response_cap {
                    let mut cut = self.shared.response_cap;
                    while !c.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    c.truncate(cut);
                    summary.truncated = true;
                }
            }
        }
        let rec = Record::now(event);
        let mut bytes = serde_json::to_vec(&rec).expect("records serialise");
        if bytes.len() > format::MAX_PAYLOAD - 1024 {
            bytes = shrink(&bytes);
        }
        let scrubber = self.shared.scrubber.read().expect("scrubber lock");
        if !scrubber.is_empty() {
            if let Some(clean) = scrubber.scrub_json(&bytes) {
                bytes = clean;
            }
        }
        bytes
    }
}

/// Cuts every string longer than 16 KiB (marking the cut) so the record
/// fits in a frame.
fn shrink(json: &[u8]) -> Vec<u8> {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) if s.len() > 16 << 10 => {
                let total = s.len();
                let mut cut = 16 << 10;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push_str(&format!("…[cut: {total} bytes in all]"));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            serde_json::Value::Object(o) => o.values_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(json).expect("own json parses");
    walk(&mut v);
    let out = serde_json::to_vec(&v).expect("value serialises");
    if out.len() > format::MAX_PAYLOAD - 1024 {
        let kind = v["type"].as_str().unwrap_or("?").to_string();
        return serde_json::to_vec(&serde_json::json!({
            "time_ms": v["time_ms"], "type": "record_too_large", "original_type": kind, "bytes": json.len(),
            "session": v.get("session"),
        }))
        .expect("value serialises");
    }
    out
}

struct Writer {
    log: log::LogWriter,
    cfg: AuditConfig,
    shared: Arc<Shared>,
    metrics: Arc<AuditMetrics>,
    /// Records lost since writing last worked: (records, durable, first_ms, last_ms, error).
    loss: Option<(u64, u64, u64, u64, String)>,
    last_sync: Instant,
    last_retention: Option<Instant>,
}

const RETENTION_EVERY: Duration = Duration::from_secs(60);

impl Writer {
    fn run(&mut self, rx: Arc<queue::Queue<Cmd>>) {
        self.retention();
        // Whether the last wait brought work: then records are likely to keep
        // coming, and the writer ticks instead of being woken for each.
        let mut ticking = false;
        loop {
            let mut wait = RETENTION_EVERY.saturating_sub(self.last_retention.map_or(Duration::ZERO, |t| t.elapsed()));
            if self.log.is_dirty() && self.cfg.fsync != FsyncPolicy::Never {
                wait = wait.min(self.cfg.sync_interval.saturating_sub(self.last_sync.elapsed()));
            }
            if ticking {
                wait = wait.min(queue::TICK);
            }
            let taken = rx.take(wait, ticking);
            ticking = !taken.items.is_empty();
            if ticking {
                let rotations = self.log.rotations();
                let started = Instant::now();
                let (written, failed) = self.process(taken.items);
                let took = started.elapsed();
                self.metrics.written(written, took, true);
                if failed > 0 {
                    self.metrics.written(failed, took, false);
                }
                if self.log.rotations() != rotations {
                    self.retention();
                }
            }
            if taken.closed {
                let _ = self.sync();
                return;
            }
            if self.log.is_dirty()
                && self.last_sync.elapsed() >= self.cfg.sync_interval
                && self.cfg.fsync != FsyncPolicy::Never
            {
                if let Err(e) = self.sync() {
                    warn!(error = %e, "audit fsync failed");
                }
            }
            if self.last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY) {
                self.retention();
            }
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        let was_dirty = self.log.is_dirty();
        let r = self.log.sync();
        self.last_sync = Instant::now();
        if was_dirty && r.is_ok() {
            self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Writes a batch; returns how many records were written and how many
    /// failed to be.
    fn process(&mut self, batch: Vec<Cmd>) -> (u64, u64) {
        let (dropped, since) = std::mem::take(&mut *self.shared.dropped.lock().unwrap_or_else(|e| e.into_inner()));
        if dropped > 0 {
            let now = now_ms();
            match &mut self.loss {
                Some(l) => {
                    l.0 += dropped;
                    l.3 = now;
                }
                None => self.loss = Some((dropped, 0, since, now, "the audit writer was behind".into())),
            }
        }
        let mut payloads = Vec::with_capacity(batch.len() + 1);
        let mut acks: Vec<(usize, Ack)> = Vec::new();
        let mut syncs = Vec::new();
        let had_loss = self.loss.is_some();
        if let Some((records, durable, first_ms, last_ms, error)) = self.loss.clone() {
            payloads.push(internal(Event::AuditLoss { records, durable, first_ms, last_ms, error }));
        }
        for cmd in batch {
            match cmd {
                Cmd::Record(p) => payloads.push(p),
                Cmd::Durable(p, ack) => {
                    acks.push((payloads.len(), ack));
                    payloads.push(p);
                }
                Cmd::Sync(s) => syncs.push(s),
            }
        }
        let n = payloads.len();
        let loss_slot = usize::from(had_loss);
        self.shared.stats.queued.fetch_sub((n - loss_slot) as u64, Ordering::Relaxed);
        // How many payloads are in the file, how many of those are known to
        // be on disk, and what went wrong.
        let first = self.log.next_seq();
        let (written, durable_ok, err) = if payloads.is_empty() {
            (0, 0, None)
        } else if self.cfg.fsync == FsyncPolicy::Always {
            // Each record on its own: write, fsync, next.
            let (mut written, mut synced, mut err) = (0, 0, None);
            for p in &payloads {
                if let Err(e) = self.log.append(std::slice::from_ref(p)) {
                    err = Some(e);
                    break;
                }
                written += 1;
                if let Err(e) = self.sync() {
                    err = Some(e);
                    break;
                }
                synced += 1;
            }
            (written, synced, err)
        } else {
            let need_sync = self.cfg.fsync == FsyncPolicy::Group && (!acks.is_empty() || !syncs.is_empty());
            match self.log.append(&payloads) {
                Err(e) => (0, 0, Some(e)),
                Ok(_) if need_sync => match self.sync() {
                    Ok(()) => (n, n, None),
                    Err(e) => (n, 0, Some(e)),
                },
                Ok(_) => (n, n, None),
            }
        };
        if had_loss && written > 0 {
            let (records, ..) = self.loss.take().expect("loss");
            warn!(records, "audit log writable again; the loss is recorded");
        }
        self.shared.stats.written.fetch_add(written as u64, Ordering::Relaxed);
        let failure = err.as_ref().map(Failure::from_io);
        let mut failed = 0;
        if let Some(e) = &err {
            self.shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            let now = now_ms();
            let first_failure = self.loss.is_none();
            // Payloads never written; the loss record itself does not count.
            let lost = (n - written - if written == 0 { loss_slot } else { 0 }) as u64;
            let durable = acks.iter().filter(|(i, _)| *i >= written).count() as u64;
            self.shared.stats.lost.fetch_add(lost, Ordering::Relaxed);
            failed = lost;
            if lost > 0 {
                match &mut self.loss {
                    Some(l) => {
                        l.0 += lost;
                        l.1 += durable;
                        l.3 = now;
                    }
                    None => self.loss = Some((lost, durable, now, now, e.to_string())),
                }
            }
            let full = failure.as_ref().is_some_and(Failure::is_full);
            if first_failure {
                error!(error = %e, dir = %self.cfg.dir.display(), full, lost,
                       "audit write failed; state-changing requests waiting for it are refused until it works again");
            } else {
                tracing::debug!(error = %e, lost, "audit write failed again");
            }
        }
        for (i, ack) in acks {
            let _ = ack.send(match &failure {
                Some(f) if i >= durable_ok => Err(f.clone()),
                _ => Ok(first + i as u64),
            });
        }
        for s in syncs {
            let _ = s.send(failure.clone().map_or(Ok(()), Err));
        }
        (written as u64, failed)
    }

    /// Deletes whole old segments past the age or size limit, after
    /// recording (durably) which ones and the hash the log now starts from.
    fn retention(&mut self) {
        self.last_retention = Some(Instant::now());
        let max_age = self.cfg.max_age.map(|d| d.as_millis() as u64);
        let Some(plan) = self.log.retention_plan(now_ms(), max_age, self.cfg.max_bytes) else { return };
        let deleted: Vec<DeletedSegment> = plan
            .delete
            .iter()
            .map(|(s, last, closed)| DeletedSegment {
                segment: s.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                first_seq: s.first_seq,
                last_seq: *last,
                bytes: s.size,
                closed_ms: *closed,
            })
            .collect();
        let event = Event::Retention {
            reason: plan.reason.into(),
            deleted,
            first_seq: plan.first_seq,
            anchor: format::hex(&plan.anchor),
        };
        let p = internal(event);
        let written = self.log.append(&[p]).and_then(|_| self.sync());
        match written.and_then(|_| self.log.apply_retention(&plan)) {
            Ok(()) => {
                self.shared.stats.written.fetch_add(1, Ordering::Relaxed);
                info!(
                    reason = plan.reason,
                    segments = plan.delete.len(),
                    first_seq = plan.first_seq,
                    "audit retention deleted old segments"
                );
            }
            Err(e) => warn!(error = %e, "audit retention failed; old segments stay"),
        }
    }
}

fn internal(event: Event) -> Vec<u8> {
    serde_json::to_vec(&Record::now(event)).expect("records serialise")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
