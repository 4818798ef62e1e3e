//! The single flight's offer: copies that need a token while a fetch for their account is on offer
//! share it, but never once the account was re-authorised, which spends the token.

use chrono::{DateTime, Duration as Span, Utc};
use sqlx::{Executor, PgPool};
use std::sync::atomic::Ordering;
use wiremock::Mock;
use wiremock::matchers::{method, path};

use crate::helpers::{ACCOUNT, NumberedTokens, PATIENCE, TestWorld, body};
use shared::delivery::DeliveryMeta;
use shared::testing::eventually;

const REAUTH: &str = "mono.events.reauthorisation_required";
const REAUTHORIZED: &str = "mono.events.account_reauthorized";

/// Mono hands out `token-1`, `token-2`, ... for the account; the calls are counted.
async fn numbered_tokens(world: &TestWorld) -> NumberedTokens {
    let tokens = NumberedTokens::default();
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .respond_with(tokens.clone())
        .mount(&world.mono)
        .await;
    tokens
}

#[sqlx::test(migrations = "../migrations")]
async fn a_reauthorisation_ends_the_offer_of_a_token_whose_delivery_is_still_held(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let tokens = numbered_tokens(&world).await;
    world.start_worker().await;
    let t0 = Utc::now() - Span::seconds(1);
    let mut first = DeliveryMeta::stamp(&body(REAUTH, ACCOUNT));
    first.received_at = DateTime::from_timestamp_millis(t0.timestamp_millis()).unwrap();
    // The first delivery's journal row meets an outage of ours (53300, too many connections) every
    // time: it holds its token, on offer, as long as the outage lasts. Its tries are counted in a
    // sequence, which no rollback undoes.
    world
        .pool
        .execute(
            format!(
                "CREATE SEQUENCE held_tries;
                 CREATE FUNCTION hold_one() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.id = '{}' THEN
                         PERFORM nextval('held_tries');
                         RAISE EXCEPTION 'too many connections' USING ERRCODE = '53300';
                     END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER hold_one BEFORE INSERT ON webhook_events FOR EACH ROW EXECUTE FUNCTION hold_one();",
                first.id
            )
            .as_str(),
        )
        .await
        .unwrap();
    world.publish_meta(&body(REAUTH, ACCOUNT), &first).await;
    eventually("the first delivery holds its token", PATIENCE, || async {
        let tried: bool =
            sqlx::query_scalar("SELECT is_called FROM held_tries").fetch_one(&world.pool).await.unwrap();
        tried && tokens.calls.load(Ordering::SeqCst) == 1
    })
    .await;

    // The customer re-authorises (with token-1, issued by now), then needs to again.
    let reauthorized = world.publish(&body(REAUTHORIZED, ACCOUNT)).await;
    assert_eq!(world.settled(&reauthorized).await.status, "processed");
    let again = world.publish(&body(REAUTH, ACCOUNT)).await;

    assert_eq!(world.settled(&again).await.status, "processed");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("token-2"), "not the spent token-1");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 2);

    world.pool.execute("DROP TRIGGER hold_one ON webhook_events").await.unwrap();
    assert_eq!(world.settled(&first).await.status, "stale", "received before the re-authorisation");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("token-2"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_reauthorisation_decided_after_a_later_copy_of_the_loss_still_spends_the_token(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    numbered_tokens(&world).await;
    world.start_worker().await;
    let required = world.publish_received_at(&body(REAUTH, ACCOUNT), Utc::now() - Span::seconds(1)).await;
    assert_eq!(world.settled(&required).await.status, "processed");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("token-1"));

    // Received in this order after token-1 was issued: the customer re-authorised with it, then
    // MFA failed again (the same body). Decided in the other order (two batch slots, two workers):
    // the copy of the loss comes first and is a duplicate, the re-authorisation is then stale.
    let now = Utc::now();
    let reauthorized_at = now + Span::seconds(2);
    let again = world.publish_received_at(&body(REAUTH, ACCOUNT), now + Span::seconds(4)).await;
    assert_eq!(world.settled(&again).await.status, "duplicate");
    let reauthorized = world.publish_received_at(&body(REAUTHORIZED, ACCOUNT), reauthorized_at).await;
    assert_eq!(world.settled(&reauthorized).await.status, "stale");

    let account = world.account(ACCOUNT).await;
    assert!(account.reauth_required, "the later loss of access stands");
    assert_eq!(world.stored_token(ACCOUNT).await, None, "token-1 was spent: never handed out again");
    assert_eq!(
        account.reauthorized_at.map(|at| at.timestamp_millis()),
        Some(reauthorized_at.timestamp_millis()),
        "the re-authorisation happened, whatever its order"
    );
    world.stop_workers().await;
}

/// Mono answers [`NumberedTokens`] slowly, so that calls for copies overlap.
struct SlowTokens(NumberedTokens);

impl wiremock::Respond for SlowTokens {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        self.0.respond(request).set_delay(std::time::Duration::from_millis(500))
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn copies_of_a_reauth_taken_by_two_workers_at_once_cost_one_call_to_mono(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let tokens = NumberedTokens::default();
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .respond_with(SlowTokens(tokens.clone()))
        .mount(&world.mono)
        .await;
    world.start_worker().await;
    world.start_worker().await;
    let work = world.broker.topology.work_queue();
    eventually("both workers consume", PATIENCE, || async {
        world.broker.depths().await.iter().any(|d| d.queue == work && d.consumers == 2)
    })
    .await;

    // Mono posts the re-auth four times (no 200 in time, say): the broker hands the copies to
    // both workers, which take them side by side.
    let t0 = Utc::now() - Span::seconds(1);
    let mut copies = Vec::new();
    for offset in 0..4 {
        let mut copy = DeliveryMeta::stamp(&body(REAUTH, ACCOUNT));
        copy.received_at = DateTime::from_timestamp_millis(t0.timestamp_millis() + offset).unwrap();
        world.publish_meta(&body(REAUTH, ACCOUNT), &copy).await;
        copies.push(copy);
    }

    let mut statuses = Vec::new();
    for copy in &copies {
        statuses.push(world.settled(copy).await.status);
    }
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1, "one re-auth, one call (statuses {statuses:?})");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("token-1"));
    assert_eq!(statuses.iter().filter(|s| *s == "processed").count(), 1, "{statuses:?}");
    let claims: i64 =
        sqlx::query_scalar("SELECT count(*) FROM token_fetch_claims").fetch_one(&world.pool).await.unwrap();
    assert_eq!(claims, 0, "the stored token ended the claim");
}
