// One channel: head and base, the rollout (its waves) and its gate, the reboot
// policy and who holds a reboot lease, the controls that change them (each
// confirmed), the head's adoption over time and the history.
import { useState } from "react";
import { Link, useParams } from "react-router";
import { api, unwrap, type Channel, type Schemas } from "../api/client";
import { AdoptionChart, VersionStatusChart } from "../charts";
import { useSession } from "../session";
import {
  ActionButton,
  ChannelStateBadge,
  ErrorBox,
  HeadFacts,
  MoreButton,
  Show,
  Spinner,
  Table,
  ago,
  bytes,
  gateText,
  pct,
  useApi,
  usePages,
  useRows,
  when,
} from "../ui";

const WINDOWS: [string, number][] = [
  ["5 minutes", 300],
  ["1 hour", 3600],
  ["6 hours", 6 * 3600],
  ["24 hours", 86400],
  ["7 days", 7 * 86400],
];

export function ChannelPage() {
  const { product = "", channel = "" } = useParams();
  const { isAdmin } = useSession();
  const path = { product, channel };
  const ch = useApi(() => unwrap(api.GET("/v1/products/{product}/channels/{channel}", { params: { path } })), [product, channel], 5000);
  const [windowS, setWindowS] = useState(3600);
  const stats = useApi(
    () =>
      unwrap(
        api.GET("/v1/products/{product}/channels/{channel}/stats", {
          params: { path, query: { since: new Date(Date.now() - windowS * 1000).toISOString() } },
        }),
      ),
    [product, channel, windowS],
    5000,
  );
  const heads = useApi(
    () => unwrap(api.GET("/v1/products/{product}/channels/{channel}/head-status", { params: { path } })),
    [product, channel],
    5000,
  );
  const [historyKey, setHistoryKey] = useState(0);
  const transfer = useApi(
    () => unwrap(api.GET("/v1/products/{product}/channels/{channel}/transfer", { params: { path } })),
    [product, channel, historyKey],
  );
  const [warnings, setWarnings] = useState<string[]>([]);
  const changed = () => {
    ch.reload();
    stats.reload();
    heads.reload();
    setHistoryKey((k) => k + 1);
  };
  return (
    <>
      <p className="crumbs">
        <Link to="/">Fleet</Link> / {product} / channel
      </p>
      <h1>{channel}</h1>
      <Show state={ch}>
        {(c) => (
          <>
            {c.description && <p className="muted">{c.description}</p>}
            <div className="grid2">
              <section className="card">
                <h2>Release</h2>
                <dl className="facts">
                  <HeadFacts c={c} link={(v) => <Link to={`/releases/${product}/${v}`}>{v}</Link>} />
                  <dt>Serial</dt>
                  <dd>{c.serial}</dd>
                  <dt>Changed</dt>
                  <dd>{ago(c.updated_at)}</dd>
                </dl>
                {warnings.length > 0 && (
                  <div className="warning" role="alert" data-testid="promote-warnings">
                    <b>The promote leaves devices behind:</b>
                    <ul>
                      {warnings.map((w) => (
                        <li key={w}>{w}</li>
                      ))}
                    </ul>
                    <button className="link" onClick={() => setWarnings([])}>
                      Dismiss
                    </button>
                  </div>
                )}
                <h3>Download from the base</h3>
                <Show state={transfer}>{(t) => <Transfer t={t} />}</Show>
                {isAdmin && (
                  <div className="buttons">
                    <Promote product={product} channel={c} done={changed} warn={setWarnings} />
                    <Rollback product={product} channel={c} done={changed} />
                  </div>
                )}
              </section>
              <section className="card">
                <h2>Rollout</h2>
                <RolloutFacts c={c} />
                {isAdmin && (
                  <div className="buttons">
                    <SetPercent product={product} channel={c} done={changed} />
                    <PauseResume product={product} channel={c} done={changed} />
                    <GateSettings product={product} channel={c} done={changed} />
                  </div>
                )}
              </section>
            </div>
            <Reboots product={product} channel={c} isAdmin={isAdmin} done={changed} />
            <div className="grid2">
              <section className="card">
                <h2>Devices by version and status</h2>
                <VersionStatusChart counts={c.devices} head={c.head} />
                <p>
                  <Link to={`/devices?product=${product}&channel=${channel}`}>Devices on this channel →</Link>
                </p>
                <h3>Not on the head</h3>
                <Show state={heads}>{(h) => <NotOnHead h={h} />}</Show>
              </section>
              <section className="card">
                <div className="row">
                  <h2>Adoption of the head</h2>
                  <select aria-label="Window" value={windowS} onChange={(e) => setWindowS(Number(e.target.value))}>
                    {WINDOWS.map(([l, s]) => (
                      <option key={s} value={s}>
                        last {l}
                      </option>
                    ))}
                  </select>
                </div>
                <Show state={stats}>{(s) => <AdoptionChart stats={s} />}</Show>
              </section>
            </div>
          </>
        )}
      </Show>
      <History key={historyKey} product={product} channel={channel} />
    </>
  );
}

