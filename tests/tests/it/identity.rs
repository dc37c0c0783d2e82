//! Device identities through the real `sluice-agent` binary and the real
//! server: the agent makes its key (0600) and proves it at enrollment;
//! another machine with the product's secret and the same machine id is
//! refused; a revoked device is refused on its next poll and a reset one
//! enrolls again by itself; an ageing token is renewed with the key; a
//! device enrolled before device keys binds one with its old token.

use crate::common;

use common::{TestApp, now_s};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_tests::*;
use sqlx::PgPool;
use std::os::unix::fs::PermissionsExt;

struct Setup {
    app: TestApp,
    secret: String,
    keys: Value,
}

async fn setup(pool: PgPool) -> Setup {
    // Built before the server starts: locating the binary may block this thread.
    agent_bin();
    let app = TestApp::spawn(pool).await;
    let secret = app.product("acme", "r.example/acme").await;
    app.channel("acme", "stable").await;
    let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    Setup { app, secret, keys }
}

impl Setup {
    fn device(&self) -> Device {
        Device::new(&DeviceOpts {
            server: self.app.url.clone(),
            product: "acme".into(),
            channel: "stable".into(),
            enrollment_secret: self.secret.clone(),
            keys: self.keys.to_string(),
            insecure: vec![],
            kind: SlotKind::Dir,
            health: Health::Passes,
        })
    }

    async fn view(&self, id: &str) -> Value {
        let (s, b) = self
            .app
            .get(&format!("/v1/devices/{id}"), &self.app.admin)
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        b
    }

    async fn jwt(&self, claims: Value) -> String {
        let secret = self.app.jwt_secret().await;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap()
    }
}

fn stored(dev: &Device) -> Value {
    serde_json::from_slice(&std::fs::read(dev.path("state/device.json")).unwrap()).unwrap()
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()
}

/// The agent makes its key before enrolling, private from the start, and the
/// server shows that key's id; a second machine with the secret and the same
/// machine id is refused and changes nothing; the first keeps polling.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn another_machine_cannot_take_a_machine_id(pool: PgPool) {
    let s = setup(pool).await;
    let dev = s.device();
    let out = ok(&dev.run(&["enroll"]).await);
    let id = stored(&dev)["device_id"].as_str().unwrap().to_string();
    assert!(out.contains(&id), "{out}");
    let key = dev.path("state/device.key");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    let key_id = sluice_protocol::DeviceKey::from_pem(&pem).unwrap().key_id();
    let before = s.view(&id).await;
    assert_eq!(before["key_id"], key_id.as_str());

    // The impostor: its own folder (its own key), the victim's machine id, on another channel.
    let impostor = s.device();
    impostor.edit_config(|c| {
        c.machine_id = Some(dev.machine_id.clone());
        c.channel = "beta".into();
    });
    s.app.channel("acme", "beta").await;
    refused(
        &impostor.run(&["enroll"]).await,
        "already enrolled with another device key",
    );
    assert!(!impostor.path("state/device.json").exists());
    let after = s.view(&id).await;
    for field in ["channel", "key_id", "arch", "labels"] {
        assert_eq!(after[field], before[field], "{field} changed");
    }
    assert!(checked(&dev.run(&["check"]).await).contains("up to date"));
}

/// Revoked: the agent's next poll is refused with one line saying so, and it
/// gets no new token. Reset: the agent's token is refused, it finds its key
/// unbound and enrolls again by itself, under the same device id.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_revoked_device_is_refused_and_a_reset_one_comes_back(pool: PgPool) {
    let s = setup(pool).await;
    let dev = s.device();
    checked(&dev.run(&["check"]).await);
    let id = stored(&dev)["device_id"].as_str().unwrap().to_string();
    let (st, b) = s
        .app
        .post(
            &format!("/v1/devices/{id}/revoke"),
            &s.app.admin,
            json!({"reason": "lost"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    refused(&dev.run(&["check"]).await, "is revoked");
    refused(&dev.run(&["apply"]).await, "is revoked");

    let (st, b) = s
        .app
        .call(
            Method::POST,
            &format!("/v1/devices/{id}/reset"),
            Some(&s.app.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let out = dev.run(&["check"]).await;
    assert!(ok(&out).contains("up to date"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("enrolling again"), "{log}");
    assert_eq!(stored(&dev)["device_id"], id.as_str());
    let view = s.view(&id).await;
    assert_eq!(view["awaiting_enrollment"], false, "{view}");
    assert!(view["key_id"].is_string(), "{view}");
}

/// A token past half its life is renewed with the key before it is used.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_ageing_token_is_renewed(pool: PgPool) {
    let s = setup(pool).await;
    let dev = s.device();
    ok(&dev.run(&["enroll"]).await);
    let mut creds = stored(&dev);
    let id = creds["device_id"].as_str().unwrap().to_string();
    let key_id = claims(creds["token"].as_str().unwrap())["key_id"].clone();
    let now = now_s();
    let old = s
        .jwt(
            json!({"sub": id, "role": "device", "kind": "device", "products": ["acme"],
        "aud": "sluice", "iat": now - 5000, "nbf": now - 5000, "exp": now + 600, "key_id": key_id}),
        )
        .await;
    creds["token"] = json!(old);
    std::fs::write(dev.path("state/device.json"), creds.to_string()).unwrap();
    assert!(checked(&dev.run(&["check"]).await).contains("up to date"));
    let token = stored(&dev)["token"].as_str().unwrap().to_string();
    assert_ne!(token, old);
    let c = claims(&token);
    assert!(c["iat"].as_i64().unwrap() >= now, "{c}");
    assert_eq!(c["key_id"], key_id);
    let mode = std::fs::metadata(dev.path("state/device.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// A device enrolled by an agent from before device keys (a ten-year token,
/// no key on either side) binds a key on its first poll with the new agent;
/// its old token then stops working.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_old_enrollment_binds_a_key(pool: PgPool) {
    let s = setup(pool).await;
    let dev = s.device();
    ok(&dev.run(&["enroll"]).await);
    let id = stored(&dev)["device_id"].as_str().unwrap().to_string();
    // What the previous release left: no key file, no key on the server, a long token.
    std::fs::remove_file(dev.path("state/device.key")).unwrap();
    sqlx::query("UPDATE devices SET public_key = NULL, key_bound_at = NULL WHERE id = $1::uuid")
        .bind(&id)
        .execute(&s.app.state.db)
        .await
        .unwrap();
    let now = now_s();
    let old = s
        .jwt(
            json!({"sub": id, "role": "device", "kind": "device", "products": ["acme"],
        "aud": "sluice", "iat": now, "nbf": now - 1, "exp": now + 10 * 365 * 86_400}),
        )
        .await;
    std::fs::write(
        dev.path("state/device.json"),
        json!({"device_id": id, "token": old}).to_string(),
    )
    .unwrap();
    assert!(checked(&dev.run(&["check"]).await).contains("up to date"));
    let pem = std::fs::read_to_string(dev.path("state/device.key")).unwrap();
    let key_id = sluice_protocol::DeviceKey::from_pem(&pem).unwrap().key_id();
    assert_eq!(s.view(&id).await["key_id"], key_id.as_str());
    let token = stored(&dev)["token"].as_str().unwrap().to_string();
    assert_eq!(claims(&token)["key_id"], key_id.as_str());
    let (st, _) = s
        .app
        .get(
            "/v1/products/acme/channels/stable/resolve?nonce=abcdefgh12",
            &old,
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "the old token is spent");
    assert!(checked(&dev.run(&["check"]).await).contains("up to date"));
}
