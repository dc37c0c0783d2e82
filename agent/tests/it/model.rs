//! Model-based test of a whole device: the real `Device` and `Daemon`
//! (in-process, built with the `failpoints` feature) on a simulated machine
//! (two `dir` slots, a grubenv played by `bootloader::boot`, which
//! `grubenv.rs` checks against the shipped `grub/sluice.cfg` run by GRUB, a
//! boot id, a reboot command that returns) against a stand-in server that
//! signs like the real one and a stand-in registry serving by digest.
//!
//! Random sequences of: server answers (a new release, the same one, an older
//! one with or without `downgrade`, revoked, forged, an image signature for
//! another digest, a registry that lies about a blob, a server that is down,
//! a replayed answer), each with reboot advice (none, a closed or an open
//! maintenance window, a reboot lease with or without room), under a
//! reboot policy per sequence (`window`, `immediate`, `manual` with
//! `sluice-agent reboot` now and then), reboots with healthy or unhealthy
//! checks, agent restarts, `rollback`, and crashes at any durable write,
//! slot write or command, each followed by a restart in the same boot or a
//! power cut. After every step:
//! - GRUB boots a known-good slot, or a slot on trial whose fallback (once
//!   its try is spent) is known good;
//! - every slot GRUB could boot holds exactly a release signed for this
//!   device (or the factory image): no unverified or half-written byte;
//! - a known-good slot holds what already ran from it;
//! - a `ready` slot holds exactly its release and GRUB does not boot it;
//! - a slot is armed (put on trial) in a poll only when the policy and the
//!   advice allow it, and, when the advice names a lease group, only while
//!   the device holds a lease (checked before a crash's aftermath too);
//! - a lease the server says the device holds is recorded in its state;
//!   a poll from idle that ends without a staged slot leaves none held;
//! - the agent never panics but where a crash was injected.
//!
//! `SLUICE_MODEL_CASES` sequences run (default 500), from a random base seed
//! (`SLUICE_MODEL_SEED` to pick one); the seeds in `model-regressions.txt`
//! run first, and a failing seed is added there, with the shrunk trace
//! printed.

use crate::common;

use common::{Keys, Layer, Leases, Request, Responder, Response, device_routes, resolution};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_agent::agent::{Daemon, Device, Turn};
use sluice_agent::bootloader::{AbState, GrubEnv, Slot, SlotBoot};
use sluice_agent::config::{Config, RebootPolicy};
use sluice_agent::failpoint::{self, Crash};
use sluice_protocol::{Offer, RebootAdvice, RebootReason};
use std::collections::{BTreeMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

const PRODUCT: &str = "acme-os";
const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/model-regressions.txt");

/// What a slot holds: path → file bytes (`None` for a directory).
type Fingerprint = BTreeMap<String, Option<Vec<u8>>>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(rel, None);
                stack.push(p);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out
}

/// A release the stand-in server knows.
struct Release {
    version: &'static str,
    digest: String,
    image: String,
    /// What a slot holding it holds.
    tree: Fingerprint,
}

/// How the server answers one poll.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Offers release `i`, flagged `downgrade` or not.
    Offer(usize, bool),
    /// No release (revoked).
    Revoked,
    /// Offers release `i` in an answer signed by another key.
    Forged(usize),
    /// Offers release `i` with an image signature over another digest.
    BadImageSig(usize),
    /// Offers the release whose blob the registry corrupts.
    Lying,
    /// The server answers 503.
    Down,
    /// Echoes another nonce.
    Replay,
}

/// The reboot advice in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Advice {
    /// None: any time, no lease.
    Any,
    /// Outside the maintenance window.
    Closed,
    /// Inside it.
    Open,
    /// Any time, with a lease in [`GROUP`]; `room`: one is free.
    Lease { room: bool },
}

const GROUP: &str = "acme-os.stable";

impl Advice {
    fn advice(self) -> Option<RebootAdvice> {
        let window = |allowed| RebootAdvice {
            allowed,
            reason: if allowed {
                RebootReason::InWindow
            } else {
                RebootReason::OutsideWindow
            },
            window: Some("Sat 02:00–04:00 Europe/Berlin".into()),
            opens_at: Some(time::OffsetDateTime::now_utc() + time::Duration::hours(30)),
            closes_at: None,
            lease_group: None,
        };
        match self {
            Advice::Any => None,
            Advice::Closed => Some(window(false)),
            Advice::Open => Some(window(true)),
            Advice::Lease { .. } => Some(RebootAdvice {
                allowed: true,
                reason: RebootReason::NoWindow,
                window: None,
                opens_at: None,
                closes_at: None,
                lease_group: Some(GROUP.into()),
            }),
        }
    }
}

