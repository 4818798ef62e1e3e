//! `Authorization: Bearer <key>`: the app's API keys. Several may be configured at once, each with a
//! label, so a key can be rotated with no downtime and every token handed out is recorded against
//! the label of the key that asked (never the key).

use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::str::FromStr;

use shared::credentials::Credentials;

/// The authentication scheme of `Authorization` that carries a key.
const BEARER: &[u8] = b"Bearer";
/// Longest label; a label is made of ASCII letters, digits, `_`, `-` and `.`.
const MAX_LABEL_CHARS: usize = 32;

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

    /// The label of the bearer key in an `Authorization` header value. The scheme is
    /// case-insensitive and may be followed by several spaces (RFC 9110, 11.1 and 11.4).
    pub fn verify_header(&self, header: Option<&[u8]>) -> Option<&str> {
        let (scheme, key) = header?.split_at_checked(BEARER.len())?;
        if !scheme.eq_ignore_ascii_case(BEARER) {
            return None;
        }
        let key = key.strip_prefix(b" ")?.trim_ascii_start();
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
    ///
    /// An entry is split at its first `:` only when what precedes it is a label (see
    /// [`MAX_LABEL_CHARS`]); a key that holds a `:` must then be written with a label (`web:ab:cd`).
    /// An entry with a `:` whose start is no label is refused rather than cut into a made-up label
    /// and a key the app never sends. Errors name an entry by its position, never by its text.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = SecretString::from(raw);
        let mut entries = Vec::new();
        for (index, entry) in
            raw.expose_secret().split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate()
        {
            let position = index + 1;
            let (label, key) = match entry.split_once(':') {
                Some((label, key)) if is_label(label.trim()) => (label.trim().to_owned(), key.trim()),
                Some(_) => {
                    return Err(format!(
                        "APP_API_KEYS: entry {position} holds a ':' but does not start with a label \
                         (1 to {MAX_LABEL_CHARS} ASCII letters, digits, '_', '-' or '.'): write a key that \
                         holds ':' as label:key"
                    ));
                }
                None => (format!("key{position}"), entry),
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

fn is_label(text: &str) -> bool {
    (1..=MAX_LABEL_CHARS).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
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
    fn a_key_holding_a_colon_is_never_cut_into_a_label_and_a_shorter_key() {
        // Unlabelled, with a ':' after something that is no label: refused, not split.
        let refused = "0123456789+/abcdef=:0123456789abcdef".parse::<ApiKeys>().unwrap_err();
        assert!(refused.contains("entry 1") && refused.contains("label:key"), "{refused}");
        assert!(!refused.contains("0123456789"), "an error never shows a key: {refused}");
        assert!(":0123456789abcdef0123".parse::<ApiKeys>().is_err(), "an empty label is no label");
        // With a label, the key keeps its own ':'.
        let keys: ApiKeys = "web:0123456789:abcdef0123".parse().unwrap();
        assert_eq!(keys.verify(b"0123456789:abcdef0123"), Some("web"));
        assert_eq!(keys.verify(b"abcdef0123"), None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let keys: ApiKeys = "mobile:0123456789abcdef0123".parse().unwrap();
        for header in ["Bearer", "bearer", "BEARER", "bEaReR", "Bearer  "] {
            let value = format!("{header} 0123456789abcdef0123");
            assert_eq!(keys.verify_header(Some(value.as_bytes())), Some("mobile"), "{value:?}");
        }
        for header in
            ["Bearer0123456789abcdef0123", "Basic 0123456789abcdef0123", "Bear 0123456789abcdef0123"]
        {
            assert_eq!(keys.verify_header(Some(header.as_bytes())), None, "{header:?}");
        }
    }

    #[test]
    fn debug_output_shows_labels_but_no_key() {
        let keys: ApiKeys = "mobile:0123456789abcdef0123".parse().unwrap();
        let shown = format!("{keys:?}");
        assert!(shown.contains("mobile") && !shown.contains("0123456789abcdef0123"), "{shown}");
    }
}
