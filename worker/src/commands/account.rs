//! `worker account <id>`: one account's record, as the app would read it. The token is never printed.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::output;
use crate::db::accounts::{self, AccountView};

/// `worker account <id> --json`: one document. The token itself is never part of it, only whether
/// one is held.
#[derive(Debug, Serialize)]
pub struct AccountDocument {
    pub id: String,
    pub reauth_required: bool,
    pub has_reauth_token: bool,
    pub reauth_token_issued_at: Option<DateTime<Utc>>,
    pub reauth_token_expires_at: Option<DateTime<Utc>>,
    pub reauthorized_at: Option<DateTime<Utc>>,
    pub data_status: Option<String>,
    pub data_updated_at: Option<DateTime<Utc>>,
    pub last_sync_failed_at: Option<DateTime<Utc>>,
    pub customer_id: Option<String>,
    pub connected_at: Option<DateTime<Utc>>,
    pub unlinked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<AccountView> for AccountDocument {
    fn from(view: AccountView) -> Self {
        Self {
            id: view.id,
            reauth_required: view.reauth_required,
            has_reauth_token: view.has_reauth_token,
            reauth_token_issued_at: view.reauth_token_issued_at,
            reauth_token_expires_at: view.reauth_token_expires_at,
            reauthorized_at: view.reauthorized_at,
            data_status: view.data_status,
            data_updated_at: view.data_updated_at,
            last_sync_failed_at: view.last_sync_failed_at,
            customer_id: view.customer_id,
            connected_at: view.connected_at,
            unlinked_at: view.unlinked_at,
            created_at: view.created_at,
            updated_at: view.updated_at,
        }
    }
}

pub async fn show(pool: &PgPool, id: &str, json: bool) -> anyhow::Result<()> {
    let Some(account) = accounts::find(pool, id).await? else {
        anyhow::bail!("no account {id}");
    };
    let account = AccountDocument::from(account);
    if json {
        return output::document(&account);
    }
    let time = |t: Option<DateTime<Utc>>| t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
    let rows = [
        ("id", account.id.clone()),
        ("reauth_required", account.reauth_required.to_string()),
        ("reauth_token", if account.has_reauth_token { "(held)".to_owned() } else { "-".to_owned() }),
        ("reauth_token_issued_at", time(account.reauth_token_issued_at)),
        ("reauth_token_expires_at", time(account.reauth_token_expires_at)),
        ("reauthorized_at", time(account.reauthorized_at)),
        ("data_status", account.data_status.clone().unwrap_or_else(|| "-".to_owned())),
        ("data_updated_at", time(account.data_updated_at)),
        ("last_sync_failed_at", time(account.last_sync_failed_at)),
        ("customer_id", account.customer_id.clone().unwrap_or_else(|| "-".to_owned())),
        ("connected_at", time(account.connected_at)),
        ("unlinked_at", time(account.unlinked_at)),
        ("updated_at", account.updated_at.to_rfc3339()),
    ];
    for (name, value) in rows {
        println!("{name:<24} {value}");
    }
    Ok(())
}
