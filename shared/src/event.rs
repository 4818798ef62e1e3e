//! Mono's webhook envelope (`{"event": "...", "data": {...}}`) and the events monohook acts on.
//!
//! Parsing borrows from the raw body and never allocates the whole JSON tree: ingest validates every
//! request with it, so it is on the hot path. Every failure names what is wrong, for a 400 detail or a
//! dead-letter reason.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// AMQP routing keys are short strings: at most 255 bytes.
pub const MAX_EVENT_NAME_BYTES: usize = 255;

/// A body that is a JSON object with a string `event` and an object `data`.
#[derive(Debug)]
pub struct Envelope<'a> {
    event: Cow<'a, str>,
    data: &'a RawValue,
}

/// Why a body is not a valid Mono webhook envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The body is not well-formed UTF-8 JSON.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON, but not an object.
    #[error("body must be a JSON object")]
    NotAnObject,
    /// No `event` field.
    #[error("`event` is missing")]
    MissingEvent,
    /// `event` is present but not a string.
    #[error("`event` must be a string")]
    EventNotAString,
    /// `event` is an empty string.
    #[error("`event` must not be empty")]
    EmptyEvent,
    /// `event` is longer than a routing key may be.
    #[error("`event` must be at most {MAX_EVENT_NAME_BYTES} bytes")]
    EventTooLong,
    /// `event` holds characters no Mono event name has.
    #[error("`event` may hold only letters, digits and . _ : -")]
    EventHasOddCharacters,
    /// No `data` field.
    #[error("`data` is missing")]
    MissingData,
    /// `data` is present but not an object.
    #[error("`data` must be a JSON object")]
    DataNotAnObject,
}

impl<'a> Envelope<'a> {
    /// Parses and validates a raw webhook body.
    pub fn parse(body: &'a [u8]) -> Result<Self, EnvelopeError> {
        // serde would happily read a struct from a JSON array, so the shape is checked first.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        let raw: RawEnvelope<'a> = serde_json::from_slice(body).map_err(|e| {
            // An array or scalar still fails to parse as a struct-with-borrowed-fields in most
            // cases; report the shape error rather than serde's wording when that is the cause.
            if e.is_data() && first.is_some_and(|b| *b != b'{') {
                EnvelopeError::NotAnObject
            } else {
                EnvelopeError::NotJson(e.to_string())
            }
        })?;
        if first != Some(&b'{') {
            return Err(EnvelopeError::NotAnObject);
        }
        let event = raw.event.ok_or(EnvelopeError::MissingEvent)?;
        let event: Cow<'a, str> =
            serde_json::from_str(event.get()).map_err(|_| EnvelopeError::EventNotAString)?;
        if event.is_empty() {
            return Err(EnvelopeError::EmptyEvent);
        }
        if event.len() > MAX_EVENT_NAME_BYTES {
            return Err(EnvelopeError::EventTooLong);
        }
        // Mono's names look like `mono.events.account_updated`; anything else in a routing key would
        // only confuse bindings and logs.
        if !event.bytes().all(is_event_name_byte) {
            return Err(EnvelopeError::EventHasOddCharacters);
        }
        let data = raw.data.ok_or(EnvelopeError::MissingData)?;
        if !data.get().starts_with('{') {
            return Err(EnvelopeError::DataNotAnObject);
        }
        Ok(Self { event, data })
    }

    /// The event name exactly as Mono sent it (also the routing key).
    pub fn event_name(&self) -> &str {
        &self.event
    }

    /// The kind of event, with unknown names kept as they came.
    pub fn kind(&self) -> EventKind {
        EventKind::from_name(&self.event)
    }

    /// `data` as raw JSON text.
    pub fn data(&self) -> &'a RawValue {
        self.data
    }

    /// The Mono account id, looked up where each event shape keeps it:
    /// `data.account._id`, then `data.account.id`, then `data.id`.
    pub fn account_id(&self) -> Option<AccountId> {
        let data: AccountLocator<'_> = serde_json::from_str(self.data.get()).ok()?;
        let from_account =
            data.account.and_then(|raw| serde_json::from_str::<AccountIds>(raw.get()).ok()).and_then(|a| {
                a.underscore_id.and_then(AccountId::parse).or_else(|| a.id.and_then(AccountId::parse))
            });
        from_account.or_else(|| data.id.and_then(AccountId::parse))
    }
}

