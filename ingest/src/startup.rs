//! Builds the HTTP server and its broker publisher, and runs them until shutdown.
//!
//! Shutdown is one `CancellationToken`: `main` fires it on SIGTERM/Ctrl-C, tests fire it directly.
//! The server then stops accepting connections, lets in-flight requests finish (each still answers
//! 200 only if its publish was confirmed) for up to the grace period, and the broker connection is
//! closed last.

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use std::net::TcpListener;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::IngestConfig;
use crate::publisher::{Publisher, PublisherSettings};
use crate::routes;
use crate::state::AppState;

/// A built, not yet running, ingest.
pub struct Application {
    port: u16,
    metrics_addr: std::net::SocketAddr,
    server: Server,
    metrics_server: Server,
    publisher: Publisher,
    cancel: CancellationToken,
}

impl Application {
    /// Connects to RabbitMQ (failing fast if it is unreachable), declares the topology and binds the
    /// listener. Nothing is served until [`Application::run_until_stopped`].
    pub async fn build(config: IngestConfig, cancel: CancellationToken) -> anyhow::Result<Self> {
        shared::metrics::recorder();
        for outcome in routes::OUTCOMES {
            metrics::counter!("monohook_ingest_requests_total", "outcome" => outcome).increment(0);
        }
        let publisher = Publisher::connect(PublisherSettings {
            amqp_url: config.broker.amqp_url.clone(),
            topology: config.broker.topology(),
            channels: config.publish_channels,
            confirm_timeout: config.publish_timeout(),
            deadline: config.publish_deadline(),
        })
        .await?;

        let listener = TcpListener::bind(config.listen_addr)
            .with_context(|| format!("cannot listen on LISTEN_ADDR {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();

        let state = web::Data::new(AppState {
            publisher: publisher.clone(),
            secrets: config.mono_webhook_secret.clone(),
            max_body_bytes: config.max_body_bytes,
            client_timeout: config.client_timeout(),
        });
        let workers = match config.http_workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .service(web::resource("/webhooks/mono").route(web::post().to(routes::receive_webhook)))
                // Resources, not bare routes: another method on a known path gets 405, not 404.
                .service(web::resource("/healthz").route(web::get().to(routes::healthz)))
                .service(web::resource("/readyz").route(web::get().to(routes::readyz)))
                .service(web::resource("/openapi.json").route(web::get().to(routes::openapi)))
        })
        .workers(workers)
        .max_connections(config.max_connections)
        .client_request_timeout(config.client_timeout())
        .client_disconnect_timeout(Duration::from_secs(1))
        .shutdown_timeout(config.shutdown_grace_secs)
        .shutdown_signal(cancel.clone().cancelled_owned())
        .listen(listener)?
        .run();

        let metrics_listener = TcpListener::bind(config.metrics_addr)
            .with_context(|| format!("cannot listen on METRICS_ADDR {}", config.metrics_addr))?;
        let metrics_addr = metrics_listener.local_addr()?;
        let metrics_server = HttpServer::new(|| App::new().route("/metrics", web::get().to(routes::metrics)))
            .workers(1)
            .shutdown_timeout(1)
            .shutdown_signal(cancel.clone().cancelled_owned())
            .listen(metrics_listener)?
            .run();

        Ok(Self { port, metrics_addr, server, metrics_server, publisher, cancel })
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics_addr
    }

    /// The port the server is bound to (useful with `LISTEN_ADDR=...:0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until the cancellation token fires, then drains and closes the broker connection.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        // The supervisor outlives the shutdown signal: requests still draining publish, and a node
        // that dies under them is left for the next as at any other time.
        let stop_supervising = CancellationToken::new();
        let supervisor = {
            let publisher = self.publisher.clone();
            let stop = stop_supervising.clone();
            tokio::spawn(async move { publisher.supervise(stop).await })
        };
        tracing::info!(port = self.port, metrics = %self.metrics_addr, "ingest listening");
        let metrics = tokio::spawn(self.metrics_server);
        let served = self.server.await.context("HTTP server failed");
        let _ = metrics.await;
        // The server has drained; nothing publishes any more.
        self.cancel.cancel();
        stop_supervising.cancel();
        let _ = supervisor.await;
        self.publisher.close().await;
        tracing::info!("ingest stopped");
        served
    }
}
