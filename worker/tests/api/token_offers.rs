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

#[sqlx::test(migrations = "../migrations")]
async fn a_reauthorisation_ends_the_offer_of_a_token_whose_delivery_is_still_held(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let tokens = NumberedTokens::default();
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .respond_with(tokens.clone())
        .mount(&world.mono)
        .await;
    world.start_worker().await;
    let t0 = Utc::now() - Span::minutes(10);
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

    // The customer re-authorises (with token-1), then needs to again.
    let reauthorized = world.publish_received_at(&body(REAUTHORIZED, ACCOUNT), t0 + Span::minutes(3)).await;
    assert_eq!(world.settled(&reauthorized).await.status, "processed");
    let again = world.publish_received_at(&body(REAUTH, ACCOUNT), t0 + Span::minutes(6)).await;

    assert_eq!(world.settled(&again).await.status, "processed");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("token-2"), "not the spent token-1");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 2);

    world.pool.execute("DROP TRIGGER hold_one ON webhook_events").await.unwrap();
    assert_eq!(world.settled(&first).await.status, "stale", "received before the re-authorisation");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("token-2"));
}
