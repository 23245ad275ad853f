//! The validated policy: what `load` produces and `decide` reads.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use globset::GlobMatcher;
use ipnet::IpNet;
use serde::Serialize;

pub use crate::masking::spec::{MaskRule, MaskSettings};
use crate::masking::Plan;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub version: u32,
    pub scopes: Vec<Scope>,
    pub targets: Vec<Target>,
    pub roles: Vec<Role>,
    pub bindings: Vec<Binding>,
    pub approvals: ApprovalSettings,
    /// The `[masking]` section: the hash key and custom detectors.
    pub masking: MaskSettings,
    /// Where it was read from (None for the built-in default).
    pub source: Option<PathBuf>,
    /// SHA-256 of the source text, to tell reloads apart in the audit log.
    pub digest: String,
}

impl Policy {
    pub fn scope(&self, name: &str) -> Option<&Scope> {
        self.scopes.iter().find(|s| s.name == name)
    }
    pub fn scope_by_id(&self, id: u32) -> Option<&Scope> {
        self.scopes.iter().find(|s| s.id == id)
    }
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    /// The target a connection to `dst` selects, as the kernel's lookup
    /// does: a match on the exact port over one on any port, then the
    /// longest address prefix.
    pub fn target_for(&self, dst: SocketAddr) -> Option<&Target> {
        let ip = dst.ip().to_canonical();
        let mut best: Option<(bool, u32, &Target)> = None;
        for t in &self.targets {
            for m in &t.matches {
                if !m.matches(ip, dst.port()) {
                    continue;
                }
                let rank = (m.port.is_some(), m.mapped_prefix_len());
                if best.is_none_or(|(e, p, _)| (e, p) < rank) {
                    best = Some((rank.0, rank.1, t));
                }
            }
        }
        best.map(|(_, _, t)| t)
    }
}

