//! PostgreSQL end to end: a real PostgreSQL 15 server, real psql and a real
//! extended-protocol client (tokio-postgres), each run inside a guarded
//! cgroup and steered through the eBPF path to portcullis.
//!
//! The upstream user `app` is a superuser, so that everything a test expects
//! to be refused would succeed if portcullis let it through.
use std::{
    io::Write,
    process::{Output, Stdio},
};

use portcullis_tests::{
    fixtures::{app_db_target, output_text, require_postgres, secret_file},
    helper_bin, require_root, require_tool,
    servers::{PgAuth, PgServer},
    Agent,
};
use serde_json::Value;

const APP_PASSWORD: &str = "S3cret-app-Pw-7f1c";
const LEGACY_PASSWORD: &str = "L3gacy-md5-Pw-92ab";

fn policy(pg: &PgServer, pwfile: &str) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "ci"
cgroup = "@CG@/ci"
egress = "deny"

[[scopes]]
name = "writer"
cgroup = "@CG@/writer"

[[scopes]]
name = "nobody"
cgroup = "@CG@/nobody"

{app_db}
[[targets]]
name = "legacy-db"
protocol = "postgres"
match = ["127.0.0.54:5432"]
upstream = "{up}"
[targets.credentials]
user = "legacy"
password = {{ env = "LEGACY_DB_PASSWORD" }}

[[roles]]
name = "reader"
[[roles.rules]]
target = "app-db"
allow = ["read", "session", "transaction"]
deny = ["*"]
deny_tables = ["public.secrets"]
[[roles.rules]]
target = "legacy-db"
allow = ["read"]

[[roles]]
name = "writer"
[[roles.rules]]
target = "app-db"
allow = ["read", "write", "session", "transaction", "copy-in", "copy-out"]
approve = ["ddl"]
approval_timeout = "1s"
deny_tables = ["public.secrets"]

[[roles]]
name = "outsider"

[[bindings]]
scope = "ci"
role = "reader"

[[bindings]]
scope = "writer"
role = "writer"

[[bindings]]
scope = "nobody"
role = "outsider"
"#,
        app_db = app_db_target(pg.addr, pwfile),
        up = pg.addr,
    )
}

struct Fixture {
    agent: Agent,
    pg: PgServer,
}

fn fixture() -> Option<Fixture> {
    if !require_postgres() {
        return None;
    }
    let pg = PgServer::with_app_db(APP_PASSWORD);
    pg.create_user("legacy", LEGACY_PASSWORD, PgAuth::Md5);
    pg.sql(
        "appdb",
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three');
         CREATE TABLE t (a int); INSERT INTO t VALUES (1);
         CREATE TABLE secrets (id int, value text); INSERT INTO secrets VALUES (1, 'the-crown-jewels');
         CREATE SEQUENCE s;
         CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'INSERT INTO t VALUES (42) RETURNING a';
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO legacy;",
    );
    let pwfile = secret_file("app-db.pw", &format!("{APP_PASSWORD}\n"));
    let agent = Agent::start_with_env(&policy(&pg, &pwfile), &[("LEGACY_DB_PASSWORD", LEGACY_PASSWORD)]);
    Some(Fixture { agent, pg })
}

/// psql inside `scope`, with a wrong password, reading `script` from stdin.
fn psql(f: &Fixture, scope: &str, host: &str, script: &str) -> Output {
    psql_with(f, scope, host, script, &[("PGPASSWORD", "not-the-password")])
}

fn psql_with(f: &Fixture, scope: &str, host: &str, script: &str, env: &[(&str, &str)]) -> Output {
    f.agent.spawn_psql(scope, host, script, env).wait_with_output().unwrap()
}

/// The extended-protocol client inside `scope`: one JSON value per line.
fn pg_client(f: &Fixture, scope: &str, mode: &str, password: &str, stdin: &str) -> Vec<Value> {
    let mut child = f.agent.spawn_pg_client(scope, mode, password);
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        !lines.is_empty(),
        "pg-client printed nothing: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        f.agent.log_text()
    );
    lines
}

