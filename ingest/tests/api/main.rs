//! ingest's integration tests: one binary, a module per feature. Every test runs against the real
//! RabbitMQ with a queue prefix of its own.

mod authentication;
mod broker_outage;
mod cli;
mod contract;
mod hardening;
mod helpers;
mod publishing;
mod shutdown;
mod validation;
