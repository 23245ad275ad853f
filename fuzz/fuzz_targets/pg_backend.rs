//! PostgreSQL backend (server to caller) messages through the response
//! side's shape tracker, after a fuzzed list of what the request side said
//! to expect.
//!
//! Invariants: no panic; framing gives back exactly the input bytes;
//! RowDescription decodes to at most as many columns as it has room for.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use portcullis::masking::Mode;
use portcullis::protocols::postgres::{
    rows::{row_description, Pending, Tracker},
    wire::{self, FrameReader},
};

/// Statements that read a masked relation carry the mode for computed
/// columns; half the time, one.
fn masked(b: u8) -> Option<Mode> {
    (b & 32 != 0).then_some(Mode::Null)
}

fn pending(b: u8, i: usize) -> Pending {
    let name = format!("s{}", b >> 4);
    match b % 11 {
        0 => Pending::Query(masked(b)),
        1 => Pending::FunctionCall,
        2 => Pending::Parse,
        3 => Pending::Bind { portal: name.clone(), statement: name, formats: vec![(b & 1) as i16] },
        4 => Pending::DescribeStatement(name),
        5 => Pending::DescribePortal(name),
        6 => Pending::Execute(name, masked(b)),
        7 => Pending::Close { portal: b & 16 != 0, name },
        8 => Pending::Sync,
        _ => Pending::Denial { id: i as u64, simple: b & 1 != 0, error: Bytes::from_static(b"E\0\0\0\x04") },
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = (n as usize % 16).min(rest.len());
    let (script, stream) = rest.split_at(n);
    let mut tracker = Tracker::default();
    for (i, &b) in script.iter().enumerate() {
        tracker.expect(pending(b, i));
    }
    let mut reader = FrameReader::with_buffer(tokio::io::empty(), BytesMut::from(stream));
    let mut consumed = 0;
    let mut out = BytesMut::new();
    while let Ok(Some(frame)) = reader.try_frame() {
        assert_eq!(&stream[consumed..consumed + frame.raw.len()], &frame.raw[..]);
        consumed += frame.raw.len();
        if frame.tag == b'T' {
            if let Ok(cols) = row_description(frame.body()) {
                // Each column takes at least 19 bytes.
                assert!(cols.len() * 19 <= frame.body().len());
            }
        }
        if frame.tag == b'E' || frame.tag == b'N' {
            let _ = wire::error_field(frame.body(), b'M');
            let _ = wire::error_fields(frame.body()).count();
        }
        if tracker.observe(&frame).is_err() {
            break;
        }
        let _ = tracker.row_shape();
        let _ = tracker.denial(0);
        if frame.tag == b'D' {
            out.clear();
            // A row that cannot be masked ends the session in the proxy.
            if tracker.data_row(&frame, &mut out).is_err() {
                break;
            }
        }
    }
});
