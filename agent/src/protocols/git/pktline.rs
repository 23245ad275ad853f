//! git's pkt-line framing (gitprotocol-common): four hex digits giving the
//! length of the line including themselves, then the payload; `0000` is a
//! flush, `0001` a delimiter, `0002` a response end. Lengths 3 and over
//! 65520 are malformed.
use std::fmt;

/// Largest pkt-line, length prefix included.
pub const MAX_PKT_LEN: usize = 65520;
/// Largest payload of one side-band-64k packet (band byte not included).
pub const MAX_SIDEBAND_DATA: usize = MAX_PKT_LEN - 4 - 1;
/// Largest payload of one (old) side-band packet.
pub const MAX_SIDEBAND_SMALL_DATA: usize = 1000 - 4 - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pkt<'a> {
    Data(&'a [u8]),
    Flush,
    Delim,
    ResponseEnd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PktError {
    #[error("truncated pkt-line at offset {0}")]
    Truncated(usize),
    #[error("bad pkt-line length {len:?} at offset {at}")]
    BadLength { len: String, at: usize },
}

/// Reads the pkt-line at `*pos` and moves past it; `Ok(None)` at the end of
/// `buf`.
pub fn read<'a>(buf: &'a [u8], pos: &mut usize) -> Result<Option<Pkt<'a>>, PktError> {
    let at = *pos;
    if at == buf.len() {
        return Ok(None);
    }
    let head = buf.get(at..at + 4).ok_or(PktError::Truncated(at))?;
    let len = parse_len(head).ok_or_else(|| PktError::BadLength { len: String::from_utf8_lossy(head).into(), at })?;
    let pkt = match len {
        0 => Pkt::Flush,
        1 => Pkt::Delim,
        2 => Pkt::ResponseEnd,
        3 => return Err(PktError::BadLength { len: "0003".into(), at }),
        n if n > MAX_PKT_LEN => return Err(PktError::BadLength { len: String::from_utf8_lossy(head).into(), at }),
        n => Pkt::Data(buf.get(at + 4..at + n).ok_or(PktError::Truncated(at))?),
    };
    *pos = at + if len < 4 { 4 } else { len };
    Ok(Some(pkt))
}

fn parse_len(head: &[u8]) -> Option<usize> {
    let mut n = 0usize;
    for &b in head {
        let d = (b as char).to_digit(16)?;
        n = n * 16 + d as usize;
    }
    Some(n)
}

/// A payload without its trailing newline (the protocol allows both).
pub fn chomp(data: &[u8]) -> &[u8] {
    data.strip_suffix(b"\n").unwrap_or(data)
}

/// Appends `data` as one pkt-line. Panics on a payload over the limit (the
/// callers build short lines or split first).
pub fn write(out: &mut Vec<u8>, data: &[u8]) {
    assert!(data.len() + 4 <= MAX_PKT_LEN, "pkt-line payload too long");
    out.extend_from_slice(format!("{:04x}", data.len() + 4).as_bytes());
    out.extend_from_slice(data);
}

pub fn flush(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0000");
}

/// Appends `data` on side-band `band`, split into packets of at most `max`
/// bytes.
pub fn write_band(out: &mut Vec<u8>, band: u8, data: &[u8], max: usize) {
    for chunk in data.chunks(max.max(1)) {
        let mut p = Vec::with_capacity(chunk.len() + 1);
        p.push(band);
        p.extend_from_slice(chunk);
        write(out, &p);
    }
}

/// A lossy, one-line rendering of a payload for messages.
pub struct Shown<'a>(pub &'a [u8]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = String::from_utf8_lossy(chomp(self.0));
        let s: String = s.chars().take(120).map(|c| if c.is_control() { '?' } else { c }).collect();
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_data_and_special_packets() {
        let buf = b"0009hello0000000100020006a\n";
        let mut pos = 0;
        assert_eq!(read(buf, &mut pos).unwrap(), Some(Pkt::Data(b"hello")));
        assert_eq!(read(buf, &mut pos).unwrap(), Some(Pkt::Flush));
        assert_eq!(read(buf, &mut pos).unwrap(), Some(Pkt::Delim));
        assert_eq!(read(buf, &mut pos).unwrap(), Some(Pkt::ResponseEnd));
        assert_eq!(read(buf, &mut pos).unwrap(), Some(Pkt::Data(b"a\n")));
        assert_eq!(read(buf, &mut pos).unwrap(), None);
        assert_eq!(pos, buf.len());
    }

    #[test]
    fn upper_case_hex_is_read() {
        let mut pos = 0;
        let buf = format!("000A{}", "x".repeat(6));
        assert_eq!(read(buf.as_bytes(), &mut pos).unwrap(), Some(Pkt::Data(b"xxxxxx")));
    }

    #[test]
    fn malformed_lengths_are_refused() {
        for bad in [&b"0003"[..], b"00g1abc", b"ffff", b"fff1"] {
            let mut pos = 0;
            assert!(matches!(read(bad, &mut pos), Err(PktError::BadLength { .. })), "{}", Shown(bad));
        }
        let mut pos = 0;
        assert_eq!(read(b"0010abc", &mut pos), Err(PktError::Truncated(0)));
        let mut pos = 0;
        assert_eq!(read(b"00", &mut pos), Err(PktError::Truncated(0)));
        // The largest packet is fine.
        let mut big = Vec::new();
        write(&mut big, &vec![b'a'; MAX_PKT_LEN - 4]);
        let mut pos = 0;
        assert!(matches!(read(&big, &mut pos), Ok(Some(Pkt::Data(d))) if d.len() == MAX_PKT_LEN - 4));
    }

    #[test]
    fn writes_round_trip_and_bands_split() {
        let mut out = Vec::new();
        write(&mut out, b"unpack ok\n");
        flush(&mut out);
        assert_eq!(out, b"000eunpack ok\n0000");
        let mut out = Vec::new();
        write_band(&mut out, 2, &[b'z'; 2500], MAX_SIDEBAND_SMALL_DATA);
        let mut pos = 0;
        let mut total = 0;
        let mut n = 0;
        while let Some(Pkt::Data(d)) = read(&out, &mut pos).unwrap() {
            assert_eq!(d[0], 2);
            assert!(d.len() - 1 <= MAX_SIDEBAND_SMALL_DATA);
            total += d.len() - 1;
            n += 1;
        }
        assert_eq!((total, n), (2500, 3));
    }
}
