//! Applies OCI layers (tar streams) to a slot directory: whiteouts, modes,
//! ownership, xattrs, hard links, and no way out of the slot. Every parent
//! directory is resolved with `openat2(RESOLVE_IN_ROOT)` from the slot's root,
//! so a symlink in the tree (absolute or with `..`) resolves as it will once
//! the slot is `/`, and can never reach outside it; the final component is
//! never followed.
//!
//! Nothing is trusted before the whole image is verified: tar header records
//! are capped before they are read ([`guard`]), the slot root stays 0700, and
//! set-id bits, file capabilities and device nodes' modes are held until
//! [`Unpacker::commit`] ([`held`]).

pub mod guard;
mod held;

pub use guard::{MAX_LONG_NAME, MAX_PAX, MAX_SPARSE_BLOCKS};
pub use held::MAX_HELD;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry tried to leave the slot.
    #[error("layer entry {path:?} refused: {why}")]
    Escape {
        /// The entry's path as written in the layer.
        path: String,
        /// What was wrong with it.
        why: &'static str,
    },
    /// A device node, and the configuration does not allow them.
    #[error(
        "layer entry {0:?} is a device node: refused (set slots.allow_devices = true to keep them)"
    )]
    Device(String),
    /// A whiteout that names nothing valid.
    #[error("layer entry {0:?} is a malformed whiteout")]
    BadWhiteout(String),
    /// An entry type Sluice does not unpack.
    #[error("layer entry {path:?} has unsupported type {kind}")]
    Unsupported {
        /// The entry's path.
        path: String,
        /// The tar type byte.
        kind: u8,
    },
    /// The image unpacks to more than the configured cap (a gzip bomb, or a slot too small).
    #[error("image unpacks to more than {0} bytes: refused")]
    TooLarge(u64),
    /// A tar header record (GNU long name or link, PAX header, sparse map)
    /// larger than its cap, refused before it was read.
    #[error("tar {what} of {size} is larger than the cap of {cap}: refused")]
    Record {
        /// What the record is.
        what: &'static str,
        /// Its size: bytes, or blocks of a sparse map.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// A path, link name or xattr longer than the system takes.
    #[error("layer entry {path:?}: {what} of {len} bytes is longer than {cap} bytes: refused")]
    TooLong {
        /// The entry's path (cut short).
        path: String,
        /// What is too long.
        what: String,
        /// Its length.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// More set-id files, files with capabilities and device nodes than are
    /// held until the image is verified.
    #[error(
        "image has more than {0} set-id files, files with capabilities and device nodes: refused"
    )]
    TooManyHeld(usize),
    /// A layer media type Sluice does not unpack.
    #[error("layer media type {0:?} is not supported: publish gzip, zstd or plain tar layers")]
    UnsupportedMedia(String),
    /// The tar stream or the slot failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl UnpackError {
    pub(crate) fn io(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        UnpackError::Io {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `tar+gzip`.
    Gzip,
    /// `tar+zstd`, `zstd:chunked` included (a plain zstd decoder skips its
    /// table of contents, which sits in skippable frames).
    Zstd,
    /// Plain `tar`.
    None,
}

pub use sluice_protocol::chunked::ZSTD_WINDOW_LOG_MAX;

/// The compression of a layer media type; unknown encodings are refused.
pub fn layer_compression(media_type: &str) -> Result<Compression, UnpackError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Compression::Zstd),
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        other => Err(UnpackError::UnsupportedMedia(other.to_string())),
    }
}

impl Compression {
    /// `blob` decompressed: gzip members one after the other, zstd frames
    /// one after the other (skippable frames skipped) with a window of at
    /// most [`ZSTD_WINDOW_LOG_MAX`].
    pub fn decoder<'a, R: Read + 'a>(self, blob: R) -> std::io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::new(blob)?;
                d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
                Box::new(ZstdErrors(d))
            }
            Compression::None => Box::new(blob),
        })
    }
}

/// Names the one libzstd error a person cannot act on ("Frame requires too
/// much memory for decoding": the window); every other error, the blob's
/// own (digest, size, timeout) included, passes unchanged.
struct ZstdErrors<R>(R);

impl<R: Read> Read for ZstdErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.get_ref().is_some() && e.to_string().contains("too much memory") {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "the zstd layer needs a window larger than {} MiB ({e}): \
                         compress it without --long or --ultra",
                        (1u64 << ZSTD_WINDOW_LOG_MAX) >> 20
                    ),
                )
            } else {
                e
            }
        })
    }
}

