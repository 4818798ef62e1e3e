//! `worker dlq` and `worker status`, run as an operator runs them: the binary, against the real
//! RabbitMQ and PostgreSQL. Dead letters are `dead_letters` rows; a replay's copy goes through the
//! outbox, which a running worker's relay publishes.

use sqlx::PgPool;

use crate::helpers::{PATIENCE, TestWorld, body};
use shared::testing::eventually;

const REAUTH: &str = "mono.events.reauthorisation_required";

pub(crate) fn stdout(output: &std::process::Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Dead-letters a re-auth event for each of `accounts` (Mono refuses them) and a poison message.
pub(crate) async fn world_with_dead_letters(pool: PgPool, accounts: &[&str]) -> TestWorld {
    let mut world = TestWorld::new(pool).await;
    for account in accounts {
        world.mono_refuses(account).await;
    }
    world.start_worker().await;
    for account in accounts {
        world.publish(&body(REAUTH, account)).await;
    }
    let work = world.broker.topology.work_queue();
    world.broker.publish_to_queue(&work, b"not json", lapin::BasicProperties::default()).await;
    let expected = accounts.len() as i64 + 1;
    eventually("every dead letter is journaled", PATIENCE, || async {
        world.count_status("dead").await == expected
    })
    .await;
    world.stop_workers().await;
    assert_eq!(world.dead_letter_count().await, expected, "a row beside each dead journal row");
    assert_eq!(world.broker.depth(&world.dead_queue()).await, 0, "the worker publishes no dead letter");
    world
}

#[sqlx::test(migrations = "../migrations")]
async fn list_shows_each_dead_letter_and_filters_narrow_it(pool: PgPool) {
    let world = world_with_dead_letters(pool, &["acct-a", "acct-b"]).await;

    let all: serde_json::Value =
        serde_json::from_str(&stdout(&world.run_cli(&["dlq", "list", "--json"], "").await)).unwrap();
    let by_account: serde_json::Value = serde_json::from_str(&stdout(
        &world.run_cli(&["dlq", "list", "--json", "--account", "acct-a"], "").await,
    ))
    .unwrap();
    let by_reason: serde_json::Value = serde_json::from_str(&stdout(
        &world.run_cli(&["dlq", "list", "--json", "--reason", "CAN NOT be re-authorised"], "").await,
    ))
    .unwrap();
    let by_event: serde_json::Value = serde_json::from_str(&stdout(
        &world
            .run_cli(&["dlq", "list", "--json", "--event", "reauthorisation_required", "--limit", "1"], "")
            .await,
    ))
    .unwrap();
    let table = stdout(&world.run_cli(&["dlq", "list"], "").await);

    assert_eq!(all.as_array().unwrap().len(), 3);
    assert_eq!(by_account.as_array().unwrap().len(), 1);
    assert_eq!(by_account[0]["account_id"], "acct-a");
    assert_eq!(by_account[0]["attempts"], 1);
    assert!(by_account[0]["reason"].as_str().unwrap().contains("This account can not be re-authorised."));
    assert!(by_account[0]["first_attempt_at"].is_string() && by_account[0]["dead_at"].is_string());
    assert_eq!(by_reason.as_array().unwrap().len(), 2);
    assert_eq!(by_event.as_array().unwrap().len(), 1);
    assert!(
        table.contains("reauthorisation_required")
            && table.contains("acct-b")
            && table.contains("invalid payload"),
        "{table}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn group_by_reason_shows_one_line_per_cause(pool: PgPool) {
    let world = world_with_dead_letters(pool, &["acct-a", "acct-b", "acct-c"]).await;

    let groups: serde_json::Value = serde_json::from_str(&stdout(
        &world.run_cli(&["dlq", "list", "--group-by", "reason", "--json"], "").await,
    ))
    .unwrap();

    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(groups[0]["count"], 3);
    assert!(groups[0]["reason"].as_str().unwrap().starts_with("Mono refused (400)"));
    assert_eq!(groups[1]["count"], 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn show_prints_the_whole_record_from_the_dead_letter_row(pool: PgPool) {
    let world = world_with_dead_letters(pool, &["acct-a"]).await;
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM webhook_events WHERE account_id = 'acct-a'")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    let poison: uuid::Uuid = sqlx::query_scalar("SELECT id FROM dead_letters WHERE account_id IS NULL")
        .fetch_one(&world.pool)
        .await
        .unwrap();

    let record: serde_json::Value =
        serde_json::from_str(&stdout(&world.run_cli(&["dlq", "show", &id.to_string(), "--json"], "").await))
            .unwrap();
    let garbage: serde_json::Value = serde_json::from_str(&stdout(
        &world.run_cli(&["dlq", "show", &poison.to_string(), "--json"], "").await,
    ))
    .unwrap();

    assert_eq!(record["id"], id.to_string());
    assert_eq!(record["journal"]["status"], "dead");
    assert_eq!(record["journal"]["payload"]["data"]["account"]["_id"], "acct-a");
    let letter = &record["dead_letter"];
    assert!(letter["reason"].as_str().unwrap().contains("can not be re-authorised"), "{letter}");
    assert_eq!((&letter["class"], &letter["attempts"]), (&"permanent".into(), &1.into()), "{letter}");
    assert_eq!(letter["body"]["data"]["account"]["_id"], "acct-a", "{letter}");
    assert_eq!(letter["rebuilt"], false);
    assert!(letter["dead_at"].is_string() && letter["first_attempt_at"].is_string(), "{letter}");
    assert_eq!(record["actions"], serde_json::json!([]));
    assert_eq!(garbage["dead_letter"]["body"], serde_json::json!({ "not_json": "8 bytes" }));
    assert_eq!(garbage["dead_letter"]["class"], "poison");
    assert_eq!(world.dead_letter_count().await, 2, "show changes nothing");
}

#[sqlx::test(migrations = "../migrations")]
async fn replay_moves_dead_letters_back_and_leaves_rows_and_journal_in_agreement(pool: PgPool) {
    let mut world = world_with_dead_letters(pool, &["acct-a", "acct-b"]).await;
    // The cause is fixed: Mono re-authorises acct-a now.
    world.mono.reset().await;
    world.mono_issues_token("acct-a", "after-replay").await;
    world.start_worker().await;

    let output = stdout(
        &world
            .run_cli(&["dlq", "replay", "--account", "acct-a", "--reason-note", "Mono fixed the account"], "")
            .await,
    );

    assert!(output.contains("replayed 1 of 1 selected dead letter(s)"), "{output}");
    world.outbox_published().await;
    eventually("the replayed event is applied", PATIENCE, || async {
        world.stored_token("acct-a").await.is_some()
    })
    .await;
    assert_eq!(world.stored_token("acct-a").await.as_deref(), Some("after-replay"));
    let mut left: Vec<Option<String>> =
        world.stored_dead_letters().await.into_iter().map(|letter| letter.account_id).collect();
    left.sort();
    assert_eq!(left, [None, Some("acct-b".to_owned())], "acct-b and the poison stay dead");
    assert_eq!(world.count_status("dead").await, 2, "the journal agrees with the rows");
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM webhook_events WHERE account_id = 'acct-a'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("processed", 1), "a replay starts its attempts again");
    let actions: serde_json::Value =
        serde_json::from_str(&stdout(&world.run_cli(&["dlq", "list", "--actions", "--json"], "").await))
            .unwrap();
    assert_eq!(actions[0]["action"], "replay");
    assert_eq!(actions[0]["actor"], "ops-test");
    assert_eq!(actions[0]["note"], "Mono fixed the account");
    assert!(actions[0]["completed_at"].is_string());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_dry_run_predicts_each_change_and_changes_nothing(pool: PgPool) {
    let world = world_with_dead_letters(pool, &["acct-a"]).await;
    let journal_before: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM webhook_events ORDER BY id")
            .fetch_all(&world.pool)
            .await
            .unwrap();

    let run = world.run_cli(&["dlq", "replay", "--all", "--dry-run"], "").await;
    let output = stdout(&run);
    // Piped, the progress bar draws nothing: stderr has the summary line alone.
    assert_eq!(
        String::from_utf8_lossy(&run.stderr).lines().count(),
        1,
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    assert!(output.contains("apply (after a token from Mono, which refused last time"), "{output}");
    assert!(output.contains("reauth_required false → true, reauth_token none → new token"), "{output}");
    assert!(output.contains("would fail again: invalid payload"), "{output}");
    let journal_after: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM webhook_events ORDER BY id")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(journal_before, journal_after);
    assert_eq!(
        (world.dead_letter_count().await, world.outbox_count().await),
        (2, 0),
        "every letter stays dead"
    );
    assert_eq!(world.mono.received_requests().await.unwrap().len(), 1, "a dry run never calls Mono");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_stale_dead_letter_stays_guarded_unless_forced(pool: PgPool) {
    let mut world = world_with_dead_letters(pool, &["acct-a", "acct-b"]).await;
    world.mono.reset().await;
    world.mono_issues_token("acct-a", "unforced").await;
    world.mono_issues_token("acct-b", "forced").await;
    world.start_worker().await;
    // Both customers re-authorised after the dead reauthorisation_required was received.
    for account in ["acct-a", "acct-b"] {
        let later = world.publish(&body("mono.events.account_reauthorized", account)).await;
        world.settled(&later).await;
    }

    let guarded = stdout(&world.run_cli(&["dlq", "replay", "--account", "acct-a", "--dry-run"], "").await);
    let forced =
        stdout(&world.run_cli(&["dlq", "replay", "--account", "acct-b", "--dry-run", "--force"], "").await);
    assert!(guarded.contains("no change: stale"), "{guarded}");
    assert!(forced.contains("reauth_required false → true"), "{forced}");

    stdout(&world.run_cli(&["dlq", "replay", "--account", "acct-a"], "").await);
    stdout(&world.run_cli(&["dlq", "replay", "--account", "acct-b", "--force"], "").await);
    eventually("both replays are journaled", PATIENCE, || async { world.count_status("dead").await == 1 })
        .await;
    eventually("the forced replay is applied", PATIENCE, || async {
        world.stored_token("acct-b").await.is_some()
    })
    .await;
    assert!(
        !world.account("acct-a").await.reauth_required,
        "the unforced replay is stale and changes nothing"
    );
    assert_eq!(world.count_status("stale").await, 1);
    assert!(world.account("acct-b").await.reauth_required, "--force applies it anyway");
    assert_eq!(world.stored_token("acct-b").await.as_deref(), Some("forced"));
}

#[sqlx::test(migrations = "../migrations")]
async fn purge_without_a_terminal_or_yes_refuses_as_a_usage_error(pool: PgPool) {
    let world = world_with_dead_letters(pool, &["acct-a", "acct-b"]).await;

    // Piped: nobody can answer the question, whatever stdin holds.
    for stdin in ["y\n", ""] {
        let refused = world.run_cli(&["dlq", "purge", "--all"], stdin).await;

        assert_eq!(refused.status.code(), Some(2), "{}", String::from_utf8_lossy(&refused.stderr));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("stdin is not a terminal") && stderr.contains("--yes"), "{stderr}");
        assert!(refused.stdout.is_empty(), "{}", String::from_utf8_lossy(&refused.stdout));
    }
    assert_eq!(world.count_status("dead").await, 3, "nothing purged");
    assert_eq!(world.dead_letter_count().await, 3, "nothing purged");
    let actions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions").fetch_one(&world.pool).await.unwrap();
    assert_eq!(actions, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn purge_with_yes_records_what_it_removed(pool: PgPool) {
    let world = world_with_dead_letters(pool, &["acct-a", "acct-b"]).await;

    let purged = stdout(
        &world
            .run_cli(
                &["dlq", "purge", "--reason", "invalid payload", "--yes", "--reason-note", "garbage"],
                "",
            )
            .await,
    );
    assert!(purged.contains("purged 1 of 1 selected dead letter(s)"), "{purged}");
    assert_eq!(world.dead_letter_count().await, 2, "the rest stays dead");
    assert!(
        world.stored_dead_letters().await.iter().all(|letter| letter.account_id.is_some()),
        "the poison went"
    );
    assert_eq!(world.count_status("dead").await, 2);
    let recorded: (String, String) =
        sqlx::query_as("SELECT action, note FROM dead_letter_actions WHERE completed_at IS NOT NULL")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(recorded, ("purge".to_owned(), "garbage".to_owned()));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_bulk_action_needs_a_filter_or_all(pool: PgPool) {
    let world = TestWorld::new(pool).await;

    for command in [&["dlq", "replay"][..], &["dlq", "replay", "--dry-run"], &["dlq", "purge", "--yes"]] {
        let output = world.run_cli(command, "").await;

        assert_eq!(output.status.code(), Some(2), "{command:?}: a usage error");
        assert!(String::from_utf8_lossy(&output.stderr).contains("--all"), "{command:?}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn status_shows_queues_dead_letters_and_the_last_processed_event(pool: PgPool) {
    let mut world = world_with_dead_letters(pool, &["acct-a"]).await;
    world.start_worker().await;
    let updated = world.publish(&body("mono.events.account_updated", "acct-z")).await;
    world.settled(&updated).await;

    let output = stdout(&world.run_cli(&["status", "--worker-url", "http://127.0.0.1:9"], "").await);

    assert!(output.contains(&format!("{}.dead", world.broker.prefix)), "{output}");
    // The dead-letter queue is only a conveyor: the worker drains it, the rows wait.
    assert!(
        output
            .lines()
            .any(|l| l.starts_with(&world.dead_queue()) && l.split_whitespace().nth(1) == Some("0")),
        "{output}"
    );
    assert!(output.contains("dead letters stored           2"), "{output}");
    assert!(!output.contains("replay copies to publish"), "no outbox row waits: {output}");
    assert!(
        output.contains("last processed event          mono.events.account_updated (processed)"),
        "{output}"
    );
    assert!(output.contains("not reachable"), "{output}");
}

#[test]
fn dlq_help_documents_every_flag() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["dlq", "replay", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--event",
        "--account",
        "--reason",
        "--since",
        "--until",
        "--limit",
        "--all",
        "--dry-run",
        "--force",
        "--reason-note",
        "--actor",
    ] {
        assert!(help.contains(flag), "dlq replay --help lacks {flag}:\n{help}");
    }
}

/// Dead-letters `count` re-auth events (Mono refuses them all), then lets Mono issue tokens again and
/// starts a worker, ready for a replay.
async fn world_with_many_dead_letters(pool: PgPool, count: usize) -> TestWorld {
    use wiremock::matchers::{method, path_regex};
    use wiremock::{Mock, ResponseTemplate};
    let mut world = TestWorld::new(pool).await;
    let refuse = ResponseTemplate::new(400).set_body_json(serde_json::json!({ "message": "key revoked" }));
    Mock::given(method("POST")).respond_with(refuse).mount(&world.mono).await;
    world.start_worker().await;
    for n in 0..count {
        world.publish(&body(REAUTH, &format!("acct-{n:04}"))).await;
    }
    eventually("every event is dead", PATIENCE, || async {
        world.count_status("dead").await == count as i64
    })
    .await;
    world.stop_workers().await;
    world.mono.reset().await;
    let token = ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": "fixed" }));
    Mock::given(method("POST"))
        .and(path_regex("^/accounts/.+/reauthorise$"))
        .respond_with(token)
        .mount(&world.mono)
        .await;
    world.start_worker().await;
    world
}

/// Starts `worker dlq replay --all`, and stops it with `signal` once it has acted on a few messages;
/// returns the actions completed and how the command ended.
async fn interrupt_a_replay(
    world: &TestWorld,
    signal: nix::sys::signal::Signal,
) -> (i64, std::process::ExitStatus) {
    let mut child =
        world.cli_command(&["dlq", "replay", "--all"], &world.database_url().await).spawn().unwrap();
    let started = std::time::Instant::now();
    loop {
        let acted: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions")
            .fetch_one(&world.pool)
            .await
            .unwrap();
        if acted >= 20 || started.elapsed() > PATIENCE {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let completed =
        sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions WHERE completed_at IS NOT NULL")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    (completed, exit)
}

async fn assert_everything_replayed_once(world: &TestWorld, count: i64) {
    eventually("every replayed event is applied", PATIENCE, || async {
        world.count_status("processed").await == count
    })
    .await;
    let journaled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_events").fetch_one(&world.pool).await.unwrap();
    assert_eq!(journaled, count, "one journal row per delivery: nothing lost, nothing twice");
    let flagged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM accounts WHERE reauth_required AND reauth_token = 'fixed'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(flagged, count);
    world.outbox_published().await;
    assert_eq!(world.dead_letter_count().await, 0, "no letter is left dead");
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions WHERE completed_at IS NULL")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(unfinished, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_replay_killed_midway_loses_nothing_and_duplicates_nothing(pool: PgPool) {
    let world = world_with_many_dead_letters(pool, 300).await;

    let (completed_before_kill, _) = interrupt_a_replay(&world, nix::sys::signal::Signal::SIGKILL).await;
    assert!(completed_before_kill < 300, "the replay finished before it could be killed");
    // Each letter is one transaction: the kill left every letter either dead or replayed, never
    // both, never neither.
    let (dead, replayed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM dead_letters),
                (SELECT count(DISTINCT delivery_id) FROM dead_letter_actions WHERE action = 'replay')",
    )
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert_eq!((dead + replayed, replayed), (300, completed_before_kill));
    let output = stdout(&world.run_cli(&["dlq", "replay", "--all"], "").await);

    assert!(output.contains(&format!("replayed {dead} of {dead} selected")), "{output}");
    assert_everything_replayed_once(&world, 300).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn ctrl_c_stops_a_replay_cleanly_and_the_next_run_continues(pool: PgPool) {
    let world = world_with_many_dead_letters(pool, 300).await;

    let (completed, exit) = interrupt_a_replay(&world, nix::sys::signal::Signal::SIGINT).await;
    assert!(completed < 300, "the replay finished before Ctrl-C");
    assert_eq!(exit.code(), Some(1), "an interrupted replay is not done");
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letter_actions WHERE completed_at IS NULL")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(unfinished, 0, "Ctrl-C lets the current message finish");
    stdout(&world.run_cli(&["dlq", "replay", "--all"], "").await);

    assert_everything_replayed_once(&world, 300).await;
}

/// What the upgrade to dead letter rows does with a `dead` journal row whose message is not in the
/// dead-letter queue: its row is rebuilt from the journal. Runs the migration's own statement over
/// every stored letter; returns how many it rebuilt.
pub(crate) async fn upgrade_from_the_journal(world: &TestWorld) -> u64 {
    let migration = worker::db::MIGRATOR
        .iter()
        .find(|m| m.version == 20261207000001)
        .expect("the migration to dead letter rows");
    let statement = &migration.sql[migration.sql.find("INSERT INTO dead_letters").unwrap()..];
    sqlx::query("DELETE FROM dead_letters").execute(&world.pool).await.unwrap();
    let rebuilt = sqlx::query(statement).execute(&world.pool).await.unwrap().rows_affected();
    assert!(world.stored_dead_letters().await.iter().all(|letter| letter.rebuilt));
    rebuilt
}

#[sqlx::test(migrations = "../migrations")]
async fn a_dry_run_sees_that_the_same_body_was_applied_since(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_refuses("acct-r").await;
    world.start_worker().await;
    // Mono's own key order and spacing: the journal's jsonb payload re-serialises differently, so only
    // the digest of the body as received identifies the copy.
    let mono_body =
        br#"{"event": "mono.events.reauthorisation_required", "data": {"account": {"_id": "acct-r"}}}"#;
    let dead = world.publish(mono_body).await;
    assert_eq!(world.settled(&dead).await.status, "dead");
    world.mono.reset().await;
    world.mono_issues_token("acct-r", "second-copy").await;
    // Mono delivers the same webhook again, and this time it succeeds.
    let again = world.publish(mono_body).await;
    assert_eq!(world.settled(&again).await.status, "processed");

    let prediction = stdout(&world.run_cli(&["dlq", "replay", "--account", "acct-r", "--dry-run"], "").await);

    assert!(
        prediction.contains(&format!("no change: the same body was applied as {}", again.id)),
        "{prediction}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_replay_rebuilt_from_the_journal_of_a_body_applied_since_is_a_duplicate(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_refuses("acct-r").await;
    world.start_worker().await;
    // Mono's own key order and spacing: the journal's jsonb payload re-serialises differently.
    let mono_body =
        br#"{"event": "mono.events.reauthorisation_required", "data": {"account": {"_id": "acct-r"}}}"#;
    let dead = world.publish(mono_body).await;
    assert_eq!(world.settled(&dead).await.status, "dead");
    // Dead under an earlier version whose message had left the queue: the upgrade rebuilt it from
    // the journal.
    assert_eq!(upgrade_from_the_journal(&world).await, 1);
    world.mono.reset().await;
    world.mono_issues_token("acct-r", "second-copy").await;
    let again = world.publish(mono_body).await;
    assert_eq!(world.settled(&again).await.status, "processed");

    stdout(&world.run_cli(&["dlq", "replay", "--account", "acct-r"], "").await);

    eventually("the rebuilt replay is settled", PATIENCE, || async {
        world.journal(&dead).await.is_some_and(|row| row.status != "dead")
    })
    .await;
    assert_eq!(world.journal(&dead).await.unwrap().status, "duplicate");
    assert_eq!(world.stored_token("acct-r").await.as_deref(), Some("second-copy"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_replay_rebuilt_from_a_minimal_journal_row_names_what_the_copy_lacks(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    for account in ["acct-json", "acct-text"] {
        world.mono_refuses(account).await;
    }
    world.start_worker().await;
    for account in ["acct-json", "acct-text"] {
        let mut sent: serde_json::Value = serde_json::from_slice(&body(REAUTH, account)).unwrap();
        sent["data"]["account"]["name"] = "Amaka Eze".into();
        let dead = world.publish(&serde_json::to_vec(&sent).unwrap()).await;
        assert_eq!(world.settled(&dead).await.status, "dead");
    }
    world.stop_workers().await;
    // Dead under an earlier version whose messages had left the queue: the upgrade rebuilt them
    // from the journal, whose minimal rows do not hold the name.
    assert_eq!(upgrade_from_the_journal(&world).await, 2);

    let json: serde_json::Value = serde_json::from_str(&stdout(
        &world.run_cli(&["dlq", "replay", "--account", "acct-json", "--json"], "").await,
    ))
    .unwrap();
    let text = stdout(&world.run_cli(&["dlq", "replay", "--account", "acct-text"], "").await);

    assert_eq!(json["acted"], 1);
    let lacks = json["rebuilt"][0]["lacks"].as_array().unwrap();
    assert!(lacks.contains(&"data.account.name".into()), "{json}");
    assert!(text.contains("from its minimal journal row: the copy lacks data.account.name"), "{text}");
}
