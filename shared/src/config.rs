//! Configuration groups both binaries flatten into their own `clap` parser.
//!
//! Every setting is an environment variable and a flag with the same meaning; `--help` lists each with
//! its default. Values that carry credentials are `SecretString`s and are never printed: their current
//! environment values are hidden from `--help`.

use clap::{Args, ValueEnum};
use secrecy::SecretString;
use std::convert::Infallible;
use std::time::Duration;

use crate::amqp_tls::{CaFile, ca_file};
use crate::topology::Topology;

/// Where RabbitMQ is and how monohook's queues are laid out on it.
#[derive(Args, Clone, Debug)]
pub struct BrokerArgs {
    /// RabbitMQ URL (`amqp://` or `amqps://`); add `?heartbeat=N` to change the 10 s default heartbeat.
    /// For a cluster, a comma-separated list of its nodes' URLs: each process tries them in an order
    /// of its own (shuffled once per process), connects to the first that answers, and after losing a
    /// node starts again from the next one, with the usual reconnect backoff. One URL (a load balancer
    /// in front of the cluster) works as well. Every entry is checked at start; a comma (or any other
    /// reserved character) in a user name or password must be percent-encoded (`,` as `%2C`).
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_parser = amqp_node_list,
        hide_env_values = true
    )]
    pub amqp_url: SecretString,

    /// PEM file of a private CA's certificates that `amqps://` connections trust in addition to the
    /// bundled public (webpki) roots, for a cluster whose TLS certificates that CA signed. Read once
    /// at start: a missing or unparseable file stops the process. Unset or empty: public roots only.
    #[arg(long, global = true, env = "AMQP_CA_FILE", value_parser = ca_file, value_name = "PATH")]
    pub amqp_ca_file: Option<CaFile>,

    /// Prefix of the exchange and every queue name: `<prefix>`, `<prefix>.work`, `<prefix>.retry.<n>`,
    /// `<prefix>.dead`.
    #[arg(long, global = true, env = "QUEUE_PREFIX", default_value = "mono.webhooks")]
    pub queue_prefix: String,

    /// Delays of the retry tiers, in seconds, comma-separated. Part of the queue declarations: every
    /// process must use the same list (changing it means deleting the old retry queues).
    #[arg(
        long,
        global = true,
        env = "RETRY_DELAYS_SECS",
        value_delimiter = ',',
        default_value = "30,300,1800,7200",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub retry_delays_secs: Vec<u64>,

    /// How many times the broker may hand out one message before dead-lettering it (poison guard;
    /// at least 2, since the worker dead-letters one short of it). Part of the queue declarations,
    /// like the retry delays.
    #[arg(long, global = true, env = "DELIVERY_LIMIT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
    pub delivery_limit: u32,

    /// Replicas of each quorum queue when it is first declared (`x-quorum-initial-group-size`): 3 on
    /// a three-node cluster, so that every queue survives the loss of any one node. Unset, the broker
    /// decides (RabbitMQ 3.x: every node of the cluster). Part of the queue declarations, like the
    /// retry delays: every process must use the same value.
    #[arg(long, global = true, env = "QUORUM_INITIAL_GROUP_SIZE", value_parser = optional_count)]
    pub quorum_initial_group_size: Option<OptionalCount>,
}

impl BrokerArgs {
    pub fn topology(&self) -> Topology {
        Topology::new(
            &self.queue_prefix,
            self.retry_delays_secs.iter().map(|s| Duration::from_secs(*s)).collect(),
            self.delivery_limit,
        )
        .with_initial_group_size(self.quorum_initial_group_size.and_then(|count| count.0))
    }
}

/// Where PostgreSQL is (the worker only: ingest never touches the database).
#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL; the database is created if it does not exist.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/monohook",
        value_parser = parse_secret,
        hide_env_values = true
    )]
    pub database_url: SecretString,

    /// Most connections the pool opens to PostgreSQL.
    #[arg(long, global = true, env = "DB_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: u32,
}

/// How the process logs.
#[derive(Args, Clone, Debug)]
pub struct TelemetryArgs {
    /// Log format: `json` (one object per line), `pretty`, or `auto` (pretty on a terminal, else JSON).
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Log filter in `tracing`'s env-filter syntax, e.g. `info,worker=debug`. lapin's returned
    /// messages (logged whole, bodies included) stay at `error` unless the filter names
    /// `lapin::returned_messages`.
    #[arg(
        long = "log-filter",
        global = true,
        env = "RUST_LOG",
        default_value = "info,sqlx::postgres::notice=warn"
    )]
    pub log_filter: String,

    /// Base URL of an OTLP/HTTP collector for traces, e.g. `http://jaeger:4318`; traces are off when it
    /// is unset or empty. The other standard `OTEL_*` variables (`OTEL_SERVICE_NAME`,
    /// `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, ...) are honoured too.
    #[arg(
        long = "otel-exporter-otlp-endpoint",
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_parser = parse_otlp_endpoint
    )]
    pub otlp_endpoint: Option<String>,
}

