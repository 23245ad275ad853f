//! `cargo xtask bench audit`: how many audit records per second this disk
//! takes, with an fsync per record, with group commit (many concurrent
//! writers sharing each fsync), and without fsync. Every record is a
//! realistic one (an SQL statement and its decision, ~400 bytes) written
//! through the agent's own `Audit` handle, each writer waiting for its
//! record to be acknowledged before the next.
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{cargo, root};

struct Case {
    label: &'static str,
    fsync: &'static str,
    writers: u64,
    records: u64,
}

pub fn run() -> Result<()> {
    cargo(&["build", "--release", "-p", "portcullis-tests", "--bin", "audit-writer"])?;
    let bin = root().join("target/release/audit-writer");
    // On the disk that holds the project (not a tmpfs).
    let base = root().join("target/bench-audit");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let scale: u64 = std::env::var("PORTCULLIS_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let cases = [
        Case { label: "fsync per record", fsync: "always", writers: 16, records: 2_000 * scale },
        Case { label: "group commit", fsync: "group", writers: 16, records: 32_000 * scale },
        Case { label: "group commit, 1 writer", fsync: "group", writers: 1, records: 2_000 * scale },
        Case { label: "no fsync", fsync: "never", writers: 16, records: 320_000 * scale },
    ];
    println!("audit log on {} ({})", base.display(), filesystem(&base));
    println!(
        "{:<24} {:>8} {:>9} {:>8} {:>12} {:>8} {:>10}",
        "mode", "writers", "records", "seconds", "records/s", "fsyncs", "vs per-rec"
    );
    let mut baseline = None;
    for (i, c) in cases.iter().enumerate() {
        let dir = base.join(format!("run{i}"));
        let out = Command::new(&bin)
            .args(["bench", dir.to_str().context("path")?, &c.writers.to_string(), &c.records.to_string(), c.fsync])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!("audit-writer failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("audit-writer output")?;
        let rate = v["per_sec"].as_f64().unwrap_or(0.0);
        let base_rate = *baseline.get_or_insert(rate);
        println!(
            "{:<24} {:>8} {:>9} {:>8.2} {:>12.0} {:>8} {:>9.1}x",
            c.label,
            c.writers,
            v["records"].as_u64().unwrap_or(0),
            v["secs"].as_f64().unwrap_or(0.0),
            rate,
            v["fsyncs"].as_u64().unwrap_or(0),
            rate / base_rate
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

/// `df`'s view of where `p` lives: device and file system type.
fn filesystem(p: &Path) -> String {
    Command::new("df")
        .args(["--output=source,fstype"])
        .arg(p)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).map(|l| l.split_whitespace().collect::<Vec<_>>().join(", ")))
        .unwrap_or_else(|| "unknown file system".into())
}
