//! Faults end to end, through the real eBPF path: upstreams that refuse,
//! stall or reset; an audit disk that fills up; a policy file deleted under
//! a running agent; the agent killed and restarted under PostgreSQL load.
//!
//! What must hold each time: the caller gets a clear answer (an error, a
//! close), nothing reaches an upstream that the audit log does not show,
//! and the log's hash chain verifies afterwards.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use portcullis_tests::{
    fixtures::{require_postgres, Tmpfs},
    free_port, require_tool,
    servers::{EchoServer, HttpServer, PgServer},
    Agent,
};
use serde_json::Value;

const PG_PASSWORD: &str = "Faults-Pg-Pw-4d2e";

/// A scope `ci` with every protocol's target at a fixed declared address.
/// `{tcp}`, `{http}` and `{pg}` are the upstreams.
fn policy(tcp: SocketAddr, http: SocketAddr, pg: SocketAddr, pwfile: &Path) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "ci"
cgroup = "@CG@/ci"
egress = "deny"

[[targets]]
name = "raw"
protocol = "tcp"
match = ["127.0.0.53:7300"]
upstream = "{tcp}"

[[targets]]
name = "web"
protocol = "http"
match = ["127.1.0.2:80"]
hosts = ["web.example.test"]
upstream = "{http}"

[[targets]]
name = "db"
protocol = "postgres"
match = ["127.0.0.53:5432"]
upstream = "{pg}"
[targets.credentials]
user = "app"
password = {{ file = "{pwfile}" }}

[[roles]]
name = "ci"
[[roles.rules]]
target = "raw"
allow = ["connect"]
[[roles.rules]]
target = "web"
allow = ["read", "POST /**"]
deny = ["DELETE"]
[[roles.rules]]
target = "db"
allow = ["read", "write", "session", "transaction"]
deny = ["*"]

[[bindings]]
scope = "ci"
role = "ci"
"#,
        pwfile = pwfile.display()
    )
}

/// An address where nothing listens (a port bound and released).
fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn pwfile(dir: &Path) -> PathBuf {
    let p = dir.join("db.pw");
    std::fs::write(&p, format!("{PG_PASSWORD}\n")).unwrap();
    p
}

fn pg_server() -> PgServer {
    let pg = PgServer::with_app_db(PG_PASSWORD);
    pg.sql("appdb", "CREATE TABLE log (n int PRIMARY KEY); ALTER TABLE log OWNER TO app");
    pg
}

fn tools() -> bool {
    require_postgres() && require_tool("curl") && require_tool("mount")
}

/// psql inside `ci` against the declared address, one script.
fn psql(agent: &Agent, script: &str) -> Output {
    let mut cmd = agent.psql("ci", "127.0.0.53", &["-v", "ON_ERROR_STOP=1", "-c", script]);
    cmd.env("PGPASSWORD", "not-the-password");
    cmd.output().expect("run psql")
}

/// curl inside `ci` to the http target; (output, body, status).
fn curl(agent: &Agent, args: &[&str]) -> (Output, String, u16) {
    let mut argv = vec!["curl", "-sS", "--max-time", "60", "--resolve", "web.example.test:80:127.1.0.2"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["-w", "\n%{http_code}"]);
    let out = agent.exec("ci", &argv).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or(0);
    (out.clone(), body.to_string(), code)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn verify(agent: &Agent) {
    let out = agent.sessions(&["verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "sessions verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metric(agent: &Agent, name: &str) -> f64 {
    agent
        .metrics_text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Sets SO_LINGER to zero, so that closing the socket sends a RST.
fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Reads an HTTP/1.1 request head (and no body).
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A plain-HTTP upstream with a fault: each request's head is read, then
/// `answer` runs on the connection. Counts requests.
struct FaultyHttp {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl FaultyHttp {
    fn start(answer: fn(TcpStream, &str)) -> FaultyHttp {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let n = requests.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let n = n.clone();
                thread::spawn(move || {
                    let head = read_head(&mut s);
                    if head.is_empty() {
                        return;
                    }
                    n.fetch_add(1, Ordering::Relaxed);
                    answer(s, &head);
                });
            }
        });
        FaultyHttp { addr, requests }
    }
}

/// A TCP upstream with a fault, run on each connection.
fn faulty_tcp(answer: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || answer(s));
        }
    });
    addr
}

