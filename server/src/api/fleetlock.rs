//! Reboot leases, spoken as the FleetLock protocol (Zincati's): a counting
//! semaphore per group whose locks are owned and recursive. Sluice devices
//! take a lease in their channel's group before they reboot; other FleetLock
//! clients use groups an admin configures, named by the secret in their base
//! URL. Admins list the holders and free a stuck lease.

use crate::api::auth::{Admin, DeviceAuth, ProductReader, Viewer, hash_secret, random_secret};
use crate::api::channels::ChannelPath;
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Path, Result};
use crate::rules::policy::{Labels, LeaseSpec, RebootPolicy, RebootPolicySpec};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sluice_protocol::{FleetLockClient, FleetLockError, FleetLockRequest};
use time::{Duration, OffsetDateTime};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// The header every FleetLock request carries, with the value `true`.
pub const PROTOCOL_HEADER: &str = "fleet-lock-protocol";

/// Longest group name and client id accepted.
const MAX_NAME: usize = 128;

/// A FleetLock answer that is not a success: the status and the body
/// Zincati reads (`kind`, `value`).
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    kind: &'static str,
    value: String,
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, kind: &'static str, value: impl Into<String>) -> Self {
        Refusal {
            status,
            kind,
            value: value.into(),
            retry_after: None,
        }
    }

    fn bad_request(value: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, "bad_request", value)
    }

    fn forbidden(value: impl Into<String>) -> Self {
        Refusal::new(StatusCode::FORBIDDEN, "unauthorized", value)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = FleetLockError {
            kind: self.kind.into(),
            value: self.value,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The server's errors (a device token refused, the database down) as
/// FleetLock bodies, internals hidden as `Error` hides them.
impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        let status = e.status();
        let kind = match status.as_u16() {
            400 => "bad_request",
            401 | 403 => "unauthorized",
            404 => "not_found",
            413 => "too_large",
            429 => "rate_limited",
            503 => "unavailable",
            _ => "internal",
        };
        let retry_after = match &e {
            Error::TooManyRequests(_, secs) => Some(*secs),
            _ => None,
        };
        let value = match &e {
            Error::Database(_) if status == StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(error = %e, "database unavailable");
                "the database is unavailable; retry in a few seconds".into()
            }
            Error::Database(_) if status == StatusCode::BAD_REQUEST => {
                "a value in the request is invalid or out of range".into()
            }
            Error::Database(_) | Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                "internal server error; the server log has the details".into()
            }
            other => other.to_string(),
        };
        Refusal {
            status,
            kind,
            value,
            retry_after,
        }
    }
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(e).into()
    }
}

/// A FleetLock answer.
type Answer = std::result::Result<StatusCode, Refusal>;

/// Checks the protocol header and reads the body: who asks, in which group.
fn read_request(
    headers: &HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<FleetLockClient, Refusal> {
    let header_ok = headers
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !header_ok {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "missing_header",
            format!(
                "send the header `{PROTOCOL_HEADER}: true`: the FleetLock protocol requires it"
            ),
        ));
    }
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the body is too large; a FleetLock body is a few dozen bytes",
        ),
        _ => Refusal::bad_request(format!("unreadable body: {}", r.body_text())),
    })?;
    let req: FleetLockRequest = serde_json::from_slice(&body).map_err(|e| {
        Refusal::bad_request(format!(
            "invalid FleetLock body ({e}); send {{\"client_params\": {{\"id\": \"<machine id>\", \"group\": \"<group>\"}}}}"
        ))
    })?;
    let c = req.client_params;
    if !valid_group(&c.group) {
        return Err(Refusal::bad_request(format!(
            "invalid group {:?}: a group is 1 to {MAX_NAME} of `a-z A-Z 0-9 . -`",
            c.group
        )));
    }
    let id_len = c.id.chars().count();
    if id_len == 0 || id_len > MAX_NAME || c.id.chars().any(char::is_control) {
        return Err(Refusal::bad_request(format!(
            "invalid id {:?}: an id is 1 to {MAX_NAME} printable characters (the machine id)",
            c.id
        )));
    }
    Ok(c)
}

/// FleetLock's group alphabet: `[a-zA-Z0-9.-]{1,128}`.
pub fn valid_group(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-'))
}

