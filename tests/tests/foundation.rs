//! End to end through the real eBPF path: redirection, attribution,
//! roles, egress, fail-closed restarts and reloads.
use std::time::Duration;

use portcullis_tests::{fixtures::wait_until, require_root, servers::EchoServer, Agent};
use serde_json::Value;

/// Two scopes, one TCP target each way, an egress-deny scope with a DNS-like
/// exception. `@CG@` is the test's own cgroup subtree; `@ECHO@`,
/// `@ECHO6@` the upstream echo servers.
fn policy(echo: &EchoServer, echo6: &EchoServer, other_port: u16) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "ci"
cgroup = "@CG@/ci"
egress = "deny"
allow = ["127.0.0.1:{other}/tcp", "127.0.0.53:53/udp"]

[[scopes]]
name = "guest"
cgroup = "@CG@/guest"

[[targets]]
name = "echo"
protocol = "tcp"
match = ["127.0.0.53:7000"]
upstream = "{echo}"

[[targets]]
name = "echo6"
protocol = "tcp"
match = ["[::1]:7001"]
upstream = "{echo6}"

[[roles]]
name = "builder"
[[roles.rules]]
target = "echo"
allow = ["connect"]
[[roles.rules]]
target = "echo6"
allow = ["connect"]

[[roles]]
name = "nobody"

[[bindings]]
scope = "ci"
role = "builder"

[[bindings]]
scope = "guest"
role = "nobody"
"#,
        echo = echo.addr,
        echo6 = echo6.addr,
        other = other_port,
    )
}

struct Fixture {
    agent: Agent,
    echo: EchoServer,
    echo6: EchoServer,
    other: EchoServer,
}

fn fixture() -> Option<Fixture> {
    if !require_root() {
        return None;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let echo6 = EchoServer::start("[::1]:0");
    let other = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&policy(&echo, &echo6, other.addr.port()));
    Some(Fixture { agent, echo, echo6, other })
}

#[test]
fn guarded_process_reaches_target_and_sees_the_address_it_asked_for() {
    let Some(f) = fixture() else { return };
    let r = f.agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "hello"]);
    assert_eq!(r["connected"], true, "{r}");
    assert_eq!(r["reply"], "echo:hello", "{r}");
    assert_eq!(r["peer"], "127.0.0.53:7000", "getpeername shows the original destination: {r}");
    assert_eq!(f.echo.count(), 1);

    // The attempt is attributed: unit/cgroup, exe, uid, target, role.
    let start = f.agent.wait_audit("session start", |r| r["type"] == "session_start" && r["target"] == "echo");
    assert_eq!(start["caller"]["uid"], 0);
    assert!(start["caller"]["cgroup"].as_str().unwrap().ends_with("/ci"), "{start}");
    assert!(start["caller"]["exe"].as_str().unwrap().ends_with("tcp-client"), "{start}");
    assert_eq!(start["caller"]["scope"], "ci");
    assert_eq!(start["role"], "builder");
    assert_eq!(start["orig_dst"], "127.0.0.53:7000");

    // An unguarded process is untouched: 127.0.0.53:7000 has no listener.
    let direct = std::net::TcpStream::connect("127.0.0.53:7000");
    assert!(direct.is_err(), "outside the scope nothing is redirected");
    let direct = std::net::TcpStream::connect(f.echo.addr);
    assert!(direct.is_ok());
}

