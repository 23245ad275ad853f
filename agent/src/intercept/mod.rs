//! The enforcer's side of the kernel path: accept redirected connections,
//! find the kernel's record of who made each one, and hand it on. A
//! connection without a record did not come through the kernel path: it is
//! closed and recorded (fail closed).
pub mod attribution;
pub mod cgroup;
pub mod events;
pub mod flood;
pub mod probes;
pub mod sys;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::{
    audit::{DecisionInfo, Event, RequestInfo},
    enforcer::{Enforcer, LiveSession, Stats},
    ids::SessionId,
    policy::{decide_classes, decide_session, role_for, Decision, Protocol, Subject, Verdict},
    protocols::{self, Session},
    workers::Workers,
};

/// An accepted connection that could not be handed to a worker (it is
/// closed): logged and recorded like one that could not be attributed.
fn lost(enforcer: &Enforcer, peer: std::net::SocketAddr, e: &std::io::Error) {
    unattributed(enforcer, peer, format!("could not be handed to a worker: {e}"));
}

/// Counts, logs and records a connection closed before it was attributed;
/// past [`flood::PER_SECOND`] a second only counts it (see
/// [`record_suppressed`]).
fn unattributed(enforcer: &Enforcer, peer: SocketAddr, reason: String) {
    Stats::inc(&enforcer.stats.unattributed);
    if enforcer.unattributed_gate.admit(std::time::Instant::now()) {
        warn!(peer = %peer, reason = %reason, "unattributed connection closed");
        enforcer.audit.record(Event::Unattributed { peer: peer.to_string(), reason });
    }
}

/// Records, once a second, how many unattributed connections, kernel
/// refusals and denied connections (per caller) were only counted.
pub async fn record_suppressed(enforcer: Arc<Enforcer>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let per_second = flood::PER_SECOND;
        for (of, gate) in [("unattributed", &enforcer.unattributed_gate), ("kernel_refusal", &enforcer.refusal_gate)] {
            let count = gate.take_suppressed();
            if count > 0 {
                warn!(of, count, per_second, "past the rate: counted, not recorded one by one");
                enforcer.audit.record(Event::Suppressed { of: of.into(), count, per_second, caller: None });
            }
        }
        for (caller, count) in enforcer.denied_gates.take_suppressed(std::time::Instant::now()) {
            warn!(of = "denied_session", caller = %caller, count, per_second, "past the rate: counted, not recorded one by one");
            let of = "denied_session".into();
            enforcer.audit.record(Event::Suppressed { of, count, per_second, caller: Some(caller) });
        }
    }
}

