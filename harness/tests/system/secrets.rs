//! Secrets and tokens never reach the logs, whatever happens on the way.

use harness::system::{APP_API_KEY, APP_NOTIFY_SECRET, MONO_KEY, System, SystemConfig, WEBHOOK_SECRET};

use crate::story;

#[tokio::test]
async fn no_secret_and_no_token_appears_in_any_log() {
    let system = System::start(SystemConfig::default(), 1).await.unwrap();
    // A wrong secret too: rejections must not echo what was sent.
    let wrong = "wrong-secret-that-must-not-be-logged";
    let rejected = reqwest::Client::new()
        .post(format!("{}/webhooks/mono", system.ingest_url()))
        .header("mono-webhook-secret", wrong)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status().as_u16(), 401);

    let story = story::play(&system).await;

    let logs = system.all_logs();
    assert!(logs.lines().count() > 10, "the processes logged nothing?");
    // The app was told, signed with APP_NOTIFY_SECRET (checked by PyPI's standardwebhooks).
    system
        .wait_for_count("SELECT count(*) FROM notification_deliveries", 0, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let (requests, verdicts) = system.app_requests_verified().await.unwrap();
    assert!(requests > 0, "no notification reached the app");
    assert!(verdicts.iter().all(|v| v.starts_with("ok ")) && verdicts.len() == requests, "{verdicts:?}");
    let notify_key = APP_NOTIFY_SECRET.trim_start_matches("whsec_");
    for secret in [WEBHOOK_SECRET, MONO_KEY, wrong, story.token.as_str(), notify_key] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    system.shut_down().await.unwrap();
}

#[tokio::test]
async fn the_api_logs_no_key_and_no_token_it_hands_out() {
    let mut system = System::start(SystemConfig::default(), 1).await.unwrap();
    let api = system.start_api().await.unwrap();
    let http = reqwest::Client::new();
    // A flagged account, through the whole pipeline.
    let (status, _) = system.post(&harness::bodies::reauthorisation_required(story::ACCOUNT)).await.unwrap();
    assert_eq!(status, 200);
    let flagged = "SELECT count(*) FROM accounts WHERE reauth_required AND reauth_token IS NOT NULL";
    assert_eq!(system.wait_for_count(flagged, 1, std::time::Duration::from_secs(20)).await.unwrap(), 1);

    let url = format!("{api}/v1/accounts/{}/reauth-token", story::ACCOUNT);
    let stored: serde_json::Value =
        http.post(&url).bearer_auth(APP_API_KEY).send().await.unwrap().json().await.unwrap();
    // The stored token is about to expire: the next one is fresh from Mono.
    sqlx::query("UPDATE accounts SET reauth_token_expires_at = now() + interval '30 seconds'")
        .execute(&system.pool)
        .await
        .unwrap();
    let fresh: serde_json::Value =
        http.post(&url).bearer_auth(APP_API_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!((stored["source"].as_str(), fresh["source"].as_str()), (Some("stored"), Some("fresh")));
    let wrong = "wrong-app-key-that-must-not-be-logged";
    let refused = http.post(&url).bearer_auth(wrong).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);

    let logs = system.all_logs();
    assert!(logs.contains("re-auth token handed out"), "the api logged nothing?");
    for secret in
        [APP_API_KEY, MONO_KEY, wrong, stored["token"].as_str().unwrap(), fresh["token"].as_str().unwrap()]
    {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    system.shut_down().await.unwrap();
}
