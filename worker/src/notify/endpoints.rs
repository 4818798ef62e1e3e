//! The app's endpoints, from `NOTIFY_ENDPOINTS` (JSON): where notifications go, with which secrets
//! they are signed, and which kinds each endpoint takes.
//!
//! ```json
//! [{"name": "app", "url": "https://app.example/hooks/monohook",
//!   "secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
//!   "events": ["account.reauth_required", "account.reauthorized"]}]
//! ```
//!
//! Checked at start, never echoing a secret: `https` unless the host is a loopback address (local
//! development), a name at most 64 characters of `[a-z0-9_-]`, at least one secret, each `whsec_` and
//! base64 of 24 to 64 bytes (several at once during a rotation: every one signs).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretSlice};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use url::Url;

use super::change::NoticeKind;

/// One endpoint of the app.
pub struct Endpoint {
    pub name: String,
    pub url: Url,
    /// The keys (decoded from `whsec_`), newest last; the request carries one signature per key.
    pub keys: Vec<SecretSlice<u8>>,
    pub kinds: BTreeSet<NoticeKind>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("keys", &format_args!("[{} REDACTED]", self.keys.len()))
            .field("kinds", &self.kinds)
            .finish()
    }
}

impl Endpoint {
    pub fn takes(&self, kind: NoticeKind) -> bool {
        self.kinds.contains(&kind)
    }
}

/// Why `NOTIFY_ENDPOINTS` was refused. Never holds a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointsError {
    #[error("NOTIFY_ENDPOINTS is not a JSON list of endpoints ({0})")]
    NotJson(String),
    #[error("endpoint {position}: {problem}")]
    Endpoint { position: usize, problem: String },
    #[error("two endpoints are named {0:?}")]
    SameName(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    name: String,
    url: String,
    secrets: Vec<String>,
    #[serde(default)]
    events: Option<Vec<String>>,
}

/// Parses and checks `NOTIFY_ENDPOINTS`. An empty value means no endpoint: nothing is written.
pub fn parse(raw: &str) -> Result<Vec<Endpoint>, EndpointsError> {
    if raw.trim().is_empty() {
        return Ok(Vec::new());
    }
    // serde_json's message names a line and column, never the value it read.
    let raws: Vec<RawEndpoint> = serde_json::from_str(raw).map_err(|error| {
        EndpointsError::NotJson(format!(
            "{:?} at line {} column {}",
            error.classify(),
            error.line(),
            error.column()
        ))
    })?;
    let mut names = BTreeSet::new();
    let mut endpoints = Vec::with_capacity(raws.len());
    for (index, raw) in raws.into_iter().enumerate() {
        let position = index + 1;
        let fail = |problem: String| EndpointsError::Endpoint { position, problem };
        let endpoint = check(raw).map_err(fail)?;
        if !names.insert(endpoint.name.clone()) {
            return Err(EndpointsError::SameName(endpoint.name));
        }
        endpoints.push(endpoint);
    }
    Ok(endpoints)
}

fn check(raw: RawEndpoint) -> Result<Endpoint, String> {
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 64
        && raw.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        return Err("the name must be 1 to 64 characters of a-z, 0-9, - and _".to_owned());
    }
    let url =
        Url::parse(&raw.url).map_err(|error| format!("{:?}: the url does not parse ({error})", raw.name))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{:?}: the url must not carry credentials (the signature authenticates)",
            raw.name
        ));
    }
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&url) => {}
        "http" => {
            return Err(format!("{:?}: the url must be https (http only to a loopback address)", raw.name));
        }
        other => return Err(format!("{:?}: the url's scheme {other:?} is not https", raw.name)),
    }
    if raw.secrets.is_empty() {
        return Err(format!("{:?}: at least one secret is needed", raw.name));
    }
    let mut keys = Vec::with_capacity(raw.secrets.len());
    for (index, secret) in raw.secrets.iter().enumerate() {
        let which = format!("{:?}: secret {}", raw.name, index + 1);
        let Some(encoded) = secret.strip_prefix("whsec_") else {
            return Err(format!("{which} does not start with whsec_"));
        };
        let key = STANDARD.decode(encoded).map_err(|_| format!("{which} is not base64 after whsec_"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!("{which} decodes to {} bytes; 24 to 64 are accepted", key.len()));
        }
        keys.push(SecretSlice::from(key));
    }
    let kinds = match raw.events {
        None => NoticeKind::ALL.into_iter().collect(),
        Some(names) => {
            let mut kinds = BTreeSet::new();
            for name in names {
                let kind = NoticeKind::parse(&name).ok_or_else(|| {
                    format!(
                        "{:?}: unknown event {name:?} (known: {})",
                        raw.name,
                        NoticeKind::ALL.map(NoticeKind::as_str).join(", ")
                    )
                })?;
                kinds.insert(kind);
            }
            if kinds.is_empty() {
                return Err(format!(
                    "{:?}: the events list is empty (leave it out for every event)",
                    raw.name
                ));
            }
            kinds
        }
    };
    Ok(Endpoint { name: raw.name, url, keys, kinds })
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

