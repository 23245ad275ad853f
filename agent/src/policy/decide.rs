//! The decision: a pure function of (policy, subject, target, request).
//! No I/O and no clock, so it is tested exhaustively here and
//! `portcullis policy explain` runs exactly this code.
use std::{fmt, time::Duration};

use serde::Serialize;

use super::model::*;

/// Who is asking, as established from the kernel's record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Subject {
    /// Name of the guarded scope the caller's cgroup is in.
    pub scope: Option<String>,
    /// systemd unit of the caller's cgroup, when under systemd.
    pub unit: Option<String>,
    /// cgroup path relative to the cgroup2 mount, without leading `/`.
    pub cgroup: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    /// Hold for a human's approval.
    Approve,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Approve => "approve",
            Verdict::Deny => "deny",
        })
    }
}

/// The outcome and the rule behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub role: Option<String>,
    /// `roles.<role>.rules[<n>]`, or why no rule applied.
    pub rule: String,
    /// Human-readable reason, shown to the caller and in the audit log.
    pub reason: String,
    /// Maskers of the rule (for `Allow`).
    pub mask: Vec<String>,
    #[serde(skip)]
    pub approval_timeout: Duration,
}

impl Decision {
    pub fn deny(role: Option<&str>, rule: impl Into<String>, reason: impl Into<String>) -> Decision {
        Decision {
            verdict: Verdict::Deny,
            role: role.map(str::to_string),
            rule: rule.into(),
            reason: reason.into(),
            mask: Vec::new(),
            approval_timeout: DEFAULT_APPROVAL_TIMEOUT,
        }
    }
    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} by {}: {}", self.verdict, self.rule, self.reason)
    }
}

/// The binding that gives `subject` its role: the first that matches, in
/// file order.
pub fn binding_for<'p>(policy: &'p Policy, subject: &Subject) -> Option<&'p Binding> {
    policy.bindings.iter().find(|b| match &b.selector {
        Selector::Scope(s) => subject.scope.as_deref() == Some(s.as_str()),
        Selector::Unit { glob, .. } => subject.unit.as_deref().is_some_and(|u| glob.is_match(u)),
        Selector::Cgroup { glob, .. } => glob.is_match(subject.cgroup.trim_start_matches('/')),
    })
}

pub fn role_for<'p>(policy: &'p Policy, subject: &Subject) -> Option<&'p Role> {
    binding_for(policy, subject).and_then(|b| policy.role(&b.role))
}

/// Whether `role` may open a session to `target` at all (the first check on
/// every connection, whatever its protocol).
pub fn decide_session(policy: &Policy, role: Option<&str>, target: &Target) -> Decision {
    match rule_of(policy, role, target) {
        Err(d) => d,
        Ok((role, rule)) => Decision {
            verdict: Verdict::Allow,
            role: Some(role.name.clone()),
            rule: rule_ref(role, rule),
            reason: format!("role {} has a rule for target {}", role.name, target.name),
            mask: rule.mask.clone(),
            approval_timeout: rule.approval_timeout,
        },
    }
}

/// Decides a request of the given classes. A request is as dangerous as
/// its worst class: any deny denies, else any approve holds it.
pub fn decide_classes(policy: &Policy, role: Option<&str>, target: &Target, classes: &[&str]) -> Decision {
    let (role, rule) = match rule_of(policy, role, target) {
        Err(d) => return d,
        Ok(x) => x,
    };
    decide_with_rule(role, rule, classes)
}

fn decide_with_rule(role: &Role, rule: &Rule, classes: &[&str]) -> Decision {
    if classes.is_empty() {
        // Nothing recognisable: fail closed.
        return Decision::deny(Some(&role.name), rule_ref(role, rule), "request has no class");
    }
    let mut worst: Option<(Verdict, String)> = None;
    for class in classes {
        let (verdict, why) = class_verdict(rule, class);
        if worst.as_ref().is_none_or(|(v, _)| verdict > *v) {
            worst = Some((verdict, why));
        }
    }
    let (verdict, reason) = worst.expect("classes is not empty");
    Decision {
        verdict,
        role: Some(role.name.clone()),
        rule: rule_ref(role, rule),
        reason,
        mask: rule.mask.clone(),
        approval_timeout: rule.approval_timeout,
    }
}

/// A PostgreSQL statement as the decision sees it: its own classes, the
/// tables it touches and the functions it calls (`schema.name`, each with
/// the class calling it carries, `None` for a built-in that only reads).
#[derive(Debug, Clone, Default)]
pub struct SqlRequest<'a> {
    pub classes: Vec<&'a str>,
    pub tables: Vec<&'a str>,
    pub functions: Vec<(&'a str, Option<&'a str>)>,
}

/// Decides a PostgreSQL statement: a function in `deny_functions` or a table
/// in `deny_tables` (or outside a non-empty `allow_tables`) denies it; then
/// its classes decide as in [`decide_classes`], where a function matching
/// `allow_functions` adds no class of its own.
pub fn decide_sql(policy: &Policy, role: Option<&str>, target: &Target, req: &SqlRequest<'_>) -> Decision {
    let (role, rule) = match rule_of(policy, role, target) {
        Err(d) => return d,
        Ok(x) => x,
    };
    let deny = |reason: String| Decision {
        verdict: Verdict::Deny,
        role: Some(role.name.clone()),
        rule: rule_ref(role, rule),
        reason,
        mask: Vec::new(),
        approval_timeout: rule.approval_timeout,
    };
    // A reported `schema.name` is read every way it splits (a quoted name
    // may hold a dot): denied if any reading is, allowed or trusted only if
    // every reading is.
    for (f, _) in &req.functions {
        if let Some(p) = readings(f).find_map(|(s, n)| rule.deny_functions.iter().find(|p| p.matches_parts(s, n))) {
            return deny(format!("function {f} matches deny_functions \"{p}\""));
        }
    }
    for t in &req.tables {
        for (schema, name) in readings(t) {
            // `schema.*`: every relation of the schema (GRANT ... ON ALL
            // TABLES IN SCHEMA, DROP SCHEMA), so any table of it a rule
            // names. A table that is really called `*` is decided the same
            // way, which is stricter.
            if let (Some(schema), "*") = (schema, name) {
                if let Some(p) = rule.deny_tables.iter().find(|p| p.may_match_in(schema)) {
                    return deny(format!("{t} (every table of schema {schema}) may take in deny_tables \"{p}\""));
                }
                if !rule.allow_tables.is_empty() && !rule.allow_tables.iter().any(|p| p.matches_all_of(schema)) {
                    return deny(format!("{t} (every table of schema {schema}) is not all in allow_tables"));
                }
                continue;
            }
            if let Some(p) = rule.deny_tables.iter().find(|p| p.matches_parts(schema, name)) {
                return deny(format!("table {t} matches deny_tables \"{p}\""));
            }
            if !rule.allow_tables.is_empty() && !rule.allow_tables.iter().any(|p| p.matches_parts(schema, name)) {
                return deny(format!("table {t} is not in allow_tables"));
            }
        }
    }
    let mut classes = req.classes.clone();
    for (f, class) in &req.functions {
        if let Some(c) = class {
            let trusted = readings(f).all(|(s, n)| rule.allow_functions.iter().any(|p| p.matches_parts(s, n)));
            if !trusted && !classes.contains(c) {
                classes.push(c);
            }
        }
    }
    decide_with_rule(role, rule, &classes)
}

