//! `GET /healthz`: the process is up. `GET /readyz`: it can accept webhooks (the broker is connected).

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::state::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.publisher.is_blocked() {
        // Busy, not gone: every node shares the alarm, so ingest stays where it is.
        HttpResponse::ServiceUnavailable().json(json!({ "status": "broker_blocked" }))
    } else if state.publisher.is_connected() {
        HttpResponse::Ok().json(json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({ "status": "broker_disconnected" }))
    }
}
