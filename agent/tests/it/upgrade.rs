//! The agent against the real registry (`SLUICE_TEST_REGISTRY`): an upgrade
//! into a dir slot compared with `umoci raw unpack`, boot assessment and
//! rollback, the attack cases, and upgrades killed at random moments.
//! The server is played by the small responder in `common` (signing with
//! the protocol crate) because the attack answers are ones the real server
//! never produces; `common::Device` takes any server URL, so the same
//! flow runs against the real server once it can publish.

use crate::common;

use common::*;
use sluice_agent::bootloader::{AbState, GrubEnv, Slot};
use sluice_protocol::Offer;
use std::sync::{Arc, Mutex};

const PRODUCT: &str = "acme-os";

/// How the stand-in server shapes its resolution answers.
#[derive(Clone, Default)]
pub(crate) struct Answer {
    pub(crate) offer: Option<Offer>,
    pub(crate) downgrade: bool,
    pub(crate) serial: i64,
    /// Sign with these keys instead of the trusted ones.
    pub(crate) foreign_signer: bool,
    /// Echo this nonce instead of the device's.
    pub(crate) nonce: Option<String>,
    /// Seconds until expiry (negative: already expired).
    pub(crate) ttl: i64,
    /// Digests an admin asked the device to try again.
    pub(crate) retry: Vec<String>,
    /// The reboot advice (`None`: reboot any time, no lease).
    pub(crate) reboot: Option<sluice_protocol::RebootAdvice>,
}

pub(crate) struct Fake {
    pub(crate) keys: Keys,
    other: Keys,
    pub(crate) answer: Mutex<Answer>,
    /// Registry blobs served by the responder itself (broken-blob cases).
    blobs: Mutex<Vec<(String, Vec<u8>)>>,
    /// The reboot leases (FleetLock routes).
    pub(crate) leases: Mutex<Leases>,
}

fn start(fake: Arc<Fake>) -> Responder {
    let f = fake.clone();
    Responder::start(Arc::new(move |req: &Request| {
        if let Some(r) = device_routes(req) {
            return r;
        }
        if let Some(r) = f.leases.lock().unwrap().answer(req) {
            return r;
        }
        if req.path.ends_with("/resolve") {
            let a = f.answer.lock().unwrap().clone();
            let mut r = resolution(req, a.offer, a.serial);
            r.downgrade = a.downgrade;
            r.retry = a.retry;
            r.reboot = a.reboot;
            if let Some(nonce) = a.nonce {
                r.nonce = nonce;
            }
            if a.ttl != 0 {
                r.expires_at = r.issued_at + time::Duration::seconds(a.ttl);
            }
            let signer = if a.foreign_signer {
                &f.other.response
            } else {
                &f.keys.response
            };
            return Response::signed(&r, signer);
        }
        for (d, b) in f.blobs.lock().unwrap().iter() {
            if req.path.ends_with(d.as_str()) {
                return Response::plain(200, b.clone());
            }
        }
        Response::plain(404, "not found")
    }))
}

fn fake() -> Arc<Fake> {
    Arc::new(Fake {
        keys: Keys::new(1),
        other: Keys::new(2),
        answer: Mutex::new(Answer {
            serial: 1,
            ..Answer::default()
        }),
        blobs: Mutex::new(Vec::new()),
        leases: Mutex::new(Leases::new()),
    })
}

impl Fake {
    /// A device of `kind` polling the responder `r` that plays this server,
    /// trusting its keys; its health check passes when `healthy`.
    fn device(&self, r: &Responder, healthy: bool, kind: &str) -> Device {
        common::device(
            &r.url,
            PRODUCT,
            &self.keys.key_set(),
            vec![r.host.clone()],
            healthy,
            kind,
        )
    }

    /// `p` offered as `version`, its image signed with the trusted key.
    fn offer(&self, p: &Pushed, version: &str) -> Offer {
        Offer {
            version: version.into(),
            digest: p.digest.clone(),
            image: p.image.clone(),
            size: p.size,
            signature: self.keys.sign_image(&p.digest, PRODUCT, version),
        }
    }

    /// From now on answers with `p` offered as `version`, under a higher
    /// serial, as the server does when a channel moves.
    pub(crate) fn offers(&self, p: &Pushed, version: &str) {
        let mut a = self.answer.lock().unwrap();
        a.offer = Some(self.offer(p, version));
        a.serial += 1;
    }
}

/// What most tests start from: the stand-in server, and a device of `kind`
/// polling it whose health check passes when `healthy`.
pub(crate) struct Stage {
    pub(crate) f: Arc<Fake>,
    pub(crate) r: Responder,
    pub(crate) dev: Device,
}

impl Stage {
    pub(crate) fn new(healthy: bool, kind: &str) -> Stage {
        let f = fake();
        let r = start(f.clone());
        let dev = f.device(&r, healthy, kind);
        Stage { f, r, dev }
    }

    /// A stage whose server offers [`os_layers`], pushed, as 2.0.0; and
    /// that image.
    pub(crate) fn offering(healthy: bool, kind: &str) -> (Stage, Pushed) {
        let s = Stage::new(healthy, kind);
        let pushed = push_image(&os_layers(), None);
        s.f.offers(&pushed, "2.0.0");
        (s, pushed)
    }
}

/// Files and folders owned by root: path, type, mode, content.
type Files<'a> = [(&'a str, tar::EntryType, u32, &'a [u8])];

/// Appends `files` to a test layer.
fn add_files(b: &mut tar::Builder<Vec<u8>>, files: &Files) {
    for (path, kind, mode, data) in files {
        common::tar_entry(b, path, *kind, *mode, 0, data, None);
    }
}

/// Appends `usr/share/doc/f{i}` for each of `docs`, holding `doc {i}`
/// `lines` times.
fn add_docs(b: &mut tar::Builder<Vec<u8>>, docs: impl Iterator<Item = usize>, lines: usize) {
    for i in docs {
        let doc = format!("doc {i}\n").repeat(lines);
        let path = format!("usr/share/doc/f{i}");
        add_files(
            b,
            &[(&path, tar::EntryType::Regular, 0o644, doc.as_bytes())],
        );
    }
}

/// A test OS layer's start: the system entries ([`add_system`]), `etc/`
/// and an `etc/os-release` of `version`.
fn os_base(version: u32) -> tar::Builder<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    add_system(&mut b);
    let release = format!("ID=acme\nVERSION_ID={version}\n");
    let etc: &Files = &[
        ("etc/", tar::EntryType::Directory, 0o755, b""),
        (
            "etc/os-release",
            tar::EntryType::Regular,
            0o644,
            release.as_bytes(),
        ),
    ];
    add_files(&mut b, etc);
    b
}

