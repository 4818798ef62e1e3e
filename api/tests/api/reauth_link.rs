//! `POST /v1/accounts/{id}/reauth-link` (issue 23): what is asked of Mono, every answer, the
//! redirect allowlist, reuse within an episode, and one call per account and redirect within a
//! process and across processes.

use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::Duration;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{MONO_KEY, Seed, TestApp, WEB_KEY, json, spawn_app_with};

const ALLOWED: &str = "https://app.example.com,https://web.example.com/reauth/done";

fn with_allowlist(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec!["--mono-reauth-redirect-urls", ALLOWED];
    args.extend_from_slice(extra);
    args
}

/// Mono creates a link for `account` (checking key and scope) after `delay_ms`, answering the way
/// its `scope: "auth"` answers look, with fields we do not read.
pub(crate) fn mono_links(account: &str, url: &str, delay_ms: u64) -> Mock {
    Mock::given(method("POST"))
        .and(path("/v2/accounts/initiate"))
        .and(header("mono-sec-key", MONO_KEY))
        .and(body_partial_json(json!({ "scope": "reauth", "account": account })))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({
                    "status": "successful",
                    "message": "Request completed successfully",
                    "timestamp": "2024-05-01T10:00:00.000Z",
                    "data": { "mono_url": url, "customer": "cus_1", "meta": {}, "is_multi": false }
                }))
                .set_delay(Duration::from_millis(delay_ms)),
        )
}

pub(crate) async fn ask_link(app: &TestApp, account: &str, body: Option<Value>) -> reqwest::Response {
    ask_link_with(app, account, body, crate::helpers::MOBILE_KEY).await
}

async fn ask_link_with(app: &TestApp, account: &str, body: Option<Value>, key: &str) -> reqwest::Response {
    let request =
        app.http.post(format!("{}/v1/accounts/{account}/reauth-link", app.address)).bearer_auth(key);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    request.send().await.unwrap()
}

async fn calls(mono: &MockServer) -> Vec<Value> {
    let requests = mono.received_requests().await.unwrap();
    requests.iter().map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null)).collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_link_is_asked_with_our_ref_and_the_default_redirect_and_recorded_with_the_callers_label(
    pool: PgPool,
) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;

    let response = ask_link_with(&app, "acct-1", None, WEB_KEY).await;

    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body = json(response).await;
    assert_eq!(body["url"], "https://link.mono.co/RI1");
    assert_eq!(body["source"], "fresh");
    let reference = body["ref"].as_str().unwrap();
    assert!(reference.starts_with("mh_"), "{reference}");
    let sent = &calls(&mono).await[0];
    assert_eq!(sent["meta"]["ref"], reference, "our ref is sent as meta.ref");
    assert_eq!(sent["redirect_url"], "https://app.example.com/", "the first allowed redirect is the default");
    let (label, redirect): (String, String) =
        sqlx::query_as("SELECT key_label, redirect_url FROM reauth_links WHERE ref = $1")
            .bind(reference)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((label.as_str(), redirect.as_str()), ("web", "https://app.example.com/"));
    let handouts: Vec<(String, String)> =
        sqlx::query_as("SELECT key_label, source FROM reauth_link_handouts WHERE ref = $1")
            .bind(reference)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(handouts, [("web".to_owned(), "fresh".to_owned())]);
}

#[sqlx::test(migrations = "../migrations")]
async fn without_an_allowlist_no_redirect_is_sent_and_none_can_be_asked_for(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &[]).await;

    let refused = ask_link(&app, "acct-1", Some(json!({ "redirect_url": "https://app.example.com/" }))).await;
    assert_eq!(refused.status().as_u16(), 400);
    assert_eq!(json(refused).await["error"], "redirect_not_allowed");

    assert_eq!(ask_link(&app, "acct-1", None).await.status().as_u16(), 200);
    assert!(calls(&mono).await[0].get("redirect_url").is_none());
}

