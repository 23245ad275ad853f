//! `sock_ops` on TCP_CONNECT_CB: the client's source port is now known and
//! the SYN has not left, so re-key the connect-time record by the client's
//! (address, port), which is what the enforcer sees on accept.
use core::ptr::read_volatile;

use aya_ebpf::{helpers::bpf_get_socket_cookie, macros::sock_ops, programs::SockOpsContext};
use portcullis_common::{mapped_v4, ClientKey, AF_INET};

use crate::maps::{PC_CONNS, PC_PENDING};

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;

#[sock_ops]
pub fn pc_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(record) = (unsafe { PC_PENDING.get(&cookie) }) else {
        return 1;
    };
    let record = *record;
    // Every context field is read once, unconditionally, with a volatile
    // load: the verifier only accepts context reads at a constant offset
    // from the context pointer, and branches invite the compiler to merge
    // them into a computed pointer.
    let ops = ctx.ops;
    let (family, ip4, w0, w1, w2, w3, port) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).local_ip6[0]),
            read_volatile(&(*ops).local_ip6[1]),
            read_volatile(&(*ops).local_ip6[2]),
            read_volatile(&(*ops).local_ip6[3]),
            read_volatile(&(*ops).local_port),
        )
    };
    let addr = if family == AF_INET as u32 {
        mapped_v4(ip4.to_ne_bytes())
    } else {
        let (a, b, c, d) = (w0.to_ne_bytes(), w1.to_ne_bytes(), w2.to_ne_bytes(), w3.to_ne_bytes());
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
    };
    let port = port as u16;
    let key = ClientKey { addr, port, _pad: 0 };
    let _ = PC_CONNS.insert(&key, &record, 0);
    let _ = PC_PENDING.remove(&cookie);
    1
}
