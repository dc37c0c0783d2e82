//! The `zstd:chunked` layer format's table of contents (containers/storage;
//! written by podman, buildah and `skopeo copy --dest-compress-format
//! zstd:chunked`): where a layer's descriptor says it is, and what a table
//! must say to be used. The agent uses it for partial pulls, the server to
//! tell how many bytes an upgrade fetches. No I/O, so it can be fuzzed.
//!
//! A `zstd:chunked` blob is a `tar+zstd` stream in which every regular
//! file's content is its own zstd frame, followed by the table (compressed
//! JSON) in a skippable frame. The descriptor's annotations name the
//! table's position and digest, and the descriptor is covered by the
//! manifest's digest.

use base64::Engine;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Ranges of files to fetch closer than this are fetched in one request,
/// gap and all.
pub const MAX_GAP: u64 = 4 << 10;
/// Most bytes one range request asks for.
pub const MAX_REQUEST: u64 = 64 << 20;

/// The range requests that fetch `ranges` (`[start, end)`, ascending, as a
/// checked table lists them): neighbours closer than [`MAX_GAP`] share a
/// request of at most [`MAX_REQUEST`] bytes. The agent fetches these; the
/// server counts them to tell what an upgrade costs.
pub fn coalesce(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some((s, e)) if start >= *e && start - *e <= MAX_GAP && end - *s <= MAX_REQUEST => {
                *e = end
            }
            _ => out.push((start, end)),
        }
    }
    out
}

/// Why a table of contents cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TocError(pub String);

/// `bail!` for [`TocError`].
macro_rules! bail {
    ($($t:tt)*) => { return Err(TocError(format!($($t)*))) };
}

/// The largest zstd window a layer may use, as a power of two: 32 MiB. The
/// `zstd` CLI's levels 1–19 use at most 8 MiB; skopeo's `zstd:chunked`
/// writer declares 32 MiB for its streamed frames. A decoder keeps one
/// window in memory, so a layer made with `--long=27` or `--ultra` (up to
/// 2 GiB) is refused rather than allowed to take a device's memory.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 25;

/// The descriptor annotations that locate the table of contents: the
/// current names, and the `io.github.` ones of older writers.
const CHECKSUM_KEYS: [&str; 2] = [
    "io.containers.zstd-chunked.manifest-checksum",
    "io.github.containers.zstd-chunked.manifest-checksum",
];
const POSITION_KEYS: [&str; 2] = [
    "io.containers.zstd-chunked.manifest-position",
    "io.github.containers.zstd-chunked.manifest-position",
];

/// Most bytes of compressed table the agent fetches.
pub const MAX_TOC_COMPRESSED: u64 = 8 << 20;
/// Most bytes of table JSON it reads (a 500 MB OS image with 20 000 files
/// has about 6 MB).
pub const MAX_TOC_BYTES: u64 = 32 << 20;
/// Most entries a table may list.
pub const MAX_TOC_ENTRIES: usize = 400_000;

/// Where a layer's table of contents is, from its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocLocation {
    /// Its first byte in the blob.
    pub offset: u64,
    /// Its compressed length.
    pub length: u64,
    /// Its length once decompressed.
    pub uncompressed: u64,
    /// The digest of its compressed bytes.
    pub digest: String,
}

/// The table's location when a layer of `size` bytes with `annotations`
/// is `zstd:chunked` (`None` for any other layer), or why its annotations
/// cannot be used.
pub fn toc_location(
    annotations: &BTreeMap<String, String>,
    size: u64,
) -> Option<Result<TocLocation, TocError>> {
    let get = |keys: &[&str; 2]| keys.iter().find_map(|k| annotations.get(*k));
    let (digest, position) = (get(&CHECKSUM_KEYS), get(&POSITION_KEYS));
    if digest.is_none() && position.is_none() {
        return None;
    }
    Some((|| {
        let (Some(digest), Some(position)) = (digest, position) else {
            bail!("the layer names a table of contents without both its position and checksum");
        };
        if !crate::is_sha256_digest(digest) {
            bail!("the table of contents checksum {digest:?} is not a sha256 digest");
        }
        let parts: Vec<u64> = position
            .split(':')
            .map(|p| p.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| TocError(format!("table of contents position {position:?}: {e}")))?;
        let [offset, length, uncompressed, kind] = parts[..] else {
            bail!("table of contents position {position:?} is not offset:length:size:type");
        };
        if kind != 1 {
            bail!("table of contents type {kind} is not the one known (1)");
        }
        if length == 0 || length > MAX_TOC_COMPRESSED || uncompressed > MAX_TOC_BYTES {
            bail!(
                "table of contents of {length} bytes ({uncompressed} uncompressed) is past the caps ({MAX_TOC_COMPRESSED}, {MAX_TOC_BYTES})"
            );
        }
        if offset.checked_add(length).is_none_or(|end| end > size) {
            bail!("table of contents at {offset}+{length} lies outside the {size}-byte layer");
        }
        Ok(TocLocation {
            offset,
            length,
            uncompressed,
            digest: digest.clone(),
        })
    })())
}

