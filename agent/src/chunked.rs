//! Partial pulls of `zstd:chunked` layers: fetch only the files the running
//! slot lacks.
//!
//! A `zstd:chunked` layer (containers/storage's format, written by podman,
//! buildah and `skopeo copy --dest-compress-format zstd:chunked`) is a
//! `tar+zstd` blob in which every regular file's content is its own zstd
//! frame, followed by a table of contents in a skippable frame. The layer's
//! descriptor carries where that table is and its digest
//! (`io.containers.zstd-chunked.manifest-position` and `…-checksum`), and the
//! descriptor is covered by the signed manifest digest.
//!
//! The agent fetches the table with a range request and checks its digest
//! ([`parse_toc`] refuses a table that lies about its own shape: offsets out
//! of the data, overlapping or out of order, ranges far larger than their
//! file, too many entries). It then writes the layer as a tar stream made
//! from the table ([`ChunkedTar`]) through the same [`Unpacker`] a full pull
//! uses, so paths, whiteouts, hard links, owners, modes and xattrs get the
//! same checks. Each regular file's bytes come from the running slot when
//! the agent's index says a file there has the same digest, or from a range
//! of the blob; either way they are hashed as they pass and a file whose
//! bytes do not match the table's digest and size fails the layer. Ranges
//! of neighbouring files are fetched together (gaps under [`MAX_GAP`]), and
//! up to [`RANGES_PER_REQUEST`] ranges in one request, answered as
//! `multipart/byteranges` (a registry answers each request after a few
//! milliseconds of its own work: one request per range would cost more
//! than the bytes); a registry that does not serve several ranges at once
//! is asked one range at a time. On any failure the
//! caller then writes the whole image again with full pulls: a registry or
//! proxy that answers 200 instead of 206, a wrong `Content-Range` or length,
//! a local file that changed, a table that does not describe the layer all
//! end in a full pull, never in a slot that differs from one.
//!
//! [`Unpacker`]: crate::unpack::Unpacker

use crate::registry::{Descriptor, ImageRef, Registry, Verified};
use anyhow::Context;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};
use std::io::Read;

pub use sluice_protocol::chunked::{
    Entry, Kind, MAX_GAP, MAX_REQUEST, MAX_TOC_BYTES, MAX_TOC_COMPRESSED, MAX_TOC_ENTRIES, Toc,
    TocError, TocLocation, coalesce, parse_toc,
};

use std::os::fd::OwnedFd;
use std::path::Path;

/// Most ranges asked for in one request: the `Range` header stays a few
/// KiB, which proxies and registries accept.
pub const RANGES_PER_REQUEST: usize = 100;

/// The table's location when `d` is a `zstd:chunked` layer (`None` for any
/// other layer), or why its annotations cannot be used.
pub fn toc_location(d: &Descriptor) -> Option<Result<TocLocation, TocError>> {
    sluice_protocol::chunked::toc_location(&d.annotations, d.size)
}

/// Fetches and checks the table of contents of a `zstd:chunked` layer.
pub fn fetch_toc(
    registry: &Registry,
    image: &ImageRef,
    d: &Descriptor,
    loc: &TocLocation,
) -> anyhow::Result<Toc> {
    let mut bytes = Vec::new();
    registry
        .range(image, d, loc.offset, loc.offset + loc.length)?
        .read_to_end(&mut bytes)
        .context("reading the table of contents")?;
    Ok(parse_toc(bytes, loc)?)
}

