// One channel: head and base, the rollout and its gate, the controls that
// change them (each confirmed), the head's adoption over time and the history.
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
    </dl>
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

function Promote({ product, channel, done, warn }: ControlProps & { warn: (w: string[]) => void }) {
  const [version, setVersion] = useState("");
  // Start small: 10 % first, then raise it or let a ramp do it.
  const form = useRolloutForm("10");
  const { percent, rampTo, rampMin } = form;
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
      run={async () => {
        const v = version || options[0]?.version;
        if (!v) throw new Error("no release to promote: publish one first");
        const ramp = rampOf(rampTo, rampMin);
        const c = await unwrap(
          api.POST("/v1/products/{product}/channels/{channel}/promote", {
            params: { path: { product, channel: channel.name } },
            body: { version: v, percent: num(percent) ?? null, ramp },
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
      <RolloutFields form={form} legend="Then ramp up (optional)" toLabel="to %" />
      <PromotePlan product={product} channel={channel.name} version={version || options[0]?.version} percent={percent} rampTo={rampTo} rampMin={rampMin} />
    </ActionButton>
  );
}

/** What the promote would do, as the server's dry run says it: which release becomes the base, who stays where. */
function PromotePlan(p: { product: string; channel: string; version?: string; percent: string; rampTo: string; rampMin: string }) {
  const plan = useApi(async () => {
    if (!p.version) return undefined;
    const ramp = rampOf(p.rampTo, p.rampMin);
    const c = await unwrap(
      api.POST("/v1/products/{product}/channels/{channel}/promote", {
        params: { path: { product: p.product, channel: p.channel } },
        body: { version: p.version, percent: num(p.percent) ?? null, ramp, dry_run: true },
      }),
    );
    return c.plan;
  }, [p.product, p.channel, p.version, p.percent, p.rampTo, p.rampMin]);
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
