//! `mono.events.reauthorisation_required`: Mono lost access to the account. Store a fresh re-auth
//! token and flag the account, so the app sends the customer through Connect in re-auth mode.

use super::HandlerOutcome;
use crate::account::{AccountState, REAUTH_TOKEN_LIFETIME, StoredToken};
use crate::event::IncomingEvent;
use crate::mono::ReauthToken;
use chrono::{DateTime, Utc};

/// Whether `token` may be stored now: one Mono issued before the account's last re-authorisation
/// may be the token the customer spent (a fetch shared with an older delivery, another worker's
/// offer), and one past its lifetime (held through a long hold) works for nobody. Either way the
/// delivery asks Mono for a fresh one.
pub fn token_usable(account: &AccountState, token: &ReauthToken, now: DateTime<Utc>) -> bool {
    account.reauthorized_at.is_none_or(|at| token.issued_at >= at)
        && token.issued_at + REAUTH_TOKEN_LIFETIME > now
}

pub fn apply(
    account: &mut AccountState,
    event: &IncomingEvent,
    token: Option<&ReauthToken>,
    now: DateTime<Utc>,
) -> HandlerOutcome {
    // A late copy must never re-flag an account that was re-authorised after it was received.
    if account.reauth_is_newer_than(event) {
        return HandlerOutcome::Stale;
    }
    if account.unlinked_at.is_some_and(|unlinked| unlinked <= event.received_at) {
        return HandlerOutcome::Ignored("account is unlinked");
    }
    let Some(token) = token else {
        return HandlerOutcome::NeedsToken;
    };
    if !token_usable(account, token, now) {
        return HandlerOutcome::NeedsToken;
    }
    account.reauth_required = true;
    // Another worker may have stored a token Mono issued after this one: the later one stays.
    let later_stored = account.reauth_token.is_some()
        && account.reauth_token_issued_at.is_some_and(|stored| stored > token.issued_at);
    if !later_stored {
        account.reauth_token = Some(StoredToken(token.expose().to_owned()));
        account.reauth_token_issued_at = Some(token.issued_at);
        account.reauth_token_expires_at = Some(token.issued_at + REAUTH_TOKEN_LIFETIME);
    }
    account.advance_reauth_guard(event.received_at);
    HandlerOutcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::event_at;
    use chrono::{Duration, Utc};

    const NAME: &str = "mono.events.reauthorisation_required";

    #[test]
    fn it_asks_for_a_token_then_flags_the_account_with_it() {
        let mut account = AccountState::new("a1");
        let event = event_at(NAME, Utc::now(), serde_json::json!({}));
        assert_eq!(apply(&mut account, &event, None, Utc::now()), HandlerOutcome::NeedsToken);
        assert_eq!(account, AccountState::new("a1"), "nothing changes without a token");

        let token = ReauthToken::for_tests("tok", Utc::now());
        assert_eq!(apply(&mut account, &event, Some(&token), Utc::now()), HandlerOutcome::Applied);
        assert!(account.reauth_required);
        assert_eq!(account.reauth_token, Some(StoredToken("tok".into())));
        assert_eq!(account.reauth_token_expires_at, Some(token.issued_at + Duration::minutes(10)));
        assert_eq!(account.reauth_state_received_at, Some(event.received_at));
    }

    #[test]
    fn a_copy_received_before_the_last_reauth_event_is_stale() {
        let now = Utc::now();
        let mut account = AccountState { reauth_state_received_at: Some(now), ..AccountState::new("a1") };
        let late = event_at(NAME, now - Duration::seconds(1), serde_json::json!({}));
        assert_eq!(apply(&mut account, &late, None, Utc::now()), HandlerOutcome::Stale);
    }

    #[test]
    fn an_unlinked_account_is_not_flagged() {
        let now = Utc::now();
        let mut account =
            AccountState { unlinked_at: Some(now - Duration::seconds(5)), ..AccountState::new("a1") };
        let event = event_at(NAME, now, serde_json::json!({}));
        assert_eq!(
            apply(&mut account, &event, None, Utc::now()),
            HandlerOutcome::Ignored("account is unlinked")
        );
    }

    #[test]
    fn a_token_never_replaces_one_issued_later() {
        let now = Utc::now();
        let mut account = AccountState {
            reauth_required: true,
            reauth_token: Some(StoredToken("later".into())),
            reauth_token_issued_at: Some(now),
            ..AccountState::new("a1")
        };
        let event = event_at(NAME, now, serde_json::json!({}));
        let earlier = ReauthToken::for_tests("earlier", now - Duration::seconds(2));
        assert_eq!(apply(&mut account, &event, Some(&earlier), Utc::now()), HandlerOutcome::Applied);
        assert_eq!(account.reauth_token, Some(StoredToken("later".into())));
        assert_eq!(account.reauth_token_issued_at, Some(now));
    }

    #[test]
    fn a_token_issued_before_the_last_reauthorisation_or_expired_is_not_stored() {
        let now = Utc::now();
        let reauthorized = now - Duration::seconds(20);
        let mut account = AccountState {
            reauthorized_at: Some(reauthorized),
            reauth_state_received_at: Some(reauthorized),
            ..AccountState::new("a1")
        };
        let event = event_at(NAME, now - Duration::seconds(5), serde_json::json!({}));
        let spent = ReauthToken::for_tests("spent", reauthorized - Duration::seconds(1));
        assert_eq!(apply(&mut account, &event, Some(&spent), now), HandlerOutcome::NeedsToken);
        let expired = ReauthToken::for_tests("expired", now - Duration::minutes(10));
        assert_eq!(apply(&mut account, &event, Some(&expired), now), HandlerOutcome::NeedsToken);
        assert!(!account.changed && account.reauth_token.is_none(), "nothing changes for either");

        let fresh = ReauthToken::for_tests("fresh", reauthorized);
        assert_eq!(apply(&mut account, &event, Some(&fresh), now), HandlerOutcome::Applied);
        assert_eq!(account.reauth_token, Some(StoredToken("fresh".into())));
    }

    #[test]
    fn a_forced_replay_never_moves_the_guard_backwards() {
        let now = Utc::now();
        let mut account = AccountState { reauth_state_received_at: Some(now), ..AccountState::new("a1") };
        let mut old = event_at(NAME, now - Duration::hours(1), serde_json::json!({}));
        old.forced = true;
        let token = ReauthToken::for_tests("tok", now);
        assert_eq!(apply(&mut account, &old, Some(&token), Utc::now()), HandlerOutcome::Applied);
        assert_eq!(account.reauth_state_received_at, Some(now), "the guard keeps the later time");
    }
}