/// The bytes an event name may hold (the `event` pattern of the OpenAPI document).
pub fn is_event_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-')
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    event: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
}

/// `Some` for any value that is present, `null` included, so that `"event": null` is reported as
/// the wrong type rather than as missing.
fn present<'de: 'a, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'a RawValue>, D::Error> {
    <&'a RawValue>::deserialize(d).map(Some)
}

/// Only the fields that can hold an account id; everything else is skipped without allocation.
#[derive(Deserialize)]
struct AccountLocator<'a> {
    #[serde(borrow)]
    account: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "string_or_none")]
    id: Option<String>,
}

#[derive(Deserialize)]
struct AccountIds {
    #[serde(rename = "_id", default, deserialize_with = "string_or_none")]
    underscore_id: Option<String>,
    #[serde(default, deserialize_with = "string_or_none")]
    id: Option<String>,
}

/// A field of the wrong type is treated as absent, so the lookup can fall through to the next place.
fn string_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(match value {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

/// A Mono account id: non-empty, at most 128 bytes, no control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccountId(String);

impl AccountId {
    /// Accepts an id that is safe to store and show; Mono's ids are 24 hex characters.
    pub fn parse(raw: impl Into<String>) -> Option<Self> {
        let raw = raw.into();
        let valid = !raw.trim().is_empty() && raw.len() <= 128 && !raw.chars().any(char::is_control);
        valid.then_some(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The events monohook acts on; every other name is kept as `Other` and recorded as ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `mono.events.reauthorisation_required` (British spelling, as Mono sends it).
    ReauthorisationRequired,
    /// `mono.events.account_reauthorized` (American spelling, as Mono sends it).
    AccountReauthorized,
    /// `mono.events.account_updated`.
    AccountUpdated,
    /// `mono.events.account_connected`.
    AccountConnected,
    /// `mono.events.account_unlinked`.
    AccountUnlinked,
    /// `mono.events.sync_failed`.
    SyncFailed,
    /// Any other name: Mono adds events over time.
    Other(String),
}

impl EventKind {
    pub fn from_name(name: &str) -> Self {
        match name {
            "mono.events.reauthorisation_required" => Self::ReauthorisationRequired,
            "mono.events.account_reauthorized" => Self::AccountReauthorized,
            "mono.events.account_updated" => Self::AccountUpdated,
            "mono.events.account_connected" => Self::AccountConnected,
            "mono.events.account_unlinked" => Self::AccountUnlinked,
            "mono.events.sync_failed" => Self::SyncFailed,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Whether the event cannot be applied without knowing its account.
    pub fn needs_account(&self) -> bool {
        !matches!(self, Self::Other(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn every_good_fixture_parses_with_its_account_id() {
        let cases = [
            ("account_connected.json", "68c985839212c1cdb5d2c180"),
            ("account_reauthorized.json", "5fbcde8f8699984153e65537"),
            ("account_unlinked.json", "60770aa8c5878a2af69ed849"),
            ("account_updated.json", "6631279bdedfbd0a1c2e0001"),
            ("reauthorisation_required.json", "5fbcde8f8699984153e65537"),
            ("sync_failed.json", "5fbcde8f8699984153e65537"),
            ("unknown_event.json", "5fbcde8f8699984153e65537"),
        ];
        for (file, account) in cases {
            let body = fixture(file);
            let envelope = Envelope::parse(&body).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(envelope.account_id().unwrap().as_str(), account, "{file}");
        }
    }

    #[test]
    fn every_bad_fixture_is_rejected_with_a_specific_reason() {
        let cases = [
            ("array_body.json", "body must be a JSON object"),
            ("data_not_object.json", "`data` must be a JSON object"),
            ("event_not_string.json", "`event` must be a string"),
            ("missing_event.json", "`event` is missing"),
        ];
        for (file, reason) in cases {
            let err = Envelope::parse(&fixture(&format!("bad/{file}"))).unwrap_err();
            assert_eq!(err.to_string(), reason, "{file}");
        }
        for file in ["not_utf8.bin", "truncated.json"] {
            let err = Envelope::parse(&fixture(&format!("bad/{file}"))).unwrap_err();
            assert!(matches!(err, EnvelopeError::NotJson(_)), "{file}: {err:?}");
        }
    }

    #[test]
    fn unknown_events_are_kept_by_name() {
        let body = fixture("unknown_event.json");
        let envelope = Envelope::parse(&body).unwrap();
        assert_eq!(envelope.kind(), EventKind::Other("mono.events.new_transaction".into()));
        assert!(!envelope.kind().needs_account());
    }

    #[test]
    fn shape_errors_are_named() {
        let cases: [(&[u8], EnvelopeError); 6] = [
            (b"42", EnvelopeError::NotAnObject),
            (b"\"x\"", EnvelopeError::NotAnObject),
            (br#"{"event":"","data":{}}"#, EnvelopeError::EmptyEvent),
            (br#"{"event":"e"}"#, EnvelopeError::MissingData),
            (br#"{"event":null,"data":{}}"#, EnvelopeError::EventNotAString),
            (br#"{"event":"e","data":[]}"#, EnvelopeError::DataNotAnObject),
        ];
        for (body, expected) in cases {
            assert_eq!(Envelope::parse(body).unwrap_err(), expected, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            Envelope::parse(br#"{"event":"mono events/x","data":{}}"#).unwrap_err(),
            EnvelopeError::EventHasOddCharacters
        );
        let long = format!(r#"{{"event":"{}","data":{{}}}}"#, "e".repeat(256));
        assert_eq!(Envelope::parse(long.as_bytes()).unwrap_err(), EnvelopeError::EventTooLong);
    }

    #[test]
    fn escaped_event_names_are_decoded() {
        let body = br#"{"event":"mono.events.account\u005fupdated","data":{"account":{"_id":"a1"}}}"#;
        assert_eq!(Envelope::parse(body).unwrap().kind(), EventKind::AccountUpdated);
    }

    #[test]
    fn account_id_falls_back_through_known_shapes_and_skips_wrong_types() {
        let body = br#"{"event":"e","data":{"account":{"_id":7,"id":"b2"},"id":"c3"}}"#;
        assert_eq!(Envelope::parse(body).unwrap().account_id().unwrap().as_str(), "b2");
        let body = br#"{"event":"e","data":{"account":"x","id":"c3"}}"#;
        assert_eq!(Envelope::parse(body).unwrap().account_id().unwrap().as_str(), "c3");
        let body = br#"{"event":"e","data":{"account":{"_id":""}}}"#;
        assert_eq!(Envelope::parse(body).unwrap().account_id(), None);
        let body = br#"{"event":"e","data":{"id":"c3"}}"#;
        assert_eq!(Envelope::parse(body).unwrap().account_id().unwrap().as_str(), "c3");
        let body = br#"{"event":"e","data":{"id":"  "}}"#;
        assert_eq!(Envelope::parse(body).unwrap().account_id(), None);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// JSON-ish values of every type, nested a little.
    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            "[a-z_.]{1,20}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Envelope::parse(&body).map(|e| e.account_id());
        }

        #[test]
        fn an_envelope_is_accepted_exactly_when_event_is_a_short_string_and_data_an_object(
            event in any_json(),
            data in any_json(),
            extra in any_json(),
        ) {
            let body = serde_json::to_vec(&serde_json::json!({ "event": event, "data": data, "extra": extra })).unwrap();
            let valid_event = event
                .as_str()
                .is_some_and(|e| !e.is_empty() && e.len() <= MAX_EVENT_NAME_BYTES && e.bytes().all(is_event_name_byte));
            let parsed = Envelope::parse(&body);
            prop_assert_eq!(parsed.is_ok(), valid_event && data.is_object(), "{:?}", parsed.err());
            if let Ok(envelope) = parsed {
                prop_assert_eq!(envelope.event_name(), event.as_str().unwrap());
                let _ = envelope.account_id();
            }
        }
    }
}
