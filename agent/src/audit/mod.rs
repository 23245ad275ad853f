//! The audit log: every connection, request, decision and refusal, appended
//! in order. Writers never block the data path: `record` queues, and
//! `record_durable` waits until the record is on disk.
pub mod event;

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot};

pub use event::*;

use crate::metrics::AuditMetrics;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the audit writer has stopped")]
    Stopped,
}

enum Cmd {
    Record(Record),
    Durable(Record, oneshot::Sender<Result<(), String>>),
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::UnboundedSender<Cmd>,
    /// Queue depth and write latency, for the metrics endpoint.
    pub metrics: Arc<AuditMetrics>,
}

impl Audit {
    /// Opens (creating if needed) the log under `dir`.
    pub fn open(dir: &Path) -> Result<Audit, AuditError> {
        fs::create_dir_all(dir).map_err(|source| AuditError::Io { path: dir.into(), source })?;
        let path = dir.join("audit.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| AuditError::Io { path: path.clone(), source })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(AuditMetrics::default());
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(file, rx, &m))
            .map_err(|source| AuditError::Io { path, source })?;
        Ok(Audit { tx, metrics })
    }

    /// Queues a record; written within a bounded delay.
    pub fn record(&self, event: Event) {
        if self.tx.send(Cmd::Record(Record::now(event))).is_ok() {
            self.metrics.queued();
        }
    }

    /// Writes a record and returns once it is on disk. Callers forward a
    /// state-changing request only after this succeeds.
    pub async fn record_durable(&self, event: Event) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Cmd::Durable(Record::now(event), done)).map_err(|_| AuditError::Stopped)?;
        self.metrics.queued();
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AuditError::Io { path: PathBuf::new(), source: io::Error::other(e) }),
            Err(_) => Err(AuditError::Stopped),
        }
    }
}

fn writer(mut file: File, mut rx: mpsc::UnboundedReceiver<Cmd>, metrics: &AuditMetrics) {
    while let Some(first) = rx.blocking_recv() {
        let mut waiters = Vec::new();
        let mut buf = Vec::new();
        let mut push = |cmd: Cmd, buf: &mut Vec<u8>| {
            let rec = match cmd {
                Cmd::Record(r) => r,
                Cmd::Durable(r, w) => {
                    waiters.push(w);
                    r
                }
            };
            if serde_json::to_writer(&mut *buf, &rec).is_ok() {
                buf.push(b'\n');
            }
        };
        push(first, &mut buf);
        let mut batch = 1;
        while let Ok(cmd) = rx.try_recv() {
            push(cmd, &mut buf);
            batch += 1;
        }
        let started = Instant::now();
        let res = file.write_all(&buf).and_then(|_| if waiters.is_empty() { Ok(()) } else { file.sync_data() });
        metrics.written(batch, started.elapsed(), res.is_ok());
        for w in waiters {
            let _ = w.send(res.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
