//! The OCI registry: resolving a reference to a digest (and each platform of
//! an index), and pushing cosign signatures next to the image under the
//! `sha256-<hex>.sig` tag. Every call is bounded in time, so a registry that is
//! down makes a request fail with 503 within seconds instead of hanging it.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::infra::signing::SignedDigest;
use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use serde::{Deserialize, Serialize};
use sluice_protocol::sha256_digest;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;
use utoipa::ToSchema;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (a multi-platform image).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of a cosign simple-signing layer.
pub const COSIGN_SIGNATURE_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature over the layer's bytes.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Layer annotation naming the Sluice key that made the signature, so pushing
/// the same claim again with the same key does not pile up layers.
pub const SLUICE_KEY_ANNOTATION: &str = "dev.sluice.key-id";

/// Longest wait for a TCP connection to the registry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest silence while reading an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one whole operation (a resolve, one signature push) may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
/// Image configs are a few KiB; anything far larger is not one.
const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// Accepted manifest media types, in order of preference.
const MANIFEST_TYPES: &[&str] = &[
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
];
/// The config blob of a `.sig` manifest, as cosign-rs writes it.
const SIG_CONFIG: &[u8] = b"{}";

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
    /// Its layers, lowest first (releases published before Sluice recorded
    /// them have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerImage>,
}

/// One layer of a platform manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LayerImage {
    /// Its blob digest.
    pub digest: String,
    /// Its compressed size in bytes.
    pub size: u64,
    /// Its media type (`application/vnd.oci.image.layer.v1.tar+zstd`, ...).
    pub media_type: String,
    /// Where its `zstd:chunked` table of contents is, as its annotations
    /// say (`io.containers.zstd-chunked.manifest-position` and
    /// `…-checksum`); only these annotations are kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl LayerImage {
    /// The table of contents' location when this is a `zstd:chunked` layer.
    pub fn table_of_contents(
        &self,
    ) -> Option<
        std::result::Result<
            sluice_protocol::chunked::TocLocation,
            sluice_protocol::chunked::TocError,
        >,
    > {
        sluice_protocol::chunked::toc_location(&self.annotations, self.size)
    }
}

impl PlatformImage {
    /// How well this platform fits a device that asks for `arch`, an OCI
    /// architecture with an optional variant (`arm64`, `arm/v7`): 2 the
    /// same (variant included, or neither names one), 1 compatible (one side
    /// names no variant), `None` another architecture or variant.
    pub fn fits(&self, arch: &str) -> Option<u8> {
        fits(&self.architecture, self.variant.as_deref(), arch)
    }
}

/// [`PlatformImage::fits`] on the parts.
pub fn fits(architecture: &str, variant: Option<&str>, arch: &str) -> Option<u8> {
    let (a, v) = match arch.split_once('/') {
        Some((a, v)) => (a, Some(v)),
        None => (arch, None),
    };
    if a != architecture {
        return None;
    }
    match (v, variant) {
        (None, None) => Some(2),
        (Some(want), Some(have)) if want == have => Some(2),
        (Some(_), Some(_)) => None,
        _ => Some(1),
    }
}

