//! HTTP and HTTPS targets end to end through the real eBPF path, with curl
//! and a Rust client inside a guarded scope: request rules, credential
//! injection, HTTP/2, streamed bodies, plain HTTP, redirects, limits.
//!
//! The HTTPS target is declared at 127.1.0.1:443 as `api.example.test`; the
//! upstream is a real HTTPS server elsewhere on loopback with its own test
//! CA. Callers trust portcullis' CA through SSL_CERT_FILE.
use std::{path::PathBuf, process::Output};

use portcullis_tests::{
    fixtures::json,
    helper_bin, require_root, require_tool,
    servers::{pattern_sum, HttpServer},
    Agent,
};
use serde_json::Value;

const TOKEN: &str = "upstream-secret-7f3a";
const PLAIN_KEY: &str = "plain-key-91b2";

fn policy(api: &HttpServer, plain: &HttpServer, elsewhere: &HttpServer) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "agent"
cgroup = "@CG@/agent"
egress = "deny"
allow = ["{elsewhere}/tcp"]

[[scopes]]
name = "small"
cgroup = "@CG@/small"
egress = "deny"

[[targets]]
name = "api"
protocol = "http"
match = ["127.1.0.1:443"]
hosts = ["api.example.test"]
upstream = "{api}"
[targets.tls]
client = true
upstream = true
ca = "{ca}"
[targets.credentials]
token = {{ env = "PC_TEST_API_TOKEN" }}

[[targets]]
name = "plain"
protocol = "http"
match = ["127.1.0.2:80"]
hosts = ["plain.example.test"]
upstream = "{plain}"
[targets.credentials]
header = "X-Api-Key"
token = {{ env = "PC_TEST_PLAIN_KEY" }}

[[targets]]
name = "open"
protocol = "http"
match = ["127.1.0.4:80"]
hosts = ["open.example.test"]
upstream = "{plain}"

[[roles]]
name = "agent"
[[roles.rules]]
target = "api"
allow = ["read", "POST /upload", "PUT /upload", "POST /release/*"]
approve = ["POST /deploy/**"]
deny = ["DELETE", "* /admin/**"]
max_body = "16MiB"
approval_response = "early"
[[roles.rules]]
target = "plain"
allow = ["GET"]
websocket = true
[[roles.rules]]
target = "open"
allow = ["GET"]

[[roles]]
name = "small"
[[roles.rules]]
target = "api"
allow = ["read", "POST /upload"]
max_body = "4KiB"
[[roles.rules]]
target = "plain"
allow = ["GET"]
[[roles.rules]]
target = "open"
allow = ["GET"]

[[bindings]]
scope = "agent"
role = "agent"

[[bindings]]
scope = "small"
role = "small"
"#,
        api = api.addr,
        plain = plain.addr,
        elsewhere = elsewhere.addr,
        ca = api.ca_file.as_ref().unwrap().display(),
    )
}

struct Fixture {
    agent: Agent,
    api: HttpServer,
    plain: HttpServer,
    elsewhere: HttpServer,
    /// The portcullis CA, exported as a user would.
    ca: PathBuf,
}

fn fixture() -> Option<Fixture> {
    fixture_with(&[])
}

fn fixture_with(env: &[(&str, &str)]) -> Option<Fixture> {
    if !require_root() || !require_tool("curl") {
        return None;
    }
    let api = HttpServer::tls("127.0.0.1:0", &["api.example.test"]);
    let plain = HttpServer::plain("127.0.0.1:0");
    let elsewhere = HttpServer::plain("127.0.0.1:0");
    let mut env = env.to_vec();
    env.extend([("PC_TEST_API_TOKEN", TOKEN), ("PC_TEST_PLAIN_KEY", PLAIN_KEY)]);
    let agent = Agent::start_with_env(&policy(&api, &plain, &elsewhere), &env);
    let ca = agent.export_ca();
    Some(Fixture { agent, api, plain, elsewhere, ca })
}

const RESOLVE_API: &str = "api.example.test:443:127.1.0.1";
const RESOLVE_PLAIN: &str = "plain.example.test:80:127.1.0.2";

