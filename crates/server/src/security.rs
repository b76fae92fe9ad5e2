//! What the configuration says about TLS and the admin token, loaded once at start and
//! kept current from the files afterwards.

use std::path::Path;
use std::sync::Arc;

use leasehold_tls::{Reload, Reloading, TlsError};

use crate::config::{AdminAuth, HandlerSpec, ServeOptions};

/// A TLS file that cannot be used: which setting, and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {source}")]
pub struct SecurityError {
    pub field: &'static str,
    pub source: TlsError,
}

/// ALPN of the gRPC planes, and of the admin plane (browsers and curl speak HTTP/1.1).
const H2: &[&[u8]] = &[b"h2"];
const H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

type ServerTls = Option<Arc<Reloading<rustls::ServerConfig>>>;

/// TLS of every plane and connection (`None`: plaintext), and the admin token.
pub struct Security {
    pub client: ServerTls,
    /// The HTTP gateway: the client plane's certificate, offering HTTP/1.1 too.
    pub http: ServerTls,
    pub peer_server: ServerTls,
    pub peer_client: Option<Arc<Reloading<rustls::ClientConfig>>>,
    /// The name this instance's peer certificate carries (empty without peer TLS).
    pub peer_identity: String,
    pub admin: ServerTls,
    pub handler: Option<leasehold_tls::Connector>,
    /// TLS to etcd; a change of its files reconnects (see `Coord::reload_etcd_tls`).
    pub etcd: Option<Arc<Reloading<leasehold_coord::EtcdTls>>>,
    pub admin_auth: Arc<AdminAuthz>,
    /// Everything to re-read when its files change.
    pub reloadable: Vec<Arc<dyn Reload>>,
}

fn path(setting: &Option<String>) -> Option<&Path> {
    setting.as_deref().map(Path::new)
}

fn at(field: &'static str) -> impl Fn(TlsError) -> SecurityError {
    move |source| SecurityError { field, source }
}

impl Security {
    /// Reads every certificate, key and token the configuration names. Any that cannot
    /// be read, or an expired certificate, is an error naming its setting.
    pub fn load(c: &ServeOptions) -> Result<Self, SecurityError> {
        let mut reloadable: Vec<Arc<dyn Reload>> = Vec::new();
        let client = match (path(&c.tls_cert), path(&c.tls_key)) {
            (Some(cert), Some(key)) => Some(
                leasehold_tls::server_config("client", cert, key, path(&c.tls_client_ca), H2)
                    .map_err(at("tls_cert"))?,
            ),
            _ => None,
        };
        let http = match (path(&c.tls_cert), path(&c.tls_key), c.http_listen) {
            (Some(cert), Some(key), Some(_)) => Some(
                leasehold_tls::server_config("http", cert, key, path(&c.tls_client_ca), H2_HTTP1)
                    .map_err(at("tls_cert"))?,
            ),
            _ => None,
        };
        let admin = match (path(&c.admin_tls_cert), path(&c.admin_tls_key)) {
            (Some(cert), Some(key)) => Some(
                leasehold_tls::server_config("admin", cert, key, None, H2_HTTP1)
                    .map_err(at("admin_tls_cert"))?,
            ),
            _ => None,
        };
        let (peer_server, peer_client, peer_identity) = match (
            path(&c.peer_ca),
            path(&c.peer_cert),
            path(&c.peer_key),
        ) {
            (Some(ca), Some(cert), Some(key)) => {
                let server = leasehold_tls::server_config("peer", cert, key, Some(ca), H2)
                    .map_err(at("peer_cert"))?;
                let client = leasehold_tls::client_config("peer", ca, Some((cert, key)))
                    .map_err(at("peer_cert"))?;
                let identity = client
                        .certificate()
                        .and_then(|i| i.identity().map(str::to_owned))
                        .ok_or_else(|| SecurityError {
                            field: "peer_cert",
                            source: TlsError::Invalid {
                                path: cert.to_owned(),
                                reason: "the certificate has no DNS name (subject alternative name) to identify this member by".into(),
                            },
                        })?;
                // The identity is registered once per lease: a rotated certificate must
                // keep it, or peers would refuse this member until a restart.
                server.pin_identity(identity.clone());
                client.pin_identity(identity.clone());
                (Some(server), Some(client), identity)
            }
            _ => (None, None, String::new()),
        };
        let handler = match (&c.handler, path(&c.handler_ca)) {
            (HandlerSpec::Grpc { tls: true, address }, Some(ca)) => {
                let identity = path(&c.handler_cert).zip(path(&c.handler_key));
                let config = leasehold_tls::client_config("handler", ca, identity)
                    .map_err(at("handler_ca"))?;
                reloadable.push(config.clone());
                let host = address
                    .rsplit_once(':')
                    .map_or(address.as_str(), |(h, _)| h);
                Some(leasehold_tls::Connector::new(
                    config,
                    Some(host.trim_matches(['[', ']']).to_owned()),
                ))
            }
            _ => None,
        };
        let etcd = match path(&c.etcd_ca) {
            Some(ca) => {
                let ca = ca.to_owned();
                let identity = path(&c.etcd_cert)
                    .zip(path(&c.etcd_key))
                    .map(|(c, k)| (c.to_owned(), k.to_owned()));
                let mut files = vec![ca.clone()];
                if let Some((c, k)) = &identity {
                    files.extend([c.clone(), k.clone()]);
                }
                let field = if identity.is_some() {
                    "etcd_cert"
                } else {
                    "etcd_ca"
                };
                let tls = Reloading::new("etcd", files, move || {
                    // Parsed and checked (expiry) like every other client config.
                    let checked = leasehold_tls::client_config(
                        "etcd",
                        &ca,
                        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                    )?;
                    let read = |p: &Path| {
                        std::fs::read(p).map_err(|source| TlsError::Read {
                            path: p.to_owned(),
                            source,
                        })
                    };
                    let identity = match &identity {
                        Some((c, k)) => Some((read(c)?, read(k)?)),
                        None => None,
                    };
                    let tls = leasehold_coord::EtcdTls {
                        ca: read(&ca)?,
                        identity,
                    };
                    Ok((tls, checked.certificate()))
                })
                .map_err(at(field))?;
                Some(tls)
            }
            None => None,
        };
        let token = match path(&c.admin_token_file) {
            Some(path) => {
                let file = path.to_owned();
                let token = Reloading::new("admin token", vec![file.clone()], move || {
                    let text = std::fs::read_to_string(&file).map_err(|source| TlsError::Read {
                        path: file.clone(),
                        source,
                    })?;
                    let token = text.trim().to_owned();
                    if token.is_empty() {
                        return Err(TlsError::Invalid {
                            path: file.clone(),
                            reason: "the admin token file is empty".into(),
                        });
                    }
                    Ok((token, None))
                })
                .map_err(at("admin_token_file"))?;
                reloadable.push(token.clone());
                Some(token)
            }
            None => None,
        };
        for r in [&client, &http, &peer_server, &admin].into_iter().flatten() {
            reloadable.push(r.clone());
        }
        if let Some(r) = &peer_client {
            reloadable.push(r.clone());
        }
        Ok(Self {
            client,
            http,
            peer_server,
            peer_client,
            peer_identity,
            admin,
            handler,
            etcd,
            admin_auth: Arc::new(AdminAuthz {
                token,
                mode: c.admin_auth,
            }),
            reloadable,
        })
    }
}

