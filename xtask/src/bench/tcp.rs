//! `cargo xtask bench tcp`: the opaque relay against a direct connection and
//! against haproxy (`mode tcp`), all in one run on this machine.
//!
//! One upstream server (`tcp-bench serve`) on 127.0.0.1. The same load
//! generator (`tcp-bench`, release build) reaches it three ways:
//! - direct, from an unguarded process;
//! - through portcullis: run inside a guarded scope, dialling a `tcp` target
//!   declared at 127.0.0.53, which the probes steer to the enforcer;
//! - through haproxy: Debian's package, `mode tcp`, as many threads as
//!   portcullis has workers, dialled directly on its own loopback port.
//!
//! Every figure is measured in each of several repetitions (the order of the
//! three paths rotates from one repetition to the next) and the median is
//! printed, with its ratio to direct. Separately: the connect() latency of an
//! unguarded process with the probes detached and attached, and the cost of
//! setting up a connection (connect + first round trip), which through
//! portcullis includes attribution, the decision and the audit record that
//! must be on disk before the first byte is forwarded.
//!
//! Servers and portcullis are stopped, the probes detached and the cgroups
//! removed on every way out, Ctrl-C included.
use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::support::{cgroup2_mount, free_port, require_root, wait_port, Portcullis};
use crate::{cargo, root};

/// Bytes per bulk transfer.
const BULK_BYTES: u64 = 2 << 30;
/// Request and response size of a round trip.
const RR_SIZE: usize = 64;
/// Concurrent connections of the loaded round-trip run.
const RR_CONNS: usize = 16;
const RR_SECS: &str = "1.5";
const SETUP_COUNT: &str = "200";
const CONNECT_COUNT: &str = "1000";
/// Repetitions (medians are taken over them); `BENCH_REPS` overrides.
/// `PORTCULLIS_BIN` measures another portcullis binary than the release build;
/// `BENCH_VERBOSE` prints every run's own figures; `BENCH_RT=1` runs under
/// the real-time scheduling class (see `raise_priority`).
const REPS: usize = 5;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

#[derive(Clone, Copy, PartialEq)]
enum Path3 {
    Direct,
    Portcullis,
    Haproxy,
}

const PATHS: [Path3; 3] = [Path3::Direct, Path3::Portcullis, Path3::Haproxy];

pub fn run() -> Result<()> {
    require_root("the tcp benchmark")?;
    cargo(&["build", "--release", "-p", "xtask", "--bin", "tcp-bench"])?;
    let reps = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(REPS);
    let sched = raise_priority();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }
    // Dropping the bench cleans up, on errors too.
    let mut bench = Bench::new()?;
    bench.sched = sched;
    bench.run(reps)
}

/// Background jobs (builds) on a small machine swamp the figures, so the
/// bench and everything it starts run at the highest priority, all alike:
/// nice -20, or with `BENCH_RT=1` the real-time round-robin class, which
/// shields them completely but makes every wake-up cross CPUs (round trips
/// then take longer, direct ones included).
fn raise_priority() -> String {
    if std::env::var_os("BENCH_RT").is_some_and(|v| v != "0") {
        let param = libc::sched_param { sched_priority: 10 };
        // SAFETY: sched_setscheduler(2) on this process with a valid param.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) } == 0 {
            return "SCHED_RR".into();
        }
        eprintln!("tcp bench: no real-time class: {}", std::io::Error::last_os_error());
    }
    // SAFETY: plain setpriority(2) on this process.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) } == 0 {
        return "nice -20".into();
    }
    eprintln!("tcp bench: cannot raise priority: {}", std::io::Error::last_os_error());
    "nice 0".into()
}

/// The 1-minute load average: how busy the machine was besides the bench.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_default()
}

