use clap::{CommandFactory, Parser};

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// Parses flags as `leasehold serve` does.
fn flags(argv: &[&str]) -> ServeArgs {
    Cli::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
        .unwrap()
        .serve
}

fn load(argv: &[&str], env: &[(&str, &str)], file: &str) -> Result<Loaded, ConfigError> {
    let file = (!file.is_empty()).then(|| ("leasehold.toml".to_owned(), file.parse().unwrap()));
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let mut argv = argv.to_vec();
    if !argv.contains(&"--id") {
        argv.extend(["--id", "a"]);
    }
    ServeOptions::from_layers(file, env, &flags(&argv))
}

fn options(argv: &[&str], env: &[(&str, &str)], file: &str) -> ServeOptions {
    load(argv, env, file).unwrap().options
}

fn error(argv: &[&str], env: &[(&str, &str)], file: &str) -> String {
    load(argv, env, file).unwrap_err().to_string()
}

#[test]
fn defaults_match_the_documented_values() {
    let c = options(&[], &[], "");
    assert_eq!(c.shards, 1024);
    assert_eq!(c.lease_ttl, Duration::from_secs(5));
    assert_eq!(c.request_timeout, Duration::from_secs(5));
    assert_eq!(c.max_payload, ByteSize(4 << 20));
    assert_eq!(c.handler, HandlerSpec::Echo);
    assert_eq!(c.etcd, List::of(["http://127.0.0.1:2379"]));
    assert_eq!(c.log_format, LogFormat::Text);
}

#[test]
fn flags_override_the_environment_which_overrides_the_file() {
    let file = "shards = 64\nlease_ttl = \"3s\"\nmax_moves = 9\netcd = [\"http://e1:2379\", \"http://e2:2379\"]";
    let env = [("LEASEHOLD_SHARDS", "100"), ("LEASEHOLD_MAX_MOVES", "10")];
    let c = options(&["--shards", "128"], &env, file);
    assert_eq!(c.shards, 128, "flag over environment");
    assert_eq!(c.max_moves, 10, "environment over file");
    assert_eq!(c.lease_ttl, Duration::from_secs(3), "file over default");
    assert_eq!(c.etcd.0.len(), 2);
    let c = options(&[], &[("LEASEHOLD_ETCD", "http://a:1, http://b:2")], "");
    assert_eq!(c.etcd, List::of(["http://a:1", "http://b:2"]));
}

#[test]
fn errors_name_the_field_its_flag_variable_and_source() {
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec!["--shards", "0"],
            vec![],
            "",
            "invalid shards (--shards / LEASEHOLD_SHARDS): 0 is outside 1..=65536",
        ),
        (
            vec![],
            vec![("LEASEHOLD_SHARDS", "many")],
            "",
            "invalid shards (--shards / LEASEHOLD_SHARDS): \"many\" is not a whole number (from LEASEHOLD_SHARDS)",
        ),
        (
            vec!["--lease-ttl", "fast"],
            vec![],
            "",
            "invalid lease_ttl (--lease-ttl / LEASEHOLD_LEASE_TTL): \"fast\" is not a duration",
        ),
        (vec!["--lease-ttl", "1500ms"], vec![], "", "invalid lease_ttl"),
        (
            vec!["--handler", "http://x:1"],
            vec![],
            "",
            "invalid handler (--handler / LEASEHOLD_HANDLER): \"http://x:1\": use `echo`, `grpc://HOST:PORT` or `grpcs://HOST:PORT` (from --handler)",
        ),
        (vec!["--max-payload", "4 parsecs"], vec![], "", "invalid max_payload"),
        (vec!["--max-payload", "1GiB"], vec![], "", "invalid max_payload"),
        (vec!["--listen", "nowhere"], vec![], "", "invalid listen"),
        (vec!["--etcd", "etcd"], vec![], "", "invalid etcd"),
        (vec!["--id", "a b"], vec![], "", "invalid id"),
        (vec!["--log-format", "xml"], vec![], "", "invalid log_format"),
        (
            vec!["--tls-cert", "c.pem", "--tls-key", "c.key"],
            vec![],
            "",
            "invalid peer_ca (--peer-ca / LEASEHOLD_PEER_CA): the client or admin plane has TLS but the peer plane would be plaintext",
        ),
        (
            vec!["--tls-cert", "c.pem"],
            vec![],
            "",
            "invalid tls_key (--tls-key / LEASEHOLD_TLS_KEY): required when tls_cert is set",
        ),
        (
            vec!["--peer-ca", "ca.pem"],
            vec![],
            "",
            "invalid peer_cert (--peer-cert / LEASEHOLD_PEER_CERT): peer TLS is mutual",
        ),
        (
            vec!["--handler", "grpcs://h:1"],
            vec![],
            "",
            "invalid handler_ca (--handler-ca / LEASEHOLD_HANDLER_CA): required for a grpcs:// handler",
        ),
        (
            vec!["--etcd", "https://e:2379"],
            vec![],
            "",
            "invalid etcd_ca (--etcd-ca / LEASEHOLD_ETCD_CA): required for https:// etcd endpoints",
        ),
        (
            vec!["--admin-auth", "all"],
            vec![],
            "",
            "invalid admin_token_file (--admin-token-file / LEASEHOLD_ADMIN_TOKEN_FILE): required when admin_auth is all",
        ),
        (
            vec!["--allow-plaintext-peers", "maybe"],
            vec![],
            "",
            "invalid allow_plaintext_peers",
        ),
        (
            vec![],
            vec![],
            "max_concurrency = \"lots\"",
            "invalid max_concurrency (--max-concurrency / LEASEHOLD_MAX_CONCURRENCY): \"lots\" is not a whole number (in leasehold.toml)",
        ),
    ];
    for (argv, env, file, want) in cases {
        let err = error(&argv, &env, file);
        assert!(err.starts_with(want), "{err:?} should start with {want:?}");
    }
}

