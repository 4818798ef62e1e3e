//! Notifications to the app's backend: written with the change that causes them, delivered signed
//! (checked by the Standard Webhooks reference library, not by our code), in order per account, the
//! same `webhook-id` on every try, and a dead letter when no try is left.

use base64::Engine;
use sqlx::PgPool;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::dlq::stdout;
use crate::helpers::{ACCOUNT, PATIENCE, TestWorld, body};
use shared::testing::eventually;

const OLD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW_SECRET: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3ItdGhlLXJvdGF0aW9uIQ==";

/// An endpoint list with one endpoint per (name, url, events); both secrets sign (a rotation).
fn endpoints(list: &[(&str, String, Option<&[&str]>)]) -> String {
    let list: Vec<serde_json::Value> = list
        .iter()
        .map(|(name, url, events)| {
            let mut endpoint =
                serde_json::json!({ "name": name, "url": url, "secrets": [OLD_SECRET, NEW_SECRET] });
            if let Some(events) = events {
                endpoint["events"] = serde_json::json!(events);
            }
            endpoint
        })
        .collect();
    serde_json::to_string(&list).unwrap()
}

async fn app_answering(status: u16) -> MockServer {
    let app = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(status))
        .mount(&app)
        .await;
    app
}

async fn start_notifying(world: &mut TestWorld, endpoints: String, extra: &[&str]) {
    let mut flags =
        vec!["--notify-endpoints", endpoints.as_str(), "--notify-allow-private-addresses", "true"];
    if !extra.contains(&"--notify-retry-schedule-secs") {
        flags.extend(["--notify-retry-schedule-secs", "1,1"]);
    }
    flags.extend_from_slice(extra);
    world.start_worker_with(&flags).await;
}

/// The notifications `app` received so far, as (type, sequence, webhook-id).
async fn received(app: &MockServer) -> Vec<(String, i64, String)> {
    app.received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            (
                body["type"].as_str().unwrap().to_owned(),
                body["data"]["sequence"].as_i64().unwrap(),
                header(request, "webhook-id"),
            )
        })
        .collect()
}

