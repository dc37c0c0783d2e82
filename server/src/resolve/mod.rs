//! The hot path: `GET .../resolve`. Answers from an in-memory snapshot of the
//! product (releases, channels, pins) with no database round trip; check-ins
//! are batched and written behind. Every answer is signed.

use crate::app::AppState;
use crate::auth::DeviceAuth;
use crate::devices::PinPlatform;
use crate::error::{Error, Path, Query, Result};
use crate::registry::PlatformImage;
use crate::rules::rollout::{self, Rel, Rollout};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sluice_protocol::keys::SIGNATURE_HEADER;
use sluice_protocol::{ImageSignature, Offer, ResolveResponse, WIRE_VERSION, is_sha256_digest};
use sqlx::PgPool;
use sqlx::types::Json as SqlJson;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// How long a snapshot serves before it is reloaded, so changes made by
/// another server instance show up even without an invalidation here.
const SNAPSHOT_TTL: Duration = Duration::from_secs(5);

/// A platform of a release, ready to offer.
#[derive(Debug, Clone)]
struct PlatformOffer {
    architecture: String,
    variant: Option<String>,
    digest: String,
    size: u64,
    signature: Option<ImageSignature>,
}

#[derive(Debug)]
struct ReleaseSnap {
    version: String,
    platforms: Vec<PlatformOffer>,
}

#[derive(Debug)]
struct ChannelSnap {
    head: Option<usize>,
    base: Option<usize>,
    rollout: Rollout,
    rolled_back: bool,
    serial: i64,
}

#[derive(Debug)]
enum PinSnap {
    Release(usize),
    Image {
        rel: Rel,
        platforms: Vec<PlatformOffer>,
    },
}

/// What resolution needs of one product, loaded at once.
#[derive(Debug)]
pub struct Snapshot {
    loaded_at: Instant,
    repository: String,
    releases: Vec<ReleaseSnap>,
    rels: Vec<Rel>,
    by_digest: HashMap<String, usize>,
    channels: HashMap<String, ChannelSnap>,
    /// The highest serial of the product's channels: what every answer
    /// carries, so a device's serial never goes down when it changes channel
    /// (serials come from one sequence, so this maximum only grows).
    serial: i64,
    pins: HashMap<Uuid, PinSnap>,
    /// Devices an admin asked to try failed digests again, with the digests.
    retries: HashMap<Uuid, Vec<String>>,
}

/// Product snapshots, dropped whenever something they hold changes.
///
/// One request loads a missing snapshot while the others wait for it; an
/// expired one keeps serving while a single background task reloads it, so
/// the resolve path never waits on the database once warm, whatever the size
/// of the fleet.
#[derive(Default)]
pub struct Cache {
    products: RwLock<HashMap<String, Entry>>,
}

#[derive(Default)]
struct Entry {
    snapshot: Option<Arc<Snapshot>>,
    /// Bumped by every invalidation: a load that began before it is not kept.
    generation: u64,
    /// Held by whoever loads this product's snapshot.
    loading: Arc<tokio::sync::Mutex<()>>,
}

impl Cache {
    /// Drops a product's snapshot: the next resolution reloads it.
    pub fn invalidate(&self, product: &str) {
        let mut products = self.products.write().expect("cache lock");
        let e = products.entry(product.to_string()).or_default();
        e.generation += 1;
        e.snapshot = None;
    }

