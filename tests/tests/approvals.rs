//! Just-in-time approval end to end through the eBPF path: a held request
//! waits with the caller's connection open until an approver outside the
//! guarded scope answers through the control socket.
use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::{
    helper_bin, require_root,
    servers::{LineEchoServer, WebhookReceiver},
    Agent,
};
use serde_json::Value;

fn policy(upstream: &LineEchoServer, webhook: Option<&WebhookReceiver>, timeout: &str) -> String {
    let hook =
        webhook.map(|w| format!("[approvals]\nwebhook = \"http://{}/portcullis\"\n", w.addr)).unwrap_or_default();
    format!(
        r#"
version = 1
{hook}
[[scopes]]
name = "ci"
cgroup = "@CG@/ci"

[[targets]]
name = "deploy-hook"
protocol = "tcp"
match = ["127.0.0.53:7100"]
upstream = "{up}"

[[roles]]
name = "deployer"
[[roles.rules]]
target = "deploy-hook"
approve = ["connect"]
approval_timeout = "{timeout}"

[[bindings]]
scope = "ci"
role = "deployer"
"#,
        up = upstream.addr,
    )
}

/// Starts the line client inside the scope; it blocks while held.
fn held_client(agent: &Agent, msg: &str, timeout_secs: u32) -> Child {
    let client = helper_bin("tcp-client");
    agent
        .exec("ci", &[client.to_str().unwrap(), "line", "127.0.0.53:7100", msg])
        .env("TCP_CLIENT_TIMEOUT_SECS", timeout_secs.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("client output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Waits until exactly one request is pending and returns it.
fn pending(agent: &Agent) -> Value {
    agent.wait_pending("request", Duration::from_secs(10)).remove(0)
}

#[test]
fn approved_request_runs_and_the_caller_sees_success() {
    if !require_root() {
        return;
    }
    let up = LineEchoServer::start("127.0.0.1:0");
    let hook = WebhookReceiver::start(1);
    let agent = Agent::start(&policy(&up, Some(&hook), "5m"));
    let client = held_client(&agent, "ship-it", 30);
    let p = pending(&agent);
    assert_eq!(p["target"], "deploy-hook");
    assert_eq!(p["rule"], "roles.deployer.rules[0]");
    assert_eq!(up.count(), 0, "nothing reaches the upstream while held");
    // The gauge moves just after the request is listed as pending.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.metrics_text().lines().any(|l| l == "portcullis_approvals_held 1") {
        assert!(Instant::now() < deadline, "the held connection is counted: {}", agent.metrics_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = agent.wait_log("request held for approval");
    assert!(line.contains("WARN"), "held requests are logged at warn: {line}");

    let id = p["id"].to_string();
    let out = agent.approvals(&["approve", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = finish(client);
    assert_eq!(r["reply"], "echo:ship-it", "{r}");
    assert_eq!(up.count(), 1);
    assert!(agent.metrics_text().lines().any(|l| l == "portcullis_approvals_held 0"), "and no longer once answered");

    let decided = agent.wait_audit("approval decided", |r| r["type"] == "approval_decided");
    assert_eq!(decided["outcome"]["outcome"], "approved");
    assert_eq!(decided["outcome"]["by"]["uid"], 0);
    assert!(decided["outcome"]["by"]["exe"].as_str().unwrap().ends_with("portcullis"), "{decided}");
    agent.wait_audit("requested", |r| r["type"] == "approval_requested" && r["id"] == p["id"]);

    // The webhook got the JSON (after one failed attempt, retried).
    let body: Value = serde_json::from_str(&hook.wait_bodies(2, Duration::from_secs(10))[1]).unwrap();
    assert_eq!(body["id"], p["id"]);
    assert_eq!(body["target"], "deploy-hook");
    assert_eq!(body["rule"], "roles.deployer.rules[0]");
    assert!(body["expiry_ms"].as_u64().unwrap() > body["requested_ms"].as_u64().unwrap());
    assert_eq!(body["subject"]["role"], "deployer");
    let failed = agent.wait_audit("failed notification", |r| r["type"] == "approval_notified" && r["ok"] == false);
    assert_eq!(failed["attempt"], 1);
    agent.wait_audit("notified", |r| r["type"] == "approval_notified" && r["ok"] == true);
}

#[test]
fn denied_request_is_refused_with_the_reason_recorded() {
    if !require_root() {
        return;
    }
    let up = LineEchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&policy(&up, None, "5m"));
    let client = held_client(&agent, "drop-prod", 30);
    let id = pending(&agent)["id"].to_string();
    let out = agent.approvals(&["deny", &id, "--reason", "not during the freeze"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = finish(client);
    assert_eq!(r["reply"], "", "{r}");
    assert_eq!(up.count(), 0);
    let d = agent.wait_audit("denied", |r| r["type"] == "approval_decided");
    assert_eq!(d["outcome"]["outcome"], "denied");
    assert_eq!(d["outcome"]["reason"], "not during the freeze");
}

#[test]
fn unanswered_request_times_out_denied() {
    if !require_root() {
        return;
    }
    let up = LineEchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&policy(&up, None, "1s"));
    let r = finish(held_client(&agent, "late", 30));
    assert_eq!(r["reply"], "", "{r}");
    assert_eq!(up.count(), 0);
    let d = agent.wait_audit("timed out", |r| r["type"] == "approval_decided");
    assert_eq!(d["outcome"]["outcome"], "timed_out");
}

#[test]
fn caller_that_disconnects_cancels_its_request() {
    if !require_root() {
        return;
    }
    let up = LineEchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&policy(&up, None, "5m"));
    // The client gives up after 1 s.
    let r = finish(held_client(&agent, "impatient", 1));
    assert_eq!(r["reply"], "");
    let d = agent.wait_audit("cancelled", |r| r["type"] == "approval_decided");
    assert_eq!(d["outcome"]["outcome"], "cancelled");
    assert!(agent.approvals(&["list", "--json"]).stdout.starts_with(b"[]"));
    assert_eq!(up.count(), 0);
}

#[test]
fn a_process_inside_the_scope_cannot_approve_even_as_root() {
    if !require_root() {
        return;
    }
    let up = LineEchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&policy(&up, None, "5m"));
    let client = held_client(&agent, "self-serve", 30);
    let id = pending(&agent)["id"].to_string();

    // Root, inside the guarded scope, talking to the control socket.
    let bin = portcullis_tests::portcullis_bin();
    let socket = agent.control.to_str().unwrap().to_string();
    let out = agent
        .exec("ci", &[bin.to_str().unwrap(), "--control-socket", &socket, "approvals", "approve", &id])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inside a guarded scope"), "{err}");
    let refused = agent.wait_audit("refused", |r| r["type"] == "approval_refused");
    assert_eq!(refused["uid"], 0);
    assert!(refused["cgroup"].as_str().unwrap().ends_with("/ci"), "{refused}");
    // Still pending; an outside approver can still deny it.
    assert_eq!(pending(&agent)["id"].to_string(), id);
    assert_eq!(up.count(), 0);
    assert!(agent.approvals(&["deny", &id]).status.success());
    assert_eq!(finish(client)["reply"], "");
}

#[test]
fn session_and_duration_approvals_cover_the_same_request_shape() {
    if !require_root() {
        return;
    }
    let up = LineEchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&policy(&up, None, "5m"));
    let client = held_client(&agent, "one", 30);
    let id = pending(&agent)["id"].to_string();
    assert!(agent.approvals(&["approve", &id, "--for", "10m"]).status.success());
    assert_eq!(finish(client)["reply"], "echo:one");
    // A new connection of the same shape passes without a new hold.
    let r = finish(held_client(&agent, "two", 30));
    assert_eq!(r["reply"], "echo:two", "{r}");
    let standing =
        agent.wait_audit("standing", |r| r["type"] == "approval_decided" && r["outcome"]["standing"] == true);
    assert_eq!(standing["outcome"]["scope"]["kind"], "for");
}