impl Fixture {
    /// curl inside `scope`, trusting the portcullis CA; `-w` appends the
    /// status and HTTP version on a last line.
    fn curl_in(&self, scope: &str, args: &[&str]) -> (Output, String, u16, String) {
        let mut argv = vec!["curl", "-sS", "--max-time", "60", "--resolve", RESOLVE_API, "--resolve", RESOLVE_PLAIN];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["-w", "\n%{http_code} %{http_version}"]);
        // Debian's curl sets its CA bundle explicitly, so SSL_CERT_FILE alone
        // does not reach OpenSSL; CURL_CA_BUNDLE is curl's own variable.
        let out = self
            .agent
            .exec(scope, &argv)
            .env("SSL_CERT_FILE", &self.ca)
            .env("CURL_CA_BUNDLE", &self.ca)
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
        let mut it = last.split_whitespace();
        let code = it.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let version = it.next().unwrap_or("").to_string();
        (out.clone(), body.to_string(), code, version)
    }

    fn curl(&self, args: &[&str]) -> (Output, String, u16, String) {
        self.curl_in("agent", args)
    }

    /// The Rust client inside the `agent` scope.
    fn client(&self, args: &[&str]) -> Value {
        let bin = helper_bin("http-client");
        let mut argv = vec![bin.to_str().unwrap(), "--resolve", RESOLVE_API, "--resolve", RESOLVE_PLAIN];
        argv.extend_from_slice(args);
        let out = self.agent.exec("agent", &argv).env("SSL_CERT_FILE", &self.ca).output().expect("run http-client");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "http-client printed no JSON ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn http_records(&self, kind: &str, method: &str, path: &str) -> Vec<Value> {
        self.agent
            .audit()
            .into_iter()
            .filter(|r| {
                r["type"] == kind
                    && r["request"]["protocol"] == "http"
                    && r["request"]["method"] == method
                    && r["request"]["path"] == path
            })
            .collect()
    }
}

#[test]
fn allowed_get_carries_the_injected_token_and_not_the_callers() {
    let Some(f) = fixture() else { return };
    let (out, body, code, version) = f.curl(&[
        "--http1.1",
        "-H",
        "Authorization: Bearer caller-own-token",
        "https://api.example.test/repos/a/issues?state=open",
    ]);
    assert_eq!(code, 200, "{out:?}\n{}", f.agent.log_text());
    assert_eq!(version, "1.1");
    let v = json(&body);
    assert_eq!(v["path"], "/repos/a/issues");
    assert_eq!(v["query"], "state=open");

    let seen = f.api.requests_to("/repos/a/issues");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header_all("authorization"), vec![format!("Bearer {TOKEN}")], "{seen:?}");
    assert!(
        !seen[0].headers.iter().any(|(_, v)| v.contains("caller-own-token")),
        "the caller's credential is stripped: {seen:?}"
    );
    assert_eq!(seen[0].authority, "api.example.test");

    // Audited: the decision before forwarding, the end with status and bytes.
    let d = f.agent.wait_audit("GET decision", |r| {
        r["type"] == "decision" && r["request"]["protocol"] == "http" && r["request"]["path"] == "/repos/a/issues"
    });
    assert_eq!(d["request"]["method"], "GET");
    assert_eq!(d["request"]["host"], "api.example.test");
    assert_eq!(d["decision"]["verdict"], "allow");
    assert_eq!(d["decision"]["rule"], "roles.agent.rules[0]");
    let end = f.agent.wait_audit("GET end", |r| {
        r["type"] == "request_end" && r["request"]["path"] == "/repos/a/issues" && r["session"] == d["session"]
    });
    assert_eq!(end["request"]["status"], 200);
    assert_eq!(end["request"]["bytes_down"].as_u64().unwrap(), body.len() as u64, "{end}");
    // Nothing the audit log holds carries the secret.
    let log = std::fs::read_to_string(f.agent.state_dir().join("audit/audit.jsonl")).unwrap_or_default();
    assert!(!log.contains(TOKEN) && !f.agent.log_text().contains(TOKEN));
}

