//! The real `sluice-agent` binary against a real server (started in-process
//! on its own test database), the real registry and real files: enroll,
//! upgrade, boot assessment, health gate, downgrade after a rollback, the
//! rollback command, the daemon, and the `block` slot kind.

use crate::{common, kit};
use common::images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_tests::*;
use sqlx::PgPool;
use std::time::{Duration, Instant};

/// A server with product `acme`, channel `stable`, 1.0.0 published as its
/// head at 100 %, and 1.1.0 pushed (and published, unless `publish_head` is
/// false, then promoted at 100 % so 1.0.0 becomes the base).
struct Fleet {
    app: TestApp,
    ci: String,
    secret: String,
    keys: Value,
    /// `host/repo@digest` of 1.0.0 and 1.1.0.
    image_1_0: String,
    image_1_1: String,
    digest_1_0: String,
    digest_1_1: String,
}

async fn fleet(pool: PgPool, poll_after_s: u64, promote: bool) -> Fleet {
    // Built before the server starts: locating the binary may block this thread.
    agent_bin();
    let app = kit::server(pool, poll_after_s).await;
    let repo_path = images::unique_repo("agent-e2e");
    let repo = format!("{}/{repo_path}", registry());
    let digests = kit::push_os_images(&repo_path, &["1.0.0", "1.1.0"]).await;
    let secret = app.product("acme", &repo).await;
    app.channel("acme", "stable").await;
    let ci = app.publisher(&["acme"]).await;
    let (s, b) = app
        .post(
            "/v1/products/acme/releases",
            &ci,
            json!({"version": "1.0.0", "image": format!("{repo}:1.0.0"),
                   "channels": [{"name": "stable", "percent": 100}]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = app
        .post(
            "/v1/products/acme/releases",
            &ci,
            json!({"version": "1.1.0", "image": format!("{repo}:1.1.0")}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    let f = Fleet {
        image_1_0: format!("{repo}@{}", digests[0]),
        image_1_1: format!("{repo}@{}", digests[1]),
        digest_1_0: digests[0].clone(),
        digest_1_1: digests[1].clone(),
        app,
        ci,
        secret,
        keys,
    };
    if promote {
        f.promote("1.1.0").await;
    }
    f
}

impl Fleet {
    fn opts(&self, kind: SlotKind, health: Health) -> DeviceOpts {
        DeviceOpts {
            server: self.app.url.clone(),
            product: "acme".into(),
            channel: "stable".into(),
            enrollment_secret: self.secret.clone(),
            keys: self.keys.to_string(),
            insecure: vec![registry()],
            kind,
            health,
        }
    }

    fn device(&self, kind: SlotKind, health: Health) -> Device {
        Device::new(&self.opts(kind, health))
    }

    /// Makes `version` the head at 100 % (the old head becomes the base).
    async fn promote(&self, version: &str) {
        kit::promote(&self.app, &self.ci, "stable", version).await;
    }

    /// The server's view of a device, with its events oldest first.
    async fn server_view(&self, dev: &Device) -> (Value, Vec<String>) {
        kit::device_view(&self.app, &device_id(dev).await).await
    }

    async fn channel(&self) -> Value {
        kit::channel(&self.app).await
    }
}

/// The device id the agent stored at enrollment (`status --json`).
async fn device_id(dev: &Device) -> String {
    dev.status().await["device_id"]
        .as_str()
        .expect("the device is enrolled")
        .to_string()
}

/// enroll → 1.1.0 offered → pulled, verified, written to slot B (equal to
/// umoci's unpack of the same image) → grubenv boots B → reboot (GRUB played
/// by the snippet's rules) → health check passes → `mark-good` → the server
/// shows the device on 1.1.0, `healthy`, with its events in order.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn upgrade_to_the_promoted_release_and_report_healthy(pool: PgPool) {
    let f = fleet(pool, 60, true).await;
    let dev = f.device(SlotKind::Dir, Health::Passes);

    let out = ok(&dev.run(&["enroll"]).await);
    let id = device_id(&dev).await;
    assert!(out.contains(&id), "{out}");
    let (view, events) = f.server_view(&dev).await;
    assert_eq!(view["machine_id"], dev.machine_id.as_str());
    assert_eq!(view["channel"], "stable");
    assert_eq!(view["arch"], "amd64");
    assert!(events.is_empty(), "{events:?}");

    let out = checked(&dev.run(&["check"]).await);
    assert!(
        out.contains(&format!("update available: 1.1.0 {}", f.digest_1_1)),
        "{out}"
    );
    assert_eq!(dev.reboots(), 0, "check only looks");

    let out = ok(&dev.run(&["apply"]).await);
    assert!(out.contains("applied 1.1.0"), "{out}");
    assert_eq!(dev.reboots(), 1);
    assert_eq!(
        tree(&dev.path("b")),
        umoci_tree(&f.image_1_1).await,
        "slot B differs from umoci's unpack of the same image"
    );
    assert_eq!(
        std::fs::read(dev.path("a/factory")).unwrap(),
        b"factory image",
        "the booted slot is untouched"
    );
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
    let (view, _) = f.server_view(&dev).await;
    assert_eq!(view["status"], "rebooting");
    assert_eq!(view["status_version"], "1.1.0");
    // The host status sent with the report: A runs, B is staged on trial.
    let host = &view["host"];
    assert_eq!(host["state"], "staged", "{view}");
    assert_eq!(host["reboot_pending"], true, "{view}");
    assert_eq!(host["booted"]["slot"], "A", "{view}");
    assert_eq!(host["booted"]["boot"], "good", "{view}");
    assert_eq!(host["staged"]["slot"], "B", "{view}");
    assert_eq!(host["staged"]["version"], "1.1.0", "{view}");
    assert_eq!(host["staged"]["digest"], f.digest_1_1.as_str(), "{view}");
    assert_eq!(host["staged"]["boot"], "trial", "{view}");
    assert!(view["host_at"].is_string(), "{view}");

    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]).await);
    let ab = dev.ab();
    assert!(ab.is_ok(Slot::B) && !ab.is_tried(Slot::B), "{ab:?}");

    let (view, events) = f.server_view(&dev).await;
    assert_eq!(view["current_version"], "1.1.0", "{view}");
    assert_eq!(view["current_digest"], f.digest_1_1.as_str());
    assert_eq!(view["status"], "healthy");
    assert_eq!(view["booted_slot"], "B");
    let host = &view["host"];
    assert_eq!(host["state"], "idle", "{view}");
    assert_eq!(host["reboot_pending"], false, "{view}");
    assert_eq!(host["booted"]["slot"], "B", "{view}");
    assert_eq!(host["booted"]["version"], "1.1.0", "{view}");
    assert_eq!(host["booted"]["boot"], "good", "{view}");
    assert_eq!(
        host["rollback"]["slot"], "A",
        "the factory slot stays the fallback: {view}"
    );
    assert!(host["staged"].is_null(), "{view}");
    assert_eq!(events, upgrade_events(&["healthy"]));
    let ch = f.channel().await;
    assert_eq!(ch["gate"]["reports"], 1, "{ch}");
    assert_eq!(ch["gate"]["failures"], 0, "{ch}");

    // Up to date now: nothing written, no reboot; a later boot stays in B.
    assert!(ok(&dev.run(&["apply"]).await).contains("up to date"));
    assert_eq!(dev.reboots(), 1);
    assert_eq!(dev.reboot(), Slot::B);
}

/// A health check that fails in the new slot: `failed` reported, the slot
/// marked bad, a reboot; GRUB falls back to A, where the agent reports
/// `rolled_back`. The channel's gate counts the device once, and with
/// `min_reports: 1` the rollout halts by itself.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn failing_health_check_falls_back_and_trips_the_gate(pool: PgPool) {
    let f = fleet(pool, 60, true).await;
    f.app
        .set_rollout(
            "acme",
            "stable",
            json!({"gate": {"max_failure_percent": 20, "min_reports": 1}}),
        )
        .await;
    let dev = f.device(SlotKind::Dir, Health::OnlyInSlotA);

    ok(&dev.run(&["apply"]).await);
    assert_eq!(dev.reboot(), Slot::B);
    refused(&dev.run(&["mark-good"]).await, "unhealthy");
    assert_eq!(dev.reboots(), 2, "the agent reboots after marking B bad");
    assert!(!dev.ab().is_ok(Slot::B));
    let (view, _) = f.server_view(&dev).await;
    assert_eq!(view["status"], "failed", "{view}");
    assert_eq!(view["host"]["state"], "failed", "{view}");
    assert_eq!(view["host"]["reboot_pending"], true, "{view}");
    assert_eq!(view["host"]["booted"]["slot"], "B", "{view}");
    assert_eq!(view["host"]["booted"]["boot"], "bad", "{view}");

    assert_eq!(dev.reboot(), Slot::A, "GRUB falls back to A");
    ok(&dev.run(&["mark-good"]).await);
    assert_eq!(dev.ab().next_boot(), Some(Slot::A));
    assert_eq!(
        std::fs::read(dev.path("a/factory")).unwrap(),
        b"factory image"
    );
    let (view, events) = f.server_view(&dev).await;
    assert_eq!(view["status"], "rolled_back", "{view}");
    assert_eq!(view["status_version"], "1.1.0");
    assert_eq!(view["booted_slot"], "A");
    assert!(view["current_version"].is_null(), "never ran 1.1.0: {view}");
    assert_eq!(events, upgrade_events(&["failed", "rolled_back"]));

    let ch = f.channel().await;
    assert_eq!(ch["gate"]["reports"], 1, "one device, counted once: {ch}");
    assert_eq!(ch["gate"]["failures"], 1, "{ch}");
    assert_eq!(ch["rollout"]["paused"], true, "{ch}");
    let (_, history) = f
        .app
        .get("/v1/products/acme/channels/stable/history", &f.app.admin)
        .await;
    assert_eq!(history["items"][0]["action"], "gate", "{history}");
    assert_eq!(history["items"][0]["actor"], "system");

    // Paused: a device that does not run the head is offered the base instead.
    let out = checked(&dev.run(&["check"]).await);
    assert!(out.contains("update available: 1.0.0"), "{out}");

    // Resumed by an operator, the channel offers 1.1.0 again; the agent does
    // not go round the same failure: nothing written, no reboot, no event.
    f.app
        .set_rollout("acme", "stable", json!({"paused": false}))
        .await;
    let out = checked(&dev.run(&["check"]).await);
    assert!(
        out.contains("offered 1.1.0") && out.contains("failed its boot assessment"),
        "{out}"
    );
    let grubenv = std::fs::read(dev.path("grubenv")).unwrap();
    let out = ok(&dev.run(&["apply"]).await);
    assert!(out.contains("not applying 1.1.0"), "{out}");
    assert_eq!(std::fs::read(dev.path("grubenv")).unwrap(), grubenv);
    assert_eq!(dev.reboots(), 2, "none since the failure");
    assert_eq!(f.server_view(&dev).await.1.len(), events.len());
}

