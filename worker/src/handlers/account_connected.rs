//! `mono.events.account_connected`: a customer linked the account. The row exists from here on.

use sqlx::PgConnection;

use super::HandlerOutcome;
use crate::db::accounts;
use crate::event::IncomingEvent;

pub async fn apply(conn: &mut PgConnection, event: &IncomingEvent) -> sqlx::Result<HandlerOutcome> {
    // Idempotent in any order: the earliest connection time and any known customer id win.
    accounts::record_connection(conn, event.account(), event.customer_id(), event.received_at).await?;
    Ok(HandlerOutcome::Applied)
}
