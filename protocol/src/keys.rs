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
    /// Key lists (Ed25519): never listed in `GET /v1/keys`, only in key lists.
    Root,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRole::Image => "image",
            KeyRole::Response => "response",
            KeyRole::Root => "root",
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

    /// Checks a `Sluice-Signature` header value against the exact body bytes:
    /// a signature over the body itself, or over the root of a batch the
    /// body is a leaf of (`batch=<index>/<size>; path=<base64 hashes>`).
    pub fn verify_response(&self, header: &str, body: &[u8]) -> Result<(), Error> {
        let h = parse_signature_header(header)?;
        let key = self.find(&h.key_id, KeyRole::Response)?;
        let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(&key.public_key_pem)
            .map_err(|e| Error::BadKey(e.to_string()))?;
        let sig = ed25519_dalek::Signature::from_slice(&h.sig)
            .map_err(|e| Error::MalformedSignature(e.to_string()))?;
        let ok = match &h.batch {
            None => vk.verify(body, &sig).is_ok(),
            Some(b) => match root_from_path(b.index, b.size, leaf_hash(body), &b.path) {
                Some(root) => vk.verify(&batch_message(b.size, &root), &sig).is_ok(),
                None => false,
            },
        };
        if ok {
            Ok(())
        } else {
            Err(Error::BadSignature(h.key_id))
        }
    }
}

/// What a `Sluice-Signature` header says.
struct SignatureHeader {
    key_id: String,
    sig: Vec<u8>,
    batch: Option<BatchProof>,
}

/// Where a body sits in a signed batch.
struct BatchProof {
    index: u64,
    size: u64,
    path: Vec<[u8; 32]>,
}

/// Longest inclusion path accepted: a batch of 2^32 answers.
const MAX_PATH: usize = 32;

