//! `cargo xtask bench http`: requests/s and p99 latency through portcullis
//! against direct and against nginx `proxy_pass` (Debian's package, upstream
//! keepalive), plain HTTP and HTTPS, for 1 KiB and 1 MiB responses, all in
//! one run on this machine.
//!
//! The origin is an nginx serving two static files on 127.0.0.1 (plain and
//! TLS, HTTP/1.1). The load generator is wrk (16 connections, 2 threads):
//! - direct: wrk to the origin;
//! - nginx: wrk to an nginx reverse proxy (`proxy_pass` to an upstream block
//!   with `keepalive`, HTTP/1.1, TLS re-encrypted and verified toward the
//!   origin in TLS mode);
//! - portcullis: wrk inside a guarded scope dialling `localhost:PORT`, which
//!   the probes steer to the enforcer: TLS terminated with a certificate of
//!   the local CA, the request decided by the policy and audited, forwarded
//!   over a pooled (verified TLS) connection to the origin.
//!
//! Every figure is the median of several repetitions (the order of the
//! three paths rotates); ratios are to direct. `BENCH_SECS` (default 5) and
//! `BENCH_REPS` (default 3) change the length; `BENCH_CASES` (such as
//! `http-1KiB,https-1KiB`) measures only the cases named. Everything started is stopped
//! and the probes and cgroups removed on every way out.
use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::support::{cgroup2_mount, free_port, require_root, wait_port, Portcullis};
use crate::root;

const CONNS: &str = "16";
const THREADS: &str = "2";
const SIZES: [(&str, usize); 2] = [("1KiB", 1024), ("1MiB", 1 << 20)];
const HOST: &str = "bench.example.test";

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Via {
    Direct,
    Portcullis,
    Nginx,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Portcullis => "portcullis",
            Via::Nginx => "nginx",
        }
    }
}

const VIAS: [Via; 3] = [Via::Direct, Via::Portcullis, Via::Nginx];

/// TLS or not, response size, path.
type Case = (bool, &'static str, Via);

pub fn run() -> Result<()> {
    require_root("the http benchmark")?;
    for tool in ["wrk", "nginx", "openssl"] {
        ensure!(have(tool), "`{tool}` is missing (cargo xtask setup --bench installs it)");
    }
    let secs = std::env::var("BENCH_SECS").ok().and_then(|v| v.parse::<u32>().ok()).filter(|&n| n > 0).unwrap_or(5);
    let reps = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0).unwrap_or(3);
    let mut bench = Bench::new()?;
    let result = bench.run(secs, reps);
    drop(bench);
    result
}

fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd} >/dev/null 2>&1")).status().is_ok_and(|s| s.success())
}

struct Ports {
    origin: u16,
    origin_tls: u16,
    nginx: u16,
    nginx_tls: u16,
    /// What wrk dials through portcullis (no listener: the probes steer it).
    pc: u16,
    pc_tls: u16,
    agent: u16,
}

struct Bench {
    work: PathBuf,
    pc: Portcullis,
    cgroup_base: String,
    children: Vec<(&'static str, Child)>,
}

impl Bench {
    fn new() -> Result<Bench> {
        let target = root().join("target");
        let tag = format!("portcullis-bench-http-{}", std::process::id());
        let work = target.join(&tag);
        fs::create_dir_all(&work)?;
        let portcullis = target.join("release/portcullis");
        ensure!(portcullis.exists(), "{} is missing", portcullis.display());
        Ok(Bench {
            pc: Portcullis {
                bin: portcullis,
                control: work.join("control.sock"),
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/{tag}")),
                state_dir: work.join("state"),
            },
            cgroup_base: tag,
            work,
            children: Vec::new(),
        })
    }

    fn run(&mut self, secs: u32, reps: usize) -> Result<()> {
        // Checked before anything is started.
        let selected = selected_cases(&std::env::var("BENCH_CASES").unwrap_or_default())?;
        let ports = Ports {
            origin: free_port()?,
            origin_tls: free_port()?,
            nginx: free_port()?,
            nginx_tls: free_port()?,
            pc: free_port()?,
            pc_tls: free_port()?,
            agent: free_port()?,
        };
        self.make_certs()?;
        self.make_files()?;
        self.start_nginx("origin", &self.origin_conf(&ports))?;
        self.start_nginx("proxy", &self.proxy_conf(&ports))?;
        self.start_agent(&ports)?;
        for (port, tls) in
            [(ports.origin, false), (ports.origin_tls, true), (ports.nginx, false), (ports.nginx_tls, true)]
        {
            wait_port(SocketAddr::from(([127, 0, 0, 1], port)), "nginx")
                .with_context(|| format!("port {port} (tls: {tls}) did not open"))?;
        }

        let mut results: HashMap<Case, Vec<(f64, f64)>> = HashMap::new();
        for rep in 0..reps {
            for &(tls, size) in &selected {
                for i in 0..VIAS.len() {
                    let via = VIAS[(rep + i) % VIAS.len()];
                    eprintln!(
                        "http bench: rep {}/{reps} {} {size} {}",
                        rep + 1,
                        if tls { "https" } else { "http" },
                        via.name()
                    );
                    let r = self.wrk(via, tls, size, &ports, secs)?;
                    results.entry((tls, size, via)).or_default().push(r);
                }
            }
        }

        println!();
        println!(
            "http bench: wrk -t{THREADS} -c{CONNS}, {secs}s per run, median of {reps}; requests/s (ratio to direct) and p99"
        );
        println!(
            "{:<6} {:<5} | {:>9} {:>9} | {:>9} {:>6} {:>9} | {:>9} {:>6} {:>9}",
            "mode", "size", "direct", "p99", "portcullis", "ratio", "p99", "nginx", "ratio", "p99"
        );
        for &(tls, size) in &selected {
            let get = |via| median_pair(&results[&(tls, size, via)]);
            let (d, dp) = get(Via::Direct);
            let (p, pp) = get(Via::Portcullis);
            let (n, np) = get(Via::Nginx);
            println!(
                "{:<6} {:<5} | {:>9.0} {:>7.2}ms | {:>10.0} {:>5.2}x {:>7.2}ms | {:>9.0} {:>5.2}x {:>7.2}ms",
                if tls { "https" } else { "http" },
                size,
                d,
                dp,
                p,
                p / d,
                pp,
                n,
                n / d,
                np
            );
        }
        Ok(())
    }

