//! Writing a slot: `dir` slots are unpacked in place; `image` and `block`
//! slots are unpacked into a staging folder in the state directory, then
//! turned into an ext4 filesystem by `mkfs.ext4 -d` (nothing is mounted).
//! The folder is closed (0700) from before it is emptied until the image is
//! verified, and emptied again when the write fails.

use crate::config::SlotKind;
use anyhow::{Context, bail};
use std::io::Seek;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where layers are unpacked for a slot: closed (0700), then emptied.
pub fn prepare(kind: SlotKind, slot: &Path, state_dir: &Path) -> anyhow::Result<PathBuf> {
    let root = match kind {
        SlotKind::Dir => slot.to_path_buf(),
        SlotKind::Image | SlotKind::Block => state_dir.join("staging"),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    discard(&root)?;
    Ok(root)
}

/// Closes the folder layers are unpacked in (0700) and empties it: what a
/// failed write leaves, which may hold bytes that never verified.
pub fn discard(root: &Path) -> anyhow::Result<()> {
    let fd = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o700))
        .with_context(|| format!("closing {}", root.display()))?;
    crate::unpack::empty_dir(fd.as_fd()).with_context(|| format!("emptying {}", root.display()))
}

/// The most bytes of tar stream an image may unpack to in this slot when
/// the configuration does not say: the free space where it is unpacked
/// (`root`, emptied), and no more than the image file's file system has
/// free or the block device holds.
pub fn capacity(kind: SlotKind, slot: &Path, root: &Path) -> anyhow::Result<u64> {
    let free = |p: &Path| -> anyhow::Result<u64> {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        crate::unpack::free_bytes(&f).with_context(|| format!("free space of {}", p.display()))
    };
    let staging = free(root)?;
    Ok(match kind {
        SlotKind::Dir => staging,
        SlotKind::Image => staging.min(free(parent(slot))?),
        SlotKind::Block => {
            let size = std::fs::File::open(slot)
                .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
                .with_context(|| format!("size of slot {}", slot.display()))?;
            staging.min(size)
        }
    })
}

fn parent(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
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
            crate::fsutil::sync_dir(parent(slot))?;
        }
        SlotKind::Block => {
            mkfs(root, slot, None)?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(slot)?
                .sync_all()?;
        }
    }
    if kind != SlotKind::Dir {
        // The staging copy stays until the next write empties it: closed.
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    Ok(())
}

/// A cheap fingerprint of a written slot, taken once it is verified and
/// compared before GRUB is armed, so a slot changed while it waited (a
/// mount, a format, files added or removed at its top) is written again
/// rather than booted. `dir`: the folder's inode, mode, times; `image`:
/// the file's inode, size and times and its ext4 superblock; `block`: the
/// superblock (mount counts and times, free counts, the UUID a new format
/// changes). Not a digest of the content: reading the whole slot again
/// would cost as much as writing it.
pub fn seal(kind: SlotKind, slot: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = |m: &std::fs::Metadata| {
        format!(
            "ino={} mode={:o} size={} mtime={}.{} ctime={}.{}",
            m.ino(),
            m.mode(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )
    };
    let superblock = || -> anyhow::Result<String> {
        use std::io::Read;
        let mut f = std::fs::File::open(slot)?;
        f.seek(std::io::SeekFrom::Start(1024))?;
        let mut sb = vec![0u8; 1024];
        f.read_exact(&mut sb)?;
        Ok(sluice_protocol::sha256_digest(&sb))
    };
    let m = std::fs::metadata(slot).with_context(|| format!("reading {}", slot.display()))?;
    Ok(match kind {
        SlotKind::Dir => format!("dir {}", meta(&m)),
        SlotKind::Image => format!(
            "image {} sb={}",
            meta(&m),
            superblock().with_context(|| format!("reading {}", slot.display()))?
        ),
        SlotKind::Block => format!(
            "block sb={}",
            superblock().with_context(|| format!("reading {}", slot.display()))?
        ),
    })
}
