//! Real A/B boots: a QEMU machine (SeaBIOS, GRUB with the shipped
//! `agent/grub/sluice.cfg`, a Debian kernel, an initramfs running the real
//! `sluice-agent` release binary) upgrades itself from a real Sluice server
//! (started in-process on its own test database) and the real registry,
//! both on the host's loopback, reached through QEMU's user-mode network
//! (the host is 10.0.2.2 from inside). The disk and the OS images are built
//! by `tests/vm/mkvm.sh`. Each test asserts on the serial console (which slot
//! GRUB picked, which version booted) and on the server's API.
//!
//! At most one machine per core runs at once (`machine::machine_slot`);
//! consoles are kept in `<target>/tmp/vm/*.log`.

use crate::machine;

use machine::{Fleet, Release, Vm, has_data, images, layer_of, say, sh, work_dir};

use serde_json::json;
use sluice_tests::{agent_release_bin, upgrade_events};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The test OS's versions and how each behaves (see `tests/vm/init`).
const VERSIONS: [(&str, &str); 6] = [
    ("1.0.0", "ok"),
    ("2.0.0", "ok"),
    ("3.0.0", "unhealthy"),
    ("4.0.0", "crash"),
    ("3.1.0", "unhealthy-slow-reboot"),
    ("5.0.0", "ok"),
];

/// One boot under TCG takes about 6 s; these leave room for a busy machine.
const BOOT: Duration = Duration::from_secs(120);
/// Download, unpack, mkfs.ext4 and reboot.
const WRITE: Duration = Duration::from_secs(240);

fn mkvm() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/mkvm.sh")
}

/// The OS images' root filesystems and their one-layer OCI form, built once
/// per test process.
struct OsImages {
    rootfs: Vec<PathBuf>,
    layers: Vec<images::Layer>,
}

fn os_images() -> &'static OsImages {
    static IMAGES: OnceLock<OsImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let started = Instant::now();
        let agent = agent_release_bin();
        let mut rootfs = Vec::new();
        let mut layers = Vec::new();
        for (version, behaviour) in VERSIONS {
            let dir = work_dir().join(format!("rootfs-{version}"));
            sh(std::process::Command::new(mkvm())
                .arg("rootfs")
                .arg(&dir)
                .args([version, behaviour])
                .arg(agent));
            layers.push(layer_of(&dir));
            rootfs.push(dir);
        }
        say(&format!("vm: OS images built in {:.1?}", started.elapsed()));
        OsImages { rootfs, layers }
    })
}

/// A server with the test OS's six versions published, 1.0.0 the head.
async fn fleet(pool: PgPool, name: &'static str) -> Fleet {
    let slot = machine::machine_slot().await;
    // Built before the server starts: this blocks the thread.
    let os = os_images();
    let mut f = Fleet::start(pool, name, Some(slot)).await;
    let releases: Vec<Release> = VERSIONS
        .iter()
        .zip(&os.layers)
        .map(|((version, _), layer)| Release {
            version: version.to_string(),
            format: images::Format::Oci,
            layers: vec![layer.clone()],
        })
        .collect();
    f.publish(&releases).await;
    f
}

/// This suite's disk.
trait BusyboxDisk {
    fn disk(&self) -> PathBuf;
}

impl BusyboxDisk for Fleet {
    /// A fresh disk: slot A holds 1.0.0, slot B nothing, and the persistent
    /// partition this device's agent.toml and trusted keys.
    fn disk(&self) -> PathBuf {
        let dir = work_dir();
        let persist = dir.join(format!("{}-persistent", self.name));
        let _ = std::fs::remove_dir_all(&persist);
        std::fs::create_dir_all(persist.join("sluice/state")).unwrap();
        let mut id = [0u8; 8];
        rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty()).unwrap();
        let mut cfg = self.agent_config("/dev/vda2", "/dev/vda3");
        cfg.state_dir = "/persistent/sluice/state".into();
        cfg.keys = "/persistent/sluice/keys.json".into();
        cfg.machine_id = Some(format!("vm-{}", hex::encode(id)));
        cfg.boot.reboot = vec!["/sbin/sluice-reboot".into()];
        cfg.boot.health_checks = vec![vec!["/sbin/sluice-health".into()]];
        cfg.write(&persist.join("sluice/agent.toml")).unwrap();
        std::fs::write(persist.join("sluice/keys.json"), self.keys.to_string()).unwrap();
        let disk = dir.join(format!("{}.img", self.name));
        sh(std::process::Command::new(mkvm())
            .arg("disk")
            .arg(&disk)
            .arg(&os_images().rootfs[0])
            .arg(&persist));
        disk
    }
}

