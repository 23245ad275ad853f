//! Loading, attaching and pinning the kernel programs, and keeping their
//! maps in step with the policy.
//!
//! Everything lives under one bpffs directory:
//! `progs/<name>`, `maps-v<layout>/<MAP>` and `links/<cgroup id>/<name>`.
//! Because links and maps are pinned, the programs keep steering guarded
//! connections to the enforcer's port while the agent is down, so those
//! connects are refused instead of bypassing it (fail closed). A restarted
//! agent reuses the pinned maps and swaps its freshly loaded programs into
//! the existing links atomically, so there is no moment without them.
use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, RingBuf},
    programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};
use portcullis_common::*;
use tracing::{debug, info, warn};

use super::{cgroup, sys};
use crate::policy::{Egress, Policy, ScopeLocation, Transport};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("this portcullis binary was built without its eBPF object; build it with `cargo xtask build` (or pass --bpf-object)")]
    NoObject,
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF link of {name}: {source}")]
    Link { name: &'static str, source: aya::programs::links::LinkError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("bpffs is not mounted at {0} and mounting it failed: {1}")]
    Bpffs(PathBuf, io::Error),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ProbeError + 'a {
    move |source| ProbeError::Io { what, path: path.to_path_buf(), source }
}

const SOCK_ADDR_PROGS: [&str; 6] =
    [PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_GETPEERNAME4, PROG_GETPEERNAME6];

const ALL_MAPS: [&str; 8] =
    [MAP_CONFIG, MAP_SCOPES, MAP_TARGETS, MAP_EGRESS, MAP_PENDING, MAP_CONNS, MAP_ORIG_DST, MAP_EVENTS];

/// The loaded programs and the maps the agent writes.
pub struct Probes {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    scopes: HashMap<MapData, u64, ScopeInfo>,
    targets: LpmTrie<MapData, TargetKey, TargetInfo>,
    egress: LpmTrie<MapData, EgressKey, u8>,
    config: Array<MapData, Config>,
    /// Guarded cgroups now attached: id → path relative to the cgroup mount.
    attached: BTreeMap<u64, String>,
}

/// What `apply` did, for logs and `status`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub attached: Vec<AttachedScope>,
    /// Scopes whose cgroup could not be found (a unit not running yet).
    pub unresolved: Vec<String>,
    pub target_entries: usize,
    pub egress_entries: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachedScope {
    pub scope: String,
    pub cgroup: String,
    pub cgroup_id: u64,
}

