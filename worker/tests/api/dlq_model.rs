//! The operator's world against its model, over generated sessions (proptest), with a real worker
//! running (its pipeline and its outbox relay), real PostgreSQL and RabbitMQ, and a Mono that
//! refuses the accounts the session says.
//!
//! The model: each letter is, between two steps, in exactly one place: `dead` (a `dead_letters`
//! row, journaled `dead`), `applied` (journaled with the worker's own status, no row), `purged` (no
//! row, no journal row) or `erased` (no row, no outbox row). A replay moves a dead letter to the
//! outbox, and the relay to the work queue, where the worker applies it or, while Mono refuses its
//! account, it dies again: a row once more, never a second replay of it. Each command acts on
//! exactly the dead letters its filter selects (`--all` beside a filter never widens it; a limit
//! takes that many; two operators at once never act on one letter twice; a replay stopped after k
//! letters acted on k); the dry run's outcomes for an account are the outcomes the replay had
//! (as a multiset: copies of one body are applied once, whichever comes first); Mono is called at
//! most once per delivery that reached the worker (no replay loop); an erased account leaves no
//! row and no outbox row.
//!
//! Generated: 1 to 6 letters over three accounts (Mono refusing all three at first), then up to
//! six steps: a letter dying (sometimes a copy of an earlier body), Mono refusing or accepting an
//! account, a replay (filtered by account, `--all --account`, `--all`, `--all --limit n`, forced or
//! not, stopped after k letters), two replays at once, a replay followed at once by a worker
//! restart (its relay cut wherever it is: the batch's transaction rolls back and the copies go
//! again, same ids), a replay during which every database session ends (a failover: the replay,
//! the pipeline and the relay each cut mid-transaction), a purge, an erasure. `PROPTEST_CASES` raises the number of sessions.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;
use wiremock::{Mock, Request, Respond, ResponseTemplate, matchers::method};

use crate::helpers::{PATIENCE, TestWorld};
use worker::commands::account_erase::erase;
use worker::commands::dlq::DeadFilter;
use worker::commands::dlq::predict;
use worker::commands::dlq::replay::{self, Kind, Plan};

const ACCOUNTS: usize = 3;
const REAUTH: &str = "mono.events.reauthorisation_required";

#[derive(Clone, Debug)]
enum Filter {
    All,
    Account(usize),
    /// `--all --account a`: must select as `--account a` does.
    AllAndAccount(usize),
    /// `--all --limit n`.
    Limit(u8),
}

#[derive(Clone, Debug)]
struct Replay {
    filter: Filter,
    force: bool,
    /// Ctrl-C after this many letters.
    stop_after: Option<u8>,
}

#[derive(Clone, Debug)]
enum Step {
    /// A letter for the account; `Some(n)`: the same body as the n-th letter (modulo their number).
    Arrive(usize, Option<usize>),
    MonoRefuses(usize, bool),
    Replay(Replay),
    Together(Replay, Replay),
    ReplayThenRestart(Replay),
    /// Every session of the database ends this many milliseconds into a replay (a failover): the
    /// replay's, the worker's pipeline's and its relay's, mid-transaction.
    ReplayWhileDatabaseFails(Replay, u8),
    Purge(Filter),
    Erase(usize),
}

fn filter() -> impl Strategy<Value = Filter> {
    prop_oneof![
        Just(Filter::All),
        (0..ACCOUNTS).prop_map(Filter::Account),
        (0..ACCOUNTS).prop_map(Filter::AllAndAccount),
        (1u8..4).prop_map(Filter::Limit),
    ]
}

fn replay_command() -> impl Strategy<Value = Replay> {
    (filter(), any::<bool>(), prop::option::weighted(0.25, 0u8..3))
        .prop_map(|(filter, force, stop_after)| Replay { filter, force, stop_after })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..ACCOUNTS, prop::option::weighted(0.3, 0usize..8)).prop_map(|(a, copy)| Step::Arrive(a, copy)),
        2 => (0..ACCOUNTS, any::<bool>()).prop_map(|(a, refuse)| Step::MonoRefuses(a, refuse)),
        4 => replay_command().prop_map(Step::Replay),
        2 => (replay_command(), replay_command()).prop_map(|(a, b)| Step::Together(a, b)),
        1 => replay_command().prop_map(Step::ReplayThenRestart),
        1 => (replay_command(), 0u8..40).prop_map(|(r, ms)| Step::ReplayWhileDatabaseFails(r, ms)),
        2 => filter().prop_map(Step::Purge),
        1 => (0..ACCOUNTS).prop_map(Step::Erase),
    ]
}

