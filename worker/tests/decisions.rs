//! The worker's decisions against a reference model, over generated histories (proptest, shrinking).
//!
//! The model is the specification in docs/ARCHITECTURE.md ("The model"): one worker taking each
//! event once, in the order ingest received it. A body that comes again within the dedup window is
//! the same event only if nothing else was applied to its account between the two copies; a
//! `reauthorisation_required` for an unlinked account is ignored; every other event applies.
//!
//! The system under test is the worker's own decision code: `Processor::apply_batch` (load and lock,
//! `batch::decide`, the handlers, write, commit) on the real PostgreSQL, and `TokenFetcher` (single
//! flight) calling a stub Mono over HTTP. What the broker does is played by the harness, driven by
//! the generated choices: batches of any size taken from near the head of the queue in any order,
//! two at once now and then (batch slots, several workers: the row locks order them),
//! redelivered copies of one delivery, acks lost with a session (everything comes back), token fetches
//! that run late, Mono failing (the delivery goes to a retry tier and comes back at the tail) or
//! refusing (dead-lettered, then replayed by an operator with or without `--force`).
//!
//! After every batch: no ordering guard moved backwards, no stored token was replaced by one issued
//! earlier. After every history: every delivery is journaled exactly once and none is left dead;
//! each account is in the model's state (the flag and token of one with a forced replay aside);
//! each status and served time is what the order the worker settled the deliveries in gives (see
//! [`Taken`]); each stored token was issued for its account; Mono issued no more tokens than the
//! model counts re-auths (plus forced replays).
//!
//! `PROPTEST_CASES` raises the number of histories (a soak); the default keeps it under a minute.

use chrono::{DateTime, Duration as Span, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::method};

mod common;

use common::ScratchDatabase;
use shared::delivery::{AttemptHistory, DeliveryMeta};
use shared::retry::RetryPolicy;
use worker::batch::Candidate;
use worker::circuit::{BreakerSettings, CircuitBreaker};
use worker::commands::dlq::{DeadLetter, predict, replay};
use worker::db::dead_letters::NewDeadLetter;
use worker::event::IncomingEvent;
use worker::mono::{MonoClient, ReauthToken};
use worker::processor::Hold;
use worker::processor::{ItemOutcome, Processor};
use worker::token_path::{self, TokenStep};
use worker::tokens::{Flight, TokenFetcher, TokenOutcome};

/// The worker's default dedup window.
const WINDOW: Duration = Duration::from_secs(600);
const DATA_STATUSES: [&str; 3] = ["AVAILABLE", "PROCESSING", "PARTIAL"];

// ---------------------------------------------------------------------------------------------
// Histories

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Required,
    Reauthorized,
    Updated,
    SyncFailed,
    Connected,
    Unlinked,
}

/// One webhook as ingest received it. Bodies repeat: a re-auth event's body holds only the account,
/// and the other kinds take one of a few variants.
#[derive(Clone)]
struct Webhook {
    account: u8,
    kind: Kind,
    variant: u8,
    /// Milliseconds after the previous webhook (never 0: ingest's stamps order them).
    gap_ms: u32,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "+{}ms acct-{} {:?}/{}", self.gap_ms, self.account, self.kind, self.variant)
    }
}

/// What the stub Mono answers to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Token,
    /// 500: retried within the budget, then the delivery goes to a retry tier.
    Unavailable,
    /// 400: the account is refused; the delivery is dead-lettered.
    Refused,
}

#[derive(Clone, Debug)]
struct History {
    webhooks: Vec<Webhook>,
    /// Deliveries handed out twice (the broker redelivers what it cannot know was acked).
    redelivered: Vec<usize>,
    /// Mono's answers, call by call; a token once they run out.
    mono: Vec<Answer>,
    /// Whether the operator forces the n-th replay (one `worker dlq replay` over every dead letter).
    force: Vec<bool>,
    /// Every other decision of the broker and the scheduler: batch sizes, which ready delivery comes
    /// next, when a fetch runs, when a session is lost.
    choices: Vec<u8>,
}

fn webhook() -> impl Strategy<Value = Webhook> {
    let kind = prop_oneof![
        4 => Just(Kind::Required),
        3 => Just(Kind::Reauthorized),
        3 => Just(Kind::Updated),
        2 => Just(Kind::SyncFailed),
        1 => Just(Kind::Connected),
        1 => Just(Kind::Unlinked),
    ];
    let gap = prop_oneof![3 => 1..5_000u32, 1 => 60_000..700_000u32];
    (0..3u8, kind, 0..3u8, gap).prop_map(|(account, kind, variant, gap_ms)| Webhook {
        account,
        kind,
        variant,
        gap_ms,
    })
}

