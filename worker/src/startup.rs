//! Builds a worker from its configuration and runs it until shutdown.
//!
//! `build` fails fast, with one line naming the service, if RabbitMQ cannot be reached at start (the
//! database was reached by then) or `METRICS_ADDR` cannot be bound; once running, the worker rides
//! out outages of either service by itself.

use actix_web::dev::ServerHandle;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::circuit::CircuitBreaker;
use crate::config::RunArgs;
use crate::consumer::{self, ConsumerSettings, Session};
use crate::health::{self, Health};
use crate::mono::MonoClient;
use crate::pipeline::PipelineSettings;
use crate::processor::Processor;
use crate::republish::DeadClass;
use crate::retention::RetentionPolicy;
use crate::tokens::TokenFetcher;
use mono_client::MetricNames;
use shared::config::BrokerArgs;

pub struct Worker {
    pipeline: Arc<PipelineSettings>,
    settings: ConsumerSettings,
    session: Session,
    metrics_addr: SocketAddr,
    metrics_server: ServerHandle,
    retention: RetentionPolicy,
    retention_interval: Duration,
    notify: crate::notify::sender::SenderSettings,
}

impl Worker {
    /// Connects to RabbitMQ, declares the topology and binds `METRICS_ADDR`. `pool` must be migrated
    /// already.
    pub async fn build(broker: &BrokerArgs, run: &RunArgs, pool: PgPool) -> anyhow::Result<Self> {
        shared::metrics::recorder();
        // Each class exists (at 0) from the start, so `increase()` sees the first dead letter.
        for class in [DeadClass::Poison, DeadClass::Permanent, DeadClass::Exhausted] {
            metrics::counter!("monohook_worker_dead_letters_total", "class" => class.as_str()).increment(0);
        }
        let secret_key = run
            .mono_secret_key
            .clone()
            .ok_or_else(|| anyhow::anyhow!("MONO_SECRET_KEY is required to run the worker"))?;
        let mono = MonoClient::new(&run.mono_api_url, secret_key, run.mono_timeout(), run.max_retry_after())?
            .with_caller("monohook-worker");
        let topology = broker.topology();
        // Parking and retrying need at least one tier to wait in.
        anyhow::ensure!(
            !topology.retry_delays().is_empty(),
            "RETRY_DELAYS_SECS must list at least one delay"
        );
        let breaker = CircuitBreaker::new(run.breaker_settings(), MetricNames::WORKER);
        let tokens = Arc::new(TokenFetcher::new(
            mono,
            breaker,
            run.mono_retry_policy(),
            run.mono_max_in_flight,
            MetricNames::WORKER,
        ));
        let health = Arc::new(Health::new(tokens.clone()));
        let notify = run.notify_settings()?;
        let subscriptions = crate::db::notifications::Subscriptions {
            endpoints: notify
                .endpoints
                .iter()
                .map(|endpoint| (endpoint.name.clone(), endpoint.kinds.iter().copied().collect()))
                .collect(),
        };
        let pipeline = PipelineSettings {
            processor: Arc::new(
                Processor::new(pool, run.dedup_window())
                    .with_journal_payload(run.journal_payload)
                    .with_subscriptions(subscriptions),
            ),
            health: health.clone(),
            tokens,
            topology: topology.clone(),
            batch_max: run.batch_max,
            batch_concurrency: run.batch_concurrency,
            returns: Default::default(),
            hold_max: run.hold_max(),
        };
        let settings = ConsumerSettings {
            amqp_url: broker.amqp_url.clone(),
            topology,
            prefetch: run.prefetch,
            shutdown_grace: run.shutdown_grace(),
            queue_poll: std::time::Duration::from_secs(run.queue_poll_secs),
        };
        let session = Session::open(&settings, consumer::Topo::Declare).await?;
        let (metrics_addr, metrics_server) = health::serve(run.metrics_addr, health)?;
        Ok(Self {
            pipeline: Arc::new(pipeline),
            settings,
            session,
            metrics_addr,
            metrics_server,
            retention: run.retention_policy(),
            retention_interval: Duration::from_secs(run.retention_interval_secs),
            notify,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Consumes until `cancel` fires, then drains in-flight deliveries within the grace period.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let watch = tokio::spawn(health::watch_database(
            self.pipeline.processor.pool().clone(),
            self.pipeline.health.clone(),
            cancel.clone(),
        ));
        let report =
            tokio::spawn(crate::tokens::report_key_refused(self.pipeline.tokens.clone(), cancel.clone()));
        // Every worker runs the schedule; the advisory lock lets one at a time do a round.
        let retention = tokio::spawn(crate::retention::run(
            self.pipeline.processor.pool().clone(),
            self.retention,
            self.retention_interval,
            cancel.clone(),
        ));
        let relay = tokio::spawn(crate::relay::run(
            crate::relay::RelaySettings {
                amqp_url: self.settings.amqp_url.clone(),
                topology: self.settings.topology.clone(),
                processor: self.pipeline.processor.clone(),
            },
            cancel.clone(),
        ));
        let sender = tokio::spawn(crate::notify::sender::run(
            self.pipeline.processor.pool().clone(),
            self.notify,
            cancel.clone(),
        ));
        consumer::run(self.pipeline.clone(), self.settings, self.session, cancel).await;
        let _ = sender.await;
        let _ = relay.await;
        let _ = watch.await;
        let _ = report.await;
        let _ = retention.await;
        self.metrics_server.stop(true).await;
        tracing::info!("worker stopped");
        Ok(())
    }
}