/// Byte range of MBR partition `n` (1-4) of a disk image.
fn partition(disk: &Path, n: usize) -> (u64, u64) {
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(disk).unwrap(), &mut mbr).unwrap();
    let e = &mbr[446 + 16 * (n - 1)..446 + 16 * n];
    let start = u64::from(u32::from_le_bytes(e[8..12].try_into().unwrap()));
    let len = u64::from(u32::from_le_bytes(e[12..16].try_into().unwrap()));
    assert!(len > 0, "partition {n} is missing");
    (start * 512, (start + len) * 512)
}

/// GRUB boots `slot`, and the test OS in it says it runs `version`.
async fn expect_boot(vm: &mut Vm, slot: &str, version: &str) {
    vm.expect(&format!("GRUB-SLUICE: booting slot {slot}"), BOOT)
        .await;
    vm.expect(
        &format!("SLUICE-VM: booted slot {slot} version {version}"),
        BOOT,
    )
    .await;
}

/// Follows the agent from "update to `version`" through writing it into
/// `slot`, the reboot, and GRUB booting that slot into `version`.
async fn expect_upgrade(vm: &mut Vm, version: &str, slot: &str) {
    vm.expect(&format!("sluice-agent: update to {version}"), BOOT)
        .await;
    vm.expect(&format!("into slot {slot}"), BOOT).await;
    vm.expect("SLUICE-VM: rebooting", WRITE).await;
    expect_boot(vm, slot, version).await;
}

/// Still offered `version` after falling back from it (the VM's last boot
/// printed `booted`), the agent declines it: nothing written, no reboot, no
/// event beyond the `events` already reported.
async fn expect_declined(f: &Fleet, vm: &mut Vm, version: &str, booted: &str, events: usize) {
    vm.expect(&format!("sluice-agent: not applying {version}"), BOOT)
        .await;
    let rest = vm.text();
    let since_fallback = &rest[rest.rfind(booted).unwrap()..];
    assert!(
        !since_fallback.contains("update to") && !since_fallback.contains("rebooting"),
        "{version} is not retried: {since_fallback}"
    );
    assert_eq!(f.device().await.1.len(), events, "no new events");
}

/// Boots slot A (1.0.0, the factory image) and follows the agent's upgrade
/// to 2.0.0 into slot B.
async fn boot_and_upgrade_to_2(f: &Fleet, vm: &mut Vm) {
    expect_boot(vm, "A", "1.0.0").await;
    vm.expect("SLUICE-VM: health check passes", BOOT).await;
    vm.expect("sluice-agent: enrolled as device", BOOT).await;
    expect_upgrade(vm, "2.0.0", "B").await;
    vm.expect("SLUICE-VM: health check passes", BOOT).await;
    let (view, _) = f.wait_status("healthy", "2.0.0", vm).await;
    assert_eq!(view["current_version"], "2.0.0", "{view}");
    assert_eq!(view["current_digest"], f.digests[1].as_str());
    assert_eq!(view["booted_slot"], "B", "{view}");
}

/// Upgrade: slot A (1.0.0) enrolls, is offered 2.0.0, writes it into
/// partition B, switches the grubenv and reboots; GRUB boots B; the boot
/// assessment passes and the server shows the device healthy on 2.0.0.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn vm_upgrade_boots_the_new_slot(pool: PgPool) {
    let f = fleet(pool, "upgrade").await;
    f.promote("2.0.0").await;
    let mut vm = Vm::start(&f.disk(), "upgrade");
    boot_and_upgrade_to_2(&f, &mut vm).await;
    let (view, events) = f.device().await;
    assert_eq!(view["status"], "healthy", "{view}");
    assert_eq!(events, upgrade_events(&["healthy"]));
    let ch = f.channel().await;
    assert_eq!(ch["gate"]["reports"], 1, "{ch}");
    assert_eq!(ch["gate"]["failures"], 0, "{ch}");
    vm.kill().await;
    f.done();
}

