//! worker's integration tests: one binary, a module per feature. Each test gets its own database
//! (`#[sqlx::test]`), its own queue prefix on the real RabbitMQ, and its own Mono (wiremock).

mod cli;
mod database_faults;
mod dead_letter_rows;
mod dlq;
mod dlq_model;
mod edges;
mod erasure;
mod events;
mod helpers;
mod idempotency;
mod journal_migration;
mod json_output;
mod mono_failures;
mod notifications;
mod ordering;
mod outages;
mod personal_data;
mod pipeline;
mod poison;
mod replay_lineage;
mod retention;
mod scaling;
mod shutdown;
mod token_offers;
