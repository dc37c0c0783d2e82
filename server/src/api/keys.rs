//! The key handlers: the public keys and key lists devices fetch, the
//! key status for admins, and rotation, activation and revocation. The
//! store behind them is `infra::keystore`.

use crate::api::auth::{Admin, Viewer};
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Path, Query, Result};
use crate::infra::keystore::{ACTIVE_DAYS, Change, Holding, LISTS_PAGE, listed_since, parse_role};
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sluice_protocol::{KeyList, KeyLists, KeyRole, KeySet, KeyState, ListedKey, SignedKeyList};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_keys))
        .routes(routes!(key_lists))
        .routes(routes!(key_list))
        .routes(routes!(key_status))
        .routes(routes!(rotate_key))
        .routes(routes!(activate_key))
        .routes(routes!(revoke_key))
}

/// Public keys, for devices and verifiers (`cosign verify --key`): every
/// image and response key of the newest key list, whatever its state.
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, description = "Every trusted public key", body = serde_json::Value)))]
async fn list_keys(State(state): State<AppState>) -> Json<KeySet> {
    Json(state.keys.public_keys())
}

/// Query of `GET /v1/keys/lists`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListsQuery {
    /// Only lists newer than this version (default 0: from the first).
    pub after: Option<u64>,
}

/// The signed key lists after a version, for devices catching up: each is
/// signed by the root keys of the one before (DSSE envelopes).
#[utoipa::path(get, path = "/v1/keys/lists", tag = "keys", params(ListsQuery),
    responses((status = 200, body = KeyLists), Problems<400>))]
async fn key_lists(
    State(state): State<AppState>,
    Query(q): Query<ListsQuery>,
) -> Result<Json<KeyLists>> {
    let after = i64::try_from(q.after.unwrap_or(0))
        .map_err(|_| Error::BadRequest("after is too large".into()))?;
    let lists = sqlx::query_scalar!(
        r#"SELECT envelope AS "envelope: sqlx::types::Json<SignedKeyList>" FROM key_lists
           WHERE version > $1 ORDER BY version LIMIT $2"#,
        after,
        LISTS_PAGE
    )
    .fetch_all(&state.db)
    .await?;
    Ok(Json(KeyLists {
        lists: lists.into_iter().map(|j| j.0).collect(),
        newest: state.keys.list_version().unwrap_or(0),
    }))
}

/// One signed key list, by version, or `latest`: what a device image can
/// ship as its `keys` file instead of `GET /v1/keys` (it then trusts the
/// root keys too).
#[utoipa::path(get, path = "/v1/keys/lists/{version}", tag = "keys",
    params(("version" = String, Path, description = "A version number or `latest`")),
    responses((status = 200, body = SignedKeyList), Problems<400, 404>))]
async fn key_list(
    State(state): State<AppState>,
    Path(version): Path<String>,
) -> Result<Json<SignedKeyList>> {
    if version == "latest" {
        return state
            .keys
            .newest_list()
            .map(|(_, s)| Json(s))
            .ok_or_else(|| Error::not_found("a key list"));
    }
    let v: i64 = version
        .parse()
        .map_err(|_| Error::BadRequest("version must be a number or `latest`".into()))?;
    let row = sqlx::query_scalar!(
        r#"SELECT envelope AS "envelope: sqlx::types::Json<SignedKeyList>" FROM key_lists WHERE version = $1"#,
        v
    )
    .fetch_optional(&state.db)
    .await?;
    row.map(|j| Json(j.0))
        .ok_or_else(|| Error::not_found(format!("key list version {v}")))
}

/// One key of the newest list and how much of the fleet holds it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyStatus {
    /// The key.
    #[serde(flatten)]
    pub key: ListedKey,
    /// The first list version of the run that lists it up to the newest.
    pub listed_since: u64,
    /// Active devices holding a list that lists it.
    pub held_by: i64,
}

/// The key list as the dashboard shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeysOverview {
    /// The newest list's version.
    pub version: u64,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// When it expires (the server renews it at half its life).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Root signatures a list needs.
    pub threshold: u32,
    /// Devices seen in the last 30 days: the "of M" of `held_by`.
    pub active_devices: i64,
    /// Active devices that hold the newest list.
    pub holding_newest: i64,
    /// Every listed key.
    pub keys: Vec<KeyStatus>,
}