fn header(request: &Request, name: &str) -> String {
    request.headers.get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

async fn wait_for(app: &MockServer, count: usize) -> Vec<(String, i64, String)> {
    eventually(&format!("{count} notification(s) arrive"), PATIENCE, || async {
        received(app).await.len() >= count
    })
    .await;
    received(app).await
}

/// What the reference library says of each request, verified with `secret`, and whether its body
/// conforms to the `Notification` schema of api/openapi.json (checked by PyPI's jsonschema).
fn verify_with_reference_library(secret: &str, requests: &[Request]) -> Vec<String> {
    let python = std::env::var("STANDARDWEBHOOKS_PYTHON").unwrap_or_else(|_| {
        format!("{}/../target/standardwebhooks-venv/bin/python", env!("CARGO_MANIFEST_DIR"))
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "the Standard Webhooks verifier is not installed at {python}: ./scripts/test installs it"
    );
    let messages: Vec<serde_json::Value> = requests
        .iter()
        .map(|request| {
            let headers: serde_json::Map<String, serde_json::Value> = request
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_str().unwrap().into()))
                .collect();
            serde_json::json!({
                "body_b64": base64::engine::general_purpose::STANDARD.encode(&request.body),
                "headers": headers,
            })
        })
        .collect();
    let mut child = std::process::Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/verify-notifications.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let openapi = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/openapi.json");
    let input = serde_json::json!({ "secret": secret, "openapi": openapi, "messages": messages });
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().lines().map(str::to_owned).collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_reauth_and_its_end_reach_the_app_signed_in_order_and_verified_by_the_reference_library(
    pool: PgPool,
) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let app = app_answering(204).await;
    start_notifying(&mut world, endpoints(&[("app", format!("{}/hooks", app.uri()), None)]), &[]).await;

    for event in [
        "mono.events.reauthorisation_required",
        "mono.events.account_reauthorized",
        "mono.events.account_updated",
    ] {
        let meta = world.publish(&body(event, ACCOUNT)).await;
        assert_eq!(world.settled(&meta).await.status, "processed");
    }
    let got = wait_for(&app, 3).await;
    let kinds: Vec<(&str, i64)> = got.iter().map(|(kind, seq, _)| (kind.as_str(), *seq)).collect();
    assert_eq!(
        kinds,
        [("account.reauth_required", 1), ("account.reauthorized", 2), ("account.data_available", 3)]
    );
    let ids: std::collections::HashSet<&str> = got.iter().map(|(_, _, id)| id.as_str()).collect();
    assert_eq!(ids.len(), 3, "each notification has its own webhook-id");

    let requests = app.received_requests().await.unwrap();
    for request in &requests {
        let body = String::from_utf8(request.body.clone()).unwrap();
        assert!(!body.contains("tok-1"), "a notification carries no token: {body}");
        assert_eq!(header(request, "content-type"), "application/json");
    }
    // Either secret verifies during a rotation: an app may switch at any time.
    for secret in [OLD_SECRET, NEW_SECRET] {
        assert_eq!(
            verify_with_reference_library(secret, &requests),
            ["ok account.reauth_required", "ok account.reauthorized", "ok account.data_available"],
            "with {secret:.10}…"
        );
    }
    // The verifier can refuse: a body changed in transit, another secret, a stale timestamp.
    let mut tampered = requests[0].clone();
    tampered.body = tampered.body.iter().map(|b| if *b == b'1' { b'2' } else { *b }).collect();
    let mut stale = requests[0].clone();
    let old = (chrono::Utc::now() - chrono::Duration::minutes(6)).timestamp().to_string();
    stale.headers.insert("webhook-timestamp", old.parse().unwrap());
    let verdicts = verify_with_reference_library(OLD_SECRET, &[tampered, stale]);
    assert!(verdicts.iter().all(|v| v.starts_with("refused")), "{verdicts:?}");
    let other =
        verify_with_reference_library("whsec_b3RoZXItc2VjcmV0LW9mLXNvbWVvbmUtZWxzZQ==", &requests[..1]);
    assert!(other[0].starts_with("refused"), "{other:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_duplicate_and_a_state_that_does_not_change_notify_nothing(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let app = app_answering(200).await;
    start_notifying(&mut world, endpoints(&[("app", format!("{}/hooks", app.uri()), None)]), &[]).await;

    let required = body("mono.events.reauthorisation_required", ACCOUNT);
    let first = world.publish(&required).await;
    assert_eq!(world.settled(&first).await.status, "processed");
    let copy = world.publish(&required).await;
    assert_eq!(world.settled(&copy).await.status, "duplicate");
    // Already unflagged: an account_updated without a re-auth, an account_connected.
    for event in ["mono.events.account_updated", "mono.events.account_connected"] {
        let meta = world.publish(&body(event, "other-account")).await;
        world.settled(&meta).await;
    }
    wait_for(&app, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = received(&app).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "account.reauth_required");
    let written: i64 = sqlx::query_scalar("SELECT notification_seq FROM accounts WHERE id = $1")
        .bind(ACCOUNT)
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(written, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn each_endpoint_gets_only_the_kinds_it_takes(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let (all, unlinks) = (app_answering(200).await, app_answering(200).await);
    let list = endpoints(&[
        ("all", format!("{}/hooks", all.uri()), None),
        ("unlinks", format!("{}/hooks", unlinks.uri()), Some(&["account.unlinked"])),
    ]);
    start_notifying(&mut world, list, &[]).await;
    for event in ["mono.events.reauthorisation_required", "mono.events.account_unlinked"] {
        let meta = world.publish(&body(event, ACCOUNT)).await;
        assert_eq!(world.settled(&meta).await.status, "processed");
    }
    let every = wait_for(&all, 2).await;
    assert_eq!(
        every.iter().map(|(k, s, _)| (k.as_str(), *s)).collect::<Vec<_>>(),
        [("account.reauth_required", 1), ("account.unlinked", 2)]
    );
    let only = wait_for(&unlinks, 1).await;
    assert_eq!(only.len(), 1);
    assert_eq!(
        (only[0].0.as_str(), only[0].1),
        ("account.unlinked", 2),
        "the account's sequence, gaps and all"
    );
    assert_eq!(only[0].2, every[1].2, "one notification, one webhook-id, whichever endpoint");
}

/// An endpoint that takes 5 s to answer holds up only itself: another endpoint gets a notification
/// written while the slow one is still out at once, and once both took everything no notification
/// row is left behind (the two deliveries of one notification end one after the other).
#[sqlx::test(migrations = "../migrations")]
async fn a_slow_endpoint_holds_up_only_itself(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token("acc-1", "tok").await;
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204).set_delay(Duration::from_secs(5)))
        .mount(&slow)
        .await;
    let fast = app_answering(204).await;
    let list = endpoints(&[
        ("slow", format!("{}/hooks", slow.uri()), None),
        ("fast", format!("{}/hooks", fast.uri()), None),
    ]);
    start_notifying(&mut world, list, &[]).await;
    let first = world.publish(&body("mono.events.reauthorisation_required", "acc-1")).await;
    world.settled(&first).await;
    wait_for(&fast, 1).await;
    let second = world.publish(&body("mono.events.account_unlinked", "acc-2")).await;
    world.settled(&second).await;
    let since = std::time::Instant::now();
    wait_for(&fast, 2).await;
    assert!(
        since.elapsed() < Duration::from_secs(3),
        "the fast endpoint waited for the slow one: {:?}",
        since.elapsed()
    );
    wait_for(&slow, 2).await;
    eventually("every notification row is gone once both endpoints took it", PATIENCE, || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifications").fetch_one(&world.pool).await.unwrap();
        left == 0
    })
    .await;
}

