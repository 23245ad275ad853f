//! Reading and writing addresses in the `bpf_sock_addr` context.
use aya_ebpf::programs::SockAddrContext;
use portcullis_common::{mapped_v4, Addr16};

/// Destination port, network byte order. `user_port` is read with a volatile
/// load: the verifier only accepts full 4-byte loads of that field.
#[inline(always)]
pub fn user_port_be(ctx: &SockAddrContext) -> u16 {
    let port = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_port) };
    port as u16
}

#[inline(always)]
pub fn set_user_port_be(ctx: &SockAddrContext, port_be: u16) {
    unsafe { (*ctx.sock_addr).user_port = port_be as u32 };
}

/// IPv4 destination in mapped form.
#[inline(always)]
pub fn user_addr4(ctx: &SockAddrContext) -> Addr16 {
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    mapped_v4(ip.to_ne_bytes())
}

/// IPv6 destination, copied word by word as the verifier requires.
#[inline(always)]
pub fn user_addr6(ctx: &SockAddrContext) -> Addr16 {
    let sa = ctx.sock_addr;
    let w0 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[0]) }.to_ne_bytes();
    let w1 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[1]) }.to_ne_bytes();
    let w2 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[2]) }.to_ne_bytes();
    let w3 = unsafe { core::ptr::read_volatile(&(*sa).user_ip6[3]) }.to_ne_bytes();
    [w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0], w3[1], w3[2], w3[3]]
}

#[inline(always)]
pub fn set_user_addr4(ctx: &SockAddrContext, addr: &Addr16) {
    let ip = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    unsafe { (*ctx.sock_addr).user_ip4 = ip };
}

#[inline(always)]
pub fn set_user_addr6(ctx: &SockAddrContext, addr: &Addr16) {
    let sa = ctx.sock_addr;
    unsafe {
        (*sa).user_ip6[0] = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        (*sa).user_ip6[1] = u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]);
        (*sa).user_ip6[2] = u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]);
        (*sa).user_ip6[3] = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    }
}

pub const LOOPBACK_V4: Addr16 = mapped_v4([127, 0, 0, 1]);
pub const LOOPBACK_V6: Addr16 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// What a destination means: `0.0.0.0` is 127.0.0.1 and `::` is ::1 to
/// connect(2); anything else is itself.
#[inline(always)]
pub fn local_meaning(addr: Addr16) -> Addr16 {
    if portcullis_common::is_mapped_v4(&addr) {
        if addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0 {
            return LOOPBACK_V4;
        }
        return addr;
    }
    let mut i = 0;
    while i < 16 {
        if addr[i] != 0 {
            return addr;
        }
        i += 1;
    }
    LOOPBACK_V6
}

/// Addresses on which a connect reaches the enforcer's listener (it binds
/// 127.0.0.1 and ::1; the unspecified address also connects locally).
#[inline(always)]
pub fn reaches_local_listener(addr: &Addr16) -> bool {
    let mapped = portcullis_common::is_mapped_v4(addr);
    if mapped {
        // 127.0.0.0/8 and 0.0.0.0
        return addr[12] == 127 || (addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0);
    }
    let mut i = 0;
    while i < 15 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    // ::1 and ::
    addr[15] == 1 || addr[15] == 0
}
