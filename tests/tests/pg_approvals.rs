//! PostgreSQL approval holds end to end: a real PostgreSQL 15 server and
//! real psql (simple protocol) and tokio-postgres (extended protocol)
//! clients inside a guarded cgroup, steered through the eBPF path. A
//! statement under `approve` waits, with its connection open, until an
//! approver outside the scope answers through the CLI.
use std::{io::Write, process::Child, time::Duration};

use portcullis_tests::{
    fixtures::{app_db_target, output_text, require_postgres, secret_file},
    servers::{PgServer, WebhookReceiver},
    Agent,
};
use serde_json::Value;

const APP_PASSWORD: &str = "Appr0val-app-Pw-5e2d";

fn policy(pg: &PgServer, pwfile: &str, hook: &WebhookReceiver) -> String {
    format!(
        r#"
version = 1

[approvals]
webhook = "http://{hook}/portcullis"

[[scopes]]
name = "ci"
cgroup = "@CG@/ci"

[[scopes]]
name = "quick"
cgroup = "@CG@/quick"

{app_db}
[[roles]]
name = "migrator"
[[roles.rules]]
target = "app-db"
allow = ["read", "write", "session", "transaction"]
approve = ["ddl"]
approval_timeout = "5m"

[[roles]]
name = "hasty"
[[roles.rules]]
target = "app-db"
allow = ["read", "write", "session", "transaction"]
approve = ["ddl"]
approval_timeout = "2s"

[[bindings]]
scope = "ci"
role = "migrator"

[[bindings]]
scope = "quick"
role = "hasty"
"#,
        hook = hook.addr,
        app_db = app_db_target(pg.addr, pwfile),
    )
}

struct Fixture {
    agent: Agent,
    pg: PgServer,
    hook: WebhookReceiver,
    pwfile: String,
}

fn fixture() -> Option<Fixture> {
    if !require_postgres() {
        return None;
    }
    let pg = PgServer::with_app_db(APP_PASSWORD);
    pg.sql("appdb", "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one');");
    let pwfile = secret_file("app-db.pw", &format!("{APP_PASSWORD}\n"));
    let hook = WebhookReceiver::start(0);
    let agent = Agent::start(&policy(&pg, &pwfile, &hook));
    Some(Fixture { agent, pg, hook, pwfile })
}

/// psql inside `scope` reading `script`, started and left running.
fn psql(f: &Fixture, scope: &str, script: &str) -> Child {
    f.agent.spawn_psql(scope, "127.0.0.53", script, &[("PGPASSWORD", "anything")])
}

/// Waits until a request is pending and returns the first one.
fn pending(agent: &Agent) -> Value {
    agent.wait_pending("request", Duration::from_secs(20)).remove(0)
}

fn table_exists(pg: &PgServer, name: &str) -> bool {
    pg.sql("appdb", &format!("SELECT to_regclass('public.{name}') IS NOT NULL")) == "t"
}

