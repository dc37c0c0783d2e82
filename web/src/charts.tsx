// Charts drawn as plain SVG: devices by version and status (stacked bars), and
// the head's adoption over time (areas). No chart library: two charts do not
// need one, and the SVG stays readable in tests.
import { useLayoutEffect, useState } from "react";
import type { ChannelStats, Schemas } from "./api/client";

/**
 * The width an element is shown at, followed as it changes. Charts draw at
 * that width so their text is never scaled down (a 520-unit chart in a
 * 300 px card would shrink 12 px labels to 7 px).
 */
function useWidth(fallback: number): [(el: Element | null) => void, number] {
  const [el, setEl] = useState<Element | null>(null);
  const [w, setW] = useState(fallback);
  useLayoutEffect(() => {
    if (!el) return;
    const set = () => setW(Math.max(240, Math.round(el.getBoundingClientRect().width)));
    set();
    const ro = new ResizeObserver(set);
    ro.observe(el);
    return () => ro.disconnect();
  }, [el]);
  return [setEl, w];
}

export const STATUSES = ["healthy", "idle", "downloading", "applying", "staged", "rebooting", "failed", "rolled_back"] as const;

type DeviceCount = Schemas["DeviceCount"];

/** Devices per version, each bar split by status. */
export function VersionStatusChart({ counts, head }: { counts: DeviceCount[]; head?: string | null }) {
  const [ref, W] = useWidth(520);
  const byVersion = new Map<string, Map<string, number>>();
  for (const c of counts) {
    const v = c.version ?? "unknown";
    const m = byVersion.get(v) ?? new Map<string, number>();
    m.set(c.status, (m.get(c.status) ?? 0) + c.count);
    byVersion.set(v, m);
  }
  const versions = [...byVersion.keys()].sort(compareVersions).reverse();
  const total = (v: string) => [...byVersion.get(v)!.values()].reduce((a, b) => a + b, 0);
  const max = Math.max(1, ...versions.map(total));
  const all = versions.reduce((a, v) => a + total(v), 0);
  if (versions.length === 0) return <p className="muted">No devices on this channel yet.</p>;
  const rowH = 26;
  const labelW = 96;
  const barW = W - labelW - 50;
  const present = STATUSES.filter((s) => counts.some((c) => c.status === s && c.count > 0));
  return (
    <figure className="chart" aria-label="Devices by version and status" data-total={all} ref={ref}>
      <svg width={W} height={versions.length * rowH + 6} viewBox={`0 0 ${W} ${versions.length * rowH + 6}`} role="img">
        <title>Devices by version and status</title>
        {versions.map((v, i) => {
          let x = labelW;
          const m = byVersion.get(v)!;
          return (
            <g key={v} transform={`translate(0 ${i * rowH + 3})`} data-version={v} data-count={total(v)}>
              <text x={labelW - 8} y={rowH / 2 + 1} textAnchor="end" dominantBaseline="middle" className={v === head ? "bold" : ""}>
                {v}
              </text>
              {STATUSES.filter((s) => m.get(s)).map((s) => {
                const w = (m.get(s)! / max) * barW;
                const r = (
                  <rect key={s} x={x} y={3} width={Math.max(w, 1)} height={rowH - 8} className={`f-${s}`}>
                    <title>{`${v}: ${m.get(s)} ${s.replace("_", " ")}`}</title>
                  </rect>
                );
                x += w;
                return r;
              })}
              <text x={x + 6} y={rowH / 2 + 1} dominantBaseline="middle" className="muted">
                {total(v)}
              </text>
            </g>
          );
        })}
      </svg>
      <figcaption className="legend">
        {present.map((s) => (
          <span key={s}>
            <i className={`f-${s}`} /> {s.replace("_", " ")}
          </span>
        ))}
      </figcaption>
    </figure>
  );
}

