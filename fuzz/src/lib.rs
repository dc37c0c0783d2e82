//! The checks the fuzz targets run, one function per target. Each takes the
//! fuzzer's bytes, feeds them to the agent's code and panics when a property
//! breaks. `agent/tests/it/fuzz_corpus.rs` includes this file and replays the
//! committed corpus and regressions through the same functions on stable.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use sluice_agent::bootloader::{ENVBLK_HEADER, ENVBLK_SIZE, GrubEnv};
use sluice_agent::client::{Expect, check_offer, verify_answer};
use sluice_agent::registry::parse_manifest;
use sluice_agent::unpack::guard::{Guard, TooBig};
use sluice_agent::unpack::{UnpackOptions, Unpacker, layer_compression};
use sluice_protocol::{KeyRole, KeySet, PublicKey, ResponseSigner};
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;

/// The targets, as named in `fuzz/Cargo.toml`, `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: [&str; 6] = [
    "unpack_layer",
    "tar_guard",
    "grubenv",
    "manifest",
    "signed_response",
    "toc",
];

/// Runs the check of the target named `name` on one input.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "unpack_layer" => unpack_layer(data),
        "tar_guard" => tar_guard(data),
        "grubenv" => grubenv(data),
        "manifest" => manifest(data),
        "signed_response" => signed_response(data),
        "toc" => toc(data),
        other => panic!("no fuzz target {other}"),
    }
}

// ---------------------------------------------------------------- unpack_layer

/// Most bytes of tar stream the unpack check allows: small, so a bomb is
/// refused in milliseconds. Also the most bytes the unpacked files may hold.
pub const UNPACK_MAX_BYTES: u64 = 4 << 20;

/// Flag bit: the harness gzips each layer, so the fuzzer works on tar
/// structure and still goes through the gzip decoder.
pub const GZIP_HERE: u8 = 1;
/// Flag bit: each layer is a gzip stream as given (real `.tar.gz` seeds).
pub const GZIP_GIVEN: u8 = 2;
/// Flag bit: two layers, the first as long as the next two bytes say (u16 LE),
/// so whiteouts and opaque directories have something below them.
pub const TWO_LAYERS: u8 = 4;
/// Flag bit: keep owners from the layer (only when running as root).
pub const PRESERVE_OWNER: u8 = 8;
/// Flag bit: each layer is a zstd stream as given (frames, skippable frames,
/// window sizes; without [`GZIP_HERE`] or [`GZIP_GIVEN`]).
pub const ZSTD_GIVEN: u8 = 16;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const SECRET: &[u8] = b"outside the slot";

/// Input: one flag byte, then the layer(s). Applies them into a fresh slot
/// directory with a sibling folder beside it; whatever the layers hold, it
/// must not panic, leave the sibling as it was, put more than
/// [`UNPACK_MAX_BYTES`] in the slot, or leave anything behind. Until the
/// commit (made when every layer applied), the slot root is 0700 and nothing
/// in it is set-id, has file capabilities or is a device node anyone but
/// root can open.
pub fn unpack_layer(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let layers: Vec<&[u8]> = match rest {
        [lo, hi, rest @ ..] if flags & TWO_LAYERS != 0 => {
            let split = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
            vec![&rest[..split], &rest[split..]]
        }
        _ => vec![rest],
    };
    let tmp = tempfile::Builder::new()
        .prefix("sluice-fuzz-")
        .tempdir()
        .expect("making a temp dir");
    let root = tmp.path().join("slot");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), SECRET).unwrap();

    let opts = UnpackOptions {
        allow_devices: false,
        preserve_owner: flags & PRESERVE_OWNER != 0 && rustix::process::geteuid().is_root(),
        max_bytes: Some(UNPACK_MAX_BYTES),
    };
    let mut unpacker = Unpacker::new(&root, opts).expect("opening the slot");
    let mut all_applied = true;
    for layer in layers {
        let applied = if flags & GZIP_HERE != 0 {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(layer).unwrap();
            unpacker.apply_blob(TAR_GZIP, &gz.finish().unwrap()[..])
        } else if flags & GZIP_GIVEN != 0 {
            unpacker.apply_blob(TAR_GZIP, layer)
        } else if flags & ZSTD_GIVEN != 0 {
            unpacker.apply_blob(TAR_ZSTD, layer)
        } else {
            unpacker.apply_blob(TAR, layer)
        };
        if applied.is_err() {
            all_applied = false;
            break;
        }
    }
    let root_mode = std::fs::symlink_metadata(&root).unwrap().mode() & 0o7777;
    assert_eq!(root_mode, 0o700, "the slot is open before the commit");
    make_traversable(&root);
    assert_unprivileged(&root);
    if all_applied {
        let _ = unpacker.commit();
    }
    drop(unpacker);

    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["outside", "slot"],
        "something was made beside the slot"
    );
    let inside: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(inside, ["secret"], "the folder beside the slot changed");
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), SECRET);
    assert!(
        std::fs::symlink_metadata(&root).unwrap().is_dir(),
        "the slot root was replaced"
    );

    make_traversable(&root);
    let mut seen = HashSet::new();
    let held = file_bytes(&root, &mut seen);
    assert!(
        held <= UNPACK_MAX_BYTES,
        "the slot holds {held} bytes of files, more than the {UNPACK_MAX_BYTES} allowed"
    );
    tmp.close().expect("removing the temp dir");
}

