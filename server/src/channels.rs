//! Release channels: head and base, the rollout (percent, ramp, pause), the
//! health gate, rollback, and the history of every change.

use crate::app::AppState;
use crate::auth::{Admin, Principal, ProductReader, Publisher};
use crate::error::{Error, Json, Path, Query, Result, on_constraint};
use crate::paging::{Page, PageParams};
use crate::rollout::{self, Gate};
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Postgres, Transaction};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// `POST /v1/products/{product}/channels`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewChannel {
    /// Its name (`stable`, `beta`): same rules as product names.
    pub name: String,
    /// A line about it.
    #[serde(default)]
    pub description: Option<String>,
}

/// A linear ramp as the API shows and takes it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RampSpec {
    /// The percent the ramp ends at.
    pub to_percent: f64,
    /// How long it takes, in minutes.
    pub over_minutes: f64,
}

/// A ramp in force.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RampState {
    /// Percent when it started.
    pub from_percent: f64,
    /// Percent it ends at.
    pub to_percent: f64,
    /// How long it takes, in minutes.
    pub over_minutes: f64,
    /// When it started (moved forward by time spent paused).
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
}

/// A channel's rollout.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutState {
    /// The percent set (or the ramp's start).
    pub percent: f64,
    /// The percent in force now, with the ramp applied.
    pub effective_percent: f64,
    /// The ramp, if any.
    pub ramp: Option<RampState>,
    /// No new device gets the head while paused.
    pub paused: bool,
    /// Why it was paused (a person, or the health gate).
    pub paused_reason: Option<String>,
}

/// The health gate's settings and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GateState {
    /// Halt above this share of failures on the head (percent).
    pub max_failure_percent: f64,
    /// Judge only once this many devices reported on the head.
    pub min_reports: i64,
    /// Devices that reported an outcome (healthy, failed, rolled back) on the head.
    pub reports: i64,
    /// Of those, failed or rolled back.
    pub failures: i64,
    /// Whether the gate's condition holds now.
    pub tripped: bool,
}

/// How many devices run a version in a status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceCount {
    /// The version they run (absent when unknown).
    pub version: Option<String>,
    /// Their status.
    pub status: String,
    /// How many.
    pub count: i64,
}

/// A channel.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Channel {
    /// Its name.
    pub name: String,
    /// A line about it.
    pub description: Option<String>,
    /// The release admitted devices get.
    pub head: Option<String>,
    /// The previous head: what everyone else gets.
    pub base: Option<String>,
    /// The head was set by a rollback: devices may move down to it.
    pub rolled_back: bool,
    /// The rollout.
    pub rollout: RolloutState,
    /// The health gate.
    pub gate: GateState,
    /// Grows with every change; devices refuse answers with a lower one.
    pub serial: i64,
    /// Devices on this channel by version and status.
    pub devices: Vec<DeviceCount>,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// `POST .../promote`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The release to make head.
    pub version: String,
    /// Rollout percent (default 10: a staged rollout; raise it with `PATCH .../rollout`).
    #[serde(
        default = "default_promote_percent",
        deserialize_with = "promote_percent"
    )]
    #[schema(default = 10)]
    pub percent: Option<f64>,
    /// A linear ramp from `percent` upwards.
    #[serde(default)]
    pub ramp: Option<RampSpec>,
}

/// The percent a promote without one (or with `null`) starts at.
pub const DEFAULT_PROMOTE_PERCENT: f64 = 10.0;

fn default_promote_percent() -> Option<f64> {
    Some(DEFAULT_PROMOTE_PERCENT)
}

fn promote_percent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.or_else(default_promote_percent))
}

/// The gate's settings.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateSpec {
    /// Halt above this share of failures (0–100).
    pub max_failure_percent: f64,
    /// Judge only once this many devices reported (≥ 1).
    pub min_reports: i64,
}

/// `PATCH .../rollout`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutPatch {
    /// New percent (clears a ramp unless one is given too).
    #[serde(default)]
    pub percent: Option<f64>,
    /// A linear ramp from the current percent upwards.
    #[serde(default)]
    pub ramp: Option<RampSpec>,
    /// Pause or resume.
    #[serde(default)]
    pub paused: Option<bool>,
    /// Gate settings.
    #[serde(default)]
    pub gate: Option<GateSpec>,
}