fn history() -> impl Strategy<Value = History> {
    let answer =
        prop_oneof![8 => Just(Answer::Token), 1 => Just(Answer::Unavailable), 1 => Just(Answer::Refused)];
    (
        proptest::collection::vec(webhook(), 1..24),
        proptest::collection::vec(any::<u8>(), 0..4),
        proptest::collection::vec(answer, 0..12),
        proptest::collection::vec(any::<bool>(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..120),
    )
        .prop_map(|(webhooks, redelivered, mono, force, choices)| {
            let redelivered = redelivered.into_iter().map(|r| usize::from(r) % webhooks.len()).collect();
            History { webhooks, redelivered, mono, force, choices }
        })
}

fn account_id(account: u8) -> String {
    format!("acct-{account}")
}

fn body_of(webhook: &Webhook) -> Vec<u8> {
    let account = account_id(webhook.account);
    let body = match webhook.kind {
        Kind::Required => serde_json::json!({
            "event": "mono.events.reauthorisation_required", "data": { "account": { "_id": account } } }),
        Kind::Reauthorized => serde_json::json!({
            "event": "mono.events.account_reauthorized", "data": { "account": { "_id": account } } }),
        Kind::Updated => serde_json::json!({
            "event": "mono.events.account_updated",
            "data": { "account": { "_id": account, "balance": 100 * u32::from(webhook.variant) },
                      "meta": { "data_status": DATA_STATUSES[usize::from(webhook.variant)] } } }),
        Kind::SyncFailed if webhook.variant == 0 => serde_json::json!({
            "event": "mono.events.sync_failed", "data": { "account": { "_id": account } } }),
        Kind::SyncFailed => serde_json::json!({
            "event": "mono.events.sync_failed",
            "data": { "account": { "_id": account },
                      "meta": { "data_status": DATA_STATUSES[usize::from(webhook.variant)] } } }),
        Kind::Connected => serde_json::json!({
            "event": "mono.events.account_connected",
            // An account belongs to one customer; the bodies differ in what else Mono sends.
            "data": { "account": { "_id": account, "institution": webhook.variant },
                      "customer": format!("cust-{}", webhook.account) } }),
        Kind::Unlinked => serde_json::json!({
            "event": "mono.events.account_unlinked", "data": { "account": { "_id": account } } }),
    };
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

/// The webhooks as ingest stamped them: an id and a receive time each, in receive order.
struct Stamped {
    webhook: Webhook,
    body: Vec<u8>,
    meta: DeliveryMeta,
}

fn stamp(history: &History, start: DateTime<Utc>) -> Vec<Stamped> {
    let mut at = start;
    history
        .webhooks
        .iter()
        .map(|webhook| {
            at += Span::milliseconds(i64::from(webhook.gap_ms));
            let body = body_of(webhook);
            let mut meta = DeliveryMeta::stamp(&body);
            meta.received_at = at;
            Stamped { webhook: webhook.clone(), body, meta }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The reference model

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ModelAccount {
    reauth_required: bool,
    has_token: bool,
    unlinked: bool,
    data_status: Option<String>,
    customer_id: Option<String>,
    connected: bool,
}

#[derive(Debug, Default)]
struct Model {
    accounts: BTreeMap<String, ModelAccount>,
    /// Per account, the receive time of the re-auth the model applied last (while it stands). Its
    /// token may be missing in the worker where a re-authorisation received before it was decided
    /// after it (journaled `stale`): that re-authorisation spends every token issued before it,
    /// and the re-auth's may be one (a copy of an earlier re-auth decided as its duplicate, or a
    /// fetch shared with an older delivery), so the account is flagged with none (the api fetches
    /// one on demand).
    last_required: BTreeMap<String, DateTime<Utc>>,
    /// Per account, the receive time of the re-authorisation the model applied last, and of the
    /// latest copy of it: the api serves the receive time of one re-authorisation between the two,
    /// or of an earlier copy chained to it within the window (decided in another order, a later
    /// copy is taken for the same re-authorisation: bodies carry no id). See [`earliest_copy`].
    reauthorized: BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)>,
    /// Per account, the receive times of its re-authorisations.
    reauthorisations: BTreeMap<String, Vec<DateTime<Utc>>>,
    /// Per account, the latest receive time of any re-authorisation: the customer spent every token
    /// issued before it.
    last_reauthorisation: BTreeMap<String, DateTime<Utc>>,
    /// Re-auths that may ask Mono for a token: the ones applied, the ones for an unlinked account (a
    /// worker cannot know that an unlink received before them will be applied after them), and the
    /// duplicates past the window of the copy that was applied.
    reauths: usize,
}

/// One worker, every event once, in receive order.
fn model(stamped: &[Stamped]) -> Model {
    let window = Span::from_std(WINDOW).expect("the window fits");
    let mut model = Model::default();
    // Per account: (received, body digest, applied) of every event taken so far.
    type Taken<'a> = Vec<(DateTime<Utc>, &'a str, bool)>;
    let mut seen: HashMap<u8, Taken<'_>> = HashMap::new();
    for event in stamped {
        let at = event.meta.received_at;
        let body = event.meta.body_sha256.as_str();
        let history = seen.entry(event.webhook.account).or_default();
        let copy_in_effect = |copy_applied: bool| {
            history.iter().any(|(copy_at, copy, applied)| {
                *copy == body
                    && (*applied || !copy_applied)
                    && at - *copy_at <= window
                    && !history.iter().any(|(between, other, applied)| {
                        *applied && *other != body && *between > *copy_at && *between < at
                    })
            })
        };
        let duplicate = copy_in_effect(false);
        // A worker knows only the copies settled before it decides: one decided before the copies
        // between it and the applied one may call Mono again once the window from that one is over.
        if event.webhook.kind == Kind::Required && duplicate && !copy_in_effect(true) {
            model.reauths += 1;
        }
        let id = account_id(event.webhook.account);
        if event.webhook.kind == Kind::Reauthorized {
            let last = model.last_reauthorisation.entry(id.clone()).or_insert(at);
            *last = (*last).max(at);
            model.reauthorisations.entry(id.clone()).or_default().push(at);
            if duplicate {
                if let Some((_, latest)) = model.reauthorized.get_mut(&id) {
                    *latest = (*latest).max(at);
                }
            } else {
                model.reauthorized.insert(id.clone(), (at, at));
            }
        }
        let account = model.accounts.entry(id.clone()).or_default();
        let mut applied = !duplicate;
        if !duplicate {
            let variant = usize::from(event.webhook.variant);
            match event.webhook.kind {
                Kind::Required if account.unlinked => {
                    // A worker cannot know that an unlink received earlier will be applied later.
                    model.reauths += 1;
                    applied = false;
                }
                Kind::Required => {
                    account.reauth_required = true;
                    account.has_token = true;
                    model.reauths += 1;
                    model.last_required.insert(id.clone(), at);
                }
                Kind::Reauthorized => {
                    account.reauth_required = false;
                    account.has_token = false;
                    model.last_required.remove(&id);
                }
                Kind::Updated => account.data_status = Some(DATA_STATUSES[variant].to_owned()),
                Kind::SyncFailed if variant == 0 => account.data_status = Some("FAILED".to_owned()),
                Kind::SyncFailed => account.data_status = Some(DATA_STATUSES[variant].to_owned()),
                Kind::Connected => {
                    account.connected = true;
                    account.customer_id = Some(format!("cust-{}", event.webhook.account));
                }
                Kind::Unlinked => {
                    account.unlinked = true;
                    account.reauth_required = false;
                    account.has_token = false;
                    model.last_required.remove(&id);
                }
            }
        }
        history.push((at, body, applied));
    }
    model
}

/// The earliest of `stamps` (one account's re-authorisations, in receive order: the same body) that
/// a chain of copies, each within the window of the next, links to `applied`: decided in another
/// order, any of them may be the one applied and the rest its duplicates.
fn earliest_copy(stamps: &[DateTime<Utc>], applied: DateTime<Utc>) -> DateTime<Utc> {
    let window = Span::from_std(WINDOW).expect("the window fits");
    let mut earliest = applied;
    for at in stamps.iter().rev().filter(|at| **at < applied) {
        if earliest - *at > window {
            break;
        }
        earliest = *at;
    }
    earliest
}

// ---------------------------------------------------------------------------------------------
// The stub Mono

/// Answers calls from a script, then with a fresh token each; counts the tokens it issued, and
/// remembers which account each was issued for.
#[derive(Clone)]
struct ScriptedMono {
    script: Arc<Mutex<VecDeque<Answer>>>,
    issued: Arc<AtomicUsize>,
    issued_for: Arc<Mutex<HashMap<String, String>>>,
}

impl Respond for ScriptedMono {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let answer = self.script.lock().unwrap().pop_front().unwrap_or(Answer::Token);
        match answer {
            Answer::Token => {
                let n = self.issued.fetch_add(1, Ordering::SeqCst);
                // `/accounts/{id}/reauthorise`
                let account = request.url.path().split('/').nth(2).unwrap_or_default().to_owned();
                self.issued_for.lock().unwrap().insert(format!("tok-{n}"), account);
                ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": format!("tok-{n}") }))
            }
            Answer::Unavailable => {
                ResponseTemplate::new(500).set_body_json(serde_json::json!({ "message": "down" }))
            }
            Answer::Refused => {
                ResponseTemplate::new(400).set_body_json(serde_json::json!({ "message": "account refused" }))
            }
        }
    }
}

/// The model's time: it plays a history's hours in a second, so Mono issues each token at the
/// latest receive time of what was handed out so far (no worker can ask for a token before the
/// delivery that needs it arrived), a millisecond later.
#[derive(Clone)]
struct PlayedTime(Arc<Mutex<DateTime<Utc>>>);

impl PlayedTime {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }

    fn reached(&self, received_at: DateTime<Utc>) {
        let mut now = self.0.lock().unwrap();
        *now = (*now).max(received_at + Span::milliseconds(1));
    }
}

fn token_fetcher(mono: &MockServer, time: &PlayedTime) -> TokenFetcher {
    let time = time.clone();
    let client = MonoClient::new(
        &mono.uri(),
        secrecy::SecretString::from("test_sk_model"),
        Duration::from_secs(5),
        Duration::from_millis(10),
    )
    .expect("a valid Mono URL")
    .with_clock(Arc::new(move || time.now()));
    // The breaker never opens here: whether Mono is down for everyone is not this test's question,
    // and an open breaker would make the outcome depend on the clock.
    let breaker = CircuitBreaker::new(
        BreakerSettings {
            window: Duration::from_secs(60),
            min_calls: usize::MAX,
            failure_ratio: 1.0,
            consecutive_failures: usize::MAX,
            open_for: Duration::from_millis(1),
            max_open_for: Duration::from_millis(1),
        },
        mono_client::MetricNames::WORKER,
    );
    let retries = RetryPolicy {
        initial_interval: Duration::from_millis(1),
        max_interval: Duration::from_millis(2),
        multiplier: 2.0,
        max_elapsed: Some(Duration::from_millis(5)),
    };
    TokenFetcher::new(client, breaker, retries, 16, mono_client::MetricNames::WORKER)
}

// ---------------------------------------------------------------------------------------------
// The harness: the broker and the pipeline around the worker's decision code

/// One delivery on its way, as the pipeline holds it.
struct Work {
    index: usize,
    event: IncomingEvent,
    token: Option<ReauthToken>,
    /// The token's fetch stays on offer to copies until this delivery settles (dropped with it).
    flight: Option<Flight>,
    forced: bool,
}

struct Choices<'a> {
    choices: std::slice::Iter<'a, u8>,
}

