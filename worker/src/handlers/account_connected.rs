//! `mono.events.account_connected`: a customer linked the account. The row exists from here on.

use super::HandlerOutcome;
use crate::account::AccountState;
use crate::event::IncomingEvent;

pub fn apply(account: &mut AccountState, event: &IncomingEvent) -> HandlerOutcome {
    // Idempotent in any order: the earliest connection time and any known customer id win.
    if event.customer_id.is_some() {
        account.customer_id.clone_from(&event.customer_id);
    }
    account.connected_at =
        Some(account.connected_at.map_or(event.received_at, |at| at.min(event.received_at)));
    HandlerOutcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::event_at;
    use chrono::{Duration, Utc};

    #[test]
    fn the_earliest_connection_time_wins() {
        let now = Utc::now();
        let mut account = AccountState::new("a1");
        let later = event_at("mono.events.account_connected", now, serde_json::json!({ "customer": "c1" }));
        let earlier =
            event_at("mono.events.account_connected", now - Duration::seconds(9), serde_json::json!({}));
        apply(&mut account, &later);
        apply(&mut account, &earlier);
        assert_eq!(account.connected_at, Some(now - Duration::seconds(9)));
        assert_eq!(account.customer_id.as_deref(), Some("c1"));
    }
}
