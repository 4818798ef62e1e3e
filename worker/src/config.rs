//! `worker`'s command line: running is the default; operator commands are subcommands. Every setting
//! is an environment variable and a flag, listed by `worker --help` with its default.

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use std::time::Duration;

use crate::journal_payload::JournalPayload;
use shared::config::{BrokerArgs, DatabaseArgs, TelemetryArgs, parse_secret};
use shared::retry::RetryPolicy;

/// Consumes queued Mono webhooks, calls Mono's re-authorise endpoint, and keeps each account's record
/// in PostgreSQL. Run any number of processes against the same queue.
#[derive(Debug, Parser)]
#[command(name = "worker", version, subcommand_negates_reqs = true, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending database migrations (creating the database if needed), then exit.
    Migrate,
    /// Print one account's record (the re-auth token is never printed, only whether one is held),
    /// or erase its personal data (`account erase <id>`).
    Account(crate::commands::account::AccountArgs),
    /// Inspect, replay and purge dead letters.
    #[command(subcommand)]
    Dlq(crate::commands::dlq::DlqCommand),
    /// What an operator checks first: queues, consumers, dead letters, last processed event, Mono.
    Status(crate::commands::status::StatusArgs),
}

/// Settings of the consuming worker (the default command).
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Mono secret key, sent as `mono-sec-key` when asking Mono for a re-auth token.
    #[arg(long, env = "MONO_SECRET_KEY", required = true, value_parser = parse_secret, hide_env_values = true)]
    pub mono_secret_key: Option<SecretString>,

    /// Base URL of Mono's API.
    #[arg(long, env = "MONO_API_URL", default_value = "https://api.withmono.com", value_parser = shared::config::http_url)]
    pub mono_api_url: String,

    /// Time limit of one call to Mono, in ms; a call that takes longer counts as a transient failure.
    #[arg(long, env = "MONO_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub mono_timeout_ms: u64,

    /// How long one delivery keeps retrying Mono in process (exponential backoff with jitter) before
    /// it moves to the next delayed-retry tier, in seconds.
    #[arg(long, env = "MONO_RETRY_BUDGET_SECS", default_value_t = 20)]
    pub mono_retry_budget_secs: u64,

    /// First in-process retry delay after a transient Mono failure, in ms (doubles up to 5 s).
    #[arg(long, env = "MONO_RETRY_INITIAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub mono_retry_initial_ms: u64,

    /// Deliveries a worker process holds and works on at once (the AMQP prefetch). It must cover
    /// the broker's ack-to-redelivery delay as well as the work in progress: at 64 a worker drains a
    /// third as fast as at 256 (see bench/results).
    #[arg(long, env = "PREFETCH", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Calls to Mono a worker process has in flight at most. Re-auth throughput is about this many
    /// per Mono round trip.
    #[arg(long, env = "MONO_MAX_IN_FLIGHT", default_value_t = 200, value_parser = shared::config::at_least_one)]
    pub mono_max_in_flight: usize,

    /// Most deliveries applied in one database transaction. Batches form from whatever is waiting, so
    /// a lone delivery is never delayed to fill one.
    #[arg(long, env = "BATCH_MAX", default_value_t = 128, value_parser = shared::config::at_least_one)]
    pub batch_max: usize,

    /// Database transactions a worker process runs at once.
    #[arg(long, env = "BATCH_CONCURRENCY", default_value_t = 2, value_parser = shared::config::at_least_one)]
    pub batch_concurrency: usize,

    /// Share of the accounts called over the window whose latest Mono call failed that opens the
    /// circuit breaker (one account failing often counts once).
    #[arg(long, env = "MONO_CIRCUIT_FAILURE_RATIO", default_value_t = 0.5, value_parser = shared::config::ratio)]
    pub mono_circuit_failure_ratio: f64,

    /// Accounts whose Mono calls failed in a row (none answered in between) that open the circuit
    /// breaker, however few calls there are (one slow trickle of re-auths must park during an outage,
    /// not exhaust its retries). One account failing again and again counts once: its delivery
    /// spends its attempts and is dead-lettered, and parks nobody else.
    #[arg(long, env = "MONO_CIRCUIT_CONSECUTIVE_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub mono_circuit_consecutive_failures: u64,

    /// Longest wait a `Retry-After` from Mono can impose, in seconds; a longer one is capped.
    #[arg(long, env = "MONO_RETRY_AFTER_MAX_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub mono_retry_after_max_secs: u64,

    /// Fewest accounts called in the window before the breaker may open on the failure ratio.
    #[arg(long, env = "MONO_CIRCUIT_MIN_CALLS", default_value_t = 10, value_parser = shared::config::at_least_one)]
    pub mono_circuit_min_calls: usize,

    /// Sliding window of the breaker, in seconds.
    #[arg(long, env = "MONO_CIRCUIT_WINDOW_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub mono_circuit_window_secs: u64,

    /// How long the breaker stays open before a probe call, in seconds (doubles on each failed
    /// probe, up to 60 s).
    #[arg(long, env = "MONO_CIRCUIT_OPEN_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub mono_circuit_open_secs: u64,

    /// The same body received again within this many seconds is a duplicate and changes nothing.
    #[arg(long, env = "DEDUP_WINDOW_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub dedup_window_secs: u64,

    /// What the journal keeps of each webhook's body: `minimal` (only the fields the worker and an
    /// operator need: event, account and customer ids, data status, the account's `updated_at` and
    /// institution) or `full` (the whole body, with the customer's name, account number, balance and
    /// BVN).
    #[arg(long, env = "JOURNAL_PAYLOAD", value_enum, default_value_t = JournalPayload::Minimal)]
    pub journal_payload: JournalPayload,

    /// Days a journal row is kept (never less than the dedup window); a `dead` row stays until its
    /// letter is replayed or purged. Expired months go whole (the journal is partitioned by month).
    #[arg(long, env = "JOURNAL_RETENTION_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub journal_retention_days: u64,

    /// Days the audit is kept: tokens handed out (`token_issuances`), dead-letter replays and purges
    /// (`dead_letter_actions`, an unfinished one stays), account erasures, the api's re-auth links and
    /// their hand-outs (a link stays while a hand-out of it does).
    #[arg(long, env = "AUDIT_RETENTION_DAYS", default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub audit_retention_days: u64,

    /// How often a worker deletes expired rows, in seconds (one worker at a time does it).
    #[arg(long, env = "RETENTION_INTERVAL_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_interval_secs: u64,

    /// Most rows one retention step deletes (each step is one short statement).
    #[arg(long, env = "RETENTION_STEP_ROWS", default_value_t = 5000, value_parser = clap::value_parser!(i64).range(1..))]
    pub retention_step_rows: i64,

    /// Address of the worker's own HTTP endpoint: `/metrics`, `/healthz`, `/readyz` (port 0 picks a
    /// free port).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: std::net::SocketAddr,

    /// How often queue depths and ages are polled for the metrics, in seconds.
    #[arg(long, env = "QUEUE_POLL_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_poll_secs: u64,

    /// Longest a delivery is held unacked while our database fails, in seconds; then it is parked in
    /// the first retry tier without spending an attempt. Keep it well below RabbitMQ's
    /// `consumer_timeout` (30 min by default), which closes the channel of a delivery held longer.
    #[arg(long, env = "HOLD_MAX_SECS", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub hold_max_secs: u64,

    /// On SIGTERM, how long in-flight deliveries may take to finish, in seconds; the rest return to
    /// the queue.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub shutdown_grace_secs: u64,

    /// The app's endpoints for notifications of re-auth state (Standard Webhooks), as a JSON list:
    /// `[{"name": "app", "url": "https://...", "secrets": ["whsec_..."], "events": [...]}]` (events
    /// left out: all four). Checked at start; empty: no notifications are written.
    #[arg(long, env = "NOTIFY_ENDPOINTS", default_value = "", value_parser = parse_secret, hide_env_values = true, hide_default_value = true)]
    pub notify_endpoints: SecretString,

    /// Waits between a notification's tries, in seconds (±20 %); after the last, it is a dead letter.
    /// The default spans about 27 hours.
    #[arg(
        long,
        env = "NOTIFY_RETRY_SCHEDULE_SECS",
        value_delimiter = ',',
        default_value = "5,300,1800,7200,18000,36000,36000",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub notify_retry_schedule_secs: Vec<u64>,

    /// Longest a notification's try may take (connect, send, answer), in milliseconds.
    #[arg(long, env = "NOTIFY_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub notify_timeout_ms: u64,

    /// Lets notifications go to private, loopback and link-local addresses (an app in the same
    /// network, local development). Off, the sender refuses them, also behind a name.
    #[arg(long, env = "NOTIFY_ALLOW_PRIVATE_ADDRESSES", default_value_t = false, action = clap::ArgAction::Set)]
    pub notify_allow_private_addresses: bool,

    /// After five failed tries in a row, an endpoint is left alone this many seconds (doubling on
    /// each failed probe, up to 10 minutes); its notifications wait without spending tries.
    #[arg(long, env = "NOTIFY_BREAKER_OPEN_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub notify_breaker_open_secs: u64,
}

