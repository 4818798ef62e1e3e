//! The three-node RabbitMQ cluster of `scripts/cluster`, driven from the chaos suite: its own ports,
//! node names and data under `target/`, never the machine's main broker.

use anyhow::{Context, bail};
use std::process::{Command, Stdio};
use std::time::Duration;

fn script() -> Command {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster"))
}

/// Runs `scripts/cluster <args>` and returns what it printed.
fn cluster(args: &[&str]) -> anyhow::Result<String> {
    // No pipe for stderr: a node started by the script must not keep it open.
    let output =
        script().args(args).stderr(Stdio::inherit()).output().context("cannot run scripts/cluster")?;
    if !output.status.success() {
        bail!("scripts/cluster {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Runs a `scripts/cluster` query that is safe to repeat, up to three times. Each try asks the
/// nodes in turn, bounding each node's CLI to 10 s; on two cores under the chaos load an Erlang
/// CLI can take that long to boot on every node at once, which is the machine's load, not an
/// answer about the cluster.
fn query(args: &[&str]) -> anyhow::Result<String> {
    let mut tries = 0;
    loop {
        tries += 1;
        match cluster(args) {
            Ok(answer) => return Ok(answer),
            Err(error) if tries >= 3 => return Err(error.context(format!("after {tries} tries"))),
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

/// The cluster, up while this lives; stopped and its data deleted when dropped.
pub struct Cluster;

impl Cluster {
    /// Starts the three nodes (or keeps those already running) and waits until all three run.
    pub fn up() -> anyhow::Result<Self> {
        let log =
            std::fs::File::create(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/rabbitmq-cluster.log"))
                .context("cannot create target/rabbitmq-cluster.log")?;
        let status = script()
            .arg("up")
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("cannot run scripts/cluster")?;
        if !status.success() {
            bail!("scripts/cluster up failed (target/rabbitmq-cluster.log)");
        }
        Ok(Self)
    }

    /// `AMQP_URL` listing the three nodes.
    pub fn url() -> anyhow::Result<String> {
        cluster(&["url"])
    }

    /// The node (1 to 3) that leads quorum queue `queue`.
    pub fn leader_of(queue: &str) -> anyhow::Result<u8> {
        query(&["leader", queue])?.parse().context("unexpected answer from scripts/cluster leader")
    }

    /// Makes `node` the leader of quorum queue `queue` and waits (up to 10 s) until it is.
    pub fn make_leader(queue: &str, node: u8) -> anyhow::Result<()> {
        cluster(&["lead", queue, &node.to_string()])?;
        for _ in 0..20 {
            if Self::leader_of(queue).ok() == Some(node) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("node {node} did not become the leader of {queue}")
    }

    /// The node of each connection named `name` (one entry per connection, sorted). Asks the first
    /// node whose CLI answers; a node cut off or paused lists nothing, so its connections are gone
    /// from the answer only once it has closed them or the others have seen it go.
    pub fn hosting(name: &str) -> anyhow::Result<Vec<u8>> {
        query(&["hosting", name])?
            .split_whitespace()
            .map(|n| n.parse().context("unexpected answer from scripts/cluster hosting"))
            .collect()
    }

    pub fn kill(node: u8) -> anyhow::Result<()> {
        cluster(&["kill", &node.to_string()]).map(drop)
    }

    pub fn stop(node: u8) -> anyhow::Result<()> {
        cluster(&["stop", &node.to_string()]).map(drop)
    }

    /// Stops one node's Erlang VM with SIGSTOP: its connections neither reset nor answer.
    pub fn freeze(node: u8) -> anyhow::Result<()> {
        cluster(&["freeze", &node.to_string()]).map(drop)
    }

    pub fn thaw(node: u8) -> anyhow::Result<()> {
        cluster(&["thaw", &node.to_string()]).map(drop)
    }

    pub fn start(node: u8) -> anyhow::Result<()> {
        cluster(&["start", &node.to_string()]).map(drop)
    }

    /// Cuts `node` off from the other two for `secs` seconds, at the Erlang distribution level
    /// (`scripts/cluster partition`: refused both ways, healed by the node itself when the time is
    /// up, so a harness that dies meanwhile leaves no partition behind).
    pub fn partition(node: u8, secs: u64) -> anyhow::Result<()> {
        cluster(&["partition", &node.to_string(), &secs.to_string()]).map(drop)
    }

    /// Whether `node` accepts AMQP clients now (a paused node has closed its listener).
    pub fn accepts_clients(node: u8) -> bool {
        let port = 5680 + u16::from(node);
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .is_ok()
    }

    /// Closes `node`'s client listeners: new connections are refused, those open stay.
    pub fn refuse_clients(node: u8) -> anyhow::Result<()> {
        cluster(&["refuse", &node.to_string()]).map(drop)
    }

    /// Opens what [`Cluster::refuse_clients`] closed.
    pub fn welcome_clients(node: u8) -> anyhow::Result<()> {
        cluster(&["welcome", &node.to_string()]).map(drop)
    }

    /// Suspends, on the broker, the channel processes of the consumers whose tag starts with
    /// `tag_prefix`; returns how many. Their connections live on; they receive nothing more.
    pub fn stick(tag_prefix: &str) -> anyhow::Result<usize> {
        query(&["stick", tag_prefix])?.parse().context("unexpected answer from scripts/cluster stick")
    }

    /// Resumes what [`Cluster::stick`] suspended.
    pub fn unstick(tag_prefix: &str) -> anyhow::Result<usize> {
        query(&["unstick", tag_prefix])?.parse().context("unexpected answer from scripts/cluster unstick")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(error) = cluster(&["down"]) {
            eprintln!("could not stop the test cluster: {error:#}");
        }
    }
}
