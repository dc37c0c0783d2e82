//! Devices: enrollment with the product's secret and a proof of the
//! device's own key, token renewal with that key, the events they report
//! (which feed the health gate), the fleet view, pinning, and an admin's
//! revoke, reset and delete.

use crate::api::auth::{Admin, DeviceAuth, Viewer, client_ip, constant_time_eq, hash_secret};
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Query, Result};
use crate::infra::registry::PlatformImage;
use crate::infra::revocations::{Revoked, use_proof};
use crate::infra::signing::{SignedDigest, sign_digest};
use crate::paging::{Page, PageParams};
use crate::rules::policy::{Labels, Selector, Term, check_labels};
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_protocol::proof::{ProofError, ProofPurpose, device_key_id, verify_proof};
use sluice_protocol::{
    DeviceProof, DeviceToken, EnrollRequest, EnrollResponse, EventKind, EventRequest,
    ImageSignature, TokenRequest, is_sha256_digest,
};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// A device as the fleet view shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Device {
    /// Server-given id.
    pub id: Uuid,
    /// Its product.
    pub product: String,
    /// Its machine id.
    pub machine_id: String,
    /// The channel it follows.
    pub channel: String,
    /// Its architecture.
    pub arch: String,
    /// Labels.
    pub labels: serde_json::Value,
    /// The version it runs.
    pub current_version: Option<String>,
    /// The digest it runs.
    pub current_digest: Option<String>,
    /// The slot it booted from.
    pub booted_slot: Option<String>,
    /// Where it stands.
    pub status: String,
    /// The version its status is about.
    pub status_version: Option<String>,
    /// Last time it asked or reported.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// The pin overriding its channel, if any.
    pub pin: Option<Pin>,
    /// When it enrolled.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The id of its key (16 hex digits), if it has bound one.
    pub key_id: Option<String>,
    /// An admin reset it: the next enrollment of its machine id binds a new key.
    pub awaiting_enrollment: bool,
    /// When an admin revoked it: its tokens are refused.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Why, as the admin said.
    pub revoked_reason: Option<String>,
}

/// A device's pin.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Pin {
    /// A pinned release version.
    pub version: Option<String>,
    /// A pinned image reference as given.
    pub image: Option<String>,
    /// The digest the image resolved to.
    pub digest: Option<String>,
}

/// One reported event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Increasing id.
    pub id: i64,
    /// When the server received it.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What happened.
    pub kind: String,
    /// About which version.
    pub version: Option<String>,
    /// About which digest.
    pub digest: Option<String>,
    /// Detail.
    pub message: Option<String>,
}

/// A device with its event timeline.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceDetail {
    /// The device.
    #[serde(flatten)]
    pub device: Device,
    /// The slots and agent state it sent with its latest event (agents from
    /// before host status send none).
    pub host: Option<sluice_protocol::HostStatus>,
    /// When it sent them.
    #[serde(with = "time::serde::rfc3339::option")]
    pub host_at: Option<OffsetDateTime>,
    /// Its latest events, newest first (at most 200).
    pub events: Vec<Event>,
    /// Whether it runs its channel's head and, if not, why (the rules
    /// resolve applies); absent when its channel does not exist.
    pub head_status: Option<crate::api::channels::HeadStatus>,
}

/// `{id}` in a device's routes, as `ProductPath` is `{product}`. Transparent,
/// so a bad id is refused in the same words as a bare `Path<Uuid>`.
#[derive(Debug, Deserialize, IntoParams, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
#[into_params(parameter_in = Path)]
#[serde(transparent)]
pub struct DevicePath {
    /// Device id
    pub id: Uuid,
}

/// Filters of `GET /v1/devices`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceFilter {
    /// Product name.
    pub product: Option<String>,
    /// Channel name.
    pub channel: Option<String>,
    /// Current version.
    pub version: Option<String>,
    /// Status.
    pub status: Option<String>,
    /// A label selector: `ring=canary`, or several terms, all of which must
    /// hold: `ring=canary,region!=us`.
    pub label: Option<String>,
    /// Only devices not seen for at least this many seconds.
    pub not_seen_for_s: Option<i64>,
    /// Substring of the machine id or device id.
    pub q: Option<String>,
    /// Only revoked devices (`true`) or only the others (`false`).
    pub revoked: Option<bool>,
}

