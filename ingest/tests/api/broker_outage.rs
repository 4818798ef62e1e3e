use std::time::{Duration, Instant};

use crate::helpers::{json, spawn_app, spawn_app_behind_proxy};
use ingest::config::IngestConfig;
use ingest::startup::Application;
use shared::testing::{eventually, fixture};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn health_and_readiness_report_ok_with_a_connected_broker() {
    let app = spawn_app().await;

    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 200);
    assert_eq!(json(ready).await["status"], "ready");
}

#[tokio::test]
async fn broker_down_gives_a_fast_503_and_ingest_recovers_by_itself() {
    let proxied = spawn_app_behind_proxy().await;
    let app = &proxied.app;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);

    proxied.proxy.cut();
    eventually("readyz reports the broker down", Duration::from_secs(5), || async {
        app.get("/readyz").await.status().as_u16() == 503
    })
    .await;
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200, "the process itself is fine");

    let started = Instant::now();
    let response = app.post_webhook(fixture("account_updated.json")).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");

    proxied.proxy.restore().await;
    eventually("ingest reconnects", Duration::from_secs(15), || async {
        app.get("/readyz").await.status().as_u16() == 200
    })
    .await;
    let response = app.post_webhook(fixture("account_updated.json")).await;
    assert_eq!(response.status().as_u16(), 200);
    // The first and the last webhook are queued; the one answered 503 is not.
    assert_eq!(app.queued().await.len(), 2);
}

#[tokio::test]
async fn a_reconnect_to_a_node_without_the_topology_refuses_it_and_creates_nothing() {
    let proxied = spawn_app_behind_proxy().await;
    let app = &proxied.app;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);
    // The node reached after the outage has none of our objects (a broker that formed a cluster of
    // its own): declaring them there would take webhooks that no worker ever sees.
    proxied.proxy.cut();
    app.broker.topology.delete(&app.broker.channel).await.expect("the topology goes");
    proxied.proxy.restore().await;
    let connections = proxied.proxy.connections_accepted();
    eventually("ingest tries the node again", Duration::from_secs(15), || async {
        proxied.proxy.connections_accepted() > connections + 1
    })
    .await;

    assert_eq!(app.get("/readyz").await.status().as_u16(), 503, "a refused node is not a session");
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 503);
    let check = app.broker.topology.check_on(&app.broker.connection).await;
    assert!(
        matches!(check, Err(shared::topology::TopologyError::Missing { .. })),
        "the reconnect declared the topology: {check:?}"
    );
    let metrics = reqwest::get(&app.metrics).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("monohook_ingest_nodes_refused_total"), "{metrics}");

    // Declared again (a restarted process does it at start), the node is taken.
    app.broker.topology.declare_on(&app.broker.connection).await.expect("declared again");
    eventually("ingest takes the node again", Duration::from_secs(15), || async {
        app.get("/readyz").await.status().as_u16() == 200
    })
    .await;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);
}

#[tokio::test]
async fn a_broker_that_stops_answering_gives_503_within_the_publish_timeout() {
    let proxy = shared::testing::TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = crate::helpers::proxied_amqp_url(&proxy);
    let app = crate::helpers::spawn_app_with(|config| {
        config.broker.amqp_url = url.into();
        config.publish_timeout_ms = 500;
    })
    .await;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);

    // Connections stay open but nothing comes back: no error, no confirm.
    proxy.stall();
    let started = Instant::now();
    let response = app.post_webhook(fixture("account_updated.json")).await;
    let elapsed = started.elapsed();

    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");
}