/// The `[approvals]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApprovalSettings {
    /// Told about every held request (HTTP(S) POST, JSON); never approves.
    pub webhook: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Postgres,
    Http,
    Git,
    Tcp,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [Protocol::Postgres, Protocol::Http, Protocol::Git, Protocol::Tcp];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Http => "http",
            Protocol::Git => "git",
            Protocol::Tcp => "tcp",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The request classes a rule for a target of this protocol may name.
    pub fn request_classes(self) -> &'static [&'static str] {
        match self {
            Protocol::Tcp => &["connect"],
            Protocol::Postgres => &[
                "read",
                "write",
                "ddl",
                "dcl",
                "session",
                "transaction",
                "copy-in",
                "copy-out",
                "function-call",
                "utility",
                "server",
            ],
            Protocol::Http => {
                &["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "TRACE", "read", "write"]
            }
            // What a `[[roles.rules.repos]]` entry decides: fetching, and
            // each ref update of a push by its kind.
            Protocol::Git => &["fetch", "create", "update", "delete", "force"],
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    Allow,
    Deny,
}

/// Where a scope lives in the cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeLocation {
    /// A path relative to the cgroup2 mount, created if missing.
    Cgroup(String),
    /// A systemd unit, resolved to its cgroup when the probes attach.
    Unit(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Scope {
    pub name: String,
    /// Stable id derived from the name; the kernel records carry it.
    pub id: u32,
    pub location: ScopeLocation,
    pub egress: Egress,
    pub allow: Vec<EgressException>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Serialize)]
pub struct EgressException {
    pub addr: AddrPattern,
    /// Empty means both TCP and UDP.
    pub transports: Vec<Transport>,
}

/// An address selector: a network (a single address is a /32 or /128) and a
/// port, or any port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddrPattern {
    #[serde(serialize_with = "ser_display")]
    pub net: IpNet,
    pub port: Option<u16>,
    /// As written in the policy.
    pub text: String,
}

fn ser_display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl AddrPattern {
    pub fn matches(&self, ip: IpAddr, port: u16) -> bool {
        let ip = ip.to_canonical();
        self.port.is_none_or(|p| p == port) && self.net.contains(&ip)
    }

    /// Prefix length over the 128-bit space where IPv4 is mapped
    /// (`::ffff:0:0/96`), the form the kernel maps use.
    pub fn mapped_prefix_len(&self) -> u32 {
        match self.net {
            IpNet::V4(n) => 96 + n.prefix_len() as u32,
            IpNet::V6(n) => n.prefix_len() as u32,
        }
    }

    /// The network address in mapped 16-byte form.
    pub fn mapped_addr(&self) -> [u8; 16] {
        match self.net {
            IpNet::V4(n) => n.network().to_ipv6_mapped().octets(),
            IpNet::V6(n) => n.network().octets(),
        }
    }
}

impl fmt::Display for AddrPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Where the enforcer connects for a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Upstream {
    /// The address the caller asked for.
    Original,
    Addr(SocketAddr),
    /// Resolved when connecting.
    Host {
        host: String,
        port: u16,
    },
}

/// A secret's source. Never the guarded process: a file readable by
/// portcullis, portcullis' own environment, or a systemd credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretRef {
    File(PathBuf),
    Env(String),
    Credential(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Credentials {
    pub user: Option<String>,
    pub password: Option<SecretRef>,
    /// Bearer or API token (HTTP, git).
    pub token: Option<SecretRef>,
    /// HTTP: how to present the token: "bearer" (default), "basic", or a
    /// header name given in `header`, or a query parameter in `query`.
    pub scheme: Option<String>,
    pub header: Option<String>,
    pub query: Option<String>,
}

/// How an HTTP target's credentials are presented upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpInjection<'a> {
    /// `Authorization: Bearer <token>`.
    Bearer(&'a SecretRef),
    /// `Authorization: Basic base64(user:secret)`.
    Basic { user: &'a str, secret: &'a SecretRef },
    /// `<name>: <token>`.
    Header { name: &'a str, token: &'a SecretRef },
    /// `?<name>=<token>` added to the query.
    Query { name: &'a str, token: &'a SecretRef },
}

/// Headers that never carry an injected credential: they frame or route
/// the message.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "content-type",
    "cookie",
    "http2-settings",
];

impl Credentials {
    /// The injection an HTTP target's credentials describe: `scheme` if
    /// given, else `header` or `query` when named, else bearer for a token
    /// or basic for a user and password.
    pub fn http_injection(&self) -> Result<HttpInjection<'_>, String> {
        let scheme = match self.scheme.as_deref() {
            Some(s) => s,
            None if self.header.is_some() => "header",
            None if self.query.is_some() => "query",
            None if self.token.is_some() => "bearer",
            None if self.user.is_some() => "basic",
            None => return Err("an http target's credentials need a `token` (or `user` and `password`)".into()),
        };
        let token = |what: &str| self.token.as_ref().ok_or_else(|| format!("scheme {what} needs a `token`"));
        match scheme {
            "bearer" => Ok(HttpInjection::Bearer(token("bearer")?)),
            "basic" => {
                let user = self.user.as_deref().ok_or("scheme basic needs a `user`")?;
                if user.contains(':') {
                    return Err("a basic user name cannot contain `:`".into());
                }
                let secret = self
                    .password
                    .as_ref()
                    .or(self.token.as_ref())
                    .ok_or("scheme basic needs a `password` (or `token`)")?;
                Ok(HttpInjection::Basic { user, secret })
            }
            "header" => {
                let name = self.header.as_deref().ok_or("scheme header needs `header = \"Header-Name\"`")?;
                let valid = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !valid {
                    return Err(format!("`{name}` is not a valid header name"));
                }
                if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                    return Err(format!("`{name}` cannot carry a credential"));
                }
                Ok(HttpInjection::Header { name, token: token("header")? })
            }
            "query" => {
                let name = self.query.as_deref().ok_or("scheme query needs `query = \"parameter\"`")?;
                if name.is_empty() || name.contains(['&', '=', '#', ' ']) {
                    return Err(format!("`{name}` is not a valid query parameter name"));
                }
                Ok(HttpInjection::Query { name, token: token("query")? })
            }
            other => Err(format!("unknown scheme `{other}`")),
        }
    }
}

