//! The server's signing keys: an ECDSA P-256 image key (cosign format) and an
//! Ed25519 response key, each kept as cosign-encrypted PEM files under
//! `<data_dir>/keys/<role>/<key_id>.key`, the current one named in
//! `<role>/current`. Older keys stay trusted, so rotation needs no downtime.

use crate::app::AppState;
use crate::auth::Admin;
use crate::error::{Error, Json, Path, Result};
use anyhow::Context;
use axum::extract::State;
use sigstore::crypto::SigningScheme;
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sluice_protocol::keys::{ALG_ECDSA_P256, ALG_ED25519};
use sluice_protocol::{KeyRole, KeySet, PublicKey, ResponseSigner, key_id};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, RwLock};
use utoipa_axum::{router::OpenApiRouter, routes};

/// One private key with its public half.
pub struct KeyEntry {
    /// The key pair as sigstore holds it.
    pub pair: SigStoreKeyPair,
    /// How `GET /v1/keys` lists it.
    pub public: PublicKey,
}

/// The keys in use and every key still trusted.
pub struct KeyStore {
    dir: PathBuf,
    passphrase: String,
    inner: RwLock<Keys>,
}

struct Keys {
    image: Vec<Arc<KeyEntry>>,
    image_current: usize,
    response: ResponseSigner,
    trusted: KeySet,
}

/// Writes a file readable by its owner only, atomically (write-new, fsync, rename).
pub fn write_private(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn role_dir(dir: &FsPath, role: KeyRole) -> PathBuf {
    dir.join(role.to_string())
}

fn scheme(role: KeyRole) -> SigningScheme {
    match role {
        KeyRole::Image => SigningScheme::ECDSA_P256_SHA256_ASN1,
        KeyRole::Response => SigningScheme::ED25519,
    }
}

fn public_of(pair: &SigStoreKeyPair, role: KeyRole) -> anyhow::Result<PublicKey> {
    let der = pair.public_key_to_der()?;
    Ok(PublicKey {
        key_id: key_id(&der),
        role,
        algorithm: match role {
            KeyRole::Image => ALG_ECDSA_P256,
            KeyRole::Response => ALG_ED25519,
        }
        .into(),
        public_key_pem: pair.public_key_to_pem()?,
    })
}

/// Makes a new key of `role`, writes it encrypted and makes it current.
pub fn generate(dir: &FsPath, passphrase: &str, role: KeyRole) -> anyhow::Result<PublicKey> {
    let rdir = role_dir(dir, role);
    std::fs::create_dir_all(&rdir).with_context(|| format!("creating {}", rdir.display()))?;
    let pair = scheme(role).create_signer()?.to_sigstore_keypair()?;
    let public = public_of(&pair, role)?;
    let pem = pair.private_key_to_encrypted_pem(passphrase.as_bytes())?;
    write_private(&rdir.join(format!("{}.key", public.key_id)), pem.as_bytes())?;
    write_private(&rdir.join("current"), public.key_id.as_bytes())?;
    Ok(public)
}

/// Every key of `role` in the folder, and the index of the current one.
fn load_role(
    dir: &FsPath,
    passphrase: &str,
    role: KeyRole,
) -> anyhow::Result<(Vec<Arc<KeyEntry>>, usize)> {
    let rdir = role_dir(dir, role);
    if !rdir.join("current").exists() {
        generate(dir, passphrase, role)?;
    }
    let current = std::fs::read_to_string(rdir.join("current"))?
        .trim()
        .to_string();
    let mut entries = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&rdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    names.sort();
    for path in names {
        let pem = std::fs::read(&path)?;
        let pair =
            SigStoreKeyPair::from_encrypted_pem(&pem, passphrase.as_bytes()).map_err(|e| {
                anyhow::anyhow!(
                    "cannot decrypt {}: {e}; is SLUICE_KEY_PASSPHRASE the one it was made with?",
                    path.display()
                )
            })?;
        let public = public_of(&pair, role)?;
        entries.push(Arc::new(KeyEntry { pair, public }));
    }
    let idx = entries
        .iter()
        .position(|e| e.public.key_id == current)
        .with_context(|| {
            format!(
                "{} names key {current}, which is not in that folder",
                rdir.join("current").display()
            )
        })?;
    Ok((entries, idx))
}

fn response_signer(entry: &KeyEntry) -> anyhow::Result<ResponseSigner> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let der = entry.pair.private_key_to_der()?;
    let sk = ed25519_dalek::SigningKey::from_pkcs8_der(&der)
        .map_err(|e| anyhow::anyhow!("response key: {e}"))?;
    Ok(ResponseSigner::from_seed(&sk.to_bytes()))
}

