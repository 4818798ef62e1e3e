//! The sender: delivers the app's notifications, in every worker process (they share the rows; a
//! lease keeps two from sending the same one, and lets one killed mid-delivery hand it on).
//!
//! Each try signs afresh (`webhook-timestamp` is the try's time; `webhook-id` is the notification's,
//! the same on every try), waits `NOTIFY_TIMEOUT_MS` at most, follows no redirect and reads at most
//! 4 KiB of the answer. A 2xx delivers; anything else is a failure, retried after the schedule's next
//! delay (±20 %), and after the last one the delivery becomes a dead letter. An endpoint that failed
//! five times in a row is left alone (its breaker open) for `NOTIFY_BREAKER_OPEN_SECS` (30 s), doubling to 10 min, then probed
//! with one delivery: its rows wait without spending tries, and the other endpoints are not slowed.

use chrono::Utc;
use rand::Rng;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::endpoints::Endpoint;
use super::signing::signature_header;
use crate::db::notifications::{self, Taken};

/// How much of an endpoint's answer is read (to reuse the connection): enough for an error page.
const ANSWER_READ_MAX: usize = 4 * 1024;
/// Failures in a row that open an endpoint's breaker.
const BREAKER_FAILURES: u32 = 5;
const BREAKER_LONGEST_OPEN: Duration = Duration::from_secs(600);
/// Deliveries one endpoint has in flight from one process at most.
const IN_FLIGHT_PER_ENDPOINT: i64 = 16;
/// How often the backlog gauges are refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(15);

/// What the sender is told.
pub struct SenderSettings {
    pub endpoints: Vec<Endpoint>,
    /// The waits between tries: one try more than delays, then the dead letter.
    pub schedule: Vec<Duration>,
    pub timeout: Duration,
    pub allow_private: bool,
    /// How often to look for due deliveries when the last look found none.
    pub idle_poll: Duration,
    /// How long an endpoint's breaker first stays open (doubling on each failed probe).
    pub breaker_open: Duration,
}

/// One endpoint's breaker: consecutive failures open it; after its time one probe decides.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    open_for: Duration,
}

impl Breaker {
    /// How many deliveries may be taken now: all, one probe, or none.
    fn allowance(&self, now: Instant) -> i64 {
        match self.open_until {
            None => IN_FLIGHT_PER_ENDPOINT,
            Some(until) if now >= until => 1,
            Some(_) => 0,
        }
    }

    fn record(&mut self, ok: bool, now: Instant, first_open: Duration) -> bool {
        if ok {
            *self = Self::default();
            return false;
        }
        self.failures += 1;
        if self.failures >= BREAKER_FAILURES {
            self.open_for = if self.open_until.is_some() {
                (self.open_for * 2).min(BREAKER_LONGEST_OPEN)
            } else {
                first_open
            };
            self.open_until = Some(now + self.open_for);
        }
        self.open_until.is_some()
    }
}

/// How one try went.
enum Answer {
    Delivered(u16),
    Failed(String),
}