/// The platform that fits `arch` best (the first of equals).
pub fn best_fit<'a, T>(
    platforms: &'a [T],
    arch: &str,
    parts: impl Fn(&T) -> (&str, Option<&str>),
) -> Option<&'a T> {
    let mut best: Option<(&T, u8)> = None;
    for p in platforms {
        let (a, v) = parts(p);
        if let Some(score) = fits(a, v, arch)
            && best.is_none_or(|(_, b)| score > b)
        {
            best = Some((p, score));
        }
    }
    best.map(|(p, _)| p)
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
    if !crate::rules::names::valid_repository(repository)
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
    client: oci_client::Client,
    /// Plain HTTP client for `ping`, with the same timeouts.
    http: reqwest::Client,
    insecure: Vec<String>,
    /// Credentials by registry host (`host[:port]`).
    auths: HashMap<String, RegistryAuth>,
    /// Serializes read-modify-write of `.sig` manifests within this process,
    /// so two publishes signing one digest do not drop each other's layer.
    push_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// A client configured from the server's settings.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let insecure: Vec<String> = config
            .insecure_registries
            .iter()
            .filter(|h| !h.is_empty())
            .cloned()
            .collect();
        let auths = match &config.registry_auth {
            Some(path) => load_docker_auth(path)?,
            None => HashMap::new(),
        };
        let client_config = oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(insecure.clone()),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            // Sluice resolves every platform itself; never pick one silently.
            platform_resolver: None,
            ..Default::default()
        };
        let client =
            oci_client::Client::try_from(client_config).context("building the registry client")?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(OPERATION_TIMEOUT)
            .build()
            .context("building the registry HTTP client")?;
        Ok(Registry {
            client,
            http,
            insecure,
            auths,
            push_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Resolves a reference to a digest and its platforms.
    pub async fn resolve(&self, reference: &ImageRef) -> Result<ResolvedImage> {
        let (host, _) = split_repository(&reference.repository)?;
        let shown = show(reference);
        self.bounded(host, self.resolve_inner(reference, &shown))
            .await
    }

    /// Fetches and checks the table of contents of a `zstd:chunked` layer of
    /// `repository` (`host/path`) with a range request.
    pub async fn table_of_contents(
        &self,
        repository: &str,
        layer: &LayerImage,
    ) -> Result<sluice_protocol::chunked::Toc> {
        let (host, path) = split_repository(repository)?;
        let loc = layer
            .table_of_contents()
            .ok_or_else(|| {
                Error::Unprocessable(format!("layer {} is not zstd:chunked", layer.digest))
            })?
            .map_err(|e| Error::Unprocessable(format!("layer {}: {e}", layer.digest)))?;
        let what = format!(
            "the table of contents of layer {} in {repository}",
            layer.digest
        );
        self.bounded(host, async {
            let oci_ref = Reference::with_tag(host.into(), path.into(), "latest".into());
            let answer = self
                .client
                .pull_blob_stream_partial(
                    &oci_ref,
                    layer.digest.as_str(),
                    loc.offset,
                    Some(loc.length),
                )
                .await
                .map_err(|e| self.map_error(host, &what, e))?;
            let mut stream = match answer {
                oci_client::client::BlobResponse::Partial(s) => s,
                oci_client::client::BlobResponse::Full(_) => {
                    return Err(Error::BadGateway(format!(
                        "registry {host} answered a range request for {what} with the whole blob"
                    )));
                }
            };
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.unreachable(host, &e.to_string()))?;
                bytes.extend_from_slice(&chunk);
                if bytes.len() as u64 > loc.length {
                    return Err(Error::BadGateway(format!(
                        "{what} is longer than its position says"
                    )));
                }
            }
            sluice_protocol::chunked::parse_toc(bytes, &loc)
                .map_err(|e| Error::BadGateway(format!("{what}: {e}")))
        })
        .await
    }

    /// Checks that the registry at `host` (`host[:port]`) answers `GET /v2/`.
    /// A 401 counts as up: the registry is there and merely wants credentials.
    pub async fn ping(&self, host: &str) -> Result<()> {
        let url = format!("{}://{host}/v2/", self.scheme(host));
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.unreachable(host, &error_chain(&e)))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::UNAUTHORIZED {
            Ok(())
        } else {
            Err(self.unreachable(host, &format!("GET {url} answered {status}")))
        }
    }

    /// Pushes signatures to `<repository>:sha256-<hex>.sig`, keeping existing ones.
    pub async fn push_signatures(&self, repository: &str, sigs: &[SignedDigest]) -> Result<()> {
        let (host, _) = split_repository(repository)?;
        let _guard = self.push_lock.lock().await;
        for sig in sigs {
            self.bounded(host, self.push_one(repository, sig)).await?;
        }
        Ok(())
    }

    /// The layers of `<repository>:sha256-<hex>.sig` (empty if there is none),
    /// as raw descriptors.
    pub async fn signature_layers(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<Vec<serde_json::Value>> {
        let (host, path) = split_repository(repository)?;
        let sig_ref = Reference::with_tag(host.into(), path.into(), signature_tag(digest)?);
        let shown = sig_ref.whole();
        self.bounded(host, self.existing_signature_layers(&sig_ref, &shown))
            .await
    }

    /// Runs one registry operation within [`OPERATION_TIMEOUT`].
    async fn bounded<T>(&self, host: &str, op: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
            Ok(r) => r,
            Err(_) => Err(self.unreachable(
                host,
                &format!("no answer within {} s", OPERATION_TIMEOUT.as_secs()),
            )),
        }
    }

    fn scheme(&self, host: &str) -> &'static str {
        if self.insecure.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        }
    }

    fn auth_for(&self, host: &str) -> RegistryAuth {
        let key = if host == "docker.io" {
            "index.docker.io"
        } else {
            host
        };
        self.auths
            .get(key)
            .or_else(|| self.auths.get(host))
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous)
    }

    async fn resolve_inner(&self, reference: &ImageRef, shown: &str) -> Result<ResolvedImage> {
        let (host, path) = split_repository(&reference.repository)?;
        let oci_ref = match (&reference.digest, &reference.tag) {
            // A digest names the content exactly; a tag next to it is only a label.
            (Some(d), _) => Reference::with_digest(host.into(), path.into(), d.clone()),
            (None, Some(t)) => Reference::with_tag(host.into(), path.into(), t.clone()),
            (None, None) => {
                return Err(Error::BadRequest(format!(
                    "image reference {shown} has neither a tag nor a digest"
                )));
            }
        };
        let (body, _) = self
            .client
            .pull_manifest_raw(&oci_ref, &self.auth_for(host), MANIFEST_TYPES)
            .await
            .map_err(|e| self.map_error(host, shown, e))?;
        // Hash the bytes ourselves: the digest stored in a release must be
        // the content's, whatever headers the registry sent.
        let digest = sha256_digest(&body);
        if let Some(expected) = &reference.digest
            && *expected != digest
        {
            return Err(Error::BadGateway(format!(
                "registry {host} answered {shown} with a manifest whose digest is {digest}: \
                 the registry is corrupt or tampered with; check it before publishing"
            )));
        }
        let manifest = parse_manifest(&body, shown)?;
        let platforms = match manifest.kind {
            Kind::Index => {
                let mut platforms = Vec::new();
                for entry in &manifest.manifests {
                    if entry.is_attestation() {
                        continue;
                    }
                    platforms.push(self.platform_of_entry(host, path, shown, entry).await?);
                }
                if platforms.is_empty() {
                    return Err(Error::Unprocessable(format!(
                        "image index {shown} lists no platform manifests: push an image with at least one platform"
                    )));
                }
                platforms
            }
            Kind::Manifest => {
                vec![
                    self.platform_of_manifest(host, path, shown, &digest, &manifest, None)
                        .await?,
                ]
            }
        };
        Ok(ResolvedImage {
            repository: reference.repository.clone(),
            digest,
            media_type: manifest.media_type,
            platforms,
        })
    }

    /// Fetches one platform manifest of an index, by digest.
    async fn platform_of_entry(
        &self,
        host: &str,
        path: &str,
        shown: &str,
        entry: &IndexEntry,
    ) -> Result<PlatformImage> {
        if !sluice_protocol::is_sha256_digest(&entry.digest) {
            return Err(Error::BadGateway(format!(
                "image index {shown} names a platform manifest by {:?}, which is not a sha256 digest",
                entry.digest
            )));
        }
        let oci_ref = Reference::with_digest(host.into(), path.into(), entry.digest.clone());
        let child = format!("{}@{}", oci_ref.repository(), entry.digest);
        let (body, _) = self
            .client
            .pull_manifest_raw(&oci_ref, &self.auth_for(host), MANIFEST_TYPES)
            .await
            .map_err(|e| match self.map_error(host, &child, e) {
                Error::Unprocessable(m) if m.contains("not found") => Error::Unprocessable(format!(
                    "image index {shown} names platform manifest {} that is not in the registry: push every platform before publishing",
                    entry.digest
                )),
                other => other,
            })?;
        if sha256_digest(&body) != entry.digest {
            return Err(Error::BadGateway(format!(
                "registry {host} answered {child} with other bytes: the registry is corrupt or tampered with"
            )));
        }
        let manifest = parse_manifest(&body, &child)?;
        if manifest.kind == Kind::Index {
            return Err(Error::Unprocessable(format!(
                "image index {shown} nests another index ({}): publish a flat index of platform manifests",
                entry.digest
            )));
        }
        self.platform_of_manifest(
            host,
            path,
            shown,
            &entry.digest,
            &manifest,
            entry.platform.as_ref(),
        )
        .await
    }

    /// The platform of one image manifest: from the index entry when it has
    /// one, else from the image config blob.
    async fn platform_of_manifest(
        &self,
        host: &str,
        path: &str,
        shown: &str,
        digest: &str,
        manifest: &Manifest,
        from_index: Option<&PlatformSpec>,
    ) -> Result<PlatformImage> {
        let size = manifest
            .layers
            .iter()
            .try_fold(0u64, |sum, l| sum.checked_add(l.size))
            .ok_or_else(|| Error::BadGateway(format!("image {shown}: layer sizes overflow")))?;
        let platform = match from_index {
            Some(p) => p.clone(),
            None => {
                let config = manifest.config.as_ref().ok_or_else(|| {
                    Error::BadGateway(format!("manifest {digest} of {shown} has no config"))
                })?;
                self.fetch_config(host, path, shown, config).await?
            }
        };
        let layers = manifest
            .layers
            .iter()
            .map(|l| LayerImage {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
                annotations: l
                    .annotations
                    .iter()
                    .filter(|(k, _)| k.contains(".zstd-chunked.manifest-"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect();
        Ok(PlatformImage {
            os: platform.os,
            architecture: platform.architecture,
            variant: platform.variant.filter(|v| !v.is_empty()),
            digest: digest.to_string(),
            size,
            layers,
        })
    }

    /// Reads an image config blob (bounded, digest-checked) for its platform.
    async fn fetch_config(
        &self,
        host: &str,
        path: &str,
        shown: &str,
        config: &Descriptor,
    ) -> Result<PlatformSpec> {
        if config.size > MAX_CONFIG_BYTES as u64
            || !sluice_protocol::is_sha256_digest(&config.digest)
        {
            return Err(Error::Unprocessable(format!(
                "image {shown} has a config blob Sluice cannot read ({}, {} bytes): push a regular container image",
                config.digest, config.size
            )));
        }
        let oci_ref = Reference::with_tag(host.into(), path.into(), "latest".into());
        let what = format!("config blob {} of {shown}", config.digest);
        let mut stream = self
            .client
            .pull_blob_stream(&oci_ref, config.digest.as_str())
            .await
            .map_err(|e| self.map_error(host, &what, e))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.unreachable(host, &e.to_string()))?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_CONFIG_BYTES {
                return Err(Error::BadGateway(format!(
                    "{what} is larger than it claims"
                )));
            }
        }
        if sha256_digest(&bytes) != config.digest {
            return Err(Error::BadGateway(format!(
                "registry {host} answered {what} with other bytes: the registry is corrupt or tampered with"
            )));
        }
        serde_json::from_slice::<PlatformSpec>(&bytes).map_err(|e| {
            Error::Unprocessable(format!(
                "{what} is not an image config ({e}): push a regular container image"
            ))
        })
    }

    /// Adds one signature layer to `<repository>:sha256-<hex>.sig`.
    async fn push_one(&self, repository: &str, sig: &SignedDigest) -> Result<()> {
        let (host, path) = split_repository(repository)?;
        let sig_ref = Reference::with_tag(host.into(), path.into(), signature_tag(&sig.digest)?);
        let shown = sig_ref.whole();
        let payload = B64.decode(&sig.signature.payload).map_err(|e| {
            Error::Internal(anyhow::anyhow!("signature payload is not base64: {e}"))
        })?;
        // A layer for another digest under this tag would be a silent lie.
        let claims: sluice_protocol::simplesigning::SimpleSigning =
            serde_json::from_slice(&payload).map_err(|e| {
                Error::Internal(anyhow::anyhow!(
                    "signature payload is not simple signing: {e}"
                ))
            })?;
        if claims.critical.image.docker_manifest_digest != sig.digest {
            return Err(Error::Internal(anyhow::anyhow!(
                "signature for {} filed under {}",
                claims.critical.image.docker_manifest_digest,
                sig.digest
            )));
        }

        let auth = self.auth_for(host);
        self.client
            .auth(&sig_ref, &auth, RegistryOperation::Push)
            .await
            .map_err(|e| self.map_error(host, &shown, e))?;

        let mut layers = self.existing_signature_layers(&sig_ref, &shown).await?;
        let layer_digest = sha256_digest(&payload);
        let duplicate = layers.iter().any(|l| {
            let annotation = |k: &str| l.pointer(&format!("/annotations/{}", k.replace('/', "~1")));
            l.get("digest").and_then(|d| d.as_str()) == Some(layer_digest.as_str())
                && (annotation(COSIGN_SIGNATURE_ANNOTATION).and_then(|v| v.as_str())
                    == Some(sig.signature.signature.as_str())
                    || annotation(SLUICE_KEY_ANNOTATION).and_then(|v| v.as_str())
                        == Some(sig.signature.key_id.as_str()))
        });
        if duplicate {
            return Ok(());
        }

        self.client
            .push_blob(&sig_ref, payload.clone(), &layer_digest)
            .await
            .map_err(|e| self.map_error(host, &shown, e))?;
        let config_digest = sha256_digest(SIG_CONFIG);
        self.client
            .push_blob(&sig_ref, SIG_CONFIG.to_vec(), &config_digest)
            .await
            .map_err(|e| self.map_error(host, &shown, e))?;
        layers.push(serde_json::json!({
            "mediaType": COSIGN_SIGNATURE_MEDIA_TYPE,
            "digest": layer_digest,
            "size": payload.len(),
            "annotations": {
                COSIGN_SIGNATURE_ANNOTATION: sig.signature.signature,
                SLUICE_KEY_ANNOTATION: sig.signature.key_id,
            },
        }));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": SIG_CONFIG.len(),
            },
            "layers": layers,
        });
        let body = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.into()))?;
        self.client
            .push_manifest_raw(
                &sig_ref,
                body,
                reqwest::header::HeaderValue::from_static(OCI_MANIFEST),
            )
            .await
            .map_err(|e| self.map_error(host, &shown, e))?;
        Ok(())
    }

    /// The layer descriptors of an existing `.sig` manifest, kept verbatim so
    /// signatures made by others (cosign, an older key) survive a push.
    async fn existing_signature_layers(
        &self,
        sig_ref: &Reference,
        shown: &str,
    ) -> Result<Vec<serde_json::Value>> {
        let host = sig_ref.registry();
        match self
            .client
            .pull_manifest_raw(
                sig_ref,
                &self.auth_for(host),
                &[OCI_MANIFEST, DOCKER_MANIFEST],
            )
            .await
        {
            Ok((body, _)) => {
                #[derive(Deserialize)]
                struct SigManifest {
                    #[serde(default)]
                    layers: Vec<serde_json::Value>,
                }
                let m: SigManifest = serde_json::from_slice(&body).map_err(|e| {
                    Error::BadGateway(format!(
                        "{shown} is not a cosign signature manifest ({e}): delete that tag and publish again"
                    ))
                })?;
                Ok(m.layers)
            }
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(self.map_error(host, shown, e)),
        }
    }

    fn unreachable(&self, host: &str, why: &str) -> Error {
        let hint = if self.scheme(host) == "https" && looks_like_tls(why) {
            format!(" (if {host} serves plain HTTP, add it to SLUICE_INSECURE_REGISTRIES)")
        } else {
            String::new()
        };
        Error::Unavailable(format!(
            "registry {host} is unreachable ({why}){hint}: retry when it is up"
        ))
    }

    /// Maps an oci-client error to what the caller of the API should see.
    fn map_error(&self, host: &str, what: &str, e: OciDistributionError) -> Error {
        if is_not_found(&e) {
            return Error::Unprocessable(format!(
                "image {what} not found in the registry: push it before publishing"
            ));
        }
        if is_auth_refused(&e) {
            let hint = if self.auths.is_empty() {
                "set SLUICE_REGISTRY_AUTH to a Docker config.json with credentials for it"
            } else {
                "check its entry in the SLUICE_REGISTRY_AUTH file"
            };
            return Error::Unprocessable(format!(
                "registry {host} refused access to {what}: {hint}"
            ));
        }
        match e {
            OciDistributionError::RequestError(e) => self.unreachable(host, &error_chain(&e)),
            OciDistributionError::IoError(e) => self.unreachable(host, &e.to_string()),
            OciDistributionError::ServerError { code, .. } if code >= 500 || code == 429 => {
                self.unreachable(host, &format!("HTTP {code}"))
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope
                    .errors
                    .iter()
                    .any(|e| e.code == OciErrorCode::Toomanyrequests) =>
            {
                self.unreachable(host, "too many requests")
            }
            OciDistributionError::DigestError(e) => Error::BadGateway(format!(
                "registry {host} answered {what} with content that does not match its digest ({e}): \
                 the registry is corrupt or tampered with"
            )),
            OciDistributionError::UnsupportedMediaTypeError(t) => Error::Unprocessable(format!(
                "image {what} has media type {t}: push an OCI or Docker schema 2 image or index"
            )),
            OciDistributionError::UnsupportedSchemaVersionError(v) => {
                Error::Unprocessable(format!(
                    "image {what} has manifest schema version {v}: push an OCI or Docker schema 2 image"
                ))
            }
            other => Error::BadGateway(format!(
                "registry {host} answered unexpectedly for {what}: {other}"
            )),
        }
    }
}

