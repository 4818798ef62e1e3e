//! The simulated re-authorise endpoint (and, in `links`, the v2 re-auth link; in `app`, the app's
//! backend that monohook notifies).
//!
//! Like Mono: `mono-sec-key` must match (else 401), a fresh 20-character token per call, and
//! `{"message": "This account can not be re-authorised."}` with 400 for rejected accounts. Knobs:
//! latency, a failure rate with a mode (500, 429 with `Retry-After`, 401 as for a revoked key, or a
//! hang), and rejected
//! accounts. `GET/POST /_sim/config` reads and changes the knobs while running; `GET /_sim/stats`
//! counts the answers given.

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use crate::links::{self, Links, ingest_target};
use crate::webhooks::Target;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SIM_LISTEN_ADDR", default_value = "127.0.0.1:8099")]
    pub listen_addr: SocketAddr,
    /// The secret key callers must send as `mono-sec-key`.
    #[arg(long, env = "SIM_SECRET_KEY", default_value = "sim_sk_local", hide_env_values = true)]
    pub secret_key: String,
    /// Delay before every answer, in ms.
    #[arg(long, env = "SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of calls that fail (0.0 to 1.0), the way `--failure-mode` says.
    #[arg(long, env = "SIM_FAILURE_RATE", default_value_t = 0.0)]
    pub failure_rate: f64,
    /// How a failing call fails.
    #[arg(long, env = "SIM_FAILURE_MODE", value_enum, default_value_t = FailureMode::ServerError)]
    pub failure_mode: FailureMode,
    /// `Retry-After` of a 429, in seconds.
    #[arg(long, env = "SIM_RETRY_AFTER_SECS", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Account ids that Mono always refuses (400), comma-separated.
    #[arg(long, env = "SIM_REJECT_ACCOUNTS", value_delimiter = ',')]
    pub reject_accounts: Vec<String>,
    /// Answer `/v2/accounts/initiate` without `data.mono_url`.
    #[arg(long, env = "SIM_MISSING_MONO_URL")]
    pub missing_mono_url: bool,
    /// The base of the re-auth links the sim hands out, as the customer's browser reaches the sim
    /// (default: `http://` and the listen address, `0.0.0.0` read as `127.0.0.1`).
    #[arg(long, env = "SIM_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// ingest's webhook URL: opening a link sends `account_reauthorized` then `account_updated`
    /// there (with `--webhook-secret`); without it, opening a link sends nothing.
    #[arg(long, env = "SIM_INGEST_URL")]
    pub ingest_url: Option<String>,
    /// The secret to send ingest as `mono-webhook-secret` when a link is opened.
    #[arg(long, env = "SIM_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Playing the app: the `whsec_` secret monohook's notifications to `/_app/notifications` are
    /// signed with; unset, their signatures are not checked.
    #[arg(long, env = "SIM_APP_SECRET", hide_env_values = true)]
    pub app_secret: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// 500 Internal Server Error.
    #[value(name = "500")]
    #[serde(rename = "500")]
    ServerError,
    /// 429 Too Many Requests with `Retry-After`.
    #[value(name = "429")]
    #[serde(rename = "429")]
    RateLimited,
    /// No answer for ten minutes.
    Hang,
    /// 401, as Mono answers a revoked or wrong secret key.
    #[value(name = "401")]
    #[serde(rename = "401")]
    KeyRevoked,
}

/// The knobs that can change at run time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Knobs {
    pub latency_ms: u64,
    pub failure_rate: f64,
    pub failure_mode: FailureMode,
    pub retry_after_secs: u64,
    pub reject_accounts: HashSet<String>,
    /// Answer `initiate` without `data.mono_url` (absent from older callers' knobs: off).
    #[serde(default)]
    pub missing_mono_url: bool,
}

pub struct SimState {
    secret_key: String,
    knobs: RwLock<Knobs>,
    stats: Mutex<BTreeMap<&'static str, u64>>,
    calls: Mutex<Vec<Call>>,
    /// The base of the links `initiate` hands out.
    pub public_url: String,
    pub links: Links,
    /// Where opened links send their webhooks.
    pub ingest: Option<Target>,
}

impl SimState {
    pub fn knobs(&self) -> Knobs {
        self.knobs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn key_matches(&self, request: &HttpRequest) -> bool {
        request.headers().get("mono-sec-key").and_then(|v| v.to_str().ok()) == Some(self.secret_key.as_str())
    }
}

/// One call to the re-authorise endpoint, for `GET /_sim/calls`.
#[derive(Clone, Serialize)]
struct Call {
    account: String,
    /// Who called: the `User-Agent` up to its version (`monohook-worker`, `monohook-api`).
    caller: String,
    /// When the call arrived, in ms since the Unix epoch.
    at_ms: i64,
    outcome: &'static str,
}

/// Calls kept for `/_sim/calls`; older ones are forgotten.
const MAX_CALLS_KEPT: usize = 200_000;

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let knobs = Knobs {
        latency_ms: args.latency_ms,
        failure_rate: args.failure_rate,
        failure_mode: args.failure_mode,
        retry_after_secs: args.retry_after_secs,
        reject_accounts: args.reject_accounts.into_iter().filter(|a| !a.is_empty()).collect(),
        missing_mono_url: args.missing_mono_url,
    };
    let public_url = args.public_url.unwrap_or_else(|| {
        let mut addr = args.listen_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let state = web::Data::new(SimState {
        secret_key: args.secret_key,
        knobs: RwLock::new(knobs),
        stats: Mutex::new(BTreeMap::new()),
        calls: Mutex::new(Vec::new()),
        public_url: public_url.trim_end_matches('/').to_owned(),
        links: Links::default(),
        ingest: ingest_target(args.ingest_url, args.webhook_secret)?,
    });
    let app = web::Data::new(crate::app::AppState::new(args.app_secret.as_deref())?);
    tracing::info!(addr = %args.listen_addr, "mono-sim serving the re-authorise endpoint");
    HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(app.clone())
            .route("/_app/notifications", web::post().to(crate::app::receive))
            .route("/_app/notifications", web::get().to(crate::app::list))
            .route("/_app/requests", web::get().to(crate::app::requests))
            .route("/_app/config", web::post().to(crate::app::set_config))
            .route("/accounts/{id}/reauthorise", web::post().to(reauthorise))
            .route("/v2/accounts/initiate", web::post().to(links::initiate))
            .route("/reauth/{token}", web::get().to(links::open))
            .route("/_sim/config", web::get().to(get_config))
            .route("/_sim/config", web::post().to(set_config))
            .route("/_sim/stats", web::get().to(get_stats))
            .route("/_sim/calls", web::get().to(get_calls))
    })
    .bind(args.listen_addr)?
    .run()
    .await?;
    Ok(())
}

