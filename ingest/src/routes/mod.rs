//! One file per endpoint.

mod health;
mod webhook;

pub use health::{healthz, readyz};
pub use webhook::receive_webhook;
