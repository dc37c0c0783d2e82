//! What the agent remembers across restarts, in `state_dir/state.json`,
//! always replaced atomically. The update state machine lives here: an enum
//! whose variants carry their data (zincati style).

use crate::bootloader::Slot;
use crate::fsutil;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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

/// Where an update stands. Each variant carries what it needs; the `boot_id`
/// of a variant is the kernel's id of the boot it was entered in, so a
/// restart of the agent within that boot is told from a reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum UpdateState {
    /// Nothing in flight: the booted slot is known good (or assessed next).
    Idle,
    /// Writing `target` into `slot`; GRUB will not boot `slot` meanwhile.
    Writing {
        /// What is being written.
        target: Target,
        /// Into which slot.
        slot: Slot,
        /// The boot the write began in.
        #[serde(default)]
        boot_id: String,
    },
    /// `slot` holds `target`, written and verified, but GRUB does not boot
    /// it: it waits for the reboot policy (a maintenance window, a reboot
    /// lease, a person). A power cut or an unplanned reboot boots the
    /// running slot, so this state survives reboots (no boot id).
    Ready {
        /// What was written.
        target: Target,
        /// Into which slot.
        slot: Slot,
        /// The slot's seal when it was verified ([`crate::slot::seal`]):
        /// checked again before GRUB is armed.
        #[serde(default)]
        seal: String,
    },
    /// `slot` holds `target` and GRUB boots it next, on trial: until the
    /// boot `boot_id` ends the agent only waits for the reboot.
    Staged {
        /// What was written.
        target: Target,
        /// Into which slot.
        slot: Slot,
        /// The boot it was staged in.
        #[serde(default)]
        boot_id: String,
    },
    /// `slot`, booted on trial, failed its assessment and is marked bad:
    /// until the boot `boot_id` ends the agent only waits for the reboot
    /// into the other slot.
    Failed {
        /// The release that failed.
        target: Target,
        /// The slot marked bad.
        slot: Slot,
        /// The boot it failed in.
        #[serde(default)]
        boot_id: String,
    },
}

impl UpdateState {
    /// A short name for logs and `status`.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateState::Idle => "idle",
            UpdateState::Writing { .. } => "writing",
            UpdateState::Ready { .. } => "ready",
            UpdateState::Staged { .. } => "staged",
            UpdateState::Failed { .. } => "failed",
        }
    }

    /// The boot a reboot is awaited from, and why, if this state awaits one.
    pub fn awaits_reboot(&self) -> Option<(&str, String)> {
        match self {
            UpdateState::Staged {
                target,
                slot,
                boot_id,
            } => Some((
                boot_id,
                format!("into slot {slot} ({} staged)", target.version),
            )),
            UpdateState::Failed {
                target,
                slot,
                boot_id,
            } => Some((
                boot_id,
                format!(
                    "out of slot {slot} ({} failed its assessment)",
                    target.version
                ),
            )),
            _ => None,
        }
    }
}

/// A transition of the update state: each names the states it may start
/// from; [`Store::transition`] refuses (logs and counts) any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Begin (or begin again) writing the inactive slot: from idle, after
    /// an interrupted write, or when another release replaces a ready one.
    Write,
    /// The slot is written and verified; GRUB does not boot it yet.
    Written,
    /// The ready slot is armed: GRUB boots it next, on trial.
    Stage,
    /// The server no longer offers the ready release: it is forgotten.
    Forget,
    /// The write failed; nothing was made bootable.
    WriteFailed,
    /// The slot on trial passed its assessment.
    Healthy,
    /// The slot on trial failed its assessment and is marked bad.
    AssessmentFailed,
    /// The machine came back up in the other slot.
    FellBack,
    /// A staged slot was never booted (its switch did not take): dropped.
    Cancel,
    /// `rollback`: the other slot's release is staged.
    Rollback,
}

