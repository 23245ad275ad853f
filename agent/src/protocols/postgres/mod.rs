//! PostgreSQL: portcullis speaks the wire protocol on both sides.
//!
//! The caller's start-up is accepted with any user and password (who calls
//! is the kernel's word, not the caller's); the upstream session is opened
//! with the target's credentials; then every statement is classified and
//! decided under the policy in force at that moment, recorded, and either
//! forwarded or answered with SQLSTATE 42501.
//!
//! - `wire`: framing and the messages portcullis writes itself;
//! - `upstream`: start-up and authentication towards the server;
//! - `classify`: SQL to classes, tables and functions;
//! - `proxy`: the request loop (simple and extended protocol, COPY,
//!   FunctionCall) and the response side;
//! - `rows`: result shapes and the single path of every DataRow;
//! - `cancel`: CancelRequest mapping.
pub mod cancel;
pub mod classify;
pub mod mask;
pub mod proxy;
pub mod rows;
pub mod stream;
pub mod upstream;
pub mod wire;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::{info, warn};

use self::{
    stream::Stream,
    wire::{FrameReader, Severity},
};
use super::{connect_upstream, Outcome, Session};
use crate::{
    credentials,
    enforcer::Stats,
    policy::{Decision, Verdict},
};

/// Startup parameters passed on to the upstream (matched without regard to
/// case, as PostgreSQL matches setting names). Everything else is dropped:
/// `replication` and `options` above all, and anything that would change
/// name resolution, privileges or how SQL text is read.
const KEPT_PARAMS: &[&str] = &[
    "application_name",
    "datestyle",
    "intervalstyle",
    "timezone",
    "extra_float_digits",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "bytea_output",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
];

/// What the caller asked for at start-up.
struct Startup {
    params: Vec<(String, String)>,
    /// Minor protocol version asked for (answered with 3.0).
    minor: i32,
    /// Protocol options (`_pq_.*`) portcullis does not take up.
    unsupported_options: Vec<String>,
}

pub async fn serve(session: &Session, client: TcpStream, admission: Decision) -> Outcome {
    let _ = client.set_nodelay(true);
    let (mut reader, startup) = match negotiate(session, FrameReader::new(Stream::Plain(client)), &admission).await {
        Ok(x) => x,
        Err(outcome) => return outcome,
    };
    if admission.verdict != Verdict::Allow {
        let msg = denial_message(&admission);
        fatal(&mut reader, "42501", &msg).await;
        return Outcome::reason(format!("denied: {}", admission.reason));
    }

    let target = &session.target;
    let Some(creds) = target.credentials.as_ref().filter(|c| c.user.is_some()) else {
        fatal(&mut reader, "28000", &format!("portcullis: target {} has no credentials.user configured", target.name))
            .await;
        return Outcome::reason("target has no credentials.user");
    };
    let user = creds.user.clone().unwrap_or_default();
    let password = match creds.password.as_ref().map(credentials::resolve).transpose() {
        Ok(p) => p,
        Err(e) => {
            warn!(session = %session.id, target = %target.name, error = %e, "cannot read the target's password");
            fatal(
                &mut reader,
                "28000",
                &format!("portcullis: the credentials of target {} are unavailable", target.name),
            )
            .await;
            return Outcome::reason(format!("credentials unavailable: {e}"));
        }
    };
    let up = match connect_upstream(session).await {
        Ok(u) => u,
        Err(e) => {
            Stats::inc(&session.enforcer.stats.upstream_failures);
            warn!(session = %session.id, target = %target.name, error = %e, "upstream connect failed");
            fatal(&mut reader, "08006", &format!("portcullis: cannot reach the upstream of target {}", target.name))
                .await;
            return Outcome::reason(format!("upstream connect failed: {e}"));
        }
    };
    let upstream_addr = up.peer_addr().ok();
    let (up, tls_verified) = if target.tls.upstream {
        match upstream_tls(session, up).await {
            Ok(s) => (s, true),
            Err(e) => {
                Stats::inc(&session.enforcer.stats.upstream_failures);
                warn!(session = %session.id, target = %target.name, error = %e, "upstream TLS failed");
                fatal(
                    &mut reader,
                    "08006",
                    &format!("portcullis: no verified TLS to the upstream of target {}", target.name),
                )
                .await;
                return Outcome::reason(format!("upstream TLS failed: {e}"));
            }
        }
    } else {
        (Stream::Plain(up), false)
    };
    let mut params = vec![("user".to_string(), user.clone())];
    let database = startup.params.iter().find(|(k, _)| k == "database").map(|(_, v)| v.clone());
    params.push(("database".into(), database.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone())));
    // UTF-8 only: SQL text is read as UTF-8 here, and must be read the same
    // way by the server.
    params.push(("client_encoding".into(), "UTF8".into()));
    for (k, v) in &startup.params {
        if KEPT_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(k)) {
            params.push((k.clone(), v.clone()));
        }
    }
    let mut up_reader = FrameReader::new(up);
    let started = match upstream::start(&mut up_reader, &params, &user, password.as_ref(), tls_verified).await {
        Ok(s) => s,
        Err(e) => {
            Stats::inc(&session.enforcer.stats.upstream_failures);
            warn!(session = %session.id, target = %target.name, error = %e, "upstream authentication failed");
            fatal(
                &mut reader,
                e.sqlstate(),
                &format!("portcullis: cannot open a session on the upstream of target {}", target.name),
            )
            .await;
            return Outcome::reason(format!("upstream start-up failed: {e}"));
        }
    };
    let masking = match masking(session, &mut up_reader, password.as_ref()).await {
        Ok(m) => m,
        Err(e) => {
            warn!(session = %session.id, target = %target.name, error = %e, "cannot set up masking; closing the session");
            fatal(&mut reader, "58000", &format!("portcullis: masking for target {} is unavailable", target.name))
                .await;
            return Outcome::reason(format!("masking unavailable: {e}"));
        }
    };
    drop(password);

    // The caller's side of start-up: success, the server's parameters, and
    // a cancel key of portcullis' own.
    let registration = match (started.key, upstream_addr) {
        (Some((pid, key)), Some(addr)) => {
            Some(cancel::register(&target.name, addr, session.enforcer.settings.mark, pid, key))
        }
        _ => None,
    };
    let mut out = BytesMut::new();
    wire::auth_ok(&mut out);
    if startup.minor > 0 || !startup.unsupported_options.is_empty() {
        negotiate_protocol_version(&mut out, &startup.unsupported_options);
    }
    for p in &started.parameters {
        out.extend_from_slice(p);
    }
    if let Some(r) = &registration {
        wire::backend_key_data(&mut out, r.pid, r.key);
    }
    wire::ready_for_query(&mut out, started.status);
    if let Err(e) = wire::send(reader.get_mut(), &out).await {
        return Outcome::reason(format!("client went away during start-up: {e}"));
    }
    info!(session = %session.id, target = %target.name, upstream_user = %user, "postgres session open");
    let outcome = proxy::run(session, reader, up_reader, masking).await;
    drop(registration);
    outcome
}