/// How many leases a group of `devices` devices allows under `lease`, and
/// the reason in words: `max_devices`, `max_percent` of the devices
/// (rounded down, at least 1), the lower of both when both are set.
pub fn lease_limit(lease: &LeaseSpec, devices: i64) -> (i64, String) {
    let by_percent = lease.max_percent.map(|p| {
        let n = (p * devices as f64 / 100.0).floor() as i64;
        (n.max(1), format!("{p} % of its {devices} devices"))
    });
    let by_count = lease
        .max_devices
        .map(|m| (i64::from(m), format!("at most {m} devices")));
    match (by_count, by_percent) {
        (Some(c), Some(p)) if c.0 <= p.0 => c,
        (Some(_), Some(p)) | (None, Some(p)) => p,
        (Some(c), None) => c,
        // The policy's checks require one of them; one at a time is the safe reading.
        (None, None) => (1, "one device at a time".into()),
    }
}

/// Takes (or refreshes) `holder`'s lease in `group`, allowing `max` holders;
/// refuses with 409 when the group is full. Serialized per group across
/// every server process by an advisory lock held until the commit.
async fn acquire(
    state: &AppState,
    group: &str,
    holder: &str,
    (max, why): (i64, String),
    ttl: Duration,
) -> Answer {
    let now = state.clock.now();
    let expires_at = now + ttl;
    let mut tx = state.db.begin().await?;
    sqlx::query!(
        "SELECT FROM pg_advisory_xact_lock(hashtextextended('reboot-lease:' || $1, 0))",
        group
    )
    .execute(&mut *tx)
    .await?;
    // A holder that died or never gave its lease back frees it on expiry.
    sqlx::query!(
        "DELETE FROM reboot_leases WHERE group_name = $1 AND expires_at <= $2",
        group,
        now
    )
    .execute(&mut *tx)
    .await?;
    // Recursive: a holder asking again keeps its lease, for another ttl.
    let refreshed = sqlx::query!(
        "UPDATE reboot_leases SET expires_at = $3 WHERE group_name = $1 AND holder = $2",
        group,
        holder,
        expires_at
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if refreshed == 0 {
        let held = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM reboot_leases WHERE group_name = $1"#,
            group
        )
        .fetch_one(&mut *tx)
        .await?;
        if held >= max {
            let first = sqlx::query!(
                "SELECT holder, expires_at FROM reboot_leases WHERE group_name = $1
                 ORDER BY expires_at, holder LIMIT 5",
                group
            )
            .fetch_all(&mut *tx)
            .await?;
            let mut names: Vec<String> = first.iter().map(|r| r.holder.clone()).collect();
            if held > names.len() as i64 {
                names.push(format!("and {} more", held - names.len() as i64));
            }
            let next = first
                .first()
                .and_then(|r| {
                    r.expires_at
                        .format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "lease_unavailable",
                format!(
                    "group {group} holds {held} of {max} reboot leases ({}; limit: {why}); try again later (the first expires at {next} unless given back sooner)",
                    names.join(", ")
                ),
            ));
        }
        sqlx::query!(
            "INSERT INTO reboot_leases (group_name, holder, acquired_at, expires_at) VALUES ($1, $2, $3, $4)",
            group,
            holder,
            now,
            expires_at
        )
        .execute(&mut *tx)
        .await?;
        tracing::info!(group, holder, "reboot lease taken");
    }
    tx.commit().await?;
    Ok(StatusCode::OK)
}

/// Gives back `holder`'s lease in `group`; holding none is fine.
async fn release(state: &AppState, group: &str, holder: &str) -> Answer {
    let gone = sqlx::query!(
        "DELETE FROM reboot_leases WHERE group_name = $1 AND holder = $2",
        group,
        holder
    )
    .execute(&state.db)
    .await?
    .rows_affected();
    if gone > 0 {
        tracing::info!(group, holder, "reboot lease given back");
    }
    Ok(StatusCode::OK)
}

/// A device's lease group and its limit now.
struct DeviceGroup {
    name: String,
    limit: (i64, String),
    ttl: Duration,
}

