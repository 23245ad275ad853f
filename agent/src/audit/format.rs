//! The on-disk format of the audit log.
//!
//! The log is a directory of segment files named `seg-<first seq>.log`
//! (20 digits, so names sort in sequence order). Each segment starts with a
//! 64-byte header and continues with records:
//!
//! ```text
//! header:  magic "PCAUDIT\x01" | first_seq u64 | created_ms u64 | prev_hash [32] | crc32 u32 | 0u32
//! record:  len u32 | crc32 u32 | seq u64 | prev_hash [32] | payload [len]
//! ```
//!
//! Integers are little-endian. `payload` is one JSON object (`time_ms`,
//! `type` and the event's fields). The record's crc32 covers `seq`,
//! `prev_hash` and `payload`; it tells a torn or damaged write. The record's
//! hash is SHA-256 over the same bytes; each record carries the hash of the
//! one before it (`prev_hash`), across segments too: a segment header holds
//! the hash of the record just before its first one. The first record of a
//! log has seq 1 and a `prev_hash` of zeros.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"PCAUDIT\x01";
pub const HEADER_LEN: usize = 64;
/// Bytes before the payload: len, crc, seq, prev_hash.
pub const FRAME_OVERHEAD: usize = 4 + 4 + 8 + 32;
/// No record is larger than this; a length above it is damage.
pub const MAX_PAYLOAD: usize = 1 << 20;

pub type Hash = [u8; 32];
pub const ZERO_HASH: Hash = [0; 32];

/// A segment file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_seq: u64,
    pub created_ms: u64,
    pub prev_hash: Hash,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.first_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.created_ms.to_le_bytes());
        b[24..56].copy_from_slice(&self.prev_hash);
        let crc = crc32fast::hash(&b[0..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("header is {} bytes, shorter than {HEADER_LEN}", b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err("not a portcullis audit segment (bad magic)".into());
        }
        let crc = u32::from_le_bytes(b[56..60].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&b[0..56]) {
            return Err("header checksum mismatch".into());
        }
        Ok(SegmentHeader {
            first_seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            created_ms: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            prev_hash: b[24..56].try_into().expect("32 bytes"),
        })
    }
}

pub fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

/// The first seq encoded in a segment's file name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The hash of a record: SHA-256 over seq, prev_hash and payload.
pub fn record_hash(seq: u64, prev: &Hash, payload: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(seq.to_le_bytes());
    h.update(prev);
    h.update(payload);
    h.finalize().into()
}

/// Appends one framed record to `out` and returns its hash.
pub fn encode_record(out: &mut Vec<u8>, seq: u64, prev: &Hash, payload: &[u8]) -> Hash {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq.to_le_bytes());
    crc.update(prev);
    crc.update(payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(prev);
    out.extend_from_slice(payload);
    record_hash(seq, prev, payload)
}

/// One record as found in a segment.
#[derive(Debug, Clone)]
pub struct Frame<'a> {
    /// Byte offset of the record in its segment file.
    pub offset: u64,
    pub seq: u64,
    pub prev_hash: Hash,
    pub payload: &'a [u8],
    pub hash: Hash,
    /// Offset just past the record.
    pub end: u64,
}

/// Why a segment's records stop before the end of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The last record is incomplete (or the file ends in zeros): what a
    /// write cut short by a crash leaves. Nothing valid follows.
    Torn { offset: u64, reason: String },
    /// A complete record whose bytes do not check out.
    Damaged { offset: u64, reason: String },
}

impl FrameError {
    pub fn offset(&self) -> u64 {
        match self {
            FrameError::Torn { offset, .. } | FrameError::Damaged { offset, .. } => *offset,
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            FrameError::Torn { reason, .. } | FrameError::Damaged { reason, .. } => reason,
        }
    }
}

