//! `connect4/6` and `sendmsg4/6`: redirect TCP connects to declared targets to
//! the enforcer, enforce each scope's egress setting, and report refusals.
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
    EbpfContext,
};
use portcullis_common::{
    is_mapped_v4, Addr16, Config, ConnRecord, EgressKey, KernelEvent, OrigDst, ScopeInfo, TargetInfo, TargetKey,
    AF_INET, AF_INET6, BORN_SHIFT, EGRESS_KEY_FIXED_BITS, EVENT_EGRESS_DENIED, EVENT_ENFORCER_DIRECT, EVENT_MAP_FULL,
    EVENT_NON_TCP_TO_TARGET, EVENT_NOT_CONFIGURED, IPPROTO_TCP, IPPROTO_UDP, MAX_CGROUP_DEPTH, SCOPE_EGRESS_DENY,
    TARGET_DENY_NON_TCP, TARGET_KEY_FIXED_BITS,
};

use crate::{addr::*, maps::*};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0; // the syscall fails with EPERM
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn pc_connect4(ctx: SockAddrContext) -> i32 {
    let addr = user_addr4(&ctx);
    handle(&ctx, addr, user_port_be(&ctx), AF_INET, true)
}

#[cgroup_sock_addr(connect6)]
pub fn pc_connect6(ctx: SockAddrContext) -> i32 {
    let addr = user_addr6(&ctx);
    handle(&ctx, addr, user_port_be(&ctx), AF_INET6, true)
}

/// Unconnected UDP (`sendto`): the same egress rules, no redirect.
#[cgroup_sock_addr(sendmsg4)]
pub fn pc_sendmsg4(ctx: SockAddrContext) -> i32 {
    let addr = user_addr4(&ctx);
    handle(&ctx, addr, user_port_be(&ctx), AF_INET, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pc_sendmsg6(ctx: SockAddrContext) -> i32 {
    let addr = user_addr6(&ctx);
    handle(&ctx, addr, user_port_be(&ctx), AF_INET6, false)
}

#[inline(always)]
fn handle(ctx: &SockAddrContext, addr: Addr16, port_be: u16, family: u16, connect: bool) -> i32 {
    // The unspecified address reaches the local host: decide it as the
    // loopback address it stands for (a target declared on 127.0.0.1 is
    // not reached around the enforcer through 0.0.0.0).
    let addr = local_meaning(addr);
    let Some(scope) = find_scope() else {
        // Not under any guarded scope (links exist only on scope cgroups,
        // so this is a cgroup the policy no longer names).
        return ALLOW;
    };
    let cfg = match PC_CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    };
    // The enforcer runs outside every guarded cgroup, so its own upstream
    // sockets never reach this program; its SO_MARK is kept in the config
    // for diagnostics only.
    let (sock_type, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.type_, sa.protocol)
    };
    let is_tcp = sock_type == SOCK_STREAM && protocol == IPPROTO_TCP as u32;
    let proto = if is_tcp { IPPROTO_TCP } else { protocol as u8 };
    let target = lookup_target(&addr, port_be);

    if is_tcp && connect {
        if cfg.enforcer_port != 0 && u16::from_be(port_be) == cfg.enforcer_port && reaches_local_listener(&addr) {
            report(ctx, EVENT_ENFORCER_DIRECT, proto, &scope, &addr, port_be, family);
            return REFUSE;
        }
        if let Some(t) = target {
            return redirect(ctx, &cfg, &scope, &t, addr, port_be, family);
        }
    } else if let Some(t) = target {
        // A declared target is reachable only through the enforcer: UDP and
        // other stream protocols (MPTCP, SCTP) to it are refused.
        if t.flags & TARGET_DENY_NON_TCP != 0 || (protocol != IPPROTO_UDP as u32) {
            report(ctx, EVENT_NON_TCP_TO_TARGET, proto, &scope, &addr, port_be, family);
            return REFUSE;
        }
    }
    if scope.flags & SCOPE_EGRESS_DENY != 0 && !egress_allowed(&scope, proto, &addr, port_be) {
        report(ctx, EVENT_EGRESS_DENIED, proto, &scope, &addr, port_be, family);
        return REFUSE;
    }
    ALLOW
}