/// The (schema, name) readings of a reported name: one per dot it holds,
/// or the bare name.
fn readings(qualified: &str) -> impl Iterator<Item = (Option<&str>, &str)> {
    let dots = qualified.match_indices('.').map(move |(i, _)| (Some(&qualified[..i]), &qualified[i + 1..]));
    let bare = (!qualified.contains('.')).then_some((None, qualified));
    dots.chain(bare)
}

/// A class named explicitly wins over `*`; among explicit (and among `*`)
/// entries deny beats approve beats allow; a class no list names is denied.
pub fn class_verdict(rule: &Rule, class: &str) -> (Verdict, String) {
    let lists = [(Verdict::Deny, &rule.deny), (Verdict::Approve, &rule.approve), (Verdict::Allow, &rule.allow)];
    for (verdict, list) in lists {
        if list.iter().any(|c| c == class) {
            return (verdict, format!("{class} is in {}", list_name(verdict)));
        }
    }
    for (verdict, list) in lists {
        if list.iter().any(|c| c == "*") {
            return (verdict, format!("{class} falls under \"*\" in {}", list_name(verdict)));
        }
    }
    (Verdict::Deny, format!("{class} is not allowed (default deny)"))
}

fn list_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Approve => "approve",
        Verdict::Deny => "deny",
    }
}

/// An HTTP request as the decision sees it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The normalised path, without the query.
    pub path: &'a str,
    /// The declared body length, when the request declares one.
    pub content_length: Option<u64>,
    /// A WebSocket upgrade.
    pub websocket: bool,
}

/// The decision on an HTTP request and the limits that apply while it is
/// forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpDecision {
    pub decision: Decision,
    /// Largest body to forward; a streamed body that grows past it is cut.
    pub max_body: Option<u64>,
    /// Denied because the declared body is over `max_body` (413, not 403).
    pub too_large: bool,
    /// The rule entry that decided (as written), if one did.
    pub matched: Option<String>,
    /// How a held request is answered (for `Approve`).
    pub approval_response: ApprovalResponse,
}

/// Decides an HTTP request. The entries of the role's rule that cover the
/// request's method and path compete by specificity: a path-scoped entry
/// (`GET /repos/**`) beats a class (`GET`, `read`), which beats `*`; among
/// equally specific entries deny beats approve beats allow. No entry:
/// denied. Then the rule's limits: a WebSocket upgrade needs
/// `websocket = true`, a declared body must fit `max_body`. TRACE and
/// CONNECT are never forwarded.
pub fn decide_http(policy: &Policy, role: Option<&str>, target: &Target, req: &HttpRequest<'_>) -> HttpDecision {
    let plain = |decision| HttpDecision {
        decision,
        max_body: None,
        too_large: false,
        matched: None,
        approval_response: ApprovalResponse::Hold,
    };
    let (role, rule) = match rule_of(policy, role, target) {
        Err(d) => return plain(d),
        Ok(x) => x,
    };
    let rref = rule_ref(role, rule);
    let deny = |reason: String| Decision::deny(Some(&role.name), rref.clone(), reason);
    let Some(http) = rule.http.as_ref() else {
        return plain(deny(format!("target {} is not an http target", target.name)));
    };
    let shown = format!("{} {}", req.method, req.path);
    if matches!(req.method, "TRACE" | "CONNECT") {
        return plain(deny(format!("{} is never forwarded", req.method)));
    }
    let lists = [(Verdict::Deny, &http.deny), (Verdict::Approve, &http.approve), (Verdict::Allow, &http.allow)];
    // Deny entries match the path as any server may read it, allow and
    // approve entries as it is forwarded: when in doubt, the stricter.
    let loose = loose_path(req.path);
    let mut best: Option<(u8, Verdict, &HttpPattern)> = None;
    for (verdict, list) in lists {
        let covers = |p: &&HttpPattern| match verdict {
            Verdict::Deny => p.matches_loosely(req.method, req.path, &loose),
            _ => p.matches(req.method, req.path),
        };
        for p in list.iter().filter(covers) {
            // Higher rank wins; at equal rank the first list (deny) stays.
            if best.is_none_or(|(r, _, _)| p.rank() > r) {
                best = Some((p.rank(), verdict, p));
            }
        }
    }
    // An approve entry that covers another reading of the path holds what
    // would be allowed; it never turns a denial into a question.
    if let Some((_, Verdict::Allow, _)) = best {
        if let Some(p) = http.approve.iter().find(|p| p.matches_loosely(req.method, req.path, &loose)) {
            best = Some((p.rank(), Verdict::Approve, p));
        }
    }
    let (mut verdict, mut reason) = match best {
        None => (Verdict::Deny, format!("{shown} is not allowed (default deny)")),
        Some((_, v, p)) => (v, format!("{shown} matches \"{}\" in {}", p.text, list_name(v))),
    };
    let mut too_large = false;
    if verdict != Verdict::Deny {
        if req.websocket && !http.websocket {
            verdict = Verdict::Deny;
            reason = format!("{shown}: WebSocket upgrades are not allowed (websocket = false)");
        } else if let (Some(len), Some(max)) = (req.content_length, http.max_body) {
            if len > max {
                verdict = Verdict::Deny;
                too_large = true;
                reason = format!("{shown}: request body of {len} bytes is over max_body ({max} bytes)");
            }
        }
    }
    HttpDecision {
        decision: Decision {
            verdict,
            role: Some(role.name.clone()),
            rule: rref,
            reason,
            mask: rule.mask.clone(),
            approval_timeout: rule.approval_timeout,
        },
        max_body: http.max_body,
        too_large,
        matched: best.map(|(_, _, p)| p.text.clone()),
        approval_response: http.approval_response,
    }
}

/// The two services of git's smart HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GitService {
    /// `git-upload-pack`: fetch, clone, ls-remote.
    UploadPack,
    /// `git-receive-pack`: push.
    ReceivePack,
}

