// Releases of a product: the list, and one release with its platform digests,
// signatures, metadata and changelog; admins can mark one urgent, or revoke it.
import { Link, useParams, useSearchParams } from "react-router";
import { api, unwrap, type Release } from "../api/client";
import { useSession } from "../session";
import { ActionButton, MoreButton, Show, Table, ago, bytes, short, useApi, usePages, when } from "../ui";

export function Releases() {
  const [params, setParams] = useSearchParams();
  const products = useApi(() => unwrap(api.GET("/v1/products")), []);
  const product = params.get("product") ?? products.data?.[0]?.name;
  return (
    <>
      <h1>Releases</h1>
      <Show state={products}>
        {(ps) =>
          ps.length === 0 ? (
            <p className="muted">No products yet.</p>
          ) : (
            <>
              <div className="tabs" role="tablist">
                {ps.map((p) => (
                  <button
                    key={p.name}
                    role="tab"
                    aria-selected={p.name === product}
                    className={p.name === product ? "tab active" : "tab"}
                    onClick={() => setParams({ product: p.name })}
                  >
                    {p.name}
                  </button>
                ))}
              </div>
              {product && <ReleaseList key={product} product={product} />}
            </>
          )
        }
      </Show>
    </>
  );
}

/** Marks a release urgent, or gives its devices their maintenance windows back. */
function UrgentButton({ product, release, done }: { product: string; release: Release; done: () => void }) {
  const urgent = release.urgent;
  return (
    <ActionButton
      label={urgent ? "Not urgent…" : "Mark urgent…"}
      title={urgent ? `${release.version} is not urgent?` : `Mark ${release.version} urgent?`}
      confirmLabel={urgent ? "Not urgent" : "Mark urgent"}
      run={async () => {
        const r = await unwrap(
          api.POST("/v1/products/{product}/releases/{version}/urgent", {
            params: { path: { product, version: release.version } },
            body: { urgent: !urgent },
          }),
        );
        return r.urgent
          ? `${r.version} is urgent: devices reboot into it without waiting for their maintenance window.`
          : `${r.version} is not urgent: devices reboot into it in their maintenance windows.`;
      }}
      done={done}
    >
      <p>
        {urgent
          ? "Devices that staged it will wait for their maintenance windows again."
          : "Devices that stage it reboot into it at once, outside their maintenance windows (reboot leases and devices set to reboot manually still hold). For a security fix."}
      </p>
    </ActionButton>
  );
}

function ReleaseList({ product }: { product: string }) {
  const { isAdmin } = useSession();
  const pages = usePages(
    (cursor) => unwrap(api.GET("/v1/products/{product}/releases", { params: { path: { product }, query: { limit: 50, cursor } } })),
    [product],
  );
  return (
    <Show state={pages.first}>
      {(p) => (
        <>
          {p.items.length === 0 && <p className="muted">No releases yet: publish one with `sluice release publish`.</p>}
          <Table className="releases" head={["Version", "Platforms", "Size", "Signed", "Flags", "Published", ...(isAdmin ? [""] : [])]}>
            {[...p.items, ...pages.more].map((r) => (
              <tr key={r.version} className={r.state === "revoked" ? "revoked" : ""} data-version={r.version}>
                <td>
                  <Link to={`/releases/${product}/${encodeURIComponent(r.version)}`}>{r.version}</Link>
                </td>
                <td>{r.platforms.map((x) => x.architecture + (x.variant ? `/${x.variant}` : "")).join(", ")}</td>
                <td>{bytes(Math.max(0, ...r.platforms.map((x) => x.size)))}</td>
                <td>{r.platforms.every((x) => x.signed_by.length > 0) ? "✓ signed" : <span className="badge s-failed">unsigned</span>}</td>
                <td>
                  {r.urgent && <span className="badge s-failed">urgent</span>}
                  {r.floor && <span className="badge floor">floor</span>}
                  {r.state === "revoked" && <span className="badge s-failed">revoked</span>}
                </td>
                <td title={when(r.created_at)}>
                  {ago(r.created_at)} by {r.publisher}
                </td>
                {isAdmin && (
                  <td>
                    {r.state === "active" && (
                      <UrgentButton
                        product={product}
                        release={r}
                        done={() => {
                          pages.reset();
                          pages.first.reload();
                        }}
                      />
                    )}
                  </td>
                )}
              </tr>
            ))}
          </Table>
          <MoreButton pages={pages} label="Older releases…" />
        </>
      )}
    </Show>
  );
}

const KNOWN = ["git_commit", "build_url", "changelog", "base_image", "packages"];

