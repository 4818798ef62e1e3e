//! `Authorization: Bearer <key>`: the app's API keys. Several may be configured at once, each with a
//! label, so a key can be rotated with no downtime and every token handed out is recorded against
//! the label of the key that asked (never the key).
//!
//! Each key has a scope, what it may do ([`Scope`]): read one account's state, list accounts, get
//! re-auth tokens, get re-auth links. `label/tokens+links:key` limits a key to tokens and links; a
//! key written without a scope (`label:key`, or a bare key) may do everything, as every key could
//! before scopes existed. Keys belong on the app's backend: a key shipped in a mobile or web client
//! is anyone's, and with `links` it fetches Mono-branded re-auth links for other people's accounts.

use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use shared::credentials::Credentials;

/// The authentication scheme of `Authorization` that carries a key.
const BEARER: &[u8] = b"Bearer";
/// Longest label; a label is made of ASCII letters, digits, `_`, `-` and `.`.
const MAX_LABEL_CHARS: usize = 32;

/// One thing a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `GET /v1/accounts/{id}`.
    Read,
    /// `GET /v1/accounts`.
    List,
    /// `POST /v1/accounts/{id}/reauth-token`.
    Tokens,
    /// `POST /v1/accounts/{id}/reauth-link`.
    Links,
}

impl Scope {
    const ALL: [Self; 4] = [Self::Read, Self::List, Self::Tokens, Self::Links];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::List => "list",
            Self::Tokens => "tokens",
            Self::Links => "links",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What one key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// A key written without a scope.
    pub const ALL: Self = Self(0b1111);

    pub fn allows(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// `read+list+tokens+links`, any non-empty selection, each at most once.
    fn parse(text: &str) -> Option<Self> {
        let mut scopes = 0u8;
        for name in text.split('+') {
            let scope = Scope::ALL.into_iter().find(|s| s.as_str() == name)?;
            if scopes & scope.bit() != 0 {
                return None;
            }
            scopes |= scope.bit();
        }
        Some(Self(scopes))
    }
}

/// The configured keys, kept only as digests (see `shared::credentials`), and each label's scope.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Credentials,
    scopes: HashMap<String, Scopes>,
}

impl ApiKeys {
    /// The label of the key `provided` equals, if any.
    pub fn verify(&self, provided: &[u8]) -> Option<&str> {
        self.keys.verify(provided)
    }

    /// What the key labelled `label` may do.
    pub fn scopes_of(&self, label: &str) -> Scopes {
        self.scopes.get(label).copied().unwrap_or(Scopes(0))
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

    /// `label:key,label/scope+scope:key`; a key without a label is labelled by its position (`key1`,
    /// ...); a key without a scope may do everything.
    ///
    /// An entry is split at its first `:` only when what precedes it is a label (see
    /// [`MAX_LABEL_CHARS`]), with a scope or not; a key that holds a `:` must then be written with a
    /// label (`web:ab:cd`).
    /// An entry with a `:` whose start is no label is refused rather than cut into a made-up label
    /// and a key the app never sends. Errors name an entry by its position, never by its text.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let raw = SecretString::from(raw);
        let mut entries = Vec::new();
        let mut scopes = HashMap::new();
        for (index, entry) in
            raw.expose_secret().split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate()
        {
            let position = index + 1;
            let (label, key, scope) = match entry.split_once(':') {
                Some((label, key)) if is_label(label.trim()) => {
                    (label.trim().to_owned(), key.trim(), Scopes::ALL)
                }
                Some((prefix, key))
                    if prefix.split_once('/').is_some_and(|(label, _)| is_label(label.trim())) =>
                {
                    let (label, scope) = prefix.split_once('/').expect("checked above");
                    let scope = Scopes::parse(scope.trim()).ok_or_else(|| {
                        format!(
                            "APP_API_KEYS: the key labelled {} has an unknown scope: write label/scope+scope:key \
                             with scopes among read, list, tokens, links",
                            label.trim()
                        )
                    })?;
                    (label.trim().to_owned(), key.trim(), scope)
                }
                Some(_) => {
                    return Err(format!(
                        "APP_API_KEYS: entry {position} holds a ':' but does not start with a label \
                         (1 to {MAX_LABEL_CHARS} ASCII letters, digits, '_', '-' or '.'): write a key that \
                         holds ':' as label:key"
                    ));
                }
                None => (format!("key{position}"), entry, Scopes::ALL),
            };
            if key.len() < 16 {
                return Err(format!("APP_API_KEYS: the key labelled {label} is shorter than 16 characters"));
            }
            scopes.insert(label.clone(), scope);
            entries.push((label, key));
        }
        let keys = Credentials::new(entries).map_err(|e| format!("APP_API_KEYS: {e}"))?;
        if keys.is_empty() {
            return Err("APP_API_KEYS must hold at least one key".into());
        }
        Ok(Self { keys, scopes })
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

    #[test]
    fn a_key_may_be_limited_to_some_scopes_and_a_key_without_one_may_do_everything() {
        let keys: ApiKeys =
            "backend:0123456789abcdef0123, support/read+list:fedcba9876543210fedc, 1111222233334444"
                .parse()
                .unwrap();
        assert_eq!(keys.verify(b"fedcba9876543210fedc"), Some("support"), "the label is without its scope");
        let support = keys.scopes_of("support");
        assert!(support.allows(Scope::Read) && support.allows(Scope::List));
        assert!(!support.allows(Scope::Tokens) && !support.allows(Scope::Links));
        for label in ["backend", "key3"] {
            assert_eq!(keys.scopes_of(label), Scopes::ALL, "{label}: written without a scope");
        }
        let tokens: ApiKeys = "app/tokens:0123456789:abcdef0123".parse().unwrap();
        assert_eq!(tokens.verify(b"0123456789:abcdef0123"), Some("app"), "the key keeps its own ':'");
        assert!(
            tokens.scopes_of("app").allows(Scope::Tokens) && !tokens.scopes_of("app").allows(Scope::Read)
        );
        for bad in [
            "app/:0123456789abcdef0123",
            "app/write:0123456789abcdef0123",
            "app/read+read:0123456789abcdef0123",
        ] {
            let refused = bad.parse::<ApiKeys>().unwrap_err();
            assert!(refused.contains("scope") && !refused.contains("0123456789"), "{bad}: {refused}");
        }
    }
}
