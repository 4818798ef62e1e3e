//! `mono.events.account_updated`: Mono synced the account. Record its data status and snapshot.
//!
//! It does not touch the re-auth flag: an update received after a `reauthorisation_required` may come
//! from a sync that finished before access was lost, and must not hide the need to re-authorise.
//! Only `account_reauthorized` clears the flag.

use sqlx::PgConnection;

use super::HandlerOutcome;
use crate::db::accounts::{self, AccountGuards};
use crate::event::IncomingEvent;

pub async fn apply(
    conn: &mut PgConnection,
    event: &IncomingEvent,
    guards: &AccountGuards,
) -> sqlx::Result<HandlerOutcome> {
    if guards.data_is_newer_than(event.received_at) {
        return Ok(HandlerOutcome::Stale);
    }
    accounts::record_data(
        conn,
        event.account(),
        event.data_status(),
        event.account_snapshot(),
        event.received_at,
    )
    .await?;
    Ok(HandlerOutcome::Applied)
}
