//! `/etc/sluice/agent.toml` (every key in docs/agent.md), every path configurable
//! so a test can put a whole device in a temporary folder.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the configuration is read when neither `--config` nor
/// `SLUICE_AGENT_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/sluice/agent.toml";

/// The agent's configuration. It serializes back to the same TOML, which is
/// how the tests, the QEMU suites and the benchmarks write `agent.toml`
/// (from [`Config::in_folder`] and their own changes) instead of by hand.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Sluice server's base URL.
    pub server: String,
    /// PEM file of the CA the server's HTTPS certificate must chain to. When
    /// set, only this CA is trusted for the server (pinning); otherwise the
    /// system's roots are.
    #[serde(default)]
    pub server_ca: Option<PathBuf>,
    /// The product this device runs.
    pub product: String,
    /// The channel it follows.
    pub channel: String,
    /// Used once to enroll; the device token is then kept in `state_dir`.
    #[serde(default)]
    pub enrollment_secret: Option<String>,
    /// Where the agent keeps its state and token.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// OCI architecture; default: this machine's.
    #[serde(default = "default_arch")]
    pub arch: String,
    /// A saved copy of `GET /v1/keys`: the trusted image and response keys.
    #[serde(default = "default_keys")]
    pub keys: PathBuf,
    /// The machine id sent at enrollment; default: `/etc/machine-id`.
    #[serde(default)]
    pub machine_id: Option<String>,
    /// Labels sent at enrollment (`ring = "canary"`), which the server's
    /// rollout waves, maintenance windows and lease groups select by;
    /// checked by [`check_labels`] when the file is loaded.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The A/B slots.
    pub slots: Slots,
    /// Bootloader, reboot and health checks.
    pub boot: Boot,
    /// Registry access.
    #[serde(default)]
    pub registry: Registry,
}

/// What a slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    /// A directory tree.
    Dir,
    /// An ext4 image file, built without mounting.
    Image,
    /// An ext4 filesystem written to a partition device.
    Block,
}

/// `[slots]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Slots {
    /// `dir`, `image` or `block`.
    pub kind: SlotKind,
    /// Slot A's path.
    pub a: PathBuf,
    /// Slot B's path.
    pub b: PathBuf,
    /// Create device nodes found in layers (refused otherwise).
    #[serde(default)]
    pub allow_devices: bool,
    /// Most bytes an image may unpack to (tar stream after decompression).
    /// Default: what the slot can hold (the block device's size, or the free
    /// space of the file system the slot or its staging folder is on).
    #[serde(default)]
    pub max_unpacked_bytes: Option<u64>,
    /// Where the running slot's files can be read, for partial pulls to
    /// copy from. Default: the booted slot's path for `dir` slots, `/` for
    /// `image` and `block` ones (the booted slot is the root file system).
    #[serde(default)]
    pub booted_root: Option<PathBuf>,
}

/// `[boot]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// The GRUB environment block.
    #[serde(default = "default_grubenv")]
    pub grubenv: PathBuf,
    /// Where `sluice.slot=A|B` is read.
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// The reboot command.
    #[serde(default = "default_reboot")]
    pub reboot: Vec<String>,
    /// Commands that must all exit 0 for a slot to be healthy.
    #[serde(default = "default_health")]
    pub health_checks: Vec<Vec<String>>,
    /// The kernel's id of the running boot: it tells a restart of the agent
    /// from a reboot (a reboot asked for is awaited until this changes).
    #[serde(default = "default_boot_id")]
    pub boot_id: PathBuf,
    /// When the device reboots into a release it staged.
    #[serde(default)]
    pub reboot_policy: RebootPolicy,
}

/// `boot.reboot_policy`: when a staged release is booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RebootPolicy {
    /// As the server advises: inside the channel's maintenance windows (or
    /// any time when none applies), with a reboot lease when it names one.
    #[default]
    Window,
    /// As soon as it is staged, whatever the windows; still with a reboot
    /// lease when the server names a lease group.
    Immediate,
    /// Never by itself: a person runs `sluice-agent reboot`.
    Manual,
}