#[test]
fn denied_and_held_requests_get_403_json_naming_the_rule() {
    let Some(f) = fixture() else { return };
    let (out, body, code, _) = f.curl(&["-X", "DELETE", "https://api.example.test/repos/a"]);
    assert_eq!(code, 403, "{out:?}");
    let v = json(&body);
    assert_eq!(v["error"], "denied");
    assert_eq!(v["rule"], "roles.agent.rules[0]");
    assert!(v["reason"].as_str().unwrap().contains("\"DELETE\" in deny"), "{v}");

    // A path-scoped deny wins over the read class.
    let (_, body, code, _) = f.curl(&["https://api.example.test/admin/users"]);
    assert_eq!(code, 403);
    assert!(json(&body)["reason"].as_str().unwrap().contains("/admin/**"));

    // Approval, answered early: refused for now, with the id to approve
    // (holds are tested in http_approvals.rs).
    let (_, body, code, _) = f.curl(&["-X", "POST", "-d", "x", "https://api.example.test/deploy/prod"]);
    assert_eq!(code, 403);
    let v = json(&body);
    assert_eq!(v["error"], "approval_required");
    assert_eq!(v["verdict"], "approve");
    assert!(v["approval"].is_string(), "{v}");

    // Unlisted: default deny. Path tricks are refused, not normalised away.
    let (_, _, code, _) = f.curl(&["-X", "PATCH", "https://api.example.test/repos/a"]);
    assert_eq!(code, 403);
    let (_, body, code, _) = f.curl(&["--path-as-is", "https://api.example.test/repos/../admin/users"]);
    assert_eq!(code, 403, "{body}");

    assert!(f.api.requests().is_empty(), "nothing reached the upstream: {:?}", f.api.requests());
    let d = &f.http_records("decision", "DELETE", "/repos/a")[0];
    assert_eq!(d["decision"]["verdict"], "deny");
    assert_eq!(d["request"]["status"], 403);
}

#[test]
fn host_must_match_sni_and_target() {
    let Some(f) = fixture() else { return };
    // A Host header that is not the SNI.
    let (_, body, code, _) = f.curl(&["-H", "Host: evil.example.test", "https://api.example.test/x"]);
    assert_eq!(code, 403, "{body}");
    assert!(json(&body)["reason"].as_str().unwrap().contains("does not match the TLS server name"));
    // A name that is not the target's: its certificate is not minted, so a
    // verifying client refuses; one that does not verify is refused per request.
    let (out, _, code, _) = f.curl(&["--resolve", "other.example.test:443:127.1.0.1", "https://other.example.test/x"]);
    assert_eq!(code, 0, "TLS verification fails: {out:?}");
    let (_, body, code, _) =
        f.curl(&["-k", "--resolve", "other.example.test:443:127.1.0.1", "https://other.example.test/x"]);
    assert_eq!(code, 403);
    assert!(json(&body)["reason"].as_str().unwrap().contains("not one of the target's hosts"), "{body}");
    // No SNI (an IP address in the URL): refused.
    let (_, body, code, _) = f.curl(&["-k", "https://127.1.0.1/x"]);
    assert_eq!(code, 403);
    assert!(json(&body)["reason"].as_str().unwrap().contains("no SNI"), "{body}");
    assert!(f.api.requests().is_empty(), "{:?}", f.api.requests());
}

#[test]
fn http2_works_with_curl_and_the_rust_client() {
    let Some(f) = fixture() else { return };
    let (out, body, code, version) =
        f.curl(&["--http2", "-H", "Authorization: token nope", "https://api.example.test/h2/curl"]);
    assert_eq!(code, 200, "{out:?}");
    assert_eq!(version, "2", "{body}");
    let r = f.client(&["--http2", "-H", "authorization: Bearer nope", "https://api.example.test/h2/rust"]);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["version"], "HTTP/2.0", "{r}");
    assert_eq!(json(r["body"].as_str().unwrap())["path"], "/h2/rust");
    // HTTP/1.1 from the Rust client too.
    let r = f.client(&["https://api.example.test/h1/rust"]);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["version"], "HTTP/1.1");
    for path in ["/h2/curl", "/h2/rust", "/h1/rust"] {
        let seen = f.api.requests_to(path);
        assert_eq!(seen.len(), 1, "{path}");
        assert_eq!(seen[0].header_all("authorization"), vec![format!("Bearer {TOKEN}")], "{path}");
        // The upstream negotiated HTTP/2 by ALPN, whatever the caller spoke.
        assert_eq!(seen[0].version, "HTTP/2.0", "{path}");
    }
    // A denial over HTTP/2 is a 403 on its stream.
    let r = f.client(&["--http2", "-X", "DELETE", "https://api.example.test/repos/a"]);
    assert_eq!(r["status"], 403, "{r}");
}

