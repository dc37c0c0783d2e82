//! Products: one OS derivative each, with its OCI repository and the
//! enrollment secret devices present once.

use crate::api::auth::{Admin, Viewer, hash_secret, random_secret};
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Result, on_constraint};
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// `POST /v1/products`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// The OCI repository its images live in (`registry.example.com/acme/os`).
    pub repository: String,
    /// A line about it.
    #[serde(default)]
    pub description: Option<String>,
}

/// A product.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Product {
    /// Its name.
    pub name: String,
    /// Its OCI repository.
    pub repository: String,
    /// A line about it.
    pub description: Option<String>,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Shown only when the product is made or the secret rotated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_secret: Option<String>,
}

/// The row behind a product, for other modules.
pub struct ProductRow {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its OCI repository.
    pub repository: String,
}

/// `{product}` in a route, as crates.io's `CratePath`: the name, and
/// [`ProductPath::load`] for the row (404 when there is none). A bad path is
/// a problem+json 400 like every other rejection.
#[derive(Debug, Deserialize, IntoParams, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
#[into_params(parameter_in = Path)]
pub struct ProductPath {
    /// Product name
    pub product: String,
}

impl ProductPath {
    /// The product, or 404.
    pub async fn load<'e>(&self, db: impl sqlx::PgExecutor<'e>) -> Result<ProductRow> {
        load(db, &self.product).await
    }
}

/// Loads a product by name, or 404.
pub async fn load<'e>(db: impl sqlx::PgExecutor<'e>, name: &str) -> Result<ProductRow> {
    sqlx::query_as!(
        ProductRow,
        "SELECT id, name, repository FROM products WHERE name = $1",
        name
    )
    .fetch_optional(db)
    .await?
    .ok_or_else(|| Error::not_found(format!("product {name}")))
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_product, list_products))
        .routes(routes!(get_product))
        .routes(routes!(rotate_secret))
}

/// Makes a product; the answer holds its enrollment secret, shown this once.
#[utoipa::path(post, path = "/v1/products", tag = "products", request_body = NewProduct,
    security(("bearer" = [])),
    responses((status = 201, body = Product), Problems<400, 401, 403, 409>))]
async fn create_product(
    State(state): State<AppState>,
    Admin(who): Admin,
    Json(req): Json<NewProduct>,
) -> Result<(StatusCode, Json<Product>)> {
    if !crate::rules::names::valid_name(&req.name) {
        return Err(Error::BadRequest(format!(
            "invalid product name {:?}: use 1–63 lowercase letters, digits and dashes, starting with a letter or digit",
            req.name
        )));
    }
    if !crate::rules::names::valid_repository(&req.repository) {
        return Err(Error::BadRequest(format!(
            "invalid repository {:?}: give `host[:port]/path` without a tag, e.g. `registry.example.com/acme/os`",
            req.repository
        )));
    }
    let secret = random_secret(24);
    let mut tx = state.db.begin().await?;
    let created_at = sqlx::query_scalar!(
        "INSERT INTO products (id, name, repository, description, enrollment_secret_hash)
         VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
        Uuid::new_v4(),
        req.name,
        req.repository,
        req.description,
        hash_secret(&secret)
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(on_constraint(
        "products_name_key",
        format!("product {} already exists", req.name),
    ))?;
    let product = Product {
        name: req.name,
        repository: req.repository,
        description: req.description,
        created_at,
        enrollment_secret: None,
    };
    crate::api::audit::record(
        &mut *tx,
        &who,
        "product.create",
        &format!("product:{}", product.name),
        None,
        Some(serde_json::to_value(&product).unwrap_or_default()),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(Product {
            enrollment_secret: Some(secret),
            ..product
        }),
    ))
}

/// Every product.
#[utoipa::path(get, path = "/v1/products", tag = "products", security(("bearer" = [])),
    responses((status = 200, body = Vec<Product>), Problems<401, 403>))]
async fn list_products(State(state): State<AppState>, _v: Viewer) -> Result<Json<Vec<Product>>> {
    let rows = sqlx::query!(
        "SELECT name, repository, description, created_at FROM products ORDER BY name"
    )
    .fetch_all(&state.db)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| Product {
                name: r.name,
                repository: r.repository,
                description: r.description,
                created_at: r.created_at,
                enrollment_secret: None,
            })
            .collect(),
    ))
}

/// One product.
#[utoipa::path(get, path = "/v1/products/{product}", tag = "products", security(("bearer" = [])),
    params(ProductPath),
    responses((status = 200, body = Product), Problems<401, 403, 404>))]
async fn get_product(
    State(state): State<AppState>,
    _v: Viewer,
    ProductPath { product }: ProductPath,
) -> Result<Json<Product>> {
    let r = sqlx::query!(
        "SELECT name, repository, description, created_at FROM products WHERE name = $1",
        product
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| Error::not_found(format!("product {product}")))?;
    Ok(Json(Product {
        name: r.name,
        repository: r.repository,
        description: r.description,
        created_at: r.created_at,
        enrollment_secret: None,
    }))
}

/// Replaces the enrollment secret; enrolled devices keep their tokens.
#[utoipa::path(post, path = "/v1/products/{product}/enrollment-secret", tag = "products", security(("bearer" = [])),
    params(ProductPath),
    responses((status = 200, body = Product), Problems<401, 403, 404>))]
async fn rotate_secret(
    State(state): State<AppState>,
    Admin(who): Admin,
    ProductPath { product }: ProductPath,
) -> Result<Json<Product>> {
    let secret = random_secret(24);
    let mut tx = state.db.begin().await?;
    let r = sqlx::query!(
        "UPDATE products SET enrollment_secret_hash = $2 WHERE name = $1
         RETURNING name, repository, description, created_at",
        product,
        hash_secret(&secret)
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| Error::not_found(format!("product {product}")))?;
    crate::api::audit::record(
        &mut *tx,
        &who,
        "product.rotate_secret",
        &format!("product:{product}"),
        None,
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(Product {
        name: r.name,
        repository: r.repository,
        description: r.description,
        created_at: r.created_at,
        enrollment_secret: Some(secret),
    }))
}