export function ReleasePage() {
  const { product = "", version = "" } = useParams();
  const { isAdmin } = useSession();
  const r = useApi(() => unwrap(api.GET("/v1/products/{product}/releases/{version}", { params: { path: { product, version } } })), [
    product,
    version,
  ]);
  return (
    <>
      <p className="crumbs">
        <Link to={`/releases?product=${product}`}>Releases</Link> / {product}
      </p>
      <h1>
        {version} {r.data?.state === "revoked" && <span className="badge s-failed">revoked</span>}
        {r.data?.floor && <span className="badge floor">floor</span>}
        {r.data?.urgent && <span className="badge s-failed">urgent</span>}
      </h1>
      <Show state={r}>
        {(rel) => {
          const meta = (rel.metadata ?? {}) as Record<string, unknown>;
          const extra = Object.fromEntries(Object.entries(meta).filter(([k]) => !KNOWN.includes(k)));
          return (
            <>
              <div className="grid2">
                <section className="card">
                  <h2>Image</h2>
                  <dl className="facts">
                    <dt>Image</dt>
                    <dd className="mono wrap">{rel.image}</dd>
                    <dt>Digest</dt>
                    <dd className="mono wrap">{rel.digest}</dd>
                    <dt>Media type</dt>
                    <dd className="mono wrap">{rel.media_type}</dd>
                    <dt>Published</dt>
                    <dd>
                      {when(rel.created_at)} by {rel.publisher}
                    </dd>
                    <dt>Floor</dt>
                    <dd>{rel.floor ? "yes: devices below it step through it" : "no"}</dd>
                    <dt>Urgent</dt>
                    <dd data-testid="release-urgent">{rel.urgent ? "yes: devices reboot into it outside their maintenance windows" : "no"}</dd>
                    <dt>State</dt>
                    <dd data-testid="release-state">{rel.state}</dd>
                  </dl>
                  {isAdmin && rel.state === "active" && (
                    <div className="buttons">
                      <UrgentButton product={product} release={rel} done={r.reload} />
                      <ActionButton
                        label="Revoke…"
                        title={`Revoke ${rel.version}?`}
                        confirmLabel="Revoke"
                        danger
                        run={async () => {
                          const x = await unwrap(
                            api.POST("/v1/products/{product}/releases/{version}/revoke", { params: { path: { product, version } } }),
                          );
                          return `Revoked ${x.version}: no device will be sent to it again.`;
                        }}
                        done={r.reload}
                      >
                        <p>A revoked release is never a target again. This cannot be undone.</p>
                      </ActionButton>
                    </div>
                  )}
                </section>
                <section className="card">
                  <h2>Build</h2>
                  <dl className="facts">
                    <dt>Git commit</dt>
                    <dd className="mono">{String(meta.git_commit ?? "—")}</dd>
                    <dt>Build</dt>
                    <dd className="wrap">
                      {typeof meta.build_url === "string" && /^https?:\/\//.test(meta.build_url) ? (
                        <a href={meta.build_url} rel="noreferrer noopener" target="_blank">
                          {meta.build_url}
                        </a>
                      ) : (
                        String(meta.build_url ?? "—")
                      )}
                    </dd>
                    <dt>Base image</dt>
                    <dd className="mono wrap">{String(meta.base_image ?? "—")}</dd>
                    <dt>Packages</dt>
                    <dd className="wrap">
                      {Array.isArray(meta.packages)
                        ? meta.packages.map(String).join(", ")
                        : meta.packages
                          ? JSON.stringify(meta.packages)
                          : "—"}
                    </dd>
                  </dl>
                  <h3>Changelog</h3>
                  <pre className="changelog">{typeof meta.changelog === "string" ? meta.changelog : meta.changelog ? JSON.stringify(meta.changelog, null, 2) : "—"}</pre>
                  {Object.keys(extra).length > 0 && (
                    <>
                      <h3>Other metadata</h3>
                      <pre>{JSON.stringify(extra, null, 2)}</pre>
                    </>
                  )}
                </section>
              </div>
              <section className="card">
                <h2>Platforms</h2>
                <Table head={["Platform", "Digest", "Size", "Signed by"]}>
                  {rel.platforms.map((p) => (
                    <tr key={p.digest}>
                      <td>
                        {p.os}/{p.architecture}
                        {p.variant ? `/${p.variant}` : ""}
                      </td>
                      <td className="mono" title={p.digest}>
                        {short(p.digest)}
                      </td>
                      <td>{bytes(p.size)}</td>
                      <td className="mono">{p.signed_by.length ? p.signed_by.join(", ") : <span className="badge s-failed">unsigned</span>}</td>
                    </tr>
                  ))}
                </Table>
              </section>
            </>
          );
        }}
      </Show>
    </>
  );
}
