//! Devices whose tokens are refused, held in memory so the device extractor
//! checks them without a database round trip: revoked and deleted devices
//! (every token) and reset ones (tokens issued before the reset). Loaded at
//! start, changed here with every revoke, reset and delete (and told to the
//! other servers, which reload at once: `infra/notify.rs`), and reloaded
//! every few seconds as the safety net for a notification missed. The same
//! tick forgets proofs of possession too old to be replayed.

use crate::error::{Error, Result};
use crate::infra::notify::{self, Publisher};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use uuid::Uuid;

/// How often the list is reloaded from the database.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Why a device's tokens are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// An admin revoked it: every token.
    Revoked,
    /// An admin deleted it: every token.
    Deleted,
    /// An admin reset it at this time (seconds since the epoch, rounded
    /// up): tokens issued before.
    ResetAt(i64),
}

/// The list; cheap to clone.
#[derive(Clone)]
pub struct Revocations {
    shared: Arc<Shared>,
}

struct Shared {
    db: PgPool,
    map: RwLock<HashMap<Uuid, Revoked>>,
    /// Bumped by every local change, so a reload that read the database
    /// before the change does not drop it.
    changes: AtomicU64,
    /// Tells the other servers of every change.
    notify: Publisher,
}

impl Revocations {
    /// Loads the list and starts reloading it; the task ends once every
    /// handle is dropped.
    pub async fn spawn(db: PgPool) -> Result<Self> {
        Self::spawn_with(db, Publisher::none()).await
    }

    /// Like [`Revocations::spawn`], telling the other servers of every change.
    pub async fn spawn_with(db: PgPool, notify: Publisher) -> Result<Self> {
        let shared = Arc::new(Shared {
            db,
            map: RwLock::default(),
            changes: AtomicU64::new(0),
            notify,
        });
        shared.reload().await?;
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                if let Err(e) = shared.reload().await {
                    tracing::warn!(error = %e, "reloading the device revocation list failed");
                }
                if let Err(e) = forget_old_proofs(&shared.db).await {
                    tracing::warn!(error = %e, "forgetting old device proofs failed");
                }
            }
        });
        Ok(Revocations { shared })
    }

    /// Refuses a token of device `id` issued at `iat` if the device was
    /// revoked, deleted, or reset after it.
    pub fn check(&self, id: &Uuid, iat: i64) -> Result<()> {
        let map = self.shared.map.read().expect("revocation lock");
        match map.get(id) {
            None => Ok(()),
            Some(Revoked::Revoked) => Err(Error::Unauthorized(
                "this device has been revoked by an admin".into(),
            )),
            Some(Revoked::Deleted) => Err(Error::Unauthorized(
                "this device has been deleted by an admin: enroll again".into(),
            )),
            Some(Revoked::ResetAt(at)) if iat < *at => Err(Error::Unauthorized(
                "this token was issued before an admin reset the device: enroll again".into(),
            )),
            Some(Revoked::ResetAt(_)) => Ok(()),
        }
    }

    /// Records a change made in the database (committed before this call),
    /// and tells the other servers.
    pub fn set(&self, id: Uuid, why: Option<Revoked>) {
        {
            let mut map = self.shared.map.write().expect("revocation lock");
            match why {
                Some(w) => map.insert(id, w),
                None => map.remove(&id),
            };
            self.shared.changes.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.notify.publish(notify::Change::Devices);
    }

    /// Reads the list again: another server changed it.
    pub async fn reload(&self) -> Result<()> {
        self.shared.reload().await
    }

    /// How many devices the list holds.
    pub fn len(&self) -> usize {
        self.shared.map.read().expect("revocation lock").len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shared {
    async fn reload(&self) -> Result<()> {
        for _ in 0..3 {
            let before = self.changes.load(Ordering::Acquire);
            let fresh = load(&self.db).await?;
            let mut map = self.map.write().expect("revocation lock");
            // A local change landed while we read: its row may be missing
            // from what we read, so read again.
            if self.changes.load(Ordering::Acquire) == before {
                *map = fresh;
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Resets and deletions older than the longest token lifetime (whatever the
/// lifetime is configured to now) refuse nothing more.
async fn load(db: &PgPool) -> Result<HashMap<Uuid, Revoked>> {
    let ttl_s = crate::config::MAX_DEVICE_TOKEN_TTL_S as f64;
    let mut map = HashMap::new();
    let rows = sqlx::query!(
        r#"SELECT id, revoked_at IS NOT NULL AS "revoked!",
                  ceil(extract(epoch FROM tokens_not_before))::bigint AS not_before
           FROM devices
           WHERE revoked_at IS NOT NULL OR tokens_not_before > now() - make_interval(secs => $1)"#,
        ttl_s
    )
    .fetch_all(db)
    .await?;
    for r in rows {
        let why = match (r.revoked, r.not_before) {
            (true, _) => Revoked::Revoked,
            (false, Some(at)) => Revoked::ResetAt(at),
            (false, None) => continue,
        };
        map.insert(r.id, why);
    }
    let deleted = sqlx::query_scalar!(
        "SELECT id FROM device_tombstones WHERE deleted_at > now() - make_interval(secs => $1)",
        ttl_s
    )
    .fetch_all(db)
    .await?;
    for id in deleted {
        map.insert(id, Revoked::Deleted);
    }
    Ok(map)
}

/// Proofs older than twice their window can no longer be replayed: their
/// timestamps are refused anyway.
async fn forget_old_proofs(db: &PgPool) -> Result<()> {
    sqlx::query!(
        "DELETE FROM device_proofs WHERE seen_at < now() - make_interval(secs => $1)",
        (2 * sluice_protocol::proof::PROOF_WINDOW_S + 60) as f64
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Records a proof's signature as used; refuses one seen before (a replay).
pub async fn use_proof(db: &PgPool, signature: &str) -> Result<()> {
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| Error::BadRequest("proof.signature must be base64".into()))?;
    let fresh = sqlx::query!(
        "INSERT INTO device_proofs (signature) VALUES ($1) ON CONFLICT DO NOTHING",
        sig
    )
    .execute(db)
    .await?
    .rows_affected()
        == 1;
    if fresh {
        Ok(())
    } else {
        Err(Error::Unauthorized(
            "this proof was already used (a replay): make a new one".into(),
        ))
    }
}
