//! The `mono-webhook-secret` check. Mono signs nothing: the header must equal a secret shown in its
//! dashboard. Several secrets may be configured at once, so one can be rotated without downtime.

use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::str::FromStr;

use shared::credentials::Credentials;

/// The configured secrets, kept only as digests (see `shared::credentials`).
#[derive(Clone)]
pub struct WebhookSecrets {
    secrets: Credentials,
}

impl WebhookSecrets {
    /// Whether `provided` equals one of the secrets. Every secret is compared, in constant time.
    pub fn verify(&self, provided: &[u8]) -> bool {
        self.secrets.verify(provided).is_some()
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

impl FromStr for WebhookSecrets {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = SecretString::from(raw);
        let entries = raw
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(index, secret)| (format!("secret{}", index + 1), secret));
        let secrets = Credentials::new(entries)?;
        if secrets.is_empty() {
            return Err("MONO_WEBHOOK_SECRET must hold at least one non-empty secret".into());
        }
        Ok(Self { secrets })
    }
}

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecrets([REDACTED] x{})", self.secrets.len())
    }
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