/// The newest audit entry with this action.
async fn audited(f: &Fleet, action: &str) -> Value {
    let (s, b) = f
        .app
        .get(&format!("/v1/audit?action={action}"), &f.app.admin)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["items"][0].clone()
}

/// A release that failed on a device stays held back there until it is
/// cleared: by an admin (`POST /v1/devices/{id}/retry`, carried to the device
/// by its next signed answer) or on the device (`sluice-agent clear-failed`).
/// Both are audited and show in the device's events; bad requests are refused
/// with a reason.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_failed_release_is_tried_again_when_an_admin_or_the_device_clears_it(pool: PgPool) {
    let f = fleet(pool, 60, true).await;
    let dev = f.device(SlotKind::Dir, Health::OnlyInSlotA);
    let fail_once = || async {
        ok(&dev.run(&["apply"]).await);
        assert_eq!(dev.reboot(), Slot::B);
        refused(&dev.run(&["mark-good"]).await, "unhealthy");
        assert_eq!(dev.reboot(), Slot::A);
        ok(&dev.run(&["mark-good"]).await);
        let out = checked(&dev.run(&["check"]).await);
        assert!(out.contains("offered 1.1.0"), "held back: {out}");
    };
    fail_once().await;
    let id = device_id(&dev).await;
    let retry = |body: Value| {
        let app = &f.app;
        let id = id.clone();
        async move {
            app.call(
                Method::POST,
                &format!("/v1/devices/{id}/retry"),
                Some(&app.admin),
                Some(body),
            )
            .await
        }
    };

    // Bad requests: each refused with a reason, nothing changes.
    for (body, status, want) in [
        (
            json!({"version": "9.9.9"}),
            StatusCode::CONFLICT,
            "no failed release 9.9.9",
        ),
        (
            json!({"digest": "sha256:zz"}),
            StatusCode::BAD_REQUEST,
            "sha256:<64 hex>",
        ),
        (
            json!({"versoin": "1.1.0"}),
            StatusCode::BAD_REQUEST,
            "unknown field `versoin`",
        ),
    ] {
        let (s, b) = retry(body.clone()).await;
        assert_eq!(s, status, "{body}: {b}");
        assert!(b["detail"].as_str().unwrap().contains(want), "{b}");
    }
    let (s, b) = f
        .app
        .call(
            Method::POST,
            &format!("/v1/devices/{}/retry", uuid::Uuid::new_v4()),
            Some(&f.app.admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");

    // The admin asks for 1.1.0 again: the next answer carries it.
    let (s, b) = retry(json!({"version": "1.1.0"})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        b["retry"],
        json!([{"version": "1.1.0", "digest": f.digest_1_1}])
    );
    let entry = audited(&f, "device.retry").await;
    assert_eq!(entry["target"], format!("device:{id}"), "{entry}");
    assert!(
        entry["actor"].as_str().unwrap() != format!("device:{id}"),
        "{entry}"
    );
    let out = checked(&dev.run(&["check"]).await);
    assert!(out.contains("update available: 1.1.0"), "{out}");
    let (_, events) = f.server_view(&dev).await;
    assert_eq!(events.last().unwrap(), "failure_cleared", "{events:?}");
    let entry = audited(&f, "device.failure_cleared").await;
    assert_eq!(entry["actor"], format!("device:{id}"), "{entry}");
    assert_eq!(entry["after"]["by"], "admin", "{entry}");
    assert_eq!(entry["after"]["digests"], json!([f.digest_1_1]), "{entry}");
    // Nothing failed any more: a second retry has nothing to do.
    let (s, b) = retry(json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");

    // It fails again; this time someone on the device clears it.
    fail_once().await;
    let out = ok(&dev.run(&["clear-failed"]).await);
    assert!(out.contains(&format!("cleared {}", f.digest_1_1)), "{out}");
    let entry = audited(&f, "device.failure_cleared").await;
    assert_eq!(entry["after"]["by"], "local", "{entry}");
    let (view, events) = f.server_view(&dev).await;
    assert_eq!(events.last().unwrap(), "failure_cleared", "{events:?}");
    assert_eq!(view["events"][0]["version"], "1.1.0", "{view}");
    assert!(
        view["events"][0]["message"]
            .as_str()
            .unwrap()
            .contains("clear-failed"),
        "{view}"
    );
    let out = checked(&dev.run(&["check"]).await);
    assert!(out.contains("update available: 1.1.0"), "{out}");

    // A device may only speak for itself, and only in digests.
    let (s, b) = f
        .app
        .call(
            Method::POST,
            &format!("/v1/devices/{id}/failures/cleared"),
            Some(&f.app.admin),
            Some(json!({"digests": [f.digest_1_1], "by": "local"})),
        )
        .await;
    assert!(
        s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN,
        "{s}: {b}"
    );
}

/// After the server's rollback the head is the old release with
/// `downgrade: true`: the agent writes it into the other slot, and the server
/// shows the device back on the base.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn server_rollback_downgrades_the_device(pool: PgPool) {
    let f = fleet(pool, 60, true).await;
    let dev = f.device(SlotKind::Dir, Health::Passes);
    assert_eq!(dev.upgrade("1.1.0").await, Slot::B);

    let (s, b) = f
        .app
        .post(
            "/v1/products/acme/channels/stable/rollback",
            &f.app.admin,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let out = checked(&dev.run(&["check"]).await);
    assert!(
        out.contains(&format!(
            "update available: 1.0.0 {} (downgrade)",
            f.digest_1_0
        )),
        "{out}"
    );
    assert_eq!(dev.upgrade("1.0.0").await, Slot::A);
    assert_eq!(
        tree(&dev.path("a")),
        umoci_tree(&f.image_1_0).await,
        "slot A holds exactly 1.0.0 (the factory files are gone)"
    );
    assert_eq!(
        tree(&dev.path("b")),
        umoci_tree(&f.image_1_1).await,
        "slot B still holds 1.1.0"
    );
    let (view, events) = f.server_view(&dev).await;
    assert_eq!(view["current_version"], "1.0.0", "{view}");
    assert_eq!(view["current_digest"], f.digest_1_0.as_str());
    assert_eq!(view["status"], "healthy");
    assert_eq!(view["booted_slot"], "A");
    assert_eq!(events.iter().filter(|e| *e == "healthy").count(), 2);
    assert!(ok(&dev.run(&["apply"]).await).contains("up to date"));
}

/// `rollback` is refused while the other slot holds no complete image, with
/// nothing changed; once both slots hold releases it makes the other slot
/// primary and reboots, the slot boots on trial, and the boot assessment
/// tells the server which release the device runs again.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn rollback_command_switches_to_the_other_slot(pool: PgPool) {
    let f = fleet(pool, 60, false).await;
    let dev = f.device(SlotKind::Dir, Health::Passes);
    ok(&dev.run(&["enroll"]).await);
    let before = std::fs::read(dev.path("grubenv")).ok();
    refused(
        &dev.run(&["rollback"]).await,
        "slot B holds no complete image",
    );
    assert_eq!(std::fs::read(dev.path("grubenv")).ok(), before);
    assert_eq!(dev.reboots(), 0);

    assert_eq!(dev.upgrade("1.0.0").await, Slot::B);
    f.promote("1.1.0").await;
    assert_eq!(dev.upgrade("1.1.0").await, Slot::A);
    assert_eq!(dev.reboots(), 2);

    let out = ok(&dev.run(&["rollback"]).await);
    assert!(out.contains("rolling back to slot B"), "{out}");
    assert_eq!(dev.reboots(), 3);
    assert_eq!(dev.ab().next_boot(), Some(Slot::B));
    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]).await);
    let ab = dev.ab();
    assert!(ab.is_ok(Slot::B) && !ab.is_tried(Slot::B), "{ab:?}");
    assert!(ab.is_ok(Slot::A), "A stays a fallback: {ab:?}");
    let status = dev.status().await;
    assert_eq!(status["booted"]["slot"], "B");
    assert_eq!(status["booted"]["version"], "1.0.0");
    assert_eq!(status["booted"]["boot"], "good");
    assert_eq!(status["rollback"]["version"], "1.1.0");
    assert_eq!(status["state"], "idle");
    let (view, _) = f.server_view(&dev).await;
    assert_eq!(view["current_version"], "1.0.0", "{view}");
    assert_eq!(view["status"], "healthy");
    assert_eq!(view["booted_slot"], "B");
    // The server still wants 1.1.0 for this device and says so.
    let out = checked(&dev.run(&["check"]).await);
    assert!(out.contains("update available: 1.1.0"), "{out}");
}

