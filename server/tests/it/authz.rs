//! The authorization matrix: every route × every role gets the expected
//! status. Each allowed call is a valid request, so the role is the only thing
//! that differs between a 2xx and a 401/403.

use crate::common;
use crate::common::images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_protocol::ProofPurpose;
use sqlx::PgPool;

const ROLES: [&str; 7] = [
    "anonymous",
    "device",
    "device_other",
    "publisher",
    "publisher_other",
    "viewer",
    "admin",
];

/// Who may call a route.
#[derive(Clone, Copy, Debug)]
enum Who {
    Anyone,
    Admin,
    Viewer,
    Publisher,
    /// Admins, viewers and a publisher token for the product in the path.
    ProductReader,
    OwnDevice,
}

fn expected(who: Who, role: &str, ok: StatusCode) -> StatusCode {
    if role == "anonymous" && !matches!(who, Who::Anyone) {
        return StatusCode::UNAUTHORIZED;
    }
    let allowed = match who {
        Who::Anyone => true,
        Who::Admin => role == "admin",
        Who::Viewer => matches!(role, "viewer" | "admin"),
        Who::Publisher => matches!(role, "publisher" | "admin"),
        Who::ProductReader => matches!(role, "publisher" | "viewer" | "admin"),
        Who::OwnDevice => role == "device",
    };
    if allowed { ok } else { StatusCode::FORBIDDEN }
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn every_route_for_every_role(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let reg = registry();
    let repo_path = images::unique_repo("authz");
    let repo = format!("{reg}/{repo_path}");
    images::push_image(&reg, &repo_path, "base").await;
    let secret = app.product("acme", &repo).await;
    let other_secret = app
        .product(
            "other",
            &format!("{reg}/{}", images::unique_repo("authz-other")),
        )
        .await;
    app.channel("acme", "stable").await;
    app.channel("other", "stable").await;
    for v in ["1.0.0", "0.9.0"] {
        app.post_ok(
            "/v1/products/acme/releases",
            json!({"version": v, "image": format!("{repo}:base")}),
            StatusCode::CREATED,
        )
        .await;
    }
    let (device_id, device) = app.enroll("acme", &secret, "m-1", "stable").await;
    let (_, device_other) = app.enroll("other", &other_secret, "m-1", "stable").await;
    let publisher = app.publisher(&["acme"]).await;
    let publisher_other = app.publisher(&["other"]).await;
    let viewer = app.viewer().await;
    let token_of = |role: &str| -> Option<String> {
        match role {
            "anonymous" => None,
            "device" => Some(device.clone()),
            "device_other" => Some(device_other.clone()),
            "publisher" => Some(publisher.clone()),
            "publisher_other" => Some(publisher_other.clone()),
            "viewer" => Some(viewer.clone()),
            "admin" => Some(app.admin.clone()),
            _ => unreachable!(),
        }
    };
    let digest = format!("sha256:{}", "cd".repeat(32));
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut uncovered = Vec::new();

    // The admin (the last role) rotates and activates a new response key:
    // the key current now is retired then, and revoked by the next call.
    assert_eq!(ROLES.last(), Some(&"admin"));
    let (_, status) = app.get("/v1/keys/status", &app.admin).await;
    let retired_by_admin = status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "response" && k["state"] == "current")
        .map(|k| k["key_id"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("a current response key in {status}"));
    for (i, role) in ROLES.iter().enumerate() {
        // Things an allowed call may consume: a token to revoke, a release to revoke.
        let (_, t) = app
            .post(
                "/v1/tokens",
                &app.admin,
                json!({"name": format!("doomed-{role}"), "role": "viewer"}),
            )
            .await;
        let doomed = t["id"].as_str().unwrap().to_string();
        // Devices an allowed call may revoke, reset or delete.
        let (doomed_device, _) = app
            .enroll("acme", &secret, &format!("doomed-{role}"), "stable")
            .await;
        let (deleted_device, _) = app
            .enroll("acme", &secret, &format!("deleted-{role}"), "stable")
            .await;
        // A failure an allowed retry may clear.
        let (st, b) = app
            .post(
                &format!("/v1/devices/{device_id}/events"),
                &device,
                json!({"kind": "failed", "version": "1.0.0", "digest": digest}),
            )
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
        // Proofs are single-use: one per call.
        let machine = format!("new-{role}");
        let enroll_body = json!({"product": "acme", "enrollment_secret": secret, "machine_id": machine,
            "arch": "amd64", "channel": "stable",
            "proof": common::enroll_proof(&common::device_key("acme", &machine), "acme", &machine)});
        let device_proof = |purpose| json!({"proof": common::device_key("acme", "m-1").prove(purpose, "acme", &device_id, rand::random(), common::now_s())});
        // A lease and a FleetLock group each role's allowed call may remove.
        sqlx::query(
            "INSERT INTO reboot_leases VALUES ('acme.stable', $1, now(), now() + interval '1 hour')",
        )
        .bind(format!("doomed-{role}"))
        .execute(&app.state.db)
        .await
        .unwrap();
        let (st, b) = app
            .call(
                Method::PUT,
                &format!("/v1/fleetlock/groups/doomed-{}", role.replace('_', "-")),
                Some(&app.admin),
                Some(json!({"max_holders": 1})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{b}");
        let routes: Vec<(Method, String, Option<Value>, Who, StatusCode)> = vec![
            (
                Method::GET,
                "/healthz".into(),
                None,
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/readyz".into(),
                None,
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/metrics".into(),
                None,
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/openapi.json".into(),
                None,
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/keys".into(),
                None,
                Who::Anyone,
                StatusCode::OK,
            ),
            // Before the admin's call below rotates the enrollment secret.
            (
                Method::POST,
                "/v1/devices/enroll".into(),
                Some(enroll_body),
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/tokens".into(),
                Some(json!({"name": "t", "role": "publisher", "products": ["acme"]})),
                Who::Admin,
                StatusCode::CREATED,
            ),
            (
                Method::GET,
                "/v1/tokens".into(),
                None,
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::DELETE,
                format!("/v1/tokens/{doomed}"),
                None,
                Who::Admin,
                StatusCode::NO_CONTENT,
            ),
            (
                Method::POST,
                "/v1/products".into(),
                Some(json!({"name": format!("p{i}"), "repository": "r.example/p"})),
                Who::Admin,
                StatusCode::CREATED,
            ),
            (
                Method::GET,
                "/v1/products".into(),
                None,
                Who::Viewer,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme".into(),
                None,
                Who::Viewer,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/products/acme/enrollment-secret".into(),
                Some(json!({})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/products/acme/releases".into(),
                Some(json!({"version": format!("1.1.{i}"), "image": format!("{repo}:base")})),
                Who::Publisher,
                StatusCode::CREATED,
            ),
            (
                Method::GET,
                "/v1/products/acme/releases".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme/releases/1.0.0".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/products/acme/releases/0.9.0/revoke".into(),
                Some(json!({})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/products/acme/channels".into(),
                Some(json!({"name": format!("c{i}")})),
                Who::Admin,
                StatusCode::CREATED,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels/stable".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/products/acme/channels/stable/promote".into(),
                Some(json!({"version": "1.0.0", "percent": 20})),
                Who::Publisher,
                StatusCode::OK,
            ),
            (
                Method::PATCH,
                "/v1/products/acme/channels/stable/rollout".into(),
                Some(json!({"percent": 30})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/products/acme/channels/stable/rollback".into(),
                Some(json!({"version": "1.0.0"})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels/stable/history".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels/stable/head-status".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels/stable/transfer".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels/stable/stats".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels/stable/resolve?nonce=abcdefgh12".into(),
                None,
                Who::OwnDevice,
                StatusCode::OK,
            ),
            (
                Method::POST,
                format!("/v1/devices/{device_id}/events"),
                Some(json!({"kind": "downloaded", "version": "1.0.0", "digest": digest})),
                Who::OwnDevice,
                StatusCode::NO_CONTENT,
            ),
            (
                Method::POST,
                format!("/v1/devices/{device_id}/token"),
                Some(device_proof(ProofPurpose::Renew)),
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::POST,
                format!("/v1/devices/{device_id}/key"),
                Some(device_proof(ProofPurpose::Bind)),
                Who::OwnDevice,
                StatusCode::OK,
            ),
            (
                Method::POST,
                format!("/v1/devices/{doomed_device}/revoke"),
                Some(json!({"reason": "authz"})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                format!("/v1/devices/{doomed_device}/reset"),
                None,
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::DELETE,
                format!("/v1/devices/{deleted_device}"),
                None,
                Who::Admin,
                StatusCode::NO_CONTENT,
            ),
            (
                Method::GET,
                "/v1/devices".into(),
                None,
                Who::Viewer,
                StatusCode::OK,
            ),
            (
                Method::GET,
                format!("/v1/devices/{device_id}"),
                None,
                Who::Viewer,
                StatusCode::OK,
            ),
            (
                Method::PUT,
                format!("/v1/devices/{device_id}/pin"),
                Some(json!({"version": "1.0.0"})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/fleetlock/groups".into(),
                None,
                Who::Viewer,
                StatusCode::OK,
            ),
            (
                Method::PUT,
                "/v1/fleetlock/groups/workers".into(),
                Some(json!({"max_holders": 2})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::DELETE,
                format!("/v1/fleetlock/groups/doomed-{}", role.replace('_', "-")),
                None,
                Who::Admin,
                StatusCode::NO_CONTENT,
            ),
            (
                Method::GET,
                "/v1/products/acme/channels/stable/leases".into(),
                None,
                Who::ProductReader,
                StatusCode::OK,
            ),
            (
                Method::DELETE,
                format!("/v1/leases/acme.stable/doomed-{role}"),
                None,
                Who::Admin,
                StatusCode::NO_CONTENT,
            ),
            (
                Method::PUT,
                format!("/v1/devices/{device_id}/labels"),
                Some(json!({"labels": {"ring": "canary"}})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::PUT,
                "/v1/products/acme/channels/stable/reboot-policy".into(),
                Some(
                    json!({"windows": [{"days": "Sat", "start": "02:00", "end": "04:00", "time_zone": "Europe/Berlin"}]}),
                ),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/products/acme/releases/1.0.0/urgent".into(),
                Some(json!({"urgent": true})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/audit".into(),
                None,
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/keys/response/rotate".into(),
                Some(json!({})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/keys/response/activate".into(),
                Some(json!({"force": true})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/keys/response/revoke".into(),
                Some(json!({"key_id": retired_by_admin})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                format!("/v1/devices/{device_id}/retry"),
                Some(json!({})),
                Who::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                format!("/v1/devices/{device_id}/failures/cleared"),
                Some(json!({"digests": [digest], "by": "local"})),
                Who::OwnDevice,
                StatusCode::NO_CONTENT,
            ),
            (
                Method::POST,
                "/v1/auth/login".into(),
                Some(json!({"username": "admin", "password": common::ADMIN_PASSWORD})),
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/auth/logout".into(),
                None,
                Who::Anyone,
                StatusCode::NO_CONTENT,
            ),
            (
                Method::GET,
                "/v1/keys/status".into(),
                None,
                Who::Viewer,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/keys/lists?after=0".into(),
                None,
                Who::Anyone,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/keys/lists/latest".into(),
                None,
                Who::Anyone,
                StatusCode::OK,
            ),
        ];
        if i == 0 {
            uncovered = not_in_matrix(&routes);
        }
        for (method, path, body, who, ok) in routes {
            let want = expected(who, role, ok);
            let (got, b) = app
                .call(method.clone(), &path, token_of(role).as_deref(), body)
                .await;
            checked += 1;
            if got != want {
                failures.push(format!(
                    "{role:16} {method} {path}: expected {want}, got {got} {b}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checked, 56 * ROLES.len());
    assert!(
        uncovered.is_empty(),
        "operations of the server's OpenAPI document missing from the matrix:\n{}",
        uncovered.join("\n")
    );
}

/// The operations of the server's OpenAPI document (the router's own
/// list) that no route of the matrix calls, so "every route" stays true
/// when a route is added.
fn not_in_matrix(routes: &[(Method, String, Option<Value>, Who, StatusCode)]) -> Vec<String> {
    let doc: Value = serde_json::to_value(sluice_server::app::openapi()).unwrap();
    let matches = |template: &str, path: &str| {
        let path = path.split('?').next().unwrap();
        let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len()
            && t.iter()
                .zip(&p)
                .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}') && !p.is_empty()))
    };
    let mut missing = Vec::new();
    for (template, ops) in doc["paths"].as_object().unwrap() {
        // The FleetLock protocol answers `{kind, value}`, not problem+json,
        // and its body names the caller: `fleetlock.rs` covers who may call it.
        if template.ends_with("/v1/pre-reboot") || template.ends_with("/v1/steady-state") {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            let covered = routes.iter().any(|(m, path, ..)| {
                m.as_str().eq_ignore_ascii_case(method) && matches(template, path)
            });
            if !covered {
                missing.push(format!("{} {template}", method.to_uppercase()));
            }
        }
    }
    missing
}
