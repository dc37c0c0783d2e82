#!/usr/bin/env python3
"""BENCHMARKS.md from the server benchmarks' saved figures, standard library only.

  save KIND RESULTS_DIR OUT.json   keep one run's raw results (the *.jsonl files that
                                   bench/server.sh wrote) with its settings and machine
  render DIR OUT.md                write BENCHMARKS.md from DIR/server.json,
                                   DIR/replicas.json and DIR/partition.json (those
                                   present), the capacity model and bench/NOTES.md

Each mode of the benchmark rewrites only its own file in bench/results/, so a
`--replicas` run keeps the last full run's figures and the other way round.
"""

import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time

# How often the capacity model's devices poll.
POLL_S = 15 * 60
FLEETS = (1_000_000, 10_000_000, 100_000_000)
# A server in the model: this many cores, at most this busy.
SERVER_CORES, SERVER_BUSY = 4, 0.5


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_mb": int(mem) // 1024, "kernel": os.uname().release,
            "load": " ".join(open("/proc/loadavg").read().split()[:3])}


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def jsonl(path):
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]


def save(kind, results, out):
    env = {k[len("BENCH_"):].lower(): v for k, v in os.environ.items() if k.startswith("BENCH_")}
    data = {os.path.basename(p)[:-len(".jsonl")]: jsonl(p) for p in sorted(glob.glob(f"{results}/*.jsonl"))}
    doc = {"kind": kind, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
           "settings": env, "machine": machine(), "data": data}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def med(v):
    v = list(v)
    return statistics.median(v) if v else float("nan")


def mmm(values, fmt="{:.0f}"):
    """`median (min–max)` of some numbers."""
    v = list(values)
    if not v:
        return "–"
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"


def verdict(ok):
    return "**met**" if ok else "**missed**"


def us_per_answer(r, key="cpu_s"):
    return r[key] / max(r["requests"], 1) * 1e6


def n(x):
    return f"{x:,.0f}"


def load_table(d, suffix, main_fleet):
    """The lines of one set of open-loop rounds (the files ending in SUFFIX):
    the ceiling, resolve and any variants, then a blank line."""
    lines = [HEAD, row("ceiling (`bench/ceiling`)", d.get(f"ceiling{suffix}", [])),
             row(f"resolve, {main_fleet:,} devices", d.get(f"resolve{suffix}", []))]
    variants = d.get(f"variants{suffix}", [])
    for v in dict.fromkeys(x["variant"] for x in variants):
        lines.append(row(f"variant `{v}` (`BENCH_VARIANTS`)", [x for x in variants if x["variant"] == v]))
    return lines + [""]


def p99_verdict(runs, ceiling):
    """The p99 < 5 ms verdict of some open-loop runs, with the ceiling's p99 beside it."""
    p99 = [r["p99_ms"] for r in runs]
    return (f"{verdict(statistics.median(p99) < 5)} (median {statistics.median(p99):.2f} ms, worst round "
            f"{max(p99):.2f} ms; the ceiling's: {med(r['p99_ms'] for r in ceiling):.2f} ms)")


def by_round(a, b):
    """Pairs of runs from the same round."""
    rb = {r.get("round"): r for r in b}
    return [(x, rb[x.get("round")]) for x in a if x.get("round") in rb]


HEAD = ("| | requests/s | p50 ms | p99 ms | bytes per answer | CPU µs per answer | non-2xx or socket errors |\n"
        "|---|---|---|---|---|---|---|")


def row(name, runs, cpu="cpu_s"):
    bad = sum(r["non2xx"] + r["socket_errors"] for r in runs)
    return (f"| {name} | {mmm(r['rps'] for r in runs)} | {mmm((r['p50_ms'] for r in runs), '{:.2f}')} "
            f"| {mmm((r['p99_ms'] for r in runs), '{:.2f}')} | {med(r.get('bytes', 0) for r in runs):.0f} "
            f"| {mmm((us_per_answer(r, cpu) for r in runs), '{:.1f}')} | {bad} |")


