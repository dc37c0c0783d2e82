//! Test helpers: push images to the real registry (`SLUICE_TEST_REGISTRY`),
//! sign like the server does, a device in a temporary folder, and the tiny
//! responder that stands in for the server **only** where the real server
//! refuses to produce the answer under test (forged, replayed, expired
//! answers; broken blobs).
#![allow(dead_code)]

mod device;
#[path = "../../../../server/tests/common/push.rs"]
pub mod push;
mod shared;
pub use device::{Device, DeviceOpts, Health};
pub use shared::{Entry, checked, ok, refused, tar_entry, tree, umoci_tree};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::EncodePublicKey;
use sluice_agent::config::SlotKind;
use sluice_protocol::keys::ALG_ECDSA_P256;
use sluice_protocol::simplesigning::{COSIGN_TYPE, OPT_PRODUCT, OPT_VERSION};
use sluice_protocol::{
    ImageSignature, KeyRole, KeySet, Offer, PublicKey, ResolveResponse, ResponseSigner, key_id,
};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// The registry under test, `host:port`; the tests refuse to run without it.
pub fn registry() -> String {
    std::env::var("SLUICE_TEST_REGISTRY").expect(
        "SLUICE_TEST_REGISTRY must name a plain-HTTP OCI registry (host:port), e.g. 127.0.0.1:55000",
    )
}

/// A layer: its uncompressed tar and gzip bytes.
pub struct Layer {
    pub tar: Vec<u8>,
    pub gz: Vec<u8>,
}

impl Layer {
    pub fn from_tar(tar: Vec<u8>) -> Self {
        use flate2::write::GzEncoder;
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        Layer {
            gz: e.finish().unwrap(),
            tar,
        }
    }
    pub fn digest(&self) -> String {
        sluice_protocol::sha256_digest(&self.gz)
    }
}

/// A pushed image.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub repository: String,
    pub digest: String,
    /// `host/repo@digest`.
    pub image: String,
    pub size: u64,
    pub manifest: Vec<u8>,
}

/// Pushes an OCI image of gzip layers to the real registry under a fresh
/// repository, through the tests' one pusher (`server/tests/common/push.rs`);
/// `sizes`, when given, are the layer sizes the manifest declares (a lie
/// the agent must catch).
pub fn push_image(layers: &[Layer], sizes: Option<&[u64]>) -> Pushed {
    let reg = registry();
    let repo = push::unique_repo("agent-img");
    let push: Vec<push::PushLayer<'_>> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| push::PushLayer {
            data: &l.gz,
            diff_id: sluice_protocol::sha256_digest(&l.tar),
            size: sizes.map_or(l.gz.len() as u64, |s| s[i]),
        })
        .collect();
    let (digest, manifest) =
        push::platform(&reg, &repo, Some("v1"), push::Format::Oci, "amd64", &push);
    Pushed {
        image: format!("{reg}/{repo}@{digest}"),
        repository: repo,
        digest,
        size: layers.iter().map(|l| l.gz.len() as u64).sum(),
        manifest,
    }
}

/// `pushed` recompressed as `format` (`zstd`, `zstd:chunked`) into a new
/// repository of the same registry ([`shared::recompress`]).
pub fn recompress(pushed: &Pushed, format: &str) -> Pushed {
    let reg = registry();
    let repo = push::unique_repo(&format!("agent-{}", format.replace(':', "-")));
    let manifest = shared::recompress(&pushed.image, format, &format!("{reg}/{repo}:v1"));
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let digest = sluice_protocol::sha256_digest(&manifest);
    Pushed {
        image: format!("{reg}/{repo}@{digest}"),
        repository: repo,
        digest,
        size: m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum(),
        manifest,
    }
}

/// The server's keys: an Ed25519 response key and an ECDSA P-256 image key.
pub struct Keys {
    pub response: ResponseSigner,
    pub image: p256::ecdsa::SigningKey,
}

impl Keys {
    pub fn new(seed: u8) -> Self {
        Keys {
            response: ResponseSigner::from_seed(&[seed; 32]),
            image: p256::ecdsa::SigningKey::from_slice(&[seed.wrapping_add(100); 32]).unwrap(),
        }
    }

    pub fn image_public(&self) -> PublicKey {
        let vk = self.image.verifying_key();
        PublicKey {
            key_id: key_id(vk.to_public_key_der().unwrap().as_bytes()),
            role: KeyRole::Image,
            algorithm: ALG_ECDSA_P256.into(),
            public_key_pem: vk.to_public_key_pem(Default::default()).unwrap(),
        }
    }

    pub fn key_set(&self) -> KeySet {
        KeySet {
            keys: vec![self.response.public_key(), self.image_public()],
        }
    }

    /// A cosign simple-signing signature binding digest, product and version.
    pub fn sign_image(&self, digest: &str, product: &str, version: &str) -> ImageSignature {
        let payload = serde_json::json!({
            "critical": {"identity": {"docker-reference": "registry/acme/os"},
                         "image": {"docker-manifest-digest": digest},
                         "type": COSIGN_TYPE},
            "optional": {OPT_PRODUCT: product, OPT_VERSION: version}
        })
        .to_string();
        let sig: p256::ecdsa::Signature = self.image.sign(payload.as_bytes());
        ImageSignature {
            payload: B64.encode(payload),
            signature: B64.encode(sig.to_der().as_bytes()),
            key_id: self.image_public().key_id,
        }
    }
}

