//! `make bench-scale`: many instances with many shards on one etcd, on this machine.
//!
//! Convergence from the last start, RSS per instance, etcd writes and watch events per
//! membership change, a rolling restart of every instance under load, and the planner's
//! time for 200 members × 65 536 shards. Figures, never assertions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::{self, Load};
use crate::{shard_table, wait_until, Cluster};

/// One figure for the table.
pub struct Figure {
    pub name: String,
    pub measured: String,
    pub target: String,
    pub met: Option<bool>,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// etcd's own counters (its `/metrics`), summed by name.
fn etcd_counters(endpoint: &str) -> BTreeMap<String, f64> {
    let text = ureq::get(&format!("{endpoint}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name.split('{').next().unwrap_or(name);
        if let Ok(v) = value.parse::<f64>() {
            *out.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    out
}

/// Writes (puts + deletes + txns) and watch events etcd counted between two snapshots.
fn etcd_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, f64) {
    let d = |n: &str| after.get(n).unwrap_or(&0.0) - before.get(n).unwrap_or(&0.0);
    (
        d("etcd_mvcc_put_total") + d("etcd_mvcc_delete_total") + d("etcd_mvcc_txn_total"),
        d("etcd_debugging_mvcc_events_total"),
    )
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Shards without an owner, as the first instance sees them.
fn unowned(cluster: &Cluster) -> Option<usize> {
    let table = shard_table(&cluster.instances[0])?;
    Some(table.iter().filter(|(_, owner, _)| owner.is_none()).count())
}

/// Every shard owned and the counts within one of each other, seen from `cluster`'s
/// first live instance.
fn balanced(cluster: &Cluster, live: &[String]) -> bool {
    let Some(table) = shard_table(&cluster.instances[0]) else {
        return false;
    };
    let mut counts: BTreeMap<&str, usize> = live.iter().map(|id| (id.as_str(), 0)).collect();
    for (_, owner, _) in &table {
        match owner.as_deref().and_then(|o| counts.get_mut(o)) {
            Some(c) => *c += 1,
            None => return false,
        }
    }
    let (min, max) = (
        counts.values().min().copied().unwrap_or(0),
        counts.values().max().copied().unwrap_or(0),
    );
    max - min <= 1
}

pub async fn run() -> Vec<Figure> {
    let instances = env("SCALE_INSTANCES", 50);
    let shards = env("SCALE_SHARDS", 4096);
    let mut figures = vec![planner()];
    let shards_arg = shards.to_string();
    let mut cluster = Cluster::start(0, &["--shards", &shards_arg, "--lease-ttl", "5s"]).await;
    let etcd = cluster.etcd.endpoint();

    // Convergence: every shard owned and balanced, from the last instance's start.
    let before = etcd_counters(&etcd);
    let started = Instant::now();
    for i in 0..instances {
        cluster.add(&format!("n{i}"));
    }
    let spawned = started.elapsed();
    let last_start = Instant::now();
    let ids: Vec<String> = cluster.instances.iter().map(|i| i.id.clone()).collect();
    let mut all_owned = None;
    wait_until(Duration::from_secs(300), "the cluster to converge", || {
        if all_owned.is_none() && unowned(&cluster) == Some(0) {
            all_owned = Some(last_start.elapsed());
        }
        balanced(&cluster, &ids).then_some(())
    })
    .await;
    let converged = last_start.elapsed();
    let all_owned = all_owned.unwrap_or(converged);
    let (writes, events) = etcd_delta(&before, &etcd_counters(&etcd));
    eprintln!("{instances} × {shards}: converged {converged:?} after the last start (starts took {spawned:?})");
    figures.push(Figure {
        name: format!("{instances} instances × {shards} shards on one etcd: last start → every shard owned, balanced"),
        measured: format!(
            "{:.1} s (every shard owned after {:.1} s; the {instances} starts took {:.1} s); etcd: {writes:.0} writes, {events:.0} watch events delivered",
            converged.as_secs_f64(),
            all_owned.as_secs_f64(),
            spawned.as_secs_f64()
        ),
        target: "≤ 10 s".into(),
        met: Some(converged <= Duration::from_secs(10)),
    });

    let mut rss: Vec<u64> = cluster
        .instances
        .iter()
        .filter_map(|i| rss_kib(i.pid()))
        .collect();
    rss.sort_unstable();
    figures.push(Figure {
        name: format!("RSS per instance ({instances} instances, {shards} shards, idle)"),
        measured: format!(
            "median {:.1} MiB, max {:.1} MiB",
            rss[rss.len() / 2] as f64 / 1024.0,
            rss[rss.len() - 1] as f64 / 1024.0
        ),
        target: "report".into(),
        met: None,
    });

    // Idle cost: what etcd does with nothing changing (lease keepalives are not writes).
    let idle_before = etcd_counters(&etcd);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (idle_writes, idle_events) = etcd_delta(&idle_before, &etcd_counters(&etcd));
    figures.push(Figure {
        name: format!("etcd load at rest ({instances} instances)"),
        measured: format!(
            "{:.1} writes/s, {:.1} watch events/s",
            idle_writes / 10.0,
            idle_events / 10.0
        ),
        target: "report".into(),
        met: None,
    });

    // One membership change: a member joins, the table rebalances.
    let before = etcd_counters(&etcd);
    let joined = Instant::now();
    cluster.add(&format!("n{instances}"));
    let ids: Vec<String> = cluster.instances.iter().map(|i| i.id.clone()).collect();
    wait_until(Duration::from_secs(120), "the join to settle", || {
        balanced(&cluster, &ids).then_some(())
    })
    .await;
    let settle = joined.elapsed();
    let (writes, events) = etcd_delta(&before, &etcd_counters(&etcd));
    figures.push(Figure {
        name: format!("one member joins {instances} ({shards} shards): etcd cost and time to rebalance"),
        measured: format!(
            "{writes:.0} writes, {events:.0} watch events delivered ({:.0} per instance), balanced in {:.1} s",
            events / (instances + 1) as f64,
            settle.as_secs_f64()
        ),
        target: "report".into(),
        met: None,
    });

    // Rolling restart of every instance under load: each leaves the load's targets, is
    // stopped with SIGTERM (drains), started again and put back.
    let targets = load::targets(&cluster.instances).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load::run(
        targets.clone(),
        Load {
            keys: 2000,
            concurrency: 16,
            total: None,
            timeout: Duration::from_secs(10),
            payload: 16,
        },
        stop.clone(),
    ));
    let rolling = Instant::now();
    for i in 0..cluster.instances.len() {
        let id = cluster.instances[i].id.clone();
        assert!(
            targets.take_out(&id, Duration::from_secs(10)).await,
            "calls sent to {id} still ran 10 s after it was taken out"
        );
        cluster.instances[i].signal("TERM");
        cluster.instances[i]
            .wait_exit(Duration::from_secs(60))
            .await;
        cluster.restart(i);
        let instance = &cluster.instances[i];
        wait_until(
            Duration::from_secs(60),
            "the restarted instance to be ready",
            || instance.ready().then_some(()),
        )
        .await;
        let client = instance.client().await;
        targets.add(id, client);
    }
    let ids: Vec<String> = cluster.instances.iter().map(|i| i.id.clone()).collect();
    wait_until(Duration::from_secs(120), "the cluster to settle", || {
        balanced(&cluster, &ids).then_some(())
    })
    .await;
    let took = rolling.elapsed();
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    eprintln!(
        "rolling restart: {} ok, {} failed in {took:?}",
        report.ok,
        report.failed.len()
    );
    for f in report.failed.iter().take(5) {
        eprintln!("  failed: {f:?}");
    }
    figures.push(Figure {
        name: format!(
            "rolling restart of all {} instances under load (SIGTERM, drain, start)",
            cluster.instances.len()
        ),
        measured: format!(
            "{} calls ok, {} failed, in {:.0} s; p99 {:?}",
            report.ok,
            report.failed.len(),
            took.as_secs_f64(),
            report.percentile(0.99)
        ),
        target: "0 failed calls".into(),
        met: Some(report.failed.is_empty()),
    });
    figures
}

/// The leader's planning pass for 200 members × 65 536 shards: from a table where a
/// new member owns nothing (the largest rebalance a join causes), median of 5.
fn planner() -> Figure {
    use leasehold_types::MemberId;
    let (members, shards) = (200usize, 65_536usize);
    let active: Vec<MemberId> = (0..members)
        .map(|i| MemberId(format!("member-{i:03}")))
        .collect();
    let owners: Vec<Option<MemberId>> = (0..shards)
        .map(|s| Some(active[s % (members - 1)].clone()))
        .collect();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let plan = leasehold_placement::plan(leasehold_placement::PlanInput {
            active: &active,
            owners: &owners,
            previous: &[],
            max_moves: 256,
            ..Default::default()
        });
        times.push(t.elapsed());
        assert_eq!(plan.len(), shards);
    }
    times.sort();
    let median = times[times.len() / 2];
    Figure {
        name: "planner: 200 members × 65 536 shards, one planning pass".into(),
        measured: format!("median {median:?} of 5"),
        target: "≤ 50 ms".into(),
        met: Some(median <= Duration::from_millis(50)),
    }
}
