//! Wire types and signature formats shared by the Sluice server and agent.
//! Everything a device and the server must agree on byte for byte lives here:
//! the resolution answer and how it is signed, the cosign payload, key ids.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![forbid(unused_must_use)]

pub mod chunked;
pub mod keylist;
pub mod keys;
pub mod proof;
pub mod simplesigning;
pub mod wire;

pub use keylist::{KeyList, KeyLists, KeyState, ListedKey, SignedKeyList};
pub use keys::{KeyRole, KeySet, PublicKey, ResponseSigner, key_id, leaf_hash};
pub use proof::{DeviceKey, DeviceProof, ProofPurpose};
pub use simplesigning::SimpleSigning;
pub use wire::*;

/// What went wrong while checking a signature or a wire value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A key could not be read.
    #[error("bad key: {0}")]
    BadKey(String),
    /// No trusted key has this id, or it has another role.
    #[error("no trusted {role} key with id {key_id}")]
    UnknownKey {
        /// The key id named by the signature.
        key_id: String,
        /// The role the key was needed for.
        role: KeyRole,
    },
    /// The signature header or value could not be parsed.
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    /// The signature does not match the signed bytes.
    #[error("signature does not verify with key {0}")]
    BadSignature(String),
    /// The signed payload names something else than expected.
    #[error("signed payload does not match: {0}")]
    Mismatch(String),
}

/// `sha256:<64 lowercase hex>`, the only digest form Sluice accepts.
pub fn is_sha256_digest(s: &str) -> bool {
    s.len() == 71
        && s.starts_with("sha256:")
        && s[7..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The 32 bytes of a `sha256:<hex>` digest ([`is_sha256_digest`]'s form).
pub fn sha256_bytes(s: &str) -> Option<[u8; 32]> {
    if !is_sha256_digest(s) {
        return None;
    }
    let mut out = [0; 32];
    hex::decode_to_slice(&s[7..], &mut out).ok()?;
    Some(out)
}

/// `sha256:<hex>` of 32 digest bytes.
pub fn sha256_string(d: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(d))
}

/// The `sha256:<hex>` digest of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_form_is_strict() {
        let good = sha256_digest(b"x");
        assert!(is_sha256_digest(&good));
        assert!(!is_sha256_digest(&good.to_uppercase()));
        assert!(!is_sha256_digest(&good[..70]));
        let bytes = sha256_bytes(&good).unwrap();
        assert_eq!(sha256_string(&bytes), good);
        assert_eq!(sha256_bytes(&good.to_uppercase()), None);
        assert!(!is_sha256_digest(&good.replace("sha256:", "sha512:")));
    }
}
