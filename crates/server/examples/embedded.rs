//! A small ledger running inside Leasehold, in one process.
//!
//! Each key is an account. `deposit N`, `withdraw N` and `balance` run at the account's
//! owner, one at a time per account. The ledger keeps every owned shard's balances in
//! memory and writes them to its store only when it lets the shard go: a write-back
//! cache that is correct only because Leasehold runs `ShardAcquired` (load) before the
//! first call of an ownership and `ShardReleased` (flush) before the next owner can take
//! the shard. The store is a directory of one JSON file per shard, standing in for a
//! shared database.
//!
//! ```text
//! cargo run -p leasehold-server --example embedded -- \
//!     --id ledger-0 --etcd http://127.0.0.1:2379 --store /tmp/ledger
//! leasehold call --key alice --payload 'deposit 10'
//! ```
//!
//! It takes every `leasehold serve` flag (and `LEASEHOLD_*` variable), except `--handler`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use leasehold_server::config::ServeArgs;
use leasehold_server::{
    BoxFuture, Bytes, HandleCall, HandleError, Handler, ServeOptions, Server, ShardEvent,
};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
    /// Directory holding one JSON file per shard (shared by every instance).
    #[arg(long)]
    store: PathBuf,
    /// How long writing a shard back takes (a remote store is slower than a local file).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    flush_delay: std::time::Duration,
    /// Appends one line per call to this file — `key epoch start end` (wall clock,
    /// nanoseconds) — so a test can check across processes that no two calls for an
    /// account overlapped.
    #[arg(long)]
    audit: Option<PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// What the store holds for a shard.
#[derive(Default, Serialize, Deserialize)]
struct Stored {
    /// Epoch of the ownership that wrote it.
    epoch: u64,
    balances: BTreeMap<String, i64>,
}

/// An owned shard in memory.
struct Loaded {
    epoch: u64,
    balances: BTreeMap<String, i64>,
}

struct Ledger {
    store: PathBuf,
    flush_delay: std::time::Duration,
    audit: Option<Mutex<std::fs::File>>,
    shards: Mutex<HashMap<u32, Loaded>>,
    /// Accounts with a call running here (a second one would break single-writer).
    busy: Mutex<HashSet<String>>,
}

impl Ledger {
    fn file(&self, shard: u32) -> PathBuf {
        self.store.join(format!("shard-{shard}.json"))
    }

    fn apply(&self, call: &HandleCall) -> Result<i64, HandleError> {
        let command = std::str::from_utf8(&call.payload)
            .map_err(|_| HandleError::invalid_argument("the command is not UTF-8"))?;
        let mut shards = self.shards.lock().unwrap();
        let loaded = shards
            .get_mut(&call.shard.0)
            .filter(|l| l.epoch == call.epoch.0)
            .ok_or_else(|| {
                HandleError::internal(format!(
                    "shard {} epoch {} was not loaded before its call",
                    call.shard, call.epoch
                ))
            })?;
        let balance = loaded.balances.entry(call.key.clone()).or_default();
        match command.split_whitespace().collect::<Vec<_>>()[..] {
            ["balance"] => {}
            ["deposit", n] => *balance += amount(n)?,
            ["withdraw", n] => {
                let n = amount(n)?;
                if *balance < n {
                    return Err(HandleError::failed_precondition(format!(
                        "insufficient funds: balance {balance}, withdrawal {n}"
                    )));
                }
                *balance -= n;
            }
            _ => {
                return Err(HandleError::invalid_argument(format!(
                    "unknown command {command:?}; expected `deposit N`, `withdraw N` or `balance`"
                )))
            }
        }
        Ok(*balance)
    }