impl Step {
    /// Its name in logs and in the refusal counts.
    pub fn name(self) -> &'static str {
        match self {
            Step::Write => "write",
            Step::Written => "written",
            Step::Stage => "stage",
            Step::Forget => "forget",
            Step::WriteFailed => "write_failed",
            Step::Healthy => "healthy",
            Step::AssessmentFailed => "assessment_failed",
            Step::FellBack => "fell_back",
            Step::Cancel => "cancel",
            Step::Rollback => "rollback",
        }
    }

    /// The states it may start from.
    pub fn from(self) -> &'static [&'static str] {
        match self {
            Step::Write => &["idle", "writing", "ready"],
            Step::Written => &["writing"],
            // From writing: GRUB armed by an agent before download-only
            // staging, whose state file still says writing.
            Step::Stage => &["ready", "writing"],
            Step::Forget => &["ready"],
            Step::WriteFailed => &["writing"],
            Step::Healthy => &["idle", "writing", "ready", "staged", "failed"],
            Step::AssessmentFailed => &["idle", "writing", "ready", "staged", "failed"],
            Step::FellBack => &["staged", "failed"],
            Step::Cancel => &["staged"],
            Step::Rollback => &["idle"],
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
    /// How many times each transition or write was refused, by name.
    #[serde(default)]
    pub refusals: BTreeMap<String, u64>,
    /// The reboot-lease group this device may hold a lease in: set before
    /// `POST /v1/pre-reboot`, cleared once `POST /v1/steady-state` succeeded
    /// (after the boot assessment, or when it waits after all).
    #[serde(default)]
    pub lease: Option<String>,
    /// While ready: what it waits for, in words (the last `staged` event's
    /// message), so `status` says it without asking the server.
    #[serde(default)]
    pub waiting: Option<String>,
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
            refusals: BTreeMap::new(),
            lease: None,
            waiting: None,
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

/// An exclusive lock on the state folder (`state_dir/agent.lock`), held
/// for as long as a command runs and for each of the daemon's turns. At boot
/// the boot-assessment service and the daemon start together, and an
/// operator's `clear-failed` may run beside the daemon: each reads the state
/// only once it holds the lock, so none acts on a state another changed, and
/// none overwrites another's write. Released when dropped (or when the
/// process dies: the kernel drops it with the file).
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Takes the lock, waiting for another agent process to let it go.
    pub fn take(state_dir: &Path) -> anyhow::Result<StateLock> {
        use rustix::fs::{FlockOperation, flock};
        make_state_dir(state_dir)?;
        let path = state_dir.join("agent.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                crate::log(&format!(
                    "waiting for another sluice-agent command to finish (it holds {})",
                    path.display()
                ));
                flock(&file, FlockOperation::LockExclusive)
                    .with_context(|| format!("locking {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
        // Only the lock's holder writes in the folder, so a temporary there
        // now is one a killed agent left; the credentials' may otherwise
        // wait long for their next write.
        fsutil::remove_temporaries(state_dir)
            .with_context(|| format!("removing temporaries left in {}", state_dir.display()))?;
        Ok(StateLock { _file: file })
    }
}

/// Makes the state folder if it is missing: private (0700), as it holds
/// the device token.
fn make_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))
}

/// The state file and its contents.
pub struct Store {
    path: PathBuf,
    /// The current contents.
    pub data: Persisted,
}

