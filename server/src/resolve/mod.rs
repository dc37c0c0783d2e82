//! The hot path: `GET .../resolve`. Answers from an in-memory snapshot of the
//! product (releases, channels, pins) with no database round trip; check-ins
//! are batched and written behind. Every answer is signed.

use crate::api::auth::DeviceAuth;
use crate::api::channels::ChannelPath;
use crate::app::{AppState, Problems};
use crate::error::{Error, Query, Result};
use crate::rules::policy::{self, Labels};
use crate::rules::rollout;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sluice_protocol::keys::SIGNATURE_HEADER;
use sluice_protocol::{RebootAdvice, ResolveResponse, WIRE_VERSION, is_sha256_digest};
use time::OffsetDateTime;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

mod checkins;
mod signer;
mod snapshot;

pub use checkins::Checkins;
use checkins::*;
pub use signer::AnswerSigner;
use snapshot::*;
pub use snapshot::{Cache, Snapshot};

/// Query of `GET .../resolve`.
#[derive(Debug, Default, PartialEq, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResolveQuery {
    /// The device's architecture (`amd64`, `arm64`, `arm/v7`); `amd64` when
    /// absent (the agent always sends its own). It is recorded as the
    /// device's architecture with the check-in.
    pub arch: Option<String>,
    /// The digest the device runs.
    pub current: Option<String>,
    /// A fresh random value (8–128 of `[A-Za-z0-9_-]`), echoed in the signed answer.
    pub nonce: String,
    /// The newest key list version the device holds (`GET /v1/keys/lists`).
    pub keys_version: Option<u64>,
    /// The last serial the device accepted: a server whose snapshot is
    /// older reloads it before answering, so the serial never goes down
    /// whichever server answers (a value above any serial given reloads
    /// nothing).
    pub serial: Option<i64>,
}

impl ResolveQuery {
    /// Reads a plain query by hand: known keys spelled out, each at most
    /// once, values with at most `%XX` escapes that decode to UTF-8 and
    /// numbers that parse; unknown keys are ignored, as by the extractor.
    /// Anything else is `None`, for the general extractor (serde_urlencoded
    /// behind serde_path_to_error, a twentieth of a resolve's CPU) to read
    /// or refuse with its own message. A test compares the two.
    fn parse_plain(query: &str) -> Option<Self> {
        fn decode(v: &str) -> Option<String> {
            if !v.contains(['%', '+']) {
                return Some(v.to_owned());
            }
            let (b, mut out, mut i) = (v.as_bytes(), Vec::with_capacity(v.len()), 0);
            while i < b.len() {
                match b[i] {
                    b'+' => out.push(b' '),
                    b'%' => {
                        let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                        out.push(u8::from_str_radix(hex, 16).ok()?);
                        i += 2;
                    }
                    c => out.push(c),
                }
                i += 1;
            }
            String::from_utf8(out).ok()
        }
        fn set<T>(slot: &mut Option<T>, v: Option<T>) -> Option<()> {
            (slot.is_none() && v.is_some()).then(|| *slot = v)
        }
        let mut q = ResolveQuery::default();
        let mut nonce = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "arch" => set(&mut q.arch, decode(v))?,
                "current" => set(&mut q.current, decode(v))?,
                "nonce" => set(&mut nonce, decode(v))?,
                "keys_version" => set(&mut q.keys_version, decode(v)?.parse().ok())?,
                "serial" => set(&mut q.serial, decode(v)?.parse().ok())?,
                k if k.contains(['%', '+']) => return None,
                _ => {}
            }
        }
        q.nonce = nonce?;
        Some(q)
    }
}

/// [`ResolveQuery`], read by [`ResolveQuery::parse_plain`] when it can.
struct ResolveParams(ResolveQuery);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ResolveParams {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self> {
        if let Some(q) = parts.uri.query().and_then(ResolveQuery::parse_plain) {
            return Ok(ResolveParams(q));
        }
        let Query(q) = Query::<ResolveQuery>::from_request_parts(parts, state).await?;
        Ok(ResolveParams(q))
    }
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(resolve))
}

