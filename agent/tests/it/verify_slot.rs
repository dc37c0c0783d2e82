//! The agent binary against a registry that lies (issues 11 and 12): a blob
//! that fails its digest, a download that stalls and is killed, an image for
//! another platform, a layer whose tar headers are huge, a slot too small for
//! the image, and a registry whose 401 sends the credentials elsewhere. A
//! small stand-in plays both the server (answers signed as the server signs
//! them) and the registry, because the real ones never produce these inputs;
//! it records every request with its headers.

use crate::common;

use common::*;
use flate2::write::GzEncoder;
use sluice_agent::bootloader::Slot;
use sluice_protocol::Offer;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

const PRODUCT: &str = "acme-os";
const REPO: &str = "acme/os";

/// How the stand-in answers one request.
enum Reply {
    /// Status, headers, body.
    Full(u16, Vec<(String, String)>, Vec<u8>),
    /// Declares the whole body, sends its first `n` bytes, then hangs.
    Stall(Vec<u8>, usize),
    /// Declares the whole body and sends it a byte every 50 ms.
    Trickle(Vec<u8>),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Full(r.status, r.headers, r.body)
    }
}

type Route = dyn Fn(&Request) -> Option<Reply> + Send + Sync;

/// A loopback HTTP/1.1 listener answering from a list of routes, one request
/// per connection; every request is recorded.
struct Stand {
    host: String,
    seen: Arc<Mutex<Vec<Request>>>,
    routes: Arc<Mutex<Vec<Box<Route>>>>,
}

impl Stand {
    fn start() -> Stand {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let routes: Arc<Mutex<Vec<Box<Route>>>> = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (seen.clone(), routes.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || serve(conn, &s, &r));
            }
        });
        Stand { host, seen, routes }
    }

    fn route(&self, f: impl Fn(&Request) -> Option<Reply> + Send + Sync + 'static) {
        self.routes.lock().unwrap().push(Box::new(f));
    }

    /// The requests whose path starts with `prefix`.
    fn seen(&self, prefix: &str) -> Vec<Request> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .cloned()
            .collect()
    }
}

fn serve(conn: TcpStream, seen: &Mutex<Vec<Request>>, routes: &Mutex<Vec<Box<Route>>>) {
    let Some(req) = read_request(&conn) else {
        return;
    };
    seen.lock().unwrap().push(req.clone());
    // The newest route that answers wins, so a test can change its mind.
    let reply = routes
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|f| f(&req))
        .unwrap_or_else(|| Reply::Full(404, vec![], b"not found".to_vec()));
    let mut out = conn;
    let mut trickle = false;
    let (status, extra, body, send) = match reply {
        Reply::Full(s, h, b) => {
            let n = b.len();
            (s, h, b, n)
        }
        Reply::Stall(b, n) => (200, vec![], b, n),
        Reply::Trickle(b) => {
            trickle = true;
            (200, vec![], b, 0)
        }
    };
    write_head(&mut out, status, body.len(), &extra);
    if trickle {
        // Never idle long enough for a read timeout; ends when the agent
        // hangs up.
        for b in &body {
            if out.write_all(std::slice::from_ref(b)).is_err() || out.flush().is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        return;
    }
    let _ = out.write_all(&body[..send]);
    if send < body.len() {
        // Hang until the agent gives up (or is killed).
        let _ = out.flush();
        let mut sink = [0u8; 1];
        let _ = out.read(&mut sink);
    }
}

/// An image as the stand-in registry serves it.
#[derive(Clone)]
struct Image {
    digest: String,
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(tar).unwrap();
    e.finish().unwrap()
}

/// An image of the given gzip layers and config JSON.
fn image(layers: &[Vec<u8>], config: serde_json::Value) -> Image {
    let config = serde_json::to_vec(&config).unwrap();
    let mut blobs = vec![(sluice_protocol::sha256_digest(&config), config.clone())];
    for gz in layers {
        blobs.push((sluice_protocol::sha256_digest(gz), gz.clone()));
    }
    let descs: Vec<(&str, usize)> = blobs[1..]
        .iter()
        .map(|(d, gz)| (d.as_str(), gz.len()))
        .collect();
    let manifest = common::manifest(&config, &descs);
    Image {
        digest: sluice_protocol::sha256_digest(&manifest),
        manifest,
        blobs,
    }
}

