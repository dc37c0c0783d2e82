// The fleet as a table with search, filters (a label selector too) and paging,
// and one device with its event timeline, slot, versions, why it has not
// moved, labels, pin and identity (revoke, reset, delete).
import { useState, type FormEvent, type ReactNode } from "react";
import { Link, useNavigate, useParams, useSearchParams } from "react-router";
import { api, unwrap, type Device } from "../api/client";
import { STATUSES } from "../charts";
import { useSession } from "../session";
import { ActionButton, Show, StatusBadge, Table, ago, short, useApi, useRows, when } from "../ui";

const FILTERS = ["q", "product", "channel", "version", "status", "label", "not_seen_for_s"] as const;
const QUIET: [string, string][] = [
  ["any time", ""],
  ["over 10 minutes ago", "600"],
  ["over an hour ago", "3600"],
  ["over a day ago", "86400"],
  ["over a week ago", "604800"],
];
const PAGE = 50;
/** How GRUB treats a slot (`SlotBoot`), in words. */
const BOOT: Record<string, string> = {
  good: "known good",
  trial: "on trial, its try unspent",
  tried: "on trial, try spent",
  bad: "not bootable",
};

export function Devices() {
  const [params, setParams] = useSearchParams();
  const products = useApi(() => unwrap(api.GET("/v1/products")), []);
  const filter = Object.fromEntries(FILTERS.map((k) => [k, params.get(k) ?? ""])) as Record<(typeof FILTERS)[number], string>;
  const [draft, setDraft] = useState(filter);
  // Cursors of the pages before this one, for "Previous".
  const [trail, setTrail] = useState<string[]>([]);
  const cursor = params.get("cursor") ?? undefined;
  const page = useApi(
    () =>
      unwrap(
        api.GET("/v1/devices", {
          params: {
            query: {
              q: filter.q || undefined,
              product: filter.product || undefined,
              channel: filter.channel || undefined,
              version: filter.version || undefined,
              status: filter.status || undefined,
              label: filter.label || undefined,
              not_seen_for_s: filter.not_seen_for_s ? Number(filter.not_seen_for_s) : undefined,
              limit: PAGE,
              cursor,
            },
          },
        }),
      ),
    [params.toString()],
    10000,
  );
  const apply = (e: FormEvent) => {
    e.preventDefault();
    setTrail([]);
    setParams(Object.fromEntries(Object.entries(draft).filter(([, v]) => v !== "")));
  };
  const go = (c: string | undefined, back: boolean) => {
    const p = new URLSearchParams(params);
    if (c) p.set("cursor", c);
    else p.delete("cursor");
    setTrail((t) => (back ? t.slice(0, -1) : [...t, cursor ?? ""]));
    setParams(p);
  };
  const set = (k: (typeof FILTERS)[number]) => (e: { target: { value: string } }) => setDraft((d) => ({ ...d, [k]: e.target.value }));
  return (
    <>
      <h1>Devices</h1>
      <form className="filters card" onSubmit={apply} role="search">
        <label className="wide">
          Search
          <input name="q" placeholder="machine id or device id" value={draft.q} onChange={set("q")} />
        </label>
        <label>
          Product
          <select name="product" value={draft.product} onChange={set("product")}>
            <option value="">all</option>
            {(products.data ?? []).map((p) => (
              <option key={p.name}>{p.name}</option>
            ))}
          </select>
        </label>
        <label>
          Channel
          <input name="channel" value={draft.channel} onChange={set("channel")} />
        </label>
        <label>
          Version
          <input name="version" value={draft.version} onChange={set("version")} />
        </label>
        <label>
          Status
          <select name="status" value={draft.status} onChange={set("status")}>
            <option value="">any</option>
            {STATUSES.map((s) => (
              <option key={s} value={s}>
                {s.replace("_", " ")}
              </option>
            ))}
          </select>
        </label>
        <label>
          Labels
          <input name="label" placeholder="ring=canary,region!=us" title="A label selector: key=value, key!=value, key, !key; all must hold" value={draft.label} onChange={set("label")} />
        </label>
        <label>
          Last seen
          <select name="not_seen_for_s" value={draft.not_seen_for_s} onChange={set("not_seen_for_s")}>
            {QUIET.map(([l, v]) => (
              <option key={v} value={v}>
                {l}
              </option>
            ))}
          </select>
        </label>
        <div className="buttons">
          <button type="submit" className="primary">
            Filter
          </button>
          <button
            type="button"
            onClick={() => {
              setDraft(Object.fromEntries(FILTERS.map((k) => [k, ""])) as typeof draft);
              setTrail([]);
              setParams({});
            }}
          >
            Clear
          </button>
        </div>
      </form>
      <Show state={page}>
        {(p) => (
          <>
            <Table className="devices" head={["Machine", "Product / channel", "Version", "Status", "Slot", "Labels", "Last seen"]}>
              {p.items.map((d) => (
                <tr key={d.id}>
                  <DeviceCells
                    d={d}
                    badges={
                      <>
                        {d.pin && <span className="badge floor">pinned</span>}
                        {d.revoked_at && <span className="badge s-failed">revoked</span>}
                      </>
                    }
                    detail={d.status_version && d.status_version !== d.current_version && <span className="muted"> {d.status_version}</span>}
                  />
                  <td>{d.booted_slot ?? "—"}</td>
                  <td>
                    <Labels labels={d.labels} />
                  </td>
                  <td title={when(d.last_seen)}>{ago(d.last_seen)}</td>
                </tr>
              ))}
            </Table>
            {p.items.length === 0 && <p className="muted">No device matches.</p>}
            <div className="pager">
              <button disabled={!cursor} onClick={() => go(trail[trail.length - 1] || undefined, true)}>
                ← Previous
              </button>
              <span className="muted">
                page {trail.length + 1} · {p.items.length} shown
              </span>
              <button disabled={!p.next_cursor} onClick={() => go(p.next_cursor ?? undefined, false)}>
                Next →
              </button>
            </div>
          </>
        )}
      </Show>
    </>
  );
}

