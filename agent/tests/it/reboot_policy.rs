//! Download-only staging and the reboot policy, against the stand-in server
//! of `upgrade.rs` (its `Stage`): a release is written and verified
//! (`ready`, GRUB unchanged) and armed only when the signed answer's reboot
//! advice, `boot.reboot_policy` and a reboot lease (FleetLock) allow it.
//! The stand-in changes its advice between polls; its FleetLock routes
//! (`common::Leases`) record who holds a lease.

use crate::common;
use crate::upgrade::{Stage, os_layers, umoci_tree};

use common::*;
use sluice_agent::bootloader::{AbState, GrubEnv, Slot, SlotBoot};
use sluice_agent::config::RebootPolicy;
use sluice_protocol::{RebootAdvice, RebootReason};
use time::macros::datetime;

const WINDOW: &str = "Sat 02:00–04:00 Europe/Berlin";
const WAITS_FOR_WINDOW: &str =
    "staged 2.0.0, waits for window Sat 02:00–04:00 Europe/Berlin (opens 2027-03-27 01:00 UTC)";
const GROUP: &str = "acme-os.stable";

/// Outside the window: not allowed, opens at 2027-03-27 01:00 UTC.
fn closed() -> RebootAdvice {
    RebootAdvice {
        allowed: false,
        reason: RebootReason::OutsideWindow,
        window: Some(WINDOW.into()),
        opens_at: Some(datetime!(2027-03-27 01:00 UTC)),
        closes_at: Some(datetime!(2027-03-27 03:00 UTC)),
        lease_group: None,
    }
}

/// Inside the window.
fn open() -> RebootAdvice {
    RebootAdvice {
        allowed: true,
        reason: RebootReason::InWindow,
        ..closed()
    }
}

/// Any time, with a lease in [`GROUP`].
fn leased() -> RebootAdvice {
    RebootAdvice {
        allowed: true,
        reason: RebootReason::NoWindow,
        window: None,
        opens_at: None,
        closes_at: None,
        lease_group: Some(GROUP.into()),
    }
}

impl Stage {
    fn advise(&self, advice: Option<RebootAdvice>) {
        let mut a = self.f.answer.lock().unwrap();
        a.reboot = advice;
        a.serial += 1;
    }

    fn set_policy(&self, p: RebootPolicy) {
        self.dev.edit_config(|c| c.boot.reboot_policy = p);
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&self.dev.run(&["status", "--json"]))).unwrap()
    }

    fn count(&self, kind: &str) -> usize {
        self.r.events().iter().filter(|e| *e == kind).count()
    }

    /// The bodies of the FleetLock requests seen, as `(route, body)`.
    fn fleet_lock(&self) -> Vec<(String, serde_json::Value)> {
        self.r
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == "/v1/pre-reboot" || r.path == "/v1/steady-state")
            .map(|r| {
                assert_eq!(r.headers["fleet-lock-protocol"], "true");
                assert_eq!(r.headers["authorization"], "Bearer tok-1");
                (r.path.clone(), serde_json::from_slice(&r.body).unwrap())
            })
            .collect()
    }

    /// The messages of the `staged` events.
    fn staged_messages(&self) -> Vec<String> {
        self.r
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.ends_with("/events"))
            .filter_map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                (v["kind"] == "staged").then(|| v["message"].as_str().unwrap().to_string())
            })
            .collect()
    }
}

/// GRUB boots the running slot A next and does not boot B at all.
fn assert_not_armed(dev: &Device) {
    let ab = dev.ab();
    assert_eq!(ab.next_boot(), Some(Slot::A), "{ab:?}");
    assert_eq!(ab.slot_boot(Slot::B), SlotBoot::Bad, "{ab:?}");
}

/// B is armed: GRUB boots it next, on trial.
fn assert_armed(dev: &Device) {
    let ab = dev.ab();
    assert_eq!(ab.next_boot(), Some(Slot::B), "{ab:?}");
    assert_eq!(ab.slot_boot(Slot::B), SlotBoot::Trial, "{ab:?}");
}

