//! Value detectors: one pass over the text with a single multi-pattern
//! automaton (every built-in and custom pattern at once), then validators
//! (Luhn, mod-97, JWT header) that keep false positives out.
use regex_automata::{
    meta::{self, Regex},
    util::{captures::Captures, syntax},
    Anchored, Input, MatchKind, PatternID,
};

use super::spec::{Builtin, CustomDetector};

/// What found a match: a built-in detector or the index of a custom one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Builtin(Builtin),
    Custom(usize),
    /// One of the session's own injected credentials (never from a pattern).
    Credential,
}

/// How a pattern's match is checked and which part of it is the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// The whole match.
    None,
    Luhn,
    Iban,
    Jwt,
    /// The match must not be followed by a base64 character; the secret is
    /// the last 40 characters.
    AwsSecret,
    /// The secret is the pattern's first capture group.
    Group,
}

struct Pattern {
    kind: Kind,
    check: Check,
}

/// A found secret: bytes `start..end` of the text, and which detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub start: usize,
    pub end: usize,
    pub kind: Kind,
    /// Where the whole match starts, context included (`Bearer ` before a
    /// token): a stream holds back from here.
    pub context: usize,
}

/// Characters of bearer tokens and similar opaque credentials.
const TOKEN_CHARS: &str = r"[A-Za-z0-9._~+/=\-]";

/// The built-in patterns, in priority order (at one start position the
/// earlier pattern wins). Counted repetitions stay small so the automaton
/// stays small; validators check the rest.
fn builtin_patterns() -> Vec<(Builtin, Check, String)> {
    use Builtin::*;
    vec![
        (
            PrivateKey,
            Check::None,
            // The body may be cut off (truncated text, or a stream that has
            // not caught up yet): mask to where it stops.
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,.\\]|-[A-Za-z0-9])*(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)?".into(),
        ),
        (Jwt, Check::Jwt, r"eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*".into()),
        (
            AwsKey,
            Check::AwsSecret,
            r#"(?i:(?:aws_?)?secret_?access_?key)["']?\s*[:=]+>?\s*["']?[A-Za-z0-9/+]{40}"#.into(),
        ),
        (
            Token,
            Check::Group,
            format!(
                r#"(?i:authorization)["']?\s*[:=]\s*["']?(?:(?i:bearer|basic|token|digest|bot)\s+)?({TOKEN_CHARS}{{8,}})"#
            ),
        ),
        (Token, Check::Group, format!(r"(?i:bearer)\s+({TOKEN_CHARS}{{16,}})")),
        (
            Token,
            Check::None,
            concat!(
                r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}|glpat-[A-Za-z0-9_\-]{20,}",
                r"|xox[abposr]-[A-Za-z0-9\-]{10,}|xapp-[A-Za-z0-9\-]{10,}|sk-[A-Za-z0-9_\-]{20,}",
                r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}|AIza[A-Za-z0-9_\-]{35}|npm_[A-Za-z0-9]{36,}",
                r"|hf_[A-Za-z0-9]{30,}|pypi-[A-Za-z0-9_\-]{50,})"
            )
            .into(),
        ),
        (
            Token,
            Check::Group,
            concat!(
                r"(?i:api[_\-]?key|apikey|api[_\-]?secret|secret[_\-]?key|client[_\-]?secret|access[_\-]?token",
                r#"|auth[_\-]?token|refresh[_\-]?token|private[_\-]?key|passw(?:or)?d|passwd|pwd|token|secret)["']?"#,
                r#"\s*[:=]\s*["']?([^\s"'`,;&<>\x00]{8,})"#
            )
            .into(),
        ),
        (AwsKey, Check::None, r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b".into()),
        (Email, Check::None, r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}".into()),
        (Iban, Check::Iban, r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b".into()),
        (Card, Check::Luhn, r"\b[0-9](?:[ \-]?[0-9]){12,}\b".into()),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("detector `{name}`: {message}")]
    Pattern { name: String, message: String },
    #[error("detector `{name}` matches empty text; it must match at least one character")]
    Empty { name: String },
    #[error("the detectors together are too large to compile: {0}")]
    Build(String),
}

