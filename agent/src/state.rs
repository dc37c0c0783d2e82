//! What the agent remembers across restarts, in `state_dir/state.json`,
//! always replaced atomically. The update state machine lives here: an enum
//! whose variants carry their data (zincati style).

use crate::bootloader::Slot;
use crate::fsutil;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A release written (or being written) to a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Release version.
    pub version: String,
    /// Platform manifest digest.
    pub digest: String,
    /// `repo@digest`.
    pub image: String,
}

/// Where an update stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum UpdateState {
    /// Nothing in progress.
    Idle,
    /// Writing `target` into `slot`; GRUB will not boot `slot` meanwhile.
    Writing {
        /// What is being written.
        target: Target,
        /// Into which slot.
        slot: Slot,
    },
    /// `slot` holds `target` and GRUB boots it next, on trial.
    Staged {
        /// What was written.
        target: Target,
        /// Into which slot.
        slot: Slot,
        /// The slot failed its health checks; the device is going back.
        failed: bool,
    },
}

impl UpdateState {
    /// A short name for logs and `status`.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateState::Idle => "idle",
            UpdateState::Writing { .. } => "writing",
            UpdateState::Staged { failed: false, .. } => "staged",
            UpdateState::Staged { failed: true, .. } => "failed",
        }
    }
}

/// The device's credentials, once enrolled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// Server-given device id.
    pub device_id: String,
    /// Bearer token.
    pub token: String,
}

/// Everything the agent persists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Persisted {
    /// The update state.
    pub update: UpdateState,
    /// The highest resolution serial accepted: never goes down.
    pub last_serial: Option<i64>,
    /// What slot A holds, if known and complete.
    pub slot_a: Option<Target>,
    /// What slot B holds, if known and complete.
    pub slot_b: Option<Target>,
    /// The last outcome, one line.
    pub last_result: Option<String>,
    /// The server's last `poll_after_s`.
    #[serde(default)]
    pub last_poll_after_s: Option<u64>,
    /// Digests that failed their boot assessment here (newest last, at most
    /// [`MAX_FAILED`]): never applied again by themselves, so a bad release
    /// does not put the device in a reboot loop while the gate waits for
    /// enough reports.
    #[serde(default)]
    pub failed_digests: Vec<String>,
}

/// How many failed digests are remembered.
pub const MAX_FAILED: usize = 16;

impl Default for Persisted {
    fn default() -> Self {
        Persisted {
            update: UpdateState::Idle,
            last_serial: None,
            slot_a: None,
            slot_b: None,
            last_result: None,
            last_poll_after_s: None,
            failed_digests: Vec::new(),
        }
    }
}

impl Persisted {
    /// What a slot holds.
    pub fn slot(&self, s: Slot) -> Option<&Target> {
        match s {
            Slot::A => self.slot_a.as_ref(),
            Slot::B => self.slot_b.as_ref(),
        }
    }

    /// Remembers that `digest` failed on this device.
    pub fn record_failure(&mut self, digest: &str) {
        self.failed_digests.retain(|d| d != digest);
        self.failed_digests.push(digest.to_string());
        let extra = self.failed_digests.len().saturating_sub(MAX_FAILED);
        self.failed_digests.drain(..extra);
    }

    /// Records what a slot holds.
    pub fn set_slot(&mut self, s: Slot, t: Option<Target>) {
        match s {
            Slot::A => self.slot_a = t,
            Slot::B => self.slot_b = t,
        }
    }
}

/// The state file and its contents.
pub struct Store {
    path: PathBuf,
    /// The current contents.
    pub data: Persisted,
}

impl Store {
    /// Loads `state_dir/state.json`, or a fresh state.
    pub fn open(state_dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
        let path = state_dir.join("state.json");
        let data = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("state file {} is corrupt", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Store { path, data })
    }

    /// Writes the state atomically.
    pub fn save(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.data)?;
        fsutil::write_atomic(&self.path, &bytes)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// The one place the update state changes: logs and persists.
    pub fn transition_to(&mut self, next: UpdateState) -> anyhow::Result<()> {
        crate::log(&format!(
            "state {} -> {}",
            self.data.update.name(),
            next.name()
        ));
        self.data.update = next;
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_digests_are_bounded_and_unique() {
        let mut p = Persisted::default();
        for i in 0..MAX_FAILED + 3 {
            p.record_failure(&format!("sha256:{i}"));
        }
        p.record_failure("sha256:5");
        assert_eq!(p.failed_digests.len(), MAX_FAILED);
        assert_eq!(p.failed_digests.last().unwrap(), "sha256:5");
        assert!(!p.failed_digests.contains(&"sha256:0".to_string()));
        assert_eq!(
            p.failed_digests.iter().filter(|d| *d == "sha256:5").count(),
            1
        );
    }

    #[test]
    fn state_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        s.data.last_serial = Some(7);
        let t = Target {
            version: "1.0.0".into(),
            digest: "sha256:00".into(),
            image: "r/x@sha256:00".into(),
        };
        s.transition_to(UpdateState::Writing {
            target: t.clone(),
            slot: Slot::B,
        })
        .unwrap();
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.data.last_serial, Some(7));
        assert_eq!(
            s.data.update,
            UpdateState::Writing {
                target: t,
                slot: Slot::B
            }
        );
    }
}
