#!/usr/bin/env python3
"""Writes an OS-like OCI image layout, deterministically (same bytes for the
same arguments and zlib), for the agent benchmark.

    bench/mkimage.py OUT_DIR [--scale 1.0] [--version 1.0.0] [--update 0.02]

Four gzip layers (level 6), about 500 MB of tar at scale 1:
  1. base:        ~31 000 small text-like files (100 B - 16 KB) in ~3 000
                  folders, symlinks, hard links, a setuid file, another owner
  2. libraries:   ~1 300 shared-library-like files (20 KB - 2 MB, about 2:1
                  compressible) and their .so symlinks
  3. large files: a few big files (locale archive, initrd, kernel, a database)
  4. data:        incompressible firmware blobs, whiteouts (file and opaque)
                  and a new etc/os-release
The layout (oci-layout, index.json, blobs/sha256/...) is tagged VERSION.
--update F makes the next version of the same image (same seed), as a
package update would: about F of the regular files rewritten in part (same
size, new bytes), a tenth of that many removed and as many added.
Prints a JSON summary (digests, sizes, file counts) on stdout.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor

MTIME = 1_700_000_000


def text_pool(rng, size):
    """Text-like bytes: Zipf-weighted words of a 4 096-word vocabulary."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = []
    for _ in range(4096):
        n = rng.randint(2, 10)
        vocab.append("".join(rng.choices(letters, weights=range(26, 0, -1), k=n)))
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    out = []
    total = 0
    while total < size:
        words = rng.choices(vocab, weights=weights, k=20000)
        line = []
        for i, w in enumerate(words):
            line.append(w)
            if i % 12 == 11:
                line.append("\n")
        s = " ".join(line)
        out.append(s)
        total += len(s)
    return "".join(out).encode()[:size]


def binary_pool(rng, size, text):
    """Shared-library-like bytes, about 2:1 under gzip: runs of random bytes,
    small integers, zeros and strings."""
    out = bytearray()
    while len(out) < size:
        k = rng.random()
        n = rng.randint(16, 512)
        if k < 0.22:
            out += rng.randbytes(n)
        elif k < 0.45:
            out += bytes(rng.choices(range(8), k=n))
        elif k < 0.70:
            out += bytes(n)
        else:
            o = rng.randrange(len(text) - n)
            out += text[o : o + n]
    return bytes(out[:size])


def take(rng, pool, size):
    if size <= len(pool):
        o = rng.randrange(len(pool) - size + 1)
        return pool[o : o + size]
    parts = []
    left = size
    while left > 0:
        n = min(left, len(pool))
        o = rng.randrange(len(pool) - n + 1)
        parts.append(pool[o : o + n])
        left -= n
    return b"".join(parts)