#[test]
fn unknown_file_keys_are_errors_and_unknown_variables_warnings_with_the_closest_name() {
    let err = error(&[], &[], "shard = 3");
    assert_eq!(
        err,
        "cannot read config file leasehold.toml: unknown key `shard`; did you mean `shards` (LEASEHOLD_SHARDS)?"
    );
    let loaded = load(
        &[],
        &[("LEASEHOLD_LEASE_TLL", "3s"), ("LEASEHOLD_ZZZ", "1")],
        "",
    )
    .unwrap();
    assert_eq!(
        loaded.warnings,
        vec![
            "LEASEHOLD_LEASE_TLL is not a setting and is ignored; did you mean `lease_ttl` (LEASEHOLD_LEASE_TTL)?".to_owned(),
            "LEASEHOLD_ZZZ is not a setting and is ignored".to_owned(),
        ]
    );
    assert_eq!(loaded.options.lease_ttl, Duration::from_secs(5));
}

#[test]
fn secrets_are_not_echoed_and_kubernetes_service_links_are_not_warned_about() {
    let c = options(&["--etcd-username", "lh"], &[], "etcd_password = 123456");
    let (_, password) = c.etcd_credentials().unwrap().unwrap();
    assert_eq!(
        password.expose(),
        "123456",
        "a bare number is a password too"
    );
    let err = error(
        &["--etcd-username", "lh"],
        &[],
        "etcd_password = [\"s3cret\"]",
    );
    assert!(
        err.starts_with("invalid etcd_password") && !err.contains("s3cret"),
        "{err}"
    );
    let loaded = load(
        &[],
        &[
            ("LEASEHOLD_SERVICE_HOST", "10.0.0.1"),
            ("LEASEHOLD_PORT", "tcp://10.0.0.1:7070"),
            ("LEASEHOLD_PORT_7070_TCP_ADDR", "10.0.0.1"),
        ],
        "id = 7",
    )
    .unwrap();
    assert_eq!(loaded.warnings, Vec::<String>::new());
    let err = parse_file("f.toml", "shards = 4\netcd_password = s3cret\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot read config file f.toml: line 2:") && !err.contains("s3cret"),
        "{err}"
    );
    let c = options(&[], &[], "cluster = 7");
    assert_eq!(c.cluster, "7", "bare numbers are accepted for names");
    // A single [kafka] table is refused, flags or not.
    let err = error(&["--kafka-topic", "t"], &[], "[kafka]\nbrokers = \"b:1\"");
    assert!(err.starts_with("invalid kafka"), "{err}");
}

