//! Stopping and starting the machine's RabbitMQ and PostgreSQL, always bringing them back.

use anyhow::{Context, bail};
use std::process::Command;
use std::time::{Duration, Instant};

fn output_of(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output =
        Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    output_of(program, args).map(drop)
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

fn wait_for_port(port: u16, open: bool, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if port_open(port) == open {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("port {port} did not become {}", if open { "open" } else { "closed" })
}

/// Stops the RabbitMQ application (the Erlang node stays up, so it can start again fast).
pub fn stop_rabbitmq() -> anyhow::Result<()> {
    run("rabbitmqctl", &["-q", "stop_app"])?;
    wait_for_port(5672, false, Duration::from_secs(30))
}

pub fn start_rabbitmq() -> anyhow::Result<()> {
    if run("rabbitmqctl", &["-q", "start_app"]).is_err() {
        // The node itself is down: start it.
        run("rabbitmq-server", &["-detached"])?;
    }
    run("timeout", &["120", "rabbitmqctl", "-q", "await_startup"])?;
    wait_for_port(5672, true, Duration::from_secs(60))
}

fn postgres_cluster() -> anyhow::Result<String> {
    let entries =
        std::fs::read_dir("/etc/postgresql").context("PostgreSQL is not installed as a Debian cluster")?;
    let mut versions: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    versions.sort();
    versions.pop().context("no PostgreSQL cluster under /etc/postgresql")
}

pub fn stop_postgres() -> anyhow::Result<()> {
    let version = postgres_cluster()?;
    run("pg_ctlcluster", &["--skip-systemctl-redirect", &version, "main", "stop", "-m", "fast"])?;
    wait_for_port(5432, false, Duration::from_secs(30))
}

pub fn start_postgres() -> anyhow::Result<()> {
    let version = postgres_cluster()?;
    if !port_open(5432) {
        run("pg_ctlcluster", &["--skip-systemctl-redirect", &version, "main", "start"])?;
    }
    wait_for_port(5432, true, Duration::from_secs(60))
}

/// Brings both services back when dropped, whatever happened in between.
pub struct RestoreServices;

impl Drop for RestoreServices {
    fn drop(&mut self) {
        if !port_open(5432)
            && let Err(error) = start_postgres()
        {
            eprintln!("could not bring PostgreSQL back: {error:#}");
        }
        if !port_open(5672)
            && let Err(error) = start_rabbitmq()
        {
            eprintln!("could not bring RabbitMQ back: {error:#}");
        }
    }
}

/// Sets RabbitMQ's `consumer_timeout` (how long a channel may hold a delivery unacked before the
/// broker closes it) on the running node, for channels opened from now on.
pub fn set_consumer_timeout(timeout: Duration) -> anyhow::Result<()> {
    let millis = timeout.as_millis();
    run("rabbitmqctl", &["-q", "eval", &format!("application:set_env(rabbit, consumer_timeout, {millis}).")])
}

/// RabbitMQ's default `consumer_timeout`: 30 minutes.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Puts the default `consumer_timeout` back when dropped.
pub struct RestoreConsumerTimeout;

impl Drop for RestoreConsumerTimeout {
    fn drop(&mut self) {
        if let Err(error) = set_consumer_timeout(DEFAULT_CONSUMER_TIMEOUT) {
            eprintln!("could not restore RabbitMQ's consumer_timeout: {error:#}");
        }
    }
}

/// A consumer that takes one delivery and never acks it: RabbitMQ closes its channel once the
/// delivery is held past `consumer_timeout`, which shows that a lowered timeout took effect (the
/// broker looks at held deliveries about once a minute).
pub struct HeldDelivery {
    connection: lapin::Connection,
    channel: lapin::Channel,
    _consumer: lapin::Consumer,
}

impl HeldDelivery {
    pub async fn start(amqp_url: &str) -> anyhow::Result<Self> {
        use futures_util::StreamExt;
        use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
        use lapin::types::FieldTable;

        let connection = crate::bench::broker::connect(amqp_url).await?;
        let channel = connection.create_channel().await?;
        let options =
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue = channel.queue_declare("".into(), options, FieldTable::default()).await?;
        channel
            .basic_publish(
                "".into(),
                queue.name().clone(),
                BasicPublishOptions::default(),
                b"held past consumer_timeout",
                lapin::BasicProperties::default(),
            )
            .await?
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "monohook-chaos-held".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let first = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await;
        if !matches!(first, Ok(Some(Ok(_)))) {
            bail!("the control consumer got no delivery to hold");
        }
        Ok(Self { connection, channel, _consumer: consumer })
    }

    /// Whether the broker closed the channel holding the delivery, waiting up to `patience`.
    pub async fn timed_out_within(&self, patience: Duration) -> bool {
        let until = Instant::now() + patience;
        while self.channel.status().connected() {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        true
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// The node's memory high watermark as a fraction of the machine's memory, as set now.
fn memory_watermark() -> anyhow::Result<f64> {
    let text =
        output_of("rabbitmqctl", &["-q", "eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])?;
    text.trim().parse().with_context(|| format!("the memory watermark is not a fraction: {}", text.trim()))
}

/// Raises RabbitMQ's memory alarm (a watermark far below what the node uses): the broker blocks
/// every connection that publishes until [`RestoreMemoryWatermark`] puts the watermark back.
pub fn raise_memory_alarm() -> anyhow::Result<RestoreMemoryWatermark> {
    let restore = RestoreMemoryWatermark(memory_watermark()?);
    run("rabbitmqctl", &["-q", "set_vm_memory_high_watermark", "0.0001"])?;
    Ok(restore)
}

/// Whether the node has a memory alarm in force.
pub fn memory_alarm_in_force() -> bool {
    output_of("rabbitmqctl", &["-q", "eval", "rabbit_alarm:get_alarms()."])
        .is_ok_and(|alarms| alarms.contains("memory"))
}

/// Puts the memory watermark back (clearing the alarm) when dropped.
pub struct RestoreMemoryWatermark(f64);

impl Drop for RestoreMemoryWatermark {
    fn drop(&mut self) {
        if let Err(error) = run("rabbitmqctl", &["-q", "set_vm_memory_high_watermark", &self.0.to_string()]) {
            eprintln!("could not restore RabbitMQ's memory watermark: {error:#}");
        }
    }
}

/// The states (`running`, `blocking`, `blocked`, ...) of the connections whose client named them
/// `name` (`connection_name`).
pub fn connection_states(name: &str) -> anyhow::Result<Vec<String>> {
    let text = output_of("rabbitmqctl", &["-q", "list_connections", "client_properties", "state"])?;
    Ok(text
        .lines()
        .filter(|line| line.contains(&format!("\"{name}\"")))
        .filter_map(|line| line.rsplit('\t').next().map(|state| state.trim().to_owned()))
        .collect())
}

/// The connections open to the node whose client named them `name` (`connection_name`).
pub fn connections_named(name: &str) -> anyhow::Result<usize> {
    let text = output_of("rabbitmqctl", &["-q", "list_connections", "client_properties"])?;
    Ok(text.lines().filter(|line| line.contains(&format!("\"{name}\""))).count())
}
