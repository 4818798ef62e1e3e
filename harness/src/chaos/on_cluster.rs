//! Scenarios on the three-node cluster of `scripts/cluster`: two ingest processes and two workers,
//! each given the list of the three nodes, under load from both ingests, while nodes die.

use futures_util::future::join_all;
use secrecy::SecretString;
use shared::topology::Topology;
use std::time::{Duration, Instant};

use super::ScenarioReport;
use super::cluster::Cluster;
use super::common::{all_kinds, finish, wait_ready};
use super::load::{Load, LoadResult};
use crate::system::{System, SystemConfig};

pub const ALL: [&str; 7] = [
    "cluster_leader_killed",
    "cluster_ingest_nodes_stopped",
    "cluster_rolling_restart",
    "cluster_node_frozen",
    "cluster_two_nodes_down",
    "cluster_node_partitioned",
    "cluster_consumer_starved",
];

pub async fn run(name: &str, base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    match name {
        "cluster_leader_killed" => leader_killed(base).await,
        "cluster_ingest_nodes_stopped" => ingest_nodes_stopped(base).await,
        "cluster_rolling_restart" => rolling_restart(base).await,
        "cluster_node_frozen" => node_frozen(base).await,
        "cluster_two_nodes_down" => two_nodes_down(base).await,
        other => anyhow::bail!("no scenario {other}"),
    }
}

/// A cluster scenario's report: at least `min_share` of the webhooks must end accepted, and an
/// account may get at most `node_faults` tokens beyond its re-auths (each node stopped, killed,
/// frozen or cut off can end a worker's session mid-call).
pub(super) fn cluster_report(min_share: f64, node_faults: usize) -> ScenarioReport {
    ScenarioReport {
        min_accepted_share: min_share,
        extra_tokens_per_account: node_faults,
        ..ScenarioReport::default()
    }
}

/// A system on the cluster, with both ingests under load.
pub(super) struct OnCluster {
    pub(super) system: System,
    pub(super) ingest_urls: [String; 2],
    loads: [Load; 2],
}

impl OnCluster {
    async fn start(base: &SystemConfig) -> anyhow::Result<Self> {
        Self::start_with(base, 2).await
    }

    /// A system with `workers` workers.
    pub(super) async fn start_with(base: &SystemConfig, workers: usize) -> anyhow::Result<Self> {
        let mut config = base.clone();
        config.amqp_url = Cluster::url()?;
        // Every queue on all three nodes, so that it survives the loss of any one.
        for env in [&mut config.worker_env, &mut config.ingest_env] {
            env.push(("QUORUM_INITIAL_GROUP_SIZE", "3".into()));
        }
        let mut system = System::start(config, workers).await?;
        let second = system.start_another_ingest().await?;
        let ingest_urls = [system.ingest_url(), second];
        let plan = all_kinds(50, 40);
        let loads = [
            Load::start_at(ingest_urls[0].clone(), plan.clone(), 0),
            Load::start_at(ingest_urls[1].clone(), plan, 1_000_000_000),
        ];
        Ok(Self { system, ingest_urls, loads })
    }

    pub(super) fn work_queue(&self) -> String {
        self.system.topology().work_queue()
    }

    /// How many times the ingests left a session because it took no publish (only nacks and
    /// timeouts) for three confirm timeouts, from their logs.
    pub(super) fn ingest_sessions_left_for_silence(&self) -> usize {
        let ingests = self.system.ingest.iter().chain(self.system.more_ingests.iter().map(|(i, _)| i));
        ingests.map(|ingest| ingest.logs().matches("the node confirmed no publish for").count()).sum()
    }

    /// Whether every ingest and worker is ready (again) within `within`.
    pub(super) async fn all_ready(&self, within: Duration) -> bool {
        let mut ready = true;
        for url in &self.ingest_urls {
            ready &= wait_ready(&format!("{url}/readyz"), within).await;
        }
        for (_, port) in &self.system.workers {
            ready &= wait_ready(&format!("http://127.0.0.1:{port}/readyz"), within).await;
        }
        ready
    }