struct Bench {
    work: PathBuf,
    bin: PathBuf,
    pc: Portcullis,
    cgroup_base: String,
    cgroup_mount: PathBuf,
    children: Vec<(&'static str, Child)>,
    agent: Option<Child>,
    threads: usize,
    sched: String,
    load_before: String,
}

impl Bench {
    fn new() -> Result<Bench> {
        let target = root().join("target");
        let tag = format!("portcullis-bench-{}", std::process::id());
        let work = target.join(&tag);
        fs::create_dir_all(&work)?;
        let bench = Bench {
            bin: target.join("release/tcp-bench"),
            pc: Portcullis {
                // Another build can be measured in its place (to compare).
                bin: std::env::var_os("PORTCULLIS_BIN")
                    .map_or_else(|| target.join("release/portcullis"), PathBuf::from),
                control: work.join("control.sock"),
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/{tag}")),
                state_dir: work.join("state"),
            },
            cgroup_base: tag,
            cgroup_mount: cgroup2_mount()?,
            work,
            children: Vec::new(),
            agent: None,
            threads: thread::available_parallelism().map_or(2, |n| n.get()),
            sched: String::new(),
            load_before: loadavg(),
        };
        for b in [&bench.bin, &bench.pc.bin] {
            ensure!(b.exists(), "{} is missing", b.display());
        }
        Ok(bench)
    }

    fn run(&mut self, reps: usize) -> Result<()> {
        let upstream = self.start_server()?;
        let haproxy = self.start_haproxy(upstream)?;
        let target: SocketAddr = SocketAddr::from(([127, 0, 0, 53], free_port()?));

        let mut results: HashMap<String, Vec<f64>> = HashMap::new();
        let mut push = |k: String, v: f64| results.entry(k).or_default().push(v);

        eprintln!("tcp bench: connect() latency, probes detached");
        for _ in 0..reps {
            let r = self.load(false, &["connect", "--count", CONNECT_COUNT])?;
            push("connect/detached".into(), r["p50_ns"]);
        }

        self.start_agent(upstream, target)?;
        for rep in 0..reps {
            eprintln!("tcp bench: repetition {}/{reps}", rep + 1);
            let r = self.load(false, &["connect", "--count", CONNECT_COUNT])?;
            push("connect/attached".into(), r["p50_ns"]);
            let r = self.load(true, &["connect", "--count", CONNECT_COUNT])?;
            push("connect/guarded".into(), r["p50_ns"]);
            for i in 0..PATHS.len() {
                let path = PATHS[(rep + i) % PATHS.len()];
                let (addr, guarded) = match path {
                    Path3::Direct => (upstream, false),
                    Path3::Portcullis => (target, true),
                    Path3::Haproxy => (haproxy, false),
                };
                let name = path.name();
                let a = addr.to_string();
                let r =
                    self.load(guarded, &["rr", &a, "--conns", "1", "--size", &RR_SIZE.to_string(), "--secs", RR_SECS])?;
                push(format!("rr1/p50/{name}"), r["p50_ns"]);
                push(format!("rr1/rate/{name}"), r["count"] / r["secs"]);
                let conns = RR_CONNS.to_string();
                let r = self
                    .load(guarded, &["rr", &a, "--conns", &conns, "--size", &RR_SIZE.to_string(), "--secs", RR_SECS])?;
                push(format!("rrn/rate/{name}"), r["count"] / r["secs"]);
                push(format!("rrn/p99/{name}"), r["p99_ns"]);
                for dir in ["up", "down"] {
                    let r = self.load(guarded, &["bulk", &a, "--dir", dir, "--bytes", &BULK_BYTES.to_string()])?;
                    push(format!("bulk-{dir}/{name}"), r["bytes"] * 8.0 / r["secs"] / 1e9);
                }
                let r = self.load(guarded, &["setup", &a, "--count", SETUP_COUNT])?;
                push(format!("setup/{name}"), r["p50_ns"]);
            }
        }
        self.stop_agent()?;

        eprintln!("tcp bench: connect() latency, probes detached again");
        for _ in 0..reps {
            let r = self.load(false, &["connect", "--count", CONNECT_COUNT])?;
            push("connect/detached".into(), r["p50_ns"]);
        }
        self.report(&results, reps)
    }

