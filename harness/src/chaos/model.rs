//! What the database must hold once a scenario's backlog has drained: every delivery that got a 200
//! journaled, each account in the state a single worker taking the same events one by one would
//! have left it in (the event received last decides each part of the state; an unlink ends the
//! re-auth for good), and no more tokens from Mono than that worker would have asked for
//! (docs/ARCHITECTURE.md, "The model").

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::load::{Kind, Posted};

/// The journal row of one delivery.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Journaled {
    pub id: String,
    pub status: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub struct Verdict {
    /// Accepted deliveries journaled with any status but `dead`.
    pub processed: usize,
    /// Accepted deliveries never journaled.
    pub lost: Vec<String>,
    /// Accepted deliveries journaled as dead.
    pub dead: usize,
    /// Accounts whose state is not what one-by-one processing gives.
    pub wrong_accounts: Vec<String>,
    pub statuses: BTreeMap<String, usize>,
    /// Webhooks that got no 200 yet were journaled: counted in, not lost.
    pub delivered_without_200: usize,
    /// Deliveries journaled with a status no order of processing allows (with why).
    pub wrong_statuses: Vec<String>,
}

/// Waits (up to `patience`) until every accepted delivery is journaled, then checks the accounts.
pub async fn settle_and_verify(
    pool: &PgPool,
    accepted: &BTreeMap<String, Posted>,
    uncertain: &[Posted],
    patience: Duration,
    dedup_window: Duration,
) -> anyhow::Result<Verdict> {
    let deadline = Instant::now() + patience;
    let journal: HashMap<String, Journaled> = loop {
        let rows: Vec<Journaled> =
            sqlx::query_as("SELECT id::text AS id, status, received_at FROM webhook_events")
                .fetch_all(pool)
                .await?;
        let journal: HashMap<String, Journaled> = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
        if accepted.keys().all(|id| journal.contains_key(id)) || Instant::now() >= deadline {
            break journal;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut verdict = Verdict::default();
    // A webhook that got no 200 but reached the queue anyway (its confirm came too late) is a
    // delivery like any other: Mono would have retried it. It joins the model by its body's hash.
    let mut accepted = accepted.clone();
    let by_hash: HashMap<String, &Posted> =
        uncertain.iter().map(|posted| (shared::delivery::body_digest(&posted.body), posted)).collect();
    let hashes: Vec<(String, String)> =
        sqlx::query_as("SELECT id::text, body_sha256 FROM webhook_events").fetch_all(pool).await?;
    for (id, hash) in hashes {
        if !accepted.contains_key(&id)
            && let Some(posted) = by_hash.get(&hash)
        {
            accepted.insert(id, (*posted).clone());
            verdict.delivered_without_200 += 1;
        }
    }
    let accepted = &accepted;
    for id in accepted.keys() {
        match journal.get(id) {
            None => verdict.lost.push(id.clone()),
            Some(row) => {
                *verdict.statuses.entry(row.status.clone()).or_default() += 1;
                if row.status == "dead" {
                    verdict.dead += 1;
                } else {
                    verdict.processed += 1;
                }
            }
        }
    }

    verdict.wrong_statuses = impossible_statuses(accepted, &journal, dedup_window);

    let mut by_account: BTreeMap<&str, Vec<(&Posted, &Journaled)>> = BTreeMap::new();
    for (id, posted) in accepted {
        // A duplicate restates its copy's effect at its own receive time: it counts as that event.
        if let Some(row) =
            journal.get(id).filter(|r| matches!(r.status.as_str(), "processed" | "stale" | "duplicate"))
        {
            by_account.entry(posted.account.as_str()).or_default().push((posted, row));
        }
    }
    for (account, events) in by_account {
        let actual: Option<(bool, bool, Option<String>)> = sqlx::query_as(
            "SELECT reauth_required, reauth_token IS NOT NULL, data_status FROM accounts WHERE id = $1",
        )
        .bind(account)
        .fetch_optional(pool)
        .await?;
        let Some((flagged, has_token, data_status)) = actual else {
            verdict.wrong_accounts.push(account.to_owned());
            continue;
        };
        // An unlink ends the re-auth for good: it clears the flag and token whenever it comes, and
        // a re-auth received after it is ignored.
        let unlinked = events.iter().any(|(p, _)| p.kind == Kind::AccountUnlinked);
        let reauth =
            last_of(&events, |k| matches!(k, Kind::ReauthorisationRequired | Kind::AccountReauthorized));
        let expected_flag = match reauth {
            _ if unlinked => Some(false),
            Latest::None => Some(false),
            Latest::One(posted) => Some(posted.kind == Kind::ReauthorisationRequired),
            Latest::Tied => None,
        };
        let expected_status = match last_of(&events, Kind::sets_data_status) {
            Latest::One(posted) => Some(posted.data_status.map(str::to_owned)),
            Latest::None => Some(None),
            Latest::Tied => None,
        };
        // A flagged account keeps a token, unless a re-authorisation received before its last
        // re-auth was decided after it (`stale`): that re-authorisation spends every token issued
        // before it, the re-auth's perhaps among them (kept as a duplicate's, or shared from an
        // older fetch), and the api fetches one on demand.
        let last_required = events
            .iter()
            .filter(|(p, _)| p.kind == Kind::ReauthorisationRequired)
            .map(|(_, j)| j.received_at)
            .max();
        let spent_by_a_late_reauthorisation = events.iter().any(|(p, j)| {
            p.kind == Kind::AccountReauthorized && j.status == "stale" && Some(j.received_at) < last_required
        });
        let token_wrong = flagged != has_token && !(flagged && spent_by_a_late_reauthorisation);
        let flag_wrong = expected_flag.is_some_and(|expected| expected != flagged) || token_wrong;
        let status_wrong = expected_status.is_some_and(|expected| expected != data_status);
        if flag_wrong || status_wrong {
            verdict.wrong_accounts.push(account.to_owned());
        }
    }
    Ok(verdict)
}

/// The journal statuses no order of processing allows. Which of `processed`, `duplicate` and
/// `stale` a delivery gets depends on the order the workers decided in (a later-received event
/// applied first makes an earlier one stale; which of two copies is the duplicate is a race), so
/// the model cannot name each delivery's status; what it can say, whatever the order:
/// - `duplicate` needs a copy: another delivery of the same body within the dedup window;
/// - `ignored` is only a re-auth of an account that was unlinked (the load sends no unknown event).
fn impossible_statuses(
    accepted: &BTreeMap<String, Posted>,
    journal: &HashMap<String, Journaled>,
    dedup_window: Duration,
) -> Vec<String> {
    let window = chrono::Duration::from_std(dedup_window).unwrap_or(chrono::Duration::MAX);
    let mut by_body: HashMap<&[u8], Vec<(&str, DateTime<Utc>)>> = HashMap::new();
    let mut unlinked: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (id, posted) in accepted {
        if let Some(row) = journal.get(id) {
            by_body.entry(posted.body.as_slice()).or_default().push((id.as_str(), row.received_at));
            if posted.kind == Kind::AccountUnlinked {
                unlinked.insert(posted.account.as_str());
            }
        }
    }
    let mut wrong = Vec::new();
    for (id, posted) in accepted {
        let Some(row) = journal.get(id) else { continue };
        let fits = match row.status.as_str() {
            "duplicate" => by_body[posted.body.as_slice()]
                .iter()
                .any(|(other, at)| *other != id.as_str() && (*at - row.received_at).abs() <= window),
            "ignored" => {
                posted.kind == Kind::ReauthorisationRequired && unlinked.contains(posted.account.as_str())
            }
            _ => true,
        };
        if !fits {
            wrong.push(format!("{id} ({:?} of {}) journaled {}", posted.kind, posted.account, row.status));
        }
    }
    wrong
}

enum Latest<'a> {
    None,
    One(&'a Posted),
    /// Two events of different effect share the latest receive time: either order is right.
    Tied,
}

fn last_of<'a>(events: &[(&'a Posted, &Journaled)], wanted: impl Fn(Kind) -> bool) -> Latest<'a> {
    let relevant: Vec<_> = events.iter().filter(|(p, _)| wanted(p.kind)).collect();
    let Some(latest) = relevant.iter().map(|(_, j)| j.received_at).max() else {
        return Latest::None;
    };
    let at_latest: Vec<&Posted> =
        relevant.iter().filter(|(_, j)| j.received_at == latest).map(|(p, _)| *p).collect();
    let first = at_latest[0];
    if at_latest.iter().all(|p| p.kind == first.kind && p.data_status == first.data_status) {
        Latest::One(first)
    } else {
        Latest::Tied
    }
}

