//! `GET /healthz`: the process is up. `GET /readyz`: it can answer (the database answers). Neither
//! needs an API key.

use actix_web::{HttpResponse, web};
use serde_json::json;
use std::time::Duration;

use crate::state::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let ping = sqlx::query("SELECT 1").execute(&state.pool);
    let database = matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)));
    let body = json!({
        "status": if database { "ready" } else { "not_ready" },
        "database": if database { "up" } else { "down" },
        "mono_circuit": state.mono.tokens.breaker_state().as_str(),
        "mono_key": if state.mono.tokens.key_refused() { "refused" } else { "accepted" },
    });
    if database { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) }
}