function RolloutFacts({ c }: { c: Channel }) {
  const r = c.rollout;
  const g = c.gate;
  return (
    <dl className="facts">
      <dt>Percent</dt>
      <dd data-testid="percent">
        {pct(r.effective_percent)}
        {r.ramp && r.effective_percent !== r.percent && <span className="muted"> (set {pct(r.percent)})</span>}
      </dd>
      <dt>Ramp</dt>
      <dd>
        {r.ramp
          ? `${pct(r.ramp.from_percent)} → ${pct(r.ramp.to_percent)} over ${r.ramp.over_minutes} min, since ${when(r.ramp.started_at)}`
          : c.waves
            ? "per wave"
            : "none"}
      </dd>
      <dt>State</dt>
      <dd data-testid="state">
        <ChannelStateBadge c={c} /> {r.paused && r.paused_reason}
      </dd>
      <dt>Health gate</dt>
      <dd>
        halts above {pct(g.max_failure_percent)} failures once {g.min_reports} devices reported
      </dd>
      <dt>Gate now</dt>
      <dd data-testid="gate">
        {g.failures} of {g.reports} failed{" "}
        <span className={`badge ${gateText(g).cls}`}>{g.tripped ? "tripped" : g.reports < g.min_reports ? "waiting for reports" : "ok"}</span>
      </dd>
      {c.waves && (
        <>
          <dt>Waves</dt>
          <dd>
            <Waves w={c.waves} />
          </dd>
        </>
      )}
    </dl>
  );
}

/** A wave's devices in words. */
const devicesOf = (selector: string | undefined) => (selector ? selector : "every device");

/** A rollout in waves: where it stands, then each wave (done, current, waiting). */
function Waves({ w }: { w: Schemas["WavesState"] }) {
  const n = w.waves.length;
  const cur = w.waves[w.current];
  return (
    <div data-testid="waves">
      <p data-testid="waves-now">
        {w.done
          ? `All ${n} waves done.`
          : `Wave ${w.current + 1} of ${n} (${devicesOf(cur?.selector)}) at ${pct(w.current_percent)}${w.next_starts_at ? `; the next starts ${when(w.next_starts_at)}.` : "; it is the last."}`}
      </p>
      <Table className="waves" head={["#", "Devices", "Percent", "Ramp", "Soak"]}>
        {w.waves.map((x, i) => {
          const state = w.done || i < w.current ? "done" : i === w.current ? "current" : "waiting";
          return (
            <tr key={i} className={`wave-${state}`} data-testid="wave" data-state={state}>
              <td>
                {i + 1} {state === "current" && <span className="badge s-healthy">now</span>}
                {state === "done" && <span className="badge">done</span>}
              </td>
              <td>{devicesOf(x.selector)}</td>
              <td>{pct(x.percent ?? 100)}</td>
              <td>{x.ramp_minutes ? `${x.ramp_minutes} min` : "at once"}</td>
              <td>{x.hold_minutes ? `${x.hold_minutes} min` : "—"}</td>
            </tr>
          );
        })}
      </Table>
      <p className="muted small">First wave started {when(w.started_at)}.</p>
    </div>
  );
}

