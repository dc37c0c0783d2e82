//! A device's own key and its proofs of possession. Each device makes an
//! Ed25519 key pair when it first enrolls; enrolling, renewing its token and
//! binding a key to an older enrollment each carry a signature over a
//! domain-separated message naming the purpose, the product, the device
//! (machine id or device id), the public key, a random nonce and the time.
//! The server accepts a proof within [`PROOF_WINDOW_S`] of its own clock and
//! remembers the ones it saw, so a proof cannot be replayed; the nonce keeps
//! two proofs made in the same second from being the same bytes.

use crate::Error;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// How far a proof's timestamp may be from the server's clock, in seconds.
pub const PROOF_WINDOW_S: i64 = 300;

/// Random bytes in each proof.
pub const NONCE_BYTES: usize = 16;

/// The first bytes of every proof message: no other Sluice signature starts so.
const DOMAIN: &[u8] = b"sluice-device-proof-v1\0";

/// What a proof is for: a proof made for one purpose never passes for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofPurpose {
    /// `POST /v1/devices/enroll`; the subject is the machine id.
    Enroll,
    /// `POST /v1/devices/{id}/token`; the subject is the device id.
    Renew,
    /// `POST /v1/devices/{id}/key`; the subject is the device id.
    Bind,
}

impl ProofPurpose {
    /// The purpose's name inside the signed message.
    pub fn as_str(self) -> &'static str {
        match self {
            ProofPurpose::Enroll => "enroll",
            ProofPurpose::Renew => "renew",
            ProofPurpose::Bind => "bind",
        }
    }
}

/// A device's proof that it holds the private key of `public_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeviceProof {
    /// The device's Ed25519 public key: base64 of its 32 bytes.
    pub public_key: String,
    /// Base64 of 16 random bytes, fresh for each proof.
    pub nonce: String,
    /// When the proof was made, in seconds since the epoch (within five
    /// minutes of the server's clock).
    pub timestamp: i64,
    /// Base64 of the Ed25519 signature over the proof message (see
    /// [`proof_message`]).
    pub signature: String,
}

/// The exact bytes a proof signs: the domain, then purpose, product,
/// subject, public key and nonce, each as a 4-byte big-endian length and its
/// bytes, then the timestamp as 8 bytes big endian. Lengths make every
/// field's bounds unambiguous, whatever characters a machine id holds.
pub fn proof_message(
    purpose: ProofPurpose,
    product: &str,
    subject: &str,
    public_key: &[u8; 32],
    nonce: &[u8],
    timestamp: i64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 96 + product.len() + subject.len());
    m.extend_from_slice(DOMAIN);
    for field in [
        purpose.as_str().as_bytes(),
        product.as_bytes(),
        subject.as_bytes(),
        public_key,
        nonce,
    ] {
        m.extend_from_slice(&(field.len() as u32).to_be_bytes());
        m.extend_from_slice(field);
    }
    m.extend_from_slice(&timestamp.to_be_bytes());
    m
}

/// A device's private key.
pub struct DeviceKey(SigningKey);

impl DeviceKey {
    /// The key of a 32-byte seed (fresh random bytes for a new key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        DeviceKey(SigningKey::from_bytes(seed))
    }

    /// The key from its PKCS#8 PEM form (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        SigningKey::from_pkcs8_pem(pem)
            .map(DeviceKey)
            .map_err(|e| Error::BadKey(e.to_string()))
    }

    /// The key in PKCS#8 PEM, as `openssl pkey` reads it.
    pub fn to_pem(&self) -> String {
        self.0
            .to_pkcs8_pem(Default::default())
            .expect("an Ed25519 key encodes as PKCS#8")
            .to_string()
    }

    /// The public key's 32 bytes.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// The public key's id: the first 16 hex digits of its SHA-256.
    pub fn key_id(&self) -> String {
        device_key_id(&self.public_key())
    }

    /// A proof for `purpose`, `product` and `subject` made at `timestamp`,
    /// with `nonce` (fresh random bytes).
    pub fn prove(
        &self,
        purpose: ProofPurpose,
        product: &str,
        subject: &str,
        nonce: [u8; NONCE_BYTES],
        timestamp: i64,
    ) -> DeviceProof {
        let public_key = self.public_key();
        let sig = self.0.sign(&proof_message(
            purpose,
            product,
            subject,
            &public_key,
            &nonce,
            timestamp,
        ));
        DeviceProof {
            public_key: B64.encode(public_key),
            nonce: B64.encode(nonce),
            timestamp,
            signature: B64.encode(sig.to_bytes()),
        }
    }
}

