//! Reading PEM files, and what a certificate says about itself.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::TlsError;

/// A certificate that expires within this is a warning (and shows in the expiry metric).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a person needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertInfo {
    /// The subject, e.g. `CN=leasehold-peer`.
    pub subject: String,
    /// Who signed it.
    pub issuer: String,
    /// DNS and URI subject alternative names, IP addresses, and the common name (for
    /// people: what the certificate says it is).
    pub names: Vec<String>,
    /// The DNS subject alternative names only: what TLS name checks use, and so what an
    /// identity check must use too.
    pub dns_names: Vec<String>,
    pub not_after: SystemTime,
}

impl CertInfo {
    /// Parses a DER certificate; `None` when it cannot be parsed.
    pub fn parse(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut names = Vec::new();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => {
                        names.push((*n).to_owned());
                        dns_names.push((*n).to_owned());
                    }
                    GeneralName::URI(n) => names.push((*n).to_owned()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => names.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string(),
                        ),
                        16 => names.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                if !names.iter().any(|n| n == cn) {
                    names.push(cn.to_owned());
                }
            }
        }
        let not_after = cert.validity().not_after.timestamp();
        Some(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            names,
            dns_names,
            not_after: UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64),
        })
    }

    /// Time left until expiry (`None` when already expired).
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.not_after.duration_since(now).ok()
    }

    /// Seconds until expiry, negative once expired.
    pub fn seconds_left(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }

    /// The first DNS name: the identity a member registers (peers check the
    /// certificate for it the way TLS checks a server's name).
    pub fn identity(&self) -> Option<&str> {
        self.dns_names.first().map(String::as_str)
    }

    /// Whether `name` is one of the DNS names (case-insensitive, as DNS is).
    pub fn has_dns_name(&self, name: &str) -> bool {
        !name.is_empty() && self.dns_names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self
            .not_after
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        write!(
            f,
            "{:?} (issuer {:?}, names {:?}, not after {} UTC)",
            self.subject,
            self.issuer,
            self.names,
            humantime_utc(secs)
        )
    }
}

/// `2026-11-26 10:00:00` for seconds since the epoch (UTC, civil calendar).
fn humantime_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file (a chain: leaf first).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_owned(),
    })
}

pub(crate) fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            reason: format!("not a CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The leaf of a chain: refused when expired, a warning when it expires within
/// [`EXPIRY_WARNING`].
pub(crate) fn check_leaf(
    path: &Path,
    chain: &[CertificateDer<'static>],
) -> Result<CertInfo, TlsError> {
    let info = CertInfo::parse(&chain[0]).ok_or_else(|| TlsError::Invalid {
        path: path.to_owned(),
        reason: "the certificate cannot be parsed".into(),
    })?;
    match info.remaining(SystemTime::now()) {
        None => {
            return Err(TlsError::Expired {
                path: path.to_owned(),
                cert: Box::new(info),
            })
        }
        Some(left) if left < EXPIRY_WARNING => tracing::warn!(
            path = %path.display(),
            certificate = %info,
            days_left = left.as_secs() / 86_400,
            "certificate expires soon"
        ),
        Some(_) => {}
    }
    Ok(info)
}

fn describe(der: &CertificateDer<'_>) -> String {
    CertInfo::parse(der).map_or_else(|| "(unparseable certificate)".into(), |c| c.to_string())
}

/// Verifies client certificates with webpki, and says which certificate it refused and why.
#[derive(Debug)]
pub(crate) struct LoggedClientVerifier {
    pub plane: &'static str,
    pub inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for LoggedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                tracing::warn!(
                    plane = self.plane,
                    certificate = %describe(end_entity),
                    error = %e,
                    "client certificate refused"
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies server certificates with webpki, and says which certificate it refused and why.
#[derive(Debug)]
pub(crate) struct LoggedServerVerifier {
    pub target: &'static str,
    pub inner: Arc<dyn ServerCertVerifier>,
    /// The name the certificate must carry instead of the host dialled.
    pub name_override: Option<ServerName<'static>>,
}

impl ServerCertVerifier for LoggedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let server_name = self.name_override.as_ref().unwrap_or(server_name);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                tracing::warn!(
                    target_kind = self.target,
                    server_name = ?server_name,
                    certificate = %describe(end_entity),
                    error = %e,
                    "server certificate refused"
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(humantime_utc(0), "1970-01-01 00:00:00");
        assert_eq!(humantime_utc(1_795_651_200), "2026-11-26 00:00:00");
        assert_eq!(humantime_utc(951_782_400 + 3661), "2000-02-29 01:01:01");
    }

    #[test]
    fn a_certificate_names_its_sans_then_its_common_name() {
        let mut params = rcgen::CertificateParams::new(vec!["peer.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "leasehold-peer");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(std::net::IpAddr::from([
                127, 0, 0, 1,
            ])));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = CertInfo::parse(cert.der()).unwrap();
        assert_eq!(
            info.names,
            vec!["peer.example", "127.0.0.1", "leasehold-peer"],
            "{info}"
        );
        assert_eq!(info.identity(), Some("peer.example"));
        assert_eq!(
            info.dns_names,
            vec!["peer.example"],
            "the CN is not a DNS name"
        );
        assert!(info.has_dns_name("PEER.example") && !info.has_dns_name("leasehold-peer"));
        assert!(info.subject.contains("leasehold-peer"));
        assert!(info.remaining(SystemTime::now()).is_some());
    }
}
