//! Masking: what a role may see of the data flowing back from a target.
//!
//! A rule's `mask` entries (syntax in [`spec`]) compile once per policy load
//! into a [`Plan`]: the value detectors the rule turns on (cheap triggers,
//! then patterns anchored at them, see [`detect`]), plus column, header and
//! JSON member rules. A session
//! starts a [`SessionMasker`] from the plan with the `hash` key and the
//! target's injected credentials (always masked, whatever the rule says),
//! and masks with it:
//! - PostgreSQL rows: [`column`] resolves column rules to (table oid,
//!   attribute number) once per session and rewrites DataRow bodies;
//! - text values and byte streams: [`SessionMasker::mask_text`] and
//!   [`stream::StreamMasker`] (a bounded hold-back window catches a secret
//!   split across chunks);
//! - JSON bodies: [`SessionMasker::mask_json`] masks string leaves with their
//!   escapes decoded, and members by name;
//! - HTTP headers: [`SessionMasker::mask_header`].
//!
//! Nothing here logs a value, masked or not.
pub mod column;
pub mod detect;
pub mod json;
mod literals;
pub mod mode;
pub mod secrets;
pub mod spec;
pub mod stream;

use std::{collections::HashSet, sync::Arc};

pub use column::{CatalogRow, ColumnRule, FieldDesc, ResolvedColumns, RowError, RowPlan};
pub use detect::{Found, Kind};
pub use mode::{HashKey, Whole};
pub use spec::{Builtin, CustomDetector, DetectorRef, MaskRule, MaskSettings, Mode};
pub use stream::StreamMasker;

use crate::credentials::{self, Secret};
use detect::{Detectors, Scratch};
use secrets::Injected;

