//! `mono.events.reauthorisation_required`: Mono lost access to the account. Store a fresh re-auth
//! token and flag the account, so the app sends the customer through Connect in re-auth mode.

use sqlx::PgConnection;

use super::HandlerOutcome;
use crate::db::accounts::{self, AccountGuards};
use crate::event::IncomingEvent;
use crate::mono::ReauthToken;

pub async fn apply(
    conn: &mut PgConnection,
    event: &IncomingEvent,
    guards: &AccountGuards,
    token: Option<&ReauthToken>,
) -> sqlx::Result<HandlerOutcome> {
    // A late copy must never re-flag an account that was re-authorised after it was received.
    if guards.reauth_is_newer_than(event.received_at) {
        return Ok(HandlerOutcome::Stale);
    }
    if guards
        .unlinked_at
        .is_some_and(|unlinked| unlinked <= event.received_at)
    {
        return Ok(HandlerOutcome::Ignored("account is unlinked"));
    }
    let Some(token) = token else {
        return Ok(HandlerOutcome::NeedsToken);
    };
    accounts::require_reauth(
        conn,
        event.account(),
        token.expose(),
        token.issued_at,
        event.received_at,
    )
    .await?;
    Ok(HandlerOutcome::Applied)
}
