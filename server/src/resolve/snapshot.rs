//! The in-memory snapshot of a product resolve answers from (releases,
//! channels, pins and the image signatures), loaded from PostgreSQL and
//! reloaded when a change invalidates it (here, or on another server: the
//! invalidation is told to every server through `infra/notify.rs`), when a
//! device shows it saw a newer serial, or after `SNAPSHOT_TTL`.

use crate::api::devices::PinPlatform;
use crate::app::AppState;
use crate::error::Result;
use crate::infra::notify::{self, Publisher};
use crate::infra::registry::PlatformImage;
use crate::rules::policy::{Labels, RebootPolicy};
use crate::rules::rollout::{Rel, Rollout};
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_protocol::{ImageSignature, Offer};
use sqlx::PgPool;
use sqlx::types::Json as SqlJson;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a snapshot serves before it is reloaded: the safety net for a
/// change notification another server sent and this one missed.
pub(crate) const SNAPSHOT_TTL: Duration = Duration::from_secs(5);

/// A platform of a release, ready to offer: the offer is written once, when
/// the snapshot loads, and every answer that makes it copies its bytes.
#[derive(Debug)]
pub(crate) struct PlatformOffer {
    pub(crate) architecture: String,
    pub(crate) variant: Option<String>,
    pub(crate) digest: String,
    /// The [`Offer`] as JSON; `None` while the platform has no signature
    /// (such a platform is never offered).
    pub(crate) offer: Option<Box<RawValue>>,
    /// `<version>@<digest>`, what a check-in records as offered.
    pub(crate) offered: Arc<str>,
}

impl PlatformOffer {
    fn new(
        version: &str,
        repository: &str,
        image: PlatformImage,
        signature: Option<ImageSignature>,
    ) -> PlatformOffer {
        let offer = signature.map(|signature| {
            let offer = Offer {
                version: version.to_string(),
                image: format!("{repository}@{}", image.digest),
                digest: image.digest.clone(),
                size: image.size,
                signature,
            };
            serde_json::value::to_raw_value(&offer).expect("an offer serializes")
        });
        PlatformOffer {
            offered: format!("{version}@{}", image.digest).into(),
            architecture: image.architecture,
            variant: image.variant,
            digest: image.digest,
            offer,
        }
    }
}

#[derive(Debug)]
pub(crate) struct ReleaseSnap {
    /// Shared with the check-ins that record it.
    pub(crate) version: Arc<str>,
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

impl Snapshot {
    /// The serial every answer from this snapshot carries.
    pub fn serial(&self) -> i64 {
        self.serial
    }
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
    /// Tells the other servers of every invalidation.
    notify: Option<Publisher>,
}

#[derive(Default)]
pub(crate) struct Entry {
    pub(crate) snapshot: Option<Arc<Snapshot>>,
    /// Bumped by every invalidation: a load that began before it is not kept.
    pub(crate) generation: u64,
    /// Held by whoever loads this product's snapshot.
    pub(crate) loading: Arc<tokio::sync::Mutex<()>>,
    /// When the database's newest serial was last compared with a device's
    /// claim (see [`Cache::get_at_least`]); reset by an invalidation.
    checked_at: Option<Instant>,
    /// The snapshot is to be reloaded on its next use, as if past its TTL
    /// ([`Cache::expire_all`]).
    expired: bool,
}

impl Cache {
    /// An empty cache whose invalidations are told to the other servers.
    pub fn new(notify: Publisher) -> Cache {
        Cache {
            products: RwLock::default(),
            notify: Some(notify),
        }
    }

    /// Drops a product's snapshot after a change committed: the next
    /// resolution reloads it, here and (told right after, not in the
    /// change's transaction) on every other server.
    pub fn invalidate(&self, product: &str) {
        self.invalidate_here(product);
        if let Some(n) = &self.notify {
            n.publish(notify::Change::Product(product.to_string()));
        }
    }

    /// Drops a product's snapshot on this server only (another server told us).
    pub fn invalidate_here(&self, product: &str) {
        let mut products = self.products.write().expect("cache lock");
        let e = products.entry(product.to_string()).or_default();
        e.generation += 1;
        e.snapshot = None;
        e.checked_at = None;
    }

