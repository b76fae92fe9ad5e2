//! Configuration: defaults → TOML file (`--config`) → `LEASEHOLD_*` environment → flags,
//! then validation with messages that name the field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use leasehold_types::validate_member_id;
use serde::{Deserialize, Serialize};

/// Flags of `leasehold serve`. Every value is optional here so that "not given" can fall
/// back to the file, then to the default.
#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and environment override it).
    #[arg(long, env = "LEASEHOLD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit (after validating it).
    #[arg(long)]
    pub print_config: bool,
    /// Instance id (unique in the cluster; the pod name on Kubernetes). Default: hostname.
    #[arg(long, env = "LEASEHOLD_ID")]
    pub id: Option<String>,
    /// Cluster name; instances of one cluster share `/leasehold/<cluster>/` in etcd.
    #[arg(long, env = "LEASEHOLD_CLUSTER")]
    pub cluster: Option<String>,
    /// etcd endpoints, comma separated.
    #[arg(long, env = "LEASEHOLD_ETCD")]
    pub etcd: Option<String>,
    /// etcd user name (with etcd authentication enabled).
    #[arg(long, env = "LEASEHOLD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// etcd password; prefer the environment variable over the flag.
    #[arg(long, env = "LEASEHOLD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// gRPC listen address.
    #[arg(long, env = "LEASEHOLD_LISTEN")]
    pub listen: Option<String>,
    /// Admin HTTP listen address.
    #[arg(long, env = "LEASEHOLD_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// gRPC address peers and clients use. Default: the listen address.
    #[arg(long, env = "LEASEHOLD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Admin address shown to others. Default: the admin listen address.
    #[arg(long, env = "LEASEHOLD_ADMIN_ADVERTISE")]
    pub admin_advertise: Option<String>,
    /// Number of shards (fixed for the life of a cluster).
    #[arg(long, env = "LEASEHOLD_SHARDS")]
    pub shards: Option<String>,
    /// etcd lease TTL, e.g. 5s.
    #[arg(long, env = "LEASEHOLD_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// `echo`, or `grpc://HOST:PORT` of an application implementing EntityHandler.
    #[arg(long, env = "LEASEHOLD_HANDLER")]
    pub handler: Option<String>,
    /// Deadline of a call whose client sets none, and the longest accepted.
    #[arg(long, env = "LEASEHOLD_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// Largest accepted payload, e.g. 4MiB.
    #[arg(long, env = "LEASEHOLD_MAX_PAYLOAD")]
    pub max_payload: Option<String>,
    /// Time a graceful shutdown waits for shards to move away before releasing them.
    #[arg(long, env = "LEASEHOLD_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Handler calls running at once on this instance.
    #[arg(long, env = "LEASEHOLD_MAX_CONCURRENCY")]
    pub max_concurrency: Option<String>,
    /// Calls queued per key before RESOURCE_EXHAUSTED.
    #[arg(long, env = "LEASEHOLD_MAILBOX_CAPACITY")]
    pub mailbox_capacity: Option<String>,
    /// Owned shards the leader moves at once.
    #[arg(long, env = "LEASEHOLD_MAX_MOVES")]
    pub max_moves: Option<String>,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `leasehold=debug`.
    #[arg(long, env = "LEASEHOLD_LOG")]
    pub log: Option<String>,
    /// Log format: `text` (for terminals) or `json` (one object per line, for collectors).
    #[arg(long, env = "LEASEHOLD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Kafka bootstrap servers of the (first) Kafka source.
    #[arg(long, env = "LEASEHOLD_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Topics to consume, comma separated.
    #[arg(long, env = "LEASEHOLD_KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Consumer group id.
    #[arg(long, env = "LEASEHOLD_KAFKA_GROUP")]
    pub kafka_group: Option<String>,
    /// Where the entity key comes from: key, json:/pointer or header:NAME.
    #[arg(long, env = "LEASEHOLD_KAFKA_KEY")]
    pub kafka_key: Option<String>,
    /// Dead-letter topic.
    #[arg(long, env = "LEASEHOLD_KAFKA_DLQ_TOPIC")]
    pub kafka_dlq_topic: Option<String>,
    /// What happens to a message that cannot be handled: dead-letter (needs a dead-letter
    /// topic) or skip (logged and counted, then committed past).
    #[arg(long, env = "LEASEHOLD_KAFKA_ON_FAILURE")]
    pub kafka_on_failure: Option<String>,
    /// librdkafka property KEY=VALUE for the (first) Kafka source; repeatable.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub kafka_properties: Vec<String>,
}