/// The lease group a device must ask in, from its channel's reboot policy
/// and its labels; None when the policy coordinates no reboots. Refuses a
/// request for another device's lease or in another group.
async fn device_group(
    state: &AppState,
    device: &DeviceAuth,
    client: &FleetLockClient,
) -> std::result::Result<Option<DeviceGroup>, Refusal> {
    if client.id.parse::<Uuid>().ok() != Some(device.id) {
        return Err(Refusal::forbidden(format!(
            "a device takes and gives back only its own lease: send its device id {} as client_params.id, not {:?}",
            device.id, client.id
        )));
    }
    let row = sqlx::query!(
        r#"SELECT d.product_id, d.channel, d.labels, c.reboot_policy AS "reboot_policy?"
           FROM devices d LEFT JOIN channels c ON c.product_id = d.product_id AND c.name = d.channel
           WHERE d.id = $1"#,
        device.id
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this device has been deleted by an admin: enroll again",
        )
    })?;
    let policy = stored_policy(row.reboot_policy, &row.channel);
    let labels = labels_of(&row.labels);
    let (Some(name), Some(lease)) = (
        policy.lease_group(&device.product, &row.channel, &labels),
        policy.lease.as_ref(),
    ) else {
        return Ok(None);
    };
    if client.group != name {
        return Err(Refusal::forbidden(format!(
            "device {} reboots in lease group {name}, not {}: ask in the group its resolve answer names",
            device.id, client.group
        )));
    }
    // The group's devices: the channel's, split by the label's value when
    // the policy says so (grouped as `lease_group` groups, one rule).
    let counts = sqlx::query!(
        r#"SELECT labels ->> $3::text AS value, count(*) AS "n!" FROM devices
           WHERE product_id = $1 AND channel = $2 AND revoked_at IS NULL GROUP BY 1"#,
        row.product_id,
        row.channel,
        lease.per_label
    )
    .fetch_all(&state.db)
    .await?;
    let devices = counts
        .iter()
        .filter(|r| {
            let labels: Labels = match (&lease.per_label, &r.value) {
                (Some(k), Some(v)) => [(k.clone(), v.clone())].into(),
                _ => Labels::new(),
            };
            policy.lease_group(&device.product, &row.channel, &labels) == Some(name.clone())
        })
        .map(|r| r.n)
        .sum();
    Ok(Some(DeviceGroup {
        limit: lease_limit(lease, devices),
        ttl: Duration::minutes(i64::from(lease.ttl_minutes)),
        name,
    }))
}

/// The channel's stored reboot policy; none when the channel is gone, and,
/// as the channel's own reader does, none (logged) when it no longer parses.
fn stored_policy(stored: Option<serde_json::Value>, channel: &str) -> RebootPolicy {
    let Some(value) = stored else {
        return RebootPolicy::default();
    };
    serde_json::from_value::<RebootPolicySpec>(value)
        .map_err(|e| e.to_string())
        .and_then(|spec| RebootPolicy::new(&spec).map_err(|e| e.0))
        .inspect_err(|e| tracing::error!(channel, "stored reboot policy unreadable: {e}"))
        .unwrap_or_default()
}

/// A device's labels as stored (a JSON object of strings).
fn labels_of(value: &serde_json::Value) -> Labels {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A FleetLock group for other clients, as an admin configures it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    /// At most this many machines reboot at once (1 to 10000).
    pub max_holders: i64,
    /// A lease not given back after this many minutes expires (1 to 1440,
    /// default 30), so a machine that died holding one does not block the rest.
    #[serde(default = "thirty")]
    pub ttl_minutes: i64,
}

fn thirty() -> i64 {
    30
}

/// One lease held now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseHolder {
    /// The holder's id (a device id, or a FleetLock client's machine id).
    pub id: String,
    /// When it took the lease.
    #[serde(with = "time::serde::rfc3339")]
    pub acquired_at: OffsetDateTime,
    /// When the lease expires unless given back or asked for again.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A FleetLock group and who holds its leases now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FleetLockGroup {
    /// Its name, the `group` its clients send.
    pub name: String,
    /// How many may hold a lease at once.
    pub max_holders: i32,
    /// Minutes a lease lasts.
    pub ttl_minutes: i32,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The leases held now.
    pub holders: Vec<LeaseHolder>,
}

