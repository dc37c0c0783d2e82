//! The dashboard as the server serves it, built into the binary or from
//! `SLUICE_WEB_DIR`: the page for every app path, long-cached assets, and API
//! paths that never turn into the page.

use crate::common;

use common::TestApp;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

async fn fetch(url: &str) -> (StatusCode, String, String, String) {
    let r = reqwest::get(url).await.unwrap();
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (ct, cc) = (header("content-type"), header("cache-control"));
    (r.status(), ct, cc, r.text().await.unwrap())
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn serves_the_dashboard(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("dist");
    std::fs::create_dir_all(web.join("assets")).unwrap();
    std::fs::write(web.join("index.html"), "<!doctype html><div id=root></div>").unwrap();
    std::fs::write(web.join("assets/index-abc123.js"), "console.log(1)").unwrap();
    let mut config = common::config(dir.path().join("data"));
    config.web_dir = Some(web);
    let app = TestApp::spawn_with(pool, config, dir).await;

    for path in ["/", "/products/acme/channels/stable", "/devices/123"] {
        let (s, ct, cc, body) = fetch(&format!("{}{path}", app.url)).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(ct.starts_with("text/html"), "{path}: {ct}");
        assert_eq!(cc, "no-cache", "{path}");
        assert!(body.contains("id=root"), "{path}: {body}");
    }
    let (s, ct, cc, _) = fetch(&format!("{}/assets/index-abc123.js", app.url)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(ct.contains("javascript"), "{ct}");
    assert_eq!(cc, "public, max-age=31536000, immutable");
    let (s, _, _, _) = fetch(&format!("{}/assets/missing.js", app.url)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a missing asset is not the page");

    // The API keeps its own answers.
    let (s, b) = app.get("/v1/nothing-here", &app.admin).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["status"], 404);
    let (s, _) = app
        .call(Method::DELETE, "/v1/products", Some(&app.admin), None)
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let (s, b) = app.get("/v1/products", &app.admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _, _, body) = fetch(&format!("{}/openapi.json", app.url)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("/v1/products/{product}/channels/{channel}/stats"));
}

/// With no `SLUICE_WEB_DIR`, the binary serves the dashboard it was built with:
/// the same `web/dist` that `npm run build` wrote (scripts/test and scripts/run
/// build it before the server).
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn serves_the_dashboard_built_into_the_binary(pool: PgPool) {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/dist");
    let index = std::fs::read_to_string(dist.join("index.html")).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: build the dashboard first (`npm ci && npm run build` in web/), then the server",
            dist.display()
        )
    });
    assert!(sluice_server::app::dashboard_embedded());
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path().join("data"));
    assert!(config.web_dir.is_none());
    let app = TestApp::spawn_with(pool, config, dir).await;

    for path in [
        "/",
        "/products/acme/channels/stable",
        "/devices/123",
        "/login",
    ] {
        let (s, ct, cc, body) = fetch(&format!("{}{path}", app.url)).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(ct.starts_with("text/html"), "{path}: {ct}");
        assert_eq!(cc, "no-cache", "{path}");
        assert_eq!(body, index, "{path}: the page is web/dist/index.html");
    }
    // Every asset the page names comes back byte for byte, cached for good.
    let assets: Vec<_> = std::fs::read_dir(dist.join("assets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        assets
            .iter()
            .any(|a| index.contains(&format!("/assets/{a}")))
    );
    for name in &assets {
        let r = reqwest::get(format!("{}/assets/{name}", app.url))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{name}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        let cc = r.headers()["cache-control"].to_str().unwrap().to_string();
        assert_eq!(cc, "public, max-age=31536000, immutable", "{name}");
        if name.ends_with(".js") {
            assert!(ct.contains("javascript"), "{name}: {ct}");
        } else if name.ends_with(".css") {
            assert!(ct.starts_with("text/css"), "{name}: {ct}");
        }
        let bytes = r.bytes().await.unwrap();
        assert_eq!(
            &bytes[..],
            std::fs::read(dist.join("assets").join(name)).unwrap()
        );
    }
    let (s, ct, _, body) = fetch(&format!("{}/assets/missing.js", app.url)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a missing asset is not the page");
    assert!(ct.contains("problem+json"), "{ct}: {body}");
    let (s, b) = app.get("/v1/nothing-here", &app.admin).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["status"], 404);
    let (s, b) = app.get("/v1/products", &app.admin).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}
