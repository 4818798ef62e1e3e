//! Dead-letter walks against their rule, over generated sequences of operator commands (proptest).
//!
//! The rule: every dead letter is, at every moment between commands, in exactly one place: the
//! dead-letter queue with its `dead` journal row, the work queue (replayed, once), or gone with its
//! row (purged). A walk acts only on letters it saw and that its filter selects, at most once each;
//! a walk that saw the whole queue selects every matching letter; one that could not see it all
//! (another consumer held some letters) says `incomplete`, fails, and leaves what it did not see as
//! it was. No command leaves an unfinished action behind.
//!
//! Generated: 1 to 8 letters over three accounts, then up to four steps, each a replay or purge
//! (filtered by account, limited, or all), two of them at once, one while another consumer holds
//! some letters, or new letters arriving. No worker runs: replayed copies wait in the work queue,
//! where the test takes them. `PROPTEST_CASES` raises the number of sequences.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use uuid::Uuid;

use crate::dlq_walks::{dead_rows, hold_messages, replayed_ids, seed_dead_letters, unfinished_actions};
use crate::helpers::{PATIENCE, TestWorld};

const ACCOUNTS: usize = 3;

#[derive(Clone, Debug)]
enum Filter {
    All,
    Account(usize),
    /// `--all --limit n`.
    Limit(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Replay,
    Purge,
}

#[derive(Clone, Debug)]
struct Walk {
    action: Action,
    filter: Filter,
}

#[derive(Clone, Debug)]
enum Step {
    Alone(Walk),
    /// Two walks at once.
    Together(Walk, Walk),
    /// Another consumer holds this many letters while the walk runs, then lets them go.
    WhileHeld(u16, Walk),
    /// New letters for these accounts.
    Arrive(Vec<usize>),
}

fn walk() -> impl Strategy<Value = Walk> {
    let action = prop_oneof![Just(Action::Replay), Just(Action::Purge)];
    let filter = prop_oneof![
        Just(Filter::All),
        (0..ACCOUNTS).prop_map(Filter::Account),
        (1u16..4).prop_map(Filter::Limit)
    ];
    (action, filter).prop_map(|(action, filter)| Walk { action, filter })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => walk().prop_map(Step::Alone),
        2 => (walk(), walk()).prop_map(|(a, b)| Step::Together(a, b)),
        2 => (1u16..3, walk()).prop_map(|(n, w)| Step::WhileHeld(n, w)),
        1 => prop::collection::vec(0..ACCOUNTS, 1..4).prop_map(Step::Arrive),
    ]
}

fn sequence() -> impl Strategy<Value = (Vec<usize>, Vec<Step>)> {
    (prop::collection::vec(0..ACCOUNTS, 1..9), prop::collection::vec(step(), 1..5))
}

fn account(n: usize) -> String {
    format!("acct-walk-{n}")
}

/// What the test knows: where each letter is.
#[derive(Default)]
struct Letters {
    account_of: BTreeMap<Uuid, String>,
    dead: BTreeSet<Uuid>,
    replayed: BTreeSet<Uuid>,
    purged: BTreeSet<Uuid>,
}

impl Letters {
    fn selected(&self, filter: &Filter, among: &BTreeSet<Uuid>) -> BTreeSet<Uuid> {
        match filter {
            Filter::All | Filter::Limit(_) => among.clone(),
            Filter::Account(n) => {
                among.iter().filter(|id| self.account_of[*id] == account(*n)).copied().collect()
            }
        }
    }
}

fn args(walk: &Walk) -> Vec<String> {
    let mut args =
        vec!["dlq".to_owned(), if walk.action == Action::Replay { "replay" } else { "purge" }.to_owned()];
    match walk.filter {
        Filter::All => args.push("--all".into()),
        Filter::Account(n) => args.extend(["--account".into(), account(n)]),
        Filter::Limit(n) => args.extend(["--all".into(), "--limit".into(), n.to_string()]),
    }
    if walk.action == Action::Purge {
        args.push("--yes".into());
    }
    args
}

async fn run(world: &TestWorld, walks: &[&Walk]) -> Vec<std::process::Output> {
    let url = world.database_url().await;
    let children: Vec<_> = walks
        .iter()
        .map(|walk| {
            let args = args(walk);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            world.cli_command(&args, &url).spawn().expect("the worker binary runs")
        })
        .collect();
    tokio::task::spawn_blocking(move || children.into_iter().map(|c| c.wait_with_output().unwrap()).collect())
        .await
        .unwrap()
}

/// What the walks of one step took: replayed copies from the work queue, purged letters from the
/// rows that went; checked against the rule and applied to `letters`.
async fn settle(
    world: &TestWorld,
    letters: &mut Letters,
    seen_by: &[(&Walk, BTreeSet<Uuid>)],
) -> Result<(), TestCaseError> {
    let replayed: Vec<Uuid> = replayed_ids(world).await;
    let replayed_now: BTreeSet<Uuid> = replayed.iter().copied().collect();
    prop_assert_eq!(replayed.len(), replayed_now.len(), "a letter replayed twice in one step");
    let rows = dead_rows(world).await;
    let gone: BTreeSet<Uuid> = letters.dead.iter().filter(|id| !rows.contains(id)).copied().collect();
    for id in &replayed_now {
        prop_assert!(letters.dead.contains(id), "replayed a letter that was not waiting: {id}");
        prop_assert!(gone.contains(id), "a replayed letter kept its dead row: {id}");
    }
    let purged_now: BTreeSet<Uuid> = gone.difference(&replayed_now).copied().collect();
    // Each letter a walk took was one it could see and its filter selects.
    for id in replayed_now.iter().chain(&purged_now) {
        let action = if replayed_now.contains(id) { Action::Replay } else { Action::Purge };
        let allowed = seen_by.iter().any(|(walk, visible)| {
            walk.action == action && letters.selected(&walk.filter, visible).contains(id)
        });
        prop_assert!(allowed, "{action:?} took {id}, which no such walk could see and select");
    }
    for id in &replayed_now {
        letters.dead.remove(id);
        letters.replayed.insert(*id);
    }
    for id in &purged_now {
        letters.dead.remove(id);
        letters.purged.insert(*id);
    }
    Ok(())
}