#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// A mask entry that cannot be compiled (index in the rule's list).
    #[error("{message}")]
    Entry { index: usize, message: String },
    #[error(transparent)]
    Detectors(#[from] detect::DetectError),
    #[error("the hash key: {0}")]
    Key(#[from] credentials::CredentialError),
    #[error("the hash key is shorter than {} bytes", mode::MIN_HASH_KEY)]
    ShortKey,
    #[error("a rule masks with `hash` but [masking] has no hash_key")]
    NoKey,
}

/// A rule's masks, compiled. Shared by every session under the rule.
#[derive(Debug)]
pub struct Plan {
    detectors: Option<Detectors>,
    builtin_modes: [Option<Mode>; Builtin::ALL.len()],
    /// Mode and name of each custom detector of the policy (by index).
    custom: Vec<(String, Option<Mode>)>,
    columns: Vec<ColumnRule>,
    headers: Vec<(String, Mode)>,
    json: Vec<(String, Mode)>,
    needs_key: bool,
}

fn builtin_index(b: Builtin) -> usize {
    Builtin::ALL.iter().position(|x| *x == b).expect("listed")
}

impl Plan {
    /// Compiles a rule's entries against the policy's `[masking]` section.
    pub fn compile(settings: &MaskSettings, rules: &[MaskRule]) -> Result<Plan, MaskError> {
        let mut builtin_modes: [Option<Mode>; Builtin::ALL.len()] = Default::default();
        let mut custom: Vec<(String, Option<Mode>)> =
            settings.detectors.iter().map(|d| (d.name.clone(), None)).collect();
        let mut all_mode: Option<Mode> = None;
        let mut columns = Vec::new();
        let mut headers: Vec<(String, Mode)> = Vec::new();
        let mut json: Vec<(String, Mode)> = Vec::new();
        let mut seen = HashSet::new();
        let mut needs_key = false;
        for (index, rule) in rules.iter().enumerate() {
            let subject = rule.to_string();
            let subject = subject.rsplit_once('=').map_or(subject.as_str(), |(s, _)| s).to_string();
            if !seen.insert(subject.clone()) {
                return Err(MaskError::Entry { index, message: format!("`{subject}` is masked twice in this rule") });
            }
            needs_key |= *rule.mode() == Mode::Hash;
            match rule {
                MaskRule::Column { schema, table, column, mode } => columns.push(ColumnRule {
                    schema: schema.clone(),
                    table: table.clone(),
                    column: column.clone(),
                    mode: mode.clone(),
                }),
                MaskRule::Detector { detector, mode } => match detector {
                    DetectorRef::All => all_mode = Some(mode.clone()),
                    DetectorRef::Builtin(b) => builtin_modes[builtin_index(*b)] = Some(mode.clone()),
                    DetectorRef::Custom(name) => match custom.iter_mut().find(|(n, _)| n == name) {
                        Some(slot) => slot.1 = Some(mode.clone()),
                        None => return Err(MaskError::Entry { index, message: format!("unknown detector `{name}`") }),
                    },
                },
                MaskRule::Header { name, mode } => headers.push((name.clone(), mode.clone())),
                MaskRule::Json { name, mode } => json.push((name.clone(), mode.clone())),
            }
        }
        // `detector:*` turns on what is not named on its own.
        if let Some(m) = all_mode {
            for slot in builtin_modes.iter_mut().chain(custom.iter_mut().map(|(_, m)| m)) {
                slot.get_or_insert_with(|| m.clone());
            }
        }
        let builtins: Vec<Builtin> =
            Builtin::ALL.iter().zip(&builtin_modes).filter(|(_, m)| m.is_some()).map(|(b, _)| *b).collect();
        let customs: Vec<(usize, &CustomDetector)> =
            settings.detectors.iter().enumerate().filter(|(i, _)| custom[*i].1.is_some()).collect();
        let detectors =
            if builtins.is_empty() && customs.is_empty() { None } else { Some(Detectors::new(&builtins, &customs)?) };
        Ok(Plan { detectors, builtin_modes, custom, columns, headers, json, needs_key })
    }

    /// A plan that masks nothing but the injected credentials.
    pub fn credentials_only() -> Plan {
        Plan::compile(&MaskSettings::default(), &[]).expect("an empty plan compiles")
    }

    /// Whether some entry uses `hash` (the session needs the key).
    pub fn needs_key(&self) -> bool {
        self.needs_key
    }

    pub fn column_rules(&self) -> &[ColumnRule] {
        &self.columns
    }

    pub fn has_detectors(&self) -> bool {
        self.detectors.is_some()
    }

    /// Whether some entry masks JSON members by name (`json:`).
    pub fn has_json_members(&self) -> bool {
        !self.json.is_empty()
    }

    pub(crate) fn mode_of(&self, kind: Kind) -> (&Mode, &str) {
        const CREDENTIAL: Mode = Mode::Redact(None);
        match kind {
            Kind::Builtin(b) => {
                (self.builtin_modes[builtin_index(b)].as_ref().unwrap_or(&Mode::Redact(None)), b.name())
            }
            Kind::Custom(i) => {
                let (name, mode) = &self.custom[i];
                (mode.as_ref().unwrap_or(&Mode::Redact(None)), name.as_str())
            }
            Kind::Credential => (&CREDENTIAL, "credential"),
        }
    }
}

/// What to do when a `null`-mode detector fires inside a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullAs {
    /// The whole value becomes NULL / null (column values, JSON leaves).
    Whole,
    /// The match is removed from the text (streams, headers).
    Remove,
}

/// What masking did to a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to mask: use the original.
    Unchanged,
    /// The masked value was written to `out`.
    Masked,
    /// The value becomes NULL (only with [`NullAs::Whole`]).
    Null,
}

/// What becomes of an HTTP header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOutcome {
    Keep,
    Replace(Vec<u8>),
    Remove,
}

struct Shared {
    plan: Arc<Plan>,
    key: Option<HashKey>,
    injected: Injected,
}

/// One session's masker: the plan, the session's key and injected
/// credentials, and scratch space. Cloning gives an independent masker
/// (own scratch) over the same session state.
pub struct SessionMasker {
    shared: Arc<Shared>,
    scratch: Option<Scratch>,
    found: Vec<Found>,
    row: column::RowScratch,
}

impl Clone for SessionMasker {
    fn clone(&self) -> SessionMasker {
        SessionMasker::from_shared(self.shared.clone())
    }
}