    /// Stops the load and checks what every node loss must leave true of ingest's answers.
    pub(super) async fn stop_load(self, report: &mut ScenarioReport) -> (System, LoadResult) {
        let [first, second] = self.loads;
        let load = first.stop().await.merge(second.stop().await);
        // PUBLISH_DEADLINE_MS (5 s with a node list) bounds every answer ingest gives; the load
        // measures on the same two cores as three broker nodes, two ingests and two workers, and
        // has seen 6.0 and 6.75 s there. A hang is tens of seconds or none: 3 s of slack tells it.
        report.check(
            "ingest never hung: every answer came within PUBLISH_DEADLINE_MS + 3 s",
            load.slowest < Duration::from_secs(8),
        );
        report.check("every webhook got an answer", load.no_answer == 0);
        for error in &load.no_answer_errors {
            report.note(format!("a post got no answer: {error}"));
        }
        let refused: u64 = load.statuses.iter().filter(|(s, _)| **s != 200).map(|(_, n)| n).sum();
        report.note(format!(
            "ingest answered {refused} webhook(s) with 503, within {:.2} s in all; {} got 200; slowest answer {} ms",
            load.unavailable_secs(),
            load.accepted.len(),
            load.slowest.as_millis()
        ));
        (self.system, load)
    }
}