#[test]
fn printed_config_reads_back_the_same() {
    let c = options(
        &["--handler", "grpc://app:9000", "--max-payload", "512KiB"],
        &[],
        "",
    );
    let printed = c.to_toml();
    assert!(
        printed.contains("handler = \"grpc://app:9000\""),
        "{printed}"
    );
    assert!(printed.contains("max_payload = \"512KiB\""), "{printed}");
    let again = ServeOptions::from_layers(
        Some(("printed".into(), printed.parse().unwrap())),
        [],
        &ServeArgs::default(),
    )
    .unwrap()
    .options;
    assert_eq!(again, c);
}

#[test]
fn etcd_credentials_come_in_pairs_and_are_never_printed() {
    let err = error(&["--etcd-username", "lh"], &[], "");
    assert!(err.starts_with("invalid etcd_password"), "{err}");
    let c = options(
        &["--etcd-username", "lh"],
        &[("LEASEHOLD_ETCD_PASSWORD", "s3cret")],
        "",
    );
    let (user, password) = c.etcd_credentials().unwrap().unwrap();
    assert_eq!((user.as_str(), password.expose()), ("lh", "s3cret"));
    assert!(!c.to_toml().contains("s3cret"));
    assert!(!format!("{c:?}").contains("s3cret"));
    // Empty variables (as manifests leave them) mean "not set".
    let c = options(
        &[],
        &[
            ("LEASEHOLD_ETCD_USERNAME", ""),
            ("LEASEHOLD_ETCD_PASSWORD", ""),
        ],
        "",
    );
    assert!(c.etcd_credentials().unwrap().is_none());
}

#[test]
fn kafka_sources_come_from_the_file_and_flags() {
    let file = "[[kafka]]\nbrokers = \"b:9092\"\ntopics = [\"orders\"]\nkey = \"json:/account\"\n[kafka.properties]\n\"sasl.password\" = \"pw\"\n";
    let c = options(&["--kafka-dlq-topic", "orders-dlq"], &[], file);
    let k = &c.kafka_sources().unwrap()[0];
    assert_eq!(
        (k.name.as_str(), k.group.as_str()),
        ("orders", "leasehold-default-orders")
    );
    assert_eq!(k.dlq_topic.as_deref(), Some("orders-dlq"));
    assert_eq!(k.key.to_string(), "json:/account");
    assert_eq!(k.properties["sasl.password"], "pw");
    let printed = c.to_toml();
    assert!(!printed.contains("pw\""), "secrets printed: {printed}");
    let again = ServeOptions::from_layers(
        Some((
            "printed".into(),
            printed.replace("<redacted>", "pw").parse().unwrap(),
        )),
        [],
        &ServeArgs::default(),
    )
    .unwrap()
    .options;
    assert_eq!(again.kafka, c.kafka);

    let err = error(&["--kafka-topic", "t"], &[], "");
    assert_eq!(
        err,
        "invalid kafka[0].brokers: required (host:port, comma separated)"
    );
    let err = error(
        &[
            "--kafka-brokers",
            "b:1",
            "--kafka-topic",
            "t",
            "--kafka-key",
            "json:x",
        ],
        &[],
        "",
    );
    assert!(err.starts_with("invalid kafka[0].key"), "{err}");
    let err = error(
        &[],
        &[],
        "[[kafka]]\nbrokers = \"b:1\"\ntopics = \"t\"\ndlq_topic = \"d\"\nmax_in_flight = \"x\"",
    );
    assert_eq!(
        err,
        "invalid kafka[0].max_in_flight: \"x\" is not a whole number (in leasehold.toml)"
    );
    let err = error(&[], &[], "[[kafka]]\nbrokerz = \"b:1\"");
    assert!(
        err.starts_with(
            "invalid kafka[0].brokerz: unknown field `brokerz`, expected one of `name`"
        ),
        "{err}"
    );
    // The environment sets the first source too.
    let c = options(
        &[],
        &[
            ("LEASEHOLD_KAFKA_BROKERS", "b:1"),
            ("LEASEHOLD_KAFKA_TOPIC", "t1,t2"),
            ("LEASEHOLD_KAFKA_ON_FAILURE", "skip"),
        ],
        "",
    );
    assert_eq!(c.kafka_sources().unwrap()[0].topics, vec!["t1", "t2"]);
    let err = error(&["--kafka-property", "nokey"], &[], "");
    assert!(err.starts_with("invalid kafka_property"), "{err}");
}