/// Outside its window the release is written and verified but not armed:
/// no reboot, GRUB still boots A (also after an unplanned reboot), the
/// status and the one `staged` event say what it waits for. Polls in the
/// meantime download nothing again. Once the window opens, the next poll
/// arms B and reboots; B passes its assessment.
#[test]
fn a_closed_window_stages_and_the_open_window_reboots() {
    let (s, pushed) = Stage::offering(true, "dir");
    s.advise(Some(closed()));
    let out = ok(&s.dev.run(&["apply"]));
    assert_eq!(out.trim(), WAITS_FOR_WINDOW);
    assert_eq!(s.dev.reboots(), 0);
    assert_not_armed(&s.dev);
    assert_eq!(tree(&s.dev.path("b")), umoci_tree(&pushed));
    assert_eq!(
        s.r.events(),
        ["download_started", "downloaded", "staged"],
        "no applied or rebooting before the window"
    );
    assert_eq!(s.staged_messages(), [WAITS_FOR_WINDOW]);
    let status = s.status();
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["waiting"], WAITS_FOR_WINDOW);
    assert_eq!(status["staged"]["slot"], "B");
    assert_eq!(status["staged"]["version"], "2.0.0");
    assert_eq!(status["next_boot"], "A");
    let text = ok(&s.dev.run(&["status"]));
    for line in [
        "staged:   slot B 2.0.0 (ready: not bootable until armed)".to_string(),
        format!("waiting:  {WAITS_FOR_WINDOW}"),
        "state:    ready".to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing: {text}");
    }

    // Restarts and an unplanned reboot: still ready, nothing downloaded
    // again, no new `staged` event for the same reason.
    let b_before = tree(&s.dev.path("b"));
    assert_eq!(ok(&s.dev.run(&["apply"])).trim(), WAITS_FOR_WINDOW);
    assert_eq!(
        s.dev.reboot(),
        Slot::A,
        "a power cut boots the running slot"
    );
    ok(&s.dev.run(&["mark-good"]));
    assert_eq!(ok(&s.dev.run(&["apply"])).trim(), WAITS_FOR_WINDOW);
    assert_eq!(s.count("download_started"), 1);
    assert_eq!(s.staged_messages().len(), 1);
    assert_eq!(tree(&s.dev.path("b")), b_before);
    assert_not_armed(&s.dev);

    s.advise(Some(open()));
    let out = ok(&s.dev.run(&["apply"]));
    assert!(out.contains("applied 2.0.0"), "{out}");
    assert_eq!(s.dev.reboots(), 1);
    assert_armed(&s.dev);
    assert_eq!(
        s.count("download_started"),
        1,
        "the window downloaded again"
    );
    assert_eq!(s.r.events()[3..], ["applied", "rebooting"]);
    assert_eq!(s.status()["waiting"], serde_json::Value::Null);
    assert_eq!(s.dev.reboot(), Slot::B);
    ok(&s.dev.run(&["mark-good"]));
    assert_eq!(s.r.events().last().unwrap(), "healthy");
    assert!(s.fleet_lock().is_empty(), "a lease was asked for unasked");
}

