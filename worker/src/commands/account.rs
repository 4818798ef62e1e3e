//! `worker account <id>`: one account's record, as the app would read it. The token is never printed.
//! `worker account erase <id>` removes its personal data (`account_erase`).

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use sqlx::PgPool;

use super::account_erase::{self, EraseArgs};
use super::output;
use crate::db::accounts;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AccountArgs {
    #[command(subcommand)]
    pub action: Option<AccountAction>,
    /// Mono account id.
    #[arg(required = true)]
    pub id: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AccountAction {
    /// Remove the account's personal data (its token, snapshot, customer id, journal bodies and
    /// re-auth links), record who and why, and print what was removed. Ids, kinds, statuses and
    /// times stay.
    Erase(EraseArgs),
}

impl AccountArgs {
    /// Whether the command writes (and so needs the schema migrated).
    pub fn writes(&self) -> bool {
        self.action.is_some()
    }
}

pub async fn run(pool: &PgPool, args: &AccountArgs) -> anyhow::Result<()> {
    match (&args.action, &args.id) {
        (Some(AccountAction::Erase(erase)), _) => account_erase::run(pool, erase).await,
        (None, Some(id)) => show(pool, id, args.json).await,
        (None, None) => Err(output::UsageError::new("worker account needs an account id").into()),
    }
}

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
