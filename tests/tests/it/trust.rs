//! Attacks on what the signatures mean, through the real `sluice-agent`
//! binary and the real server: a tampering proxy between them rewrites the
//! question (channel, arch, current digest) or re-signs answers with a
//! revoked key; a device that moves channel keeps updating; and a fleet of
//! agents keeps updating across two rotations of each key role, with a
//! device offline through all of them catching up.

use crate::{common, kit};
use common::images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_tests::*;
use sqlx::PgPool;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What the proxy does to what passes through it.
#[derive(Default)]
struct Rules {
    /// (from, to) replacements in each request line.
    request_line: Vec<(String, String)>,
    /// Re-signs resolution answers with this key (plain signature).
    resign: Option<sluice_protocol::ResponseSigner>,
    /// Answers `GET /v1/keys/lists` with this body itself.
    lists: Option<Vec<u8>>,
}

/// A tampering proxy on loopback in front of the server: one request per
/// connection (it asks the server to close), the request line rewritten
/// and answers re-signed as [`Rules`] say.
struct Proxy {
    url: String,
    rules: Arc<Mutex<Rules>>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let rules = Arc::new(Mutex::new(Rules::default()));
        let r = rules.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, up) = (r.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = relay(conn, &up, &r);
                });
            }
        });
        Proxy { url, rules }
    }

    fn set(&self, f: impl FnOnce(&mut Rules)) {
        f(&mut self.rules.lock().unwrap());
    }
}

