//! Several `sluice serve` processes on one PostgreSQL database behind HAProxy,
//! as `scripts/run --replicas` runs them (the balancer's configuration is the
//! one `scripts/services.sh` writes): a simulated fleet polls through the
//! balancer while a promote and a key rotation go in through single servers,
//! one server is killed under load, and the health gate trips once. Every
//! device checks that its serial never goes down.

use crate::common::{self, ADMIN_PASSWORD, device_key, enroll_proof, images, registry};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_protocol::keys::SIGNATURE_HEADER;
use sluice_protocol::{KeySet, ResolveResponse};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Servers behind the balancer.
const SERVERS: usize = 3;
/// Devices in the simulated fleet.
const DEVICES: usize = 20;
/// How long a device waits between two polls.
const POLL_EVERY: Duration = Duration::from_millis(150);
/// The issue's promise: a change reaches every server within this.
const REACH: Duration = Duration::from_secs(1);
/// A rotated key is listed by every server within this: each decrypts the
/// new key first, which a debug build does slowly.
const LIST_REACH: Duration = Duration::from_secs(3);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Debian's `haproxy` (scripts/test installs it).
fn haproxy_bin() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .expect("haproxy is not installed: apt-get install haproxy (scripts/test installs it)")
}

/// `scripts/services.sh haproxy_config FILE PORT SOCKET BACKEND...`: the
/// configuration `scripts/run --replicas` starts HAProxy with.
fn haproxy_config(file: &Path, port: u16, backends: &[String]) {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#". "$0" && haproxy_config "$@""#)
        .arg(root().join("scripts/services.sh"))
        .arg(file)
        .arg(port.to_string())
        .arg(file.with_extension("sock"))
        .args(backends)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The URL of the test's own database (`#[sqlx::test]` makes one per test),
/// for the server processes.
fn database_url(db: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let (server, rest) = base
        .rsplit_once('/')
        .expect("DATABASE_URL names a database");
    let query = rest
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    let name = db.connect_options().get_database().unwrap().to_string();
    format!("{server}/{name}{query}")
}

/// The last lines of a log file, for a failure message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One `sluice serve` process.
struct Server {
    /// `sluice1`, `sluice2`, ...: its name in the balancer.
    name: String,
    /// `http://127.0.0.1:<port>`, the server itself.
    url: String,
    log: PathBuf,
    child: Child,
}

/// The servers, the balancer in front of them, an admin and product `acme`
/// with releases 1.0.0 (in `stable` at 100 %), 1.1.0 and 1.2.0.
struct Cluster {
    servers: Vec<Server>,
    /// The balancer's URL.
    url: String,
    admin: String,
    http: reqwest::Client,
    db: PgPool,
    /// The enrollment secret of `acme`.
    secret: String,
    /// Each version's image digest.
    digests: BTreeMap<String, String>,
    /// Killed with the cluster (`kill_on_drop`), as the servers are.
    _haproxy: Child,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(db: PgPool) -> Cluster {
        let bin = tokio::task::spawn_blocking(sluice_tests::server_bin)
            .await
            .unwrap();
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let database_url = database_url(&db);
        let mut servers = Vec::new();
        for i in 1..=SERVERS {
            let port = common::free_port();
            let data = dir.path().join(format!("data-{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let log = dir.path().join(format!("server-{i}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(bin)
                .arg("serve")
                .env("DATABASE_URL", &database_url)
                .env("SLUICE_LISTEN", format!("127.0.0.1:{port}"))
                .env("SLUICE_DATA_DIR", &data)
                .env("SLUICE_KEY_PASSPHRASE", "balancer test passphrase")
                .env("SLUICE_ADMIN_PASSWORD", ADMIN_PASSWORD)
                .env("SLUICE_INSECURE_REGISTRIES", registry())
                .env("SLUICE_TRUSTED_PROXIES", "127.0.0.1")
                // Check-ins reach the database within 0.2 s; a device's
                // polls are not rate limited at this test's pace.
                .env("SLUICE_CHECKIN_FLUSH_MS", "200")
                .env("SLUICE_DEVICE_RATE", "100")
                .env("SLUICE_DEVICE_BURST", "200")
                .env("RUST_LOG", "warn")
                .env_remove("SLUICE_WEB_DIR")
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            servers.push(Server {
                name: format!("sluice{i}"),
                url: format!("http://127.0.0.1:{port}"),
                log,
                child,
            });
            // The first start makes the keys and the key list; the others
            // start together, on what it made.
            if i == 1 || i == SERVERS {
                for s in &mut servers {
                    s.wait_ready(&http).await;
                }
            }
        }
        println!("{SERVERS} servers ready after {:?}", started.elapsed());

        let port = common::free_port();
        let cfg = dir.path().join("haproxy.cfg");
        let backends: Vec<String> = servers
            .iter()
            .map(|s| s.url.trim_start_matches("http://").to_string())
            .collect();
        haproxy_config(&cfg, port, &backends);
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let haproxy = Command::new(haproxy_bin())
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        // Up when each server has answered through it.
        let mut seen = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < SERVERS {
            assert!(
                Instant::now() < deadline,
                "HAProxy did not reach every server in 20 s (answered: {seen:?}): {}",
                tail(&dir.path().join("haproxy.log"))
            );
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await
                && r.status() == StatusCode::OK
                && let Some(s) = r.headers().get("x-sluice-server")
            {
                seen.insert(s.to_str().unwrap().to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let login: Value = http
            .post(format!("{url}/v1/auth/login"))
            .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let admin = login["token"].as_str().expect("admin logs in").to_string();
        let mut c = Cluster {
            servers,
            url,
            admin,
            http,
            db,
            secret: String::new(),
            digests: BTreeMap::new(),
            _haproxy: haproxy,
            dir,
        };
        c.product().await;
        println!("cluster and product ready after {:?}", started.elapsed());
        c
    }

    /// `acme` with three releases, the first in `stable` at 100 %, made
    /// through the balancer.
    async fn product(&mut self) {
        let reg = registry();
        let path = images::unique_repo("balancer");
        let repo = format!("{reg}/{path}");
        let p = self
            .call(
                &self.url,
                "POST",
                "/v1/products",
                json!({"name": "acme", "repository": repo}),
            )
            .await;
        self.secret = p["enrollment_secret"].as_str().unwrap().to_string();
        self.call(
            &self.url,
            "POST",
            "/v1/products/acme/channels",
            json!({"name": "stable"}),
        )
        .await;
        for (i, v) in ["1.0.0", "1.1.0", "1.2.0"].into_iter().enumerate() {
            let digest = images::push_image(&reg, &path, v).await.0;
            self.digests.insert(v.to_string(), digest);
            let channels = if i == 0 {
                json!([{"name": "stable", "percent": 100}])
            } else {
                json!([])
            };
            self.call(
                &self.url,
                "POST",
                "/v1/products/acme/releases",
                json!({"version": v, "image": format!("{repo}:{v}"), "channels": channels}),
            )
            .await;
        }
    }

    /// An admin's call to `base` (the balancer or one server) that must
    /// succeed; answers the body.
    async fn call(&self, base: &str, method: &str, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(
            status.is_success(),
            "{method} {base}{path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// An admin's GET through the balancer.
    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.unwrap()
    }

    /// [`DEVICES`] devices enrolled in `stable` through the balancer, each
    /// running 1.0.0.
    async fn fleet(&self) -> Vec<Arc<Device>> {
        let mut devices = Vec::new();
        for i in 0..DEVICES {
            let machine = format!("machine-{i}");
            let r = self
                .http
                .post(format!("{}/v1/devices/enroll", self.url))
                .json(&json!({"product": "acme", "enrollment_secret": self.secret, "machine_id": machine,
                              "arch": "amd64", "channel": "stable",
                              "proof": enroll_proof(&device_key("acme", &machine), "acme", &machine)}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "enroll {machine}");
            let b: Value = r.json().await.unwrap();
            devices.push(Arc::new(Device {
                id: b["device_id"].as_str().unwrap().to_string(),
                token: b["token"].as_str().unwrap().to_string(),
                current: self.digests["1.0.0"].clone(),
                max_serial: Mutex::new(0),
            }));
        }
        devices
    }

    /// Polls `server` directly as `device` until it offers `version`;
    /// answers how long that took from `since`, or `None` after 10 s.
    async fn reached(
        &self,
        server: &str,
        device: &Device,
        version: &str,
        since: Instant,
    ) -> Option<Duration> {
        while since.elapsed() < Duration::from_secs(10) {
            if let Ok(a) = resolve(&self.http, server, device).await
                && a.answer
                    .release
                    .as_ref()
                    .is_some_and(|r| r.version == version)
            {
                return Some(since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Every server's log and the balancer's, for a failure's message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            out += &format!("--- {} ({})\n{}\n", s.name, s.url, tail(&s.log));
        }
        out + &format!(
            "--- haproxy\n{}",
            tail(&self.dir.path().join("haproxy.log"))
        )
    }
}

impl Server {
    /// Waits up to 60 s for `/readyz` to answer 200.
    async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.url)).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} was not ready in 60 s:\n{}",
                self.name,
                tail(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One enrolled device.
struct Device {
    id: String,
    token: String,
    /// The digest it runs.
    current: String,
    /// The highest serial it was answered.
    max_serial: Mutex<i64>,
}

impl Device {
    /// Keeps the highest serial seen; answers an error when `serial` is
    /// lower than one seen before.
    fn saw_serial(&self, serial: i64, server: &str) -> Result<(), String> {
        let mut max = self.max_serial.lock().unwrap();
        if serial < *max {
            return Err(format!(
                "device {} was answered serial {serial} by {server} after {}",
                self.id, *max
            ));
        }
        *max = serial;
        Ok(())
    }
}

/// A verified-later resolve answer.
struct Answer {
    answer: ResolveResponse,
    /// The balancer's `X-Sluice-Server`: which server answered (none when
    /// asked directly).
    server: String,
    signature: String,
    body: Vec<u8>,
}

impl Answer {
    /// The `keyid` of its signature.
    fn key_id(&self) -> &str {
        self.signature
            .split(';')
            .find_map(|p| p.trim().strip_prefix("keyid="))
            .unwrap_or_default()
    }
}

/// `GET .../resolve` as `device` from `base`.
async fn resolve(http: &reqwest::Client, base: &str, device: &Device) -> Result<Answer, String> {
    let nonce = format!("n{:016x}", rand::random::<u64>());
    let r = http
        .get(format!(
            "{base}/v1/products/acme/channels/stable/resolve?arch=amd64&current={}&nonce={nonce}",
            device.current
        ))
        .bearer_auth(&device.token)
        .send()
        .await
        .map_err(|e| format!("resolve: {e}"))?;
    let status = r.status();
    let server = r
        .headers()
        .get("x-sluice-server")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let signature = r
        .headers()
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = r
        .bytes()
        .await
        .map_err(|e| format!("resolve body: {e}"))?
        .to_vec();
    if status != StatusCode::OK {
        return Err(format!(
            "resolve: {status} from {server}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let answer: ResolveResponse =
        serde_json::from_slice(&body).map_err(|e| format!("resolve: {e}"))?;
    if answer.nonce != nonce || answer.device_id != device.id {
        return Err(format!(
            "resolve: an answer for another question from {server}"
        ));
    }
    device.saw_serial(answer.serial, &server)?;
    Ok(Answer {
        answer,
        server,
        signature,
        body,
    })
}

/// A request of the fleet: a poll or an event, when it started and ended,
/// and why it failed if it did.
struct Request {
    poll: bool,
    start: Instant,
    end: Instant,
    failed: Option<String>,
}

impl Request {
    fn in_flight_at(&self, t: Instant) -> bool {
        self.start <= t && t <= self.end
    }
}

/// What the polling fleet saw.
#[derive(Default)]
struct Seen {
    polls: usize,
    /// Polls answered, per server.
    by_server: BTreeMap<String, usize>,
    requests: Vec<Request>,
    /// (device id, message) of every event the balancer answered 204.
    acked_events: Vec<(String, String)>,
}

/// One poll through the balancer at `url`, recorded in `seen`.
async fn poll(http: &reqwest::Client, url: &str, d: &Device, seen: &Mutex<Seen>) {
    let start = Instant::now();
    let r = resolve(http, url, d).await;
    let mut s = seen.lock().unwrap();
    s.polls += 1;
    let failed = match r {
        Ok(a) => {
            *s.by_server.entry(a.server).or_default() += 1;
            None
        }
        Err(what) => Some(what),
    };
    s.requests.push(Request {
        poll: true,
        start,
        end: Instant::now(),
        failed,
    });
}

/// The fleet polling through the balancer until stopped.
struct Polling {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Polling {
    /// Each device polls every [`POLL_EVERY`]; with `events`, it also
    /// reports an event after each poll.
    fn start(c: &Cluster, devices: &[Arc<Device>], events: bool) -> Polling {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let tasks = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (stop, seen, d) = (stop.clone(), seen.clone(), d.clone());
                let (http, url) = (c.http.clone(), c.url.clone());
                tokio::spawn(async move {
                    // Spread the fleet over one interval.
                    tokio::time::sleep(POLL_EVERY * i as u32 / DEVICES as u32).await;
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        poll(&http, &url, &d, &seen).await;
                        if events {
                            n += 1;
                            let message = format!("{}-{n}", d.id);
                            let start = Instant::now();
                            let r = http
                                .post(format!("{url}/v1/devices/{}/events", d.id))
                                .bearer_auth(&d.token)
                                .json(&json!({"kind": "download_started", "version": "1.0.0",
                                              "digest": d.current, "message": message}))
                                .send()
                                .await;
                            let mut s = seen.lock().unwrap();
                            let failed = match r {
                                Ok(r) if r.status() == StatusCode::NO_CONTENT => {
                                    s.acked_events.push((d.id.clone(), message));
                                    None
                                }
                                r => Some(format!("event: {r:?}")),
                            };
                            s.requests.push(Request {
                                poll: false,
                                start,
                                end: Instant::now(),
                                failed,
                            });
                        }
                        tokio::time::sleep(POLL_EVERY).await;
                    }
                })
            })
            .collect();
        Polling { stop, seen, tasks }
    }

    /// Stops the fleet; answers what it saw.
    async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.seen)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// A promote through server 1 reaches every server within a second, and a
/// response key rotated and activated through server 2 signs the answers
/// server 3 gives, while the fleet polls through the balancer without a
/// failure or a serial going down.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_promote_and_a_key_rotation_reach_every_server(db: PgPool) {
    let c = Cluster::start(db).await;
    let devices = c.fleet().await;
    let fleet = Polling::start(&c, &devices, false);
    tokio::time::sleep(Duration::from_secs(1)).await;

    c.call(
        &c.servers[0].url,
        "POST",
        "/v1/products/acme/channels/stable/promote",
        json!({"version": "1.1.0", "percent": 100}),
    )
    .await;
    let since = Instant::now();
    let mut waits = Vec::new();
    for (s, d) in c.servers.iter().zip(&devices) {
        waits.push((s.name.clone(), c.reached(&s.url, d, "1.1.0", since)));
    }
    let mut slowest = Duration::ZERO;
    for (name, wait) in waits {
        let took = wait.await;
        println!("promote through sluice1 reached {name} after {took:?}");
        let took = took.unwrap_or_else(|| panic!("{name} never answered 1.1.0 in 10 s"));
        slowest = slowest.max(took);
    }
    println!("promote: the slowest server answered the new head after {slowest:?}");

    let rotated = c
        .call(
            &c.servers[1].url,
            "POST",
            "/v1/keys/response/rotate",
            json!({}),
        )
        .await;
    let rotated_at = Instant::now();
    let new_key = rotated["key_id"].as_str().unwrap().to_string();
    let server3 = &c.servers[2];
    // The new key is listed by every server (devices learn it before it signs).
    let mut listed = None;
    while rotated_at.elapsed() < Duration::from_secs(10) {
        let keys: KeySet = c
            .http
            .get(format!("{}/v1/keys", server3.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if keys.keys.iter().any(|k| k.key_id == new_key) {
            listed = Some(rotated_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("key rotation through sluice2: sluice3 listed the new key after {listed:?}");
    assert!(
        listed.is_some(),
        "sluice3 never listed the key rotated through sluice2"
    );
    c.call(
        &c.servers[1].url,
        "POST",
        "/v1/keys/response/activate",
        json!({"force": true}),
    )
    .await;
    let activated = Instant::now();
    let mut signed_new = None;
    while activated.elapsed() < Duration::from_secs(10) {
        let a = resolve(&c.http, &server3.url, &devices[0]).await.unwrap();
        if a.key_id() == new_key {
            signed_new = Some(activated.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "key activation through sluice2: sluice3 signed with the new key after {signed_new:?}"
    );
    // Devices answered by server 3 through the balancer, a second after the
    // activation, check the answers with the keys `GET /v1/keys` lists.
    tokio::time::sleep(REACH.saturating_sub(activated.elapsed())).await;
    let keys: KeySet = c
        .http
        .get(format!("{}/v1/keys", c.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut by_server3 = 0;
    for d in devices.iter().cycle().take(DEVICES * 3) {
        let a = resolve(&c.http, &c.url, d).await.unwrap();
        if a.server != server3.name {
            continue;
        }
        by_server3 += 1;
        keys.verify_response(&a.signature, &a.body)
            .unwrap_or_else(|e| panic!("sluice3's answer does not verify with GET /v1/keys: {e}"));
        assert_eq!(
            a.key_id(),
            new_key,
            "sluice3 signs with the key activated through sluice2"
        );
    }
    assert!(
        by_server3 >= 5,
        "the balancer sent sluice3 only {by_server3} of {} polls",
        DEVICES * 3
    );

    let seen = fleet.stop().await;
    println!(
        "fleet: {} polls through the balancer, by server {:?}",
        seen.polls, seen.by_server
    );
    let failures: Vec<&str> = seen
        .requests
        .iter()
        .filter_map(|r| r.failed.as_deref())
        .collect();
    assert!(
        failures.is_empty(),
        "polls failed: {failures:#?}\n{}",
        c.logs()
    );
    assert_eq!(
        seen.by_server.len(),
        SERVERS,
        "every server answered: {:?}",
        seen.by_server
    );
    assert!(
        slowest <= REACH,
        "the promote reached the slowest server after {slowest:?}, more than {REACH:?}"
    );
    // Listing costs the receiving server one decryption of the new key
    // (scrypt: about 0.8 s in a debug build, a tenth of that in release).
    assert!(
        listed.is_some_and(|t| t <= LIST_REACH),
        "sluice3 listed the key rotated through sluice2 after {listed:?}, not within {LIST_REACH:?}"
    );
    assert!(
        signed_new.is_some_and(|t| t <= REACH),
        "sluice3 signed with the key activated through sluice2 after {signed_new:?}, not within {REACH:?}"
    );
}

/// `kill -9` of one server under load: only requests in flight at the kill
/// may fail, every event answered 204 is in the database, and every device's
/// check-ins go on through the servers left.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn killing_a_server_under_load_loses_no_acknowledged_write(db: PgPool) {
    let mut c = Cluster::start(db).await;
    let devices = c.fleet().await;
    let fleet = Polling::start(&c, &devices, true);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A burst of polls on top, so that some are in flight at the kill.
    let burst: Vec<_> = devices
        .iter()
        .cycle()
        .take(200)
        .map(|d| {
            let (http, url, d, seen) =
                (c.http.clone(), c.url.clone(), d.clone(), fleet.seen.clone());
            tokio::spawn(async move { poll(&http, &url, &d, &seen).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.servers[1].child.start_kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    c.servers[1].child.wait().await.unwrap();
    for b in burst {
        b.await.unwrap();
    }
    // The balancer takes it out after two failed checks a second apart;
    // meanwhile what it sends there goes to another server.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: String = sqlx::query_scalar("SELECT now()::text")
        .fetch_one(&c.db)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = fleet.stop().await;
    // Check-ins are written behind, every 0.2 s here.
    tokio::time::sleep(Duration::from_millis(600)).await;

    // A poll in flight at the kill is sent again to another server (a GET
    // may be); an event is not (it would be recorded twice): the device
    // reports it again. Events sent to the dead server before the balancer
    // took it out (two failed checks a second apart) fail the same way.
    let taken_out = killed + Duration::from_millis(2500);
    let in_flight: Vec<&Request> = seen
        .requests
        .iter()
        .filter(|r| r.in_flight_at(killed))
        .collect();
    let failed: Vec<&Request> = seen
        .requests
        .iter()
        .filter(|r| r.failed.is_some())
        .collect();
    let count = |rs: &[&Request], poll: bool| rs.iter().filter(|r| r.poll == poll).count();
    println!(
        "kill -9 of sluice2 under load: {} polls and {} events acknowledged; in flight at the kill: {} polls, {} events; \
         failed: {} polls, {} events ({} of them in flight at the kill); polls answered by server {:?}",
        seen.polls,
        seen.acked_events.len(),
        count(&in_flight, true),
        count(&in_flight, false),
        count(&failed, true),
        count(&failed, false),
        failed.iter().filter(|r| r.in_flight_at(killed)).count(),
        seen.by_server
    );
    let wrong: Vec<&str> = failed
        .iter()
        .filter(|r| {
            if r.poll {
                !r.in_flight_at(killed)
            } else {
                r.start > taken_out || r.end < killed
            }
        })
        .filter_map(|r| r.failed.as_deref())
        .collect();
    assert!(
        wrong.is_empty(),
        "requests failed that were neither in flight at the kill nor (events) sent before the balancer took the server out: {wrong:#?}\n{}",
        c.logs()
    );

    let messages: Vec<String> = seen.acked_events.iter().map(|(_, m)| m.clone()).collect();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM device_events WHERE message = ANY($1)")
            .bind(&messages)
            .fetch_one(&c.db)
            .await
            .unwrap();
    assert!(!messages.is_empty());
    assert_eq!(
        stored,
        messages.len() as i64,
        "events answered 204 were lost"
    );

    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let fresh: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM devices WHERE id::text = ANY($1) AND last_seen > $2::timestamptz",
    )
    .bind(&ids)
    .bind(after)
    .fetch_one(&c.db)
    .await
    .unwrap();
    assert_eq!(
        fresh, DEVICES as i64,
        "every device checked in after the kill"
    );
}

/// Every device reports a failure on the head at once, through the
/// balancer to all servers: the health gate halts the rollout once, with
/// one history entry and one audit entry.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn the_health_gate_trips_once_across_servers(db: PgPool) {
    let c = Cluster::start(db).await;
    let devices = c.fleet().await;
    c.call(
        &c.url,
        "PATCH",
        "/v1/products/acme/channels/stable/rollout",
        json!({"gate": {"max_failure_percent": 20, "min_reports": 5}}),
    )
    .await;
    c.call(
        &c.url,
        "POST",
        "/v1/products/acme/channels/stable/promote",
        json!({"version": "1.1.0", "percent": 100}),
    )
    .await;
    // Every server answers the new head (at the latest when its snapshot
    // expires), then every device is offered it through the balancer.
    let since = Instant::now();
    for (s, d) in c.servers.iter().zip(&devices) {
        c.reached(&s.url, d, "1.1.0", since)
            .await
            .unwrap_or_else(|| panic!("{} never answered 1.1.0", s.name));
    }
    for d in &devices {
        let a = resolve(&c.http, &c.url, d).await.unwrap();
        assert!(a.answer.update, "{} is offered 1.1.0", d.id);
    }
    // A real device downloads for a while before it reports: its offer has
    // been written by then, whichever server made it.
    let offer = format!("1.1.0@{}", c.digests["1.1.0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM devices WHERE $1 = ANY(offered)")
            .bind(&offer)
            .fetch_one(&c.db)
            .await
            .unwrap();
        if n == DEVICES as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} offers written in 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let digest = c.digests["1.1.0"].clone();
    let reports: Vec<_> = devices
        .iter()
        .map(|d| {
            let (http, url, d, digest) = (c.http.clone(), c.url.clone(), d.clone(), digest.clone());
            tokio::spawn(async move {
                let r = http
                    .post(format!("{url}/v1/devices/{}/events", d.id))
                    .bearer_auth(&d.token)
                    .json(&json!({"kind": "failed", "version": "1.1.0", "digest": digest}))
                    .send()
                    .await
                    .unwrap();
                (r.status(), r.headers().get("x-sluice-server").cloned())
            })
        })
        .collect();
    let mut by_server = HashMap::new();
    for r in reports {
        let (status, server) = r.await.unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        *by_server.entry(format!("{server:?}")).or_insert(0) += 1;
    }
    println!("gate: {DEVICES} failure reports, by server {by_server:?}");

    let ch = c.get("/v1/products/acme/channels/stable").await;
    assert_eq!(ch["rollout"]["paused"], true, "{ch}");
    let history = c.get("/v1/products/acme/channels/stable/history").await;
    let gates: Vec<&Value> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "gate")
        .collect();
    assert_eq!(gates.len(), 1, "one gate halt in the history: {gates:#?}");
    let audit = c.get("/v1/audit?action=channel.gate").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");
    // Paused, the serials the devices saw never went down.
    for d in &devices {
        resolve(&c.http, &c.url, d).await.unwrap();
    }
}

/// docker-compose.yml's balancer (deploy/haproxy.cfg) has the settings
/// scripts/run's has, and HAProxy accepts it.
#[test]
fn the_compose_balancer_has_the_scripts_settings() {
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("haproxy.cfg");
    haproxy_config(
        &made,
        8080,
        &["127.0.0.1:8081".into(), "127.0.0.1:8082".into()],
    );
    let compose = root().join("deploy/haproxy.cfg");
    // What differs on purpose: where it listens, the servers, the admin
    // socket, and how Docker's DNS finds the servers.
    let settings = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                l.split(" resolvers docker")
                    .next()
                    .unwrap()
                    .trim()
                    .to_string()
            })
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| {
                ![
                    "bind ",
                    "server ",
                    "stats socket ",
                    "resolvers ",
                    "nameserver ",
                    "hold ",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .collect()
    };
    assert_eq!(settings(&compose), settings(&made));
    for cfg in [&made, &compose] {
        let out = std::process::Command::new(haproxy_bin())
            .args(["-c", "-f"])
            .arg(cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            cfg.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
