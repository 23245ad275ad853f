//! PostgreSQL response masking end to end: a real PostgreSQL 15 server, real
//! psql (simple protocol, text results) and tokio-postgres (extended
//! protocol, binary results) inside guarded cgroups. Column rules are
//! matched on the source column (table oid and attribute number), value
//! detectors run over text, and nothing clear reaches the caller or the
//! audit log.
use std::{
    io::{BufRead, BufReader, Write},
    process::Output,
};

use portcullis_tests::{
    fixtures::{app_db_target, output_text, require_postgres, secret_file},
    helper_bin,
    servers::PgServer,
    Agent,
};
use serde_json::Value;

const APP_PASSWORD: &str = "Mask3d-app-Pw-c41e";
const EMAILS: [&str; 3] = ["ann@example.io", "bob@example.io", "cy@example.io"];
const CARD: &str = "4111 1111 1111 1111";
const NOT_A_CARD: &str = "4111 1111 1111 1112";

fn policy(pg: &PgServer, pwfile: &str, keyfile: &str) -> String {
    format!(
        r#"
version = 1

[masking]
hash_key = {{ file = "{keyfile}" }}

[[scopes]]
name = "analyst"
cgroup = "@CG@/analyst"

[[scopes]]
name = "admin"
cgroup = "@CG@/admin"

{app_db}
[[roles]]
name = "analyst"
[[roles.rules]]
target = "app-db"
allow = ["read", "session", "transaction", "copy-out", "function-call"]
mask = ["column:public.users.email", "column:users.ssn=hash", "column:events.email", "column:people.email", "detector:card"]

[[roles]]
name = "admin"
[[roles.rules]]
target = "app-db"
allow = ["read", "session", "transaction", "copy-out", "function-call"]

[[bindings]]
scope = "analyst"
role = "analyst"

[[bindings]]
scope = "admin"
role = "admin"
"#,
        app_db = app_db_target(pg.addr, pwfile),
    )
}

struct Fixture {
    agent: Agent,
    pg: PgServer,
    pwfile: String,
    keyfile: String,
}

fn fixture() -> Option<Fixture> {
    if !require_postgres() {
        return None;
    }
    let pg = PgServer::with_app_db(APP_PASSWORD);
    pg.sql(
        "appdb",
        &format!(
            "CREATE TABLE users (id int PRIMARY KEY, email text, ssn text, note text);
             INSERT INTO users VALUES
               (1, '{}', '123-45-6789', 'card {CARD} on file'),
               (2, '{}', '123-45-6789', 'order {NOT_A_CARD} shipped'),
               (3, '{}', '987-65-4321', 'nothing to see');
             CREATE FUNCTION email_of(int) RETURNS text LANGUAGE sql AS 'SELECT email FROM users WHERE id = $1';
             CREATE TABLE notes (id int, body text);
             INSERT INTO notes VALUES (1, 'paid with {CARD}'), (2, 'ref {NOT_A_CARD}');
             CREATE VIEW contacts AS SELECT id, email AS contact FROM users;
             CREATE VIEW contact_list AS SELECT contact FROM contacts;
             CREATE MATERIALIZED VIEW contact_copy AS SELECT id, upper(email) AS e FROM users;
             CREATE SCHEMA report;
             CREATE VIEW report.\"Who\" AS SELECT n.id, u.email FROM notes n JOIN users u USING (id);
             CREATE VIEW note_ids AS SELECT id, body FROM notes;
             CREATE VIEW first_email AS SELECT email_of(1) AS e;
             CREATE TABLE events (at int, email text, kind text) PARTITION BY RANGE (at);
             CREATE TABLE events_1 (kind text, email text, at int);
             ALTER TABLE events ATTACH PARTITION events_1 FOR VALUES FROM (0) TO (100);
             CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (at);
             CREATE TABLE events_2a PARTITION OF events_2 FOR VALUES FROM (100) TO (150);
             INSERT INTO events VALUES (1, '{}', 'login'), (120, '{}', 'logout');
             CREATE TABLE people (id int, email text);
             CREATE TABLE people_old (gone date) INHERITS (people);
             INSERT INTO people_old VALUES (9, '{}', '2020-01-01');
             ANALYZE users;",
            EMAILS[0], EMAILS[1], EMAILS[2], EMAILS[0], EMAILS[1], EMAILS[2]
        ),
    );
    let pwfile = secret_file("app-db.pw", &format!("{APP_PASSWORD}\n"));
    let keyfile = secret_file("mask.key", "a-test-hash-key-of-enough-length\n");
    let agent = Agent::start(&policy(&pg, &pwfile, &keyfile));
    Some(Fixture { agent, pg, pwfile, keyfile })
}

