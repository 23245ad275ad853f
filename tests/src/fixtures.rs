//! Set-up that several end-to-end suites share: policy pieces, secret
//! files, a tmpfs, waiting, and reading a command's output.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{require_root, require_tool, servers::PG_BIN};

/// True when the PostgreSQL suites can run: root, psql and PostgreSQL 15's
/// initdb (see [`require_root`] and [`require_tool`]).
pub fn require_postgres() -> bool {
    require_root() && require_tool("psql") && require_tool(&format!("{PG_BIN}/initdb"))
}

/// The smallest policy with a guarded scope and an outsider: scope `ci`
/// (whose egress is `ci_egress`) may connect to the tcp target `echo`,
/// declared at `declared` and relayed to `upstream`; scope `guest` is bound
/// to a role with no rules.
pub fn echo_policy(upstream: SocketAddr, declared: &str, ci_egress: &str) -> String {
    format!(
        r#"
version = 1

[[scopes]]
name = "ci"
cgroup = "@CG@/ci"
egress = "{ci_egress}"

[[scopes]]
name = "guest"
cgroup = "@CG@/guest"

[[targets]]
name = "echo"
protocol = "tcp"
match = ["{declared}"]
upstream = "{upstream}"

[[roles]]
name = "builder"
[[roles.rules]]
target = "echo"
allow = ["connect"]

[[roles]]
name = "nobody"

[[bindings]]
scope = "ci"
role = "builder"

[[bindings]]
scope = "guest"
role = "nobody"
"#
    )
}

/// The `app-db` target of the PostgreSQL suites: declared at
/// 127.0.0.53:5432, relayed to `upstream`, where portcullis logs in as
/// `app` with the password in `pwfile` (see
/// [`PgServer::with_app_db`](crate::servers::PgServer::with_app_db)).
pub fn app_db_target(upstream: SocketAddr, pwfile: &str) -> String {
    format!(
        r#"[[targets]]
name = "app-db"
protocol = "postgres"
match = ["127.0.0.53:5432"]
upstream = "{upstream}"
[targets.credentials]
user = "app"
password = {{ file = "{pwfile}" }}
"#
    )
}

/// Writes `contents` to a file `name` in a fresh directory that stays for
/// the rest of the test process (an agent reads its secrets while its
/// sessions run, so the file must outlive them); returns its path.
pub fn secret_file(name: &str, contents: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    std::mem::forget(dir);
    path.to_str().unwrap().to_string()
}

/// Polls `f` every 50 ms until it returns Some, for `within` at most; None
/// when time runs out (the caller says what did not happen).
pub fn wait_until<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command's stdout and stderr as text.
pub fn output_text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A response body as JSON, or a panic that shows it.
pub fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A small tmpfs mounted for one test, unmounted (lazily) when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(at.to_path_buf())
    }

    /// Fills the file system; returns the filler's path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[0u8]).is_ok() {}
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
