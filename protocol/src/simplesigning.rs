//! The cosign "simple signing" payload and its check: the signature is ECDSA
//! P-256 (ASN.1 DER, base64) over the exact payload bytes, and the payload binds
//! the manifest digest to `sluice.product` and `sluice.version`.

use crate::{Error, ImageSignature, KeyRole, KeySet};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `critical.type` of every cosign signature payload.
pub const COSIGN_TYPE: &str = "cosign container image signature";
/// The `optional` key naming the product.
pub const OPT_PRODUCT: &str = "sluice.product";
/// The `optional` key naming the version.
pub const OPT_VERSION: &str = "sluice.version";

/// A simple-signing payload as cosign writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimpleSigning {
    /// What the signature is about.
    pub critical: Critical,
    /// Annotations: Sluice puts product and version here.
    #[serde(default)]
    pub optional: Option<BTreeMap<String, serde_json::Value>>,
}

/// The `critical` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Critical {
    /// The repository the image was signed for.
    pub identity: Identity,
    /// The signed digest.
    pub image: Image,
    /// Always [`COSIGN_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
}

/// `critical.identity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    /// The repository (and tag, if signed by tag).
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

/// `critical.image`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    /// The signed manifest digest.
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

impl SimpleSigning {
    fn optional_str(&self, key: &str) -> Option<&str> {
        self.optional.as_ref()?.get(key)?.as_str()
    }
}

/// Checks an image signature: a trusted image key signed this payload, and the
/// payload names exactly this digest, product and version.
pub fn verify_image_signature(
    keys: &KeySet,
    sig: &ImageSignature,
    digest: &str,
    product: &str,
    version: &str,
) -> Result<SimpleSigning, Error> {
    let key = keys.find(&sig.key_id, KeyRole::Image)?;
    let vk = p256::ecdsa::VerifyingKey::from_public_key_pem(&key.public_key_pem)
        .map_err(|e| Error::BadKey(e.to_string()))?;
    let payload = B64
        .decode(&sig.payload)
        .map_err(|e| Error::MalformedSignature(format!("payload: {e}")))?;
    let der = B64
        .decode(&sig.signature)
        .map_err(|e| Error::MalformedSignature(format!("signature: {e}")))?;
    let signature = p256::ecdsa::Signature::from_der(&der)
        .map_err(|e| Error::MalformedSignature(e.to_string()))?;
    vk.verify(&payload, &signature)
        .map_err(|_| Error::BadSignature(sig.key_id.clone()))?;

    let parsed: SimpleSigning = serde_json::from_slice(&payload)
        .map_err(|e| Error::MalformedSignature(format!("payload is not simple signing: {e}")))?;
    if parsed.critical.kind != COSIGN_TYPE {
        return Err(Error::Mismatch(format!(
            "payload type {:?}",
            parsed.critical.kind
        )));
    }
    if parsed.critical.image.docker_manifest_digest != digest {
        return Err(Error::Mismatch(format!(
            "signature is for {}, not {digest}",
            parsed.critical.image.docker_manifest_digest
        )));
    }
    if parsed.optional_str(OPT_PRODUCT) != Some(product) {
        return Err(Error::Mismatch(format!(
            "signature is not for product {product}"
        )));
    }
    if parsed.optional_str(OPT_VERSION) != Some(version) {
        return Err(Error::Mismatch(format!(
            "signature is for version {:?}, not {version}",
            parsed.optional_str(OPT_VERSION).unwrap_or("(none)")
        )));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PublicKey, key_id, keys::ALG_ECDSA_P256};
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    fn setup(seed: u8, digest: &str, version: &str) -> (KeySet, ImageSignature) {
        let sk = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
        let vk = sk.verifying_key();
        let der = vk.to_public_key_der().unwrap();
        let kid = key_id(der.as_bytes());
        let payload = serde_json::json!({
            "critical": {"identity": {"docker-reference": "reg/acme/os"},
                         "image": {"docker-manifest-digest": digest},
                         "type": COSIGN_TYPE},
            "optional": {OPT_PRODUCT: "acme-os", OPT_VERSION: version}
        })
        .to_string();
        let sig: p256::ecdsa::Signature = sk.sign(payload.as_bytes());
        let keys = KeySet {
            keys: vec![PublicKey {
                key_id: kid.clone(),
                role: KeyRole::Image,
                algorithm: ALG_ECDSA_P256.into(),
                public_key_pem: vk.to_public_key_pem(Default::default()).unwrap(),
            }],
        };
        let s = ImageSignature {
            payload: B64.encode(payload),
            signature: B64.encode(sig.to_der().as_bytes()),
            key_id: kid,
        };
        (keys, s)
    }

    #[test]
    fn a_good_signature_verifies() {
        let (keys, sig) = setup(7, DIGEST, "1.0.0");
        verify_image_signature(&keys, &sig, DIGEST, "acme-os", "1.0.0").unwrap();
    }

    #[test]
    fn another_digest_version_or_product_is_refused() {
        let (keys, sig) = setup(7, DIGEST, "1.0.0");
        let other = DIGEST.replace("01", "02");
        assert!(matches!(
            verify_image_signature(&keys, &sig, &other, "acme-os", "1.0.0"),
            Err(Error::Mismatch(_))
        ));
        assert!(matches!(
            verify_image_signature(&keys, &sig, DIGEST, "acme-os", "1.0.1"),
            Err(Error::Mismatch(_))
        ));
        assert!(matches!(
            verify_image_signature(&keys, &sig, DIGEST, "other", "1.0.0"),
            Err(Error::Mismatch(_))
        ));
    }

    #[test]
    fn another_key_is_refused() {
        let (keys, _) = setup(7, DIGEST, "1.0.0");
        let (_, mut foreign) = setup(8, DIGEST, "1.0.0");
        assert!(matches!(
            verify_image_signature(&keys, &foreign, DIGEST, "acme-os", "1.0.0"),
            Err(Error::UnknownKey { .. })
        ));
        // Even when it claims a trusted key id, the bytes do not verify.
        foreign.key_id = keys.keys[0].key_id.clone();
        assert!(matches!(
            verify_image_signature(&keys, &foreign, DIGEST, "acme-os", "1.0.0"),
            Err(Error::BadSignature(_))
        ));
    }
}
