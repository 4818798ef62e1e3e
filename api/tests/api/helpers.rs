use chrono::{DateTime, Duration, Utc};
use clap::Parser;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use api::config::ApiConfig;
use api::startup::Application;
use shared::testing::init_test_logging;

pub const MOBILE_KEY: &str = "mobile-key-0123456789";
pub const WEB_KEY: &str = "web-key-0123456789abcdef";
pub const MONO_KEY: &str = "test_sk_0123456789";

/// One running API on its own port, over the test's database.
pub struct TestApp {
    pub address: String,
    pub metrics: String,
    pub http: reqwest::Client,
    cancel: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn config(mono: &MockServer, extra: &[&str]) -> ApiConfig {
    let mut args = vec![
        "api".to_owned(),
        "--listen-addr".into(),
        "127.0.0.1:0".into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
        "--app-api-keys".into(),
        format!("mobile:{MOBILE_KEY},web:{WEB_KEY}"),
        "--mono-secret-key".into(),
        MONO_KEY.into(),
        "--mono-api-url".into(),
        mono.uri(),
        "--mono-retry-budget-ms".into(),
        "300".into(),
        "--http-workers".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    ApiConfig::parse_from(args)
}

pub async fn spawn_app(pool: PgPool, mono: &MockServer) -> TestApp {
    spawn_app_with(pool, mono, &[]).await
}

pub async fn spawn_app_with(pool: PgPool, mono: &MockServer, extra: &[&str]) -> TestApp {
    init_test_logging();
    let cancel = CancellationToken::new();
    let app =
        Application::build(config(mono, extra), pool, cancel.clone()).await.expect("api failed to build");
    let address = format!("http://127.0.0.1:{}", app.port());
    let metrics = format!("http://{}/metrics", app.metrics_addr());
    tokio::spawn(app.run_until_stopped());
    TestApp { address, metrics, http: reqwest::Client::new(), cancel }
}

impl TestApp {
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.address)).bearer_auth(MOBILE_KEY).send().await.unwrap()
    }

    pub async fn get_with(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let request = self.http.get(format!("{}{path}", self.address));
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        request.send().await.unwrap()
    }

    pub async fn reauth_token(&self, account: &str) -> reqwest::Response {
        self.reauth_token_with(account, MOBILE_KEY).await
    }

    pub async fn reauth_token_with(&self, account: &str, key: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/accounts/{account}/reauth-token", self.address))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }
}

pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.unwrap()
}

/// An account row as the worker would have left it.
pub struct Seed<'a> {
    pub id: &'a str,
    pub reauth_required: bool,
    pub token: Option<(&'a str, DateTime<Utc>)>,
    pub unlinked: bool,
}

impl<'a> Seed<'a> {
    pub fn flagged(id: &'a str) -> Self {
        Self { id, reauth_required: true, token: None, unlinked: false }
    }

    pub fn with_token(mut self, token: &'a str, issued_at: DateTime<Utc>) -> Self {
        self.token = Some((token, issued_at));
        self
    }

    pub async fn insert(&self, pool: &PgPool) {
        sqlx::query(
            "INSERT INTO accounts (id, reauth_required, reauth_token, reauth_token_issued_at, reauth_token_expires_at,
                                   unlinked_at, reauth_state_received_at)
             VALUES ($1, $2, $3, $4, $4 + interval '10 minutes', $5, now())",
        )
        .bind(self.id)
        .bind(self.reauth_required)
        .bind(self.token.map(|(t, _)| t))
        .bind(self.token.map(|(_, at)| at))
        .bind(self.unlinked.then(Utc::now))
        .execute(pool)
        .await
        .unwrap();
    }
}

/// Issued this long ago: a stored token with `10 min - ago` left.
pub fn issued_ago(minutes: i64) -> DateTime<Utc> {
    Utc::now() - Duration::minutes(minutes)
}

/// Mono hands out `token` for `account` (checking the secret key), after `delay_ms`.
pub fn mono_issues(account: &str, token: &str, delay_ms: u64) -> Mock {
    Mock::given(method("POST"))
        .and(path(format!("/accounts/{account}/reauthorise")))
        .and(header("mono-sec-key", MONO_KEY))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "token": token }))
                .set_delay(std::time::Duration::from_millis(delay_ms)),
        )
}

pub async fn stored_token(pool: &PgPool, id: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>("SELECT reauth_token FROM accounts WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}