impl RunArgs {
    /// The notification sender's settings, `NOTIFY_ENDPOINTS` checked (the error never holds a secret).
    pub fn notify_settings(&self) -> anyhow::Result<crate::notify::sender::SenderSettings> {
        use secrecy::ExposeSecret;
        let endpoints = crate::notify::endpoints::parse(self.notify_endpoints.expose_secret())?;
        for endpoint in &endpoints {
            // A URL that names an address directly never reaches the sender's resolver: checked here.
            anyhow::ensure!(
                crate::notify::address::literal_allowed(&endpoint.url, self.notify_allow_private_addresses),
                "NOTIFY_ENDPOINTS: endpoint {:?}: its address is private or reserved (set NOTIFY_ALLOW_PRIVATE_ADDRESSES=true for an app in the same network)",
                endpoint.name
            );
        }
        Ok(crate::notify::sender::SenderSettings {
            endpoints,
            schedule: self.notify_retry_schedule_secs.iter().map(|s| Duration::from_secs(*s)).collect(),
            timeout: Duration::from_millis(self.notify_timeout_ms),
            allow_private: self.notify_allow_private_addresses,
            idle_poll: Duration::from_secs(1),
            breaker_open: Duration::from_secs(self.notify_breaker_open_secs),
        })
    }

    pub fn mono_timeout(&self) -> Duration {
        Duration::from_millis(self.mono_timeout_ms)
    }