impl Choices<'_> {
    /// The next choice, or 0 once they run out (then the queue is simply taken in order).
    fn next(&mut self) -> usize {
        self.choices.next().copied().map_or(0, usize::from)
    }
}

/// What the harness saw, for the properties.
#[derive(Default)]
struct Run {
    forced_reauths: usize,
    /// Accounts with a forced replay: the receive-order model cannot say what their state is.
    forced_accounts: std::collections::BTreeSet<String>,
    /// Each delivery's last journaling by a batch.
    settled: HashMap<usize, Settlement>,
    /// Batches run so far.
    batches: usize,
    /// `worker dlq replay` commands run so far (each with one `--force` or none, as the CLI).
    replays: usize,
}

/// The guards and the stored token of every account, to check that they only move forward.
#[derive(Clone, Debug, Default, PartialEq, sqlx::FromRow)]
struct Progress {
    id: String,
    reauth_token: Option<String>,
    reauth_token_issued_at: Option<DateTime<Utc>>,
    reauth_state_received_at: Option<DateTime<Utc>>,
    data_state_received_at: Option<DateTime<Utc>>,
}

async fn progress(pool: &PgPool) -> BTreeMap<String, Progress> {
    let rows: Vec<Progress> = sqlx::query_as(
        "SELECT id, reauth_token, reauth_token_issued_at, reauth_state_received_at, data_state_received_at
         FROM accounts",
    )
    .fetch_all(pool)
    .await
    .expect("accounts are readable");
    rows.into_iter().map(|row| (row.id.clone(), row)).collect()
}

