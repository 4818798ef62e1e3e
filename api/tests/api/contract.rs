//! The OpenAPI document served at /openapi.json agrees with the routes: every documented operation
//! exists, nothing else does.

use sqlx::PgPool;
use std::collections::BTreeSet;
use wiremock::MockServer;

use crate::helpers::{MOBILE_KEY, json, spawn_app};

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

#[sqlx::test(migrations = "../migrations")]
async fn the_served_document_is_the_contract_and_matches_the_routes(pool: PgPool) {
    let mono = MockServer::start().await;
    let app = spawn_app(pool, &mono).await;
    let spec = json(app.get("/openapi.json").await).await;
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(spec, serde_json::from_str::<serde_json::Value>(api::routes::OPENAPI).unwrap());

    let mut documented = BTreeSet::new();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "acct-1");
        for method in METHODS {
            let status = app
                .http
                .request(method.to_uppercase().parse().unwrap(), format!("{}{concrete}", app.address))
                .bearer_auth(MOBILE_KEY)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            if operations.get(method).is_some() {
                documented.insert(format!("{method} {path}"));
                assert!(status != 405, "{method} {path} is documented but answers {status}");
                let answers = operations[method]["responses"].as_object().unwrap();
                assert!(
                    answers.contains_key(&status.to_string()),
                    "{method} {path} answered an undocumented {status}"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is not documented but answers {status}");
            }
        }
    }
    assert_eq!(
        documented,
        BTreeSet::from(
            [
                "get /v1/accounts",
                "get /v1/accounts/{id}",
                "post /v1/accounts/{id}/reauth-token",
                "post /v1/accounts/{id}/reauth-link",
                "get /healthz",
                "get /readyz",
                "get /openapi.json"
            ]
            .map(String::from)
        )
    );
    let nowhere = app.get("/nowhere").await;
    assert_eq!(nowhere.status().as_u16(), 404);
    assert_eq!(json(nowhere).await["error"], "not_found");
}
