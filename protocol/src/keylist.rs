//! Signed key lists, chained as TUF chains its root metadata: each list
//! names every trusted image, response and root key with its state, and
//! each new list is signed by the root keys of the one before it, so a
//! device that holds any list can verify every later one, and a key left
//! out of a list (revoked) stops being trusted.
//!
//! The envelope is DSSE (`payloadType`, base64 `payload`, `signatures`), the
//! signatures over DSSE's pre-authentication encoding of the exact payload
//! bytes: no JSON canonicalisation, and no list signature can pass for a
//! resolution answer or an image signature (their messages are JSON or
//! start with `sluice-resolve-batch-v1`; this one starts with `DSSEv1 `).

use crate::keys::{ALG_ECDSA_P256, ALG_ED25519};
use crate::{KeyRole, KeySet, PublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use time::OffsetDateTime;

/// The DSSE payload type of a key list.
pub const PAYLOAD_TYPE: &str = "application/vnd.sluice.key-list.v1+json";

/// Most bytes of one signed list the agent accepts.
pub const MAX_LIST_BYTES: usize = 256 << 10;

/// Where a key stands in its rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Published so devices learn it; nothing is signed with it yet.
    Next,
    /// The key the server signs with.
    Current,
    /// No longer signs; still trusted for what it signed (old releases).
    Retired,
}

impl KeyState {
    /// The name on the wire and in the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Current => "current",
            KeyState::Retired => "retired",
        }
    }
}

/// One key of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListedKey {
    /// First 16 hex digits of the SHA-256 of the key's DER SubjectPublicKeyInfo.
    pub key_id: String,
    /// What the key signs.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub role: KeyRole,
    /// `ecdsa-p256-sha256` or `ed25519`.
    pub algorithm: String,
    /// The SubjectPublicKeyInfo in PEM.
    pub public_key_pem: String,
    /// Where the key stands.
    pub state: KeyState,
}

impl ListedKey {
    /// The key as `GET /v1/keys` lists it.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id.clone(),
            role: self.role,
            algorithm: self.algorithm.clone(),
            public_key_pem: self.public_key_pem.clone(),
        }
    }
}

/// What a key list says (the signed payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyList {
    /// Grows by one with every list.
    pub version: u64,
    /// When the server made it.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// After this a device does not rely on it as its newest list.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// How many of this list's root keys must sign the next list (and this one).
    pub threshold: u32,
    /// Every trusted key; a key not listed is not trusted.
    pub keys: Vec<ListedKey>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnvelopeSignature {
    /// The signing key's id.
    pub keyid: String,
    /// Base64 of the signature (Ed25519, or ECDSA P-256 ASN.1 DER) over the PAE.
    pub sig: String,
}

/// A signed key list as the server serves it and the agent keeps it: a DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignedKeyList {
    /// Always [`PAYLOAD_TYPE`].
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 of the exact payload bytes (a [`KeyList`] in JSON).
    pub payload: String,
    /// Signatures over the PAE of the payload.
    pub signatures: Vec<EnvelopeSignature>,
}

/// The answer of `GET /v1/keys/lists?after=N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyLists {
    /// The lists after N, oldest first, at most a page; ask again after the
    /// last one while it is older than `newest`.
    pub lists: Vec<SignedKeyList>,
    /// The newest version there is.
    pub newest: u64,
}

/// Why a key list was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ListError {
    /// The envelope or payload could not be read.
    #[error("key list is malformed: {0}")]
    Malformed(String),
    /// Not enough valid signatures by the keys that must sign it.
    #[error("key list version {version} lacks {need} valid signature(s) by {by} (has {have})")]
    Unsigned {
        /// The list's version.
        version: u64,
        /// Whose signatures were counted.
        by: String,
        /// How many were needed.
        need: u32,
        /// How many verified.
        have: u32,
    },
    /// The version does not follow the one held.
    #[error("key list version {got} does not follow version {held}")]
    OutOfOrder {
        /// The version held.
        held: u64,
        /// The version offered.
        got: u64,
    },
    /// The list breaks a rule of lists.
    #[error("key list version {version} is invalid: {why}")]
    Invalid {
        /// The list's version.
        version: u64,
        /// What is wrong.
        why: String,
    },
}

