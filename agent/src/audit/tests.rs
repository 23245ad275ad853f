//! The log through its public handle, on a real directory.
use std::{fs, io::Write, path::Path};

use serde_json::Value;

use super::*;
use crate::{
    credentials::Secret,
    ids::{OrigDst, SessionId},
};

fn cfg(dir: &Path) -> AuditConfig {
    let mut c = AuditConfig::new(dir);
    c.max_age = None;
    c.max_bytes = None;
    c
}

fn exported(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    query::export(dir, None, &mut out).unwrap();
    String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn end(session: u64, n: u64) -> Event {
    Event::SessionEnd { session: SessionId(session), reason: format!("n={n}"), bytes_up: n, bytes_down: 0 }
}

fn start(session: u64) -> Event {
    Event::SessionStart {
        session: SessionId(session),
        caller: CallerInfo { comm: "psql".into(), tgid: 7, unit: Some("ci.service".into()), ..Default::default() },
        target: "db".into(),
        protocol: "postgres".into(),
        orig_dst: OrigDst("127.0.0.53:5432".parse().unwrap()),
        role: Some("reader".into()),
    }
}

#[tokio::test]
async fn durable_records_come_back_in_order_with_their_chain() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::open(cfg(dir.path())).unwrap();
    audit.record(Event::AgentStart { version: "t".into(), listen_port: 1 });
    let seq = audit.append_durable(end(1, 1)).await.unwrap();
    assert_eq!(seq, 2);
    audit.record_durable(end(1, 2)).await.unwrap();
    let recs = exported(dir.path());
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0]["type"], "agent_start");
    assert_eq!(recs[0]["listen_port"], 1);
    assert!(recs[0]["time_ms"].as_u64().unwrap() > 0);
    assert_eq!(recs[2]["reason"], "n=2");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        if i > 0 {
            assert_eq!(r["prev_hash"], recs[i - 1]["hash"]);
        }
    }
    let rep = read::verify(dir.path()).unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!((rep.records, rep.last_seq), (3, Some(3)));
    assert_eq!(rep.head_hash, recs[2]["hash"]);
    // A second handle on the same directory is refused.
    assert!(matches!(Audit::open(cfg(dir.path())), Err(AuditError::Locked { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sessions_keep_their_own_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_bytes = 8 << 10; // many segments
    let audit = Audit::open(c).unwrap();
    let mut tasks = Vec::new();
    for s in 0..32u64 {
        let a = audit.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..100u64 {
                if n % 10 == 0 {
                    a.record_durable(end(s, n)).await.unwrap();
                } else {
                    a.record(end(s, n));
                }
                if n % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    audit.sync().await.unwrap();
    let recs = exported(dir.path());
    assert_eq!(recs.len(), 3200);
    let mut next = std::collections::HashMap::new();
    for r in &recs {
        let s = r["session"].as_str().unwrap().to_string();
        let n = r["bytes_up"].as_u64().unwrap();
        let want = next.entry(s.clone()).or_insert(0u64);
        assert_eq!(n, *want, "session {s} out of order");
        *want += 1;
    }
    assert!(format::list_segments(dir.path()).unwrap().len() > 5);
    assert!(read::verify(dir.path()).unwrap().ok);
}

#[tokio::test]
async fn registered_credentials_never_reach_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::open(cfg(dir.path())).unwrap();
    let pw = "Tr0ub4dor&3/horse";
    audit.register_secret(&Secret::new(pw));
    let b64 = data_encoding::BASE64.encode(format!("app:{pw}").as_bytes());
    let url = "Tr0ub4dor%263%2Fhorse";
    audit
        .record_durable(Event::Decision {
            session: SessionId(9),
            request: RequestInfo::Postgres {
                sql: format!("ALTER ROLE app PASSWORD '{pw}'"),
                kind: "ALTER ROLE".into(),
                classes: vec!["dcl".into()],
                tables: vec![],
                functions: vec![],
            },
            decision: DecisionInfo { verdict: "deny".into(), role: None, rule: "r".into(), reason: pw.into() },
        })
        .await
        .unwrap();
    audit.record(Event::Response {
        session: SessionId(9),
        summary: ResponseSummary {
            status: Some("200".into()),
            content: Some(format!(
                "Authorization: Basic {b64}\nnext={url}\nhex={}",
                data_encoding::HEXLOWER.encode(pw.as_bytes())
            )),
            ..Default::default()
        },
    });
    audit.sync().await.unwrap();
    let mut raw = Vec::new();
    for s in format::list_segments(dir.path()).unwrap() {
        raw.extend(fs::read(s.path).unwrap());
    }
    let text = String::from_utf8_lossy(&raw);
    for needle in [pw, "Tr0ub4dor", url, &b64, &data_encoding::HEXLOWER.encode(pw.as_bytes())] {
        assert!(!text.contains(needle), "{needle} found in the log");
    }
    let recs = exported(dir.path());
    assert_eq!(recs[0]["request"]["sql"], "ALTER ROLE app PASSWORD '[REDACTED]'");
    assert!(recs[1]["summary"]["content"].as_str().unwrap().contains("next=[REDACTED]"));
    assert!(read::verify(dir.path()).unwrap().ok);
}

#[tokio::test]
async fn response_content_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.response_cap = 10;
    let audit = Audit::open(c).unwrap();
    let summary = ResponseSummary { content: Some("ééééééééééé".into()), bytes: 22, ..Default::default() };
    audit.record_durable(Event::Response { session: SessionId(1), summary }).await.unwrap();
    let recs = exported(dir.path());
    assert_eq!(recs[0]["summary"]["content"], "ééééé");
    assert_eq!(recs[0]["summary"]["truncated"], true);
    assert_eq!(recs[0]["summary"]["bytes"], 22);
}

#[tokio::test]
async fn a_flipped_byte_in_an_old_segment_is_named_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_bytes = 2048;
    let audit = Audit::open(c).unwrap();
    for n in 0..200 {
        audit.record(end(1, n));
        if n % 10 == 0 {
            audit.sync().await.unwrap();
        }
    }
    audit.sync().await.unwrap();
    drop(audit);
    let segs = format::list_segments(dir.path()).unwrap();
    assert!(segs.len() > 4);
    // The 5th record of the second segment.
    let victim = &segs[1];
    let bytes = fs::read(&victim.path).unwrap();
    let mut off = format::HEADER_LEN;
    for _ in 0..4 {
        off = format::read_frame(&bytes, off).unwrap().unwrap().end as usize;
    }
    let frame = format::read_frame(&bytes, off).unwrap().unwrap();
    let seq = frame.seq;
    let mut damaged = bytes.clone();
    damaged[off + format::FRAME_OVERHEAD + 5] ^= 0x01;
    fs::write(&victim.path, &damaged).unwrap();

    let rep = read::verify(dir.path()).unwrap();
    assert!(!rep.ok);
    let p = rep.problem.unwrap();
    assert_eq!((p.segment.as_path(), p.offset, p.seq), (victim.path.as_path(), off as u64, Some(seq)));
    assert!(p.reason.contains("checksum"), "{p}");
    assert_eq!(rep.last_seq, Some(seq - 1), "everything before it checked out");

    // An edit that also fixes the checksum breaks the chain instead.
    let mut forged = bytes.clone();
    let payload_at = off + format::FRAME_OVERHEAD;
    let len = u32::from_le_bytes(forged[off..off + 4].try_into().unwrap()) as usize;
    let pos = payload_at + forged[payload_at..payload_at + len].windows(2).position(|w| w == b"n=").unwrap() + 2;
    forged[pos] = if forged[pos] == b'9' { b'8' } else { b'9' };
    let crc = crc32fast::hash(&forged[off + 8..payload_at + len]);
    forged[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
    fs::write(&victim.path, &forged).unwrap();
    let rep = read::verify(dir.path()).unwrap();
    let p = rep.problem.unwrap();
    assert_eq!(p.seq, Some(seq + 1), "{p}");
    assert!(p.reason.contains(&format!("record {seq}")) && p.reason.contains("altered"), "{p}");

    // A whole segment removed from the middle.
    fs::write(&victim.path, &bytes).unwrap();
    assert!(read::verify(dir.path()).unwrap().ok);
    fs::remove_file(&segs[2].path).unwrap();
    let p = read::verify(dir.path()).unwrap().problem.unwrap();
    assert!(p.reason.contains("missing"), "{p}");
}

#[tokio::test]
async fn retention_is_recorded_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_bytes = 4096;
    let audit = Audit::open(c.clone()).unwrap();
    for n in 0..400 {
        audit.record(end(1, n));
        if n % 10 == 0 {
            audit.sync().await.unwrap();
        }
    }
    audit.sync().await.unwrap();
    assert!(audit.close(std::time::Duration::from_secs(10)));
    let before = format::list_segments(dir.path()).unwrap();
    let total: u64 = before.iter().map(|s| s.size).sum();
    // Reopen with a size limit of half: retention runs at open.
    c.max_bytes = Some(total / 2);
    let audit = open_retrying(c);
    audit.sync().await.unwrap();
    let after = format::list_segments(dir.path()).unwrap();
    // Only whole segments went, the oldest ones, and the rest is untouched
    // (the reopened log may have started one new segment at the end).
    let gone = before.iter().take_while(|b| !after.iter().any(|a| a.path == b.path)).count();
    assert!(gone > 0, "retention deleted nothing");
    let kept = &before[gone..];
    assert!(after.len() >= kept.len() && after.len() <= kept.len() + 1, "{} kept, {} after", kept.len(), after.len());
    for (i, (b, a)) in kept.iter().zip(&after).enumerate() {
        assert_eq!(b.path, a.path);
        if i + 1 < kept.len() {
            assert_eq!(b.size, a.size, "a closed segment changed");
        }
    }
    let recs = exported(dir.path());
    let ret = recs.iter().find(|r| r["type"] == "retention").expect("retention record");
    assert_eq!(ret["reason"], "size");
    assert_eq!(ret["deleted"].as_array().unwrap().len(), gone);
    assert_eq!(ret["first_seq"], after[0].first_seq);
    assert_eq!(recs[0]["seq"], after[0].first_seq);
    let rep = read::verify(dir.path()).unwrap();
    assert!(rep.ok, "{rep:?}");

    // Without the retention record, the missing start is reported. Cut the
    // log just before the retention record, wherever it landed.
    assert!(audit.close(std::time::Duration::from_secs(10)));
    let mut cut = false;
    for seg in &format::list_segments(dir.path()).unwrap() {
        if cut {
            fs::remove_file(&seg.path).unwrap();
            continue;
        }
        let bytes = fs::read(&seg.path).unwrap();
        let mut off = format::HEADER_LEN;
        while let Some(f) = format::read_frame(&bytes, off).unwrap() {
            if memchr::memmem::find(f.payload, br#""retention""#).is_some() {
                fs::write(&seg.path, &bytes[..off]).unwrap();
                cut = true;
                break;
            }
            off = f.end as usize;
        }
    }
    assert!(cut, "the retention record is in the log");
    let p = read::verify(dir.path()).unwrap().problem.unwrap();
    assert!(p.reason.contains("no retention record"), "{p}");
}

#[tokio::test]
async fn a_torn_tail_is_cut_at_open_and_the_cut_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::open(cfg(dir.path())).unwrap();
    for n in 0..5 {
        audit.record_durable(end(1, n)).await.unwrap();
    }
    assert!(audit.close(std::time::Duration::from_secs(10)));
    let seg = format::list_segments(dir.path()).unwrap().pop().unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(&seg.path).unwrap();
    f.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let rep = read::verify(dir.path()).unwrap();
    assert!(rep.ok, "a torn tail is not damage");
    assert_eq!(rep.torn_tail.unwrap().offset, seg.size);

    let audit = open_retrying(cfg(dir.path()));
    audit.record_durable(end(1, 5)).await.unwrap();
    let recs = exported(dir.path());
    assert_eq!(recs.len(), 7);
    assert_eq!(recs[5]["type"], "recovery");
    assert_eq!(recs[5]["offset"], seg.size);
    assert_eq!(recs[5]["cut_bytes"], 7);
    assert_eq!(recs[6]["reason"], "n=5");
    let rep = read::verify(dir.path()).unwrap();
    assert!(rep.ok && rep.torn_tail.is_none(), "{rep:?}");
}

fn open_retrying(c: AuditConfig) -> Audit {
    for _ in 0..100 {
        match Audit::open(c.clone()) {
            Err(AuditError::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return other.unwrap(),
        }
    }
    panic!("log stayed locked");
}

#[tokio::test]
async fn fsync_policies_all_write_the_same_log() {
    for policy in [FsyncPolicy::Always, FsyncPolicy::Group, FsyncPolicy::Never] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.fsync = policy;
        let audit = Audit::open(c).unwrap();
        for n in 0..10 {
            audit.record(end(2, n));
        }
        assert_eq!(audit.append_durable(end(2, 10)).await.unwrap(), 11);
        let recs = exported(dir.path());
        assert_eq!(recs.len(), 11, "{policy}");
        assert!(read::verify(dir.path()).unwrap().ok);
    }
}

#[tokio::test]
async fn sessions_are_summarised_and_replayed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::open(cfg(dir.path())).unwrap();
    let id = 0xabcdef;
    audit.record(start(id));
    audit.record(start(0x1));
    audit.record(Event::Decision {
        session: SessionId(id),
        request: RequestInfo::Session,
        decision: DecisionInfo {
            verdict: "allow".into(),
            role: Some("reader".into()),
            rule: "roles[0]".into(),
            reason: "ok".into(),
        },
    });
    audit.record(Event::Decision {
        session: SessionId(id),
        request: RequestInfo::Postgres {
            sql: "SELECT email FROM users".into(),
            kind: "SELECT".into(),
            classes: vec!["read".into()],
            tables: vec![],
            functions: vec![],
        },
        decision: DecisionInfo {
            verdict: "allow".into(),
            role: None,
            rule: "roles[0].rules[0]".into(),
            reason: "".into(),
        },
    });
    audit.record(Event::Response {
        session: SessionId(id),
        summary: ResponseSummary {
            status: Some("SELECT 2".into()),
            rows: Some(2),
            bytes: 80,
            content: Some("email\n[masked]\n[masked]".into()),
            truncated: false,
        },
    });
    audit.record(Event::Decision {
        session: SessionId(id),
        request: RequestInfo::Postgres {
            sql: "DROP TABLE users".into(),
            kind: "DROP TABLE".into(),
            classes: vec!["ddl".into()],
            tables: vec![],
            functions: vec![],
        },
        decision: DecisionInfo {
            verdict: "deny".into(),
            role: None,
            rule: "roles[0].rules[0]".into(),
            reason: "ddl is denied".into(),
        },
    });
    audit.record(Event::SessionEnd {
        session: SessionId(id),
        reason: "client closed".into(),
        bytes_up: 50,
        bytes_down: 120,
    });
    audit.sync().await.unwrap();

    let all = query::sessions(dir.path()).unwrap();
    assert_eq!(all.len(), 2);
    let s = &all[0];
    assert_eq!(s.session, SessionId(id).to_string());
    assert_eq!((s.decisions, s.allowed, s.denied, s.responses), (3, 2, 1, 1));
    assert_eq!((s.unit.as_deref(), s.target.as_str(), s.bytes_down), (Some("ci.service"), "db", 120));
    assert_eq!(s.end_reason.as_deref(), Some("client closed"));
    let f = query::Filter { decision: Some("deny".into()), ..Default::default() };
    assert_eq!(all.iter().filter(|s| f.matches(s)).count(), 1);
    let f = query::Filter { unit: Some(globset::Glob::new("ci.*").unwrap().compile_matcher()), ..Default::default() };
    assert_eq!(all.iter().filter(|s| f.matches(s)).count(), 2);
    let f = query::Filter { target: Some("other".into()), ..Default::default() };
    assert_eq!(all.iter().filter(|s| f.matches(s)).count(), 0);

    // By a unique prefix; an ambiguous or unknown one is an error.
    let (full, recs) = query::session_records(dir.path(), "0000000000abc").unwrap().unwrap();
    assert_eq!(full, SessionId(id).to_string());
    assert_eq!(recs.len(), 6);
    assert!(query::session_records(dir.path(), "00000000").unwrap().unwrap_err().contains("ambiguous"));
    assert!(query::session_records(dir.path(), "ffff").unwrap().unwrap_err().contains("no session"));

    let lines: Vec<String> = query::replay_lines(&recs).into_iter().map(|(_, l)| l).collect();
    let pos = |needle: &str| {
        lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle} in {lines:#?}"))
    };
    assert!(pos("psql (pid 7") < pos("connection allowed"));
    assert!(pos("connection allowed") < pos("> SELECT email FROM users"));
    assert!(pos("> SELECT email") < pos("< SELECT 2 (2 rows, 80 bytes)"));
    assert!(pos("< SELECT 2") < pos("<   [masked]"));
    assert!(pos("<   [masked]") < pos("> DROP TABLE users"));
    assert!(pos("> DROP TABLE") < pos("< refused by roles[0].rules[0]: ddl is denied"));
    assert!(pos("refused by") < pos("closed: client closed (50 bytes sent, 120 bytes received)"));
}