fn denied_by_portcullis(stderr: &str) -> bool {
    stderr.contains("ERROR:  42501: permission denied by portcullis (roles.")
}

#[test]
fn read_only_role_reads_and_is_refused_writes_on_the_same_connection() {
    let Some(f) = fixture() else { return };
    let o = psql(
        &f,
        "ci",
        "127.0.0.53",
        "SELECT count(*) FROM items;\n\
         INSERT INTO items VALUES (4, 'four');\n\
         SELECT 'after insert', count(*) FROM items;\n\
         CREATE TABLE t2 (a int);\n\
         SELECT 'after create', current_user;\n\
         SELECT count(*) FROM (SELECT repeat('x', 1000) FROM generate_series(1, 200)) big;\n\
         \\o /dev/null\n\
         SELECT repeat('x', 1000) FROM generate_series(1, 200);\n",
    );
    let (out, err) = output_text(&o);
    assert!(out.contains("3\n"), "SELECT works: {out}\n{err}\n{}", f.agent.log_text());
    assert!(out.contains("after insert|3"), "the connection keeps working and nothing was inserted: {out}\n{err}");
    assert!(out.contains("after create|app"), "the upstream session is the target's user: {out}\n{err}");
    assert_eq!(err.matches("42501").count(), 2, "INSERT and CREATE TABLE refused: {err}");
    assert!(denied_by_portcullis(&err), "{err}");
    assert!(err.contains("roles.reader.rules[0]"), "the message names the rule: {err}");
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM items"), "3");
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM pg_tables WHERE tablename = 't2'"), "0");

    // Every statement is recorded with class, tables, decision and rule.
    let rec = f.agent.wait_audit("the refused insert", |r| {
        r["type"] == "decision" && r["request"]["protocol"] == "postgres" && r["request"]["kind"] == "INSERT"
    });
    assert_eq!(rec["request"]["classes"], serde_json::json!(["write"]));
    assert_eq!(rec["request"]["tables"], serde_json::json!(["public.items"]));
    assert_eq!(rec["decision"]["verdict"], "deny");
    assert_eq!(rec["decision"]["rule"], "roles.reader.rules[0]");
    let sel = f.agent.wait_audit("the select", |r| {
        r["request"]["protocol"] == "postgres"
            && r["request"]["kind"] == "SELECT"
            && r["request"]["sql"].as_str().unwrap_or("").contains("count(*) FROM items")
    });
    assert_eq!(sel["decision"]["verdict"], "allow");
    assert_eq!(sel["request"]["classes"], serde_json::json!(["read"]));

    // Each answer is summarised: the command tag or the SQLSTATE, rows and
    // bytes, in order, and no row content.
    let session = sel["session"].clone();
    f.agent.wait_audit("the session's end", |r| r["type"] == "session_end" && r["session"] == session);
    let answers: Vec<_> =
        f.agent.audit().into_iter().filter(|r| r["type"] == "response" && r["session"] == session).collect();
    let statuses: Vec<_> = answers.iter().map(|r| r["summary"]["status"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(
        statuses,
        ["SELECT 1", "ERROR 42501", "SELECT 1", "ERROR 42501", "SELECT 1", "SELECT 1", "SELECT 200"],
        "{answers:?}"
    );
    // A large answer is counted whole, though it is sent in pieces; the
    // session's total holds every answer.
    let big = answers[6]["summary"]["bytes"].as_u64().unwrap();
    assert!(big > 200 * 1000, "{big}");
    let end = f.agent.audit().into_iter().find(|r| r["type"] == "session_end" && r["session"] == session).unwrap();
    let answered: u64 = answers.iter().map(|r| r["summary"]["bytes"].as_u64().unwrap()).sum();
    assert!(end["bytes_down"].as_u64().unwrap() >= answered, "{end} vs {answered}");
    assert_eq!(answers[0]["summary"]["rows"], 1, "{answers:?}");
    assert!(answers[1]["summary"]["rows"].is_null(), "{answers:?}");
    assert!(answers.iter().all(|r| r["summary"]["bytes"].as_u64().unwrap_or(0) > 0), "{answers:?}");
    assert!(answers.iter().all(|r| r["summary"]["content"].is_null()), "{answers:?}");
}

#[test]
fn extended_protocol_client_reads_is_refused_writes_and_pipelines() {
    let Some(f) = fixture() else { return };
    let r = pg_client(
        &f,
        "ci",
        "query",
        "",
        "SELECT name FROM items WHERE id = 2\n\
         INSERT INTO items VALUES (4, 'four')\n\
         SELECT count(*)::text FROM items\n\
         PIPELINE SELECT 'first' ;; DELETE FROM items ;; SELECT 'third'\n\
         SELECT 'after pipeline'\n",
    );
    assert_eq!(r[0]["connected"], true, "{r:?}\n{}", f.agent.log_text());
    assert_eq!(r[1]["rows"], serde_json::json!([["two"]]), "{r:?}");
    assert_eq!(r[2]["ok"], false);
    assert_eq!(r[2]["error"]["code"], "42501", "{r:?}");
    assert!(r[2]["error"]["message"].as_str().unwrap().contains("roles.reader.rules[0]"));
    assert_eq!(r[3]["rows"], serde_json::json!([["3"]]), "the connection keeps working: {r:?}");
    // Pipelined: the statement before the denial ran; the denial and what
    // follows it before the next Sync are answered in order.
    assert_eq!(r[4]["rows"], serde_json::json!([["first"]]), "{r:?}");
    assert_eq!(r[5]["error"]["code"], "42501", "{r:?}");
    assert_eq!(r[6]["rows"], serde_json::json!([["third"]]), "{r:?}");
    assert_eq!(r[7]["rows"], serde_json::json!([["after pipeline"]]), "{r:?}");
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM items"), "3");
}

#[test]
fn the_caller_gets_in_with_any_password_and_never_sees_the_real_one() {
    let Some(f) = fixture() else { return };
    // Wrong and empty passwords, SCRAM (app-db) and md5 (legacy-db) upstreams.
    for (host, pw, user) in [("127.0.0.53", "wrong", "app"), ("127.0.0.53", "", "app"), ("127.0.0.54", "", "legacy")] {
        let o = psql_with(&f, "ci", host, "SELECT current_user;\n", &[("PGPASSWORD", pw)]);
        let (out, err) = output_text(&o);
        assert_eq!(out.trim(), user, "{host} with {pw:?}: {err}\n{}", f.agent.log_text());
        assert!(!out.contains(APP_PASSWORD) && !err.contains(APP_PASSWORD));
    }
    let r = pg_client(&f, "ci", "query", "", "SELECT current_user::text\nSHOW password_encryption\n");
    assert_eq!(r[1]["rows"], serde_json::json!([["app"]]), "{r:?}");
    let all = serde_json::to_string(&r).unwrap();
    assert!(!all.contains(APP_PASSWORD) && !all.contains(LEGACY_PASSWORD));

    // Nor in the audit log, nor in portcullis' own log.
    f.agent.wait_audit("a session", |r| r["type"] == "session_end");
    let audit = std::fs::read_to_string(f.agent.state_dir().join("audit/audit.jsonl")).unwrap_or_default()
        + &serde_json::to_string(&f.agent.audit()).unwrap();
    assert!(!audit.is_empty());
    for secret in [APP_PASSWORD, LEGACY_PASSWORD] {
        assert!(!audit.contains(secret), "the audit log holds a password");
        assert!(!f.agent.log_text().contains(secret), "the log holds a password");
    }
}

#[test]
fn attacks_on_a_read_only_role_are_denied() {
    let Some(f) = fixture() else { return };
    let nested = format!("SELECT {}1{};", "(".repeat(3000), ")".repeat(3000));
    let cases: Vec<(&str, String)> = vec![
        ("two statements", "SELECT 1; DROP TABLE t;".into()),
        ("comment trick", "SELECT 1 /* ; */; DROP TABLE t; -- ;".into()),
        ("line comment ended by CR", "SELECT 1 --\r; DROP TABLE t;".into()),
        ("nested comment", "/* /* */ SELECT 1; */ DROP TABLE t;".into()),
        ("data-modifying CTE", "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x;".into()),
        ("EXPLAIN ANALYZE", "EXPLAIN ANALYZE DELETE FROM t;".into()),
        ("SELECT INTO", "SELECT * INTO stolen FROM items;".into()),
        ("nextval", "SELECT nextval('s');".into()),
        ("set_config", "SELECT set_config('search_path', 'pg_temp', false);".into()),
        ("pg_terminate_backend", "SELECT pg_terminate_backend(pg_backend_pid());".into()),
        ("user function that writes", "SELECT bump();".into()),
        ("COPY TO PROGRAM", "COPY t TO PROGRAM 'touch /tmp/portcullis-pwned';".into()),
        ("PREPARE a write", "PREPARE p AS DELETE FROM t;".into()),
        ("EXECUTE of an unknown statement", "EXECUTE p;".into()),
        ("table deny, casing", "SELECT * FROM SECRETS;".into()),
        ("table deny, quoting", "SELECT * FROM \"secrets\";".into()),
        ("table deny, schema", "SELECT * FROM public.secrets;".into()),
        (
            "table deny, all of it",
            "SELECT * FROM \"PUBLIC\".secrets UNION SELECT * FROM \"public\".\"secrets\";".into(),
        ),
        ("table deny, subquery", "SELECT (SELECT value FROM Public.Secrets LIMIT 1);".into()),
        ("SET search_path", "SET search_path = pg_temp, public;".into()),
        ("deeply nested", nested),
        ("DO block", "DO $$ BEGIN DELETE FROM t; END $$;".into()),
        ("not SQL", "SELEC 1;".into()),
    ];
    for (what, sql) in &cases {
        let o = psql(&f, "ci", "127.0.0.53", &format!("{sql}\nSELECT 'alive';\n"));
        let (out, err) = output_text(&o);
        assert!(denied_by_portcullis(&err), "{what}: {sql:.200}\nstdout: {out}\nstderr: {err}");
        assert!(out.contains("alive"), "{what}: the connection stays usable: {out} {err}");
        assert!(!out.contains("the-crown-jewels"), "{what}: {out}");
    }
    // Nothing happened upstream.
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM t"), "1", "t is intact");
    assert_eq!(f.pg.sql("appdb", "SELECT is_called FROM s"), "f", "the sequence never moved");
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM pg_tables WHERE tablename = 'stolen'"), "0");
    assert!(!std::path::Path::new("/tmp/portcullis-pwned").exists());

    // The FunctionCall message (by oid, no SQL): refused, connection usable.
    let oid = f.pg.sql("appdb", "SELECT 'pg_terminate_backend'::regproc::oid");
    let bin = helper_bin("pg-client");
    let out =
        f.agent.exec("ci", &[bin.to_str().unwrap(), "fncall", "127.0.0.53", "5432", "appdb", &oid]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}{}", String::from_utf8_lossy(&out.stderr), f.agent.log_text()));
    assert_eq!(v["fncall"]["errors"][0]["C"], "42501", "{v}");
    assert_eq!(v["fncall"]["tags"], "EZ", "{v}");
    assert_eq!(v["after"]["data"][0].as_str().map(|s| s.contains("still usable")), Some(true), "{v}");
    let rec = f.agent.wait_audit("the function call", |r| r["request"]["kind"] == "FunctionCall");
    assert_eq!(rec["decision"]["verdict"], "deny");
}

#[test]
fn a_denial_inside_a_transaction_aborts_it() {
    let Some(f) = fixture() else { return };
    let o = psql(
        &f,
        "writer",
        "127.0.0.53",
        "BEGIN;\n\
         INSERT INTO items VALUES (10, 'ten');\n\
         UPDATE secrets SET value = 'x';\n\
         COMMIT;\n\
         SELECT 'count', count(*) FROM items;\n",
    );
    let (out, err) = output_text(&o);
    assert!(denied_by_portcullis(&err), "{err}\n{}", f.agent.log_text());
    assert!(err.contains("deny_tables"), "{err}");
    assert!(out.contains("ROLLBACK"), "COMMIT of an aborted transaction rolls back: {out}");
    assert!(out.contains("count|3"), "{out}");
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM items WHERE id = 10"), "0");

    // DDL under `approve` is held; nobody answers within the rule's
    // timeout, so it is denied, saying so.
    let (out, err) = output_text(&psql(&f, "writer", "127.0.0.53", "CREATE TABLE t3 (a int);\nSELECT 'alive';\n"));
    assert!(denied_by_portcullis(&err) && err.contains("approval timed out"), "{out}{err}");
    assert!(err.contains("statement awaits approval"), "{err}");
    assert!(out.contains("alive"), "the connection stays usable: {out}");

    // Writes the role may do go through, and their authorisation is recorded.
    let (out, err) = output_text(&psql(&f, "writer", "127.0.0.53", "INSERT INTO items VALUES (11, 'eleven');\n"));
    assert!(out.contains("INSERT 0 1") || err.is_empty(), "{out}{err}");
    assert_eq!(f.pg.sql("appdb", "SELECT name FROM items WHERE id = 11"), "eleven");
    let rec =
        f.agent.wait_audit("the insert", |r| r["request"]["kind"] == "INSERT" && r["decision"]["verdict"] == "allow");
    assert_eq!(rec["decision"]["rule"], "roles.writer.rules[0]");
}

#[test]
fn copy_both_ways_as_the_policy_says() {
    let Some(f) = fixture() else { return };
    let (out, err) = output_text(&psql(
        &f,
        "writer",
        "127.0.0.53",
        "COPY items FROM STDIN;\n20\ttwenty\n21\ttwenty-one\n\\.\nCOPY (SELECT id FROM items WHERE id >= 20 ORDER BY id) TO STDOUT;\n",
    ));
    assert!(out.contains("20\n21"), "{out}\n{err}\n{}", f.agent.log_text());
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM items WHERE id >= 20"), "2");
    // The answer says how many rows went out (43 bytes: the COPY header,
    // two rows, CopyDone and the tag; the COPY FROM answer has 24).
    let out_answer = f.agent.wait_audit("the COPY TO answer", |r| {
        r["type"] == "response" && r["summary"]["status"] == "COPY 2" && r["summary"]["bytes"].as_u64() > Some(30)
    });
    assert_eq!(out_answer["summary"]["rows"], 2, "{out_answer}");
    let (out, err) =
        output_text(&psql(&f, "ci", "127.0.0.53", "COPY items FROM STDIN;\n30\tthirty\n\\.\nSELECT 'alive';\n"));
    assert!(denied_by_portcullis(&err), "{out}{err}");
    assert_eq!(f.pg.sql("appdb", "SELECT count(*) FROM items WHERE id = 30"), "0");
}

#[test]
fn session_level_denial_startup_filtering_cancel_and_reload() {
    let Some(f) = fixture() else { return };
    // A role without a rule for the target: FATAL 42501 at start-up.
    let (out, err) = output_text(&psql(&f, "nobody", "127.0.0.53", "SELECT 1;\n"));
    assert!(err.contains("FATAL:  permission denied by portcullis (roles.outsider)"), "{out}{err}");
    let r = pg_client(&f, "nobody", "query", "", "SELECT 1\n");
    assert_eq!(r[0]["connected"], false, "{r:?}");
    assert_eq!(r[0]["error"]["code"], "42501", "{r:?}");

    // Startup `options` are dropped: search_path stays the default.
    let (out, err) = output_text(&psql_with(
        &f,
        "ci",
        "127.0.0.53",
        "SHOW search_path;\n",
        &[("PGOPTIONS", "-c search_path=pg_temp")],
    ));
    assert_eq!(out.trim(), "\"$user\", public", "{err}");

    // CancelRequest with portcullis' key reaches the upstream with its own.
    let r = pg_client(&f, "ci", "cancel", "", "");
    assert_eq!(r[1]["cancel_sent"], true, "{r:?}");
    assert_eq!(r[1]["result"]["error"]["code"], "57014", "the query was cancelled: {r:?}\n{}", f.agent.log_text());

    // A reload applies to the next statement of an open session, also to a
    // statement decided before it (the same text, or the same but for its
    // numbers, in the simple and the extended protocol).
    let bin = helper_bin("pg-client");
    let mut child = f
        .agent
        .exec("ci", &[bin.to_str().unwrap(), "query", "127.0.0.53", "5432", "x", "", "appdb"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"SELECT 'before'\nSIMPLE SELECT 'before'\nSIMPLE SELECT 41 + 1\n").unwrap();
    stdin.flush().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut next = || serde_json::from_str::<Value>(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(next()["connected"], true);
    assert_eq!(next()["rows"], serde_json::json!([["before"]]));
    assert_eq!(next()["rows"], serde_json::json!([["before"]]));
    assert_eq!(next()["rows"], serde_json::json!([["42"]]));
    let tightened = policy(&f.pg, "/dev/null").replace(
        "allow = [\"read\", \"session\", \"transaction\"]\ndeny = [\"*\"]",
        "allow = [\"session\"]\ndeny = [\"*\"]",
    );
    f.agent.replace_policy(&tightened).expect("reload");
    stdin.write_all(b"SELECT 'after'\nSELECT 'before'\nSIMPLE SELECT 'before'\nSIMPLE SELECT 40 + 2\n").unwrap();
    drop(stdin);
    for _ in 0..4 {
        let after = next();
        assert_eq!(after["error"]["code"], "42501", "{after}");
    }
    let _ = child.wait();
}

/// A test CA and a server certificate for `db.test`, made with openssl in
/// `dir`; the key is handed to the `postgres` user.
fn make_server_cert(dir: &std::path::Path, name: &str) {
    let sh = |cmd: &str| {
        let o = std::process::Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().unwrap();
        assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    };
    sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={name}-ca -keyout {name}-ca.key -out {name}-ca.pem \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
    ));
    sh(&format!(
        "openssl req -newkey rsa:2048 -nodes -subj /CN=db.test -keyout {name}.key -out {name}.csr && \
         printf 'subjectAltName=DNS:db.test\\nextendedKeyUsage=serverAuth\\n' > {name}.ext && \
         openssl x509 -req -in {name}.csr -CA {name}-ca.pem -CAkey {name}-ca.key -CAcreateserial -days 2 \
         -extfile {name}.ext -out {name}.pem && chown postgres {name}.key {name}.pem && chmod 600 {name}.key"
    ));
}

#[test]
fn tls_to_the_caller_and_verified_tls_upstream_with_cleartext_only_over_it() {
    if !require_root() || !require_tool("psql") || !require_tool("openssl") {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    make_server_cert(certs.path(), "server");
    make_server_cert(certs.path(), "other");
    let c = |f: &str| certs.path().join(f).to_str().unwrap().to_string();
    let pg = PgServer::start_with(&[
        "-c",
        "fsync=off",
        "-c",
        "ssl=on",
        "-c",
        &format!("ssl_cert_file={}", c("server.pem")),
        "-c",
        &format!("ssl_key_file={}", c("server.key")),
    ]);
    pg.create_user("tlsuser", APP_PASSWORD, PgAuth::Scram);
    // This user is asked for a cleartext password, with or without TLS.
    std::fs::write(
        pg.dir.path().join("data/pg_hba.conf"),
        "local all all trust\nhost all tlsuser 127.0.0.1/32 password\nhost all all 127.0.0.1/32 md5\n",
    )
    .unwrap();
    pg.sql("postgres", "SELECT pg_reload_conf()");
    let policy = format!(
        "version = 1\n[[scopes]]\nname = \"ci\"\ncgroup = \"@CG@/ci\"\n\n\
         [[targets]]\nname = \"tls-db\"\nprotocol = \"postgres\"\nmatch = [\"127.0.0.55:5432\"]\nupstream = \"{up}\"\n\
         [targets.tls]\nclient = true\nupstream = true\nca = \"{ca}\"\nserver_name = \"db.test\"\n\
         [targets.credentials]\nuser = \"tlsuser\"\npassword = {{ env = \"TLS_DB_PASSWORD\" }}\n\n\
         [[targets]]\nname = \"plain-db\"\nprotocol = \"postgres\"\nmatch = [\"127.0.0.56:5432\"]\nupstream = \"{up}\"\n\
         [targets.credentials]\nuser = \"tlsuser\"\npassword = {{ env = \"TLS_DB_PASSWORD\" }}\n\n\
         [[targets]]\nname = \"wrong-ca-db\"\nprotocol = \"postgres\"\nmatch = [\"127.0.0.57:5432\"]\nupstream = \"{up}\"\n\
         [targets.tls]\nupstream = true\nca = \"{other}\"\nserver_name = \"db.test\"\n\
         [targets.credentials]\nuser = \"tlsuser\"\npassword = {{ env = \"TLS_DB_PASSWORD\" }}\n\n\
         [[roles]]\nname = \"reader\"\n\
         [[roles.rules]]\ntarget = \"tls-db\"\nallow = [\"read\"]\n\
         [[roles.rules]]\ntarget = \"plain-db\"\nallow = [\"read\"]\n\
         [[roles.rules]]\ntarget = \"wrong-ca-db\"\nallow = [\"read\"]\n\n\
         [[bindings]]\nscope = \"ci\"\nrole = \"reader\"\n",
        up = pg.addr,
        ca = c("server-ca.pem"),
        other = c("other-ca.pem"),
    );
    let agent = Agent::start_with_env(&policy, &[("TLS_DB_PASSWORD", APP_PASSWORD)]);
    let local_ca = agent.state_dir().join("ca/ca.pem");
    let run = |host: &str, sslmode: &str| {
        let conn = format!(
            "host={host} port=5432 user=x dbname=postgres sslmode={sslmode} sslrootcert={} connect_timeout=10",
            local_ca.display()
        );
        let o = agent
            .exec("ci", &["psql", &conn, "-X", "-At", "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"])
            .output()
            .unwrap();
        output_text(&o)
    };
    // The caller verifies portcullis' certificate for the address it dialled;
    // portcullis verifies the server's and may then send a cleartext password.
    let (out, err) = run("127.0.0.55", "verify-full");
    assert_eq!(out.trim(), "t", "TLS upstream: {out}{err}\n{}", agent.log_text());
    // Without upstream TLS the cleartext request is refused.
    let (out, err) = run("127.0.0.56", "disable");
    assert!(out.is_empty() && err.contains("cannot open a session on the upstream"), "{out}{err}");
    agent.wait_log("refusing to send a cleartext password");
    // A server certificate the target's CA did not sign: no session.
    let (out, err) = run("127.0.0.57", "disable");
    assert!(out.is_empty() && err.contains("no verified TLS"), "{out}{err}");
    // A target without `tls.client` answers SSLRequest with N.
    let (out, err) = run("127.0.0.56", "require");
    assert!(err.contains("does not support SSL") || err.contains("SSL"), "{out}{err}");
}
