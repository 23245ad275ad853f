//! `cargo xtask bench soak [--minutes N]`: portcullis under a moderate,
//! steady mix of guarded work for N minutes (default 10), watching its
//! memory.
//!
//! The mix, all from inside one guarded scope and through the eBPF path:
//! - PostgreSQL: pgbench select-only with a new connection per transaction
//!   (`-C`, so sessions open and close all the time) and pgbench
//!   simple-update on long-lived connections, both rate-limited (`-R`);
//! - HTTP: requests on fresh connections to a plain-HTTP upstream;
//! - tcp: connections to a line-echo upstream, one line each.
//!
//! The HTTP and tcp load runs as `xtask soak-load` inside the scope. The
//! agent's RSS (VmRSS in /proc/PID/status) and open descriptors are sampled
//! every few seconds. The report gives the peak, the level after warm-up,
//! the end, and the slope over the rest of the run; the run fails when the
//! end is well above the after-warm-up level (memory growing without
//! bound), or when descriptors pile up.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::support::{in_pg_scratch_dir, require_root, start_postgres, PgUser, Portcullis};

const PASSWORD: &str = "soak-Pw-81d3";
/// Seconds between samples.
const SAMPLE_EVERY: u64 = 5;
/// Requests per second of each generator (pgbench -R, and the HTTP and tcp
/// loops).
const RATE: u32 = 40;
/// The end of the run may exceed the after-warm-up RSS by this factor plus
/// `SLACK_KIB` before the run counts as growing without bound.
const GROWTH_FACTOR: f64 = 1.25;
const SLACK_KIB: u64 = 16 * 1024;

/// One sample of the agent: seconds since start, RSS and open descriptors.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub secs: f64,
    pub rss_kib: u64,
    pub fds: u64,
}

/// VmRSS (KiB) from a /proc/PID/status text.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

fn sample(pid: u32, t0: Instant) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample { secs: t0.elapsed().as_secs_f64(), rss_kib: vm_rss_kib(&status)?, fds })
}

/// Least-squares slope of RSS over time, in KiB per minute.
pub fn slope_kib_per_min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mx = samples.iter().map(|s| s.secs).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.secs - mx) * (s.rss_kib as f64 - my);
        den += (s.secs - mx) * (s.secs - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den * 60.0
    }
}

/// What a run's samples say.
#[derive(Debug)]
pub struct Verdict {
    pub peak_kib: u64,
    pub warm_kib: u64,
    pub end_kib: u64,
    pub slope: f64,
    pub warm_fds: u64,
    pub end_fds: u64,
    pub problems: Vec<String>,
}

/// Judges the samples: the level after warm-up is the median of the
/// samples in the window after `warm_secs`; the end is the median of the
/// last few samples (one sample is noise).
pub fn judge(samples: &[Sample], warm_secs: f64) -> Verdict {
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let after: Vec<Sample> = samples.iter().copied().filter(|s| s.secs >= warm_secs).collect();
    let k = (after.len() / 5).clamp(1, 6);
    let warm_kib = median(&mut after.iter().take(k).map(|s| s.rss_kib).collect());
    let end_kib = median(&mut after.iter().rev().take(k).map(|s| s.rss_kib).collect());
    let warm_fds = median(&mut after.iter().take(k).map(|s| s.fds).collect());
    let end_fds = median(&mut after.iter().rev().take(k).map(|s| s.fds).collect());
    let peak_kib = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let mut problems = Vec::new();
    if after.len() < 4 {
        problems.push(format!("too few samples after warm-up ({})", after.len()));
    }
    let bound = (warm_kib as f64 * GROWTH_FACTOR) as u64 + SLACK_KIB;
    if end_kib > bound {
        problems.push(format!("RSS grew from {warm_kib} KiB after warm-up to {end_kib} KiB (bound {bound} KiB)"));
    }
    if end_fds > warm_fds + 64 {
        problems.push(format!("open descriptors grew from {warm_fds} to {end_fds}"));
    }
    Verdict { peak_kib, warm_kib, end_kib, slope: slope_kib_per_min(&after), warm_fds, end_fds, problems }
}

/// A line-echo upstream: answers each line with `echo:<line>`.
fn line_echo() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut w = match s.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    if w.write_all(format!("echo:{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A plain-HTTP/1.1 upstream answering every request with a small JSON
/// body (keep-alive honoured).
fn http_upstream() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || serve_http(s));
        }
    });
    Ok(addr)
}

fn serve_http(s: TcpStream) {
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let reply = br#"{"ok":true,"items":[1,2,3],"note":"soak"}"#;
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", reply.len());
        if w.write_all(head.as_bytes()).and_then(|_| w.write_all(reply)).is_err() {
            return;
        }
    }
}

