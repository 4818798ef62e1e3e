//! `worker dlq replay` and `worker dlq purge`: one walk over the dead-letter queue, acting on the
//! messages that match.
//!
//! For each message, in this order. A replay: the action is recorded in `dead_letter_actions` and the
//! dead journal row removed (one transaction; the worker would take the copy for a redelivery of a
//! settled id otherwise); a copy goes onto the work queue (same delivery id, attempts reset, lineage
//! headers) and is confirmed; the message is acked off the dead-letter queue; the action is marked
//! complete. A purge: the action is recorded; the message is acked; the journal row is removed and
//! the action completed (one transaction), so a purge never removes a row whose message it did not
//! remove. A crash or Ctrl-C between any two steps leaves an unfinished action that the next run
//! completes: a copy published twice carries the same delivery id, which the worker applies once.
//! Ctrl-C lets the current message finish; a second one ends the process at once (exit 130), for a
//! broker that stopped answering (a copy's confirm is bounded anyway, by the worker's 10 s).
//!
//! Only a walk that saw the whole queue (see `queue`) acts on what it did not see: it completes
//! unfinished actions whose message is gone, and reconciles journaled dead letters whose message is
//! missing (a replay rebuilds the message from the journal, a purge forgets the row). An incomplete
//! walk says so, leaves all that alone, and exits non-zero.

use chrono::Utc;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, IsTerminal, Write};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::filter::{DeadFilter, DeadLetter};
use super::queue::{DeadQueue, Seen};
use super::{PurgeArgs, ReplayArgs};
use crate::commands::output::{self, UsageError};
use crate::journal_payload;
use shared::config::BrokerArgs;
use shared::delivery::{
    ATTEMPT_HEADERS, BROKER_HEADERS, DeliveryId, DeliveryMeta, HEADER_REPLAY_BATCH, HEADER_REPLAY_FORCE,
    HEADER_REPLAY_NOTE, HEADER_REPLAY_OF, HEADER_REPLAYED_AT, HEADER_REPLAYED_BY, format_time, long_string,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
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

/// An action being carried out, as recorded.
#[derive(Clone, Debug, sqlx::FromRow)]
struct Action {
    delivery_id: Uuid,
    batch_id: Uuid,
    action: String,
    actor: String,
    note: Option<String>,
    forced: bool,
}

struct Plan<'a> {
    kind: Kind,
    batch_id: Uuid,
    actor: &'a str,
    note: Option<&'a str>,
    forced: bool,
    filter: &'a DeadFilter,
}

/// What `worker dlq replay` or `worker dlq purge` did: their `--json` document.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `replay` or `purge`.
    action: &'static str,
    outcome: Outcome,
    /// The batch the actions are recorded under; `null` when nothing was done (declined).
    batch_id: Option<Uuid>,
    /// Journaled dead letters the filter selected at the start.
    selected: usize,
    /// Dead letters replayed or purged by this run (with --all, also messages the journal does
    /// not know).
    acted: u64,
    /// Actions an interrupted earlier run left unfinished, finished by this one.
    resumed: u64,
    /// Messages of the dead-letter queue the walk saw (0 when declined: no walk).
    seen: u32,
    /// Messages the walk saw and left in the dead-letter queue.
    left_in_queue: u32,
    /// Selected dead letters left untouched because the walk did not see them (0 when `done`).
    unseen: usize,
    /// Replays rebuilt from the journal because their message had left the dead-letter queue, each
    /// with what its copy lacks of the original body.
    rebuilt: Vec<Rebuilt>,
}

/// A replay whose copy was rebuilt from its journal row.
#[derive(Debug, Serialize)]
struct Rebuilt {
    id: Uuid,
    /// The fields of the original body the journal row does not hold (`JOURNAL_PAYLOAD=minimal`
    /// keeps only its allowlist): the copy goes without them, never with a guess. Empty for a row
    /// journaled with the whole body.
    lacks: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// Everything selected was acted on (exit 0).
    Done,
    /// The walk could not see the whole queue; what it did not see is untouched (exit 1).
    Incomplete,
    /// Ctrl-C: the current message was finished, the rest left (exit 1).
    Interrupted,
    /// The operator answered no at the prompt (exit 0).
    Declined,
}