#[test]
fn replay_waits_the_original_gaps_divided_by_speed() {
    use std::time::Duration;
    let offs = [0, 0, 1000, 1500, 4500];
    assert_eq!(query::replay_delays(&offs, 1.0), [0, 0, 1000, 500, 3000].map(Duration::from_millis).to_vec());
    assert_eq!(query::replay_delays(&offs, 2.0), [0, 0, 500, 250, 1500].map(Duration::from_millis).to_vec());
    assert!(query::replay_delays(&offs, 0.0).iter().all(|d| d.is_zero()));
}

#[test]
fn since_accepts_times_durations_and_epoch_millis() {
    assert_eq!(query::parse_since("2026-01-01T00:00:00Z", 0).unwrap(), 1_767_225_600_000);
    assert_eq!(query::parse_since("10m", 1_000_000).unwrap(), 400_000);
    assert_eq!(query::parse_since("1767225600000", 0).unwrap(), 1_767_225_600_000);
    assert!(query::parse_since("yesterday", 0).is_err());
    assert_eq!(query::format_time(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
}

#[tokio::test]
async fn a_full_queue_loses_plain_records_counted_and_refuses_durable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    // Room for one record: while the writer batches, the next ones find the
    // queue full.
    c.queue_bytes = 1;
    let audit = Audit::open(c).unwrap();
    let mut sent = 0u64;
    while audit.stats().lost.load(Ordering::Relaxed) == 0 {
        assert!(sent < 1_000_000, "the queue never filled");
        audit.record(end(1, sent));
        sent += 1;
    }
    // A durable record meets the same full queue and is refused (fail
    // closed); once the writer has caught up, it goes through.
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(tries < 100_000, "a durable record was never refused");
        for _ in 0..10 {
            audit.record(end(1, sent));
            sent += 1;
        }
        match audit.record_durable(end(2, 0)).await {
            Err(AuditError::Behind(_)) => break,
            Err(e) => panic!("{e}"),
            Ok(()) => {}
        }
    }
    while let Err(e) = audit.record_durable(end(2, 1)).await {
        assert!(matches!(e, AuditError::Behind(_)), "{e}");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    while audit.sync().await.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Everything queued is recorded, and one more record makes the writer
    // write down the loss.
    audit.record(end(3, 0));
    while audit.sync().await.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let lost = audit.stats().lost.load(Ordering::Relaxed);
    let recs = exported(dir.path());
    let one = SessionId(1).to_string();
    let ends = recs.iter().filter(|r| r["type"] == "session_end" && r["session"] == one.as_str()).count() as u64;
    assert_eq!(ends + lost, sent, "every plain record is either written or counted lost");
    let losses: u64 = recs.iter().filter(|r| r["type"] == "audit_loss").map(|r| r["records"].as_u64().unwrap()).sum();
    assert_eq!(losses, lost, "the loss is recorded: {recs:?}");
    assert!(recs.iter().any(|r| r["type"] == "audit_loss" && r["error"] == "the audit writer was behind"));
    assert!(read::verify(dir.path()).unwrap().ok);
}