/// An OS-like image: a base layer, and an upper layer with a whiteout, an
/// opaque directory, a replaced file and owners.
pub(crate) fn os_layers() -> Vec<Layer> {
    use tar::EntryType::*;
    let mut base = os_base(1);
    let files: &Files = &[
        ("etc/old.conf", Regular, 0o600, b"old"),
        ("var/", Directory, 0o755, b""),
        ("var/cache/", Directory, 0o755, b""),
        ("var/cache/junk", Regular, 0o644, b"junk"),
    ];
    add_files(&mut base, files);
    add_docs(&mut base, 0..200, 1);
    let mut upper = tar::Builder::new(Vec::new());
    let files: &Files = &[
        ("etc/.wh.old.conf", Regular, 0o644, b""),
        ("etc/os-release", Regular, 0o644, b"ID=acme\nVERSION_ID=2\n"),
        ("var/cache/", Directory, 0o755, b""),
        ("var/cache/.wh..wh..opq", Regular, 0o644, b""),
        ("var/cache/fresh", Regular, 0o644, b"fresh"),
    ];
    add_files(&mut upper, files);
    [base, upper]
        .map(|b| Layer::from_tar(b.into_inner().unwrap()))
        .into()
}

/// A big image for the kill test: many files and a few MB of noise.
pub(crate) fn big_layers() -> Vec<Layer> {
    let mut layers = os_layers();
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..3000 {
        let data = noise(1024 + (i % 7) * 512, i as u64);
        let path = format!("usr/lib/mod{}/lib{i}.so", i % 50);
        add_files(&mut b, &[(&path, tar::EntryType::Regular, 0o644, &data)]);
    }
    layers.insert(1, Layer::from_tar(b.into_inner().unwrap()));
    layers
}

/// What `umoci raw unpack` makes of the same image in the same registry.
pub(crate) fn umoci_tree(
    p: &Pushed,
) -> std::collections::BTreeMap<std::path::PathBuf, common::Entry> {
    common::umoci_tree(&p.image)
}

/// enroll → update offered → pulled, verified, written to slot B (equal to
/// umoci's unpack of the same image) → grubenv boots B → reboot (GRUB played
/// by the snippet's rules) → healthy → marked good.
#[test]
fn upgrade_into_dir_slot_then_healthy() {
    let (Stage { r, dev, .. }, pushed) = Stage::offering(true, "dir");

    ok(&dev.run(&["enroll"]));
    let out = checked(&dev.run(&["check"]));
    assert!(out.contains("update available: 2.0.0"), "{out}");
    let out = ok(&dev.run(&["apply"]));
    assert!(out.contains("applied 2.0.0"), "{out}");
    assert_eq!(dev.reboots(), 1);
    assert_eq!(
        r.events(),
        ["download_started", "downloaded", "applied", "rebooting"]
    );
    assert_eq!(
        tree(&dev.path("b")),
        umoci_tree(&pushed),
        "slot B differs from umoci's unpack"
    );
    assert_eq!(
        std::fs::read(dev.path("a/factory")).unwrap(),
        b"factory image"
    );
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));

    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]));
    assert_eq!(r.events().last().unwrap(), "healthy");
    let ab = dev.ab();
    assert!(ab.is_ok(Slot::B) && !ab.is_tried(Slot::B));
    assert_eq!(ab.next_boot(), Some(Slot::B));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&dev.run(&["status", "--json"]))).unwrap();
    assert_eq!(status["booted"]["slot"], "B");
    assert_eq!(status["booted"]["version"], "2.0.0");
    assert_eq!(status["booted"]["digest"], pushed.digest.as_str());
    assert_eq!(status["booted"]["boot"], "good");
    assert_eq!(status["rollback"]["slot"], "A", "{status}");
    assert_eq!(status["state"], "idle");
    assert_eq!(status["reboot_pending"], false);
    // Nothing more to do: the device runs the target.
    assert!(ok(&dev.run(&["apply"])).contains("up to date"));
    // A later boot without an update still lands in B.
    assert_eq!(dev.reboot(), Slot::B);
}

/// The same image pushed the way podman, buildah and skopeo push it with
/// zstd (`--dest-compress-format zstd`, and `zstd:chunked`, whose table of
/// contents sits in skippable frames a plain decoder passes over) upgrades
/// to the same tree as its gzip original, one after the other on one device.
#[test]
fn zstd_images_from_skopeo_upgrade_to_the_same_tree() {
    let Stage { f, r, dev } = Stage::new(true, "dir");
    let gzip = push_image(&os_layers(), None);
    let expected = umoci_tree(&gzip);
    ok(&dev.run(&["enroll"]));
    for (major, format) in [(2, "zstd"), (3, "zstd:chunked")] {
        let pushed = common::recompress(&gzip, format);
        let m: serde_json::Value = serde_json::from_slice(&pushed.manifest).unwrap();
        let layers = m["layers"].as_array().unwrap();
        assert!(
            layers
                .iter()
                .all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"),
            "{m}"
        );
        if format == "zstd:chunked" {
            assert!(
                layers[0]["annotations"]["io.containers.zstd-chunked.manifest-checksum"]
                    .is_string(),
                "skopeo wrote no table of contents: {m}"
            );
        }
        let v = format!("{major}.0.0");
        f.offers(&pushed, &v);
        let out = ok(&dev.run(&["apply"]));
        assert!(out.contains(&format!("applied {v}")), "{format}: {out}");
        let slot = dev.reboot();
        assert_eq!(
            tree(&dev.path(&slot.to_string().to_lowercase())),
            expected,
            "{format}: the slot differs from umoci's unpack of the gzip image"
        );
        ok(&dev.run(&["mark-good"]));
        assert_eq!(r.events().last().unwrap(), "healthy", "{format}");
    }
}

/// A failing health check: `failed` reported, B marked bad, reboot; GRUB
/// falls back to A, where the agent reports `rolled_back`.
#[test]
fn failing_health_check_rolls_back() {
    let (Stage { r, dev, .. }, _) = Stage::offering(false, "dir");
    ok(&dev.run(&["apply"]));
    assert_eq!(dev.reboot(), Slot::B);
    refused(&dev.run(&["mark-good"]), "unhealthy");
    assert_eq!(dev.reboots(), 2, "the agent reboots after marking B bad");
    assert_eq!(r.events().last().unwrap(), "failed");
    assert_eq!(dev.reboot(), Slot::A);
    // `run` starts with the boot assessment: A is healthy... but this device's
    // health check always fails, so use the assessment only for the report.
    let _ = dev.run(&["mark-good"]);
    assert!(
        r.events().contains(&"rolled_back".to_string()),
        "{:?}",
        r.events()
    );
    assert!(!dev.ab().is_ok(Slot::B));
    assert_eq!(dev.ab().next_boot(), Some(Slot::A));
}

