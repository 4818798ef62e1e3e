//! Dead-letter walks that cannot lose a letter: `worker dlq replay|purge|show` act only on what they
//! saw, and only a walk that saw the whole queue acts on what it did not see.

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;
use uuid::Uuid;

use crate::helpers::{PATIENCE, TestWorld, body};
use shared::delivery::DeliveryMeta;
use shared::testing::{TcpProxy, amqp_url, eventually};

const REAUTH: &str = "mono.events.reauthorisation_required";

/// Puts a dead letter for each account onto the dead-letter queue, in order, each journaled as the
/// worker would have. Publishes are pipelined so that tens of thousands take seconds.
pub(crate) async fn seed_dead_letters(world: &TestWorld, accounts: &[String]) -> Vec<DeliveryMeta> {
    let bodies: Vec<Vec<u8>> = accounts.iter().map(|account| body(REAUTH, account)).collect();
    let metas: Vec<DeliveryMeta> = bodies.iter().map(|b| DeliveryMeta::stamp(b)).collect();
    for chunk in (0..accounts.len()).collect::<Vec<_>>().chunks(10_000) {
        sqlx::query(
            "INSERT INTO webhook_events (id, event, account_id, body_sha256, received_at, status, attempts,
                                         last_error, payload, processed_at)
             SELECT id, $5, account_id, body_sha256, received_at, 'dead', 1, 'Mono refused (400): seeded',
                    jsonb_build_object('event', $5, 'data', jsonb_build_object('account', jsonb_build_object('_id', account_id))),
                    now()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) AS v(id, account_id, body_sha256, received_at)",
        )
        .bind(chunk.iter().map(|i| metas[*i].id.as_uuid()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|i| accounts[*i].clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|i| metas[*i].body_sha256.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|i| metas[*i].received_at).collect::<Vec<_>>())
        .bind(REAUTH)
        .execute(&world.pool)
        .await
        .unwrap();
    }
    let channel = world.broker.connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let dead = world.dead_queue();
    for chunk in bodies.iter().zip(&metas).collect::<Vec<_>>().chunks(2_000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (body, meta) in chunk {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    dead.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    meta.to_properties(),
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert_eq!(confirm.await.unwrap(), lapin::Confirmation::Ack(None));
        }
    }
    let _ = channel.close(200, "seeded".into()).await;
    metas
}

