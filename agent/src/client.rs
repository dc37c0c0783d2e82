//! The agent's HTTP client of the Sluice server: enroll, token renewal,
//! resolve (signed answers, checked here before anything acts on them),
//! event reports and reboot leases (FleetLock).

use anyhow::{Context, bail};
use sluice_protocol::keys::SIGNATURE_HEADER;
use sluice_protocol::{
    DeviceProof, DeviceToken, EnrollRequest, EnrollResponse, EventRequest, FleetLockClient,
    FleetLockError, FleetLockRequest, KeyLists, KeySet, Offer, ResolveResponse, TokenRequest,
    WIRE_VERSION, simplesigning::verify_image_signature,
};
use std::time::Duration;
use time::OffsetDateTime;

/// Most bytes a resolution answer may have.
const MAX_ANSWER: u64 = 1 << 20;

/// Most bytes a page of key lists may have.
const MAX_KEY_LISTS: u64 = 8 << 20;

/// An HTTP client for one server.
pub struct Server {
    agent: ureq::Agent,
    base: String,
}

fn problem(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_string()
        .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string))
        .unwrap_or(body)
}

/// The server answered an error status: callers branch on `status`.
#[derive(Debug)]
pub struct Refused {
    /// What was asked (`resolve`, `enrollment`, `token renewal`).
    pub what: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// The server's `detail`.
    pub detail: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = ureq::http::StatusCode::from_u16(self.status)
            .map(|s| s.to_string())
            .unwrap_or_else(|_| self.status.to_string());
        write!(f, "{} refused ({status}): {}", self.what, self.detail)
    }
}

impl std::error::Error for Refused {}

fn refused(what: &'static str, resp: &mut ureq::http::Response<ureq::Body>) -> anyhow::Error {
    Refused {
        what,
        status: resp.status().as_u16(),
        detail: problem(resp),
    }
    .into()
}

