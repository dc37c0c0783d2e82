//! Several servers on one database as one service: a change through one is
//! answered by the others at once (`LISTEN/NOTIFY`), they sign with the
//! same keys (kept in PostgreSQL), the first keys are made once, a lost
//! listening connection comes back, work that must happen once (a gate
//! halt) happens once, and a device's serial never goes down.

use crate::common::{self, TestApp};
use reqwest::StatusCode;
use serde_json::json;
use sluice_protocol::keys::SIGNATURE_HEADER;
use sluice_protocol::{KeySet, ResolveResponse};
use sluice_server::app;
use sluice_server::resolve::Cache;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::time::{Duration, Instant};

/// A pool of its own on `pool`'s database, as another server process has.
async fn own_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(5)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap()
}

/// A configuration in a fresh, empty data folder: a server needs nothing
/// in it (keys and the token secret are in the database).
fn folder() -> (tempfile::TempDir, sluice_server::config::Config) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = common::config(data);
    (dir, config)
}

/// `n` servers on one database, each with its own pool and data folder.
async fn servers(pool: &PgPool, n: usize) -> Vec<TestApp> {
    let mut apps = vec![TestApp::spawn(own_pool(pool).await).await];
    for _ in 1..n {
        let (dir, config) = folder();
        apps.push(TestApp::spawn_with(own_pool(pool).await, config, dir).await);
    }
    apps
}

/// Stops the servers and closes their pools (and so their listening
/// connections), so the test's database can be dropped.
async fn stop(apps: Vec<TestApp>) {
    for mut app in apps {
        app.stop().await;
        app.state.db.close().await;
    }
}

/// One resolution: the signature header, the body and the answer.
async fn resolve(app: &TestApp, token: &str, current: &str) -> (String, Vec<u8>, ResolveResponse) {
    let url = format!(
        "{}/v1/products/acme/channels/stable/resolve?arch=amd64&current={current}&nonce=n-{}",
        app.url,
        rand::random::<u64>()
    );
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let sig = r.headers()[SIGNATURE_HEADER].to_str().unwrap().to_string();
    let body = r.bytes().await.unwrap().to_vec();
    let answer = serde_json::from_slice(&body).unwrap();
    (sig, body, answer)
}

fn offered(a: &ResolveResponse) -> Option<&str> {
    a.release.as_ref().map(|r| r.version.as_str())
}

