//! What the QEMU suites share: a machine booted from a raw disk under
//! SeaBIOS or OVMF, its serial console, and the helpers that build what it
//! boots. Used by `vm.rs` (the busybox test OS) and `derivative.rs` (the
//! systemd Debian derivative).

pub use crate::common::images;

use crate::common::{TestApp, registry};
use crate::kit;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_agent::config::{Config, SlotKind};
use sluice_tests::upgrade_events;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// At most as many machines at once, across both suites, as there are cores
/// (two at the most): an emulated CPU takes a core of its own. The test
/// harness runs two tests at a time on this 2-core machine, so the
/// derivative suite's one long test runs beside the busybox suite's. A
/// [`Fleet`] holds its permit until it is dropped.
pub async fn machine_slot() -> tokio::sync::SemaphorePermit<'static> {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    SLOTS
        .get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            tokio::sync::Semaphore::new(cores.clamp(1, 2))
        })
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

/// The firmware a machine boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default: GRUB's i386-pc core from the disk.
    Bios,
    /// OVMF (Debian's `ovmf`): GRUB's x86_64-efi image from the ESP.
    Uefi,
}

/// OVMF's firmware image in Debian's `ovmf`.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// A line on stderr that the test harness does not capture: the suite's
/// timings show in every run.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