/// A fresh secret in the Standard Webhooks form, for `worker notify new-secret`.
pub fn new_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("whsec_{}", STANDARD.encode(key))
}

/// The decoded key, for signing only.
pub fn key_bytes(key: &SecretSlice<u8>) -> &[u8] {
    key.expose_secret()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn one(json: serde_json::Value) -> Result<Vec<Endpoint>, EndpointsError> {
        parse(&serde_json::json!([json]).to_string())
    }

    #[test]
    fn a_good_endpoint_takes_every_kind_unless_told() {
        let endpoints =
            one(serde_json::json!({"name": "app", "url": "https://app.example/h", "secrets": [SECRET]}))
                .unwrap();
        assert_eq!(endpoints[0].kinds.len(), 4);
        let some =
            one(serde_json::json!({"name": "app", "url": "https://app.example/h", "secrets": [SECRET],
                                          "events": ["account.unlinked"]}))
            .unwrap();
        assert!(some[0].takes(NoticeKind::Unlinked) && !some[0].takes(NoticeKind::ReauthRequired));
    }

    #[test]
    fn plain_http_is_refused_except_to_loopback() {
        let to =
            |url: &str| one(serde_json::json!({"name": "app", "url": url, "secrets": [SECRET]})).map(drop);
        assert!(to("http://app.example/h").unwrap_err().to_string().contains("must be https"));
        assert!(to("http://10.0.0.5/h").is_err());
        assert!(to("ftp://app.example/h").is_err());
        assert!(to("http://127.0.0.1:8080/h").is_ok());
        assert!(to("http://[::1]:8080/h").is_ok());
        assert!(to("http://localhost:8080/h").is_ok());
    }

    #[test]
    fn a_refused_secret_is_never_echoed() {
        for bad in ["whsec_not base64!!", "sk_live_abcdef", "whsec_c2hvcnQ="] {
            let error = one(serde_json::json!({"name": "app", "url": "https://a.example", "secrets": [bad]}))
                .unwrap_err()
                .to_string();
            assert!(!error.contains(bad) && !error.contains(&bad[6..]), "{error}");
        }
        let error =
            parse(&format!("[{{\"name\": \"app\", \"secrets\": [\"{SECRET}\"")).unwrap_err().to_string();
        assert!(!error.contains(&SECRET[6..]), "{error}");
        let endpoints =
            one(serde_json::json!({"name": "app", "url": "https://a.example", "secrets": [SECRET]})).unwrap();
        assert!(!format!("{endpoints:?}").contains(&SECRET[6..]));
    }

    #[test]
    fn names_are_unique_and_events_known() {
        let two = serde_json::json!([
            {"name": "app", "url": "https://a.example", "secrets": [SECRET]},
            {"name": "app", "url": "https://b.example", "secrets": [SECRET]}
        ]);
        assert_eq!(parse(&two.to_string()).unwrap_err(), EndpointsError::SameName("app".into()));
        let unknown = one(serde_json::json!({"name": "app", "url": "https://a.example", "secrets": [SECRET],
                                             "events": ["account.reauth"]}));
        assert!(unknown.unwrap_err().to_string().contains("unknown event"));
        assert!(one(serde_json::json!({"name": "app", "url": "https://a.example", "secrets": []})).is_err());
        assert!(
            one(serde_json::json!({"name": "App!", "url": "https://a.example", "secrets": [SECRET]}))
                .is_err()
        );
        assert!(parse("  ").unwrap().is_empty());
    }

    #[test]
    fn a_new_secret_parses() {
        let secret = new_secret();
        assert!(
            one(serde_json::json!({"name": "app", "url": "https://a.example", "secrets": [secret]})).is_ok()
        );
    }
}