fn moved_forward(
    before: &BTreeMap<String, Progress>,
    after: &BTreeMap<String, Progress>,
) -> Result<(), String> {
    for (id, old) in before {
        let Some(new) = after.get(id) else { return Err(format!("account {id} disappeared")) };
        for (name, old_at, new_at) in [
            ("reauth_state_received_at", old.reauth_state_received_at, new.reauth_state_received_at),
            ("data_state_received_at", old.data_state_received_at, new.data_state_received_at),
        ] {
            if old_at.is_some() && (new_at.is_none() || new_at < old_at) {
                return Err(format!("{id}: {name} moved backwards from {old_at:?} to {new_at:?}"));
            }
        }
        if let (Some(old_token), Some(new_token)) = (&old.reauth_token, &new.reauth_token)
            && old_token != new_token
            && new.reauth_token_issued_at < old.reauth_token_issued_at
        {
            return Err(format!("{id}: token {old_token} replaced by {new_token}, issued earlier"));
        }
    }
    Ok(())
}

fn parse(stamped: &Stamped, index: usize, attempts: u32, forced: bool) -> Work {
    let history = AttemptHistory { previous_attempts: attempts, first_attempt_at: None };
    let event = IncomingEvent::parse_with(&stamped.body, &stamped.meta, &history, forced)
        .1
        .expect("generated bodies are events");
    Work { index, event, token: None, flight: None, forced }
}

fn outcome_name(outcome: &TokenOutcome) -> &'static str {
    match outcome {
        TokenOutcome::Token(_) => "token",
        TokenOutcome::Park { .. } => "park",
        TokenOutcome::Retry { .. } => "retry",
        TokenOutcome::Refused { .. } => "refused",
        TokenOutcome::Abandoned => "abandoned",
    }
}

/// The journal in receive order, and the harness's trace: what a failure is read with.
async fn report(pool: &PgPool, stamped: &[Stamped], trace: &[String]) -> String {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM webhook_events").fetch_all(pool).await.unwrap_or_default();
    let statuses: HashMap<Uuid, String> = rows.into_iter().collect();
    let mut lines = vec!["journal:".to_owned()];
    for (index, one) in stamped.iter().enumerate() {
        let status = statuses.get(&one.meta.id.as_uuid()).map_or("-", String::as_str);
        lines.push(format!("  #{index} {:?} body {} -> {status}", one.webhook, &one.meta.body_sha256[..6]));
    }
    lines.push("trace:".to_owned());
    lines.extend(trace.iter().map(|t| format!("  {t}")));
    lines.join("\n")
}

async fn run_history(pool: &PgPool, history: &History) -> Result<(), TestCaseError> {
    let mut trace = Vec::new();
    let mut stamped = Vec::new();
    let result = run_history_traced(pool, history, &mut stamped, &mut trace).await;
    match result {
        Err(TestCaseError::Fail(reason)) => {
            Err(TestCaseError::fail(format!("{reason}\n{}", report(pool, &stamped, &trace).await)))
        }
        other => other,
    }
}