/// Which image the device should run: a signed decision.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/resolve", tag = "channels",
    params(ChannelPath, ResolveQuery),
    security(("bearer" = [])),
    responses((status = 200, body = ResolveResponse, description = "Signed: the `Sluice-Signature` header holds `keyid=<id>; sig=<base64 Ed25519>; batch=<index>/<size>; path=<base64 SHA-256 hashes>`: one signature over a batch of answers (over `sluice-resolve-batch-v1\\0`, the size as 8 bytes big endian and the RFC 9162 Merkle root of the answers' exact bodies), with this body's place and inclusion path. Without `batch` and `path`, the signature is over the body itself.",
               headers(("Sluice-Signature" = String, description = "keyid, signature, and this body's place and inclusion path in the signed batch"))), Problems<400, 401, 403, 404>))]
async fn resolve(
    State(state): State<AppState>,
    device: DeviceAuth,
    ChannelPath { product, channel }: ChannelPath,
    ResolveParams(mut q): ResolveParams,
) -> Result<Response> {
    if device.product != product {
        return Err(Error::Forbidden(format!(
            "this device belongs to product {}, not {product}",
            device.product
        )));
    }
    if !(8..=128).contains(&q.nonce.len())
        || !q
            .nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::BadRequest(
            "nonce must be 8–128 characters of [A-Za-z0-9_-], fresh for each request".into(),
        ));
    }
    if let Some(c) = &q.current
        && !is_sha256_digest(c)
    {
        return Err(Error::BadRequest(
            "current must be the running image's digest, `sha256:<64 hex>`".into(),
        ));
    }
    let arch = q.arch.take().unwrap_or_else(|| "amd64".into());
    if arch.is_empty() || arch.len() > 32 {
        return Err(Error::BadRequest("arch must be 1–32 characters".into()));
    }
    let snap = Cache::get_at_least(&state, &product, q.serial).await?;
    let ch = snap
        .channels
        .get(&channel)
        .ok_or_else(|| Error::not_found(format!("channel {channel} of product {product}")))?;
    let now = OffsetDateTime::now_utc();
    // The fleet policy's clock (waves, windows); the system's own time
    // outside tests. The answer's validity stays on the system's time.
    let policy_now = state.clock.now();
    let current_idx = q
        .current
        .as_ref()
        .and_then(|d| snap.by_digest.get(d).copied());
    let device_id = device.id.to_string();

    let pin = snap.pins.get(&device.id);
    let pin_rel = match pin {
        Some(PinSnap::Release(i)) => Some(&snap.rels[*i]),
        Some(PinSnap::Image { rel, .. }) => Some(rel),
        None => None,
    };
    let input = rollout::Input {
        releases: &snap.rels,
        head: ch.head.map(|i| &snap.rels[i]),
        base: ch.base.map(|i| &snap.rels[i]),
        rollout: &ch.rollout,
        rolled_back: ch.rolled_back,
        pin: pin_rel,
        device_id: &device_id,
        labels: snap.labels.get(&device.id).unwrap_or(&NO_LABELS),
        current: current_idx.map(|i| &snap.rels[i]),
        now: policy_now,
    };
    let decision = rollout::decide(&input);
    let mut urgent = false;
    // The platform offered: the target's best fit for the device, if signed.
    let offer = decision.target.and_then(|t| {
        let platforms = match pin {
            Some(PinSnap::Image { rel, platforms }) if std::ptr::eq(t, rel) => platforms,
            _ => {
                let i = snap.rels.iter().position(|r| std::ptr::eq(r, t))?;
                urgent = snap.releases[i].urgent;
                &snap.releases[i].platforms
            }
        };
        // `arm/v7` asks for architecture `arm`, variant `v7`.
        let pl = crate::infra::registry::best_fit(platforms, &arch, |p| {
            (p.architecture.as_str(), p.variant.as_deref())
        })?;
        Some((pl, pl.offer.as_deref()?))
    });
    // Rule 5: the device already runs the target's digest.
    let running = offer.is_some_and(|(pl, _)| q.current.as_deref() == Some(pl.digest.as_str()));
    let update = decision.update && offer.is_some() && !running;
    let labels = input.labels;
    let reboot = (!ch.reboot.windows.is_empty() || ch.reboot.lease.is_some()).then(|| {
        let mut advice = policy::reboot_advice(&ch.reboot, labels, urgent, policy_now);
        advice.lease_group = ch.reboot.lease_group(&product, &channel, labels);
        advice
    });
    let poll_after_s = match &reboot {
        Some(a) if update && !a.allowed => {
            poll_until_window(state.config.poll_after_s, a, &device_id, policy_now)
        }
        _ => state.config.poll_after_s,
    };
    let keys_version = state.keys.list_version();
    let answer = Answer {
        update,
        downgrade: update && decision.downgrade,
        release: offer.map(|(_, json)| json),
        poll_after_s,
        device_id: &device_id,
        nonce: &q.nonce,
        serial: snap.serial,
        issued_at: now,
        expires_at: now + time::Duration::seconds(state.config.response_ttl_s as i64),
        // What was asked, so the device can tell that this answers its own
        // question and not one a proxy rewrote.
        wire: WIRE_VERSION,
        product: Some(&product),
        channel: Some(&channel),
        arch: Some(&arch),
        current: q.current.as_deref(),
        keys_version,
        retry: snap.retries.get(&device.id).map_or(&[], Vec::as_slice),
        reboot: reboot.as_ref(),
    };
    // Room for a whole answer (about 1.2 KB), so it is written without regrowing.
    let mut body = Vec::with_capacity(2048);
    serde_json::to_writer(&mut body, &answer).map_err(anyhow::Error::from)?;
    state.checkins.seen(
        device.id,
        Checkin {
            at: now,
            channel,
            arch,
            version: current_idx.map(|i| snap.releases[i].version.clone()),
            digest: q.current,
            // A device may only claim lists that exist.
            keys_version: q
                .keys_version
                .filter(|v| Some(*v) <= keys_version)
                .and_then(|v| i64::try_from(v).ok()),
            offered: offer.filter(|_| update).map(|(pl, _)| pl.offered.clone()),
        },
    );
    state
        .metrics
        .resolves
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sig = state.answers.sign(&state, &body).await?;
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        SIGNATURE_HEADER,
        HeaderValue::try_from(sig).map_err(anyhow::Error::from)?,
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// A [`ResolveResponse`] as the resolve path writes it: the same fields in
/// the same order, borrowed rather than copied, with the offer written once
/// per snapshot ([`PlatformOffer`]). A test checks that both write the same
/// bytes.
#[derive(Serialize)]
struct Answer<'a> {
    update: bool,
    downgrade: bool,
    release: Option<&'a RawValue>,
    poll_after_s: u64,
    device_id: &'a str,
    nonce: &'a str,
    serial: i64,
    #[serde(with = "time::serde::rfc3339")]
    issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    wire: u32,
    product: Option<&'a str>,
    channel: Option<&'a str>,
    arch: Option<&'a str>,
    current: Option<&'a str>,
    keys_version: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    retry: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    reboot: Option<&'a RebootAdvice>,
}