/// A lease the group has no room for keeps the release ready, and the
/// status says the server's words; once there is room the lease is taken
/// (recorded in the state before the reboot), and given back at the first
/// poll after the new slot passed its assessment, retried while the
/// server fails to take it.
#[test]
fn a_refused_lease_waits_and_a_granted_one_is_given_back() {
    let (s, _) = Stage::offering(true, "dir");
    s.advise(Some(leased()));
    s.f.leases
        .lock()
        .unwrap()
        .holders
        .insert(GROUP.into(), vec!["dev-9".into()]);
    let out = ok(&s.dev.run(&["apply"]));
    let want = format!(
        "staged 2.0.0, waits for reboot lease (group {GROUP} holds 1 of 1 reboot leases (dev-9); try again later)"
    );
    assert_eq!(out.trim(), want);
    assert_eq!(s.dev.reboots(), 0);
    assert_not_armed(&s.dev);
    let status = s.status();
    assert_eq!(status["waiting"], want.as_str(), "{status}");
    assert_eq!(
        status["lease"],
        serde_json::Value::Null,
        "refused, not held"
    );
    assert_eq!(s.staged_messages(), [want.as_str()]);

    // The other device gave its lease back.
    s.f.leases.lock().unwrap().holders.clear();
    let out = ok(&s.dev.run(&["apply"]));
    assert!(out.contains("applied 2.0.0"), "{out}");
    assert_eq!(s.dev.reboots(), 1);
    assert_armed(&s.dev);
    assert_eq!(s.f.leases.lock().unwrap().held(GROUP), ["dev-1"]);
    assert_eq!(s.status()["lease"], GROUP);
    let body = serde_json::json!({"client_params": {"id": "dev-1", "group": GROUP}});
    assert_eq!(
        s.fleet_lock(),
        [
            ("/v1/pre-reboot".to_string(), body.clone()),
            ("/v1/pre-reboot".to_string(), body.clone())
        ]
    );

    // The assessment does not wait on the network: mark-good gives nothing back.
    assert_eq!(s.dev.reboot(), Slot::B);
    ok(&s.dev.run(&["mark-good"]));
    assert_eq!(s.r.events().last().unwrap(), "healthy");
    assert_eq!(s.fleet_lock().len(), 2);
    // The next poll does, and tries again until the server takes it.
    s.f.leases.lock().unwrap().steady_state_down = 1;
    assert!(ok(&s.dev.run(&["apply"])).contains("up to date"));
    assert_eq!(
        s.status()["lease"],
        GROUP,
        "forgotten before the server took it"
    );
    assert!(ok(&s.dev.run(&["apply"])).contains("up to date"));
    assert_eq!(s.status()["lease"], serde_json::Value::Null);
    assert!(s.f.leases.lock().unwrap().held(GROUP).is_empty());
    let calls = s.fleet_lock();
    assert_eq!(
        calls[2..],
        [
            ("/v1/steady-state".to_string(), body.clone()),
            ("/v1/steady-state".to_string(), body)
        ]
    );
    assert!(ok(&s.dev.run(&["apply"])).contains("up to date"));
    assert_eq!(s.fleet_lock().len(), 4, "given back twice");
}

/// A lease taken for a release that then fails its assessment is given
/// back after the fall back.
#[test]
fn a_lease_is_given_back_after_a_fall_back() {
    let (s, _) = Stage::offering(false, "dir");
    s.advise(Some(leased()));
    ok(&s.dev.run(&["apply"]));
    assert_eq!(s.f.leases.lock().unwrap().held(GROUP), ["dev-1"]);
    assert_eq!(s.dev.reboot(), Slot::B);
    refused(&s.dev.run(&["mark-good"]), "unhealthy");
    assert_eq!(s.dev.reboot(), Slot::A);
    let _ = s.dev.run(&["mark-good"]);
    assert!(s.r.events().contains(&"rolled_back".to_string()));
    ok(&s.dev.run(&["apply"]));
    assert!(s.f.leases.lock().unwrap().held(GROUP).is_empty());
    assert_eq!(s.status()["lease"], serde_json::Value::Null);
}

/// `manual`: staged and never rebooted by the agent, whatever the advice;
/// `sluice-agent reboot` takes the lease, arms and reboots. Before
/// anything is ready, `reboot` is refused.
#[test]
fn manual_policy_waits_for_sluice_agent_reboot() {
    let (s, _) = Stage::offering(true, "dir");
    s.set_policy(RebootPolicy::Manual);
    refused(&s.dev.run(&["reboot"]), "nothing is staged to reboot into");
    s.advise(Some(leased()));
    let want = "staged 2.0.0, waits for a manual reboot (sluice-agent reboot)";
    for _ in 0..2 {
        assert_eq!(ok(&s.dev.run(&["apply"])).trim(), want);
    }
    assert_eq!(s.dev.reboots(), 0);
    assert_not_armed(&s.dev);
    assert!(
        s.fleet_lock().is_empty(),
        "a lease taken with no reboot coming"
    );
    assert_eq!(s.status()["waiting"], want);

    let out = ok(&s.dev.run(&["reboot"]));
    assert!(out.contains("rebooting into 2.0.0"), "{out}");
    assert_eq!(s.dev.reboots(), 1);
    assert_armed(&s.dev);
    assert_eq!(s.f.leases.lock().unwrap().held(GROUP), ["dev-1"]);
    refused(&s.dev.run(&["reboot"]), "waiting for the reboot");
    assert_eq!(s.dev.reboot(), Slot::B);
    ok(&s.dev.run(&["mark-good"]));
    assert_eq!(s.r.events().last().unwrap(), "healthy");
}