/// An endpoint that fails gets the same `webhook-id` on every try, a later notification of the
/// account waits for the earlier one, and after the last try the notification is a dead letter that
/// names the endpoint.
#[sqlx::test(migrations = "../migrations")]
async fn a_failing_endpoint_keeps_the_id_and_the_order_then_a_dead_letter_holds_it(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let app = app_answering(503).await;
    let list = endpoints(&[("app", format!("{}/hooks", app.uri()), None)]);
    start_notifying(&mut world, list, &["--notify-breaker-open-secs", "1"]).await;
    for event in ["mono.events.reauthorisation_required", "mono.events.account_reauthorized"] {
        let meta = world.publish(&body(event, ACCOUNT)).await;
        assert_eq!(world.settled(&meta).await.status, "processed");
    }
    // Schedule 1,1: three tries of the first, none of the second meanwhile, then the second's three.
    let letters = world.dead_letters(2).await;
    let got = received(&app).await;
    let sequences: Vec<i64> = got.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(sequences, [1, 1, 1, 2, 2, 2], "in order per account, three tries each");
    assert!(
        got[..3].iter().all(|(_, _, id)| *id == got[0].2)
            && got[3..].iter().all(|(_, _, id)| *id == got[3].2)
    );
    assert_ne!(got[0].2, got[3].2);
    let endpoint: Vec<Option<String>> =
        sqlx::query_scalar("SELECT endpoint FROM dead_letters ORDER BY dead_at")
            .fetch_all(&world.pool)
            .await
            .unwrap();
    assert_eq!(endpoint, [Some("app".to_owned()), Some("app".to_owned())]);
    assert_eq!(letters[0].class, "exhausted");
    assert!(letters[0].reason.contains("503"), "{}", letters[0].reason);
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_deliveries")
        .fetch_one(&world.pool)
        .await
        .unwrap();
    assert_eq!(waiting, 0);
}