impl GitService {
    pub fn name(self) -> &'static str {
        match self {
            GitService::UploadPack => "git-upload-pack",
            GitService::ReceivePack => "git-receive-pack",
        }
    }
    pub fn parse(s: &str) -> Option<GitService> {
        match s {
            "git-upload-pack" => Some(GitService::UploadPack),
            "git-receive-pack" => Some(GitService::ReceivePack),
            _ => None,
        }
    }
}

/// What one command of a push does to its ref.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefKind {
    Create,
    /// An update proven fast-forward.
    Update,
    /// An update not proven fast-forward.
    Force,
    Delete,
}

impl RefKind {
    pub fn name(self) -> &'static str {
        match self {
            RefKind::Create => "create",
            RefKind::Update => "update",
            RefKind::Force => "force",
            RefKind::Delete => "delete",
        }
    }
}

/// A git request as the decision sees it. A push with no ref changes is
/// the ref discovery before a push (or git's probe).
#[derive(Debug, Clone)]
pub struct GitRequest<'a> {
    pub service: GitService,
    /// The repository path (`org/app.git`), without a leading `/`.
    pub repo: &'a str,
    pub refs: &'a [(&'a str, RefKind)],
    /// A push's options (`git push -o ...`).
    pub push_options: &'a [&'a str],
}

/// The decision on a git request: overall (the worst of its refs) and per
/// ref, in the request's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitDecision {
    pub decision: Decision,
    pub refs: Vec<Decision>,
    /// Largest push buffered.
    pub max_body: u64,
}

/// Decides a git request under every name the server may serve its
/// repository path as (see [`repo_readings`]): the worst decision among
/// the names that some `repos` entry covers stands, so `org/locked`,
/// `org/locked/.git` or `Org/Locked.git` get no more than `org/locked.git`.
pub fn decide_git(policy: &Policy, role: Option<&str>, target: &Target, req: &GitRequest<'_>) -> GitDecision {
    let mut worst: Option<GitDecision> = None;
    let mut unmatched = None;
    for repo in repo_readings(req.repo) {
        let (d, matched) = decide_git_as(policy, role, target, &GitRequest { repo: &repo, ..*req });
        if !matched {
            // A name no entry covers says nothing: the entry for another
            // name of the same repository decides.
            unmatched.get_or_insert(d);
        } else if worst.as_ref().is_none_or(|w| d.decision.verdict > w.decision.verdict) {
            worst = Some(d);
        }
    }
    worst.or(unmatched).expect("the path as written is a reading")
}

/// The paths a server may serve a request for `repo` from: git's own
/// lookup tries `X/.git`, `X`, `X.git/.git` and `X.git` in turn, a trailing
/// `/` changes nothing, and forges ignore case. The path as written comes
/// first.
pub fn repo_readings(repo: &str) -> Vec<String> {
    let base = repo.trim_end_matches('/');
    let stem = base.strip_suffix("/.git").or_else(|| base.strip_suffix(".git")).unwrap_or(base);
    let mut out: Vec<String> = Vec::with_capacity(8);
    for r in
        [repo.to_string(), stem.to_string(), format!("{stem}.git"), format!("{stem}/.git"), format!("{stem}.git/.git")]
    {
        for r in [r.to_ascii_lowercase(), r] {
            if !r.is_empty() && !out.contains(&r) {
                out.push(r);
            }
        }
    }
    // As written first.
    if let Some(i) = out.iter().position(|r| r == repo) {
        let r = out.remove(i);
        out.insert(0, r);
    }
    out
}

/// Decides a git request for one reading of its repository path; also
/// says whether some `repos` entry covered it. The first `repos` entry
/// whose path matches the repository decides (none: denied). Fetch needs `fetch = true`; the ref
/// discovery before a push needs some push right. Each ref change needs
/// its ref in `create`, `update` or `delete` by kind; a force push needs
/// the ref in `update` and then gets `force` (allow, deny, approve); an
/// allowed change to a ref in `approve` is held. A push is as dangerous as
/// its worst ref.
fn decide_git_as(policy: &Policy, role: Option<&str>, target: &Target, req: &GitRequest<'_>) -> (GitDecision, bool) {
    let plain = |decision| (GitDecision { decision, refs: Vec::new(), max_body: DEFAULT_GIT_MAX_BODY }, true);
    let (role, rule) = match rule_of(policy, role, target) {
        Err(d) => return plain(d),
        Ok(x) => x,
    };
    let rref = rule_ref(role, rule);
    let Some(git) = rule.git.as_ref() else {
        return plain(Decision::deny(Some(&role.name), rref, format!("target {} is not a git target", target.name)));
    };
    let timeout = rule.approval_timeout;
    let decision = |verdict, at: String, reason: String| Decision {
        verdict,
        role: Some(role.name.clone()),
        rule: at,
        reason,
        mask: Vec::new(),
        approval_timeout: timeout,
    };
    let out = |d: Decision, refs| (GitDecision { decision: d, refs, max_body: git.max_body }, true);
    let Some(repo) = git.repos.iter().find(|r| r.path.matches(req.repo)) else {
        let d =
            decision(Verdict::Deny, rref, format!("repository {} matches no `repos` entry (default deny)", req.repo));
        return (GitDecision { decision: d, refs: Vec::new(), max_body: git.max_body }, false);
    };
    let rref = format!("{rref}.repos[{}]", repo.index);
    match req.service {
        GitService::UploadPack => {
            let d = if repo.fetch {
                decision(Verdict::Allow, rref, format!("fetch from {} is allowed", req.repo))
            } else {
                decision(Verdict::Deny, rref, format!("fetch from {} is not allowed (fetch = false)", req.repo))
            };
            return out(d, Vec::new());
        }
        GitService::ReceivePack if req.refs.is_empty() => {
            let d = if repo.can_push() {
                decision(Verdict::Allow, rref, format!("push to {} may be allowed", req.repo))
            } else {
                decision(Verdict::Deny, rref, format!("no ref of {} may be pushed", req.repo))
            };
            return out(d, Vec::new());
        }
        GitService::ReceivePack => {}
    }
    let find = |list: &[GitGlob], name: &str| list.iter().find(|g| g.matches(name)).map(|g| g.text.clone());
    let mut refs = Vec::new();
    for &(name, kind) in req.refs {
        let (list, key) = match kind {
            RefKind::Create => (&repo.create, "create"),
            RefKind::Update | RefKind::Force => (&repo.update, "update"),
            RefKind::Delete => (&repo.delete, "delete"),
        };
        let (mut verdict, mut reason) = match find(list, name) {
            None => (Verdict::Deny, format!("{} of {name} is not allowed ({name} is not in {key})", kind.name())),
            Some(g) => (Verdict::Allow, format!("{} of {name} matches \"{g}\" in {key}", kind.name())),
        };
        if verdict == Verdict::Allow && kind == RefKind::Force {
            match repo.force {
                ForcePolicy::Allow => reason = format!("force push to {name} is allowed (force = allow)"),
                ForcePolicy::Deny => {
                    verdict = Verdict::Deny;
                    reason = format!("force push to {name} is not allowed (force = deny)");
                }
                ForcePolicy::Approve => {
                    verdict = Verdict::Approve;
                    reason = format!("force push to {name} needs approval (force = approve)");
                }
            }
        }
        if verdict == Verdict::Allow {
            if let Some(g) = find(&repo.approve, name) {
                verdict = Verdict::Approve;
                reason = format!("{} of {name} needs approval (\"{g}\" in approve)", kind.name());
            }
        }
        refs.push(decision(verdict, rref.clone(), reason));
    }
    // An option no entry lets through denies the push, every ref of it.
    if let Some(o) = req.push_options.iter().find(|o| !repo.push_options.iter().any(|g| g.matches(o))) {
        let reason = format!("push option `{o}` is not in push_options");
        for d in &mut refs {
            d.verdict = Verdict::Deny;
            d.reason.clone_from(&reason);
        }
    }
    let worst = refs.iter().max_by_key(|d| d.verdict).cloned().expect("refs is not empty");
    // The first ref with the worst verdict explains the push.
    let first = refs.iter().find(|d| d.verdict == worst.verdict).cloned().expect("present");
    out(first, refs)
}

