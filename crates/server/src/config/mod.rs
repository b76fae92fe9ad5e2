//! Configuration of `leasehold serve`: one typed struct, [`ServeOptions`], loaded in
//! layers — defaults, then the TOML file (`--config`), then `LEASEHOLD_*` environment
//! variables, then flags — and checked by one [`ServeOptions::validate`] whose errors name
//! the field, its flag and its variable (and where a bad value came from).
//!
//! Adding a setting: one entry in the `settings!` list below (doc line, type, default).
//! The struct field, its flag, its variable, its `--help` line with the default,
//! `--print-config` and the README check all follow from it.

mod kafka;
pub mod values;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use leasehold_types::validate_member_id;
use serde::{Deserialize, Serialize};

pub use self::kafka::{KafkaFlags, KafkaOptions};
pub use self::values::{AdminAuth, Balance, ByteSize, HandlerSpec, List, LogFormat, Secret};

/// Prefix of the environment variables: `LEASEHOLD_<SETTING>` (upper case).
pub const ENV_PREFIX: &str = "LEASEHOLD_";

/// Declares the settings: each becomes a field of [`ServeOptions`] (with its default), a
/// flag of [`SettingFlags`] and an entry of [`SETTINGS`].
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $(#[serde($($serde:tt)*)])*
        $name:ident : $ty:ty = $default:expr,
    )*) => {
        /// Every setting of `leasehold serve`, typed, with its default. Deserialises from
        /// the TOML file and from the strings environment variables and flags give.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct ServeOptions {
            $(
                $(#[doc = $doc])+
                $(#[serde($($serde)*)])*
                pub $name: $ty,
            )*
            /// Kafka sources: the `[[kafka]]` tables (the `--kafka-*` flags set the first).
            #[serde(skip_serializing_if = "Vec::is_empty")]
            pub kafka: Vec<KafkaOptions>,
        }

        impl Default for ServeOptions {
            fn default() -> Self {
                Self {
                    $( $name: $default, )*
                    kafka: Vec::new(),
                }
            }
        }

        /// One flag per setting (`--lease-ttl 5s`), as given on the command line.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct SettingFlags {
            $(
                #[arg(
                    long,
                    value_name = "VALUE",
                    help = setting_help(stringify!($name), concat!($($doc, "\n"),+)),
                )]
                pub $name: Option<String>,
            )*
        }

        impl SettingFlags {
            /// The flags given, by setting name.
            fn given(&self) -> Vec<(&'static str, &str)> {
                let mut given = Vec::new();
                $(
                    if let Some(v) = &self.$name {
                        given.push((stringify!($name), v.as_str()));
                    }
                )*
                given
            }
        }

        /// Name and description of every setting, in declaration order.
        pub const SETTINGS: &[(&str, &str)] = &[
            $( (stringify!($name), concat!($($doc, "\n"),+)), )*
        ];
    };
}

