//! The server's signing keys and the signed key lists that tell devices which
//! of them to trust. Private keys live in table `signing_keys` as cosign's
//! encrypted PEM, sealed with `SLUICE_KEY_PASSPHRASE` (the database alone
//! holds no usable key), so every server on one database signs with the same
//! keys (roles `image`, `response`, `root`); which key of a role is next,
//! current or retired is said by the newest key list (table `key_lists`),
//! each signed by the root keys of the one before. Rotation is two-phase:
//! `rotate` publishes a `next` key, `activate` signs with it once the fleet
//! holds it; `revoke` drops a key from the list. Every change of the list
//! runs under one PostgreSQL advisory lock and is told to the other servers
//! (`infra/notify.rs`), which reload.
//!
//! Before the keys moved to the database they were files under
//! `<data_dir>/keys/<role>/<key_id>.key`. A server whose data folder still
//! has such files imports them at start (once: a key already in the table
//! is not read again), so upgrading an install is starting one server with
//! its old data folder before the others; the files stay as they are (a
//! backup), and `sluice keys generate` still writes one for the next start
//! to import. [`KeyStore::load_or_create`] reads such a folder alone, for
//! tools and tests without a database.

use crate::error::{Error, Result};
use crate::infra::notify::{self, Publisher};
use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sigstore::crypto::SigningScheme;
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sluice_protocol::keylist::{EnvelopeSignature, pae};
use sluice_protocol::keys::{ALG_ECDSA_P256, ALG_ED25519};
use sluice_protocol::{
    KeyList, KeyRole, KeySet, KeyState, ListedKey, PublicKey, ResponseSigner, SignedKeyList, key_id,
};
use sqlx::PgPool;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, RwLock};
use time::OffsetDateTime;

/// How long a key list is valid; the server issues a fresh one (same keys,
/// next version) once less than half of this is left. It bounds how long
/// someone holding a revoked key can keep a device from learning of the
/// revocation (by withholding the lists); it costs a list version every
/// two weeks, which a device catching up fetches a hundred at a time.
pub const LIST_TTL: time::Duration = time::Duration::days(30);

/// Devices seen within this many days make up the fleet that must hold a
/// key before it is activated.
pub const ACTIVE_DAYS: i64 = 30;

/// Most lists one `GET /v1/keys/lists` answers; a device further behind asks again.
pub const LISTS_PAGE: i64 = 100;

/// One private key with its public half.
pub struct KeyEntry {
    /// The key pair as sigstore holds it.
    pub pair: SigStoreKeyPair,
    /// How `GET /v1/keys` lists it.
    pub public: PublicKey,
}

impl KeyEntry {
    /// A raw signature over `message`: Ed25519, or ECDSA P-256 ASN.1 DER.
    fn sign(&self, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(self
            .pair
            .to_sigstore_signer(&scheme(self.public.role))?
            .sign(message)?)
    }
}

/// The advisory lock (`pg_advisory_xact_lock`) every change of the key list
/// takes, so servers on one database make the first keys once, renew once
/// and never race two rotations.
const KEYS_LOCK: i64 = 0x736c_7569_6365_4b31;

/// The keys in use and every key still trusted.
pub struct KeyStore {
    /// `<data_dir>/keys`: key files from before the database held them
    /// (imported at start); a revoked key's file moves to `revoked/`.
    dir: PathBuf,
    passphrase: String,
    inner: RwLock<Keys>,
    /// One change or reload of the keys at a time in this process (the
    /// advisory lock orders the servers).
    change: tokio::sync::Mutex<()>,
    /// Tells the other servers when this one changed the keys.
    notify: Publisher,
}

pub(crate) struct Keys {
    /// Every private key not revoked.
    entries: Vec<Arc<KeyEntry>>,
    /// The newest key list (always, once read from the database).
    list: Option<(KeyList, SignedKeyList)>,
    image_current: Arc<KeyEntry>,
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

pub(crate) fn role_dir(dir: &FsPath, role: KeyRole) -> PathBuf {
    dir.join(role.to_string())
}

pub(crate) fn scheme(role: KeyRole) -> SigningScheme {
    match role {
        KeyRole::Image => SigningScheme::ECDSA_P256_SHA256_ASN1,
        KeyRole::Response | KeyRole::Root => SigningScheme::ED25519,
    }
}

pub(crate) fn algorithm(role: KeyRole) -> &'static str {
    match role {
        KeyRole::Image => ALG_ECDSA_P256,
        KeyRole::Response | KeyRole::Root => ALG_ED25519,
    }
}

pub(crate) fn public_of(pair: &SigStoreKeyPair, role: KeyRole) -> anyhow::Result<PublicKey> {
    let der = pair.public_key_to_der()?;
    Ok(PublicKey {
        key_id: key_id(&der),
        role,
        algorithm: algorithm(role).into(),
        public_key_pem: pair.public_key_to_pem()?,
    })
}

/// Parses `image`, `response` or `root`.
pub fn parse_role(role: &str) -> std::result::Result<KeyRole, String> {
    match role {
        "image" => Ok(KeyRole::Image),
        "response" => Ok(KeyRole::Response),
        "root" => Ok(KeyRole::Root),
        _ => Err(format!(
            "unknown key role {role:?}: use `image`, `response` or `root`"
        )),
    }
}

/// Makes a new key of `role` and writes it encrypted into `dir` (a data
/// folder's `keys/`), for the next server start with that folder to
/// import. Before the first key list it also becomes the role's current key
/// (`<role>/current`); once lists exist it is listed as `next`.
pub fn generate(dir: &FsPath, passphrase: &str, role: KeyRole) -> anyhow::Result<PublicKey> {
    let public = write_new_key(dir, passphrase, role)?;
    write_private(
        &role_dir(dir, role).join("current"),
        public.key_id.as_bytes(),
    )?;
    Ok(public)
}

