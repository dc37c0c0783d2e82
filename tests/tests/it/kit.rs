//! What the suites share on the server's side of product `acme`: a server
//! with a given poll interval, the OS-like images pushed, promotions, and
//! the admin's view of a channel and of a device.

use crate::common::{self, TestApp, images, registry};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::os_layers;
use sqlx::PgPool;

/// A server on its own test database that tells devices to poll every
/// `poll_after_s` seconds.
pub async fn server(pool: PgPool, poll_after_s: u64) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path().join("data"));
    config.poll_after_s = poll_after_s;
    TestApp::spawn_with(pool, config, dir).await
}

/// Pushes the [`os_layers`] image of each of `versions` to `repo_path` in
/// the test registry, tagged with its version; answers their digests.
pub async fn push_os_images(repo_path: &str, versions: &[&str]) -> Vec<String> {
    let reg = registry();
    let mut digests = Vec::new();
    for v in versions {
        let layers: Vec<images::Layer> = os_layers(v)
            .into_iter()
            .map(|l| images::Layer {
                diff_id: images::digest(&l.tar),
                data: l.gz,
            })
            .collect();
        let (d, _) = images::push_platform(
            &reg,
            repo_path,
            Some(v),
            images::Format::Oci,
            "amd64",
            &layers,
        )
        .await;
        digests.push(d);
    }
    digests
}

/// Makes `version` the head of `channel` at 100 %, as `token`.
pub async fn promote(app: &TestApp, token: &str, channel: &str, version: &str) {
    let (s, b) = app
        .post(
            &format!("/v1/products/acme/channels/{channel}/promote"),
            token,
            json!({"version": version, "percent": 100}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// Channel `stable` as the admin sees it.
pub async fn channel(app: &TestApp) -> Value {
    let (s, b) = app
        .get("/v1/products/acme/channels/stable", &app.admin)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// Device `id` as the admin sees it, and its events oldest first.
pub async fn device_view(app: &TestApp, id: &str) -> (Value, Vec<String>) {
    let (s, b) = app.get(&format!("/v1/devices/{id}"), &app.admin).await;
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
