//! Devices: enrollment with the product's secret, the events they report
//! (which feed the health gate), the fleet view, and pinning.

use crate::app::AppState;
use crate::auth::{Admin, DeviceAuth, Viewer, constant_time_eq, hash_secret};
use crate::error::{Error, Json, Path, Query, Result};
use crate::paging::{Page, PageParams};
use crate::registry::PlatformImage;
use crate::signing::{SignedDigest, sign_digest};
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_protocol::{
    EnrollRequest, EnrollResponse, EventKind, EventRequest, ImageSignature, is_sha256_digest,
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
    /// Its latest events, newest first (at most 200).
    pub events: Vec<Event>,
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
    /// A label as `key=value`.
    pub label: Option<String>,
    /// Only devices not seen for at least this many seconds.
    pub not_seen_for_s: Option<i64>,
    /// Substring of the machine id or device id.
    pub q: Option<String>,
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
        .routes(routes!(report_event))
        .routes(routes!(list_devices))
        .routes(routes!(get_device))
        .routes(routes!(set_pin))
}

fn check_text(what: &str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || v.len() > max || v.chars().any(|c| c.is_control()) {
        return Err(Error::BadRequest(format!(
            "{what} must be 1–{max} printable characters"
        )));
    }
    Ok(())
}

/// Enrolls a device with its product's enrollment secret; enrolling again
/// with the same machine id answers the same device.
#[utoipa::path(post, path = "/v1/devices/enroll", tag = "devices", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 404, body = crate::error::Problem)))]
async fn enroll(
    State(state): State<AppState>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>> {
    check_text("machine_id", &req.machine_id, 256)?;
    check_text("arch", &req.arch, 32)?;
    check_text("channel", &req.channel, 63)?;
    if let Some(d) = &req.current_digest
        && !is_sha256_digest(d)
    {
        return Err(Error::BadRequest(
            "current_digest must be `sha256:<64 hex>`".into(),
        ));
    }
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
    let labels = serde_json::to_value(&req.labels).map_err(anyhow::Error::from)?;
    let id = sqlx::query_scalar!(
        "INSERT INTO devices (id, product_id, machine_id, channel, arch, labels, current_version, current_digest)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (product_id, machine_id) DO UPDATE SET channel = EXCLUDED.channel, arch = EXCLUDED.arch,
            labels = EXCLUDED.labels,
            current_version = coalesce(EXCLUDED.current_version, devices.current_version),
            current_digest = coalesce(EXCLUDED.current_digest, devices.current_digest), last_seen = now()
         RETURNING id",
        Uuid::new_v4(),
        p.id,
        req.machine_id,
        req.channel,
        req.arch,
        labels,
        req.current_version,
        req.current_digest
    )
    .fetch_one(&state.db)
    .await?;
    let token = state.jwt.issue_device(id, &req.product);
    Ok(Json(EnrollResponse {
        device_id: id.to_string(),
        token,
    }))
}

/// A device reports what happened; outcomes on a channel's head feed its health gate.
#[utoipa::path(post, path = "/v1/devices/{id}/events", tag = "devices", request_body = EventRequest,
    params(("id" = Uuid, Path, description = "Device id")), security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::error::Problem), (status = 401, body = crate::error::Problem),
              (status = 403, body = crate::error::Problem), (status = 404, body = crate::error::Problem)))]
async fn report_event(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path(id): Path<Uuid>,
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
    let mut tx = state.db.begin().await?;
    let healthy = req.kind == EventKind::Healthy;
    let d = sqlx::query!(
        "UPDATE devices SET status = $2, status_version = $3, last_seen = now(),
            current_version = CASE WHEN $4 THEN $3 ELSE current_version END,
            current_digest = CASE WHEN $4 THEN $5 ELSE current_digest END,
            booted_slot = coalesce($6, booted_slot)
         WHERE id = $1 RETURNING product_id, channel",
        id,
        req.kind.status().as_str(),
        req.version,
        healthy,
        req.digest,
        req.booted_slot
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
    if matches!(
        req.kind,
        EventKind::Healthy | EventKind::Failed | EventKind::RolledBack
    ) {
        crate::channels::check_gate(&state, d.product_id, &device.product, &d.channel).await?;
    }
    Ok(StatusCode::NO_CONTENT)
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
        }
    }
}