impl Probes {
    /// Loads `object` (reusing pinned maps), loads and pins the programs, and
    /// points the programs at the enforcer.
    pub fn load(
        object: &[u8],
        pin_dir: &Path,
        config: Config,
    ) -> Result<(Probes, ConnTable, RingBuf<MapData>), ProbeError> {
        if object.is_empty() {
            return Err(ProbeError::NoObject);
        }
        ensure_bpffs(pin_dir)?;
        let maps_dir = maps_dir(pin_dir);
        for d in [&maps_dir, &pin_dir.join("progs"), &pin_dir.join("links")] {
            fs::create_dir_all(d).map_err(io_err("cannot create", d))?;
        }
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, maps_dir.join(m))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object)?;

        for name in SOCK_ADDR_PROGS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| ProbeError::Program { name, source })?;
            repin(pin_dir, name, |p| prog.pin(p))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
        prog.load().map_err(|source| ProbeError::Program { name: PROG_SOCK_OPS, source })?;
        repin(pin_dir, PROG_SOCK_OPS, |p| prog.pin(p))?;
        let prog: &mut CgroupSock = program(&mut ebpf, PROG_SOCK_CREATE)?;
        prog.load().map_err(|source| ProbeError::Program { name: PROG_SOCK_CREATE, source })?;
        repin(pin_dir, PROG_SOCK_CREATE, |p| prog.pin(p))?;

        let mut config_map: Array<MapData, Config> = take_map(&mut ebpf, MAP_CONFIG)?;
        config_map.set(0, config, 0).map_err(|source| ProbeError::Map { name: MAP_CONFIG, source })?;
        let scopes = take_map(&mut ebpf, MAP_SCOPES)?;
        let targets = take_map(&mut ebpf, MAP_TARGETS)?;
        let egress = take_map(&mut ebpf, MAP_EGRESS)?;
        let conns = ConnTable { map: take_raw(&mut ebpf, MAP_CONNS)? };
        let events: RingBuf<MapData> = take_map(&mut ebpf, MAP_EVENTS)?;

        let attached = pinned_cgroup_ids(pin_dir).into_iter().map(|id| (id, String::new())).collect();
        Ok((
            Probes { ebpf, pin_dir: pin_dir.to_path_buf(), scopes, targets, egress, config: config_map, attached },
            conns,
            events,
        ))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn config(&self) -> Option<Config> {
        self.config.get(&0, 0).ok()
    }

    pub fn attached(&self) -> &BTreeMap<u64, String> {
        &self.attached
    }

    /// Brings maps and links in line with `policy`: new entries go in before
    /// stale ones leave, a scope's map entry exists before its link and
    /// outlives it, so no connect ever sees a half-applied policy.
    pub fn apply(&mut self, policy: &Policy, mount: &Path) -> Result<ApplyReport, ProbeError> {
        let mut report = ApplyReport::default();

        // Scopes → cgroups.
        let mut want_scopes: StdHashMap<u64, ScopeInfo> = StdHashMap::new();
        let mut want_cgroups: BTreeMap<u64, (String, String)> = BTreeMap::new();
        for scope in &policy.scopes {
            let rel = match &scope.location {
                ScopeLocation::Cgroup(rel) => {
                    let dir = mount.join(rel);
                    fs::create_dir_all(&dir).map_err(io_err("cannot create cgroup", &dir))?;
                    rel.clone()
                }
                ScopeLocation::Unit(unit) => match cgroup::unit_cgroup(mount, unit) {
                    Some(rel) => rel,
                    None => {
                        warn!(scope = %scope.name, unit = %unit, "unit has no cgroup yet; scope not attached");
                        report.unresolved.push(scope.name.clone());
                        continue;
                    }
                },
            };
            let dir = mount.join(&rel);
            let id = cgroup::cgroup_id(&dir).map_err(io_err("cannot stat cgroup", &dir))?;
            let flags = if scope.egress == Egress::Deny { SCOPE_EGRESS_DENY } else { 0 };
            want_scopes.insert(id, ScopeInfo { scope_id: scope.id, flags });
            want_cgroups.insert(id, (scope.name.clone(), rel.clone()));
            report.attached.push(AttachedScope { scope: scope.name.clone(), cgroup: rel, cgroup_id: id });
        }

        // Targets and egress exceptions.
        let mut want_targets: Vec<(Key<TargetKey>, TargetInfo)> = Vec::new();
        for t in &policy.targets {
            for m in &t.matches {
                let key = Key::new(
                    TARGET_KEY_FIXED_BITS + m.mapped_prefix_len(),
                    TargetKey { port: m.port.unwrap_or(0).to_be_bytes(), addr: m.mapped_addr() },
                );
                // Wildcard targets (observe mode) leave UDP alone, so DNS works.
                let flags = if m.net.prefix_len() > 0 { TARGET_DENY_NON_TCP } else { 0 };
                want_targets.push((key, TargetInfo { target_id: t.id, flags }));
            }
        }
        let mut want_egress: Vec<Key<EgressKey>> = Vec::new();
        for scope in policy.scopes.iter().filter(|s| s.egress == Egress::Deny) {
            for ex in &scope.allow {
                let transports: &[Transport] =
                    if ex.transports.is_empty() { &[Transport::Tcp, Transport::Udp] } else { &ex.transports };
                for tr in transports {
                    let proto = match tr {
                        Transport::Tcp => IPPROTO_TCP,
                        Transport::Udp => IPPROTO_UDP,
                    };
                    want_egress.push(Key::new(
                        EGRESS_KEY_FIXED_BITS + ex.addr.mapped_prefix_len(),
                        EgressKey {
                            scope_id: scope.id.to_be_bytes(),
                            proto,
                            _pad: 0,
                            port: ex.addr.port.unwrap_or(0).to_be_bytes(),
                            addr: ex.addr.mapped_addr(),
                        },
                    ));
                }
            }
        }
        report.target_entries = want_targets.len();
        report.egress_entries = want_egress.len();

        // Insert everything wanted.
        for (k, v) in &want_targets {
            self.targets.insert(k, v, 0).map_err(|source| ProbeError::Map { name: MAP_TARGETS, source })?;
        }
        for k in &want_egress {
            self.egress.insert(k, 1u8, 0).map_err(|source| ProbeError::Map { name: MAP_EGRESS, source })?;
        }
        for (id, info) in &want_scopes {
            self.scopes.insert(id, info, 0).map_err(|source| ProbeError::Map { name: MAP_SCOPES, source })?;
        }

        // Links: adopt or create those wanted, drop the rest.
        for (id, (scope, rel)) in &want_cgroups {
            self.ensure_links(*id, &mount.join(rel)).map_err(|e| {
                warn!(scope = %scope, cgroup = %rel, error = %e, "attaching probes failed");
                e
            })?;
            self.attached.insert(*id, rel.clone());
        }
        for id in pinned_cgroup_ids(&self.pin_dir) {
            if !want_cgroups.contains_key(&id) {
                let dir = self.pin_dir.join("links").join(id.to_string());
                fs::remove_dir_all(&dir).map_err(io_err("cannot unpin links", &dir))?;
                self.attached.remove(&id);
                info!(cgroup_id = id, "probes detached from a cgroup the policy no longer guards");
            }
        }

        // Remove stale entries last.
        let stale: Vec<u64> = self.scopes.keys().flatten().filter(|k| !want_scopes.contains_key(k)).collect();
        for k in stale {
            let _ = self.scopes.remove(&k);
        }
        let wanted: HashSet<Vec<u8>> = want_targets.iter().map(|(k, _)| key_bytes(k)).collect();
        let stale: Vec<Key<TargetKey>> =
            self.targets.keys().flatten().filter(|k| !wanted.contains(&key_bytes(k))).collect();
        for k in stale {
            let _ = self.targets.remove(&k);
        }
        let wanted: HashSet<Vec<u8>> = want_egress.iter().map(key_bytes).collect();
        let stale: Vec<Key<EgressKey>> =
            self.egress.keys().flatten().filter(|k| !wanted.contains(&key_bytes(k))).collect();
        for k in stale {
            let _ = self.egress.remove(&k);
        }
        Ok(report)
    }

    /// Makes sure every program is linked to `dir`: an existing pinned link
    /// gets the newly loaded program swapped in; a missing one is created.
    fn ensure_links(&mut self, id: u64, dir: &Path) -> Result<(), ProbeError> {
        let link_dir = self.pin_dir.join("links").join(id.to_string());
        fs::create_dir_all(&link_dir).map_err(io_err("cannot create", &link_dir))?;
        let cgroup = fs::File::open(dir).map_err(io_err("cannot open cgroup", dir))?;
        for name in SOCK_ADDR_PROGS.into_iter().chain([PROG_SOCK_OPS, PROG_SOCK_CREATE]) {
            let pin = link_dir.join(name);
            if pin.exists() {
                let prog_fd = prog_fd(&self.ebpf, name)?;
                let updated = sys::obj_get(&pin).and_then(|link| sys::link_update(link.as_fd(), prog_fd));
                match updated {
                    Ok(()) => {
                        debug!(cgroup_id = id, program = name, "adopted pinned link");
                        continue;
                    }
                    Err(e) => {
                        // A link whose cgroup went away (ENOLINK) or a stale
                        // pin: replace it.
                        warn!(cgroup_id = id, program = name, error = %e, "pinned link unusable; re-attaching");
                        let _ = fs::remove_file(&pin);
                    }
                }
            }
            // Each program type has its own attach and link types.
            macro_rules! attach {
                ($ty:ty) => {{
                    let prog: &mut $ty = program(&mut self.ebpf, name)?;
                    let lid = prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(|source| ProbeError::Program { name, source })?;
                    let l = prog.take_link(lid).map_err(|source| ProbeError::Program { name, source })?;
                    FdLink::try_from(l).map_err(|source| ProbeError::Link { name, source })?
                }};
            }
            let link: FdLink = match name {
                PROG_SOCK_OPS => attach!(SockOps),
                PROG_SOCK_CREATE => attach!(CgroupSock),
                _ => attach!(CgroupSockAddr),
            };
            link.pin(&pin).map_err(|e| ProbeError::Io {
                what: "cannot pin link",
                path: pin.clone(),
                source: io::Error::other(e),
            })?;
        }
        Ok(())
    }
}

