//! `bench-ref-api`: the reference the api is measured against in `./scripts/bench`. A bare actix-web
//! server reading one account row with sqlx per request (`GET /ref/{id}`): the same frameworks, pool
//! and row as the api, with nothing of the api's own work (authentication, request ids, metrics,
//! logging, token rules).

use actix_web::{App, HttpResponse, HttpServer, web};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

#[derive(serde::Serialize, sqlx::FromRow)]
struct Row {
    id: String,
    reauth_required: bool,
    reauth_token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    reauthorized_at: Option<chrono::DateTime<chrono::Utc>>,
    data_status: Option<String>,
    data_updated_at: Option<chrono::DateTime<chrono::Utc>>,
    connected_at: Option<chrono::DateTime<chrono::Utc>>,
    unlinked_at: Option<chrono::DateTime<chrono::Utc>>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

async fn read(pool: web::Data<PgPool>, id: web::Path<String>) -> HttpResponse {
    let row: Result<Option<Row>, _> = sqlx::query_as(
        "SELECT id, reauth_required, reauth_token_expires_at, reauthorized_at, data_status, data_updated_at,
                connected_at, unlinked_at, updated_at
         FROM accounts WHERE id = $1",
    )
    .bind(id.into_inner())
    .fetch_optional(pool.get_ref())
    .await;
    match row {
        Ok(Some(row)) => HttpResponse::Ok().json(row),
        Ok(None) => HttpResponse::NotFound().finish(),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let listen = std::env::var("LISTEN_ADDR")?;
    let connections = std::env::var("DB_MAX_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let pool = web::Data::new(PgPoolOptions::new().max_connections(connections).connect(&url).await?);
    HttpServer::new(move || App::new().app_data(pool.clone()).route("/ref/{id}", web::get().to(read)))
        .workers(std::thread::available_parallelism().map_or(1, usize::from))
        .bind(listen)?
        .run()
        .await?;
    Ok(())
}
