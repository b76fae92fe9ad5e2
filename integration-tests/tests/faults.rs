//! Self-healing after real faults: each scenario reproduces a way the cluster used to get
//! stuck (and stay stuck until a person restarted something), against real processes.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use leasehold_integration_tests::checker::Checker;
use leasehold_integration_tests::proxy::Proxy;
use leasehold_integration_tests::{
    get_json, shard_table, wait_until, Cluster, Etcd, Instance, InstanceSpec,
};
use leasehold_proto::v1::peer_client::PeerClient;
use leasehold_proto::v1::{forward_response, CallRequest, ForwardRequest};
use leasehold_types::shard_for_key;

const TTL: Duration = Duration::from_secs(2);

fn args(handler: &str) -> Vec<String> {
    [
        "--lease-ttl",
        "2s",
        "--handler",
        handler,
        "--request-timeout",
        "10s",
    ]
    .map(String::from)
    .to_vec()
}

fn start(id: &str, etcd: String, args: Vec<String>) -> Instance {
    Instance::start(&InstanceSpec {
        id: id.into(),
        etcd,
        args,
    })
}

/// Waits until `instances` own every shard between them, balanced.
async fn wait_balanced(
    instances: &[&Instance],
    timeout: Duration,
) -> Vec<(u64, Option<String>, u64)> {
    wait_until(timeout, "all shards owned and balanced", || {
        let table = shard_table(instances[0])?;
        let (n, s) = (instances.len(), table.len());
        let counts: Vec<usize> = instances
            .iter()
            .map(|i| {
                table
                    .iter()
                    .filter(|t| t.1.as_deref() == Some(&i.id))
                    .count()
            })
            .collect();
        let ok = counts.iter().sum::<usize>() == s
            && counts.iter().all(|&c| c >= s / n && c <= s.div_ceil(n));
        ok.then_some(table)
    })
    .await
}

/// `n` instances on one etcd with `checker` as their handler.
async fn cluster(n: usize, checker: &Checker) -> Cluster {
    let args = args(&checker.handler_flag());
    Cluster::start(n, &args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// A key whose shard is `shard` (of 1024).
fn key_in(shard: u64) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| u64::from(shard_for_key(k.as_bytes(), 1024).0) == shard)
        .unwrap()
}

async fn call_ok(instance: &Instance, key: &str, timeout: Duration) -> Result<u64, tonic::Status> {
    let mut client = instance.client().await;
    let mut req = tonic::Request::new(CallRequest {
        key: key.into(),
        payload: "x".into(),
    });
    req.set_timeout(timeout);
    client.call(req).await.map(|r| r.into_inner().epoch)
}

/// Hole 1: an instance whose lease expired while etcd was out of its reach used to retry
/// the dead lease forever ("lease not found"), not ready and never restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_cut_off_from_etcd_past_its_ttl_rejoins_by_itself() {
    let checker = Checker::start(Duration::ZERO, None).await;
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(etcd.client_port).await;
    let a = start("a", etcd.endpoint(), args(&checker.handler_flag()));
    let b = start("b", proxy.url(), args(&checker.handler_flag()));
    wait_balanced(&[&a, &b], Duration::from_secs(15)).await;

    proxy.cut();
    // b's lease expires in etcd; a takes every shard.
    wait_until(Duration::from_secs(15), "a to own every shard", || {
        let t = shard_table(&a)?;
        t.iter().all(|s| s.1.as_deref() == Some("a")).then_some(())
    })
    .await;
    tokio::time::sleep(TTL).await;
    assert!(!b.ready(), "b is ready while cut off from etcd");
    proxy.heal();
    let healed = Instant::now();

    wait_until(
        Duration::from_secs(20),
        "b ready and owning half the shards again",
        || {
            b.ready().then_some(())?;
            let t = shard_table(&a)?;
            let mine = t.iter().filter(|s| s.1.as_deref() == Some("b")).count();
            (mine == 512).then_some(())
        },
    )
    .await;
    eprintln!(
        "b rejoined {:?} after the partition healed",
        healed.elapsed()
    );
    assert!(
        b.log_text().contains("lease expired"),
        "b did not notice its lease expired"
    );
    let health = get_json(&format!("{}/healthz", b.admin_url())).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(checker.violations(), Vec::<String>::new());
}

