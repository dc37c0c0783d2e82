//! Caps on tar header records, checked as the bytes stream past, before the
//! `tar` crate sees them: that crate reads GNU long-name and long-link
//! records and PAX headers whole into memory, whatever their size, and
//! keeps every extent of a sparse map. The guard follows the stream exactly
//! as `tar` 0.4 does (each 512-byte header, sizes in octal or base-256, a
//! PAX `size` record overriding the next entry's, GNU sparse extension
//! blocks) and fails the read that would hand over a header whose record is
//! larger than its cap. Whatever `tar` itself refuses (a bad checksum, a
//! size that does not parse), the guard stops following and leaves to it.

use std::io::Read;

/// Most bytes of a GNU long-name or long-link record: far above `PATH_MAX`.
pub const MAX_LONG_NAME: u64 = 64 << 10;
/// Most bytes of a PAX header (local or global): paths, xattrs and all.
pub const MAX_PAX: u64 = 1 << 20;
/// Most extension blocks of a GNU sparse map (21 extents each).
pub const MAX_SPARSE_BLOCKS: u64 = 512;

const BLOCK: u64 = 512;

/// A header record past its cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooBig {
    /// What the record is.
    pub what: &'static str,
    /// Its size in bytes (blocks for a sparse map).
    pub size: u64,
    /// The cap.
    pub cap: u64,
}

impl std::fmt::Display for TooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tar {} of {} is larger than the cap of {}: refused",
            self.what, self.size, self.cap
        )
    }
}

impl std::error::Error for TooBig {}

enum State {
    /// Gathering the next 512-byte header.
    Header,
    /// Passing `n` bytes of entry data and padding.
    Skip(u64),
    /// Keeping a PAX header's `left` bytes (for its `size` record), then
    /// passing `pad`.
    Pax { left: u64, pad: u64 },
    /// Gathering the `n`th extension block of a sparse map, then `data`
    /// bytes of data and padding.
    Sparse { n: u64, data: u64 },
    /// Past the end-of-archive block.
    Done,
    /// At a header `tar` refuses (bad checksum or size): not followed further.
    Lost,
}

/// Passes a decompressed layer through to the `tar` reader, refusing a
/// header record past its cap.
pub struct Guard<R> {
    inner: R,
    state: State,
    block: Box<[u8; BLOCK as usize]>,
    filled: usize,
    /// The PAX header being kept.
    pax: Vec<u8>,
    /// Bytes passed after the end-of-archive block.
    past_end: u64,
    /// A PAX header was read and the entry it describes is still to come:
    /// its `size` record, if it had a valid one.
    pending: Option<Option<u64>>,
}

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK).saturating_mul(BLOCK)
}

