//! What the journal keeps of a webhook's body (`JOURNAL_PAYLOAD`).
//!
//! ```text
//! raw body ──sha256──▶ body_sha256 (always the whole body: dedup compares it)
//!     │
//!     └──▶ JournalPayload::Minimal: keep only ALLOWLIST ──▶ webhook_events.payload
//!                                                     └──▶ accounts.account_snapshot (data.account)
//! ```
//!
//! Mono's `account_updated` carries the customer's name, account number, balance and BVN; the worker
//! reads none of them. In `minimal` mode (the default) only the fields of [`ALLOWLIST`] reach
//! PostgreSQL; everything else is dropped in the two functions that write the journal
//! (`db::batch::write`, `db::events::record_dead`), before any statement runs. The row then says
//! what it lacks, under [`MARKER`]: the paths that were dropped (names only, never values), so a body
//! rebuilt from the row (a replay of a dead letter whose message left the queue) carries the list
//! instead of passing for the original. The dead-letter queue keeps each dead letter's full body.
//!
//! Pure functions, no I/O: a body that is not JSON never reaches here (its payload is `None`).

use serde_json::{Map, Value};

/// What the journal keeps of each body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum JournalPayload {
    /// Only the fields of [`ALLOWLIST`].
    #[default]
    Minimal,
    /// The whole body, personal data included (for those who must keep it).
    Full,
}

impl JournalPayload {
    /// The payload text to write for `payload` (a body's JSON text).
    pub fn apply(self, payload: &str) -> String {
        match self {
            Self::Full => payload.to_owned(),
            Self::Minimal => match serde_json::from_str::<Value>(payload) {
                Ok(body) => minimise(&body).to_string(),
                // Not JSON at all: nothing of it is kept (the caller only passes JSON).
                Err(_) => Value::Object(marker(vec![WHOLE_BODY.to_owned()])).to_string(),
            },
        }
    }
}

/// The fields a minimal journal row keeps, as dotted paths from the body's root: what the worker's
/// handlers read (the event, the account id in each place Mono puts it, `meta.data_status`, the
/// customer id), the account's `updated_at`, and its institution (a bank, not a person). A path keeps
/// a string, number, boolean or null found there; an object on the way is walked into and keeps only
/// its listed fields; arrays are never kept. Adding a field here is a decision to store it for
/// `JOURNAL_RETENTION_DAYS`: it must not identify a person.
pub const ALLOWLIST: &[&str] = &[
    "event",
    "data.id",
    "data._id",
    "data.customer",
    "data.customer.id",
    "data.customer._id",
    "data.meta.data_status",
    "data.account._id",
    "data.account.id",
    "data.account.updated_at",
    "data.account.institution.name",
    "data.account.institution.bankCode",
    "data.account.institution.type",
];

/// The key under which a minimal row says what it lacks:
/// `{"payload": "minimal", "dropped": ["data.account.bvn", ...]}`.
pub const MARKER: &str = "monohook_journal";

/// What `dropped` holds when the body was not a JSON object at all.
pub const WHOLE_BODY: &str = "$";

/// At most this many dropped paths are listed; the rest are counted in one last entry.
const MAX_LISTED: usize = 40;

/// `body` with only the fields of [`ALLOWLIST`], plus the [`MARKER`] listing what was dropped. A
/// body minimised before (it carries the marker) keeps its earlier list, so dropping twice never
/// forgets what the first drop took.
pub fn minimise(body: &Value) -> Value {
    let mut dropped = Vec::new();
    let Value::Object(fields) = body else {
        return Value::Object(marker(vec![WHOLE_BODY.to_owned()]));
    };
    if let Some(earlier) = fields.get(MARKER).and_then(|m| m["dropped"].as_array()) {
        dropped.extend(earlier.iter().filter_map(Value::as_str).map(str::to_owned));
    }
    let mut kept = Map::new();
    for (key, value) in fields {
        if key == MARKER {
            continue;
        }
        if let Some(value) = keep(key, value, &mut dropped) {
            kept.insert(key.clone(), value);
        }
    }
    if !dropped.is_empty() {
        kept.extend(marker(dropped));
    }
    Value::Object(kept)
}

/// What a stored payload lacks of the body it was made from: the dropped paths of its [`MARKER`],
/// `None` for a full payload. For operators' tools that rebuild a body from the journal.
pub fn lacks(payload: &Value) -> Option<Vec<String>> {
    let marker = payload.get(MARKER)?;
    let dropped = marker["dropped"].as_array()?;
    Some(dropped.iter().filter_map(Value::as_str).map(str::to_owned).collect())
}

/// The kept part of `value` found at `path`, recording the paths it drops.
fn keep(path: &str, value: &Value, dropped: &mut Vec<String>) -> Option<Value> {
    let listed = ALLOWLIST.contains(&path);
    let leads_on = ALLOWLIST.iter().any(|allowed| {
        allowed.len() > path.len() && allowed.starts_with(path) && allowed.as_bytes()[path.len()] == b'.'
    });
    match value {
        Value::Object(fields) if leads_on => {
            let mut kept = Map::new();
            for (key, child) in fields {
                if let Some(child) = keep(&format!("{path}.{key}"), child, dropped) {
                    kept.insert(key.clone(), child);
                }
            }
            Some(Value::Object(kept))
        }
        Value::Object(_) | Value::Array(_) => {
            dropped.push(path.to_owned());
            None
        }
        scalar if listed => Some(scalar.clone()),
        _ => {
            dropped.push(path.to_owned());
            None
        }
    }
}