settings! {
    /// Instance id, unique in the cluster (`[A-Za-z0-9._-]`, at most 128 characters);
    /// the pod name on Kubernetes. Default: the host name.
    #[serde(with = "values::string")]
    id: String = default_id(),
    /// Cluster name; instances of one cluster share `/leasehold/<cluster>/` in etcd.
    #[serde(with = "values::string")]
    cluster: String = "default".into(),
    /// etcd endpoints (a TOML list, or comma separated).
    etcd: List = List::of(["http://127.0.0.1:2379"]),
    /// etcd user name, with etcd authentication (needs etcd_password).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    etcd_username: Option<String> = None,
    /// etcd password (needs etcd_username); prefer the variable over the flag. Never
    /// printed.
    #[serde(with = "values::opt_secret", skip_serializing_if = "Option::is_none")]
    etcd_password: Option<Secret> = None,
    /// Client plane listen address: the Entities API, gRPC health and reflection.
    #[serde(with = "values::addr")]
    listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7070)),
    /// Admin plane listen address: the HTTP endpoints and the Admin gRPC service.
    #[serde(with = "values::addr")]
    admin_listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7071)),
    /// Peer plane listen address: calls forwarded between instances (the Peer service).
    #[serde(with = "values::addr")]
    peer_listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7072)),
    /// HTTP gateway listen address: `POST /v1/entities/{key}` and
    /// `GET /v1/entities/{key}/location` for clients that speak HTTP, not gRPC (with the
    /// client plane's TLS settings, when set). Unset: no gateway.
    #[serde(with = "values::opt_addr", skip_serializing_if = "Option::is_none")]
    http_listen: Option<SocketAddr> = None,
    /// Client address (HOST:PORT) that Locate returns; the pod IP on Kubernetes.
    /// Default: the listen address.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    advertise: Option<String> = None,
    /// Peer address (HOST:PORT) other instances forward to. Default: the peer listen
    /// address.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    peer_advertise: Option<String> = None,
    /// Admin address (HOST:PORT) shown in /v1/members. Default: the admin listen address.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    admin_advertise: Option<String> = None,
    /// Shard count; fixed for the life of a cluster (checked at start).
    #[serde(with = "values::num")]
    shards: u32 = 1024,
    /// etcd lease TTL (whole seconds, at least 2s).
    #[serde(with = "values::duration")]
    lease_ttl: Duration = Duration::from_secs(5),
    /// `echo`, or `grpc://HOST:PORT` of your EntityHandler.
    handler: HandlerSpec = HandlerSpec::Echo,
    /// Deadline of calls that set none, and the longest accepted.
    #[serde(with = "values::duration")]
    request_timeout: Duration = Duration::from_secs(5),
    /// Largest accepted payload (e.g. 4MiB, 512KiB, 1000000).
    max_payload: ByteSize = ByteSize(4 * ByteSize::MIB),
    /// How long SIGTERM waits for shards to move away before releasing them.
    #[serde(with = "values::duration")]
    drain_timeout: Duration = Duration::from_secs(10),
    /// Longest wait for the handler's ShardAcquired / ShardReleased hook; past it the
    /// shard's calls start (or its move goes on) without it.
    #[serde(with = "values::duration")]
    shard_event_timeout: Duration = Duration::from_secs(5),
    /// Handler calls running at once on one instance.
    #[serde(with = "values::num")]
    max_concurrency: usize = 1024,
    /// Calls queued per key before RESOURCE_EXHAUSTED.
    #[serde(with = "values::num")]
    mailbox_capacity: usize = 1024,
    /// Owned shards the leader moves at once.
    #[serde(with = "values::num")]
    max_moves: usize = 256,
    /// What the leader balances: `count` (shards per member) or `load` (the load owners
    /// report per shard, within balance_tolerance of the mean). Set it the same on every
    /// instance: the leader's setting applies.
    balance: Balance = Balance::Count,
    /// With balance = load: how far (percent of the mean) a member's load may drift before
    /// shards move; moves then even loads out to half of it.
    #[serde(with = "values::num")]
    balance_tolerance: usize = 10,
    /// How often each instance publishes the load of the shards it owns (to etcd).
    #[serde(with = "values::duration")]
    load_report_interval: Duration = Duration::from_secs(10),
    /// Time constant over which reported loads are smoothed (exponentially).
    #[serde(with = "values::duration")]
    load_smoothing: Duration = Duration::from_secs(30),
    /// Client plane TLS certificate chain (PEM); with tls_key the client port speaks
    /// TLS only.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    tls_cert: Option<String> = None,
    /// Client plane TLS private key (PEM).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    tls_key: Option<String> = None,
    /// CA (PEM) that client certificates must be signed by: mutual TLS on the client
    /// port (needs tls_cert).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    tls_client_ca: Option<String> = None,
    /// Peer plane mutual TLS: the CA (PEM) every instance's peer certificate is signed
    /// by (with peer_cert and peer_key).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    peer_ca: Option<String> = None,
    /// This instance's peer certificate (PEM), for serving and for forwarding; its first
    /// name is the identity it registers.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    peer_cert: Option<String> = None,
    /// This instance's peer private key (PEM).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    peer_key: Option<String> = None,
    /// Run a plaintext peer plane although the client or admin plane has TLS (only on a
    /// network where nothing else can reach the peer port: anyone who can reach it can
    /// run calls).
    #[serde(with = "values::boolean")]
    allow_plaintext_peers: bool = false,
    /// CA (PEM) a `grpcs://` handler's certificate must be signed by.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    handler_ca: Option<String> = None,
    /// Client certificate (PEM) presented to a `grpcs://` handler (optional).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    handler_cert: Option<String> = None,
    /// Key of handler_cert (PEM).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    handler_key: Option<String> = None,
    /// CA (PEM) of `https://` etcd endpoints.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    etcd_ca: Option<String> = None,
    /// Client certificate (PEM) for etcd's `--client-cert-auth` (optional).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    etcd_cert: Option<String> = None,
    /// Key of etcd_cert (PEM).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    etcd_key: Option<String> = None,
    /// Admin plane TLS certificate chain (PEM); with admin_tls_key the admin port speaks
    /// TLS only.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    admin_tls_cert: Option<String> = None,
    /// Admin plane TLS private key (PEM).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    admin_tls_key: Option<String> = None,
    /// File holding the admin token; admin requests it protects then need
    /// `Authorization: Bearer <token>` (HTTP and gRPC).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    admin_token_file: Option<String> = None,
    /// What the admin token protects: `mutations` (drain) or `all` (reads too, but not
    /// /healthz and /readyz).
    admin_auth: AdminAuth = AdminAuth::Mutations,
    /// How often certificate files and the admin token are checked for changes.
    #[serde(with = "values::duration")]
    tls_reload_interval: Duration = Duration::from_secs(10),
    /// Longest accepted key (INVALID_ARGUMENT past it; dead-lettered for Kafka).
    max_key_bytes: ByteSize = ByteSize(1024),
    /// Calls held or queued on one instance across all keys before RESOURCE_EXHAUSTED.
    #[serde(with = "values::num")]
    max_pending_calls: usize = 65_536,
    /// Concurrent HTTP/2 streams per connection, on every plane.
    #[serde(with = "values::num")]
    max_concurrent_streams: u32 = 1024,
    /// Open connections per plane; further ones wait in the listen backlog.
    #[serde(with = "values::num")]
    max_connections: usize = 10_000,
    /// Largest accepted HTTP/2 header list of a request.
    max_header_bytes: ByteSize = ByteSize(16 * 1024),
    /// Messages a peer may have in flight on one Dispatch stream; past it the stream is
    /// not read (back-pressure).
    #[serde(with = "values::num")]
    max_dispatch_in_flight: usize = 4096,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `leasehold=debug`.
    #[serde(with = "values::string")]
    log: String = "info".into(),
    /// Log format: `text` (for terminals) or `json` (one object per line, for collectors).
    log_format: LogFormat = LogFormat::Text,
    /// OpenTelemetry collector traces are exported to (OTLP over gRPC), e.g.
    /// `http://otel-collector:4317`. Unset: no export (the trace context still reaches
    /// the handler). Sampling follows the standard `OTEL_TRACES_SAMPLER` variables
    /// (default: the caller's decision, else every trace).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String> = None,
    /// Client gRPC metadata keys (lower case) passed on with each call to the handler,
    /// across the forward hop; `traceparent` and `tracestate` always are.
    forward_metadata: List = List(Vec::new()),
}

