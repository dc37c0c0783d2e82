#!/usr/bin/env node
// Seeds a running Sluice server with a living demo (see lib/demo.mjs): a
// product, two channels, releases pushed to the registry and published, a CI
// token, and 48 simulated devices that keep polling and reporting, so the
// dashboard has something to show. Safe to run again: the images are
// reproducible, so publishing them again finds the existing releases.
//
//   node scripts/seed-demo.mjs --server http://127.0.0.1:8080 --password '<admin password>' \
//        --registry 127.0.0.1:5000 [--interval 15] [--once]
//
// Options fall back to SLUICE_SERVER, SLUICE_ADMIN_PASSWORD and REGISTRY.
// Without --once the devices poll every --interval seconds until SIGINT/SIGTERM.
// The 48 devices enroll from one address: start the server with
// SLUICE_ENROLL_BURST=100 (the default allows 20 at once per address).
import { parseArgs } from "node:util";
import { round, seed } from "./lib/demo.mjs";
import { Sluice } from "./lib/sluice.mjs";

const { values: opt } = parseArgs({
  options: {
    server: { type: "string", default: process.env.SLUICE_SERVER ?? "http://127.0.0.1:8080" },
    password: { type: "string", default: process.env.SLUICE_ADMIN_PASSWORD },
    registry: { type: "string", default: process.env.REGISTRY },
    product: { type: "string", default: "acme-os" },
    interval: { type: "string", default: "15" },
    once: { type: "boolean", default: false },
  },
});
if (!opt.password || !opt.registry) {
  console.error("usage: seed-demo.mjs --server URL --password ADMIN_PASSWORD --registry HOST:PORT [--interval S] [--once]");
  process.exit(2);
}
const log = (...a) => console.log("[demo]", ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  for (let i = 0; ; i++) {
    try {
      if ((await fetch(`${opt.server}/healthz`)).ok) break;
    } catch {
      /* not up yet */
    }
    if (i > 150) throw new Error(`${opt.server} does not answer /healthz`);
    await sleep(200);
  }
  const api = await Sluice.login(opt.server, "admin", opt.password);
  const fleet = await seed(api, opt.registry, opt.product);
  log(`seeded: open ${opt.server}/ and sign in as admin`);
  if (opt.once) return;
  // The devices keep no state worth saving: a signal ends them at once.
  for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
  log(`${fleet.length} devices poll every ${opt.interval} s; stop with Ctrl-C`);
  for (;;) {
    await sleep(Number(opt.interval) * 1000);
    await round(fleet).catch((e) => log("poll round failed:", e.message));
  }
}

main().catch((e) => {
  console.error("[demo] failed:", e.message);
  process.exit(1);
});
