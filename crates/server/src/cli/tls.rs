//! TLS and the admin token for the command-line clients.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::report::{CliError, CliResult, Exit};

/// How to reach a TLS plane (used for `https://` addresses).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// CA (PEM) that the server's certificate must be signed by; needed for `https://`.
    #[arg(long, env = "LEASEHOLD_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for a server that requires one (mutual TLS).
    #[arg(long, env = "LEASEHOLD_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// Key of --cert-file (PEM).
    #[arg(long, env = "LEASEHOLD_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Name the server's certificate must carry, when it is not the host dialled (e.g.
    /// the Service name when connecting to 127.0.0.1).
    #[arg(long, env = "LEASEHOLD_SERVER_NAME", value_name = "NAME")]
    pub server_name: Option<String>,
}

impl TlsArgs {
    /// The rustls config for `https://` URLs (`None` for `http://`).
    pub fn config(
        &self,
        url: &str,
        alpn: &'static [&'static [u8]],
    ) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        if !url.starts_with("https://") {
            return Ok(None);
        }
        let ca = self
            .ca_file
            .as_deref()
            .context("an https:// address needs --ca-file (or LEASEHOLD_CA_FILE)")?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => anyhow::bail!("--cert-file and --key-file go together"),
        };
        let config =
            leasehold_tls::client_config_with("cli", ca, identity, alpn, self.server_name.clone())?;
        Ok(Some(config.current()))
    }
}

/// The admin plane: its URL, TLS and token.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Admin URL of an instance (`https://` when the admin plane has TLS).
    #[arg(long, env = "LEASEHOLD_ADMIN", default_value = "http://127.0.0.1:7071")]
    pub admin: String,
    /// File holding the admin token (or set LEASEHOLD_ADMIN_TOKEN to the token itself).
    #[arg(long, env = "LEASEHOLD_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// An HTTP client for the admin plane.
pub struct AdminClient {
    pub base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl AdminClient {
    /// A client for `args.admin`; bad TLS files or an unreadable token file are usage errors.
    pub fn new(args: &AdminArgs) -> CliResult<Self> {
        let mut agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5));
        if let Some(config) = args
            .tls
            .config(&args.admin, &[b"http/1.1"])
            .map_err(|e| CliError::usage_from(&e))?
        {
            agent = agent.tls_config(config);
        }
        let token = match (&args.token_file, std::env::var("LEASEHOLD_ADMIN_TOKEN")) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| {
                        CliError::usage(format!(
                            "reading the admin token from {}: {e}",
                            f.display()
                        ))
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, Ok(t)) if !t.is_empty() => Some(t),
            _ => None,
        };
        Ok(Self {
            base: args.admin.trim_end_matches('/').to_owned(),
            agent: agent.build(),
            token,
        })
    }

    /// A request to `path` on the admin plane, with the token when there is one.
    pub fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => request.set("Authorization", &format!("Bearer {t}")),
            None => request,
        }
    }
}

/// A gRPC channel to `addr` (`HOST:PORT` or a URL; `https://` through TLS), and its URL.
/// A bad address or TLS file is a usage error; failing to connect, unavailable.
pub async fn channel(addr: &str, tls: &TlsArgs) -> CliResult<(tonic::transport::Channel, String)> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url.replacen("https://", "http://", 1))
        .map_err(|e| CliError::usage(format!("invalid address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2));
    let config = tls
        .config(&url, &[b"h2"])
        .map_err(|e| CliError::usage_from(&e))?;
    let channel = match config {
        Some(config) => {
            let config = leasehold_tls::Reloading::new("cli", Vec::new(), move || {
                Ok(((*config).clone(), None))
            })
            .map_err(|e| CliError::usage(e.to_string()))?;
            endpoint
                .connect_with_connector(leasehold_tls::Connector::new(config, None))
                .await
        }
        None => endpoint.connect().await,
    }
    .map_err(|e| {
        let e = anyhow::Error::new(e).context(format!("cannot connect to {url}"));
        CliError::new(Exit::Unavailable, format!("{e:#}"))
    })?;
    Ok((channel, url))
}
