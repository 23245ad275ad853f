//! An agent trying to get around portcullis: each attempt ends refused (and,
//! where the kernel or the enforcer sees it, recorded).
use portcullis_tests::{require_root, servers::EchoServer, Agent};

const SECRET: &str = "s3cr3t-upstream-password-7f1c";

fn agent(echo: &EchoServer) -> Agent {
    let p = format!(
        r#"version = 1
[[scopes]]
name = "ci"
cgroup = "@CG@/ci"
egress = "deny"

[[targets]]
name = "svc"
protocol = "tcp"
match = ["127.0.0.53:7200"]
upstream = "{}"
[targets.credentials]
password = {{ env = "SVC_PASSWORD" }}

[[roles]]
name = "r"
[[roles.rules]]
target = "svc"
allow = ["connect"]

[[bindings]]
scope = "ci"
role = "r"
"#,
        echo.addr
    );
    Agent::start_with_env(&p, &[("SVC_PASSWORD", SECRET)])
}

fn sh_as_nobody(agent: &Agent, script: &str) -> std::process::Output {
    agent.exec_as("ci", "nobody", &["sh", "-c", script]).output().unwrap()
}

#[test]
fn a_guarded_non_root_process_cannot_leave_its_cgroup() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = agent(&echo);
    let root_procs = portcullis_tests::cgroup2_mount().join("cgroup.procs");
    let other = agent.cgroup_dir("@CG@");
    for dest in [root_procs, other.join("cgroup.procs")] {
        let out = sh_as_nobody(&agent, &format!("echo $$ > {} && echo moved", dest.display()));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("moved"), "moved to {}", dest.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    }
    // Still guarded afterwards: an undeclared destination is refused.
    let r = agent.tcp_client("ci", &["tcp", &echo.addr.to_string(), "x"]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
}

#[test]
fn a_guarded_non_root_process_cannot_reach_the_credentials() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = agent(&echo);
    let pid = agent.pid().unwrap();
    let state = agent.state_dir();
    let attempts = [
        // Its own environment does not hold the secret.
        "env".to_string(),
        // portcullis' environment, memory and command line.
        format!("cat /proc/{pid}/environ"),
        format!("head -c 4096 /proc/{pid}/mem"),
        // The state directory (audit log, CA key).
        format!("cat {}/ca/ca.key", state.display()),
        format!("ls {}", state.display()),
        format!("cat {}/audit/*", state.display()),
    ];
    for cmd in &attempts {
        let out = sh_as_nobody(&agent, cmd);
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!all.contains(SECRET), "`{cmd}` revealed the secret");
        if cmd != "env" {
            assert!(!out.status.success(), "`{cmd}` should fail: {all}");
        }
    }
    // The control socket is root-only.
    let bin = portcullis_tests::portcullis_bin();
    let out = agent
        .exec_as(
            "ci",
            "nobody",
            &[bin.to_str().unwrap(), "--control-socket", agent.control.to_str().unwrap(), "status"],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    // Nor is the secret in the audit log.
    assert!(!serde_json::to_string(&agent.audit()).unwrap().contains(SECRET));
}

