//! `worker account erase <id>`: removes an account's personal data on a customer's request, records
//! who asked and why (`account_erasures`), and prints what it removed.
//!
//! One transaction under the account's row lock (the lock every batch takes first), so no batch
//! writes the account or its journal halfway through. What goes: the stored re-auth token and its
//! times, the account snapshot, the customer id, the body (`payload`) of every journal row of the
//! account, and the api's re-auth links made for it (`reauth_links`: each url is the customer's way
//! in, so the rows go, and their hand-out records with them), its dead letters and the replay copies
//! of them not yet published (`dead_letters` and `outbox` rows, each with the whole body). What
//! stays, for the audit: ids, event kinds, statuses, attempts, errors and times, and the account's
//! flags and ordering guards (so a late event is still recognised as stale). Running it twice
//! removes nothing the second time and records the request again.

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use sqlx::PgPool;

use super::output::{self, UsageError};

#[derive(Debug, Args)]
pub struct EraseArgs {
    /// Mono account id.
    pub id: String,
    /// Why (e.g. the customer's request and its ticket), recorded with the erasure.
    #[arg(long)]
    pub reason_note: String,
    /// Who, recorded with the erasure (default: $USER).
    #[arg(long, env = "USER", default_value = "unknown", hide_env_values = true)]
    pub actor: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `worker account erase --json`.
#[derive(Debug, Serialize)]
pub struct Erasure {
    /// The row of `account_erasures` that records it.
    pub erasure_id: i64,
    pub account_id: String,
    pub actor: String,
    pub reason: String,
    pub erased_at: DateTime<Utc>,
    pub removed: Removed,
}

/// What the erasure found and removed.
#[derive(Debug, Serialize)]
pub struct Removed {
    pub reauth_token: bool,
    pub account_snapshot: bool,
    pub customer_id: bool,
    /// Journal rows of the account whose body was removed.
    pub journal_payloads: u64,
    /// Re-auth links the api made for the account (`reauth_links` rows, each with its url), removed.
    pub reauth_links: u64,
    /// Records of those links being handed out (`reauth_link_handouts`), removed with them.
    pub reauth_link_handouts: u64,
    /// Dead letters of the account (`dead_letters` rows, each with its whole body), removed.
    pub dead_letters: u64,
    /// Replay copies of the account's dead letters not yet published (`outbox` rows), removed.
    pub outbox_messages: u64,
}

pub async fn run(pool: &PgPool, args: &EraseArgs) -> anyhow::Result<()> {
    if args.reason_note.trim().is_empty() {
        return Err(UsageError::new("--reason-note must say why the account is erased").into());
    }
    let erasure = erase(pool, &args.id, &args.actor, &args.reason_note).await?;
    if args.json {
        return output::document(&erasure);
    }
    let removed = &erasure.removed;
    let mut what: Vec<String> = [
        (removed.reauth_token, "the re-auth token"),
        (removed.account_snapshot, "the account snapshot"),
        (removed.customer_id, "the customer id"),
    ]
    .into_iter()
    .filter(|(was, _)| *was)
    .map(|(_, name)| name.to_owned())
    .collect();
    if removed.journal_payloads > 0 {
        what.push(format!("the bodies of its journal rows ({})", removed.journal_payloads));
    }
    if removed.dead_letters > 0 {
        what.push(format!("its dead letters ({})", removed.dead_letters));
    }
    if removed.outbox_messages > 0 {
        what.push(format!("its replay copies not yet published ({})", removed.outbox_messages));
    }
    if removed.reauth_links > 0 {
        what.push(format!(
            "its re-auth links ({}, handed out {} time(s))",
            removed.reauth_links, removed.reauth_link_handouts
        ));
    }
    let what =
        if what.is_empty() { "nothing (no personal data was held)".to_owned() } else { what.join(", ") };
    println!("erased account {}: {what}", erasure.account_id);
    println!("kept for the audit: ids, event kinds, statuses and times; the account's flags and guards");
    println!("recorded as erasure {} by {}: {}", erasure.erasure_id, erasure.actor, erasure.reason);
    Ok(())
}

/// Erases `account`'s personal data and records it; fails if monohook holds nothing of the account.
pub async fn erase(pool: &PgPool, account: &str, actor: &str, reason: &str) -> anyhow::Result<Erasure> {
    let mut tx = pool.begin().await?;
    let held: Option<(bool, bool, bool)> = sqlx::query_as(
        "SELECT reauth_token IS NOT NULL, account_snapshot IS NOT NULL, customer_id IS NOT NULL
         FROM accounts WHERE id = $1 FOR UPDATE",
    )
    .bind(account)
    .fetch_optional(&mut *tx)
    .await?;
    let journaled: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM webhook_events WHERE account_id = $1)")
            .bind(account)
            .fetch_one(&mut *tx)
            .await?;
    let linked: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM reauth_links WHERE account_id = $1)")
        .bind(account)
        .fetch_one(&mut *tx)
        .await?;
    // A replay's copy not yet published may be all that is left of an account (the replay took its
    // dead journal row): it holds the whole body, so it makes the account erasable.
    let buried: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM dead_letters WHERE account_id = $1)
             OR EXISTS (SELECT 1 FROM outbox WHERE account_id = $1)",
    )
    .bind(account)
    .fetch_one(&mut *tx)
    .await?;
    if held.is_none() && !journaled && !linked && !buried {
        anyhow::bail!("no account {account} (nothing to erase)");
    }
    let (reauth_token, account_snapshot, customer_id) = held.unwrap_or_default();
    sqlx::query(
        "UPDATE accounts SET reauth_token = NULL, reauth_token_issued_at = NULL, reauth_token_expires_at = NULL,
             account_snapshot = NULL, customer_id = NULL, updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(account)
    .execute(&mut *tx)
    .await?;
    let journal_payloads =
        sqlx::query("UPDATE webhook_events SET payload = NULL WHERE account_id = $1 AND payload IS NOT NULL")
            .bind(account)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    // The hand-outs go with their link (ON DELETE CASCADE); counted first, for the report.
    let reauth_link_handouts = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM reauth_link_handouts h JOIN reauth_links l USING (ref) WHERE l.account_id = $1",
    )
    .bind(account)
    .fetch_one(&mut *tx)
    .await?;
    let reauth_links = sqlx::query("DELETE FROM reauth_links WHERE account_id = $1")
        .bind(account)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // Dead letters and unpublished replay copies hold the whole body: they go in this transaction.
    let dead_letters = crate::db::dead_letters::erase_account(&mut tx, account).await?;
    let outbox_messages = crate::db::outbox::erase_account(&mut tx, account).await?;
    let removed = Removed {
        reauth_token,
        account_snapshot,
        customer_id,
        journal_payloads,
        reauth_links,
        reauth_link_handouts: u64::try_from(reauth_link_handouts).unwrap_or_default(),
        dead_letters,
        outbox_messages,
    };
    let (erasure_id, erased_at): (i64, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO account_erasures (account_id, actor, reason, removed) VALUES ($1, $2, $3, $4)
         RETURNING id, erased_at",
    )
    .bind(account)
    .bind(actor)
    .bind(reason)
    .bind(serde_json::to_value(&removed)?)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(erasure_id, %actor, "erased an account's personal data");
    Ok(Erasure {
        erasure_id,
        account_id: account.to_owned(),
        actor: actor.to_owned(),
        reason: reason.to_owned(),
        erased_at,
        removed,
    })
}
