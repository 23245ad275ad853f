//! Writes audit records through the real `Audit` handle, for the crash
//! test and the benchmark.
//!
//! `audit-writer burst DIR WRITERS [COUNT]`: WRITERS tasks each append
//! durable records (session = writer, bytes_up = its counter) and print
//! `ack WRITER N SEQ` once each is acknowledged; forever, or COUNT records
//! per writer.
//!
//! `audit-writer bench DIR WRITERS RECORDS FSYNC`: RECORDS records in all,
//! from WRITERS concurrent tasks, each waiting for its record to be
//! durable, with fsync policy FSYNC (always | group | never); prints one
//! JSON object with the rate.
use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use portcullis::{
    audit::{Audit, AuditConfig, DecisionInfo, Event, RequestInfo},
    ids::SessionId,
};

fn usage() -> ! {
    eprintln!("usage: audit-writer burst DIR WRITERS [COUNT] | bench DIR WRITERS RECORDS always|group|never");
    std::process::exit(2)
}

fn config(dir: PathBuf) -> AuditConfig {
    let mut c = AuditConfig::new(dir);
    c.max_age = None;
    c.max_bytes = None;
    c.segment_bytes = 1 << 20;
    c
}

/// A record of realistic size: one SQL statement and its decision.
fn statement(writer: u64, n: u64) -> Event {
    Event::Decision {
        session: SessionId(writer),
        request: RequestInfo::Postgres {
            sql: format!("UPDATE accounts SET balance = balance - 10 WHERE id = {n} AND owner = 'writer-{writer}'"),
            kind: "UPDATE".into(),
            classes: vec!["write".into()],
            tables: vec!["public.accounts".into()],
            functions: vec![],
        },
        decision: DecisionInfo {
            verdict: "allow".into(),
            role: Some("deployer".into()),
            rule: "roles[2].rules[0].allow".into(),
            reason: "write is allowed for role deployer on app-db".into(),
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> u64 { args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()) };
    match args.get(1).map(String::as_str) {
        Some("burst") => {
            let dir = PathBuf::from(args.get(2).unwrap_or_else(|| usage()));
            let writers = num(3);
            let count = args.get(4).map(|_| num(4));
            let audit = Audit::open(config(dir)).unwrap_or_else(|e| panic!("open: {e}"));
            let out = Arc::new(Mutex::new(std::io::stdout()));
            let mut tasks = Vec::new();
            for w in 0..writers {
                let (audit, out) = (audit.clone(), out.clone());
                tasks.push(tokio::spawn(async move {
                    let mut n = 0;
                    while count.is_none_or(|c| n < c) {
                        let ev = Event::SessionEnd {
                            session: SessionId(w),
                            reason: format!("burst {n}"),
                            bytes_up: n,
                            bytes_down: 0,
                        };
                        let seq = audit.append_durable(ev).await.unwrap_or_else(|e| panic!("durable write: {e}"));
                        let mut o = out.lock().unwrap();
                        writeln!(o, "ack {w} {n} {seq}").unwrap();
                        o.flush().unwrap();
                        n += 1;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            audit.sync().await.unwrap();
        }
        Some("bench") => {
            let dir = PathBuf::from(args.get(2).unwrap_or_else(|| usage()));
            let writers = num(3);
            let records = num(4);
            let mut c = config(dir);
            c.fsync = args.get(5).unwrap_or_else(|| usage()).parse().unwrap_or_else(|_| usage());
            let audit = Audit::open(c).unwrap_or_else(|e| panic!("open: {e}"));
            let per = records / writers;
            let start = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let audit = audit.clone();
                tasks.push(tokio::spawn(async move {
                    for n in 0..per {
                        audit.record_durable(statement(w, n)).await.unwrap_or_else(|e| panic!("durable write: {e}"));
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let secs = start.elapsed().as_secs_f64();
            let fsyncs = audit.stats().fsyncs.load(std::sync::atomic::Ordering::Relaxed);
            let total = per * writers;
            println!(
                "{}",
                serde_json::json!({"records": total, "writers": writers, "secs": secs, "per_sec": total as f64 / secs, "fsyncs": fsyncs})
            );
        }
        _ => usage(),
    }
}