/// Loads `object` and every program in it through the verifier, without
/// pinning or attaching anything (for `portcullis doctor`). Returns the
/// program names.
pub fn verify_object(object: &[u8]) -> Result<Vec<String>, ProbeError> {
    if object.is_empty() {
        return Err(ProbeError::NoObject);
    }
    let mut ebpf = EbpfLoader::new().load(object)?;
    let mut names = Vec::new();
    for name in SOCK_ADDR_PROGS {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        prog.load().map_err(|source| ProbeError::Program { name, source })?;
        names.push(name.to_string());
    }
    let prog: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
    prog.load().map_err(|source| ProbeError::Program { name: PROG_SOCK_OPS, source })?;
    names.push(PROG_SOCK_OPS.to_string());
    let prog: &mut CgroupSock = program(&mut ebpf, PROG_SOCK_CREATE)?;
    prog.load().map_err(|source| ProbeError::Program { name: PROG_SOCK_CREATE, source })?;
    names.push(PROG_SOCK_CREATE.to_string());
    Ok(names)
}

/// The kernel's connection records, read and deleted on accept.
pub struct ConnTable {
    map: MapData,
}

/// A connect waits at most this long (in `born` units, about seconds) for
/// its accept; an older record is left over from a connection that never
/// reached the enforcer, and whoever now holds its client address is not
/// that caller.
const RECORD_MAX_AGE: u32 = 10;

