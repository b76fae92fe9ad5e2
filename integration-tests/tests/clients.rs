//! Reaching entities from outside: the smart clients (Rust and Python) that call a key's
//! owner directly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_client::Client;
use leasehold_integration_tests::checker::Checker;
use leasehold_integration_tests::{shard_table, wait_until, Cluster};

fn args(handler: &str) -> Vec<&str> {
    vec![
        "--lease-ttl",
        "3s",
        "--handler",
        handler,
        "--request-timeout",
        "10s",
    ]
}

/// `leasehold_forwards_total` summed over the instances still running.
fn forwards(cluster: &Cluster, skip: &[usize]) -> u64 {
    let mut total = 0.0;
    for (i, instance) in cluster.instances.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        let text = ureq::get(&format!("{}/metrics", instance.admin_url()))
            .call()
            .expect("scrape")
            .into_string()
            .expect("metrics text");
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("leasehold_forwards_total "))
            .expect("leasehold_forwards_total exported")
            .trim()
            .parse::<f64>()
            .expect("a number");
    }
    total as u64
}

/// Waits until the client's table shows what the admin API shows: every shard owned, by
/// the same owners.
async fn wait_for_current_table(client: &Client, cluster: &Cluster) {
    wait_until(
        Duration::from_secs(10),
        "the client's table to match the cluster",
        || {
            let admin = shard_table(&cluster.instances[0])?;
            let routing = client.routing()?;
            let same = admin.iter().all(|(shard, owner, epoch)| {
                let s = *shard as u32;
                routing.owner(s).map(|m| m.id.as_str()) == owner.as_deref()
                    && routing.epoch(s) == *epoch
            });
            same.then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_smart_client_calls_owners_directly_and_rides_out_a_drain() {
    let checker = Checker::start(Duration::from_millis(1), None).await;
    let flag = checker.handler_flag();
    let mut cluster = Cluster::start(3, &args(&flag)).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let seeds: Vec<String> = cluster.instances.iter().map(|i| i.grpc_url()).collect();
    let client = Client::builder()
        .seeds(seeds)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the client gets the routing table");
    wait_for_current_table(&client, &cluster).await;

    // Every call goes straight to its owner: no instance forwards one.
    let before = forwards(&cluster, &[]);
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..600 {
        let key = format!("key-{}", i % 150);
        let reply = client
            .call(&key, format!("{i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i} for {key}: {e}"));
        assert!(!reply.forwarded, "{key} was forwarded: {reply:?}");
        let location = client.locate(&key).await.expect("located");
        assert_eq!(location.owner.as_deref(), Some(reply.owner.as_str()));
        assert_eq!((location.shard, location.epoch), (reply.shard, reply.epoch));
        owners.insert(reply.owner);
    }
    assert_eq!(
        owners.len(),
        3,
        "the keys spread over every owner: {owners:?}"
    );
    assert_eq!(forwards(&cluster, &[]), before, "calls were forwarded");

    // The owner of a third of the keys drains and exits while calls keep coming: none
    // fails, and the client follows the shards to their new owners.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for t in 0..8 {
        let (client, stop, ok, failures) =
            (client.clone(), stop.clone(), ok.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("key-{}", (t * 37 + i) % 150);
                match client.call(&key, format!("{i}")).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{key}: {e}")),
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = ok.load(Ordering::Relaxed);
    cluster.instances[2].signal("TERM");
    let code = cluster.instances[2]
        .wait_exit(Duration::from_secs(20))
        .await;
    assert_eq!(code, Some(0), "n2 drained and exited cleanly");
    wait_until(
        Duration::from_secs(10),
        "n2's shards re-homed in the client's table",
        || {
            let r = client.routing()?;
            let by_owner = r.shards_by_owner();
            (!by_owner.contains_key("n2") && by_owner.values().sum::<usize>() == 1024).then_some(())
        },
    )
    .await;
    let after_drain = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    let total = ok.load(Ordering::Relaxed);
    assert!(
        during > 0 && after_drain > during && total > after_drain,
        "calls kept succeeding: {during} before the drain, {after_drain} at its end, {total} in all"
    );

    // With the new table the calls go straight to the owners again.
    let before = forwards(&cluster, &[2]);
    for i in 0..150 {
        let reply = client.call(&format!("key-{i}"), "x").await.expect("call");
        assert!(!reply.forwarded && reply.owner != "n2", "{reply:?}");
    }
    assert_eq!(forwards(&cluster, &[2]), before);
    assert_eq!(checker.violations(), Vec::<String>::new());
    eprintln!("{total} calls, none failed, across the drain of n2");
}
