//! Any number of workers share the queue with no coordination: three at once, on interleaved
//! events for the same accounts, end where one worker taking the events one by one would.

use chrono::{Duration, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{PATIENCE, TestWorld, body};
use shared::testing::eventually;

#[sqlx::test(migrations = "../migrations")]
async fn three_workers_on_interleaved_events_end_as_one_serial_worker_would(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let token = ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "t" }));
    Mock::given(method("POST"))
        .and(path_regex("^/accounts/.+/reauthorise$"))
        .respond_with(token)
        .mount(&world.mono)
        .await;
    for _ in 0..3 {
        world.start_worker().await;
    }
    let accounts = ["s-1", "s-2", "s-3", "s-4"];
    let start = Utc::now() - Duration::minutes(5);
    // The last re-auth event of each account decides its flag.
    let mut last_kind: HashMap<&str, &str> = HashMap::new();
    let mut published = 0;
    for round in 0..40_i64 {
        for (index, account) in accounts.iter().enumerate() {
            let kind = match (round * 7 + index as i64) % 3 {
                0 => "mono.events.reauthorisation_required",
                1 => "mono.events.account_reauthorized",
                _ => "mono.events.account_updated",
            };
            // Unique bodies, so the dedup window does not hide any.
            let mut event: serde_json::Value = serde_json::from_slice(&body(kind, account)).unwrap();
            event["data"]["round"] = round.into();
            let received = start + Duration::milliseconds(round * 100 + index as i64);
            world.publish_received_at(&serde_json::to_vec(&event).unwrap(), received).await;
            if kind != "mono.events.account_updated" {
                last_kind.insert(account, kind);
            }
            published += 1;
        }
    }

    eventually("every delivery is journaled", PATIENCE, || async {
        world.journal_count().await == published
    })
    .await;

    let statuses: Vec<String> = sqlx::query_scalar("SELECT DISTINCT status FROM webhook_events")
        .fetch_all(&world.pool)
        .await
        .unwrap();
    assert!(statuses.iter().all(|s| s == "processed" || s == "stale"), "{statuses:?}");
    for account in accounts {
        let state = world.account(account).await;
        let expected = last_kind[account] == "mono.events.reauthorisation_required";
        assert_eq!(state.reauth_required, expected, "{account}");
        assert_eq!(state.has_reauth_token, expected, "{account}: the token follows the flag");
    }
}
