// The fleet at a glance: every product's channels with their rollout and
// devices by version and status, and the devices that went quiet.
import { Link } from "react-router";
import { api, unwrap, type Channel, type Product } from "../api/client";
import { VersionStatusChart } from "../charts";
import { ChannelStateBadge, HeadFacts, Show, Table, ago, gateText, pct, rampText, useApi } from "../ui";
import { DeviceCells } from "./Devices";

const QUIET_S = 3600;

export function Overview() {
  const fleet = useApi(async () => {
    const products = await unwrap(api.GET("/v1/products"));
    const channels = await Promise.all(
      products.map((p) => unwrap(api.GET("/v1/products/{product}/channels", { params: { path: { product: p.name } } }))),
    );
    return products.map((p, i) => ({ product: p, channels: channels[i] }));
  }, [], 5000);
  const quiet = useApi(
    () => unwrap(api.GET("/v1/devices", { params: { query: { not_seen_for_s: QUIET_S, limit: 20 } } })),
    [],
    15000,
  );
  return (
    <>
      <h1>Fleet</h1>
      <Show state={fleet}>
        {(rows) =>
          rows.length === 0 ? (
            <p className="muted">
              No products yet. Create one with <code>POST /v1/products</code>, or start the server with <code>scripts/run --demo</code>.
            </p>
          ) : (
            rows.map(({ product, channels }) => <ProductSection key={product.name} product={product} channels={channels} />)
          )
        }
      </Show>
      <section>
        <h2>Not seen for over an hour</h2>
        <Show state={quiet}>
          {(page) =>
            page.items.length === 0 ? (
              <p className="muted">Every device checked in within the last hour.</p>
            ) : (
              <Table
                className="quiet"
                head={["Device", "Product / channel", "Version", "Status", "Last seen"]}
                footer={page.next_cursor && <Link to={`/devices?not_seen_for_s=${QUIET_S}`}>All quiet devices →</Link>}
              >
                {page.items.map((d) => (
                  <tr key={d.id}>
                    <DeviceCells d={d} />
                    <td>{ago(d.last_seen)}</td>
                  </tr>
                ))}
              </Table>
            )
          }
        </Show>
      </section>
    </>
  );
}

function ProductSection({ product, channels }: { product: Product; channels: Channel[] }) {
  return (
    <section className="product">
      <h2>
        {product.name} <span className="muted small">{product.repository}</span>
      </h2>
      {channels.length === 0 && <p className="muted">No channels yet.</p>}
      <div className="cards">
        {channels.map((c) => {
          const total = c.devices.reduce((a, d) => a + d.count, 0);
          return (
            <article className="card channel-card" key={c.name} data-channel={c.name}>
              <header>
                <h3>
                  <Link to={`/products/${product.name}/channels/${c.name}`}>{c.name}</Link>
                </h3>
                <span data-testid="card-state">
                  <ChannelStateBadge c={c} />
                </span>
              </header>
              <dl className="facts">
                <HeadFacts c={c} />
                <dt>Rollout</dt>
                <dd data-testid="card-rollout">
                  {c.waves
                    ? c.waves.done
                      ? `${c.waves.waves.length} waves, all done`
                      : `wave ${c.waves.current + 1} of ${c.waves.waves.length} at ${pct(c.waves.current_percent)}`
                    : rampText(c.rollout)}
                </dd>
                <dt>Gate</dt>
                <dd data-testid="card-gate">
                  <span className={`badge ${gateText(c.gate).cls}`}>{gateText(c.gate).label}</span>
                </dd>
                <dt>Devices</dt>
                <dd className="device-total">{total}</dd>
                <dt>Not on head</dt>
                <dd data-testid="card-behind">
                  {c.head ? (
                    <Link to={`/products/${product.name}/channels/${c.name}`}>
                      {c.behind} of {total}
                    </Link>
                  ) : (
                    "no head yet"
                  )}
                </dd>
              </dl>
              <VersionStatusChart counts={c.devices} head={c.head} />
            </article>
          );
        })}
      </div>
    </section>
  );
}
