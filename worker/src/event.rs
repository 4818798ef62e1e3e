//! A delivery as the worker understands it: its stamp, its journal row, its kind and account, and
//! the few fields of `data` the handlers read, picked out without building the JSON tree.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::db::events::EventRecord;
use shared::delivery::{AttemptHistory, DeliveryMeta};
use shared::event::{AccountId, Envelope, EventKind};

#[derive(Clone, Debug)]
pub struct IncomingEvent {
    pub kind: EventKind,
    pub account_id: Option<AccountId>,
    pub received_at: DateTime<Utc>,
    /// `data.meta.data_status`, as Mono sent it.
    pub data_status: Option<String>,
    /// `data.customer` (a string id, or an object with `id`/`_id`).
    pub customer_id: Option<String>,
    /// Whether `data.account` is an object (the snapshot of `account_updated`).
    pub has_account_snapshot: bool,
    /// Replayed by an operator with `--force`: applied even if a later event was applied already.
    pub forced: bool,
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
    /// Understands a delivery's body; the journal row is returned either way so that a malformed
    /// message can still be journaled as dead.
    pub fn parse(
        body: &[u8],
        meta: &DeliveryMeta,
        history: &AttemptHistory,
    ) -> (EventRecord, Result<Self, MalformedEvent>) {
        Self::parse_with(body, meta, history, false)
    }

