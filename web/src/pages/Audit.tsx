// The audit log: who changed what, when, before and after; filtered by actor,
// action and target, in pages.
import { useState, type FormEvent } from "react";
import { useSearchParams } from "react-router";
import { api, unwrap, type AuditEntry } from "../api/client";
import { ErrorBox, Show, ago, message, useApi, when } from "../ui";

const FILTERS = ["actor", "action", "target"] as const;

export function Audit() {
  const [params, setParams] = useSearchParams();
  const filter = Object.fromEntries(FILTERS.map((k) => [k, params.get(k) ?? ""])) as Record<(typeof FILTERS)[number], string>;
  const [draft, setDraft] = useState(filter);
  const query = { actor: filter.actor || undefined, action: filter.action || undefined, target: filter.target || undefined, limit: 50 };
  const first = useApi(() => unwrap(api.GET("/v1/audit", { params: { query } })), [params.toString()]);
  const [more, setMore] = useState<AuditEntry[]>([]);
  const [cursor, setCursor] = useState<string | null>();
  const [error, setError] = useState<string>();
  const next = cursor === undefined ? first.data?.next_cursor : cursor;
  const apply = (e: FormEvent) => {
    e.preventDefault();
    setMore([]);
    setCursor(undefined);
    setParams(Object.fromEntries(Object.entries(draft).filter(([, v]) => v !== "")));
  };
  const loadMore = async () => {
    try {
      const p = await unwrap(api.GET("/v1/audit", { params: { query: { ...query, cursor: next ?? undefined } } }));
      setMore((m) => [...m, ...p.items]);
      setCursor(p.next_cursor ?? null);
    } catch (e) {
      setError(message(e));
    }
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
      <Show state={first}>
        {(p) => (
          <div className="table-wrap">
            <table className="audit">
              <thead>
                <tr>
                  <th>When</th>
                  <th>Who</th>
                  <th>What</th>
                  <th>Target</th>
                  <th>Change</th>
                </tr>
              </thead>
              <tbody>
                {[...p.items, ...more].map((a) => (
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
              </tbody>
            </table>
            {p.items.length === 0 && <p className="muted">Nothing matches.</p>}
          </div>
        )}
      </Show>
      <ErrorBox error={error} />
      {next && (
        <button className="link" onClick={() => void loadMore()}>
          Older entries…
        </button>
      )}
    </>
  );
}
