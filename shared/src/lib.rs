//! What `ingest` and `worker` share: Mono's event envelope, configuration groups, the queue topology,
//! the delivery metadata carried in AMQP properties, broker connections, retry schedules and telemetry.
//!
//! Nothing here holds long-lived state; each binary owns its connections and decides how to recover.

pub mod amqp;
pub mod amqp_tls;
pub mod cli_docs;
pub mod config;
pub mod credentials;
pub mod delivery;
pub mod event;
pub mod metrics;
pub mod redact;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