/// The fleet, filtered, in pages.
#[utoipa::path(get, path = "/v1/devices", tag = "devices", params(DeviceFilter, PageParams), security(("bearer" = [])),
    responses((status = 200, body = Page<Device>), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem)))]
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
    let (label_key, label_value) = match f.label.as_deref() {
        None => (None, None),
        Some(l) => match l.split_once('=') {
            Some((k, v)) => (Some(k.to_string()), Some(v.to_string())),
            None => {
                return Err(Error::BadRequest(format!(
                    "label filter {l:?} must be `key=value`"
                )));
            }
        },
    };
    let rows = sqlx::query_as!(
        DeviceRow,
        r#"SELECT d.id, p.name AS product, d.machine_id, d.channel, d.arch, d.labels, d.current_version, d.current_digest,
                  d.booted_slot, d.status, d.status_version, d.last_seen, d.pin_version, d.pin_image, d.pin_digest, d.created_at
           FROM devices d JOIN products p ON p.id = d.product_id
           WHERE ($1::uuid IS NULL OR d.id > $1)
             AND ($2::text IS NULL OR p.name = $2)
             AND ($3::text IS NULL OR d.channel = $3)
             AND ($4::text IS NULL OR d.current_version = $4)
             AND ($5::text IS NULL OR d.status = $5)
             AND ($6::text IS NULL OR d.labels ->> $6 = $7)
             AND ($8::bigint IS NULL OR d.last_seen < now() - make_interval(secs => $8))
             AND ($9::text IS NULL OR strpos(d.machine_id, $9) > 0 OR strpos(d.id::text, $9) > 0)
           ORDER BY d.id LIMIT $10"#,
        cursor,
        f.product,
        f.channel,
        f.version,
        f.status,
        label_key,
        label_value,
        f.not_seen_for_s.map(|s| s as f64) as Option<f64>,
        f.q,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let page = Page::from_rows(rows, limit, |r| r.id.to_string());
    Ok(Json(Page {
        items: page.items.into_iter().map(Device::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

async fn fetch_device(db: &sqlx::PgPool, id: Uuid) -> Result<Device> {
    sqlx::query_as!(
        DeviceRow,
        r#"SELECT d.id, p.name AS product, d.machine_id, d.channel, d.arch, d.labels, d.current_version, d.current_digest,
                  d.booted_slot, d.status, d.status_version, d.last_seen, d.pin_version, d.pin_image, d.pin_digest, d.created_at
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
    params(("id" = Uuid, Path, description = "Device id")), security(("bearer" = [])),
    responses((status = 200, body = DeviceDetail), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem)))]
async fn get_device(
    State(state): State<AppState>,
    _v: Viewer,
    Path(id): Path<Uuid>,
) -> Result<Json<DeviceDetail>> {
    let device = fetch_device(&state.db, id).await?;
    let events = sqlx::query_as!(
        Event,
        "SELECT id, at, kind, version, digest, message FROM device_events WHERE device_id = $1 ORDER BY id DESC LIMIT 200",
        id
    )
    .fetch_all(&state.db)
    .await?;
    Ok(Json(DeviceDetail { device, events }))
}

/// Pins a device to a release or an image, or unpins it (neither given).
#[utoipa::path(put, path = "/v1/devices/{id}/pin", tag = "devices", request_body = PinRequest,
    params(("id" = Uuid, Path, description = "Device id")), security(("bearer" = [])),
    responses((status = 200, body = Device), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem), (status = 503, body = crate::error::Problem)))]
async fn set_pin(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(id): Path<Uuid>,
    Json(req): Json<PinRequest>,
) -> Result<Json<Device>> {
    let before = fetch_device(&state.db, id).await?;
    let p = crate::products::load(&state.db, &before.product).await?;
    let (version, image, digest, platforms, sigs) = match (&req.version, &req.image) {
        (Some(_), Some(_)) => {
            return Err(Error::BadRequest(
                "give `version` or `image`, not both".into(),
            ));
        }
        (None, None) => (None, None, None, None, vec![]),
        (Some(v), None) => {
            let r = crate::releases::load(&state.db, p.id, &p.name, v).await?;
            if r.state == "revoked" {
                return Err(Error::Conflict(format!(
                    "release {v} is revoked and cannot be pinned"
                )));
            }
            (Some(v.clone()), None, Some(r.digest), None, vec![])
        }
        (None, Some(img)) => {
            let reference = crate::registry::parse_reference(img)?;
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
    crate::audit::record(
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

/// The version an image pin is offered (and signed) as: not a release, so it
/// names the digest it stands for.
pub fn pin_version_label(digest: &str) -> String {
    format!("0.0.0-pin-{}", &digest[7..19])
}
