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
    /// Check that this host can run portcullis, and how to fix what fails.
    Doctor(crate::doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (portcullis.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
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
    /// Loopback address of the Prometheus endpoint (`/metrics`), or `off`.
    #[arg(long, env = "PORTCULLIS_METRICS_ADDR", default_value = crate::metrics::DEFAULT_ADDR)]
    pub metrics_addr: String,
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
                bpf_object: a.bpf_object,
                mark: a.mark,
                metrics: crate::metrics::parse_addr(&a.metrics_addr)?,
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
        Command::Policy(PolicyCommand::Explain(a)) => explain(a).await,
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
        // Groups first, while still root: supplementary groups, then the
        // group, then the user (after setuid, setgroups is refused).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let err = cmd.exec();
    anyhow::bail!("cannot run {:?}: {err}", a.command[0])
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
    println!("counters:");
    if let Some(m) = v["counters"].as_object() {
        for (k, n) in m {
            println!("  {k:<18} {n}");
        }
    }
}
