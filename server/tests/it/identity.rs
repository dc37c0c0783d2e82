//! Device identities and the smaller trust rules, attack by attack: a
//! machine id cannot be borrowed with the product's secret, proofs of the
//! device key cannot be forged or replayed, tokens are short-lived and
//! renewed with the key, admins revoke, reset and delete devices, fake
//! devices cannot halt a rollout, a publisher cannot resume a halted one,
//! a password guesser cannot lock the admin out, and `/readyz` tells
//! strangers nothing.

use crate::common;
use crate::common::images;

use common::{TestApp, device_key, enroll_proof, now_s, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_protocol::{DeviceKey, ProofPurpose};
use sqlx::PgPool;
use uuid::Uuid;

fn enroll_body(secret: &str, machine: &str, key: &DeviceKey) -> Value {
    json!({"product": "acme", "enrollment_secret": secret, "machine_id": machine,
           "arch": "amd64", "channel": "stable", "proof": enroll_proof(key, "acme", machine)})
}

async fn enroll_as(app: &TestApp, body: Value) -> (StatusCode, Value) {
    app.call(Method::POST, "/v1/devices/enroll", None, Some(body))
        .await
}

fn proof(key: &DeviceKey, purpose: ProofPurpose, device_id: &str) -> Value {
    serde_json::to_value(key.prove(purpose, "acme", device_id, rand::random(), now_s())).unwrap()
}

async fn renew(app: &TestApp, device_id: &str, key: &DeviceKey) -> (StatusCode, Value) {
    app.call(
        Method::POST,
        &format!("/v1/devices/{device_id}/token"),
        None,
        Some(json!({"proof": proof(key, ProofPurpose::Renew, device_id)})),
    )
    .await
}

/// Device `id` reports a `kind` event about release 1.0.0; answers the status.
async fn send_event(app: &TestApp, id: &str, token: &str, kind: &str) -> StatusCode {
    let digest = format!("sha256:{}", "ab".repeat(32));
    app.post(
        &format!("/v1/devices/{id}/events"),
        token,
        json!({"kind": kind, "version": "1.0.0", "digest": digest}),
    )
    .await
    .0
}

/// The admin deletes device `id`; answers the status.
async fn delete_device(app: &TestApp, id: &str) -> StatusCode {
    let path = format!("/v1/devices/{id}");
    app.call(Method::DELETE, &path, Some(&app.admin), None)
        .await
        .0
}

fn resolve_path(n: u32) -> String {
    format!("/v1/products/acme/channels/stable/resolve?nonce=nonce-{n:06}")
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

async fn setup(pool: PgPool) -> (TestApp, String) {
    let app = TestApp::spawn(pool).await;
    let secret = app.product("acme", "r.example/acme").await;
    app.channel("acme", "stable").await;
    app.channel("acme", "beta").await;
    (app, secret)
}

/// Borrowed identity: someone with the product's secret and a victim's
/// machine id, but not the victim's key, gets 409, no token, and changes
/// nothing of the victim (channel, arch, labels), whose token keeps working.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_machine_id_cannot_be_borrowed(pool: PgPool) {
    let (app, secret) = setup(pool).await;
    let victim_key = device_key("acme", "victim");
    let mut body = enroll_body(&secret, "victim", &victim_key);
    body["labels"] = json!({"site": "plant-1"});
    let (s, b) = enroll_as(&app, body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (victim, victim_token) = (
        b["device_id"].as_str().unwrap().to_string(),
        b["token"].as_str().unwrap().to_string(),
    );
    let (_, before) = app.get(&format!("/v1/devices/{victim}"), &app.admin).await;
    assert_eq!(before["key_id"], victim_key.key_id());

    let thief = DeviceKey::from_seed(&[66; 32]);
    let mut body = enroll_body(&secret, "victim", &thief);
    body["channel"] = json!("beta");
    body["arch"] = json!("arm64");
    body["labels"] = json!({"site": "attacker"});
    let (s, b) = enroll_as(&app, body).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("admin must reset"),
        "{b}"
    );
    assert!(b.get("token").is_none());

    let (_, after) = app.get(&format!("/v1/devices/{victim}"), &app.admin).await;
    for field in ["channel", "arch", "labels", "key_id"] {
        assert_eq!(after[field], before[field], "{field} changed");
    }
    let (s, b) = app.get(&resolve_path(1), &victim_token).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // The victim itself (same key) may enroll again, e.g. after losing its
    // token file, and keeps its id.
    let (s, b) = enroll_as(&app, enroll_body(&secret, "victim", &victim_key)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["device_id"], victim);
}

/// Enrollment needs a proof of the device key, made for this product and
/// machine id, fresh, and used once.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn enrollment_needs_a_fresh_proof(pool: PgPool) {
    let (app, secret) = setup(pool).await;
    let key = device_key("acme", "m-1");
    let mut no_proof = enroll_body(&secret, "m-1", &key);
    no_proof.as_object_mut().unwrap().remove("proof");
    let (s, b) = enroll_as(&app, no_proof).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("upgrade sluice-agent")
    );

    let refused = [
        (
            "a proof for another machine id",
            json!(key.prove(ProofPurpose::Enroll, "acme", "m-2", rand::random(), now_s())),
        ),
        (
            "a proof for another product",
            json!(key.prove(
                ProofPurpose::Enroll,
                "other",
                "m-1",
                rand::random(),
                now_s()
            )),
        ),
        (
            "a renewal proof",
            json!(key.prove(ProofPurpose::Renew, "acme", "m-1", rand::random(), now_s())),
        ),
        (
            "a proof ten minutes old",
            json!(key.prove(
                ProofPurpose::Enroll,
                "acme",
                "m-1",
                rand::random(),
                now_s() - 600
            )),
        ),
        (
            "a proof from the future",
            json!(key.prove(
                ProofPurpose::Enroll,
                "acme",
                "m-1",
                rand::random(),
                now_s() + 600
            )),
        ),
    ];
    for (what, p) in refused {
        let mut body = enroll_body(&secret, "m-1", &key);
        body["proof"] = p;
        let (s, b) = enroll_as(&app, body).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {b}");
    }
    let mut garbage = enroll_body(&secret, "m-1", &key);
    garbage["proof"]["public_key"] = json!("AAAA");
    assert_eq!(enroll_as(&app, garbage).await.0, StatusCode::BAD_REQUEST);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&app.state.db)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing enrolled");

    // A proof seen once is refused the second time, even for the same device.
    let body = enroll_body(&secret, "m-1", &key);
    assert_eq!(enroll_as(&app, body.clone()).await.0, StatusCode::OK);
    let (s, b) = enroll_as(&app, body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("replay"), "{b}");
}

