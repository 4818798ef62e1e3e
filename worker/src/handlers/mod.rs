//! Applying one event to the database, inside the delivery's transaction.
//!
//! `apply` serialises on the account row, recognises a redelivery (same id) and a duplicate (same
//! body within the window), hands the event to its handler, and journals the result in
//! `webhook_events`. A handler that needs a re-auth token it was not given answers `NeedsToken`
//! before writing anything: the caller rolls back, asks Mono outside any transaction, and applies
//! again with the token, so no row lock is ever held across a call to Mono.

mod account_connected;
mod account_reauthorized;
mod account_unlinked;
mod account_updated;
mod reauthorisation_required;
mod sync_failed;

use sqlx::PgConnection;
use std::time::Duration;

use crate::db::accounts::{self, AccountGuards};
use crate::db::events::{self, EventStatus};
use crate::event::IncomingEvent;
use crate::mono::ReauthToken;
use shared::event::EventKind;

/// What a handler decided.
#[derive(Debug, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// The effect was written.
    Applied,
    /// A later event already decided this state; nothing was written.
    Stale,
    /// Nothing to do for this event, with why.
    Ignored(&'static str),
    /// The effect needs a re-auth token from Mono; nothing was written.
    NeedsToken,
}

/// What `apply` did with the delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Settled and journaled with this status (commit the transaction).
    Settled(EventStatus),
    /// This delivery id was settled before (a redelivery): no effect (roll back).
    AlreadySettled,
    /// Needs a token first (roll back, call Mono, apply again).
    NeedsToken,
}

pub async fn apply(
    conn: &mut PgConnection,
    event: &IncomingEvent,
    token: Option<&ReauthToken>,
    dedup_window: Duration,
) -> sqlx::Result<Applied> {
    // Lock first: a concurrent copy of this delivery, or another event for the account, waits here
    // and then sees what this transaction committed.
    let guards = match event.kind.needs_account() {
        true => Some(accounts::lock(conn, event.account()).await?),
        false => None,
    };
    if events::settled_status(conn, event.record.id).await?.is_some() {
        return Ok(Applied::AlreadySettled);
    }
    let (status, note) = if events::has_duplicate(conn, &event.record, dedup_window).await? {
        (EventStatus::Duplicate, None)
    } else {
        match run_handler(conn, event, guards.as_ref(), token).await? {
            HandlerOutcome::Applied => (EventStatus::Processed, None),
            HandlerOutcome::Stale => (EventStatus::Stale, None),
            HandlerOutcome::Ignored(why) => (EventStatus::Ignored, Some(why)),
            HandlerOutcome::NeedsToken => return Ok(Applied::NeedsToken),
        }
    };
    if !events::insert(conn, &event.record, status, note).await? {
        return Ok(Applied::AlreadySettled);
    }
    Ok(Applied::Settled(status))
}

async fn run_handler(
    conn: &mut PgConnection,
    event: &IncomingEvent,
    guards: Option<&AccountGuards>,
    token: Option<&ReauthToken>,
) -> sqlx::Result<HandlerOutcome> {
    let Some(guards) = guards else {
        return Ok(HandlerOutcome::Ignored("event not handled by monohook"));
    };
    match &event.kind {
        EventKind::ReauthorisationRequired => {
            reauthorisation_required::apply(conn, event, guards, token).await
        }
        EventKind::AccountReauthorized => account_reauthorized::apply(conn, event, guards).await,
        EventKind::AccountUpdated => account_updated::apply(conn, event, guards).await,
        EventKind::AccountConnected => account_connected::apply(conn, event).await,
        EventKind::AccountUnlinked => account_unlinked::apply(conn, event, guards).await,
        EventKind::SyncFailed => sync_failed::apply(conn, event, guards).await,
        EventKind::Other(_) => Ok(HandlerOutcome::Ignored("event not handled by monohook")),
    }
}