/// A TOML scalar: numbers may be written bare, durations and sizes as strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Str(String),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Str(s) => s,
        }
    }
}

/// The TOML file. Unknown keys are an error, so a typo never silently falls back.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub id: Option<Scalar>,
    pub cluster: Option<Scalar>,
    /// A list or a comma-separated string.
    pub etcd: Option<Endpoints>,
    pub etcd_username: Option<Scalar>,
    pub etcd_password: Option<Scalar>,
    pub listen: Option<Scalar>,
    pub admin_listen: Option<Scalar>,
    pub advertise: Option<Scalar>,
    pub admin_advertise: Option<Scalar>,
    pub shards: Option<Scalar>,
    pub lease_ttl: Option<Scalar>,
    pub handler: Option<Scalar>,
    pub request_timeout: Option<Scalar>,
    pub max_payload: Option<Scalar>,
    pub drain_timeout: Option<Scalar>,
    pub max_concurrency: Option<Scalar>,
    pub mailbox_capacity: Option<Scalar>,
    pub max_moves: Option<Scalar>,
    pub log: Option<Scalar>,
    pub log_format: Option<Scalar>,
    /// Kafka sources (`[[kafka]]` tables).
    pub kafka: Option<Vec<KafkaFile>>,
}

/// One `[[kafka]]` table of the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    pub name: Option<String>,
    pub brokers: Option<String>,
    pub topics: Option<Endpoints>,
    pub group: Option<String>,
    pub key: Option<String>,
    pub dlq_topic: Option<String>,
    pub on_failure: Option<String>,
    pub max_in_flight_per_partition: Option<Scalar>,
    pub max_in_flight: Option<Scalar>,
    pub retry_attempts: Option<Scalar>,
    pub retry_backoff: Option<Scalar>,
    pub commit_interval: Option<Scalar>,
    /// Passed to librdkafka unchanged (security.protocol, sasl.*, ssl.*, ...).
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Endpoints {
    List(Vec<String>),
    Str(String),
}

/// The handler that runs calls at the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerKind {
    Echo,
    /// `http://HOST:PORT` of an EntityHandler service.
    Grpc(String),
}

/// The effective, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: String,
    pub cluster: String,
    pub etcd: Vec<String>,
    /// etcd user and password (both set, or neither).
    pub etcd_user: Option<(String, String)>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub advertise: Option<String>,
    pub admin_advertise: Option<String>,
    pub shards: u32,
    pub lease_ttl: Duration,
    pub handler: HandlerKind,
    pub request_timeout: Duration,
    pub max_payload: usize,
    pub drain_timeout: Duration,
    pub max_concurrency: usize,
    pub mailbox_capacity: usize,
    pub max_moves: usize,
    pub log: String,
    /// Emit logs as JSON lines.
    pub log_json: bool,
    pub kafka: Vec<leasehold_kafka::SourceOptions>,
}

/// A configuration error naming the field, its sources and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field} (--{flag} / LEASEHOLD_{env}): {message}")]
    Field {
        field: &'static str,
        flag: String,
        env: String,
        message: String,
    },
    #[error("invalid kafka[{index}].{field}: {message}")]
    Kafka {
        index: usize,
        field: String,
        message: String,
    },
    #[error("cannot read config file {path}: {message}")]
    File { path: String, message: String },
}

fn field_error(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        flag: field.replace('_', "-"),
        env: field.to_uppercase(),
        message: message.into(),
    }
}

/// Parses sizes like `4194304`, `4MiB`, `512KiB`, `1GiB`, `4MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4MiB or 4194304"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit {u:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_duration(field: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| {
        field_error(
            field,
            format!("{s:?} is not a duration like 5s or 500ms: {e}"),
        )
    })
}