/// Now, in the units of [`ConnRecord::born`].
pub fn born_now() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC is what
    // bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ns = (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64);
    (ns >> BORN_SHIFT) as u32
}

impl ConnTable {
    /// Takes the record of the client at `key`, if the kernel made one;
    /// `Err` for one too old to be this caller's.
    pub fn take(&self, key: &ClientKey) -> io::Result<Option<ConnRecord>> {
        let mut rec = ConnRecord::default();
        let found = sys::map_lookup_and_delete(self.map.fd().as_fd(), key, &mut rec)?;
        if found && born_now().wrapping_sub(rec.born) > RECORD_MAX_AGE {
            return Err(io::Error::other(format!(
                "the kernel record is stale (made {} s ago): the address was reused",
                born_now().wrapping_sub(rec.born)
            )));
        }
        Ok(found.then_some(rec))
    }

    /// Deletes the records made before `since` (a [`born_now`] value): left
    /// by connects while no enforcer listened, they belong to nobody that
    /// can reach it now. Returns how many.
    pub fn purge_before(&self, since: u32) -> io::Result<usize> {
        let fd = self.map.fd().as_fd();
        let keys: Vec<ClientKey> = sys::map_keys(fd, CONN_MAP_ENTRIES as usize)?;
        let mut purged = 0;
        for key in keys {
            let mut rec = ConnRecord::default();
            if sys::map_lookup(fd, &key, &mut rec)? && since.wrapping_sub(rec.born) as i32 > 0 {
                sys::map_delete(fd, &key)?;
                purged += 1;
            }
        }
        Ok(purged)
    }
}

fn key_bytes<K: Copy>(k: &Key<K>) -> Vec<u8> {
    // SAFETY: Key<K> is repr(C, packed) plain data.
    let p = k as *const Key<K> as *const u8;
    unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<Key<K>>()) }.to_vec()
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p =
        ebpf.program_mut(name).ok_or(ProbeError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    p.try_into().map_err(|source| ProbeError::Program { name, source })
}

fn prog_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<std::os::fd::BorrowedFd<'a>, ProbeError> {
    let p = ebpf.program(name).ok_or(ProbeError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    p.fd().map(|fd| fd.as_fd()).map_err(|source| ProbeError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(ProbeError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
    T::try_from(m).map_err(|source| ProbeError::Map { name, source })
}

fn take_raw(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, ProbeError> {
    use aya::maps::Map;
    match ebpf.take_map(name) {
        Some(Map::LruHashMap(m)) | Some(Map::HashMap(m)) => Ok(m),
        _ => Err(ProbeError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } }),
    }
}

/// Pins a program at `progs/<name>`, replacing the previous agent's pin.
fn repin(
    pin_dir: &Path,
    name: &'static str,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), ProbeError> {
    let path = pin_dir.join("progs").join(name);
    let _ = fs::remove_file(&path);
    pin(&path).map_err(|e| ProbeError::Io { what: "cannot pin program", path, source: io::Error::other(e) })
}

/// Where the pinned maps of this layout version live.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{MAP_LAYOUT_VERSION}"))
}

/// Cgroup ids with pinned links.
pub fn pinned_cgroup_ids(pin_dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(pin_dir.join("links")) else { return Vec::new() };
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// True when `path` (or its nearest existing ancestor) is on a bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(cur) = p {
        if cur.exists() {
            return nix::sys::statfs::statfs(cur).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
        }
        p = cur.parent();
    }
    false
}

/// Mounts bpffs at /sys/fs/bpf when the pin directory needs it and it is
/// not there yet.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), ProbeError> {
    if on_bpffs(pin_dir) {
        return Ok(());
    }
    let mnt = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(mnt) {
        return Err(ProbeError::Bpffs(pin_dir.to_path_buf(), io::Error::other("the pin directory must be on a bpffs")));
    }
    fs::create_dir_all(mnt).map_err(|e| ProbeError::Bpffs(mnt.into(), e))?;
    nix::mount::mount(Some("bpf"), mnt, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| ProbeError::Bpffs(mnt.into(), e.into()))?;
    info!(path = %mnt.display(), "mounted bpffs");
    Ok(())
}

/// Removes every pinned link, program and map under `pin_dir`: the probes
/// leave the kernel once nothing holds them.
pub fn detach_all(pin_dir: &Path) -> io::Result<usize> {
    let n = pinned_cgroup_ids(pin_dir).len();
    if pin_dir.exists() {
        fs::remove_dir_all(pin_dir)?;
    }
    Ok(n)
}
