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
