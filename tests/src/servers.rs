//! Real servers on loopback for the tests to reach through portcullis.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
};

/// A TCP server that answers each connection with `reply-prefix` + what it
/// read until the client's half-close, then closes. It counts connections.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start(bind: &str) -> EchoServer {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::Relaxed);
                thread::spawn(move || echo(stream));
            }
        });
        EchoServer { addr, connections, stop }
    }

    pub fn count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A TCP server that answers each line with `echo:<line>`, keeping the
/// connection open.
pub struct LineEchoServer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
}

impl LineEchoServer {
    pub fn start(bind: &str) -> LineEchoServer {
        use std::io::BufRead;
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let c = connections.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                c.fetch_add(1, Ordering::Relaxed);
                thread::spawn(move || {
                    let mut w = stream.try_clone().unwrap();
                    for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                        if w.write_all(format!("echo:{line}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        LineEchoServer { addr, connections }
    }

    pub fn count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// An HTTP/1.1 server that records the bodies POSTed to it (a webhook
/// receiver) and answers 200, or 500 for the first `fail_first` requests.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub bodies: Arc<std::sync::Mutex<Vec<String>>>,
}

impl WebhookReceiver {
    pub fn start(fail_first: usize) -> WebhookReceiver {
        use std::io::{BufRead, BufReader};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = bodies.clone();
        let seen = Arc::new(AtomicU64::new(0));
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, seen) = (b.clone(), seen.clone());
                thread::spawn(move || {
                    let mut w = stream.try_clone().unwrap();
                    let mut r = BufReader::new(stream);
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let n = seen.fetch_add(1, Ordering::Relaxed) as usize;
                    let status = if n < fail_first { "500 Internal Server Error" } else { "200 OK" };
                    b.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                    let _ = w.write_all(
                        format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                    );
                });
            }
        });
        WebhookReceiver { addr, bodies }
    }

    pub fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    /// Waits (`within` at most) until `n` bodies have arrived; returns all
    /// received then.
    pub fn wait_bodies(&self, n: usize, within: std::time::Duration) -> Vec<String> {
        let bodies = crate::fixtures::wait_until(within, || Some(self.bodies()).filter(|b| b.len() >= n));
        bodies.unwrap_or_else(|| panic!("the webhook got fewer than {n} bodies: {:?}", self.bodies()))
    }
}

