//! `portcullis doctor`: can this host run portcullis, and is it set up
//! safely? Each check prints what it found and, when it fails, the fix. A
//! failed *required* check makes the exit code 1; warnings do not.
use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use aya::{maps::MapType, programs::ProgramType};
use clap::Args;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use serde::Serialize;
use serde_json::Value;

use crate::{
    config::{self, embedded_object},
    control::{self, Request},
    intercept::{cgroup, probes},
    policy::{self, ScopeLocation},
};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// State directory portcullis writes (audit log, local CA).
    #[arg(long, env = "PORTCULLIS_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// bpffs directory for the pinned probes.
    #[arg(long, env = "PORTCULLIS_PIN_DIR", default_value = config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Policy whose scopes to inspect when portcullis is not running
    /// (default: /etc/portcullis/policy.toml when it exists).
    #[arg(long, env = "PORTCULLIS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Check this eBPF object instead of the embedded one.
    #[arg(long, env = "PORTCULLIS_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

pub const DEFAULT_POLICY: &str = "/etc/portcullis/policy.toml";
pub const MIN_KERNEL: (u32, u32) = (5, 15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier (`kernel`, `btf`, `cgroup2`, `bpffs`, ...).
    pub name: &'static str,
    pub status: Status,
    /// A failure of a required check makes portcullis unusable or unsafe.
    pub required: bool,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, required: bool, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Ok, required, detail: detail.into(), fix: None }
    }
    /// A failed check: `Fail` when required, else `Warn`.
    fn bad(name: &'static str, required: bool, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        let status = if required { Status::Fail } else { Status::Warn };
        Check { name, status, required, detail: detail.into(), fix: Some(fix.into()) }
    }
}

pub async fn run(control_socket: &Path, args: DoctorArgs) -> anyhow::Result<i32> {
    // What the running agent guards, if it runs.
    let status = control::call(control_socket, &Request::Status).await.ok();
    let socket = control_socket.to_path_buf();
    let json = args.json;
    let checks = tokio::task::spawn_blocking(move || all_checks(&args, &socket, status.as_ref())).await?;
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if json {
        let out = serde_json::json!({ "ok": !failed, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("{tag}  {:<18} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("      {:<18} fix: {fix}", "");
            }
        }
        let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
        let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
        if failed {
            println!("{fails} required check(s) failed, {warns} warning(s)");
        } else {
            println!("all required checks passed, {warns} warning(s)");
        }
    }
    Ok(if failed { 1 } else { 0 })
}

pub fn all_checks(args: &DoctorArgs, control_socket: &Path, status: Option<&Value>) -> Vec<Check> {
    vec![
        kernel(),
        btf(),
        cgroup2(),
        bpffs(&args.pin_dir),
        capabilities(),
        program_types(),
        map_types(),
        agent_programs(args.bpf_object.as_deref()),
        clock(),
        state_dir(&args.state_dir),
        local_ca(&args.state_dir),
        agent(control_socket, status),
        guarded_processes(args.policy.as_deref(), status),
    ]
}

fn kernel() -> Check {
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let fix = "use a kernel >= 5.15 with BTF and cgroup BPF (Debian 12, Ubuntu 22.04 or later)";
    match parse_kernel(&release) {
        Some(v) if v >= MIN_KERNEL => {
            Check::ok("kernel", true, format!("{release} (>= {}.{})", MIN_KERNEL.0, MIN_KERNEL.1))
        }
        Some(_) => {
            Check::bad("kernel", true, format!("{release} is older than {}.{}", MIN_KERNEL.0, MIN_KERNEL.1), fix)
        }
        None => Check::bad("kernel", true, format!("cannot read the kernel version ({release:?})"), fix),
    }
}

/// `6.18.0-1-amd64` → (6, 18).
fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    match fs::metadata(path) {
        Ok(m) if m.len() > 0 || m.is_file() => Check::ok("btf", true, format!("{} present", path.display())),
        _ => Check::bad(
            "btf",
            true,
            format!("{} is missing: the kernel has no BTF", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every current distribution kernel is)",
        ),
    }
}

