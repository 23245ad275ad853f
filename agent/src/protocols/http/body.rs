//! Bodies streamed through the enforcer, frame by frame: nothing is
//! buffered whole. The request side counts and enforces the rule's size
//! limit; the response side counts and, when it ends (or the caller goes
//! away), reports the exchange.
use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type on both sides of the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// Counters of one exchange, shared by its two bodies.
#[derive(Debug, Default)]
pub struct Exchange {
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// The request body went over the rule's limit and was cut.
    pub over_limit: AtomicBool,
}

/// The request body was cut at the rule's limit.
#[derive(Debug, thiserror::Error)]
#[error("request body is over max_body ({0} bytes)")]
pub struct OverLimit(pub u64);

pin_project_lite::pin_project! {
    /// The caller's request body on its way upstream: counted, and cut with
    /// an error (which aborts the upstream request) past `limit`.
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        limit: Option<u64>,
        seen: u64,
        exchange: Arc<Exchange>,
    }
}

impl<B> RequestBody<B> {
    pub fn new(inner: B, limit: Option<u64>, exchange: Arc<Exchange>) -> Self {
        RequestBody { inner, limit, seen: 0, exchange }
    }
}

impl<B> HttpBody for RequestBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if let Some(limit) = *this.limit {
                        if *this.seen > limit {
                            this.exchange.over_limit.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(Box::new(OverLimit(limit)))));
                        }
                    }
                    this.exchange.bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called once when a response body is done: at its end, on an error, or
/// when the caller stops reading (dropped).
pub trait OnEnd: Send + 'static {
    fn on_end(self: Box<Self>, exchange: &Exchange, error: Option<String>);
}

pin_project_lite::pin_project! {
    /// The upstream's response body on its way to the caller: counted, and
    /// reported once when it ends.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        exchange: Arc<Exchange>,
        on_end: Option<Box<dyn OnEnd>>,
        error: Option<String>,
        done: bool,
    }

    impl<B> PinnedDrop for ResponseBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(f) = this.on_end.take() {
                let error = this.error.take().or_else(|| (!*this.done).then(|| "the caller stopped reading".to_string()));
                f.on_end(this.exchange, error);
            }
        }
    }
}

impl<B> ResponseBody<B> {
    pub fn new(inner: B, exchange: Arc<Exchange>, on_end: Box<dyn OnEnd>) -> Self {
        ResponseBody { inner, exchange, on_end: Some(on_end), error: None, done: false }
    }
}

impl<B> HttpBody for ResponseBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.exchange.bytes_down.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                *this.error = Some(format!("upstream body: {e}"));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                *this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Report(Arc<Mutex<Option<Option<String>>>>);
    impl OnEnd for Report {
        fn on_end(self: Box<Self>, _: &Exchange, error: Option<String>) {
            *self.0.lock().unwrap() = Some(error);
        }
    }

    /// `n` data frames of `size` bytes.
    struct Chunks(usize, usize);
    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.1])))))
        }
    }

    fn chunks(n: usize, size: usize) -> Body {
        Chunks(n, size).boxed_unsync()
    }

    #[tokio::test]
    async fn request_bodies_are_counted_and_cut_at_the_limit() {
        let ex = Arc::new(Exchange::default());
        let body = RequestBody::new(chunks(4, 100), Some(400), ex.clone());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 400);
        assert_eq!(ex.bytes_up.load(Ordering::Relaxed), 400);
        assert!(!ex.over_limit.load(Ordering::Relaxed));

        let ex = Arc::new(Exchange::default());
        let body = RequestBody::new(chunks(5, 100), Some(400), ex.clone());
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("max_body"), "{err}");
        assert!(ex.over_limit.load(Ordering::Relaxed));
        assert_eq!(ex.bytes_up.load(Ordering::Relaxed), 400, "the chunk over the limit is not forwarded");
    }

    #[tokio::test]
    async fn response_bodies_report_once_at_the_end_or_when_dropped() {
        let ex = Arc::new(Exchange::default());
        let seen = Arc::new(Mutex::new(None));
        let body = ResponseBody::new(chunks(3, 10), ex.clone(), Box::new(Report(seen.clone())));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 30);
        assert_eq!(*seen.lock().unwrap(), Some(None), "reported, without error");
        assert_eq!(ex.bytes_down.load(Ordering::Relaxed), 30);

        let seen = Arc::new(Mutex::new(None));
        let mut body = ResponseBody::new(chunks(3, 10), ex.clone(), Box::new(Report(seen.clone())));
        let _ = body.frame().await;
        drop(body);
        let got = seen.lock().unwrap().clone();
        assert!(got.unwrap().unwrap().contains("stopped reading"));
    }
}