/// Another walker: a consumer on the dead-letter queue holding `count` messages unacked; their ids.
pub(crate) async fn hold_messages(world: &TestWorld, count: u16) -> (lapin::Channel, BTreeSet<Uuid>) {
    let channel = world.broker.connection.create_channel().await.unwrap();
    channel.basic_qos(count, BasicQosOptions::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume(
            world.dead_queue().as_str().into(),
            "other-walker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut held = BTreeSet::new();
    for _ in 0..count {
        let delivery = consumer.next().await.unwrap().unwrap();
        held.insert(DeliveryMeta::from_properties(&delivery.properties, &delivery.data).id.as_uuid());
    }
    (channel, held)
}

/// Takes every message off the work queue (no worker runs in these tests) and returns their ids.
pub(crate) async fn replayed_ids(world: &TestWorld) -> Vec<Uuid> {
    world
        .broker
        .drain(&world.broker.topology.work_queue())
        .await
        .iter()
        .map(|d| DeliveryMeta::from_properties(&d.properties, &d.data).id.as_uuid())
        .collect()
}

pub(crate) async fn dead_rows(world: &TestWorld) -> HashSet<Uuid> {
    sqlx::query_scalar("SELECT id FROM webhook_events WHERE status = 'dead'")
        .fetch_all(&world.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

pub(crate) async fn unfinished_actions(world: &TestWorld) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions WHERE completed_at IS NULL")
        .fetch_one(&world.pool)
        .await
        .unwrap()
}

fn accounts(count: usize) -> Vec<String> {
    (0..count).map(|n| format!("acct-{n:05}")).collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn two_walkers_at_once_replay_each_letter_exactly_once(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let seeded = seed_dead_letters(&world, &accounts(2_000)).await;
    let database_url = world.database_url().await;

    let first = world.cli_command(&["dlq", "replay", "--all"], &database_url).spawn().unwrap();
    let second = world.cli_command(&["dlq", "replay", "--all"], &database_url).spawn().unwrap();
    let (first, second) = tokio::task::spawn_blocking(move || {
        (first.wait_with_output().unwrap(), second.wait_with_output().unwrap())
    })
    .await
    .unwrap();

    let replayed = replayed_ids(&world).await;
    let distinct: HashSet<Uuid> = replayed.iter().copied().collect();
    assert_eq!(distinct.len(), seeded.len(), "every letter replayed");
    assert_eq!(
        replayed.len(),
        seeded.len(),
        "none replayed twice (no copy rebuilt while its original was held)"
    );
    assert_eq!(world.broker.depth(&world.dead_queue()).await, 0);
    assert_eq!(unfinished_actions(&world).await, 0);
    for output in [&first, &second] {
        let text = String::from_utf8_lossy(&output.stdout);
        // A walker that saw only part of the queue says so and fails; one that saw it all succeeds.
        assert_eq!(output.status.success(), !text.contains("incomplete"), "{text}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_replay_killed_between_record_and_publish_is_finished_only_by_a_walk_that_sees_it(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let seeded = seed_dead_letters(&world, &accounts(3)).await;
    let killed = seeded[0].id.as_uuid();
    // What a replay killed right after recording leaves: the action, no journal row, the message.
    sqlx::query(
        "INSERT INTO dead_letter_actions (batch_id, action, delivery_id, event, account_id, attempts, actor)
         VALUES ($1, 'replay', $2, $3, 'acct-00000', 1, 'ops-test')",
    )
    .bind(Uuid::now_v7())
    .bind(killed)
    .bind(REAUTH)
    .execute(&world.pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM webhook_events WHERE id = $1").bind(killed).execute(&world.pool).await.unwrap();
    // Another walker holds that message (the head of the queue) while the next replay runs.
    let (other, _) = hold_messages(&world, 1).await;

    let partial = world.run_cli(&["dlq", "replay", "--all"], "").await;

    assert!(!partial.status.success(), "an incomplete walk fails");
    assert!(String::from_utf8_lossy(&partial.stdout).contains("incomplete"));
    assert_eq!(unfinished_actions(&world).await, 1, "the unseen action is not marked complete");
    let first_pass = replayed_ids(&world).await;
    assert_eq!(first_pass.len(), 2);
    assert!(!first_pass.contains(&killed));

    other.close(200, "done".into()).await.unwrap();
    eventually("the held message is back", PATIENCE, || async {
        world.broker.depth(&world.dead_queue()).await == 1
    })
    .await;
    let output = world.run_cli(&["dlq", "replay", "--all"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    assert_eq!(replayed_ids(&world).await, vec![killed], "finished once, by the walk that saw it");
    assert_eq!(unfinished_actions(&world).await, 0);
    assert_eq!(world.broker.depth(&world.dead_queue()).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_purge_after_a_partial_walk_keeps_the_rows_of_letters_it_did_not_remove(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let seeded = seed_dead_letters(&world, &accounts(5)).await;
    let (other, _) = hold_messages(&world, 1).await;

    let partial = world.run_cli(&["dlq", "purge", "--all", "--yes"], "").await;

    assert!(!partial.status.success());
    assert_eq!(
        dead_rows(&world).await,
        HashSet::from([seeded[0].id.as_uuid()]),
        "only removed letters lose their rows"
    );
    other.close(200, "done".into()).await.unwrap();
    eventually("the held letter is still queued", PATIENCE, || async {
        world.broker.depth(&world.dead_queue()).await == 1
    })
    .await;

    let output = world.run_cli(&["dlq", "purge", "--all", "--yes"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    assert!(dead_rows(&world).await.is_empty());
    assert_eq!(world.broker.depth(&world.dead_queue()).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_walk_sees_seventy_thousand_dead_letters_and_replays_only_those_selected(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let mut all = accounts(69_990);
    all.extend((0..10).map(|_| "acct-last".to_owned()));
    let seeded = seed_dead_letters(&world, &all).await;

    let output = world.run_cli(&["dlq", "replay", "--account", "acct-last"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    let replayed: HashSet<Uuid> = replayed_ids(&world).await.into_iter().collect();
    let wanted: HashSet<Uuid> = seeded[69_990..].iter().map(|m| m.id.as_uuid()).collect();
    assert_eq!(replayed, wanted, "exactly the selected letters, each once");
    // The walk's returns reach the queue's ready count a moment after it closes.
    eventually("the originals left the queue and the rest stayed", PATIENCE, || async {
        world.broker.depth(&world.dead_queue()).await == 69_990
    })
    .await;
    assert_eq!(dead_rows(&world).await.len(), 69_990);
}

#[sqlx::test(migrations = "../migrations")]
async fn show_says_when_it_could_not_see_the_whole_queue_and_exits_1(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let seeded = seed_dead_letters(&world, &accounts(2)).await;
    let (_other, _) = hold_messages(&world, 1).await;
    let id = seeded[0].id.to_string();

    let output = world.run_cli(&["dlq", "show", &id], "").await;

    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("could not be seen whole"), "{text}");
    assert_eq!(output.status.code(), Some(1), "an incomplete view is a failure: {text}");

    let output = world.run_cli(&["dlq", "show", &id, "--json"], "").await;
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (record["queue_fully_seen"].as_bool(), record["queue_headers"].is_null()),
        (Some(false), true)
    );
    assert_eq!(output.status.code(), Some(1), "the same with --json");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_dead_letter_queue_has_an_explicit_delivery_limit_and_an_older_one_is_kept(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let channel = world.broker.connection.create_channel().await.unwrap();
    let quorum = |limit: Option<i64>| {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        if let Some(limit) = limit {
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        }
        args
    };
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    // The broker accepts an equivalent declaration only: the limit is set, to the documented value.
    channel
        .queue_declare(
            world.dead_queue().as_str().into(),
            durable,
            quorum(Some(shared::topology::DEAD_QUEUE_DELIVERY_LIMIT)),
        )
        .await
        .expect("the dead-letter queue carries x-delivery-limit");

    // A dead-letter queue an earlier version declared without the limit is kept as it is.
    let older = shared::topology::Topology::new(
        &format!("{}-older", world.broker.prefix),
        vec![std::time::Duration::from_secs(1)],
        10,
    );
    channel.queue_declare(older.dead_queue().as_str().into(), durable, quorum(None)).await.unwrap();
    older.declare_on(&world.broker.connection).await.expect("an older dead-letter queue is accepted");
    let cleanup = world.broker.connection.create_channel().await.unwrap();
    older.delete(&cleanup).await.unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn a_second_ctrl_c_ends_a_walk_stuck_on_a_stalled_broker_at_once(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    seed_dead_letters(&world, &accounts(2)).await;
    // Another walker holds one message: the replay's walk waits for it before it gives up.
    let (_other, _) = hold_messages(&world, 1).await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = amqp_url().expose_secret().replace("127.0.0.1:5672", &proxy.addr().to_string());
    let mut command =
        world.cli_command(&["dlq", "replay", "--account", "nobody"], &world.database_url().await);
    let child = command.env("AMQP_URL", url).spawn().unwrap();
    let dead = world.dead_queue();
    eventually("the replay walks the queue beside the other walker", PATIENCE, || async {
        world.broker.depths().await.iter().any(|d| d.queue == dead && d.consumers == 2)
    })
    .await;
    // The broker stops answering: whatever the replay waits for now never comes.
    proxy.stall();

    let interrupt = || {
        let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        assert!(sent.unwrap().success(), "cannot send SIGINT");
    };
    interrupt();
    tokio::time::sleep(Duration::from_millis(200)).await;
    interrupt();
    let output = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("a second Ctrl-C did not end the replay")
    .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopped at once"), "{stderr}");
}
