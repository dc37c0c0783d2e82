//! Release channels: head and base, the rollout (percent, ramp, pause), the
//! health gate, rollback, and the history of every change.

use crate::api::auth::{Admin, Principal, ProductReader, Publisher};
use crate::api::products::{ProductPath, ProductRow};
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Query, Result, on_constraint};
use crate::infra::registry::PlatformImage;
use crate::paging::{Page, PageParams};
use crate::rules::channel::{ChannelState, PromotePlan, ReleaseRef};
pub use crate::rules::channel::{GateSpec, RampSpec};
use crate::rules::policy::{
    Labels, LeaseSpec, RebootPolicy, RebootPolicySpec, WavePlan, WaveSpec, WindowSpec,
};
use crate::rules::rollout::{self, Gate};
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_protocol::EventKind;
use sqlx::types::Json as SqlJson;
use sqlx::{PgConnection, Postgres, Transaction};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
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
    /// The release the channel last rolled out fully: what devices outside
    /// the rollout get.
    pub base: Option<String>,
    /// The head was set by a rollback: devices may move down to it.
    pub rolled_back: bool,
    /// While rolled back: the head the rollback went back from.
    pub rolled_back_from: Option<String>,
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
    /// The waves the rollout proceeds in, if it does.
    pub waves: Option<WavesState>,
    /// Maintenance windows and reboot leases.
    pub reboot_policy: RebootPolicyState,
}

/// A rollout in waves, and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WavesState {
    /// The waves, in order.
    pub waves: Vec<WaveSpec>,
    /// When the first wave started (moved forward by time spent paused).
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// The wave that ramps or soaks now (0-based; the last once all are done).
    pub current: usize,
    /// That wave's percent in force.
    pub current_percent: f64,
    /// When the next wave starts.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_starts_at: Option<OffsetDateTime>,
    /// Every wave ramped and soaked.
    pub done: bool,
}

/// A channel's reboot policy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RebootPolicyState {
    /// The maintenance windows as set (`PUT .../reboot-policy`).
    pub windows: Vec<WindowSpec>,
    /// The reboot leases as set.
    pub lease: Option<LeaseSpec>,
    /// Each window in words (`Sat 02:00–04:00 Europe/Berlin`).
    pub windows_described: Vec<String>,
}

/// `POST .../promote`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The release to make head.
    pub version: String,
    /// Rollout percent (default 10: a staged rollout; raise it with `PATCH .../rollout`).
    #[serde(default)]
    #[schema(default = 10)]
    pub percent: Option<f64>,
    /// A linear ramp from `percent` upwards.
    #[serde(default)]
    pub ramp: Option<RampSpec>,
    /// Roll out in waves by label selector instead of one percent (e.g.
    /// `ring=canary`, then `region=eu`, then everyone): each wave with its
    /// own percent, ramp and soak; the health gate watches throughout.
    /// Not together with `percent` or `ramp`.
    #[serde(default)]
    pub waves: Option<Vec<WaveSpec>>,
    /// Only say what the promote would do: the answer shows the channel as
    /// it would be, and nothing is stored.
    #[serde(default)]
    pub dry_run: bool,
}

/// What `POST .../promote` answers: the channel, what the promote did (or,
/// with `dry_run`, would do), and what it leaves behind.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PromoteResponse {
    /// The channel after the promote (with `dry_run`: as it would be).
    #[serde(flatten)]
    pub channel: Channel,
    /// What the promote does to the head and the base, in words and fields.
    pub plan: PromotePlan,
    /// Whether this was a dry run: nothing was stored.
    pub dry_run: bool,
    /// Devices the new head cannot reach, in words (e.g. no image for their
    /// architecture); empty when nothing is stranded.
    pub warnings: Vec<String>,
}

/// The percent a promote without one (or with `null`) starts at.
pub const DEFAULT_PROMOTE_PERCENT: f64 = 10.0;

