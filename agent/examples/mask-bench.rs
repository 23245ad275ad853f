//! The timing half of `cargo xtask bench masking` (which makes the corpus
//! and runs this in release): one thread, timed by the thread's own CPU
//! clock, so figures are per core whatever else the machine is doing.
use std::{hint::black_box, sync::Arc, time::Duration};

use portcullis::{
    credentials::Secret,
    masking::{
        spec::{parse_rule, MaskSettings},
        CatalogRow, FieldDesc, NullAs, Plan, ResolvedColumns, RowPlan, SessionMasker,
    },
};

const TABLE_OID: u32 = 16_384;
const INJECTED: &str = "Upstream-Pa55word-4-app";

struct Corpus {
    columns: Vec<(String, u32)>,
    rows: Vec<Vec<u8>>,
}

fn load(path: &str) -> Corpus {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let nl = data.iter().position(|&b| b == b'\n').expect("header line");
    let columns = std::str::from_utf8(&data[..nl])
        .expect("utf-8 header")
        .split(',')
        .map(|c| {
            let (n, t) = c.split_once(':').expect("name:oid");
            (n.to_string(), t.parse().expect("oid"))
        })
        .collect();
    let mut rows = Vec::new();
    let mut pos = nl + 1;
    while pos < data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        rows.push(data[pos + 4..pos + 4 + len].to_vec());
        pos += 4 + len;
    }
    Corpus { columns, rows }
}

fn values(body: &[u8]) -> Vec<&[u8]> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut pos = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[pos..pos + 4].try_into().unwrap());
        pos += 4;
        if len >= 0 {
            out.push(&body[pos..pos + len as usize]);
            pos += len as usize;
        }
    }
    out
}

fn masker(entries: &[&str]) -> SessionMasker {
    let settings = MaskSettings::default();
    let rules: Vec<_> = entries.iter().map(|e| parse_rule(e, &[]).expect("entry")).collect();
    let plan = Arc::new(Plan::compile(&settings, &rules).expect("plan"));
    let injected = Secret::new(INJECTED);
    let key = Secret::new("bench-hash-key-0123456789");
    SessionMasker::new(plan, Some(&key), &[&injected]).expect("session")
}

/// The calling thread's CPU time.
struct Instant(Duration);

