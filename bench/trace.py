#!/usr/bin/env python3
"""When the slow requests of an open-loop run came.

    python3 bench/trace.py FILE... [--second S]

Each FILE is one of openload's traces (OPENLOAD_TRACE_DIR): a line per
answered request, microseconds from the start to when it was due, and its
latency in microseconds. For each file: the p99, how many requests took
over 2 ms and in which tenth of a second they were due (summed over the
run: a cause that comes once a second, such as the check-in writer's
round, shows as a few busy tenths), and a strip of second S (default 4),
one character per millisecond: the slowest request due in it, `#` over
4 ms, `+` over 2 ms, `.` over 1 ms.
"""
import collections
import sys


def main(argv):
    second = 4
    if "--second" in argv:
        i = argv.index("--second")
        second = int(argv[i + 1])
        del argv[i : i + 2]
    if not argv:
        sys.exit(__doc__)
    for path in argv:
        rows = [tuple(map(int, line.split())) for line in open(path) if line.strip()]
        if not rows:
            print(f"{path}: empty")
            continue
        lat = sorted(l for _, l in rows)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        slow = [d for d, l in rows if l > 2000]
        tenths = collections.Counter((d // 100_000) % 10 for d in slow)
        print(f"{path}: {len(rows)} requests, p99 {p99 / 1000:.2f} ms, {len(slow)} over 2 ms")
        print("  over 2 ms by tenth of the second:", [tenths[i] for i in range(10)])
        worst = collections.defaultdict(int)
        for d, l in rows:
            worst[d // 1000] = max(worst[d // 1000], l)
        mark = lambda v: "#" if v > 4000 else "+" if v > 2000 else "." if v > 1000 else " "
        strip = "".join(mark(worst.get(ms, 0)) for ms in range(second * 1000, (second + 1) * 1000))
        for i in range(0, 1000, 100):
            print(f"  {second}.{i // 100} s |{strip[i:i + 100]}|")


if __name__ == "__main__":
    main(sys.argv[1:])
