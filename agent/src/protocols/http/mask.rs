//! Masking HTTP responses with the role's rule (and always the target's own
//! injected credentials):
//! - headers through [`SessionMasker::mask_header`] (`header:` entries
//!   whole, else detectors and credentials; `Set-Cookie` like any other);
//! - JSON bodies (`application/json`, `*+json`) as one document, string
//!   leaves with their escapes decoded, up to `[masking] max_json_body`;
//!   a longer document is masked as a text stream instead (the detectors
//!   work on its raw text; escaped forms such as `\u0040` are then not
//!   decoded);
//! - text bodies (`text/*`, forms, XML, JavaScript, YAML, NDJSON, and any
//!   type not known to be binary, or none) as a stream with a hold-back
//!   window, so a secret split across chunks is caught;
//! - `gzip`, `deflate` and `br` bodies are decoded, masked and sent
//!   uncoded (without Content-Encoding and Content-Length); the caller's
//!   Accept-Encoding is cut to those codings, and a body in any other
//!   coding is refused (502);
//! - binary bodies (images, audio, video, fonts, archives, PDF,
//!   `application/octet-stream`, git packs) pass byte for byte, searched
//!   only for the injected credentials: one found whole in a chunk is
//!   overwritten in place (same length), one that straddles a chunk
//!   boundary ends the response with an error.
use std::{
    io::{self, Write},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::body::BoxError;
use crate::masking::{secrets::Injected, HeaderOutcome, Outcome, SessionMasker, StreamMasker};

/// How a response body is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Json,
    Text,
    Binary,
}

/// The kind of a body from its Content-Type. Unknown or missing types are
/// text: scanned, not trusted.
pub fn classify(content_type: Option<&HeaderValue>) -> Kind {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else { return Kind::Text };
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let (top, sub) = essence.split_once('/').unwrap_or((essence.as_str(), ""));
    match (top, sub) {
        ("application", "json") | ("text", "json") => Kind::Json,
        ("application", s) if s.ends_with("+json") => Kind::Json,
        ("image" | "audio" | "video" | "font", _) => Kind::Binary,
        (
            "application",
            "octet-stream"
            | "zip"
            | "gzip"
            | "x-gzip"
            | "x-tar"
            | "x-bzip2"
            | "x-xz"
            | "zstd"
            | "x-7z-compressed"
            | "pdf"
            | "wasm"
            | "x-git-upload-pack-result"
            | "x-git-receive-pack-result"
            | "x-git-upload-pack-advertisement"
            | "x-git-receive-pack-advertisement"
            | "vnd.git-lfs"
            | "protobuf"
            | "x-protobuf"
            | "grpc"
            | "msgpack"
            | "x-msgpack"
            | "cbor",
        ) => Kind::Binary,
        _ => Kind::Text,
    }
}

/// A Content-Encoding portcullis can take off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
}

/// The body's coding, or why it cannot be decoded (several codings, or
/// one not supported).
pub fn coding(headers: &HeaderMap) -> Result<Coding, String> {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity");
    let first = codings.next();
    if let Some(second) = codings.next() {
        return Err(format!("the response is coded more than once ({}, {second})", first.unwrap_or_default()));
    }
    match first.as_deref() {
        None => Ok(Coding::Identity),
        Some("gzip" | "x-gzip") => Ok(Coding::Gzip),
        Some("deflate") => Ok(Coding::Deflate),
        Some("br") => Ok(Coding::Brotli),
        Some(other) => Err(format!("the response's Content-Encoding `{other}` cannot be decoded for masking")),
    }
}

/// The caller's Accept-Encoding cut to what can be decoded for masking
/// (`identity` if nothing is left).
pub fn accept_encoding(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            let name = t.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            matches!(name.as_str(), "gzip" | "x-gzip" | "deflate" | "br" | "identity")
        })
        .map(str::to_string)
        .collect();
    let value = if kept.is_empty() { "identity".to_string() } else { kept.join(", ") };
    headers.remove(header::ACCEPT_ENCODING);
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(header::ACCEPT_ENCODING, v);
    }
}

/// Headers that frame the message: never rewritten by masking.
fn framing(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::CONTENT_ENCODING
}

