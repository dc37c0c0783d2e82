//! The server's signing keys and the signed key lists that tell devices which
//! of them to trust. Private keys are cosign-encrypted PEM files under
//! `<data_dir>/keys/<role>/<key_id>.key` (roles `image`, `response`, `root`);
//! which key of a role is next, current or retired is said by the newest key
//! list (table `key_lists`), each signed by the root keys of the one before.
//! Rotation is two-phase: `rotate` publishes a `next` key, `activate` signs
//! with it once the fleet holds it; `revoke` drops a key from the list.

use crate::error::{Error, Result};
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

/// The keys in use and every key still trusted.
pub struct KeyStore {
    dir: PathBuf,
    passphrase: String,
    inner: RwLock<Keys>,
    /// One change of the key list at a time in this process.
    change: tokio::sync::Mutex<()>,
}

pub(crate) struct Keys {
    /// Every key file of every role.
    entries: Vec<Arc<KeyEntry>>,
    /// The newest key list, once [`KeyStore::sync`] ran.
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

/// Makes a new key of `role` and writes it encrypted. Before the first key
/// list it also becomes the role's current key (`<role>/current`); once
/// lists exist the server lists it as `next` at its next start.
pub fn generate(dir: &FsPath, passphrase: &str, role: KeyRole) -> anyhow::Result<PublicKey> {
    let public = write_new_key(dir, passphrase, role)?;
    write_private(
        &role_dir(dir, role).join("current"),
        public.key_id.as_bytes(),
    )?;
    Ok(public)
}

pub(crate) fn write_new_key(
    dir: &FsPath,
    passphrase: &str,
    role: KeyRole,
) -> anyhow::Result<PublicKey> {
    let rdir = role_dir(dir, role);
    std::fs::create_dir_all(&rdir).with_context(|| format!("creating {}", rdir.display()))?;
    let pair = scheme(role).create_signer()?.to_sigstore_keypair()?;
    let public = public_of(&pair, role)?;
    let pem = pair.private_key_to_encrypted_pem(passphrase.as_bytes())?;
    write_private(&rdir.join(format!("{}.key", public.key_id)), pem.as_bytes())?;
    Ok(public)
}

/// Every key of `role` in the folder, and the id its `current` file names.
/// Keys in `known` are not decrypted again (scrypt is slow on purpose).
pub(crate) fn load_role(
    dir: &FsPath,
    passphrase: &str,
    role: KeyRole,
    known: &[Arc<KeyEntry>],
) -> anyhow::Result<(Vec<Arc<KeyEntry>>, String)> {
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
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if let Some(k) = known
            .iter()
            .find(|k| k.public.key_id == stem && k.public.role == role)
        {
            entries.push(k.clone());
            continue;
        }
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
    let pair = SigStoreKeyPair::from_encrypted_pem(&pem, passphrase.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot decrypt {}: {e}", path.display()))?;
    let public = public_of(&pair, KeyRole::Response)?;
    response_signer(&KeyEntry { pair, public })
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

impl KeyStore {
    /// Loads the keys from `<data_dir>/keys`, making any that are missing.
    /// Until [`KeyStore::sync`] reads the key lists, the `current` files
    /// say which keys sign.
    pub fn load_or_create(data_dir: &FsPath, passphrase: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !passphrase.is_empty(),
            "SLUICE_KEY_PASSPHRASE is empty: set it to encrypt the keys at rest"
        );
        let dir = data_dir.join("keys");
        let keys = Self::read(&dir, passphrase, None, &[])?;
        Ok(KeyStore {
            dir,
            passphrase: passphrase.to_string(),
            inner: RwLock::new(keys),
            change: tokio::sync::Mutex::new(()),
        })
    }

    fn read(
        dir: &FsPath,
        passphrase: &str,
        list: Option<(KeyList, SignedKeyList)>,
        known: &[Arc<KeyEntry>],
    ) -> anyhow::Result<Keys> {
        let mut entries = Vec::new();
        let mut file_current = Vec::new();
        for role in [KeyRole::Image, KeyRole::Response, KeyRole::Root] {
            let (e, current) = load_role(dir, passphrase, role, known)?;
            entries.extend(e);
            file_current.push(current);
        }
        let current = |role: KeyRole| -> anyhow::Result<Arc<KeyEntry>> {
            let id = match &list {
                Some((l, _)) => l
                    .current(role)
                    .map(|k| k.key_id.clone())
                    .with_context(|| format!("the key list names no current {role} key"))?,
                None => file_current[match role {
                    KeyRole::Image => 0,
                    KeyRole::Response => 1,
                    KeyRole::Root => 2,
                }]
                .clone(),
            };
            entries
                .iter()
                .find(|e| e.public.key_id == id && e.public.role == role)
                .cloned()
                .with_context(|| {
                    format!(
                        "the current {role} key {id} has no file in {}: restore it from a backup",
                        role_dir(dir, role).display()
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

    fn install(&self, list: KeyList, signed: SignedKeyList) -> anyhow::Result<()> {
        // The `current` files follow the list, for `sluice keys generate`
        // and for a reader of the folder; the list is what counts.
        for role in [KeyRole::Image, KeyRole::Response, KeyRole::Root] {
            if let Some(k) = list.current(role) {
                write_private(
                    &role_dir(&self.dir, role).join("current"),
                    k.key_id.as_bytes(),
                )?;
            }
        }
        let known = self.inner.read().expect("key lock").entries.clone();
        let keys = Self::read(&self.dir, &self.passphrase, Some((list, signed)), &known)?;
        *self.inner.write().expect("key lock") = keys;
        Ok(())
    }

    /// Reads the newest key list; makes the first one, lists new key files
    /// and renews a list past half its life. Runs at start and every hour.
    pub async fn sync(&self, db: &PgPool) -> anyhow::Result<()> {
        let _one = self.change.lock().await;
        let newest = newest_list(db).await?;
        let now = OffsetDateTime::now_utc();
        let entries = self.inner.read().expect("key lock").entries.clone();
        let (list, signed) = match newest {
            None => {
                // The first list: the `current` files say which keys sign.
                let current: Vec<String> = [KeyRole::Image, KeyRole::Response, KeyRole::Root]
                    .iter()
                    .filter_map(|r| {
                        std::fs::read_to_string(role_dir(&self.dir, *r).join("current")).ok()
                    })
                    .map(|id| id.trim().to_string())
                    .collect();
                let files: Vec<(PublicKey, bool)> = entries
                    .iter()
                    .map(|e| (e.public.clone(), current.contains(&e.public.key_id)))
                    .collect();
                let list = first_list(&files, now);
                let signed = sign_list(&list, None, &entries)?;
                store_list(db, &list, &signed, "system", "keys.list.create").await?;
                (list, signed)
            }
            Some(signed) => {
                let (_, newest) = signed.open()?;
                let publics: Vec<PublicKey> = entries.iter().map(|e| e.public.clone()).collect();
                let ever_listed = ever_listed(db).await?;
                match list_at_start(&newest, &ever_listed, &publics, now) {
                    None => (newest, signed),
                    Some(list) => {
                        let signed = sign_list(&list, Some(&newest), &entries)?;
                        store_list(db, &list, &signed, "system", "keys.list.renew").await?;
                        (list, signed)
                    }
                }
            }
        };
        self.install(list, signed)
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
        let newest = newest_list(db).await?.ok_or_else(|| {
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
        // A rotation's key is written first: a crash before the list is
        // stored leaves an unlisted file, listed as `next` at the next start.
        let new_key = match &change {
            Change::Rotate(role)
                if prev
                    .keys
                    .iter()
                    .all(|k| k.role != *role || k.state != KeyState::Next) =>
            {
                let (dir, pass, role) = (self.dir.clone(), self.passphrase.clone(), *role);
                Some(
                    tokio::task::spawn_blocking(move || write_new_key(&dir, &pass, role))
                        .await
                        .map_err(|e| Error::Internal(e.into()))??,
                )
            }
            _ => None,
        };
        let now = OffsetDateTime::now_utc();
        let (list, about) = apply_change(&prev, &change, new_key.as_ref(), now)?;
        let mut entries = self.inner.read().expect("key lock").entries.clone();
        if new_key.is_some() {
            // The new file, read before signing with it.
            entries = Self::read(&self.dir, &self.passphrase, None, &entries)?.entries;
        }
        let signed = sign_list(&list, Some(&prev), &entries)?;
        let action = match &change {
            Change::Rotate(_) => "keys.rotate",
            Change::Activate(_) => "keys.activate",
            Change::Revoke(..) => "keys.revoke",
        };
        if let Change::Revoke(role, id) = &change {
            // Out of the folder before the list says so, so it never signs
            // again even if the list then fails to store (a retry finishes
            // the revocation); kept for forensics.
            let from = role_dir(&self.dir, *role).join(format!("{id}.key"));
            let to_dir = role_dir(&self.dir, *role).join("revoked");
            if from.exists() {
                std::fs::create_dir_all(&to_dir).map_err(anyhow::Error::from)?;
                std::fs::rename(&from, to_dir.join(format!("{id}.key")))
                    .and_then(|()| std::fs::File::open(&to_dir)?.sync_all())
                    .and_then(|()| std::fs::File::open(role_dir(&self.dir, *role))?.sync_all())
                    .map_err(anyhow::Error::from)?;
            }
        }
        let mut tx = db.begin().await?;
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
        let version = list.version;
        self.install(list, signed)?;
        Ok((about, version))
    }
}

/// Every key id any list has named.
pub(crate) async fn ever_listed(db: &PgPool) -> anyhow::Result<std::collections::HashSet<String>> {
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

pub(crate) async fn newest_list(db: &PgPool) -> anyhow::Result<Option<SignedKeyList>> {
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

pub(crate) async fn store_list(
    db: &PgPool,
    list: &KeyList,
    signed: &SignedKeyList,
    actor: &str,
    action: &str,
) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
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
    tx.commit().await?;
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