/// `POST .../rollback`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The release to go back to (default: the base).
    #[serde(default)]
    pub version: Option<String>,
}

/// One change in a channel's history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryEntry {
    /// Increasing id.
    pub id: i64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who (`system` for the health gate).
    pub actor: String,
    /// `create`, `promote`, `rollout`, `pause`, `resume`, `rollback`, `gate`.
    pub action: String,
    /// Why, in words.
    pub reason: Option<String>,
    /// The channel before.
    pub before: Option<serde_json::Value>,
    /// The channel after.
    pub after: Option<serde_json::Value>,
}

/// Rejects a percent outside 0–100.
pub fn check_percent(p: Option<f64>) -> Result<()> {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p) || p.is_nan() => Err(Error::BadRequest(format!(
            "percent {p} is out of range: use 0 to 100"
        ))),
        _ => Ok(()),
    }
}

fn check_ramp(r: &RampSpec, from: f64) -> Result<()> {
    check_percent(Some(r.to_percent))?;
    if r.to_percent < from {
        return Err(Error::BadRequest(format!(
            "a ramp only raises the percent: to_percent {} is below the current {from}; set `percent` to lower it",
            r.to_percent
        )));
    }
    if !(r.over_minutes > 0.0 && r.over_minutes <= 525_600.0) {
        return Err(Error::BadRequest(
            "ramp over_minutes must be above 0 and at most a year (525600)".into(),
        ));
    }
    Ok(())
}

/// The channel row, as stored.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelRow {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// A line about it.
    pub description: Option<String>,
    /// Head release id.
    pub head_release_id: Option<Uuid>,
    /// Base release id.
    pub base_release_id: Option<Uuid>,
    /// Head version.
    pub head: Option<String>,
    /// Base version.
    pub base: Option<String>,
    /// Percent.
    pub percent: f64,
    /// Ramp start percent.
    pub ramp_from_percent: Option<f64>,
    /// Ramp end percent.
    pub ramp_to_percent: Option<f64>,
    /// Ramp length.
    pub ramp_over_minutes: Option<f64>,
    /// Ramp start.
    pub ramp_started_at: Option<OffsetDateTime>,
    /// Paused.
    pub paused: bool,
    /// Why.
    pub paused_reason: Option<String>,
    /// Since when.
    pub paused_at: Option<OffsetDateTime>,
    /// Head set by rollback.
    pub downgrade: bool,
    /// Gate share.
    pub gate_max_failure_percent: f64,
    /// Gate minimum.
    pub gate_min_reports: i32,
    /// Serial.
    pub serial: i64,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

impl ChannelRow {
    /// The rollout as the rules see it.
    pub fn rollout(&self) -> rollout::Rollout {
        let ramp = match (
            self.ramp_from_percent,
            self.ramp_to_percent,
            self.ramp_over_minutes,
            self.ramp_started_at,
        ) {
            (Some(from), Some(to), Some(over_minutes), Some(started_at)) => Some(rollout::Ramp {
                from,
                to,
                started_at,
                over_minutes,
            }),
            _ => None,
        };
        rollout::Rollout {
            percent: self.percent,
            ramp,
            paused: self.paused,
            paused_at: self.paused_at,
        }
    }

    /// The gate's settings.
    pub fn gate(&self) -> Gate {
        Gate {
            max_failure_percent: self.gate_max_failure_percent,
            min_reports: self.gate_min_reports as i64,
        }
    }

    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "head": self.head, "base": self.base, "percent": self.percent,
            "ramp": self.ramp_to_percent.map(|to| serde_json::json!({"to_percent": to, "over_minutes": self.ramp_over_minutes})),
            "paused": self.paused, "paused_reason": self.paused_reason, "rolled_back": self.downgrade,
            "gate": {"max_failure_percent": self.gate_max_failure_percent, "min_reports": self.gate_min_reports},
        })
    }
}

