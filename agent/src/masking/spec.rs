//! The mask syntax of a policy: the entries of a rule's `mask` list and the
//! top-level `[masking]` section. Pure parsing; `policy::load` locates the
//! errors and `masking::Plan` compiles what is parsed here.
//!
//! ```text
//! entry    = kind ":" subject [ "=" mode ]
//! kind     = "column" | "detector" | "header" | "json"
//! column   = [ [ schema "." ] table "." ] column     (each part a name, "quoted name" or *)
//! detector = email | card | iban | jwt | aws-key | private-key | token | <custom name> | *
//! header   = an HTTP header name (case-insensitive)
//! json     = a JSON member name, at any depth (case-sensitive)
//! mode     = redact [ ":" text ] | partial ":" N | hash | null     (default: redact)
//! ```
use std::fmt;

use serde::Serialize;

use crate::policy::SecretRef;

/// How a masked value is shown.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fixed text: the given one, else `****` for a whole value and
    /// `<kind>` for a detector's match inside text.
    Redact(Option<String>),
    /// Keep the last N characters (at most half the value); other letters
    /// and digits become `*`, punctuation and spaces stay.
    Partial(usize),
    /// Keyed HMAC-SHA256 of the value: equal values stay equal.
    Hash,
    /// SQL NULL / JSON null; a detector match in free text is removed.
    Null,
}

impl Mode {
    /// How much a mode reveals: the smaller, the stricter.
    pub fn leak_rank(&self) -> u8 {
        match self {
            Mode::Null => 0,
            Mode::Redact(_) => 1,
            Mode::Hash => 2,
            Mode::Partial(_) => 3,
        }
    }

    /// The stricter of two modes.
    pub fn stricter(self, other: Mode) -> Mode {
        if other.leak_rank() < self.leak_rank() {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Redact(None) => f.write_str("redact"),
            Mode::Redact(Some(t)) => write!(f, "redact:{t}"),
            Mode::Partial(n) => write!(f, "partial:{n}"),
            Mode::Hash => f.write_str("hash"),
            Mode::Null => f.write_str("null"),
        }
    }
}

/// The largest N of `partial:N`.
pub const MAX_PARTIAL: usize = 64;
/// The longest `redact:TEXT`.
pub const MAX_REDACT_TEXT: usize = 64;

/// One part of a column reference: a name compared exactly with the
/// catalog's (unquoted SQL names are stored lower-case), or any name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NamePattern {
    Any,
    Exact(String),
}

impl NamePattern {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Any => true,
            NamePattern::Exact(n) => n == name,
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Any => f.write_str("*"),
            NamePattern::Exact(n) if is_plain_name(n) => f.write_str(n),
            NamePattern::Exact(n) => write!(f, "\"{}\"", n.replace('"', "\"\"")),
        }
    }
}

fn is_plain_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && !n.starts_with(|c: char| c.is_ascii_digit() || c == '$')
}

/// The built-in value detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Builtin {
    Email,
    Card,
    Iban,
    Jwt,
    AwsKey,
    PrivateKey,
    Token,
}

impl Builtin {
    pub const ALL: [Builtin; 7] = [
        Builtin::Email,
        Builtin::Card,
        Builtin::Iban,
        Builtin::Jwt,
        Builtin::AwsKey,
        Builtin::PrivateKey,
        Builtin::Token,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Builtin::Email => "email",
            Builtin::Card => "card",
            Builtin::Iban => "iban",
            Builtin::Jwt => "jwt",
            Builtin::AwsKey => "aws-key",
            Builtin::PrivateKey => "private-key",
            Builtin::Token => "token",
        }
    }

    pub fn parse(s: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == s)
    }
}

/// Which detector a `detector:` entry turns on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorRef {
    Builtin(Builtin),
    /// Defined under `[[masking.detectors]]`.
    Custom(String),
    /// Every built-in and custom detector.
    All,
}

impl fmt::Display for DetectorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DetectorRef::Builtin(b) => f.write_str(b.name()),
            DetectorRef::Custom(n) => f.write_str(n),
            DetectorRef::All => f.write_str("*"),
        }
    }
}

