//! `portcullis run`: load the policy, attach the probes, listen, and serve
//! until stopped; reload the policy on SIGHUP or when its file changes.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use portcullis_common::Config;
use serde_json::{json, Value};
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
};
use tracing::{error, info, warn};

use crate::{
    approvals::{notify::Notifier, Approvals},
    audit::{Audit, Event},
    config::{embedded_object, RunConfig},
    control::{self, StatusSource},
    enforcer::{Enforcer, Settings, Stats},
    error::Error,
    intercept::{
        self,
        cgroup::{self, CgroupResolver},
        events,
        probes::{ApplyReport, Probes},
    },
    policy::{self, Policy, ScopeLocation},
    tls::LocalCa,
};

struct Daemon {
    enforcer: Arc<Enforcer>,
    probes: Arc<Mutex<Probes>>,
    mount: PathBuf,
    report: Mutex<ApplyReport>,
    config: RunConfig,
    started_ms: u64,
}

pub async fn run(config: RunConfig) -> Result<(), Error> {
    raise_nofile_limit();
    let policy = match &config.policy {
        Some(p) => {
            let path = p.clone();
            tokio::task::spawn_blocking(move || policy::load_file(&path))
                .await
                .map_err(|e| Error::Other(e.to_string()))??
        }
        None => {
            info!("no --policy given: observe mode (scope `agent`, every TCP connection relayed and recorded)");
            policy::observe_policy()
        }
    };
    let mount = cgroup::cgroup2_mount().map_err(|source| Error::Io {
        what: "cgroup2",
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    // The state directory holds the audit log and the CA key: root only.
    std::fs::create_dir_all(&config.state_dir)
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|source| Error::Io { what: "state directory", path: config.state_dir.clone(), source })?;
    let audit = Audit::open(&config.state_dir.join("audit"))?;

    // Listen before the probes point at us, so no redirected connect meets
    // a closed port once we are up.
    let port = config.listen_port;
    let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "no IPv6 loopback listener; IPv6 targets will be refused");
            None
        }
    };

    let object: Vec<u8> = match &config.bpf_object {
        Some(p) => {
            std::fs::read(p).map_err(|source| Error::Io { what: "cannot read eBPF object", path: p.clone(), source })?
        }
        None => embedded_object().to_vec(),
    };
    let kconfig = Config { enforcer_port: port, _pad: 0, enforcer_mark: config.mark };
    let (mut probes, conns, ring) = Probes::load(&object, &config.pin_dir, kconfig)?;
    let report = probes.apply(&policy, &mount)?;
    for s in &report.attached {
        info!(scope = %s.scope, cgroup = %s.cgroup, cgroup_id = s.cgroup_id, "guarding");
    }
    warn_privileged(&mount, &report);

    let resolver = CgroupResolver::new(mount.clone());
    for s in &report.attached {
        resolver.remember(s.cgroup_id, &s.cgroup);
    }
    let settings = Settings { listen_port: port, mark: config.mark };
    audit.record(Event::AgentStart { version: env!("CARGO_PKG_VERSION").into(), listen_port: port });
    audit.record(Event::PolicyLoaded { source: source_name(&policy), digest: policy.digest.clone() });
    let ca = Arc::new(LocalCa::load_or_create(&config.state_dir).map_err(|e| Error::Other(format!("local CA: {e}")))?);
    let approvals = Arc::new(Approvals::new(audit.clone(), notifier_for(&policy)));
    let enforcer = Arc::new(Enforcer::new(policy, audit.clone(), resolver, conns, settings, ca, approvals));

    let daemon = Arc::new(Daemon {
        enforcer: enforcer.clone(),
        probes: Arc::new(Mutex::new(probes)),
        mount,
        report: Mutex::new(report),
        config: config.clone(),
        started_ms: crate::audit::now_ms(),
    });

    let control = control::bind(&config.control_socket, config.control_group)?;
    tokio::spawn(control::serve(control, enforcer.clone(), daemon.clone() as Arc<dyn StatusSource>));
    tokio::spawn(events::run(ring, enforcer.clone()));
    tokio::spawn(intercept::serve(v4, enforcer.clone()));
    if let Some(v6) = v6 {
        tokio::spawn(intercept::serve(v6, enforcer.clone()));
    }
    if config.policy.is_some() {
        tokio::spawn(watch_policy(daemon.clone()));
    }
    info!(port, pin_dir = %config.pin_dir.display(), control = %config.control_socket.display(), "portcullis ready");

    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Other(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Other(e.to_string()))?;
    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(reason, "stopping; probes stay pinned, so guarded connects to targets are refused until portcullis is back");
    let _ = audit.record_durable(Event::AgentStop { reason: reason.into() }).await;
    Ok(())
}

/// The guard assumes guarded processes lack CAP_SYS_ADMIN, CAP_NET_ADMIN
/// and CAP_BPF (with them a process can leave its cgroup or remove the
/// programs): say so loudly when one has them.
fn warn_privileged(mount: &Path, report: &ApplyReport) {
    for s in &report.attached {
        for p in cgroup::privileged_processes(mount, &mount.join(&s.cgroup)) {
            warn!(scope = %s.scope, pid = p.pid, comm = %p.comm, cgroup = %p.cgroup, caps = ?p.caps,
                  "a guarded process holds capabilities that let it escape the guard; run it unprivileged");
        }
    }
}

/// Each guarded connection costs two descriptors (caller and upstream):
/// lift the soft limit to the hard one.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(|source| Error::Io { what: "socket", path: addr.to_string().into(), source })?;
    sock.set_reuseaddr(true).map_err(|source| Error::Io { what: "socket", path: addr.to_string().into(), source })?;
    sock.bind(addr).map_err(|source| Error::Io { what: "cannot listen on", path: addr.to_string().into(), source })?;
    sock.listen(4096).map_err(|source| Error::Io { what: "cannot listen on", path: addr.to_string().into(), source })
}

