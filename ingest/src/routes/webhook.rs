//! `POST /webhooks/mono`: authenticate, bound and validate the body, stamp it, publish it with a
//! confirm, and only then answer 200.
//!
//! The checks run cheapest first: the secret before reading any body, the declared length before
//! reading, the real length while reading. A rejected request publishes nothing. Any failure to get
//! the broker's confirm is a 503 with `Retry-After`, so Mono delivers the webhook again later.

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_LENGTH, RETRY_AFTER};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use futures_util::StreamExt;
use serde_json::json;
use tracing::Instrument;

use crate::publisher::PublishError;
use crate::state::AppState;
use shared::delivery::DeliveryMeta;
use shared::event::{Envelope, EnvelopeError};
use shared::telemetry::{self, propagation};

/// The header Mono puts its webhook secret in.
pub const SECRET_HEADER: &str = "mono-webhook-secret";
/// Seconds Mono is asked to wait before retrying after a 503.
const RETRY_AFTER_SECS: u32 = 5;

/// Why a webhook was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Missing or wrong `mono-webhook-secret`.
    #[error("unauthorized")]
    Unauthorized,
    /// The body is larger than `MAX_BODY_BYTES`.
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The body did not arrive within the client timeout.
    #[error("body not received in time")]
    BodyTimeout,
    /// The connection failed while the body was read.
    #[error("body could not be read: {0}")]
    BodyUnreadable(String),
    /// The body is not a Mono webhook envelope.
    #[error("invalid payload: {0}")]
    Invalid(#[from] EnvelopeError),
    /// The broker did not confirm the publish.
    #[error("not queued: {0}")]
    Unavailable(#[from] PublishError),
}

impl ResponseError for WebhookError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyUnreadable(_) | Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        let body = match self {
            Self::Unauthorized => json!({ "error": "unauthorized" }),
            Self::TooLarge { limit } => json!({ "error": "payload_too_large", "limit_bytes": limit }),
            Self::BodyTimeout => json!({ "error": "request_timeout" }),
            Self::BodyUnreadable(detail) => json!({ "error": "invalid_payload", "detail": detail }),
            Self::Invalid(reason) => json!({ "error": "invalid_payload", "detail": reason.to_string() }),
            // A 5xx says nothing internal; the cause is in the log.
            Self::Unavailable(_) => {
                response.insert_header((RETRY_AFTER, RETRY_AFTER_SECS));
                json!({ "error": "unavailable" })
            }
        };
        response.json(body)
    }
}

pub async fn receive_webhook(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebhookError> {
    let span =
        tracing::info_span!("webhook", delivery_id = tracing::field::Empty, event = tracing::field::Empty);
    let in_flight = metrics::gauge!("monohook_ingest_requests_in_flight");
    in_flight.increment(1.0);
    let result = accept(&request, payload, &state).instrument(span.clone()).await;
    in_flight.decrement(1.0);
    let _entered = span.enter();
    match &result {
        Ok(_) => {}
        Err(WebhookError::Unavailable(cause)) => tracing::warn!(%cause, "webhook not queued; answered 503"),
        Err(error) => tracing::info!(%error, status = error.status_code().as_u16(), "webhook rejected"),
    }
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(error) => error.outcome(),
    };
    metrics::counter!("monohook_ingest_requests_total", "outcome" => outcome).increment(1);
    result
}

/// Every value of the `outcome` label, so each series exists (at 0) from the start.
pub const OUTCOMES: [&str; 6] =
    ["accepted", "unauthorized", "invalid_payload", "too_large", "timeout", "unavailable"];

impl WebhookError {
    /// The `outcome` label of `monohook_ingest_requests_total`.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::TooLarge { .. } => "too_large",
            Self::BodyTimeout => "timeout",
            Self::BodyUnreadable(_) | Self::Invalid(_) => "invalid_payload",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

async fn accept(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, WebhookError> {
    let provided = request.headers().get(SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !state.secrets.verify(provided) {
        return Err(WebhookError::Unauthorized);
    }

    let body = read_body(request, payload, state.max_body_bytes, state.client_timeout).await?;
    let envelope = Envelope::parse(&body)?;
    let meta = DeliveryMeta::stamp(&body);
    let span = tracing::Span::current();
    span.record("delivery_id", tracing::field::display(meta.id));
    span.record("event", envelope.event_name());

    let publishing = std::time::Instant::now();
    let publish = publish_span(envelope.event_name());
    // The trace continues in the worker from this span: its context rides in the message headers.
    let properties = propagation::inject(&publish, meta.to_properties());
    let published = state
        .publisher
        .publish_confirmed(envelope.event_name(), &body, properties)
        .instrument(publish.clone())
        .await;
    metrics::histogram!("monohook_ingest_publish_confirm_seconds").record(publishing.elapsed().as_secs_f64());
    if published.is_err() {
        publish.record("otel.status_code", "ERROR");
    }
    drop(publish);
    published?;
    tracing::info!("webhook queued");
    Ok(HttpResponse::Ok().json(json!({ "id": meta.id.to_string() })))
}

/// The span of the publish and its confirm, a child of the request's, while tracing is on. Off, it is
/// no span at all: this is the hot path the benchmark measures.
fn publish_span(routing_key: &str) -> tracing::Span {
    if !telemetry::tracing_enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.rabbitmq.destination.routing_key = routing_key,
        otel.status_code = tracing::field::Empty,
    )
}

/// Reads the body, refusing it as soon as it is known to exceed `limit`.
async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<web::BytesMut, WebhookError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(WebhookError::TooLarge { limit });
    }
    let read = async {
        let mut body = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| WebhookError::BodyUnreadable(e.to_string()))?;
            if body.len() + chunk.len() > limit {
                return Err(WebhookError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| WebhookError::BodyTimeout)?
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the body, validation never panics, and a body it refuses is a 400 with a detail.
        #[test]
        fn a_refused_body_is_always_a_400_with_a_detail(body in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Err(error) = Envelope::parse(&body) {
                let error = WebhookError::from(error);
                prop_assert_eq!(error.status_code(), StatusCode::BAD_REQUEST);
                prop_assert_eq!(error.outcome(), "invalid_payload");
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }
}
