//! A fresh re-auth token for one account, without holding a connection of the pool across Mono.
//!
//! ```text
//! request ─▶ refused lately? breaker open? ─▶ in-process flight ── follower: waits for the leader's outcome
//!                 (no database work yet)          │ leader
//!                                                 ▼
//!            Mono slot (semaphore) ─▶ account lock (lock session; while another process holds it,
//!            poll the stored token) ─▶ read the state ─▶ Mono (own task) ─▶ store (short transaction)
//!            ─▶ release the lock ─▶ publish to the followers
//! ```
//!
//! What waits for what: a follower waits for its leader; a leader waits for a Mono slot, then for the
//! account's lock, each within the request's deadline (`TOKEN_DEADLINE_MS`), holding no pool
//! connection: the pool is touched only by single short statements (reads) and the store's short
//! transaction (`lock_timeout` bounded). Once Mono is asked, the call runs in its own task, so a
//! request that goes away (client gone, deadline) never wastes a token Mono issued: it is stored and
//! served to the next request. A request whose client went away before the call makes none (actix
//! drops a request's future when its client closes the connection).
//!
//! Sharing outcomes: within the process through the flight; across processes through the lock, the
//! stored token and the account's `token_call_failed_at`. A request that waited for another
//! process's lock and then finds no usable token stored answers as that process did when its call
//! failed meanwhile (the stored token above the floor, else 503 with a short `Retry-After`) instead
//! of running the retry budget again; when nothing failed (the holder's client hung up before its
//! call, or its lock session ended), it calls Mono itself.

use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::{self, MonoCall, TokenState};
use crate::errors::ApiError;
use crate::flights::{Flights, Joined, follow};
use crate::mono_access::{DEFAULT_RETRY_AFTER, MonoAccess};
use crate::refusals::Refused;
use mono_client::tokens::TokenOutcome;
use shared::event::AccountId;

/// Mono's re-auth tokens expire this long after they are issued.
const TOKEN_LIFETIME: chrono::Duration = chrono::Duration::minutes(10);
/// While Mono is unavailable, a stored token that still works this much longer is handed out
/// (`source: "stored"`) rather than a 503: a short re-auth window beats none.
pub const STORED_FLOOR_WHILE_MONO_UNAVAILABLE: chrono::Duration = chrono::Duration::seconds(30);
/// `Retry-After` when another process's refresh of the account stored nothing.
const OTHER_PROCESS_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often a request waiting for another process's lock looks at the stored token, at first and
/// at most.
const LOCK_POLL_FIRST: Duration = Duration::from_millis(20);
const LOCK_POLL_MAX: Duration = Duration::from_millis(250);

/// A token to hand out. `Debug` shows no token.
#[derive(Clone)]
pub struct Handout {
    pub token: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub source: &'static str,
}

impl std::fmt::Debug for Handout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handout").field("source", &self.source).field("expires_at", &self.expires_at).finish()
    }
}

impl Handout {
    fn stored(state: &TokenState, until: DateTime<Utc>) -> Option<Self> {
        state.token_working_until(until).map(|(token, issued_at, expires_at)| Self {
            token: token.to_owned(),
            issued_at,
            expires_at,
            source: "stored",
        })
    }
}

pub type Outcome = Result<Handout, ApiError>;

/// Fresh tokens for the app's requests: one refresh per account within the process, the others
/// share its outcome.
pub struct Refresher {
    pub mono: Arc<MonoAccess>,
    /// A stored token with less than this left is refreshed (`TOKEN_MIN_REMAINING_SECS`).
    pub token_min_remaining: chrono::Duration,
    flights: Flights<Outcome>,
}

impl Refresher {
    pub fn new(mono: Arc<MonoAccess>, token_min_remaining: chrono::Duration) -> Self {
        Self { mono, token_min_remaining, flights: Flights::default() }
    }
}

/// The refused and not-needed answers, before any token is considered.
pub fn refuse_unless_needed(state: &TokenState) -> Result<(), ApiError> {
    if state.unlinked {
        return Err(ApiError::AccountUnlinked);
    }
    if !state.reauth_required {
        return Err(ApiError::ReauthNotRequired);
    }
    Ok(())
}

/// A token for `account` whose stored one has less than the minimum left.
pub async fn fresh(refresher: &Arc<Refresher>, account: &AccountId) -> Outcome {
    let deadline = Instant::now() + refresher.mono.deadline;
    // Mono refused this account a moment ago (maybe for the request this one queued behind): asking
    // again would only hammer it on the app's behalf.
    if let Some(message) = refresher.mono.refusals.recall(Refused::Token, account.as_str()) {
        return Err(ApiError::MonoRefused(message));
    }
    // Only while the opening lasts: once its time is up this request may be the probe that closes
    // the breaker again.
    if let Some(open_for) = refresher.mono.circuit_open_for() {
        return unavailable(refresher, account, "Mono circuit is open".into(), open_for).await;
    }
    loop {
        match refresher.flights.join(account.as_str()) {
            Joined::Leader(lead) => {
                let outcome = lead_refresh(refresher, account, deadline, lead).await;
                return outcome;
            }
            Joined::Follower(offer) => match tokio::time::timeout_at(deadline, follow(offer)).await {
                Ok(Some(outcome)) => {
                    metrics::counter!(mono_client::MetricNames::API.calls_shared).increment(1);
                    return outcome;
                }
                // The leader went away before calling Mono: lead, or follow the next leader.
                Ok(None) => continue,
                Err(_) => return past_deadline(refresher, account).await,
            },
        }
    }
}

