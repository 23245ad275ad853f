//! TLS on both sides of the enforcer.
//!
//! Toward the caller: a local CA (created on first use under the state
//! directory, key mode 0600) mints a certificate per host name or IP, each
//! with a fresh key (the CA key is never served). Callers trust the CA via
//! `portcullis ca export` (host trust store, SSL_CERT_FILE, PGSSLROOTCERT...).
//!
//! Toward upstreams: rustls with real verification against the system roots
//! plus an optional extra CA per target.
use std::{
    collections::HashMap,
    fs,
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    crypto::ring::default_provider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
    ClientConfig, RootCertStore, ServerConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("`{0}` is not a valid certificate name")]
    Name(String),
}

/// How long minted certificates live; re-minted a week before they expire.
const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The local certificate authority.
pub struct LocalCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, (SystemTime, Arc<CertifiedKey>)>>,
}

impl LocalCa {
    /// Paths of the CA certificate and key in a state directory.
    pub fn paths(state_dir: &Path) -> (PathBuf, PathBuf) {
        let dir = state_dir.join("ca");
        (dir.join("ca.pem"), dir.join("ca.key"))
    }

    /// Loads the CA from `state_dir/ca/`, creating it on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<LocalCa, TlsError> {
        let (cert_path, key_path) = Self::paths(state_dir);
        if cert_path.exists() && key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        let dir = cert_path.parent().expect("ca dir");
        fs::create_dir_all(dir).map_err(|source| TlsError::Io { what: "cannot create", path: dir.into(), source })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| TlsError::Io {
            what: "cannot chmod",
            path: dir.into(),
            source,
        })?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("portcullis local CA ({})", hostname()));
        dn.push(DnType::OrganizationName, "portcullis");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        fs::write(&cert_path, cert.pem()).map_err(|source| TlsError::Io {
            what: "cannot write",
            path: cert_path.clone(),
            source,
        })?;
        Self::load(&cert_path, &key_path)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<LocalCa, TlsError> {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| TlsError::Io { what: "cannot read", path: p.into(), source })
        };
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| TlsError::Pem { path: cert_path.into(), reason: "no certificate".into() })?
            .map_err(|e| TlsError::Pem { path: cert_path.into(), reason: e.to_string() })?;
        Ok(LocalCa { cert_pem, cert_der, issuer, leaves: Mutex::new(HashMap::new()) })
    }

    /// The CA certificate (PEM), for trust stores.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A certificate and fresh key for `name` (a DNS name or an IP address),
    /// cached until shortly before it expires.
    pub fn certified_key(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let now = SystemTime::now();
        if let Some((expires, ck)) = self.leaves.lock().expect("leaf cache").get(&name) {
            if now + LEAF_RENEW_BEFORE < *expires {
                return Ok(ck.clone());
            }
        }
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                let valid = !name.is_empty()
                    && name.len() <= 253
                    && name
                        .split('.')
                        .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
                if !valid {
                    return Err(TlsError::Name(name));
                }
                SanType::DnsName(name.clone().try_into().map_err(|_| TlsError::Name(name.clone()))?)
            }
        };
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.clone());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let t = time::OffsetDateTime::now_utc();
        params.not_before = t - time::Duration::hours(1);
        params.not_after = t + time::Duration::try_from(LEAF_LIFETIME).expect("lifetime");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let der_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = default_provider().key_provider.load_private_key(der_key)?;
        let ck = Arc::new(CertifiedKey::new(vec![cert.der().clone(), self.cert_der.clone()], signing));
        self.leaves.lock().expect("leaf cache").insert(name, (now + LEAF_LIFETIME, ck.clone()));
        Ok(ck)
    }

    /// A server configuration presenting a certificate for `name`, offering
    /// the given ALPN protocols.
    pub fn server_config(&self, name: &str, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let ck = self.certified_key(name)?;
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedCert(ck)));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// Presents one certificate whatever the client asks for (the caller of
/// `server_config` chose it, e.g. from the SNI).
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let err = |source| TlsError::Io { what: "cannot write", path: path.into(), source };
    let mut f = fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// The system's trusted roots, loaded once.
fn system_roots() -> &'static Vec<CertificateDer<'static>> {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// A client configuration that verifies upstream certificates against the
/// system roots plus `extra_ca` (a PEM file), offering `alpn`.
pub fn client_config(extra_ca: Option<&Path>, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(path) = extra_ca {
        let pem =
            fs::read(path).map_err(|source| TlsError::Io { what: "cannot read CA", path: path.into(), source })?;
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| TlsError::Pem { path: path.into(), reason: e.to_string() })?;
            roots.add(cert)?;
            found += 1;
        }
        if found == 0 {
            return Err(TlsError::Pem { path: path.into(), reason: "no certificate in file".into() });
        }
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn ca_is_created_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let (cert, key) = LocalCa::paths(dir.path());
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let again = LocalCa::load_or_create(dir.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem(), "the CA is reused, not re-created");
        assert!(cert.exists());
    }

    #[test]
    fn leaves_get_fresh_keys_and_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let a = ca.certified_key("api.example.test").unwrap();
        let b = ca.certified_key("API.example.test.").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "same name, cached");
        let c = ca.certified_key("127.1.0.1").unwrap();
        assert_ne!(a.cert[0], c.cert[0]);
        assert!(ca.certified_key("bad name!").is_err());
    }

    /// A real handshake: a client trusting only the local CA verifies a
    /// minted certificate for a DNS name and for an IP address.
    #[tokio::test]
    async fn minted_certificates_verify_against_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let ca_file = LocalCa::paths(dir.path()).0;
        for name in ["api.example.test", "127.1.0.1"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server_cfg = ca.server_config(name, &[b"http/1.1"]).unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                let mut tls = tokio_rustls::TlsAcceptor::from(server_cfg).accept(s).await.unwrap();
                tls.write_all(b"hi").await.unwrap();
                tls.shutdown().await.unwrap();
            });
            let client_cfg = client_config(Some(&ca_file), &[b"http/1.1"]).unwrap();
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client_cfg).connect(server_name, s).await.unwrap();
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.unwrap();
            assert_eq!(buf, b"hi");
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_client_without_the_ca_refuses_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_cfg = ca.server_config("api.example.test", &[]).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let _ = tokio_rustls::TlsAcceptor::from(server_cfg).accept(s).await;
        });
        let client_cfg = client_config(None, &[]).unwrap();
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("api.example.test").unwrap();
        assert!(tokio_rustls::TlsConnector::from(client_cfg).connect(name, s).await.is_err());
    }
}
