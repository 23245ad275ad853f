//! The PostgreSQL wire format: framing, the few fields the enforcer reads,
//! and the messages it writes itself. Frames are cut out of one read buffer
//! without copying (`Bytes` shares the buffer) and written through one
//! write buffer that is flushed when the input runs dry, so pipelined
//! traffic costs one read and one write system call per batch.
use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Startup-phase request codes (the int32 after the length).
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// Largest message accepted from either side (PostgreSQL's own limit for
/// most messages is 1 GB; a caller has no business sending that much in one).
pub const MAX_MESSAGE: usize = 256 << 20;
/// Most the read buffer grows by ahead of the bytes that fill it.
const RESERVE_STEP: usize = 64 << 10;
/// Largest startup packet (PostgreSQL: 10000 bytes).
pub const MAX_STARTUP: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message of {0} bytes is too long")]
    TooLong(usize),
}

/// One typed message: its tag and the whole frame (tag and length
/// included), so forwarding it unchanged is a copy of `raw`.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The message body after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Reads frames from a stream through one buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: BytesMut::with_capacity(16 * 1024) }
    }

    pub fn with_buffer(inner: R, buf: BytesMut) -> Self {
        FrameReader { inner, buf }
    }

    /// A complete frame already buffered, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(WireError::Malformed("length below 4"));
        }
        if len > MAX_MESSAGE {
            return Err(WireError::TooLong(len));
        }
        if self.buf.len() < len + 1 {
            // Grow with what arrives, not with what the length claims: five
            // bytes must not make the enforcer allocate MAX_MESSAGE.
            self.buf.reserve((len + 1 - self.buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        let tag = self.buf[0];
        Ok(Some(Frame { tag, raw: self.buf.split_to(len + 1).freeze() }))
    }

    /// Reads more bytes; false at end of stream.
    pub async fn fill(&mut self) -> Result<bool, WireError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        Ok(self.inner.read_buf(&mut self.buf).await? > 0)
    }

    /// The next frame, reading as needed; None at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(Some(f));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() { Ok(None) } else { Err(WireError::Malformed("truncated message")) };
            }
        }
    }

    /// A startup-phase packet (no tag): its body after the length.
    pub async fn startup_packet(&mut self) -> Result<Option<Bytes>, WireError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
                if !(8..=MAX_STARTUP).contains(&len) {
                    return Err(WireError::Malformed("startup packet length"));
                }
                if self.buf.len() >= len {
                    let mut p = self.buf.split_to(len);
                    p.advance(4);
                    return Ok(Some(p.freeze()));
                }
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Malformed("truncated startup packet"))
                };
            }
        }
    }

    /// Whether bytes are buffered that have not been returned yet.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// How many bytes are buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// A write buffer in front of a stream.
pub struct FrameWriter<W> {
    inner: W,
    pub buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner, buf: BytesMut::with_capacity(16 * 1024) }
    }

    pub fn push(&mut self, raw: &[u8]) {
        self.buf.extend_from_slice(raw);
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Flushes when the buffer grew past a bound (long result sets).
    pub async fn flush_if_large(&mut self) -> io::Result<()> {
        if self.buf.len() >= 64 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.inner.shutdown().await
    }
}

/// Reads a NUL-terminated string at the front of `b`, advancing past it.
pub fn cstr<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], WireError> {
    let end = memchr(0, b).ok_or(WireError::Malformed("unterminated string"))?;
    let s = &b[..end];
    *b = &b[end + 1..];
    Ok(s)
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

pub fn cstr_utf8<'a>(b: &mut &'a [u8]) -> Result<&'a str, WireError> {
    std::str::from_utf8(cstr(b)?).map_err(|_| WireError::Malformed("string is not UTF-8"))
}

pub fn i16_at(b: &mut &[u8]) -> Result<i16, WireError> {
    if b.len() < 2 {
        return Err(WireError::Malformed("short message"));
    }
    let v = i16::from_be_bytes([b[0], b[1]]);
    *b = &b[2..];
    Ok(v)
}

pub fn i32_at(b: &mut &[u8]) -> Result<i32, WireError> {
    if b.len() < 4 {
        return Err(WireError::Malformed("short message"));
    }
    let v = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    *b = &b[4..];
    Ok(v)
}

/// Starts a typed message in `out`; returns where its length goes.
fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    at
}

fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    // A NUL inside would end the field early: drop it.
    out.extend(s.iter().copied().filter(|&b| b != 0));
    out.put_u8(0);
}

/// Severity of an error the enforcer reports itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// An ErrorResponse with severity, SQLSTATE, message and optional detail.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, message: &str, detail: Option<&str>) {
    let at = begin(out, b'E');
    let sev: &[u8] = match severity {
        Severity::Error => b"ERROR",
        Severity::Fatal => b"FATAL",
    };
    out.put_u8(b'S');
    put_cstr(out, sev);
    out.put_u8(b'V');
    put_cstr(out, sev);
    out.put_u8(b'C');
    put_cstr(out, code.as_bytes());
    out.put_u8(b'M');
    put_cstr(out, message.as_bytes());
    if let Some(d) = detail {
        out.put_u8(b'D');
        put_cstr(out, d.as_bytes());
    }
    out.put_u8(0);
    finish(out, at);
}