/// The tar header records for `e`: a PAX header with its path, link target,
/// owners past ustar's range and xattrs, then a ustar header. Names go
/// through PAX as written, so the unpacker checks them as it checks a full
/// layer's.
pub fn header(e: &Entry) -> std::io::Result<Vec<u8>> {
    let mut records: Vec<(String, Vec<u8>)> = vec![("path".into(), e.name.clone().into_bytes())];
    if !e.link.is_empty() {
        records.push(("linkpath".into(), e.link.clone().into_bytes()));
    }
    const USTAR_MAX_ID: u64 = 0o7777777;
    if e.uid > USTAR_MAX_ID {
        records.push(("uid".into(), e.uid.to_string().into_bytes()));
    }
    if e.gid > USTAR_MAX_ID {
        records.push(("gid".into(), e.gid.to_string().into_bytes()));
    }
    if !(0..=0o77777777777).contains(&e.mtime) {
        records.push(("mtime".into(), e.mtime.to_string().into_bytes()));
    }
    for (k, v) in &e.xattrs {
        records.push((format!("SCHILY.xattr.{k}"), v.clone()));
    }
    let mut out = pax_header(&records);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(match e.kind {
        Kind::Reg => tar::EntryType::Regular,
        Kind::Dir => tar::EntryType::Directory,
        Kind::Symlink => tar::EntryType::Symlink,
        Kind::Hardlink => tar::EntryType::Link,
        Kind::Char => tar::EntryType::Char,
        Kind::Block => tar::EntryType::Block,
        Kind::Fifo => tar::EntryType::Fifo,
    });
    // The real name is in the PAX record; this one only fills the field.
    h.as_old_mut().name[..7].copy_from_slice(b"chunked");
    h.set_mode(e.mode & 0o7777);
    h.set_uid(e.uid.min(USTAR_MAX_ID));
    h.set_gid(e.gid.min(USTAR_MAX_ID));
    h.set_mtime(e.mtime.clamp(0, 0o77777777777) as u64);
    h.set_size(e.size);
    if matches!(e.kind, Kind::Char | Kind::Block) {
        h.set_device_major(e.dev.0)?;
        h.set_device_minor(e.dev.1)?;
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// A PAX extended header (`x`) holding `records`, padded to whole blocks.
fn pax_header(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        // "<len> <key>=<value>\n", where <len> counts its own digits.
        let rest = k.len() + v.len() + 3;
        let mut len = rest + rest.to_string().len();
        if len.to_string().len() != rest.to_string().len() {
            len = rest + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.as_old_mut().name[..9].copy_from_slice(b"PaxHeader");
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let padded = data.len().div_ceil(512) * 512;
    data.resize(padded, 0);
    out.extend_from_slice(&data);
    out
}

/// The agent's index of a slot's regular files by content digest, written
/// after the slot was written from tables of contents. It only says where
/// to look: every byte copied from it is hashed again.
///
/// On disk it is JSON, `{"files": {"sha256:<hex>": "<path>", ...}}`; in
/// memory a sorted list of digests and paths (a 400 000-file slot's index
/// takes about 40 bytes per file plus its paths).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Index {
    /// Content digest and a path (relative to the slot root) that held it,
    /// sorted by digest, one path per digest.
    files: Vec<([u8; 32], Box<str>)>,
}

impl Index {
    /// A path that held content `digest`.
    pub fn get(&self, digest: &[u8; 32]) -> Option<&str> {
        let i = self.files.binary_search_by(|(d, _)| d.cmp(digest)).ok()?;
        Some(&self.files[i].1)
    }

    /// How many digests it knows.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether it knows none.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Reads the index at `path`; an absent or unreadable one is empty. The
    /// file is read whole and parsed from memory (serde_json parses a slice
    /// several times faster than a reader), before the pull starts.
    pub fn load(path: &Path) -> Index {
        let Ok(text) = std::fs::read(path) else {
            return Index::default();
        };
        let Ok(OnDisk { files: mut list }) = serde_json::from_slice(&text) else {
            return Index::default();
        };
        drop(text);
        one_per_digest(&mut list.0);
        list.0.shrink_to_fit();
        Index { files: list.0 }
    }

    /// Stages (writes and syncs beside `path`, [`crate::fsutil::stage`]) the
    /// index of an image from its layers' tables, lowest first: the files
    /// its layers leave (whiteouts applied,
    /// [`sluice_protocol::chunked::image_files`]), one path per digest.
    /// It is streamed to the file, never held encoded.
    pub fn stage<'a>(
        tocs: impl IntoIterator<Item = &'a Toc>,
        path: &Path,
    ) -> std::io::Result<crate::fsutil::Staged> {
        let mut files: Vec<([u8; 32], &str)> = sluice_protocol::chunked::image_files(tocs)
            .into_iter()
            .map(|(path, digest)| (digest, path))
            .collect();
        one_per_digest(&mut files);
        crate::fsutil::stage(path, |w| {
            struct Files<'b>(&'b [([u8; 32], &'b str)]);
            impl Serialize for Files<'_> {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.collect_map(
                        self.0
                            .iter()
                            .map(|(d, p)| (sluice_protocol::sha256_string(d), p)),
                    )
                }
            }
            #[derive(Serialize)]
            struct Out<'b> {
                files: Files<'b>,
            }
            serde_json::to_writer(
                w,
                &Out {
                    files: Files(&files),
                },
            )?;
            Ok(())
        })
    }
}