/// Rollback: from 2.0.0 in slot B, 3.0.0 (whose health check fails) is
/// written into slot A and booted; the agent marks A bad and reboots; GRUB
/// boots B again; the server shows `rolled_back` on 3.0.0 with the device
/// still on 2.0.0, and the health gate counts the failure and halts the
/// rollout. The agent does not try 3.0.0 again.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn vm_failing_health_check_rolls_back(pool: PgPool) {
    let f = fleet(pool, "rollback").await;
    f.promote("2.0.0").await;
    let mut vm = Vm::start(&f.disk(), "rollback");
    boot_and_upgrade_to_2(&f, &mut vm).await;

    f.rollout(json!({"gate": {"max_failure_percent": 20, "min_reports": 1}}))
        .await;
    f.promote("3.0.0").await;
    expect_upgrade(&mut vm, "3.0.0", "A").await;
    vm.expect("SLUICE-VM: health check fails", BOOT).await;
    vm.expect("SLUICE-VM: rebooting", BOOT).await;
    expect_boot(&mut vm, "B", "2.0.0").await;

    let (view, events) = f.expect_rolled_back(&vm, "3.0.0", "2.0.0", "B", 5).await;
    assert_eq!(view["current_digest"], f.digests[1].as_str());
    let ch = f.channel().await;
    assert_eq!(ch["gate"]["reports"], 1, "one device, counted once: {ch}");

    // Resumed by an operator, the channel offers 3.0.0 again; the agent
    // declines it without writing anything or rebooting.
    vm.expect("SLUICE-VM: boot assessment exited 0", BOOT).await;
    f.rollout(json!({"paused": false})).await;
    expect_declined(
        &f,
        &mut vm,
        "3.0.0",
        "booted slot B version 2.0.0",
        events.len(),
    )
    .await;
    vm.kill().await;
    f.done();
}

/// Crash: 4.0.0's init panics the kernel before the boot assessment. GRUB
/// already spent slot B's try, so the next boot falls back to slot A, where
/// the agent reports `rolled_back`.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn vm_crash_before_assessment_falls_back(pool: PgPool) {
    let f = fleet(pool, "crash").await;
    f.promote("4.0.0").await;
    let mut vm = Vm::start(&f.disk(), "crash");
    expect_boot(&mut vm, "A", "1.0.0").await;
    expect_upgrade(&mut vm, "4.0.0", "B").await;
    vm.expect("SLUICE-VM: crashing before the boot assessment", BOOT)
        .await;
    vm.expect("Kernel panic", BOOT).await;
    expect_boot(&mut vm, "A", "1.0.0").await;

    let (view, events) = f.wait_status("rolled_back", "4.0.0", &vm).await;
    assert_eq!(view["booted_slot"], "A", "{view}");
    assert!(view["current_version"].is_null(), "never ran 4.0.0: {view}");
    assert_eq!(events, upgrade_events(&["rolled_back"]));
    let ch = f.channel().await;
    assert_eq!(ch["gate"]["failures"], 1, "{ch}");

    // Still offered 4.0.0, the agent declines it: nothing written again.
    vm.expect("SLUICE-VM: boot assessment exited 0", BOOT).await;
    expect_declined(
        &f,
        &mut vm,
        "4.0.0",
        "booted slot A version 1.0.0",
        events.len(),
    )
    .await;
    vm.kill().await;
    f.done();
}