fn marker(mut dropped: Vec<String>) -> Map<String, Value> {
    dropped.sort_unstable();
    dropped.dedup();
    if dropped.len() > MAX_LISTED {
        let more = dropped.len() - MAX_LISTED;
        dropped.truncate(MAX_LISTED);
        dropped.push(format!("(and {more} more)"));
    }
    let mut map = Map::new();
    map.insert(MARKER.to_owned(), serde_json::json!({ "payload": "minimal", "dropped": dropped }));
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn account_updated() -> Value {
        json!({
            "event": "mono.events.account_updated",
            "data": {
                "meta": { "data_status": "AVAILABLE", "auth_method": "internet_banking", "ref": "r1" },
                "account": {
                    "_id": "a1", "name": "Amaka Eze", "accountNumber": "0235000043", "balance": 2004400,
                    "bvn": "22212345678", "updated_at": "2026-11-20T10:25:23.666Z",
                    "institution": { "name": "ALAT by WEMA", "bankCode": "035", "type": "PERSONAL_BANKING" },
                    "scope": ["financial_data"]
                }
            }
        })
    }

    #[test]
    fn an_account_update_keeps_what_the_worker_reads_and_names_what_it_dropped() {
        let minimal = minimise(&account_updated());

        assert_eq!(
            minimal,
            json!({
                "event": "mono.events.account_updated",
                "data": {
                    "meta": { "data_status": "AVAILABLE" },
                    "account": {
                        "_id": "a1", "updated_at": "2026-11-20T10:25:23.666Z",
                        "institution": { "name": "ALAT by WEMA", "bankCode": "035", "type": "PERSONAL_BANKING" }
                    }
                },
                "monohook_journal": {
                    "payload": "minimal",
                    "dropped": [
                        "data.account.accountNumber", "data.account.balance", "data.account.bvn",
                        "data.account.name", "data.account.scope", "data.meta.auth_method", "data.meta.ref"
                    ]
                }
            })
        );
        let text = minimal.to_string();
        for personal in ["Amaka", "0235000043", "2004400", "22212345678"] {
            assert!(!text.contains(personal), "{personal} kept");
        }
    }

    #[test]
    fn the_worker_understands_a_minimal_body_as_it_did_the_full_one() {
        use crate::event::IncomingEvent;
        use shared::delivery::{AttemptHistory, DeliveryMeta};
        let parse = |body: &Value| {
            let bytes = serde_json::to_vec(body).unwrap();
            let meta = DeliveryMeta::stamp(&bytes);
            let history = AttemptHistory { previous_attempts: 0, first_attempt_at: None };
            IncomingEvent::parse(&bytes, &meta, &history).1.unwrap()
        };
        let customer = json!({"event": "mono.events.account_connected",
            "data": {"id": "a2", "customer": {"_id": "c7", "name": "Amaka Eze", "email": "a@e.ng"}}});
        for body in [account_updated(), customer] {
            let (full, minimal) = (parse(&body), parse(&minimise(&body)));
            assert_eq!(
                (full.kind, full.account_id, full.data_status, full.customer_id, full.has_account_snapshot),
                (
                    minimal.kind,
                    minimal.account_id,
                    minimal.data_status,
                    minimal.customer_id,
                    minimal.has_account_snapshot
                )
            );
        }
    }

    #[test]
    fn a_listed_field_holding_an_object_or_array_is_dropped_not_kept_whole() {
        let body =
            json!({"event": ["x"], "data": {"account": {"_id": {"name": "Amaka"}}, "customer": ["Amaka"]}});
        let minimal = minimise(&body);
        assert!(!minimal.to_string().contains("Amaka"));
        assert_eq!(
            lacks(&minimal).unwrap(),
            ["data.account._id", "data.customer", "event"].map(str::to_owned)
        );
    }

    #[test]
    fn minimising_twice_keeps_the_first_list_and_a_full_payload_lacks_nothing() {
        let once = minimise(&account_updated());
        let twice = minimise(&once);
        assert_eq!(once, twice);
        assert_eq!(lacks(&account_updated()), None);
        assert_eq!(lacks(&minimise(&json!([1]))).unwrap(), [WHOLE_BODY]);
    }

    #[test]
    fn a_long_list_of_dropped_fields_is_bounded() {
        let data: Map<String, Value> = (0..100).map(|i| (format!("f{i:03}"), json!(i))).collect();
        let minimal = minimise(&json!({"event": "e", "data": data}));
        let listed = lacks(&minimal).unwrap();
        assert_eq!(listed.len(), MAX_LISTED + 1);
        assert_eq!(listed.last().unwrap(), "(and 60 more)");
    }

    #[test]
    fn full_mode_stores_the_body_as_it_came() {
        let text = account_updated().to_string();
        assert_eq!(JournalPayload::Full.apply(&text), text);
        assert!(!JournalPayload::Minimal.apply(&text).contains("Amaka"));
    }
}
