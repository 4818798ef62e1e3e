//! Mono-shaped webhook bodies for load: the same shapes as `tests/fixtures/`, with varying accounts.

use serde_json::json;

/// A Mono-like account id (24 hex characters) for account number `n`.
pub fn account_id(n: u64) -> String {
    format!("{n:024x}")
}

/// An `account_updated` body of exactly `size` bytes (padded in `data.meta.ref`), like
/// `tests/fixtures/account_updated.json` compacted.
pub fn account_updated(account: &str, sequence: u64, size: usize) -> Vec<u8> {
    let mut body = json!({
        "event": "mono.events.account_updated",
        "data": {
            "meta": { "data_status": "AVAILABLE", "auth_method": "internet_banking", "ref": "", "retrieved_data": ["identity", "balance", "transactions"] },
            "account": {
                "scope": ["financial_data"],
                "_id": account,
                "name": "Amaka Eze",
                "accountNumber": "0235000043",
                "currency": "NGN",
                "balance": 2_004_400 + sequence,
                "type": "Tier 3 Savings Account",
                "bvn": "1010",
                "liveMode": true,
                "authMethod": "internet_banking",
                "institution": { "name": "ALAT by WEMA", "bankCode": "035", "type": "PERSONAL_BANKING" },
                "accessType": "PERSISTENT",
                "created_at": "2026-04-30T17:16:01.171Z",
                "updated_at": "2026-11-20T10:25:23.666Z"
            }
        }
    });
    let unpadded = serde_json::to_vec(&body).expect("serialisable").len();
    let padding = size.saturating_sub(unpadded);
    body["data"]["meta"]["ref"] = json!("x".repeat(padding));
    serde_json::to_vec(&body).expect("serialisable")
}

/// A `reauthorisation_required` body for `account`.
pub fn reauthorisation_required(account: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "event": "mono.events.reauthorisation_required", "data": { "account": { "_id": account } } }))
        .expect("serialisable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_bodies_have_the_requested_size_and_parse_as_events() {
        let body = account_updated(&account_id(7), 1, 1024);
        assert_eq!(body.len(), 1024);
        let envelope = shared::event::Envelope::parse(&body).unwrap();
        assert_eq!(envelope.account_id().unwrap().as_str(), "000000000000000000000007");
    }
}