#[test]
fn role_without_access_is_refused_and_recorded() {
    let Some(f) = fixture() else { return };
    let r = f.agent.tcp_client("guest", &["tcp", "127.0.0.53:7000", "hello"]);
    // The kernel redirect succeeds, then the enforcer closes without relaying.
    assert_eq!(r["reply"], "", "denied caller gets no data: {r}");
    assert_eq!(f.echo.count(), 0, "nothing reached the upstream");
    let d = f.agent.wait_audit("denial", |r| r["type"] == "decision" && r["decision"]["verdict"] == "deny");
    assert!(d["decision"]["reason"].as_str().unwrap().contains("no rule for target echo"), "{d}");
    let line = f.agent.wait_log("verdict=deny");
    assert!(line.contains("uid=0"), "{line}");
    assert!(line.contains("exe=") && line.contains("tcp-client"), "{line}");
    assert!(line.contains("cgroup=") && line.contains("/guest"), "{line}");

    // A caller looping on the connection it is denied: recorded up to a
    // rate, the rest counted for that caller; every one is accounted for.
    const FLOOD: u64 = 1000;
    let many = portcullis_tests::helper_bin("many-conns");
    let _ = f.agent.exec("guest", &[many.to_str().unwrap(), "127.0.0.53:7000", &FLOOD.to_string()]).output();
    assert_eq!(f.echo.count(), 0, "nothing reached the upstream");
    let one_by_one = |r: &Value| r["type"] == "session_start" && r["role"] == "nobody";
    let counted = accounted_for(&f.agent, one_by_one, "denied_session", |total| total == FLOOD + 1);
    for r in f.agent.audit().iter().filter(|r| r["type"] == "suppressed" && r["of"] == "denied_session") {
        assert!(r["caller"].as_str().unwrap().ends_with("/guest"), "{r}");
    }
    assert!(counted > 0);
    // Another caller's denial is still recorded on its own.
    let before = f.agent.audit().iter().filter(|r| r["type"] == "session_start" && r["role"] == "builder").count();
    let r = f.agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "still"]);
    assert_eq!(r["reply"], "echo:still", "{r}");
    wait_until(Duration::from_secs(10), || {
        let n = f.agent.audit().iter().filter(|r| r["type"] == "session_start" && r["role"] == "builder").count();
        (n == before + 1).then_some(())
    })
    .expect("the other caller's session is recorded");
}

#[test]
fn ipv6_and_v4_mapped_destinations_are_intercepted() {
    let Some(f) = fixture() else { return };
    let r = f.agent.tcp_client("ci", &["tcp", "[::1]:7001", "six"]);
    assert_eq!(r["reply"], "echo:six", "{r}");
    assert_eq!(r["peer"], "[::1]:7001", "{r}");
    assert_eq!(f.echo6.count(), 1);

    // An IPv6 socket asking for the v4-mapped form of an IPv4 target.
    let r = f.agent.tcp_client("ci", &["tcp", "[::ffff:127.0.0.53]:7000", "mapped"]);
    assert_eq!(r["reply"], "echo:mapped", "{r}");
    assert_eq!(r["peer"], "[::ffff:127.0.0.53]:7000", "{r}");
    assert_eq!(f.echo.count(), 1);

    // The unspecified address connects to the local host: `[::]:7001` is
    // the target at `[::1]:7001` (nothing listens on [::1]:7001 itself).
    let r = f.agent.tcp_client("ci", &["tcp", "[::]:7001", "unspecified"]);
    assert_eq!(r["reply"], "echo:unspecified", "{r}");
    assert_eq!(f.echo6.count(), 2);
}