/// Nothing was made bootable: GRUB still boots A and B is not OK.
fn assert_not_switched(dev: &Device) {
    let ab = dev.ab();
    assert_eq!(ab.next_boot(), Some(Slot::A));
    assert!(!ab.is_ok(Slot::B));
    assert_eq!(dev.reboots(), 0);
}

/// Each attack is refused with a one-line reason and nothing switched.
#[test]
fn attacks_are_refused() {
    let f = fake();
    let r = start(f.clone());
    let pushed = push_image(&os_layers(), None);
    let good = f.offer(&pushed, "2.0.0");
    let set = |a: Answer| *f.answer.lock().unwrap() = a;
    let base = Answer {
        offer: Some(good.clone()),
        serial: 5,
        ..Answer::default()
    };

    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "response signed by another key",
            Answer {
                foreign_signer: true,
                ..base.clone()
            },
            "signature refused",
        ),
        (
            "replayed answer (old nonce)",
            Answer {
                nonce: Some("an-old-nonce-1234".into()),
                ..base.clone()
            },
            "another nonce",
        ),
        (
            "expired answer",
            Answer {
                ttl: -5,
                ..base.clone()
            },
            "expired",
        ),
        (
            "image signed by another key",
            Answer {
                offer: Some(Offer {
                    signature: f.other.sign_image(&pushed.digest, PRODUCT, "2.0.0"),
                    ..good.clone()
                }),
                ..base.clone()
            },
            "image signature refused",
        ),
        (
            "signature for another digest",
            Answer {
                offer: Some(Offer {
                    signature: f.keys.sign_image(
                        &sluice_protocol::sha256_digest(b"other"),
                        PRODUCT,
                        "2.0.0",
                    ),
                    ..good.clone()
                }),
                ..base.clone()
            },
            "image signature refused",
        ),
        (
            "signature for another version",
            Answer {
                offer: Some(Offer {
                    version: "3.0.0".into(),
                    ..good.clone()
                }),
                ..base.clone()
            },
            "image signature refused",
        ),
    ];
    for (what, answer, want) in cases {
        let dev = f.device(&r, true, "dir");
        set(answer);
        let out = dev.run(&["apply"]);
        refused(&out, want);
        assert_not_switched(&dev);
        assert!(
            tree(&dev.path("b")).is_empty(),
            "{what}: slot B was written"
        );
    }

    // A lower serial than one already accepted.
    let dev = f.device(&r, true, "dir");
    set(Answer {
        offer: None,
        serial: 10,
        ..base.clone()
    });
    ok(&dev.run(&["apply"]));
    set(Answer {
        serial: 9,
        ..base.clone()
    });
    refused(&dev.run(&["apply"]), "serial 9 below the 10");
    assert_not_switched(&dev);

    // A downgrade without `downgrade: true`: first move to 2.0.0, then be offered 1.0.0.
    set(Answer {
        serial: 11,
        ..base.clone()
    });
    ok(&dev.run(&["apply"]));
    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]));
    let old = push_image(&os_layers()[..1], None);
    set(Answer {
        offer: Some(f.offer(&old, "1.0.0")),
        serial: 12,
        ..base.clone()
    });
    refused(&dev.run(&["apply"]), "does not say downgrade");
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
    assert!(
        tree(&dev.path("a")).contains_key(std::path::Path::new("factory")),
        "slot A was touched"
    );
    // With `downgrade: true` (a channel rollback) it goes through.
    set(Answer {
        offer: Some(f.offer(&old, "1.0.0")),
        serial: 12,
        downgrade: true,
        ..base.clone()
    });
    ok(&dev.run(&["apply"]));
    assert_eq!(dev.ab().next_boot(), Some(Slot::A));
}

/// Blobs that lie: bytes that do not hash to the digest, a blob longer than
/// its manifest declares. The responder plays the registry for these.
#[test]
fn broken_blobs_are_refused() {
    let f = fake();
    let r = start(f.clone());
    let layers = os_layers();
    for (what, tamper) in [("digest", 0), ("longer", 1)] {
        let gz = layers[0].gz.clone();
        let digest = sluice_protocol::sha256_digest(&gz);
        let (served, declared) = match tamper {
            0 => {
                let mut b = gz.clone();
                let n = b.len();
                b[n - 10] ^= 0xff;
                (b, gz.len())
            }
            _ => {
                let mut b = gz.clone();
                b.extend_from_slice(&[0u8; 4096]);
                (b, gz.len())
            }
        };
        // When longer: the digest is of the declared prefix, the extra bytes follow.
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let cdigest = sluice_protocol::sha256_digest(&config);
        let manifest = common::manifest(&config, &[(&digest, declared)]);
        let mdigest = sluice_protocol::sha256_digest(&manifest);
        *f.blobs.lock().unwrap() = vec![
            (mdigest.clone(), manifest),
            (cdigest, config),
            (digest.clone(), served),
        ];
        let pushed = Pushed {
            repository: "acme/os".into(),
            image: format!("{}/acme/os@{mdigest}", r.host),
            digest: mdigest,
            size: declared as u64,
            manifest: vec![],
        };
        *f.answer.lock().unwrap() = Answer {
            offer: Some(f.offer(&pushed, "2.0.0")),
            serial: 1,
            ..Answer::default()
        };
        let dev = f.device(&r, true, "dir");
        let out = dev.run(&["apply"]);
        refused(
            &out,
            if tamper == 0 {
                "hash to"
            } else {
                "longer than its declared"
            },
        );
        assert_not_switched(&dev);
        assert!(r.events().contains(&"failed".to_string()), "{what}");
    }
}

