//! The worker rides out outages by itself. Each test cuts only its own connections, through a TCP
//! proxy in front of the real service, so tests beside it are not disturbed.

use lapin::options::QueueDeleteOptions;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::Duration;

use crate::helpers::{ACCOUNT, PATIENCE, TestWorld, body};
use shared::testing::{TcpProxy, TestBroker, amqp_url, eventually};
use shared::topology::Topology;

#[sqlx::test(migrations = "../migrations")]
async fn a_database_outage_holds_deliveries_unacked_and_processing_resumes(
    pool_options: PgPoolOptions,
    connect_options: PgConnectOptions,
) {
    let pool = pool_options.connect_with(connect_options.clone()).await.unwrap();
    let mut world = TestWorld::new(pool).await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied_pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(connect_options.host("127.0.0.1").port(proxy.addr().port()))
        .await
        .unwrap();
    let cli = world.cli(&[]);
    world.start_worker_on(cli, proxied_pool).await;
    let before = world.publish(&body("mono.events.account_updated", ACCOUNT)).await;
    assert_eq!(world.settled(&before).await.status, "processed");

    proxy.cut();
    let during = world.publish(&body("mono.events.account_updated", "during-outage")).await;
    let work = world.broker.topology.work_queue();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Held by the worker: not ready in the queue (no requeue loop), not dead, not journaled.
        assert_eq!(world.broker.depth(&work).await, 0, "the delivery was returned to the queue");
        assert_eq!(world.dead_letter_count().await, 0, "the delivery was dead-lettered");
    }
    assert!(world.journal(&during).await.is_none());

    proxy.restore().await;
    let row = world.settled(&during).await;
    assert_eq!(row.status, "processed");
    assert_eq!(row.attempts, 1);
    assert_eq!(world.dead_letter_count().await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_broker_outage_is_survived_with_a_fresh_session(pool: sqlx::PgPool) {
    let mut world = TestWorld::new(pool).await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = amqp_url().expose_secret().replace("127.0.0.1:5672", &proxy.addr().to_string());
    let cli = world.cli(&["--amqp-url", &url]);
    world.start_worker_on(cli, world.pool.clone()).await;
    let before = world.publish(&body("mono.events.account_updated", ACCOUNT)).await;
    world.settled(&before).await;

    proxy.cut();
    // Published while the worker is cut off; it waits in the queue.
    let during = world.publish(&body("mono.events.account_updated", "during-outage")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(world.journal(&during).await.is_none());
    proxy.restore().await;

    assert_eq!(world.settled(&during).await.status, "processed");
    let after = world.publish(&body("mono.events.account_updated", "after-outage")).await;
    assert_eq!(world.settled(&after).await.status, "processed");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_consumer_cancelled_by_the_broker_is_replaced(pool: sqlx::PgPool) {
    let mut world = TestWorld::new(pool).await;
    world.start_worker().await;
    let before = world.publish(&body("mono.events.account_updated", ACCOUNT)).await;
    world.settled(&before).await;

    // Deleting the queue cancels every consumer on it; the worker must notice, re-declare and resume.
    world
        .broker
        .channel
        .queue_delete(world.broker.topology.work_queue().as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let work = world.broker.topology.work_queue();
    eventually("the worker re-declares the work queue and consumes it", PATIENCE, || async {
        world.broker.depths().await.iter().any(|d| d.queue == work && d.consumers == 1)
    })
    .await;

    let after = world.publish(&body("mono.events.account_updated", "after-cancel")).await;
    assert_eq!(world.settled(&after).await.status, "processed");
}

/// RabbitMQ closes a channel that holds a delivery past its `consumer_timeout` and counts the return
/// of everything it held, as it counts the returns of a stopping worker. The worker's hold bound
/// (2 s here, 15 min by default) parks held deliveries first, and a stopping worker parks those
/// waiting on the database.
#[sqlx::test(migrations = "../migrations")]
async fn a_long_database_outage_parks_held_deliveries_and_dead_letters_none_across_a_restart(
    pool_options: PgPoolOptions,
    connect_options: PgConnectOptions,
) {
    let pool = pool_options.connect_with(connect_options.clone()).await.unwrap();
    let mut world = TestWorld::new(pool).await;
    // Parked copies wait 4 s in tier 1, long enough to be counted there together. A delivery limit
    // of 2 makes one counted return look like poison. The database is silent, not refusing: each
    // call waits out the pool's 5 s acquire timeout, longer than the 2 s grace, so a stopping worker
    // must cut the call under way and park its deliveries rather than let them return.
    let mut broker = TestBroker::with_retry_delays(vec![Duration::from_secs(4)]).await;
    broker.topology.delete(&broker.channel).await.unwrap();
    broker.topology = Topology::new(&broker.prefix, vec![Duration::from_secs(4)], 2);
    broker.topology.declare_on(&broker.connection).await.unwrap();
    world.broker = broker;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied_pool = || {
        PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(connect_options.clone().host("127.0.0.1").port(proxy.addr().port()))
    };
    let flags = ["--hold-max-secs", "2", "--delivery-limit", "2", "--shutdown-grace-secs", "2"];
    world.start_worker_on(world.cli(&flags), proxied_pool()).await;

    proxy.stall();
    let mut held = Vec::new();
    for account in ["held-1", "held-2", "held-3"] {
        held.push(world.publish(&body("mono.events.account_updated", account)).await);
    }
    let work = world.broker.topology.work_queue();
    let tier = world.broker.topology.retry_queue(1);
    eventually("deliveries held past the bound are parked in retry tier 1", PATIENCE, || async {
        world.broker.depth(&tier).await == 3
    })
    .await;
    // Back from the tier and held again: the worker stops while it holds them all.
    eventually("the parked copies come back and are held", PATIENCE, || async {
        world.broker.depth(&tier).await == 0 && world.broker.depth(&work).await == 0
    })
    .await;
    world.stop_workers().await;
    assert_eq!(
        (world.broker.depth(&work).await, world.broker.depth(&tier).await),
        (0, 3),
        "the stopping worker parks what it holds; none returns to the work queue counted"
    );
    world.start_worker_on(world.cli(&flags), proxied_pool()).await;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(world.dead_letter_count().await, 0, "a held delivery was dead-lettered");
    }

    proxy.cut();
    proxy.restore().await;
    for meta in &held {
        let row = world.settled(meta).await;
        assert_eq!((row.status.as_str(), row.attempts), ("processed", 1), "{row:?}");
    }
    assert_eq!(world.journal_count().await, 3);
    assert_eq!(world.dead_letter_count().await, 0);
    assert_eq!(world.count_status("dead").await, 0);
}

/// A worker whose broker connections go through a proxy of its own.
async fn worker_behind_proxy(world: &mut TestWorld) -> TcpProxy {
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = amqp_url().expose_secret().replace("127.0.0.1:5672", &proxy.addr().to_string());
    let cli = world.cli(&["--amqp-url", &url]);
    world.start_worker_on(cli, world.pool.clone()).await;
    proxy
}

#[sqlx::test(migrations = "../migrations")]
async fn a_reconnect_to_a_node_without_the_exchange_refuses_it_and_creates_nothing(pool: sqlx::PgPool) {
    let mut world = TestWorld::new(pool).await;
    let proxy = worker_behind_proxy(&mut world).await;
    let before = world.publish(&body("mono.events.account_updated", ACCOUNT)).await;
    world.settled(&before).await;

    // The node reached after the outage knows nothing of monohook (reset, or a cluster of its own).
    proxy.cut();
    world.broker.topology.delete(&world.broker.channel).await.expect("the topology goes");
    proxy.restore().await;
    let connections = proxy.connections_accepted();
    eventually("the worker tries the node again and again", PATIENCE, || async {
        proxy.connections_accepted() > connections + 2
    })
    .await;

    let check = world.broker.topology.check_on(&world.broker.connection).await;
    assert!(
        matches!(check, Err(shared::topology::TopologyError::Missing { .. })),
        "the reconnect declared the topology on a node that is not ours: {check:?}"
    );
    let ready = reqwest::get(format!("http://{}/readyz", world.metrics_addrs[0])).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(world.metrics().await.contains("monohook_worker_nodes_refused_total"));

    // Declared again (a restarted process does it at start), the node is taken.
    world.broker.topology.declare_on(&world.broker.connection).await.expect("declared again");
    let after = world.publish(&body("mono.events.account_updated", "after-refusal")).await;
    assert_eq!(world.settled(&after).await.status, "processed");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_retry_tier_that_only_nacks_moves_the_worker_to_the_next_node_within_a_minute(pool: sqlx::PgPool) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let mut world = TestWorld::new(pool).await;
    let proxy = worker_behind_proxy(&mut world).await;
    // Tier 1 takes nothing: every copy moved there is nacked (max-length 0, reject-publish).
    let tier = world.broker.topology.retry_queue(1);
    world.broker.channel.queue_delete(tier.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    world.broker.channel.queue_declare(tier.as_str().into(), durable, args).await.unwrap();
    // Mono fails for this account until the tier takes copies again.
    let failing = Mock::given(method("POST"))
        .and(path(format!("/accounts/{ACCOUNT}/reauthorise")))
        .respond_with(ResponseTemplate::new(500))
        .mount_as_scoped(&world.mono)
        .await;
    let connections = proxy.connections_accepted();

    let started = std::time::Instant::now();
    let meta = world.publish(&body("mono.events.reauthorisation_required", ACCOUNT)).await;
    eventually("the worker leaves the node", Duration::from_secs(60), || async {
        proxy.connections_accepted() >= connections + 2
    })
    .await;
    let moved_after = started.elapsed();
    assert!(world.journal(&meta).await.is_none(), "the delivery is held, not settled");

    // The tier is put right and Mono answers: the delivery, returned with the old session, is
    // applied once.
    world.broker.channel.queue_delete(tier.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    world.broker.topology.declare_on(&world.broker.connection).await.unwrap();
    drop(failing);
    world.mono_issues_token(ACCOUNT, "after-the-move").await;
    assert_eq!(world.settled(&meta).await.status, "processed");
    assert_eq!(world.stored_token(ACCOUNT).await.as_deref(), Some("after-the-move"));
    println!("left the nacking node {moved_after:?} after the webhook");
}

/// A node that keeps the worker's connections open but answers nothing more (frozen, or behind a
/// load balancer that holds the socket) is noticed by the session's look at the work queue, which
/// waits 5 s at most, and left for the next node: heartbeats alone would keep the worker there.
#[sqlx::test(migrations = "../migrations")]
async fn a_node_that_answers_nothing_more_is_left_for_the_next_within_half_a_minute(pool: sqlx::PgPool) {
    let mut world = TestWorld::new(pool).await;
    let nodes = [
        TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await,
        TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await,
    ];
    let list = nodes
        .iter()
        .map(|node| amqp_url().expose_secret().replace("127.0.0.1:5672", &node.addr().to_string()))
        .collect::<Vec<_>>()
        .join(",");
    let cli = world.cli(&["--amqp-url", &list]);
    world.start_worker_on(cli, world.pool.clone()).await;
    let before = world.publish(&body("mono.events.account_updated", "before-freeze")).await;
    assert_eq!(world.settled(&before).await.status, "processed");

    let (frozen, other) = if nodes[0].connections_accepted() > 0 { (0, 1) } else { (1, 0) };
    assert_eq!(nodes[other].connections_accepted(), 0, "the worker started on one node");
    nodes[frozen].stall();
    let frozen_at = std::time::Instant::now();
    let after = world.publish(&body("mono.events.account_updated", "after-freeze")).await;
    eventually("the worker consumes again, from the other node", Duration::from_secs(30), || async {
        world.journal(&after).await.is_some()
    })
    .await;
    let took = frozen_at.elapsed();
    assert!(nodes[other].connections_accepted() >= 2, "both of the worker's connections moved");
    assert!(world.metrics().await.contains(r#"monohook_worker_node_moves_total{reason="silent"} 1"#));
    eprintln!("left the frozen node and processed again in {took:?}");
    nodes[frozen].cut();
}