/// Loads a channel (locking it when `for_update`), or 404.
pub async fn load(
    db: &mut PgConnection,
    product_id: Uuid,
    product: &str,
    name: &str,
    for_update: bool,
) -> Result<ChannelRow> {
    let id = if for_update {
        sqlx::query_scalar!(
            "SELECT id FROM channels WHERE product_id = $1 AND name = $2 FOR UPDATE",
            product_id,
            name
        )
        .fetch_optional(&mut *db)
        .await?
    } else {
        sqlx::query_scalar!(
            "SELECT id FROM channels WHERE product_id = $1 AND name = $2",
            product_id,
            name
        )
        .fetch_optional(&mut *db)
        .await?
    }
    .ok_or_else(|| Error::not_found(format!("channel {name} of product {product}")))?;
    Ok(sqlx::query_as!(
        ChannelRow,
        r#"SELECT c.id, c.name, c.description, c.head_release_id, c.base_release_id,
                  h.version AS "head?", b.version AS "base?", c.percent, c.ramp_from_percent, c.ramp_to_percent,
                  c.ramp_over_minutes, c.ramp_started_at, c.paused, c.paused_reason, c.paused_at, c.downgrade,
                  c.gate_max_failure_percent, c.gate_min_reports, c.serial, c.updated_at
           FROM channels c LEFT JOIN releases h ON h.id = c.head_release_id LEFT JOIN releases b ON b.id = c.base_release_id
           WHERE c.id = $1"#,
        id
    )
    .fetch_one(&mut *db)
    .await?)
}

/// Records a change in the channel's history and the audit log, and bumps its serial.
async fn changed(
    tx: &mut PgConnection,
    actor: &str,
    product: &str,
    before: &ChannelRow,
    action: &str,
    reason: Option<String>,
    after: &ChannelRow,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO channel_history (channel_id, actor, action, reason, before, after) VALUES ($1, $2, $3, $4, $5, $6)",
        before.id,
        actor,
        action,
        reason,
        before.summary(),
        after.summary()
    )
    .execute(&mut *tx)
    .await?;
    crate::audit::record_as(
        &mut *tx,
        actor,
        &format!("channel.{action}"),
        &format!("channel:{product}/{}", before.name),
        Some(before.summary()),
        Some(after.summary()),
    )
    .await
}

async fn save(tx: &mut PgConnection, c: &ChannelRow) -> Result<()> {
    sqlx::query!(
        "UPDATE channels SET head_release_id = $2, base_release_id = $3, percent = $4, ramp_from_percent = $5,
            ramp_to_percent = $6, ramp_over_minutes = $7, ramp_started_at = $8, paused = $9, paused_reason = $10,
            paused_at = $11, downgrade = $12, gate_max_failure_percent = $13, gate_min_reports = $14,
            serial = nextval('channel_serial'), updated_at = now()
         WHERE id = $1",
        c.id,
        c.head_release_id,
        c.base_release_id,
        c.percent,
        c.ramp_from_percent,
        c.ramp_to_percent,
        c.ramp_over_minutes,
        c.ramp_started_at,
        c.paused,
        c.paused_reason,
        c.paused_at,
        c.downgrade,
        c.gate_max_failure_percent,
        c.gate_min_reports
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn set_ramp(c: &mut ChannelRow, ramp: Option<&RampSpec>, now: OffsetDateTime) {
    match ramp {
        Some(r) => {
            c.ramp_from_percent = Some(c.percent);
            c.ramp_to_percent = Some(r.to_percent);
            c.ramp_over_minutes = Some(r.over_minutes);
            c.ramp_started_at = Some(now);
        }
        None => {
            c.ramp_from_percent = None;
            c.ramp_to_percent = None;
            c.ramp_over_minutes = None;
            c.ramp_started_at = None;
        }
    }
}

/// Promoting resumes a paused channel, so only an admin may promote into
/// one: a publisher's (CI's) promote, even of the same release, must not
/// clear a halt the health gate or a person set.
fn check_may_resume(who: &Principal, product: &str, c: &ChannelRow) -> Result<()> {
    if !c.paused || who.role() == crate::auth::Role::Admin {
        return Ok(());
    }
    Err(Error::Conflict(format!(
        "channel {} of product {product} is paused ({}): an admin must resume it (`sluice channel rollout --resume`) or promote into it; nothing was changed",
        c.name,
        c.paused_reason.as_deref().unwrap_or("no reason given")
    )))
}

/// Makes a release the head of a channel inside the caller's transaction; the
/// old head becomes the base.
#[allow(clippy::too_many_arguments)]
pub async fn promote_in_tx(
    tx: &mut Transaction<'static, Postgres>,
    who: &Principal,
    product_id: Uuid,
    product: &str,
    channel: &str,
    release_id: Uuid,
    version: &semver::Version,
    percent: Option<f64>,
    ramp: Option<&RampSpec>,
    reason: Option<String>,
) -> Result<ChannelRow> {
    check_percent(percent)?;
    let before = load(tx, product_id, product, channel, true).await?;
    check_may_resume(who, product, &before)?;
    let mut c = before.clone();
    let percent = percent.unwrap_or(100.0);
    if let Some(r) = ramp {
        check_ramp(r, percent)?;
    }
    if c.head_release_id != Some(release_id) {
        c.base_release_id = c.head_release_id;
        c.base = c.head.take();
        c.head_release_id = Some(release_id);
        c.head = Some(version.to_string());
    }
    c.percent = percent;
    let now = OffsetDateTime::now_utc();
    set_ramp(&mut c, ramp, now);
    c.paused = false;
    c.paused_reason = None;
    c.paused_at = None;
    c.downgrade = false;
    save(tx, &c).await?;
    let reason = reason.unwrap_or_else(|| format!("promoted {version} at {percent}%"));
    changed(
        tx,
        &who.actor(),
        product,
        &before,
        "promote",
        Some(reason),
        &c,
    )
    .await?;
    Ok(c)
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_channel, list_channels))
        .routes(routes!(get_channel))
        .routes(routes!(promote))
        .routes(routes!(patch_rollout))
        .routes(routes!(rollback))
        .routes(routes!(history))
}

