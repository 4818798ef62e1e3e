//! Getting a re-auth token for one delivery: the circuit breaker, the in-process retries and the
//! single flight around the Mono client.
//!
//! Each call first asks the breaker. While it is open the delivery is parked (moved to the first
//! retry tier without spending an attempt) instead of calling a Mono that is down, or that refuses
//! our key. Otherwise transient failures are retried with backoff and jitter (honouring
//! `Retry-After`) within the budget; when it runs out the delivery moves to the next retry tier,
//! spending an attempt, unless the breaker has opened meanwhile (then it is an outage: parked).
//!
//! Single flight: concurrent deliveries for one account (Mono retrying a webhook) share one call.
//! The first one's outcome stays on offer until that delivery is settled, so a copy that needs a token
//! in the meantime gets the same one instead of calling Mono again; the worker ends the offer sooner
//! when it applies a re-authorisation of the account, which spends the token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::MetricNames;
use crate::circuit::{BreakerState, CallResult, CircuitBreaker};
use crate::client::{MonoClient, MonoError, ReauthToken};
use crate::links::{LinkAnswer, LinkRequest};
use shared::event::AccountId;
use shared::retry::RetryPolicy;

/// How often a refused key is logged again while it stays refused.
const KEY_REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// How the attempt to get a token ended.
#[derive(Clone, Debug)]
pub enum TokenOutcome {
    Token(ReauthToken),
    /// Mono is down for everyone, or refuses our key (the breaker is open): wait in the retry tier,
    /// attempt not spent.
    Park {
        reason: String,
    },
    /// This delivery's retry budget ran out: next retry tier, attempt spent.
    Retry {
        reason: String,
    },
    /// Mono refused the account for good: `reason` for logs and journals, `message` as Mono put it.
    Refused {
        reason: String,
        message: String,
    },
    /// Stopped waiting (shutdown or lost session).
    Abandoned,
}

/// How one call through the breaker and the retries ended, whatever it asked Mono for: the
/// variants mean what [`TokenOutcome`]'s do.
#[derive(Clone, Debug)]
pub enum Called<T> {
    Answer(T),
    Park { reason: String },
    Retry { reason: String },
    Refused { reason: String, message: String },
    Abandoned,
}

type Flights = Arc<Mutex<HashMap<String, (u64, watch::Receiver<Option<TokenOutcome>>)>>>;

/// Keeps a fetch's outcome on offer for its account while held; dropping it withdraws the offer.
pub struct Flight {
    flights: Flights,
    account: String,
    id: u64,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut flights = lock(&self.flights);
        if flights.get(&self.account).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.account);
        }
    }
}

pub struct TokenFetcher {
    mono: MonoClient,
    breaker: CircuitBreaker,
    policy: RetryPolicy,
    /// Bounds the calls in flight to Mono, whatever the prefetch.
    in_flight: Semaphore,
    flights: Flights,
    next_flight: std::sync::atomic::AtomicU64,
    names: MetricNames,
}