    fn report(&self, res: &HashMap<String, Vec<f64>>, reps: usize) -> Result<()> {
        let m = |k: &str| -> Result<f64> { res.get(k).map(|v| median(v)).with_context(|| format!("no figure {k}")) };
        let us = |ns: f64| ns / 1000.0;
        println!();
        println!(
            "tcp benchmark: medians of {reps} repetitions; {} cores; portcullis {} workers, haproxy nbthread {}; {}",
            self.threads, self.threads, self.threads, self.sched
        );
        println!("load average of the machine: {} before, {} after", self.load_before, loadavg());
        println!("ratios are to direct (rates: higher is better)");
        println!();
        println!("{:<40} {:>14} {:>24} {:>24}", "", "direct", "portcullis", "haproxy");
        let row_lat = |label: &str, key: &str| -> Result<()> {
            let d = m(&format!("{key}/direct"))?;
            let cells: Vec<String> = [Path3::Portcullis, Path3::Haproxy]
                .iter()
                .map(|p| -> Result<String> {
                    let v = m(&format!("{key}/{}", p.name()))?;
                    Ok(format!("{:.1} us (+{:.1})", us(v), us(v - d)))
                })
                .collect::<Result<_>>()?;
            println!("{label:<40} {:>14} {:>24} {:>24}", format!("{:.1} us", us(d)), cells[0], cells[1]);
            Ok(())
        };
        let row_rate = |label: &str, key: &str, unit: &str, scale: f64| -> Result<()> {
            let d = m(&format!("{key}/direct"))?;
            let cells: Vec<String> = [Path3::Portcullis, Path3::Haproxy]
                .iter()
                .map(|p| -> Result<String> {
                    let v = m(&format!("{key}/{}", p.name()))?;
                    Ok(format!("{:.2} {unit} ({:.2}x)", v / scale, v / d))
                })
                .collect::<Result<_>>()?;
            println!("{label:<40} {:>14} {:>24} {:>24}", format!("{:.2} {unit}", d / scale), cells[0], cells[1]);
            Ok(())
        };
        row_lat(&format!("round trip, 1 conn, {RR_SIZE} B, median"), "rr1/p50")?;
        row_rate("round trips/s, 1 conn", "rr1/rate", "k/s", 1e3)?;
        row_rate(&format!("round trips/s, {RR_CONNS} conns"), "rrn/rate", "k/s", 1e3)?;
        row_lat(&format!("round trip, {RR_CONNS} conns, p99"), "rrn/p99")?;
        row_rate("bulk, client to server, 1 conn", "bulk-up", "Gbit/s", 1.0)?;
        row_rate("bulk, server to client, 1 conn", "bulk-down", "Gbit/s", 1.0)?;
        row_lat("new connection + first round trip", "setup")?;
        println!();
        let det = m("connect/detached")?;
        let att = m("connect/attached")?;
        let grd = m("connect/guarded")?;
        println!("socket()+connect() to 127.0.0.1, median:");
        println!("  unguarded process, probes detached    {:>8.1} us", us(det));
        println!("  unguarded process, probes attached    {:>8.1} us ({:+.1})", us(att), us(att - det));
        println!("  guarded process, undeclared address   {:>8.1} us ({:+.1})", us(grd), us(grd - det));
        Ok(())
    }

