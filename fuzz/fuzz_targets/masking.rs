//! The masking engine: text, JSON, headers and streams, under a few plans
//! (built-in detectors, a custom one, header and JSON members) with an
//! injected credential.
//!
//! Invariants: no panic; the injected credential never survives masking of
//! text, JSON or a header; a stream, cut into chunks anywhere (and paused
//! after each, letting complete lines out early), lets out
//! exactly what masking the whole text at once gives.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portcullis::{
    credentials::Secret,
    masking::{
        spec::{self, CustomDetector, MaskSettings},
        HeaderOutcome, NullAs, Outcome, Plan, SessionMasker,
    },
};

const CREDENTIAL: &str = "Inj3cted-Cr3dential-0042";

const PLANS: [&[&str]; 4] = [
    &["detector:*"],
    &["detector:email=partial:4", "detector:card", "detector:token=hash", "json:password", "header:x-secret"],
    &["detector:private-key", "detector:jwt=null", "detector:emp"],
    &[],
];

fn maskers() -> &'static [SessionMasker] {
    static M: OnceLock<Vec<SessionMasker>> = OnceLock::new();
    M.get_or_init(|| {
        let settings = MaskSettings {
            hash_key: None,
            detectors: vec![CustomDetector { name: "emp".into(), pattern: r"EMP-[0-9]{6}".into() }],
            max_json_body: None,
        };
        let names = settings.custom_names();
        let key = Secret::new("fuzzing-hash-key-0123456789abcdef");
        let injected = Secret::new(CREDENTIAL);
        PLANS
            .iter()
            .map(|entries| {
                let rules: Vec<_> = entries.iter().map(|e| spec::parse_rule(e, &names).expect("rule")).collect();
                let plan = Arc::new(Plan::compile(&settings, &rules).expect("plan"));
                SessionMasker::new(plan, Some(&key), &[&injected]).expect("masker")
            })
            .collect()
    })
}

fn whole(m: &mut SessionMasker, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match m.mask_text(text, NullAs::Remove, &mut out) {
        Outcome::Unchanged => text.to_vec(),
        Outcome::Masked => out,
        Outcome::Null => unreachable!("NullAs::Remove never answers Null"),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let [sel, chunk, text @ ..] = data else { return };
    let mut m = maskers()[*sel as usize % PLANS.len()].clone();
    let credential = CREDENTIAL.as_bytes();

    let masked = whole(&mut m, text);
    if contains(text, credential) {
        assert!(!contains(&masked, credential), "credential survived mask_text");
    }

    let mut json = Vec::new();
    let outcome = m.mask_json(text, &mut json);
    let json = if outcome == Outcome::Unchanged { text.to_vec() } else { json };
    if contains(text, credential) {
        assert!(!contains(&json, credential), "credential survived mask_json");
    }

    match m.mask_header("x-fuzz", text) {
        HeaderOutcome::Keep => assert!(!contains(text, credential), "credential kept in a header"),
        HeaderOutcome::Replace(v) => assert!(!contains(&v, credential), "credential survived mask_header"),
        HeaderOutcome::Remove => {}
    }

    // The stream, in chunks of 1..=256 bytes.
    let size = *chunk as usize + 1;
    let mut s = m.stream(0);
    let mut out = Vec::new();
    for c in text.chunks(size) {
        s.push(c, &mut out);
    }
    s.finish(&mut out);
    assert!(
        out == masked,
        "stream (chunks of {size}) differs from whole-text masking\nstream: {:?}\nwhole:  {:?}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&masked)
    );

    // The same with a pause after every chunk: complete lines let out early
    // come out as masking the whole text gives them.
    let mut s = m.stream(0);
    let mut out = Vec::new();
    for c in text.chunks(size) {
        s.push(c, &mut out);
        s.release_lines(&mut out);
    }
    s.finish(&mut out);
    assert!(
        out == masked,
        "stream (chunks of {size}, paused) differs from whole-text masking\nstream: {:?}\nwhole:  {:?}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&masked)
    );
});
