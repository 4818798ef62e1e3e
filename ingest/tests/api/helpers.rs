use clap::Parser;
use lapin::message::Delivery;
use secrecy::ExposeSecret;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ingest::config::IngestConfig;
use ingest::startup::Application;
use shared::testing::{TcpProxy, TestBroker, amqp_url, init_test_logging};

pub const SECRET: &str = "test-webhook-secret";

/// A running ingest on a free port, publishing to a queue prefix of its own.
pub struct TestApp {
    pub address: String,
    /// `http://<METRICS_ADDR>/metrics`.
    pub metrics: String,
    pub broker: TestBroker,
    pub http: reqwest::Client,
    cancel: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// An ingest whose broker connection runs through a proxy the test can cut.
pub struct ProxiedApp {
    pub app: TestApp,
    pub proxy: TcpProxy,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customize: impl FnOnce(&mut IngestConfig)) -> TestApp {
    init_test_logging();
    let broker = TestBroker::new().await;
    let mut config = config_for(&broker);
    customize(&mut config);
    let cancel = CancellationToken::new();
    let application = Application::build(config, cancel.clone()).await.expect("ingest failed to build");
    let address = format!("http://127.0.0.1:{}", application.port());
    let metrics = format!("http://{}/metrics", application.metrics_addr());
    let server = tokio::spawn(application.run_until_stopped());
    TestApp { address, metrics, broker, http: reqwest::Client::new(), cancel, server: Some(server) }
}

pub async fn spawn_app_behind_proxy() -> ProxiedApp {
    spawn_app_behind_proxy_with(|_| {}).await
}

pub async fn spawn_app_behind_proxy_with(customize: impl FnOnce(&mut IngestConfig)) -> ProxiedApp {
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = proxied_amqp_url(&proxy);
    let app = spawn_app_with(|config| {
        config.broker.amqp_url = url.into();
        customize(config);
    })
    .await;
    ProxiedApp { app, proxy }
}

/// `AMQP_URL` with the broker's address replaced by the proxy's.
pub fn proxied_amqp_url(proxy: &TcpProxy) -> String {
    let url = amqp_url().expose_secret().replace("127.0.0.1:5672", &proxy.addr().to_string());
    assert!(url.contains(&proxy.addr().to_string()), "AMQP_URL must point at 127.0.0.1:5672 for proxy tests");
    url
}

/// The configuration a test starts from: the test's prefix, a free port, a known secret.
pub fn config_for(broker: &TestBroker) -> IngestConfig {
    IngestConfig::parse_from([
        "ingest",
        "--mono-webhook-secret",
        SECRET,
        "--listen-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--queue-prefix",
        &broker.prefix,
        "--retry-delays-secs",
        &broker.retry_delays_arg(),
        "--http-workers",
        "2",
        "--amqp-url",
        amqp_url().expose_secret(),
    ])
}

impl TestApp {
    /// Posts a webhook with the right secret.
    pub async fn post_webhook(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.post_webhook_with_secret(body, Some(SECRET)).await
    }

    pub async fn post_webhook_with_secret(
        &self,
        body: impl Into<reqwest::Body>,
        secret: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/webhooks/mono", self.address))
            .header("content-type", "application/json")
            .body(body);
        if let Some(secret) = secret {
            request = request.header("mono-webhook-secret", secret);
        }
        request.send().await.expect("request failed")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.address)).send().await.expect("request failed")
    }

    /// Takes every message currently in the work queue.
    pub async fn queued(&self) -> Vec<Delivery> {
        self.broker.drain(&self.broker.topology.work_queue()).await
    }

    /// Ready messages in the work queue, without taking them.
    pub async fn queue_depth(&self) -> u32 {
        self.broker.depth(&self.broker.topology.work_queue()).await
    }

    /// Fires the shutdown token (as SIGTERM does) without waiting.
    pub fn fire_shutdown(&self) {
        self.cancel.cancel();
    }

    /// Fires the shutdown token and waits for the server to drain and stop.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let server = self.server.take().expect("already stopped");
        tokio::time::timeout(Duration::from_secs(15), server).await.expect("ingest did not stop")?
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The JSON body of a response.
pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("body is not JSON")
}