/// Accepts connections until the listener fails, handing each to a worker.
pub async fn serve(listener: TcpListener, enforcer: Arc<Enforcer>, workers: Arc<Workers>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let enforcer = enforcer.clone();
                // The socket moves to the worker's own event loop.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        lost(&enforcer, peer, &e);
                        continue;
                    }
                };
                workers.spawn(async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => handle(enforcer, stream, peer).await,
                        Err(e) => lost(&enforcer, peer, &e),
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(enforcer: Arc<Enforcer>, stream: TcpStream, peer: SocketAddr) {
    Stats::inc(&enforcer.stats.accepted);
    let key = attribution::client_key(peer);
    let record = match enforcer.conns.take(&key) {
        Ok(Some(r)) => r,
        other => {
            let reason = match other {
                Err(e) => format!("kernel record: {e}"),
                _ => "no kernel record: the connection did not come through a guarded scope".into(),
            };
            unattributed(&enforcer, peer, reason);
            // Reset rather than close politely: the peer gets nothing.
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger);
            return;
        }
    };

    let policy = enforcer.policy();
    let caller = attribution::caller(&record, &enforcer.cgroups, &policy);
    let orig_dst = attribution::orig_dst(&record);
    let id = SessionId::random();
    let subject = Subject {
        scope: caller.scope.clone(),
        unit: caller.unit.clone(),
        cgroup: caller.cgroup.clone().unwrap_or_default(),
    };
    let role = role_for(&policy, &subject).map(|r| r.name.clone());

    // A caller looping on a connection it is denied must not fill the log:
    // past the rate, a denial is counted and the connection reset.
    let caller_key = caller.cgroup.clone().unwrap_or_else(|| format!("cgroup-id:{}", caller.cgroup_id));
    let quiet_denial = |stream: &TcpStream| {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        let _ = nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::Linger, &linger);
    };

    // The current policy decides, not the one in force at connect().
    let Some(target) = policy.target_for(orig_dst.0).cloned() else {
        let decision =
            Decision::deny(role.as_deref(), "targets", format!("{orig_dst} matches no target of the policy in force"));
        Stats::inc(&enforcer.stats.denied);
        enforcer.stats.decision(&decision, "", "");
        if !enforcer.denied_gates.admit(&caller_key, std::time::Instant::now()) {
            quiet_denial(&stream);
            return;
        }
        info!(session = %id, orig_dst = %orig_dst, tgid = caller.tgid, uid = caller.uid, unit = caller.unit.as_deref().unwrap_or("-"),
              exe = caller.exe.as_deref().unwrap_or("-"), verdict = "deny", reason = %decision.reason, "connection");
        enforcer.audit.record(Event::SessionStart {
            session: id,
            caller,
            target: String::new(),
            protocol: String::new(),
            orig_dst,
            role,
        });
        enforcer.audit.record(Event::Decision {
            session: id,
            request: RequestInfo::Session,
            decision: DecisionInfo::from(&decision),
        });
        enforcer.audit.record(Event::SessionEnd { session: id, reason: "denied".into(), bytes_up: 0, bytes_down: 0 });
        return;
    };

    let (decision, request) = if target.protocol == Protocol::Tcp {
        let d = decide_classes(&policy, role.as_deref(), &target, &["connect"]);
        (d, RequestInfo::Tcp { classes: vec!["connect".into()] })
    } else {
        (decide_session(&policy, role.as_deref(), &target), RequestInfo::Session)
    };
    drop(policy);
    if decision.verdict == Verdict::Deny && !enforcer.denied_gates.admit(&caller_key, std::time::Instant::now()) {
        Stats::inc(&enforcer.stats.denied);
        enforcer.stats.decision(&decision, &target.name, target.protocol.name());
        quiet_denial(&stream);
        return;
    }

    info!(session = %id, target = %target.name, protocol = %target.protocol, orig_dst = %orig_dst,
          tgid = caller.tgid, uid = caller.uid, comm = %caller.comm, unit = caller.unit.as_deref().unwrap_or("-"),
          cgroup = caller.cgroup.as_deref().unwrap_or("-"), exe = caller.exe.as_deref().unwrap_or("-"),
          role = role.as_deref().unwrap_or("-"), verdict = %decision.verdict, rule = %decision.rule, "connection");

    enforcer.audit.record(Event::SessionStart {
        session: id,
        caller: caller.clone(),
        target: target.name.clone(),
        protocol: target.protocol.to_string(),
        orig_dst,
        role: role.clone(),
    });
    enforcer.stats.decision(&decision, &target.name, target.protocol.name());
    // Registered before its admission is on disk: a reload while the
    // record is written must see this session too, to end it if need be.
    let live = LiveSession {
        session: id,
        target: target.name.clone(),
        protocol: target.protocol.to_string(),
        orig_dst,
        role: role.clone(),
        tgid: caller.tgid,
        comm: caller.comm.clone(),
        unit: caller.unit.clone(),
        since_ms: crate::audit::now_ms(),
        subject,
        approved: decision.verdict == Verdict::Approve,
    };
    let revoked = enforcer.session_opened(live);
    let decision_event = Event::Decision { session: id, request, decision: DecisionInfo::from(&decision) };
    if decision.verdict == Verdict::Allow {
        Stats::inc(&enforcer.stats.allowed);
        // An opaque stream may change state upstream: its authorisation is
        // on disk before a byte is forwarded.
        if target.protocol == Protocol::Tcp {
            if let Err(e) = enforcer.audit.record_durable(decision_event).await {
                warn!(session = %id, error = %e, "audit write failed; connection refused");
                enforcer.session_closed(id);
                return;
            }
        } else {
            enforcer.audit.record(decision_event);
        }
    } else {
        if decision.verdict == Verdict::Deny {
            Stats::inc(&enforcer.stats.denied);
        }
        enforcer.audit.record(decision_event);
    }

    let session = Session { id, caller, orig_dst, target, role, enforcer: enforcer.clone() };
    // A revocation that came while the admission was written goes first.
    let outcome = tokio::select! {
        biased;
        Ok(why) = revoked => {
            warn!(session = %id, reason = %why, "session revoked by a policy change");
            protocols::Outcome::reason(format!("revoked by policy change: {why}"))
        }
        o = protocols::serve(&session, stream, decision) => o,
    };
    enforcer.session_closed(id);
    info!(session = %id, reason = %outcome.reason, bytes_up = outcome.bytes_up, bytes_down = outcome.bytes_down, "session end");
    enforcer.audit.record(Event::SessionEnd {
        session: id,
        reason: outcome.reason,
        bytes_up: outcome.bytes_up,
        bytes_down: outcome.bytes_down,
    });
}
