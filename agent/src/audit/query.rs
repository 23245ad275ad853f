//! What `portcullis sessions` shows: sessions summarised from the log, one
//! session's timeline, its replay as the caller saw it, and the export.
use std::{collections::BTreeMap, io::Write, ops::ControlFlow, path::Path};

use serde::Serialize;
use serde_json::Value;

use super::{format, read, AuditError};

/// One line of `sessions export`: the stored record with its seq and hash.
pub fn export_line(rec: &read::LogRecord<'_>) -> Vec<u8> {
    let mut line = Vec::with_capacity(rec.payload.len() + 100);
    let head = format!(
        "{{\"seq\":{},\"hash\":\"{}\",\"prev_hash\":\"{}\"",
        rec.seq,
        format::hex(&rec.hash),
        format::hex(&rec.prev_hash)
    );
    line.extend_from_slice(head.as_bytes());
    match rec.payload.strip_prefix(b"{") {
        Some(rest) if rest.first() == Some(&b'}') => line.extend_from_slice(rest),
        Some(rest) => {
            line.push(b',');
            line.extend_from_slice(rest);
        }
        None => {
            line.extend_from_slice(b",\"raw\":");
            line.extend_from_slice(&serde_json::to_vec(&String::from_utf8_lossy(rec.payload)).expect("string"));
            line.push(b'}');
        }
    }
    line
}

/// `time_ms` of a stored record without parsing all of it (records start
/// with it).
fn time_ms(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(b"{\"time_ms\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Writes every record (at or after `since_ms`) as JSON lines.
pub fn export(dir: &Path, since_ms: Option<u64>, out: &mut dyn Write) -> Result<u64, AuditError> {
    let mut n = 0;
    let mut io_err = None;
    read::scan(dir, |rec| {
        if since_ms.is_some_and(|s| time_ms(rec.payload).is_some_and(|t| t < s)) {
            return ControlFlow::Continue(());
        }
        let mut line = export_line(rec);
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            io_err = Some(e);
            return ControlFlow::Break(());
        }
        n += 1;
        ControlFlow::Continue(())
    })?;
    match io_err {
        // A closed pipe (`| head`) is not an error of ours.
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(AuditError::Io { path: "stdout".into(), error: e })
        }
        _ => Ok(n),
    }
}

/// A session as `sessions list --json` prints it. Field names are stable.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SessionSummary {
    pub session: String,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
    pub target: String,
    pub protocol: String,
    pub orig_dst: String,
    pub role: Option<String>,
    pub unit: Option<String>,
    pub scope: Option<String>,
    pub cgroup: Option<String>,
    pub exe: Option<String>,
    pub comm: String,
    pub tgid: u64,
    pub uid: u64,
    /// Decisions recorded (the session's admission included).
    pub decisions: u64,
    pub allowed: u64,
    pub denied: u64,
    /// Decisions that held a request for approval.
    pub held: u64,
    pub responses: u64,
    pub end_reason: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// First and last record of the session.
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Every session in the log, in order of start, with its records' values.
pub fn sessions(dir: &Path) -> Result<Vec<SessionSummary>, AuditError> {
    let mut by_id: BTreeMap<String, SessionSummary> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    read::scan(dir, |rec| {
        let Ok(v) = serde_json::from_slice::<Value>(rec.payload) else { return ControlFlow::Continue(()) };
        let Some(id) = v["session"].as_str() else { return ControlFlow::Continue(()) };
        let s = by_id.entry(id.to_string()).or_insert_with(|| {
            order.push(id.to_string());
            SessionSummary {
                session: id.to_string(),
                start_ms: v["time_ms"].as_u64().unwrap_or(0),
                first_seq: rec.seq,
                ..SessionSummary::default()
            }
        });
        s.last_seq = rec.seq;
        apply(s, &v);
        ControlFlow::Continue(())
    })?;
    Ok(order.into_iter().filter_map(|id| by_id.remove(&id)).collect())
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn apply(s: &mut SessionSummary, v: &Value) {
    match v["type"].as_str().unwrap_or("") {
        "session_start" => {
            s.start_ms = v["time_ms"].as_u64().unwrap_or(s.start_ms);
            s.target = v["target"].as_str().unwrap_or("").into();
            s.protocol = v["protocol"].as_str().unwrap_or("").into();
            s.orig_dst = v["orig_dst"].as_str().unwrap_or("").into();
            s.role = opt_str(&v["role"]);
            let c = &v["caller"];
            s.unit = opt_str(&c["unit"]);
            s.scope = opt_str(&c["scope"]);
            s.cgroup = opt_str(&c["cgroup"]);
            s.exe = opt_str(&c["exe"]);
            s.comm = c["comm"].as_str().unwrap_or("").into();
            s.tgid = c["tgid"].as_u64().unwrap_or(0);
            s.uid = c["uid"].as_u64().unwrap_or(0);
        }
        "decision" => {
            s.decisions += 1;
            match v["decision"]["verdict"].as_str() {
                Some("allow") => s.allowed += 1,
                Some("deny") => s.denied += 1,
                Some("approve") => s.held += 1,
                _ => {}
            }
        }
        // One per answered request (HTTP also writes a `request_end`).
        "response" => s.responses += 1,
        "session_end" => {
            s.end_ms = v["time_ms"].as_u64();
            s.end_reason = opt_str(&v["reason"]);
            s.bytes_up = v["bytes_up"].as_u64().unwrap_or(0);
            s.bytes_down = v["bytes_down"].as_u64().unwrap_or(0);
        }
        _ => {}
    }
}

/// Filters of `sessions list`.
#[derive(Debug, Default)]
pub struct Filter {
    pub unit: Option<globset::GlobMatcher>,
    pub scope: Option<String>,
    pub target: Option<String>,
    pub since_ms: Option<u64>,
    pub decision: Option<String>,
}

impl Filter {
    pub fn matches(&self, s: &SessionSummary) -> bool {
        if let Some(g) = &self.unit {
            if !s.unit.as_deref().is_some_and(|u| g.is_match(u)) {
                return false;
            }
        }
        if self.scope.as_ref().is_some_and(|x| s.scope.as_ref() != Some(x)) {
            return false;
        }
        if self.target.as_ref().is_some_and(|t| &s.target != t) {
            return false;
        }
        if self.since_ms.is_some_and(|t| s.end_ms.unwrap_or(u64::MAX) < t) {
            return false;
        }
        match self.decision.as_deref() {
            Some("allow") => s.allowed > 0,
            Some("deny") => s.denied > 0,
            Some("approve") => s.held > 0,
            _ => true,
        }
    }
}

/// A record of one session, for `show` and `replay`.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub seq: u64,
    pub value: Value,
    pub line: Vec<u8>,
}

