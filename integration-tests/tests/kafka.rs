//! Kafka ingestion scenarios: a real Apache Kafka broker (KRaft), a real etcd and real
//! `leasehold` processes.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use leasehold_integration_tests::checker::Checker;
use leasehold_integration_tests::kafka::{Kafka, Record as DeadLetter};
use leasehold_integration_tests::{wait_until, Cluster, Instance, InstanceSpec};

/// `n` JSON messages over `keys` accounts, each with a per-account sequence number.
fn messages(n: usize, keys: usize, start: usize) -> Vec<Vec<u8>> {
    (start..start + n)
        .map(|i| {
            format!(
                r#"{{"account":"acct-{}","seq":{},"amount":1}}"#,
                i % keys,
                i / keys
            )
            .into_bytes()
        })
        .collect()
}

/// Distinct (partition, offset) handled so far.
fn handled(checker: &Checker) -> usize {
    checker.state.lock().unwrap().kafka_distinct.len()
}

/// For every cluster (empty without failover), key and partition, messages were handled
/// for the first time in offset order.
fn assert_first_handling_in_offset_order(checker: &Checker) {
    let state = checker.state.lock().unwrap();
    let mut seen = BTreeSet::new();
    let mut last: HashMap<(String, String, i32), i64> = HashMap::new();
    for ((key, partition, offset, _), cluster) in state.kafka.iter().zip(&state.kafka_clusters) {
        if !seen.insert((cluster.clone(), *partition, *offset)) {
            continue; // a repeat (at-least-once) is allowed
        }
        if let Some(prev) = last.insert((cluster.clone(), key.clone(), *partition), *offset) {
            assert!(
                prev < *offset,
                "{cluster} key {key} partition {partition}: offset {offset} first handled after {prev}"
            );
        }
    }
}