/// How layers are applied.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Create device nodes (char and block) found in layers; otherwise refuse them.
    pub allow_devices: bool,
    /// Keep uid/gid from the layer (needs root); otherwise files belong to the agent.
    pub preserve_owner: bool,
    /// Most bytes of tar stream (headers and data, after decompression) all
    /// layers of one image may produce, counting the holes of sparse files,
    /// which the stream does not carry but the slot receives. `None`: what
    /// the slot's file system has free when the unpacker starts.
    pub max_bytes: Option<u64>,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            allow_devices: false,
            preserve_owner: rustix::process::geteuid().is_root(),
            max_bytes: None,
        }
    }
}

/// Longest path or link name a layer may give (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Largest xattr value (Linux's `XATTR_SIZE_MAX`).
const MAX_XATTR_VALUE: usize = 64 << 10;
/// Longest xattr name (Linux's `XATTR_NAME_MAX`).
const MAX_XATTR_NAME: usize = 255;
/// Largest `security.capability` value (version 3 is 24 bytes).
const MAX_CAPS: usize = 64;

/// Bytes free for an unprivileged writer on the file system of `dir`.
pub fn free_bytes(dir: impl AsFd) -> std::io::Result<u64> {
    let st = rustix::fs::fstatvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// What one layer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or replaced.
    pub entries: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
    /// Bytes of tar stream read.
    pub bytes: u64,
}

/// Applies layers, in order, to one slot root.
pub struct Unpacker {
    root: OwnedFd,
    opts: UnpackOptions,
    /// The cap on tar stream bytes.
    cap: u64,
    /// Set-id bits, capabilities and device modes, until [`Unpacker::commit`].
    held: held::Held,
    /// The owner, mode and xattrs the layers give the slot root (`./`),
    /// also until [`Unpacker::commit`].
    root_meta: Option<Meta>,
    /// Bytes of tar stream still allowed; shared with the reader the archive holds.
    budget: Cell<u64>,
    /// The last parent directory opened, reused while entries stay in it.
    cached: Option<(PathBuf, OwnedFd)>,
    /// The buffer file contents pass through, allocated once.
    buf: Vec<u8>,
    /// Fills small files while the next entries are made.
    writer: Writer,
}

/// Counts and caps the bytes of a decompressed layer.
struct Capped<'a, R> {
    inner: R,
    budget: &'a Cell<u64>,
    read: u64,
    cap: u64,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        charge(self.budget, n as u64, self.cap).map_err(std::io::Error::other)?;
        self.read += n as u64;
        Ok(n)
    }
}

#[derive(Debug)]
struct CapExceeded(u64);
impl std::fmt::Display for CapExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {} bytes", self.0)
    }
}
impl std::error::Error for CapExceeded {}

/// Takes `n` bytes from the budget, or refuses when fewer are left.
fn charge(budget: &Cell<u64>, n: u64, cap: u64) -> Result<(), CapExceeded> {
    let left = budget.get().checked_sub(n).ok_or(CapExceeded(cap))?;
    budget.set(left);
    Ok(())
}

fn map_cap(e: std::io::Error, what: &str) -> UnpackError {
    let inner = e.get_ref();
    if let Some(c) = inner.and_then(|i| i.downcast_ref::<CapExceeded>()) {
        return UnpackError::TooLarge(c.0);
    }
    if let Some(r) = inner.and_then(|i| i.downcast_ref::<guard::TooBig>()) {
        return UnpackError::Record {
            what: r.what,
            size: r.size,
            cap: r.cap,
        };
    }
    UnpackError::io(what, e)
}

/// Refuses a path, link name or xattr longer than `cap`.
fn too_long(
    shown: &str,
    what: impl Into<String>,
    len: usize,
    cap: usize,
) -> Result<(), UnpackError> {
    if len <= cap {
        return Ok(());
    }
    Err(UnpackError::TooLong {
        path: shown.chars().take(200).collect(),
        what: what.into(),
        len,
        cap,
    })
}

/// Splits an entry path into normal components; `..` and absolute paths are refused.
fn components(raw: &Path) -> Result<Vec<OsString>, UnpackError> {
    let mut out = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(UnpackError::Escape {
                    path: raw.display().to_string(),
                    why: "`..` in path",
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::Escape {
                    path: raw.display().to_string(),
                    why: "absolute path",
                });
            }
        }
    }
    Ok(out)
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

