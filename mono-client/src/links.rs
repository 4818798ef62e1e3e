//! Mono's v2 re-auth link: `POST {base}/v2/accounts/initiate` with `mono-sec-key` and
//! `{"scope": "reauth", "account": <id>, "meta": {"ref": <ours>}, "redirect_url": <optional>}`.
//!
//! Mono documents no example answer for the re-auth scope; its first-link answer (`scope: "auth"`)
//! is `{"status", "message", "timestamp", "data": {"mono_url", …}}` and public clients read
//! `data.mono_url`, so that is all this reads: anything else in the answer is ignored, and an answer
//! without a usable `data.mono_url` is [`LinkAnswer::Unexpected`] with the names of the fields it did
//! have (never their values: the answer may hold the link, whose token is the customer's way in).
//! Non-2xx answers are classified exactly as the re-authorise endpoint's are (`client::post`).

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use std::fmt;
use tracing::Instrument;

use crate::client::{MonoClient, MonoError};
use shared::event::AccountId;

/// A hosted re-auth link. `Debug` never shows the URL (it carries the customer's way in).
#[derive(Clone)]
pub struct ReauthLink {
    url: SecretString,
    /// When we asked Mono for it.
    pub created_at: DateTime<Utc>,
}

impl ReauthLink {
    pub fn expose(&self) -> &str {
        self.url.expose_secret()
    }
}

impl fmt::Debug for ReauthLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReauthLink")
            .field("url", &"[REDACTED]")
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// What a 2xx answer to `initiate` held.
#[derive(Clone, Debug)]
pub enum LinkAnswer {
    Link(ReauthLink),
    /// No usable `data.mono_url`: the names of the fields the answer had (`data.` for those under
    /// `data`), for the log.
    Unexpected {
        fields: Vec<String>,
    },
}

/// What we ask Mono for: a re-auth link for `account`, tagged with our `reference`.
#[derive(Clone, Debug)]
pub struct LinkRequest {
    pub account: AccountId,
    /// Ours, unique per link: sent as `meta.ref`, so Mono's side can be matched with our audit.
    pub reference: String,
    /// Where Mono sends the customer when they finish (already checked against the allowlist).
    pub redirect_url: Option<String>,
}

impl LinkRequest {
    fn body(&self) -> Value {
        let mut body = json!({
            "scope": "reauth",
            "account": self.account.as_str(),
            "meta": { "ref": self.reference },
        });
        if let Some(redirect) = &self.redirect_url {
            body["redirect_url"] = json!(redirect);
        }
        body
    }
}

impl MonoClient {
    /// Asks Mono for a hosted re-auth link. One `mono.initiate` span per call, with the account, the
    /// status and the answer's class; never the key, the link or a body.
    pub async fn initiate_reauth(&self, request: &LinkRequest) -> Result<LinkAnswer, MonoError> {
        let span = tracing::info_span!(
            "mono.initiate",
            otel.kind = "client",
            account = request.account.as_str(),
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let created_at = Utc::now();
        let answer = self
            .post(&["v2", "accounts", "initiate"], Some(&request.body()))
            .instrument(span.clone())
            .await
            .map(|(_, body)| parse_answer(&body, created_at));
        span.record("outcome", answer.as_ref().map_or_else(MonoError::status_class, |_| "2xx"));
        if answer.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        answer
    }
}

/// Reads `data.mono_url` from a 2xx body, tolerating anything else around it.
pub fn parse_answer(body: &[u8], created_at: DateTime<Utc>) -> LinkAnswer {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return LinkAnswer::Unexpected { fields: vec!["(not JSON)".to_owned()] };
    };
    let url = value.pointer("/data/mono_url").and_then(Value::as_str).map(str::trim);
    if let Some(url) = url.filter(|u| u.starts_with("https://") || u.starts_with("http://")) {
        return LinkAnswer::Link(ReauthLink { url: SecretString::from(url.to_owned()), created_at });
    }
    let mut fields = Vec::new();
    if let Some(top) = value.as_object() {
        for (name, inner) in top {
            fields.push(name.clone());
            if let (true, Some(data)) = (name == "data", inner.as_object()) {
                fields.extend(data.keys().map(|k| format!("data.{k}")));
            }
        }
    }
    LinkAnswer::Unexpected { fields }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(answer: LinkAnswer) -> Option<String> {
        match answer {
            LinkAnswer::Link(link) => Some(link.expose().to_owned()),
            LinkAnswer::Unexpected { .. } => None,
        }
    }

    #[test]
    fn data_mono_url_is_read_and_everything_else_is_ignored() {
        let body = br#"{"status":"successful","message":"Request completed","timestamp":"2024-05-01T00:00:00Z",
            "data":{"mono_url":"https://link.mono.co/RIxyz","customer":"c1","meta":{"ref":"r"},"extra":[1]},"new":true}"#;
        assert_eq!(link(parse_answer(body, Utc::now())).as_deref(), Some("https://link.mono.co/RIxyz"));
    }

    #[test]
    fn an_answer_without_a_usable_link_names_its_fields_and_never_their_values() {
        let body = br#"{"status":"successful","data":{"id":"secret-value","url":"https://x"}}"#;
        let LinkAnswer::Unexpected { fields } = parse_answer(body, Utc::now()) else { panic!("a link?") };
        assert_eq!(fields, ["data", "data.id", "data.url", "status"]);
        for bad in [
            &br#"{"data":{"mono_url":""}}"#[..],
            br#"{"data":{"mono_url":"javascript:x"}}"#,
            b"[]",
            b"<html>",
        ] {
            assert!(link(parse_answer(bad, Utc::now())).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_link_never_shows_in_debug_output() {
        let LinkAnswer::Link(link) = parse_answer(br#"{"data":{"mono_url":"https://l/tok123"}}"#, Utc::now())
        else {
            panic!()
        };
        assert!(!format!("{link:?}").contains("tok123"));
    }

    #[test]
    fn the_request_sends_scope_account_ref_and_the_redirect_only_when_given() {
        let mut request = LinkRequest {
            account: AccountId::parse("acct-1").unwrap(),
            reference: "mh-1".into(),
            redirect_url: None,
        };
        assert_eq!(
            request.body(),
            json!({ "scope": "reauth", "account": "acct-1", "meta": { "ref": "mh-1" } })
        );
        request.redirect_url = Some("https://app.example.com/back".into());
        assert_eq!(request.body()["redirect_url"], "https://app.example.com/back");
    }
}
