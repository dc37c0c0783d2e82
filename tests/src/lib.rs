//! Harness for the end-to-end tests: the real `sluice-agent` binary (built on
//! demand, see [`agent_bin`]), a simulated device in a temporary folder that
//! it drives, OS-like image layers, and the trees the tests compare.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![forbid(unused_must_use)]

use sluice_agent::bootloader::{AbState, GrubEnv, Slot};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `sluice-agent` executable the tests run: `SLUICE_AGENT_BIN` when set
/// (e.g. a release build), else the workspace's own, built once per test
/// process with `cargo build -p sluice-agent`.
///
/// `CARGO_BIN_EXE_*` only names binaries of the package under test, and
/// artifact dependencies are unstable, so the test asks cargo itself: the
/// same cargo (`$CARGO`), target folder and profile as the test binary, so
/// under `cargo test --workspace` this is a no-op and under
/// `cargo test -p sluice-tests` it builds only the agent. Cargo releases its
/// build lock before it runs tests, so the nested build cannot deadlock.
/// Call it before starting a server: it blocks the calling thread.
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("SLUICE_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => build_agent(false),
    })
}

/// A release build of `sluice-agent` (small and fast: it goes into the QEMU
/// machines' initramfs): `SLUICE_VM_AGENT_BIN` when set, else built once per
/// test process with `cargo build --release -p sluice-agent` in the test's
/// target folder. Blocks the calling thread like [`agent_bin`].
pub fn agent_release_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("SLUICE_VM_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => build_agent(true),
    })
}

fn build_agent(release: bool) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "sluice-agent",
        "--bin",
        "sluice-agent",
        "--message-format=json-render-diagnostics",
        "--manifest-path",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"),
    ]);
    // The test runs as <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("the test knows its own path");
    if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            _ if release => {
                cmd.arg("--release");
            }
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
        }
        // Only a folder cargo made (it tags its target roots) is taken as one.
        if let Some(target) = profile_dir.parent()
            && target.join("CACHEDIR.TAG").exists()
        {
            cmd.arg("--target-dir").arg(target);
        }
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running cargo to build sluice-agent");
    assert!(out.status.success(), "cargo build -p sluice-agent failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "sluice-agent")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no sluice-agent executable")
}

/// What a slot is on the simulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// Two directories, `a/` and `b/`.
    Dir,
    /// Two regular files standing in for partitions, `a.part` and `b.part`.
    Block,
}

/// The device's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Always passes.
    Passes,
    /// Passes only when slot A is booted: the new image is "broken".
    OnlyInSlotA,
}

/// How to build a [`Device`].
#[derive(Debug, Clone)]
pub struct DeviceOpts {
    /// The server's base URL.
    pub server: String,
    /// Product name.
    pub product: String,
    /// Channel name.
    pub channel: String,
    /// The product's enrollment secret.
    pub enrollment_secret: String,
    /// The body of `GET /v1/keys`: the keys the device trusts.
    pub keys: serde_json::Value,
    /// `host:port` of the plain-HTTP registry.
    pub registry: String,
    /// Slot kind.
    pub kind: SlotKind,
    /// Health check.
    pub health: Health,
}

/// Size of each stand-in partition of a [`SlotKind::Block`] device.
pub const PARTITION_BYTES: u64 = 64 << 20;

/// A simulated device in a temporary folder: two slots, a grubenv, a file
/// standing in for `/proc/cmdline` (it starts booted from slot A, which holds
/// a factory image the server knows nothing about), and a reboot command that
/// records each reboot in a file.
pub struct Device {
    dir: tempfile::TempDir,
    /// The agent's configuration file.
    pub config: PathBuf,
    /// The machine id it enrolls with.
    pub machine_id: String,
}

impl Device {
    /// Changes the device's `agent.toml` through the agent's own type.
    pub fn edit_config(&self, change: impl FnOnce(&mut sluice_agent::config::Config)) {
        let mut cfg = sluice_agent::config::Config::load(&self.config).unwrap();
        change(&mut cfg);
        cfg.write(&self.config).unwrap();
    }

