// Signing keys: the signed key list, each key's phase, how many devices hold
// it, and the two-phase rotation (rotate → activate), revocation.
import { useState } from "react";
import { api, unwrap, type Schemas } from "../api/client";
import { useSession } from "../session";
import { ActionButton, Show, Table, ago, useApi, when } from "../ui";

const ROLES = ["response", "image", "root"] as const;
type KeyRole = (typeof ROLES)[number];

const WHAT: Record<KeyRole, string> = {
  response: "signs every answer devices get",
  image: "signs releases (cosign)",
  root: "signs key lists",
};

export function Keys() {
  const { isAdmin } = useSession();
  const status = useApi(() => unwrap(api.GET("/v1/keys/status")), []);
  return (
    <>
      <h1>Signing keys</h1>
      <p className="muted">
        Devices trust the keys of the newest signed key list they hold. Rotate publishes a new key as <em>next</em>; activate
        signs with it once the fleet holds it.
      </p>
      <Show state={status}>
        {(s) => (
          <>
            <div className="cards">
              <div className="card">
                <h3>Key list</h3>
                <p data-testid="list-version">
                  version {s.version}, expires {when(s.expires_at)}
                </p>
                <p className="muted">made {ago(s.issued_at)}</p>
              </div>
              <div className="card">
                <h3>Devices holding it</h3>
                <p data-testid="holding-newest">
                  {s.holding_newest} of {s.active_devices}
                </p>
                <p className="muted">devices seen in the last 30 days</p>
              </div>
            </div>
            {ROLES.map((role) => (
              <RoleKeys key={role} role={role} status={s} isAdmin={isAdmin} reload={status.reload} />
            ))}
          </>
        )}
      </Show>
    </>
  );
}

/** One role's keys: their phases and holders, and (for admins) rotate, activate and revoke. */
function RoleKeys({ role, status: s, isAdmin, reload }: { role: KeyRole; status: Schemas["KeysOverview"]; isAdmin: boolean; reload: () => void }) {
  const [force, setForce] = useState(false);
  const [minPercent, setMinPercent] = useState("100");
  const keys = s.keys.filter((k) => k.role === role);
  const next = keys.find((k) => k.state === "next");
  return (
    <section data-role={role}>
      <h2>
        {role} <span className="muted">— {WHAT[role]}</span>
      </h2>
      {isAdmin && (
        <div className="buttons">
          {!next && (
            <ActionButton
              label={role === "root" ? "Rotate root…" : `Rotate ${role} key…`}
              title={`Rotate the ${role} key?`}
              confirmLabel="Rotate"
              run={async () => {
                const k = await unwrap(api.POST("/v1/keys/{role}/rotate", { params: { path: { role } } }));
                return role === "root"
                  ? `New root key ${k.key_id} signs key lists from now on (list version ${k.list_version}).`
                  : `Published ${role} key ${k.key_id} as next in key list version ${k.list_version}.`;
              }}
              done={reload}
            >
              {role === "root" ? (
                <p>A new root key takes over at once; the old one signs the list that replaces it.</p>
              ) : (
                <p>
                  A new key is published as <em>next</em>: devices learn it with their next poll. Nothing is
                  signed with it until you activate it.
                </p>
              )}
            </ActionButton>
          )}
          {next && role !== "root" && (
            <ActionButton
              label={`Activate ${next.key_id}…`}
              title={`Sign with ${role} key ${next.key_id}?`}
              confirmLabel="Activate"
              run={async () => {
                const k = await unwrap(
                  api.POST("/v1/keys/{role}/activate", {
                    params: { path: { role } },
                    body: { force, min_percent: Number(minPercent) },
                  }),
                );
                return `${role} key ${k.key_id} is current (key list version ${k.list_version}).`;
              }}
              done={reload}
            >
              <p>
                Devices that hold key {next.key_id}: {next.held_by} of {s.active_devices}.
              </p>
              <label>
                Share of devices that must hold it (%)
                <input
                  name="min_percent"
                  type="number"
                  min={0}
                  max={100}
                  value={minPercent}
                  onChange={(e) => setMinPercent(e.target.value)}
                />
              </label>
              <label className="check">
                <input name="force" type="checkbox" checked={force} onChange={(e) => setForce(e.target.checked)} />
                Activate anyway (agents older than key lists will refuse its signatures)
              </label>
            </ActionButton>
          )}
        </div>
      )}
      <Table className="keys" head={["Key", "Phase", "Listed since", "Devices that hold it", ""]}>
        {keys.map((k) => (
          <tr key={k.key_id} data-key={k.key_id} data-state={k.state}>
            <td>
              <code>{k.key_id}</code> <span className="muted">{k.algorithm}</span>
            </td>
            <td>
              <span className={`badge phase-${k.state}`}>{k.state}</span>
            </td>
            <td>version {k.listed_since}</td>
            <td data-testid="held-by">
              {k.held_by} of {s.active_devices}
            </td>
            <td>
              {isAdmin && k.state !== "current" && (
                <ActionButton
                  label="Revoke…"
                  title={`Revoke ${role} key ${k.key_id}?`}
                  confirmLabel="Revoke"
                  danger
                  run={async () => {
                    const r = await unwrap(
                      api.POST("/v1/keys/{role}/revoke", {
                        params: { path: { role } },
                        body: { key_id: k.key_id },
                      }),
                    );
                    return `Revoked ${role} key ${k.key_id}: devices refuse it from key list version ${r.list_version} on.`;
                  }}
                  done={reload}
                >
                  <p>
                    The next key list leaves it out: every device that fetches it refuses what this key
                    signs.{role === "image" ? " Releases signed only by it are first signed again with the current image key." : ""}
                  </p>
                </ActionButton>
              )}
            </td>
          </tr>
        ))}
      </Table>
    </section>
  );
}
