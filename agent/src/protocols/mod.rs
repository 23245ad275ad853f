//! Protocol modules: each terminates the caller's side, opens the upstream
//! side, and decides request by request. `tcp` is opaque: one decision per
//! connection.
pub mod git;
pub mod http;
pub mod postgres;
pub mod tcp;

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::{lookup_host, TcpSocket, TcpStream};

use crate::{
    audit::CallerInfo,
    enforcer::{Enforcer, Settings},
    ids::{OrigDst, SessionId},
    policy::{Decision, Protocol, Target, Upstream},
};

/// Everything a protocol module knows about one accepted connection.
pub struct Session {
    pub id: SessionId,
    pub caller: CallerInfo,
    pub orig_dst: OrigDst,
    pub target: Target,
    pub role: Option<String>,
    pub enforcer: Arc<Enforcer>,
}

/// How a session ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reason: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Outcome {
    pub fn reason(r: impl Into<String>) -> Outcome {
        Outcome { reason: r.into(), ..Outcome::default() }
    }
}

/// Runs the protocol of the session's target. `admission` is the session-
/// level decision, already recorded; protocols that can say why in their
/// own terms (an SQL error, an HTTP 403) do so before closing.
pub async fn serve(session: &Session, client: TcpStream, admission: Decision) -> Outcome {
    match session.target.protocol {
        Protocol::Tcp => tcp::serve(session, client, admission).await,
        Protocol::Http => http::serve(session, client, admission).await,
        Protocol::Postgres => postgres::serve(session, client, admission).await,
        Protocol::Git => git::serve(session, client, admission).await,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve upstream {0}: {1}")]
    Resolve(String, io::Error),
    #[error("upstream {0} is portcullis' own listener")]
    Loop(SocketAddr),
    #[error("cannot connect to upstream {0}: {1}")]
    Connect(SocketAddr, io::Error),
}

/// Where the session's upstream is.
pub async fn upstream_addrs(session: &Session) -> Result<Vec<SocketAddr>, UpstreamError> {
    resolve_upstream(&session.target.upstream, session.orig_dst).await
}

/// Where an upstream is, for a connection that asked for `orig_dst`.
pub async fn resolve_upstream(upstream: &Upstream, orig_dst: OrigDst) -> Result<Vec<SocketAddr>, UpstreamError> {
    let addrs = match upstream {
        Upstream::Original => vec![orig_dst.0],
        Upstream::Addr(a) => vec![*a],
        Upstream::Host { host, port } => lookup_host((host.as_str(), *port))
            .await
            .map_err(|e| UpstreamError::Resolve(format!("{host}:{port}"), e))?
            .collect(),
    };
    Ok(addrs)
}

/// Opens the upstream connection, marked so the kernel programs never
/// redirect it, and never to portcullis' own listener (no loops).
pub async fn connect_upstream(session: &Session) -> Result<TcpStream, UpstreamError> {
    connect_to(&session.target.upstream, session.orig_dst, &session.enforcer.settings, &session.target.name).await
}

/// Opens a marked connection to `upstream` (see `connect_upstream`);
/// `name` names the target in errors.
pub async fn connect_to(
    upstream: &Upstream,
    orig_dst: OrigDst,
    settings: &Settings,
    name: &str,
) -> Result<TcpStream, UpstreamError> {
    let addrs = resolve_upstream(upstream, orig_dst).await?;
    let port = settings.listen_port;
    let mut last = None;
    for addr in addrs {
        let ip = addr.ip().to_canonical();
        if addr.port() == port && (ip.is_loopback() || ip.is_unspecified()) {
            return Err(UpstreamError::Loop(addr));
        }
        let addr = SocketAddr::new(ip, addr.port());
        match connect_marked(addr, settings.mark).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(UpstreamError::Connect(addr, e)),
        }
    }
    Err(last.unwrap_or_else(|| UpstreamError::Resolve(name.to_string(), io::Error::other("no address"))))
}

pub async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if mark != 0 {
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &mark).map_err(io::Error::from)?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
