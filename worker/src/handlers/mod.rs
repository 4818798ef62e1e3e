//! What each Mono event does to an account, one file per event. Handlers are pure: they change an
//! [`AccountState`] in memory and say what they did; the batch writes the result.
//!
//! A handler that needs a re-auth token it was not given answers `NeedsToken` without changing
//! anything: the token is fetched outside any transaction and the event applied again with it, so no
//! row lock is ever held across a call to Mono.

mod account_connected;
mod account_reauthorized;
mod account_unlinked;
mod account_updated;
mod reauthorisation_required;
mod sync_failed;

use crate::account::AccountState;
use crate::event::IncomingEvent;
use crate::mono::ReauthToken;
use shared::event::EventKind;

/// What a handler decided.
#[derive(Debug, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// The account changed.
    Applied,
    /// A later event already decided this state; nothing changed.
    Stale,
    /// Nothing to do for this event, with why.
    Ignored(&'static str),
    /// The effect needs a re-auth token from Mono; nothing changed.
    NeedsToken,
}

/// Runs the handler of `event`. `account` is `None` for events that are not about an account.
pub fn apply(
    account: Option<&mut AccountState>,
    event: &IncomingEvent,
    token: Option<&ReauthToken>,
    now: chrono::DateTime<chrono::Utc>,
) -> HandlerOutcome {
    let Some(account) = account else {
        return HandlerOutcome::Ignored("event not handled by monohook");
    };
    let outcome = match &event.kind {
        EventKind::ReauthorisationRequired => reauthorisation_required::apply(account, event, token, now),
        EventKind::AccountReauthorized => account_reauthorized::apply(account, event),
        EventKind::AccountUpdated => account_updated::apply(account, event),
        EventKind::AccountConnected => account_connected::apply(account, event),
        EventKind::AccountUnlinked => account_unlinked::apply(account, event),
        EventKind::SyncFailed => sync_failed::apply(account, event),
        EventKind::Other(_) => HandlerOutcome::Ignored("event not handled by monohook"),
    };
    if outcome == HandlerOutcome::Applied {
        account.changed = true;
    }
    outcome
}

/// A duplicate of an event already applied (nothing else applied between the two): the account
/// shows its effect already, so only the guard that its handler moves comes up to its receive time.
pub fn restate(account: &mut AccountState, event: &IncomingEvent) {
    let before = (account.reauth_state_received_at, account.data_state_received_at);
    match &event.kind {
        EventKind::AccountReauthorized => {
            account.changed |= account_reauthorized::spend(account, event);
            account.advance_reauth_guard(event.received_at)
        }
        EventKind::ReauthorisationRequired | EventKind::AccountUnlinked => {
            account.advance_reauth_guard(event.received_at)
        }
        EventKind::AccountUpdated | EventKind::SyncFailed => account.advance_data_guard(event.received_at),
        EventKind::AccountConnected | EventKind::Other(_) => {}
    }
    if (account.reauth_state_received_at, account.data_state_received_at) != before {
        account.changed = true;
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use chrono::{DateTime, Utc};

    use crate::event::IncomingEvent;
    use shared::delivery::{AttemptHistory, DeliveryMeta};

    /// An event of `name` for account `a1`, received at `received_at`, with `data` merged in.
    pub fn event_at(name: &str, received_at: DateTime<Utc>, data: serde_json::Value) -> IncomingEvent {
        let mut body =
            serde_json::json!({ "event": name, "data": { "account": { "_id": "a1" }, "id": "a1" } });
        if let (Some(target), Some(extra)) = (body["data"].as_object_mut(), data.as_object()) {
            target.extend(extra.clone());
        }
        let body = serde_json::to_vec(&body).unwrap();
        let mut meta = DeliveryMeta::stamp(&body);
        meta.received_at = received_at;
        IncomingEvent::parse(&body, &meta, &AttemptHistory { previous_attempts: 0, first_attempt_at: None })
            .1
            .unwrap()
    }
}