/// Variables read by other subcommands (not warned about by `serve`).
const OTHER_VARIABLES: &[&str] = &[
    "config",
    "addr",
    "admin",
    "admin_token",
    "ca_file",
    "cert_file",
    "key_file",
    "server_name",
];

/// `leasehold serve` arguments.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (the environment and flags override it).
    #[arg(long, env = "LEASEHOLD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it as TOML (secrets redacted), and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub settings: SettingFlags,
    #[command(flatten)]
    pub kafka: KafkaFlags,
}

/// A configuration error naming the field, its flag and variable, and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field} (--{flag} / {ENV_PREFIX}{env}): {message}{origin}")]
    Field {
        field: String,
        flag: String,
        env: String,
        message: String,
        /// Where the value came from (" (from LEASEHOLD_SHARDS)"), when known.
        origin: String,
    },
    #[error("invalid kafka[{index}]{}: {message}{origin}", dotted(field))]
    Kafka {
        index: usize,
        field: String,
        message: String,
        origin: String,
    },
    #[error("cannot read config file {path}: {message}")]
    File { path: String, message: String },
}

fn dotted(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!(".{field}")
    }
}

impl ConfigError {
    pub(crate) fn field(field: &str, message: impl Into<String>) -> Self {
        Self::field_from(field, message, String::new())
    }

