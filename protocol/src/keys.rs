//! Public keys as `GET /v1/keys` lists them, and the detached signature over
//! resolution responses: Ed25519 over the exact body bytes, carried in the
//! `Sluice-Signature` header, so no JSON canonicalisation is ever needed.

use crate::Error;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Verifier;
use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePublicKey};
use serde::{Deserialize, Serialize};

/// The header that carries a resolution response's signature.
pub const SIGNATURE_HEADER: &str = "sluice-signature";

/// What a key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Cosign signatures over image digests (ECDSA P-256).
    Image,
    /// Resolution responses (Ed25519).
    Response,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRole::Image => "image",
            KeyRole::Response => "response",
        })
    }
}

/// One trusted public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// First 16 hex digits of the SHA-256 of the key's DER SubjectPublicKeyInfo.
    pub key_id: String,
    /// What the key signs.
    pub role: KeyRole,
    /// `ecdsa-p256-sha256` or `ed25519`.
    pub algorithm: String,
    /// The SubjectPublicKeyInfo in PEM.
    pub public_key_pem: String,
}

/// The answer of `GET /v1/keys`, and the agent's `keys` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet {
    /// Every key the server signs with or has signed with and still trusts.
    pub keys: Vec<PublicKey>,
}

/// Algorithm name of image keys.
pub const ALG_ECDSA_P256: &str = "ecdsa-p256-sha256";
/// Algorithm name of response keys.
pub const ALG_ED25519: &str = "ed25519";

/// The key id of a DER SubjectPublicKeyInfo.
pub fn key_id(spki_der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(spki_der)[..8])
}

impl KeySet {
    /// The key with this id and role, if trusted.
    pub fn find(&self, key_id: &str, role: KeyRole) -> Result<&PublicKey, Error> {
        self.keys
            .iter()
            .find(|k| k.key_id == key_id && k.role == role)
            .ok_or_else(|| Error::UnknownKey {
                key_id: key_id.to_string(),
                role,
            })
    }

    /// Checks a `Sluice-Signature` header value against the exact body bytes.
    pub fn verify_response(&self, header: &str, body: &[u8]) -> Result<(), Error> {
        let (key_id, sig) = parse_signature_header(header)?;
        let key = self.find(&key_id, KeyRole::Response)?;
        let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(&key.public_key_pem)
            .map_err(|e| Error::BadKey(e.to_string()))?;
        let sig = ed25519_dalek::Signature::from_slice(&sig)
            .map_err(|e| Error::MalformedSignature(e.to_string()))?;
        vk.verify(body, &sig)
            .map_err(|_| Error::BadSignature(key_id))
    }
}

fn parse_signature_header(header: &str) -> Result<(String, Vec<u8>), Error> {
    let mut key_id = None;
    let mut sig = None;
    for part in header.split(';') {
        match part.trim().split_once('=') {
            Some(("keyid", v)) => key_id = Some(v.to_string()),
            Some(("sig", v)) => {
                sig = Some(
                    B64.decode(v)
                        .map_err(|e| Error::MalformedSignature(e.to_string()))?,
                )
            }
            _ => {}
        }
    }
    match (key_id, sig) {
        (Some(k), Some(s)) => Ok((k, s)),
        _ => Err(Error::MalformedSignature(
            "expected `keyid=<id>; sig=<base64>`".into(),
        )),
    }
}

/// Signs resolution responses with an Ed25519 key.
///
/// Ed25519 signatures are deterministic, so both backends give the same bytes
/// for the same key and body. With the `aws-lc` feature (the server's) the
/// signing itself runs in aws-lc, about 1.7 times faster than ed25519-dalek
/// on this project's machines; the agent never signs and keeps to dalek.
#[derive(Clone)]
pub struct ResponseSigner {
    key: ed25519_dalek::SigningKey,
    #[cfg(feature = "aws-lc")]
    fast: std::sync::Arc<aws_lc_rs::signature::Ed25519KeyPair>,
    key_id: String,
}

impl ResponseSigner {
    /// A signer from the raw 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let der = key
            .verifying_key()
            .to_public_key_der()
            .expect("ed25519 SPKI encodes");
        ResponseSigner {
            key_id: key_id(der.as_bytes()),
            #[cfg(feature = "aws-lc")]
            fast: std::sync::Arc::new(
                aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(seed)
                    .expect("any 32-byte seed is an Ed25519 key"),
            ),
            key,
        }
    }

    /// The id of this signer's public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key as `GET /v1/keys` lists it.
    pub fn public_key(&self) -> PublicKey {
        let pem = self
            .key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("ed25519 SPKI encodes");
        PublicKey {
            key_id: self.key_id.clone(),
            role: KeyRole::Response,
            algorithm: ALG_ED25519.into(),
            public_key_pem: pem,
        }
    }

    /// The `Sluice-Signature` header value for these body bytes.
    pub fn sign_header(&self, body: &[u8]) -> String {
        format!("keyid={}; sig={}", self.key_id, B64.encode(self.sign(body)))
    }

    #[cfg(not(feature = "aws-lc"))]
    fn sign(&self, body: &[u8]) -> [u8; 64] {
        ed25519_dalek::Signer::sign(&self.key, body).to_bytes()
    }

    #[cfg(feature = "aws-lc")]
    fn sign(&self, body: &[u8]) -> [u8; 64] {
        let sig = self.fast.sign(body);
        sig.as_ref()
            .try_into()
            .expect("Ed25519 signatures are 64 bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(n: u8) -> ResponseSigner {
        ResponseSigner::from_seed(&[n; 32])
    }

    #[test]
    fn response_signature_round_trips_and_binds_the_bytes() {
        let s = signer(1);
        let keys = KeySet {
            keys: vec![s.public_key()],
        };
        let body = br#"{"update":false}"#;
        let h = s.sign_header(body);
        keys.verify_response(&h, body).unwrap();
        assert_eq!(
            keys.verify_response(&h, br#"{"update":true}"#),
            Err(Error::BadSignature(s.key_id().into()))
        );
    }

    #[test]
    fn signer_gives_the_same_signature_as_ed25519_dalek() {
        // Whichever backend is compiled in, the bytes are Ed25519's
        // deterministic signature, the one any verifier expects.
        let seed = [9u8; 32];
        let body = br#"{"update":true,"nonce":"n"}"#;
        let want = ed25519_dalek::Signer::sign(&ed25519_dalek::SigningKey::from_bytes(&seed), body);
        assert_eq!(ResponseSigner::from_seed(&seed).sign(body), want.to_bytes());
    }

    #[test]
    fn response_from_an_untrusted_key_is_refused() {
        let trusted = KeySet {
            keys: vec![signer(1).public_key()],
        };
        let other = signer(2);
        let h = other.sign_header(b"x");
        assert!(matches!(
            trusted.verify_response(&h, b"x"),
            Err(Error::UnknownKey { .. })
        ));
    }

    #[test]
    fn key_of_the_wrong_role_is_refused() {
        let s = signer(1);
        let mut k = s.public_key();
        k.role = KeyRole::Image;
        let keys = KeySet { keys: vec![k] };
        assert!(matches!(
            keys.verify_response(&s.sign_header(b"x"), b"x"),
            Err(Error::UnknownKey { .. })
        ));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let keys = KeySet {
            keys: vec![signer(1).public_key()],
        };
        for h in ["", "keyid=abc", "sig=AAAA", "keyid=abc; sig=***"] {
            assert!(keys.verify_response(h, b"x").is_err(), "{h}");
        }
    }
}