pub fn rule_ref(role: &Role, rule: &Rule) -> String {
    format!("roles.{}.rules[{}]", role.name, rule.index)
}

/// Why an open session to `dst` may no longer continue under `policy`, or
/// None if it may: its destination must still select the same kind of
/// target and its role must still be admitted (for opaque `tcp`: its
/// `connect` class; a held-and-approved connection stays while its rule
/// still says approve).
pub fn revalidate(policy: &Policy, session: &SessionSeen<'_>) -> Option<String> {
    let SessionSeen { subject, dst, approved, role: was_role, target: was_target } = *session;
    let Some(target) = policy.target_for(dst) else {
        return Some(format!("{dst} no longer matches a target"));
    };
    let role = role_for(policy, subject).map(|r| r.name.clone());
    // The session goes on deciding with the role and target it was opened
    // with: if either is no longer what the caller would get, it ends.
    if role.as_deref() != was_role {
        return Some(format!(
            "the caller's role is now {} (the session has {})",
            role.as_deref().unwrap_or("none"),
            was_role.unwrap_or("none")
        ));
    }
    if target.name != was_target {
        return Some(format!("{dst} is now target {} (the session has {was_target})", target.name));
    }
    let d = if target.protocol == Protocol::Tcp {
        decide_classes(policy, role.as_deref(), target, &["connect"])
    } else {
        decide_session(policy, role.as_deref(), target)
    };
    match d.verdict {
        Verdict::Allow => None,
        Verdict::Approve if approved => None,
        _ => Some(format!("{} ({})", d.reason, d.rule)),
    }
}

/// An open session as [`revalidate`] sees it.
#[derive(Clone, Copy)]
pub struct SessionSeen<'a> {
    pub subject: &'a Subject,
    pub dst: std::net::SocketAddr,
    /// Admitted by a human's approval.
    pub approved: bool,
    /// The role and target it was opened with.
    pub role: Option<&'a str>,
    pub target: &'a str,
}