/// `manual` with the lease refused: `reboot` says why and changes nothing.
#[test]
fn a_manual_reboot_without_a_lease_is_refused() {
    let (s, _) = Stage::offering(true, "dir");
    s.set_policy(RebootPolicy::Manual);
    s.advise(Some(leased()));
    ok(&s.dev.run(&["apply"]));
    s.f.leases
        .lock()
        .unwrap()
        .holders
        .insert(GROUP.into(), vec!["dev-9".into()]);
    refused(
        &s.dev.run(&["reboot"]),
        "waits for reboot lease (group acme-os.stable holds 1 of 1",
    );
    assert_eq!(s.dev.reboots(), 0);
    assert_not_armed(&s.dev);
    assert_eq!(s.status()["state"], "ready");
}

/// `immediate` ignores a closed window but still takes the lease.
#[test]
fn immediate_ignores_windows_but_takes_the_lease() {
    let (s, _) = Stage::offering(true, "dir");
    s.set_policy(RebootPolicy::Immediate);
    s.advise(Some(RebootAdvice {
        lease_group: Some(GROUP.into()),
        ..closed()
    }));
    let out = ok(&s.dev.run(&["apply"]));
    assert!(out.contains("applied 2.0.0"), "{out}");
    assert_eq!(s.dev.reboots(), 1);
    assert_armed(&s.dev);
    assert_eq!(s.fleet_lock().len(), 1);
    assert_eq!(s.f.leases.lock().unwrap().held(GROUP), ["dev-1"]);
}

/// A newer release offered while one waits replaces it (the slot is
/// written again, still not armed); a release no longer offered (a
/// rollback of the channel) is forgotten: idle, nothing to roll back to.
#[test]
fn a_newer_offer_rewrites_and_a_withdrawn_one_is_forgotten() {
    let (s, _) = Stage::offering(true, "dir");
    s.advise(Some(closed()));
    ok(&s.dev.run(&["apply"]));
    let v3 = push_image(&os_layers()[..1], None);
    s.f.offers(&v3, "3.0.0");
    let out = ok(&s.dev.run(&["apply"]));
    assert!(out.contains("staged 3.0.0, waits for window"), "{out}");
    assert_eq!(s.count("download_started"), 2);
    assert_eq!(tree(&s.dev.path("b")), umoci_tree(&v3));
    assert_not_armed(&s.dev);
    assert_eq!(s.status()["staged"]["version"], "3.0.0");
    assert_eq!(s.staged_messages().len(), 2);

    s.f.answer.lock().unwrap().offer = None;
    s.advise(Some(open()));
    assert!(ok(&s.dev.run(&["apply"])).contains("up to date"));
    let status = s.status();
    assert_eq!(status["state"], "idle", "{status}");
    assert_eq!(status["staged"], serde_json::Value::Null);
    assert_eq!(status["waiting"], serde_json::Value::Null);
    assert_eq!(s.dev.reboots(), 0);
    assert_not_armed(&s.dev);
    refused(&s.dev.run(&["rollback"]), "holds no complete image");
}

/// `rollback` while a release waits is refused: the other slot holds the
/// new release, which never ran, not an earlier one.
#[test]
fn rollback_while_ready_is_refused() {
    let (s, _) = Stage::offering(true, "dir");
    s.advise(Some(closed()));
    ok(&s.dev.run(&["apply"]));
    refused(&s.dev.run(&["rollback"]), "never ran here");
    assert_not_armed(&s.dev);
}

