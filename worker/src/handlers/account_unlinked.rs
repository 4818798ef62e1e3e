//! `mono.events.account_unlinked`: the account is gone. Mark it, and clear its re-auth state unless
//! a later event already decided that state.

use super::HandlerOutcome;
use crate::account::AccountState;
use crate::event::IncomingEvent;

pub fn apply(account: &mut AccountState, event: &IncomingEvent) -> HandlerOutcome {
    // Unlinking is never lost to reordering. An unlinked account never needs a re-auth, whatever
    // was decided since: a `reauthorisation_required` received after the unlink is ignored, so one
    // applied before this late unlink is undone too. The guard still only moves forward.
    account.unlinked_at = Some(account.unlinked_at.map_or(event.received_at, |at| at.min(event.received_at)));
    account.reauth_required = false;
    account.clear_token();
    account.advance_reauth_guard(event.received_at);
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

    #[test]
    fn a_late_unlink_undoes_a_reauth_received_after_it() {
        let now = Utc::now();
        let mut account = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("t".into())),
            reauth_state_received_at: Some(now),
            ..AccountState::new("a1")
        };
        let late = event_at(
            "mono.events.account_unlinked",
            now - chrono::Duration::seconds(5),
            serde_json::json!({}),
        );
        assert_eq!(apply(&mut account, &late), HandlerOutcome::Applied);
        assert!(!account.reauth_required, "an unlinked account never needs a re-auth");
        assert_eq!(account.reauth_token, None);
        assert_eq!(account.reauth_state_received_at, Some(now), "the guard never moves backwards");
    }
}
