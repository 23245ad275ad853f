//! Runtime settings of `portcullis run` (paths, ports), as opposed to the
//! policy, which says what is allowed.
use std::{net::SocketAddr, path::PathBuf};

/// A privileged port: while portcullis is down, no unprivileged process can
/// take it and receive the connections the probes send there.
pub const DEFAULT_LISTEN_PORT: u16 = 744;
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";
/// `SO_MARK` of the enforcer's own sockets ("PCU").
pub const DEFAULT_MARK: u32 = 0x0050_4355;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub policy: Option<PathBuf>,
    pub listen_port: u16,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Group (gid) allowed to use the control socket besides root.
    pub control_group: Option<u32>,
    pub bpf_object: Option<PathBuf>,
    pub mark: u32,
    pub audit: crate::audit::AuditConfig,
    /// Loopback address of the Prometheus endpoint; None: no endpoint.
    pub metrics: Option<SocketAddr>,
    /// Connection worker threads; 0: one per CPU.
    pub workers: usize,
}

/// The eBPF object embedded at build time (empty when built without it).
pub fn embedded_object() -> &'static [u8] {
    // ELF parsing needs the bytes aligned.
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis.bpf.o"))
}
