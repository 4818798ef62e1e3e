//! `Authorization: Bearer <key>`: the app's API keys. Several may be configured at once, each with a
//! label, so a key can be rotated with no downtime and every token handed out is recorded against
//! the label of the key that asked (never the key).

use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::str::FromStr;

use shared::credentials::Credentials;

/// The configured keys, kept only as digests (see `shared::credentials`).
#[derive(Clone)]
pub struct ApiKeys {
    keys: Credentials,
}

impl ApiKeys {
    /// The label of the key `provided` equals, if any.
    pub fn verify(&self, provided: &[u8]) -> Option<&str> {
        self.keys.verify(provided)
    }

    /// The label of the bearer key in an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&[u8]>) -> Option<&str> {
        let value = header?;
        let key = value.strip_prefix(b"Bearer ").or_else(|| value.strip_prefix(b"bearer "))?;
        self.verify(key)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl FromStr for ApiKeys {
    type Err = String;

    /// `label:key,label:key`; a key without a label is labelled by its position (`key1`, ...).
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = SecretString::from(raw);
        let mut entries = Vec::new();
        for (index, entry) in
            raw.expose_secret().split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate()
        {
            let (label, key) = match entry.split_once(':') {
                Some((label, key)) if !label.trim().is_empty() => (label.trim().to_owned(), key.trim()),
                _ => (format!("key{}", index + 1), entry),
            };
            if key.len() < 16 {
                return Err(format!("APP_API_KEYS: the key labelled {label} is shorter than 16 characters"));
            }
            entries.push((label, key));
        }
        let keys = Credentials::new(entries).map_err(|e| format!("APP_API_KEYS: {e}"))?;
        if keys.is_empty() {
            return Err("APP_API_KEYS must hold at least one key".into());
        }
        Ok(Self { keys })
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({:?})", self.keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_key_is_accepted_with_its_label_and_nothing_else() {
        let keys: ApiKeys = "mobile:0123456789abcdef0123, web:fedcba9876543210fedc".parse().unwrap();
        assert_eq!(keys.verify(b"0123456789abcdef0123"), Some("mobile"));
        assert_eq!(keys.verify(b"fedcba9876543210fedc"), Some("web"));
        assert_eq!(keys.verify(b"0123456789abcdef012"), None);
        assert_eq!(keys.verify_header(Some(b"Bearer fedcba9876543210fedc")), Some("web"));
        assert_eq!(keys.verify_header(Some(b"fedcba9876543210fedc")), None);
        assert_eq!(keys.verify_header(None), None);
    }

    #[test]
    fn unlabelled_keys_are_labelled_by_position_and_bad_lists_are_refused() {
        let keys: ApiKeys = "0123456789abcdef0123".parse().unwrap();
        assert_eq!(keys.verify(b"0123456789abcdef0123"), Some("key1"));
        assert!(" , ".parse::<ApiKeys>().is_err());
        assert!("short".parse::<ApiKeys>().is_err());
        assert!("a:0123456789abcdef0123,a:fedcba9876543210fedc".parse::<ApiKeys>().is_err());
    }

    #[test]
    fn debug_output_shows_labels_but_no_key() {
        let keys: ApiKeys = "mobile:0123456789abcdef0123".parse().unwrap();
        let shown = format!("{keys:?}");
        assert!(shown.contains("mobile") && !shown.contains("0123456789abcdef0123"), "{shown}");
    }
}
