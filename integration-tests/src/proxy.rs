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
        Self::start_delayed(target, std::time::Duration::ZERO).await
    }

    /// The same, holding every byte from `target` back for `delay` (a slow server, or a
    /// slow path back from it; bytes keep their order, and throughput is not limited).
    pub async fn start_delayed(target: u16, delay: std::time::Duration) -> Proxy {
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
                            _ = async {
                                if delay.is_zero() {
                                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                                } else {
                                    copy_delayed(a, b, delay).await;
                                }
                            } => {}
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

/// Copies `client` → `server` as it comes, and `server` → `client` `delay` later.
async fn copy_delayed(client: TcpStream, server: TcpStream, delay: std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_in, mut client_out) = client.into_split();
    let (mut server_in, mut server_out) = server.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let read_back = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_in.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write_back = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if client_out.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    let forward = async move {
        let _ = tokio::io::copy(&mut client_in, &mut server_out).await;
    };
    // Ends when the server's side ends (its bytes all written back) or the client's.
    tokio::select! {
        _ = async { tokio::join!(read_back, write_back) } => {}
        _ = forward => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
