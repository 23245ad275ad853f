//! Installing on a CI runner: the systemd units, the Debian package,
//! readiness notification, following a unit's cgroup across restarts, the
//! slice mode, `doctor`, the metrics endpoint and `--json` outputs.
use std::{
    collections::HashMap,
    fs,
    os::unix::{fs::MetadataExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use portcullis_tests::{
    cgroup2_mount, fixtures::wait_until, helper_bin, portcullis_bin, remove_cgroup_tree, require_root, require_tool,
    servers::EchoServer, unique, workspace_root, Agent,
};
use serde_json::Value;

fn packaging() -> PathBuf {
    workspace_root().join("packaging")
}

/// Runs `cmd`, returning (exit code, stdout, stderr).
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` until it returns Some (bounded, so a broken feature fails
/// instead of hanging).
fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until(Duration::from_secs(20), f).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// A command that moves itself into cgroup `dir`, then runs the test client
/// (what systemd does when it starts a unit's process in its cgroup).
fn client_in_cgroup(dir: &Path, args: &[&str]) -> Value {
    let client = helper_bin("tcp-client");
    let out = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"")
        .arg("sh")
        .arg(dir)
        .arg(&client)
        .args(args)
        .output()
        .expect("run tcp-client");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "tcp-client printed no JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Recreates cgroup `dir` (it must hold no process): the new directory has a
/// new cgroup id, as when systemd restarts a unit.
fn recreate(dir: &Path) -> u64 {
    let old = fs::metadata(dir).unwrap().ino();
    fs::remove_dir(dir).unwrap();
    fs::create_dir(dir).unwrap();
    let new = fs::metadata(dir).unwrap().ino();
    assert_ne!(old, new, "a recreated cgroup has a new id");
    new
}

// ---------------------------------------------------------------- units

/// `systemd-analyze verify` of the units as they are installed: under a
/// root holding the package's files plus the host's own units (the targets
/// ours refer to) and `/bin/kill` (PID 1 need not be systemd for this).
fn verify_units(root: &Path) {
    add_host_system(root);
    let (code, out, err) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.display()))
        .arg("portcullis.service")
        .arg("portcullis.slice")
        .env("SYSTEMD_LOG_LEVEL", "notice"));
    let text = format!("{out}{err}");
    assert_eq!(code, 0, "systemd-analyze verify failed:\n{text}");
    // verify exits 0 on warnings (unknown settings and the like): there
    // must be none about our units.
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("portcullis")).collect();
    assert!(ours.is_empty(), "systemd-analyze complains:\n{text}");

    // Hardened: systemd's own exposure score stays low.
    let (code, out, err) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=40"])
        .arg(format!("--root={}", root.display()))
        .arg("portcullis.service"));
    assert_eq!(code, 0, "exposure above 4.0:\n{out}{err}");
}

/// Copies the host's unit files (without replacing ours) and `kill` into `root`.
fn add_host_system(root: &Path) {
    let units = root.join("lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    let (code, _, err) = run(Command::new("cp").arg("-an").arg("/lib/systemd/system/.").arg(&units));
    assert_eq!(code, 0, "{err}");
    fs::create_dir_all(root.join("bin")).unwrap();
    let kill = root.join("bin/kill");
    if !kill.exists() {
        fs::copy("/bin/kill", kill).unwrap();
    }
}

fn stage_units(root: &Path) {
    let units = root.join("lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for u in ["portcullis.service", "portcullis.slice"] {
        fs::copy(packaging().join(u), units.join(u)).unwrap();
    }
    let bin = root.join("usr/bin");
    fs::create_dir_all(&bin).unwrap();
    fs::copy(portcullis_bin(), bin.join("portcullis")).unwrap();
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !require_tool("systemd-analyze") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    stage_units(tmp.path());
    verify_units(tmp.path());

    // And verify really checks: a unit naming a missing binary is refused.
    let broken = fs::read_to_string(packaging().join("portcullis.service"))
        .unwrap()
        .replace("/usr/bin/portcullis run", "/usr/bin/portcullis-missing run");
    fs::write(tmp.path().join("lib/systemd/system/portcullis.service"), broken).unwrap();
    let (code, out, err) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", tmp.path().display()))
        .arg("portcullis.service"));
    assert_ne!(code, 0, "a broken unit must fail verification:\n{out}{err}");
}

#[test]
fn service_unit_is_hardened_as_documented() {
    let unit = fs::read_to_string(packaging().join("portcullis.service")).unwrap();
    let kv: HashMap<&str, &str> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    assert_eq!(kv["Type"], "notify");
    assert_eq!(kv["Restart"], "always");
    assert_eq!(kv["ProtectSystem"], "strict");
    assert_eq!(kv["NoNewPrivileges"], "yes");
    assert_eq!(kv["StateDirectory"], "portcullis");
    assert_eq!(kv["RuntimeDirectory"], "portcullis");
    let rw: Vec<&str> = kv["ReadWritePaths"].split_whitespace().collect();
    assert_eq!(rw, ["/sys/fs/bpf", "/sys/fs/cgroup"]);
    let caps: Vec<&str> = kv["CapabilityBoundingSet"].split_whitespace().collect();
    assert!(!caps.contains(&"CAP_SYS_ADMIN"), "{caps:?}");
    assert!(caps.contains(&"CAP_BPF") && caps.contains(&"CAP_NET_ADMIN"), "{caps:?}");
}

/// The service's capability bounding set is enough: the agent started with
/// exactly those capabilities attaches, redirects and attributes.
#[test]
fn agent_runs_with_only_the_units_capabilities() {
    if !require_root() || !require_tool("setpriv") {
        return;
    }
    let unit = fs::read_to_string(packaging().join("portcullis.service")).unwrap();
    let caps = unit.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("bounding set");
    let set: Vec<String> =
        caps.split_whitespace().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())).collect();
    let bounding = format!("--bounding-set=-all,{}", set.join(","));
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start_wrapped(&echo_policy(&echo), &["setpriv", &bounding, "--inh-caps=-all", "--"]);
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_string();
    let eff = u64::from_str_radix(&eff, 16).unwrap();
    assert_eq!(eff & (1 << 21), 0, "the agent runs without CAP_SYS_ADMIN");
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "capped"]);
    assert_eq!(r["reply"], "echo:capped", "{r}\n{}", agent.log_text());
    let start = agent.wait_audit("session", |r| r["type"] == "session_start");
    assert!(start["caller"]["exe"].as_str().is_some_and(|e| e.ends_with("tcp-client")), "{start}");
}

// ---------------------------------------------------------------- package

fn xtask_bin() -> PathBuf {
    let p = workspace_root().join("target/debug/xtask");
    assert!(p.exists(), "{} missing: `cargo build -p xtask` (cargo xtask test builds it)", p.display());
    p
}

#[test]
fn deb_holds_what_it_should_and_its_policy_checks() {
    if !require_tool("dpkg-deb") || !require_tool("systemd-analyze") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let (code, _, err) = run(Command::new(xtask_bin())
        .arg("package")
        .arg("--binary")
        .arg(portcullis_bin())
        .arg("--out")
        .arg(out.path()));
    assert_eq!(code, 0, "xtask package failed:\n{err}");
    let deb = fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");

    let (code, list, err) = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    assert_eq!(code, 0, "{err}");
    let files: Vec<&str> = list.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    for want in [
        "./usr/bin/portcullis",
        "./lib/systemd/system/portcullis.service",
        "./lib/systemd/system/portcullis.slice",
        "./etc/portcullis/policy.toml",
        "./usr/share/man/man1/portcullis.1.gz",
        "./usr/share/man/man1/portcullis-run.1.gz",
        "./usr/share/man/man1/portcullis-doctor.1.gz",
        "./usr/share/bash-completion/completions/portcullis",
        "./usr/share/zsh/vendor-completions/_portcullis",
        "./usr/share/fish/vendor_completions.d/portcullis.fish",
        "./usr/share/doc/portcullis/copyright",
        "./usr/share/doc/portcullis/examples/guard-unit.conf",
    ] {
        assert!(files.contains(&want), "{want} missing from the package:\n{list}");
    }
    // Everything belongs to root; the binary is executable.
    for l in list.lines() {
        assert!(l.contains("root/root"), "{l}");
    }
    let bin_line = list.lines().find(|l| l.ends_with("./usr/bin/portcullis")).unwrap();
    assert!(bin_line.starts_with("-rwxr-xr-x"), "{bin_line}");

    let (code, info, err) = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    assert_eq!(code, 0, "{err}");
    assert!(info.contains("Package: portcullis"), "{info}");
    assert!(info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))), "{info}");
    assert!(info.lines().any(|l| l.trim_start().starts_with("Depends:") && l.contains("libc6")), "{info}");
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(script), "{script} missing:\n{info}");
    }
    let (_, package, _) = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Package"));
    assert_eq!(package.trim(), "portcullis");

    // Unpacked: the packaged policy passes `policy check` with the packaged
    // binary, the units verify, the man page and completions are real.
    let root = tempfile::tempdir().unwrap();
    let (code, _, err) = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root.path()));
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(Command::new(root.path().join("usr/bin/portcullis"))
        .args(["policy", "check"])
        .arg(root.path().join("etc/portcullis/policy.toml")));
    assert_eq!(code, 0, "packaged policy refused:\n{out}{err}");
    assert!(out.contains(": ok ("), "{out}");
    verify_units(root.path());
    let (code, man, _) =
        run(Command::new("gzip").arg("-dc").arg(root.path().join("usr/share/man/man1/portcullis.1.gz")));
    assert_eq!(code, 0);
    assert!(man.contains(".TH portcullis") && man.contains("doctor"), "{man}");
    let bash = fs::read_to_string(root.path().join("usr/share/bash-completion/completions/portcullis")).unwrap();
    assert!(bash.contains("complete") && bash.contains("doctor"), "{bash}");
}

// ---------------------------------------------------------------- readiness

fn echo_policy(echo: &EchoServer) -> String {
    portcullis_tests::fixtures::echo_policy(echo.addr, "127.0.0.53:7000", "deny")
}

#[test]
fn ready_is_notified_only_once_probes_and_listener_are_up() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    // The agent is started by hand: Agent::start would wait for its control
    // socket, and the point is what holds at the moment READY=1 arrives.
    let name = unique("pc-ready");
    let cg = format!("portcullis-test/{name}");
    let policy = tmp.path().join("policy.toml");
    fs::write(&policy, echo_policy(&echo).replace("@CG@", &cg)).unwrap();
    let port = portcullis_tests::free_port();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    let control = tmp.path().join("control.sock");
    let mut child = Command::new(portcullis_bin())
        .arg("--control-socket")
        .arg(&control)
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--listen-port")
        .arg(port.to_string())
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--metrics-addr")
        .arg("off")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // At this instant: the probes are linked to the scope's cgroup...
    let ci = cgroup2_mount().join(&cg).join("ci");
    let id = fs::metadata(&ci).expect("scope cgroup exists").ino();
    let links: Vec<_> =
        fs::read_dir(pin_dir.join("links").join(id.to_string())).expect("links pinned").flatten().collect();
    // ...the listener accepts...
    let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    // ...and a guarded process reaches its target through portcullis.
    let client = helper_bin("tcp-client");
    let out = Command::new(portcullis_bin())
        .arg("--control-socket")
        .arg(&control)
        .args(["exec", "--scope", "ci", "--"])
        .arg(&client)
        .args(["tcp", "127.0.0.53:7000", "ready"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);

    // SIGTERM: STOPPING=1 before exit.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n2 = notify.recv(&mut buf).expect("STOPPING=1");
    let stopping = String::from_utf8_lossy(&buf[..n2]).into_owned();
    let _ = child.wait();
    let _ = Command::new(portcullis_bin()).arg("detach").arg("--pin-dir").arg(&pin_dir).output();
    remove_cgroup_tree(&cgroup2_mount().join(&cg));

    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains("STATUS=guarding 2 scope(s)"), "{msg}");
    assert_eq!(links.len(), 8, "every program linked before READY=1");
    assert!(listening, "listener up before READY=1");
    assert_eq!(r["reply"], "echo:ready", "{r}");
    assert_eq!(stopping, "STOPPING=1");
}

// ---------------------------------------------------------------- following units

fn unit_policy(echo: &EchoServer, unit: &str) -> String {
    format!(
        r#"
version = 1
[[scopes]]
name = "runner"
unit = "{unit}"
[[targets]]
name = "echo"
protocol = "tcp"
match = ["127.0.0.53:7000"]
upstream = "{echo}"
[[roles]]
name = "ci-job"
[[roles.rules]]
target = "echo"
allow = ["connect"]
[[bindings]]
unit = "{unit}"
role = "ci-job"
"#,
        echo = echo.addr
    )
}

fn scope_state(agent: &Agent, name: &str) -> (bool, Option<u64>) {
    let st = agent.status();
    let s = st["scopes"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap();
    (s["attached"] == true, s["cgroup_id"].as_u64())
}

#[test]
fn unit_binding_follows_the_unit_cgroup_across_restarts() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let unit = format!("{}.service", unique("pc-runner"));
    let agent = Agent::start(&unit_policy(&echo, &unit));
    // Not running yet: no cgroup, nothing attached, said so.
    assert_eq!(scope_state(&agent, "runner"), (false, None));
    assert_eq!(agent.status()["unresolved_scopes"][0], "runner");

    // The unit starts: systemd creates <slice>/<unit>. Without systemd the
    // unit is found by name in the tree.
    let slice = agent.cgroup_dir("@CG@/ci-runners.slice");
    let dir = slice.join(&unit);
    fs::create_dir_all(&dir).unwrap();
    let id1 = fs::metadata(&dir).unwrap().ino();
    wait_for("attach to the unit's cgroup", || (scope_state(&agent, "runner") == (true, Some(id1))).then_some(()));
    let r = client_in_cgroup(&dir, &["tcp", "127.0.0.53:7000", "first"]);
    assert_eq!(r["reply"], "echo:first", "{r}");
    let s = agent.wait_audit("first session", |r| r["type"] == "session_start" && r["caller"]["cgroup_id"] == id1);
    assert_eq!(s["caller"]["unit"], unit.as_str());
    assert_eq!(s["role"], "ci-job");

    // Restart: the cgroup is removed and created again with a new id.
    let id2 = recreate(&dir);
    wait_for("re-attach to the new cgroup", || (scope_state(&agent, "runner") == (true, Some(id2))).then_some(()));
    let r = client_in_cgroup(&dir, &["tcp", "127.0.0.53:7000", "second"]);
    assert_eq!(r["reply"], "echo:second", "{r}");
    let s = agent.wait_audit("second session", |r| r["type"] == "session_start" && r["caller"]["cgroup_id"] == id2);
    assert_eq!(s["role"], "ci-job");
    // The old cgroup's links are gone; the new one's are pinned.
    assert!(!agent.pin_dir.join("links").join(id1.to_string()).exists());
    assert!(agent.pin_dir.join("links").join(id2.to_string()).exists());
    assert!(agent.status()["counters"]["reattachments"].as_u64().unwrap() >= 2);

    // Stopped: detached and reported as such.
    fs::remove_dir(&dir).unwrap();
    wait_for("detach from the removed cgroup", || (scope_state(&agent, "runner") == (false, None)).then_some(()));
    assert!(!agent.pin_dir.join("links").join(id2.to_string()).exists());
    assert_eq!(echo.count(), 2);
}

#[test]
fn slice_mode_guards_unit_cgroups_from_the_moment_they_exist() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let policy = format!(
        r#"
version = 1
[[scopes]]
name = "guarded"
cgroup = "@CG@/portcullis.slice"
egress = "deny"
[[targets]]
name = "echo"
protocol = "tcp"
match = ["127.0.0.53:7000"]
upstream = "{echo}"
[[roles]]
name = "ci-job"
[[roles.rules]]
target = "echo"
allow = ["connect"]
[[roles]]
name = "observer"
[[bindings]]
unit = "actions-runner.service"
role = "ci-job"
[[bindings]]
scope = "guarded"
role = "observer"
"#,
        echo = echo.addr
    );
    let agent = Agent::start(&policy);
    let slice = agent.cgroup_dir("@CG@/portcullis.slice");
    let (_, slice_id) = scope_state(&agent, "guarded");
    let runner = slice.join("actions-runner.service");
    let other = slice.join("other.service");

    // Created and used at once, without waiting for portcullis: guarded.
    for round in 0..3 {
        fs::create_dir(&runner).unwrap();
        let r = client_in_cgroup(&runner, &["tcp", "127.0.0.53:7000", &format!("run{round}")]);
        assert_eq!(r["reply"], format!("echo:run{round}"), "{r}");
        assert_eq!(r["peer"], "127.0.0.53:7000");
        // An undeclared destination: refused by the slice's egress setting.
        let blocked = client_in_cgroup(&runner, &["tcp", &echo.addr.to_string(), "x"]);
        assert_eq!(blocked["errno"], libc::EPERM, "{blocked}");
        wait_for("client gone from the cgroup", || fs::remove_dir(&runner).is_ok().then_some(()));
    }
    let starts: Vec<Value> = agent.audit().into_iter().filter(|r| r["type"] == "session_start").collect();
    assert_eq!(starts.len(), 3);
    assert!(starts.iter().all(|s| s["caller"]["unit"] == "actions-runner.service" && s["role"] == "ci-job"));
    // Three different cgroups, one attachment: the slice's.
    let ids: std::collections::BTreeSet<u64> =
        starts.iter().map(|s| s["caller"]["cgroup_id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(scope_state(&agent, "guarded").1, slice_id);

    // Another unit in the slice gets the slice's role: no rule, denied.
    fs::create_dir(&other).unwrap();
    let r = client_in_cgroup(&other, &["tcp", "127.0.0.53:7000", "nope"]);
    assert_eq!(r["reply"], "", "{r}");
    let d = agent.wait_audit("denial", |r| r["type"] == "decision" && r["decision"]["role"] == "observer");
    assert_eq!(d["decision"]["verdict"], "deny");
    assert_eq!(echo.count(), 3);
    wait_for("client gone", || fs::remove_dir(&other).is_ok().then_some(()));
}

// ---------------------------------------------------------------- doctor

fn doctor(agent: &Agent, extra: &[&str]) -> (i32, Value) {
    let (code, out, err) = run(agent
        .cli()
        .arg("doctor")
        .arg("--json")
        .arg("--state-dir")
        .arg(agent.state_dir())
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .args(extra));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("doctor printed no JSON ({e}):\n{out}{err}"));
    (code, v)
}

fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name}: {v}"))
}

#[test]
fn doctor_passes_on_this_host_and_names_each_check() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&echo_policy(&echo));
    let (code, v) = doctor(&agent, &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    for name in [
        "kernel",
        "btf",
        "cgroup2",
        "bpffs",
        "capabilities",
        "program-types",
        "map-types",
        "probes",
        "clock",
        "state-dir",
        "local-ca",
        "agent",
        "guarded-caps",
    ] {
        let c = check(&v, name);
        assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
        assert!(c["required"].is_boolean() && c["status"].is_string(), "{c}");
        if c["required"] == true {
            assert_eq!(c["status"], "ok", "{c}");
        }
    }
    assert!(check(&v, "probes")["detail"].as_str().unwrap().contains("8 programs"));
    assert!(check(&v, "agent")["detail"].as_str().unwrap().contains("2 scope(s) attached"));

    // The text form prints every check with its status.
    let (code, out, _) =
        run(agent.cli().arg("doctor").arg("--state-dir").arg(agent.state_dir()).arg("--pin-dir").arg(&agent.pin_dir));
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("ok") && l.contains("bpffs")), "{out}");
    assert!(out.contains("all required checks passed"), "{out}");
}

#[test]
fn doctor_flags_a_guarded_process_that_could_undo_its_guard() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&echo_policy(&echo));
    // Root in a guarded scope: full capabilities.
    let mut root_sleep = agent.exec("ci", &["sleep", "60"]).spawn().unwrap();
    let ci = agent.cgroup_dir("@CG@/ci");
    wait_for("sleep in the scope", || {
        fs::read_to_string(ci.join("cgroup.procs")).ok().filter(|p| !p.trim().is_empty()).map(|_| ())
    });
    let (code, v) = doctor(&agent, &[]);
    let _ = root_sleep.kill();
    let _ = root_sleep.wait();
    assert_eq!(code, 1, "{v:#}");
    let c = check(&v, "guarded-caps");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("CAP_SYS_ADMIN"), "{c}");
    assert!(c["detail"].as_str().unwrap().contains("sleep"), "{c}");
    assert!(c["fix"].as_str().unwrap().contains("CapabilityBoundingSet"), "{c}");

    // The same process as an unprivileged user is fine.
    let mut user_sleep = agent.exec_as("guest", "nobody", &["sleep", "60"]).spawn().unwrap();
    let guest = agent.cgroup_dir("@CG@/guest");
    wait_for("sleep in the scope", || {
        fs::read_to_string(guest.join("cgroup.procs")).ok().filter(|p| !p.trim().is_empty()).map(|_| ())
    });
    wait_for("root sleep gone", || {
        fs::read_to_string(ci.join("cgroup.procs")).ok().filter(|p| p.trim().is_empty()).map(|_| ())
    });
    let (code, v) = doctor(&agent, &[]);
    let _ = user_sleep.kill();
    let _ = user_sleep.wait();
    let c = check(&v, "guarded-caps");
    assert_eq!(c["status"], "ok", "{c}");
    assert!(c["detail"].as_str().unwrap().starts_with("1 process(es)"), "{c}");
    assert_eq!(code, 0, "{v:#}");
}

/// Runs doctor in a private mount namespace after `prep` (a shell snippet),
/// so the change is invisible to the rest of the machine.
fn doctor_in_namespace(agent: &Agent, prep: &str, state_dir: &Path) -> (i32, Value, String) {
    let script = format!("{prep} && exec \"$@\"");
    let (code, out, err) = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script, "sh"])
        .arg(portcullis_bin())
        .arg("--control-socket")
        .arg(&agent.control)
        .args(["doctor", "--json", "--state-dir"])
        .arg(state_dir)
        .arg("--pin-dir")
        .arg(&agent.pin_dir));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("doctor printed no JSON ({e}):\n{out}{err}"));
    (code, v, err)
}

#[test]
fn doctor_fails_with_a_named_fix_without_bpffs() {
    if !require_root() || !require_tool("unshare") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&echo_policy(&echo));
    let (code, v, err) = doctor_in_namespace(
        &agent,
        "while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf || exit 9; done",
        &agent.state_dir(),
    );
    assert_eq!(code, 1, "{v:#}\n{err}");
    assert_eq!(v["ok"], false);
    let c = check(&v, "bpffs");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("mount -t bpf bpf /sys/fs/bpf"), "{c}");
    // Only that: the other required checks still pass.
    let failed: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["bpffs"], "{v:#}");
    // And the machine's bpffs is untouched: the agent still works.
    assert!(portcullis_tests_on_bpffs(&agent.pin_dir));
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", "still"]);
    assert_eq!(r["reply"], "echo:still", "{r}");
}

fn portcullis_tests_on_bpffs(p: &Path) -> bool {
    nix_statfs_magic(p) == 0xcafe4a11
}

fn nix_statfs_magic(p: &Path) -> i64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and an out-parameter of the right type.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut s) }, 0);
    s.f_type as i64
}

#[test]
fn doctor_fails_with_a_named_fix_when_the_state_dir_is_read_only() {
    if !require_root() || !require_tool("unshare") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&echo_policy(&echo));
    let state = tempfile::tempdir().unwrap();
    fs::set_permissions(state.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let d = state.path().display().to_string();
    let (code, v, err) = doctor_in_namespace(
        &agent,
        &format!("mount --bind '{d}' '{d}' && mount -o remount,bind,ro '{d}'"),
        state.path(),
    );
    assert_eq!(code, 1, "{v:#}\n{err}");
    let c = check(&v, "state-dir");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("not writable"), "{c}");
    assert!(c["fix"].as_str().unwrap().contains("--state-dir"), "{c}");
    let failed: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["state-dir"], "{v:#}");
    // Outside the namespace the directory is writable as before.
    fs::write(state.path().join("probe"), b"x").unwrap();
}

// ---------------------------------------------------------------- metrics

fn scrape(agent: &Agent) -> prometheus_parse::Scrape {
    let text = agent.metrics_text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("unparsable metrics ({e}):\n{text}"))
}

/// The value of `name` whose labels include every pair of `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples.iter().filter(|x| x.metric == name).find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).map(
        |x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        },
    )
}

