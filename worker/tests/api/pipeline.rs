//! The whole pipeline: Mono's webhooks through a real ingest, RabbitMQ, a worker and PostgreSQL.

use clap::Parser;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{ACCOUNT, FIXTURE_TOKEN, MONO_KEY, PATIENCE, TestWorld};
use ingest::config::IngestConfig;
use ingest::startup::Application;
use shared::testing::{amqp_url, eventually, fixture};

const WEBHOOK_SECRET: &str = "pipeline-secret";

async fn spawn_ingest(world: &TestWorld) -> (String, CancellationToken) {
    let config = IngestConfig::parse_from([
        "ingest",
        "--mono-webhook-secret",
        WEBHOOK_SECRET,
        "--listen-addr",
        "127.0.0.1:0",
        "--queue-prefix",
        &world.broker.prefix,
        "--retry-delays-secs",
        &world.broker.retry_delays_arg(),
        "--http-workers",
        "1",
        // Never the default port: another ingest may run on this machine.
        "--metrics-addr",
        "127.0.0.1:0",
        "--amqp-url",
        amqp_url().expose_secret(),
    ]);
    let cancel = CancellationToken::new();
    let app = Application::build(config, cancel.clone()).await.unwrap();
    let url = format!("http://127.0.0.1:{}/webhooks/mono", app.port());
    tokio::spawn(app.run_until_stopped());
    (url, cancel)
}

async fn post(url: &str, fixture_name: &str) {
    let response = reqwest::Client::new()
        .post(url)
        .header("mono-webhook-secret", WEBHOOK_SECRET)
        .body(fixture(fixture_name))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{fixture_name}");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reauth_story_flags_the_account_then_clears_flag_and_token(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .and(header("mono-sec-key", MONO_KEY))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw(fixture("reauthorise_response.json"), "application/json"),
        )
        .expect(1)
        .mount(&world.mono)
        .await;
    world.start_worker().await;
    let (ingest, stop_ingest) = spawn_ingest(&world).await;

    post(&ingest, "reauthorisation_required.json").await;
    eventually("the account is flagged", PATIENCE, || async {
        sqlx::query_scalar::<_, bool>("SELECT reauth_required FROM accounts WHERE id = $1")
            .bind(ACCOUNT)
            .fetch_optional(&world.pool)
            .await
            .unwrap()
            .unwrap_or(false)
    })
    .await;
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some(FIXTURE_TOKEN));
    let flagged = world.account(ACCOUNT).await;
    let issued = flagged.reauth_token_issued_at.expect("no issue time");
    assert_eq!(flagged.reauth_token_expires_at, Some(issued + chrono::Duration::minutes(10)));

    post(&ingest, "account_reauthorized.json").await;
    eventually("the flag is cleared", PATIENCE, || async { !world.account(ACCOUNT).await.reauth_required })
        .await;
    let cleared = world.account(ACCOUNT).await;
    assert_eq!(world.stored_token(ACCOUNT).await, None);
    assert!(cleared.reauthorized_at.is_some());
    assert_eq!(cleared.reauth_token_issued_at, None);

    // account_updated then confirms fresh data; its fixture is another account of Mono's docs.
    post(&ingest, "account_updated.json").await;
    eventually("the data status is recorded", PATIENCE, || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT data_status FROM accounts WHERE id = '6631279bdedfbd0a1c2e0001'",
        )
        .fetch_optional(&world.pool)
        .await
        .unwrap()
        .flatten()
        .as_deref()
            == Some("AVAILABLE")
    })
    .await;

    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM webhook_events ORDER BY received_at")
        .fetch_all(&world.pool)
        .await
        .unwrap();
    assert_eq!(statuses, ["processed", "processed", "processed"]);
    stop_ingest.cancel();
    world.stop_workers().await;
}