/// The agent is killed with SIGKILL at random moments of pull, unpack and
/// the grubenv write. Every time: slot A untouched, the grubenv whole, and
/// GRUB boots either A or a complete B. The next `apply` finishes.
#[test]
fn interrupted_upgrades_never_tear_anything() {
    let f = fake();
    let r = start(f.clone());
    let pushed = push_image(&big_layers(), None);
    f.offers(&pushed, "2.0.0");
    let expected = umoci_tree(&pushed);

    // How long one apply takes here.
    let probe = f.device(&r, true, "dir");
    let t0 = std::time::Instant::now();
    ok(&probe.run(&["apply"]));
    let mut full = t0.elapsed();
    assert_eq!(tree(&probe.path("b")), expected);

    let mut dev = f.device(&r, true, "dir");
    let a_before = tree(&dev.path("a"));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    for _ in 0..25 {
        if dev.ab().trial() == Some(Slot::B) {
            // The last run finished and awaits its reboot: a staged device
            // writes nothing more, so go on with a fresh one.
            dev = f.device(&r, true, "dir");
        }
        let at = full.mul_f64((xorshift(&mut seed) % 1000) as f64 / 1000.0);
        let started = std::time::Instant::now();
        if apply_killed_after(&dev, at) {
            kills += 1;
        } else {
            // A run that finished before its moment shows an apply is
            // quicker than the probe was (a cold first run): aim the next
            // kills within the quicker time, so most runs are cut.
            full = full.min(started.elapsed());
        }
        assert_eq!(tree(&dev.path("a")), a_before, "the active slot changed");
        let env = dev.grubenv();
        if let Some(env) = env {
            assert_eq!(env.len(), 1024);
            let ab = AbState::from_env(&GrubEnv::parse(&env).expect("grubenv torn"));
            match ab.next_boot() {
                Some(Slot::A) => {}
                Some(Slot::B) => assert_eq!(
                    tree(&dev.path("b")),
                    expected,
                    "GRUB would boot a half-written B"
                ),
                None => panic!("no bootable slot"),
            }
        }
    }
    assert!(kills >= 10, "only {kills} runs were killed");
    // The next apply finishes the upgrade (or it already did).
    let _ = dev.run(&["apply"]);
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
    assert_eq!(dev.ab().trial(), Some(Slot::B));
    assert_eq!(tree(&dev.path("b")), expected);
}

/// The `image` slot kind: an ext4 image built with `mkfs.ext4 -d`, no mount.
#[test]
fn upgrade_into_image_slot() {
    let (Stage { dev, .. }, _) = Stage::offering(true, "image");
    ok(&dev.run(&["apply"]));
    let img = dev.path("b.img");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/os-release"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ID=acme\nVERSION_ID=2\n"
    );
    let out = std::process::Command::new("debugfs")
        .args(["-R", "stat /usr/bin/su"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Mode:  04755"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
}

/// Reads the daemon's standard error until a line holds `want`; panics with
/// everything it said if it exits first.
/// Waits `at`, then SIGKILLs `child` unless it has ended; answers whether
/// it was killed. Either way the child is reaped.
pub(crate) fn kill_after(child: &mut std::process::Child, at: std::time::Duration) -> bool {
    std::thread::sleep(at);
    let running = child.try_wait().unwrap().is_none();
    if running {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(child),
            rustix::process::Signal::KILL,
        )
        .unwrap();
    }
    let _ = child.wait();
    running
}

pub(crate) fn wait_for_line(child: &mut std::process::Child, want: &str) -> String {
    use std::io::BufRead;
    let err = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    // Drains the pipe to the end, so the daemon never writes into a closed one.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut said = String::new();
    // Only a guard against a hang: the daemon prints or exits long before.
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(120)) {
        said.push_str(&line);
        said.push('\n');
        if line.contains(want) {
            return said;
        }
    }
    let _ = child.kill();
    panic!("the daemon never said {want:?}; it said:\n{said}");
}

/// Runs `apply` on `dev` and SIGKILLs it after `at` unless it has ended;
/// answers whether it was killed.
fn apply_killed_after(dev: &Device, at: std::time::Duration) -> bool {
    let mut child = dev
        .command(&["apply"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kill_after(&mut child, at)
}

/// Starts the daemon on `dev`, sees it wait for the reboot, and stops it.
fn daemon_waits_for_the_reboot(dev: &Device) {
    let mut daemon = dev
        .command(&["run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&mut daemon, "waiting for the reboot");
    assert!(stop(&mut daemon).success());
}

/// Stops a daemon with SIGTERM and answers its exit status.
pub(crate) fn stop(child: &mut std::process::Child) -> std::process::ExitStatus {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    child.wait().unwrap()
}

/// Issue 11, item 1: slot B, on its one try, fails its health check while
/// the channel already offers a newer release, and the reboot command
/// returns (as `systemctl reboot` does, before the machine goes down).
/// Until the machine has rebooted the agent writes nothing: slot A, the
/// only good slot, keeps its release and stays GRUB's choice; `apply`
/// refuses and the daemon only waits. After the reboot (GRUB falls back to
/// A) the newer release goes into B as usual.
#[test]
fn failed_trial_waits_for_its_reboot() {
    let (Stage { f, r, dev }, _) = Stage::offering(false, "dir");
    let v3 = push_image(&os_layers()[..1], None);
    ok(&dev.run(&["apply"]));
    assert_eq!(dev.reboot(), Slot::B);
    // The channel moves on while B boots.
    f.offers(&v3, "3.0.0");
    let a_before = tree(&dev.path("a"));

    refused(&dev.run(&["mark-good"]), "unhealthy");
    assert_eq!(dev.reboots(), 2, "the assessment asked for the reboot");
    refused(&dev.run(&["apply"]), "waiting for the reboot");
    daemon_waits_for_the_reboot(&dev);

    assert_eq!(tree(&dev.path("a")), a_before, "slot A was written");
    let env = dev.ab();
    assert!(env.is_ok(Slot::A) && !env.is_ok(Slot::B), "{env:?}");
    assert_eq!(env.next_boot(), Some(Slot::A));
    let downloads = r
        .events()
        .iter()
        .filter(|e| *e == "download_started")
        .count();
    assert_eq!(downloads, 1, "a download began before the reboot");

    // The machine goes down at last; GRUB falls back to A.
    assert_eq!(dev.reboot(), Slot::A);
    let _ = dev.run(&["mark-good"]);
    assert!(r.events().contains(&"rolled_back".to_string()));
    let out = ok(&dev.run(&["apply"]));
    assert!(out.contains("applied 3.0.0"), "{out}");
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
    assert_eq!(tree(&dev.path("a")), a_before);
}

/// A reboot asked for after staging is awaited too: a second `apply` in the
/// same boot, offered a newer release, does not rewrite the staged slot,
/// and the daemon started then only waits.
#[test]
fn staged_update_waits_for_its_reboot() {
    let (Stage { f, dev, .. }, _) = Stage::offering(true, "dir");
    let v3 = push_image(&os_layers()[..1], None);
    ok(&dev.run(&["apply"]));
    let b_staged = tree(&dev.path("b"));
    f.offers(&v3, "3.0.0");
    refused(&dev.run(&["apply"]), "waiting for the reboot");
    // What a person reading `status` sees meanwhile.
    let text = ok(&dev.run(&["status"]));
    for line in [
        "booted:   slot A (unknown image) (good)",
        "staged:   slot B 2.0.0 (trial)",
        "state:    staged (waiting for the reboot)",
        "keys:     the keys file (no signed key list fetched yet)",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing: {text}");
    }
    daemon_waits_for_the_reboot(&dev);
    assert_eq!(
        tree(&dev.path("b")),
        b_staged,
        "the staged slot was rewritten"
    );
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&dev.run(&["status", "--json"]))).unwrap();
    assert_eq!(status["booted"]["version"], "2.0.0", "{status}");
}

/// A power cut while the only good slot boots (before its assessment ran)
/// leaves it bootable: GRUB spends a try only on a slot on trial. Before,
/// every boot set `A_TRY=1` and a second boot found nothing to boot.
#[test]
fn power_cuts_while_the_good_slot_boots_never_leave_nothing_to_boot() {
    let Stage { f, dev, .. } = Stage::new(true, "dir");
    for _ in 0..3 {
        assert_eq!(dev.reboot(), Slot::A);
    }
    let pushed = push_image(&os_layers(), None);
    f.offers(&pushed, "2.0.0");
    ok(&dev.run(&["apply"]));
    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]));
    for _ in 0..3 {
        assert_eq!(dev.reboot(), Slot::B);
    }
}

