//! Keeps injected credentials out of the log. Protocol modules register
//! each secret value they send upstream; every record is scrubbed of the
//! value's raw, base64 (standard and URL-safe, at any alignment inside a
//! longer base64 text, e.g. an HTTP Basic header), hex and URL-encoded
//! forms before it is written.
use std::collections::BTreeSet;

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;

/// What a scrubbed secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// The forms of one secret value that are looked for. Forms shorter than
/// four characters are left out unless they are the raw value itself.
pub fn encodings(secret: &str) -> Vec<String> {
    let raw = secret.as_bytes();
    if raw.is_empty() {
        return vec![];
    }
    let mut out = BTreeSet::new();
    out.insert(secret.to_string());
    out.insert(data_encoding::HEXLOWER.encode(raw));
    out.insert(data_encoding::HEXUPPER.encode(raw));
    for std in [true, false] {
        for k in 0..3usize {
            let core = base64_core(raw, k, std);
            if core.len() >= 4 {
                out.insert(core);
            }
        }
    }
    for upper in [true, false] {
        out.insert(percent(raw, upper, false, false));
        out.insert(percent(raw, upper, false, true));
        out.insert(percent(raw, upper, true, false));
    }
    out.into_iter().filter(|s| s.len() >= 4 || s == secret).collect()
}

/// The base64 characters that depend on the secret's bytes alone when the
/// secret starts `k` bytes into a longer base64-encoded text.
fn base64_core(raw: &[u8], k: usize, std: bool) -> String {
    let mut buf = vec![0u8; k];
    buf.extend_from_slice(raw);
    let enc = if std { data_encoding::BASE64_NOPAD.encode(&buf) } else { data_encoding::BASE64URL_NOPAD.encode(&buf) };
    let first = (8 * k).div_ceil(6);
    let last = (8 * (k + raw.len())) / 6; // exclusive
    if last <= first {
        return String::new();
    }
    enc[first..last].to_string()
}

/// Percent-encoding: unreserved characters kept (or all encoded), upper or
/// lower hex, space as `+` (form encoding) or `%20`.
fn percent(raw: &[u8], upper: bool, all: bool, form: bool) -> String {
    let mut s = String::with_capacity(raw.len() * 3);
    for &b in raw {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if unreserved && !all {
            s.push(b as char);
        } else if b == b' ' && form {
            s.push('+');
        } else if upper {
            s.push_str(&format!("%{b:02X}"));
        } else {
            s.push_str(&format!("%{b:02x}"));
        }
    }
    s
}

/// The set of registered secrets and the matchers built from them.
#[derive(Default)]
pub struct Scrubber {
    secrets: BTreeSet<String>,
    /// Matches the decoded forms, inside JSON strings.
    matcher: Option<AhoCorasick>,
    /// Matches the forms as they appear in serialised JSON (escaped): a
    /// cheap first test over a whole record.
    prefilter: Option<AhoCorasick>,
}

impl Scrubber {
    /// Adds a secret; returns whether it was new.
    pub fn register(&mut self, secret: &str) -> bool {
        if secret.is_empty() || !self.secrets.insert(secret.to_string()) {
            return false;
        }
        let patterns: BTreeSet<String> = self.secrets.iter().flat_map(|s| encodings(s)).collect();
        let escaped: Vec<String> = patterns
            .iter()
            .map(|p| {
                let j = serde_json::to_string(p).expect("a string serialises");
                j[1..j.len() - 1].to_string()
            })
            .collect();
        let build = |pats: &[String]| {
            AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(pats).expect("literal patterns build")
        };
        self.matcher = Some(build(&patterns.into_iter().collect::<Vec<_>>()));
        self.prefilter = Some(build(&escaped));
        true
    }