/// How a promote rolls the new head out.
#[derive(Debug, Clone, Copy)]
pub enum Promotion<'a> {
    /// To a share of the channel's devices, optionally ramping up.
    Percent(f64, Option<&'a RampSpec>),
    /// In waves by label selector.
    Waves(&'a [WaveSpec]),
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

/// Rejects a percent outside 0–100 (none given is fine).
pub fn check_percent(p: Option<f64>) -> Result<()> {
    Ok(p.map_or(Ok(()), crate::rules::channel::check_percent)?)
}

/// The channel row as the queries read it.
#[derive(Debug, Clone)]
pub struct StoredChannel {
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
    pub rolled_back: bool,
    /// Gate share.
    pub gate_max_failure_percent: f64,
    /// Gate minimum.
    pub gate_min_reports: i32,
    /// Serial.
    pub serial: i64,
    /// Last change.
    pub updated_at: OffsetDateTime,
    /// The waves as asked for (`[WaveSpec]`), if the rollout goes in waves.
    pub waves: Option<serde_json::Value>,
    /// When the first wave started.
    pub waves_started_at: Option<OffsetDateTime>,
    /// The reboot policy as asked for (`RebootPolicySpec`).
    pub reboot_policy: serde_json::Value,
}

impl StoredChannel {
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
            waves: self.wave_plan(),
        }
    }

    /// The stored waves, checked again as the rules read them (they were
    /// checked when stored; a row that no longer parses is logged and read
    /// as no waves rather than failing every request on the channel).
    fn wave_plan(&self) -> Option<WavePlan> {
        let (waves, started_at) = (self.waves.as_ref()?, self.waves_started_at?);
        let plan = serde_json::from_value::<Vec<WaveSpec>>(waves.clone())
            .map_err(|e| e.to_string())
            .and_then(|specs| WavePlan::new(&specs, started_at).map_err(|e| e.0));
        plan.inspect_err(|e| tracing::error!(channel = %self.name, "stored waves unreadable: {e}"))
            .ok()
    }

    /// The stored reboot policy, read as [`StoredChannel::wave_plan`] reads waves.
    pub(crate) fn reboot_policy(&self) -> RebootPolicy {
        let policy = serde_json::from_value::<RebootPolicySpec>(self.reboot_policy.clone())
            .map_err(|e| e.to_string())
            .and_then(|spec| RebootPolicy::new(&spec).map_err(|e| e.0));
        policy
            .inspect_err(
                |e| tracing::error!(channel = %self.name, "stored reboot policy unreadable: {e}"),
            )
            .unwrap_or_default()
    }
}

/// A channel: its name, and the state the rules read and change.
#[derive(Debug, Clone)]
pub struct ChannelRow {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// A line about it.
    pub description: Option<String>,
    /// Head, base, rollout and gate.
    pub state: ChannelState,
    /// Grows with every change.
    pub serial: i64,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

impl From<StoredChannel> for ChannelRow {
    fn from(c: StoredChannel) -> Self {
        let release = |id: Option<Uuid>, version: Option<String>| {
            id.map(|id| ReleaseRef {
                id,
                version: version.unwrap_or_default(),
            })
        };
        let rollout = c.rollout();
        let reboot = c.reboot_policy();
        ChannelRow {
            state: ChannelState {
                head: release(c.head_release_id, c.head),
                base: release(c.base_release_id, c.base),
                rollout,
                paused_reason: c.paused_reason,
                rolled_back: c.rolled_back,
                gate: Gate {
                    max_failure_percent: c.gate_max_failure_percent,
                    min_reports: i64::from(c.gate_min_reports),
                },
                reboot,
            },
            id: c.id,
            name: c.name,
            description: c.description,
            serial: c.serial,
            updated_at: c.updated_at,
        }
    }
}

impl ChannelRow {
    /// The head's version.
    pub fn head(&self) -> Option<String> {
        self.state.head.as_ref().map(|h| h.version.clone())
    }

    /// The base's version.
    pub fn base(&self) -> Option<String> {
        self.state.base.as_ref().map(|b| b.version.clone())
    }

    /// The channel as its history and the audit log record it.
    fn summary(&self) -> serde_json::Value {
        let s = &self.state;
        let r = &s.rollout;
        serde_json::json!({
            "head": self.head(), "base": self.base(), "percent": r.percent,
            "ramp": r.ramp.as_ref().map(|x| serde_json::json!({"to_percent": x.to, "over_minutes": x.over_minutes})),
            "paused": r.paused, "paused_reason": s.paused_reason, "rolled_back": s.rolled_back,
            "gate": {"max_failure_percent": s.gate.max_failure_percent, "min_reports": s.gate.min_reports},
            "waves": r.waves.as_ref().map(|w| w.specs()),
            "reboot_policy": s.reboot.spec(),
        })
    }
}

/// `{product}/channels/{channel}` in a route, as crates.io's
/// `CrateVersionPath`: the names, and loaders for the product and the channel
/// (404 for either). A bad path is a problem+json 400.
#[derive(Debug, Deserialize, IntoParams, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
#[into_params(parameter_in = Path)]
pub struct ChannelPath {
    /// Product name
    pub product: String,
    /// Channel name
    pub channel: String,
}

impl ChannelPath {
    /// The product, or 404.
    pub async fn load_product<'e>(&self, db: impl sqlx::PgExecutor<'e>) -> Result<ProductRow> {
        crate::api::products::load(db, &self.product).await
    }

