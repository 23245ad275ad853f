//! Reading a pushed pack far enough to prove a fast-forward: every object
//! is inflated (to find where the next one starts) but only commits are
//! kept; deltas whose base is a commit in the pack are resolved; each
//! commit's id is computed (SHA-1 with collision detection, or SHA-256)
//! and its parents read.
//!
//! Objects the pack does not carry (already on the server, or the bases of
//! a thin pack) are unknown: a walk that needs them proves nothing, and the
//! update counts as a force push (fail closed).
use std::collections::{HashMap, HashSet, VecDeque};

use flate2::{Decompress, FlushDecompress, Status};
use sha2::Digest;

use super::wire::{ObjectFormat, Oid};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("malformed pack: {0}")]
    Malformed(String),
    #[error("pack too large to inspect: {0}")]
    TooLarge(String),
}

fn bad(s: impl Into<String>) -> PackError {
    PackError::Malformed(s.into())
}

/// Limits on what one pack may make portcullis do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most objects in one pack.
    pub max_objects: u32,
    /// Most bytes inflated, over all objects.
    pub max_inflated: u64,
    /// Largest commit kept.
    pub max_commit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_objects: 10_000_000, max_inflated: 4 << 30, max_commit: 16 << 20 }
    }
}

/// The commits a pack carries: id → parents.
#[derive(Debug, Default, Clone)]
pub struct Commits {
    pub parents: HashMap<Oid, Vec<Oid>>,
    pub objects: u32,
}

