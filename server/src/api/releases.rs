//! Releases: publishing a build (resolve the reference to a digest in the
//! registry, sign every platform digest, store), listing, and revoking.

use crate::api::auth::{Admin, Principal, ProductReader, Publisher};
use crate::api::products::ProductPath;
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Query, Result};
use crate::infra::registry::{PlatformImage, parse_reference};
use crate::infra::signing::{SignedDigest, sign_digest};
use crate::paging::{Page, PageParams};
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// A channel to promote a new release into as it is published.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelTarget {
    /// The channel's name.
    pub name: String,
    /// Rollout percent for the new head (default 100).
    #[serde(default)]
    pub percent: Option<f64>,
}

/// `POST /v1/products/{product}/releases`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRelease {
    /// SemVer 2.0 version, unique in the product.
    pub version: String,
    /// `repo:tag` or `repo@sha256:...` in the product's repository.
    pub image: String,
    /// Build metadata: `git_commit`, `build_url`, `changelog`, `base_image`, `packages`, anything else.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Devices below this release must pass through it.
    #[serde(default)]
    pub floor: Option<bool>,
    /// Channels to promote it into.
    #[serde(default)]
    pub channels: Option<Vec<ChannelTarget>>,
}

/// A platform manifest of a release, with its signature state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReleasePlatform {
    /// The platform.
    #[serde(flatten)]
    pub image: PlatformImage,
    /// Ids of the image keys that signed this digest.
    pub signed_by: Vec<String>,
}

/// A published release.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Release {
    /// Its version.
    pub version: String,
    /// The digest the published reference resolved to (manifest or index).
    pub digest: String,
    /// `repository@digest`.
    pub image: String,
    /// Media type of what `digest` names.
    pub media_type: String,
    /// One entry per platform manifest.
    pub platforms: Vec<ReleasePlatform>,
    /// Build metadata as given.
    pub metadata: serde_json::Value,
    /// A mandatory step for devices below it.
    pub floor: bool,
    /// Devices reboot into it outside their maintenance windows
    /// (`POST .../urgent`).
    pub urgent: bool,
    /// `active` or `revoked`.
    pub state: String,
    /// Who published it.
    pub publisher: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// What `POST .../releases` answers: the release, and the devices it leaves behind.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Published {
    /// The release.
    #[serde(flatten)]
    pub release: Release,
    /// Devices this release cannot reach, in words (e.g. no image for their
    /// architecture); empty when nothing is stranded.
    pub warnings: Vec<String>,
}