/// A new key of `role`, and its private half encrypted with `passphrase`
/// (scrypt: slow on purpose, so call it off the async threads).
fn new_key(passphrase: &str, role: KeyRole) -> anyhow::Result<(KeyEntry, String)> {
    let pair = scheme(role).create_signer()?.to_sigstore_keypair()?;
    let public = public_of(&pair, role)?;
    let pem = pair.private_key_to_encrypted_pem(passphrase.as_bytes())?;
    Ok((KeyEntry { pair, public }, pem.to_string()))
}

/// Decrypts one key; `what` names it in the error (a file, a table row).
fn decrypt(pem: &[u8], passphrase: &str, role: KeyRole, what: &str) -> anyhow::Result<KeyEntry> {
    let pair = SigStoreKeyPair::from_encrypted_pem(pem, passphrase.as_bytes()).map_err(|e| {
        anyhow::anyhow!(
            "cannot decrypt {what}: {e}; is SLUICE_KEY_PASSPHRASE the one it was made with?"
        )
    })?;
    let public = public_of(&pair, role)?;
    Ok(KeyEntry { pair, public })
}

pub(crate) fn write_new_key(
    dir: &FsPath,
    passphrase: &str,
    role: KeyRole,
) -> anyhow::Result<PublicKey> {
    let rdir = role_dir(dir, role);
    std::fs::create_dir_all(&rdir).with_context(|| format!("creating {}", rdir.display()))?;
    let (entry, pem) = new_key(passphrase, role)?;
    write_private(
        &rdir.join(format!("{}.key", entry.public.key_id)),
        pem.as_bytes(),
    )?;
    Ok(entry.public)
}

/// The key files of `role` in the folder, sorted.
fn key_files(rdir: &FsPath) -> anyhow::Result<Vec<PathBuf>> {
    let mut names: Vec<_> = std::fs::read_dir(rdir)
        .with_context(|| format!("reading {}", rdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    names.sort();
    Ok(names)
}

/// Every key of `role` in the folder, and the id its `current` file names;
/// makes one if there is none.
pub(crate) fn load_role(
    dir: &FsPath,
    passphrase: &str,
    role: KeyRole,
) -> anyhow::Result<(Vec<Arc<KeyEntry>>, String)> {
    let rdir = role_dir(dir, role);
    if !rdir.join("current").exists() {
        generate(dir, passphrase, role)?;
    }
    let current = std::fs::read_to_string(rdir.join("current"))?
        .trim()
        .to_string();
    let mut entries = Vec::new();
    for path in key_files(&rdir)? {
        let pem = std::fs::read(&path)?;
        let what = path.display().to_string();
        entries.push(Arc::new(decrypt(&pem, passphrase, role, &what)?));
    }
    anyhow::ensure!(
        entries.iter().any(|e| e.public.key_id == current),
        "{} names key {current}, which is not in that folder",
        rdir.join("current").display()
    );
    Ok((entries, current))
}

pub(crate) fn response_signer(entry: &KeyEntry) -> anyhow::Result<ResponseSigner> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let der = entry.pair.private_key_to_der()?;
    let sk = ed25519_dalek::SigningKey::from_pkcs8_der(&der)
        .map_err(|e| anyhow::anyhow!("response key: {e}"))?;
    Ok(ResponseSigner::from_seed(&sk.to_bytes()))
}

/// The Ed25519 signer in an encrypted key file (a response or root key):
/// for tools and tests that must sign as a key did, e.g. a revoked one.
pub fn read_ed25519_signer(path: &FsPath, passphrase: &str) -> anyhow::Result<ResponseSigner> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let entry = decrypt(
        &pem,
        passphrase,
        KeyRole::Response,
        &path.display().to_string(),
    )?;
    response_signer(&entry)
}

/// The Ed25519 signer of a response or root key the database holds, revoked
/// or not: for tools and tests that must sign as a key did (a stolen one).
pub async fn stored_ed25519_signer(
    db: &PgPool,
    key_id: &str,
    passphrase: &str,
) -> anyhow::Result<ResponseSigner> {
    let pem = sqlx::query_scalar!(
        "SELECT encrypted_pem FROM signing_keys WHERE key_id = $1",
        key_id
    )
    .fetch_optional(db)
    .await?
    .with_context(|| format!("no key {key_id} in table signing_keys"))?;
    let entry = decrypt(
        pem.as_bytes(),
        passphrase,
        KeyRole::Response,
        &format!("key {key_id}"),
    )?;
    response_signer(&entry)
}

pub(crate) fn listed(public: &PublicKey, state: KeyState) -> ListedKey {
    ListedKey {
        key_id: public.key_id.clone(),
        role: public.role,
        algorithm: public.algorithm.clone(),
        public_key_pem: public.public_key_pem.clone(),
        state,
    }
}

/// The first key list: every key file, the ones the `current` files name
/// as current and the others retired.
pub(crate) fn first_list(files: &[(PublicKey, bool)], now: OffsetDateTime) -> KeyList {
    KeyList {
        version: 1,
        issued_at: now,
        expires_at: now + LIST_TTL,
        threshold: 1,
        keys: files
            .iter()
            .map(|(k, current)| {
                listed(
                    k,
                    if *current {
                        KeyState::Current
                    } else {
                        KeyState::Retired
                    },
                )
            })
            .collect(),
    }
}

