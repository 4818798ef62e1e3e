//! `--json` on the operator commands and `worker status --check`, run as a script or a probe runs
//! them: the binary against the real RabbitMQ and PostgreSQL, stdout parsed as JSON, exit codes
//! checked. The shapes are the ones docs/operations.md documents.

use serde_json::Value;
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::process::Output;

use crate::dlq::world_with_dead_letters;
use crate::helpers::{PATIENCE, TestWorld, body};
use shared::testing::eventually;

/// The field names of a JSON object.
fn keys(value: &Value) -> BTreeSet<&str> {
    value.as_object().unwrap_or_else(|| panic!("not an object: {value}")).keys().map(String::as_str).collect()
}

fn set<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
    names.iter().copied().collect()
}

/// stdout of a run that succeeded, parsed as one JSON document.
fn document(output: &Output) -> Value {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    parse(output)
}

fn parse(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("stdout is not one JSON document ({e}): {}", String::from_utf8_lossy(&output.stdout))
    })
}

/// A URL where no worker listens.
fn nobody_listens() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

fn worker_url(world: &TestWorld) -> String {
    format!("http://{}", world.metrics_addrs.last().expect("a worker was started"))
}

fn checks(status: &Value) -> BTreeSet<&str> {
    status["problems"].as_array().unwrap().iter().map(|p| p["check"].as_str().unwrap()).collect()
}

const DEAD_LETTER_FIELDS: &[&str] = &[
    "id",
    "event",
    "account_id",
    "reason",
    "class",
    "attempts",
    "received_at",
    "first_attempt_at",
    "dead_at",
    "rebuilt",
    "endpoint",
];
const REPORT_FIELDS: &[&str] = &["action", "outcome", "batch_id", "selected", "acted", "skipped", "rebuilt"];

#[sqlx::test(migrations = "../migrations")]
async fn status_json_is_one_document_with_queues_dead_letters_workers_and_problems(pool: PgPool) {
    let mut world = world_with_dead_letters(pool, &["acct-a"]).await;
    world.start_worker().await;
    let updated = world.publish(&body("mono.events.account_updated", "acct-z")).await;
    world.settled(&updated).await;
    let (ready, gone) = (worker_url(&world), nobody_listens());

    let status = document(
        &world.run_cli(&["status", "--json", "--worker-url", &ready, "--worker-url", &gone], "").await,
    );

    assert_eq!(
        keys(&status),
        set(&[
            "queues",
            "queues_error",
            "database_error",
            "dead_letters",
            "last_processed",
            "unfinished_actions",
            "workers",
            "problems",
            "ok"
        ])
    );
    let queues = status["queues"].as_array().unwrap();
    assert_eq!(queues.len(), world.broker.topology.queues().len(), "{queues:?}");
    assert_eq!(keys(&queues[0]), set(&["queue", "role", "messages", "consumers", "depth_known"]));
    assert_eq!(
        (&queues[0]["queue"], &queues[0]["role"]),
        (&Value::from(world.broker.topology.work_queue()), &Value::from("work"))
    );
    assert_eq!(queues[1]["role"], "retry");
    let dead = queues.last().unwrap();
    assert_eq!(
        (&dead["queue"], &dead["role"], &dead["messages"]),
        (&Value::from(world.dead_queue()), &Value::from("dead"), &Value::from(0)),
        "a conveyor the worker drains"
    );
    assert!(status["queues_error"].is_null() && status["database_error"].is_null());
    assert_eq!(
        keys(&status["dead_letters"]),
        set(&["stored", "in_queue", "outbox", "oldest_at", "older_than_max_age", "max_age_days"])
    );
    assert_eq!(status["dead_letters"]["older_than_max_age"], 0);
    assert_eq!(status["dead_letters"]["stored"], 2);
    assert_eq!(status["dead_letters"]["in_queue"], 0);
    assert_eq!(status["dead_letters"]["outbox"], 0);
    assert!(status["dead_letters"]["oldest_at"].is_string());
    let last = &status["last_processed"];
    assert_eq!(keys(last), set(&["event", "status", "received_at", "processed_at", "lag_ms"]));
    assert_eq!(
        (&last["event"], &last["status"]),
        (&Value::from("mono.events.account_updated"), &Value::from("processed"))
    );
    assert!(last["lag_ms"].is_i64(), "{last}");
    assert_eq!(status["unfinished_actions"], 0);
    let workers = status["workers"].as_array().unwrap();
    let worker_fields = set(&[
        "url",
        "reachable",
        "ready",
        "status",
        "database",
        "broker",
        "consumer",
        "mono_circuit",
        "mono_key",
        "mono_refusing_alike",
    ]);
    assert_eq!(keys(&workers[0]), worker_fields);
    assert_eq!(workers[0]["url"], ready.as_str());
    assert_eq!(
        (&workers[0]["reachable"], &workers[0]["ready"]),
        (&Value::Bool(true), &Value::Bool(true)),
        "{}",
        workers[0]
    );
    assert_eq!(workers[0]["status"], "ready");
    assert_eq!(workers[0]["mono_circuit"], "closed");
    assert_eq!(workers[0]["mono_key"], "accepted");
    assert_eq!(workers[0]["mono_refusing_alike"], Value::Null);
    assert_eq!(keys(&workers[1]), worker_fields);
    assert_eq!((&workers[1]["reachable"], &workers[1]["ready"]), (&Value::Bool(false), &Value::Bool(false)));
    assert!(workers[1]["status"].is_null() && workers[1]["mono_circuit"].is_null());
    // Without --check, problems are reported but the command succeeds.
    assert_eq!(checks(&status), set(&["dead_letters_waiting", "worker_unreachable"]));
    for problem in status["problems"].as_array().unwrap() {
        assert_eq!(keys(problem), set(&["check", "subject", "detail"]));
    }
    assert_eq!(status["problems"][0]["subject"], gone.as_str(), "workers first, in the order given");
    assert_eq!(status["ok"], false);
}

