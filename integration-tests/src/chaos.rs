//! Records and invariant checks of the chaos suite (`leasehold-chaos`), kept apart from
//! the processes so that each check is a pure function with tests that make it fail.
//!
//! Every check reads only the suite's own records: the handler sidecars' execution logs
//! (`leasehold-chaos-handler`), the acknowledged values the load clients got back, the
//! counter files, and the producer's delivery reports. Never Leasehold's own metrics.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// CLOCK_MONOTONIC in nanoseconds. Every namespace on one machine shares this clock, so
/// the sidecars' intervals can be compared with each other.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Where a handler call came from, as the sidecar saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KafkaPos {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One handler execution: one JSON line in a sidecar's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execution {
    /// Host (namespace) whose sidecar ran it.
    pub host: String,
    pub key: String,
    pub shard: u32,
    pub epoch: u64,
    pub owner: String,
    pub kafka: Option<KafkaPos>,
    /// CLOCK_MONOTONIC ns just before the read and just after the write.
    pub start_ns: u64,
    pub end_ns: u64,
    pub read: u64,
    pub wrote: u64,
}

/// Reads the sidecar logs (a line cut by a SIGKILL is skipped).
pub fn read_executions(paths: &[std::path::PathBuf]) -> Vec<Execution> {
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Execution>(l).ok()),
        );
    }
    out
}

fn describe(e: &Execution) -> String {
    format!(
        "{}@{} epoch {} shard {} on {} [{:.3}s..{:.3}s]{}",
        e.key,
        e.owner,
        e.epoch,
        e.shard,
        e.host,
        e.start_ns as f64 / 1e9,
        e.end_ns as f64 / 1e9,
        e.kafka
            .as_ref()
            .map(|k| format!(" {}/{}@{}", k.topic, k.partition, k.offset))
            .unwrap_or_default()
    )
}

/// (a) Single writer: no two executions of one key overlap in monotonic time.
pub fn check_no_overlap(execs: &[Execution]) -> Vec<String> {
    let mut by_key: HashMap<&str, Vec<&Execution>> = HashMap::new();
    for e in execs {
        by_key.entry(&e.key).or_default().push(e);
    }
    let mut violations = Vec::new();
    for list in by_key.values_mut() {
        list.sort_by_key(|e| (e.start_ns, e.end_ns));
        let mut latest: Option<&Execution> = None; // the one ending last so far
        for e in list.iter() {
            if let Some(l) = latest {
                if e.start_ns < l.end_ns {
                    violations.push(format!(
                        "overlap: {} started while {} still ran",
                        describe(e),
                        describe(l)
                    ));
                }
                if e.end_ns > l.end_ns {
                    latest = Some(e);
                }
            } else {
                latest = Some(e);
            }
        }
    }
    violations.sort();
    violations
}

/// (b) No lost acknowledged update. `acks`: key → every value a Call returned OK for it
/// (the counter after that increment); `finals`: key → value in the counter store at
/// the end. Each acknowledged value must be unique per key (a repeat means two
/// increments read the same value: one was lost), and the final value must be at least
/// the number of acknowledged increments and at least the largest acknowledged value.
pub fn check_counters(
    acks: &HashMap<String, Vec<u64>>,
    finals: &HashMap<String, u64>,
) -> Vec<String> {
    let mut violations = Vec::new();
    let mut keys: Vec<&String> = acks.keys().collect();
    keys.sort();
    for key in keys {
        let values = &acks[key];
        let mut count: BTreeMap<u64, usize> = BTreeMap::new();
        for v in values {
            *count.entry(*v).or_default() += 1;
        }
        for (v, n) in count.iter().filter(|(_, n)| **n > 1) {
            violations.push(format!(
                "lost update: key {key}: value {v} acknowledged {n} times"
            ));
        }
        let fin = finals.get(key).copied().unwrap_or(0);
        let max = values.iter().copied().max().unwrap_or(0);
        if fin < values.len() as u64 {
            violations.push(format!(
                "lost update: key {key}: final counter {fin} < {} acknowledged increments",
                values.len()
            ));
        }
        if fin < max {
            violations.push(format!(
                "lost update: key {key}: final counter {fin} < acknowledged value {max}"
            ));
        }
    }
    violations
}

/// A record the producer got a delivery report for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    pub key: String,
    pub partition: i32,
    pub offset: i64,
}

/// Figures of the Kafka check.
#[derive(Debug, Default, Clone)]
pub struct KafkaStats {
    pub produced: usize,
    pub executions: usize,
    /// Executions of an offset already executed before (at-least-once re-deliveries).
    pub repeats: usize,
    /// Times a (key, partition) sequence went back to an earlier offset (a replay).
    pub rewinds: usize,
    /// Produced records found in the dead-letter topic.
    pub dead_lettered: usize,
}