def server_sections(doc, w):
    s, d = doc["settings"], doc["data"]
    main_fleet = int(s["main"])
    fleets = [int(f) for f in s["fleets"].split()]
    ceiling = d.get("ceiling", [])
    resolve = {f: d.get(f"resolve-{f}", []) for f in fleets}
    sizes = (d.get("sizes") or [{}])[0]
    w.append("## Commands\n")
    w.append("```sh\n" + s["cmd"] + "\n# each round, for the ceiling and for each fleet:\n"
             + "BENCH_PATH=/v1/products/bench/channels/stable/resolve BENCH_TOKENS=tokens.txt "
             + "BENCH_DIGESTS=<base>,<head> \\\n  " + s["wrk"] + " http://127.0.0.1:PORT\n```\n")
    w.append("Each fleet has its own server and database (per-device rate limit raised with "
             "`SLUICE_DEVICE_BURST=1000000 SLUICE_DEVICE_RATE=1000`, since wrk plays each device several times "
             "a second; the limiter still runs): product `bench`, channel `stable` with head 1.1.0 at 50 % "
             "ramping to 100 % over 10 h (base 1.0.0), devices inserted with SQL (half on the base, half on "
             f"the head). wrk cycles through {s['ntokens']} device tokens sampled from the whole fleet, a fresh "
             "nonce per request and the base or head digest as `current`. Every resolve answer is signed "
             "(Ed25519 over a Merkle batch) and its check-in batched into the database.\n")
    w.append("The ceiling is `bench/ceiling`, a bare axum server (its own small crate: axum and tokio, no "
             "middleware, no state, the default allocator) that answers every request with a fixed "
             f"{sizes.get('body', '?')}-byte JSON body, a {sizes.get('signature', '?')}-byte `Sluice-Signature` "
             "header and `Cache-Control: no-store`: as many bytes per answer as resolve's mean under a warm-up "
             "run of wrk (so the signature's inclusion path is as long as batches make it under this load), "
             "the body the median of 21 answers probed meanwhile. It gets the very "
             "same wrk requests (path, query, token). The HTTPS row is a second server on the same database "
             "(rustls, an ECDSA P-256 certificate) that wrk asks with `Connection: close`: a device polling "
             "every few minutes finds its idle connection closed and pays a new TCP connection and TLS "
             "handshake per poll; it is not part of the ratio. *CPU µs per answer* is the server process's user + system "
             "time over the run (`/proc/PID/stat`) divided by the answers; wrk and PostgreSQL are not in it.\n")
    main = resolve.get(main_fleet, [])
    w.append(f"## 1. Resolve against a bare axum ceiling ({main_fleet:,} devices)\n")
    w.append(HEAD)
    w.append(row("ceiling (`bench/ceiling`)", ceiling))
    w.append(row(f"resolve, {main_fleet:,} devices", main))
    tls = d.get("resolve-tls", [])
    if tls:
        w.append(row("resolve over HTTPS, a new connection and full TLS handshake per request", tls))
    variants = d.get("variants", [])
    for v in dict.fromkeys(x["variant"] for x in variants):
        runs = [x for x in variants if x["variant"] == v]
        vr = [x["rps"] / c["rps"] for x, c in by_round(runs, ceiling)]
        w.append(row(f"variant `{v}` (`BENCH_VARIANTS`), per round {mmm(vr, '{:.2f}')} of the ceiling", runs))
    w.append("")
    ratios = [r["rps"] / c["rps"] for r, c in by_round(main, ceiling)]
    p99 = [r["p99_ms"] for r in main]
    if ratios:
        w.append(f"resolve / ceiling, per round: {mmm(ratios, '{:.2f}')}. "
                 f"Target ≥ 0.60: {verdict(statistics.median(ratios) >= 0.6)}. "
                 f"p99 < 5 ms at saturation: {verdict(statistics.median(p99) < 5)} (median "
                 f"{statistics.median(p99):.2f} ms, worst round {max(p99):.2f} ms; the ceiling's: "
                 f"{med(c['p99_ms'] for c in ceiling):.2f} ms). At saturation the latency is mostly the queue "
                 "of wrk's 64 connections; the same target at a fixed load is below.\n")
    load, cload = d.get("resolve-load", []), d.get("ceiling-load", [])
    if load:
        rate = int(s.get("load_rate", "20000"))
        w.append(f"### Latency at a fixed load ({main_fleet:,} devices)\n")
        w.append(f"The same requests at a set rate of {rate:,} a second over 64 connections, well under what "
                 "either server answers at saturation (a server in the capacity model below runs at most half "
                 "busy), sent by `openload` (`bench/ceiling/src/bin/openload.rs`), an open loop as wrk2 is: "
                 "each request is timed from when it was due, so a stall of the server delays every request "
                 "due meanwhile, as it would a fleet's polls. The ceiling and resolve (and any variants) take "
                 "turns, in an order rotated each round.\n")
        w.extend(load_table(d, "-load", main_fleet))
        share = med(r["rps"] for r in load) / med(r["rps"] for r in main) if main else float("nan")
        w.append(f"The load is {share:.2f} of resolve's saturated throughput above. "
                 f"p99 < 5 ms at this load, every process on every CPU: {p99_verdict(load, cload)}.\n")
    placed, cplaced = d.get("resolve-placed", []), d.get("ceiling-placed", [])
    if placed:
        w.append("### The same load, the machine split as production splits it\n")
        w.append("Once more, with the servers and the ceiling alone on half the CPUs and PostgreSQL and "
                 "`openload`, which stand for other machines (the database, the fleet), on the other half: "
                 f"{s.get('placed_split', '?')}. Above, PostgreSQL's check-in statements (about 7 ms of CPU "
                 "per 1 000 devices, which the ceiling does not write) run on the server's own cores and "
                 "preempt its workers; a server in production has no database on its cores. This is where "
                 "the target is read (`docs/DECISIONS.md`); `BENCH_PLACED=0` skips it.\n")
        w.extend(load_table(d, "-placed", main_fleet))
        w.append(f"p99 < 5 ms at this load, the machine split: {p99_verdict(placed, cplaced)}.\n")
    small, large = fleets[0], fleets[-1]
    w.append(f"## 2. Fleet size: {small:,} to {large:,} devices\n")
    w.append(HEAD)
    for f in fleets:
        w.append(row(f"resolve, {f:,} devices", resolve[f]))
    w.append("")
    fr = [b["rps"] / a["rps"] for a, b in by_round(resolve[small], resolve[large])]
    if fr:
        w.append(f"{large:,} / {small:,} devices, per round: {mmm(fr, '{:.2f}')}. "
                 f"Target ≥ 0.90: {verdict(statistics.median(fr) >= 0.9)}.\n")
    rss = {r["fleet"]: r for r in d.get("rss", [])}
    seen = {r["fleet"]: r for r in d.get("checkins", [])}
    setup = {r["fleet"]: r["setup_s"] for r in d.get("setup", [])}
    w.append("| devices | server RSS after the runs | peak RSS (VmHWM) | devices checked in (DB) "
             "| devices table (with indexes) | bytes per device | setup s |\n|---|---|---|---|---|---|---|")
    for f in fleets:
        r, c = rss.get(f, {}), seen.get(f, {})
        w.append(f"| {f:,} | {r.get('rss_mb', 0):.0f} MB | {r.get('hwm_mb', 0):.0f} MB | {c.get('devices_seen', '?')} "
                 f"| {c.get('table_bytes', 0) / 2**20:.0f} MB | {c.get('table_bytes', 0) / f:.0f} "
                 f"| {setup.get(f, 0):.0f} |")
    w.append("")
    if large in rss:
        w.append(f"RSS at {large:,} devices < 300 MB: {verdict(rss[large]['hwm_mb'] < 300)} "
                 f"(peak {rss[large]['hwm_mb']:.0f} MB).\n")
    publish = d.get("publish", [])
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