/// The role's rule for `target`, or the denial that applies when there is
/// none.
pub fn rule_of<'p>(policy: &'p Policy, role: Option<&str>, target: &Target) -> Result<(&'p Role, &'p Rule), Decision> {
    let Some(role_name) = role else {
        return Err(Decision::deny(None, "bindings", "no binding gives this caller a role"));
    };
    let Some(role) = policy.role(role_name) else {
        return Err(Decision::deny(Some(role_name), "roles", format!("role {role_name} is not defined")));
    };
    let Some(rule) = role.rule_for(&target.name) else {
        return Err(Decision::deny(
            Some(role_name),
            format!("roles.{role_name}"),
            format!("role {role_name} has no rule for target {}", target.name),
        ));
    };
    Ok((role, rule))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load::parse;

    const POLICY: &str = r#"
version = 1

[[scopes]]
name = "ci"
cgroup = "portcullis.slice/ci"
egress = "deny"
allow = ["127.0.0.53:53/udp"]

[[scopes]]
name = "lab"
cgroup = "portcullis.slice/lab"

[[targets]]
name = "db"
protocol = "postgres"
match = ["127.0.0.53:5432"]
upstream = "127.0.0.1:5432"

[[targets]]
name = "cache"
protocol = "tcp"
match = ["127.0.0.54:6379"]

[[targets]]
name = "any"
protocol = "tcp"
match = ["*"]

[[roles]]
name = "reader"
[[roles.rules]]
target = "db"
allow = ["read", "session"]
approve = ["ddl"]
deny = ["*"]
mask = ["detector:email"]

[[roles]]
name = "ops"
[[roles.rules]]
target = "db"
allow = ["*"]
deny = ["dcl"]
[[roles.rules]]
target = "cache"
allow = ["connect"]

[[bindings]]
unit = "runner-*.service"
role = "ops"

[[bindings]]
scope = "ci"
role = "reader"

[[bindings]]
cgroup = "portcullis.slice/lab/**"
role = "ops"

[[bindings]]
cgroup = "portcullis.slice/*-admin"
role = "ops"
"#;

    fn policy() -> Policy {
        parse(POLICY).expect("test policy parses")
    }

    fn subject(scope: Option<&str>, unit: Option<&str>, cgroup: &str) -> Subject {
        Subject { scope: scope.map(Into::into), unit: unit.map(Into::into), cgroup: cgroup.into() }
    }

    #[test]
    fn bindings_match_in_file_order() {
        let p = policy();
        let s = subject(Some("ci"), Some("runner-1.service"), "portcullis.slice/ci/runner-1.service");
        assert_eq!(role_for(&p, &s).unwrap().name, "ops", "the unit binding comes first");
        let s = subject(Some("ci"), None, "portcullis.slice/ci");
        assert_eq!(role_for(&p, &s).unwrap().name, "reader");
        let s = subject(Some("lab"), None, "portcullis.slice/lab/job-7");
        assert_eq!(role_for(&p, &s).unwrap().name, "ops");
        let s = subject(Some("lab"), None, "portcullis.slice/lab");
        assert!(role_for(&p, &s).is_none(), "`**` under lab needs a child cgroup");
        let s = subject(None, None, "system.slice/other.service");
        assert!(role_for(&p, &s).is_none());
        // `*` stays within one level.
        let s = subject(None, None, "portcullis.slice/db-admin");
        assert_eq!(role_for(&p, &s).unwrap().name, "ops");
        let s = subject(None, None, "portcullis.slice/low.service/x-admin");
        assert!(role_for(&p, &s).is_none(), "`*` does not cross a `/`");
    }

    #[test]
    fn a_session_ends_when_its_role_or_target_is_no_longer_the_callers() {
        let p = policy();
        let s = subject(Some("ci"), Some("runner-1.service"), "portcullis.slice/ci/runner-1.service");
        let dst = "127.0.0.53:5432".parse().unwrap();
        let seen = |role, target| SessionSeen { subject: &s, dst, approved: false, role, target };
        // Opened as ops on db (what the bindings give): it stays.
        assert_eq!(role_for(&p, &s).unwrap().name, "ops");
        assert_eq!(revalidate(&p, &seen(Some("ops"), "db")), None);
        // Opened as reader (before a reload rebound the unit): it ends,
        // though reader may use db too.
        let r = revalidate(&p, &seen(Some("reader"), "db")).expect("revoked");
        assert!(r.contains("role is now ops"), "{r}");
        // Opened on another target that the address no longer maps to.
        let r = revalidate(&p, &seen(Some("ops"), "old-db")).expect("revoked");
        assert!(r.contains("now target db"), "{r}");
    }

    #[test]
    fn no_role_or_no_rule_is_denied() {
        let p = policy();
        let db = p.target("db").unwrap();
        let d = decide_session(&p, None, db);
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(d.reason.contains("no binding"));
        let cache = p.target("cache").unwrap();
        let d = decide_session(&p, Some("reader"), cache);
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.rule, "roles.reader");
        let d = decide_classes(&p, Some("ghost"), cache, &["connect"]);
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(d.reason.contains("not defined"));
    }

    #[test]
    fn explicit_classes_beat_the_wildcard() {
        let p = policy();
        let db = p.target("db").unwrap();
        let v = |role: &str, classes: &[&str]| decide_classes(&p, Some(role), db, classes).verdict;
        assert_eq!(v("reader", &["read"]), Verdict::Allow);
        assert_eq!(v("reader", &["ddl"]), Verdict::Approve);
        assert_eq!(v("reader", &["write"]), Verdict::Deny);
        assert_eq!(v("ops", &["write"]), Verdict::Allow);
        assert_eq!(v("ops", &["dcl"]), Verdict::Deny);
        let d = decide_classes(&p, Some("reader"), db, &["read"]);
        assert_eq!(d.rule, "roles.reader.rules[0]");
        assert_eq!(d.mask, vec!["detector:email".to_string()]);
    }

    #[test]
    fn worst_class_wins() {
        let p = policy();
        let db = p.target("db").unwrap();
        let v = |classes: &[&str]| decide_classes(&p, Some("reader"), db, classes).verdict;
        assert_eq!(v(&["read", "ddl"]), Verdict::Approve);
        assert_eq!(v(&["read", "ddl", "write"]), Verdict::Deny);
        assert_eq!(v(&["write", "read"]), Verdict::Deny);
        assert_eq!(v(&[]), Verdict::Deny, "a request without a class is denied");
    }

    #[test]
    fn unlisted_class_is_denied_without_a_wildcard() {
        let p = policy();
        let cache = p.target("cache").unwrap();
        assert_eq!(decide_classes(&p, Some("ops"), cache, &["connect"]).verdict, Verdict::Allow);
        let mut rule = p.role("ops").unwrap().rule_for("cache").unwrap().clone();
        rule.allow.clear();
        let (v, why) = class_verdict(&rule, "connect");
        assert_eq!(v, Verdict::Deny);
        assert!(why.contains("default deny"));
    }

    const HTTP_POLICY: &str = r#"
version = 1

[[targets]]
name = "api"
protocol = "http"
match = ["127.1.0.1:443"]
hosts = ["api.example.test"]

[[targets]]
name = "db"
protocol = "postgres"
match = ["127.0.0.53:5432"]

[[roles]]
name = "agent"
[[roles.rules]]
target = "api"
allow = ["read", "POST /repos/*/issues", "* /repos/*/wiki/**"]
approve = ["PUT /repos/*/releases/**"]
deny = ["DELETE", "* /admin/**", "GET /repos/*/wiki/secret/**"]
max_body = "1KiB"
[[roles.rules]]
target = "db"
allow = ["read"]

[[roles]]
name = "ws"
[[roles.rules]]
target = "api"
allow = ["*"]
deny = ["read /private/**"]
websocket = true

[[roles]]
name = "empty"
[[roles.rules]]
target = "api"