#[test]
fn egress_deny_blocks_undeclared_destinations_but_not_exceptions() {
    let Some(f) = fixture() else { return };
    // Undeclared TCP port: EPERM at connect, recorded.
    let blocked = EchoServer::start("127.0.0.1:0");
    let r = f.agent.tcp_client("ci", &["tcp", &blocked.addr.to_string(), "x"]);
    assert_eq!(r["connected"], false, "{r}");
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    assert_eq!(blocked.count(), 0);
    let k = f.agent.wait_audit("kernel refusal", |r| r["type"] == "kernel_refusal" && r["kind"] == "egress_denied");
    assert_eq!(k["dst"], blocked.addr.to_string());
    assert_eq!(k["caller"]["scope"], "ci");

    // The listed TCP exception works.
    let r = f.agent.tcp_client("ci", &["tcp", &f.other.addr.to_string(), "ok"]);
    assert_eq!(r["reply"], "echo:ok", "{r}");

    // UDP: the listed resolver is reachable, another port is not.
    let r = f.agent.tcp_client("ci", &["udp", "127.0.0.53:53"]);
    assert_eq!(r["sent"], true, "{r}");
    let r = f.agent.tcp_client("ci", &["udp", "127.0.0.53:54"]);
    assert_eq!(r["sent"], false, "{r}");
    assert_eq!(r["errno"], libc::EPERM);

    // UDP to a declared target's address is refused even where egress is
    // allowed: targets are reachable only through the enforcer.
    let r = f.agent.tcp_client("guest", &["udp", "127.0.0.53:7000"]);
    assert_eq!(r["sent"], false, "{r}");

    // The guest scope has egress allow: undeclared destinations pass.
    let r = f.agent.tcp_client("guest", &["tcp", &blocked.addr.to_string(), "free"]);
    assert_eq!(r["reply"], "echo:free", "{r}");

    // Raw sockets send to any address with no connect or UDP sendmsg to
    // decide on: under egress deny they are refused at socket(), recorded;
    // where egress is allowed they work.
    for dst in ["127.0.0.1:0", "[::1]:0"] {
        let r = f.agent.tcp_client("ci", &["raw", dst]);
        assert_eq!(r["created"], false, "{dst}: {r}");
        assert_eq!(r["errno"], libc::EPERM, "{dst}: {r}");
        let r = f.agent.tcp_client("guest", &["raw", dst]);
        assert_eq!(r["sent"], true, "{dst}: {r}");
    }
    let k = f.agent.wait_audit("raw socket", |r| r["type"] == "kernel_refusal" && r["kind"] == "raw_socket");
    assert_eq!(k["caller"]["scope"], "ci");

    // A caller looping on a refused connect: recorded up to a rate, the
    // rest counted; every refusal is accounted for.
    const FLOOD: u64 = 1000;
    let many = portcullis_tests::helper_bin("many-conns");
    let out = f.agent.exec("ci", &[many.to_str().unwrap(), &blocked.addr.to_string(), &FLOOD.to_string()]).output();
    assert!(out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Operation not permitted")));
    assert_eq!(blocked.count(), 1, "only the guest's connection got through");
    let total = |metrics: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with("portcullis_kernel_refusals_total ")).expect("metric");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let want = || total(&f.agent.metrics_text());
    let counted =
        accounted_for(&f.agent, |r| r["type"] == "kernel_refusal", "kernel_refusal", |n| n >= FLOOD && n == want());
    assert!(counted > 0);
}

#[test]
fn kill_9_fails_closed_and_restart_adopts_the_pinned_probes() {
    let Some(mut f) = fixture() else { return };
    let r = f.agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "before"]);
    assert_eq!(r["reply"], "echo:before", "{r}");

    f.agent.kill9();
    // Probes stay pinned: the connect is still steered to the (now closed)
    // enforcer port and refused, never let through to the upstream.
    let r = f.agent.tcp_client_raw("ci", &["tcp", "127.0.0.53:7000", "during"]);
    assert_eq!(r["connected"], false, "{r}");
    assert_eq!(f.echo.count(), 1);

    // The refused connect left a kernel record under its client address;
    // the restarted agent removes it, so nobody who later binds that
    // address can pass for the caller (records are dated in ~1 s units).
    std::thread::sleep(std::time::Duration::from_millis(1200));
    f.agent.restart();
    f.agent.wait_log("kernel records of connects made while no enforcer listened removed");
    let r = f.agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "after"]);
    assert_eq!(r["reply"], "echo:after", "{r}");
    assert_eq!(f.echo.count(), 2);
}