impl Server {
    /// A client for the server at `base` (`https://updates.example.com`),
    /// trusting only the CA in `ca` (PEM) when given.
    pub fn new(base: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)));
        if let Some(ca) = ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("reading server_ca {}", ca.display()))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing server_ca {}", ca.display()))?;
            if certs.is_empty() {
                bail!("server_ca {} holds no certificate", ca.display());
            }
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
                    .build(),
            );
        }
        Ok(Server {
            agent: config.build().into(),
            base: base.trim_end_matches('/').to_string(),
        })
    }

    /// `POST /v1/devices/enroll`.
    pub fn enroll(&self, req: &EnrollRequest) -> anyhow::Result<EnrollResponse> {
        let url = format!("{}/v1/devices/enroll", self.base);
        let mut resp = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(serde_json::to_vec(req)?)
            .with_context(|| format!("server {} unreachable", self.base))?;
        if resp.status() != 200 {
            return Err(refused("enrollment", &mut resp));
        }
        Ok(serde_json::from_slice(
            &resp
                .body_mut()
                .with_config()
                .limit(MAX_ANSWER)
                .read_to_vec()?,
        )?)
    }

    /// `GET .../resolve`: the body bytes and the signature header, unchecked.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        &self,
        product: &str,
        channel: &str,
        token: &str,
        arch: &str,
        current: Option<&str>,
        nonce: &str,
        keys_version: Option<u64>,
        serial: Option<i64>,
    ) -> anyhow::Result<(Vec<u8>, String)> {
        let url = format!(
            "{}/v1/products/{product}/channels/{channel}/resolve",
            self.base
        );
        let mut req = self
            .agent
            .get(&url)
            .query("arch", arch)
            .query("nonce", nonce)
            .header("Authorization", &format!("Bearer {token}"));
        if let Some(c) = current {
            req = req.query("current", c);
        }
        if let Some(v) = keys_version {
            req = req.query("keys_version", v.to_string());
        }
        // The last serial accepted: a server behind the one that answered
        // before catches up instead of answering a lower serial.
        if let Some(s) = serial {
            req = req.query("serial", s.to_string());
        }
        let mut resp = req
            .call()
            .with_context(|| format!("server {} unreachable", self.base))?;
        if resp.status() != 200 {
            return Err(refused("resolve", &mut resp));
        }
        let sig = resp
            .headers()
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .context("resolution answer is not signed (no sluice-signature header): refused")?;
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()?;
        Ok((body, sig))
    }

    /// `GET /v1/keys/lists?after=`: signed key lists, unchecked.
    pub fn key_lists(&self, after: u64) -> anyhow::Result<KeyLists> {
        let url = format!("{}/v1/keys/lists", self.base);
        let mut resp = self
            .agent
            .get(&url)
            .query("after", after.to_string())
            .call()
            .with_context(|| format!("server {} unreachable", self.base))?;
        if resp.status() != 200 {
            bail!(
                "key lists refused ({}): {}",
                resp.status(),
                problem(&mut resp)
            );
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_KEY_LISTS)
            .read_to_vec()?;
        serde_json::from_slice(&body).context("the key lists are not valid JSON")
    }

    /// `POST /v1/devices/{id}/token`: a fresh token for a proof of the device key.
    pub fn renew_token(&self, device_id: &str, proof: &DeviceProof) -> anyhow::Result<DeviceToken> {
        self.token_call("token renewal", device_id, "token", None, proof)
    }

    /// `POST /v1/devices/{id}/key`: binds the device key with a token from
    /// before device keys; answers a token for the key.
    pub fn bind_key(
        &self,
        device_id: &str,
        token: &str,
        proof: &DeviceProof,
    ) -> anyhow::Result<DeviceToken> {
        self.token_call(
            "binding the device key",
            device_id,
            "key",
            Some(token),
            proof,
        )
    }

    fn token_call(
        &self,
        what: &'static str,
        device_id: &str,
        path: &str,
        token: Option<&str>,
        proof: &DeviceProof,
    ) -> anyhow::Result<DeviceToken> {
        let url = format!("{}/v1/devices/{device_id}/{path}", self.base);
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let body = TokenRequest {
            proof: proof.clone(),
        };
        let mut resp = req
            .send(serde_json::to_vec(&body)?)
            .with_context(|| format!("server {} unreachable", self.base))?;
        if resp.status() != 200 {
            return Err(refused(what, &mut resp));
        }
        serde_json::from_slice(
            &resp
                .body_mut()
                .with_config()
                .limit(MAX_ANSWER)
                .read_to_vec()?,
        )
        .with_context(|| format!("{what}: the answer is not a device token"))
    }

    /// `POST /v1/devices/{id}/events`.
    pub fn event(&self, device_id: &str, token: &str, ev: &EventRequest) -> anyhow::Result<()> {
        let url = format!("{}/v1/devices/{device_id}/events", self.base);
        let mut resp = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(serde_json::to_vec(ev)?)
            .with_context(|| format!("server {} unreachable", self.base))?;
        if !resp.status().is_success() {
            return Err(refused("event", &mut resp));
        }
        Ok(())
    }

    /// `POST /v1/devices/{id}/failures/cleared`.
    pub fn failures_cleared(
        &self,
        device_id: &str,
        token: &str,
        body: &sluice_protocol::FailuresCleared,
    ) -> anyhow::Result<()> {
        let url = format!("{}/v1/devices/{device_id}/failures/cleared", self.base);
        let mut resp = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(serde_json::to_vec(body)?)
            .with_context(|| format!("server {} unreachable", self.base))?;
        if !resp.status().is_success() {
            return Err(refused("failures cleared", &mut resp));
        }
        Ok(())
    }
}

/// How a FleetLock request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// 2xx: the lease is held (`pre-reboot`) or given back (`steady-state`).
    Done,
    /// A 4xx answer: the server's `value` in words (or the status and
    /// body when it sent no FleetLock error), cut to one short line. Any
    /// other answer is an error: whether the lease is held is not known.
    Refused(String),
}

/// Most characters of a FleetLock refusal kept: it is shown in `status`
/// and sent back in events, and the answer is not signed.
const MAX_REFUSAL: usize = 200;

impl Server {
    /// `POST /v1/pre-reboot` (FleetLock): take a reboot lease in `group`.
    pub fn pre_reboot(&self, device_id: &str, token: &str, group: &str) -> anyhow::Result<Lease> {
        self.fleet_lock("pre-reboot", device_id, token, group)
    }

    /// `POST /v1/steady-state` (FleetLock): give the lease in `group` back.
    pub fn steady_state(&self, device_id: &str, token: &str, group: &str) -> anyhow::Result<Lease> {
        self.fleet_lock("steady-state", device_id, token, group)
    }