/// Splits `host[:port]/path` into its registry host and repository path.
pub fn split_repository(repository: &str) -> Result<(&str, &str)> {
    match repository.split_once('/') {
        Some((host, path)) if !host.is_empty() && !path.is_empty() => Ok((host, path)),
        _ => Err(Error::BadRequest(format!(
            "invalid repository {repository:?}: give `host[:port]/path`"
        ))),
    }
}

/// The cosign tag holding signatures of `digest`: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> Result<String> {
    if !sluice_protocol::is_sha256_digest(digest) {
        return Err(Error::BadRequest(format!(
            "{digest:?} is not a sha256 digest: give `sha256:<64 hex digits>`"
        )));
    }
    Ok(format!("{}.sig", digest.replace(':', "-")))
}

/// `repo:tag`, `repo@digest` or `repo:tag@digest`, as a user wrote it.
fn show(r: &ImageRef) -> String {
    let mut s = r.repository.clone();
    if let Some(t) = &r.tag {
        s.push(':');
        s.push_str(t);
    }
    if let Some(d) = &r.digest {
        s.push('@');
        s.push_str(d);
    }
    s
}

fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown
            )
        }),
        OciDistributionError::ServerError { code: 404, .. } => true,
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        _ => false,
    }
}

fn is_auth_refused(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        _ => false,
    }
}