/// Sorts `files` by digest and keeps one path per digest (the first).
fn one_per_digest<P>(files: &mut Vec<([u8; 32], P)>) {
    files.sort_unstable_by_key(|a| a.0);
    files.dedup_by(|a, b| a.0 == b.0);
}

/// The index file's shape.
#[derive(Deserialize)]
struct OnDisk {
    files: DigestPaths,
}

/// `{"sha256:<hex>": "<path>", ...}`, read entry by entry into a list;
/// an entry whose key is not a sha256 digest fails the whole index.
struct DigestPaths(Vec<([u8; 32], Box<str>)>);

impl<'de> Deserialize<'de> for DigestPaths {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DigestPaths;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of sha256 digests to paths")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<DigestPaths, A::Error> {
                let mut out = Vec::new();
                while let Some((digest, path)) = map.next_entry::<String, String>()? {
                    let digest = sluice_protocol::sha256_bytes(&digest).ok_or_else(|| {
                        serde::de::Error::custom(format!("{digest:?} is not a sha256 digest"))
                    })?;
                    out.push((digest, path.into_boxed_str()));
                }
                Ok(DigestPaths(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A range of the blob.
    Fetch,
    /// The running slot, at the entry's own path.
    Here,
    /// The running slot, at another path.
    Elsewhere(Box<str>),
}

/// Where each file of a layer comes from, and how many bytes that is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per entry with content: where its bytes come from.
    pub local: Vec<Source>,
    /// The range requests, `[start, end)`, in blob order.
    pub requests: Vec<(u64, u64)>,
    /// Files copied and their bytes.
    pub copied: (u64, u64),
    /// Files fetched, and the compressed bytes the requests ask for.
    pub fetched: (u64, u64),
}

/// Plans a layer: a file whose digest the index knows, found under `root`
/// (without following symlinks) as a regular file of the right size, is
/// copied; the rest is fetched in coalesced ranges.
pub fn plan(toc: &Toc, index: &Index, root: Option<&OwnedFd>) -> Plan {
    let mut p = Plan::default();
    let mut fetch = Vec::new();
    for e in &toc.entries {
        let Some((digest, start, end)) = &e.content else {
            continue;
        };
        let here = root.and_then(|root| {
            let path = index.get(digest)?;
            let st = rustix::fs::statat(root, path, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok()?;
            let regular = rustix::fs::FileType::from_raw_mode(st.st_mode)
                == rustix::fs::FileType::RegularFile;
            (regular && st.st_size as u64 == e.size).then_some(path)
        });
        let source = match here {
            Some(path) if path == e.path() => Source::Here,
            Some(path) => Source::Elsewhere(path.into()),
            None => Source::Fetch,
        };
        if source == Source::Fetch {
            p.fetched.0 += 1;
            fetch.push((*start, *end));
        } else {
            p.copied.0 += 1;
            p.copied.1 += e.size;
        }
        p.local.push(source);
    }
    p.requests = coalesce(fetch);
    p.fetched.1 = p.requests.iter().map(|(s, e)| e - s).sum();
    p
}

/// Opens `path` under `root` for reading: no symlink followed, nothing
/// outside `root` reachable.
fn open_beneath(root: &OwnedFd, path: &str) -> std::io::Result<std::fs::File> {
    let fd = rustix::fs::openat2(
        root,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(std::fs::File::from(fd))
}

/// The bytes `[at, end)` of a range answer, where its body stands.
struct Slice {
    body: Box<dyn Read + Send>,
    left: u64,
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.body.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the range answer ended {} bytes early", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads and drops exactly `n` bytes of `body`.
fn skip(body: &mut Box<dyn Read + Send>, n: u64) -> std::io::Result<()> {
    let skipped = std::io::copy(&mut body.take(n), &mut std::io::sink())?;
    if skipped != n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the range answer ended {} bytes early", n - skipped),
        ));
    }
    Ok(())
}

type Inflated = zstd::stream::read::Decoder<'static, std::io::BufReader<Slice>>;

/// A part of the synthesized stream.
enum Part {
    /// Header records, padding or the end-of-archive blocks.
    Bytes(Vec<u8>, usize),
    /// A file's bytes from the running slot.
    Local(Verified<std::fs::File>),
    /// A file's bytes inflated from its range; when they end, the range
    /// answer's body goes back, standing at the file's end (the first
    /// offset), for the range ending at the second.
    Remote(Verified<Inflated>, u64, u64),
}

/// The layer as a tar stream made from its table of contents, each regular
/// file's bytes copied from the running slot or fetched and inflated, and
/// checked against the table's digest and size as they pass: a mismatch, a
/// short range or a missing file is a read error, which fails the layer.
pub struct ChunkedTar<'a> {
    registry: &'a Registry,
    image: &'a ImageRef,
    layer: &'a Descriptor,
    root: Option<&'a OwnedFd>,
    entries: std::vec::IntoIter<Entry>,
    local: std::vec::IntoIter<Source>,
    /// The planned ranges, and the next one to read.
    requests: Vec<(u64, u64)>,
    next: usize,
    /// The open range answer, the blob offset its body stands at, and where
    /// its current range ends.
    range: Option<(Box<dyn Read + Send>, u64, u64)>,
    /// When the open answer is multipart: its boundary and how many of its
    /// ranges are still to come.
    multipart: Option<(String, usize)>,
    /// The registry answered a multi-range request with something else: one
    /// range per request from then on.
    single: bool,
    parts: std::collections::VecDeque<Part>,
    ended: bool,
}