    pub fn dedup_window(&self) -> Duration {
        Duration::from_secs(self.dedup_window_secs)
    }

    pub fn retention_policy(&self) -> crate::retention::RetentionPolicy {
        crate::retention::RetentionPolicy {
            journal: Duration::from_secs(self.journal_retention_days * 86_400),
            audit: Duration::from_secs(self.audit_retention_days * 86_400),
            dedup_window: self.dedup_window(),
            step_rows: self.retention_step_rows,
        }
    }

    pub fn max_retry_after(&self) -> Duration {
        Duration::from_secs(self.mono_retry_after_max_secs)
    }

    pub fn hold_max(&self) -> Duration {
        Duration::from_secs(self.hold_max_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn breaker_settings(&self) -> crate::circuit::BreakerSettings {
        let open_for = Duration::from_secs(self.mono_circuit_open_secs);
        crate::circuit::BreakerSettings {
            window: Duration::from_secs(self.mono_circuit_window_secs),
            min_calls: self.mono_circuit_min_calls,
            failure_ratio: self.mono_circuit_failure_ratio,
            consecutive_failures: usize::try_from(self.mono_circuit_consecutive_failures)
                .unwrap_or(usize::MAX),
            open_for,
            max_open_for: open_for.max(Duration::from_secs(60)),
        }
    }

    /// In-process retries of one Mono call.
    pub fn mono_retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial_interval: Duration::from_millis(self.mono_retry_initial_ms),
            max_interval: Duration::from_secs(5),
            multiplier: 2.0,
            max_elapsed: Some(Duration::from_secs(self.mono_retry_budget_secs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_secret_key_and_no_passwords() {
        let cli = Cli::parse_from([
            "worker",
            "--mono-secret-key",
            "live_sk_verysecret",
            "--amqp-url",
            "amqp://app:broker-pass@rabbit:5672/%2f",
            "--database-url",
            "postgres://app:db-pass@db/monohook",
        ]);

        let shown = format!("{cli:?}");

        for secret in ["live_sk_verysecret", "broker-pass", "db-pass"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}
