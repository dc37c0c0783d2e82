//! Helpers shared by the agent's tests and the end-to-end tests
//! (`tests/src/lib.rs` includes this file): every entry under a folder and
//! what the reference tools make of an image, to compare slots; tar entries
//! for test layers; how an agent run ended.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A file in a tree: mode, uid, gid, and content (or link target).
pub type Entry = (u32, u32, u32, Vec<u8>);

/// Every entry under a folder, by relative path.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            out.insert(
                p.strip_prefix(dir).unwrap().to_path_buf(),
                (m.mode(), m.uid(), m.gid(), content),
            );
        }
    }
    out
}

/// What `umoci raw unpack` makes of `image` (`host:port/repo@digest`), copied
/// out of the plain-HTTP registry with `skopeo copy`: the reference result of
/// applying the image's layers in order.
pub fn umoci_tree(image: &str) -> BTreeMap<PathBuf, Entry> {
    let d = tempfile::tempdir().unwrap();
    let layout = d.path().join("layout");
    let st = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:t", layout.display()))
        .status()
        .expect("skopeo is installed");
    assert!(st.success(), "skopeo copy {image}");
    let rootfs = d.path().join("rootfs");
    let mut c = std::process::Command::new("umoci");
    c.args(["raw", "unpack"]);
    if !rustix::process::geteuid().is_root() {
        c.arg("--rootless");
    }
    let st = c
        .arg("--image")
        .arg(format!("{}:t", layout.display()))
        .arg(&rootfs)
        .status()
        .expect("umoci is installed");
    assert!(st.success(), "umoci raw unpack");
    tree(&rootfs)
}

/// `image` (`host:port/repo@digest`, in the plain-HTTP test registry)
/// copied to `dest` (`host:port/repo:tag`) with its layers recompressed as
/// `format` (`zstd`, `zstd:chunked`, `gzip`), the way `skopeo copy
/// --dest-compress-format` and podman push them; answers the new manifest's
/// bytes. Through folders, decompressed then recompressed, and pushed with
/// its digests kept: copied straight, skopeo would mount the gzip blobs its
/// cache knows hold the same layers.
pub fn recompress(image: &str, format: &str, dest: &str) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let plain = format!("oci:{}:t", d.path().join("plain").display());
    let packed = format!("oci:{}:t", d.path().join("packed").display());
    let skopeo = |args: &[&str]| {
        let out = std::process::Command::new("skopeo")
            .args(args)
            .output()
            .expect("skopeo is installed");
        assert!(
            out.status.success(),
            "skopeo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let src = format!("docker://{image}");
    skopeo(&[
        "copy",
        "-q",
        "--src-tls-verify=false",
        "--dest-decompress",
        &src,
        &plain,
    ]);
    skopeo(&[
        "copy",
        "-q",
        "--dest-compress-format",
        format,
        &plain,
        &packed,
    ]);
    let dest = format!("docker://{dest}");
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &packed,
        &dest,
    ]);
    skopeo(&["inspect", "--raw", "--tls-verify=false", &dest])
}

/// Appends an entry to a test layer: `kind` at `path` with `mode`, owned by
/// `uid`:`uid`, holding `data` or linking to `link`.
pub fn tar_entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    if let Some(l) = link {
        h.set_link_name(l).unwrap();
    }
    b.append_data(&mut h, path, data).unwrap();
}

/// Asserts an agent run succeeded; its standard output.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "agent failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `check`'s output, asserting its exit status: 100 exactly when it says an
/// update is available, 0 otherwise.
pub fn checked(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let want = if stdout.contains("update available") {
        100
    } else {
        0
    };
    assert_eq!(
        out.status.code(),
        Some(want),
        "check exited {}: {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Asserts an agent run failed with a one-line reason containing `want`.
pub fn refused(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agent succeeded: {err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("sluice-agent: error: ") && last.contains(want),
        "last line {last:?} lacks {want:?}; stderr: {err}"
    );
}