fn linux_amd64() -> serde_json::Value {
    serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}, "config": {}})
}

/// A layer with the test OS's set-id `su` and `sudo` first
/// ([`add_system`]), then `rest`.
fn layer(rest: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    add_system(&mut b);
    for (p, data) in rest {
        tar_entry(&mut b, p, tar::EntryType::Regular, 0o644, 0, data, None);
    }
    gzip(&b.into_inner().unwrap())
}

/// The server's side of the stand-in: enroll, events, and a signed answer
/// offering `img` as 2.0.0, its image reference naming `registry`.
fn play_server(s: &Stand, keys: Arc<Keys>, registry: String, img: &Image) {
    let digest = img.digest.clone();
    s.route(move |req| {
        if let Some(r) = device_routes(req) {
            return Some(r.into());
        }
        if !req.path.ends_with("/resolve") {
            return None;
        }
        let offer = Offer {
            version: "2.0.0".into(),
            digest: digest.clone(),
            image: format!("{registry}/{REPO}@{digest}"),
            size: 1,
            signature: keys.sign_image(&digest, PRODUCT, "2.0.0"),
        };
        let r = resolution(req, Some(offer), 1);
        Some(Response::signed(&r, &keys.response).into())
    });
}

/// The registry's side: the manifest and blobs of `img`.
fn play_registry(s: &Stand, img: &Image) {
    let img = img.clone();
    s.route(move |req| {
        if req.path == format!("/v2/{REPO}/manifests/{}", img.digest) {
            return Some(Reply::Full(
                200,
                vec![(
                    "Content-Type".into(),
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                img.manifest.clone(),
            ));
        }
        img.blobs
            .iter()
            .find(|(d, _)| req.path == format!("/v2/{REPO}/blobs/{d}"))
            .map(|(_, b)| Reply::Full(200, vec![], b.clone()))
    });
}

struct Setup {
    stand: Stand,
    dev: Device,
}

/// A stand-in playing server and registry for `img`, and a device of `kind`
/// polling it; slot B holds a file left from before.
fn setup(img: &Image, kind: &str) -> Setup {
    let stand = Stand::start();
    let keys = Arc::new(Keys::new(1));
    let host = stand.host.clone();
    play_registry(&stand, img);
    play_server(&stand, keys.clone(), host.clone(), img);
    let dev = common::device(
        &format!("http://{host}"),
        PRODUCT,
        &keys.key_set(),
        vec![host],
        true,
        kind,
    );
    if kind == "dir" {
        std::fs::write(dev.path("b/left-over"), b"from before").unwrap();
    }
    Setup { stand, dev }
}

/// GRUB still boots A and B is not marked bootable.
fn assert_not_switched(dev: &Device) {
    let ab = dev.ab();
    assert_eq!(ab.next_boot(), Some(Slot::A));
    assert!(!ab.is_ok(Slot::B));
    assert_eq!(dev.reboots(), 0);
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Every set-id file below `dir`.
fn set_id_files(dir: &Path) -> Vec<String> {
    tree(dir)
        .into_iter()
        .filter(|(_, (m, ..))| m & 0o170000 == 0o100000 && m & 0o6000 != 0)
        .map(|(p, _)| p.display().to_string())
        .collect()
}

/// A registry (or mirror, or network) serves other bytes under a layer's
/// digest: the upgrade is refused, and nothing of what was unpacked from
/// them stays in slot B, which is left empty and closed (0700).
#[test]
fn a_blob_that_fails_its_digest_leaves_the_slot_empty_and_closed() {
    let good = layer(&[("etc/os-release", b"ID=acme\n".to_vec())]);
    // Served instead: a valid layer with a set-id binary and more of its
    // own, under the good layer's digest (its own size declared, so only
    // the digest is wrong).
    let served = layer(&[("usr/bin/evil", noise(300_000, 7))]);
    let mut img = image(std::slice::from_ref(&served), linux_amd64());
    let (bad, good_digest) = (
        sluice_protocol::sha256_digest(&served),
        sluice_protocol::sha256_digest(&good),
    );
    img.manifest = String::from_utf8(img.manifest)
        .unwrap()
        .replace(&bad, &good_digest)
        .into_bytes();
    img.digest = sluice_protocol::sha256_digest(&img.manifest);
    img.blobs[1].0 = good_digest;
    let s2 = setup(&img, "dir");
    let out = s2.dev.run(&["apply"]);
    refused(&out, "hash to");
    assert_not_switched(&s2.dev);
    let b = s2.dev.path("b");
    assert!(
        tree(&b).is_empty(),
        "slot B keeps unverified files: {:?}",
        tree(&b).keys().collect::<Vec<_>>()
    );
    assert_eq!(mode(&b), 0o700, "slot B is open while unverified");
}

/// The download stalls half way through the only layer and the agent is
/// killed: slot B is closed (0700) and nothing in it is set-id yet; the
/// next `apply` empties it and installs the image, set-id bits and all.
#[test]
fn a_killed_install_leaves_no_set_id_file_and_the_next_one_completes() {
    let gz = layer(&[("usr/lib/big", noise(4 << 20, 3))]);
    let img = image(std::slice::from_ref(&gz), linux_amd64());
    let s = setup(&img, "dir");
    let digest = sluice_protocol::sha256_digest(&gz);
    let path = format!("/v2/{REPO}/blobs/{digest}");
    let stalled = Arc::new(Mutex::new(true));
    let st = stalled.clone();
    s.stand.route(move |req| {
        (req.path == path && *st.lock().unwrap()).then(|| Reply::Stall(gz.clone(), 2 << 20))
    });
    let mut child = s
        .dev
        .command(&["apply"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let su = s.dev.path("b/usr/bin/su");
    // Wait until the agent is in the middle of the layer.
    let mut waited = 0;
    while !su.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the agent ended before the stall"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        waited += 1;
        assert!(waited < 3000, "the agent never reached the layer");
    }
    assert_eq!(mode(&s.dev.path("b")), 0o700, "slot B is open mid-write");
    assert!(
        set_id_files(&s.dev.path("b")).is_empty(),
        "set-id bits before the image was verified"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let _ = child.wait();
    assert_eq!(mode(&s.dev.path("b")), 0o700);
    assert!(set_id_files(&s.dev.path("b")).is_empty());
    assert_not_switched(&s.dev);

    *stalled.lock().unwrap() = false;
    ok(&s.dev.run(&["apply"]));
    let b = s.dev.path("b");
    assert_eq!(s.dev.ab().next_boot(), Some(Slot::B));
    assert_eq!(set_id_files(&b), ["usr/bin/su", "usr/bin/sudo"]);
    assert_eq!(mode(&b.join("usr/bin/su")), 0o4755);
    assert_eq!(mode(&b), 0o755, "the committed slot is open again");
    assert!(
        !b.join("left-over").exists(),
        "slot B was not emptied first"
    );
    assert_eq!(
        std::fs::read(b.join("usr/lib/big")).unwrap(),
        noise(4 << 20, 3)
    );
}

/// Slow retrieval (TUF): a registry or network that stalls a layer's body,
/// or trickles it a byte at a time (never idle long enough for a read
/// timeout), cannot hold the agent: the download fails once it has taken
/// longer than `timeout_s` plus its size at `min_bytes_per_s`, the agent
/// exits by itself with a line that says so, and slot B is left empty and
/// closed, GRUB untouched. Without the bound, both hung until killed.
#[test]
fn a_stalled_or_trickled_download_fails_by_itself() {
    for trickle in [false, true] {
        let gz = layer(&[("usr/lib/big", noise(1 << 20, 5))]);
        let img = image(std::slice::from_ref(&gz), linux_amd64());
        let s = setup(&img, "dir");
        let path = format!("/v2/{REPO}/blobs/{}", sluice_protocol::sha256_digest(&gz));
        s.stand.route(move |req| {
            (req.path == path).then(|| {
                if trickle {
                    Reply::Trickle(gz.clone())
                } else {
                    Reply::Stall(gz.clone(), 4096)
                }
            })
        });
        // About 1 MB at 1 MB/s after 2 s: the bound is ~3 s.
        s.dev.edit_config(|c| {
            c.registry.timeout_s = 2;
            c.registry.min_bytes_per_s = 1 << 20;
        });
        let mut child = s
            .dev
            .command(&["apply"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Only a safety net for a hang (the failure this test is about);
        // the bound itself is ~3 s.
        let mut waited = 0;
        while child.try_wait().unwrap().is_none() {
            waited += 1;
            if waited > 1200 {
                let _ = child.kill();
                panic!("the agent still waits on a slow registry after 120 s (trickle: {trickle})");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let out = child.wait_with_output().unwrap();
        refused(&out, "too slow");
        assert_not_switched(&s.dev);
        let b = s.dev.path("b");
        assert!(
            tree(&b).is_empty(),
            "trickle {trickle}: {:?}",
            tree(&b).keys().collect::<Vec<_>>()
        );
        assert_eq!(mode(&b), 0o700);
    }
}

/// An image whose config names another OS or architecture, or whose config
/// blob is not what the manifest names, is refused before slot B is touched.
#[test]
fn an_image_for_another_platform_is_refused_before_the_slot_is_touched() {
    let gz = layer(&[]);
    let cases = [
        (
            serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8"}),
            "linux/arm64/v8",
        ),
        (
            serde_json::json!({"architecture": "amd64", "os": "windows"}),
            "windows/amd64",
        ),
        (serde_json::json!({"os": "linux"}), "architecture"),
    ];
    for (config, want) in cases {
        let img = image(std::slice::from_ref(&gz), config);
        let s = setup(&img, "dir");
        refused(&s.dev.run(&["apply"]), want);
        assert_not_switched(&s.dev);
        assert_eq!(
            std::fs::read(s.dev.path("b/left-over")).unwrap(),
            b"from before",
            "slot B was touched"
        );
    }
    // The config blob served is not the one the manifest names.
    let mut img = image(std::slice::from_ref(&gz), linux_amd64());
    img.blobs[0].1 = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
        "config": {"Entrypoint": ["/evil"]}}))
    .unwrap();
    let s = setup(&img, "dir");
    refused(&s.dev.run(&["apply"]), "");
    assert_eq!(
        std::fs::read(s.dev.path("b/left-over")).unwrap(),
        b"from before"
    );
    // The same platform is installed.
    let img = image(&[gz], linux_amd64());
    let s = setup(&img, "dir");
    ok(&s.dev.run(&["apply"]));
    assert!(s.dev.path("b/usr/bin/su").exists());
}

/// A layer of 256 KiB of gzip holding a 256 MiB GNU long-name record: the
/// agent refuses it without reading the record into memory (it took 1 GB
/// of RSS per 1 MB of such a layer before).
#[test]
fn a_huge_tar_header_record_is_refused_in_little_memory() {
    let mut tar = Vec::new();
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    let big = 256u64 << 20;
    h.set_size(big);
    h.set_mode(0o644);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&tar).unwrap();
    let zeros = vec![b'a'; 1 << 20];
    for _ in 0..(big >> 20) {
        e.write_all(&zeros).unwrap();
    }
    let gz = e.finish().unwrap();
    assert!(gz.len() < 512 << 10, "{}", gz.len());
    let img = image(&[gz], linux_amd64());
    let s = setup(&img, "dir");
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kb %M"])
        .arg(env!("CARGO_BIN_EXE_sluice-agent"))
        .arg("--config")
        .arg(&s.dev.config)
        .arg("apply")
        .output()
        .expect("GNU time (package `time`) is installed");
    let err = String::from_utf8_lossy(&out.stderr);
    let rss: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-kb "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {err}"));
    assert!(!out.status.success());
    let last = err
        .lines()
        .rfind(|l| l.starts_with("sluice-agent: error: "))
        .unwrap_or("");
    assert!(last.contains("GNU long name record"), "{err}");
    assert!(rss < 64 << 10, "peak RSS {rss} kB");
    assert!(tree(&s.dev.path("b")).is_empty());
}

/// With no `slots.max_unpacked_bytes`, the cap is what the slot can hold:
/// for a block slot, the device's size. An image larger than a 4 MiB slot
/// is refused while it unpacks, with the cap in the message.
#[test]
fn the_default_cap_is_what_the_slot_can_hold() {
    let gz = layer(&[("usr/lib/big", noise(6 << 20, 5))]);
    let img = image(&[gz], linux_amd64());
    let s = setup(&img, "block");
    let f = std::fs::File::create(s.dev.path("b.part")).unwrap();
    f.set_len(4 << 20).unwrap();
    std::fs::File::create(s.dev.path("a.part"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    refused(
        &s.dev.run(&["apply"]),
        &format!("image unpacks to more than {} bytes", 4 << 20),
    );
    assert_not_switched(&s.dev);
}

/// A registry's 401 names the token service the credentials go to. They go
/// to an https realm or to the registry itself (same host, same scheme);
/// a plain-HTTP realm on another host gets an anonymous request instead.
#[test]
fn credentials_go_only_to_a_safe_token_realm() {
    let gz = layer(&[]);
    let img = image(&[gz], linux_amd64());
    for same_host in [false, true] {
        let s = setup(&img, "dir");
        let elsewhere = Stand::start();
        let realm = if same_host {
            format!("http://{}/token", s.stand.host)
        } else {
            format!("http://{}/token", elsewhere.host)
        };
        let token = |req: &Request| {
            (req.path == "/token")
                .then(|| Response::json(&serde_json::json!({"token": "t0k3n"})).into())
        };
        s.stand.route(token);
        elsewhere.route(token);
        // Every registry request needs the token.
        s.stand.route(move |req| {
            let authed = req.headers.get("authorization").map(String::as_str) == Some("Bearer t0k3n");
            (req.path.starts_with("/v2/") && !authed).then(|| {
                Reply::Full(
                    401,
                    vec![(
                        "WWW-Authenticate".into(),
                        format!(
                            "Bearer realm=\"{realm}\",service=\"registry\",scope=\"repository:{REPO}:pull\""
                        ),
                    )],
                    vec![],
                )
            })
        });
        let auth = s.dev.path("auth.json");
        std::fs::write(
            &auth,
            serde_json::to_vec(&serde_json::json!({"auths": {
                s.stand.host.clone(): {"username": "robot", "password": "hunter2"}}}))
            .unwrap(),
        )
        .unwrap();
        s.dev.edit_config(|c| c.registry.auth = Some(auth.clone()));

        ok(&s.dev.run(&["apply"]));
        let basic = |seen: Vec<Request>| {
            seen.iter()
                .filter(|r| {
                    r.headers
                        .get("authorization")
                        .is_some_and(|a| a.starts_with("Basic "))
                })
                .count()
        };
        if same_host {
            assert!(
                basic(s.stand.seen("/token")) > 0,
                "the registry's own realm got no credentials"
            );
        } else {
            assert!(
                !elsewhere.seen("/token").is_empty(),
                "the realm was never asked"
            );
            assert_eq!(
                basic(elsewhere.seen("/")),
                0,
                "credentials went to a plain-HTTP realm on another host"
            );
        }
    }
}

/// An `image` slot is built from the staging folder after the commit (the
/// set-id bits are in the file system), and the staging copy left in the
/// state folder is closed again.
#[test]
fn an_image_slot_is_built_after_the_commit_and_its_staging_is_closed() {
    let img = image(&[layer(&[])], linux_amd64());
    let s = setup(&img, "image");
    ok(&s.dev.run(&["apply"]));
    let out = std::process::Command::new("debugfs")
        .args(["-R", "stat /usr/bin/su"])
        .arg(s.dev.path("b.img"))
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&out.stdout);
    assert!(stat.contains("Mode:  04755"), "{stat}");
    assert_eq!(mode(&s.dev.path("state/staging")), 0o700);
    assert_eq!(mode(&s.dev.path("state/staging/usr/bin/su")), 0o4755);
}