async fn run_history_traced(
    pool: &PgPool,
    history: &History,
    stamped_out: &mut Vec<Stamped>,
    trace: &mut Vec<String>,
) -> Result<(), TestCaseError> {
    sqlx::query("TRUNCATE accounts, webhook_events").execute(pool).await.expect("tables truncate");
    let mono = MockServer::start().await;
    let script = ScriptedMono {
        script: Arc::new(Mutex::new(history.mono.iter().copied().collect())),
        issued: Arc::default(),
        issued_for: Arc::default(),
    };
    Mock::given(method("POST")).respond_with(script.clone()).mount(&mono).await;
    // Whole milliseconds, as ingest stamps them.
    let start = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now is a time");
    let time = PlayedTime(Arc::new(Mutex::new(start)));
    let tokens = token_fetcher(&mono, &time);
    let processor = Processor::new(pool.clone(), WINDOW);
    let never = CancellationToken::new();
    *stamped_out = stamp(history, start);
    let stamped: &[Stamped] = stamped_out;
    let expected = model(stamped);

    // The work queue, in publish order; copies the broker hands out twice go in right behind.
    let mut queue: VecDeque<Work> = VecDeque::new();
    for (index, one) in stamped.iter().enumerate() {
        queue.push_back(parse(one, index, 0, false));
        for _ in history.redelivered.iter().filter(|r| **r == index) {
            queue.push_back(parse(one, index, 0, false));
        }
    }
    let mut fetches: VecDeque<Work> = VecDeque::new();
    let mut dead: Vec<Work> = Vec::new();
    let mut choices = Choices { choices: history.choices.iter() };
    let mut run = Run::default();
    let mut before = progress(pool).await;
    // Mono refuses at most as often as its script says: replays end once it stops.
    let mut replays_left = history.mono.len() + 1;
    // What the dry run predicted for a replayed letter, until it is settled (or dead again).
    let mut predictions: HashMap<usize, predict::Outcome> = HashMap::new();
    let topology = shared::topology::Topology::new("model", vec![Duration::from_secs(30)], 10);

    for _ in 0..2_000 {
        if queue.is_empty() && fetches.is_empty() {
            if dead.is_empty() || replays_left == 0 {
                break;
            }
            // The operator replays every dead letter (`worker dlq replay`): the journal row goes,
            // a copy with the same id and receive time goes back to the work queue.
            replays_left -= 1;
            // `worker dlq replay --dry-run` first: each letter of its own account must then end as
            // predicted (letters of one account would change each other's prediction).
            let mut accounts: Vec<&str> = dead.iter().map(|letter| letter.event.account()).collect();
            accounts.sort_unstable();
            accounts.dedup();
            let one_per_account = accounts.len() == dead.len();
            let mut rows = Vec::new();
            for letter in &dead {
                let row =
                    DeadLetter::by_id(pool, letter.event.record.id).await.expect("dead letters are readable");
                prop_assert!(row.is_some(), "dead letter #{} has no row", letter.index);
                rows.push(row.expect("checked"));
            }
            // One command, one `--force`: its dry run and its replay use the same.
            let forced = history.force.get(run.replays).copied().unwrap_or(false);
            run.replays += 1;
            let predicted = predict::predict_all(pool, &rows, forced, WINDOW).await.expect("a prediction");
            if one_per_account {
                for (letter, prediction) in dead.iter().zip(&predicted) {
                    predictions.insert(letter.index, prediction.outcome);
                }
            }
            for letter in dead.drain(..) {
                let plan = replay::Plan {
                    kind: replay::Kind::Replay,
                    batch_id: Uuid::now_v7(),
                    actor: "model".into(),
                    note: None,
                    forced,
                };
                let replayed = replay::replay_one(pool, &topology, &plan, letter.event.record.id)
                    .await
                    .expect("the replay's transaction commits");
                prop_assert!(
                    matches!(replayed, replay::Replayed::Done { .. }),
                    "#{} was not replayed",
                    letter.index
                );
                // The relay: the copy leaves the outbox for the work queue.
                let published = sqlx::query("DELETE FROM outbox WHERE message_id = $1")
                    .bind(letter.event.record.id.to_string())
                    .execute(pool)
                    .await
                    .expect("the outbox is readable")
                    .rows_affected();
                prop_assert_eq!(published, 1, "#{} left no copy in the outbox", letter.index);
                if forced {
                    run.forced_accounts.insert(account_id(stamped[letter.index].webhook.account));
                    if stamped[letter.index].webhook.kind == Kind::Required {
                        run.forced_reauths += 1;
                    }
                }
                trace.push(format!("replay #{} forced={forced}", letter.index));
                queue.push_back(parse(&stamped[letter.index], letter.index, 0, forced));
            }
            continue;
        }
        let choice = choices.next();
        if !fetches.is_empty() && (queue.is_empty() || choice % 3 == 2) {
            // A fetch runs (late, maybe: its delivery's copies may have settled meanwhile).
            let mut work = fetches.pop_front().expect("not empty");
            // The pipeline's own token path: decided again with the flight on offer, a token the
            // batch would not store withdrawn or parked.
            let held = work.token.take().map(|token| (token, work.flight.take()));
            let (outcome, flight) =
                match token_path::next_step(&tokens, &processor, &work.event, held, &never).await {
                    TokenStep::Settled => {
                        trace.push(format!("fetch #{} -> settled meanwhile, no call", work.index));
                        queue.push_back(work);
                        continue;
                    }
                    TokenStep::Park(reason) => {
                        trace.push(format!("fetch #{} -> parked: {reason}", work.index));
                        let attempts = work.event.record.attempts as u32;
                        queue.push_back(parse(&stamped[work.index], work.index, attempts, work.forced));
                        continue;
                    }
                    TokenStep::Answer(outcome, flight) => (outcome, flight),
                };
            trace.push(format!("fetch #{} -> {}", work.index, outcome_name(&outcome)));
            match outcome {
                TokenOutcome::Token(token) => {
                    work.token = Some(token);
                    work.flight = flight;
                    // Back to the batcher: behind what the consumer took in meanwhile, or, with a
                    // small prefetch, ahead of what the broker still holds.
                    if choices.next().is_multiple_of(2) {
                        queue.push_back(work);
                    } else {
                        queue.push_front(work);
                    }
                }
                // A retry tier: the delivery comes back at the tail, its flight gone.
                TokenOutcome::Park { .. } | TokenOutcome::Retry { .. } => {
                    drop(flight);
                    let attempts = work.event.record.attempts as u32;
                    queue.push_back(parse(&stamped[work.index], work.index, attempts, work.forced));
                }
                TokenOutcome::Refused { reason, .. } => {
                    drop(flight);
                    let letter = NewDeadLetter {
                        id: work.event.record.id,
                        event: work.event.record.event.clone(),
                        account_id: work.event.record.account_id.clone(),
                        body: stamped[work.index].body.clone(),
                        body_sha256: work.event.record.body_sha256.clone(),
                        received_at: work.event.record.received_at,
                        headers: serde_json::json!({}),
                        reason: reason.clone(),
                        class: "permanent",
                        attempts: work.event.record.attempts,
                        first_attempt_at: None,
                    };
                    let hold = Hold {
                        until: tokio::time::Instant::now() + Duration::from_secs(3600),
                        release: &never,
                    };
                    prop_assert!(processor.bury(&work.event.record, &letter, &never, &hold).await.is_ok());
                    // Mono refused again: the dry run could not know (it does not call Mono).
                    predictions.remove(&work.index);
                    dead.push(work);
                }
                TokenOutcome::Abandoned => prop_assert!(false, "nothing is abandoned here"),
            }
            continue;
        }

        // A batch: up to four ready deliveries, each picked from near the head of the queue (several
        // consumers and prefetch reorder what is close; retry tiers reorder what is far). Now and
        // then a second batch runs beside it, as the worker's batch slots (and other workers) do:
        // the row locks order them, the harness cannot, so both count as one step for the order.
        let slots = if choice % 5 == 4 { 2 } else { 1 };
        let mut batches: Vec<Vec<Work>> = Vec::new();
        for _ in 0..slots {
            let size = 1 + (choices.next() / 3) % 4;
            let mut batch = Vec::new();
            while batch.len() < size && !queue.is_empty() {
                let pick = choices.next() % queue.len().min(3);
                batch.push(queue.remove(pick).expect("in range"));
            }
            if !batch.is_empty() {
                batches.push(batch);
            }
        }
        for work in batches.iter().flatten() {
            time.reached(work.event.received_at);
        }
        // No hold bound: the database here never fails for long.
        let hold = Hold { until: tokio::time::Instant::now() + Duration::from_secs(3600), release: &never };
        let all_outcomes = futures_util::future::join_all(batches.iter().map(|batch| {
            let candidates: Vec<Candidate<'_>> = batch
                .iter()
                .map(|work| Candidate { event: &work.event, token: work.token.as_ref() })
                .collect();
            let (processor, never, hold) = (&processor, &never, &hold);
            async move { processor.apply_batch(&candidates, never, hold).await }
        }))
        .await;
        run.batches += 1;
        for (batch, outcomes) in batches.into_iter().zip(all_outcomes) {
            token_path::spend_offers(&tokens, batch.iter().map(|work| &work.event).zip(&outcomes));
            let session_lost = choices.next() % 8 == 7;
            trace.push(format!(
                "batch {} {:?} -> {:?}{}",
                run.batches,
                batch.iter().map(|w| (w.index, w.token.is_some())).collect::<Vec<_>>(),
                outcomes.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
                if session_lost { ", session lost" } else { "" }
            ));
            for (work, outcome) in batch.into_iter().zip(outcomes) {
                if let ItemOutcome::Settled(_) = outcome {
                    run.settled.insert(work.index, Settlement { batch: run.batches, forced: work.forced });
                }
                match outcome {
                    ItemOutcome::Settled(_) | ItemOutcome::AlreadySettled => {
                        if session_lost {
                            // The ack never reached the broker: the delivery comes again, bare.
                            let attempts = work.event.record.attempts as u32;
                            queue.push_back(parse(&stamped[work.index], work.index, attempts, work.forced));
                        }
                    }
                    // With the token it brought, if any: the batch would not store it.
                    ItemOutcome::NeedsToken => fetches.push_back(work),
                    ItemOutcome::Refused { reason } => {
                        return Err(TestCaseError::fail(format!(
                            "the database refused a generated event: {reason}"
                        )));
                    }
                    ItemOutcome::Parked { .. } => {
                        let attempts = work.event.record.attempts as u32;
                        queue.push_back(parse(&stamped[work.index], work.index, attempts, work.forced));
                    }
                    ItemOutcome::Abandoned => prop_assert!(false, "nothing is abandoned here"),
                }
            }
        }
        let after = progress(pool).await;
        moved_forward(&before, &after).map_err(TestCaseError::fail)?;
        before = after;
    }
    prop_assert!(queue.is_empty() && fetches.is_empty(), "the history did not drain");

    // Every delivery journaled exactly once, none left dead.
    let journal: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM webhook_events")
        .fetch_all(pool)
        .await
        .expect("journal is readable");
    let journaled: HashMap<Uuid, &str> = journal.iter().map(|(id, status)| (*id, status.as_str())).collect();
    prop_assert_eq!(journaled.len(), stamped.len(), "one journal row per delivery: {:?}", journal);
    for one in stamped {
        let status = journaled.get(&one.meta.id.as_uuid());
        prop_assert!(
            status.is_some_and(|s| *s != "dead"),
            "delivery {} journaled as {:?}",
            one.meta.id,
            status
        );
    }

    // Each replay ended as its dry run predicted.
    for (index, predicted) in &predictions {
        let status = journaled.get(&stamped[*index].meta.id.as_uuid()).copied().unwrap_or("-");
        let expected = match predicted {
            predict::Outcome::Apply => "processed",
            predict::Outcome::Stale => "stale",
            predict::Outcome::Duplicate => "duplicate",
            predict::Outcome::Ignored => "ignored",
            predict::Outcome::WouldFail => "dead",
            // Only a notification's dead letter, which this model's histories never make.
            predict::Outcome::Resend => "not a webhook",
        };
        prop_assert_eq!(status, expected, "the replay of #{} ended otherwise than its dry run said", index);
    }

    // Mono was asked for no more tokens than the model has re-auths.
    let issued = script.issued.load(Ordering::SeqCst);
    prop_assert!(
        issued <= expected.reauths + run.forced_reauths,
        "Mono issued {} tokens for {} re-auths ({} forced)",
        issued,
        expected.reauths,
        run.forced_reauths
    );

    // No stored token was issued before a re-authorisation of its account (the customer spent
    // it), and each is one Mono issued for that account.
    let tokens_stored: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, reauth_token, reauth_token_issued_at FROM accounts WHERE reauth_token IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .expect("accounts are readable");
    let issued_for = script.issued_for.lock().unwrap().clone();
    for (id, token, issued_at) in &tokens_stored {
        prop_assert_eq!(
            issued_for.get(token),
            Some(id),
            "{} stores {}, issued for another account",
            id,
            token
        );
        if let Some(spent_before) = expected.last_reauthorisation.get(id) {
            prop_assert!(
                issued_at >= spent_before,
                "{} keeps a token issued at {}, before its re-authorisation at {}",
                id,
                issued_at,
                spent_before
            );
        }
    }

    // In the order the worker took the deliveries: each status is one that order gives, and the
    // times the api serves are the ones the journal implies. These hold with forced replays too.
    let taken = Taken { stamped, journaled: &journaled, settled: &run.settled };
    for index in 0..stamped.len() {
        taken.status_fits(index).map_err(TestCaseError::fail)?;
    }
    let served: Vec<Served> = sqlx::query_as(
        "SELECT id, reauthorized_at, data_updated_at, last_sync_failed_at, connected_at, unlinked_at
         FROM accounts ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("accounts are readable");
    for account in &served {
        taken.served_times_fit(account).map_err(TestCaseError::fail)?;
    }

    // Each account is in the receive-order model's state; where a re-auth's replay was forced (it
    // applies regardless of the order), its flag and token are not the model's to say.
    // The re-authorisation the api reports: the one the model applied last, or a copy of it.
    for account in served.iter().filter(|account| !run.forced_accounts.contains(&account.id)) {
        let id = &account.id;
        match (expected.reauthorized.get(id), account.reauthorized_at) {
            (None, None) => {}
            (Some((applied, latest)), Some(at)) => prop_assert!(
                earliest_copy(&expected.reauthorisations[id], *applied) <= at
                    && at <= *latest
                    && expected.reauthorisations[id].contains(&at),
                "{} reports reauthorized_at {}, not a re-authorisation the model allows ({}..{})",
                id,
                at,
                applied,
                latest
            ),
            (model, actual) => {
                prop_assert!(false, "{id} reports reauthorized_at {actual:?}, the model {model:?}")
            }
        }
    }
    type Row = (String, bool, bool, bool, Option<String>, Option<String>, bool);
    let stored: Vec<Row> = sqlx::query_as(
        "SELECT id, reauth_required, reauth_token IS NOT NULL, unlinked_at IS NOT NULL, data_status,
                customer_id, connected_at IS NOT NULL
         FROM accounts ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("accounts are readable");
    let actual: BTreeMap<String, ModelAccount> = stored
        .into_iter()
        .map(|(id, reauth_required, has_token, unlinked, data_status, customer_id, connected)| {
            (id, ModelAccount { reauth_required, has_token, unlinked, data_status, customer_id, connected })
        })
        .collect();
    let stale_reauthorisations: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT account_id, received_at FROM webhook_events
         WHERE event = 'mono.events.account_reauthorized' AND status = 'stale'",
    )
    .fetch_all(pool)
    .await
    .expect("the journal is readable");
    let mut expected_accounts = expected.accounts.clone();
    // Only re-auths are forced here: the rest of a forced account's state is the model's still.
    for id in &run.forced_accounts {
        if let (Some(model), Some(actual)) = (expected_accounts.get_mut(id), actual.get(id)) {
            (model.reauth_required, model.has_token) = (actual.reauth_required, actual.has_token);
        }
    }
    for (id, required_at) in &expected.last_required {
        let spent_after =
            stale_reauthorisations.iter().any(|(account, at)| account == id && at < required_at);
        if let (Some(model), Some(actual)) = (expected_accounts.get_mut(id), actual.get(id))
            && spent_after
            && model.has_token
            && !actual.has_token
        {
            model.has_token = false;
        }
    }
    prop_assert_eq!(actual, expected_accounts);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The order the worker took

/// When a batch last journaled a delivery: the harness's batch number (deliveries of one batch
/// share it, and the batch orders them itself) and whether its replay was forced.
#[derive(Clone, Copy, Debug)]
struct Settlement {
    batch: usize,
    forced: bool,
}

/// The times the api serves for one account.
#[derive(Debug, sqlx::FromRow)]
struct Served {
    id: String,
    reauthorized_at: Option<DateTime<Utc>>,
    data_updated_at: Option<DateTime<Utc>>,
    last_sync_failed_at: Option<DateTime<Utc>>,
    connected_at: Option<DateTime<Utc>>,
    unlinked_at: Option<DateTime<Utc>>,
}

/// The deliveries, their journal statuses and the order the worker settled them in. The rules are
/// the specification's (docs/ARCHITECTURE.md), read in that order rather than in receive order:
/// - an ordering guard per account and state (re-auth: required, reauthorized, unlinked; data:
///   updated, sync_failed) moves to the receive time of what was applied or restated as a copy,
///   and an unforced event received before it is `stale`: stale only where such an event settled
///   no later, and never `processed` where one settled strictly earlier;
/// - a `reauthorisation_required` for an account whose unlink, received before it, was applied
///   is `ignored`: only then, and never `processed` where that unlink settled strictly earlier;
/// - `duplicate` only where a copy of the body within the window settled no later.
///
/// Deliveries of one batch are taken in the batch's own order, which these rules leave open.
/// Where they cannot say: whether a copy that settled first should have made a `processed` one a
/// duplicate depends on what else was applied between the two (the receive-order model's state
/// comparison covers that).
struct Taken<'a> {
    stamped: &'a [Stamped],
    journaled: &'a HashMap<Uuid, &'a str>,
    settled: &'a HashMap<usize, Settlement>,
}

impl Taken<'_> {
    fn status(&self, index: usize) -> &str {
        self.journaled.get(&self.stamped[index].meta.id.as_uuid()).copied().unwrap_or("-")
    }

    fn at(&self, index: usize) -> DateTime<Utc> {
        self.stamped[index].meta.received_at
    }

    fn batch(&self, index: usize) -> usize {
        self.settled.get(&index).map_or(usize::MAX, |settled| settled.batch)
    }

    /// Other deliveries of the same account that settled before `index` (or, unless `strictly`,
    /// in the same batch).
    fn settled_before(&self, index: usize, strictly: bool) -> impl Iterator<Item = usize> + '_ {
        let account = self.stamped[index].webhook.account;
        let batch = self.batch(index);
        (0..self.stamped.len()).filter(move |other| {
            *other != index
                && self.stamped[*other].webhook.account == account
                && self.settled.contains_key(other)
                && if strictly { self.batch(*other) < batch } else { self.batch(*other) <= batch }
        })
    }

    /// Whether an event received after `index`, with the same guard, moved it before `index` settled.
    fn guard_passed(&self, index: usize, strictly: bool) -> bool {
        let class = guard(self.stamped[index].webhook.kind);
        class.is_some()
            && self.settled_before(index, strictly).any(|other| {
                guard(self.stamped[other].webhook.kind) == class
                    && self.at(other) > self.at(index)
                    && matches!(self.status(other), "processed" | "duplicate")
            })
    }

    /// Whether an unlink received before `index` was applied before `index` settled.
    fn unlinked_before(&self, index: usize, strictly: bool) -> bool {
        self.settled_before(index, strictly).any(|other| {
            self.stamped[other].webhook.kind == Kind::Unlinked
                && self.at(other) < self.at(index)
                && self.status(other) == "processed"
        })
    }

    fn status_fits(&self, index: usize) -> Result<(), String> {
        let one = &self.stamped[index];
        let Some(settled) = self.settled.get(&index) else {
            return Err(format!("#{index} was journaled by no batch"));
        };
        let (kind, status) = (one.webhook.kind, self.status(index));
        let fits = match status {
            "stale" => kind != Kind::Unlinked && !settled.forced && self.guard_passed(index, false),
            "ignored" => kind == Kind::Required && self.unlinked_before(index, false),
            "duplicate" => self.settled_before(index, false).any(|other| {
                self.stamped[other].meta.body_sha256 == one.meta.body_sha256
                    && (self.at(other) - self.at(index)).abs() <= Span::from_std(WINDOW).expect("fits")
            }),
            "processed" => {
                (kind == Kind::Unlinked || settled.forced || !self.guard_passed(index, true))
                    && !(kind == Kind::Required && self.unlinked_before(index, true))
            }
            _ => false,
        };
        if fits {
            Ok(())
        } else {
            Err(format!(
                "#{index} ({:?}, batch {}) journaled {status}: not what the order it was taken in gives",
                one.webhook, settled.batch
            ))
        }
    }

    /// The processed deliveries of `account` of `kind`.
    fn processed(&self, account: &str, kind: Kind) -> impl Iterator<Item = usize> + '_ {
        let account = account.to_owned();
        (0..self.stamped.len()).filter(move |index| {
            let one = &self.stamped[*index];
            account_id(one.webhook.account) == account
                && one.webhook.kind == kind
                && self.status(*index) == "processed"
        })
    }

    /// `unlinked_at` and `connected_at` are the earliest applied; `reauthorized_at` the latest of
    /// every re-authorisation taken in any way (a stale or duplicate one still says the customer
    /// re-authorised by then); `data_updated_at` and `last_sync_failed_at` those of the applied
    /// one settled last (forced replays may apply an older one last).
    fn served_times_fit(&self, served: &Served) -> Result<(), String> {
        let id = served.id.as_str();
        let earliest = |kind| self.processed(id, kind).map(|index| self.at(index)).min();
        let last_settled = |kind: Kind| {
            let last = self.processed(id, kind).map(|index| self.batch(index)).max();
            self.processed(id, kind)
                .filter(|index| Some(self.batch(*index)) == last)
                .map(|index| self.at(index))
                .collect::<Vec<_>>()
        };
        let fits_last = |at: Option<DateTime<Utc>>, kind| {
            let candidates = last_settled(kind);
            match at {
                None => candidates.is_empty(),
                Some(at) => candidates.contains(&at),
            }
        };
        let reauthorized = (0..self.stamped.len())
            .filter(|index| {
                let one = &self.stamped[*index];
                account_id(one.webhook.account) == id
                    && one.webhook.kind == Kind::Reauthorized
                    && matches!(self.status(*index), "processed" | "stale" | "duplicate")
            })
            .map(|index| self.at(index))
            .max();
        let checks = [
            ("unlinked_at", served.unlinked_at == earliest(Kind::Unlinked)),
            ("connected_at", served.connected_at == earliest(Kind::Connected)),
            ("reauthorized_at", served.reauthorized_at == reauthorized),
            ("data_updated_at", fits_last(served.data_updated_at, Kind::Updated)),
            ("last_sync_failed_at", fits_last(served.last_sync_failed_at, Kind::SyncFailed)),
        ];
        match checks.iter().find(|(_, fits)| !fits) {
            None => Ok(()),
            Some((name, _)) => {
                Err(format!("{id} serves {name} otherwise than its journal implies: {served:?}"))
            }
        }
    }
}

/// Which ordering guard an event kind is decided by (a connection by none).
fn guard(kind: Kind) -> Option<u8> {
    match kind {
        Kind::Required | Kind::Reauthorized | Kind::Unlinked => Some(0),
        Kind::Updated | Kind::SyncFailed => Some(1),
        Kind::Connected => None,
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn the_worker_decides_as_the_model_over_generated_histories() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let database = runtime.block_on(ScratchDatabase::create());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    // A failing history's seed is kept in `decisions.proptest-regressions` (committed) and played
    // first on every later run.
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        source_file: Some(file!()),
        ..Config::default()
    });
    let pool = database.pool.clone();
    let result = runner.run(&history(), |history| runtime.block_on(run_history(&pool, &history)));
    runtime.block_on(database.drop_it());
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, history)) => {
            panic!("the worker and the model disagree: {reason}\nshrunk history: {history:#?}")
        }
        Err(error) => panic!("{error}"),
    }
}