/// A slot changed while it waited (here: a file added at its top) is
/// written again before it is armed, not booted as it is.
#[test]
fn a_ready_slot_changed_while_waiting_is_written_again() {
    let (s, pushed) = Stage::offering(true, "dir");
    s.advise(Some(closed()));
    ok(&s.dev.run(&["apply"]));
    std::fs::write(s.dev.path("b/planted"), b"not from the image").unwrap();
    s.advise(Some(open()));
    let out = s.dev.run(&["apply"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("slot B changed since 2.0.0 was verified into it: writing it again"),
        "{log}"
    );
    ok(&out);
    assert_eq!(tree(&s.dev.path("b")), umoci_tree(&pushed));
    assert_eq!(s.count("download_started"), 2);
    assert_armed(&s.dev);
}

/// A hostile answer: the advice allows the reboot, but the answer is not
/// signed by a trusted key. It is refused before anything acts on it.
#[test]
fn advice_in_a_forged_answer_is_ignored() {
    let (s, _) = Stage::offering(true, "dir");
    s.advise(Some(closed()));
    ok(&s.dev.run(&["apply"]));
    {
        let mut a = s.f.answer.lock().unwrap();
        a.reboot = Some(open());
        a.foreign_signer = true;
        a.serial += 1;
    }
    refused(&s.dev.run(&["apply"]), "signature refused");
    refused(&s.dev.run(&["reboot"]), "signature refused");
    assert_eq!(s.dev.reboots(), 0);
    assert_not_armed(&s.dev);
    assert_eq!(s.status()["state"], "ready");
}

/// A hostile lease refusal: thousands of characters with control
/// characters become one line of at most 200 in the status and events.
#[test]
fn a_hostile_lease_refusal_is_one_short_line() {
    let (s, _) = Stage::offering(true, "dir");
    s.advise(Some(leased()));
    s.f.leases.lock().unwrap().refusal = Some(format!("evil\n\x1b[31m{}", "x".repeat(5000)));
    ok(&s.dev.run(&["apply"]));
    let w = s.status()["waiting"].as_str().unwrap().to_string();
    assert!(
        w.starts_with("staged 2.0.0, waits for reboot lease (evil  [31mxxx"),
        "{w}"
    );
    assert!(!w.chars().any(char::is_control), "{w:?}");
    assert!(w.chars().count() < 260, "{}", w.len());
    assert_eq!(s.staged_messages(), [w]);
    assert_eq!(s.dev.reboots(), 0);
}

/// Issue 18: a crash after GRUB was armed and before the state said so
/// (GRUB: B on trial; state: ready). A restart in the same boot takes it
/// as staged and asks for the reboot again; the boot into B assesses it
/// as any staged slot: healthy here, or back to A.
#[test]
fn a_crash_between_arming_and_the_state_is_a_staged_slot() {
    for healthy in [true, false] {
        let (s, _) = Stage::offering(healthy, "dir");
        s.advise(Some(closed()));
        ok(&s.dev.run(&["apply"]));
        // What the crash leaves: GRUB armed, the state still ready.
        let grubenv = s.dev.path("grubenv");
        let mut env = GrubEnv::load(&grubenv).unwrap();
        let mut ab = AbState::from_env(&env);
        ab.stage(Slot::B);
        ab.apply_to(&mut env);
        env.store(&grubenv).unwrap();
        assert_eq!(s.status()["state"], "ready");

        // systemd restarts the agent in the same boot.
        refused(&s.dev.run(&["apply"]), "waiting for the reboot");
        assert_eq!(s.status()["state"], "staged");
        ok(&s.dev.run(&["mark-good"]));
        assert_armed(&s.dev);

        assert_eq!(s.dev.reboot(), Slot::B);
        if healthy {
            ok(&s.dev.run(&["mark-good"]));
            assert_eq!(s.r.events().last().unwrap(), "healthy");
            assert_eq!(s.status()["booted"]["version"], "2.0.0");
        } else {
            refused(&s.dev.run(&["mark-good"]), "unhealthy");
            assert_eq!(s.dev.reboot(), Slot::A);
            let _ = s.dev.run(&["mark-good"]);
            assert!(s.r.events().contains(&"rolled_back".to_string()));
        }
    }
}

/// The same crash followed by a power cut: GRUB boots B on trial, and
/// the assessment at boot decides.
#[test]
fn a_power_cut_after_arming_boots_the_slot_on_trial() {
    let (s, _) = Stage::offering(true, "dir");
    s.advise(Some(closed()));
    ok(&s.dev.run(&["apply"]));
    let grubenv = s.dev.path("grubenv");
    let mut env = GrubEnv::load(&grubenv).unwrap();
    let mut ab = AbState::from_env(&env);
    ab.stage(Slot::B);
    ab.apply_to(&mut env);
    env.store(&grubenv).unwrap();
    assert_eq!(s.dev.reboot(), Slot::B);
    ok(&s.dev.run(&["mark-good"]));
    assert_eq!(s.r.events().last().unwrap(), "healthy");
    let status = s.status();
    assert_eq!(status["state"], "idle", "{status}");
    assert_eq!(status["booted"]["boot"], "good");
}

/// `apply` killed with SIGKILL at random moments while a window is
/// closed and the channel moves between two releases, so each run writes
/// the slot again (ready → writing → ready): B is never armed, A never
/// changes, nothing reboots. The run that ends leaves the offered release
/// ready, and the window then arms exactly it.
#[test]
fn kills_while_staging_never_arm_the_slot() {
    let (s, v2) = Stage::offering(true, "dir");
    let v3 = push_image(&os_layers()[..1], None);
    s.advise(Some(closed()));
    let a_before = tree(&s.dev.path("a"));
    // A probe on a second device: how long a whole staging takes.
    let probe = common::device(
        &s.r.url,
        "acme-os",
        &s.f.keys.key_set(),
        vec![s.r.host.clone()],
        true,
        "dir",
    );
    let t0 = std::time::Instant::now();
    ok(&probe.run(&["apply"]));
    let full = t0.elapsed();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    for i in 0..12 {
        match i % 2 {
            0 => s.f.offers(&v3, "3.0.0"),
            _ => s.f.offers(&v2, "2.0.0"),
        }
        let at = full.mul_f64((xorshift(&mut seed) % 1000) as f64 / 1000.0);
        let mut child = s
            .dev
            .command(&["apply"])
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        kills += usize::from(crate::upgrade::kill_after(&mut child, at));
        assert_eq!(tree(&s.dev.path("a")), a_before, "the running slot changed");
        if s.dev.grubenv().is_some() {
            assert_not_armed(&s.dev);
        }
        assert_eq!(s.dev.reboots(), 0);
    }
    assert!(kills >= 4, "only {kills} runs were killed");
    let out = ok(&s.dev.run(&["apply"]));
    assert!(out.contains("staged 2.0.0, waits for window"), "{out}");
    assert_eq!(tree(&s.dev.path("b")), umoci_tree(&v2));
    s.advise(Some(open()));
    assert!(ok(&s.dev.run(&["apply"])).contains("applied 2.0.0"));
    assert_armed(&s.dev);
}

/// The daemon stages, says what it waits for, and reboots by itself at
/// the first poll after the advice allows it.
#[test]
fn the_daemon_waits_then_reboots() {
    let (s, _) = Stage::offering(true, "dir");
    s.advise(Some(closed()));
    let mut daemon = s
        .dev
        .command(&["run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::upgrade::wait_for_line(&mut daemon, "waits for window");
    assert!(crate::upgrade::stop(&mut daemon).success());
    assert_eq!(s.dev.reboots(), 0);
    s.advise(None);
    let mut daemon = s
        .dev
        .command(&["run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::upgrade::wait_for_line(&mut daemon, "waiting for the reboot into 2.0.0");
    assert!(crate::upgrade::stop(&mut daemon).success());
    assert_eq!(s.dev.reboots(), 1);
    assert_armed(&s.dev);
}

/// Labels from `agent.toml` go with the enrollment; a bad one is a clear
/// configuration error before anything is sent.
#[test]
fn labels_are_sent_at_enrollment_and_checked_first() {
    let s = Stage::new(true, "dir");
    s.dev.edit_config(|c| {
        c.labels = [("ring", "canary"), ("site", "berlin")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    });
    ok(&s.dev.run(&["enroll"]));
    let seen = s.r.seen.lock().unwrap().clone();
    let enroll = seen
        .iter()
        .find(|r| r.path == "/v1/devices/enroll")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&enroll.body).unwrap();
    assert_eq!(
        body["labels"],
        serde_json::json!({"ring": "canary", "site": "berlin"})
    );

    let text = std::fs::read_to_string(&s.dev.config).unwrap();
    let bad = text.replace("ring = \"canary\"", "\"-ring\" = \"canary\"");
    assert_ne!(bad, text, "{text}");
    std::fs::write(&s.dev.config, bad).unwrap();
    refused(
        &s.dev.run(&["status"]),
        "labels: key \"-ring\" is not a label key",
    );
}
