//! `mono.events.account_reauthorized`: the customer re-authorised. Clear the flag and the spent token.

use super::HandlerOutcome;
use crate::account::AccountState;
use crate::event::IncomingEvent;

pub fn apply(account: &mut AccountState, event: &IncomingEvent) -> HandlerOutcome {
    if account.reauth_is_newer_than(event) {
        // A later event decides the flag, but the customer did re-authorise by this time.
        account.changed |= spend(account, event);
        return HandlerOutcome::Stale;
    }
    account.reauth_required = false;
    account.clear_token();
    account.reauthorized_at = account.reauthorized_at.max(Some(event.received_at));
    account.advance_reauth_guard(event.received_at);
    HandlerOutcome::Applied
}

/// What a re-authorisation means whatever its order, also when it is stale or a duplicate (a copy
/// of the body may be Mono's retry or a new re-authorisation: bodies carry no id, so the safe
/// reading is taken): the customer re-authorised by the time it was received, so a token issued
/// before then may be the one they spent (a copy of the loss of access decided ahead of this event,
/// as a duplicate, kept it). The token goes, a fresh one is fetched on demand, and
/// `reauthorized_at` moves up to this receive time. Whether the account changed.
pub fn spend(account: &mut AccountState, event: &IncomingEvent) -> bool {
    let spent = account.reauth_token_issued_at.is_some_and(|issued| issued < event.received_at);
    let later = account.reauthorized_at.is_none_or(|at| at < event.received_at);
    if spent {
        account.clear_token();
    }
    if later {
        account.reauthorized_at = Some(event.received_at);
    }
    spent || later
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::StoredToken;
    use crate::handlers::test_support::event_at;
    use chrono::{Duration, Utc};

    #[test]
    fn it_clears_the_flag_and_the_token() {
        let now = Utc::now();
        let mut account = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("tok".into())),
            reauth_token_issued_at: Some(now),
            reauth_state_received_at: Some(now - Duration::seconds(3)),
            ..AccountState::new("a1")
        };
        let event = event_at("mono.events.account_reauthorized", now, serde_json::json!({}));
        assert_eq!(apply(&mut account, &event), HandlerOutcome::Applied);
        assert!(!account.reauth_required);
        assert_eq!(account.reauth_token, None);
        assert_eq!(account.reauth_token_issued_at, None);
        assert_eq!(account.reauthorized_at, Some(now));
    }

    #[test]
    fn a_late_one_does_not_undo_a_newer_flag() {
        let now = Utc::now();
        let mut account = AccountState {
            reauth_required: true,
            reauth_state_received_at: Some(now),
            ..AccountState::new("a1")
        };
        let late =
            event_at("mono.events.account_reauthorized", now - Duration::seconds(1), serde_json::json!({}));
        assert_eq!(apply(&mut account, &late), HandlerOutcome::Stale);
        assert!(account.reauth_required);
    }

    #[test]
    fn a_late_one_still_spends_the_token_issued_before_it() {
        let now = Utc::now();
        let issued = now - Duration::minutes(2);
        // Required (token issued), the customer re-authorised, then a copy of the required body was
        // decided first as a duplicate: the flag stays, the spent token must not.
        let mut account = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("spent".into())),
            reauth_token_issued_at: Some(issued),
            reauth_token_expires_at: Some(issued + Duration::minutes(10)),
            reauth_state_received_at: Some(now),
            ..AccountState::new("a1")
        };
        let late =
            event_at("mono.events.account_reauthorized", now - Duration::seconds(30), serde_json::json!({}));
        assert_eq!(apply(&mut account, &late), HandlerOutcome::Stale);
        assert!(account.reauth_required, "the later loss of access still stands");
        assert_eq!(account.reauth_token, None);
        assert_eq!(account.reauthorized_at, Some(late.received_at));
        assert!(account.changed);

        // A token issued after the re-authorisation is kept.
        let fresh = now - Duration::seconds(10);
        let mut account = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("fresh".into())),
            reauth_token_issued_at: Some(fresh),
            reauth_state_received_at: Some(now),
            reauthorized_at: Some(now - Duration::seconds(30)),
            ..AccountState::new("a1")
        };
        assert_eq!(apply(&mut account, &late), HandlerOutcome::Stale);
        assert_eq!(account.reauth_token, Some(StoredToken("fresh".into())));
        assert!(!account.changed, "nothing to change");
    }
}