/** A lease policy in words. */
function leaseText(l: Schemas["LeaseSpec"] | null | undefined): string {
  if (!l) return "none: any number of devices reboot at once";
  const limits = [l.max_devices != null && `${l.max_devices} device${l.max_devices === 1 ? "" : "s"}`, l.max_percent != null && pct(l.max_percent)].filter(Boolean).join(" and ");
  return `at most ${limits || "1 device"} at once${l.per_label ? `, per ${l.per_label}` : ""}; a lease expires after ${l.ttl_minutes ?? 30} min`;
}

/** When devices reboot into what they staged: the windows, the leases, who holds one now. */
function Reboots({ product, channel, isAdmin, done }: ControlProps & { isAdmin: boolean }) {
  const p = channel.reboot_policy;
  const leases = useApi(
    () => unwrap(api.GET("/v1/products/{product}/channels/{channel}/leases", { params: { path: { product, channel: channel.name } } })),
    [product, channel.name],
    5000,
  );
  return (
    <section className="card" data-testid="reboots">
      <h2>Reboots</h2>
      <dl className="facts">
        <dt>Windows</dt>
        <dd data-testid="windows">
          {p.windows_described.length === 0 ? (
            "none: devices reboot once they staged"
          ) : (
            <ul className="plain">
              {p.windows_described.map((text, i) => (
                <li key={i} data-testid="window">
                  {text} <span className="muted">for {devicesOf(p.windows?.[i]?.selector)}</span>
                </li>
              ))}
            </ul>
          )}
        </dd>
        <dt>Leases</dt>
        <dd data-testid="lease">{leaseText(p.lease)}</dd>
      </dl>
      <h3>Holding a reboot lease now</h3>
      <Show state={leases}>
        {(ls) =>
          ls.length === 0 ? (
            <p className="muted" data-testid="no-holders">
              No device.
            </p>
          ) : (
            <Table className="leases" head={["Device", "Group", "Since", "Expires", ...(isAdmin ? [""] : [])]}>
              {ls.map((l) => (
                <LeaseRow key={`${l.group}/${l.id}`} l={l} isAdmin={isAdmin} done={leases.reload} />
              ))}
            </Table>
          )
        }
      </Show>
      {isAdmin && (
        <div className="buttons">
          <RebootPolicyForm key={JSON.stringify(p)} product={product} channel={channel} done={done} />
        </div>
      )}
    </section>
  );
}

/**
 * One lease and its holder: a device's machine id and link when it is one of
 * ours (a FleetLock client's id as sent otherwise); an admin can free it.
 */
function LeaseRow({ l, isAdmin, done }: { l: Schemas["ChannelLease"]; isAdmin: boolean; done: () => void }) {
  const isUuid = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(l.id);
  const d = useApi(async () => (isUuid ? unwrap(api.GET("/v1/devices/{id}", { params: { path: { id: l.id } } })) : undefined), [l.id]);
  const name = d.data?.machine_id ?? l.id;
  return (
    <tr data-testid="lease-holder" data-id={l.id}>
      <td>
        {isUuid ? (
          <Link to={`/devices/${l.id}`} title={l.id}>
            {name}
          </Link>
        ) : (
          <span className="mono">{l.id}</span>
        )}
      </td>
      <td className="mono">{l.group}</td>
      <td title={when(l.acquired_at)}>{ago(l.acquired_at)}</td>
      <td>{when(l.expires_at)}</td>
      {isAdmin && (
        <td>
          <ActionButton
            label="Free…"
            title={`Free the reboot lease of ${name}?`}
            confirmLabel="Free"
            danger
            run={async () => {
              await unwrap(api.DELETE("/v1/leases/{group}/{id}", { params: { path: { group: l.group, id: l.id } } }));
              return `Freed the reboot lease of ${name} in ${l.group}.`;
            }}
            done={done}
          >
            <p>
              Another device of {l.group} may then reboot. Free a lease only when its holder is stuck: if it still reboots, it counts against no
              limit.
            </p>
          </ActionButton>
        </td>
      )}
    </tr>
  );
}

