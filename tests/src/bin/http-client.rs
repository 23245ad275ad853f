//! A Rust HTTP client (hyper + rustls) for the end-to-end tests, run inside
//! guarded scopes. It trusts only the CAs in `SSL_CERT_FILE`, resolves host
//! names with `--resolve HOST:PORT:ADDR` like curl, and prints one JSON
//! report.
//!
//! `http-client [--resolve H:P:A] [--http2] [-X METHOD] [-H 'Name: value']...
//!   [--upload N] [--gated-upload N --progress URL] [--gated-download --release URL] URL`
//!
//! `--gated-upload` sends half the body, then waits until the server
//! reports (at the progress URL, over a second connection) that bytes
//! arrived, then sends the rest: it only completes if the body streams.
//! `--gated-download` reads half the body, asks the server to release the
//! rest, then reads it: it only completes if the response streams.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, StreamBody};
use hyper::{body::Frame, Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tests::servers::pattern_byte;
use serde_json::json;

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Default, Clone)]
struct Opts {
    resolve: HashMap<(String, u16), String>,
    http2: bool,
    method: String,
    headers: Vec<(String, String)>,
    upload: Option<u64>,
    gated_upload: Option<u64>,
    progress: Option<String>,
    gated_download: bool,
    release: Option<String>,
    url: String,
}

fn parse_args() -> Opts {
    let mut o = Opts { method: "GET".into(), ..Opts::default() };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut next = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--resolve" => {
                let v = next();
                let mut it = v.splitn(3, ':');
                let (h, p, addr) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                o.resolve.insert((h.to_string(), p.parse().unwrap()), addr.to_string());
            }
            "--http2" => o.http2 = true,
            "-X" => o.method = next(),
            "-H" => {
                let v = next();
                let (n, val) = v.split_once(':').expect("-H 'Name: value'");
                o.headers.push((n.trim().to_string(), val.trim().to_string()));
            }
            "--upload" => o.upload = Some(next().parse().unwrap()),
            "--gated-upload" => o.gated_upload = Some(next().parse().unwrap()),
            "--progress" => o.progress = Some(next()),
            "--gated-download" => o.gated_download = true,
            "--release" => o.release = Some(next()),
            _ => o.url = a,
        }
    }
    o
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = parse_args();
    let report = match tokio::time::timeout(Duration::from_secs(60), run(&o)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({ "error": e }),
        Err(_) => json!({ "error": "timed out after 60s" }),
    };
    println!("{report}");
}

/// A connection ready to send requests on.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    async fn send(&mut self, req: Request<Body>) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        match self {
            Sender::H1(s) => s.send_request(req).await.map_err(|e| format!("{e:?}")),
            Sender::H2(s) => s.send_request(req).await.map_err(|e| format!("{e:?}")),
        }
    }
}

fn roots() -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let path = std::env::var("SSL_CERT_FILE").map_err(|_| "SSL_CERT_FILE is not set".to_string())?;
    let pem = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    Ok(roots)
}