async fn check_places(world: &TestWorld, letters: &Letters) -> Result<(), TestCaseError> {
    let expected = letters.dead.len() as u32;
    let dead = world.dead_queue();
    // A walk's returns reach the queue's ready count a moment after it closes.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while world.broker.depth(&dead).await != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    prop_assert_eq!(world.broker.depth(&dead).await, expected, "letters in the dead-letter queue");
    let rows: BTreeSet<Uuid> = dead_rows(world).await.into_iter().collect();
    prop_assert_eq!(&rows, &letters.dead, "a letter waits in the queue exactly while its dead row is kept");
    prop_assert_eq!(unfinished_actions(world).await, 0, "an action left unfinished");
    Ok(())
}

async fn run_sequence(pool: &PgPool, first: &[usize], steps: &[Step]) -> Result<(), TestCaseError> {
    sqlx::query("TRUNCATE webhook_events, dead_letter_actions").execute(pool).await.unwrap();
    let world = TestWorld::new(pool.clone()).await;
    let mut letters = Letters::default();
    let arrive = |accounts: &[usize]| accounts.iter().map(|n| account(*n)).collect::<Vec<_>>();
    for meta in seed_dead_letters(&world, &arrive(first)).await.iter().zip(first) {
        letters.account_of.insert(meta.0.id.as_uuid(), account(*meta.1));
        letters.dead.insert(meta.0.id.as_uuid());
    }
    for step in steps {
        match step {
            Step::Alone(walk) => {
                let visible = letters.dead.clone();
                let selected = letters.selected(&walk.filter, &visible);
                let output = run(&world, &[walk]).await.remove(0);
                prop_assert!(
                    output.status.success(),
                    "a walk alone succeeds: {}",
                    String::from_utf8_lossy(&output.stdout)
                );
                let before = letters.dead.clone();
                settle(&world, &mut letters, &[(walk, visible)]).await?;
                let taken: BTreeSet<Uuid> = before.difference(&letters.dead).copied().collect();
                let expected = match walk.filter {
                    Filter::Limit(n) => selected.len().min(usize::from(n)),
                    _ => selected.len(),
                };
                prop_assert_eq!(
                    taken.len(),
                    expected,
                    "a walk that saw the whole queue takes every letter it selects"
                );
            }
            Step::Together(a, b) => {
                let visible = letters.dead.clone();
                let outputs = run(&world, &[a, b]).await;
                settle(&world, &mut letters, &[(a, visible.clone()), (b, visible)]).await?;
                for output in &outputs {
                    let text = String::from_utf8_lossy(&output.stdout);
                    prop_assert_eq!(output.status.success(), !text.contains("incomplete"), "{}", text);
                }
            }
            Step::WhileHeld(count, walk) => {
                let count = (*count).min(letters.dead.len() as u16);
                let (holder, held) = hold_messages(&world, count).await;
                let visible: BTreeSet<Uuid> = letters.dead.difference(&held).copied().collect();
                let output = run(&world, &[walk]).await.remove(0);
                settle(&world, &mut letters, &[(walk, visible)]).await?;
                if !held.is_empty() {
                    let text = String::from_utf8_lossy(&output.stdout);
                    prop_assert!(
                        !output.status.success() && text.contains("incomplete"),
                        "a walk that missed held letters says so: {text}"
                    );
                }
                for id in &held {
                    prop_assert!(letters.dead.contains(id), "a held letter was acted on: {id}");
                }
                holder.close(200, "done".into()).await.unwrap();
            }
            Step::Arrive(accounts) => {
                for meta in seed_dead_letters(&world, &arrive(accounts)).await.iter().zip(accounts) {
                    letters.account_of.insert(meta.0.id.as_uuid(), account(*meta.1));
                    letters.dead.insert(meta.0.id.as_uuid());
                }
            }
        }
        check_places(&world, &letters).await?;
    }
    let everyone: HashSet<&Uuid> =
        letters.dead.iter().chain(&letters.replayed).chain(&letters.purged).collect();
    prop_assert_eq!(everyone.len(), letters.account_of.len(), "every letter is in exactly one place");
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn dead_letter_walks_keep_every_letter_in_one_place_over_generated_commands(pool: PgPool) {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(12);
    let handle = tokio::runtime::Handle::current();
    // The runner is synchronous; each sequence runs on this test's runtime, which this thread
    // drives while it waits for the runner's thread.
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 40,
            ..Config::default()
        });
        runner.run(&sequence(), |(first, steps)| handle.block_on(run_sequence(&pool, &first, &steps)))
    })
    .await
    .unwrap();
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, sequence)) => {
            panic!("the walks and their rule disagree: {reason}\nshrunk sequence: {sequence:#?}")
        }
        Err(error) => panic!("{error}"),
    }
}
