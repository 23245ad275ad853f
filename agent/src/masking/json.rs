//! JSON documents: every string (keys too) is masked with its escapes
//! decoded, so `"\u0061lice@x.io"` is an email like any other; members named
//! by `json:` entries are masked whole; everything else is copied byte for
//! byte. A document that does not parse is masked as plain text.
use std::borrow::Cow;

use super::{NullAs, Outcome, SessionMasker, Whole};

/// Nesting deeper than this is treated as text.
const MAX_DEPTH: usize = 256;

struct NotJson;

pub(super) fn mask(m: &mut SessionMasker, body: &[u8], out: &mut Vec<u8>) -> Outcome {
    let start = out.len();
    let mut w = Walker {
        m: &mut *m,
        src: body,
        pos: 0,
        out: &mut *out,
        changed: false,
        scratch: Vec::new(),
        masked: Vec::new(),
    };
    let parsed = (|| {
        w.ws();
        w.value(0)?;
        w.ws();
        if w.pos == w.src.len() {
            Ok(())
        } else {
            Err(NotJson)
        }
    })();
    let changed = w.changed;
    match parsed {
        Ok(()) if changed => Outcome::Masked,
        Ok(()) => {
            out.truncate(start);
            Outcome::Unchanged
        }
        Err(NotJson) => {
            out.truncate(start);
            m.mask_text(body, NullAs::Remove, out)
        }
    }
}

struct Walker<'a, 'b> {
    m: &'a mut SessionMasker,
    src: &'b [u8],
    pos: usize,
    out: &'a mut Vec<u8>,
    changed: bool,
    /// A decoded string.
    scratch: Vec<u8>,
    /// Its masked form.
    masked: Vec<u8>,
}

impl Walker<'_, '_> {
    fn ws(&mut self) {
        let from = self.pos;
        while self.src.get(self.pos).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
        self.out.extend_from_slice(&self.src[from..self.pos]);
    }

    fn expect(&mut self, b: u8) -> Result<(), NotJson> {
        if self.src.get(self.pos) == Some(&b) {
            self.pos += 1;
            self.out.push(b);
            Ok(())
        } else {
            Err(NotJson)
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), NotJson> {
        if depth > MAX_DEPTH {
            return Err(NotJson);
        }
        match self.src.get(self.pos) {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string(NullAs::Whole),
            Some(_) => self.scalar(),
            None => Err(NotJson),
        }
    }

    fn object(&mut self, depth: usize) -> Result<(), NotJson> {
        self.expect(b'{')?;
        self.ws();
        if self.src.get(self.pos) == Some(&b'}') {
            return self.expect(b'}');
        }
        loop {
            // The key, decoded, names the member for `json:` entries.
            let key_start = self.pos;
            self.string(NullAs::Remove)?;
            let key = decoded(&self.src[key_start + 1..self.pos - 1]).ok_or(NotJson)?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            match self.m.json_member(&key) {
                Some(mode) => {
                    let from = self.pos;
                    let mark = self.out.len();
                    self.value(depth + 1)?;
                    self.out.truncate(mark);
                    // A string member is masked by its decoded value; any
                    // other value by its JSON text.
                    let raw = &self.src[from..self.pos];
                    let value = if raw.first() == Some(&b'"') {
                        decode(&raw[1..raw.len() - 1]).ok_or(NotJson)?
                    } else {
                        raw.to_vec()
                    };
                    let mut rendered = Vec::new();
                    match self.m.render_whole(&mode, &value, &mut rendered) {
                        Whole::Null => self.out.extend_from_slice(b"null"),
                        Whole::Text => encode(&rendered, self.out),
                    }
                    self.changed = true;
                }
                None => self.value(depth + 1)?,
            }
            self.ws();
            match self.src.get(self.pos) {
                Some(b',') => {
                    self.expect(b',')?;
                    self.ws();
                }
                Some(b'}') => return self.expect(b'}'),
                _ => return Err(NotJson),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), NotJson> {
        self.expect(b'[')?;
        self.ws();
        if self.src.get(self.pos) == Some(&b']') {
            return self.expect(b']');
        }
        loop {
            self.value(depth + 1)?;
            self.ws();
            match self.src.get(self.pos) {
                Some(b',') => {
                    self.expect(b',')?;
                    self.ws();
                }
                Some(b']') => return self.expect(b']'),
                _ => return Err(NotJson),
            }
        }
    }

    /// A string at `pos`: copied as is, or re-encoded masked.
    fn string(&mut self, nulls: NullAs) -> Result<(), NotJson> {
        let start = self.pos;
        let src = self.src;
        if src.get(start) != Some(&b'"') {
            return Err(NotJson);
        }
        let mut i = start + 1;
        let mut escaped = false;
        loop {
            match src.get(i) {
                None => return Err(NotJson),
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    i += 2;
                }
                Some(c) if *c < 0x20 => return Err(NotJson),
                Some(_) => i += 1,
            }
        }
        let raw = &src[start + 1..i];
        self.pos = i + 1;
        let text: &[u8] = if escaped {
            self.scratch = decode(raw).ok_or(NotJson)?;
            &self.scratch
        } else {
            raw
        };
        self.masked.clear();
        match self.m.mask_text(text, nulls, &mut self.masked) {
            Outcome::Unchanged => self.out.extend_from_slice(&src[start..self.pos]),
            Outcome::Masked => {
                encode(&self.masked, self.out);
                self.changed = true;
            }
            Outcome::Null => {
                self.out.extend_from_slice(b"null");
                self.changed = true;
            }
        }
        Ok(())
    }

    /// A number or literal: masked as text (a card number may be a number);
    /// if masked it becomes a string.
    fn scalar(&mut self) -> Result<(), NotJson> {
        let start = self.pos;
        while self.src.get(self.pos).is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
        let raw = &self.src[start..self.pos];
        let valid = matches!(raw, b"true" | b"false" | b"null")
            || (!raw.is_empty() && raw.iter().all(|b| b.is_ascii_digit() || b"+-.eE".contains(b)));
        if !valid {
            return Err(NotJson);
        }
        self.masked.clear();
        match self.m.mask_text(raw, NullAs::Whole, &mut self.masked) {
            Outcome::Unchanged => self.out.extend_from_slice(raw),
            Outcome::Masked => {
                encode(&self.masked, self.out);
                self.changed = true;
            }
            Outcome::Null => {
                self.out.extend_from_slice(b"null");
                self.changed = true;
            }
        }
        Ok(())
    }
}

/// [`decode`], without a copy when there is nothing to decode (most member
/// names).
fn decoded(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    if raw.contains(&b'\\') {
        decode(raw).map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(raw))
    }
}

/// Decodes a JSON string body (without quotes). Lone surrogates become
/// U+FFFD.
fn decode(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let hex4 = |i: usize| -> Option<u32> {
        let h = raw.get(i..i + 4)?;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = *raw.get(i + 1)?;
        i += 2;
        let ch = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(i)?;
                i += 4;
                if (0xD800..0xDC00).contains(&hi) && raw.get(i..i + 2) == Some(b"\\u") {
                    match hex4(i + 2) {
                        Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                            i += 6;
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)).unwrap_or('\u{FFFD}')
                        }
                        _ => '\u{FFFD}',
                    }
                } else {
                    char::from_u32(hi).unwrap_or('\u{FFFD}')
                }
            }
            _ => return None,
        };
        let mut buf = [0; 4];
        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
    }
    Some(out)
}