/// Issue 11, item 4: the files the agent writes (state, token, grubenv) are
/// never readable by others, even under umask 0, and a link planted where
/// the temporary copy goes is not followed: the token is not written
/// through it and the state file does not become a link.
#[test]
fn state_files_are_private_and_links_are_not_followed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (Stage { dev, .. }, _) = Stage::offering(true, "dir");
    let outside = dev.path("outside");
    std::os::unix::fs::symlink(&outside, dev.path("state/.device.json.sluice-new")).unwrap();
    std::os::unix::fs::symlink(&outside, dev.path(".grubenv.sluice-new")).unwrap();
    let agent = env!("CARGO_BIN_EXE_sluice-agent");
    let under_umask_0 = |cmd: &str| {
        std::process::Command::new("sh")
            .args(["-c", "umask 000; exec \"$0\" --config \"$1\" \"$2\""])
            .arg(agent)
            .arg(&dev.config)
            .arg(cmd)
            .output()
            .unwrap()
    };
    ok(&under_umask_0("enroll"));
    ok(&under_umask_0("apply"));
    assert!(!outside.exists(), "a planted link was followed");
    for p in [
        dev.path("state/device.json"),
        dev.path("state/state.json"),
        dev.path("grubenv"),
    ] {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.is_file(), "{} is not a regular file", p.display());
        assert_eq!(
            m.permissions().mode() & 0o777,
            0o600,
            "{} is not private",
            p.display()
        );
        assert_eq!(m.nlink(), 1);
    }
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dev.path("state/device.json")).unwrap()).unwrap();
    assert_eq!(creds["token"], "tok-1");
}

/// `--version` and `--help` answer without a configuration; a wrong word is
/// refused with the usage line.
#[test]
fn version_and_help_need_no_configuration() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
            .args(args)
            .env("SLUICE_AGENT_CONFIG", "/nonexistent/agent.toml")
            .output()
            .unwrap()
    };
    let v = ok(&run(&["--version"]));
    assert_eq!(
        v.trim(),
        format!(
            "sluice-agent {} (wire {})",
            env!("CARGO_PKG_VERSION"),
            sluice_protocol::WIRE_VERSION
        )
    );
    assert_eq!(ok(&run(&["-V"])), v);
    let help = ok(&run(&["--help"]));
    for cmd in [
        "run",
        "check",
        "apply",
        "status",
        "mark-good",
        "rollback",
        "clear-failed",
        "enroll",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "{cmd} missing from --help: {help}"
        );
    }
    refused(&run(&["--frobnicate"]), "usage: sluice-agent");
    refused(&run(&["status"]), "/nonexistent/agent.toml");
}

/// What the device told the fake server it cleared, in order.
fn cleared(r: &Responder) -> Vec<serde_json::Value> {
    r.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|q| q.path.ends_with("/failures/cleared"))
        .map(|q| serde_json::from_slice(&q.body).unwrap())
        .collect()
}

/// `mark-good` run after `apply` but before any reboot (the boot-assessment
/// service started by hand, or a `dir` device whose "reboot" did nothing):
/// nothing booted the new slot, so nothing is assessed and nothing fails.
/// Before, it recorded `rolled_back` and put the release on the failed list
/// for good.
#[test]
fn mark_good_before_the_reboot_assesses_nothing() {
    let (Stage { r, dev, .. }, _) = Stage::offering(true, "dir");
    let out = checked(&dev.run(&["check"]));
    assert!(out.contains("update available: 2.0.0"), "{out}");
    ok(&dev.run(&["apply"]));
    for _ in 0..2 {
        let out = ok(&dev.run(&["mark-good"]));
        assert!(
            out.contains("nothing to assess: waiting for the reboot"),
            "{out}"
        );
    }
    let events = r.events();
    assert!(
        !events.iter().any(|e| e == "rolled_back" || e == "failed"),
        "{events:?}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(&dev.run(&["status", "--json"]))).unwrap();
    assert_eq!(status["state"], "staged", "{status}");
    assert_eq!(status["reboot_pending"], true, "{status}");
    assert!(!ok(&dev.run(&["status"])).contains("failed:"));
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
    // The reboot comes: B is assessed and kept.
    assert_eq!(dev.reboot(), Slot::B);
    assert!(ok(&dev.run(&["mark-good"])).contains("slot B is good"));
    assert_eq!(r.events().last().map(String::as_str), Some("healthy"));
    assert!(checked(&dev.run(&["check"])).contains("up to date"));
}

/// A release that failed here is held back until cleared: `check` says so
/// (exit 0, not 100), `apply` skips it; `clear-failed` on the device, or an
/// admin's `retry` carried by a signed answer, clears it, and the server is
/// told which and by whom. A forged answer's `retry` clears nothing.
#[test]
fn a_failed_release_is_held_back_until_cleared() {
    let (Stage { f, r, dev }, v2) = Stage::offering(false, "dir");
    let fail_once = || {
        ok(&dev.run(&["apply"]));
        assert_eq!(dev.reboot(), Slot::B);
        refused(&dev.run(&["mark-good"]), "unhealthy");
        assert_eq!(dev.reboot(), Slot::A);
        ok(&dev.run(&["mark-good"]));
    };
    fail_once();
    let held = |dev: &Device| {
        let out = checked(&dev.run(&["check"]));
        assert!(
            out.contains("offered 2.0.0") && out.contains("failed its boot assessment"),
            "{out}"
        );
        assert!(ok(&dev.run(&["apply"])).contains("not applying 2.0.0"));
        assert!(
            ok(&dev.run(&["status"])).contains(&format!("failed:   {}", v2.digest)),
            "status lists the held-back digest"
        );
    };
    held(&dev);
    let reboots = dev.reboots();

    // Not on the list: refused, nothing cleared.
    let other = format!("sha256:{}", "0".repeat(64));
    refused(
        &dev.run(&["clear-failed", &other]),
        "is not on this device's failed list",
    );
    assert!(cleared(&r).is_empty());

    // Cleared on the device: the next apply installs it again.
    let out = ok(&dev.run(&["clear-failed", &v2.digest]));
    assert!(out.contains(&format!("cleared {}", v2.digest)), "{out}");
    assert_eq!(
        cleared(&r),
        [serde_json::json!({"digests": [v2.digest], "by": "local"})]
    );
    assert!(ok(&dev.run(&["clear-failed"])).contains("nothing to clear"));
    assert_eq!(cleared(&r).len(), 1, "nothing cleared, nothing told");
    assert!(checked(&dev.run(&["check"])).contains("update available: 2.0.0"));
    fail_once();
    assert!(dev.reboots() > reboots, "installed again");
    held(&dev);

    // A `retry` in an answer signed by someone else: refused, still held.
    {
        let mut a = f.answer.lock().unwrap();
        a.retry = vec![v2.digest.clone()];
        a.foreign_signer = true;
        a.serial += 1;
    }
    let _ = dev.run(&["check"]);
    f.answer.lock().unwrap().foreign_signer = false;
    assert_eq!(cleared(&r).len(), 1);
    // Signed: the admin's retry clears it and is confirmed to the server.
    let out = checked(&dev.run(&["check"]));
    assert!(out.contains("update available: 2.0.0"), "{out}");
    assert_eq!(
        cleared(&r).last().unwrap(),
        &serde_json::json!({"digests": [v2.digest], "by": "admin"})
    );
}

// ------------------------------------------------------------ partial pulls

/// What the proxy between the agent and the registry does to answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tamper {
    /// Passes everything, counting the body bytes.
    None,
    /// Drops the `Range` header: the registry answers 200 with the whole blob.
    NoRanges,
    /// Rewrites `Content-Range` of every 206 to another range.
    WrongContentRange,
    /// Flips a byte in the middle of every 206 body of more than 64 bytes
    /// (the table of contents excepted: its digest would refuse it).
    FlipByte,
    /// Sends every 206 body one byte short (with a matching length).
    Short,
    /// Answers everything correctly, 150 ms late (so a pull lasts long
    /// enough to be killed in the middle).
    Slow,
    /// Answers a request for several ranges with 200 and the whole blob,
    /// as registries behind stores without multi-range support do; single
    /// ranges as asked.
    SingleRangesOnly,
}