fn relay(client: TcpStream, upstream: &str, rules: &Mutex<Rules>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if !lower.starts_with("connection:") {
            head.push(line);
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let (line_rules, resign, lists) = {
        let r = rules.lock().unwrap();
        (r.request_line.clone(), r.resign.clone(), r.lists.clone())
    };
    let mut client = client;
    if let Some(body) = lists
        && head[0].contains("/v1/keys/lists")
    {
        client.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )?;
        return client.write_all(&body);
    }
    for (from, to) in &line_rules {
        head[0] = head[0].replace(from, to);
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(format!("{}Connection: close\r\n\r\n", head.concat()).as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |i| i + 4);
    let (rhead, rbody) = answer.split_at(split);
    let mut out = Vec::new();
    match resign {
        Some(signer) if head[0].contains("/resolve") => {
            let text = String::from_utf8_lossy(rhead);
            for l in text.split("\r\n").filter(|l| !l.is_empty()) {
                if !l.to_ascii_lowercase().starts_with("sluice-signature:") {
                    out.extend_from_slice(format!("{l}\r\n").as_bytes());
                }
            }
            out.extend_from_slice(
                format!("sluice-signature: {}\r\n\r\n", signer.sign_header(rbody)).as_bytes(),
            );
            out.extend_from_slice(rbody);
        }
        _ => out = answer.clone(),
    }
    client.write_all(&out)
}

/// A server with product `acme`, channels `stable` and `lts`, and the
/// OS-like images of `versions` pushed (not published).
struct Setup {
    app: TestApp,
    repo: String,
    secret: String,
    /// Digest of each pushed version.
    digests: Vec<(String, String)>,
}

async fn setup(pool: PgPool, versions: &[&str]) -> Setup {
    agent_bin();
    let app = kit::server(pool, 60).await;
    let repo_path = images::unique_repo("trust-e2e");
    let repo = format!("{}/{repo_path}", registry());
    let pushed = kit::push_os_images(&repo_path, versions).await;
    let digests = versions.iter().map(|v| v.to_string()).zip(pushed).collect();
    let secret = app.product("acme", &repo).await;
    app.channel("acme", "stable").await;
    app.channel("acme", "lts").await;
    Setup {
        app,
        repo,
        secret,
        digests,
    }
}

impl Setup {
    fn digest(&self, version: &str) -> &str {
        &self.digests.iter().find(|(v, _)| v == version).unwrap().1
    }

    async fn publish(&self, version: &str, channels: Value) {
        let (s, b) = self
            .app
            .post(
                "/v1/products/acme/releases",
                &self.app.admin,
                json!({"version": version, "image": format!("{}:{version}", self.repo), "channels": channels}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }

    async fn promote(&self, channel: &str, version: &str) {
        kit::promote(&self.app, &self.app.admin, channel, version).await;
    }

    async fn keys_file(&self) -> Value {
        self.app.call(Method::GET, "/v1/keys", None, None).await.1
    }

    async fn device(&self, server: &str, channel: &str) -> Device {
        Device::new(&DeviceOpts {
            server: server.into(),
            product: "acme".into(),
            channel: channel.into(),
            enrollment_secret: self.secret.clone(),
            keys: self.keys_file().await.to_string(),
            insecure: vec![registry()],
            kind: SlotKind::Dir,
            health: Health::Passes,
        })
    }
}

/// What a refused attack must leave: nothing written, nothing switched.
fn untouched(dev: &Device, grubenv: &[u8], reboots: usize, slot: &str, tree_before: &Tree) {
    assert_eq!(std::fs::read(dev.path("grubenv")).unwrap(), grubenv);
    assert_eq!(dev.reboots(), reboots);
    assert_eq!(
        &tree(&dev.path(slot)),
        tree_before,
        "slot {slot} was written"
    );
}

type Tree = std::collections::BTreeMap<std::path::PathBuf, Entry>;

/// Mix-and-match by rewriting the channel: a proxy turns the device's
/// `/channels/stable/resolve` into `/channels/lts/resolve`, a channel whose
/// head was set by a rollback. The server's genuine, signed answer for lts
/// says 1.0.0 with `downgrade: true`; it names channel lts, so the device on
/// stable refuses it instead of going back to 1.0.0.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_answer_for_a_rewritten_channel_is_refused(pool: PgPool) {
    let s = setup(pool, &["1.0.0", "1.1.0"]).await;
    s.publish(
        "1.0.0",
        json!([{"name": "stable", "percent": 100}, {"name": "lts", "percent": 100}]),
    )
    .await;
    s.publish(
        "1.1.0",
        json!([{"name": "stable", "percent": 100}, {"name": "lts", "percent": 100}]),
    )
    .await;
    let (st, b) = s
        .app
        .post(
            "/v1/products/acme/channels/lts/rollback",
            &s.app.admin,
            json!({}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let proxy = Proxy::start(&s.app.url);
    let dev = s.device(&proxy.url, "stable").await;
    assert_eq!(dev.upgrade("1.1.0").await, Slot::B);

    proxy.set(|r| r.request_line = vec![("/channels/stable/".into(), "/channels/lts/".into())]);
    let (grubenv, reboots, a) = (
        std::fs::read(dev.path("grubenv")).unwrap(),
        dev.reboots(),
        tree(&dev.path("a")),
    );
    refused(
        &dev.run(&["apply"]).await,
        "for channel lts, not the stable this device asked about (the request was rewritten",
    );
    untouched(&dev, &grubenv, reboots, "a", &a);

    // Without the proxy's rewrite the device is up to date on stable.
    proxy.set(|r| r.request_line.clear());
    assert!(ok(&dev.run(&["apply"]).await).contains("up to date"));
}

/// Mix-and-match by rewriting the architecture: an amd64 device's
/// `arch=amd64` becomes `arch=arm64`, and the server's signed answer offers
/// the arm64 image of the release's index. It names arch arm64: refused
/// before anything is pulled.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_answer_for_a_rewritten_arch_is_refused(pool: PgPool) {
    let s = setup(pool, &[]).await;
    // Random layers: the attack must be refused before anything is pulled.
    let reg = registry();
    let repo_path = s.repo.trim_start_matches(&format!("{reg}/")).to_string();
    images::push_index(&reg, &repo_path, "2.0.0", &["amd64", "arm64"]).await;
    s.publish("2.0.0", json!([{"name": "stable", "percent": 100}]))
        .await;

    let proxy = Proxy::start(&s.app.url);
    proxy.set(|r| r.request_line = vec![("arch=amd64".into(), "arch=arm64".into())]);
    let dev = s.device(&proxy.url, "stable").await;
    ok(&dev.run(&["enroll"]).await);
    refused(
        &dev.run(&["apply"]).await,
        "for arch arm64, not the amd64 this device asked about (the request was rewritten",
    );
    assert!(tree(&dev.path("b")).is_empty(), "slot B was written");
    assert_eq!(dev.reboots(), 0);
    assert!(!dev.path("grubenv").exists() || !dev.ab().is_ok(Slot::B));

    proxy.set(|r| r.request_line.clear());
    let out = checked(&dev.run(&["check"]).await);
    assert!(out.contains("update available: 2.0.0"), "{out}");
}

/// The `current` digest rewritten: a device on 1.1.0 is made to claim
/// 1.0.0, so the server tells it to install 1.1.0 again (a needless
/// reflash and reboot, at the attacker's will). The answer names the
/// digest it was asked about: refused.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_answer_for_a_rewritten_current_digest_is_refused(pool: PgPool) {
    let s = setup(pool, &["1.0.0", "1.1.0"]).await;
    s.publish("1.0.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    s.publish("1.1.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    let proxy = Proxy::start(&s.app.url);
    let dev = s.device(&proxy.url, "stable").await;
    assert_eq!(dev.upgrade("1.1.0").await, Slot::B);

    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    proxy.set(|r| r.request_line = vec![(hex(s.digest("1.1.0")), hex(s.digest("1.0.0")))]);
    let (grubenv, reboots, a) = (
        std::fs::read(dev.path("grubenv")).unwrap(),
        dev.reboots(),
        tree(&dev.path("a")),
    );
    refused(&dev.run(&["apply"]).await, "for current digest");
    untouched(&dev, &grubenv, reboots, "a", &a);
}

/// Issue 12, 4: a device moved to another channel (whose last change is
/// older than its old channel's) keeps getting answers: the serial is the
/// product's highest, so it never goes down.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_device_that_moves_to_another_channel_keeps_updating(pool: PgPool) {
    let s = setup(pool, &["1.0.0", "1.1.0"]).await;
    s.publish("1.0.0", json!([{"name": "lts", "percent": 100}]))
        .await;
    s.publish("1.1.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    let dev = s.device(&s.app.url, "stable").await;
    assert_eq!(dev.upgrade("1.1.0").await, Slot::B);

    dev.edit_config(|c| c.channel = "lts".into());
    let out = checked(&dev.run(&["check"]).await);
    assert!(out.contains("up to date"), "1.0.0 is older: {out}");
    s.promote("lts", "1.1.0").await;
    assert!(ok(&dev.run(&["apply"]).await).contains("up to date"));
    // A change on the old channel raises the serial; lts still answers.
    s.promote("stable", "1.0.0").await;
    assert!(checked(&dev.run(&["check"]).await).contains("up to date"));
}

/// The key list as an admin sees it.
async fn status(app: &TestApp) -> Value {
    app.state.checkins.flush().await;
    let (s, b) = app.get("/v1/keys/status", &app.admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// The current key of a role.
fn current(status: &Value, role: &str) -> String {
    status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == role && k["state"] == "current")
        .unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn post_ok(app: &TestApp, path: &str, body: Value) -> Value {
    let (s, b) = app.post(path, &app.admin, body).await;
    assert_eq!(s, StatusCode::OK, "{path}: {b}");
    b
}

/// `keys_version` of a device's status.
async fn held(dev: &Device) -> u64 {
    dev.status().await["keys_version"].as_u64().unwrap_or(0)
}

/// A fleet of real agents, each built with `GET /v1/keys` as its keys
/// file, keeps updating across two rotations of each role (image and
/// response two-phase, root at once) and the revocation of the first
/// response and image keys; a device offline through all of it catches up
/// along the chain of lists, and a device built with the first keys file
/// bootstraps from an old list. The dashboard's "devices that hold key K:
/// N of M" gates activation.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_fleet_keeps_updating_across_rotations(pool: PgPool) {
    let s = setup(pool, &["1.0.0", "1.1.0", "1.2.0", "1.3.0"]).await;
    s.publish("1.0.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    let app = &s.app;
    let first = status(app).await;
    let (resp1, img1) = (current(&first, "response"), current(&first, "image"));
    let fleet: Vec<Device> = futures_join(3, || s.device(&app.url, "stable")).await;
    let offline = s.device(&app.url, "stable").await;
    let late = s.device(&app.url, "stable").await;
    for d in fleet.iter().chain([&offline]) {
        assert_eq!(d.upgrade("1.0.0").await, Slot::B);
        assert_eq!(held(d).await, first["version"].as_u64().unwrap());
    }

    // Response key, phase 1: published as next.
    let next = post_ok(app, "/v1/keys/response/rotate", json!({})).await;
    assert_eq!(next["state"], "next");
    let resp2 = next["key_id"].as_str().unwrap().to_string();
    for d in &fleet {
        checked(&d.run(&["check"]).await); // learns the list
        checked(&d.run(&["check"]).await); // says so
    }
    let st = status(app).await;
    let k = st["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == resp2.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (k["held_by"].as_i64(), st["active_devices"].as_i64()),
        (Some(3), Some(4)),
        "{st}"
    );
    // Phase 2 waits for the fleet: 3 of 4 is not everyone.
    let (code, b) = app
        .post("/v1/keys/response/activate", &app.admin, json!({}))
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("3 of 4"), "{b}");
    assert_eq!(
        current(&status(app).await, "response"),
        resp1,
        "nothing changed"
    );
    post_ok(
        app,
        "/v1/keys/response/activate",
        json!({"min_percent": 75}),
    )
    .await;
    assert_eq!(current(&status(app).await, "response"), resp2);

    // Every device keeps updating, with answers signed by the new key.
    s.publish("1.1.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    for d in &fleet {
        assert_eq!(d.upgrade("1.1.0").await, Slot::A);
    }

    // Image key, then root, then a second round of each, activated at once
    // (force): devices meet keys they do not hold and fetch the lists.
    for role in ["image", "root", "response", "image", "root"] {
        post_ok(app, &format!("/v1/keys/{role}/rotate"), json!({})).await;
        if role != "root" {
            post_ok(
                app,
                &format!("/v1/keys/{role}/activate"),
                json!({"force": true}),
            )
            .await;
        }
        for d in &fleet {
            checked(&d.run(&["check"]).await);
        }
    }
    let st = status(app).await;
    assert_ne!(current(&st, "image"), img1);
    let roots = st["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["role"] == "root")
        .count();
    assert_eq!(
        roots, 3,
        "two rotations: two retired roots and the current one: {st}"
    );
    s.publish("1.2.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    for d in &fleet {
        assert_eq!(d.upgrade("1.2.0").await, Slot::B);
    }

    // The first response and image keys are revoked: they leave the list.
    for (role, id) in [("response", &resp1), ("image", &img1)] {
        let b = post_ok(
            app,
            &format!("/v1/keys/{role}/revoke"),
            json!({"key_id": id}),
        )
        .await;
        assert_eq!(b["key_id"], id.as_str());
    }
    let keys = s.keys_file().await;
    assert!(!keys.to_string().contains(&resp1), "{keys}");
    s.publish("1.3.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    for d in &fleet {
        assert_eq!(d.upgrade("1.3.0").await, Slot::A);
    }
    let newest = status(app).await["version"].as_u64().unwrap();
    for d in &fleet {
        assert_eq!(held(d).await, newest);
    }

    // Offline through two rotations of every role: it follows the chain
    // (through both root rotations) and installs the newest release.
    assert_eq!(offline.upgrade("1.3.0").await, Slot::A);
    assert_eq!(held(&offline).await, newest);
    // Built with the first keys file, whose keys are all revoked or retired
    // by now: it starts from the newest list they signed and follows on.
    assert_eq!(late.upgrade("1.3.0").await, Slot::B);
    assert_eq!(held(&late).await, newest);
    // Built today, with today's `GET /v1/keys`.
    let today = s.device(&app.url, "stable").await;
    assert_eq!(today.upgrade("1.3.0").await, Slot::B);
    assert_eq!(held(&today).await, newest);
}

/// `n` devices, made one after the other.
async fn futures_join<F, Fut>(n: usize, mut make: F) -> Vec<Device>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Device>,
{
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(make().await);
    }
    v
}

/// Key compromise: the first response key is stolen, replaced and
/// revoked. A device that holds the list without it refuses answers the
/// thief signs (re-signed by a proxy), even though its keys file, built
/// before, still lists that key.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_revoked_response_key_is_refused(pool: PgPool) {
    let s = setup(pool, &["1.0.0"]).await;
    s.publish("1.0.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    let app = &s.app;
    let stolen_id = current(&status(app).await, "response");
    let stolen = sluice_server::infra::keystore::stored_ed25519_signer(
        &app.state.db,
        &stolen_id,
        &common::config(app.data_dir.clone()).key_passphrase,
    )
    .await
    .unwrap();
    let proxy = Proxy::start(&app.url);
    let dev = s.device(&proxy.url, "stable").await;
    checked(&dev.run(&["check"]).await);
    let keys_file = std::fs::read_to_string(dev.path("keys.json")).unwrap();
    assert!(keys_file.contains(&stolen_id));

    // Before the revocation, the stolen key's signatures pass.
    proxy.set(|r| r.resign = Some(stolen.clone()));
    checked(&dev.run(&["check"]).await);

    post_ok(app, "/v1/keys/response/rotate", json!({})).await;
    post_ok(app, "/v1/keys/response/activate", json!({"force": true})).await;
    post_ok(
        app,
        "/v1/keys/response/revoke",
        json!({"key_id": stolen_id}),
    )
    .await;
    let revoked: bool =
        sqlx::query_scalar("SELECT revoked_at IS NOT NULL FROM signing_keys WHERE key_id = $1")
            .bind(&stolen_id)
            .fetch_one(&app.state.db)
            .await
            .unwrap();
    assert!(revoked, "the revoked key is marked in the database");
    // The device learns the new list from a genuine answer...
    proxy.set(|r| r.resign = None);
    checked(&dev.run(&["check"]).await);
    // ...and from then on refuses the thief's.
    proxy.set(|r| r.resign = Some(stolen.clone()));
    refused(
        &dev.run(&["check"]).await,
        &format!("no trusted response key with id {stolen_id}"),
    );
    // The server itself never signs with it again.
    proxy.set(|r| r.resign = None);
    checked(&dev.run(&["check"]).await);
}

/// Key compromise, the other way: a thief with the response key makes a
/// key list of their own (their root, their response key) and serves it
/// with answers they sign. The device holds list 1, whose root did not sign
/// it: the list is refused, the device keeps list 1, and the answers are
/// refused.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_key_list_not_signed_by_the_held_root_is_refused(pool: PgPool) {
    use base64::Engine;
    use sluice_protocol::keylist::{EnvelopeSignature, PAYLOAD_TYPE, pae};
    use sluice_protocol::{
        KeyList, KeyLists, KeyRole, KeyState, ListedKey, ResponseSigner, SignedKeyList,
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let s = setup(pool, &["1.0.0"]).await;
    s.publish("1.0.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    let app = &s.app;
    let proxy = Proxy::start(&app.url);
    let dev = s.device(&proxy.url, "stable").await;
    checked(&dev.run(&["check"]).await);
    assert_eq!(held(&dev).await, 1);
    let kept = std::fs::read(dev.path("state/keylist.json")).unwrap();

    let stolen_id = current(&status(app).await, "response");
    let stolen = sluice_server::infra::keystore::stored_ed25519_signer(
        &app.state.db,
        &stolen_id,
        &common::config(app.data_dir.clone()).key_passphrase,
    )
    .await
    .unwrap();
    let (evil_root, evil_resp) = (
        ResponseSigner::from_seed(&[7; 32]),
        ResponseSigner::from_seed(&[8; 32]),
    );
    let (_, genuine) = app.state.keys.newest_list().unwrap();
    let (_, mut forged) = genuine.open().unwrap();
    forged.version = 2;
    for k in forged.keys.iter_mut().filter(|k| k.role != KeyRole::Image) {
        k.state = KeyState::Retired;
    }
    for (signer, role) in [(&evil_root, KeyRole::Root), (&evil_resp, KeyRole::Response)] {
        let p = signer.public_key();
        forged.keys.push(ListedKey {
            key_id: p.key_id,
            role,
            algorithm: p.algorithm,
            public_key_pem: p.public_key_pem,
            state: KeyState::Current,
        });
    }
    let payload = serde_json::to_vec::<KeyList>(&forged).unwrap();
    let m = pae(PAYLOAD_TYPE, &payload);
    let sigs = [&evil_root, &evil_resp, &stolen]
        .iter()
        .map(|k| EnvelopeSignature {
            keyid: k.key_id().into(),
            sig: b64(&k.sign_message(&m)),
        })
        .collect();
    let served = KeyLists {
        lists: vec![SignedKeyList::new(&payload, sigs)],
        newest: 2,
    };
    proxy.set(|r| {
        r.lists = Some(serde_json::to_vec(&served).unwrap());
        r.resign = Some(evil_resp.clone());
    });
    refused(
        &dev.run(&["check"]).await,
        "key list version 2 lacks 1 valid signature(s) by the root keys of version 1",
    );
    assert_eq!(std::fs::read(dev.path("state/keylist.json")).unwrap(), kept);
    proxy.set(|r| *r = Rules::default());
    assert!(checked(&dev.run(&["check"]).await).contains("update available: 1.0.0"));
    assert_eq!(held(&dev).await, 1);
}

/// SIGKILL at random moments while an agent catches up through a dozen key
/// lists: whatever moment it dies, `keylist.json` is absent or a list that
/// verifies (never half written), nothing is left beside the agent's files
/// but the temporary of the one write it died in, and the next run removes
/// that and catches up the rest.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_agent_killed_while_following_the_lists_loses_nothing(pool: PgPool) {
    use rand::Rng;
    let s = setup(pool, &["1.0.0"]).await;
    s.publish("1.0.0", json!([{"name": "stable", "percent": 100}]))
        .await;
    let app = &s.app;
    let devices: Vec<Device> = futures_join(6, || s.device(&app.url, "stable")).await;
    for d in &devices {
        ok(&d.run(&["enroll"]).await);
    }
    for _ in 0..6 {
        for role in ["root", "response"] {
            post_ok(app, &format!("/v1/keys/{role}/rotate"), json!({})).await;
            if role == "response" {
                post_ok(app, "/v1/keys/response/activate", json!({"force": true})).await;
            }
        }
    }
    let newest = app.state.keys.list_version().unwrap();
    assert_eq!(newest, 19);
    // From at once to well after the fetch.
    let delays: Vec<u64> = {
        let mut rng = rand::thread_rng();
        (0..devices.len())
            .map(|i| if i == 0 { 0 } else { rng.gen_range(0..600) })
            .collect()
    };
    for (d, ms) in devices.iter().zip(delays) {
        let mut child = d.command(&["check"]).spawn().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        let state = d.path("state");
        if let Ok(bytes) = std::fs::read(state.join("keylist.json")) {
            let kept: sluice_protocol::SignedKeyList = serde_json::from_slice(&bytes).unwrap();
            kept.verify_self()
                .expect("a whole list, never half written");
        }
        const FILES: [&str; 5] = [
            "state.json",
            "device.json",
            "keylist.json",
            "device.key",
            // The state folder's lock, empty; held by a live agent.
            "agent.lock",
        ];
        let names = || -> Vec<String> {
            std::fs::read_dir(&state)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        };
        let temporary = |n: &str| {
            n.strip_prefix('.')
                .and_then(|n| n.strip_suffix(".sluice-new"))
                .is_some_and(|n| FILES.contains(&n))
        };
        let after_kill = names();
        let stray: Vec<_> = after_kill
            .iter()
            .filter(|n| !FILES.contains(&n.as_str()) && !temporary(n))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
        // One write at a time: at most one temporary.
        let temporaries = after_kill.iter().filter(|n| temporary(n)).count();
        assert!(temporaries <= 1, "{after_kill:?}");
        // Death between a temporary and its rename is a narrow window for a
        // random kill to find: plant what it leaves, for a file the next
        // run does not write again (the credentials), so only the sweep at
        // the lock can remove it.
        if temporaries == 0 {
            std::fs::write(state.join(".device.json.sluice-new"), b"{\"half").unwrap();
        }
        assert!(checked(&d.run(&["check"]).await).contains("update available: 1.0.0"));
        assert_eq!(held(d).await, newest);
        let after_run: Vec<_> = names()
            .into_iter()
            .filter(|n| !FILES.contains(&n.as_str()))
            .collect();
        assert!(
            after_run.is_empty(),
            "left after the next run: {after_run:?}"
        );
    }
}
