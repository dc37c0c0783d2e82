//! The in-memory snapshot of a product resolve answers from (releases,
//! channels, pins and the image signatures), loaded from PostgreSQL and
//! reloaded when a change invalidates it or after `SNAPSHOT_TTL`.

use crate::api::devices::PinPlatform;
use crate::app::AppState;
use crate::error::Result;
use crate::infra::registry::PlatformImage;
use crate::rules::policy::{Labels, RebootPolicy};
use crate::rules::rollout::{Rel, Rollout};
use serde::Deserialize;
use sluice_protocol::ImageSignature;
use sqlx::PgPool;
use sqlx::types::Json as SqlJson;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a snapshot serves before it is reloaded, so changes made by
/// another server instance show up even without an invalidation here.
pub(crate) const SNAPSHOT_TTL: Duration = Duration::from_secs(5);

/// A platform of a release, ready to offer.
#[derive(Debug, Clone)]
pub(crate) struct PlatformOffer {
    pub(crate) architecture: String,
    pub(crate) variant: Option<String>,
    pub(crate) digest: String,
    pub(crate) size: u64,
    pub(crate) signature: Option<ImageSignature>,
}

#[derive(Debug)]
pub(crate) struct ReleaseSnap {
    pub(crate) version: String,
    /// Devices reboot into it outside their maintenance windows.
    pub(crate) urgent: bool,
    pub(crate) platforms: Vec<PlatformOffer>,
}

#[derive(Debug)]
pub(crate) struct ChannelSnap {
    pub(crate) head: Option<usize>,
    pub(crate) base: Option<usize>,
    pub(crate) rollout: Rollout,
    pub(crate) rolled_back: bool,
    pub(crate) serial: i64,
    pub(crate) reboot: RebootPolicy,
}

#[derive(Debug)]
pub(crate) enum PinSnap {
    Release(usize),
    Image {
        rel: Rel,
        platforms: Vec<PlatformOffer>,
    },
}

/// What resolution needs of one product, loaded at once.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) loaded_at: Instant,
    pub(crate) repository: String,
    pub(crate) releases: Vec<ReleaseSnap>,
    pub(crate) rels: Vec<Rel>,
    pub(crate) by_digest: HashMap<String, usize>,
    pub(crate) channels: HashMap<String, ChannelSnap>,
    /// The highest serial of the product's channels: what every answer
    /// carries, so a device's serial never goes down when it changes channel
    /// (serials come from one sequence, so this maximum only grows).
    pub(crate) serial: i64,
    pub(crate) pins: HashMap<Uuid, PinSnap>,
    /// Devices an admin asked to try failed digests again, with the digests.
    pub(crate) retries: HashMap<Uuid, Vec<String>>,
    /// The labels of the product's labelled devices, loaded only while one
    /// of its channels selects by label (waves, a reboot policy): the
    /// common case holds none of them.
    pub(crate) labels: HashMap<Uuid, Labels>,
}

/// Product snapshots, dropped whenever something they hold changes.
///
/// One request loads a missing snapshot while the others wait for it; an
/// expired one keeps serving while a single background task reloads it, so
/// the resolve path never waits on the database once warm, whatever the size
/// of the fleet.
#[derive(Default)]
pub struct Cache {
    pub(crate) products: RwLock<HashMap<String, Entry>>,
}

#[derive(Default)]
pub(crate) struct Entry {
    pub(crate) snapshot: Option<Arc<Snapshot>>,
    /// Bumped by every invalidation: a load that began before it is not kept.
    pub(crate) generation: u64,
    /// Held by whoever loads this product's snapshot.
    pub(crate) loading: Arc<tokio::sync::Mutex<()>>,
}

impl Cache {
    /// Drops a product's snapshot: the next resolution reloads it.
    pub fn invalidate(&self, product: &str) {
        let mut products = self.products.write().expect("cache lock");
        let e = products.entry(product.to_string()).or_default();
        e.generation += 1;
        e.snapshot = None;
    }