/// Refuses a rotated peer certificate that no longer carries the registered identity.
trait PinIdentity {
    fn pin_identity(&self, identity: String);
}

impl<T: Send + Sync + 'static> PinIdentity for Reloading<T> {
    fn pin_identity(&self, identity: String) {
        self.require(move |cert| {
            if cert.has_dns_name(&identity) {
                Ok(())
            } else {
                Err(format!(
                    "the new peer certificate does not carry this member's identity {identity:?} \
                     (names {:?}); keeping the current one (a new identity needs a restart)",
                    cert.dns_names
                ))
            }
        });
    }
}

/// Who may use the admin plane: with a token configured, requests it protects must carry
/// `Authorization: Bearer <token>`.
pub struct AdminAuthz {
    token: Option<Arc<Reloading<String>>>,
    mode: AdminAuth,
}

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this admin request needs `Authorization: Bearer <token>` (the token in --admin-token-file)")]
    Missing,
    #[error("the admin token does not match")]
    Wrong,
}

impl AdminAuthz {
    /// No token: everything open.
    pub fn open() -> Self {
        Self {
            token: None,
            mode: AdminAuth::Mutations,
        }
    }

    /// Checks an `Authorization` header value for a request that mutates (or only reads).
    pub fn check(&self, authorization: Option<&str>, mutation: bool) -> Result<(), Denied> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        if !mutation && self.mode == AdminAuth::Mutations {
            return Ok(());
        }
        // The scheme is case-insensitive (RFC 9110).
        let given = authorization
            .and_then(|h| h.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(Denied::Missing)?;
        if constant_time_eq(given.as_bytes(), token.current().as_bytes()) {
            Ok(())
        } else {
            Err(Denied::Wrong)
        }
    }
}