/// (c) Kafka ingestion, per key `k` and partition `p`, with `P(k,p)` the offsets the
/// producer got delivery reports for, in order, and the executions of `(k,p)` ordered by
/// start time (they never overlap when (a) holds):
///
/// Offsets in `dead_lettered` (Leasehold gave up on them and wrote them to the
/// dead-letter topic, e.g. while the handler was down) are left out of `P(k,p)`: they
/// are counted, not required.
///
/// 1. coverage (when `require_all`): every produced offset is executed at least once;
/// 2. the right key: an execution of `(p,o)` carries the key `o` was produced with;
/// 3. order and no stale re-run: each execution's offset is either the successor in
///    `P(k,p)` of the previous execution's offset (the first execution: `P(k,p)[0]`), or
///    not larger than the previous one (a *rewind*: a replay from the committed offset
///    after a rebalance or a crash, allowed by at-least-once). A jump forward past an
///    offset of `(k,p)` is a violation: either an offset ran before an earlier one, or
///    an old offset re-ran (stale) and the sequence then moved on without replaying
///    what follows it, i.e. a zombie consumer's leftover interleaved with the new one.
pub fn check_kafka(
    topic: &str,
    produced: &[Produced],
    dead_lettered: &std::collections::HashSet<(i32, i64)>,
    execs: &[Execution],
    require_all: bool,
) -> (Vec<String>, KafkaStats) {
    let mut violations = Vec::new();
    let mut stats = KafkaStats {
        produced: produced.len(),
        ..KafkaStats::default()
    };
    let mut key_of: HashMap<(i32, i64), &str> = HashMap::new();
    let mut offsets: HashMap<(&str, i32), Vec<i64>> = HashMap::new();
    for r in produced {
        key_of.insert((r.partition, r.offset), &r.key);
        if dead_lettered.contains(&(r.partition, r.offset)) {
            stats.dead_lettered += 1;
            continue;
        }
        offsets
            .entry((&r.key, r.partition))
            .or_default()
            .push(r.offset);
    }
    for list in offsets.values_mut() {
        list.sort_unstable();
    }
    let mut runs: HashMap<(&str, i32), Vec<&Execution>> = HashMap::new();
    let mut seen: HashMap<(i32, i64), usize> = HashMap::new();
    for e in execs {
        let Some(k) = e.kafka.as_ref().filter(|k| k.topic == topic) else {
            continue;
        };
        stats.executions += 1;
        *seen.entry((k.partition, k.offset)).or_default() += 1;
        match key_of.get(&(k.partition, k.offset)) {
            Some(want) if *want != e.key => violations.push(format!(
                "wrong key: {} ran {}/{}@{} produced with key {want}",
                describe(e),
                topic,
                k.partition,
                k.offset
            )),
            _ => {}
        }
        runs.entry((&e.key, k.partition)).or_default().push(e);
    }
    stats.repeats = seen.values().map(|n| n - 1).sum();
    if require_all {
        let mut missing: Vec<&Produced> = produced
            .iter()
            .filter(|r| {
                !seen.contains_key(&(r.partition, r.offset))
                    && !dead_lettered.contains(&(r.partition, r.offset))
            })
            .collect();
        missing.sort_by_key(|r| (r.partition, r.offset));
        for r in missing.iter().take(20) {
            violations.push(format!(
                "never handled: {topic}/{}@{} key {}",
                r.partition, r.offset, r.key
            ));
        }
        if missing.len() > 20 {
            violations.push(format!(
                "never handled: {} more produced records",
                missing.len() - 20
            ));
        }
    }
    let mut keys: Vec<_> = runs.keys().copied().collect();
    keys.sort();
    for kp in keys {
        let list = runs.get_mut(&kp).unwrap();
        list.sort_by_key(|e| (e.start_ns, e.end_ns));
        let Some(p_offsets) = offsets.get(&kp) else {
            continue; // no delivery report for any of them: nothing to compare with
        };
        let mut prev: Option<i64> = None;
        // The last rewind: (offset before it, the execution it went back to).
        let mut rewind: Option<(i64, &Execution)> = None;
        for e in list.iter() {
            let o = e.kafka.as_ref().unwrap().offset;
            let expected = match prev {
                None => p_offsets.first().copied(),
                Some(p) if o <= p => {
                    stats.rewinds += 1;
                    rewind = Some((p, e));
                    prev = Some(o);
                    continue;
                }
                Some(p) => p_offsets.iter().copied().find(|x| *x > p),
            };
            if let Some(x) = expected.filter(|x| o > *x) {
                let p = prev.map_or("nothing".into(), |p| p.to_string());
                let v = match rewind.filter(|(_, r)| r.kafka.as_ref().unwrap().offset == prev.unwrap_or(-1)) {
                    Some((before, r)) => format!(
                        "stale re-run: key {} partition {}: offset {p} ran again after {before} ({}), then {o} ran without {x} being replayed",
                        kp.0, kp.1, describe(r)
                    ),
                    None => format!(
                        "order: key {} partition {}: offset {o} ran after {p} without {x} first ({})",
                        kp.0, kp.1, describe(e)
                    ),
                };
                violations.push(v);
            }
            prev = Some(o);
        }
    }
    (violations, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(key: &str, start: u64, end: u64, kafka: Option<(i32, i64)>) -> Execution {
        Execution {
            host: "n0".into(),
            key: key.into(),
            shard: 1,
            epoch: 7,
            owner: "n0".into(),
            kafka: kafka.map(|(partition, offset)| KafkaPos {
                topic: "t".into(),
                partition,
                offset,
            }),
            start_ns: start,
            end_ns: end,
            read: 0,
            wrote: 1,
        }
    }

    #[test]
    fn overlap_is_found_and_back_to_back_is_not() {
        let ok = [exec("a", 0, 10, None), exec("a", 10, 20, None)];
        assert!(check_no_overlap(&ok).is_empty());
        // [50,60] starts inside [0,100]; [110,115] inside [100,120]; "b" is another key.
        let bad = [
            exec("a", 0, 100, None),
            exec("a", 100, 120, None),
            exec("b", 5, 6, None),
            exec("a", 50, 60, None),
            exec("a", 110, 115, None),
        ];
        let v = check_no_overlap(&bad);
        assert_eq!(v.len(), 2, "{v:?}");
    }

    #[test]
    fn repeated_or_missing_acks_are_lost_updates() {
        let finals = HashMap::from([("k".to_string(), 3)]);
        let ok = HashMap::from([("k".to_string(), vec![1, 2, 3])]);
        assert!(check_counters(&ok, &finals).is_empty());
        let repeat = HashMap::from([("k".to_string(), vec![1, 2, 2])]);
        assert_eq!(check_counters(&repeat, &finals).len(), 1);
        let too_many = HashMap::from([("k".to_string(), vec![1, 2, 4, 5])]);
        assert_eq!(check_counters(&too_many, &finals).len(), 2);
    }

    fn produced(key: &str, p: i32, offsets: &[i64]) -> Vec<Produced> {
        offsets
            .iter()
            .map(|o| Produced {
                key: key.into(),
                partition: p,
                offset: *o,
            })
            .collect()
    }

    #[test]
    fn kafka_order_coverage_and_replays() {
        let none = std::collections::HashSet::new();
        let mut prod = produced("a", 0, &[1, 4, 6]);
        prod.extend(produced("b", 0, &[2, 3, 5]));
        let run = |seq: &[(&str, i64)]| -> Vec<Execution> {
            seq.iter()
                .enumerate()
                .map(|(i, (k, o))| exec(k, i as u64 * 10, i as u64 * 10 + 5, Some((0, *o))))
                .collect()
        };
        // In order, with a replay of "a" from 1 after a crash: fine.
        let ok = run(&[
            ("a", 1),
            ("b", 2),
            ("a", 4),
            ("b", 3),
            ("a", 1),
            ("a", 4),
            ("a", 6),
            ("b", 5),
        ]);
        let (v, stats) = check_kafka("t", &prod, &none, &ok, true);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!((stats.rewinds, stats.repeats), (1, 2));
        // 6 before 4.
        let (v, _) = check_kafka(
            "t",
            &prod,
            &none,
            &run(&[("a", 1), ("a", 6), ("a", 4)]),
            false,
        );
        assert_eq!(v.len(), 1, "{v:?}");
        // A stale re-run of 1 after 4, then 6 without replaying 4.
        let stale = run(&[("a", 1), ("a", 4), ("a", 1), ("a", 6)]);
        let (v, _) = check_kafka("t", &prod, &none, &stale, false);
        assert_eq!(v.len(), 1, "{v:?}");
        // Coverage: b never ran; a's 6 never ran.
        let (v, _) = check_kafka("t", &prod, &none, &run(&[("a", 1), ("a", 4)]), true);
        assert_eq!(v.len(), 4, "{v:?}");
        // A dead-lettered 4 is neither required nor a gap.
        let dlq = std::collections::HashSet::from([(0, 4)]);
        let (v, stats) = check_kafka("t", &prod, &dlq, &run(&[("a", 1), ("a", 6)]), false);
        assert!(v.is_empty() && stats.dead_lettered == 1, "{v:?}");
        // Wrong key for an offset.
        let (v, _) = check_kafka("t", &prod, &none, &run(&[("b", 1)]), false);
        assert!(v.iter().any(|v| v.starts_with("wrong key")), "{v:?}");
    }
}
