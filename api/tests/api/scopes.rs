//! Keys have a scope (issue 28): a key limited to some of read, list, tokens and links gets 403 for
//! the rest, without a call to Mono; a key written without a scope may do everything; hand-outs
//! record the key's label.

use sqlx::PgPool;
use wiremock::MockServer;

use crate::helpers::{Seed, json, mono_issues, spawn_app_with};
use crate::reauth_link::mono_links;

const BACKEND: &str = "backend-key-0123456789";
const SUPPORT: &str = "support-key-0123456789";
const SIGNIN: &str = "signin-key-0123456789ab";

#[sqlx::test(migrations = "../migrations")]
async fn a_key_may_do_what_its_scope_allows_and_nothing_else(pool: PgPool) {
    let mono = MockServer::start().await;
    mono_issues("acct-1", "fresh-token", 0).expect(1).mount(&mono).await;
    mono_links("acct-1", "https://link.mono.co/RI1", 0).expect(0).mount(&mono).await;
    Seed::flagged("acct-1").insert(&pool).await;
    let keys = format!("backend:{BACKEND},support/read+list:{SUPPORT},signin/tokens:{SIGNIN}");
    let app = spawn_app_with(pool.clone(), &mono, &["--app-api-keys", &keys]).await;

    for path in ["/v1/accounts/acct-1", "/v1/accounts"] {
        assert_eq!(app.get_with(path, Some(SUPPORT)).await.status().as_u16(), 200, "support {path}");
        assert_eq!(app.get_with(path, Some(BACKEND)).await.status().as_u16(), 200, "backend {path}");
        let refused = app.get_with(path, Some(SIGNIN)).await;
        assert_eq!(refused.status().as_u16(), 403, "signin {path}");
        assert_eq!(json(refused).await["error"], "forbidden");
    }
    let refused = app.reauth_token_with("acct-1", SUPPORT).await;
    assert_eq!(refused.status().as_u16(), 403, "support may not get tokens");
    let refused_link = app
        .http
        .post(format!("{}/v1/accounts/acct-1/reauth-link", app.address))
        .bearer_auth(SIGNIN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused_link.status().as_u16(), 403, "signin may not get links");

    let token = app.reauth_token_with("acct-1", SIGNIN).await;

    assert_eq!(token.status().as_u16(), 200);
    assert_eq!(json(token).await["token"], "fresh-token");
    // The recorder writes in batches: wait for the row.
    let mut label = None;
    for _ in 0..100 {
        label = sqlx::query_scalar::<_, String>(
            "SELECT key_label FROM token_issuances WHERE account_id = 'acct-1'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if label.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(label.as_deref(), Some("signin"), "the label, without its scope");
}
