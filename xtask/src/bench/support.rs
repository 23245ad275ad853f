//! What the benchmarks that run portcullis share: loopback ports, child
//! processes, a scratch PostgreSQL server, and starting portcullis itself.
//! Each benchmark still decides what it measures; these only start things
//! the same way everywhere.
use std::{
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Fails unless this runs as root: the benchmarks attach probes and make
/// cgroups.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (cgroups, eBPF)");
    }
    Ok(())
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `ready` every 100 ms, for 30 s at most.
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not come up");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits (10 s at most) until something accepts connections on `addr`.
pub fn wait_port(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        ensure!(Instant::now() < deadline, "{what} does not listen on {addr}");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The cgroup2 mount, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        if let Some((pre, post)) = line.split_once(" - ") {
            if post.starts_with("cgroup2 ") {
                if let Some(p) = pre.split_whitespace().nth(4) {
                    return Ok(Path::new(p).to_path_buf());
                }
            }
        }
    }
    bail!("no cgroup2 mount")
}

/// A child process stopped (SIGINT, then waited for) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// The `postgres` user, which PostgreSQL's own programs run as.
#[derive(Clone, Copy)]
pub struct PgUser {
    uid: u32,
    gid: u32,
}

impl PgUser {
    pub fn lookup() -> Result<PgUser> {
        let id = |flag: &str| -> Result<u32> {
            let out = Command::new("id").args([flag, "postgres"]).output()?;
            if !out.status.success() {
                bail!("no `postgres` user (is postgresql-15 installed?)");
            }
            Ok(String::from_utf8(out.stdout)?.trim().parse()?)
        };
        Ok(PgUser { uid: id("-u")?, gid: id("-g")? })
    }

    pub fn chown(&self, path: &Path) -> Result<()> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::chown(c.as_ptr(), self.uid, self.gid) } != 0 {
            bail!("chown {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes `cmd` run as this user, with `dir` as its home.
    pub fn apply(&self, cmd: &mut Command, dir: &Path) {
        cmd.uid(self.uid).gid(self.gid).env("HOME", dir).env("LC_ALL", "C.UTF-8");
    }
}

/// Runs `f` in a fresh directory `<tmp>/<name>-<pid>` owned by the
/// `postgres` user, and removes the directory afterwards, whatever `f`
/// returned.
pub fn in_pg_scratch_dir(name: &str, f: impl FnOnce(&Path, PgUser) -> Result<()>) -> Result<()> {
    let pg_user = PgUser::lookup()?;
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    pg_user.chown(&dir)?;
    let result = f(&dir, pg_user);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// A PostgreSQL 15 server made with initdb in `<dir>/data` (default
/// durability), listening on 127.0.0.1 (SCRAM) and on a socket in `dir`
/// (trusted). Stopped when dropped.
pub struct Postgres {
    pub port: u16,
    _server: Proc,
}

/// Starts the server with `max_connections`, then makes the login role
/// `user` with `password`, its own database of the same name, and fills
/// that with `pgbench -i -s <scale>`.
pub fn start_postgres(
    dir: &Path,
    pg_user: PgUser,
    max_connections: u32,
    user: &str,
    password: &str,
    scale: u32,
) -> Result<Postgres> {
    let data = dir.join("data");
    let mut initdb = Command::new(format!("{PG_BIN}/initdb"));
    initdb.arg("-D").arg(&data).args(["-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust"]);
    pg_user.apply(&mut initdb, dir);
    crate::run(initdb.stdout(Stdio::null()))?;
    fs::write(data.join("pg_hba.conf"), "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")?;
    let port = free_port()?;
    let mut pg = Command::new(format!("{PG_BIN}/postgres"));
    pg.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
        .arg(format!("max_connections={max_connections}"))
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    pg_user.apply(&mut pg, dir);
    let server = Proc(pg.spawn().context("starting postgres")?);
    wait_for("postgres", || {
        Command::new(format!("{PG_BIN}/pg_isready"))
            .arg("-h")
            .arg(dir)
            .args(["-p", &port.to_string(), "-q"])
            .status()
            .is_ok_and(|s| s.success())
    })?;
    let psql = |sql: &str| -> Result<()> {
        crate::run(
            Command::new("psql")
                .arg("-h")
                .arg(dir)
                .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-X", "-q", "-c", sql])
                .stdout(Stdio::null()),
        )
    };
    psql(&format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"))?;
    psql(&format!("CREATE DATABASE {user} OWNER {user}"))?;
    crate::run(
        Command::new("pgbench")
            .arg("-h")
            .arg(dir)
            .args(["-p", &port.to_string(), "-U", user, "-i", "-s", &scale.to_string(), "-q", user])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    Ok(Postgres { port, _server: server })
}

/// One benchmark's portcullis: its binary, control socket, pinned probes
/// and state directory.
pub struct Portcullis {
    pub bin: PathBuf,
    pub control: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Portcullis {
    /// `portcullis run` with `policy` on `listen_port`; stdio and
    /// environment are the caller's to set.
    pub fn run(&self, policy: &Path, listen_port: u16) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--control-socket")
            .arg(&self.control)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--listen-port")
            .arg(listen_port.to_string())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir);
        cmd
    }

    /// Starts the agent with `policy` on a free port, logging warnings to
    /// our stderr, and waits until it is ready; it stops when the returned
    /// process is dropped.
    pub fn start(&self, policy: &Path) -> Result<Proc> {
        let mut agent = Proc(
            self.run(policy, free_port()?)
                .env("PORTCULLIS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting portcullis")?,
        );
        self.wait_ready(&mut agent.0, None)?;
        Ok(agent)
    }

    /// Waits (30 s at most) until the agent answers `status`; fails at
    /// once when it exits first. `log`: where its stderr goes, if not to
    /// ours.
    pub fn wait_ready(&self, agent: &mut Child, log: Option<&Path>) -> Result<()> {
        let see = log.map(|l| format!("; see {}", l.display())).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(&self.bin)
                .arg("--control-socket")
                .arg(&self.control)
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if let Some(st) = agent.try_wait()? {
                bail!("portcullis exited ({st}){see}");
            }
            ensure!(Instant::now() < deadline, "portcullis did not become ready{see}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command that runs in guarded `scope` (`portcullis exec`); the
    /// program and its arguments are the caller's to add.
    pub fn exec(&self, scope: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--control-socket").arg(&self.control).args(["exec", "--scope", scope, "--"]);
        cmd
    }

    /// `portcullis detach`: removes the pinned probes once the agent is
    /// gone.
    pub fn detach(&self) -> std::io::Result<std::process::Output> {
        Command::new(&self.bin).arg("detach").arg("--pin-dir").arg(&self.pin_dir).output()
    }
}