    /// Runs the load generator, unguarded or inside the bench scope, and
    /// reads its `key=value` line.
    fn load(&self, guarded: bool, args: &[&str]) -> Result<HashMap<String, f64>> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let mut cmd = if guarded {
            let mut c = self.pc.exec("bench");
            c.arg(&self.bin);
            c
        } else {
            Command::new(&self.bin)
        };
        cmd.args(args).stdin(Stdio::null());
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let line = String::from_utf8_lossy(&out.stdout);
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("  {}{} -> {}", if guarded { "[guarded] " } else { "" }, args.join(" "), line.trim());
        }
        parse_kv(&line)
    }

    fn start_server(&mut self) -> Result<SocketAddr> {
        let mut child = Command::new(&self.bin)
            .args(["serve", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting tcp-bench serve")?;
        let stdout = child.stdout.take().expect("piped");
        self.children.push(("tcp-bench serve", child));
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("listening=").with_context(|| format!("server said {line:?}"))?;
        Ok(addr.parse()?)
    }

    fn start_haproxy(&mut self, upstream: SocketAddr) -> Result<SocketAddr> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let cfg = self.work.join("haproxy.cfg");
        fs::write(&cfg, haproxy_config(addr, upstream, self.threads))?;
        let check = Command::new("haproxy").arg("-c").arg("-f").arg(&cfg).output().context("running haproxy")?;
        ensure!(check.status.success(), "haproxy rejects its config: {}", String::from_utf8_lossy(&check.stderr));
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(self.work.join("haproxy.log"))?))
            .spawn()
            .context("starting haproxy")?;
        self.children.push(("haproxy", child));
        wait_port(addr, "haproxy")?;
        Ok(addr)
    }

    fn start_agent(&mut self, upstream: SocketAddr, target: SocketAddr) -> Result<()> {
        let policy = self.work.join("policy.toml");
        fs::write(&policy, policy_toml(&self.cgroup_base, target, upstream))?;
        let log = self.work.join("portcullis.log");
        let child = self
            .pc
            .run(&policy, free_port()?)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&log)?))
            .spawn()
            .context("starting portcullis")?;
        let agent = self.agent.insert(child);
        self.pc.wait_ready(agent, Some(&log))
    }

    /// SIGTERM, wait, then detach the pinned probes.
    fn stop_agent(&mut self) -> Result<()> {
        if let Some(mut c) = self.agent.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        if self.pc.pin_dir.exists() {
            let out = self.pc.detach()?;
            ensure!(out.status.success(), "portcullis detach failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        if let Err(e) = self.stop_agent() {
            eprintln!("tcp bench clean-up: {e:#}");
        }
        for (name, mut c) in self.children.drain(..) {
            if let Err(e) = c.kill().and_then(|_| c.wait()) {
                eprintln!("tcp bench clean-up: stopping {name}: {e}");
            }
        }
        let base = self.cgroup_mount.join(&self.cgroup_base);
        for dir in [base.join("bench"), base.clone()] {
            if dir.exists() {
                if let Err(e) = fs::remove_dir(&dir) {
                    eprintln!("tcp bench clean-up: removing cgroup {}: {e}", dir.display());
                }
            }
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Path3 {
    fn name(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Portcullis => "portcullis",
            Path3::Haproxy => "haproxy",
        }
    }
}

fn policy_toml(cgroup_base: &str, target: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"version = 1

[[scopes]]
name = "bench"
cgroup = "{cgroup_base}/bench"
egress = "allow"

[[targets]]
name = "bench"
protocol = "tcp"
match = ["{target}"]
upstream = "{upstream}"

[[roles]]
name = "bench"
[[roles.rules]]
target = "bench"
allow = ["connect"]

[[bindings]]
scope = "bench"
role = "bench"
"#
    )
}

/// haproxy as its documentation tunes a TCP relay: `mode tcp`, one thread
/// per core (as portcullis' runtime has workers), and splice(2) where it
/// pays (`option splice-auto`), as portcullis relays with splice(2) too.
fn haproxy_config(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> String {
    format!(
        "global
    nbthread {threads}
    maxconn 4096

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bench
    bind {listen}
    default_backend upstream

backend upstream
    server s1 {upstream}
"
    )
}

fn parse_kv(line: &str) -> Result<HashMap<String, f64>> {
    let mut m = HashMap::new();
    for pair in line.split_whitespace() {
        let (k, v) = pair.split_once('=').with_context(|| format!("bad output {line:?}"))?;
        m.insert(k.to_string(), v.parse::<f64>().with_context(|| format!("bad number in {line:?}"))?);
    }
    ensure!(!m.is_empty(), "the load generator printed nothing");
    Ok(m)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