/// The session's masking: the role's rule for the target (its mask plan;
/// without a rule, the injected credentials only), with column rules
/// resolved on the upstream session just opened.
async fn masking(
    session: &Session,
    up: &mut FrameReader<Stream>,
    password: Option<&credentials::Secret>,
) -> Result<proxy::Masking, String> {
    use std::sync::Arc;

    use crate::masking::{Plan, SessionMasker};
    let policy = session.enforcer.policy();
    let plan = crate::policy::decide::rule_of(&policy, session.role.as_deref(), &session.target)
        .map(|(_, rule)| rule.mask_plan.clone())
        .unwrap_or_else(|_| Arc::new(Plan::credentials_only()));
    let injected: Vec<&credentials::Secret> = password.into_iter().collect();
    let masker = SessionMasker::start(plan.clone(), &policy.masking, &injected).map_err(|e| e.to_string())?;
    let rules = plan.column_rules();
    let resolved = mask::resolve(up, rules).await?;
    let rows = (masker.scans_text() || !rules.is_empty()).then(|| mask::RowMasker::new(masker, resolved.columns));
    let source = proxy::mask_source(&policy, session);
    Ok(proxy::Masking { columns: mask::Columns::new(rules, resolved.relations), rows, source, policy })
}

/// Answers SSLRequest (with TLS from the local CA when the target offers it
/// to callers, else `N`) and GSSENCRequest (`N`), passes a CancelRequest on,
/// and returns the startup parameters. `Err` carries how the session ended.
async fn negotiate(
    session: &Session,
    mut reader: FrameReader<Stream>,
    admission: &Decision,
) -> Result<(FrameReader<Stream>, Startup), Outcome> {
    loop {
        let packet = match reader.startup_packet().await {
            Ok(Some(p)) => p,
            Ok(None) => return Err(Outcome::reason("closed during start-up")),
            Err(e) => return Err(Outcome::reason(format!("bad start-up packet: {e}"))),
        };
        let mut body = &packet[..];
        let code = wire::i32_at(&mut body).map_err(|e| Outcome::reason(e.to_string()))?;
        match code {
            wire::SSL_REQUEST | wire::GSSENC_REQUEST => {
                if reader.has_buffered() {
                    // Bytes sent before the answer cannot be trusted as
                    // either plaintext or TLS.
                    return Err(Outcome::reason("data sent before the SSLRequest was answered"));
                }
                let tls = code == wire::SSL_REQUEST
                    && session.target.tls.client
                    && matches!(reader.get_mut(), Stream::Plain(_));
                if !tls {
                    wire::send(reader.get_mut(), b"N").await.map_err(|e| Outcome::reason(e.to_string()))?;
                    continue;
                }
                reader = accept_tls(session, reader).await.map_err(Outcome::reason)?;
            }
            wire::CANCEL_REQUEST => {
                let pid = wire::i32_at(&mut body).map_err(|e| Outcome::reason(e.to_string()))?;
                let key = wire::i32_at(&mut body).map_err(|e| Outcome::reason(e.to_string()))?;
                if admission.verdict != Verdict::Allow {
                    return Err(Outcome::reason("cancel request denied"));
                }
                let sent = cancel::cancel(&session.target.name, pid, key).await;
                return Err(Outcome::reason(if sent {
                    "cancel request passed on"
                } else {
                    "cancel request with an unknown key ignored"
                }));
            }
            v if v >> 16 == 3 => {
                let all = wire::startup_params(body).map_err(|e| Outcome::reason(e.to_string()))?;
                let unsupported_options =
                    all.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
                return Ok((reader, Startup { params: all, minor: v & 0xffff, unsupported_options }));
            }
            other => {
                fatal(
                    &mut reader,
                    "0A000",
                    &format!("unsupported frontend protocol {}.{}", other >> 16, other & 0xffff),
                )
                .await;
                return Err(Outcome::reason("unsupported protocol version"));
            }
        }
    }
}

