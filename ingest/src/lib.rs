//! `ingest`: the thin HTTP edge of monohook. It authenticates Mono's webhook, validates its envelope,
//! and publishes the raw body to RabbitMQ as a persistent message, answering 200 only after the
//! broker confirmed it. It does no business work and never touches Postgres.

pub mod auth;
pub mod config;
pub mod publisher;
pub mod routes;
pub mod startup;
pub mod state;