impl Report {
    fn verb(&self) -> &'static str {
        if self.action == Kind::Replay.as_str() { "replayed" } else { "purged" }
    }

    /// Prints the report (text or JSON), then fails if the run did not finish.
    fn print(&self, json: bool) -> anyhow::Result<()> {
        let verb = self.verb();
        if json {
            output::document(self)?;
        } else if self.outcome == Outcome::Declined {
            println!("nothing {verb}");
        } else {
            println!(
                "{verb} {} dead letter(s) in batch {}; finished {} interrupted action(s); left {} in the queue",
                self.acted,
                self.batch_id.map(|id| id.to_string()).unwrap_or_default(),
                self.resumed,
                self.left_in_queue
            );
            for rebuilt in self.rebuilt.iter().filter(|r| !r.lacks.is_empty()) {
                println!(
                    "replayed {} from its minimal journal row (its message had left the queue): the copy \
                     lacks {}",
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
                        "interrupted: what was {verb} stays {verb}; run the same command again to continue"
                    );
                }
                anyhow::bail!("interrupted; run the same command again to continue")
            }
            Outcome::Incomplete => {
                if !json {
                    println!(
                        "incomplete: the walk saw {} message(s) but not the whole dead-letter queue (another \
                         `worker dlq` holds messages, or new ones arrived); {} selected dead letter(s) were not \
                         seen and were left as they are. Run the same command again.",
                        self.seen, self.unseen
                    );
                }
                anyhow::bail!(
                    "the dead-letter queue could not be seen whole; {} selected dead letter(s) untouched",
                    self.unseen
                )
            }
        }
    }
}

pub async fn run_replay(pool: &PgPool, broker: &BrokerArgs, args: &ReplayArgs) -> anyhow::Result<()> {
    args.filter.require_selection()?;
    let plan = Plan {
        kind: Kind::Replay,
        batch_id: Uuid::now_v7(),
        actor: &args.actor,
        note: args.reason_note.as_deref(),
        forced: args.force,
        filter: &args.filter,
    };
    act(pool, broker, plan).await?.print(args.json)
}