#[test]
fn an_upstream_that_refuses_gets_a_clear_error_per_protocol() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&policy(dead_addr(), dead_addr(), dead_addr(), &pwfile(dir.path())));

    // tcp: accepted (the caller connected to the enforcer), then closed.
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7300", "hello"]);
    assert_eq!(r["reply"], "", "{r}");
    let end = agent.wait_audit("tcp session end", |e| {
        e["type"] == "session_end" && e["reason"].as_str().is_some_and(|r| r.contains("upstream"))
    });
    assert!(end["bytes_up"].as_u64() == Some(0), "{end}");

    // http: 502 with a JSON body naming the failure.
    let (out, body, code) = curl(&agent, &["http://web.example.test/status"]);
    assert_eq!(code, 502, "{body} {}", stderr(&out));
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["error"], "upstream_error", "{v}");
    agent.wait_audit("http request end with an error", |e| {
        e["type"] == "request_end" && e["request"]["protocol"] == "http" && e["error"].is_string()
    });

    // postgres: an ErrorResponse the client prints, not a bare close.
    let o = psql(&agent, "SELECT 1");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("cannot reach the upstream of target db"), "{err}");
    agent.wait_audit("postgres session end", |e| {
        e["type"] == "session_end" && e["reason"].as_str().is_some_and(|r| r.contains("upstream connect failed"))
    });
    assert!(metric(&agent, "portcullis_upstream_failures_total") >= 3.0, "{}", agent.metrics_text());
    verify(&agent);
}

#[test]
fn a_slow_upstream_is_waited_for_and_never_bypassed() {
    if !tools() {
        return;
    }
    let tcp = faulty_tcp(|mut s| {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        thread::sleep(Duration::from_secs(2));
        let _ = s.write_all(b"slow:");
        let _ = s.write_all(&buf);
    });
    let http = FaultyHttp::start(|mut s, _| {
        thread::sleep(Duration::from_secs(3));
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nslow-ok");
    });
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&policy(tcp, http.addr, dead_addr(), &pwfile(dir.path())));

    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7300", "x"]);
    assert_eq!(r["reply"], "slow:x", "{r}");

    // The client waits for the answer (no timeout of portcullis' own cuts
    // a slow upstream short), and it came through portcullis.
    let (out, body, code) = curl(&agent, &["http://web.example.test/slow"]);
    assert_eq!((code, body.as_str()), (200, "slow-ok"), "{}", stderr(&out));
    assert_eq!(http.requests.load(Ordering::Relaxed), 1);
    agent.wait_audit("slow request recorded", |e| {
        e["type"] == "request_end" && e["request"]["path"] == "/slow" && e["request"]["status"] == 200
    });

    // While waiting, the caller cannot go around portcullis: the upstreams'
    // real addresses are not declared, and egress is denied.
    for a in [tcp, http.addr] {
        let r = agent.tcp_client("ci", &["tcp", &a.to_string(), "direct"]);
        assert_eq!(r["connected"], false, "{a}: {r}");
    }
    verify(&agent);
}

#[test]
fn an_upstream_reset_mid_response_is_a_clear_error_and_is_recorded() {
    if !tools() {
        return;
    }
    let tcp = faulty_tcp(|mut s| {
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
        let _ = s.write_all(b"partial");
        thread::sleep(Duration::from_millis(200));
        reset(s);
    });
    let http = FaultyHttp::start(|mut s, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
        let _ = s.write_all(&[b'a'; 1000]);
        let _ = s.flush();
        thread::sleep(Duration::from_millis(200));
        reset(s);
    });
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&policy(tcp, http.addr, dead_addr(), &pwfile(dir.path())));

    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7300", "go"]);
    assert!(r["reply"].as_str().is_some_and(|s| "partial".starts_with(s)), "{r}");
    agent.wait_audit("tcp session end after a reset", |e| e["type"] == "session_end" && e["bytes_up"] == 2);

    // curl sees a response cut short (not a complete one).
    let (out, body, code) = curl(&agent, &["http://web.example.test/cut"]);
    assert!(!out.status.success(), "curl succeeded on a cut response: {code} {}", body.len());
    assert!(body.len() < 100_000, "{}", body.len());
    let end = agent.wait_audit("http request end with the reset", |e| {
        e["type"] == "request_end" && e["request"]["path"] == "/cut"
    });
    assert!(end["error"].is_string(), "the cut is recorded: {end}");
    verify(&agent);
}