fn parse_count(field: &'static str, s: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| field_error(field, format!("{s:?} is not a whole number")))?;
    if n < min || n > max {
        return Err(field_error(field, format!("{n} is outside {min}..={max}")));
    }
    Ok(n)
}

fn parse_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        field_error(
            field,
            format!("{s:?} is not an IP:PORT address like 0.0.0.0:7070"),
        )
    })
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

fn kafka_error(i: usize, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Kafka {
        index: i,
        field: field.to_owned(),
        message: message.into(),
    }
}

fn kafka_source(
    i: usize,
    k: KafkaFile,
    cluster: &str,
) -> Result<leasehold_kafka::SourceOptions, ConfigError> {
    let brokers = k
        .brokers
        .filter(|b| !b.is_empty())
        .ok_or_else(|| kafka_error(i, "brokers", "required (host:port, comma separated)"))?;
    let topics: Vec<String> = match k.topics {
        Some(Endpoints::Str(s)) => s
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect(),
        Some(Endpoints::List(l)) => l,
        None => Vec::new(),
    };
    if topics.is_empty() {
        return Err(kafka_error(i, "topics", "at least one topic is required"));
    }
    let name = k.name.unwrap_or_else(|| topics[0].clone());
    let key: leasehold_kafka::KeySource = k
        .key
        .as_deref()
        .unwrap_or("key")
        .parse()
        .map_err(|m: String| kafka_error(i, "key", m))?;
    let count = |field: &str, v: Option<Scalar>, default: u64| -> Result<u64, ConfigError> {
        match v.map(Scalar::into_string) {
            None => Ok(default),
            Some(s) => s
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    kafka_error(i, field, format!("{s:?} is not a positive whole number"))
                }),
        }
    };
    let duration =
        |field: &str, v: Option<Scalar>, default: &str| -> Result<Duration, ConfigError> {
            let s = v
                .map(Scalar::into_string)
                .unwrap_or_else(|| default.to_owned());
            humantime::parse_duration(&s)
                .map_err(|e| kafka_error(i, field, format!("{s:?} is not a duration: {e}")))
        };
    let dlq_topic = k.dlq_topic.filter(|t| !t.is_empty());
    let on_failure = match k.on_failure.as_deref().map(str::trim) {
        None | Some("dead-letter") => leasehold_kafka::OnFailure::DeadLetter,
        Some("skip") => leasehold_kafka::OnFailure::Skip,
        Some(other) => {
            return Err(kafka_error(
                i,
                "on_failure",
                format!("{other:?} is not one of \"dead-letter\", \"skip\""),
            ))
        }
    };
    // Without somewhere to put them, messages that cannot be handled would be lost
    // silently; losing them must be a choice the configuration states.
    if on_failure == leasehold_kafka::OnFailure::DeadLetter && dlq_topic.is_none() {
        return Err(kafka_error(
            i,
            "dlq_topic",
            "is required: messages that cannot be handled (no key, or the handler kept failing) \
             go there (on_failure = \"dead-letter\", the default); set dlq_topic \
             (--kafka-dlq-topic), or on_failure = \"skip\" (--kafka-on-failure skip) to log, \
             count and skip them"
                .to_owned(),
        ));
    }
    Ok(leasehold_kafka::SourceOptions {
        group: k
            .group
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| format!("leasehold-{cluster}-{name}")),
        name,
        brokers,
        topics,
        key,
        dlq_topic,
        on_failure,
        max_in_flight_per_partition: count(
            "max_in_flight_per_partition",
            k.max_in_flight_per_partition,
            1000,
        )? as usize,
        max_in_flight: count("max_in_flight", k.max_in_flight, 10_000)? as usize,
        retry_attempts: count("retry_attempts", k.retry_attempts, 5)? as u32,
        retry_backoff: duration("retry_backoff", k.retry_backoff, "100ms")?,
        commit_interval: duration("commit_interval", k.commit_interval, "1s")?,
        properties: k.properties.unwrap_or_default(),
    })
}