async fn connect(o: &Opts, uri: &Uri, http2: bool) -> Result<(Sender, String), String> {
    let host = uri.host().ok_or("URL has no host")?.to_string();
    let tls = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr: SocketAddr = match o.resolve.get(&(host.clone(), port)) {
        Some(a) => format!("{a}:{port}").parse().map_err(|e| format!("{e}"))?,
        None => format!("{}:{port}", host.trim_start_matches('[').trim_end_matches(']'))
            .parse()
            .or_else(|_| format!("[{host}]:{port}").parse())
            .map_err(|_| format!("cannot resolve {host} (use --resolve)"))?,
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    if !tls {
        let io = TokioIo::new(tcp);
        let (s, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        return Ok((Sender::H1(s), "HTTP/1.1".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots()?)
        .with_no_client_auth();
    cfg.alpn_protocols = if http2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let stream =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    if h2 {
        let (s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok((Sender::H2(s), "HTTP/2.0".into()))
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok((Sender::H1(s), "HTTP/1.1".into()))
    }
}

fn request(o: &Opts, method: &str, uri: &Uri, h2: bool, body: Body) -> Result<Request<Body>, String> {
    let mut b = Request::builder().method(method);
    if h2 {
        b = b.uri(uri.clone()).version(hyper::Version::HTTP_2);
    } else {
        b = b.uri(uri.path_and_query().map_or("/", |p| p.as_str())).header("host", uri.authority().unwrap().as_str());
    }
    for (n, v) in &o.headers {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(body).map_err(|e| e.to_string())
}

/// A one-off GET on a fresh connection; returns the body as text.
async fn side_request(o: &Opts, method: &str, url: &str) -> Result<String, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
    let (mut s, v) = connect(o, &uri, false).await?;
    let plain = Opts { headers: Vec::new(), ..o.clone() };
    let req = request(&plain, method, &uri, v == "HTTP/2.0", Empty::new().map_err(|e| match e {}).boxed())?;
    let resp = s.send(req).await?;
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn pattern_chunks(from: u64, to: u64) -> impl Iterator<Item = Bytes> {
    let mut off = from;
    std::iter::from_fn(move || {
        if off >= to {
            return None;
        }
        let len = (to - off).min(64 * 1024);
        let chunk: Vec<u8> = (off..off + len).map(pattern_byte).collect();
        off += len;
        Some(Bytes::from(chunk))
    })
}

async fn run(o: &Opts) -> Result<serde_json::Value, String> {
    let uri: Uri = o.url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let (mut sender, version) = connect(o, &uri, o.http2).await?;
    let h2 = version == "HTTP/2.0";
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let mut feeder = None;
    let body: Body = if let Some(n) = o.upload {
        feeder = Some(tokio::spawn(async move {
            for c in pattern_chunks(0, n) {
                if tx.send(Ok(Frame::data(c))).await.is_err() {
                    return Ok(());
                }
            }
            Ok::<(), String>(())
        }));
        StreamBody::new(Receiver(rx)).boxed()
    } else if let Some(n) = o.gated_upload {
        let progress = o.progress.clone().ok_or("--gated-upload needs --progress URL")?;
        let oc = o.clone();
        feeder = Some(tokio::spawn(async move {
            for c in pattern_chunks(0, n / 2) {
                tx.send(Ok(Frame::data(c))).await.map_err(|_| "upload cancelled".to_string())?;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let p = side_request(&oc, "GET", &progress).await?;
                let v: serde_json::Value = serde_json::from_str(&p).map_err(|e| format!("progress: {e}: {p}"))?;
                if v["received"].as_u64().unwrap_or(0) > 0 {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("the server saw no byte of the upload while half of it was sent: not streamed".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for c in pattern_chunks(n / 2, n) {
                tx.send(Ok(Frame::data(c))).await.map_err(|_| "upload cancelled".to_string())?;
            }
            Ok(())
        }));
        StreamBody::new(Receiver(rx)).boxed()
    } else {
        drop(tx);
        Empty::new().map_err(|e| match e {}).boxed()
    };
    let req = request(o, &o.method, &uri, h2, body)?;
    let resp = sender.send(req).await?;
    let status = resp.status().as_u16();
    let headers: serde_json::Map<String, serde_json::Value> =
        resp.headers().iter().map(|(n, v)| (n.to_string(), json!(String::from_utf8_lossy(v.as_bytes())))).collect();
    let mut body = resp.into_body();
    let (mut len, mut sum, mut pattern_ok) = (0u64, 0u64, true);
    let mut text = Vec::new();
    let content_length = headers.get("content-length").and_then(|v| v.as_str()).and_then(|v| v.parse::<u64>().ok());
    let mut released = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(d) = frame.data_ref() {
            for (i, b) in d.iter().enumerate() {
                pattern_ok &= *b == pattern_byte(len + i as u64);
                sum = sum.wrapping_add(*b as u64);
            }
            if text.len() < 64 * 1024 {
                text.extend_from_slice(&d[..d.len().min(64 * 1024 - text.len())]);
            }
            len += d.len() as u64;
        }
        if o.gated_download && !released && content_length.is_some_and(|n| len >= n / 2) {
            let release = o.release.clone().ok_or("--gated-download needs --release URL")?;
            side_request(o, "POST", &release).await?;
            released = true;
        }
    }
    if let Some(f) = feeder {
        f.await.map_err(|e| e.to_string())??;
    }
    Ok(json!({
        "status": status,
        "version": version,
        "headers": headers,
        "body": String::from_utf8_lossy(&text),
        "body_len": len,
        "sum": sum,
        "pattern_ok": pattern_ok,
        "released": released,
    }))
}

struct Receiver(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl futures_core::Stream for Receiver {
    type Item = Result<Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