async fn lead_refresh(
    refresher: &Arc<Refresher>,
    account: &AccountId,
    deadline: Instant,
    lead: crate::flights::Lead<Outcome>,
) -> Outcome {
    // A Mono slot before any database work: a process never holds more locks than it can call for.
    let Ok(slot) = tokio::time::timeout_at(deadline, refresher.mono.slots.clone().acquire_owned()).await
    else {
        return past_deadline(refresher, account).await;
    };
    let slot = slot.expect("the Mono semaphore is never closed");
    let lock = match take_lock(refresher, account, deadline).await {
        Ok(Taken::Lock { lock, waited_since }) => (lock, waited_since),
        Ok(Taken::Served(handout)) => {
            lead.publish(Ok(handout.clone()));
            return Ok(handout);
        }
        // Not published: the lead goes with this request, and a follower leads with its own deadline
        // (as when the deadline comes before a Mono slot).
        Ok(Taken::OutOfTime(outcome)) => return outcome,
        Err(error) => {
            lead.publish(Err(error.clone()));
            return Err(error);
        }
    };
    let (lock, waited_since) = lock;
    let checked = check_under_lock(refresher, account, waited_since).await;
    if let Some(outcome) = checked {
        // Released before publishing: a request that comes after the flight ends never finds the
        // lock still held by this process (its session would take it again).
        lock.release().await;
        lead.publish(outcome.clone());
        return outcome;
    }
    // Mono is asked from here on: in a task of its own, so that the token it issues is stored and
    // shared even if this request goes away meanwhile.
    let task = {
        let (refresher, account) = (refresher.clone(), account.clone());
        tokio::spawn(async move {
            let outcome = call_and_store(&refresher, &account).await;
            lock.release().await;
            lead.publish(outcome.clone());
            drop(slot);
            outcome
        })
    };
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(ApiError::MonoUnavailable {
            reason: "the refresh failed".into(),
            retry_after: DEFAULT_RETRY_AFTER,
        }),
        Err(_) => past_deadline(refresher, account).await,
    }
}

enum Taken {
    Lock {
        lock: crate::locks::AccountLock,
        /// When this request began to wait for another process's hold of the lock, if it did.
        waited_since: Option<DateTime<Utc>>,
    },
    /// Another process stored a token with enough time left while this one waited for its lock.
    Served(Handout),
    /// This request's deadline came while another process still held the lock: its own answer (the
    /// fallback or 503), not its followers', whose deadlines are later.
    OutOfTime(Outcome),
}