interface WindowRow {
  days: string;
  start: string;
  end: string;
  time_zone: string;
  selector: string;
}

/** The browser's zone, the likeliest one for a new window. */
const HERE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";

function RebootPolicyForm({ product, channel, done }: ControlProps) {
  const p = channel.reboot_policy;
  const windows = useRows<WindowRow>(() =>
    (p.windows ?? []).map((w) => ({ days: w.days, start: w.start, end: w.end, time_zone: w.time_zone, selector: w.selector ?? "" })),
  );
  const [maxDevices, setMaxDevices] = useState(String(p.lease?.max_devices ?? ""));
  const [maxPercent, setMaxPercent] = useState(String(p.lease?.max_percent ?? ""));
  const [perLabel, setPerLabel] = useState(p.lease?.per_label ?? "");
  const [ttl, setTtl] = useState(String(p.lease?.ttl_minutes ?? ""));
  return (
    <ActionButton
      label="Reboot policy…"
      title={`Reboot policy of ${channel.name}`}
      confirmLabel="Save"
      wide
      run={async () => {
        const lease =
          maxDevices.trim() || maxPercent.trim() || perLabel.trim() || ttl.trim()
            ? { max_devices: num(maxDevices) ?? null, max_percent: num(maxPercent) ?? null, per_label: perLabel.trim() || null, ttl_minutes: num(ttl) }
            : null;
        const c = await unwrap(
          api.PUT("/v1/products/{product}/channels/{channel}/reboot-policy", {
            params: { path: { product, channel: channel.name } },
            body: { windows: windows.rows.map((w) => ({ ...w, selector: w.selector.trim() })), lease },
          }),
        );
        const r = c.reboot_policy;
        return `Devices of ${c.name} reboot ${r.windows_described.length ? `in ${r.windows_described.join("; ")}` : "at any time"}; reboot leases: ${leaseText(r.lease)}.`;
      }}
      done={done}
    >
      <p className="muted">
        Devices download and write a new release at any time, and reboot into it only inside a window that applies to them (none: any time).
        An urgent release does not wait for its window.
      </p>
      {windows.rows.map((w, i) => (
        <fieldset className="rows window" key={i}>
          <legend>Window {i + 1}</legend>
          <label>
            Days
            <input name="days" placeholder="Sat, Mon-Fri, daily" value={w.days} onChange={(e) => windows.set(i, { days: e.target.value })} />
          </label>
          <label>
            From
            <input name="start" placeholder="02:00" value={w.start} onChange={(e) => windows.set(i, { start: e.target.value })} />
          </label>
          <label>
            To
            <input name="end" placeholder="04:00" value={w.end} onChange={(e) => windows.set(i, { end: e.target.value })} />
          </label>
          <label>
            Time zone
            <input name="time_zone" list="time-zones" value={w.time_zone} onChange={(e) => windows.set(i, { time_zone: e.target.value })} />
          </label>
          <label>
            Devices
            <input name="selector" placeholder="every device, or ring=canary" value={w.selector} onChange={(e) => windows.set(i, { selector: e.target.value })} />
          </label>
          <button type="button" className="link" onClick={() => windows.remove(i)}>
            Remove
          </button>
        </fieldset>
      ))}
      <datalist id="time-zones">
        {Intl.supportedValuesOf("timeZone").map((z) => (
          <option key={z} value={z} />
        ))}
      </datalist>
      <div className="buttons">
        <button type="button" onClick={() => windows.add({ days: "Sat", start: "02:00", end: "04:00", time_zone: HERE, selector: "" })}>
          Add a window
        </button>
      </div>
      <fieldset className="rows lease">
        <legend>Reboot leases: at most so many devices of a group between reboot and boot check (empty: no limit)</legend>
        <label>
          Devices
          <input name="max_devices" type="number" value={maxDevices} onChange={(e) => setMaxDevices(e.target.value)} />
        </label>
        <label>
          or % of the group
          <input name="max_percent" type="number" inputMode="decimal" value={maxPercent} onChange={(e) => setMaxPercent(e.target.value)} />
        </label>
        <label>
          A group per label
          <input name="per_label" placeholder="site" value={perLabel} onChange={(e) => setPerLabel(e.target.value)} />
        </label>
        <label>
          Expires after min
          <input name="ttl_minutes" type="number" placeholder="30" value={ttl} onChange={(e) => setTtl(e.target.value)} />
        </label>
      </fieldset>
    </ActionButton>
  );
}

