//! Every entry under a folder, and what the reference tools make of an image,
//! to compare slots: shared by the agent's tests and the end-to-end tests
//! (`tests/src/lib.rs` includes this file).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