#[test]
fn metrics_count_the_traffic_sent() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&echo_policy(&echo));
    let before = scrape(&agent);
    assert_eq!(value(&before, "portcullis_connections_accepted_total", &[]), Some(0.0));
    assert_eq!(value(&before, "portcullis_approvals_held", &[]), Some(0.0));

    let msgs = ["alpha", "bravo!", "charlie-3"];
    for m in msgs {
        let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7000", m]);
        assert_eq!(r["reply"], format!("echo:{m}"), "{r}");
    }
    for _ in 0..2 {
        let r = agent.tcp_client("guest", &["tcp", "127.0.0.53:7000", "no"]);
        assert_eq!(r["reply"], "", "{r}");
    }
    // Egress deny in the kernel: one refusal.
    let r = agent.tcp_client("ci", &["tcp", &echo.addr.to_string(), "x"]);
    assert_eq!(r["errno"], libc::EPERM, "{r}");

    // Counters are final once every session has ended.
    let s = wait_for("sessions to end", || {
        let s = scrape(&agent);
        let done = value(&s, "portcullis_connections_open", &[]) == Some(0.0)
            && value(&s, "portcullis_kernel_refusals_total", &[]) == Some(1.0);
        done.then_some(s)
    });
    assert_eq!(value(&s, "portcullis_connections_accepted_total", &[]), Some(5.0));
    assert_eq!(value(&s, "portcullis_connections_unattributed_total", &[]), Some(0.0));
    let allow = [("verdict", "allow"), ("role", "builder"), ("target", "echo"), ("protocol", "tcp")];
    assert_eq!(value(&s, "portcullis_decisions_total", &allow), Some(3.0));
    let deny = [("verdict", "deny"), ("role", "nobody"), ("target", "echo"), ("protocol", "tcp")];
    assert_eq!(value(&s, "portcullis_decisions_total", &deny), Some(2.0));
    let up: usize = msgs.iter().map(|m| m.len()).sum();
    let down: usize = msgs.iter().map(|m| m.len() + "echo:".len()).sum();
    assert_eq!(value(&s, "portcullis_relay_bytes_total", &[("direction", "up")]), Some(up as f64));
    assert_eq!(value(&s, "portcullis_relay_bytes_total", &[("direction", "down")]), Some(down as f64));
    assert_eq!(value(&s, "portcullis_approvals_held", &[]), Some(0.0));

    // The audit log: every record counted, none left behind, latencies seen.
    let records = wait_for("audit writes", || {
        let s = scrape(&agent);
        (value(&s, "portcullis_audit_backlog", &[]) == Some(0.0)).then_some(s)
    });
    let on_disk = agent.audit().len() as f64;
    assert_eq!(value(&records, "portcullis_audit_records_total", &[]), Some(on_disk));
    let hist = records
        .samples
        .iter()
        .find(|x| x.metric == "portcullis_audit_write_duration_seconds")
        .expect("audit write histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let inf = buckets.iter().find(|b| b.less_than.is_infinite()).expect("+Inf bucket");
            assert!(inf.count >= 1.0, "{buckets:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }

    // eBPF maps: two scopes, one target entry; capacities as compiled.
    assert_eq!(value(&s, "portcullis_bpf_map_entries", &[("map", "PC_SCOPES")]), Some(2.0));
    assert_eq!(value(&s, "portcullis_bpf_map_entries", &[("map", "PC_TARGETS")]), Some(1.0));
    assert_eq!(value(&s, "portcullis_bpf_map_capacity", &[("map", "PC_SCOPES")]), Some(1024.0));
    assert_eq!(value(&s, "portcullis_bpf_map_capacity", &[("map", "PC_CONNS")]), Some(65536.0));
    // Every accepted connection's record was taken out of the map.
    assert_eq!(value(&s, "portcullis_bpf_map_entries", &[("map", "PC_CONNS")]), Some(0.0));
    assert_eq!(value(&s, "portcullis_scopes_attached", &[]), Some(2.0));

    // Reloads and refused reloads.
    assert_eq!(value(&s, "portcullis_policy_reloads_total", &[]), Some(0.0));
    let mut two_targets = echo_policy(&echo);
    two_targets.push_str("[[targets]]\nname = \"more\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.54:7000\"]\n");
    agent.replace_policy(&two_targets).expect("valid policy reloads");
    assert!(agent.replace_policy("version = 1\n[[targets]]\nname = 1\n").is_err());
    let s = scrape(&agent);
    assert_eq!(value(&s, "portcullis_policy_reloads_total", &[]), Some(1.0));
    assert_eq!(value(&s, "portcullis_policy_reload_failures_total", &[]), Some(1.0));
    assert_eq!(value(&s, "portcullis_bpf_map_entries", &[("map", "PC_TARGETS")]), Some(2.0));

    // Only /metrics is served.
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", agent.metrics_port)).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.0 404"), "{resp}");
}