#[test]
fn a_full_audit_disk_refuses_state_changes_with_a_clear_error_and_recovers() {
    if !tools() {
        return;
    }
    let pg = pg_server();
    let http = HttpServer::plain("127.0.0.1:0");
    let echo = EchoServer::start("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let fs_dir = dir.path().join("auditfs");
    let tmpfs = Tmpfs::mount(&fs_dir, "512k");
    let log = fs_dir.join("audit");
    let agent = Agent::start_with_env(
        &policy(echo.addr, http.addr, pg.addr, &pwfile(dir.path())),
        &[("PORTCULLIS_AUDIT_DIR", log.to_str().unwrap())],
    );
    let o = psql(&agent, "INSERT INTO log VALUES (0)");
    assert!(o.status.success(), "{}", stderr(&o));

    let filler = tmpfs.fill();
    // PostgreSQL: an INSERT whose record cannot be written is not
    // forwarded, and the caller is told why. (The log file's last page may
    // still take a record or two: tmpfs allocates whole pages.)
    let mut inserted = vec![0];
    let mut refused = None;
    for i in 1..40 {
        let o = psql(&agent, &format!("INSERT INTO log VALUES ({i})"));
        if o.status.success() {
            inserted.push(i);
            continue;
        }
        refused = Some(stderr(&o));
        break;
    }
    let err = refused.expect("a full audit disk never refused an INSERT");
    assert!(err.contains("audit log cannot be written"), "{err}");
    let rows = pg.sql("appdb", "SELECT string_agg(n::text, ',' ORDER BY n) FROM log");
    let want = inserted.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    assert_eq!(rows, want, "only recorded INSERTs reached the server");

    // HTTP: a POST is refused with 503 and a JSON reason; nothing upstream.
    let before = http.requests_to("/upload").len();
    let (out, body, code) = curl(&agent, &["-X", "POST", "--data", "x", "http://web.example.test/upload"]);
    assert_eq!(code, 503, "{body} {}", stderr(&out));
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["error"], "audit_unavailable", "{v}");
    assert_eq!(http.requests_to("/upload").len(), before);

    // The failures show: log, metric, status.
    agent.wait_log("audit write failed");
    assert!(metric(&agent, "portcullis_audit_write_failures_total") >= 1.0, "{}", agent.metrics_text());
    assert!(metric(&agent, "portcullis_audit_records_lost_total") >= 1.0, "{}", agent.metrics_text());

    // Room again: both pass, and the chain verifies.
    std::fs::remove_file(&filler).unwrap();
    let o = psql(&agent, "INSERT INTO log VALUES (100)");
    assert!(o.status.success(), "{}", stderr(&o));
    let (out, body, code) = curl(&agent, &["-X", "POST", "--data", "x", "http://web.example.test/upload"]);
    assert_eq!(code, 200, "{body} {}", stderr(&out));
    agent.wait_audit("audit loss", |r| r["type"] == "audit_loss");
    verify(&agent);
    drop(agent);
    drop(tmpfs);
}

