//! A whole monohook — mono-sim, workers and an ingest as real processes — on a database and a queue
//! prefix of its own, for the system tests and the chaos suite.

use anyhow::Context;
use serde_json::Value;
use sqlx::PgPool;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::{Service, free_port, wait_until_ready};
use shared::topology::Topology;

pub const WEBHOOK_SECRET: &str = "sys-webhook-secret-4d1c9a";
pub const MONO_KEY: &str = "sys-mono-key-77f2e0";
/// The app's API key of every system (label `app`).
pub const APP_API_KEY: &str = "sys-app-api-key-5e0b2c91";
/// The secret the workers sign the app's notifications with, and mono-sim (playing the app) checks.
pub const APP_NOTIFY_SECRET: &str = "whsec_c3lzdGVtLW5vdGlmeS1zZWNyZXQtMDEyMzQ1Njc4OQ==";

/// Settings of one system.
#[derive(Clone, Debug)]
pub struct SystemConfig {
    pub amqp_url: String,
    /// PostgreSQL server URL without a database name.
    pub database_server: String,
    /// Where the workers reach that server, if not directly (e.g. through a proxy a scenario cuts).
    pub worker_database_server: Option<String>,
    pub retry_delays_secs: String,
    /// Extra environment for every worker.
    pub worker_env: Vec<(&'static str, String)>,
    /// Extra environment for ingest.
    pub ingest_env: Vec<(&'static str, String)>,
    pub log_dir: PathBuf,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            database_server: std::env::var("DATABASE_URL")
                .ok()
                .and_then(|u| u.rsplit_once('/').map(|(server, _)| server.to_owned()))
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".into()),
            worker_database_server: None,
            retry_delays_secs: "1,2".into(),
            worker_env: Vec::new(),
            ingest_env: Vec::new(),
            log_dir: std::env::temp_dir().join(format!("monohook-system-{}", uuid::Uuid::new_v4().simple())),
        }
    }
}

pub struct System {
    pub config: SystemConfig,
    pub prefix: String,
    pub database: String,
    pub pool: PgPool,
    pub mono: Service,
    pub mono_url: String,
    pub ingest: Option<Service>,
    pub ingest_port: u16,
    /// Where ingest serves `/metrics`.
    pub ingest_metrics_port: u16,
    pub workers: Vec<(Service, u16)>,
    /// The app's API processes started, with their ports.
    pub apis: Vec<(Service, u16)>,
    /// Further ingest processes (behind the same load balancer, as it were), with their ports.
    pub more_ingests: Vec<(Service, u16)>,
    http: reqwest::Client,
}

/// How the app (mono-sim) answers notifications; the default takes every one at once.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct AppAnswers {
    /// The status of every answer (`0`: 204).
    pub status: u16,
    pub latency_ms: u64,
    /// Share of tries answered 500 ...
    pub failure_rate: f64,
    /// ... but at most this many of one notification's tries (`0`: no bound).
    pub most_failures_each: u64,
}

