//! Reaching entities from outside: the smart clients (Rust and Python) that call a key's
//! owner directly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_client::Client;
use leasehold_integration_tests::checker::Checker;
use leasehold_integration_tests::{shard_table, ttl_args as args, wait_until, Cluster};

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

    // The CLI calls through the same client: the answer names who ran it, `locate`
    // agrees with the table, and an address nobody listens on fails as unavailable (69)
    // once the call's timeout is spent.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(leasehold_integration_tests::leasehold_bin())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let addr = cluster.instances[0].grpc_url();
    let (code, out) = cli(&[
        "call",
        "--addr",
        &addr,
        "--key",
        "key-7",
        "--payload",
        "hi",
        "--output",
        "json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let location = client.locate("key-7").await.unwrap();
    assert_eq!(answer["owner"].as_str(), location.owner.as_deref());
    assert_eq!(answer["shard"], location.shard);
    let (code, out) = cli(&[
        "locate", "--addr", &addr, "--key", "key-7", "--output", "json",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let located: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(located["owner"].as_str(), location.owner.as_deref());
    assert_eq!(located["epoch"], location.epoch);
    let nobody = format!("127.0.0.1:{}", leasehold_integration_tests::free_port());
    let started = std::time::Instant::now();
    let (code, out) = cli(&[
        "call",
        "--addr",
        &nobody,
        "--key",
        "k",
        "--timeout",
        "1s",
        "--output",
        "json",
    ]);
    assert_eq!(code, Some(69), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

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

/// `examples/embedded.rs`: a ledger linked with Leasehold that caches each owned shard's
/// balances in memory and writes them back only in `ShardReleased`. Across a rolling
/// restart of every instance under load, no deposit may be lost or doubled: that holds
/// only if each shard's `ShardReleased` ends before its next owner's `ShardAcquired`,
/// which ends before that owner's first call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_ledger_loses_no_deposit_across_a_rolling_restart() {
    use leasehold_integration_tests::{example_bin, Etcd, Instance, InstanceSpec};
    let program = example_bin("embedded");
    let store = tempfile::tempdir().unwrap();
    let store_flag = store.path().display().to_string();
    let etcd = Etcd::start().await;
    let spec = |i: usize| InstanceSpec {
        id: format!("ledger-{i}"),
        etcd: etcd.endpoint(),
        args: [
            "--lease-ttl",
            "3s",
            "--shards",
            "64",
            "--request-timeout",
            "10s",
        ]
        .map(String::from)
        .to_vec(),
    };
    // Writing a shard back takes a while, as with a remote store. Every call is audited.
    let audit = store.path().join("audit.log").display().to_string();
    let leading = [
        "--store",
        store_flag.as_str(),
        "--flush-delay",
        "300ms",
        "--audit",
        audit.as_str(),
    ];
    let mut instances: Vec<Instance> = (0..3)
        .map(|i| Instance::start_program(&program, &leading, &spec(i)))
        .collect();
    let seeds: Vec<String> = instances.iter().map(|i| i.grpc_url()).collect();
    let client = Client::builder()
        .seeds(seeds)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("the ledger cluster answers");
    wait_until(Duration::from_secs(15), "every shard owned", || {
        let r = client.routing()?;
        (r.shards_by_owner().values().sum::<usize>() == 64 && r.shards_by_owner().len() == 3)
            .then_some(())
    })
    .await;

    // 8 depositors; each account has two of them, so calls for one account arrive
    // concurrently (through whichever instance the client picks) and must still run one
    // at a time. A depositor never sees a balance lower than its last one plus its deposit.
    let accounts = 64;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(vec![0i64; accounts]));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for t in 0..8 {
        let (client, stop, acked, failures) = (
            client.clone(),
            stop.clone(),
            acked.clone(),
            failures.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut seen = vec![0i64; accounts];
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                for a in (t % 4..accounts).step_by(4) {
                    let amount = 1 + (a + round) % 5;
                    match client
                        .call(&format!("account-{a}"), format!("deposit {amount}"))
                        .await
                    {
                        Ok(reply) => {
                            acked.lock().unwrap()[a] += amount as i64;
                            let balance: i64 = String::from_utf8_lossy(&reply.payload)
                                .parse()
                                .unwrap_or(-1);
                            if balance < seen[a] + amount as i64 {
                                failures.lock().unwrap().push(format!(
                                    "account-{a}: balance {balance} after depositing {amount}; it was {} before",
                                    seen[a]
                                ));
                            }
                            seen[a] = balance;
                        }
                        Err(e) => failures.lock().unwrap().push(format!("account-{a}: {e}")),
                    }
                }
                round += 1;
            }
        }));
    }
    // Every instance in turn drains, exits and comes back while deposits go on.
    for (i, instance) in instances.iter_mut().enumerate() {
        tokio::time::sleep(Duration::from_millis(700)).await;
        instance.signal("TERM");
        let code = instance.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(
            code,
            Some(0),
            "ledger-{i} stopped cleanly:\n{}",
            instance.log_text()
        );
        *instance = Instance::start_program(&program, &leading, &spec(i));
        wait_until(
            Duration::from_secs(15),
            "the restarted member to own shards",
            || {
                let r = client.routing()?;
                let counts = r.shards_by_owner();
                (counts.len() == 3 && counts.values().sum::<usize>() == 64).then_some(())
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("depositor");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed deposits: {failures:?}");

    // Stopping every instance writes every shard back: the store holds each deposit once.
    for instance in &mut instances {
        instance.signal("TERM");
        assert_eq!(instance.wait_exit(Duration::from_secs(20)).await, Some(0));
    }
    let mut stored = vec![0i64; accounts];
    for entry in std::fs::read_dir(store.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            for (account, balance) in v["balances"].as_object().unwrap() {
                let a: usize = account.strip_prefix("account-").unwrap().parse().unwrap();
                stored[a] += balance.as_i64().unwrap();
            }
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(
        stored, acked,
        "balances in the store vs deposits acknowledged"
    );

    // Single writer, across the processes: per account, no two calls overlapped in time,
    // and a call never ran under an older epoch than one before it.
    let mut calls: std::collections::HashMap<String, Vec<(u128, u128, u64)>> = Default::default();
    for line in std::fs::read_to_string(&audit).unwrap().lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (start, end): (u128, u128) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        calls
            .entry(f[0].to_owned())
            .or_default()
            .push((start, end, f[1].parse().unwrap()));
    }
    let audited: usize = calls.values().map(Vec::len).sum();
    assert!(audited > 500, "{audited} calls audited");
    for (account, mut runs) in calls {
        runs.sort();
        for pair in runs.windows(2) {
            let ((_, end, epoch), (start, _, next_epoch)) = (pair[0], pair[1]);
            assert!(start >= end, "{account}: two calls overlapped: {pair:?}");
            assert!(
                next_epoch >= epoch,
                "{account}: a call ran under an older epoch: {pair:?}"
            );
        }
    }
    let total: i64 = acked.iter().sum();
    assert!(total > 500, "deposits kept flowing: {total}");
    eprintln!("{total} deposited across 3 restarts; the store agrees account by account");
}

/// Runs the Python client's load program (`clients/python/examples/smart_load.py`) and
/// returns its summary line.
fn python_load(seeds: &str, extra: &[&str]) -> std::process::Child {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../clients/python/examples/smart_load.py");
    std::process::Command::new(leasehold_integration_tests::openmetrics::python())
        .arg(script)
        .args(["--seeds", seeds, "--keys", "150", "--concurrency", "4"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the Python client (make py-deps installs it)")
}

fn python_summary(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("the Python client ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "smart_load.py failed:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("summary {last:?}: {e}\nstderr:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_client_calls_owners_directly_and_rides_out_a_drain() {
    let checker = Checker::start(Duration::from_millis(1), None).await;
    let flag = checker.handler_flag();
    let mut cluster = Cluster::start(3, &args(&flag)).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let seeds: Vec<String> = cluster
        .instances
        .iter()
        .map(|i| format!("127.0.0.1:{}", i.grpc_port))
        .collect();
    let seeds = seeds.join(",");

    // Straight to the owners: no instance forwards a call.
    let before = forwards(&cluster, &[]);
    let summary = python_summary(python_load(&seeds, &["--seconds", "3"]));
    eprintln!("direct: {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["forwarded"], 0, "{summary}");
    assert!(summary["calls"].as_u64().unwrap() > 100, "{summary}");
    assert_eq!(summary["owners"], serde_json::json!(["n0", "n1", "n2"]));
    assert_eq!(forwards(&cluster, &[]), before, "calls were forwarded");

    // The owner of a third of the keys drains and exits mid-stream: no call fails.
    let stop = tempfile::tempdir().unwrap();
    let stop_file = stop.path().join("stop");
    let stop_flag = stop_file.display().to_string();
    let load = python_load(&seeds, &["--seconds", "60", "--stop-file", &stop_flag]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.instances[2].signal("TERM");
    let code = cluster.instances[2]
        .wait_exit(Duration::from_secs(20))
        .await;
    assert_eq!(code, Some(0), "n2 drained and exited cleanly");
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&stop_file, b"").unwrap();
    let summary = python_summary(load);
    eprintln!("across the drain: {summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert!(summary["calls"].as_u64().unwrap() > 100, "{summary}");
    assert_eq!(checker.violations(), Vec::<String>::new());
}

/// `curl` with `args`; returns (HTTP status, headers, body).
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "-", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs (make deps installs it)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_reaches_entities_through_the_http_gateway() {
    use leasehold_integration_tests::{free_port, Etcd, Instance, InstanceSpec};
    let etcd = Etcd::start().await;
    let http_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let instances: Vec<Instance> = (0..3)
        .map(|i| {
            Instance::start(&InstanceSpec {
                id: format!("n{i}"),
                etcd: etcd.endpoint(),
                args: vec![
                    "--http-listen".into(),
                    format!("127.0.0.1:{}", http_ports[i]),
                    "--max-payload".into(),
                    "1KiB".into(),
                    "--max-key-bytes".into(),
                    "64B".into(),
                ],
            })
        })
        .collect();
    let cluster = Cluster {
        etcd,
        instances,
        args: Vec::new(),
    };
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let gateway = |i: usize| format!("http://127.0.0.1:{}", http_ports[i]);

    // A key n1 owns, sent to n0's gateway: forwarded, answered by n1.
    let table = shard_table(&cluster.instances[0]).unwrap();
    let key = (0..)
        .map(|i| format!("order-{i}"))
        .find(|k| {
            let shard = leasehold_types::shard_for_key(k.as_bytes(), 1024).0 as usize;
            table[shard].1.as_deref() == Some("n1")
        })
        .unwrap();
    let before = forwards(&cluster, &[]);
    let url = format!("{}/v1/entities/{key}", gateway(0));
    let (status, head, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: text/plain",
        "-H",
        "Leasehold-Timeout: 3s",
        "--data-binary",
        "hello gateway",
        &url,
    ]);
    assert_eq!(status, 200, "{head}{body}");
    assert_eq!(body, "hello gateway", "the echo handler's answer");
    assert_eq!(header(&head, "leasehold-owner"), Some("n1"));
    let shard = leasehold_types::shard_for_key(key.as_bytes(), 1024).0;
    assert_eq!(
        header(&head, "leasehold-shard"),
        Some(shard.to_string().as_str())
    );
    let epoch = table[shard as usize].2.to_string();
    assert_eq!(header(&head, "leasehold-epoch"), Some(epoch.as_str()));
    // Forwarded (more than once only if the owner answered "not owner" while its routing
    // table was being re-read, e.g. after its etcd watch broke: then it is sent again).
    let hops = forwards(&cluster, &[]) - before;
    assert!(hops >= 1, "the call was forwarded to its owner");
    if hops > 1 {
        eprintln!("the call was forwarded {hops} times (retried after \"not owner\")");
    }

    // Where the key lives.
    let (status, _, body) = curl(&[&format!("{}/v1/entities/{key}/location", gateway(2))]);
    assert_eq!(status, 200);
    let location: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(location["owner"], "n1");
    assert_eq!(location["shard"], shard);

    // Errors are JSON with the gRPC code and the HTTP status of the README's table.
    let long_key = format!("{}/v1/entities/{}", gateway(0), "k".repeat(100));
    let cases: Vec<(Vec<String>, u16, &str)> = vec![
        (
            vec!["-X".into(), "POST".into(), long_key],
            400,
            "INVALID_ARGUMENT",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "--data-binary".into(),
                "x".repeat(2048),
                url.clone(),
            ],
            413,
            "RESOURCE_EXHAUSTED",
        ),
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "Leasehold-Timeout: soon".into(),
                url.clone(),
            ],
            400,
            "INVALID_ARGUMENT",
        ),
        (vec![url.clone()], 405, "UNIMPLEMENTED"),
        (vec![format!("{}/v1/nothing", gateway(0))], 404, "NOT_FOUND"),
        // A form another site's page posts: refused, the handler not called (the count of
        // calls answered 200 below stays 1).
        (
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "Origin: https://elsewhere.example".into(),
                "-H".into(),
                "Content-Type: application/x-www-form-urlencoded".into(),
                "--data-binary".into(),
                "balance=0".into(),
                url.clone(),
            ],
            403,
            "PERMISSION_DENIED",
        ),
    ];
    for (args, want, code) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, head, body) = curl(&args);
        assert_eq!(status, want, "{args:?}: {body}");
        assert_eq!(header(&head, "content-type"), Some("application/json"));
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["code"], code, "{body}");
        assert_eq!(error["status"], want);
        assert!(!error["error"].as_str().unwrap().is_empty(), "{body}");
    }
    // A page on another site can post a gRPC body as text/plain to the admin plane
    // (it takes HTTP/1) without asking first: refused, and nothing changes.
    let dir = tempfile::tempdir().unwrap();
    let frame = dir.path().join("freeze");
    // FreezeRequest { frozen: true } in one gRPC frame.
    std::fs::write(&frame, [0u8, 0, 0, 0, 2, 8, 1]).unwrap();
    let admin = cluster.instances[0].admin_url();
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let (status, head, body) = curl(&[
            "--http1.1",
            "-X",
            "POST",
            "-H",
            &format!("Content-Type: {content_type}"),
            "--data-binary",
            &format!("@{}", frame.display()),
            &format!("{admin}/leasehold.v1.Admin/Freeze"),
        ]);
        let grpc_status = header(&head, "grpc-status");
        assert!(
            status != 200 || grpc_status.is_some_and(|s| s != "0"),
            "{content_type}: {status} {head}{body}"
        );
    }
    // A page that made its own name resolve to 127.0.0.1 (DNS rebinding) is the same
    // origin to the browser, which then reads the answers: its requests name its host,
    // and plaintext requests from this machine must name localhost or an IP address.
    // Addressed to localhost, they are served.
    let rebound = "Host: rebind.example";
    let location = format!("{}/v1/entities/{key}/location", gateway(0));
    for args in [
        vec![
            "-X",
            "POST",
            "-H",
            rebound,
            "--data-binary",
            "x",
            url.as_str(),
        ],
        vec!["-H", rebound, location.as_str()],
    ] {
        let (status, _, body) = curl(&args);
        assert_eq!(status, 403, "gateway {args:?}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["code"], "PERMISSION_DENIED", "{body}");
        assert!(body.contains("addressed to localhost"), "{body}");
    }
    let cluster_url = format!("{admin}/v1/cluster");
    let (status, _, body) = curl(&["-H", rebound, &cluster_url]);
    assert_eq!(status, 403, "admin: {body}");
    assert!(body.contains("addressed to localhost"), "{body}");
    let (status, _, body) = curl(&["-H", "Host: localhost", &cluster_url]);
    assert_eq!(status, 200, "admin addressed to localhost: {body}");
    let (status, _, body) = curl(&["-H", "Host: localhost", &location]);
    assert_eq!(status, 200, "gateway addressed to localhost: {body}");
    // The Admin gRPC service over HTTP/1 (what a browser speaks), as gRPC, to the page's
    // host: refused before the body is read.
    let (status, head, body) = curl(&[
        "--http1.1",
        "-X",
        "POST",
        "-H",
        rebound,
        "-H",
        "Content-Type: application/grpc",
        "--data-binary",
        &format!("@{}", frame.display()),
        &format!("{admin}/leasehold.v1.Admin/Freeze"),
    ]);
    assert_eq!(
        (status, header(&head, "grpc-status")),
        (200, Some("7")),
        "{head}{body}"
    );
    let placement: serde_json::Value = ureq::get(&format!("{admin}/v1/placement"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(placement["frozen"], false, "{placement}");

    let metrics = ureq::get(&format!("{}/metrics", cluster.instances[0].admin_url()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains(r#"leasehold_http_requests_total{route="call",status="200"} 1"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("leasehold_http"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
