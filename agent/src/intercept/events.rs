//! Refusals made in the kernel (egress deny, UDP to a target, the
//! enforcer's port dialled directly, a raw socket under egress deny), read
//! from the ring buffer and recorded.
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use portcullis_common::*;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::attribution;
use crate::{
    audit::Event,
    enforcer::{Enforcer, Stats},
};

pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        EVENT_EGRESS_DENIED => "egress_denied",
        EVENT_ENFORCER_DIRECT => "enforcer_port_direct",
        EVENT_NON_TCP_TO_TARGET => "non_tcp_to_target",
        EVENT_NOT_CONFIGURED => "enforcer_not_configured",
        EVENT_MAP_FULL => "record_map_full",
        EVENT_RAW_SOCKET => "raw_socket",
        _ => "unknown",
    }
}

pub async fn run(ring: RingBuf<MapData>, enforcer: Arc<Enforcer>) {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd lives.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot watch the kernel event ring; kernel refusals will not be recorded");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "kernel event ring failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<KernelEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a KernelEvent (repr(C), plain data).
            let ev: KernelEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            record(&enforcer, &ev);
        }
        guard.clear_ready();
    }
}

fn record(enforcer: &Enforcer, ev: &KernelEvent) {
    Stats::inc(&enforcer.stats.kernel_refusals);
    // A caller looping on a refused connect must not fill the log (nor
    // spend the enforcer's time on attribution): past the rate, counted.
    if !enforcer.refusal_gate.admit(std::time::Instant::now()) {
        return;
    }
    let policy = enforcer.policy();
    let caller = attribution::caller(&ev.record, &enforcer.cgroups, &policy);
    let dst = attribution::orig_dst(&ev.record);
    let transport = match ev.proto {
        IPPROTO_TCP => "tcp".to_string(),
        IPPROTO_UDP => "udp".to_string(),
        p => format!("ip-proto-{p}"),
    };
    warn!(kind = kind_name(ev.kind), transport = %transport, dst = %dst, tgid = caller.tgid, uid = caller.uid,
          comm = %caller.comm, unit = caller.unit.as_deref().unwrap_or("-"), scope = caller.scope.as_deref().unwrap_or("-"),
          "kernel refused");
    enforcer.audit.record(Event::KernelRefusal { kind: kind_name(ev.kind).into(), transport, dst, caller });
}
