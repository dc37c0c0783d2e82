// API tokens for CI: create (the secret is shown once), list, revoke.
import { useState } from "react";
import { api, unwrap, type Role } from "../api/client";
import { useSession } from "../session";
import { ActionButton, Show, Table, ago, useApi, when } from "../ui";

export function Tokens() {
  const { isAdmin } = useSession();
  const tokens = useApi(() => unwrap(api.GET("/v1/tokens")), []);
  const [secret, setSecret] = useState<{ name: string; token: string }>();
  const [name, setName] = useState("");
  const [role, setRole] = useState<Role>("publisher");
  const [products, setProducts] = useState("");
  const [days, setDays] = useState("365");
  if (!isAdmin) return <p className="error">API tokens are managed by admins.</p>;
  return (
    <>
      <h1>API tokens</h1>
      <p className="muted">Tokens let CI publish and promote. A publisher token only reaches the products it names.</p>
      <div className="buttons">
        <ActionButton
          label="New token…"
          title="Create an API token"
          confirmLabel="Create"
          run={async () => {
            const t = await unwrap(
              api.POST("/v1/tokens", {
                body: {
                  name: name.trim(),
                  role,
                  products: products
                    .split(",")
                    .map((s) => s.trim())
                    .filter(Boolean),
                  expires_in_days: days.trim() ? Number(days) : undefined,
                },
              }),
            );
            setSecret({ name: name.trim(), token: t.token });
            setName("");
            return `Created token ${name.trim()}: copy its secret now, it is not shown again.`;
          }}
          done={tokens.reload}
        >
          <label>
            Name
            <input name="token_name" placeholder="github-actions acme-os" value={name} onChange={(e) => setName(e.target.value)} />
          </label>
          <label>
            Role
            <select name="role" value={role} onChange={(e) => setRole(e.target.value as Role)}>
              <option value="publisher">publisher (CI)</option>
              <option value="viewer">viewer</option>
              <option value="admin">admin</option>
            </select>
          </label>
          <label>
            Products (comma-separated)
            <input name="products" value={products} onChange={(e) => setProducts(e.target.value)} />
          </label>
          <label>
            Expires in days
            <input name="expires_in_days" type="number" value={days} onChange={(e) => setDays(e.target.value)} />
          </label>
        </ActionButton>
      </div>
      {secret && (
        <div className="card secret" role="alert">
          <h3>Secret of {secret.name}</h3>
          <p>Shown this once. Store it in your CI's secrets now.</p>
          <textarea readOnly rows={4} value={secret.token} data-testid="token-secret" onFocus={(e) => e.target.select()} />
          <div className="buttons">
            <button onClick={() => void navigator.clipboard?.writeText(secret.token)}>Copy</button>
            <button onClick={() => setSecret(undefined)}>I saved it</button>
          </div>
        </div>
      )}
      <Show state={tokens}>
        {(ts) => (
          <Table className="tokens" head={["Name", "Role", "Products", "Created", "Expires", "State", ""]}>
            {ts.length === 0 && (
              <tr>
                <td colSpan={7} className="muted">
                  No tokens yet.
                </td>
              </tr>
            )}
            {ts.map((t) => (
              <tr key={t.id} className={t.revoked_at ? "revoked" : ""} data-token={t.name}>
                <td>{t.name}</td>
                <td>{t.role}</td>
                <td>{t.products.join(", ") || "—"}</td>
                <td title={when(t.created_at)}>
                  {ago(t.created_at)} by {t.created_by}
                </td>
                <td>{when(t.expires_at)}</td>
                <td>{t.revoked_at ? <span className="badge s-failed">revoked {ago(t.revoked_at)}</span> : "active"}</td>
                <td>
                  {!t.revoked_at && (
                    <ActionButton
                      label="Revoke"
                      title={`Revoke token ${t.name}?`}
                      confirmLabel="Revoke"
                      danger
                      run={async () => {
                        await unwrap(api.DELETE("/v1/tokens/{id}", { params: { path: { id: t.id } } }));
                        return `Revoked token ${t.name}: it stops working at once.`;
                      }}
                      done={tokens.reload}
                    >
                      <p>Anything using it will be refused from now on.</p>
                    </ActionButton>
                  )}
                </td>
              </tr>
            ))}
          </Table>
        )}
      </Show>
    </>
  );
}
