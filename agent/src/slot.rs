//! Writing a slot: `dir` slots are unpacked in place; `image` and `block`
//! slots are unpacked into a staging folder in the state directory, then
//! turned into an ext4 filesystem by `mkfs.ext4 -d` (nothing is mounted).

use crate::config::SlotKind;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where layers are unpacked for a slot, emptied first.
pub fn prepare(kind: SlotKind, slot: &Path, state_dir: &Path) -> anyhow::Result<PathBuf> {
    let root = match kind {
        SlotKind::Dir => slot.to_path_buf(),
        SlotKind::Image | SlotKind::Block => state_dir.join("staging"),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let fd = std::fs::File::open(&root).with_context(|| format!("opening {}", root.display()))?;
    crate::unpack::empty_dir(std::os::fd::AsFd::as_fd(&fd))
        .with_context(|| format!("emptying {}", root.display()))?;
    Ok(root)
}

fn du(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(m) = e.path().symlink_metadata() {
                total += m.len().div_ceil(4096) * 4096 + 256;
                if m.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    total
}

fn mkfs(staging: &Path, target: &Path, size: Option<u64>) -> anyhow::Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-F", "-q", "-E", "root_owner=0:0", "-d"])
        .arg(staging)
        .arg(target);
    if let Some(s) = size {
        cmd.arg(format!("{}k", s / 1024));
    }
    let out = cmd
        .output()
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes the unpacked tree durable in the slot.
pub fn finish(kind: SlotKind, root: &Path, slot: &Path) -> anyhow::Result<()> {
    match kind {
        SlotKind::Dir => {
            let fd = std::fs::File::open(root)?;
            rustix::fs::syncfs(&fd).context("syncing the slot")?;
        }
        SlotKind::Image => {
            // Room for the files, ext4's own metadata and some slack.
            let size = (du(root) * 5 / 4 + (32 << 20)).div_ceil(1 << 20) << 20;
            let tmp = slot.with_extension("sluice-new");
            let _ = std::fs::remove_file(&tmp);
            mkfs(root, &tmp, Some(size))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, slot)?;
            crate::fsutil::sync_dir(slot.parent().unwrap_or(Path::new(".")))?;
        }
        SlotKind::Block => {
            mkfs(root, slot, None)?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(slot)?
                .sync_all()?;
        }
    }
    Ok(())
}
