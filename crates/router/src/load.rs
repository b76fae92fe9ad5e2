//! Per-shard load as the owner measures it: handler calls and busy time, counted lock-free
//! on the call path and turned into smoothed rates by the reporter, which publishes them
//! (`loads/<member>` in etcd) for the leader's load-aware planner and the status page.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold_coord::{LoadReport, LocalState};
use leasehold_types::{Epoch, ShardId};

/// Calls and busy nanoseconds per shard since this instance started (never reset: the
/// reporter works on differences).
pub struct LoadMeter {
    calls: Box<[AtomicU64]>,
    busy_nanos: Box<[AtomicU64]>,
}

impl LoadMeter {
    pub fn new(shard_count: u32) -> Self {
        let zeros = || (0..shard_count).map(|_| AtomicU64::new(0)).collect();
        Self {
            calls: zeros(),
            busy_nanos: zeros(),
        }
    }

    /// One handler call of `shard` that took `busy`.
    pub fn record(&self, shard: ShardId, busy: Duration) {
        let i = shard.0 as usize;
        if let (Some(c), Some(b)) = (self.calls.get(i), self.busy_nanos.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    fn read(&self, shard: ShardId) -> (u64, u64) {
        let i = shard.0 as usize;
        (
            self.calls.get(i).map_or(0, |c| c.load(Ordering::Relaxed)),
            self.busy_nanos
                .get(i)
                .map_or(0, |b| b.load(Ordering::Relaxed)),
        )
    }
}

/// Smoothing state of one owned shard.
#[derive(Debug, Clone, Copy)]
struct Rate {
    epoch: Epoch,
    calls: u64,
    busy_nanos: u64,
    /// Smoothed calls/s and busy s/s; `None` until a whole interval was measured under
    /// this ownership (a partial one would understate the load).
    smoothed: Option<(f64, f64)>,
}

/// Turns counter readings into exponentially smoothed rates per owned shard.
pub struct LoadSmoother {
    /// Time constant of the smoothing.
    smoothing: Duration,
    rates: HashMap<ShardId, Rate>,
}

impl LoadSmoother {
    pub fn new(smoothing: Duration) -> Self {
        Self {
            smoothing,
            rates: HashMap::new(),
        }
    }

    /// Reads the meter for the shards held now, `elapsed` after the previous sample, and
    /// returns the report: every owned shard with a measured rate (a shard acquired since
    /// the last sample is reported from the next one on).
    pub fn sample(
        &mut self,
        meter: &LoadMeter,
        held: &[(ShardId, LocalState)],
        elapsed: Duration,
    ) -> LoadReport {
        let dt = elapsed.as_secs_f64();
        let alpha = if self.smoothing.is_zero() {
            1.0
        } else {
            1.0 - (-dt / self.smoothing.as_secs_f64()).exp()
        };
        let mut next = HashMap::with_capacity(held.len());
        let mut report = LoadReport::default();
        for &(shard, state) in held {
            let epoch = match state {
                LocalState::Owned(e) | LocalState::Moving(e) => e,
                LocalState::NotOwned => continue,
            };
            let (calls, busy_nanos) = meter.read(shard);
            let rate = match self.rates.get(&shard) {
                Some(prev) if prev.epoch == epoch && dt > 0.0 => {
                    let c = calls.saturating_sub(prev.calls) as f64 / dt;
                    let b = busy_nanos.saturating_sub(prev.busy_nanos) as f64 / 1e9 / dt;
                    let smoothed = match prev.smoothed {
                        Some((sc, sb)) => (sc + alpha * (c - sc), sb + alpha * (b - sb)),
                        None => (c, b),
                    };
                    Rate {
                        epoch,
                        calls,
                        busy_nanos,
                        smoothed: Some(smoothed),
                    }
                }
                // Newly owned (or owned again under a new epoch): start measuring.
                _ => Rate {
                    epoch,
                    calls,
                    busy_nanos,
                    smoothed: None,
                },
            };
            if let Some((c, b)) = rate.smoothed {
                report.shards.push(shard.0);
                report.calls.push(round(c, 1e3));
                report.busy.push(round(b, 1e6));
            }
            next.insert(shard, rate);
        }
        self.rates = next;
        report
    }
}

/// Rounds to `1 / scale` so reports stay short (calls to 0.001/s, busy to 1 µs/s).
fn round(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(shards: &[(u32, u64)]) -> Vec<(ShardId, LocalState)> {
        shards
            .iter()
            .map(|&(s, e)| (ShardId(s), LocalState::Owned(Epoch(e))))
            .collect()
    }

    #[test]
    fn rates_start_after_a_whole_interval_and_follow_the_load() {
        let meter = LoadMeter::new(4);
        let mut smoother = LoadSmoother::new(Duration::from_secs(10));
        let second = Duration::from_secs(1);
        // First sample only starts measuring.
        for _ in 0..5 {
            meter.record(ShardId(1), Duration::from_millis(10));
        }
        assert!(smoother
            .sample(&meter, &owned(&[(1, 7)]), second)
            .shards
            .is_empty());
        // 100 calls of 10 ms in one second: 100 calls/s, 1 busy s/s.
        for _ in 0..100 {
            meter.record(ShardId(1), Duration::from_millis(10));
        }
        let r = smoother.sample(&meter, &owned(&[(1, 7)]), second);
        assert_eq!(
            (r.shards, r.calls, r.busy),
            (vec![1], vec![100.0], vec![1.0])
        );
        // Idle for a second: smoothed, not dropped to 0.
        let r = smoother.sample(&meter, &owned(&[(1, 7)]), second);
        assert!(r.calls[0] > 80.0 && r.calls[0] < 100.0, "{:?}", r.calls);
    }

    #[test]
    fn a_new_ownership_starts_over_and_lost_shards_are_not_reported() {
        let meter = LoadMeter::new(4);
        let mut smoother = LoadSmoother::new(Duration::ZERO);
        let second = Duration::from_secs(1);
        smoother.sample(&meter, &owned(&[(0, 1), (2, 1)]), second);
        meter.record(ShardId(0), Duration::ZERO);
        meter.record(ShardId(2), Duration::ZERO);
        let r = smoother.sample(&meter, &owned(&[(0, 1), (2, 1)]), second);
        assert_eq!(r.shards, vec![0, 2]);
        // Shard 0 re-acquired under epoch 5, shard 2 gone.
        meter.record(ShardId(0), Duration::ZERO);
        let r = smoother.sample(&meter, &owned(&[(0, 5)]), second);
        assert!(r.shards.is_empty(), "{r:?}");
        meter.record(ShardId(0), Duration::ZERO);
        meter.record(ShardId(0), Duration::ZERO);
        let r = smoother.sample(&meter, &owned(&[(0, 5)]), second);
        assert_eq!((r.shards, r.calls), (vec![0], vec![2.0]));
    }
}