fn psql(f: &Fixture, scope: &str, script: &str) -> Output {
    f.agent.spawn_psql(scope, "127.0.0.53", script, &[("PGPASSWORD", "anything")]).wait_with_output().unwrap()
}

fn no_email(s: &str) -> bool {
    !s.to_ascii_lowercase().contains("example.io")
}

#[test]
fn columns_are_masked_for_the_masked_role_and_clear_for_another() {
    let Some(f) = fixture() else { return };
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT email FROM users ORDER BY id;\n"));
    assert_eq!(out, "****\n****\n****\n", "{err}\n{}", f.agent.log_text());
    let (out, err) = output_text(&psql(&f, "admin", "SELECT email FROM users ORDER BY id;\n"));
    assert_eq!(out, format!("{}\n{}\n{}\n", EMAILS[0], EMAILS[1], EMAILS[2]), "{err}");

    // Aliases keep their source column; expressions over it do not leak.
    let script = "SELECT email AS contact FROM users ORDER BY id;\n\
                  SELECT upper(email), email || '', lower(email) AS x, length(email) FROM users ORDER BY id;\n\
                  SELECT row_to_json(u) FROM users u ORDER BY id;\n\
                  SELECT u.* FROM users u WHERE id = 1;\n\
                  SELECT u FROM users u ORDER BY id;\n\
                  SELECT c FROM contacts c;\n\
                  SELECT e FROM (SELECT email AS e FROM users) s ORDER BY 1;\n\
                  WITH t(a, b) AS (SELECT id, email FROM users) SELECT upper(b) FROM t;\n\
                  SELECT id::text || ':' || email FROM users;\n\
                  SELECT 'alive';\n";
    let (out, err) = output_text(&psql(&f, "analyst", script));
    assert!(no_email(&out) && no_email(&err), "{out}\n{err}");
    assert!(out.contains("alive") && out.contains("****"), "{out}\n{err}");
    // Functions that read masked columns: by SQL, and by the FunctionCall
    // message, whose result cannot be traced to a column.
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT email_of(1);\n"));
    assert!(no_email(&out) && out.contains("****"), "{out}\n{err}");
    let oid = f.pg.sql("appdb", "SELECT 'email_of'::regproc::oid");
    let bin = helper_bin("pg-client");
    for (scope, clear) in [("analyst", false), ("admin", true)] {
        let out = f
            .agent
            .exec(scope, &[bin.to_str().unwrap(), "fncall", "127.0.0.53", "5432", "appdb", &oid])
            .output()
            .unwrap();
        let v: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        if clear {
            assert_eq!(v["fncall"]["values"][0], EMAILS[0], "{v}");
        } else {
            assert!(v["fncall"]["values"][0].is_null(), "{v}");
        }
    }
    // Columns that are not masked stay readable.
    let (out, _) = output_text(&psql(&f, "analyst", "SELECT id FROM users ORDER BY id;\n"));
    assert_eq!(out, "1\n2\n3\n");

    // Errors that would quote a masked value do not.
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT email::int FROM users;\nSELECT 'alive';\n"));
    assert!(err.contains("22P02"), "{err}");
    assert!(no_email(&err) && out.contains("alive"), "{out}\n{err}");
}

