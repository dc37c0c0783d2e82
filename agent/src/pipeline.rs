//! Pulls, verifies and decompresses an image's layers on a thread of its
//! own, ahead of the unpacker, through a bounded queue of chunks: download,
//! digest, inflate and the writes to the slot run at once, on two cores,
//! with at most [`DEPTH`] × [`CHUNK`] bytes in flight. Layers are still
//! applied one after the other, in order, by the calling thread; a blob that
//! fails its digest or size check fails its layer exactly as when read inline
//! (the error travels with the layer's last message).

use crate::chunked::{ChunkedTar, Plan, Toc};
use crate::registry::{Descriptor, ImageRef, Registry};
use crate::unpack::layer_compression;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Bytes of decompressed tar per message.
pub const CHUNK: usize = 256 << 10;
/// Messages the queue holds: the producer is at most this far ahead.
pub const DEPTH: usize = 8;

enum Msg {
    /// The next layer's blob was opened (or could not be).
    Start(anyhow::Result<()>),
    /// Decompressed bytes of the current layer.
    Data(Vec<u8>),
    /// The current layer ended: verified, or why not.
    End(std::io::Result<()>),
}

/// The consuming side: one [`LayerStream`] per layer, in manifest order.
pub struct Layers {
    rx: Receiver<Msg>,
    free: SyncSender<Vec<u8>>,
}

impl Layers {
    /// The next layer's decompressed tar stream, or why its blob could not
    /// be opened.
    pub fn next_layer(&mut self) -> anyhow::Result<LayerStream<'_>> {
        match self.rx.recv() {
            Ok(Msg::Start(Ok(()))) => Ok(LayerStream {
                layers: self,
                cur: Vec::new(),
                pos: 0,
                done: false,
            }),
            Ok(Msg::Start(Err(e))) => Err(e),
            Ok(_) => anyhow::bail!("layer stream out of order"),
            Err(_) => anyhow::bail!("the layer download stopped"),
        }
    }
}

/// One layer's decompressed bytes; ends (`Ok(0)`) only once the blob's
/// digest and size were checked, fails with the check's error otherwise.
pub struct LayerStream<'a> {
    layers: &'a mut Layers,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos < self.cur.len() {
                let n = buf.len().min(self.cur.len() - self.pos);
                buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            if self.cur.capacity() > 0 {
                // Back to the producer; dropped if it has enough.
                let _ = self.layers.free.try_send(std::mem::take(&mut self.cur));
            }
            match self.layers.rx.recv() {
                Ok(Msg::Data(v)) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Ok(Msg::End(r)) => {
                    self.done = true;
                    r?;
                    return Ok(0);
                }
                Ok(Msg::Start(_)) => {
                    return Err(std::io::Error::other("layer stream out of order"));
                }
                Err(_) => return Err(std::io::Error::other("the layer download stopped")),
            }
        }
    }
}

/// A layer pulled partially: its checked table of contents, the plan of
/// what to copy and what to fetch, and the running slot's root to copy from.
pub struct Partial<'a> {
    /// The table of contents.
    pub toc: Toc,
    /// What comes from where.
    pub plan: Plan,
    /// The running slot's root (`None`: fetch everything).
    pub root: Option<&'a OwnedFd>,
}

/// Runs `consume` on the layers of `manifest` while a scoped thread pulls,
/// verifies and decompresses them in order; a layer with a [`Partial`] is
/// made from its table of contents instead ([`ChunkedTar`]). Media types
/// must have been checked ([`layer_compression`]) before. When `consume`
/// returns (or fails), the producer stops at its next chunk.
pub fn with_layers<T>(
    registry: &Registry,
    image: &ImageRef,
    layers: &[Descriptor],
    partial: Vec<Option<Partial<'_>>>,
    consume: impl FnOnce(Layers) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let (tx, rx) = sync_channel(DEPTH);
    let (free_tx, free_rx) = sync_channel(4);
    std::thread::scope(|s| {
        s.spawn(move || produce(registry, image, layers, partial, &tx, &free_rx));
        // `Layers` owns the receiver: dropping it (when `consume` returns)
        // makes the producer's next send fail, so the scope can end.
        consume(Layers { rx, free: free_tx })
    })
}

fn produce(
    registry: &Registry,
    image: &ImageRef,
    layers: &[Descriptor],
    partial: Vec<Option<Partial<'_>>>,
    tx: &SyncSender<Msg>,
    free: &Receiver<Vec<u8>>,
) {
    let mut partial = partial.into_iter();
    for layer in layers {
        if let Some(p) = partial.next().flatten() {
            if tx.send(Msg::Start(Ok(()))).is_err() {
                return;
            }
            let mut tar = ChunkedTar::new(registry, image, layer, p.root, p.toc, p.plan);
            let result = match pump(&mut tar, tx, free) {
                Ok(true) => Ok(()),
                Ok(false) => return,
                Err(e) => Err(e),
            };
            let failed = result.is_err();
            if tx.send(Msg::End(result)).is_err() || failed {
                return;
            }
            continue;
        }
        let mut blob = match registry.blob(image, layer) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Msg::Start(Err(e)));
                return;
            }
        };
        if tx.send(Msg::Start(Ok(()))).is_err() {
            return;
        }
        let compression = match layer_compression(&layer.media_type) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Msg::End(Err(std::io::Error::other(e))));
                return;
            }
        };
        let result = compression
            .decoder(&mut blob)
            .and_then(|mut reader| pump(&mut reader, tx, free));
        let result = match result {
            Ok(true) => blob.finish(),
            Ok(false) => return,
            Err(e) => Err(e),
        };
        let failed = result.is_err();
        if tx.send(Msg::End(result)).is_err() || failed {
            return;
        }
    }
}

/// Sends `reader`'s bytes in chunks until its end: `Ok(false)` when the
/// consumer went away.
fn pump(
    reader: &mut dyn Read,
    tx: &SyncSender<Msg>,
    free: &Receiver<Vec<u8>>,
) -> std::io::Result<bool> {
    loop {
        let mut buf = free.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        while filled < CHUNK {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(true);
        }
        buf.truncate(filled);
        if tx.send(Msg::Data(buf)).is_err() {
            return Ok(false);
        }
    }
}