    /// The product and the channel (locked until the transaction ends when
    /// `for_update`), or 404.
    pub async fn load(
        &self,
        db: &mut PgConnection,
        for_update: bool,
    ) -> Result<(ProductRow, ChannelRow)> {
        let p = self.load_product(&mut *db).await?;
        let c = load(db, p.id, &self.product, &self.channel, for_update).await?;
        Ok((p, c))
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
        StoredChannel,
        r#"SELECT c.id, c.name, c.description, c.head_release_id, c.base_release_id,
                  h.version AS "head?", b.version AS "base?", c.percent, c.ramp_from_percent, c.ramp_to_percent,
                  c.ramp_over_minutes, c.ramp_started_at, c.paused, c.paused_reason, c.paused_at, c.rolled_back,
                  c.gate_max_failure_percent, c.gate_min_reports, c.serial, c.updated_at,
                  c.waves, c.waves_started_at, c.reboot_policy
           FROM channels c LEFT JOIN releases h ON h.id = c.head_release_id LEFT JOIN releases b ON b.id = c.base_release_id
           WHERE c.id = $1"#,
        id
    )
    .fetch_one(&mut *db)
    .await?
    .into())
}

/// Saves a changed channel (bumping its serial) and records the change in its
/// history and the audit log.
async fn changed(
    tx: &mut PgConnection,
    actor: &str,
    product: &str,
    before: &ChannelRow,
    action: &str,
    reason: Option<String>,
    after: &ChannelRow,
) -> Result<()> {
    save(tx, after).await?;
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
    crate::infra::audit::record_as(
        &mut *tx,
        actor,
        &format!("channel.{action}"),
        &format!("channel:{product}/{}", before.name),
        Some(before.summary()),
        Some(after.summary()),
    )
    .await
}

/// Writes the channel's state; only [`changed`] calls it, so every change is recorded.
async fn save(tx: &mut PgConnection, c: &ChannelRow) -> Result<()> {
    let s = &c.state;
    let r = &s.rollout;
    let ramp = r.ramp.as_ref();
    sqlx::query!(
        "UPDATE channels SET head_release_id = $2, base_release_id = $3, percent = $4, ramp_from_percent = $5,
            ramp_to_percent = $6, ramp_over_minutes = $7, ramp_started_at = $8, paused = $9, paused_reason = $10,
            paused_at = $11, rolled_back = $12, gate_max_failure_percent = $13, gate_min_reports = $14,
            waves = $15, waves_started_at = $16, reboot_policy = $17,
            serial = nextval('channel_serial'), updated_at = now()
         WHERE id = $1",
        c.id,
        s.head.as_ref().map(|h| h.id),
        s.base.as_ref().map(|b| b.id),
        r.percent,
        ramp.map(|x| x.from),
        ramp.map(|x| x.to),
        ramp.map(|x| x.over_minutes),
        ramp.map(|x| x.started_at),
        r.paused,
        s.paused_reason,
        r.paused_at,
        s.rolled_back,
        s.gate.max_failure_percent,
        // set_gate keeps it within i32.
        i32::try_from(s.gate.min_reports).unwrap_or(i32::MAX),
        r.waves
            .as_ref()
            .map(|w| serde_json::to_value(w.specs()))
            .transpose()
            .map_err(anyhow::Error::from)?,
        r.waves.as_ref().map(|w| w.started_at),
        serde_json::to_value(s.reboot.spec()).map_err(anyhow::Error::from)?
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Promoting resumes a paused channel, so only an admin may promote into
/// one: a publisher's (CI's) promote, even of the same release, must not
/// clear a halt the health gate or a person set.
fn check_may_resume(who: &Principal, product: &str, c: &ChannelRow) -> Result<()> {
    if !c.state.rollout.paused || who.role() == crate::infra::jwt::Role::Admin {
        return Ok(());
    }
    Err(Error::Conflict(format!(
        "channel {} of product {product} is paused ({}): an admin must resume it (`sluice channel rollout --resume`) or promote into it; nothing was changed",
        c.name,
        c.state
            .paused_reason
            .as_deref()
            .unwrap_or("no reason given")
    )))
}

/// Makes a release the head of a channel inside the caller's transaction
/// ([`ChannelState::promote`] says what becomes the base).
#[allow(clippy::too_many_arguments)]
pub async fn promote_in_tx(
    tx: &mut Transaction<'static, Postgres>,
    who: &Principal,
    product_id: Uuid,
    product: &str,
    channel: &str,
    release: ReleaseRef,
    how: Promotion<'_>,
    now: OffsetDateTime,
) -> Result<(ChannelRow, PromotePlan)> {
    let before = load(tx, product_id, product, channel, true).await?;
    check_may_resume(who, product, &before)?;
    let mut c = before.clone();
    let version = release.version.clone();
    let (plan, share) = match how {
        Promotion::Percent(percent, ramp) => (
            c.state.promote(release, percent, ramp, now)?,
            format!("at {}%", rollout::fmt_percent(percent)),
        ),
        Promotion::Waves(waves) => (
            c.state.promote_in_waves(release, waves, now)?,
            format!("in {} waves", waves.len()),
        ),
    };
    let reason = format!("promoted {version} {share}; {}", plan.message);
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
    Ok((c, plan))
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_channel, list_channels))
        .routes(routes!(get_channel))
        .routes(routes!(promote))
        .routes(routes!(patch_rollout))
        .routes(routes!(put_reboot_policy))
        .routes(routes!(rollback))
        .routes(routes!(history))
        .routes(routes!(channel_head_status))
}