/// What happens after an injected crash.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// systemd restarts the agent in the same boot.
    Restart,
    /// The power goes: GRUB boots, the checks pass or fail.
    PowerCut { healthy: bool },
}

#[derive(Debug, Clone, Copy)]
enum Action {
    /// One daemon turn while the server answers so, with this advice.
    Poll(Answer, Advice, Option<(u32, Then)>),
    /// A person runs `sluice-agent reboot` (manual policy).
    ManualReboot(Option<(u32, Then)>),
    /// The machine reboots (the reboot asked for happens, or any reboot).
    Reboot {
        healthy: bool,
        crash: Option<(u32, Then)>,
    },
    /// The agent is restarted in the same boot.
    Restart(Option<(u32, Then)>),
    /// The operator runs `sluice-agent rollback`.
    Rollback(Option<(u32, Then)>),
}

/// The stand-in server and registry, shared by the sequences of a thread.
struct World {
    keys: Keys,
    other: Keys,
    releases: Vec<Release>,
    /// The release whose layer the registry corrupts.
    lying: Release,
    factory: Fingerprint,
    /// Registry content by digest (the lying release's layer corrupted).
    blobs: BTreeMap<String, Vec<u8>>,
    answer: Mutex<Answer>,
    advice: Mutex<Advice>,
    leases: Mutex<Leases>,
    serial: AtomicI64,
    responder: Responder,
}

fn release_layer(version: &str) -> (Layer, Fingerprint) {
    let mut b = tar::Builder::new(Vec::new());
    let mut tree = BTreeMap::new();
    let entries: Vec<(String, Option<Vec<u8>>)> = vec![
        ("etc".into(), None),
        (
            "etc/os-release".into(),
            Some(format!("ID=acme\nVERSION_ID={version}\n").into_bytes()),
        ),
        ("usr".into(), None),
        ("usr/lib".into(), None),
        (
            "usr/lib/libacme.so".into(),
            Some(format!("\x7fELF acme {version}").repeat(50).into_bytes()),
        ),
        ("release".into(), Some(format!("{version}\n").into_bytes())),
    ];
    for (path, data) in entries {
        match &data {
            None => common::tar_entry(
                &mut b,
                &format!("{path}/"),
                tar::EntryType::Directory,
                0o755,
                0,
                b"",
                None,
            ),
            Some(d) => common::tar_entry(&mut b, &path, tar::EntryType::Regular, 0o644, 0, d, None),
        }
        tree.insert(path, data);
    }
    (Layer::from_tar(b.into_inner().unwrap()), tree)
}