/// What the newest list must become at start: image and response key files
/// no list ever named join as `next` (made by `sluice keys generate` while
/// the server was down, or left by a crash in a rotation), and a list past
/// half its life is renewed. A key some list named and the newest does not
/// was revoked: it never comes back. `None`: the list stands as it is.
pub fn list_at_start(
    newest: &KeyList,
    ever_listed: &std::collections::HashSet<String>,
    files: &[PublicKey],
    now: OffsetDateTime,
) -> Option<KeyList> {
    let mut keys = newest.keys.clone();
    for f in files {
        let has_next = keys
            .iter()
            .any(|k| k.role == f.role && k.state == KeyState::Next);
        if f.role != KeyRole::Root && !ever_listed.contains(&f.key_id) && !has_next {
            keys.push(listed(f, KeyState::Next));
        }
    }
    let renew = newest.expires_at - now < LIST_TTL / 2;
    (keys != newest.keys || renew).then(|| successor(newest, keys, now))
}

/// The list after `prev` with these keys.
pub(crate) fn successor(prev: &KeyList, keys: Vec<ListedKey>, now: OffsetDateTime) -> KeyList {
    KeyList {
        version: prev.version + 1,
        issued_at: now,
        expires_at: now + LIST_TTL,
        threshold: prev.threshold,
        keys,
    }
}

/// A change an admin asks for.
#[derive(Debug, Clone)]
pub enum Change {
    /// Image or response: publish a new `next` key. Root: a new current
    /// root key at once (the old one signs this list, then no more).
    Rotate(KeyRole),
    /// The `next` key of the role becomes current, the current one retired.
    Activate(KeyRole),
    /// The key leaves the list: devices stop trusting it.
    Revoke(KeyRole, String),
}

/// The list after `change`, and the key it is about. `new_key` is the key
/// a rotation made. Refusals are 409s that say what to do instead.
pub fn apply_change(
    prev: &KeyList,
    change: &Change,
    new_key: Option<&PublicKey>,
    now: OffsetDateTime,
) -> Result<(KeyList, ListedKey)> {
    let mut keys = prev.keys.clone();
    let about = match change {
        Change::Rotate(role) => {
            if let Some(next) = keys
                .iter()
                .find(|k| k.role == *role && k.state == KeyState::Next)
            {
                return Err(Error::Conflict(format!(
                    "{role} key {} is already next: activate it (`sluice keys activate --role {role}`) or revoke it first",
                    next.key_id
                )));
            }
            let new = new_key.context("a rotation needs its new key")?;
            if *role == KeyRole::Root {
                for k in keys.iter_mut().filter(|k| k.role == KeyRole::Root) {
                    k.state = KeyState::Retired;
                }
                keys.push(listed(new, KeyState::Current));
            } else {
                keys.push(listed(new, KeyState::Next));
            }
            listed(new, keys.last().map_or(KeyState::Next, |k| k.state))
        }
        Change::Activate(role) => {
            let Some(i) = keys
                .iter()
                .position(|k| k.role == *role && k.state == KeyState::Next)
            else {
                return Err(Error::Conflict(format!(
                    "no {role} key is next: rotate first (`sluice keys rotate --role {role}`)"
                )));
            };
            for k in keys
                .iter_mut()
                .filter(|k| k.role == *role && k.state == KeyState::Current)
            {
                k.state = KeyState::Retired;
            }
            keys[i].state = KeyState::Current;
            keys[i].clone()
        }
        Change::Revoke(role, id) => {
            let Some(i) = keys.iter().position(|k| k.role == *role && k.key_id == *id) else {
                return Err(Error::not_found(format!("{role} key {id} in the key list")));
            };
            if keys[i].state == KeyState::Current {
                return Err(Error::Conflict(format!(
                    "{role} key {id} is current: rotate and activate another {role} key first \
                     (`sluice keys rotate --role {role}`, then `sluice keys activate --role {role} --force` \
                     if the fleet cannot wait), then revoke it"
                )));
            }
            keys.remove(i)
        }
    };
    let list = successor(prev, keys, now);
    list.check_rules()
        .map_err(|e| Error::Conflict(e.to_string()))?;
    Ok((list, about))
}

/// Signs `list`: by the current roots of `prev` and its own (the chain), and
/// by every image and response key it lists whose file is here (so a device
/// that holds only a `GET /v1/keys` file can take it as its first list).
/// Checked as a device would before it is stored.
pub(crate) fn sign_list(
    list: &KeyList,
    prev: Option<&KeyList>,
    entries: &[Arc<KeyEntry>],
) -> anyhow::Result<SignedKeyList> {
    let payload = serde_json::to_vec(list)?;
    let message = pae(sluice_protocol::keylist::PAYLOAD_TYPE, &payload);
    let signs = |e: &KeyEntry| {
        let id = &e.public.key_id;
        match e.public.role {
            KeyRole::Root => {
                list.roots().any(|k| &k.key_id == id)
                    || prev.is_some_and(|p| p.roots().any(|k| &k.key_id == id))
            }
            _ => list.find(id).is_some(),
        }
    };
    let mut signatures = Vec::new();
    for e in entries.iter().filter(|e| signs(e)) {
        signatures.push(EnvelopeSignature {
            keyid: e.public.key_id.clone(),
            sig: B64.encode(e.sign(&message)?),
        });
    }
    let signed = SignedKeyList::new(&payload, signatures);
    match prev {
        Some(p) => signed.verify_next(p),
        None => signed.verify_self(),
    }
    .with_context(|| format!("signing key list version {}", list.version))?;
    Ok(signed)
}