    fn field_from(field: &str, message: impl Into<String>, origin: String) -> Self {
        ConfigError::Field {
            field: field.to_owned(),
            flag: field.replace('_', "-"),
            env: field.to_uppercase(),
            message: message.into(),
            origin,
        }
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    File(String),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, " (in {p})"),
            Origin::Env(v) => write!(f, " (from {v})"),
            Origin::Flag(n) => write!(f, " (from --{n})"),
        }
    }
}

/// The merged layers: one TOML table, and where each key came from.
#[derive(Default)]
struct Layers {
    table: toml::Table,
    origins: HashMap<String, Origin>,
}

impl Layers {
    fn set(&mut self, name: &str, value: &str, origin: Origin) {
        self.table
            .insert(name.to_owned(), toml::Value::String(value.to_owned()));
        self.origins.insert(name.to_owned(), origin);
    }

    /// The first `[[kafka]]` table (created when there is none); `None` when the file's
    /// `kafka` is not a list of tables (deserialising then says so).
    fn first_source(&mut self) -> Option<&mut toml::Table> {
        let sources = self
            .table
            .entry("kafka")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        let list = sources.as_array_mut()?;
        if list.is_empty() {
            list.push(toml::Value::Table(toml::Table::new()));
        }
        list[0].as_table_mut()
    }

    fn set_kafka(&mut self, key: &str, value: &str, origin: Origin) {
        if let Some(first) = self.first_source() {
            first.insert(key.to_owned(), toml::Value::String(value.to_owned()));
            self.origins.insert(format!("kafka[0].{key}"), origin);
        }
    }
}

/// A loaded configuration and what the loading noticed (logged once logging is set up).
#[derive(Debug)]
pub struct Loaded {
    pub options: ServeOptions,
    pub warnings: Vec<String>,
}