async fn view(
    conn: &mut PgConnection,
    product_id: Uuid,
    product: &str,
    name: &str,
    now: OffsetDateTime,
) -> Result<Channel> {
    let c = load(conn, product_id, product, name, false).await?;
    let devices = sqlx::query_as!(
        DeviceCount,
        r#"SELECT current_version AS version, status, count(*) AS "count!" FROM devices
           WHERE product_id = $1 AND channel = $2 GROUP BY current_version, status ORDER BY current_version, status"#,
        product_id,
        name
    )
    .fetch_all(&mut *conn)
    .await?;
    let head = c.head();
    let (reports, failures) = gate_counts(conn, product_id, name, head.as_deref()).await?;
    let behind = devices
        .iter()
        .filter(|d| head.is_none() || d.version != head)
        .map(|d| d.count)
        .sum();
    let base = c.base();
    let rolled_back_from = if c.state.rolled_back {
        sqlx::query_scalar!(
            r#"SELECT before->>'head' AS "head" FROM channel_history
               WHERE channel_id = $1 AND action = 'rollback' ORDER BY id DESC LIMIT 1"#,
            c.id
        )
        .fetch_optional(&mut *conn)
        .await?
        .flatten()
    } else {
        None
    };
    let ChannelState {
        rollout: r,
        paused_reason,
        rolled_back,
        gate,
        reboot,
        ..
    } = c.state;
    let standing = rollout::wave_standing(&r, now);
    let waves = r
        .waves
        .as_ref()
        .zip(standing.as_ref())
        .map(|(plan, at)| WavesState {
            waves: plan.specs(),
            started_at: plan.started_at,
            current: at.index,
            current_percent: at.percent,
            next_starts_at: at.next_starts_at,
            done: at.done,
        });
    Ok(Channel {
        waves,
        reboot_policy: RebootPolicyState {
            windows_described: reboot.windows.iter().map(|w| w.describe()).collect(),
            windows: reboot.windows.iter().map(|w| w.spec()).collect(),
            lease: reboot.lease.clone(),
        },
        rollout: RolloutState {
            percent: r.percent,
            // With waves: the current wave's.
            effective_percent: standing
                .map_or_else(|| rollout::effective_percent(&r, now), |w| w.percent),
            paused: r.paused,
            ramp: r.ramp.map(|x| RampState {
                from_percent: x.from,
                to_percent: x.to,
                over_minutes: x.over_minutes,
                started_at: x.started_at,
            }),
            paused_reason,
        },
        gate: GateState {
            max_failure_percent: gate.max_failure_percent,
            min_reports: gate.min_reports,
            reports,
            failures,
            tripped: rollout::gate_tripped(gate, reports, failures),
        },
        name: c.name,
        description: c.description,
        head,
        base,
        rolled_back,
        rolled_back_from,
        serial: c.serial,
        devices,
        behind,
        updated_at: c.updated_at,
    })
}