/// Hole 2: a shard key attached to an instance's own lease but missing from its table
/// (an acquisition whose answer was lost, a view that ran ahead) was served by nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shard_keys_on_an_instances_lease_but_not_in_its_table_are_repaired() {
    let checker = Checker::start(Duration::ZERO, None).await;
    let cluster = cluster(2, &checker).await;
    let before = cluster.wait_balanced(Duration::from_secs(15)).await;
    let (n0, n1) = (&cluster.instances[0], &cluster.instances[1]);
    let adopt = before
        .iter()
        .find(|s| s.1.as_deref() == Some("n0"))
        .unwrap()
        .0;
    let delete = before
        .iter()
        .find(|s| s.1.as_deref() == Some("n1"))
        .unwrap()
        .0;

    let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint()], None)
        .await
        .unwrap();
    let member = etcd
        .get("/leasehold/default/members/n0", None)
        .await
        .unwrap();
    let lease = member.kvs()[0].lease();
    let value =
        serde_json::json!({ "owner": "n0", "address": format!("127.0.0.1:{}", n0.grpc_port) })
            .to_string();
    // Replace both shards' keys with new keys on n0's lease, as a committed acquisition
    // whose answer n0 never saw would leave them: n0 drops its own (another epoch), n1
    // loses its. (Delete, then create if absent: an owner re-acquiring in between wins,
    // and the test tries again.)
    for shard in [adopt, delete] {
        let key = format!("/leasehold/default/shards/{shard}");
        let mut replaced = false;
        for _ in 0..20 {
            etcd.delete(key.clone(), None).await.unwrap();
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            if etcd.txn(txn).await.unwrap().succeeded() {
                replaced = true;
                break;
            }
        }
        assert!(replaced, "could not replace the key of shard {shard}");
    }

    // Repaired both ways: the one assigned to n0 is adopted, the other released to n1.
    let table = wait_until(
        Duration::from_secs(10),
        "both shards served by their assignees",
        || {
            let t = shard_table(n1)?;
            let ok = t[adopt as usize].1.as_deref() == Some("n0")
                && t[adopt as usize].2 > before[adopt as usize].2
                && t[delete as usize].1.as_deref() == Some("n1")
                && t[delete as usize].2 > before[delete as usize].2;
            ok.then_some(t)
        },
    )
    .await;
    for (shard, via) in [(adopt, n1), (delete, n0)] {
        let epoch = call_ok(via, &key_in(shard), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("call for shard {shard}: {e}"));
        assert_eq!(
            epoch, table[shard as usize].2,
            "shard {shard} ran at another epoch"
        );
    }
    assert!(n0.log_text().contains("adopted a shard key"));
    assert!(n0.log_text().contains("deleted a shard key"));
    assert_eq!(checker.violations(), Vec::<String>::new());
}

/// An assignment key that went back (deleted by hand, or etcd restored from a backup)
/// used to stop the leader from planning for good: it waited for its own last version to
/// appear. A member that joins afterwards must still get its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_plans_again_after_the_assignment_key_went_back() {
    let checker = Checker::start(Duration::ZERO, None).await;
    let mut cluster = cluster(2, &checker).await;
    cluster.wait_balanced(Duration::from_secs(15)).await;
    let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint()], None)
        .await
        .unwrap();
    let deleted = etcd
        .delete("/leasehold/default/assignment", None)
        .await
        .unwrap()
        .deleted();
    assert_eq!(deleted, 1, "no assignment key to delete");
    cluster.add("n2");
    let instances: Vec<&Instance> = cluster.instances.iter().collect();
    // The leader gives up waiting for its own write after 4 TTLs (8 s here).
    wait_balanced(&instances, Duration::from_secs(30)).await;
    let leader_saw_it = cluster
        .instances
        .iter()
        .any(|i| i.log_text().contains("never appeared"));
    assert!(leader_saw_it, "no leader noticed its assignment was gone");
    assert_eq!(checker.violations(), Vec::<String>::new());
}

