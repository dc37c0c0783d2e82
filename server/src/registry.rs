//! The OCI registry: resolving a reference to a digest (and each platform of
//! an index), and pushing cosign signatures next to the image.
//! (Interface only; the implementation lands with the registry work.)

use crate::config::Config;
use crate::error::{Error, Result};
use crate::signing::SignedDigest;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One platform manifest of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlatformImage {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v8`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The platform manifest's digest.
    pub digest: String,
    /// Total size of its layers in bytes.
    pub size: u64,
}

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// `host[:port]/path`.
    pub repository: String,
    /// The digest of what the reference named: a manifest or an index.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Each platform manifest (one for a plain manifest).
    pub platforms: Vec<PlatformImage>,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]/path`.
    pub repository: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// The digest, if any.
    pub digest: Option<String>,
}

/// Parses `host[:port]/path[:tag][@sha256:...]`.
pub fn parse_reference(reference: &str) -> Result<ImageRef> {
    let bad = || {
        Error::BadRequest(format!(
            "invalid image reference {reference:?}: use `host/path:tag` or `host/path@sha256:<hex>`"
        ))
    };
    let (rest, digest) = match reference.split_once('@') {
        Some((r, d)) if sluice_protocol::is_sha256_digest(d) => (r, Some(d.to_string())),
        Some(_) => return Err(bad()),
        None => (reference, None),
    };
    let slash = rest.find('/').ok_or_else(bad)?;
    let (repository, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(rest[slash + i + 1..].to_string())),
        None => (rest, None),
    };
    if !crate::products::valid_repository(repository)
        || tag
            .as_deref()
            .is_some_and(|t| t.is_empty() || t.len() > 128)
    {
        return Err(bad());
    }
    if tag.is_none() && digest.is_none() {
        return Err(Error::BadRequest(format!(
            "image reference {reference:?} has neither a tag nor a digest"
        )));
    }
    Ok(ImageRef {
        repository: repository.to_string(),
        tag,
        digest,
    })
}

/// A client for the registries products live in.
pub struct Registry {
    insecure: Vec<String>,
}

impl Registry {
    /// A client configured from the server's settings.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Registry {
            insecure: config.insecure_registries.clone(),
        })
    }

    /// Resolves a reference to a digest and its platforms.
    pub async fn resolve(&self, reference: &ImageRef) -> Result<ResolvedImage> {
        Err(Error::Unavailable(format!(
            "registry for {} not reachable yet ({:?})",
            reference.repository, self.insecure
        )))
    }

    /// Pushes signatures to `<repository>:sha256-<hex>.sig`, keeping existing ones.
    pub async fn push_signatures(&self, repository: &str, sigs: &[SignedDigest]) -> Result<()> {
        Err(Error::Unavailable(format!(
            "cannot push {} signatures to {repository} yet",
            sigs.len()
        )))
    }
}
