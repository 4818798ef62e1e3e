//! Standard Webhooks signatures: `v1,` + base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`, one per
//! key, separated by spaces (a receiver accepts the request if any one verifies: that is how a key is
//! rotated without a gap).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use secrecy::SecretSlice;
use sha2::Sha256;

use super::endpoints::key_bytes;

/// The `webhook-signature` header for one message.
pub fn signature_header(keys: &[SecretSlice<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(key_bytes(key)).expect("HMAC takes a key of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_matches_the_specifications_example() {
        // The example of the Standard Webhooks specification (and of its reference libraries).
        let key = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let header = signature_header(
            &[SecretSlice::from(key)],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_key_signs_during_a_rotation() {
        let old = SecretSlice::from(vec![1u8; 32]);
        let new = SecretSlice::from(vec![2u8; 32]);
        let both = signature_header(&[old, new], "id", 1, b"{}");
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], signature_header(&[SecretSlice::from(vec![1u8; 32])], "id", 1, b"{}"));
        assert_ne!(parts[0], parts[1]);
    }
}