impl std::fmt::Debug for SessionMasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionMasker").field("plan", &self.shared.plan).finish_non_exhaustive()
    }
}

impl SessionMasker {
    /// Starts a session: `hash_key` is required when the plan uses `hash`;
    /// `injected` are the credentials portcullis adds for this target.
    pub fn new(plan: Arc<Plan>, hash_key: Option<&Secret>, injected: &[&Secret]) -> Result<SessionMasker, MaskError> {
        let key = match (plan.needs_key, hash_key) {
            (true, None) => return Err(MaskError::NoKey),
            (_, Some(k)) => Some(HashKey::new(k.expose().as_bytes()).ok_or(MaskError::ShortKey)?),
            (false, None) => None,
        };
        let values: Vec<&[u8]> = injected.iter().map(|s| s.expose().as_bytes()).collect();
        let (injected, skipped) = Injected::new(&values);
        if skipped > 0 {
            tracing::warn!(skipped, "injected credentials too short to be masked in responses");
        }
        Ok(SessionMasker::from_shared(Arc::new(Shared { plan, key, injected })))
    }

    /// [`SessionMasker::new`], reading the key from the policy's source
    /// (afresh for each session, like credentials).
    pub fn start(plan: Arc<Plan>, settings: &MaskSettings, injected: &[&Secret]) -> Result<SessionMasker, MaskError> {
        let key = match (&settings.hash_key, plan.needs_key) {
            (Some(r), true) => Some(credentials::resolve(r)?),
            _ => None,
        };
        SessionMasker::new(plan, key.as_ref(), injected)
    }

    fn from_shared(shared: Arc<Shared>) -> SessionMasker {
        let scratch = shared.plan.detectors.as_ref().map(Detectors::scratch);
        SessionMasker { shared, scratch, found: Vec::new(), row: Default::default() }
    }

    pub fn plan(&self) -> &Plan {
        &self.shared.plan
    }

    /// Whether values need scanning at all (detectors or credentials).
    pub fn scans_text(&self) -> bool {
        self.shared.plan.detectors.is_some() || !self.shared.injected.is_empty()
    }

    /// Whether a secret this masker looks for may run across a line break,
    /// other than a built-in's (a custom pattern that can match one, or a
    /// credential that holds one).
    pub fn spans_lines(&self) -> bool {
        self.shared.plan.detectors.as_ref().is_some_and(|d| d.custom_spans_lines())
            || self.shared.injected.spans_lines()
    }

    /// How far a secret can reach: a stream must hold back at least this.
    pub fn longest_credential(&self) -> usize {
        self.shared.injected.longest()
    }

    /// Finds every secret in `text` into `self.found`: ordered, merged
    /// where they overlap (a credential wins the merged span).
    fn collect(&mut self, text: &[u8]) {
        self.found.clear();
        if let (Some(d), Some(s)) = (&self.shared.plan.detectors, &mut self.scratch) {
            d.find(s, text, &mut self.found);
        }
        let from_detectors = self.found.len();
        self.shared.injected.find(text, &mut self.found);
        if from_detectors > 0 && self.found.len() > from_detectors {
            self.found.sort_by_key(|f| (f.start, f.end));
            let mut merged: Vec<Found> = Vec::with_capacity(self.found.len());
            for f in self.found.drain(..) {
                match merged.last_mut() {
                    Some(last) if f.start < last.end => {
                        last.end = last.end.max(f.end);
                        last.context = last.context.min(f.context);
                        if f.kind == Kind::Credential {
                            last.kind = Kind::Credential;
                        }
                    }
                    _ => merged.push(f),
                }
            }
            self.found = merged;
        }
    }

    /// Writes `text[from..to]` to `out` with the found secrets inside it
    /// masked. Secrets must lie within the range.
    fn render(&self, text: &[u8], found: &[Found], from: usize, to: usize, out: &mut Vec<u8>) {
        let plan = &self.shared.plan;
        let key = self.shared.key.as_ref();
        let mut at = from;
        for f in found {
            out.extend_from_slice(&text[at..f.start]);
            let (mode, label) = plan.mode_of(f.kind);
            mode::in_text(mode, label, &text[f.start..f.end], key, out);
            at = f.end;
        }
        out.extend_from_slice(&text[at..to]);
    }

