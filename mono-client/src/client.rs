//! The Mono client: the one place that knows Mono's endpoints, its headers and how its answers are
//! classified. The v2 re-auth link (`initiate`) lives beside it, in `links`, over the same `post`.
//!
//! `POST {base}/accounts/{id}/reauthorise` with `mono-sec-key` answers `{"token": "..."}`. Answers are
//! classified by whose problem they are:
//! - Mono's, for now: connect errors, timeouts, 5xx, 408, 425, 429 (with its `Retry-After`, capped)
//!   and any redirect: retried like an outage, never followed, so `mono-sec-key` cannot travel to
//!   another origin (a redirect that lasts most likely means `MONO_API_URL` is wrong);
//! - ours: 401/403 (Mono refuses our secret key);
//! - the account's, for good: any other 4xx, with Mono's `message` as the reason.

use chrono::{DateTime, Utc};
use reqwest::header::RETRY_AFTER;
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use tracing::Instrument;

use shared::event::AccountId;

/// The header Mono reads the secret key from.
const SECRET_KEY_HEADER: &str = "mono-sec-key";
/// Longest part of an unexpected answer kept in a reason.
const MAX_REASON_CHARS: usize = 300;

/// What tells the client the time a token is asked for.
pub type Clock = std::sync::Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

#[derive(Clone)]
pub struct MonoClient {
    http: reqwest::Client,
    base: Url,
    secret_key: SecretString,
    max_retry_after: Duration,
    clock: Clock,
    /// Sent as `User-Agent` (`<caller>/<version>`): which of our processes called, for Mono's logs
    /// and the simulator's record of calls.
    user_agent: String,
}

/// A re-auth token. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct ReauthToken {
    value: SecretString,
    /// When we asked Mono for it: Mono issued it no earlier, so an expiry counted from here is
    /// never later than Mono's, however long the answer took to arrive.
    pub issued_at: DateTime<Utc>,
}

impl ReauthToken {
    pub fn expose(&self) -> &str {
        self.value.expose_secret()
    }

    /// A token with a known value, for tests.
    #[doc(hidden)]
    pub fn for_tests(value: &str, issued_at: DateTime<Utc>) -> Self {
        Self { value: SecretString::from(value), issued_at }
    }

    /// A stand-in token for predicting what applying an event would change (`dlq replay --dry-run`);
    /// it never reaches the database.
    pub fn placeholder(issued_at: DateTime<Utc>) -> Self {
        Self { value: SecretString::from("placeholder"), issued_at }
    }
}

impl fmt::Debug for ReauthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReauthToken")
            .field("value", &"[REDACTED]")
            .field("issued_at", &self.issued_at)
            .finish()
    }
}

/// Why Mono did not give a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MonoError {
    /// Worth retrying: Mono is down, slow, overloaded or unreachable. `class` is the metric label
    /// (`5xx`, `429`, `timeout`, `connect_error`, `other`).
    #[error("Mono is unavailable: {reason}")]
    Unavailable { reason: String, retry_after: Option<Duration>, class: &'static str },
    /// Mono refuses our secret key (401/403): every account fails alike until an operator fixes
    /// `MONO_SECRET_KEY`, so this is our outage, never the event's fault.
    #[error("Mono refuses our secret key ({status}): {message}")]
    KeyRefused { status: u16, message: String },
    /// Mono refused this account; retrying cannot help.
    #[error("Mono refused ({status}): {message}")]
    Rejected { status: u16, message: String },
}

impl MonoError {
    /// The metric label of the answer: `4xx` for a refusal, else the unavailability's class.
    pub fn status_class(&self) -> &'static str {
        match self {
            Self::Unavailable { class, .. } => class,
            Self::KeyRefused { .. } => "key_refused",
            Self::Rejected { .. } => "4xx",
        }
    }
}

fn user_agent(caller: &str) -> String {
    format!("{caller}/{}", env!("CARGO_PKG_VERSION"))
}