[[roles]]
name = "held"
[[roles.rules]]
target = "api"
allow = ["*"]
approve = ["PUT /repos/*/releases/**"]
"#;

    fn http(role: &str, method: &str, path: &str) -> HttpDecision {
        let p = parse(HTTP_POLICY).expect("http policy parses");
        let t = p.target("api").unwrap().clone();
        decide_http(&p, Some(role), &t, &HttpRequest { method, path, content_length: None, websocket: false })
    }

    #[test]
    fn http_paths_beat_classes_which_beat_the_wildcard() {
        let v = |role: &str, m: &str, path: &str| http(role, m, path).decision.verdict;
        assert_eq!(v("agent", "GET", "/repos/a"), Verdict::Allow, "read");
        assert_eq!(v("agent", "HEAD", "/"), Verdict::Allow);
        assert_eq!(v("agent", "POST", "/repos/a/issues"), Verdict::Allow);
        assert_eq!(v("agent", "POST", "/repos/a/b/issues"), Verdict::Deny, "`*` stays within one segment");
        assert_eq!(v("agent", "POST", "/repos/a/pulls"), Verdict::Deny, "default deny");
        assert_eq!(v("agent", "PUT", "/repos/a/releases/1"), Verdict::Approve);
        assert_eq!(v("agent", "DELETE", "/repos/a/issues"), Verdict::Deny);
        assert_eq!(v("agent", "GET", "/admin/users"), Verdict::Deny, "a path-scoped deny beats the read class");
        assert_eq!(
            v("agent", "DELETE", "/repos/a/wiki/page"),
            Verdict::Allow,
            "a path-scoped allow beats a class deny"
        );
        assert_eq!(v("agent", "GET", "/repos/a/wiki/secret/x"), Verdict::Deny, "equal rank: deny wins");
        assert_eq!(v("ws", "PATCH", "/anything"), Verdict::Allow, "`*`");
        assert_eq!(v("ws", "GET", "/private/x"), Verdict::Deny);
        assert_eq!(v("ws", "POST", "/private/x"), Verdict::Allow, "read covers GET, HEAD, OPTIONS only");
        assert_eq!(v("empty", "GET", "/"), Verdict::Deny);
        assert_eq!(v("nobody", "GET", "/"), Verdict::Deny);
        let d = http("agent", "PUT", "/repos/a/releases/1").decision;
        assert_eq!(d.rule, "roles.agent.rules[0]");
        assert!(d.reason.contains("\"PUT /repos/*/releases/**\" in approve"), "{}", d.reason);
    }

    #[test]
    fn http_deny_and_approve_match_every_reading_of_the_path_allow_only_one() {
        let v = |role: &str, m: &str, path: &str| http(role, m, path).decision.verdict;
        for path in
            ["/Admin/users", "/ADMIN/USERS", "/admin;jsessionid=1/users", "/admin%2Fusers", "/admin/users/", "/admin"]
        {
            assert_eq!(v("agent", "GET", path), Verdict::Deny, "{path}");
        }
        assert_eq!(v("agent", "GET", "/repos/a/wiki/Secret/x"), Verdict::Deny, "deny beats an allow of equal rank");
        assert_eq!(v("agent", "GET", "/repos/a/wiki/secret;v=2/x"), Verdict::Deny);
        assert_eq!(v("ws", "GET", "/Private/x"), Verdict::Deny);
        // An approve entry holds what another reading would let through,
        // and turns no denial into a question.
        assert_eq!(v("ws", "PUT", "/repos/a/RELEASES/1"), Verdict::Allow, "no approve entry for ws");
        assert_eq!(v("held", "PUT", "/repos/a/RELEASES/1"), Verdict::Approve);
        assert_eq!(v("held", "PUT", "/repos/a/releases;x/1"), Verdict::Approve);
        assert_eq!(v("agent", "PUT", "/repos/a/RELEASES/1"), Verdict::Deny, "default deny stays");
        // An allow entry covers the path as forwarded only.
        assert_eq!(v("agent", "POST", "/repos/a/issues"), Verdict::Allow);
        assert_eq!(v("agent", "POST", "/repos/a/Issues"), Verdict::Deny);
        assert_eq!(v("agent", "POST", "/repos/a/issues;x"), Verdict::Deny);
        // Names that only start alike are other paths.
        assert_eq!(v("agent", "GET", "/administrator"), Verdict::Allow);
        assert_eq!(loose_path("/a;x/b%2Fc%3Bd/"), "/a/b/c");
        assert_eq!(loose_path("/"), "/");
        assert_eq!(loose_path("/;x/"), "/");
    }

    #[test]
    fn trace_and_connect_are_never_forwarded() {
        for m in ["TRACE", "CONNECT"] {
            let d = http("ws", m, "/").decision;
            assert_eq!(d.verdict, Verdict::Deny, "{m}");
            assert!(d.reason.contains("never forwarded"));
        }
    }

    #[test]
    fn http_limits_body_size_and_upgrades() {
        let p = parse(HTTP_POLICY).unwrap();
        let t = p.target("api").unwrap();
        let req = |method, content_length, websocket| HttpRequest {
            method,
            path: "/repos/a/issues",
            content_length,
            websocket,
        };
        let d = decide_http(&p, Some("agent"), t, &req("POST", Some(1024), false));
        assert_eq!(d.decision.verdict, Verdict::Allow);
        assert_eq!(d.max_body, Some(1024));
        let d = decide_http(&p, Some("agent"), t, &req("POST", Some(1025), false));
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert!(d.too_large);
        let d = decide_http(&p, Some("agent"), t, &req("GET", None, true));
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert!(d.decision.reason.contains("WebSocket"));
        let d = decide_http(&p, Some("ws"), t, &req("GET", None, true));
        assert_eq!(d.decision.verdict, Verdict::Allow);
        assert_eq!(d.max_body, None);
        // A denial by pattern is not turned into a size denial.
        let d = decide_http(
            &p,
            Some("agent"),
            t,
            &HttpRequest { method: "DELETE", path: "/x", content_length: Some(9999), websocket: false },
        );
        assert!(!d.too_large);
    }

    #[test]
    fn http_decision_on_a_non_http_target_is_denied() {
        let p = parse(HTTP_POLICY).unwrap();
        let db = p.target("db").unwrap();
        let d = decide_http(
            &p,
            Some("agent"),
            db,
            &HttpRequest { method: "GET", path: "/", content_length: None, websocket: false },
        );
        assert_eq!(d.decision.verdict, Verdict::Deny);
    }

    fn sql_policy() -> Policy {
        let src = POLICY.replace(
            "mask = [\"detector:email\"]",
            "mask = [\"detector:email\"]\ndeny_tables = [\"public.secrets\", \"pg_catalog.pg_authid\", '\"a.b\".t']\nallow_functions = [\"public.report_*\"]\ndeny_functions = [\"pg_catalog.pg_sleep\"]",
        )
        .replace("allow = [\"*\"]\ndeny = [\"dcl\"]", "allow = [\"*\"]\ndeny = [\"dcl\"]\nallow_tables = [\"public.*\"]");
        parse(&src).expect("sql test policy parses")
    }

    #[test]
    fn sql_tables_and_functions() {
        let p = sql_policy();
        let db = p.target("db").unwrap();
        let req =
            |classes: &[&'static str], tables: &[&'static str], functions: &[(&'static str, Option<&'static str>)]| {
                SqlRequest { classes: classes.to_vec(), tables: tables.to_vec(), functions: functions.to_vec() }
            };
        let d = |role: &str, r: &SqlRequest<'_>| decide_sql(&p, Some(role), db, r);

        let ok = d("reader", &req(&["read"], &["public.orders"], &[("pg_catalog.lower", None)]));
        assert_eq!(ok.verdict, Verdict::Allow, "{ok}");
        let no = d("reader", &req(&["read"], &["public.orders", "public.secrets"], &[]));
        assert_eq!(no.verdict, Verdict::Deny);
        assert!(no.reason.contains("public.secrets") && no.reason.contains("deny_tables"), "{no}");
        assert_eq!(no.rule, "roles.reader.rules[0]");
        // A table deny beats an allowed class.
        assert_eq!(d("reader", &req(&["read"], &["pg_catalog.pg_authid"], &[])).verdict, Verdict::Deny);
        // Functions: their class counts unless allow-listed; deny-listed ones deny.
        let w = d("reader", &req(&["read"], &[], &[("public.my_fn", Some("function-call"))]));
        assert_eq!(w.verdict, Verdict::Deny);
        assert!(w.reason.contains("function-call"), "{w}");
        let trusted = d("reader", &req(&["read"], &[], &[("public.report_daily", Some("function-call"))]));
        assert_eq!(trusted.verdict, Verdict::Allow, "{trusted}");
        let slept = d("reader", &req(&["read"], &[], &[("pg_catalog.pg_sleep", Some("session"))]));
        assert_eq!(slept.verdict, Verdict::Deny);
        assert!(slept.reason.contains("deny_functions"), "{slept}");
        let nv = d("reader", &req(&["read"], &[], &[("pg_catalog.nextval", Some("write"))]));
        assert_eq!(nv.verdict, Verdict::Deny, "a write through a function is a write");
        // allow_tables: everything outside is denied.
        assert_eq!(d("ops", &req(&["write"], &["public.t"], &[])).verdict, Verdict::Allow);
        let out = d("ops", &req(&["read"], &["other.t"], &[]));
        assert_eq!(out.verdict, Verdict::Deny);
        assert!(out.reason.contains("not in allow_tables"), "{out}");
        // Every table of a schema (`GRANT ... ON ALL TABLES IN SCHEMA`): denied
        // if a denied table may be among them, or if allow_tables does not
        // take in the whole schema.
        let all = d("reader", &req(&["read"], &["public.*"], &[]));
        assert_eq!(all.verdict, Verdict::Deny, "{all}");
        assert!(all.reason.contains("public.secrets"), "{all}");
        assert_eq!(d("reader", &req(&["read"], &["other.*"], &[])).verdict, Verdict::Allow);
        assert_eq!(d("ops", &req(&["write"], &["public.*"], &[])).verdict, Verdict::Allow);
        assert_eq!(d("ops", &req(&["write"], &["other.*"], &[])).verdict, Verdict::Deny);
        // A name holding a dot is read every way it splits: `public.a.*` is
        // the table `a.*` of public or every table of a schema `public.a`
        // (not all in allow_tables); `a.b.t` may be `t` of the schema "a.b".
        assert_eq!(d("ops", &req(&["write"], &["public.a.*"], &[])).verdict, Verdict::Deny);
        assert_eq!(d("reader", &req(&["read"], &["public.a.*"], &[])).verdict, Verdict::Allow);
        let dotted = d("reader", &req(&["read"], &["a.b.t"], &[]));
        assert_eq!(dotted.verdict, Verdict::Deny, "{dotted}");
        assert_eq!(d("reader", &req(&["read"], &["a.b.*"], &[])).verdict, Verdict::Deny);
        assert_eq!(d("reader", &req(&["read"], &["a.bt"], &[])).verdict, Verdict::Allow);
        // Approval still holds, and still loses to a deny.
        assert_eq!(d("reader", &req(&["ddl"], &["public.t"], &[])).verdict, Verdict::Approve);
        assert_eq!(d("reader", &req(&["ddl"], &["public.secrets"], &[])).verdict, Verdict::Deny);
        assert_eq!(d("reader", &req(&[], &[], &[])).verdict, Verdict::Deny, "no class: denied");
    }

    const GIT_POLICY: &str = r#"