pub async fn run_purge(pool: &PgPool, broker: &BrokerArgs, args: &PurgeArgs) -> anyhow::Result<()> {
    args.filter.require_selection()?;
    match confirmation(args.yes, std::io::stdin().is_terminal()) {
        Confirmation::NotNeeded => {}
        Confirmation::Impossible => {
            return Err(UsageError::new(
                "dlq purge asks for confirmation, but stdin is not a terminal: pass --yes to purge without asking",
            )
            .into());
        }
        Confirmation::Ask => {
            let selected = args.filter.select(pool).await?.len();
            if !confirm(&format!("purge {selected} dead letter(s) for good?"))? {
                let report = Report {
                    action: Kind::Purge.as_str(),
                    outcome: Outcome::Declined,
                    batch_id: None,
                    selected,
                    acted: 0,
                    resumed: 0,
                    seen: 0,
                    left_in_queue: 0,
                    unseen: 0,
                    rebuilt: Vec::new(),
                };
                return report.print(args.json);
            }
        }
    }
    let plan = Plan {
        kind: Kind::Purge,
        batch_id: Uuid::now_v7(),
        actor: &args.actor,
        note: args.reason_note.as_deref(),
        forced: false,
        filter: &args.filter,
    };
    act(pool, broker, plan).await?.print(args.json)
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

async fn act(pool: &PgPool, broker: &BrokerArgs, plan: Plan<'_>) -> anyhow::Result<Report> {
    let selected: HashMap<Uuid, DeadLetter> =
        plan.filter.select(pool).await?.into_iter().map(|letter| (letter.id, letter)).collect();
    let unfinished: HashMap<Uuid, Action> = sqlx::query_as(
        "SELECT delivery_id, batch_id, action, actor, note, forced FROM dead_letter_actions WHERE completed_at IS NULL",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|action: Action| (action.delivery_id, action))
    .collect();
    let journaled_dead: HashSet<Uuid> = if plan.filter.all {
        sqlx::query_scalar("SELECT id FROM webhook_events WHERE status = 'dead'")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };

    let cancel = CancellationToken::new();
    let interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: finishing the current message, then stopping (Ctrl-C again: stop now)");
            interrupt.cancel();
        }
        // The current message may wait on a broker that stopped answering: a second Ctrl-C ends the
        // process at once. What was recorded and not finished is finished by the next run.
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("stopped at once; run the same command again to finish what was started");
            std::process::exit(output::INTERRUPTED);
        }
    });

    let queue = DeadQueue::open(broker).await?;
    let mut walk = queue.walk().await?;
    let progress = super::progress::bar(u64::from(queue.depth().await?));
    let (mut done, mut resumed) = (0u64, 0u64);
    let mut seen = HashSet::new();
    let mut rebuilt = Vec::new();
    let limit = plan.filter.limit.map_or(u64::MAX, |l| l.max(0) as u64);
    // Asked while the walk still holds what it left: did it see everything? Messages found waiting
    // in the walk's own lanes at that question are walked too, never taken for missing.
    let complete = loop {
        while !cancel.is_cancelled() {
            let Some(message) = walk.next().await? else { break };
            progress.inc(1);
            let delivery = &message.delivery;
            let id = DeliveryMeta::from_properties(&delivery.properties, &delivery.data).id.as_uuid();
            seen.insert(id);
            if let Some(action) = unfinished.get(&id) {
                finish_action(pool, &queue, &mut walk, &message, action).await?;
                resumed += 1;
                continue;
            }
            // A dead letter the journal does not know (e.g. dead-lettered by the broker itself) is only
            // taken by --all.
            let wanted = selected.contains_key(&id) || (plan.filter.all && !journaled_dead.contains(&id));
            if !wanted || done >= limit {
                walk.leave(&message);
                continue;
            }
            let subject = selected.get(&id).map_or_else(|| Subject::of_message(id, delivery), Subject::of);
            let action = record(pool, &plan, subject).await?;
            finish_action(pool, &queue, &mut walk, &message, &action).await?;
            done += 1;
            progress.set_message(format!("{} {done}", plan.kind.as_str()));
        }
        if cancel.is_cancelled() {
            break false;
        }
        if queue.fully_seen(&mut walk).await? {
            break true;
        }
        if !walk.has_waiting() {
            break false;
        }
    };
    progress.finish_and_clear();
    let (left, looked_at) = (walk.left, walk.seen);
    walk.finish().await?;

    if complete {
        for action in unfinished.values().filter(|a| !seen.contains(&a.delivery_id)) {
            // Its message is gone: acked just before an interruption.
            complete_action(pool, action).await?;
        }
        // Journaled dead letters whose message is missing from the queue: a replay rebuilds the
        // message from the journal, a purge forgets the row, so both sides agree again.
        for letter in selected.values().filter(|l| !seen.contains(&l.id)) {
            if done >= limit {
                break;
            }
            if let Some(lacks) = reconcile_missing(pool, &queue, &plan, letter).await? {
                done += 1;
                if plan.kind == Kind::Replay {
                    rebuilt.push(Rebuilt { id: letter.id, lacks });
                }
            }
        }
    }
    queue.close().await;

    let outcome = if cancel.is_cancelled() {
        Outcome::Interrupted
    } else if complete {
        Outcome::Done
    } else {
        Outcome::Incomplete
    };
    let unseen = if complete { 0 } else { selected.keys().filter(|id| !seen.contains(*id)).count() };
    Ok(Report {
        action: plan.kind.as_str(),
        outcome,
        batch_id: Some(plan.batch_id),
        selected: selected.len(),
        acted: done,
        resumed,
        seen: looked_at,
        left_in_queue: left,
        unseen,
        rebuilt,
    })
}

