//! A hosted re-auth link for one account (Mono's v2 `initiate`), one per episode, through the same
//! per-account machinery as a fresh token (`refresh`): no pool connection held across Mono.
//!
//! ```text
//! request ─▶ account needs re-auth? ─▶ a link for this account and redirect, this episode, younger
//!            (404 / 409)                than REAUTH_LINK_REUSE_SECS? ── yes: hand it out again
//!                 │ no
//!                 ▼
//!            refused lately? breaker open? ─▶ in-process flight (account + redirect) ── follower: waits
//!                 │ leader                                                             for its outcome
//!                 ▼
//!            Mono slot ─▶ link lock (lock session; while another process holds it, poll for the link
//!            it is making) ─▶ read again ─▶ Mono `initiate` (own task) ─▶ store ─▶ release ─▶ publish
//! ```
//!
//! A link is handed out again only for the same account and redirect, while the account is in the
//! re-auth episode it was asked for in (`accounts.reauth_state_received_at`, which every applied
//! re-auth event moves): a new `reauthorisation_required` after an `account_reauthorized` never gets
//! the old link. Sharing: within the process through the flight (keyed by account and redirect);
//! across processes through the link lock (`monohook.reauth-link:<account>\n<redirect>`, apart from
//! the token's, so neither path mistakes the other's work for its own failure) and the stored link.
//! A request that waited for another process's lock looks for a link made since it started waiting,
//! whatever `REAUTH_LINK_REUSE_SECS`; finding none, and `accounts.link_call_failed_at` saying the
//! other's call failed meanwhile, it answers 503 with a short `Retry-After` instead of spending a
//! second retry budget (nothing failed: the other went without calling, and this one calls). Every
//! wait ends at `TOKEN_DEADLINE_MS`; a link Mono created is stored (with its `ref`) even if its
//! request has gone.

use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::caller::Caller;
use crate::db::{self, LinkState, MonoCall, StoredLink};
use crate::errors::ApiError;
use crate::flights::{Flights, Joined, Lead, follow};
use crate::mono_access::MonoAccess;
use crate::refusals::Refused;
use mono_client::links::{LinkAnswer, LinkRequest};
use mono_client::tokens::Called;
use shared::event::AccountId;

/// `Retry-After` when another process's request for the link stored nothing.
const OTHER_PROCESS_RETRY_AFTER: Duration = Duration::from_secs(1);
const LOCK_POLL_FIRST: Duration = Duration::from_millis(20);
const LOCK_POLL_MAX: Duration = Duration::from_millis(250);

/// A link to hand out. `Debug` shows no URL.
#[derive(Clone)]
pub struct Link {
    pub url: String,
    pub reference: String,
    pub created_at: DateTime<Utc>,
    /// `fresh` (Mono made it for this request, or one it shared) or `reused`.
    pub source: &'static str,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("ref", &self.reference).field("source", &self.source).finish()
    }
}

impl Link {
    fn reused(stored: StoredLink) -> Self {
        Self { url: stored.url, reference: stored.reference, created_at: stored.created_at, source: "reused" }
    }
}

pub type LinkOutcome = Result<Link, ApiError>;

/// Re-auth links for the app's requests: one request to Mono per account and redirect within the
/// process, the others share its outcome.
pub struct LinkDesk {
    pub mono: Arc<MonoAccess>,
    /// How long a link is handed out again (`REAUTH_LINK_REUSE_SECS`).
    pub reuse: chrono::Duration,
    flights: Flights<LinkOutcome>,
}

impl LinkDesk {
    pub fn new(mono: Arc<MonoAccess>, reuse: chrono::Duration) -> Self {
        Self { mono, reuse, flights: Flights::default() }
    }
}

/// What one request asks for.
#[derive(Clone)]
struct Ask {
    account: AccountId,
    redirect: Option<String>,
    caller: Caller,
    /// When the request began: a link made since then by a request it waited for is its own.
    started: DateTime<Utc>,
}

/// A link for `account` sending the customer back to `redirect` (already allowed); `current` is
/// the account as [`read_state`] found it.
pub async fn link(
    desk: &Arc<LinkDesk>,
    account: AccountId,
    redirect: Option<String>,
    caller: Caller,
    current: LinkState,
) -> LinkOutcome {
    let ask = Ask { account, redirect, caller, started: Utc::now() };
    if let Some(link) = reusable(desk, &ask, &current, false).await? {
        return Ok(link);
    }
    // Mono refused a link for this account a moment ago, or the account itself (a token): asking
    // again would only hammer it on the app's behalf.
    if let Some(message) = desk.mono.refusals.recall(Refused::Link, ask.account.as_str()) {
        return Err(ApiError::MonoRefused(message));
    }
    // Only while the opening lasts: once its time is up this request may be the probe.
    if let Some(open_for) = desk.mono.circuit_open_for() {
        return Err(ApiError::MonoUnavailable {
            reason: "Mono circuit is open".into(),
            retry_after: open_for,
        });
    }
    let deadline = Instant::now() + desk.mono.deadline;
    let key = format!("{}\n{}", ask.account.as_str(), ask.redirect.as_deref().unwrap_or_default());
    loop {
        match desk.flights.join(&key) {
            Joined::Leader(lead) => return lead_link(desk, &ask, deadline, lead).await,
            Joined::Follower(offer) => match tokio::time::timeout_at(deadline, follow(offer)).await {
                Ok(Some(outcome)) => {
                    metrics::counter!(mono_client::MetricNames::API.calls_shared).increment(1);
                    return outcome;
                }
                // The leader went away before calling Mono: lead, or follow the next leader.
                Ok(None) => continue,
                Err(_) => return Err(past_deadline()),
            },
        }
    }
}

