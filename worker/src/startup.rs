//! Builds a worker from its configuration and runs it until shutdown.
//!
//! `build` fails fast, with one line naming the service, if RabbitMQ cannot be reached at start (the
//! database was reached by then); once running, the worker rides out outages of either by itself.

use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio_util::sync::CancellationToken;

use crate::circuit::CircuitBreaker;
use crate::config::RunArgs;
use crate::consumer::{self, ConsumerSettings, Session};
use crate::mono::MonoClient;
use crate::pipeline::PipelineSettings;
use crate::processor::Processor;
use crate::tokens::TokenFetcher;
use shared::config::BrokerArgs;

pub struct Worker {
    pipeline: Arc<PipelineSettings>,
    settings: ConsumerSettings,
    session: Session,
    connected: Arc<AtomicBool>,
}

impl Worker {
    /// Connects to RabbitMQ and declares the topology. `pool` must be migrated already.
    pub async fn build(broker: &BrokerArgs, run: &RunArgs, pool: PgPool) -> anyhow::Result<Self> {
        let secret_key = run
            .mono_secret_key
            .clone()
            .ok_or_else(|| anyhow::anyhow!("MONO_SECRET_KEY is required to run the worker"))?;
        let mono = MonoClient::new(&run.mono_api_url, secret_key, run.mono_timeout())?;
        let topology = broker.topology();
        let breaker = CircuitBreaker::new(run.breaker_settings());
        let tokens = TokenFetcher::new(mono, breaker, run.mono_retry_policy(), run.mono_max_in_flight);
        let pipeline = PipelineSettings {
            processor: Arc::new(Processor::new(pool, run.dedup_window())),
            tokens: Arc::new(tokens),
            topology: topology.clone(),
            batch_max: run.batch_max.max(1),
            batch_concurrency: run.batch_concurrency.max(1),
        };
        let settings = ConsumerSettings {
            amqp_url: broker.amqp_url.clone(),
            topology,
            prefetch: run.prefetch,
            shutdown_grace: run.shutdown_grace(),
        };
        let session = Session::open(&settings).await?;
        let connected = Arc::new(AtomicBool::new(session.is_connected()));
        Ok(Self { pipeline: Arc::new(pipeline), settings, session, connected })
    }

    /// Consumes until `cancel` fires, then drains in-flight deliveries within the grace period.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        consumer::run(self.pipeline, self.settings, self.session, self.connected, cancel).await;
        tracing::info!("worker stopped");
        Ok(())
    }
}