/**
 * The cells every list of devices starts with: the machine (a link to its
 * page, then `badges`), product / channel, version, and status (then `detail`).
 */
export function DeviceCells({ d, badges, detail }: { d: Device; badges?: ReactNode; detail?: ReactNode }) {
  return (
    <>
      <td>
        <Link to={`/devices/${d.id}`}>{d.machine_id}</Link>
        {badges}
      </td>
      <td>
        {d.product} / {d.channel}
      </td>
      <td>{d.current_version ?? "—"}</td>
      <td>
        <StatusBadge status={d.status} />
        {detail}
      </td>
    </>
  );
}

/** A device's labels (typed loosely in the API). */
const labelsOf = (labels: unknown) => (labels ?? {}) as Record<string, string>;

function Labels({ labels }: { labels: unknown }) {
  const entries = Object.entries(labelsOf(labels));
  return (
    <>
      {entries.map(([k, v]) => (
        <span key={k} className="label">
          {k}={v}
        </span>
      ))}
    </>
  );
}

export function DevicePage() {
  const { id = "" } = useParams();
  const { isAdmin } = useSession();
  const d = useApi(() => unwrap(api.GET("/v1/devices/{id}", { params: { path: { id } } })), [id], 10000);
  return (
    <>
      <p className="crumbs">
        <Link to="/devices">Devices</Link>
      </p>
      <Show state={d}>
        {(dev) => (
          <>
            <h1>
              {dev.machine_id} <StatusBadge status={dev.status} />
              {dev.revoked_at && (
                <span className="badge s-failed" data-testid="revoked">
                  revoked
                </span>
              )}
            </h1>
            <div className="grid2">
              <section className="card">
                <h2>Device</h2>
                <dl className="facts">
                  <dt>Id</dt>
                  <dd className="mono wrap">{dev.id}</dd>
                  <dt>Product</dt>
                  <dd>{dev.product}</dd>
                  <dt>Channel</dt>
                  <dd>
                    <Link to={`/products/${dev.product}/channels/${dev.channel}`}>{dev.channel}</Link>
                  </dd>
                  <dt>Arch</dt>
                  <dd>{dev.arch}</dd>
                  <dt>Labels</dt>
                  <dd data-testid="labels">
                    {Object.keys(labelsOf(dev.labels)).length ? <Labels labels={dev.labels} /> : <span className="muted">none</span>}
                  </dd>
                  <dt>Enrolled</dt>
                  <dd>{when(dev.created_at)}</dd>
                  <dt>Last seen</dt>
                  <dd title={when(dev.last_seen)}>{ago(dev.last_seen)}</dd>
                  <dt>Device key</dt>
                  <dd className="mono" data-testid="key">
                    {dev.key_id ?? (dev.awaiting_enrollment ? "none: reset, waiting for the machine to enroll again" : "none: enrolled before device keys")}
                  </dd>
                  <dt>Access</dt>
                  <dd data-testid="access">
                    {dev.revoked_at ? `revoked ${when(dev.revoked_at)}${dev.revoked_reason ? `: ${dev.revoked_reason}` : ""}` : "allowed"}
                  </dd>
                </dl>
                {isAdmin && (
                  <div className="buttons">
                    <LabelControls key={JSON.stringify(dev.labels)} id={dev.id} machine={dev.machine_id} labels={labelsOf(dev.labels)} done={d.reload} />
                  </div>
                )}
                {isAdmin && <IdentityControls id={dev.id} machine={dev.machine_id} revoked={!!dev.revoked_at} done={d.reload} />}
              </section>
              <section className="card">
                <h2>Slots and versions</h2>
                <dl className="facts">
                  <dt>Booted slot</dt>
                  <dd data-testid="slot">{dev.booted_slot ?? "—"}</dd>
                  <dt>Running</dt>
                  <dd>{dev.current_version ?? "—"}</dd>
                  <dt>Digest</dt>
                  <dd className="mono" title={dev.current_digest ?? ""}>
                    {short(dev.current_digest)}
                  </dd>
                  <dt>Status</dt>
                  <dd>
                    <StatusBadge status={dev.status} /> {dev.status_version && `on ${dev.status_version}`}
                    {dev.status === "staged" && (
                      <div className="muted" data-testid="staged">
                        {dev.events.find((e) => e.kind === "staged")?.message ?? "written to the other slot, waiting to reboot into it"}
                      </div>
                    )}
                  </dd>
                  <dt>Channel head</dt>
                  <dd data-testid="head-status" data-reason={dev.head_status?.reason ?? ""}>
                    {dev.head_status ? (
                      <>
                        <span className={`badge ${dev.head_status.on_head ? "s-healthy" : "s-failed"}`}>
                          {dev.head_status.on_head ? "on the head" : "not on the head"}
                        </span>{" "}
                        {dev.head_status.message}
                      </>
                    ) : (
                      `channel ${dev.channel} does not exist`
                    )}
                  </dd>
                  <dt>Pin</dt>
                  <dd data-testid="pin">
                    {dev.pin ? (dev.pin.version ? `release ${dev.pin.version}` : `image ${dev.pin.image} (${short(dev.pin.digest)})`) : "none: follows its channel"}
                  </dd>
                </dl>
                {dev.host ? (
                  <>
                    <table className="host" data-testid="host">
                      <thead>
                        <tr>
                          <th></th>
                          <th>Slot</th>
                          <th>Version</th>
                          <th>Digest</th>
                          <th>Boot</th>
                        </tr>
                      </thead>
                      <tbody>
                        {(["booted", "staged", "rollback"] as const).map((role) => {
                          const s = dev.host?.[role];
                          return (
                            s && (
                              <tr key={role} data-testid={`host-${role}`}>
                                <th>{role}</th>
                                <td>{s.slot}</td>
                                <td>{s.version ?? "unknown"}</td>
                                <td className="mono" title={s.digest ?? ""}>
                                  {short(s.digest ?? null)}
                                </td>
                                <td>{BOOT[s.boot]}</td>
                              </tr>
                            )
                          );
                        })}
                      </tbody>
                    </table>
                    <p className="muted" data-testid="host-state">
                      Agent {dev.host.state}
                      {dev.host.reboot_pending && ", waiting for the reboot it asked for"}
                      {dev.host_at && ` (reported ${ago(dev.host_at)})`}
                    </p>
                  </>
                ) : (
                  <p className="muted">No slot report yet (agents before host status send none).</p>
                )}
                {isAdmin && <PinControls id={dev.id} pinned={!!dev.pin} done={d.reload} />}
              </section>
            </div>
            <section className="card">
              <h2>Events</h2>
              {dev.events.length === 0 ? (
                <p className="muted">No reports yet.</p>
              ) : (
                <ol className="timeline">
                  {dev.events.map((e) => (
                    <li key={e.id} className={`t-${e.kind}`}>
                      <span className="when" title={when(e.at)}>
                        {when(e.at)}
                      </span>
                      <StatusBadge status={e.kind} /> <b>{e.version}</b> <span className="mono muted">{short(e.digest)}</span>
                      {e.message && <div className="msg">{e.message}</div>}
                    </li>
                  ))}
                </ol>
              )}
            </section>
          </>
        )}
      </Show>
    </>
  );
}