    fn make_certs(&self) -> Result<()> {
        let w = &self.work;
        let ssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl").args(args).current_dir(w).output()?;
            ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        ssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=portcullis bench CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])?;
        ssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={HOST}"),
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
        ])?;
        fs::write(w.join("leaf.ext"), format!("subjectAltName=DNS:{HOST},DNS:localhost,IP:127.0.0.1\n"))?;
        ssl(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "leaf.pem",
        ])?;
        Ok(())
    }

    fn make_files(&self) -> Result<()> {
        let www = self.work.join("www");
        fs::create_dir_all(&www)?;
        for (name, n) in SIZES {
            let body: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            fs::write(www.join(name), body)?;
        }
        Ok(())
    }

    fn nginx_head(&self, name: &str) -> String {
        let w = self.work.display();
        format!(
            "user root;\nworker_processes auto;\ndaemon off;\npid {w}/{name}.pid;\nerror_log {w}/{name}-error.log warn;\n\
             events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  \
             client_body_temp_path {w}/{name}-body;\n  proxy_temp_path {w}/{name}-proxy;\n  fastcgi_temp_path {w}/{name}-fcgi;\n  \
             uwsgi_temp_path {w}/{name}-uwsgi;\n  scgi_temp_path {w}/{name}-scgi;\n  sendfile on;\n  tcp_nopush on;\n  \
             ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_certificate {w}/leaf.pem;\n  ssl_certificate_key {w}/leaf.key;\n"
        )
    }

    fn origin_conf(&self, p: &Ports) -> String {
        let w = self.work.display();
        format!(
            "{}  server {{ listen 127.0.0.1:{}; root {w}/www; }}\n  server {{ listen 127.0.0.1:{} ssl; root {w}/www; }}\n}}\n",
            self.nginx_head("origin"),
            p.origin,
            p.origin_tls
        )
    }

    fn proxy_conf(&self, p: &Ports) -> String {
        let w = self.work.display();
        format!(
            "{head}  upstream origin {{ server 127.0.0.1:{o}; keepalive 64; }}\n  \
             upstream origin_tls {{ server 127.0.0.1:{ot}; keepalive 64; }}\n  \
             server {{ listen 127.0.0.1:{n};\n    location / {{ proxy_pass http://origin; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_set_header Host {HOST}; }} }}\n  \
             server {{ listen 127.0.0.1:{nt} ssl;\n    location / {{ proxy_pass https://origin_tls; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_set_header Host {HOST}; proxy_ssl_verify on; \
             proxy_ssl_trusted_certificate {w}/ca.pem; proxy_ssl_name {HOST}; proxy_ssl_server_name on; \
             proxy_ssl_session_reuse on; }} }}\n}}\n",
            head = self.nginx_head("proxy"),
            o = p.origin,
            ot = p.origin_tls,
            n = p.nginx,
            nt = p.nginx_tls,
        )
    }

    fn start_nginx(&mut self, name: &'static str, conf: &str) -> Result<()> {
        let path = self.work.join(format!("{name}.conf"));
        fs::write(&path, conf)?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&self.work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        self.children.push((name, child));
        Ok(())
    }

    fn policy(&self, p: &Ports) -> String {
        let w = self.work.display();
        format!(
            r#"version = 1

[[scopes]]
name = "bench"
cgroup = "{cg}/bench"

[[targets]]
name = "bench-http"
protocol = "http"
match = ["127.0.0.1:{pc}", "[::1]:{pc}"]
hosts = ["localhost"]
upstream = "127.0.0.1:{o}"

[[targets]]
name = "bench-https"
protocol = "http"
match = ["127.0.0.1:{pct}", "[::1]:{pct}"]
hosts = ["localhost"]
upstream = "127.0.0.1:{ot}"
[targets.tls]
client = true
upstream = true
ca = "{w}/ca.pem"
server_name = "{HOST}"

[[roles]]
name = "bench"
[[roles.rules]]
target = "bench-http"
allow = ["read"]
[[roles.rules]]
target = "bench-https"
allow = ["read"]

[[bindings]]
scope = "bench"
role = "bench"
"#,
            cg = self.cgroup_base,
            pc = p.pc,
            pct = p.pc_tls,
            o = p.origin,
            ot = p.origin_tls,
        )
    }

    fn start_agent(&mut self, p: &Ports) -> Result<()> {
        let policy = self.work.join("policy.toml");
        fs::write(&policy, self.policy(p))?;
        let log = self.work.join("portcullis.log");
        let child = self
            .pc
            .run(&policy, p.agent)
            .env("PORTCULLIS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting portcullis")?;
        self.children.push(("portcullis", child));
        let agent = &mut self.children.last_mut().expect("just pushed").1;
        self.pc.wait_ready(agent, Some(&log))
    }

    /// One wrk run; returns (requests/s, p99 in ms).
    fn wrk(&self, via: Via, tls: bool, size: &str, p: &Ports, secs: u32) -> Result<(f64, f64)> {
        let scheme = if tls { "https" } else { "http" };
        let url = match via {
            Via::Direct => format!("{scheme}://127.0.0.1:{}/{size}", if tls { p.origin_tls } else { p.origin }),
            Via::Nginx => format!("{scheme}://127.0.0.1:{}/{size}", if tls { p.nginx_tls } else { p.nginx }),
            Via::Portcullis => format!("{scheme}://localhost:{}/{size}", if tls { p.pc_tls } else { p.pc }),
        };
        let wrk_args = ["-t", THREADS, "-c", CONNS, "-d", &format!("{secs}s"), "--latency", &url];
        let mut cmd = match via {
            Via::Portcullis => {
                let mut c = self.pc.exec("bench");
                c.arg("wrk").args(wrk_args);
                c
            }
            _ => {
                let mut c = Command::new("wrk");
                c.args(wrk_args);
                c
            }
        };
        let out = cmd.output().context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "wrk {url} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        parse_wrk(&text).with_context(|| format!("wrk {url} output:\n{text}"))
    }
}

