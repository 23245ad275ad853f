//! The SQL classifier: any text, classified on a thread with the stack size
//! of a tokio worker (2 MiB), as in the enforcer.
//!
//! Invariants: no panic, no stack overflow, the same answer twice (the
//! enforcer caches classifications by text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::protocols::postgres::classify::classify;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    let sql = sql.to_string();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let first = classify(&sql);
            assert_eq!(first, classify(&sql));
        })
        .expect("thread")
        .join()
        .expect("classify panicked");
});