/// An OTLP endpoint must be an http(s) URL: a typo would otherwise only show as spans that never
/// arrive. Empty is accepted and means off, as Compose's `${OTEL_EXPORTER_OTLP_ENDPOINT:-}` passes it.
fn parse_otlp_endpoint(raw: &str) -> Result<String, String> {
    match raw.split_once("://") {
        _ if raw.is_empty() => Ok(String::new()),
        Some(("http" | "https", rest)) if !rest.is_empty() => Ok(raw.to_owned()),
        _ => Err("expected an http:// or https:// URL".to_owned()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

/// Parses the command line and environment. A missing or invalid setting stops the process with one
/// line naming its environment variable and flag (and, for an invalid one, what is accepted), exit
/// 2; every other error (and `--help`) is clap's own.
///
/// Every binary also answers `completions <shell>` and `man` (see [`crate::cli_docs`]), and its
/// `--version` names the git revision it was built from.
pub fn parse_or_exit<T: clap::Parser>() -> T {
    let command = crate::cli_docs::with_doc_commands(T::command()).version(version());
    let mut matches = match command.clone().try_get_matches() {
        Ok(matches) => matches,
        Err(error) => exit_on_parse_error(&command, error),
    };
    if let Some(doc) = crate::cli_docs::DocCommand::from_matches(&matches) {
        let written = doc.run(command.clone(), &mut std::io::stdout().lock());
        if let Err(error) = written {
            eprintln!("{}: {error}", command.get_name());
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    apply_process_settings(&matches);
    T::from_arg_matches_mut(&mut matches).unwrap_or_else(|error| exit_on_parse_error(&command, error))
}

/// Settings that hold for the whole process rather than one component: every RabbitMQ connection
/// trusts `AMQP_CA_FILE`'s CA, whichever command opens it.
pub fn apply_process_settings(matches: &clap::ArgMatches) {
    if let Ok(Some(CaFile(Some(ca)))) = matches.try_get_one::<CaFile>("amqp_ca_file") {
        crate::amqp::trust_ca(ca.clone());
    }
}

/// The crate version and the git revision of the build, e.g. `0.1.0 (git 1a2b3c4)`.
pub fn version() -> &'static str {
    static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        // vergen's placeholder when the build had no repository; empty from a Docker build that
        // was not given the revision.
        let revision = match env!("VERGEN_GIT_SHA") {
            "VERGEN_IDEMPOTENT_OUTPUT" | "" => "unknown",
            sha => sha,
        };
        format!("{} (git {revision})", env!("CARGO_PKG_VERSION"))
    });
    &VERSION
}

fn exit_on_parse_error(command: &clap::Command, error: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match error {
        error if error.kind() == ErrorKind::MissingRequiredArgument => {
            let missing = missing_settings(command, &error);
            eprintln!("{}: missing required setting: {missing}", command.get_name());
            std::process::exit(2);
        }
        error if matches!(error.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) => {
            let setting = missing_settings(command, &error);
            // The reason, never the value itself (it may be a secret).
            let reason = match (std::error::Error::source(&error), error.get(ContextKind::ValidValue)) {
                (Some(reason), _) => reason.to_string(),
                (None, Some(ContextValue::Strings(valid))) => format!("accepted: {}", valid.join(", ")),
                _ => "not an accepted value".to_owned(),
            };
            eprintln!("{}: invalid {setting}: {reason}", command.get_name());
            std::process::exit(2);
        }
        error => error.exit(),
    }
}

/// A count of at least 1 that may also be given empty, meaning unset: Compose passes a variable
/// that `.env` leaves blank as an empty string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalCount(pub Option<u32>);

pub fn optional_count(raw: &str) -> Result<OptionalCount, String> {
    match raw.trim() {
        "" => Ok(OptionalCount(None)),
        count => match count.parse::<u32>() {
            Ok(count) if count >= 1 => Ok(OptionalCount(Some(count))),
            _ => Err("must be a whole number of at least 1, or empty for unset".to_owned()),
        },
    }
}

/// A share in (0, 1].
pub fn ratio(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 1.0 => Ok(value),
        _ => Err("must be a number in (0, 1]".to_owned()),
    }
}

/// A count of at least one.
pub fn at_least_one(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(value) if value >= 1 => Ok(value),
        _ => Err("must be a whole number of at least 1".to_owned()),
    }
}

