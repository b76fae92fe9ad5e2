//! TLS for every plane, with rustls (no OpenSSL at run time).
//!
//! - [`Reloading`] holds a rustls config built from PEM files and rebuilds it when their
//!   contents change ([`watch`] polls them), so certificates rotated by cert-manager are
//!   used by the next connection without a restart; a rebuild that fails (a key written
//!   before its certificate) keeps the previous config and is retried.
//! - [`incoming`] accepts TCP connections for a server plane, bounded in number, and runs
//!   each TLS handshake in its own task (a slow client holds no one else up); a failed
//!   handshake is logged with the plane, the remote address, the certificate offered and
//!   why it was refused. Connections carry [`ConnInfo`] (the peer certificate's names)
//!   into tonic's request extensions.
//! - [`Connector`] opens client connections (peers, the handler) with the current config.
//! - [`CertInfo`] reads what a person needs from a certificate: subject, names, expiry.

mod accept;
mod certs;
mod connect;
mod reload;

pub use crate::accept::{incoming, Alongside, Conn, ConnInfo, Incoming};
pub use crate::certs::{CertInfo, EXPIRY_WARNING};
pub use crate::connect::{client_config, client_config_with, Connector};
pub use crate::reload::{watch, Reload, Reloading};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;

/// What can go wrong loading TLS material. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: certificate {cert} has expired")]
    Expired { path: PathBuf, cert: Box<CertInfo> },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
}

impl TlsError {
    /// True for a certificate past its expiry (exit code 64 at start).
    pub fn is_expired(&self) -> bool {
        matches!(self, TlsError::Expired { .. })
    }
}

/// The crypto provider of every config: ring, chosen explicitly so that no process-wide
/// default has to be installed (and two linked providers cannot make it ambiguous).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config for one plane: its certificate and key, and with `client_ca` mutual
/// TLS (clients must present a certificate signed by it). `alpn` lists the protocols
/// offered (`h2`; `http/1.1` too where browsers and curl come in).
pub fn server_config(
    plane: &'static str,
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &'static [&'static [u8]],
) -> Result<Arc<Reloading<rustls::ServerConfig>>, TlsError> {
    let (cert, key) = (cert.to_owned(), key.to_owned());
    let client_ca = client_ca.map(Path::to_owned);
    let mut files = vec![cert.clone(), key.clone()];
    files.extend(client_ca.clone());
    Reloading::new(plane, files, move || {
        let chain = certs::read_certs(&cert)?;
        let info = certs::check_leaf(&cert, &chain)?;
        let private = certs::read_key(&key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: format!("{plane} TLS"),
                source,
            })?;
        let builder = match &client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(certs::read_roots(ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::Invalid {
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(Arc::new(certs::LoggedClientVerifier {
                    plane,
                    inner: verifier,
                }))
            }
        };
        let mut config =
            builder
                .with_single_cert(chain, private)
                .map_err(|source| TlsError::Rustls {
                    what: format!("{} with {}", cert.display(), key.display()),
                    source,
                })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok((config, Some(info)))
    })
}
