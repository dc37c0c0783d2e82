#!/usr/bin/env python3
"""Benchmark 6: plays N devices against a running Sluice server through two
rollouts with a linear ramp and a health gate, over loopback HTTP.

  1. 1.1.0 is promoted at 0 % with a ramp to 100 %; a small share of devices
     (--fail-good) fail its health check: under the gate's limit, so the
     rollout runs to the end.
  2. Once the fleet has settled, 1.2.0 is promoted the same way with a large
     failing share (--fail-bad): the health gate halts it.

Each device is a coroutine doing what sluice-agent does: enroll; poll
`resolve` every `poll_after_s` the server hands out (±10 %); when offered an
update, report download_started, downloaded, applied, rebooting (over a
simulated apply time) and, after a simulated reboot, healthy, or failed and
rolled_back (and never retries that digest). Requests go over a bounded pool
of keep-alive connections; a 429 is honoured (Retry-After). Every loop is
bounded by --max-s.

Prints the adoption over time and when the gate halted; writes a JSON
timeline and, if matplotlib is installed, the adoption curve as a PNG.
Needs python3-cryptography (each simulated device signs its enrollment with
its own Ed25519 key, as the agent does) and python3-matplotlib for the PNG.
"""

import argparse
import asyncio
import base64
import struct
import hashlib
import json
import random
import secrets
import sys
import time
import urllib.parse


class HttpError(Exception):
    pass


class Pool:
    """HTTP/1.1 keep-alive connections to one host, at most `size` at once."""

    def __init__(self, host, port, size):
        self.host, self.port = host, port
        self.free = asyncio.Queue()
        for _ in range(size):
            self.free.put_nowait(None)
        self.requests = 0
        self.status = {}

    async def _connect(self):
        return await asyncio.open_connection(self.host, self.port)

    async def request(self, method, path, token=None, body=None):
        conn = await self.free.get()
        try:
            for attempt in range(2):
                if conn is None:
                    conn = await self._connect()
                try:
                    status, headers, data = await self._roundtrip(conn, method, path, token, body)
                    self.requests += 1
                    self.status[status] = self.status.get(status, 0) + 1
                    if headers.get("connection", "").lower() == "close":
                        conn[1].close()
                        conn = None
                    return status, headers, data
                except (ConnectionError, asyncio.IncompleteReadError, OSError):
                    try:
                        conn[1].close()
                    except Exception:
                        pass
                    conn = None
                    if attempt == 1:
                        raise
        finally:
            self.free.put_nowait(conn)

    async def _roundtrip(self, conn, method, path, token, body):
        reader, writer = conn
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(payload)}\r\n\r\n"
        writer.write(head.encode() + payload)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = b""
        return status, headers, data

    async def json(self, method, path, token=None, body=None, ok=(200, 201, 204)):
        status, headers, data = await self.request(method, path, token, body)
        if status not in ok:
            raise HttpError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data) if data else None


