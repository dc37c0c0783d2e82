//! Pulls a platform manifest, its image config and its layers from an OCI
//! registry **by digest**, verifying every blob's digest and declared size
//! while it streams (a blob longer than declared is cut off and refused).
//! The image config's platform is checked against the device's before a
//! slot is touched. Credentials go only to the registry itself or to an
//! https token service.

use anyhow::{Context, bail};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::Duration;

/// Most bytes a manifest may have.
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Most bytes an image config may have (as the server reads them).
pub const MAX_CONFIG: u64 = 1 << 20;

/// Media types of an image config.
const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// `host[:port]/repository@sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host and port.
    pub host: String,
    /// Repository path.
    pub repository: String,
    /// Manifest digest.
    pub digest: String,
}

impl ImageRef {
    /// Parses a digest reference; tags are refused (Sluice pulls by digest only).
    pub fn parse(s: &str) -> anyhow::Result<ImageRef> {
        let (name, digest) = s
            .split_once('@')
            .with_context(|| format!("image {s:?} is not a digest reference (repo@sha256:...)"))?;
        if !sluice_protocol::is_sha256_digest(digest) {
            bail!("image {s:?} does not name a sha256 digest");
        }
        let (host, repository) = name
            .split_once('/')
            .with_context(|| format!("image {s:?} names no registry host"))?;
        if repository.is_empty() || host.is_empty() {
            bail!("image {s:?} names no repository");
        }
        Ok(ImageRef {
            host: host.into(),
            repository: repository.into(),
            digest: digest.into(),
        })
    }
}

/// One layer of a manifest.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Descriptor {
    /// Media type (gzip, zstd or plain tar).
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Blob digest.
    pub digest: String,
    /// Declared size in bytes.
    pub size: u64,
    /// Annotations (`zstd:chunked` layers say where their table of
    /// contents is).
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    /// The manifest's media type, when it says.
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    /// The image config (its platform); required.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Layers, lowest first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Present in an index: then this is not a platform manifest.
    #[serde(default)]
    pub manifests: Option<serde_json::Value>,
}

/// Checks a platform manifest's bytes and parses them: at most
/// [`MAX_MANIFEST`] bytes hashing to `digest`, not an index, an image config
/// and at least one layer, every blob named by a sha256 digest. No I/O, so
/// it can be fuzzed.
pub fn parse_manifest(bytes: &[u8], digest: &str) -> anyhow::Result<Manifest> {
    if bytes.len() as u64 > MAX_MANIFEST {
        bail!("manifest {digest} is larger than {MAX_MANIFEST} bytes: refused");
    }
    let got = sluice_protocol::sha256_digest(bytes);
    if got != digest {
        bail!("manifest bytes hash to {got}, not {digest}: refused");
    }
    let m: Manifest = serde_json::from_slice(bytes).context("parsing the manifest")?;
    if m.manifests.is_some() {
        bail!("{digest} is an image index, not a platform manifest: refused");
    }
    let Some(config) = &m.config else {
        bail!("manifest {digest} names no image config, so its platform is unknown: refused");
    };
    if !CONFIG_TYPES.contains(&config.media_type.as_str()) {
        bail!(
            "manifest {digest} has a config of type {:?}, not an image config: refused",
            config.media_type
        );
    }
    if !sluice_protocol::is_sha256_digest(&config.digest) {
        bail!("config digest {:?} is not sha256: refused", config.digest);
    }
    if m.layers.is_empty() {
        bail!("manifest {digest} has no layers");
    }
    for l in &m.layers {
        if !sluice_protocol::is_sha256_digest(&l.digest) {
            bail!("layer digest {:?} is not sha256: refused", l.digest);
        }
    }
    Ok(m)
}

/// The platform an image config names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Platform {
    /// `linux`, ...
    #[serde(default)]
    pub os: String,
    /// `amd64`, `arm64`, ...
    #[serde(default)]
    pub architecture: String,
    /// `v8`, `v7`, ... when the image says.
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match self.variant.as_deref() {
            Some(v) if !v.is_empty() => write!(f, "/{v}"),
            _ => Ok(()),
        }
    }
}

