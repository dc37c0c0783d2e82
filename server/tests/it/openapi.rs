//! The committed `openapi/openapi.json` is what the server generates and serves.
//! Refresh it with `SLUICE_WRITE_OPENAPI=1 cargo test -p sluice-server --test it openapi`.

use std::path::PathBuf;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json")
}

#[test]
fn committed_openapi_matches_the_server() {
    let generated = sluice_server::app::openapi().to_pretty_json().unwrap() + "\n";
    if std::env::var_os("SLUICE_WRITE_OPENAPI").is_some() {
        std::fs::write(committed_path(), &generated).unwrap();
    }
    let committed =
        std::fs::read_to_string(committed_path()).expect("openapi/openapi.json is committed");
    assert!(
        committed == generated,
        "openapi/openapi.json is stale: run `SLUICE_WRITE_OPENAPI=1 cargo test -p sluice-server --test it openapi` and commit it"
    );
    // Every operation says who may call it or is public on purpose.
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    let public = [
        "/v1/auth/login",
        "/v1/auth/logout",
        "/v1/keys",
        "/v1/keys/lists",
        "/v1/keys/lists/{version}",
        "/v1/devices/enroll",
        // Renewal is authenticated by a proof of the device key in the body.
        "/v1/devices/{id}/token",
        "/healthz",
        "/readyz",
        "/metrics",
        // FleetLock clients (Zincati) carry their group's secret in the path.
        "/fleetlock/{secret}/v1/pre-reboot",
        "/fleetlock/{secret}/v1/steady-state",
    ];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let secured = op
                .get("security")
                .is_some_and(|s| !s.as_array().unwrap().is_empty());
            assert!(
                secured || public.contains(&path.as_str()),
                "{method} {path} has no security requirement"
            );
        }
    }
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.1")),
        Some(true)
    );
}