/// Warnings about devices that `release` cannot reach because it has no
/// image for their architecture: on `channel`, or (without one) anywhere in
/// the product. Pinned and revoked devices do not follow a channel, so they
/// are left out. Empty when nothing is stranded.
pub async fn stranded(
    db: &sqlx::PgPool,
    product_id: Uuid,
    product: &str,
    release_id: Uuid,
    version: &str,
    channel: Option<&str>,
) -> Result<Vec<String>> {
    let platforms = sqlx::query_scalar!(
        r#"SELECT platforms AS "platforms: SqlJson<Vec<PlatformImage>>" FROM releases WHERE id = $1"#,
        release_id
    )
    .fetch_one(db)
    .await?
    .0;
    // Which devices the release reaches is decided the way resolve decides it
    // (`registry::fits`: a device naming a variant is served an image without
    // one), so the check runs here rather than as SQL string equality.
    let rows: Vec<_> = sqlx::query!(
        r#"SELECT d.arch, d.channel, count(*) AS "count!" FROM devices d
           WHERE d.product_id = $1 AND ($2::text IS NULL OR d.channel = $2)
             AND d.revoked_at IS NULL AND d.pin_version IS NULL AND d.pin_image IS NULL
           GROUP BY d.arch, d.channel ORDER BY d.arch, d.channel"#,
        product_id,
        channel
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .filter(|r| !platforms.iter().any(|p| p.fits(&r.arch).is_some()))
    .collect();
    let devices = |n: i64| {
        if n == 1 {
            "1 device".to_string()
        } else {
            format!("{n} devices")
        }
    };
    let run = |n: i64| if n == 1 { "runs" } else { "run" };
    let mut out = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let arch = &rows[i].arch;
        let group: Vec<_> = rows[i..].iter().take_while(|r| &r.arch == arch).collect();
        i += group.len();
        let n: i64 = group.iter().map(|r| r.count).sum();
        out.push(match channel {
            Some(c) => format!(
                "no image for {arch} in {version}: {} of product {product} on channel {c} {} {arch} and will stay where they are; publish a release with a {arch} image",
                devices(n),
                run(n)
            ),
            None => format!(
                "no image for {arch} in {version}: {} of product {product} {} {arch} ({}) and will stay where they are on any channel it is promoted to",
                devices(n),
                run(n),
                group
                    .iter()
                    .map(|r| format!("{} on {}", r.count, r.channel))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(out)
}

/// The row behind a release.
#[derive(Debug, Clone)]
pub struct ReleaseRow {
    /// Its id.
    pub id: Uuid,
    /// Its version.
    pub version: String,
    /// Its digest.
    pub digest: String,
    /// `active` or `revoked`.
    pub state: String,
}

/// `{product}/releases/{version}` in a route: the names and their OpenAPI
/// parameters (the handlers read the release with [`fetch_one`] and [`load`],
/// 404 for a product or release that does not exist).
#[derive(Debug, Deserialize, IntoParams, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
#[into_params(parameter_in = Path)]
pub struct ReleasePath {
    /// Product name
    pub product: String,
    /// Release version
    pub version: String,
}

/// Loads a release by product id and version, or 404.
pub async fn load<'e>(
    db: impl sqlx::PgExecutor<'e>,
    product_id: Uuid,
    product: &str,
    version: &str,
) -> Result<ReleaseRow> {
    sqlx::query_as!(
        ReleaseRow,
        "SELECT id, version, digest, state FROM releases WHERE product_id = $1 AND version = $2",
        product_id,
        version
    )
    .fetch_optional(db)
    .await?
    .ok_or_else(|| Error::not_found(format!("release {version} of product {product}")))
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(publish, list_releases))
        .routes(routes!(get_release))
        .routes(routes!(revoke))
        .routes(routes!(set_urgent))
}

/// `POST .../urgent`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UrgentRequest {
    /// Whether devices reboot into the release outside their maintenance
    /// windows (a security fix); false gives the windows back.
    pub urgent: bool,
}

/// Marks a release urgent (or not): devices that stage it reboot into it
/// at once instead of waiting for their maintenance window. Reboot leases
/// and a device's own `reboot = "manual"` still hold.
#[utoipa::path(post, path = "/v1/products/{product}/releases/{version}/urgent", tag = "releases",
    params(ReleasePath), request_body = UrgentRequest,
    security(("bearer" = [])),
    responses((status = 200, body = Release), Problems<400, 401, 403, 404, 409>))]
async fn set_urgent(
    State(state): State<AppState>,
    Admin(who): Admin,
    ReleasePath { product, version }: ReleasePath,
    Json(req): Json<UrgentRequest>,
) -> Result<Json<Release>> {
    let p = crate::api::products::load(&state.db, &product).await?;
    let mut tx = state.db.begin().await?;
    let r = load(&mut *tx, p.id, &product, &version).await?;
    if r.state == "revoked" && req.urgent {
        return Err(Error::Conflict(format!(
            "release {version} is revoked: it is never offered, so it cannot be urgent"
        )));
    }
    let before = sqlx::query_scalar!("SELECT urgent FROM releases WHERE id = $1 FOR UPDATE", r.id)
        .fetch_one(&mut *tx)
        .await?;
    if before != req.urgent {
        sqlx::query!(
            "UPDATE releases SET urgent = $2 WHERE id = $1",
            r.id,
            req.urgent
        )
        .execute(&mut *tx)
        .await?;
        new_serials(&mut tx, r.id).await?;
        crate::api::audit::record(
            &mut *tx,
            &who,
            "release.urgent",
            &format!("release:{product}/{version}"),
            Some(serde_json::json!({"urgent": before})),
            Some(serde_json::json!({"urgent": req.urgent})),
        )
        .await?;
    }
    tx.commit().await?;
    state.cache.invalidate(&product);
    Ok(Json(fetch_one(&state.db, &product, &version).await?))
}

