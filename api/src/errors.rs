//! Every answer that is not a success, as the app sees it: a status and `{"error": <code>}` (plus
//! `detail` where there is more to say), and `Retry-After` on 503.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;
use std::time::Duration;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong API key")]
    Unauthorized,
    /// The caller's key may not do this (its scope, `APP_API_KEYS`).
    #[error("this key's scope does not include {0}")]
    Forbidden(&'static str),
    #[error("no such account")]
    NotFound,
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The request's body is not what the endpoint takes.
    #[error("invalid body: {0}")]
    InvalidBody(String),
    /// The redirect asked for is not in `MONO_REAUTH_REDIRECT_URLS`.
    #[error("redirect not allowed: {0}")]
    RedirectNotAllowed(String),
    #[error("the account does not need re-authorisation")]
    ReauthNotRequired,
    #[error("the account is unlinked")]
    AccountUnlinked,
    /// Mono refused to re-authorise the account (a permanent 4xx for it): 422, which clients and
    /// gateways do not retry, unlike a 502.
    #[error("Mono refused the account: {0}")]
    MonoRefused(String),
    #[error("Mono is unavailable: {reason}")]
    MonoUnavailable { reason: String, retry_after: Duration },
    /// Mono answered 2xx without what the request needs (a re-auth link without `data.mono_url`):
    /// 502, since Mono may answer properly next time.
    #[error("Mono answered without {0}")]
    MonoUnexpectedAnswer(&'static str),
    #[error("the database is unavailable: {0}")]
    DatabaseUnavailable(String),
    #[error("database error: {0}")]
    Database(String),
    /// The path exists, the method does not: the methods it takes.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// The request's body is longer than the endpoint takes (bytes).
    #[error("body longer than {0} bytes")]
    PayloadTooLarge(usize),
}

/// `Retry-After` in whole seconds, rounded up (at least 1): a client that waits what it is told never
/// comes back before the wait is over.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound => "not_found",
            Self::InvalidQuery(_) => "invalid_query",
            Self::InvalidBody(_) => "invalid_body",
            Self::RedirectNotAllowed(_) => "redirect_not_allowed",
            Self::ReauthNotRequired => "reauth_not_required",
            Self::AccountUnlinked => "account_unlinked",
            Self::MonoRefused(_) => "mono_refused",
            Self::MonoUnavailable { .. } => "mono_unavailable",
            Self::MonoUnexpectedAnswer(_) => "mono_unexpected_answer",
            Self::DatabaseUnavailable(_) => "database_unavailable",
            Self::Database(_) => "internal",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    /// A database that is down, restarting, failing over or overloaded is a 503 the app retries; only
    /// an error in what was asked (SQLSTATE classes 22, 23, 42) is our bug, a 500.
    fn from(error: sqlx::Error) -> Self {
        let ours = matches!(&error, sqlx::Error::Database(db)
            if db.code().is_some_and(|code| ["22", "23", "42"].iter().any(|class| code.starts_with(class))))
            || matches!(
                error,
                sqlx::Error::ColumnDecode { .. } | sqlx::Error::ColumnNotFound(_) | sqlx::Error::Decode(_)
            );
        if ours { Self::Database(error.to_string()) } else { Self::DatabaseUnavailable(error.to_string()) }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::InvalidQuery(_) | Self::InvalidBody(_) | Self::RedirectNotAllowed(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::ReauthNotRequired | Self::AccountUnlinked => StatusCode::CONFLICT,
            Self::MonoRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MonoUnavailable { .. } | Self::DatabaseUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MonoUnexpectedAnswer(_) => StatusCode::BAD_GATEWAY,
            Self::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        let body = match self {
            Self::MonoRefused(detail)
            | Self::InvalidQuery(detail)
            | Self::InvalidBody(detail)
            | Self::RedirectNotAllowed(detail) => {
                json!({ "error": self.code(), "detail": detail })
            }
            Self::Forbidden(scope) => {
                json!({ "error": self.code(), "detail": format!("this key's scope does not include {scope}") })
            }
            _ => json!({ "error": self.code() }),
        };
        match self {
            Self::Unauthorized => {
                response.insert_header(("www-authenticate", "Bearer"));
            }
            Self::MonoUnavailable { retry_after, .. } => {
                response.insert_header(("retry-after", retry_after_secs(*retry_after).to_string()));
            }
            Self::MethodNotAllowed(allow) => {
                response.insert_header(("allow", *allow));
            }
            Self::DatabaseUnavailable(_) => {
                response.insert_header(("retry-after", "1"));
            }
            _ => {}
        }
        if matches!(self, Self::Database(_) | Self::DatabaseUnavailable(_)) {
            tracing::warn!(error = %self, "request failed on the database");
        }
        response.json(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1_200)), 2, "1.2 s left: come back in 2");
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        let answer =
            ApiError::MonoUnavailable { reason: "open".into(), retry_after: Duration::from_millis(4_001) }
                .error_response();
        assert_eq!(answer.headers().get("retry-after").unwrap(), "5");
    }
}