impl KeyStore {
    /// Loads the keys from `<data_dir>/keys`, making any that are missing.
    pub fn load_or_create(data_dir: &FsPath, passphrase: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !passphrase.is_empty(),
            "SLUICE_KEY_PASSPHRASE is empty: set it to encrypt the keys at rest"
        );
        let dir = data_dir.join("keys");
        let keys = Self::read(&dir, passphrase)?;
        Ok(KeyStore {
            dir,
            passphrase: passphrase.to_string(),
            inner: RwLock::new(keys),
        })
    }

    fn read(dir: &FsPath, passphrase: &str) -> anyhow::Result<Keys> {
        let (image, image_current) = load_role(dir, passphrase, KeyRole::Image)?;
        let (response, response_current) = load_role(dir, passphrase, KeyRole::Response)?;
        let signer = response_signer(&response[response_current])?;
        let trusted = KeySet {
            keys: image
                .iter()
                .chain(response.iter())
                .map(|e| e.public.clone())
                .collect(),
        };
        Ok(Keys {
            image,
            image_current,
            response: signer,
            trusted,
        })
    }

    /// The image key new signatures are made with.
    pub fn image_key(&self) -> Arc<KeyEntry> {
        let k = self.inner.read().expect("key lock");
        k.image[k.image_current].clone()
    }

    /// The signer of resolution responses.
    pub fn response_signer(&self) -> ResponseSigner {
        self.inner.read().expect("key lock").response.clone()
    }

    /// Every trusted public key.
    pub fn public_keys(&self) -> KeySet {
        self.inner.read().expect("key lock").trusted.clone()
    }

    /// Makes a new current key of `role`; older keys stay trusted.
    pub fn rotate(&self, role: KeyRole) -> anyhow::Result<PublicKey> {
        let public = generate(&self.dir, &self.passphrase, role)?;
        let keys = Self::read(&self.dir, &self.passphrase)?;
        *self.inner.write().expect("key lock") = keys;
        Ok(public)
    }
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_keys))
        .routes(routes!(rotate_key))
}

/// Public keys, for devices and verifiers (`cosign verify --key`).
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, description = "Every trusted public key", body = serde_json::Value)))]
async fn list_keys(State(state): State<AppState>) -> Json<KeySet> {
    Json(state.keys.public_keys())
}

/// Makes a new current key of `role` (`image` or `response`); the old one stays trusted.
#[utoipa::path(post, path = "/v1/keys/{role}/rotate", tag = "keys",
    params(("role" = String, Path, description = "`image` or `response`")),
    security(("bearer" = [])),
    responses((status = 200, body = serde_json::Value), (status = 400, body = crate::error::Problem),
               (status = 401, body = crate::error::Problem), (status = 403, body = crate::error::Problem)))]
async fn rotate_key(
    State(state): State<AppState>,
    Admin(who): Admin,
    Path(role): Path<String>,
) -> Result<Json<PublicKey>> {
    let role = match role.as_str() {
        "image" => KeyRole::Image,
        "response" => KeyRole::Response,
        _ => {
            return Err(Error::BadRequest(format!(
                "unknown key role {role:?}: use `image` or `response`"
            )));
        }
    };
    let ks = state.clone();
    let public = tokio::task::spawn_blocking(move || ks.keys.rotate(role))
        .await
        .map_err(|e| Error::Internal(e.into()))??;
    crate::audit::record(
        &state.db,
        &who,
        "keys.rotate",
        &format!("key:{}", public.key_id),
        None,
        Some(serde_json::to_value(&public).unwrap_or_default()),
    )
    .await?;
    Ok(Json(public))
}
