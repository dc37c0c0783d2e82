// A small client of the Sluice REST API, and simulated devices that enroll,
// resolve and report over HTTP the way the agent does (without writing slots).
// Used by the browser tests and the demo seed.
import { generateKeyPairSync, randomBytes, sign } from "node:crypto";

/**
 * A proof of a device key, as `protocol/src/proof.rs` defines it: Ed25519
 * over the domain, then purpose, product, subject, the raw public key and 16
 * random bytes, each with a 4-byte big-endian length, then the time as 8
 * bytes big endian.
 */
export function deviceProof(key, purpose, product, subject, timestamp = Math.floor(Date.now() / 1000)) {
  const raw = key.publicKey.export({ format: "der", type: "spki" }).subarray(-32);
  const field = (b) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    return [len, b];
  };
  const ts = Buffer.alloc(8);
  ts.writeBigInt64BE(BigInt(timestamp));
  const nonce = randomBytes(16);
  const message = Buffer.concat([
    Buffer.from("sluice-device-proof-v1\0"),
    ...[purpose, product, subject].flatMap((s) => field(Buffer.from(s))),
    ...field(raw),
    ...field(nonce),
    ts,
  ]);
  return {
    public_key: raw.toString("base64"),
    nonce: nonce.toString("base64"),
    timestamp,
    signature: sign(null, message, key.privateKey).toString("base64"),
  };
}

export class Sluice {
  constructor(url, token) {
    this.url = url.replace(/\/$/, "");
    this.token = token;
  }

  static async login(url, username, password) {
    const s = new Sluice(url);
    const r = await s.call("POST", "/v1/auth/login", { username, password });
    s.token = r.token;
    return s;
  }

  /** Sends a request; answers the JSON body, or throws with the problem's detail. */
  async call(method, path, body, { token = this.token, ok = [200, 201, 204] } = {}) {
    const r = await this.raw(method, path, body, { token });
    if (!ok.includes(r.status)) {
      const err = new Error(`${method} ${path}: ${r.status} ${r.body?.detail ?? JSON.stringify(r.body)}`);
      err.status = r.status;
      err.body = r.body;
      throw err;
    }
    return r.body;
  }

  async raw(method, path, body, { token = this.token } = {}) {
    const headers = {};
    if (token) headers.authorization = `Bearer ${token}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    let r;
    // A server that limits the rate (enrollments per address: the demo and
    // the browser tests enroll dozens of devices from one) says when to come
    // back: wait as told, a bounded number of times.
    for (let attempt = 0; ; attempt++) {
      r = await fetch(this.url + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      if (r.status !== 429 || attempt >= 20) break;
      const wait = Number(r.headers.get("retry-after")) || 5;
      await r.text();
      await new Promise((done) => setTimeout(done, Math.min(wait, 30) * 1000));
    }
    const text = await r.text();
    let parsed = null;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      parsed = text;
    }
    return { status: r.status, body: parsed, headers: r.headers };
  }
}

/**
 * A simulated device: enrolls once, then on each `step()` resolves and walks an
 * offered update through download, apply, reboot and a health report, the
 * way the agent reports it. `fail` makes its next update roll back instead.
 */
export class SimDevice {
  constructor(sluice, { product, secret, channel, machineId, arch = "amd64", labels = {}, version, digest, failOn = [] }) {
    Object.assign(this, { sluice, product, secret, channel, machineId, arch, labels, version, digest });
    this.failOn = new Set(failOn);
    this.key = generateKeyPairSync("ed25519");
    this.slot = "A";
    this.fail = false;
  }

  async enroll() {
    const r = await this.sluice.call(
      "POST",
      "/v1/devices/enroll",
      {
        product: this.product,
        enrollment_secret: this.secret,
        machine_id: this.machineId,
        arch: this.arch,
        channel: this.channel,
        labels: this.labels,
        current_version: this.version ?? null,
        current_digest: this.digest ?? null,
        proof: deviceProof(this.key, "enroll", this.product, this.machineId),
      },
      { token: null },
    );
    this.id = r.device_id;
    this.token = r.token;
    return this;
  }

  // The host status a real agent sends with each event (`status --json`):
  // before the reboot the new release waits in the other slot, on trial.
  host(kind, version, digest) {
    if (!this.slot) return undefined;
    const other = this.slot === "A" ? "B" : "A";
    const booted = { slot: this.slot, version: this.version ?? null, digest: this.digest ?? null, boot: "good" };
    const waiting = kind === "applied" || kind === "staged" || kind === "rebooting";
    const writing = kind === "download_started" || kind === "downloaded";
    return {
      state: waiting ? "staged" : writing ? "writing" : "idle",
      reboot_pending: waiting,
      booted,
      staged: waiting || writing ? { slot: other, version, digest, boot: waiting ? "trial" : "bad" } : null,
      rollback: null,
    };
  }

  async report(kind, version, digest, message) {
    await this.sluice.call(
      "POST",
      `/v1/devices/${this.id}/events`,
      { kind, version, digest, booted_slot: this.slot, host: this.host(kind, version, digest), ...(message ? { message } : {}) },
      { token: this.token },
    );
  }

  async resolve() {
    const q = new URLSearchParams({ arch: this.arch, nonce: randomBytes(12).toString("hex") });
    if (this.digest) q.set("current", this.digest);
    // Like an agent, it reports the key list it holds and takes the newest
    // one an answer names (a real agent verifies it first).
    if (this.keysVersion) q.set("keys_version", String(this.keysVersion));
    const d = await this.sluice.call("GET", `/v1/products/${this.product}/channels/${this.channel}/resolve?${q}`, undefined, {
      token: this.token,
    });
    if (this.followKeys !== false && d.keys_version) this.keysVersion = d.keys_version;
    return d;
  }

  /** One poll: answers the decision, after applying an offered update. */
  async step() {
    const d = await this.resolve();
    if (d.update) await this.apply(d);
    return d;
  }

  /**
   * Walks an offered release through download, apply and reboot, then reports
   * `healthy`, or `rolled_back` when `fail` is set (once) or the version is in
   * `failOn`. Like an agent, it does not retry a version that rolled back.
   */
  async apply(decision) {
    const { version, digest } = decision.release;
    if (this.refused?.has(version)) return;
    await this.report("download_started", version, digest);
    await this.report("downloaded", version, digest);
    await this.report("applied", version, digest, `written to slot ${this.slot === "A" ? "B" : "A"}`);
    await this.report("rebooting", version, digest);
    if (this.fail || this.failOn?.has(version)) {
      this.fail = false;
      (this.refused ??= new Set()).add(version);
      await this.report("rolled_back", version, digest, "health check failed: systemctl is-system-running: degraded; booted the old slot");
      return;
    }
    this.slot = this.slot === "A" ? "B" : "A";
    this.version = version;
    this.digest = digest;
    await this.report("healthy", version, digest, `slot ${this.slot} marked good`);
  }
}
