//! `worker account <id>`: one account's record, as the app would read it. The token is never printed.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::output;
use crate::db::accounts;

pub async fn show(pool: &PgPool, id: &str, json: bool) -> anyhow::Result<()> {
    let Some(account) = accounts::find(pool, id).await? else {
        anyhow::bail!("no account {id}");
    };
    // The JSON document is the view itself: everything but the token, whose presence it reports.
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