fn session() -> impl Strategy<Value = (Vec<usize>, Vec<Step>)> {
    (prop::collection::vec(0..ACCOUNTS, 1..7), prop::collection::vec(step(), 1..7))
}

fn account(n: usize) -> String {
    format!("64f0000000000000000000a{n}")
}

/// A Mono that refuses the accounts in `refusing` (400, as for an account that cannot be
/// re-authorised) and issues a token to the others, counting calls per account.
#[derive(Clone, Default)]
struct ScriptedMono {
    refusing: Arc<Mutex<HashSet<String>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Respond for ScriptedMono {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let account = request.url.path().split('/').nth(2).unwrap_or_default().to_owned();
        *self.calls.lock().unwrap().entry(account.clone()).or_default() += 1;
        if self.refusing.lock().unwrap().contains(&account) {
            ResponseTemplate::new(400)
                .set_body_json(serde_json::json!({ "message": "This account can not be re-authorised." }))
        } else {
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "token": format!("token-{}", Uuid::new_v4()) }))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Dead,
    /// Replayed (or just published): the worker has yet to apply it or let it die.
    Moving,
    Applied,
    Purged,
    Erased,
}

#[derive(Default)]
struct World {
    account_of: BTreeMap<Uuid, usize>,
    bodies: Vec<Vec<u8>>,
    place: BTreeMap<Uuid, Place>,
    /// Deliveries of each account that reached the worker (each may call Mono once).
    deliveries: HashMap<usize, usize>,
}

impl World {
    fn dead(&self) -> BTreeSet<Uuid> {
        self.place.iter().filter(|(_, p)| **p == Place::Dead).map(|(id, _)| *id).collect()
    }

    /// What the filter selects among the dead letters, by the model (a limit: any that many).
    fn matching(&self, filter: &Filter) -> BTreeSet<Uuid> {
        self.dead()
            .into_iter()
            .filter(|id| match filter {
                Filter::All | Filter::Limit(_) => true,
                Filter::Account(a) | Filter::AllAndAccount(a) => self.account_of[id] == *a,
            })
            .collect()
    }
}

fn dead_filter(filter: &Filter) -> DeadFilter {
    match filter {
        Filter::All => DeadFilter { all: true, ..Default::default() },
        Filter::Account(a) => DeadFilter { account: Some(account(*a)), ..Default::default() },
        Filter::AllAndAccount(a) => {
            DeadFilter { account: Some(account(*a)), all: true, ..Default::default() }
        }
        Filter::Limit(n) => DeadFilter { all: true, limit: Some(i64::from(*n)), ..Default::default() },
    }
}

fn plan(kind: Kind, force: bool) -> Plan {
    Plan { kind, batch_id: Uuid::now_v7(), actor: "model".into(), note: None, forced: force }
}

