//! The JWTs every caller presents: people's (login), CI's (API tokens) and
//! devices', signed with one HS256 secret kept in the data folder, and the
//! roles they carry.

use crate::error::{Error, Result};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::path::Path;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

/// The audience every Sluice JWT carries.
const AUDIENCE: &str = "sluice";
/// The JOSE header of every token Sluice issues, `{"typ":"JWT","alg":"HS256"}`.
const HS256_HEADER: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9";
/// Seconds a token's `exp` and `nbf` may be off by (clocks drift).
const LEEWAY_S: i64 = 5;
/// The advisory lock under which the first server makes the token secret.
const SECRET_LOCK: i64 = 0x736c_7569_6365_4a31;

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
    /// Every request checks a token (the resolve path included).
    hmac: Hs256,
}

/// HMAC-SHA256 (RFC 2104) with the secret's padded blocks hashed once, so
/// checking a token hashes only the token (jsonwebtoken keys its HMAC anew
/// on every call).
#[derive(Clone)]
struct Hs256 {
    inner: Sha256,
    outer: Sha256,
}

impl Hs256 {
    fn new(secret: &[u8]) -> Self {
        let mut block = [0u8; 64];
        if secret.len() > block.len() {
            block[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            block[..secret.len()].copy_from_slice(secret);
        }
        let pad = |byte: u8| block.map(|b| b ^ byte);
        Hs256 {
            inner: Sha256::new_with_prefix(pad(0x36)),
            outer: Sha256::new_with_prefix(pad(0x5c)),
        }
    }

    fn mac(&self, message: &[u8]) -> [u8; 32] {
        let inner = self.inner.clone().chain_update(message).finalize();
        self.outer.clone().chain_update(inner).finalize().into()
    }
}

/// The one header field a check reads.
#[derive(Deserialize)]
struct JoseHeader<'a> {
    #[serde(borrow)]
    alg: std::borrow::Cow<'a, str>,
}

impl JwtKeys {
    /// The token secret every server on `db` shares, made by the first
    /// server to start (or imported from `<data_dir>/jwt.key`, which a
    /// server from before the database held it wrote, so tokens issued then
    /// stay valid) and unsealed with `passphrase`.
    pub async fn open(db: &PgPool, data_dir: &Path, passphrase: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut tx = db.begin().await?;
        // Two servers starting on an empty database make one secret.
        sqlx::query!("SELECT pg_advisory_xact_lock($1)", SECRET_LOCK)
            .execute(&mut *tx)
            .await?;
        let stored = sqlx::query_scalar!("SELECT sealed FROM server_secrets WHERE name = 'jwt'")
            .fetch_optional(&mut *tx)
            .await?;
        let pass = passphrase.to_owned();
        let secret = if let Some(sealed) = stored {
            tx.commit().await?;
            tokio::task::spawn_blocking(move || sealed::open(&sealed, &pass))
                .await?
                .context("unsealing the session-token secret (table server_secrets)")?
        } else {
            let path = data_dir.join("jwt.key");
            let (secret, from) = match std::fs::read(&path) {
                Ok(s) if s.len() >= 32 => (s, Some(path.display().to_string())),
                Ok(_) => anyhow::bail!(
                    "{} is shorter than 32 bytes; delete it to make a new secret",
                    path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (rand::random::<[u8; 32]>().to_vec(), None)
                }
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let plain = secret.clone();
            let sealed = tokio::task::spawn_blocking(move || sealed::seal(&plain, &pass)).await??;
            sqlx::query!(
                "INSERT INTO server_secrets (name, sealed, imported_from) VALUES ('jwt', $1, $2)",
                sealed,
                from
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            if let Some(from) = from {
                tracing::info!(from, "imported the session-token secret into the database");
            }
            secret
        };
        Ok(Self::from_secret(&secret))
    }

    /// The token secret `db` holds, unsealed: for tools and tests that must
    /// make a token as a server would (a forged one).
    pub async fn stored_secret(db: &PgPool, passphrase: &str) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context;
        let sealed = sqlx::query_scalar!("SELECT sealed FROM server_secrets WHERE name = 'jwt'")
            .fetch_optional(db)
            .await?
            .context("no session-token secret in table server_secrets")?;
        sealed::open(&sealed, passphrase)
    }

    /// Keys from a raw secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            hmac: Hs256::new(secret),
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
        self.verify_at(token, OffsetDateTime::now_utc().unix_timestamp())
    }

