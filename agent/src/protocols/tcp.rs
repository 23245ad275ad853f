//! Opaque TCP: allow, deny or hold the connection, then relay bytes both ways,
//! passing each side's half-close on to the other.
//!
//! Each direction of the relay starts by reading into a small buffer and
//! writing it out: for the short messages of request/response traffic that
//! is the cheapest way (one read, one write). A direction whose reads keep
//! filling the buffer is a bulk transfer: it switches to splice(2) through a
//! pipe, where the kernel hands the received socket buffers' pages to the
//! other socket and portcullis never copies the payload; when its transfers
//! turn small again, it switches back. Without a pipe (file descriptors
//! exhausted) a direction stays with the buffer, with the same semantics.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use nix::{
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    sys::socket::{send, shutdown, MsgFlags, Shutdown},
};
use tokio::{io::Interest, net::TcpStream};
use tracing::{debug, warn};

use super::{connect_upstream, Outcome, Session};
use crate::{
    approvals::HoldRequest,
    audit::{DecisionInfo, Event, RequestInfo},
    enforcer::{HeldGauge, Stats},
    policy::{Decision, Verdict},
};

/// Bytes a relay pipe holds: large enough that a bulk transfer moves several
/// socket buffers' worth per system call. Pipe pages are only referenced
/// while data passes, not allocated up front.
const PIPE_SIZE: usize = 1 << 20;
/// The buffer of a direction that is not (or not yet) bulk.
const BUFFER_SIZE: usize = 16 * 1024;
/// A direction whose splices move less than this, this many times in a
/// row, goes back to the buffer.
const SMALL_SPLICE: usize = BUFFER_SIZE / 4;
const SMALL_SPLICES: u32 = 8;

pub async fn serve(session: &Session, client: TcpStream, admission: Decision) -> Outcome {
    match admission.verdict {
        Verdict::Allow => {}
        Verdict::Deny => {
            // No protocol to explain in: the caller sees its connection closed.
            return Outcome::reason(format!("denied: {}", admission.reason));
        }
        Verdict::Approve => {
            if let Err(why) = hold(session, &client, &admission).await {
                return Outcome::reason(why);
            }
        }
    }
    let upstream = match connect_upstream(session).await {
        Ok(u) => u,
        Err(e) => {
            Stats::inc(&session.enforcer.stats.upstream_failures);
            warn!(session = %session.id, target = %session.target.name, error = %e, "upstream connect failed");
            return Outcome::reason(format!("upstream connect failed: {e}"));
        }
    };
    let _ = client.set_nodelay(true);
    let r = relay(&client, &upstream).await;
    Stats::add(&session.enforcer.stats.bytes_up, r.up);
    Stats::add(&session.enforcer.stats.bytes_down, r.down);
    let reason = match r.error {
        None => "closed".into(),
        Some(e) => format!("relay error: {e}"),
    };
    Outcome { reason, bytes_up: r.up, bytes_down: r.down }
}

/// What a relay moved, and why it stopped early if it did.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes delivered from the client to the upstream.
    pub up: u64,
    /// Bytes delivered from the upstream to the client.
    pub down: u64,
    /// The first error on either side; `None` when both sides closed.
    pub error: Option<io::Error>,
}

/// Relays both ways until each side has half-closed (each half-close is
/// passed on), or until the first error on either side. Byte counts are of
/// what was delivered, errors included.
pub async fn relay(client: &TcpStream, upstream: &TcpStream) -> Relayed {
    both_ways(client, upstream, &mut Adaptive::new(), &mut Adaptive::new()).await
}

async fn both_ways<C: Conduit>(client: &TcpStream, upstream: &TcpStream, a: &mut C, b: &mut C) -> Relayed {
    let (mut up, mut down) = (0, 0);
    let res = tokio::try_join!(one_way(client, upstream, a, &mut up), one_way(upstream, client, b, &mut down));
    Relayed { up, down, error: res.err() }
}