async fn view(db: &sqlx::PgPool, product_id: Uuid, product: &str, name: &str) -> Result<Channel> {
    let mut conn = db.acquire().await?;
    let c = load(&mut conn, product_id, product, name, false).await?;
    let devices = sqlx::query_as!(
        DeviceCount,
        r#"SELECT current_version AS version, status, count(*) AS "count!" FROM devices
           WHERE product_id = $1 AND channel = $2 GROUP BY current_version, status ORDER BY current_version, status"#,
        product_id,
        name
    )
    .fetch_all(&mut *conn)
    .await?;
    let (reports, failures) = gate_counts(&mut conn, product_id, name, c.head.as_deref()).await?;
    let now = OffsetDateTime::now_utc();
    let r = c.rollout();
    Ok(Channel {
        rollout: RolloutState {
            percent: c.percent,
            effective_percent: rollout::effective_percent(&r, now),
            ramp: r.ramp.map(|x| RampState {
                from_percent: x.from,
                to_percent: x.to,
                over_minutes: x.over_minutes,
                started_at: x.started_at,
            }),
            paused: c.paused,
            paused_reason: c.paused_reason.clone(),
        },
        gate: GateState {
            max_failure_percent: c.gate_max_failure_percent,
            min_reports: c.gate_min_reports as i64,
            reports,
            failures,
            tripped: rollout::gate_tripped(c.gate(), reports, failures),
        },
        name: c.name,
        description: c.description,
        head: c.head,
        base: c.base,
        rolled_back: c.downgrade,
        serial: c.serial,
        devices,
        updated_at: c.updated_at,
    })
}

/// Devices on the channel that reported an outcome on `head`, and how many
/// of those failed. Only reports about a release the device was offered
/// count: a device cannot vote on a rollout it is not part of.
pub async fn gate_counts(
    db: &mut PgConnection,
    product_id: Uuid,
    channel: &str,
    head: Option<&str>,
) -> Result<(i64, i64)> {
    let Some(head) = head else { return Ok((0, 0)) };
    let r = sqlx::query!(
        r#"SELECT count(*) AS "reports!", count(*) FILTER (WHERE status IN ('failed', 'rolled_back')) AS "failures!"
           FROM devices WHERE product_id = $1 AND channel = $2 AND status_version = $3
             AND status IN ('healthy', 'failed', 'rolled_back') AND status_offered"#,
        product_id,
        channel,
        head
    )
    .fetch_one(&mut *db)
    .await?;
    Ok((r.reports, r.failures))
}