#[sqlx::test(migrations = "../migrations")]
async fn status_check_exits_0_when_healthy_and_1_naming_what_is_wrong(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;
    let updated = world.publish(&body("mono.events.account_updated", "acct-z")).await;
    world.settled(&updated).await;
    let (ready, gone) = (worker_url(&world), nobody_listens());

    let healthy = world.run_cli(&["status", "--check", "--worker-url", &ready], "").await;
    assert_eq!(healthy.status.code(), Some(0), "{}", String::from_utf8_lossy(&healthy.stdout));
    assert!(String::from_utf8_lossy(&healthy.stdout).contains("check passed"));
    let healthy =
        document(&world.run_cli(&["status", "--check", "--json", "--worker-url", &ready], "").await);
    assert_eq!((&healthy["ok"], &healthy["problems"]), (&Value::Bool(true), &serde_json::json!([])));

    // A worker nobody answers for.
    let unready =
        world.run_cli(&["status", "--check", "--worker-url", &ready, "--worker-url", &gone], "").await;
    assert_eq!(unready.status.code(), Some(1));
    let text = String::from_utf8_lossy(&unready.stdout);
    assert!(
        text.contains("check failed") && text.contains("worker_unreachable") && text.contains(&gone),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&unready.stderr);
    assert_eq!(stderr, "worker: status check failed: worker_unreachable\n");

    // A dead letter waiting.
    let work = world.broker.topology.work_queue();
    world.broker.publish_to_queue(&work, b"not json", lapin::BasicProperties::default()).await;
    eventually("the poison is dead-lettered", PATIENCE, || async { world.count_status("dead").await == 1 })
        .await;
    let dead = world.run_cli(&["status", "--check", "--json", "--worker-url", &ready], "").await;
    assert_eq!(dead.status.code(), Some(1), "{}", String::from_utf8_lossy(&dead.stderr));
    let dead = parse(&dead);
    assert_eq!(checks(&dead), set(&["dead_letters_waiting"]));
    assert_eq!(dead["problems"][0]["subject"], world.dead_queue());
    assert_eq!(dead["ok"], false);
}

