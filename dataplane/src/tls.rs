//! Mutual TLS between sidecars, with service identities (SPIFFE IDs).
//!
//! Each sidecar holds a certificate from the mesh CA whose URI SAN is
//! `spiffe://ringmesh/<service>`. The inbound side accepts only clients with
//! such a certificate and learns the caller's service from it; the outbound
//! side presents its own and checks that the peer is the service it meant
//! to reach (an instance of one service cannot answer for another). The
//! files are re-read when they change: new connections use the new
//! certificate, open ones carry on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::log;
use crate::snapshot::lock;

pub const SPIFFE_PREFIX: &str = "spiffe://ringmesh/";
/// Server names the outbound side asks for: `<service>.ringmesh` (a valid DNS
/// name for every DNS-label service), which the verifier maps back to the
/// identity it expects.
const NAME_SUFFIX: &str = ".ringmesh";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The service a certificate names in its `spiffe://ringmesh/<service>` URI SAN.
pub fn service_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError(format!("unreadable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TlsError("the certificate has no subjectAltName".into()))?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(service) = uri.strip_prefix(SPIFFE_PREFIX) {
                if crate::snapshot::validate_service(service).is_ok() {
                    return Ok(service.to_owned());
                }
            }
        }
    }
    Err(TlsError(format!(
        "the certificate has no {SPIFFE_PREFIX}<service> identity"
    )))
}

/// The server name the outbound side asks for when it means to reach `service`.
pub fn server_name(service: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(format!("{service}{NAME_SUFFIX}"))
        .map_err(|_| TlsError(format!("no server name for service {service}")))
}

/// Checks a peer sidecar's certificate: signed by the mesh CA, valid now,
/// and naming the service the connection was made for.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let expected = match server_name {
            ServerName::DnsName(name) => name.as_ref().strip_suffix(NAME_SUFFIX).map(str::to_owned),
            _ => None,
        };
        let presented = service_of(end_entity).map_err(|e| rustls::Error::General(e.0))?;
        match expected {
            Some(expected) if expected == presented => Ok(ServerCertVerified::assertion()),
            expected => Err(rustls::Error::General(format!(
                "the peer's certificate is for service '{presented}', not '{}'",
                expected.unwrap_or_default()
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One loaded identity: both sides' TLS configurations.
pub struct Identity {
    pub service: String,
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
    pub not_after: SystemTime,
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))
}

/// Read `cert.pem`, `key.pem` and `ca.pem` from `dir` (the layout `ringmesh certs issue` writes).
pub fn load(dir: &Path, now: SystemTime) -> Result<Identity, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(dir, "cert.pem")?)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError(format!("bad cert.pem in {}: {e}", dir.display())))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError(format!("no certificate in {}/cert.pem", dir.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&read(dir, "key.pem")?)
        .map_err(|e| TlsError(format!("bad key.pem in {}: {e}", dir.display())))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(dir, "ca.pem")?) {
        let ca = ca.map_err(|e| TlsError(format!("bad ca.pem in {}: {e}", dir.display())))?;
        roots.add(ca).map_err(|e| {
            TlsError(format!(
                "bad CA certificate in {}/ca.pem: {e}",
                dir.display()
            ))
        })?;
    }
    let service = service_of(leaf)?;
    let (not_before, not_after) = validity(leaf)?;
    if now < not_before {
        return Err(TlsError(format!(
            "{}/cert.pem is not valid yet (from {})",
            dir.display(),
            iso(not_before)
        )));
    }
    if now > not_after {
        return Err(TlsError(format!(
            "{}/cert.pem expired at {}",
            dir.display(),
            iso(not_after)
        )));
    }
    let provider = provider();
    let roots = Arc::new(roots);
    let tls = |e: rustls::Error| TlsError(format!("TLS set-up from {}: {e}", dir.display()));
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError(format!("TLS set-up from {}: {e}", dir.display())))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(tls)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier { roots, provider }))
        .with_client_auth_cert(certs, key)
        .map_err(tls)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Identity {
        service,
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
        not_after,
    })
}

fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError(format!("unreadable certificate: {e}")))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let validity = parsed.validity();
    Ok((at(validity.not_before), at(validity.not_after)))
}

fn iso(t: SystemTime) -> String {
    format!("{} UTC", log::utc(t))
}

/// The identity in force, reloaded when its files change.
pub struct Tls {
    dir: PathBuf,
    current: ArcSwap<Identity>,
    /// The files' modification times when last loaded, and the last refusal
    /// (said once, not every second).
    stamp: std::sync::Mutex<(Option<Vec<SystemTime>>, Option<String>)>,
}

impl Tls {
    pub fn load(dir: &Path) -> Result<Tls, TlsError> {
        let identity = load(dir, SystemTime::now())?;
        Ok(Tls {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(identity),
            stamp: std::sync::Mutex::new((stamp(dir), None)),
        })
    }

    pub fn current(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Re-read the files if they changed since they were last loaded. A
    /// certificate that does not load (half written, a key that does not
    /// match, expired, not valid yet) is refused with a log line, the one in
    /// force stays, and the files are tried again on the next call.
    pub fn reload_if_changed(&self) {
        let now_stamp = stamp(&self.dir);
        if lock(&self.stamp).0 == now_stamp {
            return;
        }
        let service = self.current().service.clone();
        let loaded = load(&self.dir, SystemTime::now()).and_then(|identity| {
            if identity.service == service {
                Ok(identity)
            } else {
                Err(TlsError(format!(
                    "the certificate is for service '{}', not '{service}'",
                    identity.service
                )))
            }
        });
        let mut seen = lock(&self.stamp);
        match loaded {
            Ok(identity) => {
                log::info(&format!(
                    "reloaded the mesh certificate from {} ({service})",
                    self.dir.display()
                ));
                self.current.store(Arc::new(identity));
                *seen = (now_stamp, None);
            }
            Err(err) => {
                if seen.1.as_deref() != Some(err.0.as_str()) {
                    log::warning(&format!(
                        "refusing the new mesh certificate: {err}; keeping the one in force"
                    ));
                    seen.1 = Some(err.0);
                }
            }
        }
    }
}

fn stamp(dir: &Path) -> Option<Vec<SystemTime>> {
    ["cert.pem", "key.pem", "ca.pem"]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_carry_the_expected_service() {
        let name = server_name("echo").unwrap();
        assert_eq!(
            name,
            ServerName::DnsName("echo.ringmesh".try_into().unwrap())
        );
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = load(Path::new("/nonexistent/ringmesh"), SystemTime::now())
            .err()
            .unwrap();
        assert!(
            err.0.contains("cannot read /nonexistent/ringmesh/cert.pem"),
            "{}",
            err.0
        );
    }
}
