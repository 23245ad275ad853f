//! Opaque TCP: allow or deny the connection, then relay bytes both ways,
//! passing each side's half-close on to the other.
use tokio::net::TcpStream;
use tracing::warn;

use super::{connect_upstream, Outcome, Session};
use crate::{
    enforcer::Stats,
    policy::{Decision, Verdict},
};

pub async fn serve(session: &Session, mut client: TcpStream, admission: Decision) -> Outcome {
    if admission.verdict != Verdict::Allow {
        // No protocol to explain in: the caller sees its connection closed.
        return Outcome::reason(format!("denied: {}", admission.reason));
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
