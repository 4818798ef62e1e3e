//! `worker dlq replay` and `worker dlq purge`: transactions on `dead_letters`, never a walk over a
//! queue.
//!
//! A replay takes the selected letters oldest first, each in one transaction: the row is locked and
//! deleted, its `dead` journal row goes (the worker would take the copy for a redelivery of a
//! settled id otherwise), the action is recorded complete, and the copy (same delivery id, attempts
//! reset, lineage headers) is written to the outbox, which the workers' relay publishes. A crash
//! leaves the letter or its outbox row, never neither; a copy published twice has one effect (same
//! id). A purge is one transaction over exactly the letters it selected (and, on a terminal, named
//! at its prompt). A letter another command took meanwhile is named, and the run does not say done.
//! Ctrl-C stops a replay between two letters: what was replayed stays replayed, the rest stays dead.

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

use super::filter::DeadLetter;
use super::{PurgeArgs, ReplayArgs};
use crate::commands::output::{self, UsageError};
use crate::db::{dead_letters, outbox};
use crate::journal_payload;
use shared::delivery::{
    DeliveryId, DeliveryMeta, HEADER_REPLAY_BATCH, HEADER_REPLAY_FORCE, HEADER_REPLAY_NOTE, HEADER_REPLAY_OF,
    HEADER_REPLAYED_AT, HEADER_REPLAYED_BY, format_time,
};
use shared::topology::Topology;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Replay,
    Purge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Purge => "purge",
        }
    }
}

/// Who acts, why, and how: what every action row records.
#[derive(Clone, Debug)]
pub struct Plan {
    pub kind: Kind,
    pub batch_id: Uuid,
    pub actor: String,
    pub note: Option<String>,
    pub forced: bool,
}

/// What `worker dlq replay` or `worker dlq purge` did: their `--json` document.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `replay` or `purge`.
    pub action: &'static str,
    pub outcome: Outcome,
    /// The batch the actions are recorded under; `null` when nothing was done (declined).
    pub batch_id: Option<Uuid>,
    /// Dead letters the filter selected.
    pub selected: usize,
    /// Dead letters replayed or purged by this run.
    pub acted: u64,
    /// Selected dead letters this run did not act on, each with why (another command took it
    /// meanwhile; a row with no body cannot be replayed).
    pub skipped: Vec<Skipped>,
    /// Replays whose body was rebuilt from the journal on upgrade, each with what it lacks of the
    /// original body.
    pub rebuilt: Vec<Rebuilt>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub id: Uuid,
    pub why: String,
}

/// A replay whose copy was rebuilt from its journal row.
#[derive(Debug, Serialize)]
pub struct Rebuilt {
    pub id: Uuid,
    /// The fields of the original body the journal row did not hold (`JOURNAL_PAYLOAD=minimal`):
    /// the copy goes without them, never with a guess. Empty for a row journaled with the whole body.
    pub lacks: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Everything selected was acted on (exit 0).
    Done,
    /// Some selected letters were not acted on; `skipped` says which and why (exit 1).
    Partial,
    /// Ctrl-C: what was done stays done, the rest stays dead (exit 1).
    Interrupted,
    /// The operator answered no at the prompt (exit 0).
    Declined,
}

impl Report {
    fn verb(&self) -> &'static str {
        if self.action == Kind::Replay.as_str() { "replayed" } else { "purged" }
    }

    /// Prints the report (text or JSON), then fails if the run did not act on all it selected.
    fn print(&self, json: bool) -> anyhow::Result<()> {
        let verb = self.verb();
        if json {
            output::document(self)?;
        } else if self.outcome == Outcome::Declined {
            println!("nothing {verb}");
        } else {
            println!(
                "{verb} {} of {} selected dead letter(s) in batch {}",
                self.acted,
                self.selected,
                self.batch_id.map(|id| id.to_string()).unwrap_or_default(),
            );
            for skipped in &self.skipped {
                println!("not {verb}: {}: {}", skipped.id, skipped.why);
            }
            for rebuilt in self.rebuilt.iter().filter(|r| !r.lacks.is_empty()) {
                println!(
                    "replayed {} from its minimal journal row: the copy lacks {}",
                    rebuilt.id,
                    rebuilt.lacks.join(", ")
                );
            }
        }
        match self.outcome {
            Outcome::Done | Outcome::Declined => Ok(()),
            Outcome::Interrupted => {
                if !json {
                    println!(
                        "interrupted: what was {verb} stays {verb}; run the same command again for the rest"
                    );
                }
                anyhow::bail!("interrupted; run the same command again for the rest")
            }
            Outcome::Partial => anyhow::bail!("{} selected dead letter(s) not {verb}", self.skipped.len()),
        }
    }
}