#[test]
fn held_ddl_runs_once_approved_and_the_webhook_hears_of_it() {
    let Some(f) = fixture() else { return };
    let child = psql(&f, "ci", "CREATE TABLE approved_t (a int);\nSELECT 'alive';\n");
    let p = pending(&f.agent);
    assert_eq!(p["target"], "app-db");
    assert_eq!(p["protocol"], "postgres");
    assert_eq!(p["rule"], "roles.migrator.rules[0]");
    assert!(p["request"].as_str().unwrap().contains("CREATE TABLE approved_t"), "{p}");
    assert!(!table_exists(&f.pg, "approved_t"), "nothing runs while held");

    let id = p["id"].to_string();
    let out = f.agent.approvals(&["approve", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (out, err) = output_text(&child.wait_with_output().unwrap());
    assert!(err.contains(&format!("NOTICE:  01000: statement awaits approval {id}")), "{err}");
    assert!(err.contains(&format!("portcullis approvals approve {id}")), "{err}");
    assert!(!err.contains("ERROR"), "{err}");
    assert!(out.contains("CREATE TABLE") && out.contains("alive"), "{out}\n{err}");
    assert!(table_exists(&f.pg, "approved_t"));

    // The audit log: requested, approved by whom, and the statement's decision.
    f.agent.wait_audit("requested", |r| r["type"] == "approval_requested" && r["id"] == p["id"]);
    let decided = f.agent.wait_audit("approved", |r| r["type"] == "approval_decided" && r["id"] == p["id"]);
    assert_eq!(decided["outcome"]["outcome"], "approved");
    assert_eq!(decided["outcome"]["by"]["uid"], 0);
    let rec = f
        .agent
        .wait_audit("the statement", |r| r["request"]["kind"] == "CREATE TABLE" && r["decision"]["verdict"] == "allow");
    assert!(rec["decision"]["reason"].as_str().unwrap().contains("approved by uid 0"), "{rec}");

    // The webhook got the JSON.
    let body: Value = serde_json::from_str(&f.hook.wait_bodies(1, Duration::from_secs(10))[0]).unwrap();
    assert_eq!(body["id"], p["id"]);
    assert_eq!(body["target"], "app-db");
    assert_eq!(body["rule"], "roles.migrator.rules[0]");
    assert!(body["request"].as_str().unwrap().contains("approved_t"), "{body}");
}

#[test]
fn denied_ddl_gets_42501_and_aborts_its_transaction() {
    let Some(f) = fixture() else { return };
    let child = psql(
        &f,
        "ci",
        "BEGIN;\nINSERT INTO items VALUES (2, 'two');\nDROP TABLE items;\nCOMMIT;\nSELECT 'count', count(*) FROM items;\n",
    );
    let id = pending(&f.agent)["id"].to_string();
    let out = f.agent.approvals(&["deny", &id, "--reason", "not during the freeze"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (out, err) = output_text(&child.wait_with_output().unwrap());
    assert!(err.contains("ERROR:  42501: permission denied by portcullis (roles.migrator.rules[0])"), "{err}");
    assert!(err.contains("not during the freeze"), "{err}");
    assert!(out.contains("ROLLBACK"), "the transaction ends aborted: {out}");
    assert!(out.contains("count|1"), "the connection stays usable and the insert is gone: {out}\n{err}");
    assert!(table_exists(&f.pg, "items"));
    let d = f.agent.wait_audit("denied", |r| r["type"] == "approval_decided");
    assert_eq!(d["outcome"]["outcome"], "denied");
    assert_eq!(d["outcome"]["reason"], "not during the freeze");
    f.agent.wait_audit("the statement", |r| r["request"]["kind"] == "DROP" && r["decision"]["verdict"] == "deny");
}

#[test]
fn unanswered_ddl_times_out_denied() {
    let Some(f) = fixture() else { return };
    let child = psql(&f, "quick", "CREATE TABLE late_t (a int);\nSELECT 'alive';\n");
    let (out, err) = output_text(&child.wait_with_output().unwrap());
    assert!(err.contains("statement awaits approval"), "{err}");
    assert!(err.contains("42501") && err.contains("approval timed out"), "{err}");
    assert!(out.contains("alive"), "{out}");
    assert!(!table_exists(&f.pg, "late_t"));
    let d = f.agent.wait_audit("timed out", |r| r["type"] == "approval_decided");
    assert_eq!(d["outcome"]["outcome"], "timed_out");
}

#[test]
fn a_caller_that_goes_away_cancels_its_held_statement() {
    let Some(f) = fixture() else { return };
    let mut child = psql(&f, "ci", "CREATE TABLE gone_t (a int);\n");
    let id = pending(&f.agent)["id"].clone();
    child.kill().unwrap();
    child.wait().unwrap();
    let d = f.agent.wait_audit("cancelled", |r| r["type"] == "approval_decided" && r["id"] == id);
    assert_eq!(d["outcome"]["outcome"], "cancelled");
    assert!(f.agent.approvals(&["list", "--json"]).stdout.starts_with(b"[]"));
    f.agent.wait_audit("the statement", |r| {
        r["request"]["kind"] == "CREATE TABLE"
            && r["decision"]["verdict"] == "deny"
            && r["decision"]["reason"].as_str().unwrap_or("").contains("went away")
    });
    assert!(!table_exists(&f.pg, "gone_t"));
}

#[test]
fn a_process_inside_the_scope_cannot_approve_even_as_root() {
    let Some(f) = fixture() else { return };
    let child = psql(&f, "ci", "CREATE TABLE self_t (a int);\n");
    let id = pending(&f.agent)["id"].to_string();
    let bin = portcullis_tests::portcullis_bin();
    let socket = f.agent.control.to_str().unwrap().to_string();
    let out = f
        .agent
        .exec("ci", &[bin.to_str().unwrap(), "--control-socket", &socket, "approvals", "approve", &id])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside a guarded scope"));
    f.agent.wait_audit("refused", |r| r["type"] == "approval_refused");
    assert_eq!(pending(&f.agent)["id"].to_string(), id, "still pending");
    assert!(!table_exists(&f.pg, "self_t"));
    assert!(f.agent.approvals(&["deny", &id]).status.success());
    let (_, err) = output_text(&child.wait_with_output().unwrap());
    assert!(err.contains("42501"), "{err}");
    assert!(!table_exists(&f.pg, "self_t"));
}

#[test]
fn extended_protocol_holds_at_execute_and_session_grants_cover_the_same_shape() {
    let Some(f) = fixture() else { return };
    let mut child = f.agent.spawn_pg_client("ci", "query", "anything");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"CREATE TABLE IF NOT EXISTS ext_t (a int)\nCREATE TABLE IF NOT EXISTS ext_t (a int)\nSELECT count(*) FROM ext_t\n",
        )
        .unwrap();
    drop(stdin);
    let p = pending(&f.agent);
    assert!(!table_exists(&f.pg, "ext_t"));
    let id = p["id"].to_string();
    assert!(f.agent.approvals(&["approve", &id, "--session"]).status.success());
    let out = child.wait_with_output().unwrap();
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(lines.len(), 4, "{lines:?}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines[1]["ok"], true, "{}", lines[1]);
    assert_eq!(lines[2]["ok"], true, "the same shape passes under the session grant: {}", lines[2]);
    assert_eq!(lines[3]["rows"][0][0], 0, "{}", lines[3]);
    assert!(table_exists(&f.pg, "ext_t"));
    let standing =
        f.agent.wait_audit("standing", |r| r["type"] == "approval_decided" && r["outcome"]["standing"] == true);
    assert_eq!(standing["outcome"]["scope"]["kind"], "session");
}

#[test]
fn a_session_revoked_while_held_leaves_nothing_pending() {
    let Some(f) = fixture() else { return };
    let child = psql(&f, "ci", "CREATE TABLE revoked_t (a int);\n");
    let p = pending(&f.agent);
    // The scope loses its binding: the open session is revoked.
    let base = policy(&f.pg, &f.pwfile, &f.hook);
    let unbound = base.replace("[[bindings]]\nscope = \"ci\"\nrole = \"migrator\"\n", "");
    assert_ne!(unbound, base);
    f.agent.replace_policy(&unbound).unwrap();
    let (_, err) = output_text(&child.wait_with_output().unwrap());
    assert!(!err.contains("CREATE TABLE"), "{err}");
    let d = f.agent.wait_audit("cancelled", |r| r["type"] == "approval_decided" && r["id"] == p["id"]);
    assert_eq!(d["outcome"]["outcome"], "cancelled");
    assert!(f.agent.approvals(&["list", "--json"]).stdout.starts_with(b"[]"));
    let metrics = f.agent.metrics_text();
    assert!(metrics.lines().any(|l| l == "portcullis_approvals_held 0"), "{metrics}");
    assert!(!table_exists(&f.pg, "revoked_t"));
}