/// Takes the account's lock; while another process holds it, polls the stored token (which that
/// process is about to refresh) until the deadline, then answers as a failure of Mono would (the
/// stored token above the floor, else 503).
async fn take_lock(refresher: &Refresher, account: &AccountId, deadline: Instant) -> Result<Taken, ApiError> {
    let mut waited_since = None;
    let mut pause = LOCK_POLL_FIRST;
    loop {
        // Under the deadline too: the lock session may be reconnecting or stalled. A lock taken after
        // this request gave up is unlocked by its guard (`locks`).
        let asked = Utc::now();
        let tried =
            tokio::time::timeout_at(deadline, refresher.mono.account_locks.try_lock(account.as_str()));
        match tried.await {
            Ok(Ok(Some(lock))) => return Ok(Taken::Lock { lock, waited_since }),
            Ok(Ok(None)) => {}
            Ok(Err(error)) => return Err(ApiError::DatabaseUnavailable(error.to_string())),
            Err(_) => {
                let reason = "the lock session did not answer within TOKEN_DEADLINE_MS".into();
                return Ok(Taken::OutOfTime(
                    unavailable(refresher, account, reason, OTHER_PROCESS_RETRY_AFTER).await,
                ));
            }
        }
        // From before the first try that found it held: a failure of the holder's is later.
        waited_since.get_or_insert(asked);
        let now = Instant::now();
        if now >= deadline {
            // Out of time as when Mono fails: the stored token above the floor, else 503.
            let reason = "another process is still refreshing this account's token".into();
            return Ok(Taken::OutOfTime(
                unavailable(refresher, account, reason, OTHER_PROCESS_RETRY_AFTER).await,
            ));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(LOCK_POLL_MAX);
        let current =
            db::token_state(&refresher.mono.pool, account.as_str()).await?.ok_or(ApiError::NotFound)?;
        refuse_unless_needed(&current)?;
        if let Some(handout) = Handout::stored(&current, Utc::now() + refresher.token_min_remaining) {
            return Ok(Taken::Served(handout));
        }
    }
}

/// Under the lock, before calling Mono: the answer if Mono need not (or must not) be asked.
async fn check_under_lock(
    refresher: &Refresher,
    account: &AccountId,
    waited_since: Option<DateTime<Utc>>,
) -> Option<Outcome> {
    let current = match db::token_state(&refresher.mono.pool, account.as_str()).await {
        Ok(Some(current)) => current,
        Ok(None) => return Some(Err(ApiError::NotFound)),
        Err(error) => return Some(Err(error.into())),
    };
    if let Err(error) = refuse_unless_needed(&current) {
        return Some(Err(error));
    }
    // A concurrent request (here or in another process) may have just refreshed it.
    if let Some(handout) = Handout::stored(&current, Utc::now() + refresher.token_min_remaining) {
        return Some(Ok(handout));
    }
    if let Some(since) = waited_since {
        // Another process held the lock and stored nothing usable. If its call failed meanwhile,
        // its outcome is this one's too: asking Mono again would spend a second retry budget on
        // one refresh. If not, it went without calling: this request calls.
        match db::call_failed_since(&refresher.mono.pool, account.as_str(), MonoCall::Token, since).await {
            Ok(true) => {
                return Some(degrade(
                    &current,
                    "another process's refresh of this account failed".into(),
                    OTHER_PROCESS_RETRY_AFTER,
                ));
            }
            Ok(false) => {}
            Err(error) => return Some(Err(error.into())),
        }
    }
    None
}

/// Calls Mono (breaker, retries) and stores what it issues. Holds no pool connection while Mono
/// answers.
async fn call_and_store(refresher: &Refresher, account: &AccountId) -> Outcome {
    let (outcome, _flight) = refresher.mono.tokens.fetch(account, &CancellationToken::new()).await;
    let token = match outcome {
        TokenOutcome::Token(token) => token,
        TokenOutcome::Refused { message, .. } => {
            refresher.mono.refusals.remember(Refused::Token, account.as_str(), &message);
            db::note_call_failed(&refresher.mono.pool, account.as_str(), MonoCall::Token).await;
            return Err(ApiError::MonoRefused(message));
        }
        TokenOutcome::Park { reason } | TokenOutcome::Retry { reason } => {
            db::note_call_failed(&refresher.mono.pool, account.as_str(), MonoCall::Token).await;
            return unavailable(refresher, account, reason, refresher.mono.retry_after()).await;
        }
        TokenOutcome::Abandoned => {
            return Err(ApiError::MonoUnavailable {
                reason: "stopping".into(),
                retry_after: DEFAULT_RETRY_AFTER,
            });
        }
    };
    let expires_at = token.issued_at + TOKEN_LIFETIME;
    let fresh =
        Handout { token: token.expose().to_owned(), issued_at: token.issued_at, expires_at, source: "fresh" };
    let now = match db::store_fresh(
        &refresher.mono.pool,
        account.as_str(),
        token.expose(),
        token.issued_at,
        expires_at,
    )
    .await?
    {
        db::Store::Stored => return Ok(fresh),
        db::Store::Missing => return Err(ApiError::NotFound),
        db::Store::NotStored(now) => now,
    };
    // Not stored: the account changed while Mono answered (re-authorised, unlinked), or the worker
    // stored a token Mono issued later, which is the one to hand out.
    refuse_unless_needed(&now)?;
    Ok(Handout::stored(&now, Utc::now()).unwrap_or(fresh))
}

/// Mono is unavailable for this request: the stored token above the floor, else 503.
async fn unavailable(
    refresher: &Refresher,
    account: &AccountId,
    reason: String,
    retry_after: Duration,
) -> Outcome {
    // Read again: the worker may have stored one while Mono was failing us.
    let current = db::token_state(&refresher.mono.pool, account.as_str()).await?.ok_or(ApiError::NotFound)?;
    refuse_unless_needed(&current)?;
    degrade(&current, reason, retry_after)
}

fn degrade(current: &TokenState, reason: String, retry_after: Duration) -> Outcome {
    let Some(handout) = Handout::stored(current, Utc::now() + STORED_FLOOR_WHILE_MONO_UNAVAILABLE) else {
        return Err(ApiError::MonoUnavailable { reason, retry_after });
    };
    let left_secs = (handout.expires_at - Utc::now()).num_seconds();
    tracing::warn!(
        left_secs,
        "Mono is unavailable: handing out the stored token, which works for less than TOKEN_MIN_REMAINING_SECS"
    );
    Ok(handout)
}

/// The request's deadline passed while it waited (for a slot, the lock or the leader).
async fn past_deadline(refresher: &Refresher, account: &AccountId) -> Outcome {
    unavailable(
        refresher,
        account,
        "no fresh token within TOKEN_DEADLINE_MS".into(),
        OTHER_PROCESS_RETRY_AFTER,
    )
    .await
}
