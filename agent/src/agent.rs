//! One device: the upgrade step by step, the reboot policy, the boot
//! assessment after reboot, rollback, status and the daemon's turns. Each
//! step is a method on [`Device`]; the update state changes only through
//! [`Store::transition`], which refuses a step from a state it may not start
//! from. Two guards hold above it: once a reboot was asked for (a slot
//! staged, or the booted slot failed its assessment) nothing is written
//! until the machine has rebooted (the kernel's boot id changed), and no
//! slot is written while the booted slot is not known good (on trial, or
//! marked bad).
//!
//! An update is written and verified first (`ready`: GRUB does not boot the
//! slot yet), then armed only when the reboot policy allows it: the
//! server's advice in the signed answer (maintenance windows), the
//! configured `boot.reboot_policy`, and a reboot lease (FleetLock) when the
//! server names a lease group.

use crate::bootloader::{AbState, GrubEnv, Slot};
use crate::chunked::Toc;
use crate::client::{Expect, Lease, Server, check_offer};
use crate::config::{Config, RebootPolicy};
use crate::failpoint;
use crate::pipeline::Partial;
use crate::registry::{ImageRef, Registry};
use crate::state::{Credentials, StateLock, Step, Store, Target, UpdateState};
use crate::unpack::{UnpackOptions, Unpacker};
use anyhow::{Context, bail};
use sluice_protocol::{
    ClearedBy, EnrollRequest, EventKind, EventRequest, FailuresCleared, HostStatus, RebootAdvice,
    ResolveResponse, SlotStatus,
};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use time::OffsetDateTime;

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do: the device runs the target.
    UpToDate,
    /// A new slot was written and the reboot into it was asked for.
    Rebooting(Target),
    /// The offered release already failed its boot assessment here: not
    /// applied again (a release with another digest is).
    Skipped(Target),
    /// The release is written and verified (`ready`) and waits for the
    /// reboot policy: `why` says for what, in words; ask again no later
    /// than `retry_at` (a maintenance window opens then).
    Waiting {
        /// The release staged.
        target: Target,
        /// What it waits for (`staged 1.3.0, waits for window ...`).
        why: String,
        /// When the wait may end by itself, if known.
        retry_at: Option<OffsetDateTime>,
    },
}

/// What an answer offers this device, as `apply` would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered {
    /// Nothing newer: the device runs the target.
    UpToDate,
    /// A release `apply` would write.
    Update(Target),
    /// A release that failed its boot assessment here: `apply` skips it
    /// until it is cleared (`clear-failed`, or an admin's retry).
    FailedHere(Target),
}

/// A device: configuration, trusted keys, state, and its two outside systems.
pub struct Device {
    /// The configuration.
    pub cfg: Config,
    trust: crate::trust::Trust,
    /// The persisted state.
    pub store: Store,
    server: Server,
    _lock: StateLock,
}