/// Hole 3: etcd auth tokens expire (here after 2 idle seconds); every write after that
/// used to fail, so the next rebalance hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_etcd_auth_tokens_are_refreshed() {
    let etcd = Etcd::start_with(&["--auth-token", "simple", "--auth-token-ttl", "2"]).await;
    {
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        c.user_add("root", "rootpw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.auth_enable().await.unwrap();
    }
    let checker = Checker::start(Duration::ZERO, None).await;
    let mut with_auth = args(&checker.handler_flag());
    with_auth.extend(["--etcd-username", "root", "--etcd-password", "rootpw"].map(String::from));
    let a = start("a", etcd.endpoint(), with_auth.clone());
    wait_balanced(&[&a], Duration::from_secs(15)).await;
    // Long enough for a's token to expire while nothing but keepalives flows.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = start("b", etcd.endpoint(), with_auth);
    wait_balanced(&[&a, &b], Duration::from_secs(20)).await;
    assert!(a.ready() && b.ready());
}

/// An etcd that takes fewer operations per transaction than a batch of shard keys holds
/// (`--max-txn-ops` lowered by its operator): the keys are written one by one instead,
/// and the cluster owns every shard as with the default limit. An instance that was
/// refused writes one by one for a while (10 minutes): taking over its peer's shards
/// soon after costs no further refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_are_acquired_one_by_one_from_an_etcd_that_refuses_batches() {
    let etcd = Etcd::start_with(&["--max-txn-ops", "8"]).await;
    let checker = Checker::start(Duration::ZERO, None).await;
    let a = start("a", etcd.endpoint(), args(&checker.handler_flag()));
    let b = start("b", etcd.endpoint(), args(&checker.handler_flag()));
    wait_balanced(&[&a, &b], Duration::from_secs(30)).await;
    let refusals = |i: &Instance| {
        i.log_text()
            .matches("etcd refused a batch of shard keys")
            .count()
    };
    assert!(
        refusals(&a) + refusals(&b) > 0,
        "no batch was refused: the test no longer exercises the one-by-one path"
    );
    for shard in [0, 511, 1023] {
        call_ok(&a, &key_in(shard), Duration::from_secs(5))
            .await
            .unwrap();
    }
    assert!(a.ready() && b.ready());
    // The one that was refused takes the other's shards once it is gone.
    let (survivor, gone) = if refusals(&a) > 0 { (&a, &b) } else { (&b, &a) };
    gone.signal("KILL");
    let id = survivor.id.clone();
    wait_until(
        Duration::from_secs(30),
        "the survivor to own every shard",
        || {
            shard_table(survivor)?
                .iter()
                .all(|s| s.1.as_deref() == Some(id.as_str()))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        refusals(survivor),
        1,
        "a later acquisition tried batches again: {}",
        survivor.log_text()
    );
    for shard in [0, 511, 1023] {
        call_ok(survivor, &key_in(shard), Duration::from_secs(5))
            .await
            .unwrap();
    }
}

/// Hole 10: a forwarded copy runs only at the epoch its sender routed by; a copy that
/// waited while the shard moved away and back must not run after newer calls ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_call_for_another_epoch_is_answered_not_owner() {
    let checker = Checker::start(Duration::ZERO, None).await;
    let cluster = cluster(1, &checker).await;
    let table = cluster.wait_balanced(Duration::from_secs(15)).await;
    let n0 = &cluster.instances[0];
    let key = key_in(5);
    let epoch = table[5].2;
    let mut peer = PeerClient::connect(n0.peer_url()).await.unwrap();
    let forward = |expected: u64| ForwardRequest {
        key: key.clone(),
        payload: "fwd".into(),
        shard: 5,
        expected_epoch: expected,
        entry: "elsewhere".into(),
        source: None,
        metadata: Default::default(),
    };
    let stale = peer.forward(forward(epoch - 1)).await.unwrap().into_inner();
    match stale.result {
        Some(forward_response::Result::NotOwner(n)) => {
            assert_eq!((n.owner.as_str(), n.epoch), ("n0", epoch))
        }
        other => panic!("a stale forward ran: {other:?}"),
    }
    assert!(
        !checker.state.lock().unwrap().history.contains_key(&key),
        "the handler ran a forwarded call of another epoch"
    );
    let current = peer.forward(forward(epoch)).await.unwrap().into_inner();
    assert!(
        matches!(current.result, Some(forward_response::Result::Ok(_))),
        "{current:?}"
    );
    assert_eq!(checker.state.lock().unwrap().history[&key].len(), 1);
}