/// Resolves through `app` until `done` holds; answers how long it took.
/// Gives up after 3 s: beyond that the snapshot's 5 s expiry, not the
/// notification, would be what answers.
async fn until(
    app: &TestApp,
    token: &str,
    current: &str,
    done: impl Fn(&str, &ResolveResponse) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let (sig, _, a) = resolve(app, token, current).await;
        if done(&sig, &a) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the other server still answers {a:?} with {sig}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A promote through server 1 is answered by server 2 within 1 s, although
/// server 2's snapshot was fresh (its expiry is 5 s).
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_promote_through_one_server_is_answered_by_another_at_once(pool: PgPool) {
    let apps = servers(&pool, 2).await;
    let p = apps[0]
        .product_with_releases("acme", &["1.0.0", "1.1.0"])
        .await;
    let (_, token) = apps[0].enroll("acme", &p.secret, "m1", "stable").await;
    let d1 = &p.digests["1.0.0"];
    let (_, _, a) = resolve(&apps[1], &token, d1).await;
    assert_eq!((a.update, offered(&a)), (false, Some("1.0.0")));

    apps[0]
        .post_as(
            &p.ci,
            "/v1/products/acme/channels/stable/promote",
            json!({"version": "1.1.0", "percent": 100}),
            StatusCode::OK,
        )
        .await;
    let took = until(&apps[1], &token, d1, |_, a| offered(a) == Some("1.1.0")).await;
    println!("server 2 answered the promote through server 1 after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let metrics = reqwest::get(format!("{}/metrics", apps[1].url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let received: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_notifications_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(received >= 1, "{metrics}");
    stop(apps).await;
}

/// A response key rotated and activated through server 2 signs server 3's
/// answers, which verify with the new key from `GET /v1/keys`.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_key_rotation_through_one_server_signs_the_answers_of_another(pool: PgPool) {
    let apps = servers(&pool, 3).await;
    let p = apps[0].product_with_releases("acme", &["1.0.0"]).await;
    let (_, token) = apps[0].enroll("acme", &p.secret, "m1", "stable").await;
    let d1 = &p.digests["1.0.0"];
    let old = apps[2].state.keys.response_signer().key_id().to_string();
    assert_eq!(apps[1].state.keys.response_signer().key_id(), old);
    let (sig, _, _) = resolve(&apps[2], &token, d1).await;
    assert!(sig.contains(&format!("keyid={old}")), "{sig}");

    let b = apps[1]
        .post_ok("/v1/keys/response/rotate", json!({}), StatusCode::OK)
        .await;
    let new = b["key_id"].as_str().unwrap().to_string();
    // Server 3 learns of the `next` key (and decrypts it) before the fleet
    // is asked to hold it; an activation comes long after in practice.
    let start = Instant::now();
    while apps[2].state.keys.list_version() != Some(2) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the rotation never reached server 3"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "server 3 listed the key rotated through server 2 after {:?}",
        start.elapsed()
    );
    apps[1]
        .post_ok(
            "/v1/keys/response/activate",
            json!({"force": true}),
            StatusCode::OK,
        )
        .await;
    let took = until(&apps[2], &token, d1, |sig, _| {
        sig.contains(&format!("keyid={new}"))
    })
    .await;
    println!("server 3 signed with the key activated through server 2 after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let keys: KeySet = serde_json::from_value(apps[2].get_ok("/v1/keys").await).unwrap();
    let (sig, body, _) = resolve(&apps[2], &token, d1).await;
    assert!(sig.contains(&format!("keyid={new}")), "{sig}");
    keys.verify_response(&sig, &body)
        .expect("the answer verifies with the new key");
    let only_new = KeySet {
        keys: keys
            .keys
            .iter()
            .filter(|k| k.key_id == new)
            .cloned()
            .collect(),
    };
    only_new.verify_response(&sig, &body).unwrap();
    // Server 1 too, told at the same moment (it reloads on its own task).
    let start = Instant::now();
    while apps[0].state.keys.response_signer().key_id() != new {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server 1 never took the new key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(apps).await;
}

/// Two servers starting at the same moment on an empty database make one
/// set of keys and one key list, and sign alike.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn two_servers_starting_at_once_make_one_set_of_keys(pool: PgPool) {
    let ((_d1, c1), (_d2, c2)) = (folder(), folder());
    let (p1, p2) = (own_pool(&pool).await, own_pool(&pool).await);
    let (a, b) = tokio::join!(app::state_with_pool(c1, p1), app::state_with_pool(c2, p2));
    let (a, b) = (a.unwrap(), b.unwrap());
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM signing_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    let lists: i64 = sqlx::query_scalar("SELECT count(*) FROM key_lists")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((keys, lists), (3, 1));
    assert_eq!(
        a.keys.response_signer().key_id(),
        b.keys.response_signer().key_id()
    );
    assert_eq!(
        a.keys.image_key().public.key_id,
        b.keys.image_key().public.key_id
    );
    assert_eq!(a.keys.list_version(), Some(1));
    assert_eq!(b.keys.list_version(), Some(1));
    a.db.close().await;
    b.db.close().await;
}

/// The listening connection killed (`pg_terminate_backend`): the servers
/// listen again, and a later change still reaches the other server at once.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_killed_listener_reconnects_and_changes_still_propagate(pool: PgPool) {
    let apps = servers(&pool, 2).await;
    let p = apps[0]
        .product_with_releases("acme", &["1.0.0", "1.1.0"])
        .await;
    let (_, token) = apps[0].enroll("acme", &p.secret, "m1", "stable").await;
    let d1 = &p.digests["1.0.0"];
    let listeners = async || -> Vec<i32> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'sluice-listener-%'
             ORDER BY pid",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = listeners().await;
    assert_eq!(before.len(), 2, "one listening connection per server");
    for pid in &before {
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(killed);
    }
    let start = Instant::now();
    loop {
        let now = listeners().await;
        if now.len() == 2 && now.iter().all(|p| !before.contains(p)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the listeners did not come back: {before:?} then {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("listening again after {:?}", start.elapsed());

    let (_, _, a) = resolve(&apps[1], &token, d1).await;
    assert_eq!(offered(&a), Some("1.0.0"));
    apps[0]
        .post_as(
            &p.ci,
            "/v1/products/acme/channels/stable/promote",
            json!({"version": "1.1.0", "percent": 100}),
            StatusCode::OK,
        )
        .await;
    let took = until(&apps[1], &token, d1, |_, a| offered(a) == Some("1.1.0")).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    stop(apps).await;
}

/// An install from before the keys moved to the database: its data
/// folder's key files and token secret are imported at the first start,
/// and keep signing; a second server with an empty folder signs with them
/// too and accepts the tokens made with the old secret.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn the_key_files_of_an_old_data_folder_are_imported(pool: PgPool) {
    let (dir, config) = folder();
    let old = sluice_server::infra::keystore::KeyStore::load_or_create(
        &config.data_dir,
        &config.key_passphrase,
    )
    .unwrap();
    let (old_response, old_image) = (
        old.response_signer().key_id().to_string(),
        old.image_key().public.key_id.clone(),
    );
    let old_secret: [u8; 32] = rand::random();
    std::fs::write(config.data_dir.join("jwt.key"), old_secret).unwrap();
    let first = TestApp::spawn_with(own_pool(&pool).await, config, dir).await;
    assert_eq!(first.state.keys.response_signer().key_id(), old_response);
    assert_eq!(first.state.keys.image_key().public.key_id, old_image);
    let imported: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT key_id, imported_from FROM signing_keys ORDER BY key_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(imported.len(), 3, "{imported:?}");
    assert!(
        imported
            .iter()
            .all(|(_, from)| from.as_deref().is_some_and(|f| f.ends_with(".key"))),
        "{imported:?}"
    );
    let (dir, config) = folder();
    let second = TestApp::spawn_with(own_pool(&pool).await, config, dir).await;
    assert_eq!(second.state.keys.response_signer().key_id(), old_response);
    assert_eq!(second.jwt_secret().await, old_secret);
    let (st, b) = second.get("/v1/products", &first.admin).await;
    assert_eq!(st, StatusCode::OK, "a token the first server made: {b}");
    let from: Option<String> =
        sqlx::query_scalar("SELECT imported_from FROM server_secrets WHERE name = 'jwt'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(from.is_some_and(|f| f.ends_with("jwt.key")));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM signing_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3, "nothing made twice, nothing imported twice");
    stop(vec![first, second]).await;
}

/// A server started with another passphrase than the keys were sealed
/// with stops with an error that says so; nothing is made or changed.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_wrong_passphrase_is_a_clear_startup_error(pool: PgPool) {
    let first = TestApp::spawn(own_pool(&pool).await).await;
    let (_dir, mut config) = folder();
    config.key_passphrase = "another passphrase".into();
    let other = own_pool(&pool).await;
    let err = match app::state_with_pool(config, other.clone()).await {
        Ok(_) => panic!("a server with the wrong passphrase started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("SLUICE_KEY_PASSPHRASE"), "{err}");
    let (keys, lists): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM signing_keys), (SELECT count(*) FROM key_lists)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((keys, lists), (3, 1));
    assert_eq!(first.state.keys.list_version(), Some(1));
    other.close().await;
    stop(vec![first]).await;
}

/// Two servers racing the same gate trip: one halts the rollout, with one
/// history entry and one audit entry.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_gate_trip_raced_by_two_servers_happens_once(pool: PgPool) {
    let apps = servers(&pool, 2).await;
    let p = apps[0]
        .product_with_releases("acme", &["1.0.0", "1.1.0"])
        .await;
    apps[0]
        .post_as(
            &p.ci,
            "/v1/products/acme/channels/stable/promote",
            json!({"version": "1.1.0", "percent": 100}),
            StatusCode::OK,
        )
        .await;
    apps[0]
        .set_rollout(
            "acme",
            "stable",
            json!({"gate": {"max_failure_percent": 20, "min_reports": 2}}),
        )
        .await;
    for i in 0..3 {
        apps[0]
            .enroll("acme", &p.secret, &format!("m{i}"), "stable")
            .await;
    }
    // Three devices offered 1.1.0 failed it (written as a check-in would).
    sqlx::query(
        "UPDATE devices SET status = 'failed', status_version = '1.1.0', status_offered = true",
    )
    .execute(&pool)
    .await
    .unwrap();
    let product_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM products WHERE name = 'acme'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let count = async |sql: &'static str| -> i64 {
        sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap()
    };
    let audit_sql = "SELECT count(*) FROM audit_log WHERE action = 'channel.gate'";
    let history_sql = "SELECT count(*) FROM channel_history WHERE action = 'gate'";
    let (audit_before, history_before) = (count(audit_sql).await, count(history_sql).await);
    let (a, b) = tokio::join!(
        sluice_server::api::channels::check_gate(&apps[0].state, product_id, "acme", "stable"),
        sluice_server::api::channels::check_gate(&apps[1].state, product_id, "acme", "stable"),
    );
    let halted = [a.unwrap(), b.unwrap()];
    assert_eq!(
        halted.iter().filter(|h| **h).count(),
        1,
        "one of the two halts: {halted:?}"
    );
    assert_eq!(count(history_sql).await - history_before, 1);
    assert_eq!(count(audit_sql).await - audit_before, 1);
    let ch = apps[1].get_ok("/v1/products/acme/channels/stable").await;
    assert_eq!(ch["rollout"]["paused"], true, "{ch}");
    stop(apps).await;
}

/// A device that accepted a serial this server's snapshot has not reached
/// yet (another server answered first and this one missed the
/// notification) makes the snapshot catch up before the answer; a serial
/// no channel ever had reloads nothing.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_device_that_saw_a_newer_serial_makes_the_snapshot_catch_up(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    app.product_with_releases("acme", &["1.0.0"]).await;
    let state = &app.state;
    let warm = Cache::get_at_least(state, "acme", None).await.unwrap();
    // A change this server was not told of.
    let newer: i64 = sqlx::query_scalar(
        "UPDATE channels SET serial = nextval('channel_serial') WHERE name = 'stable' RETURNING serial",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(newer > warm.serial());
    let same = Cache::get_at_least(state, "acme", Some(warm.serial()))
        .await
        .unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&same, &warm),
        "no claim above it: no reload"
    );
    let caught = Cache::get_at_least(state, "acme", Some(newer))
        .await
        .unwrap();
    assert_eq!(caught.serial(), newer);

    // A hostile claim: no reload, whatever the number, however often.
    for _ in 0..3 {
        let s = Cache::get_at_least(state, "acme", Some(i64::MAX))
            .await
            .unwrap();
        assert!(std::sync::Arc::ptr_eq(&s, &caught));
    }
}
