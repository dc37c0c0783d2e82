// The audit log: who changed what, when, before and after; filtered by actor,
// action and target, in pages.
import { useState, type FormEvent } from "react";
import { useSearchParams } from "react-router";
import { api, unwrap } from "../api/client";
import { MoreButton, Show, Table, ago, usePages, when } from "../ui";

const FILTERS = ["actor", "action", "target"] as const;

export function Audit() {
  const [params, setParams] = useSearchParams();
  const filter = Object.fromEntries(FILTERS.map((k) => [k, params.get(k) ?? ""])) as Record<(typeof FILTERS)[number], string>;
  const [draft, setDraft] = useState(filter);
  const query = { actor: filter.actor || undefined, action: filter.action || undefined, target: filter.target || undefined, limit: 50 };
  const pages = usePages((cursor) => unwrap(api.GET("/v1/audit", { params: { query: { ...query, cursor } } })), [params.toString()]);
  const apply = (e: FormEvent) => {
    e.preventDefault();
    pages.reset();
    setParams(Object.fromEntries(Object.entries(draft).filter(([, v]) => v !== "")));
  };
  return (
    <>
      <h1>Audit log</h1>
      <form className="filters card" onSubmit={apply} role="search">
        <label>
          Who
          <input name="actor" placeholder="user:admin" value={draft.actor} onChange={(e) => setDraft({ ...draft, actor: e.target.value })} />
        </label>
        <label>
          Action
          <input name="action" placeholder="channel.promote" value={draft.action} onChange={(e) => setDraft({ ...draft, action: e.target.value })} />
        </label>
        <label>
          Target
          <input name="target" placeholder="channel:acme-os/stable" value={draft.target} onChange={(e) => setDraft({ ...draft, target: e.target.value })} />
        </label>
        <div className="buttons">
          <button type="submit" className="primary">
            Filter
          </button>
        </div>
      </form>
      <Show state={pages.first}>
        {(p) => (
          <Table
            className="audit"
            head={["When", "Who", "What", "Target", "Change"]}
            footer={p.items.length === 0 && <p className="muted">Nothing matches.</p>}
          >
            {[...p.items, ...pages.more].map((a) => (
              <tr key={a.id}>
                <td title={when(a.at)}>{ago(a.at)}</td>
                <td>{a.actor}</td>
                <td>
                  <span className="badge">{a.action}</span>
                </td>
                <td className="mono">{a.target}</td>
                <td>
                  <details>
                    <summary>before / after</summary>
                    <div className="diff">
                      <pre>{a.before === undefined || a.before === null ? "—" : JSON.stringify(a.before, null, 2)}</pre>
                      <pre>{a.after === undefined || a.after === null ? "—" : JSON.stringify(a.after, null, 2)}</pre>
                    </div>
                  </details>
                </td>
              </tr>
            ))}
          </Table>
        )}
      </Show>
      <MoreButton pages={pages} label="Older entries…" />
    </>
  );
}