    /// [`verify`](Self::verify) at `now` (seconds since the epoch). The same
    /// checks, in the same order, as `jsonwebtoken::decode` with HS256 only,
    /// audience `sluice`, `exp`, `nbf`, `aud` and `sub` required and 5 s of
    /// leeway (a test compares the two), without its second parse of the
    /// claims and its per-call HMAC key.
    fn verify_at(&self, token: &str, now: i64) -> Result<Claims> {
        let refuse = |why: &str| Error::Unauthorized(why.into());
        let invalid = || refuse("the token is invalid");
        let (message, signature) = token.rsplit_once('.').ok_or_else(invalid)?;
        let (header, payload) = message.rsplit_once('.').ok_or_else(invalid)?;
        // The header Sluice issues is taken as it is; any other is read.
        let alg = if header == HS256_HEADER {
            "HS256".into()
        } else {
            let header = URL_SAFE_NO_PAD.decode(header).map_err(|_| invalid())?;
            let header: JoseHeader = serde_json::from_slice(&header).map_err(|_| invalid())?;
            header.alg.into_owned()
        };
        match alg.as_str() {
            "HS256" => {}
            // Algorithms JOSE names: a token made for another kind of key.
            "HS384" | "HS512" | "ES256" | "ES384" | "RS256" | "RS384" | "RS512" | "PS256"
            | "PS384" | "PS512" | "EdDSA" => {
                return Err(refuse("the token's algorithm is not accepted"));
            }
            _ => return Err(invalid()),
        }
        let mut mac = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(signature, &mut mac) {
            Ok(32) if bool::from(mac.ct_eq(&self.hmac.mac(message.as_bytes()))) => {}
            _ => return Err(invalid()),
        }
        // Decoded on the stack: a token's claims are a few hundred bytes.
        let mut buf = [0u8; 1024];
        let claims: Claims = match URL_SAFE_NO_PAD.decode_slice(payload, &mut buf) {
            Ok(n) => serde_json::from_slice(&buf[..n]),
            Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).map_err(|_| invalid())?)
            }
            Err(_) => return Err(invalid()),
        }
        .map_err(|_| invalid())?;
        if claims.exp < now - LEEWAY_S {
            return Err(refuse(
                "the token has expired; log in again or create a new token",
            ));
        }
        if claims.nbf > now + LEEWAY_S {
            return Err(refuse("the token is not valid yet"));
        }
        if claims.aud != AUDIENCE {
            return Err(refuse("the token is not for Sluice"));
        }
        Ok(claims)
    }
}

/// A secret sealed with the passphrase: `v1$<salt>$<nonce>$<ciphertext>`
/// (URL-safe base64), the key Argon2id's (its default cost) of the
/// passphrase and salt, the cipher AES-256-GCM (so a wrong passphrase or an
/// altered row is refused, never read as another secret).
mod sealed {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    fn key(passphrase: &str, salt: &[u8]) -> anyhow::Result<LessSafeKey> {
        let mut k = [0u8; 32];
        argon2::Argon2::default()
            .hash_password_into(passphrase.as_bytes(), salt, &mut k)
            .map_err(|e| anyhow::anyhow!("deriving the sealing key: {e}"))?;
        let unbound = UnboundKey::new(&AES_256_GCM, &k)
            .map_err(|_| anyhow::anyhow!("making the sealing key"))?;
        Ok(LessSafeKey::new(unbound))
    }

