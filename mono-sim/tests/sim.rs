//! mono-sim as the demo and the chaos suite use it: the binary, on a port of its own. Its token and
//! link endpoints, its knobs, and the customer finishing a re-auth link.

use serde_json::{Value, json};
use std::process::{Child, Command};
use std::time::Duration;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

struct Sim {
    child: Child,
    base: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_sim(extra: &[&str]) -> Sim {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_mono-sim"))
        .args(["serve", "--listen-addr", &format!("127.0.0.1:{port}"), "--secret-key", "sk_test"])
        .args(extra)
        .spawn()
        .unwrap();
    // Owned by `Sim` at once, so that its `Drop` kills and reaps the child whatever happens next.
    let sim = Sim { child, base: format!("http://127.0.0.1:{port}") };
    for _ in 0..200 {
        if reqwest::get(format!("{}/_sim/config", sim.base)).await.is_ok() {
            return sim;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("mono-sim did not start");
}

async fn reauthorise(sim: &Sim, account: &str, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/accounts/{account}/reauthorise", sim.base))
        .header("mono-sec-key", key)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn it_issues_fresh_tokens_to_the_right_key_only() {
    let sim = start_sim(&[]).await;

    let first: Value = reauthorise(&sim, "a1", "sk_test").await.json().await.unwrap();
    let second: Value = reauthorise(&sim, "a1", "sk_test").await.json().await.unwrap();
    let wrong_key = reauthorise(&sim, "a1", "nope").await;

    let token = first["token"].as_str().unwrap();
    assert_eq!(token.len(), 20);
    assert!(token.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_ne!(first["token"], second["token"]);
    assert_eq!(wrong_key.status().as_u16(), 401);
}

#[tokio::test]
async fn rejected_accounts_get_monos_400() {
    let sim = start_sim(&["--reject-accounts", "bad1,bad2"]).await;

    let response = reauthorise(&sim, "bad2", "sk_test").await;

    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["message"], "This account can not be re-authorised.");
    assert_eq!(reauthorise(&sim, "good", "sk_test").await.status().as_u16(), 200);
}

#[tokio::test]
async fn failures_follow_the_knobs_which_change_at_run_time() {
    let sim = start_sim(&["--failure-rate", "1", "--failure-mode", "429", "--retry-after-secs", "3"]).await;

    let limited = reauthorise(&sim, "a1", "sk_test").await;
    assert_eq!(limited.status().as_u16(), 429);
    assert_eq!(limited.headers()["retry-after"], "3");

    let knobs = json!({ "latency_ms": 0, "failure_rate": 1.0, "failure_mode": "500", "retry_after_secs": 1, "reject_accounts": [] });
    let set =
        reqwest::Client::new().post(format!("{}/_sim/config", sim.base)).json(&knobs).send().await.unwrap();
    assert_eq!(set.status().as_u16(), 200);
    assert_eq!(reauthorise(&sim, "a1", "sk_test").await.status().as_u16(), 500);

    let stats: Value = reqwest::get(format!("{}/_sim/stats", sim.base)).await.unwrap().json().await.unwrap();
    assert_eq!(stats, json!({ "failed_429": 1, "failed_500": 1 }));
}

#[tokio::test]
async fn send_posts_a_mono_shaped_webhook_with_the_secret() {
    let ingest = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/webhooks/mono"))
        .and(header("mono-webhook-secret", "whsec"))
        .and(body_partial_json(json!({
            "event": "mono.events.reauthorisation_required",
            "data": { "account": { "_id": "acc-9" } }
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "id": "x" })))
        .expect(1)
        .mount(&ingest)
        .await;

    let status = Command::new(env!("CARGO_BIN_EXE_mono-sim"))
        .args(["send", "--ingest-url", &format!("{}/webhooks/mono", ingest.uri()), "--secret", "whsec"])
        .args(["--event", "reauthorisation-required", "--account", "acc-9"])
        .status()
        .unwrap();

    assert!(status.success());
}

#[tokio::test]
async fn send_fails_loudly_when_ingest_refuses() {
    let ingest = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(401)).mount(&ingest).await;

    let output = Command::new(env!("CARGO_BIN_EXE_mono-sim"))
        .args(["send", "--ingest-url", &format!("{}/webhooks/mono", ingest.uri()), "--secret", "wrong"])
        .args(["--event", "account-updated", "--account", "acc-9"])
        .output()
        .unwrap();

    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
}

async fn initiate(sim: &Sim, key: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v2/accounts/initiate", sim.base))
        .header("mono-sec-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn reauth(account: &str) -> Value {
    json!({ "scope": "reauth", "account": account, "meta": { "ref": "mh_1" }, "redirect_url": "https://app.example.com/back" })
}

#[tokio::test]
async fn initiate_hands_out_a_link_on_its_own_address_after_checking_key_scope_and_account() {
    let sim = start_sim(&["--reject-accounts", "bad1"]).await;

    let answer: Value = initiate(&sim, "sk_test", reauth("a1")).await.json().await.unwrap();

    let url = answer["data"]["mono_url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/reauth/", sim.base)), "{url}");
    assert_eq!(answer["status"], "successful");
    assert_eq!(answer["data"]["meta"]["ref"], "mh_1");
    assert_eq!(initiate(&sim, "nope", reauth("a1")).await.status().as_u16(), 401);
    let auth_scope = json!({ "scope": "auth", "account": "a1" });
    assert_eq!(initiate(&sim, "sk_test", auth_scope).await.status().as_u16(), 400);
    assert_eq!(initiate(&sim, "sk_test", json!({ "scope": "reauth" })).await.status().as_u16(), 400);
    let rejected = initiate(&sim, "sk_test", reauth("bad1")).await;
    assert_eq!(rejected.status().as_u16(), 400);
    assert_eq!(rejected.json::<Value>().await.unwrap()["message"], "This account can not be re-authorised.");
}

#[tokio::test]
async fn initiate_fails_or_answers_without_mono_url_as_the_knobs_say() {
    let sim = start_sim(&["--missing-mono-url"]).await;

    let answer: Value = initiate(&sim, "sk_test", reauth("a1")).await.json().await.unwrap();
    assert!(answer["data"].get("mono_url").is_none(), "{answer}");

    let knobs = json!({ "latency_ms": 0, "failure_rate": 1.0, "failure_mode": "500", "retry_after_secs": 1, "reject_accounts": [] });
    reqwest::Client::new().post(format!("{}/_sim/config", sim.base)).json(&knobs).send().await.unwrap();
    assert_eq!(initiate(&sim, "sk_test", reauth("a1")).await.status().as_u16(), 500);
}

#[tokio::test]
async fn opening_a_link_sends_reauthorized_then_updated_to_ingest_then_redirects_once() {
    let ingest = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/webhooks/mono"))
        .and(header("mono-webhook-secret", "whsec"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "id": "x" })))
        .expect(2)
        .mount(&ingest)
        .await;
    let ingest_url = format!("{}/webhooks/mono", ingest.uri());
    let sim = start_sim(&["--ingest-url", &ingest_url, "--webhook-secret", "whsec"]).await;
    let answer: Value = initiate(&sim, "sk_test", reauth("acc-7")).await.json().await.unwrap();
    let link = answer["data"]["mono_url"].as_str().unwrap();
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    let opened = browser.get(link).send().await.unwrap();

    assert_eq!(opened.status().as_u16(), 302);
    assert_eq!(opened.headers()["location"], "https://app.example.com/back");
    let sent: Vec<Value> = ingest
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    let events: Vec<&str> = sent.iter().map(|b| b["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["mono.events.account_reauthorized", "mono.events.account_updated"]);
    assert!(sent.iter().all(|b| b["data"]["account"]["_id"] == "acc-7"));
    assert_eq!(browser.get(link).send().await.unwrap().status().as_u16(), 410, "a link works once");
    let unknown = browser.get(format!("{}/reauth/nope", sim.base)).send().await.unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
}
