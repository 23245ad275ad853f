//! `sock_create`: in an `egress = "deny"` scope, raw sockets and ICMP
//! sockets are refused. They send to any address without a connect or a
//! UDP sendmsg that the other programs see, so egress deny would not hold.
use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use portcullis_common::{KernelEvent, EVENT_RAW_SOCKET, SCOPE_EGRESS_DENY};

use crate::{
    connect::{find_scope, new_record},
    maps::PC_EVENTS,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0; // socket() fails with EPERM
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;

#[cgroup_sock(sock_create)]
pub fn pc_sock_create(ctx: SockContext) -> i32 {
    let Some(scope) = find_scope() else { return ALLOW };
    if scope.flags & SCOPE_EGRESS_DENY == 0 {
        return ALLOW;
    }
    let (family, sock_type, protocol) = unsafe {
        let sk = &*ctx.sock;
        (sk.family, sk.type_, sk.protocol)
    };
    if sock_type != SOCK_RAW && protocol != IPPROTO_ICMP && protocol != IPPROTO_ICMPV6 {
        return ALLOW;
    }
    let record = new_record(&ctx, &scope, &[0; 16], 0, family as u16);
    let event = KernelEvent { kind: EVENT_RAW_SOCKET, proto: protocol as u8, _pad: [0; 3], record };
    // A full ring loses the report, not the refusal.
    let _ = PC_EVENTS.output::<KernelEvent>(&event, 0);
    REFUSE
}
