//! `worker dlq`: inspect, replay and purge dead letters.
//!
//! Dead letters are rows of `dead_letters` (the whole message, why it died, its attempts); the
//! journal says `dead` beside each. `list` and `show` read them; `replay` and `purge` are
//! transactions on them, audited in `dead_letter_actions`, and a replay's copy goes through the
//! outbox, which the workers publish. No command walks a queue.

mod filter;
mod list;
pub mod predict;
mod progress;
pub mod replay;
mod show;

use clap::{Args, Subcommand};
use sqlx::PgPool;

pub use filter::{DeadFilter, DeadLetter};
pub use list::age as list_age;

use shared::config::BrokerArgs;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter: delivery id, event, account, attempts, first and last attempt, age,
    /// reason.
    List(ListArgs),
    /// The whole record of one dead letter: the message (headers, body with token and secret fields
    /// masked), why it died, its journal row and attempt history, and what was done to it.
    Show(ShowArgs),
    /// Move matching dead letters back onto the work queue (same delivery id, attempts reset,
    /// lineage headers added). Late events stay guarded by the ordering rule unless --force.
    Replay(ReplayArgs),
    /// Delete matching dead letters for good (asks for confirmation on a terminal; --yes otherwise).
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: DeadFilter,
    /// Count dead letters by failure cause instead of listing them.
    #[arg(long, value_enum)]
    pub group_by: Option<GroupBy>,
    /// List replays and purges (who, when, why) instead of dead letters.
    #[arg(long)]
    pub actions: bool,
    /// Print one JSON document (an array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GroupBy {
    /// The failure cause, with counts and ids left out so one outage is one line.
    Reason,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Delivery id.
    pub id: uuid::Uuid,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: DeadFilter,
    /// Print, for each dead letter, what replaying the selection would do to its account now
    /// (decided together, in the order a replay applies them); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply even events older than what their account has already applied.
    #[arg(long)]
    pub force: bool,
    /// Why, recorded with the replay and carried in the `x-replay-note` header.
    #[arg(long)]
    pub reason_note: Option<String>,
    /// Who, recorded with the replay (default: $USER).
    #[arg(long, env = "USER", default_value = "unknown", hide_env_values = true)]
    pub actor: String,
    /// Print one JSON document saying what was done (with --dry-run: one JSON object per dead
    /// letter, a line each, as they are worked out).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub filter: DeadFilter,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Why, recorded with the purge.
    #[arg(long)]
    pub reason_note: Option<String>,
    /// Who, recorded with the purge (default: $USER).
    #[arg(long, env = "USER", default_value = "unknown", hide_env_values = true)]
    pub actor: String,
    /// Print one JSON document saying what was done.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `worker dlq` command. `dedup_window` is the worker's `DEDUP_WINDOW_SECS`, so a dry run
/// applies the same duplicate rule the worker will. A usage error (no filter for a bulk action, a
/// purge nobody can confirm) is a [`super::output::UsageError`], which `main` turns into exit 2.
pub async fn run(
    command: DlqCommand,
    pool: &PgPool,
    broker: &BrokerArgs,
    dedup_window: std::time::Duration,
) -> anyhow::Result<()> {
    match command {
        DlqCommand::List(args) => list::run(pool, &args).await,
        DlqCommand::Show(args) => show::run(pool, &args).await,
        DlqCommand::Replay(args) if args.dry_run => predict::run(pool, &args, dedup_window).await,
        DlqCommand::Replay(args) => replay::run_replay(pool, &broker.topology(), &args).await,
        DlqCommand::Purge(args) => replay::run_purge(pool, &args).await,
    }
}
