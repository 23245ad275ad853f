//! The few bpf(2) commands aya does not expose for our use: replacing the
//! program of a pinned cgroup link in place, opening a pinned object, and an
//! atomic lookup-and-delete on the connection map.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn bpf(cmd: libc::c_long, attr: &mut [u64], size: usize) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-initialised bpf_attr prefix of `size`
    // bytes; the kernel reads and writes only within it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned bpffs object (link, program or map).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct { u64 pathname; u32 bpf_fd; u32 file_flags; u32 path_fd }
    let mut attr = [0u64; 3];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr, 20)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program of a link (no moment without a program).
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    // struct { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd }
    let mut attr = [0u64; 2];
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((new_prog.as_raw_fd() as u32 as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr, 16).map(|_| ())
}

/// Reads and deletes one entry; `Ok(false)` when the key is absent.
pub fn map_lookup_and_delete<K, V>(map: BorrowedFd<'_>, key: &K, value: &mut V) -> io::Result<bool> {
    // struct { u32 map_fd; u32 pad; u64 key; u64 value; u64 flags }
    let mut attr = [0u64; 4];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key as *const K as u64;
    attr[2] = value as *mut V as u64;
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr, 32) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads one entry; `Ok(false)` when the key is absent.
pub fn map_lookup<K, V>(map: BorrowedFd<'_>, key: &K, value: &mut V) -> io::Result<bool> {
    // struct { u32 map_fd; u32 pad; u64 key; u64 value; u64 flags }
    let mut attr = [0u64; 4];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key as *const K as u64;
    attr[2] = value as *mut V as u64;
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr, 32) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes one entry (absent is fine).
pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    // struct { u32 map_fd; u32 pad; u64 key }
    let mut attr = [0u64; 2];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key as *const K as u64;
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr, 16) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A map's keys, at most `limit` (entries may come and go while walking).
pub fn map_keys<K: Copy + Default>(map: BorrowedFd<'_>, limit: usize) -> io::Result<Vec<K>> {
    let mut keys: Vec<K> = Vec::new();
    let mut next = K::default();
    while keys.len() < limit {
        // struct { u32 map_fd; u32 pad; u64 key; u64 next_key }
        let mut attr = [0u64; 3];
        attr[0] = map.as_raw_fd() as u32 as u64;
        attr[1] = keys.last().map_or(0, |k| k as *const K as u64);
        attr[2] = &mut next as *mut K as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr, 24) {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(keys)
}

/// Counts a map's keys (at most `limit`, since entries may come and go
/// while walking an LRU map).
pub fn map_count_keys(map: BorrowedFd<'_>, key_size: usize, limit: u64) -> io::Result<u64> {
    let mut cur = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0;
    let mut first = true;
    while n < limit {
        // struct { u32 map_fd; u32 pad; u64 key; u64 next_key }
        let mut attr = [0u64; 3];
        attr[0] = map.as_raw_fd() as u32 as u64;
        attr[1] = if first { 0 } else { cur.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr, 24) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut cur, &mut next);
        first = false;
        n += 1;
    }
    Ok(n)
}
