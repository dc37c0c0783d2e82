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
    /// The version of `digest`, shared with the snapshot.
    pub(crate) version: Option<Arc<str>>,
    /// The key list version the device holds, if it said.
    pub(crate) keys_version: Option<i64>,
    /// `<version>@<digest>` the answer told the device to install, for the
    /// health gate; shared with the snapshot.
    pub(crate) offered: Option<Arc<str>>,
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
    /// How long a timed write may spread its statements over (half the
    /// interval between writes).
    pace: Duration,
}

impl Checkins {
    /// Starts the writer task; it ends once every handle is dropped.
    pub fn spawn(db: PgPool, every: Duration) -> Self {
        let shared = Arc::new(CheckinsShared {
            db,
            pending: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
            pace: every / 2,
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            // The first write one interval after the start: nothing is pending before.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                shared.write(true).await;
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

    /// Writes every pending check-in now, statement after statement.
    pub async fn flush(&self) {
        self.shared.write(false).await;
    }
}

/// Most check-ins one statement writes. A second's worth of a busy server's
/// polls in one statement is one long burst of work, on a server thread
/// (building and encoding it) and then in PostgreSQL (about 10 µs a row):
/// where they share cores, the polls answered meanwhile wait behind it.
const CHUNK: usize = 1000;

impl CheckinsShared {
    /// Writes what is pending, [`CHUNK`] devices to a statement. `paced`
    /// (the timed write): the statements are spread over [`Self::pace`]
    /// rather than sent back to back, so neither this server nor
    /// PostgreSQL spends a long burst on them.
    pub(crate) async fn write(&self, paced: bool) {
        let _one = self.writing.lock().await;
        let batch = {
            let mut pending = self.pending.lock().expect("check-in lock");
            // The next second's map starts at this one's size: it is not
            // grown (and rehashed) again under the polls' lock.
            let room = pending.len();
            std::mem::replace(&mut *pending, HashMap::with_capacity(room))
        };
        if batch.is_empty() {
            return;
        }
        let chunks = batch.len().div_ceil(CHUNK) as u32;
        let gap = if paced {
            self.pace / chunks
        } else {
            Duration::ZERO
        };
        let mut rest = batch.into_iter();
        for i in 0..chunks {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            // Each statement is its own transaction and locks its rows in id
            // order: servers writing overlapping chunks (a device whose polls
            // the balancer spread over several) wait for each other instead
            // of deadlocking. Sorting a chunk at a time, not the whole batch,
            // keeps the work between two statements short.
            let mut chunk: Vec<(Uuid, Checkin)> = rest.by_ref().take(CHUNK).collect();
            chunk.sort_unstable_by_key(|(id, _)| *id);
            if let Err(failed) = write(&self.db, chunk).await {
                // Put them back: last-seen may lag, never be lost. A newer
                // poll of the same device, made meanwhile, wins.
                let mut pending = self.pending.lock().expect("check-in lock");
                for (id, c) in failed.into_iter().chain(rest) {
                    pending.entry(id).or_insert(c);
                }
                return;
            }
        }
    }
}

/// One UPDATE for a chunk of check-ins, sorted by id; the chunk comes back
/// when it failed.
pub(crate) async fn write(
    db: &PgPool,
    batch: Vec<(Uuid, Checkin)>,
) -> std::result::Result<(), Vec<(Uuid, Checkin)>> {
    let n = batch.len();
    let mut ids = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut arches = Vec::with_capacity(n);
    let mut digests = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut keys_versions = Vec::with_capacity(n);
    let mut offered = Vec::with_capacity(n);
    for (id, c) in &batch {
        ids.push(*id);
        ats.push(c.at);
        channels.push(c.channel.as_str());
        arches.push(c.arch.as_str());
        digests.push(c.digest.as_deref());
        versions.push(c.version.as_deref());
        keys_versions.push(c.keys_version);
        offered.push(c.offered.as_deref());
    }
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
        &channels as &[&str],
        &arches as &[&str],
        &digests as &[Option<&str>],
        &versions as &[Option<&str>],
        &keys_versions as &[Option<i64>],
        &offered as &[Option<&str>]
    )
    .execute(db)
    .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, n, "writing check-ins failed; will retry");
            Err(batch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkin(at: OffsetDateTime) -> Checkin {
        Checkin {
            at,
            channel: "stable".into(),
            arch: "arm64".into(),
            digest: None,
            version: None,
            keys_version: Some(1),
            offered: Some("1.1.0@sha256:00".into()),
        }
    }

    /// Devices `id(0)` to `id(n - 1)` on channel `old`, last seen an hour ago.
    async fn fleet(db: &PgPool, n: usize) {
        sqlx::raw_sql(
            "INSERT INTO products (id, name, repository, enrollment_secret_hash)
             VALUES ('00000000-0000-0000-0000-0000000000aa', 'p', 'r.example/p', '\\x00')",
        )
        .execute(db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO devices (id, product_id, machine_id, channel, arch, status, last_seen)
             SELECT ('00000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid,
                    '00000000-0000-0000-0000-0000000000aa', 'm-' || i, 'old', 'amd64', 'healthy',
                    now() - interval '1 hour'
             FROM generate_series(0, $1 - 1) AS i",
        )
        .bind(n as i64)
        .execute(db)
        .await
        .unwrap();
    }

    /// How many devices a check-in (`checkin(at)`) has been written for.
    async fn written(db: &PgPool, at: OffsetDateTime) -> usize {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM devices WHERE channel = 'stable' AND last_seen = $1",
        )
        .bind(at)
        .fetch_one(db)
        .await
        .unwrap() as usize
    }

    fn id(i: usize) -> Uuid {
        Uuid::parse_str(&format!("00000000-0000-4000-8000-{i:012}")).unwrap()
    }

    /// More check-ins than one statement takes are written in chunks; when a
    /// chunk fails (here a trigger refuses one device), the chunks before it
    /// stay written, that chunk and every later one go back to pending, and
    /// the next write takes them: none is lost, none is written twice.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn a_failed_chunk_and_those_after_it_are_written_later(db: PgPool) {
        // Whole chunks, so that the failed one and those after it are at
        // least a chunk: some device besides the refused one is put back.
        let n = 3 * CHUNK;
        fleet(&db, 5001).await;
        // One device cannot be written; which chunk it falls in depends on
        // the pending map's order.
        let refused = id(CHUNK + CHUNK / 2);
        sqlx::raw_sql(
            "CREATE TABLE refused (id uuid);
             CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.id IN (SELECT id FROM refused) THEN RAISE EXCEPTION 'refused'; END IF;
             RETURN NEW; END $$;
             CREATE TRIGGER refuse BEFORE UPDATE ON devices FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
        .execute(&db)
        .await
        .unwrap();
        sqlx::query("INSERT INTO refused VALUES ($1)")
            .bind(refused)
            .execute(&db)
            .await
            .unwrap();
        let checkins = Checkins::spawn(db.clone(), Duration::from_secs(3600));
        let at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        for i in 0..n {
            checkins.seen(id(i), checkin(at));
        }
        checkins.flush().await;
        let first = written(&db, at).await;
        let pending: Vec<Uuid> = checkins
            .shared
            .pending
            .lock()
            .unwrap()
            .keys()
            .copied()
            .collect();
        assert_eq!(first % CHUNK, 0, "whole chunks are written: {first}");
        assert_eq!(
            first + pending.len(),
            n,
            "every device is written or pending"
        );
        assert!(pending.contains(&refused));
        let still: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM devices WHERE id = ANY($1) AND channel = 'old'",
        )
        .bind(&pending)
        .fetch_one(&db)
        .await
        .unwrap();
        // No pending device's row changed: the failed statement wrote none
        // of its chunk.
        assert_eq!(still as usize, pending.len());

        // A newer poll made meanwhile wins over the one put back.
        let newer = *pending.iter().find(|p| **p != refused).unwrap();
        let later = at + time::Duration::seconds(5);
        checkins.seen(newer, checkin(later));
        sqlx::query("DROP TRIGGER refuse ON devices")
            .execute(&db)
            .await
            .unwrap();
        checkins.flush().await;
        assert!(checkins.shared.pending.lock().unwrap().is_empty());
        assert_eq!(written(&db, at).await, n - 1);
        let last: OffsetDateTime =
            sqlx::query_scalar("SELECT last_seen FROM devices WHERE id = $1")
                .bind(newer)
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(last, later);
        let untouched: i64 =
            sqlx::query_scalar("SELECT count(*) FROM devices WHERE channel = 'old'")
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(untouched as usize, 5001 - n, "devices that never polled");

        // The timed writer spreads its statements over half its interval,
        // and writes every one of them.
        let timed = Checkins::spawn(db.clone(), Duration::from_millis(200));
        let at = at + time::Duration::seconds(60);
        for i in 0..n {
            timed.seen(id(i), checkin(at));
        }
        let mut all = false;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if written(&db, at).await == n {
                all = true;
                break;
            }
        }
        assert!(
            all,
            "the timed writer wrote {} of {n}",
            written(&db, at).await
        );
    }

    /// Two servers whose polls share devices (a balancer spreading a
    /// device's polls) write overlapping chunks at the same moment. Each
    /// statement locks its rows in id order, so one waits for the other and
    /// neither fails with a deadlock: nothing is left pending. Taken in the
    /// pending map's order instead, the two statements lock the same rows in
    /// different orders and PostgreSQL aborts one of them.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn two_servers_writing_the_same_devices_do_not_deadlock(db: PgPool) {
        let n = 2 * CHUNK;
        fleet(&db, n).await;
        let servers = [
            Checkins::spawn(db.clone(), Duration::from_secs(3600)),
            Checkins::spawn(db.clone(), Duration::from_secs(3600)),
        ];
        let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        for round in 0..10 {
            let at = start + time::Duration::seconds(round);
            for s in &servers {
                for i in 0..n {
                    s.seen(id(i), checkin(at));
                }
            }
            tokio::join!(servers[0].flush(), servers[1].flush());
            for s in &servers {
                let left = s.shared.pending.lock().unwrap().len();
                assert_eq!(left, 0, "round {round}: a statement failed");
            }
            assert_eq!(written(&db, at).await, n);
        }
    }
}