/// Halts the channel's rollout if its health gate trips; answers whether it did.
pub async fn check_gate(
    state: &AppState,
    product_id: Uuid,
    product: &str,
    channel: &str,
) -> Result<bool> {
    let mut tx = state.db.begin().await?;
    let before = load(&mut tx, product_id, product, channel, true).await?;
    if before.paused || before.head.is_none() {
        return Ok(false);
    }
    let (reports, failures) =
        gate_counts(&mut tx, product_id, channel, before.head.as_deref()).await?;
    if !rollout::gate_tripped(before.gate(), reports, failures) {
        return Ok(false);
    }
    let now = OffsetDateTime::now_utc();
    let mut c = before.clone();
    let reason = format!(
        "health gate: {failures} of {reports} devices ({:.1}%) failed or rolled back on {}, above the limit of {}%",
        failures as f64 * 100.0 / reports as f64,
        before.head.as_deref().unwrap_or_default(),
        before.gate_max_failure_percent
    );
    c.paused = true;
    c.paused_at = Some(now);
    c.paused_reason = Some(reason.clone());
    save(&mut tx, &c).await?;
    changed(
        &mut tx,
        "system",
        product,
        &before,
        "gate",
        Some(reason),
        &c,
    )
    .await?;
    tx.commit().await?;
    tracing::warn!(
        product,
        channel,
        reports,
        failures,
        "health gate halted the rollout"
    );
    state.cache.invalidate(product);
    Ok(true)
}

/// Makes a channel.
#[utoipa::path(post, path = "/v1/products/{product}/channels", tag = "channels", request_body = NewChannel,
    params(("product" = String, Path, description = "Product name")), security(("bearer" = [])),
    responses((status = 201, body = Channel), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)))]
async fn create_channel(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(product): Path<String>,
    Json(req): Json<NewChannel>,
) -> Result<(StatusCode, Json<Channel>)> {
    if !crate::products::valid_name(&req.name) {
        return Err(Error::BadRequest(format!(
            "invalid channel name {:?}: use 1–63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    let p = crate::products::load(&state.db, &product).await?;
    let mut tx = state.db.begin().await?;
    let id = Uuid::new_v4();
    sqlx::query!(
        "INSERT INTO channels (id, product_id, name, description) VALUES ($1, $2, $3, $4)",
        id,
        p.id,
        req.name,
        req.description
    )
    .execute(&mut *tx)
    .await
    .map_err(on_constraint(
        "channels_product_name_key",
        format!("channel {} already exists in product {product}", req.name),
    ))?;
    sqlx::query!(
        "INSERT INTO channel_history (channel_id, actor, action) VALUES ($1, $2, 'create')",
        id,
        who.actor()
    )
    .execute(&mut *tx)
    .await?;
    crate::audit::record(
        &mut *tx,
        &who,
        "channel.create",
        &format!("channel:{product}/{}", req.name),
        None,
        Some(serde_json::json!({"name": req.name, "description": req.description})),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(view(&state.db, p.id, &product, &req.name).await?),
    ))
}

/// The channels of a product.
#[utoipa::path(get, path = "/v1/products/{product}/channels", tag = "channels",
    params(("product" = String, Path, description = "Product name")), security(("bearer" = [])),
    responses((status = 200, body = Vec<Channel>), (status = 401, body = crate::error::Problem),
              (status = 403, body = crate::error::Problem), (status = 404, body = crate::error::Problem)))]
async fn list_channels(
    State(state): State<AppState>,
    _v: ProductReader,
    Path(product): Path<String>,
) -> Result<Json<Vec<Channel>>> {
    let p = crate::products::load(&state.db, &product).await?;
    let names = sqlx::query_scalar!(
        "SELECT name FROM channels WHERE product_id = $1 ORDER BY name",
        p.id
    )
    .fetch_all(&state.db)
    .await?;
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        out.push(view(&state.db, p.id, &product, &n).await?);
    }
    Ok(Json(out))
}

/// One channel with its rollout, gate and device counts.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}", tag = "channels",
    params(("product" = String, Path, description = "Product name"), ("channel" = String, Path, description = "Channel name")),
    security(("bearer" = [])),
    responses((status = 200, body = Channel), (status = 401, body = crate::error::Problem),
              (status = 403, body = crate::error::Problem), (status = 404, body = crate::error::Problem)))]
