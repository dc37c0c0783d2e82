//! Faults: PostgreSQL stopped and started under a running server, the server
//! killed with SIGKILL in the middle of publishes and promotes, and SIGTERM
//! draining requests and flushing check-ins. Each uses the real `sluice`
//! binary or a real cluster of its own, so stopping it touches no other test.

use crate::common;
use crate::common::images;

use common::{ADMIN_PASSWORD, free_port, registry};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

async fn as_postgres(cmd: &str) {
    let out = Command::new("su")
        .args(["postgres", "-s", "/bin/sh", "-c", cmd])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster of this test's own, which it may stop and start.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let data = dir.path().join("data");
        as_postgres(&format!(
            "{PG_BIN}/initdb -D {} --auth=trust -U postgres -E UTF8 >/dev/null",
            data.display()
        ))
        .await;
        let c = Cluster {
            dir,
            port: free_port(),
        };
        c.up().await;
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn up(&self) {
        as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {} -l {}/log -w -o '-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off' start >/dev/null",
            self.data().display(),
            self.dir.path().display(),
            self.port,
            self.dir.path().display()
        ))
        .await;
    }

    async fn down(&self) {
        as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {} -m immediate -w stop >/dev/null",
            self.data().display()
        ))
        .await;
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c"])
            .arg(format!(
                "{PG_BIN}/pg_ctl -D {} -m immediate stop",
                self.data().display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A `docker-registry` of this test's own, which it may stop and start again
/// on the same port and storage.
struct OwnRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl OwnRegistry {
    async fn start() -> OwnRegistry {
        let dir = tempfile::Builder::new()
            .prefix("sluice-reg")
            .tempdir_in("/tmp")
            .unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut r = OwnRegistry {
            dir,
            port,
            child: None,
        };
        r.up().await;
        r
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) {
        self.child = Some(
            Command::new("docker-registry")
                .arg("serve")
                .arg(self.dir.path().join("config.yml"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("docker-registry (Debian's package) is installed"),
        );
        let url = format!("http://{}/v2/", self.addr());
        for _ in 0..200 {
            if reqwest::get(&url).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("docker-registry did not start on {}", self.addr());
    }

    async fn down(&mut self) {
        let mut c = self.child.take().expect("the registry is up");
        c.kill().await.unwrap();
        c.wait().await.unwrap();
    }
}

/// The real `sluice serve` on a free port.
struct Server {
    child: Child,
    url: String,
    client: reqwest::Client,
}

impl Server {
    async fn start(database_url: &str, data_dir: &Path) -> Server {
        Self::start_with(database_url, data_dir, &[]).await
    }

    async fn start_with(database_url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("serve")
            .envs(env.iter().copied())
            .env("DATABASE_URL", database_url)
            .env("SLUICE_LISTEN", format!("127.0.0.1:{port}"))
            .env("SLUICE_DATA_DIR", data_dir)
            .env("SLUICE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("SLUICE_KEY_PASSPHRASE", "fault tests")
            .env(
                "SLUICE_INSECURE_REGISTRIES",
                std::env::var("SLUICE_TEST_REGISTRY").unwrap_or_default(),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let s = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        };
        for _ in 0..200 {
            if s.client
                .get(format!("{}/healthz", s.url))
                .send()
                .await
                .is_ok()
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sluice did not start");
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("the server answers (no hang)");
        let status = resp.status();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_server_error() && path != "/readyz" {
            assert_eq!(ct.as_deref(), Some("application/problem+json"), "{v}");
        }
        (status, v)
    }

    /// POSTs JSON as `token`.
    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }

    /// GETs as `token` (none: anonymously).
    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn login(&self) -> String {
        let (s, b) = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"username": "admin", "password": ADMIN_PASSWORD})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        b["token"].as_str().unwrap().to_string()
    }
}

/// The URL of `pool`'s database (the test's own), for a `sluice` process.
async fn database_url(pool: &PgPool) -> String {
    let db_name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    format!("{}/{db_name}", base.rsplit_once('/').unwrap().0)
}

async fn setup_product(s: &Server, admin: &str, repo: &str) -> String {
    let (st, b) = s
        .post(
            "/v1/products",
            admin,
            json!({"name": "acme", "repository": repo}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let (st, b) = s
        .post(
            "/v1/products/acme/channels",
            admin,
            json!({"name": "stable"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");

    {
        let (st, b) = s
            .post("/v1/products/acme/enrollment-secret", admin, json!({}))
            .await;
        assert_eq!(st, StatusCode::OK, "{b}");
        b["enrollment_secret"].as_str().unwrap().to_string()
    }
}

async fn enroll(s: &Server, secret: &str, machine: &str) -> (String, String) {
    let (st, b) = s
        .call(
            reqwest::Method::POST,
            "/v1/devices/enroll",
            None,
            Some(json!({"product": "acme", "enrollment_secret": secret, "machine_id": machine, "arch": "amd64", "channel": "stable",
                        "proof": common::enroll_proof(&common::device_key("acme", machine), "acme", machine)})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    (
        b["device_id"].as_str().unwrap().to_string(),
        b["token"].as_str().unwrap().to_string(),
    )
}

/// PostgreSQL stopped under a running server: requests answer 503 promptly
/// (no hang, no 500), `/readyz` says why, devices keep their answers from the
/// last snapshot, and service resumes by itself when the database is back.
#[tokio::test]
async fn database_outage_is_503_and_heals_by_itself() {
    let pg = Cluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(&pg.url(), data.path()).await;
    let admin = s.login().await;
    let reg = registry();
    let repo_path = images::unique_repo("outage");
    let (digest, _) = images::push_image(&reg, &repo_path, "1.0.0").await;
    let secret = setup_product(&s, &admin, &format!("{reg}/{repo_path}")).await;
    let image = format!("{reg}/{repo_path}:1.0.0");
    let (st, b) = s
        .post(
            "/v1/products/acme/releases",
            &admin,
            json!({"version": "1.0.0", "image": image, "channels": [{"name": "stable"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let (device_id, device) = enroll(&s, &secret, "m-1").await;
    let resolve =
        format!("/v1/products/acme/channels/stable/resolve?nonce=nonce-0001&current={digest}");
    assert_eq!(s.get(&resolve, Some(&device)).await.0, StatusCode::OK);

    pg.down().await;
    let (st, b) = s.get("/v1/products", Some(&admin)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("database is unavailable"),
        "{b}"
    );
    let (st, b) = s.get("/readyz", None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b, json!({"status": "not ready"}));
    let (st, b) = s.get("/readyz", Some(&admin)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        b["database"].as_str().unwrap().starts_with("unavailable"),
        "{b}"
    );
    // Publishing fails cleanly too (and the same publish succeeds once the database is back).
    let publish = json!({"version": "1.0.1", "image": image});
    let (st, b) = s
        .post("/v1/products/acme/releases", &admin, publish.clone())
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    // Devices still get signed answers from the last snapshot, even past its refresh time.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (st, b) = s.get(&resolve.replace("0001", "0002"), Some(&device)).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["release"]["version"], "1.0.0");

    pg.up().await;
    let mut healed = false;
    for _ in 0..100 {
        if s.get("/readyz", None).await.0 == StatusCode::OK {
            healed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(healed, "service must resume without restarting Sluice");
    let (st, b) = s.post("/v1/products/acme/releases", &admin, publish).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    // The check-in made during the outage is written once the database is back.
    let db = PgPool::connect(&pg.url()).await.unwrap();
    let mut seen = None;
    for _ in 0..50 {
        seen = sqlx::query_scalar::<_, Option<String>>(
            "SELECT current_digest FROM devices WHERE id = $1::uuid",
        )
        .bind(&device_id)
        .fetch_one(&db)
        .await
        .unwrap();
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen.as_deref(), Some(digest.as_str()));
}

/// SIGKILL in the middle of publishes and promotes: after a restart, every
/// acknowledged publish is there, and no release, channel change or audit row
/// is half-written. The promotes go over unfinished rollouts (50 %), so by
/// the promote rule the base stays the one release the channel had fully
/// rolled out, whichever promote a kill cut short, and the channel stands as
/// its last history entry says.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn sigkill_leaves_nothing_half_written(pool: PgPool) {
    let url = database_url(&pool).await;
    let data = tempfile::tempdir().unwrap();
    let reg = registry();
    let repo_path = images::unique_repo("sigkill");
    images::push_image(&reg, &repo_path, "base").await;
    let image = format!("{reg}/{repo_path}:base");

    let mut acknowledged: Vec<String> = Vec::new();
    let mut n = 0;
    for round in 0..4 {
        let mut s = Server::start(&url, data.path()).await;
        let admin = s.login().await;
        if round == 0 {
            setup_product(&s, &admin, &format!("{reg}/{repo_path}")).await;
            let (st, b) = s
                .post(
                    "/v1/products/acme/releases",
                    &admin,
                    json!({"version": "1.0.0", "image": image,
                           "channels": [{"name": "stable", "percent": 100}]}),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{b}");
            acknowledged.push("1.0.0".into());
        }
        // Publishes and promotes in flight when the kill comes.
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..12 {
            n += 1;
            let version = format!("1.0.{n}");
            let (client, url, admin, image) = (
                s.client.clone(),
                s.url.clone(),
                admin.clone(),
                image.clone(),
            );
            tasks.spawn(async move {
                let r = client
                    .post(format!("{url}/v1/products/acme/releases"))
                    .bearer_auth(&admin)
                    .json(&json!({"version": version, "image": image, "channels": [{"name": "stable", "percent": 50}]}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == StatusCode::CREATED => Some(version),
                    _ => None,
                }
            });
        }
        // Kill as soon as the first publish of the round is acknowledged, while the rest are in flight.
        while let Some(r) = tokio::time::timeout(Duration::from_secs(30), tasks.join_next())
            .await
            .ok()
            .flatten()
        {
            if let Some(v) = r.unwrap() {
                acknowledged.push(v);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(
            rand::random::<u64>() % (20 + 30 * round),
        ))
        .await;
        s.child.start_kill().unwrap();
        s.child.wait().await.unwrap();
        while let Some(r) = tasks.join_next().await {
            acknowledged.extend(r.unwrap());
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "some publishes must have been acknowledged before the kills"
    );

    let versions: Vec<String> = sqlx::query_scalar("SELECT version FROM releases")
        .fetch_all(&pool)
        .await
        .unwrap();
    for v in &acknowledged {
        assert!(
            versions.contains(v),
            "acknowledged release {v} is missing after the kill"
        );
    }
    // Every stored release is whole: its signatures, its audit row, its promotion.
    let broken: Vec<String> = sqlx::query_scalar(
        "SELECT r.version FROM releases r
         WHERE NOT EXISTS (SELECT 1 FROM signatures s WHERE s.release_id = r.id)
            OR (SELECT count(*) FROM audit_log a WHERE a.action = 'release.publish'
                  AND a.target = 'release:acme/' || r.version) <> 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(broken.is_empty(), "half-written releases: {broken:?}");
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log a WHERE a.action = 'release.publish'
           AND NOT EXISTS (SELECT 1 FROM releases r WHERE 'release:acme/' || r.version = a.target)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "audit rows for releases that do not exist");
    let (history, audit): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM channel_history WHERE action = 'promote'),
                (SELECT count(*) FROM audit_log WHERE action = 'channel.promote')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        history, audit,
        "every promotion has its history and audit rows together"
    );
    assert_eq!(
        history as usize,
        versions.len(),
        "each stored release was promoted exactly once"
    );
    let (head, base, percent, last): (Option<String>, Option<String>, f64, serde_json::Value) =
        sqlx::query_as(
            "SELECT h.version, b.version, c.percent,
                    (SELECT after FROM channel_history WHERE channel_id = c.id ORDER BY id DESC LIMIT 1)
             FROM channels c LEFT JOIN releases h ON h.id = c.head_release_id
                             LEFT JOIN releases b ON b.id = c.base_release_id
             WHERE c.name = 'stable'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        base.as_deref(),
        Some("1.0.0"),
        "promotes over an unfinished rollout keep the fully rolled-out base (head {head:?})"
    );
    assert_eq!(
        (
            last["head"].as_str(),
            last["base"].as_str(),
            last["percent"].as_f64()
        ),
        (head.as_deref(), base.as_deref(), Some(percent)),
        "the channel stands as its last history entry says"
    );
}

/// SIGTERM: the server stops accepting, finishes what is in flight, writes the
/// batched check-ins and exits 0.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn sigterm_flushes_checkins(pool: PgPool) {
    let url = database_url(&pool).await;
    let data = tempfile::tempdir().unwrap();
    // Check-ins are written only every minute, so only the shutdown can write them in time.
    let mut s =
        Server::start_with(&url, data.path(), &[("SLUICE_CHECKIN_FLUSH_MS", "60000")]).await;
    let admin = s.login().await;
    let secret = setup_product(&s, &admin, "r.example/acme").await;
    let mut devices = Vec::new();
    for i in 0..20 {
        devices.push(enroll(&s, &secret, &format!("m-{i}")).await);
    }
    let digest = format!("sha256:{}", "ef".repeat(32));
    for (i, (_, token)) in devices.iter().enumerate() {
        let path = format!(
            "/v1/products/acme/channels/stable/resolve?nonce=nonce-{i:04}&current={digest}"
        );
        assert_eq!(s.get(&path, Some(token)).await.0, StatusCode::OK);
    }
    // The check-ins are still in memory; SIGTERM must write them.
    let pid = s.child.id().unwrap() as i32;
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(Duration::from_secs(20), s.child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM devices WHERE current_digest = $1")
        .bind(&digest)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(written, 20, "every check-in is flushed on SIGTERM");
}

/// The registry down during publish: 503 with a message, nothing stored; once
/// the same registry is back, the same request succeeds and is signed.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn registry_outage_during_publish(pool: PgPool) {
    let mut reg = OwnRegistry::start().await;
    let addr = reg.addr();
    let (digest, _) = images::push_image(&addr, "acme/os", "1.0.0").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path().join("data"));
    config.insecure_registries.push(addr.clone());
    let app = common::TestApp::spawn_with(pool.clone(), config, dir).await;
    app.product("acme", &format!("{addr}/acme/os")).await;
    let publish = json!({"version": "1.0.0", "image": format!("{addr}/acme/os:1.0.0")});

    reg.down().await;
    let (s, b) = app
        .post("/v1/products/acme/releases", &app.admin, publish.clone())
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains(&addr),
        "the message names the registry: {b}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM releases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing stored while the registry is down");

    reg.up().await;
    let (s, b) = app
        .post("/v1/products/acme/releases", &app.admin, publish)
        .await;
    assert_eq!(s, StatusCode::CREATED, "the retry succeeds: {b}");
    assert_eq!(b["digest"], digest.as_str(), "{b}");
    let sig_tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
    let tags: Value = reqwest::get(format!("http://{addr}/v2/acme/os/tags/list"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        tags["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == sig_tag.as_str()),
        "the signature is in the registry: {tags}"
    );
}