/// Tokens last `SLUICE_DEVICE_TOKEN_TTL_S` and are renewed with a proof of
/// the device key; another key, a replayed proof or another device's id get
/// nothing.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn tokens_are_short_lived_and_renewed_with_the_key(pool: PgPool) {
    let (app, secret) = setup(pool).await;
    let key = device_key("acme", "m-1");
    let (s, b) = enroll_as(&app, enroll_body(&secret, "m-1", &key)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let id = b["device_id"].as_str().unwrap().to_string();
    let c = claims(b["token"].as_str().unwrap());
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        6 * 3600
    );
    assert_eq!(c["key_id"], key.key_id());
    assert!(b["expires_at"].is_string());

    let (s, b) = renew(&app, &id, &key).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let fresh = b["token"].as_str().unwrap().to_string();
    assert_eq!(app.get(&resolve_path(1), &fresh).await.0, StatusCode::OK);

    let (s, b) = renew(&app, &id, &DeviceKey::from_seed(&[7; 32])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "another key: {b}");
    let p = proof(&key, ProofPurpose::Renew, &id);
    let path = format!("/v1/devices/{id}/token");
    let body = Some(json!({ "proof": p }));
    assert_eq!(
        app.call(Method::POST, &path, None, body.clone()).await.0,
        StatusCode::OK
    );
    let (s, b) = app.call(Method::POST, &path, None, body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "replayed: {b}");
    // The key of one device renews no other.
    let other_key = device_key("acme", "m-2");
    let (_, b) = enroll_as(&app, enroll_body(&secret, "m-2", &other_key)).await;
    let other = b["device_id"].as_str().unwrap();
    let (s, b) = renew(&app, other, &key).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let (s, _) = renew(&app, &Uuid::new_v4().to_string(), &key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A revoked device is refused at once on every route, gets no new token
/// and cannot enroll again; a reset lifts that, refuses the tokens from
/// before, and lets the machine enroll with a new key under the same id.
/// Each action is in the audit log.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn revoke_and_reset(pool: PgPool) {
    let (app, secret) = setup(pool).await;
    let key = device_key("acme", "m-1");
    let (id, token) = app.enroll("acme", &secret, "m-1", "stable").await;
    assert_eq!(app.get(&resolve_path(1), &token).await.0, StatusCode::OK);

    let b = app
        .post_ok(
            &format!("/v1/devices/{id}/revoke"),
            json!({"reason": "stolen from the van"}),
            StatusCode::OK,
        )
        .await;
    assert!(b["revoked_at"].is_string());
    assert_eq!(b["revoked_reason"], "stolen from the van");
    let (s, b) = app.get(&resolve_path(2), &token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(
        send_event(&app, &id, &token, "failed").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(renew(&app, &id, &key).await.0, StatusCode::FORBIDDEN);
    let (s, b) = enroll_as(&app, enroll_body(&secret, "m-1", &key)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = app.get("/v1/devices?revoked=true", &app.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["items"].as_array().unwrap().len(), 1);
    assert_eq!(b["items"][0]["id"], id.as_str());

    // The revocation survives a restart of the server (loaded from the database).
    let fresh = sluice_server::infra::revocations::Revocations::spawn(app.state.db.clone())
        .await
        .unwrap();
    assert!(fresh.check(&id.parse().unwrap(), now_s()).is_err());

    let (s, b) = app
        .call(
            Method::POST,
            &format!("/v1/devices/{id}/reset"),
            Some(&app.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["awaiting_enrollment"], true);
    assert!(b["revoked_at"].is_null() && b["key_id"].is_null(), "{b}");
    assert_eq!(
        app.get(&resolve_path(3), &token).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, _) = renew(&app, &id, &key).await;
    assert_eq!(s, StatusCode::CONFLICT, "no key is bound after a reset");
    let new_key = DeviceKey::from_seed(&[9; 32]);
    let (s, b) = enroll_as(&app, enroll_body(&secret, "m-1", &new_key)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["device_id"], id.as_str());
    let new_token = b["token"].as_str().unwrap();
    assert_eq!(app.get(&resolve_path(4), new_token).await.0, StatusCode::OK);
    // Only one enrollment after a reset: the next other key is refused again.
    let (s, _) = enroll_as(&app, enroll_body(&secret, "m-1", &key)).await;
    assert_eq!(s, StatusCode::CONFLICT);

    let (_, audit) = app
        .get(&format!("/v1/audit?target=device:{id}"), &app.admin)
        .await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["device.enroll_after_reset", "device.reset", "device.revoke"]
    );
}

/// A deleted device's token is refused at once and its events are gone;
/// its machine id may enroll again, as a new device.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn delete_a_device(pool: PgPool) {
    let (app, secret) = setup(pool).await;
    let key = device_key("acme", "m-1");
    let (id, token) = app.enroll("acme", &secret, "m-1", "stable").await;
    assert_eq!(
        send_event(&app, &id, &token, "downloaded").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(delete_device(&app, &id).await, StatusCode::NO_CONTENT);
    let (s, b) = app.get(&resolve_path(1), &token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(
        app.get(&format!("/v1/devices/{id}"), &app.admin).await.0,
        StatusCode::NOT_FOUND
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM device_events")
        .fetch_one(&app.state.db)
        .await
        .unwrap();
    assert_eq!(events, 0);
    assert_eq!(delete_device(&app, &id).await, StatusCode::NOT_FOUND);
    let (_, audit) = app.get("/v1/audit?action=device.delete", &app.admin).await;
    assert_eq!(audit["items"][0]["before"]["machine_id"], "m-1", "{audit}");
    let (s, b) = enroll_as(&app, enroll_body(&secret, "m-1", &key)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_ne!(b["device_id"], id.as_str());
}

/// A device enrolled before device keys (a ten-year token, no key) keeps
/// working until it binds a key, once, with that token; then the old token
/// is refused, and the secret alone never rebinds its machine id.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_old_device_binds_a_key_once(pool: PgPool) {
    let (app, secret) = setup(pool).await;
    let (_, b) = enroll_as(
        &app,
        enroll_body(&secret, "old", &device_key("acme", "old")),
    )
    .await;
    let id = b["device_id"].as_str().unwrap().to_string();
    // Make it what the previous release left: no key, a ten-year token without key_id.
    sqlx::query("UPDATE devices SET public_key = NULL, key_bound_at = NULL WHERE id = $1")
        .bind(Uuid::parse_str(&id).unwrap())
        .execute(&app.state.db)
        .await
        .unwrap();
    let secret_key = app.jwt_secret().await;
    let now = now_s();
    let old_token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": id, "role": "device", "kind": "device", "products": ["acme"], "aud": "sluice",
                "iat": now, "nbf": now - 1, "exp": now + 10 * 365 * 86_400}),
        &jsonwebtoken::EncodingKey::from_secret(&secret_key),
    )
    .unwrap();
    assert_eq!(
        app.get(&resolve_path(1), &old_token).await.0,
        StatusCode::OK
    );

    // The secret and a proof do not take over the keyless machine id.
    let thief = DeviceKey::from_seed(&[13; 32]);
    let (s, _) = enroll_as(&app, enroll_body(&secret, "old", &thief)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // Nor does renewing: there is no key to prove.
    assert_eq!(renew(&app, &id, &thief).await.0, StatusCode::CONFLICT);

    let key = DeviceKey::from_seed(&[14; 32]);
    let path = format!("/v1/devices/{id}/key");
    let bind = |k: &DeviceKey| Some(json!({"proof": proof(k, ProofPurpose::Bind, &id)}));
    let (s, b) = app
        .call(Method::POST, &path, Some(&old_token), bind(&key))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let new_token = b["token"].as_str().unwrap().to_string();
    assert_eq!(claims(&new_token)["key_id"], key.key_id());
    let (s, b) = app.get(&resolve_path(2), &old_token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the old token is spent: {b}");
    assert_eq!(
        app.get(&resolve_path(3), &new_token).await.0,
        StatusCode::OK
    );
    // Binding another key with the new token is refused.
    let (s, _) = app
        .call(Method::POST, &path, Some(&new_token), bind(&thief))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(renew(&app, &id, &key).await.0, StatusCode::OK);
    let (_, audit) = app
        .get("/v1/audit?action=device.bind_key", &app.admin)
        .await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 1);
}

/// Enrollment is rate-limited per client address and per product.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn enrollment_is_rate_limited(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path().join("data"));
    config.enroll_burst = 3;
    config.enroll_rate = 0.001;
    config.enroll_product_burst = 5;
    config.enroll_product_rate = 0.001;
    let app = TestApp::spawn_with(pool, config, dir).await;
    let secret = app.product("acme", "r.example/acme").await;
    app.channel("acme", "stable").await;
    let from = |ip: &str, i: u32| {
        let client = reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();
        let machine = format!("m-{ip}-{i}");
        let body = enroll_body(&secret, &machine, &device_key("acme", &machine));
        let url = format!("{}/v1/devices/enroll", app.url);
        async move { client.post(url).json(&body).send().await.unwrap().status() }
    };
    for i in 0..3 {
        assert_eq!(from("127.0.0.1", i).await, StatusCode::OK);
    }
    assert_eq!(from("127.0.0.1", 3).await, StatusCode::TOO_MANY_REQUESTS);
    // Another address has its own allowance, until the product's runs out.
    assert_eq!(from("127.0.0.2", 0).await, StatusCode::OK);
    assert_eq!(from("127.0.0.2", 1).await, StatusCode::OK);
    assert_eq!(from("127.0.0.2", 2).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(from("127.0.0.3", 0).await, StatusCode::TOO_MANY_REQUESTS);
}

/// Behind a balancer named in `SLUICE_TRUSTED_PROXIES` the limits count the
/// client its `X-Forwarded-For` names (the last entry, which the balancer
/// appended); anyone else's `X-Forwarded-For` is ignored, so a client cannot
/// make up addresses to escape its limit.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn enrollment_limits_count_the_client_a_trusted_proxy_names(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path().join("data"));
    config.enroll_burst = 2;
    config.enroll_rate = 0.001;
    config.trusted_proxies = vec!["127.0.0.5/32".parse().unwrap()];
    let app = TestApp::spawn_with(pool, config, dir).await;
    let secret = app.product("acme", "r.example/acme").await;
    app.channel("acme", "stable").await;
    let counter = std::sync::atomic::AtomicU32::new(0);
    let from = |ip: &str, forwarded: &str| {
        let client = reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let machine = format!("m-{i}");
        let body = enroll_body(&secret, &machine, &device_key("acme", &machine));
        let req = client
            .post(format!("{}/v1/devices/enroll", app.url))
            .header("x-forwarded-for", forwarded)
            .json(&body);
        async move { req.send().await.unwrap().status() }
    };
    // Through the proxy: two clients, each with its own allowance, whatever
    // they put before the proxy's entry.
    for made_up in ["10.9.9.9, 198.51.100.1", "198.51.100.1"] {
        assert_eq!(from("127.0.0.5", made_up).await, StatusCode::OK);
    }
    assert_eq!(
        from("127.0.0.5", "10.1.1.1, 198.51.100.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(from("127.0.0.5", "198.51.100.2").await, StatusCode::OK);
    // Straight to the server: the header is the client's to make up and counts for nothing.
    assert_eq!(from("127.0.0.6", "203.0.113.1").await, StatusCode::OK);
    assert_eq!(from("127.0.0.6", "203.0.113.2").await, StatusCode::OK);
    assert_eq!(
        from("127.0.0.6", "203.0.113.3").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// Someone guessing the admin's password from one address is stopped there;
/// the admin logs in from another.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_password_guesser_does_not_lock_out_the_admin(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let login = |ip: &str, username: String, password: &str| {
        let client = reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap();
        let url = format!("{}/v1/auth/login", app.url);
        let body = json!({"username": username, "password": password});
        async move { client.post(url).json(&body).send().await.unwrap().status() }
    };
    let mut limited = false;
    for _ in 0..15 {
        let s = login("127.0.0.9", "admin".into(), "guess").await;
        assert!(matches!(
            s,
            StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
        ));
        limited |= s == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(limited, "15 wrong guesses from one address are limited");
    let s = login("127.0.0.2", "admin".into(), common::ADMIN_PASSWORD).await;
    assert_eq!(s, StatusCode::OK, "the admin logs in from elsewhere");
    // Right passwords are not failures: logging in often is never limited.
    for _ in 0..15 {
        let s = login("127.0.0.2", "admin".into(), common::ADMIN_PASSWORD).await;
        assert_eq!(s, StatusCode::OK);
    }
    // An absurd user name is refused like a wrong one.
    let s = login("127.0.0.3", "a".repeat(10_000), "x").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// Fake devices (enrolled with the secret, never offered the release)
/// reporting `failed` do not halt a rollout; devices that were offered it
/// do. A device offered one version cannot report for another. A
/// publisher's promote does not resume the halted channel; an admin's does.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn only_offered_devices_move_the_gate(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let reg = registry();
    let repo_path = images::unique_repo("gate");
    let repo = format!("{reg}/{repo_path}");
    let (d1, _) = images::push_image(&reg, &repo_path, "1.0.0").await;
    let (d2, _) = images::push_image(&reg, &repo_path, "1.1.0").await;
    let secret = app.product("acme", &repo).await;
    app.channel("acme", "stable").await;
    let ci = app.publisher(&["acme"]).await;
    for v in ["1.0.0", "1.1.0"] {
        let (s, b) = app
            .post(
                "/v1/products/acme/releases",
                &ci,
                json!({"version": v, "image": format!("{repo}:{v}")}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    let promote = |token: String, v: &str| {
        let body = json!({"version": v, "percent": 100});
        let app = &app;
        async move {
            app.post("/v1/products/acme/channels/stable/promote", &token, body)
                .await
        }
    };
    assert_eq!(promote(ci.clone(), "1.0.0").await.0, StatusCode::OK);
    let (s, _) = app
        .call(
            Method::PATCH,
            "/v1/products/acme/channels/stable/rollout",
            Some(&app.admin),
            Some(json!({"gate": {"max_failure_percent": 20, "min_reports": 3}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let report = |(id, token): &(String, String), kind: &str, version: &str, digest: &str| {
        let body = json!({"kind": kind, "version": version, "digest": digest});
        let (id, token, app) = (id.clone(), token.clone(), &app);
        async move {
            let (s, b) = app
                .post(&format!("/v1/devices/{id}/events"), &token, body)
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
        }
    };
    let gate = || async {
        let (_, ch) = app
            .get("/v1/products/acme/channels/stable", &app.admin)
            .await;
        ch
    };

    // Ten fakes report failure on the head without ever asking for it.
    for i in 0..10 {
        let (id, token) = app
            .enroll("acme", &secret, &format!("fake-{i}"), "stable")
            .await;
        report(&(id, token), "failed", "1.0.0", &d1).await;
    }
    let ch = gate().await;
    assert_eq!(ch["rollout"]["paused"], false, "{ch}");
    assert_eq!(ch["gate"]["reports"], 0, "{ch}");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM device_events WHERE kind = 'failed'")
            .fetch_one(&app.state.db)
            .await
            .unwrap();
    assert_eq!(events, 10, "the reports themselves are kept");

    // 1.1.0 for everyone; three real devices are offered it.
    assert_eq!(promote(ci.clone(), "1.1.0").await.0, StatusCode::OK);
    let mut real = Vec::new();
    for i in 0..3 {
        let (id, token) = app
            .enroll("acme", &secret, &format!("real-{i}"), "stable")
            .await;
        let (s, b) = app
            .get(&format!("{}&current={d1}", resolve_path(i)), &token)
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["update"], true, "{b}");
        assert_eq!(b["release"]["digest"], d2, "{b}");
        real.push((id, token));
    }
    // An offered device reporting 1.1.0's version with another digest, or
    // the offered digest under another version, does not count.
    report(&real[0], "failed", "1.1.0", &d1).await;
    report(&real[1], "failed", "1.0.0", &d2).await;
    assert_eq!(gate().await["gate"]["reports"], 0);
    // Reports on what they were offered do (the offer reaches the database
    // with the report, even before the check-in batch is written).
    for (device, kind) in real.iter().zip(["failed", "rolled_back", "healthy"]) {
        report(device, kind, "1.1.0", &d2).await;
    }
    let ch = gate().await;
    assert_eq!(ch["gate"]["reports"], 3, "{ch}");
    assert_eq!(ch["rollout"]["paused"], true, "2 of 3 failed: {ch}");

    // CI re-promoting the head would resume the rollout: refused, nothing changes.
    let serial = ch["serial"].clone();
    let (s, b) = promote(ci.clone(), "1.1.0").await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("an admin must resume"),
        "{b}"
    );
    let (s, b) = app
        .post(
            "/v1/products/acme/releases",
            &ci,
            json!({"version": "1.1.1", "image": format!("{repo}:1.1.0"),
                   "channels": [{"name": "stable", "percent": 100}]}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "publishing into it neither: {b}");
    let ch = gate().await;
    assert_eq!(ch["rollout"]["paused"], true);
    assert_eq!(ch["serial"], serial);
    // An admin may, and it is recorded.
    let (s, b) = promote(app.admin.clone(), "1.1.0").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["rollout"]["paused"], false);
    let (_, history) = app
        .get("/v1/products/acme/channels/stable/history", &app.admin)
        .await;
    assert_eq!(history["items"][0]["action"], "promote");
    assert_eq!(history["items"][0]["actor"], "user:admin");
}