/// [`view`] on a connection of the pool, at the server's clock.
async fn view_of(state: &AppState, product_id: Uuid, product: &str, name: &str) -> Result<Channel> {
    let now = state.clock.now();
    view(
        &mut *state.db.acquire().await?,
        product_id,
        product,
        name,
        now,
    )
    .await
}

/// Commits a change to the channel, drops the product's resolve snapshot,
/// and reads the channel back as it now stands.
async fn committed(
    state: &AppState,
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    p: &ProductRow,
    channel: &str,
) -> Result<Channel> {
    tx.commit().await?;
    state.cache.invalidate(&p.name);
    view_of(state, p.id, &p.name, channel).await
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
    // Kept by triggers on `devices` (migration 20261203000300): one row,
    // however many devices the channel has.
    let r = sqlx::query!(
        "SELECT reports, failures FROM gate_tallies WHERE product_id = $1 AND channel = $2 AND version = $3",
        product_id,
        channel,
        head
    )
    .fetch_optional(&mut *db)
    .await?;
    Ok(r.map_or((0, 0), |r| (r.reports, r.failures)))
}

/// Halts the channel's rollout if its health gate trips
/// ([`ChannelState::gate_halt`]); answers whether it did.
pub async fn check_gate(
    state: &AppState,
    product_id: Uuid,
    product: &str,
    channel: &str,
) -> Result<bool> {
    let mut tx = state.db.begin().await?;
    let before = load(&mut tx, product_id, product, channel, true).await?;
    // A paused channel (or one with no head) has nothing to halt: no count.
    if !before.state.gate_watches() {
        return Ok(false);
    }
    let (reports, failures) =
        gate_counts(&mut tx, product_id, channel, before.head().as_deref()).await?;
    let mut c = before.clone();
    let Some(reason) = c.state.gate_halt(reports, failures, state.clock.now()) else {
        return Ok(false);
    };
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
    params(ProductPath), security(("bearer" = [])),
    responses((status = 201, body = Channel), Problems<400, 401, 403, 404, 409>))]
async fn create_channel(
    State(state): State<AppState>,
    Admin(who): Admin,
    path: ProductPath,
    Json(req): Json<NewChannel>,
) -> Result<(StatusCode, Json<Channel>)> {
    if !crate::rules::names::valid_name(&req.name) {
        return Err(Error::BadRequest(format!(
            "invalid channel name {:?}: use 1–63 lowercase letters, digits and dashes",
            req.name
        )));
    }
    let p = path.load(&state.db).await?;
    let product = &p.name;
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
    crate::api::audit::record(
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
        Json(view_of(&state, p.id, product, &req.name).await?),
    ))
}

/// The channels of a product.
#[utoipa::path(get, path = "/v1/products/{product}/channels", tag = "channels",
    params(ProductPath), security(("bearer" = [])),
    responses((status = 200, body = Vec<Channel>), Problems<401, 403, 404>))]
async fn list_channels(
    State(state): State<AppState>,
    _v: ProductReader,
    path: ProductPath,
) -> Result<Json<Vec<Channel>>> {
    let p = path.load(&state.db).await?;
    let names = sqlx::query_scalar!(
        "SELECT name FROM channels WHERE product_id = $1 ORDER BY name",
        p.id
    )
    .fetch_all(&state.db)
    .await?;
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        out.push(view_of(&state, p.id, &p.name, &n).await?);
    }
    Ok(Json(out))
}

/// One channel with its rollout, gate and device counts.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}", tag = "channels",
    params(ChannelPath), security(("bearer" = [])),
    responses((status = 200, body = Channel), Problems<401, 403, 404>))]
async fn get_channel(
    State(state): State<AppState>,
    _v: ProductReader,
    path: ChannelPath,
) -> Result<Json<Channel>> {
    let p = path.load_product(&state.db).await?;
    Ok(Json(
        view_of(&state, p.id, &path.product, &path.channel).await?,
    ))
}