/// Checks an image config's bytes and reads its platform: at most
/// [`MAX_CONFIG`] bytes hashing to `digest`, a JSON object naming an OS and
/// an architecture. No I/O.
pub fn parse_config(bytes: &[u8], digest: &str) -> anyhow::Result<Platform> {
    if bytes.len() as u64 > MAX_CONFIG {
        bail!("image config {digest} is larger than {MAX_CONFIG} bytes: refused");
    }
    let got = sluice_protocol::sha256_digest(bytes);
    if got != digest {
        bail!("image config bytes hash to {got}, not {digest}: refused");
    }
    let p: Platform = serde_json::from_slice(bytes).context("parsing the image config")?;
    if p.os.is_empty() || p.architecture.is_empty() {
        bail!("image config {digest} names no os/architecture: refused");
    }
    Ok(p)
}

/// Refuses an image built for another platform than this device's: Linux,
/// the architecture configured as `arch` (`amd64`, or with a variant,
/// `arm/v7`), and the same variant when both name one (`arm64` alone is
/// `arm64/v8`).
pub fn check_platform(p: &Platform, arch: &str) -> anyhow::Result<()> {
    let (want_arch, want_variant) = match arch.split_once('/') {
        Some((a, v)) => (a, Some(v)),
        None => (arch, None),
    };
    let variant = match p.variant.as_deref() {
        Some(v) if !v.is_empty() => Some(v),
        _ if p.architecture == "arm64" => Some("v8"),
        _ => None,
    };
    let variant_ok = match (want_variant, variant) {
        (Some(w), Some(v)) => w == v,
        (Some(w), None) => want_arch == "arm64" && w == "v8",
        (None, _) => true,
    };
    if p.os != "linux" || p.architecture != want_arch || !variant_ok {
        bail!("image is built for {p}, this device runs linux/{arch}: refused");
    }
    Ok(())
}

/// Whether the credentials for the registry at `registry` (its base URL)
/// may go to the token service at `realm`: over https, or to the registry
/// itself (same scheme, host and port). A plain-HTTP realm elsewhere would
/// hand them to whoever the registry (or a network between) names.
pub fn may_send_credentials(registry: &str, realm: &str) -> bool {
    use ureq::http::Uri;
    let (Ok(reg), Ok(realm)) = (registry.parse::<Uri>(), realm.parse::<Uri>()) else {
        return false;
    };
    let port = |u: &Uri| {
        u.port_u16().or_else(|| match u.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })
    };
    match realm.scheme_str() {
        Some("https") => realm.host().is_some(),
        Some(s) => {
            Some(s) == reg.scheme_str()
                && realm.host().is_some()
                && realm
                    .host()
                    .zip(reg.host())
                    .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
                && port(&realm) == port(&reg)
        }
        None => false,
    }
}

/// A registry client for one device.
pub struct Registry {
    agent: ureq::Agent,
    insecure: Vec<String>,
    auths: serde_json::Value,
    /// Each request must end within `base` plus its size at `min_rate`.
    base: Duration,
    min_rate: u64,
}

impl Registry {
    /// A client from the `[registry]` configuration: `insecure` hosts are
    /// reached over plain HTTP, `auth` is a Docker `config.json`, and each
    /// request must end within `timeout_s` plus its size at
    /// `min_bytes_per_s`, the slow-retrieval bound (TUF's attack): a
    /// registry or network that trickles or stalls a body cannot hold the
    /// agent.
    pub fn new(cfg: &crate::config::Registry) -> anyhow::Result<Self> {
        let auths = match cfg.auth.as_deref() {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading registry credentials {}", p.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("parsing registry credentials {}", p.display()))?;
                v.get("auths").cloned().unwrap_or_default()
            }
            _ => serde_json::Value::Null,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .build()
            .into();
        Ok(Registry {
            agent,
            insecure: cfg.insecure.clone(),
            auths,
            base: Duration::from_secs(cfg.timeout_s),
            min_rate: cfg.min_bytes_per_s.max(1),
        })
    }

    /// How long a request for `size` bytes may take in all.
    pub fn deadline(&self, size: u64) -> Duration {
        // Sizes come from verified manifests, but a huge one must not make
        // an instant overflow: a month is no bound anyway.
        self.base
            .saturating_add(Duration::from_secs(size / self.min_rate))
            .min(Duration::from_secs(30 * 86_400))
    }

    fn base(&self, r: &ImageRef) -> String {
        let scheme = if self.insecure.iter().any(|h| h == &r.host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}", r.host, r.repository)
    }

