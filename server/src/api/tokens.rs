//! API tokens for CI: publisher tokens scoped to products, shown once,
//! revocable. Each is a JWT whose subject is a row here; revoking the row
//! revokes the token on its next use.

use crate::api::auth::Admin;
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Path, Result};
use crate::infra::jwt::Role;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// `POST /v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// What it is for (`github-actions acme-os`).
    pub name: String,
    /// `publisher` (CI), or `viewer` / `admin` for scripts.
    pub role: Role,
    /// Products a publisher token may publish to and promote in.
    #[serde(default)]
    pub products: Vec<String>,
    /// Lifetime in days (default 365, at most 3650).
    #[serde(default)]
    pub expires_in_days: Option<i64>,
}

/// An API token as listed (never its secret).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Its id.
    pub id: Uuid,
    /// What it is for.
    pub name: String,
    /// Its role.
    pub role: String,
    /// Products it is scoped to.
    pub products: Vec<String>,
    /// Who made it.
    pub created_by: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// A new token: the secret is shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// Its id (for revoking).
    pub id: Uuid,
    /// The bearer token.
    pub token: String,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
}

/// Makes an API token.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = NewToken, security(("bearer" = [])),
    responses((status = 201, body = CreatedToken), Problems<400, 401, 403, 404>))]
async fn create_token(
    State(state): State<AppState>,
    Admin(who): Admin,
    Json(req): Json<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>)> {
    if req.name.trim().is_empty() {
        return Err(Error::BadRequest(
            "give the token a name saying what it is for".into(),
        ));
    }
    if req.role == Role::Device {
        return Err(Error::BadRequest(
            "device tokens come from enrollment; choose publisher, viewer or admin".into(),
        ));
    }
    if req.role == Role::Publisher && req.products.is_empty() {
        return Err(Error::BadRequest(
            "a publisher token needs `products`: the products it may publish to".into(),
        ));
    }
    let days = req.expires_in_days.unwrap_or(365);
    if !(1..=3650).contains(&days) {
        return Err(Error::BadRequest(
            "expires_in_days must be between 1 and 3650".into(),
        ));
    }
    let mut tx = state.db.begin().await?;
    for p in &req.products {
        crate::api::products::load(&mut *tx, p).await?;
    }
    let id = Uuid::new_v4();
    let (token, expires_at) = state.jwt.issue(
        &id.to_string(),
        "token",
        req.role,
        req.products.clone(),
        days * 86_400,
    );
    sqlx::query!(
        "INSERT INTO api_tokens (id, name, role, products, created_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        id,
        req.name,
        req.role.as_str(),
        &req.products,
        who.actor(),
        expires_at
    )
    .execute(&mut *tx)
    .await?;
    let after =
        serde_json::json!({"id": id, "name": req.name, "role": req.role, "products": req.products});
    crate::api::audit::record(
        &mut *tx,
        &who,
        "token.create",
        &format!("token:{id}"),
        None,
        Some(after),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id,
            token,
            expires_at,
        }),
    ))
}

/// Every API token (without secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = Vec<TokenInfo>), Problems<401, 403>))]
async fn list_tokens(State(state): State<AppState>, _a: Admin) -> Result<Json<Vec<TokenInfo>>> {
    let rows = sqlx::query_as!(
        TokenInfo,
        "SELECT id, name, role, products, created_by, created_at, expires_at, revoked_at
         FROM api_tokens ORDER BY created_at DESC"
    )
    .fetch_all(&state.db)
    .await?;
    Ok(Json(rows))
}

/// Revokes an API token: it stops working at once.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Token id")),
    responses((status = 204), Problems<400, 401, 403, 404>))]
async fn revoke_token(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(id): Path<Uuid>,
) -> Result<StatusCode> {
    let mut tx = state.db.begin().await?;
    let updated = sqlx::query!("UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING name", id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::not_found(format!("token {id}")))?;
    crate::api::audit::record(
        &mut *tx,
        &who,
        "token.revoke",
        &format!("token:{id}"),
        Some(serde_json::json!({"name": updated.name})),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
