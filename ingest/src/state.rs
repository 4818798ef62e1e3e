//! What every request handler can reach.

use std::time::Duration;

use crate::auth::WebhookSecrets;
use crate::publisher::Publisher;

pub struct AppState {
    pub publisher: Publisher,
    pub secrets: WebhookSecrets,
    pub max_body_bytes: usize,
    pub client_timeout: Duration,
}
