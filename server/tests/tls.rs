//! HTTPS served by Sluice itself: a client that trusts our CA gets answers,
//! one that does not is refused by its TLS stack.

mod common;

use sqlx::PgPool;
use std::process::Command;

/// A CA and a server certificate for 127.0.0.1 made with the `openssl` CLI.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Sluice test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn serves_https_with_its_certificate(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let config = common::config(dir.path().join("data"));
    let state = sluice_server::app::state_with_pool(config, pool)
        .await
        .unwrap();
    let tls = sluice_server::tls::server_config(
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sluice_server::app::run_tls(
        listener,
        tls,
        state,
        async move {
            let _ = stopped.await;
        },
    ));

    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(dir.path().join("ca.pem")).unwrap()).unwrap();
    let trusting = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/v1/keys");
    let r = trusting
        .get(&url)
        .send()
        .await
        .expect("a client that trusts our CA connects");
    assert_eq!(r.status(), 200);
    let keys: serde_json::Value = r.json().await.unwrap();
    assert!(
        keys["keys"].as_array().is_some_and(|k| k.len() == 2),
        "{keys}"
    );

    // Plain HTTP on the TLS port and a client without our CA both fail.
    let plain = reqwest::Client::new();
    assert!(
        plain
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err()
    );
    let err = plain
        .get(&url)
        .send()
        .await
        .expect_err("our certificate is not in the system's roots");
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );

    // A wrong key for the certificate is refused at start, with a clear message.
    let bad = sluice_server::tls::server_config(
        &dir.path().join("server.pem"),
        &dir.path().join("ca.key"),
    )
    .unwrap_err();
    assert!(format!("{bad:#}").contains("does not match"), "{bad:#}");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