/// The id of a device's public key: the first 16 hex digits of its SHA-256.
pub fn device_key_id(public_key: &[u8; 32]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(public_key)[..8])
}

/// Why a proof was refused; each says what to do in its message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    /// The public key or signature is not valid base64 of the right length,
    /// or the key is a weak (small-order) point.
    #[error("malformed proof: {0}")]
    Malformed(String),
    /// The timestamp is too far from the server's clock.
    #[error(
        "the proof was made at {timestamp}, {off} s from the server's clock ({now}): check the device's clock"
    )]
    Stale {
        /// The proof's timestamp.
        timestamp: i64,
        /// The server's clock.
        now: i64,
        /// How far apart, in seconds.
        off: i64,
    },
    /// The signature does not verify for this purpose, product, subject and key.
    #[error("the proof's signature does not verify for this {0}")]
    BadSignature(&'static str),
}

/// Checks a proof made for `purpose`, `product` and `subject` at most
/// [`PROOF_WINDOW_S`] from `now`; answers the public key it proves.
pub fn verify_proof(
    proof: &DeviceProof,
    purpose: ProofPurpose,
    product: &str,
    subject: &str,
    now: i64,
) -> Result<[u8; 32], ProofError> {
    let public_key: [u8; 32] = B64
        .decode(&proof.public_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| ProofError::Malformed("public_key must be base64 of 32 bytes".into()))?;
    let sig: [u8; 64] = B64
        .decode(&proof.signature)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| ProofError::Malformed("signature must be base64 of 64 bytes".into()))?;
    let nonce = B64
        .decode(&proof.nonce)
        .ok()
        .filter(|n| n.len() == NONCE_BYTES)
        .ok_or_else(|| {
            ProofError::Malformed(format!("nonce must be base64 of {NONCE_BYTES} bytes"))
        })?;
    let key = VerifyingKey::from_bytes(&public_key)
        .map_err(|_| ProofError::Malformed("public_key is not an Ed25519 point".into()))?;
    if key.is_weak() {
        return Err(ProofError::Malformed(
            "public_key is a weak (small-order) point".into(),
        ));
    }
    let off = proof.timestamp.saturating_sub(now).saturating_abs();
    if off > PROOF_WINDOW_S {
        return Err(ProofError::Stale {
            timestamp: proof.timestamp,
            now,
            off,
        });
    }
    let message = proof_message(
        purpose,
        product,
        subject,
        &public_key,
        &nonce,
        proof.timestamp,
    );
    key.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| {
            ProofError::BadSignature(match purpose {
                ProofPurpose::Enroll => "product, machine id and key",
                ProofPurpose::Renew | ProofPurpose::Bind => "device and key",
            })
        })?;
    Ok(public_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> DeviceKey {
        DeviceKey::from_seed(&[b; 32])
    }

    #[test]
    fn a_proof_verifies_only_for_what_it_was_made_for() {
        let k = key(1);
        let p = k.prove(ProofPurpose::Enroll, "acme", "m-1", [0; 16], 1000);
        assert_eq!(
            verify_proof(&p, ProofPurpose::Enroll, "acme", "m-1", 1000),
            Ok(k.public_key())
        );
        for (purpose, product, subject) in [
            (ProofPurpose::Renew, "acme", "m-1"),
            (ProofPurpose::Bind, "acme", "m-1"),
            (ProofPurpose::Enroll, "other", "m-1"),
            (ProofPurpose::Enroll, "acme", "m-2"),
            // Moving bytes between fields changes the lengths, so it fails too.
            (ProofPurpose::Enroll, "acmem", "-1"),
        ] {
            assert!(matches!(
                verify_proof(&p, purpose, product, subject, 1000),
                Err(ProofError::BadSignature(_))
            ));
        }
        // Another key named in the proof, with the first key's signature.
        let mut swapped = p.clone();
        swapped.public_key = key(2)
            .prove(ProofPurpose::Enroll, "acme", "m-1", [0; 16], 1000)
            .public_key;
        assert!(matches!(
            verify_proof(&swapped, ProofPurpose::Enroll, "acme", "m-1", 1000),
            Err(ProofError::BadSignature(_))
        ));
        // Another timestamp or nonce than the ones signed.
        let mut later = p.clone();
        later.timestamp += 1;
        assert!(verify_proof(&later, ProofPurpose::Enroll, "acme", "m-1", 1000).is_err());
        let mut other = p.clone();
        other.nonce = B64.encode([1u8; 16]);
        assert!(verify_proof(&other, ProofPurpose::Enroll, "acme", "m-1", 1000).is_err());
        // Two proofs with different nonces are different bytes.
        assert_ne!(
            k.prove(ProofPurpose::Enroll, "acme", "m-1", [1; 16], 1000)
                .signature,
            p.signature
        );
    }

    #[test]
    fn stale_and_malformed_proofs_are_refused() {
        let k = key(3);
        let p = k.prove(ProofPurpose::Renew, "acme", "d", [0; 16], 1000);
        assert!(verify_proof(&p, ProofPurpose::Renew, "acme", "d", 1000 + PROOF_WINDOW_S).is_ok());
        assert!(matches!(
            verify_proof(&p, ProofPurpose::Renew, "acme", "d", 1001 + PROOF_WINDOW_S),
            Err(ProofError::Stale { off: 301, .. })
        ));
        assert!(matches!(
            verify_proof(&p, ProofPurpose::Renew, "acme", "d", 999 - PROOF_WINDOW_S),
            Err(ProofError::Stale { .. })
        ));
        let mut short = p.clone();
        short.signature = B64.encode([0u8; 63]);
        assert!(matches!(
            verify_proof(&short, ProofPurpose::Renew, "acme", "d", 1000),
            Err(ProofError::Malformed(_))
        ));
        // The identity point signs everything "validly" under a lax check.
        let mut weak = p.clone();
        let mut identity = [0u8; 32];
        identity[0] = 1;
        weak.public_key = B64.encode(identity);
        assert!(matches!(
            verify_proof(&weak, ProofPurpose::Renew, "acme", "d", 1000),
            Err(ProofError::Malformed(_))
        ));
        let mut extreme = p;
        extreme.timestamp = i64::MIN;
        assert!(matches!(
            verify_proof(&extreme, ProofPurpose::Renew, "acme", "d", 1000),
            Err(ProofError::Stale { .. })
        ));
    }

    #[test]
    fn the_key_survives_its_pem_form() {
        let k = key(4);
        let back = DeviceKey::from_pem(&k.to_pem()).unwrap();
        assert_eq!(back.public_key(), k.public_key());
        assert_eq!(back.key_id().len(), 16);
        assert!(
            DeviceKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
    }

    /// The message layout is fixed: other implementations (the dashboard's
    /// simulated devices, the fleet benchmark) build the same bytes.
    #[test]
    fn message_layout() {
        let m = proof_message(ProofPurpose::Bind, "p", "d", &[9; 32], &[7; 16], 0x0102);
        let mut want = b"sluice-device-proof-v1\0".to_vec();
        want.extend_from_slice(b"\0\0\0\x04bind\0\0\0\x01p\0\0\0\x01d\0\0\0\x20");
        want.extend_from_slice(&[9; 32]);
        want.extend_from_slice(&[0, 0, 0, 0x10]);
        want.extend_from_slice(&[7; 16]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(m, want);
    }
}