pub fn work_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm");
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn sh(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A folder as one gzip tar layer (owners 0:0, fixed times).
pub fn layer_of(dir: &Path) -> images::Layer {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let p = dir.join(&name);
        if p.is_dir() {
            b.append_dir_all(&name, &p).unwrap();
        } else {
            b.append_path_with_name(&p, &name).unwrap();
        }
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    images::Layer {
        data: gz.finish().unwrap(),
        diff_id: images::digest(&tar),
    }
}

/// One release of the product: its version and image.
pub struct Release {
    pub version: String,
    pub format: images::Format,
    pub layers: Vec<images::Layer>,
}

/// A server (in-process, its own database) with product `acme` (its
/// repository on the host's registry) and channel `stable`.
pub struct Fleet {
    pub app: TestApp,
    pub ci: String,
    pub secret: String,
    pub keys: Value,
    pub repo_path: String,
    /// The published releases' digests, in publishing order.
    pub digests: Vec<String>,
    pub name: &'static str,
    pub started: Instant,
    _slot: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl Fleet {
    /// The server, the product, its channel and a publisher; nothing
    /// published yet.
    pub async fn start(
        pool: PgPool,
        name: &'static str,
        slot: Option<tokio::sync::SemaphorePermit<'static>>,
    ) -> Fleet {
        let started = Instant::now();
        // Devices pick up promotions within about 2 s.
        let app = kit::server(pool, 2).await;
        let repo_path = images::unique_repo("vm");
        let repo = format!("{}/{repo_path}", registry());
        let secret = app.product("acme", &repo).await;
        app.channel("acme", "stable").await;
        let ci = app.publisher(&["acme"]).await;
        let (_, keys) = app.call(Method::GET, "/v1/keys", None, None).await;
        Fleet {
            app,
            ci,
            secret,
            keys,
            repo_path,
            digests: Vec::new(),
            name,
            started,
            _slot: slot,
        }
    }

    /// Pushes and publishes `releases` in order; the first becomes the
    /// channel's head at 100 %.
    pub async fn publish(&mut self, releases: &[Release]) {
        self.publish_as(releases, true).await
    }

    /// Pushes and publishes `releases` in order, the first as the channel's
    /// head at 100 % if `head`, else none on the channel yet.
    pub async fn publish_as(&mut self, releases: &[Release], head: bool) {
        let reg = registry();
        let repo = format!("{reg}/{}", self.repo_path);
        for r in releases {
            let (d, _) = images::push_platform(
                &reg,
                &self.repo_path,
                Some(&r.version),
                r.format,
                "amd64",
                &r.layers,
            )
            .await;
            let mut body = json!({"version": r.version, "image": format!("{repo}:{}", r.version)});
            if head && self.digests.is_empty() {
                body["channels"] = json!([{"name": "stable", "percent": 100}]);
            }
            let (s, b) = self
                .app
                .post("/v1/products/acme/releases", &self.ci, body)
                .await;
            assert_eq!(s, StatusCode::CREATED, "{b}");
            self.digests.push(d);
        }
    }

    /// Makes `version` the head at 100 %.
    pub async fn promote(&self, version: &str) {
        kit::promote(&self.app, &self.ci, "stable", version).await;
    }

    /// Sets the channel's rollout fields (`gate`, `paused`, ...).
    pub async fn rollout(&self, body: Value) {
        self.app.set_rollout("acme", "stable", body).await;
    }

    /// The agent.toml of a QEMU machine on this fleet, with block slots `a`
    /// and `b`: the host's loopback is 10.0.2.2 from inside, for the server
    /// and the registry (which the product's repository names as the server
    /// reaches it).
    pub fn agent_config(&self, a: &str, b: &str) -> Config {
        let reg = registry();
        let port = reg.rsplit_once(':').expect("registry is host:port").1;
        let mut c = Config::new(
            &self.server_url(),
            "acme",
            "stable",
            SlotKind::Block,
            a.into(),
            b.into(),
        );
        c.enrollment_secret = Some(self.secret.clone());
        c.arch = "amd64".into();
        c.registry.insecure = vec![format!("10.0.2.2:{port}")];
        c.registry
            .mirrors
            .insert(reg.clone(), format!("10.0.2.2:{port}"));
        c
    }

    /// The server as a QEMU machine reaches it.
    pub fn server_url(&self) -> String {
        format!(
            "http://10.0.2.2:{}",
            self.app.url.rsplit_once(':').unwrap().1
        )
    }

    /// The server's view of the one device, with its events oldest first.
    pub async fn device(&self) -> (Value, Vec<String>) {
        let (s, list) = self
            .app
            .get("/v1/devices?product=acme", &self.app.admin)
            .await;
        assert_eq!(s, StatusCode::OK, "{list}");
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "one machine, one device: {list}");
        kit::device_view(&self.app, items[0]["id"].as_str().unwrap()).await
    }

    /// Waits until the server shows the device with `status` on `version`.
    pub async fn wait_status(&self, status: &str, version: &str, vm: &Vm) -> (Value, Vec<String>) {
        self.wait_device(&format!("{status} on {version}"), vm, |view| {
            view["status"] == status && view["status_version"] == version
        })
        .await
    }

    /// Waits (a minute at most) until the server has the one device and its
    /// view satisfies `done`; `what` names the wait in the failure.
    pub async fn wait_device(
        &self,
        what: &str,
        vm: &Vm,
        done: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (s, list) = self
                .app
                .get("/v1/devices?product=acme", &self.app.admin)
                .await;
            assert_eq!(s, StatusCode::OK);
            let shown = !list["items"].as_array().unwrap().is_empty();
            let view = if shown {
                let (view, events) = self.device().await;
                if done(&view) {
                    return (view, events);
                }
                view
            } else {
                Value::Null
            };
            assert!(
                Instant::now() < deadline,
                "the server never showed {what}: {view}\n{}",
                vm.tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The server's account of a failed trial of `version`: the device is
    /// back on `on` in `slot`, its events after the first `before` are those
    /// of a written, booted, failed and rolled-back release, and the health
    /// gate (at most 20 % failing after one report) counted it and halted
    /// the rollout. Answers the device view and its events.
    pub async fn expect_rolled_back(
        &self,
        vm: &Vm,
        version: &str,
        on: &str,
        slot: &str,
        before: usize,
    ) -> (Value, Vec<String>) {
        let (view, events) = self.wait_status("rolled_back", version, vm).await;
        assert_eq!(view["current_version"], on, "{view}");
        assert_eq!(view["booted_slot"], slot, "{view}");
        assert_eq!(
            events[before..],
            upgrade_events(&["failed", "rolled_back"]),
            "{events:?}"
        );
        let ch = self.channel().await;
        assert_eq!(ch["gate"]["failures"], 1, "{ch}");
        assert_eq!(ch["rollout"]["paused"], true, "{ch}");
        (view, events)
    }

    pub async fn channel(&self) -> Value {
        kit::channel(&self.app).await
    }

    pub fn done(&self) {
        say(&format!(
            "vm: {} took {:.1?} (server, disk and machine)",
            self.name,
            self.started.elapsed()
        ));
    }
}

/// A running `qemu-system-x86_64` and what it printed on its serial port.
pub struct Vm {
    child: tokio::process::Child,
    console: Arc<Mutex<Vec<u8>>>,
    pub seen: usize,
    log: PathBuf,
}

impl Vm {
    /// Boots the disk under SeaBIOS with 512 MiB (the busybox test OS).
    pub fn start(disk: &Path, log: &str) -> Vm {
        Vm::boot(disk, log, Firmware::Bios, 512)
    }

    /// Boots the disk (virtio disk and network, QEMU's user-mode network),
    /// accelerated as [`accel`] found out.
    pub fn boot(disk: &Path, log: &str, firmware: Firmware, memory_mb: u32) -> Vm {
        let log = work_dir().join(format!("{log}.log"));
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.args(["-machine", &format!("pc,accel={}", accel())])
            .args(["-m", &memory_mb.to_string()])
            .args(["-nodefaults", "-display", "none"])
            .args(["-serial", "stdio", "-monitor", "none"]);
        if firmware == Firmware::Uefi {
            cmd.args(["-bios", OVMF]);
        }
        let mut child = cmd
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                disk.display()
            ))
            .args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
                "-device",
                "virtio-rng-pci",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-system-x86_64 is installed (apt install qemu-system-x86)");
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut out = child.stdout.take().unwrap();
        let buf = console.clone();
        let log_path = log.clone();
        tokio::spawn(async move {
            let mut file = tokio::fs::File::create(&log_path).await.unwrap();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = out.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                let _ = file.write_all(&chunk[..n]).await;
            }
        });
        Vm {
            child,
            console,
            seen: 0,
            log,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).into_owned()
    }

    /// The end of the console, for failure messages.
    pub fn tail(&self) -> String {
        let t = self.text();
        let start = t.len().saturating_sub(3000);
        let start = (start..t.len())
            .find(|&i| t.is_char_boundary(i))
            .unwrap_or(0);
        format!(
            "--- console ({}), last lines ---\n{}",
            self.log.display(),
            &t[start..]
        )
    }

    /// Waits for `what` on the console after what was matched before.
    pub async fn expect(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.text();
            if let Some(i) = t.get(self.seen..).and_then(|rest| rest.find(what)) {
                self.seen += i + what.len();
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("qemu exited ({st}) before {what:?}\n{}", self.tail());
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} on the console within {timeout:?}\n{}",
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The console after the last match.
    pub fn rest(&self) -> String {
        self.text().get(self.seen..).unwrap_or_default().to_string()
    }

    /// Pulls the plug: SIGKILL, nothing flushed by the guest afterwards.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Whether the sparse disk file holds data (not a hole) in `start..end`.
pub fn has_data(disk: &Path, start: u64, end: u64) -> bool {
    let f = std::fs::File::open(disk).unwrap();
    matches!(rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(start)), Ok(o) if o < end)
}

/// `kvm` when a Linux kernel boots under it here, else `tcg`: on some
/// machines `/dev/kvm` exists but a kernel hangs under it (after "Probing
/// EDD"). The probe boots the Debian kernel without a root file system and
/// waits (15 s at most) for its panic about that: only a kernel that got
/// that far counts. `SLUICE_VM_ACCEL` overrides the probe.
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        let chosen = match std::env::var("SLUICE_VM_ACCEL").as_deref() {
            Ok("kvm") => "kvm",
            Ok("tcg") => "tcg",
            _ => probe_kvm(),
        };
        say(&format!("vm: acceleration {chosen}"));
        chosen
    })
}

fn probe_kvm() -> &'static str {
    use std::io::Read;
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return "tcg";
    }
    let kernel = match kernel_dir() {
        Some(d) => d,
        None => return "tcg",
    };
    let Some(vmlinuz) = std::fs::read_dir(kernel.join("boot"))
        .ok()
        .and_then(|mut r| r.find_map(|e| e.ok().map(|e| e.path())))
        .filter(|p| p.to_string_lossy().contains("vmlinuz"))
    else {
        return "tcg";
    };
    let mut child = match std::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "pc,accel=kvm", "-m", "256", "-nodefaults"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .args(["-append", "console=ttyS0 panic=0", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return "tcg",
    };
    let mut out = child.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let buf = seen.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ok = false;
    while Instant::now() < deadline {
        if String::from_utf8_lossy(&seen.lock().unwrap()).contains("Kernel panic") {
            ok = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    if ok { "kvm" } else { "tcg" }
}

/// The unpacked Debian kernel `tests/vm/mkvm.sh kernel` keeps, if any.
fn kernel_dir() -> Option<PathBuf> {
    let out = std::process::Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/mkvm.sh"))
        .arg("kernel")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