interface ControlProps {
  product: string;
  channel: Channel;
  done: () => void;
}

/** A number input that keeps what was typed, so out-of-range values reach the API and its message. */
function num(s: string): number | undefined {
  return s.trim() === "" ? undefined : Number(s);
}

/** The percent of devices and the optional ramp after it, as typed into a promote or a rollout change. */
function useRolloutForm(initialPercent: string) {
  const [percent, setPercent] = useState(initialPercent);
  const [rampTo, setRampTo] = useState("");
  const [rampMin, setRampMin] = useState("");
  return { percent, setPercent, rampTo, setRampTo, rampMin, setRampMin };
}

/** The ramp the form asks for: none while both its fields are empty. */
function rampOf(rampTo: string, rampMin: string) {
  return rampTo || rampMin ? { to_percent: Number(rampTo), over_minutes: Number(rampMin) } : undefined;
}

/** The fields of [`useRolloutForm`]; `legend` and `toLabel` word the ramp for the form it is in. */
function RolloutFields({ form, legend, toLabel }: { form: ReturnType<typeof useRolloutForm>; legend: string; toLabel: string }) {
  return (
    <>
      <label>
        Percent of devices
        <input name="percent" type="number" inputMode="decimal" value={form.percent} onChange={(e) => form.setPercent(e.target.value)} />
      </label>
      <fieldset>
        <legend>{legend}</legend>
        <label>
          {toLabel}
          <input name="ramp_to" type="number" value={form.rampTo} onChange={(e) => form.setRampTo(e.target.value)} />
        </label>
        <label>
          over minutes
          <input name="ramp_minutes" type="number" value={form.rampMin} onChange={(e) => form.setRampMin(e.target.value)} />
        </label>
      </fieldset>
    </>
  );
}

interface WaveRow {
  selector: string;
  percent: string;
  ramp: string;
  hold: string;
}

/** The waves as the API takes them. */
function wavesOf(rows: WaveRow[]): Schemas["WaveSpec"][] {
  return rows.map((w) => ({ selector: w.selector.trim(), percent: num(w.percent), ramp_minutes: num(w.ramp), hold_minutes: num(w.hold) }));
}

/** The promote's body: waves when there are any, else the percent and ramp. */
function promoteBody(version: string, percent: string, rampTo: string, rampMin: string, waves: WaveRow[]) {
  return waves.length
    ? { version, percent: null, waves: wavesOf(waves) }
    : { version, percent: num(percent) ?? null, ramp: rampOf(rampTo, rampMin) };
}

