//! `POST /v1/accounts/{id}/reauth-link`: a hosted re-auth link (Mono's v2 flow) to send the
//! customer to, instead of a token for the Connect widget.
//!
//! Body (optional): `{"redirect_url": "https://…"}`, which must be allowed by
//! `MONO_REAUTH_REDIRECT_URLS` (`redirects`; 400 `redirect_not_allowed` otherwise); without one the
//! first allowed redirect is used. The answer is `{"url", "ref", "created_at", "source"}`: a link
//! made within `REAUTH_LINK_REUSE_SECS` for the same account, redirect and re-auth episode is
//! handed out again (`reused`), otherwise Mono is asked (`links`: one call per account and redirect
//! at a time across processes). Every link handed out is recorded with the caller's key label
//! before it is answered. Statuses as for tokens: 401, 404, 409, 422 `mono_refused`, 503 with
//! `Retry-After`; 502 `mono_unexpected_answer` when Mono's answer holds no `data.mono_url`; 413
//! `payload_too_large` for a body over 4096 bytes.

use actix_web::{HttpResponse, web};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Scope;
use crate::caller::Caller;
use crate::db;
use crate::errors::ApiError;
use crate::links;
use crate::state::AppState;
use shared::event::AccountId;

/// Longest body taken: a redirect URL and a little room.
const MAX_BODY_BYTES: usize = 4096;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    redirect_url: Option<String>,
}

pub async fn reauth_link(
    caller: Caller,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::Links)?;
    let account = AccountId::parse(id.into_inner()).ok_or(ApiError::NotFound)?;
    let body = read_body(body).await?;
    let asked = parse_body(&body)?;
    // The account first: an unknown or settled account is 404 / 409 whatever the redirect.
    let current = links::read_state(&state.links, &account).await?;
    let redirect = state
        .redirects
        .choose(asked.redirect_url.as_deref())
        .map_err(|why| ApiError::RedirectNotAllowed(why.to_string()))?
        .map(String::from);
    let link = links::link(&state.links, account.clone(), redirect, caller.clone(), current).await?;
    db::record_link_handout(
        &state.pool,
        &link.reference,
        account.as_str(),
        &caller.key_label,
        link.source,
        &caller.request_id,
    )
    .await?;
    metrics::counter!("monohook_api_reauth_links_served_total", "source" => link.source).increment(1);
    tracing::info!(reference = %link.reference, source = link.source, "re-auth link handed out");
    Ok(HttpResponse::Ok().insert_header(("cache-control", "no-store")).json(json!({
        "url": link.url,
        "ref": link.reference,
        "created_at": link.created_at,
        "source": link.source,
    })))
}

/// The body, up to [`MAX_BODY_BYTES`]: longer is 413 in the API's error shape (actix's own limit
/// would answer plain text), and is not read further.
async fn read_body(mut payload: web::Payload) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::InvalidBody(e.to_string()))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn parse_body(body: &[u8]) -> Result<LinkBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(LinkBody::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidBody(e.to_string()))
}
