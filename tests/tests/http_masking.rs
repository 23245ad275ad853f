//! HTTP response masking end to end through the eBPF path with curl inside
//! a guarded scope: a role with maskers sees emails, card numbers and AWS
//! keys masked in JSON, in a text body whose email is split across chunks,
//! and in a gzip body (sent decoded); another role sees them in clear; the
//! target's injected token echoed back by the upstream is masked for every
//! role, in the body and in headers; the audit log holds no clear value;
//! server-sent events reach the caller (masked) as they come.
use portcullis_tests::{
    fixtures::json,
    require_root, require_tool,
    servers::{HttpServer, FIXTURE_EVENT_EMAIL, FIXTURE_TEXT_EMAIL},
    Agent,
};

const TOKEN: &str = "masking/upstream+token-3d9e71";
const RESOLVE: &str = "api.example.test:80:127.1.0.4";

fn policy(up: &HttpServer) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "masked"
cgroup = "@CG@/masked"

[[scopes]]
name = "clear"
cgroup = "@CG@/clear"

[[targets]]
name = "api"
protocol = "http"
match = ["127.1.0.4:80"]
hosts = ["api.example.test"]
upstream = "{up}"
[targets.credentials]
token = {{ env = "PC_TEST_MASKING_TOKEN" }}

[[roles]]
name = "analyst"
[[roles.rules]]
target = "api"
allow = ["read"]
mask = ["detector:email", "detector:card", "detector:aws-key"]

[[roles]]
name = "admin"
[[roles.rules]]
target = "api"
allow = ["read"]

[[bindings]]
scope = "masked"
role = "analyst"

[[bindings]]
scope = "clear"
role = "admin"
"#,
        up = up.addr,
    )
}

fn start() -> Option<(Agent, HttpServer)> {
    if !require_root() || !require_tool("curl") {
        return None;
    }
    let up = HttpServer::plain("127.0.0.1:0");
    let agent = Agent::start_with_env(&policy(&up), &[("PC_TEST_MASKING_TOKEN", TOKEN)]);
    Some((agent, up))
}

/// curl inside `scope`: headers (lower-cased names) and body.
fn get(agent: &Agent, scope: &str, path: &str, extra: &[&str]) -> (Vec<(String, String)>, String) {
    let url = format!("http://api.example.test{path}");
    let mut argv = vec!["curl", "-sS", "--max-time", "60", "--resolve", RESOLVE, "-D", "/dev/stderr"];
    argv.extend_from_slice(extra);
    argv.push(&url);
    let out = agent.exec(scope, &argv).output().expect("run curl");
    assert!(out.status.success(), "curl {path}: {}\n{}", String::from_utf8_lossy(&out.stderr), agent.log_text());
    let headers = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (headers, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[test]
fn json_text_and_gzip_bodies_are_masked_for_the_masked_role_only() {
    let Some((agent, _up)) = start() else { return };
    let (_, body) = get(&agent, "masked", "/fixture/json", &[]);
    let v = json(&body);
    assert_eq!(v["user"]["email"], "<email>", "{v}");
    assert_eq!(v["user"]["card"], "<card>", "{v}");
    assert_eq!(v["aws"], "<aws-key>", "{v}");
    assert_eq!(v["note"], "plain");

    let (_, body) = get(&agent, "clear", "/fixture/json", &[]);
    let v = json(&body);
    assert_eq!(v["user"]["email"], "alice@example.com");
    assert_eq!(v["aws"], "AKIAIOSFODNN7EXAMPLE");

    // The email arrives split across two chunks.
    let (_, body) = get(&agent, "masked", "/fixture/text", &[]);
    assert!(body.contains("contact <email> for access"), "{body}");
    assert!(!body.contains("bob.builder"), "{body}");
    let (_, body) = get(&agent, "clear", "/fixture/text", &[]);
    assert!(body.contains(FIXTURE_TEXT_EMAIL), "{body}");

    // gzip: decoded, masked, sent uncoded.
    let (h, body) = get(&agent, "masked", "/fixture/gzip", &["-H", "Accept-Encoding: gzip, zstd"]);
    assert_eq!(header(&h, "content-encoding"), None, "{h:?}");
    let v = json(&body);
    assert_eq!(v["user"]["email"], "<email>", "{v}");
    assert_eq!(v["aws"], "<aws-key>");
    // The other role sees the values (the body is still searched for the
    // injected token, so it is decoded too).
    let (_, body) = get(&agent, "clear", "/fixture/gzip", &["-H", "Accept-Encoding: gzip"]);
    assert_eq!(json(&body)["user"]["email"], "alice@example.com");

    // The audit log: status and bytes, and no clear value anywhere.
    let r = agent.wait_audit("response summary", |r| r["type"] == "response" && r["summary"]["status"] == "200");
    assert!(r["summary"]["bytes"].as_u64().unwrap() > 0, "{r}");
    let all = agent.audit().iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n");
    for clear in ["alice@example.com", "AKIAIOSFODNN7EXAMPLE", FIXTURE_TEXT_EMAIL, TOKEN] {
        assert!(!all.contains(clear), "{clear} in the audit log");
    }
}

#[test]
fn the_injected_token_echoed_back_is_masked_for_every_role() {
    let Some((agent, up)) = start() else { return };
    for scope in ["masked", "clear"] {
        let (h, body) = get(&agent, scope, "/fixture/echo", &[]);
        assert!(!body.contains(TOKEN), "{scope}: {body}");
        let v = json(&body);
        assert_eq!(v["authorization"], "Bearer <credential>", "{scope}: {v}");
        // The last characters of a base64 form also carry the padding; the
        // token is gone.
        assert!(v["b64"].as_str().unwrap().starts_with("<credential>"), "{scope}: {v}");
        assert_eq!(v["url"], "https://x.test/?t=<credential>", "{scope}: {v}");
        assert_eq!(header(&h, "x-echo-token"), Some("<credential>"), "{scope}: {h:?}");
        assert!(header(&h, "x-echo-b64").unwrap().starts_with("<credential>"), "{scope}: {h:?}");
    }
    // The upstream did get the token.
    let seen = up.requests_to("/fixture/echo");
    assert_eq!(seen[0].header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    let all = agent.audit().iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n");
    assert!(!all.contains(TOKEN));
}

/// A stream of server-sent events is masked and let out event by event: the
/// first event reaches the caller while the upstream still holds the rest
/// (it sends the second only when asked to, after the first arrived).
#[test]
fn server_sent_events_come_through_masked_as_they_come() {
    use std::io::{BufRead, Read, Write};
    let Some((agent, up)) = start() else { return };
    let mut child = agent
        .exec(
            "masked",
            &["curl", "-sS", "-N", "--max-time", "60", "--resolve", RESOLVE, "http://api.example.test/events/sse-1"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run curl");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let first = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the first event while the stream is open");
    assert_eq!(first, "data: first, mail <email>");
    // Only now does the upstream send the rest.
    let mut release = std::net::TcpStream::connect(up.addr).unwrap();
    write!(release, "GET /release/sse-1 HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    release.read_to_end(&mut Vec::new()).unwrap();
    let rest: Vec<String> = rx.iter().collect();
    assert!(child.wait().unwrap().success());
    assert_eq!(rest, ["", "data: second", ""], "{rest:?}");
    let all = agent.audit().iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n");
    assert!(!all.contains(FIXTURE_EVENT_EMAIL));
}
