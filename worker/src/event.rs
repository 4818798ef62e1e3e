//! A delivery as the worker understands it: its stamp, its journal row, its kind and account, and
//! accessors for the few fields of `data` the handlers read.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::db::events::EventRecord;
use shared::delivery::{AttemptHistory, DeliveryMeta};
use shared::event::{AccountId, Envelope, EventKind};

#[derive(Clone, Debug)]
pub struct IncomingEvent {
    pub kind: EventKind,
    pub account_id: Option<AccountId>,
    pub received_at: DateTime<Utc>,
    pub record: EventRecord,
}

/// Why a message cannot be an event at all (dead-lettered as poison).
#[derive(Debug, thiserror::Error)]
pub enum MalformedEvent {
    #[error("invalid payload: {0}")]
    Envelope(#[from] shared::event::EnvelopeError),
    #[error("no account id at data.account._id, data.account.id or data.id")]
    NoAccountId,
}

impl IncomingEvent {
    /// Understands a delivery's body; `record` is filled in either way so that a malformed message can
    /// still be journaled as dead.
    pub fn parse(
        body: &[u8],
        meta: &DeliveryMeta,
        history: &AttemptHistory,
    ) -> (EventRecord, Result<Self, MalformedEvent>) {
        let mut record = EventRecord {
            id: meta.id.as_uuid(),
            event: String::new(),
            account_id: None,
            body_sha256: meta.body_sha256.clone(),
            received_at: meta.received_at,
            attempts: i32::try_from(history.previous_attempts.saturating_add(1)).unwrap_or(i32::MAX),
            payload: storable_json(body),
        };
        let envelope = match Envelope::parse(body) {
            Ok(envelope) => envelope,
            Err(error) => return (record, Err(error.into())),
        };
        let kind = envelope.kind();
        let account_id = envelope.account_id();
        record.event = envelope.event_name().to_owned();
        record.account_id = account_id.as_ref().map(|a| a.as_str().to_owned());
        if kind.needs_account() && account_id.is_none() {
            return (record, Err(MalformedEvent::NoAccountId));
        }
        let event = Self {
            kind,
            account_id,
            received_at: meta.received_at,
            record: record.clone(),
        };
        (record, Ok(event))
    }

    /// The account id of an event whose kind needs one (guaranteed by `parse`).
    pub fn account(&self) -> &str {
        self.account_id
            .as_ref()
            .map(AccountId::as_str)
            .unwrap_or_default()
    }

    /// `data.meta.data_status`, as Mono sent it.
    pub fn data_status(&self) -> Option<&str> {
        self.data()?.get("meta")?.get("data_status")?.as_str()
    }

    /// `data.account`, the account snapshot of `account_updated`.
    pub fn account_snapshot(&self) -> Option<&Value> {
        self.data()?.get("account").filter(|a| a.is_object())
    }

    /// `data.customer` of `account_connected` (a string id, or an object with `id`/`_id`).
    pub fn customer_id(&self) -> Option<&str> {
        let customer = self.data()?.get("customer")?;
        customer
            .as_str()
            .or_else(|| customer.get("id").or_else(|| customer.get("_id"))?.as_str())
    }

    fn data(&self) -> Option<&Value> {
        self.record.payload.as_ref()?.get("data")
    }
}

/// The body as JSON for the `payload` column, unless it is not JSON or holds `\u0000`, which
/// PostgreSQL's jsonb cannot store (the raw body stays in the queue for such messages).
fn storable_json(body: &[u8]) -> Option<Value> {
    if body.windows(6).any(|w| w == b"\\u0000") {
        return None;
    }
    serde_json::from_slice(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &[u8]) -> Result<IncomingEvent, MalformedEvent> {
        let meta = DeliveryMeta::stamp(body);
        let history = AttemptHistory {
            previous_attempts: 0,
            first_attempt_at: None,
        };
        IncomingEvent::parse(body, &meta, &history).1
    }

    #[test]
    fn data_fields_are_read_where_mono_puts_them() {
        let updated = parse(br#"{"event":"mono.events.account_updated","data":{"meta":{"data_status":"AVAILABLE"},"account":{"_id":"a1","name":"x"}}}"#).unwrap();
        assert_eq!(updated.data_status(), Some("AVAILABLE"));
        assert_eq!(updated.account_snapshot().unwrap()["name"], "x");
        let connected =
            parse(br#"{"event":"mono.events.account_connected","data":{"id":"a2","customer":"c9"}}"#)
                .unwrap();
        assert_eq!(connected.customer_id(), Some("c9"));
        assert_eq!(connected.account(), "a2");
    }

    #[test]
    fn an_event_that_needs_an_account_but_has_none_is_malformed() {
        let error = parse(br#"{"event":"mono.events.reauthorisation_required","data":{}}"#).unwrap_err();
        assert!(matches!(error, MalformedEvent::NoAccountId));
        assert!(parse(br#"{"event":"mono.events.something_new","data":{}}"#).is_ok());
    }

    #[test]
    fn a_nul_escape_keeps_the_payload_out_of_jsonb() {
        let event = parse(
            br#"{"event":"mono.events.account_updated","data":{"account":{"_id":"a1","name":"\u0000"}}}"#,
        )
        .unwrap();
        assert!(event.record.payload.is_none());
    }
}