def fails(i, version, share):
    """Whether device i fails its health check on `version` (deterministic)."""
    h = hashlib.sha256(f"{i}/{version}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < share / 100.0


class Fleet:
    def __init__(self, a, pool):
        self.a = a
        self.pool = pool
        self.t0 = time.monotonic()
        self.stop = False
        self.current = {}  # device -> version
        self.failed = {}  # version -> devices that failed it
        self.in_flight = 0
        self.events = 0
        self.rate_limited = 0
        self.resolve_ms = []
        self.timeline = []
        self.marks = []  # (t, what)
        self.digests = {}
        self.channel = None

    def now(self):
        return time.monotonic() - self.t0

    def mark(self, what):
        t = round(self.now(), 1)
        self.marks.append([t, what])
        print(f"  t={t:7.1f}s  {what}", flush=True)

    async def device(self, i, dev_id, token, version):
        a = self.a
        rng = random.Random(i)
        refused = set()
        await asyncio.sleep(rng.uniform(0, a.poll_s))
        base = f"/v1/products/{a.product}/channels/{a.channel}/resolve"
        while not self.stop:
            q = urllib.parse.urlencode(
                {"nonce": secrets.token_urlsafe(18), "current": self.digests[version], "arch": "amd64"}
            )
            t = time.monotonic()
            status, headers, data = await self.pool.request("GET", f"{base}?{q}", token)
            self.resolve_ms.append((time.monotonic() - t) * 1000)
            wait = a.poll_s
            if status == 429:
                self.rate_limited += 1
                wait = float(headers.get("retry-after", "1"))
            elif status != 200:
                raise HttpError(f"resolve: HTTP {status}: {data[:200]!r}")
            else:
                r = json.loads(data)
                wait = r["poll_after_s"]
                rel = r.get("release")
                if r["update"] and rel and rel["digest"] not in refused:
                    v, d = rel["version"], rel["digest"]
                    self.in_flight += 1
                    await self.event(dev_id, token, "download_started", v, d)
                    await asyncio.sleep(rng.uniform(*a.apply_s))
                    for kind in ("downloaded", "applied", "rebooting"):
                        await self.event(dev_id, token, kind, v, d)
                    await asyncio.sleep(a.reboot_s)
                    share = a.fail_bad if v == "1.2.0" else a.fail_good
                    if fails(i, v, share):
                        await self.event(dev_id, token, "failed", v, d)
                        await asyncio.sleep(a.reboot_s)
                        await self.event(dev_id, token, "rolled_back", v, d)
                        refused.add(d)
                        self.failed.setdefault(v, set()).add(i)
                    else:
                        await self.event(dev_id, token, "healthy", v, d)
                        version = v
                        self.current[i] = v
                    self.in_flight -= 1
                    wait = 0.5
            await asyncio.sleep(wait * rng.uniform(0.9, 1.1))

    async def event(self, dev_id, token, kind, version, digest):
        body = {"kind": kind, "version": version, "digest": digest}
        for _ in range(10):
            status, headers, data = await self.pool.request("POST", f"/v1/devices/{dev_id}/events", token, body)
            if status == 204 or status == 200:
                self.events += 1
                return
            if status == 429:
                self.rate_limited += 1
                await asyncio.sleep(float(headers.get("retry-after", "1")))
                continue
            raise HttpError(f"event {kind}: HTTP {status}: {data[:200]!r}")

    def counts(self):
        c = {"1.0.0": 0, "1.1.0": 0, "1.2.0": 0}
        for v in self.current.values():
            c[v] += 1
        return c

    async def sampler(self):
        a = self.a
        path = f"/v1/products/{a.product}/channels/{a.channel}"
        last_print = -1e9
        while not self.stop:
            ch = await self.pool.json("GET", path, a.token)
            self.channel = ch
            c = self.counts()
            ro = ch["rollout"]
            row = {
                "t": round(self.now(), 2),
                "head": ch["head"],
                "effective_percent": ro["effective_percent"],
                "paused": ro["paused"],
                "on": c,
                "failed": {v: len(s) for v, s in self.failed.items()},
                "in_flight": self.in_flight,
                "gate": ch["gate"],
                "server_devices": ch["devices"],
            }
            self.timeline.append(row)
            if row["t"] - last_print >= a.print_every_s:
                last_print = row["t"]
                print(
                    f"  t={row['t']:7.1f}s  head {ch['head']} at {ro['effective_percent']:5.1f}%"
                    f"{' PAUSED' if ro['paused'] else '       '}  on 1.0.0/1.1.0/1.2.0: "
                    f"{c['1.0.0']:6d} {c['1.1.0']:6d} {c['1.2.0']:6d}  failed 1.1.0/1.2.0: "
                    f"{row['failed'].get('1.1.0', 0):5d} {row['failed'].get('1.2.0', 0):5d}  "
                    f"in flight {self.in_flight:5d}  gate {ch['gate']['failures']}/{ch['gate']['reports']}",
                    flush=True,
                )
            await asyncio.sleep(1.0)


async def main(a):
    u = urllib.parse.urlparse(a.server)
    pool = Pool(u.hostname, u.port or 80, a.connections)
    f = Fleet(a, pool)
    tok = a.token
    # --- product, channel, releases ---
    prod = await pool.json("POST", "/v1/products", tok, {"name": a.product, "repository": a.repository})
    secret = prod["enrollment_secret"]
    await pool.json("POST", f"/v1/products/{a.product}/channels", tok, {"name": a.channel})
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        body = {"version": v, "image": f"{a.repository}:{v}"}
        if v == "1.0.0":
            body["channels"] = [{"name": a.channel, "percent": 100}]
        rel = await pool.json("POST", f"/v1/products/{a.product}/releases", tok, body)
        f.digests[v] = next(p["digest"] for p in rel["platforms"] if p.get("architecture", "amd64") == "amd64")
    await pool.json(
        "PATCH",
        f"/v1/products/{a.product}/channels/{a.channel}/rollout",
        tok,
        {"gate": {"max_failure_percent": a.gate_max_failure_percent, "min_reports": a.gate_min_reports}},
    )
    # --- enrollment ---
    t = time.monotonic()
    devices = [None] * a.devices
    sem = asyncio.Semaphore(a.connections)

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def proof(machine_id):
        """A proof of a fresh device key, as protocol/src/proof.rs defines it."""
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        ts = int(time.time())
        nonce = secrets.token_bytes(16)
        msg = b"sluice-device-proof-v1\0"
        for field in (b"enroll", a.product.encode(), machine_id.encode(), raw, nonce):
            msg += struct.pack(">I", len(field)) + field
        msg += struct.pack(">q", ts)
        return {"public_key": base64.b64encode(raw).decode(), "nonce": base64.b64encode(nonce).decode(), "timestamp": ts,
                "signature": base64.b64encode(key.sign(msg)).decode()}

    async def enroll(i):
        async with sem:
            r = await pool.json(
                "POST",
                "/v1/devices/enroll",
                None,
                {
                    "product": a.product,
                    "enrollment_secret": secret,
                    "machine_id": f"fleet-{i:07d}",
                    "arch": "amd64",
                    "channel": a.channel,
                    "current_version": "1.0.0",
                    "current_digest": f.digests["1.0.0"],
                    "proof": proof(f"fleet-{i:07d}"),
                },
            )
            devices[i] = (r["device_id"], r["token"])

    await asyncio.gather(*(enroll(i) for i in range(a.devices)))
    enroll_s = time.monotonic() - t
    print(f"  enrolled {a.devices} devices in {enroll_s:.1f} s ({a.devices / enroll_s:.0f}/s)", flush=True)
    for i in range(a.devices):
        f.current[i] = "1.0.0"

    f.t0 = time.monotonic()
    tasks = [asyncio.create_task(f.device(i, d, tk, "1.0.0")) for i, (d, tk) in enumerate(devices)]
    sampler = asyncio.create_task(f.sampler())
    ramp = {"to_percent": 100, "over_minutes": a.ramp_minutes}
    chan = f"/v1/products/{a.product}/channels/{a.channel}"
    gate_at = None
    ramp2_at = None
    try:
        await asyncio.sleep(a.poll_s)  # every device has polled once on 1.0.0
        await pool.json("POST", f"{chan}/promote", tok, {"version": "1.1.0", "percent": 0, "ramp": ramp})
        f.mark(f"promote 1.1.0 at 0 %, ramp to 100 % over {a.ramp_minutes} min ({a.fail_good} % of devices fail it)")
        ramp_end = f.now() + a.ramp_minutes * 60
        # Settled: ramp over, nothing in flight, every device on 1.1.0 or failed it.
        while f.now() < a.max_s:
            await asyncio.sleep(0.5)
            c = f.counts()
            if f.now() > ramp_end and f.in_flight == 0 and c["1.0.0"] == len(f.failed.get("1.1.0", ())):
                break
        f.mark(f"1.1.0 settled: {f.counts()['1.1.0']} devices on it, {len(f.failed.get('1.1.0', ()))} failed it")
        await asyncio.sleep(a.tail_s)
        await pool.json("POST", f"{chan}/promote", tok, {"version": "1.2.0", "percent": 0, "ramp": ramp})
        ramp2_at = f.now()
        f.mark(f"promote 1.2.0 at 0 %, same ramp ({a.fail_bad} % of devices fail it)")
        while f.now() < a.max_s:
            await asyncio.sleep(0.5)
            if f.channel and f.channel["rollout"]["paused"] and gate_at is None:
                hist = await pool.json("GET", f"{chan}/history", tok)
                items = hist["items"] if isinstance(hist, dict) and "items" in hist else hist
                g = [h for h in items if h["action"] == "gate"]
                gate_at = f.now()
                f.mark(f"health gate halted 1.2.0: {g[0]['reason'] if g else f.channel['rollout'].get('paused_reason')}")
                break
            if f.now() > ramp2_at + a.ramp_minutes * 60 + 2 * a.poll_s and f.in_flight == 0:
                break
        await asyncio.sleep(a.tail_s + (max(a.apply_s) + 3 * a.reboot_s if gate_at else 0))
        f.mark("end")
    finally:
        f.stop = True
        await asyncio.sleep(0)
        for tk in tasks:
            tk.cancel()
        sampler.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
    bad = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
    if bad:
        raise bad[0]

    c = f.counts()
    rs = sorted(f.resolve_ms)
    pct = lambda p: rs[min(len(rs) - 1, int(len(rs) * p))] if rs else 0  # noqa: E731
    dur = f.now()
    result = {
        "devices": a.devices,
        "enroll_s": round(enroll_s, 2),
        "duration_s": round(dur, 1),
        "requests": pool.requests,
        "requests_per_s": round(pool.requests / dur, 1),
        "status": pool.status,
        "rate_limited": f.rate_limited,
        "resolve_ms": {"p50": round(pct(0.5), 2), "p99": round(pct(0.99), 2), "max": round(rs[-1] if rs else 0, 2)},
        "final": {"on": c, "failed": {v: len(s) for v, s in f.failed.items()}},
        "gate_halted_at_s": round(gate_at, 1) if gate_at else None,
        "ramp2_started_at_s": round(ramp2_at, 1) if ramp2_at else None,
        "marks": f.marks,
        "params": vars(a) | {"token": "..."},
        "final_channel": f.channel,
        "timeline": f.timeline,
    }
    print(
        f"  {pool.requests} requests in {dur:.0f} s ({pool.requests / dur:.0f}/s), {f.rate_limited} answered 429, "
        f"resolve p50 {pct(0.5):.1f} ms p99 {pct(0.99):.1f} ms (client side, Python)",
        flush=True,
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh)
    if a.png:
        draw(result, a.png)
    return result


def draw(r, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no matplotlib: install python3-matplotlib for the PNG)", file=sys.stderr)
        return
    tl = r["timeline"]
    t = [x["t"] for x in tl]
    n = r["devices"]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    ax.plot(t, [x["on"]["1.1.0"] for x in tl], label="devices on 1.1.0 (healthy)", color="#1f77b4", lw=2)
    ax.plot(t, [x["on"]["1.2.0"] for x in tl], label="devices on 1.2.0 (healthy)", color="#2ca02c", lw=2)
    ax.plot(
        t,
        [sum(x["failed"].values()) for x in tl],
        label="failed + rolled back (cumulative)",
        color="#d62728",
        lw=1.5,
    )
    ax.plot(
        t,
        [x["effective_percent"] * n / 100 if x["head"] else 0 for x in tl],
        label="admitted to the head (effective % × N)",
        color="grey",
        ls="--",
        lw=1,
    )
    for mt, what in r["marks"]:
        if what.startswith("promote") or what.startswith("health gate"):
            ax.axvline(mt, color="#d62728" if "gate" in what else "black", ls=":", lw=1)
            gate = "gate" in what
            ax.text(mt, n * (0.96 if gate else 1.02), "gate halt" if gate else what.split(" at ")[0], fontsize=8, ha="left")
    ax.set_xlabel("seconds")
    ax.set_ylabel("devices")
    ax.set_ylim(0, n * 1.08)
    p = r["params"]
    ax.set_title(
        f"{n} simulated devices, ramps 0→100 % over {p['ramp_minutes']} min, "
        f"gate {p['gate_max_failure_percent']} % / {p['gate_min_reports']} reports",
        fontsize=10,
    )
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"  adoption curve: {path}")


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True)
    ap.add_argument("--token", required=True, help="an admin token")
    ap.add_argument("--repository", required=True, help="host:port/path holding tags 1.0.0, 1.1.0, 1.2.0")
    ap.add_argument("--product", default="fleet")
    ap.add_argument("--channel", default="stable")
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--poll-s", type=float, default=10, help="the server's SLUICE_POLL_AFTER_S")
    ap.add_argument("--ramp-minutes", type=float, default=2)
    ap.add_argument("--apply-s", type=float, nargs=2, default=[8, 25], metavar=("MIN", "MAX"))
    ap.add_argument("--reboot-s", type=float, default=5)
    ap.add_argument("--fail-good", type=float, default=1.0, help="percent of devices failing 1.1.0")
    ap.add_argument("--fail-bad", type=float, default=12.0, help="percent of devices failing 1.2.0")
    ap.add_argument("--gate-max-failure-percent", type=float, default=5)
    ap.add_argument("--gate-min-reports", type=int, default=100)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--tail-s", type=float, default=20)
    ap.add_argument("--max-s", type=float, default=900, help="hard bound on the simulation")
    ap.add_argument("--print-every-s", type=float, default=10)
    ap.add_argument("--json")
    ap.add_argument("--png")
    return ap.parse_args()


if __name__ == "__main__":
    args = parse()
    try:
        asyncio.run(asyncio.wait_for(main(args), timeout=args.max_s + 600))
    except HttpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
