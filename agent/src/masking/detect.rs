//! Value detectors. One pass of cheap triggers over the text finds where a
//! secret may start: `@` (memchr) for emails, a run of digits for cards and
//! IBANs, and one literal search (SIMD; the `literals` module) for every
//! literal a built-in pattern begins with (`-----BEGIN `, `eyJ`, `ghp_`,
//! `AKIA`, `Bearer`, `password`...). At each trigger the detector's pattern
//! runs anchored there (one multi-pattern automaton holds them all), then
//! validators (Luhn, mod-97, JWT header) keep false positives out. Custom
//! detectors run as one more multi-pattern automaton over the text.
use regex_automata::{
    meta::{self, Regex},
    util::{captures::Captures, syntax},
    Anchored, Input, MatchKind, PatternID,
};

use super::{
    literals::Literals,
    spec::{Builtin, CustomDetector},
};

/// What found a match: a built-in detector or the index of a custom one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Builtin(Builtin),
    Custom(usize),
    /// One of the session's own injected credentials (never from a pattern).
    Credential,
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

/// The built-in patterns, run anchored at their triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pat {
    PrivateKey,
    Jwt,
    AwsSecret,
    Authorization,
    Bearer,
    PrefixToken,
    /// `password = ...`, `api_key: ...`: anchored at the keyword's last
    /// word (`key`, `token`, `secret`, `password`...).
    Assignment,
    AwsKeyId,
    Email,
    Iban,
}

impl Pat {
    const ALL: [Pat; 10] = [
        Pat::PrivateKey,
        Pat::Jwt,
        Pat::AwsSecret,
        Pat::Authorization,
        Pat::Bearer,
        Pat::PrefixToken,
        Pat::Assignment,
        Pat::AwsKeyId,
        Pat::Email,
        Pat::Iban,
    ];

    fn builtin(self) -> Builtin {
        match self {
            Pat::PrivateKey => Builtin::PrivateKey,
            Pat::Jwt => Builtin::Jwt,
            Pat::AwsSecret | Pat::AwsKeyId => Builtin::AwsKey,
            Pat::Authorization | Pat::Bearer | Pat::PrefixToken | Pat::Assignment => Builtin::Token,
            Pat::Email => Builtin::Email,
            Pat::Iban => Builtin::Iban,
        }
    }

    /// Counted repetitions stay small so the automaton stays small;
    /// validators check the rest. A capture group is the part masked.
    fn source(self) -> &'static str {
        match self {
            // The body may be cut off (truncated text, or a stream that has
            // not caught up yet): mask to where it stops.
            Pat::PrivateKey => {
                r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,.\\]|-[A-Za-z0-9])*(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)?"
            }
            Pat::Jwt => r"eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",
            Pat::AwsSecret => r#"(?i:secret_?access_?key)["']?\s*[:=]+>?\s*["']?([A-Za-z0-9/+]{40})"#,
            Pat::Authorization => {
                r#"(?i:authorization)["']?\s*[:=]\s*["']?(?:(?i:bearer|basic|token|digest|bot)\s+)?([A-Za-z0-9._~+/=\-]{8,})"#
            }
            Pat::Bearer => r"(?i:bearer)\s+([A-Za-z0-9._~+/=\-]{16,})",
            Pat::PrefixToken => concat!(
                r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}|glpat-[A-Za-z0-9_\-]{20,}",
                r"|xox[abposr]-[A-Za-z0-9\-]{10,}|xapp-[A-Za-z0-9\-]{10,}|sk-[A-Za-z0-9_\-]{20,}",
                r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}|AIza[A-Za-z0-9_\-]{35}|npm_[A-Za-z0-9]{36,}",
                r"|hf_[A-Za-z0-9]{30,}|pypi-[A-Za-z0-9_\-]{50,})"
            ),
            Pat::Assignment => {
                r#"(?i:(?:(?:api|secret|private)[_\-]?)?(?:key|secret|token|password|passwd|pwd))["']?\s*[:=]\s*["']?([^\s"'`,;&<>\x00]{8,})"#
            }
            Pat::AwsKeyId => r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
            // Matched by `email_end`; this is what it must agree with.
            Pat::Email => r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}",
            Pat::Iban => r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
        }
    }

    /// The literals that trigger the pattern (case variants spelled out:
    /// the literal automaton is case-sensitive, so it can use SIMD).
    fn triggers(self) -> Vec<String> {
        let cased = |words: &[&str]| -> Vec<String> {
            words.iter().flat_map(|w| [w.to_string(), capitalize(w), w.to_ascii_uppercase()]).collect()
        };
        match self {
            Pat::PrivateKey => vec!["-----BEGIN ".into()],
            Pat::Jwt => vec!["eyJ".into()],
            Pat::AwsSecret => cased(&["secret"]),
            Pat::Authorization => cased(&["authorization"]),
            Pat::Bearer => cased(&["bearer"]),
            Pat::PrefixToken => [
                "ghp_",
                "gho_",
                "ghu_",
                "ghs_",
                "ghr_",
                "github_pat_",
                "glpat-",
                "xoxa-",
                "xoxb-",
                "xoxp-",
                "xoxo-",
                "xoxs-",
                "xoxr-",
                "xapp-",
                "sk-",
                "sk_live_",
                "sk_test_",
                "rk_live_",
                "rk_test_",
                "AIza",
                "npm_",
                "hf_",
                "pypi-",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            Pat::Assignment => cased(&["key", "secret", "token", "password", "passwd", "pwd"]),
            Pat::AwsKeyId => ["AKIA", "ASIA", "ABIA", "ACCA"].iter().map(|s| s.to_string()).collect(),
            // Found by their own scans.
            Pat::Email | Pat::Iban => Vec::new(),
        }
    }
}