fn join(parts: &[OsString]) -> PathBuf {
    let mut p = PathBuf::new();
    for c in parts {
        p.push(c);
    }
    p
}

impl Unpacker {
    /// An unpacker writing into the directory `root`, which it closes to
    /// everyone but its owner (0700) until [`Unpacker::commit`].
    pub fn new(root: &Path, opts: UnpackOptions) -> Result<Self, UnpackError> {
        let shown = root.display();
        let root = rustix::fs::open(root, DIR_FLAGS, Mode::empty())
            .map_err(|e| UnpackError::io(format!("opening slot {shown}"), e))?;
        rustix::fs::fchmod(&root, Mode::from_raw_mode(0o700))
            .map_err(|e| UnpackError::io(format!("closing slot {shown}"), e))?;
        let cap = match opts.max_bytes {
            Some(c) => c,
            None => free_bytes(&root)
                .map_err(|e| UnpackError::io(format!("free space of slot {shown}"), e))?,
        };
        Ok(Unpacker {
            root,
            budget: Cell::new(cap),
            cap,
            held: held::Held::new(),
            root_meta: None,
            opts,
            cached: None,
            buf: vec![0u8; COPY_BUF],
            writer: Writer::start(),
        })
    }

    /// Applies one uncompressed layer (a tar stream). On error the slot holds
    /// a partial layer: the caller must not boot it. Set-id bits,
    /// capabilities, device modes and the root's mode wait for
    /// [`Unpacker::commit`].
    pub fn apply<R: Read>(&mut self, layer: R) -> Result<LayerStats, UnpackError> {
        let applied = self.apply_entries(layer);
        // Every file of the layer is written before it counts as applied.
        let written = self.writer.wait();
        let stats = applied?;
        written?;
        Ok(stats)
    }

