//! The app's backend, played for the demo and the chaos suite: receives monohook's notifications at
//! `POST /_app/notifications`, checks their Standard Webhooks signature (with `--app-secret`), and
//! keeps what it took. Knobs (`POST /_app/config`): an answer status other than 2xx (down), a
//! latency (slow), a failure rate (500 at random, optionally at most n times per notification).
//! `GET /_app/notifications` lists what was taken,
//! with every `webhook-id` each (account, sequence) came with and how many tries reached the app;
//! `GET /_app/requests` gives each request it took as received, for an independent verifier.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// How the app answers, changeable while running.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppKnobs {
    /// The status of every answer (`0` or absent: 204).
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of requests answered 500 (0.0 to 1.0).
    #[serde(default)]
    pub failure_rate: f64,
    /// At most this many of one notification's tries fail by `failure_rate` (`0`: no bound), so a
    /// test knows how long its retries can take rather than hoping the dice are kind.
    #[serde(default)]
    pub most_failures_each: u64,
}

/// One notification the app took (answered 2xx).
#[derive(Clone, Debug, Serialize)]
pub struct Taken {
    #[serde(rename = "type")]
    pub kind: String,
    pub account_id: String,
    pub sequence: i64,
    pub reauth_required: bool,
    pub unlinked: bool,
    /// Every `webhook-id` a try of this (account, sequence) carried (one, if ids are stable).
    pub ids: BTreeSet<String>,
    /// Tries of it that reached the app, taken or not.
    pub tries: u64,
    /// Times it was taken (more than one: delivered again, as at-least-once allows).
    pub taken: u64,
    /// When it was first taken, in ms since the Unix epoch.
    pub first_taken_ms: i64,
}

#[derive(Default)]
pub struct AppState {
    /// The endpoint's key (decoded `whsec_`); none: signatures are not checked.
    key: Option<Vec<u8>>,
    knobs: RwLock<AppKnobs>,
    taken: Mutex<BTreeMap<(String, i64), Taken>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Each request taken, as received (the Standard Webhooks headers and the body, base64), for a
    /// verifier that is not ours (`GET /_app/requests`).
    requests: Mutex<Vec<serde_json::Value>>,
}

/// Requests kept for `/_app/requests`; later ones are not kept.
const MAX_REQUESTS_KEPT: usize = 100_000;

impl AppState {
    pub fn new(secret: Option<&str>) -> anyhow::Result<Self> {
        let key = secret
            .map(|secret| {
                let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
                STANDARD.decode(encoded).map_err(|_| anyhow::anyhow!("--app-secret is not whsec_ and base64"))
            })
            .transpose()?;
        Ok(Self { key, ..Self::default() })
    }
}

#[derive(Deserialize)]
struct Body {
    #[serde(rename = "type")]
    kind: String,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    account_id: String,
    sequence: i64,
    reauth_required: bool,
    unlinked: bool,
}

pub async fn receive(request: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let header =
        |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (id, timestamp, signatures) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    if let Some(key) = &state.key
        && let Err(why) = verify(key, &id, &timestamp, &signatures, &body)
    {
        *state.refused.lock().unwrap_or_else(|e| e.into_inner()).entry(why).or_default() += 1;
        return HttpResponse::BadRequest().body(why);
    }
    let Ok(parsed) = serde_json::from_slice::<Body>(&body) else {
        *state.refused.lock().unwrap_or_else(|e| e.into_inner()).entry("not a notification").or_default() +=
            1;
        return HttpResponse::BadRequest().body("not a notification");
    };
    let knobs = state.knobs.read().unwrap_or_else(|e| e.into_inner()).clone();
    if knobs.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.latency_ms)).await;
    }
    let refusing = knobs.status != 0 && !(200..300).contains(&knobs.status);
    let mut taken = state.taken.lock().unwrap_or_else(|e| e.into_inner());
    let entry =
        taken.entry((parsed.data.account_id.clone(), parsed.data.sequence)).or_insert_with(|| Taken {
            kind: parsed.kind.clone(),
            account_id: parsed.data.account_id.clone(),
            sequence: parsed.data.sequence,
            reauth_required: parsed.data.reauth_required,
            unlinked: parsed.data.unlinked,
            ids: BTreeSet::new(),
            tries: 0,
            taken: 0,
            first_taken_ms: 0,
        });
    entry.ids.insert(id.clone());
    let failed_before = entry.tries - entry.taken;
    entry.tries += 1;
    let by_chance = fastrand::f64() < knobs.failure_rate
        && (knobs.most_failures_each == 0 || failed_before < knobs.most_failures_each);
    if refusing || by_chance {
        let status = if refusing { knobs.status } else { 500 };
        return HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default())
            .finish();
    }
    if entry.taken == 0 {
        entry.first_taken_ms = chrono::Utc::now().timestamp_millis();
    }
    entry.taken += 1;
    drop(taken);
    let mut requests = state.requests.lock().unwrap_or_else(|e| e.into_inner());
    if requests.len() < MAX_REQUESTS_KEPT {
        requests.push(serde_json::json!({
            "headers": { "webhook-id": id, "webhook-timestamp": timestamp, "webhook-signature": signatures },
            "body_b64": STANDARD.encode(&body),
        }));
    }
    HttpResponse::NoContent().finish()
}

/// The Standard Webhooks check, as an app does it: a fresh timestamp and one matching signature.
fn verify(key: &[u8], id: &str, timestamp: &str, signatures: &str, body: &[u8]) -> Result<(), &'static str> {
    if id.is_empty() || timestamp.is_empty() || signatures.is_empty() {
        return Err("missing headers");
    }
    let at: i64 = timestamp.parse().map_err(|_| "bad timestamp")?;
    if (chrono::Utc::now().timestamp() - at).abs() > 300 {
        return Err("timestamp more than five minutes off");
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| "bad key")?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    if signatures.split(' ').any(|signature| signature == expected) {
        Ok(())
    } else {
        Err("no matching signature")
    }
}

pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let taken = state.taken.lock().unwrap_or_else(|e| e.into_inner());
    let refused = state.refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
    HttpResponse::Ok().json(serde_json::json!({
        "notifications": taken.values().collect::<Vec<_>>(),
        "refused": refused,
    }))
}

pub async fn requests(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(&*state.requests.lock().unwrap_or_else(|e| e.into_inner()))
}

pub async fn set_config(state: web::Data<AppState>, knobs: web::Json<AppKnobs>) -> HttpResponse {
    tracing::info!(?knobs, "the app's knobs changed");
    *state.knobs.write().unwrap_or_else(|e| e.into_inner()) = knobs.into_inner();
    HttpResponse::Ok().json(&*state.knobs.read().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_checks_a_signature_as_the_specification_makes_it() {
        let key = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let now = chrono::Utc::now().timestamp().to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("msg_1.{now}.{{}}").as_bytes());
        let good = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        assert_eq!(verify(&key, "msg_1", &now, &format!("v1,bad {good}"), b"{}"), Ok(()));
        assert_eq!(verify(&key, "msg_2", &now, &good, b"{}"), Err("no matching signature"));
        assert_eq!(verify(&key, "msg_1", "1", &good, b"{}"), Err("timestamp more than five minutes off"));
    }
}