#[test]
fn unguarded_process_dialling_the_enforcer_gets_nothing() {
    let Some(f) = fixture() else { return };
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", f.agent.port)).expect("listener is up");
    let _ = s.write_all(b"hello");
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "no byte comes back");
    let u = f.agent.wait_audit("unattributed", |r| r["type"] == "unattributed");
    assert!(u["reason"].as_str().unwrap().contains("no kernel record"));

    // From inside a guarded scope the enforcer's port is refused outright.
    let r = f.agent.tcp_client("guest", &["tcp", &format!("127.0.0.1:{}", f.agent.port), "x"]);
    assert_eq!(r["connected"], false, "{r}");
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    f.agent.wait_audit("enforcer direct", |r| r["type"] == "kernel_refusal" && r["kind"] == "enforcer_port_direct");

    // A flood of them is recorded up to a rate and counted past it: every
    // one is accounted for, and the log does not grow a line per connect.
    const FLOOD: u64 = 1000;
    for _ in 0..FLOOD {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", f.agent.port)).expect("listener is up");
        let _ = s.read_to_end(&mut Vec::new());
    }
    let counted = accounted_for(&f.agent, |r| r["type"] == "unattributed", "unattributed", |n| n == FLOOD + 1);
    assert!(counted > 0);
    let metrics = f.agent.metrics_text();
    assert!(
        metrics.lines().any(|l| l == format!("portcullis_connections_unattributed_total {}", FLOOD + 1)),
        "{metrics}"
    );
}

#[test]
fn reload_applies_good_policies_and_keeps_the_old_one_on_errors() {
    let Some(f) = fixture() else { return };
    let good = policy(&f.echo, &f.echo6, f.other.addr.port());
    // A broken file: the running policy stays, the errors are logged.
    let broken = good.replace(
        "protocol = \"tcp\"\nmatch = [\"127.0.0.53:7000\"]",
        "protocol = \"tcpx\"\nmatch = [\"127.0.0.53:7000\"]",
    );
    assert_ne!(broken, good);
    let log = f.agent.replace_policy(&broken).expect_err("broken policy must be refused");
    assert!(log.contains("unknown protocol `tcpx`"), "{log}");
    let r = f.agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "still"]);
    assert_eq!(r["reply"], "echo:still", "old policy in force: {r}");
    f.agent.wait_audit("rejected", |r| r["type"] == "policy_rejected");

    // A good change takes effect: ci loses its rule for echo.
    let revoked = good.replace("[[roles.rules]]\ntarget = \"echo\"\nallow = [\"connect\"]\n", "");
    assert_ne!(revoked, good);
    f.agent.replace_policy(&revoked).expect("valid policy reloads");
    let r = f.agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "nope"]);
    assert_eq!(r["reply"], "", "{r}");
}