/// Gives every directory below `dir` (never through a symlink) mode 0700, so
/// it can be walked and removed without root.
fn make_traversable(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            make_traversable(&e.path());
        }
    }
}

/// Nothing below `dir` (never through a symlink) is set-id, has file
/// capabilities, or is a device node with any mode bit or another owner.
fn assert_unprivileged(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        let ft = m.file_type();
        if ft.is_dir() {
            assert_unprivileged(&e.path());
        } else if ft.is_file() {
            assert_eq!(
                m.mode() & 0o6000,
                0,
                "{:?} set-id before the commit",
                e.path()
            );
            let caps = rustix::fs::lgetxattr(e.path(), "security.capability", &mut [0u8; 64][..]);
            assert!(
                caps.is_err(),
                "{:?} has capabilities before the commit",
                e.path()
            );
        } else if ft.is_char_device() || ft.is_block_device() {
            assert_eq!(
                (m.mode() & 0o7777, m.uid()),
                (0, rustix::process::geteuid().as_raw()),
                "{:?} is open before the commit",
                e.path()
            );
        }
    }
}

/// Bytes of the regular files below `dir`, each inode counted once.
fn file_bytes(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            n += file_bytes(&e.path(), seen);
        } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
            n += m.size();
        }
    }
    n
}

// ------------------------------------------------------------------ tar_guard

/// What the `tar` reader made of one entry: path, link name, type, size,
/// PAX records, and a hash of up to 1 MiB of its data.
type Seen = (Vec<u8>, Option<Vec<u8>>, u8, u64, Option<Vec<u8>>, String);

/// Every entry the `tar` reader reads from `r`, then how it ended: `None`
/// at the end of the archive, else the error and whether it is the guard's.
fn tar_entries(r: impl std::io::Read) -> (Vec<Seen>, Option<(String, bool)>) {
    use std::io::Read;
    let mut archive = tar::Archive::new(r);
    let mut seen = Vec::new();
    let ended = |e: std::io::Error| {
        let guard = e
            .get_ref()
            .is_some_and(|i| i.downcast_ref::<TooBig>().is_some());
        Some((e.to_string(), guard))
    };
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return (seen, ended(e)),
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return (seen, ended(e)),
        };
        let pax = entry.pax_extensions().ok().flatten().map(|x| {
            x.flat_map(|r| r.ok())
                .flat_map(|r| [r.key_bytes(), r.value_bytes()].concat())
                .collect()
        });
        let mut data = Vec::new();
        if let Err(e) = (&mut entry).take(1 << 20).read_to_end(&mut data) {
            return (seen, ended(e));
        }
        seen.push((
            entry.path_bytes().into_owned(),
            entry.link_name_bytes().map(|l| l.into_owned()),
            entry.header().entry_type().as_byte(),
            entry.size(),
            pax,
            sluice_protocol::sha256_digest(&data),
        ));
    }
    (seen, None)
}