    fn load(&self, event: ShardEvent) -> Result<(), HandleError> {
        let stored: Stored = match std::fs::read(self.file(event.shard.0)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| HandleError::internal(format!("shard {}: {e}", event.shard)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(HandleError::internal(e.to_string())),
        };
        if stored.epoch >= event.epoch.0 {
            return Err(HandleError::internal(format!(
                "shard {} was written at epoch {}, not older than this ownership's {}",
                event.shard, stored.epoch, event.epoch
            )));
        }
        self.shards.lock().unwrap().insert(
            event.shard.0,
            Loaded {
                epoch: event.epoch.0,
                balances: stored.balances,
            },
        );
        Ok(())
    }

    fn flush(&self, event: ShardEvent) -> Result<(), HandleError> {
        let loaded = {
            let mut shards = self.shards.lock().unwrap();
            if shards.get(&event.shard.0).map(|l| l.epoch) != Some(event.epoch.0) {
                return Ok(()); // not this ownership's state
            }
            shards.remove(&event.shard.0).expect("checked above")
        };
        if event.lost {
            // Lost without a planned move: another instance may own the shard and have
            // written newer balances. What was kept here is dropped, not written.
            return Ok(());
        }
        let stored = Stored {
            epoch: loaded.epoch,
            balances: loaded.balances,
        };
        let tmp = self.store.join(format!(".shard-{}.tmp", event.shard));
        let bytes = serde_json::to_vec(&stored).expect("balances serialise");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, self.file(event.shard.0)))
            .map_err(|e| HandleError::internal(format!("flushing shard {}: {e}", event.shard)))
    }
}

fn wall_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn amount(n: &str) -> Result<i64, HandleError> {
    n.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| HandleError::invalid_argument(format!("{n:?} is not a positive amount")))
}

/// Marks an account busy while its call runs (also when the call is abandoned at its
/// deadline).
struct Busy {
    ledger: Arc<Ledger>,
    key: String,
}

impl Busy {
    fn enter(ledger: &Arc<Ledger>, key: &str) -> Result<Busy, HandleError> {
        if !ledger.busy.lock().unwrap().insert(key.to_owned()) {
            return Err(HandleError::internal(format!(
                "two calls for account {key:?} at once"
            )));
        }
        Ok(Busy {
            ledger: ledger.clone(),
            key: key.to_owned(),
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.ledger.busy.lock().unwrap().remove(&self.key);
    }
}

/// The handler Leasehold calls; cheap to share.
struct LedgerHandler(Arc<Ledger>);

impl Handler for LedgerHandler {
    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
        let ledger = self.0.clone();
        Box::pin(async move {
            let _busy = Busy::enter(&ledger, &call.key)?;
            let start = wall_nanos();
            // A store round trip would happen here in a real service.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let result = ledger
                .apply(&call)
                .map(|balance| Bytes::from(balance.to_string()));
            if let Some(audit) = &ledger.audit {
                use std::io::Write;
                let line = format!("{} {} {start} {}\n", call.key, call.epoch, wall_nanos());
                let _ = audit.lock().unwrap().write_all(line.as_bytes());
            }
            result
        })
    }

    fn shard_acquired(&self, event: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
        let ledger = self.0.clone();
        Box::pin(async move { ledger.load(event) })
    }

    fn shard_released(&self, event: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
        let ledger = self.0.clone();
        Box::pin(async move {
            tokio::time::sleep(ledger.flush_delay).await;
            ledger.flush(event)
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match ServeOptions::load(&args.serve) {
        Ok(loaded) => loaded.options,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEASEHOLD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = std::fs::create_dir_all(&args.store) {
        eprintln!("error: store {}: {e}", args.store.display());
        return ExitCode::from(64);
    }
    let ledger = Arc::new(Ledger {
        store: args.store,
        flush_delay: args.flush_delay,
        audit: match args.audit.as_deref().map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        }) {
            None => None,
            Some(Ok(f)) => Some(Mutex::new(f)),
            Some(Err(e)) => {
                eprintln!("error: --audit: {e}");
                return ExitCode::from(64);
            }
        },
        shards: Mutex::default(),
        busy: Mutex::default(),
    });
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match Server::builder()
        .config(config)
        .handler(LedgerHandler(ledger))
        .run(shutdown)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(if e.is_usage() { 64 } else { 70 })
        }
    }
}
