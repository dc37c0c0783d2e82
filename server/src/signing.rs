//! Cosign signatures over image digests, made with the image key.
//! (Interface only; the implementation lands with the registry work.)

use crate::keys::KeyEntry;
use sluice_protocol::ImageSignature;

/// A signature over one digest.
#[derive(Debug, Clone)]
pub struct SignedDigest {
    /// The signed digest.
    pub digest: String,
    /// The signature as devices receive it.
    pub signature: ImageSignature,
}

/// Signs `digest` in the simple-signing format for `docker_reference`, with
/// `sluice.product` and `sluice.version` in the payload's `optional` section.
pub fn sign_digest(
    key: &KeyEntry,
    docker_reference: &str,
    digest: &str,
    product: &str,
    version: &str,
) -> anyhow::Result<ImageSignature> {
    anyhow::bail!(
        "signing {docker_reference}@{digest} ({product} {version}) with {} is not implemented yet",
        key.public.key_id
    )
}
