//! The local control socket: a root-only unix socket speaking one JSON
//! request per line, one JSON response per line. The CLI's `status`,
//! `exec` and later subcommands talk to the running agent through it.
use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use crate::enforcer::Enforcer;

pub const DEFAULT_SOCKET: &str = "/run/portcullis/control.sock";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Where a scope's cgroup is, for `exec`.
    Scope {
        name: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach portcullis at {0}: {1} (is `portcullis run` running?)")]
    Connect(PathBuf, io::Error),
    #[error("control socket {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("portcullis answered: {0}")]
    Refused(String),
    #[error("bad answer from portcullis: {0}")]
    Protocol(String),
}

/// Extra state the control server reports (owned by the run loop).
pub trait StatusSource: Send + Sync {
    fn status(&self) -> Value;
    fn scope_cgroup(&self, name: &str) -> Option<PathBuf>;
}

/// Binds the socket: parent directory 0755, socket 0600 (root only).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |e| ControlError::Io(path.to_path_buf(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, _enforcer: Arc<Enforcer>, source: Arc<dyn StatusSource>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let source = source.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, source).await {
                debug!(error = %e, "control connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, source: Arc<dyn StatusSource>) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            Ok(Request::Status) => json!({"ok": true, "data": source.status()}),
            Ok(Request::Scope { name }) => match source.scope_cgroup(&name) {
                Some(p) => json!({"ok": true, "data": {"cgroup": p}}),
                None => json!({"ok": false, "error": format!("no scope named `{name}` in the policy in force")}),
            },
        };
        if reply["ok"] == false {
            warn!(uid = cred.uid(), pid = cred.pid(), error = %reply["error"], "control request refused");
        }
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// Sends one request and returns the `data` of a successful answer.
pub async fn call(path: &Path, req: &Request) -> Result<Value, ControlError> {
    let stream = UnixStream::connect(path).await.map_err(|e| ControlError::Connect(path.to_path_buf(), e))?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(|e| ControlError::Io(path.to_path_buf(), e))?;
    let mut lines = BufReader::new(r).lines();
    let answer = lines
        .next_line()
        .await
        .map_err(|e| ControlError::Io(path.to_path_buf(), e))?
        .ok_or_else(|| ControlError::Protocol("connection closed without an answer".into()))?;
    let v: Value = serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(e.to_string()))?;
    if v["ok"] == true {
        Ok(v["data"].clone())
    } else {
        Err(ControlError::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()))
    }
}