impl TokenFetcher {
    pub fn new(
        mono: MonoClient,
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        max_in_flight: usize,
        names: MetricNames,
    ) -> Self {
        Self {
            names,
            mono,
            breaker,
            policy,
            in_flight: Semaphore::new(max_in_flight.max(1)),
            flights: Flights::default(),
            next_flight: Default::default(),
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Whether Mono refused our secret key on the last call it answered.
    pub fn key_refused(&self) -> bool {
        self.breaker.key_refused()
    }

    /// The status Mono refuses every account with, while it does (taken as ours).
    pub fn refusing_alike(&self) -> Option<u16> {
        self.breaker.refusing_alike()
    }

    /// How long until the breaker lets a call through again (`None` while it is closed).
    pub fn retry_in(&self) -> Option<Duration> {
        self.breaker.retry_in()
    }

    /// Ends the offer of the fetch for `account` if its token was issued before `spent_at`: the
    /// account was re-authorised then, so that token may be spent and a later need for one must call
    /// Mono. A token issued since, or a call still under way, stays on offer (a batch refuses a token
    /// older than the account's last re-authorisation anyway). The delivery that made the call keeps
    /// its outcome, and copies already waiting on the call still get it.
    pub fn withdraw_offer(&self, account: &AccountId, spent_at: chrono::DateTime<chrono::Utc>) {
        let mut flights = lock(&self.flights);
        let spent = flights.get(account.as_str()).is_some_and(|(_, offer)| {
            matches!(&*offer.borrow(), Some(TokenOutcome::Token(token)) if token.issued_at < spent_at)
        });
        if spent {
            flights.remove(account.as_str());
        }
    }

    /// A token for `account`, shared with any fetch for it still on offer. The [`Flight`] (for the
    /// delivery that made the call) keeps the outcome on offer until it is dropped.
    pub async fn fetch(
        &self,
        account: &AccountId,
        abandon: &CancellationToken,
    ) -> (TokenOutcome, Option<Flight>) {
        self.fetch_if_needed(account, abandon, || std::future::ready(true))
            .await
            .expect("a token that is always needed is always fetched")
    }

    /// As [`Self::fetch`], but a delivery that would call Mono first asks `needed`, with its flight
    /// already on offer, and calls only if it answers `true`; `None` (nothing fetched, no flight) if
    /// not. Asked before the flight, a copy could see its re-auth not yet settled, then find the
    /// settled delivery's offer withdrawn, and ask Mono for a token nobody stores; asked with the
    /// flight on offer, either the offer is still there (shared, no call) or the settle it waited
    /// for is visible to `needed`.
    pub async fn fetch_if_needed<F, Fut>(
        &self,
        account: &AccountId,
        abandon: &CancellationToken,
        needed: F,
    ) -> Option<(TokenOutcome, Option<Flight>)>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.fetch_issued_after_if_needed(account, abandon, None, needed).await
    }

    /// As [`Self::fetch_if_needed`], but an offer of a token Mono issued at or before `issued_after`
    /// is not taken: it is withdrawn (the caller found it spent or expired), and the call is made
    /// anew.
    pub async fn fetch_issued_after_if_needed<F, Fut>(
        &self,
        account: &AccountId,
        abandon: &CancellationToken,
        issued_after: Option<chrono::DateTime<chrono::Utc>>,
        needed: F,
    ) -> Option<(TokenOutcome, Option<Flight>)>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let too_old = |outcome: &Option<TokenOutcome>| match (outcome, issued_after) {
            (Some(TokenOutcome::Token(token)), Some(after)) => token.issued_at <= after,
            _ => false,
        };
        let mut needed = Some(needed);
        loop {
            let joined = {
                let mut flights = lock(&self.flights);
                match flights.get(account.as_str()) {
                    Some((_, offer)) if too_old(&offer.borrow()) => {
                        flights.remove(account.as_str());
                        continue;
                    }
                    Some((_, offer)) => Err(offer.clone()),
                    None => {
                        let id = self.next_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (sender, offer) = watch::channel(None);
                        flights.insert(account.as_str().to_owned(), (id, offer));
                        let flight = Flight {
                            flights: self.flights.clone(),
                            account: account.as_str().to_owned(),
                            id,
                        };
                        Ok((sender, flight))
                    }
                }
            };
            match joined {
                Ok((sender, flight)) => {
                    if let Some(needed) = needed.take()
                        && !needed().await
                    {
                        // Withdrawn: copies that joined meanwhile try again, each asking itself.
                        drop((sender, flight));
                        return None;
                    }
                    let outcome = self.fetch_alone(account, abandon).await;
                    sender.send_replace(Some(outcome.clone()));
                    if matches!(outcome, TokenOutcome::Abandoned) {
                        return Some((outcome, None));
                    }
                    return Some((outcome, Some(flight)));
                }
                Err(mut offer) => {
                    let shared = tokio::select! {
                        shared = offer.wait_for(Option::is_some) => shared.ok().and_then(|s| s.clone()),
                        () = abandon.cancelled() => return Some((TokenOutcome::Abandoned, None)),
                    };
                    match shared {
                        // The caller gave up (its session went): try again, maybe as the caller.
                        None | Some(TokenOutcome::Abandoned) => {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Some(outcome) if too_old(&Some(outcome.clone())) => {
                            // Settled while this one waited, with a token it cannot use.
                            let mut flights = lock(&self.flights);
                            if flights
                                .get(account.as_str())
                                .is_some_and(|(_, current)| current.same_channel(&offer))
                            {
                                flights.remove(account.as_str());
                            }
                            continue;
                        }
                        Some(outcome) => {
                            metrics::counter!(self.names.calls_shared).increment(1);
                            return Some((outcome, None));
                        }
                    }
                }
            }
        }
    }

    async fn fetch_alone(&self, account: &AccountId, abandon: &CancellationToken) -> TokenOutcome {
        match self.call_with_retries(account, abandon, || self.mono.reauthorise(account)).await {
            Called::Answer(token) => TokenOutcome::Token(token),
            Called::Park { reason } => TokenOutcome::Park { reason },
            Called::Retry { reason } => TokenOutcome::Retry { reason },
            Called::Refused { reason, message } => TokenOutcome::Refused { reason, message },
            Called::Abandoned => TokenOutcome::Abandoned,
        }
    }

    /// Asks Mono for a hosted re-auth link (v2 `initiate`) through the same breaker, slots and
    /// retries as a token. No single flight here: the api shares one call per account and redirect
    /// itself. Retries send the same `meta.ref`.
    pub async fn initiate_link(
        &self,
        request: &LinkRequest,
        abandon: &CancellationToken,
    ) -> Called<LinkAnswer> {
        self.call_with_retries(&request.account, abandon, || self.mono.initiate_reauth(request)).await
    }

    /// One call to Mono for `account` (`call`), through the breaker and a slot, retried while Mono
    /// fails within the budget.
    async fn call_with_retries<T, F, Fut>(
        &self,
        account: &AccountId,
        abandon: &CancellationToken,
        mut call: F,
    ) -> Called<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, MonoError>>,
    {
        let mut schedule = self.policy.schedule();
        let mut calls = 0;
        loop {
            let Some(permit) = self.breaker.try_acquire(account) else {
                return Called::Park { reason: self.park_reason(None) };
            };
            calls += 1;
            let started = Instant::now();
            let answer = {
                let _slot = tokio::select! {
                    slot = self.in_flight.acquire() => slot.expect("the semaphore is never closed"),
                    () = abandon.cancelled() => {
                        self.breaker.release(permit);
                        return Called::Abandoned;
                    }
                };
                call().await
            };
            let class = answer.as_ref().map_or_else(MonoError::status_class, |_| "2xx");
            metrics::histogram!(self.names.request_seconds, "status_class" => class)
                .record(started.elapsed().as_secs_f64());
            let (error, retry_after) = match answer {
                Ok(answer) => {
                    self.breaker.record(permit, CallResult::Answered);
                    return Called::Answer(answer);
                }
                Err(MonoError::Rejected { status, message }) => {
                    // Mono answered: it is up, whatever it thinks of this account, unless it
                    // answers every account alike.
                    self.breaker.record(permit, CallResult::Refused(status));
                    let error = MonoError::Rejected { status, message: message.clone() };
                    if self.breaker.refusing_alike() == Some(status) {
                        return Called::Park { reason: self.park_reason(Some(&error)) };
                    }
                    return Called::Refused { reason: error.to_string(), message };
                }
                Err(error @ MonoError::KeyRefused { .. }) => {
                    // No retry can help until an operator fixes the key: park at once.
                    self.breaker.record(permit, CallResult::KeyRefused);
                    return Called::Park { reason: self.park_reason(Some(&error)) };
                }
                Err(error @ MonoError::Unavailable { retry_after: Some(wait), class: "429", .. }) => {
                    self.breaker.record(permit, CallResult::Throttled(wait));
                    (error, Some(wait))
                }
                Err(error @ MonoError::Unavailable { retry_after, .. }) => {
                    self.breaker.record(permit, CallResult::Failed);
                    (error, retry_after)
                }
            };
            let delay = match retry_after {
                Some(delay) if schedule.fits(delay) => Some(delay),
                Some(_) => None,
                None => schedule.next_delay(),
            };
            let Some(delay) = delay else {
                // An open or probing breaker means an outage, not this delivery's failure.
                return match self.breaker.state() {
                    BreakerState::Closed => {
                        Called::Retry { reason: format!("{error} (after {calls} calls)") }
                    }
                    _ => Called::Park { reason: self.park_reason(Some(&error)) },
                };
            };
            tracing::warn!(%error, retry_in = ?delay, "Mono call failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = abandon.cancelled() => return Called::Abandoned,
            }
        }
    }

    fn park_reason(&self, error: Option<&MonoError>) -> String {
        let alike;
        let cause = if self.breaker.key_refused() {
            "Mono refuses our secret key (MONO_SECRET_KEY)"
        } else if let Some(status) = self.breaker.refusing_alike() {
            alike = format!(
                "Mono refuses every account alike ({status}): taken as ours, not the account's (is MONO_API_URL right?)"
            );
            &alike
        } else {
            "Mono circuit is open"
        };
        match error {
            Some(error) => format!("{error}; {cause}"),
            None => cause.to_owned(),
        }
    }
}

/// Logs once a minute while Mono refuses our key, so the outage cannot scroll out of sight.
pub async fn report_key_refused(tokens: Arc<TokenFetcher>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(KEY_REFUSED_LOG_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        if tokens.key_refused() {
            tracing::error!(
                "Mono still refuses our secret key (MONO_SECRET_KEY): re-auth deliveries stay parked until it is fixed"
            );
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit::BreakerSettings;
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    /// A fetcher whose breaker opens on one failure for `open_for`, and which never retries.
    fn fetcher(mono: &MockServer, open_for: Duration) -> TokenFetcher {
        let client = MonoClient::new(
            &mono.uri(),
            "test_sk".to_owned().into(),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .unwrap();
        let breaker = CircuitBreaker::new(
            BreakerSettings {
                window: Duration::from_secs(10),
                min_calls: 100,
                failure_ratio: 1.0,
                consecutive_failures: 1,
                open_for,
                max_open_for: open_for * 4,
            },
            MetricNames::API,
        );
        let policy = RetryPolicy {
            initial_interval: Duration::from_millis(10),
            max_interval: Duration::from_millis(10),
            multiplier: 1.0,
            max_elapsed: Some(Duration::ZERO),
        };
        TokenFetcher::new(client, breaker, policy, 4, MetricNames::API)
    }

    fn token(value: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": value }))
    }

    #[tokio::test]
    async fn a_probe_whose_caller_went_away_does_not_leave_the_breaker_half_open() {
        let mono = MockServer::start().await;
        // Mounted in order: the failure that opens the breaker, the probe nobody waits for, the probe
        // after it.
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .up_to_n_times(1)
            .mount(&mono)
            .await;
        Mock::given(method("POST"))
            .respond_with(token("never-read").set_delay(Duration::from_secs(30)))
            .up_to_n_times(1)
            .mount(&mono)
            .await;
        Mock::given(method("POST")).respond_with(token("fresh")).expect(1).mount(&mono).await;
        let fetcher = fetcher(&mono, Duration::from_millis(20));
        let account = AccountId::parse("acct-1").unwrap();
        let never = CancellationToken::new();

        let (opened, _) = fetcher.fetch(&account, &never).await;
        assert!(matches!(opened, TokenOutcome::Park { .. }), "{opened:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
        // The probe's caller goes away while Mono is still answering: its future is dropped.
        let mut probe = Box::pin(fetcher.fetch(&account, &never));
        tokio::select! {
            _ = &mut probe => panic!("the probe's Mono answers in 30 s"),
            () = wait_for_requests(&mono, 2) => {}
        }
        drop(probe);
        assert_eq!(fetcher.breaker_state(), BreakerState::HalfOpen);

        let (next, _) = fetcher.fetch(&account, &never).await;

        assert!(matches!(&next, TokenOutcome::Token(t) if t.expose() == "fresh"), "{next:?}");
        assert_eq!(fetcher.breaker_state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_delivery_asks_whether_it_still_needs_a_token_with_its_flight_on_offer() {
        let mono = MockServer::start().await;
        Mock::given(method("POST")).respond_with(token("t1")).expect(1).mount(&mono).await;
        let fetcher = fetcher(&mono, Duration::from_secs(5));
        let account = AccountId::parse("acct-1").unwrap();
        let never = CancellationToken::new();
        let (asked, answer) = tokio::sync::oneshot::channel::<()>();
        let (go, wait) = tokio::sync::oneshot::channel::<bool>();

        let first = fetcher.fetch_if_needed(&account, &never, || async move {
            let _ = asked.send(());
            wait.await.unwrap()
        });
        let copy = async {
            answer.await.unwrap();
            // While the first decides, its flight is on offer: a copy joins it instead of leading.
            let joined = fetcher.fetch_if_needed(&account, &never, || async {
                panic!("a copy led while another delivery's flight was on offer")
            });
            let (joined, ()) = tokio::join!(joined, async { go.send(true).unwrap() });
            joined
        };
        let (first, copy) = tokio::join!(first, copy);

        let (first, flight) = first.expect("still needed: fetched");
        assert!(matches!(&first, TokenOutcome::Token(t) if t.expose() == "t1"), "{first:?}");
        assert!(flight.is_some());
        let (copy, _) = copy.expect("shared");
        assert!(matches!(&copy, TokenOutcome::Token(t) if t.expose() == "t1"), "{copy:?}");
    }

    #[tokio::test]
    async fn a_delivery_no_longer_needing_a_token_asks_mono_nothing_and_its_waiting_copy_asks_itself() {
        let mono = MockServer::start().await;
        Mock::given(method("POST")).respond_with(token("t2")).expect(1).mount(&mono).await;
        let fetcher = fetcher(&mono, Duration::from_secs(5));
        let account = AccountId::parse("acct-1").unwrap();
        let never = CancellationToken::new();
        let (asked, answer) = tokio::sync::oneshot::channel::<()>();
        let (go, wait) = tokio::sync::oneshot::channel::<bool>();

        let first = fetcher.fetch_if_needed(&account, &never, || async move {
            let _ = asked.send(());
            wait.await.unwrap()
        });
        let copy = async {
            answer.await.unwrap();
            let joined = fetcher.fetch_if_needed(&account, &never, || async { true });
            let (joined, ()) = tokio::join!(joined, async {
                tokio::task::yield_now().await;
                go.send(false).unwrap()
            });
            joined
        };
        let (first, copy) = tokio::join!(first, copy);

        assert!(first.is_none(), "not needed: nothing fetched");
        let (copy, _) = copy.expect("the copy still needs one");
        assert!(matches!(&copy, TokenOutcome::Token(t) if t.expose() == "t2"), "{copy:?}");
    }

    #[tokio::test]
    async fn an_offer_of_a_token_the_caller_could_not_use_is_withdrawn_and_called_anew() {
        let mono = MockServer::start().await;
        Mock::given(method("POST")).respond_with(token("spent")).up_to_n_times(1).mount(&mono).await;
        Mock::given(method("POST")).respond_with(token("fresh")).expect(1).mount(&mono).await;
        let fetcher = fetcher(&mono, Duration::from_secs(5));
        let account = AccountId::parse("acct-1").unwrap();
        let never = CancellationToken::new();

        // An older delivery's call stays on offer while that delivery is held.
        let (first, flight) = fetcher.fetch(&account, &never).await;
        let TokenOutcome::Token(spent) = first else { panic!("{first:?}") };
        assert!(flight.is_some());
        // A delivery whose batch refused that token (issued before the account's re-authorisation)
        // must not be offered it again, nor any older one.
        let again = fetcher
            .fetch_issued_after_if_needed(&account, &never, Some(spent.issued_at), || async { true })
            .await;

        let (again, own) = again.expect("still needed: fetched");
        assert!(matches!(&again, TokenOutcome::Token(t) if t.expose() == "fresh"), "{again:?}");
        assert!(own.is_some(), "its own call, on offer now");
        // A copy joins the fresh offer, not the spent one.
        let (copy, _) = fetcher.fetch(&account, &never).await;
        assert!(matches!(&copy, TokenOutcome::Token(t) if t.expose() == "fresh"), "{copy:?}");
        drop(flight);
    }

    async fn wait_for_requests(mono: &MockServer, count: usize) {
        while mono.received_requests().await.unwrap_or_default().len() < count {
            tokio::task::yield_now().await;
        }
    }
}
