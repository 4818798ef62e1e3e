//! The worker's own HTTP endpoint (`METRICS_ADDR`): `/metrics` for Prometheus, `/healthz` (the
//! process is up) and `/readyz` (database reachable, broker connected, consumer alive; the Mono
//! circuit and whether Mono accepts our key are shown but do not make the worker unready, since
//! deliveries wait safely while Mono is down or refuses the key).

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use sqlx::PgPool;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::circuit::BreakerState;
use crate::tokens::TokenFetcher;

/// What the worker knows about its own health, updated by the components that find out.
pub struct Health {
    pub database_up: AtomicBool,
    pub broker_connected: AtomicBool,
    pub consuming: AtomicBool,
    /// Receive time (Unix ms) of the newest delivery handed to this worker.
    pub last_received_ms: AtomicI64,
    tokens: Arc<TokenFetcher>,
}

impl Health {
    pub fn new(tokens: Arc<TokenFetcher>) -> Self {
        Self {
            database_up: AtomicBool::new(true),
            broker_connected: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            last_received_ms: AtomicI64::new(chrono::Utc::now().timestamp_millis()),
            tokens,
        }
    }

    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
        metrics::gauge!("monohook_worker_broker_connected").set(if connected { 1.0 } else { 0.0 });
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    /// Whether this worker's consumer is subscribed now.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    fn set_database_up(&self, up: bool) {
        if self.database_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("the database is reachable again");
            } else {
                tracing::warn!("the database is unreachable");
            }
        }
        metrics::gauge!("monohook_worker_database_up").set(if up { 1.0 } else { 0.0 });
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.tokens.breaker_state()
    }
}

/// Starts the HTTP endpoint; returns the bound address and a handle that stops it.
pub fn serve(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<(SocketAddr, ServerHandle)> {
    let listener =
        TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("cannot listen on METRICS_ADDR {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let state = web::Data::from(health);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(metrics))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok((bound, handle))
}

async fn metrics() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(shared::metrics::render())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn readyz(health: web::Data<Health>) -> HttpResponse {
    let database = health.database_up.load(Ordering::Relaxed);
    let broker = health.broker_connected.load(Ordering::Relaxed);
    let consumer = health.consuming.load(Ordering::Relaxed);
    let body = json!({
        "status": if database && broker && consumer { "ready" } else { "not_ready" },
        "database": if database { "up" } else { "down" },
        "broker": if broker { "connected" } else { "disconnected" },
        "consumer": if consumer { "alive" } else { "stopped" },
        "mono_circuit": health.breaker_state().as_str(),
        // Our outage, not Mono's: re-auth deliveries wait until MONO_SECRET_KEY is accepted again.
        "mono_key": if health.tokens.key_refused() { "refused" } else { "accepted" },
        // Ours too: Mono refuses every account with this status (a wrong MONO_API_URL), or null.
        "mono_refusing_alike": health.tokens.refusing_alike(),
    });
    if database && broker && consumer {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Checks every 5 s that the database answers, for `/readyz` and `monohook_worker_database_up`.
pub async fn watch_database(pool: PgPool, health: Arc<Health>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let ping = sqlx::query("SELECT 1").execute(&pool);
        let up = matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)));
        health.set_database_up(up);
    }
}