fn echo(mut s: TcpStream) {
    let mut buf = Vec::new();
    if s.read_to_end(&mut buf).is_ok() {
        let _ = s.write_all(b"echo:");
        let _ = s.write_all(&buf);
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// One request an [`HttpServer`] saw.
#[derive(Debug, Clone, Default)]
pub struct SeenRequest {
    /// The connection it came on (its client address).
    pub peer: Option<std::net::SocketAddr>,
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    /// The host the request named: `:authority` (HTTP/2) or Host.
    pub authority: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes received (set when the body has been read).
    pub body_len: u64,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

#[derive(Default)]
struct HttpState {
    seen: std::sync::Mutex<Vec<SeenRequest>>,
    progress: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    gates: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>,
}

impl HttpState {
    fn gate(&self, id: &str) -> Arc<tokio::sync::Notify> {
        self.gates.lock().unwrap().entry(id.to_string()).or_default().clone()
    }
}

/// The byte at offset `i` of every generated body (`/bytes/N`), so clients
/// can check what they got without a copy.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// Sum of the pattern's first `n` bytes.
pub fn pattern_sum(n: u64) -> u64 {
    let full = n / 251;
    let rest = n % 251;
    full * (250 * 251 / 2) + rest * (rest.saturating_sub(1)) / 2
}

/// A real HTTP/1.1 + HTTP/2 server on loopback, plain or TLS with its own
/// test CA, that records every request it sees (headers included).
///
/// Routes: `GET /bytes/N[?gate=ID]` streams N pattern bytes (with a gate, it
/// stops halfway until `POST /release/ID`); `POST|PUT /upload[?id=ID]`
/// reads the body as it streams (progress at `GET /progress/ID`) and answers
/// `{"received":N,"sum":S}`; `GET /redirect?to=URL` answers 302; a
/// WebSocket upgrade on any path is accepted and echoes raw bytes; anything
/// else answers `{"method","path","query"}` as JSON.
pub struct HttpServer {
    pub addr: SocketAddr,
    /// The test CA's certificate (PEM file), for TLS servers.
    pub ca_file: Option<std::path::PathBuf>,
    state: Arc<HttpState>,
    _server: ServerThread,
    _dir: tempfile::TempDir,
}

impl HttpServer {
    /// Plain HTTP on `bind`.
    pub fn plain(bind: &str) -> HttpServer {
        HttpServer::start(bind, None)
    }

    /// HTTPS on `bind` with a certificate for `names` (DNS names or IPs)
    /// from a fresh test CA.
    pub fn tls(bind: &str, names: &[&str]) -> HttpServer {
        HttpServer::start(bind, Some(names))
    }

    fn start(bind: &str, names: Option<&[&str]>) -> HttpServer {
        let dir = tempfile::tempdir().unwrap();
        let (acceptor, ca_file) = test_tls(dir.path(), names);
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(HttpState::default());
        let st = state.clone();
        // Bodies stream in small writes whose timing tests watch: no Nagle.
        let server =
            ServerThread::accept_loop(listener, acceptor, true, move |conn, peer| serve_http(conn, peer, st.clone()));
        HttpServer { addr, ca_file, state, _server: server, _dir: dir }
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<SeenRequest> {
        self.requests().into_iter().filter(|r| r.uri.starts_with(prefix)).collect()
    }
}

/// A connection as a test server gets it: plain TCP, or TLS over it.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// The accept loop of [`HttpServer`] and [`GitServer`], on a two-worker
/// tokio runtime of its own thread. Dropping it stops the loop and waits
/// for the thread.
struct ServerThread {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Accepts on `listener`, completes the TLS handshake first when
    /// `acceptor` is set (a failed one drops the connection), and hands
    /// each connection and its peer address to `serve` on a task of its
    /// own. `nodelay` turns Nagle's algorithm off on accepted sockets.
    fn accept_loop<F, Fut>(
        listener: TcpListener,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        nodelay: bool,
        serve: F,
    ) -> ServerThread
    where
        F: Fn(Box<dyn Conn>, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        listener.set_nonblocking(true).unwrap();
        let serve = Arc::new(serve);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut rx = rx;
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        acc = listener.accept() => {
                            let Ok((stream, peer)) = acc else { continue };
                            if nodelay {
                                let _ = stream.set_nodelay(true);
                            }
                            let serve = serve.clone();
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                match acceptor {
                                    None => serve(Box::new(stream), peer).await,
                                    Some(a) => {
                                        if let Ok(tls) = a.accept(stream).await {
                                            serve(Box::new(tls), peer).await;
                                        }
                                    }
                                }
                            });
                        }
                    }
                }
            });
            rt.shutdown_background();
        });
        ServerThread { shutdown: Some(tx), thread: Some(thread) }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// For a TLS test server: a certificate for `names` from a fresh test CA,
/// whose own certificate is written to `dir/test-ca.pem`. Plain servers
/// (`names` None) get neither.
fn test_tls(
    dir: &std::path::Path,
    names: Option<&[&str]>,
) -> (Option<tokio_rustls::TlsAcceptor>, Option<std::path::PathBuf>) {
    let Some(names) = names else { return (None, None) };
    let (cfg, ca_pem) = test_tls_config(names);
    let ca_file = dir.join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    (Some(tokio_rustls::TlsAcceptor::from(cfg)), Some(ca_file))
}

/// A server configuration with a leaf for `names` signed by a fresh CA;
/// returns it and the CA's PEM.
pub fn test_tls_config(names: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "portcullis tests upstream CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::default();
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*n).try_into().unwrap()),
        })
        .collect();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let der_key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca_cert.der().clone()], der_key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (Arc::new(cfg), ca_cert.pem())
}

type TestBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

async fn serve_http<S>(stream: S, peer: std::net::SocketAddr, state: Arc<HttpState>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let st = state.clone();
        async move { Ok::<_, std::convert::Infallible>(route(req, peer, st).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let _ = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service).await;
}

fn text(status: u16, body: String) -> hyper::Response<TestBody> {
    use http_body_util::BodyExt;
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)).map_err(|e| match e {}).boxed())
        .unwrap()
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

