//! Test support for every crate's integration tests (cargo feature `testing`): a private queue prefix
//! per test with clean-up, a TCP proxy that can cut a service off mid-test, fixtures and test logging.
//!
//! Tests run against the real RabbitMQ (`AMQP_URL`, default the local one); nothing here mocks it.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel, Connection};
use secrecy::SecretString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::amqp;
use crate::topology::Topology;

/// The broker tests use: `AMQP_URL` or the local default.
pub fn amqp_url() -> SecretString {
    SecretString::from(
        std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
    )
}

/// Installs a log subscriber once if `TEST_LOG` is set; tests are silent otherwise.
pub fn init_test_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "debug,lapin=info".into()))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Reads a file of the repository's `tests/fixtures/`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A queue prefix of the test's own on the real broker, with a channel to look at its queues.
/// Dropping it deletes its exchange and queues.
pub struct TestBroker {
    pub prefix: String,
    pub topology: Topology,
    pub connection: Connection,
    pub channel: Channel,
}

impl TestBroker {
    /// A fresh prefix with short retry delays (1 s, 2 s) so retry paths run in test time.
    pub async fn new() -> Self {
        Self::with_retry_delays(vec![Duration::from_secs(1), Duration::from_secs(2)]).await
    }

    pub async fn with_retry_delays(retry_delays: Vec<Duration>) -> Self {
        let prefix = format!("test.{}", uuid::Uuid::new_v4().simple());
        let topology = Topology::new(&prefix, retry_delays, 10);
        let connection =
            amqp::connect(&amqp_url(), "monohook-test").await.expect("RabbitMQ is not reachable");
        topology.declare_on(&connection).await.expect("cannot declare the test topology");
        let channel = connection.create_channel().await.expect("cannot open a channel");
        Self { prefix, topology, connection, channel }
    }

    /// The retry delays as the comma-separated value of `--retry-delays-secs`.
    pub fn retry_delays_arg(&self) -> String {
        self.topology.retry_delays().iter().map(|d| d.as_secs().to_string()).collect::<Vec<_>>().join(",")
    }

    /// Number of ready messages in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        self.depths().await.into_iter().find(|d| d.queue == queue).map_or(0, |d| d.messages)
    }

    /// Depth and consumers of every queue of the prefix. Uses a channel of its own each time: a
    /// passive declaration of a missing queue closes the channel it runs on.
    pub async fn depths(&self) -> Vec<crate::topology::QueueDepth> {
        let channel = self.connection.create_channel().await.expect("cannot open a channel");
        let depths = self.topology.depths(&channel).await;
        let _ = channel.close(200, "done".into()).await;
        depths.unwrap_or_default()
    }

    /// Takes every ready message off `queue` (acking them).
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let mut taken = Vec::new();
        while let Some(message) =
            self.channel.basic_get(queue.into(), BasicGetOptions::default()).await.expect("basic.get failed")
        {
            message.delivery.ack(BasicAckOptions::default()).await.expect("ack failed");
            taken.push(message.delivery);
        }
        taken
    }

    /// Waits until `queue` holds at least `count` ready messages, then takes them all.
    pub async fn wait_for_messages(
        &self,
        queue: &str,
        count: usize,
        within: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        let mut taken = Vec::new();
        while taken.len() < count && tokio::time::Instant::now() < deadline {
            taken.extend(self.drain(queue).await);
            if taken.len() < count {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        taken
    }

    /// Publishes to the exchange as ingest does (routing key = event name) and waits for the confirm.
    pub async fn publish_to_exchange(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.publish_confirmed(self.topology.exchange(), routing_key, body, properties).await;
    }

    /// Publishes straight onto a queue through the default exchange, as an operator or a buggy
    /// producer could, and waits for the confirm.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.publish_confirmed("", queue, body, properties).await;
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let channel = self.connection.create_channel().await.expect("cannot open a channel");
        channel.confirm_select(Default::default()).await.expect("confirm.select failed");
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, immediate: false },
                body,
                properties,
            )
            .await
            .expect("publish failed")
            .await
            .expect("no confirm");
        assert_eq!(
            confirm,
            lapin::Confirmation::Ack(None),
            "publish to {exchange:?}/{routing_key} was not confirmed"
        );
        let _ = channel.close(200, "done".into()).await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let url = amqp_url();
        // Drop cannot await; clean up on a thread of its own so it works from any runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async move {
                let connection = amqp::connect(&url, "monohook-test-cleanup").await.ok()?;
                let channel = connection.create_channel().await.ok()?;
                let _ = topology.delete(&channel).await;
                let _ = connection.close(200, "clean-up".into()).await;
                Some(())
            })
        })
        .join();
    }
}

/// A TCP proxy in front of a real service, so that one test can cut its own connections (a broker or
/// database "outage") without disturbing tests running beside it.
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    state: Arc<Mutex<Option<Generation>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// How long bytes from the service are held before they go on, in ms (0: at once).
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

/// One listening period of the proxy: cut ends it, stall freezes it.
#[derive(Clone)]
struct Generation {
    cut: CancellationToken,
    stall: CancellationToken,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("cannot bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let proxy = Self {
            addr,
            target,
            state: Arc::new(Mutex::new(None)),
            accepted: Arc::default(),
            delay_ms: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections the proxy has taken so far: one more each time the service behind it is
    /// connected to again (a per-test signal, where metrics are one registry per test process).
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes the listener and every proxied connection: the service looks down.
    pub fn cut(&self) {
        if let Some(generation) = self.state.lock().unwrap().take() {
            generation.cut.cancel();
        }
    }

    /// Stops forwarding bytes but keeps every connection open: the service hangs without failing.
    pub fn stall(&self) {
        if let Some(generation) = self.state.lock().unwrap().as_ref() {
            generation.stall.cancel();
        }
    }

    /// Holds every byte the service sends for `delay` before it goes on (zero: at once), on the
    /// connections open and to come: a slow service (a broker whose confirms take this long), not
    /// a silent one.
    pub fn delay_answers(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Listens again on the same port: the service is back.
    pub async fn restore(&self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: TcpListener) {
        let generation = Generation { cut: CancellationToken::new(), stall: CancellationToken::new() };
        *self.state.lock().unwrap() = Some(generation.clone());
        let target = self.target;
        let counted = self.accepted.clone();
        let delay_ms = self.delay_ms.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = generation.cut.cancelled() => return,
                };
                let Ok((mut inbound, _)) = accepted else { continue };
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let generation = generation.clone();
                let delay_ms = delay_ms.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = pump(&mut inbound, outbound, &delay_ms) => {}
                        () = generation.cut.cancelled() => {}
                        // Stalled: hold both sockets open, silent, until cut.
                        () = generation.stall.cancelled() => generation.cut.cancelled().await,
                    }
                });
            }
        });
    }
}

/// Forwards both ways until either side closes; what the service sends waits `delay_ms` first.
async fn pump(inbound: &mut TcpStream, outbound: TcpStream, delay_ms: &std::sync::atomic::AtomicU64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = inbound.split();
    let (mut service_read, mut service_write) = outbound.into_split();
    let upstream = tokio::io::copy(&mut client_read, &mut service_write);
    let (chunks, mut held) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read_answers = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match service_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = Duration::from_millis(delay_ms.load(std::sync::atomic::Ordering::Relaxed));
                    if chunks.send((tokio::time::Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write_answers = async {
        while let Some((due, chunk)) = held.recv().await {
            tokio::time::sleep_until(due).await;
            if client_write.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        () = async { tokio::join!(read_answers, write_answers); } => {}
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Waits until `check` holds, polling every 25 ms, or panics with `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
