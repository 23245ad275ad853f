//! HTTP requests held for approval, end to end through the eBPF path with
//! curl inside a guarded scope: the response waits until an approver
//! outside the scope answers (`portcullis approvals approve|deny`), the
//! rule's timeout denies it, or the caller goes away; in `early` mode the
//! caller gets the approval id at once and retries.
use std::{
    process::{Child, Output, Stdio},
    time::Duration,
};

use portcullis_tests::{fixtures::json, require_root, require_tool, servers::HttpServer, Agent};
use serde_json::Value;

const TOKEN: &str = "approvals-upstream-token-55c1";
const RESOLVE: &str = "api.example.test:80:127.1.0.3";

fn policy(up: &HttpServer, timeout: &str) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "ops"
cgroup = "@CG@/ops"

[[scopes]]
name = "batch"
cgroup = "@CG@/batch"

[[targets]]
name = "api"
protocol = "http"
match = ["127.1.0.3:80"]
hosts = ["api.example.test"]
upstream = "{up}"
[targets.credentials]
token = {{ env = "PC_TEST_APPROVALS_TOKEN" }}

[[roles]]
name = "ops"
[[roles.rules]]
target = "api"
allow = ["read"]
approve = ["DELETE /items/*", "POST /deploy/**"]
approval_timeout = "{timeout}"

[[roles]]
name = "batch"
[[roles.rules]]
target = "api"
allow = ["read"]
approve = ["DELETE /items/*"]
approval_response = "early"

[[bindings]]
scope = "ops"
role = "ops"

[[bindings]]
scope = "batch"
role = "batch"
"#,
        up = up.addr,
    )
}

fn start(timeout: &str) -> Option<(Agent, HttpServer)> {
    if !require_root() || !require_tool("curl") {
        return None;
    }
    let up = HttpServer::plain("127.0.0.1:0");
    let agent = Agent::start_with_env(&policy(&up, timeout), &[("PC_TEST_APPROVALS_TOKEN", TOKEN)]);
    Some((agent, up))
}

fn curl_argv<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["curl", "-sS", "--max-time", "60", "--resolve", RESOLVE];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["-w", "\n%{http_code}"]);
    argv
}

/// curl inside `scope`, in the background.
fn curl_spawn(agent: &Agent, scope: &str, args: &[&str]) -> Child {
    agent.exec(scope, &curl_argv(args)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run curl")
}

/// The body and status of a finished curl.
fn parse(out: &Output) -> (String, u16) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_string(), code.trim().parse().unwrap_or(0))
}

fn curl(agent: &Agent, scope: &str, args: &[&str]) -> (String, u16) {
    parse(&agent.exec(scope, &curl_argv(args)).output().expect("run curl"))
}

/// Waits until exactly one request is pending and returns it.
fn pending(agent: &Agent) -> Value {
    let list = agent.wait_pending("request", Duration::from_secs(20));
    assert_eq!(list.len(), 1, "{list:?}");
    list[0].clone()
}

fn approvals(agent: &Agent, args: &[&str]) {
    let out = agent.approvals(args);
    assert!(out.status.success(), "approvals {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn id_of(p: &Value) -> String {
    p["id"].to_string()
}

#[test]
fn held_delete_approved_from_outside_gets_the_upstream_answer() {
    let Some((agent, up)) = start("5m") else { return };
    let child = curl_spawn(&agent, "ops", &["-X", "DELETE", "http://api.example.test/items/7"]);
    let p = pending(&agent);
    assert_eq!(p["target"], "api");
    assert_eq!(p["protocol"], "http");
    assert_eq!(p["rule"], "roles.ops.rules[0]");
    assert_eq!(p["request"], "DELETE api.example.test/items/7");
    assert_eq!(p["shape"], "DELETE /items/*");
    let line = agent.wait_log("request held for approval");
    assert!(line.contains("WARN"), "held requests are logged at warn: {line}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(up.requests_to("/items").is_empty(), "nothing reaches the upstream while held");

    approvals(&agent, &["approve", &id_of(&p)]);
    let (body, code) = parse(&child.wait_with_output().unwrap());
    assert_eq!(code, 200, "{body}\n{}", agent.log_text());
    let v = json(&body);
    assert_eq!(v["method"], "DELETE");
    assert_eq!(v["path"], "/items/7");
    let seen = up.requests_to("/items/7");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));

    let d = agent.wait_audit("allowed after approval", |r| {
        r["type"] == "decision" && r["request"]["method"] == "DELETE" && r["decision"]["verdict"] == "allow"
    });
    assert!(d["decision"]["reason"].as_str().unwrap().contains("approved by uid 0"), "{d}");
    let decided = agent.wait_audit("approval decided", |r| r["type"] == "approval_decided");
    assert_eq!(decided["outcome"]["outcome"], "approved");
    assert!(agent.pending_approvals().is_empty());
}

