//! The audit log: every change by a person or token, written in the same
//! transaction as the change itself (the writer is `infra::audit`), and
//! `GET /v1/audit` to read it.

use crate::api::auth::{Admin, Principal};
use crate::app::{AppState, Problems};
use crate::error::{Json, Query, Result};
use crate::paging::{Page, PageParams};
use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

/// Records one change by the caller. Pass the transaction that makes the change.
pub use crate::infra::audit::record_as as record;

impl crate::infra::audit::Actor for Principal {
    fn actor(&self) -> String {
        Principal::actor(self)
    }
}

/// One audit entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Increasing id; also the paging cursor.
    pub id: i64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who: `user:<name>`, `token:<id>`, `device:<id>` or `system`.
    pub actor: String,
    /// What, as `resource.verb` (`release.publish`, `channel.promote`).
    pub action: String,
    /// Which: `product:acme-os`, `release:acme-os/1.2.0`, `channel:acme-os/stable`.
    pub target: String,
    /// The state before (absent on creation).
    pub before: Option<serde_json::Value>,
    /// The state after (absent on deletion).
    pub after: Option<serde_json::Value>,
}

/// Filters of `GET /v1/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditFilter {
    /// Only entries by this actor.
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only targets starting with this (`channel:acme-os/`).
    pub target: Option<String>,
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit))
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(AuditFilter, PageParams), security(("bearer" = [])),
    responses((status = 200, body = Page<AuditEntry>), Problems<401, 403>))]
async fn list_audit(
    State(state): State<AppState>,
    _admin: Admin,
    Query(filter): Query<AuditFilter>,
    Query(page): Query<PageParams>,
) -> Result<Json<Page<AuditEntry>>> {
    let limit = page.limit();
    let cursor = page.cursor_i64()?;
    let rows = sqlx::query_as!(
        AuditEntry,
        r#"SELECT id, at, actor, action, target, before, after FROM audit_log
           WHERE ($1::bigint IS NULL OR id < $1)
             AND ($2::text IS NULL OR actor = $2)
             AND ($3::text IS NULL OR action = $3)
             AND ($4::text IS NULL OR starts_with(target, $4))
           ORDER BY id DESC LIMIT $5"#,
        cursor,
        filter.actor,
        filter.action,
        filter.target,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    Ok(Json(Page::from_rows(rows, limit, |e| e.id.to_string())))
}