fn capitalize(w: &str) -> String {
    let mut c = w.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
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

fn build(sources: &[&str]) -> Result<Regex, DetectError> {
    Regex::builder()
        .syntax(syntax_config())
        .configure(Regex::config().match_kind(MatchKind::LeftmostFirst).hybrid_cache_capacity(8 << 20))
        .build_many(sources)
        .map_err(|e| DetectError::Build(one_line(&e.to_string())))
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

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The characters of an email's local part.
fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".%+-_".contains(&b)
}

/// The longest local part of an e-mail address (RFC 5321): a longer run
/// before an `@` is not one, and a stream need look no further back.
const MAX_LOCAL: usize = 64;
/// The longest label and domain name (RFC 1035): what an e-mail's end is
/// decided on is bounded too, so a stream's window sees all of it.
const MAX_LABEL: usize = 63;
const MAX_DOMAIN: usize = 253;

/// How many bytes before a scan's start a detector may look at to decide
/// a match that starts there (an e-mail's local part, a word boundary, an
/// IBAN's two letters and what is before them, `private_` before `key`),
/// with room for what comes between (the `@` after a local part).
pub(super) const LOOK_BEHIND: usize = 2 * MAX_LOCAL;

/// Whether a stream may be cut before `text[at]` and scanned on from there
/// with [`LOOK_BEHIND`] bytes of what came before: no run that a detector
/// walks back along without bound (an e-mail's address, the digits and
/// single spaces a card number runs on from) goes on across the cut.
pub(super) fn may_cut_before(text: &[u8], at: usize) -> bool {
    let (a, b) = (text[at - 1], text[at]);
    let digit = |i: usize| text.get(i).is_some_and(u8::is_ascii_digit);
    let run = |b: u8| is_local(b) || b == b'@';
    !(run(a) && run(b)
        || a == b' ' && at >= 2 && digit(at - 2) && b.is_ascii_digit()
        || b == b' ' && a.is_ascii_digit() && digit(at + 1))
}

/// A compiled set of detectors.
pub struct Detectors {
    /// The enabled built-in patterns, anchored searches only.
    anchored: Option<Regex>,
    /// Pattern id in `anchored` of each enabled `Pat` (by `Pat::ALL` index).
    pid: [Option<PatternID>; Pat::ALL.len()],
    /// Trigger literals, and the patterns each may start, tried in order.
    literals: Option<Literals>,
    literal_pats: Vec<Vec<Pat>>,
    email: bool,
    card: bool,
    iban: bool,
    custom: Option<Regex>,
    custom_index: Vec<usize>,
    custom_group: Vec<bool>,
    /// The shortest text each scan can find something in, from the
    /// patterns themselves: a shorter value skips that scan (most values
    /// are short, and starting a scan is most of what it costs on them).
    min: MinLen,
    /// Some custom pattern can match a line break.
    custom_spans_lines: bool,
}

/// Shortest match lengths, in bytes.
#[derive(Debug, Clone, Copy)]
struct MinLen {
    /// Of the patterns the trigger literals start.
    literal: usize,
    email: usize,
    /// Of cards and IBANs (the digit-run scan).
    digits: usize,
    custom: usize,
}

/// A card has at least this many digits (see [`cards_in`]).
const CARD_MIN_DIGITS: usize = 13;

/// The length of the shortest text `source` can match (0 if unknown, so
/// nothing is skipped).
fn min_len(source: &str) -> usize {
    syntax::parse_with(source, &syntax_config()).ok().and_then(|h| h.properties().minimum_len()).unwrap_or(0)
}

/// Whether `source` can match text holding a line feed (true when it
/// cannot be read, to be safe).
fn spans_lines(source: &str) -> bool {
    use regex_syntax::hir::{Class, Hir, HirKind};
    fn walk(h: &Hir) -> bool {
        match h.kind() {
            HirKind::Empty | HirKind::Look(_) => false,
            HirKind::Literal(l) => l.0.contains(&b'\n'),
            HirKind::Class(Class::Unicode(c)) => c.ranges().iter().any(|r| r.start() <= '\n' && '\n' <= r.end()),
            HirKind::Class(Class::Bytes(c)) => c.ranges().iter().any(|r| r.start() <= b'\n' && b'\n' <= r.end()),
            HirKind::Repetition(r) => walk(&r.sub),
            HirKind::Capture(c) => walk(&c.sub),
            HirKind::Concat(v) | HirKind::Alternation(v) => v.iter().any(walk),
        }
    }
    syntax::parse_with(source, &syntax_config()).map_or(true, |h| walk(&h))
}

impl std::fmt::Debug for Detectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detectors").field("custom", &self.custom_index.len()).finish_non_exhaustive()
    }
}