async fn get_channel(
    State(state): State<AppState>,
    _v: ProductReader,
    Path((product, channel)): Path<(String, String)>,
) -> Result<Json<Channel>> {
    let p = crate::products::load(&state.db, &product).await?;
    Ok(Json(view(&state.db, p.id, &product, &channel).await?))
}

/// Makes a release the channel's head; the old head becomes the base.
#[utoipa::path(post, path = "/v1/products/{product}/channels/{channel}/promote", tag = "channels", request_body = PromoteRequest,
    params(("product" = String, Path, description = "Product name"), ("channel" = String, Path, description = "Channel name")),
    security(("bearer" = [])),
    responses((status = 200, body = Channel), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)))]
async fn promote(
    State(state): State<AppState>,
    Publisher(who): Publisher,
    Path((product, channel)): Path<(String, String)>,
    Json(req): Json<PromoteRequest>,
) -> Result<Json<Channel>> {
    who.check_product(&product)?;
    let version = crate::releases::parse_version(&req.version)?;
    check_percent(req.percent)?;
    let p = crate::products::load(&state.db, &product).await?;
    let mut tx = state.db.begin().await?;
    let r = crate::releases::load(&mut *tx, p.id, &product, &req.version).await?;
    if r.state == "revoked" {
        return Err(Error::Conflict(format!(
            "release {} is revoked and cannot be promoted",
            req.version
        )));
    }
    promote_in_tx(
        &mut tx,
        &who,
        p.id,
        &product,
        &channel,
        r.id,
        &version,
        req.percent,
        req.ramp.as_ref(),
        None,
    )
    .await?;
    tx.commit().await?;
    state.cache.invalidate(&product);
    Ok(Json(view(&state.db, p.id, &product, &channel).await?))
}

/// Changes the rollout: percent, ramp, pause/resume, gate.
#[utoipa::path(patch, path = "/v1/products/{product}/channels/{channel}/rollout", tag = "channels", request_body = RolloutPatch,
    params(("product" = String, Path, description = "Product name"), ("channel" = String, Path, description = "Channel name")),
    security(("bearer" = [])),
    responses((status = 200, body = Channel), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem)))]
async fn patch_rollout(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path((product, channel)): Path<(String, String)>,
    Json(req): Json<RolloutPatch>,
) -> Result<Json<Channel>> {
    if req.percent.is_none() && req.ramp.is_none() && req.paused.is_none() && req.gate.is_none() {
        return Err(Error::BadRequest(
            "nothing to change: give percent, ramp, paused or gate".into(),
        ));
    }
    check_percent(req.percent)?;
    if let Some(g) = &req.gate
        && (!(0.0..=100.0).contains(&g.max_failure_percent)
            || g.min_reports < 1
            || g.min_reports > i32::MAX as i64)
    {
        return Err(Error::BadRequest(
            "gate: max_failure_percent must be 0–100 and min_reports at least 1".into(),
        ));
    }
    let p = crate::products::load(&state.db, &product).await?;
    let mut tx = state.db.begin().await?;
    let before = load(&mut tx, p.id, &product, &channel, true).await?;
    let mut c = before.clone();
    let now = OffsetDateTime::now_utc();
    let mut what = Vec::new();
    if let Some(percent) = req.percent {
        c.percent = percent;
        set_ramp(&mut c, None, now);
        what.push(format!("percent {percent}%"));
    }
    if let Some(r) = &req.ramp {
        // A ramp starts from what is in force now.
        c.percent = rollout::effective_percent(&c.rollout(), now);
        check_ramp(r, c.percent)?;
        set_ramp(&mut c, Some(r), now);
        what.push(format!(
            "ramp to {}% over {} min",
            r.to_percent, r.over_minutes
        ));
    }
    let mut action = "rollout";
    match req.paused {
        Some(true) if !c.paused => {
            c.paused = true;
            c.paused_at = Some(now);
            c.paused_reason = Some(format!("paused by {}", who.actor()));
            action = "pause";
            what.push("paused".into());
        }
        Some(false) if c.paused => {
            // The ramp stood still while paused: move its start forward by that time.
            if let (Some(start), Some(paused_at)) = (c.ramp_started_at, c.paused_at) {
                c.ramp_started_at = Some(start + (now - paused_at));
            }
            c.paused = false;
            c.paused_at = None;
            c.paused_reason = None;
            action = "resume";
            what.push("resumed".into());
        }
        _ => {}
    }
    if let Some(g) = &req.gate {
        c.gate_max_failure_percent = g.max_failure_percent;
        c.gate_min_reports = g.min_reports as i32;
        what.push(format!(
            "gate {}% after {} reports",
            g.max_failure_percent, g.min_reports
        ));
    }
    save(&mut tx, &c).await?;
    changed(
        &mut tx,
        &who.actor(),
        &product,
        &before,
        action,
        Some(what.join(", ")),
        &c,
    )
    .await?;
    tx.commit().await?;
    state.cache.invalidate(&product);
    Ok(Json(view(&state.db, p.id, &product, &channel).await?))
}