/// Power cut: qemu is SIGKILLed while the agent writes slot B. The next
/// start boots slot A (GRUB never saw B as bootable), and the agent's
/// following attempt completes the upgrade.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn vm_power_cut_during_write_recovers(pool: PgPool) {
    let f = fleet(pool, "power-cut").await;
    f.promote("2.0.0").await;
    let disk = f.disk();
    let (b_start, b_end) = partition(&disk, 3);
    assert!(!has_data(&disk, b_start, b_end), "slot B starts as a hole");
    let mut vm = Vm::start(&disk, "power-cut-1");
    vm.expect("SLUICE-VM: booted slot A version 1.0.0", BOOT)
        .await;
    vm.expect("sluice-agent: update to 2.0.0", BOOT).await;
    // The agent has reported `download_started` and pulls. Cut the power as
    // soon as the first bytes of slot B reach the disk (the host's sparse
    // file gets data in partition B), about a second before the write ends.
    vm.expect("sluice-agent: pulling", BOOT).await;
    let deadline = Instant::now() + WRITE;
    while !has_data(&disk, b_start, b_end) {
        let rest = vm.rest();
        assert!(
            !rest.contains("ready -> staged"),
            "the write finished before any of it reached the disk: {rest}"
        );
        assert!(Instant::now() < deadline, "{}", vm.tail());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rest = vm.rest();
    vm.kill().await;
    assert!(
        !rest.contains("ready -> staged") && !rest.contains("SLUICE-VM: rebooting"),
        "the write finished before the cut: {rest}"
    );
    let (view, events) = f.device().await;
    assert_eq!(events, ["download_started"], "{view}");

    let mut vm = Vm::start(&disk, "power-cut-2");
    expect_boot(&mut vm, "A", "1.0.0").await;
    expect_upgrade(&mut vm, "2.0.0", "B").await;
    let (view, events) = f.wait_status("healthy", "2.0.0", &vm).await;
    assert_eq!(view["current_version"], "2.0.0", "{view}");
    assert_eq!(view["booted_slot"], "B", "{view}");
    // The cut attempt's download, then the whole upgrade.
    assert_eq!(
        events,
        [vec!["download_started"], upgrade_events(&["healthy"])].concat()
    );
    vm.kill().await;
    f.done();
}

/// Issue 11, item 1, as a real boot: 3.1.0 (its health check fails, and its
/// reboot command returns 20 s before the machine goes down, as `systemctl
/// reboot` returns at once) is written into slot B and booted on its one
/// try while the channel already offers 5.0.0. B fails its assessment and is
/// marked bad; until the machine has gone down the agent writes nothing
/// (slot A, now the only good slot, keeps 1.0.0) and says it waits; GRUB
/// then boots A, the agent reports `rolled_back` and installs 5.0.0 into B.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn vm_failed_trial_writes_nothing_before_its_reboot(pool: PgPool) {
    let f = fleet(pool, "failed-trial").await;
    f.promote("3.1.0").await;
    let mut vm = Vm::start(&f.disk(), "failed-trial");
    expect_boot(&mut vm, "A", "1.0.0").await;
    vm.expect("sluice-agent: update to 3.1.0", BOOT).await;
    vm.expect("into slot B", BOOT).await;
    vm.expect("SLUICE-VM: rebooting", WRITE).await;
    // The channel moves on while the machine reboots into B.
    f.promote("5.0.0").await;
    expect_boot(&mut vm, "B", "3.1.0").await;
    vm.expect("SLUICE-VM: health check fails", BOOT).await;
    let failed_at = vm.seen;
    vm.expect("SLUICE-VM: rebooting", BOOT).await;
    vm.expect("sluice-agent: waiting for the reboot", BOOT)
        .await;
    vm.expect("SLUICE-VM: going down", BOOT).await;
    let meanwhile = vm.text()[failed_at..vm.seen].to_string();
    assert!(
        !meanwhile.contains("update to") && !meanwhile.contains("-> writing"),
        "a slot was written while the reboot was awaited: {meanwhile}"
    );
    expect_boot(&mut vm, "A", "1.0.0").await;
    expect_upgrade(&mut vm, "5.0.0", "B").await;
    let (view, events) = f.wait_status("healthy", "5.0.0", &vm).await;
    assert_eq!(view["current_digest"], f.digests[5].as_str(), "{view}");
    assert_eq!(view["booted_slot"], "B", "{view}");
    assert_eq!(
        events,
        [
            upgrade_events(&["failed", "rolled_back"]),
            upgrade_events(&["healthy"])
        ]
        .concat(),
        "{events:?}"
    );
    vm.kill().await;
    f.done();
}
