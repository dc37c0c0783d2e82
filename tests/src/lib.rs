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

#[path = "../../agent/tests/it/common/device.rs"]
mod device;
pub use device::{Device, DeviceOpts, Health, PARTITION_BYTES};
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
