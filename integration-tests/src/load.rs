//! A load generator: many concurrent calls with random keys to random instances.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leasehold_proto::v1::entities_client::EntitiesClient;
use leasehold_proto::v1::CallRequest;
use rand::Rng;
use tonic::transport::Channel;

/// The instances a load sends to; tests take one out before stopping it, as a load
/// balancer takes a terminating pod out of its endpoints.
pub type Targets = Arc<TargetSet>;

/// The load's targets, and how many of its calls each one is running.
#[derive(Default)]
pub struct TargetSet {
    list: RwLock<Vec<(String, EntitiesClient<Channel>)>>,
    /// Calls started and not answered, by target (changed under `list`'s read lock, so
    /// a target taken out under its write lock gets no call counted after that).
    busy: Mutex<HashMap<String, usize>>,
}

impl TargetSet {
    pub fn add(&self, name: String, client: EntitiesClient<Channel>) {
        self.list.write().unwrap().push((name, client));
    }

    /// Sends no new call to `name`, then waits until the calls it was sent answered;
    /// false if some still run after `timeout`.
    pub async fn take_out(&self, name: &str, timeout: Duration) -> bool {
        self.list.write().unwrap().retain(|(n, _)| n != name);
        let deadline = Instant::now() + timeout;
        loop {
            if self.busy.lock().unwrap().get(name).copied().unwrap_or(0) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A random target, counted busy until the returned guard is dropped.
    fn pick(self: &Arc<Self>) -> (String, EntitiesClient<Channel>, Busy) {
        let list = self.list.read().unwrap();
        let (name, client) = list[rand::rng().random_range(0..list.len())].clone();
        *self.busy.lock().unwrap().entry(name.clone()).or_default() += 1;
        let busy = Busy {
            set: self.clone(),
            name: name.clone(),
        };
        (name, client, busy)
    }
}

/// One call running at a target.
struct Busy {
    set: Arc<TargetSet>,
    name: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(n) = self.set.busy.lock().unwrap().get_mut(&self.name) {
            *n -= 1;
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub ok: u64,
    /// Failed calls: (target, status).
    pub failed: Vec<(String, String)>,
    /// Calls retried on another instance because the connection was refused (the call
    /// never reached a server).
    pub refused_retries: u64,
    pub latencies: Vec<Duration>,
}

impl Report {
    pub fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() - 1) as f64 * p) as usize]
    }
}

/// Options of a load run.
#[derive(Debug, Clone)]
pub struct Load {
    pub keys: usize,
    pub concurrency: usize,
    /// Stop after this many calls (None: until `stop`).
    pub total: Option<u64>,
    pub timeout: Duration,
    pub payload: usize,
}

/// True for errors where the request never reached a server (connection refused).
fn refused(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.metadata().is_empty() && {
        let m = format!("{s:?}").to_lowercase();
        m.contains("connect") || m.contains("refused")
    }
}

pub async fn run(targets: Targets, load: Load, stop: Arc<AtomicBool>) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let issued = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..load.concurrency {
        let (targets, load, stop, report, issued) = (
            targets.clone(),
            load.clone(),
            stop.clone(),
            report.clone(),
            issued.clone(),
        );
        workers.push(tokio::spawn(async move {
            let payload = Bytes::from(vec![b'x'; load.payload]);
            while !stop.load(Ordering::Relaxed) {
                if let Some(total) = load.total {
                    if issued.fetch_add(1, Ordering::Relaxed) >= total {
                        break;
                    }
                }
                let key = format!("key-{}", rand::rng().random_range(0..load.keys));
                let started = Instant::now();
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let (name, mut client, busy) = targets.pick();
                    let mut req = tonic::Request::new(CallRequest {
                        key: key.clone(),
                        payload: payload.clone(),
                    });
                    req.set_timeout(load.timeout);
                    let result = client.call(req).await;
                    drop(busy);
                    match result {
                        Ok(_) => {
                            let mut r = report.lock().unwrap();
                            r.ok += 1;
                            r.latencies.push(started.elapsed());
                        }
                        Err(s) if refused(&s) && attempts < 5 => {
                            report.lock().unwrap().refused_retries += 1;
                            continue;
                        }
                        Err(s) => report
                            .lock()
                            .unwrap()
                            .failed
                            .push((name, format!("{:?}: {}", s.code(), s.message()))),
                    }
                    break;
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    Arc::try_unwrap(report).unwrap().into_inner().unwrap()
}

/// Clients for every instance of a cluster.
pub async fn targets(instances: &[crate::Instance]) -> Targets {
    let set = TargetSet::default();
    for i in instances {
        set.add(i.id.clone(), i.client().await);
    }
    Arc::new(set)
}
