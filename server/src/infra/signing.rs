//! Cosign signatures over image digests, made with the image key: the
//! "simple signing" payload as cosign writes it, with `sluice.product` and
//! `sluice.version` in its `optional` section so a signature binds a version
//! to a digest.

use crate::infra::keystore::KeyEntry;
use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sigstore::cosign::SignatureLayer;
use sigstore::cosign::constraint::{AnnotationMarker, Constraint, PrivateKeySigner};
use sigstore::crypto::SigningScheme;
use sigstore::registry::OciReference;
use sluice_protocol::ImageSignature;
use sluice_protocol::simplesigning::{OPT_PRODUCT, OPT_VERSION};
use std::collections::HashMap;

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
///
/// `docker_reference` is the repository (`host[:port]/path`), as cosign writes
/// it when signing by digest; `host/path:tag` also works. The payload carries it
/// verbatim.
pub fn sign_digest(
    key: &KeyEntry,
    docker_reference: &str,
    digest: &str,
    product: &str,
    version: &str,
) -> anyhow::Result<ImageSignature> {
    anyhow::ensure!(
        sluice_protocol::is_sha256_digest(digest),
        "cannot sign {digest:?}: not a sha256 digest"
    );
    anyhow::ensure!(
        !docker_reference.contains('@'),
        "sign {docker_reference:?} by its repository, without a digest"
    );
    let image: OciReference = format!("{docker_reference}@{digest}")
        .parse()
        .with_context(|| format!("{docker_reference:?} is not an image repository"))?;
    let mut layer = SignatureLayer::new_unsigned(&image, digest)?;
    // sigstore prints a reference without a tag as `repo:latest` (or here
    // `repo@digest`); cosign writes the bare repository, and verifiers that
    // match identities (containers/image) expect exactly that.
    layer.simple_signing.critical.identity.docker_reference = docker_reference.to_string();

    let annotations = HashMap::from([
        (OPT_PRODUCT.to_string(), product.to_string()),
        (OPT_VERSION.to_string(), version.to_string()),
    ]);
    anyhow::ensure!(
        AnnotationMarker::new(annotations).add_constraint(&mut layer)?,
        "could not annotate the signature payload"
    );
    let signer = key
        .pair
        .to_sigstore_signer(&SigningScheme::ECDSA_P256_SHA256_ASN1)
        .context("the image key is not an ECDSA P-256 key")?;
    anyhow::ensure!(
        PrivateKeySigner::new_with_signer(signer).add_constraint(&mut layer)?,
        "the signature layer was already signed"
    );
    // `raw_data` is exactly what was signed and what the registry stores.
    let signature = layer.signature.context("sigstore produced no signature")?;
    Ok(ImageSignature {
        payload: B64.encode(&layer.raw_data),
        signature,
        key_id: key.public.key_id.clone(),
    })
}
