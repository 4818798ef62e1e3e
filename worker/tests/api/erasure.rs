//! `worker account erase`: an account's personal data goes on request, the audit keeps ids, kinds,
//! statuses and times, and who asked and why is recorded.

use sqlx::PgPool;

use crate::helpers::{TestWorld, body};
use crate::personal_data::{account_updated_with_personal_data, personal_values, tables_holding};

const ERASED: &str = "6631279bdedfbd0a1c2e0001";

#[sqlx::test(migrations = "../migrations")]
async fn erase_removes_token_snapshot_and_journal_bodies_and_records_who_and_why(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ERASED, "token-of-the-erased").await;
    world.mono_refuses("65f0c1aa0b").await;
    // Full bodies, so that the journal holds personal data for the erasure to remove.
    world.start_worker_with(&["--journal-payload", "full"]).await;
    let updated = world.publish(&account_updated_with_personal_data()).await;
    let reauth = world.publish(&body("mono.events.reauthorisation_required", ERASED)).await;
    world.settled(&updated).await;
    world.settled(&reauth).await;
    assert_eq!(world.stored_token(ERASED).await.as_deref(), Some("token-of-the-erased"));
    world.stop_workers().await;

    let output = world
        .run_cli(
            &["account", "erase", ERASED, "--reason-note", "customer request (ticket 881)", "--json"],
            "",
        )
        .await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["account_id"], ERASED);
    assert_eq!(
        printed["removed"],
        serde_json::json!({"reauth_token": true, "account_snapshot": true, "customer_id": false,
            "journal_payloads": 2, "reauth_links": 0, "reauth_link_handouts": 0, "dead_letters": 0,
            "outbox_messages": 0})
    );
    assert!(printed.get("dead_letters_waiting").is_none(), "dead letters are erased, never left waiting");
    for value in personal_values() {
        assert_eq!(tables_holding(&world.pool, &value).await, [], "{value} survived the erasure");
    }
    assert_eq!(tables_holding(&world.pool, "token-of-the-erased").await, []);
    // The audit keeps what happened, without the bodies.
    let kept: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT event, status, payload IS NULL FROM webhook_events WHERE account_id = $1 ORDER BY received_at",
    )
    .bind(ERASED)
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert_eq!(
        kept,
        [
            ("mono.events.account_updated".to_owned(), "processed".to_owned(), true),
            ("mono.events.reauthorisation_required".to_owned(), "processed".to_owned(), true),
        ]
    );
    let account = world.account(ERASED).await;
    assert!(!account.has_reauth_token && account.reauth_required);
    let recorded: (String, String, i64) =
        sqlx::query_as("SELECT actor, reason, id FROM account_erasures WHERE account_id = $1")
            .bind(ERASED)
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(
        recorded,
        (
            "ops-test".to_owned(),
            "customer request (ticket 881)".to_owned(),
            printed["erasure_id"].as_i64().unwrap()
        )
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn erase_prints_what_it_removed_including_the_accounts_dead_letters(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let account = "65f0c1aa0c";
    world.mono_refuses(account).await;
    world.start_worker().await;
    let dead = world.publish(&body("mono.events.reauthorisation_required", account)).await;
    assert_eq!(world.settled(&dead).await.status, "dead");

    let output = world.run_cli(&["account", "erase", account, "--reason-note", "closed"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "erased account {account}: the bodies of its journal rows (1), its dead letters (1)"
        )),
        "{text}"
    );
    assert!(text.contains("by ops-test: closed"), "{text}");
    assert_eq!(world.dead_letter_count().await, 0);
    assert_eq!(world.journal(&dead).await.unwrap().status, "dead", "the audit keeps the journal row");
}

