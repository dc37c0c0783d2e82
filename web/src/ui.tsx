// Small shared pieces: loading data (a page at a time, too), showing API
// errors, confirming actions, tables, and formatting times, sizes and digests.
import { createContext, useCallback, useContext, useEffect, useRef, useState, type FormEvent, type ReactNode } from "react";
import { ApiError } from "./api/client";

export function message(e: unknown): string {
  return e instanceof ApiError ? e.detail : e instanceof Error ? e.message : String(e);
}

export interface Loaded<T> {
  data: T | undefined;
  error: string | undefined;
  loading: boolean;
  reload: () => void;
}

/**
 * Loads data and keeps it fresh: reloads when `deps` change, on `reload()`, and
 * every `refreshMs` if given. Old data stays on screen while new data loads.
 */
export function useApi<T>(load: () => Promise<T>, deps: unknown[], refreshMs?: number): Loaded<T> {
  const [data, setData] = useState<T>();
  const [error, setError] = useState<string>();
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);
  const loadRef = useRef(load);
  loadRef.current = load;
  useEffect(() => {
    let live = true;
    setLoading(true);
    loadRef.current().then(
      (d) => {
        if (!live) return;
        setData(d);
        setError(undefined);
        setLoading(false);
      },
      (e) => {
        if (!live) return;
        setError(message(e));
        setLoading(false);
      },
    );
    return () => {
      live = false;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [...deps, tick]);
  useEffect(() => {
    if (!refreshMs) return;
    const t = setInterval(() => setTick((x) => x + 1), refreshMs);
    return () => clearInterval(t);
  }, [refreshMs]);
  const reload = useCallback(() => setTick((x) => x + 1), []);
  return { data, error, loading, reload };
}

/**
 * A listing loaded a page at a time: `first` is its first page (loaded as
 * [`useApi`] loads), `more` the items of the pages `loadMore` fetched after
 * it, `next` the cursor of the page after those (none at the end), `error`
 * the last `loadMore`'s failure; `reset` forgets the pages after the first.
 */
export function usePages<T>(load: (cursor?: string) => Promise<{ items: T[]; next_cursor?: string | null }>, deps: unknown[]) {
  const first = useApi(() => load(), deps);
  const [more, setMore] = useState<T[]>([]);
  const [cursor, setCursor] = useState<string | null>();
  const [error, setError] = useState<string>();
  const next = cursor === undefined ? first.data?.next_cursor : cursor;
  const loadMore = async () => {
    try {
      const p = await load(next ?? undefined);
      setMore((m) => [...m, ...p.items]);
      setCursor(p.next_cursor ?? null);
    } catch (e) {
      setError(message(e));
    }
  };
  const reset = () => {
    setMore([]);
    setCursor(undefined);
  };
  return { first, more, next, error, loadMore, reset };
}

/** Under a [`usePages`] listing: the error of the last page asked for, and a button for the next page while there is one. */
export function MoreButton({ pages, label }: { pages: { next?: string | null; error?: string; loadMore: () => Promise<void> }; label: string }) {
  return (
    <>
      <ErrorBox error={pages.error} />
      {pages.next && (
        <button className="link" onClick={() => void pages.loadMore()}>
          {label}
        </button>
      )}
    </>
  );
}

export function Spinner({ label = "Loading…" }: { label?: string }) {
  return (
    <div className="loading" role="status" aria-live="polite">
      <span className="spinner" aria-hidden="true" /> {label}
    </div>
  );
}

export function ErrorBox({ error }: { error: string | undefined }) {
  if (!error) return null;
  return (
    <div className="error" role="alert">
      {error}
    </div>
  );
}

/** Shows a load's error, a spinner the first time, or its content. */
export function Show<T>({ state, children }: { state: Loaded<T>; children: (d: T) => ReactNode }) {
  if (state.data === undefined) {
    return state.error ? <ErrorBox error={state.error} /> : <Spinner />;
  }
  return (
    <>
      <ErrorBox error={state.error} />
      {children(state.data)}
    </>
  );
}

// Results of actions, shown at the top of the page until dismissed or replaced.
interface Notice {
  id: number;
  text: string;
}
const NoticeContext = createContext<(text: string) => void>(() => {});

export function NoticeProvider({ children }: { children: ReactNode }) {
  const [notices, setNotices] = useState<Notice[]>([]);
  const push = useCallback((text: string) => {
    const id = Date.now() + Math.random();
    setNotices((n) => [...n.slice(-2), { id, text }]);
    setTimeout(() => setNotices((n) => n.filter((x) => x.id !== id)), 8000);
  }, []);
  return (
    <NoticeContext.Provider value={push}>
      <div className="notices" role="status" aria-live="polite">
        {notices.map((n) => (
          <div className="notice" key={n.id}>
            {n.text}
            <button className="link" aria-label="Dismiss" onClick={() => setNotices((x) => x.filter((y) => y.id !== n.id))}>
              ×
            </button>
          </div>
        ))}
      </div>
      {children}
    </NoticeContext.Provider>
  );
}

export const useNotice = () => useContext(NoticeContext);

/**
 * A button that opens a confirmation dialog; confirming runs `run`, whose
 * answer is shown as the result. A refusal shows the API's message in the
 * dialog and keeps it open.
 */
export function ActionButton(props: {
  label: string;
  title: string;
  confirmLabel?: string;
  danger?: boolean;
  disabled?: boolean;
  /** A wider dialog, for forms of rows. */
  wide?: boolean;
  children?: ReactNode;
  run: () => Promise<string>;
  done?: () => void;
}) {
  const [open, setOpen] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();
  const notice = useNotice();
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const d = ref.current;
    if (!d) return;
    if (open && !d.open) d.showModal();
    if (!open && d.open) d.close();
  }, [open]);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    setError(undefined);
    try {
      const result = await props.run();
      setOpen(false);
      notice(result);
      props.done?.();
    } catch (err) {
      setError(message(err));
    } finally {
      setBusy(false);
    }
  };
  return (
    <>
      <button className={props.danger ? "danger" : ""} disabled={props.disabled} onClick={() => setOpen(true)}>
        {props.label}
      </button>
      <dialog ref={ref} className={props.wide ? "wide" : undefined} onClose={() => setOpen(false)} aria-label={props.title}>
        {open && (
          <form onSubmit={submit} noValidate>
            <h3>{props.title}</h3>
            {props.children}
            <ErrorBox error={error} />
            <div className="buttons">
              <button type="button" onClick={() => setOpen(false)}>
                Cancel
              </button>
              <button type="submit" className={props.danger ? "danger" : "primary"} disabled={busy}>
                {busy ? "Working…" : (props.confirmLabel ?? "Confirm")}
              </button>
            </div>
          </form>
        )}
      </dialog>
    </>
  );
}