def checkin_cost(doc):
    """PostgreSQL's cost per 1 000 check-ins written, per repetition."""
    out = []
    for c in doc["data"].get("checkin-cost", []):
        rows = c["rows"]
        if rows <= 0:
            continue
        k = 1000 / rows
        out.append({
            "pg_ms": c["pg_cpu_s"] * k * 1000,
            "pg_ms_net": max(c["pg_cpu_s"] - c["idle_pg_cpu_per_s"] * c["elapsed_s"], 0) * k * 1000,
            "commits": c["commits"] * k, "hot": c["hot_upd"] / max(c["upd"], 1), "wal_kb": c["wal_bytes"] * k / 1024,
            "wal_records": c["wal_records"] * k, "fpi": c["wal_fpi"] * k,
            "buffers": c["buffers_written"] * k, "rows": rows, "requests": c["requests"],
        })
    return out


def replicas_section(doc, w):
    s, d = doc["settings"], doc["data"]
    runs = d.get("replicas", [])
    by = {v: [r for r in runs if r["variant"] == v] for v in ("direct", "1", "2", "3")}
    w.append(f"## 4. Several servers behind HAProxy ({int(s['main']):,} devices)\n")
    w.append(f"Written by `{s['cmd']}` on {doc['written']} (commit `{doc['commit']}`). Three `sluice serve` "
             "processes on one database and one data folder (so one JWT secret and one set of signing keys), "
             "and HAProxy (Debian's, the configuration `start_haproxy` in `scripts/services.sh` writes: "
             "round robin, health checks on `/readyz`, `X-Forwarded-For`) in front of the first 1, 2 or 3 of "
             "them. Each round runs, in a rotated order, wrk straight to server 1 and through each balancer, "
             "with the same requests as section 1. Everything shares the machine's "
             f"{doc['machine']['nproc']} cores, so more servers cannot add throughput here: the figure to "
             "read is what the balancer costs. *CPU µs per answer* is the servers' (all of them) and, in its "
             "own column, HAProxy's.\n")
    w.append("| | requests/s | p50 ms | p99 ms | servers' CPU µs per answer | HAProxy CPU µs per answer "
             "| non-2xx or socket errors |\n|---|---|---|---|---|---|---|")
    names = {"direct": "server 1, no balancer", "1": "HAProxy → 1 server", "2": "HAProxy → 2 servers",
             "3": "HAProxy → 3 servers"}
    for v, rs in by.items():
        if rs:
            bad = sum(r["non2xx"] + r["socket_errors"] for r in rs)
            w.append(f"| {names[v]} | {mmm(r['rps'] for r in rs)} | {mmm((r['p50_ms'] for r in rs), '{:.2f}')} "
                     f"| {mmm((r['p99_ms'] for r in rs), '{:.2f}')} | {mmm((us_per_answer(r) for r in rs), '{:.1f}')} "
                     f"| {mmm((us_per_answer(r, 'lb_cpu_s') for r in rs), '{:.1f}')} | {bad} |")
    w.append("")
    ratio = [b["rps"] / a["rps"] for a, b in by_round(by["direct"], by["1"])]
    if ratio:
        lb = med(us_per_answer(r, "lb_cpu_s") for r in by["1"])
        sv = med(us_per_answer(r) for r in by["direct"])
        w.append(f"HAProxy → 1 server / server 1 alone, per round: {mmm(ratio, '{:.2f}')}: the balancer's "
                 f"own cost on this machine. In CPU: {lb:.1f} µs of HAProxy per answer against {sv:.1f} µs "
                 f"of the server's ({lb / sv:.2f} of a server's work per answer).\n")
    cost = checkin_cost(doc)
    if cost:
        w.append(f"**PostgreSQL per 1 000 check-ins.** {s.get('checkin_devices', '?')} distinct devices' tokens; "
                 "each repetition sends wrk through the 3-server balancer for a few seconds, so every poll is a "
                 "different device (as in a real fleet, where a device polls every few minutes and no batch "
                 "holds it twice), then waits for the last batch to be written. Check-ins written: the devices whose "
                 "`last_seen` is newer than the run's start. Over the run: the PostgreSQL processes' CPU time "
                 "(`/proc`) and the WAL position; after the backends published their statistics: "
                 "`pg_stat_user_tables`, `pg_stat_database`, `pg_stat_wal`, `pg_stat_bgwriter`. *Net* subtracts the database's idle CPU over the same "
                 "interval (the servers' snapshot reloads and revocation polls, autovacuum, the checkpointer), "
                 "measured for 5 s before.\n")
        w.append("| per 1 000 check-ins | median (min–max) |\n|---|---|")
        w.append(f"| PostgreSQL CPU ms | {mmm((c['pg_ms'] for c in cost), '{:.1f}')} |")
        w.append(f"| PostgreSQL CPU ms, net of idle | {mmm((c['pg_ms_net'] for c in cost), '{:.1f}')} |")
        w.append(f"| transactions committed (the check-in batches, and the servers' background reads meanwhile) | {mmm((c['commits'] for c in cost), '{:.2f}')} |")
        w.append(f"| rows updated, of which heap-only (HOT) | 1 000, {mmm((c['hot'] * 100 for c in cost), '{:.0f}')} % |")
        w.append(f"| WAL KiB | {mmm((c['wal_kb'] for c in cost), '{:.0f}')} |")
        w.append(f"| WAL records | {mmm((c['wal_records'] for c in cost), '{:.0f}')} |")
        w.append(f"| full-page images in the WAL | {mmm((c['fpi'] for c in cost), '{:.0f}')} |")
        w.append(f"| 8 KiB buffers written (checkpointer, bgwriter, backends) | {mmm((c['buffers'] for c in cost), '{:.1f}')} |")
        fails = (d.get("checkin-failures") or [{}])[0].get("checkin_write_failures", "?")
        w.append(f"| (check-in writes that failed and were retried, over the whole run) | {fails} |")
        w.append(f"| (check-ins written per repetition, and polls) | {mmm(c['rows'] for c in cost)}, "
                 f"{mmm(c['requests'] for c in cost)} |")
        w.append("")