/// A browser request made by another site's page: cross-site request forgery when it
/// changes something (a form posted to the admin plane's drain, or to the gateway, needs
/// no token the page could not send). Browsers say where a request comes from in
/// `Sec-Fetch-Site` and, on a `POST`, in `Origin`; tools (curl, the CLI, gRPC clients)
/// send neither, and pass.
pub fn from_another_site(headers: &axum::http::HeaderMap, authority: Option<&str>) -> bool {
    use axum::http::header;
    if let Some(site) = headers.get("sec-fetch-site") {
        // `same-origin`, or `none` (typed into the address bar, a bookmark).
        return !matches!(site.to_str(), Ok("same-origin" | "none"));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    // An opaque origin (`null`: a sandboxed frame, a redirect) or an unreadable one.
    let Some(origin_host) = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host)
    else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(authority);
    host.is_none_or(|host| !host.eq_ignore_ascii_case(origin_host))
}

/// Whether a request is addressed to a host a browser page on this machine may have made
/// resolve to it (DNS rebinding): on a plaintext connection made to a loopback address, a
/// `Host` (else URI authority) that is neither `localhost` nor an IP address.
///
/// Such a page reaches an instance's loopback address as its own origin: the browser
/// sends neither a foreign `Origin` nor `Sec-Fetch-Site: cross-site`, and lets it read the
/// answers. On a machine running an instance without an admin token (a developer's, or
/// a `kubectl port-forward` to a pod), it could read the cluster and drain or freeze it,
/// or run calls through the gateway. Its requests name its own host, though. Connections
/// made to other addresses are reached by whatever names the network gives (Services,
/// load balancers) and take any host (the admin token guards those) — also when they come
/// from loopback, as a service mesh's sidecar forwards them (to the pod's address, with
/// the Service's name); over TLS the browser checks the certificate against the page's
/// name, and a rebound page fails there. No connection information (a service not behind
/// the accept loop): not refused.
pub fn misaddressed(conn: Option<&leasehold_tls::ConnInfo>, host: Option<&str>) -> bool {
    let Some(conn) = conn else {
        return false;
    };
    let to_loopback = conn
        .local
        .is_some_and(|local| local.ip().to_canonical().is_loopback());
    if conn.tls || !to_loopback {
        return false;
    }
    let Some(host) = host else {
        return false; // HTTP/1.0 without Host: not a browser's
    };
    let name = match host.strip_prefix('[') {
        // An IPv6 literal: `[::1]:7071`.
        Some(rest) => {
            return rest
                .split_once(']')
                .is_none_or(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_err())
        }
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    !(name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok())
}

/// Why a request was refused as [`misaddressed`] (for its error answer).
pub fn misaddressed_refusal(host: Option<&str>) -> String {
    format!(
        "a plaintext request to a loopback address must be addressed to localhost or an IP address, not to {:?} (a page that made its own name resolve here is refused)",
        host.unwrap_or_default()
    )
}

/// The host an HTTP request is addressed to: its `Host` header, else its URI's authority
/// (HTTP/2). A `Host` that is not ASCII is returned as a name no check takes.
pub fn request_host<'a>(
    headers: &'a axum::http::HeaderMap,
    uri: &'a axum::http::Uri,
) -> Option<&'a str> {
    match headers.get(axum::http::header::HOST) {
        Some(h) => Some(h.to_str().unwrap_or(NOT_ASCII)),
        None => uri.authority().map(|a| a.as_str()),
    }
}

/// Stands for a header value that is not ASCII.
pub const NOT_ASCII: &str = "(not ASCII)";

/// Refuses a gRPC request whose content type is not gRPC's. A browser page may send any
/// address a `POST` without asking first only as `text/plain` or a form; tonic serves a
/// gRPC body whatever its content type, so a page could freeze placement through the
/// admin plane's gRPC service (which takes HTTP/1) or run a call. `application/grpc`
/// would need a preflight no plane answers.
pub fn grpc_content_type(request: &tonic::Request<()>) -> Result<(), tonic::Status> {
    let grpc = request
        .metadata()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        Ok(())
    } else {
        Err(tonic::Status::invalid_argument(
            "a gRPC request needs content-type application/grpc (requests a browser page sends are refused)",
        ))
    }
}

