//! Builds a worker from its configuration and runs it until shutdown.
//!
//! `build` fails fast, with one line naming the service, if PostgreSQL or RabbitMQ cannot be reached
//! at start; once running, the worker rides out outages of either by itself.

use sqlx::PgPool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::config::RunArgs;
use crate::consumer::{self, ConsumerSettings, Session};
use crate::mono::MonoClient;
use crate::processor::Processor;
use shared::config::BrokerArgs;

pub struct Worker {
    processor: Arc<Processor>,
    settings: ConsumerSettings,
    session: Session,
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
        let processor = Processor::new(
            pool,
            mono,
            run.mono_retry_policy(),
            run.dedup_window(),
            topology.delivery_limit(),
        );
        let settings = ConsumerSettings {
            amqp_url: broker.amqp_url.clone(),
            topology,
            prefetch: run.prefetch,
            shutdown_grace: run.shutdown_grace(),
        };
        let session = Session::open(&settings).await?;
        Ok(Self {
            processor: Arc::new(processor),
            settings,
            session,
        })
    }

    /// Consumes until `cancel` fires, then drains in-flight deliveries within the grace period.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        consumer::run(self.processor, self.settings, self.session, cancel).await;
        tracing::info!("worker stopped");
        Ok(())
    }
}
