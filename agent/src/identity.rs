//! The device's own key and its token. The key (Ed25519, PKCS#8 PEM in
//! `<state_dir>/device.key`, mode 0600 from the moment it exists) is made
//! before the first enrollment and never leaves the device; enrolling,
//! renewing the token and binding the key to an enrollment from before
//! device keys each send a fresh proof signed with it. The token is short
//! lived: it is renewed once half its life is gone, and at once when the
//! server refuses it.

use crate::client::{Refused, Server};
use crate::config::Config;
use crate::state::Credentials;
use anyhow::{Context, bail};
use sluice_protocol::{DeviceKey, DeviceProof, ProofPurpose};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// The key's file name in the state folder.
pub const KEY_FILE: &str = "device.key";

fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEY_FILE)
}

/// The device key: loaded, or made and stored on first use.
pub fn load_or_create(state_dir: &Path) -> anyhow::Result<DeviceKey> {
    let path = key_path(state_dir);
    match load(&path)? {
        Some(k) => Ok(k),
        None => create(state_dir, &path),
    }
}

/// Reads the key without following a link; refuses a key others could read.
fn load(path: &Path) -> anyhow::Result<Option<DeviceKey>> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "opening the device key {} (it must be a plain file, not a link)",
                    path.display()
                )
            });
        }
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        bail!("device key {} is not a plain file: refused", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "device key {} has mode {mode:o}, readable by others: refused (it may have been copied; have an admin reset this device, then remove the file)",
            path.display()
        );
    }
    let mut pem = String::new();
    f.read_to_string(&mut pem)
        .with_context(|| format!("reading the device key {}", path.display()))?;
    DeviceKey::from_pem(&pem)
        .map(Some)
        .with_context(|| format!("device key {} is corrupt", path.display()))
}

/// Makes a key and stores it: written to a new private file (never through
/// a link, never readable by others), synced, renamed into place without
/// replacing a key another process stored meanwhile, and the folder synced.
fn create(state_dir: &Path, path: &Path) -> anyhow::Result<DeviceKey> {
    let mut seed = [0u8; 32];
    rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty())
        .context("the kernel gave no random bytes for the device key")?;
    let key = DeviceKey::from_seed(&seed);
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state folder {}", state_dir.display()))?;
    let tmp = state_dir.join(format!(".{KEY_FILE}.{}.new", std::process::id()));
    // A leftover of this same process id (a crash); never a link followed.
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_flags::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(key.to_pem().as_bytes())?;
        f.sync_all()?;
    }
    let placed = rustix::fs::renameat_with(
        rustix::fs::CWD,
        &tmp,
        rustix::fs::CWD,
        path,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    match placed {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            // Another agent process made the key first: use that one.
            let _ = std::fs::remove_file(&tmp);
            return load(path)?.context("the device key vanished while it was made");
        }
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            // A file system without RENAME_NOREPLACE.
            std::fs::rename(&tmp, path)?;
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("storing the device key {}", path.display()));
        }
    }
    crate::fsutil::sync_dir(state_dir)?;
    crate::log(&format!(
        "made device key {} ({})",
        key.key_id(),
        path.display()
    ));
    Ok(key)
}

/// A fresh proof by the device key.
pub fn prove(key: &DeviceKey, purpose: ProofPurpose, product: &str, subject: &str) -> DeviceProof {
    let mut nonce = [0u8; sluice_protocol::proof::NONCE_BYTES];
    rustix::rand::getrandom(&mut nonce, rustix::rand::GetRandomFlags::empty())
        .expect("the kernel gives random bytes");
    key.prove(
        purpose,
        product,
        subject,
        nonce,
        OffsetDateTime::now_utc().unix_timestamp(),
    )
}

/// The proof an enrollment sends.
pub fn enroll_proof(cfg: &Config, machine_id: &str) -> anyhow::Result<DeviceProof> {
    let key = load_or_create(&cfg.state_dir)?;
    Ok(prove(&key, ProofPurpose::Enroll, &cfg.product, machine_id))
}

/// What the agent reads of its own token (it does not check the signature:
/// the server does).
#[derive(Debug, serde::Deserialize)]
struct Claims {
    iat: i64,
    exp: i64,
    #[serde(default)]
    key_id: Option<String>,
}

