//! `api`'s settings: every one an environment variable and a flag, listed by `api --help`.

use clap::Parser;
use secrecy::SecretString;
use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::ApiKeys;
use crate::redirects::RedirectAllowlist;
use shared::config::{DatabaseArgs, TelemetryArgs, parse_secret};

/// Serves the app's side of monohook: whether an account needs re-authorisation, and a re-auth token
/// that still works when the customer signs in (fetched from Mono when the stored one is about to
/// expire). Reads and writes PostgreSQL; never touches RabbitMQ. Run any number of processes.
#[derive(Debug, Parser)]
#[command(name = "api", version, args_override_self = true)]
pub struct ApiConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    pub listen_addr: SocketAddr,

    /// Address of `/metrics`, kept off the API's port (port 0 picks a free port).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9092")]
    pub metrics_addr: SocketAddr,

    /// The app's API keys, `label:key` comma-separated (at least 16 characters each; a key without a
    /// label is labelled `key<n>`; a label is 1-32 of A-Z a-z 0-9 _ - . and a key that holds `:`
    /// must be labelled). Several at once let a key rotate with no downtime; the label is recorded
    /// with every token and link handed out. `label/tokens+links:key` limits a key to some of
    /// read, list, tokens, links (without a scope a key may do everything). Keys belong on the
    /// app's backend, never in a mobile or web client.
    #[arg(long, env = "APP_API_KEYS", hide_env_values = true)]
    pub app_api_keys: ApiKeys,

    /// Mono secret key, sent as `mono-sec-key` when a fresh re-auth token is needed.
    #[arg(long, env = "MONO_SECRET_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub mono_secret_key: SecretString,

    /// Base URL of Mono's API.
    #[arg(long, env = "MONO_API_URL", default_value = "https://api.withmono.com", value_parser = shared::config::http_url)]
    pub mono_api_url: String,

    /// Time limit of one call to Mono, in ms (1 to 300000).
    #[arg(long, env = "MONO_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=300_000))]
    pub mono_timeout_ms: u64,

    /// How long one request keeps retrying a failing Mono before it answers 503, in ms (0 to
    /// 600000).
    #[arg(long, env = "MONO_RETRY_BUDGET_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub mono_retry_budget_ms: u64,

    /// Longest wait a `Retry-After` from Mono can impose, in seconds (1 to 86400).
    #[arg(long, env = "MONO_RETRY_AFTER_MAX_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub mono_retry_after_max_secs: u64,

    /// After Mono refuses an account (a permanent 4xx), how long the api answers 422 for it without
    /// asking Mono again, in seconds (0 asks every time; at most 86400). Kept per kind of request: a
    /// refused link does not silence tokens, a refused token (Mono refusing the account) silences
    /// both.
    #[arg(long, env = "MONO_REFUSAL_MEMORY_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub mono_refusal_memory_secs: u64,

    /// How long the api's Mono circuit breaker stays open before one probe call may go, in ms
    /// (100 to 60000). Each failed probe doubles it, up to 12 times this (60 s by default).
    #[arg(long, env = "MONO_CIRCUIT_OPEN_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub mono_circuit_open_ms: u64,

    /// Accounts whose calls to Mono fail in a row (5xx, timeouts; no call answered in between)
    /// that open the api's Mono breaker (1 to 1000): one account failing is that account's trouble,
    /// several in a row are Mono's.
    #[arg(long, env = "MONO_CIRCUIT_CONSECUTIVE_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub mono_circuit_consecutive_failures: u64,

    /// A stored token is handed out only if it works at least this much longer, in seconds;
    /// otherwise a fresh one is fetched from Mono (its tokens live 10 minutes).
    #[arg(long, env = "TOKEN_MIN_REMAINING_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..600))]
    pub token_min_remaining_secs: u64,

    /// Most calls to Mono under way at once in this process (and so refreshes, and account locks
    /// held); a request for a fresh token beyond it waits for a slot within `TOKEN_DEADLINE_MS`.
    #[arg(long, env = "MONO_MAX_IN_FLIGHT", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub mono_max_in_flight: u64,

    /// How long a request for a fresh token may wait for its account's lock, a Mono slot and Mono
    /// before it answers (the stored token if it works 30 s longer, else 503), in ms. A call to Mono
    /// already made goes on after it, and its token is stored for the next request. A re-auth link
    /// request waits as long (then 503). 1 to 600000.
    #[arg(long, env = "TOKEN_DEADLINE_MS", default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub token_deadline_ms: u64,

    /// Where a re-auth link may send the customer back to, comma-separated: an origin
    /// (`https://app.example.com`) allows any URL on it, any other URL allows exactly itself. The
    /// first is the redirect when a request names none; empty sends Mono no redirect and refuses
    /// any requested one (400 `redirect_not_allowed`).
    #[arg(long, env = "MONO_REAUTH_REDIRECT_URLS", default_value = "", value_parser = RedirectAllowlist::parse)]
    pub mono_reauth_redirect_urls: RedirectAllowlist,

    /// A re-auth link created this recently for the same account and redirect, in the account's
    /// current re-auth episode, is handed out again instead of asking Mono for another, in seconds
    /// (0: a new link per request, concurrent requests still sharing one; at most 86400).
    #[arg(long, env = "REAUTH_LINK_REUSE_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub reauth_link_reuse_secs: u64,

    /// HTTP worker threads (0 = one per CPU).
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,

    /// On SIGTERM, how long in-flight requests may take to finish, in seconds (1 to 3600).
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub shutdown_grace_secs: u64,
}

impl ApiConfig {
    pub fn token_min_remaining(&self) -> chrono::Duration {
        chrono::Duration::seconds(i64::try_from(self.token_min_remaining_secs).unwrap_or(i64::MAX))
    }

    pub fn token_deadline(&self) -> Duration {
        Duration::from_millis(self.token_deadline_ms)
    }

    pub fn reauth_link_reuse(&self) -> chrono::Duration {
        chrono::Duration::seconds(i64::try_from(self.reauth_link_reuse_secs).unwrap_or(i64::MAX))
    }

    /// How long the breaker stays open at first, and at most.
    pub fn mono_circuit_open(&self) -> (Duration, Duration) {
        let open = Duration::from_millis(self.mono_circuit_open_ms);
        (open, open * 12)
    }

    pub fn mono_timeout(&self) -> Duration {
        Duration::from_millis(self.mono_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_key_and_no_password() {
        let config = ApiConfig::parse_from([
            "api",
            "--app-api-keys",
            "mobile:app-key-0123456789abcdef",
            "--mono-secret-key",
            "live_sk_verysecret",
            "--database-url",
            "postgres://app:db-pass@db/monohook",
        ]);

        let shown = format!("{config:?}");

        for secret in ["app-key-0123456789abcdef", "live_sk_verysecret", "db-pass"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}
