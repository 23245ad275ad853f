//! Map definitions. Names match `portcullis_common::MAP_*`; the agent pins
//! every map so state survives an agent restart.
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, RingBuf},
};
use portcullis_common::{
    ClientKey, Config, ConnRecord, EgressKey, OrigDst, ScopeInfo, TargetInfo, TargetKey, CONN_MAP_ENTRIES,
    EVENTS_RING_BYTES, MAX_EGRESS_ENTRIES, MAX_SCOPES, MAX_TARGET_ENTRIES,
};

/// Index 0: enforcer port and mark.
#[map]
pub static PC_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Guarded cgroups (by cgroup id) and their scope settings.
#[map]
pub static PC_SCOPES: HashMap<u64, ScopeInfo> = HashMap::with_max_entries(MAX_SCOPES, 0);

/// Declared target addresses.
#[map]
pub static PC_TARGETS: LpmTrie<TargetKey, TargetInfo> = LpmTrie::with_max_entries(MAX_TARGET_ENTRIES, 0);

/// Per-scope exceptions to `egress = "deny"`.
#[map]
pub static PC_EGRESS: LpmTrie<EgressKey, u8> = LpmTrie::with_max_entries(MAX_EGRESS_ENTRIES, 0);

/// Records by socket cookie, from connect() until sock_ops knows the port.
#[map]
pub static PC_PENDING: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

/// Records by the client's (address, port), read and deleted on accept.
#[map]
pub static PC_CONNS: LruHashMap<ClientKey, ConnRecord> = LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

/// Refusals made in the kernel, for the audit log.
#[map]
pub static PC_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// The original destination of each redirected socket, for getpeername.
#[btf_map]
pub static PC_ORIG_DST: SkStorage<OrigDst> = SkStorage::new();
