//! Authentication, one account's state, and pages of accounts.

use sqlx::PgPool;
use std::collections::BTreeSet;
use wiremock::MockServer;

use crate::helpers::{MOBILE_KEY, Seed, WEB_KEY, json, spawn_app};

#[sqlx::test(migrations = "../migrations")]
async fn every_route_but_health_needs_a_configured_key(pool: PgPool) {
    let mono = MockServer::start().await;
    let app = spawn_app(pool, &mono).await;

    for path in ["/v1/accounts", "/v1/accounts/acct-1", "/openapi.json"] {
        for key in [None, Some("wrong-key-0123456789"), Some("")] {
            let response = app.get_with(path, key).await;
            assert_eq!(response.status().as_u16(), 401, "{path} with {key:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            assert_eq!(json(response).await, serde_json::json!({ "error": "unauthorized" }));
        }
    }
    let post =
        app.http.post(format!("{}/v1/accounts/acct-1/reauth-token", app.address)).send().await.unwrap();
    assert_eq!(post.status().as_u16(), 401);
    // Both keys of a rotation work.
    for key in [MOBILE_KEY, WEB_KEY] {
        assert_eq!(app.get_with("/v1/accounts", Some(key)).await.status().as_u16(), 200);
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(app.get_with(path, None).await.status().as_u16(), 200, "{path}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_account_is_shown_without_its_token_and_a_missing_one_is_404(pool: PgPool) {
    let mono = MockServer::start().await;
    Seed::flagged("acct-1").with_token("secret-token-value", chrono::Utc::now()).insert(&pool).await;
    let app = spawn_app(pool, &mono).await;

    let response = app.get("/v1/accounts/acct-1").await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let text = response.text().await.unwrap();
    assert!(!text.contains("secret-token-value"), "{text}");
    let account: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fields: BTreeSet<&str> = account.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "id",
            "reauth_required",
            "reauth_token_expires_at",
            "reauthorized_at",
            "data_status",
            "data_updated_at",
            "connected_at",
            "unlinked_at",
            "updated_at"
        ])
    );
    assert_eq!(account["reauth_required"], true);

    let missing = app.get("/v1/accounts/nope").await;
    assert_eq!(missing.status().as_u16(), 404);
    assert_eq!(json(missing).await, serde_json::json!({ "error": "not_found" }));
}

async fn page(app: &crate::helpers::TestApp, query: &str) -> (Vec<String>, Option<String>) {
    let body = json(app.get(&format!("/v1/accounts?{query}")).await).await;
    let ids =
        body["accounts"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap().to_owned()).collect();
    (ids, body["next"].as_str().map(str::to_owned))
}

#[sqlx::test(migrations = "../migrations")]
async fn pages_follow_each_other_in_id_order_and_stay_stable_while_rows_change(pool: PgPool) {
    let mono = MockServer::start().await;
    for n in 0..10 {
        let id = format!("acct-{n:02}");
        // acct-04 and acct-09 need nothing.
        Seed { reauth_required: n % 5 != 4, ..Seed::flagged(&id) }.insert(&pool).await;
    }
    let app = spawn_app(pool.clone(), &mono).await;

    let (first, next) = page(&app, "reauth_required=true&limit=3").await;
    assert_eq!(first, ["acct-00", "acct-01", "acct-02"]);
    assert_eq!(next.as_deref(), Some("acct-02"));
    // Meanwhile: a new flagged account before the cursor, one after it, one cleared after it.
    Seed::flagged("acct-00a").insert(&pool).await;
    Seed::flagged("acct-05a").insert(&pool).await;
    sqlx::query("UPDATE accounts SET reauth_required = false WHERE id = 'acct-06'")
        .execute(&pool)
        .await
        .unwrap();

    let (second, next) = page(&app, "reauth_required=true&limit=3&after=acct-02").await;
    assert_eq!(second, ["acct-03", "acct-05", "acct-05a"], "nothing repeated, nothing that stayed skipped");
    let (third, last) = page(&app, &format!("reauth_required=true&limit=3&after={}", next.unwrap())).await;
    assert_eq!(third, ["acct-07", "acct-08"]);
    assert_eq!(last, None, "the last page says so");

    let (all, _) = page(&app, "limit=1000").await;
    assert_eq!(all.len(), 12);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_limit_out_of_range_or_a_bad_parameter_is_400(pool: PgPool) {
    let mono = MockServer::start().await;
    let app = spawn_app(pool, &mono).await;

    let long_cursor = format!("after={}", "0".repeat(129));
    for query in ["limit=0", "limit=1001", "limit=ten", "reauth_required=maybe", &long_cursor] {
        let response = app.get(&format!("/v1/accounts?{query}")).await;
        assert_eq!(response.status().as_u16(), 400, "{query}");
        assert_eq!(json(response).await["error"], "invalid_query", "{query}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_cursor_holding_a_character_no_account_id_may_hold_is_400_not_500(pool: PgPool) {
    let mono = MockServer::start().await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app(pool, &mono).await;

    // NUL (which PostgreSQL refuses in text), a newline, DEL, a C1 control, only blanks.
    for cursor in ["%00", "acct%00-1", "acct%0A", "%7F", "%C2%85", "%20%20"] {
        let response = app.get(&format!("/v1/accounts?after={cursor}")).await;
        assert_eq!(response.status().as_u16(), 400, "{cursor}");
        assert_eq!(json(response).await["error"], "invalid_query", "{cursor}");
    }
    // An empty cursor is the first page, as it was.
    let (ids, _) = page(&app, "after=").await;
    assert_eq!(ids, ["acct-1"]);
}