fn cgroup2() -> Check {
    match cgroup::cgroup2_mount() {
        Ok(m) => {
            let mode = if m == Path::new("/sys/fs/cgroup") { "unified" } else { "hybrid" };
            Check::ok("cgroup2", true, format!("mounted at {} ({mode})", m.display()))
        }
        Err(e) => Check::bad(
            "cgroup2",
            true,
            format!("no cgroup2 filesystem: {e}"),
            "boot with systemd.unified_cgroup_hierarchy=1, or `mount -t cgroup2 none /sys/fs/cgroup`",
        ),
    }
}

fn bpffs(pin_dir: &Path) -> Check {
    if probes::on_bpffs(pin_dir) {
        let pinned = probes::pinned_cgroup_ids(pin_dir).len();
        Check::ok("bpffs", true, format!("{} is on bpffs ({pinned} cgroup(s) with pinned probes)", pin_dir.display()))
    } else {
        let at = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        Check::bad(
            "bpffs",
            true,
            format!(
                "{} is not on a bpf filesystem ({} is not bpffs): the probes cannot be pinned, so they would not \
                 outlive portcullis",
                pin_dir.display(),
                at.display()
            ),
            "mount -t bpf bpf /sys/fs/bpf (systemd mounts it at boot; elsewhere add `bpf /sys/fs/bpf bpf defaults 0 0` \
             to /etc/fstab)",
        )
    }
}

// Capability numbers (linux/capability.h).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

pub fn cap_name(cap: u32) -> &'static str {
    match cap {
        CAP_NET_ADMIN => "CAP_NET_ADMIN",
        CAP_SYS_PTRACE => "CAP_SYS_PTRACE",
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
        CAP_PERFMON => "CAP_PERFMON",
        CAP_BPF => "CAP_BPF",
        _ => "?",
    }
}

/// The effective capability set from a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

fn capabilities() -> Check {
    let caps = fs::read_to_string("/proc/self/status").ok().as_deref().and_then(parse_cap_eff).unwrap_or(0);
    // Loading and attaching cgroup programs; SO_MARK on upstream sockets.
    let need = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];
    let missing: Vec<&str> = need.iter().filter(|c| !has(caps, **c)).map(|c| cap_name(*c)).collect();
    let fix = "run portcullis as root (the packaged unit keeps CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_SYS_PTRACE)";
    if !missing.is_empty() {
        return Check::bad("capabilities", true, format!("missing {}", missing.join(", ")), fix);
    }
    if !has(caps, CAP_SYS_PTRACE) {
        return Check::bad(
            "capabilities",
            false,
            "CAP_SYS_PTRACE missing: callers' executables of other users cannot be recorded",
            fix,
        );
    }
    Check::ok("capabilities", true, "CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_PTRACE")
}

