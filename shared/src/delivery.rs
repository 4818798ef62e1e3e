//! What travels with every queued webhook besides its body: the delivery id, the receive time and the
//! body's digest (stamped by ingest), and the attempt history (kept by the worker).
//!
//! The body itself is never altered; everything monohook adds lives in AMQP properties and headers.
//! Reading is lenient: a message published by hand (or by an older version) without these headers still
//! gets a stable id and a receive time, so it can be processed or dead-lettered like any other.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::{Digest, Sha256};
use std::fmt;
use uuid::Uuid;

/// Receive time, RFC 3339 with milliseconds, e.g. `2026-11-25T12:31:16.123Z`.
pub const HEADER_RECEIVED_AT: &str = "x-received-at";
/// Hex SHA-256 of the body as received.
pub const HEADER_BODY_SHA256: &str = "x-body-sha256";
/// How many times a worker has tried this delivery so far.
pub const HEADER_ATTEMPTS: &str = "x-attempts";
/// When a worker first and last tried this delivery (RFC 3339).
pub const HEADER_FIRST_ATTEMPT_AT: &str = "x-first-attempt-at";
pub const HEADER_LAST_ATTEMPT_AT: &str = "x-last-attempt-at";
/// Why the worker dead-lettered this delivery.
pub const HEADER_DEAD_REASON: &str = "x-dead-reason";
/// Whether the dead-letter reason is `permanent` or `exhausted` (retries used up) or `poison`.
pub const HEADER_DEAD_CLASS: &str = "x-dead-class";

/// Headers the broker adds on dead-lettering and redelivery; they describe an earlier copy, so a
/// republished copy drops them.
pub const BROKER_HEADERS: [&str; 7] = [
    "x-death",
    "x-delivery-count",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
];

/// Headers of a delivery's attempt history (the worker's), dropped when a replay starts it afresh.
pub const ATTEMPT_HEADERS: [&str; 6] = [
    HEADER_ATTEMPTS,
    HEADER_FIRST_ATTEMPT_AT,
    HEADER_LAST_ATTEMPT_AT,
    HEADER_DEAD_REASON,
    HEADER_DEAD_CLASS,
    HEADER_LAST_ERROR,
];

/// The last failure of a delivery that moved to a retry tier.
pub const HEADER_LAST_ERROR: &str = "x-last-error";

/// Lineage of a dead letter an operator put back on the work queue (`worker dlq replay`): the
/// delivery id replayed, the replay batch, who and why, when, and whether the ordering guard is
/// overridden (`true`).
pub const HEADER_REPLAY_OF: &str = "x-replay-of";
pub const HEADER_REPLAY_BATCH: &str = "x-replay-batch";
pub const HEADER_REPLAYED_BY: &str = "x-replayed-by";
pub const HEADER_REPLAY_NOTE: &str = "x-replay-note";
pub const HEADER_REPLAYED_AT: &str = "x-replayed-at";
pub const HEADER_REPLAY_FORCE: &str = "x-replay-force";

/// The id ingest gives each accepted webhook (a UUIDv7, so ids sort by receive time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(Uuid);

impl DeliveryId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Uuid::parse_str(raw).ok().map(Self)
    }

    /// A stable id for a message that arrived without one: the same body always maps to the same id,
    /// so a redelivery is still recognised.
    pub fn derived_from_digest(body_sha256: &[u8; 32]) -> Self {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&body_sha256[..16]);
        Self(Uuid::new_v8(bytes))
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for DeliveryId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl Default for DeliveryId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The stamp ingest puts on a webhook, read back by the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryMeta {
    pub id: DeliveryId,
    /// Truncated to milliseconds, the precision of the header, so both sides agree exactly.
    pub received_at: DateTime<Utc>,
    pub body_sha256: String,
}

impl DeliveryMeta {
    /// Stamps a webhook received now.
    pub fn stamp(body: &[u8]) -> Self {
        Self { id: DeliveryId::new(), received_at: now_millis(), body_sha256: body_digest(body) }
    }

