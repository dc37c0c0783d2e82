//! Durable file writes: a new file is written beside the old one, synced, and
//! renamed over it, then the directory is synced, so a reader (or a reboot)
//! sees the old bytes or the new ones, never a mix. The new file is private
//! (0600) from the moment it exists and never reached through a link.

use crate::failpoint;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How [`stage`] names the file it writes beside `NAME`: `.NAME` and this.
const TEMPORARY_SUFFIX: &str = ".sluice-new";

/// Replaces `path` with `bytes` atomically and durably, mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    stage(path, |f| f.write_all(bytes))?.commit()
}

/// A file written and synced beside `path` ([`stage`]), not yet in place:
/// [`Staged::commit`] renames it over `path`; dropped uncommitted, it is
/// removed.
pub struct Staged {
    tmp: Option<PathBuf>,
    path: PathBuf,
}

/// Writes what `write` writes (through a buffer) to a new private file
/// beside `path` and syncs it, for [`Staged::commit`] to put in place later.
pub fn stage(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> std::io::Result<Staged> {
    failpoint::hit("write: before");
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}{TEMPORARY_SUFFIX}", name.to_string_lossy()));
    // A temporary left by a crash (or planted) is removed, never opened:
    // unlink does not follow a link, and O_EXCL | O_NOFOLLOW then refuse
    // anything that appears in its place.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_CLOEXEC)
        .open(&tmp)?;
    let staged = Staged {
        tmp: Some(tmp),
        path: path.to_path_buf(),
    };
    let mut w = BufWriter::new(f);
    write(&mut w)?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    failpoint::hit("write: temporary synced");
    Ok(staged)
}

impl Staged {
    /// Renames the file over its path, durably.
    pub fn commit(mut self) -> std::io::Result<()> {
        let tmp = self.tmp.take().expect("a staged file is committed once");
        fs::rename(&tmp, &self.path)?;
        failpoint::hit("write: renamed");
        // On FAT (the partition GRUB's environment block lives on) the
        // renamed file's directory entry is written with the file's inode,
        // not with the directory: without this sync a power cut after the
        // rename can leave the old entry pointing at clusters the rename
        // already freed (seen under QEMU, tests/tests/it/vm.rs). Elsewhere it
        // costs one cheap fsync.
        OpenOptions::new()
            .read(true)
            .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_CLOEXEC)
            .open(&self.path)?
            .sync_all()?;
        sync_dir(parent_dir(&self.path))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Removes from `dir` the temporaries [`stage`] left there: those of a
/// process killed between writing one and renaming it. Only for a folder
/// whose writers are all stopped (or locked out): a live writer's
/// temporary would go too. Each would be removed before its own file's next
/// write anyway, but that may be long in coming. `remove_file` removes a
/// link, never what it points to.
pub fn remove_temporaries(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(TEMPORARY_SUFFIX)) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes `path` (absent is fine) and syncs its directory, so a reboot
/// does not bring it back.
pub fn remove_durably(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent_dir(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The open flags `std` has no names for, from rustix's.
mod libc_flags {
    pub const O_NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    pub const O_CLOEXEC: i32 = rustix::fs::OFlags::CLOEXEC.bits() as i32;
}

/// Flushes a directory's entries (after a rename or create in it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_contents_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    /// A stale temporary (a crash) or a link planted in its place is
    /// replaced, not written through; the result is private.
    #[test]
    fn stale_temporaries_and_links_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let outside = d.path().join("outside");
        std::os::unix::fs::symlink(&outside, d.path().join(".f.sluice-new")).unwrap();
        write_atomic(&p, b"secret").unwrap();
        assert!(!outside.exists());
        fs::write(d.path().join(".f.sluice-new"), b"half").unwrap();
        write_atomic(&p, b"again").unwrap();
        let m = fs::symlink_metadata(&p).unwrap();
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"again");
    }

    /// A staged file is invisible at its path until committed, and gone
    /// when dropped instead.
    #[test]
    fn a_staged_file_appears_only_when_committed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let staged = stage(&p, |w| w.write_all(b"later")).unwrap();
        assert!(!p.exists());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        staged.commit().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"later");
        drop(stage(&p, |w| w.write_all(b"never")).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"later");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        // A failed write leaves nothing either.
        let err = stage(&p, |_| Err(std::io::Error::other("disk full")));
        assert!(err.is_err());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