/// A group as configured, with its new secret: shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfiguredGroup {
    /// Its name.
    pub name: String,
    /// How many may hold a lease at once.
    pub max_holders: i32,
    /// Minutes a lease lasts.
    pub ttl_minutes: i32,
    /// The secret that names the group; the one before stops working.
    pub secret: String,
    /// Zincati's `base_url` is this server's address followed by this path
    /// (`https://sluice.example/fleetlock/<secret>/`).
    pub base_path: String,
}

/// A lease in one of a channel's groups.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChannelLease {
    /// The lease group (`<product>.<channel>`, or `.<label value>` after it).
    pub group: String,
    /// The device holding it.
    pub id: String,
    /// When it took the lease.
    #[serde(with = "time::serde::rfc3339")]
    pub acquired_at: OffsetDateTime,
    /// When the lease expires unless given back or asked for again.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(device_pre_reboot))
        .routes(routes!(device_steady_state))
        .routes(routes!(client_pre_reboot))
        .routes(routes!(client_steady_state))
        .routes(routes!(list_fleetlock_groups))
        .routes(routes!(put_fleetlock_group, delete_fleetlock_group))
        .routes(routes!(channel_leases))
        .routes(routes!(free_lease))
}

/// FleetLock `pre-reboot` for a Sluice device: takes a lease in the group
/// its channel's reboot policy puts it in (or keeps the one it holds, for
/// another ttl). 200: reboot now; also when the policy coordinates no
/// reboots (nothing to wait for). 409: the group is full, ask again later.
#[utoipa::path(post, path = "/v1/pre-reboot", tag = "leases",
    request_body = FleetLockRequest, security(("bearer" = [])),
    params(("fleet-lock-protocol" = String, Header, description = "`true`")),
    responses(
        (status = 200, description = "The device holds a lease (or needs none): it may reboot"),
        (status = 400, body = FleetLockError, description = "No protocol header, or a malformed body"),
        (status = 401, body = FleetLockError, description = "No valid device token"),
        (status = 403, body = FleetLockError, description = "Another device's id, or another group"),
        (status = 409, body = FleetLockError, description = "Every lease of the group is held"),
        (status = 429, body = FleetLockError, description = "Too many requests from this device"),
    ))]
async fn device_pre_reboot(
    State(state): State<AppState>,
    device: std::result::Result<DeviceAuth, Error>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Answer {
    let device = device?;
    let client = read_request(&headers, body)?;
    match device_group(&state, &device, &client).await? {
        None => Ok(StatusCode::OK),
        Some(g) => acquire(&state, &g.name, &client.id, g.limit, g.ttl).await,
    }
}

/// FleetLock `steady-state` for a Sluice device: gives back its lease once
/// the new slot passed its boot assessment. 200 also when it holds none.
#[utoipa::path(post, path = "/v1/steady-state", tag = "leases",
    request_body = FleetLockRequest, security(("bearer" = [])),
    params(("fleet-lock-protocol" = String, Header, description = "`true`")),
    responses(
        (status = 200, description = "The device holds no lease now"),
        (status = 400, body = FleetLockError, description = "No protocol header, or a malformed body"),
        (status = 401, body = FleetLockError, description = "No valid device token"),
        (status = 403, body = FleetLockError, description = "Another device's id, or another group"),
        (status = 429, body = FleetLockError, description = "Too many requests from this device"),
    ))]
