//! `mono.events.account_reauthorized`: the customer re-authorised. Clear the flag and the spent token.

use super::HandlerOutcome;
use crate::account::AccountState;
use crate::event::IncomingEvent;

pub fn apply(account: &mut AccountState, event: &IncomingEvent) -> HandlerOutcome {
    if account.reauth_is_newer_than(event) {
        return HandlerOutcome::Stale;
    }
    account.reauth_required = false;
    account.clear_token();
    account.reauthorized_at = Some(event.received_at);
    account.advance_reauth_guard(event.received_at);
    HandlerOutcome::Applied
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
}