#[test]
fn a_source_without_a_dead_letter_topic_must_choose_to_skip() {
    let source = ["--kafka-brokers", "b:1", "--kafka-topic", "t"];
    let err = error(&source, &[], "");
    assert!(
        err.starts_with("invalid kafka[0].dlq_topic: is required")
            && err.contains("on_failure = \"skip\""),
        "{err}"
    );
    let c = options(
        &[&source[..], &["--kafka-on-failure", "skip"]].concat(),
        &[],
        "",
    );
    assert_eq!(
        c.kafka_sources().unwrap()[0].on_failure,
        leasehold_kafka::OnFailure::Skip
    );
    assert!(c.to_toml().contains("on_failure = \"skip\""));
    let c = options(
        &[&source[..], &["--kafka-dlq-topic", "t-dlq"]].concat(),
        &[],
        "",
    );
    assert_eq!(
        c.kafka_sources().unwrap()[0].on_failure,
        leasehold_kafka::OnFailure::DeadLetter
    );
    let err = error(
        &[&source[..], &["--kafka-on-failure", "drop"]].concat(),
        &[],
        "",
    );
    assert!(err.starts_with("invalid kafka[0].on_failure"), "{err}");
}

#[test]
fn help_shows_each_settings_variable_and_default() {
    let help = Cli::command().render_long_help().to_string();
    for (name, _) in SETTINGS {
        let flag = format!("--{}", name.replace('_', "-"));
        let env = format!("[env: LEASEHOLD_{}]", name.to_uppercase());
        assert!(help.contains(&flag), "{flag} missing from --help");
        assert!(help.contains(&env), "{env} missing from --help");
    }
    assert!(help.contains("[default: 1024]"), "{help}");
    assert!(help.contains("[default: 5s]"), "{help}");
    assert!(help.contains("[default: 4MiB]"), "{help}");
}

/// The README's settings table lists exactly the settings, with their defaults.
#[test]
fn the_readme_settings_table_matches_the_settings() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo");
    let readme = std::fs::read_to_string(format!("{dir}/../../README.md")).unwrap();
    let defaults = toml::Table::try_from(ServeOptions::default()).unwrap();
    let mut documented = Vec::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `a`, `b` / `--a`, `--b` | default | meaning |
        let Some((keys, flags)) = cells[1].split_once(" / ") else {
            continue;
        };
        let keys: Vec<&str> = keys.split(", ").map(|k| k.trim_matches('`')).collect();
        let flags: Vec<&str> = flags.split(", ").map(|f| f.trim_matches('`')).collect();
        if !keys.iter().all(|k| is_setting(k)) {
            continue; // another table (Kafka source keys, chart values)
        }
        for (k, f) in keys.iter().zip(&flags) {
            assert_eq!(
                *f,
                format!("--{}", k.replace('_', "-")),
                "README flag of {k}"
            );
            documented.push(k.to_string());
            // A default written as code must be the real one.
            if let Some(d) = cells[2].strip_prefix('`').and_then(|d| d.strip_suffix('`')) {
                let real = match defaults.get(*k) {
                    Some(toml::Value::String(s)) => s.clone(),
                    Some(toml::Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    Some(v) => v.to_string(),
                    None => "none".into(),
                };
                assert_eq!(d, real, "README default of {k}");
            }
        }
    }
    let settings: Vec<String> = SETTINGS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        documented, settings,
        "README table rows vs settings (in order)"
    );
}

#[test]
fn close_names_are_suggested() {
    assert_eq!(edit_distance("shard", "shards"), 1);
    assert_eq!(edit_distance("lease_tll", "lease_ttl"), 1);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(suggestion("qqqqqq"), "");
}

#[test]
fn kafka_secrets_come_from_the_environment_or_a_file() {
    let dir = std::env::temp_dir().join(format!("lh-kafka-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "from-file\n").unwrap();
    std::env::set_var("LH_TEST_SASL_USER", "from-env");
    assert_eq!(
        kafka::resolve_property(0, "sasl.username", "${env:LH_TEST_SASL_USER}").unwrap(),
        "from-env"
    );
    let value = format!("${{file:{}}}", file.display());
    assert_eq!(
        kafka::resolve_property(0, "sasl.password", &value).unwrap(),
        "from-file"
    );
    assert_eq!(
        kafka::resolve_property(0, "acks", "all").unwrap(),
        "all",
        "plain values pass"
    );
    let e = kafka::resolve_property(1, "sasl.password", "${env:LH_TEST_UNSET_VARIABLE}")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("kafka[1].properties.sasl.password") && e.contains("LH_TEST_UNSET_VARIABLE"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
