//! Correctness at the edges: a body that legitimately comes again, copies racing for a token, tokens
//! that must not be stored, and outages on our side (a read-only database, a refused Mono key, a
//! trickle of Mono failures, absurd `Retry-After`s, redirects) that must park or hold deliveries,
//! never dead-letter them.

use chrono::{Duration as Span, Utc};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{ACCOUNT, NumberedTokens, PATIENCE, TestWorld, body};
use shared::delivery::{DeliveryMeta, HEADER_ATTEMPTS, as_u32};
use shared::testing::eventually;

const REAUTH: &str = "mono.events.reauthorisation_required";
const REAUTHORIZED: &str = "mono.events.account_reauthorized";

fn reauthorise_path(account: &str) -> wiremock::matchers::PathExactMatcher {
    path(format!("/accounts/{account}/reauthorise"))
}

#[sqlx::test(migrations = "../migrations")]
async fn required_again_after_a_reauthorisation_flags_the_account_again_with_a_new_token(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let tokens = NumberedTokens::default();
    Mock::given(method("POST"))
        .and(reauthorise_path(ACCOUNT))
        .respond_with(tokens.clone())
        .mount(&world.mono)
        .await;
    world.start_worker().await;
    let required = body(REAUTH, ACCOUNT);
    let t0 = Utc::now() - Span::minutes(10);

    let first = world.publish_received_at(&required, t0).await;
    assert_eq!(world.settled(&first).await.status, "processed");
    let reauthorized = world.publish_received_at(&body(REAUTHORIZED, ACCOUNT), t0 + Span::minutes(3)).await;
    assert_eq!(world.settled(&reauthorized).await.status, "processed");
    assert!(!world.account(ACCOUNT).await.reauth_required);
    // The same body: MFA failed again, well within the dedup window.
    let again = world.publish_received_at(&required, t0 + Span::minutes(6)).await;

    assert_eq!(world.settled(&again).await.status, "processed", "a new event, not a duplicate");
    assert!(world.account(ACCOUNT).await.reauth_required);
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("token-2"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn two_copies_at_once_make_one_mono_call(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path(ACCOUNT))
        // Slow enough that the second copy asks while the first call is out.
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "token": "the-one" }))
                .set_delay(Duration::from_millis(400)),
        )
        .expect(1)
        .mount(&world.mono)
        .await;
    world.start_worker().await;
    let required = body(REAUTH, ACCOUNT);

    let first = world.publish(&required).await;
    let second = world.publish(&required).await;

    let mut statuses = vec![world.settled(&first).await.status, world.settled(&second).await.status];
    statuses.sort();
    assert_eq!(statuses, ["duplicate", "processed"]);
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("the-one"));
    world.stop_workers().await;
    // Dropping the mock server verifies Mono was called exactly once.
}

#[sqlx::test(migrations = "../migrations")]
async fn a_token_never_overwrites_one_issued_later(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "issued-now").await;
    // Another worker stored a token Mono issued after the one this worker is about to get.
    let later = Utc::now() + Span::seconds(30);
    sqlx::query(
        "INSERT INTO accounts (id, reauth_required, reauth_token, reauth_token_issued_at, reauth_token_expires_at,
                               reauth_state_received_at)
         VALUES ($1, true, 'issued-later', $2, $2 + interval '10 minutes', $3)",
    )
    .bind(ACCOUNT)
    .bind(later)
    .bind(Utc::now() - Span::minutes(1))
    .execute(&world.pool)
    .await
    .unwrap();
    world.start_worker().await;

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("issued-later"));
    assert!(world.account(ACCOUNT).await.reauth_required);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_token_fetched_for_a_delivery_that_turned_stale_or_unlinked_is_not_stored(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let (stale, unlinked) = ("acct-stale", "acct-unlinked");
    for account in [stale, unlinked] {
        Mock::given(method("POST"))
            .and(reauthorise_path(account))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({ "token": "late-token" }))
                    .set_delay(Duration::from_millis(1500)),
            )
            .mount(&world.mono)
            .await;
    }
    world.start_worker().await;
    let t0 = Utc::now();

    let required_stale = world.publish_received_at(&body(REAUTH, stale), t0).await;
    let required_unlinked = world.publish_received_at(&body(REAUTH, unlinked), t0).await;
    // While both wait for Mono, later events decide the accounts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reauthorized = world.publish_received_at(&body(REAUTHORIZED, stale), t0 + Span::seconds(1)).await;
    let gone = world
        .publish_received_at(
            &serde_json::to_vec(&serde_json::json!({
                "event": "mono.events.account_unlinked", "data": { "account": { "id": unlinked } }
            }))
            .unwrap(),
            t0 + Span::seconds(1),
        )
        .await;
    assert_eq!(world.settled(&reauthorized).await.status, "processed");
    assert_eq!(world.settled(&gone).await.status, "processed");

    assert_eq!(world.settled(&required_stale).await.status, "stale");
    assert_eq!(world.settled(&required_unlinked).await.status, "stale");
    for account in [stale, unlinked] {
        assert_eq!(world.stored_token(account).await, None, "{account}");
        assert!(!world.account(account).await.reauth_required, "{account}");
    }
}