/// Masks response headers in place. Returns how many were changed.
pub fn mask_headers(m: &mut SessionMasker, headers: &mut HeaderMap) -> usize {
    let old = std::mem::take(headers);
    let mut changed = 0;
    let mut last: Option<HeaderName> = None;
    for (name, value) in old {
        let name = match name {
            Some(n) => {
                last = Some(n.clone());
                n
            }
            None => last.clone().expect("a header map starts with a name"),
        };
        if framing(&name) {
            headers.append(name, value);
            continue;
        }
        match m.mask_header(name.as_str(), value.as_bytes()) {
            HeaderOutcome::Keep => {
                headers.append(name, value);
            }
            HeaderOutcome::Replace(bytes) => {
                changed += 1;
                // A masked value that is not a valid header value goes.
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    headers.append(name, v);
                }
            }
            HeaderOutcome::Remove => changed += 1,
        }
    }
    changed
}

/// Takes a Content-Encoding off, chunk by chunk.
pub enum Decoder {
    Gzip(Box<flate2::write::MultiGzDecoder<Vec<u8>>>),
    Zlib(Box<flate2::write::ZlibDecoder<Vec<u8>>>),
    Deflate(Box<flate2::write::DeflateDecoder<Vec<u8>>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    /// `deflate` before its first two bytes tell zlib from raw deflate.
    Sniffing(Vec<u8>),
}

/// Input is fed in pieces this big, so one chunk cannot inflate without
/// bound before its output is taken.
const PIECE: usize = 16 * 1024;

impl Decoder {
    pub fn new(c: Coding) -> Option<Decoder> {
        match c {
            Coding::Identity => None,
            Coding::Gzip => Some(Decoder::Gzip(Box::new(flate2::write::MultiGzDecoder::new(Vec::new())))),
            Coding::Deflate => Some(Decoder::Sniffing(Vec::new())),
            Coding::Brotli => {
                Some(Decoder::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(Vec::new(), 16 * 1024))))
            }
        }
    }

    fn sink(&mut self) -> &mut Vec<u8> {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zlib(d) => d.get_mut(),
            Decoder::Deflate(d) => d.get_mut(),
            Decoder::Brotli(d) => d.get_mut(),
            Decoder::Sniffing(_) => unreachable!("sniffed first"),
        }
    }

    fn write(&mut self, piece: &[u8]) -> io::Result<()> {
        match self {
            Decoder::Gzip(d) => d.write_all(piece),
            Decoder::Zlib(d) => d.write_all(piece),
            Decoder::Deflate(d) => d.write_all(piece),
            Decoder::Brotli(d) => d.write_all(piece),
            Decoder::Sniffing(_) => unreachable!("sniffed first"),
        }
    }

    /// Decides zlib or raw deflate once two bytes are in.
    fn sniff(&mut self, input: &[u8], last: bool) -> io::Result<Option<Vec<u8>>> {
        let Decoder::Sniffing(head) = self else { return Ok(None) };
        head.extend_from_slice(input);
        if head.len() < 2 && !last {
            return Ok(Some(Vec::new()));
        }
        let head = std::mem::take(head);
        let zlib = head.len() >= 2 && head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
        *self = if zlib {
            Decoder::Zlib(Box::new(flate2::write::ZlibDecoder::new(Vec::new())))
        } else {
            Decoder::Deflate(Box::new(flate2::write::DeflateDecoder::new(Vec::new())))
        };
        Ok(Some(head))
    }

    /// Decodes `input`, appending the plain bytes to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let sniffed = self.sniff(input, false)?;
        let input = match &sniffed {
            Some(head) if head.is_empty() => return Ok(()),
            Some(head) => head.as_slice(),
            None => input,
        };
        for piece in input.chunks(PIECE) {
            self.write(piece)?;
            out.append(self.sink());
        }
        Ok(())
    }

    /// The coded stream ended: the rest of the plain bytes.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if let Some(head) = self.sniff(&[], true)? {
            for piece in head.chunks(PIECE) {
                self.write(piece)?;
                out.append(self.sink());
            }
        }
        match self {
            Decoder::Gzip(d) => d.try_finish()?,
            Decoder::Zlib(d) => d.try_finish()?,
            Decoder::Deflate(d) => d.try_finish()?,
            Decoder::Brotli(d) => d.close()?,
            Decoder::Sniffing(_) => {}
        }
        out.append(self.sink());
        Ok(())
    }
}

/// What a masked body does with its bytes.
enum Mode {
    /// Buffering a JSON document (up to `cap` bytes).
    Json {
        m: SessionMasker,
        buf: Vec<u8>,
        cap: usize,
        window: usize,
    },
    Text(StreamMasker),
    /// Binary: only the injected credentials are looked for.
    Binary {
        injected: Injected,
        tail: Vec<u8>,
    },
}

