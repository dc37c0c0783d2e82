//! End to end through HTTP, the CLI, a real registry and the real `cosign`:
//! publish, stage a rollout over 1 000 devices, raise it, roll it back, and let
//! the health gate halt a bad release by itself.

use crate::common;
use crate::common::images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_protocol::keys::SIGNATURE_HEADER;
use sluice_protocol::{KeySet, ResolveResponse};
use sqlx::PgPool;

struct Device {
    id: String,
    token: String,
    current: String,
}

/// The largest batch of answers one signature covered in [`resolve_all`].
static LARGEST_BATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Asks for every device at once; checks each answer's signature, nonce and
/// device id; answers the decisions in device order.
async fn resolve_all(app: &TestApp, keys: &KeySet, devices: &[Device]) -> Vec<ResolveResponse> {
    let client = reqwest::Client::new();
    let mut out = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(50) {
        let futs = chunk.iter().enumerate().map(|(i, d)| {
            let client = client.clone();
            let nonce = format!("nonce-{}-{i}", rand::random::<u64>());
            let url = format!(
                "{}/v1/products/acme/channels/stable/resolve?arch=amd64&current={}&nonce={nonce}",
                app.url, d.current
            );
            async move {
                let r = client.get(url).bearer_auth(&d.token).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                let sig = r.headers()[SIGNATURE_HEADER].to_str().unwrap().to_string();
                let body = r.bytes().await.unwrap();
                keys.verify_response(&sig, &body)
                    .expect("every answer is signed by a trusted response key");
                let size: u64 = sig
                    .split("; ")
                    .find_map(|p| p.strip_prefix("batch="))
                    .and_then(|b| b.split_once('/'))
                    .map(|(_, n)| n.parse().unwrap())
                    .expect("answers are signed in batches");
                LARGEST_BATCH.fetch_max(size, std::sync::atomic::Ordering::Relaxed);
                let answer: ResolveResponse = serde_json::from_slice(&body).unwrap();
                assert_eq!(answer.nonce, nonce);
                assert_eq!(answer.device_id, d.id);
                answer
            }
        });
        out.extend(futures::future::join_all(futs).await);
    }
    out
}

/// `n` devices enrolled in acme's `stable`, each running `current`.
async fn fleet(app: &TestApp, secret: &str, n: usize, current: &str) -> Vec<Device> {
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let (id, token) = app
            .enroll("acme", secret, &format!("machine-{i}"), "stable")
            .await;
        devices.push(Device {
            id,
            token,
            current: current.to_owned(),
        });
    }
    devices
}

async fn report(app: &TestApp, d: &Device, kind: &str, digest: &str) -> (StatusCode, Value) {
    let body = json!({"kind": kind, "version": "1.2.0", "digest": digest});
    app.post(&format!("/v1/devices/{}/events", d.id), &d.token, body)
        .await
}

fn offered(answers: &[ResolveResponse], version: &str) -> usize {
    answers
        .iter()
        .filter(|a| a.update && a.release.as_ref().is_some_and(|r| r.version == version))
        .count()
}

fn cosign_verify(pem: &str, image: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cosign.pub");
    std::fs::write(&key, pem).unwrap();
    let cosign = std::env::var("COSIGN").unwrap_or_else(|_| "cosign".into());
    let out = std::process::Command::new(cosign)
        .args(["verify", "--key"])
        .arg(&key)
        .args([
            "--insecure-ignore-tlog=true",
            "--allow-http-registry=true",
            image,
        ])
        .output()
        .expect("cosign runs (scripts/test installs it)");
    out.status.success()
}

