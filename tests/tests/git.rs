//! git over smart HTTP(S) end to end: the real git client inside a guarded
//! scope, the real `git http-backend` upstream on loopback (over TLS with
//! its own CA, and plain), portcullis in between deciding each ref update.
//!
//! The TLS target is `git.example.test` at 127.1.0.2:443, the plain one
//! `plain-git.example.test` at 127.1.0.3:80; git resolves them with
//! `http.curloptResolve` and trusts portcullis' CA through GIT_SSL_CAINFO.
//! The callers' remotes carry no credentials: portcullis injects them.
use std::{
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::Duration,
};

use portcullis_tests::{
    require_root, require_tool,
    servers::{git_env, git_ok, GitServer},
    unique, Agent,
};
use serde_json::Value;

const TOKEN: &str = "git-upstream-secret-5d1c";
const BEARER: &str = "plain-git-bearer-c07e";
const RESOLVE: [&str; 4] = [
    "-c",
    "http.curloptResolve=git.example.test:443:127.1.0.2",
    "-c",
    "http.curloptResolve=plain-git.example.test:80:127.1.0.3",
];

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn basic() -> String {
    format!("Basic {}", base64(format!("bot:{TOKEN}").as_bytes()))
}

fn policy(tls: &GitServer, plain: &GitServer) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "agent"
cgroup = "@CG@/agent"
egress = "deny"

[[targets]]
name = "forge"
protocol = "git"
match = ["127.1.0.2:443"]
hosts = ["git.example.test"]
upstream = "{tls}"
[targets.tls]
client = true
upstream = true
ca = "{ca}"
[targets.credentials]
user = "bot"
password = {{ env = "PC_TEST_GIT_TOKEN" }}

[[targets]]
name = "forge-plain"
protocol = "git"
match = ["127.1.0.3:80"]
hosts = ["plain-git.example.test"]
upstream = "{plain}"
[targets.credentials]
token = {{ env = "PC_TEST_GIT_BEARER" }}

[[roles]]
name = "agent"
[[roles.rules]]
target = "forge"
approval_timeout = "2m"
[[roles.rules.repos]]
path = "org/closed.git"
fetch = false
[[roles.rules.repos]]
path = "org/*.git"
fetch = true
create = ["refs/heads/feature/*"]
update = ["refs/heads/feature/*"]
delete = []
force = "deny"
push_options = ["topic=*"]
[[roles.rules.repos]]
path = "held/*.git"
fetch = true
create = ["refs/heads/feature/*"]
update = ["refs/heads/feature/*"]
force = "approve"
[[roles.rules]]
target = "forge-plain"
[[roles.rules.repos]]
path = "**"
fetch = true
create = ["refs/heads/feature/**"]
update = ["refs/heads/feature/**"]

[[bindings]]
scope = "agent"
role = "agent"
"#,
        tls = tls.addr,
        plain = plain.addr,
        ca = tls.ca_file.as_ref().unwrap().display(),
    )
}

struct Fixture {
    agent: Agent,
    tls: GitServer,
    plain: GitServer,
    ca: PathBuf,
    work: tempfile::TempDir,
}

fn fixture() -> Option<Fixture> {
    if !require_root() || !require_tool("git") {
        return None;
    }
    let tls = GitServer::tls(&["git.example.test"], Some(&basic()));
    let plain = GitServer::plain(Some(&format!("Bearer {BEARER}")));
    let agent =
        Agent::start_with_env(&policy(&tls, &plain), &[("PC_TEST_GIT_TOKEN", TOKEN), ("PC_TEST_GIT_BEARER", BEARER)]);
    let ca = agent.export_ca();
    Some(Fixture { agent, tls, plain, ca, work: tempfile::tempdir().unwrap() })
}

impl Fixture {
    /// `git` inside the agent scope.
    fn git_cmd(&self, dir: &Path, args: &[&str]) -> std::process::Command {
        let mut argv: Vec<&str> = vec!["git"];
        argv.extend(RESOLVE);
        argv.extend(["-C", dir.to_str().unwrap()]);
        argv.extend_from_slice(args);
        let mut cmd = self.agent.exec("agent", &argv);
        cmd.envs(git_env()).env("GIT_SSL_CAINFO", &self.ca).env("GIT_HTTP_LOW_SPEED_LIMIT", "0");
        cmd
    }

