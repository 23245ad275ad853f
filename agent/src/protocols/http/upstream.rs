//! The upstream side: a pooled hyper client per target (connections are
//! reused across requests and sessions; across callers only when the
//! target injects the credentials), whose connector opens marked
//! sockets to the target's upstream and speaks verified TLS when the target
//! asks for it, negotiating HTTP/2 or HTTP/1.1 by ALPN.
use std::{
    cell::RefCell,
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client,
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::body::Body;
use crate::{
    enforcer::Settings,
    ids::OrigDst,
    policy::{Target, TargetTls, Upstream},
    protocols::{connect_to, UpstreamError},
    tls::{client_config, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("TLS to upstream: {0}")]
    Tls(io::Error),
    #[error("upstream TLS configuration: {0}")]
    Config(#[from] TlsError),
    #[error("`{0}` is not a valid TLS server name for the upstream")]
    ServerName(String),
}

/// What a connection to a target's upstream needs.
#[derive(Clone)]
pub struct Endpoint {
    pub target: String,
    pub upstream: Upstream,
    pub orig_dst: OrigDst,
    pub settings: Settings,
    /// TLS connector and the name the certificate is checked against.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Endpoint {
    /// The endpoint of `target` for a connection that asked for `orig_dst`;
    /// `alpn` is offered to a TLS upstream.
    pub fn new(target: &Target, orig_dst: OrigDst, settings: &Settings, alpn: &[&[u8]]) -> Result<Self, ConnectError> {
        let tls = if target.tls.upstream {
            let cfg = client_config(target.tls.ca.as_deref(), alpn)?;
            let name = server_name(target, orig_dst);
            let sn = ServerName::try_from(name.clone()).map_err(|_| ConnectError::ServerName(name))?;
            Some((TlsConnector::from(cfg), sn))
        } else {
            None
        };
        Ok(Endpoint {
            target: target.name.clone(),
            upstream: target.upstream.clone(),
            orig_dst,
            settings: settings.clone(),
            tls,
        })
    }

    /// Opens a connection (TCP, then TLS if configured).
    pub async fn connect(&self) -> Result<Conn, ConnectError> {
        let tcp = connect_to(&self.upstream, self.orig_dst, &self.settings, &self.target).await?;
        match &self.tls {
            None => Ok(Conn::Plain(TokioIo::new(tcp))),
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.map_err(ConnectError::Tls)?;
                Ok(Conn::Tls(Box::new(TokioIo::new(tls))))
            }
        }
    }
}

/// The name an upstream's certificate must carry: `tls.server_name`, else
/// the target's first (non-wildcard) host, else the upstream's host or
/// address.
pub fn server_name(target: &Target, orig_dst: OrigDst) -> String {
    if let Some(n) = &target.tls.server_name {
        return n.clone();
    }
    if let Some(h) = target.hosts.iter().find(|h| !h.starts_with("*.")) {
        return h.clone();
    }
    match &target.upstream {
        Upstream::Host { host, .. } => host.clone(),
        Upstream::Addr(a) => a.ip().to_string(),
        Upstream::Original => orig_dst.0.ip().to_canonical().to_string(),
    }
}

/// A connection to an upstream.
pub enum Conn {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Conn {
    pub fn is_h2(&self) -> bool {
        match self {
            Conn::Plain(_) => false,
            Conn::Tls(t) => t.inner().get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.is_h2() {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl Read for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The connector the pooled client uses: every URI goes to the endpoint
/// (the URI only names the pool).
#[derive(Clone)]
pub struct Connector(Arc<Endpoint>);

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let ep = self.0.clone();
        Box::pin(async move { ep.connect().await })
    }
}

pub type PooledClient = Client<Connector, Body>;

/// What makes two targets' connections interchangeable.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    target: String,
    upstream: String,
    /// The dialled address, when the upstream is "where the caller asked".
    orig_dst: Option<OrigDst>,
    tls: Option<(Option<std::path::PathBuf>, Option<String>, Vec<String>)>,
    mark: u32,
    /// Whose connections these are, when callers authenticate themselves.
    owner: Option<String>,
}

/// At most this many pools are kept; past it the map starts afresh (idle
/// connections close on their own).
const MAX_POOLS: usize = 256;

thread_local! {
    /// Pools per connection worker: a pooled connection's task runs on the
    /// worker that opened it, so requests of that worker's sessions never
    /// wait on another thread.
    static POOLS: RefCell<HashMap<PoolKey, PooledClient>> = RefCell::new(HashMap::new());
}

/// The pooled client for a target, shared by all its sessions on this
/// worker (by those of one `owner` only, when given).
pub fn client_for(
    target: &Target,
    orig_dst: OrigDst,
    settings: &Settings,
    owner: Option<String>,
) -> Result<PooledClient, ConnectError> {
    let key = PoolKey {
        owner,
        target: target.name.clone(),
        upstream: format!("{:?}", target.upstream),
        orig_dst: (target.upstream == Upstream::Original).then_some(orig_dst),
        tls: target.tls.upstream.then(|| tls_key(&target.tls, target)),
        mark: settings.mark,
    };
    if let Some(c) = POOLS.with_borrow(|p| p.get(&key).cloned()) {
        return Ok(c);
    }
    let endpoint = Endpoint::new(target, orig_dst, settings, &[b"h2", b"http/1.1"])?;
    let client = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(Connector(Arc::new(endpoint)));
    POOLS.with_borrow_mut(|map| {
        if map.len() >= MAX_POOLS {
            map.clear();
        }
        map.insert(key, client.clone());
    });
    Ok(client)
}

fn tls_key(tls: &TargetTls, target: &Target) -> (Option<std::path::PathBuf>, Option<String>, Vec<String>) {
    (tls.ca.clone(), tls.server_name.clone(), target.hosts.clone())
}