#[test]
fn a_held_post_keeps_its_body_and_a_duration_grant_covers_the_pattern() {
    let Some((agent, up)) = start("5m") else { return };
    let payload = "x".repeat(200_000);
    let file = agent.dir.path().join("payload");
    std::fs::write(&file, &payload).unwrap();
    let data = format!("@{}", file.display());
    let child = curl_spawn(&agent, "ops", &["--data-binary", &data, "http://api.example.test/deploy/web/v2"]);
    let p = pending(&agent);
    assert_eq!(p["shape"], "POST /deploy/**");
    approvals(&agent, &["approve", &id_of(&p), "--for", "10m"]);
    let (body, code) = parse(&child.wait_with_output().unwrap());
    assert_eq!(code, 200, "{body}");
    let seen = up.requests_to("/deploy/web/v2");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, payload.len() as u64, "the body read while held is forwarded whole");

    // Same pattern, another path, a new connection: covered by the grant.
    let (body, code) = curl(&agent, "ops", &["-d", "a=1", "http://api.example.test/deploy/api/v3"]);
    assert_eq!(code, 200, "{body}");
    agent.wait_audit("standing", |r| r["type"] == "approval_decided" && r["outcome"]["standing"] == true);
    // Another pattern is held again.
    let child = curl_spawn(&agent, "ops", &["-X", "DELETE", "http://api.example.test/items/1"]);
    let p = pending(&agent);
    assert_eq!(p["shape"], "DELETE /items/*");
    approvals(&agent, &["deny", &id_of(&p)]);
    assert_eq!(parse(&child.wait_with_output().unwrap()).1, 403);
}

#[test]
fn denied_request_gets_403_naming_the_rule_and_the_approval() {
    let Some((agent, up)) = start("5m") else { return };
    let child = curl_spawn(&agent, "ops", &["-X", "DELETE", "http://api.example.test/items/9"]);
    let p = pending(&agent);
    approvals(&agent, &["deny", &id_of(&p), "--reason", "not during the freeze"]);
    let (body, code) = parse(&child.wait_with_output().unwrap());
    assert_eq!(code, 403, "{body}");
    let v = json(&body);
    assert_eq!(v["error"], "denied");
    assert_eq!(v["rule"], "roles.ops.rules[0]");
    assert_eq!(v["approval"].as_str().unwrap(), id_of(&p));
    assert!(v["reason"].as_str().unwrap().contains("not during the freeze"), "{v}");
    assert!(up.requests_to("/items").is_empty());
    let d = agent.wait_audit("denied", |r| r["type"] == "approval_decided");
    assert_eq!(d["outcome"]["outcome"], "denied");
    agent.wait_audit("refusal recorded", |r| {
        r["type"] == "decision" && r["request"]["status"] == 403 && r["decision"]["verdict"] == "deny"
    });
}

#[test]
fn unanswered_request_times_out_with_403() {
    let Some((agent, up)) = start("1s") else { return };
    let (body, code) = curl(&agent, "ops", &["-X", "DELETE", "http://api.example.test/items/3"]);
    assert_eq!(code, 403, "{body}");
    let v = json(&body);
    assert_eq!(v["error"], "denied");
    assert!(v["reason"].as_str().unwrap().contains("timed out"), "{v}");
    assert!(v["approval"].is_string(), "{v}");
    assert!(up.requests_to("/items").is_empty());
    let d = agent.wait_audit("timed out", |r| r["type"] == "approval_decided");
    assert_eq!(d["outcome"]["outcome"], "timed_out");
}

#[test]
fn killing_the_held_caller_cancels_and_records_it() {
    let Some((agent, up)) = start("5m") else { return };
    let mut child = curl_spawn(&agent, "ops", &["-X", "DELETE", "http://api.example.test/items/4"]);
    let p = pending(&agent);
    child.kill().unwrap();
    let _ = child.wait();
    let d = agent.wait_audit("cancelled", |r| r["type"] == "approval_decided" && r["id"] == p["id"]);
    assert_eq!(d["outcome"]["outcome"], "cancelled");
    assert!(agent.pending_approvals().is_empty(), "no longer pending");
    assert!(up.requests_to("/items").is_empty());
}

#[test]
fn early_mode_answers_with_the_id_and_lets_one_retry_through_once_approved() {
    let Some((agent, up)) = start("5m") else { return };
    let url = "http://api.example.test/items/5";
    let (body, code) = curl(&agent, "batch", &["-X", "DELETE", url]);
    assert_eq!(code, 403, "{body}");
    let v = json(&body);
    assert_eq!(v["error"], "approval_required");
    let id = v["approval"].as_str().expect("the approval id").to_string();
    let p = pending(&agent);
    assert_eq!(id_of(&p), id);

    // A retry before anyone answered: the same id, still not forwarded.
    let (body, code) = curl(&agent, "batch", &["-X", "DELETE", url]);
    assert_eq!(code, 403);
    assert_eq!(json(&body)["approval"].as_str().unwrap(), id);
    assert_eq!(agent.pending_approvals().len(), 1);
    assert!(up.requests_to("/items").is_empty());

    approvals(&agent, &["approve", &id]);
    // Approved was the request the approver saw: another one the same
    // entry covers (another item, or the same with a query) is not it.
    for other in ["http://api.example.test/items/6", "http://api.example.test/items/5?cascade=all"] {
        let (body, code) = curl(&agent, "batch", &["-X", "DELETE", other]);
        assert_eq!(code, 403, "{other}: {body}");
        assert_eq!(json(&body)["error"], "approval_required", "{other}");
        assert_ne!(json(&body)["approval"].as_str().unwrap(), id, "{other}");
    }
    assert!(up.requests_to("/items").is_empty());
    let (body, code) = curl(&agent, "batch", &["-X", "DELETE", url]);
    assert_eq!(code, 200, "{body}\n{}", agent.log_text());
    assert_eq!(json(&body)["path"], "/items/5");
    assert_eq!(up.requests_to("/items/5").len(), 1);

    // The approval was for one retry: the next one asks again.
    let (body, code) = curl(&agent, "batch", &["-X", "DELETE", url]);
    assert_eq!(code, 403, "{body}");
    let again = json(&body);
    assert_eq!(again["error"], "approval_required");
    assert_ne!(again["approval"].as_str().unwrap(), id);
    assert_eq!(up.requests_to("/items/5").len(), 1);
}
