//! The one way every test pushes an image to the plain-HTTP test registry
//! (the distribution API: a monolithic blob upload, a manifest PUT), blocking.
//! The server's and the end-to-end tests reach it through the async wrappers
//! of `images.rs`; the agent's tests (`agent/tests/it/common`) include this
//! file and call it directly.
#![allow(dead_code)]

use sha2::{Digest, Sha256};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Which family of media types an image uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OCI image-spec media types.
    Oci,
    /// Docker schema 2 media types (what `docker push` writes).
    Docker,
}

impl Format {
    /// The image manifest's media type.
    pub fn manifest(self) -> &'static str {
        match self {
            Format::Oci => OCI_MANIFEST,
            Format::Docker => DOCKER_MANIFEST,
        }
    }
    /// The index's (manifest list's) media type.
    pub fn index(self) -> &'static str {
        match self {
            Format::Oci => OCI_INDEX,
            Format::Docker => DOCKER_LIST,
        }
    }
    /// The image config's media type.
    pub fn config(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.config.v1+json",
            Format::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
    /// A gzip layer's media type.
    pub fn layer(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
            Format::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        }
    }
}

/// `sha256:<hex>` of some bytes.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A unique repository name under `sluice-test/`, so runs never collide.
pub fn unique_repo(prefix: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut b);
    format!("sluice-test/{prefix}-{}", hex::encode(b))
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// Uploads a blob (monolithic POST + PUT); answers its digest.
pub fn blob(registry: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    let a = http();
    let start = a
        .post(&format!("http://{registry}/v2/{repo}/blobs/uploads/"))
        .send_empty()
        .unwrap_or_else(|e| panic!("registry {registry} unreachable: {e}"));
    assert_eq!(
        start.status(),
        202,
        "starting a blob upload to {registry}/{repo}"
    );
    let location = start.headers()["location"].to_str().unwrap().to_string();
    let url = if location.starts_with("http") {
        location
    } else {
        format!("http://{registry}{location}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut put = a
        .put(&format!("{url}{sep}digest={d}"))
        .header("Content-Type", "application/octet-stream")
        .send(data)
        .unwrap();
    assert_eq!(
        put.status(),
        201,
        "uploading blob {d}: {}",
        put.body_mut().read_to_string().unwrap_or_default()
    );
    d
}

/// Puts a manifest under `reference` (a tag or its own digest); answers its digest.
pub fn manifest(
    registry: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let mut put = http()
        .put(&format!(
            "http://{registry}/v2/{repo}/manifests/{reference}"
        ))
        .header("Content-Type", media_type)
        .send(body)
        .unwrap_or_else(|e| panic!("registry {registry} unreachable: {e}"));
    assert_eq!(
        put.status(),
        201,
        "pushing manifest {repo}:{reference}: {}",
        put.body_mut().read_to_string().unwrap_or_default()
    );
    digest(body)
}

/// A layer as a platform manifest names it.
pub struct PushLayer<'a> {
    /// The compressed bytes, as pushed.
    pub data: &'a [u8],
    /// `sha256:` of the uncompressed tar (the config's `diff_id`).
    pub diff_id: String,
    /// The size the manifest declares (the data's length, unless a test
    /// lies about it).
    pub size: u64,
}

/// Pushes `layers`, an image config for `linux/<arch>` and a manifest,
/// stored under `tag` when given, else by its digest only; answers the
/// manifest's digest and bytes.
pub fn platform(
    registry: &str,
    repo: &str,
    tag: Option<&str>,
    format: Format,
    arch: &str,
    layers: &[PushLayer<'_>],
) -> (String, Vec<u8>) {
    let mut descriptors = Vec::new();
    for l in layers {
        let d = blob(registry, repo, l.data);
        descriptors.push(serde_json::json!({
            "mediaType": format.layer(), "digest": d, "size": l.size,
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
    }))
    .unwrap();
    let config_digest = blob(registry, repo, &config);
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": format.manifest(),
        "config": {"mediaType": format.config(), "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let d = digest(&body);
    manifest(registry, repo, tag.unwrap_or(&d), format.manifest(), &body);
    (d, body)
}