impl System {
    /// Creates the database and starts mono-sim, `workers` workers and ingest, each ready.
    pub async fn start(config: SystemConfig, workers: usize) -> anyhow::Result<Self> {
        let prefix = format!("sys.{}", uuid::Uuid::new_v4().simple());
        let database = format!("monohook_sys_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&format!("{}/postgres", config.database_server)).await?;
        sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await?;
        admin.close().await;
        let pool = PgPool::connect(&format!("{}/{database}", config.database_server)).await?;

        let mono_port = free_port();
        let ingest_port = free_port();
        // A re-auth link mono-sim hands out, once opened, sends the customer-finished webhooks to
        // this system's ingest, as Mono would.
        let mut mono = Service::spawn(
            "mono-sim",
            "mono-sim",
            &["serve", "--listen-addr", &format!("127.0.0.1:{mono_port}")],
            &[
                ("SIM_SECRET_KEY", MONO_KEY.to_owned()),
                ("SIM_INGEST_URL", format!("http://127.0.0.1:{ingest_port}/webhooks/mono")),
                ("SIM_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
                ("SIM_APP_SECRET", APP_NOTIFY_SECRET.to_owned()),
                ("RUST_LOG", "info".into()),
            ],
            &config.log_dir,
        )?;
        let mono_url = format!("http://127.0.0.1:{mono_port}");
        wait_until_ready(&mut mono, &format!("{mono_url}/_sim/config"), Duration::from_secs(20)).await?;

        let mut system = Self {
            config,
            prefix,
            database,
            pool,
            mono,
            mono_url,
            ingest: None,
            ingest_port,
            ingest_metrics_port: free_port(),
            workers: Vec::new(),
            apis: Vec::new(),
            more_ingests: Vec::new(),
            http: reqwest::Client::new(),
        };
        for _ in 0..workers {
            system.start_worker().await?;
        }
        system.start_ingest().await?;
        Ok(system)
    }

    fn common_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AMQP_URL", self.config.amqp_url.clone()),
            ("QUEUE_PREFIX", self.prefix.clone()),
            ("RETRY_DELAYS_SECS", self.config.retry_delays_secs.clone()),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "info".into()),
        ]
    }

    /// `NOTIFY_ENDPOINTS` naming mono-sim's app receiver.
    fn notify_endpoints(&self) -> String {
        serde_json::json!([{
            "name": "app",
            "url": format!("{}/_app/notifications", self.mono_url),
            "secrets": [APP_NOTIFY_SECRET],
        }])
        .to_string()
    }

    /// Sets how the app (mono-sim) answers notifications.
    pub async fn set_app(&self, answers: AppAnswers) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_app/config", self.mono_url))
            .json(&answers)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// What the app (mono-sim) took: `{"notifications": [...], "refused": {...}}`.
    pub async fn app_notifications(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/_app/notifications", self.mono_url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Every request the app (mono-sim) took, as received: `[{"headers": {...}, "body_b64": ...}]`.
    pub async fn app_requests(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/_app/requests", self.mono_url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Every request the app took, verified by `scripts/verify-notifications.py` (PyPI's
    /// standardwebhooks and jsonschema, from `scripts/ensure-verifier`): how many, and one verdict
    /// each (`ok <type>` when it verified and its body conforms to api/openapi.json).
    pub async fn app_requests_verified(&self) -> anyhow::Result<(usize, Vec<String>)> {
        use std::io::Write;
        let requests = self.app_requests().await?;
        let count = requests.as_array().map_or(0, Vec::len);
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let python = format!("{root}/target/standardwebhooks-venv/bin/python");
        anyhow::ensure!(
            std::path::Path::new(&python).exists(),
            "the Standard Webhooks verifier is not installed at {python}: run ./scripts/ensure-verifier"
        );
        let mut child = std::process::Command::new(python)
            .arg(format!("{root}/scripts/verify-notifications.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let input = serde_json::json!({
            "secret": APP_NOTIFY_SECRET,
            "openapi": format!("{root}/api/openapi.json"),
            "messages": requests,
        });
        child.stdin.take().expect("piped").write_all(input.to_string().as_bytes())?;
        let output = child.wait_with_output()?;
        anyhow::ensure!(
            output.status.success(),
            "the verifier failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok((count, String::from_utf8(output.stdout)?.lines().map(str::to_owned).collect()))
    }

    fn worker_database_server(&self) -> &str {
        self.config.worker_database_server.as_deref().unwrap_or(&self.config.database_server)
    }

    /// Starts one more worker and waits until it is ready.
    pub async fn start_worker(&mut self) -> anyhow::Result<()> {
        let port = free_port();
        let mut env = self.common_env();
        env.extend([
            ("DATABASE_URL", format!("{}/{}", self.worker_database_server(), self.database)),
            ("MONO_SECRET_KEY", MONO_KEY.to_owned()),
            ("MONO_API_URL", self.mono_url.clone()),
            ("METRICS_ADDR", format!("127.0.0.1:{port}")),
            ("MONO_RETRY_INITIAL_MS", "50".into()),
            ("QUEUE_POLL_SECS", "1".into()),
            // mono-sim plays the app: every state change is told to it, signed (retries span about
            // two minutes, so that an endpoint down for one loses nothing).
            ("NOTIFY_ENDPOINTS", self.notify_endpoints()),
            ("NOTIFY_ALLOW_PRIVATE_ADDRESSES", "true".into()),
            ("NOTIFY_RETRY_SCHEDULE_SECS", "1,2,4,8,15,30,60".into()),
            ("NOTIFY_BREAKER_OPEN_SECS", "3".into()),
        ]);
        env.extend(self.config.worker_env.iter().cloned());
        let name = format!("worker-{}", self.workers.len() + 1);
        let mut worker = Service::spawn(&name, "worker", &[], &env, &self.config.log_dir)?;
        wait_until_ready(&mut worker, &format!("http://127.0.0.1:{port}/readyz"), Duration::from_secs(30))
            .await?;
        self.workers.push((worker, port));
        Ok(())
    }

    /// Starts ingest (again) on its port and waits until it is ready.
    pub async fn start_ingest(&mut self) -> anyhow::Result<()> {
        let mut env = self.common_env();
        env.extend([
            ("MONO_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("LISTEN_ADDR", format!("127.0.0.1:{}", self.ingest_port)),
            ("METRICS_ADDR", format!("127.0.0.1:{}", self.ingest_metrics_port)),
        ]);
        env.extend(self.config.ingest_env.iter().cloned());
        let mut ingest = Service::spawn("ingest", "ingest", &[], &env, &self.config.log_dir)?;
        wait_until_ready(&mut ingest, &format!("{}/readyz", self.ingest_url()), Duration::from_secs(30))
            .await?;
        self.ingest = Some(ingest);
        Ok(())
    }

    /// Starts one more ingest process on ports of its own, waits until it is ready, and returns its
    /// URL.
    pub async fn start_another_ingest(&mut self) -> anyhow::Result<String> {
        let port = free_port();
        let mut env = self.common_env();
        env.extend([
            ("MONO_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
        ]);
        env.extend(self.config.ingest_env.iter().cloned());
        let name = format!("ingest-{}", self.more_ingests.len() + 2);
        let mut ingest = Service::spawn(&name, "ingest", &[], &env, &self.config.log_dir)?;
        let url = format!("http://127.0.0.1:{port}");
        wait_until_ready(&mut ingest, &format!("{url}/readyz"), Duration::from_secs(30)).await?;
        self.more_ingests.push((ingest, port));
        Ok(url)
    }

    /// Starts one more api process (the worker has migrated the database by then), waits until it
    /// is ready, and returns its URL.
    pub async fn start_api(&mut self) -> anyhow::Result<String> {
        self.start_api_with(&[]).await
    }

    /// [`System::start_api`] with extra settings.
    pub async fn start_api_with(&mut self, extra: &[(&'static str, &str)]) -> anyhow::Result<String> {
        let port = free_port();
        let mut env = vec![
            ("DATABASE_URL", self.database_url()),
            ("APP_API_KEYS", format!("app:{APP_API_KEY}")),
            ("MONO_SECRET_KEY", MONO_KEY.to_owned()),
            ("MONO_API_URL", self.mono_url.clone()),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "debug".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let mut api = Service::spawn("api", "api", &[], &env, &self.config.log_dir)?;
        let url = format!("http://127.0.0.1:{port}");
        wait_until_ready(&mut api, &format!("{url}/readyz"), Duration::from_secs(30)).await?;
        self.apis.push((api, port));
        Ok(url)
    }

    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ingest_port)
    }

    /// Posts a webhook body as Mono would; returns the status and the delivery id of a 200.
    pub async fn post(&self, body: &[u8]) -> anyhow::Result<(u16, Option<String>)> {
        let response = self
            .http
            .post(format!("{}/webhooks/mono", self.ingest_url()))
            .header("mono-webhook-secret", WEBHOOK_SECRET)
            .body(body.to_vec())
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        let status = response.status().as_u16();
        let id = if status == 200 {
            response.json::<Value>().await?["id"].as_str().map(str::to_owned)
        } else {
            None
        };
        Ok((status, id))
    }

    /// The system's own database, as the api and the operator's commands reach it.
    pub fn database_url(&self) -> String {
        format!("{}/{}", self.config.database_server, self.database)
    }

    /// A worker's `/metrics` text.
    pub async fn worker_metrics(&self, index: usize) -> anyhow::Result<String> {
        let port = self.workers.get(index).context("no such worker")?.1;
        Ok(self.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await?.text().await?)
    }

    /// ingest's `/metrics` text.
    pub async fn ingest_metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.ingest_metrics_port);
        Ok(self.http.get(url).send().await?.text().await?)
    }

    /// Everything every process logged so far.
    pub fn all_logs(&self) -> String {
        let mut logs = self.mono.logs();
        if let Some(ingest) = &self.ingest {
            logs.push_str(&ingest.logs());
        }
        for (ingest, _) in &self.more_ingests {
            logs.push_str(&ingest.logs());
        }
        for (worker, _) in &self.workers {
            logs.push_str(&worker.logs());
        }
        for (api, _) in &self.apis {
            logs.push_str(&api.logs());
        }
        logs
    }

    /// Waits until `sql` (a scalar count) reaches `expected`.
    pub async fn wait_for_count(&self, sql: &str, expected: i64, within: Duration) -> anyhow::Result<i64> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let count: i64 = sqlx::query_scalar(sql).fetch_one(&self.pool).await?;
            if count >= expected || tokio::time::Instant::now() >= deadline {
                return Ok(count);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn topology(&self) -> Topology {
        let delays = self
            .config
            .retry_delays_secs
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .map(Duration::from_secs)
            .collect();
        Topology::new(&self.prefix, delays, 10)
    }

    /// Stops everything and removes the database and the queues.
    pub async fn shut_down(mut self) -> anyhow::Result<()> {
        if let Some(ingest) = self.ingest.as_mut() {
            ingest.terminate();
            ingest.wait_exit(Duration::from_secs(15));
        }
        for (ingest, _) in &mut self.more_ingests {
            ingest.terminate();
            ingest.wait_exit(Duration::from_secs(15));
        }
        for (worker, _) in &mut self.workers {
            worker.terminate();
            worker.wait_exit(Duration::from_secs(30));
        }
        for (api, _) in &mut self.apis {
            api.terminate();
            api.wait_exit(Duration::from_secs(15));
        }
        self.mono.kill();
        self.pool.close().await;
        let admin = PgPool::connect(&format!("{}/postgres", self.config.database_server)).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database))
            .execute(&admin)
            .await?;
        let connection = crate::bench::broker::connect(&self.config.amqp_url).await?;
        let channel = connection.create_channel().await?;
        let _ = self.topology().delete(&channel).await;
        let _ = connection.close(200, "done".into()).await;
        Ok(())
    }
}

/// The value of one series in a Prometheus text exposition (`name{labels} value`), if present.
/// `labels` must be written as the exporter writes them, e.g. `outcome="accepted"`.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        (metric == name && labels.iter().all(|l| label_text.split(',').any(|have| have == *l)))
            .then(|| value.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_found_by_name_and_labels() {
        let text = "# TYPE x counter\nx{a=\"1\",b=\"2\"} 5\nx{a=\"3\"} 7\ny 1.5\n";
        assert_eq!(metric_value(text, "x", &["b=\"2\""]), Some(5.0));
        assert_eq!(metric_value(text, "x", &["a=\"3\""]), Some(7.0));
        assert_eq!(metric_value(text, "y", &[]), Some(1.5));
        assert_eq!(metric_value(text, "x", &["a=\"9\""]), None);
    }
}
