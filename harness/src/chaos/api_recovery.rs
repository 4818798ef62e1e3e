//! The api recovers by itself (issue 28): Mono refuses our key (401) for 20 s during the app's
//! sign-in load, then answers normally; within a minute every api process hands out fresh tokens
//! again, with no restart. Before the fix an api's breaker, once open, never closed: every fresh
//! token was a 503 until the process restarted.
//!
//! Restarts no service: only the simulator's knobs change.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::ScenarioReport;
use super::common::finish;
use super::load::{Kind, Load, LoadPlan};
use super::scenarios::set_mono;
use crate::system::{System, SystemConfig};

/// How long Mono refuses our key.
const REFUSED_FOR: Duration = Duration::from_secs(20);
/// How soon after Mono accepts the key again every api must hand out a fresh token.
const RECOVERED_WITHIN: Duration = Duration::from_secs(60);

pub async fn mono_key_refused_at_sign_in(base: &SystemConfig) -> anyhow::Result<ScenarioReport> {
    let started = Instant::now();
    let mut system = System::start(base.clone(), 2).await?;
    // Tokens count as stored for their first 5 s, then the api asks Mono for a fresh one.
    let mut apis = Vec::new();
    for _ in 0..2 {
        apis.push(system.start_api_with(&[("TOKEN_MIN_REMAINING_SECS", "595")]).await?);
    }
    // The api's own Mono calls are its own: only the workers' tokens are held to the model.
    let mut report = ScenarioReport::default();
    let plan = LoadPlan { per_second: 20, accounts: 30, kinds: vec![Kind::ReauthorisationRequired] };
    let load = Load::start(system.ingest_url(), plan.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    set_mono(&system, 1.0, "401", 0).await?;
    let until = Instant::now() + REFUSED_FOR;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    let counter = || Arc::new(AtomicUsize::new(0));
    let (fresh, stored, unavailable, other) = (counter(), counter(), counter(), counter());
    let mut clients = tokio::task::JoinSet::new();
    // The sign-in load: 20 clients ask both api processes for tokens while Mono refuses our key.
    for client in 0..20u64 {
        let (http, api) = (http.clone(), apis[client as usize % apis.len()].clone());
        let (fresh, stored, unavailable, other) =
            (fresh.clone(), stored.clone(), unavailable.clone(), other.clone());
        let accounts = plan.accounts;
        clients.spawn(async move {
            let mut n = client;
            while Instant::now() < until {
                let account = crate::bodies::account_id(1 + n % accounts);
                n += 7;
                let status = match ask_token(&http, &api, &account).await {
                    Some((200, source)) if source == "fresh" => &fresh,
                    // The documented fallback: a stored token that works 30 s longer.
                    Some((200, source)) if source == "stored" => &stored,
                    Some((503, _)) => &unavailable,
                    _ => &other,
                };
                status.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    tokio::time::sleep(REFUSED_FOR / 2).await;
    let mut unavailable_on_readyz = 0;
    for api in &apis {
        let body: serde_json::Value = reqwest::get(format!("{api}/readyz")).await?.json().await?;
        unavailable_on_readyz += usize::from(body["mono"] == "unavailable");
    }
    while clients.join_next().await.is_some() {}
    report.note(format!(
        "while Mono refused our key: {} fresh tokens, {} stored, {} answers 503",
        fresh.load(Ordering::Relaxed),
        stored.load(Ordering::Relaxed),
        unavailable.load(Ordering::Relaxed),
    ));
    let others = other.load(Ordering::Relaxed);
    report.check(
        format!("every answer while Mono refused our key was a stored token or a 503 ({others} others)"),
        others == 0,
    );
    report.check(
        format!("every api's /readyz said Mono is unavailable ({unavailable_on_readyz} of {})", apis.len()),
        unavailable_on_readyz == apis.len(),
    );

    set_mono(&system, 0.0, "401", 0).await?;
    let accepted = Instant::now();
    for (index, api) in apis.iter().enumerate() {
        let mut n = 0u64;
        let recovered = loop {
            let account = crate::bodies::account_id(1 + n % plan.accounts);
            n += 1;
            if let Some((200, source)) = ask_token(&http, api, &account).await
                && source == "fresh"
            {
                break Some(accepted.elapsed());
            }
            if accepted.elapsed() > RECOVERED_WITHIN {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match recovered {
            Some(after) => report.check(
                format!(
                    "api {index} handed out a fresh token {:.1} s after Mono accepted our key again",
                    after.as_secs_f64()
                ),
                after <= RECOVERED_WITHIN,
            ),
            None => report
                .check(format!("api {index} handed out a fresh token within {RECOVERED_WITHIN:?}"), false),
        }
    }
    let load = load.stop().await;
    let mut report = finish("mono_key_refused_at_sign_in", started, system, load, report).await?;
    report.check("nothing was dead-lettered", report.dead_lettered == 0);
    Ok(report)
}

/// A token request: the status and the token's `source`, or `None` without an answer.
async fn ask_token(http: &reqwest::Client, api: &str, account: &str) -> Option<(u16, String)> {
    let answer = http
        .post(format!("{api}/v1/accounts/{account}/reauth-token"))
        .header("authorization", format!("Bearer {}", crate::system::APP_API_KEY))
        .send()
        .await
        .ok()?;
    let status = answer.status().as_u16();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    Some((status, body["source"].as_str().unwrap_or_default().to_owned()))
}
