//! The writing side of the log: open (and recover), append, rotate, fsync,
//! retention. Used by the writer thread only; one process at a time holds a
//! directory's lock.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};
use tracing::warn;

use super::{
    format::{self, Hash, SegmentHeader, HEADER_LEN, ZERO_HASH},
    AuditError,
};

/// A segment the writer knows about.
#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    pub first_seq: u64,
    pub created_ms: u64,
    pub prev_hash: Hash,
    pub size: u64,
}

/// What recovery at open found and cut.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub segment: PathBuf,
    pub offset: u64,
    pub cut_bytes: u64,
    pub reason: String,
    /// The cut bytes, kept for inspection.
    pub saved_to: Option<PathBuf>,
}

/// Segments that retention will delete.
#[derive(Debug, Clone)]
pub struct RetentionPlan {
    pub reason: &'static str,
    /// Each with the seq of its last record and when it was closed.
    pub delete: Vec<(Segment, u64, u64)>,
    /// The log's first record afterwards, and the hash before it.
    pub first_seq: u64,
    pub anchor: Hash,
}

pub struct LogWriter {
    dir: PathBuf,
    segment_bytes: u64,
    _lock: Flock<File>,
    file: File,
    active: Segment,
    closed: Vec<Segment>,
    next_seq: u64,
    last_hash: Hash,
    dirty: bool,
    rotations: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io { path: path.to_path_buf(), error: source }
}