async fn device_steady_state(
    State(state): State<AppState>,
    device: std::result::Result<DeviceAuth, Error>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Answer {
    let device = device?;
    let client = read_request(&headers, body)?;
    match device_group(&state, &device, &client).await? {
        None => Ok(StatusCode::OK),
        Some(g) => release(&state, &g.name, &client.id).await,
    }
}

/// The group a secret names, or 401.
async fn group_of_secret(
    state: &AppState,
    secret: std::result::Result<axum::extract::Path<String>, PathRejection>,
) -> std::result::Result<(String, i64, Duration), Refusal> {
    let unknown = || {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown FleetLock secret: set base_url to `<server>/fleetlock/<secret>/` with the secret \
             `PUT /v1/fleetlock/groups/{group}` answered last (each PUT makes a new one)",
        )
    };
    let axum::extract::Path(secret) = secret.map_err(|_| unknown())?;
    // Looked up by its hash: the time taken tells nothing about the secret.
    let row = sqlx::query!(
        "SELECT name, max_holders, ttl_minutes FROM fleetlock_groups WHERE secret_sha256 = $1",
        hash_secret(&secret)
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(unknown)?;
    Ok((
        row.name,
        i64::from(row.max_holders),
        Duration::minutes(i64::from(row.ttl_minutes)),
    ))
}

/// Refuses a body naming another group than the secret's.
fn check_group(group: &str, client: &FleetLockClient) -> std::result::Result<(), Refusal> {
    if client.group == group {
        Ok(())
    } else {
        Err(Refusal::forbidden(format!(
            "this base_url's secret is for group {group}, not {}: set the machine's group to {group}, \
             or use the secret of group {}",
            client.group, client.group
        )))
    }
}

/// FleetLock `pre-reboot` for other clients (Zincati with `base_url =
/// <server>/fleetlock/<secret>/`): takes or keeps a lease in the secret's group.
#[utoipa::path(post, path = "/fleetlock/{secret}/v1/pre-reboot", tag = "leases",
    request_body = FleetLockRequest,
    params(
        ("secret" = String, Path, description = "The group's secret, from `PUT /v1/fleetlock/groups/{group}`"),
        ("fleet-lock-protocol" = String, Header, description = "`true`"),
    ),
    responses(
        (status = 200, description = "The machine holds a lease: it may reboot"),
        (status = 400, body = FleetLockError, description = "No protocol header, or a malformed body"),
        (status = 401, body = FleetLockError, description = "Unknown secret"),
        (status = 403, body = FleetLockError, description = "The body names another group"),
        (status = 409, body = FleetLockError, description = "Every lease of the group is held"),
    ))]
async fn client_pre_reboot(
    State(state): State<AppState>,
    secret: std::result::Result<axum::extract::Path<String>, PathRejection>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Answer {
    let (group, max, ttl) = group_of_secret(&state, secret).await?;
    let client = read_request(&headers, body)?;
    check_group(&group, &client)?;
    let why = format!("at most {max} machines");
    acquire(&state, &group, &client.id, (max, why), ttl).await
}

/// FleetLock `steady-state` for other clients: gives back the machine's
/// lease in the secret's group; 200 also when it holds none.
#[utoipa::path(post, path = "/fleetlock/{secret}/v1/steady-state", tag = "leases",
    request_body = FleetLockRequest,
    params(
        ("secret" = String, Path, description = "The group's secret, from `PUT /v1/fleetlock/groups/{group}`"),
        ("fleet-lock-protocol" = String, Header, description = "`true`"),
    ),
    responses(
        (status = 200, description = "The machine holds no lease now"),
        (status = 400, body = FleetLockError, description = "No protocol header, or a malformed body"),
        (status = 401, body = FleetLockError, description = "Unknown secret"),
        (status = 403, body = FleetLockError, description = "The body names another group"),
    ))]
async fn client_steady_state(
    State(state): State<AppState>,
    secret: std::result::Result<axum::extract::Path<String>, PathRejection>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Answer {
    let (group, _, _) = group_of_secret(&state, secret).await?;
    let client = read_request(&headers, body)?;
    check_group(&group, &client)?;
    release(&state, &group, &client.id).await
}

/// The FleetLock groups for other clients, with who holds their leases now.
#[utoipa::path(get, path = "/v1/fleetlock/groups", tag = "leases", security(("bearer" = [])),
    responses((status = 200, body = Vec<FleetLockGroup>), Problems<401, 403>))]
async fn list_fleetlock_groups(
    State(state): State<AppState>,
    _v: Viewer,
) -> Result<Json<Vec<FleetLockGroup>>> {
    let groups = sqlx::query!(
        "SELECT name, max_holders, ttl_minutes, created_at FROM fleetlock_groups ORDER BY name"
    )
    .fetch_all(&state.db)
    .await?;
    let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
    let holders = sqlx::query!(
        "SELECT group_name, holder, acquired_at, expires_at FROM reboot_leases
         WHERE group_name = ANY($1) AND expires_at > $2 ORDER BY acquired_at, holder",
        &names,
        state.clock.now()
    )
    .fetch_all(&state.db)
    .await?;
    Ok(Json(
        groups
            .into_iter()
            .map(|g| FleetLockGroup {
                holders: holders
                    .iter()
                    .filter(|h| h.group_name == g.name)
                    .map(|h| LeaseHolder {
                        id: h.holder.clone(),
                        acquired_at: h.acquired_at,
                        expires_at: h.expires_at,
                    })
                    .collect(),
                name: g.name,
                max_holders: g.max_holders,
                ttl_minutes: g.ttl_minutes,
                created_at: g.created_at,
            })
            .collect(),
    ))
}

