//! Requests a rule holds for approval: their shape (what a widened approval
//! covers), the answers given early (`approval_response = "early"`, each
//! for one retry of the very request approved) and watching the caller
//! while a request waits.
//!
//! The shape of an HTTP request is its method and the path pattern of the
//! `approve` entry that held it (`DELETE /items/*`), or its exact path when
//! that entry names no path (`DELETE` alone): a `--session` or `--for`
//! approval covers that shape, never more than the entry the approver saw.
use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;

use crate::approvals::ApprovalId;

/// The shape of a held request, from its method, normalised path and the
/// entry that held it.
pub fn shape(method: &str, path: &str, entry: Option<&str>) -> String {
    match entry.and_then(|e| e.split_once(char::is_whitespace)).map(|(_, p)| p.trim()) {
        Some(glob) if !glob.is_empty() => format!("{method} {glob}"),
        _ => format!("{method} {path}"),
    }
}

/// What a retry must match to use an early answer's approval: the same
/// target, role and caller (cgroup), and the same request as the approver
/// saw it (method, host, path and query).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EarlyKey {
    pub target: String,
    pub role: Option<String>,
    pub caller: Option<String>,
    pub request: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Early {
    /// Waiting for an approver: a retry gets the same id.
    Pending(ApprovalId),
    /// Approved: the first retry before `until` goes through.
    Approved { id: ApprovalId, by: String, until: Instant },
}

/// Early answers in flight, by request.
#[derive(Default)]
pub struct EarlyAnswers {
    map: Mutex<HashMap<EarlyKey, Early>>,
}

/// Most early answers remembered; past it the oldest approved ones go first.
const MAX_EARLY: usize = 4096;

impl EarlyAnswers {
    /// The process-wide table.
    pub fn global() -> &'static EarlyAnswers {
        static TABLE: OnceLock<EarlyAnswers> = OnceLock::new();
        TABLE.get_or_init(EarlyAnswers::default)
    }

    /// What is known for `key`: a pending id, or an approval, which is
    /// used up by this call.
    pub fn take(&self, key: &EarlyKey) -> Option<Early> {
        let now = Instant::now();
        let mut map = self.map.lock().expect("early answers");
        match map.get(key).cloned() {
            Some(Early::Approved { until, .. }) if until <= now => {
                map.remove(key);
                None
            }
            Some(e @ Early::Approved { .. }) => {
                map.remove(key);
                Some(e)
            }
            other => other,
        }
    }

    pub fn pending(&self, key: EarlyKey, id: ApprovalId) {
        let mut map = self.map.lock().expect("early answers");
        if map.len() >= MAX_EARLY {
            let now = Instant::now();
            map.retain(|_, e| matches!(e, Early::Approved { until, .. } if *until > now));
            if map.len() >= MAX_EARLY {
                map.clear();
            }
        }
        map.insert(key, Early::Pending(id));
    }

    /// The held request `id` was answered: approved for one retry within
    /// `valid`, or (`None`) not approved.
    pub fn resolved(&self, key: &EarlyKey, id: ApprovalId, approved_by: Option<String>, valid: Duration) {
        let mut map = self.map.lock().expect("early answers");
        if map.get(key) != Some(&Early::Pending(id)) {
            return;
        }
        match approved_by {
            Some(by) => {
                map.insert(key.clone(), Early::Approved { id, by, until: Instant::now() + valid });
            }
            None => {
                map.remove(key);
            }
        }
    }
}

/// Most request body kept while a request is held; past it the body is
/// left in the connection (the caller waits for the upstream to read it).
pub const HELD_BODY_BUFFER: usize = 1 << 20;

/// Reads a held request's body while it waits, so that a caller that goes
/// away is noticed (an HTTP/1.1 connection is only read through its
/// body), up to [`HELD_BODY_BUFFER`]; what was read is replayed when the
/// request is forwarded.
pub struct BodyWatch<B> {
    body: B,
    frames: Vec<Frame<Bytes>>,
    buffered: usize,
    ended: bool,
    failed: bool,
}