    pub(crate) async fn get(state: &AppState, product: &str) -> Result<Arc<Snapshot>> {
        let cache = &state.cache;
        let (stale, loading) = {
            let products = cache.products.read().expect("cache lock");
            match products.get(product) {
                Some(e) => match &e.snapshot {
                    Some(s) if s.loaded_at.elapsed() < SNAPSHOT_TTL => return Ok(s.clone()),
                    s => (s.clone(), Some(e.loading.clone())),
                },
                None => (None, None),
            }
        };
        let loading = match loading {
            Some(l) => l,
            None => cache
                .products
                .write()
                .expect("cache lock")
                .entry(product.to_string())
                .or_default()
                .loading
                .clone(),
        };
        if let Some(stale) = stale {
            // Expired: serve it while one task reloads.
            if let Ok(guard) = loading.try_lock_owned() {
                let (state, product) = (state.clone(), product.to_string());
                tokio::spawn(async move {
                    if let Err(e) = state.cache.load(&state.db, &product).await {
                        tracing::warn!(error = %e, product, "reloading the resolve snapshot failed");
                    }
                    drop(guard);
                });
            }
            return Ok(stale);
        }
        let _guard = loading.lock().await;
        if let Some(s) = cache
            .products
            .read()
            .expect("cache lock")
            .get(product)
            .and_then(|e| e.snapshot.clone())
            .filter(|s| s.loaded_at.elapsed() < SNAPSHOT_TTL)
        {
            return Ok(s);
        }
        cache.load(&state.db, product).await
    }

    /// Loads a snapshot and keeps it, unless the product changed meanwhile.
    pub(crate) async fn load(&self, db: &PgPool, product: &str) -> Result<Arc<Snapshot>> {
        let generation = self
            .products
            .read()
            .expect("cache lock")
            .get(product)
            .map_or(0, |e| e.generation);
        let s = Arc::new(load(db, product).await?);
        let mut products = self.products.write().expect("cache lock");
        let e = products.entry(product.to_string()).or_default();
        if e.generation == generation {
            e.snapshot = Some(s.clone());
        }
        Ok(s)
    }
}