impl RebootPolicy {
    /// Its name in `agent.toml`.
    pub fn name(self) -> &'static str {
        match self {
            RebootPolicy::Window => "window",
            RebootPolicy::Immediate => "immediate",
            RebootPolicy::Manual => "manual",
        }
    }
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// `host:port` reached over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// Docker `config.json` with credentials, optional.
    #[serde(default)]
    pub auth: Option<PathBuf>,
    /// `host:port` → `host:port`: pull images of the first registry from
    /// the second (a mirror, or the same registry under the address this
    /// device reaches it by), as `registries.conf` mirrors do. Safe: the
    /// image is pulled by its signed digest and every blob is verified.
    /// `insecure` and `auth` apply to the address actually reached.
    #[serde(default)]
    pub mirrors: std::collections::BTreeMap<String, String>,
    /// Slow retrieval bound: every registry request (manifest, config, each
    /// blob, token) must end within `timeout_s` plus its size at
    /// `min_bytes_per_s`, or it fails and is retried at the next poll.
    #[serde(default = "default_registry_timeout_s")]
    pub timeout_s: u64,
    /// The slowest average download rate accepted, bytes a second.
    #[serde(default = "default_min_bytes_per_s")]
    pub min_bytes_per_s: u64,
    /// Pull `zstd:chunked` layers partially: fetch only the files the
    /// running slot lacks (every byte verified; any doubt means a full
    /// pull). Default true.
    #[serde(default = "default_true")]
    pub partial_pulls: bool,
}

fn default_true() -> bool {
    true
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            insecure: Vec::new(),
            auth: None,
            mirrors: Default::default(),
            timeout_s: default_registry_timeout_s(),
            partial_pulls: true,
            min_bytes_per_s: default_min_bytes_per_s(),
        }
    }
}

fn default_registry_timeout_s() -> u64 {
    60
}
fn default_min_bytes_per_s() -> u64 {
    16 << 10
}

impl Registry {
    /// Where the images of registry `host` are pulled from.
    pub fn pull_host<'a>(&'a self, host: &'a str) -> &'a str {
        self.mirrors.get(host).map_or(host, String::as_str)
    }
}

fn default_state_dir() -> PathBuf {
    "/var/lib/sluice".into()
}
fn default_keys() -> PathBuf {
    "/etc/sluice/keys.json".into()
}
fn default_grubenv() -> PathBuf {
    "/boot/grub/grubenv".into()
}
fn default_cmdline() -> PathBuf {
    "/proc/cmdline".into()
}
fn default_reboot() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}
fn default_health() -> Vec<Vec<String>> {
    vec![vec![
        "systemctl".into(),
        "is-system-running".into(),
        "--wait".into(),
    ]]
}
fn default_boot_id() -> PathBuf {
    "/proc/sys/kernel/random/boot_id".into()
}

/// This machine's architecture as OCI names it.
pub fn default_arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
    .to_string()
}

impl Config {
    /// A real device's configuration: the given server, product, channel and
    /// slots, and every other key at its default (`state_dir`
    /// `/var/lib/sluice`, `keys` `/etc/sluice/keys.json`, `systemctl reboot`,
    /// `systemctl is-system-running --wait`, ...), as `agent.toml` would
    /// leave them unsaid.
    pub fn new(
        server: &str,
        product: &str,
        channel: &str,
        kind: SlotKind,
        a: PathBuf,
        b: PathBuf,
    ) -> Config {
        Config {
            server: server.into(),
            server_ca: None,
            product: product.into(),
            channel: channel.into(),
            enrollment_secret: None,
            state_dir: default_state_dir(),
            arch: default_arch(),
            keys: default_keys(),
            machine_id: None,
            labels: BTreeMap::new(),
            slots: Slots {
                kind,
                a,
                b,
                allow_devices: false,
                max_unpacked_bytes: None,
                booted_root: None,
            },
            boot: Boot {
                grubenv: default_grubenv(),
                cmdline: default_cmdline(),
                reboot: default_reboot(),
                health_checks: default_health(),
                boot_id: default_boot_id(),
                reboot_policy: RebootPolicy::default(),
            },
            registry: Registry::default(),
        }
    }

    /// A device whose every file is inside `dir`: `dir` slots `a/` and `b/`,
    /// `state/`, `keys.json`, `grubenv`, `cmdline`, `boot_id`; a reboot that
    /// does nothing (`true`) and a health check that passes. Tests and
    /// benchmarks start from this and change what they need.
    pub fn in_folder(dir: &Path, server: &str, product: &str, channel: &str) -> Config {
        let mut c = Config::new(
            server,
            product,
            channel,
            SlotKind::Dir,
            dir.join("a"),
            dir.join("b"),
        );
        c.state_dir = dir.join("state");
        c.arch = "amd64".into();
        c.keys = dir.join("keys.json");
        c.boot = Boot {
            grubenv: dir.join("grubenv"),
            cmdline: dir.join("cmdline"),
            reboot: vec!["true".into()],
            health_checks: vec![vec!["true".into()]],
            boot_id: dir.join("boot_id"),
            reboot_policy: RebootPolicy::default(),
        };
        c
    }