    fn apply_entries<R: Read>(&mut self, layer: R) -> Result<LayerStats, UnpackError> {
        let mut stats = LayerStats::default();
        let mut capped = Capped {
            inner: layer,
            budget: &self.budget,
            read: 0,
            cap: self.cap,
        };
        // Header records are capped before the tar reader sees them.
        let mut guarded = guard::Guard::new(&mut capped);
        // Paths this layer created: whiteouts only hide what lower layers made.
        let mut ours = Ours::default();
        let mut archive = tar::Archive::new(&mut guarded);
        let entries = archive.entries().map_err(|e| map_cap(e, "reading layer"))?;
        let root = &self.root;
        let cached = &mut self.cached;
        let buf = &mut self.buf;
        let writer = &self.writer;
        let held = &mut self.held;
        for entry in entries {
            let mut entry = entry.map_err(|e| map_cap(e, "reading layer"))?;
            let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            too_long(&shown, "path", entry.path_bytes().len(), MAX_PATH)?;
            if let Some(l) = entry.link_name_bytes() {
                too_long(&shown, "link name", l.len(), MAX_PATH)?;
            }
            let raw = entry
                .path()
                .map_err(|e| map_cap(e, "reading entry path"))?
                .into_owned();
            let shown = raw.display().to_string();
            let parts = components(&raw)?;
            let Some((name, parent)) = parts.split_last() else {
                // The root itself (`./`): only a directory may stand there.
                // Its owner and mode wait for the commit; until then it is 0700.
                if entry.header().entry_type().is_dir() {
                    self.root_meta = Some(Meta::of(&mut entry, &self.opts, &shown)?);
                    continue;
                }
                return Err(UnpackError::Escape {
                    path: shown,
                    why: "a non-directory entry may not replace the slot root",
                });
            };
            let name_bytes = name.as_bytes();
            if let Some(target) = name_bytes.strip_prefix(b".wh.") {
                if target != b".wh..opq"
                    && (target.is_empty()
                        || target == b"."
                        || target == b".."
                        || target.starts_with(b".wh."))
                {
                    return Err(UnpackError::BadWhiteout(shown));
                }
                *cached = None;
                let pfd = match resolve_dir(root, parent, false) {
                    Ok(fd) => fd,
                    // Nothing below to hide.
                    Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {
                        stats.whiteouts += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(UnpackError::io(format!("whiteout {shown}"), e));
                    }
                };
                if target == b".wh..opq" {
                    clear_dir(pfd.as_fd(), parent, &ours)
                        .map_err(|e| UnpackError::io(format!("opaque whiteout {shown}"), e))?;
                } else {
                    let t = OsStr::from_bytes(target);
                    let mut tp = join(parent);
                    tp.push(t);
                    if !ours.contains(&tp) {
                        remove_at(pfd.as_fd(), t)
                            .map_err(|e| UnpackError::io(format!("whiteout {shown}"), e))?;
                    }
                }
                stats.whiteouts += 1;
                continue;
            }
            let kind = entry.header().entry_type();
            let (key, parent_fd) = take_parent(root, cached.take(), parent, &shown)?;
            let pfd = parent_fd.as_fd();
            // Whether a directory or symlink changed, so the cached parent may be stale.
            let mut stale = false;
            match kind {
                tar::EntryType::Directory => {
                    let dir_mode = entry.header().mode().unwrap_or(0o755);
                    match rustix::fs::statat(pfd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                        Ok(_) => {
                            remove_at(pfd, name)
                                .map_err(|e| UnpackError::io(format!("replacing {shown}"), e))?;
                            stale = true;
                            mkdir(pfd, name, dir_mode, &shown)?;
                        }
                        Err(Errno::NOENT) => mkdir(pfd, name, dir_mode, &shown)?,
                        Err(e) => return Err(UnpackError::io(format!("examining {shown}"), e)),
                    }
                    let dir = rustix::fs::openat(pfd, name.as_os_str(), DIR_FLAGS, Mode::empty())
                        .map_err(|e| UnpackError::io(format!("opening {shown}"), e))?;
                    set_meta(dir.as_fd(), &mut entry, &self.opts, &shown, false)?;
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    if kind == tar::EntryType::GNUSparse {
                        // Holes come out as zeros the stream never carried: a
                        // 2 KiB layer could otherwise write gigabytes.
                        let data = entry.header().entry_size().unwrap_or(0);
                        let holes = entry.size().saturating_sub(data);
                        charge(&self.budget, holes, self.cap)
                            .map_err(|c| UnpackError::TooLarge(c.0))?;
                    }
                    // Made with its mode where the umask leaves that
                    // alone (set-id and sticky bits wait for the owner), so
                    // `set_meta` has nothing to change.
                    let mode = entry.header().mode().unwrap_or(0o600) & 0o777;
                    let create = || {
                        rustix::fs::openat(
                            pfd,
                            name.as_os_str(),
                            OFlags::WRONLY
                                | OFlags::CREATE
                                | OFlags::EXCL
                                | OFlags::NOFOLLOW
                                | OFlags::CLOEXEC,
                            Mode::from_raw_mode(mode),
                        )
                    };
                    // Most entries land where nothing stands: try that
                    // first, and replace what is there only when needed.
                    let fd = match create() {
                        Err(Errno::EXIST) => {
                            stale |= replace(pfd, name, &shown)?;
                            create()
                        }
                        r => r,
                    }
                    .map_err(|e| UnpackError::io(format!("creating {shown}"), e))?;
                    let mut file = std::fs::File::from(fd);
                    let mut meta = Meta::of(&mut entry, &self.opts, &shown)?;
                    if let Some((mode, caps)) = meta.held.take() {
                        held.file(&file, mode, caps, &shown)?;
                    }
                    if kind != tar::EntryType::GNUSparse && entry.size() <= SMALL_FILE {
                        let mut data = Vec::with_capacity(entry.size() as usize);
                        entry
                            .read_to_end(&mut data)
                            .map_err(|e| map_cap(e, &shown))?;
                        writer.send(Job::File {
                            file,
                            data,
                            meta,
                            shown: shown.clone(),
                        })?;
                    } else {
                        copy(&mut entry, &mut file, buf).map_err(|e| map_cap(e, &shown))?;
                        meta.apply(file.as_fd(), &shown, true)?;
                    }
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| map_cap(e, &shown))?
                        .ok_or_else(|| UnpackError::Escape {
                            path: shown.clone(),
                            why: "symlink without a target",
                        })?
                        .into_owned();
                    replace(pfd, name, &shown)?;
                    rustix::fs::symlinkat(target.as_os_str(), pfd, name.as_os_str())
                        .map_err(|e| UnpackError::io(format!("creating symlink {shown}"), e))?;
                    if self.opts.preserve_owner {
                        let h = entry.header();
                        rustix::fs::chownat(
                            pfd,
                            name.as_os_str(),
                            Some(uid(h)),
                            Some(gid(h)),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                        .map_err(|e| UnpackError::io(format!("chown {shown}"), e))?;
                    }
                    let t = mtime(entry.header());
                    rustix::fs::utimensat(pfd, name.as_os_str(), &t, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| UnpackError::io(format!("times of {shown}"), e))?;
                    // A symlink may now stand where a cached directory path went through.
                    stale = true;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| map_cap(e, &shown))?
                        .ok_or_else(|| UnpackError::Escape {
                            path: shown.clone(),
                            why: "hard link without a target",
                        })?
                        .into_owned();
                    let tparts = components(&target).map_err(|_| UnpackError::Escape {
                        path: shown.clone(),
                        why: "hard link target outside the slot",
                    })?;
                    let Some((tname, tparent)) = tparts.split_last() else {
                        return Err(UnpackError::Escape {
                            path: shown,
                            why: "hard link to the slot root",
                        });
                    };
                    if tparts == parts {
                        return Err(UnpackError::Escape {
                            path: shown,
                            why: "hard link to itself",
                        });
                    }
                    let tfd = resolve_dir(root, tparent, false)
                        .map_err(|e| UnpackError::io(format!("hard link target of {shown}"), e))?;
                    // The target must exist and not be a directory before the old entry goes.
                    match rustix::fs::statat(&tfd, tname.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {}
                        Ok(_) => {
                            return Err(UnpackError::Escape {
                                path: shown,
                                why: "hard link to a directory",
                            });
                        }
                        Err(e) => {
                            return Err(UnpackError::io(
                                format!("hard link {shown} -> {}", target.display()),
                                e,
                            ));
                        }
                    }
                    stale |= replace(pfd, name, &shown)?;
                    rustix::fs::linkat(
                        &tfd,
                        tname.as_os_str(),
                        pfd,
                        name.as_os_str(),
                        AtFlags::empty(),
                    )
                    .map_err(|e| UnpackError::io(format!("hard link {shown}"), e))?;
                }
                tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => {
                    let ft = match kind {
                        tar::EntryType::Fifo => FileType::Fifo,
                        tar::EntryType::Char => FileType::CharacterDevice,
                        _ => FileType::BlockDevice,
                    };
                    if ft != FileType::Fifo && !self.opts.allow_devices {
                        return Err(UnpackError::Device(shown));
                    }
                    let h = entry.header();
                    let dev = rustix::fs::makedev(
                        h.device_major().ok().flatten().unwrap_or(0),
                        h.device_minor().ok().flatten().unwrap_or(0),
                    );
                    stale |= replace(pfd, name, &shown)?;
                    let mode = h.mode().unwrap_or(0o600) & 0o7777;
                    let owner = self.opts.preserve_owner.then(|| (uid(h), gid(h)));
                    if ft != FileType::Fifo {
                        // 0000 root:root (the agent's) until the image is
                        // verified: no one else can open it.
                        rustix::fs::mknodat(pfd, name.as_os_str(), ft, Mode::empty(), dev)
                            .map_err(|e| UnpackError::io(format!("creating node {shown}"), e))?;
                        let fd = rustix::fs::openat(
                            pfd,
                            name.as_os_str(),
                            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(|e| UnpackError::io(format!("holding node {shown}"), e))?;
                        held.device(fd, mode, owner)?;
                    } else {
                        rustix::fs::mknodat(
                            pfd,
                            name.as_os_str(),
                            ft,
                            Mode::from_raw_mode(0o600),
                            dev,
                        )
                        .map_err(|e| UnpackError::io(format!("creating node {shown}"), e))?;
                        if let Some((u, g)) = owner {
                            rustix::fs::chownat(
                                pfd,
                                name.as_os_str(),
                                Some(u),
                                Some(g),
                                AtFlags::SYMLINK_NOFOLLOW,
                            )
                            .map_err(|e| UnpackError::io(format!("chown {shown}"), e))?;
                        }
                        rustix::fs::chmodat(
                            pfd,
                            name.as_os_str(),
                            Mode::from_raw_mode(mode),
                            AtFlags::empty(),
                        )
                        .map_err(|e| UnpackError::io(format!("chmod {shown}"), e))?;
                    }
                }
                other => {
                    return Err(UnpackError::Unsupported {
                        path: shown,
                        kind: other.as_byte(),
                    });
                }
            }
            if !stale {
                *cached = Some((key, parent_fd));
            }
            ours.insert(&join(&parts));
            stats.entries += 1;
        }
        let _ = archive.into_inner();
        // Read to the end of the stream, past the end-of-archive blocks, so a
        // truncated or corrupt gzip member is noticed (and its bytes capped).
        std::io::copy(&mut guarded, &mut std::io::sink())
            .map_err(|e| map_cap(e, "reading the end of the layer"))?;
        stats.bytes = guarded.get_mut().read;
        Ok(stats)
    }

