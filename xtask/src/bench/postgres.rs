//! `cargo xtask bench postgres`: pgbench select-only and simple-update at 1,
//! 8 and 32 clients, direct vs through portcullis (pgbench inside a guarded
//! scope, every statement parsed, decided and recorded) vs through pgbouncer
//! (session pooling), in one run; then the latency portcullis adds per query
//! (p50, p99) from pgbench's per-transaction log at one client.
//!
//! Everything runs on loopback: a PostgreSQL 15 server made with initdb in a
//! temporary directory (default durability: fsync and synchronous commit on),
//! pgbouncer and portcullis on their own ports. portcullis' audit log is on
//! the same disk as the database.
use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PASSWORD: &str = "bench-Pw-4c1e";
const SECONDS: u32 = 10;
const CLIENTS: [u32; 3] = [1, 8, 32];

struct Ids {
    uid: u32,
    gid: u32,
}

fn postgres_ids() -> Result<Ids> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!("no `postgres` user (is postgresql-15 installed?)");
        }
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok(Ids { uid: id("-u")?, gid: id("-g")? })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed (SIGINT, then waited for) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not come up");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn chown(path: &Path, ids: &Ids) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), ids.uid, ids.gid) } != 0 {
        bail!("chown {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the postgres benchmark needs root (cgroups, eBPF)");
    }
    let ids = postgres_ids()?;
    let dir = std::env::temp_dir().join(format!("portcullis-bench-pg-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    chown(&dir, &ids)?;
    let result = bench(&dir, &ids);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn as_postgres(cmd: &mut Command, ids: &Ids, dir: &Path) {
    cmd.uid(ids.uid).gid(ids.gid).env("HOME", dir).env("LC_ALL", "C.UTF-8");
}

fn bench(dir: &Path, ids: &Ids) -> Result<()> {
    // PostgreSQL.
    let data = dir.join("data");
    let mut initdb = Command::new(format!("{PG_BIN}/initdb"));
    initdb.arg("-D").arg(&data).args(["-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust"]);
    as_postgres(&mut initdb, ids, dir);
    crate::run(initdb.stdout(Stdio::null()))?;
    fs::write(data.join("pg_hba.conf"), "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")?;
    let pg_port = free_port()?;
    let mut pg = Command::new(format!("{PG_BIN}/postgres"));
    pg.arg("-D")
        .arg(&data)
        .args(["-p", &pg_port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    as_postgres(&mut pg, ids, dir);
    let _pg = Proc(pg.spawn().context("starting postgres")?);
    wait_for("postgres", || {
        Command::new(format!("{PG_BIN}/pg_isready"))
            .arg("-h")
            .arg(dir)
            .args(["-p", &pg_port.to_string(), "-q"])
            .status()
            .is_ok_and(|s| s.success())
    })?;
    let psql = |sql: &str| -> Result<()> {
        crate::run(
            Command::new("psql")
                .arg("-h")
                .arg(dir)
                .args(["-p", &pg_port.to_string(), "-U", "postgres", "-d", "postgres", "-X", "-q", "-c", sql])
                .stdout(Stdio::null()),
        )
    };
    psql(&format!("CREATE ROLE bench LOGIN PASSWORD '{PASSWORD}'"))?;
    psql("CREATE DATABASE bench OWNER bench")?;
    crate::run(
        Command::new("pgbench")
            .arg("-h")
            .arg(dir)
            .args(["-p", &pg_port.to_string(), "-U", "bench", "-i", "-s", "10", "-q", "bench"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;

    // pgbouncer: session pooling; clients are trusted as they are by
    // portcullis, the server is reached with the password.
    let bouncer_port = free_port()?;
    let ini = dir.join("pgbouncer.ini");
    fs::write(
        &ini,
        format!(
            "[databases]\nbench = host=127.0.0.1 port={pg_port} dbname=bench user=bench password={PASSWORD}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {bouncer_port}\nunix_socket_dir =\n\
             auth_type = any\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 40\n\
             logfile = {log}\npidfile = {pid}\n",
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        ),
    )?;
    chown(&ini, ids)?;
    let mut bouncer = Command::new("pgbouncer");
    bouncer.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null());
    as_postgres(&mut bouncer, ids, dir);
    let _bouncer = Proc(bouncer.spawn().context("starting pgbouncer")?);
    wait_for("pgbouncer", || std::net::TcpStream::connect(("127.0.0.1", bouncer_port)).is_ok())?;

    // portcullis.
    let pw = dir.join("bench.pw");
    fs::write(&pw, PASSWORD)?;
    let cg = format!("portcullis-bench/{}", std::process::id());
    let policy = dir.join("policy.toml");
    fs::write(
        &policy,
        format!(
            "version = 1\n\n[[scopes]]\nname = \"bench\"\ncgroup = \"{cg}\"\n\n\
             [[targets]]\nname = \"bench-db\"\nprotocol = \"postgres\"\nmatch = [\"127.0.0.53:5432\"]\n\
             upstream = \"127.0.0.1:{pg_port}\"\n[targets.credentials]\nuser = \"bench\"\npassword = {{ file = \"{pw}\" }}\n\n\
             [[roles]]\nname = \"app\"\n[[roles.rules]]\ntarget = \"bench-db\"\n\
             allow = [\"read\", \"write\", \"session\", \"transaction\"]\n\n\
             [[bindings]]\nscope = \"bench\"\nrole = \"app\"\n",
            pw = pw.display()
        ),
    )?;
    let bin = crate::root().join("target/release/portcullis");
    let control = dir.join("control.sock");
    let pin = PathBuf::from(format!("/sys/fs/bpf/portcullis-bench-{}", std::process::id()));
    let listen = free_port()?;
    let agent = Proc(
        Command::new(&bin)
            .arg("--control-socket")
            .arg(&control)
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .args(["--listen-port", &listen.to_string()])
            .arg("--pin-dir")
            .arg(&pin)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("PORTCULLIS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting portcullis")?,
    );
    wait_for("portcullis", || {
        Command::new(&bin)
            .arg("--control-socket")
            .arg(&control)
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
    })?;

    let paths = [
        Path_ { name: "direct", host: "127.0.0.1", port: pg_port, guarded: false },
        Path_ { name: "portcullis", host: "127.0.0.53", port: 5432, guarded: true },
        Path_ { name: "pgbouncer", host: "127.0.0.1", port: bouncer_port, guarded: false },
    ];
    let pgbench = |p: &Path_, args: &[&str]| -> Result<String> {
        let mut cmd = if p.guarded {
            let mut c = Command::new(&bin);
            c.arg("--control-socket").arg(&control).args(["exec", "--scope", "bench", "--", "pgbench"]);
            c
        } else {
            Command::new("pgbench")
        };
        cmd.args(["-h", p.host, "-p", &p.port.to_string(), "-U", "bench", "-n"])
            .args(args)
            .arg("bench")
            .env("PGPASSWORD", if p.guarded { "anything" } else { PASSWORD });
        let out = cmd.output().context("running pgbench")?;
        if !out.status.success() {
            bail!("pgbench via {} failed: {}", p.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };

    println!("\npgbench, {SECONDS} s per run, scale 10, simple query protocol; tps (ratio to direct)");
    println!("{:<15} {:>7} {:>12} {:>22} {:>22}", "workload", "clients", "direct", "portcullis", "pgbouncer");
    for (label, flag) in [("select-only", "-S"), ("simple-update", "-N")] {
        for c in CLIENTS {
            let threads = c.min(2).to_string();
            let (cs, secs) = (c.to_string(), SECONDS.to_string());
            let mut tps = Vec::new();
            for p in &paths {
                let out = pgbench(p, &[flag, "-c", &cs, "-j", &threads, "-T", &secs])?;
                tps.push(parse_tps(&out).with_context(|| format!("no tps in pgbench output: {out}"))?);
            }
            println!(
                "{label:<15} {c:>7} {:>12.0} {:>13.0} ({:>4.2}x) {:>13.0} ({:>4.2}x)",
                tps[0],
                tps[1],
                tps[1] / tps[0],
                tps[2],
                tps[2] / tps[0]
            );
        }
    }

    println!("\nlatency per query, select-only, 1 client, {SECONDS} s (pgbench per-transaction log)");
    let mut lat = Vec::new();
    for p in &paths[..2] {
        let prefix = dir.join(format!("lat-{}", p.name));
        let _ = pgbench(
            p,
            &["-S", "-c", "1", "-j", "1", "-T", &SECONDS.to_string(), "-l", "--log-prefix", prefix.to_str().unwrap()],
        )?;
        let mut us = read_latencies(dir, &format!("lat-{}", p.name))?;
        us.sort_unstable();
        let (p50, p99) = (percentile(&us, 50.0), percentile(&us, 99.0));
        println!("{:<11} p50 {:>6} us   p99 {:>6} us   ({} queries)", p.name, p50, p99, us.len());
        lat.push((p50, p99));
    }
    println!(
        "added by portcullis: p50 {} us, p99 {} us",
        lat[1].0 as i64 - lat[0].0 as i64,
        lat[1].1 as i64 - lat[0].1 as i64
    );
    drop(agent);
    let _ = Command::new(&bin).arg("detach").arg("--pin-dir").arg(&pin).output();
    let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(&cg));
    Ok(())
}

struct Path_ {
    name: &'static str,
    host: &'static str,
    port: u16,
    guarded: bool,
}

fn parse_tps(out: &str) -> Option<f64> {
    out.lines().find(|l| l.starts_with("tps = "))?.split_whitespace().nth(2)?.parse().ok()
}

/// Latencies (µs) from pgbench log files `<prefix>.<pid>[.<thread>]`.
fn read_latencies(dir: &Path, prefix: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)?.flatten() {
        if !e.file_name().to_string_lossy().starts_with(&format!("{prefix}.")) {
            continue;
        }
        for line in fs::read_to_string(e.path())?.lines() {
            // client_id transaction_no time_us script_no epoch epoch_us
            if let Some(t) = line.split_whitespace().nth(2).and_then(|t| t.parse().ok()) {
                out.push(t);
            }
        }
    }
    if out.is_empty() {
        bail!("no pgbench log for {prefix}");
    }
    Ok(out)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tps_and_percentiles() {
        let out = "latency average = 0.1 ms\ntps = 9876.543210 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(9876.54321));
        assert_eq!(parse_tps("nothing"), None);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 51);
        assert_eq!(percentile(&v, 99.0), 99);
    }
}