/// Why a masked response was cut short.
#[derive(Debug, thiserror::Error)]
pub enum MaskBodyError {
    #[error("the response body could not be decoded: {0}")]
    Decode(io::Error),
    #[error("an injected credential straddles two chunks of a binary response; the response was cut")]
    Straddle,
    #[error("a JSON response over max_json_body cannot have its json: members masked; the response was cut")]
    JsonTooLarge,
}

/// How long a text body's input may pause before the complete lines held
/// back are let out (see `StreamMasker::release_lines`): server-sent events
/// and followed logs reach the caller as they come, not a window at a time.
pub const PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

pin_project_lite::pin_project! {
    /// A response body on its way to the caller, masked.
    pub struct MaskedBody<B> {
        #[pin]
        inner: B,
        mode: Mode,
        decoder: Option<Decoder>,
        done: bool,
        // Running while the input pauses with text held back; None once it
        // fired, until more input comes.
        pause: Option<Pin<Box<tokio::time::Sleep>>>,
        paused: bool,
    }
}

impl<B> MaskedBody<B> {
    /// A JSON document masked whole (a text stream past `cap` bytes).
    pub fn json(inner: B, m: SessionMasker, cap: usize, window: usize, decoder: Option<Decoder>) -> Self {
        MaskedBody {
            inner,
            mode: Mode::Json { m, buf: Vec::new(), cap, window },
            decoder,
            done: false,
            pause: None,
            paused: false,
        }
    }

    /// A text stream masked with a hold-back `window`.
    pub fn text(inner: B, m: &SessionMasker, window: usize, decoder: Option<Decoder>) -> Self {
        MaskedBody { inner, mode: Mode::Text(m.stream(window)), decoder, done: false, pause: None, paused: false }
    }

    /// A binary body searched for the injected credentials (given raw),
    /// after `decoder` takes off its Content-Encoding (the credential is
    /// not seen in compressed bytes).
    pub fn binary(inner: B, secrets: &[&[u8]], decoder: Option<Decoder>) -> Self {
        let (injected, _) = Injected::new(secrets);
        MaskedBody {
            inner,
            mode: Mode::Binary { injected, tail: Vec::new() },
            decoder,
            done: false,
            pause: None,
            paused: false,
        }
    }
}

