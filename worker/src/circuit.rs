//! A circuit breaker on the Mono client, shared by every call a worker makes.
//!
//! When Mono fails for many accounts at once (5xx, 429, timeouts, refused connections) that is an
//! outage, not a bad event: spending each delivery's attempts on it would only fill the dead-letter
//! queue. Closed, the breaker counts outcomes over a sliding window; past `failure_ratio` (with at
//! least `min_calls`) it opens, and callers are refused at once (their deliveries wait in a retry
//! tier without spending an attempt). After `open_for` it lets one probe through (half-open): success
//! closes it, failure opens it again for twice as long, up to a minute. Every change is logged and
//! exported as `monohook_worker_mono_circuit_state`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker's thresholds.
#[derive(Clone, Debug)]
pub struct BreakerSettings {
    pub window: Duration,
    pub min_calls: usize,
    pub failure_ratio: f64,
    pub open_for: Duration,
    pub max_open_for: Duration,
}

/// The state as operators see it (metric value in parentheses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow (0).
    Closed,
    /// One probe call is allowed (1).
    HalfOpen,
    /// Calls are refused (2).
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    fn metric_value(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

/// Leave to make one call; hand it back with the call's outcome.
#[derive(Debug)]
#[must_use = "report the call's outcome with CircuitBreaker::record"]
pub struct CallPermit {
    probe: bool,
}

pub struct CircuitBreaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
}

struct Inner {
    state: Phase,
    /// Outcomes of recent calls (time, succeeded), oldest first.
    calls: VecDeque<(Instant, bool)>,
    /// How long the next opening lasts.
    open_for: Duration,
}

enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings) -> Self {
        let open_for = settings.open_for;
        metrics::gauge!("monohook_worker_mono_circuit_state").set(0.0);
        Self { settings, inner: Mutex::new(Inner { state: Phase::Closed, calls: VecDeque::new(), open_for }) }
    }

    /// A permit to call Mono now, or `None` while the breaker is open (or its probe is out).
    pub fn try_acquire(&self) -> Option<CallPermit> {
        let mut inner = self.lock();
        match inner.state {
            Phase::Closed => Some(CallPermit { probe: false }),
            Phase::Open { until } if Instant::now() >= until => {
                self.change(&mut inner, Phase::HalfOpen { probing: true });
                Some(CallPermit { probe: true })
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: true } => None,
            Phase::HalfOpen { probing: false } => {
                inner.state = Phase::HalfOpen { probing: true };
                Some(CallPermit { probe: true })
            }
        }
    }

    /// Reports how a permitted call went. Only failures that mean "Mono is unavailable" count as
    /// failures; Mono refusing one account is a success for the breaker.
    pub fn record(&self, permit: CallPermit, succeeded: bool) {
        let mut inner = self.lock();
        let now = Instant::now();
        if permit.probe {
            if succeeded {
                inner.calls.clear();
                inner.open_for = self.settings.open_for;
                self.change(&mut inner, Phase::Closed);
            } else {
                let open_for = inner.open_for;
                inner.open_for = (open_for * 2).min(self.settings.max_open_for);
                self.change(&mut inner, Phase::Open { until: now + open_for });
            }
            return;
        }
        inner.calls.push_back((now, succeeded));
        while inner.calls.front().is_some_and(|(at, _)| now.duration_since(*at) > self.settings.window) {
            inner.calls.pop_front();
        }
        if !matches!(inner.state, Phase::Closed) || inner.calls.len() < self.settings.min_calls {
            return;
        }
        let failures = inner.calls.iter().filter(|(_, ok)| !ok).count();
        if failures as f64 / inner.calls.len() as f64 >= self.settings.failure_ratio {
            let open_for = inner.open_for;
            inner.open_for = (open_for * 2).min(self.settings.max_open_for);
            self.change(&mut inner, Phase::Open { until: now + open_for });
        }
    }

    /// Reports a call Mono answered with 429 and `Retry-After`: Mono asked every caller to wait, so
    /// the breaker opens until then, whatever the failure ratio.
    pub fn record_throttled(&self, permit: CallPermit, retry_after: Duration) {
        let mut inner = self.lock();
        let now = Instant::now();
        if !permit.probe {
            inner.calls.push_back((now, false));
        }
        let until = now + retry_after;
        let later = match inner.state {
            Phase::Open { until: current } => until > current,
            _ => true,
        };
        if later {
            tracing::warn!(retry_after = ?retry_after, "Mono asked to slow down (429)");
            self.change(&mut inner, Phase::Open { until });
        }
    }

    /// Returns a permit whose call was never made (e.g. the worker is stopping): a probe may be
    /// granted again.
    pub fn release(&self, permit: CallPermit) {
        let mut inner = self.lock();
        if permit.probe && matches!(inner.state, Phase::HalfOpen { probing: true }) {
            inner.state = Phase::HalfOpen { probing: false };
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.lock().state {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn change(&self, inner: &mut Inner, next: Phase) {
        inner.state = next;
        let state = match inner.state {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        metrics::gauge!("monohook_worker_mono_circuit_state").set(state.metric_value());
        match state {
            BreakerState::Open => tracing::warn!(
                circuit = state.as_str(),
                retry_in = ?inner.open_for.min(self.settings.max_open_for),
                "Mono circuit opened: Mono looks unavailable; re-auth deliveries wait in the retry tier"
            ),
            BreakerState::HalfOpen => {
                tracing::info!(circuit = state.as_str(), "Mono circuit half-open: probing")
            }
            BreakerState::Closed => {
                tracing::info!(circuit = state.as_str(), "Mono circuit closed: calls flow again")
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_for_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(BreakerSettings {
            window: Duration::from_secs(10),
            min_calls: 4,
            failure_ratio: 0.5,
            open_for: Duration::from_millis(open_for_ms),
            max_open_for: Duration::from_millis(open_for_ms * 4),
        })
    }

    fn call(breaker: &CircuitBreaker, succeeded: bool) -> bool {
        match breaker.try_acquire() {
            Some(permit) => {
                breaker.record(permit, succeeded);
                true
            }
            None => false,
        }
    }

    #[test]
    fn it_stays_closed_below_the_minimum_number_of_calls() {
        let breaker = breaker(50);
        for _ in 0..3 {
            assert!(call(&breaker, false));
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn it_opens_past_the_failure_ratio_and_refuses_calls() {
        let breaker = breaker(10_000);
        call(&breaker, true);
        call(&breaker, false);
        call(&breaker, true);
        assert_eq!(breaker.state(), BreakerState::Closed, "1 failure of 3 calls");
        call(&breaker, false);
        assert_eq!(breaker.state(), BreakerState::Open, "2 failures of 4 calls");
        assert!(breaker.try_acquire().is_none());
    }

    #[test]
    fn a_successful_probe_closes_it_and_a_failed_one_reopens_it_for_longer() {
        let breaker = breaker(30);
        for _ in 0..4 {
            call(&breaker, false);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));

        let probe = breaker.try_acquire().expect("a probe after open_for");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.try_acquire().is_none(), "only one probe at a time");
        breaker.record(probe, false);
        assert_eq!(breaker.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.try_acquire().is_none(), "the second opening lasts twice as long");
        std::thread::sleep(Duration::from_millis(30));

        let probe = breaker.try_acquire().expect("a probe after the longer opening");
        breaker.record(probe, true);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(call(&breaker, false), "closed again, with a clean window");
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn a_released_probe_can_be_granted_again() {
        let breaker = breaker(10);
        for _ in 0..4 {
            call(&breaker, false);
        }
        std::thread::sleep(Duration::from_millis(20));
        let probe = breaker.try_acquire().expect("a probe");
        breaker.release(probe);
        assert!(breaker.try_acquire().is_some(), "the released probe is granted again");
    }

    #[test]
    fn a_429_with_retry_after_opens_the_breaker_until_then() {
        let breaker = breaker(10_000);
        let permit = breaker.try_acquire().unwrap();
        breaker.record_throttled(permit, Duration::from_millis(30));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.try_acquire().is_none(), "no call before Retry-After");
        std::thread::sleep(Duration::from_millis(40));
        let probe = breaker.try_acquire().expect("a probe once Retry-After has passed");
        breaker.record(probe, true);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn refusals_by_mono_count_as_successes() {
        let breaker = breaker(10_000);
        for _ in 0..10 {
            call(&breaker, true);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
