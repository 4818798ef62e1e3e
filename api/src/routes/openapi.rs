//! `GET /openapi.json`: the API contract, kept beside the code in `api/openapi.json` (a test checks
//! that it and the routes agree, and CI fuzzes the running API against it).

use actix_web::HttpResponse;

use crate::caller::Caller;

/// The OpenAPI 3.1 document, compiled into the binary.
pub const OPENAPI: &str = include_str!("../../openapi.json");

pub async fn openapi(_caller: Caller) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}
