//! Release channels: head and base, the rollout (percent, ramp, pause), the
//! health gate, rollback, and the history of every change.

use crate::app::AppState;
use crate::auth::{Admin, Principal, ProductReader, Publisher};
use crate::error::{Error, Json, Path, Query, Result, on_constraint};
use crate::paging::{Page, PageParams};
use crate::registry::PlatformImage;
use crate::rollout::{self, Gate};
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
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
    /// Devices on this channel that do not run the head (all of them while
    /// there is no head). `GET .../head-status` says why.
    pub behind: i64,
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

/// What `POST .../promote` answers: the channel, and what the promote leaves behind.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PromoteResponse {
    /// The channel after the promote.
    #[serde(flatten)]
    pub channel: Channel,
    /// Devices the new head cannot reach, in words (e.g. no image for their
    /// architecture); empty when nothing is stranded.
    pub warnings: Vec<String>,
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
    /// Who, as recorded: `user:<name>`, `token:<id>`, `system` (the health gate).
    pub actor: String,
    /// Who, for people: the user's name, the API token's name (the id when
    /// the token is gone), or `system`.
    pub actor_name: String,
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
        .routes(routes!(channel_head_status))
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
    let behind = devices
        .iter()
        .filter(|d| c.head.is_none() || d.version != c.head)
        .map(|d| d.count)
        .sum();
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
        behind,
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
    responses((status = 200, body = PromoteResponse), (status = 400, body = crate::error::Problem),
              (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)))]
async fn promote(
    State(state): State<AppState>,
    Publisher(who): Publisher,
    Path((product, channel)): Path<(String, String)>,
    Json(req): Json<PromoteRequest>,
) -> Result<Json<PromoteResponse>> {
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
    let warnings = crate::releases::stranded(
        &state.db,
        p.id,
        &product,
        r.id,
        &req.version,
        Some(&channel),
    )
    .await?;
    Ok(Json(PromoteResponse {
        channel: view(&state.db, p.id, &product, &channel).await?,
        warnings,
    }))
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
        r#"SELECT h.id, h.at, h.actor,
                  coalesce(t.name, CASE WHEN h.actor LIKE 'user:%' THEN substr(h.actor, 6) ELSE h.actor END) AS "actor_name!",
                  h.action, h.reason, h.before, h.after
           FROM channel_history h
           LEFT JOIN api_tokens t ON h.actor LIKE 'token:%' AND t.id::text = substr(h.actor, 7)
           WHERE h.channel_id = $1 AND ($2::bigint IS NULL OR h.id < $2) ORDER BY h.id DESC LIMIT $3"#,
        c.id,
        page.cursor_i64()?,
        limit + 1
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(Page::from_rows(rows, limit, |e| e.id.to_string())))
}

/// Where a device stands against its channel's head, and why: the same rules
/// `resolve` applies ([`rollout::decide_why`]), explained.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeadStatus {
    /// It runs the head.
    pub on_head: bool,
    /// Why it does or does not.
    pub reason: rollout::HeadReason,
    /// One sentence a person can act on.
    pub message: String,
    /// The channel's head.
    pub head: Option<String>,
    /// The release resolve would give the device now (absent when none).
    pub target: Option<String>,
}

/// How many devices of a channel are not on its head, for one reason.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReasonCount {
    /// Why.
    pub reason: rollout::HeadReason,
    /// How many devices.
    pub count: i64,
    /// What one of them is told (an example).
    pub message: String,
}

/// `GET .../head-status`: a channel's devices against its head.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChannelHeadStatus {
    /// The channel's head.
    pub head: Option<String>,
    /// Devices on the channel.
    pub devices: i64,
    /// Of those, on the head.
    pub on_head: i64,
    /// The others by reason, most first.
    pub not_on_head: Vec<ReasonCount>,
}

/// A product's releases as the rules see them.
struct ProductRules {
    rels: Vec<rollout::Rel>,
    archs: Vec<Vec<(String, Option<String>)>>,
    by_id: std::collections::HashMap<Uuid, usize>,
    by_version: std::collections::HashMap<String, usize>,
    by_digest: std::collections::HashMap<String, usize>,
}

