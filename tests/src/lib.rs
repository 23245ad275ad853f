//! Helpers for the privileged end-to-end tests: start a real `portcullis`
//! with its own pin directory, port, state directory and cgroups; run
//! commands inside guarded scopes; start real servers on loopback.
//!
//! Every test runs as root for real. Outside CI a non-root run skips them
//! with a message; with `CI` set a missing privilege or tool is an error.
pub mod fixtures;
pub mod servers;

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// True when privileged tests can run. Without root: a skip message, or a
/// panic under CI (where skipping would hide a broken set-up).
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if in_ci() {
        panic!("end-to-end tests need root (cgroups, eBPF); CI must run them as root");
    }
    eprintln!("skipping: end-to-end test needs root");
    false
}

/// Panics (in CI) or reports false when a tool the test needs is missing.
pub fn require_tool(cmd: &str) -> bool {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().is_ok_and(|o| o.status.success());
    if !ok {
        if in_ci() {
            panic!("`{cmd}` is required by the end-to-end tests (cargo xtask setup installs it)");
        }
        eprintln!("skipping: `{cmd}` not installed");
    }
    ok
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("root").to_path_buf()
}

/// The portcullis binary under test.
pub fn portcullis_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/portcullis"))
}

/// A helper binary of this crate (built next to the test executables).
pub fn helper_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "helper binary {} missing (cargo test builds it)", p.display());
    p
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A running `portcullis run` under test.
pub struct Agent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Loopback port of the agent's Prometheus endpoint.
    pub metrics_port: u16,
    pub pin_dir: PathBuf,
    pub control: PathBuf,
    pub policy_path: PathBuf,
    /// Cgroup subtree (relative to the cgroup2 mount) this agent's scopes
    /// live under; `@CG@` in a policy is replaced with it.
    pub cgroup_base: String,
    pub log: Arc<Mutex<Vec<String>>>,
    extra_env: Vec<(String, String)>,
    /// A command the agent runs under (e.g. `setpriv` with fewer capabilities).
    wrapper: Vec<String>,
}

impl Agent {
    /// Starts portcullis with `policy` (where `@CG@` stands for a fresh
    /// cgroup subtree) and waits until it answers on its control socket.
    pub fn start(policy: &str) -> Agent {
        Agent::start_with_env(policy, &[])
    }

    pub fn start_with_env(policy: &str, env: &[(&str, &str)]) -> Agent {
        Agent::start_full(policy, env, &[])
    }

    /// Starts portcullis as the last argument of `wrapper` (a command such
    /// as `setpriv --bounding-set=...`).
    pub fn start_wrapped(policy: &str, wrapper: &[&str]) -> Agent {
        Agent::start_full(policy, &[], wrapper)
    }

