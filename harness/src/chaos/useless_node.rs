//! Cluster scenarios where a node stays up but cannot serve the processes connected to it: cut off
//! from the other two (a partition), or keeping a consumer that it never feeds. Each checks that
//! the processes on that node leave it for the others by themselves, and how long that took.
//!
//! The partition is made at the Erlang distribution level (`scripts/cluster partition`), not by
//! dropping packets: this machine has no packet filter (nftables, iptables), and the three nodes
//! share one loopback and one epmd, so no address or port separates their traffic from the
//! clients'. The node refuses distribution to and from the other two and disconnects them; RabbitMQ
//! sees a partition, as it would after a cut network, with one difference: both sides notice at
//! once, where a silent network is noticed only after `net_ticktime` (60 s), time during which the
//! minority node keeps its clients and serves them nothing (the frozen-node scenario and the
//! starved consumer below cover processes on such a node).

use std::time::{Duration, Instant};

use super::ScenarioReport;
use super::cluster::Cluster;
use super::common::finish;
use super::on_cluster::{OnCluster, cluster_report};
use crate::system::SystemConfig;

/// How long the node stays cut off: long enough for every process to move and work on the
/// majority for a while, short enough for Mono's retries (~24 s in the load) to cover a stall.
const PARTITION_SECS: u64 = 25;

/// A node that holds a connection of an ingest and one of a worker: an ingest's node, where one
/// more worker is started if no worker landed there (each process picks its first node from an
/// order of its own), while the other two nodes refuse new clients.
async fn node_with_ingest_and_worker(run: &mut OnCluster) -> anyhow::Result<Option<u8>> {
    let ingests = Cluster::hosting("monohook-ingest")?;
    let workers = Cluster::hosting("monohook-worker")?;
    if let Some(node) = ingests.iter().find(|n| workers.contains(n)) {
        return Ok(Some(*node));
    }
    let Some(&node) = ingests.first() else { return Ok(None) };
    let others: Vec<u8> = (1..=3).filter(|n| *n != node).collect();
    let welcome = WelcomeAgain(others.clone());
    for other in &others {
        Cluster::refuse_clients(*other)?;
    }
    run.system.start_worker().await?;
    drop(welcome);
    Ok(Cluster::hosting("monohook-worker")?.contains(&node).then_some(node))
}

/// Opens the nodes' client listeners again when dropped, whatever happened in between.
struct WelcomeAgain(Vec<u8>);

impl Drop for WelcomeAgain {
    fn drop(&mut self) {
        for node in &self.0 {
            if let Err(error) = Cluster::welcome_clients(*node) {
                eprintln!("could not reopen node {node}'s client listeners: {error:#}");
            }
        }
    }
}