/// DSSE's pre-authentication encoding: what every signature signs.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    m.extend_from_slice(
        format!(
            "DSSEv1 {} {payload_type} {} ",
            payload_type.len(),
            payload.len()
        )
        .as_bytes(),
    );
    m.extend_from_slice(payload);
    m
}

impl KeyList {
    /// The root keys whose signatures count for this list and the next:
    /// the `current` ones (a retired root no longer signs lists).
    pub fn roots(&self) -> impl Iterator<Item = &ListedKey> {
        self.keys
            .iter()
            .filter(|k| k.role == KeyRole::Root && k.state == KeyState::Current)
    }

    /// The image and response keys a device trusts under this list: every
    /// listed one, whatever its state.
    pub fn key_set(&self) -> KeySet {
        KeySet {
            keys: self
                .keys
                .iter()
                .filter(|k| k.role != KeyRole::Root)
                .map(ListedKey::public)
                .collect(),
        }
    }

    /// The current key of `role`.
    pub fn current(&self, role: KeyRole) -> Option<&ListedKey> {
        self.keys
            .iter()
            .find(|k| k.role == role && k.state == KeyState::Current)
    }

    /// A listed key by id.
    pub fn find(&self, key_id: &str) -> Option<&ListedKey> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }

    /// The rules every list keeps: one current image and response key, ids
    /// unique, a threshold its current roots can meet, known algorithms.
    pub fn check_rules(&self) -> Result<(), ListError> {
        let bad = |why: String| ListError::Invalid {
            version: self.version,
            why,
        };
        let mut ids = BTreeSet::new();
        for k in &self.keys {
            if !ids.insert(k.key_id.as_str()) {
                return Err(bad(format!("key {} is listed twice", k.key_id)));
            }
            let want = match k.role {
                KeyRole::Image => ALG_ECDSA_P256,
                KeyRole::Response | KeyRole::Root => ALG_ED25519,
            };
            if k.algorithm != want {
                return Err(bad(format!(
                    "{} key {} has algorithm {}, not {want}",
                    k.role, k.key_id, k.algorithm
                )));
            }
        }
        // One key signs each answer and release; lists may need several roots.
        for role in [KeyRole::Image, KeyRole::Response] {
            let n = self
                .keys
                .iter()
                .filter(|k| k.role == role && k.state == KeyState::Current)
                .count();
            if n != 1 {
                return Err(bad(format!("{n} current {role} keys, not 1")));
            }
        }
        let roots = self.roots().count() as u32;
        if self.threshold == 0 || self.threshold > roots {
            return Err(bad(format!(
                "threshold {} with {roots} current root key(s)",
                self.threshold
            )));
        }
        Ok(())
    }
}

/// How many distinct keys among `keys` made a valid signature over `message`.
fn count_signers<'a>(
    sigs: &[EnvelopeSignature],
    message: &[u8],
    keys: impl Iterator<Item = &'a PublicKey>,
) -> u32 {
    let keys: Vec<&PublicKey> = keys.collect();
    let mut signed = BTreeSet::new();
    for s in sigs {
        let Some(k) = keys.iter().find(|k| k.key_id == s.keyid) else {
            continue;
        };
        let Ok(raw) = B64.decode(&s.sig) else {
            continue;
        };
        if verify_raw(k, message, &raw) {
            signed.insert(k.key_id.as_str());
        }
    }
    signed.len() as u32
}

/// Checks a raw signature by an Ed25519 or ECDSA P-256 key.
fn verify_raw(key: &PublicKey, message: &[u8], sig: &[u8]) -> bool {
    match key.algorithm.as_str() {
        ALG_ED25519 => {
            use ed25519_dalek::Verifier;
            use ed25519_dalek::pkcs8::DecodePublicKey;
            let (Ok(vk), Ok(sig)) = (
                ed25519_dalek::VerifyingKey::from_public_key_pem(&key.public_key_pem),
                ed25519_dalek::Signature::from_slice(sig),
            ) else {
                return false;
            };
            vk.verify(message, &sig).is_ok()
        }
        ALG_ECDSA_P256 => {
            use p256::ecdsa::signature::Verifier;
            use p256::pkcs8::DecodePublicKey;
            let (Ok(vk), Ok(sig)) = (
                p256::ecdsa::VerifyingKey::from_public_key_pem(&key.public_key_pem),
                p256::ecdsa::Signature::from_der(sig),
            ) else {
                return false;
            };
            vk.verify(message, &sig).is_ok()
        }
        _ => false,
    }
}

