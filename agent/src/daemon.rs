//! `portcullis run`: load the policy, attach the probes, listen, and serve
//! until stopped; reload the policy on SIGHUP or when its file changes;
//! follow scope cgroups that are recreated (a unit restarting); tell
//! systemd when it is ready (`Type=notify`).
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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
    metrics::{self, Exporter},
    policy::{self, Policy, ScopeLocation},
    tls::LocalCa,
    workers::Workers,
};

struct Daemon {
    enforcer: Arc<Enforcer>,
    probes: Arc<Mutex<Probes>>,
    mount: PathBuf,
    report: Mutex<ApplyReport>,
    /// Held across "apply to the kernel, then record the result" by the
    /// reloader and the cgroup follower, so neither applies a stale policy
    /// over the other's.
    applying: tokio::sync::Mutex<()>,
    config: RunConfig,
    started_ms: u64,
}

pub async fn run(config: RunConfig) -> Result<(), Error> {
    raise_open_files_limit();
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
    let audit = Audit::open(config.audit.clone())?;

    // Listen before the probes point at us, so no redirected connect meets
    // a closed port once we are up.
    let port = config.listen_port;
    // Kernel records made before this moment are from connects no enforcer
    // took (purged once the maps are open).
    let listening_since = crate::intercept::probes::born_now();
    let v4 = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let v6 = match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
        Ok(l) => Some(l),
        // Someone else holds it: they would get the IPv6 connections the
        // probes send there.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(Error::Io {
                what: "IPv6 listener (the port is taken)",
                path: format!("[::1]:{port}").into(),
                source,
            });
        }
        Err(e) => {
            warn!(error = %e, "no IPv6 loopback listener; IPv6 targets will be refused");
            None
        }
    };

    // A taken metrics port is a configuration error: say so before the
    // kernel is touched.
    let metrics_listener = match config.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };

    let object: Vec<u8> = match &config.bpf_object {
        Some(p) => {
            std::fs::read(p).map_err(|source| Error::Io { what: "cannot read eBPF object", path: p.clone(), source })?
        }
        None => embedded_object().to_vec(),
    };
    let kconfig = Config { enforcer_port: port, _pad: 0, enforcer_mark: config.mark };
    let (mut probes, conns, ring) = Probes::load(&object, &config.pin_dir, kconfig)?;
    match conns.purge_before(listening_since) {
        Ok(0) => {}
        Ok(n) => info!(records = n, "kernel records of connects made while no enforcer listened removed"),
        Err(e) => warn!(error = %e, "could not clear old kernel records (they expire on their own)"),
    }
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
        applying: tokio::sync::Mutex::new(()),
        config: config.clone(),
        started_ms: crate::audit::now_ms(),
    });

    let control = control::bind(&config.control_socket, config.control_group)?;
    tokio::spawn(control::serve(control, enforcer.clone(), daemon.clone() as Arc<dyn StatusSource>));
    tokio::spawn(events::run(ring, enforcer.clone()));
    let workers = Arc::new(
        Workers::start(config.workers).map_err(|e| Error::Other(format!("starting connection workers: {e}")))?,
    );
    tokio::spawn(intercept::serve(v4, enforcer.clone(), workers.clone()));
    tokio::spawn(intercept::record_suppressed(enforcer.clone()));
    if let Some(v6) = v6 {
        tokio::spawn(intercept::serve(v6, enforcer.clone(), workers.clone()));
    }
    if let Some(listener) = metrics_listener {
        let d = daemon.clone();
        let exporter = Exporter {
            enforcer: enforcer.clone(),
            pin_dir: config.pin_dir.clone(),
            started_ms: daemon.started_ms,
            scopes: Box::new(move || {
                let r = d.report.lock().expect("report lock");
                (r.attached.len(), r.unresolved.len())
            }),
        };
        tokio::spawn(metrics::serve(listener, Arc::new(exporter)));
    }
    if config.policy.is_some() {
        tokio::spawn(watch_policy(daemon.clone()));
    }
    tokio::spawn(follow_scopes(daemon.clone()));
    info!(port, pin_dir = %config.pin_dir.display(), control = %config.control_socket.display(),
          metrics = %config.metrics.map_or_else(|| "off".to_string(), |a| a.to_string()), "portcullis ready");
    // The probes are attached and every listener is up: only now may
    // systemd start the units ordered after us.
    let attached = daemon.report.lock().expect("report lock").attached.len();
    sd_notify(&format!("READY=1\nSTATUS=guarding {attached} scope(s); listening on port {port}"));

    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Other(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Other(e.to_string()))?;
    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    sd_notify("STOPPING=1");
    info!(reason, "stopping; probes stay pinned, so guarded connects to targets are refused until portcullis is back");
    let _ = audit.record_durable(Event::AgentStop { reason: reason.into() }).await;
    Ok(())
}