/// Moves bytes from `from` to `to` until `from` half-closes, then half-closes
/// `to`. `moved` counts bytes handed to `to`'s socket.
async fn one_way<C: Conduit>(from: &TcpStream, to: &TcpStream, c: &mut C, moved: &mut u64) -> io::Result<()> {
    loop {
        let n = from.async_io(Interest::READABLE, || c.fill(from)).await?;
        if n == 0 {
            return match shutdown(to.as_raw_fd(), Shutdown::Write) {
                // The other side is already gone: nothing left to tell it.
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        while c.pending() > 0 {
            let n = to.async_io(Interest::WRITABLE, || c.drain(to)).await?;
            *moved += n as u64;
        }
    }
}

/// Where bytes wait between the two sockets.
trait Conduit {
    /// Takes what `from` has; 0 at the end of its stream. Called only when
    /// empty, so `WouldBlock` always means `from` has nothing yet.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize>;
    /// Hands some of what is held to `to`.
    fn drain(&mut self, to: &TcpStream) -> io::Result<usize>;
    fn pending(&self) -> usize;
}

/// A buffer while messages are small, a pipe (splice) while a bulk transfer
/// lasts. Modes change only when nothing is pending.
struct Adaptive {
    buffer: Buffer,
    /// Set while splicing; kept (empty) when back on the buffer.
    pipe: Option<Pipe>,
    splicing: bool,
    /// Splices in a row that moved little.
    small: u32,
    /// No pipe could be made: stay on the buffer.
    no_pipe: bool,
}

impl Adaptive {
    fn new() -> Adaptive {
        Adaptive { buffer: Buffer::new(), pipe: None, splicing: false, small: 0, no_pipe: false }
    }
}

impl Conduit for Adaptive {
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        if self.splicing {
            let pipe = self.pipe.as_mut().expect("a pipe while splicing");
            let n = pipe.fill(from)?;
            self.small = if n < SMALL_SPLICE { self.small + 1 } else { 0 };
            if n > 0 && self.small >= SMALL_SPLICES {
                // What this fill took is drained from the pipe first.
                self.splicing = false;
                self.small = 0;
            }
            return Ok(n);
        }
        let n = self.buffer.fill(from)?;
        if n == self.buffer.buf.len() && !self.no_pipe {
            // A full buffer: more is waiting. Splice from the next fill on.
            if self.pipe.is_none() {
                match Pipe::new() {
                    Ok(p) => self.pipe = Some(p),
                    Err(e) => {
                        debug!(error = %e, "no pipe for splice(2); relaying through a buffer");
                        self.no_pipe = true;
                    }
                }
            }
            self.splicing = self.pipe.is_some();
        }
        Ok(n)
    }

    fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        // Whichever holds the pending bytes: the buffer's are always older
        // than any in the pipe, and only one holds any at a time.
        if self.buffer.pending() > 0 {
            return self.buffer.drain(to);
        }
        match &mut self.pipe {
            Some(p) if p.pending() > 0 => p.drain(to),
            _ => Ok(0),
        }
    }

    fn pending(&self) -> usize {
        self.buffer.pending() + self.pipe.as_ref().map_or(0, Pipe::pending)
    }
}

/// A pipe that splice(2) moves socket pages through.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    size: usize,
    pending: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Larger than the default 64 KiB where allowed; whatever the kernel
        // grants is fine.
        let size = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |n| n as usize);
        Ok(Pipe { r, w, size, pending: 0 })
    }
}

impl Conduit for Pipe {
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let n = splice(from.as_fd(), None, &self.w, None, self.size, flags)?;
        self.pending += n;
        Ok(n)
    }

    fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let n = splice(&self.r, None, to.as_fd(), None, self.pending, flags)?;
        self.pending -= n;
        Ok(n)
    }

    fn pending(&self) -> usize {
        self.pending
    }
}

/// The fallback: read into and write from a buffer.
struct Buffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buffer {
    fn new() -> Buffer {
        Buffer { buf: vec![0; BUFFER_SIZE].into_boxed_slice(), start: 0, end: 0 }
    }
}

impl Conduit for Buffer {
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        let n = nix::unistd::read(from, &mut self.buf)?;
        (self.start, self.end) = (0, n);
        Ok(n)
    }

    fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        let n = send(to.as_raw_fd(), &self.buf[self.start..self.end], MsgFlags::MSG_NOSIGNAL)?;
        self.start += n;
        Ok(n)
    }

    fn pending(&self) -> usize {
        self.end - self.start
    }
}

/// Holds the connection (nothing is sent upstream) until a human answers.
/// The approved decision is on disk before the first byte is relayed.
async fn hold(session: &Session, client: &TcpStream, admission: &Decision) -> Result<(), String> {
    let enforcer = &session.enforcer;
    let ticket = enforcer.approvals.submit(HoldRequest {
        session: session.id,
        caller: session.caller.clone(),
        role: session.role.clone(),
        target: session.target.name.clone(),
        protocol: "tcp".into(),
        request: format!("connect to {} (target {})", session.orig_dst, session.target.name),
        shape: format!("connect {}", session.target.name),
        rule: admission.rule.clone(),
        timeout: admission.approval_timeout,
    });
    let gauge = (!ticket.is_settled()).then(|| HeldGauge::new(&enforcer.stats));
    let outcome = enforcer.approvals.wait(ticket, caller_gone(client)).await;
    drop(gauge);
    let approved = outcome.approved();
    let decision = Decision {
        verdict: if approved { Verdict::Allow } else { Verdict::Deny },
        reason: format!("{}: {}", admission.reason, outcome.describe()),
        ..admission.clone()
    };
    let event = Event::Decision {
        session: session.id,
        request: RequestInfo::Tcp { classes: vec!["connect".into()] },
        decision: DecisionInfo::from(&decision),
    };
    if approved {
        Stats::inc(&enforcer.stats.allowed);
        enforcer.audit.record_durable(event).await.map_err(|e| format!("audit write failed: {e}"))?;
        Ok(())
    } else {
        Stats::inc(&enforcer.stats.denied);
        enforcer.audit.record(event);
        Err(format!("denied: {}", outcome.describe()))
    }
}