    fn basic(&self, host: &str) -> Option<String> {
        let a = self.auths.get(host)?;
        if let Some(s) = a.get("auth").and_then(|v| v.as_str()) {
            return Some(s.to_string());
        }
        let u = a.get("username")?.as_str()?;
        let p = a.get("password")?.as_str()?;
        Some(base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
    }

    /// GET with the registry's auth dance: Basic from the credentials file, or
    /// a Bearer token fetched from the realm a 401 names.
    fn get(
        &self,
        r: &ImageRef,
        url: &str,
        accept: &str,
        size: u64,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        self.get_range(r, url, accept, size, None)
    }

    /// [`Registry::get`], for the bytes `[start, end)` when `range` says.
    fn get_range(
        &self,
        r: &ImageRef,
        url: &str,
        accept: &str,
        size: u64,
        range: Option<&str>,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let mut auth = self.basic(&r.host).map(|b| format!("Basic {b}"));
        for _ in 0..2 {
            let mut req = self
                .agent
                .get(url)
                .config()
                .timeout_global(Some(self.deadline(size)))
                .build()
                .header("Accept", accept);
            if let Some(range) = range {
                req = req.header("Range", range);
            }
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            let resp = req
                .call()
                .with_context(|| format!("registry {} unreachable", r.host))?;
            if resp.status() == 401 && auth.as_deref().is_none_or(|a| a.starts_with("Basic")) {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if let Some(token) = self.token(r, &challenge)? {
                    auth = Some(format!("Bearer {token}"));
                    continue;
                }
            }
            return Ok(resp);
        }
        bail!(
            "registry {} refused the credentials for {}",
            r.host,
            r.repository
        )
    }

    fn token(&self, r: &ImageRef, challenge: &str) -> anyhow::Result<Option<String>> {
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return Ok(None);
        };
        let mut realm = None;
        let mut query = Vec::new();
        for part in params.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                let v = v.trim_matches('"').to_string();
                match k {
                    "realm" => realm = Some(v),
                    "service" | "scope" => query.push((k.to_string(), v)),
                    _ => {}
                }
            }
        }
        let Some(realm) = realm else { return Ok(None) };
        let mut req = self
            .agent
            .get(&realm)
            .config()
            .timeout_global(Some(self.deadline(1 << 20)))
            .build();
        for (k, v) in &query {
            req = req.query(k, v);
        }
        let mut withheld = false;
        if let Some(b) = self.basic(&r.host) {
            if may_send_credentials(&self.base(r), &realm) {
                req = req.header("Authorization", &format!("Basic {b}"));
            } else {
                withheld = true;
                crate::log(&format!(
                    "not sending the credentials for {} to token service {realm} (neither https nor {} itself): asking for an anonymous token",
                    r.host, r.host
                ));
            }
        }
        let mut resp = req
            .call()
            .with_context(|| format!("token service {realm} unreachable"))?;
        if resp.status() != 200 {
            bail!(
                "token service {realm} answered {}{}",
                resp.status(),
                if withheld {
                    " to an anonymous request (the credentials were withheld: the realm is neither https nor the registry's own host)"
                } else {
                    ""
                }
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&resp.body_mut().with_config().limit(1 << 20).read_to_vec()?)?;
        Ok(v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string))
    }

    /// Fetches the platform manifest by digest and checks its bytes.
    pub fn manifest(&self, r: &ImageRef) -> anyhow::Result<Manifest> {
        let url = format!("{}/manifests/{}", self.base(r), r.digest);
        let resp = self.get(r, &url, ACCEPT, MAX_MANIFEST)?;
        if resp.status() != 200 {
            bail!(
                "registry answered {} for manifest {}/{}@{}",
                resp.status(),
                r.host,
                r.repository,
                r.digest
            );
        }
        let mut bytes = Vec::new();
        resp.into_body()
            .into_reader()
            .take(MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .context("reading the manifest")?;
        parse_manifest(&bytes, &r.digest)
    }

    /// Fetches the image config `manifest` names (capped, verified) and
    /// reads its platform.
    pub fn platform(&self, r: &ImageRef, manifest: &Manifest) -> anyhow::Result<Platform> {
        let c = manifest
            .config
            .as_ref()
            .context("the manifest names no image config")?;
        if c.size > MAX_CONFIG {
            bail!(
                "image config {} declares {} bytes, more than {MAX_CONFIG}: refused",
                c.digest,
                c.size
            );
        }
        let mut bytes = Vec::new();
        self.blob(r, c)?
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading image config {}", c.digest))?;
        parse_config(&bytes, &c.digest)
    }

    /// Opens a blob by digest; the reader verifies digest and size as it goes.
    pub fn blob(
        &self,
        r: &ImageRef,
        d: &Descriptor,
    ) -> anyhow::Result<Verified<Box<dyn Read + Send>>> {
        let url = format!("{}/blobs/{}", self.base(r), d.digest);
        let resp = self.get(r, &url, "*/*", d.size)?;
        if resp.status() != 200 {
            bail!("registry answered {} for blob {}", resp.status(), d.digest);
        }
        let reader: Box<dyn Read + Send> = Box::new(Paced {
            inner: resp.into_body().into_reader(),
            what: format!(
                "registry {} too slow: blob {} ({} bytes) did not arrive within {} s \
                 (registry.timeout_s plus its size at registry.min_bytes_per_s)",
                r.host,
                d.digest,
                d.size,
                self.deadline(d.size).as_secs()
            ),
        });
        Ok(Verified::new(reader, &d.digest, d.size))
    }
}