pub async fn run_replay(pool: &PgPool, topology: &Topology, args: &ReplayArgs) -> anyhow::Result<()> {
    args.filter.require_selection()?;
    let plan = Plan {
        kind: Kind::Replay,
        batch_id: Uuid::now_v7(),
        actor: args.actor.clone(),
        note: args.reason_note.clone(),
        forced: args.force,
    };
    let letters = args.filter.select(pool).await?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: finishing the current letter, then stopping (Ctrl-C again: stop now)");
            flag.store(true, Ordering::SeqCst);
        }
        // Each letter is one transaction: stopping at once loses nothing.
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(output::INTERRUPTED);
        }
    });
    let progress = super::progress::bar(letters.len() as u64);
    let report = replay_letters(pool, topology, &plan, &letters, &interrupted, |acted| {
        progress.inc(1);
        progress.set_message(format!("replayed {acted}"));
    })
    .await?;
    progress.finish_and_clear();
    report.print(args.json)
}

/// Replays `letters` in order, one transaction each, until `stop` is set between two of them.
/// `progress` hears the count replayed after each letter.
pub async fn replay_letters(
    pool: &PgPool,
    topology: &Topology,
    plan: &Plan,
    letters: &[DeadLetter],
    stop: &AtomicBool,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Report> {
    let (mut acted, mut skipped, mut rebuilt) = (0u64, Vec::new(), Vec::new());
    for letter in letters {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match replay_one(pool, topology, plan, letter.id).await? {
            Replayed::Done { lacks } => {
                acted += 1;
                if let Some(lacks) = lacks {
                    rebuilt.push(Rebuilt { id: letter.id, lacks });
                }
            }
            Replayed::Skipped(why) => skipped.push(Skipped { id: letter.id, why }),
        }
        progress(acted);
    }
    let outcome = if (acted as usize + skipped.len()) < letters.len() {
        Outcome::Interrupted
    } else if skipped.is_empty() {
        Outcome::Done
    } else {
        Outcome::Partial
    };
    Ok(Report {
        action: Kind::Replay.as_str(),
        outcome,
        batch_id: Some(plan.batch_id),
        selected: letters.len(),
        acted,
        skipped,
        rebuilt,
    })
}

/// What became of one letter a replay selected.
pub enum Replayed {
    /// Its copy is in the outbox; `Some(lacks)` for a body rebuilt from the journal.
    Done { lacks: Option<Vec<String>> },
    /// Not replayed, and why.
    Skipped(String),
}

/// Replays one dead letter in one transaction: the row goes, its `dead` journal row goes, the action
/// is recorded, and the copy is written to the outbox.
pub async fn replay_one(
    pool: &PgPool,
    topology: &Topology,
    plan: &Plan,
    id: Uuid,
) -> anyhow::Result<Replayed> {
    let mut tx = pool.begin().await?;
    // A letter another session keeps locked fails the command after a while, never hangs it.
    sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut *tx).await?;
    let Some(letter) = DeadLetter::lock(&mut tx, id).await? else {
        return Ok(Replayed::Skipped(
            "no longer a dead letter (replayed or purged by another command)".into(),
        ));
    };
    if letter.body.is_empty() && letter.rebuilt {
        return Ok(Replayed::Skipped(
            "taken over from a journal row that kept no body: it can only be purged".into(),
        ));
    }
    sqlx::query("DELETE FROM dead_letters WHERE id = $1").bind(id).execute(&mut *tx).await?;
    if let Some(endpoint) = &letter.endpoint {
        // A notification to the app: due again for its endpoint, with its own id and body.
        let Some(notice) = BuriedNotice::of(&letter) else {
            return Ok(Replayed::Skipped("a notification whose id or sequence was not kept".into()));
        };
        insert_action(&mut tx, plan, &letter).await?;
        crate::db::notifications::revive(
            &mut tx,
            notice.id,
            endpoint,
            letter.account_id.as_deref().unwrap_or_default(),
            notice.sequence,
            &letter.event,
            &letter.body,
        )
        .await?;
        tx.commit().await?;
        return Ok(Replayed::Done { lacks: None });
    }
    sqlx::query("DELETE FROM webhook_events WHERE id = $1 AND status = 'dead'")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    insert_action(&mut tx, plan, &letter).await?;
    outbox::insert(&mut tx, &copy_of(&letter, plan, topology)).await?;
    tx.commit().await?;
    let lacks = letter.rebuilt.then(|| {
        serde_json::from_slice(&letter.body)
            .ok()
            .and_then(|body| journal_payload::lacks(&body))
            .unwrap_or_default()
    });
    Ok(Replayed::Done { lacks })
}

