//! Reboot leases through the FleetLock protocol, against the real server:
//! the requests Zincati sends to an admin's group, Sluice devices in their
//! channel's group (limits by count and by percent per label, expiry by the
//! injected clock, no touching another's lease), and 200 devices at once
//! never exceeding the limit.

use crate::common::{self, TestApp};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use time::Duration;

/// A FleetLock client: raw bodies, the protocol header unless told not to.
struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(base: String, token: Option<String>) -> Client {
        Client {
            http: reqwest::Client::new(),
            base,
            token,
        }
    }

    /// Sends `op` (`pre-reboot`, `steady-state`) with a raw body; answers the
    /// status and the body, which for an error is FleetLock's `{kind, value}`.
    async fn send(&self, op: &str, body: String, header: bool) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(format!("{}v1/{op}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if header {
            req = req.header("fleet-lock-protocol", "true");
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        if status.is_success() {
            return (status, Value::Null);
        }
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{op}: {status} {}", String::from_utf8_lossy(&bytes)));
        // What Zincati reads: exactly a kind and a value, both said.
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 2, "{v}");
        assert!(v["kind"].as_str().is_some_and(|k| !k.is_empty()), "{v}");
        assert!(v["value"].as_str().is_some_and(|k| k.len() > 10), "{v}");
        (status, v)
    }

    async fn op(&self, op: &str, id: &str, group: &str) -> (StatusCode, Value) {
        let body = json!({"client_params": {"id": id, "group": group}}).to_string();
        self.send(op, body, true).await
    }

    async fn lock(&self, id: &str, group: &str) -> (StatusCode, Value) {
        self.op("pre-reboot", id, group).await
    }

    async fn unlock(&self, id: &str, group: &str) -> (StatusCode, Value) {
        self.op("steady-state", id, group).await
    }
}

/// Product `acme` (and `other`) with a channel `stable`, nothing published:
/// leases need no release. Answers acme's enrollment secret.
async fn fleet(app: &TestApp) -> String {
    let secret = app.product("acme", "127.0.0.1:5000/acme/os").await;
    app.channel("acme", "stable").await;
    secret
}