    fn fleet_lock(
        &self,
        route: &str,
        device_id: &str,
        token: &str,
        group: &str,
    ) -> anyhow::Result<Lease> {
        let url = format!("{}/v1/{route}", self.base);
        let body = FleetLockRequest {
            client_params: FleetLockClient {
                id: device_id.to_string(),
                group: group.to_string(),
            },
        };
        let mut resp = self
            .agent
            .post(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .header("fleet-lock-protocol", "true")
            .header("Content-Type", "application/json")
            .send(serde_json::to_vec(&body)?)
            .with_context(|| format!("server {} unreachable", self.base))?;
        if resp.status().is_success() {
            return Ok(Lease::Done);
        }
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        // Only a client error says no for sure: after a 5xx the lease may
        // be held (or given back) all the same.
        if !resp.status().is_client_error() {
            bail!(
                "{route} failed ({status}): {}",
                one_line(&text, MAX_REFUSAL)
            );
        }
        let why = match serde_json::from_str::<FleetLockError>(&text) {
            Ok(e) => e.value,
            Err(_) => format!("{route} answered {status}: {text}"),
        };
        Ok(Lease::Refused(one_line(&why, MAX_REFUSAL)))
    }
}

/// `s` as one line of at most `max` characters, without control characters.
pub fn one_line(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let clean = clean.trim();
    match clean.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &clean[..i]),
        None => clean.to_string(),
    }
}

/// What the agent expects of a resolution answer.
pub struct Expect<'a> {
    /// This device's id.
    pub device_id: &'a str,
    /// The nonce sent with the request.
    pub nonce: &'a str,
    /// Now.
    pub now: OffsetDateTime,
    /// The highest serial accepted so far.
    pub last_serial: Option<i64>,
    /// The product asked about.
    pub product: &'a str,
    /// The channel asked about.
    pub channel: &'a str,
    /// The architecture asked about.
    pub arch: &'a str,
    /// The digest sent as `current`, if any.
    pub current: Option<&'a str>,
}

/// Checks a resolution answer: signature by a trusted response key over the
/// exact bytes, that it answers this device's question (device id, nonce,
/// product, channel, arch, current digest: a proxy that rewrote the request
/// gets an answer to another question), expiry and serial. Every refusal is
/// one line.
pub fn verify_answer(
    keys: &KeySet,
    header: &str,
    body: &[u8],
    expect: &Expect<'_>,
) -> anyhow::Result<ResolveResponse> {
    keys.verify_response(header, body)
        .context("resolution answer signature refused")?;
    let r: ResolveResponse =
        serde_json::from_slice(body).context("resolution answer is not valid JSON")?;
    if r.device_id != expect.device_id {
        bail!(
            "resolution answer is for device {}, not this device {}: refused",
            r.device_id,
            expect.device_id
        );
    }
    if r.nonce != expect.nonce {
        bail!("resolution answer echoes another nonce (a replayed answer): refused");
    }
    if r.wire < WIRE_VERSION {
        bail!(
            "resolution answer has wire version {} and does not name the question it answers \
             (a server older than this agent, which needs version {WIRE_VERSION}): refused",
            r.wire
        );
    }
    for (what, got, want) in [
        ("product", r.product.as_deref(), Some(expect.product)),
        ("channel", r.channel.as_deref(), Some(expect.channel)),
        ("arch", r.arch.as_deref(), Some(expect.arch)),
        ("current digest", r.current.as_deref(), expect.current),
    ] {
        if got != want {
            bail!(
                "resolution answer is for {what} {}, not the {} this device asked about \
                 (the request was rewritten on its way): refused",
                got.unwrap_or("(none)"),
                want.unwrap_or("(none)")
            );
        }
    }
    if r.expires_at <= expect.now {
        bail!("resolution answer expired at {}: refused", r.expires_at);
    }
    if let Some(last) = expect.last_serial
        && r.serial < last
    {
        bail!(
            "resolution answer has serial {} below the {last} already accepted (a replay or freeze): refused",
            r.serial
        );
    }
    Ok(r)
}

/// The offer to act on, if any: it must be signed by a trusted image key for
/// this product, version and digest, name the same digest in its image
/// reference, and not go back in version unless the answer says `downgrade`.
pub fn check_offer(
    keys: &KeySet,
    answer: &ResolveResponse,
    product: &str,
    current_version: Option<&str>,
) -> anyhow::Result<Option<Offer>> {
    if !answer.update {
        return Ok(None);
    }
    let offer = answer
        .release
        .clone()
        .context("resolution answer says update but names no release: refused")?;
    verify_image_signature(
        keys,
        &offer.signature,
        &offer.digest,
        product,
        &offer.version,
    )
    .context("image signature refused")?;
    if !offer.image.ends_with(&format!("@{}", offer.digest)) {
        bail!(
            "offered image {} is not the signed digest {}: refused",
            offer.image,
            offer.digest
        );
    }
    let target = semver::Version::parse(&offer.version)
        .with_context(|| format!("offered version {:?} is not SemVer: refused", offer.version))?;
    if let Some(cur) = current_version.and_then(|c| semver::Version::parse(c).ok())
        && target < cur
        && !answer.downgrade
    {
        bail!(
            "offered version {target} is older than the running {cur} and the answer does not say downgrade: refused"
        );
    }
    Ok(Some(offer))
}
