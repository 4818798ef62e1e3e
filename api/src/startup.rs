//! Builds the API (its pool, its Mono client, its two listeners) and runs it until shutdown.
//!
//! Shutdown is one `CancellationToken`, as in ingest: on SIGTERM/Ctrl-C the server stops accepting
//! connections and lets in-flight requests finish for up to `SHUTDOWN_GRACE_SECS`.

use actix_web::dev::{Server, Service, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{App, HttpMessage, HttpResponse, HttpServer, ResponseError, web};
use anyhow::Context;
use futures_util::FutureExt;
use sqlx::PgPool;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::caller::RequestId;
use crate::config::ApiConfig;
use crate::errors::ApiError;
use crate::links::LinkDesk;
use crate::locks::AccountLocks;
use crate::mono_access::MonoAccess;
use crate::recorder::IssuanceRecorder;
use crate::refresh::Refresher;
use crate::refusals::RefusalMemory;
use crate::routes;
use crate::state::AppState;
use mono_client::MetricNames;
use mono_client::circuit::{BreakerSettings, CircuitBreaker};
use mono_client::client::MonoClient;
use mono_client::tokens::TokenFetcher;
use shared::retry::RetryPolicy;

/// A built, not yet running, API.
pub struct Application {
    port: u16,
    metrics_addr: SocketAddr,
    server: Server,
    metrics_server: Server,
}

impl Application {
    /// Binds both listeners and checks the schema. `pool` must reach a migrated database.
    pub async fn build(config: ApiConfig, pool: PgPool, cancel: CancellationToken) -> anyhow::Result<Self> {
        shared::metrics::recorder();
        for source in ["stored", "fresh"] {
            metrics::counter!("monohook_api_tokens_served_total", "source" => source).increment(0);
        }
        for source in ["fresh", "reused"] {
            metrics::counter!("monohook_api_reauth_links_served_total", "source" => source).increment(0);
        }
        metrics::counter!("monohook_api_mono_unexpected_answers_total").increment(0);
        crate::db::check_schema(&pool).await?;
        let mono = MonoClient::new(
            &config.mono_api_url,
            config.mono_secret_key.clone(),
            config.mono_timeout(),
            Duration::from_secs(config.mono_retry_after_max_secs),
        )?
        .with_caller("monohook-api");
        let (open_for, max_open_for) = config.mono_circuit_open();
        let breaker = CircuitBreaker::new(
            BreakerSettings {
                window: Duration::from_secs(10),
                min_calls: 10,
                failure_ratio: 0.5,
                consecutive_failures: usize::try_from(config.mono_circuit_consecutive_failures).unwrap_or(5),
                open_for,
                max_open_for,
            },
            MetricNames::API,
        );
        let policy = RetryPolicy {
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_elapsed: Some(Duration::from_millis(config.mono_retry_budget_ms)),
        };
        let mono_max_in_flight = usize::try_from(config.mono_max_in_flight).unwrap_or(64);
        let tokens = Arc::new(TokenFetcher::new(mono, breaker, policy, mono_max_in_flight, MetricNames::API));
        let account_locks = AccountLocks::new((*pool.connect_options()).clone());
        let recorder = IssuanceRecorder::start(pool.clone());
        let mono = Arc::new(MonoAccess {
            pool: pool.clone(),
            tokens,
            deadline: config.token_deadline(),
            account_locks,
            slots: Arc::new(Semaphore::new(mono_max_in_flight)),
            refusals: RefusalMemory::new(Duration::from_secs(config.mono_refusal_memory_secs)),
        });
        let state = web::Data::new(AppState {
            recorder,
            pool,
            refresher: Arc::new(Refresher::new(mono.clone(), config.token_min_remaining())),
            links: Arc::new(LinkDesk::new(mono.clone(), config.reauth_link_reuse())),
            mono,
            redirects: config.mono_reauth_redirect_urls.clone(),
        });
        let mono_for_metrics = state.mono.clone();
        let keys = web::Data::new(config.app_api_keys.clone());

        let listener = TcpListener::bind(config.listen_addr)
            .with_context(|| format!("cannot listen on LISTEN_ADDR {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();
        let metrics_listener = TcpListener::bind(config.metrics_addr)
            .with_context(|| format!("cannot listen on METRICS_ADDR {}", config.metrics_addr))?;
        let metrics_addr = metrics_listener.local_addr()?;
        let workers = match config.http_workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let server = HttpServer::new(move || {
            let query_errors = web::QueryConfig::default()
                .error_handler(|error, _| ApiError::InvalidQuery(error.to_string()).into());
            App::new()
                .app_data(state.clone())
                .app_data(keys.clone())
                .app_data(query_errors)
                .wrap_fn(|request, service| {
                    let request_id = request_id(request.headers().get("x-request-id"));
                    request.extensions_mut().insert(RequestId(request_id.clone()));
                    let span = tracing::info_span!(
                        "request",
                        request_id = %request_id,
                        method = %request.method(),
                        path = %request.path(),
                    );
                    let started = Instant::now();
                    service
                        .call(request)
                        .map(move |answer| answer.map(|response| finish(response, &request_id, started)))
                        .instrument(span)
                })
                // Resources, not bare routes: another method on a known path gets 405 (in the API's
                // error shape, with `Allow`), not 404.
                .service(get("/v1/accounts").route(web::get().to(routes::list_accounts)))
                .service(get("/v1/accounts/{id}").route(web::get().to(routes::get_account)))
                .service(post("/v1/accounts/{id}/reauth-token").route(web::post().to(routes::reauth_token)))
                .service(post("/v1/accounts/{id}/reauth-link").route(web::post().to(routes::reauth_link)))
                .service(get("/healthz").route(web::get().to(routes::healthz)))
                .service(get("/readyz").route(web::get().to(routes::readyz)))
                .service(get("/openapi.json").route(web::get().to(routes::openapi)))
                .default_service(web::to(|| async { ApiError::NotFound.error_response() }))
        })
        .workers(workers)
        // A client that closes its connection ends its request: actix drops the handler's future, so a
        // request waiting for an account's lock or a Mono slot never goes on to call Mono for nobody.
        .h1_allow_half_closed(false)
        .shutdown_timeout(config.shutdown_grace_secs)
        .shutdown_signal(cancel.clone().cancelled_owned())
        .listen(listener)?
        .run();
        let breaker_of = web::Data::new(mono_for_metrics);
        let metrics_server = HttpServer::new(move || {
            App::new().app_data(breaker_of.clone()).route(
                "/metrics",
                web::get().to(|mono: web::Data<Arc<MonoAccess>>| async move {
                    // Brings the circuit gauge up to date: an opening whose time is up shows as
                    // half-open even when no request has asked since.
                    let _ = mono.tokens.breaker_state();
                    HttpResponse::Ok()
                        .content_type("text/plain; version=0.0.4")
                        .body(shared::metrics::render())
                }),
            )
        })
        .workers(1)
        .shutdown_timeout(1)
        .shutdown_signal(cancel.cancelled_owned())
        .listen(metrics_listener)?
        .run();
        Ok(Self { port, metrics_addr, server, metrics_server })
    }

    /// The port the API is bound to (useful with `LISTEN_ADDR=...:0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Serves until the cancellation token fires, then drains in-flight requests.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tracing::info!(port = self.port, metrics = %self.metrics_addr, "api listening");
        let metrics = tokio::spawn(self.metrics_server);
        let served = self.server.await.context("HTTP server failed");
        let _ = metrics.await;
        tracing::info!("api stopped");
        served
    }
}

/// A resource answering only GET: any other method is 405 in the API's error shape.
fn get(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(not_allowed("GET"))
}

/// A resource answering only POST: any other method is 405 in the API's error shape.
fn post(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(not_allowed("POST"))
}

fn not_allowed(allow: &'static str) -> actix_web::Route {
    web::to(move || async move { ApiError::MethodNotAllowed(allow).error_response() })
}

/// The client's `x-request-id` if it is a sane one, else a fresh one.
fn request_id(sent: Option<&HeaderValue>) -> String {
    sent.and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Stamps the request id on the answer, counts it, and logs one line.
fn finish<B>(mut response: ServiceResponse<B>, request_id: &str, started: Instant) -> ServiceResponse<B> {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(HeaderName::from_static("x-request-id"), value);
    }
    let route = response.request().match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics::counter!("monohook_api_requests_total", "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("monohook_api_request_seconds", "route" => route.clone())
        .record(elapsed.as_secs_f64());
    if status >= 500 {
        tracing::warn!(status, route, elapsed_ms = elapsed.as_millis() as u64, "request failed");
    } else {
        tracing::info!(status, route, elapsed_ms = elapsed.as_millis() as u64, "request");
    }
    response
}