/** How many devices ran the head over time, with failures on it. */
export function AdoptionChart({ stats }: { stats: ChannelStats }) {
  const [ref, W] = useWidth(600);
  const pts = stats.points;
  const last = pts[pts.length - 1];
  const H = 200;
  const L = 40;
  const B = 22;
  const max = Math.max(1, ...pts.map((p) => p.devices));
  const t0 = new Date(stats.since).getTime();
  const t1 = new Date(stats.until).getTime();
  const x = (iso: string) => L + ((new Date(iso).getTime() - t0) / Math.max(1, t1 - t0)) * (W - L - 8);
  const y = (n: number) => H - B - (n / max) * (H - B - 10);
  const area = (f: (p: (typeof pts)[number]) => number) =>
    pts.length
      ? `M${x(stats.since)},${y(0)} ` + pts.map((p) => `L${x(p.at).toFixed(1)},${y(f(p)).toFixed(1)}`).join(" ") + ` L${x(pts[pts.length - 1].at)},${y(0)} Z`
      : "";
  const line = (f: (p: (typeof pts)[number]) => number) =>
    pts.map((p, i) => `${i ? "L" : "M"}${x(p.at).toFixed(1)},${y(f(p)).toFixed(1)}`).join(" ");
  const ticks = [0, Math.round(max / 2), max].filter((v, i, a) => a.indexOf(v) === i);
  const times = [stats.since, new Date((t0 + t1) / 2).toISOString(), stats.until];
  return (
    <figure
      className="chart"
      aria-label="Adoption of the head over time"
      data-on-head={last?.on_head ?? 0}
      data-devices={last?.devices ?? 0}
      data-failed={last?.failed ?? 0}
      ref={ref}
    >
      <svg width={W} height={H} viewBox={`0 0 ${W} ${H}`} role="img">
        <title>Devices on the head over time</title>
        {ticks.map((t) => (
          <g key={t}>
            <line x1={L} x2={W - 8} y1={y(t)} y2={y(t)} className="grid" />
            <text x={L - 6} y={y(t)} textAnchor="end" dominantBaseline="middle" className="muted">
              {t}
            </text>
          </g>
        ))}
        {times.map((t, i) => (
          <text key={i} x={x(t)} y={H - 6} textAnchor={i === 0 ? "start" : i === 2 ? "end" : "middle"} className="muted">
            {shortTime(t, t1 - t0)}
          </text>
        ))}
        <path d={area((p) => p.devices)} className="a-total" />
        <path d={area((p) => p.on_head)} className="a-head" data-series="on_head" />
        <path d={line((p) => p.failed)} className="l-failed" data-series="failed" />
      </svg>
      <figcaption className="legend">
        <span>
          <i className="a-head" /> on {stats.head ?? "the head"}
        </span>
        <span>
          <i className="a-total" /> all devices
        </span>
        <span>
          <i className="l-failed" /> failed on the head
        </span>
        <span className="adoption-now">
          Now: {last?.on_head ?? 0} of {last?.devices ?? 0} devices on {stats.head ?? "no head"}, {last?.failed ?? 0} failed
        </span>
      </figcaption>
    </figure>
  );
}

function shortTime(iso: string, spanMs: number): string {
  const d = new Date(iso);
  return spanMs > 2 * 86400e3
    ? d.toLocaleDateString(undefined, { month: "short", day: "numeric" })
    : d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
}

/** SemVer order, good enough for sorting a chart's rows (pre-releases before releases). */
export function compareVersions(a: string, b: string): number {
  const parse = (v: string) => {
    const [core, pre] = v.split("+")[0].split(/-(.*)/s);
    return { nums: core.split(".").map((n) => parseInt(n, 10) || 0), pre };
  };
  const x = parse(a);
  const y = parse(b);
  for (let i = 0; i < Math.max(x.nums.length, y.nums.length); i++) {
    const d = (x.nums[i] ?? 0) - (y.nums[i] ?? 0);
    if (d) return d;
  }
  if (x.pre === y.pre) return 0;
  if (!x.pre) return 1;
  if (!y.pre) return -1;
  return x.pre < y.pre ? -1 : 1;
}
