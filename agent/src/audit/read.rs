//! The reading side: scan records in order, and verify the whole chain.
//! Works on the directory alone, with or without a running writer (a
//! record being written at the very end reads as a torn tail and is left
//! out).
use std::{
    fmt,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    format::{self, Hash, SegmentHeader, HEADER_LEN, ZERO_HASH},
    AuditError,
};

/// One record read back.
#[derive(Debug, Clone)]
pub struct LogRecord<'a> {
    pub seq: u64,
    pub hash: Hash,
    pub prev_hash: Hash,
    pub segment: &'a Path,
    pub offset: u64,
    pub payload: &'a [u8],
}

/// Calls `f` for every record in order. Stops at a torn tail of the newest
/// segment silently; any other damage is an error (after the records before
/// it were delivered).
pub fn scan(dir: &Path, mut f: impl FnMut(&LogRecord<'_>) -> ControlFlow<()>) -> Result<(), AuditError> {
    let segs = format::list_segments(dir).map_err(|source| AuditError::Io { path: dir.into(), error: source })?;
    if segs.is_empty() && !dir.exists() {
        return Err(AuditError::Io {
            path: dir.into(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no audit log here"),
        });
    }
    let n = segs.len();
    for (i, seg) in segs.iter().enumerate() {
        let bytes = match std::fs::read(&seg.path) {
            Ok(b) => b,
            // Deleted by retention while we read: the next one goes on.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AuditError::Io { path: seg.path.clone(), error: source }),
        };
        SegmentHeader::decode(&bytes).map_err(|reason| AuditError::Damaged { path: seg.path.clone(), reason })?;
        let mut off = HEADER_LEN;
        loop {
            match format::read_frame(&bytes, off) {
                Ok(None) => break,
                Ok(Some(fr)) => {
                    let rec = LogRecord {
                        seq: fr.seq,
                        hash: fr.hash,
                        prev_hash: fr.prev_hash,
                        segment: &seg.path,
                        offset: fr.offset,
                        payload: fr.payload,
                    };
                    if f(&rec).is_break() {
                        return Ok(());
                    }
                    off = fr.end as usize;
                }
                Err(format::FrameError::Torn { .. }) if i + 1 == n => break,
                Err(e) => {
                    return Err(AuditError::Damaged {
                        path: seg.path.clone(),
                        reason: format!("offset {}: {} (see `portcullis sessions verify`)", e.offset(), e.reason()),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Where verification found a problem.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub segment: PathBuf,
    pub offset: u64,
    /// The record's seq, when the bytes there still say it.
    pub seq: Option<u64>,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name =
            self.segment.file_name().map_or_else(|| self.segment.display().to_string(), |n| n.to_string_lossy().into());
        match self.seq {
            Some(seq) => write!(f, "record {seq} at {name} offset {}: {}", self.offset, self.reason),
            None => write!(f, "{name} offset {}: {}", self.offset, self.reason),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub segments: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Hash of the last good record: keep it elsewhere to detect a later
    /// truncation of the log.
    pub head_hash: String,
    /// The first bad record, if any.
    pub problem: Option<Problem>,
    /// An incomplete last record (a write in progress, or cut by a crash:
    /// the next open cuts it). Not an error.
    pub torn_tail: Option<Problem>,
}

/// Checks every segment header, record checksum, sequence number and hash
/// link, and that a log not starting at record 1 has a retention record
/// vouching for its first segment.
pub fn verify(dir: &Path) -> Result<VerifyReport, AuditError> {
    let segs = format::list_segments(dir).map_err(|source| AuditError::Io { path: dir.into(), error: source })?;
    if !dir.is_dir() {
        return Err(AuditError::Io {
            path: dir.into(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no audit log here"),
        });
    }
    let mut rep = VerifyReport {
        ok: true,
        segments: segs.len(),
        records: 0,
        first_seq: None,
        last_seq: None,
        head_hash: format::hex(&ZERO_HASH),
        problem: None,
        torn_tail: None,
    };
    // The next record number and the hash before it.
    let mut expected: Option<(u64, Hash)> = None;
    let mut start: Option<(u64, Hash, PathBuf)> = None;
    let mut retention_anchors: Vec<(u64, String)> = Vec::new();
    let n = segs.len();
    let fail = |rep: &mut VerifyReport, p: Problem| {
        rep.ok = false;
        rep.problem = Some(p);
    };
    'segments: for (i, seg) in segs.iter().enumerate() {
        let bytes =
            std::fs::read(&seg.path).map_err(|source| AuditError::Io { path: seg.path.clone(), error: source })?;
        let header = match SegmentHeader::decode(&bytes) {
            Ok(h) => h,
            Err(reason) => {
                fail(
                    &mut rep,
                    Problem {
                        segment: seg.path.clone(),
                        offset: 0,
                        seq: None,
                        reason: format!("segment header: {reason}"),
                    },
                );
                break;
            }
        };
        if header.first_seq != seg.first_seq {
            let reason = format!(
                "segment header says its first record is {}, its name says {}",
                header.first_seq, seg.first_seq
            );
            fail(&mut rep, Problem { segment: seg.path.clone(), offset: 0, seq: None, reason });
            break;
        }
        match &expected {
            None => start = Some((header.first_seq, header.prev_hash, seg.path.clone())),
            Some((next, hash)) => {
                if header.first_seq != *next {
                    let reason = if header.first_seq > *next {
                        format!("records {next} to {} are missing", header.first_seq - 1)
                    } else {
                        format!("segment starts at record {}, expected {next}", header.first_seq)
                    };
                    fail(&mut rep, Problem { segment: seg.path.clone(), offset: 0, seq: None, reason });
                    break;
                }
                if header.prev_hash != *hash {
                    let reason = format!("segment header's previous hash does not match record {}", next - 1);
                    fail(&mut rep, Problem { segment: seg.path.clone(), offset: 0, seq: None, reason });
                    break;
                }
            }
        }
        let (mut next, mut hash) = (header.first_seq, header.prev_hash);
        let mut last_offset = HEADER_LEN as u64;
        let mut off = HEADER_LEN;
        loop {
            match format::read_frame(&bytes, off) {
                Ok(None) => break,
                Ok(Some(fr)) => {
                    let here = |reason: String| Problem {
                        segment: seg.path.clone(),
                        offset: fr.offset,
                        seq: Some(fr.seq),
                        reason,
                    };
                    if fr.seq != next {
                        fail(&mut rep, here(format!("sequence number {} where {next} was expected", fr.seq)));
                        break 'segments;
                    }
                    if fr.prev_hash != hash {
                        let reason = if next == header.first_seq {
                            "its previous hash does not match the segment header".to_string()
                        } else {
                            format!(
                                "its previous hash does not match record {} (at offset {}): that record was altered",
                                next - 1,
                                last_offset
                            )
                        };
                        fail(&mut rep, here(reason));
                        break 'segments;
                    }
                    if memchr_retention(fr.payload) {
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(fr.payload) {
                            if let (Some(s), Some(a)) = (v["first_seq"].as_u64(), v["anchor"].as_str()) {
                                retention_anchors.push((s, a.to_string()));
                            }
                        }
                    }
                    rep.records += 1;
                    rep.first_seq.get_or_insert(fr.seq);
                    rep.last_seq = Some(fr.seq);
                    rep.head_hash = format::hex(&fr.hash);
                    next += 1;
                    hash = fr.hash;
                    last_offset = fr.offset;
                    off = fr.end as usize;
                }
                Err(e) => {
                    let seq = (bytes.len() >= off + 16)
                        .then(|| u64::from_le_bytes(bytes[off + 8..off + 16].try_into().expect("8 bytes")));
                    let p = Problem {
                        segment: seg.path.clone(),
                        offset: e.offset(),
                        seq: seq.filter(|s| *s == next),
                        reason: e.reason().to_string(),
                    };
                    match e {
                        format::FrameError::Torn { .. } if i + 1 == n => rep.torn_tail = Some(p),
                        _ => {
                            let mut p = p;
                            if p.seq.is_none() {
                                p.reason = format!("{} (where record {next} should be)", p.reason);
                            }
                            fail(&mut rep, p);
                            break 'segments;
                        }
                    }
                    break;
                }
            }
        }
        expected = Some((next, hash));
    }
    if rep.ok {
        if let Some((first, prev, path)) = start {
            if first == 1 && prev != ZERO_HASH {
                let reason = "the log's first segment has a previous hash but starts at record 1".to_string();
                fail(&mut rep, Problem { segment: path, offset: 0, seq: None, reason });
            } else if first != 1 && !retention_anchors.iter().any(|(s, a)| *s == first && *a == format::hex(&prev)) {
                let reason =
                    format!("records 1 to {} are missing and no retention record accounts for them", first - 1);
                fail(&mut rep, Problem { segment: path, offset: 0, seq: None, reason });
            }
        }
    }
    Ok(rep)
}

fn memchr_retention(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"\"type\":\"retention\"").is_some()
}
