//! `POST /v1/accounts/{id}/reauth-token`: a token for `connect.reauthorise(token)` that works now.
//!
//! The stored token is handed out if it works at least `TOKEN_MIN_REMAINING_SECS` longer. Otherwise a
//! fresh one is fetched (`refresh`: one refresh per account at a time across processes, no pool
//! connection held while Mono answers; requests that arrive meanwhile share its outcome), stored only
//! if the account still needs re-auth and no later-issued token is stored, and whichever token is
//! stored then is handed out. Every token handed out is recorded in `token_issuances` (`recorder`,
//! batched) before it is answered.
//! While Mono is unavailable, a stored token that still works at least 30 s longer
//! (`STORED_FLOOR_WHILE_MONO_UNAVAILABLE`) is handed out instead of a 503.
//! Mono refusing the account is a 422 `mono_refused`, remembered for `MONO_REFUSAL_MEMORY_SECS`
//! (`refusals`) so that requests for it meanwhile get the same answer without a call to Mono.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::auth::Scope;
use crate::caller::Caller;
use crate::db;
use crate::errors::ApiError;
use crate::recorder::IssuanceRecord;
use crate::refresh::{self, Handout, refuse_unless_needed};
use crate::state::AppState;
use shared::event::AccountId;

pub async fn reauth_token(
    caller: Caller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::Tokens)?;
    let account = AccountId::parse(id.into_inner()).ok_or(ApiError::NotFound)?;
    let until = Utc::now() + state.refresher.token_min_remaining;
    let token_state = db::token_state(&state.pool, account.as_str()).await?.ok_or(ApiError::NotFound)?;
    refuse_unless_needed(&token_state)?;
    let handout = match token_state.token_working_until(until) {
        Some((token, issued_at, expires_at)) => {
            Handout { token: token.to_owned(), issued_at, expires_at, source: "stored" }
        }
        None => refresh::fresh(&state.refresher, &account).await?,
    };
    state
        .recorder
        .record(IssuanceRecord {
            account: account.as_str().to_owned(),
            key_label: caller.key_label.clone(),
            source: handout.source,
            token_issued_at: handout.issued_at,
            expires_at: handout.expires_at,
            request_id: caller.request_id.clone(),
        })
        .await?;
    Ok(handed_out(&handout.token, handout.expires_at, handout.source))
}

fn handed_out(token: &str, expires_at: DateTime<Utc>, source: &'static str) -> HttpResponse {
    metrics::counter!("monohook_api_tokens_served_total", "source" => source).increment(1);
    tracing::info!(source, expires_at = %expires_at.to_rfc3339(), "re-auth token handed out");
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(json!({ "token": token, "expires_at": expires_at, "source": source }))
}
