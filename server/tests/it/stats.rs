//! `GET .../channels/{channel}/stats`: the head's adoption over time, counted
//! from the devices' reports, against a real server, Postgres and registry.

use crate::common;
use crate::common::images;

use common::{TestApp, registry};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// Enrolls a device that says it runs `current_version`; answers (id, token).
async fn enroll(
    app: &TestApp,
    secret: &str,
    machine: &str,
    channel: &str,
    current_version: Option<&str>,
) -> (String, String) {
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/devices/enroll",
            None,
            Some(
                json!({"product": "acme", "enrollment_secret": secret, "machine_id": machine,
                        "arch": "amd64", "channel": channel, "current_version": current_version,
                        "proof": common::enroll_proof(&common::device_key("acme", machine), "acme", machine)}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    (
        b["device_id"].as_str().unwrap().into(),
        b["token"].as_str().unwrap().into(),
    )
}

/// Reports an event as the device, then moves its time to `at`.
async fn report(
    app: &TestApp,
    device: &(String, String),
    kind: &str,
    version: &str,
    digest: &str,
    at: OffsetDateTime,
) {
    let (s, b) = app
        .post(
            &format!("/v1/devices/{}/events", device.0),
            &device.1,
            json!({"kind": kind, "version": version, "digest": digest}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    sqlx::query("UPDATE device_events SET at = $2 WHERE id = (SELECT max(id) FROM device_events WHERE device_id = $1::uuid)")
        .bind(&device.0)
        .bind(at)
        .execute(&app.state.db)
        .await
        .unwrap();
}

async fn enrolled_at(app: &TestApp, device: &(String, String), at: OffsetDateTime) {
    sqlx::query("UPDATE devices SET created_at = $2 WHERE id = $1::uuid")
        .bind(&device.0)
        .bind(at)
        .execute(&app.state.db)
        .await
        .unwrap();
}

fn points(b: &Value) -> Vec<(String, i64, i64, i64, i64)> {
    b["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["at"].as_str().unwrap().to_string(),
                p["devices"].as_i64().unwrap(),
                p["on_head"].as_i64().unwrap(),
                p["other"].as_i64().unwrap(),
                p["failed"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

/// Four devices on `stable` move from 1.0.0 to 1.1.0 over three minutes (one
/// fails, one enrolls late); a device on `beta` never counts. Each point
/// counts the devices as they stood at its end.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn adoption_over_time(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let reg = registry();
    let repo_path = images::unique_repo("stats");
    let repo = format!("{reg}/{repo_path}");
    let (d1, _) = images::push_image(&reg, &repo_path, "1.0.0").await;
    let (d2, _) = images::push_image(&reg, &repo_path, "1.1.0").await;
    let secret = app.product("acme", &repo).await;
    app.channel("acme", "stable").await;
    app.channel("acme", "beta").await;
    for v in ["1.0.0", "1.1.0"] {
        app.post_ok(
            "/v1/products/acme/releases",
            json!({"version": v, "image": format!("{repo}:{v}"),
                       "channels": [{"name": "stable", "percent": 100}]}),
            StatusCode::CREATED,
        )
        .await;
    }

    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::days(1);
    let s = |secs: i64| t0 + Duration::seconds(secs);
    let a = enroll(&app, &secret, "a", "stable", None).await;
    let b = enroll(&app, &secret, "b", "stable", None).await;
    let c = enroll(&app, &secret, "c", "stable", None).await;
    let late = enroll(&app, &secret, "late", "stable", Some("1.0.0")).await;
    let other = enroll(&app, &secret, "other", "beta", Some("1.1.0")).await;
    for d in [&a, &b, &c, &other] {
        enrolled_at(&app, d, s(-3600)).await;
    }
    enrolled_at(&app, &late, s(100)).await;
    report(&app, &b, "healthy", "1.0.0", &d1, s(10)).await;
    report(&app, &a, "healthy", "1.1.0", &d2, s(70)).await;
    report(&app, &b, "healthy", "1.1.0", &d2, s(130)).await;
    report(&app, &c, "failed", "1.1.0", &d2, s(130)).await;
    report(&app, &other, "healthy", "1.1.0", &d2, s(20)).await;

    let viewer = app.viewer().await;
    let path = format!(
        "/v1/products/acme/channels/stable/stats?since={}&until={}&bucket_s=60",
        rfc3339(t0),
        rfc3339(s(180))
    );
    let (st, body) = app.get(&path, &viewer).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["head"], "1.1.0");
    assert_eq!(body["bucket_s"], 60);
    assert_eq!(
        points(&body),
        vec![
            // b runs 1.0.0; a, c have reported nothing yet; `late` is not enrolled.
            (rfc3339(s(60)), 3, 0, 3, 0),
            // a is healthy on the head; `late` enrolled on 1.0.0.
            (rfc3339(s(120)), 4, 1, 3, 0),
            // b moved up, c failed on the head.
            (rfc3339(s(180)), 4, 2, 2, 1),
        ]
    );

    // Without a bucket size the window is split into 60 points.
    let (st, body) = app
        .get(
            &format!(
                "/v1/products/acme/channels/stable/stats?since={}&until={}",
                rfc3339(t0),
                rfc3339(s(600))
            ),
            &viewer,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["bucket_s"], 10);
    let pts = points(&body);
    assert_eq!(pts.len(), 60);
    assert_eq!(pts[59], (rfc3339(s(600)), 4, 2, 2, 1));
}

/// Refusals: a device token, an unknown channel, a backwards window, too many points.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn stats_refusals(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = app
        .product("acme", &format!("{}/acme/os", registry()))
        .await;
    app.channel("acme", "stable").await;
    let device = enroll(&app, &secret, "m", "stable", None).await;
    let base = "/v1/products/acme/channels/stable/stats";

    let (s, b) = app.get(base, &device.1).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, _) = app.call(Method::GET, base, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, b) = app
        .get("/v1/products/acme/channels/nope/stats", &app.admin)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");

    let (s, b) = app
        .get(
            &format!("{base}?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z"),
            &app.admin,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("before `until`"),
        "{b}"
    );

    let (s, b) = app
        .get(
            &format!("{base}?since=2026-01-01T00:00:00Z&until=2026-01-02T00:00:00Z&bucket_s=1"),
            &app.admin,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("at most 1000"),
        "{b}"
    );

    let (s, b) = app
        .get(&format!("{base}?since=yesterday"), &app.admin)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    // Found by schemathesis: a huge bucket dropped the connection instead of a 400.
    let (s, b) = app
        .get(&format!("{base}?bucket_s=251606738153"), &app.admin)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = app
        .get(&format!("{base}?until=-9999-01-01T00:00:00Z"), &app.admin)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    // A channel without a head counts its devices, none on a head; the one
    // device enrolled a moment ago shows only in the last point.
    let (s, b) = app.get(base, &app.admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["head"], Value::Null);
    let pts = points(&b);
    assert_eq!(pts.len(), 60);
    assert!(pts[..59].iter().all(|p| p.1 == 0), "{b}");
    assert_eq!((pts[59].1, pts[59].2, pts[59].3, pts[59].4), (1, 0, 1, 0));
}
