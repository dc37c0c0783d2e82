//! The keys this device trusts. It starts from the `keys` file it was built
//! with (a saved `GET /v1/keys`, or a signed key list), then follows the
//! server's signed key lists: a list is taken only if it is the next version
//! after the one held and a threshold of the held list's root keys signed it
//! (the first one: signed by a response and an image key of the file). The
//! newest verified list is kept in `state_dir/keylist.json` and, once there,
//! is all that is trusted: a key it does not list (revoked) is refused.

use crate::client::{Expect, Server, verify_answer as check_answer};
use anyhow::{Context, bail};
use sluice_protocol::{KeyList, KeyLists, KeyRole, KeySet, ResolveResponse, SignedKeyList};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// Most lists fetched in one update (each page is at most 100): a server
/// that keeps answering more is refused rather than followed forever.
const MAX_LISTS: usize = 10_000;

/// The trusted keys and where they come from.
pub struct Trust {
    path: PathBuf,
    /// The keys of the `keys` file, for verifying a first list.
    anchor: KeySet,
    /// The newest verified list, with its envelope.
    held: Option<(KeyList, SignedKeyList)>,
    keys: KeySet,
}

/// The `keys` file: either format.
fn read_keys_file(path: &Path) -> anyhow::Result<(KeySet, Option<(KeyList, SignedKeyList)>)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading trusted keys {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing trusted keys {}", path.display()))?;
    if v.get("payloadType").is_some() {
        let signed: SignedKeyList = serde_json::from_value(v)
            .with_context(|| format!("parsing the key list in {}", path.display()))?;
        let list = signed
            .verify_self()
            .with_context(|| format!("the key list in {} does not verify", path.display()))?;
        return Ok((list.key_set(), Some((list, signed))));
    }
    let keys: KeySet = serde_json::from_value(v)
        .with_context(|| format!("parsing trusted keys {}", path.display()))?;
    Ok((keys, None))
}