impl Commits {
    /// Whether `old` is proven an ancestor of `new` (or equal to it) by the
    /// commits in the pack.
    pub fn proves_fast_forward(&self, old: &Oid, new: &Oid) -> bool {
        if old == new {
            return true;
        }
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([new.clone()]);
        while let Some(c) = queue.pop_front() {
            if &c == old {
                return true;
            }
            if !seen.insert(c.clone()) {
                continue;
            }
            if let Some(ps) = self.parents.get(&c) {
                queue.extend(ps.iter().cloned());
            }
        }
        false
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Commit,
    Tree,
    Blob,
    Tag,
}

/// Reads `pack` (with its trailing checksum).
pub fn read_commits(pack: &[u8], format: ObjectFormat, limits: Limits) -> Result<Commits, PackError> {
    let hash_len = match format {
        ObjectFormat::Sha1 => 20,
        ObjectFormat::Sha256 => 32,
    };
    if pack.len() < 12 + hash_len || &pack[..4] != b"PACK" {
        return Err(bad("no PACK header"));
    }
    let version = u32::from_be_bytes(pack[4..8].try_into().expect("4 bytes"));
    if version != 2 && version != 3 {
        return Err(bad(format!("unsupported pack version {version}")));
    }
    let count = u32::from_be_bytes(pack[8..12].try_into().expect("4 bytes"));
    if count > limits.max_objects {
        return Err(PackError::TooLarge(format!("{count} objects")));
    }
    let body_end = pack.len() - hash_len;
    let sum = hash(format, &[&pack[..body_end]]);
    if sum.as_bytes() != &pack[body_end..] {
        return Err(bad("checksum mismatch"));
    }
    let mut out = Commits { objects: count, ..Commits::default() };
    // Commits by offset (for OFS_DELTA bases) and their ids (REF_DELTA).
    let mut at_offset: HashMap<usize, std::rc::Rc<Vec<u8>>> = HashMap::new();
    let mut by_id: HashMap<Oid, usize> = HashMap::new();
    let mut inflated_total = 0u64;
    let mut pos = 12;
    for _ in 0..count {
        let start = pos;
        let byte = |p: usize| pack.get(p).copied().filter(|_| p < body_end).ok_or_else(|| bad("truncated entry"));
        let mut c = byte(pos)?;
        pos += 1;
        let type_id = (c >> 4) & 7;
        let mut size = (c & 0x0f) as u64;
        let mut shift = 4;
        while c & 0x80 != 0 {
            c = byte(pos)?;
            pos += 1;
            if shift > 56 {
                return Err(bad("object size overflows"));
            }
            size |= ((c & 0x7f) as u64) << shift;
            shift += 7;
        }
        // The base commit of a delta, when it is one we kept.
        let base: Option<std::rc::Rc<Vec<u8>>>;
        let kind = match type_id {
            1 => Some(Kind::Commit),
            2 => Some(Kind::Tree),
            3 => Some(Kind::Blob),
            4 => Some(Kind::Tag),
            6 | 7 => None,
            t => return Err(bad(format!("object type {t} at offset {start}"))),
        };
        match type_id {
            6 => {
                let mut c = byte(pos)?;
                pos += 1;
                let mut off = (c & 0x7f) as u64;
                while c & 0x80 != 0 {
                    c = byte(pos)?;
                    pos += 1;
                    off = off.checked_add(1).and_then(|o| o.checked_mul(128)).ok_or_else(|| bad("delta offset"))?
                        | (c & 0x7f) as u64;
                }
                let base_at = (start as u64).checked_sub(off).filter(|&b| off > 0 && b >= 12);
                let base_at = base_at.ok_or_else(|| bad(format!("delta at {start} points outside the pack")))?;
                base = at_offset.get(&(base_at as usize)).cloned();
            }
            7 => {
                let id = pack.get(pos..pos + hash_len).filter(|_| pos + hash_len <= body_end);
                let id = Oid::from_bytes(id.ok_or_else(|| bad("truncated delta base"))?);
                pos += hash_len;
                base = by_id.get(&id).and_then(|o| at_offset.get(o)).cloned();
            }
            _ => base = None,
        }
        let keep = kind == Some(Kind::Commit) || base.is_some();
        if keep && size > limits.max_commit as u64 {
            return Err(PackError::TooLarge(format!("a commit or commit delta of {size} bytes")));
        }
        inflated_total += size;
        if inflated_total > limits.max_inflated {
            return Err(PackError::TooLarge(format!("over {} bytes inflated", limits.max_inflated)));
        }
        let (data, used) = inflate(&pack[pos..body_end], size, keep)?;
        pos += used;
        if !keep {
            continue;
        }
        let content = match base {
            Some(b) => apply_delta(&b, &data, limits.max_commit)?,
            None => data,
        };
        let id = hash(format, &[format!("commit {}\0", content.len()).as_bytes(), &content]);
        let parents = commit_parents(&content, format).ok_or_else(|| bad(format!("commit {id} is malformed")))?;
        out.parents.insert(id.clone(), parents);
        by_id.insert(id, start);
        at_offset.insert(start, std::rc::Rc::new(content));
    }
    if pos != body_end {
        return Err(bad("data after the last object"));
    }
    Ok(out)
}

/// Inflates one zlib stream that must produce exactly `size` bytes; returns
/// the bytes (when `keep`) and how much input it used.
fn inflate(input: &[u8], size: u64, keep: bool) -> Result<(Vec<u8>, usize), PackError> {
    let mut z = Decompress::new(true);
    let mut out = Vec::with_capacity(if keep { size as usize } else { 0 });
    let mut scratch = vec![0u8; if keep { 0 } else { 64 << 10 }];
    loop {
        let before_in = z.total_in() as usize;
        let before_out = z.total_out();
        let status = if keep {
            out.reserve(((size - z.total_out()) as usize).max(1));
            z.decompress_vec(&input[before_in..], &mut out, FlushDecompress::None)
        } else {
            z.decompress(&input[before_in..], &mut scratch, FlushDecompress::None)
        }
        .map_err(|e| bad(format!("zlib: {e}")))?;
        if z.total_out() > size {
            return Err(bad("an object inflates past its declared size"));
        }
        match status {
            Status::StreamEnd => break,
            _ if z.total_in() as usize == before_in && z.total_out() == before_out => {
                return Err(bad("truncated object data"));
            }
            _ => {}
        }
    }
    if z.total_out() != size {
        return Err(bad("an object inflates to less than its declared size"));
    }
    Ok((out, z.total_in() as usize))
}

fn varint(d: &[u8], pos: &mut usize) -> Result<u64, PackError> {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let c = *d.get(*pos).ok_or_else(|| bad("truncated delta header"))?;
        *pos += 1;
        if shift > 56 {
            return Err(bad("delta size overflows"));
        }
        v |= ((c & 0x7f) as u64) << shift;
        shift += 7;
        if c & 0x80 == 0 {
            return Ok(v);
        }
    }
}

