//! The real `sluice-agent` binary against a real server (started in-process
//! on its own test database), the real registry and real files: enroll,
//! upgrade, boot assessment, health gate, downgrade after a rollback, the
//! rollback command, the daemon, and the `block` slot kind.

#[path = "../../server/tests/common/mod.rs"]
mod common;
#[path = "../../server/tests/common/images.rs"]
mod images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_agent::bootloader::Slot;
use sluice_tests::*;
use sqlx::PgPool;

/// A server with product `acme`, channel `stable`, 1.0.0 published as its
/// head at 100 %, and 1.1.0 pushed (and published, unless `publish_head` is
/// false, then promoted at 100 % so 1.0.0 becomes the base).
struct Fleet {
    app: TestApp,
    ci: String,
    secret: String,
    keys: Value,
    /// `host/repo@digest` of 1.1.0.
    image_1_1: String,
    digest_1_1: String,
}

async fn fleet(pool: PgPool, poll_after_s: u64, promote: bool) -> Fleet {
    // Built before the server starts: locating the binary may block this thread.
    agent_bin();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path().join("data"));
    config.poll_after_s = poll_after_s;
    let app = TestApp::spawn_with(pool, config, dir).await;
    let reg = registry();
    let repo_path = images::unique_repo("agent-e2e");
    let repo = format!("{reg}/{repo_path}");
    let mut digests = Vec::new();
    for v in ["1.0.0", "1.1.0"] {
        let layers: Vec<images::Layer> = os_layers(v)
            .into_iter()
            .map(|l| images::Layer {
                diff_id: images::digest(&l.tar),
                data: l.gz,
            })
            .collect();
        let (d, _) = images::push_platform(
            &reg,
            &repo_path,
            Some(v),
            images::Format::Oci,
            "amd64",
            &layers,
        )
        .await;
        digests.push(d);
    }
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
        image_1_1: format!("{repo}@{}", digests[1]),
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
            keys: self.keys.clone(),
            registry: registry(),
            kind,
            health,
        }
    }

    fn device(&self, kind: SlotKind, health: Health) -> Device {
        Device::new(&self.opts(kind, health))
    }

    /// Makes `version` the head at 100 % (the old head becomes the base).
    async fn promote(&self, version: &str) {
        let (s, b) = self
            .app
            .post(
                "/v1/products/acme/channels/stable/promote",
                &self.ci,
                json!({"version": version, "percent": 100}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }

    /// The server's view of a device, with its events oldest first.
    async fn server_view(&self, dev: &Device) -> (Value, Vec<String>) {
        let id = device_id(dev).await;
        let (s, b) = self
            .app
            .get(&format!("/v1/devices/{id}"), &self.app.admin)
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let mut events: Vec<String> = b["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect();
        events.reverse();
        (b, events)
    }

    async fn channel(&self) -> Value {
        let (s, b) = self
            .app
            .get("/v1/products/acme/channels/stable", &self.app.admin)
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        b
    }
}

/// The device id the agent stored at enrollment (`status --json`).
async fn device_id(dev: &Device) -> String {
    let status: Value = serde_json::from_str(&ok(&dev.run(&["status", "--json"]).await)).unwrap();
    status["device_id"]
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

    let out = ok(&dev.run(&["check"]).await);
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

    assert_eq!(dev.reboot(), Slot::B);
    ok(&dev.run(&["mark-good"]).await);
    let ab = dev.ab();
    assert!(ab.is_ok(Slot::B) && !ab.is_tried(Slot::B), "{ab:?}");

    let (view, events) = f.server_view(&dev).await;
    assert_eq!(view["current_version"], "1.1.0", "{view}");
    assert_eq!(view["current_digest"], f.digest_1_1.as_str());
    assert_eq!(view["status"], "healthy");
    assert_eq!(view["booted_slot"], "B");
    assert_eq!(
        events,
        [
            "download_started",
            "downloaded",
            "applied",
            "rebooting",
            "healthy"
        ]
    );
    let ch = f.channel().await;
    assert_eq!(ch["gate"]["reports"], 1, "{ch}");
    assert_eq!(ch["gate"]["failures"], 0, "{ch}");

    // Up to date now: nothing written, no reboot; a later boot stays in B.
    assert!(ok(&dev.run(&["apply"]).await).contains("up to date"));
    assert_eq!(dev.reboots(), 1);
    assert_eq!(dev.reboot(), Slot::B);
}