/// A journaled dead letter whose message is not in the queue (the walk saw it whole): a replay
/// publishes a copy rebuilt from the journal, a purge forgets the row. Returns what the rebuilt copy
/// lacks of the original body (the paths a minimal row names as dropped; empty for a purge or a
/// whole body), or `None` if skipped: the row is no longer a dead letter (another run handled it
/// meanwhile), or holds no body to rebuild.
async fn reconcile_missing(
    pool: &PgPool,
    queue: &DeadQueue,
    plan: &Plan<'_>,
    letter: &DeadLetter,
) -> anyhow::Result<Option<Vec<String>>> {
    if plan.kind == Kind::Replay && letter.payload.is_none() {
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    insert_action(&mut tx, plan, &Subject::of(letter)).await?;
    let removed = sqlx::query("DELETE FROM webhook_events WHERE id = $1 AND status = 'dead'")
        .bind(letter.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if removed == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    let mut lacks = Vec::new();
    if let (Kind::Replay, Some(payload)) = (plan.kind, &letter.payload) {
        // The copy carries the row's own list of what was dropped (`journal_payload::MARKER`), so
        // the worker journals it as minimal again; the operator is told here.
        lacks = journal_payload::lacks(payload).unwrap_or_default();
        if !lacks.is_empty() {
            tracing::warn!(delivery_id = %letter.id, lacks = %lacks.join(","),
                "a replay rebuilt from a minimal journal row lacks fields of the original body");
        }
        let body = serde_json::to_vec(payload)?;
        let mut meta = DeliveryMeta::stamp(&body);
        meta.id = DeliveryId::from(letter.id);
        meta.received_at = letter.received_at;
        // Dedup compares the digest of the body as received, not of this re-serialised copy.
        meta.body_sha256 = letter.body_sha256.clone();
        let properties = meta.to_properties();
        let headers =
            lineage(&plan_action(plan, letter.id), properties.headers().clone().unwrap_or_default());
        queue.publish_to_work(&body, properties.with_headers(headers)).await?;
    }
    complete(pool, letter.id).await?;
    Ok(Some(lacks))
}

fn plan_action(plan: &Plan<'_>, id: Uuid) -> Action {
    Action {
        delivery_id: id,
        batch_id: plan.batch_id,
        action: plan.kind.as_str().to_owned(),
        actor: plan.actor.to_owned(),
        note: plan.note.map(str::to_owned),
        forced: plan.forced,
    }
}

/// What an action is about, from the journal or, for a message it does not know, from the message.
struct Subject {
    id: Uuid,
    event: String,
    account: Option<String>,
    reason: Option<String>,
    attempts: i32,
    dead_at: Option<chrono::DateTime<Utc>>,
}

impl Subject {
    fn of(letter: &DeadLetter) -> Self {
        Self {
            id: letter.id,
            event: letter.event.clone(),
            account: letter.account_id.clone(),
            reason: letter.reason.clone(),
            attempts: letter.attempts,
            dead_at: letter.dead_at,
        }
    }

    fn of_message(id: Uuid, delivery: &Delivery) -> Self {
        let envelope = shared::event::Envelope::parse(&delivery.data).ok();
        Self {
            id,
            event: envelope.as_ref().map(|e| e.event_name().to_owned()).unwrap_or_default(),
            account: envelope.and_then(|e| e.account_id()).map(|a| a.as_str().to_owned()),
            reason: Some("not in the journal (dead-lettered by the broker?)".to_owned()),
            attempts: 0,
            dead_at: None,
        }
    }
}

/// Records the action; a replay also removes the dead journal row (one transaction), so the worker
/// takes the copy for a new delivery rather than a redelivery of a settled id.
async fn record(pool: &PgPool, plan: &Plan<'_>, subject: Subject) -> anyhow::Result<Action> {
    let mut tx = pool.begin().await?;
    insert_action(&mut tx, plan, &subject).await?;
    if plan.kind == Kind::Replay {
        sqlx::query("DELETE FROM webhook_events WHERE id = $1 AND status = 'dead'")
            .bind(subject.id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(plan_action(plan, subject.id))
}

async fn insert_action(
    tx: &mut sqlx::PgConnection,
    plan: &Plan<'_>,
    subject: &Subject,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letter_actions
             (batch_id, action, delivery_id, event, account_id, reason, attempts, dead_at, actor, note, forced)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(plan.batch_id)
    .bind(plan.kind.as_str())
    .bind(subject.id)
    .bind(&subject.event)
    .bind(&subject.account)
    .bind(&subject.reason)
    .bind(subject.attempts)
    .bind(subject.dead_at)
    .bind(plan.actor)
    .bind(plan.note)
    .bind(plan.forced)
    .execute(tx)
    .await?;
    Ok(())
}

/// Publishes (for a replay), acks the dead-letter message and completes the action.
async fn finish_action(
    pool: &PgPool,
    queue: &DeadQueue,
    walk: &mut super::queue::Walk,
    message: &Seen,
    action: &Action,
) -> anyhow::Result<()> {
    let delivery = &message.delivery;
    if action.action == Kind::Replay.as_str() {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let properties: BasicProperties = delivery.properties.clone().with_headers(lineage(action, headers));
        queue.publish_to_work(&delivery.data, properties).await?;
    }
    walk.take(message).await?;
    complete_action(pool, action).await
}

/// Completes an action whose message is off the dead-letter queue; for a purge, the journal row
/// goes with it (in the same transaction).
async fn complete_action(pool: &PgPool, action: &Action) -> anyhow::Result<()> {
    if action.action != Kind::Purge.as_str() {
        return complete(pool, action.delivery_id).await;
    }
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM webhook_events WHERE id = $1 AND status = 'dead'")
        .bind(action.delivery_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE dead_letter_actions SET completed_at = now() WHERE delivery_id = $1 AND completed_at IS NULL",
    )
    .bind(action.delivery_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn complete(pool: &PgPool, id: Uuid) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE dead_letter_actions SET completed_at = now() WHERE delivery_id = $1 AND completed_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// What an earlier replay of this letter asked for itself and a later replay only sets when it asks
/// too: carried over, a plain replay of a letter once replayed with `--force` would be forced again.
const OWN_REPLAY_HEADERS: [&str; 2] = [HEADER_REPLAY_FORCE, HEADER_REPLAY_NOTE];

/// The dead copy's headers without its attempt history, plus the replay's lineage.
fn lineage(action: &Action, headers: FieldTable) -> FieldTable {
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        // Attempts start again; the broker's dead-lettering headers described the old copy; force
        // and note belong to the replay that gave them.
        .filter(|(name, _)| {
            let name = name.as_str();
            !ATTEMPT_HEADERS.contains(&name)
                && !BROKER_HEADERS.contains(&name)
                && !OWN_REPLAY_HEADERS.contains(&name)
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let mut headers = FieldTable::from(kept);
    headers.insert(HEADER_REPLAY_OF.into(), long_string(&action.delivery_id.to_string()));
    headers.insert(HEADER_REPLAY_BATCH.into(), long_string(&action.batch_id.to_string()));
    headers.insert(HEADER_REPLAYED_BY.into(), long_string(&action.actor));
    headers.insert(HEADER_REPLAYED_AT.into(), long_string(&format_time(Utc::now())));
    if let Some(note) = &action.note {
        headers.insert(HEADER_REPLAY_NOTE.into(), long_string(note));
    }
    if action.forced {
        headers.insert(HEADER_REPLAY_FORCE.into(), long_string("true"));
    }
    headers
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
