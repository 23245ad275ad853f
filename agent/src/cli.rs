//! The command line: what users type.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::{
    audit,
    config::{self, RunConfig},
    control::{self, Request},
    intercept::{cgroup, probes},
    policy::{self, binding_for, decide_classes, decide_session, Subject},
};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Role-based access control between AI coding agents and the systems they touch"
)]
pub struct Cli {
    /// The running agent's control socket.
    #[arg(long, global = true, env = "PORTCULLIS_CONTROL_SOCKET", default_value = control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// Log format: text or json.
    #[arg(long, global = true, env = "PORTCULLIS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the probes and serve until stopped.
    Run(RunArgs),
    /// Run a command inside a guarded scope.
    Exec(ExecArgs),
    /// Show scopes, attached programs, targets, live connections and counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove the pinned probes, links and maps (stop `portcullis run` first).
    Detach {
        #[arg(long, env = "PORTCULLIS_PIN_DIR", default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Validate a policy or explain a decision.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The local certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Requests held for a human's approval.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Recorded sessions: list, show, replay, verify, export. Reads the log
    /// from the state directory, so it works while the agent is down.
    Sessions(SessionsArgs),
    /// Check that this host can run portcullis, and how to fix what fails.
    Doctor(crate::doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (portcullis.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Audit log directory [default: STATE_DIR/audit].
    #[arg(long, env = "PORTCULLIS_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    /// Size at which an audit segment is closed and a new one started.
    #[arg(long, env = "PORTCULLIS_AUDIT_SEGMENT_SIZE", default_value = "64MiB", value_parser = audit::config::parse_size)]
    pub audit_segment_size: u64,
    /// Delete whole closed segments older than this (`off` keeps them).
    #[arg(long, env = "PORTCULLIS_AUDIT_MAX_AGE", default_value = "90d")]
    pub audit_max_age: String,
    /// Delete the oldest closed segments while the log is larger than this (`off`: no limit).
    #[arg(long, env = "PORTCULLIS_AUDIT_MAX_SIZE", default_value = "1GiB")]
    pub audit_max_size: String,
    /// group: a record that authorises a state-changing request is fsynced
    /// (with whatever else is queued) before the request goes on; always:
    /// every record fsynced on its own; never: no fsync.
    #[arg(long, env = "PORTCULLIS_AUDIT_FSYNC", default_value = "group")]
    pub audit_fsync: audit::FsyncPolicy,
    /// The longest any other record waits for its fsync.
    #[arg(long, env = "PORTCULLIS_AUDIT_SYNC_INTERVAL", default_value = "1s", value_parser = audit::config::parse_duration)]
    pub audit_sync_interval: std::time::Duration,
    /// When the audit disk is full: refuse state-changing requests, or allow them unrecorded.
    #[arg(long, env = "PORTCULLIS_AUDIT_ON_FULL", default_value = "refuse")]
    pub audit_on_full: audit::FullPolicy,
    /// Response content kept per record (masked), at most.
    #[arg(long, env = "PORTCULLIS_AUDIT_RESPONSE_CAP", default_value = "4KiB", value_parser = audit::config::parse_size)]
    pub audit_response_cap: u64,
}

impl AuditArgs {
    pub fn config(&self, state_dir: &Path) -> anyhow::Result<audit::AuditConfig> {
        use audit::config::{parse_duration, parse_optional, parse_size};
        let mut c = audit::AuditConfig::new(self.audit_dir.clone().unwrap_or_else(|| state_dir.join("audit")));
        c.segment_bytes = self.audit_segment_size.max(4096);
        c.max_age =
            parse_optional(&self.audit_max_age, parse_duration).map_err(|e| anyhow::anyhow!("--audit-max-age {e}"))?;
        c.max_bytes =
            parse_optional(&self.audit_max_size, parse_size).map_err(|e| anyhow::anyhow!("--audit-max-size {e}"))?;
        c.fsync = self.audit_fsync;
        c.sync_interval = self.audit_sync_interval;
        c.on_full = self.audit_on_full;
        c.response_cap = usize::try_from(self.audit_response_cap).unwrap_or(usize::MAX);
        Ok(c)
    }
}

#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// State directory of the agent whose log to read.
    #[arg(long, global = true, env = "PORTCULLIS_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Audit log directory [default: STATE_DIR/audit].
    #[arg(long, global = true, env = "PORTCULLIS_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: SessionsCommand,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// One line per session (newest last).
    List {
        /// Only sessions of this systemd unit (glob).
        #[arg(long)]
        unit: Option<String>,
        /// Only sessions of this scope.
        #[arg(long)]
        scope: Option<String>,
        /// Only sessions to this target.
        #[arg(long)]
        target: Option<String>,
        /// Only sessions active at or after: RFC 3339, a duration ago (10m, 2h, 7d) or epoch ms.
        #[arg(long)]
        since: Option<String>,
        /// Only sessions with at least one decision of this verdict.
        #[arg(long, value_parser = ["allow", "deny", "approve"])]
        decision: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A session's timeline: every record, in order.
    Show {
        /// Session id (or a unique prefix of it).
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The session as the caller saw it, in order, with its original timing.
    Replay {
        id: String,
        /// Speed factor: 2 plays twice as fast; 0 without waiting.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// Check the whole chain; names the first bad record and where it is.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Every record as JSON lines, for a log pipeline.
    Export {
        #[arg(long, value_parser = ["jsonl"], default_value = "jsonl")]
        format: String,
        /// Only records at or after: RFC 3339, a duration ago (10m, 2h, 7d) or epoch ms.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the local CA certificate (PEM) for a trust store; creates the CA
    /// if portcullis has not yet.
    Export {
        #[arg(long, env = "PORTCULLIS_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (TOML). Without it: observe mode.
    #[arg(long, env = "PORTCULLIS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Loopback port the probes redirect guarded connections to.
    #[arg(long, env = "PORTCULLIS_LISTEN_PORT", default_value_t = config::DEFAULT_LISTEN_PORT)]
    pub listen_port: u16,
    /// bpffs directory for pinned programs, links and maps.
    #[arg(long, env = "PORTCULLIS_PIN_DIR", default_value = config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// State directory (audit log, local CA).
    #[arg(long, env = "PORTCULLIS_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Use this eBPF object instead of the embedded one.
    #[arg(long, env = "PORTCULLIS_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
    /// SO_MARK of the enforcer's own upstream sockets.
    #[arg(long, env = "PORTCULLIS_MARK", default_value_t = config::DEFAULT_MARK)]
    pub mark: u32,
    /// Group (name or gid) whose members may use the control socket (e.g.
    /// approvers); default: root only.
    #[arg(long, env = "PORTCULLIS_CONTROL_GROUP")]
    pub control_group: Option<String>,
    /// Loopback address of the Prometheus endpoint (`/metrics`), or `off`.
    #[arg(long, env = "PORTCULLIS_METRICS_ADDR", default_value = crate::metrics::DEFAULT_ADDR)]
    pub metrics_addr: String,
    /// Threads that serve connections (each connection stays on one); 0:
    /// one per CPU.
    #[arg(long, env = "PORTCULLIS_WORKERS", default_value_t = 0)]
    pub workers: usize,
    #[command(flatten)]
    pub audit: AuditArgs,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Requests waiting for an answer.
    List {
        /// Keep printing requests as they are held and resolved.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// One waiting request.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Let a held request run.
    Approve {
        id: u64,
        /// Only this request (the default).
        #[arg(long, conflicts_with_all = ["session", "for_"])]
        once: bool,
        /// Also the same request shape for the rest of its session.
        #[arg(long, conflicts_with = "for_")]
        session: bool,
        /// Also the same request shape (same target and role) for this long
        /// (e.g. 30m).
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
    },
    /// Refuse a held request.
    Deny {
        id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Scope to run in.
    #[arg(long)]
    pub scope: String,
    /// Run as this user (name or uid) once inside the scope.
    #[arg(long)]
    pub user: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files; prints every error with line and column.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// One JSON document: every file, ok or its errors.
        #[arg(long)]
        json: bool,
    },
    /// Show the decision and the rule behind it for a subject and request.
    Explain(Box<ExplainArgs>),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    pub file: PathBuf,
    /// Target name.
    #[arg(long)]
    pub target: String,
    /// The caller's scope.
    #[arg(long)]
    pub scope: Option<String>,
    /// The caller's systemd unit.
    #[arg(long)]
    pub unit: Option<String>,
    /// The caller's cgroup path (relative to the cgroup2 mount).
    #[arg(long, default_value = "")]
    pub cgroup: String,
    /// Request classes (e.g. read, ddl, connect). Without any: whether a
    /// session to the target may open at all.
    #[arg(long = "class")]
    pub classes: Vec<String>,
    #[arg(long)]
    pub json: bool,
    /// git targets: the repository path (`org/app.git`). Without `--ref`:
    /// whether it may be fetched.
    #[arg(long)]
    pub repo: Option<String>,
    /// git targets: a ref update of a push, `KIND:REF` with KIND one of
    /// create, update (fast-forward), force, delete (repeatable).
    #[arg(long = "ref", requires = "repo")]
    pub git_refs: Vec<String>,
    /// git targets: a push option the push carries (`git push -o`;
    /// repeatable, with `--ref`).
    #[arg(long = "push-option", requires = "git_refs")]
    pub push_options: Vec<String>,
    /// postgres targets: SQL text, classified as the enforcer does (classes,
    /// tables, functions; every statement of it).
    #[arg(long, conflicts_with_all = ["classes", "repo", "method"])]
    pub sql: Option<String>,
    /// http targets: the request's method (with `--path`).
    #[arg(long, requires = "path", conflicts_with_all = ["classes", "repo"])]
    pub method: Option<String>,
    /// http targets: the request's path.
    #[arg(long, requires = "method")]
    pub path: Option<String>,
}

/// Exit codes: 0 ok, 1 failure, 2 policy errors / denied explanation.
pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(a) => {
            let audit = a.audit.config(&a.state_dir)?;
            let cfg = RunConfig {
                policy: a.policy,
                listen_port: a.listen_port,
                pin_dir: a.pin_dir,
                state_dir: a.state_dir,
                control_socket: cli.control_socket,
                control_group: match &a.control_group {
                    None => None,
                    Some(g) => Some(lookup_group(g)?),
                },
                bpf_object: a.bpf_object,
                mark: a.mark,
                audit,
                metrics: crate::metrics::parse_addr(&a.metrics_addr)?,
                workers: a.workers,
            };
            crate::daemon::run(cfg).await?;
            Ok(0)
        }
        Command::Exec(a) => exec(&cli.control_socket, a).await,
        Command::Status { json } => {
            let v = control::call(&cli.control_socket, &Request::Status).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(0)
        }
        Command::Detach { pin_dir } => {
            if control::call(&cli.control_socket, &Request::Status).await.is_ok() {
                eprintln!("warning: portcullis is running; its probes go now and guarded traffic is no longer steered");
            }
            let n = probes::detach_all(&pin_dir)?;
            println!("detached probes from {n} cgroup(s); removed {}", pin_dir.display());
            Ok(0)
        }
        Command::Policy(PolicyCommand::Check { files, json }) => {
            let mut failed = false;
            let mut report = Vec::new();
            for f in files {
                let path = f.clone();
                match tokio::task::spawn_blocking(move || policy::load_file(&path)).await? {
                    Ok(p) => {
                        if json {
                            report.push(json!({
                                "file": f, "ok": true, "errors": [],
                                "scopes": p.scopes.len(), "targets": p.targets.len(),
                                "roles": p.roles.len(), "bindings": p.bindings.len(),
                            }));
                        } else {
                            println!(
                                "{}: ok ({} scopes, {} targets, {} roles, {} bindings)",
                                f.display(),
                                p.scopes.len(),
                                p.targets.len(),
                                p.roles.len(),
                                p.bindings.len()
                            );
                        }
                    }
                    Err(e) => {
                        failed = true;
                        if json {
                            report.push(json!({"file": f, "ok": false, "errors": e.errors}));
                        } else {
                            eprintln!("{e}");
                        }
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&json!({"ok": !failed, "files": report}))?);
            }
            Ok(if failed { 2 } else { 0 })
        }
        Command::Doctor(a) => crate::doctor::run(&cli.control_socket, a).await,
        Command::Completions { shell } => {
            use std::io::Write;
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "portcullis", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(0),
            }
        }
        Command::Manpages { dir } => {
            std::fs::create_dir_all(&dir)?;
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, &dir)?;
            Ok(0)
        }
        Command::Policy(PolicyCommand::Explain(a)) => explain(*a).await,
        Command::Approvals(a) => approvals(&cli.control_socket, a).await,
        Command::Ca(CaCommand::Export { state_dir }) => {
            let ca = crate::tls::LocalCa::load_or_create(&state_dir)?;
            print!("{}", ca.cert_pem());
            Ok(0)
        }
        Command::Sessions(a) => tokio::task::spawn_blocking(move || sessions(a)).await?,
    }
}

/// `portcullis sessions ...`: reads the log directly (blocking I/O, off the
/// runtime). Exit codes: 0 ok, 1 failure (verify: a bad record), 2 no such
/// session.
fn sessions(a: SessionsArgs) -> anyhow::Result<i32> {
    use std::io::Write;

    use audit::query;
    let dir = a.audit_dir.clone().unwrap_or_else(|| a.state_dir.join("audit"));
    let now = audit::now_ms();
    let since = |s: &Option<String>| -> anyhow::Result<Option<u64>> {
        s.as_deref().map(|s| query::parse_since(s, now)).transpose().map_err(|e| anyhow::anyhow!("--since {e}"))
    };
    match a.command {
        SessionsCommand::Export { format: _, since: s } => {
            let since = since(&s)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            query::export(&dir, since, &mut out)?;
            let _ = out.flush();
            Ok(0)
        }
        SessionsCommand::Verify { json } => {
            let rep = audit::read::verify(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                match &rep.problem {
                    None => println!(
                        "ok: {} records in {} segments (records {}..{}), head hash {}",
                        rep.records,
                        rep.segments,
                        rep.first_seq.unwrap_or(0),
                        rep.last_seq.unwrap_or(0),
                        rep.head_hash
                    ),
                    Some(p) => {
                        println!("BAD: {p}");
                        println!(
                            "{} records before it check out{}",
                            rep.records,
                            rep.last_seq.map(|s| format!(" (up to record {s})")).unwrap_or_default()
                        );
                    }
                }
                if let Some(t) = &rep.torn_tail {
                    println!("note: incomplete last record ({t}); a write in progress, or cut off by a crash and cut at the next start");
                }
            }
            Ok(if rep.ok { 0 } else { 1 })
        }
        SessionsCommand::List { unit, scope, target, since: s, decision, json } => {
            let filter = query::Filter {
                unit: unit
                    .map(|u| globset::Glob::new(&u).map(|g| g.compile_matcher()))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--unit: {e}"))?,
                scope,
                target,
                since_ms: since(&s)?,
                decision,
            };
            let list: Vec<query::SessionSummary> =
                query::sessions(&dir)?.into_iter().filter(|s| filter.matches(s)).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<16}  {:<24}  {:>8}  {:<14} {:<8} {:<12} {:<22} {:>4} {:>4} {:>4}  END",
                "SESSION", "START", "SECONDS", "TARGET", "PROTO", "ROLE", "CALLER", "OK", "DENY", "HELD"
            );
            for s in &list {
                let secs = s
                    .end_ms
                    .map_or_else(|| "open".into(), |e| format!("{:.1}", e.saturating_sub(s.start_ms) as f64 / 1000.0));
                let who = s.unit.clone().or(s.scope.clone()).unwrap_or_default();
                println!(
                    "{:<16}  {:<24}  {:>8}  {:<14} {:<8} {:<12} {:<22} {:>4} {:>4} {:>4}  {}",
                    s.session,
                    audit::query::format_time(s.start_ms),
                    secs,
                    if s.target.is_empty() { "-" } else { &s.target },
                    s.protocol,
                    s.role.as_deref().unwrap_or("-"),
                    format!("{}[{}] {}", s.comm, s.tgid, who),
                    s.allowed,
                    s.denied,
                    s.held,
                    s.end_reason.as_deref().unwrap_or("")
                );
            }
            Ok(0)
        }
        SessionsCommand::Show { id, json } => {
            let (id, recs) = match query::session_records(&dir, &id)? {
                Ok(x) => x,
                Err(msg) => {
                    eprintln!("portcullis: {msg}");
                    return Ok(2);
                }
            };
            if json {
                let summary = query::sessions(&dir)?.into_iter().find(|s| s.session == id);
                let records: Vec<Value> =
                    recs.iter().map(|r| serde_json::from_slice(&r.line).unwrap_or(Value::Null)).collect();
                println!("{}", serde_json::to_string_pretty(&json!({"session": summary, "records": records}))?);
                return Ok(0);
            }
            println!("session {id}");
            let t0 = recs.first().and_then(|r| r.value["time_ms"].as_u64()).unwrap_or(0);
            for r in &recs {
                let t = r.value["time_ms"].as_u64().unwrap_or(0);
                let mut rest = r.value.clone();
                if let Some(o) = rest.as_object_mut() {
                    for k in ["time_ms", "type", "session"] {
                        o.remove(k);
                    }
                }
                println!(
                    "+{:>9.3}s  {}  #{:<8} {:<14} {}",
                    t.saturating_sub(t0) as f64 / 1000.0,
                    query::format_time(t),
                    r.seq,
                    r.value["type"].as_str().unwrap_or("?"),
                    rest
                );
            }
            Ok(0)
        }
        SessionsCommand::Replay { id, speed } => {
            let (id, recs) = match query::session_records(&dir, &id)? {
                Ok(x) => x,
                Err(msg) => {
                    eprintln!("portcullis: {msg}");
                    return Ok(2);
                }
            };
            let lines = query::replay_lines(&recs);
            let offsets: Vec<u64> = lines.iter().map(|(t, _)| *t).collect();
            let delays = query::replay_delays(&offsets, speed);
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            writeln!(out, "replay of session {id} (speed {speed}x)")?;
            for ((t, line), d) in lines.iter().zip(delays) {
                std::thread::sleep(d);
                if writeln!(out, "[+{:>8.3}s] {line}", *t as f64 / 1000.0).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            Ok(0)
        }
    }
}

async fn explain(a: ExplainArgs) -> anyhow::Result<i32> {
    let path = a.file.clone();
    let policy = match tokio::task::spawn_blocking(move || policy::load_file(&path)).await? {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return Ok(2);
        }
    };
    let Some(target) = policy.target(&a.target) else {
        anyhow::bail!("no target named `{}` in {}", a.target, a.file.display());
    };
    let subject = Subject { scope: a.scope.clone(), unit: a.unit.clone(), cgroup: a.cgroup.clone() };
    let binding = binding_for(&policy, &subject);
    let role = binding.map(|b| b.role.as_str());
    let mut classes: Vec<&str> = a.classes.iter().map(String::as_str).collect();
    let sql_shown;
    let decision = if let Some(repo) = a.repo.as_deref() {
        git_explain(&policy, role, target, repo, (&a.git_refs, &a.push_options), &mut classes)?
    } else if let Some(sql) = a.sql.as_deref() {
        anyhow::ensure!(target.protocol == policy::Protocol::Postgres, "--sql is for postgres targets");
        let (d, shown) = sql_explain(&policy, role, target, sql);
        sql_shown = shown;
        classes = sql_shown.iter().map(String::as_str).collect();
        d
    } else if let (Some(method), Some(path)) = (a.method.as_deref(), a.path.as_deref()) {
        anyhow::ensure!(target.protocol == policy::Protocol::Http, "--method and --path are for http targets");
        http_explain(&policy, role, target, method, path)?
    } else if classes.is_empty() {
        decide_session(&policy, role, target)
    } else {
        decide_classes(&policy, role, target, &classes)
    };
    if a.json {
        let out = json!({
            "subject": subject,
            "binding": binding.map(|b| json!({"index": b.index, "selector": b.selector.to_string(), "role": b.role})),
            "target": target.name,
            "classes": classes,
            "decision": decision,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match binding {
            Some(b) => println!("binding: bindings[{}] ({}) → role {}", b.index, b.selector, b.role),
            None => println!("binding: none matches this subject"),
        }
        println!("target:  {} ({})", target.name, target.protocol);
        if !classes.is_empty() {
            println!("request: {}", classes.join(", "));
        }
        println!("decision: {}", decision.verdict);
        println!("rule:     {}", decision.rule);
        println!("reason:   {}", decision.reason);
        if !decision.mask.is_empty() {
            println!("mask:     {}", decision.mask.join(", "));
        }
    }
    Ok(if decision.is_allow() { 0 } else { 2 })
}

/// `policy explain --sql TEXT` on a postgres target: each statement as the
/// enforcer classifies and decides it (printed to stderr); the answer is the
/// first refusal, else the last statement's decision. Unreadable SQL is
/// denied, as by the enforcer.
fn sql_explain(
    policy: &policy::Policy,
    role: Option<&str>,
    target: &policy::Target,
    sql: &str,
) -> (policy::Decision, Vec<String>) {
    use crate::protocols::postgres::classify;
    let rule_denial = |reason: String| match policy::decide::rule_of(policy, role, target) {
        Ok((r, rule)) => policy::Decision::deny(Some(&r.name), policy::decide::rule_ref(r, rule), reason),
        Err(d) => d,
    };
    let statements = match classify::classify(sql) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => return (rule_denial("no statement in the SQL text".into()), Vec::new()),
        Err(e) => return (rule_denial(format!("{e}; SQL portcullis cannot read is denied")), Vec::new()),
    };
    let mut shown = Vec::new();
    let mut answer = None;
    for s in &statements {
        let classes: Vec<&str> = s.all_classes().into_iter().collect();
        let tables: Vec<&str> = s.tables.iter().map(String::as_str).collect();
        let functions: Vec<(&str, Option<&str>)> = s.functions.iter().map(|f| (f.name.as_str(), f.class)).collect();
        let d = if s.foreign {
            rule_denial(format!("{} is not a PostgreSQL statement portcullis accepts", s.kind))
        } else {
            let req = policy::SqlRequest { classes: s.classes.iter().copied().collect(), tables, functions };
            policy::decide_sql(policy, role, target, &req)
        };
        eprintln!(
            "  {}: classes {}; tables {}; functions {} → {} ({})",
            s.kind,
            classes.join(", "),
            if s.tables.is_empty() { "-".into() } else { s.tables.iter().cloned().collect::<Vec<_>>().join(", ") },
            if s.functions.is_empty() {
                "-".into()
            } else {
                s.functions.iter().map(|f| f.name.clone()).collect::<Vec<_>>().join(", ")
            },
            d.verdict,
            d.reason
        );
        shown.push(format!("{} ({})", s.kind, classes.join(", ")));
        let refused = !d.is_allow();
        if answer.as_ref().is_none_or(|a: &policy::Decision| a.is_allow()) {
            answer = Some(d);
        }
        if refused {
            break;
        }
    }
    (answer.expect("at least one statement"), shown)
}

/// `policy explain --method M --path P` on an http target.
fn http_explain(
    policy: &policy::Policy,
    role: Option<&str>,
    target: &policy::Target,
    method: &str,
    path: &str,
) -> anyhow::Result<policy::Decision> {
    let path = crate::protocols::http::request::normalise_path(path).map_err(|e| anyhow::anyhow!("--path: {e}"))?;
    let req = policy::HttpRequest { method, path: &path, content_length: None, websocket: false };
    Ok(policy::decide_http(policy, role, target, &req).decision)
}

/// `policy explain --repo R [--ref KIND:REF ...]` on a git target.
fn git_explain<'a>(
    policy: &policy::Policy,
    role: Option<&str>,
    target: &policy::Target,
    repo: &str,
    (refs, options): (&'a [String], &[String]),
    shown: &mut Vec<&'a str>,
) -> anyhow::Result<policy::Decision> {
    use policy::{decide_git, GitRequest, GitService, RefKind};
    let mut parsed = Vec::new();
    for r in refs {
        let (kind, name) = r.split_once(':').ok_or_else(|| anyhow::anyhow!("--ref takes KIND:REF, not `{r}`"))?;
        let kind = match kind {
            "create" => RefKind::Create,
            "update" => RefKind::Update,
            "force" => RefKind::Force,
            "delete" => RefKind::Delete,
            other => anyhow::bail!("unknown ref update kind `{other}` (create, update, force, delete)"),
        };
        parsed.push((name, kind));
        shown.push(r.as_str());
    }
    let service = if parsed.is_empty() { GitService::UploadPack } else { GitService::ReceivePack };
    let repo = repo.trim_start_matches('/');
    let push_options: Vec<&str> = options.iter().map(String::as_str).collect();
    let d = decide_git(policy, role, target, &GitRequest { service, repo, refs: &parsed, push_options: &push_options });
    for ((name, kind), rd) in parsed.iter().zip(&d.refs) {
        eprintln!("  {} {name}: {} ({})", kind.name(), rd.verdict, rd.reason);
    }
    Ok(d.decision)
}

async fn exec(socket: &Path, a: ExecArgs) -> anyhow::Result<i32> {
    use std::os::unix::process::CommandExt;
    let data = control::call(socket, &Request::Scope { name: a.scope.clone() }).await?;
    let dir = PathBuf::from(data["cgroup"].as_str().ok_or_else(|| anyhow::anyhow!("bad answer from portcullis"))?);
    cgroup::enter(&dir, std::process::id()).map_err(|e| anyhow::anyhow!("cannot enter {}: {e}", dir.display()))?;
    let mut cmd = std::process::Command::new(&a.command[0]);
    cmd.args(&a.command[1..]);
    if let Some(user) = &a.user {
        let (uid, gid) = lookup_user(user)?;
        // std drops supplementary groups (setgroups) when it changes uid.
        cmd.uid(uid).gid(gid);
    }
    let err = cmd.exec();
    anyhow::bail!("cannot run {:?}: {err}", a.command[0])
}

async fn approvals(socket: &Path, cmd: ApprovalsCommand) -> anyhow::Result<i32> {
    use crate::approvals::{parse_duration, GrantScope};
    match cmd {
        ApprovalsCommand::List { watch: false, json } => {
            let v = control::call(socket, &Request::ApprovalsList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let list = v.as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("no requests waiting");
                }
                for p in list {
                    print_pending(&p);
                }
            }
        }
        ApprovalsCommand::List { watch: true, json } => {
            let (mut lines, _w) = control::stream(socket, &Request::ApprovalsWatch).await?;
            let current = control::next_answer(socket, &mut lines).await?;
            for p in current.as_array().cloned().unwrap_or_default() {
                if json {
                    println!("{}", serde_json::json!({"event": "held", "request": p}));
                } else {
                    print_pending(&p);
                }
            }
            loop {
                let ev = control::next_answer(socket, &mut lines).await?;
                if json {
                    println!("{ev}");
                } else if ev["event"] == "held" {
                    print_pending(&ev);
                } else {
                    println!("{} resolved: {}", ev["id"], ev["outcome"]["outcome"].as_str().unwrap_or("?"));
                }
            }
        }
        ApprovalsCommand::Show { id, json } => {
            let v = control::call(socket, &Request::ApprovalsShow { id }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_pending(&v);
                println!("  caller:  {}", v["caller"]);
            }
        }
        ApprovalsCommand::Approve { id, once: _, session, for_ } => {
            let scope = match (session, for_) {
                (true, _) => GrantScope::Session,
                (false, Some(d)) => GrantScope::For(
                    parse_duration(&d)
                        .ok_or_else(|| anyhow::anyhow!("--for takes a duration like 30s, 15m or 2h"))?
                        .as_secs(),
                ),
                (false, None) => GrantScope::Once,
            };
            control::call(socket, &Request::ApprovalsApprove { id, scope }).await?;
            println!("approved {id}");
        }
        ApprovalsCommand::Deny { id, reason } => {
            control::call(socket, &Request::ApprovalsDeny { id, reason }).await?;
            println!("denied {id}");
        }
    }
    Ok(0)
}

fn print_pending(p: &Value) {
    println!(
        "{}  {} → {} [{}] role {}  {}",
        p["id"],
        p["caller"]["comm"].as_str().unwrap_or("?"),
        p["target"].as_str().unwrap_or("?"),
        p["rule"].as_str().unwrap_or("?"),
        p["role"].as_str().unwrap_or("-"),
        p["request"].as_str().unwrap_or("")
    );
}

fn lookup_group(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let g = nix::unistd::Group::from_name(group)?.ok_or_else(|| anyhow::anyhow!("no group `{group}`"))?;
    Ok(g.gid.as_raw())
}

fn lookup_user(user: &str) -> anyhow::Result<(u32, u32)> {
    if let Ok(uid) = user.parse::<u32>() {
        let gid = nix::unistd::User::from_uid(uid.into())?.map_or(uid, |u| u.gid.as_raw());
        return Ok((uid, gid));
    }
    let u = nix::unistd::User::from_name(user)?.ok_or_else(|| anyhow::anyhow!("no user `{user}`"))?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

fn print_status(v: &Value) {
    println!(
        "portcullis {} (pid {}), listening on port {}",
        v["version"].as_str().unwrap_or("?"),
        v["pid"],
        v["listen_port"]
    );
    println!(
        "policy: {} ({})",
        v["policy"]["source"].as_str().unwrap_or("?"),
        &v["policy"]["digest"].as_str().unwrap_or("")[..12.min(v["policy"]["digest"].as_str().unwrap_or("").len())]
    );
    println!(
        "programs: {}",
        v["programs"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );
    println!("scopes:");
    for s in v["scopes"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} egress={:<5} {} {}",
            s["name"].as_str().unwrap_or("?"),
            s["egress"].as_str().unwrap_or("?"),
            if s["attached"] == true { "attached" } else { "NOT ATTACHED" },
            s["cgroup"].as_str().unwrap_or("-")
        );
    }
    let unresolved: Vec<&str> =
        v["unresolved_scopes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if !unresolved.is_empty() {
        println!("  (not attached until their unit runs: {})", unresolved.join(", "));
    }
    println!("metrics: {}", v["metrics_addr"].as_str().map_or("off".to_string(), |a| format!("http://{a}/metrics")));
    println!("targets:");
    for t in v["targets"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:<8} {}",
            t["name"].as_str().unwrap_or("?"),
            t["protocol"].as_str().unwrap_or("?"),
            t["match"]
        );
    }
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    println!("connections: {}", conns.len());
    for c in conns {
        println!(
            "  {} {} → {} ({}) pid {} {}",
            c["session"].as_str().unwrap_or("?"),
            c["comm"].as_str().unwrap_or("?"),
            c["orig_dst"].as_str().unwrap_or("?"),
            c["target"].as_str().unwrap_or("?"),
            c["tgid"],
            c["unit"].as_str().unwrap_or("")
        );
    }
    let a = &v["audit"];
    if !a.is_null() {
        println!(
            "audit: {} ({} written, {} queued, {} fsyncs, {} lost, {} write errors)",
            a["dir"].as_str().unwrap_or("?"),
            a["written"],
            a["queued"],
            a["fsyncs"],
            a["lost"],
            a["write_errors"]
        );
    }
    println!("counters:");
    if let Some(m) = v["counters"].as_object() {
        for (k, n) in m {
            println!("  {k:<18} {n}");
        }
    }
}