/// Makes or changes a FleetLock group for other clients (Zincati), and
/// answers a new secret for their `base_url`: shown this once, and the
/// group's secret before it stops working. Leases held stay held.
#[utoipa::path(put, path = "/v1/fleetlock/groups/{group}", tag = "leases",
    request_body = GroupSettings, security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name, `[a-zA-Z0-9.-]{1,128}`")),
    responses((status = 200, body = ConfiguredGroup), Problems<400, 401, 403, 409>))]
async fn put_fleetlock_group(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(group): Path<String>,
    Json(req): Json<GroupSettings>,
) -> Result<Json<ConfiguredGroup>> {
    if !valid_group(&group) {
        return Err(Error::BadRequest(format!(
            "invalid group {group:?}: a group is 1 to {MAX_NAME} of `a-z A-Z 0-9 . -`"
        )));
    }
    if !(1..=10_000).contains(&req.max_holders) {
        return Err(Error::BadRequest(
            "max_holders must be between 1 and 10000".into(),
        ));
    }
    if !(1..=1440).contains(&req.ttl_minutes) {
        return Err(Error::BadRequest(
            "ttl_minutes must be between 1 and 1440 (a day)".into(),
        ));
    }
    let (max_holders, ttl_minutes) = (req.max_holders as i32, req.ttl_minutes as i32);
    let mut tx = state.db.begin().await?;
    // Devices' groups are `<product>.<channel>...`: one name, one semaphore.
    if let Some(product) = sqlx::query_scalar!(
        "SELECT name FROM products WHERE starts_with($1, name || '.') LIMIT 1",
        group
    )
    .fetch_optional(&mut *tx)
    .await?
    {
        return Err(Error::Conflict(format!(
            "group names starting with `{product}.` are the reboot-lease groups of product {product}'s \
             channels; pick a name that does not start with `{product}.`"
        )));
    }
    let before = sqlx::query!(
        "SELECT max_holders, ttl_minutes FROM fleetlock_groups WHERE name = $1 FOR UPDATE",
        group
    )
    .fetch_optional(&mut *tx)
    .await?
    .map(|b| serde_json::json!({"max_holders": b.max_holders, "ttl_minutes": b.ttl_minutes}));
    let secret = random_secret(32);
    sqlx::query!(
        "INSERT INTO fleetlock_groups (name, max_holders, ttl_minutes, secret_sha256, created_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (name) DO UPDATE SET max_holders = excluded.max_holders,
             ttl_minutes = excluded.ttl_minutes, secret_sha256 = excluded.secret_sha256",
        group,
        max_holders,
        ttl_minutes,
        hash_secret(&secret),
        state.clock.now()
    )
    .execute(&mut *tx)
    .await?;
    let after = serde_json::json!({"max_holders": max_holders, "ttl_minutes": ttl_minutes});
    crate::api::audit::record(
        &mut *tx,
        &who,
        "fleetlock_group.put",
        &format!("fleetlock_group:{group}"),
        before,
        Some(after),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(ConfiguredGroup {
        base_path: format!("/fleetlock/{secret}/"),
        name: group,
        max_holders,
        ttl_minutes,
        secret,
    }))
}

/// Deletes a FleetLock group and its leases: its secret stops working.
#[utoipa::path(delete, path = "/v1/fleetlock/groups/{group}", tag = "leases", security(("bearer" = [])),
    params(("group" = String, Path, description = "Group name")),
    responses((status = 204), Problems<401, 403, 404>))]
