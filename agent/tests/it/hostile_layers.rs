//! A corpus of hostile layers. Each is refused, or contained in the slot; in
//! every case nothing outside the slot changes (a snapshot of a sibling folder
//! with a secret file, compared before and after).

use flate2::Compression;
use flate2::write::GzEncoder;
use sluice_agent::unpack::{UnpackError, UnpackOptions, Unpacker};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common;
use common::tree;

/// A tar built by hand, so names the `tar` builder would refuse can be written.
#[derive(Default)]
struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    fn raw(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        data: &[u8],
        link: &[u8],
        mode: u32,
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name);
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(name.as_bytes(), tar::EntryType::Regular, data, b"", 0o644)
    }
    fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(name.as_bytes(), tar::EntryType::Directory, b"", b"", 0o755)
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Symlink,
            b"",
            target.as_bytes(),
            0o777,
        )
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Link,
            b"",
            target.as_bytes(),
            0o644,
        )
    }
    /// A metadata record (GNU long name or link, PAX header) for the next entry.
    fn record(&mut self, kind: tar::EntryType, data: &[u8]) -> &mut Self {
        self.raw(b"././@LongLink", kind, data, b"", 0o644)
    }
    /// A GNU long-name record naming the next entry `name`.
    fn long_name(&mut self, name: &str) -> &mut Self {
        self.record(
            tar::EntryType::GNULongName,
            &[name.as_bytes(), b"\0"].concat(),
        )
    }
    /// A PAX header of one record, `key=value`, for the next entry.
    fn pax(&mut self, key: &str, value: &[u8]) -> &mut Self {
        self.record(tar::EntryType::XHeader, &pax_record(key, value))
    }
    fn finish(&self) -> Vec<u8> {
        let mut b = self.bytes.clone();
        b.extend(std::iter::repeat_n(0u8, 1024));
        b
    }
    fn clone_tar(&self) -> Tar {
        Tar {
            bytes: self.bytes.clone(),
        }
    }
    fn gzip(&self) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(&self.finish()).unwrap();
        e.finish().unwrap()
    }
    fn zstd(&self) -> Vec<u8> {
        zstd::stream::encode_all(&self.finish()[..], 3).unwrap()
    }
}

const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

struct Device {
    _tmp: tempfile::TempDir,
    slot: PathBuf,
    outside: PathBuf,
    before: BTreeMap<PathBuf, common::Entry>,
}

impl Device {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let slot = tmp.path().join("slot");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&slot).unwrap();
        std::fs::create_dir_all(outside.join("etc")).unwrap();
        std::fs::write(outside.join("secret"), b"keep me").unwrap();
        std::fs::write(outside.join("etc/passwd"), b"root:x:0:0").unwrap();
        Device {
            before: tree(tmp.path())
                .into_iter()
                .filter(|(p, _)| !p.starts_with("slot"))
                .collect(),
            _tmp: tmp,
            slot,
            outside,
        }
    }

    /// The outside abs path as a tar name or link target.
    fn out(&self, rest: &str) -> String {
        format!("{}/{rest}", self.outside.display())
    }

    fn apply(&self, layer: &[u8]) -> Result<(), UnpackError> {
        self.apply_with(layer, UnpackOptions::default())
    }

    fn apply_with(&self, layer: &[u8], opts: UnpackOptions) -> Result<(), UnpackError> {
        self.apply_as("application/vnd.oci.image.layer.v1.tar+gzip", layer, opts)
    }

    fn apply_as(
        &self,
        media_type: &str,
        layer: &[u8],
        opts: UnpackOptions,
    ) -> Result<(), UnpackError> {
        let mut u = Unpacker::new(&self.slot, opts)?;
        u.apply_blob(media_type, layer).map(|_| ())
    }

    /// An unpacker into the slot that creates device nodes when `allow_devices`.
    fn unpacker(&self, allow_devices: bool) -> Unpacker {
        let opts = UnpackOptions {
            allow_devices,
            ..UnpackOptions::default()
        };
        Unpacker::new(&self.slot, opts).unwrap()
    }

    #[track_caller]
    fn refused_as(&self, media_type: &str, layer: &[u8], want: &str) {
        let err = self
            .apply_as(media_type, layer, UnpackOptions::default())
            .expect_err("hostile layer was accepted");
        assert!(
            err.to_string().contains(want),
            "error {err:?} lacks {want:?}"
        );
        self.assert_outside_untouched();
    }

    /// Nothing outside the slot changed.
    fn assert_outside_untouched(&self) {
        let root = self.slot.parent().unwrap();
        let now: BTreeMap<_, _> = tree(root)
            .into_iter()
            .filter(|(p, _)| !p.starts_with("slot"))
            .collect();
        assert_eq!(now, self.before, "something outside the slot changed");
    }

    fn refused(&self, layer: &[u8], want: &str) {
        let err = self.apply(layer).expect_err("hostile layer was accepted");
        assert!(
            err.to_string().contains(want),
            "error {err:?} lacks {want:?}"
        );
        self.assert_outside_untouched();
    }
}