/// Waits until the server shows the device with `status` on `version`.
async fn wait_for(f: &Fleet, dev: &Device, status: &str, version: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (view, _) = f.server_view(dev).await;
        if view["status"] == status && view["status_version"] == version {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "device never reached {status} on {version}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the daemon has asked for reboot number `n`; then it only
/// waits for the machine to go down (it does not exit: a restart in the same
/// boot must not write either), and SIGTERM stops it cleanly.
async fn asks_for_reboot(dev: &Device, daemon: &mut tokio::process::Child, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while dev.reboots() < n {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the daemon exited before asking for reboot {n}"
        );
        assert!(Instant::now() < deadline, "no reboot {n} asked for");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = dev.status().await;
    assert_eq!(status["reboot_pending"], true, "{status}");
    assert_eq!(status["state"], "staged", "{status}");
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
    let pid = rustix::process::Pid::from_raw(daemon.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let st = tokio::time::timeout(Duration::from_secs(10), daemon.wait())
        .await
        .expect("the daemon stops on SIGTERM")
        .unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    assert_eq!(dev.reboots(), n, "asked once");
}

/// `sluice-agent run` with the server's `poll_after_s` at 1: it installs the
/// head and waits for the reboot it asked for, assesses the new slot after
/// the "reboot", picks up a promotion without being asked, and stops cleanly
/// on SIGTERM.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn daemon_follows_promotions_and_stops_on_sigterm(pool: PgPool) {
    let f = fleet(pool, 1, false).await;
    let dev = f.device(SlotKind::Dir, Health::Passes);

    let mut daemon = dev.command(&["run"]).spawn().unwrap();
    asks_for_reboot(&dev, &mut daemon, 1).await;
    assert_eq!(dev.reboot(), Slot::B);

    let mut daemon = dev.command(&["run"]).spawn().unwrap();
    wait_for(&f, &dev, "healthy", "1.0.0").await;
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "up to date: it keeps polling"
    );
    f.promote("1.1.0").await;
    asks_for_reboot(&dev, &mut daemon, 2).await;
    assert_eq!(dev.ab().next_boot(), Some(Slot::A));

    assert_eq!(dev.reboot(), Slot::A);
    let mut daemon = dev.command(&["run"]).spawn().unwrap();
    wait_for(&f, &dev, "healthy", "1.1.0").await;
    // Let it reach its wait between polls, then ask it to stop.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = rustix::process::Pid::from_raw(daemon.id().unwrap() as i32).unwrap();
    let asked = Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let st = tokio::time::timeout(Duration::from_secs(5), daemon.wait())
        .await
        .expect("the daemon stops within 5 s of SIGTERM")
        .unwrap();
    assert_eq!(
        st.code(),
        Some(0),
        "a clean stop, not death by signal: {st}"
    );
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert_eq!(dev.reboots(), 2);
    let status = dev.status().await;
    assert_eq!(status["state"], "idle", "{status}");
    assert_eq!(status["booted"]["version"], "1.1.0");
}

/// The `block` slot kind, with regular files standing in for partitions:
/// the release becomes an ext4 filesystem in partition B (read back with
/// `debugfs`, equal to umoci's unpack), the partition keeps its size and
/// partition A is not touched.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn block_slot_gets_an_ext4_filesystem(pool: PgPool) {
    let f = fleet(pool, 60, true).await;
    let dev = f.device(SlotKind::Block, Health::Passes);
    assert_eq!(dev.upgrade("1.1.0").await, Slot::B);

    let part = dev.path("b.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), PARTITION_BYTES);
    let a = std::fs::read(dev.path("a.part")).unwrap();
    assert!(a.iter().all(|&b| b == 0), "partition A was written");
    let out = tokio::process::Command::new("debugfs")
        .args(["-R", "cat /etc/os-release"])
        .arg(&part)
        .output()
        .await
        .expect("debugfs (e2fsprogs) is installed");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ID=acme\nVERSION_ID=1.1.0\n"
    );
    // The whole tree, dumped with owners and modes, against umoci's unpack.
    let dump = tempfile::tempdir().unwrap();
    let st = tokio::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dump.path().display()))
        .arg(&part)
        .output()
        .await
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    // `rdump /` writes the root's entries straight into the folder.
    let root = dump.path();
    std::fs::remove_dir(root.join("lost+found")).unwrap();
    // rdump chowns after chmod, which clears set-id bits: compare without
    // them here and check them in the filesystem itself.
    let strip = |t: std::collections::BTreeMap<_, Entry>| {
        t.into_iter()
            .map(|(p, (mode, u, g, c))| (p, (mode & !0o6000, u, g, c)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert!(
        strip(tree(root)) == strip(umoci_tree(&f.image_1_1).await),
        "partition B differs from umoci's unpack of the same image"
    );
    let out = tokio::process::Command::new("debugfs")
        .args(["-R", "stat /usr/bin/su"])
        .arg(&part)
        .output()
        .await
        .unwrap();
    let stat = String::from_utf8_lossy(&out.stdout);
    assert!(stat.contains("Mode:  04755"), "{stat}");

    let (view, _) = f.server_view(&dev).await;
    assert_eq!(view["current_version"], "1.1.0", "{view}");
    assert_eq!(view["status"], "healthy");
}

/// `enroll` against the real server: a wrong secret is refused with a
/// one-line reason and nothing stored; the right one makes the device
/// visible in the fleet; enrolling again with the same machine id (state
/// lost) gets the same device back.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn enroll_with_the_product_secret(pool: PgPool) {
    let f = fleet(pool, 60, false).await;
    let mut opts = f.opts(SlotKind::Dir, Health::Passes);
    opts.enrollment_secret = "not-the-secret".into();
    let bad = Device::new(&opts);
    refused(&bad.run(&["enroll"]).await, "enrollment refused");
    assert!(!bad.path("state/device.json").exists());
    let (_, list) = f.app.get("/v1/devices?product=acme", &f.app.admin).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");

    let dev = f.device(SlotKind::Dir, Health::Passes);
    ok(&dev.run(&["enroll"]).await);
    let id = device_id(&dev).await;
    let (_, list) = f.app.get("/v1/devices?product=acme", &f.app.admin).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["id"], id.as_str());
    assert_eq!(items[0]["machine_id"], dev.machine_id.as_str());

    std::fs::remove_file(dev.path("state/device.json")).unwrap();
    ok(&dev.run(&["enroll"]).await);
    assert_eq!(device_id(&dev).await, id, "same machine, same device");
    // The token works: a check is answered and signed for this device.
    assert!(checked(&dev.run(&["check"]).await).contains("update available: 1.0.0"));
}

