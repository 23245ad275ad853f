//! Opaque TCP: allow, deny or hold the connection, then relay bytes both
//! ways, passing each side's half-close on to the other.
use tokio::net::TcpStream;
use tracing::warn;

use super::{connect_upstream, Outcome, Session};
use crate::{
    approvals::HoldRequest,
    audit::{DecisionInfo, Event, RequestInfo},
    enforcer::Stats,
    policy::{Decision, Verdict},
};

pub async fn serve(session: &Session, mut client: TcpStream, admission: Decision) -> Outcome {
    match admission.verdict {
        Verdict::Allow => {}
        Verdict::Deny => {
            // No protocol to explain in: the caller sees its connection closed.
            return Outcome::reason(format!("denied: {}", admission.reason));
        }
        Verdict::Approve => {
            if let Err(why) = hold(session, &client, &admission).await {
                return Outcome::reason(why);
            }
        }
    }
    let mut upstream = match connect_upstream(session).await {
        Ok(u) => u,
        Err(e) => {
            Stats::inc(&session.enforcer.stats.upstream_failures);
            warn!(session = %session.id, target = %session.target.name, error = %e, "upstream connect failed");
            return Outcome::reason(format!("upstream connect failed: {e}"));
        }
    };
    let _ = client.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            Stats::add(&session.enforcer.stats.bytes_up, up);
            Stats::add(&session.enforcer.stats.bytes_down, down);
            Outcome { reason: "closed".into(), bytes_up: up, bytes_down: down }
        }
        Err(e) => Outcome::reason(format!("relay error: {e}")),
    }
}

/// Holds the connection (nothing is sent upstream) until a human answers.
/// The approved decision is on disk before the first byte is relayed.
async fn hold(session: &Session, client: &TcpStream, admission: &Decision) -> Result<(), String> {
    let enforcer = &session.enforcer;
    let ticket = enforcer.approvals.submit(HoldRequest {
        session: session.id,
        caller: session.caller.clone(),
        role: session.role.clone(),
        target: session.target.name.clone(),
        protocol: "tcp".into(),
        request: format!("connect to {} (target {})", session.orig_dst, session.target.name),
        shape: format!("connect {}", session.target.name),
        rule: admission.rule.clone(),
        timeout: admission.approval_timeout,
    });
    let outcome = enforcer.approvals.wait(ticket, caller_gone(client)).await;
    let approved = outcome.approved();
    let decision = Decision {
        verdict: if approved { Verdict::Allow } else { Verdict::Deny },
        reason: format!("{}: {}", admission.reason, outcome.describe()),
        ..admission.clone()
    };
    let event = Event::Decision {
        session: session.id,
        request: RequestInfo::Tcp { classes: vec!["connect".into()] },
        decision: DecisionInfo::from(&decision),
    };
    if approved {
        Stats::inc(&enforcer.stats.allowed);
        enforcer.audit.record_durable(event).await.map_err(|e| format!("audit write failed: {e}"))?;
        Ok(())
    } else {
        Stats::inc(&enforcer.stats.denied);
        enforcer.audit.record(event);
        Err(format!("denied: {}", outcome.describe()))
    }
}

/// Resolves when the caller closes its side of the connection (FIN or
/// reset; seen through EPOLLRDHUP even while data it sent is still queued
/// for the upstream). A caller that half-closes while held counts as gone.
pub async fn caller_gone(client: &TcpStream) {
    loop {
        match client.ready(tokio::io::Interest::READABLE).await {
            Ok(r) if r.is_read_closed() || r.is_error() => return,
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            Err(_) => return,
        }
    }
}