/// A NoticeResponse (severity NOTICE) with SQLSTATE and message.
pub fn notice_response(out: &mut BytesMut, code: &str, message: &str) {
    let at = begin(out, b'N');
    out.put_u8(b'S');
    put_cstr(out, b"NOTICE");
    out.put_u8(b'V');
    put_cstr(out, b"NOTICE");
    out.put_u8(b'C');
    put_cstr(out, code.as_bytes());
    out.put_u8(b'M');
    put_cstr(out, message.as_bytes());
    out.put_u8(0);
    finish(out, at);
}

/// Writes an ErrorResponse or NoticeResponse (`tag`) with `fields`.
pub fn fields_message<'a>(out: &mut BytesMut, tag: u8, fields: impl IntoIterator<Item = (u8, &'a [u8])>) {
    let at = begin(out, tag);
    for (code, value) in fields {
        out.put_u8(code);
        put_cstr(out, value);
    }
    out.put_u8(0);
    finish(out, at);
}

/// Fields of an ErrorResponse or NoticeResponse body.
pub fn error_fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&code, tail) = rest.split_first()?;
        if code == 0 {
            return None;
        }
        let end = memchr(0, tail)?;
        let value = &tail[..end];
        rest = &tail[end + 1..];
        Some((code, value))
    })
}

pub fn error_field(body: &[u8], code: u8) -> Option<&[u8]> {
    error_fields(body).find(|(c, _)| *c == code).map(|(_, v)| v)
}

pub fn auth_ok(out: &mut BytesMut) {
    let at = begin(out, b'R');
    out.put_i32(0);
    finish(out, at);
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, key: i32) {
    let at = begin(out, b'K');
    out.put_i32(pid);
    out.put_i32(key);
    finish(out, at);
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let at = begin(out, b'S');
    put_cstr(out, name.as_bytes());
    put_cstr(out, value.as_bytes());
    finish(out, at);
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let at = begin(out, b'Z');
    out.put_u8(status);
    finish(out, at);
}

pub fn query(out: &mut BytesMut, sql: &str) {
    let at = begin(out, b'Q');
    put_cstr(out, sql.as_bytes());
    finish(out, at);
}

/// Parse of `sql` into the named statement `name`, without parameter types.
pub fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    let at = begin(out, b'P');
    put_cstr(out, name.as_bytes());
    put_cstr(out, sql.as_bytes());
    out.put_i16(0);
    finish(out, at);
}

/// A startup message (protocol 3.0) with the given parameters.
pub fn startup(out: &mut BytesMut, params: &[(String, String)]) {
    let at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(out, k.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    out.put_u8(0);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(out: &mut BytesMut, pid: i32, key: i32) {
    out.put_i32(16);
    out.put_i32(CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_i32(key);
}

/// Reads startup parameters (name/value pairs up to an empty name).
pub fn startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut out = Vec::new();
    loop {
        let k = cstr_utf8(&mut body)?;
        if k.is_empty() {
            return Ok(out);
        }
        let v = cstr_utf8(&mut body)?;
        out.push((k.to_string(), v.to_string()));
    }
}

/// Writes one raw frame to a stream right away (start-up phase).
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_are_cut_from_one_buffer() {
        let mut out = BytesMut::new();
        query(&mut out, "SELECT 1");
        ready_for_query(&mut out, b'I');
        let mut r = FrameReader::new(&out[..]);
        let q = r.next().await.unwrap().unwrap();
        assert_eq!(q.tag, b'Q');
        assert_eq!(q.body(), b"SELECT 1\0");
        let z = r.next().await.unwrap().unwrap();
        assert_eq!((z.tag, z.body()), (b'Z', &b"I"[..]));
        assert!(r.next().await.unwrap().is_none());
    }

    #[test]
    fn a_claimed_length_does_not_allocate_ahead_of_the_bytes() {
        // A 5-byte header claiming 200 MB must not reserve 200 MB.
        let header = [b'Q', 0x0c, 0x00, 0x00, 0x00];
        let mut r = FrameReader::with_buffer(tokio::io::empty(), BytesMut::from(&header[..]));
        assert!(r.try_frame().unwrap().is_none());
        assert!(r.buf.capacity() <= 2 * RESERVE_STEP, "capacity {}", r.buf.capacity());
    }

    #[tokio::test]
    async fn bad_lengths_are_refused() {
        let bad = [b'Q', 0, 0, 0, 2];
        let mut r = FrameReader::new(&bad[..]);
        assert!(matches!(r.next().await, Err(WireError::Malformed(_))));
        let huge = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        let mut r = FrameReader::new(&huge[..]);
        assert!(matches!(r.next().await, Err(WireError::TooLong(_))));
        let truncated = [b'Q', 0, 0, 0, 9, b'S'];
        let mut r = FrameReader::new(&truncated[..]);
        assert!(r.next().await.is_err());
    }

    #[test]
    fn error_responses_round_trip() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Error, "42501", "no\0pe", Some("why"));
        let body = &out[5..];
        assert_eq!(error_field(body, b'C'), Some(&b"42501"[..]));
        assert_eq!(error_field(body, b'M'), Some(&b"nope"[..]));
        assert_eq!(error_field(body, b'D'), Some(&b"why"[..]));
        assert_eq!(error_field(body, b'S'), Some(&b"ERROR"[..]));
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
    }

    #[test]
    fn startup_round_trips() {
        let mut out = BytesMut::new();
        let params = vec![("user".to_string(), "a".to_string()), ("database".to_string(), "b".to_string())];
        startup(&mut out, &params);
        let len = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
        assert_eq!(len, out.len());
        assert_eq!(i32::from_be_bytes([out[4], out[5], out[6], out[7]]), PROTOCOL_3_0);
        assert_eq!(startup_params(&out[8..]).unwrap(), params);
    }
}