#[test]
fn ten_mib_upload_and_download_stream_through() {
    let Some(f) = fixture() else { return };
    const N: u64 = 10 << 20;
    // Download: the server sends half and holds the rest until the client,
    // having received that half through portcullis, releases it.
    let r = f.client(&[
        "--gated-download",
        "--release",
        "https://api.example.test/release/dl1",
        &format!("https://api.example.test/bytes/{N}?gate=dl1"),
    ]);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body_len"], N, "{r}");
    assert_eq!(r["pattern_ok"], true);
    assert_eq!(r["released"], true);
    // Upload: the client sends half and waits until the server has seen
    // bytes of it before sending the rest.
    let r = f.client(&[
        "-X",
        "POST",
        "--gated-upload",
        &N.to_string(),
        "--progress",
        "https://api.example.test/progress/up1",
        "https://api.example.test/upload?id=up1",
    ]);
    assert_eq!(r["status"], 200, "{r}");
    let v = json(r["body"].as_str().unwrap());
    assert_eq!(v["received"], N, "{r}");
    assert_eq!(v["sum"], pattern_sum(N));
    // The same over HTTP/2.
    let r = f.client(&[
        "--http2",
        "-X",
        "PUT",
        "--gated-upload",
        &N.to_string(),
        "--progress",
        "https://api.example.test/progress/up2",
        "https://api.example.test/upload?id=up2",
    ]);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["version"], "HTTP/2.0");
    assert_eq!(json(r["body"].as_str().unwrap())["received"], N);

    // curl: a 10 MiB file up, 10 MiB down.
    let file = f.agent.dir.path().join("upload.bin");
    let data: Vec<u8> = (0..N).map(portcullis_tests::servers::pattern_byte).collect();
    std::fs::write(&file, &data).unwrap();
    let (out, body, code, _) = f.curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", file.display()),
        "https://api.example.test/upload?id=curl",
    ]);
    assert_eq!(code, 200, "{out:?}");
    assert_eq!(json(&body)["received"], N);
    let dl = f.agent.dir.path().join("download.bin");
    let (out, _, code, _) = f.curl(&["-o", dl.to_str().unwrap(), &format!("https://api.example.test/bytes/{N}")]);
    assert_eq!(code, 200, "{out:?}");
    assert!(std::fs::read(&dl).unwrap() == data, "downloaded bytes differ");
    let end = f.agent.wait_audit("upload end", |r| {
        r["type"] == "request_end" && r["request"]["method"] == "POST" && r["request"]["path"] == "/upload"
    });
    assert_eq!(end["request"]["bytes_up"], N, "{end}");
}

#[test]
fn body_limit_is_enforced_declared_or_streamed() {
    let Some(f) = fixture() else { return };
    // Declared length over max_body: refused before anything is forwarded.
    let (_, body, code, _) =
        f.curl_in("small", &["-X", "POST", "--data-binary", &"x".repeat(5000), "https://api.example.test/upload"]);
    assert_eq!(code, 413, "{body}");
    let v = json(&body);
    assert_eq!(v["rule"], "roles.small.rules[0]");
    assert!(f.api.requests_to("/upload").is_empty());
    // Chunked (no declared length): cut at the limit.
    let (_, body, code, _) = f.curl_in(
        "small",
        &[
            "-X",
            "POST",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &"y".repeat(9000),
            "https://api.example.test/upload",
        ],
    );
    assert_eq!(code, 413, "{body}");
    assert!(f.api.requests_to("/upload").iter().all(|r| r.body_len <= 4096));
    // Within the limit: fine.
    let (_, body, code, _) =
        f.curl_in("small", &["-X", "POST", "--data-binary", &"z".repeat(4096), "https://api.example.test/upload"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["received"], 4096);
}

#[test]
fn plain_http_target_injects_a_named_header() {
    let Some(f) = fixture() else { return };
    let (out, body, code, version) =
        f.curl(&["-H", "X-Api-Key: caller-key", "-H", "Authorization: Basic eDp5", "http://plain.example.test/p/q"]);
    assert_eq!(code, 200, "{out:?}");
    assert_eq!(version, "1.1");
    assert_eq!(json(&body)["path"], "/p/q");
    let seen = f.plain.requests_to("/p/q");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_all("x-api-key"), vec![PLAIN_KEY]);
    assert_eq!(seen[0].header("authorization"), None, "the caller's Authorization is stripped");
    let (_, _, code, _) = f.curl(&["-X", "POST", "-d", "a", "http://plain.example.test/p/q"]);
    assert_eq!(code, 403);
    // Another Host on the same address is refused.
    let (_, body, code, _) = f.curl(&["-H", "Host: intranet.test", "http://plain.example.test/p/q"]);
    assert_eq!(code, 403, "{body}");
    assert_eq!(f.plain.requests_to("/p/q").len(), 1);
}