impl Mode {
    /// Takes plain bytes; appends what may go out now.
    fn push(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), MaskBodyError> {
        match self {
            Mode::Json { m, buf, cap, window } => {
                buf.extend_from_slice(data);
                if buf.len() > *cap {
                    // Too long to hold: masked as text the detectors still
                    // work, but members masked by name would go out whole.
                    if m.masks_json_members() {
                        return Err(MaskBodyError::JsonTooLarge);
                    }
                    let mut s = m.stream(*window);
                    s.push(buf, out);
                    *self = Mode::Text(s);
                }
            }
            Mode::Text(s) => s.push(data, out),
            Mode::Binary { injected, tail } => {
                let start = out.len();
                out.extend_from_slice(data);
                binary_scan(injected, tail, &mut out[start..])?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        match self {
            Mode::Json { m, buf, .. } => {
                if m.mask_json(buf, out) == Outcome::Unchanged {
                    out.append(buf);
                }
            }
            Mode::Text(s) => s.finish(out),
            Mode::Binary { .. } => {}
        }
    }
}

/// Overwrites the injected credentials found whole in `chunk` (same
/// length); `tail` is the end of what went out before, to see a credential
/// that began there (which cannot be taken back: an error).
fn binary_scan(injected: &Injected, tail: &mut Vec<u8>, chunk: &mut [u8]) -> Result<(), MaskBodyError> {
    if injected.is_empty() {
        return Ok(());
    }
    let keep = injected.longest().saturating_sub(1);
    let mut text = std::mem::take(tail);
    let from = text.len();
    text.extend_from_slice(chunk);
    let mut found = Vec::new();
    injected.find(&text, &mut found);
    for f in &found {
        if f.start < from {
            return Err(MaskBodyError::Straddle);
        }
        chunk[f.start - from..f.end - from].fill(b'*');
        text[f.start..f.end].fill(b'*');
    }
    let cut = text.len().saturating_sub(keep);
    text.drain(..cut);
    *tail = text;
    Ok(())
}

impl<B> HttpBody for MaskedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(None);
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => {
                    let Mode::Text(s) = this.mode else { return Poll::Pending };
                    if *this.paused || s.held() == 0 {
                        return Poll::Pending;
                    }
                    let pause = this.pause.get_or_insert_with(|| Box::pin(tokio::time::sleep(PAUSE)));
                    if std::future::Future::poll(pause.as_mut(), cx).is_pending() {
                        return Poll::Pending;
                    }
                    *this.pause = None;
                    *this.paused = true;
                    let mut out = Vec::new();
                    s.release_lines(&mut out);
                    if out.is_empty() {
                        return Poll::Pending;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                }
                Poll::Ready(Some(Err(e))) => {
                    // Nothing held back goes out after an error.
                    *this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    *this.pause = None;
                    *this.paused = false;
                    // Trailers are not masked: they are dropped.
                    let Ok(data) = frame.into_data() else { continue };
                    let mut out = Vec::new();
                    let r = match this.decoder.as_mut() {
                        Some(d) => {
                            let mut plain = Vec::new();
                            d.push(&data, &mut plain)
                                .map_err(MaskBodyError::Decode)
                                .and_then(|()| this.mode.push(&plain, &mut out))
                        }
                        None => this.mode.push(&data, &mut out),
                    };
                    if let Err(e) = r {
                        *this.done = true;
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                    }
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    let mut out = Vec::new();
                    if let Some(d) = this.decoder.as_mut() {
                        let mut plain = Vec::new();
                        let r = d
                            .finish(&mut plain)
                            .map_err(MaskBodyError::Decode)
                            .and_then(|()| this.mode.push(&plain, &mut out));
                        if let Err(e) = r {
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    }
                    this.mode.finish(&mut out);
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.mode, &self.decoder) {
            // Same-length rewriting keeps the length.
            (Mode::Binary { .. }, None) => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;

    use super::*;
    use crate::{
        credentials::Secret,
        masking::{spec, MaskSettings, Plan},
    };

    fn masker(entries: &[&str], injected: &[&str]) -> SessionMasker {
        let rules: Vec<_> = entries.iter().map(|e| spec::parse_rule(e, &[]).unwrap()).collect();
        let plan = Arc::new(Plan::compile(&MaskSettings::default(), &rules).unwrap());
        let secrets: Vec<Secret> = injected.iter().map(|s| Secret::new(*s)).collect();
        let refs: Vec<&Secret> = secrets.iter().collect();
        SessionMasker::new(plan, None, &refs).unwrap()
    }

    /// A body of these chunks.
    fn chunks(parts: Vec<Vec<u8>>) -> impl HttpBody<Data = Bytes, Error = BoxError> {
        struct S(std::collections::VecDeque<Vec<u8>>);
        impl HttpBody for S {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(Bytes::from(c)))))
            }
        }
        S(parts.into())
    }

    async fn collect(b: impl HttpBody<Data = Bytes, Error = BoxError>) -> Result<String, BoxError> {
        Ok(String::from_utf8(b.collect().await?.to_bytes().to_vec()).unwrap())
    }

    #[test]
    fn content_types() {
        let c = |s: &'static str| classify(Some(&HeaderValue::from_static(s)));
        assert_eq!(c("application/json; charset=utf-8"), Kind::Json);
        assert_eq!(c("application/problem+json"), Kind::Json);
        assert_eq!(c("text/plain"), Kind::Text);
        assert_eq!(c("application/x-www-form-urlencoded"), Kind::Text);
        assert_eq!(c("application/xml"), Kind::Text);
        assert_eq!(c("application/x-ndjson"), Kind::Text);
        assert_eq!(c("application/vnd.unknown"), Kind::Text, "unknown types are scanned");
        assert_eq!(classify(None), Kind::Text);
        assert_eq!(c("image/png"), Kind::Binary);
        assert_eq!(c("application/octet-stream"), Kind::Binary);
    }

