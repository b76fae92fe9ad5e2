//! Security: TLS on every plane (client, peer, admin, handler, etcd), refusal of strangers,
//! the admin token, certificate rotation, and the limits that bound what one client can
//! take. Real processes, real certificates made at test time.

use std::error::Error as _;

use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_integration_tests::checker::Checker;
use leasehold_integration_tests::pki::{self, Ca, Leaf, Validity};
use leasehold_integration_tests::{
    balanced, parse_shards, wait_until, Etcd, Instance, InstanceSpec,
};
use leasehold_proto::v1::entities_client::EntitiesClient;
use leasehold_proto::v1::peer_client::PeerClient;
use leasehold_proto::v1::{CallRequest, ForwardRequest};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The name every instance's peer certificate carries (one certificate per release, as
/// the chart issues it).
const PEER_NAME: &str = "leasehold-peer";
const TOKEN: &str = "admin-token-7f3a";

/// The certificates of a TLS cluster.
struct Pki {
    client_ca: Ca,
    peer_ca: Ca,
    admin_ca: Ca,
    handler_ca: Ca,
    etcd_ca: Ca,
    /// Signs nothing the cluster trusts.
    stranger_ca: Ca,
    client: Leaf,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let client_ca = Ca::new("client CA");
        let client = client_ca.issue(&["app-client"]);
        Pki {
            client,
            client_ca,
            peer_ca: Ca::new("peer CA"),
            admin_ca: Ca::new("admin CA"),
            handler_ca: Ca::new("handler CA"),
            etcd_ca: Ca::new("etcd CA"),
            stranger_ca: Ca::new("stranger CA"),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self, name: &str, content: &str) -> String {
        pki::write(self.dir.path(), name, content)
    }

