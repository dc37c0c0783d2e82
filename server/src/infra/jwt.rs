//! The JWTs every caller presents: people's (login), CI's (API tokens) and
//! devices', signed with one HS256 secret kept in the data folder, and the
//! roles they carry.

use crate::error::{Error, Result};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

/// The audience every Sluice JWT carries.
const AUDIENCE: &str = "sluice";

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Changes anything.
    Admin,
    /// Reads everything, changes nothing.
    Viewer,
    /// Publishes and promotes releases of its products (CI).
    Publisher,
    /// One enrolled device.
    Device,
}

impl Role {
    /// The role's name in the database and in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Publisher => "publisher",
            Role::Device => "device",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            "publisher" => Some(Role::Publisher),
            "device" => Some(Role::Device),
            _ => None,
        }
    }
}

/// The claims of every Sluice JWT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User name, API token id or device id.
    pub sub: String,
    /// What the holder may do.
    pub role: Role,
    /// `user`, `token` or `device`.
    pub kind: String,
    /// Products a publisher token is scoped to, or a device's product.
    #[serde(default)]
    pub products: Vec<String>,
    /// Always `sluice`.
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expires at.
    pub exp: i64,
    /// A device token's key: the id of the device key it was issued to.
    /// Device tokens without it were issued before device keys (ten-year
    /// tokens) and are checked against the device's row on every use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// The secret that signs and checks JWTs (HS256), kept in the data folder.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Built once: every request checks a token (the resolve path included).
    validation: Validation,
}

impl JwtKeys {
    /// Loads `jwt.key` from the data folder, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let path = data_dir.join("jwt.key");
        let secret = match std::fs::read(&path) {
            Ok(s) if s.len() >= 32 => s,
            Ok(_) => anyhow::bail!(
                "{} is shorter than 32 bytes; delete it to make a new one",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                crate::infra::keystore::write_private(&path, &secret)
                    .with_context(|| format!("writing {}", path.display()))?;
                secret.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self::from_secret(&secret))
    }

    /// Keys from a raw secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "sub"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Signs claims for `sub` valid for `ttl_s` seconds.
    pub fn issue(
        &self,
        sub: &str,
        kind: &str,
        role: Role,
        products: Vec<String>,
        ttl_s: i64,
    ) -> (String, OffsetDateTime) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            sub: sub.to_string(),
            role,
            kind: kind.to_string(),
            products,
            aud: AUDIENCE.into(),
            iat: now,
            nbf: now - 1,
            exp: now + ttl_s,
            key_id: None,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding cannot fail");
        (
            token,
            OffsetDateTime::from_unix_timestamp(now + ttl_s).expect("valid timestamp"),
        )
    }

    /// A device's token for its key `key_id`, valid for `ttl_s` seconds. It
    /// is dated no earlier than `not_before` (the device's last reset, in
    /// seconds since the epoch), so the reset never refuses it.
    pub fn issue_device(
        &self,
        device_id: Uuid,
        product: &str,
        key_id: &str,
        not_before: Option<i64>,
        ttl_s: i64,
    ) -> (String, OffsetDateTime) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let iat = now.max(not_before.unwrap_or(now));
        let claims = Claims {
            sub: device_id.to_string(),
            role: Role::Device,
            kind: "device".into(),
            products: vec![product.to_string()],
            aud: AUDIENCE.into(),
            iat,
            nbf: now - 1,
            exp: now + ttl_s,
            key_id: Some(key_id.to_string()),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding cannot fail");
        (
            token,
            OffsetDateTime::from_unix_timestamp(now + ttl_s).expect("valid timestamp"),
        )
    }

    /// Checks signature, algorithm, audience, expiry and not-before.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind::*;
                Error::Unauthorized(match e.kind() {
                    ExpiredSignature => {
                        "the token has expired; log in again or create a new token".into()
                    }
                    ImmatureSignature => "the token is not valid yet".into(),
                    InvalidAudience => "the token is not for Sluice".into(),
                    InvalidAlgorithm => "the token's algorithm is not accepted".into(),
                    _ => "the token is invalid".into(),
                })
            })
    }
}