impl World {
    fn new() -> Arc<World> {
        Arc::new_cyclic(|weak: &std::sync::Weak<World>| {
            let weak = weak.clone();
            let responder = Responder::start(Arc::new(move |req: &Request| match weak.upgrade() {
                Some(w) => w.serve(req),
                None => Response::plain(503, []),
            }));
            let mut blobs = BTreeMap::new();
            let mut make = |version: &'static str, lie: bool| {
                let (layer, tree) = release_layer(version);
                let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
                blobs.insert(sluice_protocol::sha256_digest(config), config.to_vec());
                let manifest = common::manifest(config, &[(&layer.digest(), layer.gz.len())]);
                let digest = sluice_protocol::sha256_digest(&manifest);
                let mut gz = layer.gz.clone();
                if lie {
                    // Same length, other bytes: only the digest can tell.
                    let n = gz.len();
                    gz[n / 2] ^= 0x55;
                    gz[n - 9] ^= 0xff;
                }
                blobs.insert(layer.digest(), gz);
                blobs.insert(digest.clone(), manifest);
                Release {
                    version,
                    image: format!("{}/acme/os@{digest}", responder.host),
                    digest,
                    tree,
                }
            };
            let releases = ["1.1.0", "1.2.0", "1.3.0", "2.0.0"]
                .into_iter()
                .map(|v| make(v, false))
                .collect();
            let lying = make("3.0.0", true);
            World {
                keys: Keys::new(1),
                other: Keys::new(2),
                releases,
                lying,
                factory: BTreeMap::from([("factory".to_string(), Some(b"factory image".to_vec()))]),
                blobs,
                answer: Mutex::new(Answer::Revoked),
                advice: Mutex::new(Advice::Any),
                leases: Mutex::new(Leases::new()),
                serial: AtomicI64::new(1),
                responder,
            }
        })
    }

    fn offer(&self, r: &Release, signer: &Keys, signed_digest: &str) -> Offer {
        Offer {
            version: r.version.into(),
            digest: r.digest.clone(),
            image: r.image.clone(),
            size: 1,
            signature: signer.sign_image(signed_digest, PRODUCT, r.version),
        }
    }

    fn serve(&self, req: &Request) -> Response {
        if let Some(r) = device_routes(req) {
            return r;
        }
        if req.path.starts_with("/v1/pre-reboot") || req.path.starts_with("/v1/steady-state") {
            if matches!(*self.answer.lock().unwrap(), Answer::Down) {
                return Response::plain(503, "down");
            }
            let room = !matches!(*self.advice.lock().unwrap(), Advice::Lease { room: false });
            let mut leases = self.leases.lock().unwrap();
            let held = leases.holders.entry(GROUP.into()).or_default();
            // Another device takes the one lease when there is no room.
            held.retain(|h| h != "other");
            if !room && held.is_empty() {
                held.push("other".into());
            }
            return leases.answer(req).expect("a FleetLock route");
        }
        if req.path.ends_with("/resolve") {
            let answer = *self.answer.lock().unwrap();
            let (offer, downgrade, foreign, nonce) = match answer {
                Answer::Offer(i, d) => {
                    let r = &self.releases[i];
                    (Some(self.offer(r, &self.keys, &r.digest)), d, false, None)
                }
                Answer::Revoked => (None, false, false, None),
                Answer::Forged(i) => {
                    let r = &self.releases[i];
                    (Some(self.offer(r, &self.keys, &r.digest)), true, true, None)
                }
                Answer::BadImageSig(i) => {
                    let r = &self.releases[i];
                    let other = &self.releases[(i + 1) % self.releases.len()];
                    (
                        Some(self.offer(r, &self.keys, &other.digest)),
                        true,
                        false,
                        None,
                    )
                }
                Answer::Lying => (
                    Some(self.offer(&self.lying, &self.keys, &self.lying.digest)),
                    false,
                    false,
                    None,
                ),
                Answer::Down => return Response::plain(503, "down"),
                Answer::Replay => (None, false, false, Some("an-old-nonce".to_string())),
            };
            let mut r = resolution(req, offer, self.serial.fetch_add(1, Ordering::Relaxed));
            r.downgrade = downgrade;
            if let Some(nonce) = nonce {
                r.nonce = nonce;
            }
            r.reboot = self.advice.lock().unwrap().advice();
            let signer = if foreign {
                &self.other.response
            } else {
                &self.keys.response
            };
            return Response::signed(&r, signer);
        }
        if let Some((_, digest)) = req.path.rsplit_once('/')
            && let Some(b) = self.blobs.get(digest)
        {
            return Response::plain(200, b.clone());
        }
        Response::plain(404, "not found")
    }

    /// Which signed release (or the factory image) a slot holds exactly.
    fn signed_content(&self, fp: &Fingerprint) -> Option<String> {
        if *fp == self.factory {
            return Some("factory".into());
        }
        self.releases
            .iter()
            .find(|r| r.tree == *fp)
            .map(|r| r.version.to_string())
    }
}

/// One simulated machine running the agent.
struct Sim<'w> {
    world: &'w World,
    dir: tempfile::TempDir,
    dev: Option<Device>,
    daemon: Option<Daemon>,
    /// (slot, content) pairs that booted here.
    ran: HashSet<(Slot, String)>,
    policy: RebootPolicy,
    /// Polls that ended with a release ready (waiting).
    readies: u64,
    /// The slot on trial when the step began.
    trial_before: Option<Slot>,
    /// Whether the step may arm a slot: `None`, any step but a poll or a
    /// manual reboot (a rollback arms; a boot or restart adopts).
    may_arm: Option<bool>,
    trace: Vec<String>,
    boots: u64,
}

