//! Messages that are not events are dead-lettered at once with a reason; the worker keeps going.

use lapin::BasicProperties;
use sqlx::PgPool;

use crate::helpers::{ACCOUNT, TestWorld, body};
use shared::delivery::DeliveryMeta;

#[sqlx::test(migrations = "../migrations")]
async fn poison_is_dead_lettered_with_a_reason_and_good_events_still_flow(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;
    let work = world.broker.topology.work_queue();
    let garbage_mib = vec![0xAB_u8; 1024 * 1024];
    let poison: [(&[u8], &str); 4] = [
        (b"not json at all", "invalid payload: body is not valid JSON"),
        (
            br#"{"event":"mono.events.account_updated","data":"oops"}"#,
            "invalid payload: `data` must be a JSON object",
        ),
        (br#"{"event":"mono.events.reauthorisation_required","data":{"account":{}}}"#, "no account id"),
        (&garbage_mib, "invalid payload: body is not valid JSON"),
    ];

    // Straight onto the work queue, without ingest's stamp, as a buggy producer would.
    for (payload, _) in &poison {
        world.broker.publish_to_queue(&work, payload, BasicProperties::default()).await;
    }
    let good = world.publish(&body("mono.events.account_updated", ACCOUNT)).await;

    assert_eq!(world.settled(&good).await.status, "processed");
    let dead = world.dead_letters(poison.len()).await;
    assert_eq!(dead.len(), poison.len());
    for (payload, reason) in &poison {
        let letter = dead
            .iter()
            .find(|d| d.data == *payload)
            .expect("a poison message is missing from the dead letters");
        assert!(letter.reason.starts_with(reason), "reason {:?} should start with {reason:?}", letter.reason);
        assert_eq!((letter.class.as_str(), letter.attempts), ("poison", 1));
        // Journaled too, under the id derived from the body.
        let meta = DeliveryMeta::from_properties(&BasicProperties::default(), payload);
        assert_eq!(letter.id, meta.id.as_uuid());
        assert_eq!(world.settled(&meta).await.status, "dead");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_nul_escape_in_a_body_is_stored_without_its_payload(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;
    let published =
        br#"{"event":"mono.events.account_updated","data":{"account":{"_id":"nul-1","name":"a\u0000b"}}}"#;

    let meta = world.publish(published).await;

    assert_eq!(world.settled(&meta).await.status, "processed");
    let payload: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT payload FROM webhook_events").fetch_one(&world.pool).await.unwrap();
    assert_eq!(payload, None);
}