/// A device of `product` on channel `stable` with slot kind `kind` (`dir`,
/// `image`, `block`) for `server`, trusting `keys`, whose health check
/// passes when `healthy`; `insecure` as [`DeviceOpts::insecure`].
pub fn device(
    server: &str,
    product: &str,
    keys: &KeySet,
    insecure: Vec<String>,
    healthy: bool,
    kind: &str,
) -> Device {
    Device::new(&DeviceOpts {
        server: server.into(),
        product: product.into(),
        channel: "stable".into(),
        enrollment_secret: "secret".into(),
        keys: serde_json::to_string(keys).unwrap(),
        insecure,
        kind: match kind {
            "dir" => SlotKind::Dir,
            "image" => SlotKind::Image,
            "block" => SlotKind::Block,
            other => panic!("unknown slot kind {other}"),
        },
        health: if healthy {
            Health::Passes
        } else {
            Health::Fails
        },
    })
}

impl Device {
    /// `sluice-agent --config <this device> args...`, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice-agent"));
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// Runs the agent to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

/// One request a stand-in saw.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    /// By lower-case name.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn q(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one HTTP/1.1 request; `None` when the peer hung up first.
pub fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").to_string()))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

/// A response: status, headers, body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// `status` with `body` and no headers.
    pub fn plain(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![],
            body: body.into(),
        }
    }

    /// 200 with `v` as JSON.
    pub fn json(v: &serde_json::Value) -> Response {
        Response {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: serde_json::to_vec(v).unwrap(),
        }
    }

    /// 200 with `r`, signed by `signer` as the server signs its answers.
    pub fn signed(r: &ResolveResponse, signer: &ResponseSigner) -> Response {
        let body = serde_json::to_vec(r).unwrap();
        Response {
            status: 200,
            headers: vec![("sluice-signature".into(), signer.sign_header(&body))],
            body,
        }
    }
}

/// What every stand-in server answers alike: an enrollment (device `dev-1`,
/// token `tok-1`) and the device's reports (events, cleared failures).
pub fn device_routes(req: &Request) -> Option<Response> {
    if req.path == "/v1/devices/enroll" {
        return Some(Response::json(
            &serde_json::json!({"device_id": "dev-1", "token": "tok-1"}),
        ));
    }
    (req.path.ends_with("/events") || req.path.ends_with("/failures/cleared"))
        .then(|| Response::plain(204, []))
}

/// The server's FleetLock routes as the stand-ins play them: `POST
/// /v1/pre-reboot` and `POST /v1/steady-state`, each with the headers
/// `fleet-lock-protocol: true` and `Authorization: Bearer tok-1` and the
/// body `{"client_params": {"id": "dev-1", "group": "<group>"}}`. A lease
/// is granted (200) while fewer than `max` ids hold one in the group (the
/// holder asking again is granted again), else refused with 409 and
/// `{"kind": "lease_unavailable", "value": "group <g> holds <n> of <max>
/// reboot leases ..."}`; `steady-state` gives the caller's lease back (200,
/// held or not). A request without the headers or with another body is a
/// 400 `bad_request`.
#[derive(Debug, Default)]
pub struct Leases {
    /// Most holders per group.
    pub max: usize,
    /// Who holds a lease, by group.
    pub holders: BTreeMap<String, Vec<String>>,
    /// Answer `steady-state` with 503 this many more times.
    pub steady_state_down: u32,
    /// Refuse every `pre-reboot` with this `value` (a hostile server).
    pub refusal: Option<String>,
}

impl Leases {
    /// One lease per group.
    pub fn new() -> Leases {
        Leases {
            max: 1,
            ..Leases::default()
        }
    }

    /// Who holds leases in `group`.
    pub fn held(&self, group: &str) -> Vec<String> {
        self.holders.get(group).cloned().unwrap_or_default()
    }