/// A random nonce of 32 URL-safe characters.
pub fn nonce() -> String {
    let mut b = [0u8; 24];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .expect("the kernel gives random bytes");
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn run_cmd(argv: &[String]) -> anyhow::Result<()> {
    let (prog, args) = argv.split_first().context("empty command")?;
    let st = Command::new(prog)
        .args(args)
        .status()
        .with_context(|| format!("running {prog}"))?;
    if !st.success() {
        bail!("{} exited with {st}", argv.join(" "));
    }
    Ok(())
}

impl Device {
    /// Opens a device from its configuration.
    /// Takes the state folder's lock first (see [`StateLock`]): a device
    /// is one command's, or one daemon turn's.
    pub fn open(cfg: Config) -> anyhow::Result<Device> {
        let lock = StateLock::take(&cfg.state_dir)?;
        let store = Store::open(&cfg.state_dir)?;
        let trust = crate::trust::Trust::open(&cfg.keys, &cfg.state_dir)?;
        let server = Server::new(&cfg.server, cfg.server_ca.as_deref())?;
        Ok(Device {
            cfg,
            trust,
            store,
            server,
            _lock: lock,
        })
    }

    fn creds_path(&self) -> std::path::PathBuf {
        self.cfg.state_dir.join("device.json")
    }

    /// The stored credentials, if enrolled.
    pub fn credentials(&self) -> anyhow::Result<Option<Credentials>> {
        match std::fs::read(self.creds_path()) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).context("device.json is corrupt")?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Enrolls with the enrollment secret and the device key (once; later
    /// calls reuse the token, renewed with the key as it ages).
    pub fn enroll(&mut self) -> anyhow::Result<Credentials> {
        self.enroll_with(false)
    }

    fn enroll_with(&mut self, renew: bool) -> anyhow::Result<Credentials> {
        if let Some(c) = self.credentials()?
            && let Some(c) =
                crate::identity::keep_fresh(&self.server, &self.cfg, &self.creds_path(), c, renew)?
        {
            return Ok(c);
        }
        let secret = self
            .cfg
            .enrollment_secret
            .clone()
            .context("not enrolled and no enrollment_secret in the configuration")?;
        let machine_id = match &self.cfg.machine_id {
            Some(m) => m.clone(),
            None => std::fs::read_to_string("/etc/machine-id")
                .context("reading /etc/machine-id (or set machine_id in the configuration)")?
                .trim()
                .to_string(),
        };
        let booted = self.booted().ok();
        let current = booted.and_then(|s| self.store.data.slot(s).cloned());
        let proof = crate::identity::enroll_proof(&self.cfg, &machine_id)?;
        let resp = self.server.enroll(&EnrollRequest {
            product: self.cfg.product.clone(),
            enrollment_secret: secret,
            machine_id,
            arch: self.cfg.arch.clone(),
            channel: self.cfg.channel.clone(),
            current_version: current.as_ref().map(|t| t.version.clone()),
            current_digest: current.map(|t| t.digest),
            labels: self.cfg.labels.clone(),
            proof: Some(proof),
        })?;
        let c = Credentials {
            device_id: resp.device_id,
            token: resp.token,
        };
        // Private from the moment it exists (`write_atomic` makes it 0600).
        crate::fsutil::write_atomic(&self.creds_path(), &serde_json::to_vec(&c)?)?;
        crate::log(&format!("enrolled as device {}", c.device_id));
        Ok(c)
    }

    /// The slot the running system booted from (`sluice.slot=` on the command line).
    pub fn booted(&self) -> anyhow::Result<Slot> {
        let p = &self.cfg.boot.cmdline;
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Slot::from_cmdline(&text).with_context(|| {
            format!(
                "no sluice.slot=A|B in {}: cannot tell the booted slot",
                p.display()
            )
        })
    }

    /// The kernel's id of the running boot.
    pub fn boot_id(&self) -> anyhow::Result<String> {
        let p = &self.cfg.boot.boot_id;
        let id = std::fs::read_to_string(p)
            .with_context(|| format!("reading the boot id {}", p.display()))?;
        let id = id.trim();
        if id.is_empty() {
            bail!("the boot id {} is empty", p.display());
        }
        Ok(id.to_string())
    }

    fn ab(&self) -> anyhow::Result<(GrubEnv, AbState)> {
        let env = GrubEnv::load(&self.cfg.boot.grubenv)?;
        let ab = AbState::from_env(&env);
        Ok((env, ab))
    }

    /// Writes the A/B variables, only if they changed (the block usually
    /// lives on FAT flash: a boot without news writes nothing).
    fn store_ab(&self, mut env: GrubEnv, ab: &AbState) -> anyhow::Result<()> {
        let before = env.clone();
        ab.apply_to(&mut env);
        if env == before && self.cfg.boot.grubenv.exists() {
            return Ok(());
        }
        env.store(&self.cfg.boot.grubenv)
    }

    fn report(&self, kind: EventKind, t: &Target, message: Option<String>) {
        let Ok(Some(c)) = self.credentials() else {
            return;
        };
        let ev = EventRequest {
            kind,
            version: t.version.clone(),
            digest: t.digest.clone(),
            message,
            booted_slot: self.booted().ok().map(|s| s.name().to_string()),
            host: self.host_status().ok(),
        };
        // Reports are best effort: an upgrade never waits on the server.
        if let Err(e) = self.server.event(&c.device_id, &c.token, &ev) {
            crate::log(&format!("reporting {} failed: {e:#}", kind.as_str()));
        }
    }

    /// Why the agent waits for a reboot, if it does: a slot was staged, or
    /// the booted slot failed its assessment, in this very boot. Nothing is
    /// written until the boot id changes.
    pub fn awaited_reboot(&self) -> anyhow::Result<Option<String>> {
        let Some((boot_id, why)) = self.store.data.update.awaits_reboot() else {
            return Ok(None);
        };
        Ok((boot_id == self.boot_id()?).then_some(why))
    }

    /// Asks for the reboot (the configured command, e.g. `systemctl reboot`,
    /// which returns before the machine goes down).
    pub fn request_reboot(&self) -> anyhow::Result<()> {
        failpoint::hit("command: reboot");
        run_cmd(&self.cfg.boot.reboot).context("running the reboot command")
    }

    /// Refuses to go on while a reboot is awaited.
    fn refuse_if_rebooting(&mut self, what: &str) -> anyhow::Result<()> {
        if let Some(why) = self.awaited_reboot()? {
            return Err(self.store.refuse(
                what,
                format!("waiting for the reboot {why} asked for in this boot; nothing is written until then"),
            ));
        }
        Ok(())
    }

    /// The guard before a slot is written: no reboot awaited, and the
    /// booted slot known good (not on trial, not marked bad), so the slot
    /// GRUB falls back to is never the one written. Answers the slot to write.
    fn may_write(&mut self, target: &Target) -> anyhow::Result<Slot> {
        let what = format!("writing {}", target.version);
        self.refuse_if_rebooting(&what)?;
        if let UpdateState::Staged { slot, .. } | UpdateState::Failed { slot, .. } =
            self.store.data.update
        {
            return Err(self.store.refuse(
                &what,
                format!("slot {slot} awaits its boot assessment since the reboot: run `sluice-agent mark-good` (the boot-assessment service) first"),
            ));
        }
        let booted = self.booted()?;
        let (_, ab) = self.ab()?;
        if !ab.is_known_good(booted) {
            let why = match ab.slot_boot(booted) {
                sluice_protocol::SlotBoot::Bad => "is marked bad",
                _ => "is on trial (not yet assessed: run mark-good)",
            };
            return Err(self.store.refuse(
                &what,
                format!(
                    "the booted slot {booted} {why}; a slot is written only from a known-good one"
                ),
            ));
        }
        Ok(booted.other())
    }

    /// One verified resolution: the checked answer.
    pub fn check(&mut self) -> anyhow::Result<ResolveResponse> {
        let mut c = self.enroll()?;
        let booted = self.booted()?;
        let current = self.store.data.slot(booted).cloned();
        let nonce = nonce();
        let mut renewed = false;
        let (body, sig) = loop {
            match self.server.resolve(
                &self.cfg.product,
                &self.cfg.channel,
                &c.token,
                &self.cfg.arch,
                current.as_ref().map(|t| t.digest.as_str()),
                &nonce,
                self.trust.version(),
                self.store.data.last_serial,
            ) {
                // The token was refused (reset, server restarted with a new
                // secret): renew it with the device key, once.
                Err(e) if !renewed && crate::identity::is_unauthorized(&e) => {
                    crate::log(&format!("{e:#}: renewing the device token"));
                    renewed = true;
                    c = self.enroll_with(true)?;
                }
                r => break r?,
            }
        };
        let answer = self.trust.verify_answer(
            &self.server,
            &sig,
            &body,
            &Expect {
                device_id: &c.device_id,
                nonce: &nonce,
                now: OffsetDateTime::now_utc(),
                last_serial: self.store.data.last_serial,
                product: &self.cfg.product,
                channel: &self.cfg.channel,
                arch: &self.cfg.arch,
                current: current.as_ref().map(|t| t.digest.as_str()),
            },
        )?;
        self.store.data.last_serial = Some(answer.serial);
        self.store.data.last_poll_after_s = Some(answer.poll_after_s);
        self.store.save()?;
        if !answer.retry.is_empty() {
            // Only a verified answer for this very question gets here.
            self.forget_failures(&answer.retry, ClearedBy::Admin)?;
        }
        Ok(answer)
    }

    /// What `check` would lead `apply` to do with an answer: the offer it
    /// would write, or why not.
    pub fn offer_in(&mut self, answer: &ResolveResponse) -> anyhow::Result<Offered> {
        let booted = self.booted()?;
        let current = self.store.data.slot(booted).cloned();
        let Some(offer) = check_offer(
            self.trust.keys(),
            answer,
            &self.cfg.product,
            current.as_ref().map(|t| t.version.as_str()),
        )?
        else {
            return Ok(Offered::UpToDate);
        };
        let target = Target {
            version: offer.version.clone(),
            digest: offer.digest.clone(),
            image: offer.image.clone(),
        };
        Ok(if self.store.data.failed_digests.contains(&target.digest) {
            Offered::FailedHere(target)
        } else {
            Offered::Update(target)
        })
    }

    /// Forgets that these digests failed here (those it holds), so they are
    /// installed again when offered, and tells the server, which records it
    /// in the device's events and the audit log. Answers the digests that
    /// were held.
    pub fn forget_failures(
        &mut self,
        digests: &[String],
        by: ClearedBy,
    ) -> anyhow::Result<Vec<String>> {
        let held: Vec<String> = self
            .store
            .data
            .failed_digests
            .iter()
            .filter(|d| digests.contains(d))
            .cloned()
            .collect();
        if !held.is_empty() {
            self.store.data.failed_digests.retain(|d| !held.contains(d));
            self.store.save()?;
            let who = match by {
                ClearedBy::Admin => "as an admin asked",
                ClearedBy::Local => "by clear-failed on this device",
            };
            crate::log(&format!(
                "cleared from the failed list {who}: {}",
                held.join(", ")
            ));
        }
        // An admin's request is confirmed even for digests not held (so the
        // server stops asking); a local clear is told only when it changed
        // something.
        let told = if by == ClearedBy::Admin {
            digests.to_vec()
        } else {
            held.clone()
        };
        if !told.is_empty()
            && let Some(c) = self.credentials()?
            && let Err(e) = self.server.failures_cleared(
                &c.device_id,
                &c.token,
                &FailuresCleared { digests: told, by },
            )
        {
            crate::log(&format!(
                "telling the server of the cleared failures failed: {e:#}"
            ));
        }
        Ok(held)
    }

    /// `sluice-agent clear-failed [DIGEST]`: forgets one digest's failure, or
    /// all of them. Refuses a digest the device does not hold as failed.
    pub fn clear_failed(&mut self, only: Option<&str>) -> anyhow::Result<Vec<String>> {
        let all = self.store.data.failed_digests.clone();
        let digests = match only {
            None => all,
            Some(d) if all.iter().any(|f| f == d) => vec![d.to_string()],
            Some(d) => bail!(
                "{d} is not on this device's failed list ({})",
                if all.is_empty() {
                    "the list is empty".to_string()
                } else {
                    format!("it holds {}", all.join(", "))
                }
            ),
        };
        self.forget_failures(&digests, ClearedBy::Local)
    }

    /// Check and, if an update is offered, write it into the other slot
    /// (`ready`), and arm it and ask for the reboot when the reboot policy
    /// allows it; in `ready`, decide again (the same release stays, another
    /// one is written instead, one no longer offered is forgotten). Refused
    /// while a reboot is awaited or the booted slot is not known good.
    pub fn apply(&mut self) -> anyhow::Result<Outcome> {
        self.adopt_armed()?;
        self.refuse_if_rebooting("apply")?;
        if matches!(
            self.store.data.update,
            UpdateState::Idle | UpdateState::Writing { .. }
        ) {
            // Held for the last reboot: its assessment is over.
            self.release_lease();
        }
        let mut answer = self.check()?;
        let mut wrote = false;
        loop {
            let offered = self.offer_in(&answer)?;
            if let UpdateState::Ready { target, slot, seal } = self.store.data.update.clone() {
                match &offered {
                    Offered::Update(t) if t.digest == target.digest => {
                        match self.still_sealed(&target, slot, &seal) {
                            Ok(()) => return self.decide(target, slot, &answer, false),
                            Err(e) if wrote => return Err(e),
                            Err(e) => crate::log(&format!("{e:#}: writing it again")),
                        }
                    }
                    Offered::Update(t) => crate::log(&format!(
                        "{} is offered instead of the staged {}: writing it into slot {slot}",
                        t.version, target.version
                    )),
                    Offered::UpToDate | Offered::FailedHere(_) => {
                        self.forget(&target, slot)?;
                        self.release_lease();
                    }
                }
            }
            let target = match offered {
                Offered::UpToDate => return Ok(Outcome::UpToDate),
                Offered::FailedHere(target) => {
                    crate::log(&format!(
                        "not applying {} ({}): it failed its boot assessment on this device \
                         (`sluice-agent clear-failed {}` or an admin's retry clears that)",
                        target.version, target.digest, target.digest
                    ));
                    return Ok(Outcome::Skipped(target));
                }
                Offered::Update(target) => target,
            };
            self.write(&target)?;
            wrote = true;
            if answer.expires_at <= OffsetDateTime::now_utc() {
                // The write outlasted the answer, which must not be acted
                // on any more: ask again before following its advice.
                answer = self.check()?;
            }
        }
    }

    /// Writes `target` into the slot that is not booted and verifies it:
    /// `ready`, GRUB unchanged (the slot stays unbootable).
    fn write(&mut self, target: &Target) -> anyhow::Result<()> {
        let slot = self.may_write(target)?;
        crate::log(&format!(
            "update to {} ({}) into slot {slot}",
            target.version, target.digest
        ));

        // The state says the slot is no longer what it held before GRUB
        // learns it, and GRUB never picks it while it is half written.
        self.store.data.set_slot(slot, None);
        self.store.data.waiting = None;
        self.store.transition(
            Step::Write,
            UpdateState::Writing {
                target: target.clone(),
                slot,
                boot_id: self.boot_id()?,
            },
        )?;
        let (env, mut ab) = self.ab()?;
        ab.invalidate(slot);
        self.store_ab(env, &ab)?;
        self.report(
            EventKind::DownloadStarted,
            target,
            Some(format!("slot {slot}")),
        );
        failpoint::hit("slot: write");
        if let Err(e) = self.write_slot(target, slot) {
            let msg = format!("{e:#}");
            self.store.data.last_result = Some(format!("failed {}: {msg}", target.version));
            self.store
                .transition(Step::WriteFailed, UpdateState::Idle)?;
            self.report(EventKind::Failed, target, Some(msg));
            return Err(e);
        }
        failpoint::hit("slot: written");
        let seal = crate::slot::seal(self.cfg.slots.kind, self.cfg.slot_path(slot))?;
        self.store.data.set_slot(slot, Some(target.clone()));
        self.store.transition(
            Step::Written,
            UpdateState::Ready {
                target: target.clone(),
                slot,
                seal,
            },
        )?;
        self.report(EventKind::Downloaded, target, None);
        Ok(())
    }

    /// Whether the ready `slot` still holds the `target` verified into it:
    /// the state records it there, it is not the booted slot, the booted
    /// one is known good, and its seal ([`crate::slot::seal`]) is unchanged.
    fn still_sealed(&self, target: &Target, slot: Slot, seal: &str) -> anyhow::Result<()> {
        if self.store.data.slot(slot) != Some(target) {
            bail!(
                "the state no longer records {} in slot {slot}",
                target.version
            );
        }
        let booted = self.booted()?;
        let (_, ab) = self.ab()?;
        if booted == slot || !ab.is_known_good(booted) {
            bail!("slot {booted} booted, not the known-good slot beside the staged slot {slot}");
        }
        let now = crate::slot::seal(self.cfg.slots.kind, self.cfg.slot_path(slot))?;
        if now != seal {
            bail!(
                "slot {slot} changed since {} was verified into it",
                target.version
            );
        }
        Ok(())
    }

    /// In `ready`, offered the same release: arm and reboot if the policy
    /// allows it now (`manual`: a person asked, windows do not hold it
    /// back), else say what it waits for.
    fn decide(
        &mut self,
        target: Target,
        slot: Slot,
        answer: &ResolveResponse,
        manual: bool,
    ) -> anyhow::Result<Outcome> {
        let advice = answer.reboot.as_ref();
        let wait = match self.cfg.boot.reboot_policy {
            _ if manual => None,
            RebootPolicy::Manual => Some((
                format!(
                    "staged {}, waits for a manual reboot (sluice-agent reboot)",
                    target.version
                ),
                None,
            )),
            RebootPolicy::Window => advice
                .filter(|a| !a.allowed)
                .map(|a| (window_wait(&target.version, a), a.opens_at)),
            RebootPolicy::Immediate => None,
        };
        if let Some((why, retry_at)) = wait {
            // A lease taken before a crash is not kept while waiting.
            self.release_lease();
            return self.wait(&target, why, retry_at);
        }
        if let Some(group) = advice.and_then(|a| a.lease_group.as_deref())
            && let Some(refused) = self.take_lease(group)?
        {
            let why = format!(
                "staged {}, waits for reboot lease ({refused})",
                target.version
            );
            return self.wait(&target, why, None);
        }
        self.arm(target.clone(), slot)?;
        Ok(Outcome::Rebooting(target))
    }

    /// Says what the ready release waits for: logged, kept in the state for
    /// `status`, and reported as a `staged` event when it changed.
    fn wait(
        &mut self,
        target: &Target,
        why: String,
        retry_at: Option<OffsetDateTime>,
    ) -> anyhow::Result<Outcome> {
        if self.store.data.waiting.as_deref() != Some(why.as_str()) {
            crate::log(&why);
            self.store.data.waiting = Some(why.clone());
            self.store.save()?;
            self.report(EventKind::Staged, target, Some(why.clone()));
        }
        Ok(Outcome::Waiting {
            target: target.clone(),
            why,
            retry_at,
        })
    }

    /// Takes a reboot lease in `group` (`POST /v1/pre-reboot`): `None` when
    /// held, else the server's reason in words.
    fn take_lease(&mut self, group: &str) -> anyhow::Result<Option<String>> {
        if group.is_empty()
            || group.len() > 253
            || !group
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            bail!(
                "the server names the lease group {:?}, which is not a FleetLock group \
                 (1 to 253 characters of a-z A-Z 0-9 . -): not rebooting",
                crate::client::one_line(group, 80)
            );
        }
        let c = self.enroll()?;
        if self.store.data.lease.as_deref() != Some(group) {
            // One lease at a time: one of another group goes back first.
            self.release_lease();
            // Durable before asking: a crash after the server granted it
            // still gives it back.
            self.store.data.lease = Some(group.to_string());
            self.store.save()?;
        }
        failpoint::hit("command: pre-reboot");
        match self.server.pre_reboot(&c.device_id, &c.token, group)? {
            Lease::Done => {
                crate::log(&format!("took the reboot lease in group {group}"));
                Ok(None)
            }
            Lease::Refused(why) => {
                self.store.data.lease = None;
                self.store.save()?;
                Ok(Some(why))
            }
        }
    }

    /// Gives back the reboot lease the state says may be held
    /// (`POST /v1/steady-state`). Best effort: tried again at every turn
    /// until the server confirms, and never in the boot assessment's way.
    pub fn release_lease(&mut self) {
        let Some(group) = self.store.data.lease.clone() else {
            return;
        };
        let Ok(Some(c)) = self.credentials() else {
            return;
        };
        failpoint::hit("command: steady-state");
        match self.server.steady_state(&c.device_id, &c.token, &group) {
            Ok(Lease::Done) => {
                self.store.data.lease = None;
                match self.store.save() {
                    Ok(()) => crate::log(&format!("gave back the reboot lease in group {group}")),
                    Err(e) => crate::log(&format!("forgetting the reboot lease: {e:#}")),
                }
            }
            Ok(Lease::Refused(why)) => crate::log(&format!(
                "giving back the reboot lease in group {group} refused: {why}; trying again at the next poll"
            )),
            Err(e) => crate::log(&format!(
                "giving back the reboot lease in group {group}: {e:#}; trying again at the next poll"
            )),
        }
    }

    /// The server no longer offers the ready release: back to idle; the
    /// slot stays unbootable and no longer counts as holding it.
    fn forget(&mut self, target: &Target, slot: Slot) -> anyhow::Result<()> {
        crate::log(&format!(
            "the server no longer offers the staged {}: forgetting it",
            target.version
        ));
        self.store.data.set_slot(slot, None);
        self.store.data.waiting = None;
        self.store.data.last_result = Some(format!(
            "forgot the staged {}: no longer offered",
            target.version
        ));
        self.store.transition(Step::Forget, UpdateState::Idle)
    }

    /// The ready slot is armed: GRUB boots it next, on trial (the booted
    /// slot is the fallback), then the state says so, then the reboot.
    fn arm(&mut self, target: Target, slot: Slot) -> anyhow::Result<()> {
        let (env, mut ab) = self.ab()?;
        ab.stage(slot);
        self.store_ab(env, &ab)?;
        self.store.data.waiting = None;
        let boot_id = self.boot_id()?;
        self.staged(target.clone(), slot, boot_id)?;
        self.report(EventKind::Applied, &target, Some(format!("slot {slot}")));
        self.report(EventKind::Rebooting, &target, None);
        self.request_reboot()
    }

    /// `sluice-agent reboot`: boots the ready release now, whatever the
    /// policy and the windows say, after taking the reboot lease when the
    /// server names a lease group. Refused when nothing is ready, when the
    /// server no longer offers it, or when the lease is not granted.
    pub fn reboot_now(&mut self) -> anyhow::Result<Target> {
        self.adopt_armed()?;
        self.refuse_if_rebooting("reboot")?;
        let UpdateState::Ready { target, slot, seal } = self.store.data.update.clone() else {
            let state = self.store.data.update.name();
            return Err(self.store.refuse(
                "reboot",
                format!("nothing is staged to reboot into (state {state}): `sluice-agent apply` stages the offered release"),
            ));
        };
        let answer = self.check()?;
        let now = match self.offer_in(&answer)? {
            Offered::Update(t) if t.digest == target.digest => None,
            Offered::Update(t) => Some(format!("it offers {} now", t.version)),
            Offered::UpToDate | Offered::FailedHere(_) => Some("it offers nothing newer".into()),
        };
        if let Some(now) = now {
            return Err(self.store.refuse(
                "reboot",
                format!(
                    "the server no longer offers the staged {} ({now}): `sluice-agent apply` follows it",
                    target.version
                ),
            ));
        }
        if let Err(e) = self.still_sealed(&target, slot, &seal) {
            return Err(self.store.refuse(
                "reboot",
                format!("{e:#}: `sluice-agent apply` writes it again"),
            ));
        }
        match self.decide(target, slot, &answer, true)? {
            Outcome::Rebooting(t) => Ok(t),
            Outcome::Waiting { why, .. } => Err(self.store.refuse("reboot", why)),
            other => bail!("unexpected {other:?}"),
        }
    }

    /// The agent died after GRUB was armed for a complete slot (`ready`,
    /// or `writing` in a state file of an agent before download-only
    /// staging) and before the state said so: it is staged, in this boot
    /// unless the slot already booted (or spent its try).
    fn adopt_armed(&mut self) -> anyhow::Result<()> {
        let (target, slot) = match &self.store.data.update {
            UpdateState::Writing { target, slot, .. } | UpdateState::Ready { target, slot, .. } => {
                (target.clone(), *slot)
            }
            _ => return Ok(()),
        };
        let (_, ab) = self.ab()?;
        if ab.trial() != Some(slot) || !ab.is_ok(slot) {
            return Ok(());
        }
        let boot_id = if self.booted()? == slot || ab.is_tried(slot) {
            String::new()
        } else {
            self.boot_id()?
        };
        self.store.data.waiting = None;
        self.staged(target, slot, boot_id)
    }

    /// The state says `slot` holds `target`, staged in the boot `boot_id`
    /// (empty: a boot before this one).
    fn staged(&mut self, target: Target, slot: Slot, boot_id: String) -> anyhow::Result<()> {
        self.store.data.set_slot(slot, Some(target.clone()));
        self.store.transition(
            Step::Stage,
            UpdateState::Staged {
                target,
                slot,
                boot_id,
            },
        )
    }

    fn write_slot(&self, target: &Target, slot: Slot) -> anyhow::Result<()> {
        let mut image = ImageRef::parse(&target.image)?;
        let pull_host = self.cfg.registry.pull_host(&image.host).to_string();
        if pull_host != image.host {
            crate::log(&format!("pulling {} from mirror {pull_host}", target.image));
            image.host = pull_host;
        }
        let registry = Registry::new(&self.cfg.registry)?;
        let manifest = registry.manifest(&image)?;
        // The platform and every layer's encoding are known before the slot
        // is touched.
        let platform = registry.platform(&image, &manifest)?;
        crate::registry::check_platform(&platform, &self.cfg.arch)?;
        for layer in &manifest.layers {
            crate::unpack::layer_compression(&layer.media_type)
                .map_err(|e| blob_error(e, &layer.digest))?;
        }
        // What the running slot holds, for partial pulls of zstd:chunked
        // layers. The slot about to be written loses its index first: it
        // must never describe a half-written slot.
        let index_path = |s: Slot| self.cfg.state_dir.join(format!("contents-{s}.json"));
        crate::fsutil::remove_durably(&index_path(slot))
            .with_context(|| format!("removing {}", index_path(slot).display()))?;
        let tocs = self.tables_of_contents(&registry, &image, &manifest);
        // What the slot will hold, known before the tables move into the
        // plans: written and synced beside the state now (not kept in
        // memory), put in place once the slot is whole.
        let new_index = tocs
            .iter()
            .any(Option::is_some)
            .then(|| crate::chunked::Index::stage(tocs.iter().flatten(), &index_path(slot)))
            .transpose()
            .context("writing the contents index")?;
        let mut written = Err(anyhow::anyhow!("not written"));
        if self.cfg.registry.partial_pulls && new_index.is_some() {
            let booted_root = open_root(self.cfg.booted_root(slot.other()));
            let index = crate::chunked::Index::load(&index_path(slot.other()));
            let plans: Vec<Option<Partial<'_>>> = tocs
                .into_iter()
                .map(|toc| {
                    let toc = toc?;
                    let plan = crate::chunked::plan(&toc, &index, booted_root.as_ref());
                    Some(Partial {
                        toc,
                        plan,
                        root: booted_root.as_ref(),
                    })
                })
                .collect();
            drop(index);
            let (mut copied, mut fetched, mut requests) = ((0, 0), (0, 0), 0);
            for p in plans.iter().flatten() {
                copied = (copied.0 + p.plan.copied.0, copied.1 + p.plan.copied.1);
                fetched = (fetched.0 + p.plan.fetched.0, fetched.1 + p.plan.fetched.1);
                requests += p.plan.requests.len();
            }
            crate::log(&format!(
                "partial pull: {} files ({} bytes) copied from slot {}, {} files fetched in {requests} ranges ({} bytes)",
                copied.0,
                copied.1,
                slot.other(),
                fetched.0,
                fetched.1
            ));
            written = self.write_layers(&registry, &image, &manifest, slot, plans);
            if let Err(e) = &written {
                crate::log(&format!(
                    "partial pull failed ({e:#}): pulling the whole layers"
                ));
            }
        }
        if written.is_err() {
            let none = manifest.layers.iter().map(|_| None).collect();
            written = self.write_layers(&registry, &image, &manifest, slot, none);
        }
        written?;
        if let Some(staged) = new_index {
            staged
                .commit()
                .with_context(|| format!("writing {}", index_path(slot).display()))?;
        }
        Ok(())
    }

    /// The checked tables of contents of the image's `zstd:chunked` layers
    /// (`None` for other layers, and for one whose table cannot be had or
    /// does not check out: that layer is pulled whole).
    fn tables_of_contents(
        &self,
        registry: &Registry,
        image: &ImageRef,
        manifest: &crate::registry::Manifest,
    ) -> Vec<Option<Toc>> {
        manifest
            .layers
            .iter()
            .map(|layer| {
                let loc = crate::chunked::toc_location(layer)?;
                let toc = loc
                    .map_err(anyhow::Error::from)
                    .and_then(|loc| crate::chunked::fetch_toc(registry, image, layer, &loc));
                match toc {
                    Ok(t) => Some(t),
                    Err(e) => {
                        crate::log(&format!(
                            "layer {}: no partial pull ({e:#}): pulling it whole",
                            layer.digest
                        ));
                        None
                    }
                }
            })
            .collect()
    }

    /// Empties `slot` and writes the image's layers into it: each layer
    /// pulled whole, or made from its table of contents where `partial`
    /// says. On failure the slot is emptied again.
    fn write_layers(
        &self,
        registry: &Registry,
        image: &ImageRef,
        manifest: &crate::registry::Manifest,
        slot: Slot,
        partial: Vec<Option<Partial<'_>>>,
    ) -> anyhow::Result<()> {
        let kind = self.cfg.slots.kind;
        let path = self.cfg.slot_path(slot);
        // Closed (0700) and emptied: it stays closed, and nothing in it is
        // set-id, until every layer is verified.
        let root = crate::slot::prepare(kind, path, &self.cfg.state_dir)?;
        let written = (|| {
            let max_bytes = match self.cfg.slots.max_unpacked_bytes {
                Some(m) => m,
                None => crate::slot::capacity(kind, path, &root)?,
            };
            let mut unpacker = Unpacker::new(
                &root,
                UnpackOptions {
                    allow_devices: self.cfg.slots.allow_devices,
                    max_bytes: Some(max_bytes),
                    ..UnpackOptions::default()
                },
            )?;
            // Download, digest and inflate on another thread, ahead of the
            // writes; layers are applied here, in order, each one ending
            // only once its blob (or, pulled partially, each of its files)
            // is verified.
            crate::pipeline::with_layers(
                registry,
                image,
                &manifest.layers,
                partial,
                |mut layers| {
                    for layer in &manifest.layers {
                        let mut stream = layers.next_layer()?;
                        unpacker
                            .apply(&mut stream)
                            .map_err(|e| blob_error(e, &layer.digest))?;
                    }
                    Ok(())
                },
            )?;
            unpacker.commit()?;
            crate::slot::finish(kind, &root, path)
        })();
        if let Err(e) = written {
            // What a lying registry served must not stay in the slot.
            if let Err(d) = crate::slot::discard(&root) {
                crate::log(&format!("emptying {} failed: {d:#}", root.display()));
            }
            return Err(e);
        }
        Ok(())
    }

    fn health(&self) -> anyhow::Result<()> {
        failpoint::hit("command: health");
        for check in &self.cfg.boot.health_checks {
            run_cmd(check).context("health check failed")?;
        }
        Ok(())
    }

    /// Boot assessment. A slot on trial is assessed: healthy, it becomes
    /// known good; unhealthy, it is marked bad and the reboot into the other
    /// slot asked for. Coming up in the other slot after a staging reports
    /// `rolled_back`. `always` (the `mark-good` command) also runs the checks
    /// for a known-good slot, which only reports: it stays the slot to boot.
    pub fn assess(&mut self, always: bool) -> anyhow::Result<()> {
        let booted = self.booted()?;
        self.adopt_armed()?;
        let (env, mut ab) = self.ab()?;
        if let Some(why) = self.awaited_reboot()? {
            crate::log(&format!("waiting for the reboot {why}: nothing to assess"));
            return Ok(());
        }
        match self.store.data.update.clone() {
            UpdateState::Staged { target, slot, .. } if slot == booted => {
                if ab.is_known_good(slot) {
                    // Marked good before the state could say so.
                    self.healthy(target, slot)
                } else {
                    self.assess_trial(Some(target), env, ab)
                }
            }
            UpdateState::Staged { target, slot, .. }
                if ab.slot_boot(slot) == sluice_protocol::SlotBoot::Good =>
            {
                // The staging never reached GRUB: nothing was tried.
                self.store.data.last_result = Some(format!(
                    "{} in slot {slot} was never staged",
                    target.version
                ));
                self.store.transition(Step::Cancel, UpdateState::Idle)
            }
            UpdateState::Staged { target, slot, .. } => {
                if ab.slot_boot(slot) == sluice_protocol::SlotBoot::Trial {
                    // GRUB never tried it (its switch did not reach the
                    // disk): not a failure of the release; write it again.
                    ab.invalidate(slot);
                    self.store_ab(env, &ab)?;
                    self.store.data.set_slot(slot, None);
                    self.store.data.last_result = Some(format!(
                        "{} in slot {slot} was never booted: staged again on the next poll",
                        target.version
                    ));
                    return self.store.transition(Step::Cancel, UpdateState::Idle);
                }
                // Came up in the old slot: the staged one crashed or hung.
                ab.mark_bad(slot);
                self.store_ab(env, &ab)?;
                self.store.data.record_failure(&target.digest);
                self.rolled_back(&target, slot, booted)
            }
            UpdateState::Failed { target, slot, .. } if slot != booted => {
                self.rolled_back(&target, slot, booted)
            }
            UpdateState::Failed { target, .. } => {
                // Booted the slot marked bad anyway: assess it again.
                self.assess_trial(Some(target), env, ab)
            }
            UpdateState::Idle | UpdateState::Writing { .. } | UpdateState::Ready { .. } => {
                if ab.trial() == Some(booted) {
                    let target = self.store.data.slot(booted).cloned();
                    return self.assess_trial(target, env, ab);
                }
                // A known-good slot (or one an earlier GRUB rule marked
                // tried: the check clears it). Its failing checks change
                // nothing: there is no better slot to go to.
                if !always && ab.is_known_good(booted) && !ab.is_tried(booted) {
                    return Ok(());
                }
                self.health().with_context(|| {
                    format!("slot {booted} is unhealthy (it stays the slot to boot)")
                })?;
                ab.mark_good(booted);
                self.store_ab(env, &ab)
            }
        }
    }

    /// The booted slot is on trial: its health checks decide.
    fn assess_trial(
        &mut self,
        target: Option<Target>,
        env: GrubEnv,
        mut ab: AbState,
    ) -> anyhow::Result<()> {
        let booted = self.booted()?;
        match self.health() {
            Ok(()) => {
                ab.mark_good(booted);
                self.store_ab(env, &ab)?;
                match target {
                    Some(t) => self.healthy(t, booted),
                    None => Ok(()),
                }
            }
            Err(e) => {
                ab.mark_bad(booted);
                self.store_ab(env, &ab)?;
                let msg = format!("{e:#}");
                let target = target.unwrap_or_else(|| Target {
                    version: "unknown".into(),
                    digest: "unknown".into(),
                    image: String::new(),
                });
                self.store.data.record_failure(&target.digest);
                self.store.data.last_result = Some(format!("failed {}: {msg}", target.version));
                self.store.transition(
                    Step::AssessmentFailed,
                    UpdateState::Failed {
                        target: target.clone(),
                        slot: booted,
                        boot_id: self.boot_id()?,
                    },
                )?;
                self.report(EventKind::Failed, &target, Some(msg.clone()));
                self.request_reboot()?;
                bail!(
                    "slot {booted} is unhealthy ({msg}): marked bad, rebooting into slot {}",
                    booted.other()
                )
            }
        }
    }

    /// GRUB fell back from `slot` to `booted`: back to idle, and
    /// `rolled_back` reported.
    fn rolled_back(&mut self, target: &Target, slot: Slot, booted: Slot) -> anyhow::Result<()> {
        self.store.data.last_result = Some(format!("rolled back from {}", target.version));
        self.store.transition(Step::FellBack, UpdateState::Idle)?;
        // Reports follow the transition, so the host status sent with them
        // is the one the device now has.
        self.report(
            EventKind::RolledBack,
            target,
            Some(format!("booted slot {booted}, not {slot}")),
        );
        Ok(())
    }

    fn healthy(&mut self, target: Target, slot: Slot) -> anyhow::Result<()> {
        self.store.data.set_slot(slot, Some(target.clone()));
        self.store.data.last_result = Some(format!("healthy {}", target.version));
        self.store.transition(Step::Healthy, UpdateState::Idle)?;
        self.report(EventKind::Healthy, &target, None);
        Ok(())
    }

    /// Makes the other slot primary, if it holds a complete image, and
    /// reboots into it. The slot boots on trial like a fresh update: the
    /// boot assessment then reports `healthy` for its release (so the server
    /// learns what the device runs) or falls back.
    pub fn rollback(&mut self) -> anyhow::Result<Slot> {
        self.adopt_armed()?;
        self.refuse_if_rebooting("rollback")?;
        let booted = self.booted()?;
        let other = booted.other();
        match &self.store.data.update {
            UpdateState::Writing { .. } => {
                return Err(self.store.refuse(
                    "rollback",
                    format!("slot {other} is being written: nothing to roll back to"),
                ));
            }
            UpdateState::Ready { target, .. } => {
                let v = target.version.clone();
                return Err(self.store.refuse(
                    "rollback",
                    format!("slot {other} holds the staged {v}, which never ran here, not an earlier release: nothing to roll back to (`sluice-agent reboot` boots {v})"),
                ));
            }
            _ => {}
        }
        let (env, mut ab) = self.ab()?;
        if !ab.is_known_good(booted) {
            return Err(self.store.refuse(
                "rollback",
                format!("the booted slot {booted} is not known good (on trial or marked bad): its assessment decides"),
            ));
        }
        let Some(target) = self.store.data.slot(other).cloned() else {
            return Err(self.store.refuse(
                "rollback",
                format!("slot {other} holds no complete image: nothing to roll back to"),
            ));
        };
        // GRUB first, as for an update: a crash in between leaves the other
        // slot on trial, which the assessment after a boot handles.
        ab.stage(other);
        self.store_ab(env, &ab)?;
        self.store.data.last_result =
            Some(format!("rollback to slot {other} ({})", target.version));
        self.store.transition(
            Step::Rollback,
            UpdateState::Staged {
                target: target.clone(),
                slot: other,
                boot_id: self.boot_id()?,
            },
        )?;
        self.report(
            EventKind::Rebooting,
            &target,
            Some(format!("rollback to slot {other}")),
        );
        self.request_reboot()?;
        Ok(other)
    }

    /// `booted / staged / rollback`, as bootc shows a host.
    pub fn host_status(&self) -> anyhow::Result<HostStatus> {
        let booted = self.booted().ok();
        let (_, ab) = self.ab()?;
        let slot_status = |s: Slot, t: Option<&Target>| SlotStatus {
            slot: s.name().to_string(),
            version: t.map(|t| t.version.clone()),
            digest: t.map(|t| t.digest.clone()),
            boot: ab.slot_boot(s),
        };
        let staged = match &self.store.data.update {
            UpdateState::Writing { target, slot, .. }
            | UpdateState::Ready { target, slot, .. }
            | UpdateState::Staged { target, slot, .. }
                if Some(*slot) != booted =>
            {
                Some(slot_status(*slot, Some(target)))
            }
            _ => None,
        };
        // The known-good slot GRUB falls back to (its release may be
        // unknown: the factory image).
        let rollback = booted.map(Slot::other).filter(|s| {
            ab.is_known_good(*s) && staged.as_ref().is_none_or(|st| st.slot != s.name())
        });
        Ok(HostStatus {
            state: self.store.data.update.name().to_string(),
            reboot_pending: self.awaited_reboot().ok().flatten().is_some(),
            booted: booted.map(|s| {
                let t = match &self.store.data.update {
                    UpdateState::Staged { target, slot, .. }
                    | UpdateState::Failed { target, slot, .. }
                        if *slot == s =>
                    {
                        Some(target)
                    }
                    _ => self.store.data.slot(s),
                };
                slot_status(s, t)
            }),
            staged,
            rollback: rollback.map(|s| slot_status(s, self.store.data.slot(s))),
        })
    }

    /// What `status` prints: the host status and the agent's own facts.
    pub fn status(&self) -> anyhow::Result<Status> {
        let (_, ab) = self.ab()?;
        Ok(Status {
            host: self.host_status()?,
            next_boot: ab.next_boot().map(|s| s.name().to_string()),
            last_serial: self.store.data.last_serial,
            keys_version: self.trust.version(),
            last_result: self.store.data.last_result.clone(),
            device_id: self.credentials().ok().flatten().map(|c| c.device_id),
            refusals: self.store.data.refusals.clone(),
            waiting: match self.store.data.update {
                UpdateState::Ready { .. } => self.store.data.waiting.clone(),
                _ => None,
            },
            lease: self.store.data.lease.clone(),
        })
    }
}

/// What `status --json` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Slots and state, as sent with every event.
    #[serde(flatten)]
    pub host: HostStatus,
    /// The slot GRUB picks at the next boot, if any.
    pub next_boot: Option<String>,
    /// The highest resolution serial accepted.
    pub last_serial: Option<i64>,
    /// The version of the signed key list held (none: the `keys` file).
    pub keys_version: Option<u64>,
    /// The last outcome, one line.
    pub last_result: Option<String>,
    /// The enrolled device id.
    pub device_id: Option<String>,
    /// How often each step was refused.
    pub refusals: BTreeMap<String, u64>,
    /// While `ready`: what the staged release waits for, in words.
    pub waiting: Option<String>,
    /// The reboot-lease group a lease may be held in, until it is given back.
    pub lease: Option<String>,
}