impl Registry {
    /// The bytes `[start, end)` of a blob, by an HTTP range request. Only a
    /// 206 answer whose `Content-Range` names exactly that range of a blob
    /// of the declared size is read, and it must hold exactly that many
    /// bytes; anything else is an error (the caller then pulls the whole
    /// blob). The bytes are not verified here: the caller checks what they
    /// decompress to.
    pub fn range(
        &self,
        r: &ImageRef,
        d: &Descriptor,
        start: u64,
        end: u64,
    ) -> anyhow::Result<Box<dyn Read + Send>> {
        if start >= end || end > d.size {
            bail!(
                "range {start}..{end} is outside blob {} ({} bytes)",
                d.digest,
                d.size
            );
        }
        let url = format!("{}/blobs/{}", self.base(r), d.digest);
        let header = format!("bytes={start}-{}", end - 1);
        let resp = self.get_range(r, &url, "*/*", end - start, Some(&header))?;
        if resp.status() != 206 {
            bail!(
                "registry answered {} to a range request for blob {} (partial pulls need 206)",
                resp.status(),
                d.digest
            );
        }
        let want = format!("bytes {start}-{}/{}", end - 1, d.size);
        let got = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if got != want {
            bail!(
                "registry answered Content-Range {got:?} for blob {}, not {want:?}",
                d.digest
            );
        }
        if let Some(len) = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            && len != (end - start).to_string()
        {
            bail!(
                "registry answered {len} bytes for a {}-byte range of blob {}",
                end - start,
                d.digest
            );
        }
        Ok(Box::new(self.paced_range(
            r,
            d,
            end - start,
            resp.into_body().into_reader().take(end - start),
        )))
    }

    /// A range answer's body, whose timeout says it is `bytes` of blob `d`
    /// that came too slowly.
    fn paced_range<R>(&self, r: &ImageRef, d: &Descriptor, bytes: u64, inner: R) -> Paced<R> {
        Paced {
            inner,
            what: format!(
                "registry {} too slow: {bytes} bytes of blob {} did not arrive within {} s",
                r.host,
                d.digest,
                self.deadline(bytes).as_secs()
            ),
        }
    }