pub fn run(minutes: u64) -> Result<()> {
    require_root("the soak")?;
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    in_pg_scratch_dir("portcullis-soak", |dir, pg_user| soak(dir, pg_user, minutes))
}

fn soak(dir: &Path, pg_user: PgUser, minutes: u64) -> Result<()> {
    let pg = start_postgres(dir, pg_user, 100, "soak", PASSWORD, 2)?;
    let pg_port = pg.port;

    let echo = line_echo()?;
    let web = http_upstream()?;

    // portcullis.
    let pw = dir.join("soak.pw");
    fs::write(&pw, PASSWORD)?;
    let cg = format!("portcullis-soak/{}", std::process::id());
    let policy = dir.join("policy.toml");
    fs::write(
        &policy,
        format!(
            "version = 1\n\n[[scopes]]\nname = \"soak\"\ncgroup = \"{cg}\"\negress = \"deny\"\n\n\
             [[targets]]\nname = \"db\"\nprotocol = \"postgres\"\nmatch = [\"127.0.0.53:5432\"]\n\
             upstream = \"127.0.0.1:{pg_port}\"\n[targets.credentials]\nuser = \"soak\"\npassword = {{ file = \"{pw}\" }}\n\n\
             [[targets]]\nname = \"web\"\nprotocol = \"http\"\nmatch = [\"127.1.0.9:80\"]\nhosts = [\"web.soak.test\"]\n\
             upstream = \"{web}\"\n\n\
             [[targets]]\nname = \"echo\"\nprotocol = \"tcp\"\nmatch = [\"127.0.0.53:7500\"]\nupstream = \"{echo}\"\n\n\
             [[roles]]\nname = \"app\"\n\
             [[roles.rules]]\ntarget = \"db\"\nallow = [\"read\", \"write\", \"session\", \"transaction\"]\n\
             mask = [\"detector:email\"]\n\
             [[roles.rules]]\ntarget = \"web\"\nallow = [\"read\", \"POST /**\"]\nmask = [\"detector:token\"]\n\
             [[roles.rules]]\ntarget = \"echo\"\nallow = [\"connect\"]\n\n\
             [[bindings]]\nscope = \"soak\"\nrole = \"app\"\n",
            pw = pw.display()
        ),
    )?;
    let pc = Portcullis {
        // PORTCULLIS_BIN: soak another build (the release one by default).
        bin: std::env::var_os("PORTCULLIS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::root().join("target/release/portcullis")),
        control: dir.join("control.sock"),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/portcullis-soak-{}", std::process::id())),
        state_dir: dir.join("state"),
    };
    let agent = pc.start(&policy)?;
    let pid = agent.0.id();

    let secs = minutes * 60;
    let guarded = |argv: &[&str]| -> Command {
        let mut c = pc.exec("soak");
        c.args(argv);
        c
    };
    let (t, r) = (secs.to_string(), RATE.to_string());
    let pgbench = |extra: &[&str]| -> Result<Child> {
        let mut argv = vec!["pgbench", "-h", "127.0.0.53", "-p", "5432", "-U", "soak", "-n", "-T", &t, "-R", &r];
        argv.extend_from_slice(extra);
        argv.push("soak");
        guarded(&argv)
            .env("PGPASSWORD", "anything")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pgbench")
    };
    let t0 = Instant::now();
    let reads = pgbench(&["-S", "-C", "-c", "2", "-j", "1"])?;
    let writes = pgbench(&["-N", "-c", "2", "-j", "1"])?;
    let xtask = std::env::current_exe()?;
    let load = guarded(&[
        xtask.to_str().context("xtask path")?,
        "soak-load",
        "--seconds",
        &t,
        "--rate",
        &r,
        "--tcp",
        "127.0.0.53:7500",
        "--http",
        "127.1.0.9:80",
        "--host",
        "web.soak.test",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .context("starting the soak load")?;

    println!("\nsoak: {minutes} min, pgbench select-only (-C) and simple-update at {RATE}/s each, HTTP and tcp at {RATE}/s each");
    println!("{:>6} {:>10} {:>5}", "secs", "rss KiB", "fds");
    let mut samples = Vec::new();
    let end = t0 + Duration::from_secs(secs);
    while Instant::now() < end {
        thread::sleep(Duration::from_secs(SAMPLE_EVERY).min(end.saturating_duration_since(Instant::now())));
        let s = sample(pid, t0).context("the agent is gone")?;
        if samples.len() % 6 == 0 {
            println!("{:>6.0} {:>10} {:>5}", s.secs, s.rss_kib, s.fds);
        }
        samples.push(s);
    }
    let reads = reads.wait_with_output()?;
    let writes = writes.wait_with_output()?;
    let load = load.wait_with_output()?;
    // Idle again: sessions closed, what is still held is the baseline.
    thread::sleep(Duration::from_secs(3));
    let idle = sample(pid, t0).context("the agent is gone")?;
    drop(agent);
    let _ = pc.detach();
    let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(&cg));

    let mut problems = Vec::new();
    for (name, out) in [("select-only -C", &reads), ("simple-update", &writes)] {
        let text = String::from_utf8_lossy(&out.stdout);
        let done = text.lines().find(|l| l.starts_with("number of transactions actually processed"));
        let failed = text.lines().find(|l| l.starts_with("number of failed transactions"));
        println!("pgbench {name}: {}; {}", done.unwrap_or("?"), failed.unwrap_or("no failures reported"));
        if !out.status.success() {
            problems.push(format!("pgbench {name} failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    let report: serde_json::Value = serde_json::from_slice(&load.stdout).context("soak-load printed no report")?;
    println!("http and tcp: {report}");
    let total = report["http_ok"].as_u64().unwrap_or(0) + report["tcp_ok"].as_u64().unwrap_or(0);
    let errors = report["http_errors"].as_u64().unwrap_or(0) + report["tcp_errors"].as_u64().unwrap_or(0);
    if total == 0 || errors * 100 > total {
        problems.push(format!("the HTTP/tcp load had {errors} errors in {total} requests"));
    }

    let warm = (secs as f64 / 5.0).min(60.0);
    let v = judge(&samples, warm);
    println!(
        "\nagent RSS: peak {} KiB; after warm-up ({warm:.0} s) {} KiB; end {} KiB; slope after warm-up {:+.0} KiB/min; \
         idle after the load {} KiB",
        v.peak_kib, v.warm_kib, v.end_kib, v.slope, idle.rss_kib
    );
    println!("open descriptors: after warm-up {}, end {}, idle {}", v.warm_fds, v.end_fds, idle.fds);
    problems.extend(v.problems);
    if !problems.is_empty() {
        bail!("soak failed:\n  {}", problems.join("\n  "));
    }
    println!("soak passed");
    Ok(())
}

/// `xtask soak-load`: run inside the guarded scope by the soak. HTTP
/// requests (a GET and a POST alternating, each on a fresh connection) and
/// tcp connections (one line each), each at `rate` per second, for
/// `seconds`; prints counts as JSON.
pub fn load(seconds: u64, rate: u32, tcp: SocketAddr, http: SocketAddr, host: &str) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let every = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut workers = Vec::new();
    for kind in 0..2 {
        let (stop, counts, host) = (stop.clone(), counts.clone(), host.to_string());
        workers.push(thread::spawn(move || {
            let mut next = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ok = if kind == 0 { http_once(http, &host, i) } else { tcp_once(tcp, i) };
                counts[kind * 2 + usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
                i += 1;
                next += every;
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        }));
    }
    thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let c = |i: usize| counts[i].load(Ordering::Relaxed);
    println!("{}", serde_json::json!({"http_ok": c(0), "http_errors": c(1), "tcp_ok": c(2), "tcp_errors": c(3)}));
    Ok(())
}

fn http_once(addr: SocketAddr, host: &str, i: u64) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = if i % 2 == 0 {
        format!("GET /items/{i}?q=soak HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    } else {
        let body = format!(r#"{{"n":{i},"note":"soak"}}"#);
        format!(
            "POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    resp.starts_with(b"HTTP/1.1 200") && resp.ends_with(b"}")
}

fn tcp_once(addr: SocketAddr, i: u64) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let line = format!("soak {i}\n");
    if s.write_all(line.as_bytes()).is_err() {
        return false;
    }
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    r.read_line(&mut reply).is_ok() && reply == format!("echo:{line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: &[u64]) -> Vec<Sample> {
        rss.iter().enumerate().map(|(i, &r)| Sample { secs: i as f64 * 5.0, rss_kib: r, fds: 20 }).collect()
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        assert_eq!(vm_rss_kib("Name:\tportcullis\nVmPeak:\t 9000 kB\nVmRSS:\t   41234 kB\n"), Some(41234));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn flat_memory_passes_and_growth_fails() {
        let flat = samples(&[30_000, 40_000, 41_000, 40_500, 41_200, 40_800, 41_000, 40_900, 41_100, 41_000]);
        let v = judge(&flat, 5.0);
        assert!(v.problems.is_empty(), "{v:?}");
        assert!(v.slope.abs() < 1000.0, "{v:?}");
        let growing: Vec<u64> = (0..40).map(|i| 40_000 + i * 2_000).collect();
        let v = judge(&samples(&growing), 5.0);
        assert!(!v.problems.is_empty(), "{v:?}");
        assert!(v.slope > 20_000.0, "{v:?}");
    }
}