#[sqlx::test(migrations = "../migrations")]
async fn erasing_an_unknown_account_fails_and_an_erasure_without_a_reason_is_a_usage_error(pool: PgPool) {
    let world = TestWorld::new(pool).await;

    let unknown = world.run_cli(&["account", "erase", "nobody", "--reason-note", "request"], "").await;
    let no_reason = world.run_cli(&["account", "erase", "nobody", "--reason-note", " "], "").await;

    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no account nobody"));
    assert_eq!(no_reason.status.code(), Some(2));
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM account_erasures").fetch_one(&world.pool).await.unwrap();
    assert_eq!(recorded, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn erase_removes_the_accounts_reauth_links_and_says_so(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    // What the api writes when it hands out a hosted re-auth link (one made, handed out twice),
    // and another account's link, which stays.
    for (reference, account) in [("ref-erased", ERASED), ("ref-other", "65f0c1aa0d")] {
        sqlx::query(
            "INSERT INTO reauth_links (ref, account_id, url, created_at, key_label)
             VALUES ($1, $2, 'https://connect.mono.co/link-' || $1, now(), 'app')",
        )
        .bind(reference)
        .bind(account)
        .execute(&world.pool)
        .await
        .unwrap();
    }
    for source in ["fresh", "reused"] {
        sqlx::query(
            "INSERT INTO reauth_link_handouts (ref, account_id, key_label, source) VALUES ('ref-erased', $1, 'app', $2)",
        )
        .bind(ERASED)
        .bind(source)
        .execute(&world.pool)
        .await
        .unwrap();
    }

    let json = world.run_cli(&["account", "erase", ERASED, "--reason-note", "request", "--json"], "").await;
    let text = world.run_cli(&["account", "erase", "65f0c1aa0d", "--reason-note", "request"], "").await;

    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        (&printed["removed"]["reauth_links"], &printed["removed"]["reauth_link_handouts"]),
        (&1.into(), &2.into())
    );
    assert_eq!(tables_holding(&world.pool, "link-ref-erased").await, []);
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("erased account 65f0c1aa0d: its re-auth links (1, handed out 0 time(s))"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    assert_eq!(tables_holding(&world.pool, "link-ref-other").await, []);
}

/// A re-auth body of `account` carrying the name of [`personal_values`], made distinct by `n`.
fn reauth_with_name(account: &str, n: u32) -> Vec<u8> {
    let mut sent: serde_json::Value =
        serde_json::from_slice(&body("mono.events.reauthorisation_required", account)).unwrap();
    sent["data"]["account"]["name"] = personal_values()[0].clone().into();
    sent["data"]["account"]["n"] = n.into();
    serde_json::to_vec(&sent).unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn erasure_leaves_no_body_in_dead_letters_or_the_outbox(pool: PgPool) {
    // Old design: the erasure only counted the account's dead letters, whose bodies stayed in the queue.
    let mut world = TestWorld::new(pool).await;
    let other = "65f0c1aa0e";
    for account in [ERASED, other] {
        world.mono_refuses(account).await;
    }
    world.start_worker().await;
    for (account, n) in [(ERASED, 1), (ERASED, 2), (other, 1)] {
        let dead = world.publish(&reauth_with_name(account, n)).await;
        assert_eq!(world.settled(&dead).await.status, "dead");
    }
    world.stop_workers().await;
    // One of the two replayed with no worker running: its copy waits in the outbox, body and all.
    let replay = world.run_cli(&["dlq", "replay", "--account", ERASED, "--limit", "1"], "").await;
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let name = personal_values()[0].clone();
    assert_eq!(
        tables_holding(&world.pool, &name).await,
        [("public.dead_letters".to_owned(), 2), ("public.outbox".to_owned(), 1)]
    );

    let output = world.run_cli(&["account", "erase", ERASED, "--reason-note", "request", "--json"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (&printed["removed"]["dead_letters"], &printed["removed"]["outbox_messages"]),
        (&1.into(), &1.into())
    );
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM dead_letters WHERE account_id = $1),
                (SELECT count(*) FROM outbox WHERE account_id = $1)",
    )
    .bind(ERASED)
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0), "no dead letter or outbox row of the account remains");
    // The other account's dead letter is not the erasure's business.
    assert_eq!(tables_holding(&world.pool, &name).await, [("public.dead_letters".to_owned(), 1)]);
    assert_eq!(world.stored_dead_letters().await[0].account_id.as_deref(), Some(other));
}

#[sqlx::test(migrations = "../migrations")]
async fn an_account_known_only_by_an_unpublished_replay_copy_can_be_erased(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_refuses(ERASED).await;
    world.start_worker().await;
    let dead = world.publish(&reauth_with_name(ERASED, 1)).await;
    assert_eq!(world.settled(&dead).await.status, "dead");
    world.stop_workers().await;
    // The replay took the dead journal row; a refused re-auth made no account row: only the copy in
    // the outbox knows the account.
    let replay = world.run_cli(&["dlq", "replay", "--account", ERASED], "").await;
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    assert!(world.journal(&dead).await.is_none() && world.find_account(ERASED).await.is_none());

    let output = world.run_cli(&["account", "erase", ERASED, "--reason-note", "request", "--json"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["removed"]["outbox_messages"], 1);
    assert_eq!(world.outbox_count().await, 0);
    assert_eq!(tables_holding(&world.pool, &personal_values()[0]).await, []);
}