/// Enrolls `machine` in acme's `channel` with `labels`; answers (id, token).
async fn enroll(
    app: &TestApp,
    secret: &str,
    machine: &str,
    channel: &str,
    labels: Value,
) -> (String, String) {
    let key = common::device_key("acme", machine);
    let (s, b) = app
        .call(
            Method::POST,
            "/v1/devices/enroll",
            None,
            Some(
                json!({"product": "acme", "enrollment_secret": secret, "machine_id": machine,
                        "arch": "amd64", "channel": channel, "labels": labels,
                        "proof": common::enroll_proof(&key, "acme", machine)}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    (
        b["device_id"].as_str().unwrap().to_string(),
        b["token"].as_str().unwrap().to_string(),
    )
}

/// Enrolls `n` devices `<prefix>-<i>` with `labels`, a few at a time.
async fn enroll_many(
    app: &TestApp,
    secret: &str,
    prefix: &str,
    n: usize,
    labels: Value,
) -> Vec<(String, String)> {
    futures::stream::iter(0..n)
        .map(|i| {
            let labels = labels.clone();
            async move { enroll(app, secret, &format!("{prefix}-{i}"), "stable", labels).await }
        })
        .buffered(8)
        .collect()
        .await
}

/// Sets a channel's reboot policy in the database (its API is the channel's).
async fn set_policy(app: &TestApp, product: &str, channel: &str, policy: Value) {
    let n = sqlx::query(
        "UPDATE channels SET reboot_policy = $3 FROM products p
         WHERE channels.product_id = p.id AND p.name = $1 AND channels.name = $2",
    )
    .bind(product)
    .bind(channel)
    .bind(policy)
    .execute(&app.state.db)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1);
}

/// A device's FleetLock client at the server's root.
fn device(app: &TestApp, token: &str) -> Client {
    Client::new(format!("{}/", app.url), Some(token.to_string()))
}

/// Who holds leases in `group`, by the table.
async fn holders(app: &TestApp, group: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT holder FROM reboot_leases WHERE group_name = $1 ORDER BY acquired_at, holder",
    )
    .bind(group)
    .fetch_all(&app.state.db)
    .await
    .unwrap()
}

async fn put_group(app: &TestApp, group: &str, body: Value) -> (StatusCode, Value) {
    app.call(
        Method::PUT,
        &format!("/v1/fleetlock/groups/{group}"),
        Some(&app.admin),
        Some(body),
    )
    .await
}

/// The requests Zincati sends with `strategy = "fleet_lock"`, in its order,
/// against a group an admin configured with one lease; and each malformed
/// or unauthorized request refused with FleetLock's error body.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn zincati_takes_turns_in_an_admins_group(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    fleet(&app).await;
    let (s, g) = put_group(&app, "workers", json!({"max_holders": 1})).await;
    assert_eq!(s, StatusCode::OK, "{g}");
    assert_eq!(g["ttl_minutes"], 30);
    let secret = g["secret"].as_str().unwrap();
    assert_eq!(g["base_path"], format!("/fleetlock/{secret}/"));
    let zincati = Client::new(format!("{}/fleetlock/{secret}/", app.url), None);
    let (m1, m2) = (
        "0f6a2c1e4b8d4e5f9a7b3c2d1e0f9a8b",
        "7c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f",
    );

    // At start: Zincati gives back whatever it held before the reboot.
    assert_eq!(zincati.unlock(m1, "workers").await.0, StatusCode::OK);
    assert_eq!(zincati.lock(m1, "workers").await.0, StatusCode::OK);
    // Recursive: asking again keeps the lease.
    assert_eq!(zincati.lock(m1, "workers").await.0, StatusCode::OK);
    assert_eq!(holders(&app, "workers").await, [m1]);
    let (s, e) = zincati.lock(m2, "workers").await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(e["kind"], "lease_unavailable");
    let value = e["value"].as_str().unwrap();
    assert!(
        value.starts_with(&format!("group workers holds 1 of 1 reboot leases ({m1}")),
        "{value}"
    );
    assert!(value.contains("try again later"), "{value}");
    assert_eq!(zincati.unlock(m1, "workers").await.0, StatusCode::OK);
    assert_eq!(zincati.lock(m2, "workers").await.0, StatusCode::OK);
    assert_eq!(holders(&app, "workers").await, [m2]);

    // Refusals, none of which changes who holds what.
    let body = json!({"client_params": {"id": m1, "group": "workers"}}).to_string();
    let (s, e) = zincati.send("pre-reboot", body.clone(), false).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::BAD_REQUEST, Some("missing_header"))
    );
    assert!(
        e["value"]
            .as_str()
            .unwrap()
            .contains("fleet-lock-protocol: true"),
        "{e}"
    );
    for bad in [
        "{not json".to_string(),
        String::new(),
        json!({"client_params": {"id": m1}}).to_string(),
        json!({"client_params": {"id": "", "group": "workers"}}).to_string(),
        json!({"client_params": {"id": "a\u{7}b", "group": "workers"}}).to_string(),
        json!({"client_params": {"id": "x".repeat(129), "group": "workers"}}).to_string(),
        json!({"client_params": {"id": m1, "group": "wor kers"}}).to_string(),
    ] {
        let (s, e) = zincati.send("pre-reboot", bad.clone(), true).await;
        assert_eq!(
            (s, e["kind"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_request")),
            "{bad}"
        );
    }
    let wrong = Client::new(format!("{}/fleetlock/not-the-secret/", app.url), None);
    let (s, e) = wrong.lock(m1, "workers").await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, e) = wrong.unlock(m2, "workers").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let (s, e) = zincati.lock(m1, "default").await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::FORBIDDEN, Some("unauthorized"))
    );
    assert!(
        e["value"]
            .as_str()
            .unwrap()
            .contains("for group workers, not default"),
        "{e}"
    );
    assert_eq!(zincati.unlock(m2, "default").await.0, StatusCode::FORBIDDEN);
    assert_eq!(holders(&app, "workers").await, [m2]);

    // The admin's view; viewers may read it too.
    let viewer = app.viewer().await;
    let (s, list) = app.get("/v1/fleetlock/groups", &viewer).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list[0]["name"], "workers");
    assert_eq!(list[0]["max_holders"], 1);
    assert_eq!(list[0]["holders"][0]["id"], m2);
    let (s, _) = put_group(&app, "workers", json!({"max_holders": 2})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app
        .call(
            Method::PUT,
            "/v1/fleetlock/groups/x",
            Some(&viewer),
            Some(json!({"max_holders": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Each PUT makes a new secret: the one before stops working, leases stay.
    assert_eq!(
        zincati.lock(m1, "workers").await.0,
        StatusCode::UNAUTHORIZED
    );
    let (_, g) = put_group(&app, "workers", json!({"max_holders": 2, "ttl_minutes": 5})).await;
    let zincati = Client::new(
        format!("{}/fleetlock/{}/", app.url, g["secret"].as_str().unwrap()),
        None,
    );
    assert_eq!(zincati.lock(m1, "workers").await.0, StatusCode::OK);
    assert_eq!(holders(&app, "workers").await, [m2, m1]);

    // Settings refused with a reason; device groups' names are not for the taking.
    for (name, body) in [
        ("workers", json!({"max_holders": 0})),
        ("workers", json!({"max_holders": 10_001})),
        ("workers", json!({"max_holders": 1, "ttl_minutes": 0})),
        ("workers", json!({"max_holders": 1, "ttl_minutes": 1441})),
        ("workers", json!({"max_holders": 1, "extra": 1})),
        ("a_b", json!({"max_holders": 1})),
    ] {
        let (s, b) = put_group(&app, name, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{name} {body}: {b}");
    }
    let (s, b) = put_group(&app, "acme.stable", json!({"max_holders": 100})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("product acme"),
        "{b}"
    );
    let audit = app.get_ok("/v1/audit?action=fleetlock_group.put").await;
    assert_eq!(audit["items"].as_array().map(Vec::len), Some(3), "{audit}");
    assert!(!audit.to_string().contains(g["secret"].as_str().unwrap()));

    // Deleting the group ends its secret and its leases.
    let (s, _) = app
        .call(
            Method::DELETE,
            "/v1/fleetlock/groups/workers",
            Some(&app.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        zincati.unlock(m1, "workers").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(holders(&app, "workers").await.is_empty());
    let (s, _) = app
        .call(
            Method::DELETE,
            "/v1/fleetlock/groups/workers",
            Some(&app.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// 200 devices ask for one of 3 leases at once, in random order (some give
/// back before taking, some ask twice): never more than 3 hold one, by what
/// the devices were told and by the table sampled meanwhile, and every
/// device gets its turn.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn two_hundred_devices_never_exceed_the_limit(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path().join("data"));
    // The retries of this test are the load; the per-device limit is not under test.
    config.device_burst = 1_000_000;
    config.device_rate = 1_000_000.0;
    let app = TestApp::spawn_with(pool, config, dir).await;
    let secret = fleet(&app).await;
    let devices = enroll_many(&app, &secret, "m", 200, json!({})).await;
    set_policy(&app, "acme", "stable", json!({"lease": {"max_devices": 3}})).await;

    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (db, done) = (app.state.db.clone(), done.clone());
        tokio::spawn(async move {
            let (mut samples, mut most) = (0, 0i64);
            while !done.load(Ordering::Relaxed) {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM reboot_leases WHERE group_name = 'acme.stable'",
                )
                .fetch_one(&db)
                .await
                .unwrap();
                most = most.max(n);
                samples += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            (samples, most)
        })
    };
    let tasks: Vec<_> = devices
        .iter()
        .map(|(id, token)| {
            let (c, id) = (device(&app, token), id.clone());
            let (holding, most) = (holding.clone(), most.clone());
            tokio::spawn(async move {
                let ms = |lo: u64, hi: u64| {
                    std::time::Duration::from_millis(rand::random::<u64>() % (hi - lo) + lo)
                };
                if rand::random::<f64>() < 0.3 {
                    assert_eq!(c.unlock(&id, "acme.stable").await.0, StatusCode::OK);
                }
                let mut refused = 0;
                loop {
                    tokio::time::sleep(ms(0, 20)).await;
                    let (s, e) = c.lock(&id, "acme.stable").await;
                    match s {
                        StatusCode::OK => break,
                        StatusCode::CONFLICT => {
                            assert_eq!(e["kind"], "lease_unavailable");
                            refused += 1;
                            tokio::time::sleep(ms(10, 60)).await;
                        }
                        _ => panic!("{s} {e}"),
                    }
                }
                // Counted after the grant and uncounted before the release:
                // always at most the server's own count.
                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                if rand::random::<bool>() {
                    assert_eq!(c.lock(&id, "acme.stable").await.0, StatusCode::OK);
                }
                tokio::time::sleep(ms(0, 10)).await;
                holding.fetch_sub(1, Ordering::SeqCst);
                assert_eq!(c.unlock(&id, "acme.stable").await.0, StatusCode::OK);
                refused
            })
        })
        .collect();
    let results = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        futures::future::join_all(tasks),
    )
    .await
    .expect("every device gets its turn within 5 minutes");
    done.store(true, Ordering::Relaxed);
    let refused: usize = results.into_iter().map(|r| r.unwrap()).sum();
    let (samples, table_most) = sampler.await.unwrap();
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} devices held a lease at once");
    assert!(
        table_most <= 3,
        "the table held {table_most} leases at once"
    );
    // The test tested something: the group was full, and often.
    assert_eq!(most, 3);
    assert!(refused > 200, "only {refused} refusals");
    assert!(samples > 10, "{samples}");
    assert!(holders(&app, "acme.stable").await.is_empty());
}

/// A device that took a lease and died blocks the group until the lease's
/// ttl passes (by the server's clock); asking again renews it; an admin can
/// free a lease early, and the audit log says so.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_dead_holders_lease_expires(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = fleet(&app).await;
    let d = enroll_many(&app, &secret, "m", 3, json!({})).await;
    set_policy(
        &app,
        "acme",
        "stable",
        json!({"lease": {"max_devices": 1, "ttl_minutes": 10}}),
    )
    .await;
    let (c1, c2, c3) = (
        device(&app, &d[0].1),
        device(&app, &d[1].1),
        device(&app, &d[2].1),
    );
    let (d1, d2, d3) = (d[0].0.as_str(), d[1].0.as_str(), d[2].0.as_str());
    let g = "acme.stable";

    assert_eq!(c1.lock(d1, g).await.0, StatusCode::OK);
    let (s, e) = c2.lock(d2, g).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let value = e["value"].as_str().unwrap();
    assert!(
        value.starts_with(&format!("group {g} holds 1 of 1 reboot leases ({d1}")),
        "{value}"
    );
    app.state.clock.advance(Duration::minutes(5));
    assert_eq!(c2.lock(d2, g).await.0, StatusCode::CONFLICT);
    // d1 asks again at minute 5: its lease now runs to minute 15.
    assert_eq!(c1.lock(d1, g).await.0, StatusCode::OK);
    app.state.clock.advance(Duration::minutes(6));
    assert_eq!(c2.lock(d2, g).await.0, StatusCode::CONFLICT);
    // d1 died: 11 minutes (ttl + 1) after its last word, d2 goes.
    app.state.clock.advance(Duration::minutes(5));
    assert_eq!(c2.lock(d2, g).await.0, StatusCode::OK);
    assert_eq!(holders(&app, g).await, [d2]);
    // d1 comes back: giving back what it no longer holds frees nothing of d2's.
    assert_eq!(c1.unlock(d1, g).await.0, StatusCode::OK);
    assert_eq!(c1.lock(d1, g).await.0, StatusCode::CONFLICT);

    // The channel's page shows the holder.
    let leases = app.get_ok("/v1/products/acme/channels/stable/leases").await;
    assert_eq!(leases.as_array().unwrap().len(), 1, "{leases}");
    assert_eq!(leases[0]["group"], g);
    assert_eq!(leases[0]["id"], d2);
    let (s, _) = app
        .get("/v1/products/acme/channels/nope/leases", &app.admin)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // An admin frees d2's lease (a viewer may not); d3 goes.
    let free = format!("/v1/leases/{g}/{d2}");
    let viewer = app.viewer().await;
    assert_eq!(
        app.call(Method::DELETE, &free, Some(&viewer), None).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.call(Method::DELETE, &free, Some(&app.admin), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.call(Method::DELETE, &free, Some(&app.admin), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let audit = app.get_ok("/v1/audit?action=lease.free").await;
    assert_eq!(audit["items"][0]["target"], format!("lease:{g}/{d2}"));
    assert_eq!(c3.lock(d3, g).await.0, StatusCode::OK);
}

/// A device takes and gives back only its own lease, only in its own
/// group; anything else is refused and changes nothing.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_device_touches_only_its_own_lease(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = fleet(&app).await;
    app.channel("acme", "beta").await;
    let d = enroll_many(&app, &secret, "m", 2, json!({})).await;
    let (beta, beta_token) = enroll(&app, &secret, "b-1", "beta", json!({})).await;
    set_policy(&app, "acme", "stable", json!({"lease": {"max_devices": 1}})).await;
    set_policy(&app, "acme", "beta", json!({"lease": {"max_devices": 5}})).await;
    let (c1, c2) = (device(&app, &d[0].1), device(&app, &d[1].1));
    let (d1, d2) = (d[0].0.as_str(), d[1].0.as_str());

    let refused = |(s, e): (StatusCode, Value)| {
        assert_eq!(
            (s, e["kind"].as_str()),
            (StatusCode::FORBIDDEN, Some("unauthorized")),
            "{e}"
        );
    };
    refused(c1.lock(d2, "acme.stable").await);
    refused(c1.lock("someone", "acme.stable").await);
    refused(c1.lock(d1, "acme.beta").await);
    refused(c1.lock(d1, "workers").await);
    assert!(holders(&app, "acme.stable").await.is_empty());
    assert!(holders(&app, "acme.beta").await.is_empty());

    assert_eq!(c2.lock(d2, "acme.stable").await.0, StatusCode::OK);
    refused(c1.unlock(d2, "acme.stable").await);
    refused(c1.unlock(d1, "acme.beta").await);
    assert_eq!(holders(&app, "acme.stable").await, [d2]);
    // The other channel's group is its own: beta's device takes a lease there.
    let cb = device(&app, &beta_token);
    refused(cb.lock(&beta, "acme.stable").await);
    assert_eq!(cb.lock(&beta, "acme.beta").await.0, StatusCode::OK);

    // People and strangers are not devices; answers stay FleetLock's.
    let admin = device(&app, &app.admin);
    let (s, e) = admin.lock(d1, "acme.stable").await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::FORBIDDEN, Some("unauthorized"))
    );
    let anonymous = Client::new(format!("{}/", app.url), None);
    let (s, e) = anonymous.unlock(d2, "acme.stable").await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, e) = c1.send("pre-reboot", "{".into(), true).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );
    let (s, e) = c1
        .send(
            "pre-reboot",
            json!({"client_params": {"id": d1, "group": "acme.stable"}}).to_string(),
            false,
        )
        .await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::BAD_REQUEST, Some("missing_header"))
    );
    assert_eq!(holders(&app, "acme.stable").await, [d2]);

    // A channel without a lease policy coordinates nothing: 200, nothing held.
    set_policy(&app, "acme", "stable", json!({})).await;
    assert_eq!(c1.lock(d1, "acme.stable").await.0, StatusCode::OK);
    assert_eq!(holders(&app, "acme.stable").await, [d2]);
    assert_eq!(c1.unlock(d1, "acme.stable").await.0, StatusCode::OK);
}

/// `max_percent` split `per_label`: 20 % of each site's 10 devices is 2 per
/// site, each site its own group; a device without the label is in a group
/// of its own kind, at least 1 lease.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn percent_per_label_limits_each_site(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = fleet(&app).await;
    let a = enroll_many(&app, &secret, "a", 10, json!({"site": "a"})).await;
    let b = enroll_many(&app, &secret, "b", 10, json!({"site": "b"})).await;
    let (loner, loner_token) = enroll(&app, &secret, "x", "stable", json!({})).await;
    set_policy(
        &app,
        "acme",
        "stable",
        json!({"lease": {"max_percent": 20, "per_label": "site"}}),
    )
    .await;

    for (devices, group) in [(&a, "acme.stable.a"), (&b, "acme.stable.b")] {
        for (id, token) in &devices[..2] {
            let (s, e) = device(&app, token).lock(id, group).await;
            assert_eq!(s, StatusCode::OK, "{e}");
        }
        let (id, token) = &devices[2];
        refused_full(device(&app, token).lock(id, group).await, group, 2);
        // Not in the other site's group either.
        let other = if group.ends_with('a') {
            "acme.stable.b"
        } else {
            "acme.stable.a"
        };
        assert_eq!(
            device(&app, token).lock(id, other).await.0,
            StatusCode::FORBIDDEN
        );
    }
    let c = device(&app, &loner_token);
    assert_eq!(c.lock(&loner, "acme.stable.-").await.0, StatusCode::OK);
    let leases = app.get_ok("/v1/products/acme/channels/stable/leases").await;
    let groups: Vec<&str> = leases
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["group"].as_str().unwrap())
        .collect();
    assert_eq!(
        groups,
        [
            "acme.stable.-",
            "acme.stable.a",
            "acme.stable.a",
            "acme.stable.b",
            "acme.stable.b"
        ]
    );

    // A revoked device no longer counts: site b has 9 devices, 20 % of 9 is 1.
    sqlx::query("UPDATE devices SET revoked_at = now() WHERE id = $1::uuid")
        .bind(&b[9].0)
        .execute(&app.state.db)
        .await
        .unwrap();
    let (id, token) = &b[0];
    assert_eq!(
        device(&app, token).unlock(id, "acme.stable.b").await.0,
        StatusCode::OK
    );
    let (id, token) = &b[3];
    refused_full(
        device(&app, token).lock(id, "acme.stable.b").await,
        "acme.stable.b",
        1,
    );
}

/// A full group's refusal: 409, and what a person needs in words.
fn refused_full((s, e): (StatusCode, Value), group: &str, of: usize) {
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["kind"], "lease_unavailable");
    let value = e["value"].as_str().unwrap();
    assert!(
        value.starts_with(&format!("group {group} holds {of} of {of} reboot leases (")),
        "{value}"
    );
    assert!(value.contains("20 % of its"), "{value}");
}