/** An admin sets a device's labels, as rows of key and value; they replace what it had. */
function LabelControls({ id, machine, labels, done }: { id: string; machine: string; labels: Record<string, string>; done: () => void }) {
  const rows = useRows(() => Object.entries(labels).map(([key, value]) => ({ key, value })));
  return (
    <ActionButton
      label="Labels…"
      title={`Labels of ${machine}`}
      confirmLabel="Save"
      run={async () => {
        const body = Object.fromEntries(rows.rows.filter((r) => r.key.trim() || r.value.trim()).map((r) => [r.key.trim(), r.value.trim()]));
        const d = await unwrap(api.PUT("/v1/devices/{id}/labels", { params: { path: { id } }, body: { labels: body } }));
        const now = Object.entries(labelsOf(d.labels)).map(([k, v]) => `${k}=${v}`);
        return now.length ? `Labels of ${d.machine_id}: ${now.join(", ")}.` : `${d.machine_id} has no labels now.`;
      }}
      done={done}
    >
      <p className="muted">Rollout waves, maintenance windows and reboot-lease groups select devices by label. These replace the device's labels until it enrolls again.</p>
      {rows.rows.map((r, i) => (
        <fieldset className="rows label-row" key={i}>
          <label>
            Key
            <input name="label_key" value={r.key} onChange={(e) => rows.set(i, { key: e.target.value })} />
          </label>
          <label>
            Value
            <input name="label_value" value={r.value} onChange={(e) => rows.set(i, { value: e.target.value })} />
          </label>
          <button type="button" className="link" onClick={() => rows.remove(i)}>
            Remove
          </button>
        </fieldset>
      ))}
      <div className="buttons">
        <button type="button" onClick={() => rows.add({ key: "", value: "" })}>
          Add a label
        </button>
      </div>
    </ActionButton>
  );
}