impl Keys {
    /// The keys in force: `list`'s current keys, or (a folder without a
    /// list) the keys `file_current` names.
    fn new(
        entries: Vec<Arc<KeyEntry>>,
        list: Option<(KeyList, SignedKeyList)>,
        file_current: impl Fn(KeyRole) -> Option<String>,
    ) -> anyhow::Result<Keys> {
        let current = |role: KeyRole| -> anyhow::Result<Arc<KeyEntry>> {
            let id = match &list {
                Some((l, _)) => l
                    .current(role)
                    .map(|k| k.key_id.clone())
                    .with_context(|| format!("the key list names no current {role} key"))?,
                None => file_current(role)
                    .with_context(|| format!("no current {role} key in the folder"))?,
            };
            entries
                .iter()
                .find(|e| e.public.key_id == id && e.public.role == role)
                .cloned()
                .with_context(|| {
                    format!(
                        "the current {role} key {id} has no private key in the database: start a \
                         server whose data folder still has keys/{role}/{id}.key (it is imported), \
                         or restore table signing_keys from a backup"
                    )
                })
        };
        let image_current = current(KeyRole::Image)?;
        let response = response_signer(current(KeyRole::Response)?.as_ref())?;
        let trusted = match &list {
            Some((l, _)) => l.key_set(),
            None => KeySet {
                keys: entries
                    .iter()
                    .filter(|e| e.public.role != KeyRole::Root)
                    .map(|e| e.public.clone())
                    .collect(),
            },
        };
        Ok(Keys {
            entries,
            list,
            image_current,
            response,
            trusted,
        })
    }
}

/// A key row of table `signing_keys`.
struct StoredKey {
    key_id: String,
    role: String,
    encrypted_pem: String,
}

/// The keys not revoked, oldest first.
async fn stored_keys<'e>(db: impl sqlx::PgExecutor<'e>) -> anyhow::Result<Vec<StoredKey>> {
    Ok(sqlx::query_as!(
        StoredKey,
        "SELECT key_id, role, encrypted_pem FROM signing_keys WHERE revoked_at IS NULL ORDER BY created_at, key_id"
    )
    .fetch_all(db)
    .await?)
}

/// The stored keys as signers: the ones in `known` are not decrypted again
/// (scrypt is slow on purpose), the others on a blocking thread.
async fn decrypt_all(
    rows: Vec<StoredKey>,
    passphrase: &str,
    known: &[Arc<KeyEntry>],
) -> anyhow::Result<Vec<Arc<KeyEntry>>> {
    let known = known.to_vec();
    let passphrase = passphrase.to_string();
    tokio::task::spawn_blocking(move || {
        rows.into_iter()
            .map(|r| {
                if let Some(k) = known.iter().find(|k| k.public.key_id == r.key_id) {
                    return Ok(k.clone());
                }
                let role = parse_role(&r.role).map_err(anyhow::Error::msg)?;
                let what = format!("{role} key {} stored in the database", r.key_id);
                let entry = decrypt(r.encrypted_pem.as_bytes(), &passphrase, role, &what)?;
                anyhow::ensure!(
                    entry.public.key_id == r.key_id,
                    "{what} decrypts to key {}: the row was altered",
                    entry.public.key_id
                );
                Ok(Arc::new(entry))
            })
            .collect()
    })
    .await?
}

/// Imports the key files of an old data folder the table does not hold yet;
/// answers the key ids the `current` files name, by role.
async fn import_files(
    tx: &mut sqlx::PgConnection,
    dir: &FsPath,
    passphrase: &str,
) -> anyhow::Result<Vec<(KeyRole, String)>> {
    let mut current = Vec::new();
    for role in [KeyRole::Image, KeyRole::Response, KeyRole::Root] {
        let rdir = role_dir(dir, role);
        if !rdir.is_dir() {
            continue;
        }
        if let Ok(id) = std::fs::read_to_string(rdir.join("current")) {
            current.push((role, id.trim().to_string()));
        }
        for path in key_files(&rdir)? {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let held = sqlx::query_scalar!(
                r#"SELECT EXISTS (SELECT 1 FROM signing_keys WHERE key_id = $1) AS "held!""#,
                stem
            )
            .fetch_one(&mut *tx)
            .await?;
            if held {
                continue;
            }
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let (p, what, pass) = (
                pem.clone(),
                path.display().to_string(),
                passphrase.to_string(),
            );
            let entry =
                tokio::task::spawn_blocking(move || decrypt(p.as_bytes(), &pass, role, &what))
                    .await??;
            sqlx::query!(
                "INSERT INTO signing_keys (key_id, role, encrypted_pem, imported_from) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (key_id) DO NOTHING",
                entry.public.key_id,
                role.to_string(),
                pem,
                path.display().to_string()
            )
            .execute(&mut *tx)
            .await?;
            tracing::info!(key_id = entry.public.key_id, %role, file = %path.display(), "imported a key file into the database");
        }
    }
    Ok(current)
}