/// The name the caller's certificate is made for: the target's first host
/// name, else the address the caller dialled.
fn client_cert_name(session: &Session) -> String {
    session.target.hosts.first().cloned().unwrap_or_else(|| session.orig_dst.0.ip().to_canonical().to_string())
}

/// Answers `S` and runs the TLS handshake with a certificate from the local
/// CA.
async fn accept_tls(session: &Session, reader: FrameReader<Stream>) -> Result<FrameReader<Stream>, String> {
    let (stream, _) = reader.into_parts();
    let Stream::Plain(mut tcp) = stream else { return Err("TLS requested twice".into()) };
    let config = session
        .enforcer
        .ca
        .server_config(&client_cert_name(session), &[b"postgresql"])
        .map_err(|e| format!("no certificate for the caller: {e}"))?;
    wire::send(&mut tcp, b"S").await.map_err(|e| e.to_string())?;
    let tls =
        tokio_rustls::TlsAcceptor::from(config).accept(tcp).await.map_err(|e| format!("TLS with the caller: {e}"))?;
    Ok(FrameReader::new(Stream::Server(Box::new(tls))))
}

/// SSLRequest to the upstream and a TLS handshake that verifies its
/// certificate (system roots plus the target's `tls.ca`) for the target's
/// `tls.server_name` (else its first host name, else the upstream host).
async fn upstream_tls(session: &Session, mut tcp: TcpStream) -> Result<Stream, String> {
    use bytes::BufMut;
    use tokio::io::AsyncReadExt;
    let target = &session.target;
    let mut req = BytesMut::new();
    req.put_i32(8);
    req.put_i32(wire::SSL_REQUEST);
    wire::send(&mut tcp, &req).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    if answer[0] != b'S' {
        return Err("the upstream does not offer TLS".into());
    }
    let name =
        target.tls.server_name.clone().or_else(|| target.hosts.first().cloned()).unwrap_or_else(|| {
            match &target.upstream {
                crate::policy::Upstream::Host { host, .. } => host.clone(),
                crate::policy::Upstream::Addr(a) => a.ip().to_canonical().to_string(),
                crate::policy::Upstream::Original => session.orig_dst.0.ip().to_canonical().to_string(),
            }
        });
    let server_name =
        rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| format!("server name {name}: {e}"))?;
    let config = crate::tls::client_config(target.tls.ca.as_deref(), &[b"postgresql"]).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS with the upstream ({name}): {e}"))?;
    Ok(Stream::Client(Box::new(tls)))
}

/// NegotiateProtocolVersion: 3.0, and the options not taken up.
fn negotiate_protocol_version(out: &mut BytesMut, options: &[String]) {
    use bytes::BufMut;
    let at = out.len();
    out.put_u8(b'v');
    out.put_i32(0);
    out.put_i32(0);
    out.put_i32(options.len() as i32);
    for o in options {
        out.extend_from_slice(o.as_bytes());
        out.put_u8(0);
    }
    let len = (out.len() - at - 1) as i32;
    out[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
}

async fn fatal(reader: &mut FrameReader<Stream>, code: &str, message: &str) {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, Severity::Fatal, code, message, None);
    let _ = wire::send(reader.get_mut(), &out).await;
}

/// The message a denied caller reads: it names the rule.
pub fn denial_message(d: &Decision) -> String {
    format!("permission denied by portcullis ({}): {}", d.rule, d.reason)
}