/// The webhook of the policy's `[approvals]` section (validated at load).
fn notifier_for(p: &Policy) -> Notifier {
    match p.approvals.webhook.as_deref().map(Notifier::new) {
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            warn!(error = %e, "approval webhook disabled");
            Notifier::disabled()
        }
        None => Notifier::disabled(),
    }
}

fn source_name(p: &Policy) -> String {
    p.source.as_ref().map_or_else(|| "built-in observe policy".into(), |s| s.display().to_string())
}

/// Reloads on SIGHUP and when the file changes (checked every second, by
/// content, so editors that replace the file are seen too).
async fn watch_policy(daemon: Arc<Daemon>) {
    let path = daemon.config.policy.clone().expect("watch only with a policy file");
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "no SIGHUP handler; reloads follow file changes only");
            return;
        }
    };
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let forced = tokio::select! {
            _ = hup.recv() => true,
            _ = tick.tick() => false,
        };
        let now = std::fs::read(&path).ok();
        if !forced && now == last {
            continue;
        }
        last = now;
        reload(&daemon, &path).await;
    }
}

async fn reload(daemon: &Arc<Daemon>, path: &Path) {
    let enforcer = &daemon.enforcer;
    let p = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || policy::load_file(&p)).await;
    let new = match loaded {
        Ok(Ok(p)) => p,
        Ok(Err(errs)) => {
            Stats::inc(&enforcer.stats.reload_failures);
            error!(errors = %errs, "policy refused; the running policy stays in force");
            enforcer.audit.record(Event::PolicyRejected {
                source: path.display().to_string(),
                errors: errs.to_string().lines().map(str::to_string).collect(),
            });
            return;
        }
        Err(e) => {
            error!(error = %e, "policy reload task failed");
            return;
        }
    };
    let d = daemon.clone();
    let old = enforcer.policy();
    let applied = tokio::task::spawn_blocking(move || {
        let mut probes = d.probes.lock().expect("probes lock");
        match probes.apply(&new, &d.mount) {
            Ok(r) => Ok((new, r)),
            Err(e) => {
                // Put the kernel back in line with the policy still in force.
                let _ = probes.apply(&old, &d.mount);
                Err(e)
            }
        }
    })
    .await;
    match applied {
        Ok(Ok((new, report))) => {
            for s in &report.attached {
                enforcer.cgroups.remember(s.cgroup_id, &s.cgroup);
            }
            Stats::inc(&enforcer.stats.reloads);
            info!(source = %path.display(), digest = %new.digest, "policy reloaded");
            enforcer
                .audit
                .record(Event::PolicyLoaded { source: path.display().to_string(), digest: new.digest.clone() });
            enforcer.set_policy(new);
            *daemon.report.lock().expect("report lock") = report;
            warn_privileged(&daemon.mount, &daemon.report.lock().expect("report lock"));
            let revoked = enforcer.revalidate();
            if revoked > 0 {
                info!(revoked, "open sessions the new policy no longer admits were closed");
            }
        }
        Ok(Err(e)) => {
            Stats::inc(&enforcer.stats.reload_failures);
            error!(error = %e, "applying the new policy to the kernel failed; the running policy stays in force");
            enforcer
                .audit
                .record(Event::PolicyRejected { source: path.display().to_string(), errors: vec![e.to_string()] });
        }
        Err(e) => error!(error = %e, "policy apply task failed"),
    }
}

impl StatusSource for Daemon {
    fn status(&self) -> Value {
        let policy = self.enforcer.policy();
        let report = self.report.lock().expect("report lock").clone();
        let programs: Vec<String> = std::fs::read_dir(self.config.pin_dir.join("progs"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let scopes: Vec<Value> = policy
            .scopes
            .iter()
            .map(|s| {
                let att = report.attached.iter().find(|a| a.scope == s.name);
                json!({
                    "name": s.name,
                    "location": s.location,
                    "egress": s.egress,
                    "cgroup": att.map(|a| a.cgroup.clone()),
                    "cgroup_id": att.map(|a| a.cgroup_id),
                    "attached": att.is_some(),
                })
            })
            .collect();
        let targets: Vec<Value> = policy
            .targets
            .iter()
            .map(|t| json!({"name": t.name, "protocol": t.protocol, "match": t.matches.iter().map(|m| m.text.clone()).collect::<Vec<_>>()}))
            .collect();
        let probes = self.probes.lock().expect("probes lock");
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started_ms": self.started_ms,
            "listen_port": self.config.listen_port,
            "pin_dir": self.config.pin_dir,
            "cgroup_mount": self.mount,
            "policy": {"source": source_name(&policy), "digest": policy.digest},
            "programs": programs,
            "attached_cgroups": probes.attached().keys().collect::<Vec<_>>(),
            "scopes": scopes,
            "targets": targets,
            "connections": self.enforcer.live_sessions(),
            "counters": self.enforcer.stats.snapshot(),
        })
    }

    fn guarded_cgroups(&self) -> Vec<u64> {
        self.probes.lock().expect("probes lock").attached().keys().copied().collect()
    }

    fn cgroup_mount(&self) -> PathBuf {
        self.mount.clone()
    }

    fn scope_cgroup(&self, name: &str) -> Option<PathBuf> {
        let policy = self.enforcer.policy();
        let scope = policy.scope(name)?;
        let rel = match &scope.location {
            ScopeLocation::Cgroup(rel) => rel.clone(),
            ScopeLocation::Unit(unit) => cgroup::unit_cgroup(&self.mount, unit)?,
        };
        Some(self.mount.join(rel))
    }
}
