//! Deciding a batch of deliveries, in memory, against the state loaded (and locked) for it.
//!
//! The decision is what one worker taking the deliveries one by one, in order, would do: a delivery
//! id already journaled is a redelivery; a copy of the same body within the dedup window is a
//! duplicate, unless another event for the account was applied between the two copies (in receive
//! order: then the body came again for a new reason, e.g. MFA failing again after a re-auth); a copy
//! earlier in the same batch counts. Otherwise the event's handler runs against the account as the
//! earlier events of the batch left it. Nothing here touches the database.

use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

use crate::account::AccountState;
use crate::db::events::EventStatus;
use crate::event::IncomingEvent;
use crate::handlers::{self, HandlerOutcome};
use crate::mono::ReauthToken;

/// One delivery of a batch, with the token fetched for it if any.
#[derive(Clone, Copy)]
pub struct Candidate<'a> {
    pub event: &'a IncomingEvent,
    pub token: Option<&'a ReauthToken>,
}

/// What the database knows about a batch, loaded under the accounts' row locks.
#[derive(Debug, Default)]
pub struct BatchState {
    /// The batch's accounts (new ones included, as empty rows).
    pub accounts: HashMap<String, AccountState>,
    /// The same accounts as loaded, before any event of the batch (what a notification compares).
    pub loaded: HashMap<String, AccountState>,
    /// Which of them this transaction created.
    pub created: HashSet<String>,
    /// Delivery ids of the batch that are journaled already.
    pub settled: HashSet<Uuid>,
    /// Journaled, not dead, deliveries with the same bodies as the batch's: body digest → (id, received).
    pub bodies: HashMap<String, Vec<(Uuid, DateTime<Utc>)>>,
    /// Events in effect on the accounts whose bodies have copies, around those copies: account →
    /// (received, body digest). A duplicate counts: it restated its copy's effect at its own time.
    pub applied: HashMap<String, Vec<(DateTime<Utc>, String)>>,
    /// When the batch is decided: a token past its lifetime by then is not stored.
    pub now: DateTime<Utc>,
}

impl BatchState {
    /// Whether an event other than `body` was in effect on `account` between `a` and `b`, both
    /// included: an event received in the same millisecond as a copy may come before or after it
    /// (two ingests stamp their own clocks), so the copy cannot be said to restate what the account
    /// shows.
    fn applied_between(&self, account: &str, body: &str, a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
        let (from, to) = if a <= b { (a, b) } else { (b, a) };
        self.applied
            .get(account)
            .is_some_and(|events| events.iter().any(|(at, other)| *at >= from && *at <= to && other != body))
    }
}

/// What to do with one delivery of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Journal with this status (its effect, if any, is in `BatchState::accounts`).
    Journal { status: EventStatus, note: Option<&'static str> },
    /// This delivery id was settled before: ack, no effect.
    AlreadySettled,
    /// Needs a re-auth token first; nothing was changed for it.
    NeedsToken,
}