    /// Several byte ranges of a blob in one request (`Range: bytes=a-b,c-d`),
    /// answered as `multipart/byteranges`: the body and its boundary, each
    /// part to be read and checked in order ([`read_part_header`]). `None`
    /// when the registry does not serve several ranges at once (it answered
    /// 200, or a single range): the caller asks for one range at a time.
    /// `ranges` must be ascending, apart and inside the blob.
    pub fn ranges(
        &self,
        r: &ImageRef,
        d: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> anyhow::Result<Option<(Box<dyn Read + Send>, String)>> {
        let mut last = 0;
        for &(start, end) in ranges {
            if start < last || start >= end || end > d.size {
                bail!(
                    "range {start}..{end} is out of order or outside blob {} ({} bytes)",
                    d.digest,
                    d.size
                );
            }
            last = end;
        }
        let bytes: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        let header = ranges
            .iter()
            .map(|(s, e)| format!("{s}-{}", e - 1))
            .collect::<Vec<_>>()
            .join(",");
        let url = format!("{}/blobs/{}", self.base(r), d.digest);
        let resp = self.get_range(r, &url, "*/*", bytes, Some(&format!("bytes={header}")))?;
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let boundary = ctype
            .strip_prefix("multipart/byteranges")
            .and_then(|rest| {
                rest.split(';')
                    .find_map(|p| p.trim().strip_prefix("boundary="))
            })
            .map(|b| b.trim_matches('"').to_string());
        match (status, boundary) {
            (206, Some(b)) if !b.is_empty() && b.len() <= 70 => {
                // Each part's headers take well under 512 bytes.
                let limit = bytes + 512 * (ranges.len() as u64 + 1);
                Ok(Some((
                    Box::new(std::io::BufReader::with_capacity(
                        64 << 10,
                        self.paced_range(r, d, bytes, resp.into_body().into_reader().take(limit)),
                    )),
                    b,
                )))
            }
            (200 | 206, _) => Ok(None),
            (s, _) => bail!(
                "registry answered {s} to a range request for blob {}",
                d.digest
            ),
        }
    }
}

/// Reads the headers of the next part of a `multipart/byteranges` body
/// (RFC 9110, 14.6): the boundary line, then header lines up to an empty
/// one; the part must be the range `[start, end)` of a blob of `size`
/// bytes. Lines and their number are bounded: a hostile registry cannot
/// make it read without end.
pub fn read_part_header(
    body: &mut dyn Read,
    boundary: &str,
    (start, end): (u64, u64),
    size: u64,
) -> anyhow::Result<()> {
    let mut line = || -> anyhow::Result<String> {
        let mut l = Vec::new();
        let mut b = [0u8];
        loop {
            if body.read(&mut b)? == 0 {
                bail!("the multipart answer ended inside a part's headers");
            }
            if b[0] == b'\n' {
                break;
            }
            l.push(b[0]);
            if l.len() > 1024 {
                bail!("a multipart header line is over 1024 bytes");
            }
        }
        if l.last() == Some(&b'\r') {
            l.pop();
        }
        Ok(String::from_utf8_lossy(&l).into_owned())
    };
    let delimiter = format!("--{boundary}");
    let mut first = line()?;
    // The CRLF that ends the previous part's data comes first.
    if first.is_empty() {
        first = line()?;
    }
    if first != delimiter {
        bail!("the multipart answer has {first:?} where its boundary should be");
    }
    let want = format!("bytes {start}-{}/{size}", end - 1);
    let mut range = None;
    for _ in 0..16 {
        let l = line()?;
        if l.is_empty() {
            return match range {
                Some(got) if got == want => Ok(()),
                Some(got) => {
                    bail!("a multipart part is {got:?}, not the range asked for ({want:?})")
                }
                None => bail!("a multipart part has no Content-Range"),
            };
        }
        if let Some((k, v)) = l.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-range")
        {
            range = Some(v.trim().to_string());
        }
    }
    bail!("a multipart part has more than 16 header lines")
}

/// Says why a body read timed out: the slow-retrieval bound, not a network
/// fault.
struct Paced<R> {
    inner: R,
    what: String,
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            let timeout = e.kind() == std::io::ErrorKind::TimedOut
                || e.get_ref()
                    .and_then(|i| i.downcast_ref::<ureq::Error>())
                    .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
            if timeout {
                std::io::Error::new(std::io::ErrorKind::TimedOut, self.what.clone())
            } else {
                e
            }
        })
    }
}

/// Why a blob failed verification.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// More bytes than the manifest declares.
    #[error("blob {0} is longer than its declared {1} bytes: cut off and refused")]
    TooLong(String, u64),
    /// Fewer bytes than declared.
    #[error("blob {0} ended after {1} of {2} declared bytes")]
    TooShort(String, u64, u64),
    /// The bytes hash to something else.
    #[error("blob bytes hash to {got}, not {want}: refused")]
    Digest {
        /// Expected digest.
        want: String,
        /// What the bytes hash to.
        got: String,
    },
}

/// A reader that hashes and counts what passes, refuses a byte past the
/// declared size, and at the end refuses a short blob or another digest.
pub struct Verified<R> {
    inner: R,
    hasher: Sha256,
    want: String,
    size: u64,
    read: u64,
    done: bool,
}