/// One entry of a rule's `mask` list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum MaskRule {
    /// A result column, by its source table and column (PostgreSQL).
    Column { schema: NamePattern, table: NamePattern, column: NamePattern, mode: Mode },
    /// A value detector run over text.
    Detector { detector: DetectorRef, mode: Mode },
    /// An HTTP header's value (name lower-cased).
    Header { name: String, mode: Mode },
    /// A JSON member's value, by member name, at any depth.
    Json { name: String, mode: Mode },
}

impl MaskRule {
    pub fn mode(&self) -> &Mode {
        match self {
            MaskRule::Column { mode, .. }
            | MaskRule::Detector { mode, .. }
            | MaskRule::Header { mode, .. }
            | MaskRule::Json { mode, .. } => mode,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            MaskRule::Column { .. } => "column",
            MaskRule::Detector { .. } => "detector",
            MaskRule::Header { .. } => "header",
            MaskRule::Json { .. } => "json",
        }
    }
}

impl fmt::Display for MaskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskRule::Column { schema, table, column, .. } => write!(f, "column:{schema}.{table}.{column}")?,
            MaskRule::Detector { detector, .. } => write!(f, "detector:{detector}")?,
            MaskRule::Header { name, .. } => write!(f, "header:{name}")?,
            MaskRule::Json { name, .. } => write!(f, "json:{name}")?,
        }
        write!(f, "={}", self.mode())
    }
}

/// A syntax error in a mask entry, at a byte offset of the entry's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub offset: usize,
    pub message: String,
}

fn err<T>(offset: usize, message: impl Into<String>) -> Result<T, SyntaxError> {
    Err(SyntaxError { offset, message: message.into() })
}

/// Parses one `mask` entry. Detector names are checked against the
/// built-ins and `custom` (the names of `[[masking.detectors]]`).
pub fn parse_rule(text: &str, custom: &[&str]) -> Result<MaskRule, SyntaxError> {
    let Some((kind, rest)) = text.split_once(':') else {
        return err(0, format!("`{text}` needs a kind: column:, detector:, header: or json:"));
    };
    let at = kind.len() + 1;
    // The subject ends at the first `=` outside double quotes.
    let eq = find_unquoted(rest, '=');
    let (subject, mode) = match eq {
        Some(i) => (&rest[..i], Some((&rest[i + 1..], at + i + 1))),
        None => (rest, None),
    };
    let mode = match mode {
        None => Mode::Redact(None),
        Some((m, off)) => parse_mode(m).map_err(|e| SyntaxError { offset: off + e.offset, message: e.message })?,
    };
    match kind {
        "column" => {
            let parts = split_names(subject).map_err(|e| SyntaxError { offset: at + e.offset, message: e.message })?;
            let (schema, table, column) = match parts.len() {
                1 => (NamePattern::Any, NamePattern::Any, parts[0].clone()),
                2 => (NamePattern::Any, parts[0].clone(), parts[1].clone()),
                3 => (parts[0].clone(), parts[1].clone(), parts[2].clone()),
                _ => return err(at, "a column is `schema.table.column`, `table.column` or `column`"),
            };
            if column == NamePattern::Any && table == NamePattern::Any && schema == NamePattern::Any {
                return err(at, "`*.*.*` would mask every column; name at least one part");
            }
            Ok(MaskRule::Column { schema, table, column, mode })
        }
        "detector" => {
            let detector = if subject == "*" {
                DetectorRef::All
            } else if let Some(b) = Builtin::parse(subject) {
                DetectorRef::Builtin(b)
            } else if custom.contains(&subject) {
                DetectorRef::Custom(subject.to_string())
            } else {
                let mut known: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
                known.extend(custom);
                return err(
                    at,
                    format!(
                        "unknown detector `{subject}` (built-in or defined in [[masking.detectors]]: {}, or `*`)",
                        known.join(", ")
                    ),
                );
            };
            Ok(MaskRule::Detector { detector, mode })
        }
        "header" => {
            if subject.is_empty() || !subject.bytes().all(is_header_char) {
                return err(at, format!("`{subject}` is not an HTTP header name"));
            }
            Ok(MaskRule::Header { name: subject.to_ascii_lowercase(), mode })
        }
        "json" => {
            if subject.is_empty() {
                return err(at, "json: needs a member name");
            }
            Ok(MaskRule::Json { name: subject.to_string(), mode })
        }
        other => err(0, format!("unknown mask kind `{other}` (expected column, detector, header or json)")),
    }
}