/// The records of the session whose id is `id` (or starts with it, when
/// that is unambiguous), in order.
pub fn session_records(dir: &Path, id: &str) -> Result<Result<(String, Vec<SessionRecord>), String>, AuditError> {
    let id = id.to_ascii_lowercase();
    let mut found: BTreeMap<String, Vec<SessionRecord>> = BTreeMap::new();
    read::scan(dir, |rec| {
        // Cheap test before parsing.
        if memchr::memmem::find(rec.payload, id.as_bytes()).is_none() {
            return ControlFlow::Continue(());
        }
        let Ok(v) = serde_json::from_slice::<Value>(rec.payload) else { return ControlFlow::Continue(()) };
        if let Some(s) = v["session"].as_str() {
            if s.starts_with(&id) {
                found.entry(s.to_string()).or_default().push(SessionRecord {
                    seq: rec.seq,
                    line: export_line(rec),
                    value: v,
                });
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(exact) = found.remove(&id) {
        return Ok(Ok((id, exact)));
    }
    Ok(match found.len() {
        0 => Err(format!("no session {id} in the log")),
        1 => Ok(found.into_iter().next().expect("one")),
        _ => Err(format!("{id} is ambiguous: {}", found.keys().cloned().collect::<Vec<_>>().join(", "))),
    })
}

/// The session as the caller saw it: (milliseconds since the session
/// started, line), in record order.
pub fn replay_lines(records: &[SessionRecord]) -> Vec<(u64, String)> {
    let t0 = records.first().and_then(|r| r.value["time_ms"].as_u64()).unwrap_or(0);
    let mut out = Vec::new();
    for r in records {
        let v = &r.value;
        let t = v["time_ms"].as_u64().unwrap_or(t0).saturating_sub(t0);
        let s = |x: &Value| x.as_str().unwrap_or("").to_string();
        match v["type"].as_str().unwrap_or("") {
            "session_start" => {
                let c = &v["caller"];
                let who = c["unit"].as_str().or(c["scope"].as_str()).map(|u| format!(", {u}")).unwrap_or_default();
                out.push((
                    t,
                    format!(
                        "{} (pid {}, uid {}{who}) connects to {} [{} {}] as role {}",
                        s(&c["comm"]),
                        c["tgid"],
                        c["uid"],
                        s(&v["orig_dst"]),
                        if v["target"].as_str().unwrap_or("").is_empty() {
                            "no target"
                        } else {
                            v["target"].as_str().unwrap_or("")
                        },
                        s(&v["protocol"]),
                        v["role"].as_str().unwrap_or("(none)")
                    ),
                ));
            }
            "decision" => {
                let req = &v["request"];
                let d = &v["decision"];
                let verdict = s(&d["verdict"]);
                let rule = s(&d["rule"]);
                match req["protocol"].as_str().unwrap_or("") {
                    "session" | "tcp" => {
                        let what = if verdict == "allow" { "connection allowed" } else { "connection refused" };
                        out.push((t, format!("  {what} ({verdict} by {rule}: {})", s(&d["reason"]))));
                    }
                    proto => {
                        let text = match proto {
                            "postgres" => s(&req["sql"]),
                            "http" => format!("{} {}{}", s(&req["method"]), s(&req["host"]), s(&req["path"])),
                            "git" => {
                                let mut t = format!("git {} {}", s(&req["service"]), s(&req["repo"]));
                                for u in req["refs"].as_array().into_iter().flatten() {
                                    t.push_str(&format!(
                                        "\n    {} {} {}..{}",
                                        s(&u["kind"]),
                                        s(&u["name"]),
                                        s(&u["old"]),
                                        s(&u["new"])
                                    ));
                                }
                                for o in req["push_options"].as_array().into_iter().flatten() {
                                    t.push_str(&format!("\n    option {}", s(o)));
                                }
                                t
                            }
                            other => format!("{other} request {req}"),
                        };
                        out.push((t, format!("> {text}")));
                        let note = match verdict.as_str() {
                            "allow" => format!("  allowed by {rule}"),
                            "approve" => format!("  held for approval by {rule}: {}", s(&d["reason"])),
                            _ => format!("< refused by {rule}: {}", s(&d["reason"])),
                        };
                        out.push((t, note));
                    }
                }
            }
            "approval_requested" => {
                out.push((t, format!("  held for approval {} ({}): {}", v["id"], s(&v["rule"]), s(&v["request"]))));
            }
            "approval_decided" => {
                let o = &v["outcome"];
                let by = o["by"]["uid"].as_u64().map(|u| format!(" by uid {u}")).unwrap_or_default();
                let scope = o["scope"]["kind"].as_str().map(|x| format!(" ({x})")).unwrap_or_default();
                out.push((t, format!("  approval {}: {}{by}{scope}", v["id"], s(&o["outcome"]))));
            }
            "response" => {
                let sm = &v["summary"];
                let mut parts = Vec::new();
                if let Some(r) = sm["rows"].as_u64() {
                    parts.push(format!("{r} rows"));
                }
                parts.push(format!("{} bytes", sm["bytes"].as_u64().unwrap_or(0)));
                let status = sm["status"].as_str().unwrap_or("response");
                out.push((t, format!("< {status} ({})", parts.join(", "))));
                if let Some(c) = sm["content"].as_str() {
                    for l in c.lines() {
                        out.push((t, format!("<   {l}")));
                    }
                    if sm["truncated"] == true {
                        out.push((t, "<   … (cut at the recording cap)".into()));
                    }
                }
            }
            "request_end" => {
                let req = &v["request"];
                let status = req["status"].as_u64().map_or_else(|| "no status".to_string(), |c| c.to_string());
                let err = v["error"].as_str().map(|e| format!(", {e}")).unwrap_or_default();
                out.push((
                    t,
                    format!(
                        "< {status} for {} {} ({} bytes{err})",
                        s(&req["method"]),
                        s(&req["path"]),
                        req["bytes_down"].as_u64().unwrap_or(0)
                    ),
                ));
            }
            "git_ref_update" => {
                let u = &v["update"];
                let d = &v["decision"];
                out.push((
                    t,
                    format!(
                        "  ref {} {} {}..{}: {} by {}: {}",
                        s(&u["kind"]),
                        s(&u["name"]),
                        s(&u["old"]),
                        s(&u["new"]),
                        s(&d["verdict"]),
                        s(&d["rule"]),
                        s(&d["reason"])
                    ),
                ));
            }
            "session_end" => out.push((
                t,
                format!(
                    "closed: {} ({} bytes sent, {} bytes received)",
                    s(&v["reason"]),
                    v["bytes_up"].as_u64().unwrap_or(0),
                    v["bytes_down"].as_u64().unwrap_or(0)
                ),
            )),
            other => out.push((t, format!("  [{other}]"))),
        }
    }
    out
}

/// How long to wait before each replay line: the original gaps divided by
/// `speed` (0 or less: no waiting).
pub fn replay_delays(offsets: &[u64], speed: f64) -> Vec<std::time::Duration> {
    let mut prev = 0;
    offsets
        .iter()
        .map(|&t| {
            let gap = t.saturating_sub(prev);
            prev = t;
            if speed > 0.0 && speed.is_finite() {
                std::time::Duration::from_secs_f64(gap as f64 / 1000.0 / speed)
            } else {
                std::time::Duration::ZERO
            }
        })
        .collect()
}

/// `--since`: RFC 3339 (`2026-05-01T12:00:00Z`), a duration ago (`10m`,
/// `2h`, `7d`), or milliseconds since the epoch.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000).max(0) as u64);
    }
    if s.len() >= 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| format!("`{s}`: bad time"));
    }
    super::config::parse_duration(s)
        .map(|d| now_ms.saturating_sub(d.as_millis() as u64))
        .map_err(|_| format!("`{s}`: expected an RFC 3339 time (2026-05-01T12:00:00Z), a duration ago (10m, 2h, 7d) or epoch milliseconds"))
}

/// `2026-05-01T12:00:00.123Z`.
pub fn format_time(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| ms.to_string())
}
