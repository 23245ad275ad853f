//! `cargo xtask fuzz [TARGET] [--secs N]`: the cargo-fuzz targets in
//! `fuzz/` (nightly, libFuzzer, AddressSanitizer), each for N seconds.
//!
//! Each run starts from the committed seed corpus (`fuzz/corpus/<target>/`,
//! read only) plus a scratch corpus under `fuzz/target/` that keeps what
//! earlier runs found. Memory is bounded: `-rss_limit_mb=2048` and a
//! `-malloc_limit_mb` well below what any one input should need, so an
//! allocation sized by a length field in the input is a failure.
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::root;

/// Seconds per target when `cargo xtask test` runs them.
pub const CI_SECS: u64 = 20;
/// The largest single allocation (MB) an input may cause.
const MALLOC_LIMIT_MB: u64 = 256;
const RSS_LIMIT_MB: u64 = 2048;
/// Longest input tried (bytes).
const MAX_LEN: u64 = 64 * 1024;

fn cargo_nightly() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly").env_remove("RUSTC").env_remove("RUSTC_WRAPPER").env_remove("CARGO");
    c
}

pub fn cargo_fuzz_works() -> bool {
    cargo_nightly().args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success())
}

pub fn install_cargo_fuzz() -> Result<()> {
    crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    if !cargo_fuzz_works() {
        bail!("cargo-fuzz was installed but `cargo +nightly fuzz` does not run");
    }
    Ok(())
}

/// The targets, from `cargo fuzz list`.
pub fn targets() -> Result<Vec<String>> {
    let out = cargo_nightly()
        .current_dir(root().join("fuzz"))
        .args(["fuzz", "list"])
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

pub fn run(target: Option<&str>, secs: u64) -> Result<()> {
    if !cargo_fuzz_works() {
        // Set-up installs it; a missing tool is an error, never a skip.
        bail!("cargo-fuzz is not installed (cargo xtask setup installs it)");
    }
    let all = targets()?;
    let chosen: Vec<String> = match target {
        Some(t) if all.iter().any(|a| a == t) => vec![t.to_string()],
        Some(t) => bail!("unknown fuzz target `{t}` (available: {})", all.join(", ")),
        None => all,
    };
    let dir = root().join("fuzz");
    crate::run(cargo_nightly().current_dir(&dir).args(["fuzz", "build"]))?;
    for t in &chosen {
        let seeds = dir.join("corpus").join(t);
        let scratch = dir.join("target/corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        std::fs::create_dir_all(&seeds)?;
        eprintln!("fuzzing {t} for {secs} s");
        let mut cmd = cargo_nightly();
        cmd.current_dir(&dir)
            .args(["fuzz", "run", t])
            .arg(rel(&scratch, &dir))
            .arg(rel(&seeds, &dir))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg("-timeout=10")
            .arg("-print_final_stats=1");
        crate::run(&mut cmd)
            .with_context(|| format!("fuzz target {t} failed; the input that failed is under fuzz/artifacts/{t}/"))?;
    }
    Ok(())
}

fn rel(p: &Path, base: &Path) -> std::path::PathBuf {
    p.strip_prefix(base).map(Path::to_path_buf).unwrap_or_else(|_| p.to_path_buf())
}