pub(crate) async fn load(db: &PgPool, product: &str) -> Result<Snapshot> {
    let mut conn = db.acquire().await?;
    let p = crate::api::products::load(&mut *conn, product).await?;
    let rows = sqlx::query!(
        r#"SELECT r.id, r.version, r.digest, r.floor, r.urgent, r.state, r.platforms AS "platforms: SqlJson<Vec<PlatformImage>>",
                  coalesce((SELECT json_agg(json_build_object('digest', s.digest, 'payload', s.payload,
                       'signature', s.signature, 'key_id', s.key_id) ORDER BY s.created_at DESC)
                     FROM signatures s WHERE s.release_id = r.id), '[]') AS "sigs!: SqlJson<Vec<SigRow>>"
           FROM releases r WHERE r.product_id = $1"#,
        p.id
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut releases = Vec::with_capacity(rows.len());
    let mut rels = Vec::with_capacity(rows.len());
    let mut by_id = HashMap::new();
    let mut by_digest = HashMap::new();
    for r in rows {
        let Ok(version) = semver::Version::parse(&r.version) else {
            continue;
        };
        let i = releases.len();
        by_id.insert(r.id, i);
        by_digest.insert(r.digest.clone(), i);
        let platforms = r
            .platforms
            .0
            .into_iter()
            .map(|pl| {
                by_digest.insert(pl.digest.clone(), i);
                PlatformOffer {
                    signature: r
                        .sigs
                        .0
                        .iter()
                        .find(|s| s.digest == pl.digest)
                        .map(SigRow::to_signature),
                    architecture: pl.architecture,
                    variant: pl.variant,
                    digest: pl.digest,
                    size: pl.size,
                }
            })
            .collect();
        releases.push(ReleaseSnap {
            version: r.version,
            urgent: r.urgent,
            platforms,
        });
        rels.push(Rel {
            version,
            floor: r.floor,
            revoked: r.state == "revoked",
        });
    }
    let channels: HashMap<String, ChannelSnap> = sqlx::query_as!(
        crate::api::channels::StoredChannel,
        r#"SELECT c.id, c.name, c.description, c.head_release_id, c.base_release_id,
                  NULL::text AS "head?", NULL::text AS "base?", c.percent, c.ramp_from_percent, c.ramp_to_percent,
                  c.ramp_over_minutes, c.ramp_started_at, c.paused, c.paused_reason, c.paused_at, c.rolled_back,
                  c.gate_max_failure_percent, c.gate_min_reports, c.serial, c.updated_at,
                  c.waves, c.waves_started_at, c.reboot_policy
           FROM channels c WHERE c.product_id = $1"#,
        p.id
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|c| {
        let snap = ChannelSnap {
            head: c.head_release_id.and_then(|id| by_id.get(&id).copied()),
            base: c.base_release_id.and_then(|id| by_id.get(&id).copied()),
            rollout: c.rollout(),
            rolled_back: c.rolled_back,
            serial: c.serial,
            reboot: c.reboot_policy(),
        };
        (c.name, snap)
    })
    .collect();
    let pins = sqlx::query!(
        r#"SELECT d.id, r.id AS "release_id?", d.pin_digest, d.pin_platforms AS "pin_platforms: SqlJson<Vec<PinPlatform>>"
           FROM devices d LEFT JOIN releases r ON r.product_id = d.product_id AND r.version = d.pin_version
           WHERE d.product_id = $1 AND (d.pin_version IS NOT NULL OR d.pin_image IS NOT NULL)"#,
        p.id
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .filter_map(|d| {
        let pin = match (d.release_id, d.pin_platforms, d.pin_digest) {
            (Some(rid), _, _) => PinSnap::Release(*by_id.get(&rid)?),
            (None, Some(platforms), Some(digest)) => PinSnap::Image {
                rel: Rel {
                    version: semver::Version::parse(&crate::api::devices::pin_version_label(&digest)).ok()?,
                    floor: false,
                    revoked: false,
                },
                platforms: platforms
                    .0
                    .into_iter()
                    .map(|pl| PlatformOffer {
                        architecture: pl.image.architecture,
                        variant: pl.image.variant,
                        digest: pl.image.digest,
                        size: pl.image.size,
                        signature: Some(pl.signature),
                    })
                    .collect(),
            },
            _ => return None,
        };
        Some((d.id, pin))
    })
    .collect();
    let retries = sqlx::query!(
        "SELECT id, retry_digests FROM devices WHERE product_id = $1 AND cardinality(retry_digests) > 0",
        p.id
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|d| (d.id, d.retry_digests))
    .collect();
    let by_label = channels.values().any(|c| {
        c.rollout.waves.is_some() || !c.reboot.windows.is_empty() || c.reboot.lease.is_some()
    });
    let labels = if by_label {
        sqlx::query!(
            r#"SELECT id, labels AS "labels: SqlJson<Labels>" FROM devices
               WHERE product_id = $1 AND labels <> '{}'::jsonb"#,
            p.id
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|d| (d.id, d.labels.0))
        .collect()
    } else {
        HashMap::new()
    };
    Ok(Snapshot {
        labels,
        loaded_at: Instant::now(),
        repository: p.repository,
        releases,
        rels,
        by_digest,
        serial: channels.values().map(|c| c.serial).max().unwrap_or(0),
        channels,
        pins,
        retries,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct SigRow {
    pub(crate) digest: String,
    pub(crate) payload: String,
    pub(crate) signature: String,
    pub(crate) key_id: String,
}

impl SigRow {
    pub(crate) fn to_signature(&self) -> ImageSignature {
        ImageSignature {
            payload: self.payload.clone(),
            signature: self.signature.clone(),
            key_id: self.key_id.clone(),
        }
    }
}