/// An error with its causes, e.g. `error sending request: connection refused`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

fn looks_like_tls(why: &str) -> bool {
    let why = why.to_ascii_lowercase();
    why.contains("tls") || why.contains("certificate") || why.contains("handshake")
}

/// Reads a Docker `config.json`: `auths.<host>.auth` (base64 `user:password`),
/// or `username` and `password`, or `registrytoken` (a bearer token).
pub fn load_docker_auth(path: &std::path::Path) -> anyhow::Result<HashMap<String, RegistryAuth>> {
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, DockerAuth>,
    }
    #[derive(Deserialize)]
    struct DockerAuth {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        registrytoken: Option<String>,
    }
    let text = std::fs::read(path).with_context(|| {
        format!(
            "reading SLUICE_REGISTRY_AUTH file {}: point it at a Docker config.json",
            path.display()
        )
    })?;
    let parsed: DockerConfig = serde_json::from_slice(&text).with_context(|| {
        format!(
            "SLUICE_REGISTRY_AUTH file {} is not a Docker config.json",
            path.display()
        )
    })?;
    let mut auths = HashMap::new();
    for (key, entry) in parsed.auths {
        // Keys may be `host`, `https://host` or `https://index.docker.io/v1/`.
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let auth = if let Some(encoded) = entry.auth.filter(|a| !a.is_empty()) {
            let decoded = B64
                .decode(encoded.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    s.split_once(':')
                        .map(|(u, p)| (u.to_string(), p.to_string()))
                })
                .with_context(|| {
                    format!(
                        "{}: auths.{key}.auth is not base64 of `user:password`",
                        path.display()
                    )
                })?;
            RegistryAuth::Basic(decoded.0, decoded.1)
        } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
            RegistryAuth::Basic(u, p)
        } else if let Some(token) = entry.registrytoken {
            RegistryAuth::Bearer(token)
        } else {
            anyhow::bail!(
                "{}: auths.{key} has no `auth`, `username`/`password` or `registrytoken`; \
                 credential helpers and identity tokens are not supported",
                path.display()
            );
        };
        auths.insert(host, auth);
    }
    Ok(auths)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manifest,
    Index,
}

