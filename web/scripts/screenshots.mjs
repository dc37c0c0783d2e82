#!/usr/bin/env node
// Refreshes docs/screenshots/: starts a real server (as the browser tests do,
// same environment variables: SLUICE_BIN, SLUICE_TEST_PG or DATABASE_URL,
// SLUICE_TEST_REGISTRY or REGISTRY), seeds the demo fleet, lets a rollout move
// for about a minute so the charts have a shape, and photographs the main
// pages in headless Chromium at laptop and phone widths.
//
//   npm run build && node scripts/screenshots.mjs
import { mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { ADMIN_PASSWORD, REGISTRY, WEB, launchBrowser, startServer } from "../tests/harness.mjs";
import { round, seed } from "./lib/demo.mjs";
import { Sluice } from "./lib/sluice.mjs";

const OUT = resolve(WEB, "..", "docs", "screenshots");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const server = await startServer();
const browser = await launchBrowser();
try {
  mkdirSync(OUT, { recursive: true });
  const api = await Sluice.login(server.url, "admin", ADMIN_PASSWORD);
  const fleet = await seed(api, REGISTRY);
  // Raise stable's rollout in steps, the devices polling between them.
  const stable = "/v1/products/acme-os/channels/stable/rollout";
  for (const percent of [35, 50, 65]) {
    await sleep(12_000);
    await api.call("PATCH", stable, { percent });
    await round(fleet);
  }
  await sleep(12_000);
  await api.call("PATCH", stable, { percent: 65, ramp: { to_percent: 100, over_minutes: 30 } });
  await round(fleet);

  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const shot = async (name, path, ready, { full = true } = {}) => {
    await page.goto(server.url + path);
    await ready();
    await page.waitForLoadState("networkidle");
    await page.screenshot({ path: join(OUT, `${name}.png`), fullPage: full });
    console.log(`docs/screenshots/${name}.png`);
  };

  await shot("login", "/login", () => page.locator("input[name=username]").waitFor(), { full: false });
  await page.fill("input[name=username]", "admin");
  await page.fill("input[name=password]", ADMIN_PASSWORD);
  await page.click("button[type=submit]");
  await page.getByRole("heading", { name: "Fleet" }).waitFor();

  await shot("fleet", "/", () => page.locator("article[data-channel=stable] figure").waitFor());
  await shot("channel", "/products/acme-os/channels/stable", async () => {
    await page.getByRole("combobox", { name: "Window" }).selectOption("300");
    await page.locator("figure[aria-label='Adoption of the head over time']").waitFor();
    await page.locator("table.history tbody tr").first().waitFor();
    await sleep(500);
  });
  await page.getByRole("button", { name: "Promote…" }).click();
  await page.locator("dialog[open] select[name=version]").selectOption("1.3.0-beta.1");
  await page.locator("dialog[open] input[name=percent]").fill("10");
  await page.screenshot({ path: join(OUT, "channel-promote.png") });
  console.log("docs/screenshots/channel-promote.png");
  await page.keyboard.press("Escape");

  await shot("releases", "/releases?product=acme-os", () => page.locator("table.releases tbody tr").first().waitFor());
  await shot("release", "/releases/acme-os/1.2.0", () => page.getByRole("heading", { name: "Platforms" }).waitFor());
  await shot("devices", "/devices?product=acme-os", () => page.locator("table.devices tbody tr").first().waitFor(), { full: false });
  const lab = fleet.find((d) => d.machineId === "lab-04");
  await shot("device", `/devices/${lab.id}`, () => page.locator("ol.timeline li").first().waitFor());
  await shot("tokens", "/tokens", () => page.locator("table.tokens tbody tr").first().waitFor(), { full: false });
  await shot("audit", "/audit", () => page.locator("table.audit tbody tr").first().waitFor(), { full: false });

  await page.setViewportSize({ width: 390, height: 844 });
  await shot("channel-phone", "/products/acme-os/channels/stable", () => page.locator("figure").first().waitFor());
  await shot("fleet-phone", "/", () => page.locator("article[data-channel=stable] figure").waitFor(), { full: false });
} finally {
  await browser.close();
  await server.stop();
}