function Promote({ product, channel, done, warn }: ControlProps & { warn: (w: string[]) => void }) {
  const [version, setVersion] = useState("");
  // Start small: 10 % first, then raise it or let a ramp do it.
  const form = useRolloutForm("10");
  const { percent, rampTo, rampMin } = form;
  const waves = useRows<WaveRow>(() => []);
  const releases = useApi(
    () => unwrap(api.GET("/v1/products/{product}/releases", { params: { path: { product }, query: { limit: 100 } } })),
    [product],
  );
  const options = (releases.data?.items ?? []).filter((r) => r.state === "active" && r.version !== channel.head);
  return (
    <ActionButton
      label="Promote…"
      title={`Promote a release in ${channel.name}`}
      confirmLabel="Promote"
      wide={waves.rows.length > 0}
      run={async () => {
        const v = version || options[0]?.version;
        if (!v) throw new Error("no release to promote: publish one first");
        const c = await unwrap(
          api.POST("/v1/products/{product}/channels/{channel}/promote", {
            params: { path: { product, channel: channel.name } },
            body: promoteBody(v, percent, rampTo, rampMin, waves.rows),
          }),
        );
        warn(c.warnings);
        return `Promoted ${c.head} in ${c.name}: ${c.plan.message}${c.warnings.length ? ` With ${c.warnings.length} warning${c.warnings.length > 1 ? "s" : ""}.` : ""}`;
      }}
      done={done}
    >
      {releases.error && <ErrorBox error={releases.error} />}
      {releases.loading && !releases.data ? (
        <Spinner />
      ) : (
        <label>
          Release
          <select name="version" value={version || options[0]?.version || ""} onChange={(e) => setVersion(e.target.value)}>
            {options.map((r) => (
              <option key={r.version} value={r.version}>
                {r.version}
                {r.floor ? " (floor)" : ""}
              </option>
            ))}
          </select>
        </label>
      )}
      {waves.rows.length === 0 && <RolloutFields form={form} legend="Then ramp up (optional)" toLabel="to %" />}
      {waves.rows.map((w, i) => (
        <fieldset className="rows wave" key={i}>
          <legend>Wave {i + 1}</legend>
          <label>
            Devices
            <input name="selector" placeholder="every device, or ring=canary" value={w.selector} onChange={(e) => waves.set(i, { selector: e.target.value })} />
          </label>
          <label>
            Percent
            <input name="wave_percent" type="number" value={w.percent} onChange={(e) => waves.set(i, { percent: e.target.value })} />
          </label>
          <label>
            Ramp min
            <input name="wave_ramp" type="number" value={w.ramp} onChange={(e) => waves.set(i, { ramp: e.target.value })} />
          </label>
          <label>
            Then soak min
            <input name="wave_hold" type="number" value={w.hold} onChange={(e) => waves.set(i, { hold: e.target.value })} />
          </label>
          <button type="button" className="link" onClick={() => waves.remove(i)}>
            Remove
          </button>
        </fieldset>
      ))}
      <div className="buttons">
        <button type="button" onClick={() => waves.add({ selector: "", percent: "100", ramp: "0", hold: waves.rows.length ? "0" : "60" })}>
          {waves.rows.length ? "Add a wave" : "Roll out in waves instead…"}
        </button>
      </div>
      <PromotePlan
        product={product}
        channel={channel.name}
        version={version || options[0]?.version}
        percent={percent}
        rampTo={rampTo}
        rampMin={rampMin}
        waves={waves.rows}
      />
    </ActionButton>
  );
}

/** What the promote would do, as the server's dry run says it: which release becomes the base, who stays where. */
function PromotePlan(p: { product: string; channel: string; version?: string; percent: string; rampTo: string; rampMin: string; waves: WaveRow[] }) {
  const plan = useApi(async () => {
    if (!p.version) return undefined;
    const c = await unwrap(
      api.POST("/v1/products/{product}/channels/{channel}/promote", {
        params: { path: { product: p.product, channel: p.channel } },
        body: { ...promoteBody(p.version, p.percent, p.rampTo, p.rampMin, p.waves), dry_run: true },
      }),
    );
    return c.plan;
  }, [p.product, p.channel, p.version, p.percent, p.rampTo, p.rampMin, JSON.stringify(p.waves)]);
  if (plan.error) return <p className="muted" data-testid="promote-plan">Cannot promote so: {plan.error}</p>;
  if (!plan.data) return <Spinner label="Asking the server what the promote would do…" />;
  return (
    <p className={plan.data.interrupted ? "warning" : ""} data-testid="promote-plan">
      {plan.data.message}
    </p>
  );
}