/// `GET .../channels/stable/transfer`.
async fn transfer(app: &TestApp, token: &str) -> Value {
    let (s, b) = app
        .get("/v1/products/acme/channels/stable/transfer", token)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// The number after `before` in an agent's log line (`... fetched in 4 range
/// requests (112846 bytes)`).
fn logged_number(log: &str, before: &str) -> u64 {
    let at = log
        .find(before)
        .unwrap_or_else(|| panic!("no {before:?} in {log}"))
        + before.len();
    log[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// `zstd:chunked` releases through the real server and agent: the channel's
/// transfer estimate (`GET .../transfer`) says how many bytes a device on
/// the base fetches for the head, and the agent's partial pull fetches
/// that (plus at most the coalesced gaps), not the whole image; the slot
/// equals umoci's unpack of the same content. A gzip head is counted whole.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_chunked_release_is_pulled_partially_as_the_server_estimates(pool: PgPool) {
    let f = fleet(pool, 60, false).await;
    let repo = f.image_1_0.split('@').next().unwrap().to_string();
    // The compressed bytes of the head's tables of contents, from its layers.
    let mut tables = 0;
    for (from, version) in [(&f.image_1_0, "2.0.0"), (&f.image_1_1, "2.1.0")] {
        recompress(from, "zstd:chunked", &format!("{repo}:{version}")).await;
        let (s, b) = f
            .app
            .post(
                "/v1/products/acme/releases",
                &f.ci,
                json!({"version": version, "image": format!("{repo}:{version}")}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let layers = &b["platforms"][0]["layers"];
        assert!(
            layers.as_array().is_some_and(|l| !l.is_empty()
                && l.iter().all(|l| {
                    l["annotations"]["io.containers.zstd-chunked.manifest-position"].is_string()
                })),
            "{b}"
        );
        tables = layers
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let pos = l["annotations"]["io.containers.zstd-chunked.manifest-position"]
                    .as_str()
                    .unwrap();
                pos.split(':').nth(1).unwrap().parse::<u64>().unwrap()
            })
            .sum::<u64>();
    }
    // 1.0.0 (gzip, no tables) → 2.0.0: nothing to copy, every file fetched.
    f.promote("2.0.0").await;
    let t = transfer(&f.app, &f.ci).await;
    assert_eq!(
        (&t["base"], &t["head"]),
        (&json!("1.0.0"), &json!("2.0.0")),
        "{t}"
    );
    let p = &t["platforms"][0];
    let (expected, head) = (
        p["expected_bytes"].as_u64().unwrap(),
        p["head_bytes"].as_u64().unwrap(),
    );
    assert!(expected <= head && expected >= head / 2, "{t}");
    assert!(
        p["note"].as_str().unwrap().contains("every file fetched"),
        "{t}"
    );

    let dev = f.device(SlotKind::Dir, Health::Passes);
    ok(&dev.run(&["apply"]).await);
    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]).await);

    // 2.0.0 → 2.1.0, both zstd:chunked: the tables and what changed.
    f.promote("2.1.0").await;
    let t = transfer(&f.app, &f.ci).await;
    let p = &t["platforms"][0];
    let expected = p["expected_bytes"].as_u64().unwrap();
    let head = p["head_bytes"].as_u64().unwrap();
    assert!(
        p["partial_layers"].as_u64().unwrap() >= 1 && p["full_layers"] == 0,
        "{t}"
    );
    // (These images are small: the changed files' neighbours within 4 KiB
    // come along, so most of the blob is fetched. `agent/tests/it/upgrade.rs`
    // shows the saving on a bigger one.)
    assert!(expected < head, "{t}");

    let out = dev.run(&["apply"]).await;
    let log = ok(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("applied 2.1.0"), "{log}");
    assert!(!log.contains("partial pull failed"), "{log}");
    // The server counts the requests the agent makes.
    let fetched = logged_number(&log, "ranges (");
    assert_eq!(
        fetched + tables,
        expected,
        "the agent fetched {fetched} bytes plus {tables} of tables; the server expected {expected}: {log}"
    );
    assert_eq!(dev.reboot(), Slot::A);
    assert_eq!(tree(&dev.path("a")), umoci_tree(&f.image_1_1).await);
}

