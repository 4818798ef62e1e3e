//! `POST /v1/accounts/{id}/reauth-token`: a token for `connect.reauthorise(token)` that works now.
//!
//! The stored token is handed out if it works at least `TOKEN_MIN_REMAINING_SECS` longer, once its
//! issuance is recorded (`recorder`, batched). Otherwise, under the account's advisory lock (and a
//! lock per account within the process, so waiting requests hold no database connection), the state
//! is read again (another request may have just refreshed it), a fresh token is fetched from Mono and
//! stored only if the account still needs re-auth and no later-issued token is stored, and whatever
//! token is stored then is handed out. Every token handed out is recorded in `token_issuances`.
//! While Mono is unavailable, a stored token that still works at least 30 s longer
//! (`STORED_FLOOR_WHILE_MONO_UNAVAILABLE`) is handed out instead of a 503.
//! Mono refusing the account is a 422 `mono_refused`, remembered for `MONO_REFUSAL_MEMORY_SECS`
//! (`refusals`) so that requests for it meanwhile get the same answer without a call to Mono.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::Connection;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::caller::Caller;
use crate::db::{self, Issuance, TokenState};
use crate::errors::ApiError;
use crate::recorder::IssuanceRecord;
use crate::startup::AppState;
use mono_client::tokens::TokenOutcome;
use shared::event::AccountId;

/// Mono's re-auth tokens expire this long after they are issued.
const TOKEN_LIFETIME: chrono::Duration = chrono::Duration::minutes(10);
/// While Mono is unavailable, a stored token that still works this much longer is handed out
/// (`source: "stored"`) rather than a 503: a short re-auth window beats none.
pub const STORED_FLOOR_WHILE_MONO_UNAVAILABLE: chrono::Duration = chrono::Duration::seconds(30);
/// `Retry-After` when Mono failed and the breaker gives no better estimate.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

pub async fn reauth_token(
    caller: Caller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let account = AccountId::parse(id.into_inner()).ok_or(ApiError::NotFound)?;
    let issuance =
        Issuance { account: account.as_str(), key_label: &caller.key_label, request_id: &caller.request_id };
    let until = Utc::now() + state.token_min_remaining;
    let token_state = db::token_state(&state.pool, account.as_str()).await?.ok_or(ApiError::NotFound)?;
    refuse_unless_needed(&token_state)?;
    if let Some((token, issued, expires)) = token_state.token_working_until(until) {
        state
            .recorder
            .record(IssuanceRecord {
                account: account.as_str().to_owned(),
                key_label: caller.key_label.clone(),
                source: "stored",
                token_issued_at: issued,
                expires_at: expires,
                request_id: caller.request_id.clone(),
            })
            .await?;
        return Ok(handed_out(token, expires, "stored"));
    }
    fresh(&state, &account, &issuance).await
}

fn refuse_unless_needed(state: &TokenState) -> Result<(), ApiError> {
    if state.unlinked {
        return Err(ApiError::AccountUnlinked);
    }
    if !state.reauth_required {
        return Err(ApiError::ReauthNotRequired);
    }
    Ok(())
}

