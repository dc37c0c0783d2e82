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
use sluice_protocol::{ImageSignature, KeyRole, KeySet, PublicKey, ResponseSigner, key_id};
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

/// One request the responder saw.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
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

/// A response: status, headers, body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
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

fn serve(conn: TcpStream, h: &Handler, seen: &Mutex<Vec<Request>>) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut len = 0usize;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").to_string()))
        .collect();
    let req = Request {
        method,
        path: path.to_string(),
        query,
        body,
    };
    seen.lock().unwrap().push(req.clone());
    let resp = h(&req);
    let mut out = conn;
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(&resp.body);
}