    /// The answer to `req` when it is a FleetLock route.
    pub fn answer(&mut self, req: &Request) -> Option<Response> {
        let pre = match req.path.as_str() {
            "/v1/pre-reboot" => true,
            "/v1/steady-state" => false,
            _ => return None,
        };
        let bad = |why: &str| {
            let mut r = Response::json(&serde_json::json!({"kind": "bad_request", "value": why}));
            r.status = 400;
            r
        };
        if req.method != "POST" {
            return Some(bad("POST only"));
        }
        if req.headers.get("fleet-lock-protocol").map(String::as_str) != Some("true") {
            return Some(bad("missing fleet-lock-protocol: true"));
        }
        if req.headers.get("authorization").map(String::as_str) != Some("Bearer tok-1") {
            return Some(Response::plain(401, "no device token"));
        }
        let Ok(body) = serde_json::from_slice::<sluice_protocol::FleetLockRequest>(&req.body)
        else {
            return Some(bad("not a FleetLock body"));
        };
        let (id, group) = (body.client_params.id, body.client_params.group);
        if id != "dev-1" {
            return Some(bad("another device's id"));
        }
        let held = self.holders.entry(group.clone()).or_default();
        if !pre {
            if self.steady_state_down > 0 {
                self.steady_state_down -= 1;
                return Some(Response::plain(503, "down"));
            }
            held.retain(|h| *h != id);
            return Some(Response::json(&serde_json::json!({})));
        }
        if let Some(value) = &self.refusal {
            let mut r = Response::json(&serde_json::json!({"kind": "k", "value": value}));
            r.status = 409;
            return Some(r);
        }
        if held.contains(&id) || held.len() < self.max {
            if !held.contains(&id) {
                held.push(id);
            }
            return Some(Response::json(&serde_json::json!({})));
        }
        let mut r = Response::json(&serde_json::json!({
            "kind": "lease_unavailable",
            "value": format!(
                "group {group} holds {} of {} reboot leases ({}); try again later",
                held.len(),
                self.max,
                held.join(", ")
            ),
        }));
        r.status = 409;
        Some(r)
    }
}

/// The answer to the `resolve` `req` asks, as the server builds it: `offer`
/// (an update unless the device runs it already) under `serial`, for
/// device `dev-1`, naming the question, valid for a minute.
pub fn resolution(req: &Request, offer: Option<Offer>, serial: i64) -> ResolveResponse {
    let now = time::OffsetDateTime::now_utc();
    let segment = |i| req.path.split('/').nth(i).map(str::to_string);
    ResolveResponse {
        update: offer
            .as_ref()
            .is_some_and(|o| req.q("current") != Some(o.digest.as_str())),
        downgrade: false,
        release: offer,
        poll_after_s: 60,
        device_id: "dev-1".into(),
        nonce: req.q("nonce").unwrap_or("").to_string(),
        serial,
        issued_at: now,
        expires_at: now + time::Duration::seconds(60),
        wire: sluice_protocol::WIRE_VERSION,
        // `/v1/products/{product}/channels/{channel}/resolve`
        product: segment(3),
        channel: segment(5),
        arch: req.q("arch").map(str::to_string),
        current: req.q("current").map(str::to_string),
        keys_version: None,
        retry: Vec::new(),
        reboot: None,
    }
}

/// Appends the entries every test OS has to a layer: `usr/bin` with a
/// set-id `su` and a hard link to it, a `bin` symlink, and a user's home
/// with another owner.
pub fn add_system(b: &mut tar::Builder<Vec<u8>>) {
    use tar::EntryType::*;
    let mut add =
        |path: &str, kind: tar::EntryType, mode: u32, uid: u64, data: &[u8], link: Option<&str>| {
            tar_entry(b, path, kind, mode, uid, data, link)
        };
    add("usr/", Directory, 0o755, 0, b"", None);
    add("usr/bin/", Directory, 0o755, 0, b"", None);
    add("usr/bin/su", Regular, 0o4755, 0, b"\x7fELF su", None);
    add("usr/bin/sudo", Link, 0o4755, 0, b"", Some("usr/bin/su"));
    add("bin", Symlink, 0o777, 0, b"", Some("usr/bin"));
    add("home/", Directory, 0o755, 0, b"", None);
    add("home/user/", Directory, 0o700, 1000, b"", None);
    add(
        "home/user/.profile",
        Regular,
        0o644,
        1000,
        b"export A=1\n",
        None,
    );
}

/// An OCI image manifest naming `config` and gzip layers by digest and size.
pub fn manifest(config: &[u8], layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(digest, size)| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                               "digest": digest, "size": size})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sluice_protocol::sha256_digest(config), "size": config.len()},
        "layers": layers
    }))
    .unwrap()
}

/// The next number of a xorshift sequence (`x` not 0): cheap noise that
/// no compressor shrinks.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `len` bytes of noise, the same for the same `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len).map(|_| xorshift(&mut x) as u8).collect()
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// The stand-in for the server in the attack cases: a plain-HTTP listener on
/// loopback with a handler; it records every request.
pub struct Responder {
    pub url: String,
    pub host: String,
    pub seen: Arc<Mutex<Vec<Request>>>,
}

impl Responder {
    pub fn start(handler: Arc<Handler>) -> Responder {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let h = handler.clone();
                let s = s2.clone();
                std::thread::spawn(move || serve(conn, &*h, &s));
            }
        });
        Responder {
            url: format!("http://{host}"),
            host,
            seen,
        }
    }

    pub fn events(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.ends_with("/events"))
            .map(|r| {
                serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }
}

fn serve(mut conn: TcpStream, h: &Handler, seen: &Mutex<Vec<Request>>) {
    let Some(req) = read_request(&conn) else {
        return;
    };
    seen.lock().unwrap().push(req.clone());
    let resp = h(&req);
    write_head(&mut conn, resp.status, resp.body.len(), &resp.headers);
    let _ = conn.write_all(&resp.body);
}

/// Writes a response's status line and headers, for a body of `len` bytes.
pub fn write_head(out: &mut TcpStream, status: u16, len: usize, headers: &[(String, String)]) {
    let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
}
