// The dashboard in headless Chromium against a real `sluice serve`, real
// PostgreSQL and a real registry. The steps build on each other, as an admin's
// day would: sign in, publish through the API, promote from the UI, watch
// simulated devices move, pause, roll back; then a viewer, who can change
// nothing. Run with `node --test tests/` (tests/run.sh sets everything up).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { pushImage } from "../scripts/lib/registry.mjs";
import { SimDevice, Sluice } from "../scripts/lib/sluice.mjs";
import { ADMIN_PASSWORD, REGISTRY, VIEWER_PASSWORD, eventually, launchBrowser, startServer } from "./harness.mjs";

const PRODUCT = "acme-os";
const FLEET = 20;

describe("dashboard", () => {
  let server, browser, page, api, secret;
  let images = {};
  let devices = [];
  const repoPath = `sluice-web-test/os-${randomBytes(5).toString("hex")}`;
  const repo = `${REGISTRY}/${repoPath}`;
  const channelUrl = () => `${server.url}/products/${PRODUCT}/channels/stable`;
  /** The number the adoption chart shows for devices on the head, and how many failed. */
  const chart = () =>
    page.$eval("figure[aria-label='Adoption of the head over time']", (f) => ({
      onHead: Number(f.dataset.onHead),
      devices: Number(f.dataset.devices),
      failed: Number(f.dataset.failed),
    }));
  /** Device counts per version in the version/status chart. */
  const versionCounts = () =>
    page.$$eval("figure[aria-label='Devices by version and status'] g[data-version]", (gs) =>
      Object.fromEntries(gs.map((g) => [g.dataset.version, Number(g.dataset.count)])),
    );
  /** Clicks `label`, then the dialog's confirm button `confirm`. */
  async function act(label, confirm, fill = async () => {}) {
    await page.getByRole("button", { name: label, exact: true }).click();
    const dialog = page.locator("dialog[open]");
    await dialog.waitFor();
    await fill(dialog);
    await dialog.getByRole("button", { name: confirm, exact: true }).click();
    return dialog;
  }
  const notice = (text) => page.locator(".notice", { hasText: text }).waitFor();
  /**
   * The size every chart label is drawn at on screen, in CSS px: its computed
   * font size times the SVG's scale (a viewBox shown narrower shrinks text),
   * and the HTML legends' computed size.
   */
  const chartLabelSizes = () =>
    page.$$eval("figure.chart text, figure.chart figcaption span", (els) =>
      els.map((el) => {
        const size = parseFloat(getComputedStyle(el).fontSize);
        const scale = el instanceof SVGGraphicsElement ? el.getScreenCTM().a : 1;
        return { text: el.textContent.trim(), px: Math.round(size * scale * 10) / 10 };
      }),
    );
  async function assertReadableCharts(where) {
    await page.locator("figure.chart text").first().waitFor();
    const sizes = await chartLabelSizes();
    assert.ok(sizes.length > 0, `no chart labels on ${where}`);
    const small = sizes.filter((s) => s.px < 12);
    assert.deepEqual(small, [], `chart labels under 12 px on ${where}`);
  }

  before(async () => {
    server = await startServer();
    browser = await launchBrowser();
    page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    api = await Sluice.login(server.url, "admin", ADMIN_PASSWORD);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  test("signing in lands on the page asked for", async () => {
    await page.goto(`${server.url}/devices`);
    await page.waitForURL(/\/login\?next=%2Fdevices/);
    await page.fill("input[name=username]", "admin");
    await page.fill("input[name=password]", "not the password");
    await page.click("button[type=submit]");
    await page.getByRole("alert").filter({ hasText: "wrong user name or password" }).waitFor();

    await page.fill("input[name=password]", ADMIN_PASSWORD);
    await page.click("button[type=submit]");
    await page.waitForURL(`${server.url}/devices`);
    await page.getByRole("heading", { name: "Devices" }).waitFor();
    assert.equal(await page.locator(".who .user").innerText(), "admin admin");
    // The token is in an HttpOnly cookie, out of reach of the page's scripts.
    assert.equal(await page.evaluate(() => document.cookie), "");
    const cookies = await page.context().cookies();
    assert.ok(cookies.some((c) => c.name === "sluice_token" && c.httpOnly && c.sameSite === "Strict"), JSON.stringify(cookies));
  });

  test("releases published through the API show with their digests and metadata", async () => {
    for (const v of ["1.0.0", "1.1.0"]) images[v] = await pushImage(REGISTRY, repoPath, v);
    const p = await api.call("POST", "/v1/products", { name: PRODUCT, repository: repo, description: "Acme's OS" });
    secret = p.enrollment_secret;
    await api.call("POST", `/v1/products/${PRODUCT}/channels`, { name: "stable" });
    await api.call("POST", `/v1/products/${PRODUCT}/channels`, { name: "beta" });
    await api.call("POST", `/v1/products/${PRODUCT}/releases`, {
      version: "1.0.0",
      image: `${repo}:1.0.0`,
      metadata: { git_commit: "0a1b2c3", changelog: "First release." },
      channels: [{ name: "stable", percent: 100 }],
    });
    await api.call("POST", `/v1/products/${PRODUCT}/releases`, {
      version: "1.1.0",
      image: `${repo}:1.1.0`,
      metadata: { git_commit: "4d5e6f7", changelog: "- faster boot\n- new kernel", build_url: "https://ci.example.com/builds/42" },
    });

    await page.getByRole("link", { name: "Releases" }).click();
    await page.getByRole("link", { name: "1.1.0" }).click();
    await page.getByRole("heading", { name: "1.1.0" }).waitFor();
    // The heading shows before the release has loaded: wait for its digest.
    await page.locator("main", { hasText: images["1.1.0"].digest }).waitFor();
    const body = await page.locator("main").innerText();
    assert.match(body, new RegExp(images["1.1.0"].digest));
    assert.match(body, /faster boot/);
    assert.match(body, /4d5e6f7/);
    assert.match(body, /linux\/amd64/);
    assert.equal(await page.getByTestId("release-state").innerText(), "active");
  });

  test("an admin promotes a release from the channel page", async () => {
    await page.goto(channelUrl());
    await page.getByTestId("head").filter({ hasText: "1.0.0" }).waitFor();
    for (let i = 0; i < FLEET; i++) {
      const d = new SimDevice(api, {
        product: PRODUCT,
        secret,
        channel: "stable",
        machineId: `dev-${String(i).padStart(2, "0")}`,
        labels: { site: i % 2 ? "berlin" : "lyon" },
        version: "1.0.0",
        digest: images["1.0.0"].digest,
      });
      await d.enroll();
      await d.report("healthy", "1.0.0", d.digest);
      devices.push(d);
    }

    await act("Promote…", "Promote", async (dialog) => {
      // A promote starts small unless told otherwise, and offers a ramp.
      assert.equal(await dialog.locator("input[name=percent]").inputValue(), "10");
      assert.equal(await dialog.locator("input[name=ramp_to]").count(), 1);
      assert.equal(await dialog.locator("input[name=ramp_minutes]").count(), 1);
      await dialog.locator("select[name=version]").selectOption("1.1.0");
      await dialog.locator("input[name=percent]").fill("50");
      // Before confirming, the server's dry run says what the promote will do.
      await dialog
        .getByTestId("promote-plan")
        .filter({ hasText: "1.1.0 becomes the head at 50 %; 1.0.0, fully rolled out, becomes the base: devices outside that share get 1.0.0." })
        .waitFor();
    });
    await notice("Promoted 1.1.0 in stable: 1.1.0 becomes the head at 50 %; 1.0.0, fully rolled out, becomes the base");
    assert.equal(await page.getByTestId("promote-warnings").count(), 0, "nothing stranded: no warning");
    await page.getByTestId("head").filter({ hasText: "1.1.0" }).waitFor();
    assert.equal(await page.getByTestId("base").innerText(), "1.0.0");
    assert.equal(await page.getByTestId("percent").innerText(), "50%");
    await page.locator("table.history td", { hasText: "promote" }).first().waitFor();
    // The history names who did it.
    assert.equal(await page.locator("table.history [data-testid=actor]").first().innerText(), "admin");

    const ch = await api.call("GET", `/v1/products/${PRODUCT}/channels/stable`);
    assert.equal(ch.head, "1.1.0");
    assert.equal(ch.rollout.percent, 50);
    // What a device on the base downloads: gzip layers come whole.
    const t = await api.call("GET", `/v1/products/${PRODUCT}/channels/stable/transfer`);
    assert.equal(t.platforms[0].expected_bytes, t.platforms[0].head_bytes);
    const line = page.getByTestId("transfer").filter({ hasText: "every layer whole" });
    await line.waitFor();
    assert.match(await line.innerText(), /^linux\/amd64: [\d.]+ (B|KiB|MiB) of [\d.]+ (B|KiB|MiB) — no zstd:chunked layers/);
  });

  test("a promote that strands devices says so, and a ramp is set from the form", async () => {
    // One arm64 device on beta: 1.1.0 has only an amd64 image.
    const arm = new SimDevice(api, {
      product: PRODUCT,
      secret,
      channel: "beta",
      machineId: "arm-board",
      arch: "arm64",
      version: "1.0.0",
      digest: images["1.0.0"].digest,
    });
    await arm.enroll();
    await page.goto(`${server.url}/products/${PRODUCT}/channels/beta`);
    await page.getByTestId("head").filter({ hasText: "—" }).waitFor();
    await act("Promote…", "Promote", async (dialog) => {
      await dialog.locator("select[name=version]").selectOption("1.1.0");
      await dialog.locator("input[name=ramp_to]").fill("60");
      await dialog.locator("input[name=ramp_minutes]").fill("120");
    });
    await notice(
      "Promoted 1.1.0 in beta: 1.1.0 becomes the channel's first head at 10 %, ramping to 60 % over 120 min; devices outside that share keep what they run. With 1 warning.",
    );
    const warning = page.getByTestId("promote-warnings");
    await warning.waitFor();
    assert.match(
      await warning.innerText(),
      /no image for arm64 in 1\.1\.0: 1 device of product acme-os on channel beta runs arm64 and will stay where they are/,
    );
    const beta = await api.call("GET", `/v1/products/${PRODUCT}/channels/beta`);
    assert.deepEqual([beta.rollout.percent, beta.rollout.ramp.to_percent, beta.rollout.ramp.over_minutes], [10, 60, 120]);

    // The device page says why the device stays, in the words the server chose.
    await page.goto(`${server.url}/devices/${arm.id}`);
    const status = page.getByTestId("head-status");
    await status.filter({ hasText: "not on the head" }).waitFor();
    assert.equal(await status.getAttribute("data-reason"), "no_platform");
    assert.match(await status.innerText(), /1\.1\.0 has no image for arm64: the device stays on 1\.0\.0/);

    // The fleet card shows where the ramp goes and that the device lags.
    await page.getByRole("navigation").getByRole("link", { name: "Fleet" }).click();
    const betaCard = page.locator("article[data-channel=beta]");
    await betaCard.waitFor();
    assert.match(await betaCard.getByTestId("card-rollout").innerText(), /^10(\.\d)?%, ramping to 60% over 120 min$/);
    assert.equal(await betaCard.getByTestId("card-behind").innerText(), "1 of 1");
    // The rest of the day counts a fleet of 20.
    await api.call("DELETE", `/v1/devices/${arm.id}`);
    await page.goto(channelUrl());
  });

  test("device counts and the adoption chart follow the devices' reports", async () => {
    await eventually("the chart to show 20 devices, none on 1.1.0", async () => {
      const c = await chart();
      return c.devices === FLEET && c.onHead === 0;
    });
    assert.deepEqual(await versionCounts(), { "1.0.0": FLEET });

    // Every device polls once; those in the 50 % cohort update.
    let updated = 0;
    for (const d of devices) if ((await d.step()).update) updated++;
    assert.ok(updated > 0 && updated < FLEET, `${updated} of ${FLEET} devices were admitted at 50 %`);

    // The page refreshes itself: no reload.
    await eventually(`the chart to show ${updated} devices on 1.1.0`, async () => (await chart()).onHead === updated);
    await eventually("the version counts", async () => {
      const v = await versionCounts();
      return v["1.1.0"] === updated && v["1.0.0"] === FLEET - updated;
    });
    assert.match(await page.locator(".adoption-now").innerText(), new RegExp(`Now: ${updated} of ${FLEET} devices on 1.1.0, 0 failed`));
    // The others polled and were not admitted: the channel page says so, counted.
    await eventually(`${updated} on the head, ${FLEET - updated} outside the cohort`, async () => {
      const box = page.getByTestId("not-on-head");
      const rows = await box.locator("tr[data-reason]").evaluateAll((trs) => trs.map((tr) => [tr.dataset.reason, tr.dataset.count]));
      return (
        (await box.innerText()).startsWith(`${updated} of ${FLEET} devices run 1.1.0`) &&
        JSON.stringify(rows) === JSON.stringify([["outside_cohort", String(FLEET - updated)]])
      );
    });
    await assertReadableCharts("the channel page");

    // A device on the old version is told to update once the percent allows,
    // and fails: the chart counts the failure, the gate its report.
    await act("Change percent…", "Apply", async (dialog) => {
      await dialog.locator("input[name=percent]").fill("100");
    });
    await notice("Rollout of 1.1.0 in stable is now 100%");
    const laggard = devices.find((d) => d.version === "1.0.0");
    laggard.fail = true;
    assert.equal((await laggard.step()).update, true);
    await eventually("one failure in the chart", async () => (await chart()).failed === 1);
    await eventually("the gate to count the failure", async () =>
      /1 of \d+ failed/.test(await page.getByTestId("gate").innerText()),
    );

    // The fleet overview shows the same counts.
    await page.getByRole("navigation").getByRole("link", { name: "Fleet" }).click();
    const card = page.locator("article[data-channel=stable]");
    await card.waitFor();
    assert.equal(await card.locator(".device-total").innerText(), String(FLEET));
    assert.equal(
      await card.locator("g[data-version='1.1.0']").getAttribute("data-count"),
      String(updated),
    );
    // The card shows the ramp, the gate and how many devices lag the head,
    // as the API has them.
    const ch = await api.call("GET", `/v1/products/${PRODUCT}/channels/stable`);
    assert.equal(ch.behind, FLEET - updated, "the laggard failed and stayed on 1.0.0");
    assert.equal(await card.getByTestId("card-behind").innerText(), `${FLEET - updated} of ${FLEET}`);
    assert.equal(await card.getByTestId("card-rollout").innerText(), "100%, no ramp");
    const g = ch.gate;
    const gate = await card.getByTestId("card-gate").innerText();
    assert.equal(
      gate,
      g.reports < g.min_reports ? `waiting: ${g.reports} of ${g.min_reports} reports, 1 failed` : `ok: 1 of ${g.reports} failed`,
    );
    assert.equal((await card.getByTestId("card-state").innerText()).trim(), "released to all");
    // Bar labels are readable on the narrow cards, on a laptop and on a phone.
    await assertReadableCharts("the fleet page");
    await page.setViewportSize({ width: 390, height: 844 });
    await assertReadableCharts("the fleet page on a phone");
    await page.setViewportSize({ width: 1280, height: 900 });
  });

  test("a refused action shows the API's message", async () => {
    await page.goto(channelUrl());
    const dialog = await act("Change percent…", "Apply", async (d) => {
      await d.locator("input[name=percent]").fill("150");
    });
    await dialog.getByRole("alert").filter({ hasText: "percent 150 is out of range: use 0 to 100" }).waitFor();
    await dialog.getByRole("button", { name: "Cancel" }).click();
    assert.equal(await page.getByTestId("percent").innerText(), "100%");
  });

  test("an admin pauses, then rolls back, and devices are sent back down", async () => {
    await act("Pause", "Pause");
    await notice("Paused the rollout of 1.1.0 in stable");
    await page.getByTestId("state").filter({ hasText: "paused" }).waitFor();
    assert.equal(await page.getByRole("button", { name: "Resume" }).count(), 1);
    assert.equal((await api.call("GET", `/v1/products/${PRODUCT}/channels/stable`)).rollout.paused, true);

    await act("Roll back…", "Roll back");
    await notice("Rolled back stable to 1.0.0 at 100%");
    // It reads as what happened, and the state is no longer "rolling out".
    await page.getByTestId("head").filter({ hasText: "Rolled back to 1.0.0 (from 1.1.0)" }).waitFor();
    assert.equal(await page.getByTestId("base").count(), 0);
    assert.equal((await page.getByTestId("state").innerText()).trim(), "rolled back");
    await page.locator("table.history td", { hasText: "rollback" }).first().waitFor();

    // Devices on 1.1.0 are told to downgrade; once they report, the chart
    // counts the whole fleet on the (new) head.
    const onNew = devices.filter((d) => d.version === "1.1.0");
    for (const d of onNew) {
      const r = await d.step();
      assert.equal(r.update, true);
      assert.equal(r.downgrade, true);
      assert.equal(r.release.version, "1.0.0");
    }
    await eventually("every device back on 1.0.0", async () => (await chart()).onHead === FLEET);
    assert.deepEqual(await versionCounts(), { "1.0.0": FLEET });

    // The fleet card agrees with the channel page.
    await page.getByRole("navigation").getByRole("link", { name: "Fleet" }).click();
    const card = page.locator("article[data-channel=stable]");
    await card.getByTestId("head").filter({ hasText: "Rolled back to 1.0.0 (from 1.1.0)" }).waitFor();
    assert.equal((await card.getByTestId("card-state").innerText()).trim(), "rolled back");
    assert.equal(await card.getByTestId("card-behind").innerText(), `0 of ${FLEET}`);
    await page.goto(channelUrl());
  });

  test("a device's page shows its timeline and can be pinned", async () => {
    const d = devices[1];
    await page.goto(`${server.url}/devices?label=site%3Dberlin`);
    await page.locator("table.devices tbody tr").first().waitFor();
    const rows = await page.locator("table.devices tbody tr").count();
    assert.equal(rows, FLEET / 2, "the label filter keeps the berlin half");

    await page.goto(`${server.url}/devices/${d.id}`);
    await page.getByRole("heading", { name: d.machineId }).waitFor();
    assert.ok((await page.locator("ol.timeline li").count()) >= 1);
    // The host status the device sent with its last report: the slot it
    // booted, what runs there and how GRUB treats it.
    const booted = await page.getByTestId("host-booted").innerText();
    assert.match(booted, new RegExp(`${d.slot}\\s+${d.version.replaceAll(".", "\\.")}\\s+sha256:[0-9a-f]{12}\\s+known good`));
    assert.match(await page.getByTestId("host-state").innerText(), /Agent idle/);
    const status = page.getByTestId("head-status");
    assert.equal(await status.getAttribute("data-reason"), "on_head");
    assert.match(await status.innerText(), /on the head Runs the head, 1\.0\.0 \(the channel was rolled back to it\)/);
    await act("Pin…", "Pin", async (dialog) => {
      await dialog.locator("input[name=pin_version]").fill("1.1.0");
    });
    await notice(`Pinned ${d.machineId} to 1.1.0`);
    await page.getByTestId("pin").filter({ hasText: "release 1.1.0" }).waitFor();
    await status.filter({ hasText: "is pinned to 1.1.0 and will move there" }).waitFor();
    assert.equal(await status.getAttribute("data-reason"), "pinned");
    await act("Unpin", "Unpin");
    await page.getByTestId("pin").filter({ hasText: "none" }).waitFor();
  });

  test("an admin revokes a device, which is refused at once; a reset lets it enroll again; delete removes one", async () => {
    const d = devices[2];
    assert.equal((await d.resolve()).device_id, d.id);
    await page.goto(`${server.url}/devices/${d.id}`);
    await page.getByRole("heading", { name: d.machineId }).waitFor();
    await page.getByTestId("key").filter({ hasText: /^[0-9a-f]{16}$/ }).waitFor();
    await act("Revoke…", "Revoke", async (dialog) => {
      await dialog.locator("input[name=revoke_reason]").fill("lost in transit");
    });
    await notice(`Revoked ${d.machineId}`);
    await page.getByTestId("revoked").waitFor();
    assert.match(await page.getByTestId("access").innerText(), /revoked .*: lost in transit/);
    assert.equal(await page.getByRole("button", { name: "Revoke…" }).count(), 0);
    const refused = await d.sluice.raw("GET", `/v1/products/${PRODUCT}/channels/stable/resolve?nonce=abcdefgh12`, undefined, { token: d.token });
    assert.equal(refused.status, 401, JSON.stringify(refused.body));
    await page.goto(`${server.url}/devices?q=${d.machineId}`);
    await page.locator("table.devices tbody tr .badge", { hasText: "revoked" }).waitFor();

    await page.goto(`${server.url}/devices/${d.id}`);
    await act("Reset…", "Reset");
    await notice(`Reset ${d.machineId}`);
    await page.getByTestId("key").filter({ hasText: "waiting for the machine to enroll again" }).waitFor();
    assert.equal(await page.getByTestId("revoked").count(), 0);
    // The machine enrolls again with a new key and gets its device back.
    d.key = (await import("node:crypto")).generateKeyPairSync("ed25519");
    const id = d.id;
    await d.enroll();
    assert.equal(d.id, id);
    assert.equal((await d.resolve()).device_id, id);

    const spare = new SimDevice(api, { product: PRODUCT, secret, channel: "beta", machineId: "spare" });
    await spare.enroll();
    await page.goto(`${server.url}/devices/${spare.id}`);
    await page.getByRole("heading", { name: "spare" }).waitFor();
    await act("Delete…", "Delete");
    await page.waitForURL(`${server.url}/devices`);
    await notice("Deleted spare");
    assert.equal((await api.raw("GET", `/v1/devices/${spare.id}`)).status, 404);
  });

  test("an API token's secret is shown once, and it can be revoked", async () => {
    await page.getByRole("link", { name: "API tokens" }).click();
    await act("New token…", "Create", async (dialog) => {
      await dialog.locator("input[name=token_name]").fill("ci acme");
      await dialog.locator("input[name=products]").fill(PRODUCT);
    });
    const secretText = await page.getByTestId("token-secret").inputValue();
    // The secret works for publishing scope checks: it reads as a publisher.
    const ci = new Sluice(server.url, secretText);
    const refused = await ci.raw("PATCH", `/v1/products/${PRODUCT}/channels/stable/rollout`, { percent: 10 });
    assert.equal(refused.status, 403, JSON.stringify(refused.body));
    const row = page.locator("tr[data-token='ci acme']");
    await row.waitFor();
    await row.getByRole("button", { name: "Revoke" }).click();
    await page.locator("dialog[open]").getByRole("button", { name: "Revoke" }).click();
    await row.locator(".badge", { hasText: "revoked" }).waitFor();
    const after = await ci.raw("GET", `/v1/products/${PRODUCT}/releases`);
    assert.equal(after.status, 401);
  });

  test("the channel history names an API token, not its id", async () => {
    const t = await api.call("POST", "/v1/tokens", { name: "release-bot", role: "publisher", products: [PRODUCT] });
    const bot = new Sluice(server.url, t.token);
    await bot.call("POST", `/v1/products/${PRODUCT}/channels/beta/promote`, { version: "1.1.0", percent: 20 });
    await page.goto(`${server.url}/products/${PRODUCT}/channels/beta`);
    const cell = page.locator("table.history [data-testid=actor]").first();
    await cell.filter({ hasText: "release-bot" }).waitFor();
    assert.match(await cell.getAttribute("title"), /^token:[0-9a-f-]{36}$/);
    assert.doesNotMatch(await page.locator("table.history").innerText(), /token:/);
  });

  test("the keys page rotates a key in two phases, gated on the devices that hold it", async () => {
    await page.getByRole("navigation").getByRole("link", { name: "Keys" }).click();
    const section = page.locator("section[data-role=response]");
    await section.locator("tr[data-state=current]").waitFor();
    const oldKey = await section.locator("tr[data-state=current]").getAttribute("data-key");
    await act("Rotate response key…", "Rotate");
    await notice("as next in key list version");
    const next = section.locator("tr[data-state=next]");
    await next.waitFor();
    const newKey = await next.getAttribute("data-key");

    // Half the fleet polls twice (learns the list, then says it holds it).
    const half = devices.slice(0, FLEET / 2);
    for (const d of half) {
      await d.resolve();
      await d.resolve();
    }
    // Check-ins are written behind: reload until they show.
    await eventually(`the new key held by ${FLEET / 2} of ${FLEET}`, async () => {
      await page.reload();
      await next.waitFor();
      return (await next.getByTestId("held-by").innerText()) === `${FLEET / 2} of ${FLEET}`;
    });

    // Activation waits for the fleet, and says how far it is.
    const dialog = await act(`Activate ${newKey}…`, "Activate");
    await dialog.getByRole("alert").filter({ hasText: `devices that hold response key ${newKey}: ${FLEET / 2} of ${FLEET}` }).waitFor();
    await dialog.locator("input[name=force]").check();
    await dialog.getByRole("button", { name: "Activate", exact: true }).click();
    await notice(`response key ${newKey} is current`);
    await section.locator(`tr[data-key='${newKey}'][data-state=current]`).waitFor();
    const retired = section.locator(`tr[data-key='${oldKey}'][data-state=retired]`);
    await retired.waitFor();
    // Answers are now signed with the new key.
    const r = await api.raw("GET", "/v1/keys");
    assert.ok(JSON.stringify(r.body).includes(newKey));

    await retired.getByRole("button", { name: "Revoke…" }).click();
    await page.locator("dialog[open]").getByRole("button", { name: "Revoke", exact: true }).click();
    await notice(`Revoked response key ${oldKey}`);
    await section.locator(`tr[data-key='${oldKey}']`).waitFor({ state: "detached" });
    assert.ok(!JSON.stringify((await api.raw("GET", "/v1/keys")).body).includes(oldKey));
  });

  test("the audit log shows the UI's changes, filtered", async () => {
    await page.getByRole("link", { name: "Audit log" }).click();
    await page.fill("input[name=action]", "channel.rollback");
    await page.getByRole("button", { name: "Filter" }).click();
    await page.waitForURL(/action=channel.rollback/);
    await eventually("one rollback entry", async () => {
      const rows = await page.locator("table.audit tbody tr").allInnerTexts();
      return rows.length === 1 && /user:admin/.test(rows[0]) && /channel:acme-os\/stable/.test(rows[0]);
    });
  });

  /** FleetLock `pre-reboot` as the agent sends it: answers the status. */
  async function preReboot(d, group) {
    const r = await fetch(`${server.url}/v1/pre-reboot`, {
      method: "POST",
      headers: { authorization: `Bearer ${d.token}`, "fleet-lock-protocol": "true", "content-type": "application/json" },
      body: JSON.stringify({ client_params: { group, id: d.id } }),
    });
    await r.text();
    return r.status;
  }

  test("an admin sets the reboot policy from the form, and frees a stuck reboot lease", async () => {
    await page.goto(channelUrl());
    const reboots = page.getByTestId("reboots");
    await reboots.getByTestId("windows").filter({ hasText: "none: devices reboot once they staged" }).waitFor();
    assert.equal(await reboots.getByTestId("lease").innerText(), "none: any number of devices reboot at once");
    await reboots.getByTestId("no-holders").waitFor();

    // A misspelt zone: the server's message, in the dialog, which stays open.
    const dialog = await act("Reboot policy…", "Save", async (d) => {
      await d.getByRole("button", { name: "Add a window" }).click();
      const w = d.locator("fieldset.window").nth(0);
      await w.locator("input[name=days]").fill("Sat");
      await w.locator("input[name=start]").fill("02:00");
      await w.locator("input[name=end]").fill("04:00");
      await w.locator("input[name=time_zone]").fill("Europe/Berln");
      await d.locator("input[name=max_devices]").fill("1");
      await d.locator("input[name=per_label]").fill("site");
    });
    await dialog
      .getByRole("alert")
      .filter({ hasText: 'unknown time zone "Europe/Berln": use an IANA name such as Europe/Berlin, America/New_York or UTC' })
      .waitFor();
    await dialog.locator("fieldset.window input[name=time_zone]").fill("Europe/Berlin");
    await dialog.getByRole("button", { name: "Add a window" }).click();
    const w2 = dialog.locator("fieldset.window").nth(1);
    await w2.locator("input[name=days]").fill("Mon-Fri");
    await w2.locator("input[name=start]").fill("22:00");
    await w2.locator("input[name=end]").fill("02:00");
    await w2.locator("input[name=time_zone]").fill("UTC");
    await w2.locator("input[name=selector]").fill("site=lyon");
    await dialog.getByRole("button", { name: "Save", exact: true }).click();
    await notice("Devices of stable reboot in Sat 02:00–04:00 Europe/Berlin; Mon-Fri 22:00–02:00 UTC");

    // The windows in words, each with the devices it applies to; the lease policy.
    await reboots.getByTestId("window").nth(1).waitFor();
    assert.deepEqual(await reboots.getByTestId("window").allInnerTexts(), [
      "Sat 02:00–04:00 Europe/Berlin for every device",
      "Mon-Fri 22:00–02:00 UTC for site=lyon",
    ]);
    assert.equal(await reboots.getByTestId("lease").innerText(), "at most 1 device at once, per site; a lease expires after 30 min");
    const ch = await api.call("GET", `/v1/products/${PRODUCT}/channels/stable`);
    assert.deepEqual(ch.reboot_policy.windows_described, ["Sat 02:00–04:00 Europe/Berlin", "Mon-Fri 22:00–02:00 UTC"]);
    assert.deepEqual(ch.reboot_policy.lease, { max_devices: 1, max_percent: null, per_label: "site", ttl_minutes: 30 });

    // The form opens again with what is stored.
    await page.getByRole("button", { name: "Reboot policy…" }).click();
    const again = page.locator("dialog[open]");
    assert.equal(await again.locator("fieldset.window").count(), 2);
    assert.equal(await again.locator("fieldset.window input[name=time_zone]").first().inputValue(), "Europe/Berlin");
    assert.equal(await again.locator("input[name=per_label]").inputValue(), "site");
    await again.getByRole("button", { name: "Cancel" }).click();

    // One device per site takes its site's lease (the group its resolve names).
    const [lyon, berlin] = [devices[0], devices[1]];
    assert.equal((await lyon.resolve()).reboot.lease_group, `${PRODUCT}.stable.lyon`);
    assert.equal(await preReboot(lyon, `${PRODUCT}.stable.lyon`), 200);
    assert.equal(await preReboot(berlin, `${PRODUCT}.stable.berlin`), 200);
    const holders = reboots.getByTestId("lease-holder");
    await eventually("two lease holders", async () => (await holders.count()) === 2);
    const stuck = reboots.locator(`tr[data-id='${lyon.id}']`);
    await stuck.getByRole("link", { name: lyon.machineId }).waitFor();
    assert.match(await stuck.innerText(), new RegExp(`${PRODUCT}\\.stable\\.lyon`));

    await stuck.getByRole("button", { name: "Free…" }).click();
    await page.locator("dialog[open]").getByRole("button", { name: "Free", exact: true }).click();
    await notice(`Freed the reboot lease of ${lyon.machineId} in ${PRODUCT}.stable.lyon.`);
    await stuck.waitFor({ state: "detached" });
    assert.equal(await holders.count(), 1);
    const left = await api.call("GET", `/v1/products/${PRODUCT}/channels/stable/leases`);
    assert.deepEqual(
      left.map((l) => [l.group, l.id]),
      [[`${PRODUCT}.stable.berlin`, berlin.id]],
    );
  });

  test("a promote in waves shows its waves; labels set on a device select it; a device says why it waits", async () => {
    images["1.2.0"] = await pushImage(REGISTRY, repoPath, "1.2.0");
    await api.call("POST", `/v1/products/${PRODUCT}/releases`, { version: "1.2.0", image: `${repo}:1.2.0` });
    const enroll = async (machineId) => {
      const d = new SimDevice(api, { product: PRODUCT, secret, channel: "beta", machineId, version: "1.1.0", digest: images["1.1.0"].digest });
      await d.enroll();
      await d.report("healthy", "1.1.0", d.digest);
      return d;
    };
    const canary = await enroll("wave-canary");
    const plain = await enroll("wave-plain");

    // An admin labels a device from its page.
    await page.goto(`${server.url}/devices/${canary.id}`);
    await page.getByRole("heading", { name: canary.machineId }).waitFor();
    assert.equal(await page.getByTestId("labels").innerText(), "none");
    await act("Labels…", "Save", async (d) => {
      await d.getByRole("button", { name: "Add a label" }).click();
      await d.getByRole("button", { name: "Add a label" }).click();
      const rows = d.locator("fieldset.label-row");
      await rows.nth(0).locator("input[name=label_key]").fill("ring");
      await rows.nth(0).locator("input[name=label_value]").fill("canary");
      await rows.nth(1).locator("input[name=label_key]").fill("region");
      await rows.nth(1).locator("input[name=label_value]").fill("eu");
    });
    await notice(`Labels of ${canary.machineId}: region=eu, ring=canary.`);
    await page.getByTestId("labels").filter({ hasText: "region=eu" }).waitFor();
    assert.deepEqual((await api.call("GET", `/v1/devices/${canary.id}`)).labels, { region: "eu", ring: "canary" });

    // The list filters by a selector; a bad one shows the server's message.
    await page.getByRole("navigation").getByRole("link", { name: "Devices" }).click();
    await page.fill("input[name=label]", "ring=canary,region!=us");
    await page.getByRole("button", { name: "Filter" }).click();
    await page.waitForURL(/label=ring%3Dcanary%2Cregion%21%3Dus/);
    await eventually("only the canary listed", async () => {
      const rows = await page.locator("table.devices tbody tr").allInnerTexts();
      return rows.length === 1 && rows[0].includes(canary.machineId) && rows[0].includes("ring=canary");
    });
    await page.fill("input[name=label]", "ring=canary,region!=eu");
    await page.getByRole("button", { name: "Filter" }).click();
    await page.getByText("No device matches.").waitFor();
    await page.fill("input[name=label]", "ring canary");
    await page.getByRole("button", { name: "Filter" }).click();
    const bad = await api.raw("GET", "/v1/devices?label=ring%20canary");
    assert.equal(bad.status, 400, JSON.stringify(bad.body));
    await page.getByRole("alert").filter({ hasText: bad.body.detail }).waitFor();

    // Promote in two waves from the form: the canaries, then everyone.
    await page.goto(`${server.url}/products/${PRODUCT}/channels/beta`);
    await page.getByTestId("head").filter({ hasText: "1.1.0" }).waitFor();
    await act("Promote…", "Promote", async (d) => {
      await d.locator("select[name=version]").selectOption("1.2.0");
      await d.getByRole("button", { name: "Roll out in waves instead…" }).click();
      // Each wave has its own percent and ramp: the single ones go.
      assert.equal(await d.locator("input[name=percent]").count(), 0);
      await d.getByRole("button", { name: "Add a wave" }).click();
      const waves = d.locator("fieldset.wave");
      await waves.nth(0).locator("input[name=selector]").fill("ring=canary");
      assert.equal(await waves.nth(0).locator("input[name=wave_hold]").inputValue(), "60");
      await waves.nth(1).locator("input[name=wave_ramp]").fill("30");
      await d.getByTestId("promote-plan").filter({ hasText: "1.2.0" }).waitFor();
    });
    await notice("Promoted 1.2.0 in beta");
    const now = page.getByTestId("waves-now");
    await now.waitFor();
    assert.match(await now.innerText(), /^Wave 1 of 2 \(ring=canary\) at 100%; the next starts .+\.$/);
    assert.deepEqual(
      await page.getByTestId("wave").evaluateAll((trs) => trs.map((tr) => [tr.dataset.state, tr.cells[1].innerText, tr.cells[3].innerText, tr.cells[4].innerText])),
      [
        ["current", "ring=canary", "at once", "60 min"],
        ["waiting", "every device", "30 min", "—"],
      ],
    );
    const ch = await api.call("GET", `/v1/products/${PRODUCT}/channels/beta`);
    assert.equal(ch.waves.current, 0);
    assert.equal(ch.waves.waves.length, 2);
    assert.ok(new Date(ch.waves.next_starts_at) > new Date(), ch.waves.next_starts_at);

    // The canary gets 1.2.0 and stages it; the other waits for its wave. Each
    // device's page says why it has not moved.
    const offered = await canary.resolve();
    assert.equal(offered.update, true);
    assert.equal(offered.release.version, "1.2.0");
    const waitsFor = "staged 1.2.0, waits for window Sat 02:00–04:00 Europe/Berlin";
    await canary.report("download_started", "1.2.0", images["1.2.0"].digest);
    await canary.report("staged", "1.2.0", images["1.2.0"].digest, waitsFor);
    assert.equal((await plain.resolve()).update, false);

    await page.goto(`${server.url}/devices/${canary.id}`);
    await page.getByTestId("staged").filter({ hasText: waitsFor }).waitFor();
    assert.match(await page.locator("h1").innerText(), /staged/);

    await page.goto(`${server.url}/devices/${plain.id}`);
    const status = page.getByTestId("head-status");
    await status.filter({ hasText: "Waits for wave 2 of 2 (every device)" }).waitFor();
    assert.equal(await status.getAttribute("data-reason"), "waiting_for_wave");
    // The channel counts it among those waiting for their wave.
    await page.goto(`${server.url}/products/${PRODUCT}/channels/beta`);
    await page.getByTestId("not-on-head").locator("tr[data-reason=waiting_for_wave]").waitFor();
  });

  test("an admin marks a release urgent from the list, and unmarks it", async () => {
    await page.goto(`${server.url}/releases?product=${PRODUCT}`);
    const row = page.locator("table.releases tr[data-version='1.2.0']");
    await row.waitFor();
    assert.equal(await row.locator(".badge", { hasText: "urgent" }).count(), 0);
    await row.getByRole("button", { name: "Mark urgent…" }).click();
    await page.locator("dialog[open]").getByRole("button", { name: "Mark urgent", exact: true }).click();
    await notice("1.2.0 is urgent: devices reboot into it without waiting for their maintenance window.");
    await row.locator(".badge", { hasText: "urgent" }).waitFor();
    assert.equal((await api.call("GET", `/v1/products/${PRODUCT}/releases/1.2.0`)).urgent, true);

    await page.getByRole("link", { name: "1.2.0" }).click();
    await page.getByTestId("release-urgent").filter({ hasText: "yes" }).waitFor();
    await act("Not urgent…", "Not urgent");
    await notice("1.2.0 is not urgent");
    await page.getByTestId("release-urgent").filter({ hasText: "no" }).waitFor();
    assert.equal((await api.call("GET", `/v1/products/${PRODUCT}/releases/1.2.0`)).urgent, false);

    // Marked again for the viewer, who sees it and cannot change it.
    await api.call("POST", `/v1/products/${PRODUCT}/releases/1.2.0/urgent`, { urgent: true });
  });

  test("the channel page fits a phone's width", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(channelUrl());
    await page.getByTestId("head").waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than the phone`);
    await page.getByTestId("window").first().waitFor();
    // The reboot policy's form fits too: its rows wrap.
    await page.getByRole("button", { name: "Reboot policy…" }).click();
    const dialog = page.locator("dialog[open]");
    await dialog.locator("fieldset.window").first().waitFor();
    const form = await dialog.evaluate((d) => [d.scrollWidth - d.clientWidth, d.getBoundingClientRect().right - window.innerWidth]);
    assert.ok(form[0] <= 0 && form[1] <= 0, `the reboot policy form overflows the phone: ${form}`);
    await dialog.getByRole("button", { name: "Cancel" }).click();
    // And a rollout in waves.
    await page.goto(`${server.url}/products/${PRODUCT}/channels/beta`);
    await page.getByTestId("waves-now").waitFor();
    const beta = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(beta <= 0, `the beta page is ${beta}px wider than the phone`);
    await page.setViewportSize({ width: 1280, height: 900 });
  });

  test("a viewer sees everything and can change nothing", async () => {
    const ctx = await browser.newContext();
    const v = await ctx.newPage();
    await v.goto(`${server.url}/login`);
    await v.fill("input[name=username]", "viewer");
    await v.fill("input[name=password]", VIEWER_PASSWORD);
    await v.click("button[type=submit]");
    await v.getByRole("heading", { name: "Fleet" }).waitFor();
    assert.equal(await v.getByRole("link", { name: "API tokens" }).count(), 0);
    assert.equal(await v.getByRole("link", { name: "Audit log" }).count(), 0);

    await v.goto(channelUrl());
    await v.getByTestId("head").filter({ hasText: "1.0.0" }).waitFor();
    await v.locator("figure[aria-label='Adoption of the head over time']").waitFor();
    await v.locator("table.history tbody tr").first().waitFor();
    // The reboot policy and who holds a lease, without a control.
    await v.getByTestId("lease-holder").first().waitFor();
    assert.equal(await v.getByTestId("window").count(), 2);
    assert.equal(await v.locator("main button:not(.link)").count(), 0, "no control on the channel page");
    await v.goto(`${server.url}/products/${PRODUCT}/channels/beta`);
    await v.getByTestId("waves-now").waitFor();
    assert.equal(await v.locator("main button:not(.link)").count(), 0, "no control on a channel in waves");

    await v.goto(`${server.url}/releases?product=${PRODUCT}`);
    await v.locator("table.releases tr[data-version='1.2.0'] .badge", { hasText: "urgent" }).waitFor();
    assert.equal(await v.locator("main table button").count(), 0, "no urgent control for a viewer");

    await v.goto(`${server.url}/releases/${PRODUCT}/1.1.0`);
    await v.getByRole("heading", { name: "1.1.0" }).waitFor();
    assert.equal(await v.getByRole("button", { name: "Revoke…" }).count(), 0);

    await v.goto(`${server.url}/keys`);
    await v.locator("section[data-role=response] tr[data-state=current]").waitFor();
    assert.equal(await v.locator("main button:not(.link)").count(), 0, "no control on the keys page");

    await v.goto(`${server.url}/devices/${devices[0].id}`);
    await v.getByRole("heading", { name: devices[0].machineId }).waitFor();
    assert.equal(await v.getByRole("button", { name: "Pin…" }).count(), 0);
    assert.equal(await v.getByRole("button", { name: "Labels…" }).count(), 0);
    assert.equal(await v.getByRole("button", { name: "Revoke…" }).count(), 0);
    assert.equal(await v.getByRole("button", { name: "Delete…" }).count(), 0);

    // And the server refuses the viewer's cookie for a change anyway.
    const status = await v.evaluate(async (url) => {
      const r = await fetch(url, { method: "PATCH", headers: { "content-type": "application/json" }, body: '{"paused":true}' });
      return [r.status, (await r.json()).detail];
    }, `/v1/products/${PRODUCT}/channels/stable/rollout`);
    assert.deepEqual(status, [403, "this needs an admin"]);
    assert.equal((await api.call("GET", `/v1/products/${PRODUCT}/channels/stable`)).rollout.paused, false);
    await ctx.close();
  });

  test("signing out ends the session", async () => {
    await page.goto(`${server.url}/`);
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.waitForURL(/\/login/);
    assert.equal((await page.context().cookies()).filter((c) => c.name === "sluice_token").length, 0);
    await page.goto(channelUrl());
    await page.waitForURL(/\/login\?next=/);
  });
});
