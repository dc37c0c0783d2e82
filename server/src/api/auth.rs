//! Who is calling: people (login), CI (API tokens) and devices, by the JWTs
//! of `infra::jwt`, and the extractors (`Admin`, `Viewer`, `Publisher`,
//! `DeviceAuth`) whose presence in a handler's signature says who may call it.

use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Result};
use crate::infra::jwt::Role;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::response::{AppendHeaders, IntoResponse};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

/// The cookie the dashboard keeps its token in.
pub const COOKIE_NAME: &str = "sluice_token";
/// How long a login lasts.
const LOGIN_TTL_S: i64 = 12 * 3600;
/// Longest user name accepted at login: longer ones are no user's, and are
/// not kept as rate-limit keys.
pub const MAX_USERNAME: usize = 128;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A person who logged in.
    User {
        /// User name.
        name: String,
        /// Admin or viewer.
        role: Role,
    },
    /// An API token.
    Token {
        /// The token's id.
        id: Uuid,
        /// The token's role.
        role: Role,
        /// Products it may touch (publisher tokens).
        products: Vec<String>,
    },
    /// An enrolled device.
    Device {
        /// The device id.
        id: Uuid,
        /// Its product's name.
        product: String,
    },
}

impl Principal {
    /// The role the caller holds.
    pub fn role(&self) -> Role {
        match self {
            Principal::User { role, .. } | Principal::Token { role, .. } => *role,
            Principal::Device { .. } => Role::Device,
        }
    }

    /// How the audit log and channel history name the caller.
    pub fn actor(&self) -> String {
        match self {
            Principal::User { name, .. } => format!("user:{name}"),
            Principal::Token { id, .. } => format!("token:{id}"),
            Principal::Device { id, .. } => format!("device:{id}"),
        }
    }

    /// Refuses a publisher token that is not scoped to `product`; admins pass.
    pub fn check_product(&self, product: &str) -> Result<()> {
        match self {
            Principal::Token {
                role: Role::Publisher,
                products,
                ..
            } => {
                if products.iter().any(|p| p == product) {
                    Ok(())
                } else {
                    Err(Error::Forbidden(format!(
                        "this token is not allowed to publish to product {product}"
                    )))
                }
            }
            p if p.role() == Role::Admin => Ok(()),
            _ => Err(Error::Forbidden(format!(
                "not allowed to change product {product}"
            ))),
        }
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    if let Some(h) = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(str::trim);
    }
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(COOKIE_NAME)
                .and_then(|r| r.strip_prefix('='))
        })
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let token = bearer(parts).ok_or_else(|| {
            Error::Unauthorized("missing credentials: send `Authorization: Bearer <token>`".into())
        })?;
        let claims = state.jwt.verify(token)?;
        let role = claims.role;
        match claims.kind.as_str() {
            "user" if matches!(role, Role::Admin | Role::Viewer) => Ok(Principal::User {
                name: claims.sub,
                role,
            }),
            "token" => {
                let id: Uuid = claims
                    .sub
                    .parse()
                    .map_err(|_| Error::Unauthorized("the token is invalid".into()))?;
                let row = sqlx::query!("SELECT revoked_at FROM api_tokens WHERE id = $1", id)
                    .fetch_optional(&state.db)
                    .await?;
                match row {
                    Some(r) if r.revoked_at.is_none() => Ok(Principal::Token {
                        id,
                        role,
                        products: claims.products,
                    }),
                    _ => Err(Error::Unauthorized("the token has been revoked".into())),
                }
            }
            "device" if role == Role::Device => {
                let id: Uuid = claims
                    .sub
                    .parse()
                    .map_err(|_| Error::Unauthorized("the token is invalid".into()))?;
                state.limits.device.check(&id)?;
                state.revocations.check(&id, claims.iat)?;
                if claims.key_id.is_none() {
                    check_keyless_token(state, id, claims.iat).await?;
                }
                let product = claims.products.into_iter().next().unwrap_or_default();
                Ok(Principal::Device { id, product })
            }
            _ => Err(Error::Unauthorized("the token is invalid".into())),
        }
    }
}