    async fn get(state: &AppState, product: &str) -> Result<Arc<Snapshot>> {
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
    async fn load(&self, db: &PgPool, product: &str) -> Result<Arc<Snapshot>> {
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

async fn load(db: &PgPool, product: &str) -> Result<Snapshot> {
    let mut conn = db.acquire().await?;
    let p = crate::products::load(&mut *conn, product).await?;
    let rows = sqlx::query!(
        r#"SELECT r.id, r.version, r.digest, r.floor, r.state, r.platforms AS "platforms: SqlJson<Vec<PlatformImage>>",
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
            platforms,
        });
        rels.push(Rel {
            version,
            floor: r.floor,
            revoked: r.state == "revoked",
        });
    }
    let channels: HashMap<String, ChannelSnap> = sqlx::query_as!(
        crate::channels::StoredChannel,
        r#"SELECT c.id, c.name, c.description, c.head_release_id, c.base_release_id,
                  NULL::text AS "head?", NULL::text AS "base?", c.percent, c.ramp_from_percent, c.ramp_to_percent,
                  c.ramp_over_minutes, c.ramp_started_at, c.paused, c.paused_reason, c.paused_at, c.rolled_back,
                  c.gate_max_failure_percent, c.gate_min_reports, c.serial, c.updated_at
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
                    version: semver::Version::parse(&crate::devices::pin_version_label(&digest)).ok()?,
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
    Ok(Snapshot {
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
struct SigRow {
    digest: String,
    payload: String,
    signature: String,
    key_id: String,
}

impl SigRow {
    fn to_signature(&self) -> ImageSignature {
        ImageSignature {
            payload: self.payload.clone(),
            signature: self.signature.clone(),
            key_id: self.key_id.clone(),
        }
    }
}

/// One device's poll, written behind in batches.
#[derive(Debug, Clone)]
struct Checkin {
    at: OffsetDateTime,
    channel: String,
    arch: String,
    digest: Option<String>,
    version: Option<String>,
    /// The key list version the device holds, if it said.
    keys_version: Option<i64>,
    /// `<version>@<digest>` the answer told the device to install, for the health gate.
    offered: Option<String>,
}

/// Batches check-ins (last seen, current digest) and writes them every
/// `SLUICE_CHECKIN_FLUSH_MS` (default a second) in one statement; `flush`
/// writes what is pending (on shutdown). A poll only inserts into the shared
/// map under a short lock: no message is sent and no task woken per request.
#[derive(Clone)]
pub struct Checkins {
    shared: Arc<CheckinsShared>,
}

struct CheckinsShared {
    db: PgPool,
    pending: Mutex<HashMap<Uuid, Checkin>>,
    /// One write at a time (the tick and a flush), as the single writer task
    /// did: two UPDATEs of overlapping rows could deadlock each other.
    writing: tokio::sync::Mutex<()>,
}

impl Checkins {
    /// Starts the writer task; it ends once every handle is dropped.
    pub fn spawn(db: PgPool, every: Duration) -> Self {
        let shared = Arc::new(CheckinsShared {
            db,
            pending: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                shared.write().await;
            }
        });
        Checkins { shared }
    }

    fn seen(&self, id: Uuid, c: Checkin) {
        self.shared
            .pending
            .lock()
            .expect("check-in lock")
            .insert(id, c);
    }

    /// Writes every pending check-in now.
    pub async fn flush(&self) {
        self.shared.write().await;
    }
}

impl CheckinsShared {
    async fn write(&self) {
        let _one = self.writing.lock().await;
        let batch = std::mem::take(&mut *self.pending.lock().expect("check-in lock"));
        if let Err(batch) = write(&self.db, batch).await {
            // Put them back: last-seen may lag, never be lost. A newer poll
            // of the same device, made meanwhile, wins.
            let mut pending = self.pending.lock().expect("check-in lock");
            for (id, c) in batch {
                pending.entry(id).or_insert(c);
            }
        }
    }
}

/// Signs resolve answers in batches: an answer waits for the next batch,
/// which one signature covers through a Merkle root (see
/// [`sluice_protocol::ResponseSigner::sign_batch`]), each answer carrying its
/// inclusion path. Nothing waits for a batch to fill: a signing task takes
/// whatever answers are queued when it runs, and runs again while more come,
/// so a lone answer is signed at once and, under load, one Ed25519 signature
/// (about 11 µs here) serves every answer made meanwhile.
#[derive(Default)]
pub struct AnswerSigner {
    queue: Mutex<Vec<([u8; 32], oneshot::Sender<String>)>>,
    /// Whether a signing task runs (or is about to).
    running: AtomicBool,
}

impl AnswerSigner {
    /// The `Sluice-Signature` header for `body`.
    pub async fn sign(&self, state: &AppState, body: &[u8]) -> Result<String> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.queue.lock().expect("answer queue lock");
            q.push((sluice_protocol::leaf_hash(body), tx));
            !self.running.swap(true, Ordering::AcqRel)
        };
        if lead {
            // A task of its own, so a client going away cannot strand the
            // answers of others.
            let state = state.clone();
            tokio::spawn(async move { state.answers.drain(&state).await });
        }
        rx.await
            .map_err(|_| Error::Internal(anyhow::anyhow!("the answer signer stopped")))
    }

    async fn drain(&self, state: &AppState) {
        loop {
            // Let the answers being made now (and those just signed) run
            // before the next batch is taken: on a busy worker that both
            // fills the batch and keeps this loop from holding the thread.
            tokio::task::yield_now().await;
            let batch = std::mem::take(&mut *self.queue.lock().expect("answer queue lock"));
            if batch.is_empty() {
                self.running.store(false, Ordering::Release);
                // An answer queued after the take but before the store found
                // `running` set and started no task: take it over, unless a
                // newer task already did.
                if self.queue.lock().expect("answer queue lock").is_empty()
                    || self.running.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                continue;
            }
            let leaves: Vec<[u8; 32]> = batch.iter().map(|(leaf, _)| *leaf).collect();
            let headers = state.keys.response_signer().sign_batch(&leaves);
            for ((_, tx), header) in batch.into_iter().zip(headers) {
                // The request may have gone away meanwhile.
                let _ = tx.send(header);
            }
        }
    }
}

/// One UPDATE for a batch; the batch comes back when it failed.
async fn write(
    db: &PgPool,
    pending: HashMap<Uuid, Checkin>,
) -> std::result::Result<(), HashMap<Uuid, Checkin>> {
    if pending.is_empty() {
        return Ok(());
    }
    let batch: Vec<(Uuid, Checkin)> = pending.into_iter().collect();
    let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
    let ats: Vec<OffsetDateTime> = batch.iter().map(|(_, c)| c.at).collect();
    let channels: Vec<String> = batch.iter().map(|(_, c)| c.channel.clone()).collect();
    let arches: Vec<String> = batch.iter().map(|(_, c)| c.arch.clone()).collect();
    let digests: Vec<Option<String>> = batch.iter().map(|(_, c)| c.digest.clone()).collect();
    let versions: Vec<Option<String>> = batch.iter().map(|(_, c)| c.version.clone()).collect();
    let keys_versions: Vec<Option<i64>> = batch.iter().map(|(_, c)| c.keys_version).collect();
    let offered: Vec<Option<String>> = batch.iter().map(|(_, c)| c.offered.clone()).collect();
    // A report written after the poll (last_seen later) wins over the poll.
    // The last 8 offers are kept.
    let r = sqlx::query!(
        r#"UPDATE devices d SET last_seen = u.at, channel = u.channel, arch = u.arch,
              current_digest = coalesce(u.digest, d.current_digest),
              current_version = CASE WHEN u.digest IS NULL OR u.digest = d.current_digest THEN d.current_version
                                     ELSE u.version END,
              keys_version = coalesce(u.keys_version, d.keys_version),
              offered = CASE WHEN u.offered IS NULL OR u.offered = ANY(d.offered) THEN d.offered
                             ELSE (d.offered || u.offered)[greatest(1, cardinality(d.offered) - 6):] END
           FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[])
                AS u(id, at, channel, arch, digest, version, keys_version, offered)
           WHERE d.id = u.id AND d.last_seen <= u.at"#,
        &ids,
        &ats,
        &channels,
        &arches,
        &digests as &[Option<String>],
        &versions as &[Option<String>],
        &keys_versions as &[Option<i64>],
        &offered as &[Option<String>]
    )
    .execute(db)
    .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, n = batch.len(), "writing check-ins failed; will retry");
            Err(batch.into_iter().collect())
        }
    }
}

