//! The seed scenario as a demo.
//!
//! A ledger keeps one balance file per account in a directory: a real store without
//! transactions. Applying a payment is read the file → add → write it back. Payments
//! arrive on a Kafka topic with null keys, so one account's payments are spread over all
//! partitions.
//!
//! - `app`: the ledger as an `EntityHandler` behind Leasehold (one call at a time per
//!   account, cluster-wide): no update is lost.
//! - `direct`: the ledger as it is run today: several consumers of the topic apply
//!   payments concurrently; two of them racing on one account lose updates.
//! - `produce`: writes the payments; `check`: compares the balances with what was sent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use leasehold_proto::v1::entity_handler_server::{EntityHandler, EntityHandlerServer};
use leasehold_proto::v1::{HandleRequest, HandleResponse, ShardEvent, ShardEventAck};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tonic::{Request, Response, Status};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the ledger as an EntityHandler.
    App {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        #[arg(long)]
        store: PathBuf,
    },
    /// Apply payments straight from Kafka with several concurrent consumers.
    Direct {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        store: PathBuf,
        #[arg(long, default_value_t = 3)]
        consumers: usize,
        /// Stop after this many payments.
        #[arg(long)]
        messages: u64,
    },
    /// Write payments of 1 to random accounts, with null keys.
    Produce {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        messages: u64,
        #[arg(long, default_value_t = 20)]
        accounts: u64,
    },
    /// Print the total of all balances and compare it with the expected total.
    Check {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        expected: u64,
    },
}

/// Read-modify-write of one balance file. Not atomic on purpose: this is the store.
async fn apply(store: &Path, account: &str, amount: u64) -> std::io::Result<()> {
    let path = store.join(account);
    let balance: u64 = match tokio::fs::read_to_string(&path).await {
        Ok(s) => s.trim().parse().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    // Real stores take a while between the read and the write.
    tokio::time::sleep(Duration::from_micros(200)).await;
    tokio::fs::write(&path, (balance + amount).to_string()).await
}

fn payment(payload: &[u8]) -> Option<(String, u64)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((v["account"].as_str()?.to_owned(), v["amount"].as_u64()?))
}

struct Ledger {
    store: PathBuf,
    applied: AtomicU64,
}

/// The ledger as served: shared between connections.
#[derive(Clone)]
struct Shared(Arc<Ledger>);

impl std::ops::Deref for Shared {
    type Target = Ledger;

    fn deref(&self) -> &Ledger {
        &self.0
    }
}

#[tonic::async_trait]
impl EntityHandler for Shared {
    async fn handle(
        &self,
        request: Request<HandleRequest>,
    ) -> Result<Response<HandleResponse>, Status> {
        let r = request.into_inner();
        let (account, amount) = payment(&r.payload)
            .ok_or_else(|| Status::invalid_argument("payload is not a payment"))?;
        apply(&self.store, &account, amount)
            .await
            .map_err(|e| Status::unavailable(format!("store: {e}")))?;
        let n = self.applied.fetch_add(1, Ordering::Relaxed) + 1;
        if n % 5000 == 0 {
            eprintln!("ledger: {n} payments applied");
        }
        Ok(Response::new(HandleResponse {
            payload: Default::default(),
        }))
    }

    async fn shard_acquired(
        &self,
        _: Request<ShardEvent>,
    ) -> Result<Response<ShardEventAck>, Status> {
        Ok(Response::new(ShardEventAck {}))
    }

    async fn shard_released(
        &self,
        _: Request<ShardEvent>,
    ) -> Result<Response<ShardEventAck>, Status> {
        Ok(Response::new(ShardEventAck {}))
    }
}

fn total(store: &Path) -> anyhow::Result<u64> {
    let mut sum = 0;
    for entry in std::fs::read_dir(store)? {
        sum += std::fs::read_to_string(entry?.path())?
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
    }
    Ok(sum)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::App { listen, store } => {
            std::fs::create_dir_all(&store)?;
            let ledger = Shared(Arc::new(Ledger {
                store,
                applied: AtomicU64::new(0),
            }));
            tonic::transport::Server::builder()
                .add_service(EntityHandlerServer::new(ledger))
                .serve(listen.parse()?)
                .await?;
        }
        Command::Direct {
            brokers,
            topic,
            store,
            consumers,
            messages,
        } => {
            std::fs::create_dir_all(&store)?;
            let done = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..consumers {
                let consumer: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", "ledger-direct")
                    .set("auto.offset.reset", "earliest")
                    .create()?;
                consumer.subscribe(&[&topic])?;
                let (store, done) = (store.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    // Each consumer applies the payments it reads, several at a time.
                    let mut inflight = tokio::task::JoinSet::new();
                    while done.load(Ordering::Relaxed) < messages {
                        let Ok(Ok(m)) =
                            tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
                        else {
                            continue;
                        };
                        if let Some((account, amount)) = m.payload().and_then(payment) {
                            let (store, done) = (store.clone(), done.clone());
                            inflight.spawn(async move {
                                let _ = apply(&store, &account, amount).await;
                                done.fetch_add(1, Ordering::Relaxed);
                            });
                        }
                        while inflight.len() >= 16 {
                            inflight.join_next().await;
                        }
                    }
                    while inflight.join_next().await.is_some() {}
                }));
            }
            for t in tasks {
                t.await?;
            }
        }
        Command::Produce {
            brokers,
            topic,
            messages,
            accounts,
        } => {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "5")
                .create()?;
            let mut pending = Vec::new();
            for i in 0..messages {
                let value = format!(
                    r#"{{"account":"account-{}","amount":1,"n":{i}}}"#,
                    (i * 7919) % accounts
                );
                let record: FutureRecord<'_, (), String> = FutureRecord::to(&topic).payload(&value);
                pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
                if pending.len() >= 5000 {
                    for f in pending.drain(..) {
                        f.await?.map_err(|(e, _)| e)?;
                    }
                }
            }
            for f in pending {
                f.await?.map_err(|(e, _)| e)?;
            }
            println!("produced {messages} payments of 1 over {accounts} accounts (null keys)");
        }
        Command::Check { store, expected } => {
            let sum = total(&store)?;
            let lost = expected.saturating_sub(sum);
            println!(
                "ledger total {sum}, payments sent {expected}: {}",
                if lost == 0 {
                    "no update lost".to_owned()
                } else {
                    format!("{lost} updates LOST")
                }
            );
        }
    }
    Ok(())
}