/// Stores a new key's encrypted private half.
async fn insert_key(
    tx: &mut sqlx::PgConnection,
    entry: &KeyEntry,
    encrypted_pem: &str,
) -> anyhow::Result<()> {
    sqlx::query!(
        "INSERT INTO signing_keys (key_id, role, encrypted_pem) VALUES ($1, $2, $3)",
        entry.public.key_id,
        entry.public.role.to_string(),
        encrypted_pem
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The key list and keys as [`settle`] left them.
struct Settled {
    list: KeyList,
    signed: SignedKeyList,
    entries: Vec<Arc<KeyEntry>>,
    /// Whether this call stored a new list.
    stored: bool,
}

/// Under the keys' advisory lock (waiting for it, or giving up at once when
/// `wait` is false: `None`): imports an old folder's key files, makes the
/// first keys and list on an empty database, lists unlisted keys as `next`
/// and renews a list past half its life.
async fn settle(
    db: &PgPool,
    dir: &FsPath,
    passphrase: &str,
    known: &[Arc<KeyEntry>],
    wait: bool,
) -> anyhow::Result<Option<Settled>> {
    let mut tx = db.begin().await?;
    if wait {
        sqlx::query!("SELECT pg_advisory_xact_lock($1)", KEYS_LOCK)
            .execute(&mut *tx)
            .await?;
    } else {
        let got = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock($1) AS "got!""#,
            KEYS_LOCK
        )
        .fetch_one(&mut *tx)
        .await?;
        if !got {
            return Ok(None);
        }
    }
    let file_current = import_files(&mut tx, dir, passphrase).await?;
    let newest = newest_list(&mut *tx).await?;
    if newest.is_none() {
        // The first start on this database: one key of each role. Never
        // once a list exists: a key the list needs is restored, not remade.
        let held = stored_keys(&mut *tx).await?;
        for role in [KeyRole::Image, KeyRole::Response, KeyRole::Root] {
            if held.iter().all(|k| k.role != role.to_string()) {
                let pass = passphrase.to_string();
                let (entry, pem) =
                    tokio::task::spawn_blocking(move || new_key(&pass, role)).await??;
                insert_key(&mut tx, &entry, &pem).await?;
            }
        }
    }
    let mut entries = decrypt_all(stored_keys(&mut *tx).await?, passphrase, known).await?;
    let now = OffsetDateTime::now_utc();
    let (list, signed, stored) = match newest {
        None => {
            // The first list: an imported folder's `current` files say
            // which keys sign, else the oldest key of each role.
            let current: Vec<String> = [KeyRole::Image, KeyRole::Response, KeyRole::Root]
                .into_iter()
                .filter_map(|role| {
                    file_current
                        .iter()
                        .find(|(r, id)| {
                            *r == role && entries.iter().any(|e| &e.public.key_id == id)
                        })
                        .map(|(_, id)| id.clone())
                        .or_else(|| {
                            entries
                                .iter()
                                .find(|e| e.public.role == role)
                                .map(|e| e.public.key_id.clone())
                        })
                })
                .collect();
            let files: Vec<(PublicKey, bool)> = entries
                .iter()
                .map(|e| (e.public.clone(), current.contains(&e.public.key_id)))
                .collect();
            let list = first_list(&files, now);
            let signed = sign_list(&list, None, &entries)?;
            store_list(&mut tx, &list, &signed, "system", "keys.list.create").await?;
            (list, signed, true)
        }
        Some(signed) => {
            let (_, newest) = signed.open()?;
            let ever_listed = ever_listed(&mut *tx).await?;
            // A key some list named and the newest does not was revoked
            // (its file imported again, say): it never signs again.
            let gone: Vec<String> = entries
                .iter()
                .map(|e| e.public.key_id.clone())
                .filter(|id| ever_listed.contains(id) && newest.find(id).is_none())
                .collect();
            if !gone.is_empty() {
                sqlx::query!(
                    "UPDATE signing_keys SET revoked_at = now() WHERE key_id = ANY($1) AND revoked_at IS NULL",
                    &gone
                )
                .execute(&mut *tx)
                .await?;
                entries.retain(|e| !gone.contains(&e.public.key_id));
            }
            let publics: Vec<PublicKey> = entries.iter().map(|e| e.public.clone()).collect();
            match list_at_start(&newest, &ever_listed, &publics, now) {
                None => (newest, signed, false),
                Some(list) => {
                    let signed = sign_list(&list, Some(&newest), &entries)?;
                    store_list(&mut tx, &list, &signed, "system", "keys.list.renew").await?;
                    (list, signed, true)
                }
            }
        }
    };
    tx.commit().await?;
    Ok(Some(Settled {
        list,
        signed,
        entries,
        stored,
    }))
}

impl KeyStore {
    /// Reads the keys of a data folder alone (`<data_dir>/keys`), making any
    /// that are missing; no database, no key list: the `current` files say
    /// which keys sign. For tools and tests; a server uses [`KeyStore::open`].
    pub fn load_or_create(data_dir: &FsPath, passphrase: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !passphrase.is_empty(),
            "SLUICE_KEY_PASSPHRASE is empty: set it to encrypt the keys at rest"
        );
        let dir = data_dir.join("keys");
        let mut entries = Vec::new();
        let mut current = Vec::new();
        for role in [KeyRole::Image, KeyRole::Response, KeyRole::Root] {
            let (e, id) = load_role(&dir, passphrase, role)?;
            entries.extend(e);
            current.push((role, id));
        }
        let keys = Keys::new(entries, None, |role| {
            current
                .iter()
                .find(|(r, _)| *r == role)
                .map(|(_, id)| id.clone())
        })?;
        Ok(KeyStore {
            dir,
            passphrase: passphrase.to_string(),
            inner: RwLock::new(keys),
            change: tokio::sync::Mutex::new(()),
            notify: Publisher::none(),
        })
    }

    /// The keys from the database: imports the key files of `data_dir`'s
    /// old `keys/` folder, makes the first keys and key list on an empty
    /// database (once, whichever of several servers starts first), lists
    /// unlisted keys as `next` and renews a list past half its life.
    pub async fn open(
        db: &PgPool,
        data_dir: &FsPath,
        passphrase: &str,
        notify: Publisher,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !passphrase.is_empty(),
            "SLUICE_KEY_PASSPHRASE is empty: set it to encrypt the keys at rest"
        );
        let dir = data_dir.join("keys");
        let s = settle(db, &dir, passphrase, &[], true)
            .await?
            .context("the keys' lock was not taken")?;
        if s.stored {
            notify.publish(notify::Change::Keys);
        }
        let keys = Keys::new(s.entries, Some((s.list, s.signed)), |_| None)?;
        Ok(KeyStore {
            dir,
            passphrase: passphrase.to_string(),
            inner: RwLock::new(keys),
            change: tokio::sync::Mutex::new(()),
            notify,
        })
    }

    /// The image key new signatures are made with.
    pub fn image_key(&self) -> Arc<KeyEntry> {
        self.inner.read().expect("key lock").image_current.clone()
    }

    /// The signer of resolution responses.
    pub fn response_signer(&self) -> ResponseSigner {
        self.inner.read().expect("key lock").response.clone()
    }

    /// Every trusted image and response key (`GET /v1/keys`).
    pub fn public_keys(&self) -> KeySet {
        self.inner.read().expect("key lock").trusted.clone()
    }

    /// The newest key list's version, once synced.
    pub fn list_version(&self) -> Option<u64> {
        self.inner
            .read()
            .expect("key lock")
            .list
            .as_ref()
            .map(|(l, _)| l.version)
    }

    /// The newest key list, once synced.
    pub fn newest_list(&self) -> Option<(KeyList, SignedKeyList)> {
        self.inner.read().expect("key lock").list.clone()
    }

    fn entries(&self) -> Vec<Arc<KeyEntry>> {
        self.inner.read().expect("key lock").entries.clone()
    }

    /// Puts a list and its keys in force, unless a newer list already is
    /// (two reloads may finish out of order).
    fn install(
        &self,
        list: KeyList,
        signed: SignedKeyList,
        entries: Vec<Arc<KeyEntry>>,
    ) -> anyhow::Result<()> {
        let version = list.version;
        let keys = Keys::new(entries, Some((list, signed)), |_| None)?;
        let mut inner = self.inner.write().expect("key lock");
        if inner
            .list
            .as_ref()
            .is_none_or(|(l, _)| l.version <= version)
        {
            *inner = keys;
        }
        Ok(())
    }

    /// Reads the newest key list and the keys again if another server
    /// changed them: on its notification, and periodically as a safety net.
    pub async fn reload(&self, db: &PgPool) -> anyhow::Result<()> {
        // One reload at a time: a rotation's new key is decrypted once.
        let _one = self.change.lock().await;
        let Some(signed) = newest_list(db).await? else {
            return Ok(());
        };
        let (_, list) = signed.open()?;
        if self.list_version() >= Some(list.version) {
            return Ok(());
        }
        // Read after the list: a rotation stores its key and its list at
        // once, so every key this list needs is here.
        let entries =
            decrypt_all(stored_keys(db).await?, &self.passphrase, &self.entries()).await?;
        tracing::info!(
            version = list.version,
            "key list changed by another server: reloaded"
        );
        self.install(list, signed, entries)
    }

    /// Lists unlisted keys as `next` and renews a list past half its life,
    /// if no other server is at it right now (`pg_try_advisory_xact_lock`):
    /// one renewal for the whole fleet of servers. Answers whether this one
    /// did the work. Runs every hour.
    pub async fn renew(&self, db: &PgPool) -> anyhow::Result<bool> {
        let _one = self.change.lock().await;
        let Some(s) = settle(db, &self.dir, &self.passphrase, &self.entries(), false).await? else {
            return Ok(false);
        };
        self.install(s.list, s.signed, s.entries)?;
        if s.stored {
            self.notify.publish(notify::Change::Keys);
        }
        Ok(true)
    }

    /// Makes a change to the key list; answers the key it is about and the
    /// new list's version. `fleet_ok` is asked before an activation: whether
    /// enough devices hold the key.
    pub async fn change(
        &self,
        db: &PgPool,
        actor: &str,
        change: Change,
        fleet_ok: impl AsyncFnOnce(&KeyList, &ListedKey) -> Result<()>,
    ) -> Result<(ListedKey, u64)> {
        let _one = self.change.lock().await;
        let mut tx = db.begin().await?;
        // Every server changes the list one at a time, from the newest.
        sqlx::query!("SELECT pg_advisory_xact_lock($1)", KEYS_LOCK)
            .execute(&mut *tx)
            .await?;
        let newest = newest_list(&mut *tx).await?.ok_or_else(|| {
            Error::Unavailable("the key list is not made yet: retry in a moment".into())
        })?;
        let (_, prev) = newest.open().map_err(anyhow::Error::from)?;
        if let Change::Activate(role) = &change
            && let Some(next) = prev
                .keys
                .iter()
                .find(|k| k.role == *role && k.state == KeyState::Next)
        {
            fleet_ok(&prev, next).await?;
        }
        // Another server may have rotated since this one loaded its keys.
        let mut entries = decrypt_all(
            stored_keys(&mut *tx).await?,
            &self.passphrase,
            &self.entries(),
        )
        .await?;
        let new_key = match &change {
            Change::Rotate(role)
                if prev
                    .keys
                    .iter()
                    .all(|k| k.role != *role || k.state != KeyState::Next) =>
            {
                let (pass, role) = (self.passphrase.clone(), *role);
                Some(
                    tokio::task::spawn_blocking(move || new_key(&pass, role))
                        .await
                        .map_err(|e| Error::Internal(e.into()))??,
                )
            }
            _ => None,
        };
        let now = OffsetDateTime::now_utc();
        let (list, about) = apply_change(
            &prev,
            &change,
            new_key.as_ref().map(|(k, _)| &k.public),
            now,
        )?;
        if let Some((entry, pem)) = new_key {
            // The key and the list that names it commit together.
            insert_key(&mut tx, &entry, &pem).await?;
            entries.push(Arc::new(entry));
        }
        if let Change::Revoke(_, id) = &change {
            // Never loaded again, by any server; the row stays for forensics.
            sqlx::query!(
                "UPDATE signing_keys SET revoked_at = now() WHERE key_id = $1",
                id
            )
            .execute(&mut *tx)
            .await?;
            entries.retain(|e| &e.public.key_id != id);
        }
        let signed = sign_list(&list, Some(&prev), &entries)?;
        let action = match &change {
            Change::Rotate(_) => "keys.rotate",
            Change::Activate(_) => "keys.activate",
            Change::Revoke(..) => "keys.revoke",
        };
        insert_list(&mut *tx, &list, &signed, actor).await?;
        crate::infra::audit::record_as(
            &mut *tx,
            actor,
            action,
            &format!("key:{}", about.key_id),
            Some(serde_json::json!({"list_version": prev.version})),
            Some(serde_json::json!({"list_version": list.version, "key": &about})),
        )
        .await?;
        tx.commit().await?;
        if let Change::Revoke(role, id) = &change {
            self.retire_file(*role, id);
        }
        let version = list.version;
        self.install(list, signed, entries)?;
        self.notify.publish(notify::Change::Keys);
        Ok((about, version))
    }

    /// Moves a revoked key's file, if this server's folder still has one
    /// from before the database held the keys, to `revoked/` (kept for
    /// forensics; the import never reads that folder).
    fn retire_file(&self, role: KeyRole, id: &str) {
        let from = role_dir(&self.dir, role).join(format!("{id}.key"));
        if !from.exists() {
            return;
        }
        let to_dir = role_dir(&self.dir, role).join("revoked");
        let moved = std::fs::create_dir_all(&to_dir)
            .and_then(|()| std::fs::rename(&from, to_dir.join(format!("{id}.key"))))
            .and_then(|()| std::fs::File::open(&to_dir)?.sync_all())
            .and_then(|()| std::fs::File::open(role_dir(&self.dir, role))?.sync_all());
        if let Err(e) = moved {
            // The database says revoked: the file is never imported again.
            tracing::warn!(error = %e, file = %from.display(), "moving a revoked key's file aside failed");
        }
    }
}