/// An editor's save followed by a SIGHUP reloads once; a SIGHUP on its own
/// (later, file unchanged) reloads again.
#[test]
fn a_file_change_with_a_sighup_reloads_once() {
    let Some(f) = fixture() else { return };
    let reloads = || f.agent.status()["counters"]["reloads"].as_u64().unwrap();
    let wait_for = |n: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reloads() < n {
            assert!(std::time::Instant::now() < deadline, "no reload:\n{}", f.agent.log_text());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let hup = || {
        // SAFETY: plain kill(2) on the agent, our own child.
        unsafe { libc::kill(f.agent.pid().unwrap() as i32, libc::SIGHUP) };
    };
    let before = reloads();
    let changed = policy(&f.echo, &f.echo6, f.other.addr.port()) + "\n# changed\n";
    std::fs::write(&f.agent.policy_path, changed.replace("@CG@", &f.agent.cgroup_base)).unwrap();
    wait_for(before + 1);
    hup();
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(reloads(), before + 1, "the SIGHUP after the file change has nothing to do");
    std::thread::sleep(std::time::Duration::from_millis(1600));
    hup();
    wait_for(before + 2);
}

#[test]
fn upstream_down_closes_the_callers_connection_and_is_recorded() {
    if !require_root() {
        return;
    }
    let dead = portcullis_tests::free_port();
    let p = format!(
        "version = 1\n[[scopes]]\nname = \"ci\"\ncgroup = \"@CG@/ci\"\n[[targets]]\nname = \"down\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.53:7002\"]\nupstream = \"127.0.0.1:{dead}\"\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"down\"\nallow = [\"connect\"]\n[[bindings]]\nscope = \"ci\"\nrole = \"r\"\n"
    );
    let agent = Agent::start(&p);
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7002", "x"]);
    assert_eq!(r["reply"], "", "{r}");
    let end = agent.wait_audit("session end", |r| r["type"] == "session_end");
    assert!(end["reason"].as_str().unwrap().contains("upstream connect failed"), "{end}");
}

trait RawClient {
    fn tcp_client_raw(&self, scope: &str, args: &[&str]) -> serde_json::Value;
}

impl RawClient for Agent {
    /// Like `tcp_client`, but enters the scope's cgroup directly: with the
    /// agent down, `portcullis exec` cannot ask it where the scope is.
    fn tcp_client_raw(&self, scope: &str, args: &[&str]) -> serde_json::Value {
        let dir = self.cgroup_dir(&format!("@CG@/{scope}"));
        let client = portcullis_tests::helper_bin("tcp-client");
        let procs = dir.join("cgroup.procs");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {} && exec {} \"$@\"", procs.display(), client.display()))
            .arg("sh")
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn a_connection_opened_before_a_policy_change_does_not_outlive_its_access() {
    use std::io::{BufRead, BufReader, Write};
    if !require_root() {
        return;
    }
    let up = portcullis_tests::servers::LineEchoServer::start("127.0.0.1:0");
    let p = format!(
        "version = 1\n[[scopes]]\nname = \"ci\"\ncgroup = \"@CG@/ci\"\n[[targets]]\nname = \"svc\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.53:7003\"]\nupstream = \"{}\"\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"svc\"\nallow = [\"connect\"]\n[[bindings]]\nscope = \"ci\"\nrole = \"r\"\n",
        up.addr
    );
    let agent = Agent::start(&p);
    let client = portcullis_tests::helper_bin("tcp-client");
    let mut child = agent
        .exec("ci", &[client.to_str().unwrap(), "interactive", "127.0.0.53:7003"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || serde_json::from_str::<serde_json::Value>(&out.next().unwrap().unwrap()).unwrap();
    assert_eq!(next()["connected"], true);
    writeln!(stdin, "before").unwrap();
    assert_eq!(next()["reply"], "echo:before");

    // The role loses the target while the connection is open.
    agent.replace_policy(&p.replace("allow = [\"connect\"]\n", "deny = [\"connect\"]\n")).unwrap();
    let end = agent.wait_audit("revoked", |r| {
        r["type"] == "session_end" && r["reason"].as_str().unwrap_or("").contains("revoked")
    });
    assert!(end["reason"].as_str().unwrap().contains("connect is in deny"), "{end}");
    writeln!(stdin, "after").unwrap();
    let r = next();
    assert_eq!(r["closed"], true, "the old connection is cut: {r}");
    assert_eq!(r["reply"], "");
    drop(stdin);
    let _ = child.wait();
}

#[test]
fn a_deleted_policy_file_keeps_the_running_policy() {
    let Some(f) = fixture() else { return };
    std::fs::remove_file(&f.agent.policy_path).unwrap();
    f.agent.wait_audit("rejected", |r| r["type"] == "policy_rejected");
    let r = f.agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "still-here"]);
    assert_eq!(r["reply"], "echo:still-here", "{r}");
}

/// Waits until the records kept one by one (`one_by_one`) and those counted
/// in `suppressed` records of kind `of` add up to a total `done` accepts;
/// returns how many were counted, after checking that some were (the flood
/// went past the rate).
fn accounted_for(agent: &Agent, one_by_one: impl Fn(&Value) -> bool, of: &str, done: impl Fn(u64) -> bool) -> u64 {
    let split = || {
        let records = agent.audit();
        let kept = records.iter().filter(|r| one_by_one(r)).count() as u64;
        let counted: u64 = records
            .iter()
            .filter(|r| r["type"] == "suppressed" && r["of"] == of)
            .map(|r| r["count"].as_u64().expect("count"))
            .sum();
        (kept, counted)
    };
    let (kept, counted) = wait_until(Duration::from_secs(15), || Some(split()).filter(|(k, c)| done(k + c)))
        .unwrap_or_else(|| panic!("{of}: not every one accounted for: {:?}", split()));
    assert!(counted > 0, "{of}: {kept} recorded one by one, none counted");
    counted
}