/// Hole 6 (second half): a member whose handler does not answer yet takes no shard, so
/// it cannot pull shards away from members that can serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_takes_no_shard_before_its_handler_answers() {
    let checker = Checker::start(Duration::ZERO, None).await;
    let etcd = Etcd::start().await;
    let a = start("a", etcd.endpoint(), args(&checker.handler_flag()));
    wait_balanced(&[&a], Duration::from_secs(15)).await;
    let port = leasehold_integration_tests::free_port();
    let b = start(
        "b",
        etcd.endpoint(),
        args(&format!("grpc://127.0.0.1:{port}")),
    );
    wait_until(
        Duration::from_secs(10),
        "b to report it waits for its handler",
        || {
            (b.unready_reason().as_deref() == Some("waiting for the handler to answer"))
                .then_some(())
        },
    )
    .await;
    // Meanwhile b forwards calls to a, and a keeps every shard.
    for i in 0..20 {
        call_ok(&b, &format!("k{i}"), Duration::from_secs(5))
            .await
            .unwrap();
    }
    let t = shard_table(&a).unwrap();
    assert!(
        t.iter().all(|s| s.1.as_deref() == Some("a")),
        "b took shards without a handler"
    );
    let _late = Checker::start_on(port, Duration::ZERO, None).await;
    wait_balanced(&[&a, &b], Duration::from_secs(15)).await;
    assert!(b.ready());
}

/// Hole 4: an instance attached to an etcd member cut off from its cluster used to keep
/// a frozen routing table that still looked synced. With leader-requiring requests and
/// watches the member refuses them, the table is marked unsynced, and once the member
/// rejoins the instance syncs and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_on_an_etcd_member_cut_off_from_its_cluster_is_not_trusted() {
    use leasehold_integration_tests::etcd_cluster::EtcdCluster;
    use leasehold_integration_tests::netns::{self, Topology};

    if !netns::is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    netns::cleanup_stale();
    let mut topo = Topology::new().unwrap();
    let hosts: Vec<_> = (1..=3)
        .map(|i| topo.add_host(&format!("e{i}"), 10 + i as u8).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&hosts, dir.path()).await.unwrap();
    let checker = Checker::start(Duration::ZERO, None).await;
    let a = start(
        "a",
        etcd.members[0].endpoint(),
        args(&checker.handler_flag()),
    );
    let b = start(
        "b",
        etcd.members[2].endpoint(),
        args(&checker.handler_flag()),
    );
    wait_balanced(&[&a, &b], Duration::from_secs(20)).await;

    topo.partition("e3", "e1").unwrap();
    topo.partition("e3", "e2").unwrap();
    wait_until(
        Duration::from_secs(30),
        "b to stop trusting its routing table",
        || (b.unready_reason().as_deref() == Some("routing table not synced")).then_some(()),
    )
    .await;
    topo.heal_partition("e3", "e1").unwrap();
    topo.heal_partition("e3", "e2").unwrap();
    wait_until(Duration::from_secs(30), "b ready again", || {
        b.ready().then_some(())
    })
    .await;
    wait_balanced(&[&a, &b], Duration::from_secs(20)).await;
    assert_eq!(checker.violations(), Vec::<String>::new());
    drop(etcd);
    drop(topo);
    assert!(
        netns::nothing_left(),
        "network namespaces or links left behind"
    );
}

