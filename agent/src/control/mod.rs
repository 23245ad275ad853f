//! The local control socket: a unix socket (root-owned, mode 0660, group
//! configurable) speaking one JSON request per line, answered by one JSON
//! line (or, for watches, a stream of them). The CLI's `status`, `exec` and
//! `approvals` talk to the running agent through it.
//!
//! Who is asking comes from the kernel (SO_PEERCRED and /proc), never from
//! what the client sends: a process inside a guarded scope can never
//! approve or deny, whatever its uid.
use std::{
    io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
};
use tracing::{debug, warn};

use crate::{
    approvals::{ApprovalId, Approver, GrantScope},
    enforcer::Enforcer,
    intercept::cgroup::unit_of,
};

pub const DEFAULT_SOCKET: &str = "/run/portcullis/control.sock";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Where a scope's cgroup is, for `exec`.
    Scope {
        name: String,
    },
    ApprovalsList,
    /// Streams held and resolved requests until the client goes away.
    ApprovalsWatch,
    ApprovalsShow {
        id: u64,
    },
    ApprovalsApprove {
        id: u64,
        scope: GrantScope,
    },
    ApprovalsDeny {
        id: u64,
        #[serde(default)]
        reason: String,
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

/// What the control server needs from the run loop.
pub trait StatusSource: Send + Sync {
    fn status(&self) -> Value;
    fn scope_cgroup(&self, name: &str) -> Option<PathBuf>;
    /// Ids of the cgroups the probes guard (their subtrees are guarded).
    fn guarded_cgroups(&self) -> Vec<u64>;
    fn cgroup_mount(&self) -> PathBuf;
}

/// Binds the socket: root-owned, mode 0660, group `group` (gid) if given,
/// else root's group: only root and members of that group can connect.
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, ControlError> {
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
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(nix::unistd::Gid::from_raw(group.unwrap_or(0))))
        .map_err(|e| err(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, enforcer: Arc<Enforcer>, source: Arc<dyn StatusSource>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (enforcer, source) = (enforcer.clone(), source.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, enforcer, source).await {
                debug!(error = %e, "control connection failed");
            }
        });
    }
}

/// The connecting process, as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub approver: Approver,
    /// Why this peer may not approve, if it may not.
    pub refused: Option<String>,
}

/// Identifies the peer and whether it sits inside a guarded scope. Fails
/// closed: a peer whose cgroup cannot be read may not approve.
pub fn identify(pid: u32, uid: u32, guarded: &[u64], mount: &Path) -> Peer {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned());
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim_start_matches('/').to_string())));
    let refused = match &cgroup {
        None => Some("cannot read the caller's cgroup".to_string()),
        Some(rel) => inside_guarded(mount, rel, guarded)
            .map(|id| format!("the caller's cgroup {rel} is inside a guarded scope (cgroup id {id})")),
    };
    let unit = cgroup.as_deref().and_then(unit_of);
    Peer { approver: Approver { uid, pid, exe, cgroup, unit }, refused }
}

/// The guarded cgroup containing `rel` (itself or an ancestor), by inode.
fn inside_guarded(mount: &Path, rel: &str, guarded: &[u64]) -> Option<u64> {
    let mut dir = mount.join(rel);
    loop {
        if let Ok(meta) = std::fs::metadata(&dir) {
            if guarded.contains(&meta.ino()) {
                return Some(meta.ino());
            }
        }
        if dir == mount || !dir.pop() {
            return None;
        }
    }
}

async fn handle(stream: UnixStream, enforcer: Arc<Enforcer>, source: Arc<dyn StatusSource>) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().unwrap_or(0).max(0) as u32;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let req = match serde_json::from_str::<Request>(&line) {
            Ok(r) => r,
            Err(e) => {
                reply(&mut w, json!({"ok": false, "error": format!("bad request: {e}")})).await?;
                continue;
            }
        };
        let answer = match req {
            Request::Status => json!({"ok": true, "data": source.status()}),
            Request::Scope { name } => match source.scope_cgroup(&name) {
                Some(p) => json!({"ok": true, "data": {"cgroup": p}}),
                None => json!({"ok": false, "error": format!("no scope named `{name}` in the policy in force")}),
            },
            Request::ApprovalsList => json!({"ok": true, "data": enforcer.approvals.list()}),
            Request::ApprovalsShow { id } => match enforcer.approvals.get(ApprovalId(id)) {
                Some(v) => json!({"ok": true, "data": v}),
                None => json!({"ok": false, "error": format!("no pending request {id}")}),
            },
            Request::ApprovalsWatch => {
                reply(&mut w, json!({"ok": true, "data": enforcer.approvals.list()})).await?;
                let mut rx = enforcer.approvals.subscribe();
                loop {
                    match rx.recv().await {
                        Ok(ev) => reply(&mut w, json!({"ok": true, "event": ev})).await?,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return Ok(()),
                    }
                }
            }
            Request::ApprovalsApprove { id, scope } => {
                let peer = identify(pid, cred.uid(), &source.guarded_cgroups(), &source.cgroup_mount());
                match &peer.refused {
                    Some(why) => refuse(&enforcer, &peer, id, why),
                    None => match enforcer.approvals.approve(ApprovalId(id), scope, peer.approver) {
                        Ok(()) => json!({"ok": true, "data": {"id": id, "approved": true}}),
                        Err(e) => json!({"ok": false, "error": e.to_string()}),
                    },
                }
            }
            Request::ApprovalsDeny { id, reason } => {
                let peer = identify(pid, cred.uid(), &source.guarded_cgroups(), &source.cgroup_mount());
                match &peer.refused {
                    Some(why) => refuse(&enforcer, &peer, id, why),
                    None => match enforcer.approvals.deny(ApprovalId(id), reason, peer.approver) {
                        Ok(()) => json!({"ok": true, "data": {"id": id, "denied": true}}),
                        Err(e) => json!({"ok": false, "error": e.to_string()}),
                    },
                }
            }
        };
        reply(&mut w, answer).await?;
    }
    Ok(())
}