/// `../` in a name is refused.
#[test]
fn dotdot_path_is_refused() {
    let d = Device::new();
    d.refused(
        &Tar::default().file("../outside/secret", b"pwned").gzip(),
        "`..` in path",
    );
    d.refused(
        &Tar::default()
            .file("a/../../outside/secret", b"pwned")
            .gzip(),
        "`..` in path",
    );
}

/// An absolute name is refused.
#[test]
fn absolute_path_is_refused() {
    let d = Device::new();
    d.refused(
        &Tar::default().file(&d.out("secret"), b"pwned").gzip(),
        "absolute path",
    );
}

/// A symlink to outside, then a file through it: the file lands inside the
/// slot (the link resolves as if the slot were `/`), or, when the link points
/// at nothing inside the slot, the layer is refused.
#[test]
fn symlink_parent_escape_is_contained() {
    let d = Device::new();
    let mut t = Tar::default();
    t.dir("outside")
        .symlink("rel", "../outside")
        .file("rel/secret", b"pwned")
        .symlink("chain1", "chain2")
        .symlink("chain2", "../../../../..")
        .file("chain1/escaped", b"pwned")
        .symlink("abs", "/outside")
        .file("abs/abs", b"pwned");
    d.apply(&t.gzip()).unwrap();
    d.assert_outside_untouched();
    assert_eq!(
        std::fs::read(d.slot.join("outside/secret")).unwrap(),
        b"pwned"
    );
    assert_eq!(std::fs::read(d.slot.join("outside/abs")).unwrap(), b"pwned");
    assert!(d.slot.join("escaped").is_file());
    // Pointing at the real outside folder, which does not exist in the slot.
    let mut t = Tar::default();
    t.symlink("abs2", &d.out(""))
        .file("abs2/etc/passwd", b"pwned");
    d.refused(&t.gzip(), "abs2/etc/passwd");
}

/// A symlink followed by a directory of the same name, then a file in it: the
/// directory replaces the link, the file stays in the slot.
#[test]
fn symlink_then_directory_of_the_same_name_is_contained() {
    let d = Device::new();
    let mut t = Tar::default();
    t.symlink("foo", &d.out(""))
        .dir("foo")
        .file("foo/secret", b"pwned");
    d.apply(&t.gzip()).unwrap();
    d.assert_outside_untouched();
    let m = std::fs::symlink_metadata(d.slot.join("foo")).unwrap();
    assert!(m.is_dir());
    assert_eq!(std::fs::read(d.slot.join("foo/secret")).unwrap(), b"pwned");
}

/// A symlink named `.` (or `./`) would replace the slot root: refused.
#[test]
fn symlink_named_dot_is_refused() {
    let d = Device::new();
    d.refused(&Tar::default().symlink(".", &d.out("")).gzip(), "slot root");
    d.refused(
        &Tar::default().symlink("./", &d.out("")).gzip(),
        "slot root",
    );
    d.refused(&Tar::default().file(".", b"x").gzip(), "slot root");
}

