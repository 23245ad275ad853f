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
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::support::{free_port, in_pg_scratch_dir, require_root, start_postgres, wait_for, PgUser, Portcullis, Proc};

const PASSWORD: &str = "bench-Pw-4c1e";
const SECONDS: u32 = 10;
const CLIENTS: [u32; 3] = [1, 8, 32];

pub fn run() -> Result<()> {
    require_root("the postgres benchmark")?;
    in_pg_scratch_dir("portcullis-bench-pg", bench)
}

fn bench(dir: &Path, pg_user: PgUser) -> Result<()> {
    let pg = start_postgres(dir, pg_user, 200, "bench", PASSWORD, 10)?;
    let pg_port = pg.port;

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
    pg_user.chown(&ini)?;
    let mut bouncer = Command::new("pgbouncer");
    bouncer.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null());
    pg_user.apply(&mut bouncer, dir);
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
    let pc = Portcullis {
        bin: crate::root().join("target/release/portcullis"),
        control: dir.join("control.sock"),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/portcullis-bench-{}", std::process::id())),
        state_dir: dir.join("state"),
    };
    let agent = pc.start(&policy)?;

    let paths = [
        Path_ { name: "direct", host: "127.0.0.1", port: pg_port, guarded: false },
        Path_ { name: "portcullis", host: "127.0.0.53", port: 5432, guarded: true },
        Path_ { name: "pgbouncer", host: "127.0.0.1", port: bouncer_port, guarded: false },
    ];
    let pgbench = |p: &Path_, args: &[&str]| -> Result<String> {
        let mut cmd = if p.guarded {
            let mut c = pc.exec("bench");
            c.arg("pgbench");
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
    let _ = pc.detach();
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