/// Runs until `cancel`: takes due deliveries per endpoint, sends them, records each outcome.
pub async fn run(pool: PgPool, settings: SenderSettings, cancel: CancellationToken) {
    if settings.endpoints.is_empty() {
        return;
    }
    let client = match client(&settings) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the notification sender's HTTP client; notifications wait in the database");
            return;
        }
    };
    let settings = Arc::new(settings);
    let mut breakers: HashMap<String, Breaker> = HashMap::new();
    let mut backlog_at: Option<Instant> = None;
    for endpoint in &settings.endpoints {
        metrics::gauge!("monohook_worker_notify_breaker_open", "endpoint" => endpoint.name.clone()).set(0.0);
        for what in ["delivered", "failed", "dead"] {
            metrics::counter!("monohook_worker_notifications_total", "endpoint" => endpoint.name.clone(), "outcome" => what)
                .increment(0);
        }
    }
    // Woken at once by each batch that wrote notifications; polling is the fallback (a listener
    // that cannot connect, a wake-up lost while it reconnects, a retry that comes due).
    let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
        Ok(mut listener) => match listener.listen(notifications::WAKE_CHANNEL).await {
            Ok(()) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for new notifications; polling for them");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot listen for new notifications; polling for them");
            None
        }
    };
    tracing::info!(endpoints = settings.endpoints.len(), "notifying the app");
    while !cancel.is_cancelled() {
        if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
            backlog_at = Some(Instant::now());
            report_backlog(&pool, &settings).await;
        }
        let now = Instant::now();
        let mut sends = tokio::task::JoinSet::new();
        for (index, endpoint) in settings.endpoints.iter().enumerate() {
            let allowance = breakers.entry(endpoint.name.clone()).or_default().allowance(now);
            if allowance == 0 {
                continue;
            }
            let taken = match pool.acquire().await {
                Ok(mut conn) => {
                    notifications::take(&mut conn, &endpoint.name, allowance, lease(&settings)).await
                }
                Err(error) => Err(error),
            };
            match taken {
                // Sent together; an answer that never comes is bounded by the timeout. A process
                // stopped meanwhile leaves its leases to expire: the rows go out again, same id.
                Ok(taken) => {
                    for taken in taken {
                        let (client, settings) = (client.clone(), settings.clone());
                        sends.spawn(async move {
                            let answer = send(&client, &settings.endpoints[index], &taken).await;
                            (index, taken, answer)
                        });
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot look for notifications to send; trying again"),
            }
        }
        if sends.is_empty() {
            tokio::select! {
                () = tokio::time::sleep(settings.idle_poll) => {}
                () = woken(&mut listener) => {}
                () = cancel.cancelled() => {}
            }
            continue;
        }
        while let Some(done) = sends.join_next().await {
            let Ok((index, taken, answer)) = done else { continue };
            let endpoint = &settings.endpoints[index];
            let ok = matches!(answer, Answer::Delivered(_));
            let breaker = breakers.entry(endpoint.name.clone()).or_default();
            let open = breaker.record(ok, Instant::now(), settings.breaker_open);
            metrics::gauge!("monohook_worker_notify_breaker_open", "endpoint" => endpoint.name.clone())
                .set(if open { 1.0 } else { 0.0 });
            settle(&pool, &settings, endpoint, &taken, answer).await;
        }
    }
}

/// Resolves when a batch signals new notifications; never without a listener. A listener whose
/// connection broke reconnects by itself inside `recv`; one that fails is dropped for polling.
async fn woken(listener: &mut Option<sqlx::postgres::PgListener>) {
    let Some(active) = listener.as_mut() else { return std::future::pending().await };
    if let Err(error) = active.recv().await {
        tracing::warn!(%error, "stopped listening for new notifications; polling for them");
        *listener = None;
    }
}

fn lease(settings: &SenderSettings) -> Duration {
    settings.timeout * 2 + Duration::from_secs(10)
}

fn client(settings: &SenderSettings) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .user_agent(concat!("monohook/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(super::address::GuardedResolver::shared(settings.allow_private))
        .build()?)
}

async fn send(client: &reqwest::Client, endpoint: &Endpoint, taken: &Taken) -> Answer {
    let id = taken.notification_id.to_string();
    let timestamp = Utc::now().timestamp();
    let signature = signature_header(&endpoint.keys, &id, timestamp, &taken.body);
    let sent = client
        .post(endpoint.url.clone())
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(taken.body.clone())
        .send()
        .await;
    let mut response = match sent {
        Ok(response) => response,
        // reqwest's error names the URL and the cause, never the body or a header.
        Err(error) => return Answer::Failed(describe(&error)),
    };
    let status = response.status();
    let mut read = 0;
    while read < ANSWER_READ_MAX {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            _ => break,
        }
    }
    if status.is_success() {
        Answer::Delivered(status.as_u16())
    } else if status.is_redirection() {
        Answer::Failed(format!("answered {status} (redirects are not followed)"))
    } else {
        Answer::Failed(format!("answered {status}"))
    }
}

fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut text = format!("{kind}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

async fn settle(
    pool: &PgPool,
    settings: &SenderSettings,
    endpoint: &Endpoint,
    taken: &Taken,
    answer: Answer,
) {
    let name = endpoint.name.clone();
    let result = match &answer {
        Answer::Delivered(status) => {
            let lag = (Utc::now() - taken.created_at).to_std().unwrap_or_default();
            metrics::histogram!("monohook_worker_notify_lag_seconds", "endpoint" => name.clone())
                .record(lag.as_secs_f64());
            metrics::counter!("monohook_worker_notifications_total", "endpoint" => name.clone(), "outcome" => "delivered")
                .increment(1);
            tracing::debug!(endpoint = %name, notification = %taken.notification_id, status, "notification delivered");
            match pool.acquire().await {
                Ok(mut conn) => notifications::delivered(&mut conn, taken).await,
                Err(error) => Err(error),
            }
        }
        Answer::Failed(error) => {
            let tries = settings.schedule.len() + 1;
            let spent = usize::try_from(taken.attempts).unwrap_or(usize::MAX);
            metrics::counter!("monohook_worker_notifications_total", "endpoint" => name.clone(), "outcome" => "failed")
                .increment(1);
            match pool.acquire().await {
                Ok(mut conn) if spent >= tries => {
                    metrics::counter!("monohook_worker_notifications_total", "endpoint" => name.clone(), "outcome" => "dead")
                        .increment(1);
                    // A dead letter like a webhook's: the same alert sees it.
                    metrics::counter!("monohook_worker_dead_letters_total", "class" => "exhausted")
                        .increment(1);
                    tracing::error!(endpoint = %name, notification = %taken.notification_id, attempts = taken.attempts,
                        %error, "a notification was not delivered in any try; it is a dead letter now");
                    notifications::bury(&mut conn, taken, error).await.map(drop)
                }
                Ok(mut conn) => {
                    let wait =
                        jittered(settings.schedule[spent.saturating_sub(1).min(settings.schedule.len() - 1)]);
                    tracing::warn!(endpoint = %name, notification = %taken.notification_id, attempts = taken.attempts,
                        retry_in = ?wait, %error, "a notification was not delivered; trying again later");
                    notifications::failed(&mut conn, taken, wait, error).await
                }
                Err(error) => Err(error),
            }
        }
    };
    if let Err(error) = result {
        // The lease runs out and the delivery is taken again: at least once, never lost.
        tracing::warn!(%error, endpoint = %name, "cannot record a notification's try; it will be sent again");
    }
}

/// ±20 %, so that the retries of many notifications that failed together spread out.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(rand::rng().random_range(0.8..=1.2))
}

async fn report_backlog(pool: &PgPool, settings: &SenderSettings) {
    let Ok(mut conn) = pool.acquire().await else { return };
    let Ok(rows) = notifications::backlog(&mut conn).await else { return };
    for endpoint in &settings.endpoints {
        let (waiting, oldest) = rows
            .iter()
            .find(|(name, ..)| *name == endpoint.name)
            .map(|(_, n, age)| (*n, *age))
            .unwrap_or((0, 0.0));
        metrics::gauge!("monohook_worker_notify_waiting", "endpoint" => endpoint.name.clone())
            .set(waiting as f64);
        metrics::gauge!("monohook_worker_notify_oldest_seconds", "endpoint" => endpoint.name.clone())
            .set(oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BREAKER_FIRST_OPEN: Duration = Duration::from_secs(30);

    #[test]
    fn five_failures_in_a_row_open_the_breaker_then_one_probe_decides() {
        let start = Instant::now();
        let mut breaker = Breaker::default();
        for _ in 0..4 {
            assert!(!breaker.record(false, start, BREAKER_FIRST_OPEN));
        }
        assert_eq!(breaker.allowance(start), IN_FLIGHT_PER_ENDPOINT);
        assert!(breaker.record(false, start, BREAKER_FIRST_OPEN));
        assert_eq!(breaker.allowance(start), 0);
        let later = start + BREAKER_FIRST_OPEN;
        assert_eq!(breaker.allowance(later), 1, "one probe");
        assert!(breaker.record(false, later, BREAKER_FIRST_OPEN), "a failed probe opens it again");
        assert_eq!(breaker.open_for, BREAKER_FIRST_OPEN * 2);
        assert!(!breaker.record(true, later + BREAKER_FIRST_OPEN * 2, BREAKER_FIRST_OPEN));
        assert_eq!(breaker.allowance(later), IN_FLIGHT_PER_ENDPOINT);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..1000 {
            let wait = jittered(Duration::from_secs(100));
            assert!(wait >= Duration::from_secs(80) && wait <= Duration::from_secs(120));
        }
    }
}