/// Compares without an early exit on the first differing byte (the time taken does not
/// tell how much of a guess was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_from_another_sites_page_are_told_apart_from_tools_and_the_same_page() {
        use axum::http::HeaderMap;
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        // Tools send neither header.
        assert!(!from_another_site(
            &headers(&[("host", "10.0.0.5:7071")]),
            None
        ));
        assert!(!from_another_site(&headers(&[]), Some("10.0.0.5:7071")));
        // The status page itself, and an address typed into the browser.
        assert!(!from_another_site(
            &headers(&[
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://10.0.0.5:7071")
            ]),
            None
        ));
        assert!(!from_another_site(
            &headers(&[("sec-fetch-site", "none")]),
            None
        ));
        // Another site's page, said by either header.
        assert!(from_another_site(
            &headers(&[("sec-fetch-site", "cross-site"), ("host", "10.0.0.5:7071")]),
            None
        ));
        assert!(from_another_site(
            &headers(&[("sec-fetch-site", "same-site")]),
            None
        ));
        assert!(from_another_site(
            &headers(&[
                ("origin", "https://evil.example"),
                ("host", "10.0.0.5:7071")
            ]),
            None
        ));
        assert!(from_another_site(
            &headers(&[("origin", "null"), ("host", "10.0.0.5:7071")]),
            None
        ));
        // Origin matching the address the request was sent to (HTTP/1 Host, or HTTP/2's
        // authority), in any letter case.
        assert!(!from_another_site(
            &headers(&[
                ("origin", "http://Leasehold:7071"),
                ("host", "leasehold:7071")
            ]),
            None
        ));
        assert!(!from_another_site(
            &headers(&[("origin", "https://leasehold:7071")]),
            Some("leasehold:7071")
        ));
        assert!(from_another_site(
            &headers(&[("origin", "https://leasehold:7071")]),
            None
        ));
    }

    fn authz(mode: AdminAuth) -> (AdminAuthz, tempfile_path::Guard) {
        let guard = tempfile_path::Guard::new("s3cret\n");
        let file = guard.path.clone();
        let token = Reloading::new("admin token", vec![file.clone()], move || {
            Ok((
                std::fs::read_to_string(&file).unwrap().trim().to_owned(),
                None,
            ))
        })
        .unwrap();
        (
            AdminAuthz {
                token: Some(token),
                mode,
            },
            guard,
        )
    }

    mod tempfile_path {
        pub struct Guard {
            pub path: std::path::PathBuf,
        }
        impl Guard {
            pub fn new(content: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "lh-token-{}-{}",
                    std::process::id(),
                    rand_suffix()
                ));
                std::fs::write(&path, content).unwrap();
                Self { path }
            }
        }
        fn rand_suffix() -> u64 {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            N.fetch_add(1, Ordering::Relaxed)
        }
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    #[test]
    fn mutations_need_the_token_and_reads_only_with_all() {
        let (a, _g) = authz(AdminAuth::Mutations);
        assert_eq!(a.check(None, true), Err(Denied::Missing));
        assert_eq!(a.check(Some("Basic eA=="), true), Err(Denied::Missing));
        assert_eq!(a.check(Some("Bearer nope"), true), Err(Denied::Wrong));
        assert_eq!(a.check(Some("Bearer s3cret"), true), Ok(()));
        assert_eq!(a.check(Some("bearer  s3cret"), true), Ok(()));
        assert_eq!(a.check(None, false), Ok(()), "reads are open");
        let (a, _g) = authz(AdminAuth::All);
        assert_eq!(a.check(None, false), Err(Denied::Missing));
        assert_eq!(a.check(Some("Bearer s3cret"), false), Ok(()));
        assert_eq!(AdminAuthz::open().check(None, true), Ok(()));
    }

    #[test]
    fn plaintext_from_loopback_must_name_localhost_or_an_address() {
        let conn = |local: &str, tls| leasehold_tls::ConnInfo {
            remote: "127.0.0.1:50000".parse().unwrap(),
            local: Some(local.parse().unwrap()),
            tls,
            peer_cert: None,
        };
        let local = conn("127.0.0.1:7071", false);
        for host in [
            "localhost",
            "localhost:7071",
            "LocalHost:7071",
            "127.0.0.1:7071",
            "127.0.0.2",
            "[::1]:7071",
            "10.0.0.5:7071",
        ] {
            assert!(!misaddressed(Some(&local), Some(host)), "{host}");
        }
        for host in [
            "rebind.example:7071",
            "rebind.example",
            "status.localhost:7071",
            "localhost.rebind.example:7071",
            "127.0.0.1.nip.io:7071",
            "[not-an-ip]:7071",
            "localhost.:7071",
            NOT_ASCII,
            "",
        ] {
            assert!(misaddressed(Some(&local), Some(host)), "{host}");
        }
        assert!(
            !misaddressed(Some(&local), None),
            "no host: not a browser's request"
        );
        let mapped = conn("[::ffff:127.0.0.1]:7071", false);
        assert!(misaddressed(Some(&mapped), Some("rebind.example")));
        // Made to the pod's address (a sidecar forwards from loopback to it), over TLS (the
        // browser checks the name), or not known: any.
        for other in [conn("10.0.0.9:7071", false), conn("127.0.0.1:7071", true)] {
            assert!(!misaddressed(Some(&other), Some("rebind.example:7071")));
        }
        assert!(!misaddressed(None, Some("rebind.example:7071")));
    }

    #[test]
    fn equal_bytes_only() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
