#!/usr/bin/env python3
"""Helpers for bench/server.sh, standard library only.

  push-image REGISTRY REPO TAG          push a tiny linux/amd64 OCI image, print its digest
  tokens DATA_DIR PRODUCT N FLEET OUT   mint N device JWTs for devices sampled from 1..FLEET
  publish API TOKEN REGISTRY REPO PRODUCT DEVICE_TOKEN SLUICE VERSION...
                                        time `sluice release publish` until the release is
                                        signed, in the registry and resolvable (one line of JSON)

Device ids are md5('bench-<i>')::uuid, the same ids server.sh inserts with SQL.
"""

import base64
import gzip
import hashlib
import hmac
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def http(method, url, body=None, headers=None, ok=(200, 201, 202)):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        if e.code in ok:
            return e.code, dict(e.headers), e.read()
        raise SystemExit(f"{method} {url}: {e.code} {e.read()[:300]!r}")


def push_blob(registry, repo, data):
    d = sha256(data)
    _, h, _ = http("POST", f"http://{registry}/v2/{repo}/blobs/uploads/")
    loc = h.get("Location") or h.get("location")
    if not loc.startswith("http"):
        loc = f"http://{registry}{loc}"
    sep = "&" if "?" in loc else "?"
    http("PUT", f"{loc}{sep}digest={d}", data, {"Content-Type": "application/octet-stream"})
    return d


def push_image(registry, repo, tag):
    # One layer with one random file, so every tag is a new digest.
    content = os.urandom(256)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo(f"etc/sluice-bench/{tag}")
        info.size = len(content)
        t.addfile(info, io.BytesIO(content))
    tar = tbuf.getvalue()
    layer = gzip.compress(tar, mtime=0)
    layer_d = push_blob(registry, repo, layer)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "config": {},
    }).encode()
    config_d = push_blob(registry, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_d, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_d, "size": len(layer)}],
    }).encode()
    http("PUT", f"http://{registry}/v2/{repo}/manifests/{tag}", manifest,
         {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    return sha256(manifest)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def device_id(i):
    return str(uuid.UUID(hashlib.md5(f"bench-{i}".encode()).hexdigest()))


def device_token(secret, dev, product, now):
    """The JWT `JwtKeys::issue_device` makes (HS256): six hours, bound to a
    device key (`key_id`), so the server checks it from memory alone."""
    header = b64url(json.dumps({"typ": "JWT", "alg": "HS256"}, separators=(",", ":")).encode())
    claims = {"sub": dev, "role": "device", "kind": "device", "products": [product],
              "aud": "sluice", "iat": now, "nbf": now - 1, "exp": now + 6 * 3600,
              "key_id": "bench0000000000"}
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{b64url(hmac.new(secret, signing, hashlib.sha256).digest())}"


def tokens(data_dir, product, n, fleet, out):
    with open(os.path.join(data_dir, "jwt.key"), "rb") as f:
        secret = f.read()
    now = int(time.time())
    rng = random.Random(42)
    ids = rng.sample(range(1, fleet + 1), min(n, fleet))
    with open(out, "w") as f:
        for i in ids:
            f.write(device_token(secret, device_id(i), product, now) + "\n")


def publish(api, token, registry, repo, product, device_tok, sluice, versions):
    """Times each publish; the image push happens before the clock starts."""
    env = dict(os.environ, SLUICE_SERVER=api, SLUICE_TOKEN=token)
    for version in versions:
        digest = push_image(registry, repo, version)
        sig_tag = digest.replace(":", "-") + ".sig"
        t0 = time.perf_counter()
        subprocess.run([sluice, "release", "publish", "--product", product, "--version", version,
                        "--image", f"{registry}/{repo}:{version}", "--channel", "publish-bench"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        t_cli = time.perf_counter()
        # The signature is in the registry ...
        while True:
            status, _, _ = http("HEAD", f"http://{registry}/v2/{repo}/manifests/{sig_tag}",
                                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                                ok=(200, 404))
            if status == 200:
                break
            time.sleep(0.002)
        # ... and a device on the channel is offered the release.
        polls = 0
        while True:
            polls += 1
            nonce = b64url(os.urandom(12))
            _, _, body = http("GET", f"{api}/v1/products/{product}/channels/publish-bench/resolve"
                                     f"?arch=amd64&nonce={nonce}",
                              headers={"Authorization": f"Bearer {device_tok}"})
            r = json.loads(body)
            if r.get("release") and r["release"]["version"] == version and r["release"]["signature"]:
                break
            time.sleep(0.002)
        t_end = time.perf_counter()
        print(json.dumps({"version": version, "cli_s": t_cli - t0, "total_s": t_end - t0,
                          "resolve_polls": polls}), flush=True)


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "push-image":
        print(push_image(*args))
    elif cmd == "tokens":
        tokens(args[0], args[1], int(args[2]), int(args[3]), args[4])
    elif cmd == "publish":
        publish(*args[:7], args[7:])
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
