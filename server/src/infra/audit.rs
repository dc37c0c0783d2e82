//! Writing the audit log, in the caller's transaction. Reading it is
//! `api::audit`.

use crate::error::Result;

/// Whoever the log names as making a change.
pub trait Actor {
    /// `user:<name>`, `token:<id>`, `device:<id>`, or `system` for the health gate.
    fn actor(&self) -> String;
}

impl Actor for str {
    fn actor(&self) -> String {
        self.to_owned()
    }
}

/// Records one change by `actor` (a name as [`Actor`] says, or an API caller).
/// Pass the transaction that makes the change.
pub async fn record_as<'e>(
    db: impl sqlx::PgExecutor<'e>,
    actor: &(impl Actor + ?Sized),
    action: &str,
    target: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO audit_log (actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5)",
        actor.actor(),
        action,
        target,
        before,
        after
    )
    .execute(db)
    .await?;
    Ok(())
}