async fn product_rules(db: &mut PgConnection, product_id: Uuid) -> Result<ProductRules> {
    let rows = sqlx::query!(
        r#"SELECT id, version, digest, floor, state,
                  platforms AS "platforms: SqlJson<Vec<PlatformImage>>"
           FROM releases WHERE product_id = $1"#,
        product_id
    )
    .fetch_all(&mut *db)
    .await?;
    let mut r = ProductRules {
        rels: Vec::new(),
        archs: Vec::new(),
        by_id: Default::default(),
        by_version: Default::default(),
        by_digest: Default::default(),
    };
    for row in rows {
        // As the resolve snapshot does: a version that does not parse is no release.
        let Ok(version) = semver::Version::parse(&row.version) else {
            continue;
        };
        let i = r.rels.len();
        r.by_id.insert(row.id, i);
        r.by_version.insert(row.version.clone(), i);
        r.by_digest.insert(row.digest, i);
        for pl in &row.platforms.0 {
            r.by_digest.insert(pl.digest.clone(), i);
        }
        r.archs.push(
            row.platforms
                .0
                .into_iter()
                .map(|p| (p.architecture, p.variant))
                .collect(),
        );
        r.rels.push(rollout::Rel {
            version,
            floor: row.floor,
            revoked: row.state == "revoked",
        });
    }
    Ok(r)
}

impl ProductRules {
    /// Whether release `i` has an image a device asking for `arch` is
    /// offered: the same fit resolve uses (`registry::fits`).
    fn fits(&self, i: usize, arch: &str) -> bool {
        crate::registry::best_fit(&self.archs[i], arch, |(a, v)| (a.as_str(), v.as_deref()))
            .is_some()
    }
}

/// The device columns the explanation needs.
struct DeviceFacts {
    id: Uuid,
    arch: String,
    current_digest: Option<String>,
    status: String,
    status_version: Option<String>,
    last_seen: OffsetDateTime,
    pin_version: Option<String>,
    pin_digest: Option<String>,
    offered: Vec<String>,
    revoked: bool,
}

/// The latest failure report per device and version: (kind, when).
type Failures = std::collections::HashMap<(Uuid, String), (String, OffsetDateTime)>;

fn device_head_status(
    rules: &ProductRules,
    c: &ChannelRow,
    d: &DeviceFacts,
    failures: &Failures,
    now: OffsetDateTime,
) -> HeadStatus {
    let head = c
        .head_release_id
        .and_then(|id| rules.by_id.get(&id))
        .map(|&i| &rules.rels[i]);
    let pin_image;
    let pin = match (&d.pin_version, &d.pin_digest) {
        (Some(v), _) => rules.by_version.get(v).map(|&i| &rules.rels[i]),
        (None, Some(digest)) => {
            pin_image = semver::Version::parse(&crate::devices::pin_version_label(digest))
                .ok()
                .map(|version| rollout::Rel {
                    version,
                    floor: false,
                    revoked: false,
                });
            pin_image.as_ref()
        }
        _ => None,
    };
    let device_id = d.id.to_string();
    let rollout = c.rollout();
    let input = rollout::Input {
        releases: &rules.rels,
        head,
        base: c
            .base_release_id
            .and_then(|id| rules.by_id.get(&id))
            .map(|&i| &rules.rels[i]),
        rollout: &rollout,
        rolled_back: c.downgrade,
        pin,
        device_id: &device_id,
        current: d
            .current_digest
            .as_ref()
            .and_then(|digest| rules.by_digest.get(digest))
            .map(|&i| &rules.rels[i]),
        now,
    };
    let (decision, why) = rollout::decide_why(&input);
    let target_idx = decision
        .target
        .and_then(|t| rules.rels.iter().position(|r| std::ptr::eq(r, t)));
    let target = decision.target.map(|t| t.version.to_string());
    let target_name = target.clone().unwrap_or_default();
    let head_idx = c
        .head_release_id
        .and_then(|id| rules.by_id.get(&id))
        .copied();
    let failed = |version: &str| {
        failures
            .get(&(d.id, version.to_string()))
            .map(|(kind, at)| {
                (
                    kind.clone(),
                    at.format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                )
            })
    };
    let facts = rollout::Facts {
        arch: d.arch.clone(),
        head_has_arch: head_idx.is_none_or(|i| rules.fits(i, &d.arch)),
        failed_head: c.head.as_deref().and_then(failed),
        // An image pin carries its own platforms; it is explained as a pin first.
        target_has_arch: target_idx.is_none_or(|i| rules.fits(i, &d.arch)),
        failed_target: failed(&target_name),
        updating: matches!(d.status.as_str(), "downloading" | "applying" | "rebooting")
            && d.status_version.as_deref() == Some(target_name.as_str()),
        asked_since_change: d.last_seen >= c.updated_at
            || d.offered
                .iter()
                .any(|o| o.split_once('@').is_some_and(|(v, _)| v == target_name)),
        paused_reason: c.paused_reason.clone(),
        device_revoked: d.revoked,
    };
    let e = rollout::explain(&input, &decision, why, &facts);
    HeadStatus {
        on_head: e.on_head,
        reason: e.reason,
        message: e.message,
        head: c.head.clone(),
        target,
    }
}

