//! The api's token logic against a model, over generated histories (proptest, shrinking; issue 19,
//! point 3).
//!
//! A history: up to three accounts, each flagged with a stored token of some age (none, fresh, below
//! `TOKEN_MIN_REMAINING_SECS`, below the 30 s floor, expired); then, at generated gaps, token
//! requests to either of **two api processes** over one database, and the worker's own re-auths.
//! The worker is not a dependency of the api's tests, so its re-auth is played with the SQL its
//! batch writes (`worker/src/db/batch.rs`, guard of `handlers/reauthorisation_required.rs`): lock
//! the row (`FOR UPDATE`), hold it a while, flag the account and store a token with the time Mono
//! issued it unless a token Mono issued later is stored, commit. Mono is a wiremock per process
//! with one shared script, call by call: a token (at once or slowly, past `TOKEN_DEADLINE_MS`), a
//! 5xx, a 4xx refusal, or no answer before the api's client gives up (`MONO_TIMEOUT_MS`); a token
//! once the script runs out. A trigger records every change of a stored token, with its time.
//!
//! Definitions. A token is *usable* at `t` if it works at least `TOKEN_MIN_REMAINING_SECS` after
//! `t`. A **refresh** of an account starts at a moment when the account has no usable token stored
//! and ends at the first answer of Mono for it after that, as the api sees it: a token, a 5xx, a
//! refusal, or its client giving up. A refresh that gets a token ends the account's need for Mono
//! (a stored token is usable for 8 minutes, longer than any history).
//!
//! Checked after each history:
//! - at most one Mono call per account per refresh: an account's calls never overlap (each starts
//!   after the previous one's answer), none starts after one answered with a token, and none starts
//!   while a usable token was stored at every moment since the previous answer (or the start);
//! - a stored token is never replaced by one Mono issued earlier (any writer, the worker included);
//! - no request gets a token with less than `TOKEN_MIN_REMAINING_SECS` left, except the documented
//!   fallback: `source: "stored"`, at least 30 s left, while Mono was unavailable to the request (a
//!   call for the account failed while it waited, or it waited for `TOKEN_DEADLINE_MS`); and a 503
//!   is not answered while such a fallback was stored throughout the request;
//! - every answer is a documented one (200 with a token, 422 `mono_refused` after Mono refused the
//!   account, 503 `mono_unavailable` with `Retry-After`), within the deadline plus the store's bound.
//!
//!
//! Time, failure and liveness (issue 28): Mono may also refuse our key (401) or throttle (429 with
//! `Retry-After` 0 or 1 s), which open the api's breaker at once (`MONO_CIRCUIT_OPEN_MS` 200 ms here);
//! a request may hang up at a random moment (its client closes the connection, and actix drops the
//! request at whatever await it was); and the app may ask for re-auth links as well as tokens. Checked
//! besides:
//! - a token answered is one Mono issued for that account (or the seed, or the worker's), never
//!   another account's; a link answered is one Mono made for that account;
//! - no advisory lock is held once every request has ended and every call has settled;
//! - liveness: once Mono answers normally again, a fresh request to each process for each account
//!   gets 200 within the longest opening of the breaker plus its deadline (an api that answers 503
//!   to everything fails this).
//!
//! Lock sessions broken: a step ends every session holding an account lock mid-history (the api
//! opens a new one); the one-call rules (tokens and links) then allow a second call for an account
//! whose lock went with the session while its call was out, and every other rule holds (liveness
//! included; no request may fail for the broken session: the api runs its lock statement again on
//! a new one).
//!
//! Accounts failing in a row open the breaker too: the model runs the api with
//! `MONO_CIRCUIT_CONSECUTIVE_FAILURES=2` (a history has three accounts at most), and a request after
//! two accounts' calls failed in a row may be answered as while Mono is unavailable.
//!
//! `PROPTEST_CASES` raises the number of histories (a soak); the default keeps it near a minute.

use chrono::{DateTime, Duration as Span, Utc};
use clap::Parser;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::method};

use api::config::ApiConfig;
use api::startup::Application;

const APP_KEY: &str = "mobile-key-0123456789";
/// `TOKEN_MIN_REMAINING_SECS` (its default) and the floor of the fallback.
const MIN_REMAINING: Span = Span::seconds(120);
const FLOOR: Span = Span::seconds(30);
const LIFETIME: Span = Span::minutes(10);
const MONO_TIMEOUT_MS: u64 = 600;
const DEADLINE_MS: u64 = 200;
/// A slow answer: past the deadline, well within the client's timeout.
const SLOW_MS: u64 = 300;
/// A hanging Mono answers long after the api's client gave up.
const HANG_MS: u64 = 2_000;
/// The api's client gives up `MONO_TIMEOUT_MS` after it sent the call, which Mono sees a little later.
const SEND_SLACK: Span = Span::milliseconds(100);
/// A change the trigger records is visible to others at its commit, a moment later.
const COMMIT_SLACK: Span = Span::milliseconds(20);
/// Longest an answer may take: the deadline, plus the store's `lock_timeout` and the issuance record.
const ANSWER_WITHIN: Span = Span::milliseconds(DEADLINE_MS as i64 + 2_500);
/// `MONO_CIRCUIT_OPEN_MS`, and the longest opening (12 times it, after failed probes).
const OPEN_MS: u64 = 200;
const MAX_OPEN: Span = Span::milliseconds(12 * OPEN_MS as i64);

