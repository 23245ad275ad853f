//! The audit log end to end: a real writer killed with SIGKILL mid-burst,
//! a real agent's sessions listed, shown, replayed and verified through the
//! CLI, a flipped byte found, retention, and a real full disk (tmpfs).
use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use portcullis_tests::{
    fixtures::{echo_policy, Tmpfs},
    helper_bin, portcullis_bin, require_root,
    servers::EchoServer,
    Agent,
};
use serde_json::Value;

fn policy(echo: &EchoServer) -> String {
    echo_policy(echo.addr, "127.0.0.53:7100", "allow")
}

/// `portcullis sessions ...` on a log directory, without an agent.
fn sessions_cli(audit_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(portcullis_bin()).arg("sessions").args(args).arg("--audit-dir").arg(audit_dir).output().unwrap()
}

fn export(audit_dir: &Path) -> Vec<Value> {
    let out = sessions_cli(audit_dir, &["export", "--format", "jsonl"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn verify(audit_dir: &Path) -> (bool, Value) {
    let out = sessions_cli(audit_dir, &["verify", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("verify printed no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.success(), v["ok"] == true, "exit code follows the verdict: {v}");
    (out.status.success(), v)
}

/// Acknowledged records printed by `audit-writer burst`: seq → (writer, n).
fn read_acks(stdout: impl Read) -> BTreeMap<u64, (u64, u64)> {
    let mut acks = BTreeMap::new();
    let mut r = BufReader::new(stdout);
    let mut line = String::new();
    while r.read_line(&mut line).unwrap_or(0) > 0 {
        // A line cut by the kill has no newline: not an acknowledgement.
        if line.ends_with('\n') {
            let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
            acks.insert(f[2], (f[0], f[1]));
        }
        line.clear();
    }
    acks
}

/// Waits until the log holds `n` session ends.
fn wait_ends(agent: &Agent, n: usize) {
    for _ in 0..200 {
        if agent.audit().iter().filter(|r| r["type"] == "session_end").count() >= n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("fewer than {n} session ends recorded:\n{}", agent.log_text());
}

#[test]
fn kill_9_during_a_burst_keeps_every_acknowledged_record() {
    // No privilege needed: a real writer process, a real SIGKILL.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit");
    let mut child = Command::new(helper_bin("audit-writer"))
        .args(["burst", log.to_str().unwrap(), "8"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // Let the burst get going: a few thousand acknowledged records.
    let mut acks = BTreeMap::new();
    let mut line = String::new();
    while acks.len() < 3000 {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "writer ended early");
        let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
        acks.insert(f[2], (f[0], f[1]));
    }
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    acks.extend(read_acks(stdout));
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, not finished: {status}");

    // Before any restart: the chain verifies (a record cut mid-write may
    // show as an incomplete tail, which is not damage).
    let (ok, v) = verify(&log);
    assert!(ok, "{v}");

    // Restart: recovery at open, then writing goes on.
    let out =
        Command::new(helper_bin("audit-writer")).args(["burst", log.to_str().unwrap(), "2", "5"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, v) = verify(&log);
    assert!(ok && v["torn_tail"].is_null(), "{v}");

    let recs = export(&log);
    let by_seq: HashMap<u64, &Value> = recs.iter().map(|r| (r["seq"].as_u64().unwrap(), r)).collect();
    for (seq, (w, n)) in &acks {
        let r = by_seq.get(seq).unwrap_or_else(|| panic!("acknowledged record {seq} lost"));
        assert_eq!(r["session"], format!("{w:016x}"), "{r}");
        assert_eq!(r["bytes_up"], *n, "{r}");
    }
    // Each writer's records are in its own order, with no gap.
    let mut next: HashMap<String, u64> = HashMap::new();
    for r in recs.iter().filter(|r| r["type"] == "session_end" && r["reason"].as_str().unwrap().starts_with("burst")) {
        let s = r["session"].as_str().unwrap().to_string();
        let n = r["bytes_up"].as_u64().unwrap();
        let want = next.entry(s).or_insert(0);
        // The second run starts its counters again at 0.
        if n == 0 {
            *want = 0;
        }
        assert_eq!(n, *want, "{r}");
        *want += 1;
    }
}

#[test]
fn sessions_are_listed_shown_replayed_and_verified_from_the_state_dir() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let mut agent = Agent::start(&policy(&echo));
    // Concurrent sessions through the eBPF path.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let cmd = agent.exec(
                "ci",
                &[helper_bin("tcp-client").to_str().unwrap(), "tcp", "127.0.0.53:7100", &format!("msg{i}")],
            );
            std::thread::spawn(move || {
                let mut cmd = cmd;
                let out = cmd.output().unwrap();
                serde_json::from_slice::<Value>(&out.stdout).unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().unwrap();
        assert_eq!(r["reply"], format!("echo:msg{i}"), "{r}");
    }
    let denied = agent.tcp_client("guest", &["tcp", "127.0.0.53:7100", "nope"]);
    assert_eq!(denied["reply"], "", "{denied}");
    wait_ends(&agent, 13);

    // Stop the agent: everything below reads the log alone.
    agent.kill9();

    // Every session keeps its own order: start, decision, end.
    let recs = agent.audit();
    let mut per: HashMap<String, Vec<&str>> = HashMap::new();
    for r in &recs {
        if let Some(s) = r["session"].as_str() {
            per.entry(s.into()).or_default().push(r["type"].as_str().unwrap());
        }
    }
    assert_eq!(per.len(), 13);
    for (s, types) in &per {
        assert_eq!(types, &["session_start", "decision", "session_end"], "session {s}");
    }

    let list = agent.sessions(&["list", "--json"]).output().unwrap();
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.len(), 13);
    let ok = list.iter().filter(|s| s["allowed"] == 1 && s["denied"] == 0).count();
    assert_eq!(ok, 12);
    for s in &list {
        for field in [
            "session",
            "start_ms",
            "end_ms",
            "target",
            "protocol",
            "orig_dst",
            "role",
            "scope",
            "cgroup",
            "exe",
            "comm",
            "tgid",
            "uid",
            "decisions",
            "allowed",
            "denied",
            "held",
            "end_reason",
            "bytes_up",
            "bytes_down",
            "first_seq",
            "last_seq",
        ] {
            assert!(s.get(field).is_some(), "{field} missing in {s}");
        }
        assert_eq!(s["target"], "echo");
        assert_eq!(s["orig_dst"], "127.0.0.53:7100");
    }
    let denied_list: Vec<Value> =
        serde_json::from_slice(&agent.sessions(&["list", "--json", "--decision", "deny"]).output().unwrap().stdout)
            .unwrap();
    assert_eq!(denied_list.len(), 1);
    assert_eq!(denied_list[0]["scope"], "guest");
    assert_eq!(denied_list[0]["role"], "nobody");
    let none: Vec<Value> =
        serde_json::from_slice(&agent.sessions(&["list", "--json", "--target", "other"]).output().unwrap().stdout)
            .unwrap();
    assert!(none.is_empty());
    let future: Vec<Value> = serde_json::from_slice(
        &agent.sessions(&["list", "--json", "--since", "2999-01-01T00:00:00Z"]).output().unwrap().stdout,
    )
    .unwrap();
    assert!(future.is_empty());
    let text = agent.sessions(&["list"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&text.stdout).lines().count(), 14, "header and one line per session");

    // One allowed session: its bytes, timeline and replay.
    let s = list.iter().find(|s| s["allowed"] == 1 && s["bytes_up"] == 4).unwrap();
    let id = s["session"].as_str().unwrap();
    assert_eq!(s["bytes_down"], 9, "echo:msgN");
    let show = agent.sessions(&["show", &id[..10], "--json"]).output().unwrap();
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["session"]["session"], id);
    let types: Vec<&str> = show["records"].as_array().unwrap().iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["session_start", "decision", "session_end"]);
    let replay = agent.sessions(&["replay", id, "--speed", "0"]).output().unwrap();
    assert!(replay.status.success());
    let replay = String::from_utf8_lossy(&replay.stdout).into_owned();
    let pos = |needle: &str| replay.find(needle).unwrap_or_else(|| panic!("{needle:?} not in:\n{replay}"));
    assert!(pos("connects to 127.0.0.53:7100 [echo tcp] as role builder") < pos("connection allowed"));
    assert!(pos("connection allowed") < pos("closed: closed (4 bytes sent, 9 bytes received)"));
    let missing = agent.sessions(&["show", "ffffffffffffffff"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));

    let v = agent.sessions(&["verify"]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("ok: "));

    // Export --since leaves older records out.
    let last_ms = recs.last().unwrap()["time_ms"].as_u64().unwrap();
    let since =
        agent.sessions(&["export", "--format", "jsonl", "--since", &(last_ms + 1).to_string()]).output().unwrap();
    assert!(since.status.success());
    assert_eq!(since.stdout.len(), 0);

    // Restarted, the agent continues the same chain.
    agent.restart();
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", "again"]);
    assert_eq!(r["reply"], "echo:again");
    agent.wait_audit("new session", |r| r["type"] == "session_end" && r["bytes_up"] == 5);
    let v = agent.sessions(&["verify", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn a_flipped_byte_in_an_old_segment_is_reported_at_its_position() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let mut agent = Agent::start_with_env(&policy(&echo), &[("PORTCULLIS_AUDIT_SEGMENT_SIZE", "4KiB")]);
    for i in 0..12 {
        let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", &format!("m{i}")]);
        assert_eq!(r["reply"], format!("echo:m{i}"));
    }
    wait_ends(&agent, 12);
    agent.kill9();
    let log = agent.state_dir().join("audit");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    let (ok, _) = verify(&log);
    assert!(ok);

    // Find the third record of the first segment (frames: u32 len, u32 crc,
    // u64 seq, 32-byte prev hash, payload), and flip one byte of its payload.
    let victim = &segs[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let mut off = 64usize;
    for _ in 0..2 {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        off += 48 + len;
    }
    let seq = u64::from_le_bytes(bytes[off + 8..off + 16].try_into().unwrap());
    bytes[off + 48 + 3] ^= 0x20;
    std::fs::write(victim, &bytes).unwrap();

    let out = sessions_cli(&log, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let name = victim.file_name().unwrap().to_string_lossy();
    assert!(text.contains(&format!("BAD: record {seq} at {name} offset {off}:")), "{text}");
    let (ok, v) = verify(&log);
    assert!(!ok);
    assert_eq!(v["problem"]["seq"], seq);
    assert_eq!(v["problem"]["offset"], off);
    assert_eq!(v["problem"]["segment"], victim.to_str().unwrap());

    // The agent still starts (the damage is in a closed segment) and keeps
    // writing; verify keeps naming the same record.
    agent.restart();
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", "after"]);
    assert_eq!(r["reply"], "echo:after");
    let (_, v) = verify(&log);
    assert_eq!(v["problem"]["seq"], seq);
}

#[test]
fn retention_removes_only_whole_old_segments_and_says_so() {
    if !require_root() {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let agent = Agent::start_with_env(
        &policy(&echo),
        &[("PORTCULLIS_AUDIT_SEGMENT_SIZE", "4KiB"), ("PORTCULLIS_AUDIT_MAX_SIZE", "12KiB")],
    );
    for i in 0..25 {
        let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", &format!("r{i}")]);
        assert_eq!(r["reply"], format!("echo:r{i}"));
    }
    // A last session with a byte count of its own: once its end is in the
    // log, so is everything before it (records are written in order).
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", "the-last-one"]);
    assert_eq!(r["reply"], "echo:the-last-one");
    agent.wait_audit("last session end", |r| r["type"] == "session_end" && r["bytes_up"] == 12);
    let mut agent = agent;
    agent.kill9();
    let recs = agent.audit();
    let ret = recs.iter().find(|r| r["type"] == "retention").expect("a retention record");
    assert_eq!(ret["reason"], "size");
    let first = recs[0]["seq"].as_u64().unwrap();
    assert!(first > 1, "old records are gone");
    let log = agent.state_dir().join("audit");
    let mut segs: Vec<(u64, u64)> = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let seq = name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()?;
            Some((seq, e.metadata().ok()?.len()))
        })
        .collect();
    segs.sort();
    // The log starts exactly at a segment boundary that a retention record
    // names, and every deleted segment is accounted for.
    assert_eq!(segs[0].0, first);
    let latest = recs.iter().rfind(|r| r["type"] == "retention").unwrap();
    assert_eq!(latest["first_seq"], first);
    let all_deleted: Vec<u64> = recs
        .iter()
        .filter(|r| r["type"] == "retention")
        .flat_map(|r| r["deleted"].as_array().unwrap().iter().map(|d| d["first_seq"].as_u64().unwrap()))
        .collect();
    assert!(all_deleted.iter().all(|s| *s < first));
    let total: u64 = segs.iter().map(|s| s.1).sum();
    let active = segs.last().unwrap().1;
    assert!(total - active <= 12 << 10, "closed segments within the limit: {segs:?}");
    let (ok, v) = verify(&log);
    assert!(ok, "{v}");
}

#[test]
fn a_full_disk_refuses_state_changing_requests_unless_told_to_allow() {
    if !require_root() || !portcullis_tests::require_tool("mount") {
        return;
    }
    let echo = EchoServer::start("127.0.0.1:0");
    let mnt = tempfile::tempdir().unwrap();
    let fs_dir = mnt.path().join("auditfs");
    let tmpfs = Tmpfs::mount(&fs_dir, "512k");
    let log = fs_dir.join("audit");
    let agent = Agent::start_with_env(&policy(&echo), &[("PORTCULLIS_AUDIT_DIR", log.to_str().unwrap())]);
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", "before"]);
    assert_eq!(r["reply"], "echo:before", "{r}");
    assert_eq!(echo.count(), 1);
    agent.wait_audit("first session", |r| r["type"] == "session_end");

    let filler = tmpfs.fill();
    // An opaque tcp connection may change state upstream: with its record
    // refused by the disk, the connection is refused and nothing reaches
    // the upstream. (The log file's last page may still hold a record or
    // two: tmpfs allocates whole pages.)
    let mut refused = false;
    for i in 0..20 {
        let before = echo.count();
        let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", &format!("full{i}")]);
        if r["reply"] == "" {
            assert_eq!(echo.count(), before, "nothing reached the upstream unrecorded");
            refused = true;
            break;
        }
        assert_eq!(r["reply"], format!("echo:full{i}"), "{r}");
    }
    assert!(refused, "a full disk never refused a connection");
    agent.wait_log("audit write failed");
    agent.wait_log("connection refused");

    // Room again: connections pass, and the loss is in the log.
    std::fs::remove_file(&filler).unwrap();
    let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", "after"]);
    assert_eq!(r["reply"], "echo:after", "{r}");
    let loss = agent.wait_audit("audit loss", |r| r["type"] == "audit_loss");
    assert!(loss["records"].as_u64().unwrap() >= 1, "{loss}");
    assert!(loss["durable"].as_u64().unwrap() >= 1, "{loss}");
    let (ok, v) = verify(&log);
    assert!(ok, "{v}");
    drop(agent);

    // Configured to allow: the same full disk lets the connection through.
    let log2 = fs_dir.join("audit2");
    let agent = Agent::start_with_env(
        &policy(&echo),
        &[("PORTCULLIS_AUDIT_DIR", log2.to_str().unwrap()), ("PORTCULLIS_AUDIT_ON_FULL", "allow")],
    );
    let filler = tmpfs.fill();
    for i in 0..20 {
        let r = agent.tcp_client("ci", &["tcp", "127.0.0.53:7100", &format!("allowed{i}")]);
        assert_eq!(r["reply"], format!("echo:allowed{i}"), "{r}");
        if agent.log_text().contains("goes ahead unrecorded") {
            break;
        }
    }
    agent.wait_log("goes ahead unrecorded");
    std::fs::remove_file(&filler).unwrap();
    let (ok, v) = verify(&log2);
    assert!(ok, "{v}");
}