    fn start_full(policy: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = unique("pc");
        let cgroup_base = format!("portcullis-test/{name}");
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy.replace("@CG@", &cgroup_base)).unwrap();
        let mut agent = Agent {
            child: None,
            port: free_port(),
            metrics_port: free_port(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            control: dir.path().join("control.sock"),
            policy_path,
            cgroup_base,
            log: Arc::new(Mutex::new(Vec::new())),
            extra_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        agent.spawn();
        agent
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The arguments of `portcullis run` for this agent.
    pub fn run_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        a.push("--control-socket".into());
        a.push(self.control.clone().into());
        for (k, v) in [
            ("run", None),
            ("--policy", Some(self.policy_path.clone().into_os_string())),
            ("--listen-port", Some(self.port.to_string().into())),
            ("--pin-dir", Some(self.pin_dir.clone().into_os_string())),
            ("--state-dir", Some(self.state_dir().into_os_string())),
            ("--metrics-addr", Some(format!("127.0.0.1:{}", self.metrics_port).into())),
        ] {
            a.push(k.into());
            a.extend(v);
        }
        a
    }

    fn spawn(&mut self) {
        let mut cmd = match self.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(portcullis_bin());
                c
            }
            None => Command::new(portcullis_bin()),
        };
        cmd.args(self.run_args())
            .env("PORTCULLIS_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start portcullis");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("PORTCULLIS_TEST_LOG").is_some() {
                    eprintln!("[portcullis] {line}");
                }
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.try_status().is_some() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("portcullis exited during start-up ({status}):\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                panic!("portcullis did not become ready:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!("no log line containing {needle:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A `portcullis` command aimed at this agent.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(portcullis_bin());
        cmd.arg("--control-socket").arg(&self.control);
        cmd
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = self.cli().args(["status", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        self.try_status().unwrap_or_else(|| panic!("status failed:\n{}", self.log_text()))
    }

    /// A command that runs `argv` inside `scope` (via `portcullis exec`).
    pub fn exec(&self, scope: &str, argv: &[&str]) -> Command {
        let mut cmd = self.cli();
        cmd.args(["exec", "--scope", scope, "--"]).args(argv);
        cmd
    }

    /// psql inside `scope` as user `whoever` of database `appdb` at
    /// `host`:5432 (no psqlrc, unaligned tuples only, 10 s to connect),
    /// with `extra` arguments.
    pub fn psql(&self, scope: &str, host: &str, extra: &[&str]) -> Command {
        let mut argv = vec!["psql", "-h", host, "-p", "5432", "-U", "whoever", "-d", "appdb", "-X", "-At"];
        argv.extend_from_slice(extra);
        let mut cmd = self.exec(scope, &argv);
        cmd.env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// That psql reading `script` on stdin (verbose errors), started with
    /// `env` and left running with piped output.
    pub fn spawn_psql(&self, scope: &str, host: &str, script: &str, env: &[(&str, &str)]) -> Child {
        let mut cmd = self.psql(scope, host, &["-v", "VERBOSITY=verbose", "-f", "-"]);
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run psql");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        child
    }

    /// The extended-protocol test client (`pg-client <mode>`) inside
    /// `scope` as user `whoever` of database `appdb` at 127.0.0.53:5432
    /// with `password`, left running with piped stdin, stdout and stderr.
    pub fn spawn_pg_client(&self, scope: &str, mode: &str, password: &str) -> Child {
        let bin = helper_bin("pg-client");
        let mut cmd =
            self.exec(scope, &[bin.to_str().unwrap(), mode, "127.0.0.53", "5432", "whoever", password, "appdb"]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("run pg-client")
    }

    /// Same, as another user.
    pub fn exec_as(&self, scope: &str, user: &str, argv: &[&str]) -> Command {
        let mut cmd = self.cli();
        cmd.args(["exec", "--scope", scope, "--user", user, "--"]).args(argv);
        cmd
    }

    /// Runs the test TCP client inside `scope` and returns its JSON report.
    pub fn tcp_client(&self, scope: &str, args: &[&str]) -> Value {
        let client = helper_bin("tcp-client");
        let client = client.to_str().unwrap();
        let mut argv = vec![client];
        argv.extend_from_slice(args);
        let out = self.exec(scope, &argv).output().expect("run tcp-client");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "tcp-client printed no JSON (status {}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Exports the agent's CA (`portcullis ca export`) to a file, as a user
    /// would to trust it; returns the file's path.
    pub fn export_ca(&self) -> PathBuf {
        let out = self.cli().args(["ca", "export", "--state-dir"]).arg(self.state_dir()).output().unwrap();
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        let ca = self.dir.path().join(format!("{}.pem", unique("ca")));
        std::fs::write(&ca, &out.stdout).unwrap();
        ca
    }

    /// `portcullis approvals <args>` aimed at this agent, run from outside
    /// any scope.
    pub fn approvals(&self, args: &[&str]) -> Output {
        self.cli().arg("approvals").args(args).output().unwrap()
    }

    /// The requests held for approval now; none when the list cannot be
    /// read.
    pub fn pending_approvals(&self) -> Vec<Value> {
        let out = self.approvals(&["list", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    }

    /// Waits (`within` at most) until a request is held for approval and
    /// returns every request held then; panics saying no `what` was held.
    pub fn wait_pending(&self, what: &str, within: Duration) -> Vec<Value> {
        let held = fixtures::wait_until(within, || Some(self.pending_approvals()).filter(|l| !l.is_empty()));
        held.unwrap_or_else(|| panic!("no {what} was held:\n{}", self.log_text()))
    }

    /// Replaces the policy file and waits for the agent to react: `Ok` when
    /// it reloaded, `Err` when it refused the file.
    pub fn replace_policy(&self, policy: &str) -> Result<(), String> {
        let before = self.status()["counters"].clone();
        std::fs::write(&self.policy_path, policy.replace("@CG@", &self.cgroup_base)).unwrap();
        self.cli().arg("status").output().unwrap();
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.status()["counters"].clone();
            if now["reloads"].as_u64() > before["reloads"].as_u64() {
                return Ok(());
            }
            if now["reload_failures"].as_u64() > before["reload_failures"].as_u64() {
                return Err(self.log_text());
            }
            if Instant::now() > deadline {
                panic!("policy change not picked up:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no clean-up: the pinned probes stay.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again with the same settings.
    pub fn restart(&mut self) {
        self.kill9();
        self.log.lock().unwrap().clear();
        self.spawn();
    }

    /// Every audit record so far, in order (`portcullis sessions export`,
    /// which reads the log from the state directory).
    pub fn audit(&self) -> Vec<Value> {
        let out = self
            .cli()
            .args(["sessions", "export", "--format", "jsonl", "--state-dir"])
            .arg(self.state_dir())
            .envs(self.extra_env.iter().filter(|(k, _)| k == "PORTCULLIS_AUDIT_DIR").map(|(k, v)| (k, v)))
            .output()
            .expect("sessions export");
        assert!(out.status.success(), "sessions export failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("export line {l:?}: {e}")))
            .collect()
    }

    /// A `portcullis sessions ...` command reading this agent's log.
    pub fn sessions(&self, args: &[&str]) -> Command {
        let mut cmd = self.cli();
        cmd.arg("sessions").args(args).arg("--state-dir").arg(self.state_dir());
        for (k, v) in &self.extra_env {
            if k == "PORTCULLIS_AUDIT_DIR" {
                cmd.env(k, v);
            }
        }
        cmd
    }

    /// Waits until an audit record satisfies `pred`.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.audit().into_iter().find(|r| pred(r)) {
                return r;
            }
            if Instant::now() > deadline {
                panic!("no audit record: {what}\nrecords: {:#?}\nlog:\n{}", self.audit(), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's `/metrics` body (a plain HTTP/1.0 GET on loopback).
    pub fn metrics_text(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// Absolute path of a cgroup under this agent's subtree.
    pub fn cgroup_dir(&self, rel: &str) -> PathBuf {
        cgroup2_mount().join(rel.replace("@CG@", &self.cgroup_base))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(portcullis_bin()).arg("detach").arg("--pin-dir").arg(&self.pin_dir).output();
        remove_cgroup_tree(&cgroup2_mount().join(&self.cgroup_base));
    }
}

/// The cgroup2 mount, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in info.lines() {
        if let Some((pre, post)) = line.split_once(" - ") {
            if post.starts_with("cgroup2 ") {
                return PathBuf::from(pre.split_whitespace().nth(4).unwrap());
            }
        }
    }
    panic!("no cgroup2 mount");
}

/// Removes a cgroup subtree, children first (cgroups are removed with
/// rmdir once empty of processes).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Addresses used as "remote" services in tests: loopback only.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}
