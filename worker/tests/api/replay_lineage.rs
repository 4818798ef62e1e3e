//! What a replay's copy carries: the lineage of the replay that made it, and nothing that an earlier
//! replay of the same letter asked for itself.

use sqlx::PgPool;

use crate::dlq::world_with_dead_letters;
use crate::helpers::{PATIENCE, TestWorld};
use shared::delivery::{HEADER_REPLAY_FORCE, HEADER_REPLAY_NOTE, HEADER_REPLAY_OF, header_str};
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
        world.count_status("dead").await == 2 && world.broker.depth(&world.dead_queue()).await == 2
    })
    .await;
    world.stop_workers().await;

    replay(&world, &[]).await;

    let copies = world.broker.wait_for_messages(&world.broker.topology.work_queue(), 1, PATIENCE).await;
    let headers = copies[0].properties.headers().clone().unwrap();
    assert!(header_str(&headers, HEADER_REPLAY_OF).is_some(), "the copy is a replay");
    assert_eq!(header_str(&headers, HEADER_REPLAY_FORCE), None, "a plain replay is not forced");
    assert_eq!(header_str(&headers, HEADER_REPLAY_NOTE), None, "nor does it carry an earlier replay's note");
}