#[sqlx::test(migrations = "../migrations")]
async fn only_allowed_redirects_reach_mono_and_look_alikes_are_400(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v2/accounts/initiate"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({ "data": { "mono_url": "https://l/x" } })),
        )
        .mount(&mono)
        .await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &with_allowlist(&["--reauth-link-reuse-secs", "0"])).await;

    for evil in [
        "https://app.example.com.evil.com/",
        "https://app.example.com@evil.com/",
        "https://app.example.com//evil.com",
        "//evil.com",
        "/\\evil.com",
        "http://app.example.com/",
        "https://app.example.com:8443/",
        "javascript:alert(1)",
        "https://web.example.com/reauth/DONE",
        "https://web.example.com/reauth/done?next=https://evil.com",
    ] {
        let response = ask_link(&app, "acct-1", Some(json!({ "redirect_url": evil }))).await;
        assert_eq!(response.status().as_u16(), 400, "{evil}");
        assert_eq!(json(response).await["error"], "redirect_not_allowed", "{evil}");
    }
    assert!(calls(&mono).await.is_empty(), "no refused redirect reached Mono");

    for asked in ["HTTPS://App.Example.COM:443/welcome?back=1", "https://web.example.com/reauth/done"] {
        let response = ask_link(&app, "acct-1", Some(json!({ "redirect_url": asked }))).await;
        assert_eq!(response.status().as_u16(), 200, "{asked}");
    }
    let sent: Vec<Value> = calls(&mono).await.into_iter().map(|c| c["redirect_url"].clone()).collect();
    assert_eq!(
        sent,
        [json!("https://app.example.com/welcome?back=1"), json!("https://web.example.com/reauth/done")]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_body_that_is_not_the_endpoints_is_400(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).expect(0).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &with_allowlist(&[])).await;

    for body in [json!({ "redirect": "https://app.example.com/" }), json!({ "redirect_url": 3 }), json!([])] {
        let response = ask_link(&app, "acct-1", Some(body.clone())).await;
        assert_eq!(response.status().as_u16(), 400, "{body}");
        assert_eq!(json(response).await["error"], "invalid_body", "{body}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_link_is_reused_within_the_window_for_the_same_redirect_only(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).up_to_n_times(1).expect(1).mount(&mono).await;
    mono_links("acct-1", "https://link.mono.co/RI2", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;

    let first = json(ask_link(&app, "acct-1", None).await).await;
    let again = json(ask_link_with(&app, "acct-1", None, WEB_KEY).await).await;
    let elsewhere = json(
        ask_link(&app, "acct-1", Some(json!({ "redirect_url": "https://web.example.com/reauth/done" })))
            .await,
    )
    .await;

    assert_eq!(again["url"], first["url"]);
    assert_eq!(again["ref"], first["ref"]);
    assert_eq!(again["created_at"], first["created_at"]);
    assert_eq!(again["source"], "reused");
    assert_eq!(elsewhere["url"], "https://link.mono.co/RI2", "another redirect needs another link");
    let handouts: Vec<(String, String)> =
        sqlx::query_as("SELECT key_label, source FROM reauth_link_handouts WHERE ref = $1 ORDER BY id")
            .bind(first["ref"].as_str())
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        handouts,
        [("mobile".to_owned(), "fresh".to_owned()), ("web".to_owned(), "reused".to_owned())]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_link_older_than_the_window_is_not_reused(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).expect(2).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;

    let first = json(ask_link(&app, "acct-1", None).await).await;
    sqlx::query("UPDATE reauth_links SET created_at = created_at - interval '301 seconds'")
        .execute(&pool)
        .await
        .unwrap();
    let second = json(ask_link(&app, "acct-1", None).await).await;

    assert_ne!(second["ref"], first["ref"]);
    assert_eq!(second["source"], "fresh");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_new_episode_never_reuses_the_old_link(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).up_to_n_times(1).mount(&mono).await;
    mono_links("acct-1", "https://link.mono.co/RI2", 0).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;
    let first = json(ask_link(&app, "acct-1", None).await).await;

    // The worker applies account_reauthorized, then a new reauthorisation_required.
    sqlx::query(
        "UPDATE accounts SET reauth_required = false, reauthorized_at = now(),
                             reauth_state_received_at = now() + interval '1 second' WHERE id = 'acct-1'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let between = ask_link(&app, "acct-1", None).await;
    assert_eq!(between.status().as_u16(), 409);
    sqlx::query(
        "UPDATE accounts SET reauth_required = true, reauth_state_received_at = now() + interval '2 seconds'
         WHERE id = 'acct-1'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let next = json(ask_link(&app, "acct-1", None).await).await;

    assert_eq!(first["url"], "https://link.mono.co/RI1");
    assert_eq!(next["url"], "https://link.mono.co/RI2");
    assert_eq!(next["source"], "fresh");
    assert_eq!(calls(&mono).await.len(), 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn unknown_unneeded_unlinked_and_unauthenticated_get_their_answers_without_mono(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).expect(0).mount(&mono).await;
    Seed { reauth_required: false, ..Seed::flagged("fine") }.insert(&pool).await;
    Seed { unlinked: true, ..Seed::flagged("gone") }.insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;

    for (account, status, error) in
        [("fine", 409, "reauth_not_required"), ("gone", 409, "account_unlinked"), ("nope", 404, "not_found")]
    {
        let response = ask_link(&app, account, None).await;
        assert_eq!(response.status().as_u16(), status, "{account}");
        assert_eq!(json(response).await, json!({ "error": error }), "{account}");
        // The account is answered for first, whatever the redirect.
        let elsewhere = ask_link(&app, account, Some(json!({ "redirect_url": "https://evil.com/" }))).await;
        assert_eq!(elsewhere.status().as_u16(), status, "{account}");
    }
    let anonymous =
        app.http.post(format!("{}/v1/accounts/fine/reauth-link", app.address)).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let wrong = ask_link_with(&app, "fine", None, "not-a-key-0123456789").await;
    assert_eq!(wrong.status().as_u16(), 401);
    let handouts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reauth_link_handouts").fetch_one(&pool).await.unwrap();
    assert_eq!(handouts, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn mono_refusing_the_account_is_422_and_remembered(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({ "message": "This account can not be re-authorised." })),
        )
        .expect(1)
        .mount(&mono)
        .await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool, &mono, &with_allowlist(&[])).await;

    for _ in 0..2 {
        let response = ask_link(&app, "acct-1", None).await;
        assert_eq!(response.status().as_u16(), 422);
        assert_eq!(
            json(response).await,
            json!({ "error": "mono_refused", "detail": "This account can not be re-authorised." })
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn mono_unavailable_or_refusing_our_key_is_503_with_retry_after(pool: PgPool) {
    for (status, body) in
        [(500, json!({})), (429, json!({})), (401, json!({ "message": "Invalid secret key" }))]
    {
        let mono = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&mono)
            .await;
        sqlx::query("DELETE FROM accounts").execute(&pool).await.unwrap();
        Seed::flagged("acct-1").insert(&pool).await;
        let app = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;

        let response = ask_link(&app, "acct-1", None).await;

        assert_eq!(response.status().as_u16(), 503, "Mono answered {status}");
        assert!(response.headers().contains_key("retry-after"), "Mono answered {status}");
        assert_eq!(json(response).await["error"], "mono_unavailable");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_answer_without_data_mono_url_is_502_and_stores_nothing(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({ "status": "successful", "data": { "url": "https://link.mono.co/secret-link" } }),
        ))
        .expect(1)
        .mount(&mono)
        .await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;

    let response = ask_link(&app, "acct-1", None).await;

    assert_eq!(response.status().as_u16(), 502);
    let body = json(response).await;
    assert_eq!(body, json!({ "error": "mono_unexpected_answer" }));
    let links: i64 = sqlx::query_scalar("SELECT count(*) FROM reauth_links").fetch_one(&pool).await.unwrap();
    assert_eq!(links, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_requests_make_one_mono_call_and_get_the_same_link(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 300).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    // No reuse: only the flight can make the eight share one call.
    let app = spawn_app_with(pool, &mono, &with_allowlist(&["--reauth-link-reuse-secs", "0"])).await;

    let answers = futures_util::future::join_all((0..8).map(|_| ask_link(&app, "acct-1", None))).await;

    let mut refs = std::collections::BTreeSet::new();
    for response in answers {
        assert_eq!(response.status().as_u16(), 200);
        refs.insert(json(response).await["ref"].as_str().unwrap().to_owned());
    }
    assert_eq!(refs.len(), 1, "{refs:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn two_processes_make_one_mono_call_between_them(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 500).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let no_reuse = with_allowlist(&["--reauth-link-reuse-secs", "0"]);
    let first = spawn_app_with(pool.clone(), &mono, &no_reuse).await;
    let second = spawn_app_with(pool.clone(), &mono, &no_reuse).await;

    let (a, b) = tokio::join!(ask_link(&first, "acct-1", None), async {
        until_mono_is_asked(&mono).await;
        ask_link(&second, "acct-1", None).await
    });

    let (a, b) = (json(a).await, json(b).await);
    assert_eq!(a["ref"], b["ref"], "the second process handed out the first one's link");
    assert_eq!(a["url"], "https://link.mono.co/RI1");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_request_in_another_process_behind_a_failing_call_does_not_call_again(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_delay(Duration::from_millis(500)))
        .mount(&mono)
        .await;
    Seed::flagged("acct-1").insert(&pool).await;
    let args = with_allowlist(&["--mono-retry-budget-ms", "0"]);
    let first = spawn_app_with(pool.clone(), &mono, &args).await;
    let second = spawn_app_with(pool.clone(), &mono, &args).await;

    let (a, b) = tokio::join!(ask_link(&first, "acct-1", None), async {
        until_mono_is_asked(&mono).await;
        ask_link(&second, "acct-1", None).await
    });

    assert_eq!(a.status().as_u16(), 503);
    assert_eq!(b.status().as_u16(), 503);
    assert_eq!(calls(&mono).await.len(), 1, "the second process took the first one's failure");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_link_request_and_a_token_request_for_one_account_do_not_mistake_each_other(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 500).expect(1).mount(&mono).await;
    crate::helpers::mono_issues("acct-1", "fresh-token", 0).expect(1).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let first = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;
    let second = spawn_app_with(pool.clone(), &mono, &with_allowlist(&[])).await;

    let (link, token) = tokio::join!(ask_link(&first, "acct-1", None), async {
        until_mono_is_asked(&mono).await;
        second.reauth_token("acct-1").await
    });

    assert_eq!(link.status().as_u16(), 200);
    assert_eq!(json(token).await["token"], "fresh-token", "the link's lock is not the token's");
}

async fn until_mono_is_asked(mono: &MockServer) {
    while mono.received_requests().await.unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The api binary over the test's database, logging JSON to a pipe.
fn api_process(pool: &PgPool, mono: &MockServer, port: u16, extra: &[(&str, &str)]) -> std::process::Child {
    let server = std::env::var("DATABASE_URL").unwrap();
    let server = server.rsplit_once('/').unwrap().0;
    let database = pool.connect_options().get_database().unwrap().to_owned();
    std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", format!("{server}/{database}"))
        .env("APP_API_KEYS", format!("app:{}", crate::helpers::MOBILE_KEY))
        .env("MONO_SECRET_KEY", MONO_KEY)
        .env("MONO_API_URL", mono.uri())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(extra.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unexpected_answer_is_logged_by_its_field_names_never_their_values(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({ "status": "successful", "data": { "link": "https://link.mono.co/secret-link-value" } }),
        ))
        .mount(&mono)
        .await;
    Seed::flagged("acct-1").insert(&pool).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut api = api_process(&pool, &mono, port, &[]);
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..200 {
        if http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "the api did not start");

    let answer = http
        .post(format!("http://127.0.0.1:{port}/v1/accounts/acct-1/reauth-link"))
        .bearer_auth(crate::helpers::MOBILE_KEY)
        .send()
        .await
        .unwrap();
    let _ = api.kill();
    let output = api.wait_with_output().unwrap();

    assert_eq!(answer.status().as_u16(), 502);
    let logs =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let line = logs.lines().find(|l| l.contains("no data.mono_url")).unwrap_or_else(|| panic!("{logs}"));
    assert!(line.contains("data.link") && line.contains("status"), "{line}");
    assert!(!logs.contains("secret-link-value"), "the answer's values reached the logs");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_redirect_allowlist_entry_that_is_not_an_absolute_http_url_stops_the_api(pool: PgPool) {
    let mono = MockServer::start().await;

    let api =
        api_process(&pool, &mono, 0, &[("MONO_REAUTH_REDIRECT_URLS", "https://app.example.com,//evil.com")]);
    let output = api.wait_with_output().unwrap();

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MONO_REAUTH_REDIRECT_URLS") && stderr.contains("//evil.com"), "{stderr}");
}