/// The (TLS, size) cases `BENCH_CASES` names (`http-1KiB,https-1MiB`, any
/// case), all of them when it is empty; an unknown name is an error rather
/// than a run that measures nothing.
fn selected_cases(spec: &str) -> Result<Vec<(bool, &'static str)>> {
    let all: Vec<(bool, &'static str)> =
        [false, true].into_iter().flat_map(|tls| SIZES.map(|(size, _)| (tls, size))).collect();
    let name = |&(tls, size): &(bool, &str)| format!("{}-{size}", if tls { "https" } else { "http" });
    let wanted: Vec<&str> = spec.split(',').map(str::trim).filter(|c| !c.is_empty()).collect();
    if wanted.is_empty() {
        return Ok(all);
    }
    for w in &wanted {
        ensure!(
            all.iter().any(|c| name(c).eq_ignore_ascii_case(w)),
            "BENCH_CASES: unknown case `{w}` (known: {})",
            all.iter().map(name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(all.into_iter().filter(|c| wanted.iter().any(|w| name(c).eq_ignore_ascii_case(w))).collect())
}

/// Requests/s and the p99 latency (ms) from wrk's `--latency` report. A
/// run with non-2xx answers or socket errors is refused: it would not be
/// measuring the same work.
fn parse_wrk(text: &str) -> Result<(f64, f64)> {
    if let Some(l) = text.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        bail!("{}", l.trim());
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("no Requests/sec")?;
    let p99 = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("99%"))
        .map(str::trim)
        .and_then(duration_ms)
        .context("no 99% latency")?;
    Ok((rps, p99))
}

fn duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn median_pair(v: &[(f64, f64)]) -> (f64, f64) {
    let med = |mut xs: Vec<f64>| {
        xs.sort_by(|a, b| a.total_cmp(b));
        xs[xs.len() / 2]
    };
    (med(v.iter().map(|x| x.0).collect()), med(v.iter().map(|x| x.1).collect()))
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            // nginx: SIGQUIT lets the master stop its workers.
            let sig = if name.starts_with("portcullis") { libc::SIGTERM } else { libc::SIGQUIT };
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.pc.detach();
        if let Ok(m) = cgroup2_mount() {
            remove_tree(&m.join(&self.cgroup_base));
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

#[cfg(test)]
mod tests {
    use super::selected_cases;

    #[test]
    fn cases_are_selected_by_name_and_unknown_names_refused() {
        assert_eq!(selected_cases("").unwrap().len(), 4);
        assert_eq!(selected_cases(" HTTPS-1kib , http-1MiB").unwrap(), vec![(false, "1MiB"), (true, "1KiB")]);
        let e = selected_cases("http-1kb").unwrap_err().to_string();
        assert!(e.contains("unknown case `http-1kb`") && e.contains("https-1MiB"), "{e}");
    }
}