/// Releases of `product` (one `version`, or all), newest first.
pub(crate) async fn fetch(
    db: &sqlx::PgPool,
    product: &str,
    version: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Vec<Release>> {
    let rows = sqlx::query!(
        r#"SELECT r.id, r.version, r.digest, r.media_type, r.platforms AS "platforms: SqlJson<Vec<PlatformImage>>",
                  r.metadata, r.floor, r.urgent, r.state, r.publisher, r.created_at, r.revoked_at, p.repository,
                  coalesce((SELECT json_agg(json_build_array(s.digest, s.key_id)) FROM signatures s WHERE s.release_id = r.id), '[]')
                    AS "sigs!: SqlJson<Vec<(String, String)>>"
           FROM releases r JOIN products p ON p.id = r.product_id
           WHERE p.name = $1 AND ($2::text IS NULL OR r.version = $2)
           ORDER BY r.created_at DESC, r.id LIMIT $3 OFFSET $4"#,
        product,
        version,
        limit,
        offset
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let sigs = r.sigs.0;
            Release {
                image: format!("{}@{}", r.repository, r.digest),
                platforms: r
                    .platforms
                    .0
                    .into_iter()
                    .map(|image| ReleasePlatform {
                        signed_by: sigs
                            .iter()
                            .filter(|(d, _)| *d == image.digest)
                            .map(|(_, k)| k.clone())
                            .collect(),
                        image,
                    })
                    .collect(),
                version: r.version,
                digest: r.digest,
                media_type: r.media_type,
                metadata: r.metadata,
                floor: r.floor,
                urgent: r.urgent,
                state: r.state,
                publisher: r.publisher,
                created_at: r.created_at,
                revoked_at: r.revoked_at,
            }
        })
        .collect())
}

async fn fetch_one(db: &sqlx::PgPool, product: &str, version: &str) -> Result<Release> {
    fetch(db, product, Some(version), 1, 0)
        .await?
        .pop()
        .ok_or_else(|| Error::not_found(format!("release {version} of product {product}")))
}

/// Publishes a release: resolves the image to a digest, signs it, stores it,
/// and optionally promotes it. Publishing the same version and digest again
/// answers 200 with the existing release.
#[utoipa::path(post, path = "/v1/products/{product}/releases", tag = "releases", request_body = NewRelease,
    params(ProductPath), security(("bearer" = [])),
    responses((status = 201, body = Published), (status = 200, description = "Already published with this digest", body = Published), Problems<400, 401, 403, 404, 409, 422, 503>))]
async fn publish(
    State(state): State<AppState>,
    Publisher(who): Publisher,
    ProductPath { product }: ProductPath,
    Json(req): Json<NewRelease>,
) -> Result<(StatusCode, Json<Published>)> {
    let (status, release) = publish_release(&state, &who, &product, &req).await?;
    let p = crate::api::products::load(&state.db, &product).await?;
    let id = load(&state.db, p.id, &product, &release.version).await?.id;
    let channels = req.channels.unwrap_or_default();
    let mut warnings = Vec::new();
    if channels.is_empty() {
        warnings = stranded(&state.db, p.id, &product, id, &release.version, None).await?;
    }
    for c in &channels {
        warnings.extend(
            stranded(
                &state.db,
                p.id,
                &product,
                id,
                &release.version,
                Some(&c.name),
            )
            .await?,
        );
    }
    Ok((status, Json(Published { release, warnings })))
}