/// TLS settings of a target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TargetTls {
    /// Offer TLS to the caller, with a certificate from the local CA.
    pub client: bool,
    /// Speak TLS to the upstream, verifying its certificate.
    pub upstream: bool,
    /// Extra CA certificate (PEM) trusted for the upstream.
    pub ca: Option<PathBuf>,
    /// Name to verify the upstream's certificate against (default: the
    /// target's first host, else the upstream host).
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub id: u32,
    pub protocol: Protocol,
    pub matches: Vec<AddrPattern>,
    pub upstream: Upstream,
    /// Host names the target answers to (HTTP Host/SNI checks).
    pub hosts: Vec<String>,
    pub tls: TargetTls,
    #[serde(skip)]
    pub credentials: Option<Credentials>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Role {
    pub name: String,
    pub rules: Vec<Rule>,
}

impl Role {
    pub fn rule_for(&self, target: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.target == target)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    pub target: String,
    /// Position in the role's rule list, for messages and the audit log.
    pub index: usize,
    pub allow: Vec<String>,
    pub approve: Vec<String>,
    pub deny: Vec<String>,
    /// The `mask` entries as written.
    pub mask: Vec<String>,
    /// The same, parsed.
    #[serde(skip)]
    pub masks: Vec<MaskRule>,
    /// The same, compiled (a plan without entries still masks the target's
    /// injected credentials).
    #[serde(skip)]
    pub mask_plan: Arc<Plan>,
    /// PostgreSQL: when not empty, every table a statement touches must match
    /// one of these.
    pub allow_tables: Vec<NamePattern>,
    /// PostgreSQL: a statement touching a matching table is denied.
    pub deny_tables: Vec<NamePattern>,
    /// PostgreSQL: calls to matching functions carry no class of their own
    /// (trusted as reads).
    pub allow_functions: Vec<NamePattern>,
    /// PostgreSQL: a statement calling a matching function is denied.
    pub deny_functions: Vec<NamePattern>,
    /// How long a held request waits for a human before it is denied.
    #[serde(serialize_with = "ser_duration")]
    pub approval_timeout: Duration,
    /// HTTP targets: the compiled request patterns and limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRule>,
    /// git targets: the repository rules and the push size limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git: Option<GitRule>,
}

/// The HTTP side of a rule: the `allow`, `approve` and `deny` entries
/// compiled to method + path patterns, and the request limits.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpRule {
    pub allow: Vec<HttpPattern>,
    pub approve: Vec<HttpPattern>,
    pub deny: Vec<HttpPattern>,
    /// Largest request body forwarded, in bytes (None: no limit).
    pub max_body: Option<u64>,
    /// Whether WebSocket upgrades may be forwarded.
    pub websocket: bool,
    /// How a request this rule holds for approval is answered.
    pub approval_response: ApprovalResponse,
}

/// How an HTTP request held for approval is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalResponse {
    /// The response waits until the request is approved (then forwarded),
    /// denied or timed out.
    #[default]
    Hold,
    /// 403 `approval_required` with the approval id at once; once approved,
    /// a retry of the same request shape is let through.
    Early,
}

/// One entry of an HTTP rule list: `*`, a class (`GET`, `read`, `write`,
/// ...), or a class and a path glob (`GET /repos/**`, `* /admin/**`).
#[derive(Debug, Clone, Serialize)]
pub struct HttpPattern {
    /// `*`, a method, `read` or `write`.
    pub class: String,
    /// Path glob: `*` matches within one segment, `**` across segments.
    #[serde(skip)]
    pub path: Option<GlobMatcher>,
    /// The same glob without regard to case, for [`loose_path`].
    #[serde(skip)]
    pub loose: Option<GlobMatcher>,
    /// As written in the policy.
    pub text: String,
}

impl HttpPattern {
    /// How specific the entry is: a path-scoped entry beats a class, which
    /// beats `*`.
    pub fn rank(&self) -> u8 {
        match (&self.path, self.class.as_str()) {
            (Some(_), _) => 2,
            (None, "*") => 0,
            (None, _) => 1,
        }
    }