async fn route(
    mut req: hyper::Request<hyper::body::Incoming>,
    peer: std::net::SocketAddr,
    st: Arc<HttpState>,
) -> hyper::Response<TestBody> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let seen = SeenRequest {
        peer: Some(peer),
        method: req.method().to_string(),
        uri: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| req.headers().get("host").map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()))
            .unwrap_or_default(),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body_len: 0,
    };
    let index = {
        let mut s = st.seen.lock().unwrap();
        s.push(seen);
        s.len() - 1
    };
    let is_ws = req.headers().get("upgrade").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if is_ws {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = hyper_util::rt::TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return hyper::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
    }
    let method = req.method().clone();
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else { return text(400, "{}".into()) };
        let gate = query_param(&query, "gate").map(|g| st.gate(g));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(2);
        tokio::spawn(async move {
            let half = if gate.is_some() { n / 2 } else { n };
            let send = |from: u64, to: u64| {
                let tx = tx.clone();
                async move {
                    let mut off = from;
                    while off < to {
                        let len = (to - off).min(64 * 1024);
                        let chunk: Vec<u8> = (off..off + len).map(pattern_byte).collect();
                        off += len;
                        if tx.send(Ok(hyper::body::Frame::data(chunk.into()))).await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            };
            if !send(0, half).await {
                return;
            }
            if let Some(g) = gate {
                g.notified().await;
            }
            send(half, n).await;
        });
        let body = http_body_util::StreamBody::new(tokio_stream(rx));
        return hyper::Response::builder()
            .status(200)
            .header("content-type", "application/octet-stream")
            .header("content-length", n.to_string())
            .body(body.boxed())
            .unwrap();
    }
    if path == "/upload" && (method == "POST" || method == "PUT") {
        let id = query_param(&query, "id").unwrap_or("").to_string();
        let mut body = req.into_body();
        let (mut n, mut sum) = (0u64, 0u64);
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return text(400, "{\"error\":\"body\"}".into()) };
            if let Some(d) = frame.data_ref() {
                n += d.len() as u64;
                sum = d.iter().fold(sum, |s, b| s.wrapping_add(*b as u64));
                st.progress.lock().unwrap().insert(id.clone(), n);
            }
        }
        st.seen.lock().unwrap()[index].body_len = n;
        return text(200, format!("{{\"received\":{n},\"sum\":{sum}}}"));
    }
    if let Some(id) = path.strip_prefix("/progress/") {
        let n = st.progress.lock().unwrap().get(id).copied().unwrap_or(0);
        return text(200, format!("{{\"received\":{n}}}"));
    }
    if let Some(id) = path.strip_prefix("/events/") {
        // Server-sent events: one, then (once `/release/ID` is asked) the
        // second and the end.
        let gate = st.gate(id);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(1);
        tokio::spawn(async move {
            let first = format!("data: first, mail {FIXTURE_EVENT_EMAIL}\n\n");
            let _ = tx.send(Ok(hyper::body::Frame::data(first.into()))).await;
            gate.notified().await;
            let _ = tx.send(Ok(hyper::body::Frame::data("data: second\n\n".into()))).await;
        });
        return hyper::Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
            .body(http_body_util::StreamBody::new(tokio_stream(rx)).boxed())
            .unwrap();
    }
    if let Some(id) = path.strip_prefix("/release/") {
        st.gate(id).notify_one();
        return text(200, "{}".into());
    }
    if path == "/redirect" {
        let to = query_param(&query, "to").unwrap_or("/").to_string();
        return hyper::Response::builder()
            .status(302)
            .header("location", to)
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
    }
    if let Some(name) = path.strip_prefix("/fixture/") {
        let auth = req.headers().get("authorization").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        return fixture(name, auth.unwrap_or_default());
    }
    // Drain any body so its length is recorded.
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        n += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    st.seen.lock().unwrap()[index].body_len = n;
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    text(200, format!("{{\"method\":\"{}\",\"path\":\"{}\",\"query\":\"{}\"}}", method, esc(&path), esc(&query)))
}

/// A receiver as a stream of frames.
fn tokio_stream<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

