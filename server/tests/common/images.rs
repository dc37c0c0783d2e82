//! Builds small, real container images and pushes them to a plain-HTTP test
//! registry through the distribution API: gzip tar layers with random files, an
//! image config, and OCI or Docker schema 2 manifests, indexes and manifest
//! lists. Shared by the integration tests as `common::images`.
#![allow(dead_code)]

use rand::RngCore;
use std::io::Write;

use super::push::{self, PushLayer};
pub use super::push::{
    DOCKER_LIST, DOCKER_MANIFEST, Format, OCI_INDEX, OCI_MANIFEST, digest, unique_repo,
};

/// One gzip-compressed tar layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The compressed bytes, as pushed.
    pub data: Vec<u8>,
    /// `sha256:` of the uncompressed tar (the config's `diff_id`).
    pub diff_id: String,
}

/// A pushed platform manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedPlatform {
    /// `amd64`, `arm64`, ...
    pub arch: String,
    /// The manifest's digest.
    pub digest: String,
    /// Sum of its compressed layer sizes.
    pub size: u64,
}

/// A gzip tar of regular files (mode 0644, owner 0:0), with the two zero
/// blocks that end a tar archive. Parent directories are not added.
pub fn layer(files: &[(&str, &[u8])]) -> Layer {
    let mut tar = Vec::new();
    for (name, content) in files {
        tar.extend_from_slice(&ustar_header(name, content.len() as u64));
        tar.extend_from_slice(content);
        tar.resize(tar.len().next_multiple_of(512), 0);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip into memory");
    Layer {
        data: gz.finish().expect("gzip into memory"),
        diff_id: digest(&tar),
    }
}

/// A layer with one file of `len` random bytes at `etc/sluice-test/<random>`.
pub fn random_layer(len: usize) -> Layer {
    let mut content = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut content);
    let name = format!(
        "etc/sluice-test/{}",
        hex::encode(&content[..content.len().min(8)])
    );
    layer(&[(&name, &content)])
}

fn ustar_header(name: &str, size: u64) -> [u8; 512] {
    assert!(name.len() < 100, "test tar names stay under 100 bytes");
    let mut h = [0u8; 512];
    let mut put = |off: usize, bytes: &[u8]| h[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, name.as_bytes());
    put(100, b"0000644\0");
    put(108, b"0000000\0");
    put(116, b"0000000\0");
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, b"00000000000\0");
    put(156, b"0");
    put(257, b"ustar\0");
    put(263, b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Runs one of [`push`]'s blocking calls off the async workers.
async fn blocking<T: Send + 'static>(push: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(push).await.unwrap()
}

/// Our layers as [`push::platform`] takes them, with their total size.
fn push_layers(layers: &[Layer]) -> (Vec<PushLayer<'_>>, u64) {
    let push = layers
        .iter()
        .map(|l| PushLayer {
            data: &l.data,
            diff_id: l.diff_id.clone(),
            size: l.data.len() as u64,
        })
        .collect();
    (push, layers.iter().map(|l| l.data.len() as u64).sum())
}

/// Uploads a blob ([`push::blob`], off the async workers); answers its digest.
pub async fn push_blob(registry: &str, repo: &str, data: &[u8]) -> String {
    let (registry, repo, data) = (registry.to_string(), repo.to_string(), data.to_vec());
    blocking(move || push::blob(&registry, &repo, &data)).await
}

/// Pushes layers, a config for `linux/<arch>` and a manifest ([`push::platform`]);
/// tagged with `tag` when given, else stored by digest only. Returns the
/// manifest digest and the sum of the compressed layer sizes.
pub async fn push_platform(
    registry: &str,
    repo: &str,
    tag: Option<&str>,
    format: Format,
    arch: &str,
    layers: &[Layer],
) -> (String, u64) {
    let (registry, repo, tag, arch, layers) = (
        registry.to_string(),
        repo.to_string(),
        tag.map(str::to_string),
        arch.to_string(),
        layers.to_vec(),
    );
    blocking(move || {
        let (push, size) = push_layers(&layers);
        let (d, _) = push::platform(&registry, &repo, tag.as_deref(), format, &arch, &push);
        (d, size)
    })
    .await
}

/// Pushes a `linux/amd64` OCI image of two small random layers under `tag`.
/// Returns (manifest digest, total layer size).
pub async fn push_image(registry: &str, repo: &str, tag: &str) -> (String, u64) {
    let layers = [random_layer(2048), random_layer(700)];
    push_platform(registry, repo, Some(tag), Format::Oci, "amd64", &layers).await
}

/// Like [`push_image`], with Docker schema 2 media types.
pub async fn push_docker_image(registry: &str, repo: &str, tag: &str) -> (String, u64) {
    let layers = [random_layer(1500), random_layer(300)];
    push_platform(registry, repo, Some(tag), Format::Docker, "amd64", &layers).await
}

/// Pushes one image per architecture (by digest) and an index of them under
/// `tag`, plus any `extra` index entries as given (e.g. an attestation).
/// Returns the index digest and each platform pushed.
pub async fn push_index_with(
    registry: &str,
    repo: &str,
    tag: &str,
    format: Format,
    arches: &[&str],
    extra: &[serde_json::Value],
) -> (String, Vec<PushedPlatform>) {
    let (registry, repo, tag, extra) = (
        registry.to_string(),
        repo.to_string(),
        tag.to_string(),
        extra.to_vec(),
    );
    let arches: Vec<String> = arches.iter().map(|a| a.to_string()).collect();
    blocking(move || {
        let mut entries = Vec::new();
        let mut pushed = Vec::new();
        for arch in arches {
            let layers = [random_layer(1024), random_layer(512)];
            let (push, size) = push_layers(&layers);
            let (d, manifest) = push::platform(&registry, &repo, None, format, &arch, &push);
            let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
            if arch == "arm64" {
                platform["variant"] = "v8".into();
            }
            entries.push(serde_json::json!({
                "mediaType": format.manifest(), "digest": d, "size": manifest.len(), "platform": platform,
            }));
            pushed.push(PushedPlatform {
                arch,
                digest: d,
                size,
            });
        }
        entries.extend(extra);
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": format.index(),
            "manifests": entries,
        }))
        .unwrap();
        let d = push::manifest(&registry, &repo, &tag, format.index(), &index);
        (d, pushed)
    })
    .await
}

/// Pushes a multi-arch OCI index of `arches` (arm64 gets variant `v8`).
/// Returns the index digest and (arch, manifest digest, layer size) per platform.
pub async fn push_index(
    registry: &str,
    repo: &str,
    tag: &str,
    arches: &[&str],
) -> (String, Vec<(String, String, u64)>) {
    let (d, p) = push_index_with(registry, repo, tag, Format::Oci, arches, &[]).await;
    (
        d,
        p.into_iter().map(|p| (p.arch, p.digest, p.size)).collect(),
    )
}

/// Reads a manifest back as raw JSON (any of the four media types).
pub async fn get_manifest(
    registry: &str,
    repo: &str,
    reference: &str,
) -> Option<serde_json::Value> {
    let r = reqwest::Client::new()
        .get(format!("http://{registry}/v2/{repo}/manifests/{reference}"))
        .header(
            "accept",
            [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", "),
        )
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    assert!(
        r.status().is_success(),
        "GET manifest {repo}:{reference}: {}",
        r.status()
    );
    Some(r.json().await.unwrap())
}