/// Applies a git delta to `base`.
pub fn apply_delta(base: &[u8], delta: &[u8], max: usize) -> Result<Vec<u8>, PackError> {
    let mut pos = 0;
    let src = varint(delta, &mut pos)?;
    let dst = varint(delta, &mut pos)?;
    if src != base.len() as u64 {
        return Err(bad("delta base size mismatch"));
    }
    if dst > max as u64 {
        return Err(PackError::TooLarge(format!("a delta result of {dst} bytes")));
    }
    let mut out = Vec::with_capacity(dst as usize);
    while pos < delta.len() {
        let op = delta[pos];
        pos += 1;
        if op & 0x80 != 0 {
            let mut off = 0usize;
            let mut len = 0usize;
            for i in 0..4 {
                if op & (1 << i) != 0 {
                    off |= (*delta.get(pos).ok_or_else(|| bad("truncated copy"))? as usize) << (8 * i);
                    pos += 1;
                }
            }
            for i in 0..3 {
                if op & (0x10 << i) != 0 {
                    len |= (*delta.get(pos).ok_or_else(|| bad("truncated copy"))? as usize) << (8 * i);
                    pos += 1;
                }
            }
            if len == 0 {
                len = 0x10000;
            }
            let piece =
                off.checked_add(len).and_then(|end| base.get(off..end)).ok_or_else(|| bad("copy out of range"))?;
            out.extend_from_slice(piece);
        } else if op != 0 {
            let n = op as usize;
            out.extend_from_slice(delta.get(pos..pos + n).ok_or_else(|| bad("truncated insert"))?);
            pos += n;
        } else {
            return Err(bad("reserved delta opcode 0"));
        }
        if out.len() as u64 > dst {
            return Err(bad("delta result longer than declared"));
        }
    }
    if out.len() as u64 != dst {
        return Err(bad("delta result size mismatch"));
    }
    Ok(out)
}

/// The parents of a commit: its `parent` header lines (after `tree`).
pub fn commit_parents(content: &[u8], format: ObjectFormat) -> Option<Vec<Oid>> {
    let mut parents = Vec::new();
    let mut lines = content.split(|&b| b == b'\n');
    let tree = lines.next()?.strip_prefix(b"tree ")?;
    if tree.len() != format.hex_len() {
        return None;
    }
    for line in lines {
        match line.strip_prefix(b"parent ") {
            Some(p) => {
                let oid = Oid::parse_hex(p)?;
                if oid.format() != format {
                    return None;
                }
                parents.push(oid);
            }
            None => break,
        }
    }
    Some(parents)
}