#[test]
fn a_deleted_policy_file_leaves_the_running_policy_in_force() {
    if !tools() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let http = HttpServer::plain("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&policy(echo.addr, http.addr, dead_addr(), &pwfile(dir.path())));
    let failures = |a: &Agent| a.status()["counters"]["reload_failures"].as_u64().unwrap_or(0);
    let before = failures(&agent);

    std::fs::remove_file(&agent.policy_path).unwrap();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.pid().unwrap() as i32, libc::SIGHUP) };
    agent.wait_log("the running policy stays in force");
    assert!(failures(&agent) > before);
    agent.wait_audit("policy rejected", |e| e["type"] == "policy_rejected");

    // Still enforced: what was allowed is, what was denied is not.
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7300", "still"]);
    assert_eq!(r["reply"], "echo:still", "{r}");
    let (_, _, code) = curl(&agent, &["http://web.example.test/x"]);
    assert_eq!(code, 200);
    let (_, body, code) = curl(&agent, &["-X", "DELETE", "http://web.example.test/x"]);
    assert_eq!(code, 403, "{body}");
    verify(&agent);
}

#[test]
fn postgres_under_load_across_an_agent_restart_lets_nothing_through_unrecorded() {
    if !tools() {
        return;
    }
    let pg = pg_server();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&policy(dead_addr(), dead_addr(), pg.addr, &pwfile(dir.path())));
    // The load runs from inside the cgroup directly (not `portcullis exec`,
    // which needs the agent that is about to be killed): a loop of psql
    // runs, each inserting its own number, until a stop file appears.
    let cg = agent.cgroup_dir("@CG@/ci");
    let stop = dir.path().join("stop");
    let script = format!(
        "echo $$ > {cg}/cgroup.procs; i=1; while [ ! -e {stop} ]; do \
         if psql -h 127.0.0.53 -p 5432 -U x -d appdb -X -At -c \"INSERT INTO log VALUES ($i)\" >/dev/null 2>>{errs}; \
         then echo ok $i; else echo fail $i; fi; i=$((i+1)); done",
        cg = cg.display(),
        stop = stop.display(),
        errs = dir.path().join("errors").display(),
    );
    let load = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("PGPASSWORD", "x")
        .env("PGCONNECT_TIMEOUT", "5")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let count = || pg.sql("appdb", "SELECT count(*) FROM log").parse::<usize>().unwrap();
    let wait_rows = |n: usize| {
        for _ in 0..600 {
            if count() >= n {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("the load made no progress");
    };
    wait_rows(5);
    // Killed hard: the pinned programs stay and keep steering the scope's
    // connections to the enforcer's port, where nothing listens until it
    // is back: refused, not let through to the server.
    agent.kill9();
    let client = portcullis_tests::helper_bin("tcp-client");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {}/cgroup.procs && exec {} tcp 127.0.0.53:5432", cg.display(), client.display()))
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["connected"], false, "a connection during the gap: {r}");
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    thread::sleep(Duration::from_millis(1500));
    agent.restart();
    wait_rows(count() + 5);
    std::fs::write(&stop, "").unwrap();
    let out = load.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok: Vec<&str> = lines.lines().filter_map(|l| l.strip_prefix("ok ")).collect();
    let failed = lines.lines().filter(|l| l.starts_with("fail ")).count();
    assert!(failed > 0, "the gap hit the load: {lines}");
    let errors = std::fs::read_to_string(dir.path().join("errors")).unwrap_or_default();
    assert!(errors.contains("refused") || errors.contains("closed"), "{errors}");

    // Every row in the table has its INSERT in the audit log, recorded as
    // allowed before it was forwarded; every INSERT psql reported done is
    // in the table.
    let allowed: std::collections::HashSet<String> = agent
        .audit()
        .iter()
        .filter(|r| r["type"] == "decision" && r["decision"]["verdict"] == "allow")
        .filter_map(|r| r["request"]["sql"].as_str().map(str::to_string))
        .collect();
    let rows = pg.sql("appdb", "SELECT n FROM log ORDER BY n");
    for n in rows.lines() {
        let sql = format!("INSERT INTO log VALUES ({n})");
        assert!(allowed.contains(&sql), "row {n} reached the server without an audit record");
    }
    let in_table: std::collections::HashSet<&str> = rows.lines().collect();
    for n in &ok {
        assert!(in_table.contains(n), "psql reported INSERT {n} done but it is not there");
    }
    verify(&agent);
}
