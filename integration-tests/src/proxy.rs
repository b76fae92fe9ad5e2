//! A TCP proxy on loopback that a test can cut and heal: the way to partition one
//! instance from etcd (or a peer) without network namespaces.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections from `port` to `target`. While cut, every open connection is
/// closed and new ones are accepted but never forwarded (like a black-holed route: the
/// client sees no answer, not a refusal).
pub struct Proxy {
    pub port: u16,
    cut: watch::Sender<u64>,
    is_cut: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = watch::channel(0u64);
        let is_cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (cut, is_cut, generation) = (cut.clone(), is_cut.clone(), generation.clone());
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    let mut cuts = cut.subscribe();
                    let born = generation.load(Ordering::Acquire);
                    let black_hole = is_cut.load(Ordering::Acquire);
                    tokio::spawn(async move {
                        if black_hole {
                            // Hold the connection silently until the next change.
                            let _ = cuts.changed().await;
                            return;
                        }
                        let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                            return;
                        };
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = async {
                                loop {
                                    if cuts.changed().await.is_err() || *cuts.borrow() != born {
                                        return;
                                    }
                                }
                            } => {}
                        }
                    });
                }
            }
        });
        Proxy {
            port,
            cut,
            is_cut,
            generation,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every forwarded connection and black-holes new ones.
    pub fn cut(&self) {
        self.is_cut.store(true, Ordering::Release);
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.cut.send_replace(g);
    }

    /// Forwards new connections again (held black-holed ones are closed).
    pub fn heal(&self) {
        self.is_cut.store(false, Ordering::Release);
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.cut.send_replace(g);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
