//! Secrets and tokens never reach the logs, whatever happens on the way.

use harness::system::{MONO_KEY, System, SystemConfig, WEBHOOK_SECRET};

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
    for secret in [WEBHOOK_SECRET, MONO_KEY, wrong, story.token.as_str()] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    system.shut_down().await.unwrap();
}