/// Query of `GET .../resolve`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResolveQuery {
    /// The device's architecture (`amd64`, `arm64`, `arm/v7`); `amd64` when
    /// absent (the agent always sends its own). It is recorded as the
    /// device's architecture with the check-in.
    pub arch: Option<String>,
    /// The digest the device runs.
    pub current: Option<String>,
    /// A fresh random value (8–128 of `[A-Za-z0-9_-]`), echoed in the signed answer.
    pub nonce: String,
    /// The newest key list version the device holds (`GET /v1/keys/lists`).
    pub keys_version: Option<u64>,
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(resolve))
}

/// Which image the device should run: a signed decision.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/resolve", tag = "channels",
    params(("product" = String, Path, description = "Product name"), ("channel" = String, Path, description = "Channel name"), ResolveQuery),
    security(("bearer" = [])),
    responses((status = 200, body = ResolveResponse, description = "Signed: the `Sluice-Signature` header holds `keyid=<id>; sig=<base64 Ed25519>; batch=<index>/<size>; path=<base64 SHA-256 hashes>`: one signature over a batch of answers (over `sluice-resolve-batch-v1\\0`, the size as 8 bytes big endian and the RFC 9162 Merkle root of the answers' exact bodies), with this body's place and inclusion path. Without `batch` and `path`, the signature is over the body itself.",
               headers(("Sluice-Signature" = String, description = "keyid, signature, and this body's place and inclusion path in the signed batch"))),
              (status = 400, body = crate::error::Problem), (status = 401, body = crate::error::Problem),
              (status = 403, body = crate::error::Problem), (status = 404, body = crate::error::Problem)))]