/// Decides every candidate in order, changing `state` as a one-by-one worker would.
pub fn decide(state: &mut BatchState, candidates: &[Candidate<'_>], dedup_window: Duration) -> Vec<Decision> {
    let window = chrono::Duration::from_std(dedup_window).unwrap_or(chrono::Duration::MAX);
    candidates
        .iter()
        .map(|candidate| {
            let event = candidate.event;
            let id = event.record.id;
            if state.settled.contains(&id) {
                return Decision::AlreadySettled;
            }
            let received = event.received_at;
            let body = event.record.body_sha256.as_str();
            let account = event.kind.needs_account().then(|| event.account());
            let duplicate = state.bodies.get(body).is_some_and(|copies| {
                copies.iter().any(|(other, at)| {
                    *other != id
                        && (*at - received).abs() <= window
                        && !account.is_some_and(|account| state.applied_between(account, body, *at, received))
                })
            });
            let (status, note) = if duplicate {
                // The copy restates what the account already shows: its guard moves up to this copy,
                // so an event received between the two copies but decided after this one is stale,
                // as it would be in receive order.
                if let Some(account) = account.and_then(|account| state.accounts.get_mut(account)) {
                    handlers::restate(account, event);
                }
                (EventStatus::Duplicate, None)
            } else {
                let account = match event.kind.needs_account() {
                    true => state.accounts.get_mut(event.account()),
                    false => None,
                };
                match handlers::apply(account, event, candidate.token, state.now) {
                    HandlerOutcome::Applied => (EventStatus::Processed, None),
                    HandlerOutcome::Stale => (EventStatus::Stale, None),
                    HandlerOutcome::Ignored(why) => (EventStatus::Ignored, Some(why)),
                    HandlerOutcome::NeedsToken => return Decision::NeedsToken,
                }
            };
            state.settled.insert(id);
            state.bodies.entry(event.record.body_sha256.clone()).or_default().push((id, received));
            if let (EventStatus::Processed | EventStatus::Duplicate, Some(account)) = (status, account) {
                state.applied.entry(account.to_owned()).or_default().push((received, body.to_owned()));
            }
            Decision::Journal { status, note }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::event_at;
    use chrono::Duration as Span;

    const WINDOW: Duration = Duration::from_secs(600);

    fn state_with_account() -> BatchState {
        let mut state = BatchState::default();
        state.accounts.insert("a1".into(), AccountState::new("a1"));
        state
    }

    fn candidates<'a>(events: &'a [IncomingEvent], token: Option<&'a ReauthToken>) -> Vec<Candidate<'a>> {
        events.iter().map(|event| Candidate { event, token }).collect()
    }

    #[test]
    fn a_copy_later_in_the_same_batch_is_a_duplicate() {
        let now = Utc::now();
        let first = event_at("mono.events.account_updated", now, serde_json::json!({}));
        let mut copy = first.clone();
        copy.record.id = Uuid::now_v7();
        let events = [first, copy];
        let mut state = state_with_account();

        let decisions = decide(&mut state, &candidates(&events, None), WINDOW);

        assert_eq!(decisions[0], Decision::Journal { status: EventStatus::Processed, note: None });
        assert_eq!(decisions[1], Decision::Journal { status: EventStatus::Duplicate, note: None });
    }

    #[test]
    fn the_same_body_after_another_applied_event_is_new() {
        let t0 = Utc::now();
        let required = event_at("mono.events.reauthorisation_required", t0, serde_json::json!({}));
        let reauthorized =
            event_at("mono.events.account_reauthorized", t0 + Span::minutes(3), serde_json::json!({}));
        let mut again =
            event_at("mono.events.reauthorisation_required", t0 + Span::minutes(6), serde_json::json!({}));
        again.record.body_sha256.clone_from(&required.record.body_sha256);
        // Issued after the re-authorisation: one issued before it would be spent.
        let token = ReauthToken::for_tests("tok", t0 + Span::minutes(6));
        let events = [required, reauthorized, again];
        let mut state = state_with_account();

        let decisions = decide(&mut state, &candidates(&events, Some(&token)), WINDOW);

        assert!(
            decisions.iter().all(|d| *d == Decision::Journal { status: EventStatus::Processed, note: None }),
            "{decisions:?}"
        );
        assert!(state.accounts["a1"].reauth_required, "flagged again");
    }

    #[test]
    fn a_journaled_copy_with_another_event_applied_between_is_not_a_duplicate() {
        let t0 = Utc::now();
        let copy =
            event_at("mono.events.reauthorisation_required", t0 + Span::minutes(6), serde_json::json!({}));
        let mut state = state_with_account();
        state.bodies.insert(copy.record.body_sha256.clone(), vec![(Uuid::now_v7(), t0)]);
        state.applied.insert(
            "a1".into(),
            vec![(t0, copy.record.body_sha256.clone()), (t0 + Span::minutes(3), "other".into())],
        );
        let token = ReauthToken::for_tests("tok", t0);
        let events = [copy];

        let decisions = decide(&mut state, &candidates(&events, Some(&token)), WINDOW);

        assert_eq!(decisions[0], Decision::Journal { status: EventStatus::Processed, note: None });
    }

    #[test]
    fn an_event_received_in_the_same_millisecond_as_the_copy_is_between() {
        let t0 = Utc::now();
        let reauthorized = event_at("mono.events.account_reauthorized", t0, serde_json::json!({}));
        let mut copy =
            event_at("mono.events.account_reauthorized", t0 + Span::seconds(1), serde_json::json!({}));
        copy.record.body_sha256.clone_from(&reauthorized.record.body_sha256);
        let mut state = state_with_account();
        state.bodies.insert(copy.record.body_sha256.clone(), vec![(reauthorized.record.id, t0)]);
        // A re-auth stamped in the same millisecond as the first copy was applied after it.
        state
            .applied
            .insert("a1".into(), vec![(t0, copy.record.body_sha256.clone()), (t0, "required".into())]);
        let events = [copy];

        let decisions = decide(&mut state, &candidates(&events, None), WINDOW);

        assert_eq!(decisions[0], Decision::Journal { status: EventStatus::Processed, note: None });
        assert!(!state.accounts["a1"].reauth_required);
    }

    #[test]
    fn the_same_id_twice_has_one_effect() {
        let event = event_at("mono.events.account_updated", Utc::now(), serde_json::json!({}));
        let events = [event.clone(), event];
        let mut state = state_with_account();

        let decisions = decide(&mut state, &candidates(&events, None), WINDOW);

        assert_eq!(decisions[1], Decision::AlreadySettled);
    }

    #[test]
    fn a_journaled_copy_outside_the_window_is_not_a_duplicate() {
        let now = Utc::now();
        let event = event_at("mono.events.account_updated", now, serde_json::json!({}));
        let mut state = state_with_account();
        state
            .bodies
            .insert(event.record.body_sha256.clone(), vec![(Uuid::now_v7(), now - Span::seconds(601))]);
        let events = [event];

        let decisions = decide(&mut state, &candidates(&events, None), WINDOW);

        assert_eq!(decisions[0], Decision::Journal { status: EventStatus::Processed, note: None });
    }

    #[test]
    fn events_for_one_account_apply_in_order_within_a_batch() {
        let now = Utc::now();
        let required = event_at("mono.events.reauthorisation_required", now, serde_json::json!({}));
        let reauthorized =
            event_at("mono.events.account_reauthorized", now + Span::seconds(1), serde_json::json!({}));
        let token = ReauthToken::for_tests("tok", now);
        let events = [required, reauthorized];
        let mut state = state_with_account();

        let decisions = decide(&mut state, &candidates(&events, Some(&token)), WINDOW);

        assert!(
            decisions.iter().all(|d| *d == Decision::Journal { status: EventStatus::Processed, note: None })
        );
        let account = &state.accounts["a1"];
        assert!(!account.reauth_required, "the later re-authorisation wins");
        assert_eq!(account.reauth_token, None);
    }

    #[test]
    fn a_reauth_without_a_token_changes_nothing_and_is_not_journaled() {
        let event = event_at("mono.events.reauthorisation_required", Utc::now(), serde_json::json!({}));
        let events = [event];
        let mut state = state_with_account();

        let decisions = decide(&mut state, &candidates(&events, None), WINDOW);

        assert_eq!(decisions[0], Decision::NeedsToken);
        assert!(state.settled.is_empty() && state.bodies.is_empty());
        assert!(!state.accounts["a1"].changed);
    }

    #[test]
    fn events_without_an_account_are_ignored_with_a_note() {
        let event = event_at("mono.events.new_transaction", Utc::now(), serde_json::json!({}));
        let events = [event];
        let mut state = BatchState::default();

        let decisions = decide(&mut state, &candidates(&events, None), WINDOW);

        assert_eq!(
            decisions[0],
            Decision::Journal { status: EventStatus::Ignored, note: Some("event not handled by monohook") }
        );
    }
}