/// What one entry of the table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (whiteouts included: `.wh.` names).
    Reg,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A hard link to an earlier entry.
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
}

/// One entry of a checked table of contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// Its path in the layer, as written.
    pub name: String,
    /// The link target (symlinks, hard links).
    pub link: String,
    /// Permission bits and set-id bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Content size (regular files).
    pub size: u64,
    /// Device numbers (devices).
    pub dev: (u32, u32),
    /// Extended attributes.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// The content's SHA-256 and its compressed range `[start, end)` in the
    /// blob: regular files with content.
    pub content: Option<([u8; 32], u64, u64)>,
}

impl Entry {
    /// Its path as an unpacked tree names it: the name without a leading
    /// `./` or a trailing `/`.
    pub fn path(&self) -> &str {
        self.name.trim_start_matches("./").trim_end_matches('/')
    }
}

/// A checked table of contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toc {
    /// Its entries in layer order (chunk entries left out).
    pub entries: Vec<Entry>,
}

/// The table's top level as it is read: `version`, and `entries` checked
/// and converted one by one ([`convert`]) as they come, at most
/// [`MAX_TOC_ENTRIES`]; other keys are skipped. Why an entry was refused is
/// kept in `refused`, in [`TocError`]'s words (serde's error would add a
/// position to it).
struct TocSeed<'a> {
    data_limit: u64,
    refused: &'a std::cell::RefCell<Option<String>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for TocSeed<'_> {
    type Value = (u32, Vec<Entry>);
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TocSeed<'_> {
    type Value = (u32, Vec<Entry>);
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a table of contents")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut version, mut entries) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => version = Some(map.next_value::<u32>()?),
                "entries" => {
                    entries = Some(map.next_value_seed(EntriesSeed {
                        data_limit: self.data_limit,
                        refused: self.refused,
                    })?)
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let version = version.ok_or_else(|| serde::de::Error::missing_field("version"))?;
        let entries = entries.ok_or_else(|| serde::de::Error::missing_field("entries"))?;
        Ok((version, entries))
    }
}

struct EntriesSeed<'a> {
    data_limit: u64,
    refused: &'a std::cell::RefCell<Option<String>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<Entry>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<Entry>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of entries")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Entry>, A::Error> {
        let refuse = |msg: String| {
            *self.refused.borrow_mut() = Some(msg.clone());
            serde::de::Error::custom(msg)
        };
        let mut entries = Vec::new();
        let mut data_end = 0u64;
        let mut i = 0usize;
        while let Some(raw) = seq.next_element::<RawEntry>()? {
            if i >= MAX_TOC_ENTRIES {
                return Err(refuse(format!(
                    "the table of contents lists more than {MAX_TOC_ENTRIES} entries"
                )));
            }
            if let Some(e) =
                convert(i, raw, &mut data_end, self.data_limit).map_err(|e| refuse(e.0))?
            {
                entries.push(e);
            }
            i += 1;
        }
        entries.shrink_to_fit();
        Ok(entries)
    }
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(rename = "linkName", default)]
    link_name: String,
    #[serde(default)]
    mode: u32,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    uid: u64,
    #[serde(default)]
    gid: u64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(rename = "devMajor", default)]
    dev_major: u32,
    #[serde(rename = "devMinor", default)]
    dev_minor: u32,
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    offset: u64,
    #[serde(rename = "endOffset", default)]
    end_offset: u64,
}

