//! Settings and answers as documented (issue 28): every answer, 405, 413 and 500 included, has the
//! `{"error": ...}` shape and is in the OpenAPI file; a refused link does not silence tokens; a bad
//! duration stops the api with one line.

use serde_json::{Value, json};
use sqlx::PgPool;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{MOBILE_KEY, Seed, TestApp, json, mono_issues, spawn_app, spawn_app_with};
use crate::reauth_link::ask_link;

/// The responses the OpenAPI file documents for `method` on `path`.
fn documented(path: &str, method: &str) -> Value {
    let spec: Value = serde_json::from_str(api::routes::OPENAPI).unwrap();
    spec["paths"][path][method]["responses"].clone()
}

/// The answer's body is `{"error": <code>}` (JSON, maybe with `detail`), and its status is
/// documented for the operation, or in `components.responses` for 405.
async fn assert_documented_error(answer: reqwest::Response, path: &str, method: &str, code: &str) {
    let status = answer.status().as_u16().to_string();
    let content_type = answer.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/json"), "{method} {path} {status}");
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"], code, "{method} {path} {status}: {body}");
    let spec: Value = serde_json::from_str(api::routes::OPENAPI).unwrap();
    let in_spec = documented(path, method).get(&status).is_some()
        || (status == "405" && spec["components"]["responses"]["MethodNotAllowed"].is_object());
    assert!(in_spec, "{method} {path} answered an undocumented {status}");
}

#[sqlx::test(migrations = "../migrations")]
async fn another_method_on_a_known_path_is_405_in_the_error_shape_with_allow(pool: PgPool) {
    let mono = MockServer::start().await;
    let app = spawn_app(pool, &mono).await;

    let answer =
        app.http.delete(format!("{}/v1/accounts", app.address)).bearer_auth(MOBILE_KEY).send().await.unwrap();

    assert_eq!(answer.status().as_u16(), 405);
    assert_eq!(answer.headers()["allow"], "GET");
    assert_documented_error(answer, "/v1/accounts", "delete", "method_not_allowed").await;
}

async fn post_link_body(app: &TestApp, bytes: usize) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/accounts/acct-1/reauth-link", app.address))
        .bearer_auth(MOBILE_KEY)
        .header("content-type", "application/json")
        .body(" ".repeat(bytes))
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_link_body_over_the_limit_is_413_in_the_error_shape(pool: PgPool) {
    let mono = MockServer::start().await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app(pool, &mono).await;

    for bytes in [5_000, 300_000] {
        let answer = post_link_body(&app, bytes).await;
        assert_eq!(answer.status().as_u16(), 413, "{bytes} bytes");
        assert_documented_error(answer, "/v1/accounts/{id}/reauth-link", "post", "payload_too_large").await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_error_in_our_own_sql_is_500_internal_and_documented(pool: PgPool) {
    let mono = MockServer::start().await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app(pool.clone(), &mono).await;
    // A schema the api's statements no longer fit (SQLSTATE 42703): our bug, not an outage.
    sqlx::query("ALTER TABLE accounts RENAME COLUMN data_status TO data_status_gone")
        .execute(&pool)
        .await
        .unwrap();

    let answer = app.get("/v1/accounts/acct-1").await;

    assert_eq!(answer.status().as_u16(), 500);
    assert_documented_error(answer, "/v1/accounts/{id}", "get", "internal").await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_refused_link_does_not_silence_token_requests_for_the_account(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v2/accounts/initiate"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({ "message": "redirect_url is not allowed" })),
        )
        .expect(1)
        .mount(&mono)
        .await;
    mono_issues("acct-1", "fresh-token", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &[]).await;

    assert_eq!(ask_link(&app, "acct-1", None).await.status().as_u16(), 422);
    assert_eq!(ask_link(&app, "acct-1", None).await.status().as_u16(), 422, "remembered for links");

    let token = app.reauth_token("acct-1").await;

    assert_eq!(token.status().as_u16(), 200, "a refused link says nothing of tokens");
    assert_eq!(json(token).await["token"], "fresh-token");
}
