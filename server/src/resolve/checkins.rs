//! Check-ins, batched: the hot path queues each device's last seen time,
//! channel, arch and offer, and one task writes them behind in bulk.

use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use uuid::Uuid;

/// One device's poll, written behind in batches.
#[derive(Debug, Clone)]
pub(crate) struct Checkin {
    pub(crate) at: OffsetDateTime,
    pub(crate) channel: String,
    pub(crate) arch: String,
    pub(crate) digest: Option<String>,
    pub(crate) version: Option<String>,
    /// The key list version the device holds, if it said.
    pub(crate) keys_version: Option<i64>,
    /// `<version>@<digest>` the answer told the device to install, for the health gate.
    pub(crate) offered: Option<String>,
}

/// Batches check-ins (last seen, current digest) and writes them every
/// `SLUICE_CHECKIN_FLUSH_MS` (default a second) in one statement; `flush`
/// writes what is pending (on shutdown). A poll only inserts into the shared
/// map under a short lock: no message is sent and no task woken per request.
#[derive(Clone)]
pub struct Checkins {
    pub(crate) shared: Arc<CheckinsShared>,
}

pub(crate) struct CheckinsShared {
    pub(crate) db: PgPool,
    pub(crate) pending: Mutex<HashMap<Uuid, Checkin>>,
    /// One write at a time (the tick and a flush), as the single writer task
    /// did: two UPDATEs of overlapping rows could deadlock each other.
    pub(crate) writing: tokio::sync::Mutex<()>,
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

    pub(crate) fn seen(&self, id: Uuid, c: Checkin) {
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
    pub(crate) async fn write(&self) {
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

/// One UPDATE for a batch; the batch comes back when it failed.
pub(crate) async fn write(
    db: &PgPool,
    pending: HashMap<Uuid, Checkin>,
) -> std::result::Result<(), HashMap<Uuid, Checkin>> {
    if pending.is_empty() {
        return Ok(());
    }
    // In id order: servers writing overlapping batches (a device whose
    // polls the balancer spread over several) then lock rows in the same
    // order, and wait for each other instead of deadlocking.
    let mut batch: Vec<(Uuid, Checkin)> = pending.into_iter().collect();
    batch.sort_unstable_by_key(|(id, _)| *id);
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