impl Instant {
    fn now() -> Instant {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid clock id and a valid out pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Instant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    fn elapsed(&self) -> Duration {
        Instant::now().0.saturating_sub(self.0)
    }
}

/// Runs `f` (one pass) until `min` has passed; returns passes per second.
fn rate(min: Duration, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: caches, lazy DFA states
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < min {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: mask-bench CORPUS");
    let corpus = load(&path);
    let all_values: Vec<&[u8]> = corpus.rows.iter().flat_map(|r| values(r)).collect();
    let bytes: usize = all_values.iter().map(|v| v.len()).sum();
    let mb = bytes as f64 / 1e6;
    let secs = Duration::from_secs(2);

    println!(
        "masking: {} rows x {} columns, {:.1} MB of values; one thread, thread CPU time",
        corpus.rows.len(),
        corpus.columns.len(),
        mb
    );
    println!("detector throughput (MB/s of values per core):");
    {
        // The path PostgreSQL results take: each row's DataRow rewritten,
        // its text values scanned together.
        let mut m = masker(&["detector:*"]);
        let fields: Vec<FieldDesc> = corpus
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, t))| FieldDesc { table_oid: TABLE_OID, attnum: i as i16 + 1, type_oid: *t, binary: false })
            .collect();
        let plan = RowPlan::new(&ResolvedColumns::default(), &fields, None);
        let mut body = Vec::with_capacity(4096);
        let mut changed = 0;
        let r = rate(secs, || {
            changed = 0;
            for row in &corpus.rows {
                body.clear();
                if m.mask_data_row(&plan, row, &mut body).expect("well-formed row") {
                    changed += 1;
                }
                black_box(&body);
            }
        });
        println!("  {:<42} {:>8.0}   ({changed} rows changed)", "rows (DataRow), all detectors + credential", r * mb);
    }
    println!("  value by value:");
    let mut out = Vec::with_capacity(4096);
    let mut value_rate = |label: &str, entries: &[&str]| {
        let mut m = masker(entries);
        let mut masked = 0usize;
        let r = rate(secs, || {
            masked = 0;
            for v in &all_values {
                out.clear();
                if m.mask_text(v, NullAs::Whole, &mut out) != portcullis::masking::Outcome::Unchanged {
                    masked += 1;
                }
                black_box(&out);
            }
        });
        println!("  {label:<42} {:>8.0}   ({masked} values masked)", r * mb);
    };
    value_rate("all detectors + injected credential", &["detector:*"]);
    value_rate("all detectors, hash mode", &["detector:*=hash"]);
    for d in ["email", "card", "iban", "jwt", "aws-key", "private-key", "token"] {
        value_rate(&format!("{d} only"), &[&format!("detector:{d}")]);
    }
    value_rate("injected credential only", &[]);

    // The notes as one text stream, in 16 KiB chunks.
    let text: Vec<u8> = all_values.join(&b'\n');
    let m = masker(&["detector:*"]);
    let r = rate(secs, || {
        let mut s = m.stream(4096);
        let mut out = Vec::with_capacity(text.len() + 1024);
        for c in text.chunks(16 * 1024) {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        black_box(&out);
    });
    println!("  {:<42} {:>8.0}", "stream, 16 KiB chunks, 4 KiB window", r * text.len() as f64 / 1e6);

    // The rows as one JSON document.
    let mut json = String::from("[");
    for (i, row) in corpus.rows.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push('{');
        for (j, v) in values(row).iter().enumerate() {
            if j > 0 {
                json.push(',');
            }
            json.push_str(&serde_json::to_string(&corpus.columns[j].0).unwrap());
            json.push(':');
            json.push_str(&serde_json::to_string(&String::from_utf8_lossy(v)).unwrap());
        }
        json.push('}');
    }
    json.push(']');
    let mut m = masker(&["detector:*"]);
    let mut out = Vec::with_capacity(json.len() + 4096);
    let r = rate(secs, || {
        out.clear();
        m.mask_json(json.as_bytes(), &mut out);
        black_box(&out);
    });
    println!("  {:<42} {:>8.0}", "JSON document (string leaves)", r * json.len() as f64 / 1e6);

    // A 1,000-row result: DataRow messages forwarded as they are, against
    // rewritten through a plan with two masked columns and every detector.
    let rows = &corpus.rows[..1000.min(corpus.rows.len())];
    let mut m = masker(&["column:public.customers.email", "column:public.customers.phone=partial:4", "detector:*"]);
    let catalog = corpus.columns.iter().enumerate().map(|(i, (n, _))| CatalogRow {
        schema: "public".into(),
        table: "customers".into(),
        column: n.clone(),
        table_oid: TABLE_OID,
        attnum: i as i16 + 1,
        relation: ("public".into(), "customers".into()),
    });
    let resolved = ResolvedColumns::resolve(m.plan().column_rules(), catalog);
    let fields: Vec<FieldDesc> = corpus
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, t))| FieldDesc { table_oid: TABLE_OID, attnum: i as i16 + 1, type_oid: *t, binary: false })
        .collect();
    let plan = RowPlan::new(&resolved, &fields, None);
    let wire: usize = rows.iter().map(|r| r.len() + 5).sum();
    let mut out: Vec<u8> = Vec::with_capacity(2 * wire);
    let plain = median(201, || {
        out.clear();
        for r in rows {
            out.push(b'D');
            out.extend_from_slice(&((r.len() + 4) as u32).to_be_bytes());
            out.extend_from_slice(r);
        }
        black_box(&out);
    });
    let mut body = Vec::with_capacity(4096);
    let mut changed = 0;
    let masked = median(201, || {
        out.clear();
        changed = 0;
        for r in rows {
            body.clear();
            let b: &[u8] = if m.mask_data_row(&plan, r, &mut body).expect("well-formed row") {
                changed += 1;
                &body
            } else {
                r
            };
            out.push(b'D');
            out.extend_from_slice(&((b.len() + 4) as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
        black_box(&out);
    });
    println!(
        "1,000-row result ({} columns, {:.0} KB on the wire; {changed} rows changed), median of 201:",
        corpus.columns.len(),
        wire as f64 / 1e3
    );
    println!("  {:<42} {:>8.0} us", "no masking (forwarded as is)", plain.as_secs_f64() * 1e6);
    println!("  {:<42} {:>8.0} us", "masked (2 columns + every detector)", masked.as_secs_f64() * 1e6);
    println!(
        "  {:<42} {:>8.0} us   ({:.2} us per row)",
        "added by masking",
        (masked.saturating_sub(plain)).as_secs_f64() * 1e6,
        masked.saturating_sub(plain).as_secs_f64() * 1e6 / rows.len() as f64
    );
}