type Outcome = Result<(), String>;

static HOOK: Once = Once::new();

fn quiet_crashes() {
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crash>().is_none() {
                default(info);
            }
        }));
    });
}

fn tempdir() -> tempfile::TempDir {
    // Slot writes sync the whole filesystem: on tmpfs that costs nothing.
    match Path::new("/dev/shm").is_dir() {
        true => tempfile::Builder::new()
            .prefix("sluice-model-")
            .tempdir_in("/dev/shm")
            .unwrap(),
        false => tempfile::tempdir().unwrap(),
    }
}

impl<'w> Sim<'w> {
    fn new(world: &'w World, policy: RebootPolicy) -> Sim<'w> {
        let dir = tempdir();
        let p = dir.path();
        for s in ["a", "b", "state"] {
            std::fs::create_dir_all(p.join(s)).unwrap();
        }
        std::fs::write(p.join("a/factory"), b"factory image").unwrap();
        std::fs::write(
            p.join("keys.json"),
            serde_json::to_vec(&world.keys.key_set()).unwrap(),
        )
        .unwrap();
        let mut cfg = Config::in_folder(p, &world.responder.url, PRODUCT, "stable");
        cfg.enrollment_secret = Some("secret".into());
        cfg.machine_id = Some("model".into());
        cfg.boot.health_checks = vec![vec![
            "test".into(),
            "-e".into(),
            p.join("healthy").display().to_string(),
        ]];
        cfg.registry.insecure = vec![world.responder.host.clone()];
        cfg.boot.reboot_policy = policy;
        cfg.write(&p.join("agent.toml")).unwrap();
        // Every sequence starts with no lease held.
        world.leases.lock().unwrap().holders.clear();
        Sim {
            world,
            dir,
            dev: None,
            daemon: None,
            ran: HashSet::new(),
            policy,
            readies: 0,
            trial_before: None,
            may_arm: None,
            trace: Vec::new(),
            boots: 0,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn slot_dir(&self, s: Slot) -> PathBuf {
        self.path(match s {
            Slot::A => "a",
            Slot::B => "b",
        })
    }

    fn open(&self) -> Device {
        Device::open(Config::load(&self.path("agent.toml")).unwrap()).unwrap()
    }

    /// Runs `f` with a crash armed at the `n`th point; a crash drops the
    /// agent's memory and is followed as `then` says.
    fn guarded(&mut self, crash: Option<(u32, Then)>, f: impl FnOnce(&mut Sim<'w>)) -> Outcome {
        if let Some((n, _)) = crash {
            failpoint::arm(n);
        }
        let r = catch_unwind(AssertUnwindSafe(|| f(self)));
        failpoint::disarm();
        // Before a crash's aftermath boots what was armed.
        self.check_arming()?;
        match r {
            Ok(()) => Ok(()),
            Err(p) => {
                let Some(Crash(site)) = p.downcast_ref::<Crash>().copied() else {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    return Err(format!("the agent panicked: {msg}"));
                };
                self.dev = None;
                self.daemon = None;
                self.trace.push(format!("  crash at {site}"));
                if site == "slot: write" {
                    // The write got part of the way.
                    self.half_write();
                }
                match crash.unwrap().1 {
                    Then::Restart => self.restart(None),
                    Then::PowerCut { healthy } => self.boot(healthy, None),
                }
            }
        }
    }

    /// What an interrupted write leaves in the slot being written.
    fn half_write(&self) {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.path("state/state.json")).unwrap()).unwrap();
        if state["update"]["state"] == "writing" {
            let slot = Slot::parse(state["update"]["slot"].as_str().unwrap()).unwrap();
            let d = self.slot_dir(slot);
            std::fs::create_dir_all(d.join("usr")).unwrap();
            std::fs::write(d.join("usr/half-written"), b"\x7fEL").unwrap();
        }
    }

    fn restart(&mut self, crash: Option<(u32, Then)>) -> Outcome {
        self.dev = None;
        self.daemon = None;
        self.guarded(crash, |s| {
            let mut dev = s.open();
            s.daemon = Some(Daemon::start(&mut dev));
            s.dev = Some(dev);
        })
    }

    /// GRUB picks a slot (or halts: a failure); the booted system is
    /// checked; then the boot assessment and the daemon start.
    fn boot(&mut self, healthy: bool, crash: Option<(u32, Then)>) -> Outcome {
        self.dev = None;
        self.daemon = None;
        let slot = sluice_agent::bootloader::boot(&self.path("grubenv"))
            .map_err(|e| format!("GRUB cannot read its environment: {e:#}"))?
            .ok_or("GRUB finds no bootable slot: the device halts")?;
        let fp = fingerprint(&self.slot_dir(slot));
        let content = self.world.signed_content(&fp).ok_or_else(|| {
            format!(
                "GRUB booted slot {slot}, which holds no release signed for this device: {fp:?}"
            )
        })?;
        self.trace.push(format!(
            "  GRUB boots slot {slot} ({content}), checks pass: {healthy}"
        ));
        self.ran.insert((slot, content));
        self.boots += 1;
        std::fs::write(
            self.path("cmdline"),
            format!("root=/dev/vda sluice.slot={slot}\n"),
        )
        .unwrap();
        std::fs::write(self.path("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
        if healthy {
            std::fs::write(self.path("healthy"), b"").unwrap();
        } else {
            let _ = std::fs::remove_file(self.path("healthy"));
        }
        self.guarded(crash, |s| {
            // The boot-assessment service, then the daemon.
            let mut dev = s.open();
            let _ = dev.assess(true);
            s.daemon = Some(Daemon::start(&mut dev));
            s.dev = Some(dev);
        })
    }

    fn step(&mut self, a: Action) -> Outcome {
        self.trace.push(format!("{a:?}"));
        self.trial_before = self.grub().trial();
        self.may_arm = None;
        match a {
            Action::Poll(answer, advice, crash) => {
                *self.world.answer.lock().unwrap() = answer;
                *self.world.advice.lock().unwrap() = advice;
                let lease_ok = || advice != Advice::Lease { room: false };
                self.may_arm = Some(match self.policy {
                    RebootPolicy::Manual => false,
                    RebootPolicy::Window => advice != Advice::Closed && lease_ok(),
                    RebootPolicy::Immediate => lease_ok(),
                });
                let from = self.state()["update"]["state"].clone();
                let crashes = self.crashes();
                if self.dev.is_none() {
                    self.restart(None)?;
                }
                self.guarded(crash, |s| {
                    let (Some(dev), Some(daemon)) = (s.dev.as_mut(), s.daemon.as_mut()) else {
                        return;
                    };
                    let t = daemon.turn(dev);
                    let line = match t {
                        Turn::Poll(_) | Turn::PollAt(_) => format!(
                            "  polls on ({})",
                            dev.store.data.waiting.as_deref().unwrap_or("-")
                        ),
                        Turn::AwaitReboot(_) => "  waits for the reboot".to_string(),
                    };
                    s.trace.push(line);
                })?;
                // A poll from idle that leaves nothing staged holds no lease.
                let to = self.state()["update"]["state"].clone();
                self.readies += u64::from(to == "ready");
                if self.crashes() == crashes
                    && !matches!(answer, Answer::Down)
                    && (from == "idle" || from == "writing")
                    && to != "staged"
                    && self.held()
                {
                    return Err(format!(
                        "a poll from {from} ended in {to} with the reboot lease still held"
                    ));
                }
                Ok(())
            }
            Action::ManualReboot(crash) => {
                // A lease is needed when the last answer named a group.
                self.may_arm =
                    Some(*self.world.advice.lock().unwrap() != Advice::Lease { room: false });
                if self.dev.is_none() {
                    self.restart(None)?;
                }
                self.guarded(crash, |s| {
                    if let Some(dev) = s.dev.as_mut() {
                        let r = dev.reboot_now();
                        s.trace.push(format!(
                            "  reboot: {:?}",
                            r.map(|t| t.version).map_err(|e| e.to_string())
                        ));
                    }
                })
            }
            Action::Reboot { healthy, crash } => self.boot(healthy, crash),
            Action::Restart(crash) => self.restart(crash),
            Action::Rollback(crash) => {
                if self.dev.is_none() {
                    self.restart(None)?;
                }
                self.guarded(crash, |s| {
                    if let Some(dev) = s.dev.as_mut() {
                        let r = dev.rollback();
                        s.trace
                            .push(format!("  rollback: {:?}", r.map_err(|e| e.to_string())));
                    }
                })
            }
        }
    }

    fn grub(&self) -> AbState {
        AbState::from_env(&GrubEnv::load(&self.path("grubenv")).unwrap_or_else(|_| GrubEnv::new()))
    }

    fn state(&self) -> serde_json::Value {
        std::fs::read(self.path("state/state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    fn crashes(&self) -> usize {
        self.trace
            .iter()
            .filter(|l| l.starts_with("  crash"))
            .count()
    }

    /// Whether the server says this device holds a lease.
    fn held(&self) -> bool {
        self.world
            .leases
            .lock()
            .unwrap()
            .held(GROUP)
            .contains(&"dev-1".to_string())
    }

    /// A slot armed in this step was allowed to be: by the policy and
    /// advice, and with the lease held when the advice names a group.
    fn check_arming(&self) -> Outcome {
        let Some(may) = self.may_arm else {
            return Ok(());
        };
        let ab = self.grub();
        let Some(t) = ab.trial() else {
            return Ok(());
        };
        if self.trial_before == Some(t) || ab.slot_boot(t) != SlotBoot::Trial {
            return Ok(());
        }
        if !may {
            return Err(format!(
                "slot {t} was armed against the {:?} policy and the advice {:?}",
                self.policy,
                *self.world.advice.lock().unwrap()
            ));
        }
        let leased = matches!(*self.world.advice.lock().unwrap(), Advice::Lease { .. });
        if leased && !self.held() {
            return Err(format!("slot {t} was armed without the reboot lease"));
        }
        Ok(())
    }

    /// The invariants, after every step.
    fn check(&self) -> Outcome {
        let block = match std::fs::read(self.path("grubenv")) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("grubenv unreadable: {e}")),
        };
        let env = match block {
            Some(b) => GrubEnv::parse(&b).map_err(|e| format!("grubenv torn: {e}"))?,
            None => GrubEnv::new(),
        };
        let ab = AbState::from_env(&env);
        let first = ab
            .next_boot()
            .ok_or_else(|| format!("GRUB would find no bootable slot: {ab:?}"))?;
        let mut bootable = vec![first];
        if ab.slot_boot(first) == SlotBoot::Trial {
            let mut spent = ab.clone();
            spent.tried[usize::from(first == Slot::B)] = true;
            let fallback = spent
                .next_boot()
                .ok_or_else(|| format!("slot {first} is on trial with no fallback: {ab:?}"))?;
            if spent.slot_boot(fallback) != SlotBoot::Good {
                return Err(format!(
                    "the fallback of slot {first} on trial is not known good: {ab:?}"
                ));
            }
            bootable.push(fallback);
        }
        for s in [Slot::A, Slot::B] {
            let boot = ab.slot_boot(s);
            if !matches!(boot, SlotBoot::Good | SlotBoot::Trial) {
                continue;
            }
            let fp = fingerprint(&self.slot_dir(s));
            let Some(content) = self.world.signed_content(&fp) else {
                return Err(format!(
                    "slot {s} is bootable ({boot:?}) but holds no release signed for this device: {fp:?}; {ab:?}"
                ));
            };
            if boot == SlotBoot::Good && !self.ran.contains(&(s, content.clone())) {
                return Err(format!(
                    "slot {s} is known good but holds {content}, which never booted from it: {ab:?}"
                ));
            }
        }
        let state = self.state();
        let update = &state["update"];
        if update["state"] == "ready" {
            let slot = Slot::parse(update["slot"].as_str().unwrap()).unwrap();
            let version = update["target"]["version"].as_str().unwrap();
            if ab.slot_boot(slot) != SlotBoot::Bad {
                return Err(format!(
                    "slot {slot} is ready, yet GRUB may boot it: {ab:?}"
                ));
            }
            let fp = fingerprint(&self.slot_dir(slot));
            if self.world.signed_content(&fp).as_deref() != Some(version) {
                return Err(format!(
                    "slot {slot} is ready with {version} but holds {:?}",
                    self.world.signed_content(&fp)
                ));
            }
        }
        if self.held() && state["lease"] != GROUP {
            return Err(format!(
                "the device holds a reboot lease its state does not record: {}",
                state["lease"]
            ));
        }
        Ok(())
    }
}

fn gen_crash(rng: &mut StdRng, p: f64) -> Option<(u32, Then)> {
    rng.gen_bool(p).then(|| {
        let then = if rng.gen_bool(0.5) {
            Then::Restart
        } else {
            Then::PowerCut {
                healthy: rng.gen_bool(0.7),
            }
        };
        (rng.gen_range(0..14), then)
    })
}

/// A sequence: the reboot policy and the actions. The policy, the advice
/// and manual reboots come from a second generator, so a seed's other
/// actions are what they were before reboot policies.
fn gen_actions(seed: u64) -> (RebootPolicy, Vec<Action>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut policy_rng = StdRng::seed_from_u64(seed ^ 0x185e_ed18);
    let policy = match policy_rng.gen_range(0..100) {
        0..=59 => RebootPolicy::Window,
        60..=79 => RebootPolicy::Immediate,
        _ => RebootPolicy::Manual,
    };
    let n = rng.gen_range(4..36);
    let mut actions = Vec::new();
    for _ in 0..n {
        let a = match rng.gen_range(0..100) {
            0..=54 => {
                let answer = match rng.gen_range(0..100) {
                    0..=54 => Answer::Offer(rng.gen_range(0..4), rng.gen_bool(0.5)),
                    55..=62 => Answer::Revoked,
                    63..=70 => Answer::Forged(rng.gen_range(0..4)),
                    71..=78 => Answer::BadImageSig(rng.gen_range(0..4)),
                    79..=90 => Answer::Lying,
                    91..=95 => Answer::Down,
                    _ => Answer::Replay,
                };
                let advice = match policy_rng.gen_range(0..100) {
                    0..=34 => Advice::Any,
                    35..=59 => Advice::Closed,
                    60..=74 => Advice::Open,
                    75..=89 => Advice::Lease { room: true },
                    _ => Advice::Lease { room: false },
                };
                Action::Poll(answer, advice, gen_crash(&mut rng, 0.3))
            }
            55..=84 => Action::Reboot {
                healthy: rng.gen_bool(0.7),
                crash: gen_crash(&mut rng, 0.3),
            },
            85..=94 => Action::Restart(gen_crash(&mut rng, 0.2)),
            _ => Action::Rollback(gen_crash(&mut rng, 0.3)),
        };
        let manual = policy == RebootPolicy::Manual
            && matches!(a, Action::Poll(..))
            && policy_rng.gen_bool(0.4);
        actions.push(a);
        if manual {
            actions.push(Action::ManualReboot(gen_crash(&mut policy_rng, 0.3)));
        }
    }
    (policy, actions)
}

/// Statistics over all sequences, to show the test reached what it claims.
#[derive(Default)]
struct Seen {
    crashes: AtomicU64,
    boots: AtomicU64,
    upgrades: AtomicU64,
    readies: AtomicU64,
}

fn run(
    world: &World,
    policy: RebootPolicy,
    actions: &[Action],
    seen: Option<&Seen>,
) -> Result<(), (String, Vec<String>)> {
    let mut sim = Sim::new(world, policy);
    let mut go = || -> Outcome {
        sim.boot(true, None)?;
        sim.check()?;
        for &a in actions {
            sim.step(a)?;
            sim.check()?;
        }
        Ok(())
    };
    let r = go();
    if let Some(seen) = seen {
        let crashes = sim
            .trace
            .iter()
            .filter(|l| l.starts_with("  crash"))
            .count();
        seen.crashes.fetch_add(crashes as u64, Ordering::Relaxed);
        seen.boots.fetch_add(sim.boots, Ordering::Relaxed);
        let upgrades = sim.ran.iter().filter(|(_, c)| c != "factory").count();
        seen.upgrades.fetch_add(upgrades as u64, Ordering::Relaxed);
        seen.readies.fetch_add(sim.readies, Ordering::Relaxed);
    }
    r.map_err(|e| (e, sim.trace))
}

/// Drops actions while the sequence still fails: the shortest trace to read.
fn shrink(world: &World, policy: RebootPolicy, mut actions: Vec<Action>) -> Vec<Action> {
    let mut i = 0;
    while i < actions.len() {
        let mut fewer = actions.clone();
        fewer.remove(i);
        if run(world, policy, &fewer, None).is_err() {
            actions = fewer;
        } else {
            i += 1;
        }
    }
    actions
}

fn regressions() -> Vec<u64> {
    std::fs::read_to_string(REGRESSIONS)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("seed "))
        .filter_map(|s| u64::from_str_radix(s.trim(), 16).ok())
        .collect()
}

fn save_regression(seed: u64) {
    if regressions().contains(&seed) {
        return;
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(REGRESSIONS)
        .unwrap();
    writeln!(f, "seed {seed:016x}").unwrap();
}

/// The whole device under random sequences: see the module comment.
#[test]
fn random_sequences_keep_the_device_bootable_and_verified() {
    quiet_crashes();
    let cases: u64 = std::env::var("SLUICE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let base: u64 = match std::env::var("SLUICE_MODEL_SEED") {
        Ok(v) => {
            u64::from_str_radix(v.trim_start_matches("0x"), 16).expect("SLUICE_MODEL_SEED is hex")
        }
        Err(_) => {
            let mut b = [0u8; 8];
            rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).unwrap();
            u64::from_le_bytes(b)
        }
    };
    let mut seeds = regressions();
    seeds.extend((0..cases).map(|i| base.wrapping_add(i)));
    eprintln!(
        "model: {} sequences (base seed {base:016x}, SLUICE_MODEL_SEED to repeat)",
        seeds.len()
    );
    let seen = Seen::default();
    let next = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let started = std::time::Instant::now();
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let world = World::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= seeds.len() || failure.lock().unwrap().is_some() {
                        break;
                    }
                    let seed = seeds[i];
                    let (policy, actions) = gen_actions(seed);
                    if let Err((e, _)) = run(&world, policy, &actions, Some(&seen)) {
                        save_regression(seed);
                        let small = shrink(&world, policy, actions);
                        let (e2, trace) = run(&world, policy, &small, None).err().unwrap_or((e.clone(), vec![]));
                        *failure.lock().unwrap() = Some(format!(
                            "seed {seed:016x} (saved in {REGRESSIONS}): {e}\nshrunk to {} actions ({policy:?} policy): {e2}\n{}",
                            small.len(),
                            trace.join("\n")
                        ));
                        break;
                    }
                }
            });
        }
    });
    if let Some(f) = failure.into_inner().unwrap() {
        panic!("{f}");
    }
    let (crashes, boots, upgrades, readies) = (
        seen.crashes.into_inner(),
        seen.boots.into_inner(),
        seen.upgrades.into_inner(),
        seen.readies.into_inner(),
    );
    eprintln!(
        "model: {} sequences, {boots} boots, {crashes} injected crashes, {upgrades} releases booted, {readies} polls left a release waiting, in {:.1?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(
        crashes > cases && boots > cases && upgrades > cases / 4 && readies > cases / 4,
        "the sequences reached too little: {crashes} crashes, {boots} boots, {upgrades} upgrades, {readies} waits"
    );
}