async fn delete_fleetlock_group(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(group): Path<String>,
) -> Result<StatusCode> {
    let mut tx = state.db.begin().await?;
    let gone = sqlx::query!(
        "DELETE FROM fleetlock_groups WHERE name = $1 RETURNING max_holders, ttl_minutes",
        group
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::not_found(format!("FleetLock group {group}")))?;
    sqlx::query!("DELETE FROM reboot_leases WHERE group_name = $1", group)
        .execute(&mut *tx)
        .await?;
    crate::api::audit::record(
        &mut *tx,
        &who,
        "fleetlock_group.delete",
        &format!("fleetlock_group:{group}"),
        Some(serde_json::json!({"max_holders": gone.max_holders, "ttl_minutes": gone.ttl_minutes})),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The reboot leases held now in a channel's groups (`<product>.<channel>`
/// and, split per label, `<product>.<channel>.<value>`).
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/leases", tag = "leases",
    params(ChannelPath), security(("bearer" = [])),
    responses((status = 200, body = Vec<ChannelLease>), Problems<401, 403, 404>))]
async fn channel_leases(
    State(state): State<AppState>,
    _r: ProductReader,
    path: ChannelPath,
) -> Result<Json<Vec<ChannelLease>>> {
    let mut conn = state.db.acquire().await?;
    path.load(&mut conn, false).await?;
    // Product and channel names hold no dots: the prefix names this channel's groups only.
    let base = format!("{}.{}", path.product, path.channel);
    let rows = sqlx::query_as!(
        ChannelLease,
        r#"SELECT group_name AS "group", holder AS id, acquired_at, expires_at FROM reboot_leases
           WHERE (group_name = $1 OR starts_with(group_name, $1 || '.')) AND expires_at > $2
           ORDER BY group_name, acquired_at, holder"#,
        base,
        state.clock.now()
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(rows))
}

/// Frees one lease (a holder stuck before its lease expires), recorded in
/// the audit log.
#[utoipa::path(delete, path = "/v1/leases/{group}/{id}", tag = "leases", security(("bearer" = [])),
    params(
        ("group" = String, Path, description = "The lease group"),
        ("id" = String, Path, description = "The holder's id"),
    ),
    responses((status = 204), Problems<401, 403, 404>))]
async fn free_lease(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path((group, id)): Path<(String, String)>,
) -> Result<StatusCode> {
    let mut tx = state.db.begin().await?;
    let gone = sqlx::query!(
        "DELETE FROM reboot_leases WHERE group_name = $1 AND holder = $2 RETURNING acquired_at, expires_at",
        group,
        id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::not_found(format!("reboot lease of {id} in group {group}")))?;
    let before = serde_json::json!({
        "acquired_at": gone.acquired_at.format(&time::format_description::well_known::Rfc3339).ok(),
        "expires_at": gone.expires_at.format(&time::format_description::well_known::Rfc3339).ok(),
    });
    crate::api::audit::record(
        &mut *tx,
        &who,
        "lease.free",
        &format!("lease:{group}/{id}"),
        Some(before),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(max_devices: Option<u32>, max_percent: Option<f64>) -> LeaseSpec {
        LeaseSpec {
            max_devices,
            max_percent,
            per_label: None,
            ttl_minutes: 30,
        }
    }

    #[test]
    fn limit_is_the_lower_of_count_and_percent_rounded_down_at_least_one() {
        assert_eq!(lease_limit(&lease(Some(3), None), 200).0, 3);
        assert_eq!(lease_limit(&lease(None, Some(20.0)), 10).0, 2);
        assert_eq!(lease_limit(&lease(None, Some(20.0)), 14).0, 2);
        assert_eq!(lease_limit(&lease(None, Some(30.0)), 10).0, 3);
        assert_eq!(lease_limit(&lease(None, Some(20.0)), 4).0, 1);
        assert_eq!(lease_limit(&lease(None, Some(20.0)), 0).0, 1);
        assert_eq!(lease_limit(&lease(Some(5), Some(10.0)), 1000).0, 5);
        assert_eq!(lease_limit(&lease(Some(50), Some(10.0)), 100).0, 10);
        assert_eq!(lease_limit(&lease(None, Some(100.0)), 7).0, 7);
    }

    #[test]
    fn group_names_use_fleetlocks_alphabet() {
        assert!(valid_group("default"));
        assert!(valid_group("acme-os.stable.site-a"));
        assert!(valid_group(&"a".repeat(128)));
        assert!(!valid_group(&"a".repeat(129)));
        assert!(!valid_group(""));
        assert!(!valid_group("a/b"));
        assert!(!valid_group("a_b"));
        assert!(!valid_group("é"));
    }
}