/// Declares one topology from all three nodes at once, as processes starting together on different
/// nodes do; true if every declaration succeeded. The queues are deleted again.
async fn declared_from_every_node_at_once() -> anyhow::Result<bool> {
    let prefix = format!("sys.{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(&prefix, vec![Duration::from_secs(1), Duration::from_secs(2)], 10)
        .with_initial_group_size(Some(3));
    let mut connections = Vec::new();
    for url in Cluster::url()?.split(',') {
        connections.push(shared::amqp::connect(&SecretString::from(url.to_owned()), "monohook-chaos").await?);
    }
    let declared = join_all(connections.iter().map(|c| topology.declare_on(c))).await;
    let channel = connections[0].create_channel().await?;
    let _ = topology.delete(&channel).await;
    for connection in &connections {
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(declared.iter().all(Result::is_ok))
}

/// The node leading the work queue, and holding an ingest's connection, dies (`kill -9` of its VM)
/// mid-load, and comes back later.
async fn leader_killed(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut report = cluster_report(0.95, 1);
    report.check(
        "one topology declared from all three nodes at once: every declaration succeeds",
        declared_from_every_node_at_once().await?,
    );
    let run = OnCluster::start(base).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The hard case on every run: the leader also holds an ingest's connection, so that ingest
    // opens its next session while the queue elects a leader.
    if let Some(&node) = Cluster::hosting("monohook-ingest")?.first() {
        Cluster::make_leader(&run.work_queue(), node)?;
    }
    let leader = Cluster::leader_of(&run.work_queue())?;
    Cluster::kill(leader)?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let new_leader = Cluster::leader_of(&run.work_queue()).ok();
    report.check("another node took over the work queue", new_leader.is_some_and(|n| n != leader));
    report
        .check("every process works on while the node is dead", run.all_ready(Duration::from_secs(30)).await);
    Cluster::start(leader)?;
    report
        .check("every process is ready once the node is back", run.all_ready(Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(4)).await;

    report.note(format!(
        "ingest left a session that took no publish (nacks, timeouts) {} time(s)",
        run.ingest_sessions_left_for_silence()
    ));
    let (system, load) = run.stop_load(&mut report).await;
    // Issue 21's goal: at most 1 % of posts without a 200. It used to miss by 0-24 %: an ingest
    // that reconnected during the election got channels that kept addressing the dead leader and
    // were only nacked or left unanswered until its node came back; it now leaves such a session
    // (four runs of this hard case: 0 %, against 10 % and 15 % before).
    let posts: u64 = load.statuses.values().sum::<u64>() + load.no_answer;
    let refused = posts - load.statuses.get(&200).copied().unwrap_or(0);
    let share = refused as f64 * 100.0 / posts.max(1) as f64;
    report.check(format!("{refused} of {posts} posts got no 200 ({share:.1} %; at most 1 %)"), share <= 1.0);
    let mut report = finish("cluster_leader_killed", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// The node each ingest is connected to is stopped, one after the other, and started again.
async fn ingest_nodes_stopped(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let run = OnCluster::start(base).await?;
    let mut report = cluster_report(0.95, 2);
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut stopped = Vec::new();
    for round in 1..=2 {
        let hosting = Cluster::hosting("monohook-ingest")?;
        // The node of an ingest connection not stopped yet, else any node holding one.
        let Some(&node) = hosting.iter().find(|n| !stopped.contains(*n)).or(hosting.first()) else {
            report.check(format!("round {round}: an ingest connection was found"), false);
            break;
        };
        Cluster::stop(node)?;
        stopped.push(node);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let moved = Cluster::hosting("monohook-ingest").is_ok_and(|now| !now.contains(&node));
        report.check(format!("round {round}: ingest left node {node} for the others"), moved);
        report.check(
            format!("round {round}: every process is ready without node {node}"),
            run.all_ready(Duration::from_secs(30)).await,
        );
        Cluster::start(node)?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    report.check("every process is ready at the end", run.all_ready(Duration::from_secs(30)).await);

    let (system, load) = run.stop_load(&mut report).await;
    let mut report = finish("cluster_ingest_nodes_stopped", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// Each node in turn is stopped and started again, as an upgrade would do.
async fn rolling_restart(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let run = OnCluster::start(base).await?;
    let mut report = cluster_report(0.95, 3);
    tokio::time::sleep(Duration::from_secs(4)).await;

    for node in 1..=3 {
        Cluster::stop(node)?;
        let stopped = Instant::now();
        while Cluster::accepts_clients(node) && stopped.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        report.check(format!("node {node} took no clients once stopped"), !Cluster::accepts_clients(node));
        tokio::time::sleep(Duration::from_secs(3)).await;
        Cluster::start(node)?;
        report.check(
            format!("every process is ready after node {node} restarted"),
            run.all_ready(Duration::from_secs(30)).await,
        );
        // Time for the restarted member to catch up before the next one goes.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    let (system, load) = run.stop_load(&mut report).await;
    let mut report = finish("cluster_rolling_restart", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// The node an ingest is connected to freezes (SIGSTOP of its Erlang VM) for 20 s: its connections
/// neither reset nor answer. Ingest must judge the session by its missing confirms, leave the node
/// and publish again elsewhere; the workers' heartbeats notice it too.
async fn node_frozen(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let run = OnCluster::start(base).await?;
    let mut report = cluster_report(0.95, 1);
    tokio::time::sleep(Duration::from_secs(4)).await;

    let hosting = Cluster::hosting("monohook-ingest")?;
    let Some(&node) = hosting.first() else {
        report.check("an ingest connection was found", false);
        let (system, load) = run.stop_load(&mut report).await;
        return finish("cluster_node_frozen", started, system, load, report).await;
    };
    Cluster::freeze(node)?;
    let thaw = scopeguard_thaw(node);
    tokio::time::sleep(Duration::from_secs(20)).await;
    drop(thaw);
    report.check(
        "ingest left the frozen node because it confirmed nothing, not because its connection dropped",
        run.ingest_sessions_left_for_silence() > 0,
    );
    report.check("every process is ready once the node thaws", run.all_ready(Duration::from_secs(60)).await);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (system, load) = run.stop_load(&mut report).await;
    let mut report = finish("cluster_node_frozen", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// Thaws a frozen node when dropped, whatever happened in between.
fn scopeguard_thaw(node: u8) -> impl Drop {
    struct Thaw(u8);
    impl Drop for Thaw {
        fn drop(&mut self) {
            if let Err(error) = Cluster::thaw(self.0) {
                eprintln!("could not thaw node {}: {error:#}", self.0);
            }
        }
    }
    Thaw(node)
}

/// Two of the three nodes stop: the queues lose their quorum and the last node pauses itself
/// (pause_minority). Ingest answers 503 within its deadline instead of hanging, reports not ready,
/// and everything recovers by itself when a second node returns.
async fn two_nodes_down(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let run = OnCluster::start(base).await?;
    // Nothing can be accepted without a quorum, and the outage (two nodes stopped and started
    // again, ~30 s) outlasts the load's retries (~24 s): webhooks posted early in it are given up.
    let mut report = cluster_report(0.5, 2);
    tokio::time::sleep(Duration::from_secs(4)).await;

    let leader = Cluster::leader_of(&run.work_queue())?;
    let other = (1..=3).find(|n| *n != leader).expect("three nodes");
    Cluster::stop(leader)?;
    Cluster::stop(other)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let asked = Instant::now();
    let answer = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?
        .post(format!("{}/webhooks/mono", run.ingest_urls[0]))
        .header("mono-webhook-secret", crate::system::WEBHOOK_SECRET)
        .body(crate::bodies::reauthorisation_required("00000000000000000000bbbb"))
        .send()
        .await;
    let took = asked.elapsed();
    report.check(
        format!("without a quorum ingest answers 503 within its deadline ({} ms)", took.as_millis()),
        answer.is_ok_and(|r| r.status().as_u16() == 503) && took < Duration::from_secs(6),
    );
    let mut not_ready = true;
    for url in &run.ingest_urls {
        not_ready &= !wait_ready(&format!("{url}/readyz"), Duration::from_secs(2)).await;
    }
    report.check("ingest reports not ready without a quorum", not_ready);
    Cluster::start(other)?;
    Cluster::start(leader)?;
    report.check(
        "every process recovers by itself once the nodes are back",
        run.all_ready(Duration::from_secs(90)).await,
    );
    // Mono's retries of what was refused need the time their backoff takes.
    tokio::time::sleep(Duration::from_secs(15)).await;

    let (system, load) = run.stop_load(&mut report).await;
    let mut report = finish("cluster_two_nodes_down", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}