    /// The properties of the persistent message ingest publishes.
    pub fn to_properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_RECEIVED_AT.into(), long_string(&format_time(self.received_at)));
        headers.insert(HEADER_BODY_SHA256.into(), long_string(&self.body_sha256));
        BasicProperties::default()
            .with_message_id(ShortString::from(self.id.to_string()))
            .with_timestamp(u64::try_from(self.received_at.timestamp()).unwrap_or_default())
            .with_content_type("application/json".into())
            // 2 = persistent: written to disk before the broker confirms.
            .with_delivery_mode(2)
            .with_headers(headers)
    }

    /// Reads the stamp back, filling in what a hand-published message lacks: the id is derived from
    /// the body, the receive time falls back to the AMQP timestamp, then to now.
    pub fn from_properties(properties: &BasicProperties, body: &[u8]) -> Self {
        let digest = sha256(body);
        let headers = properties.headers().as_ref();
        let id = properties
            .message_id()
            .as_ref()
            .and_then(|id| DeliveryId::parse(id.as_str()))
            .unwrap_or_else(|| DeliveryId::derived_from_digest(&digest));
        let received_at = headers
            .and_then(|h| header_str(h, HEADER_RECEIVED_AT))
            .and_then(|raw| DateTime::parse_from_rfc3339(&raw).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                properties.timestamp().and_then(|secs| DateTime::from_timestamp(i64::try_from(secs).ok()?, 0))
            })
            .unwrap_or_else(now_millis);
        // The digest of the body as ingest received it: a replay rebuilt from the journal carries it
        // in the stamp, since its body is re-serialised JSON whose own digest differs.
        let body_sha256 = headers
            .and_then(|h| header_str(h, HEADER_BODY_SHA256))
            .filter(|stamp| stamp.len() == 64 && stamp.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|stamp| stamp.to_ascii_lowercase())
            .unwrap_or_else(|| hex::encode(digest));
        Self { id, received_at, body_sha256 }
    }
}

/// The attempt history a worker carries in headers across retry tiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptHistory {
    /// Attempts made before this one.
    pub previous_attempts: u32,
    pub first_attempt_at: Option<DateTime<Utc>>,
}

impl AttemptHistory {
    pub fn from_properties(properties: &BasicProperties) -> Self {
        let headers = properties.headers().as_ref();
        let previous_attempts =
            headers.and_then(|h| h.inner().get(HEADER_ATTEMPTS)).and_then(as_u32).unwrap_or(0);
        let first_attempt_at = headers
            .and_then(|h| header_str(h, HEADER_FIRST_ATTEMPT_AT))
            .and_then(|raw| DateTime::parse_from_rfc3339(&raw).ok())
            .map(|t| t.with_timezone(&Utc));
        Self { previous_attempts, first_attempt_at }
    }
}

/// Reads a string header, whichever AMQP string type the publisher used.
pub fn header_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Reads an integer header, whichever AMQP integer type the publisher used.
pub fn as_u32(value: &AMQPValue) -> Option<u32> {
    let wide: i64 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(wide).ok()
}

pub fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// RFC 3339 with milliseconds and a `Z`, the format of every time monohook puts in a header.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Now, truncated to milliseconds.
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

fn sha256(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// The digest a body is journaled and deduplicated by (`body_sha256`): SHA-256, lowercase hex.
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(sha256(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_survives_the_round_trip_through_properties() {
        let body = br#"{"event":"e","data":{}}"#;
        let meta = DeliveryMeta::stamp(body);
        let properties = meta.to_properties();
        assert_eq!(DeliveryMeta::from_properties(&properties, body), meta);
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(meta.id.as_uuid().get_version_num(), 7);
    }

    #[test]
    fn a_message_without_a_stamp_gets_an_id_derived_from_its_body() {
        let properties = BasicProperties::default();
        let first = DeliveryMeta::from_properties(&properties, b"garbage");
        let again = DeliveryMeta::from_properties(&properties, b"garbage");
        let other = DeliveryMeta::from_properties(&properties, b"other garbage");
        assert_eq!(first.id, again.id);
        assert_ne!(first.id, other.id);
        assert_eq!(first.body_sha256.len(), 64);
    }

    #[test]
    fn received_at_header_has_millisecond_precision() {
        let meta = DeliveryMeta::stamp(b"{}");
        let headers = meta.to_properties().headers().clone().unwrap();
        let raw = header_str(&headers, HEADER_RECEIVED_AT).unwrap();
        assert_eq!(raw.len(), "2026-11-25T12:31:16.123Z".len(), "{raw}");
        assert!(raw.ends_with('Z'));
    }

    #[test]
    fn attempt_history_reads_any_integer_type() {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_ATTEMPTS.into(), AMQPValue::LongUInt(3));
        let properties = BasicProperties::default().with_headers(headers);
        assert_eq!(AttemptHistory::from_properties(&properties).previous_attempts, 3);
        assert_eq!(AttemptHistory::from_properties(&BasicProperties::default()).previous_attempts, 0);
    }
}
