//! A target's own injected credentials, found in anything flowing back:
//! raw, base64 (standard and URL-safe, at any alignment inside a longer
//! encoding, so `user:password` in a Basic header is caught), percent- and
//! form-encoded, and JSON-escaped. One literal search over all forms.
use base64::Engine;

use super::{
    detect::{Found, Kind},
    literals::Literals,
};

/// Credentials shorter than this are not searched for: they cannot be told
/// apart from ordinary data.
pub const MIN_SECRET_LEN: usize = 4;
/// Encoded fragments shorter than this are not searched for.
const MIN_FRAGMENT: usize = 8;

pub struct Injected {
    forms: Option<Literals>,
    longest: usize,
    /// Some form holds a line feed.
    newline: bool,
}

impl std::fmt::Debug for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Injected(<redacted>)")
    }
}

impl Injected {
    /// `secrets`: the values injected for this session (passwords, tokens).
    /// Returns also how many were too short to search for.
    pub fn new(secrets: &[&[u8]]) -> (Injected, usize) {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        let mut skipped = 0;
        for s in secrets {
            if s.len() < MIN_SECRET_LEN {
                skipped += 1;
                continue;
            }
            forms.extend(encodings(s));
        }
        forms.sort();
        forms.dedup();
        let longest = forms.iter().map(Vec::len).max().unwrap_or(0);
        let newline = forms.iter().any(|f| f.contains(&b'\n'));
        (Injected { forms: Literals::new(&forms), longest, newline }, skipped)
    }

    pub fn is_empty(&self) -> bool {
        self.forms.is_none()
    }

    /// The longest form searched for (a stream must hold back at least
    /// this much).
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// Whether a credential's form holds a line feed.
    pub fn spans_lines(&self) -> bool {
        self.newline
    }

    pub fn find(&self, text: &[u8], out: &mut Vec<Found>) {
        if let Some(forms) = &self.forms {
            for m in forms.find_iter(text) {
                out.push(Found { start: m.start(), end: m.end(), kind: Kind::Credential, context: m.start() });
            }
        }
    }
}

/// Every form a secret may take in a response.
fn encodings(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![s.to_vec()];
    for engine in [&base64::engine::general_purpose::STANDARD_NO_PAD, &base64::engine::general_purpose::URL_SAFE_NO_PAD]
    {
        for k in 0..3 {
            // Encode behind k bytes of something else and keep only the
            // characters that depend on the secret alone.
            let mut buf = vec![0u8; k];
            buf.extend_from_slice(s);
            let enc = engine.encode(&buf);
            let from = (8 * k).div_ceil(6);
            let to = 8 * (k + s.len()) / 6;
            if to > from && to - from >= MIN_FRAGMENT {
                out.push(enc.as_bytes()[from..to].to_vec());
            }
        }
    }
    for (upper, plus) in [(true, false), (false, false), (true, true)] {
        out.push(percent(s, upper, plus));
    }
    out.push(json_escaped(s));
    out
}

fn percent(s: &[u8], upper: bool, plus_for_space: bool) -> Vec<u8> {
    let hex: &[u8; 16] = if upper { b"0123456789ABCDEF" } else { b"0123456789abcdef" };
    let mut out = Vec::with_capacity(s.len() * 3);
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else if b == b' ' && plus_for_space {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', hex[(b >> 4) as usize], hex[(b & 15) as usize]]);
        }
    }
    out
}

fn json_escaped(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 8);
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' => out.extend_from_slice(b"\\/"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(inj: &Injected, text: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        inj.find(text, &mut out);
        out.iter().map(|f| String::from_utf8_lossy(&text[f.start..f.end]).into_owned()).collect()
    }

    #[test]
    fn raw_and_encoded_forms_are_found() {
        let secret = b"p@ss w/rd+Secret!";
        let (inj, skipped) = Injected::new(&[secret, b"abc"]);
        assert_eq!(skipped, 1);
        let e = base64::engine::general_purpose::STANDARD;
        // Raw.
        assert_eq!(spans(&inj, b"err: p@ss w/rd+Secret! rejected").len(), 1);
        // Basic auth: the secret sits at an arbitrary offset of the encoding.
        for user in ["u", "us", "usr", "user1"] {
            let basic = e.encode(format!("{user}:p@ss w/rd+Secret!"));
            assert_eq!(spans(&inj, format!("Authorization: Basic {basic}").as_bytes()).len(), 1, "{user}");
        }
        let url = base64::engine::general_purpose::URL_SAFE.encode(b"xp@ss w/rd+Secret!");
        assert_eq!(spans(&inj, url.as_bytes()).len(), 1);
        // Percent-encoded, both cases of hex, and form encoding.
        assert_eq!(spans(&inj, b"?pw=p%40ss%20w%2Frd%2BSecret%21&x=1").len(), 1);
        assert_eq!(spans(&inj, b"?pw=p%40ss%20w%2frd%2bSecret%21").len(), 1);
        assert_eq!(spans(&inj, b"?pw=p%40ss+w%2Frd%2BSecret%21").len(), 1);
        // JSON-escaped.
        assert_eq!(spans(&inj, br#"{"pw":"p@ss w\/rd+Secret!"}"#).len(), 1);
        // Something else.
        assert!(spans(&inj, b"p@ss w/rd+Secret? no").is_empty());
    }

    #[test]
    fn nothing_to_find() {
        let (inj, _) = Injected::new(&[]);
        assert!(inj.is_empty());
        assert!(spans(&inj, b"anything").is_empty());
    }
}
