//! Exponential backoff with jitter. The only module that knows the `backoff` crate: it supplies the
//! delay schedule, this module supplies the loop (so a server's `Retry-After` and a total time budget
//! are honoured together, and a cancellation stops a wait at once). Replacing the crate means
//! changing this file alone.

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How to space attempts and when to stop.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    pub initial_interval: Duration,
    /// Where the doubling stops. Each delay is then jittered by ±50 %, so a single delay can reach
    /// 1.5 × this.
    pub max_interval: Duration,
    /// Growth factor of the delay after each failure.
    pub multiplier: f64,
    /// Total time after which no further attempt starts; `None` retries until cancelled.
    pub max_elapsed: Option<Duration>,
}

impl RetryPolicy {
    /// Retries until cancelled, backing off to `max_interval` (±50 %): for reconnecting to a service.
    pub fn forever(initial_interval: Duration, max_interval: Duration) -> Self {
        Self { initial_interval, max_interval, multiplier: 2.0, max_elapsed: None }
    }

    /// The delay schedule of one retry sequence.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            inner: ExponentialBackoff {
                current_interval: self.initial_interval,
                initial_interval: self.initial_interval,
                // ±50 % jitter so that many workers retrying the same outage do not move in lockstep.
                randomization_factor: 0.5,
                multiplier: self.multiplier,
                max_interval: self.max_interval,
                max_elapsed_time: self.max_elapsed,
                ..ExponentialBackoff::default()
            },
            started: Instant::now(),
            max_elapsed: self.max_elapsed,
        }
    }
}

/// A running delay schedule.
pub struct Schedule {
    inner: ExponentialBackoff,
    started: Instant,
    max_elapsed: Option<Duration>,
}

impl Schedule {
    /// The next delay, or `None` when waiting it would overrun the time budget.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.inner.next_backoff().filter(|delay| self.fits(*delay))
    }

    /// Whether waiting `delay` would still end inside the time budget.
    pub fn fits(&self, delay: Duration) -> bool {
        self.max_elapsed.is_none_or(|budget| self.started.elapsed() + delay <= budget)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.inner.reset();
        self.started = Instant::now();
    }
}

/// What one attempt reports when it fails.
#[derive(Debug)]
pub enum Failure<E> {
    /// Worth another attempt, after `retry_after` if the other side said so.
    Transient { error: E, retry_after: Option<Duration> },
    /// No attempt can succeed.
    Permanent(E),
}

/// Why a retry sequence ended without success.
#[derive(Debug, PartialEq, Eq)]
pub enum RetryError<E> {
    /// An attempt failed permanently.
    Permanent(E),
    /// Every attempt failed transiently until the time budget ran out (or the next wait would
    /// overrun it); carries the last error.
    Exhausted { last: E, attempts: u32 },
    /// Cancelled while waiting between attempts; carries the last error.
    Cancelled(E),
}

/// Runs `attempt` until it succeeds, fails permanently, runs out of time or is cancelled.
/// `on_retry` hears each transient failure with the delay before the next attempt.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    mut attempt: F,
    mut on_retry: impl FnMut(&E, Duration),
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure<E>>>,
{
    let mut schedule = policy.schedule();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (error, retry_after) = match attempt().await {
            Ok(value) => return Ok(value),
            Err(Failure::Permanent(error)) => return Err(RetryError::Permanent(error)),
            Err(Failure::Transient { error, retry_after }) => (error, retry_after),
        };
        let delay = match retry_after {
            Some(delay) if schedule.fits(delay) => Some(delay),
            Some(_) => None,
            None => schedule.next_delay(),
        };
        let Some(delay) = delay else {
            return Err(RetryError::Exhausted { last: error, attempts });
        };
        on_retry(&error, delay);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Err(RetryError::Cancelled(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(max_elapsed: Option<Duration>) -> RetryPolicy {
        RetryPolicy {
            initial_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(4),
            multiplier: 2.0,
            max_elapsed,
        }
    }

    #[test]
    fn jitter_takes_a_delay_from_half_the_first_to_half_past_the_cap() {
        // The worker's move backoff: "1 s doubling to 30 s, each ±50 %, so 0.5 s to 45 s apart".
        let mut schedule = RetryPolicy::forever(Duration::from_secs(1), Duration::from_secs(30)).schedule();

        let delays: Vec<Duration> = (0..200).map(|_| schedule.next_delay().unwrap()).collect();

        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_millis(1500));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(45)), "{delays:?}");
        assert!(delays.iter().any(|d| *d > Duration::from_secs(30)), "jitter goes past the cap: {delays:?}");
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let result = retry(
            &quick(Some(Duration::from_secs(5))),
            &CancellationToken::new(),
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0..=2 => Err(Failure::Transient { error: "boom", retry_after: None }),
                    _ => Ok("done"),
                }
            },
            |_, _| {},
        )
        .await;
        assert_eq!(result, Ok("done"));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_permanent_failure_stops_at_once() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            &quick(None),
            &CancellationToken::new(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Failure::Permanent("no"))
            },
            |_, _| {},
        )
        .await;
        assert_eq!(result, Err(RetryError::Permanent("no")));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retry_after_is_honoured_and_a_wait_past_the_budget_gives_up() {
        let mut delays = Vec::new();
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            &quick(Some(Duration::from_millis(500))),
            &CancellationToken::new(),
            || async {
                let retry_after = match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Duration::from_millis(20),
                    _ => Duration::from_secs(60),
                };
                Err(Failure::Transient { error: "busy", retry_after: Some(retry_after) })
            },
            |_, delay| delays.push(delay),
        )
        .await;
        assert_eq!(delays, vec![Duration::from_millis(20)]);
        assert_eq!(result, Err(RetryError::Exhausted { last: "busy", attempts: 2 }));
    }

    #[tokio::test]
    async fn cancellation_interrupts_the_wait() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let result: Result<(), _> = retry(
            &RetryPolicy::forever(Duration::from_secs(60), Duration::from_secs(60)),
            &cancel,
            || async { Err(Failure::Transient { error: "down", retry_after: None }) },
            |_, _| {},
        )
        .await;
        assert_eq!(result, Err(RetryError::Cancelled("down")));
    }

    #[tokio::test]
    async fn no_wait_starts_that_would_end_past_the_budget() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            &RetryPolicy { max_elapsed: Some(Duration::ZERO), ..quick(None) },
            &CancellationToken::new(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Failure::Transient { error: "down", retry_after: None })
            },
            |_, _| {},
        )
        .await;
        assert_eq!(result, Err(RetryError::Exhausted { last: "down", attempts: 1 }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn delays_grow_and_stay_bounded() {
        let policy = RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(1));
        let mut schedule = policy.schedule();
        let delays: Vec<_> = (0..10).map(|_| schedule.next_delay().unwrap()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1500)), "{delays:?}");
        assert!(delays[9] > delays[0], "{delays:?}");
    }
}
