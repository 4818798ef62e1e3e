use chrono::{DateTime, Utc};
use clap::Parser;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use shared::delivery::DeliveryMeta;
use shared::event::Envelope;
use shared::testing::{TestBroker, amqp_url, eventually, init_test_logging};
use worker::config::Cli;
use worker::db::accounts::{self, AccountView};
use worker::startup::Worker;

pub const MONO_KEY: &str = "test_sk_0123456789";
/// The token in `tests/fixtures/reauthorise_response.json`.
pub const FIXTURE_TOKEN: &str = "VwxcfeLRZvq1UlD5WiuN";
/// The account of the re-auth fixtures.
pub const ACCOUNT: &str = "5fbcde8f8699984153e65537";
/// How long a test waits for the pipeline before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// One test's world: its database, its queues, its Mono, and the workers it started.
pub struct TestWorld {
    pub pool: PgPool,
    pub broker: TestBroker,
    pub mono: MockServer,
    workers: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    /// Where each started worker serves `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addrs: Vec<std::net::SocketAddr>,
}

/// A journal row as the tests check it.
#[derive(Debug, sqlx::FromRow)]
pub struct JournalRow {
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub event: String,
    pub account_id: Option<String>,
}

/// A `dead_letters` row as the tests check it.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredDeadLetter {
    pub id: uuid::Uuid,
    pub account_id: Option<String>,
    /// The body exactly as received.
    pub data: Vec<u8>,
    pub reason: String,
    /// `poison`, `permanent` or `exhausted`.
    pub class: String,
    pub attempts: i32,
    /// The string headers a replay carries on.
    pub headers: serde_json::Value,
    pub rebuilt: bool,
}

impl TestWorld {
    pub async fn new(pool: PgPool) -> Self {
        init_test_logging();
        Self {
            pool,
            broker: TestBroker::new().await,
            mono: MockServer::start().await,
            workers: Vec::new(),
            metrics_addrs: Vec::new(),
        }
    }

