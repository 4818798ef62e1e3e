//! `GET /v1/accounts/{id}`: one account's state. `GET /v1/accounts`: accounts in id order, a page at
//! a time (`after` = the previous page's `next`), optionally only those that need re-auth.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Scope;
use crate::caller::Caller;
use crate::db;
use crate::errors::ApiError;
use crate::state::AppState;
use shared::event::AccountId;

/// Most accounts one page holds.
pub const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 100;
/// Longest account id there is (`AccountId`).
const MAX_ID_BYTES: usize = 128;

pub async fn get_account(
    caller: Caller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::Read)?;
    let id = AccountId::parse(id.into_inner()).ok_or(ApiError::NotFound)?;
    let account = db::account(&state.pool, id.as_str()).await?.ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(account))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    reauth_required: Option<bool>,
    limit: Option<i64>,
    after: Option<String>,
}

pub async fn list_accounts(
    caller: Caller,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Scope::List)?;
    let query = query.into_inner();
    // The cursor is an account id (the previous page's `next`): one that no account can have, a NUL
    // or another control character that PostgreSQL would refuse, is the caller's mistake. An empty
    // `after` is the first page, as it always was.
    let after = match query.after.filter(|after| !after.is_empty()) {
        None => None,
        Some(after) => Some(AccountId::parse(after).ok_or_else(|| {
            ApiError::InvalidQuery(format!(
                "after is an account id: at most {MAX_ID_BYTES} bytes, no control characters"
            ))
        })?),
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!("limit must be between 1 and {MAX_LIMIT}")));
    }
    // One more than asked tells whether another page follows.
    let mut accounts = db::accounts_page(
        &state.pool,
        query.reauth_required,
        after.as_ref().map(AccountId::as_str),
        limit + 1,
    )
    .await?;
    let next = if accounts.len() as i64 > limit {
        accounts.truncate(limit as usize);
        accounts.last().map(|a| a.id.clone())
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(json!({ "accounts": accounts, "next": next })))
}
