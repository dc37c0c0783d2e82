//! Privileged metadata held back until every layer of the image is
//! verified: set-id bits of regular files, file capabilities, and the
//! owner and mode of device nodes (made 0000 root:root until then). Until
//! [`Held::apply`] nothing in the slot grants more than its owner had,
//! whatever bytes a registry served; if a blob then fails its digest, the
//! slot is emptied and nothing was ever set-id.
//!
//! Each item keeps a descriptor of its inode: a later layer that removes or
//! replaces the file drops its last name, and the item is skipped (the inode
//! cannot be reused for another file while the descriptor is open); an inode
//! that lives on under a hard link gets its bits, as the layers say.

use super::UnpackError;
use rustix::fs::{AtFlags, Mode, XattrFlags};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Most items held for one image (set-id files, files with capabilities,
/// device nodes): a real OS has tens, and each holds a descriptor.
pub const MAX_HELD: usize = 4096;

/// One item.
enum Item {
    /// A regular file's whole mode (with its set-id bits) and capabilities.
    File {
        fd: OwnedFd,
        mode: u32,
        caps: Option<Vec<u8>>,
    },
    /// A device node (an `O_PATH` descriptor): its mode and owner.
    Device {
        fd: OwnedFd,
        mode: u32,
        owner: Option<(rustix::fs::Uid, rustix::fs::Gid)>,
    },
}

/// The items held for one image, in the order the layers gave them.
pub(super) struct Held {
    items: Vec<Item>,
}

impl Held {
    pub(super) fn new() -> Held {
        // Room for a descriptor per item beside the agent's own.
        let want = (MAX_HELD + 1024) as u64;
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        if lim.current.is_some_and(|c| c < want) {
            let current = Some(lim.maximum.map_or(want, |m| m.min(want)));
            let _ = rustix::process::setrlimit(
                rustix::process::Resource::Nofile,
                rustix::process::Rlimit {
                    current,
                    maximum: lim.maximum,
                },
            );
        }
        Held { items: Vec::new() }
    }

    fn push(&mut self, item: Item) -> Result<(), UnpackError> {
        if self.items.len() >= MAX_HELD {
            return Err(UnpackError::TooManyHeld(MAX_HELD));
        }
        self.items.push(item);
        Ok(())
    }

    /// Holds a regular file's set-id bits (`mode` is its whole mode) and
    /// capabilities, through a descriptor of it.
    pub(super) fn file(
        &mut self,
        file: &std::fs::File,
        mode: u32,
        caps: Option<Vec<u8>>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        if self.items.len() >= MAX_HELD {
            return Err(UnpackError::TooManyHeld(MAX_HELD));
        }
        let fd = file
            .try_clone()
            .map_err(|e| UnpackError::io(format!("holding {shown}"), e))?;
        self.push(Item::File {
            fd: fd.into(),
            mode,
            caps,
        })
    }

    /// Holds a device node's mode and owner; `fd` is an `O_PATH` descriptor.
    pub(super) fn device(
        &mut self,
        fd: OwnedFd,
        mode: u32,
        owner: Option<(rustix::fs::Uid, rustix::fs::Gid)>,
    ) -> Result<(), UnpackError> {
        self.push(Item::Device { fd, mode, owner })
    }

    /// Gives every item that is still in the tree what the layers said.
    pub(super) fn apply(&mut self) -> Result<(), UnpackError> {
        let err = |what: &str, e: rustix::io::Errno| {
            UnpackError::io(format!("{what}, held until the image was verified"), e)
        };
        for item in self.items.drain(..) {
            match item {
                Item::File { fd, mode, caps } => {
                    if gone(&fd)? {
                        continue;
                    }
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
                        .map_err(|e| err("setting set-id bits", e))?;
                    if let Some(c) = caps {
                        rustix::fs::fsetxattr(&fd, CAPS, &c, XattrFlags::empty())
                            .map_err(|e| err("setting file capabilities", e))?;
                    }
                }
                Item::Device { fd, mode, owner } => {
                    if gone(&fd)? {
                        continue;
                    }
                    if let Some((u, g)) = owner {
                        rustix::fs::chownat(&fd, "", Some(u), Some(g), AtFlags::EMPTY_PATH)
                            .map_err(|e| err("setting a device node's owner", e))?;
                    }
                    // fchmod does not take an O_PATH descriptor; its proc
                    // link does, without opening the device.
                    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
                    rustix::fs::chmodat(
                        rustix::fs::CWD,
                        link.as_str(),
                        Mode::from_raw_mode(mode),
                        AtFlags::empty(),
                    )
                    .map_err(|e| err("setting a device node's mode", e))?;
                }
            }
        }
        Ok(())
    }
}

/// The xattr holding file capabilities.
pub(super) const CAPS: &str = "security.capability";

/// Whether a later layer removed every name of the inode.
fn gone(fd: &OwnedFd) -> Result<bool, UnpackError> {
    let st = rustix::fs::fstat(fd.as_fd())
        .map_err(|e| UnpackError::io("examining an item held until the image was verified", e))?;
    Ok(st.st_nlink == 0)
}
