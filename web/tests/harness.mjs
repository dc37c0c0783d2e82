// Starts what a browser test needs, all real: a `sluice serve` process on a
// free port with its own database in the given PostgreSQL cluster, the given
// registry as an insecure registry, and the built dashboard (web/dist); and
// Debian's Chromium driven by playwright-core.
//
// Environment:
//   SLUICE_BIN            the `sluice` binary (tests/run.sh builds it)
//   SLUICE_TEST_PG        a PostgreSQL URL; its database part is replaced by a
//                         fresh `dash_<random>` database, dropped afterwards
//                         (default: DATABASE_URL, else postgres://postgres@127.0.0.1:55432)
//   SLUICE_TEST_REGISTRY  host:port of a plain-HTTP OCI registry (default: REGISTRY, else 127.0.0.1:55000)
//   CHROMIUM              the browser (default /usr/bin/chromium)
import { execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const WEB = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const ADMIN_PASSWORD = "admin password for tests";
export const VIEWER_PASSWORD = "viewer password for tests";

export const REGISTRY = process.env.SLUICE_TEST_REGISTRY || process.env.REGISTRY || "127.0.0.1:55000";
const PG = process.env.SLUICE_TEST_PG || process.env.DATABASE_URL || "postgres://postgres@127.0.0.1:55432";
const BIN =
  process.env.SLUICE_BIN || join(process.env.CARGO_TARGET_DIR || resolve(WEB, "../target"), "debug", "sluice");

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

function dbUrl(name) {
  const u = new URL(PG);
  u.pathname = "/" + name;
  return u.toString();
}

function psql(sql) {
  execFileSync("psql", [dbUrl("postgres"), "-qtAc", sql], { stdio: ["ignore", "ignore", "pipe"] });
}

/** A running server; `stop()` ends it and drops its database. */
export async function startServer() {
  if (!existsSync(BIN)) throw new Error(`no sluice binary at ${BIN}: build it (cargo build -p sluice-server) or set SLUICE_BIN`);
  if (!existsSync(join(WEB, "dist", "index.html"))) throw new Error("web/dist is missing: run `npm run build` in web/ first");
  const db = `dash_${randomBytes(6).toString("hex")}`;
  psql(`CREATE DATABASE "${db}"`);
  const dir = mkdtempSync(join(tmpdir(), "sluice-web-test-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const env = {
    ...process.env,
    DATABASE_URL: dbUrl(db),
    SLUICE_LISTEN: `127.0.0.1:${port}`,
    SLUICE_DATA_DIR: join(dir, "data"),
    SLUICE_ADMIN_PASSWORD: ADMIN_PASSWORD,
    SLUICE_KEY_PASSPHRASE: "test passphrase",
    SLUICE_INSECURE_REGISTRIES: REGISTRY,
    SLUICE_WEB_DIR: join(WEB, "dist"),
    SLUICE_POLL_AFTER_S: "5",
    SLUICE_ENROLL_BURST: "1000",
    RUST_LOG: "warn",
  };
  const log = join(dir, "server.log");
  const child = spawn("sh", ["-c", `exec "$0" serve >>"$1" 2>&1`, BIN, log], { env, stdio: "ignore" });
  let exited = null;
  child.on("exit", (code) => (exited = code));
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (exited !== null) throw new Error(`sluice serve exited with ${exited}:\n${readFileSync(log, "utf8")}`);
    try {
      if ((await fetch(`${url}/healthz`)).ok) break;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > deadline) throw new Error(`sluice serve did not answer on ${url} within 30 s:\n${readFileSync(log, "utf8")}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  execFileSync(BIN, ["admin", "create", "--username", "viewer", "--role", "viewer"], {
    env: { ...env, SLUICE_NEW_PASSWORD: VIEWER_PASSWORD },
    stdio: ["ignore", "ignore", "pipe"],
  });
  return {
    url,
    log,
    async stop() {
      if (exited === null) {
        const done = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        await done;
      }
      try {
        psql(`DROP DATABASE IF EXISTS "${db}" WITH (FORCE)`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}

/** Headless Debian Chromium with the flags this machine's closed network needs. */
export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // playwright-core starts every launch with a fresh, empty user-data-dir.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** Polls `f` until it answers truthy; fails naming `what` after `ms`. */
export async function eventually(what, f, ms = 30_000) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await f();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) {
      throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}
