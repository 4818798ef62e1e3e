//! The `mono-webhook-secret` check. Mono signs nothing: the header must equal a secret shown in its
//! dashboard. Several secrets may be configured at once, so one can be rotated without downtime.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;
use subtle::ConstantTimeEq;

/// The configured secrets, kept only as SHA-256 digests so that the comparison takes the same time
/// whatever the length or content of the guess.
#[derive(Clone)]
pub struct WebhookSecrets {
    digests: Vec<[u8; 32]>,
}

impl WebhookSecrets {
    /// Whether `provided` equals one of the secrets. Every secret is compared, in constant time.
    pub fn verify(&self, provided: &[u8]) -> bool {
        let guess = digest(provided);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |matched, secret| matched | secret.ct_eq(&guess))
            .into()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

impl FromStr for WebhookSecrets {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = SecretString::from(raw);
        let digests: Vec<_> = raw
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| digest(s.as_bytes()))
            .collect();
        if digests.is_empty() {
            return Err("MONO_WEBHOOK_SECRET must hold at least one non-empty secret".into());
        }
        Ok(Self { digests })
    }
}

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecrets([REDACTED] x{})", self.digests.len())
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_secret_is_accepted_and_nothing_else() {
        let secrets: WebhookSecrets = "old-secret, new-secret".parse().unwrap();
        assert_eq!(secrets.len(), 2);
        assert!(secrets.verify(b"old-secret"));
        assert!(secrets.verify(b"new-secret"));
        assert!(!secrets.verify(b"new-secre"));
        assert!(!secrets.verify(b""));
        assert!(!secrets.verify(b"old-secret, new-secret"));
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(" , ".parse::<WebhookSecrets>().is_err());
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let secrets: WebhookSecrets = "hunter2".parse().unwrap();
        let shown = format!("{secrets:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