def partition_section(doc, w):
    s, d = doc["settings"], doc["data"]
    t = d.get("timings", [])
    info = (d.get("info") or [{}])[0]
    w.append(f"## 5. The devices table partitioned by device id ({int(s['rows']):,} devices)\n")
    w.append(f"Written by `{s['cmd']}` on {doc['written']} (commit `{doc['commit']}`). A scratch database "
             "with Sluice's schema (every migration), its `devices` table loaded with "
             f"{int(s['rows']):,} devices of one product (`generate_series`, secondary indexes built after "
             "the load; each row filled as an enrolled device's is today: key, labels, host status, last "
             "offer), and beside it `devices_hash`: the same columns, indexes and "
             f"fill factor, `PARTITION BY HASH (id)` in {s['partitions']} partitions, loaded from it. Each "
             "query runs against both, alternately, "
             f"{s['reps']} times (median, min–max, milliseconds, `EXPLAIN (ANALYZE)`'s execution time, so "
             "the client's transfer is not in it; the check-in batch inside a transaction rolled back, so each "
             "repetition updates the same fresh state).\n")
    w.append(f"Sizes: unpartitioned {info.get('plain_mb', 0):.0f} MB, partitioned {info.get('hash_mb', 0):.0f} MB "
             f"(heap, indexes and TOAST); load {info.get('load_s', 0):.0f} s, copy into the partitions "
             f"{info.get('copy_s', 0):.0f} s.\n")
    w.append("| query | unpartitioned ms | hash-partitioned ms | partitioned / unpartitioned |\n|---|---|---|---|")
    for q in dict.fromkeys(x["query"] for x in t):
        a = [x["ms"] for x in t if x["query"] == q and x["table"] == "devices"]
        b = [x["ms"] for x in t if x["query"] == q and x["table"] == "devices_hash"]
        if a and b:
            w.append(f"| {q} | {mmm(a, '{:.2f}')} | {mmm(b, '{:.2f}')} | {med(b) / med(a):.2f} |")
    w.append("")


