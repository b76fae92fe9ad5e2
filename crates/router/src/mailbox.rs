//! Per-key mailboxes: one queue and one task per active key, so calls for a key run one
//! at a time in arrival order while other keys run in parallel. A mailbox task exits as
//! soon as its queue is empty (passivation), so idle keys cost nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use leasehold_types::key_hash;
use tokio::sync::mpsc;

/// Lock stripes of the mailbox map, to keep unrelated keys off one lock.
const STRIPES: usize = 64;

pub(crate) struct Mailboxes<J> {
    stripes: Vec<Mutex<HashMap<String, mpsc::Sender<J>>>>,
    capacity: usize,
}

/// The queue of `key` is full.
pub(crate) struct Full;

impl<J: Send + 'static> Mailboxes<J> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            capacity,
        }
    }

    fn stripe(&self, key: &str) -> &Mutex<HashMap<String, mpsc::Sender<J>>> {
        &self.stripes[(key_hash(key.as_bytes()) % STRIPES as u64) as usize]
    }

    /// Queues `job` for `key`; starts the key's task with `run` when it has none.
    pub(crate) fn submit<F, Fut>(self: &Arc<Self>, key: &str, job: J, run: F) -> Result<(), Full>
    where
        F: Fn(J) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let mut map = self.stripe(key).lock().expect("mailbox lock");
        let job = match map.get(key) {
            Some(tx) => match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => return Err(Full),
                Err(mpsc::error::TrySendError::Closed(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel(self.capacity);
        tx.try_send(job).map_err(|_| Full)?;
        map.insert(key.to_owned(), tx);
        drop(map);
        let this = self.clone();
        let key = key.to_owned();
        tokio::spawn(async move { this.drain(key, rx, run).await });
        Ok(())
    }

    async fn drain<F, Fut>(self: Arc<Self>, key: String, mut rx: mpsc::Receiver<J>, run: F)
    where
        F: Fn(J) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            match rx.try_recv() {
                Ok(job) => run(job).await,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Senders push under the same lock, so an empty queue here stays empty.
                    let mut map = self.stripe(&key).lock().expect("mailbox lock");
                    if rx.is_empty() {
                        map.remove(&key);
                        return;
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Number of keys with queued or running work.
    pub(crate) fn active(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().expect("mailbox lock").len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_key_runs_serially_in_order_and_keys_run_in_parallel() {
        let boxes = Arc::new(Mailboxes::new(1000));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut done = Vec::new();
        for i in 0..200u32 {
            let key = if i % 2 == 0 { "a" } else { "b" };
            let (tx, rx) = oneshot::channel();
            done.push(rx);
            let (running, peak, order) = (running.clone(), peak.clone(), order.clone());
            let job = (key.to_owned(), i, tx);
            let ok = boxes.submit(
                key,
                job,
                move |(key, i, tx): (String, u32, oneshot::Sender<()>)| {
                    let (running, peak, order) = (running.clone(), peak.clone(), order.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_micros(200)).await;
                        order.lock().unwrap().push((key, i));
                        running.fetch_sub(1, Ordering::SeqCst);
                        let _ = tx.send(());
                    }
                },
            );
            assert!(ok.is_ok());
        }
        for rx in done {
            rx.await.unwrap();
        }
        let order = order.lock().unwrap();
        for key in ["a", "b"] {
            let seq: Vec<u32> = order
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, i)| *i)
                .collect();
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "key {key} out of order"
            );
        }
        // Two keys: never more than two at once, and they did overlap.
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(boxes.active(), 0, "idle mailboxes are dropped");
    }

    #[tokio::test]
    async fn a_full_queue_is_refused() {
        let boxes = Arc::new(Mailboxes::new(2));
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let run = move |_: u32| {
            let mut gate = gate_rx.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
            }
        };
        // Current-thread runtime: the task does not start until we yield, so the queue fills.
        assert!(boxes.submit("k", 1, run.clone()).is_ok());
        assert!(boxes.submit("k", 2, run.clone()).is_ok());
        assert!(boxes.submit("k", 3, run.clone()).is_err());
        gate_tx.send(true).unwrap();
    }
}