impl Config {
    /// Merges flags/environment over the file over the defaults, then validates.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(args.clone(), file)
    }

    pub fn merge(a: ServeArgs, f: FileConfig) -> Result<Config, ConfigError> {
        let pick = |cli: Option<String>, file: Option<Scalar>, default: &str| -> String {
            cli.or(file.map(Scalar::into_string))
                .unwrap_or_else(|| default.to_owned())
        };
        let id =
            a.id.or(f.id.map(Scalar::into_string))
                .unwrap_or_else(default_id);
        validate_member_id(&id).map_err(|m| field_error("id", m))?;
        let cluster = pick(a.cluster, f.cluster, "default");
        validate_member_id(&cluster).map_err(|m| field_error("cluster", m))?;

        let etcd: Vec<String> = match (a.etcd, f.etcd) {
            (Some(s), _) | (None, Some(Endpoints::Str(s))) => {
                s.split(',').map(|e| e.trim().to_owned()).collect()
            }
            (None, Some(Endpoints::List(l))) => l,
            (None, None) => vec!["http://127.0.0.1:2379".into()],
        };
        let etcd: Vec<String> = etcd.into_iter().filter(|e| !e.is_empty()).collect();
        if etcd.is_empty() {
            return Err(field_error("etcd", "at least one endpoint is required"));
        }
        for e in &etcd {
            let host = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            if !host.contains(':') || host.contains('/') {
                return Err(field_error(
                    "etcd",
                    format!("{e:?} is not an endpoint like http://127.0.0.1:2379"),
                ));
            }
        }

        let etcd_user = match (
            a.etcd_username
                .or(f.etcd_username.map(Scalar::into_string))
                .filter(|s| !s.is_empty()),
            a.etcd_password
                .or(f.etcd_password.map(Scalar::into_string))
                .filter(|s| !s.is_empty()),
        ) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(field_error(
                    "etcd_password",
                    "required when etcd_username is set",
                ))
            }
            (None, Some(_)) => {
                return Err(field_error(
                    "etcd_username",
                    "required when etcd_password is set",
                ))
            }
        };

        let listen = parse_addr("listen", &pick(a.listen, f.listen, "0.0.0.0:7070"))?;
        let admin_listen = parse_addr(
            "admin_listen",
            &pick(a.admin_listen, f.admin_listen, "0.0.0.0:7071"),
        )?;
        let advertise = a
            .advertise
            .or(f.advertise.map(Scalar::into_string))
            .filter(|s| !s.is_empty());
        let admin_advertise = a
            .admin_advertise
            .or(f.admin_advertise.map(Scalar::into_string))
            .filter(|s| !s.is_empty());
        for (field, value) in [
            ("advertise", &advertise),
            ("admin_advertise", &admin_advertise),
        ] {
            if let Some(v) = value {
                if v.contains("://") || !v.contains(':') {
                    return Err(field_error(
                        field,
                        format!("{v:?} is not a HOST:PORT address"),
                    ));
                }
            }
        }

        let shards = parse_count("shards", &pick(a.shards, f.shards, "1024"), 1, 65_536)? as u32;
        let lease_ttl = parse_duration("lease_ttl", &pick(a.lease_ttl, f.lease_ttl, "5s"))?;
        if lease_ttl < Duration::from_secs(2) || lease_ttl.subsec_nanos() != 0 {
            return Err(field_error("lease_ttl", format!("{lease_ttl:?}: must be whole seconds, at least 2s (etcd leases have second granularity)")));
        }
        let handler = match pick(a.handler, f.handler, "echo").as_str() {
            "echo" => HandlerKind::Echo,
            h => match h.strip_prefix("grpc://") {
                Some(addr) if addr.contains(':') && !addr.contains('/') => {
                    HandlerKind::Grpc(format!("http://{addr}"))
                }
                _ => {
                    return Err(field_error(
                        "handler",
                        format!("{h:?}: use `echo` or `grpc://HOST:PORT`"),
                    ))
                }
            },
        };
        let request_timeout = parse_duration(
            "request_timeout",
            &pick(a.request_timeout, f.request_timeout, "5s"),
        )?;
        if request_timeout.is_zero() {
            return Err(field_error("request_timeout", "must be positive"));
        }
        let max_payload_raw = pick(a.max_payload, f.max_payload, "4MiB");
        let max_payload =
            parse_size(&max_payload_raw).map_err(|m| field_error("max_payload", m))?;
        if max_payload == 0 || max_payload > 256 << 20 {
            return Err(field_error(
                "max_payload",
                format!("{max_payload} bytes is outside 1 B..=256 MiB"),
            ));
        }
        let drain_timeout = parse_duration(
            "drain_timeout",
            &pick(a.drain_timeout, f.drain_timeout, "10s"),
        )?;
        let max_concurrency = parse_count(
            "max_concurrency",
            &pick(a.max_concurrency, f.max_concurrency, "1024"),
            1,
            1 << 20,
        )? as usize;
        let mailbox_capacity = parse_count(
            "mailbox_capacity",
            &pick(a.mailbox_capacity, f.mailbox_capacity, "1024"),
            1,
            1 << 20,
        )? as usize;
        let max_moves = parse_count(
            "max_moves",
            &pick(a.max_moves, f.max_moves, "256"),
            1,
            1 << 20,
        )? as usize;
        let log = pick(a.log, f.log, "info");
        let log_json = match pick(a.log_format, f.log_format, "text").as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(field_error(
                    "log_format",
                    format!("{other:?}: use text or json"),
                ))
            }
        };

        // Kafka: the [[kafka]] tables; the --kafka-* flags override the first one (or
        // define it when the file has none).
        let mut sources = f.kafka.unwrap_or_default();
        let flags = [
            &a.kafka_brokers,
            &a.kafka_topic,
            &a.kafka_group,
            &a.kafka_key,
            &a.kafka_dlq_topic,
            &a.kafka_on_failure,
        ];
        if flags.iter().any(|f| f.is_some()) || !a.kafka_properties.is_empty() {
            if sources.is_empty() {
                sources.push(KafkaFile::default());
            }
            let first = &mut sources[0];
            first.brokers = a.kafka_brokers.or(first.brokers.take());
            first.topics = a.kafka_topic.map(Endpoints::Str).or(first.topics.take());
            first.group = a.kafka_group.or(first.group.take());
            first.key = a.kafka_key.or(first.key.take());
            first.dlq_topic = a.kafka_dlq_topic.or(first.dlq_topic.take());
            first.on_failure = a.kafka_on_failure.or(first.on_failure.take());
            for p in &a.kafka_properties {
                let (k, v) = p.split_once('=').ok_or_else(|| {
                    field_error("kafka_property", format!("{p:?} is not KEY=VALUE"))
                })?;
                first
                    .properties
                    .get_or_insert_with(Default::default)
                    .insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        let kafka = sources
            .into_iter()
            .enumerate()
            .map(|(i, k)| kafka_source(i, k, &cluster))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            id,
            cluster,
            etcd,
            etcd_user,
            listen,
            admin_listen,
            advertise,
            admin_advertise,
            shards,
            lease_ttl,
            handler,
            request_timeout,
            max_payload,
            drain_timeout,
            max_concurrency,
            mailbox_capacity,
            max_moves,
            log,
            log_json,
            kafka,
        })
    }

    /// The effective configuration as the TOML file that would reproduce it.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            id: &'a str,
            cluster: &'a str,
            etcd: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            etcd_username: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            etcd_password: Option<&'static str>,
            listen: String,
            admin_listen: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            advertise: &'a Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            admin_advertise: &'a Option<String>,
            shards: u32,
            lease_ttl: String,
            handler: String,
            request_timeout: String,
            max_payload: usize,
            drain_timeout: String,
            max_concurrency: usize,
            mailbox_capacity: usize,
            max_moves: usize,
            log: &'a str,
            log_format: &'static str,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            kafka: Vec<KafkaOut<'a>>,
        }
        #[derive(Serialize)]
        struct KafkaOut<'a> {
            name: &'a str,
            brokers: &'a str,
            topics: &'a [String],
            group: &'a str,
            key: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            dlq_topic: &'a Option<String>,
            on_failure: &'a str,
            max_in_flight_per_partition: usize,
            max_in_flight: usize,
            retry_attempts: u32,
            retry_backoff: String,
            commit_interval: String,
            properties: std::collections::BTreeMap<&'a str, &'a str>,
        }
        let d = |d: Duration| humantime::format_duration(d).to_string();
        toml::to_string(&Out {
            id: &self.id,
            cluster: &self.cluster,
            etcd: &self.etcd,
            etcd_username: self.etcd_user.as_ref().map(|(u, _)| u.as_str()),
            // Never printed: the effective config ends up in logs and tickets.
            etcd_password: self.etcd_user.as_ref().map(|_| "<redacted>"),
            listen: self.listen.to_string(),
            admin_listen: self.admin_listen.to_string(),
            advertise: &self.advertise,
            admin_advertise: &self.admin_advertise,
            shards: self.shards,
            lease_ttl: d(self.lease_ttl),
            handler: match &self.handler {
                HandlerKind::Echo => "echo".into(),
                HandlerKind::Grpc(url) => url.replacen("http://", "grpc://", 1),
            },
            request_timeout: d(self.request_timeout),
            max_payload: self.max_payload,
            drain_timeout: d(self.drain_timeout),
            max_concurrency: self.max_concurrency,
            mailbox_capacity: self.mailbox_capacity,
            max_moves: self.max_moves,
            log: &self.log,
            log_format: if self.log_json { "json" } else { "text" },
            kafka: self
                .kafka
                .iter()
                .map(|k| KafkaOut {
                    name: &k.name,
                    brokers: &k.brokers,
                    topics: &k.topics,
                    group: &k.group,
                    key: k.key.to_string(),
                    dlq_topic: &k.dlq_topic,
                    on_failure: k.on_failure.as_str(),
                    max_in_flight_per_partition: k.max_in_flight_per_partition,
                    max_in_flight: k.max_in_flight,
                    retry_attempts: k.retry_attempts,
                    retry_backoff: d(k.retry_backoff),
                    commit_interval: d(k.commit_interval),
                    // Values of sasl.* and ssl.* may be secrets: keys only.
                    properties: k
                        .properties
                        .keys()
                        .map(|key| {
                            (
                                key.as_str(),
                                if key.starts_with("sasl.") || key.starts_with("ssl.") {
                                    "<redacted>"
                                } else {
                                    k.properties[key].as_str()
                                },
                            )
                        })
                        .collect(),
                })
                .collect(),
        })
        .expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            id: Some("a".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::merge(args(), FileConfig::default()).unwrap();
        assert_eq!(c.shards, 1024);
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(c.max_payload, 4 << 20);
        assert_eq!(c.handler, HandlerKind::Echo);
        assert_eq!(c.etcd, vec!["http://127.0.0.1:2379".to_string()]);
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            "shards = 64\nlease_ttl = \"3s\"\netcd = [\"http://e1:2379\", \"http://e2:2379\"]",
        )
        .unwrap();
        let a = ServeArgs {
            shards: Some("128".into()),
            ..args()
        };
        let c = Config::merge(a, file).unwrap();
        assert_eq!(c.shards, 128);
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.etcd.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(ServeArgs, &str)> = vec![
            (
                ServeArgs {
                    shards: Some("0".into()),
                    ..args()
                },
                "invalid shards (--shards / LEASEHOLD_SHARDS)",
            ),
            (
                ServeArgs {
                    lease_ttl: Some("fast".into()),
                    ..args()
                },
                "invalid lease_ttl",
            ),
            (
                ServeArgs {
                    lease_ttl: Some("1500ms".into()),
                    ..args()
                },
                "invalid lease_ttl",
            ),
            (
                ServeArgs {
                    handler: Some("http://x:1".into()),
                    ..args()
                },
                "invalid handler",
            ),
            (
                ServeArgs {
                    max_payload: Some("4 parsecs".into()),
                    ..args()
                },
                "invalid max_payload",
            ),
            (
                ServeArgs {
                    listen: Some("nowhere".into()),
                    ..args()
                },
                "invalid listen",
            ),
            (
                ServeArgs {
                    etcd: Some("etcd".into()),
                    ..args()
                },
                "invalid etcd",
            ),
            (
                ServeArgs {
                    id: Some("a b".into()),
                    ..Default::default()
                },
                "invalid id",
            ),
        ];
        for (a, want) in cases {
            let err = Config::merge(a, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("shard = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `shard`"), "{err}");
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let c = Config::merge(
            ServeArgs {
                handler: Some("grpc://app:9000".into()),
                ..args()
            },
            FileConfig::default(),
        )
        .unwrap();
        let again =
            Config::merge(ServeArgs::default(), toml::from_str(&c.to_toml()).unwrap()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn etcd_credentials_come_in_pairs_and_are_never_printed() {
        let a = ServeArgs {
            etcd_username: Some("lh".into()),
            ..args()
        };
        let err = Config::merge(a, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid etcd_password"), "{err}");
        let a = ServeArgs {
            etcd_username: Some("lh".into()),
            etcd_password: Some("s3cret".into()),
            ..args()
        };
        let c = Config::merge(a, FileConfig::default()).unwrap();
        assert_eq!(c.etcd_user, Some(("lh".into(), "s3cret".into())));
        assert!(!c.to_toml().contains("s3cret"));
    }

    #[test]
    fn kafka_sources_come_from_the_file_and_flags() {
        let file: FileConfig = toml::from_str(
            "[[kafka]]\nbrokers = \"b:9092\"\ntopics = [\"orders\"]\nkey = \"json:/account\"\n[kafka.properties]\n\"sasl.password\" = \"pw\"\n",
        )
        .unwrap();
        let a = ServeArgs {
            kafka_dlq_topic: Some("orders-dlq".into()),
            ..args()
        };
        let c = Config::merge(a, file).unwrap();
        let k = &c.kafka[0];
        assert_eq!(
            (k.name.as_str(), k.group.as_str()),
            ("orders", "leasehold-default-orders")
        );
        assert_eq!(k.dlq_topic.as_deref(), Some("orders-dlq"));
        assert_eq!(k.key.to_string(), "json:/account");
        assert!(!c.to_toml().contains("pw"), "secrets printed");
        let again = Config::merge(
            ServeArgs::default(),
            toml::from_str(&c.to_toml().replace("<redacted>", "pw")).unwrap(),
        )
        .unwrap();
        assert_eq!(again.kafka[0].topics, vec!["orders".to_string()]);

        let a = ServeArgs {
            kafka_topic: Some("t".into()),
            ..args()
        };
        let err = Config::merge(a, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid kafka[0].brokers: required (host:port, comma separated)"
        );
        let a = ServeArgs {
            kafka_brokers: Some("b:1".into()),
            kafka_topic: Some("t".into()),
            kafka_key: Some("json:x".into()),
            ..args()
        };
        assert!(Config::merge(a, FileConfig::default())
            .unwrap_err()
            .to_string()
            .starts_with("invalid kafka[0].key"));
    }

    #[test]
    fn a_source_without_a_dead_letter_topic_must_choose_to_skip() {
        let source = || ServeArgs {
            kafka_brokers: Some("b:1".into()),
            kafka_topic: Some("t".into()),
            ..args()
        };
        let err = Config::merge(source(), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid kafka[0].dlq_topic: is required")
                && err.contains("on_failure = \"skip\""),
            "{err}"
        );
        let skip = ServeArgs {
            kafka_on_failure: Some("skip".into()),
            ..source()
        };
        let c = Config::merge(skip, FileConfig::default()).unwrap();
        assert_eq!(c.kafka[0].on_failure, leasehold_kafka::OnFailure::Skip);
        assert!(c.to_toml().contains("on_failure = \"skip\""));
        let dlq = ServeArgs {
            kafka_dlq_topic: Some("t-dlq".into()),
            ..source()
        };
        let c = Config::merge(dlq, FileConfig::default()).unwrap();
        assert_eq!(
            c.kafka[0].on_failure,
            leasehold_kafka::OnFailure::DeadLetter
        );
        let bad = ServeArgs {
            kafka_on_failure: Some("drop".into()),
            ..source()
        };
        assert!(Config::merge(bad, FileConfig::default())
            .unwrap_err()
            .to_string()
            .starts_with("invalid kafka[0].on_failure"));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("4XB").is_err());
    }
}