fn claims(token: &str) -> Option<Claims> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether a token should be renewed now: half its life is gone (or it
/// cannot be read).
pub fn needs_renewal(token: &str, now: i64) -> bool {
    match claims(token) {
        Some(c) => now >= c.iat + (c.exp - c.iat) / 2,
        None => true,
    }
}

fn refused_status(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<Refused>().map(|r| r.status)
}

fn save(path: &Path, c: &Credentials) -> anyhow::Result<()> {
    crate::fsutil::write_atomic(path, &serde_json::to_vec(c)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Keeps the stored credentials usable: binds a device key to a token from
/// before device keys, renews a token past half its life (or at once with
/// `force`, after the server refused it) and stores the result in
/// `creds_path`. Answers `None` when the device must enroll again (an admin
/// reset or deleted it). While the server cannot be reached, a token that
/// has not expired is kept.
pub fn keep_fresh(
    server: &Server,
    cfg: &Config,
    creds_path: &Path,
    creds: Credentials,
    force: bool,
) -> anyhow::Result<Option<Credentials>> {
    let key = load_or_create(&cfg.state_dir)?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let token_claims = claims(&creds.token);
    let mut force = force;
    if !force && token_claims.as_ref().is_some_and(|c| c.key_id.is_none()) {
        let proof = prove(&key, ProofPurpose::Bind, &cfg.product, &creds.device_id);
        match server.bind_key(&creds.device_id, &creds.token, &proof) {
            Ok(t) => {
                let c = Credentials {
                    device_id: creds.device_id,
                    token: t.token,
                };
                save(creds_path, &c)?;
                crate::log(&format!(
                    "bound device key {} to device {}",
                    key.key_id(),
                    c.device_id
                ));
                return Ok(Some(c));
            }
            // The old token is refused (a key is bound already, or the
            // device was reset): the key may still renew or re-enroll.
            Err(e) if refused_status(&e).is_some_and(|s| matches!(s, 401 | 403 | 409)) => {
                crate::log(&format!("{e:#}"));
                force = true;
            }
            Err(e) => {
                crate::log(&format!("{e:#}; keeping the token from before device keys"));
                return Ok(Some(creds));
            }
        }
    }
    if !force && !needs_renewal(&creds.token, now) {
        return Ok(Some(creds));
    }
    let proof = prove(&key, ProofPurpose::Renew, &cfg.product, &creds.device_id);
    match server.renew_token(&creds.device_id, &proof) {
        Ok(t) => {
            let c = Credentials {
                device_id: creds.device_id,
                token: t.token,
            };
            save(creds_path, &c)?;
            Ok(Some(c))
        }
        Err(e) => match refused_status(&e) {
            // No key bound (reset, or a keyless device whose old token is
            // gone) or deleted: enroll again with this key.
            Some(404 | 409) => {
                crate::log(&format!("{e:#}: enrolling again"));
                Ok(None)
            }
            Some(403) => bail!("{e:#}"),
            _ if !force && token_claims.as_ref().is_some_and(|c| c.exp > now) => {
                crate::log(&format!("renewing the device token failed: {e:#}"));
                Ok(Some(creds))
            }
            _ => Err(e.context("renewing the device token")),
        },
    }
}

/// Whether an error is the server refusing the token (401).
pub fn is_unauthorized(e: &anyhow::Error) -> bool {
    refused_status(e) == Some(401)
}

mod libc_flags {
    /// `O_NOFOLLOW` on Linux (every architecture the agent builds for).
    pub const O_NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let k = load_or_create(d.path()).unwrap();
        let path = d.path().join(KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_or_create(d.path()).unwrap().public_key(),
            k.public_key()
        );
        // Nothing else is left in the folder.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_key_others_can_read_or_a_link_is_refused() {
        let d = tempfile::tempdir().unwrap();
        load_or_create(d.path()).unwrap();
        let path = d.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(d.path()).err().unwrap().to_string();
        assert!(e.contains("readable by others"), "{e}");

        let other = tempfile::tempdir().unwrap();
        let target = other.path().join("elsewhere");
        std::fs::write(&target, DeviceKey::from_seed(&[1; 32]).to_pem()).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let linked = tempfile::tempdir().unwrap();
        symlink(&target, linked.path().join(KEY_FILE)).unwrap();
        let e = format!("{:#}", load_or_create(linked.path()).err().unwrap());
        assert!(e.contains("not a link"), "{e}");
    }

    #[test]
    fn renewal_at_half_life() {
        use base64::Engine;
        let enc = |v: serde_json::Value| {
            format!(
                "h.{}.s",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
            )
        };
        let t = enc(serde_json::json!({"iat": 1000, "exp": 2000, "key_id": "k"}));
        assert!(!needs_renewal(&t, 1499));
        assert!(needs_renewal(&t, 1500));
        assert!(needs_renewal("garbage", 0));
        assert!(claims(&t).unwrap().key_id.is_some());
        let old = enc(serde_json::json!({"iat": 1000, "exp": 9_000_000_000i64}));
        assert!(claims(&old).unwrap().key_id.is_none());
    }
}