fn parse_signature_header(header: &str) -> Result<SignatureHeader, Error> {
    let bad = |why: &str| Error::MalformedSignature(why.to_string());
    let mut key_id = None;
    let mut sig = None;
    let mut batch = None;
    let mut path = None;
    for part in header.split(';') {
        match part.trim().split_once('=') {
            Some(("keyid", v)) => key_id = Some(v.to_string()),
            Some(("sig", v)) => {
                sig = Some(
                    B64.decode(v)
                        .map_err(|e| Error::MalformedSignature(e.to_string()))?,
                )
            }
            Some(("batch", v)) => {
                let (i, n) = v
                    .split_once('/')
                    .and_then(|(i, n)| Some((i.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
                    .ok_or_else(|| bad("batch must be `<index>/<size>`"))?;
                batch = Some((i, n));
            }
            Some(("path", v)) => {
                let raw = B64
                    .decode(v)
                    .map_err(|e| Error::MalformedSignature(e.to_string()))?;
                if raw.len() % 32 != 0 || raw.len() / 32 > MAX_PATH {
                    return Err(bad("path must be at most 32 SHA-256 hashes"));
                }
                path = Some(
                    raw.chunks_exact(32)
                        .map(|c| c.try_into().expect("32-byte chunk"))
                        .collect::<Vec<[u8; 32]>>(),
                );
            }
            _ => {}
        }
    }
    let batch = match (batch, path) {
        (None, None) => None,
        (Some((index, size)), Some(path)) => Some(BatchProof { index, size, path }),
        _ => return Err(bad("`batch` and `path` go together")),
    };
    match (key_id, sig) {
        (Some(key_id), Some(sig)) => Ok(SignatureHeader { key_id, sig, batch }),
        _ => Err(bad("expected `keyid=<id>; sig=<base64>`")),
    }
}

/// What a batch signature signs: this prefix, the batch size (8 bytes, big
/// endian) and the Merkle root of the batch's bodies. A JSON body never
/// starts with the prefix, so neither kind of signature passes for the other.
const BATCH_DOMAIN: &[u8] = b"sluice-resolve-batch-v1\0";

fn batch_message(size: u64, root: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BATCH_DOMAIN.len() + 8 + 32);
    m.extend_from_slice(BATCH_DOMAIN);
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(root);
    m
}

/// The leaf of a body in a batch: SHA-256(0x00 || body), as in RFC 9162.
pub fn leaf_hash(body: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update([0u8]);
    h.update(body);
    h.finalize().into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two below `n` (n >= 2).
fn split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// RFC 9162's Merkle tree hash of a non-empty list of leaves; appends to
/// `paths[i]` the inclusion path of leaf `i` within this subtree, from the
/// leaf up. Every node is hashed once.
fn subtree(leaves: &[[u8; 32]], paths: &mut [Vec<[u8; 32]>]) -> [u8; 32] {
    let n = leaves.len();
    if n == 1 {
        return leaves[0];
    }
    let k = split(n);
    let (lp, rp) = paths.split_at_mut(k);
    let left = subtree(&leaves[..k], lp);
    let right = subtree(&leaves[k..], rp);
    for p in lp {
        p.push(right);
    }
    for p in rp {
        p.push(left);
    }
    node_hash(&left, &right)
}

/// The root a leaf and its inclusion path lead to (RFC 9162, 2.1.3.2), or
/// None when the path does not fit a tree of `size` leaves.
fn root_from_path(index: u64, size: u64, leaf: [u8; 32], path: &[[u8; 32]]) -> Option<[u8; 32]> {
    if index >= size {
        return None;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = leaf;
    for p in path {
        if snode == 0 {
            return None;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    (snode == 0).then_some(r)
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

    /// Header values for a batch of bodies, given by their [`leaf_hash`]es,
    /// in order, with one signature: over the batch's size and the Merkle
    /// root of its leaves (RFC 9162, SHA-256); each header carries its
    /// body's place and inclusion path. A server answering many devices at
    /// once pays one signature per batch instead of one per answer.
    pub fn sign_batch(&self, leaves: &[[u8; 32]]) -> Vec<String> {
        if leaves.is_empty() {
            return Vec::new();
        }
        use std::fmt::Write;
        let size = leaves.len() as u64;
        let mut paths = vec![Vec::new(); leaves.len()];
        let root = subtree(leaves, &mut paths);
        // What every header of the batch starts with, written once.
        let head = format!(
            "keyid={}; sig={}; batch=",
            self.key_id,
            B64.encode(self.sign(&batch_message(size, &root)))
        );
        let mut hashes = Vec::new();
        paths
            .iter()
            .enumerate()
            .map(|(i, path)| {
                hashes.clear();
                hashes.extend(path.iter().flatten());
                let mut h = String::with_capacity(head.len() + 32 + hashes.len().div_ceil(3) * 4);
                h.push_str(&head);
                write!(h, "{i}/{size}; path=").expect("writing to a String");
                B64.encode_string(&hashes, &mut h);
                h
            })
            .collect()
    }

    /// An Ed25519 signature over any message (a key list's DSSE encoding:
    /// its `DSSEv1 ` prefix keeps it from passing for an answer).
    pub fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        self.sign(message)
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
    fn batch_signatures_bind_each_body_to_its_place() {
        let s = signer(1);
        let keys = KeySet {
            keys: vec![s.public_key()],
        };
        for n in 1..=19usize {
            let bodies: Vec<Vec<u8>> = (0..n)
                .map(|i| format!(r#"{{"update":true,"nonce":"n{i}"}}"#).into_bytes())
                .collect();
            let leaves: Vec<[u8; 32]> = bodies.iter().map(|b| leaf_hash(b)).collect();
            let headers = s.sign_batch(&leaves);
            assert_eq!(headers.len(), n);
            for (i, (h, body)) in headers.iter().zip(&bodies).enumerate() {
                keys.verify_response(h, body)
                    .unwrap_or_else(|e| panic!("{i}/{n}: {e}"));
                // Another body of the batch, or this one changed, is refused.
                let other = &bodies[(i + 1) % n];
                if n > 1 {
                    assert!(keys.verify_response(h, other).is_err(), "{i}/{n}");
                }
                assert!(keys.verify_response(h, b"{}").is_err());
                // Another place or size does not fit the path.
                let moved = h.replace(
                    &format!("batch={i}/{n}"),
                    &format!("batch={}/{n}", (i + 1) % n),
                );
                if n > 1 {
                    assert!(keys.verify_response(&moved, body).is_err(), "{moved}");
                }
                let grown = h.replace(&format!("/{n};"), &format!("/{};", n + 1));
                assert!(keys.verify_response(&grown, body).is_err(), "{grown}");
                // Without its proof, the batch signature is no signature of the body.
                let bare = h.split("; batch=").next().unwrap();
                assert!(keys.verify_response(bare, body).is_err());
            }
        }
    }

    #[test]
    fn a_batch_header_must_be_whole() {
        let keys = KeySet {
            keys: vec![signer(1).public_key()],
        };
        let h = signer(1).sign_batch(&[leaf_hash(b"x"), leaf_hash(b"y")])[0].clone();
        for bad in [
            h.replace("; path=", "; nopath="),
            h.replace("batch=0/2", "batch=zero"),
            format!("{h}AAAA"),
            h.replace("batch=0/2", "batch=2/2"),
        ] {
            assert!(keys.verify_response(&bad, b"x").is_err(), "{bad}");
        }
        keys.verify_response(&h, b"x").unwrap();
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