/// What a ready release waits for when the server's advice holds it back:
/// `staged 1.3.0, waits for window Sat 02:00–04:00 Europe/Berlin (opens
/// 2027-03-27 01:00 UTC)`.
pub fn window_wait(version: &str, advice: &RebootAdvice) -> String {
    let window = match &advice.window {
        Some(w) => format!("window {}", crate::client::one_line(w, 200)),
        None => "a maintenance window".to_string(),
    };
    let opens = advice
        .opens_at
        .map(|t| format!(" (opens {})", utc_minute(t)))
        .unwrap_or_default();
    format!("staged {version}, waits for {window}{opens}")
}

/// `2027-03-27 01:00 UTC`.
fn utc_minute(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// What the daemon does after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Poll again after about this long.
    Poll(Duration),
    /// Poll again after this long exactly (no jitter): a maintenance
    /// window opens then.
    PollAt(Duration),
    /// A reboot is awaited: do nothing; ask for it again after this long
    /// when asking failed.
    AwaitReboot(Option<Duration>),
}

/// The daemon (`run`): the boot assessment, then turns of polling and
/// applying; once a reboot was asked for, turns only wait for it.
pub struct Daemon {
    backoff: Duration,
    reboot_asked: bool,
}

const BACKOFF_MIN: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(3600);

