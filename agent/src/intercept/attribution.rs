//! Who is calling: the kernel's connect-time record, completed with the
//! cgroup path, systemd unit, executable and guarded scope.
use std::net::{IpAddr, SocketAddr};

use portcullis_common::{is_mapped_v4, mapped_v4, ClientKey, ConnRecord, AF_INET};

use super::cgroup::{unit_of, CgroupResolver};
use crate::{audit::CallerInfo, ids::OrigDst, policy::Policy};

/// The key under which the kernel filed a client's record: its own address
/// (mapped to IPv6 form) and port, as the enforcer sees the peer.
pub fn client_key(peer: SocketAddr) -> ClientKey {
    let addr = match peer.ip().to_canonical() {
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    ClientKey { addr, port: peer.port(), _pad: 0 }
}

/// The destination the caller asked for, in the family it used.
pub fn orig_dst(rec: &ConnRecord) -> OrigDst {
    let port = u16::from_be(rec.orig.port_be);
    let a = rec.orig.addr;
    let ip = if rec.orig.family == AF_INET || is_mapped_v4(&a) {
        IpAddr::from([a[12], a[13], a[14], a[15]])
    } else {
        IpAddr::from(a)
    };
    OrigDst(SocketAddr::new(ip, port))
}

pub fn comm(rec: &ConnRecord) -> String {
    let end = rec.comm.iter().position(|&b| b == 0).unwrap_or(rec.comm.len());
    String::from_utf8_lossy(&rec.comm[..end]).into_owned()
}

/// Completes a kernel record into the caller's identity.
pub fn caller(rec: &ConnRecord, cgroups: &CgroupResolver, policy: &Policy) -> CallerInfo {
    let cgroup = cgroups.path_of(rec.cgroup_id);
    CallerInfo {
        tgid: rec.tgid,
        pid: rec.pid,
        uid: rec.uid,
        gid: rec.gid,
        comm: comm(rec),
        // Best effort: the process may already have exited.
        exe: std::fs::read_link(format!("/proc/{}/exe", rec.tgid)).ok().map(|p| p.to_string_lossy().into_owned()),
        cgroup_id: rec.cgroup_id,
        unit: cgroup.as_deref().and_then(unit_of),
        cgroup,
        scope: policy.scope_by_id(rec.scope_id).map(|s| s.name.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_common::{OrigDst as KOrig, AF_INET6};

    #[test]
    fn client_keys_use_the_mapped_form() {
        let k = client_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.addr, mapped_v4([127, 0, 0, 1]));
        assert_eq!(k.port, 40000);
        let k6 = client_key("[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(k, k6);
        let k = client_key("[::1]:5".parse().unwrap());
        assert_eq!(k.addr[15], 1);
    }

    #[test]
    fn original_destination_keeps_the_callers_family() {
        let mut rec = ConnRecord {
            orig: KOrig { addr: mapped_v4([127, 0, 0, 53]), port_be: 5432u16.to_be(), family: AF_INET },
            ..Default::default()
        };
        assert_eq!(orig_dst(&rec).0, "127.0.0.53:5432".parse().unwrap());
        rec.orig.family = AF_INET6;
        // v4-mapped destinations are treated as IPv4.
        assert_eq!(orig_dst(&rec).0, "127.0.0.53:5432".parse().unwrap());
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        rec.orig.addr = v6;
        assert_eq!(orig_dst(&rec).0, "[::1]:5432".parse().unwrap());
        rec.comm[..4].copy_from_slice(b"psql");
        assert_eq!(comm(&rec), "psql");
    }
}
