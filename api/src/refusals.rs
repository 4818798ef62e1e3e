//! Accounts Mono refused to re-authorise lately (a permanent 4xx for that account), remembered for
//! `MONO_REFUSAL_MEMORY_SECS` so that an app retrying a refused account is answered 422 from here
//! instead of making us ask Mono again on every request. The memory is per process, bounded, and lost
//! on restart: at worst each process asks Mono once per account per period.
//!
//! Kept per kind of request: Mono refusing a re-auth link (its `initiate`, with our redirect and
//! scope) says nothing about re-authorising the account with a token, so a refused link never
//! silences token requests. Mono refusing to re-authorise the account (a token) refuses the account
//! itself, so it silences link requests for it too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most accounts remembered at once; a refusal that finds the memory full is not remembered.
const MAX_REMEMBERED: usize = 10_000;

/// What Mono refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A re-auth token: Mono refuses to re-authorise the account.
    Token,
    /// A re-auth link for the account.
    Link,
}

impl Refused {
    fn key(self, account: &str) -> String {
        match self {
            Self::Token => format!("token\n{account}"),
            Self::Link => format!("link\n{account}"),
        }
    }
}

pub struct RefusalMemory {
    remember_for: Duration,
    /// Kind and account id → (until when, Mono's message).
    refused: Mutex<HashMap<String, (Instant, String)>>,
}

impl RefusalMemory {
    /// `remember_for` zero remembers nothing.
    pub fn new(remember_for: Duration) -> Self {
        Self { remember_for, refused: Mutex::default() }
    }

    /// Notes that Mono refused `what` for `account` with `message`.
    pub fn remember(&self, what: Refused, account: &str, message: &str) {
        if self.remember_for.is_zero() {
            return;
        }
        let account = &what.key(account);
        let now = Instant::now();
        let mut refused = self.lock();
        if refused.len() >= MAX_REMEMBERED {
            refused.retain(|_, (until, _)| *until > now);
        }
        if refused.len() < MAX_REMEMBERED || refused.contains_key(account) {
            refused.insert(account.to_owned(), (now + self.remember_for, message.to_owned()));
        }
    }

    /// Mono's message if it refused `what` for `account` (or, for a link, the account itself) less
    /// than `remember_for` ago.
    pub fn recall(&self, what: Refused, account: &str) -> Option<String> {
        match what {
            Refused::Token => self.recall_key(&Refused::Token.key(account)),
            Refused::Link => self
                .recall_key(&Refused::Link.key(account))
                .or_else(|| self.recall_key(&Refused::Token.key(account))),
        }
    }

    fn recall_key(&self, account: &str) -> Option<String> {
        let mut refused = self.lock();
        match refused.get(account) {
            Some((until, message)) if *until > Instant::now() => Some(message.clone()),
            Some(_) => {
                refused.remove(account);
                None
            }
            None => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, String)>> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_link_silences_links_only_and_a_refused_token_silences_both() {
        let memory = RefusalMemory::new(Duration::from_secs(60));
        memory.remember(Refused::Link, "acct-1", "bad redirect");
        assert_eq!(memory.recall(Refused::Link, "acct-1").as_deref(), Some("bad redirect"));
        assert_eq!(memory.recall(Refused::Token, "acct-1"), None, "a link refusal says nothing of tokens");

        memory.remember(Refused::Token, "acct-2", "account closed");
        assert_eq!(memory.recall(Refused::Token, "acct-2").as_deref(), Some("account closed"));
        assert_eq!(memory.recall(Refused::Link, "acct-2").as_deref(), Some("account closed"));
    }
}