    /// Applies one layer as stored in a registry, by media type: gzip (also
    /// multi-member), zstd (also `zstd:chunked`, read whole) or plain tar;
    /// other encodings are refused.
    pub fn apply_blob<R: Read>(
        &mut self,
        media_type: &str,
        blob: R,
    ) -> Result<LayerStats, UnpackError> {
        let reader = layer_compression(media_type)?
            .decoder(blob)
            .map_err(|e| UnpackError::io("starting the zstd decoder", e))?;
        self.apply(reader)
    }

    /// Once every layer applied is verified: gives set-id files, files with
    /// capabilities and device nodes what the layers said, and the slot root
    /// its owner and mode (0755 unless a layer's `./` says otherwise).
    /// Before this, nothing in the slot grants more than its owner had.
    pub fn commit(&mut self) -> Result<(), UnpackError> {
        self.writer.wait()?;
        self.held.apply()?;
        match self.root_meta.take() {
            Some(m) => m.apply(self.root.as_fd(), "the slot root", false),
            None => rustix::fs::fchmod(&self.root, Mode::from_raw_mode(0o755))
                .map_err(|e| UnpackError::io("opening the slot root", e)),
        }
    }

    /// Flushes everything written to the slot's filesystem to disk.
    pub fn sync(&self) -> Result<(), UnpackError> {
        self.writer.wait()?;
        rustix::fs::syncfs(&self.root).map_err(|e| UnpackError::io("syncing the slot", e))
    }
}