    #[test]
    fn codings_and_accept_encoding() {
        let mut h = HeaderMap::new();
        assert_eq!(coding(&h), Ok(Coding::Identity));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(coding(&h), Ok(Coding::Gzip));
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        assert!(coding(&h).is_err());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip, br"));
        assert!(coding(&h).is_err());

        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("zstd, br;q=0.9, gzip"));
        accept_encoding(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "br;q=0.9, gzip");
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("zstd"));
        accept_encoding(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "identity");
    }

    #[test]
    fn headers_are_masked_but_framing_is_not() {
        let mut m = masker(&["detector:email", "header:x-internal"], &["Tok3n-Secret-Value"]);
        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("who=bob@example.com; Path=/"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("plain=1"));
        h.insert("x-echo", HeaderValue::from_static("Bearer Tok3n-Secret-Value"));
        h.insert("x-internal", HeaderValue::from_static("anything"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert_eq!(mask_headers(&mut m, &mut h), 3);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["who=<email>; Path=/", "plain=1"]);
        assert_eq!(h["x-echo"], "Bearer <credential>");
        assert_eq!(h["x-internal"], "****");
        assert_eq!(h[header::CONTENT_LENGTH], "10");
    }

    #[tokio::test]
    async fn json_documents_are_masked_whole_and_past_the_cap_as_text() {
        let m = masker(&["detector:email"], &[]);
        let doc = br#"{"mail": "\u0061lice@example.com", "n": 1}"#.to_vec();
        let parts = doc.chunks(5).map(<[u8]>::to_vec).collect();
        let got = collect(MaskedBody::json(chunks(parts), m.clone(), 1 << 20, 256, None)).await.unwrap();
        assert_eq!(got, r#"{"mail": "<email>", "n": 1}"#);
        // Over the cap: the raw text is masked.
        let doc = format!(r#"{{"pad": "{}", "mail": "carol@example.com"}}"#, "x".repeat(3000));
        let parts = doc.as_bytes().chunks(100).map(<[u8]>::to_vec).collect();
        let got = collect(MaskedBody::json(chunks(parts), m, 1000, 256, None)).await.unwrap();
        assert!(got.contains(r#""mail": "<email>""#) && !got.contains("carol"), "{got}");
        // With members masked by name, over the cap is cut, not let out.
        let m = masker(&["json:ssn"], &[]);
        let doc = format!(r#"{{"pad": "{}", "ssn": "078-05-1120"}}"#, "x".repeat(3000));
        let parts = doc.as_bytes().chunks(100).map(<[u8]>::to_vec).collect();
        assert!(collect(MaskedBody::json(chunks(parts), m, 1000, 256, None)).await.is_err());
    }

    #[tokio::test]
    async fn coded_bodies_are_decoded_and_masked() {
        let m = masker(&["detector:email"], &[]);
        let text = format!("{} dave@example.com {}", "a".repeat(5000), "b".repeat(5000));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(text.as_bytes()).unwrap();
        let zl = zl.finish().unwrap();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(text.as_bytes()).unwrap();
        let raw = raw.finish().unwrap();
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut text.as_bytes(), &mut br, &Default::default()).unwrap();
        let want = text.replace("dave@example.com", "<email>");
        for (coded, c) in [(gz, Coding::Gzip), (zl, Coding::Deflate), (raw, Coding::Deflate), (br, Coding::Brotli)] {
            for size in [1, 7, 1000] {
                let parts = coded.chunks(size).map(<[u8]>::to_vec).collect();
                let body = MaskedBody::text(chunks(parts), &m, 256, Decoder::new(c));
                assert_eq!(collect(body).await.unwrap(), want, "{c:?} in chunks of {size}");
            }
        }
        // A broken stream is an error, not a short body.
        let body = MaskedBody::text(chunks(vec![b"not gzip at all".to_vec()]), &m, 256, Decoder::new(Coding::Gzip));
        assert!(collect(body).await.is_err());
    }

    #[tokio::test]
    async fn binary_bodies_only_lose_the_credential() {
        let secret = "Inj3cted-Secret-Token";
        let mut data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        data.splice(1000..1000, secret.bytes());
        let parts = vec![data[..900].to_vec(), data[900..].to_vec()];
        let got = MaskedBody::binary(chunks(parts), &[secret.as_bytes()], None).collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), data.len(), "same length");
        assert_eq!(&got[1000..1000 + secret.len()], "*".repeat(secret.len()).as_bytes());
        assert_eq!(&got[..1000], &data[..1000]);
        assert_eq!(&got[1000 + secret.len()..], &data[1000 + secret.len()..]);
        // Split across chunks: the response is cut.
        let parts = vec![data[..1005].to_vec(), data[1005..].to_vec()];
        assert!(MaskedBody::binary(chunks(parts.clone()), &[secret.as_bytes()], None).collect().await.is_err());
        // A coded body is searched decoded (and sent decoded).
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let gz = e.finish().unwrap();
        assert!(!gz.windows(secret.len()).any(|w| w == secret.as_bytes()), "not visible coded");
        let body = MaskedBody::binary(chunks(vec![gz]), &[secret.as_bytes()], Decoder::new(Coding::Gzip));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), data.len(), "decoded");
        assert_eq!(&got[1000..1000 + secret.len()], "*".repeat(secret.len()).as_bytes());
    }
}
