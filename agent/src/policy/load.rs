//! Reading a policy file: TOML with every error located by line and column.
//! Syntax errors are all reported (the parser recovers); each scope, target,
//! role and binding is then read on its own, so one bad entry does not hide
//! the errors in the next; cross-references are checked last.
use std::{collections::HashSet, fmt, path::Path, sync::Arc, time::Duration};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::{
    de::{DeTable, DeValue, ValueDeserializer},
    Spanned,
};

use super::{
    address::{parse_exception, parse_patterns, parse_upstream},
    model::*,
};
use crate::masking::{
    self,
    spec::{self as mask_spec, Builtin, CustomDetector, Mode as MaskMode},
    Plan,
};

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// All problems found in a policy file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct PolicyErrors {
    pub path: String,
    pub errors: Vec<PolicyError>,
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.path, e.line, e.column, e.message)?;
        }
        Ok(())
    }
}

pub fn load_file(path: &Path) -> Result<Policy, PolicyErrors> {
    let shown = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| PolicyErrors {
        path: shown.clone(),
        errors: vec![PolicyError { line: 0, column: 0, message: format!("cannot read: {e}") }],
    })?;
    let mut policy = parse(&src).map_err(|errors| PolicyErrors { path: shown, errors })?;
    policy.source = Some(path.to_path_buf());
    Ok(policy)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    name: Spanned<String>,
    cgroup: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    egress: Option<Spanned<String>>,
    allow: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Spanned<String>,
    protocol: Spanned<String>,
    #[serde(rename = "match")]
    matches: Spanned<Vec<Spanned<String>>>,
    upstream: Option<Spanned<String>>,
    hosts: Option<Vec<Spanned<String>>>,
    tls: Option<RawTls>,
    credentials: Option<Spanned<RawCredentials>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    client: Option<bool>,
    upstream: Option<bool>,
    ca: Option<String>,
    server_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    user: Option<String>,
    password: Option<Spanned<RawSecret>>,
    token: Option<Spanned<RawSecret>>,
    scheme: Option<Spanned<String>>,
    header: Option<String>,
    query: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    file: Option<String>,
    env: Option<String>,
    credential: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: Spanned<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    target: Spanned<String>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    approve: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    mask: Vec<Spanned<String>>,
    approval_timeout: Option<Spanned<String>>,
    /// HTTP: largest request body forwarded (`"10MiB"` or a byte count).
    max_body: Option<Spanned<RawSize>>,
    /// HTTP: whether WebSocket upgrades may be forwarded.
    websocket: Option<Spanned<bool>>,
    allow_tables: Option<Spanned<Vec<Spanned<String>>>>,
    deny_tables: Option<Spanned<Vec<Spanned<String>>>>,
    allow_functions: Option<Spanned<Vec<Spanned<String>>>>,
    deny_functions: Option<Spanned<Vec<Spanned<String>>>>,
    /// git: the repository rules (`[[roles.rules.repos]]`).
    repos: Option<Spanned<Vec<Spanned<RawRepo>>>>,
    /// HTTP: how a held request is answered, `"hold"` (default) or `"early"`.
    approval_response: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepo {
    path: Spanned<String>,
    #[serde(default)]
    fetch: bool,
    #[serde(default)]
    create: Vec<Spanned<String>>,
    #[serde(default)]
    update: Vec<Spanned<String>>,
    #[serde(default)]
    delete: Vec<Spanned<String>>,
    #[serde(default)]
    approve: Vec<Spanned<String>>,
    force: Option<Spanned<String>>,
    #[serde(default)]
    push_options: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasking {
    hash_key: Option<Spanned<RawSecret>>,
    #[serde(default)]
    detectors: Vec<RawDetector>,
    /// Largest JSON response body masked as a document.
    max_json_body: Option<Spanned<RawSize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    name: Spanned<String>,
    pattern: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    scope: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    role: Spanned<String>,
}

/// Collects errors with positions computed from byte offsets.
struct Errors<'a> {
    src: &'a str,
    list: Vec<PolicyError>,
}

impl Errors<'_> {
    fn at(&mut self, offset: usize, message: impl Into<String>) {
        let (line, column) = line_col(self.src, offset);
        self.list.push(PolicyError { line, column, message: message.into() });
    }
    fn at_span<T>(&mut self, s: &Spanned<T>, message: impl Into<String>) {
        self.at(s.span().start, message)
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    // An offset computed inside an escaped string may not fall on a
    // character boundary of the source: point at the character it is in.
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Stable 32-bit id for a name (never 0), shared with the kernel maps.
pub fn name_id(kind: &str, name: &str) -> u32 {
    let h = Sha256::new().chain_update(kind).chain_update([0]).chain_update(name).finalize();
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]).max(1)
}

pub fn parse(src: &str) -> Result<Policy, Vec<PolicyError>> {
    let mut errs = Errors { src, list: Vec::new() };
    let (doc, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        for e in syntax {
            let offset = e.span().map_or(0, |s| s.start);
            errs.at(offset, e.message().trim().to_string());
        }
        return Err(errs.list);
    }
    let doc = doc.into_inner();
    let mut policy = Policy { digest: hex::encode(Sha256::digest(src.as_bytes())), ..Policy::default() };

    let mut version_seen = false;
    let mut raw_scopes = Vec::new();
    let mut raw_targets = Vec::new();
    let mut raw_roles = Vec::new();
    let mut raw_bindings = Vec::new();
    let mut raw_masking = None;
    for (key, value) in doc.iter() {
        match key.get_ref().as_ref() {
            "version" => {
                version_seen = true;
                match value.get_ref().as_integer().and_then(|i| i.as_str().parse::<u32>().ok()) {
                    Some(1) => policy.version = 1,
                    _ => {
                        errs.at(value.span().start, "unsupported policy version (this portcullis reads `version = 1`)")
                    }
                }
            }
            "scopes" => raw_scopes = entries::<RawScope>(&mut errs, "scopes", value),
            "targets" => raw_targets = entries::<RawTarget>(&mut errs, "targets", value),
            "roles" => raw_roles = entries::<RawRole>(&mut errs, "roles", value),
            "bindings" => raw_bindings = entries::<RawBinding>(&mut errs, "bindings", value),
            "approvals" => {
                if let Some(a) = table::<RawApprovals>(&mut errs, "approvals", value) {
                    policy.approvals = approvals(&mut errs, a);
                }
            }
            "masking" => match RawMasking::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(m) => raw_masking = Some(m),
                Err(e) => {
                    let offset = e.span().map_or(value.span().start, |s| s.start);
                    errs.at(offset, format!("in `masking`: {}", e.message().trim()));
                }
            },
            other => errs.at(
                key.span().start,
                format!(
                    "unknown key `{other}` (expected version, scopes, targets, roles, bindings, approvals, masking)"
                ),
            ),
        }
    }
    if !version_seen {
        errs.at(0, "missing `version = 1`");
    }

    let mut names = HashSet::new();
    for s in raw_scopes {
        let at = s.cgroup.as_ref().or(s.unit.as_ref()).map_or(s.name.span().start, |c| c.span().start);
        if let Some(scope) = scope(&mut errs, &mut names, s) {
            if let Some(e) = scope_clash(&policy.scopes, &scope) {
                errs.at(at, e);
                continue;
            }
            policy.scopes.push(scope);
        }
    }
    let mut names = HashSet::new();
    for t in raw_targets {
        if let Some(target) = target(&mut errs, &mut names, t) {
            policy.targets.push(target);
        }
    }
    if let Some(m) = raw_masking {
        policy.masking = masking_section(&mut errs, m);
    }
    let mut names = HashSet::new();
    for r in raw_roles {
        if let Some(role) = role(&mut errs, &mut names, &policy, r) {
            policy.roles.push(role);
        }
    }
    for (index, b) in raw_bindings.into_iter().enumerate() {
        if let Some(binding) = binding(&mut errs, &policy, index, b) {
            policy.bindings.push(binding);
        }
    }
    check_ids(&mut errs, &policy);

    if errs.list.is_empty() {
        Ok(policy)
    } else {
        errs.list.sort_by_key(|e| (e.line, e.column));
        Err(errs.list)
    }
}

