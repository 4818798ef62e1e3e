//! `mono.events.account_updated`: Mono synced the account. Record its data status and snapshot.
//!
//! It does not touch the re-auth flag: an update received after a `reauthorisation_required` may come
//! from a sync that finished before access was lost, and must not hide the need to re-authorise.
//! Only `account_reauthorized` clears the flag.

use super::HandlerOutcome;
use crate::account::AccountState;
use crate::event::IncomingEvent;

pub fn apply(account: &mut AccountState, event: &IncomingEvent) -> HandlerOutcome {
    if account.data_is_newer_than(event) {
        return HandlerOutcome::Stale;
    }
    if let Some(status) = &event.data_status {
        account.data_status = Some(status.clone());
    }
    if event.has_account_snapshot && event.record.payload.is_some() {
        account.snapshot_body.clone_from(&event.record.payload);
    }
    account.data_updated_at = Some(event.received_at);
    account.advance_data_guard(event.received_at);
    HandlerOutcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::event_at;
    use chrono::{Duration, Utc};

    const NAME: &str = "mono.events.account_updated";

    #[test]
    fn it_records_status_snapshot_and_time_but_not_the_flag() {
        let now = Utc::now();
        let mut account = AccountState { reauth_required: true, ..AccountState::new("a1") };
        let event = event_at(NAME, now, serde_json::json!({ "meta": { "data_status": "AVAILABLE" } }));
        assert_eq!(apply(&mut account, &event), HandlerOutcome::Applied);
        assert_eq!(account.data_status.as_deref(), Some("AVAILABLE"));
        assert_eq!(account.data_updated_at, Some(now));
        assert_eq!(account.snapshot_body, event.record.payload);
        assert!(account.reauth_required, "an update never clears the re-auth flag");
    }

    #[test]
    fn a_late_update_is_stale() {
        let now = Utc::now();
        let mut account = AccountState {
            data_state_received_at: Some(now),
            data_status: Some("AVAILABLE".into()),
            ..AccountState::new("a1")
        };
        let late = event_at(
            NAME,
            now - Duration::seconds(1),
            serde_json::json!({ "meta": { "data_status": "PROCESSING" } }),
        );
        assert_eq!(apply(&mut account, &late), HandlerOutcome::Stale);
        assert_eq!(account.data_status.as_deref(), Some("AVAILABLE"));
    }
}