async fn resolve(
    State(state): State<AppState>,
    device: DeviceAuth,
    Path((product, channel)): Path<(String, String)>,
    Query(q): Query<ResolveQuery>,
) -> Result<Response> {
    if device.product != product {
        return Err(Error::Forbidden(format!(
            "this device belongs to product {}, not {product}",
            device.product
        )));
    }
    if !(8..=128).contains(&q.nonce.len())
        || !q
            .nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::BadRequest(
            "nonce must be 8–128 characters of [A-Za-z0-9_-], fresh for each request".into(),
        ));
    }
    if let Some(c) = &q.current
        && !is_sha256_digest(c)
    {
        return Err(Error::BadRequest(
            "current must be the running image's digest, `sha256:<64 hex>`".into(),
        ));
    }
    let arch = q.arch.clone().unwrap_or_else(|| "amd64".into());
    if arch.is_empty() || arch.len() > 32 {
        return Err(Error::BadRequest("arch must be 1–32 characters".into()));
    }
    let snap = Cache::get(&state, &product).await?;
    let ch = snap
        .channels
        .get(&channel)
        .ok_or_else(|| Error::not_found(format!("channel {channel} of product {product}")))?;
    let now = OffsetDateTime::now_utc();
    let current_idx = q
        .current
        .as_ref()
        .and_then(|d| snap.by_digest.get(d).copied());
    let device_id = device.id.to_string();

    let pin = snap.pins.get(&device.id);
    let pin_rel = match pin {
        Some(PinSnap::Release(i)) => Some(&snap.rels[*i]),
        Some(PinSnap::Image { rel, .. }) => Some(rel),
        None => None,
    };
    let input = rollout::Input {
        releases: &snap.rels,
        head: ch.head.map(|i| &snap.rels[i]),
        base: ch.base.map(|i| &snap.rels[i]),
        rollout: &ch.rollout,
        rolled_back: ch.rolled_back,
        pin: pin_rel,
        device_id: &device_id,
        current: current_idx.map(|i| &snap.rels[i]),
        now,
    };
    let decision = rollout::decide(&input);
    let offer = decision.target.and_then(|t| {
        let (version, platforms) = match pin {
            Some(PinSnap::Image { rel, platforms }) if std::ptr::eq(t, rel) => {
                (t.version.to_string(), platforms)
            }
            _ => {
                let i = snap.rels.iter().position(|r| std::ptr::eq(r, t))?;
                (
                    snap.releases[i].version.clone(),
                    &snap.releases[i].platforms,
                )
            }
        };
        // `arm/v7` asks for architecture `arm`, variant `v7`.
        let pl = crate::registry::best_fit(platforms, &arch, |p| {
            (p.architecture.as_str(), p.variant.as_deref())
        })?;
        Some(Offer {
            version,
            image: format!("{}@{}", snap.repository, pl.digest),
            digest: pl.digest.clone(),
            size: pl.size,
            signature: pl.signature.clone()?,
        })
    });
    // Rule 5: the device already runs the target's digest.
    let running = offer
        .as_ref()
        .is_some_and(|o| q.current.as_deref() == Some(o.digest.as_str()));
    let update = decision.update && offer.is_some() && !running;
    let answer = ResolveResponse {
        update,
        downgrade: update && decision.downgrade,
        release: offer,
        poll_after_s: state.config.poll_after_s,
        device_id,
        nonce: q.nonce,
        serial: snap.serial,
        issued_at: now,
        expires_at: now + time::Duration::seconds(state.config.response_ttl_s as i64),
        // What was asked, so the device can tell that this answers its own
        // question and not one a proxy rewrote.
        wire: WIRE_VERSION,
        product: Some(product),
        channel: Some(channel.clone()),
        arch: Some(arch.clone()),
        current: q.current.clone(),
        keys_version: state.keys.list_version(),
        retry: snap.retries.get(&device.id).cloned().unwrap_or_default(),
    };
    state.checkins.seen(
        device.id,
        Checkin {
            at: now,
            channel,
            arch,
            version: current_idx.map(|i| snap.releases[i].version.clone()),
            digest: q.current,
            // A device may only claim lists that exist.
            keys_version: q
                .keys_version
                .filter(|v| Some(*v) <= state.keys.list_version())
                .and_then(|v| i64::try_from(v).ok()),
            offered: answer
                .release
                .as_ref()
                .filter(|_| answer.update)
                .map(|r| format!("{}@{}", r.version, r.digest)),
        },
    );
    state
        .metrics
        .resolves
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = serde_json::to_vec(&answer).map_err(anyhow::Error::from)?;
    let sig = state.answers.sign(&state, &body).await?;
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        SIGNATURE_HEADER,
        HeaderValue::from_str(&sig).map_err(anyhow::Error::from)?,
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