impl Daemon {
    /// Starts: assesses the booted slot (as `run` begins).
    pub fn start(dev: &mut Device) -> Daemon {
        if let Err(e) = dev.assess(false) {
            crate::log(&format!("boot assessment: {e:#}"));
        }
        Daemon {
            backoff: BACKOFF_MIN,
            reboot_asked: false,
        }
    }

    fn back_off(&mut self) -> Duration {
        let w = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        w
    }

    /// One turn.
    pub fn turn(&mut self, dev: &mut Device) -> Turn {
        match dev.awaited_reboot() {
            Ok(Some(why)) => {
                if self.reboot_asked {
                    return Turn::AwaitReboot(None);
                }
                // Asked again after a restart in the same boot, or after
                // the command failed: `systemctl reboot` twice is harmless.
                return match dev.request_reboot() {
                    Ok(()) => {
                        self.reboot_asked = true;
                        crate::log(&format!("waiting for the reboot {why}"));
                        Turn::AwaitReboot(None)
                    }
                    Err(e) => {
                        let w = self.back_off();
                        crate::log(&format!(
                            "{e:#}; waiting for the reboot {why}, asking again in about {}s",
                            w.as_secs()
                        ));
                        Turn::AwaitReboot(Some(w))
                    }
                };
            }
            Ok(None) => {}
            Err(e) => {
                let w = self.back_off();
                crate::log(&format!("{e:#}; retrying in about {}s", w.as_secs()));
                return Turn::Poll(w);
            }
        }
        match dev.apply() {
            Ok(Outcome::Rebooting(t)) => {
                self.reboot_asked = true;
                crate::log(&format!("waiting for the reboot into {}", t.version));
                Turn::AwaitReboot(None)
            }
            Ok(Outcome::UpToDate | Outcome::Skipped(_)) => {
                self.backoff = BACKOFF_MIN;
                next_poll(
                    dev.store.data.last_poll_after_s,
                    None,
                    OffsetDateTime::now_utc(),
                )
            }
            Ok(Outcome::Waiting { retry_at, .. }) => {
                self.backoff = BACKOFF_MIN;
                next_poll(
                    dev.store.data.last_poll_after_s,
                    retry_at,
                    OffsetDateTime::now_utc(),
                )
            }
            Err(e) => {
                let w = self.back_off();
                crate::log(&format!(
                    "update failed: {e:#}; retrying in about {}s",
                    w.as_secs()
                ));
                if matches!(dev.awaited_reboot(), Ok(Some(_))) {
                    // Staged, but the reboot command failed.
                    return Turn::AwaitReboot(Some(w));
                }
                Turn::Poll(w)
            }
        }
    }
}