/// The re-auths the model counts over the journal (dead letters aside): a worker taking every
/// delivery once, in receive order, asks Mono for a token for each `reauthorisation_required` that
/// is not a copy of one in effect within `window` with nothing else in effect between the two, and
/// for a copy decided before the copies that chain it to the one in effect. As in the worker,
/// "between" includes both ends' millisecond: events stamped in the same millisecond have no known
/// order (two ingests, two clocks), so another body stamped with either copy's time may have been
/// in effect between them, and the copy is taken as a new re-auth.
pub async fn model_reauths_by_account(
    pool: &PgPool,
    window: Duration,
) -> anyhow::Result<HashMap<String, usize>> {
    let rows: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT account_id, event, body_sha256, received_at FROM webhook_events
         WHERE status <> 'dead' AND account_id IS NOT NULL ORDER BY received_at, id",
    )
    .fetch_all(pool)
    .await?;
    Ok(count_reauths(rows, chrono::Duration::from_std(window)?))
}

/// [`model_reauths_by_account`] over journal rows (account, event, body digest, received), in
/// receive order.
fn count_reauths(
    rows: Vec<(String, String, String, DateTime<Utc>)>,
    window: chrono::Duration,
) -> HashMap<String, usize> {
    let mut by_account: HashMap<String, Vec<(String, String, DateTime<Utc>)>> = HashMap::new();
    for (account, event, body, at) in rows {
        by_account.entry(account).or_default().push((event, body, at));
    }
    let mut reauths: HashMap<String, usize> = HashMap::new();
    for (account, rows) in by_account {
        let mut history: Vec<(DateTime<Utc>, &str, bool)> = Vec::with_capacity(rows.len());
        for (index, (event, body, at)) in rows.iter().enumerate() {
            let (body, at) = (body.as_str(), *at);
            // Listed after this one but stamped in its millisecond: possibly in effect before it.
            let other_in_same_millisecond = rows[index + 1..]
                .iter()
                .take_while(|(_, _, later)| *later == at)
                .any(|(_, other, _)| other != body);
            let copy_in_effect = |only_applied: bool| {
                history.iter().rev().take_while(|(copy_at, _, _)| at - *copy_at <= window).any(
                    |(copy_at, copy, applied)| {
                        *copy == body
                            && (*applied || !only_applied)
                            && !other_in_same_millisecond
                            && !history.iter().any(|(between, other, applied)| {
                                *applied && *other != body && between >= copy_at && *between <= at
                            })
                    },
                )
            };
            let duplicate = copy_in_effect(false);
            if event == "mono.events.reauthorisation_required" && (!duplicate || !copy_in_effect(true)) {
                *reauths.entry(account.clone()).or_default() += 1;
            }
            history.push((at, body, !duplicate));
        }
    }
    reauths
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED: &str = "mono.events.reauthorisation_required";
    const REAUTHORIZED: &str = "mono.events.account_reauthorized";

    fn reauths(rows: &[(&str, &str, i64)]) -> usize {
        let start = DateTime::from_timestamp_millis(1_800_000_000_000).expect("a valid time");
        let rows = rows
            .iter()
            .map(|(event, body, ms)| {
                (
                    "acct".to_owned(),
                    (*event).to_owned(),
                    (*body).to_owned(),
                    start + chrono::Duration::milliseconds(*ms),
                )
            })
            .collect();
        count_reauths(rows, chrono::Duration::minutes(10)).values().sum()
    }

    /// A load's accepted deliveries and their journal rows, built one delivery at a time.
    #[derive(Default)]
    struct Journaling {
        accepted: BTreeMap<String, Posted>,
        journal: HashMap<String, Journaled>,
    }

    impl Journaling {
        fn add(&mut self, id: &str, posted: Posted, status: &str, ms: i64) {
            let start = DateTime::from_timestamp_millis(1_800_000_000_000).expect("a valid time");
            let received_at = start + chrono::Duration::milliseconds(ms);
            let row = Journaled { id: id.to_owned(), status: status.to_owned(), received_at };
            self.journal.insert(id.to_owned(), row);
            self.accepted.insert(id.to_owned(), posted);
        }

        fn impossible(&self) -> Vec<String> {
            impossible_statuses(&self.accepted, &self.journal, Duration::from_secs(600))
        }
    }

    #[test]
    fn a_duplicate_without_a_copy_and_an_ignored_re_auth_of_a_linked_account_are_impossible() {
        use crate::chaos::load::LoadPlan;
        let plan = |kind| LoadPlan { per_second: 1, accounts: 8, kinds: vec![kind] };
        let mut run = Journaling::default();
        // Account 1 (seq 0): a re-auth and its copy; account 8 (seq 7): unlinked, then a re-auth.
        run.add("r1", Posted::new(0, &plan(Kind::ReauthorisationRequired)), "processed", 0);
        run.add("r1-copy", Posted::new(0, &plan(Kind::ReauthorisationRequired)), "duplicate", 10);
        run.add("u8", Posted::new(7, &plan(Kind::AccountUnlinked)), "processed", 20);
        run.add("r8", Posted::new(7, &plan(Kind::ReauthorisationRequired)), "ignored", 30);
        assert!(run.impossible().is_empty());

        // A body of its own (a data update) cannot be a duplicate; a linked account's re-auth is
        // never ignored.
        run.add("d1", Posted::new(8, &plan(Kind::AccountUpdated)), "duplicate", 40);
        run.add("r2", Posted::new(1, &plan(Kind::ReauthorisationRequired)), "ignored", 50);
        let wrong = run.impossible();
        assert_eq!(wrong.len(), 2, "{wrong:?}");
        assert!(wrong[0].starts_with("d1") && wrong[1].starts_with("r2"), "{wrong:?}");
    }

    #[test]
    fn a_copy_with_nothing_between_is_one_re_auth() {
        assert_eq!(reauths(&[(REQUIRED, "r", 0), (REQUIRED, "r", 500)]), 1);
    }

    #[test]
    fn a_copy_after_another_event_is_a_new_re_auth() {
        assert_eq!(reauths(&[(REQUIRED, "r", 0), (REAUTHORIZED, "a", 200), (REQUIRED, "r", 500)]), 2);
    }

    #[test]
    fn another_event_in_either_copy_s_millisecond_may_be_between_them() {
        // As the worker decides: within a millisecond the order is unknown.
        assert_eq!(reauths(&[(REAUTHORIZED, "a", 0), (REQUIRED, "r", 0), (REQUIRED, "r", 500)]), 2);
        assert_eq!(reauths(&[(REQUIRED, "r", 0), (REAUTHORIZED, "a", 0), (REQUIRED, "r", 500)]), 2);
        assert_eq!(reauths(&[(REQUIRED, "r", 0), (REQUIRED, "r", 500), (REAUTHORIZED, "a", 500)]), 2);
        assert_eq!(reauths(&[(REQUIRED, "r", 0), (REAUTHORIZED, "a", 500), (REQUIRED, "r", 500)]), 2);
    }

    #[test]
    fn a_copy_outside_the_window_is_a_new_re_auth() {
        assert_eq!(reauths(&[(REQUIRED, "r", 0), (REQUIRED, "r", 601_000)]), 2);
    }
}