/// Per-searcher scratch space (one per session or stream; never shared).
pub struct Scratch {
    anchored: Option<(meta::Cache, Captures)>,
    custom: Option<(meta::Cache, Captures)>,
    cands: Vec<Cand>,
    custom_found: Vec<Found>,
}

/// A place a secret may start.
#[derive(Debug, Clone, Copy)]
struct Cand {
    /// Where the pattern is tried (for a card: the digit run's start).
    at: usize,
    what: CandKind,
}

#[derive(Debug, Clone, Copy)]
enum CandKind {
    Pat(Pat),
    /// A trigger literal (index into `literal_pats`).
    Literal(usize),
    /// An `@` at this offset.
    Email(usize),
    /// A card number ending here.
    Card(usize),
}

fn pat_index(p: Pat) -> usize {
    Pat::ALL.iter().position(|x| *x == p).expect("listed")
}

impl Detectors {
    /// Compiles the given built-ins and custom detectors (with their index
    /// in the policy's list).
    pub fn new(builtins: &[Builtin], custom: &[(usize, &CustomDetector)]) -> Result<Detectors, DetectError> {
        let pats: Vec<Pat> = Pat::ALL.iter().copied().filter(|p| builtins.contains(&p.builtin())).collect();
        let mut pid = [None; Pat::ALL.len()];
        // Emails are matched by `email_end`, the rest by the automaton.
        let regex_pats: Vec<Pat> = pats.iter().copied().filter(|p| *p != Pat::Email).collect();
        for (i, p) in regex_pats.iter().enumerate() {
            pid[pat_index(*p)] = Some(PatternID::must(i));
        }
        let sources: Vec<&str> = regex_pats.iter().map(|p| p.source()).collect();
        let anchored = if sources.is_empty() { None } else { Some(build(&sources)?) };
        let mut literals: Vec<String> = Vec::new();
        let mut literal_pats: Vec<Vec<Pat>> = Vec::new();
        for p in &pats {
            for t in p.triggers() {
                match literals.iter().position(|l| *l == t) {
                    Some(i) => literal_pats[i].push(*p),
                    None => {
                        literals.push(t);
                        literal_pats.push(vec![*p]);
                    }
                }
            }
        }
        let literals = Literals::new(&literals);
        let mut custom_sources = Vec::new();
        let mut custom_index = Vec::new();
        let mut custom_group = Vec::new();
        for (i, d) in custom {
            check_custom(d)?;
            let groups = Regex::builder()
                .syntax(syntax_config())
                .build(&d.pattern)
                .map(|r| r.group_info().group_len(PatternID::ZERO))
                .unwrap_or(1);
            custom_sources.push(d.pattern.as_str());
            custom_index.push(*i);
            custom_group.push(groups > 1);
        }
        let custom_spans_lines = custom_sources.iter().any(|s| spans_lines(s));
        let custom = if custom_sources.is_empty() { None } else { Some(build(&custom_sources)?) };
        let card = builtins.contains(&Builtin::Card);
        let iban = builtins.contains(&Builtin::Iban);
        // usize::MAX where a scan is off.
        let shortest = |sources: &mut dyn Iterator<Item = &str>| sources.map(min_len).min().unwrap_or(usize::MAX);
        let card_min = if card { CARD_MIN_DIGITS } else { usize::MAX };
        let min = MinLen {
            literal: shortest(&mut pats.iter().filter(|p| !p.triggers().is_empty()).map(|p| p.source())),
            email: min_len(Pat::Email.source()),
            digits: shortest(&mut pats.iter().filter(|p| **p == Pat::Iban).map(|p| p.source())).min(card_min),
            custom: shortest(&mut custom_sources.iter().copied()),
        };
        Ok(Detectors {
            anchored,
            pid,
            literals,
            literal_pats,
            email: builtins.contains(&Builtin::Email),
            card,
            iban,
            custom,
            custom_index,
            custom_group,
            min,
            custom_spans_lines,
        })
    }