/// Hard links to outside, by `..`, absolute path or through a symlink: refused.
#[test]
fn hardlink_escapes_are_refused() {
    let d = Device::new();
    d.refused(
        &Tar::default().hardlink("h", "../outside/secret").gzip(),
        "outside the slot",
    );
    d.refused(
        &Tar::default().hardlink("h", &d.out("secret")).gzip(),
        "outside the slot",
    );
    // Through a symlink, the target resolves inside the slot, where it does not exist.
    let mut t = Tar::default();
    t.symlink("s", &d.out("")).hardlink("h", "s/secret");
    d.refused(&t.gzip(), "hard link");
    let mut t = Tar::default();
    t.symlink("s", "../outside").hardlink("h", "s/secret");
    d.refused(&t.gzip(), "hard link");
    d.refused(
        &Tar::default().dir("d").hardlink("h", "d").gzip(),
        "hard link to a directory",
    );
}

/// A hard link followed by a file of the link's name replaces the link, it
/// never writes through it into the original.
#[test]
fn file_over_hardlink_does_not_write_through() {
    let d = Device::new();
    let mut t = Tar::default();
    t.file("orig", b"original")
        .hardlink("h", "orig")
        .file("h", b"replaced");
    d.apply(&t.gzip()).unwrap();
    assert_eq!(std::fs::read(d.slot.join("orig")).unwrap(), b"original");
    assert_eq!(std::fs::read(d.slot.join("h")).unwrap(), b"replaced");
    d.assert_outside_untouched();
}

/// A file written over a symlink to outside replaces the symlink.
#[test]
fn file_over_symlink_does_not_write_through() {
    let d = Device::new();
    let mut t = Tar::default();
    t.symlink("x", &d.out("secret")).file("x", b"pwned");
    d.apply(&t.gzip()).unwrap();
    d.assert_outside_untouched();
    assert!(
        std::fs::symlink_metadata(d.slot.join("x"))
            .unwrap()
            .is_file()
    );
}

/// Whiteouts that name nothing valid are refused; whiteouts through symlinks
/// remove nothing outside.
#[test]
fn bad_whiteouts_are_refused_or_contained() {
    let d = Device::new();
    d.refused(
        &Tar::default().file(".wh..", b"").gzip(),
        "malformed whiteout",
    );
    d.refused(
        &Tar::default().file(".wh.", b"").gzip(),
        "malformed whiteout",
    );
    d.refused(
        &Tar::default().file("a/.wh...", b"").gzip(),
        "malformed whiteout",
    );
    d.refused(
        &Tar::default().file("../.wh.outside", b"").gzip(),
        "`..` in path",
    );
    let mut t = Tar::default();
    t.symlink("s", &d.out(""))
        .file("s/.wh.secret", b"")
        .symlink("r", "../outside")
        .file("r/.wh..wh..opq", b"");
    d.apply(&t.gzip()).unwrap();
    d.assert_outside_untouched();
}

/// Duplicate entries: the last one wins, whatever the kinds.
#[test]
fn duplicate_entries_last_wins() {
    let d = Device::new();
    let mut t = Tar::default();
    t.file("f", b"one")
        .file("f", b"two")
        .dir("d")
        .file("d/inner", b"x")
        .file("d", b"now a file")
        .file("e", b"file first")
        .dir("e")
        .dir("e");
    d.apply(&t.gzip()).unwrap();
    assert_eq!(std::fs::read(d.slot.join("f")).unwrap(), b"two");
    assert_eq!(std::fs::read(d.slot.join("d")).unwrap(), b"now a file");
    assert!(d.slot.join("e").is_dir());
    d.assert_outside_untouched();
}

/// A gzip stream cut short is refused.
#[test]
fn truncated_gzip_is_refused() {
    let d = Device::new();
    let mut t = Tar::default();
    t.file("big", &vec![7u8; 200_000]);
    let gz = t.gzip();
    d.refused(&gz[..gz.len() / 2], "");
    d.refused(&gz[..gz.len() - 4], "");
}

/// A small gzip or zstd layer that inflates past the cap is cut off and
/// refused.
#[test]
fn bombs_past_the_cap_are_refused() {
    let mut t = Tar::default();
    t.file("zeros", &vec![0u8; 64 << 20]);
    for (media_type, bomb) in [
        ("application/vnd.oci.image.layer.v1.tar+gzip", t.gzip()),
        (ZSTD, t.zstd()),
    ] {
        let d = Device::new();
        assert!(
            bomb.len() < 1 << 20,
            "the bomb should be small: {}",
            bomb.len()
        );
        let opts = UnpackOptions {
            max_bytes: Some(8 << 20),
            ..UnpackOptions::default()
        };
        let err = d.apply_as(media_type, &bomb, opts).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooLarge(_)),
            "{media_type}: {err:?}"
        );
        assert!(
            std::fs::metadata(d.slot.join("zeros"))
                .map(|m| m.len())
                .unwrap_or(0)
                <= 8 << 20
        );
        d.assert_outside_untouched();
    }
}