/// A device token from before device keys (ten years long, no `key_id`)
/// works only while its device has bound no key and is neither revoked nor
/// reset after it was issued: one row read per use, only for such tokens.
async fn check_keyless_token(state: &AppState, id: Uuid, iat: i64) -> Result<()> {
    let row = sqlx::query!(
        r#"SELECT public_key IS NULL AS "keyless!", revoked_at IS NOT NULL AS "revoked!",
                  extract(epoch FROM tokens_not_before)::float8 AS not_before
           FROM devices WHERE id = $1"#,
        id
    )
    .fetch_optional(&state.db)
    .await?;
    match row {
        None => Err(Error::Unauthorized(
            "this device has been deleted by an admin: enroll again".into(),
        )),
        Some(r) if r.revoked => Err(Error::Unauthorized(
            "this device has been revoked by an admin".into(),
        )),
        Some(r) if !r.keyless => Err(Error::Unauthorized(
            "this device has bound a key: its token from before is no longer accepted; renew the token with the device key"
                .into(),
        )),
        Some(r) if r.not_before.is_some_and(|nb| (iat as f64) < nb) => Err(Error::Unauthorized(
            "this token was issued before an admin reset the device: enroll again".into(),
        )),
        Some(_) => Ok(()),
    }
}

macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $allowed:pat, $msg:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(pub Principal);

        impl FromRequestParts<AppState> for $name {
            type Rejection = Error;

            async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
                let p = Principal::from_request_parts(parts, state).await?;
                if matches!(p.role(), $allowed) { Ok($name(p)) } else { Err(Error::Forbidden($msg.into())) }
            }
        }
    };
}

role_extractor!(
    /// An admin (person or token).
    Admin, Role::Admin, "this needs an admin"
);
role_extractor!(
    /// Anyone who may read the fleet: admins and viewers.
    Viewer, Role::Admin | Role::Viewer, "this needs a viewer or admin"
);
role_extractor!(
    /// Someone who may publish: a publisher token (check its product) or an admin.
    Publisher, Role::Admin | Role::Publisher, "this needs a publisher token or an admin"
);

/// Someone who may read one product's channels and releases (the
/// `{product}` in the path): admins and viewers, and publisher tokens scoped
/// to that product, so CI can check a rollout's health gate before raising
/// its percent.
#[derive(Debug, Clone)]
pub struct ProductReader(pub Principal);

impl FromRequestParts<AppState> for ProductReader {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let p = Principal::from_request_parts(parts, state).await?;
        match &p {
            _ if matches!(p.role(), Role::Admin | Role::Viewer) => Ok(ProductReader(p)),
            Principal::Token {
                role: Role::Publisher,
                products,
                ..
            } => {
                let params = axum::extract::RawPathParams::from_request_parts(parts, state)
                    .await
                    .map_err(|_| Error::Forbidden("this needs a viewer or admin".into()))?;
                let product = params
                    .iter()
                    .find_map(|(k, v)| (k == "product").then_some(v))
                    .ok_or_else(|| Error::Forbidden("this needs a viewer or admin".into()))?;
                if products.iter().any(|x| x == product) {
                    Ok(ProductReader(p))
                } else {
                    Err(Error::Forbidden(format!(
                        "this publisher token may read only its own products ({}), not product {product}",
                        products.join(", ")
                    )))
                }
            }
            _ => Err(Error::Forbidden(
                "this needs a viewer or admin, or a publisher token for this product".into(),
            )),
        }
    }
}

/// An enrolled device.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    /// The device id.
    pub id: Uuid,
    /// Its product's name.
    pub product: String,
}

impl FromRequestParts<AppState> for DeviceAuth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        match Principal::from_request_parts(parts, state).await? {
            Principal::Device { id, product } => Ok(DeviceAuth { id, product }),
            _ => Err(Error::Forbidden("this needs a device token".into())),
        }
    }
}

/// Argon2id hash of a password.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing with default parameters cannot fail")
        .to_string()
}

/// Whether `password` matches an Argon2 hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// `POST /v1/auth/login`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A login's token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// Bearer token (also set as an HttpOnly cookie).
    pub token: String,
    /// The user's role.
    pub role: Role,
    /// When the token stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
}

