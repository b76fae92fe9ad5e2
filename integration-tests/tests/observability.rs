//! What operators see: metrics every strict parser accepts and the README documents.
//! Real etcd, a real Kafka broker and real `leasehold` processes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use leasehold_integration_tests::checker::Checker;
use leasehold_integration_tests::kafka::Kafka;
use leasehold_integration_tests::openmetrics::{self, Family};
use leasehold_integration_tests::{wait_until, Cluster, Instance};
use leasehold_proto::v1::CallRequest;

/// `/metrics` of one instance: (content type, body).
fn scrape(i: &Instance) -> (String, String) {
    let r = ureq::get(&format!("{}/metrics", i.admin_url()))
        .call()
        .unwrap();
    let content_type = r.header("content-type").unwrap_or_default().to_owned();
    (content_type, r.into_string().unwrap())
}

/// Sample names of the README's metric table (`### Metrics`, first column).
fn documented() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("### Metrics")
        .nth(1)
        .expect("README has a ### Metrics section");
    // Up to the next heading of any level.
    let section = section.split("\n#").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            let first = l.split('|').nth(1).unwrap().to_owned();
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The name a family's samples carry (a counter's family `x` has samples `x_total`).
fn sample_name(name: &str, f: &Family) -> String {
    if f.kind == "counter" {
        format!("{name}_total")
    } else {
        name.to_owned()
    }
}

/// Handler calls run by one instance (its handler duration histogram's counts).
fn handler_calls(families: &BTreeMap<String, Family>) -> f64 {
    families
        .get("leasehold_handler_duration_seconds")
        .map_or(0.0, |f| {
            f.samples
                .iter()
                .filter(|(n, _, _)| n.ends_with("_count"))
                .map(|(_, _, v)| v)
                .sum()
        })
}