    pub fn contains(&self, secret: &str) -> bool {
        self.secrets.contains(secret)
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Scrubs a serialised record. Returns the new bytes when anything was
    /// replaced.
    pub fn scrub_json(&self, json: &[u8]) -> Option<Vec<u8>> {
        let (Some(pre), Some(m)) = (&self.prefilter, &self.matcher) else { return None };
        if !pre.is_match(json) {
            return None;
        }
        let mut v: Value = serde_json::from_slice(json).ok()?;
        scrub_value(&mut v, m);
        Some(serde_json::to_vec(&v).expect("a value serialises"))
    }
}

fn scrub_value(v: &mut Value, m: &AhoCorasick) {
    match v {
        Value::String(s) if m.is_match(s.as_str()) => *s = replace(m, s),
        Value::Array(a) => a.iter_mut().for_each(|x| scrub_value(x, m)),
        Value::Object(o) => {
            let old = std::mem::take(o);
            for (k, mut x) in old {
                scrub_value(&mut x, m);
                let k = if m.is_match(k.as_str()) { replace(m, &k) } else { k };
                o.insert(k, x);
            }
        }
        _ => {}
    }
}

fn replace(m: &AhoCorasick, s: &str) -> String {
    let reps = vec![REDACTED; m.patterns_len()];
    m.replace_all(s, &reps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubbed(s: &Scrubber, v: &Value) -> String {
        let bytes = serde_json::to_vec(v).unwrap();
        String::from_utf8(s.scrub_json(&bytes).unwrap_or(bytes)).unwrap()
    }

    #[test]
    fn raw_base64_hex_and_url_forms_are_removed() {
        let secret = "s3cr3t pa$$/word+€";
        let mut s = Scrubber::default();
        assert!(s.register(secret));
        assert!(!s.register(secret));
        let b64 = data_encoding::BASE64.encode(secret.as_bytes());
        let b64url = data_encoding::BASE64URL_NOPAD.encode(secret.as_bytes());
        let basic = data_encoding::BASE64.encode(format!("app:{secret}").as_bytes());
        let basic2 = data_encoding::BASE64.encode(format!("ab:{secret}").as_bytes());
        let basic3 = data_encoding::BASE64.encode(format!("a:{secret}").as_bytes());
        let hexed = data_encoding::HEXLOWER.encode(secret.as_bytes());
        let url = percent(secret.as_bytes(), true, false, false);
        let form = percent(secret.as_bytes(), false, false, true);
        let v = serde_json::json!({
            "raw": format!("password={secret};"),
            "nested": [{"b64": b64, "b64url": b64url}],
            "auth": [format!("Basic {basic}"), format!("Basic {basic2}"), format!("Basic {basic3}")],
            "hex": hexed,
            "query": format!("/x?token={url}&form={form}"),
            secret: "as a key",
        });
        let out = scrubbed(&s, &v);
        assert!(!out.contains("s3cr3t"), "{out}");
        for form in encodings(secret) {
            assert!(!out.contains(&form), "{form} left in {out}");
        }
        // What the secret was embedded in survives.
        assert!(out.contains("password=[REDACTED];"), "{out}");
        assert!(out.contains("/x?token=[REDACTED]&form=[REDACTED]"), "{out}");
        // The basic-auth blobs lose every character that depends on the
        // secret alone, whatever the alignment.
        for b in [&basic, &basic2, &basic3] {
            assert!(!out.contains(b.as_str()), "{out}");
        }
    }

    #[test]
    fn secrets_needing_json_escapes_are_found() {
        let secret = "quo\"te\\back\nslash";
        let mut s = Scrubber::default();
        s.register(secret);
        let out = scrubbed(&s, &serde_json::json!({"sql": format!("ALTER ROLE x PASSWORD '{secret}'")}));
        assert!(!out.contains("quo"), "{out}");
        assert!(out.contains("[REDACTED]"), "{out}");
    }

    #[test]
    fn records_without_secrets_are_left_alone() {
        let mut s = Scrubber::default();
        let v = serde_json::to_vec(&serde_json::json!({"a": "hello"})).unwrap();
        assert!(s.scrub_json(&v).is_none());
        s.register("topsecret");
        assert!(s.scrub_json(&v).is_none());
    }

    #[test]
    fn base64_cores_are_substrings_of_every_alignment() {
        let secret = b"0123456789abcdef";
        for k in 0..3 {
            for pre in [&b""[..], b"x", b"xy", b"xyz"] {
                let mut buf = pre.to_vec();
                buf.extend(std::iter::repeat_n(b'p', k));
                let off = buf.len();
                buf.extend_from_slice(secret);
                buf.extend_from_slice(b"tail");
                let enc = data_encoding::BASE64.encode(&buf);
                let core = base64_core(secret, off % 3, true);
                assert!(enc.contains(&core), "{enc} lacks {core}");
            }
        }
    }
}