    /// Whether a custom pattern can match across a line break (the
    /// built-in ones that can are caught by probing, see
    /// `StreamMasker::release_lines`).
    pub fn custom_spans_lines(&self) -> bool {
        self.custom_spans_lines
    }

    pub fn is_empty(&self) -> bool {
        self.anchored.is_none() && self.custom.is_none() && !self.card && !self.email
    }

    pub fn scratch(&self) -> Scratch {
        let caches = |r: &Regex| (r.create_cache(), Captures::all(r.group_info().clone()));
        Scratch {
            anchored: self.anchored.as_ref().map(caches),
            custom: self.custom.as_ref().map(caches),
            cands: Vec::new(),
            custom_found: Vec::new(),
        }
    }

    /// Appends every validated match in `text` to `out`, in order, without
    /// overlaps.
    pub fn find(&self, scratch: &mut Scratch, text: &[u8], out: &mut Vec<Found>) {
        let first = out.len();
        self.find_builtin(scratch, text, out);
        if let (Some(re), Some((cache, caps)), true) =
            (&self.custom, &mut scratch.custom, text.len() >= self.min.custom)
        {
            let found = &mut scratch.custom_found;
            found.clear();
            let mut at = 0;
            while at < text.len() {
                let Some(m) = re.search_with(cache, &Input::new(text).range(at..)) else { break };
                let i = m.pattern().as_usize();
                let (mut a, mut b) = (m.start(), m.end());
                if self.custom_group[i] {
                    let input = Input::new(text).range(a..b).anchored(Anchored::Pattern(m.pattern()));
                    re.search_captures_with(cache, &input, caps);
                    if let Some(g) = caps.get_group(1).filter(|g| g.start < g.end) {
                        (a, b) = (g.start, g.end);
                    }
                }
                found.push(Found { start: a, end: b, kind: Kind::Custom(self.custom_index[i]), context: m.start() });
                at = m.end().max(m.start() + 1);
            }
            if !found.is_empty() {
                // Merge: the earlier start wins an overlap, a custom
                // detector a tie.
                let builtin: Vec<Found> = out.drain(first..).collect();
                let mut all: Vec<Found> = found.drain(..).chain(builtin).collect();
                all.sort_by_key(|f| f.context);
                let mut end = 0;
                for f in all {
                    if f.context >= end || out.len() == first {
                        end = f.end;
                        out.push(f);
                    }
                }
            }
        }
    }

    fn find_builtin(&self, scratch: &mut Scratch, text: &[u8], out: &mut Vec<Found>) {
        let cands = &mut scratch.cands;
        cands.clear();
        if let Some(lits) = self.literals.as_ref().filter(|_| text.len() >= self.min.literal) {
            for m in lits.find_iter(text) {
                let mut at = m.start();
                if text[m.start()..m.end()].eq_ignore_ascii_case(b"key") {
                    // Only `api_key`, `secret-key`, `privateKey` and the like.
                    match key_prefix(text, m.start()) {
                        Some(p) => at = p,
                        None => continue,
                    }
                }
                cands.push(Cand { at, what: CandKind::Literal(m.pattern().as_usize()) });
            }
        }
        if self.email && text.len() >= self.min.email {
            for p in memchr::memchr_iter(b'@', text) {
                let mut a = p;
                while a > 0 && is_local(text[a - 1]) && p - a <= MAX_LOCAL {
                    a -= 1;
                }
                if a < p && p - a <= MAX_LOCAL {
                    cands.push(Cand { at: a, what: CandKind::Email(p) });
                }
            }
        }
        if (self.card || self.iban) && text.len() >= self.min.digits {
            digit_runs(text, |start, end, digits| {
                if self.iban
                    && start >= 2
                    && text[start - 2].is_ascii_uppercase()
                    && text[start - 1].is_ascii_uppercase()
                    && (start == 2 || !is_word(text[start - 3]))
                {
                    cands.push(Cand { at: start - 2, what: CandKind::Pat(Pat::Iban) });
                }
                if self.card && digits >= 13 {
                    cards_in_run(text, start, end, |a, b| cands.push(Cand { at: a, what: CandKind::Card(b) }));
                }
            });
        }
        if cands.is_empty() {
            return;
        }
        cands.sort_by_key(|c| c.at);
        let mut last_end = 0;
        for c in cands.iter() {
            let found = match c.what {
                CandKind::Email(at_sign) => {
                    if at_sign <= last_end {
                        continue;
                    }
                    let at = c.at.max(last_end);
                    let kind = Kind::Builtin(Builtin::Email);
                    email_end(text, at).map(|e| (Found { start: at, end: e, kind, context: at }, e))
                }
                _ if c.at < last_end => continue,
                CandKind::Card(end) => {
                    Some((Found { start: c.at, end, kind: Kind::Builtin(Builtin::Card), context: c.at }, end))
                }
                CandKind::Pat(p) => self.try_pat(scratch.anchored.as_mut(), text, c.at, p),
                CandKind::Literal(i) => {
                    self.literal_pats[i].iter().find_map(|&p| self.try_pat(scratch.anchored.as_mut(), text, c.at, p))
                }
            };
            if let Some((f, match_end)) = found {
                out.push(f);
                last_end = match_end;
            }
        }
    }

