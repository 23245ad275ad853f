//! Project tasks: `cargo xtask setup | build-ebpf | build | run | test | bench | package`.
//!
//! Set-up is idempotent and installs only what is missing, so every other
//! task runs it first and works on a fresh machine.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod package;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (rust-src, bpf-linker, apt packages).
    Setup {
        /// Also install the tools benchmarks compare against.
        #[arg(long)]
        bench: bool,
    },
    /// Build the eBPF programs (nightly, bpfel-unknown-none).
    BuildEbpf,
    /// Build the eBPF programs and the agent (release).
    Build,
    /// Set up, build, and start the agent (default policy: observe mode).
    Run {
        /// Arguments for `portcullis run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, check formatting and lints, and run every test,
    /// the privileged end-to-end ones included.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (target/debian/portcullis_<version>_<arch>.deb).
    Package {
        /// Package this portcullis binary instead of building a release one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Where to put the .deb.
        #[arg(long, default_value = "target/debian")]
        out: PathBuf,
    },
    /// Benchmarks: direct vs through portcullis (and a reference tool).
    Bench {
        /// Which: tcp, postgres, http, audit, masking, or all; or soak
        /// (not part of all).
        #[arg(default_value = "all")]
        which: String,
        /// How long the soak runs.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run the cargo-fuzz targets (all, or one) for a while each.
    Fuzz {
        /// A target (see fuzz/Cargo.toml); all when absent.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// The soak's HTTP and tcp load (run by `bench soak` inside the scope).
    #[command(hide = true)]
    SoakLoad {
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        rate: u32,
        #[arg(long)]
        tcp: std::net::SocketAddr,
        #[arg(long)]
        http: std::net::SocketAddr,
        #[arg(long)]
        host: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let invoked_in = env::current_dir()?;
    env::set_current_dir(root())?;
    match cli.task {
        Task::Setup { bench } => setup(bench),
        Task::BuildEbpf => {
            setup(false)?;
            build_ebpf()
        }
        Task::Build => {
            setup(false)?;
            build_ebpf()?;
            cargo(&["build", "--release", "-p", "portcullis"])
        }
        Task::Run { args } => {
            setup(false)?;
            build_ebpf()?;
            cargo(&["build", "--release", "-p", "portcullis"])?;
            let mut cmd = Command::new(root().join("target/release/portcullis"));
            cmd.arg("run").args(&args);
            let status = cmd.status().context("starting portcullis")?;
            exit_with(status)
        }
        Task::Test { args } => test(&args),
        Task::Package { binary, out } => {
            let cwd = invoked_in;
            let opts = package::Options { binary: binary.map(|b| cwd.join(b)), out: cwd.join(out) };
            package::package(&opts).map(|_| ())
        }
        Task::Bench { which, minutes } => {
            // The masking benchmark runs the engine alone: no probes, no
            // reference tools.
            // The soak of a given build (PORTCULLIS_BIN) needs no release build.
            let given = which == "soak" && env::var_os("PORTCULLIS_BIN").is_some();
            if which != "masking" && !given {
                setup(true)?;
                build_ebpf()?;
                cargo(&["build", "--release", "-p", "portcullis"])?;
            }
            if which == "soak" {
                return bench::soak::run(minutes);
            }
            bench::run(&which)
        }
        Task::Fuzz { target, secs } => {
            setup(false)?;
            fuzz::run(target.as_deref(), secs)
        }
        Task::SoakLoad { seconds, rate, tcp, http, host } => bench::soak::load(seconds, rate, tcp, http, &host),
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn exit_with(status: ExitStatus) -> Result<()> {
    std::process::exit(status.code().unwrap_or(1))
}

pub fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd} >/dev/null 2>&1")).status().is_ok_and(|s| s.success())
}

/// Where bpf-linker finds the nightly toolchain's own LLVM: it must outlive
/// the binary (its RUNPATH points here), so not under /tmp.
fn llvm_prefix() -> PathBuf {
    let home = env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
    home.join(".local/lib/portcullis-llvm")
}

pub fn setup(bench: bool) -> Result<()> {
    // rust-src for nightly (the eBPF crate builds core itself).
    let comps = Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]).output()?;
    if !String::from_utf8_lossy(&comps.stdout).lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !bpf_linker_works() {
        install_bpf_linker()?;
    }
    if !fuzz::cargo_fuzz_works() {
        fuzz::install_cargo_fuzz()?;
    }
    let mut pkgs = vec![
        ("psql", "postgresql-client-15"),
        ("pg_ctl", "postgresql-15"),
        ("git", "git"),
        ("curl", "curl"),
        ("bpftool", "bpftool"),
        // Packaging and its tests: units are checked with systemd-analyze.
        ("systemd-analyze", "systemd"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
        ("openssl", "openssl"),
    ];
    if bench {
        pkgs.extend([
            ("haproxy", "haproxy"),
            ("pgbouncer", "pgbouncer"),
            ("nginx", "nginx"),
            ("wrk", "wrk"),
            ("openssl", "openssl"),
        ]);
    }
    let missing: Vec<&str> = pkgs
        .iter()
        .filter(|(cmd, pkg)| {
            !have(cmd) && !Path::new(&format!("/usr/lib/postgresql/15/bin/{cmd}")).exists() && !dpkg_has(pkg)
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing packages {missing:?}; run `cargo xtask setup` as root");
        }
        run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if bench {
        // Debian starts these services on install; the benchmarks run their
        // own instances on loopback ports instead.
        for svc in ["haproxy", "nginx", "pgbouncer"] {
            let _ = Command::new("sh").arg("-c").arg(format!("service {svc} stop >/dev/null 2>&1")).status();
        }
    }
    Ok(())
}

fn dpkg_has(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// bpf-linker must link the same LLVM as the nightly rustc that feeds it;
/// `cargo install bpf-linker` alone looks for a system LLVM Debian lacks, so
/// point it at the libLLVM that the nightly toolchain ships.
fn install_bpf_linker() -> Result<()> {
    let sysroot = String::from_utf8(Command::new("rustc").args(["+nightly", "--print", "sysroot"]).output()?.stdout)?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let so = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let vv = String::from_utf8(Command::new("rustc").args(["+nightly", "-vV"]).output()?.stdout)?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc reports no LLVM version")?
        .to_string();
    let prefix = llvm_prefix();
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so", so.as_str()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&so), &link)?;
    }
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run");
    }
    Ok(())
}

pub fn build_ebpf() -> Result<()> {
    let dir = root().join("ebpf");
    run(Command::new("cargo")
        .current_dir(&dir)
        .args(["+nightly", "build", "--release", "-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        // BTF in the object: socket storage maps are BTF-defined.
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO"))
}

pub fn ebpf_object() -> PathBuf {
    root().join("ebpf/target/bpfel-unknown-none/release/portcullis-ebpf")
}

fn test(extra: &[String]) -> Result<()> {
    setup(false)?;
    build_ebpf()?;
    if in_ci() && !is_root() {
        bail!("CI is set but this is not root: the end-to-end tests need root (cgroups, eBPF) and must not be skipped");
    }
    cargo(&["fmt", "--all", "--check"])?;
    run(Command::new("cargo").current_dir(root().join("ebpf")).args(["+nightly", "fmt", "--all", "--check"]))?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    // The end-to-end tests run the agent and, for the package test, the
    // xtask binary itself.
    cargo(&["build", "-p", "portcullis", "-p", "xtask"])?;
    let mut args: Vec<&str> = vec!["test", "--workspace"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(&args).env("PORTCULLIS_BIN", root().join("target/debug/portcullis"));
    run(&mut cmd)?;
    // Each fuzz target briefly (a full run of the suite only).
    if extra.is_empty() {
        fuzz::run(None, fuzz::CI_SECS)?;
    }
    Ok(())
}