async fn publish_release(
    state: &AppState,
    who: &Principal,
    product: &str,
    req: &NewRelease,
) -> Result<(StatusCode, Release)> {
    let product = product.to_string();
    who.check_product(&product)?;
    let version = crate::rules::names::parse_version(&req.version)?;
    let metadata = match req.metadata.clone() {
        None => serde_json::json!({}),
        Some(m @ serde_json::Value::Object(_)) => m,
        Some(_) => return Err(Error::BadRequest("metadata must be a JSON object".into())),
    };
    let channels = req.channels.clone().unwrap_or_default();
    for c in &channels {
        crate::api::channels::check_percent(c.percent)?;
    }
    let p = crate::api::products::load(&state.db, &product).await?;
    let image = parse_reference(&req.image)?;
    if image.repository != p.repository {
        return Err(Error::BadRequest(format!(
            "image {} is outside product {product}'s repository {}: push it there and publish that reference",
            req.image, p.repository
        )));
    }

    let existing = sqlx::query!(
        "SELECT digest FROM releases WHERE product_id = $1 AND version = $2",
        p.id,
        req.version
    )
    .fetch_optional(&state.db)
    .await?;
    let resolved = match (&existing, &image.digest) {
        // Re-publishing by the same digest needs no registry round trip.
        (Some(e), Some(d)) if &e.digest == d => {
            return Ok((
                StatusCode::OK,
                fetch_one(&state.db, &product, &req.version).await?,
            ));
        }
        _ => state.registry.resolve(&image).await?,
    };
    if let Some(e) = existing {
        if e.digest == resolved.digest {
            return Ok((
                StatusCode::OK,
                fetch_one(&state.db, &product, &req.version).await?,
            ));
        }
        return Err(conflict(&req.version, &e.digest, &resolved.digest));
    }

    // Sign the index (if any) and every platform manifest.
    let key = state.keys.image_key();
    let mut digests: Vec<&str> = resolved
        .platforms
        .iter()
        .map(|pl| pl.digest.as_str())
        .collect();
    if !digests.contains(&resolved.digest.as_str()) {
        digests.push(&resolved.digest);
    }
    let sigs = digests
        .into_iter()
        .map(|d| {
            Ok(SignedDigest {
                digest: d.to_string(),
                signature: sign_digest(&key, &p.repository, d, &product, &req.version)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let id = Uuid::new_v4();
    let mut tx = state.db.begin().await?;
    let inserted = sqlx::query!(
        "INSERT INTO releases (id, product_id, version, digest, media_type, platforms, metadata, floor, publisher)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        id,
        p.id,
        req.version,
        resolved.digest,
        resolved.media_type,
        serde_json::to_value(&resolved.platforms).map_err(anyhow::Error::from)?,
        metadata,
        req.floor.unwrap_or(false),
        who.actor()
    )
    .execute(&mut *tx)
    .await;
    if let Err(sqlx::Error::Database(d)) = &inserted
        && d.constraint() == Some("releases_product_version_key")
    {
        // A concurrent publish of the same version won the race.
        drop(tx);
        let winner = fetch_one(&state.db, &product, &req.version).await?;
        if winner.digest == resolved.digest {
            return Ok((StatusCode::OK, winner));
        }
        return Err(conflict(&req.version, &winner.digest, &resolved.digest));
    }
    inserted?;
    for s in &sigs {
        sqlx::query!(
            "INSERT INTO signatures (release_id, digest, key_id, payload, signature) VALUES ($1, $2, $3, $4, $5)",
            id,
            s.digest,
            s.signature.key_id,
            s.signature.payload,
            s.signature.signature
        )
        .execute(&mut *tx)
        .await?;
    }
    let after = serde_json::json!({
        "version": req.version, "digest": resolved.digest, "floor": req.floor.unwrap_or(false),
        "platforms": resolved.platforms, "metadata": metadata,
    });
    crate::api::audit::record(
        &mut *tx,
        who,
        "release.publish",
        &format!("release:{product}/{}", req.version),
        None,
        Some(after),
    )
    .await?;
    for c in &channels {
        let release = crate::rules::channel::ReleaseRef {
            id,
            version: version.to_string(),
        };
        // Publishing into a channel is a promote at 100 % unless told otherwise.
        let percent = c.percent.unwrap_or(100.0);
        crate::api::channels::promote_in_tx(
            &mut tx,
            who,
            p.id,
            &product,
            &c.name,
            release,
            crate::api::channels::Promotion::Percent(percent, None),
            state.clock.now(),
        )
        .await?;
    }
    // Signatures reach the registry before the release is stored, so a stored
    // release is always verifiable; a failed push stores nothing.
    state.registry.push_signatures(&p.repository, &sigs).await?;
    tx.commit().await?;
    state
        .metrics
        .publishes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.cache.invalidate(&product);
    Ok((
        StatusCode::CREATED,
        fetch_one(&state.db, &product, &req.version).await?,
    ))
}

fn conflict(version: &str, have: &str, got: &str) -> Error {
    Error::Conflict(format!(
        "version {version} is already published with digest {have}, and the image now resolves to {got}: publish it as a new version"
    ))
}

/// Releases of a product, newest first.
#[utoipa::path(get, path = "/v1/products/{product}/releases", tag = "releases",
    params(ProductPath, PageParams), security(("bearer" = [])),
    responses((status = 200, body = Page<Release>), Problems<401, 403, 404>))]
async fn list_releases(
    State(state): State<AppState>,
    _v: ProductReader,
    path: ProductPath,
    Query(page): Query<PageParams>,
) -> Result<Json<Page<Release>>> {
    let product = path.load(&state.db).await?.name;
    let limit = page.limit();
    let offset = page.cursor_i64()?.unwrap_or(0).max(0);
    let rows = fetch(&state.db, &product, None, limit + 1, offset).await?;
    let mut page = Page::from_rows(rows, limit, |_| String::new());
    if page.next_cursor.is_some() {
        page.next_cursor = Some((offset + limit).to_string());
    }
    Ok(Json(page))
}

/// One release.
#[utoipa::path(get, path = "/v1/products/{product}/releases/{version}", tag = "releases",
    params(ReleasePath),
    security(("bearer" = [])),
    responses((status = 200, body = Release), Problems<401, 403, 404>))]
