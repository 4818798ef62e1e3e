//! A circuit breaker on the Mono client, shared by every call a worker makes.
//!
//! When Mono fails for many accounts at once (5xx, 429, timeouts, refused connections) that is an
//! outage, not a bad event: spending each delivery's attempts on it would only fill the dead-letter
//! queue. Closed, the breaker opens on either of two signs of an outage: `consecutive_failures`
//! accounts whose calls failed with no call answered in between (so one slow trickle of re-auths
//! trips it too), or `failure_ratio` of the accounts called over a sliding window (with at least
//! `min_calls` accounts, each counted by its latest call). Both count **accounts, not calls**: Mono
//! failing one account again and again (a delivery retrying its budget makes about six calls) is
//! that account's trouble, not an outage, so it never parks everyone else's re-auths; its delivery
//! spends its attempts and is dead-lettered as any other. Mono refusing our secret key (401/403) and
//! a 429 with `Retry-After` open it at once. Open, callers are refused (their deliveries wait in a
//! retry tier without spending an attempt). After `open_for` it lets one probe through (half-open):
//! success closes it, failure opens it again for twice as long, up to `max_open_for`. A probe that
//! never reports (its caller's future was dropped: the request went away, the worker stopped) frees
//! its slot when its permit drops, so the breaker cannot stay half-open with no probe out. Every change is
//! logged and exported as `monohook_<binary>_mono_circuit_state`; a refused key also sets
//! `monohook_<binary>_mono_key_refused` until a call succeeds again.
//!
//! Mono refusing one account (a 4xx other than 401/403/408/425/429) is that account's fault and a
//! success for the breaker, unless [`SAME_REFUSALS_ARE_OURS`] accounts in a row get the same status
//! of [`ROUTE_STATUSES`] (about the route, never the account): then it is ours (a `MONO_API_URL`
//! ending in `/v2` answers 404 to every re-auth). The breaker opens
//! as for a refused key, callers park instead of dead-lettering, `monohook_<binary>_mono_refusing_alike`
//! holds the status, and a probe answered otherwise ends it.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::MetricNames;
use shared::event::AccountId;

/// Accounts in a row that Mono refuses with one status before the refusals are taken as ours.
pub const SAME_REFUSALS_ARE_OURS: usize = 5;

/// The statuses that say something of the request's route or form, never of the account: what a
/// wrong `MONO_API_URL` gets. Mono's known refusal of an account (400 with a `message`) is not among
/// them, so any number of accounts Mono refuses in a row stay each account's fault.
pub const ROUTE_STATUSES: [u16; 6] = [404, 405, 406, 410, 414, 415];

/// The breaker's thresholds.
#[derive(Clone, Debug)]
pub struct BreakerSettings {
    pub window: Duration,
    /// Fewest accounts called within the window before the ratio may open the breaker.
    pub min_calls: usize,
    /// Share of the accounts called within the window whose latest call failed.
    pub failure_ratio: f64,
    /// Accounts whose calls failed in a row (no call answered in between) that open the breaker,
    /// whatever the traffic. One account failing again and again counts once.
    pub consecutive_failures: usize,
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

/// How a permitted call went, as far as Mono's availability is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// Mono answered (a token, or a refusal of one account).
    Answered,
    /// Mono is unavailable (5xx, timeout, connection error, ...).
    Failed,
    /// Mono asked every caller to wait this long (429 with `Retry-After`).
    Throttled(Duration),
    /// Mono refuses our secret key: nothing can succeed until an operator acts.
    KeyRefused,
    /// Mono refused the call's account with this status (a 4xx of the account's).
    Refused(u16),
}

/// Leave to make one call; hand it back with the call's outcome. A probe's permit dropped without
/// an outcome (its future cancelled) hands its slot back, as [`CircuitBreaker::release`] does.
#[must_use = "report the call's outcome with CircuitBreaker::record"]
pub struct CallPermit {
    /// The account the call is for: the breaker counts accounts, not calls.
    account: String,
    /// For the half-open probe: which probe it is, and the state to free its slot in on drop.
    probe: Option<Probe>,
}

struct Probe {
    id: u64,
    inner: Arc<Mutex<Inner>>,
}

impl CallPermit {
    /// Disarms the permit: its outcome is being reported, so dropping it frees nothing. Returns the
    /// call's account and whether it was the probe.
    fn settle(mut self) -> (String, bool) {
        (std::mem::take(&mut self.account), self.probe.take().is_some())
    }
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        if let Some(Probe { id, inner }) = self.probe.take() {
            lock(&inner).free_probe(id);
        }
    }
}