/// An HTTP proxy in front of the real registry, as a mirror the agent is
/// told to pull from; counts the body bytes it passes and tampers as told.
struct Proxy {
    addr: String,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    ranges: Arc<std::sync::atomic::AtomicU64>,
    tamper: Arc<Mutex<Tamper>>,
}

impl Proxy {
    fn start() -> Proxy {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ranges = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tamper = Arc::new(Mutex::new(Tamper::None));
        let (b, r, t) = (bytes.clone(), ranges.clone(), tamper.clone());
        std::thread::spawn(move || {
            let upstream = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end().to_string();
                    if h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.push((k.trim().to_lowercase(), v.trim().to_string()));
                    }
                }
                let mode = *t.lock().unwrap();
                if mode == Tamper::Slow {
                    std::thread::sleep(std::time::Duration::from_millis(150));
                }
                let mut req = upstream.get(&format!("http://{}{path}", registry()));
                let several = headers.iter().any(|(k, v)| k == "range" && v.contains(','));
                for (k, v) in &headers {
                    if k == "accept"
                        || k == "authorization"
                        || (k == "range"
                            && mode != Tamper::NoRanges
                            && !(mode == Tamper::SingleRangesOnly && several))
                    {
                        req = req.header(k.as_str(), v.as_str());
                    }
                }
                let resp = req.call().unwrap();
                let status = resp.status().as_u16();
                let get = |k: &str| {
                    resp.headers()
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let (ctype, crange, dcd) = (
                    get("content-type"),
                    get("content-range"),
                    get("docker-content-digest"),
                );
                let mut body = resp
                    .into_body()
                    .with_config()
                    .limit(1 << 30)
                    .read_to_vec()
                    .unwrap();
                let mut crange = crange;
                let multipart = ctype
                    .as_deref()
                    .is_some_and(|c| c.starts_with("multipart/byteranges"));
                if status == 206 {
                    r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match mode {
                        Tamper::WrongContentRange if multipart => {
                            // The first part's range, moved by one byte.
                            let text = String::from_utf8_lossy(&body).into_owned();
                            let at = text.find("Content-Range: bytes ").unwrap() + 21;
                            let dash = at + text[at..].find('-').unwrap();
                            let first: u64 = text[at..dash].parse().unwrap();
                            let moved = (first + 1).to_string();
                            body.splice(at..dash, moved.into_bytes());
                        }
                        Tamper::WrongContentRange => {
                            crange = Some(format!("bytes 0-{}/{}", body.len() - 1, body.len()));
                        }
                        Tamper::FlipByte if body.len() > 64 => {
                            let mid = body.len() / 2;
                            body[mid] ^= 0x5a;
                        }
                        Tamper::Short if multipart => {
                            // The last part one byte short; the closing
                            // boundary follows at once.
                            let end = body.windows(4).rposition(|w| w == b"\r\n--").unwrap();
                            body.remove(end - 1);
                        }
                        Tamper::Short => {
                            body.pop();
                        }
                        _ => {}
                    }
                }
                b.fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in [
                    ("Content-Type", ctype),
                    ("Content-Range", crange),
                    ("Docker-Content-Digest", dcd),
                ] {
                    if let Some(v) = v {
                        head += &format!("{k}: {v}\r\n");
                    }
                }
                head += "\r\n";
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            }
        });
        Proxy {
            addr,
            bytes,
            ranges,
            tamper,
        }
    }

    fn set(&self, t: Tamper) {
        *self.tamper.lock().unwrap() = t;
    }

    /// Body bytes and range answers since the last call.
    fn take(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.bytes.swap(0, Relaxed), self.ranges.swap(0, Relaxed))
    }
}