def capacity_section(server, replicas, partition, w):
    w.append("## 6. Capacity model\n")
    inputs = {}
    if server:
        d, s = server["data"], server["settings"]
        main = d.get(f"resolve-{s['main']}", [])
        if main:
            inputs["server_us"] = med(us_per_answer(r) for r in main)
        tls = d.get("resolve-tls", [])
        if tls:
            inputs["tls_us"] = med(us_per_answer(r) for r in tls)
        big = max(d.get("checkins", []), key=lambda c: c["fleet"], default=None)
        if big:
            inputs["bytes_per_device"] = big["table_bytes"] / big["fleet"]
            inputs["bytes_fleet"] = big["fleet"]
    if partition:
        info = (partition["data"].get("info") or [{}])[0]
        rows = int(partition["settings"]["rows"])
        if info.get("plain_mb"):
            inputs["bytes_per_device"] = info["plain_mb"] * 2**20 / rows
            inputs["bytes_fleet"] = rows
    if replicas:
        by1 = [r for r in replicas["data"].get("replicas", []) if r["variant"] == "1"]
        if by1:
            inputs["lb_us"] = med(us_per_answer(r, "lb_cpu_s") for r in by1)
        cost = checkin_cost(replicas)
        if cost:
            inputs["pg_ms"] = med(c["pg_ms_net"] for c in cost)
            inputs["wal_kb"] = med(c["wal_kb"] for c in cost)
    need = ("server_us", "pg_ms", "wal_kb", "bytes_per_device")
    if not all(k in inputs for k in need):
        w.append("Needs the figures of `bench/server.sh`, `bench/server.sh --replicas` (and "
                 "`bench/partition.sh`); missing: " + ", ".join(k for k in need if k not in inputs) + ".\n")
        return
    lb = inputs.get("lb_us", 0.0)
    w.append("Measured inputs (sections 1, 2, 4 and 5):\n")
    poll_us = inputs.get("tls_us", inputs["server_us"])
    w.append(f"- a resolve answer costs **{inputs['server_us']:.1f} µs** of server CPU on a kept-alive "
             f"connection and **{poll_us:.1f} µs** with a new connection and TLS handshake, as a device "
             f"polling every {POLL_S // 60} min makes (section 1), and **{lb:.1f} µs** of HAProxy's when it "
             "passes plain HTTP through (section 4; terminating TLS there would move the handshake to it);")
    w.append(f"- PostgreSQL spends **{inputs['pg_ms']:.1f} ms of CPU and writes {inputs['wal_kb']:.0f} KiB of "
             "WAL per 1 000 check-ins** (section 4, distinct devices, net of its idle load);")
    w.append(f"- the devices table takes **{inputs['bytes_per_device']:.0f} bytes per device** with its indexes "
             f"(at {inputs['bytes_fleet']:,} devices).\n")
    w.append(f"Every device polls every {POLL_S // 60} min, so N devices make N / {POLL_S} answers and as many "
             f"check-ins a second. A server here is {SERVER_CORES} cores kept at most {SERVER_BUSY:.0%} busy "
             "(room for a server to fail, for bursts after an outage and for publishing); never fewer than 2, "
             "for availability.\n")
    w.append("| devices | polls/s | server cores busy | servers | HAProxy cores | PostgreSQL cores for check-ins "
             "| WAL | devices table |\n|---|---|---|---|---|---|---|---|")
    for f in FLEETS:
        rate = f / POLL_S
        cores = rate * poll_us / 1e6
        servers = max(2, math.ceil(cores / (SERVER_CORES * SERVER_BUSY)))
        pg = rate * inputs["pg_ms"] / 1e6
        wal = rate * inputs["wal_kb"] / 1000 / 1024
        size = f * inputs["bytes_per_device"] / 2**30
        w.append(f"| {f:,} | {n(rate)} | {cores:.2f} | {servers} | {rate * lb / 1e6:.2f} | {pg:.2f} "
                 f"| {wal:.1f} MiB/s ({wal * 86400 / 1024:.0f} GiB/day) | {size:.1f} GiB |")
    w.append("")