fn mkdir(pfd: BorrowedFd<'_>, name: &OsStr, mode: u32, shown: &str) -> Result<(), UnpackError> {
    rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(mode & 0o777))
        .map_err(|e| UnpackError::io(format!("creating directory {shown}"), e))
}

/// Removes whatever stands at `name` so a new entry can take its place.
/// True when it removed a directory (cached parents may be stale).
fn replace(pfd: BorrowedFd<'_>, name: &OsStr, shown: &str) -> Result<bool, UnpackError> {
    match rustix::fs::statat(pfd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(UnpackError::io(format!("examining {shown}"), e)),
        Ok(st) => {
            remove_at(pfd, name).map_err(|e| UnpackError::io(format!("replacing {shown}"), e))?;
            Ok(FileType::from_raw_mode(st.st_mode) == FileType::Directory)
        }
    }
}

/// Opens a directory below the slot root, creating missing ones (0755, as
/// other unpackers do); symlinks on the way resolve inside the slot.
fn resolve_dir(root: &OwnedFd, parts: &[OsString], create: bool) -> std::io::Result<OwnedFd> {
    let path = join(parts);
    let path = if parts.is_empty() {
        Path::new(".")
    } else {
        path.as_path()
    };
    match rustix::fs::openat2(
        root,
        path,
        DIR_FLAGS.difference(OFlags::NOFOLLOW),
        Mode::empty(),
        RESOLVE,
    ) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) if create => {}
        Err(e) => return Err(e.into()),
    }
    let mut fd = rustix::fs::openat(root, ".", DIR_FLAGS, Mode::empty())?;
    for i in 0..parts.len() {
        match rustix::fs::mkdirat(&fd, parts[i].as_os_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        // Re-resolve from the root, so a symlink component keeps root semantics.
        fd = rustix::fs::openat2(
            root,
            join(&parts[..=i]),
            DIR_FLAGS.difference(OFlags::NOFOLLOW),
            Mode::empty(),
            RESOLVE,
        )?;
    }
    Ok(fd)
}

/// The parent directory of an entry: the cached one if it is the same path.
fn take_parent(
    root: &OwnedFd,
    cached: Option<(PathBuf, OwnedFd)>,
    parent: &[OsString],
    shown: &str,
) -> Result<(PathBuf, OwnedFd), UnpackError> {
    let key = join(parent);
    if let Some((p, fd)) = cached
        && p == key
    {
        return Ok((p, fd));
    }
    let fd = resolve_dir(root, parent, true)
        .map_err(|e| UnpackError::io(format!("opening the parent directory of {shown}"), e))?;
    Ok((key, fd))
}

/// Removes `name` in `dir`, recursively for a directory, never following symlinks.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            let sub = rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?;
            empty_dir(sub.as_fd())?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
            Ok(())
        }
        Ok(_) => Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