impl SignedKeyList {
    /// An envelope around `payload` with the given signatures (see [`pae`]).
    pub fn new(payload: &[u8], signatures: Vec<EnvelopeSignature>) -> Self {
        SignedKeyList {
            payload_type: PAYLOAD_TYPE.into(),
            payload: B64.encode(payload),
            signatures,
        }
    }

    /// The payload bytes and what they say, unverified.
    pub fn open(&self) -> Result<(Vec<u8>, KeyList), ListError> {
        if self.payload_type != PAYLOAD_TYPE {
            return Err(ListError::Malformed(format!(
                "payload type {:?}, not {PAYLOAD_TYPE}",
                self.payload_type
            )));
        }
        let bytes = B64
            .decode(&self.payload)
            .map_err(|e| ListError::Malformed(format!("payload: {e}")))?;
        if bytes.len() > MAX_LIST_BYTES {
            return Err(ListError::Malformed("payload too large".into()));
        }
        let list: KeyList = serde_json::from_slice(&bytes)
            .map_err(|e| ListError::Malformed(format!("payload: {e}")))?;
        Ok((bytes, list))
    }

    /// The message every signature signs.
    fn message(&self, payload: &[u8]) -> Vec<u8> {
        pae(&self.payload_type, payload)
    }

    fn require(
        &self,
        list: &KeyList,
        message: &[u8],
        by: &str,
        need: u32,
        keys: impl Iterator<Item = PublicKey>,
    ) -> Result<(), ListError> {
        let keys: Vec<PublicKey> = keys.collect();
        let have = count_signers(&self.signatures, message, keys.iter());
        if have < need {
            return Err(ListError::Unsigned {
                version: list.version,
                by: by.into(),
                need,
                have,
            });
        }
        Ok(())
    }

    /// The list, if it keeps the rules and a threshold of its own root keys
    /// signed it. Says nothing about whether those roots are trusted.
    pub fn verify_self(&self) -> Result<KeyList, ListError> {
        let (payload, list) = self.open()?;
        list.check_rules()?;
        let m = self.message(&payload);
        self.require(
            &list,
            &m,
            "its own root keys",
            list.threshold,
            list.roots().map(ListedKey::public),
        )?;
        Ok(list)
    }

    /// The list that follows `held`: the next version, signed by a threshold
    /// of `held`'s root keys and of its own (so a new root proves it holds
    /// its key, as in TUF).
    pub fn verify_next(&self, held: &KeyList) -> Result<KeyList, ListError> {
        let (payload, list) = self.open()?;
        if list.version != held.version + 1 {
            return Err(ListError::OutOfOrder {
                held: held.version,
                got: list.version,
            });
        }
        let list = self.verify_self()?;
        self.require(
            &list,
            &self.message(&payload),
            &format!("the root keys of version {}", held.version),
            held.threshold,
            held.roots().map(ListedKey::public),
        )?;
        Ok(list)
    }

    /// A first list for a device that holds only a `GET /v1/keys` file: it
    /// must also be signed by a response key and an image key of that file,
    /// so forging one takes both keys, as forging an update does.
    pub fn verify_bootstrap(&self, anchor: &KeySet) -> Result<KeyList, ListError> {
        let list = self.verify_self()?;
        let (payload, _) = self.open()?;
        let m = self.message(&payload);
        for role in [KeyRole::Response, KeyRole::Image] {
            self.require(
                &list,
                &m,
                &format!("a trusted {role} key"),
                1,
                anchor.keys.iter().filter(|k| k.role == role).cloned(),
            )?;
        }
        Ok(list)
    }
}