/// How the failed tries of `endpoint`'s deliveries ended, once `count` have one.
async fn last_errors(world: &TestWorld, count: i64) -> Vec<(String, String)> {
    eventually("the tries failed", PATIENCE, || async {
        let failed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE last_error IS NOT NULL")
                .fetch_one(&world.pool)
                .await
                .unwrap();
        failed == count
    })
    .await;
    sqlx::query_as("SELECT endpoint, last_error FROM notification_deliveries ORDER BY endpoint")
        .fetch_all(&world.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_redirect_is_not_followed(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let elsewhere = app_answering(200).await;
    let redirecting = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(307).insert_header("location", format!("{}/hooks", elsewhere.uri())),
        )
        .mount(&redirecting)
        .await;
    let list = endpoints(&[("redirecting", format!("{}/hooks", redirecting.uri()), None)]);
    start_notifying(&mut world, list, &["--notify-retry-schedule-secs", "30"]).await;
    let meta = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    assert_eq!(world.settled(&meta).await.status, "processed");

    let errors = last_errors(&world, 1).await;
    assert!(errors[0].1.contains("307") && errors[0].1.contains("not followed"), "{errors:?}");
    assert_eq!(redirecting.received_requests().await.unwrap().len(), 1);
    assert!(elsewhere.received_requests().await.unwrap().is_empty(), "the redirect was followed");
}

/// An endpoint slower than NOTIFY_TIMEOUT_MS: the try is cut there and counted a failure.
#[sqlx::test(migrations = "../migrations")]
async fn a_try_longer_than_the_timeout_is_cut_and_tried_again(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204).set_delay(Duration::from_secs(5)))
        .mount(&slow)
        .await;
    let list = endpoints(&[("slow", format!("{}/hooks", slow.uri()), None)]);
    start_notifying(&mut world, list, &["--notify-timeout-ms", "300", "--notify-retry-schedule-secs", "30"])
        .await;
    let started = std::time::Instant::now();
    let meta = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    assert_eq!(world.settled(&meta).await.status, "processed");
    let errors = last_errors(&world, 1).await;
    assert!(errors[0].1.contains("timed out"), "{errors:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the try was not cut at its timeout: {:?}",
        started.elapsed()
    );
}

/// An app that answers 200 and then streams its answer without end: the sender reads 4 KiB of it
/// at most, so the try is delivered at once (an unbounded read would run into the timeout, and
/// hold the body in the worker's memory until then).
#[sqlx::test(migrations = "../migrations")]
async fn an_endless_answer_is_read_only_in_part(pool: PgPool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The request is small: its head and body come in the first reads.
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                while !String::from_utf8_lossy(&request).contains("\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
                while socket.write_all(chunk.as_bytes()).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
    });
    let list = endpoints(&[("endless", format!("http://{address}/hooks"), None)]);
    start_notifying(&mut world, list, &["--notify-timeout-ms", "3000", "--notify-retry-schedule-secs", "30"])
        .await;
    let started = std::time::Instant::now();
    let meta = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    assert_eq!(world.settled(&meta).await.status, "processed");
    eventually("the notification was delivered", PATIENCE, || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifications").fetch_one(&world.pool).await.unwrap();
        left == 0
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "the answer was read past its first KiBs: delivered after {:?}",
        started.elapsed()
    );
}

/// A name that resolves to a private address is refused when the connection is made (not only at
/// start: a name can change what it resolves to), unless private addresses are allowed.
#[sqlx::test(migrations = "../migrations")]
async fn a_name_that_resolves_to_a_private_address_is_refused(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let private = app_answering(200).await;
    let by_name = format!("http://localhost:{}/hooks", private.address().port());
    let list = endpoints(&[("private", by_name, None)]);
    world.start_worker_with(&["--notify-endpoints", &list, "--notify-retry-schedule-secs", "30"]).await;
    let meta = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    assert_eq!(world.settled(&meta).await.status, "processed");

    let errors = last_errors(&world, 1).await;
    assert!(errors[0].1.contains("private or reserved"), "{errors:?}");
    assert!(private.received_requests().await.unwrap().is_empty(), "a private address was reached");
}