#[test]
fn views_over_masked_columns_are_masked_too() {
    // A view (or a view over it, or a materialized view) reports its own
    // table oid, so a rule on users.email alone would let it through. Every
    // column of a view that reads a masked relation, or calls a function of
    // the database's own, is masked.
    let Some(f) = fixture() else { return };
    let script = "SELECT contact FROM contacts ORDER BY id;\n\
                  SELECT * FROM contact_list;\n\
                  SELECT e FROM contact_copy ORDER BY id;\n\
                  SELECT email FROM report.\"Who\";\n\
                  SELECT upper(contact), contact || '' FROM contacts;\n\
                  SELECT upper(e) FROM contact_copy;\n\
                  SELECT e FROM first_email;\n\
                  SELECT 'alive';\n";
    let (out, err) = output_text(&psql(&f, "analyst", script));
    assert!(no_email(&out) && no_email(&err), "{out}\n{err}\n{}", f.agent.log_text());
    assert!(out.contains("alive") && out.contains("****"), "{out}\n{err}");
    let (out, err) = output_text(&psql(&f, "analyst", "COPY (SELECT * FROM contacts) TO STDOUT;\n"));
    assert!(err.contains("42501") && no_email(&out), "{out}\n{err}");
    // A view over unmasked columns only stays readable; the admin role
    // reads the views in clear.
    // The planner's statistics sample column values (histogram bounds,
    // most common values).
    let stats =
        "SELECT histogram_bounds, most_common_vals FROM pg_stats WHERE tablename = 'users' AND attname = 'email';\n\
                 SELECT histogram_bounds::text FROM pg_catalog.pg_stats WHERE attname = 'email';\n";
    let (out, err) = output_text(&psql(&f, "admin", stats));
    assert!(!no_email(&out), "the admin role sees the statistics: {out}\n{err}");
    let (out, err) = output_text(&psql(&f, "analyst", stats));
    assert!(no_email(&out) && no_email(&err), "{out}\n{err}");
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT id FROM note_ids ORDER BY id;\n"));
    assert_eq!(out, "1\n2\n", "{err}");
    let (out, err) = output_text(&psql(&f, "admin", "SELECT contact FROM contacts ORDER BY id;\n"));
    assert_eq!(out, format!("{}\n{}\n{}\n", EMAILS[0], EMAILS[1], EMAILS[2]), "{err}");
}

#[test]
fn partitions_and_inheritance_children_are_masked_as_their_parent() {
    // A partition read by its own name reports its own oid, and its columns
    // may sit at other positions than the parent's (events_1 is attached
    // with its columns in another order).
    let Some(f) = fixture() else { return };
    let script = "SELECT email FROM events ORDER BY at;\n\
                  SELECT email FROM events_1;\n\
                  SELECT * FROM events_2a;\n\
                  SELECT email FROM ONLY people_old;\n\
                  SELECT upper(email) FROM events_2;\n\
                  SELECT email || '' FROM people_old;\n\
                  SELECT kind, at FROM events_1;\n";
    let (out, err) = output_text(&psql(&f, "analyst", script));
    assert!(no_email(&out) && no_email(&err), "{out}\n{err}\n{}", f.agent.log_text());
    assert!(out.contains("login|1") && out.contains("****"), "unmasked columns stay readable: {out}\n{err}");
    let (out, err) = output_text(&psql(&f, "analyst", "COPY events_1 TO STDOUT;\n"));
    assert!(err.contains("42501") && no_email(&out), "{out}\n{err}");
    let (out, err) = output_text(&psql(&f, "admin", "SELECT email FROM events_1;\n"));
    assert_eq!(out, format!("{}\n", EMAILS[0]), "{err}");
}

#[test]
fn detectors_mask_cards_in_free_text_and_leave_non_luhn_numbers() {
    let Some(f) = fixture() else { return };
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT body FROM notes ORDER BY id;\n"));
    assert_eq!(out, format!("paid with <card>\nref {NOT_A_CARD}\n"), "{err}");
    // In an error message too.
    let (_, err) = output_text(&psql(&f, "analyst", "SELECT body::int FROM notes WHERE id = 1;\n"));
    assert!(err.contains("22P02") && !err.contains(CARD), "{err}");
    let (out, _) = output_text(&psql(&f, "admin", "SELECT body FROM notes ORDER BY id;\n"));
    assert!(out.contains(CARD), "{out}");
}

#[test]
fn hash_mode_keeps_equality() {
    let Some(f) = fixture() else { return };
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT ssn FROM users ORDER BY id;\n"));
    let v: Vec<&str> = out.lines().collect();
    assert_eq!(v.len(), 3, "{out}\n{err}");
    assert!(v.iter().all(|h| h.starts_with("hash:") && !h.contains("-")), "{out}");
    assert_eq!(v[0], v[1], "equal values hash equal");
    assert_ne!(v[0], v[2]);
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT ssn FROM users GROUP BY ssn ORDER BY 1;\n"));
    let groups: Vec<&str> = out.lines().collect();
    assert_eq!(groups.len(), 2, "{out}\n{err}");
    assert!(groups.contains(&v[0]) && groups.contains(&v[2]), "{out}");
    // Comparing two rows server-side still works on the real values.
    let (out, _) = output_text(&psql(
        &f,
        "analyst",
        "SELECT a.id, b.id FROM users a JOIN users b ON a.ssn = b.ssn AND a.id < b.id;\n",
    ));
    assert_eq!(out, "1|2\n");
}