impl ServeOptions {
    /// Loads defaults → `--config` file → `LEASEHOLD_*` variables → flags, and validates.
    pub fn load(args: &ServeArgs) -> Result<Loaded, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let path = path.display().to_string();
                let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let table = parse_file(&path, &text)?;
                Some((path, table))
            }
            None => None,
        };
        // Variables that are not UTF-8 cannot be settings; they are skipped, not fatal.
        let mut skipped = Vec::new();
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| match (k.into_string(), v.into_string()) {
                (Ok(k), Ok(v)) => Some((k, v)),
                (Ok(k), Err(_)) if k.starts_with(ENV_PREFIX) => {
                    skipped.push(k);
                    None
                }
                _ => None,
            })
            .collect();
        let mut loaded = Self::from_layers(file, env, args)?;
        loaded.warnings.extend(
            skipped
                .into_iter()
                .map(|k| format!("{k} is not UTF-8 and is ignored")),
        );
        Ok(loaded)
    }

    /// [`ServeOptions::load`] with the file's table and the environment given.
    pub fn from_layers(
        file: Option<(String, toml::Table)>,
        env: impl IntoIterator<Item = (String, String)>,
        args: &ServeArgs,
    ) -> Result<Loaded, ConfigError> {
        let mut layers = Layers::default();
        let mut warnings = Vec::new();
        if let Some((path, table)) = file {
            for (key, value) in table {
                if key == "kafka" {
                    let n = value.as_array().map_or(0, Vec::len);
                    for i in 0..n {
                        layers
                            .origins
                            .insert(format!("kafka[{i}]"), Origin::File(path.clone()));
                    }
                } else if !is_setting(&key) {
                    return Err(ConfigError::File {
                        path,
                        message: format!("unknown key `{key}`{}", suggestion(&key)),
                    });
                } else {
                    layers
                        .origins
                        .insert(key.clone(), Origin::File(path.clone()));
                }
                layers.table.insert(key, value);
            }
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (var, value) in env {
            let name = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            if is_setting(&name) {
                layers.set(&name, &value, Origin::Env(var));
            } else if let Some(key) = kafka_key(&name) {
                layers.set_kafka(key, &value, Origin::Env(var));
            } else if !OTHER_VARIABLES.contains(&name.as_str()) && !is_service_link(&name) {
                warnings.push(format!(
                    "{var} is not a setting and is ignored{}",
                    suggestion(&name)
                ));
            }
        }
        for (name, value) in args.settings.given() {
            layers.set(name, value, Origin::Flag(name.replace('_', "-")));
        }
        for (flag, value) in args.kafka.given() {
            let key = kafka_key(flag).expect("every Kafka flag has a key");
            layers.set_kafka(key, value, Origin::Flag(flag.replace('_', "-")));
        }
        for p in &args.kafka.kafka_properties {
            let (k, v) = p.split_once('=').ok_or_else(|| {
                ConfigError::field("kafka_property", format!("{p:?} is not KEY=VALUE"))
            })?;
            let properties = layers.first_source().map(|first| {
                first
                    .entry("properties")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            });
            if let Some(t) = properties.and_then(|p| p.as_table_mut()) {
                t.insert(
                    k.trim().to_owned(),
                    toml::Value::String(v.trim().to_owned()),
                );
            }
        }
        let options: ServeOptions =
            serde_path_to_error::deserialize(toml::Value::Table(layers.table))
                .map_err(|e| deserialize_error(e, &layers.origins))?;
        options.validate()?;
        Ok(Loaded { options, warnings })
    }

    /// Checks what types alone cannot: ranges, formats and fields that go together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_member_id(&self.id).map_err(|e| ConfigError::field("id", e.to_string()))?;
        validate_member_id(&self.cluster)
            .map_err(|e| ConfigError::field("cluster", e.to_string()))?;
        if self.etcd.0.is_empty() {
            return Err(ConfigError::field(
                "etcd",
                "at least one endpoint is required",
            ));
        }
        for e in &self.etcd.0 {
            let host = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            if !host.contains(':') || host.contains('/') {
                return Err(ConfigError::field(
                    "etcd",
                    format!("{e:?} is not an endpoint like http://127.0.0.1:2379"),
                ));
            }
        }
        self.etcd_credentials()?;
        if let Some(e) = &self.otlp_endpoint {
            if e.starts_with("https://") {
                return Err(ConfigError::field(
                    "otlp_endpoint",
                    format!(
                        "{e:?}: TLS to the collector is not supported; use an http:// \
                         endpoint (a collector agent next to the instance, or in-cluster)"
                    ),
                ));
            }
            if !e.starts_with("http://") {
                return Err(ConfigError::field(
                    "otlp_endpoint",
                    format!("{e:?} is not a URL like http://otel-collector:4317"),
                ));
            }
        }
        for key in &self.forward_metadata.0 {
            let valid = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
            if !valid
                || key.starts_with("grpc-")
                || key.starts_with("leasehold-")
                || key.ends_with("-bin")
            {
                return Err(ConfigError::field(
                    "forward_metadata",
                    format!(
                        "{key:?} cannot be forwarded: keys are lower-case ASCII metadata names, \
                         not grpc-*, leasehold-* or binary (-bin)"
                    ),
                ));
            }
        }
        for (field, value) in [
            ("advertise", &self.advertise),
            ("peer_advertise", &self.peer_advertise),
            ("admin_advertise", &self.admin_advertise),
        ] {
            if let Some(v) = value {
                if v.contains("://") || !v.contains(':') {
                    return Err(ConfigError::field(
                        field,
                        format!("{v:?} is not a HOST:PORT address"),
                    ));
                }
            }
        }
        in_range("shards", self.shards as usize, 1, 65_536)?;
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl.subsec_nanos() != 0 {
            return Err(ConfigError::field(
                "lease_ttl",
                format!(
                    "{}: must be whole seconds, at least 2s (etcd leases have second granularity)",
                    humantime::format_duration(self.lease_ttl)
                ),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::field("request_timeout", "must be positive"));
        }
        if self.shard_event_timeout.is_zero() || self.shard_event_timeout > Duration::from_secs(60)
        {
            return Err(ConfigError::field(
                "shard_event_timeout",
                format!(
                    "{}: must be positive and at most 60s (a planned move waits for it)",
                    humantime::format_duration(self.shard_event_timeout)
                ),
            ));
        }
        if self.max_payload.bytes() == 0 || self.max_payload.bytes() > 256 * ByteSize::MIB {
            return Err(ConfigError::field(
                "max_payload",
                format!("{} is outside 1B..=256MiB", self.max_payload),
            ));
        }
        in_range("max_concurrency", self.max_concurrency, 1, 1 << 20)?;
        in_range("mailbox_capacity", self.mailbox_capacity, 1, 1 << 20)?;
        in_range("max_moves", self.max_moves, 1, 1 << 20)?;
        in_range("balance_tolerance", self.balance_tolerance, 1, 100)?;
        if self.load_report_interval < Duration::from_millis(100) {
            return Err(ConfigError::field(
                "load_report_interval",
                "must be at least 100ms",
            ));
        }
        in_range("max_pending_calls", self.max_pending_calls, 1, 1 << 30)?;
        in_range(
            "max_concurrent_streams",
            self.max_concurrent_streams as usize,
            1,
            1 << 20,
        )?;
        in_range("max_connections", self.max_connections, 1, 1 << 20)?;
        in_range(
            "max_dispatch_in_flight",
            self.max_dispatch_in_flight,
            1,
            1 << 20,
        )?;
        in_range("max_key_bytes", self.max_key_bytes.bytes(), 1, 64 * 1024)?;
        in_range(
            "max_header_bytes",
            self.max_header_bytes.bytes(),
            1024,
            1 << 20,
        )?;
        if self.tls_reload_interval < Duration::from_millis(100) {
            return Err(ConfigError::field(
                "tls_reload_interval",
                "must be at least 100ms",
            ));
        }
        self.check_tls()?;
        self.kafka_sources()?;
        Ok(())
    }

    /// TLS settings that go together: a certificate with its key, a CA with what it
    /// checks. Files are read (and certificates checked) when the instance starts.
    fn check_tls(&self) -> Result<(), ConfigError> {
        let pairs = [
            ("tls_cert", &self.tls_cert, "tls_key", &self.tls_key),
            ("peer_cert", &self.peer_cert, "peer_key", &self.peer_key),
            (
                "handler_cert",
                &self.handler_cert,
                "handler_key",
                &self.handler_key,
            ),
            ("etcd_cert", &self.etcd_cert, "etcd_key", &self.etcd_key),
            (
                "admin_tls_cert",
                &self.admin_tls_cert,
                "admin_tls_key",
                &self.admin_tls_key,
            ),
        ];
        for (cert, c, key, k) in pairs {
            match (c, k) {
                (Some(_), None) => {
                    return Err(ConfigError::field(
                        key,
                        format!("required when {cert} is set"),
                    ))
                }
                (None, Some(_)) => {
                    return Err(ConfigError::field(
                        cert,
                        format!("required when {key} is set"),
                    ))
                }
                _ => {}
            }
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError::field(
                "tls_cert",
                "required when tls_client_ca is set (mutual TLS needs TLS)",
            ));
        }
        let other_tls = self.tls_cert.is_some() || self.admin_tls_cert.is_some();
        if other_tls && self.peer_ca.is_none() && !self.allow_plaintext_peers {
            return Err(ConfigError::field(
                "peer_ca",
                "the client or admin plane has TLS but the peer plane would be plaintext, \
                 letting anyone who reaches the peer port run calls: set peer_ca, peer_cert \
                 and peer_key (or allow_plaintext_peers = true on a closed network)",
            ));
        }
        let peer = [&self.peer_ca, &self.peer_cert];
        if peer.iter().any(|v| v.is_some()) && !peer.iter().all(|v| v.is_some()) {
            return Err(ConfigError::field(
                if self.peer_ca.is_none() {
                    "peer_ca"
                } else {
                    "peer_cert"
                },
                "peer TLS is mutual: set peer_ca, peer_cert and peer_key together",
            ));
        }
        let handler_tls = matches!(self.handler, HandlerSpec::Grpc { tls: true, .. });
        if handler_tls && self.handler_ca.is_none() {
            return Err(ConfigError::field(
                "handler_ca",
                "required for a grpcs:// handler",
            ));
        }
        if !handler_tls && (self.handler_ca.is_some() || self.handler_cert.is_some()) {
            return Err(ConfigError::field(
                "handler",
                "handler_ca and handler_cert need a grpcs:// handler",
            ));
        }
        let https = self
            .etcd
            .0
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https > 0 && https < self.etcd.0.len() {
            return Err(ConfigError::field(
                "etcd",
                "mixes http:// and https:// endpoints",
            ));
        }
        if https == 0 && (self.etcd_ca.is_some() || self.etcd_cert.is_some()) {
            return Err(ConfigError::field(
                "etcd",
                "etcd_ca and etcd_cert need https:// endpoints",
            ));
        }
        if https > 0 && self.etcd_ca.is_none() {
            return Err(ConfigError::field(
                "etcd_ca",
                "required for https:// etcd endpoints",
            ));
        }
        if self.admin_auth == AdminAuth::All && self.admin_token_file.is_none() {
            return Err(ConfigError::field(
                "admin_token_file",
                "required when admin_auth is all",
            ));
        }
        Ok(())
    }

    /// etcd user and password: both, or neither.
    pub fn etcd_credentials(&self) -> Result<Option<(String, Secret)>, ConfigError> {
        let password = self
            .etcd_password
            .clone()
            .filter(|p| !p.expose().is_empty());
        match (self.etcd_username.clone(), password) {
            (Some(u), Some(p)) => Ok(Some((u, p))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::field(
                "etcd_password",
                "required when etcd_username is set",
            )),
            (None, Some(_)) => Err(ConfigError::field(
                "etcd_username",
                "required when etcd_password is set",
            )),
        }
    }

    /// The Kafka sources, validated, with their defaults resolved.
    pub fn kafka_sources(&self) -> Result<Vec<leasehold_kafka::SourceOptions>, ConfigError> {
        self.kafka
            .iter()
            .enumerate()
            .map(|(i, k)| k.to_source(i, &self.cluster))
            .collect()
    }

    /// [`ServeOptions::kafka_sources`] with `${env:…}` and `${file:…}` property values
    /// read (at start, not when validating or printing the configuration).
    pub fn kafka_sources_resolved(
        &self,
    ) -> Result<Vec<leasehold_kafka::SourceOptions>, ConfigError> {
        let mut sources = self.kafka_sources()?;
        for (index, source) in sources.iter_mut().enumerate() {
            for (key, value) in source.properties.iter_mut() {
                *value = kafka::resolve_property(index, key, value)?;
            }
            if let Some(f) = source.failover.as_mut() {
                for (key, value) in f.properties.iter_mut() {
                    *value = kafka::resolve_property(index, key, value)?;
                }
            }
        }
        Ok(sources)
    }

    /// The configuration as the TOML file that reproduces it (secrets redacted).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings serialise to TOML")
    }
}