    /// Marks every snapshot on this server expired: after a lost
    /// notification connection, when any product may have changed. Each is
    /// reloaded on its next use and, like one past its TTL, still answers
    /// meanwhile: the connection is often lost because the database is, and
    /// a device is better served by the last answer than by a 503.
    pub fn expire_all(&self) {
        let mut products = self.products.write().expect("cache lock");
        for e in products.values_mut() {
            // A load that started before is not kept: it may predate the change.
            e.generation += 1;
            e.expired = true;
            e.checked_at = None;
        }
    }

    /// Like [`Cache::get`], but never older than `min_serial`, the serial
    /// the device last accepted (perhaps from another server that saw a
    /// change first): a snapshot below it is reloaded before answering, so
    /// a device's serial never goes down whichever server answers. A claim
    /// above the database's newest serial (a hostile or confused device)
    /// reloads nothing; the check is one cheap query, made at most once for
    /// all the requests that arrived before it.
    pub async fn get_at_least(
        state: &AppState,
        product: &str,
        min_serial: Option<i64>,
    ) -> Result<Arc<Snapshot>> {
        let arrived = Instant::now();
        let snap = Self::get(state, product).await?;
        match min_serial {
            Some(min) if snap.serial < min => {
                state.cache.catch_up(&state.db, product, min, arrived).await
            }
            _ => Ok(snap),
        }
    }

    /// Reloads a snapshot older than serial `min`, if the database holds it.
    async fn catch_up(
        &self,
        db: &PgPool,
        product: &str,
        min: i64,
        arrived: Instant,
    ) -> Result<Arc<Snapshot>> {
        let loading = self.loading(product);
        let _guard = loading.lock().await;
        let (current, checked_at, generation) = {
            let products = self.products.read().expect("cache lock");
            let e = products.get(product);
            (
                e.and_then(|e| e.snapshot.clone()),
                e.and_then(|e| e.checked_at),
                e.map_or(0, |e| e.generation),
            )
        };
        if let Some(s) = &current
            && (s.serial >= min || checked_at.is_some_and(|c| c >= arrived))
        {
            // Reloaded meanwhile, or the database was asked after this
            // request came: what it found stands.
            return Ok(s.clone());
        }
        let checking = Instant::now();
        let newest = sqlx::query_scalar!(
            "SELECT max(c.serial) FROM channels c JOIN products p ON p.id = c.product_id WHERE p.name = $1",
            product
        )
        .fetch_one(db)
        .await?
        .unwrap_or(0);
        let s = match current {
            // No serial that high was ever given: nothing to catch up on.
            Some(s) if newest < min => s,
            _ => self.load(db, product).await?,
        };
        if let Some(e) = self.products.write().expect("cache lock").get_mut(product)
            && e.generation == generation
        {
            e.checked_at = Some(checking);
        }
        Ok(s)
    }

    pub(crate) async fn get(state: &AppState, product: &str) -> Result<Arc<Snapshot>> {
        let cache = &state.cache;
        let (stale, loading) = {
            let products = cache.products.read().expect("cache lock");
            match products.get(product) {
                Some(e) => match &e.snapshot {
                    Some(s) if !e.expired && s.loaded_at.elapsed() < SNAPSHOT_TTL => {
                        return Ok(s.clone());
                    }
                    s => (s.clone(), Some(e.loading.clone())),
                },
                None => (None, None),
            }
        };
        let loading = loading.unwrap_or_else(|| cache.loading(product));
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

    /// The lock whoever loads `product`'s snapshot holds.
    fn loading(&self, product: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.products
            .write()
            .expect("cache lock")
            .entry(product.to_string())
            .or_default()
            .loading
            .clone()
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
            e.expired = false;
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
                let signature = r
                    .sigs
                    .0
                    .iter()
                    .find(|s| s.digest == pl.digest)
                    .map(SigRow::to_signature);
                PlatformOffer::new(&r.version, &p.repository, pl, signature)
            })
            .collect();
        releases.push(ReleaseSnap {
            version: r.version.into(),
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
            (None, Some(platforms), Some(digest)) => {
                let version =
                    semver::Version::parse(&crate::api::devices::pin_version_label(&digest)).ok()?;
                let shown = version.to_string();
                PinSnap::Image {
                    platforms: platforms
                        .0
                        .into_iter()
                        .map(|pl| {
                            PlatformOffer::new(&shown, &p.repository, pl.image, Some(pl.signature))
                        })
                        .collect(),
                    rel: Rel {
                        version,
                        floor: false,
                        revoked: false,
                    },
                }
            }
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
