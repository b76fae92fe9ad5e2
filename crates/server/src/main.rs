mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::tls::{AdminArgs, TlsArgs};
use leasehold_server::config::{LogFormat, ServeArgs, ServeOptions};
use leasehold_server::serve::{serve, Listeners};
use tracing_subscriber::EnvFilter;

/// Leasehold: single-writer-per-key execution across many instances.
#[derive(Parser)]
#[command(name = "leasehold", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an instance.
    Serve(Box<ServeArgs>),
    /// Print members and shard ownership of a running cluster.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// One row per shard instead of ranges per owner.
        #[arg(long)]
        shards: bool,
    },
    /// Send one call through any instance and print the answer and who ran it.
    Call {
        /// gRPC address of any instance.
        #[arg(long, env = "LEASEHOLD_ADDR", default_value = "http://127.0.0.1:7070")]
        addr: String,
        /// Entity key.
        #[arg(long)]
        key: String,
        /// Payload (UTF-8 text).
        #[arg(long, default_value = "")]
        payload: String,
        /// Call timeout.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Mark an instance draining and wait until its shards moved away (the preStop hook).
    Drain {
        /// The instance to drain (or any instance, with --member).
        #[command(flatten)]
        admin: AdminArgs,
        /// Member id to drain; default: the instance behind --admin.
        #[arg(long)]
        member: Option<String>,
        /// How long to wait for the shards to move.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Check an instance with the standard gRPC health service (exit 0 when serving).
    Health {
        /// gRPC address of the instance.
        #[arg(long, env = "LEASEHOLD_ADDR", default_value = "http://127.0.0.1:7070")]
        addr: String,
        /// Service name to check; empty: the whole server.
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Print the shard, owner and epoch of a key.
    Locate {
        /// gRPC address of any instance.
        #[arg(long, env = "LEASEHOLD_ADDR", default_value = "http://127.0.0.1:7070")]
        addr: String,
        /// Entity key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// Exit codes from sysexits.h.
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Status { admin, shards } => {
            report(cli::status::run(&admin, shards).map(|t| t.trim_end().to_owned()))
        }
        Command::Call {
            addr,
            key,
            payload,
            timeout,
            tls,
        } => client_command(cli::client::call(&addr, &tls, &key, payload, timeout)),
        Command::Drain {
            admin,
            member,
            wait,
        } => report(cli::status::drain(&admin, member.as_deref(), wait)),
        Command::Health { addr, service, tls } => {
            client_command(cli::client::health(&addr, &tls, &service))
        }
        Command::Locate { addr, key, tls } => {
            client_command(cli::client::locate(&addr, &tls, &key))
        }
        Command::Serve(args) => {
            let (config, warnings) = match ServeOptions::load(&args) {
                Ok(loaded) => (loaded.options, loaded.warnings),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if args.print_config {
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                print!("{}", config.to_toml());
                return ExitCode::SUCCESS;
            }
            let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
                eprintln!(
                    "warning: invalid log filter {:?} ({e}); using info",
                    config.log
                );
                EnvFilter::new("info")
            });
            let logs = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(log_colour())
                .with_writer(std::io::stderr);
            match config.log_format {
                LogFormat::Json => logs.json().init(),
                LogFormat::Text => logs.init(),
            }
            for w in warnings {
                tracing::warn!("{w}");
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            runtime.block_on(async {
                let listeners = match Listeners::bind(&config).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        return ExitCode::from(EX_UNAVAILABLE);
                    }
                };
                let span = tracing::info_span!("instance", member = %config.id);
                let run = serve(config, listeners, shutdown_signal());
                match tracing::Instrument::instrument(run, span).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) if e.is_usage() => {
                        tracing::error!("{e:#}");
                        ExitCode::from(EX_USAGE)
                    }
                    Err(e) => {
                        tracing::error!("{e:#}");
                        ExitCode::from(EX_SOFTWARE)
                    }
                }
            })
        }
    }
}

/// Colour only for a person at a terminal: files and pipes get plain text, and
/// `NO_COLOR` (any non-empty value, see no-color.org) turns colour off everywhere.
fn log_colour() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

fn client_command(f: impl std::future::Future<Output = anyhow::Result<String>>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    report(runtime.block_on(f))
}

/// Prints a command's output, or its error with exit status 69.
fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}