/// Makes a release the channel's head; the old head becomes the base only if it
/// was fully rolled out (`plan` says which; `dry_run` only says it).
#[utoipa::path(post, path = "/v1/products/{product}/channels/{channel}/promote", tag = "channels", request_body = PromoteRequest,
    params(ChannelPath), security(("bearer" = [])),
    responses((status = 200, body = PromoteResponse), Problems<400, 401, 403, 404, 409>))]
async fn promote(
    State(state): State<AppState>,
    Publisher(who): Publisher,
    path: ChannelPath,
    Json(req): Json<PromoteRequest>,
) -> Result<Json<PromoteResponse>> {
    who.check_product(&path.product)?;
    let version = crate::rules::names::parse_version(&req.version)?;
    check_percent(req.percent)?;
    let p = path.load_product(&state.db).await?;
    let mut tx = state.db.begin().await?;
    let r = crate::api::releases::load(&mut *tx, p.id, &p.name, &req.version).await?;
    if r.state == "revoked" {
        return Err(Error::Conflict(format!(
            "release {} is revoked and cannot be promoted",
            req.version
        )));
    }
    let release = ReleaseRef {
        id: r.id,
        version: version.to_string(),
    };
    let how = match &req.waves {
        Some(_) if req.percent.is_some() || req.ramp.is_some() => {
            return Err(Error::BadRequest(
                "give either waves or percent (and ramp): each wave has its own percent and ramp"
                    .into(),
            ));
        }
        Some(waves) => Promotion::Waves(waves),
        None => Promotion::Percent(
            req.percent.unwrap_or(DEFAULT_PROMOTE_PERCENT),
            req.ramp.as_ref(),
        ),
    };
    let now = state.clock.now();
    let (_, plan) = promote_in_tx(
        &mut tx,
        &who,
        p.id,
        &p.name,
        &path.channel,
        release,
        how,
        now,
    )
    .await?;
    // A dry run shows the channel as the promote leaves it, then undoes it
    // all; a promote commits first, so the channel's lock is not held while
    // the answer is read.
    let after = if req.dry_run {
        let after = view(&mut tx, p.id, &p.name, &path.channel, now).await?;
        tx.rollback().await?;
        after
    } else {
        committed(&state, tx, &p, &path.channel).await?
    };
    let warnings = crate::api::releases::stranded(
        &state.db,
        p.id,
        &p.name,
        r.id,
        &req.version,
        Some(&path.channel),
    )
    .await?;
    Ok(Json(PromoteResponse {
        channel: after,
        plan,
        dry_run: req.dry_run,
        warnings,
    }))
}

/// Changes the rollout: percent, ramp, pause/resume, gate.
#[utoipa::path(patch, path = "/v1/products/{product}/channels/{channel}/rollout", tag = "channels", request_body = RolloutPatch,
    params(ChannelPath), security(("bearer" = [])),
    responses((status = 200, body = Channel), Problems<400, 401, 403, 404>))]
async fn patch_rollout(
    State(state): State<AppState>,
    Admin(who): Admin,
    path: ChannelPath,
    Json(req): Json<RolloutPatch>,
) -> Result<Json<Channel>> {
    if req.percent.is_none() && req.ramp.is_none() && req.paused.is_none() && req.gate.is_none() {
        return Err(Error::BadRequest(
            "nothing to change: give percent, ramp, paused or gate".into(),
        ));
    }
    let mut tx = state.db.begin().await?;
    let (p, before) = path.load(&mut tx, true).await?;
    let mut c = before.clone();
    let s = &mut c.state;
    let now = state.clock.now();
    let mut what = Vec::new();
    if let Some(percent) = req.percent {
        s.set_percent(percent)?;
        what.push(format!("percent {}%", rollout::fmt_percent(percent)));
    }
    if let Some(r) = &req.ramp {
        s.ramp(r, now)?;
        what.push(format!(
            "ramp to {}% over {} min",
            rollout::fmt_percent(r.to_percent),
            rollout::fmt_percent(r.over_minutes)
        ));
    }
    if let Some(g) = &req.gate {
        s.set_gate(g)?;
        what.push(format!(
            "gate {}% after {} reports",
            rollout::fmt_percent(g.max_failure_percent),
            g.min_reports
        ));
    }
    let mut action = "rollout";
    match req.paused {
        Some(true) if s.pause(format!("paused by {}", who.actor()), now) => {
            action = "pause";
            what.push("paused".into());
        }
        Some(false) if s.resume(now) => {
            action = "resume";
            what.push("resumed".into());
        }
        _ => {}
    }
    changed(
        &mut tx,
        &who.actor(),
        &p.name,
        &before,
        action,
        Some(what.join(", ")),
        &c,
    )
    .await?;
    Ok(Json(committed(&state, tx, &p, &path.channel).await?))
}