fn children(dir: BorrowedFd<'_>) -> std::io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}

/// The paths one layer made, as keyed 64-bit hashes: 16 bytes or so an
/// entry instead of a path's hundred, so a layer of millions of empty
/// entries (a few MB of gzip, before its digest is known) cannot take the
/// memory a set of paths would. The key is random per process, so no layer
/// can aim for a collision (which would only make a whiteout keep a lower
/// entry).
#[derive(Default)]
struct Ours {
    keys: HashSet<u64, std::hash::BuildHasherDefault<Identity>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Ours {
    fn insert(&mut self, p: &Path) {
        self.keys
            .insert(std::hash::BuildHasher::hash_one(&self.hasher, p));
    }

    fn contains(&self, p: &Path) -> bool {
        self.keys
            .contains(&std::hash::BuildHasher::hash_one(&self.hasher, p))
    }
}

/// Hashes a `u64` that already is a keyed hash to itself.
#[derive(Default)]
struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Removes everything inside a directory.
pub fn empty_dir(dir: BorrowedFd<'_>) -> std::io::Result<()> {
    for n in children(dir)? {
        remove_at(dir, &n)?;
    }
    Ok(())
}

/// An opaque whiteout: removes what lower layers put in the directory.
fn clear_dir(dir: BorrowedFd<'_>, at: &[OsString], ours: &Ours) -> std::io::Result<()> {
    let base = join(at);
    for n in children(dir)? {
        if !ours.contains(&base.join(&n)) {
            remove_at(dir, &n)?;
        }
    }
    Ok(())
}

/// Bytes of the buffer file contents pass through.
const COPY_BUF: usize = 128 * 1024;

fn copy(from: &mut impl Read, to: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut n = 0;
    loop {
        let r = match from.read(buf) {
            Ok(0) => return Ok(n),
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..r])?;
        n += r as u64;
    }
}

fn pax_num(entry: &mut tar::Entry<'_, impl Read>, key: &str) -> Option<u64> {
    let exts = entry.pax_extensions().ok()??;
    for e in exts.flatten() {
        if e.key().ok() == Some(key) {
            return e.value().ok()?.parse().ok();
        }
    }
    None
}

fn uid(h: &tar::Header) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(h.uid().unwrap_or(0) as u32)
}

fn gid(h: &tar::Header) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(h.gid().unwrap_or(0) as u32)
}

fn mtime(h: &tar::Header) -> Timestamps {
    let t = Timespec {
        tv_sec: h.mtime().unwrap_or(0) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Owner, mode, xattrs and times of a file or directory, through its descriptor.
fn set_meta<R: Read>(
    fd: BorrowedFd<'_>,
    entry: &mut tar::Entry<'_, R>,
    opts: &UnpackOptions,
    shown: &str,
    times: bool,
) -> Result<(), UnpackError> {
    Meta::of(entry, opts, shown)?.apply(fd, shown, times)
}

/// An entry's owner, mode, xattrs and times, read from its header and PAX
/// records, to be given to what it made.
struct Meta {
    /// When owners are kept.
    owner: Option<(rustix::fs::Uid, rustix::fs::Gid)>,
    mode: u32,
    xattrs: Vec<(String, Vec<u8>)>,
    mtime: Timestamps,
    /// A regular file's whole mode and capabilities, when it has set-id bits
    /// or capabilities: those wait for the commit, `mode` and `xattrs` go
    /// without them.
    held: Option<(u32, Option<Vec<u8>>)>,
}

impl Meta {
    fn of<R: Read>(
        entry: &mut tar::Entry<'_, R>,
        opts: &UnpackOptions,
        shown: &str,
    ) -> Result<Meta, UnpackError> {
        let h = entry.header().clone();
        let owner = if opts.preserve_owner {
            // PAX records override the ustar fields (ids above 2^21).
            let u = pax_num(entry, "uid")
                .map(|u| rustix::fs::Uid::from_raw(u as u32))
                .unwrap_or_else(|| uid(&h));
            let g = pax_num(entry, "gid")
                .map(|g| rustix::fs::Gid::from_raw(g as u32))
                .unwrap_or_else(|| gid(&h));
            Some((u, g))
        } else {
            None
        };
        let file = matches!(
            h.entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
        );
        let mut xattrs = Vec::new();
        let mut caps = None;
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    let what = || format!("xattr {}", name.chars().take(64).collect::<String>());
                    too_long(shown, what(), name.len(), MAX_XATTR_NAME)?;
                    let value = ext.value_bytes();
                    too_long(shown, what(), value.len(), MAX_XATTR_VALUE)?;
                    if file && name == held::CAPS {
                        too_long(shown, what(), value.len(), MAX_CAPS)?;
                        caps = Some(value.to_vec());
                    } else {
                        xattrs.push((name.to_string(), value.to_vec()));
                    }
                }
            }
        }
        let mode = h.mode().map_err(|e| UnpackError::io(shown, e))? & 0o7777;
        let set_id = if file { mode & 0o6000 } else { 0 };
        Ok(Meta {
            owner,
            mode: mode & !set_id,
            xattrs,
            mtime: mtime(&h),
            held: (set_id != 0 || caps.is_some()).then_some((mode, caps)),
        })
    }

    fn apply(&self, fd: BorrowedFd<'_>, shown: &str, times: bool) -> Result<(), UnpackError> {
        // Owner and mode are changed only where they differ from what the
        // entry got when it was made: on a journaled file system each change
        // is an inode update of its own, and most entries already have the
        // owner (root) and mode (created with it) they need. fstat costs no
        // journal.
        let st = rustix::fs::fstat(fd).map_err(|e| UnpackError::io(format!("stat {shown}"), e))?;
        let mut cur_mode = st.st_mode & 0o7777;
        if let Some((u, g)) = self.owner
            && (u.as_raw(), g.as_raw()) != (st.st_uid, st.st_gid)
        {
            rustix::fs::fchown(fd, Some(u), Some(g))
                .map_err(|e| UnpackError::io(format!("chown {shown}"), e))?;
            // chown may have cleared set-id bits.
            cur_mode = u32::MAX;
        }
        if self.mode != cur_mode {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(self.mode))
                .map_err(|e| UnpackError::io(format!("chmod {shown}"), e))?;
        }
        for (name, value) in &self.xattrs {
            rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty())
                .map_err(|e| UnpackError::io(format!("xattr {name} of {shown}"), e))?;
        }
        if times {
            rustix::fs::futimens(fd, &self.mtime)
                .map_err(|e| UnpackError::io(format!("times of {shown}"), e))?;
        }
        Ok(())
    }
}