    /// Runs one pattern anchored at `at`; returns what to mask and where
    /// the whole match ends.
    fn try_pat(
        &self,
        scratch: Option<&mut (meta::Cache, Captures)>,
        text: &[u8],
        at: usize,
        p: Pat,
    ) -> Option<(Found, usize)> {
        let re = self.anchored.as_ref()?;
        let (cache, caps) = scratch?;
        let pid = self.pid[pat_index(p)]?;
        let input = Input::new(text).range(at..).anchored(Anchored::Pattern(pid));
        let kind = Kind::Builtin(p.builtin());
        let (s, e) = match p {
            Pat::AwsSecret | Pat::Authorization | Pat::Bearer | Pat::Assignment => {
                // A plain search first (DFA): most triggers are ordinary
                // words, and captures cost more.
                re.search_with(cache, &input)?;
                re.search_captures_with(cache, &input, caps);
                let whole = caps.get_match()?;
                let g = caps.get_group(1).filter(|g| g.start < g.end);
                let (a, b) = g.map_or((whole.start(), whole.end()), |g| (g.start, g.end));
                if p == Pat::AwsSecret
                    && text.get(b).is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'/' || c == b'+')
                {
                    return None;
                }
                return Some((Found { start: a, end: b, kind, context: at }, whole.end()));
            }
            _ => {
                let m = re.search_with(cache, &input)?;
                (m.start(), m.end())
            }
        };
        let (a, b) = match p {
            Pat::Iban => iban_in(&text[s..e]).map(|(a, b)| (s + a, s + b))?,
            Pat::Jwt if !jwt_ok(&text[s..e]) => return None,
            _ => (s, e),
        };
        Some((Found { start: a, end: b, kind, context: s }, e))
    }
}

/// Where the email that [`Pat::Email`]'s pattern matches anchored at `at`
/// ends. Worked out here rather than by the automaton: every row holds an
/// email or two, and starting the lazy DFA cost more than the match.
///
/// The local part is the run of local characters, and must reach an `@`.
/// The domain is labels (runs of letters, digits and `-`, at most 63)
/// joined by single dots, at most 253 in all (RFC 1035); the pattern's greedy repetition makes the match end after the
/// leading letters of the last label after the first that starts with two
/// letters (`a@b.cd9` is `a@b.cd`).
fn email_end(text: &[u8], at: usize) -> Option<usize> {
    let local = text[at..].iter().position(|&b| !is_local(b)).map_or(text.len(), |k| at + k);
    if local == at || text.get(local) != Some(&b'@') {
        return None;
    }
    let is_label = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-';
    let mut end = None;
    let domain = local + 1;
    let mut i = domain;
    for n in 0.. {
        let label = text[i..].iter().take_while(|b| is_label(b)).count();
        if label == 0 || label > MAX_LABEL || i + label - domain > MAX_DOMAIN {
            break;
        }
        let letters = text[i..i + label].iter().take_while(|b| b.is_ascii_alphabetic()).count();
        if n > 0 && letters >= 2 {
            end = Some(i + letters);
        }
        i += label;
        if text.get(i) != Some(&b'.') {
            break;
        }
        i += 1;
    }
    end
}