function SetPercent({ product, channel, done }: ControlProps) {
  const form = useRolloutForm(String(channel.rollout.percent));
  return (
    <ActionButton
      label="Change percent…"
      title={`Change the rollout of ${channel.head ?? "the head"}`}
      confirmLabel="Apply"
      disabled={!channel.head}
      run={async () => {
        const c = await unwrap(
          api.PATCH("/v1/products/{product}/channels/{channel}/rollout", {
            params: { path: { product, channel: channel.name } },
            body: { percent: num(form.percent), ramp: rampOf(form.rampTo, form.rampMin) },
          }),
        );
        return `Rollout of ${c.head} in ${c.name} is now ${pct(c.rollout.effective_percent)}${c.rollout.ramp ? `, ramping to ${pct(c.rollout.ramp.to_percent)}` : ""}.`;
      }}
      done={done}
    >
      <RolloutFields form={form} legend="Ramp from there (optional)" toLabel="up to %" />
    </ActionButton>
  );
}

function PauseResume({ product, channel, done }: ControlProps) {
  const paused = channel.rollout.paused;
  return (
    <ActionButton
      label={paused ? "Resume" : "Pause"}
      title={paused ? `Resume the rollout in ${channel.name}?` : `Pause the rollout in ${channel.name}?`}
      confirmLabel={paused ? "Resume" : "Pause"}
      danger={!paused}
      disabled={!channel.head}
      run={async () => {
        const c = await unwrap(
          api.PATCH("/v1/products/{product}/channels/{channel}/rollout", {
            params: { path: { product, channel: channel.name } },
            body: { paused: !paused },
          }),
        );
        return c.rollout.paused ? `Paused the rollout of ${c.head} in ${c.name}.` : `Resumed the rollout of ${c.head} in ${c.name}.`;
      }}
      done={done}
    >
      <p>
        {paused
          ? `Devices will again be admitted to ${channel.head} up to ${pct(channel.rollout.percent)}.`
          : `No new device will get ${channel.head}; devices already on it keep it.`}
      </p>
    </ActionButton>
  );
}

function Rollback({ product, channel, done }: ControlProps) {
  const [version, setVersion] = useState("");
  return (
    <ActionButton
      label="Roll back…"
      title={`Roll back ${channel.name}`}
      confirmLabel="Roll back"
      danger
      disabled={!channel.head}
      run={async () => {
        const c = await unwrap(
          api.POST("/v1/products/{product}/channels/{channel}/rollback", {
            params: { path: { product, channel: channel.name } },
            body: version.trim() ? { version: version.trim() } : {},
          }),
        );
        return `Rolled back ${c.name} to ${c.head} at ${pct(c.rollout.percent)}; devices on newer versions will move down.`;
      }}
      done={done}
    >
      <p>
        The head becomes {channel.base ? <b>{channel.base}</b> : "the release you name"} for every device, and devices on {channel.head} move
        down to it.
      </p>
      <label>
        Version (empty: the base, {channel.base ?? "none"})
        <input name="version" value={version} onChange={(e) => setVersion(e.target.value)} placeholder={channel.base ?? ""} />
      </label>
    </ActionButton>
  );
}

function GateSettings({ product, channel, done }: ControlProps) {
  const [max, setMax] = useState(String(channel.gate.max_failure_percent));
  const [min, setMin] = useState(String(channel.gate.min_reports));
  return (
    <ActionButton
      label="Health gate…"
      title={`Health gate of ${channel.name}`}
      confirmLabel="Save"
      run={async () => {
        const c = await unwrap(
          api.PATCH("/v1/products/{product}/channels/{channel}/rollout", {
            params: { path: { product, channel: channel.name } },
            body: { gate: { max_failure_percent: Number(max), min_reports: Number(min) } },
          }),
        );
        return `The gate of ${c.name} now halts above ${pct(c.gate.max_failure_percent)} failures once ${c.gate.min_reports} devices reported.`;
      }}
      done={done}
    >
      <label>
        Halt above this % of failures
        <input name="max_failure_percent" type="number" value={max} onChange={(e) => setMax(e.target.value)} />
      </label>
      <label>
        once this many devices reported
        <input name="min_reports" type="number" value={min} onChange={(e) => setMin(e.target.value)} />
      </label>
    </ActionButton>
  );
}