/// Runs one replay command as `worker dlq replay` does; returns its report and what it acted on.
async fn replay(world: &TestWorld, command: &Replay) -> (replay::Report, BTreeSet<Uuid>) {
    let letters = dead_filter(&command.filter).select(&world.pool).await.expect("dead letters are readable");
    let plan = plan(Kind::Replay, command.force);
    let stop = AtomicBool::new(command.stop_after == Some(0));
    let report =
        replay::replay_letters(&world.pool, &world.broker.topology, &plan, &letters, &stop, |acted| {
            if command.stop_after.is_some_and(|k| acted >= u64::from(k)) {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .await
        .expect("a replay's transactions commit");
    (report, acted_in(&world.pool, plan.batch_id).await)
}

async fn acted_in(pool: &PgPool, batch: Uuid) -> BTreeSet<Uuid> {
    let mut tries = 0;
    loop {
        let read =
            sqlx::query_scalar::<_, Uuid>("SELECT delivery_id FROM dead_letter_actions WHERE batch_id = $1")
                .bind(batch)
                .fetch_all(pool)
                .await;
        // Right after the sessions were ended, the pool may hand out one that is gone.
        match read {
            Ok(ids) => return ids.into_iter().collect(),
            Err(error) if tries < 5 => {
                tries += 1;
                tracing::debug!(%error, "reading the actions again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("actions are readable: {error}"),
        }
    }
}

/// Checks one command's acts against its selection.
fn check_selection(
    command: &Replay,
    matching: &BTreeSet<Uuid>,
    report: &replay::Report,
    acted: &BTreeSet<Uuid>,
    alone: bool,
) -> Result<(), TestCaseError> {
    prop_assert!(acted.is_subset(matching), "acted outside its selection: {acted:?} not within {matching:?}");
    prop_assert_eq!(report.acted as usize, acted.len(), "the report counts what was recorded");
    let wanted = match command.filter {
        Filter::Limit(n) => matching.len().min(usize::from(n)),
        _ => matching.len(),
    };
    let wanted = command.stop_after.map_or(wanted, |k| wanted.min(usize::from(k)));
    if alone {
        prop_assert_eq!(acted.len(), wanted, "a command alone acts on exactly what it selects");
        prop_assert!(report.skipped.is_empty(), "nothing is skipped when alone");
    } else if command.stop_after.is_none() {
        prop_assert_eq!(
            report.acted as usize + report.skipped.len(),
            report.selected,
            "every selected letter is accounted for"
        );
    }
    Ok(())
}

/// Waits until nothing moves: the outbox is empty and every moving letter is dead again or applied.
async fn settle(world: &TestWorld, letters: &mut World) -> Result<(), TestCaseError> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let outbox: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&world.pool).await.unwrap();
        let mut moving = 0;
        for (id, place) in letters.place.iter_mut().filter(|(_, p)| **p == Place::Moving) {
            let row: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dead_letters WHERE id = $1)")
                .bind(id)
                .fetch_one(&world.pool)
                .await
                .unwrap();
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM webhook_events WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&world.pool)
                    .await
                    .unwrap();
            match (row, status.as_deref()) {
                (true, Some("dead")) => *place = Place::Dead,
                (false, Some(status)) if status != "dead" => *place = Place::Applied,
                _ => moving += 1,
            }
        }
        if outbox == 0 && moving == 0 {
            return Ok(());
        }
        prop_assert!(
            tokio::time::Instant::now() < deadline,
            "{moving} letter(s) neither dead again nor applied, {outbox} outbox row(s), after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every letter in exactly the place the model says, and nothing else stored.
async fn check_places(world: &TestWorld, letters: &World) -> Result<(), TestCaseError> {
    for (id, place) in &letters.place {
        let row: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dead_letters WHERE id = $1)")
            .bind(id)
            .fetch_one(&world.pool)
            .await
            .unwrap();
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM webhook_events WHERE id = $1")
            .bind(id)
            .fetch_optional(&world.pool)
            .await
            .unwrap();
        match place {
            Place::Dead => prop_assert!(
                row && status.as_deref() == Some("dead"),
                "{id} should be dead: row {row}, journal {status:?}"
            ),
            Place::Applied => prop_assert!(
                !row && status.as_deref().is_some_and(|s| s != "dead"),
                "{id} should be applied: row {row}, journal {status:?}"
            ),
            Place::Purged => {
                prop_assert!(!row && status.is_none(), "{id} should be purged: row {row}, journal {status:?}")
            }
            Place::Erased => prop_assert!(!row, "{id} was erased but its row is back"),
            Place::Moving => prop_assert!(false, "{id} still moving after settling"),
        }
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(&world.pool).await.unwrap();
    prop_assert_eq!(rows as usize, letters.dead().len(), "no dead letter row the model does not know");
    Ok(())
}

/// The outcome a replayed letter had, in the dry run's words.
async fn outcome(world: &TestWorld, id: Uuid, place: Place) -> predict::Outcome {
    if place == Place::Dead {
        // Died again (Mono accepts the account): what no prediction says.
        return predict::Outcome::WouldFail;
    }
    let status: String = sqlx::query_scalar("SELECT status FROM webhook_events WHERE id = $1")
        .bind(id)
        .fetch_one(&world.pool)
        .await
        .unwrap();
    match status.as_str() {
        "processed" => predict::Outcome::Apply,
        "duplicate" => predict::Outcome::Duplicate,
        "stale" => predict::Outcome::Stale,
        _ => predict::Outcome::Ignored,
    }
}

async fn run_session(
    world: &mut TestWorld,
    mono: &ScriptedMono,
    first: &[usize],
    steps: &[Step],
) -> Result<(), TestCaseError> {
    sqlx::query(
        "TRUNCATE webhook_events, dead_letter_actions, dead_letters, outbox, accounts, account_erasures",
    )
    .execute(&world.pool)
    .await
    .unwrap();
    mono.calls.lock().unwrap().clear();
    *mono.refusing.lock().unwrap() = (0..ACCOUNTS).map(account).collect();
    let mut letters = World::default();
    for a in first {
        arrive(world, &mut letters, *a, None).await;
    }
    settle(world, &mut letters).await?;
    for step in steps {
        match step {
            Step::Arrive(a, copy) => arrive(world, &mut letters, *a, *copy).await,
            Step::MonoRefuses(a, refuse) => {
                let mut set = mono.refusing.lock().unwrap();
                if *refuse {
                    set.insert(account(*a))
                } else {
                    set.remove(&account(*a))
                };
            }
            Step::Replay(command) | Step::ReplayThenRestart(command) => {
                let matching = letters.matching(&command.filter);
                let selected = dead_filter(&command.filter).select(&world.pool).await.unwrap();
                let predicted =
                    predict::predict_all(&world.pool, &selected, command.force, Duration::from_secs(600))
                        .await
                        .expect("a dry run");
                let (report, acted) = replay(world, command).await;
                check_selection(command, &matching, &report, &acted, true)?;
                if matches!(step, Step::ReplayThenRestart(_)) {
                    world.stop_workers().await;
                    start(world).await;
                }
                moved(&mut letters, &acted);
                settle(world, &mut letters).await?;
                // The dry run saw what the replay did, account by account, when it replayed all it
                // predicted. Not for an account Mono refuses: the dry run does not call Mono, and a
                // copy that dies again changes what its body's other copies become.
                let refusing = mono.refusing.lock().unwrap().clone();
                if acted.len() == selected.len() {
                    let mut expected: BTreeMap<usize, Vec<String>> = BTreeMap::new();
                    let mut actual: BTreeMap<usize, Vec<String>> = BTreeMap::new();
                    for (letter, prediction) in selected.iter().zip(&predicted) {
                        let a = letters.account_of[&letter.id];
                        if refusing.contains(&account(a)) {
                            continue;
                        }
                        expected.entry(a).or_default().push(format!("{:?}", prediction.outcome));
                        let had = outcome(world, letter.id, letters.place[&letter.id]).await;
                        actual.entry(a).or_default().push(format!("{had:?}"));
                    }
                    for list in expected.values_mut().chain(actual.values_mut()) {
                        list.sort();
                    }
                    prop_assert_eq!(expected, actual, "the dry run's outcomes are the replay's");
                }
            }
            Step::ReplayWhileDatabaseFails(command, after_ms) => {
                let matching = letters.matching(&command.filter);
                let selected = dead_filter(&command.filter).select(&world.pool).await.unwrap();
                let plan = plan(Kind::Replay, command.force);
                let stop = AtomicBool::new(false);
                let url = world.database_url().await;
                let replaying = replay::replay_letters(
                    &world.pool,
                    &world.broker.topology,
                    &plan,
                    &selected,
                    &stop,
                    |_| {},
                );
                let failing = async {
                    tokio::time::sleep(Duration::from_millis(u64::from(*after_ms))).await;
                    use sqlx::Connection;
                    let mut admin = sqlx::PgConnection::connect(&url).await.expect("an admin session");
                    sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    )
                    .execute(&mut admin)
                    .await
                    .expect("sessions end");
                };
                let (replayed, ()) = tokio::join!(replaying, failing);
                let acted = acted_in(&world.pool, plan.batch_id).await;
                prop_assert!(acted.is_subset(&matching), "acted outside its selection: {acted:?}");
                if let Ok(report) = &replayed {
                    prop_assert_eq!(
                        report.acted as usize,
                        acted.len(),
                        "the report counts what was recorded"
                    );
                }
                moved(&mut letters, &acted);
                settle(world, &mut letters).await?;
            }
            Step::Together(a, b) => {
                let (matching_a, matching_b) = (letters.matching(&a.filter), letters.matching(&b.filter));
                let ((report_a, acted_a), (report_b, acted_b)) =
                    tokio::join!(replay(world, a), replay(world, b));
                check_selection(a, &matching_a, &report_a, &acted_a, false)?;
                check_selection(b, &matching_b, &report_b, &acted_b, false)?;
                prop_assert!(acted_a.is_disjoint(&acted_b), "two operators replayed one letter twice");
                let unlimited = |r: &Replay| !matches!(r.filter, Filter::Limit(_)) && r.stop_after.is_none();
                if unlimited(a) && unlimited(b) {
                    let both: BTreeSet<Uuid> = acted_a.union(&acted_b).copied().collect();
                    let wanted: BTreeSet<Uuid> = matching_a.union(&matching_b).copied().collect();
                    prop_assert_eq!(both, wanted, "together they replay all they selected");
                }
                moved(&mut letters, &acted_a);
                moved(&mut letters, &acted_b);
                settle(world, &mut letters).await?;
            }
            Step::Purge(filter) => {
                let matching = letters.matching(filter);
                let selected = dead_filter(filter).select(&world.pool).await.unwrap();
                let plan = plan(Kind::Purge, false);
                let report =
                    replay::purge_letters(&world.pool, &plan, &selected).await.expect("a purge commits");
                let acted = acted_in(&world.pool, plan.batch_id).await;
                let command = Replay { filter: filter.clone(), force: false, stop_after: None };
                check_selection(&command, &matching, &report, &acted, true)?;
                for id in &acted {
                    letters.place.insert(*id, Place::Purged);
                }
            }
            Step::Erase(a) => {
                // Something of the account is still stored (purged letters leave nothing).
                let known = letters.place.iter().any(|(id, place)| {
                    letters.account_of[id] == *a
                        && matches!(place, Place::Dead | Place::Applied | Place::Erased)
                });
                let erased = erase(&world.pool, &account(*a), "model", "generated erasure").await;
                prop_assert!(!known || erased.is_ok(), "erasing an account with letters fails: {erased:?}");
                let left: i64 = sqlx::query_scalar(
                    "SELECT (SELECT count(*) FROM dead_letters WHERE account_id = $1)
                          + (SELECT count(*) FROM outbox WHERE account_id = $1)",
                )
                .bind(account(*a))
                .fetch_one(&world.pool)
                .await
                .unwrap();
                prop_assert_eq!(left, 0, "an erased account leaves no dead letter and no outbox row");
                for (id, place) in letters.place.iter_mut() {
                    if letters.account_of[id] == *a && *place == Place::Dead {
                        *place = Place::Erased;
                    }
                }
            }
        }
        settle(world, &mut letters).await?;
        check_places(world, &letters).await?;
    }
    let calls = mono.calls.lock().unwrap().clone();
    for (a, deliveries) in &letters.deliveries {
        let made = calls.get(&account(*a)).copied().unwrap_or(0);
        prop_assert!(
            made <= *deliveries,
            "Mono was called {made} times for {} deliveries of account {a}",
            deliveries
        );
    }
    Ok(())
}

/// A new letter for account `a`, dying while Mono refuses it (applied otherwise).
async fn arrive(world: &TestWorld, letters: &mut World, a: usize, copy: Option<usize>) {
    let body = match copy.filter(|_| !letters.bodies.is_empty()) {
        Some(n) => letters.bodies[n % letters.bodies.len()].clone(),
        None => serde_json::to_vec(&serde_json::json!({
            "event": REAUTH,
            "data": { "account": { "_id": account(a) }, "n": letters.bodies.len() }
        }))
        .unwrap(),
    };
    let owner = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["data"]["account"]["_id"]
        .as_str()
        .map(|id| (0..ACCOUNTS).find(|n| account(*n) == id).unwrap())
        .unwrap();
    letters.bodies.push(body.clone());
    let meta = world.publish(&body).await;
    let id = meta.id.as_uuid();
    letters.account_of.insert(id, owner);
    letters.place.insert(id, Place::Moving);
    *letters.deliveries.entry(owner).or_default() += 1;
}

fn moved(letters: &mut World, acted: &BTreeSet<Uuid>) {
    for id in acted {
        letters.place.insert(*id, Place::Moving);
        *letters.deliveries.entry(letters.account_of[id]).or_default() += 1;
    }
}

async fn start(world: &mut TestWorld) {
    // Refusals must dead-letter, not open the breaker (that parks: another test's subject).
    world
        .start_worker_with(&[
            "--mono-circuit-consecutive-failures",
            "100000",
            "--mono-circuit-min-calls",
            "100000",
        ])
        .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn every_dead_letter_is_in_one_place_and_each_command_acts_on_what_it_selected(pool: PgPool) {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(10);
    let handle = tokio::runtime::Handle::current();
    let mut world = TestWorld::new(pool).await;
    let mono = ScriptedMono::default();
    Mock::given(method("POST")).respond_with(mono.clone()).mount(&world.mono).await;
    start(&mut world).await;
    let world = Arc::new(tokio::sync::Mutex::new(world));
    // The runner is synchronous; each session runs on this test's runtime, which this thread drives
    // while it waits for the runner's thread.
    let shared = world.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 30,
            ..Config::default()
        });
        runner.run(&session(), |(first, steps)| {
            handle.block_on(async {
                let mut world = shared.lock().await;
                run_session(&mut world, &mono, &first, &steps).await
            })
        })
    })
    .await
    .unwrap();
    world.lock().await.stop_workers().await;
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, session)) => {
            panic!("the operator's world and its model disagree: {reason}\nshrunk session: {session:#?}")
        }
        Err(error) => panic!("{error}"),
    }
}
