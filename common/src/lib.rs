//! Types shared by the kernel programs and the agent: map keys and values,
//! map names and constants. Every type is `#[repr(C)]` plain data with its
//! size pinned by a compile-time assertion, because the kernel and userspace
//! must agree on the layout byte for byte.
#![no_std]

/// Version of the map layout. Pinned maps live under a directory named after
/// it, so an agent with a different layout never reuses incompatible maps.
pub const MAP_LAYOUT_VERSION: u32 = 1;

// Map names (also the file names of the pinned maps).
pub const MAP_CONFIG: &str = "PC_CONFIG";
pub const MAP_SCOPES: &str = "PC_SCOPES";
pub const MAP_TARGETS: &str = "PC_TARGETS";
pub const MAP_EGRESS: &str = "PC_EGRESS";
pub const MAP_PENDING: &str = "PC_PENDING";
pub const MAP_CONNS: &str = "PC_CONNS";
pub const MAP_ORIG_DST: &str = "PC_ORIG_DST";
pub const MAP_EVENTS: &str = "PC_EVENTS";

/// Program names (the Rust function names in the eBPF crate).
pub const PROG_CONNECT4: &str = "pc_connect4";
pub const PROG_CONNECT6: &str = "pc_connect6";
pub const PROG_SENDMSG4: &str = "pc_sendmsg4";
pub const PROG_SENDMSG6: &str = "pc_sendmsg6";
pub const PROG_GETPEERNAME4: &str = "pc_getpeername4";
pub const PROG_GETPEERNAME6: &str = "pc_getpeername6";
pub const PROG_SOCK_OPS: &str = "pc_sock_ops";
pub const PROG_SOCK_CREATE: &str = "pc_sock_create";

/// Capacity of the connection-record maps. Entries live from connect() to
/// accept() only, so this bounds connections in flight, not open ones.
pub const CONN_MAP_ENTRIES: u32 = 65536;
pub const MAX_SCOPES: u32 = 1024;
pub const MAX_TARGET_ENTRIES: u32 = 16384;
pub const MAX_EGRESS_ENTRIES: u32 = 16384;
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// How deep below the cgroup root a guarded scope may sit.
pub const MAX_CGROUP_DEPTH: i32 = 32;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Scope flag: connects to destinations no target declares are refused.
pub const SCOPE_EGRESS_DENY: u32 = 1;

/// Target flag: UDP and other non-TCP traffic to this address is refused
/// (a declared target is only reachable through the enforcer).
pub const TARGET_DENY_NON_TCP: u32 = 1;

/// An IPv6 address; IPv4 is stored in its IPv4-mapped form
/// (`::ffff:a.b.c.d`) so both families share one key space.
pub type Addr16 = [u8; 16];

/// Runtime settings, index 0 of an array map so a restarted agent can change
/// them without reloading the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Enforcer listener port, host byte order. 0 = not configured: the
    /// programs then refuse connects to targets (fail closed).
    pub enforcer_port: u16,
    pub _pad: u16,
    /// `SO_MARK` carried by the enforcer's own sockets; never redirected.
    pub enforcer_mark: u32,
}

/// Value of the scope map, keyed by cgroup id (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeInfo {
    pub scope_id: u32,
    pub flags: u32,
}

/// LPM trie key data for targets: port first (network order, 0 = any
/// port), then the address. Prefix length = 16 + address prefix bits over
/// the 128-bit mapped address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetKey {
    pub port: [u8; 2],
    pub addr: Addr16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetInfo {
    pub target_id: u32,
    pub flags: u32,
}

/// LPM trie key data for egress exceptions: scope id, protocol, port
/// (network order, 0 = any), address. Prefix = 64 + address prefix bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressKey {
    pub scope_id: [u8; 4],
    pub proto: u8,
    pub _pad: u8,
    pub port: [u8; 2],
    pub addr: Addr16,
}

/// Bits of an LPM key that precede the address.
pub const TARGET_KEY_FIXED_BITS: u32 = 16;
pub const EGRESS_KEY_FIXED_BITS: u32 = 64;

/// The original destination of a redirected socket, kept in socket-local
/// storage for `getpeername`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr16,
    /// Network byte order, as in `sockaddr_in`.
    pub port_be: u16,
    /// Family of the caller's socket (AF_INET or AF_INET6).
    pub family: u16,
}

/// Who connected and where it meant to go, captured at connect().
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// cgroup v2 id of the calling task (the inode of its cgroup directory).
    pub cgroup_id: u64,
    pub cookie: u64,
    pub orig: OrigDst,
    pub target_id: u32,
    pub scope_id: u32,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: [u8; 16],
    /// When the record was made: `bpf_ktime_get_ns() >> BORN_SHIFT`, about
    /// seconds of CLOCK_MONOTONIC (so a stale record can be told apart).
    pub born: u32,
}

/// See [`ConnRecord::born`].
pub const BORN_SHIFT: u32 = 30;

/// Key of the re-keyed connection map: the client's own (address, port) as
/// the enforcer sees it on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub addr: Addr16,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Kinds of event the programs report through the ring buffer.
pub const EVENT_EGRESS_DENIED: u32 = 1;
pub const EVENT_ENFORCER_DIRECT: u32 = 2;
pub const EVENT_NON_TCP_TO_TARGET: u32 = 3;
pub const EVENT_NOT_CONFIGURED: u32 = 4;
pub const EVENT_MAP_FULL: u32 = 5;
/// A raw or ICMP socket refused in an `egress = "deny"` scope: it would
/// send to any address without a connect or sendmsg the programs see.
pub const EVENT_RAW_SOCKET: u32 = 6;

/// A refusal made in the kernel, reported so it can be audited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub record: ConnRecord,
}

/// Maps an IPv4 address (network order bytes) to its IPv6-mapped form.
pub const fn mapped_v4(octets: [u8; 4]) -> Addr16 {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

/// True when `addr` is an IPv4-mapped IPv6 address.
pub const fn is_mapped_v4(addr: &Addr16) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

const _: () = assert!(core::mem::size_of::<Config>() == 8);
const _: () = assert!(core::mem::size_of::<ScopeInfo>() == 8);
const _: () = assert!(core::mem::size_of::<TargetKey>() == 18);
const _: () = assert!(core::mem::size_of::<TargetInfo>() == 8);
const _: () = assert!(core::mem::size_of::<EgressKey>() == 24);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 20);
const _: () = assert!(core::mem::size_of::<ConnRecord>() == 80);
const _: () = assert!(core::mem::size_of::<ClientKey>() == 20);
const _: () = assert!(core::mem::size_of::<KernelEvent>() == 88);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] structs of integers and byte
    // arrays with no padding holes left uninitialised by the kernel side.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ScopeInfo {}
    unsafe impl aya::Pod for TargetKey {}
    unsafe impl aya::Pod for TargetInfo {}
    unsafe impl aya::Pod for EgressKey {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ConnRecord {}
    unsafe impl aya::Pod for ClientKey {}
    unsafe impl aya::Pod for KernelEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_v4_round_trip() {
        let a = mapped_v4([127, 0, 0, 53]);
        assert!(is_mapped_v4(&a));
        assert_eq!(&a[12..], &[127, 0, 0, 53]);
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert!(!is_mapped_v4(&v6));
    }
}
