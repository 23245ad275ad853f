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