fn syntax_config() -> syntax::Config {
    // ASCII classes and boundaries keep every pattern within the DFA
    // engines (a Unicode \b forces the slow path); text may be any bytes.
    syntax::Config::new().unicode(false).utf8(false)
}

/// Checks one custom pattern alone (for policy validation).
pub fn check_custom(d: &CustomDetector) -> Result<(), DetectError> {
    let re = Regex::builder()
        .syntax(syntax_config())
        .configure(Regex::config().nfa_size_limit(Some(1 << 20)))
        .build(&d.pattern)
        .map_err(|e| DetectError::Pattern { name: d.name.clone(), message: one_line(&e.to_string()) })?;
    if re.is_match(Input::new("").anchored(Anchored::Yes)) {
        return Err(DetectError::Empty { name: d.name.clone() });
    }
    Ok(())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A compiled set of detectors.
pub struct Detectors {
    re: Regex,
    patterns: Vec<Pattern>,
    /// Pattern ids that have a capture group to extract.
    group_caps: Captures,
}

impl std::fmt::Debug for Detectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detectors").field("patterns", &self.patterns.len()).finish()
    }
}

/// Per-searcher scratch space (one per thread/session; never shared).
pub struct Scratch {
    cache: meta::Cache,
    caps: Captures,
}

impl Detectors {
    /// Compiles the given built-ins and custom detectors (with their index
    /// in the policy's list) into one automaton.
    pub fn new(builtins: &[Builtin], custom: &[(usize, &CustomDetector)]) -> Result<Detectors, DetectError> {
        let mut sources: Vec<String> = Vec::new();
        let mut patterns = Vec::new();
        // Custom detectors first: at one start position they win, so a
        // built-in candidate that fails validation never hides them.
        for (i, d) in custom {
            check_custom(d)?;
            let has_group = Regex::builder()
                .syntax(syntax_config())
                .build(&d.pattern)
                .map(|r| r.group_info().group_len(PatternID::ZERO) > 1)
                .unwrap_or(false);
            sources.push(d.pattern.clone());
            patterns
                .push(Pattern { kind: Kind::Custom(*i), check: if has_group { Check::Group } else { Check::None } });
        }
        for (b, check, src) in builtin_patterns() {
            if builtins.contains(&b) {
                sources.push(src);
                patterns.push(Pattern { kind: Kind::Builtin(b), check });
            }
        }
        let re = Regex::builder()
            .syntax(syntax_config())
            .configure(Regex::config().match_kind(MatchKind::LeftmostFirst).hybrid_cache_capacity(8 << 20))
            .build_many(&sources)
            .map_err(|e| DetectError::Build(one_line(&e.to_string())))?;
        let group_caps = Captures::all(re.group_info().clone());
        Ok(Detectors { re, patterns, group_caps })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn scratch(&self) -> Scratch {
        Scratch { cache: self.re.create_cache(), caps: self.group_caps.clone() }
    }

    /// Appends every validated match in `text` to `out`, in order, without
    /// overlaps. `at_end`: nothing follows `text` (false for a stream whose
    /// next chunk has not arrived, where a match touching the end is kept
    /// as a candidate).
    pub fn find(&self, scratch: &mut Scratch, text: &[u8], out: &mut Vec<Found>) {
        if self.patterns.is_empty() {
            return;
        }
        let mut at = 0;
        while at < text.len() {
            let input = Input::new(text).range(at..);
            let Some(m) = self.re.search_with(&mut scratch.cache, &input) else { break };
            let (s, e) = (m.start(), m.end());
            let pat = &self.patterns[m.pattern().as_usize()];
            let kept = match pat.check {
                Check::None => Some((s, e)),
                Check::Luhn => card_in(&text[s..e]).map(|(a, b)| (s + a, s + b)),
                Check::Iban => iban_in(&text[s..e]).map(|(a, b)| (s + a, s + b)),
                Check::Jwt => jwt_ok(&text[s..e]).then_some((s, e)),
                Check::AwsSecret => {
                    let next_is_b64 = text.get(e).is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'/' || c == b'+');
                    (!next_is_b64).then_some((e - 40, e))
                }
                Check::Group => {
                    let input = Input::new(text).range(s..e).anchored(Anchored::Pattern(m.pattern()));
                    self.re.search_captures_with(&mut scratch.cache, &input, &mut scratch.caps);
                    match scratch.caps.get_group(1) {
                        Some(g) if g.start < g.end => Some((g.start, g.end)),
                        // The group did not take part: mask the whole match.
                        _ => Some((s, e)),
                    }
                }
            };
            if let Some((a, b)) = kept {
                out.push(Found { start: a, end: b, kind: pat.kind, context: s.min(a) });
            }
            // Empty matches cannot happen (custom patterns are checked), but
            // never loop on one.
            at = e.max(s + 1);
        }
    }
}

