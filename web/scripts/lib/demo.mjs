// The demo fleet: a product, two channels, releases pushed to the registry and
// published, a CI token, and 48 simulated devices with a little history. Used
// by seed-demo.mjs (which keeps the devices polling) and the screenshots script.
import { pushImage } from "./registry.mjs";
import { SimDevice } from "./sluice.mjs";

const log = (...a) => console.log("[demo]", ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Answers null for a 409 (it exists already), so seeding can run again. */
async function ensure(promise) {
  try {
    return await promise;
  } catch (e) {
    if (e.status === 409) return null;
    throw e;
  }
}

/**
 * Seeds product `P` through `api` (an admin's client), pushing images to
 * `registry`. Answers the simulated fleet; call `round(fleet)` to make every
 * device poll once.
 */
export async function seed(api, registry, P = "acme-os") {
  const repoPath = `demo/${P}`;
  const repo = `${registry}/${repoPath}`;

  // Product and channels; the enrollment secret is shown once, so a second run rotates it.
  const created = await ensure(
    api.call("POST", "/v1/products", { name: P, repository: repo, description: "Acme's image-based OS for kiosks and gateways" }),
  );
  const secret = created
    ? created.enrollment_secret
    : (await api.call("POST", `/v1/products/${P}/enrollment-secret`)).enrollment_secret;
  await ensure(api.call("POST", `/v1/products/${P}/channels`, { name: "stable", description: "What the fleet runs" }));
  await ensure(api.call("POST", `/v1/products/${P}/channels`, { name: "beta", description: "Early adopters and the lab" }));
  const tokenName = `github-actions ${P}`;
  if (!(await api.call("GET", "/v1/tokens")).some((t) => t.name === tokenName && !t.revoked_at)) {
    await api.call("POST", "/v1/tokens", { name: tokenName, role: "publisher", products: [P] });
  }

  // Releases: reproducible images, some multi-arch, with build metadata.
  const releases = [
    { version: "1.0.0", arches: ["amd64"], changelog: "- First release for the kiosk fleet" },
    { version: "1.1.0", arches: ["amd64", "arm64"], floor: true, changelog: "- Adds arm64 gateways\n- New partition layout (mandatory step)" },
    { version: "1.2.0", arches: ["amd64", "arm64"], changelog: "- Linux 6.12\n- Faster boot (-3 s)\n- OpenSSL 3.0.15" },
    { version: "1.3.0-beta.1", arches: ["amd64", "arm64"], changelog: "- Wayland kiosk session\n- systemd 257" },
  ];
  for (const [i, r] of releases.entries()) {
    await pushImage(registry, repoPath, r.version, { arches: r.arches, reproducible: true, extraBytes: 8192 * (i + 1) });
    await api.call("POST", `/v1/products/${P}/releases`, {
      version: r.version,
      image: `${repo}:${r.version}`,
      floor: r.floor ?? false,
      metadata: {
        git_commit: (0x5a1ce + i * 7919).toString(16).padStart(7, "0"),
        build_url: `https://ci.example.com/acme-os/builds/${100 + i}`,
        base_image: "debian:12-slim",
        changelog: r.changelog,
        packages: ["linux-image", "systemd", "sluice-agent"],
      },
    });
    log("published", r.version);
  }

  // Devices: 36 on stable (kiosks and gateways at three sites), 12 on beta.
  const sites = ["lyon", "berlin", "austin"];
  const fleet = [];
  for (let i = 0; i < 36; i++) {
    const arch = i % 4 === 3 ? "arm64" : "amd64";
    fleet.push(
      new SimDevice(api, {
        product: P,
        secret,
        channel: "stable",
        machineId: `${arch === "arm64" ? "gw" : "kiosk"}-${String(i + 1).padStart(3, "0")}`,
        arch,
        labels: { site: sites[i % 3], role: arch === "arm64" ? "gateway" : "kiosk" },
      }),
    );
  }
  for (let i = 0; i < 12; i++) {
    fleet.push(
      new SimDevice(api, {
        product: P,
        secret,
        channel: "beta",
        machineId: `lab-${String(i + 1).padStart(2, "0")}`,
        arch: i % 3 ? "amd64" : "arm64",
        labels: { site: "lab", role: "test-bench" },
        // Two lab machines fail the beta's health checks and roll back.
        failOn: i === 3 || i === 7 ? ["1.3.0-beta.1"] : [],
      }),
    );
  }
  await Promise.all(fleet.map((d) => d.enroll()));
  log(`enrolled ${fleet.length} devices`);

  const ch = await api.call("GET", `/v1/products/${P}/channels/stable`);
  if (!ch.head) {
    // A past: everyone moves to 1.0.0, then through the 1.1.0 floor; then 1.2.0 starts at 20 %, ramping up.
    for (const v of ["1.0.0", "1.1.0"]) {
      await api.call("POST", `/v1/products/${P}/channels/stable/promote`, { version: v, percent: 100 });
      await round(fleet);
    }
    await api.call("POST", `/v1/products/${P}/channels/stable/promote`, {
      version: "1.2.0",
      percent: 20,
      ramp: { to_percent: 100, over_minutes: 45 },
    });
    await api.call("POST", `/v1/products/${P}/channels/beta/promote`, { version: "1.2.0", percent: 100 });
    await round(fleet);
    await api.call("POST", `/v1/products/${P}/channels/beta/promote`, { version: "1.3.0-beta.1", percent: 100 });
  }
  await round(fleet);
  return fleet;
}

/** Every device polls once, a little apart, and applies what it is offered. */
export async function round(fleet) {
  await Promise.all(
    fleet.map(async (d, i) => {
      await sleep((i * 37) % 1500);
      await d.step();
    }),
  );
}