/// Input: a tar stream. The `tar` reader reads the same entries through the
/// guard that caps header records as without it, and ends the same way,
/// unless the guard refused a record past its cap: then it read a prefix of
/// the same entries, and the record it refused is past its cap. Where the
/// reader read the whole archive, the guard followed it to the end (it lost
/// its place only at a header the reader refuses too).
pub fn tar_guard(data: &[u8]) {
    let (raw, raw_end) = tar_entries(data);
    let mut guard = Guard::new(data);
    let (guarded, guarded_end) = tar_entries(&mut guard);
    if raw_end.is_none() {
        assert!(
            guard.followed(),
            "the guard lost its place in a valid archive"
        );
    }
    match guarded_end {
        Some((e, true)) => {
            assert!(
                raw.starts_with(&guarded),
                "the guard changed what came before its refusal ({e})"
            );
            // The refused record was declared larger than its cap; the input
            // need not hold it all (the reader stops at the end).
            assert!(e.contains("larger than the cap"), "{e}");
        }
        end => {
            assert_eq!(guarded, raw, "the guard changed the entries");
            assert_eq!(end, raw_end, "the guard changed how the archive ends");
        }
    }
}

// -------------------------------------------------------------------- grubenv

/// Input: an environment block, parsed as it is and also as the variables of
/// a block (header prepended, `#` padding). Whatever parses must encode to a
/// 1024-byte block that parses back to the same variables and encodes to the
/// same bytes.
pub fn grubenv(data: &[u8]) {
    grubenv_round_trip(data);
    let mut block = ENVBLK_HEADER.as_bytes().to_vec();
    block.extend_from_slice(&data[..data.len().min(ENVBLK_SIZE - block.len())]);
    block.resize(ENVBLK_SIZE, b'#');
    grubenv_round_trip(&block);
}

fn grubenv_round_trip(block: &[u8]) {
    let Ok(env) = GrubEnv::parse(block) else {
        return;
    };
    // Escapes only shrink when read, so what was read always fits again.
    let encoded = env.encode().expect("a parsed block encodes");
    assert_eq!(encoded.len(), ENVBLK_SIZE);
    let again = GrubEnv::parse(&encoded).expect("an encoded block parses");
    assert_eq!(
        again.vars(),
        env.vars(),
        "variables change over a round trip"
    );
    assert_eq!(again.encode().unwrap(), encoded, "encoding is not stable");
}

// ------------------------------------------------------------------- manifest

/// Input: manifest bytes, checked against their own digest so the fuzzer
/// reaches the JSON. What is accepted is a platform manifest with layers, each
/// named by a sha256 digest; the same bytes under another digest are refused.
pub fn manifest(data: &[u8]) {
    let digest = sluice_protocol::sha256_digest(data);
    if let Ok(m) = parse_manifest(data, &digest) {
        assert!(m.manifests.is_none(), "an index was accepted");
        let config = m
            .config
            .as_ref()
            .expect("a manifest without config was accepted");
        assert!(sluice_protocol::is_sha256_digest(&config.digest));
        assert!(
            !m.layers.is_empty(),
            "a manifest without layers was accepted"
        );
        for l in &m.layers {
            assert!(
                sluice_protocol::is_sha256_digest(&l.digest),
                "{:?}",
                l.digest
            );
            let _ = layer_compression(&l.media_type);
        }
    }
    let other = sluice_protocol::sha256_digest(b"another manifest");
    if other != digest {
        assert!(
            parse_manifest(data, &other).is_err(),
            "bytes were accepted under another digest"
        );
    }
}

// ------------------------------------------------------------ signed_response

/// The product the signed-response check's device runs.
pub const PRODUCT: &str = "acme-os";
/// The version the device runs.
pub const CURRENT_VERSION: &str = "1.2.0";
/// The device's id.
pub const DEVICE_ID: &str = "dev-1";
/// The nonce the device sent.
pub const NONCE: &str = "nonce-1";
/// The channel the device follows.
pub const CHANNEL: &str = "stable";
/// The device's architecture.
pub const ARCH: &str = "amd64";
/// The highest serial the device accepted before.
pub const LAST_SERIAL: i64 = 5;

