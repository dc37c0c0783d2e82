//! A real server for tests: its own database (from `#[sqlx::test]`), its own
//! data folder, bound to port 0 on loopback, and a small JSON client.
#![allow(dead_code)]

pub mod certs;
pub mod cli;
pub mod images;
pub mod push;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_server::app::{self, AppState};
use sluice_server::config::Config;
use sqlx::PgPool;
use std::path::PathBuf;
use tokio::sync::oneshot;

/// The password of user `admin` in every test server.
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// The registry tests push to, from `SLUICE_TEST_REGISTRY` (`scripts/test` sets it).
pub fn registry() -> String {
    std::env::var("SLUICE_TEST_REGISTRY").expect(
        "SLUICE_TEST_REGISTRY is not set: run the tests with scripts/test, which starts a registry",
    )
}

/// A loopback port free right now, for a process the test starts
/// ([`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` loopback ports in a row, all free now, for processes a
/// test starts. They lie below the kernel's ephemeral range (32768 and up
/// here), where no outgoing connection of a test running beside this one
/// can take one before the process listens: a port the kernel hands out
/// for port 0 comes from that range, and once a server of a `--replicas`
/// run failed to listen on one a connection had taken meanwhile.
pub fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Calls in one test binary move on from each other's ports; test
    // binaries running at once start their search at different places.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let bindable = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let start =
        (std::process::id() ^ nanos) % 10_000 + NEXT.fetch_add(u32::from(n), Ordering::Relaxed);
    for k in 0..10_000u32 {
        let base = 20_000 + ((start + k * u32::from(n)) % (10_000 - u32::from(n))) as u16;
        if (base..base + n).all(bindable) {
            return base;
        }
    }
    panic!("no {n} free loopback ports in a row between 20000 and 30000");
}

/// A running server.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The server's state (database pool, keys).
    pub state: AppState,
    /// The admin's token.
    pub admin: String,
    /// The data folder.
    pub data_dir: PathBuf,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// A configuration for a test server on `pool`'s database.
