#!/usr/bin/env python3
"""Helpers for bench/server.sh, standard library only.

  push-image REGISTRY REPO TAG          push a tiny linux/amd64 OCI image, print its digest
  tokens DATA_DIR PRODUCT N FLEET OUT   mint N device JWTs for devices sampled from 1..FLEET
  publish API TOKEN REGISTRY REPO PRODUCT DEVICE_TOKEN SLUICE VERSION...
                                        time `sluice release publish` until the release is
                                        signed, in the registry and resolvable (one line of JSON)
  report RESULTS_DIR OUT.md             write BENCHMARKS.md from the results (and bench/NOTES.md)

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
import statistics
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


def jsonl(path):
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]


def mmm(values, fmt="{:.0f}"):
    """`median (min–max)` of some numbers."""
    v = list(values)
    if not v:
        return "–"
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"


def verdict(ok):
    return "**met**" if ok else "**missed**"


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    kernel = os.uname().release
    load = open("/proc/loadavg").read().split()[:3]
    return cpu, int(mem) // 1024, kernel, " ".join(load)


def report(results, out):
    env = os.environ
    main_fleet = int(env["BENCH_MAIN"])
    fleets = [int(f) for f in env["BENCH_FLEETS"].split()]
    ceiling = jsonl(f"{results}/ceiling.jsonl")
    resolve = {n: jsonl(f"{results}/resolve-{n}.jsonl") for n in fleets}
    rss = {r["fleet"]: r for r in jsonl(f"{results}/rss.jsonl")}
    seen = {r["fleet"]: r["devices_seen"] for r in jsonl(f"{results}/checkins.jsonl")}
    setup = {r["fleet"]: r["setup_s"] for r in jsonl(f"{results}/setup.jsonl")}
    publish = jsonl(f"{results}/publish.jsonl")
    cpu, mem_mb, kernel, load = machine()
    rounds = len(ceiling)
    w = []
    w.append("# Benchmarks\n")
    w.append("Written by `" + env["BENCH_CMD"] + "` on " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
             + "; do not edit by hand (the notes at the end come from `bench/NOTES.md`). "
             "The agent benchmarks (issue 5, items 4–6) are in [bench/AGENT.md](bench/AGENT.md).\n")
    w.append("Figures are medians over " + str(rounds) + " rounds, (min–max) beside them. "
             "**The machine is shared** (a virtual machine whose neighbours come and go; "
             "the ceiling alone moved between 42 000 and 86 000 requests/s across runs), "
             "so absolute numbers are noisy; each round measures every variant back to back, "
             "in an order rotated each round, so the per-round ratios are the figures to trust. "
             "wrk and the server share the same cores.\n")
    w.append("## Machine\n")
    w.append(f"- `nproc`: {os.cpu_count()}; CPU: {cpu}")
    w.append(f"- memory: {mem_mb} MB; kernel {kernel}; load average at the end: {load}")
    w.append(f"- server: `sluice serve`, {env['BENCH_PROFILE']} build (symbols kept), "
             "PostgreSQL 15 on loopback TCP (fsync and synchronous_commit on, shared_buffers 512MB), "
             "Debian's `docker-registry`\n")
    w.append("## Commands\n")
    w.append("```sh\n" + env["BENCH_CMD"] + "\n# each round, for the ceiling and for each fleet:\n"
             + "BENCH_PATH=... BENCH_TOKENS=tokens.txt BENCH_DIGESTS=<base>,<head> \\\n  "
             + env["BENCH_WRK"] + " http://127.0.0.1:PORT\n```\n")
    w.append(f"Each fleet has its own server and database (per-device rate limit raised with `SLUICE_DEVICE_BURST=1000000 SLUICE_DEVICE_RATE=1000`, since wrk plays each device several times a second; the limiter still runs): product `bench`, channel `stable` with head "
             f"1.1.0 at 50 % ramping to 100 % over 10 h (base 1.0.0), devices inserted with SQL "
             f"(half on the base, half on the head). wrk cycles through {env['BENCH_NTOKENS']} device "
             "tokens sampled from the whole fleet, a fresh nonce per request and the base or head digest "
             "as `current`. Every resolve answer is signed (Ed25519) and its check-in batched into the "
             f"database. The ceiling is `GET /bench/ceiling` (`SLUICE_BENCH_CEILING={env['BENCH_SIZE']}`) "
             f"in the same binary as fleet {main_fleet:,}'s server: the same wrk requests, answered with "
             f"a fixed {env['BENCH_SIZE']}-byte body, as large as a resolve answer with its signature "
             "header.\n")

    def row(name, runs):
        bad = sum(r["non2xx"] + r["socket_errors"] for r in runs)
        return (f"| {name} | {mmm(r['rps'] for r in runs)} | {mmm((r['p50_ms'] for r in runs), '{:.2f}')} "
                f"| {mmm((r['p99_ms'] for r in runs), '{:.2f}')} | {bad} |")

    head = "| | requests/s | p50 ms | p99 ms | non-2xx or socket errors |\n|---|---|---|---|---|"
    main = resolve.get(main_fleet, [])
    w.append(f"## 1. Resolve against the ceiling ({main_fleet:,} devices)\n")
    w.append(head)
    w.append(row("ceiling (`/bench/ceiling`)", ceiling))
    w.append(row(f"resolve, {main_fleet:,} devices", main))
    ratios = [r["rps"] / c["rps"] for r, c in zip(main, ceiling)]
    p99 = [r["p99_ms"] for r in main]
    w.append("")
    if ratios:
        w.append(f"resolve / ceiling, per round: {mmm(ratios, '{:.2f}')}. "
                 f"Target ≥ 0.50: {verdict(statistics.median(ratios) >= 0.5)}. "
                 f"p99 < 10 ms: {verdict(statistics.median(p99) < 10)} (worst round {max(p99):.2f} ms).\n")

    small, large = fleets[0], fleets[-1]
    w.append(f"## 2. Fleet size: {small:,} to {large:,} devices\n")
    w.append(head)
    for n in fleets:
        w.append(row(f"resolve, {n:,} devices", resolve[n]))
    w.append("")
    fr = [b["rps"] / a["rps"] for a, b in zip(resolve[small], resolve[large])]
    if fr:
        w.append(f"{large:,} / {small:,} devices, per round: {mmm(fr, '{:.2f}')}. "
                 f"Target ≥ 0.90: {verdict(statistics.median(fr) >= 0.9)}.\n")
    w.append("| devices | server RSS after the runs | peak RSS (VmHWM) | devices checked in (DB) | setup s |\n"
             "|---|---|---|---|---|")
    for n in fleets:
        r = rss.get(n, {})
        w.append(f"| {n:,} | {r.get('rss_mb', 0):.0f} MB | {r.get('hwm_mb', 0):.0f} MB | {seen.get(n, '?')} "
                 f"| {setup.get(n, 0):.0f} |")
    w.append("")
    if large in rss:
        w.append(f"RSS at {large:,} devices < 300 MB: {verdict(rss[large]['hwm_mb'] < 300)} "
                 f"(peak {rss[large]['hwm_mb']:.0f} MB).\n")

    w.append(f"## 3. Publish ({len(publish)} publishes, {main_fleet:,}-device server)\n")
    w.append("From starting `sluice release publish --channel publish-bench` (image already pushed) to: "
             "the CLI has the answer; then the cosign signature tag is in the registry and a device "
             "resolving the channel is offered the new, signed release.\n")
    w.append("| | seconds |\n|---|---|")
    w.append(f"| CLI returns | {mmm((p['cli_s'] for p in publish), '{:.3f}')} |")
    w.append(f"| signed, in the registry and resolvable | {mmm((p['total_s'] for p in publish), '{:.3f}')} |")
    w.append("")
    if publish:
        w.append(f"Target < 1 s: {verdict(statistics.median(p['total_s'] for p in publish) < 1)}.\n")

    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
    if os.path.exists(notes):
        w.append(open(notes).read().rstrip() + "\n")
    with open(out, "w") as f:
        f.write("\n".join(w))


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "push-image":
        print(push_image(*args))
    elif cmd == "tokens":
        tokens(args[0], args[1], int(args[2]), int(args[3]), args[4])
    elif cmd == "publish":
        publish(*args[:7], args[7:])
    elif cmd == "report":
        report(args[0], args[1])
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