#[sqlx::test(migrations = "../migrations")]
async fn dlq_commands_print_the_documented_json(pool: PgPool) {
    let world = world_with_dead_letters(pool, &["acct-a", "acct-b"]).await;

    // list: an array of dead letters, of causes, of actions.
    let list = document(&world.run_cli(&["dlq", "list", "--json"], "").await);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for letter in list {
        assert_eq!(keys(letter), set(DEAD_LETTER_FIELDS));
        assert_eq!(letter["rebuilt"], false);
    }
    let classes: BTreeSet<&str> = list.iter().map(|l| l["class"].as_str().unwrap()).collect();
    assert_eq!(classes, set(&["permanent", "poison"]));
    let groups = document(&world.run_cli(&["dlq", "list", "--group-by", "reason", "--json"], "").await);
    assert_eq!(keys(&groups[0]), set(&["reason", "count", "first", "last"]));
    assert_eq!(groups[0]["count"], 2);

    // show: one document.
    let id = list.iter().find(|l| l["account_id"] == "acct-a").unwrap()["id"].as_str().unwrap().to_owned();
    let record = document(&world.run_cli(&["dlq", "show", &id, "--json"], "").await);
    assert_eq!(keys(&record), set(&["id", "dead_letter", "journal", "actions"]));
    assert_eq!(record["id"], id.as_str());
    assert_eq!(
        keys(&record["dead_letter"]),
        set(&[
            "class",
            "reason",
            "attempts",
            "first_attempt_at",
            "dead_at",
            "headers",
            "body",
            "rebuilt",
            "endpoint"
        ])
    );
    assert_eq!(
        keys(&record["journal"]),
        set(&[
            "id",
            "event",
            "account_id",
            "status",
            "attempts",
            "last_error",
            "received_at",
            "first_attempt_at",
            "processed_at",
            "body_sha256",
            "payload"
        ])
    );
    assert_eq!(world.dead_letter_count().await, 3, "show leaves every letter");

    // replay --dry-run: JSON lines, one per dead letter, and nothing else on stdout.
    let run = world.run_cli(&["dlq", "replay", "--all", "--dry-run", "--json"], "").await;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<Value> = String::from_utf8(run.stdout.clone())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(String::from_utf8_lossy(&run.stderr), "dry run: 3 dead letter(s) examined, nothing changed\n");
    for line in &lines {
        assert_eq!(
            keys(line),
            set(&["id", "event", "account_id", "outcome", "calls_mono", "changes", "detail"])
        );
    }
    let apply = lines.iter().find(|l| l["account_id"] == "acct-a").unwrap();
    assert_eq!(apply["outcome"], "apply");
    assert_eq!(apply["calls_mono"], true);
    assert_eq!(
        apply["changes"],
        serde_json::json!([
            { "field": "reauth_required", "from": "false", "to": "true" },
            { "field": "reauth_token", "from": "none", "to": "new token" },
        ])
    );
    assert!(apply["detail"].as_str().unwrap().starts_with("apply (after a token from Mono"), "{apply}");
    let poison = lines.iter().find(|l| l["account_id"].is_null()).unwrap();
    assert_eq!(
        (&poison["outcome"], &poison["changes"]),
        (&Value::from("would_fail"), &serde_json::json!([]))
    );
    assert_eq!(world.count_status("dead").await, 3, "a dry run changes nothing");

    // replay: one document saying what was done.
    let replay = document(&world.run_cli(&["dlq", "replay", "--account", "acct-a", "--json"], "").await);
    assert_eq!(keys(&replay), set(REPORT_FIELDS));
    assert_eq!((&replay["action"], &replay["outcome"]), (&Value::from("replay"), &Value::from("done")));
    assert_eq!(
        (&replay["selected"], &replay["acted"], &replay["skipped"], &replay["rebuilt"]),
        (&Value::from(1), &Value::from(1), &serde_json::json!([]), &serde_json::json!([]))
    );
    let batch = replay["batch_id"].as_str().unwrap().to_owned();
    assert_eq!(
        (world.dead_letter_count().await, world.outbox_count().await),
        (2, 1),
        "acct-b and the poison stay dead; the copy waits in the outbox"
    );

    // purge --yes: the same document.
    let purge = document(
        &world.run_cli(&["dlq", "purge", "--reason", "invalid payload", "--yes", "--json"], "").await,
    );
    assert_eq!(keys(&purge), set(REPORT_FIELDS));
    assert_eq!(
        (&purge["action"], &purge["outcome"], &purge["acted"], &purge["skipped"]),
        (&Value::from("purge"), &Value::from("done"), &Value::from(1), &serde_json::json!([]))
    );
    assert_eq!(world.dead_letter_count().await, 1, "acct-b stays dead");

    let actions = document(&world.run_cli(&["dlq", "list", "--actions", "--json"], "").await);
    let actions = actions.as_array().unwrap();
    assert_eq!(actions.len(), 2);
    for action in actions {
        assert_eq!(
            keys(action),
            set(&[
                "batch_id",
                "action",
                "delivery_id",
                "event",
                "account_id",
                "actor",
                "note",
                "forced",
                "started_at",
                "completed_at"
            ])
        );
    }
    assert_eq!(
        (&actions[1]["action"], &actions[1]["batch_id"]),
        (&Value::from("replay"), &Value::from(batch))
    );
}
