// Pushes small, real OCI images to a plain-HTTP registry through the
// distribution API: one gzip tar layer per platform, an image config, and a
// manifest, or an index of several platforms. Used by the browser tests and
// the demo seed.
import { createHash, randomBytes } from "node:crypto";
import { gzipSync } from "node:zlib";

const OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX = "application/vnd.oci.image.index.v1+json";

const sha256 = (buf) => "sha256:" + createHash("sha256").update(buf).digest("hex");

/** A ustar archive of regular files (`[[name, Buffer]]`), mode 0644, owner 0:0. */
function tar(files) {
  const blocks = [];
  for (const [name, content] of files) {
    const h = Buffer.alloc(512);
    h.write(name, 0, 100, "utf8");
    h.write("0000644\0", 100);
    h.write("0000000\0", 108);
    h.write("0000000\0", 116);
    h.write(content.length.toString(8).padStart(11, "0") + "\0", 124);
    h.write("00000000000\0", 136);
    h.write("0", 156);
    h.write("ustar\0", 257);
    h.write("00", 263);
    h.write("        ", 148);
    let sum = 0;
    for (const b of h) sum += b;
    h.write(sum.toString(8).padStart(6, "0") + "\0 ", 148);
    blocks.push(h, content, Buffer.alloc((512 - (content.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

/** Runs `f` again (up to 3 times) when the connection fails: pushes are idempotent. */
async function retrying(what, f) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await f();
    } catch (e) {
      if (attempt >= 3 || !(e instanceof TypeError)) throw e;
      console.warn(`[registry] ${what}: ${e.cause?.code ?? e.message}; trying again`);
      await new Promise((r) => setTimeout(r, 300 * attempt));
    }
  }
}

function pushBlob(registry, repo, data) {
  return retrying(`pushing a blob to ${repo}`, () => pushBlobOnce(registry, repo, data));
}

async function pushBlobOnce(registry, repo, data) {
  const digest = sha256(data);
  const start = await fetch(`http://${registry}/v2/${repo}/blobs/uploads/`, { method: "POST" });
  if (start.status !== 202) throw new Error(`registry ${registry}: starting an upload to ${repo} answered ${start.status}`);
  const loc = start.headers.get("location");
  const url = new URL(loc, `http://${registry}`);
  url.searchParams.set("digest", digest);
  const put = await fetch(url, { method: "PUT", headers: { "content-type": "application/octet-stream" }, body: data });
  if (put.status !== 201) throw new Error(`registry ${registry}: uploading ${digest} answered ${put.status}: ${await put.text()}`);
  return digest;
}

async function pushManifest(registry, repo, reference, mediaType, body) {
  const r = await retrying(`pushing ${repo}:${reference}`, () => fetch(`http://${registry}/v2/${repo}/manifests/${reference}`, {
    method: "PUT",
    headers: { "content-type": mediaType },
    body,
  }));
  if (r.status !== 201) throw new Error(`registry ${registry}: pushing ${repo}:${reference} answered ${r.status}: ${await r.text()}`);
  return sha256(body);
}

/** `n` bytes that depend only on `seed`, so the same image gets the same digest. */
function seededBytes(seed, n) {
  const out = [];
  let block = createHash("sha256").update(seed).digest();
  for (let len = 0; len < n; len += block.length) {
    out.push(block);
    block = createHash("sha256").update(block).digest();
  }
  return Buffer.concat(out).subarray(0, n);
}

/** One platform image; answers {digest, size, manifestSize}. */
async function pushPlatform(registry, repo, reference, arch, version, extraBytes, reproducible) {
  const files = [
    ["etc/os-release", Buffer.from(`NAME="Sluice demo OS"\nVERSION_ID=${version}\nID=sluice-demo\n`)],
    [`usr/share/sluice-demo/${arch}.bin`, reproducible ? seededBytes(`${repo} ${version} ${arch}`, extraBytes) : randomBytes(extraBytes)],
  ];
  const raw = tar(files);
  const layer = gzipSync(raw);
  const layerDigest = await pushBlob(registry, repo, layer);
  const config = Buffer.from(
    JSON.stringify({ architecture: arch, os: "linux", config: {}, rootfs: { type: "layers", diff_ids: [sha256(raw)] } }),
  );
  const configDigest = await pushBlob(registry, repo, config);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_MANIFEST,
      config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: configDigest, size: config.length },
      layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: layerDigest, size: layer.length }],
    }),
  );
  const digest = await pushManifest(registry, repo, reference ?? sha256(manifest), OCI_MANIFEST, manifest);
  return { digest, size: layer.length, manifestSize: manifest.length };
}

/**
 * Pushes `repo:tag` for each of `arches` (an index when there are several).
 * `reproducible` makes the content depend only on repo, version and arch, so
 * pushing again gives the same digests. Answers {digest (what the tag names),
 * platforms: {arch: digest}}.
 */
export async function pushImage(
  registry,
  repo,
  tag,
  { arches = ["amd64"], version = tag, extraBytes = 4096, reproducible = false } = {},
) {
  if (arches.length === 1) {
    const p = await pushPlatform(registry, repo, tag, arches[0], version, extraBytes, reproducible);
    return { digest: p.digest, platforms: { [arches[0]]: p.digest } };
  }
  const manifests = [];
  const platforms = {};
  for (const arch of arches) {
    const p = await pushPlatform(registry, repo, null, arch, version, extraBytes, reproducible);
    platforms[arch] = p.digest;
    manifests.push({
      mediaType: OCI_MANIFEST,
      digest: p.digest,
      size: p.manifestSize,
      platform: { os: "linux", architecture: arch, ...(arch === "arm64" ? { variant: "v8" } : {}) },
    });
  }
  const index = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests }));
  const digest = await pushManifest(registry, repo, tag, OCI_INDEX, index);
  return { digest, platforms };
}
