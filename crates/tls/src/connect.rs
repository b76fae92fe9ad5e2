//! Client connections over TLS (to peers and to the handler), with the current config.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::certs::{self, LoggedServerVerifier};
use crate::{provider, Reloading, TlsError};

/// A client config trusting `ca` (only it: these are private CAs), presenting
/// `identity` (certificate, key) when given, offering HTTP/2.
pub fn client_config(
    target: &'static str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<Reloading<rustls::ClientConfig>>, TlsError> {
    client_config_with(target, ca, identity, &[b"h2"], None)
}

/// [`client_config`] offering `alpn`, and checking the server's certificate for
/// `server_name` whatever host was dialled (an address reached by IP, say, whose
/// certificate names the service).
pub fn client_config_with(
    target: &'static str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &'static [&'static [u8]],
    server_name: Option<String>,
) -> Result<Arc<Reloading<rustls::ClientConfig>>, TlsError> {
    let name_override = match server_name {
        Some(n) => Some(
            ServerName::try_from(n.clone()).map_err(|e| TlsError::Invalid {
                path: ca.to_owned(),
                reason: format!("server name {n:?}: {e}"),
            })?,
        ),
        None => None,
    };
    let ca = ca.to_owned();
    let identity = identity.map(|(c, k)| (c.to_owned(), k.to_owned()));
    let mut files = vec![ca.clone()];
    if let Some((c, k)) = &identity {
        files.extend([c.clone(), k.clone()]);
    }
    Reloading::new(target, files, move || {
        let roots = Arc::new(certs::read_roots(&ca)?);
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Invalid {
                path: ca.clone(),
                reason: e.to_string(),
            })?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: format!("{target} TLS"),
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LoggedServerVerifier {
                target,
                inner: verifier,
                name_override: name_override.clone(),
            }));
        let (mut config, info) = match &identity {
            None => (builder.with_no_client_auth(), None),
            Some((cert, key)) => {
                let chain = certs::read_certs(cert)?;
                let info = certs::check_leaf(cert, &chain)?;
                let private = certs::read_key(key)?;
                let config = builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|source| TlsError::Rustls {
                        what: format!("{} with {}", cert.display(), key.display()),
                        source,
                    })?;
                (config, Some(info))
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok((config, info))
    })
}

/// Opens TCP + TLS connections for a tonic channel, with the config current at connect
/// time (a rotated client certificate is used from the next connection on). The server
/// must present a certificate for `server_name` (default: the host being connected to).
#[derive(Clone)]
pub struct Connector {
    tls: Arc<Reloading<rustls::ClientConfig>>,
    server_name: Option<String>,
}

impl Connector {
    pub fn new(tls: Arc<Reloading<rustls::ClientConfig>>, server_name: Option<String>) -> Self {
        Self { tls, server_name }
    }
}

type Connecting = Pin<
    Box<
        dyn Future<
                Output = Result<
                    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                    std::io::Error,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("no host in {uri}")))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid(format!("no port in {uri}")))?;
            Ok(TokioIo::new(this.connect(host, port).await?))
        })
    }
}

impl Connector {
    /// Opens a TCP connection to `host:port` (an IPv6 host may be bracketed) and makes
    /// the TLS handshake, within 5 s.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name =
            ServerName::try_from(self.server_name.clone().unwrap_or_else(|| host.clone()))
                .map_err(|e| invalid(format!("server name: {e}")))?;
        let config = self.tls.current();
        let connect = async {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
        };
        tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TLS connection to {host}:{port} not made within 5s"),
                )
            })?
    }
}