#[test]
fn other_families_forms_and_transports_to_a_target_are_refused() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = agent(&echo);
    // The declared form goes through portcullis.
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7200", "ok"]);
    assert_eq!(r["reply"], "echo:ok", "{r}");
    // The v4-mapped form of the same target also goes through portcullis
    // (it cannot be used to reach the address directly).
    let r = agent.tcp_client("ci", &["tcp", "[::ffff:127.0.0.53]:7200", "mapped"]);
    assert_eq!(r["reply"], "echo:mapped", "{r}");
    // UDP to the target's port.
    let r = agent.tcp_client("ci", &["udp", "127.0.0.53:7200"]);
    assert_eq!(r["sent"], false, "{r}");
    // The upstream itself, directly, under egress deny.
    let r = agent.tcp_client("ci", &["tcp", &echo.addr.to_string(), "direct"]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    let r = agent.tcp_client("ci", &["tcp", &format!("[::ffff:127.0.0.1]:{}", echo.addr.port()), "mapped-direct"]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    // The enforcer's port.
    let r = agent.tcp_client("ci", &["tcp", &format!("127.0.0.1:{}", agent.port), "x"]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    let r = agent.tcp_client("ci", &["tcp", &format!("[::1]:{}", agent.port), "x"]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");
    assert_eq!(echo.count(), 2, "only the two proxied connections reached the upstream");
    let refusals = agent.audit().into_iter().filter(|r| r["type"] == "kernel_refusal").count();
    assert!(refusals >= 5, "each refusal is recorded ({refusals})");
}

#[test]
fn a_thousand_concurrent_guarded_connections_all_go_through() {
    if !require_root() {
        return;
    }
    let up = portcullis_tests::servers::LineEchoServer::start("127.0.0.1:0");
    let p = format!(
        "version = 1\n[[scopes]]\nname = \"ci\"\ncgroup = \"@CG@/ci\"\n[[targets]]\nname = \"svc\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.53:7201\"]\nupstream = \"{}\"\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"svc\"\nallow = [\"connect\"]\n[[bindings]]\nscope = \"ci\"\nrole = \"r\"\n",
        up.addr
    );
    let agent = Agent::start(&p);
    let bin = portcullis_tests::helper_bin("many-conns");
    let out = agent.exec("ci", &[bin.to_str().unwrap(), "127.0.0.53:7201", "1000"]).output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    assert_eq!(r["opened"], 1000, "{r}");
    assert_eq!(r["echoed"], 1000, "{r}");
    assert_eq!(up.count(), 1000);
    // All 1000 are open at once through the enforcer.
    let starts = agent.audit().into_iter().filter(|r| r["type"] == "session_start").count();
    assert_eq!(starts, 1000);
}

#[test]
fn restarting_under_load_never_bypasses_and_loses_no_record() {
    if !require_root() {
        return;
    }
    let up = portcullis_tests::servers::LineEchoServer::start("127.0.0.1:0");
    let p = format!(
        "version = 1\n[[scopes]]\nname = \"ci\"\ncgroup = \"@CG@/ci\"\n[[targets]]\nname = \"svc\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.53:7202\"]\nupstream = \"{}\"\n[[roles]]\nname = \"r\"\n[[roles.rules]]\ntarget = \"svc\"\nallow = [\"connect\"]\n[[bindings]]\nscope = \"ci\"\nrole = \"r\"\n",
        up.addr
    );
    let mut agent = Agent::start(&p);
    // The load runs from inside the cgroup directly (not `portcullis exec`,
    // which needs the agent that is about to be killed).
    let dir = agent.cgroup_dir("@CG@/ci");
    let client = portcullis_tests::helper_bin("tcp-client");
    let load = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {}/cgroup.procs && exec {} loop 127.0.0.53:7202 600", dir.display(), client.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..3 {
        agent.kill9();
        std::thread::sleep(std::time::Duration::from_millis(100));
        agent.restart();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = load.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ok = r["ok"].as_u64().unwrap();
    assert!(
        ok > 0 && r["refused"].as_u64().unwrap() + r["broken"].as_u64().unwrap() > 0,
        "the restarts hit the load: {r}"
    );
    // Every connection that reached the upstream came through portcullis and
    // had its authorisation on disk first: none bypassed, none unrecorded.
    let allowed =
        agent.audit().into_iter().filter(|r| r["type"] == "decision" && r["decision"]["verdict"] == "allow").count()
            as u64;
    assert_eq!(up.count(), allowed, "upstream connections = recorded authorisations ({r})");
    assert!(up.count() >= ok);
}

#[test]
fn privileged_guarded_processes_are_reported() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = agent(&echo);
    let mut root = agent.exec("ci", &["sleep", "30"]).spawn().unwrap();
    let mut user = agent.exec_as("ci", "nobody", &["sleep", "30"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Checked at start and at every reload.
    let text = std::fs::read_to_string(&agent.policy_path).unwrap();
    agent.replace_policy(&format!("{text}\n# touched\n")).unwrap();
    let line = agent.wait_log("holds capabilities");
    assert!(line.contains(&format!("pid={}", root.id())), "{line}");
    assert!(line.contains("CAP_SYS_ADMIN") && line.contains("CAP_BPF"), "{line}");
    assert!(!agent.log_text().contains(&format!("pid={} ", user.id())), "an unprivileged process is not reported");
    let _ = root.kill();
    let _ = user.kill();
    let _ = root.wait();
    let _ = user.wait();
}