// ---------------------------------------------------------------------------------------------
// Histories

/// The token an account starts with (it is always flagged).
#[derive(Clone, Copy, Debug)]
enum Seeded {
    Nothing,
    Fresh,
    BelowMinimum,
    BelowFloor,
    Expired,
}

impl Seeded {
    fn issued_ago(self) -> Option<Span> {
        match self {
            Self::Nothing => None,
            Self::Fresh => Some(Span::minutes(1)),
            Self::BelowMinimum => Some(Span::seconds(510)),
            Self::BelowFloor => Some(Span::seconds(585)),
            Self::Expired => Some(Span::minutes(11)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    /// A token request (or with `link`, a re-auth link request) whose client hangs up after
    /// `hang_up_ms` if set.
    Request { process: usize, account: usize, link: bool, hang_up_ms: Option<u16> },
    /// The worker applies a `reauthorisation_required` with a token Mono issued `issued_ago_ms` ago,
    /// holding the row lock `hold_ms`.
    Worker { account: usize, issued_ago_ms: u32, hold_ms: u16 },
    /// Every session holding an account lock is ended (a lock session broken mid-request, as a
    /// database failover or a killed backend does); the api opens a new one.
    KillLockSessions,
}

#[derive(Clone, Copy)]
struct Timed {
    gap_ms: u16,
    step: Step,
}

impl std::fmt::Debug for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Step::Request { process, account, link, hang_up_ms } => {
                let what = if link { "a link" } else { "a token" };
                write!(f, "+{}ms api-{process} asked {what} for acct-{account}", self.gap_ms)?;
                match hang_up_ms {
                    Some(ms) => write!(f, ", hanging up after {ms}ms"),
                    None => Ok(()),
                }
            }
            Step::Worker { account, issued_ago_ms, hold_ms } => write!(
                f,
                "+{}ms worker stores for acct-{account} a token issued {issued_ago_ms}ms ago (row lock {hold_ms}ms)",
                self.gap_ms
            ),
            Step::KillLockSessions => {
                write!(f, "+{}ms every session holding an account lock ends", self.gap_ms)
            }
        }
    }
}

/// Mono's answer to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Token {
        delay_ms: u64,
    },
    Unavailable {
        delay_ms: u64,
    },
    Refused,
    Hang,
    /// 401: Mono refuses our secret key.
    KeyRefused,
    /// 429 with `Retry-After`.
    Throttled {
        retry_after_secs: u8,
    },
}

impl Answer {
    /// When the api has the answer, after the call reached Mono (or gives up on it).
    fn settles_after(self) -> Span {
        let ms = match self {
            Self::Token { delay_ms } | Self::Unavailable { delay_ms } => delay_ms,
            Self::Refused | Self::KeyRefused | Self::Throttled { .. } => 0,
            Self::Hang => return Span::milliseconds(MONO_TIMEOUT_MS as i64) - SEND_SLACK,
        };
        Span::milliseconds(ms.min(MONO_TIMEOUT_MS) as i64)
    }
}

#[derive(Clone, Debug)]
struct History {
    accounts: Vec<Seeded>,
    steps: Vec<Timed>,
    mono: Vec<Answer>,
}