/// Resolves when the caller closes its side of the connection (FIN or
/// reset; seen through EPOLLRDHUP even while data it sent is still queued
/// for the upstream). A caller that half-closes while held counts as gone.
pub async fn caller_gone(client: &TcpStream) {
    loop {
        match client.ready(tokio::io::Interest::READABLE).await {
            Ok(r) if r.is_read_closed() || r.is_error() => return,
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// caller <-> [client | relay | upstream] <-> server
    async fn through<C: Conduit + Send + 'static>(
        mk: fn() -> C,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Relayed>) {
        let (caller, client) = pair().await;
        let (upstream, server) = pair().await;
        let task = tokio::spawn(async move {
            let (mut a, mut b) = (mk(), mk());
            both_ways(&client, &upstream, &mut a, &mut b).await
        });
        (caller, server, task)
    }

    fn pipe() -> Pipe {
        Pipe::new().unwrap()
    }

    async fn bulk_and_half_close<C: Conduit + Send + 'static>(mk: fn() -> C) {
        let (mut caller, mut server, task) = through(mk).await;
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        // The server reads to the caller's half-close, then answers: the
        // caller's half-close must arrive, and the answer must still flow.
        let srv = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        caller.write_all(&up).await.unwrap();
        caller.shutdown().await.unwrap();
        let mut back = Vec::new();
        caller.read_to_end(&mut back).await.unwrap();
        assert!(srv.await.unwrap() == up2, "upstream got every byte in order");
        assert!(back == down, "caller got every byte in order");
        let r = task.await.unwrap();
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!((r.up, r.down), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn splice_relays_everything_and_passes_half_closes_on() {
        bulk_and_half_close(pipe).await;
    }

    #[tokio::test]
    async fn buffer_relays_everything_and_passes_half_closes_on() {
        bulk_and_half_close(Buffer::new).await;
    }

    #[tokio::test]
    async fn adaptive_relays_everything_and_passes_half_closes_on() {
        bulk_and_half_close(Adaptive::new).await;
    }

    /// Small messages, a bulk transfer, small messages again, one way:
    /// every byte arrives in order, the bulk goes through the pipe and the
    /// direction is back on the buffer at the end.
    #[tokio::test]
    async fn adaptive_splices_bulk_and_returns_to_the_buffer() {
        let (mut caller, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let task = tokio::spawn(async move {
            let mut c = Adaptive::new();
            let mut moved = 0;
            let r = one_way(&client, &upstream, &mut c, &mut moved).await;
            (r, moved, c)
        });
        let mut sent = Vec::new();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        for i in 0..20u8 {
            caller.write_all(&[i; 100]).await.unwrap();
            sent.extend_from_slice(&[i; 100]);
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let bulk: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        caller.write_all(&bulk).await.unwrap();
        sent.extend_from_slice(&bulk);
        for i in 0..40u8 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            caller.write_all(&[i; 10]).await.unwrap();
            sent.extend_from_slice(&[i; 10]);
        }
        caller.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        let (r, moved, c) = task.await.unwrap();
        r.unwrap();
        assert!(got == sent, "every byte, in order");
        assert_eq!(moved, sent.len() as u64);
        assert!(c.pipe.is_some(), "the bulk was spliced");
        assert!(!c.splicing, "small messages went back to the buffer");
    }

    #[tokio::test]
    async fn small_round_trips_are_not_held_back() {
        let (mut caller, mut server, task) = through(pipe).await;
        for i in 0..100u8 {
            caller.write_all(&[i; 7]).await.unwrap();
            let mut b = [0u8; 7];
            server.read_exact(&mut b).await.unwrap();
            server.write_all(&b).await.unwrap();
            caller.read_exact(&mut b).await.unwrap();
            assert_eq!(b, [i; 7]);
        }
        drop(caller);
        drop(server);
        let r = task.await.unwrap();
        assert_eq!((r.up, r.down), (700, 700));
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error_and_keeps_the_counts() {
        let (mut caller, server, task) = through(pipe).await;
        caller.write_all(b"hello").await.unwrap();
        let mut server = server;
        let mut b = [0u8; 5];
        server.read_exact(&mut b).await.unwrap();
        // Close with unread data pending: the kernel answers with a reset.
        caller.write_all(b"more").await.unwrap();
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::Linger, &linger).unwrap();
        drop(server);
        let r = task.await.unwrap();
        assert!(r.error.is_some(), "{r:?}");
        assert!(r.up >= 5, "{r:?}");
        let mut rest = Vec::new();
        // The caller's connection ends too (closed or reset).
        let _ = caller.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }
}