    /// Masks the secrets in one text value.
    pub fn mask_text(&mut self, text: &[u8], nulls: NullAs, out: &mut Vec<u8>) -> Outcome {
        self.collect(text);
        if self.found.is_empty() {
            return Outcome::Unchanged;
        }
        if nulls == NullAs::Whole && self.found.iter().any(|f| *self.shared.plan.mode_of(f.kind).0 == Mode::Null) {
            return Outcome::Null;
        }
        let found = std::mem::take(&mut self.found);
        self.render(text, &found, 0, text.len(), out);
        self.found = found;
        Outcome::Masked
    }

    /// [`SessionMasker::mask_text`] for a string, matches in `null` mode
    /// removed.
    pub fn mask_str<'a>(&mut self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = Vec::new();
        match self.mask_text(text.as_bytes(), NullAs::Remove, &mut out) {
            Outcome::Masked => String::from_utf8_lossy(&out).into_owned().into(),
            Outcome::Unchanged | Outcome::Null => text.into(),
        }
    }

    /// Renders a whole value (a masked column, header or JSON member).
    pub fn render_whole(&self, mode: &Mode, value: &[u8], out: &mut Vec<u8>) -> Whole {
        mode::whole(mode, value, self.shared.key.as_ref(), out)
    }

    /// Masks one HTTP header: by a `header:` entry (the whole value; `null`
    /// removes the header), else by the detectors and credentials.
    pub fn mask_header(&mut self, name: &str, value: &[u8]) -> HeaderOutcome {
        let shared = self.shared.clone();
        if let Some((_, mode)) = shared.plan.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            let mut out = Vec::new();
            return match self.render_whole(mode, value, &mut out) {
                Whole::Null => HeaderOutcome::Remove,
                Whole::Text => HeaderOutcome::Replace(out),
            };
        }
        let mut out = Vec::new();
        match self.mask_text(value, NullAs::Remove, &mut out) {
            Outcome::Unchanged => HeaderOutcome::Keep,
            _ => HeaderOutcome::Replace(out),
        }
    }

    /// Masks a whole JSON document: string leaves with escapes decoded,
    /// `json:` members by name. Text that is not JSON is masked as text.
    pub fn mask_json(&mut self, body: &[u8], out: &mut Vec<u8>) -> Outcome {
        json::mask(self, body, out)
    }

    /// Whether the plan masks JSON members by name (which only a whole
    /// JSON document shows).
    pub fn masks_json_members(&self) -> bool {
        self.shared.plan.has_json_members()
    }

    /// The mode of a `json:` entry for a member name.
    fn json_member(&self, name: &[u8]) -> Option<Mode> {
        self.shared.plan.json.iter().find(|(n, _)| n.as_bytes() == name).map(|(_, m)| m.clone())
    }

    /// A stream masker over this session's state, holding back `window`
    /// bytes (raised to cover the longest credential form).
    pub fn stream(&self, window: usize) -> StreamMasker {
        StreamMasker::new(self.clone(), window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn masker(entries: &[&str], custom: &[(&str, &str)], injected: &[&str]) -> SessionMasker {
        let settings = MaskSettings {
            hash_key: None,
            detectors: custom
                .iter()
                .map(|(n, p)| CustomDetector { name: n.to_string(), pattern: p.to_string() })
                .collect(),
            max_json_body: None,
        };
        let names = settings.custom_names();
        let rules: Vec<MaskRule> = entries.iter().map(|e| spec::parse_rule(e, &names).unwrap()).collect();
        let plan = Arc::new(Plan::compile(&settings, &rules).unwrap());
        let key = Secret::new("0123456789abcdef-test-key");
        let injected: Vec<Secret> = injected.iter().map(|s| Secret::new(*s)).collect();
        let refs: Vec<&Secret> = injected.iter().collect();
        SessionMasker::new(plan, Some(&key), &refs).unwrap()
    }

    #[test]
    fn text_is_masked_per_detector_mode() {
        let mut m = masker(&["detector:email=partial:4", "detector:card"], &[], &[]);
        assert_eq!(
            m.mask_str("Ann <ann@example.io> paid 4111 1111 1111 1111, not 4111 1111 1111 1112."),
            "Ann <***@******e.io> paid <card>, not 4111 1111 1111 1112."
        );
        // Detectors not turned on find nothing.
        assert_eq!(m.mask_str("DE89 3704 0044 0532 0130 00"), "DE89 3704 0044 0532 0130 00");
    }

    #[test]
    fn hash_keeps_equality() {
        let mut m = masker(&["detector:email=hash"], &[], &[]);
        let a = m.mask_str("from a@x.io to b@x.io").into_owned();
        let b = m.mask_str("cc a@x.io").into_owned();
        let tags: Vec<&str> = a.split(' ').filter(|w| w.starts_with("<email:")).collect();
        assert_eq!(tags.len(), 2, "{a}");
        assert_ne!(tags[0], tags[1]);
        assert_eq!(b, format!("cc {}", tags[0]));
    }

    #[test]
    fn star_turns_on_every_detector_and_specific_entries_win() {
        let mut m = masker(&["detector:*", "detector:email=null"], &[("emp", r"EMP-[0-9]{6}")], &[]);
        assert_eq!(m.mask_str("EMP-123456 <a@b.io> AKIAIOSFODNN7EXAMPLE"), "<emp> <> <aws-key>");
        let mut out = Vec::new();
        assert_eq!(m.mask_text(b"x a@b.io", NullAs::Whole, &mut out), Outcome::Null);
    }

    #[test]
    fn injected_credentials_are_always_masked() {
        let mut m = masker(&[], &[], &["s3cr3t-Pa55word"]);
        assert!(m.scans_text());
        assert_eq!(m.mask_str("FATAL: password s3cr3t-Pa55word is wrong"), "FATAL: password <credential> is wrong");
        // Overlapping a detector's match: the credential wins the span.
        let mut m = masker(&["detector:token"], &[], &["s3cr3t-Pa55word"]);
        assert_eq!(m.mask_str("password=s3cr3t-Pa55word&a=b"), "password=<credential>&a=b");
    }

    #[test]
    fn headers() {
        let mut m = masker(&["header:set-cookie", "header:x-debug=null", "detector:token"], &[], &[]);
        assert_eq!(m.mask_header("Set-Cookie", b"sid=abc"), HeaderOutcome::Replace(b"****".to_vec()));
        assert_eq!(m.mask_header("X-Debug", b"1"), HeaderOutcome::Remove);
        assert_eq!(
            m.mask_header("WWW-Authenticate", b"Bearer abcdefghijklmnopqrstuvwxyz"),
            HeaderOutcome::Replace(b"Bearer <token>".to_vec())
        );
        assert_eq!(m.mask_header("Content-Type", b"text/plain"), HeaderOutcome::Keep);
    }

    #[test]
    fn keys_are_required_when_hashing() {
        let rules = vec![spec::parse_rule("detector:email=hash", &[]).unwrap()];
        let plan = Arc::new(Plan::compile(&MaskSettings::default(), &rules).unwrap());
        assert!(plan.needs_key());
        assert!(matches!(SessionMasker::new(plan.clone(), None, &[]), Err(MaskError::NoKey)));
        assert!(matches!(SessionMasker::new(plan, Some(&Secret::new("short")), &[]), Err(MaskError::ShortKey)));
    }

    #[test]
    fn duplicate_entries_are_refused() {
        let rules: Vec<MaskRule> = ["detector:email", "column:users.email", "detector:email=hash"]
            .iter()
            .map(|e| spec::parse_rule(e, &[]).unwrap())
            .collect();
        match Plan::compile(&MaskSettings::default(), &rules) {
            Err(MaskError::Entry { index: 2, message }) => assert!(message.contains("twice"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}