/// Sets the channel's reboot policy: maintenance windows (weekly, in a named
/// time zone, optionally per label selector) and reboot leases (at most N
/// devices, or N %, of a group between reboot and boot assessment). Devices
/// stage at any time and reboot only as the policy allows; the signed
/// resolve answer tells each device (`reboot`).
#[utoipa::path(put, path = "/v1/products/{product}/channels/{channel}/reboot-policy", tag = "channels", request_body = RebootPolicySpec,
    params(ChannelPath), security(("bearer" = [])),
    responses((status = 200, body = Channel), Problems<400, 401, 403, 404>))]
async fn put_reboot_policy(
    State(state): State<AppState>,
    Admin(who): Admin,
    path: ChannelPath,
    Json(req): Json<RebootPolicySpec>,
) -> Result<Json<Channel>> {
    let mut tx = state.db.begin().await?;
    let (p, before) = path.load(&mut tx, true).await?;
    let mut c = before.clone();
    c.state.set_reboot_policy(&req)?;
    let r = &c.state.reboot;
    let windows = match r.windows.len() {
        0 => "reboots at any time".to_string(),
        _ => format!(
            "reboots in {}",
            r.windows
                .iter()
                .map(|w| w.describe())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    let lease = match &r.lease {
        None => "no reboot lease".to_string(),
        Some(l) => format!(
            "reboot leases: {}{}{}",
            [
                l.max_devices.map(|n| format!("at most {n} devices")),
                l.max_percent
                    .map(|x| format!("at most {} %", rollout::fmt_percent(x))),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and "),
            l.per_label
                .as_ref()
                .map(|k| format!(" per {k}"))
                .unwrap_or_default(),
            format_args!(", expiring after {} min", l.ttl_minutes)
        ),
    };
    changed(
        &mut tx,
        &who.actor(),
        &p.name,
        &before,
        "reboot_policy",
        Some(format!("{windows}; {lease}")),
        &c,
    )
    .await?;
    Ok(Json(committed(&state, tx, &p, &path.channel).await?))
}

/// Rolls the channel back: the head becomes the given release (default: the
/// base) at 100 %, and devices may move down to it.
#[utoipa::path(post, path = "/v1/products/{product}/channels/{channel}/rollback", tag = "channels", request_body = RollbackRequest,
    params(ChannelPath), security(("bearer" = [])),
    responses((status = 200, body = Channel), Problems<400, 401, 403, 404, 409>))]
async fn rollback(
    State(state): State<AppState>,
    Admin(who): Admin,
    path: ChannelPath,
    Json(req): Json<RollbackRequest>,
) -> Result<Json<Channel>> {
    let mut tx = state.db.begin().await?;
    let (p, before) = path.load(&mut tx, true).await?;
    let version = match (&req.version, before.base()) {
        (Some(v), _) => v.clone(),
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Error::Conflict(format!(
                "channel {} has no base to roll back to: name a version",
                path.channel
            )));
        }
    };
    let target = crate::api::releases::load(&mut *tx, p.id, &p.name, &version).await?;
    if target.state == "revoked" {
        return Err(Error::Conflict(format!(
            "release {version} is revoked: roll back to another version"
        )));
    }
    let mut c = before.clone();
    let reason = c.state.rollback(ReleaseRef {
        id: target.id,
        version: version.clone(),
    });
    changed(
        &mut tx,
        &who.actor(),
        &p.name,
        &before,
        "rollback",
        Some(reason),
        &c,
    )
    .await?;
    Ok(Json(committed(&state, tx, &p, &path.channel).await?))
}

/// Every change to the channel, newest first.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/history", tag = "channels",
    params(ChannelPath, PageParams), security(("bearer" = [])),
    responses((status = 200, body = Page<HistoryEntry>), Problems<401, 403, 404>))]