    /// Builds the device and writes its `agent.toml`.
    pub fn new(o: &DeviceOpts) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let (a, b) = match o.kind {
            SlotKind::Dir => {
                std::fs::create_dir_all(p.join("a")).unwrap();
                std::fs::create_dir_all(p.join("b")).unwrap();
                std::fs::write(p.join("a/factory"), b"factory image").unwrap();
                (p.join("a"), p.join("b"))
            }
            SlotKind::Block => {
                for part in ["a.part", "b.part"] {
                    std::fs::File::create(p.join(part))
                        .unwrap()
                        .set_len(PARTITION_BYTES)
                        .unwrap();
                }
                (p.join("a.part"), p.join("b.part"))
            }
        };
        std::fs::write(p.join("cmdline"), "root=/dev/vda2 sluice.slot=A quiet\n").unwrap();
        std::fs::write(p.join("keys.json"), o.keys.to_string()).unwrap();
        std::fs::write(p.join("boot_id"), format!("{}\n", rand_hex())).unwrap();
        let machine_id = format!("machine-{}", rand_hex());
        let mut cfg = sluice_agent::config::Config::in_folder(p, &o.server, &o.product, &o.channel);
        cfg.enrollment_secret = Some(o.enrollment_secret.clone());
        cfg.machine_id = Some(machine_id.clone());
        cfg.slots.kind = match o.kind {
            SlotKind::Dir => sluice_agent::config::SlotKind::Dir,
            SlotKind::Block => sluice_agent::config::SlotKind::Block,
        };
        (cfg.slots.a, cfg.slots.b) = (a, b);
        cfg.boot.reboot = vec![
            "sh".into(),
            "-c".into(),
            "echo reboot >> \"$0\"".into(),
            p.join("reboots").display().to_string(),
        ];
        if o.health == Health::OnlyInSlotA {
            cfg.boot.health_checks = vec![vec![
                "grep".into(),
                "-q".into(),
                "sluice.slot=A".into(),
                p.join("cmdline").display().to_string(),
            ]];
        }
        cfg.registry.insecure = vec![o.registry.clone()];
        let config = p.join("agent.toml");
        cfg.write(&config).unwrap();
        Device {
            dir,
            config,
            machine_id,
        }
    }

    /// A path inside the device's folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `sluice-agent --config <this device> args...`, not yet started. Async,
    /// so a server in the test's own runtime keeps serving meanwhile.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(agent_bin());
        c.arg("--config").arg(&self.config).args(args);
        c.kill_on_drop(true);
        c
    }

    /// Runs the agent to completion.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().await.unwrap()
    }

    /// How many times the reboot command ran.
    pub fn reboots(&self) -> usize {
        std::fs::read_to_string(self.path("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The A/B variables in the grubenv.
    pub fn ab(&self) -> AbState {
        AbState::from_env(&GrubEnv::load(&self.path("grubenv")).unwrap())
    }

    /// Plays GRUB by the shipped snippet's rules and "boots" the slot it picks.
    pub fn reboot(&self) -> Slot {
        let s = sluice_agent::bootloader::boot(&self.path("grubenv"))
            .unwrap()
            .expect("GRUB found a bootable slot");
        std::fs::write(
            self.path("cmdline"),
            format!("root=/dev/vda sluice.slot={s}\n"),
        )
        .unwrap();
        // A new boot: the kernel's boot id changes.
        std::fs::write(self.path("boot_id"), format!("{}\n", rand_hex())).unwrap();
        s
    }
}

fn rand_hex() -> String {
    let mut b = [0u8; 6];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).unwrap();
    hex::encode(b)
}

#[path = "../../agent/tests/common/shared.rs"]
mod shared;
use shared::tar_entry;
pub use shared::{Entry, checked, ok, refused, tree};

/// What `umoci raw unpack` makes of `image` (`host:port/repo@digest`): the
/// reference result of applying the image's layers in order.
pub async fn umoci_tree(image: &str) -> BTreeMap<PathBuf, Entry> {
    let image = image.to_string();
    tokio::task::spawn_blocking(move || shared::umoci_tree(&image))
        .await
        .unwrap()
}

/// `image` recompressed as `format` (`zstd`, `zstd:chunked`) and pushed to
/// `dest` (`host:port/repo:tag`) by skopeo; answers the new manifest's
/// bytes.
pub async fn recompress(image: &str, format: &str, dest: &str) -> Vec<u8> {
    let (image, format, dest) = (image.to_string(), format.to_string(), dest.to_string());
    tokio::task::spawn_blocking(move || shared::recompress(&image, &format, &dest))
        .await
        .unwrap()
}

/// A layer as pushed: the uncompressed tar and its gzip.
pub struct TarLayer {
    /// The uncompressed tar (its digest is the config's `diff_id`).
    pub tar: Vec<u8>,
    /// The gzip bytes pushed to the registry.
    pub gz: Vec<u8>,
}

impl TarLayer {
    fn new(b: tar::Builder<Vec<u8>>) -> TarLayer {
        let tar = b.into_inner().unwrap();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        TarLayer {
            gz: e.finish().unwrap(),
            tar,
        }
    }
}

/// An OS-like image of `version` in two layers: a base with directories,
/// a setuid file and a hard link to it, a symlink, files of another owner;
/// and an upper layer with a whiteout, an opaque directory and a replaced
/// `etc/os-release` naming the version.
pub fn os_layers(version: &str) -> Vec<TarLayer> {
    use tar::EntryType::*;
    let mut b = tar::Builder::new(Vec::new());
    tar_entry(&mut b, "etc/", Directory, 0o755, 0, b"", None);
    tar_entry(
        &mut b,
        "etc/os-release",
        Regular,
        0o644,
        0,
        b"ID=acme\n",
        None,
    );
    tar_entry(&mut b, "etc/old.conf", Regular, 0o600, 0, b"old", None);
    tar_entry(&mut b, "usr/", Directory, 0o755, 0, b"", None);
    tar_entry(&mut b, "usr/bin/", Directory, 0o755, 0, b"", None);
    tar_entry(
        &mut b,
        "usr/bin/su",
        Regular,
        0o4755,
        0,
        b"\x7fELF su",
        None,
    );
    tar_entry(
        &mut b,
        "usr/bin/sudo",
        Link,
        0o4755,
        0,
        b"",
        Some("usr/bin/su"),
    );
    tar_entry(&mut b, "bin", Symlink, 0o777, 0, b"", Some("usr/bin"));
    tar_entry(&mut b, "var/", Directory, 0o755, 0, b"", None);
    tar_entry(&mut b, "var/cache/", Directory, 0o755, 0, b"", None);
    tar_entry(&mut b, "var/cache/junk", Regular, 0o644, 0, b"junk", None);
    tar_entry(&mut b, "home/", Directory, 0o755, 0, b"", None);
    tar_entry(&mut b, "home/user/", Directory, 0o700, 1000, b"", None);
    tar_entry(
        &mut b,
        "home/user/.profile",
        Regular,
        0o644,
        1000,
        b"A=1\n",
        None,
    );
    for i in 0..50 {
        let doc = format!("doc {i} of {version}\n");
        tar_entry(
            &mut b,
            &format!("usr/share/doc/f{i}"),
            Regular,
            0o644,
            0,
            doc.as_bytes(),
            None,
        );
    }
    let base = TarLayer::new(b);

    let mut b = tar::Builder::new(Vec::new());
    tar_entry(&mut b, "etc/.wh.old.conf", Regular, 0o644, 0, b"", None);
    let release = format!("ID=acme\nVERSION_ID={version}\n");
    tar_entry(
        &mut b,
        "etc/os-release",
        Regular,
        0o644,
        0,
        release.as_bytes(),
        None,
    );
    tar_entry(&mut b, "var/cache/", Directory, 0o755, 0, b"", None);
    tar_entry(
        &mut b,
        "var/cache/.wh..wh..opq",
        Regular,
        0o644,
        0,
        b"",
        None,
    );
    tar_entry(&mut b, "var/cache/fresh", Regular, 0o644, 0, b"fresh", None);
    vec![base, TarLayer::new(b)]
}