/// The parts of a manifest or index Sluice reads.
struct Manifest {
    kind: Kind,
    media_type: String,
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
    manifests: Vec<IndexEntry>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    size: u64,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<PlatformSpec>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl IndexEntry {
    /// BuildKit's provenance/SBOM entries: `unknown/unknown`, not a platform.
    fn is_attestation(&self) -> bool {
        self.annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest")
            || self
                .platform
                .as_ref()
                .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
    }
}

#[derive(Debug, Clone, Deserialize)]
struct PlatformSpec {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

fn parse_manifest(body: &[u8], shown: &str) -> Result<Manifest> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        schema_version: Option<u32>,
        media_type: Option<String>,
        config: Option<Descriptor>,
        layers: Option<Vec<Descriptor>>,
        manifests: Option<Vec<IndexEntry>>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| {
        Error::BadGateway(format!("the manifest of {shown} is not valid JSON: {e}"))
    })?;
    if raw.schema_version != Some(2) {
        return Err(Error::Unprocessable(format!(
            "image {shown} has manifest schema version {:?}: push an OCI or Docker schema 2 image",
            raw.schema_version
        )));
    }
    // OCI lets `mediaType` be absent; the shape tells an index from a manifest.
    let media_type = match raw.media_type {
        Some(t) => t,
        None if raw.manifests.is_some() => OCI_INDEX.to_string(),
        None => OCI_MANIFEST.to_string(),
    };
    let kind = match media_type.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Kind::Index,
        OCI_MANIFEST | DOCKER_MANIFEST => Kind::Manifest,
        other => {
            return Err(Error::Unprocessable(format!(
                "image {shown} has media type {other}: push an OCI or Docker schema 2 image or index"
            )));
        }
    };
    Ok(Manifest {
        kind,
        media_type,
        config: raw.config,
        layers: raw.layers.unwrap_or_default(),
        manifests: raw.manifests.unwrap_or_default(),
    })
}