/// A source on `topic` whose messages that cannot be handled go to `dlq` (which the test
/// creates; every source needs one, or an explicit skip policy).
fn source_args<'a>(
    kafka: &'a str,
    topic: &'a str,
    group: &'a str,
    handler: &'a str,
    dlq: &'a str,
) -> Vec<&'a str> {
    vec![
        "--kafka-dlq-topic",
        dlq,
        "--lease-ttl",
        "3s",
        "--request-timeout",
        "10s",
        "--handler",
        handler,
        "--kafka-brokers",
        kafka,
        "--kafka-topic",
        topic,
        "--kafka-group",
        group,
        "--kafka-key",
        "json:/account",
        // A killed consumer's partitions move after this long (the broker's minimum).
        "--kafka-property",
        "session.timeout.ms=6000",
        "--kafka-property",
        "heartbeat.interval.ms=1000",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn null_keyed_messages_keep_per_key_order_past_the_partition_count() {
    let kafka = Kafka::start().await;
    kafka.create_topic("payments", 6).await;
    kafka.create_topic("payments-dlq", 1).await;
    let checker = Checker::start(Duration::ZERO, None).await;
    let brokers = kafka.brokers();
    let handler = checker.handler_flag();
    let mut cluster = Cluster::start(
        3,
        &source_args(&brokers, "payments", "ledger", &handler, "payments-dlq"),
    )
    .await;
    cluster.wait_balanced(Duration::from_secs(10)).await;

    let started = Instant::now();
    kafka.produce("payments", &messages(50_000, 1000, 0)).await;
    wait_until(
        Duration::from_secs(120),
        "50 000 messages handled by 3 instances",
        || (handled(&checker) >= 50_000).then_some(()),
    )
    .await;
    eprintln!("3 instances: 50 000 messages in {:?}", started.elapsed());

    // Scale past the partition count: 8 instances, 6 partitions.
    for i in 3..8 {
        cluster.add(&format!("n{i}"));
    }
    cluster.wait_balanced(Duration::from_secs(20)).await;
    let second = checker.state.lock().unwrap().kafka.len();
    let started = Instant::now();
    kafka
        .produce("payments", &messages(50_000, 1000, 50_000))
        .await;
    wait_until(Duration::from_secs(120), "100 000 messages handled", || {
        (handled(&checker) >= 100_000).then_some(())
    })
    .await;
    eprintln!("8 instances: 50 000 messages in {:?}", started.elapsed());

    // Messages for keys owned elsewhere travel over the peers' Dispatch streams.
    let streamed: f64 = cluster
        .instances
        .iter()
        .filter_map(|i| {
            ureq::get(&format!("{}/metrics", i.admin_url()))
                .call()
                .ok()?
                .into_string()
                .ok()
        })
        .flat_map(|t| {
            t.lines()
                .filter(|l| l.starts_with("leasehold_peer_stream_calls_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(
        streamed > 10_000.0,
        "only {streamed} calls over dispatch streams"
    );
    let owners: BTreeSet<String> = checker.state.lock().unwrap().kafka[second..]
        .iter()
        .map(|c| c.3.clone())
        .collect();
    assert_eq!(
        owners.len(),
        8,
        "instances that ran handlers after scaling: {owners:?}"
    );
    assert_eq!(handled(&checker), 100_000);
    assert_first_handling_in_offset_order(&checker);
    assert_eq!(checker.violations(), Vec::<String>::new());
    let end = kafka.end_offsets("payments", 6);
    assert_eq!(end.iter().sum::<i64>(), 100_000);
    kafka
        .wait_committed_to_end("ledger", "payments", 6, Duration::from_secs(15))
        .await;
}

/// A consumer's first assignment, with a backlog waiting and the assign callback held up
/// (a failpoint) once the assignment took effect: fetching starts meanwhile, and none of
/// the fetched messages may reach a second reader of the partition, or its keys'
/// messages start out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_assignment_with_a_backlog_keeps_per_key_order_however_late_the_callback_ends() {
    let kafka = Kafka::start().await;
    kafka.create_topic("backlog", 2).await;
    kafka.create_topic("backlog-dlq", 1).await;
    let checker = Checker::start(Duration::ZERO, None).await;
    // Few keys and many messages each: two readers of a partition interleave them.
    kafka.produce("backlog", &messages(20_000, 10, 0)).await;
    let (brokers, handler) = (kafka.brokers(), checker.handler_flag());
    let args = source_args(
        &brokers,
        "backlog",
        "late-callback",
        &handler,
        "backlog-dlq",
    );
    let mut cluster = Cluster {
        etcd: leasehold_integration_tests::Etcd::start().await,
        instances: Vec::new(),
        args: args.iter().map(|a| a.to_string()).collect(),
    };
    let spec = InstanceSpec {
        id: "n0".into(),
        etcd: cluster.etcd.endpoint(),
        args: cluster.args.clone(),
    };
    cluster.instances.push(Instance::start_with_env(
        &spec,
        &[("FAILPOINT_KAFKA_AFTER_ASSIGN_MS", "2000")],
    ));
    wait_until(Duration::from_secs(120), "20 000 messages handled", || {
        (handled(&checker) >= 20_000).then_some(())
    })
    .await;
    // The failpoint held the callback (a debug build of the binary).
    assert!(
        cluster.instances[0]
            .log_text()
            .contains("failpoint: holding the assign callback"),
        "the failpoint did not fire; a release build ignores it"
    );
    assert_first_handling_in_offset_order(&checker);
    assert_eq!(checker.violations(), Vec::<String>::new());
    let metrics = scrape_all(&cluster);
    let misrouted: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("leasehold_kafka_misrouted_messages_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    assert_eq!(
        misrouted,
        [0.0],
        "messages that reached the consumer's queue"
    );
    kafka
        .wait_committed_to_end("late-callback", "backlog", 2, Duration::from_secs(15))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_with_reasons_and_nothing_stalls() {
    let kafka = Kafka::start().await;
    kafka.create_topic("orders", 3).await;
    // Takes records of at most 4 KB: a larger poison message is dead-lettered without
    // its payload instead of holding its partition for good.
    kafka
        .create_topic_with("orders-dlq", 1, &[("max.message.bytes", "4096")])
        .await;
    // The handler refuses every key starting with "poison".
    let checker = Checker::start(Duration::ZERO, Some("poison")).await;
    let brokers = kafka.brokers();
    let handler = checker.handler_flag();
    let args = source_args(&brokers, "orders", "orders-app", &handler, "orders-dlq");
    let cluster = Cluster::start(2, &args).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;

    let mut values = messages(3000, 100, 0);
    values.insert(10, b"not json at all".to_vec());
    values.insert(500, br#"{"customer":"no account field"}"#.to_vec());
    values.insert(1500, br#"{"account":""}"#.to_vec());
    for i in 0..5 {
        values.insert(
            2000 + i,
            format!(r#"{{"account":"poison-{i}","seq":0}}"#).into_bytes(),
        );
    }
    let big = format!(
        r#"{{"account":"poison-big","seq":0,"pad":"{}"}}"#,
        "x".repeat(20_000)
    );
    values.insert(2500, big.into_bytes());
    kafka.produce("orders", &values).await;

    let dlq = kafka.read_all("orders-dlq", 9, Duration::from_secs(60));
    let reasons = dead_letter_reasons(&dlq);
    assert_eq!(dlq.len(), 9, "dead letters: {reasons:?}");
    // The one too large for the dead-letter topic: without its payload, saying why.
    let (whole, omitted): (Vec<DeadLetter>, Vec<DeadLetter>) = dlq
        .into_iter()
        .partition(|(_, _, _, h)| !h.iter().any(|(k, _)| k == "leasehold.payload-omitted"));
    assert_eq!(omitted.len(), 1, "{reasons:?}");
    let (_, _, value, headers) = &omitted[0];
    assert!(value.is_empty(), "{} bytes kept", value.len());
    let why = headers
        .iter()
        .find(|(k, _)| k == "leasehold.payload-omitted")
        .map(|(_, v)| v.as_str())
        .unwrap();
    assert!(
        why.contains("more than the dead-letter topic takes"),
        "{why}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "leasehold.reason" && v.contains("poison-big")),
        "{headers:?}"
    );
    let dlq = whole;
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("/account not found")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("empty")), "{reasons:?}");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("handler failed") && r.contains("checker refuses key poison"))
            .count(),
        6,
        "{reasons:?}"
    );
    assert_dead_letters_name_their_source(&dlq, "orders");
    // Everything else was handled, and the group committed to the end: nothing stalled.
    wait_until(
        Duration::from_secs(60),
        "3000 good messages handled",
        || {
            let s = checker.state.lock().unwrap();
            let good: BTreeSet<(i32, i64)> = s
                .kafka
                .iter()
                .filter(|c| !c.0.starts_with("poison"))
                .map(|c| (c.1, c.2))
                .collect();
            (good.len() >= 3000).then_some(())
        },
    )
    .await;
    // Past the poison: committed to the end.
    kafka
        .wait_committed_to_end("orders-app", "orders", 3, Duration::from_secs(15))
        .await;
    // Metrics: dead letters counted, and lag drops to 0 once everything is done.
    wait_until(Duration::from_secs(20), "lag metrics at 0", || {
        let text = scrape_all(&cluster);
        let lags = kafka_lags(&text);
        let dead: f64 = text
            .lines()
            .filter(|l| l.starts_with("leasehold_kafka_dead_lettered_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let partitions: BTreeSet<&str> = lags.iter().map(|(p, _)| p.as_str()).collect();
        (partitions.len() == 3 && lags.iter().all(|(_, l)| *l == 0.0) && dead == 9.0).then_some(())
    })
    .await;
    assert_first_handling_in_offset_order(&checker);
}

/// The `leasehold.reason` header of each dead letter.
fn dead_letter_reasons(dlq: &[DeadLetter]) -> Vec<String> {
    dlq.iter()
        .map(|(_, _, _, h)| {
            h.iter()
                .find(|(k, _)| k == "leasehold.reason")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// Each dead letter keeps its value and says where it came from.
fn assert_dead_letters_name_their_source(dlq: &[DeadLetter], topic: &str) {
    for (_, _, value, headers) in dlq {
        let h: HashMap<&str, &str> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(h.get("leasehold.source.topic"), Some(&topic));
        assert!(
            h.contains_key("leasehold.source.partition")
                && h.contains_key("leasehold.source.offset"),
            "{h:?}"
        );
        assert!(!value.is_empty(), "dead letter lost its value");
    }
}

/// `/metrics` of every instance, concatenated.
fn scrape_all(cluster: &Cluster) -> String {
    cluster
        .instances
        .iter()
        .map(|i| {
            ureq::get(&format!("{}/metrics", i.admin_url()))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .unwrap_or_default()
        })
        .collect()
}

/// (partition, lag) of every `leasehold_kafka_lag` series; an instance that lost a
/// partition reports 0 for it.
fn kafka_lags(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("leasehold_kafka_lag{"))
        .filter_map(|l| {
            let partition = l
                .split("partition=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_owned();
            Some((partition, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// Produces `total` messages in batches over a while, in the background.
fn produce_slowly(
    kafka: &Kafka,
    topic: &'static str,
    total: usize,
    batch: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let producer = kafka.producer();
    tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let values = messages(batch.min(total - sent), 500, sent);
            leasehold_integration_tests::kafka::send_all(&producer, topic, &values).await;
            sent += values.len();
            tokio::time::sleep(pause).await;
        }
    })
}

/// Committed offsets never pass a message that was not handled: read the commits first,
/// then what was handled (which only grows), and compare.
fn assert_commits_cover_only_handled(
    kafka: &Kafka,
    checker: &Checker,
    group: &str,
    topic: &str,
    partitions: i32,
) {
    let committed = kafka.committed(group, topic, partitions);
    let done = checker.state.lock().unwrap().kafka_distinct.clone();
    for (p, c) in committed.iter().enumerate() {
        for o in 0..*c {
            assert!(
                done.contains(&(p as i32, o)),
                "partition {p}: committed {c} but offset {o} was never handled"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_and_terminated_instances_lose_nothing_and_commit_only_handled_offsets() {
    let kafka = Kafka::start().await;
    kafka.create_topic("events", 6).await;
    kafka.create_topic("events-dlq", 1).await;
    let checker = Checker::start(Duration::from_millis(1), None).await;
    let brokers = kafka.brokers();
    let handler = checker.handler_flag();
    let mut args = source_args(&brokers, "events", "projector", &handler, "events-dlq");
    args.extend(["--drain-timeout", "5s"]);
    let mut cluster = Cluster::start(3, &args).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;

    let total = 30_000;
    let producer = produce_slowly(&kafka, "events", total, 1000, Duration::from_millis(300));
    wait_until(Duration::from_secs(60), "consumption under way", || {
        (handled(&checker) > 5000).then_some(())
    })
    .await;
    assert_commits_cover_only_handled(&kafka, &checker, "projector", "events", 6);

    let t0 = Instant::now();
    cluster.instances[2].signal("KILL");
    cluster.instances[1].signal("TERM");
    let code = cluster.instances[1]
        .wait_exit(Duration::from_secs(30))
        .await;
    assert_eq!(code, Some(0), "SIGTERM exit");
    let _ = cluster.instances[2].wait_exit(Duration::from_secs(5)).await;
    assert_commits_cover_only_handled(&kafka, &checker, "projector", "events", 6);
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("n1 exited after {:?}", t0.elapsed());
    cluster.restart(1);
    cluster.restart(2);
    producer.await.unwrap();
    eprintln!(
        "producer done after {:?}; handled {}",
        t0.elapsed(),
        handled(&checker)
    );

    wait_until(Duration::from_secs(120), "every message handled", || {
        (handled(&checker) >= total).then_some(())
    })
    .await;
    assert_commits_cover_only_handled(&kafka, &checker, "projector", "events", 6);
    assert_first_handling_in_offset_order(&checker);
    assert_eq!(checker.violations(), Vec::<String>::new());
    kafka
        .wait_committed_to_end("projector", "events", 6, Duration::from_secs(20))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_mid_stream_loses_nothing() {
    let mut kafka = Kafka::start().await;
    kafka.create_topic("ticks", 3).await;
    kafka.create_topic("ticks-dlq", 1).await;
    let checker = Checker::start(Duration::ZERO, None).await;
    let brokers = kafka.brokers();
    let handler = checker.handler_flag();
    let cluster = Cluster::start(
        2,
        &source_args(&brokers, "ticks", "ticker", &handler, "ticks-dlq"),
    )
    .await;
    cluster.wait_balanced(Duration::from_secs(10)).await;

    kafka.produce("ticks", &messages(5000, 200, 0)).await;
    wait_until(Duration::from_secs(60), "first half handled", || {
        (handled(&checker) >= 5000).then_some(())
    })
    .await;
    // The producer keeps writing into its buffer while the broker is down.
    let producer = produce_slowly(&kafka, "ticks", 5000, 500, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_millis(500)).await;
    kafka.stop();
    tokio::time::sleep(Duration::from_secs(20)).await;
    kafka.restart().await;
    producer.await.unwrap();
    // produce_slowly numbers its messages from 0 again; 10 000 distinct offsets in all.
    wait_until(
        Duration::from_secs(120),
        "every message handled after the outage",
        || (handled(&checker) >= 10_000).then_some(()),
    )
    .await;
    assert_first_handling_in_offset_order(&checker);
    let end = kafka.end_offsets("ticks", 3);
    assert_eq!(end.iter().sum::<i64>(), 10_000);
    // After the outage the group rebalances more than once; commits follow within a
    // few commit intervals of the last one.
    let t = Instant::now();
    let mut committed = kafka.position("ticker", "ticks", 3);
    while committed != end && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        committed = kafka.position("ticker", "ticks", 3);
    }
    if committed != end {
        for i in &cluster.instances {
            let log = i.log_text();
            let kafka_lines: Vec<&str> = log.lines().filter(|l| l.contains("kafka")).collect();
            let tail = &kafka_lines[kafka_lines.len().saturating_sub(40)..];
            eprintln!("--- {} (Kafka lines, last 40)\n{}", i.id, tail.join("\n"));
        }
        panic!("committed {committed:?}, end {end:?} after 60 s");
    }
}

/// Hole 6: a message that has not reached a handler yet (no owner, handler down) is
/// waited for; it used to count as a handler failure and be dead-lettered within seconds,
/// after which later messages for its key ran first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_wait_for_an_owner_and_a_handler_instead_of_being_dead_lettered() {
    let kafka = Kafka::start().await;
    kafka.create_topic("orders", 3).await;
    kafka.create_topic("orders-dlq", 1).await;
    let port = leasehold_integration_tests::free_port();
    let handler = format!("grpc://127.0.0.1:{port}");
    let brokers = kafka.brokers();
    let mut args = source_args(&brokers, "orders", "orders-app", &handler, "orders-dlq");
    // Short deadlines: every dispatch attempt ends within a second while nobody can run it.
    let at = args.iter().position(|a| *a == "10s").unwrap();
    args[at] = "1s";
    let cluster = Cluster::start(2, &args).await;
    kafka.produce("orders", &messages(600, 30, 0)).await;
    // Longer than every retry and backoff of the dead-letter path together.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        kafka
            .read_all("orders-dlq", 1, Duration::from_secs(2))
            .is_empty(),
        "messages were dead-lettered while no handler could run them"
    );
    let checker = Checker::start_on(port, Duration::ZERO, None).await;
    cluster.wait_balanced(Duration::from_secs(15)).await;
    wait_until(Duration::from_secs(60), "600 messages handled", || {
        (handled(&checker) == 600).then_some(())
    })
    .await;
    assert_first_handling_in_offset_order(&checker);
    assert_eq!(checker.violations(), Vec::<String>::new());
    assert!(kafka
        .read_all("orders-dlq", 1, Duration::from_secs(2))
        .is_empty());
    let metrics = ureq::get(&format!("{}/metrics", cluster.instances[0].admin_url()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("leasehold_kafka_routing_waits_total") && !l.ends_with(" 0")),
        "no routing wait counted"
    );
}

/// Hole 9: a partition at its in-flight limit used to block the single consumer loop,
/// so every other partition (and the group's rebalances) waited for it. Then it was
/// paused, and a paused partition is fetched again up to a second after it is resumed;
/// now it is read from its own queue only as fast as it gets room, and never paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_partition_waits_without_pausing_and_the_others_go_on() {
    use rdkafka::producer::FutureRecord;

    let kafka = Kafka::start().await;
    kafka.create_topic("events", 2).await;
    kafka.create_topic("events-dlq", 1).await;
    // Each call takes 30 ms; partition 0 may have one message in flight at a time.
    let checker = Checker::start(Duration::from_millis(30), None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("leasehold.toml");
    std::fs::write(
        &config,
        format!(
            "lease_ttl = \"3s\"\nhandler = \"{}\"\n[[kafka]]\nbrokers = \"{}\"\ntopics = [\"events\"]\n\
             group = \"projector\"\nkey = \"json:/account\"\ndlq_topic = \"events-dlq\"\n\
             max_in_flight_per_partition = 1\n",
            checker.handler_flag(),
            kafka.brokers()
        ),
    )
    .unwrap();
    let cluster = Cluster::start(1, &["--config", config.to_str().unwrap()]).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let producer = kafka.producer();
    // Partition 0's backlog takes 3.6 s one at a time: partition 1's five messages are
    // sent, fetched and handled well within its first half even on a slow machine.
    let values = messages(120, 120, 0);
    for (partition, values) in [(0, &values[..]), (1, &values[..5])] {
        if partition == 1 {
            // Partition 0's backlog is already read by the consumer and being worked
            // through one at a time when partition 1's messages arrive behind it.
            wait_until(Duration::from_secs(30), "partition 0 under way", || {
                (handled(&checker) >= 2).then_some(())
            })
            .await;
        }
        for v in values {
            producer
                .send(
                    FutureRecord::<(), _>::to("events")
                        .partition(partition)
                        .payload(v),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    // Sampled while partition 0's backlog is worked through one message at a time.
    let mut most_paused = 0.0f64;
    wait_until(Duration::from_secs(60), "125 messages handled", || {
        let paused = scrape_all(&cluster)
            .lines()
            .filter(|l| l.starts_with("leasehold_kafka_paused_partitions{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        most_paused = most_paused.max(paused);
        (handled(&checker) == 125).then_some(())
    })
    .await;
    assert_eq!(
        most_paused, 0.0,
        "a partition was paused at its in-flight limit"
    );
    let order: Vec<i32> = checker
        .state
        .lock()
        .unwrap()
        .kafka
        .iter()
        .map(|k| k.1)
        .collect();
    let last_of_1 = order.iter().rposition(|&p| p == 1).unwrap();
    let before = order[..last_of_1].iter().filter(|&&p| p == 0).count();
    eprintln!("partition 0 messages handled before partition 1 was done: {before} of 120");
    assert!(
        before < 60,
        "partition 1 waited for partition 0: {before} of its messages ran first"
    );
}

/// Hole 7: when a partition moves to another instance, its messages still queued here
/// (behind their key's previous message) used to be dispatched once anyway, interleaving
/// stale copies with the new assignee's re-reading. Now at most the messages already
/// dispatched run: per key, offsets go back once (the new assignee restarting from the
/// watermark), not back and forth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_partitions_queued_messages_do_not_run() {
    use rdkafka::producer::FutureRecord;

    let kafka = Kafka::start().await;
    kafka.create_topic("ticks", 2).await;
    kafka.create_topic("ticks-dlq", 1).await;
    // One key per partition: every message waits for the previous one (50 ms each).
    let checker = Checker::start(Duration::from_millis(50), None).await;
    let brokers = kafka.brokers();
    let handler = checker.handler_flag();
    let args = source_args(&brokers, "ticks", "ticker", &handler, "ticks-dlq");
    let mut cluster = Cluster::start(1, &args).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let producer = kafka.producer();
    for partition in 0..2 {
        for seq in 0..100 {
            let v = format!(r#"{{"account":"p{partition}","seq":{seq}}}"#);
            producer
                .send(
                    FutureRecord::<(), _>::to("ticks")
                        .partition(partition)
                        .payload(&v),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    wait_until(
        Duration::from_secs(30),
        "the first 10 messages handled",
        || (handled(&checker) >= 10).then_some(()),
    )
    .await;
    // A second member joins: one partition (with ~90 messages queued here) moves to it.
    cluster.add("n1");
    cluster.wait_balanced(Duration::from_secs(20)).await;
    wait_until(Duration::from_secs(60), "200 messages handled", || {
        (handled(&checker) == 200).then_some(())
    })
    .await;
    let state = checker.state.lock().unwrap();
    for partition in 0..2 {
        let offsets: Vec<i64> = state
            .kafka
            .iter()
            .filter(|k| k.1 == partition)
            .map(|k| k.2)
            .collect();
        let back = offsets.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(
            back <= 2,
            "partition {partition}: offsets went back {back} times (stale copies ran): {offsets:?}"
        );
    }
    assert_eq!(state.violations, Vec::<String>::new());
}

/// A consumer whose partition another group member claimed since (it was cut off and the
/// group moved on) runs nothing more of it: its owner refuses the records (the claim
/// arrives through etcd, before any record of the new claimant), it abandons the
/// partition, and — as it is in fact still the assignee here — claims it again after a
/// session timeout and re-reads from its last stored watermark, losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_read_under_a_superseded_claim_of_their_partition_do_not_run() {
    let kafka = Kafka::start().await;
    kafka.create_topic("fenced", 1).await;
    kafka.create_topic("fenced-dlq", 1).await;
    let checker = Checker::start(Duration::ZERO, None).await;
    let brokers = kafka.brokers();
    let handler = checker.handler_flag();
    let args = source_args(&brokers, "fenced", "fencers", &handler, "fenced-dlq");
    let cluster = Cluster::start(1, &args).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    kafka.produce("fenced", &messages(20, 4, 0)).await;
    wait_until(
        Duration::from_secs(30),
        "the first 20 messages handled",
        || (handled(&checker) == 20).then_some(()),
    )
    .await;
    let first_claim = {
        let s = checker.state.lock().unwrap();
        assert!(
            s.kafka_fences
                .iter()
                .all(|&f| f > 0 && f == s.kafka_fences[0]),
            "every record carries the consumer's one claim: {:?}",
            s.kafka_fences
        );
        s.kafka_fences[0]
    };

    // A newer claim of the partition appears (as a new assignee's would; written
    // directly, with generation 0, so that the consumer — which is in fact still the
    // assignee — wins its claim back).
    let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint()], None)
        .await
        .unwrap();
    let key = "/leasehold/default/kafka-fences/fenced/0/fencers";
    let holder = leasehold_coord::claim_value(0, 0, &leasehold_types::MemberId::new("other"));
    let claimed = etcd.put(key, holder, None).await.unwrap();
    let newer = claimed.header().unwrap().revision() as u64;
    assert!(newer > first_claim);
    let before = checker.state.lock().unwrap().kafka.len();
    kafka.produce("fenced", &messages(20, 4, 20)).await;

    // Nothing runs under the old claim; after a session timeout (6 s) the consumer, still
    // the partition's assignee, claims it again and handles everything.
    wait_until(Duration::from_secs(60), "all 40 messages handled", || {
        (handled(&checker) == 40).then_some(())
    })
    .await;
    {
        let s = checker.state.lock().unwrap();
        let stale: Vec<(i64, u64)> = s.kafka[before..]
            .iter()
            .zip(&s.kafka_fences[before..])
            .filter(|(_, &f)| f < newer)
            .map(|(k, &f)| (k.2, f))
            .collect();
        assert_eq!(
            stale,
            vec![],
            "records ran under a superseded claim (offset, fence)"
        );
        assert_eq!(s.violations, Vec::<String>::new());
    }
    assert_first_handling_in_offset_order(&checker);
    let n0 = &cluster.instances[0];
    let log = n0.log_text();
    assert!(
        log.contains("partition claimed by another consumer"),
        "the consumer says why it stopped the partition"
    );
    assert!(
        log.contains("claiming it again"),
        "and that it claimed it again"
    );
    wait_until(
        Duration::from_secs(20),
        "offsets committed up to 40",
        || (kafka.committed("fencers", "fenced", 1) == vec![40]).then_some(()),
    )
    .await;
    let metrics = ureq::get(&format!("{}/metrics", n0.admin_url()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let fenced: f64 = metrics
        .lines()
        .find(|l| l.starts_with("leasehold_fenced_records_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(fenced >= 1.0, "owner counts refused records: {metrics}");
}

/// Waits (at most `within`) until `n` distinct records of `cluster` were handled.
async fn wait_handled_on(checker: &Checker, cluster: &str, n: usize, within: Duration, what: &str) {
    wait_until(within, what, || {
        (handled_on(checker, cluster).len() >= n).then_some(())
    })
    .await;
}

/// Distinct (partition, offset) handled so far from one cluster of a failover source.
fn handled_on(checker: &Checker, cluster: &str) -> BTreeSet<(i32, i64)> {
    let state = checker.state.lock().unwrap();
    state
        .kafka
        .iter()
        .zip(&state.kafka_clusters)
        .filter(|(_, c)| *c == cluster)
        .map(|((_, p, o, _), _)| (*p, *o))
        .collect()
}

/// The side a failover source reads, as `GET /v1/kafka/{source}` answers it.
fn side(instance: &leasehold_integration_tests::Instance) -> Option<serde_json::Value> {
    instance.get("/v1/kafka/pay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_reads_the_standby_cluster_only_while_the_primary_is_down() {
    let (mut primary, standby, checker) = two_clusters(None).await;
    let (_dir, config) = failover_setup(&checker, &primary, &standby);
    let cluster = Cluster::start(3, &["--config", &config]).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let n0 = &cluster.instances[0];

    // The primary is read; every member reports it reachable.
    primary.produce("pay", &messages(300, 30, 0)).await;
    wait_handled_on(
        &checker,
        "primary",
        300,
        Duration::from_secs(60),
        "the primary's records handled",
    )
    .await;
    let s = wait_until(Duration::from_secs(10), "three healthy reports", || {
        let s = side(n0)?;
        (s["health"].as_array()?.len() == 3
            && s["health"]
                .as_array()?
                .iter()
                .all(|h| h["primary_ok"] == true))
        .then_some(s)
    })
    .await;
    assert_eq!(s["active"], "primary", "{s}");
    // The standby already holds records (a mirror would): 60 from ten minutes ago —
    // before the overlap — then 60 from now, within it. Nothing reads them yet.
    let producer = standby.producer();
    let old_ts = (SystemTime::now() - Duration::from_secs(600))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for v in messages(60, 30, 1000) {
        let record: rdkafka::producer::FutureRecord<'_, (), [u8]> =
            rdkafka::producer::FutureRecord::to("pay")
                .payload(&v[..])
                .timestamp(old_ts);
        producer.send(record, Duration::from_secs(5)).await.unwrap();
    }
    let before_overlap = standby.end_offsets("pay", 3);
    standby.produce("pay", &messages(60, 30, 2000)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(handled_on(&checker, "standby").is_empty());

    // Partitions fenced so far (by the start-up rebalances): none may be after a switch.
    let fenced = |cluster: &Cluster| -> Vec<Vec<String>> {
        cluster
            .instances
            .iter()
            .map(|i| {
                i.log_text()
                    .lines()
                    .filter(|l| l.contains("partition claimed by another consumer"))
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    };
    let fenced_before = fenced(&cluster);

    // The primary goes down: the cluster switches to the standby within down_after plus
    // a few probes, and what is produced there is handled.
    primary.stop();
    let stopped = Instant::now();
    let s = wait_until(Duration::from_secs(30), "the switch to the standby", || {
        let s = side(n0)?;
        (s["active"] == "standby").then_some(s)
    })
    .await;
    eprintln!("switched after {:?}: {}", stopped.elapsed(), s["reason"]);
    assert!(s["reason"].as_str().unwrap().contains("unreachable"), "{s}");
    assert_eq!(s["manual"], false);
    // Every member reads the same side.
    for i in &cluster.instances {
        wait_until(
            Duration::from_secs(5),
            "every member sees the standby",
            || (side(i)?["active"] == "standby").then_some(()),
        )
        .await;
    }
    standby.produce("pay", &messages(300, 30, 300)).await;
    // Read from the overlap on: the 60 recent records and the 300 new ones, not the 60
    // from before it.
    wait_handled_on(
        &checker,
        "standby",
        360,
        Duration::from_secs(90),
        "the standby's records handled",
    )
    .await;
    let end = standby.end_offsets("pay", 3);
    let on_standby = handled_on(&checker, "standby");
    for (p, end) in end.iter().enumerate() {
        for o in 0..*end {
            let before = o < before_overlap[p];
            assert_eq!(
                on_standby.contains(&(p as i32, o)),
                !before,
                "standby {p}/{o} (before the overlap: {before})"
            );
        }
    }

    // The primary comes back: fail-back after fail_back_after, and its new records are
    // handled there.
    primary.restart().await;
    let back = Instant::now();
    let s = wait_until(
        Duration::from_secs(60),
        "the fail-back to the primary",
        || {
            let s = side(n0)?;
            (s["active"] == "primary").then_some(s)
        },
    )
    .await;
    eprintln!("failed back after {:?}: {}", back.elapsed(), s["reason"]);
    primary.produce("pay", &messages(300, 30, 600)).await;
    wait_handled_on(
        &checker,
        "primary",
        600,
        Duration::from_secs(90),
        "the primary's new records handled",
    )
    .await;
    assert_first_handling_in_offset_order(&checker);
    // Each switch starts a new epoch of claims: the new side's consumers (a fresh group
    // generation on the standby) are not fenced by the other side's older claims, which
    // would hold their partitions for a session timeout.
    assert_eq!(
        fenced(&cluster),
        fenced_before,
        "partitions fenced across a switch"
    );

    // An operator forces a side, then hands the choice back.
    let post = |path: &str, body: &str| admin_post(n0, path, body);
    let (code, answer) = post("/v1/kafka/pay/switch", r#"{"to": "standby"}"#);
    assert_eq!(
        (code, &answer["active"], &answer["manual"]),
        (200, &"standby".into(), &true.into()),
        "{answer}"
    );
    wait_until(Duration::from_secs(10), "the forced side seen", || {
        let s = side(n0)?;
        (s["active"] == "standby" && s["manual"] == true).then_some(())
    })
    .await;
    let (code, answer) = post("/v1/kafka/pay/switch", r#"{"to": "auto"}"#);
    assert_eq!((code, &answer["manual"]), (200, &false.into()), "{answer}");
    // Automatic again: the healthy primary wins back.
    wait_until(Duration::from_secs(30), "back to the primary", || {
        (side(n0)?["active"] == "primary").then_some(())
    })
    .await;
    let (code, _) = post("/v1/kafka/pay/switch", r#"{"to": "sideways"}"#);
    assert_eq!(code, 400);
    let (code, _) = post("/v1/kafka/nope/switch", r#"{"to": "standby"}"#);
    assert_eq!(code, 404);

    // The same controls over gRPC (Admin), on another instance.
    use leasehold_proto::v1 as pb;
    let mut admin = pb::admin_client::AdminClient::new(
        tonic::transport::Endpoint::from_shared(cluster.instances[1].admin_url())
            .unwrap()
            .connect_lazy(),
    );
    let read = admin
        .get_kafka_source(pb::GetKafkaSourceRequest { name: "pay".into() })
        .await
        .unwrap()
        .into_inner();
    let http = side(n0).unwrap();
    assert_eq!(
        (
            read.active.as_str(),
            read.manual,
            read.group.as_str(),
            read.health.len()
        ),
        ("primary", false, http["group"].as_str().unwrap(), 3),
        "{read:?} against {http}"
    );
    assert!(
        read.revision > 0 && read.health.iter().all(|h| h.primary_ok),
        "{read:?}"
    );
    let switch = |to: pb::KafkaSwitchTo| pb::SwitchKafkaSourceRequest {
        name: "pay".into(),
        to: to.into(),
    };
    let forced = admin
        .switch_kafka_source(switch(pb::KafkaSwitchTo::Standby))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (forced.active.as_str(), forced.manual),
        ("standby", true),
        "{forced:?}"
    );
    assert!(
        forced.revision > read.revision && forced.position_ms > 0,
        "{forced:?}"
    );
    wait_until(
        Duration::from_secs(10),
        "the side forced over gRPC seen",
        || {
            let s = side(n0)?;
            (s["active"] == "standby" && s["manual"] == true).then_some(())
        },
    )
    .await;
    let back = admin
        .switch_kafka_source(switch(pb::KafkaSwitchTo::Auto))
        .await
        .unwrap()
        .into_inner();
    assert!(!back.manual, "{back:?}");
    wait_until(
        Duration::from_secs(30),
        "back to the primary after gRPC",
        || (side(n0)?["active"] == "primary").then_some(()),
    )
    .await;
    let refused = admin
        .switch_kafka_source(switch(pb::KafkaSwitchTo::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let missing = admin
        .get_kafka_source(pb::GetKafkaSourceRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("\"pay\""), "{missing:?}");
}

/// A group that lagged further back than the overlap when the primary failed: each
/// partition of the standby is read from the first record the group had not finished
/// there, not from the failure minus the overlap, so no record it had not handled is
/// skipped — even after the group's session timeout revoked the partitions, before the
/// switch. A partition that had long been idle is read from its last record, and does
/// not drag the others back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_is_read_from_the_first_record_the_group_had_not_finished() {
    // Records of `stuck-…` accounts are refused and retried: they stay unfinished.
    let (mut primary, standby, checker) = two_clusters(Some("stuck")).await;
    let (_dir, config) = failover_setup(&checker, &primary, &standby);
    // The switch comes after the group's session timeout (6 s) revoked the partitions.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("overlap = \"30s\"", "overlap = \"1s\"")
        .replace("down_after = \"3s\"", "down_after = \"10s\"")
        .replace(
            "dlq_topic = \"pay-dlq\"\n",
            "dlq_topic = \"pay-dlq\"\nretry_attempts = 1000\n",
        );
    for setting in [
        "retry_attempts = 1000",
        "overlap = \"1s\"",
        "down_after = \"10s\"",
    ] {
        assert!(text.contains(setting), "{setting}");
    }
    std::fs::write(&config, text).unwrap();
    let cluster = Cluster::start(2, &["--config", &config]).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let n0 = &cluster.instances[0];

    // Partition 0: a record from two minutes ago that the handler keeps refusing, on both
    // clusters (as a mirror copies records, with their times); before it, on the standby
    // only, one from ten minutes ago. Partition 1: a record from an hour ago, handled;
    // before it, on the standby only, one from two hours ago.
    let ago = |secs: u64| {
        (SystemTime::now() - Duration::from_secs(secs))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let (older_ts, idle_ts, old_ts, stuck_ts) = (ago(7200), ago(3600), ago(600), ago(120));
    let send = |producer: rdkafka::producer::FutureProducer,
                partition: i32,
                account: &'static str,
                ts: i64| async move {
        let value = format!(r#"{{"account":"{account}","seq":0,"amount":1}}"#);
        let record: rdkafka::producer::FutureRecord<'_, (), str> =
            rdkafka::producer::FutureRecord::to("pay")
                .partition(partition)
                .payload(value.as_str())
                .timestamp(ts);
        producer.send(record, Duration::from_secs(5)).await.unwrap();
    };
    send(standby.producer(), 0, "acct-old", old_ts).await;
    send(standby.producer(), 0, "stuck-1", stuck_ts).await;
    send(standby.producer(), 1, "acct-older", older_ts).await;
    send(standby.producer(), 1, "acct-idle", idle_ts).await;
    send(primary.producer(), 0, "stuck-1", stuck_ts).await;
    send(primary.producer(), 1, "acct-idle", idle_ts).await;
    let called_on = |account: &str, cluster: &str| {
        let state = checker.state.lock().unwrap();
        state
            .kafka
            .iter()
            .zip(&state.kafka_clusters)
            .any(|((key, ..), c)| key == account && c == cluster)
    };
    wait_until(Duration::from_secs(60), "both records tried", || {
        (called_on("stuck-1", "primary") && called_on("acct-idle", "primary")).then_some(())
    })
    .await;
    // Their readers report them (every 5 s, then with the next health report).
    let reported = |partition: &str, at_most: i64| {
        side(n0).and_then(|s| {
            s["health"].as_array().map(|members| {
                members.iter().any(|h| {
                    h["first_unfinished_ms"]["pay"][partition]
                        .as_i64()
                        .is_some_and(|t| t <= at_most)
                })
            })
        }) == Some(true)
    };
    wait_until(
        Duration::from_secs(30),
        "reports of both partitions",
        || (reported("0", stuck_ts) && reported("1", idle_ts)).then_some(()),
    )
    .await;

    let revokes = || -> usize {
        cluster
            .instances
            .iter()
            .map(|i| i.log_text().matches("partitions revoked").count())
            .sum()
    };
    let revoked_before = revokes();
    primary.stop();
    let stopped = Instant::now();
    wait_until(Duration::from_secs(40), "the switch to the standby", || {
        (side(n0)?["active"] == "standby").then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() > Duration::from_secs(8),
        "switched after {:?}, before the session timeout",
        stopped.elapsed()
    );
    // What this checks: the consumers' partitions (and their times) were gone by then.
    assert!(
        revokes() > revoked_before,
        "the session timeout revoked no partition before the switch"
    );
    wait_until(
        Duration::from_secs(60),
        "both records read from the standby",
        || (called_on("stuck-1", "standby") && called_on("acct-idle", "standby")).then_some(()),
    )
    .await;
    assert_eq!(
        handled_on(&checker, "standby"),
        BTreeSet::from([(0, 1), (1, 1)]),
        "each partition is read from its own first unfinished record, the earlier ones not"
    );
}

/// Two Kafka clusters with the topic `pay` (3 partitions) and its dead-letter topic, and
/// the checker handler (refusing keys that start with `fail_prefix`).
async fn two_clusters(fail_prefix: Option<&str>) -> (Kafka, Kafka, Checker) {
    two_clusters_with(fail_prefix, Duration::ZERO).await
}

/// The same, with a handler taking `delay` per call.
async fn two_clusters_with(fail_prefix: Option<&str>, delay: Duration) -> (Kafka, Kafka, Checker) {
    let primary = Kafka::start().await;
    let standby = Kafka::start().await;
    for k in [&primary, &standby] {
        k.create_topic("pay", 3).await;
        k.create_topic("pay-dlq", 1).await;
    }
    (primary, standby, Checker::start(delay, fail_prefix).await)
}

/// A failover source's configuration for `checker`'s handler on the two clusters, in a
/// directory that lives as long as the returned handle.
fn failover_setup(
    checker: &Checker,
    primary: &Kafka,
    standby: &Kafka,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = failover_config(
        dir.path(),
        &checker.handler_flag(),
        &primary.brokers(),
        &standby.brokers(),
    );
    (dir, config)
}

/// Writes a failover source's configuration (primary and standby, `down_after` 3 s).
fn failover_config(dir: &std::path::Path, handler: &str, primary: &str, standby: &str) -> String {
    let config = dir.join("leasehold.toml");
    let props =
        "properties = { \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"1000\" }";
    std::fs::write(
        &config,
        format!(
            "lease_ttl = \"3s\"\nrequest_timeout = \"10s\"\nhandler = \"{handler}\"\n\
             [[kafka]]\nname = \"pay\"\nbrokers = \"{primary}\"\ntopics = [\"pay\"]\ngroup = \"payments\"\n\
             key = \"json:/account\"\ndlq_topic = \"pay-dlq\"\n{props}\n\
             [kafka.failover]\nbrokers = \"{standby}\"\ndown_after = \"3s\"\nfail_back_after = \"4s\"\n\
             probe_interval = \"500ms\"\noverlap = \"30s\"\n{props}\n"
        ),
    )
    .unwrap();
    config.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_cut_off_from_etcd_stops_consuming_and_follows_the_switch_when_back() {
    use leasehold_integration_tests::proxy::Proxy;
    use leasehold_integration_tests::Etcd;

    let (mut primary, standby, checker) = two_clusters(None).await;
    let (_dir, config) = failover_setup(&checker, &primary, &standby);
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(etcd.client_port).await;
    let start = |id: &str, endpoint: String| {
        Instance::start(&InstanceSpec {
            id: id.into(),
            etcd: endpoint,
            args: vec!["--config".into(), config.clone()],
        })
    };
    let n0 = start("n0", etcd.endpoint());
    let n1 = start("n1", etcd.endpoint());
    let n2 = start("n2", proxy.url());
    // Each member consumes one of the three partitions.
    let consumed_here = |i: &Instance| -> Option<usize> {
        let k = i.get("/v1/kafka")?;
        Some(
            k["sources"][0]["partitions"]
                .as_array()?
                .iter()
                .filter(|p| p["here"] == true)
                .count(),
        )
    };
    wait_until(Duration::from_secs(60), "n2 consuming a partition", || {
        (consumed_here(&n2)? > 0).then_some(())
    })
    .await;

    // Cut off from etcd, n2 stops consuming; the group gives its partition to the others.
    proxy.cut();
    let cut = Instant::now();
    let status = wait_until(Duration::from_secs(20), "n2 to stop consuming", || {
        let k = n2.get("/v1/kafka")?;
        let source = k["sources"][0].clone();
        (consumed_here(&n2)? == 0 && source["error"].as_str()?.contains("not consuming"))
            .then_some(source)
    })
    .await;
    eprintln!(
        "n2 stopped consuming {:?} after the cut: {}",
        cut.elapsed(),
        status["error"]
    );
    // The primary goes down meanwhile: n0 and n1 (the active members now) switch.
    primary.stop();
    wait_until(Duration::from_secs(30), "the switch to the standby", || {
        (side(&n0)?["active"] == "standby").then_some(())
    })
    .await;
    standby.produce("pay", &messages(300, 30, 0)).await;
    wait_handled_on(
        &checker,
        "standby",
        300,
        Duration::from_secs(90),
        "the standby's records handled",
    )
    .await;
    assert!(
        handled_on(&checker, "primary").is_empty(),
        "nothing was produced to the primary"
    );

    // Back in reach of etcd, n2 reads the side the cluster chose while it was away.
    proxy.heal();
    wait_until(Duration::from_secs(40), "n2 consuming the standby", || {
        (side(&n2)?["active"] == "standby" && consumed_here(&n2)? > 0).then_some(())
    })
    .await;
    standby.produce("pay", &messages(300, 30, 300)).await;
    wait_until(Duration::from_secs(90), "the later records handled", || {
        (handled_on(&checker, "standby").len() >= 600).then_some(())
    })
    .await;
    assert_first_handling_in_offset_order(&checker);
    drop(n1);
}

/// Going back to the primary while the standby still has records to drain, with a member
/// that did not read the standby (here one started just then): it waits until the others
/// have drained before it reads the primary. Claims fence by topic name (the same on both
/// clusters here), so its claims on the primary used to fence the drain, and the
/// standby's records not handled yet were left there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_member_reads_the_primary_while_another_drains_the_standby() {
    // 50 ms per call, three keys: the standby's 1 500 records take about 25 s, longer
    // than the new member takes to start reading.
    let (primary, standby, checker) = two_clusters_with(None, Duration::from_millis(50)).await;
    let (_dir, config) = failover_setup(&checker, &primary, &standby);
    let cluster = Cluster::start(2, &["--config", &config]).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let n0 = &cluster.instances[0];
    let post = |path: &str, body: &str| admin_post(n0, path, body).0;
    assert_eq!(post("/v1/kafka/pay/switch", r#"{"to": "standby"}"#), 200);
    for i in &cluster.instances {
        wait_until(
            Duration::from_secs(20),
            "every member on the standby",
            || (side(i)?["active"] == "standby").then_some(()),
        )
        .await;
    }
    standby.produce("pay", &messages(1500, 3, 0)).await;
    // The drain goes up to the ends the members' status shows: wait until it shows them.
    let ends = |i: &Instance| -> Option<i64> {
        let k = i.get("/v1/kafka")?;
        k["sources"][0]["partitions"]
            .as_array()?
            .iter()
            .map(|p| p["end"].as_i64())
            .sum()
    };
    wait_until(Duration::from_secs(20), "the standby's ends known", || {
        cluster
            .instances
            .iter()
            .all(|i| ends(i) == Some(1500))
            .then_some(())
    })
    .await;
    let before = handled_on(&checker, "standby").len();
    assert!(before < 1000, "the drain had little left: {before} handled");

    // Back to the primary, a member that never read the standby joins, and the primary
    // has records for it.
    assert_eq!(post("/v1/kafka/pay/switch", r#"{"to": "primary"}"#), 200);
    let n2 = Instance::start(&InstanceSpec {
        id: "n2".into(),
        etcd: cluster.etcd.endpoint(),
        args: vec!["--config".into(), config.clone()],
    });
    primary.produce("pay", &messages(300, 3, 0)).await;
    wait_handled_on(
        &checker,
        "standby",
        1500,
        Duration::from_secs(90),
        "every record of the standby handled",
    )
    .await;
    wait_handled_on(
        &checker,
        "primary",
        300,
        Duration::from_secs(90),
        "the primary's records handled",
    )
    .await;
    assert!(
        n2.log_text()
            .contains("waiting for members draining the standby"),
        "n2 did not wait for the drain"
    );
    let fenced: usize = cluster
        .instances
        .iter()
        .map(|i| {
            i.log_text()
                .matches("partition claimed by another consumer")
                .count()
        })
        .sum();
    eprintln!("standby handled before the switch back: {before}; fenced partitions: {fenced}");
    assert_first_handling_in_offset_order(&checker);
}

/// POSTs a JSON `body` to `instance`'s admin `path`: the status and the JSON answer (null
/// when it has none).
fn admin_post(instance: &Instance, path: &str, body: &str) -> (u16, serde_json::Value) {
    let r = ureq::post(&format!("{}{path}", instance.admin_url()))
        .set("Content-Type", "application/json")
        .send_string(body);
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}
