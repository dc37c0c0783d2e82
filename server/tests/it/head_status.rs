//! Why a device is not on its channel's head (`head_status` on a device,
//! `GET .../head-status` on a channel), the warnings publish and promote give
//! about devices a release cannot reach, the history's actor names and the
//! channel's count of devices behind the head: against a real server,
//! Postgres and registry.

use crate::common;
use crate::common::images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::BTreeMap;

struct Dev {
    id: String,
    token: String,
    arch: String,
}

async fn enroll(app: &TestApp, secret: &str, machine: &str, arch: &str, digest: &str) -> Dev {
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/devices/enroll",
            None,
            Some(json!({"product": "acme", "enrollment_secret": secret, "machine_id": machine,
                        "arch": arch, "channel": "stable", "current_version": "1.0.0", "current_digest": digest,
                        "proof": common::enroll_proof(&common::device_key("acme", machine), "acme", machine)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    Dev {
        id: b["device_id"].as_str().unwrap().into(),
        token: b["token"].as_str().unwrap().into(),
        arch: arch.into(),
    }
}

async fn resolve(app: &TestApp, d: &Dev, arch: &str, current: &str) -> Value {
    let (s, b) = app
        .get(
            &format!(
                "/v1/products/acme/channels/stable/resolve?arch={arch}&current={current}&nonce=n{}",
                rand::random::<u64>()
            ),
            &d.token,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

async fn head_status(app: &TestApp, d: &Dev) -> Value {
    let (s, b) = app.get(&format!("/v1/devices/{}", d.id), &app.admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["head_status"].clone()
}

async fn counts(app: &TestApp) -> (i64, i64, BTreeMap<String, i64>) {
    let (s, b) = app
        .get("/v1/products/acme/channels/stable/head-status", &app.admin)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let by = b["not_on_head"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().unwrap().to_string(),
                r["count"].as_i64().unwrap(),
            )
        })
        .collect();
    (
        b["devices"].as_i64().unwrap(),
        b["on_head"].as_i64().unwrap(),
        by,
    )
}

async fn promote(app: &TestApp, token: &str, body: Value) -> Value {
    let (s, b) = app
        .post("/v1/products/acme/channels/stable/promote", token, body)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

fn warnings(b: &Value) -> Vec<String> {
    b["warnings"]
        .as_array()
        .unwrap_or_else(|| panic!("no warnings array in {b}"))
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect()
}

/// Head status follows the same rules as resolve: what each device is told
/// agrees with the reason it is given, and the channel counts add up.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn head_status_explains_what_resolve_does(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let reg = registry();
    let repo = images::unique_repo("head-status");
    let secret = app.product("acme", &format!("{reg}/{repo}")).await;
    app.channel("acme", "stable").await;
    let (d100, _) = images::push_image(&reg, &repo, "1.0.0").await;
    let (d110, _) = images::push_image(&reg, &repo, "1.1.0").await;

    // 20 amd64 devices on 1.0.0 (the last names a variant, `amd64/v3`,
    // which the images' variant-less amd64 serves), and 2 arm64 ones (1.0.0
    // has no arm64 image: they say they run it anyway, as a device flashed by
    // hand would).
    let mut amd = Vec::new();
    for i in 0..20 {
        let arch = if i == 19 { "amd64/v3" } else { "amd64" };
        amd.push(enroll(&app, &secret, &format!("amd-{i}"), arch, &d100).await);
    }
    let arm = [
        enroll(&app, &secret, "arm-0", "arm64", &d100).await,
        enroll(&app, &secret, "arm-1", "arm64", &d100).await,
    ];

    // Publishing into the channel warns about the arm64 devices it strands.
    let b = app.post_ok("/v1/products/acme/releases", json!({"version": "1.0.0", "image": format!("{reg}/{repo}:1.0.0"), "channels": [{"name": "stable", "percent": 100}]}), StatusCode::CREATED)
        .await;
    assert_eq!(
        warnings(&b),
        [
            "no image for arm64 in 1.0.0: 2 devices of product acme on channel stable run arm64 and will stay where they are; publish a release with a arm64 image"
        ]
    );
    // Publishing without a channel names where those devices are.
    let ci = app.publisher(&["acme"]).await;
    let (s, b) = app
        .post(
            "/v1/products/acme/releases",
            &ci,
            json!({"version": "1.1.0", "image": format!("{reg}/{repo}:1.1.0")}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let w = warnings(&b);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("2 devices of product acme run arm64 (2 on stable)"),
        "{w:?}"
    );

    // Promote at 50 % by the CI token: the arm64 devices are stranded again.
    let b = promote(&app, &ci, json!({"version": "1.1.0", "percent": 50})).await;
    assert_eq!(b["head"], "1.1.0");
    let w = warnings(&b);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("no image for arm64 in 1.1.0: 2 devices"),
        "{w:?}"
    );
    assert_eq!(b["behind"], 22, "nobody runs 1.1.0 yet: {b}");

    // Every amd64 device: outside the cohort exactly when resolve keeps it off the head.
    let (mut admitted, mut outside) = (0, 0);
    for d in &amd {
        let before = head_status(&app, d).await;
        assert_eq!(before["on_head"], false, "{before}");
        assert_eq!(before["head"], "1.1.0");
        let r = resolve(&app, d, &d.arch, &d100).await;
        let offered = r["update"] == true && r["release"]["version"] == "1.1.0";
        match before["reason"].as_str().unwrap() {
            "outside_cohort" => {
                assert!(
                    !offered,
                    "resolve offered the head to a device outside the cohort: {r}"
                );
                assert_eq!(before["target"], "1.0.0");
                assert!(
                    before["message"]
                        .as_str()
                        .unwrap()
                        .contains("admitted once the rollout reaches"),
                    "{before}"
                );
                outside += 1;
            }
            "not_checked_in" | "offered" => {
                assert!(
                    offered,
                    "resolve did not offer the head it was said to: {r} {before}"
                );
                assert_eq!(before["target"], "1.1.0");
                admitted += 1;
            }
            other => panic!("unexpected reason {other}: {before}"),
        }
    }
    assert!(
        admitted > 0 && outside > 0,
        "{admitted} admitted, {outside} outside at 50%"
    );

    // The arm64 devices: the head has no image for them.
    let s = head_status(&app, &arm[0]).await;
    let offered_to_arm = {
        let r = resolve(&app, &arm[0], &arm[0].arch, &d100).await;
        r["update"] == true
    };
    assert!(!offered_to_arm);
    // Named even for a device outside the cohort: raising the percent would not help it.
    assert_eq!(s["reason"], "no_platform", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("1.1.0 has no image for arm64"),
        "{s}"
    );

    // At 100 % every amd64 device is admitted; one installs it, one fails it.
    app.set_rollout("acme", "stable", json!({"percent": 100}))
        .await;
    for arm_dev in &arm {
        let s = head_status(&app, arm_dev).await;
        assert_eq!(s["reason"], "no_platform", "{s}");
    }
    let ok = &amd[0];
    let ev = |kind: &str| json!({"kind": kind, "version": "1.1.0", "digest": d110});
    for k in [
        "download_started",
        "downloaded",
        "applied",
        "rebooting",
        "healthy",
    ] {
        let (s, b) = app
            .post(&format!("/v1/devices/{}/events", ok.id), &ok.token, ev(k))
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    }
    let s = head_status(&app, ok).await;
    assert_eq!(
        (s["on_head"].clone(), s["reason"].clone()),
        (json!(true), json!("on_head")),
        "{s}"
    );

    let bad = &amd[1];
    for k in ["download_started", "applied", "rolled_back"] {
        let (s, b) = app
            .post(&format!("/v1/devices/{}/events", bad.id), &bad.token, ev(k))
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    }
    let s = head_status(&app, bad).await;
    assert_eq!(s["reason"], "failed_before", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("reported 1.1.0 as rolled back"),
        "{s}"
    );

    let busy = &amd[2];
    let (st, b) = app
        .post(
            &format!("/v1/devices/{}/events", busy.id),
            &busy.token,
            ev("downloaded"),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    assert_eq!(head_status(&app, busy).await["reason"], "updating");

    // A pin overrides the channel, and the device is told so.
    let pinned = &amd[3];
    let (st, b) = app
        .call(
            Method::PUT,
            &format!("/v1/devices/{}/pin", pinned.id),
            Some(&app.admin),
            Some(json!({"version": "1.0.0"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let s = head_status(&app, pinned).await;
    assert_eq!(s["reason"], "pinned", "{s}");
    assert_eq!(s["target"], "1.0.0");

    // Pause: devices not yet on the head are held by it.
    let (st, b) = app
        .call(
            Method::PATCH,
            "/v1/products/acme/channels/stable/rollout",
            Some(&app.admin),
            Some(json!({"paused": true})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let s = head_status(&app, &amd[4]).await;
    assert_eq!(s["reason"], "paused", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("paused by user:admin"),
        "{s}"
    );
    assert_eq!(head_status(&app, ok).await["on_head"], true);

    // The channel's counts add up, by the same reasons.
    let (devices, on_head, by) = counts(&app).await;
    assert_eq!(devices, 22);
    assert_eq!(on_head, 1);
    assert_eq!(by.values().sum::<i64>(), devices - on_head, "{by:?}");
    assert_eq!(by.get("failed_before"), Some(&1), "{by:?}");
    assert_eq!(by.get("pinned"), Some(&1), "{by:?}");
    assert_eq!(by.get("no_platform"), Some(&2), "{by:?}");
    // The device that was downloading is held by the pause too.
    assert_eq!(by.get("paused"), Some(&17), "{by:?}");
    let (_, ch) = app
        .get("/v1/products/acme/channels/stable", &app.admin)
        .await;
    assert_eq!(ch["behind"], 21, "{ch}");

    // A pinned device no longer follows the channel: no warning counts it.
    let (st, b) = app
        .call(
            Method::PUT,
            &format!("/v1/devices/{}/pin", arm[1].id),
            Some(&app.admin),
            Some(json!({"version": "1.0.0"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let b = promote(
        &app,
        &app.admin,
        json!({"version": "1.1.0", "percent": 100}),
    )
    .await;
    let w = warnings(&b);
    assert!(
        w.len() == 1 && w[0].contains(": 1 device of product acme on channel stable runs arm64"),
        "{w:?}"
    );

    // A release with both images strands nobody.
    let (_, _) = images::push_index(&reg, &repo, "1.2.0", &["amd64", "arm64"]).await;
    let b = app.post_ok("/v1/products/acme/releases", json!({"version": "1.2.0", "image": format!("{reg}/{repo}:1.2.0"), "channels": [{"name": "stable", "percent": 10}]}), StatusCode::CREATED)
        .await;
    assert_eq!(warnings(&b), Vec::<String>::new());
    let b = promote(&app, &app.admin, json!({"version": "1.2.0", "percent": 20})).await;
    assert_eq!(warnings(&b), Vec::<String>::new());

    // History names people and tokens, keeping the id.
    let (s, h) = app
        .get(
            "/v1/products/acme/channels/stable/history?limit=50",
            &app.admin,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let items = h["items"].as_array().unwrap();
    let by_token = items
        .iter()
        .find(|e| e["actor"].as_str().unwrap().starts_with("token:"))
        .unwrap_or_else(|| panic!("the CI token's promote is in the history: {h}"));
    assert_eq!(by_token["actor_name"], "ci", "{by_token}");
    let by_admin = items.iter().find(|e| e["actor"] == "user:admin").unwrap();
    assert_eq!(by_admin["actor_name"], "admin");

    // A channel that does not exist is a 404 a person can read.
    let (s, b) = app
        .get("/v1/products/acme/channels/nope/head-status", &app.admin)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        b["detail"].as_str().unwrap().contains("channel nope"),
        "{b}"
    );
}