    /// Whether the entry covers a request with this method and
    /// (normalised) path.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.covers_method(method) && self.path.as_ref().is_none_or(|g| g.is_match(path))
    }

    /// Whether the entry covers the request under any reading a server may
    /// give its path: as it is, or as [`loose_path`] gives it (`loose`), with
    /// or without a trailing `/`, in any case. Deny entries match so (a rule
    /// that keeps `/admin/**` out keeps out `/Admin/`, `/admin;x/users` and
    /// `/admin%2Fusers` too), and approve entries over what would be allowed.
    pub fn matches_loosely(&self, method: &str, path: &str, loose: &str) -> bool {
        if !self.covers_method(method) {
            return false;
        }
        match (&self.path, &self.loose) {
            (None, _) => true,
            (Some(g), Some(l)) => g.is_match(path) || l.is_match(loose) || l.is_match(format!("{loose}/")),
            (Some(g), None) => g.is_match(path),
        }
    }

    fn covers_method(&self, method: &str) -> bool {
        match self.class.as_str() {
            "*" => true,
            "read" => is_read_method(method),
            "write" => !is_read_method(method),
            m => m == method,
        }
    }
}

/// A path as the most lenient server reads it: `%2F` and `%3B` decoded,
/// `;parameters` dropped from every segment, no trailing `/` (the root
/// stays `/`). Matched without regard to case.
pub fn loose_path(path: &str) -> String {
    let decoded = path.replace("%2F", "/").replace("%3B", ";");
    let mut out = String::with_capacity(decoded.len());
    for seg in decoded.split('/').skip(1) {
        out.push('/');
        out.push_str(seg.split(';').next().unwrap_or_default());
    }
    while out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Methods that do not change state: the `read` class. TRACE is left out
/// on purpose: it is never forwarded (it would echo injected credentials).
pub fn is_read_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub enum Selector {
    Scope(String),
    Unit { glob: GlobMatcher, text: String },
    Cgroup { glob: GlobMatcher, text: String },
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Scope(s) => write!(f, "scope {s}"),
            Selector::Unit { text, .. } => write!(f, "unit {text}"),
            Selector::Cgroup { text, .. } => write!(f, "cgroup {text}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub selector: Selector,
    pub role: String,
    pub index: usize,
}

/// A pattern over schema-qualified names (`schema.name`), written as SQL
/// names are: unquoted parts are case-folded to lower case, `"Quoted"` parts
/// are kept as written, `*` in an unquoted part matches any run of
/// characters. A pattern without a schema matches the name in any schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamePattern {
    #[serde(skip)]
    pub schema: Option<Vec<Segment>>,
    #[serde(skip)]
    pub name: Vec<Segment>,
    /// As written in the policy.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Star,
}

impl NamePattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<NamePattern, String> {
        let mut parts: Vec<Vec<Segment>> = Vec::new();
        let mut current: Vec<Segment> = Vec::new();
        let mut started = false;
        let mut chars = text.chars().peekable();
        let push_lit = |seg: &mut Vec<Segment>, c: char| match seg.last_mut() {
            Some(Segment::Literal(s)) => s.push(c),
            _ => seg.push(Segment::Literal(c.to_string())),
        };
        while let Some(c) = chars.next() {
            match c {
                '"' => {
                    started = true;
                    loop {
                        match chars.next() {
                            None => return Err("unterminated quoted name".into()),
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                push_lit(&mut current, '"');
                            }
                            Some('"') => break,
                            Some(c) => push_lit(&mut current, c),
                        }
                    }
                }
                '.' => {
                    if !started {
                        return Err("empty name part".into());
                    }
                    parts.push(std::mem::take(&mut current));
                    started = false;
                }
                '*' => {
                    started = true;
                    if current.last() != Some(&Segment::Star) {
                        current.push(Segment::Star);
                    }
                }
                c if c.is_alphanumeric() || c == '_' || c == '$' => {
                    started = true;
                    push_lit(&mut current, c.to_ascii_lowercase());
                }
                c => return Err(format!("unexpected character `{c}` (quote the name: \"...\")")),
            }
        }
        if !started {
            return Err("empty name part".into());
        }
        parts.push(current);
        let (schema, name) = match parts.len() {
            1 => (None, parts.pop().expect("one part")),
            2 => {
                let name = parts.pop().expect("two parts");
                (parts.pop(), name)
            }
            _ => return Err("a name is `name` or `schema.name`".into()),
        };
        Ok(NamePattern { schema, name, text: text.to_string() })
    }

    /// Whether `qualified` (`schema.name`, as the SQL classifier reports it)
    /// matches.
    pub fn matches(&self, qualified: &str) -> bool {
        match qualified.split_once('.') {
            Some((s, n)) => self.matches_parts(Some(s), n),
            None => self.matches_parts(None, qualified),
        }
    }

    /// Whether a relation or function `name` in `schema` matches.
    pub fn matches_parts(&self, schema: Option<&str>, name: &str) -> bool {
        let schema_ok = match (&self.schema, schema) {
            (None, _) => true,
            (Some(p), Some(s)) => wildcard(p, s),
            (Some(_), None) => false,
        };
        schema_ok && wildcard(&self.name, name)
    }

    /// Whether some relation of `schema` may match (for a statement that
    /// touches every relation of a schema).
    pub fn may_match_in(&self, schema: &str) -> bool {
        self.schema.as_ref().is_none_or(|p| wildcard(p, schema))
    }

    /// Whether every relation of `schema` matches.
    pub fn matches_all_of(&self, schema: &str) -> bool {
        self.may_match_in(schema) && matches!(self.name.as_slice(), [Segment::Star])
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `*`-only wildcard matching over literal segments.
fn wildcard(pattern: &[Segment], s: &str) -> bool {
    match pattern.split_first() {
        None => s.is_empty(),
        Some((Segment::Literal(l), rest)) => s.strip_prefix(l.as_str()).is_some_and(|r| wildcard(rest, r)),
        Some((Segment::Star, rest)) => {
            if rest.is_empty() {
                return true;
            }
            s.char_indices().map(|(i, _)| i).chain([s.len()]).any(|i| wildcard(rest, &s[i..]))
        }
    }
}

/// Largest push (request body) a git target buffers when its rule sets no
/// `max_body`: the pack is read whole before anything is forwarded.
pub const DEFAULT_GIT_MAX_BODY: u64 = 100 << 20;

/// The git side of a rule: `[[roles.rules.repos]]` entries, first match
/// wins, and the largest push buffered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GitRule {
    pub repos: Vec<RepoRule>,
    pub max_body: u64,
}

