//! Dead letters are rows, acted on in transactions: operators racing each other or a running worker
//! act on each letter once, a filter selects exactly what it says, the broker's own dead letters
//! become rows, and a dry run decides the selection together. No command walks a queue.

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashSet;
use std::process::Output;
use std::time::Duration;
use uuid::Uuid;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, ResponseTemplate};

use crate::dlq::world_with_dead_letters;
use crate::helpers::{PATIENCE, TestWorld, body};
use shared::delivery::{DeliveryMeta, long_string};
use shared::testing::eventually;

const REAUTH: &str = "mono.events.reauthorisation_required";

fn accounts(count: usize) -> Vec<String> {
    (0..count).map(|n| format!("acct-{n:05}")).collect()
}

/// stdout parsed as one JSON document (the command may have failed: the report says why).
fn report(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The message ids of the outbox rows (replay copies not yet published), oldest first.
async fn outbox_ids(world: &TestWorld) -> Vec<Uuid> {
    sqlx::query_scalar::<_, String>("SELECT message_id FROM outbox ORDER BY id")
        .fetch_all(&world.pool)
        .await
        .unwrap()
        .iter()
        .map(|id| id.parse().unwrap())
        .collect()
}

async fn dead_ids(world: &TestWorld) -> HashSet<Uuid> {
    world.stored_dead_letters().await.into_iter().map(|letter| letter.id).collect()
}

async fn dead_journal_ids(world: &TestWorld) -> HashSet<Uuid> {
    sqlx::query_scalar("SELECT id FROM webhook_events WHERE status = 'dead'")
        .fetch_all(&world.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Mono hands out a token to every account.
async fn mono_issues_tokens_to_all(world: &TestWorld) {
    Mock::given(method("POST"))
        .and(path_regex("^/accounts/.+/reauthorise$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "fixed" })))
        .mount(&world.mono)
        .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn two_operators_replaying_at_once_replay_each_letter_exactly_once(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let seeded: HashSet<Uuid> =
        world.seed_dead_letters(&accounts(1_000)).await.iter().map(|m| m.id.as_uuid()).collect();
    let database_url = world.database_url().await;

    let first = world.cli_command(&["dlq", "replay", "--all", "--json"], &database_url).spawn().unwrap();
    let second = world.cli_command(&["dlq", "replay", "--all", "--json"], &database_url).spawn().unwrap();
    let (first, second) = tokio::task::spawn_blocking(move || {
        (first.wait_with_output().unwrap(), second.wait_with_output().unwrap())
    })
    .await
    .unwrap();

    let copies = outbox_ids(&world).await;
    assert_eq!(copies.iter().copied().collect::<HashSet<_>>(), seeded, "every letter replayed");
    assert_eq!(copies.len(), seeded.len(), "none replayed twice");
    let actions: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT delivery_id), count(*) FILTER (WHERE completed_at IS NULL)
         FROM dead_letter_actions",
    )
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert_eq!(actions, (1_000, 1_000, 0), "one complete action per letter");
    assert!(dead_ids(&world).await.is_empty() && dead_journal_ids(&world).await.is_empty());
    let (first, second) = (report(&first), report(&second));
    assert_eq!(first["acted"].as_u64().unwrap() + second["acted"].as_u64().unwrap(), 1_000);
    for (run, other) in [(&first, &second), (&second, &first)] {
        // What one run skipped, the other took: named, and the run does not say done.
        let skipped = run["skipped"].as_array().unwrap();
        assert_eq!(run["acted"].as_u64().unwrap() as usize + skipped.len(), 1_000, "{run}");
        assert_eq!(run["outcome"], if skipped.is_empty() { "done" } else { "partial" }, "{run}");
        for letter in skipped {
            assert!(letter["why"].as_str().unwrap().contains("another command"), "{letter}");
        }
        assert!(skipped.len() as u64 <= other["acted"].as_u64().unwrap());
    }

    // A worker's relay publishes each copy, and each is applied once.
    mono_issues_tokens_to_all(&world).await;
    world.start_worker().await;
    world.outbox_published().await;
    eventually("every replayed letter is applied", PATIENCE, || async {
        world.count_status("processed").await == 1_000
    })
    .await;
    assert_eq!(world.journal_count().await, 1_000, "one journal row per letter");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_replay_among_ten_thousand_letters_replays_only_those_its_filter_selects(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let mut all = accounts(10_000);
    all.extend((0..10).map(|_| "acct-last".to_owned()));
    let seeded = world.seed_dead_letters(&all).await;

    let output = world.run_cli(&["dlq", "replay", "--account", "acct-last", "--json"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let done = report(&output);
    assert_eq!(
        (&done["selected"], &done["acted"], &done["outcome"]),
        (&10.into(), &10.into(), &"done".into())
    );
    let wanted: Vec<Uuid> = seeded[10_000..].iter().map(|m| m.id.as_uuid()).collect();
    assert_eq!(outbox_ids(&world).await, wanted, "exactly the selected letters, each once, oldest first");
    let rest: HashSet<Uuid> = seeded[..10_000].iter().map(|m| m.id.as_uuid()).collect();
    assert_eq!(dead_ids(&world).await, rest, "the others stay dead");
    assert_eq!(dead_journal_ids(&world).await, rest, "and so do their journal rows");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_purge_removes_exactly_the_letters_it_selected(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let seeded: Vec<Uuid> =
        world.seed_dead_letters(&accounts(5)).await.iter().map(|m| m.id.as_uuid()).collect();

    let output = world.run_cli(&["dlq", "purge", "--all", "--limit", "2", "--yes", "--json"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let done = report(&output);
    assert_eq!(
        (&done["selected"], &done["acted"], &done["skipped"]),
        (&2.into(), &2.into(), &serde_json::json!([]))
    );
    let rest: HashSet<Uuid> = seeded[2..].iter().copied().collect();
    assert_eq!(dead_ids(&world).await, rest, "the two oldest went, the rest stay");
    assert_eq!(dead_journal_ids(&world).await, rest, "their journal rows with them, no others");
    assert!(outbox_ids(&world).await.is_empty(), "a purge publishes nothing");
    for id in &seeded[..2] {
        assert_eq!(world.actions_of(*id).await, [("purge".to_owned(), true)]);
    }
}

/// Takes the lock on dead letter `id` as another command's transaction would, until it is dropped.
async fn hold_letter(world: &TestWorld, id: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = world.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM dead_letters WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until a session of the test's database waits for a row lock (the replay met the held letter).
async fn replay_waits_for_the_lock(world: &TestWorld) {
    eventually("the replay waits for the held letter", PATIENCE, || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE datname = current_database() AND wait_event_type = 'Lock')",
        )
        .fetch_one(&world.pool)
        .await
        .unwrap()
    })
    .await;
}

fn interrupt(child: &std::process::Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn ctrl_c_finishes_the_letter_in_hand_and_stops_before_the_next(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let seeded: Vec<Uuid> =
        world.seed_dead_letters(&accounts(2)).await.iter().map(|m| m.id.as_uuid()).collect();
    let held = hold_letter(&world, seeded[0]).await;
    let child = world
        .cli_command(&["dlq", "replay", "--all", "--json"], &world.database_url().await)
        .spawn()
        .unwrap();
    replay_waits_for_the_lock(&world).await;

    interrupt(&child);
    // Time for the replay to hear it while it waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.rollback().await.unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();

    assert_eq!(output.status.code(), Some(1), "an interrupted replay is not done");
    let done = report(&output);
    assert_eq!(
        (&done["outcome"], &done["selected"], &done["acted"]),
        (&"interrupted".into(), &2.into(), &1.into())
    );
    assert_eq!(outbox_ids(&world).await, [seeded[0]], "the letter in hand was replayed");
    assert_eq!(dead_ids(&world).await, HashSet::from([seeded[1]]), "the next one stays dead");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_second_ctrl_c_ends_a_replay_waiting_on_a_letter_at_once_and_loses_nothing(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let seeded: Vec<Uuid> =
        world.seed_dead_letters(&accounts(2)).await.iter().map(|m| m.id.as_uuid()).collect();
    let held = hold_letter(&world, seeded[0]).await;
    let child = world.cli_command(&["dlq", "replay", "--all"], &world.database_url().await).spawn().unwrap();
    replay_waits_for_the_lock(&world).await;

    interrupt(&child);
    tokio::time::sleep(Duration::from_millis(200)).await;
    interrupt(&child);
    let output = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("a second Ctrl-C did not end the replay")
    .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("Ctrl-C again: stop now"), "{stderr}");
    held.rollback().await.unwrap();
    // The letter in hand was never committed: both stay dead, nothing is in the outbox.
    assert_eq!(dead_ids(&world).await, seeded.iter().copied().collect());
    assert!(outbox_ids(&world).await.is_empty());
    assert!(world.actions_of(seeded[0]).await.is_empty(), "and no action is recorded");
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

/// Calls Mono received for `account`'s re-authorisation so far.
async fn calls_for(world: &TestWorld, account: &str) -> usize {
    let path = format!("/accounts/{account}/reauthorise");
    world.mono.received_requests().await.unwrap_or_default().iter().filter(|r| r.url.path() == path).count()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_letter_that_dies_again_at_once_is_replayed_once(pool: PgPool) {
    // Old design: the walk met its own copy, dead again, further down <prefix>.dead and replayed it again.
    let mut world = world_with_dead_letters(pool, &["acct-a"]).await;
    let letter: Uuid = sqlx::query_scalar("SELECT id FROM dead_letters WHERE account_id = 'acct-a'")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    let calls_before = calls_for(&world, "acct-a").await;
    // Mono still refuses acct-a: the copy dies again as soon as the worker takes it.
    world.start_worker().await;

    let output = world.run_cli(&["dlq", "replay", "--all", "--json"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let done = report(&output);
    assert_eq!((&done["selected"], &done["acted"], &done["outcome"]), (&2.into(), &2.into(), &"done".into()));
    assert_eq!(world.actions_of(letter).await, [("replay".to_owned(), true)], "one action for the letter");
    world.outbox_published().await;
    eventually("the copy is a dead letter again", PATIENCE, || async {
        world.dead_letter_count().await == 2 && world.count_status("dead").await == 2
    })
    .await;
    world.stop_workers().await;
    assert_eq!(calls_for(&world, "acct-a").await, calls_before + 1, "one Mono call for the replay");
    assert_eq!(world.actions_of(letter).await.len(), 1, "still one action");
    let back =
        world.stored_dead_letters().await.into_iter().find(|l| l.id == letter).expect("the letter is back");
    assert_eq!((back.class.as_str(), back.attempts), ("permanent", 1), "a replay starts its attempts again");
    assert!(back.reason.contains("can not be re-authorised"), "{}", back.reason);
    assert_eq!(world.outbox_count().await, 0);
    assert_eq!(world.broker.depth(&world.broker.topology.work_queue()).await, 0, "no copy left to take");
}

#[sqlx::test(migrations = "../migrations")]
async fn all_never_widens_a_filter(pool: PgPool) {
    // Old design: a walk with --all acted on queued letters it had no journal row for, whatever the filter.
    let mut world = world_with_dead_letters(pool, &["acct-a", "acct-b"]).await;
    // One of acct-b's letters reached the dead-letter queue by hand, with no journal row.
    let mut stray: Value = serde_json::from_slice(&body(REAUTH, "acct-b")).unwrap();
    stray["data"]["account"]["note"] = "put there by hand".into();
    let stray = serde_json::to_vec(&stray).unwrap();
    let meta = DeliveryMeta::stamp(&stray);
    world.broker.publish_to_queue(&world.dead_queue(), &stray, meta.to_properties()).await;
    world.start_worker().await;
    eventually("the worker drains it into a row", PATIENCE, || async {
        dead_ids(&world).await.contains(&meta.id.as_uuid())
    })
    .await;
    world.stop_workers().await;

    let output =
        world.run_cli(&["dlq", "purge", "--all", "--account", "acct-a", "--yes", "--json"], "").await;

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let done = report(&output);
    assert_eq!((&done["selected"], &done["acted"]), (&1.into(), &1.into()), "{done}");
    let mut left: Vec<Option<String>> =
        world.stored_dead_letters().await.into_iter().map(|letter| letter.account_id).collect();
    left.sort();
    assert_eq!(left, [None, Some("acct-b".to_owned()), Some("acct-b".to_owned())], "acct-b's rows stay");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_message_the_broker_dead_lettered_becomes_a_row(pool: PgPool) {
    // Old design: nothing drained <prefix>.dead: the broker's dead letter stayed a message, never a row.
    let mut world = TestWorld::new(pool).await;
    let sent = body("mono.events.account_updated", "acct-limit");
    // Handed out to the delivery limit and dead-lettered by RabbitMQ itself: never journaled.
    let meta = DeliveryMeta::stamp(&sent);
    let properties = meta.to_properties();
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert("x-first-death-reason".into(), long_string("delivery_limit"));
    headers.insert("x-first-death-queue".into(), long_string(&world.broker.topology.work_queue()));
    let channel = world.broker.connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            world.dead_queue().as_str().into(),
            BasicPublishOptions::default(),
            &sent,
            properties.with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(world.journal(&meta).await.is_none());

    world.start_worker().await;

    let letters = world.dead_letters(1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].id, &letters[0].data), (meta.id.as_uuid(), &sent), "the body as received");
    assert!(
        letters[0].reason.contains("broker") && letters[0].reason.contains("delivery_limit"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].account_id.as_deref(), Some("acct-limit"));
    assert_eq!(world.settled(&meta).await.status, "dead", "journaled beside its row");
    world.stop_workers().await;
    eventually("the relay's consumer is gone", PATIENCE, || async {
        let dead = world.dead_queue();
        world.broker.depths().await.iter().any(|d| d.queue == dead && d.consumers == 0)
    })
    .await;
    assert_eq!(world.broker.depth(&world.dead_queue()).await, 0, "acked, not returned to the queue");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_dry_run_decides_letters_together(pool: PgPool) {
    // Old design: each letter was predicted alone, so two copies of one body both said `apply`.
    let mut world = TestWorld::new(pool).await;
    let seeded: Vec<Uuid> = world
        .seed_dead_letters(&["acct-d".to_owned(), "acct-d".to_owned()])
        .await
        .iter()
        .map(|m| m.id.as_uuid())
        .collect();

    let run = world.run_cli(&["dlq", "replay", "--all", "--dry-run", "--json"], "").await;

    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<Value> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let predicted: Vec<(Uuid, &str)> = lines
        .iter()
        .map(|line| (line["id"].as_str().unwrap().parse().unwrap(), line["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(predicted, [(seeded[0], "apply"), (seeded[1], "duplicate")], "{lines:?}");
    assert_eq!(dead_ids(&world).await.len(), 2, "a dry run changes nothing");

    // The replay does what was predicted: one applied, one duplicate, one call to Mono.
    mono_issues_tokens_to_all(&world).await;
    world.start_worker().await;
    assert!(world.run_cli(&["dlq", "replay", "--all"], "").await.status.success());
    world.outbox_published().await;
    eventually("both copies are settled", PATIENCE, || async {
        world.count_status("processed").await + world.count_status("duplicate").await == 2
    })
    .await;
    assert_eq!((world.count_status("processed").await, world.count_status("duplicate").await), (1, 1));
    assert_eq!(calls_for(&world, "acct-d").await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_message_an_earlier_version_left_in_the_dead_queue_replaces_its_rebuilt_row(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_refuses("acct-old").await;
    world.start_worker().await;
    let mut sent: Value = serde_json::from_slice(&body(REAUTH, "acct-old")).unwrap();
    sent["data"]["account"]["name"] = "Amaka Eze".into();
    let sent = serde_json::to_vec(&sent).unwrap();
    let meta = world.publish(&sent).await;
    assert_eq!(world.settled(&meta).await.status, "dead");
    world.stop_workers().await;
    // As the upgrade leaves a letter an earlier version dead-lettered: a row rebuilt from the
    // minimal journal row, and the whole message still in <prefix>.dead with that version's headers.
    assert_eq!(crate::dlq::upgrade_from_the_journal(&world).await, 1);
    assert_ne!(world.stored_dead_letters().await[0].data, sent, "the rebuilt body lacks the name");
    let properties = meta.to_properties();
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert("x-dead-reason".into(), long_string("Mono refused (400): earlier version"));
    headers.insert("x-dead-class".into(), long_string("permanent"));
    headers.insert("x-attempts".into(), AMQPValue::LongLongInt(1));
    world.broker.publish_to_queue(&world.dead_queue(), &sent, properties.with_headers(headers)).await;

    world.start_worker().await;

    eventually("the drained message replaces the rebuilt row", PATIENCE, || async {
        world.stored_dead_letters().await.iter().any(|letter| !letter.rebuilt)
    })
    .await;
    let letters = world.stored_dead_letters().await;
    assert_eq!(letters.len(), 1, "one row per delivery id");
    assert_eq!((letters[0].id, &letters[0].data), (meta.id.as_uuid(), &sent), "the whole body again");
    assert_eq!(
        (letters[0].class.as_str(), letters[0].reason.as_str()),
        ("permanent", "Mono refused (400): earlier version")
    );
    assert_eq!(world.count_status("dead").await, 1);
    let replay = report(&world.run_cli(&["dlq", "replay", "--all", "--dry-run", "--json"], "").await);
    assert_eq!(replay["outcome"], "apply", "{replay}");
}