def render(results, out):
    server = load(f"{results}/server.json")
    replicas = load(f"{results}/replicas.json")
    partition = load(f"{results}/partition.json")
    w = ["# Benchmarks\n"]
    first = server or replicas or partition
    runs = [f"`{d['settings']['cmd']}` on {d['written']} (commit `{d['commit']}`)"
            for d in (server, replicas, partition) if d]
    w.append("Written by " + "; ".join(runs) + ". Do not edit by hand: each of those commands saves its "
             "figures in `bench/results/` and rewrites this page from all of them; the notes at the end come "
             "from `bench/NOTES.md`. The agent benchmarks are in [bench/AGENT.md](bench/AGENT.md).\n")
    w.append("Figures are medians over the rounds, (min–max) beside them. **The machine is shared** (a virtual "
             "machine whose neighbours come and go), so absolute numbers are noisy; each round measures every "
             "variant back to back, in an order rotated each round, so the per-round ratios are the figures to "
             "trust. wrk, the servers, HAProxy and PostgreSQL share the same cores.\n")
    if first:
        m = first["machine"]
        w.append("## Machine\n")
        w.append(f"- `nproc`: {m['nproc']}; CPU: {m['cpu']}")
        w.append(f"- memory: {m['mem_mb']} MB; kernel {m['kernel']}; load average at the end of the "
                 f"first run listed: {m['load']}")
        w.append(f"- server: `sluice serve`, {first['settings'].get('profile', 'release')} build (symbols kept), "
                 "PostgreSQL 15 on loopback TCP (fsync and synchronous_commit on, shared_buffers 512MB), "
                 "Debian's `docker-registry`\n")
    if server:
        server_sections(server, w)
    if replicas:
        replicas_section(replicas, w)
    if partition:
        partition_section(partition, w)
    capacity_section(server, replicas, partition, w)
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
    if os.path.exists(notes):
        w.append(open(notes).read().rstrip() + "\n")
    with open(out, "w") as f:
        f.write("\n".join(w))


def main(argv):
    if len(argv) == 5 and argv[1] == "save":
        save(argv[2], argv[3], argv[4])
    elif len(argv) == 4 and argv[1] == "render":
        render(argv[2], argv[3])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