/// The account, if it needs a link: 404 unknown, 409 unlinked or not needing re-auth.
pub async fn read_state(desk: &LinkDesk, account: &AccountId) -> Result<LinkState, ApiError> {
    let current = db::link_state(&desk.mono.pool, account.as_str()).await?.ok_or(ApiError::NotFound)?;
    if current.unlinked {
        return Err(ApiError::AccountUnlinked);
    }
    if !current.reauth_required {
        return Err(ApiError::ReauthNotRequired);
    }
    Ok(current)
}

/// A link of this episode for the account and redirect made within `REAUTH_LINK_REUSE_SECS` or,
/// for a request that waited for another's call, since it could have started.
async fn reusable(
    desk: &LinkDesk,
    ask: &Ask,
    current: &LinkState,
    waited: bool,
) -> Result<Option<Link>, ApiError> {
    let mut since = Utc::now() - desk.reuse;
    if waited {
        let deadline = chrono::Duration::from_std(desk.mono.deadline).unwrap_or(chrono::Duration::MAX);
        since = since.min(ask.started - deadline);
    }
    let stored = db::reusable_link(
        &desk.mono.pool,
        ask.account.as_str(),
        ask.redirect.as_deref(),
        current.episode,
        since,
    )
    .await?;
    Ok(stored.map(Link::reused))
}

async fn lead_link(
    desk: &Arc<LinkDesk>,
    ask: &Ask,
    deadline: Instant,
    lead: Lead<LinkOutcome>,
) -> LinkOutcome {
    let Ok(slot) = tokio::time::timeout_at(deadline, desk.mono.slots.clone().acquire_owned()).await else {
        return Err(past_deadline());
    };
    let slot = slot.expect("the Mono semaphore is never closed");
    let (lock, waited) = match take_lock(desk, ask, deadline).await {
        Ok(Taken::Lock { lock, waited }) => (lock, waited),
        Ok(Taken::Served(link)) => {
            lead.publish(Ok(link.clone()));
            return Ok(link);
        }
        // Not published: the lead goes with this request, and a follower leads on with its own
        // deadline, as for tokens.
        Ok(Taken::OutOfTime(error)) => return Err(error),
        Err(error) => {
            lead.publish(Err(error.clone()));
            return Err(error);
        }
    };
    let episode = match check_under_lock(desk, ask, waited).await {
        Ok(episode) => episode,
        Err(outcome) => {
            // Released before publishing: a request after the flight never finds it held here.
            lock.release().await;
            lead.publish(outcome.clone());
            return outcome;
        }
    };
    // Mono is asked from here on: in a task of its own, so that the link it creates is stored (and
    // audited) even if this request goes away meanwhile.
    let task = {
        let (desk, ask) = (desk.clone(), ask.clone());
        tokio::spawn(async move {
            let outcome = call_and_store(&desk, &ask, episode).await;
            lock.release().await;
            lead.publish(outcome.clone());
            drop(slot);
            outcome
        })
    };
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(ApiError::MonoUnavailable {
            reason: "the link request failed".into(),
            retry_after: OTHER_PROCESS_RETRY_AFTER,
        }),
        Err(_) => Err(past_deadline()),
    }
}

enum Taken {
    /// The lock; `waited` if another process held it first.
    Lock { lock: crate::locks::AccountLock, waited: bool },
    /// Another request made the link meanwhile.
    Served(Link),
    /// This request's deadline came while another process still held the lock (or the lock session
    /// did not answer): its own answer, not its followers', whose deadlines are later.
    OutOfTime(ApiError),
}