fn history() -> impl Strategy<Value = History> {
    let seeded = prop_oneof![
        Just(Seeded::Nothing),
        Just(Seeded::Fresh),
        Just(Seeded::BelowMinimum),
        Just(Seeded::BelowFloor),
        Just(Seeded::Expired),
    ];
    let gap = prop_oneof![3 => 0..15u16, 1 => 15..250u16];
    let issued_ago = prop_oneof![3 => 0..3_000u32, 1 => Just(510_000u32), 1 => Just(585_000u32)];
    let hang_up = prop_oneof![4 => Just(None), 1 => (0..250u16).prop_map(Some)];
    let step = prop_oneof![
        4 => (0..2usize, 0..3usize, prop::bool::weighted(0.25), hang_up)
            .prop_map(|(process, account, link, hang_up_ms)| Step::Request { process, account, link, hang_up_ms }),
        1 => (0..3usize, issued_ago, 0..150u16)
            .prop_map(|(account, issued_ago_ms, hold_ms)| Step::Worker { account, issued_ago_ms, hold_ms }),
        1 => Just(Step::KillLockSessions),
    ];
    let delay = prop::sample::select(vec![0u64, 60, SLOW_MS]);
    let answer = prop_oneof![
        4 => delay.clone().prop_map(|delay_ms| Answer::Token { delay_ms }),
        2 => delay.prop_map(|delay_ms| Answer::Unavailable { delay_ms }),
        1 => Just(Answer::Refused),
        1 => Just(Answer::Hang),
        1 => Just(Answer::KeyRefused),
        1 => (0..2u8).prop_map(|retry_after_secs| Answer::Throttled { retry_after_secs }),
    ];
    (
        prop::collection::vec(seeded, 1..=3),
        prop::collection::vec((gap, step).prop_map(|(gap_ms, step)| Timed { gap_ms, step }), 1..10),
        prop::collection::vec(answer, 0..8),
    )
        .prop_map(|(accounts, mut steps, mono)| {
            let n = accounts.len();
            for timed in &mut steps {
                timed.step = match timed.step {
                    Step::Request { process, account, link, hang_up_ms } => {
                        Step::Request { process, account: account % n, link, hang_up_ms }
                    }
                    Step::Worker { account, issued_ago_ms, hold_ms } => {
                        Step::Worker { account: account % n, issued_ago_ms, hold_ms }
                    }
                    Step::KillLockSessions => Step::KillLockSessions,
                };
            }
            History { accounts, steps, mono }
        })
}

// ---------------------------------------------------------------------------------------------
// Mono, scripted

#[derive(Clone)]
struct Call {
    process: usize,
    account: String,
    /// A re-auth link (`initiate`), not a token.
    link: bool,
    at: DateTime<Utc>,
    answer: Answer,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} api-{} asked Mono for {}{}: {:?}",
            clock(self.at),
            self.process,
            if self.link { "a link for " } else { "" },
            self.account,
            self.answer
        )
    }
}

impl Call {
    fn settled(&self) -> DateTime<Utc> {
        self.at + self.answer.settles_after()
    }
}

#[derive(Default)]
struct Script {
    answers: VecDeque<Answer>,
    calls: Vec<Call>,
}

/// One process's Mono; every process's calls take the next answer of the shared script.
struct ScriptedMono {
    process: usize,
    script: Arc<Mutex<Script>>,
}

impl Respond for ScriptedMono {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let link = request.url.path() == "/v2/accounts/initiate";
        let account = if link {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
            body["account"].as_str().unwrap_or_default().to_owned()
        } else {
            request.url.path().split('/').nth(2).unwrap_or_default().to_owned()
        };
        let mut script = self.script.lock().unwrap();
        let answer = script.answers.pop_front().unwrap_or(Answer::Token { delay_ms: 0 });
        let n = script.calls.len();
        script.calls.push(Call { process: self.process, account, link, at: Utc::now(), answer });
        let delay = |ms| Duration::from_millis(ms);
        match answer {
            Answer::Token { delay_ms } if link => ResponseTemplate::new(200)
                .set_body_json(
                    serde_json::json!({ "data": { "mono_url": format!("https://link.mono.co/mono-{n}") } }),
                )
                .set_delay(delay(delay_ms)),
            Answer::Token { delay_ms } => ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "token": format!("mono-{n}") }))
                .set_delay(delay(delay_ms)),
            Answer::Unavailable { delay_ms } => ResponseTemplate::new(503).set_delay(delay(delay_ms)),
            Answer::Refused => ResponseTemplate::new(400)
                .set_body_json(serde_json::json!({ "message": "This account can not be re-authorised." })),
            Answer::Hang => ResponseTemplate::new(503).set_delay(delay(HANG_MS)),
            Answer::KeyRefused => ResponseTemplate::new(401),
            Answer::Throttled { retry_after_secs } => {
                ResponseTemplate::new(429).insert_header("retry-after", retry_after_secs.to_string())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a history

struct Answered {
    step: usize,
    process: usize,
    account: String,
    link: bool,
    /// The client closed the connection before an answer: nothing to check but what it left.
    hung_up: bool,
    sent: DateTime<Utc>,
    answered: DateTime<Utc>,
    status: u16,
    retry_after: bool,
    body: serde_json::Value,
}

impl std::fmt::Debug for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: api-{} for {}{}, sent {}, answered {}: {} {}",
            self.step,
            self.process,
            if self.link { "a link for " } else { "" },
            self.account,
            clock(self.sent),
            clock(self.answered),
            self.status,
            self.body
        )
    }
}

/// A stored token from `from` on (`None`: no token), as the trigger recorded it.
#[derive(Clone)]
struct Stored {
    account: String,
    from: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let expires =
            self.expires_at.map_or_else(|| "no token".to_owned(), |at| format!("expires {}", clock(at)));
        write!(f, "{} {}: {expires}", clock(self.from), self.account)
    }
}