fn refuse(enforcer: &Enforcer, peer: &Peer, id: u64, why: &str) -> Value {
    warn!(approval = id, uid = peer.approver.uid, pid = peer.approver.pid, reason = %why, "approval answer refused");
    enforcer.audit.record(crate::audit::Event::ApprovalRefused {
        id,
        uid: peer.approver.uid,
        pid: peer.approver.pid,
        exe: peer.approver.exe.clone(),
        cgroup: peer.approver.cgroup.clone(),
        reason: why.to_string(),
    });
    json!({"ok": false, "error": format!("refused: {why}; a guarded process can never answer an approval")})
}

async fn reply(w: &mut OwnedWriteHalf, v: Value) -> io::Result<()> {
    let mut out = serde_json::to_vec(&v).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await
}

/// Sends one request and returns the `data` of a successful answer.
pub async fn call(path: &Path, req: &Request) -> Result<Value, ControlError> {
    let (mut lines, _w) = stream(path, req).await?;
    next_answer(path, &mut lines).await
}

pub type AnswerLines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

/// Sends a request and returns the reader for a stream of answers, and the
/// write half, which must stay open as long as answers are wanted.
pub async fn stream(path: &Path, req: &Request) -> Result<(AnswerLines, OwnedWriteHalf), ControlError> {
    let stream = UnixStream::connect(path).await.map_err(|e| ControlError::Connect(path.to_path_buf(), e))?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(|e| ControlError::Io(path.to_path_buf(), e))?;
    Ok((BufReader::new(r).lines(), w))
}

/// Reads the next answer line; `Ok(data)` for `ok: true`.
pub async fn next_answer(path: &Path, lines: &mut AnswerLines) -> Result<Value, ControlError> {
    let answer = lines
        .next_line()
        .await
        .map_err(|e| ControlError::Io(path.to_path_buf(), e))?
        .ok_or_else(|| ControlError::Protocol("connection closed without an answer".into()))?;
    let v: Value = serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(e.to_string()))?;
    if v["ok"] == true {
        Ok(if v.get("event").is_some() { v["event"].clone() } else { v["data"].clone() })
    } else {
        Err(ControlError::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_in_a_guarded_subtree_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path();
        std::fs::create_dir_all(mount.join("portcullis.slice/ci/job")).unwrap();
        std::fs::create_dir_all(mount.join("admin.slice")).unwrap();
        let guarded = std::fs::metadata(mount.join("portcullis.slice/ci")).unwrap().ino();
        assert_eq!(inside_guarded(mount, "portcullis.slice/ci/job", &[guarded]), Some(guarded));
        assert_eq!(inside_guarded(mount, "portcullis.slice/ci", &[guarded]), Some(guarded));
        assert_eq!(inside_guarded(mount, "admin.slice", &[guarded]), None);
        assert_eq!(inside_guarded(mount, "portcullis.slice", &[guarded]), None);
    }

    #[test]
    fn this_test_process_is_identified_from_proc() {
        let me = std::process::id();
        let peer = identify(me, 0, &[], Path::new("/nonexistent"));
        assert_eq!(peer.approver.pid, me);
        assert!(peer.approver.exe.is_some());
        assert!(peer.approver.cgroup.is_some(), "cgroup v2 line in /proc/self/cgroup");
        assert!(peer.refused.is_none());
        let gone = identify(u32::MAX - 1, 0, &[], Path::new("/"));
        assert!(gone.refused.is_some(), "unknown peers fail closed");
    }
}