/// Download-only staging and a coordinated reboot in the window, with the
/// real agent and server (the server's clock injected): outside the
/// Saturday window both Berlin devices write 1.1.0 and wait, GRUB still
/// boots A, and a power cut changes nothing; inside it the first takes the
/// site's one reboot lease and reboots, the second waits for the lease and
/// reboots once the first passed its assessment and gave the lease back.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn devices_stage_at_once_and_reboot_in_their_window_one_lease_at_a_time(pool: PgPool) {
    let f = fleet(pool, 60, true).await;
    let (s, b) = f
        .app
        .call(
            Method::PUT,
            "/v1/products/acme/channels/stable/reboot-policy",
            Some(&f.app.admin),
            Some(json!({
                "windows": [{"days": "Sat", "start": "02:00", "end": "04:00", "time_zone": "Europe/Berlin"}],
                "lease": {"max_devices": 1, "per_label": "site"},
            })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let devices: Vec<Device> = (0..2)
        .map(|_| {
            let d = f.device(SlotKind::Dir, Health::Passes);
            d.edit_config(|c| {
                c.labels = [("site".to_string(), "berlin".to_string())].into();
            });
            d
        })
        .collect();
    let (first, second) = (&devices[0], &devices[1]);

    // Friday noon: written at once, rebooted later.
    f.app
        .state
        .clock
        .set(time::macros::datetime!(2027-07-09 12:00 UTC));
    for dev in &devices {
        let out = ok(&dev.run(&["apply"]).await);
        assert!(
            out.contains("waits for window Sat 02:00–04:00 Europe/Berlin"),
            "{out}"
        );
        assert_eq!(dev.reboots(), 0);
        assert_ne!(dev.ab().next_boot(), Some(Slot::B), "B is not armed");
        let status = dev.status().await;
        assert_eq!(status["state"], "ready", "{status}");
        let (view, _) = f.server_view(dev).await;
        assert_eq!(
            (view["status"].as_str(), view["status_version"].as_str()),
            (Some("staged"), Some("1.1.0")),
            "{view}"
        );
    }
    assert_eq!(
        tree(&first.path("b")),
        umoci_tree(&f.image_1_1).await,
        "the staged slot holds 1.1.0 already"
    );
    let id = device_id(first).await;
    let why = f.app.get_ok(&format!("/v1/devices/{id}")).await;
    assert_eq!(why["head_status"]["reason"], "staged", "{why}");
    // A power cut before the window: A boots, nothing is fetched again.
    assert_eq!(first.reboot(), Slot::A);
    let out = ok(&first.run(&["apply"]).await);
    assert!(out.contains("waits for window"), "{out}");
    let (_, events) = f.server_view(first).await;
    assert_eq!(
        events.iter().filter(|e| *e == "download_started").count(),
        1,
        "{events:?}"
    );

    // Saturday 02:30 in Berlin: one lease for the site.
    f.app
        .state
        .clock
        .set(time::macros::datetime!(2027-07-10 00:30 UTC));
    let out = ok(&first.run(&["apply"]).await);
    assert!(out.contains("applied 1.1.0"), "{out}");
    assert_eq!(
        (first.reboots(), first.ab().next_boot()),
        (1, Some(Slot::B))
    );
    let out = ok(&second.run(&["apply"]).await);
    assert!(
        out.contains("waits for reboot lease") && out.contains("1 of 1"),
        "{out}"
    );
    assert_eq!(second.reboots(), 0);
    let leases = f
        .app
        .get_ok("/v1/products/acme/channels/stable/leases")
        .await;
    assert!(leases.to_string().contains(&id), "{leases}");

    // The first boots B, passes, and gives the lease back on its next turn.
    assert_eq!(first.reboot(), Slot::B);
    ok(&first.run(&["mark-good"]).await);
    assert!(ok(&first.run(&["apply"]).await).contains("up to date"));
    let out = ok(&second.run(&["apply"]).await);
    assert!(out.contains("applied 1.1.0"), "{out}");
    assert_eq!(second.reboots(), 1);
    assert_eq!(second.reboot(), Slot::B);
}