/** The rows of a form (windows, waves, labels): the list, and changing, adding and removing one. */
export function useRows<T>(initial: () => T[]) {
  const [rows, setRows] = useState<T[]>(initial);
  return {
    rows,
    set: (i: number, patch: Partial<T>) => setRows((r) => r.map((x, j) => (j === i ? { ...x, ...patch } : x))),
    add: (row: T) => setRows((r) => [...r, row]),
    remove: (i: number) => setRows((r) => r.filter((_, j) => j !== i)),
  };
}

export function ago(iso: string | null | undefined): string {
  if (!iso) return "—";
  const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function when(iso: string | null | undefined): string {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function bytes(n: number): string {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i ? v.toFixed(1) : v} ${u[i]}`;
}

export function short(digest: string | null | undefined): string {
  if (!digest) return "—";
  const [alg, hex] = digest.split(":");
  return hex ? `${alg}:${hex.slice(0, 12)}` : digest;
}

/**
 * A table in its scrolling frame: `head` names the columns ("" for one of
 * buttons), the children are its rows, `footer` follows it in the frame.
 */
export function Table(p: { className?: string; head: string[]; children: ReactNode; footer?: ReactNode }) {
  return (
    <div className="table-wrap">
      <table className={p.className}>
        <thead>
          <tr>
            {p.head.map((h) => (
              <th key={h}>{h}</th>
            ))}
          </tr>
        </thead>
        <tbody>{p.children}</tbody>
      </table>
      {p.footer}
    </div>
  );
}

export function StatusBadge({ status }: { status: string }) {
  return <span className={`badge s-${status}`}>{status.replace("_", " ")}</span>;
}

export function pct(n: number): string {
  return `${Number.isInteger(n) ? n : n.toFixed(1)}%`;
}

type ChannelT = import("./api/client").Channel;

/**
 * A channel's state in one word, the same on the fleet cards and the channel
 * page: after a rollback it says so rather than "rolling out".
 */
export function channelState(c: ChannelT): { label: string; cls: string } {
  if (!c.head) return { label: "no head yet", cls: "" };
  if (c.rollout.paused) return { label: "paused", cls: "s-failed" };
  if (c.rolled_back) return { label: "rolled back", cls: "s-rolled_back" };
  if (c.rollout.effective_percent >= 100) return { label: "released to all", cls: "s-healthy" };
  return { label: "rolling out", cls: "s-healthy" };
}

export function ChannelStateBadge({ c }: { c: ChannelT }) {
  const s = channelState(c);
  return s.cls ? <span className={`badge ${s.cls}`}>{s.label}</span> : <span className="muted">{s.label}</span>;
}

/**
 * Head and base as dt/dd pairs; after a rollback one line that reads as what
 * happened: "Rolled back to 1.2.0 (from 1.4.0)".
 */
export function HeadFacts({ c, link }: { c: ChannelT; link?: (version: string) => ReactNode }) {
  const v = (x: string | null | undefined) => (x ? (link ? link(x) : x) : "—");
  if (c.rolled_back && c.head) {
    return (
      <>
        <dt>Release</dt>
        <dd data-testid="head">
          Rolled back to {v(c.head)}
          {c.rolled_back_from && <> (from {v(c.rolled_back_from)})</>}
        </dd>
      </>
    );
  }
  return (
    <>
      <dt>Head</dt>
      <dd data-testid="head">{v(c.head)}</dd>
      <dt>Base</dt>
      <dd data-testid="base">{v(c.base)}</dd>
    </>
  );
}

/** Where the health gate stands, in words. */
export function gateText(g: ChannelT["gate"]): { label: string; cls: string } {
  if (g.tripped) return { label: `tripped: ${g.failures} of ${g.reports} failed`, cls: "s-failed" };
  if (g.reports < g.min_reports) return { label: `waiting: ${g.reports} of ${g.min_reports} reports, ${g.failures} failed`, cls: "" };
  return { label: `ok: ${g.failures} of ${g.reports} failed`, cls: "s-healthy" };
}

/** The percent in force and where a ramp takes it. */
export function rampText(r: ChannelT["rollout"]): string {
  return r.ramp
    ? `${pct(r.effective_percent)}, ramping to ${pct(r.ramp.to_percent)} over ${r.ramp.over_minutes} min`
    : `${pct(r.effective_percent)}, no ramp`;
}
