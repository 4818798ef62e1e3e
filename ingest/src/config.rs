//! `ingest`'s settings: every one an environment variable and a flag, listed by `ingest --help`.

use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::WebhookSecrets;
use shared::config::{BrokerArgs, TelemetryArgs};

/// Receives Mono's webhooks, authenticates and validates them, and queues each one durably on
/// RabbitMQ before answering 200. Never touches the database.
#[derive(Debug, Parser)]
#[command(name = "ingest", version, args_override_self = true)]
pub struct IngestConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// Address the HTTP server listens on (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,

    /// Address of `/metrics`, kept off the webhook port that the internet reaches (port 0 picks a
    /// free port).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,

    /// The secret Mono sends in `mono-webhook-secret`. A comma-separated list is accepted so a secret
    /// can be rotated with no downtime: add the new one, switch Mono's dashboard, remove the old one.
    #[arg(long, env = "MONO_WEBHOOK_SECRET", hide_env_values = true)]
    pub mono_webhook_secret: WebhookSecrets,

    /// Largest webhook body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 262_144, value_parser = shared::config::at_least_one)]
    pub max_body_bytes: usize,

    /// A confirm timeout, in ms: a publish unconfirmed this long is silence, and three in a row with
    /// nothing confirmed leave the node. A late confirm still answers, up to PUBLISH_DEADLINE_MS.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 800, value_parser = clap::value_parser!(u64).range(1..))]
    pub publish_timeout_ms: u64,

    /// How long a webhook may wait in all, in ms, while a publish that was not confirmed (its node
    /// died, no confirm in time) is published again on the next session, before it gets 503.
    /// Unset: 5000 when AMQP_URL lists several nodes (another node takes over within seconds),
    /// else PUBLISH_TIMEOUT_MS (one try: a single broker that is down answers 503 at once). Empty
    /// means unset.
    #[arg(long, env = "PUBLISH_DEADLINE_MS", value_parser = shared::config::optional_count)]
    pub publish_deadline_ms: Option<shared::config::OptionalCount>,

    /// AMQP channels that publishes are spread over; each carries many unconfirmed publishes at once.
    #[arg(long, env = "PUBLISH_CHANNELS", default_value_t = 4, value_parser = shared::config::at_least_one)]
    pub publish_channels: usize,

    /// HTTP worker threads (0 = one per CPU).
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,

    /// Most open connections per HTTP worker thread; more wait in the accept backlog.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 2048, value_parser = shared::config::at_least_one)]
    pub max_connections: usize,

    /// Time a client has to send a request's headers, and its body, in ms (slow clients get 408).
    #[arg(long, env = "CLIENT_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_timeout_ms: u64,

    /// On SIGTERM, how long in-flight requests may take to finish before the server stops, in seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub shutdown_grace_secs: u64,
}

impl IngestConfig {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// [`IngestConfig::publish_deadline_ms`], never shorter than one publish timeout.
    pub fn publish_deadline(&self) -> Duration {
        use secrecy::ExposeSecret;
        let nodes = self.broker.amqp_url.expose_secret().split(',').filter(|u| !u.trim().is_empty()).count();
        let deadline = match self.publish_deadline_ms.and_then(|ms| ms.0) {
            Some(ms) => Duration::from_millis(ms.into()),
            None if nodes > 1 => Duration::from_secs(5),
            None => self.publish_timeout(),
        };
        deadline.max(self.publish_timeout())
    }

    pub fn client_timeout(&self) -> Duration {
        Duration::from_millis(self.client_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_secret_and_no_broker_password() {
        let config = IngestConfig::parse_from([
            "ingest",
            "--mono-webhook-secret",
            "whsec-old,whsec-new",
            "--amqp-url",
            "amqp://app:broker-pass@rabbit:5672/%2f",
        ]);

        let shown = format!("{config:?}");

        for secret in ["whsec-old", "whsec-new", "broker-pass"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}