/// What a notification's dead letter keeps of it besides the body: its `webhook-id` and sequence.
struct BuriedNotice {
    id: Uuid,
    sequence: i64,
}

impl BuriedNotice {
    fn of(letter: &DeadLetter) -> Option<Self> {
        let header = |name: &str| letter.headers.get(name).and_then(|v| v.as_str());
        Some(Self {
            id: header(crate::db::notifications::HEADER_NOTIFICATION_ID)?.parse().ok()?,
            sequence: header(crate::db::notifications::HEADER_SEQUENCE)?.parse().ok()?,
        })
    }
}

/// The copy a replay puts on the work queue: the body as received, the same delivery id and stamp,
/// the carried headers without an earlier replay's own, and this replay's lineage.
fn copy_of(letter: &DeadLetter, plan: &Plan, topology: &Topology) -> outbox::OutboxMessage {
    let meta = DeliveryMeta {
        id: DeliveryId::from(letter.id),
        received_at: letter.received_at,
        body_sha256: letter.body_sha256.clone(),
    };
    let mut headers = serde_json::Map::new();
    for (name, value) in letter.headers.as_object().into_iter().flatten() {
        if ![HEADER_REPLAY_FORCE, HEADER_REPLAY_NOTE].contains(&name.as_str()) {
            headers.insert(name.clone(), value.clone());
        }
    }
    let stamp = meta.to_properties();
    for (name, value) in stamp.headers().iter().flat_map(|h| h.inner().iter()) {
        if let lapin::types::AMQPValue::LongString(text) = value {
            headers.insert(name.to_string(), String::from_utf8_lossy(text.as_bytes()).into());
        }
    }
    let mut lineage = |name: &str, value: String| {
        headers.insert(name.to_owned(), value.into());
    };
    lineage(HEADER_REPLAY_OF, letter.id.to_string());
    lineage(HEADER_REPLAY_BATCH, plan.batch_id.to_string());
    lineage(HEADER_REPLAYED_BY, plan.actor.clone());
    lineage(HEADER_REPLAYED_AT, format_time(Utc::now()));
    if let Some(note) = &plan.note {
        lineage(HEADER_REPLAY_NOTE, note.clone());
    }
    if plan.forced {
        lineage(HEADER_REPLAY_FORCE, "true".into());
    }
    outbox::OutboxMessage {
        producer: "replay",
        exchange: String::new(),
        routing_key: topology.work_queue(),
        message_id: letter.id.to_string(),
        timestamp: Some(letter.received_at),
        headers: serde_json::Value::Object(headers),
        body: letter.body.clone(),
        account_id: letter.account_id.clone(),
    }
}

pub async fn run_purge(pool: &PgPool, args: &PurgeArgs) -> anyhow::Result<()> {
    args.filter.require_selection()?;
    let letters = args.filter.select(pool).await?;
    match confirmation(args.yes, std::io::stdin().is_terminal()) {
        Confirmation::NotNeeded => {}
        Confirmation::Impossible => {
            return Err(UsageError::new(
                "dlq purge asks for confirmation, but stdin is not a terminal: pass --yes to purge without asking",
            )
            .into());
        }
        Confirmation::Ask => {
            for letter in letters.iter().take(20) {
                eprintln!(
                    "  {}  {}  {}",
                    letter.id,
                    letter.event.trim_start_matches("mono.events."),
                    letter.account_id.as_deref().unwrap_or("-")
                );
            }
            if letters.len() > 20 {
                eprintln!("  … and {} more", letters.len() - 20);
            }
            if !confirm(&format!("purge exactly these {} dead letter(s) for good?", letters.len()))? {
                let report = Report {
                    action: Kind::Purge.as_str(),
                    outcome: Outcome::Declined,
                    batch_id: None,
                    selected: letters.len(),
                    acted: 0,
                    skipped: Vec::new(),
                    rebuilt: Vec::new(),
                };
                return report.print(args.json);
            }
        }
    }
    let plan = Plan {
        kind: Kind::Purge,
        batch_id: Uuid::now_v7(),
        actor: args.actor.clone(),
        note: args.reason_note.clone(),
        forced: false,
    };
    purge_letters(pool, &plan, &letters).await?.print(args.json)
}