/// Rolls the channel back: the head becomes the given release (default: the
/// base) at 100 %, and devices may move down to it.
#[utoipa::path(post, path = "/v1/products/{product}/channels/{channel}/rollback", tag = "channels", request_body = RollbackRequest,
    params(("product" = String, Path, description = "Product name"), ("channel" = String, Path, description = "Channel name")),
    security(("bearer" = [])),
    responses((status = 200, body = Channel), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)))]
async fn rollback(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path((product, channel)): Path<(String, String)>,
    Json(req): Json<RollbackRequest>,
) -> Result<Json<Channel>> {
    let p = crate::products::load(&state.db, &product).await?;
    let mut tx = state.db.begin().await?;
    let before = load(&mut tx, p.id, &product, &channel, true).await?;
    let version = match (&req.version, &before.base) {
        (Some(v), _) => v.clone(),
        (None, Some(b)) => b.clone(),
        (None, None) => {
            return Err(Error::Conflict(format!(
                "channel {channel} has no base to roll back to: name a version"
            )));
        }
    };
    let target = crate::releases::load(&mut *tx, p.id, &product, &version).await?;
    if target.state == "revoked" {
        return Err(Error::Conflict(format!(
            "release {version} is revoked: roll back to another version"
        )));
    }
    let mut c = before.clone();
    if c.head_release_id != Some(target.id) {
        c.base_release_id = c.head_release_id;
        c.base = c.head.take();
        c.head_release_id = Some(target.id);
        c.head = Some(version.clone());
    }
    c.percent = 100.0;
    set_ramp(&mut c, None, OffsetDateTime::now_utc());
    c.paused = false;
    c.paused_at = None;
    c.paused_reason = None;
    c.downgrade = true;
    save(&mut tx, &c).await?;
    let reason = format!(
        "rolled back from {} to {version}",
        before.head.as_deref().unwrap_or("(none)")
    );
    changed(
        &mut tx,
        &who.actor(),
        &product,
        &before,
        "rollback",
        Some(reason),
        &c,
    )
    .await?;
    tx.commit().await?;
    state.cache.invalidate(&product);
    Ok(Json(view(&state.db, p.id, &product, &channel).await?))
}

/// Every change to the channel, newest first.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/history", tag = "channels",
    params(("product" = String, Path, description = "Product name"), ("channel" = String, Path, description = "Channel name"), PageParams),
    security(("bearer" = [])),
    responses((status = 200, body = Page<HistoryEntry>), (status = 401, body = crate::error::Problem),
              (status = 403, body = crate::error::Problem), (status = 404, body = crate::error::Problem)))]
async fn history(
    State(state): State<AppState>,
    _v: ProductReader,
    Path((product, channel)): Path<(String, String)>,
    Query(page): Query<PageParams>,
) -> Result<Json<Page<HistoryEntry>>> {
    let p = crate::products::load(&state.db, &product).await?;
    let mut conn = state.db.acquire().await?;
    let c = load(&mut conn, p.id, &product, &channel, false).await?;
    let limit = page.limit();
    let rows = sqlx::query_as!(
        HistoryEntry,
        "SELECT id, at, actor, action, reason, before, after FROM channel_history
         WHERE channel_id = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        c.id,
        page.cursor_i64()?,
        limit + 1
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(Page::from_rows(rows, limit, |e| e.id.to_string())))
}