    /// The worker's command line for this world, plus `extra` flags.
    pub fn cli(&self, extra: &[&str]) -> Cli {
        let mut args = vec![
            "worker".to_owned(),
            "--mono-secret-key".into(),
            MONO_KEY.into(),
            "--mono-api-url".into(),
            self.mono.uri(),
            "--queue-prefix".into(),
            self.broker.prefix.clone(),
            "--retry-delays-secs".into(),
            self.broker.retry_delays_arg(),
            "--mono-retry-budget-secs".into(),
            "2".into(),
            "--mono-retry-initial-ms".into(),
            "20".into(),
            "--amqp-url".into(),
            amqp_url().expose_secret().to_owned(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Cli::parse_from(args)
    }

    pub async fn start_worker(&mut self) {
        self.start_worker_with(&[]).await;
    }

    pub async fn start_worker_with(&mut self, extra: &[&str]) {
        let cli = self.cli(extra);
        self.start_worker_on(cli, self.pool.clone()).await;
    }

    /// Starts a worker with a given command line and pool (e.g. a pool that goes through a proxy).
    pub async fn start_worker_on(&mut self, cli: Cli, pool: PgPool) {
        let worker = Worker::build(&cli.broker, &cli.run, pool).await.expect("worker failed to build");
        self.metrics_addrs.push(worker.metrics_addr());
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(worker.run(cancel.clone()));
        self.workers.push((cancel, handle));
    }

    /// Stops every worker as SIGTERM would, and waits for each to exit.
    pub async fn stop_workers(&mut self) {
        for (cancel, handle) in self.workers.drain(..) {
            cancel.cancel();
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("worker did not stop")
                .expect("worker panicked")
                .expect("worker failed");
        }
    }

    /// The first worker's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addrs[0])).await.unwrap().text().await.unwrap()
    }

    /// Publishes a webhook exactly as ingest would, received now.
    pub async fn publish(&self, body: &[u8]) -> DeliveryMeta {
        let meta = DeliveryMeta::stamp(body);
        self.publish_meta(body, &meta).await;
        meta
    }

    /// Publishes a webhook as ingest would have, had it received it at `received_at`.
    pub async fn publish_received_at(&self, body: &[u8], received_at: DateTime<Utc>) -> DeliveryMeta {
        let mut meta = DeliveryMeta::stamp(body);
        meta.received_at = DateTime::from_timestamp_millis(received_at.timestamp_millis()).unwrap();
        self.publish_meta(body, &meta).await;
        meta
    }

    /// Publishes with a given stamp (the same stamp twice is a redelivery).
    pub async fn publish_meta(&self, body: &[u8], meta: &DeliveryMeta) {
        let event =
            Envelope::parse(body).map(|e| e.event_name().to_owned()).unwrap_or_else(|_| "garbage".into());
        self.broker.publish_to_exchange(&event, body, meta.to_properties()).await;
    }

    /// Waits until the delivery is journaled and returns its row.
    pub async fn settled(&self, meta: &DeliveryMeta) -> JournalRow {
        eventually(&format!("delivery {} is settled", meta.id), PATIENCE, || async {
            self.journal(meta).await.is_some()
        })
        .await;
        self.journal(meta).await.unwrap()
    }

    pub async fn journal(&self, meta: &DeliveryMeta) -> Option<JournalRow> {
        sqlx::query_as(
            "SELECT status, attempts, last_error, event, account_id FROM webhook_events WHERE id = $1",
        )
        .bind(meta.id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    pub async fn journal_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM webhook_events").fetch_one(&self.pool).await.unwrap()
    }

    pub async fn account(&self, id: &str) -> AccountView {
        self.find_account(id).await.unwrap_or_else(|| panic!("no account {id}"))
    }

    pub async fn find_account(&self, id: &str) -> Option<AccountView> {
        accounts::find(&self.pool, id).await.unwrap()
    }

    /// The stored token itself (the view never exposes it).
    pub async fn stored_token(&self, id: &str) -> Option<String> {
        sqlx::query_scalar::<_, Option<String>>("SELECT reauth_token FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
            .flatten()
    }

    /// Mono hands out `token` for `account`, checking the secret key.
    pub async fn mono_issues_token(&self, account: &str, token: &str) {
        Mock::given(method("POST"))
            .and(path(format!("/accounts/{account}/reauthorise")))
            .and(header("mono-sec-key", MONO_KEY))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": token })))
            .mount(&self.mono)
            .await;
    }

    /// Waits until at least `count` dead letters are stored (`dead_letters` rows: the worker never
    /// publishes one), and returns every stored dead letter, oldest first.
    pub async fn dead_letters(&self, count: usize) -> Vec<StoredDeadLetter> {
        eventually(&format!("{count} dead letter(s) are stored"), PATIENCE, || async {
            self.dead_letter_count().await >= count as i64
        })
        .await;
        self.stored_dead_letters().await
    }

    /// Every stored dead letter now, oldest first.
    pub async fn stored_dead_letters(&self) -> Vec<StoredDeadLetter> {
        sqlx::query_as(
            "SELECT id, account_id, body AS data, reason, class, attempts, headers, rebuilt FROM dead_letters
             ORDER BY dead_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// `dead_letters` rows now.
    pub async fn dead_letter_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(&self.pool).await.unwrap()
    }

    /// `outbox` rows now (replay copies not yet published by a worker's relay).
    pub async fn outbox_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&self.pool).await.unwrap()
    }

    /// Waits until a running worker's relay has published every outbox row (a replay's copies).
    pub async fn outbox_published(&self) {
        eventually("the relay publishes the outbox", PATIENCE, || async { self.outbox_count().await == 0 })
            .await;
    }

    /// `dead_letter_actions` rows of `id` (replays and purges of it).
    pub async fn actions_of(&self, id: uuid::Uuid) -> Vec<(String, bool)> {
        sqlx::query_as(
            "SELECT action, completed_at IS NOT NULL FROM dead_letter_actions WHERE delivery_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

impl TestWorld {
    /// Runs the worker binary (an operator command) against this world's database and queues.
    pub async fn run_cli(&self, args: &[&str], stdin: &str) -> std::process::Output {
        let mut child =
            self.cli_command(args, &self.database_url().await).spawn().expect("cannot run the worker binary");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap()
    }

    /// The worker binary with this world's settings, ready to spawn.
    pub fn cli_command(&self, args: &[&str], database_url: &str) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_worker"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url().expose_secret())
            .env("QUEUE_PREFIX", &self.broker.prefix)
            .env("RETRY_DELAYS_SECS", self.broker.retry_delays_arg())
            .env("LOG_FORMAT", "json")
            .env("USER", "ops-test")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    }

    /// The database URL of this world (for commands spawned by hand).
    pub async fn database_url(&self) -> String {
        let database: String =
            sqlx::query_scalar("SELECT current_database()::text").fetch_one(&self.pool).await.unwrap();
        let server = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        format!("{}/{database}", server.rsplit_once('/').map(|(server, _)| server).unwrap())
    }

    /// Mono refuses `account` for good, as it does an account that cannot be re-authorised.
    pub async fn mono_refuses(&self, account: &str) {
        Mock::given(method("POST"))
            .and(path(format!("/accounts/{account}/reauthorise")))
            .respond_with(
                ResponseTemplate::new(400).set_body_json(
                    serde_json::json!({ "message": "This account can not be re-authorised." }),
                ),
            )
            .mount(&self.mono)
            .await;
    }

    /// Journal rows with `status`.
    pub async fn count_status(&self, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE status = $1")
            .bind(status)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub fn dead_queue(&self) -> String {
        self.broker.topology.dead_queue()
    }

    /// Stores a dead re-auth event for each account, in order, as the worker would have (its
    /// `dead_letters` row with the whole body and its `dead` journal row), without a worker or Mono:
    /// tens of thousands take seconds. The same account twice is the same body under two ids.
    pub async fn seed_dead_letters(&self, accounts: &[String]) -> Vec<DeliveryMeta> {
        const REAUTH: &str = "mono.events.reauthorisation_required";
        let bodies: Vec<Vec<u8>> = accounts.iter().map(|account| body(REAUTH, account)).collect();
        let metas: Vec<DeliveryMeta> = bodies.iter().map(|b| DeliveryMeta::stamp(b)).collect();
        for chunk in (0..accounts.len()).collect::<Vec<_>>().chunks(10_000) {
            let ids: Vec<uuid::Uuid> = chunk.iter().map(|i| metas[*i].id.as_uuid()).collect();
            let account_ids: Vec<String> = chunk.iter().map(|i| accounts[*i].clone()).collect();
            let digests: Vec<String> = chunk.iter().map(|i| metas[*i].body_sha256.clone()).collect();
            let received: Vec<DateTime<Utc>> = chunk.iter().map(|i| metas[*i].received_at).collect();
            let chunk_bodies: Vec<Vec<u8>> = chunk.iter().map(|i| bodies[*i].clone()).collect();
            let mut tx = self.pool.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO webhook_events (id, event, account_id, body_sha256, received_at, status, attempts,
                                             last_error, processed_at, first_attempt_at)
                 SELECT id, $5, account_id, body_sha256, received_at, 'dead', 1, 'Mono refused (400): seeded',
                        now(), received_at
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
                      AS v(id, account_id, body_sha256, received_at)",
            )
            .bind(&ids)
            .bind(&account_ids)
            .bind(&digests)
            .bind(&received)
            .bind(REAUTH)
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO dead_letters (id, event, account_id, body, body_sha256, received_at, reason, class,
                                           attempts, first_attempt_at)
                 SELECT id, $6, account_id, body, body_sha256, received_at, 'Mono refused (400): seeded',
                        'permanent', 1, received_at
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::bytea[])
                      WITH ORDINALITY AS v(id, account_id, body_sha256, received_at, body, n)
                 ORDER BY n",
            )
            .bind(&ids)
            .bind(&account_ids)
            .bind(&digests)
            .bind(&received)
            .bind(&chunk_bodies)
            .bind(REAUTH)
            .execute(&mut *tx)
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        metas
    }
}

impl Drop for TestWorld {
    fn drop(&mut self) {
        for (cancel, _) in &self.workers {
            cancel.cancel();
        }
    }
}

/// A body of `event` for `account`, shaped like Mono's.
pub fn body(event: &str, account: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "event": event, "data": { "account": { "_id": account } } }))
        .unwrap()
}

/// A Mono that hands out `token-1`, `token-2`, ... and counts the calls.
#[derive(Clone, Default)]
pub struct NumberedTokens {
    pub calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl wiremock::Respond for NumberedTokens {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": format!("token-{n}") }))
    }
}