impl<B> BodyWatch<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    pub fn new(body: B) -> Self {
        BodyWatch { body, frames: Vec::new(), buffered: 0, ended: false, failed: false }
    }

    /// Resolves when the caller is known to be gone (its body broke off).
    /// Pending forever once the body is complete or the buffer full.
    pub async fn gone(&mut self) {
        while !self.ended && !self.failed && self.buffered < HELD_BODY_BUFFER {
            match self.body.frame().await {
                None => self.ended = true,
                Some(Ok(f)) => {
                    self.buffered += f.data_ref().map_or(0, |d| d.len());
                    self.frames.push(f);
                }
                Some(Err(_)) => self.failed = true,
            }
        }
        if self.failed {
            return;
        }
        std::future::pending::<()>().await
    }

    /// The body again: what was read, then the rest.
    pub fn into_body(self) -> Replay<B> {
        Replay { frames: self.frames.into(), rest: (!self.ended).then_some(self.body) }
    }
}

pin_project_lite::pin_project! {
    /// A body whose first frames were read already.
    pub struct Replay<B> {
        frames: std::collections::VecDeque<Frame<Bytes>>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B> http_body::Body for Replay<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(f) = this.frames.pop_front() {
            return std::task::Poll::Ready(Some(Ok(f)));
        }
        match this.rest.as_pin_mut() {
            Some(b) => b.poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let held: u64 = self.frames.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as u64).sum();
        match &self.rest {
            None => http_body::SizeHint::with_exact(held),
            Some(b) => {
                let h = b.size_hint();
                let mut s = http_body::SizeHint::new();
                s.set_lower(h.lower() + held);
                if let Some(u) = h.upper() {
                    s.set_upper(u + held);
                }
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn shapes_take_the_entrys_path_pattern() {
        assert_eq!(shape("DELETE", "/items/7", Some("DELETE /items/*")), "DELETE /items/*");
        assert_eq!(shape("DELETE", "/items/7", Some("write  /items/**")), "DELETE /items/**");
        assert_eq!(shape("DELETE", "/items/7", Some("DELETE")), "DELETE /items/7");
        assert_eq!(shape("PUT", "/x", None), "PUT /x");
    }

    #[test]
    fn early_approvals_are_used_once_and_expire() {
        let t = EarlyAnswers::default();
        let k = EarlyKey {
            target: "api".into(),
            role: Some("r".into()),
            caller: Some("portcullis.slice/batch".into()),
            request: "DELETE api.example.test/x".into(),
        };
        assert_eq!(t.take(&k), None);
        t.pending(k.clone(), ApprovalId(5));
        assert_eq!(t.take(&k), Some(Early::Pending(ApprovalId(5))), "a retry while pending sees the same id");
        // A stale answer for another id changes nothing.
        t.resolved(&k, ApprovalId(4), Some("uid 0".into()), Duration::from_secs(60));
        assert_eq!(t.take(&k), Some(Early::Pending(ApprovalId(5))));
        t.resolved(&k, ApprovalId(5), Some("uid 0".into()), Duration::from_secs(60));
        assert!(matches!(t.take(&k), Some(Early::Approved { id: ApprovalId(5), .. })));
        assert_eq!(t.take(&k), None, "used once");

        t.pending(k.clone(), ApprovalId(6));
        t.resolved(&k, ApprovalId(6), None, Duration::from_secs(60));
        assert_eq!(t.take(&k), None, "denied: forgotten");

        t.pending(k.clone(), ApprovalId(7));
        t.resolved(&k, ApprovalId(7), Some("uid 0".into()), Duration::ZERO);
        assert_eq!(t.take(&k), None, "expired");
    }

    #[tokio::test]
    async fn a_watched_body_is_replayed_whole() {
        let mut w = BodyWatch::new(Full::new(Bytes::from_static(b"hello")));
        let gone = tokio::time::timeout(Duration::from_millis(50), w.gone()).await;
        assert!(gone.is_err(), "a complete body does not mean the caller left");
        let got = w.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
    }

    /// One data frame, then an error (a caller that went away).
    struct Broken(u8);
    impl http_body::Body for Broken {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0 += 1;
            std::task::Poll::Ready(Some(match self.0 {
                1 => Ok(Frame::data(Bytes::from_static(b"part"))),
                _ => Err(std::io::Error::other("reset")),
            }))
        }
    }

    #[tokio::test]
    async fn a_broken_body_means_the_caller_is_gone() {
        let mut w = BodyWatch::new(Broken(0));
        tokio::time::timeout(Duration::from_secs(5), w.gone()).await.expect("noticed");
    }
}
