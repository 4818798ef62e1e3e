//! Accounts Mono refused to re-authorise lately (a permanent 4xx for that account), remembered for
//! `MONO_REFUSAL_MEMORY_SECS` so that an app retrying a refused account is answered 422 from here
//! instead of making us ask Mono again on every request. The memory is per process, bounded, and lost
//! on restart: at worst each process asks Mono once per account per period.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most accounts remembered at once; a refusal that finds the memory full is not remembered.
const MAX_REMEMBERED: usize = 10_000;

pub struct RefusalMemory {
    remember_for: Duration,
    /// Account id → (until when, Mono's message).
    refused: Mutex<HashMap<String, (Instant, String)>>,
}

impl RefusalMemory {
    /// `remember_for` zero remembers nothing.
    pub fn new(remember_for: Duration) -> Self {
        Self { remember_for, refused: Mutex::default() }
    }

    /// Notes that Mono refused `account` with `message`.
    pub fn remember(&self, account: &str, message: &str) {
        if self.remember_for.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut refused = self.lock();
        if refused.len() >= MAX_REMEMBERED {
            refused.retain(|_, (until, _)| *until > now);
        }
        if refused.len() < MAX_REMEMBERED || refused.contains_key(account) {
            refused.insert(account.to_owned(), (now + self.remember_for, message.to_owned()));
        }
    }

    /// Mono's message if it refused `account` less than `remember_for` ago.
    pub fn recall(&self, account: &str) -> Option<String> {
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
