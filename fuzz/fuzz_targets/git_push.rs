//! git's smart-HTTP parsing: pkt-lines, the receive-pack request head,
//! the info/refs advertisement, and the pushed pack with its deltas.
//!
//! Invariants: no panic; pkt-line reading always moves forward or stops;
//! pack reading stays within its limits (small ones here, so an object
//! that claims a huge size is a failure of the limits, not of memory).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::protocols::git::{
    pack::{self, Limits},
    pktline,
    wire::{self, ObjectFormat},
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            let mut pos = 0;
            loop {
                let before = pos;
                match pktline::read(rest, &mut pos) {
                    Ok(Some(_)) => assert!(pos > before && pos <= rest.len(), "pkt-line reader did not advance"),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        1 => {
            if let Ok(req) = wire::parse_push(rest) {
                let _ = req.sideband();
                let _ = req.expects_pack();
            }
        }
        2 => {
            if let Ok(adv) = wire::parse_advertisement(rest) {
                let _ = adv.format();
            }
        }
        _ => {
            let limits = Limits { max_objects: 1_000, max_inflated: 4 << 20, max_commit: 1 << 20 };
            for format in [ObjectFormat::Sha1, ObjectFormat::Sha256] {
                if let Ok(commits) = pack::read_commits(rest, format, limits) {
                    assert!(commits.objects <= limits.max_objects);
                }
            }
            if let Some((base, delta)) = rest.split_at_checked(rest.len() / 2) {
                if let Ok(out) = pack::apply_delta(base, delta, 1 << 20) {
                    assert!(out.len() <= 1 << 20);
                }
            }
        }
    }
});
