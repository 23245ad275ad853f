//! `getpeername4/6`: a redirected socket reports the address its owner asked
//! for, so nothing in the caller can tell it was redirected.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{addr::*, maps::PC_ORIG_DST};

#[cgroup_sock_addr(getpeername4)]
pub fn pc_getpeername4(ctx: SockAddrContext) -> i32 {
    let orig = unsafe { PC_ORIG_DST.get_ptr_mut(&ctx) };
    if !orig.is_null() {
        let orig = unsafe { *orig };
        set_user_addr4(&ctx, &orig.addr);
        set_user_port_be(&ctx, orig.port_be);
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn pc_getpeername6(ctx: SockAddrContext) -> i32 {
    let orig = unsafe { PC_ORIG_DST.get_ptr_mut(&ctx) };
    if !orig.is_null() {
        let orig = unsafe { *orig };
        set_user_addr6(&ctx, &orig.addr);
        set_user_port_be(&ctx, orig.port_be);
    }
    1
}