async fn fresh(
    state: &AppState,
    account: &AccountId,
    issuance: &Issuance<'_>,
) -> Result<HttpResponse, ApiError> {
    let _in_process = state.account_locks.lock(account.as_str()).await;
    // Mono refused this account a moment ago (maybe for the request this one queued behind): asking
    // again would only hammer it on the app's behalf.
    if let Some(message) = state.refusals.recall(account.as_str()) {
        return Err(ApiError::MonoRefused(message));
    }
    let mut conn = state.pool.acquire().await?;
    let mut tx = conn.begin().await?;
    db::lock_account(&mut tx, account.as_str()).await?;
    let current = db::token_state(&mut *tx, account.as_str()).await?.ok_or(ApiError::NotFound)?;
    refuse_unless_needed(&current)?;
    // Re-read under the lock: a concurrent request (here or in another process) may have refreshed it.
    let until = Utc::now() + state.token_min_remaining;
    if let Some((token, issued, expires)) = current.token_working_until(until) {
        db::record_issuance(&mut tx, issuance, "stored", issued, expires).await?;
        tx.commit().await?;
        return Ok(handed_out(token, expires, "stored"));
    }

    let (outcome, _flight) = state.tokens.fetch(account, &CancellationToken::new()).await;
    let token = match outcome {
        TokenOutcome::Token(token) => token,
        TokenOutcome::Refused { message, .. } => {
            state.refusals.remember(account.as_str(), &message);
            return Err(ApiError::MonoRefused(message));
        }
        TokenOutcome::Park { reason } | TokenOutcome::Retry { reason } => {
            if let Some(response) = degrade(&mut tx, account, issuance).await? {
                tx.commit().await?;
                return Ok(response);
            }
            let retry_after = state.tokens.retry_in().filter(|d| !d.is_zero()).unwrap_or(DEFAULT_RETRY_AFTER);
            return Err(ApiError::MonoUnavailable { reason, retry_after });
        }
        TokenOutcome::Abandoned => {
            return Err(ApiError::MonoUnavailable {
                reason: "stopping".into(),
                retry_after: DEFAULT_RETRY_AFTER,
            });
        }
    };
    let expires = token.issued_at + TOKEN_LIFETIME;
    if db::store_fresh(&mut tx, account.as_str(), token.expose(), token.issued_at, expires).await? {
        db::record_issuance(&mut tx, issuance, "fresh", token.issued_at, expires).await?;
        tx.commit().await?;
        return Ok(handed_out(token.expose(), expires, "fresh"));
    }
    // Not stored: the account changed while Mono answered (re-authorised, unlinked), or the worker
    // stored a token Mono issued later, which is the one to hand out.
    let now = db::token_state(&mut *tx, account.as_str()).await?.ok_or(ApiError::NotFound)?;
    refuse_unless_needed(&now)?;
    let response = match now.token_working_until(Utc::now()) {
        Some((stored, issued, stored_expires)) => {
            db::record_issuance(&mut tx, issuance, "stored", issued, stored_expires).await?;
            handed_out(stored, stored_expires, "stored")
        }
        None => {
            db::record_issuance(&mut tx, issuance, "fresh", token.issued_at, expires).await?;
            handed_out(token.expose(), expires, "fresh")
        }
    };
    tx.commit().await?;
    Ok(response)
}

/// Mono is unavailable: the stored token, if it still works `STORED_FLOOR_WHILE_MONO_UNAVAILABLE`
/// longer, recorded as handed out (the caller commits). Read again: the worker may have stored one
/// while Mono was failing us.
async fn degrade(
    tx: &mut sqlx::PgConnection,
    account: &AccountId,
    issuance: &Issuance<'_>,
) -> Result<Option<HttpResponse>, ApiError> {
    let now = db::token_state(&mut *tx, account.as_str()).await?.ok_or(ApiError::NotFound)?;
    refuse_unless_needed(&now)?;
    let Some((token, issued, expires)) =
        now.token_working_until(Utc::now() + STORED_FLOOR_WHILE_MONO_UNAVAILABLE)
    else {
        return Ok(None);
    };
    db::record_issuance(tx, issuance, "stored", issued, expires).await?;
    let left_secs = (expires - Utc::now()).num_seconds();
    tracing::warn!(
        left_secs,
        "Mono is unavailable: handing out the stored token, which works for less than TOKEN_MIN_REMAINING_SECS"
    );
    Ok(Some(handed_out(token, expires, "stored")))
}

fn handed_out(token: &str, expires_at: DateTime<Utc>, source: &'static str) -> HttpResponse {
    metrics::counter!("monohook_api_tokens_served_total", "source" => source).increment(1);
    tracing::info!(source, expires_at = %expires_at.to_rfc3339(), "re-auth token handed out");
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(json!({ "token": token, "expires_at": expires_at, "source": source }))
}