/// The most compressed bytes a file of `size` bytes may take: zstd stores
/// incompressible data raw, with a few bytes per 128 KiB block and frame.
fn max_compressed(size: u64) -> u64 {
    size.saturating_add(size / 1024).saturating_add(1024)
}

/// Checks the table's compressed bytes against `loc` (digest, length),
/// decompresses them (at most [`MAX_TOC_BYTES`], windows capped as for
/// layers) and checks what the table says: version 1, at most
/// [`MAX_TOC_ENTRIES`] entries of known types, every file with content
/// named by a sha256 digest and a non-empty range inside the blob's data
/// (before the table), ranges in ascending order without overlap and no
/// larger than their file could compress to. No I/O, so it can be fuzzed.
/// Takes the compressed bytes to free them before the parse.
pub fn parse_toc(compressed: Vec<u8>, loc: &TocLocation) -> Result<Toc, TocError> {
    if compressed.len() as u64 != loc.length {
        bail!(
            "the table of contents is {} bytes, not the {} its position says",
            compressed.len(),
            loc.length
        );
    }
    let got = crate::sha256_digest(&compressed);
    if got != loc.digest {
        bail!(
            "the table of contents hashes to {got}, not {}: refused",
            loc.digest
        );
    }
    if loc.uncompressed > MAX_TOC_BYTES {
        bail!(
            "the table of contents would decompress to {} bytes, more than {MAX_TOC_BYTES}",
            loc.uncompressed
        );
    }
    // Decompressed in one call into a buffer of exactly the size the signed
    // position names: the decoder needs no window of its own (a streaming
    // one would keep all it decodes anyway: containers/storage declares a
    // 32 MiB window and no content size), and a table that would grow past
    // the buffer fails here.
    let mut text = Vec::with_capacity(loc.uncompressed as usize);
    zstd::bulk::Decompressor::new()
        .and_then(|mut d| {
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            d.decompress_to_buffer(&compressed, &mut text)
        })
        .map_err(|e| {
            TocError(format!(
                "decompressing the table of contents (at most the {} bytes its position says): {e}",
                loc.uncompressed
            ))
        })?;
    // The compressed bytes go before the parse: the text is the agent's
    // largest buffer (a 31 000-file layer's table is 3 MB compressed, 19 MB
    // of text), and the parse below gives it back as the entries grow.
    drop(compressed);
    if text.len() as u64 != loc.uncompressed {
        bail!(
            "the table of contents decompresses to {} bytes, not the {} its position says",
            text.len(),
            loc.uncompressed
        );
    }
    // Each entry is checked and converted as it is parsed: the raw entries
    // are never all in memory, and the text gives its pages back behind the
    // parser, so the text and the entries made from it are never both whole.
    let refused = std::cell::RefCell::new(None);
    let seed = TocSeed {
        data_limit: loc.offset,
        refused: &refused,
    };
    let reader = std::io::BufReader::with_capacity(64 << 10, Releasing::new(text));
    let mut de = serde_json::Deserializer::from_reader(reader);
    let (version, entries) = serde::de::DeserializeSeed::deserialize(seed, &mut de)
        .and_then(|t| de.end().map(|()| t))
        .map_err(|e| {
            TocError(
                refused
                    .take()
                    .unwrap_or_else(|| format!("the table of contents is not valid JSON: {e}")),
            )
        })?;
    if version != 1 {
        bail!("table of contents version {version} is not 1");
    }
    Ok(Toc { entries })
}

/// Reads a buffer once, front to back, and gives the pages it has read
/// back to the kernel every [`Releasing::STEP`] bytes: the 19 MB text of a
/// large table then shrinks while the entries parsed from it grow, instead
/// of both being whole at the end of the parse (the agent's peak memory).
struct Releasing {
    buf: Vec<u8>,
    /// Next byte to read.
    pos: usize,
    /// Bytes before this were given back (a page boundary, or 0).
    released: usize,
}

impl Releasing {
    /// How far the reader gets before it gives pages back.
    const STEP: usize = 1 << 20;

    fn new(buf: Vec<u8>) -> Self {
        Releasing {
            buf,
            pos: 0,
            released: 0,
        }
    }