#[cfg(test)]
mod fit_tests {
    use super::*;

    #[test]
    fn a_device_gets_its_architecture_and_variant() {
        let pl = |a: &str, v: Option<&str>| (a.to_string(), v.map(str::to_string));
        let all = [
            pl("amd64", None),
            pl("arm", Some("v6")),
            pl("arm", Some("v7")),
            pl("arm64", Some("v8")),
        ];
        let pick = |arch: &str| best_fit(&all, arch, |(a, v)| (a.as_str(), v.as_deref())).cloned();
        assert_eq!(pick("amd64"), Some(pl("amd64", None)));
        assert_eq!(pick("arm/v7"), Some(pl("arm", Some("v7"))));
        assert_eq!(pick("arm/v6"), Some(pl("arm", Some("v6"))));
        assert_eq!(pick("arm/v5"), None, "another variant does not run");
        assert_eq!(
            pick("arm"),
            Some(pl("arm", Some("v6"))),
            "no variant asked: the first"
        );
        assert_eq!(pick("arm64"), Some(pl("arm64", Some("v8"))));
        assert_eq!(pick("arm64/v8"), Some(pl("arm64", Some("v8"))));
        assert_eq!(pick("riscv64"), None);
        assert_eq!(
            pick("amd64/v3"),
            Some(pl("amd64", None)),
            "a platform without variant fits any"
        );
    }
}
