//! `GET /openapi.json`: the API contract, kept beside the code in `ingest/openapi.json` (a test
//! checks that it and the routes agree, and CI fuzzes the running ingest against it).

use actix_web::HttpResponse;

/// The OpenAPI 3.1 document, compiled into the binary.
pub const OPENAPI: &str = include_str!("../../openapi.json");

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}