/// zstd streams cut short or corrupted are refused; so are frames that
/// need a window larger than the agent allows (`--long`), before their
/// memory is taken.
#[test]
fn broken_zstd_is_refused() {
    let d = Device::new();
    let mut t = Tar::default();
    let noise: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    t.file("big", &noise);
    let z = t.zstd();
    d.refused_as(ZSTD, &z[..z.len() / 2], "");
    d.refused_as(ZSTD, &z[..z.len() - 3], "");
    // (Flipped bytes inside a raw block decode without complaint, as in
    // any format without a checksum: the blob's digest refuses those, see
    // `verify_slot.rs`.)
    d.refused_as(ZSTD, b"not zstd at all, and long enough to look", "");

    // A 64 MiB window, as `zstd --long=26` writes: refused with a reason.
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    e.long_distance_matching(true).unwrap();
    e.window_log(26).unwrap();
    e.write_all(&t.finish()).unwrap();
    let long = e.finish().unwrap();
    d.refused_as(ZSTD, &long, "window larger than 32 MiB");
}

/// The same layer as gzip, as zstd (in several frames, with a skippable
/// frame among them, as `zstd:chunked` writes) and as plain tar unpacks to
/// the same tree; an unknown encoding is refused by name.
#[test]
fn zstd_gzip_and_plain_layers_unpack_alike() {
    let mut t = Tar::default();
    t.dir("etc")
        .file("etc/os-release", b"VERSION_ID=1\n")
        .file("etc/big", &vec![42u8; 100_000])
        .symlink("etc/link", "os-release")
        .hardlink("etc/hard", "etc/big");
    let tar = t.finish();
    // Frames: the first half, a skippable frame, the rest.
    let mut framed = zstd::stream::encode_all(&tar[..tar.len() / 2], 3).unwrap();
    framed.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    framed.extend_from_slice(&5u32.to_le_bytes());
    framed.extend_from_slice(b"toc!!");
    framed.extend_from_slice(&zstd::stream::encode_all(&tar[tar.len() / 2..], 3).unwrap());
    let mut trees = Vec::new();
    for (media_type, blob) in [
        ("application/vnd.oci.image.layer.v1.tar+gzip", t.gzip()),
        (ZSTD, t.zstd()),
        (ZSTD, framed),
        ("application/vnd.oci.image.layer.v1.tar", tar.clone()),
    ] {
        let d = Device::new();
        d.apply_as(media_type, &blob, UnpackOptions::default())
            .unwrap_or_else(|e| panic!("{media_type}: {e}"));
        trees.push(tree(&d.slot));
    }
    assert!(trees.len() == 4 && trees[0].len() >= 5, "{:?}", trees[0]);
    assert!(trees.iter().all(|t| t == &trees[0]), "{trees:#?}");
    Device::new().refused_as(
        "application/vnd.oci.image.layer.v1.tar+lz4",
        &tar,
        "publish gzip, zstd or plain tar layers",
    );
}

/// A sparse file's holes count toward the cap: a 2 KiB layer declaring a
/// 1 GiB sparse file is refused before anything is written (found by fuzzing).
#[test]
fn sparse_bomb_past_the_cap_is_refused() {
    let d = Device::new();
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..5].copy_from_slice(b"holes");
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(512);
    h.set_mode(0o644);
    {
        let g = h.as_gnu_mut().unwrap();
        g.set_real_size(1 << 30);
        g.sparse[0].set_offset((1 << 30) - 512);
        g.sparse[0].set_length(512);
    }
    h.set_cksum();
    let mut t = Tar::default();
    t.bytes.extend_from_slice(h.as_bytes());
    t.bytes.extend_from_slice(&[7u8; 512]);
    let opts = UnpackOptions {
        max_bytes: Some(8 << 20),
        ..UnpackOptions::default()
    };
    let err = d.apply_with(&t.gzip(), opts).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge(_)), "{err:?}");
    assert!(!d.slot.join("holes").exists());
    d.assert_outside_untouched();
}

