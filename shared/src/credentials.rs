//! Credentials a client presents (Mono's webhook secret, the app's API keys), kept only as SHA-256
//! digests, each with a label: a guess is compared with every one of them in constant time, whatever
//! its length or content, and neither `Debug` nor an error ever shows a credential.

use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct Credentials {
    known: Vec<(String, [u8; 32])>,
}

impl Credentials {
    /// `(label, credential)` pairs; an empty credential is refused.
    pub fn new<'a>(entries: impl IntoIterator<Item = (String, &'a str)>) -> Result<Self, String> {
        let mut known: Vec<(String, [u8; 32])> = Vec::new();
        for (label, credential) in entries {
            if credential.is_empty() {
                return Err(format!("the credential labelled {label} is empty"));
            }
            if known.iter().any(|(other, _)| *other == label) {
                return Err(format!("the label {label} is used twice"));
            }
            known.push((label, digest(credential.as_bytes())));
        }
        Ok(Self { known })
    }

    /// The label of the credential `presented` equals, if any. Every credential is compared.
    pub fn verify(&self, presented: &[u8]) -> Option<&str> {
        let guess = digest(presented);
        let mut found = None;
        for (label, known) in &self.known {
            let matched: bool = known.ct_eq(&guess).into();
            if matched && found.is_none() {
                found = Some(label.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<&str> = self.known.iter().map(|(label, _)| label.as_str()).collect();
        write!(f, "Credentials({labels:?}, [REDACTED])")
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_credential_is_recognised_by_its_label_and_nothing_else_is() {
        let known =
            Credentials::new([("a".to_owned(), "first-secret"), ("b".to_owned(), "second-secret")]).unwrap();
        assert_eq!(known.verify(b"first-secret"), Some("a"));
        assert_eq!(known.verify(b"second-secret"), Some("b"));
        assert_eq!(known.verify(b"first-secre"), None);
        assert_eq!(known.verify(b""), None);
        assert!(!format!("{known:?}").contains("secret\""), "{known:?}");
        assert!(Credentials::new([("a".to_owned(), "")]).is_err());
        assert!(Credentials::new([("a".to_owned(), "x"), ("a".to_owned(), "y")]).is_err());
    }
}