pub fn config(data_dir: PathBuf) -> Config {
    Config {
        database_url: String::new(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        admin_password: Some(ADMIN_PASSWORD.into()),
        key_passphrase: "test passphrase".into(),
        insecure_registries: std::env::var("SLUICE_TEST_REGISTRY")
            .map(|r| vec![r])
            .unwrap_or_default(),
        registry_auth: None,
        trusted_proxies: vec![],
        poll_after_s: 60,
        response_ttl_s: 600,
        checkin_flush_ms: 1000,
        device_burst: 60,
        device_rate: 1.0,
        device_token_ttl_s: 6 * 3600,
        enroll_burst: 10_000,
        enroll_rate: 100.0,
        enroll_product_burst: 10_000,
        enroll_product_rate: 100.0,
        tls_cert: None,
        tls_key: None,
        web_dir: None,
    }
}

impl TestApp {
    /// The secret this server's tokens are signed with (from the database).
    pub async fn jwt_secret(&self) -> Vec<u8> {
        sluice_server::infra::jwt::JwtKeys::stored_secret(
            &self.state.db,
            &self.state.config.key_passphrase,
        )
        .await
        .unwrap()
    }

    /// Starts a server on the test's database.
    pub async fn spawn(pool: PgPool) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        Self::spawn_with(pool, config(dir.path().join("data")), dir).await
    }

    /// Starts a server with a given configuration.
    pub async fn spawn_with(pool: PgPool, config: Config, dir: tempfile::TempDir) -> TestApp {
        Self::start(pool, config, dir, None).await
    }

    /// Starts a server speaking HTTPS with a certificate made by `certs::make`;
    /// the test client trusts that CA only.
    pub async fn spawn_tls(pool: PgPool) -> (TestApp, certs::Certs) {
        let dir = tempfile::tempdir().unwrap();
        let c = certs::make(dir.path());
        let config = config(dir.path().join("data"));
        let app = Self::start(pool, config, dir, Some(&c)).await;
        (app, c)
    }

    async fn start(
        pool: PgPool,
        config: Config,
        dir: tempfile::TempDir,
        tls: Option<&certs::Certs>,
    ) -> TestApp {
        let data_dir = config.data_dir.clone();
        let state = app::state_with_pool(config, pool)
            .await
            .expect("server state");
        sluice_server::api::auth::bootstrap_admin(&state.db, Some(ADMIN_PASSWORD))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let (url, client, task) = match tls {
            None => (
                format!("http://{addr}"),
                reqwest::Client::new(),
                tokio::spawn(app::run(listener, state.clone(), shutdown)),
            ),
            Some(c) => {
                let server = sluice_server::infra::tls::server_config(&c.cert, &c.key).unwrap();
                let ca = reqwest::Certificate::from_pem(&std::fs::read(&c.ca).unwrap()).unwrap();
                let client = reqwest::Client::builder()
                    .tls_certs_only([ca])
                    .build()
                    .unwrap();
                (
                    format!("https://{addr}"),
                    client,
                    tokio::spawn(app::run_tls(listener, server, state.clone(), shutdown)),
                )
            }
        };
        let mut t = TestApp {
            url,
            state,
            admin: String::new(),
            data_dir,
            client,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        };
        let (s, body) = t
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"username": "admin", "password": ADMIN_PASSWORD})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        t.admin = body["token"].as_str().unwrap().to_string();
        t
    }

    /// Stops the server, draining requests and flushing check-ins.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Sends a request; answers the status and the JSON body (`Null` when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (s, _, v) = self.call_raw(method, path, token, body).await;
        (s, v)
    }

    /// Like `call`, also answering the headers.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if !status.is_success() && !bytes.is_empty() {
            assert_eq!(
                headers.get("content-type").and_then(|v| v.to_str().ok()),
                Some("application/problem+json"),
                "an error must be problem+json: {method_path} {value}",
                method_path = path
            );
            assert_eq!(
                value["status"].as_u64(),
                Some(status.as_u16() as u64),
                "{value}"
            );
            assert!(
                value["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "{value}"
            );
        }
        (status, headers, value)
    }

    /// GET as `token`.
    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    /// POST JSON as `token`.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// POSTs JSON as the admin and asserts the answer's status; answers its body.
    pub async fn post_ok(&self, path: &str, body: Value, want: StatusCode) -> Value {
        self.post_as(&self.admin, path, body, want).await
    }

    /// POSTs JSON as `token` and asserts the answer's status; answers its body.
    pub async fn post_as(&self, token: &str, path: &str, body: Value, want: StatusCode) -> Value {
        let (s, b) = self.post(path, token, body).await;
        assert_eq!(s, want, "POST {path}: {b}");
        b
    }

    /// GETs as the admin and asserts a 200; answers the body.
    pub async fn get_ok(&self, path: &str) -> Value {
        let (s, b) = self.get(path, &self.admin).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {b}");
        b
    }

    /// Makes a product in `repository`; answers its enrollment secret.
    pub async fn product(&self, name: &str, repository: &str) -> String {
        let b = self
            .post_ok(
                "/v1/products",
                json!({"name": name, "repository": repository}),
                StatusCode::CREATED,
            )
            .await;
        b["enrollment_secret"].as_str().unwrap().to_string()
    }

    /// Makes a channel.
    pub async fn channel(&self, product: &str, name: &str) {
        self.post_ok(
            &format!("/v1/products/{product}/channels"),
            json!({"name": name}),
            StatusCode::CREATED,
        )
        .await;
    }

    /// A publisher token for `products`.
    pub async fn publisher(&self, products: &[&str]) -> String {
        let b = self
            .post_ok(
                "/v1/tokens",
                json!({"name": "ci", "role": "publisher", "products": products}),
                StatusCode::CREATED,
            )
            .await;
        b["token"].as_str().unwrap().to_string()
    }

    /// A viewer's token (a user made through the database, then logged in).
    pub async fn viewer(&self) -> String {
        sqlx::query("INSERT INTO users (id, username, password_hash, role) VALUES ($1, 'viewer', $2, 'viewer') ON CONFLICT DO NOTHING")
            .bind(uuid::Uuid::new_v4())
            .bind(sluice_server::api::auth::hash_password("viewer password"))
            .execute(&self.state.db)
            .await
            .unwrap();
        let (s, b) = self
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"username": "viewer", "password": "viewer password"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        b["token"].as_str().unwrap().to_string()
    }

    /// A product `name` with nothing published yet: its repository (a fresh
    /// one in the test registry) holds an image tagged with each of
    /// `versions`, it has a channel `stable`, and a publisher token.
    pub async fn product_with_images(&self, name: &str, versions: &[&str]) -> Product {
        let registry = registry();
        let path = images::unique_repo(name);
        let repo = format!("{registry}/{path}");
        let mut digests = std::collections::BTreeMap::new();
        for v in versions {
            digests.insert(
                v.to_string(),
                images::push_image(&registry, &path, v).await.0,
            );
        }
        let secret = self.product(name, &repo).await;
        self.channel(name, "stable").await;
        let ci = self.publisher(&[name]).await;
        Product {
            secret,
            repo,
            ci,
            digests,
        }
    }

    /// A product `name` ready for a rollout, in one line: as
    /// [`Self::product_with_images`], each version published, the first into
    /// channel `stable` at 100 %.
    pub async fn product_with_releases(&self, name: &str, versions: &[&str]) -> Product {
        let product = self.product_with_images(name, versions).await;
        let (repo, ci) = (&product.repo, &product.ci);
        for (i, v) in versions.iter().enumerate() {
            let channels = if i == 0 {
                json!([{"name": "stable", "percent": 100}])
            } else {
                json!([])
            };
            self.post_as(
                ci,
                &format!("/v1/products/{name}/releases"),
                json!({"version": v, "image": format!("{repo}:{v}"), "channels": channels}),
                StatusCode::CREATED,
            )
            .await;
        }
        product
    }

    /// Changes a channel's rollout as the admin (`PATCH .../rollout`);
    /// answers the channel.
    pub async fn set_rollout(&self, product: &str, channel: &str, change: Value) -> Value {
        let (s, b) = self
            .call(
                Method::PATCH,
                &format!("/v1/products/{product}/channels/{channel}/rollout"),
                Some(&self.admin),
                Some(change),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        b
    }

    /// Enrolls a device with the key [`device_key`] gives its machine id;
    /// answers (device id, token).
    pub async fn enroll(
        &self,
        product: &str,
        secret: &str,
        machine_id: &str,
        channel: &str,
    ) -> (String, String) {
        let (s, b) = self
            .call(
                Method::POST,
                "/v1/devices/enroll",
                None,
                Some(json!({"product": product, "enrollment_secret": secret, "machine_id": machine_id,
                            "arch": "amd64", "channel": channel,
                            "proof": enroll_proof(&device_key(product, machine_id), product, machine_id)})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        (
            b["device_id"].as_str().unwrap().to_string(),
            b["token"].as_str().unwrap().to_string(),
        )
    }
}

/// What [`TestApp::product_with_releases`] made.
pub struct Product {
    /// The enrollment secret.
    pub secret: String,
    /// `<registry>/<repository>`.
    pub repo: String,
    /// A publisher token for the product.
    pub ci: String,
    /// Each version's image digest.
    pub digests: std::collections::BTreeMap<String, String>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The device key of a test machine: the same for the same product and
/// machine id, as a real device keeps its key.
pub fn device_key(product: &str, machine_id: &str) -> sluice_protocol::DeviceKey {
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(format!("{product}\0{machine_id}")).into();
    sluice_protocol::DeviceKey::from_seed(&seed)
}

/// Seconds since the epoch.
pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fresh enrollment proof (as JSON) by `key` for `machine_id`.
pub fn enroll_proof(key: &sluice_protocol::DeviceKey, product: &str, machine_id: &str) -> Value {
    serde_json::to_value(key.prove(
        sluice_protocol::ProofPurpose::Enroll,
        product,
        machine_id,
        rand::random(),
        now_s(),
    ))
    .unwrap()
}
