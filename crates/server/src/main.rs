mod cli;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cli::report::{
    exit_for_clap, finish, CliError, CliResult, Exit, OutputArgs, Rendered, EXIT_CODES_HELP,
};
use cli::tls::{AdminArgs, TlsArgs};
use leasehold_server::config::{ServeArgs, ServeOptions};
use leasehold_server::serve::{serve, Listeners};

/// Leasehold: single-writer-per-key execution across many instances.
#[derive(Parser)]
#[command(name = "leasehold", version, about, after_help = EXIT_CODES_HELP)]
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
        /// Keep watching: print the status again each time it changes, until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// How often --watch asks the admin plane.
        #[arg(long, default_value = "1s", value_parser = parse_interval, requires = "watch")]
        interval: Duration,
        #[command(flatten)]
        output: OutputArgs,
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
        timeout: Duration,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        output: OutputArgs,
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
        wait: Duration,
        #[command(flatten)]
        output: OutputArgs,
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
        #[command(flatten)]
        output: OutputArgs,
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
        #[command(flatten)]
        output: OutputArgs,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failure(&e),
    };
    match cli.command {
        Command::Serve(args) => serve_command(&args),
        Command::Status {
            admin,
            shards,
            watch: true,
            interval,
            output,
        } => cli::status::watch(&admin, shards, interval, output.output),
        Command::Status {
            admin,
            shards,
            output,
            ..
        } => finish(cli::status::run(&admin, shards), output.output),
        Command::Call {
            addr,
            key,
            payload,
            timeout,
            tls,
            output,
        } => client_command(
            cli::client::call(&addr, &tls, &key, payload, timeout),
            output,
        ),
        Command::Drain {
            admin,
            member,
            wait,
            output,
        } => finish(
            cli::status::drain(&admin, member.as_deref(), wait),
            output.output,
        ),
        Command::Health {
            addr,
            service,
            tls,
            output,
        } => client_command(cli::client::health(&addr, &tls, &service), output),
        Command::Locate {
            addr,
            key,
            tls,
            output,
        } => client_command(cli::client::locate(&addr, &tls, &key), output),
    }
}

/// Prints clap's message (help and version on stdout, errors on stderr) and exits 0 for
/// `--help` and `--version`, 64 (usage) for anything else.
fn parse_failure(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    exit_for_clap(e.kind()).into()
}

/// `--interval`: a duration above zero (`500ms`, `2s`).
fn parse_interval(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("the interval must be more than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// `leasehold serve`: loads the configuration and runs an instance until a signal.
fn serve_command(args: &ServeArgs) -> ExitCode {
    let (config, warnings) = match ServeOptions::load(args) {
        Ok(loaded) => (loaded.options, loaded.warnings),
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Usage.into();
        }
    };
    if args.print_config {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return Exit::Software.into();
        }
    };
    // The trace exporter's gRPC client is made inside the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        match leasehold_server::telemetry::init(&config, log_colour()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::Usage.into();
            }
        }
    };
    for w in warnings {
        tracing::warn!("{w}");
    }
    let code = runtime.block_on(async {
        let listeners = match Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e:#}");
                return Exit::Unavailable.into();
            }
        };
        let span = tracing::info_span!("instance", member = %config.id);
        let run = serve(config, listeners, shutdown_signal());
        match tracing::Instrument::instrument(run, span).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.is_usage() => {
                tracing::error!("{e:#}");
                Exit::Usage.into()
            }
            Err(e) => {
                tracing::error!("{e:#}");
                Exit::Software.into()
            }
        }
    });
    // Flushed inside the runtime, before it stops.
    let _entered = runtime.enter();
    telemetry.shutdown();
    code
}

/// Colour only for a person at a terminal: files and pipes get plain text, and
/// `NO_COLOR` (any non-empty value, see no-color.org) turns colour off everywhere.
fn log_colour() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Runs a gRPC client command on a small runtime and prints its outcome.
fn client_command(
    command: impl std::future::Future<Output = CliResult<Rendered>>,
    output: OutputArgs,
) -> ExitCode {
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command),
        Err(e) => Err(CliError::new(
            Exit::Software,
            format!("cannot start the runtime: {e}"),
        )),
    };
    finish(result, output.output)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use cli::report::Format;

    /// The exit status `leasehold ARGS...` would end with if parsing failed (0 if it parsed).
    fn parse_exit(args: &[&str]) -> Exit {
        let argv = std::iter::once("leasehold").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(_) => Exit::Ok,
            Err(e) => exit_for_clap(e.kind()),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_and_version_succeed() {
        assert_eq!(parse_exit(&["--help"]), Exit::Ok);
        assert_eq!(parse_exit(&["--version"]), Exit::Ok);
        assert_eq!(parse_exit(&["call", "--help"]), Exit::Ok);
    }

    #[test]
    fn bad_command_lines_are_usage_errors() {
        for args in [
            &[][..],
            &["nonsense"],
            &["call"],
            &["call", "--key", "k", "--bogus"],
            &["call", "--key", "k", "--timeout", "soon"],
            &["locate", "--key", "k", "--output", "yaml"],
            &["status", "--interval", "2s"],
            &["status", "--watch", "--interval", "0s"],
        ] {
            assert_eq!(parse_exit(args), Exit::Usage, "{args:?}");
            assert_eq!(Exit::Usage.code(), 64);
        }
    }

    #[test]
    fn every_client_command_takes_output() {
        let commands: [&[&str]; 5] = [
            &["status"],
            &["status", "--watch", "--interval", "500ms"],
            &["call", "--key", "k"],
            &["drain"],
            &["health"],
        ];
        for args in commands.into_iter().chain([&["locate", "--key", "k"][..]]) {
            let argv = std::iter::once("leasehold")
                .chain(args.iter().copied())
                .chain(["--output", "json"]);
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let output = match cli.command {
                Command::Status { output, .. }
                | Command::Call { output, .. }
                | Command::Drain { output, .. }
                | Command::Health { output, .. }
                | Command::Locate { output, .. } => output.output,
                Command::Serve(_) => unreachable!("not a client command"),
            };
            assert_eq!(output, Format::Json, "{args:?}");
        }
    }

    #[test]
    fn help_lists_the_exit_statuses() {
        let help = Cli::command().render_long_help().to_string();
        for status in ["64", "69", "70", "75", "77"] {
            assert!(
                help.contains(&format!("  {status}  ")),
                "{status} missing:\n{help}"
            );
        }
    }

    #[test]
    fn intervals_must_be_positive() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("often").is_err());
    }
}