    /// `serve` flags for TLS on every plane, mutual TLS on the client and peer planes,
    /// a TLS handler, and a TLS etcd with a client certificate.
    fn flags(&self, handler_port: u16) -> Vec<String> {
        let server = self.client_ca.issue(&["127.0.0.1"]);
        let peer = self.peer_ca.issue(&[PEER_NAME, "127.0.0.1"]);
        let admin = self.admin_ca.issue(&["127.0.0.1"]);
        let etcd_client = self.etcd_ca.issue(&["leasehold"]);
        let f = |flag: &str, name: &str, content: &str| -> [String; 2] {
            [flag.to_owned(), self.file(name, content)]
        };
        [
            f("--tls-cert", "client.pem", &server.cert),
            f("--tls-key", "client.key", &server.key),
            f("--tls-client-ca", "client-ca.pem", &self.client_ca.pem),
            f("--peer-ca", "peer-ca.pem", &self.peer_ca.pem),
            f("--peer-cert", "peer.pem", &peer.cert),
            f("--peer-key", "peer.key", &peer.key),
            f("--admin-tls-cert", "admin.pem", &admin.cert),
            f("--admin-tls-key", "admin.key", &admin.key),
            f("--admin-token-file", "token", TOKEN),
            f("--handler-ca", "handler-ca.pem", &self.handler_ca.pem),
            f("--etcd-ca", "etcd-ca.pem", &self.etcd_ca.pem),
            f("--etcd-cert", "etcd.pem", &etcd_client.cert),
            f("--etcd-key", "etcd.key", &etcd_client.key),
            [
                "--handler".into(),
                format!("grpcs://127.0.0.1:{handler_port}"),
            ],
            ["--lease-ttl".into(), "3s".into()],
            ["--tls-reload-interval".into(), "500ms".into()],
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A gRPC channel over TLS trusting `ca`, presenting `identity`, expecting `name`.
fn tls_channel(port: u16, ca: &str, identity: Option<&Leaf>, name: &str) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(name);
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

fn plain_channel(port: u16) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

async fn call(channel: Channel, key: &str) -> Result<String, tonic::Status> {
    call_within(channel, key, Duration::from_secs(5)).await
}

async fn call_within(
    channel: Channel,
    key: &str,
    timeout: Duration,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(CallRequest {
        key: key.into(),
        payload: "x".into(),
    });
    request.set_timeout(timeout);
    EntitiesClient::new(channel)
        .call(request)
        .await
        .map(|r| r.into_inner().owner)
}

/// The admin HTTP API over TLS.
struct Admin {
    agent: ureq::Agent,
}

impl Admin {
    fn new(ca: &str) -> Admin {
        let agent = ureq::AgentBuilder::new()
            .tls_config(pki::client_config(ca, None, &[b"http/1.1"]))
            .timeout(Duration::from_secs(5))
            .build();
        Admin { agent }
    }

    /// (status, JSON body) of a request, with the token if given.
    fn request(
        &self,
        method: &str,
        inst: &Instance,
        path: &str,
        token: Option<&str>,
    ) -> (u16, Value) {
        self.request_with(method, inst, path, token, &[])
    }

    /// The same, with more headers.
    fn request_with(
        &self,
        method: &str,
        inst: &Instance,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("https://127.0.0.1:{}{path}", inst.admin_port);
        let mut req = self.agent.request(method, &url);
        for (name, value) in headers {
            req = req.set(name, value);
        }
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return (0, Value::String(e.to_string())),
        };
        let status = resp.status();
        (status, resp.into_json().unwrap_or(Value::Null))
    }

    fn get(&self, inst: &Instance, path: &str) -> Option<Value> {
        match self.request("GET", inst, path, None) {
            (200, v) => Some(v),
            _ => None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_on_every_plane_serves_moves_and_drains_and_refuses_strangers() {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(&pki.etcd_ca, &pki.etcd_ca.issue(&["127.0.0.1"])).await;
    let checker = Checker::start_tls(&pki.handler_ca.issue(&["127.0.0.1"])).await;
    let flags = pki.flags(checker.port);
    // The HTTP gateway too: it takes the client plane's certificate and client CA.
    let http_ports: Vec<u16> = (0..3)
        .map(|_| leasehold_integration_tests::free_port())
        .collect();
    let instances: Vec<Instance> = ["n0", "n1", "n2"]
        .iter()
        .zip(&http_ports)
        .map(|(id, http)| {
            let mut args = flags.clone();
            args.extend(["--http-listen".to_owned(), format!("127.0.0.1:{http}")]);
            Instance::start(&InstanceSpec {
                id: id.to_string(),
                etcd: etcd.endpoint(),
                args,
            })
        })
        .collect();
    let admin = Admin::new(&pki.admin_ca.pem);
    // Balanced, not only owned: shards still moving to a late member would make the smart
    // client's table one step behind below.
    wait_until(
        Duration::from_secs(30),
        "3 members own every shard, balanced",
        || {
            let table = parse_shards(&admin.get(&instances[0], "/v1/shards")?)?;
            let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
            (table.len() == 1024 && balanced(&table, &ids)).then_some(())
        },
    )
    .await;
    smart_client_and_gateway_over_mutual_tls(&pki, &instances, &http_ports).await;

    // Calls through one instance reach every owner: the client, peer and handler planes
    // all work over TLS.
    let client = tls_channel(
        instances[0].grpc_port,
        &pki.client_ca.pem,
        Some(&pki.client),
        "127.0.0.1",
    );
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..60 {
        owners.insert(call(client.clone(), &format!("tls-{i}")).await.unwrap());
    }
    assert_eq!(
        owners.len(),
        3,
        "forwarded calls reach every owner: {owners:?}"
    );

    strangers_are_refused(&pki, &instances, &checker).await;
    admin_needs_the_token(&admin, &instances, &pki).await;

    // The right token drains n2 over gRPC (and again over HTTP: idempotent); its shards
    // move while calls go on, and the CLI (the chart's preStop hook) waits for that over
    // TLS with the token.
    let mut grpc = leasehold_proto::v1::admin_client::AdminClient::new(tls_channel(
        instances[0].admin_port,
        &pki.admin_ca.pem,
        None,
        "127.0.0.1",
    ));
    let mut drain = tonic::Request::new(leasehold_proto::v1::DrainRequest {
        member: "n2".into(),
    });
    drain
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    grpc.drain(drain).await.unwrap();
    let (status, body) = admin.request("POST", &instances[0], "/v1/members/n2/drain", Some(TOKEN));
    assert_eq!(status, 202, "{body}");
    let cli = {
        let admin_url = format!("https://127.0.0.1:{}", instances[2].admin_port);
        let (ca, token) = (
            pki.file("cli-ca.pem", &pki.admin_ca.pem),
            pki.file("cli-token", TOKEN),
        );
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(leasehold_integration_tests::leasehold_bin())
                .args([
                    "drain",
                    "--admin",
                    &admin_url,
                    "--ca-file",
                    &ca,
                    "--token-file",
                    &token,
                ])
                .args(["--wait", "30s"])
                .env_remove("LEASEHOLD_BIN")
                .output()
                .unwrap()
        })
    };
    let mut i = 0;
    while !cli.is_finished() {
        call(client.clone(), &format!("move-{i}")).await.unwrap();
        i += 1;
    }
    let out = cli.await.unwrap();
    assert!(
        out.status.success(),
        "leasehold drain over TLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI waited on n2's own view: there, n2 holds nothing now.
    let n2_seen_by = |i: usize| {
        let members = admin.get(&instances[i], "/v1/members").unwrap();
        let n2 = members["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "n2")
            .cloned()
            .unwrap();
        (
            (
                n2["state"].as_str().map(str::to_owned),
                n2["shards"].as_u64(),
            ),
            members,
        )
    };
    let (n2, members) = n2_seen_by(2);
    assert_eq!(n2, (Some("draining".into()), Some(0)), "{members}");
    // Another member's view follows within a watch event.
    wait_until(Duration::from_secs(10), "n0 sees n2 drained", || {
        let (n2, _) = n2_seen_by(0);
        (n2 == (Some("draining".into()), Some(0))).then_some(())
    })
    .await;
    assert!(i > 0, "calls ran during the move");

    // etcd's client certificate rotates: every instance reconnects with the new one and
    // keeps serving.
    let rotated = pki.etcd_ca.issue(&["leasehold-rotated"]);
    pki::replace(
        &pki.dir.path().join("etcd.key").display().to_string(),
        &rotated.key,
    );
    pki::replace(
        &pki.dir.path().join("etcd.pem").display().to_string(),
        &rotated.cert,
    );
    wait_until(
        Duration::from_secs(15),
        "instances to reconnect to etcd with the new certificate",
        || {
            instances
                .iter()
                .all(|i| {
                    i.log_text()
                        .contains("etcd TLS files changed; reconnected with them")
                })
                .then_some(())
        },
    )
    .await;
    for i in 0..20 {
        call(client.clone(), &format!("after-etcd-rotation-{i}"))
            .await
            .unwrap();
    }
    // (n2 is draining, so not ready by design.)
    assert!(
        instances[..2]
            .iter()
            .all(|i| admin.request("GET", i, "/readyz", None).0 == 200),
        "still ready after the rotation"
    );
    assert!(
        checker.violations().is_empty(),
        "{:?}",
        checker.violations()
    );
    drop(etcd);
}

/// A connection the server refused at the TLS layer: the client sees the transport fail
/// (which code depends on when: TLS 1.3 reports a refused client certificate after the
/// client thinks the handshake is done).
/// The smart client follows the table and calls owners directly over mutual TLS; the
/// HTTP gateway answers curl with a client certificate and refuses curl without one.
async fn smart_client_and_gateway_over_mutual_tls(
    pki: &Pki,
    instances: &[Instance],
    http_ports: &[u16],
) {
    let ca = pki.file("smart-ca.pem", &pki.client_ca.pem);
    let cert = pki.file("smart.pem", &pki.client.cert);
    let key = pki.file("smart.key", &pki.client.key);
    let client = leasehold_client::Client::builder()
        .seeds(
            instances
                .iter()
                .map(|i| format!("127.0.0.1:{}", i.grpc_port)),
        )
        .tls(leasehold_client::Tls {
            ca_file: ca.clone().into(),
            identity: Some((cert.clone().into(), key.clone().into())),
            server_name: None,
        })
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the smart client connects over mutual TLS");
    // The client's table is the cluster's (owners and epochs): a call can only be
    // forwarded when the client's table is behind.
    let admin = Admin::new(&pki.admin_ca.pem);
    wait_until(
        Duration::from_secs(10),
        "the client's table to match the cluster's",
        || {
            let table = parse_shards(&admin.get(&instances[0], "/v1/shards")?)?;
            let routing = client.routing()?;
            let same = table.len() == 1024
                && table.iter().all(|(shard, owner, epoch)| {
                    let s = *shard as u32;
                    routing.owner(s).map(|m| m.id.as_str()) == owner.as_deref()
                        && routing.epoch(s) == *epoch
                });
            same.then_some(())
        },
    )
    .await;
    for i in 0..30 {
        let reply = client.call(&format!("smart-tls-{i}"), "x").await.unwrap();
        assert!(!reply.forwarded, "{reply:?}");
    }
    // Without a client certificate the client plane refuses the handshake: not sent.
    let stranger = leasehold_client::Client::builder()
        .seed(format!("127.0.0.1:{}", instances[0].grpc_port))
        .tls(leasehold_client::Tls {
            ca_file: ca.clone().into(),
            identity: None,
            server_name: None,
        })
        .timeout(Duration::from_secs(1))
        .follow_routing(false)
        .build()
        .unwrap();
    assert!(stranger.call("k", "x").await.is_err());

    let url = format!("https://127.0.0.1:{}/v1/entities/gw-tls", http_ports[1]);
    let curl = |extra: &[&str]| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &ca, "-X", "POST"])
            .args(["--data-binary", "over tls"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    let out = curl(&["--cert", &cert, "--key", &key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over tls");
    let out = curl(&[]);
    assert!(
        !out.status.success(),
        "the gateway served a client without a certificate: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn assert_transport_refusal(e: &tonic::Status, what: &str) {
    use tonic::Code::*;
    assert!(
        matches!(e.code(), Unavailable | Internal | Unknown | Cancelled) && e.source().is_some(),
        "{what}: not a transport failure: {e}"
    );
}

/// Each stranger is refused with the expected error, and no handler call happens for it.
async fn strangers_are_refused(pki: &Pki, instances: &[Instance], checker: &Checker) {
    let n0 = &instances[0];
    let handled = |key: &str| checker.state.lock().unwrap().history.contains_key(key);

    let e = call(plain_channel(n0.grpc_port), "stranger-plain")
        .await
        .unwrap_err();
    // The server answers TLS bytes the client cannot read as HTTP/2.
    assert_transport_refusal(&e, "plaintext to TLS");

    let no_cert = tls_channel(n0.grpc_port, &pki.client_ca.pem, None, "127.0.0.1");
    let e = call(no_cert, "stranger-no-cert").await.unwrap_err();
    assert_transport_refusal(&e, "no client certificate");

    let other = pki.stranger_ca.issue(&["app-client"]);
    let e = call(
        tls_channel(n0.grpc_port, &pki.client_ca.pem, Some(&other), "127.0.0.1"),
        "stranger-other-ca",
    )
    .await
    .unwrap_err();
    assert_transport_refusal(&e, "another CA's certificate");

    // The peer plane: a client certificate of the client plane, a peer-CA certificate
    // that is no member's, plaintext.
    let forward = |key: &str| ForwardRequest {
        key: key.into(),
        payload: "forged".into(),
        shard: 0,
        expected_epoch: 0,
        entry: "n1".into(),
        source: None,
        metadata: Default::default(),
    };
    let with_member = |key: &str| {
        let mut r = tonic::Request::new(forward(key));
        r.metadata_mut()
            .insert("leasehold-member", "n1".parse().unwrap());
        r
    };
    let client_cert_on_peer =
        tls_channel(n0.peer_port, &pki.peer_ca.pem, Some(&pki.client), PEER_NAME);
    let e = PeerClient::new(client_cert_on_peer)
        .forward(with_member("stranger-client-cert-on-peer"))
        .await
        .unwrap_err();
    assert_transport_refusal(&e, "client-plane certificate on the peer plane");

    let intruder = pki.peer_ca.issue(&["intruder"]);
    let e = PeerClient::new(tls_channel(
        n0.peer_port,
        &pki.peer_ca.pem,
        Some(&intruder),
        PEER_NAME,
    ))
    .forward(with_member("stranger-non-member"))
    .await
    .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "non-member certificate: {e}"
    );
    assert!(e.message().contains("identity"), "{e}");

    // The same certificate on peer frames (the Dispatch streams' own protocol on the
    // peer port): refused in the answer to its greeting; the call it sent is not run.
    let refusal = peer_frames_refusal(
        n0.peer_port,
        &pki.peer_ca.pem,
        &intruder,
        forward("stranger-frames"),
    )
    .await;
    assert_eq!(
        refusal.code,
        tonic::Code::PermissionDenied as i32,
        "non-member certificate on peer frames: {refusal:?}"
    );
    assert!(refusal.message.contains("identity"), "{refusal:?}");

    let e = PeerClient::new(plain_channel(n0.peer_port))
        .forward(with_member("stranger-plain-peer"))
        .await
        .unwrap_err();
    assert_transport_refusal(&e, "plaintext peer");

    for key in [
        "stranger-plain",
        "stranger-no-cert",
        "stranger-other-ca",
        "stranger-client-cert-on-peer",
        "stranger-non-member",
        "stranger-frames",
        "stranger-plain-peer",
    ] {
        assert!(!handled(key), "the handler ran a stranger's call {key}");
    }
    let log = n0.log_text();
    assert!(
        log.contains("client certificate refused") && log.contains("stranger CA"),
        "the refusal names the certificate:\n{log}"
    );
}

/// Opens a peer-frames connection over TLS presenting `identity`, names member n1, sends
/// `call`, and returns the receiver's refusal (its first answer, which must be one).
async fn peer_frames_refusal(
    port: u16,
    ca: &str,
    identity: &Leaf,
    call: ForwardRequest,
) -> leasehold_proto::v1::DispatchError {
    use prost::Message as _;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let config = pki::client_config(ca, Some(identity), &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(PEER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let frame = |body: Vec<u8>| [(body.len() as u32).to_be_bytes().to_vec(), body].concat();
    let request = leasehold_proto::v1::DispatchRequest {
        id: 1,
        call: Some(call),
        timeout_ms: 5000,
        ..Default::default()
    };
    let mut out = b"LEASEHOLD PEER FRAMES/1\n".to_vec();
    out.extend(frame(b"n1".to_vec()));
    out.extend(frame(request.encode_to_vec()));
    tls.write_all(&out).await.unwrap();
    let len = tls.read_u32().await.unwrap() as usize;
    let mut body = vec![0; len];
    tls.read_exact(&mut body).await.unwrap();
    let answer = leasehold_proto::v1::DispatchResponse::decode(&body[..]).unwrap();
    assert_eq!(
        answer.id, 0,
        "the first answer is the greeting's: {answer:?}"
    );
    // Nothing else comes: the receiver closed the connection.
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "more answers after the refusal");
    answer.error.expect("the greeting was refused")
}

/// Admin mutations need the token (HTTP and gRPC); reads stay open; nothing changes on a
/// refusal.
async fn admin_needs_the_token(admin: &Admin, instances: &[Instance], pki: &Pki) {
    let n0 = &instances[0];
    for token in [None, Some("wrong")] {
        let (status, body) = admin.request("POST", n0, "/v1/members/n1/drain", token);
        assert_eq!(status, 401, "{token:?}: {body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains("token"),
            "{body}"
        );
    }
    let mut grpc = leasehold_proto::v1::admin_client::AdminClient::new(tls_channel(
        n0.admin_port,
        &pki.admin_ca.pem,
        None,
        "127.0.0.1",
    ));
    let e = grpc
        .drain(leasehold_proto::v1::DrainRequest {
            member: "n1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let mut wrong = tonic::Request::new(leasehold_proto::v1::DrainRequest {
        member: "n1".into(),
    });
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        grpc.drain(wrong).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // Every other gRPC mutation too (refused before anything is looked up).
    let e = grpc
        .switch_kafka_source(leasehold_proto::v1::SwitchKafkaSourceRequest {
            name: "pay".into(),
            to: leasehold_proto::v1::KafkaSwitchTo::Standby.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let e = grpc
        .freeze(leasehold_proto::v1::FreezeRequest { frozen: true })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    // Hot keys are the application's keys: protected like changes, reads open or not.
    let (status, body) = admin.request("GET", n0, "/v1/hot-keys", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = admin.request("GET", n0, "/v1/hot-keys", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    // A change another site's page makes a browser send is refused, token or not.
    for headers in [
        &[("Origin", "https://elsewhere.example")][..],
        &[("Sec-Fetch-Site", "cross-site")][..],
    ] {
        let (status, body) =
            admin.request_with("POST", n0, "/v1/cluster/freeze", Some(TOKEN), headers);
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("another site"),
            "{body}"
        );
    }
    assert_eq!(
        admin.get(n0, "/v1/placement").unwrap()["frozen"],
        false,
        "a refused freeze changed nothing"
    );
    // The admin plane reads small gRPC requests only (read before a method checks the
    // token), and goes on serving.
    let mut big = tonic::Request::new(leasehold_proto::v1::DrainRequest {
        member: "n".repeat(100 * 1024),
    });
    big.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let e = grpc.drain(big).await.unwrap_err();
    assert!(
        e.message().contains("too large"),
        "{:?}: {}",
        e.code(),
        e.message()
    );
    // Reads are open, over gRPC too.
    let info = grpc
        .get_cluster(leasehold_proto::v1::GetClusterRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.members, 3);
    let members = admin.get(n0, "/v1/members").unwrap();
    assert!(
        members["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["state"] == "active"),
        "a refused drain changed nothing: {members}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_certificates_are_used_by_new_connections_and_no_call_fails() {
    let ca = Ca::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.issue(&["127.0.0.1", "first"]);
    let cert = pki::write(dir.path(), "tls.pem", &first.cert);
    let key = pki::write(dir.path(), "tls.key", &first.key);
    let etcd = Etcd::start().await;
    let n0 = Instance::start(&InstanceSpec {
        id: "n0".into(),
        etcd: etcd.endpoint(),
        args: [
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-reload-interval",
            "200ms",
            // One instance: no peer traffic.
            "--allow-plaintext-peers",
            "true",
        ]
        .map(String::from)
        .to_vec(),
    });
    wait_until(Duration::from_secs(20), "n0 ready", || {
        n0.ready().then_some(())
    })
    .await;
    assert_eq!(
        names_presented(n0.grpc_port, &ca.pem).await,
        vec!["127.0.0.1", "first"]
    );

    // Calls run throughout, on one long-lived connection and on new ones.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let long_lived = tls_channel(n0.grpc_port, &ca.pem, None, "127.0.0.1");
    let load = {
        let (stop, failures, calls, ca_pem, port) = (
            stop.clone(),
            failures.clone(),
            calls.clone(),
            ca.pem.clone(),
            n0.grpc_port,
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let fresh = tls_channel(port, &ca_pem, None, "127.0.0.1");
                for ch in [long_lived.clone(), fresh] {
                    if let Err(e) = call(ch, &format!("rot-{i}")).await {
                        failures.lock().unwrap().push(e.to_string());
                    }
                    calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i += 1;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = ca.issue(&["127.0.0.1", "second"]);
    pki::replace(&key, &second.key);
    pki::replace(&cert, &second.cert);
    let port = n0.grpc_port;
    let ca_pem = ca.pem.clone();
    wait_until(
        Duration::from_secs(10),
        "new connections to present the new certificate",
        || {
            let names = futures_block(names_presented(port, &ca_pem));
            (names == vec!["127.0.0.1", "second"]).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        calls.load(std::sync::atomic::Ordering::Relaxed) > 10,
        "the load ran"
    );
    assert!(
        failures.is_empty(),
        "calls failed during rotation: {failures:?}"
    );
    assert!(
        n0.log_text().contains("TLS files changed"),
        "the reload is logged"
    );
    drop(etcd);
}

/// Runs a future to completion from a synchronous poll closure.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// The names in the certificate a new TLS connection to `port` is shown.
async fn names_presented(port: u16, ca: &str) -> Vec<String> {
    use rustls::pki_types::ServerName;
    let config = pki::client_config(ca, None, &[b"h2"]);
    let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let Ok(tls) = connector.connect(name, tcp).await else {
        return Vec::new();
    };
    let Some(der) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Vec::new();
    };
    leasehold_tls::CertInfo::parse(der)
        .map(|c| c.names)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_certificate_stops_the_start_with_exit_64() {
    let ca = Ca::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let old = ca.issue_with(&["127.0.0.1"], Validity::Expired);
    let cert = pki::write(dir.path(), "tls.pem", &old.cert);
    let key = pki::write(dir.path(), "tls.key", &old.key);
    let mut n0 = Instance::start(&InstanceSpec {
        id: "n0".into(),
        // Never reached: the certificate is checked first.
        etcd: "http://127.0.0.1:1".into(),
        args: [
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--allow-plaintext-peers",
            "true",
        ]
        .map(String::from)
        .to_vec(),
    });
    assert_eq!(n0.wait_exit(Duration::from_secs(20)).await, Some(64));
    let log = n0.log_text();
    assert!(
        log.contains("tls_cert") && log.contains("expired") && log.contains("2021-01-01"),
        "the error names the setting, the certificate and its expiry:\n{log}"
    );
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

/// What one instance may spend on hostile or buggy clients.
const RSS_BOUND_MIB: u64 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_refuse_clearly_and_memory_stays_bounded() {
    let etcd = Etcd::start().await;
    // Every call takes 100 ms, so that load piles up.
    let checker = Checker::start(Duration::from_millis(100), None).await;
    let n0 = Instance::start(&InstanceSpec {
        id: "n0".into(),
        etcd: etcd.endpoint(),
        args: [
            "--handler",
            &checker.handler_flag(),
            "--max-pending-calls",
            "300",
            "--max-dispatch-in-flight",
            "64",
        ]
        .map(String::from)
        .to_vec(),
    });
    // Every shard owned and its ShardAcquired hook delivered (calls of a shard wait for
    // its hook): the flood below measures the limits, not the start.
    wait_until(
        Duration::from_secs(20),
        "n0 owns every shard, hooks run",
        || {
            let c = n0.get("/v1/cluster")?;
            let hooks = n0.metric("leasehold_shard_event_duration_seconds_count")?;
            (c["unowned_shards"] == 0 && n0.ready() && hooks >= 1024.0).then_some(())
        },
    )
    .await;

    // Connections that send nothing are closed, so they cannot hold the plane's slots.
    // Each is watched by a thread of its own from now on: when it closes does not depend
    // on how long the rest of this test takes.
    let idle_since = Instant::now();
    let idle: Vec<std::thread::JoinHandle<(bool, Duration)>> = (0..50)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", n0.admin_port)).unwrap();
            std::thread::spawn(move || {
                use std::io::Read;
                c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let mut buf = [0u8; 1];
                let closed = matches!(c.read(&mut buf), Ok(0) | Err(_));
                (closed, idle_since.elapsed())
            })
        })
        .collect();

    // A 1 MiB key: refused, naming the limit.
    let e = call(plain_channel(n0.grpc_port), &"k".repeat(1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("max_key_bytes"), "{e}");

    // 10 000 concurrent calls on one connection: the ones past max_pending_calls are
    // refused at once, naming the limit; the rest run. The connection carries at most
    // max_concurrent_streams (1024) of them at a time, so the last ones wait their turn
    // in the client: their deadline allows for that on a slow machine (debug build, two
    // cores), and a call that hangs still fails the test.
    let channel = plain_channel(n0.grpc_port);
    let flood_started = Instant::now();
    let calls: Vec<_> = (0..10_000)
        .map(|i| {
            let channel = channel.clone();
            tokio::spawn(async move {
                call_within(channel, &format!("flood-{i}"), Duration::from_secs(30)).await
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(e.message().contains("max_pending_calls"), "{e}");
                refused += 1;
            }
            Err(e) => panic!("unexpected failure under the flood: {e}"),
        }
    }
    eprintln!(
        "flood: {ok} ran, {refused} refused, in {:?}",
        flood_started.elapsed()
    );
    assert!(ok >= 300 && refused > 0, "{ok} ran, {refused} refused");

    // A Dispatch stream that sends forever and never reads an answer: the instance stops
    // reading it once 64 messages are in flight, so the sender is held back.
    let pulled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let endless = {
        let pulled = pulled.clone();
        futures::stream::iter(0u64..).map(move |i| {
            pulled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            leasehold_proto::v1::DispatchRequest {
                id: i,
                call: Some(ForwardRequest {
                    key: format!("endless-{i}"),
                    payload: "x".into(),
                    shard: 0,
                    expected_epoch: 0,
                    entry: "n0".into(),
                    source: None,
                    metadata: Default::default(),
                }),
                timeout_ms: 5000,
                ..Default::default()
            }
        })
    };
    let mut peer = PeerClient::new(plain_channel(n0.peer_port));
    let _answers = peer.dispatch(endless).await.unwrap();
    // Meanwhile other clients are served.
    for i in 0..10 {
        let started = Instant::now();
        call(plain_channel(n0.grpc_port), &format!("other-{i}"))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "slow under the stream"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = pulled.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("endless Dispatch stream: {sent} messages taken in ~2 s");
    assert!(sent < 100_000, "the stream was read without bound: {sent}");
    for watch in idle {
        let (closed, after) = watch.join().unwrap();
        assert!(
            closed && after < Duration::from_secs(14),
            "an idle connection stayed open {after:?}"
        );
    }
    let peak = peak_rss_mib(n0.pid());
    eprintln!("peak RSS {peak} MiB (bound {RSS_BOUND_MIB} MiB)");
    assert!(peak < RSS_BOUND_MIB, "peak RSS {peak} MiB");
    drop(etcd);
}
