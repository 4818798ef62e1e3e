//! Getting a re-auth token for one delivery: the circuit breaker and the in-process retries around
//! the Mono client.
//!
//! Each call first asks the breaker. While it is open the delivery is parked (moved to the first
//! retry tier without spending an attempt) instead of calling a Mono that is down. Otherwise
//! transient failures are retried with backoff and jitter (honouring `Retry-After`) within the
//! budget; when it runs out the delivery moves to the next retry tier, spending an attempt.

use std::time::Instant;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::circuit::{BreakerState, CircuitBreaker};
use crate::mono::{MonoClient, MonoError, ReauthToken};
use shared::event::AccountId;
use shared::retry::RetryPolicy;

/// How the attempt to get a token ended.
#[derive(Debug)]
pub enum TokenOutcome {
    Token(ReauthToken),
    /// Mono is down for everyone (the breaker is open): wait in the retry tier, attempt not spent.
    Park {
        reason: String,
    },
    /// This delivery's retry budget ran out: next retry tier, attempt spent.
    Retry {
        reason: String,
    },
    /// Mono refused the account for good.
    Refused {
        reason: String,
    },
    /// Stopped waiting (shutdown or lost session).
    Abandoned,
}

pub struct TokenFetcher {
    mono: MonoClient,
    breaker: CircuitBreaker,
    policy: RetryPolicy,
    /// Bounds the calls in flight to Mono, whatever the prefetch.
    in_flight: Semaphore,
}

impl TokenFetcher {
    pub fn new(mono: MonoClient, breaker: CircuitBreaker, policy: RetryPolicy, max_in_flight: usize) -> Self {
        Self { mono, breaker, policy, in_flight: Semaphore::new(max_in_flight.max(1)) }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    pub async fn fetch(&self, account: &AccountId, abandon: &CancellationToken) -> TokenOutcome {
        let mut schedule = self.policy.schedule();
        let mut calls = 0;
        loop {
            let Some(permit) = self.breaker.try_acquire() else {
                return TokenOutcome::Park { reason: "Mono circuit is open".to_owned() };
            };
            calls += 1;
            let started = Instant::now();
            let answer = {
                let _slot = tokio::select! {
                    slot = self.in_flight.acquire() => slot.expect("the semaphore is never closed"),
                    () = abandon.cancelled() => {
                        self.breaker.release(permit);
                        return TokenOutcome::Abandoned;
                    }
                };
                self.mono.reauthorise(account).await
            };
            let class = answer.as_ref().map_or_else(MonoError::status_class, |_| "2xx");
            metrics::histogram!("monohook_worker_mono_request_seconds", "status_class" => class)
                .record(started.elapsed().as_secs_f64());
            let (error, retry_after) = match answer {
                Ok(token) => {
                    self.breaker.record(permit, true);
                    return TokenOutcome::Token(token);
                }
                Err(error @ MonoError::Rejected { .. }) => {
                    // Mono answered: it is up, whatever it thinks of this account.
                    self.breaker.record(permit, true);
                    return TokenOutcome::Refused { reason: error.to_string() };
                }
                Err(error @ MonoError::Unavailable { retry_after: Some(wait), class: "429", .. }) => {
                    self.breaker.record_throttled(permit, wait);
                    (error, Some(wait))
                }
                Err(error @ MonoError::Unavailable { retry_after, .. }) => {
                    self.breaker.record(permit, false);
                    (error, retry_after)
                }
            };
            let delay = match retry_after {
                Some(delay) if schedule.fits(delay) => Some(delay),
                Some(_) => None,
                None => schedule.next_delay(),
            };
            let Some(delay) = delay else {
                return match self.breaker.state() {
                    BreakerState::Open => {
                        TokenOutcome::Park { reason: format!("{error}; Mono circuit is open") }
                    }
                    _ => TokenOutcome::Retry { reason: format!("{error} (after {calls} calls)") },
                };
            };
            tracing::warn!(%error, retry_in = ?delay, "Mono call failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = abandon.cancelled() => return TokenOutcome::Abandoned,
            }
        }
    }
}
