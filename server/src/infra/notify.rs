//! Changes that alter an answer, told to every server on the same database
//! through PostgreSQL `LISTEN/NOTIFY` on [`CHANNEL`]: a product's snapshot,
//! the signing keys, the device revocation list. Each server publishes what
//! it changed right after the change commits and listens on one connection
//! of its own; the snapshot's expiry and the periodic reloads stay as the
//! safety net for a notification lost with a dropped connection.

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use std::time::Duration;
use tokio::sync::mpsc;

/// The notification channel every server listens on.
pub const CHANNEL: &str = "sluice_changes";

/// Longest wait between two attempts to listen again after a lost connection.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// A product's releases, channels, pins, labels or reboot policy: its
    /// resolve snapshot is stale. Payload `product:<name>`.
    Product(String),
    /// The key list or the signing keys (rotate, activate, revoke, renew). Payload `keys`.
    Keys,
    /// A device was revoked, reset or deleted. Payload `devices`.
    Devices,
}

impl Change {
    fn payload(&self) -> String {
        match self {
            Change::Product(p) => format!("product:{p}"),
            Change::Keys => "keys".into(),
            Change::Devices => "devices".into(),
        }
    }

    fn parse(s: &str) -> Option<Change> {
        match s {
            "keys" => Some(Change::Keys),
            "devices" => Some(Change::Devices),
            _ => s
                .strip_prefix("product:")
                .map(|p| Change::Product(p.to_string())),
        }
    }
}

/// What the listener tells its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Another server changed this.
    Changed(Change),
    /// The listening connection was lost and is back: notifications sent
    /// meanwhile are gone, so anything may have changed.
    Missed,
}

/// Sends changes to every other server; cheap to clone. Publishing never
/// waits: one background task per server sends them, in order.
#[derive(Clone)]
pub struct Publisher {
    /// Names this server in every payload, so it skips its own.
    instance: String,
    tx: Option<mpsc::UnboundedSender<Change>>,
}

impl Publisher {
    /// Starts the task that sends changes over `db`; it ends once every
    /// handle is dropped.
    pub fn spawn(db: PgPool) -> Publisher {
        let instance = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
        let me = instance.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // A burst (a ramp touching many products, a bulk import)
                // goes out once per change, not once per call.
                let mut batch = vec![first];
                while let Ok(c) = rx.try_recv() {
                    if !batch.contains(&c) {
                        batch.push(c);
                    }
                }
                for c in batch {
                    let payload = format!("{me} {}", c.payload());
                    if let Err(e) = sqlx::query!("SELECT pg_notify($1, $2)", CHANNEL, payload)
                        .execute(&db)
                        .await
                    {
                        tracing::warn!(error = %e, change = ?c, "telling the other servers of a change failed; they see it when their copy expires");
                    }
                }
            }
        });
        Publisher {
            instance,
            tx: Some(tx),
        }
    }

    /// A publisher that tells no one (a server alone, tests of one part).
    pub fn none() -> Publisher {
        Publisher {
            instance: String::new(),
            tx: None,
        }
    }

    /// Tells the other servers, after the change committed.
    pub fn publish(&self, change: Change) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(change);
        }
    }

    /// This server's name in payloads.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The `application_name` of this server's listening connection, as
    /// `pg_stat_activity` shows it.
    pub fn listener_name(&self) -> String {
        format!("sluice-listener-{}", self.instance)
    }
}

/// Listens on [`CHANNEL`] on a connection of its own and calls `handle` for
/// every change another server publishes, and with [`Event::Missed`] after a
/// lost connection is back (reconnecting with backoff). Returns once the
/// first `LISTEN` is in place (or failed: then it keeps trying in the
/// background). The task ends when `handle` answers `false`.
pub async fn listen(
    db: &PgPool,
    publisher: &Publisher,
    handle: impl Fn(Event) -> bool + Send + Sync + 'static,
) {
    let options = db
        .connect_options()
        .as_ref()
        .clone()
        .application_name(&publisher.listener_name());
    // A pool of one without timeouts: the listener holds its connection for good.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(options);
    let me = format!("{} ", publisher.instance);
    let first = connect(&pool).await;
    if let Err(e) = &first {
        tracing::warn!(error = %e, "listening for other servers' changes failed; retrying");
    }
    let closed = db.close_event();
    tokio::spawn(async move {
        // The server's pool closing (shutdown) ends the listening too.
        let shutdown = tokio::select! {
            () = closed => true,
            () = run(&pool, first.ok(), &me, handle) => false,
        };
        if shutdown {
            pool.close().await;
        }
    });
}

/// Receives until `handle` answers `false`, listening again after a loss.
async fn run(
    pool: &PgPool,
    mut listener: Option<PgListener>,
    me: &str,
    handle: impl Fn(Event) -> bool,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut l = match listener.take() {
            Some(l) => l,
            None => match connect(pool).await {
                Ok(l) => {
                    tracing::info!("listening for other servers' changes again");
                    backoff = Duration::from_millis(100);
                    if !handle(Event::Missed) {
                        return;
                    }
                    l
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "listening for other servers' changes failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        loop {
            match l.try_recv().await {
                Ok(Some(n)) => {
                    let payload = n.payload();
                    if payload.starts_with(me) {
                        continue;
                    }
                    let body = payload.split_once(' ').map_or(payload, |(_, b)| b);
                    match Change::parse(body) {
                        Some(c) => {
                            if !handle(Event::Changed(c)) {
                                return;
                            }
                        }
                        None => tracing::warn!(payload, "unknown change notification ignored"),
                    }
                }
                // sqlx reconnected and listens again already.
                Ok(None) => {
                    tracing::warn!("the listening connection was lost and is back");
                    if !handle(Event::Missed) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the listening connection failed");
                    // Whatever happens next, this server may be behind.
                    if !handle(Event::Missed) {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for c in [
            Change::Product("acme-os".into()),
            Change::Keys,
            Change::Devices,
        ] {
            assert_eq!(Change::parse(&c.payload()), Some(c));
        }
        assert_eq!(Change::parse("weather"), None);
    }
}