/// Every key id any list has named.
pub(crate) async fn ever_listed<'e>(
    db: impl sqlx::PgExecutor<'e>,
) -> anyhow::Result<std::collections::HashSet<String>> {
    let rows = sqlx::query_scalar!(
        r#"SELECT envelope AS "envelope: sqlx::types::Json<SignedKeyList>" FROM key_lists ORDER BY version DESC"#
    )
    .fetch_all(db)
    .await?;
    let mut ids = std::collections::HashSet::new();
    for signed in rows {
        let (_, l) = signed.0.open()?;
        ids.extend(l.keys.into_iter().map(|k| k.key_id));
    }
    Ok(ids)
}

pub(crate) async fn newest_list<'e>(
    db: impl sqlx::PgExecutor<'e>,
) -> anyhow::Result<Option<SignedKeyList>> {
    let row = sqlx::query_scalar!(
        r#"SELECT envelope AS "envelope: sqlx::types::Json<SignedKeyList>" FROM key_lists ORDER BY version DESC LIMIT 1"#
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|j| j.0))
}

pub(crate) async fn insert_list<'e>(
    db: impl sqlx::PgExecutor<'e>,
    list: &KeyList,
    signed: &SignedKeyList,
    actor: &str,
) -> Result<()> {
    let r = sqlx::query!(
        "INSERT INTO key_lists (version, envelope, created_by) VALUES ($1, $2, $3)",
        list.version as i64,
        sqlx::types::Json(signed) as _,
        actor
    )
    .execute(db)
    .await;
    match r {
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("key_lists_pkey") => {
            Err(Error::Conflict(format!(
                "key list version {} was made meanwhile (by another server?): retry",
                list.version
            )))
        }
        r => r.map(|_| ()).map_err(Error::from),
    }
}