/// Claims of a Kafka partition commit in the group's generation order, even when one is
/// delayed: a consumer that lost its partition cannot take the fence back from the member
/// the group gave it to (its late claim is refused), while its own re-claim and later
/// generations go through; a claim ends with its claimant's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_claims_of_a_kafka_partition_from_an_earlier_generation_are_refused() {
    use leasehold_coord::{claim, claim_value, Claim, ClaimMode};
    use leasehold_types::MemberId;

    let etcd = Etcd::start().await;
    let c = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let key = "/leasehold/default/kafka-fences/t/0/g".to_owned();
    let (a, b) = (MemberId::new("a"), MemberId::new("b"));
    let claim_in = |epoch: u64, generation: i32, member: &MemberId, mode: ClaimMode| {
        let value = claim_value(epoch, generation, member);
        let key = key.clone();
        let mut c = c.clone();
        async move { claim(&mut c, key, epoch, value, mode).await.unwrap() }
    };
    let claim_as =
        |generation: i32, member: &MemberId, mode: ClaimMode| claim_in(0, generation, member, mode);
    let ordered = ClaimMode::Ordered;
    let Claim::Claimed { fence: f1 } = claim_as(5, &a, ordered).await else {
        panic!("a first claim goes through")
    };
    assert_eq!(
        claim_as(3, &b, ordered).await,
        Claim::Superseded {
            holder: claim_value(0, 5, &a)
        },
        "a claim from an earlier generation is refused"
    );
    let Claim::Claimed { fence: f2 } = claim_as(5, &a, ordered).await else {
        panic!("the holder may claim again")
    };
    let Claim::Claimed { fence: f3 } = claim_as(6, &b, ordered).await else {
        panic!("a later generation takes over")
    };
    assert!(f1 < f2 && f2 < f3, "fences grow: {f1} {f2} {f3}");
    assert!(matches!(
        claim_as(5, &a, ordered).await,
        Claim::Superseded { .. }
    ));
    // A consumer still assigned a session timeout after being superseded (or a group
    // recreated at generation 1) takes the partition with a forced claim.
    let forced = claim_as(1, &a, ClaimMode::Force).await;
    assert!(
        matches!(forced, Claim::Claimed { fence } if fence > f3),
        "{forced:?}"
    );
    assert!(
        matches!(claim_as(1, &b, ordered).await, Claim::Claimed { .. }),
        "claims then order from the forced one"
    );
    // A failover source's new side claims in a later epoch: its first generation takes
    // over from any generation of the old side, and nothing of the old side — not even a
    // forced claim of a consumer still draining it — takes the partition back.
    assert!(
        matches!(claim_in(7, 1, &b, ordered).await, Claim::Claimed { .. }),
        "a later epoch's first generation takes over"
    );
    assert_eq!(
        claim_as(99, &a, ordered).await,
        Claim::Superseded {
            holder: claim_value(7, 1, &b)
        },
        "an earlier epoch is refused whatever its generation"
    );
    assert!(
        matches!(
            claim_as(99, &a, ClaimMode::Force).await,
            Claim::Superseded { .. }
        ),
        "a forced claim does not cross into a later epoch"
    );
    assert!(
        matches!(
            claim_in(7, 0, &a, ClaimMode::Force).await,
            Claim::Claimed { .. }
        ),
        "a forced claim of the same epoch goes through"
    );
    assert!(
        matches!(claim_in(8, 0, &b, ordered).await, Claim::Claimed { .. }),
        "and the next epoch again takes over"
    );
}

