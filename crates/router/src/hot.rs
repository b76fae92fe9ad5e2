//! The keys that take the most calls at this owner: a sampled Space-Saving count over a
//! sliding window of two periods.
//!
//! One key cannot be split across owners without breaking single-writer, so a hot key is
//! something to see (and to pin its shard to a roomy member, or to fix in the workload),
//! not something placement can spread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use leasehold_types::ShardId;

/// One call in this many is counted (the rest cost an atomic increment).
pub const SAMPLE_EVERY: u64 = 8;
/// Keys tracked at once; beyond it the least counted is replaced (Space-Saving), so a key
/// that suddenly gets hot still surfaces.
pub const CAPACITY: usize = 256;
/// Length of one counting period; rates cover the current and the previous period.
pub const PERIOD: Duration = Duration::from_secs(10);
/// Keys reported.
pub const TOP: usize = 10;

/// A hot key as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct HotKey {
    pub key: String,
    pub shard: u32,
    /// Estimated from the sampled count (± `SAMPLE_EVERY` / period).
    pub calls_per_second: f64,
}

#[derive(Default)]
struct Counts {
    started: Option<Instant>,
    /// Key → (sampled count, shard).
    keys: HashMap<String, (u64, ShardId)>,
    /// Eviction candidates: keys that had the smallest count, `floor`, when the table
    /// was last scanned. Counts only grow and newcomers enter above the floor, so a
    /// candidate still at `floor` is a smallest key; one scan serves many evictions
    /// (with many keys, most share the smallest count).
    candidates: Vec<String>,
    floor: u64,
}

impl Counts {
    /// Removes a key with the smallest count and returns that count.
    fn evict_smallest(&mut self) -> u64 {
        loop {
            while let Some(k) = self.candidates.pop() {
                if self.keys.get(&k).is_some_and(|(c, _)| *c == self.floor) {
                    self.keys.remove(&k);
                    return self.floor;
                }
            }
            self.floor = self.keys.values().map(|(c, _)| *c).min().expect("full");
            let floor = self.floor;
            self.candidates = self
                .keys
                .iter()
                .filter(|(_, (c, _))| *c == floor)
                .map(|(k, _)| k.clone())
                .collect();
        }
    }
}

#[derive(Default)]
struct Periods {
    current: Counts,
    previous: Counts,
    /// How long the previous period lasted.
    previous_length: Duration,
}

/// Hot-key counter of one instance.
#[derive(Default)]
pub struct HotKeys {
    calls: AtomicU64,
    periods: Mutex<Periods>,
}

impl HotKeys {
    /// Counts a call for `key` (one in [`SAMPLE_EVERY`]).
    pub fn record(&self, key: &str, shard: ShardId) {
        if self.calls.fetch_add(1, Ordering::Relaxed) % SAMPLE_EVERY != 0 {
            return;
        }
        let now = Instant::now();
        let mut p = self.periods.lock().expect("hot keys lock");
        p.roll(now);
        let counts = &mut p.current;
        if let Some(entry) = counts.keys.get_mut(key) {
            entry.0 += 1;
            return;
        }
        let start = if counts.keys.len() < CAPACITY {
            0
        } else {
            // Space-Saving: the newcomer inherits the smallest count (an upper bound of
            // what it may have had while untracked).
            counts.evict_smallest()
        };
        counts.keys.insert(key.to_owned(), (start + 1, shard));
    }

    /// The hottest keys over the current and the previous period, hottest first.
    pub fn top(&self) -> Vec<HotKey> {
        let now = Instant::now();
        let mut p = self.periods.lock().expect("hot keys lock");
        p.roll(now);
        let current_length = p.current.started.map_or(Duration::ZERO, |s| now - s);
        let seconds = (p.previous_length + current_length).as_secs_f64();
        if seconds <= 0.0 {
            return Vec::new();
        }
        let mut merged: HashMap<&str, (u64, ShardId)> = HashMap::new();
        for (k, (c, s)) in p.previous.keys.iter().chain(p.current.keys.iter()) {
            let e = merged.entry(k.as_str()).or_insert((0, *s));
            e.0 += c;
        }
        let mut top: Vec<HotKey> = merged
            .into_iter()
            .map(|(key, (count, shard))| HotKey {
                key: key.to_owned(),
                shard: shard.0,
                calls_per_second: (count * SAMPLE_EVERY) as f64 / seconds,
            })
            .collect();
        top.sort_by(|a, b| {
            b.calls_per_second
                .total_cmp(&a.calls_per_second)
                .then_with(|| a.key.cmp(&b.key))
        });
        top.truncate(TOP);
        top
    }
}

impl Periods {
    /// Starts a new period once the current one is `PERIOD` old; a period that saw no
    /// call for a whole period leaves nothing behind.
    fn roll(&mut self, now: Instant) {
        let started = *self.current.started.get_or_insert(now);
        let age = now - started;
        if age < PERIOD {
            return;
        }
        if age >= 2 * PERIOD {
            // Idle for more than a period: nothing recent to report.
            *self = Periods::default();
            self.current.started = Some(now);
            return;
        }
        self.previous = std::mem::take(&mut self.current);
        self.previous_length = age;
        self.current.started = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hottest_key_comes_first_with_its_rate_and_shard() {
        let hot = HotKeys::default();
        for i in 0..8000 {
            hot.record("hot", ShardId(7));
            if i % 4 == 0 {
                hot.record(&format!("cold-{}", i % 40), ShardId(1));
            }
        }
        let top = hot.top();
        assert_eq!(top[0].key, "hot");
        assert_eq!(top[0].shard, 7);
        assert!(top.len() <= TOP);
        assert!(
            top[0].calls_per_second > top[1].calls_per_second * 10.0,
            "{top:?}"
        );
    }

    #[test]
    fn eviction_removes_a_key_with_the_smallest_count() {
        let mut c = Counts::default();
        for i in 0..CAPACITY as u64 {
            c.keys.insert(format!("k{i}"), (10 + i % 3, ShardId(0)));
        }
        let mut evicted = Vec::new();
        for _ in 0..(CAPACITY / 3 + 5) {
            let count = c.evict_smallest();
            let smallest = c.keys.values().map(|(n, _)| *n).min().unwrap();
            assert!(count <= smallest, "evicted {count}, {smallest} left");
            evicted.push(count);
            c.keys
                .insert(format!("new{}", evicted.len()), (count + 1, ShardId(0)));
        }
        // The 86 keys at 10 go first; then the newcomers (at 11) and the keys at 11 tie.
        assert!(evicted[..86].iter().all(|n| *n == 10), "{evicted:?}");
        assert!(evicted[86..].iter().all(|n| *n == 11), "{evicted:?}");
    }

    #[test]
    fn a_new_hot_key_surfaces_past_the_capacity() {
        let hot = HotKeys::default();
        for i in 0..(CAPACITY as u64 * SAMPLE_EVERY * 4) {
            hot.record(&format!("k{i}"), ShardId(0));
        }
        for _ in 0..SAMPLE_EVERY * 50 {
            hot.record("late", ShardId(3));
        }
        assert_eq!(hot.top()[0].key, "late");
    }
}
