//! An account row as the handlers change it: loaded and locked at the start of a batch, changed in
//! memory by each event in turn, written back once at the end.

use chrono::{DateTime, Utc};
use std::fmt;

use crate::event::IncomingEvent;

/// Mono's re-auth tokens expire this long after they are issued.
pub const REAUTH_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::minutes(10);

/// A stored re-auth token. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, sqlx::Type)]
#[sqlx(transparent)]
pub struct StoredToken(pub String);

impl fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoredToken([REDACTED])")
    }
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct AccountState {
    pub id: String,
    pub reauth_required: bool,
    pub reauth_token: Option<StoredToken>,
    pub reauth_token_issued_at: Option<DateTime<Utc>>,
    pub reauth_token_expires_at: Option<DateTime<Utc>>,
    pub reauthorized_at: Option<DateTime<Utc>>,
    pub data_status: Option<String>,
    pub data_updated_at: Option<DateTime<Utc>>,
    pub last_sync_failed_at: Option<DateTime<Utc>>,
    pub customer_id: Option<String>,
    pub connected_at: Option<DateTime<Utc>>,
    pub unlinked_at: Option<DateTime<Utc>>,
    /// Receive time of the last event applied to the re-auth state (ordering guard).
    pub reauth_state_received_at: Option<DateTime<Utc>>,
    /// Receive time of the last event applied to the data state (ordering guard).
    pub data_state_received_at: Option<DateTime<Utc>>,
    /// The body of the last `account_updated` applied in this batch; its `data.account` becomes the
    /// stored snapshot.
    #[sqlx(skip)]
    pub snapshot_body: Option<String>,
    /// Whether an event of this batch changed the row.
    #[sqlx(skip)]
    pub changed: bool,
}

impl AccountState {
    /// A row that does not exist yet.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            reauth_required: false,
            reauth_token: None,
            reauth_token_issued_at: None,
            reauth_token_expires_at: None,
            reauthorized_at: None,
            data_status: None,
            data_updated_at: None,
            last_sync_failed_at: None,
            customer_id: None,
            connected_at: None,
            unlinked_at: None,
            reauth_state_received_at: None,
            data_state_received_at: None,
            snapshot_body: None,
            changed: false,
        }
    }

    /// An event received before the last one applied to the re-auth state must change nothing
    /// (unless an operator forced its replay).
    pub fn reauth_is_newer_than(&self, event: &IncomingEvent) -> bool {
        !event.forced && self.reauth_state_received_at.is_some_and(|applied| event.received_at < applied)
    }

    /// An event received before the last one applied to the data state must change nothing (unless
    /// an operator forced its replay).
    pub fn data_is_newer_than(&self, event: &IncomingEvent) -> bool {
        !event.forced && self.data_state_received_at.is_some_and(|applied| event.received_at < applied)
    }

    /// Records that an event received at `at` decided the re-auth state. A forced replay of an older
    /// event never moves the guard backwards.
    pub fn advance_reauth_guard(&mut self, at: DateTime<Utc>) {
        self.reauth_state_received_at =
            Some(self.reauth_state_received_at.map_or(at, |applied| applied.max(at)));
    }

    /// [`AccountState::advance_reauth_guard`] for the data state.
    pub fn advance_data_guard(&mut self, at: DateTime<Utc>) {
        self.data_state_received_at = Some(self.data_state_received_at.map_or(at, |applied| applied.max(at)));
    }

    /// Forgets the re-auth token and its times.
    pub fn clear_token(&mut self) {
        self.reauth_token = None;
        self.reauth_token_issued_at = None;
        self.reauth_token_expires_at = None;
    }
}