#[test]
fn metrics_refuse_a_non_loopback_address() {
    let (code, _, err) = run(Command::new(portcullis_bin()).args(["run", "--metrics-addr", "0.0.0.0:7441"]));
    assert_eq!(code, 1);
    assert!(err.contains("not a loopback address"), "{err}");
}

// ---------------------------------------------------------------- --json

#[test]
fn json_outputs_hold_the_documented_fields() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start(&echo_policy(&echo));

    // status --json
    let st = agent.status();
    for k in [
        "version",
        "pid",
        "started_ms",
        "listen_port",
        "metrics_addr",
        "pin_dir",
        "cgroup_mount",
        "policy",
        "programs",
        "attached_cgroups",
        "scopes",
        "unresolved_scopes",
        "targets",
        "connections",
        "counters",
    ] {
        assert!(st.get(k).is_some(), "status has no `{k}`: {st:#}");
    }
    assert_eq!(st["metrics_addr"], format!("127.0.0.1:{}", agent.metrics_port));
    assert!(st["policy"]["source"].is_string() && st["policy"]["digest"].is_string());
    let scope = &st["scopes"][0];
    for k in ["name", "location", "egress", "cgroup", "cgroup_id", "attached"] {
        assert!(scope.get(k).is_some(), "scope has no `{k}`: {scope}");
    }
    for k in ["name", "protocol", "match"] {
        assert!(st["targets"][0].get(k).is_some(), "target has no `{k}`");
    }
    for k in ["accepted", "allowed", "denied", "bytes_up", "bytes_down", "reloads", "reload_failures", "reattachments"]
    {
        assert!(st["counters"][k].is_u64(), "counter `{k}` missing: {st:#}");
    }

    // policy check --json: good and bad files together.
    let bad = agent.dir.path().join("bad.toml");
    fs::write(&bad, "version = 1\n[[targets]]\nname = \"x\"\nprotocol = \"smtp\"\nmatch = [\"127.0.0.1:25\"]\n")
        .unwrap();
    let (code, out, _) = run(agent.cli().args(["policy", "check", "--json"]).arg(&agent.policy_path).arg(&bad));
    assert_eq!(code, 2);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["files"][0]["ok"], true);
    assert_eq!(v["files"][0]["scopes"], 2);
    assert_eq!(v["files"][0]["targets"], 1);
    assert_eq!(v["files"][1]["ok"], false);
    let e = &v["files"][1]["errors"][0];
    assert_eq!(e["line"], 4);
    assert!(e["column"].is_u64() && e["message"].as_str().unwrap().contains("smtp"), "{e}");

    // policy explain --json
    let (code, out, _) = run(agent
        .cli()
        .args(["policy", "explain", "--json", "--target", "echo", "--scope", "ci", "--class", "connect"])
        .arg(&agent.policy_path));
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for k in ["subject", "binding", "target", "classes", "decision"] {
        assert!(v.get(k).is_some(), "explain has no `{k}`: {v}");
    }
    assert_eq!(v["decision"]["verdict"], "allow");
    assert_eq!(v["decision"]["role"], "builder");
    assert!(v["decision"]["rule"].is_string() && v["decision"]["reason"].is_string());

    // doctor --json
    let (_, v) = doctor(&agent, &[]);
    assert!(v["ok"].is_boolean());
    for c in v["checks"].as_array().unwrap() {
        for k in ["name", "status", "required", "detail", "fix"] {
            assert!(c.get(k).is_some(), "check has no `{k}`: {c}");
        }
        assert!(["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()), "{c}");
    }
}

/// `policy explain --sql` classifies and decides SQL as the enforcer does;
/// `--method/--path` decides an HTTP request.
#[test]
fn explain_decides_sql_text_and_http_requests() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let explain = |file: &str, args: &[&str]| {
        let (code, out, err) =
            run(Command::new(portcullis_bin()).args(["policy", "explain", "--json"]).arg(root.join(file)).args(args));
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        (code, v, err)
    };
    let sql = |text: &str| explain("analyst.toml", &["--target", "warehouse", "--scope", "analyst", "--sql", text]);

    let (code, v, err) = sql("SELECT email FROM customers");
    assert_eq!((code, &v["decision"]["verdict"]), (0, &Value::from("allow")), "{v}{err}");
    assert!(err.contains("SELECT") && err.contains("public.customers"), "{err}");
    // The worst statement decides, named with its reason.
    let (code, v, err) = sql("SELECT 1; /* x */ DROP TABLE customers");
    assert_eq!(code, 2, "{v}");
    assert_eq!(v["decision"]["verdict"], "deny");
    assert!(v["decision"]["reason"].as_str().unwrap().contains("ddl"), "{v}");
    assert!(err.contains("DROP: classes ddl; tables public.customers"), "{err}");
    let (code, v, _) = sql("select * from AUTH.\"users\"");
    assert_eq!(code, 2);
    assert!(v["decision"]["reason"].as_str().unwrap().contains("deny_tables"), "{v}");
    let (code, v, _) = sql("SELECT pg_sleep(1)");
    assert_eq!(code, 2);
    assert!(v["decision"]["reason"].as_str().unwrap().contains("pg_sleep"), "{v}");
    let (code, v, _) = sql("SELEKT nonsense");
    assert_eq!(code, 2);
    assert!(v["decision"]["reason"].as_str().unwrap().contains("cannot read"), "{v}");

    let http = |method: &str, path: &str| {
        explain(
            "coding-agent.toml",
            &["--target", "forge-api", "--unit", "coding-agent.service", "--method", method, "--path", path],
        )
    };
    let (code, v, _) = http("POST", "/repos/acme/app/issues");
    assert_eq!((code, &v["decision"]["verdict"]), (0, &Value::from("allow")), "{v}");
    let (_, v, _) = http("POST", "/repos/acme/app/releases");
    assert_eq!(v["decision"]["verdict"], "approve", "{v}");
    let (code, v, _) = http("DELETE", "/repos/acme/app");
    assert_eq!((code, &v["decision"]["verdict"]), (2, &Value::from("deny")), "{v}");

    // Each option only for its protocol.
    let (code, _, err) = run(Command::new(portcullis_bin())
        .args(["policy", "explain"])
        .arg(root.join("analyst.toml"))
        .args(["--target", "warehouse", "--method", "GET", "--path", "/"]));
    assert_ne!(code, 0);
    assert!(err.contains("http targets"), "{err}");
}