#[tokio::test]
async fn start_fails_fast_with_one_clear_line_when_the_broker_is_unreachable() {
    use clap::Parser;
    let config = IngestConfig::parse_from([
        "ingest",
        "--mono-webhook-secret",
        "s",
        "--listen-addr",
        "127.0.0.1:0",
        "--amqp-url",
        "amqp://guest:hunter2@127.0.0.1:1/%2f",
    ]);

    let error = match Application::build(config, CancellationToken::new()).await {
        Ok(_) => panic!("ingest started without a broker"),
        Err(error) => format!("{error:#}"),
    };

    assert!(error.starts_with("cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");
}

/// An ingest given two nodes, both proxies to the real broker, that is connected to the first: the
/// second is down while ingest starts, then comes back.
async fn app_on_the_first_of_two_nodes(
    deadline_ms: u32,
) -> (crate::helpers::TestApp, shared::testing::TcpProxy, shared::testing::TcpProxy) {
    let first = shared::testing::TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let second = shared::testing::TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let nodes =
        format!("{},{}", crate::helpers::proxied_amqp_url(&first), crate::helpers::proxied_amqp_url(&second));
    second.cut();
    let app = crate::helpers::spawn_app_with(|config| {
        config.broker.amqp_url = shared::config::amqp_node_list(&nodes).unwrap();
        config.publish_timeout_ms = 300;
        config.publish_deadline_ms = Some(shared::config::OptionalCount(Some(deadline_ms)));
    })
    .await;
    second.restore().await;
    (app, first, second)
}

#[tokio::test]
async fn a_publish_whose_node_dies_under_it_is_published_again_on_the_next_node() {
    let (app, first, _second) = app_on_the_first_of_two_nodes(5_000).await;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);

    // The node freezes with the publish in flight, then dies (its connections reset).
    first.stall();
    let posting = tokio::spawn({
        let url = app.address.clone();
        async move {
            let started = Instant::now();
            let status = reqwest::Client::new()
                .post(format!("{url}/webhooks/mono"))
                .header("mono-webhook-secret", crate::helpers::SECRET)
                .body(fixture("account_updated.json"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            (status, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.cut();
    let (status, took) = posting.await.unwrap();

    assert_eq!(status.unwrap(), 200, "answered 200 from the next node, no retry asked of Mono");
    assert!(took < Duration::from_secs(5), "within the deadline: {took:?}");
    // The copy on the dead node never reached the broker: one message each.
    assert_eq!(app.queued().await.len(), 2);
}

#[tokio::test]
async fn a_frozen_node_is_left_for_the_next_and_readiness_says_so_meanwhile() {
    // A walk may try the frozen node once more (its connect times out after 5 s): a long deadline.
    let (app, first, _second) = app_on_the_first_of_two_nodes(15_000).await;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);

    // Connections stay open, nothing comes back: no error, no confirm, no reset.
    first.stall();
    let posting = tokio::spawn({
        let url = app.address.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/webhooks/mono"))
                .header("mono-webhook-secret", crate::helpers::SECRET)
                .body(fixture("account_updated.json"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    eventually(
        "readyz says not ready while ingest leaves the frozen node",
        Duration::from_secs(5),
        || async { app.get("/readyz").await.status().as_u16() == 503 },
    )
    .await;

    assert_eq!(posting.await.unwrap().unwrap(), 200, "published on the next node");
    eventually("ready again on the next node", Duration::from_secs(15), || async {
        app.get("/readyz").await.status().as_u16() == 200
    })
    .await;
    assert_eq!(app.queued().await.len(), 2);
}

/// An ingest behind a proxy (publish timeout 300 ms) that has had one webhook taken; then, beside the
/// work queue, a queue that takes nothing, so that the broker nacks every publish, as a channel still
/// addressing a quorum queue's old leader is answered during an election. Returns the ingest, the
/// connections its proxy had taken before the nacks, and the nacking queue's name.
///
/// Whether ingest left its session is read from those connections (a new one per session), not from
/// `/metrics`: the metrics registry is one per test process, shared by the tests running beside.
async fn published_once_then_nacked() -> (crate::helpers::ProxiedApp, usize, String) {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let proxied = crate::helpers::spawn_app_behind_proxy_with(|config| config.publish_timeout_ms = 300).await;
    let app = &proxied.app;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);
    let sessions = proxied.proxy.connections_accepted();

    let nacker = format!("{}.nacker", app.broker.prefix);
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let channel = &app.broker.channel;
    channel.queue_declare(nacker.as_str().into(), QueueDeclareOptions::default(), arguments).await.unwrap();
    channel
        .queue_bind(
            nacker.as_str().into(),
            app.broker.topology.exchange().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (proxied, sessions, nacker)
}

#[tokio::test]
async fn a_node_that_only_nacks_is_left_like_one_that_confirms_nothing() {
    let (proxied, sessions, nacker) = published_once_then_nacked().await;
    let app = &proxied.app;

    // Nacks only, for more than three publish timeouts: the session is condemned.
    let started = Instant::now();
    while proxied.proxy.connections_accepted() == sessions {
        assert!(started.elapsed() < Duration::from_secs(5), "a node that only nacks was never left");
        assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    app.broker.channel.queue_delete(nacker.as_str().into(), Default::default()).await.unwrap();
    eventually("a webhook is taken again", Duration::from_secs(10), || async {
        app.post_webhook(fixture("account_updated.json")).await.status().as_u16() == 200
    })
    .await;
}

#[tokio::test]
async fn one_nack_after_a_quiet_spell_does_not_leave_the_node() {
    let (proxied, sessions, nacker) = published_once_then_nacked().await;
    let app = &proxied.app;
    // Quiet for longer than three publish timeouts: no ack since.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // One webhook, nacked on each try until its deadline (one publish timeout here): 503.
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 503);
    app.broker.channel.queue_delete(nacker.as_str().into(), Default::default()).await.unwrap();

    assert_eq!(app.get("/readyz").await.status().as_u16(), 200);
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);
    assert_eq!(
        proxied.proxy.connections_accepted(),
        sessions,
        "one refused webhook after a quiet spell left a healthy node"
    );
}

#[tokio::test]
async fn a_confirm_slower_than_the_publish_timeout_answers_with_one_copy_and_no_move() {
    let proxied = crate::helpers::spawn_app_behind_proxy_with(|config| {
        config.publish_timeout_ms = 300;
        config.publish_deadline_ms = Some(shared::config::OptionalCount(Some(5_000)));
    })
    .await;
    let app = &proxied.app;
    assert_eq!(app.post_webhook(fixture("account_updated.json")).await.status().as_u16(), 200);
    assert_eq!(app.queued().await.len(), 1);
    let sessions = proxied.proxy.connections_accepted();

    // The broker's answers (confirms among them) take 700 ms: more than two publish timeouts, less
    // than the three of silence that leave a node (quorum commits on a slow disk, across zones).
    proxied.proxy.delay_answers(Duration::from_millis(700));
    let started = Instant::now();
    let status = app.post_webhook(fixture("account_updated.json")).await.status().as_u16();
    let took = started.elapsed();
    proxied.proxy.delay_answers(Duration::ZERO);

    assert_eq!(status, 200, "the late confirm answered");
    assert!(took < Duration::from_millis(1_500), "answered by the first copy's confirm: {took:?}");
    assert_eq!(proxied.proxy.connections_accepted(), sessions, "a slow node is not a bad node");
    assert_eq!(app.get("/readyz").await.status().as_u16(), 200);
    assert_eq!(app.queued().await.len(), 1, "one copy: none was published again while the first was pending");
}
