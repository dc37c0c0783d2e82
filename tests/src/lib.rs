//! Harness for the end-to-end tests: the real `sluice-agent` binary (built on
//! demand, see [`agent_bin`]), a simulated device in a temporary folder that
//! it drives, OS-like image layers, and the trees the tests compare.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![forbid(unused_must_use)]

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
        None => cargo_bin("sluice-agent", "sluice-agent", false),
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
        None => cargo_bin("sluice-agent", "sluice-agent", true),
    })
}

/// The `sluice` executable (the server and CLI): `SLUICE_SERVER_BIN` when
/// set, else built once per test process like [`agent_bin`].
pub fn server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("SLUICE_SERVER_BIN") {
        Some(p) => PathBuf::from(p),
        None => cargo_bin("sluice-server", "sluice", false),
    })
}

/// Builds `bin` of `package` with the test's cargo, target folder and
/// profile (`release`: always in release) and answers its path.
fn cargo_bin(package: &str, bin: &str, release: bool) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        package,
        "--bin",
        bin,
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
        .unwrap_or_else(|e| panic!("running cargo to build {bin}: {e}"));
    assert!(out.status.success(), "cargo build -p {package} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported no {bin} executable"))
}

#[path = "../../agent/tests/it/common/device.rs"]
mod device;
pub use device::{Device, DeviceOpts, Health, PARTITION_BYTES};
pub use sluice_agent::bootloader::Slot;
pub use sluice_agent::config::SlotKind;

impl Device {
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

    /// `status --json`, which must succeed.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&self.run(&["status", "--json"]).await)).unwrap()
    }

    /// Applies the offered release `version`, reboots into it and marks it
    /// good; answers the slot it now runs from.
    pub async fn upgrade(&self, version: &str) -> Slot {
        let out = ok(&self.run(&["apply"]).await);
        assert!(out.contains(&format!("applied {version}")), "{out}");
        let slot = self.reboot();
        ok(&self.run(&["mark-good"]).await);
        slot
    }
}

/// The events a device reports for one upgrade, oldest first: the
/// download, the write and the reboot, then how the new slot ended
/// (`["healthy"]`, `["failed", "rolled_back"]`, ...).
pub fn upgrade_events(ending: &[&'static str]) -> Vec<&'static str> {
    let mut events = vec!["download_started", "downloaded", "applied", "rebooting"];
    events.extend_from_slice(ending);
    events
}

#[path = "../../agent/tests/it/common/shared.rs"]
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

/// A test layer written entry by entry (fixed times, owned by root until
/// [`LayerWriter::owner`] says otherwise).
struct LayerWriter {
    tar: tar::Builder<Vec<u8>>,
    uid: u64,
}

impl LayerWriter {
    fn new() -> LayerWriter {
        LayerWriter {
            tar: tar::Builder::new(Vec::new()),
            uid: 0,
        }
    }

    fn entry(&mut self, path: &str, kind: tar::EntryType, mode: u32, data: &[u8]) -> &mut Self {
        tar_entry(&mut self.tar, path, kind, mode, self.uid, data, None);
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry(path, tar::EntryType::Directory, mode, b"")
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, tar::EntryType::Regular, mode, data)
    }

    /// A hard link (`Link`) or a symbolic one (`Symlink`) to `target`.
    fn link(&mut self, path: &str, kind: tar::EntryType, mode: u32, target: &str) -> &mut Self {
        tar_entry(&mut self.tar, path, kind, mode, self.uid, b"", Some(target));
        self
    }

    /// The owner (uid and gid) of the entries that follow.
    fn owner(&mut self, uid: u64) -> &mut Self {
        self.uid = uid;
        self
    }

    fn finish(self) -> TarLayer {
        let tar = self.tar.into_inner().unwrap();
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
    let mut base = LayerWriter::new();
    base.dir("etc/", 0o755)
        .file("etc/os-release", 0o644, b"ID=acme\n")
        .file("etc/old.conf", 0o600, b"old")
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file("usr/bin/su", 0o4755, b"\x7fELF su")
        .link("usr/bin/sudo", tar::EntryType::Link, 0o4755, "usr/bin/su")
        .link("bin", tar::EntryType::Symlink, 0o777, "usr/bin")
        .dir("var/", 0o755)
        .dir("var/cache/", 0o755)
        .file("var/cache/junk", 0o644, b"junk")
        .dir("home/", 0o755)
        .owner(1000)
        .dir("home/user/", 0o700)
        .file("home/user/.profile", 0o644, b"A=1\n")
        .owner(0);
    for i in 0..50 {
        let doc = format!("doc {i} of {version}\n");
        base.file(&format!("usr/share/doc/f{i}"), 0o644, doc.as_bytes());
    }

    let mut upper = LayerWriter::new();
    upper
        .file("etc/.wh.old.conf", 0o644, b"")
        .file(
            "etc/os-release",
            0o644,
            format!("ID=acme\nVERSION_ID={version}\n").as_bytes(),
        )
        .dir("var/cache/", 0o755)
        .file("var/cache/.wh..wh..opq", 0o644, b"")
        .file("var/cache/fresh", 0o644, b"fresh");
    vec![base.finish(), upper.finish()]
}