impl<R: Read> Guard<R> {
    /// Wraps a tar stream.
    pub fn new(inner: R) -> Self {
        Guard {
            inner,
            state: State::Header,
            block: Box::new([0; BLOCK as usize]),
            filled: 0,
            pax: Vec::new(),
            past_end: 0,
            pending: None,
        }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Whether the guard followed the stream as the `tar` reader reads it:
    /// false once it stopped at a header (a bad checksum or size), or once
    /// bytes passed after what it took for the end-of-archive block. The
    /// reader reads neither (a caller reading the rest of the stream itself
    /// makes the second happen).
    pub fn followed(&self) -> bool {
        !matches!(self.state, State::Lost) && self.past_end == 0
    }

    /// Follows the stream through `bytes`, which are about to be handed over.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), TooBig> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => {
                    self.past_end += bytes.len() as u64;
                    return Ok(());
                }
                State::Lost => return Ok(()),
                State::Skip(n) => {
                    let k = (*n).min(bytes.len() as u64);
                    *n -= k;
                    bytes = &bytes[k as usize..];
                    if *n == 0 {
                        self.state = State::Header;
                    }
                }
                State::Pax { left, pad } => {
                    let k = (*left).min(bytes.len() as u64) as usize;
                    self.pax.extend_from_slice(&bytes[..k]);
                    *left -= k as u64;
                    bytes = &bytes[k..];
                    if *left == 0 {
                        let pad = *pad;
                        self.pending = Some(pax_size(&self.pax));
                        self.pax = Vec::new();
                        self.state = if pad == 0 {
                            State::Header
                        } else {
                            State::Skip(pad)
                        };
                    }
                }
                State::Header | State::Sparse { .. } => {
                    let k = (BLOCK as usize - self.filled).min(bytes.len());
                    self.block[self.filled..self.filled + k].copy_from_slice(&bytes[..k]);
                    self.filled += k;
                    bytes = &bytes[k..];
                    if self.filled == BLOCK as usize {
                        self.filled = 0;
                        self.state = match self.state {
                            State::Sparse { n, data } => self.sparse_block(n, data)?,
                            _ => self.header()?,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// What follows a whole header, as `tar`'s `next_entry` reads it.
    fn header(&mut self) -> Result<State, TooBig> {
        let bytes: &[u8; BLOCK as usize] = &self.block;
        if bytes.iter().all(|&b| b == 0) {
            // `tar` ends the archive at the first zero block.
            return Ok(State::Done);
        }
        let h = tar::Header::from_byte_slice(bytes);
        let sum: u32 = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .map(|&b| u32::from(b))
            .sum::<u32>()
            + 8 * 32;
        if h.cksum().ok() != Some(sum) {
            return Ok(State::Lost);
        }
        let kind = h.entry_type();
        let long_name = kind.is_gnu_longname();
        let long_link = kind.is_gnu_longlink();
        let pax = kind.is_pax_local_extensions();
        let global = kind.is_pax_global_extensions();
        let Ok(mut size) = h.entry_size() else {
            return Ok(State::Lost);
        };
        let extension = long_name || long_link || pax || global;
        if !extension && let Some(Some(s)) = self.pending {
            size = s;
        }
        let (what, cap) = match () {
            _ if long_name => ("GNU long name record", MAX_LONG_NAME),
            _ if long_link => ("GNU long link record", MAX_LONG_NAME),
            _ if pax || global => ("PAX header", MAX_PAX),
            _ => ("", u64::MAX),
        };
        if size > cap {
            return Err(TooBig { what, size, cap });
        }
        let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
        if recognized && pax {
            self.pax = Vec::with_capacity(size.min(64 << 10) as usize);
            let pad = padded(size) - size;
            if size == 0 {
                self.pending = Some(None);
                return Ok(if pad == 0 {
                    State::Header
                } else {
                    State::Skip(pad)
                });
            }
            return Ok(State::Pax { left: size, pad });
        }
        if recognized && (long_name || long_link) {
            return Ok(skip(padded(size)));
        }
        // `tar` hands this header out as an entry: a PAX header read before
        // it is used up.
        self.pending = None;
        if kind.is_gnu_sparse() {
            let Some(gnu) = h.as_gnu() else {
                return Ok(State::Lost);
            };
            if gnu.is_extended() {
                return Ok(State::Sparse {
                    n: 1,
                    data: padded(size),
                });
            }
        }
        Ok(skip(padded(size)))
    }

    /// What follows the `n`th extension block of a sparse map.
    fn sparse_block(&mut self, n: u64, data: u64) -> Result<State, TooBig> {
        if n > MAX_SPARSE_BLOCKS {
            return Err(TooBig {
                what: "GNU sparse map (extension blocks)",
                size: n,
                cap: MAX_SPARSE_BLOCKS,
            });
        }
        let mut ext = tar::GnuExtSparseHeader::new();
        ext.as_mut_bytes().copy_from_slice(&self.block[..]);
        Ok(if ext.is_extended() {
            State::Sparse { n: n + 1, data }
        } else {
            skip(data)
        })
    }
}

fn skip(n: u64) -> State {
    if n == 0 {
        State::Header
    } else {
        State::Skip(n)
    }
}

/// The `size` record of a PAX header, as `tar` reads it: the first record
/// named `size`, if every record up to it is well formed and it parses.
fn pax_size(pax: &[u8]) -> Option<u64> {
    for rec in tar::PaxExtensions::new(pax) {
        let rec = rec.ok()?;
        if rec.key() == Ok("size") {
            return rec.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.feed(&buf[..n]).map_err(std::io::Error::other)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path("x").unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    /// The guard refuses a record past its cap whatever the read sizes, on
    /// the read that completes its header.
    #[test]
    fn caps_hold_for_any_read_size() {
        let mut stream = header(tar::EntryType::Regular, 3);
        stream.extend_from_slice(&[7; 512]);
        let at = stream.len() + 512;
        stream.extend(header(tar::EntryType::GNULongName, MAX_LONG_NAME + 1));
        stream.extend(vec![b'a'; 4096]);
        for step in [1, 7, 512, 513, 100_000] {
            let mut g = Guard::new(&stream[..]);
            let mut passed = 0;
            let mut buf = vec![0; step];
            let err = loop {
                match g.read(&mut buf) {
                    Ok(0) => panic!("the record passed"),
                    Ok(n) => passed += n,
                    Err(e) => break e,
                }
            };
            assert!(passed < at, "step {step}: {passed} bytes passed");
            let e = err.get_ref().unwrap().downcast_ref::<TooBig>().unwrap();
            assert_eq!(e.size, MAX_LONG_NAME + 1);
        }
    }

    #[test]
    fn pax_sizes_are_read_as_tar_reads_them() {
        assert_eq!(pax_size(b"12 size=345\n"), Some(345));
        assert_eq!(pax_size(b"11 size=x5\n"), None);
        assert_eq!(pax_size(b"9 path=a\n12 size=345\n"), Some(345));
        assert_eq!(pax_size(b"9 path=ab\n12 size=345\n"), None);
    }
}