/// Stores a list the system made, with its audit entry, in the caller's transaction.
pub(crate) async fn store_list(
    tx: &mut sqlx::PgConnection,
    list: &KeyList,
    signed: &SignedKeyList,
    actor: &str,
    action: &str,
) -> anyhow::Result<()> {
    insert_list(&mut *tx, list, signed, actor)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::infra::audit::record_as(
        &mut *tx,
        actor,
        action,
        &format!("key-list:{}", list.version),
        None,
        Some(serde_json::json!({"list_version": list.version})),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// How many of the fleet's active devices hold each list version or newer.
pub(crate) struct Holding {
    /// (held version, devices), for the devices seen in the last [`ACTIVE_DAYS`].
    by_version: Vec<(Option<i64>, i64)>,
}

impl Holding {
    pub(crate) async fn load(db: &PgPool) -> Result<Holding> {
        let rows = sqlx::query!(
            r#"SELECT keys_version, count(*) AS "n!" FROM devices
               WHERE last_seen > now() - make_interval(days => $1::int) GROUP BY keys_version"#,
            ACTIVE_DAYS as i32
        )
        .fetch_all(db)
        .await?;
        Ok(Holding {
            by_version: rows.into_iter().map(|r| (r.keys_version, r.n)).collect(),
        })
    }

    pub(crate) fn active(&self) -> i64 {
        self.by_version.iter().map(|(_, n)| n).sum()
    }

    /// Devices holding version `since` or newer.
    pub(crate) fn holding(&self, since: u64) -> i64 {
        self.by_version
            .iter()
            .filter(|(v, _)| v.is_some_and(|v| v >= since as i64))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The first version of the unbroken run of lists up to the newest that lists `key_id`.
pub(crate) async fn listed_since(db: &PgPool, key_id: &str, newest: u64) -> Result<u64> {
    let rows = sqlx::query_scalar!(
        r#"SELECT envelope AS "envelope: sqlx::types::Json<SignedKeyList>" FROM key_lists ORDER BY version DESC"#
    )
    .fetch_all(db)
    .await?;
    let mut since = newest;
    for signed in rows {
        let (_, l) = signed.0.open().map_err(anyhow::Error::from)?;
        if l.find(key_id).is_none() {
            break;
        }
        since = l.version;
    }
    Ok(since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn key(id: &str, role: KeyRole, state: KeyState) -> ListedKey {
        ListedKey {
            key_id: id.into(),
            role,
            algorithm: algorithm(role).into(),
            public_key_pem: format!("pem of {id}"),
            state,
        }
    }

    fn base() -> KeyList {
        KeyList {
            version: 4,
            issued_at: datetime!(2026-01-01 00:00 UTC),
            expires_at: datetime!(2027-01-01 00:00 UTC),
            threshold: 1,
            keys: vec![
                key("root1", KeyRole::Root, KeyState::Current),
                key("img1", KeyRole::Image, KeyState::Current),
                key("resp1", KeyRole::Response, KeyState::Current),
            ],
        }
    }

    const NOW: OffsetDateTime = datetime!(2026-02-01 00:00 UTC);

    fn public(id: &str, role: KeyRole) -> PublicKey {
        key(id, role, KeyState::Next).public()
    }

    #[test]
    fn rotate_then_activate_then_revoke() {
        let l = base();
        let new = public("resp2", KeyRole::Response);
        let (l5, k) =
            apply_change(&l, &Change::Rotate(KeyRole::Response), Some(&new), NOW).unwrap();
        assert_eq!((l5.version, k.state), (5, KeyState::Next));
        assert_eq!(l5.current(KeyRole::Response).unwrap().key_id, "resp1");
        // A second rotation waits for the first.
        let other = public("resp3", KeyRole::Response);
        assert!(matches!(
            apply_change(&l5, &Change::Rotate(KeyRole::Response), Some(&other), NOW),
            Err(Error::Conflict(_))
        ));
        let (l6, k) = apply_change(&l5, &Change::Activate(KeyRole::Response), None, NOW).unwrap();
        assert_eq!((k.key_id.as_str(), k.state), ("resp2", KeyState::Current));
        assert_eq!(l6.find("resp1").unwrap().state, KeyState::Retired);
        assert!(matches!(
            apply_change(&l6, &Change::Activate(KeyRole::Response), None, NOW),
            Err(Error::Conflict(_))
        ));
        // The current key cannot be revoked; the retired one can.
        assert!(matches!(
            apply_change(
                &l6,
                &Change::Revoke(KeyRole::Response, "resp2".into()),
                None,
                NOW
            ),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            apply_change(
                &l6,
                &Change::Revoke(KeyRole::Image, "resp1".into()),
                None,
                NOW
            ),
            Err(Error::NotFound(_))
        ));
        let (l7, k) = apply_change(
            &l6,
            &Change::Revoke(KeyRole::Response, "resp1".into()),
            None,
            NOW,
        )
        .unwrap();
        assert_eq!(k.key_id, "resp1");
        assert!(l7.find("resp1").is_none());
        assert_eq!(l7.version, 7);
        assert_eq!(l7.expires_at, NOW + LIST_TTL);
    }

    #[test]
    fn a_root_rotation_is_immediate() {
        let new = public("root2", KeyRole::Root);
        let (l, k) =
            apply_change(&base(), &Change::Rotate(KeyRole::Root), Some(&new), NOW).unwrap();
        assert_eq!(k.state, KeyState::Current);
        let roots: Vec<_> = l.roots().map(|k| k.key_id.as_str()).collect();
        assert_eq!(roots, ["root2"]);
        assert_eq!(l.find("root1").unwrap().state, KeyState::Retired);
    }

    #[test]
    fn at_start_new_files_join_as_next_and_old_lists_are_renewed() {
        let l = base();
        let files = vec![
            public("root1", KeyRole::Root),
            public("img1", KeyRole::Image),
            public("resp1", KeyRole::Response),
        ];
        let ever: std::collections::HashSet<String> =
            ["root1", "img1", "resp1", "resp0"].map(String::from).into();
        assert_eq!(list_at_start(&l, &ever, &files, NOW), None);
        let mut more = files.clone();
        more.push(public("img2", KeyRole::Image));
        more.push(public("root9", KeyRole::Root));
        more.push(public("resp0", KeyRole::Response));
        let l2 = list_at_start(&l, &ever, &more, NOW).unwrap();
        assert!(l2.find("resp0").is_none(), "a revoked key never comes back");
        assert_eq!(l2.find("img2").unwrap().state, KeyState::Next);
        assert!(l2.find("root9").is_none(), "a root joins only by rotation");
        let late = datetime!(2026-12-20 00:00 UTC);
        let renewed = list_at_start(&l, &ever, &files, late).unwrap();
        assert_eq!((renewed.version, renewed.keys.clone()), (5, l.keys.clone()));
        assert_eq!(renewed.expires_at, late + LIST_TTL);
    }
}