/// Logs in a person and answers a JWT, also set as an HttpOnly cookie.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), Problems<401, 429>))]
async fn login(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
    extensions: axum::http::Extensions,
    Json(req): Json<LoginRequest>,
) -> Result<impl IntoResponse> {
    let addr = client_ip(&state.config, &headers, &extensions);
    let limits = &state.limits;
    limits.login_addr.check(&addr)?;
    // Failures count per address and per (user, address): a wrong guess from
    // one place never locks the user out from another. The attempt takes a
    // token now and gives it back if the password is right.
    limits.login_fail_addr.check(&addr)?;
    if req.username.len() > MAX_USERNAME {
        return Err(Error::Unauthorized("wrong user name or password".into()));
    }
    let user_key = (req.username.clone(), addr);
    if let Err(e) = limits.login_fail_user.check(&user_key) {
        limits.login_fail_addr.refund(&addr);
        return Err(e);
    }
    let user = sqlx::query!(
        "SELECT username, password_hash, role FROM users WHERE username = $1",
        req.username
    )
    .fetch_optional(&state.db)
    .await?;
    // Hash even for an unknown user so timing does not tell which names exist.
    let (hash, role) = match user {
        Some(u) => (u.password_hash, Role::parse(&u.role)),
        None => (DUMMY_HASH.clone(), None),
    };
    // Argon2 takes tens of milliseconds of CPU: off the async workers, so a
    // burst of logins does not stall device check-ins on the same threads.
    let password = req.password.clone();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    let role = match (ok, role) {
        (true, Some(role)) => role,
        _ => return Err(Error::Unauthorized("wrong user name or password".into())),
    };
    limits.login_fail_addr.refund(&addr);
    limits.login_fail_user.refund(&user_key);
    let (token, expires_at) = state
        .jwt
        .issue(&req.username, "user", role, vec![], LOGIN_TTL_S);
    let cookie =
        format!("{COOKIE_NAME}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={LOGIN_TTL_S}");
    Ok((
        AppendHeaders([(SET_COOKIE, cookie)]),
        Json(LoginResponse {
            token,
            role,
            expires_at,
        }),
    ))
}

/// The client's address: the peer's, or for a peer among
/// `SLUICE_TRUSTED_PROXIES` the last address of `X-Forwarded-For` (the one
/// that proxy appended; those before it are the client's to make up). The
/// unspecified address when the server was not started with connection
/// info, as in router-level tests.
pub fn client_ip(
    config: &crate::config::Config,
    headers: &axum::http::HeaderMap,
    extensions: &axum::http::Extensions,
) -> std::net::IpAddr {
    let peer = extensions
        .get::<axum::extract::ConnectInfo<crate::infra::tls::ClientAddr>>()
        .map(|axum::extract::ConnectInfo(crate::infra::tls::ClientAddr(a))| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    if !config.trusted_proxies.iter().any(|b| b.contains(peer)) {
        return peer;
    }
    // Several headers count as one list, in order.
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer)
}

/// Clears the dashboard's cookie.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", responses((status = 204)))]
async fn logout() -> impl IntoResponse {
    let cookie = format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    (
        axum::http::StatusCode::NO_CONTENT,
        AppendHeaders([(SET_COOKIE, cookie)]),
    )
}

/// An Argon2id hash of a random password nobody knows.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_password(&random_secret(18)));

/// Makes user `admin` on first start with an empty user table; answers the
/// generated password when none was configured, so it can be printed once.
pub async fn bootstrap_admin(
    db: &sqlx::PgPool,
    configured: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let count = sqlx::query_scalar!("SELECT count(*) FROM users")
        .fetch_one(db)
        .await?
        .unwrap_or(0);
    if count > 0 {
        return Ok(None);
    }
    let (password, generated) = match configured {
        Some(p) if !p.is_empty() => (p.to_string(), false),
        _ => (random_secret(18), true),
    };
    sqlx::query!(
        "INSERT INTO users (id, username, password_hash, role) VALUES ($1, 'admin', $2, 'admin') ON CONFLICT DO NOTHING",
        Uuid::new_v4(),
        hash_password(&password)
    )
    .execute(db)
    .await?;
    Ok(generated.then_some(password))
}

/// A random URL-safe secret of `bytes` random bytes.
pub fn random_secret(bytes: usize) -> String {
    use base64::Engine;
    let buf: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// SHA-256 of a high-entropy secret (enrollment secrets): enough for random
/// secrets, and cheap on the enroll path.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).to_vec()
}

/// Compares two byte strings in constant time.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
