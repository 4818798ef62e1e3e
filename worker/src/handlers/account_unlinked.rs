//! `mono.events.account_unlinked`: the account is gone. Mark it, and clear its re-auth state unless
//! a later event already decided that state.

use super::HandlerOutcome;
use crate::account::AccountState;
use crate::event::IncomingEvent;

pub fn apply(account: &mut AccountState, event: &IncomingEvent) -> HandlerOutcome {
    // Unlinking is never lost to reordering: only the re-auth part obeys the ordering guard.
    account.unlinked_at = Some(account.unlinked_at.map_or(event.received_at, |at| at.min(event.received_at)));
    if !account.reauth_is_newer_than(event) {
        account.reauth_required = false;
        account.clear_token();
        account.advance_reauth_guard(event.received_at);
    }
    HandlerOutcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::StoredToken;
    use crate::handlers::test_support::event_at;
    use chrono::Utc;

    #[test]
    fn it_marks_the_account_and_clears_its_reauth_state() {
        let now = Utc::now();
        let mut account = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("t".into())),
            ..AccountState::new("a1")
        };
        let event = event_at("mono.events.account_unlinked", now, serde_json::json!({}));
        assert_eq!(apply(&mut account, &event), HandlerOutcome::Applied);
        assert_eq!(account.unlinked_at, Some(now));
        assert!(!account.reauth_required);
        assert_eq!(account.reauth_token, None);
    }
}