fn is_header_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn find_unquoted(s: &str, needle: char) -> Option<usize> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == needle && !quoted {
            return Some(i);
        }
    }
    None
}

/// `a.b.c` with optional `"quoted"` parts (`""` is a quote inside).
fn split_names(s: &str) -> Result<Vec<NamePattern>, SyntaxError> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        if bytes.get(i) == Some(&b'"') {
            let mut name = String::new();
            i += 1;
            loop {
                match s[i..].find('"') {
                    None => return err(start, "unterminated quoted name"),
                    Some(j) => {
                        name.push_str(&s[i..i + j]);
                        i += j + 1;
                        if bytes.get(i) == Some(&b'"') {
                            name.push('"');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            if name.is_empty() {
                return err(start, "empty quoted name");
            }
            out.push(NamePattern::Exact(name));
        } else {
            let end = s[i..].find('.').map_or(s.len(), |j| i + j);
            let part = &s[i..end];
            if part == "*" {
                out.push(NamePattern::Any);
            } else if part.is_empty() {
                return err(start, "empty name (write `*` for any)");
            } else if !part.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                return err(start, format!("`{part}` is not a plain name; quote it as \"{part}\""));
            } else if part.chars().any(|c| c.is_uppercase()) {
                // Unquoted SQL names fold to lower case; a mixed-case name
                // here would silently never match.
                return err(
                    start,
                    format!(
                        "`{part}` has capitals: write it lower-case, or quote it (\"{part}\") for a quoted SQL name"
                    ),
                );
            } else {
                out.push(NamePattern::Exact(part.to_string()));
            }
            i = end;
        }
        match bytes.get(i) {
            None => return Ok(out),
            Some(b'.') => i += 1,
            Some(_) => return err(i, "expected `.` between names"),
        }
    }
}

/// Parses a mode: `redact`, `redact:TEXT`, `partial:N`, `hash`, `null`.
pub fn parse_mode(s: &str) -> Result<Mode, SyntaxError> {
    let (name, arg) = match s.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (s, None),
    };
    let arg_at = name.len() + 1;
    match (name, arg) {
        ("redact", None) => Ok(Mode::Redact(None)),
        ("redact", Some(t)) => {
            if t.is_empty() || t.len() > MAX_REDACT_TEXT || t.chars().any(char::is_control) {
                return err(arg_at, format!("redact text must be 1 to {MAX_REDACT_TEXT} printable characters"));
            }
            Ok(Mode::Redact(Some(t.to_string())))
        }
        ("partial", Some(n)) => match n.parse::<usize>() {
            Ok(n) if (1..=MAX_PARTIAL).contains(&n) => Ok(Mode::Partial(n)),
            _ => err(arg_at, format!("partial takes how many characters to keep, 1 to {MAX_PARTIAL}: `partial:4`")),
        },
        ("partial", None) => err(0, "partial needs a count: `partial:4`"),
        ("hash", None) => Ok(Mode::Hash),
        ("null", None) => Ok(Mode::Null),
        ("hash" | "null", Some(_)) => err(name.len(), format!("`{name}` takes no argument")),
        _ => err(0, format!("unknown mode `{s}` (expected redact, redact:TEXT, partial:N, hash or null)")),
    }
}

/// A detector defined in the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomDetector {
    pub name: String,
    /// A regular expression (ASCII classes: `\d`, `\w`, `\s`, `\b` are
    /// ASCII). When it has a capture group, only the first group is masked.
    pub pattern: String,
}

/// The top-level `[masking]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MaskSettings {
    /// The key of `hash` mode. Required when a rule uses `hash`.
    #[serde(skip)]
    pub hash_key: Option<SecretRef>,
    pub detectors: Vec<CustomDetector>,
    /// Largest JSON response body masked as one document (None: the
    /// default, [`DEFAULT_MAX_JSON_BODY`]); a longer one is masked as text.
    pub max_json_body: Option<u64>,
}

/// The default of `[masking] max_json_body`.
pub const DEFAULT_MAX_JSON_BODY: u64 = 4 << 20;

