//! The command line: what users type.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::{
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
    },
    /// Show the decision and the rule behind it for a subject and request.
    Explain(ExplainArgs),
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
}

/// Exit codes: 0 ok, 1 failure, 2 policy errors / denied explanation.
pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(a) => {
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
        Command::Policy(PolicyCommand::Check { files }) => {
            let mut failed = false;
            for f in files {
                let path = f.clone();
                match tokio::task::spawn_blocking(move || policy::load_file(&path)).await? {
                    Ok(p) => println!(
                        "{}: ok ({} scopes, {} targets, {} roles, {} bindings)",
                        f.display(),
                        p.scopes.len(),
                        p.targets.len(),
                        p.roles.len(),
                        p.bindings.len()
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed { 2 } else { 0 })
        }
        Command::Policy(PolicyCommand::Explain(a)) => explain(a).await,
        Command::Approvals(a) => approvals(&cli.control_socket, a).await,
        Command::Ca(CaCommand::Export { state_dir }) => {
            let ca = crate::tls::LocalCa::load_or_create(&state_dir)?;
            print!("{}", ca.cert_pem());
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
    let classes: Vec<&str> = a.classes.iter().map(String::as_str).collect();
    let decision = if classes.is_empty() {
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
    println!("counters:");
    if let Some(m) = v["counters"].as_object() {
        for (k, n) in m {
            println!("  {k:<18} {n}");
        }
    }
}