/// An `http://` or `https://` URL with a host.
pub fn http_url(raw: &str) -> Result<String, String> {
    let host = raw.strip_prefix("https://").or_else(|| raw.strip_prefix("http://"));
    match host.and_then(|rest| rest.split(['/', '?', '#']).next()) {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(raw.to_owned()),
        _ => Err("must be an http:// or https:// URL with a host".to_owned()),
    }
}

/// `MONO_SECRET_KEY (--mono-secret-key)` for each missing argument clap reported.
fn missing_settings(command: &clap::Command, error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let reported: Vec<String> = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::Strings(values)) => values.clone(),
        Some(ContextValue::String(value)) => vec![value.clone()],
        _ => Vec::new(),
    };
    let names: Vec<String> = reported
        .iter()
        .map(|shown| {
            let long = shown.trim_start_matches("--").split([' ', '=']).next().unwrap_or_default();
            let env = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(long))
                .and_then(|arg| arg.get_env())
                .map(|env| env.to_string_lossy().into_owned());
            match env {
                Some(env) => format!("{env} (--{long})"),
                None => format!("--{long}"),
            }
        })
        .collect();
    if names.is_empty() { error.kind().to_string() } else { names.join(", ") }
}

/// Wraps a setting in `SecretString` so that `Debug` prints `[REDACTED]`.
/// `AMQP_URL`: one URL or a comma-separated list of a cluster's nodes, each of which must parse, so
/// that a typo in the third node does not wait for the first two to die before it shows. The error
/// names the entry's position, never any part of it (a malformed entry may be all password).
pub fn amqp_node_list(raw: &str) -> Result<SecretString, String> {
    let entries: Vec<&str> = raw.split(',').map(str::trim).collect();
    let count = entries.len();
    if entries.iter().all(|entry| entry.is_empty()) {
        return Err("no URL given".to_owned());
    }
    for (position, entry) in entries.iter().enumerate() {
        let which =
            if count == 1 { "the URL".to_owned() } else { format!("entry {} of {count}", position + 1) };
        if entry.is_empty() {
            return Err(format!("{which} is empty (two commas in a row, or one at an end)"));
        }
        if entry.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(format!(
                "{which} is not an amqp:// or amqps:// URL (a comma in a password is written %2C)"
            ));
        }
    }
    Ok(SecretString::from(raw))
}

pub fn parse_secret(raw: &str) -> Result<SecretString, Infallible> {
    Ok(SecretString::from(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn every_node_of_amqp_url_is_checked_and_a_bad_one_named_by_position_only() {
        let good = "amqp://u:p@rabbit-1:5672/%2f, amqp://u:p@rabbit-2:5672/%2f";
        assert_eq!(amqp_node_list(good).unwrap().expose_secret(), good);
        let third_bad = "amqp://u:p@a/%2f,amqp://u:p@b/%2f,http://u:hunter2@c";
        let error = amqp_node_list(third_bad).unwrap_err();
        assert!(error.starts_with("entry 3 of 3 is not an amqp://"), "{error}");
        assert!(!error.contains("hunter2") && !error.contains("http://u"), "{error}");
        assert!(
            amqp_node_list("amqp://u:p@a/%2f,,amqp://u:p@b/%2f")
                .unwrap_err()
                .starts_with("entry 2 of 3 is empty")
        );
        assert_eq!(amqp_node_list(" , ").unwrap_err(), "no URL given");
    }

    #[test]
    fn a_comma_in_a_password_is_written_percent_encoded() {
        // Written raw, the comma splits the URL into two entries, and the second is not a URL.
        let error = amqp_node_list("amqp://app:pa,ss@rabbit:5672/%2f").unwrap_err();
        assert!(error.starts_with("entry ") && error.contains(" of 2 ") && !error.contains("ss@"), "{error}");
        let encoded = "amqp://app:pa%2Css@rabbit:5672/%2f";
        amqp_node_list(encoded).unwrap();
        let uri: lapin::uri::AMQPUri = encoded.parse().unwrap();
        assert_eq!(uri.authority.userinfo.password, "pa,ss", "lapin decodes it");
    }

    #[test]
    fn an_optional_count_is_empty_or_at_least_one() {
        assert_eq!(optional_count(""), Ok(OptionalCount(None)));
        assert_eq!(optional_count(" 3 "), Ok(OptionalCount(Some(3))));
        assert!(optional_count("0").is_err());
        assert!(optional_count("three").is_err());
    }
}