/// An OS-like tree as one squashed layer: 300 small files, 24 libraries of
/// 40 KiB of noise, a symlink, a hard link, an owner, a set-id binary and
/// an xattr. `version` 2 rewrites two libraries and os-release, adds two
/// files and drops one: a package update.
fn os_tree(version: u32) -> Layer {
    use tar::EntryType::*;
    let mut b = os_base(version);
    add_files(&mut b, &[("usr/lib/", Directory, 0o755, b"")]);
    for i in 0..24u64 {
        let seed = if version >= 2 && (i == 3 || i == 17) {
            i + 1000
        } else {
            i
        };
        let path = format!("usr/lib/lib{i}.so");
        add_files(&mut b, &[(&path, Regular, 0o755, &noise(40 << 10, seed))]);
    }
    add_docs(&mut b, (0..300).filter(|i| version < 2 || *i != 7), 20);
    if version >= 2 {
        let files: &Files = &[
            ("usr/bin/new-tool", Regular, 0o755, &noise(30 << 10, 77)),
            ("etc/new.conf", Regular, 0o644, b"new=1\n"),
        ];
        add_files(&mut b, files);
    }
    // A file with an xattr and an old mtime.
    b.append_pax_extensions([("SCHILY.xattr.user.sluice", &b"labelled"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(Regular);
    h.set_mode(0o640);
    h.set_mtime(1_000_000_000);
    h.set_size(4);
    b.append_data(&mut h, "etc/labelled", &b"xatt"[..]).unwrap();
    Layer::from_tar(b.into_inner().unwrap())
}

/// What `tree` leaves out of an entry: modification time, link count, xattrs.
type Meta = (i64, u64, Vec<(String, Vec<u8>)>);

/// What `tree` leaves out, by path.
fn meta_tree(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Meta> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    for path in tree(dir).into_keys() {
        let full = dir.join(&path);
        let m = std::fs::symlink_metadata(&full).unwrap();
        let mut names = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(&full, &mut names[..]).unwrap_or(0);
        let mut xattrs = Vec::new();
        for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            let mut v = vec![0u8; 4096];
            let len = rustix::fs::lgetxattr(&full, name.as_str(), &mut v[..]).unwrap();
            v.truncate(len);
            xattrs.push((name, v));
        }
        xattrs.sort();
        let mtime = if m.is_dir() { 0 } else { m.mtime() };
        out.insert(path, (mtime, m.nlink(), xattrs));
    }
    out
}

/// What a successful run printed and logged (stdout, then stderr).
fn ok_logged(out: &std::process::Output) -> String {
    ok(out) + &String::from_utf8_lossy(&out.stderr)
}

/// A device at v1 (a `zstd:chunked` image written through the proxy,
/// booted and good), and v2 pushed the same way.
struct PartialCase {
    f: Arc<Fake>,
    _r: Responder,
    proxy: Proxy,
    dev: Device,
    v2: Pushed,
    v2_gzip: Pushed,
    v1_bytes: u64,
}

fn partial_case() -> PartialCase {
    let Stage { f, r, dev } = Stage::new(true, "dir");
    let proxy = Proxy::start();
    let v1 = common::recompress(&push_image(&[os_tree(1)], None), "zstd:chunked");
    let v2_gzip = push_image(&[os_tree(2)], None);
    let v2 = common::recompress(&v2_gzip, "zstd:chunked");
    // The registry is reached through the counting proxy.
    dev.edit_config(|c| {
        c.registry.mirrors.insert(registry(), proxy.addr.clone());
        c.registry.insecure.push(proxy.addr.clone());
    });
    ok(&dev.run(&["enroll"]));
    f.offers(&v1, "1.0.0");
    let out = ok_logged(&dev.run(&["apply"]));
    // Nothing to copy from the factory slot: every file is fetched.
    assert!(
        out.contains("partial pull: 0 files (0 bytes) copied from slot A"),
        "{out}"
    );
    let (v1_bytes, _) = proxy.take();
    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]));
    assert!(
        dev.path("state/contents-B.json").exists(),
        "no index of slot B"
    );
    PartialCase {
        f,
        _r: r,
        proxy,
        dev,
        v2,
        v2_gzip,
        v1_bytes,
    }
}

impl PartialCase {
    /// Offers v2 and applies it through the proxy tampering as `tamper`
    /// says; answers the agent's output, the bytes and range answers the
    /// proxy passed, and how long the apply took.
    fn apply_v2(&self, tamper: Tamper) -> (String, u64, u64, std::time::Duration) {
        self.proxy.set(tamper);
        self.f.offers(&self.v2, "2.0.0");
        let t0 = std::time::Instant::now();
        let out = ok_logged(&self.dev.run(&["apply"]));
        let took = t0.elapsed();
        assert!(out.contains("applied 2.0.0"), "{out}");
        let (bytes, ranges) = self.proxy.take();
        assert_eq!(self.dev.reboot(), Slot::A);
        assert_eq!(
            tree(&self.dev.path("a")),
            umoci_tree(&self.v2_gzip),
            "slot A differs from umoci's unpack of v2"
        );
        (out, bytes, ranges, took)
    }
}

/// v1 → v2 as a partial pull: only the changed and new files are fetched
/// (in a few coalesced range requests), the rest is copied from the
/// running slot, and the slot equals umoci's unpack of v2; the index of
/// the new slot is written, and that of the slot being written is gone
/// while it is written.
#[test]
fn a_partial_pull_fetches_only_what_changed() {
    let c = partial_case();
    let layer = c.v2.size;
    let (out, bytes, ranges, _) = c.apply_v2(Tamper::None);
    assert!(!out.contains("partial pull failed"), "{out}");
    assert!(
        out.contains("partial pull: 324 files")
            && out.contains("copied from slot B, 5 files fetched"),
        "{out}"
    );
    // Five files (two libraries and a tool of 40 and 30 KiB of noise, two
    // small ones) and the table of contents; the layer is over 1 MB.
    assert!(
        bytes < layer / 5 && bytes < c.v1_bytes / 5,
        "fetched {bytes} bytes of a {layer}-byte layer (v1 took {})",
        c.v1_bytes
    );
    // The table, then the four groups of neighbouring files in one
    // multi-range request.
    assert!(
        out.contains("in 4 ranges") && ranges == 2,
        "{ranges} range answers: {out}"
    );
    assert!(c.dev.path("state/contents-A.json").exists());

    // Times, hard links and xattrs too: the same as a full pull of v2 by a
    // device that does not pull partially.
    let full = c.f.device(&c._r, true, "dir");
    full.edit_config(|c| c.registry.partial_pulls = false);
    ok(&full.run(&["enroll"]));
    let out = ok_logged(&full.run(&["apply"]));
    assert!(!out.contains("partial pull"), "{out}");
    assert_eq!(tree(&full.path("b")), tree(&c.dev.path("a")));
    let partial = meta_tree(&c.dev.path("a"));
    assert_eq!(meta_tree(&full.path("b")), partial);
    assert_eq!(
        partial[std::path::Path::new("etc/labelled")],
        (
            1_000_000_000,
            1,
            vec![("user.sluice".to_string(), b"labelled".to_vec())]
        )
    );
    assert_eq!(
        partial[std::path::Path::new("usr/bin/sudo")].1,
        2,
        "a hard link"
    );
}