impl fmt::Debug for CallPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallPermit")
            .field("account", &self.account)
            .field("probe", &self.probe.as_ref().map(|p| p.id))
            .finish()
    }
}

pub struct CircuitBreaker {
    settings: BreakerSettings,
    names: MetricNames,
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    state: Phase,
    /// The latest call of each account called within the window (time, account, succeeded), oldest
    /// first: one entry per account, so one account failing often weighs as one.
    calls: VecDeque<(Instant, String, bool)>,
    /// Accounts whose calls failed since the last call Mono answered.
    failing: HashSet<String>,
    /// How long the next opening lasts.
    open_for: Duration,
    /// Mono refused our key on the last call it answered.
    key_refused: bool,
    /// The status of the refusals in a row since Mono last answered otherwise, and their accounts.
    refusals: Option<(u16, HashSet<String>)>,
    /// Set once [`SAME_REFUSALS_ARE_OURS`] accounts in a row got this status.
    refusing_alike: Option<u16>,
    /// The id the next probe gets, so that a late drop of an old probe cannot free a newer one's slot.
    next_probe: u64,
}

enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    /// `probing` is the id of the probe out, if any.
    HalfOpen {
        probing: Option<u64>,
    },
}

impl Inner {
    /// Lets another probe go if probe `id` is still the one out.
    fn free_probe(&mut self, id: u64) {
        if matches!(self.state, Phase::HalfOpen { probing: Some(out) } if out == id) {
            self.state = Phase::HalfOpen { probing: None };
        }
    }
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings, names: MetricNames) -> Self {
        let open_for = settings.open_for;
        metrics::gauge!(names.circuit_state).set(0.0);
        metrics::gauge!(names.key_refused).set(0.0);
        metrics::gauge!(names.refusing_alike).set(0.0);
        let inner = Inner {
            state: Phase::Closed,
            calls: VecDeque::new(),
            failing: HashSet::new(),
            open_for,
            key_refused: false,
            refusals: None,
            refusing_alike: None,
            next_probe: 0,
        };
        Self { settings, names, inner: Arc::new(Mutex::new(inner)) }
    }

    /// A permit to call Mono for `account` now, or `None` while the breaker is open (or its probe
    /// is out).
    pub fn try_acquire(&self, account: &AccountId) -> Option<CallPermit> {
        let account = account.as_str().to_owned();
        let mut inner = self.lock();
        match inner.state {
            Phase::Closed => Some(CallPermit { account, probe: None }),
            Phase::Open { until } if Instant::now() >= until => {
                let id = self.next_probe_id(&mut inner);
                self.change(&mut inner, Phase::HalfOpen { probing: Some(id) });
                Some(self.probe_permit(account, id))
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: Some(_) } => None,
            Phase::HalfOpen { probing: None } => {
                let id = self.next_probe_id(&mut inner);
                inner.state = Phase::HalfOpen { probing: Some(id) };
                Some(self.probe_permit(account, id))
            }
        }
    }

    fn next_probe_id(&self, inner: &mut Inner) -> u64 {
        let id = inner.next_probe;
        inner.next_probe = id.wrapping_add(1);
        id
    }

    fn probe_permit(&self, account: String, id: u64) -> CallPermit {
        CallPermit { account, probe: Some(Probe { id, inner: self.inner.clone() }) }
    }

    /// Reports how a permitted call went. Mono refusing one account is a success for the breaker:
    /// Mono answered.
    pub fn record(&self, permit: CallPermit, result: CallResult) {
        let (account, probe) = permit.settle();
        let mut inner = self.lock();
        let now = Instant::now();
        let refused_alike = self.note_refusals(&mut inner, result, &account);
        let succeeded = matches!(result, CallResult::Answered | CallResult::Refused(_)) && !refused_alike;
        if succeeded {
            inner.failing.clear();
        } else {
            inner.failing.insert(account.clone());
        }
        if result == CallResult::KeyRefused {
            if !inner.key_refused {
                tracing::error!(
                    "Mono refuses our secret key (MONO_SECRET_KEY): re-auth deliveries are parked, \
                     none is dead-lettered, until Mono accepts it again"
                );
            }
            inner.key_refused = true;
            metrics::gauge!(self.names.key_refused).set(1.0);
        } else if succeeded && inner.key_refused {
            inner.key_refused = false;
            metrics::gauge!(self.names.key_refused).set(0.0);
            tracing::info!("Mono accepts our secret key again");
        }
        if let CallResult::Throttled(wait) = result {
            self.throttle(&mut inner, probe, now, account, wait);
            return;
        }
        if probe {
            if succeeded {
                inner.calls.clear();
                inner.open_for = self.settings.open_for;
                self.change(&mut inner, Phase::Closed);
            } else {
                self.open(&mut inner, now);
            }
            return;
        }
        self.remember(&mut inner, now, account, succeeded);
        if !matches!(inner.state, Phase::Closed) {
            return;
        }
        let failures = inner.calls.iter().filter(|(_, _, ok)| !ok).count();
        let ratio_tripped = inner.calls.len() >= self.settings.min_calls
            && failures as f64 / inner.calls.len() as f64 >= self.settings.failure_ratio;
        let streak_tripped = inner.failing.len() >= self.settings.consecutive_failures.max(1);
        if ratio_tripped || streak_tripped || result == CallResult::KeyRefused || refused_alike {
            self.open(&mut inner, now);
        }
    }

    /// Keeps the streak of accounts Mono refuses with one status; whether this call's refusal is one
    /// of [`SAME_REFUSALS_ARE_OURS`] or more in a row (ours, then). Any other answer ends the streak.
    fn note_refusals(&self, inner: &mut Inner, result: CallResult, account: &str) -> bool {
        match result {
            CallResult::Refused(status) if ROUTE_STATUSES.contains(&status) => {
                let streak = inner.refusals.get_or_insert_with(|| (status, HashSet::new()));
                if streak.0 != status {
                    *streak = (status, HashSet::new());
                }
                streak.1.insert(account.to_owned());
                let accounts = streak.1.len();
                if accounts >= SAME_REFUSALS_ARE_OURS && inner.refusing_alike != Some(status) {
                    inner.refusing_alike = Some(status);
                    metrics::gauge!(self.names.refusing_alike).set(f64::from(status));
                    tracing::error!(
                        status,
                        accounts,
                        "Mono refuses every account alike: taken as ours (is MONO_API_URL right?); \
                         re-auth deliveries are parked, none is dead-lettered, until Mono answers \
                         otherwise (the refusals before this one were dead-lettered: replay them)"
                    );
                } else if inner.refusing_alike.is_some_and(|alike| alike != status) {
                    self.end_refusing_alike(inner);
                }
                inner.refusing_alike == Some(status)
            }
            CallResult::Answered | CallResult::Refused(_) => {
                inner.refusals = None;
                self.end_refusing_alike(inner);
                false
            }
            CallResult::Failed | CallResult::Throttled(_) | CallResult::KeyRefused => false,
        }
    }

    fn end_refusing_alike(&self, inner: &mut Inner) {
        if let Some(status) = inner.refusing_alike.take() {
            metrics::gauge!(self.names.refusing_alike).set(0.0);
            tracing::info!(status, "Mono answers accounts apart again");
        }
    }

    /// The status Mono refuses every account with, while it does.
    pub fn refusing_alike(&self) -> Option<u16> {
        self.lock().refusing_alike
    }

    /// Keeps `account`'s latest outcome in the window (replacing its earlier one) and lets go of
    /// what the window has passed.
    fn remember(&self, inner: &mut Inner, now: Instant, account: String, succeeded: bool) {
        inner.calls.retain(|(_, called, _)| *called != account);
        inner.calls.push_back((now, account, succeeded));
        while inner.calls.front().is_some_and(|(at, _, _)| now.duration_since(*at) > self.settings.window) {
            inner.calls.pop_front();
        }
    }

    /// Mono asked every caller to wait (429 with `Retry-After`): the breaker opens until then,
    /// whatever the failure ratio.
    fn throttle(&self, inner: &mut Inner, probe: bool, now: Instant, account: String, wait: Duration) {
        if !probe {
            self.remember(inner, now, account, false);
        }
        // A `Retry-After` too large to add to the clock is bounded by the longest opening.
        let until = now.checked_add(wait).unwrap_or(now + self.settings.max_open_for);
        let later = match inner.state {
            Phase::Open { until: current } => until > current,
            _ => true,
        };
        if later {
            tracing::warn!(retry_after = ?wait, "Mono asked to slow down (429)");
            self.change(inner, Phase::Open { until });
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        // The accounts that opened it have had their say; the probe decides what comes next.
        inner.failing.clear();
        let open_for = inner.open_for;
        inner.open_for = (open_for * 2).min(self.settings.max_open_for);
        self.change(inner, Phase::Open { until: now + open_for });
    }

    /// Returns a permit whose call was never made (e.g. the worker is stopping): a probe may be
    /// granted again. Dropping the permit does the same; this says so at the call site.
    pub fn release(&self, permit: CallPermit) {
        drop(permit);
    }

    /// The state now. An opening whose time is up is reported (and exported) as half-open, a probe
    /// free to go: callers that look before they call (the api refuses early while it is open) must
    /// never take an opening that has ended for one that lasts, or no call would ever reach
    /// [`Self::try_acquire`] to probe, and the breaker would stay open for good.
    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        self.end_opening_if_due(&mut inner, Instant::now());
        match inner.state {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How long until a call may go through again: `None` while closed, zero while a probe may go.
    pub fn retry_in(&self) -> Option<Duration> {
        let mut inner = self.lock();
        let now = Instant::now();
        self.end_opening_if_due(&mut inner, now);
        match inner.state {
            Phase::Closed => None,
            Phase::Open { until } => Some(until.saturating_duration_since(now)),
            Phase::HalfOpen { .. } => Some(Duration::ZERO),
        }
    }

    /// An opening whose time is up becomes half-open with no probe out: the next caller probes.
    fn end_opening_if_due(&self, inner: &mut Inner, now: Instant) {
        if matches!(inner.state, Phase::Open { until } if now >= until) {
            self.change(inner, Phase::HalfOpen { probing: None });
        }
    }

    /// Whether Mono refused our secret key on the last call it answered.
    pub fn key_refused(&self) -> bool {
        self.lock().key_refused
    }

    fn change(&self, inner: &mut Inner, next: Phase) {
        inner.state = next;
        let state = match inner.state {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        metrics::gauge!(self.names.circuit_state).set(state.metric_value());
        match state {
            BreakerState::Open => tracing::warn!(
                circuit = state.as_str(),
                retry_in = ?inner.open_for.min(self.settings.max_open_for),
                key_refused = inner.key_refused,
                "Mono circuit opened: Mono looks unavailable; re-auth deliveries wait in the retry tier"
            ),
            BreakerState::HalfOpen => {
                tracing::info!(circuit = state.as_str(), "Mono circuit half-open: the next call probes")
            }
            BreakerState::Closed => {
                tracing::info!(circuit = state.as_str(), "Mono circuit closed: calls flow again")
            }
        }
    }

    #[cfg(test)]
    fn with_names(settings: BreakerSettings) -> Self {
        Self::new(settings, MetricNames::WORKER)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_for_ms: u64) -> CircuitBreaker {
        CircuitBreaker::with_names(BreakerSettings {
            window: Duration::from_secs(10),
            min_calls: 4,
            failure_ratio: 0.5,
            consecutive_failures: 100,
            open_for: Duration::from_millis(open_for_ms),
            max_open_for: Duration::from_millis(open_for_ms * 4),
        })
    }

    /// An account no other call of the tests has used.
    fn another_account() -> AccountId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        AccountId::parse(format!("acct-{n}")).unwrap()
    }

    /// A call for an account of its own.
    fn call(breaker: &CircuitBreaker, succeeded: bool) -> bool {
        call_for(breaker, &another_account(), succeeded)
    }

    fn call_for(breaker: &CircuitBreaker, account: &AccountId, succeeded: bool) -> bool {
        match breaker.try_acquire(account) {
            Some(permit) => {
                breaker.record(permit, if succeeded { CallResult::Answered } else { CallResult::Failed });
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
        assert!(breaker.try_acquire(&another_account()).is_none());
    }

    #[test]
    fn a_successful_probe_closes_it_and_a_failed_one_reopens_it_for_longer() {
        let breaker = breaker(30);
        for _ in 0..4 {
            call(&breaker, false);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));

        let probe = breaker.try_acquire(&another_account()).expect("a probe after open_for");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.try_acquire(&another_account()).is_none(), "only one probe at a time");
        breaker.record(probe, CallResult::Failed);
        assert_eq!(breaker.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.try_acquire(&another_account()).is_none(), "the second opening lasts twice as long");
        std::thread::sleep(Duration::from_millis(30));

        let probe = breaker.try_acquire(&another_account()).expect("a probe after the longer opening");
        breaker.record(probe, CallResult::Answered);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(call(&breaker, false), "closed again, with a clean window");
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn an_opening_whose_time_is_up_is_reported_half_open_and_lets_a_probe_go() {
        let breaker = breaker(10);
        for _ in 0..4 {
            call(&breaker, false);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(20));

        // Asked before any call, as the api asks: an ended opening is no reason to refuse.
        assert_eq!(breaker.state(), BreakerState::HalfOpen, "the opening's time is up");
        assert_eq!(breaker.retry_in(), Some(Duration::ZERO));
        let probe = breaker.try_acquire(&another_account()).expect("a probe after open_for");
        breaker.record(probe, CallResult::Answered);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn a_released_probe_can_be_granted_again() {
        let breaker = breaker(10);
        for _ in 0..4 {
            call(&breaker, false);
        }
        std::thread::sleep(Duration::from_millis(20));
        let probe = breaker.try_acquire(&another_account()).expect("a probe");
        breaker.release(probe);
        assert!(breaker.try_acquire(&another_account()).is_some(), "the released probe is granted again");
    }

    #[test]
    fn a_dropped_probe_frees_its_slot_for_the_next_probe() {
        let breaker = breaker(10);
        for _ in 0..4 {
            call(&breaker, false);
        }
        std::thread::sleep(Duration::from_millis(20));
        let probe = breaker.try_acquire(&another_account()).expect("a probe");
        assert!(breaker.try_acquire(&another_account()).is_none(), "only one probe at a time");

        drop(probe);

        let next = breaker.try_acquire(&another_account()).expect("the dropped probe's slot is free again");
        breaker.record(next, CallResult::Answered);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn an_old_probe_dropped_late_cannot_free_a_newer_probes_slot() {
        let breaker = breaker(10);
        let in_flight = breaker.try_acquire(&another_account()).expect("closed");
        for _ in 0..4 {
            call(&breaker, false);
        }
        std::thread::sleep(Duration::from_millis(20));
        let old_probe = breaker.try_acquire(&another_account()).expect("a probe");
        // A call made while closed is throttled: the breaker opens again with the probe still out.
        breaker.record(in_flight, CallResult::Throttled(Duration::from_millis(10)));
        std::thread::sleep(Duration::from_millis(20));
        let _new_probe = breaker.try_acquire(&another_account()).expect("a probe after the throttle");

        drop(old_probe);

        assert!(
            breaker.try_acquire(&another_account()).is_none(),
            "the new probe is still out: no second probe"
        );
    }

    fn refuse(breaker: &CircuitBreaker, account: &AccountId, status: u16) -> bool {
        match breaker.try_acquire(account) {
            Some(permit) => {
                breaker.record(permit, CallResult::Refused(status));
                true
            }
            None => false,
        }
    }

    #[test]
    fn the_same_refusal_for_many_accounts_in_a_row_is_ours() {
        let breaker = breaker(20);
        // One account refused again and again is that account's trouble.
        let alone = another_account();
        for _ in 0..SAME_REFUSALS_ARE_OURS * 2 {
            assert!(refuse(&breaker, &alone, 404));
        }
        assert_eq!((breaker.state(), breaker.refusing_alike()), (BreakerState::Closed, None));
        // Mono's refusal of an account (400) never counts, however many in a row.
        for _ in 0..SAME_REFUSALS_ARE_OURS * 2 {
            assert!(refuse(&breaker, &another_account(), 400));
        }
        assert_eq!((breaker.state(), breaker.refusing_alike()), (BreakerState::Closed, None));
        // Other statuses, or a success, between refusals end the streak.
        for _ in 0..SAME_REFUSALS_ARE_OURS - 2 {
            assert!(refuse(&breaker, &another_account(), 404));
        }
        assert!(refuse(&breaker, &another_account(), 400));
        assert!(call(&breaker, true));
        for _ in 0..SAME_REFUSALS_ARE_OURS - 1 {
            assert!(refuse(&breaker, &another_account(), 404));
        }
        assert_eq!((breaker.state(), breaker.refusing_alike()), (BreakerState::Closed, None));

        assert!(refuse(&breaker, &another_account(), 404));

        assert_eq!((breaker.state(), breaker.refusing_alike()), (BreakerState::Open, Some(404)));
        assert!(!refuse(&breaker, &another_account(), 404), "open: no call");
        // A probe refused alike opens it again; one answered otherwise ends it.
        std::thread::sleep(Duration::from_millis(25));
        assert!(refuse(&breaker, &another_account(), 404));
        assert_eq!((breaker.state(), breaker.refusing_alike()), (BreakerState::Open, Some(404)));
        std::thread::sleep(Duration::from_millis(45));
        assert!(call(&breaker, true));
        assert_eq!((breaker.state(), breaker.refusing_alike()), (BreakerState::Closed, None));
    }

    #[test]
    fn a_429_with_retry_after_opens_the_breaker_until_then() {
        let breaker = breaker(10_000);
        let permit = breaker.try_acquire(&another_account()).unwrap();
        breaker.record(permit, CallResult::Throttled(Duration::from_millis(30)));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.try_acquire(&another_account()).is_none(), "no call before Retry-After");
        std::thread::sleep(Duration::from_millis(40));
        let probe = breaker.try_acquire(&another_account()).expect("a probe once Retry-After has passed");
        breaker.record(probe, CallResult::Answered);
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

    #[test]
    fn failures_in_a_row_open_it_at_any_traffic() {
        let breaker = CircuitBreaker::with_names(BreakerSettings {
            consecutive_failures: 3,
            min_calls: 100,
            ..breaker(10_000).settings
        });
        call(&breaker, false);
        call(&breaker, true);
        call(&breaker, false);
        call(&breaker, false);
        assert_eq!(breaker.state(), BreakerState::Closed, "a success broke the streak");
        call(&breaker, false);
        assert_eq!(breaker.state(), BreakerState::Open, "three failures in a row, below min_calls");
    }

    #[test]
    fn a_refused_key_opens_it_at_once_until_a_call_succeeds() {
        let breaker = breaker(10);
        let permit = breaker.try_acquire(&another_account()).unwrap();
        breaker.record(permit, CallResult::KeyRefused);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.key_refused());
        std::thread::sleep(Duration::from_millis(15));
        let probe = breaker.try_acquire(&another_account()).expect("a probe");
        breaker.record(probe, CallResult::KeyRefused);
        assert_eq!(breaker.state(), BreakerState::Open, "still refused");
        std::thread::sleep(Duration::from_millis(25));
        let probe = breaker.try_acquire(&another_account()).expect("a probe");
        breaker.record(probe, CallResult::Answered);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(!breaker.key_refused());
    }

    #[test]
    fn an_absurd_retry_after_cannot_panic() {
        let breaker = breaker(10);
        let permit = breaker.try_acquire(&another_account()).unwrap();
        breaker.record(permit, CallResult::Throttled(Duration::MAX));
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn one_account_failing_again_and_again_never_opens_it() {
        let breaker = CircuitBreaker::with_names(BreakerSettings {
            consecutive_failures: 3,
            min_calls: 3,
            ..breaker(10_000).settings
        });
        let sick = another_account();
        call(&breaker, true);
        call(&breaker, true);
        for _ in 0..20 {
            assert!(call_for(&breaker, &sick, false), "one account's failures refuse nobody");
        }
        assert_eq!(breaker.state(), BreakerState::Closed, "one account of three failing, counted once");
        assert!(call(&breaker, true), "another account still gets through");
    }

    #[test]
    fn failures_of_enough_accounts_in_a_row_open_it() {
        let breaker = CircuitBreaker::with_names(BreakerSettings {
            consecutive_failures: 3,
            min_calls: 100,
            ..breaker(10_000).settings
        });
        let (a, b) = (another_account(), another_account());
        for _ in 0..5 {
            call_for(&breaker, &a, false);
            call_for(&breaker, &b, false);
        }
        assert_eq!(breaker.state(), BreakerState::Closed, "two accounts, however many calls");
        call(&breaker, false);
        assert_eq!(breaker.state(), BreakerState::Open, "a third account failing: Mono is down");
    }

    #[test]
    fn the_ratio_counts_each_account_by_its_latest_call() {
        let breaker = breaker(10_000);
        let (flaky, sick) = (another_account(), another_account());
        call_for(&breaker, &flaky, false);
        call_for(&breaker, &flaky, true);
        call(&breaker, true);
        for _ in 0..5 {
            call_for(&breaker, &sick, false);
        }
        assert_eq!(breaker.state(), BreakerState::Closed, "1 failing account of 3");
        call(&breaker, false);
        assert_eq!(breaker.state(), BreakerState::Open, "2 failing accounts of 4");
    }
}