/// A connection to the server's maintenance database, untouched by what the test does to its own.
async fn admin() -> sqlx::PgConnection {
    use sqlx::Connection;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    sqlx::PgConnection::connect(&url).await.unwrap()
}

async fn set_read_only(database: &str, read_only: bool) {
    let mut admin = admin().await;
    let statement = if read_only {
        format!(r#"ALTER DATABASE "{database}" SET default_transaction_read_only = on"#)
    } else {
        format!(r#"ALTER DATABASE "{database}" RESET default_transaction_read_only"#)
    };
    sqlx::query(&statement).execute(&mut admin).await.unwrap();
    if read_only {
        // Existing sessions keep their settings: end them, as a failover would.
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(database)
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_read_only_database_holds_deliveries_and_dead_letters_none(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "after-failover").await;
    world.start_worker().await;
    let database: String =
        sqlx::query_scalar("SELECT current_database()::text").fetch_one(&world.pool).await.unwrap();
    set_read_only(&database, true).await;

    let mut published: Vec<DeliveryMeta> = Vec::new();
    for n in 0..100 {
        published.push(world.publish(&body("mono.events.account_updated", &format!("acct-{n}"))).await);
    }
    published.push(world.publish(&body(REAUTH, ACCOUNT)).await);
    // Long enough for every delivery to be tried (and, before, dead-lettered) several times.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(world.dead_letter_count().await, 0, "nothing dead-lettered");
    assert_eq!(world.journal_count().await, 0, "nothing could be written");

    set_read_only(&database, false).await;

    eventually("every delivery is applied", PATIENCE, || async {
        world.count_status("processed").await == published.len() as i64
    })
    .await;
    assert_eq!(world.journal_count().await, published.len() as i64, "each applied once");
    assert_eq!(world.dead_letter_count().await, 0);
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("after-failover"));
}

async fn readyz(world: &TestWorld) -> serde_json::Value {
    let url = format!("http://{}/readyz", world.metrics_addrs[0]);
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_refused_key_parks_deliveries_reports_it_and_resumes_by_itself(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(serde_json::json!({ "message": "Invalid secret key" })),
        )
        .up_to_n_times(3)
        .mount(&world.mono)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "key-fixed" })))
        .mount(&world.mono)
        .await;
    world.start_worker_with(&["--mono-circuit-open-secs", "1"]).await;

    let accounts = ["acct-a", "acct-b", "acct-c"];
    let mut published = Vec::new();
    for account in accounts {
        published.push(world.publish(&body(REAUTH, account)).await);
    }
    eventually("the worker reports the refused key", PATIENCE, || async {
        readyz(&world).await["mono_key"] == "refused"
    })
    .await;
    let metrics = world.metrics().await;
    assert!(metrics.contains("monohook_worker_mono_key_refused 1"), "{metrics}");

    for meta in &published {
        let row = world.settled(meta).await;
        assert_eq!(row.status, "processed");
        assert_eq!(row.attempts, 1, "parking spends no attempt");
    }
    for account in accounts {
        assert_eq!(world.stored_token(account).await.as_deref(), Some("key-fixed"));
    }
    assert_eq!(world.dead_letter_count().await, 0);
    assert_eq!(readyz(&world).await["mono_key"], "accepted");
}