/// Keys a test server holds, by number (Ed25519 seeds, P-256 scalars), and
/// lists they sign: for the tests here and the agent's (feature `testing`,
/// a dev-dependency's: no shipped build has it).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;
    use crate::ResponseSigner;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;

    /// The Ed25519 key of seed `n`.
    pub fn ed(n: u8) -> ResponseSigner {
        ResponseSigner::from_seed(&[n; 32])
    }

    /// [`ed`]`(n)` listed as `role` in `state`.
    pub fn ed_key(n: u8, role: KeyRole, state: KeyState) -> ListedKey {
        let p = ed(n).public_key();
        ListedKey {
            key_id: p.key_id,
            role,
            algorithm: p.algorithm,
            public_key_pem: p.public_key_pem,
            state,
        }
    }

    /// The P-256 key of scalar `n`.
    pub fn ec(n: u8) -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[n; 32]).unwrap()
    }

    /// [`ec`]`(n)` listed as an image key in `state`.
    pub fn ec_key(n: u8, state: KeyState) -> ListedKey {
        let vk = *ec(n).verifying_key();
        ListedKey {
            key_id: crate::key_id(vk.to_public_key_der().unwrap().as_bytes()),
            role: KeyRole::Image,
            algorithm: ALG_ECDSA_P256.into(),
            public_key_pem: vk.to_public_key_pem(Default::default()).unwrap(),
            state,
        }
    }

    /// `l` signed by the Ed25519 keys `eds` and the P-256 keys `ecs`.
    pub fn sign(l: &KeyList, eds: &[u8], ecs: &[u8]) -> SignedKeyList {
        let payload = serde_json::to_vec(l).unwrap();
        let m = pae(PAYLOAD_TYPE, &payload);
        let mut sigs = Vec::new();
        for &n in eds {
            sigs.push(EnvelopeSignature {
                keyid: ed(n).key_id().into(),
                sig: B64.encode(ed(n).sign_message(&m)),
            });
        }
        for &n in ecs {
            let s: p256::ecdsa::Signature = ec(n).sign(&m);
            sigs.push(EnvelopeSignature {
                keyid: ec_key(n, KeyState::Current).key_id,
                sig: B64.encode(s.to_der().as_bytes()),
            });
        }
        SignedKeyList::new(&payload, sigs)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn list(version: u64, keys: Vec<ListedKey>) -> KeyList {
        KeyList {
            version,
            issued_at: time::macros::datetime!(2026-01-01 00:00 UTC),
            expires_at: time::macros::datetime!(2027-01-01 00:00 UTC),
            threshold: 1,
            keys,
        }
    }

    /// Root 1, response 2, image 3.
    fn first() -> KeyList {
        list(
            1,
            vec![
                ed_key(1, KeyRole::Root, KeyState::Current),
                ed_key(2, KeyRole::Response, KeyState::Current),
                ec_key(3, KeyState::Current),
            ],
        )
    }

    #[test]
    fn pae_is_dsse() {
        // The example of the DSSE specification.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn a_chain_verifies_and_follows_root_rotation() {
        let l1 = first();
        let s1 = sign(&l1, &[1, 2], &[3]);
        assert_eq!(s1.verify_self().unwrap(), l1);
        let anchor = l1.key_set();
        assert_eq!(s1.verify_bootstrap(&anchor).unwrap(), l1);

        // Root 4 replaces root 1: signed by both.
        let mut l2 = l1.clone();
        l2.version = 2;
        l2.keys[0] = ed_key(4, KeyRole::Root, KeyState::Current);
        let s2 = sign(&l2, &[1, 4], &[]);
        assert_eq!(s2.verify_next(&l1).unwrap(), l2);
        // Without the old root, or without the new one: refused.
        assert!(matches!(
            sign(&l2, &[4], &[]).verify_next(&l1),
            Err(ListError::Unsigned { .. })
        ));
        assert!(matches!(
            sign(&l2, &[1], &[]).verify_next(&l1),
            Err(ListError::Unsigned { .. })
        ));
        // Version 3 must be signed by root 4; root 1 no longer counts.
        let mut l3 = l2.clone();
        l3.version = 3;
        assert!(sign(&l3, &[1], &[]).verify_next(&l2).is_err());
        assert_eq!(sign(&l3, &[4], &[]).verify_next(&l2).unwrap(), l3);
    }

    #[test]
    fn versions_follow_one_by_one() {
        let l1 = first();
        for v in [1, 3, 0] {
            let mut l = l1.clone();
            l.version = v;
            assert!(matches!(
                sign(&l, &[1], &[]).verify_next(&l1),
                Err(ListError::OutOfOrder { .. })
            ));
        }
    }

    #[test]
    fn a_response_key_cannot_sign_lists() {
        // A stolen response key (2) makes a list with an attacker's root 9.
        let l1 = first();
        let mut forged = l1.clone();
        forged.version = 2;
        forged.keys[0] = ed_key(9, KeyRole::Root, KeyState::Current);
        let s = sign(&forged, &[2, 9], &[]);
        assert!(matches!(
            s.verify_next(&l1),
            Err(ListError::Unsigned { .. })
        ));
        // Nor bootstrap a device without the image key as well.
        assert!(s.verify_bootstrap(&l1.key_set()).is_err());
        assert!(
            sign(&forged, &[2, 9], &[3])
                .verify_bootstrap(&l1.key_set())
                .is_ok(),
            "with both keys of the device's file, bootstrapping is as strong as those keys"
        );
    }

    #[test]
    fn tampered_or_malformed_lists_are_refused() {
        let l1 = first();
        let s1 = sign(&l1, &[1, 2], &[3]);
        let mut changed = l1.clone();
        changed.keys[1].state = KeyState::Retired;
        changed
            .keys
            .push(ed_key(5, KeyRole::Response, KeyState::Current));
        let mut t = s1.clone();
        t.payload = B64.encode(serde_json::to_vec(&changed).unwrap());
        assert!(t.verify_self().is_err());
        let mut t = s1.clone();
        t.payload_type = "application/json".into();
        assert!(matches!(t.verify_self(), Err(ListError::Malformed(_))));
        let mut t = s1.clone();
        t.payload = "***".into();
        assert!(matches!(t.verify_self(), Err(ListError::Malformed(_))));
        // The same signature twice counts once.
        let mut l = l1.clone();
        l.keys.push(ed_key(6, KeyRole::Root, KeyState::Current));
        l.threshold = 2;
        let mut s = sign(&l, &[1], &[]);
        s.signatures.push(s.signatures[0].clone());
        assert!(matches!(
            s.verify_self(),
            Err(ListError::Unsigned { have: 1, .. })
        ));
        assert!(sign(&l, &[1, 6], &[]).verify_self().is_ok());
    }

    #[test]
    fn rules_of_a_list() {
        let ok = first();
        ok.check_rules().unwrap();
        let mut two = ok.clone();
        two.keys
            .push(ed_key(5, KeyRole::Response, KeyState::Current));
        assert!(two.check_rules().is_err(), "two current response keys");
        let mut none = ok.clone();
        none.keys[2].state = KeyState::Next;
        assert!(none.check_rules().is_err(), "no current image key");
        let mut dup = ok.clone();
        dup.keys.push(dup.keys[1].clone());
        dup.keys[3].state = KeyState::Retired;
        assert!(dup.check_rules().is_err(), "a key listed twice");
        let mut alg = ok.clone();
        alg.keys[2].algorithm = ALG_ED25519.into();
        assert!(alg.check_rules().is_err());
        let mut t = ok.clone();
        t.threshold = 2;
        assert!(t.check_rules().is_err(), "threshold above the roots");
        t.threshold = 0;
        assert!(t.check_rules().is_err());
    }

    #[test]
    fn a_list_signature_is_no_answer_signature() {
        // The response key's signature over a list's PAE never verifies as
        // an answer over the list's payload (or anything else).
        let l1 = first();
        let s1 = sign(&l1, &[1, 2], &[3]);
        let (payload, _) = s1.open().unwrap();
        let sig = s1
            .signatures
            .iter()
            .find(|s| s.keyid == ed(2).key_id())
            .unwrap();
        let header = format!("keyid={}; sig={}", sig.keyid, sig.sig);
        assert!(l1.key_set().verify_response(&header, &payload).is_err());
    }

    #[test]
    fn the_key_set_holds_every_listed_image_and_response_key() {
        let mut l = first();
        l.keys.push(ed_key(5, KeyRole::Response, KeyState::Next));
        l.keys.push(ec_key(6, KeyState::Retired));
        let ks = l.key_set();
        assert_eq!(ks.keys.len(), 4);
        assert!(ks.keys.iter().all(|k| k.role != KeyRole::Root));
        assert_eq!(l.current(KeyRole::Response).unwrap().key_id, ed(2).key_id());
    }
}