/// Takes the link lock; while another process holds it, looks for the link it is making.
async fn take_lock(desk: &LinkDesk, ask: &Ask, deadline: Instant) -> Result<Taken, ApiError> {
    let redirect = ask.redirect.as_deref().unwrap_or_default();
    let mut waited = false;
    let mut pause = LOCK_POLL_FIRST;
    loop {
        // Under the deadline too: the lock session may be reconnecting or stalled. A lock taken after
        // this request gave up is unlocked by its guard (`locks`).
        let tried = tokio::time::timeout_at(
            deadline,
            desk.mono.account_locks.try_lock_link(ask.account.as_str(), redirect),
        );
        match tried.await {
            Ok(Ok(Some(lock))) => return Ok(Taken::Lock { lock, waited }),
            Ok(Ok(None)) => {}
            Ok(Err(error)) => return Err(ApiError::DatabaseUnavailable(error.to_string())),
            Err(_) => return Ok(Taken::OutOfTime(past_deadline())),
        }
        waited = true;
        let now = Instant::now();
        if now >= deadline {
            return Ok(Taken::OutOfTime(ApiError::MonoUnavailable {
                reason: "another process is still asking Mono for this link".into(),
                retry_after: OTHER_PROCESS_RETRY_AFTER,
            }));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(LOCK_POLL_MAX);
        let current = read_state(desk, &ask.account).await?;
        if let Some(link) = reusable(desk, ask, &current, true).await? {
            return Ok(Taken::Served(link));
        }
    }
}

/// Under the lock, before calling Mono: the account's episode, or the answer if Mono need not (or
/// must not) be asked.
async fn check_under_lock(
    desk: &LinkDesk,
    ask: &Ask,
    waited: bool,
) -> Result<Option<DateTime<Utc>>, LinkOutcome> {
    let current = read_state(desk, &ask.account).await.map_err(Err)?;
    // A request here or in another process may have just made it.
    if let Some(link) = reusable(desk, ask, &current, waited).await.map_err(Err)? {
        return Err(Ok(link));
    }
    if waited {
        // Another process held the lock and stored nothing. If its call failed since this request
        // began, its outcome is this one's too: asking Mono again would spend a second retry
        // budget on one link. If not, it went without calling: this request calls.
        let failed =
            db::call_failed_since(&desk.mono.pool, ask.account.as_str(), MonoCall::Link, ask.started)
                .await
                .map_err(|error| Err(error.into()))?;
        if failed {
            return Err(Err(ApiError::MonoUnavailable {
                reason: "another process's request for this link failed".into(),
                retry_after: OTHER_PROCESS_RETRY_AFTER,
            }));
        }
    }
    Ok(current.episode)
}

/// Asks Mono (breaker, retries) and stores the link with its `ref`. Holds no pool connection while
/// Mono answers.
async fn call_and_store(desk: &LinkDesk, ask: &Ask, episode: Option<DateTime<Utc>>) -> LinkOutcome {
    let request = LinkRequest {
        account: ask.account.clone(),
        reference: format!("mh_{}", uuid::Uuid::now_v7().simple()),
        redirect_url: ask.redirect.clone(),
    };
    let link = match desk.mono.tokens.initiate_link(&request, &CancellationToken::new()).await {
        Called::Answer(LinkAnswer::Link(link)) => link,
        Called::Answer(LinkAnswer::Unexpected { fields }) => {
            db::note_call_failed(&desk.mono.pool, ask.account.as_str(), MonoCall::Link).await;
            metrics::counter!("monohook_api_mono_unexpected_answers_total").increment(1);
            tracing::warn!(?fields, "Mono's answer to initiate holds no data.mono_url");
            return Err(ApiError::MonoUnexpectedAnswer("data.mono_url"));
        }
        Called::Refused { message, .. } => {
            desk.mono.refusals.remember(Refused::Link, ask.account.as_str(), &message);
            db::note_call_failed(&desk.mono.pool, ask.account.as_str(), MonoCall::Link).await;
            return Err(ApiError::MonoRefused(message));
        }
        Called::Park { reason } | Called::Retry { reason } => {
            db::note_call_failed(&desk.mono.pool, ask.account.as_str(), MonoCall::Link).await;
            return Err(ApiError::MonoUnavailable { reason, retry_after: desk.mono.retry_after() });
        }
        Called::Abandoned => {
            return Err(ApiError::MonoUnavailable {
                reason: "stopping".into(),
                retry_after: desk.mono.retry_after(),
            });
        }
    };
    // PostgreSQL keeps microseconds: the same instant whether it is answered now or reused later.
    let created_at = link.created_at.trunc_subsecs(6);
    db::store_link(
        &desk.mono.pool,
        &db::NewLink {
            reference: &request.reference,
            account: ask.account.as_str(),
            redirect: ask.redirect.as_deref(),
            url: link.expose(),
            created_at,
            episode,
            key_label: &ask.caller.key_label,
            request_id: &ask.caller.request_id,
        },
    )
    .await?;
    Ok(Link { url: link.expose().to_owned(), reference: request.reference, created_at, source: "fresh" })
}

fn past_deadline() -> ApiError {
    ApiError::MonoUnavailable {
        reason: "no link within TOKEN_DEADLINE_MS".into(),
        retry_after: OTHER_PROCESS_RETRY_AFTER,
    }
}
