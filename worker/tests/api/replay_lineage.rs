//! What a replay's copy carries: the lineage of the replay that made it, and nothing that an earlier
//! replay of the same letter asked for itself.

use sqlx::PgPool;

use crate::dlq::world_with_dead_letters;
use crate::helpers::{PATIENCE, TestWorld};
use shared::delivery::{HEADER_REPLAY_FORCE, HEADER_REPLAY_NOTE, HEADER_REPLAY_OF};
use shared::testing::eventually;

async fn replay(world: &TestWorld, args: &[&str]) {
    let output = world.run_cli(&[&["dlq", "replay", "--account", "acct-a"], args].concat(), "").await;
    assert!(output.status.success(), "replay failed: {}", String::from_utf8_lossy(&output.stderr));
}

#[sqlx::test(migrations = "../migrations")]
async fn force_applies_to_the_replay_that_asked_for_it_only(pool: PgPool) {
    // Mono keeps refusing acct-a, so each replay of its letter dies again.
    let mut world = world_with_dead_letters(pool, &["acct-a"]).await;
    replay(&world, &["--force", "--reason-note", "the customer called"]).await;
    world.start_worker().await;
    eventually("the forced replay is dead again", PATIENCE, || async {
        world.outbox_count().await == 0
            && world.count_status("dead").await == 2
            && world.dead_letter_count().await == 2
    })
    .await;
    world.stop_workers().await;

    let died_again = world.stored_dead_letters().await.into_iter().find(|l| l.account_id.is_some()).unwrap();
    // The dead letter carries the lineage of the replay that made it, for `dlq show`.
    assert_eq!(died_again.headers[HEADER_REPLAY_OF], died_again.id.to_string(), "{}", died_again.headers);
    assert_eq!(died_again.headers[HEADER_REPLAY_FORCE], "true");
    assert_eq!(died_again.headers[HEADER_REPLAY_NOTE], "the customer called");

    replay(&world, &[]).await;

    // No worker runs: the copy waits in the outbox, as the relay would publish it.
    let properties: serde_json::Value =
        sqlx::query_scalar("SELECT properties FROM outbox").fetch_one(&world.pool).await.unwrap();
    let headers = &properties["headers"];
    assert_eq!(headers[HEADER_REPLAY_OF], died_again.id.to_string(), "the copy is a replay: {headers}");
    assert!(headers.get(HEADER_REPLAY_FORCE).is_none(), "a plain replay is not forced: {headers}");
    assert!(
        headers.get(HEADER_REPLAY_NOTE).is_none(),
        "nor does it carry an earlier replay's note: {headers}"
    );
}