async fn get_release(
    State(state): State<AppState>,
    _v: ProductReader,
    ReleasePath { product, version }: ReleasePath,
) -> Result<Json<Release>> {
    Ok(Json(fetch_one(&state.db, &product, &version).await?))
}

/// Revokes a release: it is never offered again; channels whose head it is fall back to their base.
#[utoipa::path(post, path = "/v1/products/{product}/releases/{version}/revoke", tag = "releases",
    params(ReleasePath),
    security(("bearer" = [])),
    responses((status = 200, body = Release), Problems<401, 403, 404>))]
async fn revoke(
    State(state): State<AppState>,
    Admin(who): Admin,
    ReleasePath { product, version }: ReleasePath,
) -> Result<Json<Release>> {
    revoke_release(&state, &who, &product, &version).await?;
    Ok(Json(fetch_one(&state.db, &product, &version).await?))
}

async fn revoke_release(
    state: &AppState,
    who: &Principal,
    product: &str,
    version: &str,
) -> Result<()> {
    let p = crate::api::products::load(&state.db, product).await?;
    let mut tx = state.db.begin().await?;
    let r = load(&mut *tx, p.id, product, version).await?;
    if r.state != "revoked" {
        sqlx::query!(
            "UPDATE releases SET state = 'revoked', revoked_at = now() WHERE id = $1",
            r.id
        )
        .execute(&mut *tx)
        .await?;
        new_serials(&mut tx, r.id).await?;
        crate::api::audit::record(
            &mut *tx,
            who,
            "release.revoke",
            &format!("release:{product}/{version}"),
            Some(serde_json::json!({"state": "active"})),
            Some(serde_json::json!({"state": "revoked"})),
        )
        .await?;
    }
    tx.commit().await?;
    state.cache.invalidate(product);
    Ok(())
}

/// Gives every channel whose head or base is `release` a new serial: the
/// answer its devices get changes, and they must see that it did.
async fn new_serials(tx: &mut sqlx::PgConnection, release: Uuid) -> Result<()> {
    sqlx::query!(
        "UPDATE channels SET serial = nextval('channel_serial'), updated_at = now()
             WHERE head_release_id = $1 OR base_release_id = $1",
        release
    )
    .execute(tx)
    .await?;
    Ok(())
}