    /// Gives back the whole pages of `buf` that lie before `pos`.
    fn release(&mut self) {
        let page = rustix::param::page_size();
        let base = self.buf.as_mut_ptr() as usize;
        let start = (base + self.released).next_multiple_of(page);
        let end = (base + self.pos) / page * page;
        if end <= start {
            return;
        }
        // SAFETY: [start, end) lies inside `buf`'s allocation (whole pages
        // between its first byte and `pos <= len`), made from the `&mut`
        // pointer of a buffer this reader owns, and no reference into it
        // is alive: `read` copies bytes out and never looks before `pos`
        // again. MADV_DONTNEED on private anonymous memory only makes those
        // pages read as zeros; the allocator's own bookkeeping lies outside
        // the range, and the memory stays mapped and writable for it.
        // Failing to give pages back costs memory, not correctness: move on
        // rather than ask again at every read.
        #[allow(unsafe_code)]
        let _ = unsafe {
            rustix::mm::madvise(
                start as *mut std::ffi::c_void,
                end - start,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
        self.released = end - base;
    }
}

impl std::io::Read for Releasing {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos - self.released >= Self::STEP {
            self.release();
        }
        Ok(n)
    }
}

/// Checks one entry of the table (the `i`th) and makes it an [`Entry`]
/// (`None` for a chunk entry); `data_end` is where the previous file's
/// range ended, and moves on.
fn convert(
    i: usize,
    e: RawEntry,
    data_end: &mut u64,
    data_limit: u64,
) -> Result<Option<Entry>, TocError> {
    let kind = match e.kind.as_str() {
        "reg" => Kind::Reg,
        "dir" => Kind::Dir,
        "symlink" => Kind::Symlink,
        "hardlink" => Kind::Hardlink,
        "char" => Kind::Char,
        "block" => Kind::Block,
        "fifo" => Kind::Fifo,
        // The pieces of a file already described whole by its entry.
        "chunk" => return Ok(None),
        other => bail!("table of contents entry {i} has unknown type {other:?}"),
    };
    let what = || format!("table of contents entry {i} ({:?})", e.name);
    let mtime = match e.modtime.as_deref() {
        None | Some("") => 0,
        Some(t) => time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map_err(|e| TocError(format!("{}: modtime {t:?}: {e}", what())))?
            .unix_timestamp(),
    };
    let mut xattrs = Vec::with_capacity(e.xattrs.len());
    for (k, v) in e.xattrs {
        let value = base64::engine::general_purpose::STANDARD
            .decode(&v)
            .map_err(|e| TocError(format!("{}: xattr {k:?} is not base64: {e}", what())))?;
        xattrs.push((k, value));
    }
    let content = if kind == Kind::Reg && e.size > 0 {
        let Some(digest) = crate::sha256_bytes(&e.digest) else {
            bail!("{}: digest {:?} is not a sha256 digest", what(), e.digest);
        };
        if e.offset < *data_end {
            bail!(
                "{}: its range starts at {}, inside the one before (ending at {}): ranges must ascend without overlap",
                what(),
                e.offset,
                data_end
            );
        }
        if e.end_offset <= e.offset || e.end_offset > data_limit {
            bail!(
                "{}: range {}..{} is empty or outside the layer's data (0..{})",
                what(),
                e.offset,
                e.end_offset,
                data_limit
            );
        }
        if e.end_offset - e.offset > max_compressed(e.size) {
            bail!(
                "{}: {} compressed bytes for a {}-byte file",
                what(),
                e.end_offset - e.offset,
                e.size
            );
        }
        *data_end = e.end_offset;
        Some((digest, e.offset, e.end_offset))
    } else {
        None
    };
    Ok(Some(Entry {
        kind,
        name: e.name,
        link: e.link_name,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime,
        size: if kind == Kind::Reg { e.size } else { 0 },
        dev: (e.dev_major, e.dev_minor),
        xattrs,
        content,
    }))
}

/// The regular files with content an image's layers leave, by path
/// ([`Entry::path`]), from their tables (lowest layer first): each layer's
/// whiteouts (`.wh.NAME`, and `.wh..wh..opq` for a whole directory) remove
/// what the layers below put there, then its files are added.
pub fn image_files<'a>(tocs: impl IntoIterator<Item = &'a Toc>) -> BTreeMap<&'a str, [u8; 32]> {
    let mut files: BTreeMap<&'a str, [u8; 32]> = BTreeMap::new();
    for toc in tocs {
        for e in &toc.entries {
            let path = e.path();
            let (dir, base) = match path.rsplit_once('/') {
                Some((d, b)) => (format!("{d}/"), b),
                None => (String::new(), path),
            };
            let gone = if base == ".wh..wh..opq" {
                dir
            } else if let Some(hidden) = base.strip_prefix(".wh.") {
                let hidden = format!("{dir}{hidden}");
                files.remove(hidden.as_str());
                format!("{hidden}/")
            } else {
                continue;
            };
            let under: Vec<&str> = files
                .range::<str, _>((
                    std::ops::Bound::Included(gone.as_str()),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(&gone))
                .map(|(k, _)| *k)
                .collect();
            for k in under {
                files.remove(k);
            }
        }
        for e in &toc.entries {
            let path = e.path();
            let whiteout = path
                .rsplit('/')
                .next()
                .is_some_and(|b| b.starts_with(".wh."));
            match &e.content {
                Some((digest, _, _)) if !whiteout => {
                    files.insert(path, *digest);
                }
                // Anything else at a path replaces a file there.
                _ => {
                    files.remove(path);
                }
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toc(entries: &[(&str, Option<u8>)]) -> Toc {
        Toc {
            entries: entries
                .iter()
                .map(|(name, d)| Entry {
                    kind: if d.is_some() || name.contains(".wh.") {
                        Kind::Reg
                    } else {
                        Kind::Dir
                    },
                    name: name.to_string(),
                    link: String::new(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                    size: d.map_or(0, |_| 1),
                    dev: (0, 0),
                    xattrs: vec![],
                    content: d.map(|n| ([n; 32], 0, 1)),
                })
                .collect(),
        }
    }

    #[test]
    fn image_files_apply_each_layers_whiteouts_to_the_layers_below() {
        let lower = toc(&[
            ("./etc/", None),
            ("./etc/a", Some(1)),
            ("./etc/b", Some(2)),
            ("./opt/x/y", Some(3)),
            ("./var/cache/c", Some(4)),
            ("./keep", Some(5)),
        ]);
        let upper = toc(&[
            ("etc/.wh.a", None),
            ("opt/.wh.x", None),
            ("var/cache/.wh..wh..opq", None),
            ("var/cache/d", Some(6)),
            ("etc/b", None),
            ("./keep", Some(7)),
        ]);
        let files = image_files([&lower, &upper]);
        assert_eq!(
            files,
            BTreeMap::from([("keep", [7; 32]), ("var/cache/d", [6; 32])])
        );
        assert_eq!(image_files([&lower]).len(), 5);
    }

    #[test]
    fn neighbours_share_a_request() {
        assert_eq!(
            coalesce([(0, 10), (20, 30), (30 + MAX_GAP + 1, 30 + MAX_GAP + 5)]),
            vec![(0, 30), (30 + MAX_GAP + 1, 30 + MAX_GAP + 5)]
        );
        assert_eq!(
            coalesce([(0, MAX_REQUEST), (MAX_REQUEST, MAX_REQUEST + 1)]),
            vec![(0, MAX_REQUEST), (MAX_REQUEST, MAX_REQUEST + 1)]
        );
        assert!(coalesce([]).is_empty());
    }

    #[test]
    fn a_releasing_reader_reads_every_byte_and_gives_back_what_it_passed() {
        use std::io::Read;
        let data: Vec<u8> = (0..5 * Releasing::STEP + 123)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        // Reads of odd sizes cross page and step boundaries anywhere.
        let mut r = Releasing::new(data.clone());
        let (mut out, mut chunk) = (Vec::new(), [0u8; 4093]);
        loop {
            let n = r.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(out, data);
        // All but the last step's pages went back, whole pages only.
        let page = rustix::param::page_size();
        let base = r.buf.as_ptr() as usize;
        assert!(r.released >= 4 * Releasing::STEP, "{}", r.released);
        assert!(r.released <= r.pos);
        assert_eq!((base + r.released) % page, 0);
        // What went back reads as zeros: the pages were really returned.
        let first = (base.next_multiple_of(page) - base)..r.released;
        assert!(r.buf[first].iter().all(|&b| b == 0));
    }
}
