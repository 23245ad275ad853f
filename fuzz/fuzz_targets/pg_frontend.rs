//! PostgreSQL frontend (caller to server) messages: the start-up packet and
//! the tagged frames after it, decoded the way the enforcer decodes them.
//!
//! Invariants: no panic; framing returns frames that put back together give
//! the bytes consumed; the start-up parameters and ErrorResponse fields
//! round-trip through the writers; SQL in Query/Parse is classified without
//! panicking (on a thread with the runtime's stack size).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::protocols::postgres::{
    classify::classify,
    rows::bind_fields,
    wire::{self, cstr, cstr_utf8, i32_at, FrameReader, MAX_STARTUP},
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

/// The start-up phase: reads one packet as the enforcer does, then decodes
/// its parameters when it is a protocol 3.0 start-up.
fn startup(data: &[u8]) {
    let mut reader = FrameReader::new(data);
    let packet = runtime().block_on(reader.startup_packet());
    let Ok(Some(body)) = packet else { return };
    assert!(body.len() + 4 <= MAX_STARTUP);
    if body.len() < 4 {
        return;
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    if code != wire::PROTOCOL_3_0 {
        return;
    }
    if let Ok(params) = wire::startup_params(&body[4..]) {
        // Round trip: written back and read again, the same parameters.
        if params.iter().any(|(k, v)| k.is_empty() || k.contains('\0') || v.contains('\0')) {
            return;
        }
        let mut out = BytesMut::new();
        wire::startup(&mut out, &params);
        let again = wire::startup_params(&out[8..]).expect("a written start-up packet reads back");
        assert_eq!(again, params);
    }
}

fn frames(data: &[u8]) {
    let mut reader = FrameReader::with_buffer(tokio::io::empty(), BytesMut::from(data));
    let mut consumed = 0usize;
    loop {
        let frame = match reader.try_frame() {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => break,
        };
        // The frame is exactly the bytes it was cut from.
        assert_eq!(&data[consumed..consumed + frame.raw.len()], &frame.raw[..]);
        let len = u32::from_be_bytes([frame.raw[1], frame.raw[2], frame.raw[3], frame.raw[4]]) as usize;
        assert_eq!(len + 1, frame.raw.len());
        consumed += frame.raw.len();
        let mut body = frame.body();
        match frame.tag {
            b'Q' => {
                if let Ok(sql) = cstr_utf8(&mut body) {
                    let _ = classify_on_runtime_stack(sql);
                }
            }
            b'P' => {
                if cstr(&mut body).is_ok() {
                    if let Ok(sql) = cstr_utf8(&mut body) {
                        let _ = classify_on_runtime_stack(sql);
                    }
                }
            }
            b'B' => {
                let _ = bind_fields(body);
            }
            b'D' | b'C' => {
                if let Some((_, mut rest)) = body.split_first() {
                    let _ = cstr(&mut rest);
                }
            }
            b'E' => {
                let _ = cstr(&mut body);
            }
            b'F' => {
                let _ = i32_at(&mut body);
            }
            _ => {}
        }
    }
}

/// Classification runs on tokio worker threads (2 MiB stacks): a statement
/// that overflows such a stack would take the whole agent down.
fn classify_on_runtime_stack(sql: &str) -> bool {
    let sql = sql.to_string();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || classify(&sql).is_ok())
        .expect("thread")
        .join()
        .expect("classify panicked")
}

fn error_round_trip(data: &[u8]) {
    let text = String::from_utf8_lossy(data).replace('\0', "");
    let (code, rest) = text.split_at(text.char_indices().nth(5).map_or(text.len(), |(i, _)| i));
    let (message, detail) = rest.split_once('\n').map_or((rest, None), |(m, d)| (m, Some(d)));
    let mut out = BytesMut::new();
    wire::error_response(&mut out, wire::Severity::Error, code, message, detail);
    let body = &out[5..];
    assert_eq!(wire::error_field(body, b'C'), Some(code.as_bytes()));
    assert_eq!(wire::error_field(body, b'M'), Some(message.as_bytes()));
    assert_eq!(wire::error_field(body, b'D'), detail.map(str::as_bytes));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => startup(rest),
        1 => frames(rest),
        _ => error_round_trip(rest),
    }
});