fn value(families: &BTreeMap<String, Family>, family: &str, labels: &[(&str, &str)]) -> f64 {
    families.get(family).map_or(0.0, |f| {
        f.samples
            .iter()
            .filter(|(_, l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_strictly_and_match_the_readme() {
    let kafka = Kafka::start().await;
    kafka.create_topic("orders", 3).await;
    kafka.create_topic("payments", 2).await;
    kafka.create_topic("dead", 1).await;
    let checker = Checker::start(Duration::from_millis(1), None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("leasehold.toml");
    // Two sources, five partitions: each name must still be one family.
    std::fs::write(
        &config,
        format!(
            "handler = \"{handler}\"\n\
             [[kafka]]\nname = \"orders\"\nbrokers = \"{brokers}\"\ntopics = [\"orders\"]\nkey = \"json:/account\"\ndlq_topic = \"dead\"\n\
             [[kafka]]\nname = \"payments\"\nbrokers = \"{brokers}\"\ntopics = [\"payments\"]\nkey = \"json:/account\"\ndlq_topic = \"dead\"\n",
            handler = checker.handler_flag(),
            brokers = kafka.brokers()
        ),
    )
    .unwrap();
    // The HTTP gateway on (an ephemeral port each), so its metrics are exported too.
    let cluster = Cluster::start(
        3,
        &[
            "--config",
            config.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    cluster.wait_balanced(Duration::from_secs(20)).await;

    let values: Vec<Vec<u8>> = (0..60)
        .map(|i| format!(r#"{{"account":"acct-{}"}}"#, i % 12).into_bytes())
        .collect();
    // Spread over every partition explicitly: keyless records sent at once would all go
    // to one partition (librdkafka's sticky partitioner), leaving the others without
    // series.
    let producer = kafka.producer();
    for (topic, values, partitions) in [("orders", &values[..], 3), ("payments", &values[..20], 2)]
    {
        for (i, v) in values.iter().enumerate() {
            let record = rdkafka::producer::FutureRecord::<(), [u8]>::to(topic)
                .partition(i as i32 % partitions)
                .payload(&v[..]);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }
    // gRPC calls entering one instance: some run there, the rest are forwarded.
    let mut client = cluster.instances[0].client().await;
    for n in 0..30 {
        client
            .call(CallRequest {
                key: format!("k{n}"),
                payload: "p".into(),
            })
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(60), "both sources handled", || {
        let handled = |source: &str| -> f64 {
            cluster
                .instances
                .iter()
                .map(|i| {
                    let (_, text) = scrape(i);
                    let f = openmetrics::parse(&text).unwrap();
                    value(&f, "leasehold_kafka_handled", &[("source", source)])
                })
                .sum()
        };
        (handled("orders") >= 60.0 && handled("payments") >= 20.0).then_some(())
    })
    .await;

    // Scraped once the forwards sent and received agree, and the calls counted per shard
    // and by the handler: a record handled twice after a late rebalance of the group may
    // still be on its way between two instances, or running.
    let scrapes = wait_until(
        Duration::from_secs(20),
        "forwards sent and received to agree",
        || {
            let scrapes: Vec<_> = cluster
                .instances
                .iter()
                .map(|i| {
                    let (content_type, text) = scrape(i);
                    assert!(
                        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
                        "content type {content_type}"
                    );
                    openmetrics::parse(&text)
                        .unwrap_or_else(|e| panic!("{} exports invalid metrics: {e}\n{text}", i.id))
                })
                .collect();
            let total = |family: &str, labels: &[(&str, &str)]| -> f64 {
                scrapes.iter().map(|f| value(f, family, labels)).sum()
            };
            let received = total(
                "leasehold_grpc_requests",
                &[
                    ("plane", "peer"),
                    ("method", "/leasehold.v1.Peer/Forward"),
                    ("code", "OK"),
                ],
            ) + total("leasehold_peer_stream_calls", &[]);
            let handler_calls: f64 = scrapes.iter().map(handler_calls).sum();
            (received == total("leasehold_forwards", &[])
                && total("leasehold_shard_calls", &[]) == handler_calls)
                .then_some(scrapes)
        },
    )
    .await;
    let mut emitted = BTreeSet::new();
    for families in &scrapes {
        for (name, f) in families {
            emitted.insert(sample_name(name, f));
        }
    }

    // The README's table and the exports agree, both ways.
    let documented = documented();
    let undocumented: Vec<_> = emitted.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in README: {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .difference(&emitted)
        .filter(|n| *n != "leasehold_tls_certificate_expiry_seconds") // with TLS only
        .filter(|n| *n != "leasehold_kafka_reading_standby") // with Kafka failover only
        .collect();
    assert!(
        missing.is_empty(),
        "in README but not exported: {missing:?}"
    );

    // The values say what the cluster is doing.
    let total = |family: &str, labels: &[(&str, &str)]| -> f64 {
        scrapes.iter().map(|f| value(f, family, labels)).sum()
    };
    assert_eq!(total("leasehold_is_leader", &[]), 1.0, "exactly one leader");
    assert_eq!(total("leasehold_unowned_shards", &[]), 0.0);
    assert_eq!(total("leasehold_ready", &[]), 3.0);
    assert_eq!(total("leasehold_shards_owned", &[]), 1024.0);
    assert_eq!(total("leasehold_build_info", &[("hash_version", "1")]), 3.0);
    let version = value(&scrapes[0], "leasehold_assignment_version", &[]);
    assert!(version >= 1.0, "assignment version {version}");
    assert_eq!(
        value(
            &scrapes[0],
            "leasehold_grpc_requests",
            &[
                ("plane", "client"),
                ("method", "/leasehold.v1.Entities/Call"),
                ("code", "OK")
            ]
        ),
        30.0
    );
    let forwarded = value(&scrapes[0], "leasehold_forwards", &[]);
    assert!(forwarded > 0.0, "no call was forwarded");
    // Every forward (gRPC call or Kafka record) is a message on a Dispatch stream or, for
    // the first gRPC calls to a peer (before its stream's answer headers came), a unary
    // Peer/Forward.
    assert_eq!(
        total(
            "leasehold_grpc_requests",
            &[
                ("plane", "peer"),
                ("method", "/leasehold.v1.Peer/Forward"),
                ("code", "OK")
            ]
        ) + total("leasehold_peer_stream_calls", &[]),
        total("leasehold_forwards", &[]),
        "forwards sent and received disagree"
    );
    // Per-shard calls add up to the handler calls run.
    let handler_calls: f64 = scrapes.iter().map(handler_calls).sum();
    assert_eq!(total("leasehold_shard_calls", &[]), handler_calls);
    for (source, partitions) in [("orders", 3), ("payments", 2)] {
        let lags: BTreeSet<String> = scrapes
            .iter()
            // An instance that has no partition (yet) has no lag series at all.
            .flat_map(|f| {
                f.get("leasehold_kafka_lag")
                    .map(|l| l.samples.clone())
                    .unwrap_or_default()
            })
            .filter(|(_, l, _)| l["source"] == source)
            .map(|(_, l, _)| l["partition"].clone())
            .collect();
        assert_eq!(lags.len(), partitions, "{source}: lag series {lags:?}");
    }
    assert!(total("process_resident_memory_bytes", &[]) > 0.0);

    // /v1/kafka: any instance shows the group's position on every partition of both
    // sources; each partition is consumed by exactly one instance.
    let (orders_end, payments_end) = (
        kafka.end_offsets("orders", 3),
        kafka.end_offsets("payments", 2),
    );
    let last_seen = std::sync::Mutex::new(Vec::new());
    let waited = std::time::Instant::now();
    wait_until(Duration::from_secs(30), "/v1/kafka caught up", || {
        if waited.elapsed() > Duration::from_secs(28) {
            eprintln!("/v1/kafka answers so far: {:?}", last_seen.lock().unwrap());
        }
        last_seen.lock().unwrap().clear();
        let mut here: Vec<(String, u64)> = Vec::new();
        for i in &cluster.instances {
            let kafka = i.get("/v1/kafka")?;
            last_seen
                .lock()
                .unwrap()
                .push((i.id.clone(), kafka.clone()));
            let sources = kafka["sources"].as_array()?;
            if sources.len() != 2 {
                return None;
            }
            for s in sources {
                let want = match s["name"].as_str()? {
                    "orders" => &orders_end,
                    "payments" => &payments_end,
                    other => panic!("unexpected source {other}"),
                };
                let parts = s["partitions"].as_array()?;
                if parts.len() != want.len() {
                    return None;
                }
                for p in parts {
                    let n = p["partition"].as_u64()? as usize;
                    if p["end"].as_i64()? != want[n]
                        || p["committed"].as_i64()? != want[n]
                        || p["lag"].as_i64()? != 0
                    {
                        return None;
                    }
                    if p["here"].as_bool()? {
                        here.push((p["topic"].as_str()?.to_owned(), n as u64));
                    }
                }
            }
        }
        here.sort();
        let each_once: Vec<(String, u64)> = [
            ("orders", 0),
            ("orders", 1),
            ("orders", 2),
            ("payments", 0),
            ("payments", 1),
        ]
        .iter()
        .map(|(t, p)| (t.to_string(), *p))
        .collect();
        (here == each_once).then_some(())
    })
    .await;
    assert!(
        checker.violations().is_empty(),
        "{:?}",
        checker.violations()
    );
}

/// The status page in a real browser: the shard map, members and owners match the admin
/// API, and a drain shows on the open page without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_shows_the_cluster_and_follows_a_drain() {
    use leasehold_integration_tests::browser::Browser;

    let checker = Checker::start(Duration::from_millis(1), None).await;
    let flag = checker.handler_flag();
    let cluster = Cluster::start(3, &["--handler", &flag]).await;
    cluster.wait_balanced(Duration::from_secs(20)).await;
    let n0 = &cluster.instances[0];

    let browser = Browser::start(1366, 900).await;
    browser.open(&format!("{}/", n0.admin_url()));
    browser
        .wait_for(
            Duration::from_secs(20),
            "the page's first refreshes",
            "return Number(document.body.dataset.updated || 0) >= 2 && \
             document.querySelectorAll('#shard-map .shard').length === 1024",
        )
        .await;

    // Owners and members as the admin API reports them.
    let shards = n0.get("/v1/shards").unwrap();
    let owners: Vec<String> = shards["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["owner"].as_str().unwrap_or_default().to_owned())
        .collect();
    let page_owners: Vec<String> = serde_json::from_value(browser.eval(
        "return [...document.querySelectorAll('#shard-map .shard')] \
           .sort((a, b) => a.dataset.shard - b.dataset.shard).map(c => c.dataset.owner);",
    ))
    .unwrap();
    assert_eq!(page_owners, owners, "shard map differs from /v1/shards");
    let members: BTreeMap<String, u64> = serde_json::from_value(browser.eval(
        "return Object.fromEntries([...document.querySelectorAll('#members tr.member')] \
           .map(r => [r.dataset.member, Number(r.dataset.shards)]));",
    ))
    .unwrap();
    let api: BTreeMap<String, u64> = n0.get("/v1/members").unwrap()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["shards"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(members, api);
    let leader = browser.eval("return document.getElementById('leader').textContent.trim();");
    assert_eq!(leader, n0.get("/v1/cluster").unwrap()["leader"]);

    // A drain, watched on the open page.
    browser.eval("window.leaseholdMarker = 'same page'; return null;");
    let n2 = &cluster.instances[2];
    let drain = ureq::post(&format!("{}/v1/members/{}/drain", n2.admin_url(), n2.id)).call();
    assert!(drain.is_ok(), "drain: {drain:?}");
    browser
        .wait_for(
            Duration::from_secs(30),
            "the page to show n2 drained",
            &format!(
                "const row = document.querySelector('#members tr.member[data-member=\"{id}\"]'); \
                 return !!row && row.dataset.state === 'draining' && row.dataset.shards === '0' && \
                   document.querySelectorAll('#shard-map .shard[data-owner=\"{id}\"]').length === 0 && \
                   document.querySelectorAll('#moves li.move').length > 0;",
                id = n2.id
            ),
        )
        .await;
    assert_eq!(
        browser.eval("return window.leaseholdMarker || null;"),
        "same page",
        "the page reloaded"
    );
    // The picture for the README, mid-story: a member drained, its shards moved
    // (docs/status-page.png with LEASEHOLD_UPDATE_SCREENSHOTS=1).
    let png = browser.screenshot();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot of {} bytes",
        png.len()
    );
    let out = if std::env::var_os("LEASEHOLD_UPDATE_SCREENSHOTS").is_some() {
        std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/status-page.png"
        ))
    } else {
        std::env::temp_dir().join("leasehold-status-page.png")
    };
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot: {}", out.display());

    assert!(
        checker.violations().is_empty(),
        "{:?}",
        checker.violations()
    );
}

/// One trace across the cluster: a client's call entering a non-owner shows as the entry
/// instance's span, its forward, the owner's span and the handler call, and the handler
/// receives the trace context (and the allow-listed client metadata); a Kafka record's
/// `traceparent` header starts the same chain. Spans go to a real OTLP receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_follows_a_call_across_the_hop_into_the_handler() {
    use leasehold_integration_tests::otlp::Receiver;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;

    let receiver = Receiver::start().await;
    let kafka = Kafka::start().await;
    kafka.create_topic("orders", 2).await;
    let checker = Checker::start(Duration::from_millis(1), None).await;
    let flag = checker.handler_flag();
    let brokers = kafka.brokers();
    let cluster = Cluster::start(
        3,
        &[
            "--handler",
            &flag,
            "--otlp-endpoint",
            &receiver.endpoint,
            "--forward-metadata",
            "x-tenant",
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            "orders",
            "--kafka-key",
            "json:/account",
            "--kafka-on-failure",
            "skip",
        ],
    )
    .await;
    cluster.wait_balanced(Duration::from_secs(20)).await;
    let n0 = &cluster.instances[0];
    let mut client = n0.client().await;

    // A key another instance owns, so the call is forwarded.
    let mut key = None;
    for n in 0..100 {
        let k = format!("traced-{n}");
        let at = client
            .locate(leasehold_proto::v1::LocateRequest { key: k.clone() })
            .await
            .unwrap()
            .into_inner();
        if at.owner != n0.id {
            key = Some((k, at.owner));
            break;
        }
    }
    let (key, owner) = key.expect("some key is owned elsewhere");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(CallRequest {
        key: key.clone(),
        payload: "p".into(),
    });
    let m = request.metadata_mut();
    m.insert(
        "traceparent",
        format!("00-{trace}-{client_span}-01").parse().unwrap(),
    );
    m.insert("x-tenant", "acme".parse().unwrap());
    m.insert("x-private", "not forwarded".parse().unwrap());
    client.call(request).await.unwrap();

    let spans = wait_until(Duration::from_secs(30), "the call's spans", || {
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace)
            .collect();
        // Each instance exports in its own batches: wait for all four.
        let has = |instance: &str, name: &str| {
            spans
                .iter()
                .any(|s| s.instance == instance && s.name == name)
        };
        let done = has(&n0.id, "leasehold.v1.Entities/Call")
            && has(&n0.id, "forward")
            && has(&owner, "forwarded call")
            && has(&owner, "handler");
        done.then_some(spans)
    })
    .await;
    let find = |instance: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.instance == instance && s.name == name)
            .unwrap_or_else(|| panic!("no {name} span from {instance} in {spans:#?}"))
            .clone()
    };
    let entry = find(&n0.id, "leasehold.v1.Entities/Call");
    assert_eq!(
        entry.parent_span_id, client_span,
        "the entry continues the client's trace"
    );
    assert_eq!(entry.kind, 2, "server");
    let forward = find(&n0.id, "forward");
    assert_eq!(forward.parent_span_id, entry.span_id);
    assert_eq!(forward.kind, 3, "client");
    let at_owner = find(&owner, "forwarded call");
    assert_eq!(
        at_owner.parent_span_id, forward.span_id,
        "the owner continues the forward"
    );
    let handler = find(&owner, "handler");
    assert_eq!(handler.parent_span_id, at_owner.span_id);

    // The handler got the trace context naming the owner's handler span, and only the
    // allow-listed client metadata.
    let received = checker.state.lock().unwrap().metadata[&key].clone();
    let get = |k: &str| {
        received
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        get("traceparent"),
        Some(format!("00-{trace}-{}-01", handler.span_id))
    );
    assert_eq!(get("x-tenant").as_deref(), Some("acme"));
    assert_eq!(get("x-private"), None);

    // A Kafka record's traceparent header starts the chain the same way.
    let kafka_trace = "0af7651916cd43dd8448eb211c80319c";
    let producer_span = "b7ad6b7169203331";
    kafka
        .producer()
        .send(
            FutureRecord::<(), _>::to("orders")
                .payload(r#"{"account":"traced-kafka"}"#)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(&format!("00-{kafka_trace}-{producer_span}-01")),
                })),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let kafka_spans = wait_until(Duration::from_secs(30), "the record's spans", || {
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == kafka_trace)
            .collect();
        let has = |name: &str| spans.iter().any(|s| s.name == name);
        (has("kafka record") && has("handler")).then_some(spans)
    })
    .await;
    let record = kafka_spans
        .iter()
        .find(|s| s.name == "kafka record")
        .unwrap_or_else(|| panic!("no kafka record span: {kafka_spans:#?}"));
    assert_eq!(
        record.parent_span_id, producer_span,
        "the record continues the producer's span"
    );
    assert_eq!(record.kind, 5, "consumer");
    let handler_span = kafka_spans.iter().find(|s| s.name == "handler").unwrap();
    let received = checker.state.lock().unwrap().metadata["traced-kafka"].clone();
    assert!(
        received.contains(&(
            "traceparent".into(),
            format!("00-{kafka_trace}-{}-01", handler_span.span_id)
        )),
        "{received:?}"
    );
    assert!(
        checker.violations().is_empty(),
        "{:?}",
        checker.violations()
    );
}