/// Luhn check over ASCII digits.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = (d - b'0') as u32;
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

/// Finds a card number in a run of digits with optional single spaces or
/// dashes: 13 to 19 digits, Luhn-valid, an issuer's first digit (2-6), and
/// either no separators or groups printed as cards are (4-4-4-4[-3],
/// 4-6-5, 4-6-4). Returns the span within the run.
fn card_in(run: &[u8]) -> Option<(usize, usize)> {
    // Groups: (start, end) of each digit group.
    let mut groups: Vec<(usize, usize)> = Vec::with_capacity(8);
    let mut start = 0;
    let mut sep: Option<u8> = None;
    for (i, &c) in run.iter().enumerate() {
        if !c.is_ascii_digit() {
            // Mixed separators are not a card layout; split there.
            if sep.is_some_and(|s| s != c) {
                groups.push((start, i));
                return card_in_groups(run, &groups)
                    .or_else(|| card_in(&run[i + 1..]).map(|(a, b)| (a + i + 1, b + i + 1)));
            }
            sep = Some(c);
            groups.push((start, i));
            start = i + 1;
        }
    }
    groups.push((start, run.len()));
    card_in_groups(run, &groups)
}

fn card_in_groups(run: &[u8], groups: &[(usize, usize)]) -> Option<(usize, usize)> {
    let ok = |a: usize, b: usize| -> bool {
        let digits: Vec<u8> = run[groups[a].0..groups[b].1].iter().copied().filter(u8::is_ascii_digit).collect();
        (13..=19).contains(&digits.len()) && (b'2'..=b'6').contains(&digits[0]) && luhn(&digits)
    };
    if groups.len() == 1 {
        let (s, e) = groups[0];
        return ok(0, 0).then_some((s, e));
    }
    let len = |g: usize| groups[g].1 - groups[g].0;
    for a in 0..groups.len() {
        for b in a + 1..groups.len() {
            let lens: Vec<usize> = (a..=b).map(len).collect();
            let layout = match lens.as_slice() {
                [4, 6, 5] | [4, 6, 4] => true,
                [first @ .., last] => first.iter().all(|&l| l == 4) && (1..=4).contains(last),
                [] => false,
            };
            if layout && ok(a, b) {
                return Some((groups[a].0, groups[b].1));
            }
        }
    }
    None
}

/// IBAN lengths by country (the SWIFT registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BI", 27),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DJ", 27),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FK", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"LY", 25),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MN", 20),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NI", 28),
    (b"NL", 18),
    (b"NO", 15),
    (b"OM", 23),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"RU", 33),
    (b"SA", 24),
    (b"SC", 31),
    (b"SD", 18),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"SO", 23),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
    (b"YE", 30),
];

/// ISO 13616 check: move the first four characters to the end, letters to
/// numbers (A=10), remainder mod 97 must be 1.
pub fn iban_mod97(iban: &[u8]) -> bool {
    let mut rem: u32 = 0;
    for &c in iban[4..].iter().chain(&iban[..4]) {
        match c {
            b'0'..=b'9' => rem = (rem * 10 + (c - b'0') as u32) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + (c - b'A' + 10) as u32) % 97,
            _ => return false,
        }
    }
    rem == 1
}