impl MonoClient {
    /// `max_retry_after` caps the wait any `Retry-After` can ask for.
    pub fn new(
        base_url: &str,
        secret_key: SecretString,
        timeout: Duration,
        max_retry_after: Duration,
    ) -> anyhow::Result<Self> {
        let base =
            Url::parse(base_url).map_err(|e| anyhow::anyhow!("MONO_API_URL is not a valid URL ({e})"))?;
        if base.cannot_be_a_base() {
            anyhow::bail!("MONO_API_URL must be an http(s) base URL");
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // A redirect would carry `mono-sec-key` wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            base,
            secret_key,
            max_retry_after,
            clock: std::sync::Arc::new(Utc::now),
            user_agent: user_agent("monohook"),
        })
    }

    /// Names the calling process in `User-Agent` (`monohook-worker/<version>`).
    pub fn with_caller(mut self, caller: &str) -> Self {
        self.user_agent = user_agent(caller);
        self
    }

    /// Takes the time a token is asked for (its `issued_at`) from `clock` instead of the system's:
    /// for a model that plays time forward faster than it passes.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Asks Mono for a re-auth token for `account`.
    ///
    /// Each call (each retry too) is a `mono.reauthorise` span with the account, the HTTP status and
    /// the answer's class; never the key, the token or a body. No trace context is sent to Mono: it
    /// is not ours to trace.
    pub async fn reauthorise(&self, account: &AccountId) -> Result<ReauthToken, MonoError> {
        let span = tracing::info_span!(
            "mono.reauthorise",
            otel.kind = "client",
            account = account.as_str(),
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let answer = self.call_reauthorise(account).instrument(span.clone()).await;
        span.record("outcome", answer.as_ref().map_or_else(MonoError::status_class, |_| "2xx"));
        if answer.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        answer
    }

    async fn call_reauthorise(&self, account: &AccountId) -> Result<ReauthToken, MonoError> {
        // Taken before the request leaves: Mono's clock starts somewhere during the call.
        let asked_at = (self.clock)();
        let (status, body) = self.post(&["accounts", account.as_str(), "reauthorise"], None).await?;
        match serde_json::from_slice::<TokenAnswer>(&body) {
            Ok(answer) if !answer.token.is_empty() => {
                Ok(ReauthToken { value: SecretString::from(answer.token), issued_at: asked_at })
            }
            // Never echo a 2xx body: it may hold a token.
            _ => Err(unavailable("other", &format!("{status} without a token"))),
        }
    }

    /// `POST {base}/{segments…}` with `mono-sec-key` (and `body` as JSON): a 2xx answer's status and
    /// body, or the answer classified as a [`MonoError`]. Never follows a redirect.
    pub(crate) async fn post(
        &self,
        segments: &[&str],
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, Vec<u8>), MonoError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| unavailable("other", "MONO_API_URL cannot take a path"))?
            .pop_if_empty()
            .extend(segments);
        let mut request = self
            .http
            .post(url)
            .header(reqwest::header::USER_AGENT, &self.user_agent)
            .header(SECRET_KEY_HEADER, self.secret_key.expose_secret());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) if error.is_timeout() => {
                return Err(unavailable("timeout", "no answer within the timeout"));
            }
            Err(error) if error.is_connect() => return Err(unavailable("connect_error", "cannot connect")),
            Err(error) => {
                return Err(unavailable("other", &format!("request failed: {}", without_url(&error))));
            }
        };
        let status = response.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .map(|wait| wait.min(self.max_retry_after));
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) if error.is_timeout() => {
                return Err(unavailable("timeout", "answer not received within the timeout"));
            }
            Err(error) => {
                return Err(unavailable("other", &format!("answer unreadable: {}", without_url(&error))));
            }
        };

        if status.is_success() {
            return Ok((status, body.to_vec()));
        }
        if status.is_redirection() {
            return Err(unavailable(
                "redirect",
                &format!(
                    "{status}: Mono answered with a redirect, which is not followed (is MONO_API_URL right?)"
                ),
            ));
        }
        let message = mono_message(&body);
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(MonoError::KeyRefused { status: status.as_u16(), message });
        }
        if matches!(status, StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY) {
            return Err(MonoError::Unavailable {
                reason: format!("{status}: {message}"),
                retry_after,
                class: "retryable_4xx",
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(MonoError::Unavailable {
                reason: format!("rate limited (429): {message}"),
                retry_after,
                class: "429",
            });
        }
        if status.is_server_error() {
            return Err(MonoError::Unavailable {
                reason: format!("{status}: {message}"),
                retry_after,
                class: "5xx",
            });
        }
        Err(MonoError::Rejected { status: status.as_u16(), message })
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: String,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    message: String,
}

/// Mono's `message`, or the start of whatever else it answered.
fn mono_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ErrorAnswer>(body) {
        Ok(answer) => answer.message,
        Err(_) if body.is_empty() => "(empty answer)".to_owned(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.chars().take(MAX_REASON_CHARS).collect()
}

/// `Retry-After` as seconds or as an HTTP date (the caller caps it).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() {
        // Any number of digits: an absurd value saturates instead of failing to parse.
        return Some(Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

fn unavailable(class: &'static str, reason: &str) -> MonoError {
    MonoError::Unavailable { reason: reason.to_owned(), retry_after: None, class }
}

/// reqwest's error text, minus the URL it may carry.
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<mono>");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = (Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let parsed = parse_retry_after(&later).unwrap();
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30), "{parsed:?}");
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("99999999999999999999999"), Some(Duration::from_secs(u64::MAX)));
    }

    #[test]
    fn mono_message_prefers_the_message_field_and_bounds_the_rest() {
        assert_eq!(
            mono_message(br#"{"message":"This account can not be re-authorised."}"#),
            "This account can not be re-authorised."
        );
        assert_eq!(mono_message(b""), "(empty answer)");
        assert_eq!(mono_message("x".repeat(1000).as_bytes()).len(), MAX_REASON_CHARS);
    }

    #[tokio::test]
    async fn a_token_is_issued_when_it_was_asked_for_not_when_the_answer_arrived() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let mono = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({ "token": "slow" }))
                    .set_delay(Duration::from_millis(500)),
            )
            .mount(&mono)
            .await;
        let client = MonoClient::new(
            &mono.uri(),
            SecretString::from("test_sk"),
            Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .unwrap();
        let asked = Utc::now();

        let token = client.reauthorise(&AccountId::parse("acct-1").unwrap()).await.unwrap();

        // Mono may have issued it any time during the 500 ms: only the start bounds its expiry.
        let lag = token.issued_at - asked;
        assert!(lag < chrono::Duration::milliseconds(200), "issued {lag} after it was asked for");
    }

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let token = ReauthToken { value: SecretString::from("VwxcfeLRZvq1UlD5WiuN"), issued_at: Utc::now() };
        assert!(!format!("{token:?}").contains("VwxcfeLRZvq1UlD5WiuN"));
    }
}
