//! `mono.events.sync_failed`: Mono's automatic sync of the account failed. Record when, and the data
//! status Mono reports (`FAILED` if it reports none).

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
    let status = event.data_status().unwrap_or("FAILED");
    accounts::record_sync_failure(conn, event.account(), status, event.received_at).await?;
    Ok(HandlerOutcome::Applied)
}