    /// The configuration as `agent.toml` text, which [`Config::load`] reads back.
    pub fn to_toml(&self) -> String {
        toml::to_string(self)
            .expect("a configuration is plain TOML: strings, numbers, arrays and tables")
    }

    /// Writes it to `path` as `agent.toml`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_toml())
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        let cfg: Config = toml::from_str(&text)
            .with_context(|| format!("parsing the configuration {}", path.display()))?;
        if cfg.slots.a == cfg.slots.b {
            anyhow::bail!("slots.a and slots.b are the same path: give each slot its own");
        }
        if cfg.boot.reboot.is_empty() {
            anyhow::bail!("boot.reboot is empty: give the command that reboots this device");
        }
        check_labels(&cfg.labels)
            .with_context(|| format!("the configuration {}", path.display()))?;
        Ok(cfg)
    }

    /// The path of a slot.
    pub fn slot_path(&self, s: crate::bootloader::Slot) -> &Path {
        match s {
            crate::bootloader::Slot::A => &self.slots.a,
            crate::bootloader::Slot::B => &self.slots.b,
        }
    }

    /// Where the files of `booted`, the running slot, can be read
    /// (`slots.booted_root`).
    pub fn booted_root(&self, booted: crate::bootloader::Slot) -> &Path {
        match (&self.slots.booted_root, self.slots.kind) {
            (Some(p), _) => p,
            (None, SlotKind::Dir) => self.slot_path(booted),
            (None, _) => Path::new("/"),
        }
    }
}

/// Most labels a device may have.
pub const MAX_LABELS: usize = 32;

