//! The re-auth story driven through a running system, shared by the system tests.

use std::time::Duration;

use harness::bodies;
use harness::system::System;

pub const ACCOUNT: &str = "5fbcde8f8699984153e65537";

/// The delivery ids and the token of one re-auth story.
pub struct Story {
    pub ids: Vec<String>,
    pub token: String,
}

/// Posts reauthorisation_required, account_reauthorized and account_updated for `ACCOUNT`, waiting
/// for each to be applied; returns the delivery ids and the token Mono issued on the way.
pub async fn play(system: &System) -> Story {
    let mut ids = Vec::new();
    let (status, id) = system.post(&bodies::reauthorisation_required(ACCOUNT)).await.unwrap();
    assert_eq!(status, 200);
    ids.push(id.unwrap());
    let flagged = "SELECT count(*) FROM accounts WHERE reauth_required AND reauth_token IS NOT NULL";
    assert_eq!(system.wait_for_count(flagged, 1, Duration::from_secs(20)).await.unwrap(), 1, "never flagged");
    let token: String =
        sqlx::query_scalar("SELECT reauth_token FROM accounts").fetch_one(&system.pool).await.unwrap();

    let reauthorized = serde_json::json!({ "event": "mono.events.account_reauthorized", "data": { "account": { "_id": ACCOUNT } } });
    let (status, id) = system.post(&serde_json::to_vec(&reauthorized).unwrap()).await.unwrap();
    assert_eq!(status, 200);
    ids.push(id.unwrap());
    let (status, id) = system.post(&bodies::account_updated(ACCOUNT, 1, 1024)).await.unwrap();
    assert_eq!(status, 200);
    ids.push(id.unwrap());
    let settled = "SELECT count(*) FROM webhook_events WHERE status = 'processed'";
    assert_eq!(
        system.wait_for_count(settled, 3, Duration::from_secs(20)).await.unwrap(),
        3,
        "story not settled"
    );
    let cleared = "SELECT count(*) FROM accounts WHERE NOT reauth_required AND reauth_token IS NULL";
    assert_eq!(system.wait_for_count(cleared, 1, Duration::from_secs(5)).await.unwrap(), 1);
    Story { ids, token }
}
