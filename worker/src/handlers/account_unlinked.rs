//! `mono.events.account_unlinked`: the account is gone. Mark it, and clear its re-auth state unless
//! a later event already decided that state.

use sqlx::PgConnection;

use super::HandlerOutcome;
use crate::db::accounts::{self, AccountGuards};
use crate::event::IncomingEvent;

pub async fn apply(
    conn: &mut PgConnection,
    event: &IncomingEvent,
    guards: &AccountGuards,
) -> sqlx::Result<HandlerOutcome> {
    // Unlinking is never lost to reordering: only the re-auth part obeys the ordering guard.
    let clear_reauth = !guards.reauth_is_newer_than(event.received_at);
    accounts::mark_unlinked(conn, event.account(), event.received_at, clear_reauth).await?;
    Ok(HandlerOutcome::Applied)
}
