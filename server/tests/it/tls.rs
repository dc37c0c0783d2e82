//! HTTPS served by Sluice itself: a client that trusts our CA gets answers,
//! one that does not is refused by its TLS stack.

use crate::common;

use common::TestApp;
use reqwest::{Method, StatusCode};
use sqlx::PgPool;

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn serves_https_with_its_certificate(pool: PgPool) {
    let (app, certs) = TestApp::spawn_tls(pool).await;
    assert!(app.url.starts_with("https://"));
    // The test client trusts only our CA, and logged in over HTTPS already.
    let (s, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2, "{keys}");

    // Plain HTTP on the TLS port and a client without our CA both fail.
    let plain = reqwest::Client::new();
    assert!(
        plain
            .get(app.url.replace("https", "http") + "/healthz")
            .send()
            .await
            .is_err()
    );
    let err = plain
        .get(format!("{}/healthz", app.url))
        .send()
        .await
        .expect_err("our CA is not in the system's roots");
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );

    // A key that does not belong to the certificate is refused at start, with a clear message.
    let bad = sluice_server::infra::tls::server_config(&certs.cert, &certs.ca_key).unwrap_err();
    assert!(format!("{bad:#}").contains("does not match"), "{bad:#}");
}