/// Flag bit: sign the body with the trusted key here, to get past the
/// signature and check that no single-byte change of it verifies.
pub const SIGN_HERE: u8 = 1;

/// The trusted response key (seed 1).
pub fn response_signer() -> &'static ResponseSigner {
    static S: OnceLock<ResponseSigner> = OnceLock::new();
    S.get_or_init(|| ResponseSigner::from_seed(&[1; 32]))
}

/// The trusted image key (seed 2, ECDSA P-256).
pub fn image_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[2; 32]).unwrap()
}

/// The device's key set: the response and image keys above, and a response
/// key whose PEM is broken, so a header naming it reaches the key parser.
pub fn trusted_keys() -> &'static KeySet {
    static K: OnceLock<KeySet> = OnceLock::new();
    K.get_or_init(|| {
        use p256::pkcs8::EncodePublicKey;
        let vk = *image_key().verifying_key();
        let der = vk.to_public_key_der().unwrap();
        let pem = vk.to_public_key_pem(Default::default()).unwrap();
        KeySet {
            keys: vec![
                response_signer().public_key(),
                PublicKey {
                    key_id: sluice_protocol::key_id(der.as_bytes()),
                    role: KeyRole::Image,
                    algorithm: sluice_protocol::keys::ALG_ECDSA_P256.into(),
                    public_key_pem: pem,
                },
                PublicKey {
                    key_id: "0123456789abcdef".into(),
                    role: KeyRole::Response,
                    algorithm: sluice_protocol::keys::ALG_ED25519.into(),
                    public_key_pem: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
                        .into(),
                },
            ],
        }
    })
}

fn expect() -> Expect<'static> {
    Expect {
        device_id: DEVICE_ID,
        nonce: NONCE,
        now: time::macros::datetime!(2026-01-01 00:00 UTC),
        last_serial: Some(LAST_SERIAL),
        product: PRODUCT,
        channel: CHANNEL,
        arch: ARCH,
        current: None,
    }
}

/// Input: a flag byte, then either `header\nbody` as they arrive, or (with
/// [`SIGN_HERE`]) two bytes of position, one byte to xor and the body, which
/// is signed here. An answer the agent accepts was signed by a trusted key and
/// its offer obeys the agent's rules; the trusted key's signature verifies and
/// no single-byte change of the body does.
pub fn signed_response(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let keys = trusted_keys();
    if flags & SIGN_HERE == 0 {
        let (header, body) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let header = String::from_utf8_lossy(header);
        let verified = keys.verify_response(&header, body).is_ok();
        if verified {
            // Only the trusted key (of which the fuzzer knows no secret) signs.
            assert_eq!(
                keys.verify_response(&response_signer().sign_header(body), body),
                Ok(())
            );
        }
        if let Ok(answer) = verify_answer(keys, &header, body, &expect()) {
            assert!(verified, "an answer was accepted without a valid signature");
            check_accepted(&answer);
        }
        return;
    }
    let [lo, hi, xor, body @ ..] = rest else {
        return;
    };
    let signer = response_signer();
    let header = signer.sign_header(body);
    assert_eq!(keys.verify_response(&header, body), Ok(()));
    if let Ok(answer) = verify_answer(keys, &header, body, &expect()) {
        check_accepted(&answer);
    }
    if body.is_empty() {
        return;
    }
    let mut changed = body.to_vec();
    changed[usize::from(u16::from_le_bytes([*lo, *hi])) % body.len()] ^= (*xor).max(1);
    assert_eq!(
        keys.verify_response(&header, &changed),
        Err(sluice_protocol::Error::BadSignature(signer.key_id().into())),
        "a changed body still verifies"
    );
    assert!(verify_answer(keys, &header, &changed, &expect()).is_err());
}