    pub(super) fn seal(secret: &[u8], passphrase: &str) -> anyhow::Result<String> {
        let salt: [u8; 16] = rand::random();
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut data = secret.to_vec();
        key(passphrase, &salt)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(b"sluice jwt"),
                &mut data,
            )
            .map_err(|_| anyhow::anyhow!("sealing the secret"))?;
        Ok(format!(
            "v1${}${}${}",
            B64.encode(salt),
            B64.encode(nonce),
            B64.encode(data)
        ))
    }

    pub(super) fn open(sealed: &str, passphrase: &str) -> anyhow::Result<Vec<u8>> {
        let malformed = || anyhow::anyhow!("the sealed secret is malformed");
        let mut parts = sealed.split('$');
        let (Some("v1"), Some(salt), Some(nonce), Some(data), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        let salt = B64.decode(salt).map_err(|_| malformed())?;
        let nonce: [u8; NONCE_LEN] = B64
            .decode(nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(malformed)?;
        let mut data = B64.decode(data).map_err(|_| malformed())?;
        let plain = key(passphrase, &salt)?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(b"sluice jwt"),
                &mut data,
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "cannot unseal it: is SLUICE_KEY_PASSPHRASE the one it was made with?"
                )
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// The check this one replaced.
    fn reference(token: &str) -> std::result::Result<Claims, String> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[AUDIENCE]);
        v.validate_nbf = true;
        v.leeway = LEEWAY_S as u64;
        v.set_required_spec_claims(&["exp", "nbf", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(SECRET), &v)
            .map(|d| d.claims)
            .map_err(|e| format!("{:?}", e.kind()))
    }

    fn sign(header: &serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
        let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let message = format!("{}.{}", part(header), part(claims));
        let mac = Hs256::new(secret).mac(message.as_bytes());
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(mac))
    }

    fn claims(now: i64) -> serde_json::Value {
        serde_json::json!({"sub": "d", "role": "device", "kind": "device", "products": ["p"],
            "aud": "sluice", "iat": now, "nbf": now - 1, "exp": now + 60, "key_id": "k"})
    }

    /// The HMAC is RFC 4231's (test cases 1 and 6: a short key and one
    /// longer than a block).
    #[test]
    fn the_hmac_is_rfc_4231s() {
        let hex = |m: [u8; 32]| hex::encode(m);
        assert_eq!(
            hex(Hs256::new(&[0x0b; 20]).mac(b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex(Hs256::new(&[0xaa; 131])
                .mac(b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    /// Tokens jsonwebtoken issues pass both checks alike, and every way a
    /// token can be wrong is refused by both, each with the same message.
    #[test]
    fn it_agrees_with_jsonwebtoken() {
        let keys = JwtKeys::from_secret(SECRET);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let hs256 = serde_json::json!({"typ": "JWT", "alg": "HS256"});
        let issued = keys.issue("alice", "user", Role::Admin, vec![], 60).0;
        assert!(issued.starts_with(&format!("{HS256_HEADER}.")), "{issued}");
        let many = (0..200).map(|i| format!("product-{i}")).collect();
        let long = keys.issue("ci", "token", Role::Publisher, many, 60).0;
        let good = sign(&hs256, &claims(now), SECRET);
        let with = |k: &str, v: serde_json::Value| {
            let mut c = claims(now);
            c[k] = v;
            sign(&hs256, &c, SECRET)
        };
        let without = |k: &str| {
            let mut c = claims(now);
            c.as_object_mut().unwrap().remove(k);
            sign(&hs256, &c, SECRET)
        };
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let cases: Vec<(&str, String, Option<&str>)> = vec![
            ("issued by issue()", issued, None),
            ("claims longer than the stack buffer", long, None),
            (
                "the same header, spelled otherwise",
                sign(
                    &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
                    &claims(now),
                    SECRET,
                ),
                None,
            ),
            ("good", good.clone(), None),
            (
                "other secret",
                sign(&hs256, &claims(now), b"another secret, 32 bytes long!!!"),
                Some("the token is invalid"),
            ),
            (
                "signature flipped",
                String::from_utf8(flipped).unwrap(),
                Some("the token is invalid"),
            ),
            (
                "signature cut",
                good[..good.len() - 2].to_string(),
                Some("the token is invalid"),
            ),
            (
                "no signature",
                good[..good.rfind('.').unwrap()].to_string(),
                Some("the token is invalid"),
            ),
            (
                "alg none",
                sign(&serde_json::json!({"alg": "none"}), &claims(now), SECRET),
                Some("the token is invalid"),
            ),
            (
                "alg HS512",
                sign(&serde_json::json!({"alg": "HS512"}), &claims(now), SECRET),
                Some("the token's algorithm is not accepted"),
            ),
            (
                "expired",
                with("exp", (now - 6).into()),
                Some("the token has expired; log in again or create a new token"),
            ),
            ("expired within leeway", with("exp", (now - 4).into()), None),
            (
                "not yet valid",
                with("nbf", (now + 6).into()),
                Some("the token is not valid yet"),
            ),
            ("nbf within leeway", with("nbf", (now + 4).into()), None),
            (
                "other audience",
                with("aud", "other".into()),
                Some("the token is not for Sluice"),
            ),
            (
                "audience list",
                with("aud", serde_json::json!(["sluice"])),
                Some("the token is invalid"),
            ),
            ("no exp", without("exp"), Some("the token is invalid")),
            ("no nbf", without("nbf"), Some("the token is invalid")),
            ("no aud", without("aud"), Some("the token is invalid")),
            ("no sub", without("sub"), Some("the token is invalid")),
            (
                "exp a string",
                with("exp", "soon".into()),
                Some("the token is invalid"),
            ),
            ("not base64", "a.b@.c".into(), Some("the token is invalid")),
            ("empty", String::new(), Some("the token is invalid")),
            (
                "four parts",
                format!("{good}.x"),
                Some("the token is invalid"),
            ),
        ];
        for (name, token, refused) in cases {
            let ours = keys.verify_at(&token, now);
            let theirs = reference(&token);
            assert_eq!(
                ours.is_ok(),
                theirs.is_ok(),
                "{name}: ours {ours:?}, jsonwebtoken {theirs:?}"
            );
            match (refused, ours) {
                (None, Ok(c)) => assert_eq!(c.sub, theirs.unwrap().sub, "{name}"),
                (Some(msg), Err(Error::Unauthorized(m))) => assert_eq!(m, msg, "{name}"),
                (want, got) => panic!("{name}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    /// A sealed secret opens with its passphrase only, and any change to
    /// the row is refused rather than read as another secret.
    #[test]
    fn a_sealed_secret_opens_with_its_passphrase_only() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let s = sealed::seal(secret, "right").unwrap();
        assert_eq!(sealed::open(&s, "right").unwrap(), secret);
        assert_ne!(
            sealed::seal(secret, "right").unwrap(),
            s,
            "a fresh salt and nonce each time"
        );
        let err = sealed::open(&s, "wrong").unwrap_err().to_string();
        assert!(err.contains("SLUICE_KEY_PASSPHRASE"), "{err}");
        let mut parts: Vec<String> = s.split('$').map(str::to_string).collect();
        let data = parts[3].clone().into_bytes();
        for i in [0, data.len() / 2, data.len() - 1] {
            let mut d = data.clone();
            d[i] = if d[i] == b'A' { b'B' } else { b'A' };
            parts[3] = String::from_utf8(d).unwrap();
            assert!(
                sealed::open(&parts.join("$"), "right").is_err(),
                "byte {i} altered"
            );
        }
        for bad in ["", "v1$a$b", "v2$a$b$c", &format!("{s}$x")] {
            let err = sealed::open(bad, "right").unwrap_err().to_string();
            assert!(err.contains("malformed"), "{bad}: {err}");
        }
    }
}