/// Finds an IBAN at the start of a candidate (which may run on into the
/// next word): the country's length if known, else the longest prefix of
/// whole groups that passes mod-97.
fn iban_in(cand: &[u8]) -> Option<(usize, usize)> {
    let mut compact = Vec::with_capacity(34);
    let mut ends = Vec::with_capacity(34); // end offset in `cand` after each compact char
    for (i, &c) in cand.iter().enumerate() {
        if c != b' ' {
            compact.push(c);
            ends.push(i + 1);
        }
    }
    let country = &compact[..2];
    let want = IBAN_LENGTHS.iter().find(|(cc, _)| cc.as_slice() == country).map(|&(_, l)| l);
    match want {
        Some(l) => (compact.len() >= l && iban_mod97(&compact[..l])).then(|| (0, ends[l - 1])),
        None => (15..=compact.len().min(34)).rev().find(|&l| iban_mod97(&compact[..l])).map(|l| (0, ends[l - 1])),
    }
}

/// A JWT's header is base64url JSON: it decodes to an object.
fn jwt_ok(m: &[u8]) -> bool {
    use base64::Engine;
    let header = m.split(|&c| c == b'.').next().unwrap_or_default();
    let n = header.len().min(64) / 4 * 4; // a prefix is enough
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&header[..n])
        .is_ok_and(|h| h.first() == Some(&b'{') && h.windows(2).any(|w| w == b"\":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Detectors {
        Detectors::new(&Builtin::ALL, &[]).unwrap()
    }

    fn found(d: &Detectors, text: &str) -> Vec<(String, Kind)> {
        let mut s = d.scratch();
        let mut out = Vec::new();
        d.find(&mut s, text.as_bytes(), &mut out);
        out.iter().map(|f| (text[f.start..f.end].to_string(), f.kind)).collect()
    }

    fn one(text: &str) -> Option<(String, Builtin)> {
        let f = found(&all(), text);
        assert!(f.len() <= 1, "{f:?}");
        f.into_iter().next().map(|(s, k)| match k {
            Kind::Builtin(b) => (s, b),
            other => panic!("{other:?}"),
        })
    }

    fn is(text: &str, secret: &str, kind: Builtin) {
        assert_eq!(one(text), Some((secret.to_string(), kind)), "in {text:?}");
    }

    #[test]
    fn emails() {
        is("write to alice.smith+x@mail.example.co.uk today", "alice.smith+x@mail.example.co.uk", Builtin::Email);
        is("<bob@example.org>", "bob@example.org", Builtin::Email);
        assert_eq!(one("user@localhost and @handle"), None);
    }

    #[test]
    fn cards_need_luhn_and_a_card_layout() {
        is("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111", Builtin::Card);
        is("4111-1111-1111-1111", "4111-1111-1111-1111", Builtin::Card);
        is("pan=5555555555554444;", "5555555555554444", Builtin::Card);
        is("amex 3782 822463 10005.", "3782 822463 10005", Builtin::Card);
        // One digit off: not Luhn-valid, not masked.
        assert_eq!(one("4111 1111 1111 1112"), None);
        assert_eq!(one("order 4111111111111112"), None);
        // Luhn-valid but no issuer starts with 0, 1, 7, 8 or 9.
        assert_eq!(one("0000000000000000"), None);
        // A longer id without separators is not a card.
        assert_eq!(one("41111111111111110000"), None);
        // A phone number laid out unlike a card.
        assert_eq!(one("+1 555 012 3456 789"), None);
        // A card after other digits of the same run.
        is("ref 12-4111-1111-1111-1111", "4111-1111-1111-1111", Builtin::Card);
        is("1234 4111 1111 1111 1111", "4111 1111 1111 1111", Builtin::Card);
    }

    #[test]
    fn ibans_need_mod97() {
        is("pay DE89 3704 0044 0532 0130 00 now", "DE89 3704 0044 0532 0130 00", Builtin::Iban);
        is("GB82WEST12345698765432", "GB82WEST12345698765432", Builtin::Iban);
        is("DE89370400440532013000 ABCD", "DE89370400440532013000", Builtin::Iban);
        assert_eq!(one("DE88 3704 0044 0532 0130 00"), None);
        assert!(iban_mod97(b"NO9386011117947"));
    }

    #[test]
    fn jwts() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        is(&format!("token {jwt} end"), jwt, Builtin::Jwt);
        // eyJ followed by something that is not base64 JSON.
        assert_eq!(one("eyJzzzzzzzzzz.abcdefghij.xyz"), None);
    }

    #[test]
    fn aws_keys() {
        is("id AKIAIOSFODNN7EXAMPLE,", "AKIAIOSFODNN7EXAMPLE", Builtin::AwsKey);
        is(
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            Builtin::AwsKey,
        );
        is(
            r#"{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}"#,
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            Builtin::AwsKey,
        );
        assert_eq!(one("AKIAIOSFODNN7EXAMPL"), None);
    }

    #[test]
    fn private_keys_whole_or_cut_off() {
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nMIIEpAIBAAKCAQEA1234+/=\nabcd\n-----END RSA PRIVATE KEY-----";
        is(&format!("key:\n{pem}\nThanks, Bob"), pem, Builtin::PrivateKey);
        let cut = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA";
        is(&format!("{cut}"), cut, Builtin::PrivateKey);
        assert_eq!(one("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"), None);
    }

    #[test]
    fn tokens() {
        is("Authorization: Bearer abcdef0123456789abcdef", "abcdef0123456789abcdef", Builtin::Token);
        is("authorization=Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA==", Builtin::Token);
        is("use bearer abcdefghijklmnop1234 here", "abcdefghijklmnop1234", Builtin::Token);
        let gh = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
        is(&format!("GITHUB_TOKEN={gh}"), gh, Builtin::Token);
        is("key sk-proj-abcdefghijklmnopqrstuvwx.", "sk-proj-abcdefghijklmnopqrstuvwx", Builtin::Token);
        is("xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij", Builtin::Token);
        is(r#"{"api_key": "9f8e7d6c5b4a"}"#, "9f8e7d6c5b4a", Builtin::Token);
        is("password=hunter2hunter2&x=1", "hunter2hunter2", Builtin::Token);
        assert_eq!(one("reset your password: click"), None);
        assert_eq!(one("task-1234 is done"), None);
        assert_eq!(one("ghp_short"), None);
    }

    #[test]
    fn several_in_one_text_in_order() {
        let text = "Ann <ann@x.io> paid with 4111111111111111, Bob <bob@y.io> with 5555 5555 5555 4444.";
        let f = found(&all(), text);
        let got: Vec<&str> = f.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(got, ["ann@x.io", "4111111111111111", "bob@y.io", "5555 5555 5555 4444"]);
    }

    #[test]
    fn only_enabled_detectors_and_custom_ones() {
        let emp = CustomDetector { name: "emp".into(), pattern: r"\bEMP-[0-9]{6}\b".into() };
        let part = CustomDetector { name: "ref".into(), pattern: r"ref=([A-Z]{3})[0-9]+".into() };
        let d = Detectors::new(&[Builtin::Email], &[(0, &emp), (1, &part)]).unwrap();
        let f = found(&d, "EMP-123456 a@b.io 4111111111111111 ref=ABC123");
        assert_eq!(
            f,
            vec![
                ("EMP-123456".into(), Kind::Custom(0)),
                ("a@b.io".into(), Kind::Builtin(Builtin::Email)),
                ("ABC".into(), Kind::Custom(1)),
            ]
        );
    }

    #[test]
    fn custom_patterns_are_checked() {
        let bad = CustomDetector { name: "x".into(), pattern: "(unclosed".into() };
        assert!(matches!(check_custom(&bad), Err(DetectError::Pattern { .. })));
        let empty = CustomDetector { name: "y".into(), pattern: "a*".into() };
        assert!(matches!(check_custom(&empty), Err(DetectError::Empty { .. })));
    }

    #[test]
    fn invalid_utf8_is_searched_too() {
        let d = all();
        let mut s = d.scratch();
        let mut out = Vec::new();
        d.find(&mut s, b"\xff\xfe bob@example.com \xc3", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].start, out[0].end), (3, 18));
    }
}
