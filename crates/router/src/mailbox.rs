//! Per-key turns: calls for one key take turns in arrival order, calls for different
//! keys run in parallel.
//!
//! A key with no call in progress has no entry. The first call inserts an empty queue and
//! runs at once (no task, no channel); later calls queue a wake-up and wait; a finishing
//! call hands its turn to the next waiter, or removes the entry when nobody waits
//! (passivation). Queues are bounded: a full one refuses the call.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use leasehold_types::key_hash;
use tokio::sync::oneshot;

/// Lock stripes of the key map, to keep unrelated keys off one lock.
const STRIPES: usize = 64;

type Waiters = VecDeque<oneshot::Sender<()>>;

/// Keys are shared between the map and the call holding the turn (one copy per call).
type Key = Arc<str>;

pub(crate) struct Mailboxes {
    stripes: Vec<Mutex<HashMap<Key, Waiters>>>,
    capacity: usize,
}

/// The queue of the key is full.
#[derive(Debug)]
pub(crate) struct Full;

/// The right to run the next call for a key; dropping it passes the turn on.
pub(crate) struct Turn {
    boxes: Arc<Mailboxes>,
    key: Key,
}

/// A queued call waiting for its turn. Dropping it (the caller gave up) is safe: a turn
/// handed to it in the meantime is passed on.
pub(crate) struct Waiting {
    boxes: Arc<Mailboxes>,
    /// `None` once `turn` took it.
    key: Option<Key>,
    rx: Option<oneshot::Receiver<()>>,
}

impl Mailboxes {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            capacity,
        }
    }

    fn stripe(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<Key, Waiters>> {
        self.stripes[(key_hash(key.as_bytes()) % STRIPES as u64) as usize]
            .lock()
            .expect("mailbox lock")
    }

    /// Joins the queue of `key`.
    pub(crate) fn enter(self: &Arc<Self>, key: &str) -> Result<Waiting, Full> {
        let mut map = self.stripe(key);
        let (key, rx) = match map.get_mut(key) {
            None => {
                let key: Key = key.into();
                map.insert(key.clone(), VecDeque::new());
                (key, None)
            }
            Some(waiters) if waiters.len() >= self.capacity => return Err(Full),
            Some(waiters) => {
                let (tx, rx) = oneshot::channel();
                waiters.push_back(tx);
                (key.into(), Some(rx))
            }
        };
        Ok(Waiting {
            boxes: self.clone(),
            key: Some(key),
            rx,
        })
    }

    fn pass_on(&self, key: &str) {
        let mut map = self.stripe(key);
        let Some(waiters) = map.get_mut(key) else {
            return;
        };
        while let Some(next) = waiters.pop_front() {
            if next.send(()).is_ok() {
                return;
            }
            // that caller gave up; try the one behind it
        }
        map.remove(key);
    }

    /// Number of keys with a call in progress.
    pub(crate) fn active(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().expect("mailbox lock").len())
            .sum()
    }
}

impl Waiting {
    /// Waits until every earlier call for the key has finished.
    pub(crate) async fn turn(mut self) -> Turn {
        if let Some(rx) = self.rx.as_mut() {
            // The sender is only dropped after a successful send or by `pass_on`
            // skipping us, which happens only once our receiver is gone.
            let _ = rx.await;
        }
        self.rx = None;
        Turn {
            boxes: self.boxes.clone(),
            key: self.key.take().expect("a waiting call has its key"),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return; // `turn` took it
        };
        match self.rx.take() {
            Some(mut rx) => {
                rx.close();
                if rx.try_recv().is_ok() {
                    // The turn arrived but its caller left: hand it to the next one.
                    self.boxes.pass_on(&key);
                }
            }
            // First in line, dropped before taking its turn (a call admitted and then
            // cancelled): hand the turn on.
            None => self.boxes.pass_on(&key),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.boxes.pass_on(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_key_runs_serially_in_order_and_keys_run_in_parallel() {
        let boxes = Arc::new(Mailboxes::new(1000));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let key = if i % 2 == 0 { "a" } else { "b" };
            // Enter in order (as calls arrive), then run concurrently.
            let waiting = boxes.enter(key).unwrap();
            let (running, peak, order) = (running.clone(), peak.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = waiting.turn().await;
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200)).await;
                order.lock().unwrap().push((key, i));
                running.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        for key in ["a", "b"] {
            let seq: Vec<u32> = order
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, i)| *i)
                .collect();
            assert_eq!(seq.len(), 100);
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "key {key} out of order"
            );
        }
        // Two keys: never more than two at once, and they did overlap.
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(boxes.active(), 0, "idle keys are dropped");
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_and_callers_that_leave_pass_their_turn_on() {
        let boxes = Arc::new(Mailboxes::new(2));
        let first = boxes.enter("k").unwrap().turn().await;
        let second = boxes.enter("k").unwrap();
        let third = boxes.enter("k").unwrap();
        assert!(
            boxes.enter("k").is_err(),
            "a third waiter exceeds capacity 2"
        );
        drop(second); // gave up while waiting
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), third.turn())
            .await
            .expect("turn passed on");
        drop(third);
        assert_eq!(boxes.active(), 0);
    }

    #[tokio::test]
    async fn a_turn_handed_to_a_departed_caller_is_not_lost() {
        let boxes = Arc::new(Mailboxes::new(10));
        let first = boxes.enter("k").unwrap().turn().await;
        let second = boxes.enter("k").unwrap();
        let third = boxes.enter("k").unwrap();
        drop(first); // hands the turn to `second` ...
        drop(second); // ... which leaves without using it
        tokio::time::timeout(Duration::from_secs(1), third.turn())
            .await
            .expect("turn passed on");
    }

    #[tokio::test]
    async fn a_first_in_line_dropped_before_taking_its_turn_passes_it_on() {
        let boxes = Arc::new(Mailboxes::new(10));
        let first = boxes.enter("k").unwrap(); // its turn is already here
        let second = boxes.enter("k").unwrap();
        drop(first); // admitted, then cancelled before it ran
        tokio::time::timeout(Duration::from_secs(1), second.turn())
            .await
            .expect("turn passed on");
        assert_eq!(boxes.active(), 0);
    }
}
