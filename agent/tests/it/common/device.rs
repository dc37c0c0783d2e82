//! The simulated device every agent test drives, the one harness of the
//! agent's tests (`agent/tests/it/common`) and the end-to-end tests
//! (`tests/src/lib.rs`, which includes this file): a temporary folder with
//! two slots, a grubenv, a file standing in for `/proc/cmdline` (booted
//! from slot A, which holds a factory image no server knows), a boot id,
//! the trusted keys file, and a reboot command that records each reboot.
//! Its `agent.toml` is the agent's own [`Config`] ([`Config::in_folder`]).
//! Each harness adds how it runs the agent (`command`, `run`): a blocking
//! process in the agent's tests, an async one beside an in-process server
//! in the end-to-end tests.

use sluice_agent::bootloader::{AbState, GrubEnv, Slot};
use sluice_agent::config::{Config, SlotKind};
use std::path::PathBuf;

/// Size of each stand-in partition of a [`SlotKind::Block`] device.
pub const PARTITION_BYTES: u64 = 64 << 20;

/// The device's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Always passes.
    Passes,
    /// Always fails.
    Fails,
    /// Passes only when slot A is booted: the new image is "broken".
    OnlyInSlotA,
}

/// How to build a [`Device`].
#[derive(Debug, Clone)]
pub struct DeviceOpts {
    /// The server's base URL.
    pub server: String,
    /// Product name.
    pub product: String,
    /// Channel name.
    pub channel: String,
    /// The product's enrollment secret.
    pub enrollment_secret: String,
    /// The keys file: the body of `GET /v1/keys`.
    pub keys: String,
    /// Registries (`host:port`) reached over plain HTTP, besides the test
    /// registry (`SLUICE_TEST_REGISTRY`), which is always one.
    pub insecure: Vec<String>,
    /// Slot kind: `Dir` (folders `a`, `b`; `a/factory`), `Image` (files
    /// `a.img`, `b.img`, made by the agent) or `Block` (files `a.part`,
    /// `b.part` of [`PARTITION_BYTES`]).
    pub kind: SlotKind,
    /// Health check.
    pub health: Health,
}

/// A simulated device in a temporary folder (see the module's notes).
pub struct Device {
    dir: tempfile::TempDir,
    /// The agent's configuration file.
    pub config: PathBuf,
    /// The machine id it enrolls with.
    pub machine_id: String,
}

impl Device {
    /// Builds the device and writes its `agent.toml`.
    pub fn new(o: &DeviceOpts) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("state")).unwrap();
        let (a, b) = match o.kind {
            SlotKind::Dir => {
                std::fs::create_dir_all(p.join("a")).unwrap();
                std::fs::create_dir_all(p.join("b")).unwrap();
                std::fs::write(p.join("a/factory"), b"factory image").unwrap();
                (p.join("a"), p.join("b"))
            }
            SlotKind::Image => (p.join("a.img"), p.join("b.img")),
            SlotKind::Block => {
                for part in ["a.part", "b.part"] {
                    std::fs::File::create(p.join(part))
                        .unwrap()
                        .set_len(PARTITION_BYTES)
                        .unwrap();
                }
                (p.join("a.part"), p.join("b.part"))
            }
        };
        std::fs::write(p.join("cmdline"), "root=/dev/vda2 sluice.slot=A quiet\n").unwrap();
        std::fs::write(p.join("keys.json"), &o.keys).unwrap();
        std::fs::write(p.join("boot_id"), format!("{}\n", rand_hex())).unwrap();
        let machine_id = format!("machine-{}", rand_hex());
        let mut cfg = Config::in_folder(p, &o.server, &o.product, &o.channel);
        cfg.enrollment_secret = Some(o.enrollment_secret.clone());
        cfg.machine_id = Some(machine_id.clone());
        cfg.slots.kind = o.kind;
        (cfg.slots.a, cfg.slots.b) = (a, b);
        cfg.boot.reboot = vec![
            "sh".into(),
            "-c".into(),
            "echo reboot >> \"$0\"".into(),
            p.join("reboots").display().to_string(),
        ];
        cfg.boot.health_checks = match o.health {
            Health::Passes => vec![vec!["true".into()]],
            Health::Fails => vec![vec!["false".into()]],
            Health::OnlyInSlotA => vec![vec![
                "grep".into(),
                "-q".into(),
                "sluice.slot=A".into(),
                p.join("cmdline").display().to_string(),
            ]],
        };
        cfg.registry.insecure = o.insecure.clone();
        if let Ok(r) = std::env::var("SLUICE_TEST_REGISTRY")
            && !cfg.registry.insecure.contains(&r)
        {
            cfg.registry.insecure.push(r);
        }
        let config = p.join("agent.toml");
        cfg.write(&config).unwrap();
        Device {
            dir,
            config,
            machine_id,
        }
    }

    /// Changes the device's `agent.toml` through the agent's own type.
    pub fn edit_config(&self, change: impl FnOnce(&mut Config)) {
        let mut cfg = Config::load(&self.config).unwrap();
        change(&mut cfg);
        cfg.write(&self.config).unwrap();
    }

    /// A path inside the device's folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// How many times the reboot command ran.
    pub fn reboots(&self) -> usize {
        std::fs::read_to_string(self.path("reboots"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The grubenv's bytes (none before the agent first writes it).
    pub fn grubenv(&self) -> Option<Vec<u8>> {
        std::fs::read(self.path("grubenv")).ok()
    }

    /// The A/B variables in the grubenv.
    pub fn ab(&self) -> AbState {
        AbState::from_env(&GrubEnv::load(&self.path("grubenv")).unwrap())
    }

    /// Plays GRUB by the shipped snippet's rules and "boots" the slot it picks:
    /// the kernel command line names it and the boot id changes.
    pub fn reboot(&self) -> Slot {
        let s = sluice_agent::bootloader::boot(&self.path("grubenv"))
            .unwrap()
            .expect("GRUB found a bootable slot");
        std::fs::write(
            self.path("cmdline"),
            format!("root=/dev/vda sluice.slot={s}\n"),
        )
        .unwrap();
        std::fs::write(self.path("boot_id"), format!("{}\n", rand_hex())).unwrap();
        s
    }
}

fn rand_hex() -> String {
    let mut b = [0u8; 6];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).unwrap();
    hex::encode(b)
}
