//! The simulated hosted re-auth link (Mono's v2 flow) and the customer who opens it.
//!
//! `POST /v2/accounts/initiate` checks `mono-sec-key` (401), that the body is JSON with
//! `scope: "reauth"` and a string `account` (400 otherwise, with Mono's `message`), and the rejected
//! accounts (400), then answers the way Mono's first-link answer looks:
//! `{"status", "message", "timestamp", "data": {"mono_url": "<this sim>/reauth/<token>", …}}`. The
//! knobs apply as to `reauthorise` (latency, failures), plus `missing_mono_url` for an answer
//! without `data.mono_url`.
//!
//! `GET /reauth/<token>` plays the customer finishing: once per link, it sends
//! `account_reauthorized` then `account_updated` to ingest (when the sim is given `--ingest-url` and
//! `--webhook-secret`), each after the previous one was accepted, and then sends the browser to the
//! link's `redirect_url` (302) or says it is done. A link opened again is 410; an unknown one 404.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;

use crate::server::{SimState, answer_failure, caller_of, count, remember};
use crate::webhooks::{Event, Target, post};

/// A link the sim handed out.
pub struct SimLink {
    account: String,
    redirect_url: Option<String>,
    opened: bool,
}

/// Links by token.
#[derive(Default)]
pub struct Links(Mutex<HashMap<String, SimLink>>);

impl Links {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimLink>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub async fn initiate(request: HttpRequest, body: web::Bytes, state: web::Data<SimState>) -> HttpResponse {
    let arrived_ms = chrono::Utc::now().timestamp_millis();
    let knobs = state.knobs();
    if knobs.latency_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(knobs.latency_ms)).await;
    }
    let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let account = asked["account"].as_str().unwrap_or_default().to_owned();
    let (outcome, response) = if !state.key_matches(&request) {
        ("unauthorized", HttpResponse::Unauthorized().json(json!({ "message": "Invalid secret key" })))
    } else if asked["scope"] != "reauth" {
        ("bad_request", HttpResponse::BadRequest().json(json!({ "message": "scope must be reauth" })))
    } else if account.is_empty() {
        ("bad_request", HttpResponse::BadRequest().json(json!({ "message": "account is required" })))
    } else if knobs.reject_accounts.contains(&account) {
        (
            "rejected",
            HttpResponse::BadRequest().json(json!({ "message": "This account can not be re-authorised." })),
        )
    } else if fastrand::f64() < knobs.failure_rate {
        let caller = caller_of(&request);
        match answer_failure(
            &state,
            &account,
            &caller,
            arrived_ms,
            knobs.failure_mode,
            knobs.retry_after_secs,
        )
        .await
        {
            Some(failed) => failed,
            None => return HttpResponse::GatewayTimeout().finish(),
        }
    } else if knobs.missing_mono_url {
        (
            "link_without_url",
            HttpResponse::Ok()
                .json(json!({ "status": "successful", "data": { "customer": "sim-customer" } })),
        )
    } else {
        let token: String = std::iter::repeat_with(fastrand::alphanumeric).take(24).collect();
        let redirect_url = asked["redirect_url"].as_str().map(str::to_owned);
        let url = format!("{}/reauth/{token}", state.public_url);
        state.links.lock().insert(token, SimLink { account: account.clone(), redirect_url, opened: false });
        (
            "link",
            HttpResponse::Ok().json(json!({
                "status": "successful",
                "message": "Request completed successfully",
                "timestamp": chrono::Utc::now().to_rfc3339(),
                "data": {
                    "mono_url": url,
                    "customer": "sim-customer",
                    "scope": "reauth",
                    "meta": asked["meta"],
                }
            })),
        )
    };
    count(&state, outcome);
    remember(&state, &account, &caller_of(&request), arrived_ms, outcome);
    response
}

/// The customer opens the link and finishes re-authorising.
pub async fn open(token: web::Path<String>, state: web::Data<SimState>) -> HttpResponse {
    let (account, redirect_url) = {
        let mut links = state.links.lock();
        let Some(link) = links.get_mut(token.as_str()) else {
            return HttpResponse::NotFound().body("no such link\n");
        };
        if link.opened {
            return HttpResponse::Gone().body("this link was used already\n");
        }
        link.opened = true;
        (link.account.clone(), link.redirect_url.clone())
    };
    count(&state, "link_opened");
    match &state.ingest {
        Some(target) => {
            let http = reqwest::Client::new();
            for event in [Event::AccountReauthorized, Event::AccountUpdated] {
                if let Err(error) = post(&http, target, event, &account).await {
                    tracing::warn!(%error, account, "the customer finished, but ingest did not take the webhook");
                    return HttpResponse::BadGateway().body(format!("re-authorised, but {error:#}\n"));
                }
            }
        }
        None => tracing::info!(account, "the customer finished; no --ingest-url, so no webhook is sent"),
    }
    match redirect_url {
        Some(redirect) => HttpResponse::Found().insert_header(("location", redirect)).finish(),
        None => HttpResponse::Ok().body(format!("account {account} re-authorised\n")),
    }
}

/// Where opened links send their webhooks: both or neither.
pub fn ingest_target(url: Option<String>, secret: Option<String>) -> anyhow::Result<Option<Target>> {
    match (url, secret) {
        (Some(ingest_url), Some(secret)) => Ok(Some(Target { ingest_url, secret })),
        (None, None) => Ok(None),
        _ => anyhow::bail!("--ingest-url and --webhook-secret go together"),
    }
}