/// Deserializes a top-level table.
fn table<T: for<'de> Deserialize<'de>>(errs: &mut Errors<'_>, key: &str, value: &Spanned<DeValue<'_>>) -> Option<T> {
    if !value.get_ref().is_table() {
        errs.at(value.span().start, format!("`{key}` must be a table (`[{key}]`)"));
        return None;
    }
    match T::deserialize(ValueDeserializer::from(value.clone())) {
        Ok(v) => Some(v),
        Err(e) => {
            errs.at(e.span().map_or(value.span().start, |s| s.start), format!("in `{key}`: {}", e.message().trim()));
            None
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    webhook: Option<Spanned<String>>,
}

fn approvals(errs: &mut Errors<'_>, a: RawApprovals) -> ApprovalSettings {
    let mut out = ApprovalSettings::default();
    if let Some(w) = a.webhook {
        match crate::approvals::notify::Notifier::new(w.get_ref()) {
            Ok(_) => out.webhook = Some(w.into_inner()),
            Err(e) => errs.at_span(&w, e),
        }
    }
    out
}

/// Deserializes each element of a top-level array of tables on its own.
fn entries<T: for<'de> Deserialize<'de>>(errs: &mut Errors<'_>, key: &str, value: &Spanned<DeValue<'_>>) -> Vec<T> {
    let Some(array) = value.get_ref().as_array() else {
        errs.at(value.span().start, format!("`{key}` must be an array of tables (`[[{key}]]`)"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in array.iter() {
        let start = item.span().start;
        match T::deserialize(ValueDeserializer::from(item.clone())) {
            Ok(v) => out.push(v),
            Err(e) => {
                let offset = e.span().map_or(start, |s| s.start);
                errs.at(offset, format!("in `{key}`: {}", e.message().trim()));
            }
        }
    }
    out
}

/// Parses each string of a policy list with `parse`: what parses is kept
/// in order, what does not is reported at its own entry.
fn parse_each<T>(
    errs: &mut Errors<'_>,
    list: &[Spanned<String>],
    mut parse: impl FnMut(&str) -> Result<T, String>,
) -> Vec<T> {
    let mut out = Vec::new();
    for entry in list {
        match parse(entry.get_ref()) {
            Ok(v) => out.push(v),
            Err(e) => errs.at_span(entry, e),
        }
    }
    out
}

fn unique(errs: &mut Errors<'_>, names: &mut HashSet<String>, kind: &str, name: &Spanned<String>) -> bool {
    let n = name.get_ref();
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        errs.at_span(
            name,
            format!("{kind} name `{n}` must be non-empty and use only letters, digits, `-`, `_` and `.`"),
        );
        return false;
    }
    if !names.insert(n.clone()) {
        errs.at_span(name, format!("duplicate {kind} name `{n}`"));
        return false;
    }
    true
}

/// Why a scope cannot stand beside the ones before it: the programs find
/// one scope per cgroup, at most `MAX_CGROUP_DEPTH` levels down, and a scope
/// inside another would have its connects redirected twice.
fn scope_clash(before: &[Scope], scope: &Scope) -> Option<String> {
    match &scope.location {
        ScopeLocation::Cgroup(path) => {
            let depth = path.split('/').count();
            if depth >= portcullis_common::MAX_CGROUP_DEPTH as usize {
                return Some(format!(
                    "cgroup path `{path}` is {depth} levels deep; scopes must be fewer than {} levels down",
                    portcullis_common::MAX_CGROUP_DEPTH
                ));
            }
            for b in before {
                let ScopeLocation::Cgroup(other) = &b.location else { continue };
                if other == path {
                    return Some(format!("scope `{}` already guards cgroup `{path}`", b.name));
                }
                let inside = |inner: &str, outer: &str| inner.strip_prefix(outer).is_some_and(|r| r.starts_with('/'));
                if inside(path, other) || inside(other, path) {
                    return Some(format!(
                        "cgroup `{path}` and scope `{}`'s `{other}` are nested; scopes must not contain each other",
                        b.name
                    ));
                }
            }
        }
        ScopeLocation::Unit(unit) => {
            if let Some(b) = before.iter().find(|b| matches!(&b.location, ScopeLocation::Unit(u) if u == unit)) {
                return Some(format!("scope `{}` already guards unit `{unit}`", b.name));
            }
        }
    }
    None
}

fn scope(errs: &mut Errors<'_>, names: &mut HashSet<String>, s: RawScope) -> Option<Scope> {
    let ok = unique(errs, names, "scope", &s.name);
    let location = match (s.cgroup, s.unit) {
        (Some(c), None) => {
            let path = c.get_ref().trim_matches('/').to_string();
            if path.is_empty() || path.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
                errs.at_span(&c, format!("cgroup path `{}` must be a relative path without `.` or `..`", c.get_ref()));
                return None;
            }
            ScopeLocation::Cgroup(path)
        }
        (None, Some(u)) => {
            if !is_unit_name(u.get_ref()) {
                errs.at_span(&u, format!("`{}` is not a systemd unit name (like `runner.service`)", u.get_ref()));
                return None;
            }
            ScopeLocation::Unit(u.into_inner())
        }
        (Some(c), Some(_)) => {
            errs.at_span(&c, "a scope takes `cgroup` or `unit`, not both");
            return None;
        }
        (None, None) => {
            errs.at_span(&s.name, format!("scope `{}` needs `cgroup` or `unit`", s.name.get_ref()));
            return None;
        }
    };
    let egress = match s.egress.as_ref().map(|e| e.get_ref().as_str()) {
        None | Some("allow") => Egress::Allow,
        Some("deny") => Egress::Deny,
        Some(other) => {
            errs.at_span(
                s.egress.as_ref().expect("some"),
                format!("egress must be \"allow\" or \"deny\", not \"{other}\""),
            );
            return None;
        }
    };
    let exceptions =
        parse_each(errs, &s.allow.unwrap_or_default(), |a| parse_exception(a).map_err(|e| format!("bad address: {e}")));
    let mut allow = Vec::new();
    for (patterns, transports) in exceptions {
        for addr in patterns {
            allow.push(EgressException { addr, transports: transports.clone() });
        }
    }
    let name = s.name.into_inner();
    ok.then(|| Scope { id: name_id("scope", &name), name, location, egress, allow })
}

fn is_unit_name(u: &str) -> bool {
    const SUFFIXES: [&str; 4] = [".service", ".scope", ".slice", ".socket"];
    SUFFIXES.iter().any(|s| u.len() > s.len() && u.ends_with(s))
        && u.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
}

fn secret(errs: &mut Errors<'_>, s: Spanned<RawSecret>) -> Option<SecretRef> {
    let span = s.span().start;
    let s = s.into_inner();
    match (s.file, s.env, s.credential) {
        (Some(f), None, None) => Some(SecretRef::File(f.into())),
        (None, Some(e), None) => Some(SecretRef::Env(e)),
        (None, None, Some(c)) => Some(SecretRef::Credential(c)),
        _ => {
            errs.at(span, "a secret is exactly one of { file = \"...\" }, { env = \"...\" }, { credential = \"...\" }");
            None
        }
    }
}

fn target(errs: &mut Errors<'_>, names: &mut HashSet<String>, t: RawTarget) -> Option<Target> {
    let before = errs.list.len();
    unique(errs, names, "target", &t.name);
    let protocol = Protocol::parse(t.protocol.get_ref());
    if protocol.is_none() {
        errs.at_span(
            &t.protocol,
            format!("unknown protocol `{}` (expected postgres, http, git or tcp)", t.protocol.get_ref()),
        );
    }
    if t.matches.get_ref().is_empty() {
        errs.at_span(&t.matches, "`match` needs at least one address");
    }
    let matches: Vec<_> =
        parse_each(errs, t.matches.get_ref(), |m| parse_patterns(m).map_err(|e| format!("bad address: {e}")))
            .into_iter()
            .flatten()
            .collect();
    let upstream = match t.upstream {
        None => Upstream::Original,
        Some(u) => match parse_upstream(u.get_ref()) {
            Ok(up) => up,
            Err(e) => {
                errs.at_span(&u, format!("bad upstream: {e}"));
                Upstream::Original
            }
        },
    };
    let hosts: Vec<String> =
        t.hosts.unwrap_or_default().into_iter().map(|h| h.into_inner().to_ascii_lowercase()).collect();
    let tls = t.tls.map(|r| TargetTls {
        client: r.client.unwrap_or(false),
        upstream: r.upstream.unwrap_or(false),
        ca: r.ca.map(Into::into),
        server_name: r.server_name,
    });
    let credentials = t.credentials.map(|c| {
        let at = c.span().start;
        let c = c.into_inner();
        if let Some(s) = &c.scheme {
            if !["bearer", "basic", "header", "query"].contains(&s.get_ref().as_str()) {
                errs.at_span(s, "scheme must be one of bearer, basic, header, query");
            }
        }
        let creds = Credentials {
            user: c.user,
            password: c.password.and_then(|p| secret(errs, p)),
            token: c.token.and_then(|p| secret(errs, p)),
            scheme: c.scheme.map(Spanned::into_inner),
            header: c.header,
            query: c.query,
        };
        if protocol == Some(Protocol::Http) {
            if let Err(e) = creds.http_injection() {
                errs.at(at, format!("credentials: {e}"));
            }
        }
        creds
    });
    // Injected credentials go where the connection goes: without an
    // `upstream`, to the address the caller dialled. Matched by a network
    // or a `*` port, that may be a host or port the caller runs itself,
    // unless verified TLS to a named host keeps the credential from it.
    let tls = tls.unwrap_or_default();
    let verified_name = tls.upstream && (tls.server_name.is_some() || !hosts.is_empty());
    if credentials.is_some() && upstream == Upstream::Original && !verified_name {
        if let Some(m) = matches.iter().find(|m| m.net.prefix_len() != m.net.max_prefix_len() || m.port.is_none()) {
            errs.at_span(
                &t.matches,
                format!(
                    "`{}` covers more than one address and port, and this target injects credentials: name its \
                     `upstream` (or verify upstream TLS against a host name), else the credentials go to whatever \
                     the caller dials",
                    m.text
                ),
            );
        }
    }
    if errs.list.len() != before {
        return None;
    }
    let name = t.name.into_inner();
    Some(Target { id: name_id("target", &name), name, protocol: protocol?, matches, upstream, hosts, tls, credentials })
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn role(errs: &mut Errors<'_>, names: &mut HashSet<String>, policy: &Policy, r: RawRole) -> Option<Role> {
    let before = errs.list.len();
    unique(errs, names, "role", &r.name);
    let mut rules = Vec::new();
    let mut seen_targets = HashSet::new();
    for (index, raw) in r.rules.into_iter().enumerate() {
        let Some(target) = policy.target(raw.target.get_ref()) else {
            errs.at_span(&raw.target, format!("rule names unknown target `{}`", raw.target.get_ref()));
            continue;
        };
        if !seen_targets.insert(target.name.clone()) {
            errs.at_span(
                &raw.target,
                format!("role `{}` has two rules for target `{}`", r.name.get_ref(), target.name),
            );
            continue;
        }
        let classes = target.protocol.request_classes();
        let is_http = target.protocol == Protocol::Http;
        let is_git = target.protocol == Protocol::Git;
        if is_git {
            if let Some(c) = raw.allow.iter().chain(&raw.approve).chain(&raw.deny).next() {
                errs.at_span(
                    c,
                    format!(
                        "git rules do not take allow/approve/deny lists; use [[roles.rules.repos]] entries (`{}` is git)",
                        target.name
                    ),
                );
            }
        }
        let mut lists: [Vec<String>; 3] = Default::default();
        let mut http_lists: [Vec<HttpPattern>; 3] = Default::default();
        for ((list, http_list), raw_list) in
            lists.iter_mut().zip(http_lists.iter_mut()).zip([&raw.allow, &raw.approve, &raw.deny])
        {
            if is_http {
                *http_list = parse_each(errs, raw_list, http_pattern);
                *list = http_list.iter().map(|p| p.text.clone()).collect();
                continue;
            }
            *list = parse_each(errs, raw_list, |name| {
                if name != "*" && !classes.contains(&name) {
                    return Err(format!(
                        "`{name}` is not a request class of protocol {} (expected one of: {}, or `*`)",
                        target.protocol,
                        classes.join(", ")
                    ));
                }
                Ok(name.to_string())
            });
        }
        // A class may appear in one list only: order of precedence should not
        // be something a reader has to know.
        for c in raw.allow.iter().chain(&raw.approve).chain(&raw.deny) {
            let n = c.get_ref();
            let count = lists.iter().filter(|l| l.contains(n)).count();
            if count > 1 {
                errs.at_span(c, format!("`{n}` appears in more than one of allow, approve, deny"));
                break;
            }
        }
        let approval_timeout = match &raw.approval_timeout {
            None => DEFAULT_APPROVAL_TIMEOUT,
            Some(t) => parse_duration(t.get_ref()).unwrap_or_else(|| {
                errs.at_span(t, "approval_timeout must look like 30s, 5m or 1h");
                DEFAULT_APPROVAL_TIMEOUT
            }),
        };
        let max_body = raw.max_body.as_ref().and_then(|m| match m.get_ref() {
            RawSize::Bytes(n) if *n >= 0 => Some(*n as u64),
            RawSize::Text(t) if parse_size(t).is_some() => parse_size(t),
            _ => {
                errs.at_span(m, "max_body must be a byte count or a size like \"512KiB\", \"10MiB\", \"1GiB\"");
                None
            }
        });
        let websocket = raw.websocket.as_ref().map(|w| *w.get_ref());
        let approval_response = match &raw.approval_response {
            None => ApprovalResponse::Hold,
            Some(r) => match r.get_ref().as_str() {
                "hold" => ApprovalResponse::Hold,
                "early" => ApprovalResponse::Early,
                other => {
                    errs.at_span(r, format!("approval_response must be \"hold\" or \"early\", not `{other}`"));
                    ApprovalResponse::Hold
                }
            },
        };
        if !is_http {
            if let (Some(m), false) = (&raw.max_body, is_git) {
                errs.at_span(
                    m,
                    format!(
                        "max_body applies to http targets and git targets; `{}` is {}",
                        target.name, target.protocol
                    ),
                );
            }
            if let Some(w) = &raw.websocket {
                errs.at_span(w, format!("websocket applies to http targets; `{}` is {}", target.name, target.protocol));
            }
            if let Some(r) = &raw.approval_response {
                errs.at_span(
                    r,
                    format!("approval_response applies to http targets; `{}` is {}", target.name, target.protocol),
                );
            }
        }
        let http = is_http.then(|| {
            let [allow, approve, deny] = http_lists;
            HttpRule { allow, approve, deny, max_body, websocket: websocket.unwrap_or(false), approval_response }
        });
        let git = match (is_git, raw.repos) {
            (true, repos) => Some(GitRule {
                repos: repos.map(|r| repo_rules(errs, r.into_inner())).unwrap_or_default(),
                max_body: max_body.unwrap_or(DEFAULT_GIT_MAX_BODY),
            }),
            (false, Some(r)) => {
                errs.at_span(&r, format!("repos applies to git targets; `{}` is {}", target.name, target.protocol));
                None
            }
            (false, None) => None,
        };
        let [allow, approve, deny] = lists;
        let (masks, mask_plan) = masks(errs, policy, target, &raw.target, &raw.mask);
        let mut names = |key: &str, list: Option<Spanned<Vec<Spanned<String>>>>| -> Vec<NamePattern> {
            let Some(list) = list else { return Vec::new() };
            if target.protocol != Protocol::Postgres {
                errs.at_span(
                    &list,
                    format!("`{key}` applies to postgres targets only (`{}` is {})", target.name, target.protocol),
                );
                return Vec::new();
            }
            parse_each(errs, list.get_ref(), |p| {
                NamePattern::parse(p).map_err(|e| format!("bad name pattern `{p}` in `{key}`: {e}"))
            })
        };
        let allow_tables = names("allow_tables", raw.allow_tables);
        let deny_tables = names("deny_tables", raw.deny_tables);
        let allow_functions = names("allow_functions", raw.allow_functions);
        let deny_functions = names("deny_functions", raw.deny_functions);
        rules.push(Rule {
            target: target.name.clone(),
            index,
            allow,
            approve,
            deny,
            mask: raw.mask.into_iter().map(Spanned::into_inner).collect(),
            masks,
            mask_plan,
            allow_tables,
            deny_tables,
            allow_functions,
            deny_functions,
            approval_timeout,
            http,
            git,
        });
    }
    (errs.list.len() == before).then(|| Role { name: r.name.into_inner(), rules })
}

/// Reads `[[roles.rules.repos]]` entries: a path glob, `fetch`, ref globs
/// for `create`, `update`, `delete` and `approve`, and `force`.
fn repo_rules(errs: &mut Errors<'_>, raw: Vec<Spanned<RawRepo>>) -> Vec<RepoRule> {
    let mut out = Vec::new();
    for (index, r) in raw.into_iter().enumerate() {
        let r = r.into_inner();
        let before = errs.list.len();
        let path_text = r.path.get_ref().trim_start_matches('/');
        let path = if path_text.is_empty() || path_text.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            errs.at_span(
                &r.path,
                format!("repository path `{}` must be a relative path without `.`, `..` or `//`", r.path.get_ref()),
            );
            None
        } else {
            GitGlob::new(path_text).map_err(|e| errs.at_span(&r.path, e)).ok()
        };
        let mut globs = |list: &[Spanned<String>]| -> Vec<GitGlob> {
            parse_each(errs, list, |t| {
                if !t.starts_with("refs/") {
                    return Err(format!("ref pattern `{t}` must start with `refs/` (like `refs/heads/feature/*`)"));
                }
                GitGlob::new(t)
            })
        };
        let create = globs(&r.create);
        let update = globs(&r.update);
        let delete = globs(&r.delete);
        let approve = globs(&r.approve);
        let push_options = parse_each(errs, &r.push_options, GitGlob::any_chars);
        let force = match r.force.as_ref().map(|f| f.get_ref().as_str()) {
            None | Some("deny") => ForcePolicy::Deny,
            Some("allow") => ForcePolicy::Allow,
            Some("approve") => ForcePolicy::Approve,
            Some(other) => {
                errs.at_span(
                    r.force.as_ref().expect("some"),
                    format!("force must be \"allow\", \"deny\" or \"approve\", not \"{other}\""),
                );
                ForcePolicy::Deny
            }
        };
        if let (Some(path), true) = (path, errs.list.len() == before) {
            out.push(RepoRule { index, path, fetch: r.fetch, create, update, delete, approve, force, push_options });
        }
    }
    out
}

/// Parses an HTTP rule entry: `*`, a class, or a class and a path glob.
fn http_pattern(text: &str) -> Result<HttpPattern, String> {
    let classes = Protocol::Http.request_classes();
    let text = text.trim();
    let (class, path) = match text.split_once(char::is_whitespace) {
        None => (text, None),
        Some((c, p)) => (c, Some(p.trim())),
    };
    if class != "*" && !classes.contains(&class) {
        return Err(format!(
            "`{class}` is not a request class of protocol http (expected one of: {}, or `*`, optionally followed by a path like `/repos/**`)",
            classes.join(", ")
        ));
    }
    let path = match path {
        None => None,
        Some(p) => {
            if !p.starts_with('/') {
                return Err(format!("path pattern `{p}` must start with `/`"));
            }
            if p.split('/').any(|seg| seg == "." || seg == "..") {
                return Err(format!("path pattern `{p}` must not contain `.` or `..` segments"));
            }
            let glob = |loose: bool| {
                globset::GlobBuilder::new(p)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .case_insensitive(loose)
                    .build()
                    .map(|g| g.compile_matcher())
                    .map_err(|e| format!("bad path pattern `{p}`: {e}"))
            };
            Some((glob(false)?, glob(true)?))
        }
    };
    let (path, loose) = path.unzip();
    let text = match &path {
        None => class.to_string(),
        Some(_) => format!("{class} {}", text[class.len()..].trim()),
    };
    Ok(HttpPattern { class: class.to_string(), path, loose, text })
}

/// `1024`, `512KiB`, `10MiB`, `1GiB` (binary) or `10KB`, `10MB`, `1GB`
/// (decimal), optionally with `B`.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn masking_section(errs: &mut Errors<'_>, m: RawMasking) -> MaskSettings {
    let max_json_body = m.max_json_body.as_ref().and_then(|v| match v.get_ref() {
        RawSize::Bytes(n) if *n >= 0 => Some(*n as u64),
        RawSize::Text(t) if parse_size(t).is_some() => parse_size(t),
        _ => {
            errs.at_span(v, "max_json_body must be a byte count or a size like \"4MiB\"");
            None
        }
    });
    let mut settings =
        MaskSettings { hash_key: m.hash_key.and_then(|k| secret(errs, k)), detectors: Vec::new(), max_json_body };
    let mut names = HashSet::new();
    for d in m.detectors {
        if !unique(errs, &mut names, "detector", &d.name) {
            continue;
        }
        if Builtin::parse(d.name.get_ref()).is_some() || d.name.get_ref() == "credential" {
            errs.at_span(&d.name, format!("`{}` is the name of a built-in detector", d.name.get_ref()));
            continue;
        }
        let custom = CustomDetector { name: d.name.get_ref().clone(), pattern: d.pattern.get_ref().clone() };
        match masking::detect::check_custom(&custom) {
            Ok(()) => settings.detectors.push(custom),
            Err(e) => errs.at_span(&d.pattern, e.to_string()),
        }
    }
    settings
}

/// Which mask kinds a protocol's responses can take.
fn mask_kinds(p: Protocol) -> &'static [&'static str] {
    match p {
        Protocol::Postgres => &["column", "detector"],
        Protocol::Http => &["detector", "header", "json"],
        Protocol::Git => &["header"],
        Protocol::Tcp => &[],
    }
}

/// Parses, checks and compiles a rule's `mask` entries. Errors point into
/// the entry's text.
fn masks(
    errs: &mut Errors<'_>,
    policy: &Policy,
    target: &Target,
    at: &Spanned<String>,
    raw: &[Spanned<String>],
) -> (Vec<MaskRule>, Arc<Plan>) {
    let custom = policy.masking.custom_names();
    let mut rules = Vec::new();
    let mut spans = Vec::new();
    for entry in raw {
        // +1: past the opening quote.
        let base = entry.span().start + 1;
        match mask_spec::parse_rule(entry.get_ref(), &custom) {
            Ok(rule) => {
                let kinds = mask_kinds(target.protocol);
                if !kinds.contains(&rule.kind()) {
                    let can = if kinds.is_empty() { "nothing".to_string() } else { kinds.join(", ") };
                    errs.at(
                        base,
                        format!(
                            "`{}:` masks do not apply to {} targets (they take: {can})",
                            rule.kind(),
                            target.protocol
                        ),
                    );
                    continue;
                }
                if *rule.mode() == MaskMode::Hash && policy.masking.hash_key.is_none() {
                    errs.at(base, "`hash` needs a key: add `hash_key = { file = \"...\" }` under [masking]");
                    continue;
                }
                rules.push(rule);
                spans.push(base);
            }
            Err(e) => errs.at(base + e.offset, e.message),
        }
    }
    match Plan::compile(&policy.masking, &rules) {
        Ok(plan) => (rules, Arc::new(plan)),
        Err(masking::MaskError::Entry { index, message }) => {
            errs.at(spans[index], message);
            (Vec::new(), Arc::new(Plan::credentials_only()))
        }
        Err(e) => {
            errs.at_span(at, e.to_string());
            (Vec::new(), Arc::new(Plan::credentials_only()))
        }
    }
}

fn binding(errs: &mut Errors<'_>, policy: &Policy, index: usize, b: RawBinding) -> Option<Binding> {
    if policy.role(b.role.get_ref()).is_none() {
        errs.at_span(&b.role, format!("binding names unknown role `{}`", b.role.get_ref()));
        return None;
    }
    // `*` stays within one path level (`**` crosses them), as documented.
    let glob =
        |errs: &mut Errors<'_>, s: &Spanned<String>| match globset::GlobBuilder::new(s.get_ref().trim_matches('/'))
            .literal_separator(true)
            .build()
        {
            Ok(g) => Some(g.compile_matcher()),
            Err(e) => {
                errs.at_span(s, format!("bad pattern: {e}"));
                None
            }
        };
    let selector = match (b.scope, b.unit, b.cgroup) {
        (Some(s), None, None) => {
            if policy.scope(s.get_ref()).is_none() {
                errs.at_span(&s, format!("binding names unknown scope `{}`", s.get_ref()));
                return None;
            }
            Selector::Scope(s.into_inner())
        }
        (None, Some(u), None) => Selector::Unit { glob: glob(errs, &u)?, text: u.into_inner() },
        (None, None, Some(c)) => Selector::Cgroup { glob: glob(errs, &c)?, text: c.into_inner() },
        _ => {
            errs.at_span(&b.role, "a binding takes exactly one of `scope`, `unit`, `cgroup`");
            return None;
        }
    };
    Some(Binding { selector, role: b.role.into_inner(), index })
}

fn check_ids(errs: &mut Errors<'_>, policy: &Policy) {
    let mut ids = HashSet::new();
    for s in &policy.scopes {
        if !ids.insert(s.id) {
            errs.at(0, format!("scope `{}` collides with another scope's id; rename it", s.name));
        }
    }
    let mut ids = HashSet::new();
    for t in &policy.targets {
        if !ids.insert(t.id) {
            errs.at(0, format!("target `{}` collides with another target's id; rename it", t.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<PolicyError> {
        parse(src).expect_err("policy should be refused")
    }

    fn has(errs: &[PolicyError], line: usize, needle: &str) -> bool {
        errs.iter().any(|e| e.line == line && e.message.contains(needle))
    }

    #[test]
    fn every_semantic_error_is_located() {
        let src = r#"version = 1
[[scopes]]
name = "ci"
cgroup = "a/b"
[[scopes]]
name = "ci"
cgroup = "a/c"
[[targets]]
name = "db"
protocol = "mysql"
match = ["127.0.0.53:5432"]
[[targets]]
name = "x"
protocol = "tcp"
match = ["127.0.0.1:99999"]
[[roles]]
name = "r"
[[roles.rules]]
target = "nope"
allow = ["read"]
[[bindings]]
scope = "ci"
role = "ghost"
"#;
        let errs = errors(src);
        assert!(has(&errs, 6, "duplicate scope name `ci`"), "{errs:?}");
        assert!(has(&errs, 10, "unknown protocol `mysql`"), "{errs:?}");
        assert!(has(&errs, 15, "not a port"), "{errs:?}");
        assert!(has(&errs, 19, "unknown target `nope`"), "{errs:?}");
        assert!(has(&errs, 23, "unknown role `ghost`"), "{errs:?}");
        let e = errs.iter().find(|e| e.line == 10).unwrap();
        assert_eq!(e.column, 12, "column points at the value");
    }

    #[test]
    fn syntax_and_schema_errors_are_located() {
        let errs = errors("version = 1\n[[scopes]]\nname = \"ci\"\ncgroup = \"a\"\nsurprise = 1\n");
        assert!(has(&errs, 5, "unknown field `surprise`"), "{errs:?}");
        let errs = errors("version = 1\n[[targets]\nname = 1\n");
        assert!(errs.iter().all(|e| e.line >= 1) && !errs.is_empty());
        assert_eq!(errs[0].line, 2);
        let errs = errors("version = 2\n");
        assert!(has(&errs, 1, "unsupported policy version"));
        let errs = errors("[[scopes]]\nname = \"a\"\ncgroup = \"x\"\n");
        assert!(has(&errs, 1, "missing `version = 1`"));
    }

    #[test]
    fn errors_in_one_entry_do_not_hide_the_next() {
        let src = "version = 1\n[[targets]]\nname = \"a\"\nprotocol = 1\nmatch = []\n[[targets]]\nname = \"b\"\nprotocol = \"tcp\"\nmatch = [\"nonsense\"]\n";
        let errs = errors(src);
        assert!(has(&errs, 4, "invalid type"), "{errs:?}");
        assert!(has(&errs, 9, "bad address"), "{errs:?}");
    }

    #[test]
    fn classes_are_checked_against_the_protocol() {
        let src = r#"version = 1
[[targets]]
name = "c"
protocol = "tcp"
match = ["127.0.0.1:1"]
[[roles]]
name = "r"
[[roles.rules]]
target = "c"
allow = ["read"]
deny = ["connect"]
approve = ["connect"]
approval_timeout = "soon"
"#;
        let errs = errors(src);
        assert!(has(&errs, 10, "`read` is not a request class of protocol tcp"), "{errs:?}");
        assert!(
            has(&errs, 11, "more than one of allow, approve, deny")
                || has(&errs, 12, "more than one of allow, approve, deny"),
            "{errs:?}"
        );
        assert!(has(&errs, 13, "approval_timeout"), "{errs:?}");
    }

    #[test]
    fn two_rules_for_one_target_are_refused() {
        let src = "version = 1\n[[targets]]\nname = \"c\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:1\"]\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"c\"\n[[roles.rules]]\ntarget = \"c\"\n";
        assert!(has(&errors(src), 11, "two rules for target `c`"));
    }

    #[test]
    fn secrets_take_exactly_one_source() {
        let src = "version = 1\n[[targets]]\nname = \"c\"\nprotocol = \"postgres\"\nmatch = [\"127.0.0.1:1\"]\n[targets.credentials]\nuser = \"u\"\npassword = { file = \"/a\", env = \"B\" }\n";
        assert!(has(&errors(src), 8, "exactly one of"));
    }

    #[test]
    fn credentials_need_one_destination() {
        let t = |matches: &str, extra: &str| {
            format!(
                "version = 1\n[[targets]]\nname = \"c\"\nprotocol = \"postgres\"\nmatch = [{matches}]\n{extra}[targets.credentials]\nuser = \"u\"\npassword = {{ env = \"P\" }}\n"
            )
        };
        for m in ["\"127.1.0.0/16:5432\"", "\"127.0.0.1:*\"", "\"127.0.0.53:5432\", \"*:5432\""] {
            let errs = errors(&t(m, ""));
            assert!(has(&errs, 5, "this target injects credentials: name its `upstream`"), "{m}: {errs:?}");
        }
        // One address, a named upstream, or TLS verified against a name.
        assert!(parse(&t("\"127.0.0.53:5432\"", "")).is_ok());
        assert!(parse(&t("\"127.1.0.0/16:5432\"", "upstream = \"127.0.0.1:5432\"\n")).is_ok());
        let tls = "hosts = [\"db.example.test\"]\n[targets.tls]\nupstream = true\n";
        assert!(parse(&t("\"127.1.0.0/16:5432\"", tls)).is_ok());
        let unnamed = "[targets.tls]\nupstream = true\n";
        assert!(has(&errors(&t("\"127.1.0.0/16:5432\"", unnamed)), 5, "injects credentials"));
    }

    const HTTP_HEAD: &str = "version = 1\n[[targets]]\nname = \"api\"\nprotocol = \"http\"\nmatch = [\"127.1.0.1:443\"]\n[[targets]]\nname = \"t\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:1\"]\n[[roles]]\nname = \"r\"\n";

    #[test]
    fn http_rule_entries_and_limits_are_checked() {
        let src = format!(
            "{HTTP_HEAD}[[roles.rules]]\ntarget = \"api\"\nallow = [\"GET /ok/**\", \"FETCH /x\", \"GET repos\", \"GET /a/../b\", \"GET /[\"]\nmax_body = \"10 parsecs\"\n[[roles.rules]]\ntarget = \"t\"\nallow = [\"connect\"]\nmax_body = 10\nwebsocket = true\n"
        );
        let errs = errors(&src);
        assert!(has(&errs, 14, "`FETCH` is not a request class of protocol http"), "{errs:?}");
        assert!(has(&errs, 14, "must start with `/`"), "{errs:?}");
        assert!(has(&errs, 14, "`..` segments"), "{errs:?}");
        assert!(has(&errs, 14, "bad path pattern `/[`"), "{errs:?}");
        assert!(!errs.iter().any(|e| e.message.contains("/ok/")), "{errs:?}");
        assert!(has(&errs, 15, "max_body must be"), "{errs:?}");
        assert!(has(&errs, 19, "max_body applies to http targets"), "{errs:?}");
        assert!(has(&errs, 20, "websocket applies to http targets"), "{errs:?}");
    }

    #[test]
    fn approval_response_and_max_json_body() {
        let src = format!(
            "{HTTP_HEAD}[[roles.rules]]\ntarget = \"api\"\napprove = [\"DELETE\"]\napproval_response = \"early\"\n[masking]\nmax_json_body = \"1MiB\"\n"
        );
        let p = parse(&src).expect("valid");
        assert_eq!(p.masking.max_json_body, Some(1 << 20));
        let http = p.role("r").unwrap().rules[0].http.clone().expect("http part");
        assert_eq!(http.approval_response, ApprovalResponse::Early);
        let bad = src.replace("\"early\"", "\"later\"");
        assert!(errors(&bad).iter().any(|e| e.message.contains("approval_response must be")), "{:?}", errors(&bad));
    }

    #[test]
    fn http_rules_compile_to_patterns() {
        let src = format!(
            "{HTTP_HEAD}[[roles.rules]]\ntarget = \"api\"\nallow = [\"read\", \"POST  /repos/*/issues\"]\ndeny = [\"*\"]\nmax_body = \"10MiB\"\nwebsocket = true\n"
        );
        let p = parse(&src).expect("valid");
        let http = p.role("r").unwrap().rules[0].http.clone().expect("http part");
        assert_eq!(http.max_body, Some(10 << 20));
        assert!(http.websocket);
        assert_eq!(http.allow[1].text, "POST /repos/*/issues");
        assert_eq!(http.allow[1].rank(), 2);
        assert!(http.allow[1].matches("POST", "/repos/a/issues"));
        assert!(!http.allow[1].matches("POST", "/repos/a/b/issues"));
        assert!(!http.allow[1].matches("GET", "/repos/a/issues"));
        assert!(http.allow[0].matches("HEAD", "/x") && !http.allow[0].matches("POST", "/x"));
        assert_eq!(http.deny[0].rank(), 0);
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("2KB"), Some(2000));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1 TiB"), None);
    }

    #[test]
    fn http_credentials_must_describe_an_injection() {
        let cred = |body: &str| {
            format!("version = 1\n[[targets]]\nname = \"api\"\nprotocol = \"http\"\nmatch = [\"127.1.0.1:443\"]\n[targets.credentials]\n{body}\n")
        };
        assert!(has(&errors(&cred("scheme = \"bearer\"\nuser = \"u\"")), 6, "scheme bearer needs a `token`"));
        assert!(has(&errors(&cred("scheme = \"basic\"\ntoken = { env = \"T\" }")), 6, "needs a `user`"));
        assert!(has(&errors(&cred("header = \"Host\"\ntoken = { env = \"T\" }")), 6, "cannot carry a credential"));
        assert!(has(&errors(&cred("header = \"Bad Header\"\ntoken = { env = \"T\" }")), 6, "not a valid header name"));
        assert!(has(&errors(&cred("query = \"a&b\"\ntoken = { env = \"T\" }")), 6, "not a valid query parameter"));
        assert!(has(&errors(&cred("user = \"u\"")), 6, "scheme basic needs a `password`"));
        let p = parse(&cred("header = \"X-Api-Key\"\ntoken = { env = \"T\" }")).expect("valid");
        let c = p.target("api").unwrap().credentials.clone().unwrap();
        assert!(matches!(c.http_injection(), Ok(HttpInjection::Header { name: "X-Api-Key", .. })));
        let p = parse(&cred("user = \"u\"\npassword = { env = \"P\" }")).expect("valid");
        let c = p.target("api").unwrap().credentials.clone().unwrap();
        assert!(matches!(c.http_injection(), Ok(HttpInjection::Basic { user: "u", .. })));
    }

    const MASKING_POLICY: &str = r#"version = 1
[masking]
hash_key = { env = "MASK_KEY" }
[[masking.detectors]]
name = "employee-id"
pattern = 'EMP-\d{6}'
[[targets]]
name = "db"
protocol = "postgres"
match = ["127.0.0.53:5432"]
[[targets]]
name = "api"
protocol = "http"
match = ["127.0.0.53:443"]
[[roles]]
name = "r"
[[roles.rules]]
target = "db"
allow = ["read"]
mask = ["column:public.users.email=partial:4", "detector:employee-id=hash", "detector:*"]
[[roles.rules]]
target = "api"
allow = ["GET"]
mask = ["header:set-cookie", "json:password=null", "detector:token"]
"#;

    #[test]
    fn mask_entries_parse_and_compile() {
        let p = parse(MASKING_POLICY).unwrap();
        assert_eq!(p.masking.detectors[0].name, "employee-id");
        assert_eq!(p.masking.hash_key, Some(SecretRef::Env("MASK_KEY".into())));
        let rule = p.role("r").unwrap().rule_for("db").unwrap();
        assert_eq!(rule.masks.len(), 3);
        assert_eq!(rule.mask[0], "column:public.users.email=partial:4");
        assert!(rule.mask_plan.has_detectors());
        assert!(rule.mask_plan.needs_key());
        assert_eq!(rule.mask_plan.column_rules().len(), 1);
        let api = p.role("r").unwrap().rule_for("api").unwrap();
        assert!(!api.mask_plan.needs_key());
    }

    /// The 1-based column of `needle`'s first character on line `line`.
    fn col(src: &str, line: usize, needle: &str) -> usize {
        src.lines().nth(line - 1).unwrap().find(needle).unwrap_or_else(|| panic!("{needle}")) + 1
    }

    #[test]
    fn mask_errors_point_into_the_entry() {
        let src = MASKING_POLICY
            .replace(r"'EMP-\d{6}'", "'EMP-(\\d'")
            .replace("\"detector:*\"]", "\"detector:phone\", \"column:a.b=partial:0\", \"header:x\"]")
            .replace("\"detector:token\"]", "\"column:users.email\", \"detector:token\", \"detector:token=hash\"]");
        let errs = errors(&src);
        assert!(has(&errs, 6, "detector `employee-id`"), "{errs:?}");
        let line = 20;
        // The custom detector failed, so its name is unknown too.
        let e = errs.iter().find(|e| e.line == line && e.message.contains("unknown detector `employee-id`"));
        assert!(e.is_some(), "{errs:?}");
        let e = errs.iter().find(|e| e.message.contains("unknown detector `phone`")).expect("phone");
        assert_eq!((e.line, e.column), (line, col(&src, line, "\"detector:phone") + 1 + "detector:".len()));
        let e = errs.iter().find(|e| e.message.contains("partial takes")).expect("partial");
        assert_eq!((e.line, e.column), (line, col(&src, line, "0\", \"header")));
        assert!(has(&errs, line, "`header:` masks do not apply to postgres targets"), "{errs:?}");
        assert!(has(&errs, 24, "`column:` masks do not apply to http targets"), "{errs:?}");
        let e = errs.iter().find(|e| e.message.contains("masked twice")).expect("twice");
        assert_eq!((e.line, e.column), (24, col(&src, 24, "\"detector:token=hash") + 1));
    }

    #[test]
    fn masking_section_is_checked() {
        let src = MASKING_POLICY.replace("hash_key = { env = \"MASK_KEY\" }\n", "");
        assert!(has(&errors(&src), 19, "`hash` needs a key"), "{:?}", errors(&src));
        let src = MASKING_POLICY.replace("name = \"employee-id\"", "name = \"email\"");
        assert!(has(&errors(&src), 5, "built-in detector"));
        let src = MASKING_POLICY.replace("[masking]\n", "[masking]\nsalt = 1\n");
        assert!(has(&errors(&src), 3, "unknown field `salt`"), "{:?}", errors(&src));
        let src = MASKING_POLICY.replace(r"'EMP-\d{6}'", "'x*'");
        assert!(has(&errors(&src), 6, "matches empty text"), "{:?}", errors(&src));
        let tcp = "version = 1\n[[targets]]\nname = \"t\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.1:1\"]\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"t\"\nallow = [\"connect\"]\nmask = [\"detector:email\"]\n";
        assert!(has(&errors(tcp), 11, "do not apply to tcp targets (they take: nothing)"));
    }

    #[test]
    fn name_patterns_are_checked_and_located() {
        let src = r#"version = 1
[[targets]]
name = "db"
protocol = "postgres"
match = ["127.0.0.1:5432"]
[[targets]]
name = "c"
protocol = "tcp"
match = ["127.0.0.1:1"]
[[roles]]
name = "r"
[[roles.rules]]
target = "db"
deny_tables = ["public.secrets", "a.b.c"]
allow_functions = ["\"unterminated"]
deny_functions = ["bad name"]
[[roles.rules]]
target = "c"
allow_tables = ["x"]
"#;
        let errs = errors(src);
        assert!(has(&errs, 14, "bad name pattern `a.b.c` in `deny_tables`"), "{errs:?}");
        assert!(has(&errs, 15, "unterminated"), "{errs:?}");
        assert!(has(&errs, 16, "unexpected character ` `"), "{errs:?}");
        assert!(has(&errs, 19, "applies to postgres targets only"), "{errs:?}");
        let e = errs.iter().find(|e| e.line == 14).unwrap();
        assert_eq!(e.column, 34, "column points at the bad pattern");
    }

    #[test]
    fn scopes_that_would_clash_in_the_kernel_are_refused() {
        let scopes =
            |a: &str, b: &str| format!("version = 1\n[[scopes]]\nname = \"a\"\n{a}\n[[scopes]]\nname = \"b\"\n{b}\n");
        let err = |a: &str, b: &str| {
            parse(&scopes(a, b)).expect_err("refused").iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; ")
        };
        assert!(err("cgroup = \"x/y\"", "cgroup = \"x/y/\"").contains("already guards"));
        assert!(err("cgroup = \"x\"", "cgroup = \"x/y\"").contains("nested"));
        assert!(err("cgroup = \"x/y\"", "cgroup = \"x\"").contains("nested"));
        assert!(err("unit = \"r.service\"", "unit = \"r.service\"").contains("already guards"));
        let deep = vec!["d"; 32].join("/");
        assert!(err("cgroup = \"x\"", &format!("cgroup = \"{deep}\"")).contains("levels deep"));
        assert!(parse(&scopes("cgroup = \"x/y\"", "cgroup = \"x/yz\"")).is_ok(), "siblings sharing a prefix");
    }

    #[test]
    fn an_error_inside_an_escaped_string_is_located_not_a_panic() {
        let src = MASKING_POLICY.replace("\"detector:token\"]", "\"detector:\\t\\t*é=bad\"]");
        assert!(src.contains("é=bad"));
        let errs = parse(&src).expect_err("a bad mask entry is refused");
        assert!(!errs.is_empty());
        assert!(line_col("aé", 2).0 == 1, "an offset inside a character is taken back to its start");
    }

    #[test]
    fn name_patterns_fold_like_sql() {
        let p = NamePattern::parse("Public.Secrets").unwrap();
        assert!(p.matches("public.secrets"));
        assert!(!p.matches("public.Secrets"));
        let p = NamePattern::parse("public.\"Secrets\"").unwrap();
        assert!(p.matches("public.Secrets"));
        assert!(!p.matches("public.secrets"));
        let p = NamePattern::parse("secrets").unwrap();
        assert!(p.matches("other.secrets"), "no schema: any schema");
        let p = NamePattern::parse("app_*.*_log").unwrap();
        assert!(p.matches("app_eu.audit_log"));
        assert!(!p.matches("app_eu.audit_logs"));
        assert!(!p.matches("public.audit_log"));
        assert!(NamePattern::parse("*").unwrap().matches("pg_catalog.pg_authid"));
        assert!(NamePattern::parse("").is_err());
        assert!(NamePattern::parse("a.").is_err());
    }

    #[test]
    fn git_repo_rules_are_checked_and_located() {
        let src = r#"version = 1
[[targets]]
name = "forge"
protocol = "git"
match = ["127.1.0.2:443"]
[[targets]]
name = "c"
protocol = "tcp"
match = ["127.0.0.1:1"]
[[roles]]
name = "r"
[[roles.rules]]
target = "forge"
allow = ["fetch"]
max_body = "2MiB"
[[roles.rules.repos]]
path = "org/../x"
[[roles.rules.repos]]
path = "org/*.git"
create = ["heads/x", "refs/heads/[", "refs/heads/ok/*"]
force = "sometimes"
[[roles.rules]]
target = "c"
allow = ["connect"]
[[roles.rules.repos]]
path = "x"
"#;
        let errs = errors(src);
        assert!(has(&errs, 14, "do not take allow/approve/deny"), "{errs:?}");
        assert!(has(&errs, 17, "must be a relative path"), "{errs:?}");
        assert!(has(&errs, 20, "must start with `refs/`"), "{errs:?}");
        assert!(has(&errs, 20, "bad pattern `refs/heads/[`"), "{errs:?}");
        assert!(has(&errs, 21, "force must be"), "{errs:?}");
        assert!(has(&errs, 25, "repos applies to git targets"), "{errs:?}");
        assert!(!errs.iter().any(|e| e.message.contains("max_body")), "{errs:?}");
        let src = "version = 1\n[[targets]]\nname = \"forge\"\nprotocol = \"git\"\nmatch = [\"127.1.0.2:443\"]\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"forge\"\n[[roles.rules.repos]]\npath = \"a/**\"\nsurprise = true\n";
        assert!(has(&errors(src), 12, "unknown field `surprise`"), "{:?}", errors(src));
    }

    #[test]
    fn git_repo_rules_compile() {
        let src = "version = 1\n[[targets]]\nname = \"forge\"\nprotocol = \"git\"\nmatch = [\"127.1.0.2:443\"]\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"forge\"\n[[roles.rules.repos]]\npath = \"/org/*.git\"\nfetch = true\nupdate = [\"refs/heads/feature/**\"]\nforce = \"approve\"\n";
        let p = parse(src).expect("valid");
        let git = p.role("r").unwrap().rules[0].git.clone().expect("git part");
        assert_eq!(git.max_body, DEFAULT_GIT_MAX_BODY);
        let repo = &git.repos[0];
        assert!(repo.path.matches("org/app.git"));
        assert!(repo.fetch && repo.can_push());
        assert_eq!(repo.force, ForcePolicy::Approve);
        assert!(repo.update[0].matches("refs/heads/feature/a/b"));
        assert!(!repo.update[0].matches("refs/heads/main"));
    }

    #[test]
    fn ids_are_stable_and_nonzero() {
        assert_eq!(name_id("scope", "ci"), name_id("scope", "ci"));
        assert_ne!(name_id("scope", "ci"), name_id("target", "ci"));
        assert_ne!(name_id("scope", "ci"), 0);
    }

    #[test]
    fn observe_policy_is_valid() {
        let p = crate::policy::observe_policy();
        assert_eq!(p.scopes[0].name, "agent");
        assert!(p.target_for("192.0.2.1:80".parse().unwrap()).is_some());
    }
}
