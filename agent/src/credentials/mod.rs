//! Secret sources for upstream credentials: a file readable by portcullis,
//! portcullis' own environment, or a systemd credential. Never the guarded
//! process. Values are held in `Secret`, whose Debug and Display print
//! nothing, so a secret cannot reach a log line or error by accident.
use std::{fmt, path::PathBuf};

use crate::policy::SecretRef;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("secret file {0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("environment variable {0} is not set in portcullis' environment")]
    Env(String),
    #[error("systemd credential {0} not found (is CREDENTIALS_DIRECTORY set by LoadCredential=?)")]
    Credential(String),
}

/// A secret value. Deliberately not Debug/Display-transparent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The value, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Reads a secret now (on each new session, so rotation needs no restart).
pub fn resolve(r: &SecretRef) -> Result<Secret, CredentialError> {
    match r {
        SecretRef::File(p) => std::fs::read_to_string(p)
            .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|e| CredentialError::File(p.clone(), e)),
        SecretRef::Env(name) => std::env::var(name).map(Secret).map_err(|_| CredentialError::Env(name.clone())),
        SecretRef::Credential(name) => {
            let dir =
                std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| CredentialError::Credential(name.clone()))?;
            let p = PathBuf::from(dir).join(name);
            std::fs::read_to_string(&p)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|_| CredentialError::Credential(name.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_secrets_lose_the_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(resolve(&SecretRef::File(p)).unwrap().expose(), "s3cret");
        let err = resolve(&SecretRef::Env("PORTCULLIS_TEST_SURELY_UNSET".into())).unwrap_err();
        assert!(err.to_string().contains("PORTCULLIS_TEST_SURELY_UNSET"));
    }
}
