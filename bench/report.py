#!/usr/bin/env python3
"""Writes bench/AGENT.md from what bench/agent.sh measured (its environment)."""

import json
import os
import statistics
import time

E = os.environ


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def rows():
    out = []
    if not E.get("RESULTS") or not os.path.exists(E["RESULTS"]):
        return out
    for line in open(E["RESULTS"]):
        f = line.rstrip("\n").split("\t")
        out.append(
            {
                "who": f[0],
                "fs": f[1],
                "run": int(f[2]),
                "wall": float(f[3]),
                "rss_mb": int(f[4]) / 1024,
                "skopeo": float(f[5]) if len(f) > 5 else None,
                "umoci": float(f[6]) if len(f) > 6 else None,
            }
        )
    return out


def mmm(xs, fmt="{:.2f}"):
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})" if xs else "–"


def main():
    L = []
    w = L.append
    smoke = E.get("SMOKE") == "1"
    w("# Agent benchmarks (issue 5, benchmarks 4–6; issue 16, benchmark 7)")
    w("")
    w(
        f"Written by `bench/agent.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit "
        f"`{E.get('COMMIT', '?')}`{' (SMOKE RUN: tiny image, debug build, figures meaningless)' if smoke else ''}. "
        "Rerun: `bench/agent.sh` (as root; `--runs N`, `--devices N`, `--skip-upgrade|--skip-footprint|--skip-fleet|--skip-bandwidth`, `--only-bandwidth`)."
    )
    w("")
    w(
        f"Machine: {E.get('CPU_MODEL', '?')}, {E.get('NPROC', '?')} cores, {E.get('MEM_GB', '?')} GB RAM, "
        f"Linux {E.get('KERNEL', '?')}; skopeo {E.get('SKOPEO_V', '?')}, umoci {E.get('UMOCI_V', '?')}; "
        f"`{E.get('PROFILE', 'release')}` build. **The machine is shared** (a virtual machine "
        f"whose neighbours come and go; load average at the end: {E.get('LOADAVG', '?')}): absolute figures are noisy, "
        "which is why agent and reference ran alternately in the same loop and medians are given with min and max."
    )
    w("")

    R = rows()
    if E.get("DO_UPGRADE") == "1" and R:
        w("## 4. Upgrade: `sluice-agent apply` against `skopeo copy` + `umoci raw unpack`")
        w("")
        w(
            f"Image: `bench/mkimage.py --scale {E.get('SCALE')}` (deterministic), {float(E['TAR_MB']):.0f} MB of tar in "
            f"4 gzip layers ({float(E['GZ_MB']):.0f} MB compressed), {E['FILES']} regular files; at scale 1: ~31 000 small text "
            "files in ~3 000 folders (with symlinks, hard links, a setuid file, another owner), ~1 300 library-like "
            "files (2:1), four big files (locale archive, initrd, kernel, dpkg status) and 60 MB of incompressible "
            "firmware with whiteouts. Pushed to a private `docker-registry` on loopback, published through the real "
            f"server (`sluice release publish`, {float(E.get('PUBLISH_S') or 0):.2f} s here) with its own PostgreSQL."
        )
        w("")
        w(
            "Each run gets a fresh file system: a `tmpfs`, or a fresh ext4 (`mkfs.ext4` defaults: journaled) "
            "in a 4 GiB image file on /dev/shm, loop-mounted. The registry's blobs are in the page cache. "
            f"{E.get('RUNS')} runs per file system; in odd runs the agent goes first, in even runs the reference. "
            "Wall time includes the final `sync` (the agent already `syncfs`es the slot before switching GRUB; "
            "neither skopeo nor umoci syncs anything)."
        )
        w("")
        w("| file system | agent wall s | reference wall s (skopeo + umoci) | ratio agent/ref (target ≤ 0.35) | agent peak RSS MB (target ≤ 32) | reference peak RSS MB |")
        w("|---|---|---|---|---|---|")
        for fs in ("tmpfs", "ext4"):
            a = [r for r in R if r["who"] == "agent" and r["fs"] == fs]
            ref = [r for r in R if r["who"] == "reference" and r["fs"] == fs]
            if not a or not ref:
                continue
            aw = [r["wall"] for r in a]
            rw = [r["wall"] for r in ref]
            ratio = med(aw) / med(rw)
            pair = [x["wall"] / y["wall"] for x in a for y in ref if x["run"] == y["run"]]
            w(
                f"| {fs} | {mmm(aw)} | {mmm(rw)} (skopeo {med([r['skopeo'] for r in ref]):.2f} + umoci "
                f"{med([r['umoci'] for r in ref]):.2f}) | **{ratio:.2f}** (per run {min(pair):.2f}–{max(pair):.2f}) "
                f"{'✔' if ratio <= 0.35 else '✘'} | {mmm([r['rss_mb'] for r in a], '{:.1f}')} "
                f"{'✔' if max(r['rss_mb'] for r in a) <= 32 else '✘'} | {mmm([r['rss_mb'] for r in ref], '{:.1f}')} |"
            )
        w("")
        O = [r for r in R if r["who"] == "other"]
        if O:
            w(
                f"Also in the same loop, right after each agent run, another agent build "
                f"(`{E.get('SLUICE_BENCH_COMPARE_LABEL') or E.get('SLUICE_BENCH_COMPARE')}`):"
            )
            w("")
            w("| file system | that agent wall s | ratio to the reference | peak RSS MB |")
            w("|---|---|---|---|")
            for fs in ("tmpfs", "ext4"):
                o = [r["wall"] for r in O if r["fs"] == fs]
                rw = [r["wall"] for r in R if r["who"] == "reference" and r["fs"] == fs]
                if o and rw:
                    w(
                        f"| {fs} | {mmm(o)} | {med(o) / med(rw):.2f} | "
                        f"{mmm([r['rss_mb'] for r in O if r['fs'] == fs], '{:.1f}')} |"
                    )
            w("")
        w("Median (min–max). Every run, in order:")
        w("")
        w(
            "| run | fs | agent s | agent RSS MB | reference s | skopeo s | umoci s | reference RSS MB |"
            + (" other agent s |" if O else "")
        )
        w("|---|---|---|---|---|---|---|---|" + ("---|" if O else ""))
        for run in sorted({r["run"] for r in R}):
            for fs in ("tmpfs", "ext4"):
                a = [r for r in R if r["who"] == "agent" and r["fs"] == fs and r["run"] == run]
                ref = [r for r in R if r["who"] == "reference" and r["fs"] == fs and r["run"] == run]
                if a and ref:
                    a, ref = a[0], ref[0]
                    w(
                        f"| {run} | {fs} | {a['wall']:.2f} | {a['rss_mb']:.1f} | {ref['wall']:.2f} | "
                        f"{ref['skopeo']:.2f} | {ref['umoci']:.2f} | {ref['rss_mb']:.1f} |"
                        + "".join(
                            f" {o['wall']:.2f} |" for o in O if o["fs"] == fs and o["run"] == run
                        )
                    )
        w("")
        w("Commands, per run (`$MNT` the fresh file system, `$DIGEST` the published platform digest):")
        w("")
        w("```sh")
        w("# agent: a device whose slots a/ and b/, state, grubenv and cmdline (sluice.slot=A) are under $MNT")
        w("/usr/bin/time -f '%e %M' sluice-agent --config $MNT/dev/agent.toml apply && sync")
        w("# reference")
        w("/usr/bin/time -f '%e %M' skopeo copy -q --src-tls-verify=false docker://$REGISTRY/bench/os@$DIGEST oci:$MNT/layout:t")
        w("/usr/bin/time -f '%e %M' umoci raw unpack --rootless --image $MNT/layout:t $MNT/rootfs && sync")
        w("```")
        w("")
        w(
            "The agent's wall time is the whole upgrade as a device does it: enroll, resolve (signed answer "
            "checked), image signature checked, manifest and layers pulled by digest and verified while "
            "streaming, unpacked into slot B (as root: owners kept, which `umoci --rootless` does not do), "
            "`syncfs`, grubenv switched and the events reported. After the first run on each file system the "
            "script compares the agent's slot B with umoci's rootfs (types, modes, sizes, link targets, all "
            "file contents) and fails if they differ."
        )
        w("")

    if E.get("DO_FOOT") == "1" and E.get("BIN_BYTES"):
        b = int(E["BIN_BYTES"])
        s = int(E["STRIPPED_BYTES"])
        idle = int(E["IDLE_KB"]) / 1024
        idle2 = int(E["IDLE2_KB"]) / 1024
        w("## 5. Agent footprint")
        w("")
        w("| what | figure | target |")
        w("|---|---|---|")
        w(
            f"| release binary (`cargo build --release -p sluice-agent`; the workspace profile strips it, thin LTO) | "
            f"{b / 1e6:.2f} MB ({b} bytes; `strip` again: {s} bytes) | ≤ 12 MB {'✔' if s <= 12e6 else '✘'} |"
        )
        w(
            f"| idle RSS of `sluice-agent run`, 1 s after its first poll | {idle:.1f} MB ({E['IDLE_KB']} kB; "
            f"VmHWM {int(E['IDLE_HWM_KB']) / 1024:.1f} MB) | ≤ 8 MB {'✔' if idle <= 8 else '✘'} |"
        )
        w(f"| the same after its next poll | {idle2:.1f} MB ({E['IDLE2_KB']} kB) | ≤ 8 MB {'✔' if idle2 <= 8 else '✘'} |")
        w("")
        w(
            "The daemon runs on an up-to-date device (it applied 1.0.0 into slot B, booted B, `mark-good`), so "
            f"every poll gets a signed answer offering the release it runs, verified, and waits the "
            f"`poll_after_s` of {E.get('POLL_S')} s the server hands out. RSS read from `/proc/PID/status` (VmRSS)."
        )
        w("")

    fj = E.get("FLEET_JSON")
    if E.get("DO_FLEET") == "1" and fj and os.path.exists(fj):
        r = json.load(open(fj))
        p = r["params"]
        n = r["devices"]
        w("## 6. Fleet simulation")
        w("")
        w(
            f"`bench/fleet.py` plays {n} devices (Python asyncio, {p['connections']} keep-alive connections over "
            f"loopback) against the same server: enroll, `resolve` every `poll_after_s` ({E.get('POLL_S')} s, "
            f"±10 %), events as the agent sends them, a simulated apply of {p['apply_s'][0]:g}–{p['apply_s'][1]:g} s "
            f"and a reboot of {p['reboot_s']:g} s. Release 1.1.0 goes out by a ramp 0 → 100 % over "
            f"{p['ramp_minutes']:g} min with {p['fail_good']:g} % of devices failing its health check (below the "
            f"gate); once the fleet has settled, 1.2.0 goes out by the same ramp with {p['fail_bad']:g} % failing. "
            f"Health gate: halt above {p['gate_max_failure_percent']:g} % failed or rolled back, judged from "
            f"{p['gate_min_reports']} reports. The server's per-device rate limit (burst 60, 1/s) is never "
            f"reached at these poll rates ({r['rate_limited']} answers were 429); its check-ins are batched "
            "(last-seen lags by up to `SLUICE_CHECKIN_FLUSH_MS`), events are not, so the gate sees every outcome at once."
        )
        w("")
        w(f"![adoption curve](fleet.png)")
        w("")
        w("| when (s) | what |")
        w("|---|---|")
        for t, what in r["marks"]:
            w(f"| {t:.1f} | {what} |")
        w("")
        fin = r["final"]
        w(
            f"Result: {fin['on'].get('1.1.0', 0)} devices ended on 1.1.0, {fin['on'].get('1.2.0', 0)} on 1.2.0, "
            f"{fin['on'].get('1.0.0', 0)} on 1.0.0; {fin['failed'].get('1.1.0', 0)} failed 1.1.0 and "
            f"{fin['failed'].get('1.2.0', 0)} failed 1.2.0. "
            + (
                f"**The gate halted 1.2.0 {r['gate_halted_at_s'] - r['ramp2_started_at_s']:.1f} s after its promotion**, "
                f"at {r['final_channel']['rollout']['effective_percent']:.1f} % of the ramp: "
                f"\"{r['final_channel']['rollout'].get('paused_reason') or ''}\"."
                if r.get("gate_halted_at_s")
                else "The gate did not halt 1.2.0."
            )
        )
        w("")
        w(
            f"Load: enrollment of {n} devices took {r['enroll_s']:.1f} s; {r['requests']} requests in "
            f"{r['duration_s']:.0f} s ({r['requests_per_s']:.0f}/s on average), resolve seen by the Python client "
            f"p50 {r['resolve_ms']['p50']} ms, p99 {r['resolve_ms']['p99']} ms, max {r['resolve_ms']['max']} ms "
            "(client, server and PostgreSQL on the same 2 shared cores)."
        )
        w("")
        w("Devices on each version over time (client's count; `effective %` is the server's):")
        w("")
        w("| t s | head | effective % | paused | on 1.0.0 | on 1.1.0 | on 1.2.0 | failed 1.1.0 | failed 1.2.0 | in flight | gate failures/reports |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        step = max(1, len(r["timeline"]) // 24)
        tl = r["timeline"]
        for x in tl[::step] + ([tl[-1]] if tl and (len(tl) - 1) % step else []):
            w(
                f"| {x['t']:.0f} | {x['head']} | {x['effective_percent']:.1f} | {'yes' if x['paused'] else ''} | "
                f"{x['on']['1.0.0']} | {x['on']['1.1.0']} | {x['on']['1.2.0']} | {x['failed'].get('1.1.0', 0)} | "
                f"{x['failed'].get('1.2.0', 0)} | {x['in_flight']} | {x['gate']['failures']}/{x['gate']['reports']} |"
            )
        w("")
        w("Command (the script starts the server with `SLUICE_POLL_AFTER_S` set to the poll interval):")
        w("")
        w("```sh")
        w(
            f"bench/fleet.py --server $API --token $ADMIN_TOKEN --repository $REGISTRY/bench/fleet --devices {n} "
            f"--poll-s {E.get('POLL_S')} {E.get('FLEET_ARGS_STR', '')} --png bench/fleet.png"
        )
        w("```")
        w("")
    only_bw = all(E.get(k) != "1" for k in ("DO_UPGRADE", "DO_FOOT", "DO_FLEET"))
    if only_bw and os.path.exists(E["OUT"]):
        # `--only-bandwidth`: the other sections stay as the last full run
        # wrote them; section 7 is replaced (or added at the end).
        old = open(E["OUT"]).read()
        cut = old.find("## 7. Bandwidth")
        L = [(old if cut < 0 else old[:cut]).rstrip("\n"), ""]
        w = L.append
    if E.get("DO_BW") == "1" and E.get("BW_RESULTS"):
        bandwidth(w)
    with open(E["OUT"], "w") as f:
        f.write("\n".join(L))


def bandwidth(w):
    """Benchmark 7: bytes and time of a v1 → v2 upgrade by compression."""
    by = {}
    for line in open(E["BW_RESULTS"]):
        name, _, secs, rss, nbytes = line.rstrip("\n").split("\t")
        by.setdefault(name, []).append((float(secs), int(rss), int(nbytes)))
    changed = json.load(open(E["BW_CHANGED"]))
    ref = by.get("reference", [])
    ref_s = med([x[0] for x in ref]) if ref else None
    w("## 7. Bandwidth: a v1 → v2 upgrade by compression")
    w("")
    w(
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit `{E.get('COMMIT', '?')}`, "
        f"`{E.get('PROFILE', 'release')}` build, load average at the end {E.get('LOADAVG', '?')}"
        f"{' (SMOKE RUN: tiny image, debug build, figures meaningless)' if E.get('SMOKE') == '1' else ''}. "
        "Rerun alone: `bench/agent.sh --only-bandwidth [--runs N]`."
    )
    w("")
    w(
        f"v1 is the image of benchmark 4; v2 is `bench/mkimage.py --scale {E.get('SCALE')} --version 2.0.0 --update 0.02` "
        "(the same seed: about 2 % of the regular files rewritten in part, a tenth of that many removed and as many "
        "added, as a package update does). Each as 4 layers and squashed into one layer (the worst case for layer "
        "reuse), each as gzip (mkimage's `gzip -6`, umoci's for the squashed one), `zstd` and `zstd:chunked` (both "
        "`skopeo copy --dest-compress-format`, skopeo "
        f"{E.get('SKOPEO_V', '?')}). A device on a fresh tmpfs installs v1 from the server, boots it and marks it good; "
        "then the channel is promoted to v2 and the timed `sluice-agent apply` installs it (wall time to `sync`). "
        "Bytes are what the registry's access log says it served for blob GETs during that apply (tables of "
        f"contents and ranges included). {E.get('RUNS')} runs each; medians, with min–max."
    )
    w("")
    w("| image | fetched MB | of the full pull | wall s (min–max) | × full gzip | peak RSS MB |")
    w("|---|---|---|---|---|---|")
    for layering in ["layers4", "squashed"]:
        full = by.get(f"{layering}-gzip")
        full_b = med([x[2] for x in full]) if full else None
        full_s = med([x[0] for x in full]) if full else None
        for fmt in ["gzip", "zstd", "zstd-chunked"]:
            xs = by.get(f"{layering}-{fmt}")
            if not xs:
                continue
            b = med([x[2] for x in xs])
            s = med([x[0] for x in xs])
            w(
                f"| {layering.replace('layers4', '4 layers')}, {fmt.replace('-', ':')} | {b / 1e6:.2f} | "
                f"{b / full_b:.3f} | {s:.2f} ({min(x[0] for x in xs):.2f}–{max(x[0] for x in xs):.2f}) | "
                f"{s / full_s:.2f} | {max(x[1] for x in xs) / 1024:.1f} |"
            )
    if ref:
        w(
            f"| reference: skopeo + umoci, v2 gzip 4 layers | {med([x[2] for x in ref]) / 1e6:.2f} | | "
            f"{ref_s:.2f} ({min(x[0] for x in ref):.2f}–{max(x[0] for x in ref):.2f}) | | |"
        )
    floor = by.get("floor")
    if floor:
        sq = by.get("squashed-gzip")
        ratio = f"{med([x[0] for x in floor]) / med([x[0] for x in sq]):.2f}" if sq else ""
        w(
            f"| floor: copying v2's slot locally (`cp -a` + `sync`, no network, no hashing) | | | "
            f"{med([x[0] for x in floor]):.2f} ({min(x[0] for x in floor):.2f}–{max(x[0] for x in floor):.2f}) | "
            f"{ratio} | |"
        )
    link = {k[5:]: v for k, v in by.items() if k.startswith("link-")}
    if link:
        rate = float(E.get("LINK_BYTES_S") or 0)
        w("")
        lg = link.get("layers4-gzip")
        eff = (
            f" The full gzip pull averaged {med([x[2] for x in lg]) / med([x[0] for x in lg]) / 1e6:.1f} MB/s through it "
            "(the proxy, one Python process, paces in 16 KiB steps and does not reach its ceiling)."
            if lg
            else ""
        )
        w(
            f"The same upgrades over a slow link: `bench/throttle.py` between the device and the registry paces what "
            f"the registry sends to at most {rate * 8 / 1e6:.0f} Mbit/s ({rate / 1e6:.1f} MB/s, one link shared by all of a "
            f"pull's connections), as a metered or cellular line would; the rest as above.{eff}"
        )
        w("")
        w("| image, over the link | fetched MB | wall s (min–max) | × full gzip over the link | peak RSS MB |")
        w("|---|---|---|---|---|")
        lfull = link.get("layers4-gzip")
        lfull_s = med([x[0] for x in lfull]) if lfull else None
        for name in ["layers4-gzip", "layers4-zstd", "layers4-zstd-chunked", "squashed-zstd-chunked"]:
            xs = link.get(name)
            if not xs:
                continue
            s = med([x[0] for x in xs])
            layering, fmt = name.split("-", 1)
            ratio = f"{s / lfull_s:.2f}" if lfull_s else ""
            w(
                f"| {layering.replace('layers4', '4 layers')}, {fmt.replace('-', ':')} | {med([x[2] for x in xs]) / 1e6:.2f} | "
                f"{s:.2f} ({min(x[0] for x in xs):.2f}–{max(x[0] for x in xs):.2f}) | {ratio} | "
                f"{max(x[1] for x in xs) / 1024:.1f} |"
            )
    w("")
    w("What changed, compressed (from the `zstd:chunked` tables: v2's files whose content v1 lacks):")
    w("")
    w("| image | changed files | their zstd bytes MB | tables MB | partial fetched MB | ratio to changed + tables (target ≤ 1.5) |")
    w("|---|---|---|---|---|---|")
    for layering, c in changed.items():
        xs = by.get(f"{layering}-zstd-chunked")
        if not xs:
            continue
        b = med([x[2] for x in xs])
        base = c["changed_bytes"] + c["toc_bytes"]
        w(
            f"| {layering.replace('layers4', '4 layers')} | {c['changed_files']} | {c['changed_bytes'] / 1e6:.2f} | "
            f"{c['toc_bytes'] / 1e6:.2f} | {b / 1e6:.2f} | {b / base:.2f} |"
        )
    w("")
    w(
        "Targets (issue 16): the partial upgrade fetches ≤ 1.5 × the changed files' zstd bytes plus the tables, "
        "takes ≤ 0.3 × the time of the full gzip upgrade (read over the link; over loopback the floor row, copying "
        "the slot and nothing else, bounds any A/B writer: docs/DECISIONS.md); a full zstd upgrade is no slower than a "
        "full gzip one; peak RSS ≤ 32 MB. The server's estimate for each channel (`GET .../transfer`) is in "
        "`transfer-*.json` of the run folder; the agent's own account is its log line `partial pull: ...`."
    )
    w("")


if __name__ == "__main__":
    main()