/// Parses the config file. The parser's own message quotes the offending line, which may
/// hold a secret: the error says where, and what, without it.
fn parse_file(path: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| {
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let line = text[..at].matches('\n').count() + 1;
        ConfigError::File {
            path: path.to_owned(),
            message: format!("line {line}: {}", e.message()),
        }
    })
}

fn in_range(field: &str, n: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if n < min || n > max {
        return Err(ConfigError::field(
            field,
            format!("{n} is outside {min}..={max}"),
        ));
    }
    Ok(())
}

/// Kubernetes' service-link variables for a Service named `leasehold`
/// (`LEASEHOLD_SERVICE_HOST`, `LEASEHOLD_PORT_7070_TCP_ADDR`, ...): not settings, not
/// worth a warning.
fn is_service_link(name: &str) -> bool {
    name == "port" || name.starts_with("port_") || name.starts_with("service_")
}

fn is_setting(name: &str) -> bool {
    SETTINGS.iter().any(|(n, _)| *n == name)
}

fn kafka_key(flag: &str) -> Option<&'static str> {
    kafka::FLAG_KEYS
        .iter()
        .find(|(f, _)| *f == flag)
        .map(|(_, k)| *k)
}

/// "; did you mean `shards`?" for the closest known name, when one is close.
fn suggestion(name: &str) -> String {
    let known = SETTINGS
        .iter()
        .map(|(n, _)| *n)
        .chain(kafka::FLAG_KEYS.iter().map(|(f, _)| *f));
    let best = known
        .map(|k| (edit_distance(name, k), k))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d <= (name.len() / 3).max(2) => {
            format!("; did you mean `{k}` ({ENV_PREFIX}{})?", k.to_uppercase())
        }
        _ => String::new(),
    }
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Turns a deserialisation error into one naming the field and where its value came from.
fn deserialize_error(
    e: serde_path_to_error::Error<toml::de::Error>,
    origins: &HashMap<String, Origin>,
) -> ConfigError {
    let path = e.path().to_string();
    let message = e.inner().message().trim().to_owned();
    let origin = origins
        .get(&path)
        .or_else(|| origins.get(path.split('.').next().unwrap_or_default()))
        .map(|o| o.to_string())
        .unwrap_or_default();
    if let Some(rest) = path.strip_prefix("kafka[") {
        let (index, field) = rest.split_once(']').unwrap_or((rest, ""));
        return ConfigError::Kafka {
            index: index.parse().unwrap_or(0),
            field: field.trim_start_matches('.').to_owned(),
            message,
            origin,
        };
    }
    let field = if path == "." { "config" } else { path.as_str() };
    ConfigError::field_from(field, message, origin)
}

/// The help line of a setting's flag: its doc, variable and default.
fn setting_help(name: &str, doc: &str) -> String {
    static DEFAULTS: OnceLock<toml::Table> = OnceLock::new();
    let defaults = DEFAULTS.get_or_init(|| {
        toml::Table::try_from(ServeOptions::default()).expect("defaults serialise")
    });
    let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let default = match defaults.get(name) {
        None => "none".to_owned(),
        Some(toml::Value::String(s)) => s.clone(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    };
    format!(
        "{doc} [env: {ENV_PREFIX}{}] [default: {default}]",
        name.to_uppercase()
    )
}

fn default_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "leasehold-0".into())
}

#[cfg(test)]
mod tests;