impl LogWriter {
    /// Opens the log in `dir`, creating it if needed. A torn or damaged
    /// tail of the newest segment is cut (and kept in a `recovered-*.bin`
    /// file beside it); everything before it stays.
    pub fn open(dir: &Path, segment_bytes: u64, now_ms: u64) -> Result<(LogWriter, Option<Recovery>), AuditError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| AuditError::Locked { path: dir.to_path_buf() })?;
        // Leftovers of a segment creation cut short.
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".log.tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let files = format::list_segments(dir).map_err(io_err(dir))?;
        let mut closed = Vec::new();
        for f in files.iter().take(files.len().saturating_sub(1)) {
            let (created_ms, prev_hash) = match read_header(&f.path) {
                Ok(h) => (h.created_ms, h.prev_hash),
                Err(e) => {
                    // Not needed to write on; `sessions verify` reports it.
                    warn!(segment = %f.path.display(), error = %e, "audit segment header unreadable");
                    (mtime_ms(&f.path).unwrap_or(0), ZERO_HASH)
                }
            };
            closed.push(Segment { path: f.path.clone(), first_seq: f.first_seq, created_ms, prev_hash, size: f.size });
        }
        let Some(last) = files.last() else {
            let (file, active) = create_segment(dir, 1, ZERO_HASH, now_ms)?;
            let w = LogWriter {
                dir: dir.into(),
                segment_bytes,
                _lock: lock,
                file,
                active,
                closed,
                next_seq: 1,
                last_hash: ZERO_HASH,
                dirty: false,
                rotations: 0,
            };
            return Ok((w, None));
        };
        let bytes = fs::read(&last.path).map_err(io_err(&last.path))?;
        let header = SegmentHeader::decode(&bytes).map_err(|reason| AuditError::Damaged {
            path: last.path.clone(),
            reason: format!(
                "{reason}; move the file aside to start a new segment, and see `portcullis sessions verify`"
            ),
        })?;
        if header.first_seq != last.first_seq {
            return Err(AuditError::Damaged {
                path: last.path.clone(),
                reason: format!("header says first record {}, name says {}", header.first_seq, last.first_seq),
            });
        }
        let (mut seq, mut hash) = (header.first_seq, header.prev_hash);
        let mut off = HEADER_LEN;
        let mut cut: Option<(u64, String)> = None;
        loop {
            match format::read_frame(&bytes, off) {
                Ok(None) => break,
                Ok(Some(f)) => {
                    if f.seq != seq || f.prev_hash != hash {
                        cut = Some((f.offset, format!("record {} does not follow record {}", f.seq, seq - 1)));
                        break;
                    }
                    seq += 1;
                    hash = f.hash;
                    off = f.end as usize;
                }
                Err(e) => {
                    cut = Some((e.offset(), e.reason().to_string()));
                    break;
                }
            }
        }
        let mut recovery = None;
        if let Some((offset, reason)) = cut {
            let tail = &bytes[offset as usize..];
            let saved = dir.join(format!("recovered-{:020}-{offset}.bin", last.first_seq));
            let saved_to = match fs::write(&saved, tail) {
                Ok(()) => Some(saved),
                Err(e) => {
                    warn!(error = %e, "cannot keep the cut audit tail");
                    None
                }
            };
            let f = OpenOptions::new().write(true).open(&last.path).map_err(io_err(&last.path))?;
            f.set_len(offset).map_err(io_err(&last.path))?;
            f.sync_all().map_err(io_err(&last.path))?;
            warn!(segment = %last.path.display(), offset, cut_bytes = tail.len(), reason = %reason, "audit log tail cut at recovery");
            recovery =
                Some(Recovery { segment: last.path.clone(), offset, cut_bytes: tail.len() as u64, reason, saved_to });
        }
        let file = OpenOptions::new().append(true).open(&last.path).map_err(io_err(&last.path))?;
        let active = Segment {
            path: last.path.clone(),
            first_seq: header.first_seq,
            created_ms: header.created_ms,
            prev_hash: header.prev_hash,
            size: off as u64,
        };
        let w = LogWriter {
            dir: dir.into(),
            segment_bytes,
            _lock: lock,
            file,
            active,
            closed,
            next_seq: seq,
            last_hash: hash,
            dirty: false,
            rotations: 0,
        };
        Ok((w, recovery))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn last_hash(&self) -> Hash {
        self.last_hash
    }

    /// How many times a segment was closed since open.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    pub fn active_path(&self) -> &Path {
        &self.active.path
    }

    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.closed.iter().chain(std::iter::once(&self.active))
    }

    /// Writes the payloads as consecutive records with one write and
    /// returns the seq of the first. On failure nothing of them stays in
    /// the file (it is cut back), so the chain never holds a torn record.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> io::Result<u64> {
        let first = self.next_seq;
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + format::FRAME_OVERHEAD).sum());
        let (mut seq, mut hash) = (self.next_seq, self.last_hash);
        for p in payloads {
            hash = format::encode_record(&mut buf, seq, &hash, p);
            seq += 1;
        }
        if let Err(e) = self.file.write_all(&buf) {
            // Cut back to the last whole record; if even that fails, the
            // next open's recovery cuts it.
            let _ = self.file.set_len(self.active.size);
            return Err(e);
        }
        self.active.size += buf.len() as u64;
        self.next_seq = seq;
        self.last_hash = hash;
        self.dirty = true;
        if self.active.size >= self.segment_bytes {
            if let Err(e) = self.rotate() {
                warn!(error = %e, "audit segment rotation failed; the current segment grows on");
            }
        }
        Ok(first)
    }

    /// fdatasync of the active segment. On failure the records written
    /// since the last good sync cannot be trusted to be on disk: the caller
    /// fails whoever waits for them.
    pub fn sync(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        self.file.sync_data()?;
        self.dirty = false;
        Ok(())
    }

    /// Closes the active segment (fsynced) and starts the next.
    pub fn rotate(&mut self) -> io::Result<()> {
        self.sync()?;
        let now = super::now_ms();
        let (file, seg) = create_segment(&self.dir, self.next_seq, self.last_hash, now).map_err(|e| match e {
            AuditError::Io { error, .. } => error,
            other => io::Error::other(other.to_string()),
        })?;
        let old = std::mem::replace(&mut self.active, seg);
        self.closed.push(old);
        self.file = file;
        self.rotations += 1;
        Ok(())
    }

    /// Which old segments retention deletes now: whole closed segments,
    /// oldest first, while the log is larger than `max_bytes` or the
    /// segment was closed longer than `max_age_ms` ago. Never the active one.
    pub fn retention_plan(
        &self,
        now_ms: u64,
        max_age_ms: Option<u64>,
        max_bytes: Option<u64>,
    ) -> Option<RetentionPlan> {
        let mut total: u64 = self.segments().map(|s| s.size).sum();
        let mut delete = Vec::new();
        let mut reason = "";
        for (i, seg) in self.closed.iter().enumerate() {
            let next = self.closed.get(i + 1).unwrap_or(&self.active);
            let closed_ms = next.created_ms;
            let too_big = max_bytes.is_some_and(|m| total > m);
            let too_old = max_age_ms.is_some_and(|a| now_ms.saturating_sub(closed_ms) > a);
            if !too_big && !too_old {
                break;
            }
            if reason.is_empty() {
                reason = if too_big { "size" } else { "age" };
            }
            total -= seg.size;
            delete.push((seg.clone(), next.first_seq - 1, closed_ms));
        }
        let last = delete.last()?;
        let next = self.closed.get(delete.len()).unwrap_or(&self.active);
        debug_assert_eq!(next.first_seq, last.1 + 1);
        Some(RetentionPlan { reason, first_seq: next.first_seq, anchor: next.prev_hash, delete })
    }

    /// Deletes the planned segments. The caller has already written (and
    /// synced) the record that says so.
    pub fn apply_retention(&mut self, plan: &RetentionPlan) -> io::Result<()> {
        for (seg, _, _) in &plan.delete {
            fs::remove_file(&seg.path)?;
            self.closed.retain(|s| s.path != seg.path);
        }
        sync_dir(&self.dir)
    }
}

fn read_header(path: &Path) -> Result<SegmentHeader, String> {
    use std::io::Read;
    let mut b = [0u8; HEADER_LEN];
    File::open(path).and_then(|mut f| f.read_exact(&mut b)).map_err(|e| e.to_string())?;
    SegmentHeader::decode(&b)
}