version = 1

[[targets]]
name = "forge"
protocol = "git"
match = ["127.1.0.2:443"]
hosts = ["git.example.test"]

[[roles]]
name = "agent"
[[roles.rules]]
target = "forge"
max_body = "1MiB"
[[roles.rules.repos]]
path = "org/locked.git"
fetch = true
[[roles.rules.repos]]
path = "org/*.git"
fetch = true
create = ["refs/heads/feature/*", "refs/tags/v*"]
update = ["refs/heads/feature/*", "refs/heads/main"]
delete = ["refs/heads/feature/tmp-*"]
approve = ["refs/heads/main"]
force = "approve"
[[roles.rules.repos]]
path = "sandbox/**"
create = ["refs/**"]
update = ["refs/**"]
delete = ["refs/**"]
force = "allow"

[[roles]]
name = "strict"
[[roles.rules]]
target = "forge"
[[roles.rules.repos]]
path = "**"
fetch = true
update = ["refs/heads/feature/*"]

[[roles]]
name = "broad"
[[roles.rules]]
target = "forge"
[[roles.rules.repos]]
path = "org/locked.git"
fetch = true
[[roles.rules.repos]]
path = "**"
fetch = true
update = ["refs/**"]
"#;

    fn git(role: &str, service: GitService, repo: &str, refs: &[(&str, RefKind)]) -> GitDecision {
        let p = parse(GIT_POLICY).expect("git policy parses");
        let t = p.target("forge").unwrap().clone();
        decide_git(&p, Some(role), &t, &GitRequest { service, repo, refs, push_options: &[] })
    }

    #[test]
    fn git_fetch_and_discovery() {
        use GitService::*;
        let d = git("agent", UploadPack, "org/app.git", &[]);
        assert_eq!(d.decision.verdict, Verdict::Allow);
        assert_eq!(d.decision.rule, "roles.agent.rules[0].repos[1]");
        assert_eq!(d.max_body, 1 << 20);
        assert_eq!(git("agent", UploadPack, "sandbox/x/y.git", &[]).decision.verdict, Verdict::Deny, "fetch = false");
        assert_eq!(git("agent", UploadPack, "other/app.git", &[]).decision.verdict, Verdict::Deny, "no entry");
        assert_eq!(git("agent", UploadPack, "org/sub/app.git", &[]).decision.verdict, Verdict::Deny, "`*` is one part");
        // The first matching entry decides: locked has no push rights.
        let d = git("agent", ReceivePack, "org/locked.git", &[]);
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert!(d.decision.reason.contains("no ref"), "{}", d.decision.reason);
        assert_eq!(git("agent", ReceivePack, "org/app.git", &[]).decision.verdict, Verdict::Allow);
        assert_eq!(git("nobody", UploadPack, "org/app.git", &[]).decision.verdict, Verdict::Deny);
    }

    #[test]
    fn git_repository_names_the_server_may_resolve_alike_decide_alike() {
        use GitService::ReceivePack as P;
        let main = [("refs/heads/main", RefKind::Update)];
        // git serves `org/locked` from `org/locked.git` (or `org/locked/.git`),
        // a forge ignores case: none of them dodges the locked entry for `**`.
        for repo in ["org/locked.git", "org/locked", "org/locked/", "org/locked/.git", "Org/Locked.git", "org/LOCKED"] {
            let d = git("broad", P, repo, &main);
            assert_eq!(d.decision.verdict, Verdict::Deny, "{repo}: {}", d.decision.reason);
            assert_eq!(d.decision.rule, "roles.broad.rules[0].repos[0]", "{repo}");
            assert_eq!(git("broad", GitService::UploadPack, repo, &[]).decision.verdict, Verdict::Allow, "{repo}");
        }
        assert_eq!(git("broad", P, "org/app", &main).decision.verdict, Verdict::Allow);
        // A name no entry covers does not deny what another name is allowed.
        assert_eq!(
            git("agent", P, "org/app", &[("refs/heads/feature/a", RefKind::Update)]).decision.verdict,
            Verdict::Allow
        );
        assert_eq!(
            git("agent", P, "other/app", &[("refs/heads/feature/a", RefKind::Update)]).decision.verdict,
            Verdict::Deny
        );
        assert_eq!(repo_readings("a/b.git")[0], "a/b.git", "as written first");
    }

    #[test]
    fn git_push_options_must_be_listed() {
        let src = GIT_POLICY
            .replace("path = \"org/*.git\"\n", "path = \"org/*.git\"\npush_options = [\"topic=*\", \"ci.skip\"]\n");
        let p = parse(&src).expect("parses");
        let t = p.target("forge").unwrap().clone();
        let push = |repo: &str, options: &[&str]| {
            let refs = [("refs/heads/feature/a", RefKind::Update), ("refs/heads/feature/b", RefKind::Create)];
            decide_git(
                &p,
                Some("agent"),
                &t,
                &GitRequest { service: GitService::ReceivePack, repo, refs: &refs, push_options: options },
            )
        };
        assert_eq!(push("org/app.git", &[]).decision.verdict, Verdict::Allow);
        assert_eq!(push("org/app.git", &["topic=a/b", "ci.skip"]).decision.verdict, Verdict::Allow);
        let d = push("org/app.git", &["ci.skip", "merge_request.merge_when_pipeline_succeeds"]);
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert!(
            d.decision.reason.contains("push option `merge_request.merge_when_pipeline_succeeds`"),
            "{}",
            d.decision.reason
        );
        assert!(d.refs.iter().all(|r| r.verdict == Verdict::Deny), "every ref of the push");
        // An entry without push_options lets none through.
        assert_eq!(push("sandbox/x.git", &["ci.skip"]).decision.verdict, Verdict::Deny);
        assert_eq!(push("sandbox/x.git", &[]).decision.verdict, Verdict::Allow);
    }

    #[test]
    fn git_ref_updates_by_kind() {
        use GitService::ReceivePack as P;
        use RefKind::*;
        let v = |name: &str, kind| git("agent", P, "org/app.git", &[(name, kind)]).decision.verdict;
        assert_eq!(v("refs/heads/feature/a", Create), Verdict::Allow);
        assert_eq!(v("refs/heads/feature/a", Update), Verdict::Allow);
        assert_eq!(v("refs/heads/feature/a", Force), Verdict::Approve, "force = approve");
        assert_eq!(v("refs/heads/feature/a", Delete), Verdict::Deny);
        assert_eq!(v("refs/heads/feature/tmp-1", Delete), Verdict::Allow);
        assert_eq!(v("refs/heads/feature/a/b", Create), Verdict::Deny, "`*` stays within one component");
        assert_eq!(v("refs/heads/main", Update), Verdict::Approve, "main is in approve");
        assert_eq!(v("refs/heads/main", Create), Verdict::Deny, "main is not in create");
        assert_eq!(v("refs/tags/v1", Create), Verdict::Allow);
        assert_eq!(v("refs/tags/v1", Update), Verdict::Deny);
        let s = |name: &str, kind| git("strict", P, "any/where.git", &[(name, kind)]).decision;
        let d = s("refs/heads/feature/x", Force);
        assert_eq!(d.verdict, Verdict::Deny, "force defaults to deny");
        assert!(d.reason.contains("force = deny"), "{}", d.reason);
        assert_eq!(s("refs/heads/feature/x", Update).verdict, Verdict::Allow);
        let d = s("refs/heads/main", Update);
        assert!(d.reason.contains("not in update"), "{}", d.reason);
        let sb = |name: &str, kind| git("agent", P, "sandbox/a/b.git", &[(name, kind)]).decision.verdict;
        assert_eq!(sb("refs/heads/main", Force), Verdict::Allow, "force = allow");
        assert_eq!(sb("refs/notes/x", Delete), Verdict::Allow);
    }

    #[test]
    fn git_push_is_as_bad_as_its_worst_ref() {
        use RefKind::*;
        let refs = [("refs/heads/feature/a", Update), ("refs/heads/main", Update), ("refs/heads/x", Create)];
        let d = git("agent", GitService::ReceivePack, "org/app.git", &refs);
        assert_eq!(d.refs.len(), 3);
        assert_eq!(
            d.refs.iter().map(|d| d.verdict).collect::<Vec<_>>(),
            [Verdict::Allow, Verdict::Approve, Verdict::Deny]
        );
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert!(d.decision.reason.contains("refs/heads/x"), "{}", d.decision.reason);
        let d = git("agent", GitService::ReceivePack, "org/app.git", &refs[..2]);
        assert_eq!(d.decision.verdict, Verdict::Approve);
        assert!(d.decision.reason.contains("refs/heads/main"), "{}", d.decision.reason);
    }

    #[test]
    fn git_decision_on_another_protocol_is_denied() {
        let p = parse(HTTP_POLICY).unwrap();
        let t = p.target("api").unwrap();
        let d = decide_git(
            &p,
            Some("agent"),
            t,
            &GitRequest { service: GitService::UploadPack, repo: "a", refs: &[], push_options: &[] },
        );
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert!(d.decision.reason.contains("not a git target"));
    }

    #[test]
    fn targets_select_by_most_specific_match() {
        let p = policy();
        assert_eq!(p.target_for("127.0.0.53:5432".parse().unwrap()).unwrap().name, "db");
        assert_eq!(p.target_for("[::ffff:127.0.0.53]:5432".parse().unwrap()).unwrap().name, "db");
        assert_eq!(p.target_for("127.0.0.53:5433".parse().unwrap()).unwrap().name, "any");
        assert_eq!(p.target_for("[2001:db8::1]:1".parse().unwrap()).unwrap().name, "any");
        // As the kernel looks targets up: an exact port first, then the
        // longest prefix (its record and flags come from the same target).
        let src = "version = 1\n[[targets]]\nname = \"host\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.53:*\"]\n\
                   [[targets]]\nname = \"net\"\nprotocol = \"postgres\"\nmatch = [\"127.0.0.0/8:5432\"]\n";
        let p = parse(src).unwrap();
        assert_eq!(p.target_for("127.0.0.53:5432".parse().unwrap()).unwrap().name, "net");
        assert_eq!(p.target_for("127.0.0.53:5433".parse().unwrap()).unwrap().name, "host");
        assert_eq!(p.target_for("127.0.0.54:5432".parse().unwrap()).unwrap().name, "net");
    }
}