/// An endpoint that fails every try opens its breaker; the other endpoint is not slowed at all.
#[sqlx::test(migrations = "../migrations")]
async fn a_dead_endpoint_costs_the_others_nothing(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    let (dead, alive) = (app_answering(500).await, app_answering(200).await);
    world.mono_issues_token("acc-0", "tok").await;
    let list = endpoints(&[
        ("dead", format!("{}/hooks", dead.uri()), None),
        ("alive", format!("{}/hooks", alive.uri()), None),
    ]);
    start_notifying(
        &mut world,
        list,
        &["--notify-retry-schedule-secs", "1,1,1,1,1,1,1,1", "--notify-breaker-open-secs", "600"],
    )
    .await;
    let started = std::time::Instant::now();
    for n in 0..12 {
        let meta = world.publish(&body("mono.events.account_unlinked", &format!("acc-{n}"))).await;
        world.settled(&meta).await;
    }
    wait_for(&alive, 12).await;
    let took = started.elapsed();
    // Five failures in a row open the dead endpoint's breaker for 10 minutes (the tries already
    // under way when it opens still end): no try at all meanwhile, although every wait is 1 s.
    eventually("the dead endpoint's breaker opens", PATIENCE, || async {
        world.metrics().await.contains(r#"monohook_worker_notify_breaker_open{endpoint="dead"} 1"#)
    })
    .await;
    let tries = dead.received_requests().await.unwrap().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(tries >= 5, "{tries}");
    assert_eq!(dead.received_requests().await.unwrap().len(), tries, "tried while its breaker was open");
    assert!(world.metrics().await.contains(r#"monohook_worker_notify_breaker_open{endpoint="dead"} 1"#));
    assert!(world.metrics().await.contains(r#"monohook_worker_notify_breaker_open{endpoint="alive"} 0"#));
    assert!(took < Duration::from_secs(10), "the live endpoint waited: {took:?}");
    let waiting: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE endpoint = 'dead'")
            .fetch_one(&world.pool)
            .await
            .unwrap();
    assert_eq!(waiting, 12, "the dead endpoint's notifications wait, none lost, none dead yet");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_endpoint_at_a_private_address_stops_the_start_unless_allowed(pool: PgPool) {
    let world = TestWorld::new(pool).await;
    let list = endpoints(&[("app", "http://127.0.0.1:9/hooks".to_owned(), None)]);
    let cli = world.cli(&["--notify-endpoints", &list]);
    let refused =
        worker::startup::Worker::build(&cli.broker, &cli.run, world.pool.clone()).await.err().unwrap();
    let text = format!("{refused:#}");
    assert!(text.contains("private or reserved"), "{text}");
    assert!(!text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "{text}");
}

/// A notification no try delivered is a dead letter like a webhook's: listed by its endpoint, a dry
/// run says it would be sent again, a replay sends it with its own webhook-id once the endpoint
/// works again, and a purge removes another, each recorded.
#[sqlx::test(migrations = "../migrations")]
async fn the_operator_tools_list_replay_and_purge_an_undelivered_notification(pool: PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.mono_issues_token(ACCOUNT, "tok-1").await;
    let app = MockServer::start().await;
    let refusing =
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(500)).mount_as_scoped(&app).await;
    let list = endpoints(&[("app", format!("{}/hooks", app.uri()), None)]);
    start_notifying(&mut world, list, &["--notify-retry-schedule-secs", "1"]).await;
    for event in ["mono.events.reauthorisation_required", "mono.events.account_reauthorized"] {
        let meta = world.publish(&body(event, ACCOUNT)).await;
        assert_eq!(world.settled(&meta).await.status, "processed");
    }
    let letters = world.dead_letters(2).await;
    let first_id = received(&app).await[0].2.clone();
    drop(refusing);
    app.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&app).await;

    let listed: serde_json::Value = serde_json::from_str(&stdout(
        &world.run_cli(&["dlq", "list", "--endpoint", "app", "--json"], "").await,
    ))
    .unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["event"], "account.reauth_required");
    assert_eq!(listed[0]["endpoint"], "app");
    let dry = stdout(
        &world.run_cli(&["dlq", "replay", "--endpoint", "app", "--limit", "1", "--dry-run"], "").await,
    );
    assert!(dry.contains("send again to endpoint app"), "{dry}");

    let replay = world
        .run_cli(
            &["dlq", "replay", "--endpoint", "app", "--limit", "1", "--reason-note", "the app is back"],
            "",
        )
        .await;
    stdout(&replay);
    let got = wait_for(&app, 1).await;
    assert_eq!((got[0].0.as_str(), got[0].1), ("account.reauth_required", 1));
    assert_eq!(got[0].2, first_id, "the replay sends the notification's own webhook-id");
    let purge = world
        .run_cli(&["dlq", "purge", "--endpoint", "app", "--yes", "--reason-note", "told by phone"], "")
        .await;
    stdout(&purge);
    assert_eq!(world.dead_letter_count().await, 0);
    assert_eq!(world.actions_of(letters[0].id).await, [("replay".to_owned(), true)]);
    assert_eq!(world.actions_of(letters[1].id).await, [("purge".to_owned(), true)]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(received(&app).await.len(), 1, "the purged notification was sent");
}