async fn failures(
    db: &mut PgConnection,
    product_id: Uuid,
    channel: &str,
    device: Option<Uuid>,
) -> Result<Failures> {
    Ok(sqlx::query!(
        // The latest outcome per device and version: a failure cleared since
        // (`failure_cleared`, an admin's retry or clear-failed) no longer counts.
        r#"SELECT device_id AS "device_id!", version AS "version!", kind AS "kind!", at AS "at!" FROM (
             SELECT DISTINCT ON (e.device_id, e.version) e.device_id, e.version, e.kind, e.at
             FROM device_events e JOIN devices d ON d.id = e.device_id
             WHERE d.product_id = $1 AND d.channel = $2 AND ($3::uuid IS NULL OR d.id = $3)
               AND e.kind IN ('failed', 'rolled_back', 'failure_cleared') AND e.version IS NOT NULL
             ORDER BY e.device_id, e.version, e.id DESC) latest
           WHERE kind IN ('failed', 'rolled_back')"#,
        product_id,
        channel,
        device
    )
    .fetch_all(&mut *db)
    .await?
    .into_iter()
    .map(|r| ((r.device_id, r.version), (r.kind, r.at)))
    .collect())
}

async fn device_facts(
    db: &mut PgConnection,
    product_id: Uuid,
    channel: &str,
    device: Option<Uuid>,
) -> Result<Vec<DeviceFacts>> {
    Ok(sqlx::query_as!(
        DeviceFacts,
        r#"SELECT id, arch, current_digest, status, status_version, last_seen, pin_version, pin_digest, offered,
                  revoked_at IS NOT NULL AS "revoked!"
           FROM devices WHERE product_id = $1 AND channel = $2 AND ($3::uuid IS NULL OR id = $3)"#,
        product_id,
        channel,
        device
    )
    .fetch_all(&mut *db)
    .await?)
}

/// Where one device stands against its channel's head (`None` when its
/// channel does not exist).
pub async fn head_status_of(
    db: &sqlx::PgPool,
    product: &str,
    channel: &str,
    device: Uuid,
) -> Result<Option<HeadStatus>> {
    let mut conn = db.acquire().await?;
    let p = crate::products::load(&mut *conn, product).await?;
    let c = match load(&mut conn, p.id, product, channel, false).await {
        Ok(c) => c,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let rules = product_rules(&mut conn, p.id).await?;
    let failed = failures(&mut conn, p.id, channel, Some(device)).await?;
    let now = OffsetDateTime::now_utc();
    Ok(device_facts(&mut conn, p.id, channel, Some(device))
        .await?
        .first()
        .map(|d| device_head_status(&rules, &c, d, &failed, now)))
}

/// How many of the channel's devices run its head, and why the others do not.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/head-status", tag = "channels",
    params(("product" = String, Path, description = "Product name"), ("channel" = String, Path, description = "Channel name")),
    security(("bearer" = [])),
    responses((status = 200, body = ChannelHeadStatus), (status = 401, body = crate::error::Problem),
              (status = 403, body = crate::error::Problem), (status = 404, body = crate::error::Problem)))]
async fn channel_head_status(
    State(state): State<AppState>,
    _v: ProductReader,
    Path((product, channel)): Path<(String, String)>,
) -> Result<Json<ChannelHeadStatus>> {
    let p = crate::products::load(&state.db, &product).await?;
    let mut conn = state.db.acquire().await?;
    let c = load(&mut conn, p.id, &product, &channel, false).await?;
    let rules = product_rules(&mut conn, p.id).await?;
    let failed = failures(&mut conn, p.id, &channel, None).await?;
    let devices = device_facts(&mut conn, p.id, &channel, None).await?;
    let now = OffsetDateTime::now_utc();
    let mut by_reason: std::collections::BTreeMap<rollout::HeadReason, ReasonCount> =
        Default::default();
    let mut on_head = 0;
    for d in &devices {
        let s = device_head_status(&rules, &c, d, &failed, now);
        if s.on_head {
            on_head += 1;
            continue;
        }
        by_reason
            .entry(s.reason)
            .or_insert(ReasonCount {
                reason: s.reason,
                count: 0,
                message: s.message,
            })
            .count += 1;
    }
    let mut not_on_head: Vec<ReasonCount> = by_reason.into_values().collect();
    not_on_head.sort_by(|a, b| b.count.cmp(&a.count).then(a.reason.cmp(&b.reason)));
    Ok(Json(ChannelHeadStatus {
        head: c.head,
        devices: devices.len() as i64,
        on_head,
        not_on_head,
    }))
}
