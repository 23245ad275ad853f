//! The cgroup v2 tree: where it is mounted, ids to paths, paths to units.
use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// The cgroup2 mount point, read from /proc/self/mountinfo (it is
/// `/sys/fs/cgroup` on unified hosts and `/sys/fs/cgroup/unified` on hybrid
/// ones; never assume either).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    find_cgroup2_in_mountinfo(&info)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem is mounted"))
}

fn find_cgroup2_in_mountinfo(info: &str) -> Option<PathBuf> {
    for line in info.lines() {
        // fields before " - " are per-mount; after it: fstype source options
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next() == Some("cgroup2") {
            let mount_point = pre.split_whitespace().nth(4)?;
            return Some(PathBuf::from(unescape_mount(mount_point)));
        }
    }
    None
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The id of a cgroup v2 directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir)?.ino())
}

/// Resolves cgroup ids to paths (relative to the mount), caching results.
/// Cgroup ids are never reused while the system runs, so entries stay true.
pub struct CgroupResolver {
    mount: PathBuf,
    cache: Mutex<HashMap<u64, String>>,
}

impl CgroupResolver {
    pub fn new(mount: PathBuf) -> Self {
        CgroupResolver { mount, cache: Mutex::new(HashMap::new()) }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Path relative to the mount (`""` for the root), or None if no such
    /// cgroup exists any more.
    pub fn path_of(&self, id: u64) -> Option<String> {
        if let Some(p) = self.cache.lock().expect("cgroup cache").get(&id) {
            return Some(p.clone());
        }
        let found = find_by_inode(&self.mount, id)?;
        self.cache.lock().expect("cgroup cache").insert(id, found.clone());
        Some(found)
    }

    /// Records a known (id, path) pair, e.g. for a scope just created.
    pub fn remember(&self, id: u64, rel: &str) {
        self.cache.lock().expect("cgroup cache").insert(id, rel.to_string());
    }
}

/// Walks the tree for the directory with inode `id`. Breadth-first, since
/// guarded cgroups are usually shallow.
fn find_by_inode(mount: &Path, id: u64) -> Option<String> {
    let mut queue = std::collections::VecDeque::from([mount.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        if let Ok(meta) = fs::metadata(&dir) {
            if meta.ino() == id {
                let rel = dir.strip_prefix(mount).ok()?.to_string_lossy().into_owned();
                return Some(rel);
            }
        }
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
        }
    }
    None
}

/// The systemd unit a cgroup path belongs to, as systemd itself reads it:
/// the outermost component that names a unit other than a slice
/// (`x.service`, `x.scope`), e.g. `system.slice/runner.service/job` →
/// `runner.service`. Not the innermost: below a unit's own cgroup, a
/// process with a delegated subtree (a user manager, a container runtime)
/// may create directories with any name, `x.service` included.
pub fn unit_of(rel: &str) -> Option<String> {
    rel.split('/')
        .find(|c| {
            [".service", ".scope", ".socket", ".mount", ".swap"].iter().any(|s| c.len() > s.len() && c.ends_with(s))
        })
        .map(str::to_string)
}

/// The cgroup of a systemd unit, relative to the mount, when it exists now.
/// Asks systemd when it runs (`ControlGroup` property); otherwise looks for a
/// directory of that name in the tree (a unit's cgroup is `<slices>/<unit>`).
pub fn unit_cgroup(mount: &Path, unit: &str) -> Option<String> {
    if let Some(cg) = systemd_unit_cgroup(unit) {
        if mount.join(&cg).is_dir() {
            return Some(cg);
        }
    }
    // Only without systemd: with it, a directory of that name elsewhere
    // (a user's own `systemd-run --user --unit=NAME`) is not that unit.
    if systemd_running() {
        return None;
    }
    find_unit_dir(mount, unit)
}

/// The cgroup systemd says a unit runs in, if it runs.
pub fn systemd_unit_cgroup(unit: &str) -> Option<String> {
    systemctl_show(unit, "ControlGroup").and_then(|v| parse_control_group(&v))
}

/// Whether systemd is the init system (what sd_booted(3) checks).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Where a unit's cgroup will be once it runs, from systemd's `Slice`
/// property (a stopped unit has no `ControlGroup`, but its slice is known).
/// None without systemd.
pub fn unit_cgroup_hint(unit: &str) -> Option<String> {
    let slice = systemctl_show(unit, "Slice")?;
    let base = slice_path(slice.trim())?;
    Some(if base.is_empty() { unit.to_string() } else { format!("{base}/{unit}") })
}

fn systemctl_show(unit: &str, property: &str) -> Option<String> {
    let out = std::process::Command::new("systemctl")
        .args(["show", &format!("--property={property}"), "--value", "--", unit])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `systemctl show -p ControlGroup --value` prints `/system.slice/x.service`
/// for a running unit and nothing for a stopped one.
fn parse_control_group(out: &str) -> Option<String> {
    let cg = out.trim().trim_start_matches('/');
    (!cg.is_empty()).then(|| cg.to_string())
}

/// The cgroup path of a slice, relative to the mount: every dash-separated
/// prefix is a parent slice (`a-b.slice` → `a.slice/a-b.slice`), and the
/// root slice `-.slice` is the mount itself (`""`).
pub fn slice_path(slice: &str) -> Option<String> {
    let name = slice.strip_suffix(".slice")?;
    if name == "-" {
        return Some(String::new());
    }
    if name.is_empty() || name.starts_with('-') || name.ends_with('-') || name.contains("--") || name.contains('/') {
        return None;
    }
    let parts: Vec<&str> = name.split('-').collect();
    let path: Vec<String> = (1..=parts.len()).map(|n| format!("{}.slice", parts[..n].join("-"))).collect();
    Some(path.join("/"))
}

fn find_unit_dir(mount: &Path, unit: &str) -> Option<String> {
    let mut queue = std::collections::VecDeque::from([mount.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            if e.file_name() == unit {
                return Some(path.strip_prefix(mount).ok()?.to_string_lossy().into_owned());
            }
            queue.push_back(path);
        }
    }
    None
}

/// Capabilities that would let a guarded process undo or get around its
/// guard: leave the cgroup or detach the programs (CAP_SYS_ADMIN), change
/// routing and marks (CAP_NET_ADMIN), load or remove BPF programs
/// (CAP_BPF), send packets no socket hook sees (CAP_NET_RAW: packet
/// sockets), read portcullis' memory and its credentials (CAP_SYS_PTRACE),
/// load kernel code (CAP_SYS_MODULE).
pub const DANGEROUS_CAPS: [(u32, &str); 6] = [
    (21, "CAP_SYS_ADMIN"),
    (12, "CAP_NET_ADMIN"),
    (39, "CAP_BPF"),
    (13, "CAP_NET_RAW"),
    (19, "CAP_SYS_PTRACE"),
    (16, "CAP_SYS_MODULE"),
];

/// A process in a guarded cgroup holding dangerous capabilities.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrivilegedProcess {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    pub caps: Vec<&'static str>,
}

/// Every process in the subtree at `dir` that runs as root or whose
/// effective capabilities include one of `DANGEROUS_CAPS`.
pub fn privileged_processes(mount: &Path, dir: &Path) -> Vec<PrivilegedProcess> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
                let caps = dangerous_caps(&status);
                if !caps.is_empty() {
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
                    let cgroup = d.strip_prefix(mount).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
                    out.push(PrivilegedProcess { pid, comm, cgroup, caps });
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&d) {
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    out
}

/// What in a /proc/<pid>/status undoes the guard: running as uid 0 (root
/// owns portcullis' credential files, whatever its capabilities) and the
/// dangerous capabilities of its `CapEff` line.
pub fn dangerous_caps(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0");
    let caps = DANGEROUS_CAPS.iter().filter(|(bit, _)| eff & (1u64 << bit) != 0).map(|(_, name)| *name);
    root.then_some("uid 0").into_iter().chain(caps).collect()
}

/// Moves a process into a cgroup.
pub fn enter(dir: &Path, pid: u32) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,name=systemd\n\
                      31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_in_mountinfo(hybrid).unwrap(), PathBuf::from("/sys/fs/cgroup/unified"));
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2_in_mountinfo(unified).unwrap(), PathBuf::from("/sys/fs/cgroup"));
        assert!(find_cgroup2_in_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw\n").is_none());
    }

    #[test]
    fn dangerous_capabilities_from_proc_status() {
        let root = "Name:\tx\nUid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n";
        assert_eq!(
            dangerous_caps(root),
            vec![
                "uid 0",
                "CAP_SYS_ADMIN",
                "CAP_NET_ADMIN",
                "CAP_BPF",
                "CAP_NET_RAW",
                "CAP_SYS_PTRACE",
                "CAP_SYS_MODULE"
            ]
        );
        let user = "Name:\tx\nUid:\t65534\t65534\t65534\t65534\nCapEff:\t0000000000000000\n";
        assert!(dangerous_caps(user).is_empty());
        let net = "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000003000\n";
        assert_eq!(dangerous_caps(net), vec!["CAP_NET_ADMIN", "CAP_NET_RAW"]);
        let capless_root = "Uid:\t1000\t0\t0\t0\nCapEff:\t0000000000000000\n";
        assert_eq!(dangerous_caps(capless_root), vec!["uid 0"], "the effective uid counts");
    }

    #[test]
    fn units_from_cgroup_paths() {
        assert_eq!(unit_of("system.slice/runner.service").as_deref(), Some("runner.service"));
        assert_eq!(unit_of("system.slice/runner.service/job-1").as_deref(), Some("runner.service"));
        // A user's own units are inside the user manager's delegated tree,
        // where the user names directories: the system unit is what counts.
        assert_eq!(
            unit_of("user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope").as_deref(),
            Some("user@1000.service")
        );
        assert_eq!(unit_of("system.slice/low.service/actions-runner.service").as_deref(), Some("low.service"));
        assert_eq!(unit_of("user.slice/user-1000.slice/session-3.scope").as_deref(), Some("session-3.scope"));
        assert_eq!(unit_of("test-7/portcullis.slice/runner.service/x.service").as_deref(), Some("runner.service"));
        assert_eq!(unit_of("portcullis.slice/ci"), None);
        assert_eq!(unit_of(""), None);
    }

    #[test]
    fn slice_paths_follow_systemd_naming() {
        assert_eq!(slice_path("system.slice").as_deref(), Some("system.slice"));
        assert_eq!(slice_path("-.slice").as_deref(), Some(""));
        assert_eq!(slice_path("portcullis.slice").as_deref(), Some("portcullis.slice"));
        assert_eq!(
            slice_path("user-1000-app.slice").as_deref(),
            Some("user.slice/user-1000.slice/user-1000-app.slice")
        );
        assert_eq!(slice_path("x.service"), None);
        assert_eq!(slice_path("a--b.slice"), None);
        assert_eq!(slice_path("-a.slice"), None);
    }

    #[test]
    fn control_group_output() {
        assert_eq!(
            parse_control_group("/system.slice/runner.service\n").as_deref(),
            Some("system.slice/runner.service")
        );
        assert_eq!(parse_control_group("\n"), None);
        assert_eq!(parse_control_group(""), None);
    }

    #[test]
    fn unit_resolution_against_a_fake_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("system.slice/actions-runner.service")).unwrap();
        fs::create_dir_all(root.join("system.slice/other.service")).unwrap();
        assert_eq!(
            find_unit_dir(root, "actions-runner.service").as_deref(),
            Some("system.slice/actions-runner.service")
        );
        assert_eq!(find_unit_dir(root, "missing.service"), None);
        let r = CgroupResolver::new(root.to_path_buf());
        let id = cgroup_id(&root.join("system.slice/other.service")).unwrap();
        assert_eq!(r.path_of(id).as_deref(), Some("system.slice/other.service"));
        assert_eq!(r.path_of(u64::MAX), None);
    }
}