#[test]
fn binary_results_of_masked_columns_are_null() {
    let Some(f) = fixture() else { return };
    let mut child = f.agent.spawn_pg_client("analyst", "query", "anything");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT id, email, note FROM users ORDER BY id\nSELECT upper(email) FROM users\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(lines.len(), 3, "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows = lines[1]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{}", lines[1]);
    assert_eq!(rows[0][0], 1);
    assert!(rows.iter().all(|r| r[1].is_null()), "masked columns in binary are NULL: {}", lines[1]);
    assert!(!rows[0][2].as_str().unwrap_or("").contains(CARD), "{}", lines[1]);
    assert!(lines[2]["rows"].as_array().unwrap().iter().all(|r| r[0].is_null()), "{}", lines[2]);
    assert!(no_email(&stdout), "{stdout}");
}

#[test]
fn copy_out_is_masked_or_refused_and_the_audit_log_holds_no_clear_value() {
    let Some(f) = fixture() else { return };
    let (out, err) = output_text(&psql(&f, "analyst", "COPY users TO STDOUT;\nSELECT 'alive';\n"));
    assert!(err.contains("42501") && err.contains("masked columns"), "{err}");
    assert!(no_email(&out) && out.contains("alive"), "{out}");
    let (out, err) =
        output_text(&psql(&f, "analyst", "COPY (SELECT upper(email) FROM users) TO STDOUT WITH (FORMAT csv);\n"));
    assert!(err.contains("42501") && no_email(&out), "{out}\n{err}");
    let (out, err) =
        output_text(&psql(&f, "analyst", "COPY notes TO STDOUT;\nCOPY notes TO STDOUT WITH (FORMAT csv);\n"));
    assert!(!out.contains(CARD), "{out}\n{err}");
    assert!(out.contains("1\tpaid with <card>") && out.contains("1,paid with <card>"), "{out}\n{err}");
    assert!(out.contains(NOT_A_CARD), "{out}");

    // Everything above and a plain read are recorded; no clear value is.
    psql(&f, "analyst", "SELECT * FROM users;\n");
    f.agent
        .wait_audit("the read", |r| r["request"]["sql"].as_str().is_some_and(|s| s.starts_with("SELECT * FROM users")));
    let log = serde_json::to_string(&f.agent.audit()).unwrap();
    assert!(no_email(&log), "the audit log holds a clear email");
    assert!(!log.contains(CARD) && !log.contains("123-45-6789") && !log.contains(APP_PASSWORD));
}

#[test]
fn a_reload_that_changes_the_masks_closes_open_sessions() {
    let Some(f) = fixture() else { return };
    let mut child = f.agent.spawn_pg_client("analyst", "query", "anything");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut connected = String::new();
    stdout.read_line(&mut connected).unwrap();
    assert!(connected.contains(r#""connected":true"#), "{connected}");
    fn ask(
        stdin: &mut std::process::ChildStdin,
        stdout: &mut BufReader<std::process::ChildStdout>,
        sql: &str,
    ) -> Value {
        stdin.write_all(format!("{sql}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("pg-client said: {line}"))
    }
    let base = policy(&f.pg, &f.pwfile, &f.keyfile);
    let r = ask(&mut stdin, &mut stdout, "SELECT email FROM users WHERE id = 2");
    assert!(r["ok"] == true && r["rows"][0][0].is_null(), "{r}");

    // Another role's rule changes: this session's masks do not.
    f.agent
        .replace_policy(&base.replacen(
            r#"name = "admin"
[[roles.rules]]
target = "app-db"
allow = ["read","#,
            r#"name = "admin"
[[roles.rules]]
target = "app-db"
allow = ["utility", "read","#,
            1,
        ))
        .unwrap();
    let r = ask(&mut stdin, &mut stdout, "SELECT email FROM users WHERE id = 3");
    assert!(r["ok"] == true && r["rows"][0][0].is_null(), "{r}");

    // The analyst's masks change: the open session is closed.
    let changed = base.replace(r#""detector:card"]"#, r#""detector:card", "detector:email"]"#);
    assert_ne!(changed, base);
    f.agent.replace_policy(&changed).unwrap();
    let r = ask(&mut stdin, &mut stdout, "SELECT id FROM users WHERE id = 1");
    assert_eq!(r["ok"], false, "{r}");
    drop(stdin);
    let _ = child.wait();
    f.agent.wait_log("the session's masks changed with a policy reload");
    let (out, err) = output_text(&psql(&f, "analyst", "SELECT email FROM users ORDER BY id;\n"));
    assert_eq!(out, "****\n****\n****\n", "{err}");
}