    /// [`IncomingEvent::parse`] for a delivery an operator replayed with `--force`.
    pub fn parse_with(
        body: &[u8],
        meta: &DeliveryMeta,
        history: &AttemptHistory,
        forced: bool,
    ) -> (EventRecord, Result<Self, MalformedEvent>) {
        let mut record = EventRecord {
            id: meta.id.as_uuid(),
            event: String::new(),
            account_id: None,
            body_sha256: meta.body_sha256.clone(),
            received_at: meta.received_at,
            attempts: i32::try_from(history.previous_attempts.saturating_add(1)).unwrap_or(i32::MAX),
            payload: storable_json(body),
            first_attempt_at: history.first_attempt_at,
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
        let fields: DataFields<'_> = serde_json::from_str(envelope.data().get()).unwrap_or_default();
        let event = Self {
            kind,
            account_id,
            received_at: meta.received_at,
            data_status: fields
                .meta
                .and_then(|m| serde_json::from_str::<MetaFields>(m.get()).ok())
                .and_then(|m| m.data_status),
            customer_id: fields.customer.and_then(customer_id),
            has_account_snapshot: fields.account.is_some_and(|a| a.get().starts_with('{')),
            forced,
            record: record.clone(),
        };
        (record, Ok(event))
    }

    /// The account id of an event whose kind needs one (guaranteed by `parse`).
    pub fn account(&self) -> &str {
        self.account_id.as_ref().map(AccountId::as_str).unwrap_or_default()
    }
}

#[derive(Default, Deserialize)]
struct DataFields<'a> {
    #[serde(borrow)]
    meta: Option<&'a RawValue>,
    #[serde(borrow)]
    customer: Option<&'a RawValue>,
    #[serde(borrow)]
    account: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MetaFields {
    #[serde(default, deserialize_with = "string_or_none")]
    data_status: Option<String>,
}

#[derive(Deserialize)]
struct CustomerObject {
    #[serde(default, deserialize_with = "string_or_none")]
    id: Option<String>,
    #[serde(rename = "_id", default, deserialize_with = "string_or_none")]
    underscore_id: Option<String>,
}

fn customer_id(raw: &RawValue) -> Option<String> {
    if let Ok(id) = serde_json::from_str::<String>(raw.get()) {
        return Some(id);
    }
    let object: CustomerObject = serde_json::from_str(raw.get()).ok()?;
    object.id.or(object.underscore_id)
}

/// A field of another type is treated as absent.
fn string_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

/// The body as text for the `payload` jsonb column, unless it is not JSON or holds `\u0000`, which
/// jsonb cannot store (the raw body stays in the queue for such messages).
fn storable_json(body: &[u8]) -> Option<String> {
    if body.windows(6).any(|w| w == b"\\u0000") {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    Some(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &[u8]) -> Result<IncomingEvent, MalformedEvent> {
        let meta = DeliveryMeta::stamp(body);
        let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
        IncomingEvent::parse(body, &meta, &history).1
    }

    #[test]
    fn data_fields_are_read_where_mono_puts_them() {
        let updated = parse(br#"{"event":"mono.events.account_updated","data":{"meta":{"data_status":"AVAILABLE"},"account":{"_id":"a1","name":"x"}}}"#).unwrap();
        assert_eq!(updated.data_status.as_deref(), Some("AVAILABLE"));
        assert!(updated.has_account_snapshot);
        let connected =
            parse(br#"{"event":"mono.events.account_connected","data":{"id":"a2","customer":"c9"}}"#)
                .unwrap();
        assert_eq!(connected.customer_id.as_deref(), Some("c9"));
        assert_eq!(connected.account(), "a2");
        let nested =
            parse(br#"{"event":"mono.events.account_connected","data":{"id":"a2","customer":{"_id":"c7"}}}"#)
                .unwrap();
        assert_eq!(nested.customer_id.as_deref(), Some("c7"));
    }

    #[test]
    fn fields_of_the_wrong_type_are_absent() {
        let odd = parse(br#"{"event":"mono.events.account_updated","data":{"meta":{"data_status":5},"account":{"_id":"a1"},"customer":[1]}}"#).unwrap();
        assert_eq!(odd.data_status, None);
        assert_eq!(odd.customer_id, None);
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

    #[test]
    fn json_of_the_wrong_shape_keeps_its_payload_and_garbage_has_none() {
        let meta = DeliveryMeta::stamp(b"[1]");
        let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
        assert_eq!(IncomingEvent::parse(b"[1]", &meta, &history).0.payload.as_deref(), Some("[1]"));
        assert_eq!(IncomingEvent::parse(b"\xff\xfe", &meta, &history).0.payload, None);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever a queue holds, the worker either understands it or dead-letters it: never a panic,
        /// and the journal row is filled in either way.
        #[test]
        fn arbitrary_bytes_are_an_event_or_poison(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let meta = DeliveryMeta::from_properties(&lapin::BasicProperties::default(), &body);
            let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
            let (record, parsed) = IncomingEvent::parse(&body, &meta, &history);
            prop_assert_eq!(record.id, meta.id.as_uuid());
            prop_assert_eq!(record.body_sha256.len(), 64);
            if let Ok(event) = parsed {
                prop_assert!(!event.kind.needs_account() || event.account_id.is_some());
            }
        }

        #[test]
        fn event_shaped_bodies_with_any_account_field_parse_or_are_poison(
            account in proptest::option::of(".{0,30}"),
            id_key in prop_oneof![Just("_id"), Just("id")],
            event in prop_oneof![
                Just("mono.events.reauthorisation_required"),
                Just("mono.events.account_updated"),
                Just("mono.events.unknown"),
            ],
        ) {
            let data = match &account {
                Some(account) => serde_json::json!({ "account": { id_key: account } }),
                None => serde_json::json!({}),
            };
            let body = serde_json::to_vec(&serde_json::json!({ "event": event, "data": data })).unwrap();
            let meta = DeliveryMeta::stamp(&body);
            let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
            match IncomingEvent::parse(&body, &meta, &history).1 {
                Ok(parsed) => prop_assert_eq!(parsed.account_id.map(|a| a.as_str().to_owned()).is_some(), AccountId::parse(account.clone().unwrap_or_default()).is_some() && account.is_some()),
                Err(MalformedEvent::NoAccountId) => prop_assert!(event != "mono.events.unknown"),
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}