/// A record forged with a fence no claim has must not fence the partition's real records:
/// it waits for a claim that never comes (or is refused once the table shows there is
/// none), and real records under the real claim still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_kafka_fence_neither_runs_nor_fences_real_records() {
    use leasehold_proto::v1::{source, KafkaSource, Source};
    let checker = Checker::start(Duration::ZERO, None).await;
    let cluster = cluster(1, &checker).await;
    cluster.wait_balanced(Duration::from_secs(15)).await;
    let n0 = &cluster.instances[0];
    // The real claim of orders/0 for group g, as a consumer writes it.
    let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint()], None)
        .await
        .unwrap();
    let put = etcd
        .put(
            "/leasehold/default/kafka-fences/orders/0/g",
            "0000000001/n0",
            None,
        )
        .await
        .unwrap();
    let real = put.header().unwrap().revision() as u64;
    let record = |offset: i64, fence: u64| {
        let mut r = tonic::Request::new(ForwardRequest {
            key: format!("forged-{offset}"),
            payload: "x".into(),
            shard: 0,
            expected_epoch: 0,
            entry: String::new(),
            metadata: Default::default(),
            source: Some(Source {
                kind: Some(source::Kind::Kafka(KafkaSource {
                    topic: "orders".into(),
                    partition: 0,
                    offset,
                    group: "g".into(),
                    fence,
                    cluster: String::new(),
                })),
            }),
        });
        r.set_timeout(Duration::from_millis(1500));
        r
    };
    let mut peer = PeerClient::connect(n0.peer_url()).await.unwrap();
    // Ahead of every revision: waits for a claim that never comes.
    let timed_out = |s: &tonic::Status| {
        matches!(
            s.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        )
    };
    let e = peer.forward(record(1, u64::MAX / 2)).await.unwrap_err();
    assert!(timed_out(&e), "{e}");
    // Within the revisions the table has seen, but no claim has it: refused.
    let e = peer.forward(record(2, real + 1)).await;
    let refused = match &e {
        Err(s) => s.code() == tonic::Code::InvalidArgument && s.message().contains("no claim"),
        Ok(_) => false,
    };
    // (real + 1 may not exist yet as a revision: then it waits like the first.)
    assert!(refused || matches!(&e, Err(s) if timed_out(s)), "{e:?}");
    // The real claim still runs.
    let ok = peer.forward(record(3, real)).await.unwrap().into_inner();
    assert!(
        matches!(ok.result, Some(forward_response::Result::Ok(_))),
        "a real record was fenced after a forged one: {ok:?}"
    );
    let history = checker.state.lock().unwrap().history.clone();
    assert!(
        !history.contains_key("forged-1") && !history.contains_key("forged-2"),
        "a forged record ran"
    );
}

/// An etcd answering slowly: every answer reaches the instance 1.75 s late, more than a
/// third of its 5 s TTL (and less than the etcd client's 2 s HTTP/2 ping timeout, whose
/// acknowledgements come as late). Keepalives go every TTL/3 whatever their answers, each counted
/// from when it was sent, so the lease stays valid and the instance serves. It used to
/// wait TTL/3 for each answer and then reopen the stream: etcd kept the lease alive (each
/// reopen renewed it) while the instance saw it invalid and held every call until its
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_whose_etcd_answers_slowly_keeps_its_lease_and_serves() {
    let checker = Checker::start(Duration::ZERO, None).await;
    let etcd = Etcd::start().await;
    let proxy = Proxy::start_delayed(etcd.client_port, Duration::from_millis(1750)).await;
    let flag = checker.handler_flag();
    let a = start(
        "a",
        proxy.url(),
        ["--lease-ttl", "5s", "--shards", "64", "--handler", &flag]
            .map(String::from)
            .to_vec(),
    );
    wait_until(
        Duration::from_secs(60),
        "a ready, owning every shard",
        || {
            a.ready().then_some(())?;
            let t = shard_table(&a)?;
            t.iter().all(|s| s.1.as_deref() == Some("a")).then_some(())
        },
    )
    .await;
    // Calls for 12 s (several TTLs): every one answered within 1 s (a call waits while
    // the lease is not valid here).
    let until = Instant::now() + Duration::from_secs(12);
    let mut calls = 0;
    while Instant::now() < until {
        let key = format!("slow-{calls}");
        let answer = call_ok(&a, &key, Duration::from_secs(1)).await;
        assert!(answer.is_ok(), "call {calls}: {answer:?}");
        calls += 1;
    }
    let log = a.log_text();
    assert!(!log.contains("lease expired"), "a lost its lease");
    assert!(
        !log.contains("keepalive unanswered"),
        "a took a slow stream for a silent one"
    );
    assert!(a.ready(), "a not ready");
    assert_eq!(checker.violations(), Vec::<String>::new());
}