fn program_types() -> Check {
    let fix = "use a kernel with CONFIG_BPF_SYSCALL=y and CONFIG_CGROUP_BPF=y, and run as root";
    let mut bad = Vec::new();
    for (name, t) in [
        ("cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("sock_ops", ProgramType::SockOps),
        ("cgroup_sock", ProgramType::CgroupSock),
    ] {
        match aya::sys::is_program_supported(t) {
            Ok(true) => {}
            Ok(false) => bad.push(format!("{name}: not supported")),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    if bad.is_empty() {
        Check::ok("program-types", true, "cgroup_sock_addr, sock_ops, cgroup_sock load")
    } else {
        Check::bad("program-types", true, bad.join("; "), fix)
    }
}

fn map_types() -> Check {
    let types = [
        ("hash", MapType::Hash),
        ("lru_hash", MapType::LruHash),
        ("lpm_trie", MapType::LpmTrie),
        ("array", MapType::Array),
        ("ringbuf", MapType::RingBuf),
        ("sk_storage", MapType::SkStorage),
    ];
    let mut bad = Vec::new();
    for (name, t) in types {
        match aya::sys::is_map_supported(t) {
            Ok(true) => {}
            Ok(false) => bad.push(format!("{name}: not supported")),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    if bad.is_empty() {
        Check::ok("map-types", true, types.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
    } else {
        Check::bad("map-types", true, bad.join("; "), "use a kernel >= 5.15 with BTF, and run as root")
    }
}

/// Loads the agent's own programs (verifier included) without attaching
/// them: the strongest evidence that `portcullis run` will work here.
fn agent_programs(object: Option<&Path>) -> Check {
    let bytes = match object {
        Some(p) => match fs::read(p) {
            Ok(b) => b,
            Err(e) => {
                return Check::bad(
                    "probes",
                    true,
                    format!("cannot read {}: {e}", p.display()),
                    "pass a readable --bpf-object",
                )
            }
        },
        None => embedded_object().to_vec(),
    };
    if bytes.is_empty() {
        return Check::bad(
            "probes",
            true,
            "this binary was built without its eBPF object",
            "build with `cargo xtask build` (or pass --bpf-object)",
        );
    }
    match probes::verify_object(&bytes) {
        Ok(names) => {
            Check::ok("probes", true, format!("{} programs pass the verifier: {}", names.len(), names.join(", ")))
        }
        Err(e) => Check::bad(
            "probes",
            true,
            format!("the kernel refuses the programs: {e}"),
            "use a kernel >= 5.15 with BTF; run as root; see PORTCULLIS_LOG=debug for the verifier's log",
        ),
    }
}

fn clock() -> Check {
    let now = crate::audit::now_ms() / 1000;
    // 2024-01-01: a clock before it is certainly wrong.
    if now < 1_704_067_200 {
        return Check::bad(
            "clock",
            true,
            format!("the system clock says {now} s since 1970, before 2024: audit timestamps would be wrong"),
            "set the clock and enable time sync (systemd-timesyncd or chrony)",
        );
    }
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state == libc::TIME_ERROR {
        Check::bad(
            "clock",
            false,
            "the clock is not synchronised (adjtimex reports TIME_ERROR): audit timestamps may drift",
            "enable time sync: systemctl enable --now systemd-timesyncd (or chrony)",
        )
    } else {
        Check::ok("clock", true, "set and synchronised")
    }
}

fn state_dir(dir: &Path) -> Check {
    let name = "state-dir";
    let fix_unwritable = format!(
        "portcullis needs {0} writable by root: `install -d -m 0700 -o root {0}`; on a read-only file system pass \
         a writable --state-dir (the packaged unit uses StateDirectory=portcullis)",
        dir.display()
    );
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Created at first start: what matters is that it can be.
            let parent = dir.ancestors().skip(1).find(|p| p.exists()).unwrap_or(Path::new("/"));
            return match probe_write(parent) {
                Ok(()) => Check::ok(name, true, format!("{} does not exist yet; it will be created", dir.display())),
                Err(e) => Check::bad(
                    name,
                    true,
                    format!("{} does not exist and {} is not writable: {e}", dir.display(), parent.display()),
                    fix_unwritable,
                ),
            };
        }
        Err(e) => return Check::bad(name, true, format!("{}: {e}", dir.display()), fix_unwritable),
    };
    if !meta.is_dir() {
        return Check::bad(name, true, format!("{} is not a directory", dir.display()), fix_unwritable);
    }
    if let Err(e) = probe_write(dir) {
        return Check::bad(name, true, format!("{} is not writable: {e}", dir.display()), fix_unwritable);
    }
    let mode = meta.permissions().mode() & 0o7777;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if mode & 0o002 != 0 || (meta.uid() != euid && meta.uid() != 0) {
        return Check::bad(
            name,
            true,
            format!(
                "{} is mode {mode:04o} owned by uid {}: others could alter the audit log",
                dir.display(),
                meta.uid()
            ),
            format!("chown root {0} && chmod 0700 {0}", dir.display()),
        );
    }
    if mode & 0o077 != 0 {
        return Check::bad(
            name,
            false,
            format!("{} is mode {mode:04o}: the audit log and CA key should be root's alone", dir.display()),
            format!("chmod 0700 {}", dir.display()),
        );
    }
    Check::ok(name, true, format!("{} writable, mode {mode:04o}", dir.display()))
}

/// Creates and removes a file in `dir` (what `access(2)` says is not enough
/// on read-only bind mounts and the like).
fn probe_write(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(format!(".portcullis-doctor-{}", std::process::id()));
    fs::write(&p, b"")?;
    fs::remove_file(&p)
}

/// Where the local CA's certificate may be, under the state directory.
pub const CA_CERT_PATHS: [&str; 4] = ["ca/ca.crt", "ca/ca.pem", "ca.crt", "ca.pem"];

/// Host trust stores, most common first (`SSL_CERT_FILE` wins).
const TRUST_STORES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn local_ca(state: &Path) -> Check {
    let name = "local-ca";
    let fix = "portcullis ca export > /usr/local/share/ca-certificates/portcullis.crt && update-ca-certificates";
    let Some(cert_path) = CA_CERT_PATHS.iter().map(|p| state.join(p)).find(|p| p.is_file()) else {
        return Check::bad(
            name,
            false,
            format!("no local CA in {} yet (portcullis creates it for TLS targets)", state.display()),
            format!("start portcullis with a TLS target, then: {fix}"),
        );
    };
    let ca = match CertificateDer::from_pem_file(&cert_path) {
        Ok(c) => c,
        Err(e) => return Check::bad(name, false, format!("cannot read {}: {e}", cert_path.display()), fix),
    };
    let store = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(TRUST_STORES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    let Some(store) = store else {
        return Check::bad(name, false, "no host trust store found", fix);
    };
    if trust_store_has(&store, &ca) {
        Check::ok(name, false, format!("{} is trusted ({})", cert_path.display(), store.display()))
    } else {
        Check::bad(
            name,
            false,
            format!(
                "{} is not in the host trust store {}: guarded clients will refuse TLS targets",
                cert_path.display(),
                store.display()
            ),
            fix,
        )
    }
}

pub fn trust_store_has(store: &Path, ca: &CertificateDer<'_>) -> bool {
    let Ok(iter) = CertificateDer::pem_file_iter(store) else { return false };
    iter.flatten().any(|c| c.as_ref() == ca.as_ref())
}

fn agent(control_socket: &Path, status: Option<&Value>) -> Check {
    let Some(v) = status else {
        return Check::bad(
            "agent",
            false,
            format!("portcullis is not running (no answer on {})", control_socket.display()),
            "systemctl enable --now portcullis (or `portcullis run --policy FILE`)",
        );
    };
    let unresolved: Vec<&str> =
        v["unresolved_scopes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let attached = v["scopes"].as_array().map_or(0, |a| a.iter().filter(|s| s["attached"] == true).count());
    let detail = format!("running, pid {}, {attached} scope(s) attached", v["pid"]);
    if unresolved.is_empty() {
        Check::ok("agent", false, detail)
    } else {
        Check::bad(
            "agent",
            false,
            format!("{detail}; not attached (unit not running): {}", unresolved.join(", ")),
            "start the unit; portcullis attaches to it as soon as its cgroup exists",
        )
    }
}

/// The guarded cgroups: from the running agent, else from the policy.
fn guarded_cgroups(policy: Option<&Path>, status: Option<&Value>) -> Result<Vec<PathBuf>, String> {
    let mount = cgroup::cgroup2_mount().map_err(|e| format!("no cgroup2 mount: {e}"))?;
    if let Some(v) = status {
        return Ok(v["scopes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["cgroup"].as_str())
            .map(|rel| mount.join(rel))
            .collect());
    }
    let path = match policy {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_POLICY).is_file() => PathBuf::from(DEFAULT_POLICY),
        None => return Err("portcullis is not running and no policy was given".into()),
    };
    let p = policy::load_file(&path).map_err(|e| e.to_string())?;
    Ok(p.scopes
        .iter()
        .filter_map(|s| match &s.location {
            ScopeLocation::Cgroup(rel) => Some(rel.clone()),
            ScopeLocation::Unit(u) => cgroup::unit_cgroup(&mount, u),
        })
        .map(|rel| mount.join(rel))
        .filter(|d| d.is_dir())
        .collect())
}

/// Processes in `dir` and every cgroup below it.
fn pids_under(dir: &Path) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    out
}

fn guarded_processes(policy: Option<&Path>, status: Option<&Value>) -> Check {
    let name = "guarded-caps";
    let dirs = match guarded_cgroups(policy, status) {
        Ok(d) => d,
        Err(e) => {
            return Check::bad(
                name,
                false,
                format!("guarded processes not checked: {e}"),
                "start portcullis, or pass --policy",
            )
        }
    };
    let mut offenders = Vec::new();
    let mut n = 0;
    for dir in &dirs {
        for pid in pids_under(dir) {
            let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
            n += 1;
            let bad = cgroup::dangerous_caps(&st);
            if !bad.is_empty() {
                let comm = st.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("?").trim().to_string();
                offenders.push(format!("pid {pid} ({comm}) has {}", bad.join(", ")));
            }
        }
    }
    if offenders.is_empty() {
        Check::ok(
            name,
            true,
            format!(
                "{n} process(es) in {} guarded cgroup(s); none runs as root or holds CAP_SYS_ADMIN, CAP_NET_ADMIN, \
                 CAP_BPF, CAP_NET_RAW, CAP_SYS_PTRACE or CAP_SYS_MODULE",
                dirs.len()
            ),
        )
    } else {
        let more = if offenders.len() > 5 { format!(" and {} more", offenders.len() - 5) } else { String::new() };
        offenders.truncate(5);
        Check::bad(
            name,
            true,
            format!("guarded processes could undo or get around their guard: {}{more}", offenders.join("; ")),
            "run the unit as an unprivileged User= and drop the capabilities in its drop-in: \
             CapabilityBoundingSet=~CAP_SYS_ADMIN CAP_BPF CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_PTRACE \
             CAP_SYS_MODULE and NoNewPrivileges=yes",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_kernel("5.15.0"), Some((5, 15)));
        assert_eq!(parse_kernel("5.4"), Some((5, 4)));
        assert!(parse_kernel("5.4").unwrap() < MIN_KERNEL);
        assert!(parse_kernel("6.1.0").unwrap() >= MIN_KERNEL);
        assert_eq!(parse_kernel("garbage"), None);
    }

    #[test]
    fn effective_capabilities() {
        let root = "Name:\tbash\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        let caps = parse_cap_eff(root).unwrap();
        assert!([CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE].iter().all(|c| has(caps, *c)));
        let user = "Name:\tsleep\nCapEff:\t0000000000000000\n";
        assert_eq!(parse_cap_eff(user), Some(0));
        // CAP_NET_ADMIN alone (bit 12).
        let net = "CapEff:\t0000000000001000\n";
        let caps = parse_cap_eff(net).unwrap();
        assert!(has(caps, CAP_NET_ADMIN) && !has(caps, CAP_SYS_ADMIN) && !has(caps, CAP_BPF));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn state_dir_checks_permissions_and_writability() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("state");
        // Missing but creatable.
        assert_eq!(state_dir(&d).status, Status::Ok);
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(state_dir(&d).status, Status::Ok);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(state_dir(&d).status, Status::Warn);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let c = state_dir(&d);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("chmod 0700"));
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        assert_eq!(state_dir(&file).status, Status::Fail);
    }

    #[test]
    fn trust_store_lookup_compares_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        // Two distinct DER blobs in PEM armour; the check compares bytes.
        let pem = |der: &[u8]| {
            use std::fmt::Write;
            let b64 = base64_encode(der);
            let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
            for chunk in b64.as_bytes().chunks(64) {
                let _ = writeln!(s, "{}", std::str::from_utf8(chunk).unwrap());
            }
            s + "-----END CERTIFICATE-----\n"
        };
        let a = vec![0x30, 0x03, 0x02, 0x01, 0x01];
        let b = vec![0x30, 0x03, 0x02, 0x01, 0x02];
        let store = tmp.path().join("bundle.crt");
        fs::write(&store, pem(&b) + &pem(&a)).unwrap();
        assert!(trust_store_has(&store, &CertificateDer::from(a.clone())));
        fs::write(&store, pem(&b)).unwrap();
        assert!(!trust_store_has(&store, &CertificateDer::from(a)));
    }

    fn base64_encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
