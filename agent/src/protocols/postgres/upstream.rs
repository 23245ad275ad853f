//! The upstream side: start a session with the target's credentials.
//!
//! SCRAM-SHA-256 (the server's final signature is verified, and an
//! AuthenticationOk before that is refused), md5, and cleartext only over a
//! verified TLS connection. The caller never sees the password or anything
//! derived from it: errors name what failed, never with what.
use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::{
    md5_hash,
    sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256},
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::wire::{self, cstr, error_field, i32_at, FrameReader, WireError};
use crate::credentials::Secret;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the upstream closed the connection during start-up")]
    Closed,
    #[error("the upstream asks for a password but target has none configured")]
    NoPassword,
    #[error("refusing to send a cleartext password over a connection without verified TLS")]
    CleartextWithoutTls,
    #[error("the upstream offers no SASL mechanism portcullis speaks (SCRAM-SHA-256)")]
    NoMechanism,
    #[error("SCRAM: {0}")]
    Scram(String),
    #[error("the upstream reported success before proving it knows the password (SCRAM server signature missing)")]
    UnverifiedOk,
    #[error("the upstream asks for authentication method {0}, which portcullis does not support")]
    Unsupported(i32),
    #[error("the upstream refused the session: {code} {message}")]
    Refused { code: String, message: String },
    #[error("unexpected message {0:?} from the upstream during start-up")]
    Unexpected(char),
}

impl AuthError {
    /// SQLSTATE for the caller.
    pub fn sqlstate(&self) -> &str {
        match self {
            AuthError::Refused { code, .. } => code,
            _ => "08006",
        }
    }
}

/// What the upstream said during start-up, for the caller.
pub struct Started {
    /// ParameterStatus frames, as received.
    pub parameters: Vec<Bytes>,
    /// The upstream's BackendKeyData (process id, secret key).
    pub key: Option<(i32, i32)>,
    /// Transaction status of the first ReadyForQuery.
    pub status: u8,
}

/// Sends the startup message and authenticates. `tls_verified` says the
/// stream is TLS with a verified server certificate.
pub async fn start<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<S>,
    params: &[(String, String)],
    user: &str,
    password: Option<&Secret>,
    tls_verified: bool,
) -> Result<Started, AuthError> {
    let mut out = BytesMut::new();
    wire::startup(&mut out, params);
    wire::send(reader.get_mut(), &out).await.map_err(WireError::from)?;

    let mut scram: Option<ScramSha256> = None;
    let mut scram_verified = false;
    let mut parameters = Vec::new();
    let mut key = None;
    loop {
        let frame = reader.next().await?.ok_or(AuthError::Closed)?;
        let mut body = frame.body();
        match frame.tag {
            b'R' => {
                let code = i32_at(&mut body)?;
                let mut out = BytesMut::new();
                match code {
                    0 => {
                        if scram.is_some() && !scram_verified {
                            return Err(AuthError::UnverifiedOk);
                        }
                        continue;
                    }
                    3 => {
                        if !tls_verified {
                            return Err(AuthError::CleartextWithoutTls);
                        }
                        let pw = password.ok_or(AuthError::NoPassword)?;
                        postgres_protocol::message::frontend::password_message(pw.expose().as_bytes(), &mut out)
                            .map_err(WireError::from)?;
                    }
                    5 => {
                        let pw = password.ok_or(AuthError::NoPassword)?;
                        if body.len() < 4 {
                            return Err(WireError::Malformed("md5 salt").into());
                        }
                        let salt = [body[0], body[1], body[2], body[3]];
                        let hash = md5_hash(user.as_bytes(), pw.expose().as_bytes(), salt);
                        postgres_protocol::message::frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(WireError::from)?;
                    }
                    10 => {
                        let pw = password.ok_or(AuthError::NoPassword)?;
                        let mut offered = false;
                        loop {
                            let m = cstr(&mut body)?;
                            if m.is_empty() {
                                break;
                            }
                            offered |= m == SCRAM_SHA_256.as_bytes();
                        }
                        if !offered {
                            return Err(AuthError::NoMechanism);
                        }
                        // Channel binding needs the server certificate's hash;
                        // without it SCRAM still proves both sides know the
                        // password, and TLS (when on) is verified separately.
                        let s = ScramSha256::new(pw.expose().as_bytes(), ChannelBinding::unsupported());
                        postgres_protocol::message::frontend::sasl_initial_response(
                            SCRAM_SHA_256,
                            s.message(),
                            &mut out,
                        )
                        .map_err(WireError::from)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or(AuthError::Scram("continue without a start".into()))?;
                        s.update(body).map_err(|e| AuthError::Scram(e.to_string()))?;
                        postgres_protocol::message::frontend::sasl_response(s.message(), &mut out)
                            .map_err(WireError::from)?;
                    }
                    12 => {
                        let s = scram.as_mut().ok_or(AuthError::Scram("final without a start".into()))?;
                        // Verifies the server signature.
                        s.finish(body).map_err(|e| AuthError::Scram(e.to_string()))?;
                        scram_verified = true;
                        continue;
                    }
                    other => return Err(AuthError::Unsupported(other)),
                }
                wire::send(reader.get_mut(), &out).await.map_err(WireError::from)?;
            }
            b'S' => parameters.push(frame.raw.clone()),
            b'K' => {
                let pid = i32_at(&mut body)?;
                let k = i32_at(&mut body)?;
                key = Some((pid, k));
            }
            b'Z' => {
                if scram.is_some() && !scram_verified {
                    return Err(AuthError::UnverifiedOk);
                }
                let status = body.first().copied().unwrap_or(b'I');
                return Ok(Started { parameters, key, status });
            }
            b'E' => {
                let code = String::from_utf8_lossy(error_field(body, b'C').unwrap_or(b"08006")).into_owned();
                let message = String::from_utf8_lossy(error_field(body, b'M').unwrap_or(b"")).into_owned();
                return Err(AuthError::Refused { code, message });
            }
            // Notices and protocol-version negotiation: nothing to do.
            b'N' | b'v' => {}
            other => return Err(AuthError::Unexpected(other as char)),
        }
    }
}