fn image_keys(keys: &Value) -> Vec<(String, String)> {
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["role"] == "image")
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_string(),
                k["public_key_pem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A staged rollout, a rollback and the health gate, through the API and the CLI.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn staged_rollout_rollback_and_gate(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let acme = app
        .product_with_images("acme", &["1.0.0", "1.1.0", "1.2.0"])
        .await;
    let (repo, secret, ci) = (&acme.repo, &acme.secret, acme.ci.as_str());
    let [d1, d2, d3] = ["1.0.0", "1.1.0", "1.2.0"].map(|v| acme.digests[v].clone());
    let publish = |version: &str, tag: &str, extra: &str| {
        let line = format!(
            "release publish --product acme --version {version} --image {repo}:{tag} {extra}"
        );
        let app = &app;
        async move { app.cli(ci, &line).await }
    };

    // The base, published with the CLI in one line and made head at 100 %.
    let published = publish("1.0.0", "1.0.0", "--channel stable:100")
        .await
        .json();
    assert_eq!(published["digest"], d1);
    // Publishing again is idempotent; another digest for the same version is refused.
    publish("1.0.0", "1.0.0", "").await.ok();
    publish("1.0.0", "1.1.0", "")
        .await
        .fails(4, "already published");

    let (_, keys_json) = app.call(Method::GET, "/v1/keys", None, None).await;
    let keys: KeySet = serde_json::from_value(keys_json.clone()).unwrap();

    // 1 000 devices on the base.
    let mut devices = fleet(&app, secret, 1000, &d1).await;
    let answers = resolve_all(&app, &keys, &devices).await;
    assert_eq!(
        answers.iter().filter(|a| a.update).count(),
        0,
        "everyone runs the head"
    );
    // Answers made at the same time share one signature (each verified
    // above through its own inclusion path).
    assert!(
        LARGEST_BATCH.load(std::sync::atomic::Ordering::Relaxed) > 1,
        "1 000 answers in rounds of 50 concurrent requests were signed one by one"
    );

    // 1.1.0 at 10 %: about a hundred devices are offered it, and the offer is signed for it.
    publish("1.1.0", "1.1.0", "--channel stable:10").await.ok();
    let answers = resolve_all(&app, &keys, &devices).await;
    let n = offered(&answers, "1.1.0");
    assert!((60..=140).contains(&n), "10 % of 1000 devices, got {n}");
    let offer = answers
        .iter()
        .find(|a| a.update)
        .unwrap()
        .release
        .clone()
        .unwrap();
    assert_eq!(offer.digest, d2);
    assert_eq!(offer.image, format!("{repo}@{d2}"));
    sluice_protocol::simplesigning::verify_image_signature(
        &keys,
        &offer.signature,
        &d2,
        "acme",
        "1.1.0",
    )
    .unwrap();
    // Polling again gives the same devices the same answer.
    let again = resolve_all(&app, &keys, &devices).await;
    assert!(
        answers
            .iter()
            .zip(&again)
            .all(|(a, b)| a.update == b.update)
    );
    assert!(again.iter().all(|a| a.serial == answers[0].serial));

    // 100 %: everyone.
    app.cli(
        &app.admin,
        "channel rollout --product acme --channel stable --percent 100",
    )
    .await
    .ok();
    let answers100 = resolve_all(&app, &keys, &devices).await;
    assert_eq!(offered(&answers100, "1.1.0"), 1000);
    assert!(
        answers100[0].serial > answers[0].serial,
        "every change raises the serial"
    );

    // Half the fleet upgrades.
    for d in devices.iter_mut().take(500) {
        let (s, b) = app
            .post(
                &format!("/v1/devices/{}/events", d.id),
                &d.token,
                json!({"kind": "healthy", "version": "1.1.0", "digest": d2}),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
        d.current = d2.clone();
    }

    // Roll back: the upgraded devices are offered the base with `downgrade: true`.
    app.cli(
        &app.admin,
        "channel rollback --product acme --channel stable",
    )
    .await
    .ok();
    let answers = resolve_all(&app, &keys, &devices).await;
    for (a, d) in answers.iter().zip(&devices) {
        let r = a.release.as_ref().unwrap();
        assert_eq!(r.version, "1.0.0");
        if d.current == d2 {
            assert!(a.update && a.downgrade, "device on 1.1.0 goes back");
        } else {
            assert!(!a.update && !a.downgrade, "device on 1.0.0 stays");
        }
    }

    // 1.2.0 with a strict gate: failures above it halt the rollout by itself.
    app.post_as(
        ci,
        "/v1/products/acme/releases",
        json!({"version": "1.2.0", "image": format!("{repo}:1.2.0")}),
        StatusCode::CREATED,
    )
    .await;
    app.post_as(
        ci,
        "/v1/products/acme/channels/stable/promote",
        json!({"version": "1.2.0", "percent": 100}),
        StatusCode::OK,
    )
    .await;
    app.set_rollout(
        "acme",
        "stable",
        json!({"gate": {"max_failure_percent": 20, "min_reports": 10}}),
    )
    .await;
    // Outcomes count only from devices that were offered the release.
    let answers = resolve_all(&app, &keys, &devices[..10]).await;
    assert_eq!(offered(&answers, "1.2.0"), 10);
    // 7 healthy and 2 failed are below min_reports; a 10th, rolled back,
    // makes 3 of 10 bad, above 20 %.
    for (i, d) in devices[..10].iter().enumerate() {
        let kind = match i {
            0..7 => "healthy",
            7..9 => "failed",
            _ => "rolled_back",
        };
        assert_eq!(report(&app, d, kind, &d3).await.0, StatusCode::NO_CONTENT);
        let ch = app.get_ok("/v1/products/acme/channels/stable").await;
        assert_eq!(
            ch["rollout"]["paused"],
            i == 9,
            "after {} reports: {ch}",
            i + 1
        );
    }
    let ch = app.get_ok("/v1/products/acme/channels/stable").await;
    assert_eq!(ch["gate"]["reports"], 10);
    assert_eq!(ch["gate"]["failures"], 3);
    let history = app
        .get_ok("/v1/products/acme/channels/stable/history")
        .await;
    let last = &history["items"][0];
    assert_eq!(last["action"], "gate");
    assert_eq!(last["actor"], "system");
    assert!(
        last["reason"].as_str().unwrap().contains("3 of 10 devices"),
        "{last}"
    );
    let audit = app.get_ok("/v1/audit?action=channel.gate").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");
    // Paused: devices not on the head are not offered it.
    let answers = resolve_all(&app, &keys, &devices[10..]).await;
    assert_eq!(offered(&answers, "1.2.0"), 0);

    // Check-ins reach the database (written behind, flushed on shutdown).
    let mut app = app;
    app.stop().await;
    let seen: i64 =
        sqlx::query_scalar("SELECT count(*) FROM devices WHERE current_digest IS NOT NULL")
            .fetch_one(&app.state.db)
            .await
            .unwrap();
    assert_eq!(seen, 1000);
}

/// The real cosign accepts what we signed with the key from `GET /v1/keys`,
/// refuses another key, and after a rotation (rotate, then activate) both
/// old and new images verify.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn cosign_verifies_our_signatures_across_rotation(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let reg = registry();
    let repo_path = images::unique_repo("cosign");
    let repo = format!("{reg}/{repo_path}");
    let (_old_index, _) = images::push_index(&reg, &repo_path, "1.0.0", &["amd64", "arm64"]).await;
    images::push_image(&reg, &repo_path, "2.0.0").await;
    app.product("acme", &repo).await;

    let b = app
        .post_ok(
            "/v1/products/acme/releases",
            json!({"version": "1.0.0", "image": format!("{repo}:1.0.0")}),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(b["platforms"].as_array().unwrap().len(), 2);
    assert!(
        b["platforms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["signed_by"].as_array().unwrap().len() == 1),
        "{b}"
    );
    let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    let old = image_keys(&keys);
    assert_eq!(old.len(), 1);
    assert!(cosign_verify(&old[0].1, &format!("{repo}:1.0.0")));

    let other = sigstore::crypto::SigningScheme::ECDSA_P256_SHA256_ASN1
        .create_signer()
        .unwrap()
        .to_sigstore_keypair()
        .unwrap()
        .public_key_to_pem()
        .unwrap();
    assert!(
        !cosign_verify(&other, &format!("{repo}:1.0.0")),
        "another key must not verify"
    );

    let (s, b) = app
        .post("/v1/keys/image/rotate", &app.admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["state"], "next", "{b}");
    // No device yet: nothing to wait for.
    let (s, b) = app
        .post("/v1/keys/image/activate", &app.admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    app.post_ok(
        "/v1/products/acme/releases",
        json!({"version": "2.0.0", "image": format!("{repo}:2.0.0")}),
        StatusCode::CREATED,
    )
    .await;
    let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    let both = image_keys(&keys);
    assert_eq!(both.len(), 2, "the old key stays trusted");
    let new = both.iter().find(|k| k.0 != old[0].0).unwrap();
    assert!(
        cosign_verify(&old[0].1, &format!("{repo}:1.0.0")),
        "signed before the rotation"
    );
    assert!(
        cosign_verify(&new.1, &format!("{repo}:2.0.0")),
        "signed after the rotation"
    );
    assert!(
        !cosign_verify(&new.1, &format!("{repo}:1.0.0")),
        "the new key did not sign the old image"
    );
}

/// The registry down during publish: 503, nothing stored; a retry succeeds.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn publish_with_the_registry_down(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    // A port nothing listens on stands in for a registry that is down.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    app.post_ok(
        "/v1/products",
        json!({"name": "down", "repository": format!("{dead}/acme/os")}),
        StatusCode::CREATED,
    )
    .await;
    let b = app
        .post_ok(
            "/v1/products/down/releases",
            json!({"version": "1.0.0", "image": format!("{dead}/acme/os:1.0.0")}),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
    assert!(b["detail"].as_str().unwrap().contains("unreachable"), "{b}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM releases")
        .fetch_one(&app.state.db)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // A tag that is not in the registry: 422 with what to do.
    let reg = registry();
    let repo_path = images::unique_repo("missing");
    app.product("acme", &format!("{reg}/{repo_path}")).await;
    let b = app
        .post_ok(
            "/v1/products/acme/releases",
            json!({"version": "1.0.0", "image": format!("{reg}/{repo_path}:nope")}),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("push it before publishing"),
        "{b}"
    );
    images::push_image(&reg, &repo_path, "nope").await;
    let (s, b) = app
        .post(
            "/v1/products/acme/releases",
            &app.admin,
            json!({"version": "1.0.0", "image": format!("{reg}/{repo_path}:nope")}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "a retry once the image is there succeeds: {b}"
    );
}

/// Pins override the channel: a release pin, an image pin (resolved and signed
/// when set), and unpinning.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn pins_override_the_channel(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let acme = app
        .product_with_images("acme", &["1.0.0", "2.0.0", "experimental"])
        .await;
    let (repo, secret) = (&acme.repo, &acme.secret);
    let [d1, d2, dx] = ["1.0.0", "2.0.0", "experimental"].map(|v| acme.digests[v].clone());
    for v in ["1.0.0", "2.0.0"] {
        app.post_ok(
            "/v1/products/acme/releases",
            json!({"version": v, "image": format!("{repo}:{v}"), "channels": [{"name": "stable", "percent": 100}]}),
            StatusCode::CREATED,
        )
        .await;
    }
    let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    let keys: KeySet = serde_json::from_value(keys).unwrap();
    let (id, token) = app.enroll("acme", secret, "pinned", "stable").await;
    let dev = [Device {
        id: id.clone(),
        token,
        current: d2.clone(),
    }];
    assert!(!resolve_all(&app, &keys, &dev).await[0].update);
    let pin = |body: Value| {
        let path = format!("/v1/devices/{id}/pin");
        let app = &app;
        async move {
            app.call(Method::PUT, &path, Some(&app.admin), Some(body))
                .await
        }
    };

    let (s, b) = pin(json!({"version": "1.0.0"})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let a = &resolve_all(&app, &keys, &dev).await[0];
    assert!(a.update && a.downgrade);
    assert_eq!(a.release.as_ref().unwrap().digest, d1);

    let (s, b) = pin(json!({"image": format!("{repo}:experimental")})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["pin"]["digest"], dx);
    let a = &resolve_all(&app, &keys, &dev).await[0];
    let offer = a.release.as_ref().unwrap();
    assert!(a.update);
    assert_eq!(offer.digest, dx);
    sluice_protocol::simplesigning::verify_image_signature(
        &keys,
        &offer.signature,
        &dx,
        "acme",
        &offer.version,
    )
    .unwrap();

    let (s, b) = pin(json!({"image": "elsewhere.example/x:1"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, _) = pin(json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !resolve_all(&app, &keys, &dev).await[0].update,
        "unpinned, back on the channel's head"
    );
}

/// A device that names a variant (`arm64/v8`, as `uname -m` on a v8 board
/// maps to) gets that platform of a multi-arch release; a variant the
/// release lacks gets nothing rather than another variant's image. Before,
/// the architecture had to equal the platform's exactly, so every device
/// that named a variant was stranded.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_device_naming_a_variant_gets_that_platform(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let reg = registry();
    let repo_path = images::unique_repo("variant");
    let repo = format!("{reg}/{repo_path}");
    let (_, pushed) = images::push_index(&reg, &repo_path, "1.0.0", &["amd64", "arm64"]).await;
    let secret = app.product("acme", &repo).await;
    app.channel("acme", "stable").await;
    app.post_ok(
        "/v1/products/acme/releases",
        json!({"version": "1.0.0", "image": format!("{repo}:1.0.0")}),
        StatusCode::CREATED,
    )
    .await;
    app.post_ok(
        "/v1/products/acme/channels/stable/promote",
        json!({"version": "1.0.0", "percent": 100}),
        StatusCode::OK,
    )
    .await;
    let (_, token) = app.enroll("acme", &secret, "board-1", "stable").await;
    let digest_of = |arch: &str| {
        pushed
            .iter()
            .find(|(a, _, _)| a == arch)
            .map(|(_, d, _)| d.clone())
            .unwrap()
    };
    for (arch, want) in [
        ("amd64", Some(digest_of("amd64"))),
        ("arm64", Some(digest_of("arm64"))),
        ("arm64%2Fv8", Some(digest_of("arm64"))),
        ("arm64%2Fv9", None),
        ("riscv64", None),
    ] {
        let (s, b) = app
            .get(
                &format!(
                    "/v1/products/acme/channels/stable/resolve?arch={arch}&nonce=nonce-{}",
                    arch.replace('%', "-")
                ),
                &token,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{arch}: {b}");
        assert_eq!(
            b["release"]["digest"].as_str().map(str::to_string),
            want,
            "{arch}: {b}"
        );
        assert_eq!(b["update"], want.is_some(), "{arch}: {b}");
    }
}

/// The rule a release manager relies on, over a fleet: promoting over an
/// unfinished rollout keeps the base the channel had fully rolled out. 1.2.0
/// ramps over 1.1.0 at 26 %; promoting 1.4.0 at 20 % must not hand the 74 %
/// still on 1.1.0 the half-tested 1.2.0, nor move the devices on 1.2.0 back.
/// The promote says so before (dry run) and after (API, CLI).
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn promoting_over_an_unfinished_rollout_keeps_the_base(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let acme = app
        .product_with_releases("acme", &["1.1.0", "1.2.0", "1.4.0"])
        .await;
    let (secret, ci) = (&acme.secret, &acme.ci);
    let [d11, d12, d14] = ["1.1.0", "1.2.0", "1.4.0"].map(|v| acme.digests[v].clone());
    let (_, keys_json) = app.call(Method::GET, "/v1/keys", None, None).await;
    let keys: KeySet = serde_json::from_value(keys_json).unwrap();
    let mut devices = fleet(&app, secret, 400, &d11).await;
    let promote = |body: Value| {
        let app = &app;
        let ci = ci.clone();
        async move {
            app.post("/v1/products/acme/channels/stable/promote", &ci, body)
                .await
        }
    };

    // 1.2.0 reaches 26 % and those devices install it.
    let (s, b) = promote(json!({"version": "1.2.0", "percent": 26})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        b["plan"]["base"], "1.1.0",
        "1.1.0 was fully rolled out: {b}"
    );
    assert_eq!(b["plan"]["interrupted"], Value::Null);
    let answers = resolve_all(&app, &keys, &devices).await;
    let on_12 = offered(&answers, "1.2.0");
    assert!((60..=150).contains(&on_12), "26 % of 400, got {on_12}");
    for (d, a) in devices.iter_mut().zip(&answers) {
        if a.update {
            d.current = d12.clone();
        }
    }

    // A dry run says what promoting 1.4.0 at 20 % would do, and changes nothing.
    let before = app.get_ok("/v1/products/acme/channels/stable").await;
    let history_before = app
        .get_ok("/v1/products/acme/channels/stable/history")
        .await;
    let (s, dry) = promote(json!({"version": "1.4.0", "percent": 20, "dry_run": true})).await;
    assert_eq!(s, StatusCode::OK, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        (dry["head"].as_str(), dry["base"].as_str()),
        (Some("1.4.0"), Some("1.1.0")),
        "the channel as it would be"
    );
    assert_eq!(dry["plan"]["previous_head"], "1.2.0");
    assert_eq!(dry["plan"]["base"], "1.1.0");
    assert_eq!(dry["plan"]["interrupted"], "1.2.0");
    let message = dry["plan"]["message"].as_str().unwrap();
    assert!(
        message.contains("1.2.0 was not fully rolled out (at 26 %), so the base stays 1.1.0: devices outside that share get 1.1.0, and devices already on 1.2.0 keep it until 1.4.0 reaches them."),
        "{message}"
    );
    let unchanged = app.get_ok("/v1/products/acme/channels/stable").await;
    assert_eq!(unchanged["head"], "1.2.0");
    assert_eq!(
        unchanged["serial"], before["serial"],
        "a dry run stores nothing"
    );
    let history_after = app
        .get_ok("/v1/products/acme/channels/stable/history")
        .await;
    assert_eq!(history_after["items"], history_before["items"]);
    let answers = resolve_all(&app, &keys, &devices).await;
    assert_eq!(
        offered(&answers, "1.4.0"),
        0,
        "nobody is offered the dry run's head"
    );

    // The promote itself, through the CLI, which prints the plan.
    let run = app
        .cli(
            ci,
            "channel promote --product acme --channel stable --version 1.4.0 --percent 20",
        )
        .await;
    let out = run.ok();
    assert!(
        out.contains("1.4.0 is head of stable at 20 % (base 1.1.0)"),
        "{out}"
    );
    assert!(out.contains("so the base stays 1.1.0"), "{out}");

    // Every device: admitted to 1.4.0, or left where it is. Nobody on 1.1.0
    // gets 1.2.0; nobody on 1.2.0 goes back to 1.1.0.
    let answers = resolve_all(&app, &keys, &devices).await;
    let mut to_14 = 0;
    for (d, a) in devices.iter().zip(&answers) {
        let offer = a.release.as_ref().map(|r| r.version.as_str());
        if a.update {
            assert_eq!(
                offer,
                Some("1.4.0"),
                "{} on {} was offered {offer:?}",
                d.id,
                d.current
            );
            assert_eq!(a.release.as_ref().unwrap().digest, d14);
            assert!(!a.downgrade);
            to_14 += 1;
        } else if d.current == d12 {
            // Outside 1.4.0's cohort: its target is the base, which it does not move down to.
            assert_eq!(offer, Some("1.1.0"));
        } else {
            assert_eq!((offer, d.current == d11), (Some("1.1.0"), true));
        }
    }
    assert!((40..=130).contains(&to_14), "20 % of 400, got {to_14}");
    assert_eq!(
        offered(&answers, "1.2.0"),
        0,
        "the interrupted head is offered to no one"
    );

    // The history records the plan with the promote.
    let history = app
        .get_ok("/v1/products/acme/channels/stable/history")
        .await;
    let last = &history["items"][0];
    assert_eq!(last["action"], "promote");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("so the base stays 1.1.0"),
        "{last}"
    );

    // Once 1.4.0 is everywhere, the next promote makes it the base.
    app.set_rollout("acme", "stable", json!({"percent": 100}))
        .await;
    let answers = resolve_all(&app, &keys, &devices).await;
    assert_eq!(
        offered(&answers, "1.4.0") + answers.iter().filter(|a| !a.update).count(),
        400
    );
    assert!(
        answers
            .iter()
            .all(|a| a.release.as_ref().is_some_and(|r| r.version == "1.4.0"))
    );
    let (s, b) = promote(json!({"version": "1.2.0", "percent": 0, "dry_run": true})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["plan"]["base"], "1.4.0", "{b}");
}