impl<'a> ChunkedTar<'a> {
    /// The stream for `layer`, as `plan` says to make it.
    pub fn new(
        registry: &'a Registry,
        image: &'a ImageRef,
        layer: &'a Descriptor,
        root: Option<&'a OwnedFd>,
        toc: Toc,
        plan: Plan,
    ) -> Self {
        ChunkedTar {
            registry,
            image,
            layer,
            root,
            entries: toc.entries.into_iter(),
            local: plan.local.into_iter(),
            requests: plan.requests,
            next: 0,
            range: None,
            multipart: None,
            single: false,
            parts: Default::default(),
            ended: false,
        }
    }

    /// The compressed bytes `[start, end)` of the blob, from the open range
    /// answer or the next planned range, and where that range ends.
    fn slice(&mut self, start: u64, end: u64) -> std::io::Result<(Slice, u64)> {
        if self.range.as_ref().is_none_or(|(_, _, r_end)| end > *r_end) {
            let (s, e) = *self.requests.get(self.next).ok_or_else(|| {
                std::io::Error::other("the layer plan has no range left for a file")
            })?;
            self.next += 1;
            if start < s || end > e {
                return Err(std::io::Error::other(
                    "a file lies outside its planned range",
                ));
            }
            let body = match (self.range.take(), self.multipart.as_mut()) {
                // The next part of the open multipart answer.
                (Some((mut body, at, r_end)), Some((boundary, left))) if *left > 0 => {
                    *left -= 1;
                    skip(&mut body, r_end - at)?;
                    crate::registry::read_part_header(&mut body, boundary, (s, e), self.layer.size)
                        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
                    body
                }
                _ => self.request(s, e)?,
            };
            self.range = Some((body, s, e));
        }
        let (mut body, at, r_end) = self.range.take().expect("a range is open");
        if start < at {
            return Err(std::io::Error::other("file ranges out of order"));
        }
        skip(&mut body, start - at)?;
        // The body comes back when the file ends (`Part::Remote`).
        Ok((
            Slice {
                body,
                left: end - start,
            },
            r_end,
        ))
    }