/// A real PostgreSQL 15 server: initdb into a temporary directory, run as
/// the `postgres` user on a random loopback port. Users are made with
/// [`PgServer::create_user`] (SCRAM-SHA-256 or md5 password storage);
/// `pg_hba.conf` asks TCP clients for the method their password is stored
/// with, and trusts only the local socket (used for set-up and checks).
pub struct PgServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: std::process::Child,
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgAuth {
    Scram,
    Md5,
}

impl PgServer {
    /// Starts a server on 127.0.0.1 (fsync off: test data need not survive).
    pub fn start() -> PgServer {
        PgServer::start_with(&["-c", "fsync=off", "-c", "synchronous_commit=off"])
    }

    /// Starts a server with extra `postgres` arguments.
    pub fn start_with(extra: &[&str]) -> PgServer {
        use std::os::unix::{fs::PermissionsExt, process::CommandExt};
        let pg = nix::unistd::User::from_name("postgres").unwrap().expect("a `postgres` user (postgresql package)");
        let (uid, gid) = (pg.uid.as_raw(), pg.gid.as_raw());
        let dir = tempfile::Builder::new().prefix("pc-pg-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid)).unwrap();
        let data = dir.path().join("data");
        let as_pg = |cmd: &mut std::process::Command| {
            cmd.uid(uid).gid(gid).env("HOME", dir.path()).env("LC_ALL", "C.UTF-8");
        };
        let mut initdb = std::process::Command::new(format!("{PG_BIN}/initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C.UTF-8",
            "--auth-local=trust",
        ]);
        as_pg(&mut initdb);
        let out = initdb.output().expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        // Any md5-stored password is asked for with md5 (a SCRAM-stored one
        // upgrades an md5 line to SCRAM).
        let hba = "local all all trust\nhost all all 127.0.0.1/32 md5\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let port = crate::free_port();
        let mut postgres = std::process::Command::new(format!("{PG_BIN}/postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        as_pg(&mut postgres);
        let child = postgres.spawn().expect("start postgres");
        let server = PgServer { addr: SocketAddr::from(([127, 0, 0, 1], port)), dir, child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ok = std::process::Command::new(format!("{PG_BIN}/pg_isready"))
                .arg("-h")
                .arg(server.dir.path())
                .args(["-p", &port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    /// Starts a server (see [`PgServer::start`]) holding the database most
    /// suites test against: `appdb`, owned by `app`, whose password, stored
    /// as SCRAM, is `password`. `app` is a superuser, so that whatever a test
    /// expects portcullis to refuse would succeed if it were let through.
    pub fn with_app_db(password: &str) -> PgServer {
        let pg = PgServer::start();
        pg.create_user("app", password, PgAuth::Scram);
        pg.sql("postgres", "ALTER ROLE app SUPERUSER");
        pg.sql("postgres", "CREATE DATABASE appdb OWNER app");
        pg
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Runs SQL as the superuser over the local socket (unguarded); returns
    /// stdout (unaligned, tuples only), panicking on error.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = std::process::Command::new("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port().to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Creates a login role whose password is stored for `auth`.
    pub fn create_user(&self, name: &str, password: &str, auth: PgAuth) {
        let enc = match auth {
            PgAuth::Scram => "scram-sha-256",
            PgAuth::Md5 => "md5",
        };
        self.sql(
            "postgres",
            &format!("SET password_encryption = '{enc}'; CREATE ROLE {name} LOGIN PASSWORD '{password}'"),
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGINT: fast shutdown.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// One request a [`GitServer`] saw.
#[derive(Debug, Clone, Default)]
pub struct GitSeen {
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    /// The Authorization header, if any.
    pub authorization: Option<String>,
    /// The status it answered.
    pub status: u16,
}

#[derive(Default)]
struct GitState {
    seen: std::sync::Mutex<Vec<GitSeen>>,
}

/// The real `git http-backend` (as CGI) behind a small HTTP/1.1 + HTTP/2
/// server on loopback, plain or TLS with its own test CA. Repositories live
/// under `root` (`GIT_PROJECT_ROOT`, all exported, pushes enabled). When
/// `auth` is set, requests without exactly that Authorization header get
/// 401. Every request is recorded with the Authorization it carried.
pub struct GitServer {
    pub addr: SocketAddr,
    pub ca_file: Option<std::path::PathBuf>,
    pub root: std::path::PathBuf,
    state: Arc<GitState>,
    _server: ServerThread,
    _dir: tempfile::TempDir,
}

impl GitServer {
    pub fn plain(auth: Option<&str>) -> GitServer {
        GitServer::start(None, auth)
    }

    pub fn tls(names: &[&str], auth: Option<&str>) -> GitServer {
        GitServer::start(Some(names), auth)
    }

    fn start(names: Option<&[&str]>, auth: Option<&str>) -> GitServer {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repos");
        std::fs::create_dir_all(&root).unwrap();
        let (acceptor, ca_file) = test_tls(dir.path(), names);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(GitState::default());
        let st = state.clone();
        let auth = auth.map(str::to_string);
        let project_root = root.clone();
        let server = ServerThread::accept_loop(listener, acceptor, false, move |conn, peer| {
            serve_git(conn, Arc::new((st.clone(), auth.clone(), project_root.clone(), peer)))
        });
        GitServer { addr, ca_file, root, state, _server: server, _dir: dir }
    }

    /// Creates a bare repository `name` (like `org/app.git`) whose `main`
    /// has one commit with `README`; returns its path.
    pub fn create_repo(&self, name: &str) -> std::path::PathBuf {
        self.create_repo_with(name, &[])
    }

    /// Same, with extra `git init` arguments (`--object-format=sha256`).
    pub fn create_repo_with(&self, name: &str, init: &[&str]) -> std::path::PathBuf {
        let bare = self.root.join(name);
        let mut args = vec!["init", "-q", "--bare", "-b", "main"];
        args.extend_from_slice(init);
        args.push(bare.to_str().unwrap());
        git_ok(None, &args);
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        let mut args = vec!["init", "-q", "-b", "main"];
        args.extend_from_slice(init);
        git_ok(Some(w), &args);
        std::fs::write(w.join("README"), "hello\n").unwrap();
        git_ok(Some(w), &["add", "README"]);
        git_ok(Some(w), &["commit", "-q", "-m", "first"]);
        git_ok(Some(w), &["push", "-q", bare.to_str().unwrap(), "main"]);
        bare
    }

    /// The id a ref has in repository `name`, or None.
    pub fn rev(&self, name: &str, r: &str) -> Option<String> {
        let out = std::process::Command::new("git")
            .args(["--git-dir", self.root.join(name).to_str().unwrap(), "rev-parse", "--verify", "-q", r])
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn requests(&self) -> Vec<GitSeen> {
        self.state.seen.lock().unwrap().clone()
    }
}

/// Runs git with a fixed identity and no user or system configuration.
pub fn git_ok(dir: Option<&std::path::Path>, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("git");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.args(args).envs(git_env()).output().expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Environment for a git that reads no user or system configuration.
pub fn git_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("GIT_CONFIG_NOSYSTEM", "1"),
        ("GIT_CONFIG_GLOBAL", "/dev/null"),
        ("GIT_TERMINAL_PROMPT", "0"),
        ("GIT_AUTHOR_NAME", "Test"),
        ("GIT_AUTHOR_EMAIL", "test@example.test"),
        ("GIT_COMMITTER_NAME", "Test"),
        ("GIT_COMMITTER_EMAIL", "test@example.test"),
    ]
}

type GitCtx = Arc<(Arc<GitState>, Option<String>, std::path::PathBuf, SocketAddr)>;

async fn serve_git<S>(stream: S, ctx: GitCtx)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(git_cgi(req, ctx).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
}

async fn git_cgi(req: hyper::Request<hyper::body::Incoming>, ctx: GitCtx) -> hyper::Response<TestBody> {
    use http_body_util::BodyExt;
    let (state, auth, root, peer) = &*ctx;
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut seen = GitSeen {
        method: req.method().to_string(),
        uri: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        authorization: header("authorization"),
        status: 0,
    };
    let reply = |status: u16, body: &str| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .header("www-authenticate", "Basic realm=\"git\"")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())).map_err(|e| match e {}).boxed())
            .unwrap()
    };
    if let Some(want) = auth {
        if seen.authorization.as_deref() != Some(want.as_str()) {
            seen.status = 401;
            state.seen.lock().unwrap().push(seen);
            return reply(401, "authentication required\n");
        }
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = header("content-type");
    let encoding = header("content-encoding");
    let protocol = header("git-protocol");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(400, &format!("body: {e}")),
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(git_env())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "http.receivepack")
        .env("GIT_CONFIG_VALUE_0", "true")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", &path)
        .env("QUERY_STRING", &query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_ADDR", peer.ip().to_string())
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(ct) = content_type {
        cmd.env("CONTENT_TYPE", ct);
    }
    if let Some(e) = encoding {
        cmd.env("HTTP_CONTENT_ENCODING", e);
    }
    if let Some(p) = protocol {
        cmd.env("GIT_PROTOCOL", p);
    }
    let mut child = cmd.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.expect("git http-backend output");
    let _ = writer.await;
    let raw = out.stdout;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    let split = split.or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, sep)) = split else {
        return reply(500, &format!("bad CGI output: {}", String::from_utf8_lossy(&out.stderr)));
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut resp = hyper::Response::builder();
    let mut status = 200;
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            status = v.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(500);
        } else {
            resp = resp.header(k.trim(), v);
        }
    }
    seen.status = status;
    state.seen.lock().unwrap().push(seen);
    let body = bytes::Bytes::copy_from_slice(&raw[end + sep..]);
    resp.status(status).body(http_body_util::Full::new(body).map_err(|e| match e {}).boxed()).unwrap()
}

/// Fixed responses for masking tests (`GET /fixture/NAME`): `json` (an
/// email, a card number and an AWS key), `text` (a text body sent in
/// small chunks with an email split across two of them), `gzip` (the JSON,
/// gzip-coded), `echo` (the Authorization the server got, raw, base64 and
/// percent-encoded, in JSON and in headers).
pub const FIXTURE_JSON: &str = r#"{"user":{"email":"alice@example.com","card":"4111 1111 1111 1111"},"aws":"AKIAIOSFODNN7EXAMPLE","note":"plain"}"#;
/// The email in the first event of `/events/ID`.
pub const FIXTURE_EVENT_EMAIL: &str = "carol@example.net";
/// The email split across chunks in `/fixture/text`.
pub const FIXTURE_TEXT_EMAIL: &str = "bob.builder@example.org";

fn fixture(name: &str, auth: String) -> hyper::Response<TestBody> {
    use http_body_util::BodyExt;
    let full = |ct: &str, body: Vec<u8>| {
        hyper::Response::builder()
            .status(200)
            .header("content-type", ct)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)).map_err(|e| match e {}).boxed())
            .unwrap()
    };
    match name {
        "json" => full("application/json", FIXTURE_JSON.as_bytes().to_vec()),
        "gzip" => {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(FIXTURE_JSON.as_bytes()).unwrap();
            let mut r = full("application/json", gz.finish().unwrap());
            r.headers_mut().insert("content-encoding", hyper::header::HeaderValue::from_static("gzip"));
            r
        }
        "text" => {
            let text = format!(
                "{}contact {FIXTURE_TEXT_EMAIL} for access\n{}",
                "lorem ipsum ".repeat(50),
                "dolor ".repeat(50)
            );
            let at = text.find(FIXTURE_TEXT_EMAIL).unwrap() + 5;
            let (a, b) = text.split_at(at);
            let (a, b) = (a.to_string(), b.to_string());
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(hyper::body::Frame::data(a.into()))).await;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let _ = tx.send(Ok(hyper::body::Frame::data(b.into()))).await;
            });
            hyper::Response::builder()
                .status(200)
                .header("content-type", "text/plain; charset=utf-8")
                .body(http_body_util::StreamBody::new(tokio_stream(rx)).boxed())
                .unwrap()
        }
        "echo" => {
            use base64::Engine;
            let token = auth.strip_prefix("Bearer ").unwrap_or(&auth).to_string();
            let b64 = base64::engine::general_purpose::STANDARD.encode(&token);
            let pct: String = token
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let body = format!(r#"{{"authorization":"{auth}","b64":"{b64}","url":"https://x.test/?t={pct}"}}"#);
            let mut r = full("application/json", body.into_bytes());
            let h = r.headers_mut();
            h.insert("x-echo-token", hyper::header::HeaderValue::from_str(&token).unwrap());
            h.insert("x-echo-b64", hyper::header::HeaderValue::from_str(&b64).unwrap());
            r
        }
        _ => text(404, "{}".into()),
    }
}