/// The deepest guarded scope containing the calling task's cgroup.
#[inline(always)]
pub(crate) fn find_scope() -> Option<ScopeInfo> {
    let mut found: Option<ScopeInfo> = None;
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if let Some(s) = unsafe { PC_SCOPES.get(&id) } {
            found = Some(*s);
        }
        level += 1;
    }
    found
}

/// Exact port first, then the any-port entry.
#[inline(always)]
fn lookup_target(addr: &Addr16, port_be: u16) -> Option<TargetInfo> {
    let key = Key::new(TARGET_KEY_FIXED_BITS + 128, TargetKey { port: port_be.to_ne_bytes(), addr: *addr });
    if let Some(t) = PC_TARGETS.get(&key) {
        return Some(*t);
    }
    let any = Key::new(TARGET_KEY_FIXED_BITS + 128, TargetKey { port: [0, 0], addr: *addr });
    PC_TARGETS.get(&any).copied()
}

#[inline(always)]
fn egress_allowed(scope: &ScopeInfo, proto: u8, addr: &Addr16, port_be: u16) -> bool {
    let mut key = Key::new(
        EGRESS_KEY_FIXED_BITS + 128,
        EgressKey { scope_id: scope.scope_id.to_be_bytes(), proto, _pad: 0, port: port_be.to_ne_bytes(), addr: *addr },
    );
    if PC_EGRESS.get(&key).is_some() {
        return true;
    }
    key.data.port = [0, 0];
    PC_EGRESS.get(&key).is_some()
}

#[inline(always)]
pub(crate) fn new_record<C: EbpfContext>(
    ctx: &C,
    scope: &ScopeInfo,
    addr: &Addr16,
    port_be: u16,
    family: u16,
) -> ConnRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ConnRecord {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        orig: OrigDst { addr: *addr, port_be, family },
        target_id: 0,
        scope_id: scope.scope_id,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        born: (unsafe { bpf_ktime_get_ns() } >> BORN_SHIFT) as u32,
    }
}

#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    cfg: &Config,
    scope: &ScopeInfo,
    target: &TargetInfo,
    addr: Addr16,
    port_be: u16,
    family: u16,
) -> i32 {
    if cfg.enforcer_port == 0 {
        report(ctx, EVENT_NOT_CONFIGURED, IPPROTO_TCP, scope, &addr, port_be, family);
        return REFUSE;
    }
    let mut record = new_record(ctx, scope, &addr, port_be, family);
    record.target_id = target.target_id;
    let mut orig = record.orig;
    // Socket storage first: if either write fails the connect is refused,
    // never let through unredirected.
    let stored = unsafe { PC_ORIG_DST.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
    if stored.is_null() {
        report(ctx, EVENT_MAP_FULL, IPPROTO_TCP, scope, &addr, port_be, family);
        return REFUSE;
    }
    unsafe { *stored = orig };
    if PC_PENDING.insert(&record.cookie, &record, 0).is_err() {
        report(ctx, EVENT_MAP_FULL, IPPROTO_TCP, scope, &addr, port_be, family);
        return REFUSE;
    }
    if family == AF_INET {
        set_user_addr4(ctx, &LOOPBACK_V4);
    } else if is_mapped_v4(&addr) {
        set_user_addr6(ctx, &LOOPBACK_V4);
    } else {
        set_user_addr6(ctx, &LOOPBACK_V6);
    }
    set_user_port_be(ctx, cfg.enforcer_port.to_be());
    ALLOW
}

#[inline(always)]
fn report(ctx: &SockAddrContext, kind: u32, proto: u8, scope: &ScopeInfo, addr: &Addr16, port_be: u16, family: u16) {
    let event = KernelEvent { kind, proto, _pad: [0; 3], record: new_record(ctx, scope, addr, port_be, family) };
    // A full ring loses the report, not the refusal.
    let _ = PC_EVENTS.output::<KernelEvent>(&event, 0);
}