fn clock(at: DateTime<Utc>) -> String {
    at.format("%H:%M:%S%.3f").to_string()
}

struct App {
    address: String,
    cancel: CancellationToken,
}

/// A history that fails part-way still stops its processes (and so closes their pools).
impl Drop for App {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn spawn_app(options: &PgConnectOptions, mono: &MockServer) -> App {
    let config = ApiConfig::parse_from([
        "api",
        "--listen-addr=127.0.0.1:0",
        "--metrics-addr=127.0.0.1:0",
        &format!("--app-api-keys=mobile:{APP_KEY}"),
        "--mono-secret-key=test_sk_0123456789",
        &format!("--mono-api-url={}", mono.uri()),
        // One call per refresh: every call Mono sees was a request's own.
        "--mono-retry-budget-ms=0",
        &format!("--mono-timeout-ms={MONO_TIMEOUT_MS}"),
        &format!("--token-deadline-ms={DEADLINE_MS}"),
        &format!("--token-min-remaining-secs={}", MIN_REMAINING.num_seconds()),
        &format!("--mono-circuit-open-ms={OPEN_MS}"),
        // Two accounts failing in a row open the breaker: a history has three accounts at most.
        "--mono-circuit-consecutive-failures=2",
        // Every request of the liveness check may ask Mono again, even for an account it refused.
        "--mono-refusal-memory-secs=0",
        "--http-workers=1",
    ]);
    let pool = PgPoolOptions::new().max_connections(5).connect_with(options.clone()).await.unwrap();
    let cancel = CancellationToken::new();
    let app = Application::build(config, pool, cancel.clone()).await.expect("the api builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    App { address, cancel }
}

async fn ask(http: &reqwest::Client, app: &str, account: &str) -> (u16, bool, serde_json::Value) {
    ask_for(http, app, account, false, None).await
}

/// A token (or a link) request whose client hangs up after `hang_up_ms` (status 0 then).
async fn ask_for(
    http: &reqwest::Client,
    app: &str,
    account: &str,
    link: bool,
    hang_up_ms: Option<u16>,
) -> (u16, bool, serde_json::Value) {
    let what = if link { "reauth-link" } else { "reauth-token" };
    let timeout = hang_up_ms.map_or(Duration::from_secs(10), |ms| Duration::from_millis(ms.into()));
    let sent = http
        .post(format!("{app}/v1/accounts/{account}/{what}"))
        .bearer_auth(APP_KEY)
        .timeout(timeout)
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response.headers().contains_key("retry-after");
            (status, retry_after, response.json().await.unwrap_or_default())
        }
        Err(error) => (0, false, serde_json::json!({ "no answer": error.to_string() })),
    }
}

/// A flagged account, with the token `seed-<id>` if `issued_at`.
async fn seed(pool: &PgPool, id: &str, issued_at: Option<DateTime<Utc>>) {
    sqlx::query(
        "INSERT INTO accounts (id, reauth_required, reauth_token, reauth_token_issued_at, reauth_token_expires_at,
                               reauth_state_received_at)
         VALUES ($1, true, $2, $3, $3 + interval '10 minutes', now())",
    )
    .bind(id)
    .bind(issued_at.map(|_| format!("seed-{id}")))
    .bind(issued_at)
    .execute(pool)
    .await
    .unwrap();
}

