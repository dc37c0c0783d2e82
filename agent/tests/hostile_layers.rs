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

mod common;
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
    fn finish(&self) -> Vec<u8> {
        let mut b = self.bytes.clone();
        b.extend(std::iter::repeat_n(0u8, 1024));
        b
    }
    fn gzip(&self) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(&self.finish()).unwrap();
        e.finish().unwrap()
    }
}

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
        let mut u = Unpacker::new(&self.slot, opts)?;
        u.apply_blob("application/vnd.oci.image.layer.v1.tar+gzip", layer)
            .map(|_| ())
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

/// A small gzip that inflates past the cap is cut off and refused.
#[test]
fn gzip_bomb_past_the_cap_is_refused() {
    let d = Device::new();
    let mut t = Tar::default();
    t.file("zeros", &vec![0u8; 64 << 20]);
    let gz = t.gzip();
    assert!(gz.len() < 1 << 20, "the bomb should be small: {}", gz.len());
    let opts = UnpackOptions {
        max_bytes: 8 << 20,
        ..UnpackOptions::default()
    };
    let err = d.apply_with(&gz, opts).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge(_)), "{err:?}");
    assert!(
        std::fs::metadata(d.slot.join("zeros"))
            .map(|m| m.len())
            .unwrap_or(0)
            <= 8 << 20
    );
    d.assert_outside_untouched();
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
        max_bytes: 8 << 20,
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
        let opts = UnpackOptions {
            allow_devices: true,
            ..UnpackOptions::default()
        };
        d.apply_with(&t.gzip(), opts).unwrap();
        let m = std::fs::symlink_metadata(d.slot.join("dev/sda")).unwrap();
        assert_eq!(m.mode() & 0o170000, 0o060000);
    }
}

/// GNU long names and PAX paths get the same checks as short names.
#[test]
fn long_and_pax_names_are_checked() {
    let d = Device::new();
    let long = format!("{}/../../outside/secret", "x".repeat(150));
    // A GNU long-name record (`L` entry) carrying the name.
    let mut t = Tar::default();
    let mut name = long.clone().into_bytes();
    name.push(0);
    t.raw(
        b"././@LongLink",
        tar::EntryType::GNULongName,
        &name,
        b"",
        0o644,
    )
    .file("innocent", b"pwned");
    d.refused(&t.gzip(), "`..` in path");
    // A PAX record, written by hand.
    let mut t = Tar::default();
    let rec = format!(" path={long}\n");
    let rec = format!("{}{rec}", rec.len() + (rec.len() + 3).to_string().len());
    t.raw(b"pax", tar::EntryType::XHeader, rec.as_bytes(), b"", 0o644)
        .file("innocent", b"pwned");
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
        let rec = " SCHILY.xattr.bogus.sluice=1\n";
        let rec = format!("{}{rec}", rec.len() + (rec.len() + 2).to_string().len());
        t.file("before", b"first")
            .raw(b"pax", tar::EntryType::XHeader, rec.as_bytes(), b"", 0o644)
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
    let mut u = Unpacker::new(&d.slot, UnpackOptions::default()).unwrap();
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