async fn reauthorise(
    request: HttpRequest,
    id: web::Path<String>,
    state: web::Data<SimState>,
) -> HttpResponse {
    let arrived_ms = chrono::Utc::now().timestamp_millis();
    let knobs = state.knobs();
    if knobs.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.latency_ms)).await;
    }
    let (outcome, response) = if !state.key_matches(&request) {
        ("unauthorized", HttpResponse::Unauthorized().json(json!({ "message": "Invalid secret key" })))
    } else if knobs.reject_accounts.contains(id.as_str()) {
        (
            "rejected",
            HttpResponse::BadRequest().json(json!({ "message": "This account can not be re-authorised." })),
        )
    } else if fastrand::f64() < knobs.failure_rate {
        let caller = caller_of(&request);
        match answer_failure(&state, &id, &caller, arrived_ms, knobs.failure_mode, knobs.retry_after_secs)
            .await
        {
            Some(failed) => failed,
            None => return HttpResponse::GatewayTimeout().finish(),
        }
    } else {
        let token: String = std::iter::repeat_with(fastrand::alphanumeric).take(20).collect();
        ("token", HttpResponse::Ok().json(json!({ "token": token })))
    };
    count(&state, outcome);
    remember(&state, &id, &caller_of(&request), arrived_ms, outcome);
    response
}

/// The calling product named by `User-Agent` (`monohook-worker/0.1.0` → `monohook-worker`).
pub fn caller_of(request: &HttpRequest) -> String {
    let agent = request.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or_default();
    agent.split('/').next().unwrap_or_default().to_owned()
}

/// A failing call's answer as `mode` says; `None` after a hang (counted and remembered here).
pub async fn answer_failure(
    state: &SimState,
    account: &str,
    caller: &str,
    arrived_ms: i64,
    mode: FailureMode,
    retry_after_secs: u64,
) -> Option<(&'static str, HttpResponse)> {
    Some(match mode {
        FailureMode::ServerError => {
            ("failed_500", HttpResponse::InternalServerError().json(json!({ "message": "Internal error" })))
        }
        FailureMode::RateLimited => (
            "failed_429",
            HttpResponse::TooManyRequests()
                .insert_header(("retry-after", retry_after_secs.to_string()))
                .json(json!({ "message": "Too many requests" })),
        ),
        FailureMode::KeyRevoked => {
            ("failed_401", HttpResponse::Unauthorized().json(json!({ "message": "Invalid secret key" })))
        }
        FailureMode::Hang => {
            count(state, "hung");
            remember(state, account, caller, arrived_ms, "hung");
            tokio::time::sleep(Duration::from_secs(600)).await;
            return None;
        }
    })
}

pub fn count(state: &SimState, outcome: &'static str) {
    *state.stats.lock().unwrap_or_else(|e| e.into_inner()).entry(outcome).or_default() += 1;
}

pub fn remember(state: &SimState, account: &str, caller: &str, arrived_ms: i64, outcome: &'static str) {
    let mut calls = state.calls.lock().unwrap_or_else(|e| e.into_inner());
    if calls.len() >= MAX_CALLS_KEPT {
        calls.drain(..MAX_CALLS_KEPT / 2);
    }
    calls.push(Call { account: account.to_owned(), caller: caller.to_owned(), at_ms: arrived_ms, outcome });
}

async fn get_calls(state: web::Data<SimState>) -> HttpResponse {
    HttpResponse::Ok().json(&*state.calls.lock().unwrap_or_else(|e| e.into_inner()))
}

async fn get_config(state: web::Data<SimState>) -> HttpResponse {
    HttpResponse::Ok().json(&*state.knobs.read().unwrap_or_else(|e| e.into_inner()))
}

async fn set_config(state: web::Data<SimState>, knobs: web::Json<Knobs>) -> HttpResponse {
    tracing::info!(?knobs, "knobs changed");
    *state.knobs.write().unwrap_or_else(|e| e.into_inner()) = knobs.into_inner();
    get_config(state).await
}

async fn get_stats(state: web::Data<SimState>) -> HttpResponse {
    HttpResponse::Ok().json(&*state.stats.lock().unwrap_or_else(|e| e.into_inner()))
}