#[test]
fn callers_who_authenticate_themselves_keep_their_upstream_connections() {
    // One worker: every session of a target draws on one pool.
    let Some(f) = fixture_with(&[("PORTCULLIS_WORKERS", "1")]) else { return };
    let url = "http://open.example.test/who";
    for scope in ["agent", "small", "agent", "small"] {
        let (out, body, code, _) = f.curl_in(scope, &["--resolve", "open.example.test:80:127.1.0.4", url]);
        assert_eq!(code, 200, "{scope}: {body} {}", String::from_utf8_lossy(&out.stderr));
    }
    let peers: Vec<_> = f.plain.requests_to("/who").iter().map(|r| r.peer.expect("peer")).collect();
    assert_eq!(peers.len(), 4);
    // Without injected credentials, the upstream connection may carry a
    // caller's own authentication (NTLM binds to it): one caller reuses
    // its connection, the other never gets it.
    assert_eq!(peers[0], peers[2], "a caller's later session reuses its pooled connection");
    assert_eq!(peers[1], peers[3]);
    assert_ne!(peers[0], peers[1], "callers do not share connections: {peers:?}");
}

#[test]
fn redirects_are_passed_back_and_credentials_stay_with_the_target() {
    let Some(f) = fixture() else { return };
    let to = format!("http://{}/landed", f.elsewhere.addr);
    let url = format!("https://api.example.test/redirect?to={to}");
    // portcullis does not follow: the caller gets the 302 as sent.
    let (_, _, code, _) = f.curl(&[&url]);
    assert_eq!(code, 302);
    // The caller follows it to another host: that host sees no credential.
    let (out, _, code, _) = f.curl(&["-L", "-H", "Authorization: Bearer caller", &url]);
    assert_eq!(code, 200, "{out:?}");
    let landed = f.elsewhere.requests_to("/landed");
    assert_eq!(landed.len(), 1);
    assert!(landed[0].header("authorization").is_none(), "{landed:?}");
    assert!(!landed[0].headers.iter().any(|(_, v)| v.contains(TOKEN)), "{landed:?}");
    assert_eq!(f.api.requests_to("/redirect").len(), 2);
}

#[test]
fn websocket_upgrades_follow_the_rule() {
    let Some(f) = fixture() else { return };
    // `plain` allows upgrades for role agent: 101, then bytes both ways.
    let raw = "GET /ws HTTP/1.1\r\nHost: plain.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nhello through";
    let r = f.agent.tcp_client("agent", &["tcp", "127.1.0.2:80", raw]);
    let reply = r["reply"].as_str().unwrap();
    assert!(reply.starts_with("HTTP/1.1 101"), "{r}");
    assert!(reply.ends_with("hello through"), "the upgraded stream echoes: {r}");
    let seen = f.plain.requests_to("/ws");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-api-key"), Some(PLAIN_KEY));
    // Role small has no `websocket = true`: refused.
    let r = f.agent.tcp_client("small", &["tcp", "127.1.0.2:80", raw]);
    assert!(r["reply"].as_str().unwrap().starts_with("HTTP/1.1 403"), "{r}");
    assert_eq!(f.plain.requests_to("/ws").len(), 1);
}
