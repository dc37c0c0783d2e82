//! One device: the upgrade as the spec lists it, the boot assessment after
//! reboot, rollback and status. Each step is a method on [`Device`]; the
//! update state changes only through [`Store::transition_to`].

use crate::bootloader::{AbState, GrubEnv, Slot};
use crate::config::Config;
use crate::registry::{ImageRef, Registry};
use crate::server::{Expect, Server, check_offer, verify_answer};
use crate::state::{Credentials, Store, Target, UpdateState};
use crate::unpack::{UnpackOptions, Unpacker};
use anyhow::{Context, bail};
use sluice_protocol::{EnrollRequest, EventKind, EventRequest, KeySet, ResolveResponse};
use std::process::Command;
use time::OffsetDateTime;

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do: the device runs the target.
    UpToDate,
    /// A new slot was written and the device is rebooting into it.
    Rebooting(Target),
    /// The offered release already failed its boot assessment here: not
    /// applied again (a release with another digest is).
    Skipped(Target),
}

/// A device: configuration, trusted keys, state, and its two outside systems.
pub struct Device {
    /// The configuration.
    pub cfg: Config,
    keys: KeySet,
    /// The persisted state.
    pub store: Store,
    server: Server,
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
    pub fn open(cfg: Config) -> anyhow::Result<Device> {
        let keys: KeySet = serde_json::from_slice(
            &std::fs::read(&cfg.keys)
                .with_context(|| format!("reading trusted keys {}", cfg.keys.display()))?,
        )
        .with_context(|| format!("parsing trusted keys {}", cfg.keys.display()))?;
        let store = Store::open(&cfg.state_dir)?;
        let server = Server::new(&cfg.server, cfg.server_ca.as_deref())?;
        Ok(Device {
            cfg,
            keys,
            store,
            server,
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
            labels: Default::default(),
            proof: Some(proof),
        })?;
        let c = Credentials {
            device_id: resp.device_id,
            token: resp.token,
        };
        crate::fsutil::write_atomic(&self.creds_path(), &serde_json::to_vec(&c)?)?;
        std::fs::set_permissions(
            self.creds_path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
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

    fn ab(&self) -> anyhow::Result<(GrubEnv, AbState)> {
        let env = GrubEnv::load(&self.cfg.boot.grubenv)?;
        let ab = AbState::from_env(&env);
        Ok((env, ab))
    }

    fn store_ab(&self, mut env: GrubEnv, ab: &AbState) -> anyhow::Result<()> {
        ab.apply_to(&mut env);
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
        };
        // Reports are best effort: an upgrade never waits on the server.
        if let Err(e) = self.server.event(&c.device_id, &c.token, &ev) {
            crate::log(&format!("reporting {} failed: {e:#}", kind.as_str()));
        }
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
        let answer = verify_answer(
            &self.keys,
            &sig,
            &body,
            &Expect {
                device_id: &c.device_id,
                nonce: &nonce,
                now: OffsetDateTime::now_utc(),
                last_serial: self.store.data.last_serial,
            },
        )?;
        self.store.data.last_serial = Some(answer.serial);
        self.store.data.last_poll_after_s = Some(answer.poll_after_s);
        self.store.save()?;
        Ok(answer)
    }

    /// Check and, if an update is offered, apply it and reboot.
    pub fn apply(&mut self) -> anyhow::Result<Outcome> {
        let answer = self.check()?;
        let booted = self.booted()?;
        let current = self.store.data.slot(booted).cloned();
        let Some(offer) = check_offer(
            &self.keys,
            &answer,
            &self.cfg.product,
            current.as_ref().map(|t| t.version.as_str()),
        )?
        else {
            return Ok(Outcome::UpToDate);
        };
        let target = Target {
            version: offer.version.clone(),
            digest: offer.digest.clone(),
            image: offer.image.clone(),
        };
        if self.store.data.failed_digests.contains(&target.digest) {
            crate::log(&format!(
                "not applying {} ({}): it failed its boot assessment on this device",
                target.version, target.digest
            ));
            return Ok(Outcome::Skipped(target));
        }
        let slot = booted.other();
        crate::log(&format!(
            "update to {} ({}) into slot {slot}",
            target.version, target.digest
        ));

        // GRUB must not pick the slot while it is half written.
        let (env, mut ab) = self.ab()?;
        ab.invalidate(slot);
        self.store_ab(env, &ab)?;
        self.store.data.set_slot(slot, None);
        self.store.transition_to(UpdateState::Writing {
            target: target.clone(),
            slot,
        })?;
        self.report(
            EventKind::DownloadStarted,
            &target,
            Some(format!("slot {slot}")),
        );
        if let Err(e) = self.write_slot(&target, slot) {
            let msg = format!("{e:#}");
            self.report(EventKind::Failed, &target, Some(msg.clone()));
            self.store.data.last_result = Some(format!("failed {}: {msg}", target.version));
            self.store.transition_to(UpdateState::Idle)?;
            return Err(e);
        }
        self.report(EventKind::Downloaded, &target, None);

        self.store.data.set_slot(slot, Some(target.clone()));
        self.store.save()?;
        let (env, mut ab) = self.ab()?;
        ab.switch_to(slot);
        self.store_ab(env, &ab)?;
        self.store.transition_to(UpdateState::Staged {
            target: target.clone(),
            slot,
            failed: false,
        })?;
        self.report(EventKind::Applied, &target, Some(format!("slot {slot}")));
        self.report(EventKind::Rebooting, &target, None);
        run_cmd(&self.cfg.boot.reboot).context("running the reboot command")?;
        Ok(Outcome::Rebooting(target))
    }

    fn write_slot(&self, target: &Target, slot: Slot) -> anyhow::Result<()> {
        let mut image = ImageRef::parse(&target.image)?;
        let pull_host = self.cfg.registry.pull_host(&image.host).to_string();
        if pull_host != image.host {
            crate::log(&format!("pulling {} from mirror {pull_host}", target.image));
            image.host = pull_host;
        }
        let registry = Registry::new(
            &self.cfg.registry.insecure,
            self.cfg.registry.auth.as_deref(),
        )?;
        let manifest = registry.manifest(&image)?;
        // Every layer's encoding is known before the slot is touched.
        for layer in &manifest.layers {
            crate::unpack::layer_compression(&layer.media_type)
                .map_err(|e| blob_error(e, &layer.digest))?;
        }
        let path = self.cfg.slot_path(slot);
        let root = crate::slot::prepare(self.cfg.slots.kind, path, &self.cfg.state_dir)?;
        let mut unpacker = Unpacker::new(
            &root,
            UnpackOptions {
                allow_devices: self.cfg.slots.allow_devices,
                max_bytes: self.cfg.slots.max_unpacked_bytes,
                ..UnpackOptions::default()
            },
        )?;
        // Download, digest and inflate on another thread, ahead of the
        // writes; layers are applied here, in order.
        crate::pipeline::with_layers(&registry, &image, &manifest.layers, |mut layers| {
            for layer in &manifest.layers {
                let mut stream = layers.next_layer()?;
                unpacker
                    .apply(&mut stream)
                    .map_err(|e| blob_error(e, &layer.digest))?;
            }
            Ok(())
        })?;
        crate::slot::finish(self.cfg.slots.kind, &root, path)?;
        Ok(())
    }

    fn health(&self) -> anyhow::Result<()> {
        for check in &self.cfg.boot.health_checks {
            run_cmd(check).context("health check failed")?;
        }
        Ok(())
    }

    /// Boot assessment. `always`: run the checks even with no update on
    /// trial (the `mark-good` command); otherwise only a slot on trial is
    /// assessed (the start of `run`).
    pub fn assess(&mut self, always: bool) -> anyhow::Result<()> {
        let booted = self.booted()?;
        let (env, mut ab) = self.ab()?;
        match self.store.data.update.clone() {
            UpdateState::Staged { target, slot, .. } if slot != booted => {
                // Came up in the old slot with an update pending.
                ab.mark_bad(slot);
                ab.mark_good(booted);
                self.store_ab(env, &ab)?;
                self.store.data.record_failure(&target.digest);
                self.report(
                    EventKind::RolledBack,
                    &target,
                    Some(format!("booted slot {booted}, not {slot}")),
                );
                self.store.data.last_result = Some(format!("rolled back from {}", target.version));
                self.store.transition_to(UpdateState::Idle)?;
                Ok(())
            }
            UpdateState::Staged { target, slot, .. } | UpdateState::Writing { target, slot }
                if slot == booted && ab.is_ok(slot) =>
            {
                // A Writing state here means the agent died after switching
                // GRUB (which happens only once the slot is complete).
                match self.health() {
                    Ok(()) => {
                        ab.mark_good(booted);
                        self.store_ab(env, &ab)?;
                        self.store.data.set_slot(slot, Some(target.clone()));
                        self.report(EventKind::Healthy, &target, None);
                        self.store.data.last_result = Some(format!("healthy {}", target.version));
                        self.store.transition_to(UpdateState::Idle)?;
                        Ok(())
                    }
                    Err(e) => {
                        ab.mark_bad(booted);
                        self.store_ab(env, &ab)?;
                        self.store.data.record_failure(&target.digest);
                        let msg = format!("{e:#}");
                        self.report(EventKind::Failed, &target, Some(msg.clone()));
                        self.store.data.last_result =
                            Some(format!("failed {}: {msg}", target.version));
                        self.store.transition_to(UpdateState::Staged {
                            target,
                            slot,
                            failed: true,
                        })?;
                        run_cmd(&self.cfg.boot.reboot).context("running the reboot command")?;
                        bail!(
                            "slot {booted} is unhealthy ({msg}): marked bad, rebooting into slot {}",
                            booted.other()
                        )
                    }
                }
            }
            _ => {
                if !always && !ab.is_tried(booted) {
                    return Ok(());
                }
                self.health()
                    .with_context(|| format!("slot {booted} is unhealthy"))?;
                ab.mark_good(booted);
                self.store_ab(env, &ab)
            }
        }
    }

    /// Makes the other slot primary, if it holds a complete image, and
    /// reboots into it. The slot boots on trial like a fresh update: the
    /// boot assessment then reports `healthy` for its release (so the server
    /// learns what the device runs) or falls back.
    pub fn rollback(&mut self) -> anyhow::Result<Slot> {
        let booted = self.booted()?;
        let other = booted.other();
        if matches!(self.store.data.update, UpdateState::Writing { .. }) {
            bail!("slot {other} is being written: nothing to roll back to");
        }
        let Some(target) = self.store.data.slot(other).cloned() else {
            bail!("slot {other} holds no complete image: nothing to roll back to");
        };
        let (env, mut ab) = self.ab()?;
        ab.switch_to(other);
        self.store_ab(env, &ab)?;
        self.store.data.last_result =
            Some(format!("rollback to slot {other} ({})", target.version));
        self.store.transition_to(UpdateState::Staged {
            target: target.clone(),
            slot: other,
            failed: false,
        })?;
        self.report(
            EventKind::Rebooting,
            &target,
            Some(format!("rollback to slot {other}")),
        );
        run_cmd(&self.cfg.boot.reboot).context("running the reboot command")?;
        Ok(other)
    }

    /// `booted / staged / rollback`, as bootc shows a host.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let booted = self.booted().ok();
        let (_, ab) = self.ab()?;
        let slot_json = |s: Slot| {
            serde_json::json!({
                "slot": s.name(),
                "image": self.store.data.slot(s),
                "ok": ab.is_ok(s),
                "on_trial": ab.is_tried(s),
            })
        };
        let staged = match &self.store.data.update {
            UpdateState::Staged {
                target,
                slot,
                failed,
            } => serde_json::json!({
                "slot": slot.name(), "image": target, "failed": failed }),
            UpdateState::Writing { target, slot } => serde_json::json!({
                "slot": slot.name(), "image": target, "incomplete": true }),
            UpdateState::Idle => serde_json::Value::Null,
        };
        let rollback = booted
            .map(Slot::other)
            .filter(|s| ab.is_ok(*s) && self.store.data.slot(*s).is_some())
            .map(slot_json);
        Ok(serde_json::json!({
            "booted": booted.map(slot_json),
            "staged": staged,
            "rollback": rollback,
            "next_boot": ab.next_boot().map(Slot::name),
            "state": self.store.data.update.name(),
            "last_serial": self.store.data.last_serial,
            "last_result": self.store.data.last_result,
            "device_id": self.credentials().ok().flatten().map(|c| c.device_id),
        }))
    }
}

fn blob_error(e: crate::unpack::UnpackError, digest: &str) -> anyhow::Error {
    // A verification failure surfaces through the unpacker as an I/O error.
    anyhow::anyhow!("layer {digest}: {e}")
}