/// The worker's re-auth, as its batch writes it.
async fn store_as_the_worker(pool: &PgPool, id: &str, token: &str, issued_at: DateTime<Utc>, hold: Duration) {
    let mut tx = pool.begin().await.unwrap();
    let (stored, stored_issued_at): (Option<String>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT reauth_token, reauth_token_issued_at FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    // The rest of the batch: other accounts, the journal.
    tokio::time::sleep(hold).await;
    let later_stored = stored.is_some() && stored_issued_at.is_some_and(|at| at > issued_at);
    let (token, issued_at) =
        if later_stored { (stored, stored_issued_at) } else { (Some(token.to_owned()), Some(issued_at)) };
    sqlx::query(
        "UPDATE accounts SET reauth_required = true, reauth_token = $2, reauth_token_issued_at = $3,
                reauth_token_expires_at = $3 + interval '10 minutes', reauth_state_received_at = clock_timestamp(),
                updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(id)
    .bind(token)
    .bind(issued_at)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn run_history(
    pool: &PgPool,
    options: &PgConnectOptions,
    case: usize,
    history: &History,
) -> Result<(), TestCaseError> {
    let ids: Vec<String> = (0..history.accounts.len()).map(|i| format!("c{case}-acct-{i}")).collect();
    let start = Utc::now();
    let mut initial = Vec::new();
    for (id, seeded) in ids.iter().zip(&history.accounts) {
        let issued_at = seeded.issued_ago().map(|ago| start - ago);
        seed(pool, id, issued_at).await;
        initial.push(Stored {
            account: id.clone(),
            from: start,
            expires_at: issued_at.map(|at| at + LIFETIME),
        });
    }
    let script =
        Arc::new(Mutex::new(Script { answers: history.mono.iter().copied().collect(), calls: vec![] }));
    let mut monos = Vec::new();
    let mut apps = Vec::new();
    for process in 0..2 {
        let mono = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ScriptedMono { process, script: script.clone() })
            .mount(&mono)
            .await;
        apps.push(spawn_app(options, &mono).await);
        monos.push(mono);
    }

    let http = reqwest::Client::new();
    let mut requests = Vec::new();
    let mut workers = Vec::new();
    let mut worker_tokens: Vec<(String, String)> = Vec::new();
    let mut kills: Vec<DateTime<Utc>> = Vec::new();
    for (index, timed) in history.steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(timed.gap_ms.into())).await;
        match timed.step {
            Step::Request { process, account, link, hang_up_ms } => {
                let (http, app, account) =
                    (http.clone(), apps[process].address.clone(), ids[account].clone());
                requests.push(tokio::spawn(async move {
                    let sent = Utc::now();
                    let (status, retry_after, body) = ask_for(&http, &app, &account, link, hang_up_ms).await;
                    let answered = Utc::now();
                    let hung_up = status == 0 && hang_up_ms.is_some();
                    Answered {
                        step: index,
                        process,
                        account,
                        link,
                        hung_up,
                        sent,
                        answered,
                        status,
                        retry_after,
                        body,
                    }
                }));
            }
            Step::Worker { account, issued_ago_ms, hold_ms } => {
                let (pool, id) = (pool.clone(), ids[account].clone());
                let issued_at = Utc::now() - Span::milliseconds(issued_ago_ms.into());
                worker_tokens.push((id.clone(), format!("worker-{index}")));
                workers.push(tokio::spawn(async move {
                    let token = format!("worker-{index}");
                    store_as_the_worker(&pool, &id, &token, issued_at, Duration::from_millis(hold_ms.into()))
                        .await
                }));
            }
            Step::KillLockSessions => {
                kills.push(Utc::now());
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks
                     WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                )
                .execute(pool)
                .await
                .unwrap();
            }
        }
    }
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    for worker in workers {
        worker.await.unwrap();
    }
    // A call outlives its request (it is stored for the next one): let every one settle and store.
    let last = script.lock().unwrap().calls.iter().map(Call::settled).max();
    if let Some(wait) = last.and_then(|last| (last - Utc::now() + Span::milliseconds(300)).to_std().ok()) {
        tokio::time::sleep(wait).await;
    }
    // No request is under way and every call has settled: no lock may stay held. A dropped
    // request's unlock runs in the background, so it gets a moment on a loaded machine; a leaked
    // lock stays held for as long as its session lives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let held = loop {
        let held: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT classid::bigint, objid::bigint FROM pg_locks
             WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        if held.is_empty() || tokio::time::Instant::now() >= deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let calls = script.lock().unwrap().calls.clone();
    prop_assert!(
        held.is_empty(),
        "advisory locks held after every request ended: {held:?}\ncalls: {calls:#?}\nanswers: {answers:#?}"
    );
    // Liveness: Mono answers normally from here on (the script is used up or dropped).
    script.lock().unwrap().answers.clear();
    let recovered = Utc::now();
    for app in &apps {
        for id in &ids {
            // Whatever is stored now works 10 s more, too little to hand out even as the fallback:
            // only a call to Mono through this process's breaker can answer 200.
            sqlx::query(
                "UPDATE accounts SET reauth_token_issued_at = now() - interval '590 seconds',
                        reauth_token_expires_at = now() + interval '10 seconds'
                 WHERE id = $1 AND reauth_token IS NOT NULL",
            )
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
            let within = MAX_OPEN + Span::milliseconds(DEADLINE_MS as i64 + 500);
            let mut last = None;
            while Utc::now() - recovered < within {
                let answer = ask(&http, &app.address, id).await;
                if answer.0 == 200 {
                    last = None;
                    break;
                }
                last = Some(answer);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            prop_assert!(
                last.is_none(),
                "{id}: no 200 within {within} of Mono answering normally again, last {last:?}\ncalls: {calls:#?}\nanswers: {answers:#?}"
            );
        }
    }
    for app in &apps {
        app.cancel.cancel();
    }

    type Change =
        (String, DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<DateTime<Utc>>);
    let changes: Vec<Change> = sqlx::query_as(
        "SELECT account_id, at, old_issued_at, new_issued_at, new_expires_at FROM model_token_changes
         WHERE account_id = ANY($1) ORDER BY seq",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .unwrap();
    // A stored token is never replaced by one Mono issued earlier.
    for (account, at, old, new, _) in &changes {
        if let (Some(old), Some(new)) = (old, new) {
            prop_assert!(new >= old, "{account}: at {at} a token issued {new} replaced one issued {old}");
        }
    }
    let mut stored = initial;
    stored.extend(changes.into_iter().map(|(account, at, _, _, expires_at)| Stored {
        account,
        from: at,
        expires_at,
    }));
    let issued = |account: &str, token: &str| {
        token == format!("seed-{account}")
            || worker_tokens.iter().any(|(a, t)| a == account && t == token)
            || calls.iter().enumerate().any(|(n, c)| {
                c.account == account
                    && !c.link
                    && matches!(c.answer, Answer::Token { .. })
                    && token == format!("mono-{n}")
            })
    };
    for answer in answers.iter().filter(|a| a.status == 200) {
        if answer.link {
            let url = answer.body["url"].as_str().unwrap_or_default();
            let made = calls.iter().enumerate().any(|(n, c)| {
                c.account == answer.account
                    && c.link
                    && matches!(c.answer, Answer::Token { .. })
                    && url == format!("https://link.mono.co/mono-{n}")
            });
            prop_assert!(made, "a link Mono did not make for this account: {answer:?}\ncalls: {calls:#?}");
        } else {
            let token = answer.body["token"].as_str().unwrap_or_default();
            prop_assert!(
                issued(&answer.account, token),
                "a token not issued for this account: {answer:?}\ncalls: {calls:#?}"
            );
        }
    }
    check(&calls, &answers, &stored, &kills).map_err(|failure| {
        TestCaseError::fail(format!(
            "{failure}\ncalls: {calls:#?}\nanswers: {answers:#?}\nstored: {stored:#?}"
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Whether the account's stored token was usable, with `min` left, at every moment of `[from, to]`.
/// A change counts from a moment after the trigger saw it (its commit), which errs towards the
/// state before it: the one the api may still have read.
fn usable_throughout(
    stored: &[Stored],
    account: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    min: Span,
) -> bool {
    let mine: Vec<&Stored> = stored.iter().filter(|s| s.account == account).collect();
    let begins = |i: usize| if i == 0 { mine[0].from } else { mine[i].from + COMMIT_SLACK };
    (0..mine.len()).all(|i| {
        let ends = if i + 1 < mine.len() { begins(i + 1).min(to) } else { to };
        let in_window = begins(i) <= to && ends >= from;
        !in_window || mine[i].expires_at.is_some_and(|expires| expires >= ends + min)
    })
}

fn check(
    all_calls: &[Call],
    answers: &[Answered],
    stored: &[Stored],
    kills: &[DateTime<Utc>],
) -> Result<(), String> {
    // A lock session that ends takes its locks with it: another process may then call Mono for
    // the account while the first call is out, once (ARCHITECTURE: "at worst a second call").
    let killed_between =
        |from: DateTime<Utc>, to: DateTime<Utc>| kills.iter().any(|k| *k >= from && *k <= to);
    let history_start = stored.iter().map(|s| s.from).min().unwrap_or_else(Utc::now);
    // A link's calls have rules of their own (below); the token rules are about token calls.
    let calls: Vec<Call> = all_calls.iter().filter(|c| !c.link).cloned().collect();
    let calls = calls.as_slice();
    for (k, call) in all_calls.iter().enumerate().filter(|(_, c)| c.link) {
        let overlapping = all_calls[..k].iter().rfind(|c| c.link && c.account == call.account);
        if let Some(previous) = overlapping
            && call.at < previous.settled()
            // A link takes the account's lock too: the same one allowance when it went.
            && !killed_between(previous.at - COMMIT_SLACK, call.at)
        {
            return Err(format!("two link calls for {} at once: {previous:?} and {call:?}", call.account));
        }
    }
    // At most one Mono call per account per refresh.
    for (k, call) in calls.iter().enumerate() {
        let previous = calls[..k].iter().rfind(|c| c.account == call.account);
        if previous.is_some_and(|previous| killed_between(previous.at - COMMIT_SLACK, call.at)) {
            // The second call of a refresh whose lock went with its session: allowed, once.
            continue;
        }
        if let Some(previous) = previous {
            if call.at < previous.settled() {
                return Err(format!(
                    "two Mono calls for {} at once: {previous:?} and {call:?}",
                    call.account
                ));
            }
            if matches!(previous.answer, Answer::Token { .. }) {
                return Err(format!(
                    "Mono was asked for {} again after it issued a token: {call:?}",
                    call.account
                ));
            }
        }
        let since = previous.map_or(history_start, Call::settled);
        if usable_throughout(stored, &call.account, since, call.at, MIN_REMAINING) {
            return Err(format!(
                "Mono was asked for {} while a usable token was stored: {call:?}",
                call.account
            ));
        }
    }
    for answer in answers.iter().filter(|a| !a.hung_up) {
        let took = answer.answered - answer.sent;
        if took > ANSWER_WITHIN {
            return Err(format!("an answer took {took}: {answer:?}"));
        }
        // Mono was unavailable to this request: a call for its account failed while it waited, or it
        // waited until its deadline.
        let mono_failed = calls.iter().any(|c| {
            c.account == answer.account
                && !matches!(c.answer, Answer::Token { .. })
                && c.at <= answer.answered
                && c.settled() + Span::milliseconds(50) >= answer.sent
        });
        let waited_to_deadline = took >= Span::milliseconds(DEADLINE_MS as i64 - 20);
        // The breaker was opened (our key refused, a 429) no longer than its longest opening before:
        // Mono is unavailable to every request of the process, whatever its account.
        let breaker_open = all_calls.iter().any(|c| {
            matches!(c.answer, Answer::KeyRefused | Answer::Throttled { .. })
                && c.at <= answer.answered
                && c.settled() + MAX_OPEN >= answer.sent
        });
        // Or two accounts' calls failed in a row (a 5xx, no answer), the second no longer than the
        // longest opening before: the streak opens it too.
        let failing = |c: &Call| matches!(c.answer, Answer::Unavailable { .. } | Answer::Hang);
        let streak_open = all_calls.iter().enumerate().any(|(k, second)| {
            failing(second)
                && second.at <= answer.answered
                && second.settled() + MAX_OPEN >= answer.sent
                && all_calls[..k].iter().any(|first| failing(first) && first.account != second.account)
        });
        let breaker_open = breaker_open || streak_open;
        let unavailable = mono_failed || waited_to_deadline || breaker_open;
        let error = answer.body["error"].as_str().unwrap_or_default();
        if answer.link {
            match (answer.status, error) {
                (200, _) if answer.body["url"].is_string() => {}
                (422, "mono_refused")
                    if all_calls.iter().any(|c| {
                        c.link
                            && c.account == answer.account
                            && c.answer == Answer::Refused
                            && c.at <= answer.answered
                    }) => {}
                (503, "mono_unavailable") if answer.retry_after => {}
                _ => return Err(format!("a link answer the api does not document for this: {answer:?}")),
            }
            continue;
        }
        match (answer.status, error) {
            (200, _) => {
                let source = answer.body["source"].as_str().unwrap_or_default();
                let expires_at = answer.body["expires_at"]
                    .as_str()
                    .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
                    .map(|at| at.with_timezone(&Utc));
                let (Some(expires_at), Some(_)) = (expires_at, answer.body["token"].as_str()) else {
                    return Err(format!("a 200 without a token: {answer:?}"));
                };
                if !["stored", "fresh"].contains(&source) {
                    return Err(format!("an unknown source: {answer:?}"));
                }
                // The api judged the token after the request was sent: measure from then.
                let left = expires_at - answer.sent;
                if left < MIN_REMAINING {
                    let fallback = source == "stored" && left >= FLOOR && unavailable;
                    if !fallback {
                        return Err(format!("a token with {left} left, not the fallback: {answer:?}"));
                    }
                }
            }
            (422, "mono_refused") => {
                let refused = calls.iter().any(|c| {
                    c.account == answer.account && c.answer == Answer::Refused && c.at <= answer.answered
                });
                if !refused {
                    return Err(format!("422 without a refusal from Mono: {answer:?}"));
                }
            }
            (503, "mono_unavailable") if answer.retry_after => {
                // The fallback, when it exists, is served instead.
                let margin = took + Span::seconds(2);
                if usable_throughout(stored, &answer.account, answer.sent, answer.answered, FLOOR + margin) {
                    return Err(format!(
                        "503 while a token with more than 30 s left was stored throughout: {answer:?}"
                    ));
                }
            }
            _ => return Err(format!("an answer the api does not document for this: {answer:?}")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// A database of this test's own, migrated, with the trigger that records every stored token.
struct ModelDatabase {
    admin: PgPool,
    name: String,
    options: PgConnectOptions,
    pool: PgPool,
}

impl ModelDatabase {
    async fn create() -> Self {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test server");
        let admin = PgPool::connect(&url).await.expect("the test server is reachable");
        let name = format!("monohook_token_model_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("a database is created");
        let options = url.parse::<PgConnectOptions>().expect("a valid DATABASE_URL").database(&name);
        let pool = PgPoolOptions::new().max_connections(8).connect_with(options.clone()).await.unwrap();
        sqlx::migrate!("../migrations").run(&pool).await.expect("migrations apply");
        // Deferred: it runs at commit, so its time is when others can see the token.
        sqlx::raw_sql(
            "CREATE TABLE model_token_changes (
                 seq bigserial PRIMARY KEY, account_id text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 old_issued_at timestamptz, new_issued_at timestamptz, new_expires_at timestamptz);
             CREATE FUNCTION model_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO model_token_changes (account_id, old_issued_at, new_issued_at, new_expires_at)
                 VALUES (NEW.id, OLD.reauth_token_issued_at, NEW.reauth_token_issued_at, NEW.reauth_token_expires_at);
                 RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER model_token_changed AFTER UPDATE ON accounts DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW WHEN (OLD.reauth_token IS DISTINCT FROM NEW.reauth_token)
             EXECUTE FUNCTION model_token_changed();",
        )
        .execute(&pool)
        .await
        .expect("the trigger is installed");
        Self { admin, name, options, pool }
    }

    async fn drop_it(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .execute(&self.admin)
            .await;
    }
}

#[test]
fn the_api_hands_out_tokens_as_the_model_allows_over_generated_histories() {
    shared::testing::init_test_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let database = runtime.block_on(ModelDatabase::create());
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(40);
    // A failing history's seed is kept in `token_model.proptest-regressions` and played first.
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        source_file: Some(file!()),
        max_shrink_iters: 300,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&history(), |history| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(run_history(&database.pool, &database.options, n, &history))
    });
    runtime.block_on(database.drop_it());
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, history)) => {
            panic!("the api and the model disagree: {reason}\nshrunk history: {history:#?}")
        }
        Err(error) => panic!("{error}"),
    }
}

/// The counterexample the property found first, shrunk: an account whose stored token has 90 s
/// left, requests to both processes at once, Mono slow past the deadline. The process without the
/// lock answered 503 before its deadline, though the stored token was the documented fallback.
#[sqlx::test(migrations = "../migrations")]
async fn a_request_behind_another_process_s_slow_call_gets_the_fallback_at_its_deadline(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "token": "late" }))
                .set_delay(Duration::from_millis(SLOW_MS)),
        )
        .expect(1)
        .mount(&mono)
        .await;
    seed(&pool, "acct-0", Seeded::BelowMinimum.issued_ago().map(|ago| Utc::now() - ago)).await;
    let options = (*pool.connect_options()).clone();
    let (first, second) = (spawn_app(&options, &mono).await, spawn_app(&options, &mono).await);
    let http = reqwest::Client::new();

    let (a, b) = tokio::join!(ask(&http, &first.address, "acct-0"), async {
        // The first process holds the lock and waits for Mono.
        while mono.received_requests().await.unwrap_or_default().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ask(&http, &second.address, "acct-0").await
    });

    for (status, _, body) in [a, b] {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token"], "seed-acct-0");
        assert_eq!(body["source"], "stored");
    }
    for app in [first, second] {
        app.cancel.cancel();
    }
}

/// The second counterexample the property found, shrunk: two requests to the process without the
/// lock, the second sent while the first waits. The first reached its deadline and took the
/// fallback; the second got that same answer at once, 25 ms before its own deadline, though Mono
/// was not yet unavailable to it. A deadline is each request's own: only outcomes of Mono (or of
/// the stored token) are shared.
#[sqlx::test(migrations = "../migrations")]
async fn a_request_queued_behind_one_that_ran_out_of_time_waits_for_its_own_deadline(pool: PgPool) {
    let mono = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "token": "late" }))
                .set_delay(Duration::from_millis(SLOW_MS)),
        )
        .expect(1)
        .mount(&mono)
        .await;
    seed(&pool, "acct-0", Seeded::BelowMinimum.issued_ago().map(|ago| Utc::now() - ago)).await;
    let options = (*pool.connect_options()).clone();
    let (first, second) = (spawn_app(&options, &mono).await, spawn_app(&options, &mono).await);
    let http = reqwest::Client::new();

    let holder = ask(&http, &first.address, "acct-0");
    let behind = async {
        // The first process holds the lock and waits for Mono.
        while mono.received_requests().await.unwrap_or_default().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let leader = ask(&http, &second.address, "acct-0");
        let follower = async {
            // Sent 50 ms later: its deadline comes before Mono answers, after the leader's.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let sent = std::time::Instant::now();
            let answer = ask(&http, &second.address, "acct-0").await;
            (answer, sent.elapsed())
        };
        tokio::join!(leader, follower)
    };
    let (_, (_, ((status, _, body), took))) = tokio::join!(holder, behind);

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "stored", "{body}");
    assert!(
        took >= Duration::from_millis(DEADLINE_MS - 20),
        "the follower took the leader's fallback after {took:?}, before its own deadline"
    );
    for app in [first, second] {
        app.cancel.cancel();
    }
}