fn mtime_ms(path: &Path) -> Option<u64> {
    let m = fs::metadata(path).ok()?.modified().ok()?;
    Some(m.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// Creates a segment atomically: header written and synced under a
/// temporary name, then renamed, then the directory synced.
fn create_segment(dir: &Path, first_seq: u64, prev_hash: Hash, now_ms: u64) -> Result<(File, Segment), AuditError> {
    let name = format::segment_name(first_seq);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    let header = SegmentHeader { first_seq, created_ms: now_ms, prev_hash };
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
        f.write_all(&header.encode())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(AuditError::Io { path, error: e });
    }
    let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
    Ok((file, Segment { path, first_seq, created_ms: now_ms, prev_hash, size: HEADER_LEN as u64 }))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("{{\"time_ms\":{i},\"type\":\"t\",\"i\":{i}}}").into_bytes()
    }

    #[test]
    fn appends_rotate_and_the_chain_crosses_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, rec) = LogWriter::open(dir.path(), 300, 1000).unwrap();
        assert!(rec.is_none());
        for i in 1..=20 {
            assert_eq!(w.append(&[payload(i)]).unwrap(), i);
        }
        w.sync().unwrap();
        let segs: Vec<_> = w.segments().cloned().collect();
        assert!(segs.len() > 3, "{segs:?}");
        // Each segment's header holds the hash before its first record.
        for pair in segs.windows(2) {
            let bytes = fs::read(&pair[0].path).unwrap();
            let mut off = HEADER_LEN;
            let mut last = None;
            while let Some(f) = format::read_frame(&bytes, off).unwrap() {
                off = f.end as usize;
                last = Some(f);
            }
            let last = last.unwrap();
            assert_eq!(last.seq + 1, pair[1].first_seq);
            assert_eq!(last.hash, pair[1].prev_hash);
        }
        // A second writer is refused while the first holds the lock.
        assert!(matches!(LogWriter::open(dir.path(), 300, 1000), Err(AuditError::Locked { .. })));
        drop(w);
        let (w, rec) = LogWriter::open(dir.path(), 300, 1000).unwrap();
        assert!(rec.is_none());
        assert_eq!(w.next_seq(), 21);
    }

    #[test]
    fn recovery_cuts_a_torn_tail_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = LogWriter::open(dir.path(), 1 << 20, 0).unwrap();
        w.append(&[payload(1), payload(2), payload(3)]).unwrap();
        let path = w.active_path().to_path_buf();
        let hash3 = w.last_hash();
        drop(w);
        let good = fs::metadata(&path).unwrap().len();
        // Half of a fourth record, as a crash mid-write leaves it.
        let mut half = Vec::new();
        format::encode_record(&mut half, 4, &hash3, &payload(4));
        half.truncate(half.len() / 2);
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&half).unwrap();

        let (mut w, rec) = LogWriter::open(dir.path(), 1 << 20, 0).unwrap();
        let rec = rec.expect("recovery reported");
        assert_eq!(rec.offset, good);
        assert_eq!(rec.cut_bytes, half.len() as u64);
        assert_eq!(fs::read(rec.saved_to.unwrap()).unwrap(), half);
        assert_eq!(fs::metadata(&path).unwrap().len(), good);
        assert_eq!((w.next_seq(), w.last_hash()), (4, hash3));
        // Writing goes on from the last whole record.
        assert_eq!(w.append(&[payload(4)]).unwrap(), 4);
    }

    #[test]
    fn retention_deletes_only_whole_closed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = LogWriter::open(dir.path(), 200, 0).unwrap();
        for i in 1..=30 {
            w.append(&[payload(i)]).unwrap();
        }
        let segs: Vec<_> = w.segments().cloned().collect();
        let total: u64 = segs.iter().map(|s| s.size).sum();
        // Size: keep at most half of what there is.
        let plan = w.retention_plan(0, None, Some(total / 2)).expect("something to delete");
        assert_eq!(plan.reason, "size");
        let deleted: u64 = plan.delete.iter().map(|d| d.0.size).sum();
        assert!(total - deleted <= total / 2);
        assert!(total - deleted + plan.delete.last().unwrap().0.size > total / 2, "deletes no more than needed");
        let next = &segs[plan.delete.len()];
        assert_eq!((plan.first_seq, plan.anchor), (next.first_seq, next.prev_hash));
        w.apply_retention(&plan).unwrap();
        for (s, _, _) in &plan.delete {
            assert!(!s.path.exists());
        }
        assert!(next.path.exists());
        // The active segment is never deleted, however small the limit.
        let plan = w.retention_plan(0, None, Some(1)).unwrap();
        assert!(plan.delete.iter().all(|d| d.0.path != w.active_path()));
        // Age: segments closed long enough ago.
        assert!(w.retention_plan(0, Some(1000), None).is_none());
        let plan = w.retention_plan(u64::MAX / 2, Some(1000), None).unwrap();
        assert_eq!(plan.reason, "age");
        assert_eq!(plan.delete.len(), w.segments().count() - 1);
    }
}
