//! Writing the audit log, in the caller's transaction. Reading it is
//! `api::audit`.

use crate::error::Result;

/// Records one change by `actor` (`user:<name>`, `token:<id>`, `device:<id>`,
/// or `system` for the health gate). Pass the transaction that makes the change.
pub async fn record_as<'e>(
    db: impl sqlx::PgExecutor<'e>,
    actor: &str,
    action: &str,
    target: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO audit_log (actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5)",
        actor,
        action,
        target,
        before,
        after
    )
    .execute(db)
    .await?;
    Ok(())
}