/// The shortest wait before asking again about a window that opens.
const MIN_WINDOW_POLL: Duration = Duration::from_secs(5);

/// When the daemon asks again: after the server's `poll_after_s` (300 s
/// when it gave none), but no later than `retry_at` (a maintenance window
/// opens), and not sooner than [`MIN_WINDOW_POLL`].
pub fn next_poll(
    poll_after_s: Option<u64>,
    retry_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Turn {
    // The server paces the fleet; 0 would mean a busy loop.
    let poll = Duration::from_secs(poll_after_s.unwrap_or(300).clamp(1, 86_400));
    let Some(at) = retry_at else {
        return Turn::Poll(poll);
    };
    let until = Duration::try_from(at - now).unwrap_or(Duration::ZERO);
    // Jitter (±10 %) could carry the poll past the opening.
    if until < poll.mul_f64(1.1) {
        Turn::PollAt(until.max(MIN_WINDOW_POLL).min(poll))
    } else {
        Turn::Poll(poll)
    }
}

fn blob_error(e: crate::unpack::UnpackError, digest: &str) -> anyhow::Error {
    // A verification failure surfaces through the unpacker as an I/O error.
    anyhow::anyhow!("layer {digest}: {e}")
}

/// The running slot's root, opened to copy files from (`None`, and every
/// file fetched, when it cannot be opened).
fn open_root(path: &std::path::Path) -> Option<std::os::fd::OwnedFd> {
    rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| {
        crate::log(&format!(
            "partial pull: cannot open {}: {e}",
            path.display()
        ))
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::RebootReason;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2027-03-26 22:00 UTC);

    /// The daemon asks again no later than a window opens, not sooner than
    /// 5 s apart, and at the server's pace otherwise.
    #[test]
    fn polls_wait_for_the_server_but_not_past_a_window() {
        let hour = Some(3600);
        assert_eq!(
            next_poll(hour, None, NOW),
            Turn::Poll(Duration::from_secs(3600))
        );
        assert_eq!(
            next_poll(None, None, NOW),
            Turn::Poll(Duration::from_secs(300))
        );
        assert_eq!(
            next_poll(Some(0), None, NOW),
            Turn::Poll(Duration::from_secs(1))
        );
        // Opens in 10 minutes: then, without jitter.
        let at = NOW + time::Duration::minutes(10);
        assert_eq!(
            next_poll(hour, Some(at), NOW),
            Turn::PollAt(Duration::from_secs(600))
        );
        // Opens in two hours: the server's hour comes first.
        let at = NOW + time::Duration::hours(2);
        assert_eq!(
            next_poll(hour, Some(at), NOW),
            Turn::Poll(Duration::from_secs(3600))
        );
        // Just past the server's pace: jitter could overshoot, so exactly it.
        let at = NOW + time::Duration::seconds(3700);
        assert_eq!(
            next_poll(hour, Some(at), NOW),
            Turn::PollAt(Duration::from_secs(3600))
        );
        // Opening now, or already past (a stale advice): not a busy loop.
        for at in [
            NOW,
            NOW - time::Duration::hours(1),
            NOW + time::Duration::seconds(1),
        ] {
            assert_eq!(
                next_poll(hour, Some(at), NOW),
                Turn::PollAt(MIN_WINDOW_POLL)
            );
        }
    }

    #[test]
    fn the_window_wait_in_words() {
        let mut a = RebootAdvice {
            allowed: false,
            reason: RebootReason::OutsideWindow,
            window: Some("Sat 02:00–04:00 Europe/Berlin".into()),
            opens_at: Some(datetime!(2027-03-27 02:00 +01:00)),
            closes_at: None,
            lease_group: None,
        };
        assert_eq!(
            window_wait("1.3.0", &a),
            "staged 1.3.0, waits for window Sat 02:00–04:00 Europe/Berlin (opens 2027-03-27 01:00 UTC)"
        );
        a.window = Some("evil\nline".into());
        a.opens_at = None;
        assert_eq!(
            window_wait("1.3.0", &a),
            "staged 1.3.0, waits for window evil line"
        );
        a.window = None;
        assert_eq!(
            window_wait("1.3.0", &a),
            "staged 1.3.0, waits for a maintenance window"
        );
    }
}