/// Mono answers 503 to every account while `down` is set, a token once it is cleared.
struct DownForEveryone {
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Respond for DownForEveryone {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        if self.down.load(Ordering::SeqCst) {
            ResponseTemplate::new(503)
        } else {
            ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "after-outage" }))
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_trickle_of_mono_failures_parks_the_delivery_instead_of_spending_its_attempts(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    Mock::given(method("POST")).respond_with(DownForEveryone { down: down.clone() }).mount(&world.mono).await;
    // Three re-auths: far below the failure-ratio breaker's minimum of calls, but three accounts
    // failing in a row is Mono down, not one account's trouble.
    world
        .start_worker_with(&["--mono-circuit-consecutive-failures", "3", "--mono-circuit-open-secs", "1"])
        .await;

    let accounts = ["trickle-1", "trickle-2", "trickle-3"];
    let mut metas = Vec::new();
    for account in accounts {
        metas.push(world.publish(&body(REAUTH, account)).await);
    }
    eventually("the breaker opens", PATIENCE, || async { readyz(&world).await["mono_circuit"] == "open" })
        .await;
    down.store(false, Ordering::SeqCst);

    for meta in &metas {
        let row = world.settled(meta).await;
        assert_eq!(row.status, "processed");
        assert_eq!(row.attempts, 1, "an outage parks the delivery; no attempt is spent");
    }
    assert_eq!(world.dead_letter_count().await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_absurd_retry_after_is_capped(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path(ACCOUNT))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "86400"))
        .up_to_n_times(1)
        .mount(&world.mono)
        .await;
    world.mono_issues_token(ACCOUNT, "after-cap").await;
    world.start_worker_with(&["--mono-retry-after-max-secs", "1"]).await;

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    assert_eq!(world.settled(&meta).await.status, "processed", "a day-long Retry-After waited 1 s");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("after-cap"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_redirect_is_not_followed_and_the_key_never_leaves_for_another_origin(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let elsewhere = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&elsewhere).await;
    Mock::given(method("POST"))
        .and(reauthorise_path(ACCOUNT))
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", format!("{}/accounts/{ACCOUNT}/reauthorise", elsewhere.uri())),
        )
        .mount(&world.mono)
        .await;
    world.start_worker_with(&["--mono-retry-budget-secs", "1"]).await;

    world.publish(&body(REAUTH, ACCOUNT)).await;
    eventually("the worker calls Mono and is redirected", PATIENCE, || async {
        !world.mono.received_requests().await.unwrap_or_default().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert!(elsewhere.received_requests().await.unwrap().is_empty(), "the redirect was followed");
    assert_eq!(world.dead_letter_count().await, 0, "a redirect is our misconfiguration, not the event's");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_applied_delivery_handed_out_at_the_limit_is_acked_not_dead_lettered(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;
    let published = body("mono.events.account_updated", ACCOUNT);
    let meta = world.publish(&published).await;
    assert_eq!(world.settled(&meta).await.status, "processed");

    // Its ack was lost and the broker has handed it out nine times since (the limit is ten).
    let properties = meta.to_properties();
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert("x-delivery-count".into(), lapin::types::AMQPValue::LongLongInt(9));
    world
        .broker
        .publish_to_queue(&world.broker.topology.work_queue(), &published, properties.with_headers(headers))
        .await;
    let marker = world.publish(&body("mono.events.account_updated", "marker")).await;
    world.settled(&marker).await;

    assert_eq!(world.dead_letter_count().await, 0, "an applied delivery is no poison");
    assert_eq!(world.journal(&meta).await.unwrap().status, "processed");
    assert_eq!(world.broker.depth(&world.broker.topology.work_queue()).await, 0, "and it was acked");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_retry_tier_that_cannot_take_the_copy_never_turns_a_delivery_into_poison(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .and(reauthorise_path(ACCOUNT))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&world.mono)
        .await;
    world.mono_issues_token(ACCOUNT, "after-tier").await;
    world.start_worker_with(&["--mono-retry-budget-secs", "0"]).await;
    // An operator deleted the first retry tier: the broker returns the copy (mandatory publish).
    let tier = world.broker.topology.retry_queue(1);
    world.broker.channel.queue_delete(tier.as_str().into(), Default::default()).await.unwrap();

    let meta = world.publish(&body(REAUTH, ACCOUNT)).await;

    // The worker holds the delivery, declares the tier again and moves it there: no nack loop that
    // would burn the delivery limit and dead-letter it as poison.
    let row = world.settled(&meta).await;
    assert_eq!(row.status, "processed", "{:?}", row.last_error);
    assert_eq!(row.attempts, 2, "the second attempt came from the re-declared tier");
    assert_eq!(world.dead_letter_count().await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_attempt_header_survives_parking(pool: PgPool) {
    // Parking copies keep `x-attempts` where it was: checked on the copy itself.
    let mut world = TestWorld::new(pool).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({ "message": "revoked" })))
        .mount(&world.mono)
        .await;
    world.start_worker_with(&["--mono-circuit-open-secs", "30"]).await;

    world.publish(&body(REAUTH, ACCOUNT)).await;
    let parked = world.broker.wait_for_messages(&world.broker.topology.retry_queue(1), 1, PATIENCE).await;

    let headers = parked[0].properties.headers().clone().unwrap();
    assert_eq!(headers.inner().get(HEADER_ATTEMPTS).and_then(as_u32), Some(0));
    world.stop_workers().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_dead_letter_whose_body_the_database_refuses_is_journaled_without_it(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    // The journal refuses any row with a body: the event itself cannot be stored, and neither can a
    // dead letter's journal payload.
    sqlx::query("ALTER TABLE webhook_events ADD CONSTRAINT no_bodies CHECK (payload IS NULL)")
        .execute(&world.pool)
        .await
        .unwrap();
    world.start_worker().await;

    let published = body("mono.events.account_updated", ACCOUNT);
    let meta = world.publish(&published).await;

    let row = world.settled(&meta).await;
    assert_eq!(row.status, "dead");
    let reason = row.last_error.unwrap();
    assert!(reason.contains("the database refused the event"), "{reason}");
    let payload: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT payload FROM webhook_events WHERE id = $1")
            .bind(meta.id.as_uuid())
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(payload, None, "journaled without its body");
    let letters = world.dead_letters(1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].id, &letters[0].data, letters[0].class.as_str()),
        (meta.id.as_uuid(), &published, "permanent"),
        "the dead letter row keeps the body as received"
    );
    assert_eq!(world.broker.depth(&world.dead_queue()).await, 0, "nothing is published as a dead letter");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_dead_letter_that_cannot_be_stored_is_held_then_parked_and_stored_later(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    // A first tier long enough to see the parked copy in it.
    world.broker = shared::testing::TestBroker::with_retry_delays(vec![Duration::from_secs(3)]).await;
    // Ours, not the event's (a trigger's error is retried): no dead letter can be stored for now.
    sqlx::query(
        "CREATE FUNCTION refuse_dead_letters() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'dead letters are refused for now'; END $$",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE INSERT ON dead_letters FOR EACH ROW EXECUTE FUNCTION refuse_dead_letters()",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    world.start_worker_with(&["--hold-max-secs", "2"]).await;
    let work = world.broker.topology.work_queue();
    let tier = world.broker.topology.retry_queue(1);
    let started = std::time::Instant::now();

    // Poison: dead-lettered at once, and its row is refused.
    world.broker.publish_to_queue(&work, b"not json", lapin::BasicProperties::default()).await;

    eventually("the dead letter is parked in the first tier", PATIENCE, || async {
        world.broker.depth(&tier).await == 1
    })
    .await;
    let held = started.elapsed();
    assert!(held >= Duration::from_secs(2), "parked after {held:?}, before HOLD_MAX_SECS");
    assert_eq!((world.journal_count().await, world.dead_letter_count().await), (0, 0));
    assert_eq!(world.broker.depth(&work).await, 0, "the original was acked once its copy was parked");

    sqlx::query("DROP TRIGGER refuse ON dead_letters").execute(&world.pool).await.unwrap();

    // Back from the tier, it is stored.
    let letters = world.dead_letters(1).await;
    assert_eq!((letters[0].data.as_slice(), letters[0].class.as_str()), (&b"not json"[..], "poison"));
    assert_eq!(world.count_status("dead").await, 1);
    assert_eq!((world.broker.depth(&tier).await, world.broker.depth(&work).await), (0, 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn mono_refusing_every_account_alike_is_ours_and_parks_the_rest(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    // MONO_API_URL ends in `/v2`: every re-authorise call meets a 404 for a path Mono does not have.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404).set_body_json(serde_json::json!({ "message": "Not found" })))
        .mount(&world.mono)
        .await;
    let mut cli = world.cli(&[]);
    cli.run.mono_api_url = format!("{}/v2", world.mono.uri());
    world.start_worker_on(cli, world.pool.clone()).await;

    let accounts: Vec<String> = (0..8).map(|n| format!("acct-{n}")).collect();
    for account in &accounts {
        world.publish(&body(REAUTH, account)).await;
    }
    eventually("the worker reports Mono refusing every account alike", PATIENCE, || async {
        readyz(&world).await["mono_refusing_alike"] == 404
    })
    .await;
    eventually("every delivery is settled or parked", PATIENCE, || async {
        world.count_status("dead").await
            + i64::from(world.broker.depth(&world.broker.topology.retry_queue(1)).await)
            == accounts.len() as i64
    })
    .await;

    let dead = world.dead_letter_count().await;
    assert!(
        dead < worker::circuit::SAME_REFUSALS_ARE_OURS as i64,
        "only the refusals before it was taken as ours are dead-lettered, not all {}: {dead}",
        accounts.len()
    );
    let metrics = world.metrics().await;
    assert!(metrics.contains("monohook_worker_mono_refusing_alike 404"), "{metrics}");
    assert_eq!(world.count_status("processed").await, 0);
    world.stop_workers().await;
}