    /// Asks for the planned range `[s, e)` and those after it, up to
    /// [`RANGES_PER_REQUEST`] of them and [`MAX_REQUEST`] bytes in all, in
    /// one request; answers the body standing at `s`.
    fn request(&mut self, s: u64, e: u64) -> std::io::Result<Box<dyn Read + Send>> {
        let io = |e: anyhow::Error| std::io::Error::other(format!("{e:#}"));
        self.multipart = None;
        let mut batch = vec![(s, e)];
        let mut bytes = e - s;
        if !self.single {
            for &(s2, e2) in &self.requests[self.next..] {
                if batch.len() >= RANGES_PER_REQUEST || bytes + (e2 - s2) > MAX_REQUEST {
                    break;
                }
                batch.push((s2, e2));
                bytes += e2 - s2;
            }
        }
        if batch.len() > 1 {
            match self
                .registry
                .ranges(self.image, self.layer, &batch)
                .map_err(io)?
            {
                Some((mut body, boundary)) => {
                    crate::registry::read_part_header(
                        &mut body,
                        &boundary,
                        (s, e),
                        self.layer.size,
                    )
                    .map_err(io)?;
                    self.multipart = Some((boundary, batch.len() - 1));
                    return Ok(body);
                }
                None => {
                    crate::log(
                        "partial pull: the registry does not serve several ranges in one answer: one range per request",
                    );
                    self.single = true;
                }
            }
        }
        self.registry
            .range(self.image, self.layer, s, e)
            .map_err(io)
    }

    /// Queues the next entry's parts, or the end of the archive.
    fn next_entry(&mut self) -> std::io::Result<()> {
        let Some(e) = self.entries.next() else {
            self.parts.push_back(Part::Bytes(vec![0; 1024], 0));
            self.ended = true;
            return Ok(());
        };
        self.parts.push_back(Part::Bytes(header(&e)?, 0));
        let Some((digest, start, end)) = &e.content else {
            return Ok(());
        };
        let digest = sluice_protocol::sha256_string(digest);
        let source = self.local.next().unwrap_or(Source::Fetch);
        let local = match &source {
            Source::Fetch => None,
            Source::Here => Some(e.path()),
            Source::Elsewhere(path) => Some(&**path),
        };
        match (local, self.root) {
            (Some(path), Some(root)) => {
                let file = open_beneath(root, path).map_err(|err| {
                    std::io::Error::new(
                        err.kind(),
                        format!("copying {path} from the running slot: {err}"),
                    )
                })?;
                self.parts
                    .push_back(Part::Local(Verified::new(file, &digest, e.size)));
            }
            _ => {
                let (slice, r_end) = self.slice(*start, *end)?;
                let mut d = zstd::stream::read::Decoder::new(slice)?;
                d.window_log_max(crate::unpack::ZSTD_WINDOW_LOG_MAX)?;
                self.parts
                    .push_back(Part::Remote(Verified::new(d, &digest, e.size), *end, r_end));
            }
        }
        let pad = (512 - (e.size % 512) as usize) % 512;
        if pad > 0 {
            self.parts.push_back(Part::Bytes(vec![0; pad], 0));
        }
        Ok(())
    }
}

