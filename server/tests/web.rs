//! The dashboard as the server serves it from `SLUICE_WEB_DIR`: the page for
//! every app path, long-cached assets, and API paths that never turn into the page.

mod common;

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