    fn git(&self, dir: &Path, args: &[&str]) -> Output {
        self.git_cmd(dir, args).output().expect("run git")
    }

    fn git_spawn(&self, dir: &Path, args: &[&str]) -> Child {
        self.git_cmd(dir, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run git")
    }

    /// Clones `url` into a fresh directory (must succeed).
    fn clone(&self, url: &str) -> PathBuf {
        let dest = self.work.path().join(unique("clone"));
        let out = self.git(self.work.path(), &["clone", "-q", url, dest.to_str().unwrap()]);
        assert!(out.status.success(), "clone {url}: {}\n{}", stderr(&out), self.agent.log_text());
        dest
    }

    fn ref_records(&self, name: &str) -> Vec<Value> {
        self.agent
            .audit()
            .into_iter()
            .filter(|r| r["type"] == "git_ref_update" && r["update"]["name"] == name)
            .collect()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn commit(dir: &Path, file: &str, content: &[u8], msg: &str) -> String {
    std::fs::write(dir.join(file), content).unwrap();
    git_ok(Some(dir), &["add", file]);
    git_ok(Some(dir), &["commit", "-q", "-m", msg]);
    git_ok(Some(dir), &["rev-parse", "HEAD"]).trim().to_string()
}

/// Bytes that do not compress (a pack over git's post buffer).
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn rejected(out: &Output, refname: &str) -> bool {
    !out.status.success() && stderr(out).contains(&format!("[remote rejected] {refname} -> {refname} ("))
}

#[test]
fn pushes_over_tls_are_decided_ref_by_ref() {
    let Some(f) = fixture() else { return };
    f.tls.create_repo("org/app.git");
    let main0 = f.tls.rev("org/app.git", "refs/heads/main").unwrap();
    let dir = f.clone("https://git.example.test/org/app.git");

    // A new feature branch: created.
    git_ok(Some(&dir), &["checkout", "-q", "-b", "feature/a"]);
    let a1 = commit(&dir, "a.txt", b"a\n", "feature a");
    let out = f.git(&dir, &["push", "-q", "origin", "feature/a"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), f.agent.log_text());
    assert_eq!(f.tls.rev("org/app.git", "refs/heads/feature/a").as_deref(), Some(a1.as_str()));

    // A fast-forward of it: proven from the pack, an update.
    let a2 = commit(&dir, "a.txt", b"a2\n", "feature a, again");
    let out = f.git(&dir, &["push", "-q", "origin", "feature/a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(f.tls.rev("org/app.git", "refs/heads/feature/a").as_deref(), Some(a2.as_str()));

    // A push too large for git's post buffer: the probe, then a chunked body.
    git_ok(Some(&dir), &["checkout", "-q", "-b", "feature/big"]);
    let big = commit(&dir, "big.bin", &noise(300 << 10), "big");
    let out = f.git(&dir, &["-c", "http.postBuffer=65536", "push", "-q", "origin", "feature/big"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), f.agent.log_text());
    assert_eq!(f.tls.rev("org/app.git", "refs/heads/feature/big").as_deref(), Some(big.as_str()));
    assert!(
        f.tls.requests().iter().any(|r| r.method == "POST" && r.uri.ends_with("git-receive-pack") && r.status == 200),
        "the probe and the push reached the server"
    );

    // main is not pushable.
    git_ok(Some(&dir), &["checkout", "-q", "main"]);
    commit(&dir, "m.txt", b"m\n", "to main");
    let out = f.git(&dir, &["push", "origin", "main"]);
    assert!(rejected(&out, "main"), "{}", stderr(&out));
    assert!(stderr(&out).contains("portcullis"), "{}", stderr(&out));
    assert_eq!(f.tls.rev("org/app.git", "refs/heads/main").as_deref(), Some(main0.as_str()), "main unchanged");

    // A force push of the feature branch: refused (force = deny).
    git_ok(Some(&dir), &["checkout", "-q", "feature/a"]);
    git_ok(Some(&dir), &["commit", "-q", "--amend", "-m", "rewritten"]);
    let out = f.git(&dir, &["push", "--force", "origin", "feature/a"]);
    assert!(rejected(&out, "feature/a"), "{}", stderr(&out));
    assert!(stderr(&out).contains("force"), "{}", stderr(&out));
    assert_eq!(f.tls.rev("org/app.git", "refs/heads/feature/a").as_deref(), Some(a2.as_str()));

    // Deleting a branch: refused.
    let out = f.git(&dir, &["push", "origin", "--delete", "feature/big"]);
    assert!(!out.status.success() && stderr(&out).contains("[remote rejected] feature/big ("), "{}", stderr(&out));
    assert!(f.tls.rev("org/app.git", "refs/heads/feature/big").is_some());

    // Two refs in one push, one refused: nothing is forwarded.
    git_ok(Some(&dir), &["checkout", "-q", "-b", "feature/c"]);
    commit(&dir, "c.txt", b"c\n", "c");
    let out = f.git(&dir, &["push", "origin", "feature/c", "main"]);
    assert!(rejected(&out, "main") && rejected(&out, "feature/c"), "{}", stderr(&out));
    assert!(f.tls.rev("org/app.git", "refs/heads/feature/c").is_none());

    // Fetch works, and so does a fresh clone.
    let out = f.git(&dir, &["fetch", "-q", "origin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    f.clone("https://git.example.test/org/app.git");

    // Every ref update is in the audit log with its ids and decision.
    let a = f.ref_records("refs/heads/feature/a");
    let kinds: Vec<(&str, &str)> =
        a.iter().map(|r| (r["update"]["kind"].as_str().unwrap(), r["decision"]["verdict"].as_str().unwrap())).collect();
    assert_eq!(kinds, [("create", "allow"), ("update", "allow"), ("force", "deny")], "{a:#?}");
    assert_eq!(a[0]["update"]["new"], a1.as_str());
    assert_eq!(a[1]["update"]["old"], a1.as_str());
    assert_eq!(a[1]["update"]["new"], a2.as_str());
    assert_eq!(a[0]["decision"]["rule"], "roles.agent.rules[0].repos[1]");
    assert_eq!(a[0]["repo"], "org/app.git");
    let m = f.ref_records("refs/heads/main");
    assert!(m.iter().all(|r| r["decision"]["verdict"] == "deny") && m.len() == 2, "{m:#?}");
    assert_eq!(m[0]["update"]["old"], main0.as_str());
    let d = f.ref_records("refs/heads/feature/big");
    assert_eq!(d.last().unwrap()["update"]["kind"], "delete");
    assert_eq!(d.last().unwrap()["decision"]["verdict"], "deny");
    let c = f.ref_records("refs/heads/feature/c");
    assert_eq!(c[0]["decision"]["verdict"], "allow", "allowed on its own");
    // The replay shows the pushes.
    let session = a[0]["session"].as_str().unwrap().to_string();
    let out = f.agent.sessions(&["replay", &session, "--speed", "0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("git git-receive-pack org/app.git"), "{text}");
    assert!(text.contains("create refs/heads/feature/a"), "{text}");

    // The upstream saw the injected credential on every request; the
    // caller's configuration holds none.
    let seen = f.tls.requests();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|r| r.authorization.as_deref() == Some(basic().as_str())), "{seen:#?}");
    let config = std::fs::read_to_string(dir.join(".git/config")).unwrap();
    assert!(config.contains("url = https://git.example.test/org/app.git"), "{config}");
    assert!(!config.contains(TOKEN) && !config.contains('@'), "{config}");
    let log = f.agent.audit().iter().map(|r| r.to_string()).collect::<String>();
    assert!(!log.contains(TOKEN), "the audit log never holds the credential");
}

#[test]
fn push_options_are_decided_and_recorded() {
    let Some(f) = fixture() else { return };
    let bare = f.tls.create_repo("org/opts.git");
    git_ok(None, &["--git-dir", bare.to_str().unwrap(), "config", "receive.advertisePushOptions", "true"]);
    let dir = f.clone("https://git.example.test/org/opts.git");
    git_ok(Some(&dir), &["checkout", "-q", "-b", "feature/o"]);

    // An option the rule lists goes through with the push.
    let o1 = commit(&dir, "o.txt", b"o\n", "o");
    let out = f.git(&dir, &["push", "-q", "-o", "topic=review", "origin", "feature/o"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), f.agent.log_text());
    assert_eq!(f.tls.rev("org/opts.git", "refs/heads/feature/o").as_deref(), Some(o1.as_str()));

    // One it does not (a forge would merge on it): the push is refused
    // whole and nothing reaches the server.
    commit(&dir, "o.txt", b"o2\n", "o2");
    let out = f.git(&dir, &["push", "-o", "merge_request.merge_when_pipeline_succeeds", "origin", "feature/o"]);
    assert!(rejected(&out, "feature/o"), "{}", stderr(&out));
    assert!(stderr(&out).contains("push option `merge_request.merge_when_pipeline_succeeds`"), "{}", stderr(&out));
    assert_eq!(f.tls.rev("org/opts.git", "refs/heads/feature/o").as_deref(), Some(o1.as_str()), "unchanged");

    // Both pushes are in the audit log with their options and decisions.
    let pushes: Vec<(String, String)> = f
        .agent
        .audit()
        .into_iter()
        .filter(|r| r["type"] == "decision" && r["request"]["repo"] == "org/opts.git")
        .filter_map(|r| {
            let o = r["request"]["push_options"].as_array()?.iter().map(|o| o.as_str().unwrap().to_string()).collect();
            Some((o, r["decision"]["verdict"].as_str()?.to_string()))
        })
        .map(|(o, v): (Vec<String>, String)| (o.join(","), v))
        .collect();
    assert_eq!(
        pushes,
        [
            ("topic=review".to_string(), "allow".to_string()),
            ("merge_request.merge_when_pipeline_succeeds".to_string(), "deny".to_string())
        ],
        "{:#?}",
        f.agent.audit()
    );
}

#[test]
fn fetch_is_refused_where_the_rule_says_so_and_plain_http_works() {
    let Some(f) = fixture() else { return };
    f.tls.create_repo("org/closed.git");
    f.tls.create_repo("other/repo.git");
    for url in ["https://git.example.test/org/closed.git", "https://git.example.test/other/repo.git"] {
        let dest = f.work.path().join(unique("no"));
        let out = f.git(f.work.path(), &["clone", "-q", url, dest.to_str().unwrap()]);
        assert!(!out.status.success(), "{url}");
        assert!(stderr(&out).contains("403"), "{url}: {}", stderr(&out));
    }
    assert!(f.tls.requests().is_empty(), "nothing reached the server");
    let refused = f.agent.wait_audit("fetch refused", |r| {
        r["type"] == "decision" && r["request"]["protocol"] == "git" && r["request"]["repo"] == "org/closed.git"
    });
    assert_eq!(refused["decision"]["verdict"], "deny");
    assert!(refused["decision"]["reason"].as_str().unwrap().contains("fetch = false"), "{refused}");

    // Plain HTTP with a bearer token.
    f.plain.create_repo("team/tool.git");
    let dir = f.clone("http://plain-git.example.test/team/tool.git");
    git_ok(Some(&dir), &["checkout", "-q", "-b", "feature/x/y"]);
    let id = commit(&dir, "x", b"x\n", "x");
    let out = f.git(&dir, &["push", "-q", "origin", "feature/x/y"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(f.plain.rev("team/tool.git", "refs/heads/feature/x/y").as_deref(), Some(id.as_str()));
    let out = f.git(&dir, &["push", "origin", "feature/x/y:main"]);
    assert!(rejected_to(&out, "feature/x/y", "main"), "{}", stderr(&out));
    let bearer = format!("Bearer {BEARER}");
    assert!(f.plain.requests().iter().all(|r| r.authorization.as_deref() == Some(bearer.as_str())));
}

fn rejected_to(out: &Output, src: &str, dst: &str) -> bool {
    !out.status.success() && stderr(out).contains(&format!("[remote rejected] {src} -> {dst} ("))
}

/// Waits until one request is held and returns it.
fn pending(agent: &Agent) -> Value {
    agent.wait_pending("push", Duration::from_secs(60)).remove(0)
}

#[test]
fn held_force_push_is_forwarded_when_approved_and_rejected_when_denied() {
    let Some(f) = fixture() else { return };
    f.tls.create_repo("held/app.git");
    let dir = f.clone("https://git.example.test/held/app.git");
    git_ok(Some(&dir), &["checkout", "-q", "-b", "feature/f"]);
    commit(&dir, "f", b"f\n", "f");
    let out = f.git(&dir, &["push", "-q", "origin", "feature/f"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Approved from outside the scope: the force push goes through.
    git_ok(Some(&dir), &["commit", "-q", "--amend", "-m", "f, rewritten"]);
    let rewritten = git_ok(Some(&dir), &["rev-parse", "HEAD"]).trim().to_string();
    let child = f.git_spawn(&dir, &["push", "--force", "origin", "feature/f"]);
    let p = pending(&f.agent);
    assert_eq!(p["target"], "forge");
    assert_eq!(p["protocol"], "git");
    assert!(p["request"].as_str().unwrap().contains("force refs/heads/feature/f"), "{p}");
    assert_ne!(f.tls.rev("held/app.git", "refs/heads/feature/f").as_deref(), Some(rewritten.as_str()));
    let id = p["id"].to_string();
    let out = f.agent.cli().args(["approvals", "approve", &id]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", stderr(&out), f.agent.log_text());
    assert!(stderr(&out).contains(&format!("held for approval {id}")), "band-2 message: {}", stderr(&out));
    assert_eq!(f.tls.rev("held/app.git", "refs/heads/feature/f").as_deref(), Some(rewritten.as_str()));

    // Denied: rejected, nothing changes.
    git_ok(Some(&dir), &["commit", "-q", "--amend", "-m", "f, rewritten again"]);
    let child = f.git_spawn(&dir, &["push", "--force", "origin", "feature/f"]);
    let p = pending(&f.agent);
    let id = p["id"].to_string();
    let out = f.agent.cli().args(["approvals", "deny", &id]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = child.wait_with_output().unwrap();
    assert!(rejected(&out, "feature/f"), "{}", stderr(&out));
    assert!(stderr(&out).contains("denied"), "{}", stderr(&out));
    assert_eq!(f.tls.rev("held/app.git", "refs/heads/feature/f").as_deref(), Some(rewritten.as_str()));

    let recs = f.ref_records("refs/heads/feature/f");
    let verdicts: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| (r["update"]["kind"].as_str().unwrap(), r["decision"]["verdict"].as_str().unwrap()))
        .collect();
    assert_eq!(
        verdicts,
        [("create", "allow"), ("force", "approve"), ("force", "allow"), ("force", "approve"), ("force", "deny")],
        "{recs:#?}"
    );
}

#[test]
fn sha256_repositories_are_walked_with_sha256_ids() {
    let Some(f) = fixture() else { return };
    f.tls.create_repo_with("org/new.git", &["--object-format=sha256"]);
    let dir = f.clone("https://git.example.test/org/new.git");
    git_ok(Some(&dir), &["checkout", "-q", "-b", "feature/s"]);
    let s1 = commit(&dir, "s", b"s\n", "s");
    assert_eq!(s1.len(), 64, "a SHA-256 repository");
    let out = f.git(&dir, &["push", "-q", "origin", "feature/s"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), f.agent.log_text());
    let s2 = commit(&dir, "s", b"s2\n", "s2");
    let out = f.git(&dir, &["push", "-q", "origin", "feature/s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(f.tls.rev("org/new.git", "refs/heads/feature/s").as_deref(), Some(s2.as_str()));
    git_ok(Some(&dir), &["commit", "-q", "--amend", "-m", "rewritten"]);
    let out = f.git(&dir, &["push", "--force", "origin", "feature/s"]);
    assert!(rejected(&out, "feature/s"), "{}", stderr(&out));
    let recs = f.ref_records("refs/heads/feature/s");
    let kinds: Vec<&str> = recs.iter().map(|r| r["update"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["create", "update", "force"], "{recs:#?}");
    assert_eq!(recs[1]["update"]["old"], s1.as_str());
}