static NO_LABELS: Labels = Labels::new();

/// When a device that staged a release outside its maintenance window asks
/// again: no later than its usual poll, and otherwise a little after the
/// window opens, spread over the window's first half (at most 15 min) by
/// the device's bucket, so a fleet does not ask in the same second.
fn poll_until_window(
    usual_s: u64,
    advice: &sluice_protocol::RebootAdvice,
    device_id: &str,
    now: OffsetDateTime,
) -> u64 {
    let (Some(opens), Some(closes)) = (advice.opens_at, advice.closes_at) else {
        return usual_s;
    };
    let wait = (opens - now).whole_seconds().max(0) as u64;
    let spread = ((closes - opens).whole_seconds().max(2) as u64 / 2).min(900);
    let jitter = rollout::bucket(device_id, "reboot-window") % spread;
    usual_s.min(wait + jitter).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the general extractor makes of a query, or `None` for a refusal.
    fn general(query: &str) -> Option<ResolveQuery> {
        let uri: axum::http::Uri = format!("/r?{query}").parse().unwrap();
        axum::extract::Query::<ResolveQuery>::try_from_uri(&uri)
            .ok()
            .map(|q| q.0)
    }

    /// The resolve path's [`Answer`] writes the very bytes [`ResolveResponse`]
    /// does (every field set, and with the optional ones left out), so the
    /// borrowed copy cannot drift from the protocol's type. The response is
    /// built with every field spelled out: a field added to it fails to
    /// compile here until the answer has it too.
    #[test]
    fn the_answer_writes_what_the_protocol_type_writes() {
        use sluice_protocol::{ImageSignature, Offer, RebootReason};
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_790_000_000_123_456_789).unwrap();
        let offer = Offer {
            version: "1.2.3-rc.1".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            image: format!(
                "registry.example:5000/os/\"odd\"@sha256:{}",
                "ab".repeat(32)
            ),
            size: 123_456_789,
            signature: ImageSignature {
                payload: "eyJjcml0aWNhbCI6e319".into(),
                signature: "MEUCIQ+/==".into(),
                key_id: "image-key-1".into(),
            },
        };
        let advice = RebootAdvice {
            allowed: false,
            reason: RebootReason::OutsideWindow,
            window: Some("Sat 02:00–04:00 Europe/Berlin".into()),
            opens_at: Some(at + time::Duration::hours(30)),
            closes_at: Some(at + time::Duration::hours(32)),
            lease_group: Some("product/stable/rack-7".into()),
        };
        let retry = vec![format!("sha256:{}", "cd".repeat(32))];
        for full in [true, false] {
            let expected = ResolveResponse {
                update: full,
                downgrade: full,
                release: full.then(|| offer.clone()),
                poll_after_s: 900,
                device_id: "0f0e0d0c-0b0a-4908-8706-050403020100".into(),
                nonce: "n0nce_-x".into(),
                serial: 42,
                issued_at: at,
                expires_at: at + time::Duration::seconds(300),
                wire: WIRE_VERSION,
                product: Some("os".into()),
                channel: Some("stable".into()),
                arch: Some("arm/v7".into()),
                current: full.then(|| format!("sha256:{}", "ef".repeat(32))),
                keys_version: full.then_some(7),
                retry: if full { retry.clone() } else { Vec::new() },
                reboot: full.then(|| advice.clone()),
            };
            let json = serde_json::value::to_raw_value(&offer).unwrap();
            let ours = Answer {
                update: expected.update,
                downgrade: expected.downgrade,
                release: full.then_some(&*json),
                poll_after_s: expected.poll_after_s,
                device_id: &expected.device_id,
                nonce: &expected.nonce,
                serial: expected.serial,
                issued_at: expected.issued_at,
                expires_at: expected.expires_at,
                wire: expected.wire,
                product: expected.product.as_deref(),
                channel: expected.channel.as_deref(),
                arch: expected.arch.as_deref(),
                current: expected.current.as_deref(),
                keys_version: expected.keys_version,
                retry: &expected.retry,
                reboot: expected.reboot.as_ref(),
            };
            assert_eq!(
                String::from_utf8(serde_json::to_vec(&ours).unwrap()).unwrap(),
                serde_json::to_string(&expected).unwrap(),
                "full: {full}"
            );
        }
    }

    /// The hand reader accepts only what the extractor accepts, reads it
    /// the same, and leaves the odd cases to the extractor.
    #[test]
    fn the_plain_reader_agrees_with_the_extractor() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let plain = [
            format!("arch=amd64&current={d}&nonce=n0nce-123&keys_version=3&serial=17"),
            format!("nonce=abcdefgh&current={}", d.replace(':', "%3A")),
            "arch=arm%2Fv7&nonce=abcdefgh".into(),
            "nonce=abcdefgh&unknown=1&&arch=".into(),
            "nonce=a+b%20c".into(),
            "nonce=abcdefgh&current=".into(),
            "nonce".into(),
        ];
        for q in &plain {
            let ours = ResolveQuery::parse_plain(q);
            assert!(ours.is_some(), "{q}: left to the extractor");
            assert_eq!(ours, general(q), "{q}");
        }
        let odd = [
            "arch=amd64",
            "nonce=abcdefgh&nonce=ijklmnop",
            "nonce=abcdefgh&keys_version=x",
            "nonce=abcdefgh&keys_version=-1",
            "nonce=abcdefgh&serial=",
            "nonce=abc%zzdefgh",
            "nonce=abc%FFdefgh",
            "nonce=abcdefgh&keys%5Fversion=3",
            "no%6Ece=abcdefgh",
        ];
        for q in odd {
            assert_eq!(ResolveQuery::parse_plain(q), None, "{q}: read by hand");
        }
    }
}