/// A registry that serves single ranges but answers a request for several
/// with the whole blob: the agent asks for one range at a time, and the
/// pull stays partial.
#[test]
fn a_registry_without_multi_range_answers_gets_one_range_per_request() {
    let c = partial_case();
    let (out, _, ranges, _) = c.apply_v2(Tamper::SingleRangesOnly);
    assert!(!out.contains("partial pull failed"), "{out}");
    assert!(out.contains("one range per request"), "{out}");
    // The table, then the four ranges one by one.
    assert_eq!(ranges, 5, "{out}");
}

/// A registry or proxy that ignores ranges, names the wrong range, serves
/// corrupt or short ranges, or a running slot whose file changed behind the
/// index: the agent falls back to pulling the whole layer, and the slot is
/// still exactly v2.
#[test]
fn a_partial_pull_that_cannot_be_trusted_falls_back_to_a_full_one() {
    for tamper in [
        Tamper::NoRanges,
        Tamper::WrongContentRange,
        Tamper::FlipByte,
        Tamper::Short,
    ] {
        let c = partial_case();
        let (out, bytes, _, _) = c.apply_v2(tamper);
        assert!(
            out.contains("pulling it whole") || out.contains("partial pull failed"),
            "{tamper:?}: {out}"
        );
        assert!(bytes >= c.v2.size, "{tamper:?}: only {bytes} bytes fetched");
    }
    // A file in the running slot that no longer holds what the index says
    // (same size, other bytes): copying it fails its digest.
    let c = partial_case();
    let lib = c.dev.path("b/usr/lib/lib5.so");
    let mut bytes = std::fs::read(&lib).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&lib, bytes).unwrap();
    let (out, _, _, _) = c.apply_v2(Tamper::None);
    assert!(out.contains("partial pull failed"), "{out}");
    assert!(
        out.contains("usr/lib/lib5.so") || out.contains("hash"),
        "{out}"
    );
}

/// A partial pull killed (SIGKILL) at random moments: the running slot and
/// its index never change, the slot being written has no index until it is
/// whole (so nothing is ever copied from a half-written slot), GRUB never
/// boots it half-written, and the next run completes the upgrade, partially
/// again.
#[test]
fn a_killed_partial_pull_never_leaves_an_index_of_a_half_written_slot() {
    let c = partial_case();
    // How long a partial pull takes through a slow registry: the kills
    // fall within it.
    let (_, _, _, full) = c.apply_v2(Tamper::Slow);
    ok(&c.dev.run(&["mark-good"]));
    let v3_gzip = push_image(&[os_tree(3)], None);
    let v3 = common::recompress(&v3_gzip, "zstd:chunked");
    let expected = umoci_tree(&v3_gzip);
    let a_before = tree(&c.dev.path("a"));
    let b_before = tree(&c.dev.path("b"));
    let index_a = std::fs::read(c.dev.path("state/contents-A.json")).unwrap();
    c.f.offers(&v3, "3.0.0");

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    for _ in 0..12 {
        if c.dev.ab().trial() == Some(Slot::B) {
            break;
        }
        let at = full.mul_f64((xorshift(&mut seed) % 400) as f64 / 1000.0);
        // v3 differs from v2 in fewer files than v2 from v1: its pull is
        // shorter than the one measured.
        if apply_killed_after(&c.dev, at) {
            kills += 1;
        }
        assert_eq!(tree(&c.dev.path("a")), a_before, "the running slot changed");
        assert_eq!(
            std::fs::read(c.dev.path("state/contents-A.json")).unwrap(),
            index_a,
            "the running slot's index changed"
        );
        // An index of B says what B holds: v1 still (killed before B was
        // touched) or v3 whole, never anything between.
        if c.dev.path("state/contents-B.json").exists() {
            let b = tree(&c.dev.path("b"));
            assert!(
                b == b_before || b == expected,
                "an index describes a half-written slot B"
            );
        }
        if c.dev.ab().next_boot() == Some(Slot::B) {
            assert_eq!(
                tree(&c.dev.path("b")),
                expected,
                "GRUB would boot a half-written B"
            );
        }
    }
    assert!(kills >= 3, "only {kills} runs were killed");
    if c.dev.ab().trial() != Some(Slot::B) {
        let out = ok_logged(&c.dev.run(&["apply"]));
        assert!(out.contains("copied from slot A"), "{out}");
    }
    assert_eq!(c.dev.ab().trial(), Some(Slot::B));
    assert_eq!(tree(&c.dev.path("b")), expected);
    assert!(c.dev.path("state/contents-B.json").exists());
}

/// Replaces the device's health check with `sh -c SCRIPT`.
fn set_health(dev: &Device, script: &str) {
    dev.edit_config(|c| c.boot.health_checks = vec![vec!["sh".into(), "-c".into(), script.into()]]);
}

/// At boot systemd starts the boot-assessment service (`mark-good`) and the
/// daemon (`run`) together, and both assess a slot on trial. The state
/// folder's lock makes one wait for the other, which then reads the state
/// the first left: the slot is assessed once, `healthy` reported once.
#[test]
fn the_boot_assessment_and_the_daemon_assess_a_trial_once() {
    let (Stage { r, dev, .. }, _) = Stage::offering(true, "dir");
    ok(&dev.run(&["apply"]));
    assert_eq!(dev.reboot(), Slot::B);
    // Checks that take a while, as `systemctl is-system-running --wait` does.
    set_health(&dev, "sleep 2");
    let assessment = dev
        .command(&["mark-good"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = dev.path("daemon.log");
    let mut daemon = dev
        .command(&["run"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let out = assessment.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // `status` takes the lock after the daemon's assessment and first turn.
    ok(&dev.run(&["status"]));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(stop(&mut daemon).success());
    let said = std::fs::read_to_string(&log).unwrap();
    let mark_good = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("waiting for another sluice-agent command")
            || mark_good.contains("waiting for another sluice-agent command"),
        "neither waited for the other:\n{said}\n{mark_good}"
    );
    let healthy = r.events().iter().filter(|e| *e == "healthy").count();
    assert_eq!(healthy, 1, "{:?}", r.events());
    assert!(dev.ab().is_known_good(Slot::B));
}

/// A command killed while it holds the lock (a power cut, an OOM kill)
/// leaves nothing held: the kernel drops the lock with the process.
#[test]
fn a_killed_command_never_leaves_the_state_locked() {
    let Stage { dev, .. } = Stage::new(true, "dir");
    ok(&dev.run(&["status"]));
    set_health(&dev, "sleep 60");
    let mut holder = dev
        .command(&["mark-good"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `status` waits while `mark-good` runs its check...
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut waiting = dev
        .command(&["status"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(waiting.try_wait().unwrap().is_none(), "status did not wait");
    // ... and finishes once it is killed.
    assert!(kill_after(&mut holder, std::time::Duration::ZERO));
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting for another sluice-agent command"),
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("booted:"),
        "{out:?}"
    );
}
