//! CancelRequest mapping. The caller gets a key of portcullis' own in
//! BackendKeyData; a CancelRequest with that key (arriving, like any
//! connection, through the kernel path) is passed to the upstream with the
//! upstream's key. The upstream's key never reaches the caller.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{LazyLock, Mutex},
};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::wire;
use crate::{ids::SessionId, protocols::connect_marked};

/// Where to send the cancel for one live session.
#[derive(Debug, Clone)]
struct Entry {
    target: String,
    upstream: SocketAddr,
    mark: u32,
    pid: i32,
    key: i32,
}

static KEYS: LazyLock<Mutex<HashMap<(i32, i32), Entry>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// A registered key; unregistered when dropped (the session ended).
pub struct Registration {
    pub pid: i32,
    pub key: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        KEYS.lock().expect("cancel keys").remove(&(self.pid, self.key));
    }
}

/// Registers the upstream key of a session and returns the caller's key.
pub fn register(target: &str, upstream: SocketAddr, mark: u32, pid: i32, key: i32) -> Registration {
    let mut keys = KEYS.lock().expect("cancel keys");
    loop {
        let r = SessionId::random().0;
        // A positive process id, as PostgreSQL's are.
        let ours = ((r >> 32) as i32 & 0x7fff_ffff, r as i32);
        if ours.0 == 0 || keys.contains_key(&ours) {
            continue;
        }
        keys.insert(ours, Entry { target: target.to_string(), upstream, mark, pid, key });
        return Registration { pid: ours.0, key: ours.1 };
    }
}

/// Passes a cancel on, if the key is known and belongs to `target`.
/// Returns whether one was sent.
pub async fn cancel(target: &str, pid: i32, key: i32) -> bool {
    let entry = KEYS.lock().expect("cancel keys").get(&(pid, key)).cloned();
    let Some(e) = entry.filter(|e| e.target == target) else {
        return false;
    };
    let Ok(mut s) = connect_marked(e.upstream, e.mark).await else {
        return false;
    };
    let mut out = BytesMut::new();
    wire::cancel_request(&mut out, e.pid, e.key);
    let ok = s.write_all(&out).await.is_ok();
    let _ = s.shutdown().await;
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_and_dropped_with_the_session() {
        let up: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let a = register("db", up, 0, 11, 22);
        let b = register("db", up, 0, 11, 22);
        assert_ne!((a.pid, a.key), (b.pid, b.key));
        assert_ne!((a.pid, a.key), (11, 22), "the caller never sees the upstream key");
        assert!(a.pid > 0);
        let k = (a.pid, a.key);
        assert!(KEYS.lock().unwrap().contains_key(&k));
        drop(a);
        assert!(!KEYS.lock().unwrap().contains_key(&k));
    }
}
