//! `worker`: consumes the webhooks ingest queued, asks Mono for re-auth tokens, and keeps each
//! account's record in PostgreSQL. Any number of worker processes can share the work queue.

pub mod account;
pub mod acks;
pub mod batch;
pub mod commands;
pub mod config;
pub mod consumer;
pub mod db;
pub mod event;
pub mod handlers;
pub mod health;
pub mod journal_payload;
pub mod notify;
pub mod partitions;
pub mod pipeline;
pub mod processor;
pub mod queue_watch;
pub mod relay;
pub mod republish;
pub mod retention;
pub mod startup;
pub mod token_path;

// The Mono client lives in its own crate, shared with the app's API.
pub use mono_client::client as mono;
pub use mono_client::{circuit, tokens};