impl Read for ChunkedTar<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(part) = self.parts.front_mut() else {
                if self.ended {
                    return Ok(0);
                }
                self.next_entry()?;
                continue;
            };
            let n = match part {
                Part::Bytes(v, pos) => {
                    let n = buf.len().min(v.len() - *pos);
                    buf[..n].copy_from_slice(&v[*pos..*pos + n]);
                    *pos += n;
                    n
                }
                Part::Local(r) => r.read(buf)?,
                Part::Remote(r, _, _) => r.read(buf)?,
            };
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This part ended (and was verified): a range's body goes back.
            if let Some(Part::Remote(r, at, r_end)) = self.parts.pop_front() {
                let slice = r.into_inner().finish().into_inner();
                if slice.left != 0 {
                    return Err(std::io::Error::other(format!(
                        "{} bytes of a file's range were left over",
                        slice.left
                    )));
                }
                self.range = Some((slice.body, at, r_end));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A table as bytes, and where a blob of `data` bytes followed by it
    /// would say it is.
    fn table(v: serde_json::Value, data: u64) -> (Vec<u8>, TocLocation) {
        let json = serde_json::to_vec(&v).unwrap();
        let compressed = zstd::stream::encode_all(&json[..], 3).unwrap();
        let loc = TocLocation {
            offset: data,
            length: compressed.len() as u64,
            uncompressed: json.len() as u64,
            digest: sluice_protocol::sha256_digest(&compressed),
        };
        (compressed, loc)
    }

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn reg(name: &str, size: u64, offset: u64, end: u64) -> serde_json::Value {
        json!({"type": "reg", "name": name, "mode": 420, "size": size, "digest": digest(size as u8),
               "offset": offset, "endOffset": end, "modtime": "2024-05-01T10:00:00Z"})
    }

    fn refused(v: serde_json::Value, want: &str) {
        let (bytes, loc) = table(v, 10_000);
        let err = parse_toc(bytes.clone(), &loc).expect_err("a lying table was accepted");
        assert!(format!("{err:#}").contains(want), "{err:#} lacks {want:?}");
    }

    #[test]
    fn a_table_parses_into_checked_entries() {
        let (bytes, loc) = table(
            json!({"version": 1, "entries": [
                {"type": "dir", "name": "etc/", "mode": 493, "uid": 0, "gid": 0},
                reg("etc/a", 100, 10, 90),
                {"type": "chunk", "offset": 10, "endOffset": 50},
                {"type": "reg", "name": "etc/empty", "mode": 384, "size": 0},
                {"type": "symlink", "name": "l", "linkName": "etc/a"},
                {"type": "hardlink", "name": "h", "linkName": "etc/a"},
                {"type": "reg", "name": "x", "size": 5, "digest": digest(5), "offset": 90,
                 "endOffset": 120, "xattrs": {"user.k": "dmFsdWU="}, "uid": 1000, "gid": 1000},
            ]}),
            10_000,
        );
        let toc = parse_toc(bytes.clone(), &loc).unwrap();
        assert_eq!(toc.entries.len(), 6, "the chunk entry is left out");
        assert_eq!(toc.entries[1].content, Some(([100; 32], 10, 90)));
        assert_eq!(toc.entries[1].mtime, 1_714_557_600);
        assert_eq!(toc.entries[2].content, None);
        assert_eq!(toc.entries[3].kind, Kind::Symlink);
        assert_eq!(toc.entries[4].link, "etc/a");
        assert_eq!(
            toc.entries[5].xattrs,
            vec![("user.k".into(), b"value".to_vec())]
        );
        assert_eq!(toc.entries[5].uid, 1000);
    }

    #[test]
    fn a_table_that_lies_is_refused() {
        let ok = json!({"version": 1, "entries": [reg("a", 100, 0, 90)]});
        // Its bytes: another digest, another length, another size.
        let (bytes, loc) = table(ok.clone(), 10_000);
        let other = TocLocation {
            digest: digest(9),
            ..loc.clone()
        };
        assert!(
            format!("{:#}", parse_toc(bytes.clone(), &other).unwrap_err()).contains("hashes to")
        );
        assert!(parse_toc(bytes[1..].to_vec(), &loc).is_err());
        let bigger = TocLocation {
            uncompressed: loc.uncompressed + 1,
            ..loc.clone()
        };
        assert!(
            format!("{:#}", parse_toc(bytes.clone(), &bigger).unwrap_err())
                .contains("decompresses to")
        );
        // A table that grows past its stated size stops there.
        let smaller = TocLocation {
            uncompressed: loc.uncompressed - 1,
            ..loc.clone()
        };
        let err = format!("{:#}", parse_toc(bytes.clone(), &smaller).unwrap_err());
        assert!(err.contains("decompressing the table of contents"), "{err}");
        let huge = TocLocation {
            uncompressed: MAX_TOC_BYTES + 1,
            ..loc.clone()
        };
        assert!(
            format!("{:#}", parse_toc(bytes.clone(), &huge).unwrap_err()).contains("more than")
        );
        // What it says.
        refused(json!({"version": 2, "entries": []}), "version 2");
        refused(
            json!({"version": 1, "entries": [{"type": "socket", "name": "s"}]}),
            "unknown type",
        );
        refused(
            json!({"version": 1, "entries": [reg("a", 100, 0, 20_000)]}),
            "outside the layer's data",
        );
        refused(
            json!({"version": 1, "entries": [reg("a", 100, 50, 50)]}),
            "empty",
        );
        refused(
            json!({"version": 1, "entries": [reg("a", 100, 0, 90), reg("b", 101, 80, 150)]}),
            "ranges must ascend without overlap",
        );
        refused(
            json!({"version": 1, "entries": [reg("a", 100, 500, 590), reg("b", 101, 0, 80)]}),
            "ranges must ascend without overlap",
        );
        refused(
            json!({"version": 1, "entries": [reg("a", 10, 0, 5000)]}),
            "compressed bytes for a 10-byte file",
        );
        refused(
            json!({"version": 1, "entries": [{"type": "reg", "name": "a", "size": 3, "digest": "md5:x",
                                                "offset": 0, "endOffset": 10}]}),
            "not a sha256 digest",
        );
        refused(
            json!({"version": 1, "entries": [{"type": "dir", "name": "d", "modtime": "yesterday"}]}),
            "modtime",
        );
        refused(
            json!({"version": 1, "entries": [{"type": "reg", "name": "a", "xattrs": {"user.k": "!!"}}]}),
            "not base64",
        );
        refused(json!({"version": 1, "entries": {"a": 1}}), "not valid JSON");
        // Huge counts: more entries than the cap, in a few hundred KB.
        let many: Vec<_> = (0..=MAX_TOC_ENTRIES)
            .map(|_| json!({"type": "dir", "name": "d"}))
            .collect();
        refused(json!({"version": 1, "entries": many}), "more than 400000");
    }

    /// The index written from tables reads back as it was meant: one path
    /// per digest, the upper layer's whiteouts applied; a file that is not
    /// an index reads as an empty one.
    #[test]
    fn an_index_round_trips_through_its_file() {
        let entry = |name: &str, n: Option<u8>| Entry {
            kind: Kind::Reg,
            name: name.into(),
            link: String::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 1,
            dev: (0, 0),
            xattrs: vec![],
            content: n.map(|n| ([n; 32], 0, 1)),
        };
        let lower = Toc {
            entries: vec![
                entry("./a", Some(1)),
                entry("./b", Some(2)),
                entry("./c", Some(1)),
            ],
        };
        let upper = Toc {
            entries: vec![entry("./.wh.b", None), entry("./d", Some(3))],
        };
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("contents-A.json");
        let staged = Index::stage([&lower, &upper], &path).unwrap();
        assert_eq!(Index::load(&path), Index::default(), "not in place yet");
        staged.commit().unwrap();
        let index = Index::load(&path);
        assert_eq!(index.len(), 2);
        assert!(matches!(index.get(&[1; 32]), Some("a" | "c")));
        assert_eq!(index.get(&[2; 32]), None, "whited out");
        assert_eq!(index.get(&[3; 32]), Some("d"));
        // The file is the documented JSON.
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["files"][digest(3)], "d");
        for bad in [
            &b"{\"files\": {\"md5:x\": \"a\"}}"[..],
            b"[1, 2]",
            b"{\"files\": ",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(Index::load(&path).is_empty());
        }
    }

    fn descriptor(annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            digest: digest(1),
            size: 10_000,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_table_is_located_by_the_signed_annotations() {
        let d = digest(7);
        let at = |pos: &str| {
            toc_location(&descriptor(&[
                ("io.containers.zstd-chunked.manifest-checksum", &d),
                ("io.containers.zstd-chunked.manifest-position", pos),
            ]))
            .unwrap()
        };
        assert_eq!(
            at("9000:500:2000:1").unwrap(),
            TocLocation {
                offset: 9000,
                length: 500,
                uncompressed: 2000,
                digest: d.clone()
            }
        );
        // The older writers' names.
        assert!(
            toc_location(&descriptor(&[
                ("io.github.containers.zstd-chunked.manifest-checksum", &d),
                (
                    "io.github.containers.zstd-chunked.manifest-position",
                    "1:2:3:1"
                ),
            ]))
            .unwrap()
            .is_ok()
        );
        assert!(
            toc_location(&descriptor(&[])).is_none(),
            "not a chunked layer"
        );
        for (pos, want) in [
            ("9000:500:2000:2", "type 2"),
            ("9000:500:2000", "not offset:length:size:type"),
            ("9000:-1:2000:1", "position"),
            ("9800:500:2000:1", "outside the 10000-byte layer"),
            ("18446744073709551615:2:2:1", "outside"),
            ("0:0:0:1", "past the caps"),
            ("0:9000:99999999999:1", "past the caps"),
        ] {
            let err = at(pos).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{pos}: {err:#}");
        }
        let half = toc_location(&descriptor(&[(
            "io.containers.zstd-chunked.manifest-checksum",
            &d,
        )]));
        assert!(half.unwrap().is_err());
    }

    /// Names from a table go through the unpacker's checks like a tar's:
    /// `..` is refused, a symlink is never followed out of the slot, a name
    /// longer than ustar's fields arrives whole.
    #[test]
    fn names_from_a_table_get_the_unpackers_checks() {
        let registry = Registry::new(&crate::config::Registry::default()).unwrap();
        let image = ImageRef::parse(&format!("127.0.0.1:1/x@{}", digest(1))).unwrap();
        let layer = descriptor(&[]);
        let stream = |entries: Vec<Entry>| {
            let toc = Toc { entries };
            let plan = plan(&toc, &Index::default(), None);
            let mut v = Vec::new();
            ChunkedTar::new(&registry, &image, &layer, None, toc, plan)
                .read_to_end(&mut v)
                .unwrap();
            v
        };
        let entry = |kind, name: &str, link: &str| Entry {
            kind,
            name: name.into(),
            link: link.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            dev: (0, 0),
            xattrs: vec![],
            content: None,
        };
        let tmp = tempfile::tempdir().unwrap();
        let slot = tmp.path().join("slot");
        std::fs::create_dir(&slot).unwrap();
        let mut u = crate::unpack::Unpacker::new(&slot, Default::default()).unwrap();
        let err = u
            .apply(&stream(vec![entry(Kind::Reg, "../escape", "")])[..])
            .unwrap_err();
        assert!(
            matches!(err, crate::unpack::UnpackError::Escape { .. }),
            "{err:?}"
        );
        assert!(!tmp.path().join("escape").exists());
        let mut u = crate::unpack::Unpacker::new(&slot, Default::default()).unwrap();
        u.apply(
            &stream(vec![
                entry(Kind::Symlink, "out", "/"),
                entry(Kind::Reg, "out/tmp-file", ""),
                entry(Kind::Reg, &format!("{}/deep", "d".repeat(200)), ""),
            ])[..],
        )
        .unwrap();
        // Resolved inside the slot, as it will be once the slot is `/`.
        assert!(slot.join("tmp-file").exists());
        assert!(!std::path::Path::new("/tmp-file").exists());
        assert!(
            slot.join("d".repeat(200)).join("deep").exists(),
            "long names via PAX"
        );
    }
}