impl Trust {
    /// The trust of a device with this `keys` file and state folder.
    pub fn open(keys_file: &Path, state_dir: &Path) -> anyhow::Result<Trust> {
        let (anchor, from_file) = read_keys_file(keys_file)?;
        let path = state_dir.join("keylist.json");
        let kept = match std::fs::read(&path) {
            Ok(b) => {
                match serde_json::from_slice::<SignedKeyList>(&b)
                    .map_err(anyhow::Error::from)
                    .and_then(|s| Ok((s.verify_self()?, s)))
                {
                    Ok(k) => Some(k),
                    Err(e) => {
                        // Not written by us (the writes are atomic): start
                        // again from the keys file.
                        crate::log(&format!(
                            "ignoring {}: {e:#}; starting again from {}",
                            path.display(),
                            keys_file.display()
                        ));
                        None
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // The newer of the file's list (a new image may ship one) and the kept one.
        let held = match (from_file, kept) {
            (Some(f), Some(k)) => Some(if f.0.version > k.0.version { f } else { k }),
            (f, k) => k.or(f),
        };
        let keys = match &held {
            Some((l, _)) => l.key_set(),
            None => anchor.clone(),
        };
        Ok(Trust {
            path,
            anchor,
            held,
            keys,
        })
    }

    /// The image and response keys trusted now.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The version of the newest list held.
    pub fn version(&self) -> Option<u64> {
        self.held.as_ref().map(|(l, _)| l.version)
    }

    fn hold(&mut self, list: KeyList, signed: SignedKeyList) -> anyhow::Result<()> {
        // Private (0600) and atomic: a crash leaves the old list or the new
        // one, never a mix.
        crate::fsutil::write_atomic(&self.path, &serde_json::to_vec(&signed)?)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.keys = list.key_set();
        self.held = Some((list, signed));
        Ok(())
    }

    /// Fetches the lists newer than the one held (`fetch(after)` answers
    /// `GET /v1/keys/lists?after=`), verifies each step and keeps the newest
    /// that verifies. Answers the version held afterwards; an error names the
    /// first list refused (the ones before it are kept).
    pub fn update(
        &mut self,
        mut fetch: impl FnMut(u64) -> anyhow::Result<KeyLists>,
    ) -> anyhow::Result<Option<u64>> {
        let mut seen = 0usize;
        loop {
            let after = self.version().unwrap_or(0);
            let page = fetch(after)?;
            if page.lists.is_empty() {
                return Ok(self.version());
            }
            seen += page.lists.len();
            if seen > MAX_LISTS {
                bail!("the server offers more than {MAX_LISTS} key lists: refused");
            }
            let mut next = None;
            let lists = match &self.held {
                Some(_) => page.lists,
                None => {
                    // A first list: the newest one the keys file can vouch
                    // for, then on along the chain.
                    let start = page
                        .lists
                        .iter()
                        .rposition(|s| s.verify_bootstrap(&self.anchor).is_ok())
                        .context(
                            "no key list from the server is signed by a response key and an image key \
                             of this device's keys file: refused (ship a key list from \
                             GET /v1/keys/lists/latest as the keys file)",
                        )?;
                    let signed = page.lists[start].clone();
                    let list = signed.verify_bootstrap(&self.anchor)?;
                    next = Some((list, signed));
                    page.lists[start + 1..].to_vec()
                }
            };
            let mut last = next.as_ref().map(|(l, _)| l.clone());
            let mut refused = None;
            for signed in lists {
                let prev = last
                    .as_ref()
                    .or(self.held.as_ref().map(|(l, _)| l))
                    .expect("a list is held or bootstrapped");
                match signed.verify_next(prev) {
                    Ok(list) => {
                        last = Some(list.clone());
                        next = Some((list, signed));
                    }
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            if let Some((list, signed)) = next {
                crate::log(&format!(
                    "key list version {} verified and kept (was {})",
                    list.version,
                    self.version()
                        .map_or("the keys file".to_string(), |v| format!("version {v}"))
                ));
                self.hold(list, signed)?;
            }
            if let Some(e) = refused {
                bail!("{e}: refused");
            }
            let now_held = self.version().unwrap_or(0);
            if now_held == after || now_held >= page.newest {
                return Ok(self.version());
            }
        }
    }

    /// Refuses when the newest list held has expired: the server (or
    /// someone between) may be hiding a newer one, e.g. one that revokes a
    /// key (an indefinite freeze).
    pub fn check_fresh(&self, now: OffsetDateTime) -> anyhow::Result<()> {
        if let Some((l, _)) = &self.held
            && l.expires_at <= now
        {
            bail!(
                "the newest key list this device holds (version {}) expired at {} and the server offers no newer one: refused",
                l.version,
                l.expires_at
            );
        }
        Ok(())
    }

    /// [`Trust::update`] from `server`, one line in the log if it fails.
    fn update_from(&mut self, server: &Server) -> anyhow::Result<Option<u64>> {
        self.update(|after| server.key_lists(after))
            .context("updating the key lists")
    }

    /// Checks a resolution answer (see [`crate::client::verify_answer`]) and
    /// keeps the key lists up to date around it: an answer signed by a key
    /// this device does not know is checked again once the newer lists are
    /// fetched; an answer naming a newer list, or offering an image signed
    /// by an unknown key, has the lists fetched before the offer is checked.
    pub fn verify_answer(
        &mut self,
        server: &Server,
        header: &str,
        body: &[u8],
        expect: &Expect<'_>,
    ) -> anyhow::Result<ResolveResponse> {
        if self.check_fresh(expect.now).is_err()
            && let Err(e) = self.update_from(server)
        {
            crate::log(&format!("{e:#}"));
        }
        let answer = match check_answer(&self.keys, header, body, expect) {
            Err(e) if unknown_key(&e) => {
                self.update_from(server).with_context(|| format!("{e:#}"))?;
                check_answer(&self.keys, header, body, expect)?
            }
            r => r?,
        };
        self.check_fresh(expect.now)?;
        let newer = answer.keys_version > self.version();
        let unknown_image_key = answer.update
            && answer
                .release
                .as_ref()
                .is_some_and(|o| self.keys.find(&o.signature.key_id, KeyRole::Image).is_err());
        if (newer || unknown_image_key)
            && let Err(e) = self.update_from(server)
        {
            // The answer itself verified: act on it with the keys held.
            crate::log(&format!("{e:#}"));
        }
        Ok(answer)
    }
}

fn unknown_key(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<sluice_protocol::Error>(),
        Some(sluice_protocol::Error::UnknownKey { .. })
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::KeyState;
    use sluice_protocol::keylist::testing::{ec_key, ed, ed_key, sign};

    /// A server's lists: root `root`, response `resp`, image `img` per version.
    struct Lists(Vec<SignedKeyList>);

    fn make(
        version: u64,
        root: u8,
        prev_root: u8,
        resp: u8,
        img: u8,
        ttl_days: i64,
    ) -> SignedKeyList {
        let now = OffsetDateTime::now_utc();
        let list = KeyList {
            version,
            issued_at: now,
            expires_at: now + time::Duration::days(ttl_days),
            threshold: 1,
            keys: vec![
                ed_key(root, KeyRole::Root, KeyState::Current),
                ed_key(resp, KeyRole::Response, KeyState::Current),
                ec_key(img, KeyState::Current),
            ],
        };
        sign(&list, &[root, prev_root, resp], &[img])
    }

    impl Lists {
        /// Version 1: root 1, response 2, image 3; then each version
        /// rotates the root (10 + v) and the response key (20 + v).
        fn new(n: u64) -> Lists {
            let mut v = vec![make(1, 1, 1, 2, 3, 365)];
            for i in 2..=n {
                let prev_root = if i == 2 { 1 } else { 10 + i as u8 - 1 };
                v.push(make(i, 10 + i as u8, prev_root, 20 + i as u8, 3, 365));
            }
            Lists(v)
        }

        fn fetch(&self, page: usize) -> impl FnMut(u64) -> anyhow::Result<KeyLists> + '_ {
            move |after| {
                Ok(KeyLists {
                    lists: self
                        .0
                        .iter()
                        .filter(|s| s.open().unwrap().1.version > after)
                        .take(page)
                        .cloned()
                        .collect(),
                    newest: self.0.len() as u64,
                })
            }
        }
    }

    fn device(keys: &KeySet) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("keys.json");
        std::fs::write(&f, serde_json::to_vec(keys).unwrap()).unwrap();
        std::fs::create_dir_all(d.path().join("state")).unwrap();
        (d, f)
    }

    fn first_keys() -> KeySet {
        KeySet {
            keys: vec![
                ed_key(2, KeyRole::Response, KeyState::Current).public(),
                ec_key(3, KeyState::Current).public(),
            ],
        }
    }

    #[test]
    fn a_device_bootstraps_follows_the_chain_in_pages_and_keeps_it() {
        let lists = Lists::new(7);
        let (d, f) = device(&first_keys());
        let state = d.path().join("state");
        let mut t = Trust::open(&f, &state).unwrap();
        assert_eq!(t.version(), None);
        assert_eq!(t.update(lists.fetch(2)).unwrap(), Some(7));
        assert!(t.keys().find(ed(27).key_id(), KeyRole::Response).is_ok());
        assert!(
            t.keys().find(ed(2).key_id(), KeyRole::Response).is_err(),
            "the keys file no longer counts once a list is held"
        );
        // Kept across restarts, mode 0600, no temporary left.
        let t = Trust::open(&f, &state).unwrap();
        assert_eq!(t.version(), Some(7));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("keylist.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1);
    }

    #[test]
    fn a_broken_link_keeps_what_verified_before_it() {
        let mut lists = Lists::new(5);
        // Version 4 signed by a root that version 3 does not name.
        lists.0[3] = make(4, 14, 99, 24, 3, 365);
        let (d, f) = device(&first_keys());
        let mut t = Trust::open(&f, &d.path().join("state")).unwrap();
        let e = t.update(lists.fetch(100)).unwrap_err();
        assert!(format!("{e:#}").contains("version 4 lacks"), "{e:#}");
        assert_eq!(t.version(), Some(3));
        // Older or repeated lists change nothing.
        assert_eq!(t.update(Lists::new(3).fetch(100)).unwrap(), Some(3));
    }

    #[test]
    fn no_first_list_without_both_keys_of_the_file() {
        let lists = Lists::new(3);
        let only_response = KeySet {
            keys: vec![ed_key(2, KeyRole::Response, KeyState::Current).public()],
        };
        let (d, f) = device(&only_response);
        let mut t = Trust::open(&f, &d.path().join("state")).unwrap();
        let e = t.update(lists.fetch(100)).unwrap_err();
        assert!(format!("{e:#}").contains("no key list"), "{e:#}");
        assert_eq!(t.version(), None);
        assert_eq!(t.keys(), &only_response);
    }

    #[test]
    fn an_expired_newest_list_is_a_freeze() {
        let lists = Lists(vec![make(1, 1, 1, 2, 3, -1)]);
        let (d, f) = device(&first_keys());
        let mut t = Trust::open(&f, &d.path().join("state")).unwrap();
        t.update(lists.fetch(100)).unwrap();
        let e = t.check_fresh(OffsetDateTime::now_utc()).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        // A fresh list after it lifts the freeze.
        let lists = Lists(vec![make(1, 1, 1, 2, 3, -1), make(2, 1, 1, 2, 3, 365)]);
        t.update(lists.fetch(100)).unwrap();
        t.check_fresh(OffsetDateTime::now_utc()).unwrap();
    }

    #[test]
    fn a_keys_file_that_is_a_list_is_trusted_with_its_root() {
        let lists = Lists::new(4);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("keys.json");
        std::fs::write(&f, serde_json::to_vec(&lists.0[1]).unwrap()).unwrap();
        // The agent's state folder exists before its trust is opened.
        std::fs::create_dir(d.path().join("state")).unwrap();
        let mut t = Trust::open(&f, &d.path().join("state")).unwrap();
        assert_eq!(t.version(), Some(2));
        assert_eq!(t.update(lists.fetch(100)).unwrap(), Some(4));
    }

    #[test]
    fn a_leftover_temporary_or_a_corrupt_list_is_survived() {
        let lists = Lists::new(2);
        let (d, f) = device(&first_keys());
        let state = d.path().join("state");
        // A crash mid-write left the temporary behind.
        std::fs::write(state.join(".keylist.json.sluice-new"), b"{\"half").unwrap();
        let mut t = Trust::open(&f, &state).unwrap();
        t.update(lists.fetch(100)).unwrap();
        assert_eq!(Trust::open(&f, &state).unwrap().version(), Some(2));
        // A list that does not verify is not trusted: back to the keys file.
        let mut forged = lists.0[1].clone();
        forged.signatures.clear();
        std::fs::write(
            state.join("keylist.json"),
            serde_json::to_vec(&forged).unwrap(),
        )
        .unwrap();
        let t = Trust::open(&f, &state).unwrap();
        assert_eq!(t.version(), None);
        assert_eq!(t.keys(), &first_keys());
    }
}