/// The object id of content given in parts.
pub fn hash(format: ObjectFormat, parts: &[&[u8]]) -> Oid {
    match format {
        ObjectFormat::Sha1 => {
            let mut h = sha1_checked::Sha1::new();
            for p in parts {
                h.update(p);
            }
            Oid::from_bytes(&h.finalize())
        }
        ObjectFormat::Sha256 => {
            let mut h = sha2::Sha256::new();
            for p in parts {
                h.update(p);
            }
            Oid::from_bytes(&h.finalize())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use flate2::{write::ZlibEncoder, Compression};

    use super::*;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn header(type_id: u8, size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut c = (type_id << 4) | (size & 0x0f) as u8;
        let mut rest = size >> 4;
        while rest > 0 {
            out.push(c | 0x80);
            c = (rest & 0x7f) as u8;
            rest >>= 7;
        }
        out.push(c);
        out
    }

    /// Test pack builder.
    pub(crate) struct PackBuilder {
        pub format: ObjectFormat,
        entries: Vec<u8>,
        count: u32,
    }

    impl PackBuilder {
        pub(crate) fn new(format: ObjectFormat) -> Self {
            PackBuilder { format, entries: Vec::new(), count: 0 }
        }
        fn offset(&self) -> usize {
            12 + self.entries.len()
        }
        pub(crate) fn object(&mut self, type_id: u8, data: &[u8]) -> (usize, Oid) {
            let at = self.offset();
            let name = match type_id {
                1 => "commit",
                2 => "tree",
                3 => "blob",
                _ => "tag",
            };
            self.entries.extend(header(type_id, data.len()));
            self.entries.extend(zlib(data));
            self.count += 1;
            (at, hash(self.format, &[format!("{name} {}\0", data.len()).as_bytes(), data]))
        }
        pub(crate) fn commit(&mut self, parents: &[&Oid], msg: &str) -> (usize, Oid) {
            let tree = "a".repeat(self.format.hex_len());
            let mut c = format!("tree {tree}\n");
            for p in parents {
                c.push_str(&format!("parent {p}\n"));
            }
            c.push_str(&format!("author A <a@x> 1 +0000\ncommitter A <a@x> 1 +0000\n\n{msg}\n"));
            self.object(1, c.as_bytes())
        }
        pub(crate) fn ofs_delta(&mut self, base_at: usize, delta: &[u8]) -> usize {
            let at = self.offset();
            self.entries.extend(header(6, delta.len()));
            let mut off = at - base_at;
            let mut bytes = vec![(off & 0x7f) as u8];
            off >>= 7;
            while off > 0 {
                off -= 1;
                bytes.push(0x80 | (off & 0x7f) as u8);
                off >>= 7;
            }
            bytes.reverse();
            self.entries.extend(bytes);
            self.entries.extend(zlib(delta));
            self.count += 1;
            at
        }
        pub(crate) fn ref_delta(&mut self, base: &Oid, delta: &[u8]) {
            self.entries.extend(header(7, delta.len()));
            self.entries.extend(base.as_bytes());
            self.entries.extend(zlib(delta));
            self.count += 1;
        }
        pub(crate) fn finish(&self) -> Vec<u8> {
            let mut p = b"PACK".to_vec();
            p.extend(2u32.to_be_bytes());
            p.extend(self.count.to_be_bytes());
            p.extend(&self.entries);
            let sum = hash(self.format, &[&p]);
            p.extend(sum.as_bytes());
            p
        }
    }

    /// A delta turning `base` into `target` by copying the common prefix
    /// and inserting the rest.
    pub(crate) fn delta(base: &[u8], target: &[u8]) -> Vec<u8> {
        let enc = |mut n: usize, out: &mut Vec<u8>| loop {
            let c = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(c);
                break;
            }
            out.push(c | 0x80);
        };
        let mut d = Vec::new();
        enc(base.len(), &mut d);
        enc(target.len(), &mut d);
        let common = base.iter().zip(target).take_while(|(a, b)| a == b).count().min(0xffff);
        if common > 0 {
            d.push(0x80 | 0x01 | 0x02 | 0x10 | 0x20);
            d.extend([0, 0, (common & 0xff) as u8, (common >> 8) as u8]);
        }
        for chunk in target[common..].chunks(127) {
            d.push(chunk.len() as u8);
            d.extend(chunk);
        }
        d
    }

    #[test]
    fn walks_from_new_tip_to_old() {
        for format in [ObjectFormat::Sha1, ObjectFormat::Sha256] {
            let old = hash(format, &[b"the old tip, on the server"]);
            let mut b = PackBuilder::new(format);
            let (_, c1) = b.commit(&[&old], "one");
            b.object(3, b"a blob");
            let (_, c2) = b.commit(&[&c1], "two");
            let other = hash(format, &[b"elsewhere"]);
            let (_, side) = b.commit(&[&other], "side");
            let (_, merge) = b.commit(&[&side, &c2], "merge");
            let commits = read_commits(&b.finish(), format, Limits::default()).unwrap();
            assert_eq!(commits.objects, 5);
            assert_eq!(commits.parents.len(), 4);
            assert!(commits.proves_fast_forward(&old, &c2));
            assert!(commits.proves_fast_forward(&old, &merge), "through the second parent");
            assert!(!commits.proves_fast_forward(&old, &side));
            assert!(!commits.proves_fast_forward(&c2, &old), "backwards is not forward");
            let unknown = hash(format, &[b"not in the pack"]);
            assert!(!commits.proves_fast_forward(&old, &unknown), "a tip outside the pack proves nothing");
        }
    }

    #[test]
    fn deltas_against_commits_are_resolved() {
        let format = ObjectFormat::Sha1;
        let old = hash(format, &[b"old"]);
        let mut b = PackBuilder::new(format);
        let (c1_at, c1) = b.commit(&[&old], "first");
        let tree = "a".repeat(40);
        let c2_text =
            format!("tree {tree}\nparent {c1}\nauthor A <a@x> 1 +0000\ncommitter A <a@x> 1 +0000\n\nsecond\n");
        let c1_text =
            format!("tree {tree}\nparent {old}\nauthor A <a@x> 1 +0000\ncommitter A <a@x> 1 +0000\n\nfirst\n");
        let c2 = hash(format, &[format!("commit {}\0", c2_text.len()).as_bytes(), c2_text.as_bytes()]);
        b.ofs_delta(c1_at, &delta(c1_text.as_bytes(), c2_text.as_bytes()));
        let c3_text = format!("tree {tree}\nparent {c2}\nauthor A <a@x> 1 +0000\ncommitter A <a@x> 1 +0000\n\nthird\n");
        let c3 = hash(format, &[format!("commit {}\0", c3_text.len()).as_bytes(), c3_text.as_bytes()]);
        b.ref_delta(&c2, &delta(c2_text.as_bytes(), c3_text.as_bytes()));
        // A thin-pack delta against an object the pack lacks is skipped.
        b.ref_delta(&hash(format, &[b"absent"]), &delta(b"x", b"y"));
        let commits = read_commits(&b.finish(), format, Limits::default()).unwrap();
        assert!(commits.parents.contains_key(&c2), "ofs delta resolved");
        assert!(commits.parents.contains_key(&c3), "ref delta resolved");
        assert!(commits.proves_fast_forward(&old, &c3));
    }

    #[test]
    fn broken_packs_are_refused() {
        let format = ObjectFormat::Sha1;
        let mut b = PackBuilder::new(format);
        b.commit(&[], "root");
        let good = b.finish();
        assert!(read_commits(&good, format, Limits::default()).is_ok());
        let mut bad_sum = good.clone();
        let n = bad_sum.len();
        bad_sum[n - 1] ^= 1;
        assert!(read_commits(&bad_sum, format, Limits::default()).is_err());
        assert!(read_commits(&good[..20], format, Limits::default()).is_err());
        assert!(read_commits(b"PACK", format, Limits::default()).is_err());
        // Too many objects, too much inflated.
        let l = Limits { max_objects: 0, ..Limits::default() };
        assert!(matches!(read_commits(&good, format, l), Err(PackError::TooLarge(_))));
        let l = Limits { max_inflated: 10, ..Limits::default() };
        assert!(matches!(read_commits(&good, format, l), Err(PackError::TooLarge(_))));
        // A header whose declared size is wrong.
        let mut p = PackBuilder::new(format);
        p.entries.extend(header(3, 99));
        p.entries.extend(zlib(b"short"));
        p.count = 1;
        assert!(read_commits(&p.finish(), format, Limits::default()).is_err());
        // A malformed commit.
        let mut p = PackBuilder::new(format);
        p.object(1, b"not a commit");
        assert!(read_commits(&p.finish(), format, Limits::default()).is_err());
    }

    #[test]
    fn delta_application_checks_bounds() {
        assert_eq!(apply_delta(b"hello", &delta(b"hello", b"help me"), 100).unwrap(), b"help me");
        assert!(apply_delta(b"hello", &[5, 3, 0x91, 10, 3], 100).is_err(), "copy out of range");
        assert!(apply_delta(b"hello", &[4, 1, 1, b'x'], 100).is_err(), "base size mismatch");
        assert!(apply_delta(b"hello", &[5, 2, 0], 100).is_err(), "opcode 0");
        assert!(matches!(apply_delta(b"hello", &[5, 200, 1], 100), Err(PackError::TooLarge(_))));
    }
}
