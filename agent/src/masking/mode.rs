//! Rendering a masked value in each mode.
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::spec::Mode;

/// The key of `hash` mode, ready to use. Its Debug prints nothing.
#[derive(Clone)]
pub struct HashKey(Hmac<Sha256>);

/// Keys shorter than this are refused: a short key makes hashes guessable.
pub const MIN_HASH_KEY: usize = 16;

impl HashKey {
    pub fn new(key: &[u8]) -> Option<HashKey> {
        (key.len() >= MIN_HASH_KEY).then(|| HashKey(Hmac::new_from_slice(key).expect("HMAC takes any key length")))
    }

    /// The first 8 bytes of HMAC-SHA256(key, value), as 16 hex digits.
    pub fn digest_hex(&self, value: &[u8], out: &mut Vec<u8>) {
        let mut mac = self.0.clone();
        mac.update(value);
        let tag = mac.finalize().into_bytes();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in &tag[..8] {
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 15) as usize]);
        }
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(<redacted>)")
    }
}

/// What became of a whole value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whole {
    /// Replaced by the bytes written to `out`.
    Text,
    /// Becomes NULL (SQL) or null (JSON).
    Null,
}

/// The text a whole value (a masked column, header or JSON member) is
/// shown as when redacted without a text of its own.
pub const REDACTED: &str = "****";

/// Renders a whole value in `mode`. `hash` without a key renders as a
/// redaction (a plan that needs a key never starts without one).
pub fn whole(mode: &Mode, value: &[u8], key: Option<&HashKey>, out: &mut Vec<u8>) -> Whole {
    match mode {
        Mode::Null => return Whole::Null,
        Mode::Redact(t) => out.extend_from_slice(t.as_deref().unwrap_or(REDACTED).as_bytes()),
        Mode::Partial(n) => partial(value, *n, out),
        Mode::Hash => match key {
            Some(k) => {
                out.extend_from_slice(b"hash:");
                k.digest_hex(value, out);
            }
            None => out.extend_from_slice(REDACTED.as_bytes()),
        },
    }
    Whole::Text
}

/// Renders a detector's match inside text. `label` names the detector.
/// `null` removes the match.
pub fn in_text(mode: &Mode, label: &str, value: &[u8], key: Option<&HashKey>, out: &mut Vec<u8>) {
    match mode {
        Mode::Null => {}
        Mode::Redact(Some(t)) => out.extend_from_slice(t.as_bytes()),
        Mode::Redact(None) => {
            out.push(b'<');
            out.extend_from_slice(label.as_bytes());
            out.push(b'>');
        }
        Mode::Partial(n) => partial(value, *n, out),
        Mode::Hash => {
            out.push(b'<');
            out.extend_from_slice(label.as_bytes());
            if let Some(k) = key {
                out.push(b':');
                k.digest_hex(value, out);
            }
            out.push(b'>');
        }
    }
}

/// Keeps the last `n` characters, at most half of them; letters and
/// digits before become `*`, everything else stays.
pub fn partial(value: &[u8], n: usize, out: &mut Vec<u8>) {
    match std::str::from_utf8(value) {
        Ok(s) => {
            let count = s.chars().count();
            let keep = n.min(count / 2);
            for (i, c) in s.chars().enumerate() {
                if i >= count - keep || !c.is_alphanumeric() {
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                } else {
                    out.push(b'*');
                }
            }
        }
        Err(_) => {
            let keep = n.min(value.len() / 2);
            for (i, &b) in value.iter().enumerate() {
                let shown = i >= value.len() - keep || (b.is_ascii() && !b.is_ascii_alphanumeric());
                out.push(if shown { b } else { b'*' });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn partial_keeps_at_most_half() {
        assert_eq!(s(|o| partial(b"4111 1111 1111 1111", 4, o)), "**** **** **** 1111");
        assert_eq!(s(|o| partial(b"alice@example.com", 4, o)), "*****@*******.com");
        assert_eq!(s(|o| partial(b"abc", 4, o)), "**c");
        assert_eq!(s(|o| partial(b"x", 4, o)), "*");
        assert_eq!(s(|o| partial("Zoë Åström".as_bytes(), 3, o)), "*** ***röm");
        assert_eq!(s(|o| partial(b"\xffabcdef", 2, o)), "*****ef");
    }

    #[test]
    fn hash_is_keyed_and_stable() {
        let k1 = HashKey::new(b"0123456789abcdef").unwrap();
        let k2 = HashKey::new(b"0123456789abcdeX").unwrap();
        let h = |k: &HashKey, v: &[u8]| s(|o| k.digest_hex(v, o));
        assert_eq!(h(&k1, b"a@b.io"), h(&k1, b"a@b.io"));
        assert_ne!(h(&k1, b"a@b.io"), h(&k1, b"c@b.io"));
        assert_ne!(h(&k1, b"a@b.io"), h(&k2, b"a@b.io"));
        assert_eq!(h(&k1, b"x").len(), 16);
        assert!(HashKey::new(b"short").is_none());
        assert!(!format!("{k1:?}").contains("0123"));
    }

    #[test]
    fn modes_whole_and_in_text() {
        let k = HashKey::new(b"0123456789abcdef").unwrap();
        let mut o = Vec::new();
        assert_eq!(whole(&Mode::Null, b"v", Some(&k), &mut o), Whole::Null);
        assert_eq!(s(|o| _ = whole(&Mode::Redact(None), b"v", None, o)), "****");
        assert_eq!(s(|o| _ = whole(&Mode::Redact(Some("[x]".into())), b"v", None, o)), "[x]");
        assert!(s(|o| _ = whole(&Mode::Hash, b"v", Some(&k), o)).starts_with("hash:"));
        assert_eq!(s(|o| in_text(&Mode::Redact(None), "email", b"a@b.io", None, o)), "<email>");
        assert_eq!(s(|o| in_text(&Mode::Null, "email", b"a@b.io", None, o)), "");
        let h = s(|o| in_text(&Mode::Hash, "email", b"a@b.io", Some(&k), o));
        assert!(h.starts_with("<email:") && h.len() == "<email:>".len() + 16, "{h}");
    }
}
