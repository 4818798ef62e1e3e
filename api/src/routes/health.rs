//! `GET /healthz`: the process is up. `GET /readyz`: it can answer (the database answers). Neither
//! needs an API key.
//!
//! `/readyz` also says whether Mono is available to the api (`"mono": "unavailable"` while its
//! breaker is open or Mono refuses our key), but stays 200 for it: the api still answers account
//! state and stored tokens without Mono, and taking every process out of the load balancer for an
//! outage of Mono would turn it into an outage of the api. The alert `MonohookApiMonoUnavailable`
//! watches the breaker instead.

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
        "mono": if state.mono.unavailable() { "unavailable" } else { "available" },
        "mono_circuit": state.mono.tokens.breaker_state().as_str(),
        "mono_key": if state.mono.tokens.key_refused() { "refused" } else { "accepted" },
        "mono_refusing_alike": state.mono.tokens.refusing_alike(),
    });
    if database { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) }
}