/// An answer `verify_answer` accepted: it is for this device, nonce and question, and
/// an offer `check_offer` accepts is signed for its digest, version and product.
fn check_accepted(answer: &sluice_protocol::ResolveResponse) {
    assert_eq!(answer.device_id, DEVICE_ID);
    assert_eq!(answer.nonce, NONCE);
    assert!(answer.serial >= LAST_SERIAL);
    // It answers the question this device asked, not one rewritten on the way.
    assert_eq!(answer.product.as_deref(), Some(PRODUCT));
    assert_eq!(answer.channel.as_deref(), Some(CHANNEL));
    assert_eq!(answer.arch.as_deref(), Some(ARCH));
    assert_eq!(answer.current, None);
    let Ok(Some(offer)) = check_offer(trusted_keys(), answer, PRODUCT, Some(CURRENT_VERSION))
    else {
        return;
    };
    assert!(answer.update);
    assert!(offer.image.ends_with(&format!("@{}", offer.digest)));
    sluice_protocol::simplesigning::verify_image_signature(
        trusted_keys(),
        &offer.signature,
        &offer.digest,
        PRODUCT,
        &offer.version,
    )
    .expect("an accepted offer's image signature verifies");
    let target = semver::Version::parse(&offer.version).expect("an accepted version is SemVer");
    let current = semver::Version::parse(CURRENT_VERSION).unwrap();
    assert!(
        target >= current || answer.downgrade,
        "a downgrade was accepted"
    );
}

// ------------------------------------------------------------------------ toc

/// Input: one flag byte, then a `zstd:chunked` table of contents: JSON the
/// harness compresses (flag bit 1 clear), or compressed bytes as given.
/// Either way the location names its true digest and lengths, so the parser
/// gets past them. Whatever it accepts: at most the cap of entries, every
/// file with content named by a sha256 digest and a non-empty range inside
/// the data, ranges ascending without overlap and no larger than their
/// file could compress to; and every entry's tar header records read back
/// (through the `tar` crate) as one entry with the entry's name, link,
/// type and size.
pub fn toc(data: &[u8]) {
    use sluice_agent::chunked::{Kind, TocLocation, header, parse_toc};
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let compressed = if flags & 1 == 0 {
        zstd::stream::encode_all(rest, 1).unwrap()
    } else {
        rest.to_vec()
    };
    let mut plain = Vec::new();
    let uncompressed = match zstd::stream::read::Decoder::new(&compressed[..]) {
        Ok(d) => match std::io::Read::read_to_end(
            &mut std::io::Read::take(d, sluice_agent::chunked::MAX_TOC_BYTES + 1),
            &mut plain,
        ) {
            Ok(n) => n as u64,
            Err(_) => 0,
        },
        Err(_) => 0,
    };
    const DATA: u64 = 1 << 40;
    let loc = TocLocation {
        offset: DATA,
        length: compressed.len() as u64,
        uncompressed,
        digest: sluice_protocol::sha256_digest(&compressed),
    };
    let Ok(toc) = parse_toc(compressed, &loc) else {
        return;
    };
    assert!(toc.entries.len() <= sluice_agent::chunked::MAX_TOC_ENTRIES);
    let mut end = 0;
    for e in &toc.entries {
        if let Some((_, start, stop)) = &e.content {
            assert!(
                *start >= end && start < stop && *stop <= DATA,
                "{start}..{stop} after {end}"
            );
            assert!(stop - start <= e.size + e.size / 1024 + 1024);
            assert!(e.kind == Kind::Reg && e.size > 0);
            end = *stop;
        }
        let Ok(bytes) = header(e) else { continue };
        assert_eq!(bytes.len() % 512, 0);
        let mut tar_bytes = bytes.clone();
        tar_bytes.extend(std::iter::repeat_n(
            0u8,
            e.size.div_ceil(512) as usize * 512 + 1024,
        ));
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let mut entries = archive.entries().expect("a tar stream");
        let got = entries
            .next()
            .expect("one entry")
            .expect("a readable header");
        let name = e.name.as_bytes();
        // The `tar` crate drops one trailing `/` of a PAX path.
        let got_path = got.path_bytes();
        assert!(
            got_path.as_ref() == name || [got_path.as_ref(), b"/"].concat() == name,
            "{:?} read back as {:?}",
            e.name,
            String::from_utf8_lossy(&got_path)
        );
        if !e.link.is_empty() {
            assert_eq!(got.link_name_bytes().as_deref(), Some(e.link.as_bytes()));
        }
        assert_eq!(got.header().entry_size().unwrap(), e.size);
    }
}
