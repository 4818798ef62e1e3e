//! Personal data in PostgreSQL: what the journal and the account row keep of a body
//! (`JOURNAL_PAYLOAD`), checked by searching every table of the database.

use sqlx::PgPool;

use crate::helpers::{TestWorld, body};
use shared::testing::fixture;

/// The personal fields of an `account_updated`, with values no timestamp or id could contain.
const NAME: &str = "Chinwe Adaeze Okafor";
const ACCOUNT_NUMBER: &str = "0987612345";
const BALANCE: i64 = 731_904_455;
const BVN: &str = "22190876543";
const UPDATED_ACCOUNT: &str = "6631279bdedfbd0a1c2e0001";

/// Mono's `account_updated` fixture, carrying the personal values above.
pub fn account_updated_with_personal_data() -> Vec<u8> {
    let mut body: serde_json::Value = serde_json::from_slice(&fixture("account_updated.json")).unwrap();
    let account = &mut body["data"]["account"];
    account["name"] = NAME.into();
    account["accountNumber"] = ACCOUNT_NUMBER.into();
    account["balance"] = BALANCE.into();
    account["bvn"] = BVN.into();
    serde_json::to_vec(&body).unwrap()
}

/// The personal values of [`account_updated_with_personal_data`] as they would appear in text.
pub fn personal_values() -> [String; 4] {
    [NAME.to_owned(), ACCOUNT_NUMBER.to_owned(), BALANCE.to_string(), BVN.to_owned()]
}

/// Every table of the database (any schema but PostgreSQL's own) holding `needle` anywhere in a
/// row, as text or in a `bytea` column (a dead letter's or an outbox row's body, which a row's text
/// shows in hex), each with how many rows. A partitioned table is searched through its parent (the
/// journal is partitioned by month), so each row is counted once, under the table's name.
pub async fn tables_holding(pool: &PgPool, needle: &str) -> Vec<(String, i64)> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
         FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t.ends_with(".webhook_events")), "no journal among {tables:?}");
    let mut holding = Vec::new();
    for table in tables {
        let rows: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} AS r
                 WHERE strpos(r::text, $1) > 0 OR strpos(r::text, encode(convert_to($1, 'UTF8'), 'hex')) > 0"
        ))
        .bind(needle)
        .fetch_one(pool)
        .await
        .unwrap();
        if rows > 0 {
            holding.push((table, rows));
        }
    }
    holding
}

#[sqlx::test(migrations = "../migrations")]
async fn a_fresh_account_update_leaves_no_name_account_number_balance_or_bvn_in_any_table(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;

    let meta = world.publish(&account_updated_with_personal_data()).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    for value in personal_values() {
        assert_eq!(tables_holding(&world.pool, &value).await, [], "{value} is stored");
    }
    // What the worker needs is kept, and the row says what it lacks.
    let account = world.account(UPDATED_ACCOUNT).await;
    assert_eq!(account.data_status.as_deref(), Some("AVAILABLE"));
    let payload: serde_json::Value = sqlx::query_scalar("SELECT payload FROM webhook_events WHERE id = $1")
        .bind(meta.id.as_uuid())
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(payload["data"]["account"]["_id"], UPDATED_ACCOUNT);
    assert_eq!(payload["monohook_journal"]["payload"], "minimal");
    let lacks = worker::journal_payload::lacks(&payload).unwrap();
    for field in
        ["data.account.name", "data.account.accountNumber", "data.account.balance", "data.account.bvn"]
    {
        assert!(lacks.iter().any(|f| f == field), "{field} not named in {lacks:?}");
    }
    // The digest still covers the whole body as received: dedup compares it.
    let digest: String = sqlx::query_scalar("SELECT body_sha256 FROM webhook_events WHERE id = $1")
        .bind(meta.id.as_uuid())
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(digest, meta.body_sha256);
}

#[sqlx::test(migrations = "../migrations")]
async fn with_full_payloads_the_journal_and_the_snapshot_keep_the_whole_body(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker_with(&["--journal-payload", "full"]).await;

    let meta = world.publish(&account_updated_with_personal_data()).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    for value in personal_values() {
        let holding = tables_holding(&world.pool, &value).await;
        let names: Vec<&str> = holding.iter().map(|(table, _)| table.as_str()).collect();
        assert_eq!(names, ["public.accounts", "public.webhook_events"], "{value}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_dead_letter_keeps_its_whole_body_in_its_row_and_only_the_allowlist_in_the_journal(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let account = "65f0c1aa0a";
    world.mono_refuses(account).await;
    world.start_worker().await;
    let mut with_name: serde_json::Value =
        serde_json::from_slice(&body("mono.events.reauthorisation_required", account)).unwrap();
    with_name["data"]["account"]["name"] = NAME.into();
    let sent = serde_json::to_vec(&with_name).unwrap();

    let meta = world.publish(&sent).await;

    assert_eq!(world.settled(&meta).await.status, "dead");
    let dead = world.dead_letters(1).await;
    assert_eq!(dead[0].data, sent, "the dead letter keeps the body as received");
    // Only there: the journal keeps the allowlist, and nothing else holds the name (until a purge,
    // a replay or an erasure removes the row).
    assert_eq!(tables_holding(&world.pool, NAME).await, [("public.dead_letters".to_owned(), 1)]);
    let payload: serde_json::Value = sqlx::query_scalar("SELECT payload FROM webhook_events WHERE id = $1")
        .bind(meta.id.as_uuid())
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(payload["data"]["account"]["_id"], account);
    assert!(payload["data"]["account"].get("name").is_none(), "{payload}");
}
