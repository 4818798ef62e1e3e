//! `mono.events.sync_failed`: Mono's automatic sync of the account failed. Record when, and the data
//! status Mono reports (`FAILED` if it reports none).

use super::HandlerOutcome;
use crate::account::AccountState;
use crate::event::IncomingEvent;

pub fn apply(account: &mut AccountState, event: &IncomingEvent) -> HandlerOutcome {
    if account.data_is_newer_than(event) {
        return HandlerOutcome::Stale;
    }
    account.data_status = Some(event.data_status.clone().unwrap_or_else(|| "FAILED".to_owned()));
    account.last_sync_failed_at = Some(event.received_at);
    account.advance_data_guard(event.received_at);
    HandlerOutcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::event_at;
    use chrono::Utc;

    #[test]
    fn it_records_the_failure_with_failed_as_the_default_status() {
        let now = Utc::now();
        let mut account = AccountState::new("a1");
        let event = event_at("mono.events.sync_failed", now, serde_json::json!({ "meta": {} }));
        assert_eq!(apply(&mut account, &event), HandlerOutcome::Applied);
        assert_eq!(account.data_status.as_deref(), Some("FAILED"));
        assert_eq!(account.last_sync_failed_at, Some(now));
    }
}