/// Device nodes are refused unless configured.
#[test]
fn device_nodes_are_refused_unless_allowed() {
    let d = Device::new();
    let mut t = Tar::default();
    t.raw(b"dev/sda", tar::EntryType::Block, b"", b"", 0o660);
    d.refused(&t.gzip(), "device node");
    assert!(!d.slot.join("dev/sda").exists());
    if rustix::process::geteuid().is_root() {
        let mut u = d.unpacker(true);
        u.apply_blob("application/vnd.oci.image.layer.v1.tar+gzip", &t.gzip()[..])
            .unwrap();
        u.commit().unwrap();
        let m = std::fs::symlink_metadata(d.slot.join("dev/sda")).unwrap();
        assert_eq!(m.mode() & 0o170000, 0o060000);
        assert_eq!(m.mode() & 0o7777, 0o660);
    }
}

/// GNU long names and PAX paths get the same checks as short names.
#[test]
fn long_and_pax_names_are_checked() {
    let d = Device::new();
    let long = format!("{}/../../outside/secret", "x".repeat(150));
    // A GNU long-name record (`L` entry) carrying the name.
    let mut t = Tar::default();
    t.long_name(&long).file("innocent", b"pwned");
    d.refused(&t.gzip(), "`..` in path");
    // A PAX record.
    let mut t = Tar::default();
    t.pax("path", long.as_bytes()).file("innocent", b"pwned");
    d.refused(&t.gzip(), "`..` in path");
}

/// A small file is filled by the unpacker's writer thread: a failure there
/// (an xattr no file system takes) still fails the layer, named, and the
/// files before and after it in the layer are there or not as if written in
/// order; a large file, written inline, fails the same way.
#[test]
fn a_failure_while_filling_a_file_fails_the_layer() {
    for size in [10usize, 1 << 20] {
        let d = Device::new();
        let mut t = Tar::default();
        t.file("before", b"first")
            .pax("SCHILY.xattr.bogus.sluice", b"1")
            .file("bad", &vec![7u8; size])
            .file("after", b"last");
        d.refused(&t.gzip(), "xattr bogus.sluice of bad");
        assert_eq!(std::fs::read(d.slot.join("before")).unwrap(), b"first");
    }
}

