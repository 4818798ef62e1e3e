//! No lock outlives its request (issue 28): taking and releasing an account lock are safe against
//! cancellation at any await, a lock session that cannot be opened holds nobody up for more than one
//! attempt, and a link follower waits until its own deadline.

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::helpers::{Seed, json, spawn_app_with};
use crate::reauth_link::mono_links;
use api::locks::AccountLocks;

const TOKEN_LOCK: &str = "monohook.reauth-token:";

/// Keeps the lock session busy with another account's locks, so that the operations under test
/// often wait for it and are cancelled at every await there is.
fn churn(locks: &Arc<AccountLocks>) -> tokio::task::JoinHandle<()> {
    let locks = locks.clone();
    tokio::spawn(async move {
        loop {
            if let Ok(Some(lock)) = locks.try_lock("churn").await {
                lock.release().await;
            }
        }
    })
}

/// Ends after `n` turns of the scheduler (timers are too coarse to cancel between two awaits of a
/// statement), letting a little time pass at each so that answers arrive in between.
async fn turns(n: u64) {
    for _ in 0..n {
        std::thread::sleep(Duration::from_micros(10));
        tokio::task::yield_now().await;
    }
}

/// Panics unless another session can take `key` within a second (what is left to do in the
/// background of a cancelled request is given that long).
async fn assert_soon_free(pool: &PgPool, key: &str, attempt: u64) {
    let mut other = pool.acquire().await.unwrap();
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(key)
            .fetch_one(&mut *other)
            .await
            .unwrap();
        if taken {
            sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                .bind(key)
                .execute(&mut *other)
                .await
                .unwrap();
            return;
        }
        assert!(Instant::now() < until, "attempt {attempt}: the lock outlived the request that took it");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_try_lock_cancelled_at_any_await_never_leaves_the_lock_held(pool: PgPool) {
    let locks = AccountLocks::new((*pool.connect_options()).clone());
    let churn = churn(&locks);

    for attempt in 0..300 {
        // Cancelled one scheduler turn later each time: before, while and after the statement is on
        // the wire. Taken in time, the guard is dropped here, which unlocks too.
        tokio::select! {
            biased;
            _ = locks.try_lock("acct-1") => {}
            () = turns(attempt) => {}
        }
        assert_soon_free(&pool, &format!("{TOKEN_LOCK}acct-1"), attempt).await;
    }
    churn.abort();
}

#[sqlx::test(migrations = "../migrations")]
async fn a_release_cancelled_at_any_await_still_unlocks(pool: PgPool) {
    let locks = AccountLocks::new((*pool.connect_options()).clone());
    let churn = churn(&locks);

    for attempt in 0..300 {
        let lock = loop {
            if let Some(lock) = locks.try_lock("acct-1").await.unwrap() {
                break lock;
            }
            tokio::task::yield_now().await;
        };
        tokio::select! {
            biased;
            () = lock.release() => {}
            () = turns(attempt) => {}
        }
        assert_soon_free(&pool, &format!("{TOKEN_LOCK}acct-1"), attempt).await;
    }
    churn.abort();
}

#[tokio::test]
async fn callers_queued_behind_a_failing_reconnect_share_its_failure_instead_of_each_waiting_one() {
    // A server that accepts connections and never answers: each attempt to open a session ends at
    // the session's 2 s timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let locks = AccountLocks::new(PgConnectOptions::new().host("127.0.0.1").port(port).username("nobody"));
    let started = Instant::now();

    let tries = (0..5).map(|n| {
        let locks = locks.clone();
        tokio::spawn(async move { locks.try_lock(&format!("acct-{n}")).await.map(|l| l.is_some()) })
    });
    let answers = futures_util::future::join_all(tries).await;

    assert!(answers.iter().all(|a| matches!(a, Ok(Err(_)))), "no session, no lock: {answers:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(3_500), "five callers took {took:?}: one attempt each, in turn");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_link_follower_waits_until_its_own_deadline_not_its_leaders(pool: PgPool) {
    let mono = wiremock::MockServer::start().await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).expect(0).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let app = spawn_app_with(pool.clone(), &mono, &["--token-deadline-ms", "600"]).await;
    // Another process holds the account's link lock (no redirect configured: the key ends in "\n").
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('monohook.reauth-link:acct-1' || chr(10), 0))")
        .execute(&mut *other)
        .await
        .unwrap();

    let leader = tokio::spawn({
        let app_address = app.address.clone();
        async move {
            let http = reqwest::Client::new();
            http.post(format!("{app_address}/v1/accounts/acct-1/reauth-link"))
                .bearer_auth(crate::helpers::MOBILE_KEY)
                .send()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let follower = tokio::spawn({
        let app_address = app.address.clone();
        async move {
            let http = reqwest::Client::new();
            http.post(format!("{app_address}/v1/accounts/acct-1/reauth-link"))
                .bearer_auth(crate::helpers::MOBILE_KEY)
                .send()
                .await
                .unwrap()
        }
    });
    let leader = leader.await.unwrap();
    assert_eq!(leader.status().as_u16(), 503, "the leader's deadline came while the lock was held");
    // The other process stores the link it made and lets go, after the leader's deadline and well
    // within the follower's.
    sqlx::query(
        "INSERT INTO reauth_links (ref, account_id, redirect_url, url, created_at, episode, key_label, request_id)
         SELECT 'mh_other', id, NULL, 'https://link.mono.co/OTHER', now(), reauth_state_received_at, 'web', 'r1'
         FROM accounts WHERE id = 'acct-1'",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *other).await.unwrap();

    let follower = follower.await.unwrap();

    assert_eq!(follower.status().as_u16(), 200, "the follower waits on, within its own deadline");
    assert_eq!(json(follower).await["url"], "https://link.mono.co/OTHER");
}
