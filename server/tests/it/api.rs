//! Failure modes of the API that need no registry: each bad input gets the
//! right 4xx as problem+json, and nothing is half-written.

use crate::common;

use common::TestApp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

async fn count(db: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(db)
        .await
        .unwrap()
}

fn claims(sub: &str, kind: &str, role: &str, exp_in: i64, aud: &str) -> Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    json!({"sub": sub, "kind": kind, "role": role, "products": [], "aud": aud, "iat": now, "nbf": now - 1, "exp": now + exp_in})
}

fn sign(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// Wrong passwords and unknown users get the same 401.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn login_refuses_wrong_credentials(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    for (u, p) in [("admin", "wrong"), ("nobody", "wrong")] {
        let (s, b) = app
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"username": u, "password": p})),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(b["detail"], "wrong user name or password");
    }
}

/// Malformed JSON, unknown fields, a wrong content type and an oversized body
/// are each refused with their own status.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn malformed_bodies_are_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/products", app.url);
    let send = |body: Vec<u8>, ct: &'static str| {
        client
            .post(&url)
            .bearer_auth(&app.admin)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = send(b"{\"name\": ".to_vec(), "application/json")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = send(
        br#"{"name":"a","repository":"r.example/a","colour":"red"}"#.to_vec(),
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("colour"));
    let r = send(
        br#"{"name":"a","repository":"r.example/a"}"#.to_vec(),
        "text/plain",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = format!(
        r#"{{"name":"a","repository":"r.example/a","description":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let r = send(big.into_bytes(), "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(count(&app.state.db, "products").await, 0);
}

/// Tokens that are missing, forged, expired, for another audience, `alg: none`
/// or revoked are refused with 401.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn bad_tokens_are_refused(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = app.jwt_secret().await;
    let (s, _) = app.call(Method::GET, "/v1/products", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let forged = sign(
        b"not the server's secret at all, 32+ bytes",
        &claims("admin", "user", "admin", 600, "sluice"),
    );
    let expired = sign(&secret, &claims("admin", "user", "admin", -600, "sluice"));
    let other_aud = sign(
        &secret,
        &claims("admin", "user", "admin", 600, "someone-else"),
    );
    let none = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            e.encode(br#"{"alg":"none","typ":"JWT"}"#),
            e.encode(claims("admin", "user", "admin", 600, "sluice").to_string())
        )
    };
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims("admin", "user", "admin", 600, "sluice"),
        &EncodingKey::from_secret(&secret),
    )
    .unwrap();
    // HS/ES confusion: an ES256 token whose "signature" is made with the HMAC
    // secret, and a genuinely EC-signed one; only HS256 is ever accepted.
    let es_confused = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = e.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let body = e.encode(claims("admin", "user", "admin", 600, "sluice").to_string());
        let mac = {
            use sha2::Digest;
            sha2::Sha256::digest([&secret[..], head.as_bytes(), b".", body.as_bytes()].concat())
        };
        format!("{head}.{body}.{}", e.encode(mac))
    };
    let es256 = {
        use p256::pkcs8::EncodePrivateKey;
        let key = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let pem = key.to_pkcs8_pem(Default::default()).unwrap();
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims("admin", "user", "admin", 600, "sluice"),
            &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let not_yet = {
        let mut c = claims("admin", "user", "admin", 1200, "sluice");
        c["nbf"] = json!(time::OffsetDateTime::now_utc().unix_timestamp() + 600);
        sign(&secret, &c)
    };
    for (what, t) in [
        ("es256 with the hmac secret", es_confused),
        ("es256", es256),
        ("not yet valid", not_yet),
        ("forged", forged),
        ("expired", expired),
        ("audience", other_aud),
        ("alg none", none),
        ("hs512", hs512),
        ("garbage", "abc".into()),
    ] {
        let (s, b) = app.get("/v1/products", &t).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {b}");
    }
    let good = sign(&secret, &claims("admin", "user", "admin", 600, "sluice"));
    assert_eq!(app.get("/v1/products", &good).await.0, StatusCode::OK);

    // A revoked API token stops working at once.
    app.product("acme-os", "registry.example.com/acme/os").await;
    let b = app
        .post_ok(
            "/v1/tokens",
            json!({"name": "ci", "role": "viewer"}),
            StatusCode::CREATED,
        )
        .await;
    let (id, token) = (
        b["id"].as_str().unwrap().to_string(),
        b["token"].as_str().unwrap().to_string(),
    );
    assert_eq!(app.get("/v1/products", &token).await.0, StatusCode::OK);
    let (s, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{id}"),
            Some(&app.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, b) = app.get("/v1/products", &token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(b["detail"], "the token has been revoked");
}

/// Invalid product names and repositories are refused; a taken name is a 409;
/// nothing extra is stored, and the one good product has its audit row.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn product_validation(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    for (name, repo) in [
        ("Acme", "r.example/acme"),
        ("-acme", "r.example/acme"),
        ("acme", "no-slash"),
        ("acme", "r.example/acme:1.0"),
        ("acme", "r.example/ACME"),
    ] {
        let (s, b) = app
            .post(
                "/v1/products",
                &app.admin,
                json!({"name": name, "repository": repo}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{name} {repo}: {b}");
    }
    app.product("acme", "r.example/acme").await;
    let (s, b) = app
        .post(
            "/v1/products",
            &app.admin,
            json!({"name": "acme", "repository": "r.example/acme"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(b["detail"], "product acme already exists");
    assert_eq!(count(&app.state.db, "products").await, 1);
    // The server's own entries (the first key list at start) aside.
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT action, target FROM audit_log WHERE actor <> 'system' ORDER BY id")
            .fetch_all(&app.state.db)
            .await
            .unwrap();
    assert_eq!(
        audit,
        vec![("product.create".to_string(), "product:acme".to_string())]
    );
}

/// Publishing checks the version, the repository and the token's products
/// before it touches the registry, and stores nothing when it refuses.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn publish_refusals_store_nothing(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.product("acme", "r.example/acme").await;
    app.product("other", "r.example/other").await;
    let ci = app.publisher(&["acme"]).await;
    let cases = [
        (
            "acme",
            json!({"version": "1.2", "image": "r.example/acme:1.2"}),
            StatusCode::BAD_REQUEST,
            "invalid version",
        ),
        (
            "acme",
            json!({"version": "1.2.0", "image": "r.example/elsewhere:1.2"}),
            StatusCode::BAD_REQUEST,
            "outside product acme's repository",
        ),
        (
            "acme",
            json!({"version": "1.2.0", "image": "r.example/acme"}),
            StatusCode::BAD_REQUEST,
            "neither a tag nor a digest",
        ),
        (
            "acme",
            json!({"version": "1.2.0", "image": "r.example/acme:1", "metadata": [1]}),
            StatusCode::BAD_REQUEST,
            "metadata must be a JSON object",
        ),
        (
            "acme",
            json!({"version": "1.2.0", "image": "r.example/acme:1", "channels": [{"name": "beta", "percent": 120}]}),
            StatusCode::BAD_REQUEST,
            "out of range",
        ),
        (
            "other",
            json!({"version": "1.2.0", "image": "r.example/other:1"}),
            StatusCode::FORBIDDEN,
            "not allowed to publish to product other",
        ),
        (
            "nope",
            json!({"version": "1.2.0", "image": "r.example/nope:1"}),
            StatusCode::FORBIDDEN,
            "not allowed",
        ),
    ];
    for (product, body, status, needle) in cases {
        let (s, b) = app
            .post(
                &format!("/v1/products/{product}/releases"),
                &ci,
                body.clone(),
            )
            .await;
        assert_eq!(s, status, "{body}: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains(needle),
            "{body}: {b}"
        );
    }
    assert_eq!(count(&app.state.db, "releases").await, 0);
    assert_eq!(count(&app.state.db, "signatures").await, 0);
}

/// Enrollment: a wrong secret is a 401, an unknown channel a 404, and the same
/// machine id gets the same device back. A rotated secret replaces the old one.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn enrollment(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = app.product("acme", "r.example/acme").await;
    app.channel("acme", "stable").await;
    let body = |secret: &str, channel: &str| {
        let proof = common::enroll_proof(&common::device_key("acme", "m-1"), "acme", "m-1");
        Some(
            json!({"product": "acme", "enrollment_secret": secret, "machine_id": "m-1", "arch": "amd64", "channel": channel,
                   "proof": proof}),
        )
    };
    let (s, _) = app
        .call(
            Method::POST,
            "/v1/devices/enroll",
            None,
            body("wrong", "stable"),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/devices/enroll",
            None,
            body(&secret, "nightly"),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let (first, _) = app.enroll("acme", &secret, "m-1", "stable").await;
    let (again, _) = app.enroll("acme", &secret, "m-1", "stable").await;
    assert_eq!(first, again);
    assert_eq!(count(&app.state.db, "devices").await, 1);

    let (s, b) = app
        .post("/v1/products/acme/enrollment-secret", &app.admin, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let new = b["enrollment_secret"].as_str().unwrap();
    let (s, _) = app
        .call(
            Method::POST,
            "/v1/devices/enroll",
            None,
            body(&secret, "stable"),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the old secret must stop working"
    );
    app.enroll("acme", new, "m-2", "stable").await;
}

/// A device reports only about itself, with valid kinds and digests; its
/// status follows its reports.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn device_events(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = app.product("acme", "r.example/acme").await;
    app.channel("acme", "stable").await;
    let (d1, t1) = app.enroll("acme", &secret, "m-1", "stable").await;
    let (d2, _t2) = app.enroll("acme", &secret, "m-2", "stable").await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    let ev = |kind: &str| json!({"kind": kind, "version": "1.0.0", "digest": digest});
    let (s, _) = app
        .post(&format!("/v1/devices/{d2}/events"), &t1, ev("healthy"))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app
        .post(&format!("/v1/devices/{d1}/events"), &t1, ev("exploded"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = app
        .post(
            &format!("/v1/devices/{d1}/events"),
            &t1,
            json!({"kind": "healthy", "version": "1.0.0", "digest": "sha256:zz"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(count(&app.state.db, "device_events").await, 0);
    let (s, b) = app
        .post(&format!("/v1/devices/{d1}/events"), &t1, ev("healthy"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = app.get(&format!("/v1/devices/{d1}"), &app.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["status"], "healthy");
    assert_eq!(b["current_version"], "1.0.0");
    assert_eq!(b["current_digest"], digest);
    assert_eq!(b["events"][0]["kind"], "healthy");
    assert!(b["host"].is_null(), "no host status sent yet: {b}");

    // The host status sent with a report is kept and shown; a malformed one
    // is refused with the field to fix, and the report is not recorded.
    let slot =
        |name: &str| json!({"slot": name, "version": "1.0.0", "digest": digest, "boot": "good"});
    let host = json!({"state": "idle", "reboot_pending": false, "booted": slot("B"), "rollback": slot("A")});
    let events = count(&app.state.db, "device_events").await;
    for (bad, field) in [
        (json!({"state": "exploded"}), "host.state"),
        (
            json!({"state": "idle", "booted": slot("C")}),
            "host.booted.slot",
        ),
        (
            json!({"state": "idle", "staged": {"slot": "A", "digest": "sha256:zz", "boot": "trial"}}),
            "host.staged.digest",
        ),
        (
            json!({"state": "idle", "rollback": {"slot": "A", "version": "x".repeat(129), "boot": "good"}}),
            "host.rollback.version",
        ),
    ] {
        let mut e = ev("healthy");
        e["host"] = bad;
        let (s, b) = app.post(&format!("/v1/devices/{d1}/events"), &t1, e).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert!(
            b["detail"].as_str().unwrap().contains(field),
            "{field}: {b}"
        );
    }
    let mut e = ev("healthy");
    e["host"]["booted"] = json!({"slot": "A", "boot": "sideways"});
    e["host"]["state"] = json!("idle");
    let (s, b) = app.post(&format!("/v1/devices/{d1}/events"), &t1, e).await;
    assert!(
        s.is_client_error(),
        "an unknown boot state is refused: {s} {b}"
    );
    assert_eq!(count(&app.state.db, "device_events").await, events);

    let mut e = ev("healthy");
    e["host"] = host.clone();
    let (s, b) = app.post(&format!("/v1/devices/{d1}/events"), &t1, e).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (_, b) = app.get(&format!("/v1/devices/{d1}"), &app.admin).await;
    assert_eq!(b["host"]["booted"], slot("B"), "{b}");
    assert_eq!(b["host"]["rollback"], slot("A"), "{b}");
    assert!(b["host"]["staged"].is_null(), "{b}");
    assert!(b["host_at"].is_string(), "{b}");
    // A later report without host status (an older agent) keeps the last one.
    let (s, _) = app
        .post(&format!("/v1/devices/{d1}/events"), &t1, ev("healthy"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, b) = app.get(&format!("/v1/devices/{d1}"), &app.admin).await;
    assert_eq!(b["host"]["booted"], slot("B"), "{b}");
}

/// Rollout changes are validated; a ramp only goes up.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn rollout_validation(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.product("acme", "r.example/acme").await;
    app.channel("acme", "stable").await;
    let path = "/v1/products/acme/channels/stable/rollout";
    let patch = |b: Value| app.call(Method::PATCH, path, Some(&app.admin), Some(b));
    assert_eq!(patch(json!({})).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        patch(json!({"percent": 150})).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(patch(json!({"percent": 40})).await.0, StatusCode::OK);
    let (s, b) = patch(json!({"ramp": {"to_percent": 20, "over_minutes": 10}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["detail"].as_str().unwrap().contains("only raises"));
    assert_eq!(
        patch(json!({"gate": {"max_failure_percent": 10, "min_reports": 0}}))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let (s, b) = patch(json!({"ramp": {"to_percent": 80, "over_minutes": 60}, "gate": {"max_failure_percent": 5, "min_reports": 3}})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["rollout"]["ramp"]["to_percent"], 80.0);
    assert_eq!(b["gate"]["min_reports"], 3);
    let (s, b) = app
        .get("/v1/products/acme/channels/stable/history", &app.admin)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["items"].as_array().unwrap().len(), 3, "{b}");
    let (s, b) = app
        .post(
            "/v1/products/acme/channels/stable/rollback",
            &app.admin,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "no base to roll back to: {b}");
}

/// Unknown routes and methods answer problem+json too.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn unknown_routes(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    assert_eq!(
        app.get("/v1/nothing-here", &app.admin).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.call(Method::DELETE, "/v1/products", Some(&app.admin), None)
            .await
            .0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        app.get("/v1/devices/not-a-uuid", &app.admin).await.0,
        StatusCode::BAD_REQUEST
    );
    // The path extractors: a name that is not UTF-8 is the client's mistake
    // (400), a product or channel that does not exist is a 404 naming it.
    for path in [
        "/v1/products/%FF/channels/stable",
        "/v1/products/acme/channels/%FF/history",
        "/v1/products/%FF/releases/1.0.0",
    ] {
        let (s, b) = app.get(path, &app.admin).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {b}");
        assert!(
            b["detail"].as_str().unwrap().starts_with("invalid path"),
            "{path}: {b}"
        );
    }
    let (s, b) = app
        .get("/v1/products/ghost/channels/stable", &app.admin)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("product ghost"),
        "{b}"
    );
    app.product("acme", "r.example/acme").await;
    let (s, b) = app
        .get("/v1/products/acme/channels/ghost/head-status", &app.admin)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("channel ghost of product acme"),
        "{b}"
    );
    assert_eq!(
        app.get("/v1/devices?cursor=zzz", &app.admin).await.0,
        StatusCode::BAD_REQUEST
    );
    // Found by schemathesis: values Postgres refuses are the client's mistake, not a 500.
    let (s, b) = app
        .get(
            "/v1/devices?not_seen_for_s=-9223372036854775808",
            &app.admin,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = app.get("/v1/devices?q=a%00b", &app.admin).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let b = app
        .post_ok(
            "/v1/products",
            json!({"name": "nul", "repository": "r.example/nul", "description": "a\u{0}b"}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("invalid or out of range"),
        "{b}"
    );
}

/// Health endpoints answer; `/readyz` tells anyone only whether the server
/// is ready, and an admin the state of the database and of each registry.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn health_endpoints(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (s, _) = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = app
        .call(Method::GET, "/readyz", Some(&app.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["database"], "ok");
    // A registry that is down is named, and does not take the server out of rotation.
    app.product("acme", "127.0.0.1:9/acme/os").await;
    let (s, b) = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b, json!({"status": "ready"}), "anyone learns no more");
    let viewer = app.viewer().await;
    let (_, b) = app.get("/readyz", &viewer).await;
    assert_eq!(b, json!({"status": "ready"}), "nor does a viewer");
    let (s, b) = app
        .call(Method::GET, "/readyz", Some(&app.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["status"], "ready");
    assert!(
        b["registries"]["127.0.0.1:9"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{b}"
    );
    let (s, b) = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        b.as_str()
            .unwrap()
            .contains("sluice_http_responses_total{class=\"2xx\"}")
    );
    let (s, b) = app.call(Method::GET, "/v1/keys", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let roles: Vec<&str> = b["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["role"].as_str().unwrap())
        .collect();
    assert!(
        roles.contains(&"image") && roles.contains(&"response"),
        "{b}"
    );
    let (s, b) = app.call(Method::GET, "/docs/", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        b.as_str().unwrap().contains("swagger"),
        "docs page is served"
    );
}

/// Failed logins are limited per user name and address: 429 with
/// `Retry-After`, and the right password does not get through from that
/// address while limited (from another it does:
/// `identity.rs::a_password_guesser_does_not_lock_out_the_admin`).
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn login_is_rate_limited(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let attempt = |password: &'static str| {
        app.call_raw(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"username": "admin", "password": password})),
        )
    };
    // The burst is 10 failures (TestApp::spawn's successful login does not count).
    for _ in 0..10 {
        assert_eq!(attempt("wrong").await.0, StatusCode::UNAUTHORIZED);
    }
    let (s, headers, b) = attempt(common::ADMIN_PASSWORD).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("too many failed logins"),
        "{b}"
    );
    // Another user is not affected.
    let (s, _, _) = app
        .call_raw(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"username": "viewer", "password": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