function PinControls({ id, pinned, done }: { id: string; pinned: boolean; done: () => void }) {
  const [version, setVersion] = useState("");
  const [image, setImage] = useState("");
  return (
    <div className="buttons">
      <ActionButton
        label="Pin…"
        title="Pin this device"
        confirmLabel="Pin"
        run={async () => {
          const d = await unwrap(
            api.PUT("/v1/devices/{id}/pin", {
              params: { path: { id } },
              body: { version: version.trim() || undefined, image: image.trim() || undefined },
            }),
          );
          return `Pinned ${d.machine_id} to ${d.pin?.version ?? d.pin?.image}.`;
        }}
        done={done}
      >
        <p>A pin overrides the channel. Give a release version, or an image reference in the product's repository.</p>
        <label>
          Release version
          <input name="pin_version" value={version} onChange={(e) => setVersion(e.target.value)} />
        </label>
        <label>
          or image (repo:tag or repo@digest)
          <input name="pin_image" value={image} onChange={(e) => setImage(e.target.value)} />
        </label>
      </ActionButton>
      {pinned && (
        <ActionButton
          label="Unpin"
          title="Unpin this device?"
          confirmLabel="Unpin"
          run={async () => {
            const d = await unwrap(api.PUT("/v1/devices/{id}/pin", { params: { path: { id } }, body: {} }));
            return `Unpinned ${d.machine_id}: it follows ${d.channel} again.`;
          }}
          done={done}
        >
          <p>The device will follow its channel again.</p>
        </ActionButton>
      )}
    </div>
  );
}

function IdentityControls({ id, machine, revoked, done }: { id: string; machine: string; revoked: boolean; done: () => void }) {
  const [reason, setReason] = useState("");
  const navigate = useNavigate();
  return (
    <div className="buttons">
      {!revoked && (
        <ActionButton
          label="Revoke…"
          title={`Revoke ${machine}?`}
          confirmLabel="Revoke"
          danger
          run={async () => {
            const d = await unwrap(
              api.POST("/v1/devices/{id}/revoke", { params: { path: { id } }, body: { reason: reason.trim() || undefined } }),
            );
            return `Revoked ${d.machine_id}: its tokens are refused from now on.`;
          }}
          done={done}
        >
          <p>Every token of this device is refused at once, it gets no new one, and its machine id cannot enroll again until you reset or delete it.</p>
          <label>
            Reason
            <input name="revoke_reason" placeholder="stolen, decommissioned…" value={reason} onChange={(e) => setReason(e.target.value)} />
          </label>
        </ActionButton>
      )}
      <ActionButton
        label="Reset…"
        title={`Reset ${machine}?`}
        confirmLabel="Reset"
        run={async () => {
          const d = await unwrap(api.POST("/v1/devices/{id}/reset", { params: { path: { id } } }));
          return `Reset ${d.machine_id}: its next enrollment binds a new key.`;
        }}
        done={done}
      >
        <p>
          The device's key is forgotten{revoked ? " and the revocation lifted" : ""}; the tokens it holds stop working. The next enrollment of this machine id, with the product's secret and
          a new key, gets this device back (same id, pin and history). Do this when the machine is ready to enroll: until then anyone with the secret can claim it.
        </p>
      </ActionButton>
      <ActionButton
        label="Delete…"
        title={`Delete ${machine}?`}
        confirmLabel="Delete"
        danger
        run={async () => {
          await unwrap(api.DELETE("/v1/devices/{id}", { params: { path: { id } } }));
          return `Deleted ${machine} and its events.`;
        }}
        done={() => navigate("/devices")}
      >
        <p>The device and its events are deleted and its tokens refused. A machine that still has the enrollment secret can enroll again as a new device; to keep it out, revoke it instead.</p>
      </ActionButton>
    </div>
  );
}