impl<R: Read> Verified<R> {
    /// Wraps `inner`, expecting `size` bytes hashing to `digest`.
    pub fn new(inner: R, digest: &str, size: u64) -> Self {
        Verified {
            inner,
            hasher: Sha256::new(),
            want: digest.to_string(),
            size,
            read: 0,
            done: false,
        }
    }

    /// The reader inside.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads whatever is left and checks it; call after the consumer is done.
    pub fn finish(&mut self) -> std::io::Result<()> {
        std::io::copy(self, &mut std::io::sink()).map(|_| ())
    }

    fn check_end(&mut self) -> std::io::Result<()> {
        if self.read < self.size {
            return Err(std::io::Error::other(BlobError::TooShort(
                self.want.clone(),
                self.read,
                self.size,
            )));
        }
        let got = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if got != self.want {
            return Err(std::io::Error::other(BlobError::Digest {
                want: self.want.clone(),
                got,
            }));
        }
        self.done = true;
        Ok(())
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        // Ask for at most one byte past the declared size: enough to notice.
        let room = (self.size - self.read).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.check_end()?;
            return Ok(0);
        }
        self.read += n as u64;
        if self.read > self.size {
            return Err(std::io::Error::other(BlobError::TooLong(
                self.want.clone(),
                self.size,
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(data: &[u8], digest: &str, size: u64) -> std::io::Result<Vec<u8>> {
        let mut v = Verified::new(data, digest, size);
        let mut out = Vec::new();
        v.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn verified_reader_checks_digest_and_size() {
        let data = b"layer bytes";
        let d = sluice_protocol::sha256_digest(data);
        assert_eq!(read_all(data, &d, data.len() as u64).unwrap(), data);
        let e = read_all(data, &d, 4).unwrap_err();
        assert!(
            e.to_string().contains("longer than its declared 4 bytes"),
            "{e}"
        );
        let e = read_all(data, &d, 100).unwrap_err();
        assert!(e.to_string().contains("ended after 11 of 100"), "{e}");
        let other = sluice_protocol::sha256_digest(b"other");
        let e = read_all(data, &other, data.len() as u64).unwrap_err();
        assert!(e.to_string().contains("hash to"), "{e}");
    }

    #[test]
    fn a_longer_blob_is_cut_off_at_one_byte_past() {
        // An endless source: the reader must stop by itself.
        let endless = std::io::repeat(7);
        let mut v = Verified::new(endless, "sha256:00", 1000);
        let mut out = Vec::new();
        assert!(v.read_to_end(&mut out).is_err());
        assert!(out.len() <= 1000);
    }

    /// Each check of a manifest's bytes refuses with its own message.
    #[test]
    fn manifests_are_checked_before_use() {
        let layer = sluice_protocol::sha256_digest(b"layer");
        let config = serde_json::json!({"mediaType": "application/vnd.oci.image.config.v1+json",
                                        "digest": layer, "size": 5});
        let good = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer, "size": 5}]
        })
        .to_string();
        let d = sluice_protocol::sha256_digest(good.as_bytes());
        let m = parse_manifest(good.as_bytes(), &d).unwrap();
        assert_eq!(m.layers[0].digest, layer);

        let refused = |bytes: &[u8], digest: &str, why: &str| {
            let e = format!("{:#}", parse_manifest(bytes, digest).unwrap_err());
            assert!(e.contains(why), "{e}");
        };
        refused(good.as_bytes(), &layer, "hash to");
        let with = |config: &serde_json::Value, layers: serde_json::Value| {
            serde_json::json!({"config": config, "layers": layers}).to_string()
        };
        let other_type = serde_json::json!({"mediaType": "application/vnd.cncf.helm.config.v1+json",
                                            "digest": layer, "size": 5});
        let md5 = serde_json::json!({"mediaType": "application/vnd.oci.image.config.v1+json",
                                     "digest": "md5:00", "size": 5});
        for (json, why) in [
            (r#"{"manifests":[],"layers":[]}"#.to_string(), "image index"),
            (r#"{"layers":[]}"#.to_string(), "names no image config"),
            (with(&config, serde_json::json!([])), "no layers"),
            (
                with(
                    &config,
                    serde_json::json!([{"mediaType":"x","digest":"md5:00","size":1}]),
                ),
                "not sha256",
            ),
            (
                with(&other_type, serde_json::json!([])),
                "not an image config",
            ),
            (with(&md5, serde_json::json!([])), "not sha256"),
            ("[".to_string(), "parsing the manifest"),
        ] {
            refused(
                json.as_bytes(),
                &sluice_protocol::sha256_digest(json.as_bytes()),
                why,
            );
        }
        let big = vec![b' '; MAX_MANIFEST as usize + 1];
        refused(&big, &sluice_protocol::sha256_digest(&big), "larger than");
    }

    /// The platform an image config names, against the device's.
    #[test]
    fn platforms_are_checked() {
        let cfg = |v: serde_json::Value| {
            let b = v.to_string().into_bytes();
            parse_config(&b, &sluice_protocol::sha256_digest(&b))
        };
        let p = |os: &str, arch: &str, variant: Option<&str>| Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        };
        assert_eq!(
            cfg(serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"}))
                .unwrap(),
            p("linux", "arm", Some("v7"))
        );
        for bad in [
            serde_json::json!({"os": "linux"}),
            serde_json::json!({"architecture": "amd64"}),
        ] {
            assert!(format!("{:#}", cfg(bad).unwrap_err()).contains("os/architecture"));
        }
        let b = br#"{"os":"linux","architecture":"amd64"}"#;
        assert!(
            format!(
                "{:#}",
                parse_config(b, &sluice_protocol::sha256_digest(b"x")).unwrap_err()
            )
            .contains("hash to")
        );
        let big = vec![b' '; MAX_CONFIG as usize + 1];
        assert!(parse_config(&big, &sluice_protocol::sha256_digest(&big)).is_err());

        for (image, device) in [
            (p("linux", "amd64", None), "amd64"),
            (p("linux", "amd64", Some("v3")), "amd64"),
            (p("linux", "arm64", None), "arm64/v8"),
            (p("linux", "arm64", Some("v8")), "arm64"),
            (p("linux", "arm", Some("v7")), "arm/v7"),
            (p("linux", "arm", Some("v7")), "arm"),
        ] {
            check_platform(&image, device).unwrap_or_else(|e| panic!("{image} on {device}: {e}"));
        }
        for (image, device) in [
            (p("linux", "arm64", None), "amd64"),
            (p("windows", "amd64", None), "amd64"),
            (p("linux", "arm", Some("v6")), "arm/v7"),
            (p("linux", "arm", None), "arm/v7"),
            (p("linux", "arm64", Some("v9")), "arm64/v8"),
        ] {
            let e = check_platform(&image, device).unwrap_err().to_string();
            assert!(e.contains(&format!("built for {image}")), "{e}");
        }
    }

    /// Credentials go to an https realm, or to the registry itself.
    #[test]
    fn credentials_only_where_safe() {
        let ok = [
            ("https://reg.example/v2/a", "https://auth.example/token"),
            ("http://127.0.0.1:5000/v2/a", "https://auth.example/token"),
            ("http://127.0.0.1:5000/v2/a", "http://127.0.0.1:5000/token"),
            ("https://reg.example/v2/a", "https://REG.example:443/token"),
        ];
        let refused = [
            ("http://127.0.0.1:5000/v2/a", "http://127.0.0.1:5001/token"),
            ("http://127.0.0.1:5000/v2/a", "http://evil.example/token"),
            ("https://reg.example/v2/a", "http://reg.example/token"),
            ("https://reg.example/v2/a", "http://reg.example:443/token"),
            ("https://reg.example/v2/a", "/token"),
            ("https://reg.example/v2/a", "ftp://reg.example/token"),
            ("https://reg.example/v2/a", "not a url"),
        ];
        for (reg, realm) in ok {
            assert!(may_send_credentials(reg, realm), "{reg} -> {realm}");
        }
        for (reg, realm) in refused {
            assert!(!may_send_credentials(reg, realm), "{reg} -> {realm}");
        }
    }

    #[test]
    fn image_refs_are_by_digest() {
        let d = sluice_protocol::sha256_digest(b"x");
        let r = ImageRef::parse(&format!("127.0.0.1:5000/acme/os@{d}")).unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "acme/os")
        );
        assert!(ImageRef::parse("127.0.0.1:5000/acme/os:1.0").is_err());
        assert!(ImageRef::parse(&format!("os@{d}")).is_err());
    }
}
