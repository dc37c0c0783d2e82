//! The agent talks to the server over HTTPS and pins the CA from its config:
//! the server's own CA is accepted, anything else refused.

use crate::common;

use common::TestApp;
use reqwest::Method;
use sluice_tests::*;
use sqlx::PgPool;

/// Sets `server_ca = <path>` in a device's agent.toml.
fn pin(dev: &Device, ca: &std::path::Path) {
    dev.edit_config(|c| c.server_ca = Some(ca.to_path_buf()));
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn the_agent_pins_the_servers_ca(pool: PgPool) {
    agent_bin();
    let (app, certs) = TestApp::spawn_tls(pool).await;
    let secret = app.product("acme", "r.example/acme/os").await;
    app.channel("acme", "stable").await;
    let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
    let opts = DeviceOpts {
        server: app.url.clone(),
        product: "acme".into(),
        channel: "stable".into(),
        enrollment_secret: secret,
        keys: keys.to_string(),
        insecure: vec![],
        kind: SlotKind::Dir,
        health: Health::Passes,
    };

    let pinned = Device::new(&opts);
    pin(&pinned, &certs.ca);
    ok(&pinned.run(&["enroll"]).await);
    let out = checked(&pinned.run(&["check"]).await);
    assert!(!out.trim().is_empty(), "check prints the signed decision");

    // The system's roots do not hold our CA: the TLS handshake is refused.
    let unpinned = Device::new(&opts);
    refused(&unpinned.run(&["enroll"]).await, "unreachable");

    // Pinned to another CA: refused too, even though the server's is valid for the system.
    let other_dir = tempfile::tempdir().unwrap();
    let other = common::certs::make(other_dir.path());
    let wrong = Device::new(&opts);
    pin(&wrong, &other.ca);
    refused(&wrong.run(&["enroll"]).await, "unreachable");
    let fleet: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&app.state.db)
        .await
        .unwrap();
    assert_eq!(fleet, 1, "only the pinned device enrolled");
}