/// The guard assumes guarded processes are not root and lack the
/// capabilities that undo it (`cgroup::DANGEROUS_CAPS`: with them a process
/// can leave its cgroup, remove the programs, or send around them): say so
/// loudly when one has them.
fn warn_privileged(mount: &Path, report: &ApplyReport) {
    for s in &report.attached {
        for p in cgroup::privileged_processes(mount, &mount.join(&s.cgroup)) {
            warn!(scope = %s.scope, pid = p.pid, comm = %p.comm, cgroup = %p.cgroup, caps = ?p.caps,
                  "a guarded process holds capabilities that let it escape the guard; run it unprivileged");
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

/// Each relayed connection holds two sockets and two pipes: take the whole
/// allowance of open files the hard limit grants, not the 1024 soft default.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open files limit"),
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
    // When the file's current content was last loaded on a file change: a
    // SIGHUP right after it (an editor's save and a `systemctl reload` in
    // one go) has nothing left to do.
    let mut changed_at: Option<std::time::Instant> = None;
    loop {
        let forced = tokio::select! {
            _ = hup.recv() => true,
            _ = tick.tick() => false,
        };
        let now = std::fs::read(&path).ok();
        if now == last && (!forced || changed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(2))) {
            continue;
        }
        changed_at = (!forced).then(std::time::Instant::now);
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
    let _serial = daemon.applying.lock().await;
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
            sd_notify(&format!("STATUS=guarding {} scope(s); policy reloaded", report.attached.len()));
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

/// Sends a state line to systemd's notification socket (`sd_notify(3)`),
/// when there is one (`NOTIFY_SOCKET`: a path, or `@name` for an abstract
/// socket). Best effort: without systemd it does nothing.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = notify_to(&path, state) {
        warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

fn notify_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::{linux::net::SocketAddrExt, unix::ffi::OsStrExt, unix::net::UnixDatagram};
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        None => std::os::unix::net::SocketAddr::from_pathname(Path::new(path))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// How often scope cgroups are checked for recreation.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);
/// How often a unit that is not running is looked up afresh (asking
/// systemd, or walking the tree, costs more than a stat).
const RESOLVE_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps the probes on every scope's cgroup as cgroups come and go: a unit's
/// cgroup is removed when it stops and created anew (with a new id) when it
/// starts; a scope cgroup removed by someone else is created again. Each
/// change re-applies the policy in force, which attaches the new cgroup and
/// drops the old one.
async fn follow_scopes(daemon: Arc<Daemon>) {
    let mut hints: HashMap<String, String> = HashMap::new();
    let mut last_resolve = Instant::now();
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let policy = daemon.enforcer.policy();
        let resolve = last_resolve.elapsed() >= RESOLVE_INTERVAL;
        if resolve {
            last_resolve = Instant::now();
        }
        let d = daemon.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let report = d.report.lock().expect("report lock").clone();
            for a in &report.attached {
                if let Some(ScopeLocation::Unit(unit)) = policy.scope(&a.scope).map(|s| &s.location) {
                    hints.insert(unit.clone(), a.cgroup.clone());
                }
            }
            if resolve {
                for s in &policy.scopes {
                    if let ScopeLocation::Unit(unit) = &s.location {
                        if let Some(h) = cgroup::unit_cgroup_hint(unit) {
                            hints.insert(unit.clone(), h);
                        }
                    }
                }
            }
            let drift = scopes_drifted(&policy, &report, &d.mount, &hints, resolve);
            (drift, hints)
        })
        .await;
        let drift;
        (drift, hints) = match checked {
            Ok(x) => x,
            Err(e) => {
                error!(error = %e, "scope check task failed");
                return;
            }
        };
        if let Some(why) = drift {
            if !reattach(&daemon, &why).await {
                // Do not retry a failing attach ten times a second.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Why the attachments no longer match where the scopes are, if they don't.
fn scopes_drifted(
    policy: &Policy,
    report: &ApplyReport,
    mount: &Path,
    hints: &HashMap<String, String>,
    resolve: bool,
) -> Option<String> {
    let id_at = |rel: &str| cgroup::cgroup_id(&mount.join(rel)).ok();
    for s in &policy.scopes {
        let attached = report.attached.iter().find(|a| a.scope == s.name);
        match (&s.location, attached) {
            (ScopeLocation::Cgroup(rel), Some(a)) => {
                if id_at(rel) != Some(a.cgroup_id) {
                    return Some(format!("cgroup {rel} of scope {} was removed or recreated", s.name));
                }
            }
            (ScopeLocation::Cgroup(rel), None) => {
                return Some(format!("cgroup {rel} of scope {} is not attached", s.name));
            }
            (ScopeLocation::Unit(unit), Some(a)) => {
                if id_at(&a.cgroup) != Some(a.cgroup_id) {
                    return Some(format!("the cgroup of unit {unit} (scope {}) was removed or recreated", s.name));
                }
                // The unit now runs somewhere else than what is attached.
                if resolve {
                    if let Some(cg) = cgroup::systemd_unit_cgroup(unit) {
                        if cg.trim_matches('/') != a.cgroup.trim_matches('/') {
                            return Some(format!("unit {unit} (scope {}) runs in {cg} now", s.name));
                        }
                    }
                }
            }
            (ScopeLocation::Unit(unit), None) => {
                if hints.get(unit).is_some_and(|h| id_at(h).is_some()) {
                    return Some(format!("unit {unit} (scope {}) has a cgroup now", s.name));
                }
                if resolve && cgroup::unit_cgroup(mount, unit).is_some() {
                    return Some(format!("unit {unit} (scope {}) has a cgroup now", s.name));
                }
            }
        }
    }
    None
}

/// Re-applies the policy in force to the kernel after a cgroup change;
/// false when that failed.
async fn reattach(daemon: &Arc<Daemon>, why: &str) -> bool {
    let _serial = daemon.applying.lock().await;
    let d = daemon.clone();
    let policy = daemon.enforcer.policy();
    let applied =
        tokio::task::spawn_blocking(move || d.probes.lock().expect("probes lock").apply(&policy, &d.mount)).await;
    match applied {
        Ok(Ok(report)) => {
            let enforcer = &daemon.enforcer;
            for s in &report.attached {
                enforcer.cgroups.remember(s.cgroup_id, &s.cgroup);
            }
            Stats::inc(&enforcer.stats.reattachments);
            for s in &report.attached {
                info!(scope = %s.scope, cgroup = %s.cgroup, cgroup_id = s.cgroup_id, reason = %why, "guarding");
            }
            for s in &report.unresolved {
                info!(scope = %s, reason = %why, "scope has no cgroup now; it is attached again when its unit starts");
            }
            *daemon.report.lock().expect("report lock") = report;
            true
        }
        // The cgroup may vanish again between the check and the attach:
        // the next check retries.
        Ok(Err(e)) => {
            warn!(error = %e, reason = %why, "re-attaching the probes failed; retrying");
            false
        }
        Err(e) => {
            error!(error = %e, "re-attach task failed");
            false
        }
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
            "metrics_addr": self.config.metrics.map(|a| a.to_string()),
            "pin_dir": self.config.pin_dir,
            "cgroup_mount": self.mount,
            "policy": {"source": source_name(&policy), "digest": policy.digest},
            "programs": programs,
            "attached_cgroups": probes.attached().keys().collect::<Vec<_>>(),
            "scopes": scopes,
            "unresolved_scopes": report.unresolved,
            "targets": targets,
            "connections": self.enforcer.live_sessions(),
            "counters": self.enforcer.stats.snapshot(),
            "audit": self.enforcer.audit.status(),
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::intercept::probes::AttachedScope;

    const POLICY: &str = r#"version = 1
[[scopes]]
name = "g"
cgroup = "guarded.slice"
[[scopes]]
name = "u"
unit = "runner.service"
"#;

    fn attached(mount: &Path, scope: &str, rel: &str) -> AttachedScope {
        AttachedScope {
            scope: scope.into(),
            cgroup: rel.into(),
            cgroup_id: cgroup::cgroup_id(&mount.join(rel)).unwrap(),
        }
    }

    /// Replaces a directory with a new one (new inode), as systemd does when
    /// a unit restarts.
    fn recreate(dir: &Path) {
        let tmp = dir.with_extension("new");
        fs::create_dir(&tmp).unwrap();
        fs::remove_dir(dir).unwrap();
        fs::rename(&tmp, dir).unwrap();
    }

    #[test]
    fn drift_is_seen_when_cgroups_are_recreated_appear_or_vanish() {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path();
        let policy = crate::policy::parse(POLICY).unwrap();
        let unit_dir = mount.join("system.slice/runner.service");
        fs::create_dir_all(&unit_dir).unwrap();
        fs::create_dir_all(mount.join("guarded.slice")).unwrap();
        let mut report = ApplyReport {
            attached: vec![attached(mount, "g", "guarded.slice"), attached(mount, "u", "system.slice/runner.service")],
            ..ApplyReport::default()
        };
        let none = HashMap::new();
        assert_eq!(scopes_drifted(&policy, &report, mount, &none, true), None);

        // The unit restarted: same path, new id.
        recreate(&unit_dir);
        let why = scopes_drifted(&policy, &report, mount, &none, false).expect("recreated unit cgroup");
        assert!(why.contains("runner.service"), "{why}");
        report.attached[1] = attached(mount, "u", "system.slice/runner.service");
        assert_eq!(scopes_drifted(&policy, &report, mount, &none, false), None);

        // The unit stopped: its cgroup is gone.
        fs::remove_dir(&unit_dir).unwrap();
        assert!(scopes_drifted(&policy, &report, mount, &none, false).is_some());
        report.attached.pop();
        report.unresolved.push("u".into());
        assert_eq!(scopes_drifted(&policy, &report, mount, &none, true), None);

        // It starts again: seen at once where its path is known, else at
        // the next full lookup.
        fs::create_dir(&unit_dir).unwrap();
        let hints = HashMap::from([("runner.service".to_string(), "system.slice/runner.service".to_string())]);
        assert!(scopes_drifted(&policy, &report, mount, &hints, false).is_some());
        assert_eq!(scopes_drifted(&policy, &report, mount, &none, false), None);
        assert!(scopes_drifted(&policy, &report, mount, &none, true).is_some());

        // A guarded slice removed by someone else is noticed too.
        report.attached.push(attached(mount, "u", "system.slice/runner.service"));
        fs::remove_dir(mount.join("guarded.slice")).unwrap();
        let why = scopes_drifted(&policy, &report, mount, &none, false).expect("slice removed");
        assert!(why.contains("guarded.slice"), "{why}");
    }
}