async fn history(
    State(state): State<AppState>,
    _v: ProductReader,
    path: ChannelPath,
    Query(page): Query<PageParams>,
) -> Result<Json<Page<HistoryEntry>>> {
    let mut conn = state.db.acquire().await?;
    let (_, c) = path.load(&mut conn, false).await?;
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
        crate::infra::registry::best_fit(&self.archs[i], arch, |(a, v)| (a.as_str(), v.as_deref()))
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
    labels: SqlJson<Labels>,
    /// While staged: what it said it waits for.
    staged: Option<String>,
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
    let index = |r: Option<&ReleaseRef>| r.and_then(|r| rules.by_id.get(&r.id)).copied();
    let head_idx = index(c.state.head.as_ref());
    let head = head_idx.map(|i| &rules.rels[i]);
    let pin_image;
    let pin = match (&d.pin_version, &d.pin_digest) {
        (Some(v), _) => rules.by_version.get(v).map(|&i| &rules.rels[i]),
        (None, Some(digest)) => {
            pin_image = semver::Version::parse(&crate::api::devices::pin_version_label(digest))
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
    let input = rollout::Input {
        releases: &rules.rels,
        head,
        base: index(c.state.base.as_ref()).map(|i| &rules.rels[i]),
        rollout: &c.state.rollout,
        rolled_back: c.state.rolled_back,
        pin,
        device_id: &device_id,
        labels: &d.labels.0,
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
        failed_head: c.head().as_deref().and_then(failed),
        // An image pin carries its own platforms; it is explained as a pin first.
        target_has_arch: target_idx.is_none_or(|i| rules.fits(i, &d.arch)),
        failed_target: failed(&target_name),
        updating: matches!(d.status.as_str(), "downloading" | "applying" | "rebooting")
            && d.status_version.as_deref() == Some(target_name.as_str()),
        staged: d
            .staged
            .clone()
            .filter(|_| d.status_version.as_deref() == Some(target_name.as_str())),
        asked_since_change: d.last_seen >= c.updated_at
            || d.offered
                .iter()
                .any(|o| o.split_once('@').is_some_and(|(v, _)| v == target_name)),
        paused_reason: c.state.paused_reason.clone(),
        device_revoked: d.revoked,
    };
    let e = rollout::explain(&input, &decision, why, &facts);
    HeadStatus {
        on_head: e.on_head,
        reason: e.reason,
        message: e.message,
        head: c.head(),
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
               AND (e.kind = ANY($4) OR e.kind = 'failure_cleared') AND e.version IS NOT NULL
             ORDER BY e.device_id, e.version, e.id DESC) latest
           WHERE kind = ANY($4)"#,
        product_id,
        channel,
        device,
        &EventKind::names(&EventKind::FAILURES) as &[&str]
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
                  revoked_at IS NOT NULL AS "revoked!", labels AS "labels: SqlJson<Labels>",
                  CASE WHEN status = 'staged' THEN
                    coalesce((SELECT e.message FROM device_events e WHERE e.device_id = devices.id AND e.kind = 'staged'
                              ORDER BY e.id DESC LIMIT 1), 'the reboot policy')
                  END AS staged
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
    state: &AppState,
    product: &str,
    channel: &str,
    device: Uuid,
) -> Result<Option<HeadStatus>> {
    let mut conn = state.db.acquire().await?;
    let p = crate::api::products::load(&mut *conn, product).await?;
    let c = match load(&mut conn, p.id, product, channel, false).await {
        Ok(c) => c,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let rules = product_rules(&mut conn, p.id).await?;
    let failed = failures(&mut conn, p.id, channel, Some(device)).await?;
    let now = state.clock.now();
    Ok(device_facts(&mut conn, p.id, channel, Some(device))
        .await?
        .first()
        .map(|d| device_head_status(&rules, &c, d, &failed, now)))
}

/// How many of the channel's devices run its head, and why the others do not.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/head-status", tag = "channels",
    params(ChannelPath), security(("bearer" = [])),
    responses((status = 200, body = ChannelHeadStatus), Problems<401, 403, 404>))]
async fn channel_head_status(
    State(state): State<AppState>,
    _v: ProductReader,
    path: ChannelPath,
) -> Result<Json<ChannelHeadStatus>> {
    let mut conn = state.db.acquire().await?;
    let (p, c) = path.load(&mut conn, false).await?;
    let rules = product_rules(&mut conn, p.id).await?;
    let failed = failures(&mut conn, p.id, &path.channel, None).await?;
    let devices = device_facts(&mut conn, p.id, &path.channel, None).await?;
    let now = state.clock.now();
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
        head: c.head(),
        devices: devices.len() as i64,
        on_head,
        not_on_head,
    }))
}
