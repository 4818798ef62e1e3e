//! The app's API as processes: two of them over one database.

use std::time::Duration;

use harness::system::{APP_API_KEY, System, SystemConfig};

use crate::story::ACCOUNT;

#[tokio::test]
async fn two_api_processes_make_one_mono_call_for_one_account_and_hand_out_one_token() {
    let mut system = System::start(SystemConfig::default(), 1).await.unwrap();
    let first = system.start_api().await.unwrap();
    let second = system.start_api().await.unwrap();
    let (status, _) = system.post(&harness::bodies::reauthorisation_required(ACCOUNT)).await.unwrap();
    assert_eq!(status, 200);
    let flagged = "SELECT count(*) FROM accounts WHERE reauth_required AND reauth_token IS NOT NULL";
    assert_eq!(system.wait_for_count(flagged, 1, Duration::from_secs(20)).await.unwrap(), 1);
    // The stored token is about to expire, and Mono is slow: both processes need a fresh one at once.
    sqlx::query("UPDATE accounts SET reauth_token_expires_at = now() + interval '30 seconds'")
        .execute(&system.pool)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let knobs = serde_json::json!({
        "latency_ms": 500, "failure_rate": 0.0, "failure_mode": "500", "retry_after_secs": 1, "reject_accounts": []
    });
    http.post(format!("{}/_sim/config", system.mono_url)).json(&knobs).send().await.unwrap();
    let calls_before = mono_calls(&system).await;

    let ask = |api: String| {
        let http = http.clone();
        async move {
            http.post(format!("{api}/v1/accounts/{ACCOUNT}/reauth-token"))
                .bearer_auth(APP_API_KEY)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(ask(first), ask(second));

    assert_eq!(mono_calls(&system).await, calls_before + 1, "one call to Mono between the two processes");
    assert!(a["token"].is_string());
    assert_eq!(a["token"], b["token"], "both got the same token");
    let mut sources =
        vec![a["source"].as_str().unwrap().to_owned(), b["source"].as_str().unwrap().to_owned()];
    sources.sort();
    assert_eq!(sources, ["fresh", "stored"]);
    system.shut_down().await.unwrap();
}

/// Calls mono-sim answered for `ACCOUNT` so far.
async fn mono_calls(system: &System) -> usize {
    let calls: Vec<serde_json::Value> =
        reqwest::get(format!("{}/_sim/calls", system.mono_url)).await.unwrap().json().await.unwrap();
    calls.iter().filter(|c| c["account"] == ACCOUNT).count()
}

#[tokio::test]
async fn a_re_auth_link_opened_by_the_customer_clears_the_account_through_mono_s_webhooks() {
    let mut system = System::start(SystemConfig::default(), 1).await.unwrap();
    let api =
        system.start_api_with(&[("MONO_REAUTH_REDIRECT_URLS", "https://app.example.com")]).await.unwrap();
    let (status, _) = system.post(&harness::bodies::reauthorisation_required(ACCOUNT)).await.unwrap();
    assert_eq!(status, 200);
    let flagged = "SELECT count(*) FROM accounts WHERE reauth_required";
    assert_eq!(system.wait_for_count(flagged, 1, Duration::from_secs(20)).await.unwrap(), 1);
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    let answer: serde_json::Value = http
        .post(format!("{api}/v1/accounts/{ACCOUNT}/reauth-link"))
        .bearer_auth(APP_API_KEY)
        .json(&serde_json::json!({ "redirect_url": "https://app.example.com/done" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The customer opens the link and finishes: mono-sim sends account_reauthorized, then
    // account_updated, to ingest.
    let opened = http.get(answer["url"].as_str().unwrap()).send().await.unwrap();

    assert_eq!(opened.status().as_u16(), 302);
    assert_eq!(opened.headers()["location"], "https://app.example.com/done");
    let healthy = "SELECT count(*) FROM accounts
                   WHERE NOT reauth_required AND reauthorized_at IS NOT NULL AND data_status = 'AVAILABLE'";
    assert_eq!(system.wait_for_count(healthy, 1, Duration::from_secs(20)).await.unwrap(), 1);
    let account: serde_json::Value = http
        .get(format!("{api}/v1/accounts/{ACCOUNT}"))
        .bearer_auth(APP_API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account["reauth_required"], false);
    system.shut_down().await.unwrap();
}