class Layer:
    """A layer's entries, written in directory-walk order (sorted by path, a
    folder before what it holds) as image builders write them."""

    def __init__(self):
        self.entries = []  # (sort key, TarInfo, data)
        self.files = 0
        self.seen_dirs = set()

    def _info(self, name, kind, mode, uid=0):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid = ti.gid = uid
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        return ti

    def _add(self, path, ti, data=None):
        self.entries.append((tuple(path.rstrip("/").split("/")), ti, data))

    def dirs(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.seen_dirs:
                self.seen_dirs.add(d)
                self._add(d, self._info(d + "/", tarfile.DIRTYPE, 0o755))

    def file(self, path, data, mode=0o644, uid=0):
        self.dirs(path)
        ti = self._info(path, tarfile.REGTYPE, mode, uid)
        ti.size = len(data)
        self._add(path, ti, data)
        self.files += 1

    def symlink(self, path, target):
        self.dirs(path)
        ti = self._info(path, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._add(path, ti)

    def hardlink(self, path, target):
        # Sorted order must put the target first: callers name links after it.
        assert target < path, (path, target)
        self.dirs(path)
        ti = self._info(path, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self._add(path, ti)

    def finish(self):
        # One entry per path, the last one given (as unpacking the tar would
        # leave it): an OS layer does not carry a file twice.
        last = {}
        for e in self.entries:
            last[e[0]] = e
        self.entries = list(last.values())
        self.files = sum(1 for _, ti, _ in self.entries if ti.type == tarfile.REGTYPE)
        buf = io.BytesIO()
        tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
        for _, ti, data in sorted(self.entries, key=lambda e: e[0]):
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
        tar.close()
        return buf.getvalue()


def pools(seed, text_size):
    """A layer's random source, and the text and binary pools it draws first."""
    rng = random.Random(seed)
    text = text_pool(rng, text_size)
    return rng, text, binary_pool(rng, 16 << 20, text)


def layer_base(seed, scale):
    rng = random.Random(seed)
    text = text_pool(rng, 8 << 20)
    L = Layer()
    n_pkgs = max(4, int(1200 * scale))
    per_pkg = 30
    for p in range(n_pkgs):
        pkg = f"pkg{p:04d}-{rng.choice(['lib', 'python3-', 'x11-', 'gir1.2-', ''])}{p}"
        for f in range(per_pkg):
            size = int(min(16384, max(100, rng.lognormvariate(7.6, 0.9))))
            kind = f % 6
            if kind == 0:
                path = f"usr/share/doc/{pkg}/{['copyright', 'changelog', 'README', 'NEWS', 'TODO'][f % 5]}{f}"
            elif kind == 1:
                path = f"usr/share/man/man{1 + p % 8}/{pkg}-{f}.{1 + p % 8}"
            elif kind == 2:
                path = f"usr/share/locale/{['de', 'fr', 'es', 'ja', 'pt_BR', 'it'][f % 6]}/LC_MESSAGES/{pkg}.mo"
            elif kind == 3:
                path = f"usr/lib/python3/dist-packages/{pkg.replace('-', '_')}/mod{f}.py"
            elif kind == 4:
                path = f"usr/include/{pkg}/h{f}.h"
            else:
                path = f"etc/{pkg}/conf{f}.d/{pkg}.conf" if f % 12 == 5 else f"usr/share/{pkg}/data{f}.txt"
            L.file(path, take(rng, text, size))
        L.symlink(f"usr/share/doc/{pkg}/link", "copyright0")
        if p % 10 == 0:
            L.hardlink(f"usr/share/doc/{pkg}/copyright0.hl", f"usr/share/doc/{pkg}/copyright0")
    L.file("usr/bin/su", take(rng, text, 60000), mode=0o4755)
    L.hardlink("usr/bin/sudo-hl", "usr/bin/su")
    L.file("home/user/.profile", b"PATH=/usr/bin\n", mode=0o600, uid=1000)
    L.file("etc/os-release", b"ID=bench\nVERSION_ID=base\n")
    L.file("var/cache/old/junk", b"junk\n")
    for i in range(20):
        L.file(f"usr/share/doc/legacy-pkg/f{i}", take(rng, text, 2000))
    L.symlink("bin", "usr/bin")
    L.symlink("lib", "usr/lib")
    return L


def layer_libs(seed, scale):
    rng, _, pool = pools(seed, 2 << 20)
    L = Layer()
    for i in range(max(4, int(1300 * scale))):
        size = int(min(2 << 20, max(20000, rng.lognormvariate(11.3, 1.0))))
        name = f"usr/lib/x86_64-linux-gnu/lib{i:04d}bench.so"
        L.file(f"{name}.{i % 7}.0.0", take(rng, pool, size), mode=0o755)
        L.symlink(f"{name}.{i % 7}", f"lib{i:04d}bench.so.{i % 7}.0.0")
    return L


def layer_large(seed, scale):
    rng, text, pool = pools(seed, 4 << 20)
    L = Layer()
    mb = 1 << 20
    L.file("usr/lib/locale/locale-archive", take(rng, text, int(60 * mb * scale)))
    L.file("boot/initrd.img-6.1.0", take(rng, pool, int(36 * mb * scale)))
    L.file("boot/vmlinuz-6.1.0", rng.randbytes(int(10 * mb * scale)))
    L.file("var/lib/dpkg/status", take(rng, text, int(12 * mb * scale)))
    return L


def layer_data(seed, scale, version):
    rng = random.Random(seed)
    L = Layer()
    n = max(2, int(160 * scale))
    for i in range(n):
        L.file(f"usr/lib/firmware/vendor{i % 9}/fw{i:03d}.bin", rng.randbytes(rng.randint(150_000, 600_000)))
    L.file("var/cache/.wh..wh..opq", b"")
    L.file("var/cache/fresh", b"fresh\n")
    L.file("usr/share/doc/.wh.legacy-pkg", b"")
    L.file("etc/os-release", f"ID=bench\nVERSION_ID={version}\n".encode())
    return L


def update(L, seed, fraction):
    """Rewrites about `fraction` of L's regular files in part, removes a
    tenth of that many (never a hard link's target) and adds as many."""
    rng = random.Random(seed)
    linked = {ti.linkname for _, ti, _ in L.entries if ti.type == tarfile.LNKTYPE}
    out = []
    regular = [e for e in L.entries if e[1].type == tarfile.REGTYPE and e[2] and len(e[2]) < 256 << 10]
    for path, ti, data in L.entries:
        name = "/".join(path)
        if ti.type == tarfile.REGTYPE and data and ".wh." not in name:
            r = rng.random()
            if r < fraction / 10 and name not in linked:
                continue
            if r < fraction:
                cut = rng.randrange(len(data))
                n = min(len(data) - cut, max(16, len(data) // 8))
                data = data[:cut] + rng.randbytes(n) + data[cut + n:]
        out.append((path, ti, data))
    L.entries = out
    for i in range(max(1, int(len(regular) * fraction / 10)) if regular else 0):
        _, ti, data = regular[rng.randrange(len(regular))]
        L.file(f"usr/share/bench-update/new{i}.bin", rng.randbytes(16) + data, mode=ti.mode)


def build(args):
    idx, seed, scale, version, fraction = args
    if idx == 0:
        L = layer_base(seed, scale)
    elif idx == 1:
        L = layer_libs(seed, scale)
    elif idx == 2:
        L = layer_large(seed, scale)
    else:
        L = layer_data(seed, scale, version)
    if fraction > 0:
        update(L, f"{seed}-{version}", fraction)
    tar = L.finish()
    files = L.files
    # gzip as `gzip -6 -n` would: no name, mtime 0.
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=6, mtime=0) as g:
        g.write(tar)
    gzb = gz.getvalue()
    return {
        "tar_size": len(tar),
        "diff_id": "sha256:" + hashlib.sha256(tar).hexdigest(),
        "gz": gzb,
        "files": files,
    }


def put_blob(out, data):
    h = hashlib.sha256(data).hexdigest()
    p = os.path.join(out, "blobs", "sha256", h)
    if not os.path.exists(p):
        with open(p + ".tmp", "wb") as f:
            f.write(data)
        os.rename(p + ".tmp", p)
    return "sha256:" + h, len(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--update", type=float, default=0.0)
    a = ap.parse_args()
    os.makedirs(os.path.join(a.out, "blobs", "sha256"), exist_ok=True)
    jobs = [(i, a.seed * 100 + i, a.scale, a.version, a.update) for i in range(4)]
    with ProcessPoolExecutor(max_workers=2) as ex:
        layers = list(ex.map(build, jobs))
    descs = []
    for l in layers:
        d, n = put_blob(a.out, l["gz"])
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]},
    }
    cd, cn = put_blob(a.out, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": descs,
    }
    mb = json.dumps(manifest, sort_keys=True).encode()
    md, mn = put_blob(a.out, mb)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md,
                "size": mn,
                "annotations": {"org.opencontainers.image.ref.name": a.version},
            }
        ],
    }
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(a.out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    summary = {
        "manifest": md,
        "tar_bytes": sum(l["tar_size"] for l in layers),
        "gzip_bytes": sum(d["size"] for d in descs),
        "files": sum(l["files"] for l in layers),
        "layers": [
            {"tar_bytes": l["tar_size"], "gzip_bytes": d["size"], "files": l["files"]}
            for l, d in zip(layers, descs)
        ],
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
    }
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