impl Store {
    /// Loads `state_dir/state.json`, or a fresh state. A state dir made
    /// here is private (0700): it holds the device token.
    pub fn open(state_dir: &Path) -> anyhow::Result<Store> {
        make_state_dir(state_dir)?;
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

    /// The one place the update state changes: checks that `step` may start
    /// from the current state (else refuses, logged and counted), logs and
    /// persists.
    pub fn transition(&mut self, step: Step, next: UpdateState) -> anyhow::Result<()> {
        let from = self.data.update.name();
        if !step.from().contains(&from) {
            return Err(self.refuse(
                step.name(),
                format!(
                    "not from state {from} (only from {})",
                    step.from().join(", ")
                ),
            ));
        }
        crate::log(&format!(
            "state {from} -> {} ({})",
            next.name(),
            step.name()
        ));
        self.data.update = next;
        self.save()
    }

    /// Refuses `what` because of `why`: logs one line, counts it (best
    /// effort: a refusal never fails for want of a write) and answers the
    /// error to return.
    pub fn refuse(&mut self, what: &str, why: String) -> anyhow::Error {
        let line = format!("{what} refused: {why}");
        crate::log(&line);
        *self.data.refusals.entry(what.to_string()).or_default() += 1;
        if let Err(e) = self.save() {
            crate::log(&format!("counting the refusal: {e:#}"));
        }
        anyhow::anyhow!(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taking_the_lock_removes_leftover_temporaries_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("state.json"), b"{}").unwrap();
        std::fs::write(state.join(".state.json.sluice-new"), b"{\"half").unwrap();
        std::fs::write(state.join(".device.json.sluice-new"), b"").unwrap();
        std::fs::write(state.join("notes.sluice-new"), b"kept").unwrap();
        // A planted link goes; what it points to stays.
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::os::unix::fs::symlink(&outside, state.join(".keylist.json.sluice-new")).unwrap();
        let _lock = StateLock::take(&state).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["agent.lock", "notes.sluice-new", "state.json"]);
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
    }

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
        let writing = UpdateState::Writing {
            target: t.clone(),
            slot: Slot::B,
            boot_id: "b1".into(),
        };
        s.transition(Step::Write, writing.clone()).unwrap();
        let mut s = Store::open(d.path()).unwrap();
        assert_eq!(s.data.last_serial, Some(7));
        assert_eq!(s.data.update, writing);
        // A step that may not start here is refused, counted, and changes nothing.
        let e = s.transition(Step::Rollback, UpdateState::Idle).unwrap_err();
        assert!(
            e.to_string()
                .contains("rollback refused: not from state writing")
        );
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.data.update, writing);
        assert_eq!(s.data.refusals["rollback"], 1);
    }

    /// Download-only staging: written → ready → armed, or ready → written
    /// again, or ready → forgotten; nothing else leaves or enters ready.
    #[test]
    fn ready_has_its_own_transitions() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        let t = Target {
            version: "1.3.0".into(),
            digest: "sha256:13".into(),
            image: "r/x@sha256:13".into(),
        };
        let ready = UpdateState::Ready {
            target: t.clone(),
            slot: Slot::B,
            seal: "dir ino=1".into(),
        };
        let writing = UpdateState::Writing {
            target: t.clone(),
            slot: Slot::B,
            boot_id: "b1".into(),
        };
        s.transition(Step::Written, ready.clone()).unwrap_err();
        s.transition(Step::Write, writing.clone()).unwrap();
        s.transition(Step::Written, ready.clone()).unwrap();
        s.data.lease = Some("acme.stable".into());
        s.data.waiting = Some("staged 1.3.0, waits for window".into());
        s.save().unwrap();
        // It survives a restart, with what it waits for and the lease.
        let mut s = Store::open(d.path()).unwrap();
        assert_eq!(s.data.update, ready);
        assert_eq!(s.data.update.name(), "ready");
        assert_eq!(
            s.data.update.awaits_reboot(),
            None,
            "ready awaits no reboot"
        );
        assert_eq!(s.data.lease.as_deref(), Some("acme.stable"));
        for step in [
            Step::Rollback,
            Step::WriteFailed,
            Step::Cancel,
            Step::FellBack,
        ] {
            s.transition(step, UpdateState::Idle).unwrap_err();
        }
        s.transition(Step::Write, writing).unwrap();
        s.transition(Step::Written, ready.clone()).unwrap();
        s.transition(Step::Forget, UpdateState::Idle).unwrap();
        s.transition(Step::Forget, UpdateState::Idle).unwrap_err();
    }

    /// State files of earlier agents (no boot ids) still load.
    #[test]
    fn older_state_files_load() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("state.json"),
            r#"{"update":{"state":"staged","target":{"version":"1","digest":"d","image":"i"},
                "slot":"B","failed":false},"last_serial":3,"slot_a":null,"slot_b":null,
                "last_result":null}"#,
        )
        .unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(
            matches!(s.data.update, UpdateState::Staged { ref boot_id, .. } if boot_id.is_empty())
        );
    }
}