function History({ product, channel }: { product: string; channel: string }) {
  const pages = usePages(
    (cursor) =>
      unwrap(
        api.GET("/v1/products/{product}/channels/{channel}/history", { params: { path: { product, channel }, query: { limit: 20, cursor } } }),
      ),
    [product, channel],
  );
  return (
    <section className="card">
      <h2>History</h2>
      <Show state={pages.first}>
        {(p) => (
          <Table className="history" head={["When", "Who", "What", "Why", "Head / percent after"]}>
            {[...p.items, ...pages.more].map((h) => {
              const after = (h.after ?? {}) as { head?: string; percent?: number; paused?: boolean };
              return (
                <tr key={h.id}>
                  <td title={when(h.at)}>{ago(h.at)}</td>
                  <td title={h.actor} data-testid="actor">
                    {h.actor_name}
                  </td>
                  <td>
                    <span className={`badge a-${h.action}`}>{h.action}</span>
                  </td>
                  <td>{h.reason ?? ""}</td>
                  <td>
                    {after.head ?? "—"}
                    {after.percent !== undefined && ` · ${pct(after.percent)}`}
                    {after.paused && " · paused"}
                  </td>
                </tr>
              );
            })}
          </Table>
        )}
      </Show>
      <MoreButton pages={pages} label="Older changes…" />
    </section>
  );
}

const REASONS: Record<string, string> = {
  outside_cohort: "outside the rollout's percent",
  waiting_for_wave: "waiting for their wave",
  paused: "rollout paused",
  no_platform: "no image for their architecture",
  failed_before: "failed on it before",
  pinned: "pinned",
  floor: "stepping through a floor",
  newer_than_head: "newer than the head",
  head_revoked: "head revoked",
  no_head: "no head",
  not_checked_in: "not checked in since the change",
  updating: "installing it now",
  staged: "written, waiting to reboot",
  offered: "offered, not installed yet",
  device_revoked: "device revoked",
};

/** Devices not on the head, counted by why (the rules resolve applies). */
/** What a device on the base fetches to reach the head, per platform. */
function Transfer({ t }: { t: Schemas["ChannelTransfer"] }) {
  if (!t.head) return <p className="muted">No head yet.</p>;
  if (t.platforms.length === 0) return <p className="muted">The head has no platforms.</p>;
  return (
    <ul className="transfer">
      {t.platforms.map((p) => (
        <li key={p.platform} data-testid="transfer">
          <b>{p.platform}</b>:{" "}
          {p.expected_bytes == null ? (
            <>{bytes(p.head_bytes)} in all</>
          ) : (
            <>
              {bytes(p.expected_bytes)} of {bytes(p.head_bytes)}
              {p.head_bytes > 0 && p.expected_bytes < p.head_bytes && (
                <> ({Math.round((100 * p.expected_bytes) / p.head_bytes)}%)</>
              )}
            </>
          )}{" "}
          <span className="muted">— {p.note}</span>
        </li>
      ))}
    </ul>
  );
}

function NotOnHead({ h }: { h: Schemas["ChannelHeadStatus"] }) {
  if (h.devices === 0) return <p className="muted">No devices on this channel yet.</p>;
  return (
    <div data-testid="not-on-head">
      <p>
        {h.on_head} of {h.devices} devices run {h.head ?? "the head"}.
      </p>
      {h.not_on_head.length > 0 && (
        <table className="reasons">
          <tbody>
            {h.not_on_head.map((r) => (
              <tr key={r.reason} data-reason={r.reason} data-count={r.count}>
                <td className="num">{r.count}</td>
                <td>
                  <b>{REASONS[r.reason] ?? r.reason.replaceAll("_", " ")}</b>
                  <div className="muted small">e.g. {r.message}</div>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}