/// For a `key` at `at`: the start of `api_key`, `secret-key`, `privateKey`
/// and the like, if that is what it is.
fn key_prefix(text: &[u8], at: usize) -> Option<usize> {
    let before = &text[..at];
    let before = before.strip_suffix(b"_").or_else(|| before.strip_suffix(b"-")).unwrap_or(before);
    for p in [&b"api"[..], b"secret", b"private"] {
        if before.len() >= p.len() && before[before.len() - p.len()..].eq_ignore_ascii_case(p) {
            return Some(before.len() - p.len());
        }
    }
    None
}

/// Calls `f(start, end, digits)` for each run of digits joined by single
/// spaces or dashes.
fn digit_runs(text: &[u8], mut f: impl FnMut(usize, usize, usize)) {
    let n = text.len();
    let mut i = 0;
    while let Some(start) = next_digit(text, i) {
        i = start;
        let mut digits = 0;
        loop {
            let end = digits_end(text, i);
            digits += end - i;
            i = end;
            if i + 1 < n && (text[i] == b' ' || text[i] == b'-') && text[i + 1].is_ascii_digit() {
                i += 1;
            } else {
                break;
            }
        }
        f(start, i, digits);
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = ONES * 0x80;

/// The high bit of each byte of `w` that is an ASCII digit, exactly.
fn digit_bits(w: u64) -> u64 {
    // Digits become 0..=9. A byte is below 10 when its high bit is clear
    // and its low seven bits are below 10; setting the high bit before
    // subtracting keeps bytes from borrowing from each other.
    let t = w ^ (ONES * 0x30);
    !((t | HIGH) - ONES * 10) & !t & HIGH
}

fn word_at(text: &[u8], at: usize) -> Option<u64> {
    text.get(at..at + 8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
}

/// The offset of the first ASCII digit at or after `from`, eight bytes at a
/// time (most text has few digits).
fn next_digit(text: &[u8], mut from: usize) -> Option<usize> {
    while let Some(w) = word_at(text, from) {
        let d = digit_bits(w);
        if d != 0 {
            return Some(from + d.trailing_zeros() as usize / 8);
        }
        from += 8;
    }
    text[from..].iter().position(u8::is_ascii_digit).map(|k| from + k)
}

/// The end of the run of ASCII digits at `from`, eight bytes at a time
/// (rows are full of numbers, ids, dates and phone numbers).
fn digits_end(text: &[u8], mut from: usize) -> usize {
    while let Some(w) = word_at(text, from) {
        let other = !digit_bits(w) & HIGH;
        if other != 0 {
            return from + other.trailing_zeros() as usize / 8;
        }
        from += 8;
    }
    text[from..].iter().position(|b| !b.is_ascii_digit()).map_or(text.len(), |k| from + k)
}

/// Calls `f(start, end)` for every card in the digit run `start..end`, in
/// order, with the word boundaries the pattern
/// `\b[0-9](?:[ -]?[0-9]){12,}\b` would want.
fn cards_in_run(text: &[u8], mut start: usize, mut end: usize, mut f: impl FnMut(usize, usize)) {
    let sep = |b: &u8| *b == b' ' || *b == b'-';
    if start > 0 && is_word(text[start - 1]) {
        let Some(p) = text[start..end].iter().position(sep) else { return };
        start += p + 1;
    }
    if end < text.len() && is_word(text[end]) {
        let Some(p) = text[start..end].iter().rposition(sep) else { return };
        end = start + p;
    }
    cards_in(&text[start..end], |a, b| f(start + a, start + b));
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

/// Finds the card numbers in a run of digits with optional single spaces
/// or dashes: 13 to 19 digits, Luhn-valid, an issuer's first digit (2-6),
/// and either no separators or groups printed as cards are (4-4-4-4[-3],
/// 4-6-5, 4-6-4). Calls `f` with each span within the run, in order.
///
/// Linear in the run: a card spans at most 19 digits, so no more groups
/// than that are tried from each one.
fn cards_in(run: &[u8], mut f: impl FnMut(usize, usize)) {
    // Groups: (start, end) of each digit group.
    let mut groups: Vec<(usize, usize)> = Vec::with_capacity(8);
    let mut start = 0;
    let mut sep: Option<u8> = None;
    for (i, &c) in run.iter().enumerate() {
        if !c.is_ascii_digit() {
            groups.push((start, i));
            start = i + 1;
            if sep.is_some_and(|s| s != c) {
                // Mixed separators are not a card layout; split there.
                cards_in_groups(run, &groups, &mut f);
                groups.clear();
                sep = None;
            } else {
                sep = Some(c);
            }
        }
    }
    groups.push((start, run.len()));
    cards_in_groups(run, &groups, &mut f);
}

fn cards_in_groups(run: &[u8], groups: &[(usize, usize)], f: &mut impl FnMut(usize, usize)) {
    let len = |g: usize| groups[g].1 - groups[g].0;
    let ok = |a: usize, b: usize| -> bool {
        let digits: Vec<u8> = run[groups[a].0..groups[b].1].iter().copied().filter(u8::is_ascii_digit).collect();
        (13..=19).contains(&digits.len()) && (b'2'..=b'6').contains(&digits[0]) && luhn(&digits)
    };
    let mut a = 0;
    while a < groups.len() {
        let mut digits = 0;
        let mut card = None;
        for b in a..groups.len() {
            digits += len(b);
            if digits > 19 {
                break;
            }
            let layout = match b - a {
                // No separators (a card among other numbers, or alone).
                0 => true,
                2 if len(a) == 4 && len(a + 1) == 6 && (4..=5).contains(&len(b)) => true,
                _ => (a..b).all(|g| len(g) == 4) && (1..=4).contains(&len(b)),
            };
            if layout && ok(a, b) {
                card = Some(b);
                break;
            }
        }
        match card {
            Some(b) => {
                f(groups[a].0, groups[b].1);
                a = b + 1;
            }
            None => a += 1,
        }
    }
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
        // A local part is at most 64 characters.
        let local = "a".repeat(64);
        is(&format!("to {local}@example.com"), &format!("{local}@example.com"), Builtin::Email);
        assert_eq!(one(&format!("to b{local}@example.com")), None);
        // A label is at most 63 characters, a domain 253.
        let label = "b".repeat(63);
        is(&format!("x@{label}.com"), &format!("x@{label}.com"), Builtin::Email);
        assert_eq!(one(&format!("x@{label}b.com")), None);
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
        is("qty 2 4111111111111111 ok", "4111111111111111", Builtin::Card);
        // Every card in a run.
        let d = Detectors::new(&[Builtin::Card], &[]).unwrap();
        let two = found(&d, "4111 1111 1111 1111 5555 5555 5555 4444 9");
        assert_eq!(
            two.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
            ["4111 1111 1111 1111", "5555 5555 5555 4444"]
        );
        is("12-5555555555554444-7", "5555555555554444", Builtin::Card);
    }

    #[test]
    fn long_digit_runs_are_scanned_to_their_end() {
        // A response of numbers joined by single spaces, or by separators
        // that keep changing: each card in it, and no more work than the
        // run is long (a cubic search or a recursion per separator would
        // stall or overflow here).
        let d = Detectors::new(&[Builtin::Card], &[]).unwrap();
        for filler in ["1 ", "1-1 ", "12-34 "] {
            let text =
                format!("{}4111 1111 1111 1111 {}5555555555554444", filler.repeat(20_000), filler.repeat(20_000));
            let cards: Vec<String> = found(&d, &text).into_iter().map(|(s, _)| s).collect();
            assert_eq!(cards, ["4111 1111 1111 1111", "5555555555554444"], "with {filler:?}");
        }
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
        is(cut, cut, Builtin::PrivateKey);
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
    fn patterns_that_can_match_a_line_break_are_told_apart() {
        assert!(!spans_lines(r"\bEMP-[0-9]{6}\b"));
        assert!(!spans_lines(r"tok_[a-z ]+"));
        assert!(spans_lines(r"key:\s+\w+"));
        assert!(spans_lines(r"(?s)BEGIN.*END"));
        assert!(spans_lines(r"secret=[^;]+"));
        assert!(spans_lines(r"a\nb"));
        assert!(!spans_lines(r"(?-s)a.b"));
    }

    #[test]
    fn custom_patterns_are_checked() {
        let bad = CustomDetector { name: "x".into(), pattern: "(unclosed".into() };
        assert!(matches!(check_custom(&bad), Err(DetectError::Pattern { .. })));
        let empty = CustomDetector { name: "y".into(), pattern: "a*".into() };
        assert!(matches!(check_custom(&empty), Err(DetectError::Empty { .. })));
    }

    #[test]
    fn next_digit_finds_every_digit_at_any_offset() {
        let text: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        for from in 0..text.len() {
            assert_eq!(next_digit(&text, from), text[from..].iter().position(u8::is_ascii_digit).map(|k| from + k));
        }
        assert_eq!(next_digit(b"abcdefghijklmnop9", 0), Some(16));
        assert_eq!(next_digit(b"abcdefghijklmnopq", 0), None);
    }

    #[test]
    fn digit_bits_are_exact_for_every_byte_in_every_lane() {
        for b in 0..=255u8 {
            for lane in 0..8 {
                // The byte among others that are digits, and among others
                // that are not (no borrow may leak between bytes).
                for fill in [b'5', b'/', b':', 0xb0, 0] {
                    let mut bytes = [fill; 8];
                    bytes[lane] = b;
                    let want =
                        bytes.iter().enumerate().fold(
                            0u64,
                            |m, (i, c)| {
                                if c.is_ascii_digit() {
                                    m | 0x80 << (8 * i)
                                } else {
                                    m
                                }
                            },
                        );
                    assert_eq!(digit_bits(u64::from_le_bytes(bytes)), want, "{b:#x} in lane {lane} among {fill:#x}");
                }
            }
        }
    }

    #[test]
    fn digits_end_at_any_offset_and_length() {
        for len in 0..40 {
            for from in 0..20 {
                let mut text = vec![b'x'; from];
                text.extend(std::iter::repeat_n(b'7', len));
                text.extend_from_slice(b"-9 x");
                let want = from + len;
                assert_eq!(digits_end(&text, from), want, "{len} digits at {from}");
                text.truncate(from + len);
                assert_eq!(digits_end(&text, from), want, "{len} digits at {from}, at the end");
            }
        }
    }

    #[test]
    fn texts_as_short_as_a_match_are_still_scanned() {
        let d = all();
        // Each scan's gate sits at its shortest possible match...
        assert_eq!((d.min.literal, d.min.email, d.min.digits), (12, 6, 12));
        is("pwd=12345678", "12345678", Builtin::Token);
        is("a@b.cd", "a@b.cd", Builtin::Email);
        is("4222222222222", "4222222222222", Builtin::Card);
        is("NO9386011117947", "NO9386011117947", Builtin::Iban);
        // ...of the detectors that are on.
        let aws = Detectors::new(&[Builtin::AwsKey], &[]).unwrap();
        assert_eq!(aws.min.literal, 20);
        assert_eq!(
            found(&aws, "AKIAIOSFODNN7EXAMPLE"),
            [("AKIAIOSFODNN7EXAMPLE".into(), Kind::Builtin(Builtin::AwsKey))]
        );
        let card = Detectors::new(&[Builtin::Card, Builtin::Email], &[]).unwrap();
        assert_eq!((card.min.literal, card.min.digits), (usize::MAX, CARD_MIN_DIGITS));
        assert_eq!(found(&card, "4222222222222"), [("4222222222222".into(), Kind::Builtin(Builtin::Card))]);
        let emp = CustomDetector { name: "emp".into(), pattern: r"\bEMP-[0-9]{6}\b".into() };
        let custom = Detectors::new(&[], &[(0, &emp)]).unwrap();
        assert_eq!(custom.min.custom, 10);
        assert_eq!(found(&custom, "EMP-123456"), [("EMP-123456".into(), Kind::Custom(0))]);
        // A pattern with an empty match somewhere (not in empty text, which
        // policy validation refuses) skips nothing.
        let any = CustomDetector { name: "any".into(), pattern: r"x|\b".into() };
        assert_eq!(Detectors::new(&[], &[(0, &any)]).unwrap().min.custom, 0);
    }

    #[test]
    fn email_end_matches_the_pattern_anchored_anywhere() {
        let re = build(&[Pat::Email.source()]).unwrap();
        let mut cache = re.create_cache();
        let mut check = |text: &[u8]| {
            for at in 0..=text.len() {
                let input = Input::new(text).range(at..).anchored(Anchored::Yes);
                let want = re.search_with(&mut cache, &input).map(|m| m.end());
                assert_eq!(email_end(text, at), want, "{:?} at {at}", String::from_utf8_lossy(text));
            }
        };
        for text in [
            &b"a@b.cd"[..],
            b"a@b.c",
            b"a@b.cd9",
            b"a@b.c9.de",
            b"a@b.de.c9",
            b"a@b..cd",
            b"a@.b.cd",
            b"a@b.cd.",
            b"a.b+c%d_e-f@x-y.z.co.uk!",
            b"@b.cd",
            b"a@@b.cd",
            b"a b@c.de",
            b"a@b.c-d.e",
            b"x@1.23.ab4.c",
            b"\xffa@b.cd\xc3",
        ] {
            check(text);
        }
        // Every string of up to 6 characters over an alphabet that covers
        // each class the pattern tells apart.
        let alphabet = b"aZ9.-@_ \xe9";
        let mut text = Vec::new();
        for len in 0..=6u32 {
            for mut n in 0..alphabet.len().pow(len) {
                text.clear();
                for _ in 0..len {
                    text.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                check(&text);
            }
        }
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