/// Files up to this size are written by the [`Writer`]; larger ones inline.
const SMALL_FILE: u64 = 64 << 10;
/// Files the writer may have queued: with [`SMALL_FILE`], at most 4 MiB.
const WRITER_QUEUE: usize = 64;

enum Job {
    File {
        file: std::fs::File,
        data: Vec<u8>,
        meta: Meta,
        shown: String,
    },
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Writes small files' contents and metadata on a thread of its own while
/// the unpacker goes on with the next entries. Every name is still made (and
/// replaced, linked, removed) by the unpacker, in order; the writer only
/// fills inodes it was handed open, so the tree ends the same as if each file
/// had been written at once. On a journaled file system that takes the data
/// writes and inode updates of tens of thousands of small files off the one
/// thread that must walk the tar stream.
struct Writer {
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The first failure, reported at the next [`Writer::wait`].
    failed: std::sync::Arc<std::sync::Mutex<Option<UnpackError>>>,
}

impl Writer {
    fn start() -> Writer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(WRITER_QUEUE);
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let fail = failed.clone();
        let thread = std::thread::Builder::new()
            .name("slot-writer".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::File {
                            mut file,
                            data,
                            meta,
                            shown,
                        } => {
                            // After a failure the rest is only closed.
                            if fail.lock().expect("writer lock").is_some() {
                                continue;
                            }
                            let r = file
                                .write_all(&data)
                                .map_err(|e| UnpackError::io(format!("writing {shown}"), e))
                                .and_then(|()| meta.apply(file.as_fd(), &shown, true));
                            if let Err(e) = r {
                                fail.lock().expect("writer lock").get_or_insert(e);
                            }
                        }
                        Job::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .expect("starting the slot writer thread");
        Writer {
            tx: Some(tx),
            thread: Some(thread),
            failed,
        }
    }

    fn send(&self, job: Job) -> Result<(), UnpackError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| UnpackError::io("slot writer", std::io::Error::other("it stopped")))
    }

    /// Waits until every file handed over is written; the first failure.
    fn wait(&self) -> Result<(), UnpackError> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.send(Job::Barrier(done))?;
        wait.recv()
            .map_err(|_| UnpackError::io("slot writer", std::io::Error::other("it stopped")))?;
        match self.failed.lock().expect("writer lock").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Whatever is queued is written (or skipped after a failure) before
        // the unpacker is gone: nothing writes into the slot afterwards.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
