//! Key lists and rotation through the real router and a real Postgres: the
//! lists served verify as a chain from the first, each refusal is a 4xx
//! that says what to do and changes nothing, and a key file left by a crash
//! (or made by `sluice keys generate` while the server was down) is listed
//! as `next` at the next start.

use crate::common;
use crate::common::images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_protocol::{KeyList, KeyLists, KeyRole, KeySet, KeyState, SignedKeyList};
use sqlx::PgPool;

async fn lists(app: &TestApp, after: u64) -> KeyLists {
    let (s, b) = app
        .call(
            Method::GET,
            &format!("/v1/keys/lists?after={after}"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    serde_json::from_value(b).unwrap()
}

/// Verifies every served list along the chain, the first one as a device
/// with `anchor` as its keys file would; answers the newest.
fn verify_chain(all: &KeyLists, anchor: &KeySet) -> KeyList {
    let mut held = all.lists[0].verify_bootstrap(anchor).unwrap();
    for s in &all.lists[1..] {
        held = s.verify_next(&held).unwrap();
    }
    assert_eq!(held.version, all.newest);
    held
}

async fn status(app: &TestApp) -> Value {
    let (s, b) = app.get("/v1/keys/status", &app.admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// What a refusal must leave: the same newest list.
async fn unchanged(app: &TestApp, before: u64) {
    assert_eq!(lists(app, 0).await.newest, before);
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn rotations_make_a_chain_devices_can_follow(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    let anchor: KeySet = serde_json::from_value(keys).unwrap();
    let first = lists(&app, 0).await;
    assert_eq!(first.newest, 1);
    let l1 = verify_chain(&first, &anchor);
    assert_eq!(l1.roots().count(), 1);
    assert_eq!(
        l1.key_set(),
        anchor,
        "GET /v1/keys is the list's image and response keys"
    );

    for (path, body) in [
        ("/v1/keys/response/rotate", json!({})),
        ("/v1/keys/response/activate", json!({})),
        ("/v1/keys/root/rotate", json!({})),
        ("/v1/keys/image/rotate", json!({})),
        ("/v1/keys/image/activate", json!({"force": true})),
        ("/v1/keys/root/rotate", json!({})),
    ] {
        let (s, b) = app.post(path, &app.admin, body).await;
        assert_eq!(s, StatusCode::OK, "{path}: {b}");
    }
    let all = lists(&app, 0).await;
    assert_eq!(all.lists.len(), 7);
    let newest = verify_chain(&all, &anchor);
    assert_eq!(newest.roots().count(), 1);
    assert_ne!(
        newest.roots().next().unwrap().key_id,
        l1.roots().next().unwrap().key_id
    );
    // A device holding version 3 catches up from there.
    let from3 = lists(&app, 3).await;
    assert_eq!(from3.lists.len(), 4);
    // The server signs answers with the activated response key.
    let current = newest.current(KeyRole::Response).unwrap();
    assert_eq!(app.state.keys.response_signer().key_id(), current.key_id);
    assert_eq!(
        newest
            .find(&l1.current(KeyRole::Response).unwrap().key_id)
            .unwrap()
            .state,
        KeyState::Retired
    );
    // `latest` and by number are the same envelope.
    let (_, latest) = app
        .call(Method::GET, "/v1/keys/lists/latest", None, None)
        .await;
    let (_, seven) = app.call(Method::GET, "/v1/keys/lists/7", None, None).await;
    assert_eq!(latest, seven);
    let latest: SignedKeyList = serde_json::from_value(latest).unwrap();
    assert_eq!(latest.verify_self().unwrap(), newest);
    // Every change is in the audit log.
    let (_, audit) = app.get("/v1/audit?action=keys.rotate", &app.admin).await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 4, "{audit}");
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn refusals_say_what_to_do_and_change_nothing(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "/v1/keys/response/activate",
            json!({}),
            StatusCode::CONFLICT,
            "rotate first",
        ),
        (
            "/v1/keys/root/activate",
            json!({}),
            StatusCode::BAD_REQUEST,
            "takes effect at once",
        ),
        (
            "/v1/keys/other/rotate",
            json!({}),
            StatusCode::BAD_REQUEST,
            "unknown key role",
        ),
        (
            "/v1/keys/response/activate",
            json!({"min_percent": 150}),
            StatusCode::BAD_REQUEST,
            "0–100",
        ),
        (
            "/v1/keys/response/activate",
            json!({"nope": 1}),
            StatusCode::BAD_REQUEST,
            "nope",
        ),
        (
            "/v1/keys/image/revoke",
            json!({"key_id": "0000000000000000"}),
            StatusCode::NOT_FOUND,
            "not found",
        ),
    ];
    for (path, body, want, says) in cases {
        let (s, b) = app.post(path, &app.admin, body).await;
        assert_eq!(s, want, "{path}: {b}");
        assert!(b["detail"].as_str().unwrap().contains(says), "{path}: {b}");
        unchanged(&app, 1).await;
    }
    let current = status(&app).await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "image" && k["state"] == "current")
        .unwrap()["key_id"]
        .clone();
    let b = app
        .post_ok(
            "/v1/keys/image/revoke",
            json!({"key_id": current}),
            StatusCode::CONFLICT,
        )
        .await;
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("rotate and activate another"),
        "{b}"
    );
    unchanged(&app, 1).await;

    let (s, b) = app
        .post("/v1/keys/image/rotate", &app.admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app
        .post("/v1/keys/image/rotate", &app.admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("is already next"),
        "{b}"
    );
    unchanged(&app, 2).await;

    for (path, want) in [
        ("/v1/keys/lists/99", StatusCode::NOT_FOUND),
        ("/v1/keys/lists/x", StatusCode::BAD_REQUEST),
        ("/v1/keys/lists?after=-1", StatusCode::BAD_REQUEST),
    ] {
        let (s, b) = app.call(Method::GET, path, None, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
}

/// Activation is refused while too few of the fleet's devices hold the key.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn activation_waits_for_the_devices(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = app.product("acme", "127.0.0.1:1/acme/os").await;
    app.channel("acme", "stable").await;
    let mut tokens = Vec::new();
    for i in 0..4 {
        let (_, token) = app
            .enroll("acme", &secret, &format!("m{i}"), "stable")
            .await;
        tokens.push(token);
    }
    let (s, b) = app
        .post("/v1/keys/response/rotate", &app.admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let key = b["key_id"].as_str().unwrap().to_string();
    // Three devices say they hold version 2, one still version 1.
    for (i, t) in tokens.iter().enumerate() {
        let v = if i < 3 { 2 } else { 1 };
        let (s, b) = app
            .get(
                &format!("/v1/products/acme/channels/stable/resolve?nonce=nonce-{i}-abcdef&keys_version={v}"),
                t,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(b["keys_version"], 2, "answers name the newest list: {b}");
    }
    app.state.checkins.flush().await;
    let st = status(&app).await;
    let k = st["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == key.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (k["held_by"].as_i64(), k["listed_since"].as_i64()),
        (Some(3), Some(2)),
        "{st}"
    );
    assert_eq!(
        (st["active_devices"].as_i64(), st["holding_newest"].as_i64()),
        (Some(4), Some(3))
    );

    let (s, b) = app
        .post("/v1/keys/response/activate", &app.admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("response key {key}: 3 of 4")),
        "{b}"
    );
    unchanged(&app, 2).await;
    let b = app
        .post_ok(
            "/v1/keys/response/activate",
            json!({"min_percent": 75}),
            StatusCode::OK,
        )
        .await;
    assert_eq!(b["state"], "current");
    assert_eq!(b["list_version"], 3);
}

/// A key file the list does not name (a crash between writing a rotated
/// key and storing its list, or `sluice keys generate` while the server was
/// down) joins as `next` when the server starts; nothing is signed with it.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn an_unlisted_key_file_is_listed_as_next_at_start(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path().join("data"));
    let mut app =
        TestApp::spawn_with(pool.clone(), config.clone(), tempfile::tempdir().unwrap()).await;
    let signer = app.state.keys.response_signer().key_id().to_string();
    app.stop().await;
    let made = sluice_server::infra::keystore::generate(
        &config.data_dir.join("keys"),
        &config.key_passphrase,
        KeyRole::Response,
    )
    .unwrap();
    let mut app =
        TestApp::spawn_with(pool.clone(), config.clone(), tempfile::tempdir().unwrap()).await;
    let all = lists(&app, 0).await;
    assert_eq!(all.newest, 2);
    let newest = all.lists[1]
        .verify_next(&all.lists[0].verify_self().unwrap())
        .unwrap();
    assert_eq!(newest.find(&made.key_id).unwrap().state, KeyState::Next);
    assert_eq!(
        app.state.keys.response_signer().key_id(),
        signer,
        "still signing with the current key"
    );

    // Revoked, then its file put back (a backup restored): it stays out.
    app.post_ok(
        "/v1/keys/response/revoke",
        json!({"key_id": made.key_id}),
        StatusCode::OK,
    )
    .await;
    app.stop().await;
    let role_dir = config.data_dir.join("keys/response");
    std::fs::copy(
        role_dir.join(format!("revoked/{}.key", made.key_id)),
        role_dir.join(format!("{}.key", made.key_id)),
    )
    .unwrap();
    let app = TestApp::spawn_with(pool, config, tempfile::tempdir().unwrap()).await;
    let all = lists(&app, 0).await;
    assert_eq!(all.newest, 3, "nothing to add at start");
    assert!(
        all.lists[2]
            .verify_self()
            .unwrap()
            .find(&made.key_id)
            .is_none()
    );
}

/// Revoking an image key signs its releases again with the current key
/// first (registry and database), so the releases stay installable for
/// devices that drop the revoked key; resolution offers the new signature.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn revoking_an_image_key_signs_its_releases_again(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let reg = registry();
    let repo_path = images::unique_repo("resign");
    let repo = format!("{reg}/{repo_path}");
    images::push_index(&reg, &repo_path, "1.0.0", &["amd64", "arm64"]).await;
    let secret = app.product("acme", &repo).await;
    app.channel("acme", "stable").await;
    app.post_ok(
        "/v1/products/acme/releases",
        json!({"version": "1.0.0", "image": format!("{repo}:1.0.0"),
                   "channels": [{"name": "stable", "percent": 100}]}),
        StatusCode::CREATED,
    )
    .await;
    let old = app.state.keys.image_key().public.key_id.clone();
    for path in ["/v1/keys/image/rotate", "/v1/keys/image/activate"] {
        let (s, b) = app.post(path, &app.admin, json!({})).await;
        assert_eq!(s, StatusCode::OK, "{path}: {b}");
    }
    let new = app.state.keys.image_key().public.key_id.clone();
    assert_ne!(old, new);
    let (s, b) = app
        .post("/v1/keys/image/revoke", &app.admin, json!({"key_id": old}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let (_, rel) = app
        .get("/v1/products/acme/releases/1.0.0", &app.admin)
        .await;
    for p in rel["platforms"].as_array().unwrap() {
        let by: Vec<&str> = p["signed_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert!(by.contains(&new.as_str()), "{rel}");
    }
    let (_, audit) = app.get("/v1/audit?action=release.resign", &app.admin).await;
    assert_eq!(
        audit["items"].as_array().unwrap().len(),
        3,
        "two platforms and the index: {audit}"
    );
    // A device is offered the release with the new key's signature, which
    // verifies with the keys of the newest list.
    let (_, token) = app.enroll("acme", &secret, "m1", "stable").await;
    let token = token.as_str();
    let (s, answer) = app
        .get(
            "/v1/products/acme/channels/stable/resolve?nonce=abcdefgh12",
            token,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let offer: sluice_protocol::Offer = serde_json::from_value(answer["release"].clone()).unwrap();
    assert_eq!(offer.signature.key_id, new);
    let (newest, _) = app.state.keys.newest_list().unwrap();
    assert!(newest.find(&old).is_none());
    sluice_protocol::simplesigning::verify_image_signature(
        &newest.key_set(),
        &offer.signature,
        &offer.digest,
        "acme",
        "1.0.0",
    )
    .unwrap();
}