/// Reads the record at `offset` of a segment's bytes. `Ok(None)` at the end.
pub fn read_frame(buf: &[u8], offset: usize) -> Result<Option<Frame<'_>>, FrameError> {
    let rest = &buf[offset..];
    if rest.is_empty() {
        return Ok(None);
    }
    let off = offset as u64;
    if rest.iter().all(|&b| b == 0) {
        return Err(FrameError::Torn { offset: off, reason: format!("{} zero bytes at the end", rest.len()) });
    }
    if rest.len() < FRAME_OVERHEAD {
        return Err(FrameError::Torn {
            offset: off,
            reason: format!("incomplete record header ({} of {FRAME_OVERHEAD} bytes)", rest.len()),
        });
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_PAYLOAD {
        return Err(FrameError::Damaged { offset: off, reason: format!("impossible record length {len}") });
    }
    if rest.len() < FRAME_OVERHEAD + len {
        return Err(FrameError::Torn {
            offset: off,
            reason: format!("incomplete record ({} of {} bytes)", rest.len(), FRAME_OVERHEAD + len),
        });
    }
    let body = &rest[8..FRAME_OVERHEAD + len];
    if crc32fast::hash(body) != crc {
        return Err(FrameError::Damaged { offset: off, reason: "record checksum mismatch".into() });
    }
    let seq = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
    let prev_hash: Hash = body[8..40].try_into().expect("32 bytes");
    let payload = &body[40..];
    Ok(Some(Frame {
        offset: off,
        seq,
        prev_hash,
        payload,
        hash: record_hash(seq, &prev_hash, payload),
        end: (offset + FRAME_OVERHEAD + len) as u64,
    }))
}

/// A segment file found in the log directory.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    pub path: PathBuf,
    pub first_seq: u64,
    pub size: u64,
}

/// The segments of a log directory, oldest first.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<SegmentFile>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let Some(first_seq) = name.to_str().and_then(parse_segment_name) else { continue };
        let size = e.metadata()?.len();
        out.push(SegmentFile { path: e.path(), first_seq, size });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

pub fn hex(h: &Hash) -> String {
    ::hex::encode(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = SegmentHeader { first_seq: 42, created_ms: 7, prev_hash: [9; 32] };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        b[10] ^= 1;
        assert!(SegmentHeader::decode(&b).unwrap_err().contains("checksum"));
        b[0] = b'X';
        assert!(SegmentHeader::decode(&b).unwrap_err().contains("magic"));
    }

    #[test]
    fn segment_names_sort_by_sequence() {
        assert_eq!(segment_name(12), "seg-00000000000000000012.log");
        assert_eq!(parse_segment_name(&segment_name(12)), Some(12));
        assert_eq!(parse_segment_name("seg-12.log"), None);
        assert_eq!(parse_segment_name("lock"), None);
        assert!(segment_name(9) < segment_name(10));
    }

    #[test]
    fn frames_round_trip_and_chain() {
        let mut buf = vec![];
        let h1 = encode_record(&mut buf, 1, &ZERO_HASH, b"{\"a\":1}");
        let h2 = encode_record(&mut buf, 2, &h1, b"{\"b\":2}");
        let f1 = read_frame(&buf, 0).unwrap().unwrap();
        assert_eq!((f1.seq, f1.prev_hash, f1.payload, f1.hash), (1, ZERO_HASH, &b"{\"a\":1}"[..], h1));
        let f2 = read_frame(&buf, f1.end as usize).unwrap().unwrap();
        assert_eq!((f2.seq, f2.prev_hash, f2.hash), (2, h1, h2));
        assert!(read_frame(&buf, f2.end as usize).unwrap().is_none());
        assert_ne!(h1, h2);
    }

    #[test]
    fn torn_and_damaged_records_are_told_apart() {
        let mut buf = vec![];
        encode_record(&mut buf, 1, &ZERO_HASH, b"{\"a\":1}");
        let whole = buf.len();
        // Cut short anywhere: torn.
        for cut in 1..whole {
            let e = read_frame(&buf[..cut], 0).unwrap_err();
            assert!(matches!(e, FrameError::Torn { offset: 0, .. }), "cut at {cut}: {e:?}");
        }
        // Zeros where a record should be: torn.
        let zeros = vec![0u8; 100];
        assert!(matches!(read_frame(&zeros, 0), Err(FrameError::Torn { .. })));
        // Any flipped bit in a complete record: damaged.
        for i in 0..whole {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            match read_frame(&b, 0) {
                Err(FrameError::Damaged { offset: 0, .. }) | Err(FrameError::Torn { offset: 0, .. }) => {}
                other => panic!("flip at {i} not detected: {other:?}"),
            }
        }
    }
}