/// Issue 11, item 1, as a sequence: staged 1.1.0 boots on trial and fails
/// its checks, the reboot command returns, the daemon's next turn sees
/// 1.2.0 offered. It must write nothing until the reboot.
#[test]
fn a_failed_trial_writes_nothing_before_its_reboot() {
    quiet_crashes();
    let world = World::new();
    let actions = [
        Action::Poll(Answer::Offer(0, false), Advice::Any, None),
        Action::Reboot {
            healthy: false,
            crash: None,
        },
        Action::Poll(Answer::Offer(1, false), Advice::Any, None),
        Action::Poll(Answer::Offer(1, false), Advice::Any, None),
        Action::Reboot {
            healthy: true,
            crash: None,
        },
        Action::Poll(Answer::Offer(1, false), Advice::Any, None),
        Action::Reboot {
            healthy: true,
            crash: None,
        },
    ];
    let mut sim = Sim::new(&world, RebootPolicy::Window);
    sim.boot(true, None).unwrap();
    for a in actions {
        let r = sim.step(a).and_then(|()| sim.check());
        assert!(r.is_ok(), "{r:?}\n{}", sim.trace.join("\n"));
    }
    assert!(
        sim.ran.contains(&(Slot::B, "1.2.0".to_string())),
        "{}",
        sim.trace.join("\n")
    );
}