/// Purges exactly `letters` (those still dead letters) in one transaction.
pub async fn purge_letters(pool: &PgPool, plan: &Plan, letters: &[DeadLetter]) -> anyhow::Result<Report> {
    let ids: Vec<Uuid> = letters.iter().map(|l| l.id).collect();
    let purged = purge(pool, plan, &ids).await?;
    let skipped: Vec<Skipped> = ids
        .iter()
        .filter(|id| !purged.contains(id))
        .map(|&id| Skipped {
            id,
            why: "no longer a dead letter (replayed or purged by another command)".into(),
        })
        .collect();
    Ok(Report {
        action: Kind::Purge.as_str(),
        outcome: if skipped.is_empty() { Outcome::Done } else { Outcome::Partial },
        batch_id: Some(plan.batch_id),
        selected: ids.len(),
        acted: purged.len() as u64,
        skipped,
        rebuilt: Vec::new(),
    })
}

/// Purges exactly `ids` (those still dead letters) in one transaction, with their `dead` journal
/// rows and their action rows. Returns the ids purged.
pub async fn purge(pool: &PgPool, plan: &Plan, ids: &[Uuid]) -> anyhow::Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut *tx).await?;
    let mut purged = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        let letters: Vec<DeadLetter> = sqlx::query_as(
            "DELETE FROM dead_letters WHERE id = ANY($1)
             RETURNING id, event, account_id, reason, class, attempts, received_at, body_sha256, first_attempt_at,
                 dead_at, ''::bytea AS body, '{}'::jsonb AS headers, rebuilt, endpoint",
        )
        .bind(chunk)
        .fetch_all(&mut *tx)
        .await?;
        let gone: Vec<Uuid> = letters.iter().map(|l| l.id).collect();
        sqlx::query("DELETE FROM webhook_events WHERE id = ANY($1) AND status = 'dead'")
            .bind(&gone)
            .execute(&mut *tx)
            .await?;
        for letter in &letters {
            insert_action(&mut tx, plan, letter).await?;
        }
        purged.extend(gone);
    }
    tx.commit().await?;
    Ok(purged)
}

/// Records the action, complete: it is done when its transaction commits.
async fn insert_action(tx: &mut sqlx::PgConnection, plan: &Plan, letter: &DeadLetter) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letter_actions
             (batch_id, action, delivery_id, event, account_id, reason, attempts, dead_at, actor, note, forced,
              completed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, clock_timestamp())",
    )
    .bind(plan.batch_id)
    .bind(plan.kind.as_str())
    .bind(letter.id)
    .bind(&letter.event)
    .bind(&letter.account_id)
    .bind(letter.reason.as_deref().map(dead_letters::storable))
    .bind(letter.attempts)
    .bind(letter.dead_at)
    .bind(dead_letters::storable(&plan.actor))
    .bind(plan.note.as_deref().map(dead_letters::storable))
    .bind(plan.forced)
    .execute(tx)
    .await?;
    Ok(())
}

/// Whether a purge asks before it acts.
#[derive(Debug, PartialEq, Eq)]
enum Confirmation {
    /// `--yes`.
    NotNeeded,
    /// On a terminal, without `--yes`.
    Ask,
    /// Nobody to ask (stdin is a pipe, a file or closed) and no `--yes`: a usage error, never a
    /// silent "nothing purged".
    Impossible,
}

fn confirmation(yes: bool, stdin_is_terminal: bool) -> Confirmation {
    match (yes, stdin_is_terminal) {
        (true, _) => Confirmation::NotNeeded,
        (false, true) => Confirmation::Ask,
        (false, false) => Confirmation::Impossible,
    }
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_purge_asks_on_a_terminal_and_refuses_without_one() {
        assert_eq!(confirmation(true, false), Confirmation::NotNeeded);
        assert_eq!(confirmation(true, true), Confirmation::NotNeeded);
        assert_eq!(confirmation(false, true), Confirmation::Ask);
        assert_eq!(confirmation(false, false), Confirmation::Impossible);
    }
}