/// The newest key list, each key's state, and how many active devices hold
/// it ("devices that hold key K: N of M").
#[utoipa::path(get, path = "/v1/keys/status", tag = "keys", security(("bearer" = [])),
    responses((status = 200, body = KeysOverview), Problems<401, 403>))]
async fn key_status(State(state): State<AppState>, _v: Viewer) -> Result<Json<KeysOverview>> {
    let (list, _) = state
        .keys
        .newest_list()
        .ok_or_else(|| Error::Unavailable("the key list is not made yet".into()))?;
    let holding = Holding::load(&state.db).await?;
    let mut keys = Vec::new();
    for k in &list.keys {
        let since = listed_since(&state.db, &k.key_id, list.version).await?;
        keys.push(KeyStatus {
            key: k.clone(),
            listed_since: since,
            held_by: holding.holding(since),
        });
    }
    Ok(Json(KeysOverview {
        version: list.version,
        issued_at: list.issued_at,
        expires_at: list.expires_at,
        threshold: list.threshold,
        active_devices: holding.active(),
        holding_newest: holding.holding(list.version),
        keys,
    }))
}

/// What a rotation, activation or revocation answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyChanged {
    /// The key it is about, as the new list names it (a revoked key: as it was).
    #[serde(flatten)]
    pub key: ListedKey,
    /// The new key list's version.
    pub list_version: u64,
}

fn role_of(role: &str) -> Result<KeyRole> {
    parse_role(role).map_err(Error::BadRequest)
}

/// Image or response: a new `next` key, published in a new key list so
/// devices learn it before anything is signed with it; activate it once
/// they hold it. Root: a new root key at once (the old one signs the list
/// that replaces it, so devices follow the chain).
#[utoipa::path(post, path = "/v1/keys/{role}/rotate", tag = "keys",
    params(("role" = String, Path, description = "`image`, `response` or `root`")),
    security(("bearer" = [])),
    responses((status = 200, body = KeyChanged), Problems<400, 401, 403, 409>))]
async fn rotate_key(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(role): Path<String>,
) -> Result<Json<KeyChanged>> {
    let role = role_of(&role)?;
    let (key, list_version) = state
        .keys
        .change(
            &state.db,
            &who.actor(),
            Change::Rotate(role),
            async |_, _| Ok(()),
        )
        .await?;
    Ok(Json(KeyChanged { key, list_version }))
}

/// Body of `POST /v1/keys/{role}/activate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    /// Activate even though fewer devices than `min_percent` hold the key
    /// (they fetch the key lists when they meet it; agents older than key
    /// lists cannot, and refuse its signatures).
    #[serde(default)]
    pub force: bool,
    /// Share of the active devices that must hold the key (default 100).
    #[serde(default)]
    pub min_percent: Option<f64>,
}

/// The `next` key of the role becomes current (the server signs with it
/// from now on) and the current one retired. Refused (409) while fewer than
/// `min_percent` of the devices seen in the last 30 days hold a key list
/// with it, unless `force`.
#[utoipa::path(post, path = "/v1/keys/{role}/activate", tag = "keys",
    params(("role" = String, Path, description = "`image` or `response`")),
    request_body = ActivateRequest,
    security(("bearer" = [])),
    responses((status = 200, body = KeyChanged), Problems<400, 401, 403, 409>))]
async fn activate_key(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(role): Path<String>,
    Json(req): Json<ActivateRequest>,
) -> Result<Json<KeyChanged>> {
    let role = role_of(&role)?;
    if role == KeyRole::Root {
        return Err(Error::BadRequest(
            "a root rotation takes effect at once: there is no root key to activate".into(),
        ));
    }
    let min = req.min_percent.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&min) {
        return Err(Error::BadRequest("min_percent must be 0–100".into()));
    }
    let db = state.db.clone();
    let fleet_ok = async |list: &KeyList, key: &ListedKey| -> Result<()> {
        if req.force {
            return Ok(());
        }
        let holding = Holding::load(&db).await?;
        let since = listed_since(&db, &key.key_id, list.version).await?;
        let (n, m) = (holding.holding(since), holding.active());
        if m > 0 && (n as f64) * 100.0 < min * (m as f64) {
            return Err(Error::Conflict(format!(
                "devices that hold {role} key {}: {n} of {m} seen in the last {ACTIVE_DAYS} days, below {min} %: \
                 wait until more have polled, or activate with force (devices that lack it fetch the key lists \
                 when they meet it; agents older than key lists cannot)",
                key.key_id
            )));
        }
        Ok(())
    };
    let (key, list_version) = state
        .keys
        .change(&state.db, &who.actor(), Change::Activate(role), fleet_ok)
        .await?;
    Ok(Json(KeyChanged { key, list_version }))
}

