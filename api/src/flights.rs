//! One refresh per account within the process: the first request that needs a fresh token for an
//! account leads (takes the lock, calls Mono, stores); requests for the same account meanwhile follow:
//! they wait for the leader's outcome, success or failure, holding nothing (no database connection,
//! no Mono slot), and hand it out as their own answer. A leader that goes away without an outcome
//! (its client left before it called Mono) hands the lead to one of its followers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Each flight's outcome, `None` until published.
type Map<T> = Arc<Mutex<HashMap<String, (u64, watch::Receiver<Option<T>>)>>>;

pub struct Flights<T> {
    map: Map<T>,
    next: std::sync::atomic::AtomicU64,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Self { map: Map::default(), next: Default::default() }
    }
}

/// Whether this request leads the account's refresh or follows one under way.
pub enum Joined<T> {
    Leader(Lead<T>),
    Follower(watch::Receiver<Option<T>>),
}

/// The leader's side of a flight: publishing ends it. Dropped unpublished, its followers are woken
/// with nothing, and one of them leads next.
pub struct Lead<T> {
    map: Map<T>,
    account: String,
    id: u64,
    outcome: watch::Sender<Option<T>>,
}

impl<T: Clone> Flights<T> {
    pub fn join(&self, account: &str) -> Joined<T> {
        let mut map = lock(&self.map);
        if let Some((_, offer)) = map.get(account) {
            return Joined::Follower(offer.clone());
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (outcome, offer) = watch::channel(None);
        map.insert(account.to_owned(), (id, offer));
        Joined::Leader(Lead { map: self.map.clone(), account: account.to_owned(), id, outcome })
    }
}

impl<T> Lead<T> {
    /// Hands `outcome` to every follower; requests that come later start a flight of their own (they
    /// find the stored token first).
    pub fn publish(self, outcome: T) {
        self.outcome.send_replace(Some(outcome));
    }
}

impl<T> Drop for Lead<T> {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if map.get(&self.account).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.account);
        }
    }
}

/// Waits for the leader's outcome; `None` if it went away without one.
pub async fn follow<T: Clone>(mut offer: watch::Receiver<Option<T>>) -> Option<T> {
    // `wait_for` looks at the value before it looks at the sender: one published just before the
    // leader dropped its side is still seen.
    offer.wait_for(Option::is_some).await.ok().and_then(|outcome| outcome.clone())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