/// Checks labels by the server's rules, so a bad one is refused here and
/// not at enrollment: at most [`MAX_LABELS`], keys 1–63 characters of
/// `A-Z a-z 0-9 . _ / -` starting with a letter or digit, values 0–63
/// characters of `A-Z a-z 0-9 . _ -`.
pub fn check_labels(labels: &BTreeMap<String, String>) -> anyhow::Result<()> {
    if labels.len() > MAX_LABELS {
        anyhow::bail!(
            "labels: {} labels, at most {MAX_LABELS} are allowed",
            labels.len()
        );
    }
    for (k, v) in labels {
        let key_ok = (1..=63).contains(&k.len())
            && k.starts_with(|c: char| c.is_ascii_alphanumeric())
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
        if !key_ok {
            anyhow::bail!(
                "labels: key {k:?} is not a label key: 1 to 63 characters of A-Z a-z 0-9 . _ / - \
                 starting with a letter or digit"
            );
        }
        if v.len() > 63
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            anyhow::bail!(
                "labels: the value {v:?} of {k:?} is not a label value: at most 63 characters \
                 of A-Z a-z 0-9 . _ -"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test writes is what the agent reads: every field survives
    /// `to_toml` and `load`, including the ones TOML writes as tables.
    #[test]
    fn a_configuration_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::in_folder(dir.path(), "http://127.0.0.1:1", "acme", "beta");
        cfg.enrollment_secret = Some("s3cret \"quoted\"".into());
        cfg.machine_id = Some("machine-1".into());
        cfg.slots.kind = SlotKind::Image;
        cfg.slots.max_unpacked_bytes = Some(1 << 30);
        cfg.boot.health_checks = vec![vec!["grep".into(), "-q".into(), "sluice.slot=A".into()]];
        cfg.registry.insecure = vec!["127.0.0.1:5000".into()];
        cfg.registry
            .mirrors
            .insert("ghcr.io".into(), "127.0.0.1:5001".into());
        cfg.registry.partial_pulls = false;
        let path = dir.path().join("agent.toml");
        cfg.write(&path).unwrap();
        let back = Config::load(&path).unwrap();
        assert_eq!(back.to_toml(), cfg.to_toml());
        assert_eq!(back.enrollment_secret, cfg.enrollment_secret);
        assert_eq!(back.slots.a, dir.path().join("a"));
        assert_eq!(back.slots.max_unpacked_bytes, Some(1 << 30));
        assert_eq!(back.registry.pull_host("ghcr.io"), "127.0.0.1:5001");
        assert!(!back.registry.partial_pulls);
        assert_eq!(back.boot.health_checks, cfg.boot.health_checks);
    }

    /// The example of the specification.
    const SPEC_EXAMPLE: &str = r#"
server = "https://updates.example.com"
product = "acme-os"
channel = "stable"
enrollment_secret = "..."
state_dir = "/var/lib/sluice"
keys = "/etc/sluice/keys.json"

[slots]
kind = "dir"
a = "/sluice/a"
b = "/sluice/b"

[boot]
grubenv = "/boot/grub/grubenv"
cmdline = "/proc/cmdline"
reboot = ["systemctl", "reboot"]
health_checks = [["systemctl", "is-system-running", "--wait"]]

[registry]
insecure = []
auth = "/etc/sluice/registry-auth.json"
"#;

    #[test]
    fn the_spec_example_parses() {
        let cfg: Config = toml::from_str(SPEC_EXAMPLE).unwrap();
        assert_eq!(cfg.slots.kind, SlotKind::Dir);
        assert_eq!(cfg.arch, default_arch());
        assert!(toml::from_str::<Config>("server = 1").is_err());
        assert!(cfg.registry.mirrors.is_empty());
        assert_eq!(cfg.registry.pull_host("ghcr.io"), "ghcr.io");
    }

    /// Labels and the reboot policy as `agent.toml` writes them, and back.
    #[test]
    fn labels_and_the_reboot_policy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "labels = {{ ring = \"canary\", \"site/x\" = \"\" }}\n{}",
            SPEC_EXAMPLE.replace("[boot]\n", "[boot]\nreboot_policy = \"manual\"\n")
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &text).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.labels["ring"], "canary");
        assert_eq!(cfg.labels["site/x"], "");
        assert_eq!(cfg.boot.reboot_policy, RebootPolicy::Manual);
        cfg.write(&path).unwrap();
        let back = Config::load(&path).unwrap();
        assert_eq!(back.labels, cfg.labels);
        assert_eq!(back.boot.reboot_policy, RebootPolicy::Manual);
        // Left out: no labels, the window policy.
        let cfg: Config = toml::from_str(SPEC_EXAMPLE).unwrap();
        assert!(cfg.labels.is_empty());
        assert_eq!(cfg.boot.reboot_policy, RebootPolicy::Window);
        let bad = SPEC_EXAMPLE.replace("[boot]\n", "[boot]\nreboot_policy = \"sometimes\"\n");
        let e = toml::from_str::<Config>(&bad).unwrap_err().to_string();
        assert!(e.contains("window") && e.contains("manual"), "{e}");
    }

    /// The server's label rules, each side of every edge.
    #[test]
    fn labels_are_checked_as_the_server_checks_them() {
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        for (k, v) in [
            ("ring", "canary"),
            ("a", ""),
            ("k8s.io/zone-1_a", "eu-west.1_b"),
            (&"k".repeat(63), &"v".repeat(63)),
            ("9lives", "x"),
        ] {
            check_labels(&one(k, v)).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        for (k, v, want) in [
            ("", "x", "is not a label key"),
            ("-ring", "x", "is not a label key"),
            ("/ring", "x", "is not a label key"),
            ("ri ng", "x", "is not a label key"),
            ("ringé", "x", "is not a label key"),
            (&"k".repeat(64), "x", "is not a label key"),
            ("ring", "a/b", "is not a label value"),
            ("ring", "a b", "is not a label value"),
            ("ring", &"v".repeat(64), "is not a label value"),
        ] {
            let e = check_labels(&one(k, v)).unwrap_err().to_string();
            assert!(e.contains(want), "{k}={v}: {e}");
        }
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let e = check_labels(&many).unwrap_err().to_string();
        assert!(e.contains("33 labels, at most 32"), "{e}");
        check_labels(&many.into_iter().take(MAX_LABELS).collect()).unwrap();
    }

    #[test]
    fn mirrors_map_registry_hosts() {
        // `[registry]` is the example's last table.
        let text = format!(r#"{SPEC_EXAMPLE}mirrors = {{ "127.0.0.1:5000" = "10.0.2.2:5000" }}"#);
        let cfg: Config = toml::from_str(&text).unwrap();
        assert_eq!(cfg.registry.pull_host("127.0.0.1:5000"), "10.0.2.2:5000");
        assert_eq!(cfg.registry.pull_host("10.0.2.2:5000"), "10.0.2.2:5000");
    }
}
