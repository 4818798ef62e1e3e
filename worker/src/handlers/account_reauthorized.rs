//! `mono.events.account_reauthorized`: the customer re-authorised. Clear the flag and the spent token.

use sqlx::PgConnection;

use super::HandlerOutcome;
use crate::db::accounts::{self, AccountGuards};
use crate::event::IncomingEvent;

pub async fn apply(
    conn: &mut PgConnection,
    event: &IncomingEvent,
    guards: &AccountGuards,
) -> sqlx::Result<HandlerOutcome> {
    if guards.reauth_is_newer_than(event.received_at) {
        return Ok(HandlerOutcome::Stale);
    }
    accounts::complete_reauth(conn, event.account(), event.received_at).await?;
    Ok(HandlerOutcome::Applied)
}
