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
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
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

    /// Records how a try ended; whether the breaker is open now. Tries that were out when it
    /// opened end while it is open: they change nothing. A failure after its time is the probe's:
    /// it opens again for twice as long.
    fn record(&mut self, ok: bool, now: Instant, first_open: Duration) -> bool {
        if ok {
            *self = Self::default();
            return false;
        }
        match self.open_until {
            Some(until) if now < until => {}
            Some(_) => {
                self.open_for = (self.open_for * 2).min(BREAKER_LONGEST_OPEN);
                self.open_until = Some(now + self.open_for);
            }
            None => {
                self.failures += 1;
                if self.failures >= BREAKER_FAILURES {
                    self.open_for = first_open;
                    self.open_until = Some(now + first_open);
                }
            }
        }
        self.open_until.is_some()
    }
}

/// How one try went.
enum Answer {
    Delivered(u16),
    Failed(String),
}

/// Runs until `cancel`: one task per endpoint (a slow or dead endpoint holds up only its own), each
/// taking its due deliveries, sending them and recording each outcome as it comes.
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
    for endpoint in &settings.endpoints {
        metrics::gauge!("monohook_worker_notify_breaker_open", "endpoint" => endpoint.name.clone()).set(0.0);
        for what in ["delivered", "failed", "dead"] {
            metrics::counter!("monohook_worker_notifications_total", "endpoint" => endpoint.name.clone(), "outcome" => what)
                .increment(0);
        }
    }
    let wake = Arc::new(Notify::new());
    let listening = tokio::spawn(listen_for_new(pool.clone(), wake.clone(), cancel.clone()));
    let backlog = tokio::spawn(report_backlog(pool.clone(), settings.clone(), cancel.clone()));
    tracing::info!(endpoints = settings.endpoints.len(), "notifying the app");
    let mut endpoints = tokio::task::JoinSet::new();
    for index in 0..settings.endpoints.len() {
        let (pool, client, settings, wake, cancel) =
            (pool.clone(), client.clone(), settings.clone(), wake.clone(), cancel.clone());
        endpoints.spawn(serve_endpoint(pool, client, settings, index, wake, cancel));
    }
    while endpoints.join_next().await.is_some() {}
    let _ = listening.await;
    let _ = backlog.await;
}

/// One endpoint's loop: take what is due (as many as its breaker allows), send them together, record
/// each outcome in its own task (so a slow answer never lets another's lease run out), then again.
async fn serve_endpoint(
    pool: PgPool,
    client: reqwest::Client,
    settings: Arc<SenderSettings>,
    index: usize,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let endpoint = &settings.endpoints[index];
    let mut breaker = Breaker::default();
    while !cancel.is_cancelled() {
        // Registered before the look, so a commit between the look and the wait is not missed.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let allowance = breaker.allowance(Instant::now());
        let taken = if allowance == 0 {
            Ok(Vec::new())
        } else {
            match pool.acquire().await {
                Ok(mut conn) => {
                    notifications::take(&mut conn, &endpoint.name, allowance, lease(&settings)).await
                }
                Err(error) => Err(error),
            }
        };
        let taken = taken.unwrap_or_else(|error| {
            tracing::warn!(%error, endpoint = %endpoint.name, "cannot look for notifications to send; trying again");
            Vec::new()
        });
        if taken.is_empty() {
            tokio::select! {
                () = tokio::time::sleep(settings.idle_poll) => {}
                () = &mut woken => {}
                () = cancel.cancelled() => {}
            }
            continue;
        }
        // Sent together; an answer that never comes is bounded by the timeout. A process stopped
        // meanwhile leaves its leases to run out: the rows go out again, with the same id.
        let mut sends = tokio::task::JoinSet::new();
        for taken in taken {
            let (pool, client, settings) = (pool.clone(), client.clone(), settings.clone());
            sends.spawn(async move {
                let endpoint = &settings.endpoints[index];
                let answer = send(&client, endpoint, &taken).await;
                let ok = matches!(answer, Answer::Delivered(_));
                settle(&pool, &settings, endpoint, &taken, answer).await;
                ok
            });
        }
        while let Some(done) = sends.join_next().await {
            let ok = done.unwrap_or(false);
            let open = breaker.record(ok, Instant::now(), settings.breaker_open);
            metrics::gauge!("monohook_worker_notify_breaker_open", "endpoint" => endpoint.name.clone())
                .set(if open { 1.0 } else { 0.0 });
        }
    }
}

/// Wakes the endpoints' loops whenever a batch commits notifications. Without a listener (it could
/// not connect, or failed for good) they poll.
async fn listen_for_new(pool: PgPool, wake: Arc<Notify>, cancel: CancellationToken) {
    let listener = async {
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
        listener.listen(notifications::WAKE_CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    let mut listener = match listener.await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for new notifications; polling for them");
            return;
        }
    };
    loop {
        tokio::select! {
            // A broken connection is re-established inside `recv`.
            received = listener.recv() => match received {
                Ok(_) => wake.notify_waiters(),
                Err(error) => {
                    tracing::warn!(%error, "stopped listening for new notifications; polling for them");
                    return;
                }
            },
            () = cancel.cancelled() => return,
        }
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
        // A proxy would resolve the endpoint itself, past the guard below.
        .no_proxy()
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
        // Without the URL (it could carry a token of the app's in its query): the cause only.
        Err(error) => return Answer::Failed(describe(&error.without_url())),
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
                    let buried = notifications::bury(&mut conn, taken, error).await;
                    if let Ok(Some(letter)) = &buried {
                        metrics::counter!("monohook_worker_notifications_total", "endpoint" => name.clone(), "outcome" => "dead")
                            .increment(1);
                        // A dead letter like a webhook's: the same alert sees it.
                        metrics::counter!("monohook_worker_dead_letters_total", "class" => "exhausted")
                            .increment(1);
                        tracing::error!(endpoint = %name, notification = %taken.notification_id, dead_letter = %letter,
                            attempts = taken.attempts, %error, "a notification was not delivered in any try; it is a dead letter now");
                    }
                    buried.map(drop)
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

/// Refreshes the backlog gauges every [`BACKLOG_EVERY`] until `cancel`.
async fn report_backlog(pool: PgPool, settings: Arc<SenderSettings>, cancel: CancellationToken) {
    loop {
        if let Ok(mut conn) = pool.acquire().await
            && let Ok(rows) = notifications::backlog(&mut conn).await
        {
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
        tokio::select! {
            () = tokio::time::sleep(BACKLOG_EVERY) => {}
            () = cancel.cancelled() => return,
        }
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
        // Tries that were out when it opened fail meanwhile: it stays open as long, no longer.
        for _ in 0..10 {
            assert!(breaker.record(false, start + Duration::from_secs(1), BREAKER_FIRST_OPEN));
        }
        assert_eq!(breaker.open_for, BREAKER_FIRST_OPEN);
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