/// Writes `text` as a JSON string.
fn encode(text: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in text {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c if c < 0x20 => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            c => out.push(c),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::super::tests::masker;
    use super::*;

    fn j(m: &mut SessionMasker, body: &str) -> (Outcome, String) {
        let mut out = Vec::new();
        let o = m.mask_json(body.as_bytes(), &mut out);
        (o, String::from_utf8(out).unwrap())
    }

    #[test]
    fn string_leaves_are_masked_with_escapes_decoded() {
        let mut m = masker(&["detector:email", "detector:card"], &[], &[]);
        let (o, s) =
            j(&mut m, r#"{"user": {"mail": "\u0061lice@x.io", "n": 4111111111111111}, "ok": [true, null, 1.5]}"#);
        assert_eq!(o, Outcome::Masked);
        assert_eq!(s, r#"{"user": {"mail": "<email>", "n": "<card>"}, "ok": [true, null, 1.5]}"#);
        serde_json::from_str::<serde_json::Value>(&s).unwrap();
        let body = r#"  {"a": "plain \"quoted\" text", "b": [1, 2]}  "#;
        assert_eq!(j(&mut m, body), (Outcome::Unchanged, String::new()));
    }

    #[test]
    fn members_by_name() {
        let mut m = masker(&["json:password", "json:ssn=null", "json:email=partial:3"], &[], &[]);
        let (_, s) = j(
            &mut m,
            r#"{"password": {"nested": [1]}, "ssn": "123-45-6789", "email": "bob@example.com", "x": "password"}"#,
        );
        assert_eq!(s, r#"{"password": "****", "ssn": null, "email": "***@*******.com", "x": "password"}"#);
    }

    #[test]
    fn null_mode_detectors_null_the_leaf() {
        let mut m = masker(&["detector:email=null"], &[], &[]);
        assert_eq!(j(&mut m, r#"["a@b.io", "c"]"#).1, r#"[null, "c"]"#);
    }

    #[test]
    fn escaped_credentials_are_caught() {
        let mut m = masker(&[], &[], &["tok/en\"value"]);
        let (_, s) = j(&mut m, r#"{"echo": "tok\/en\"value"}"#);
        assert_eq!(s, r#"{"echo": "<credential>"}"#);
    }

    #[test]
    fn not_json_is_masked_as_text() {
        let mut m = masker(&["detector:email"], &[], &[]);
        assert_eq!(j(&mut m, r#"{"a": "x@y.io", oops}"#), (Outcome::Masked, r#"{"a": "<email>", oops}"#.into()));
        let deep = "[".repeat(1000) + "\"x@y.io\"" + &"]".repeat(1000);
        let (o, s) = j(&mut m, &deep);
        assert_eq!(o, Outcome::Masked);
        assert!(s.contains("<email>") && !s.contains("x@y.io"));
    }

    #[test]
    fn decode_handles_surrogates() {
        assert_eq!(decode(br"\ud83d\ude00x").unwrap(), "😀x".as_bytes());
        assert_eq!(decode(br"\ud83dx").unwrap(), "\u{FFFD}x".as_bytes());
        assert!(decode(br"\q").is_none());
    }
}
