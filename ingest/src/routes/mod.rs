//! One file per endpoint.

mod health;
mod metrics;
mod openapi;
mod webhook;

pub use health::{healthz, readyz};
pub use metrics::metrics;
pub use openapi::{OPENAPI, openapi};
pub use webhook::{OUTCOMES, receive_webhook};