/// For each `(name, count)`: how long after `since` all `count` connections named `name` were on
/// nodes other than `node` (None if not within `within`). Each is asked about in turn, ~1 s a
/// question (the CLI's start), so a figure is late by up to two seconds.
async fn moved_off(
    node: u8,
    connections: &[(&str, usize)],
    since: Instant,
    within: Duration,
) -> Vec<Option<Duration>> {
    let mut moved = vec![None; connections.len()];
    while since.elapsed() < within && moved.iter().any(Option::is_none) {
        for ((name, count), moved) in connections.iter().zip(moved.iter_mut()) {
            if moved.is_none()
                && let Ok(hosting) = Cluster::hosting(name)
                && hosting.len() == *count
                && !hosting.contains(&node)
            {
                *moved = Some(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    moved
}

fn seconds(took: Option<Duration>) -> String {
    took.map_or_else(|| "never".to_owned(), |t| format!("{:.1} s", t.as_secs_f64()))
}

/// One node, holding connections of an ingest and of a worker, is cut off from the other two for
/// 25 s under load (at the Erlang distribution level: see the module's doc). With
/// `pause_minority` the node pauses itself and closes its clients' connections; ingest (publishing
/// again on the majority what it had not confirmed) and the worker move to the majority, every
/// process is ready there, and when the partition heals the node rejoins by itself.
pub(super) async fn node_partitioned(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut run = OnCluster::start_with(base, 2).await?;
    let mut report = cluster_report(0.95, 1);
    tokio::time::sleep(Duration::from_secs(4)).await;

    let Some(node) = node_with_ingest_and_worker(&mut run).await? else {
        report.check("a node holds connections of an ingest and of a worker", false);
        let (system, load) = run.stop_load(&mut report).await;
        return finish("cluster_node_partitioned", started, system, load, report).await;
    };
    let ingests = Cluster::hosting("monohook-ingest")?.len();
    let workers = Cluster::hosting("monohook-worker")?.len();
    // The hard case: the cut-off node also leads the work queue, so the majority must elect
    // another leader while the processes move.
    Cluster::make_leader(&run.work_queue(), node)?;
    Cluster::partition(node, PARTITION_SECS)?;
    let cut = Instant::now();

    let within = Duration::from_secs(PARTITION_SECS - 5);
    let moved =
        moved_off(node, &[("monohook-ingest", ingests), ("monohook-worker", workers)], cut, within).await;
    let (ingest_moved, worker_moved) = (moved[0], moved[1]);
    report.check(
        format!("node {node}, in the minority, paused itself (its AMQP listener closed)"),
        !Cluster::accepts_clients(node),
    );
    report.check(
        format!("both ingests left node {node} for the majority ({})", seconds(ingest_moved)),
        ingest_moved.is_some(),
    );
    report.check(
        format!("every worker left node {node} for the majority ({})", seconds(worker_moved)),
        worker_moved.is_some(),
    );
    report.check(
        "every process is ready on the majority while the node is cut off",
        run.all_ready(Duration::from_secs(5)).await,
    );
    report.note(format!(
        "time to move off the cut-off node: ingests {}, workers {} (to the last connection; up to 2 s late)",
        seconds(ingest_moved),
        seconds(worker_moved)
    ));

    // The node heals itself when its time is up, and pause_minority starts it again.
    tokio::time::sleep(Duration::from_secs(PARTITION_SECS).saturating_sub(cut.elapsed())).await;
    let healed = Instant::now();
    let mut back = false;
    while healed.elapsed() < Duration::from_secs(60) {
        if Cluster::accepts_clients(node) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.check(format!("node {node} rejoined and serves clients again once the partition healed"), back);
    report.check("every process is ready after the partition", run.all_ready(Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(4)).await;

    report.note(format!(
        "ingest left a session that took no publish (nacks, timeouts) {} time(s)",
        run.ingest_sessions_left_for_silence()
    ));
    let (system, load) = run.stop_load(&mut report).await;
    let mut report = finish("cluster_node_partitioned", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// The log line of the worker's rule for a consumer fed nothing (`worker/src/consumer.rs`).
const STARVED_REASON: &str = "but the consumer received nothing";
/// The worker's log line for a new session consuming (`worker/src/consumer.rs`).
const CONSUMING_AGAIN: &str = "reconnected to RabbitMQ; consuming again";

/// The only worker's consumer stops being fed: its channel process on the broker is suspended
/// (`scripts/cluster stick`), while its connection, heartbeats, other channels and the node stay
/// well and the queue's leader still counts the consumer. Nothing but what the consumer receives
/// tells: the worker must judge the session lost because the queue has messages ready and none
/// reach it, move to another node and consume there. Without that rule the worker would wait on
/// the stuck channel forever, and this scenario fails its checks.
pub(super) async fn consumer_starved(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    // One worker: another would keep the queue empty, and an empty queue starves no consumer.
    let run = OnCluster::start_with(base, 1).await?;
    let mut report = cluster_report(0.99, 1);
    tokio::time::sleep(Duration::from_secs(4)).await;

    let worker = &run.system.workers[0].0;
    let tag = format!("monohook-worker-{}-", worker.pid());
    let node = Cluster::hosting("monohook-worker")?.first().copied();
    let stuck = Cluster::stick(&tag)?;
    let unstick = Unstick(tag.clone());
    let stuck_at = Instant::now();
    report.check(format!("the worker's consuming channel was suspended on the broker ({stuck})"), stuck == 1);

    // When the worker's log says it left, and when it says it consumes again after that.
    let (mut left, mut consuming) = (None, None);
    while consuming.is_none() && stuck_at.elapsed() < Duration::from_secs(30) {
        let logs = worker.logs();
        if let Some(at) = logs.find(STARVED_REASON) {
            left = left.or(Some(stuck_at.elapsed()));
            if logs[at..].contains(CONSUMING_AGAIN) {
                consuming = Some(stuck_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.check(
        format!("the worker judged its consumer starved and left the node ({})", seconds(left)),
        left.is_some(),
    );
    report.check(
        format!("the worker opened a session elsewhere and consumes again ({})", seconds(consuming)),
        consuming.is_some(),
    );
    // The old connection stays listed until its stuck channel lets it close: what counts is a
    // connection of the worker on another node.
    let mut moved = None;
    while node.is_some() && stuck_at.elapsed() < Duration::from_secs(40) {
        if Cluster::hosting("monohook-worker").is_ok_and(|on| on.iter().any(|n| Some(*n) != node)) {
            moved = Some(stuck_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.check(format!("the worker connected to another node ({})", seconds(moved)), moved.is_some());
    // Kept consuming: the journal grows while the old channel still holds what it was sent.
    let count = "SELECT count(*) FROM webhook_events";
    let before: i64 = sqlx::query_scalar(count).fetch_one(&run.system.pool).await?;
    let after = run.system.wait_for_count(count, before + 50, Duration::from_secs(15)).await?;
    report.check(
        format!("the worker kept consuming on its new node ({} more journaled)", after - before),
        after >= before + 50,
    );
    report.note(format!(
        "starved consumer: the worker left its node {} after its channel stuck, consumed again {} after \
         it (logs, read every 0.1 s), seen on another node by the CLI {} after it",
        seconds(left),
        seconds(consuming),
        seconds(moved)
    ));
    drop(unstick);
    report.check("the worker is ready at the end", run.all_ready(Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (system, load) = run.stop_load(&mut report).await;
    let mut report = finish("cluster_consumer_starved", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// Resumes the suspended channels when dropped, whatever happened in between (they return what
/// they hold to the queue once their connection is gone).
struct Unstick(String);

impl Drop for Unstick {
    fn drop(&mut self) {
        if let Err(error) = Cluster::unstick(&self.0) {
            eprintln!("could not resume the suspended channels: {error:#}");
        }
    }
}