impl MaskSettings {
    pub fn custom_names(&self) -> Vec<&str> {
        self.detectors.iter().map(|d| d.name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> MaskRule {
        parse_rule(s, &["employee-id"]).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    fn e(s: &str) -> SyntaxError {
        parse_rule(s, &["employee-id"]).expect_err(s)
    }

    #[test]
    fn columns_take_one_to_three_parts() {
        let ex = |s: &str| NamePattern::Exact(s.into());
        assert_eq!(
            p("column:public.users.email"),
            MaskRule::Column {
                schema: ex("public"),
                table: ex("users"),
                column: ex("email"),
                mode: Mode::Redact(None)
            }
        );
        assert_eq!(
            p("column:users.ssn=null"),
            MaskRule::Column { schema: NamePattern::Any, table: ex("users"), column: ex("ssn"), mode: Mode::Null }
        );
        assert_eq!(
            p("column:password=hash"),
            MaskRule::Column {
                schema: NamePattern::Any,
                table: NamePattern::Any,
                column: ex("password"),
                mode: Mode::Hash
            }
        );
        assert_eq!(
            p(r#"column:*."Odd.Table"."a""b"=partial:4"#),
            MaskRule::Column {
                schema: NamePattern::Any,
                table: ex("Odd.Table"),
                column: ex("a\"b"),
                mode: Mode::Partial(4)
            }
        );
        assert_eq!(p(r#"column:"x=y".c"#).to_string(), r#"column:*."x=y".c=redact"#);
    }

    #[test]
    fn bad_columns_are_refused_with_offsets() {
        assert!(e("column:a.b.c.d").message.contains("schema.table.column"));
        assert!(e("column:*.*.*").message.contains("every column"));
        let x = e("column:public.Users.email");
        assert_eq!(x.offset, 14);
        assert!(x.message.contains("capitals"), "{x:?}");
        assert!(e("column:a..b").message.contains("empty name"));
        assert!(e("column:\"abc").message.contains("unterminated"));
        assert!(e("column:a-b").message.contains("not a plain name"));
    }

    #[test]
    fn detectors_and_modes() {
        assert_eq!(
            p("detector:card=hash"),
            MaskRule::Detector { detector: DetectorRef::Builtin(Builtin::Card), mode: Mode::Hash }
        );
        assert_eq!(
            p("detector:employee-id=redact:[emp]"),
            MaskRule::Detector {
                detector: DetectorRef::Custom("employee-id".into()),
                mode: Mode::Redact(Some("[emp]".into()))
            }
        );
        assert_eq!(p("detector:*").mode(), &Mode::Redact(None));
        assert_eq!(p("detector:email=partial:4").mode(), &Mode::Partial(4));
        let x = e("detector:phone");
        assert_eq!(x.offset, 9);
        assert!(x.message.contains("employee-id") && x.message.contains("aws-key"), "{x:?}");
        let x = e("detector:email=partial:0");
        assert_eq!(x.offset, 23);
        assert!(e("detector:email=partial").message.contains("needs a count"));
        assert!(e("detector:email=hash:1").message.contains("no argument"));
        assert!(e("detector:email=shout").message.contains("unknown mode"));
        assert!(e("detector:email=redact:").message.contains("redact text"));
    }

    #[test]
    fn headers_json_and_kinds() {
        assert_eq!(p("header:Set-Cookie"), MaskRule::Header { name: "set-cookie".into(), mode: Mode::Redact(None) });
        assert_eq!(p("json:password=null"), MaskRule::Json { name: "password".into(), mode: Mode::Null });
        assert!(e("header:bad header").message.contains("not an HTTP header"));
        assert!(e("json:").message.contains("member name"));
        assert!(e("email").message.contains("needs a kind"));
        assert!(e("row:x").message.contains("unknown mask kind"));
    }

    #[test]
    fn stricter_modes_reveal_less() {
        assert_eq!(Mode::Partial(4).stricter(Mode::Hash), Mode::Hash);
        assert_eq!(Mode::Null.stricter(Mode::Redact(None)), Mode::Null);
        assert_eq!(Mode::Redact(None).stricter(Mode::Partial(2)), Mode::Redact(None));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "column:public.users.email=redact",
            "column:*.users.email=partial:4",
            "detector:card=hash",
            "detector:employee-id=redact:XX",
            "header:authorization=null",
            "json:token=redact",
        ] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(p(&p(s).to_string()), p(s));
        }
    }
}
