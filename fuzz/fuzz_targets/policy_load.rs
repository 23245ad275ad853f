//! The policy loader on any text (host names are not resolved: the fuzzer
//! must not send made-up names to a resolver).
//!
//! Invariants: no panic; every error points into the text (line and column
//! from 1, the line within the text); a policy that loads decides requests
//! for each of its roles and targets without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::{self, address, decide_sql, SqlRequest};

fuzz_target!(|data: &[u8]| {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(address::disable_name_resolution);
    let Ok(src) = std::str::from_utf8(data) else { return };
    match policy::parse(src) {
        Err(errors) => {
            assert!(!errors.is_empty(), "refused with no error");
            let lines = src.split('\n').count();
            for e in &errors {
                assert!(e.line >= 1 && e.line <= lines, "{e:?} outside {lines} lines");
                assert!(e.column >= 1, "{e:?}");
            }
        }
        Ok(p) => {
            let read = SqlRequest { classes: vec!["read"], tables: vec!["public.t"], ..Default::default() };
            for t in &p.targets {
                for r in &p.roles {
                    let _ = decide_sql(&p, Some(&r.name), t, &read);
                }
                let _ = decide_sql(&p, None, t, &read);
            }
        }
    }
});