/// What a role may do to the repositories whose path matches `path`.
#[derive(Debug, Clone, Serialize)]
pub struct RepoRule {
    /// Position in the rule's `repos` list.
    pub index: usize,
    /// Glob on the repository path (`org/*.git`, `**`).
    pub path: GitGlob,
    /// Whether fetch and clone (upload-pack) are allowed.
    pub fetch: bool,
    /// Refs that may be created, updated (fast-forward) or deleted.
    pub create: Vec<GitGlob>,
    pub update: Vec<GitGlob>,
    pub delete: Vec<GitGlob>,
    /// Refs whose every change is held for approval (when otherwise allowed).
    pub approve: Vec<GitGlob>,
    /// What a non-fast-forward update of a ref in `update` gets.
    pub force: ForcePolicy,
    /// Push options (`git push -o ...`) a push may carry; any other denies
    /// the push (forges act on them: GitLab's `merge_request.*` can merge
    /// into a branch no ref rule lets the caller update, `ci.skip` skips
    /// the checks).
    pub push_options: Vec<GitGlob>,
}

impl RepoRule {
    /// Whether the entry lets anything be pushed at all.
    pub fn can_push(&self) -> bool {
        !(self.create.is_empty() && self.update.is_empty() && self.delete.is_empty())
    }
}

/// How force pushes (updates not proven fast-forward) are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForcePolicy {
    Allow,
    Deny,
    Approve,
}

/// A glob over a repository path or a ref name: `*` within one `/`
/// component, `**` across them.
#[derive(Debug, Clone, Serialize)]
pub struct GitGlob {
    /// As written in the policy.
    pub text: String,
    #[serde(skip)]
    pub glob: GlobMatcher,
}

impl GitGlob {
    pub fn new(text: &str) -> Result<GitGlob, String> {
        GitGlob::build(text, true)
    }
    /// A glob whose `*` matches any run of characters, `/` included (for
    /// push options, which are not paths).
    pub fn any_chars(text: &str) -> Result<GitGlob, String> {
        GitGlob::build(text, false)
    }
    fn build(text: &str, within_parts: bool) -> Result<GitGlob, String> {
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(within_parts)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("bad pattern `{text}`: {e}"))?
            .compile_matcher();
        Ok(GitGlob { text: text.to_string(), glob })
    }
    pub fn matches(&self, s: &str) -> bool {
        self.glob.is_match(s)
    }
}