/// Body of `POST /v1/keys/{role}/revoke`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The key to revoke (next or retired; a current key is replaced first).
    pub key_id: String,
}

/// Drops a key from the key list: devices that hold the new list refuse
/// what it signs; its file moves to `<role>/revoked/`. An image key's
/// releases are first signed again with the current image key (pushed to
/// the registry; 503 with nothing revoked if it is down). Refused (409) for
/// the current key: rotate and activate another first.
#[utoipa::path(post, path = "/v1/keys/{role}/revoke", tag = "keys",
    params(("role" = String, Path, description = "`image`, `response` or `root`")),
    request_body = RevokeRequest,
    security(("bearer" = [])),
    responses((status = 200, body = KeyChanged), Problems<400, 401, 403, 404, 409, 503>))]
async fn revoke_key(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(role): Path<String>,
    Json(req): Json<RevokeRequest>,
) -> Result<Json<KeyChanged>> {
    let role = role_of(&role)?;
    let listed = state
        .keys
        .newest_list()
        .and_then(|(l, _)| l.find(&req.key_id).cloned())
        .filter(|k| k.role == role);
    if role == KeyRole::Image
        && let Some(k) = listed.filter(|k| k.state != KeyState::Current)
    {
        resign_releases(&state, &who, &k.key_id).await?;
    }
    let (key, list_version) = state
        .keys
        .change(
            &state.db,
            &who.actor(),
            Change::Revoke(role, req.key_id),
            async |_, _| Ok(()),
        )
        .await?;
    Ok(Json(KeyChanged { key, list_version }))
}

/// Before an image key is revoked: every release digest signed only by it
/// is signed again with the current image key, pushed to the registry and
/// stored, so devices that drop the revoked key can still install it. A
/// registry that is down fails the revocation (503) with nothing revoked;
/// what was signed meanwhile stays (a retry reuses it).
async fn resign_releases(
    state: &AppState,
    who: &crate::api::auth::Principal,
    revoked: &str,
) -> Result<()> {
    let rows = sqlx::query!(
        r#"SELECT r.id, r.version, p.name AS product, p.repository, s.digest FROM signatures s
           JOIN releases r ON r.id = s.release_id JOIN products p ON p.id = r.product_id
           WHERE s.key_id = $1 AND NOT EXISTS (SELECT 1 FROM signatures o
                 WHERE o.release_id = s.release_id AND o.digest = s.digest AND o.key_id <> $1)
           ORDER BY p.name, r.version, s.digest"#,
        revoked
    )
    .fetch_all(&state.db)
    .await?;
    let key = state.keys.image_key();
    for row in rows {
        let signed = crate::infra::signing::SignedDigest {
            signature: crate::infra::signing::sign_digest(
                &key,
                &row.repository,
                &row.digest,
                &row.product,
                &row.version,
            )?,
            digest: row.digest.clone(),
        };
        state
            .registry
            .push_signatures(&row.repository, std::slice::from_ref(&signed))
            .await?;
        let mut tx = state.db.begin().await?;
        sqlx::query!(
            "INSERT INTO signatures (release_id, digest, key_id, payload, signature) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
            row.id,
            row.digest,
            signed.signature.key_id,
            signed.signature.payload,
            signed.signature.signature
        )
        .execute(&mut *tx)
        .await?;
        crate::api::audit::record(
            &mut *tx,
            who,
            "release.resign",
            &format!("release:{}/{}", row.product, row.version),
            Some(serde_json::json!({"digest": row.digest, "key_id": revoked})),
            Some(serde_json::json!({"digest": row.digest, "key_id": signed.signature.key_id})),
        )
        .await?;
        tx.commit().await?;
        state.cache.invalidate(&row.product);
    }
    Ok(())
}