/// `POST /v1/devices/{id}/revoke`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Why (shown with the device and in the audit log).
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/devices/{id}/retry`: which failures to clear (neither: all).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Only the failures of this release version.
    #[serde(default)]
    pub version: Option<String>,
    /// Only this image digest.
    #[serde(default)]
    pub digest: Option<String>,
}

/// What `POST /v1/devices/{id}/retry` asked the device to forget.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetryResponse {
    /// The failed releases the device will be told to try again.
    pub retry: Vec<FailedImage>,
}

/// A release image that failed on a device.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FailedImage {
    /// Its version.
    pub version: Option<String>,
    /// Its digest.
    pub digest: String,
}

/// `PUT /v1/devices/{id}/pin`: give `version` or `image`, or neither to unpin.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// A release version of the device's product.
    #[serde(default)]
    pub version: Option<String>,
    /// `repo:tag` or `repo@digest` in the product's repository.
    #[serde(default)]
    pub image: Option<String>,
}

/// A platform of an image pin, with its signature.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinPlatform {
    /// The platform.
    #[serde(flatten)]
    pub image: PlatformImage,
    /// The signature over its digest.
    pub signature: ImageSignature,
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enroll))
        .routes(routes!(renew_token))
        .routes(routes!(bind_key))
        .routes(routes!(report_event))
        .routes(routes!(list_devices))
        .routes(routes!(get_device, delete_device))
        .routes(routes!(set_pin))
        .routes(routes!(set_labels))
        .routes(routes!(revoke_device))
        .routes(routes!(reset_device))
        .routes(routes!(retry_failed))
        .routes(routes!(failures_cleared))
}

fn check_text(what: &str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || v.len() > max || v.chars().any(|c| c.is_control()) {
        return Err(Error::BadRequest(format!(
            "{what} must be 1–{max} printable characters"
        )));
    }
    Ok(())
}

/// A proof's refusal as the API answers it.
fn proof_refused(e: ProofError) -> Error {
    match e {
        ProofError::Malformed(m) => Error::BadRequest(format!("proof: {m}")),
        e => Error::Unauthorized(e.to_string()),
    }
}

/// Enrolls a device with its product's enrollment secret and a proof of its
/// own key. A machine id already enrolled is answered only to the same key
/// (the device enrolling again), or to any key once an admin reset it; the
/// secret alone never takes over an enrolled machine id.
#[utoipa::path(post, path = "/v1/devices/enroll", tag = "devices", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse), Problems<400, 401, 403, 404, 409, 429>))]
async fn enroll(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    extensions: axum::http::Extensions,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>> {
    let addr = client_ip(&state.config, &headers, &extensions);
    state.limits.enroll_addr.check(&addr)?;
    check_text("machine_id", &req.machine_id, 256)?;
    check_text("arch", &req.arch, 32)?;
    check_text("channel", &req.channel, 63)?;
    check_labels(&req.labels)?;
    if let Some(d) = &req.current_digest
        && !is_sha256_digest(d)
    {
        return Err(Error::BadRequest(
            "current_digest must be `sha256:<64 hex>`".into(),
        ));
    }
    let Some(proof) = &req.proof else {
        return Err(Error::BadRequest(
            "enrollment needs `proof`, a signature by the device's own key: this agent predates device keys; upgrade sluice-agent".into(),
        ));
    };
    let row = sqlx::query!(
        "SELECT id, enrollment_secret_hash FROM products WHERE name = $1",
        req.product
    )
    .fetch_optional(&state.db)
    .await?;
    // Same answer for an unknown product and a wrong secret: neither is told apart.
    let Some(p) = row.filter(|p| {
        constant_time_eq(
            &p.enrollment_secret_hash,
            &hash_secret(&req.enrollment_secret),
        )
    }) else {
        return Err(Error::Unauthorized(
            "unknown product or wrong enrollment secret".into(),
        ));
    };
    state.limits.enroll_product.check(&p.id)?;
    let public_key = verify_proof(
        proof,
        ProofPurpose::Enroll,
        &req.product,
        &req.machine_id,
        OffsetDateTime::now_utc().unix_timestamp(),
    )
    .map_err(proof_refused)?;
    let channel_exists = sqlx::query_scalar!(
        "SELECT 1 AS one FROM channels WHERE product_id = $1 AND name = $2",
        p.id,
        req.channel
    )
    .fetch_optional(&state.db)
    .await?
    .is_some();
    if !channel_exists {
        return Err(Error::not_found(format!(
            "channel {} of product {}",
            req.channel, req.product
        )));
    }
    // Spent whatever follows: a proof seen once answers nothing again.
    use_proof(&state.db, &proof.signature).await?;
    let labels = serde_json::to_value(&req.labels).map_err(anyhow::Error::from)?;
    let mut tx = state.db.begin().await?;
    let existing = sqlx::query!(
        r#"SELECT id, public_key, rebind_allowed, revoked_at IS NOT NULL AS "revoked!",
                  ceil(extract(epoch FROM tokens_not_before))::bigint AS not_before
           FROM devices WHERE product_id = $1 AND machine_id = $2 FOR UPDATE"#,
        p.id,
        req.machine_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let (id, not_before) = match existing {
        None => {
            let id = sqlx::query_scalar!(
                "INSERT INTO devices (id, product_id, machine_id, channel, arch, labels, current_version, current_digest,
                                      public_key, key_bound_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())
                 ON CONFLICT (product_id, machine_id) DO NOTHING RETURNING id",
                Uuid::new_v4(),
                p.id,
                req.machine_id,
                req.channel,
                req.arch,
                labels,
                req.current_version,
                req.current_digest,
                &public_key[..]
            )
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "machine id {} was enrolled by another request at the same time: retry",
                    req.machine_id
                ))
            })?;
            (id, None)
        }
        Some(d) if d.revoked => {
            return Err(Error::Forbidden(format!(
                "machine id {} of product {} is enrolled as a revoked device: an admin must reset or delete it before it can enroll again",
                req.machine_id, req.product
            )));
        }
        Some(d) if d.public_key.as_deref() == Some(&public_key[..]) || d.rebind_allowed => {
            sqlx::query!(
                "UPDATE devices SET channel = $2, arch = $3, labels = $4,
                    current_version = coalesce($5, current_version), current_digest = coalesce($6, current_digest),
                    public_key = $7, key_bound_at = CASE WHEN rebind_allowed THEN now() ELSE key_bound_at END,
                    rebind_allowed = false, last_seen = now()
                 WHERE id = $1",
                d.id,
                req.channel,
                req.arch,
                labels,
                req.current_version,
                req.current_digest,
                &public_key[..]
            )
            .execute(&mut *tx)
            .await?;
            if d.rebind_allowed {
                audit_by_device(
                    &mut tx,
                    d.id,
                    "device.enroll_after_reset",
                    serde_json::json!({"key_id": device_key_id(&public_key)}),
                )
                .await?;
            }
            (d.id, d.not_before)
        }
        Some(_) => {
            return Err(Error::Conflict(format!(
                "machine id {} of product {} is already enrolled with another device key: an admin must reset that device (`sluice device reset`) before another key can enroll it",
                req.machine_id, req.product
            )));
        }
    };
    tx.commit().await?;
    // Labels select a device's waves, windows and lease group: a labelled
    // device must be seen by the next answer (a new unlabelled one changes
    // nothing the snapshot holds, so enrollments do not reload every server).
    if !req.labels.is_empty() {
        state.cache.invalidate(&req.product);
    }
    let (token, expires_at) = device_token(&state, id, &req.product, &public_key, not_before);
    Ok(Json(EnrollResponse {
        device_id: id.to_string(),
        token,
        expires_at: Some(expires_at),
    }))
}

/// What a token request needs of its device.
struct KeyRow {
    product: String,
    public_key: Option<Vec<u8>>,
    revoked: bool,
    not_before: Option<i64>,
}

async fn key_row(db: impl sqlx::PgExecutor<'_>, id: Uuid, lock: bool) -> Result<KeyRow> {
    // Two spellings, as `FOR UPDATE` cannot be a parameter.
    let row = if lock {
        sqlx::query_as!(
            KeyRow,
            r#"SELECT p.name AS product, d.public_key, d.revoked_at IS NOT NULL AS "revoked!",
                      ceil(extract(epoch FROM d.tokens_not_before))::bigint AS not_before
               FROM devices d JOIN products p ON p.id = d.product_id WHERE d.id = $1 FOR UPDATE OF d"#,
            id
        )
        .fetch_optional(db)
        .await?
    } else {
        sqlx::query_as!(
            KeyRow,
            r#"SELECT p.name AS product, d.public_key, d.revoked_at IS NOT NULL AS "revoked!",
                      ceil(extract(epoch FROM d.tokens_not_before))::bigint AS not_before
               FROM devices d JOIN products p ON p.id = d.product_id WHERE d.id = $1"#,
            id
        )
        .fetch_optional(db)
        .await?
    };
    let row = row.ok_or_else(|| {
        Error::NotFound(format!(
            "device {id} not found: an admin deleted it; enroll again"
        ))
    })?;
    if row.revoked {
        return Err(Error::Forbidden(format!(
            "device {id} is revoked: an admin must reset it before it gets a token again"
        )));
    }
    Ok(row)
}

/// A fresh token for a device that proves it holds its key (purpose
/// `renew`). Needs no bearer token, so an expired one is no obstacle.
#[utoipa::path(post, path = "/v1/devices/{id}/token", tag = "devices", request_body = TokenRequest,
    params(DevicePath),
    responses((status = 200, body = DeviceToken), Problems<400, 401, 403, 404, 409, 429>))]
async fn renew_token(
    State(state): State<AppState>,
    DevicePath { id }: DevicePath,
    Json(req): Json<TokenRequest>,
) -> Result<Json<DeviceToken>> {
    state.limits.device.check(&id)?;
    let d = key_row(&state.db, id, false).await?;
    let Some(bound) = d.public_key else {
        return Err(Error::Conflict(format!(
            "device {id} has no key: bind one with its old token (POST /v1/devices/{id}/key), or, after an admin's reset, enroll again"
        )));
    };
    let public_key = check_proof(&req.proof, ProofPurpose::Renew, &d.product, id)?;
    if bound != public_key {
        return Err(Error::Unauthorized(format!(
            "the proof is not made with device {id}'s key"
        )));
    }
    use_proof(&state.db, &req.proof.signature).await?;
    let (token, expires_at) = device_token(&state, id, &d.product, &public_key, d.not_before);
    Ok(Json(DeviceToken { token, expires_at }))
}

/// A short-lived token for device `id`, bound to its key.
fn device_token(
    state: &AppState,
    id: Uuid,
    product: &str,
    public_key: &[u8; 32],
    not_before: Option<i64>,
) -> (String, OffsetDateTime) {
    state.jwt.issue_device(
        id,
        product,
        &device_key_id(public_key),
        not_before,
        state.config.device_token_ttl_s as i64,
    )
}

fn check_proof(
    proof: &DeviceProof,
    purpose: ProofPurpose,
    product: &str,
    id: Uuid,
) -> Result<[u8; 32]> {
    verify_proof(
        proof,
        purpose,
        product,
        &id.to_string(),
        OffsetDateTime::now_utc().unix_timestamp(),
    )
    .map_err(proof_refused)
}

/// Binds a key to a device enrolled before device keys, with its old token
/// (purpose `bind`), and answers a token for that key; the old token stops
/// working. Binding the key already bound answers a token again; another key
/// is refused (an admin must reset the device).
#[utoipa::path(post, path = "/v1/devices/{id}/key", tag = "devices", request_body = TokenRequest,
    params(DevicePath), security(("bearer" = [])),
    responses((status = 200, body = DeviceToken), Problems<400, 401, 403, 404, 409>))]
async fn bind_key(
    State(state): State<AppState>,
    device: DeviceAuth,
    DevicePath { id }: DevicePath,
    Json(req): Json<TokenRequest>,
) -> Result<Json<DeviceToken>> {
    if device.id != id {
        return Err(Error::Forbidden(
            "a device may only bind its own key".into(),
        ));
    }
    let mut tx = state.db.begin().await?;
    let d = key_row(&mut *tx, id, true).await?;
    let public_key = check_proof(&req.proof, ProofPurpose::Bind, &d.product, id)?;
    match &d.public_key {
        Some(bound) if bound[..] == public_key[..] => {}
        Some(_) => {
            return Err(Error::Conflict(format!(
                "device {id} already has another key: an admin must reset it"
            )));
        }
        None => {
            sqlx::query!(
                "UPDATE devices SET public_key = $2, key_bound_at = now() WHERE id = $1",
                id,
                &public_key[..]
            )
            .execute(&mut *tx)
            .await?;
            audit_by_device(
                &mut tx,
                id,
                "device.bind_key",
                serde_json::json!({"key_id": device_key_id(&public_key)}),
            )
            .await?;
        }
    }
    use_proof(&state.db, &req.proof.signature).await?;
    tx.commit().await?;
    let (token, expires_at) = device_token(&state, id, &d.product, &public_key, d.not_before);
    Ok(Json(DeviceToken { token, expires_at }))
}

/// A device reports what happened; outcomes on a channel's head feed its health gate.
#[utoipa::path(post, path = "/v1/devices/{id}/events", tag = "devices", request_body = EventRequest,
    params(DevicePath), security(("bearer" = [])),
    responses((status = 204), Problems<400, 401, 403, 404>))]
async fn report_event(
    State(state): State<AppState>,
    device: DeviceAuth,
    DevicePath { id }: DevicePath,
    Json(req): Json<EventRequest>,
) -> Result<StatusCode> {
    if device.id != id {
        return Err(Error::Forbidden(
            "a device may only report about itself".into(),
        ));
    }
    check_text("version", &req.version, 128)?;
    if !is_sha256_digest(&req.digest) {
        return Err(Error::BadRequest("digest must be `sha256:<64 hex>`".into()));
    }
    if let Some(m) = &req.message
        && m.len() > 4096
    {
        return Err(Error::BadRequest(
            "message must be at most 4096 bytes".into(),
        ));
    }
    if let Some(s) = &req.booted_slot
        && s != "A"
        && s != "B"
    {
        return Err(Error::BadRequest("booted_slot must be `A` or `B`".into()));
    }
    if let Some(h) = &req.host {
        check_host(h)?;
    }
    let host = req
        .host
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| Error::Internal(anyhow::anyhow!("host status: {e}")))?;
    // Outcomes count for the health gate only for what the device was told
    // to install. The offer may still wait in the check-in batch: write it
    // first (only when the report names something not yet recorded).
    let offer = format!("{}@{}", req.version, req.digest);
    let seen = sqlx::query!(
        r#"SELECT $2 = ANY(offered) AS "offered!", $3 = ANY(retry_digests) AS "retry!"
           FROM devices WHERE id = $1"#,
        id,
        offer,
        req.digest
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| Error::not_found(format!("device {id}")))?;
    if !seen.offered {
        state.checkins.flush().await;
    }
    let mut tx = state.db.begin().await?;
    let healthy = req.kind == EventKind::Healthy;
    let d = sqlx::query!(
        r#"UPDATE devices SET status = $2, status_version = $3, last_seen = now(),
            current_version = CASE WHEN $4 THEN $3 ELSE current_version END,
            current_digest = CASE WHEN $4 THEN $5 ELSE current_digest END,
            booted_slot = coalesce($6, booted_slot),
            status_offered = $7 = ANY(offered),
            host = coalesce($8, host),
            host_at = CASE WHEN $8::jsonb IS NULL THEN host_at ELSE now() END,
            -- The device acts on the digest: an admin's retry of it is spent.
            retry_digests = array_remove(retry_digests, $5)
         WHERE id = $1 RETURNING product_id, channel, status_offered"#,
        id,
        req.kind.status().as_str(),
        req.version,
        healthy,
        req.digest,
        req.booted_slot,
        offer,
        host
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::not_found(format!("device {id}")))?;
    sqlx::query!(
        "INSERT INTO device_events (device_id, kind, version, digest, message) VALUES ($1, $2, $3, $4, $5)",
        id,
        req.kind.as_str(),
        req.version,
        req.digest,
        req.message
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if seen.retry {
        state.cache.invalidate(&device.product);
    }
    if d.status_offered && req.kind.is_outcome() {
        crate::api::channels::check_gate(&state, d.product_id, &device.product, &d.channel).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A host status is the device's word about itself: bounded like the rest
/// of a report, so it cannot fill the database or the dashboard.
fn check_host(h: &sluice_protocol::HostStatus) -> Result<()> {
    const STATES: [&str; 5] = ["idle", "writing", "ready", "staged", "failed"];
    if !STATES.contains(&h.state.as_str()) {
        return Err(Error::BadRequest(format!(
            "host.state must be one of {}",
            STATES.join(", ")
        )));
    }
    for (name, slot) in [
        ("booted", &h.booted),
        ("staged", &h.staged),
        ("rollback", &h.rollback),
    ] {
        let Some(slot) = slot else { continue };
        if slot.slot != "A" && slot.slot != "B" {
            return Err(Error::BadRequest(format!(
                "host.{name}.slot must be `A` or `B`"
            )));
        }
        if let Some(v) = &slot.version {
            check_text(&format!("host.{name}.version"), v, 128)?;
        }
        if let Some(d) = &slot.digest
            && !is_sha256_digest(d)
        {
            return Err(Error::BadRequest(format!(
                "host.{name}.digest must be `sha256:<64 hex>`"
            )));
        }
    }
    Ok(())
}

struct DeviceRow {
    id: Uuid,
    product: String,
    machine_id: String,
    channel: String,
    arch: String,
    labels: serde_json::Value,
    current_version: Option<String>,
    current_digest: Option<String>,
    booted_slot: Option<String>,
    status: String,
    status_version: Option<String>,
    last_seen: OffsetDateTime,
    pin_version: Option<String>,
    pin_image: Option<String>,
    pin_digest: Option<String>,
    created_at: OffsetDateTime,
    public_key: Option<Vec<u8>>,
    rebind_allowed: bool,
    revoked_at: Option<OffsetDateTime>,
    revoked_reason: Option<String>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        let pin = (r.pin_version.is_some() || r.pin_image.is_some()).then_some(Pin {
            version: r.pin_version,
            image: r.pin_image,
            digest: r.pin_digest,
        });
        Device {
            id: r.id,
            product: r.product,
            machine_id: r.machine_id,
            channel: r.channel,
            arch: r.arch,
            labels: r.labels,
            current_version: r.current_version,
            current_digest: r.current_digest,
            booted_slot: r.booted_slot,
            status: r.status,
            status_version: r.status_version,
            last_seen: r.last_seen,
            pin,
            created_at: r.created_at,
            key_id: r
                .public_key
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .map(|k| device_key_id(&k)),
            awaiting_enrollment: r.rebind_allowed,
            revoked_at: r.revoked_at,
            revoked_reason: r.revoked_reason,
        }
    }
}

/// A label selector as the devices query takes it: the labels a device must
/// have (one object, for `@>` on the GIN index), and those it must not
/// (one object per `key!=value`).
fn selector_filter(
    selector: Option<&str>,
) -> Result<(Option<serde_json::Value>, Vec<serde_json::Value>)> {
    let Some(s) = selector else {
        return Ok((None, Vec::new()));
    };
    let selector =
        Selector::parse(s).map_err(|e| Error::BadRequest(format!("label filter {s:?}: {e}")))?;
    let mut has = serde_json::Map::new();
    let mut has_not = Vec::new();
    for t in selector.terms {
        match t {
            Term::Is(k, v) => {
                has.insert(k, v.into());
            }
            Term::IsNot(k, v) => has_not.push(serde_json::json!({ k: v })),
        }
    }
    Ok((Some(has.into()), has_not))
}

/// `PUT /v1/devices/{id}/labels`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelsRequest {
    /// The device's labels, replacing what it had (`{}` removes them all).
    pub labels: Labels,
}

/// Sets a device's labels (what rollout waves, maintenance windows and
/// reboot-lease groups select by). The agent's `labels` in `agent.toml`
/// are given at enrollment; an admin's change holds until the device
/// enrolls again.
#[utoipa::path(put, path = "/v1/devices/{id}/labels", tag = "devices", request_body = LabelsRequest,
    params(DevicePath), security(("bearer" = [])),
    responses((status = 200, body = Device), Problems<400, 401, 403, 404>))]
async fn set_labels(
    State(state): State<AppState>,
    Admin(who): Admin,
    DevicePath { id }: DevicePath,
    Json(req): Json<LabelsRequest>,
) -> Result<Json<Device>> {
    check_labels(&req.labels)?;
    let before = fetch_device(&state.db, id).await?;
    let labels = serde_json::to_value(&req.labels).map_err(anyhow::Error::from)?;
    let mut tx = state.db.begin().await?;
    sqlx::query!("UPDATE devices SET labels = $2 WHERE id = $1", id, labels)
        .execute(&mut *tx)
        .await?;
    crate::api::audit::record(
        &mut *tx,
        &who,
        "device.labels",
        &format!("device:{id}"),
        Some(before.labels.clone()),
        Some(labels),
    )
    .await?;
    tx.commit().await?;
    state.cache.invalidate(&before.product);
    Ok(Json(fetch_device(&state.db, id).await?))
}

/// The fleet, filtered, in pages.
#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(DeviceFilter, PageParams), security(("bearer" = [])),
    responses((status = 200, body = Page<Device>), Problems<400, 401, 403>))]
async fn list_devices(
    State(state): State<AppState>,
    _v: Viewer,
    Query(f): Query<DeviceFilter>,
    Query(page): Query<PageParams>,
) -> Result<Json<Page<Device>>> {
    let limit = page.limit();
    let cursor: Option<Uuid> = page
        .cursor
        .as_deref()
        .map(|c| {
            c.parse().map_err(|_| {
                Error::BadRequest(format!(
                    "invalid cursor {c:?}: pass `next_cursor` from the previous page"
                ))
            })
        })
        .transpose()?;
    if f.not_seen_for_s
        .is_some_and(|s| !(0..=10 * 365 * 86_400).contains(&s))
    {
        return Err(Error::BadRequest(
            "not_seen_for_s must be between 0 and ten years in seconds".into(),
        ));
    }
    let (has, has_not) = selector_filter(f.label.as_deref())?;
    let rows = sqlx::query_as!(
        DeviceRow,
        r#"SELECT d.id, p.name AS product, d.machine_id, d.channel, d.arch, d.labels, d.current_version, d.current_digest,
                  d.booted_slot, d.status, d.status_version, d.last_seen, d.pin_version, d.pin_image, d.pin_digest, d.created_at,
                  d.public_key, d.rebind_allowed, d.revoked_at, d.revoked_reason
           FROM devices d JOIN products p ON p.id = d.product_id
           WHERE ($1::uuid IS NULL OR d.id > $1)
             AND ($2::text IS NULL OR p.name = $2)
             AND ($3::text IS NULL OR d.channel = $3)
             AND ($4::text IS NULL OR d.current_version = $4)
             AND ($5::text IS NULL OR d.status = $5)
             AND ($6::jsonb IS NULL OR d.labels @> $6) AND NOT (d.labels @> ANY($7::jsonb[]))
             AND ($8::bigint IS NULL OR d.last_seen < now() - make_interval(secs => $8))
             AND ($9::text IS NULL OR strpos(d.machine_id, $9) > 0 OR strpos(d.id::text, $9) > 0)
             AND ($11::bool IS NULL OR (d.revoked_at IS NOT NULL) = $11)
           ORDER BY d.id LIMIT $10"#,
        cursor,
        f.product,
        f.channel,
        f.version,
        f.status,
        has,
        &has_not as &[serde_json::Value],
        f.not_seen_for_s.map(|s| s as f64) as Option<f64>,
        f.q,
        limit + 1,
        f.revoked
    )
    .fetch_all(&state.db)
    .await?;
    let page = Page::from_rows(rows, limit, |r| r.id.to_string());
    Ok(Json(Page {
        items: page.items.into_iter().map(Device::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

async fn fetch_device(db: impl sqlx::PgExecutor<'_>, id: Uuid) -> Result<Device> {
    sqlx::query_as!(
        DeviceRow,
        r#"SELECT d.id, p.name AS product, d.machine_id, d.channel, d.arch, d.labels, d.current_version, d.current_digest,
                  d.booted_slot, d.status, d.status_version, d.last_seen, d.pin_version, d.pin_image, d.pin_digest, d.created_at,
                  d.public_key, d.rebind_allowed, d.revoked_at, d.revoked_reason
           FROM devices d JOIN products p ON p.id = d.product_id WHERE d.id = $1"#,
        id
    )
    .fetch_optional(db)
    .await?
    .map(Device::from)
    .ok_or_else(|| Error::not_found(format!("device {id}")))
}

/// A device with its event timeline.
#[utoipa::path(get, path = "/v1/devices/{id}", tag = "devices",
    params(DevicePath), security(("bearer" = [])),
    responses((status = 200, body = DeviceDetail), Problems<400, 401, 403, 404>))]
async fn get_device(
    State(state): State<AppState>,
    _v: Viewer,
    DevicePath { id }: DevicePath,
) -> Result<Json<DeviceDetail>> {
    let device = fetch_device(&state.db, id).await?;
    let events = sqlx::query_as!(
        Event,
        "SELECT id, at, kind, version, digest, message FROM device_events WHERE device_id = $1 ORDER BY id DESC LIMIT 200",
        id
    )
    .fetch_all(&state.db)
    .await?;
    let row = sqlx::query!("SELECT host, host_at FROM devices WHERE id = $1", id)
        .fetch_optional(&state.db)
        .await?;
    let (host, host_at) = match row {
        Some(r) => (
            // Stored only after `check_host`; a row that no longer parses
            // (a future agent's fields) shows as unknown rather than failing.
            r.host.and_then(|h| serde_json::from_value(h).ok()),
            r.host_at,
        ),
        None => (None, None),
    };
    let head_status =
        crate::api::channels::head_status_of(&state, &device.product, &device.channel, id).await?;
    Ok(Json(DeviceDetail {
        device,
        host,
        host_at,
        events,
        head_status,
    }))
}

/// Pins a device to a release or an image, or unpins it (neither given).
#[utoipa::path(put, path = "/v1/devices/{id}/pin", tag = "devices", request_body = PinRequest,
    params(DevicePath), security(("bearer" = [])),
    responses((status = 200, body = Device), Problems<400, 401, 403, 404, 409, 422, 503>))]
async fn set_pin(
    State(state): State<AppState>,
    Admin(who): Admin,
    DevicePath { id }: DevicePath,
    Json(req): Json<PinRequest>,
) -> Result<Json<Device>> {
    let before = fetch_device(&state.db, id).await?;
    let p = crate::api::products::load(&state.db, &before.product).await?;
    let (version, image, digest, platforms, sigs) = match (&req.version, &req.image) {
        (Some(_), Some(_)) => {
            return Err(Error::BadRequest(
                "give `version` or `image`, not both".into(),
            ));
        }
        (None, None) => (None, None, None, None, vec![]),
        (Some(v), None) => {
            let r = crate::api::releases::load(&state.db, p.id, &p.name, v).await?;
            if r.state == "revoked" {
                return Err(Error::Conflict(format!(
                    "release {v} is revoked and cannot be pinned"
                )));
            }
            (Some(v.clone()), None, Some(r.digest), None, vec![])
        }
        (None, Some(img)) => {
            let reference = crate::infra::registry::parse_reference(img)?;
            if reference.repository != p.repository {
                return Err(Error::BadRequest(format!(
                    "image {img} is outside product {}'s repository {}",
                    p.name, p.repository
                )));
            }
            let resolved = state.registry.resolve(&reference).await?;
            let key = state.keys.image_key();
            let label = pin_version_label(&resolved.digest);
            let mut platforms = Vec::new();
            let mut sigs = Vec::new();
            for pl in &resolved.platforms {
                let signature = sign_digest(&key, &p.repository, &pl.digest, &p.name, &label)?;
                sigs.push(SignedDigest {
                    digest: pl.digest.clone(),
                    signature: signature.clone(),
                });
                platforms.push(PinPlatform {
                    image: pl.clone(),
                    signature,
                });
            }
            (
                None,
                Some(img.clone()),
                Some(resolved.digest),
                Some(platforms),
                sigs,
            )
        }
    };
    let mut tx = state.db.begin().await?;
    sqlx::query!(
        "UPDATE devices SET pin_version = $2, pin_image = $3, pin_digest = $4, pin_platforms = $5 WHERE id = $1",
        id,
        version,
        image,
        digest,
        platforms.map(|p| serde_json::to_value(p).unwrap_or_default())
    )
    .execute(&mut *tx)
    .await?;
    let after = serde_json::json!({"version": version, "image": image, "digest": digest});
    crate::api::audit::record(
        &mut *tx,
        &who,
        "device.pin",
        &format!("device:{id}"),
        Some(serde_json::to_value(&before.pin).unwrap_or_default()),
        Some(after),
    )
    .await?;
    if !sigs.is_empty() {
        state.registry.push_signatures(&p.repository, &sigs).await?;
    }
    tx.commit().await?;
    state.cache.invalidate(&p.name);
    Ok(Json(fetch_device(&state.db, id).await?))
}

/// What the audit log keeps of a device.
fn summary(d: &Device) -> serde_json::Value {
    serde_json::json!({
        "product": d.product, "machine_id": d.machine_id, "channel": d.channel,
        "key_id": d.key_id, "revoked_at": d.revoked_at.map(|t| t.unix_timestamp()),
        "revoked_reason": d.revoked_reason, "awaiting_enrollment": d.awaiting_enrollment,
    })
}

/// Revokes a device: every token it holds is refused at once, it gets no
/// new one, and its machine id cannot enroll again until an admin resets
/// or deletes it. Revoking a revoked device changes nothing.
#[utoipa::path(post, path = "/v1/devices/{id}/revoke", tag = "devices", request_body = RevokeRequest,
    params(DevicePath), security(("bearer" = [])),
    responses((status = 200, body = Device), Problems<400, 401, 403, 404>))]
async fn revoke_device(
    State(state): State<AppState>,
    Admin(who): Admin,
    DevicePath { id }: DevicePath,
    Json(req): Json<RevokeRequest>,
) -> Result<Json<Device>> {
    if let Some(r) = &req.reason {
        check_text("reason", r, 500)?;
    }
    let before = fetch_device(&state.db, id).await?;
    let mut tx = state.db.begin().await?;
    sqlx::query!(
        "UPDATE devices SET revoked_at = coalesce(revoked_at, now()),
            revoked_reason = CASE WHEN revoked_at IS NULL THEN $2 ELSE revoked_reason END
         WHERE id = $1",
        id,
        req.reason
    )
    .execute(&mut *tx)
    .await?;
    let after = fetch_device(&mut *tx, id).await?;
    audit(&mut tx, &who, "device.revoke", &before, Some(&after)).await?;
    tx.commit().await?;
    state.revocations.set(id, Some(Revoked::Revoked));
    Ok(Json(after))
}

/// Most digests a device holds as failed (the agent keeps as many).
const MAX_FAILED: usize = 16;

/// The device's images that failed and were not cleared since: their
/// latest outcome is `failed` or `rolled_back`.
async fn failed_images(db: impl sqlx::PgExecutor<'_>, id: Uuid) -> Result<Vec<FailedImage>> {
    let rows = sqlx::query!(
        r#"SELECT digest AS "digest!", version, kind FROM (
             SELECT DISTINCT ON (digest) digest, version, kind, id FROM device_events
             WHERE device_id = $1 AND digest IS NOT NULL
               AND (kind = ANY($2) OR kind = 'failure_cleared')
             ORDER BY digest, id DESC) latest
           WHERE kind = ANY($3) ORDER BY id DESC"#,
        id,
        &EventKind::names(&EventKind::OUTCOMES) as &[&str],
        &EventKind::names(&EventKind::FAILURES) as &[&str]
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| FailedImage {
            version: r.version,
            digest: r.digest,
        })
        .collect())
}

/// Asks a device to try again a release that failed its boot assessment
/// there. A device never installs a digest it holds as failed; this clears
/// that mark (all of them, or one version's or digest's) through the next
/// answer it gets. The device confirms with a `failure_cleared` event. For
/// when the cause was outside the release (a power cut during the trial, a
/// health check that was wrong). Audited.
#[utoipa::path(post, path = "/v1/devices/{id}/retry", tag = "devices", request_body = RetryRequest,
    params(DevicePath), security(("bearer" = [])),
    responses((status = 200, body = RetryResponse), Problems<400, 401, 403, 404, 409>))]
async fn retry_failed(
    State(state): State<AppState>,
    Admin(who): Admin,
    DevicePath { id }: DevicePath,
    Json(req): Json<RetryRequest>,
) -> Result<Json<RetryResponse>> {
    if let Some(v) = &req.version {
        check_text("version", v, 128)?;
    }
    if let Some(d) = &req.digest
        && !is_sha256_digest(d)
    {
        return Err(Error::BadRequest("digest must be `sha256:<64 hex>`".into()));
    }
    let device = fetch_device(&state.db, id).await?;
    let mut tx = state.db.begin().await?;
    let mut failed = failed_images(&mut *tx, id).await?;
    failed.retain(|f| {
        req.version
            .as_ref()
            .is_none_or(|v| f.version.as_ref() == Some(v))
            && req.digest.as_ref().is_none_or(|d| &f.digest == d)
    });
    failed.truncate(MAX_FAILED);
    if failed.is_empty() {
        let what = match (&req.version, &req.digest) {
            (Some(v), _) => format!("release {v}"),
            (None, Some(d)) => format!("image {d}"),
            (None, None) => "release".into(),
        };
        return Err(Error::Conflict(format!(
            "device {id} has no failed {what} to try again (it reported none, or cleared it since)"
        )));
    }
    let digests: Vec<String> = failed.iter().map(|f| f.digest.clone()).collect();
    sqlx::query!(
        "UPDATE devices SET retry_digests = (
             SELECT coalesce(array_agg(DISTINCT d), '{}') FROM unnest(retry_digests || $2::text[]) d)
         WHERE id = $1",
        id,
        &digests
    )
    .execute(&mut *tx)
    .await?;
    crate::api::audit::record(
        &mut *tx,
        &who,
        "device.retry",
        &format!("device:{id}"),
        None,
        Some(serde_json::json!({ "retry": &failed })),
    )
    .await?;
    tx.commit().await?;
    state.cache.invalidate(&device.product);
    Ok(Json(RetryResponse { retry: failed }))
}

/// A device says it no longer holds digests as failed: because an answer
/// asked it to (`by: admin`), or someone ran `sluice-agent clear-failed` on
/// it (`by: local`). Recorded as `failure_cleared` events and in the audit log.
#[utoipa::path(post, path = "/v1/devices/{id}/failures/cleared", tag = "devices",
    request_body = sluice_protocol::FailuresCleared,
    params(DevicePath), security(("bearer" = [])),
    responses((status = 204), Problems<400, 401, 403, 404>))]
async fn failures_cleared(
    State(state): State<AppState>,
    device: DeviceAuth,
    DevicePath { id }: DevicePath,
    Json(req): Json<sluice_protocol::FailuresCleared>,
) -> Result<StatusCode> {
    if device.id != id {
        return Err(Error::Forbidden(
            "a device may only report about itself".into(),
        ));
    }
    if req.digests.is_empty() || req.digests.len() > MAX_FAILED {
        return Err(Error::BadRequest(format!(
            "digests must list 1 to {MAX_FAILED} image digests"
        )));
    }
    if let Some(d) = req.digests.iter().find(|d| !is_sha256_digest(d)) {
        return Err(Error::BadRequest(format!(
            "digests: {d:?} is not `sha256:<64 hex>`"
        )));
    }
    let (by, message) = match req.by {
        sluice_protocol::ClearedBy::Admin => ("admin", "cleared as an admin asked (retry)"),
        sluice_protocol::ClearedBy::Local => {
            ("local", "cleared on the device (sluice-agent clear-failed)")
        }
    };
    let mut tx = state.db.begin().await?;
    let changed = sqlx::query_scalar!(
        r#"UPDATE devices d SET retry_digests = (
             SELECT coalesce(array_agg(x), '{}') FROM unnest(d.retry_digests) x WHERE x <> ALL($2::text[]))
           FROM devices old WHERE d.id = $1 AND old.id = d.id
           RETURNING old.retry_digests && $2::text[] AS "changed!""#,
        id,
        &req.digests
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::not_found(format!("device {id}")))?;
    sqlx::query!(
        r#"INSERT INTO device_events (device_id, kind, version, digest, message)
           SELECT $1, 'failure_cleared',
                  (SELECT e.version FROM device_events e WHERE e.device_id = $1 AND e.digest = d
                   AND e.version IS NOT NULL ORDER BY e.id DESC LIMIT 1),
                  d, $3
           FROM unnest($2::text[]) d"#,
        id,
        &req.digests,
        message
    )
    .execute(&mut *tx)
    .await?;
    audit_by_device(
        &mut tx,
        id,
        "device.failure_cleared",
        serde_json::json!({ "digests": req.digests, "by": by }),
    )
    .await?;
    tx.commit().await?;
    if changed {
        state.cache.invalidate(&device.product);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Records an admin's change of a device in the audit log, as the summaries
/// Records a change a device made to itself (enrolling after a reset,
/// binding its key, confirming cleared failures).
async fn audit_by_device(
    tx: &mut sqlx::PgConnection,
    id: Uuid,
    action: &str,
    after: serde_json::Value,
) -> Result<()> {
    let device = format!("device:{id}");
    crate::infra::audit::record_as(tx, device.as_str(), action, &device, None, Some(after)).await
}

/// before and after (none: deleted).
async fn audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    who: &crate::api::auth::Principal,
    action: &str,
    before: &Device,
    after: Option<&Device>,
) -> Result<()> {
    crate::api::audit::record(
        &mut **tx,
        who,
        action,
        &format!("device:{}", before.id),
        Some(summary(before)),
        after.map(summary),
    )
    .await
}

/// Resets a device: its key is forgotten, any revocation lifted, the tokens
/// it holds refused, and the next enrollment of its machine id (with the
/// product's secret and a proof of a new key) binds that key to this device,
/// keeping its id, pin and history. For a device that lost its key
/// (reinstalled) or was revoked by mistake.
#[utoipa::path(post, path = "/v1/devices/{id}/reset", tag = "devices",
    params(DevicePath), security(("bearer" = [])),
    responses((status = 200, body = Device), Problems<400, 401, 403, 404>))]
async fn reset_device(
    State(state): State<AppState>,
    Admin(who): Admin,
    DevicePath { id }: DevicePath,
) -> Result<Json<Device>> {
    let before = fetch_device(&state.db, id).await?;
    let mut tx = state.db.begin().await?;
    let not_before = sqlx::query_scalar!(
        r#"UPDATE devices SET public_key = NULL, key_bound_at = NULL, rebind_allowed = true,
            revoked_at = NULL, revoked_reason = NULL, tokens_not_before = now()
         WHERE id = $1 RETURNING ceil(extract(epoch FROM tokens_not_before))::bigint AS "not_before!""#,
        id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::not_found(format!("device {id}")))?;
    let after = fetch_device(&mut *tx, id).await?;
    audit(&mut tx, &who, "device.reset", &before, Some(&after)).await?;
    tx.commit().await?;
    state
        .revocations
        .set(id, Some(Revoked::ResetAt(not_before)));
    Ok(Json(after))
}

/// Deletes a device and its events: its tokens are refused at once. Its
/// machine id may enroll again, as a new device; to keep a machine out,
/// revoke it instead.
#[utoipa::path(delete, path = "/v1/devices/{id}", tag = "devices",
    params(DevicePath), security(("bearer" = [])),
    responses((status = 204), Problems<400, 401, 403, 404>))]
async fn delete_device(
    State(state): State<AppState>,
    Admin(who): Admin,
    DevicePath { id }: DevicePath,
) -> Result<StatusCode> {
    let before = fetch_device(&state.db, id).await?;
    let mut tx = state.db.begin().await?;
    sqlx::query!("DELETE FROM device_events WHERE device_id = $1", id)
        .execute(&mut *tx)
        .await?;
    let gone = sqlx::query!("DELETE FROM devices WHERE id = $1", id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if gone == 0 {
        return Err(Error::not_found(format!("device {id}")));
    }
    sqlx::query!(
        "INSERT INTO device_tombstones (id) VALUES ($1) ON CONFLICT DO NOTHING",
        id
    )
    .execute(&mut *tx)
    .await?;
    audit(&mut tx, &who, "device.delete", &before, None).await?;
    tx.commit().await?;
    state.revocations.set(id, Some(Revoked::Deleted));
    if before.pin.is_some() {
        state.cache.invalidate(&before.product);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The version an image pin is offered (and signed) as: not a release, so it
/// names the digest it stands for.
pub fn pin_version_label(digest: &str) -> String {
    format!("0.0.0-pin-{}", &digest[7..19])
}