/// A well-formed layer keeps modes, set-id bits, hard links, symlinks,
/// xattrs and (as root) ownership; whiteouts and opaque directories apply
/// to lower layers only.
#[test]
fn a_normal_layer_keeps_metadata_and_whiteouts_apply() {
    let d = Device::new();
    let mut u = d.unpacker(false);
    let mut lower = Tar::default();
    lower
        .dir("etc")
        .file("etc/gone", b"x")
        .dir("opq")
        .file("opq/old", b"x")
        .file("keep", b"k")
        .raw(b"bin/su", tar::EntryType::Regular, b"su", b"", 0o4755)
        .hardlink("bin/su2", "bin/su")
        .symlink("lib", "usr/lib");
    u.apply(&lower.finish()[..]).unwrap();
    let mut upper = Tar::default();
    upper
        .file("etc/.wh.gone", b"")
        .file("opq/new", b"y")
        .file("opq/.wh..wh..opq", b"");
    // An owner and an xattr, as PAX records.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.sluice", &b"yes"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o640);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "owned", &b"own"[..]).unwrap();
    let extra = b.into_inner().unwrap();
    let mut bytes = upper.bytes.clone();
    bytes.extend_from_slice(&extra);
    let stats = u.apply(&bytes[..]).unwrap();
    u.commit().unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert!(!d.slot.join("etc/gone").exists());
    assert!(!d.slot.join("opq/old").exists());
    assert!(
        d.slot.join("opq/new").exists(),
        "the opaque marker hides lower entries only"
    );
    let su = std::fs::metadata(d.slot.join("bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(
        su.ino(),
        std::fs::metadata(d.slot.join("bin/su2")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(d.slot.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    let owned = std::fs::metadata(d.slot.join("owned")).unwrap();
    assert_eq!(owned.permissions().mode() & 0o7777, 0o640);
    if rustix::process::geteuid().is_root() {
        assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    }
    let x = rustix::fs::getxattr(d.slot.join("owned"), "user.sluice", &mut [0u8; 16][..]);
    assert_eq!(x.ok(), Some(3));
    u.sync().unwrap();
    d.assert_outside_untouched();
}

/// A PAX record `key=value` with its length prefix.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
    let mut n = body.len() + 1;
    while n.to_string().len() + body.len() != n {
        n += 1;
    }
    [n.to_string().as_bytes(), &body].concat()
}

/// A GNU sparse file: header with four extents, one extension block with
/// two more, then the six 512-byte data blocks; returns (tar bytes, the
/// file's contents).
fn sparse_file(name: &str) -> (Vec<u8>, Vec<u8>) {
    let extents: Vec<(u64, u64)> = (0..6).map(|i| (i * 2048, 512)).collect();
    let real = 5 * 2048 + 512;
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(6 * 512);
    h.set_mode(0o644);
    {
        let g = h.as_gnu_mut().unwrap();
        g.set_real_size(real);
        for (i, (off, len)) in extents[..4].iter().enumerate() {
            g.sparse[i].set_offset(*off);
            g.sparse[i].set_length(*len);
        }
        g.set_is_extended(true);
    }
    h.set_cksum();
    let mut ext = tar::GnuExtSparseHeader::new();
    for (i, (off, len)) in extents[4..].iter().enumerate() {
        ext.sparse[i].set_offset(*off);
        ext.sparse[i].set_length(*len);
    }
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(ext.as_bytes());
    let mut content = vec![0u8; real as usize];
    for (i, (off, _)) in extents.iter().enumerate() {
        let block = [b'a' + i as u8; 512];
        out.extend_from_slice(&block);
        content[*off as usize..*off as usize + 512].copy_from_slice(&block);
    }
    (out, content)
}

/// GNU long-name and long-link records, and PAX headers (local and global),
/// larger than their caps are refused when their header arrives, before
/// the record is read (it once took 1 GB of memory per MB of gzip).
#[test]
fn metadata_records_past_their_caps_are_refused() {
    use sluice_agent::unpack::{MAX_LONG_NAME, MAX_PAX};
    for (kind, cap, what) in [
        (
            tar::EntryType::GNULongName,
            MAX_LONG_NAME,
            "GNU long name record",
        ),
        (
            tar::EntryType::GNULongLink,
            MAX_LONG_NAME,
            "GNU long link record",
        ),
        (tar::EntryType::XHeader, MAX_PAX, "PAX header"),
        (tar::EntryType::XGlobalHeader, MAX_PAX, "PAX header"),
    ] {
        let d = Device::new();
        let mut t = Tar::default();
        t.record(kind, &vec![b'a'; cap as usize + 1])
            .file("after", b"x");
        let err = d.apply(&t.gzip()).unwrap_err();
        assert!(matches!(err, UnpackError::Record { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(what) && msg.contains(&(cap + 1).to_string()),
            "{msg}"
        );
        assert!(!d.slot.join("after").exists());
        d.assert_outside_untouched();
    }
}

/// A PAX header right at the cap (a comment filling it) still describes the
/// next entry as usual: the cap is on size, valid layers pass.
#[test]
fn a_pax_header_at_the_cap_is_applied() {
    use sluice_agent::unpack::MAX_PAX;
    let d = Device::new();
    let mut rec = pax_record("path", b"renamed");
    let filler = MAX_PAX as usize - rec.len();
    // A comment record filling the header to the byte.
    let comment = (filler - 30..filler)
        .map(|v| pax_record("comment", &vec![b'c'; v]))
        .find(|r| r.len() == filler)
        .unwrap();
    rec.extend_from_slice(&comment);
    let mut t = Tar::default();
    t.record(tar::EntryType::XHeader, &rec)
        .file("original", b"data");
    d.apply(&t.gzip()).unwrap();
    assert_eq!(std::fs::read(d.slot.join("renamed")).unwrap(), b"data");
}

/// The guard that caps header records follows the stream exactly as the tar
/// reader does: past a size given by a PAX record (the ustar field says 0),
/// a GNU long name and a sparse file with an extension block, a huge long-name record is still caught; without it the layer
/// unpacks as written.
#[test]
fn the_record_caps_stay_in_step_with_the_tar_stream() {
    let body = vec![b'z'; 1000];
    let long = format!("dir/{}", "n".repeat(200));
    let (sparse, sparse_content) = sparse_file("holes");
    let mut t = Tar::default();
    t.dir("dir").pax("size", b"1000");
    // The file's ustar size says 0: the PAX size (1000) wins.
    t.raw(b"paxsized", tar::EntryType::Regular, b"", b"", 0o644);
    t.bytes.extend_from_slice(&body);
    t.bytes.extend(std::iter::repeat_n(0u8, 24));
    t.long_name(&long).file("short", b"long-named");
    t.bytes.extend_from_slice(&sparse);
    t.file("last", b"end");
    let good = t.clone_tar();

    let d = Device::new();
    let mut u = d.unpacker(false);
    u.apply(&good.finish()[..]).unwrap();
    u.commit().unwrap();
    assert_eq!(std::fs::read(d.slot.join("paxsized")).unwrap(), body);
    assert_eq!(std::fs::read(d.slot.join(&long)).unwrap(), b"long-named");
    assert_eq!(std::fs::read(d.slot.join("holes")).unwrap(), sparse_content);
    assert_eq!(std::fs::read(d.slot.join("last")).unwrap(), b"end");

    let mut bad = good.clone_tar();
    let huge = vec![b'a'; sluice_agent::unpack::MAX_LONG_NAME as usize + 1];
    bad.record(tar::EntryType::GNULongName, &huge)
        .file("x", b"x");
    let d = Device::new();
    let err = d.apply(&bad.gzip()).unwrap_err();
    assert!(matches!(err, UnpackError::Record { .. }), "{err:?}");
}

/// A sparse file whose map runs over more extension blocks than the cap is
/// refused when the block past the cap arrives.
#[test]
fn a_sparse_map_past_its_cap_is_refused() {
    use sluice_agent::unpack::MAX_SPARSE_BLOCKS;
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..5].copy_from_slice(b"holes");
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(0);
    h.set_mode(0o644);
    h.as_gnu_mut().unwrap().set_is_extended(true);
    h.set_cksum();
    let mut t = Tar::default();
    t.bytes.extend_from_slice(h.as_bytes());
    for i in 0..=MAX_SPARSE_BLOCKS {
        let mut ext = tar::GnuExtSparseHeader::new();
        ext.set_is_extended(i < MAX_SPARSE_BLOCKS);
        t.bytes.extend_from_slice(ext.as_bytes());
    }
    let d = Device::new();
    let err = d.apply(&t.gzip()).unwrap_err();
    assert!(
        matches!(&err, UnpackError::Record { what, .. } if what.contains("sparse")),
        "{err:?}"
    );
}

/// Paths and link names longer than PATH_MAX, and xattr values larger than
/// the kernel takes, are refused with what was too long.
#[test]
fn paths_link_names_and_xattrs_have_caps() {
    let d = Device::new();
    let long = "d/".repeat(2100);
    let mut t = Tar::default();
    t.pax("path", long.as_bytes()).file("f", b"x");
    d.refused(&t.gzip(), "longer than 4096 bytes");
    let mut t = Tar::default();
    t.pax("linkpath", long.as_bytes()).symlink("l", "short");
    d.refused(&t.gzip(), "longer than 4096 bytes");
    let mut t = Tar::default();
    t.pax("SCHILY.xattr.user.big", &vec![b'v'; 65537])
        .file("f", b"x");
    d.refused(&t.gzip(), "xattr user.big");
}

/// The bytes of a `security.capability` xattr granting CAP_NET_BIND_SERVICE.
fn net_bind_cap() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

fn has_caps(p: &Path) -> bool {
    rustix::fs::lgetxattr(p, "security.capability", &mut [0u8; 64][..]).is_ok()
}

/// Set-id bits, file capabilities, device nodes' modes and the slot root's
/// mode wait until the whole image is verified (`commit`): before it the
/// root is 0700, no file is set-id or has capabilities and device nodes
/// are 0000 root:root; after it, all are as the layers say.
#[test]
fn privileged_metadata_waits_for_commit() {
    let root = rustix::process::geteuid().is_root();
    let d = Device::new();
    let mut u = d.unpacker(true);
    assert_eq!(mode(&d.slot), 0o700, "the slot is open while unverified");
    let mut t = Tar::default();
    t.raw(b"./", tar::EntryType::Directory, b"", b"", 0o750)
        .raw(b"bin/su", tar::EntryType::Regular, b"su", b"", 0o4755)
        .raw(
            b"bin/big",
            tar::EntryType::Regular,
            &vec![1u8; 200_000],
            b"",
            0o2755,
        )
        .hardlink("bin/su-link", "bin/su")
        .raw(b"shared", tar::EntryType::Directory, b"", b"", 0o2775);
    if root {
        t.pax("SCHILY.xattr.security.capability", &net_bind_cap())
            .raw(b"bin/ping", tar::EntryType::Regular, b"ping", b"", 0o755)
            .raw(b"dev/null", tar::EntryType::Char, b"", b"", 0o666);
    }
    u.apply(&t.finish()[..]).unwrap();
    for f in ["bin/su", "bin/big", "bin/su-link"] {
        assert_eq!(
            mode(&d.slot.join(f)) & 0o6000,
            0,
            "{f} set-id before commit"
        );
    }
    assert_eq!(
        mode(&d.slot.join("shared")),
        0o2775,
        "directories keep set-gid"
    );
    assert_eq!(mode(&d.slot), 0o700);
    if root {
        assert!(!has_caps(&d.slot.join("bin/ping")));
        let null = std::fs::symlink_metadata(d.slot.join("dev/null")).unwrap();
        assert_eq!((null.mode() & 0o7777, null.uid()), (0, 0));
    }
    u.commit().unwrap();
    assert_eq!(mode(&d.slot.join("bin/su")), 0o4755);
    assert_eq!(mode(&d.slot.join("bin/su-link")), 0o4755);
    assert_eq!(mode(&d.slot.join("bin/big")), 0o2755);
    assert_eq!(mode(&d.slot), 0o750);
    if root {
        assert!(has_caps(&d.slot.join("bin/ping")));
        assert_eq!(mode(&d.slot.join("dev/null")), 0o666);
    }
}

/// What a later layer removes or replaces gets nothing at commit: a set-id
/// file whited out and recreated plain (maybe in the same inode number) stays
/// plain; a whited-out device is not recreated; a set-id inode that lives
/// on under a hard link is set-id there.
#[test]
fn privileged_metadata_follows_later_layers() {
    let root = rustix::process::geteuid().is_root();
    let d = Device::new();
    let mut u = d.unpacker(true);
    let mut lower = Tar::default();
    lower
        .raw(b"bin/su", tar::EntryType::Regular, b"su", b"", 0o4755)
        .raw(b"bin/x", tar::EntryType::Regular, b"x", b"", 0o6755)
        .hardlink("bin/y", "bin/x");
    if root {
        lower.raw(b"dev/mem", tar::EntryType::Char, b"", b"", 0o666);
    }
    u.apply(&lower.finish()[..]).unwrap();
    let mut upper = Tar::default();
    upper
        .file("bin/.wh.su", b"")
        .raw(b"bin/su", tar::EntryType::Regular, b"plain", b"", 0o755)
        .file("bin/.wh.x", b"")
        .file("dev/.wh.mem", b"");
    u.apply(&upper.finish()[..]).unwrap();
    u.commit().unwrap();
    assert_eq!(mode(&d.slot.join("bin/su")), 0o755);
    assert_eq!(std::fs::read(d.slot.join("bin/su")).unwrap(), b"plain");
    assert!(!d.slot.join("bin/x").exists());
    assert_eq!(mode(&d.slot.join("bin/y")), 0o6755);
    assert!(!d.slot.join("dev/mem").exists());
    d.assert_outside_untouched();
}

/// The privileged metadata held for commit is bounded: a layer of more
/// set-id files than the cap is refused.
#[test]
fn too_many_set_id_files_are_refused() {
    use sluice_agent::unpack::MAX_HELD;
    let d = Device::new();
    let mut t = Tar::default();
    for i in 0..=MAX_HELD {
        t.raw(
            format!("s{i}").as_bytes(),
            tar::EntryType::Regular,
            b"",
            b"",
            0o4755,
        );
    }
    d.refused(&t.gzip(), &format!("more than {MAX_HELD}"));
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}
