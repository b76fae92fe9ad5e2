//! A load generator: many concurrent calls with random keys to random instances.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leasehold_proto::v1::entities_client::EntitiesClient;
use leasehold_proto::v1::CallRequest;
use rand::Rng;
use tonic::transport::Channel;

/// The instances a load sends to; tests remove one before stopping it, as a load
/// balancer would take a terminating pod out of its endpoints.
pub type Targets = Arc<RwLock<Vec<(String, EntitiesClient<Channel>)>>>;

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
                    let (name, mut client) = {
                        let t = targets.read().unwrap();
                        t[rand::rng().random_range(0..t.len())].clone()
                    };
                    let mut req = tonic::Request::new(CallRequest {
                        key: key.clone(),
                        payload: payload.clone(),
                    });
                    req.set_timeout(load.timeout);
                    match client.call(req).await {
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
    let mut v = Vec::new();
    for i in instances {
        v.push((i.id.clone(), i.client().await));
    }
    Arc::new(RwLock::new(v))
}
