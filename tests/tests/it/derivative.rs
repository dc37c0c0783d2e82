//! The proof that a real OS boots through Sluice: a systemd Debian 12 made
//! of container layers (`os/mkos.sh`: the foundation from Debian packages,
//! the Sluice layer with the agent and its units, and a customization layer
//! per version made the way `docker run` + `docker commit` makes one) boots
//! from slot A under SeaBIOS or OVMF, and upgrades, fails its health check,
//! crashes and loses power through the real agent, GRUB and a real Sluice
//! server. Each step is asserted on what the booted system reports on its
//! serial console (its root file system, `/etc/os-release`, the package
//! its customization added) and on the server's view of the device.
//!
//! One disk lives the whole story, first in a SeaBIOS machine, then (after
//! a power cut) in an OVMF one; consoles are kept in
//! `<target>/tmp/vm/derivative-*.log`.

use crate::machine;

use machine::{Firmware, Fleet, Release, Vm, images, say, sh, work_dir};
use sluice_tests::{agent_release_bin, upgrade_events};
use sqlx::PgPool;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A systemd boot under TCG on a busy machine, with room.
const BOOT: Duration = Duration::from_secs(300);
/// Download, unpack, mkfs.ext4 of about 160 MB in the guest, and reboot.
const WRITE: Duration = Duration::from_secs(600);
/// The machine's memory.
const MEMORY_MB: u32 = 1024;

/// The versions of the Acme OS, a derivative: what each customization
/// layer changes on top of the foundation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The factory image: the report service, `/etc/acme/motd`.
    Factory,
    /// Adds Debian's `hello` package (dpkg in a chroot) and a new motd.
    Hello,
    /// As `Hello`, and a unit that fails: `systemctl is-system-running`
    /// says `degraded`, so the agent's default health check fails.
    Broken,
    /// As `Hello`, and a unit that panics the kernel before the boot
    /// assessment.
    Crash,
}

const VERSIONS: [(&str, Change, images::Format); 5] = [
    ("1.0.0", Change::Factory, images::Format::Oci),
    // Pushed with Docker's media types, as `docker push` does.
    ("2.0.0", Change::Hello, images::Format::Docker),
    ("3.0.0", Change::Broken, images::Format::Oci),
    ("4.0.0", Change::Crash, images::Format::Oci),
    ("5.0.0", Change::Hello, images::Format::Oci),
];

fn mkos() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../os/mkos.sh")
}

fn mkos_out(args: &[&str]) -> PathBuf {
    let out = std::process::Command::new(mkos())
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running os/mkos.sh");
    assert!(out.status.success(), "os/mkos.sh {args:?} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The layers every fleet shares: the foundation and each version's
/// customization.
struct Os {
    foundation: images::Layer,
    /// Each version's customization layer and the tree it leaves (the
    /// foundation with the customization: the factory slot is made from
    /// the first).
    custom: Vec<(images::Layer, PathBuf)>,
}

fn os() -> &'static Os {
    static OS: OnceLock<Os> = OnceLock::new();
    OS.get_or_init(|| {
        let started = Instant::now();
        let tarball = mkos_out(&["foundation"]);
        let hello = mkos_out(&["deb", "hello"]);
        say(&format!(
            "derivative: foundation ready in {:.1?}",
            started.elapsed()
        ));
        let tar = std::fs::read(&tarball).unwrap();
        let foundation = gzip_layer(tar);
        let base = work_dir().join("derivative-foundation");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        sh(std::process::Command::new("tar")
            .args(["-xpf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&base));
        let custom = VERSIONS
            .iter()
            .map(|&(version, change, _)| commit(&base, version, change, &hello))
            .collect();
        say(&format!(
            "derivative: layers built in {:.1?}",
            started.elapsed()
        ));
        Os { foundation, custom }
    })
}

fn gzip_layer(tar: Vec<u8>) -> images::Layer {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    images::Layer {
        diff_id: images::digest(&tar),
        data: gz.finish().unwrap(),
    }
}

/// What a container does to the foundation to make `version`, then its
/// `docker commit`: the tree after the change and the layer that holds
/// the difference (changed and new entries, whiteouts for removed ones).
fn commit(base: &Path, version: &str, change: Change, hello: &Path) -> (images::Layer, PathBuf) {
    let root = work_dir().join(format!("derivative-{version}"));
    let _ = std::fs::remove_dir_all(&root);
    sh(std::process::Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(base)
        .arg(&root));
    let write = |rel: &str, mode: u32, text: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let enable = |unit: &str| {
        let link = root.join(format!("etc/systemd/system/multi-user.target.wants/{unit}"));
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), link).unwrap();
    };
    write(
        "etc/os-release",
        0o644,
        &format!(
            "PRETTY_NAME=\"Acme OS {version}\"\nNAME=\"Acme OS\"\nVERSION_ID=\"{version}\"\nVERSION=\"{version}\"\nID=acme\nID_LIKE=debian\n"
        ),
    );
    write(
        "etc/acme/motd",
        0o644,
        &format!(
            "{}\n",
            if change == Change::Factory {
                "factory image"
            } else {
                "customized"
            }
        ),
    );
    // What the tests read: the system's own account of this boot.
    write(
        "usr/local/sbin/acme-report",
        0o755,
        r#"#!/bin/sh
. /etc/os-release
slot=$(sed -n 's/.*sluice\.slot=\([AB]\).*/\1/p' /proc/cmdline)
greeting=$(hello 2>/dev/null || echo none)
echo "SLUICE-OS: slot $slot root $(findmnt -n -o SOURCE /) version $VERSION_ID hello \"$greeting\" motd \"$(cat /etc/acme/motd)\""
"#,
    );
    write(
        "etc/systemd/system/acme-report.service",
        0o644,
        "[Unit]\nDescription=Acme: what this boot runs\n\n[Service]\nType=oneshot\nExecStart=/usr/local/sbin/acme-report\nStandardOutput=journal+console\n\n[Install]\nWantedBy=multi-user.target\n",
    );
    enable("acme-report.service");
    // The journal on the serial console: the agent's lines show there. No
    // login prompt on it: agetty hangs the port up, which silences what
    // journald forwards.
    std::os::unix::fs::symlink(
        "/dev/null",
        root.join("etc/systemd/system/serial-getty@ttyS0.service"),
    )
    .unwrap();
    write(
        "etc/systemd/journald.conf.d/console.conf",
        0o644,
        "[Journal]\nForwardToConsole=yes\nTTYPath=/dev/ttyS0\nMaxLevelConsole=info\n",
    );
    if change != Change::Factory {
        let deb = root.join("tmp/hello.deb");
        std::fs::copy(hello, &deb).unwrap();
        sh(std::process::Command::new("chroot")
            .arg(&root)
            .args(["dpkg", "-i", "/tmp/hello.deb"]));
        std::fs::remove_file(&deb).unwrap();
    }
    match change {
        Change::Broken => {
            write(
                "etc/systemd/system/acme-broken.service",
                0o644,
                "[Unit]\nDescription=Acme 3.0.0's bug: a service that fails\n\n[Service]\nType=oneshot\nExecStart=/bin/false\n\n[Install]\nWantedBy=multi-user.target\n",
            );
            enable("acme-broken.service");
        }
        Change::Crash => {
            write(
                "etc/systemd/system/acme-crash.service",
                0o644,
                "[Unit]\nDescription=Acme 4.0.0's bug: a kernel panic before the boot assessment\nDefaultDependencies=no\nAfter=local-fs.target\nBefore=sluice-boot-assessment.service sluice-agent.service\n\n[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo \"SLUICE-OS: crashing before the boot assessment\" >/dev/console; echo c >/proc/sysrq-trigger'\n\n[Install]\nWantedBy=multi-user.target\n",
            );
            enable("acme-crash.service");
        }
        _ => {}
    }
    let tar = diff_layer(base, &root);
    (gzip_layer(tar), root)
}

/// The layer that turns tree `lower` into tree `upper`, as `docker commit`
/// writes it: every entry of `upper` that is new or differs (type, mode,
/// owner, size, modification time, link target), and an OCI whiteout
/// (`.wh.NAME`) for every entry of `lower` that `upper` lacks.
fn diff_layer(lower: &Path, upper: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    diff_dir(&mut b, lower, upper, Path::new(""));
    b.into_inner().unwrap()
}

fn diff_dir(b: &mut tar::Builder<Vec<u8>>, lower: &Path, upper: &Path, rel: &Path) {
    let names = |dir: &Path| -> std::collections::BTreeSet<std::ffi::OsString> {
        match std::fs::read_dir(dir) {
            Ok(r) => r.map(|e| e.unwrap().file_name()).collect(),
            Err(_) => Default::default(),
        }
    };
    let (low, up) = (names(&lower.join(rel)), names(&upper.join(rel)));
    for name in low.difference(&up) {
        let mut wh = std::ffi::OsString::from(".wh.");
        wh.push(name);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, rel.join(wh), std::io::empty())
            .unwrap();
    }
    for name in &up {
        let r = rel.join(name);
        let u = std::fs::symlink_metadata(upper.join(&r)).unwrap();
        let same = std::fs::symlink_metadata(lower.join(&r)).is_ok_and(|l| {
            l.file_type() == u.file_type()
                && l.mode() == u.mode()
                && (l.uid(), l.gid()) == (u.uid(), u.gid())
                && (u.is_dir() || l.size() == u.size())
                && (u.is_dir() || (l.mtime(), l.mtime_nsec()) == (u.mtime(), u.mtime_nsec()))
                && std::fs::read_link(lower.join(&r)).ok()
                    == std::fs::read_link(upper.join(&r)).ok()
        });
        if !same {
            b.append_path_with_name(upper.join(&r), &r).unwrap();
        }
        if u.is_dir() {
            diff_dir(b, lower, upper, &r);
        }
    }
}

/// The Sluice layer for this fleet's server, and the factory slot: the
/// foundation, 1.0.0's customization and the Sluice layer in one tree.
fn sluice_layer(f: &Fleet) -> (images::Layer, PathBuf) {
    let dir = work_dir().join(format!("derivative-{}-sluice", f.name));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("agent.toml");
    // The Acme OS's agent: every key but these at its default.
    let mut cfg = f.agent_config(
        "/dev/disk/by-partlabel/sluice-a",
        "/dev/disk/by-partlabel/sluice-b",
    );
    cfg.boot.grubenv = "/boot/efi/grub/grubenv".into();
    cfg.write(&toml).unwrap();
    let keys = dir.join("keys.json");
    std::fs::write(&keys, f.keys.to_string()).unwrap();
    let layer = dir.join("layer");
    sh(std::process::Command::new(mkos())
        .arg("sluice-layer")
        .arg(&layer)
        .arg(agent_release_bin())
        .arg(&toml)
        .arg(&keys));
    let factory = dir.join("factory");
    let _ = std::fs::remove_dir_all(&factory);
    sh(std::process::Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&os().custom[0].1)
        .arg(&factory));
    sh(std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", layer.display()))
        .arg(&factory));
    let tar = diff_layer(Path::new("/nonexistent"), &layer);
    (gzip_layer(tar), factory)
}

/// A fleet with the five versions published (none on the channel), and a fresh
/// disk whose slot A holds 1.0.0.
async fn fleet(pool: PgPool, name: &'static str) -> (Fleet, PathBuf) {
    let slot = machine::machine_slot().await;
    // Built before the server starts: this blocks the thread.
    let os = os();
    let mut f = Fleet::start(pool, name, Some(slot)).await;
    let (sluice, factory) = sluice_layer(&f);
    let releases: Vec<Release> = VERSIONS
        .iter()
        .zip(&os.custom)
        .map(|(&(version, _, format), (custom, _))| Release {
            version: version.to_string(),
            format,
            layers: vec![os.foundation.clone(), sluice.clone(), custom.clone()],
        })
        .collect();
    // None on the channel yet: the factory image (which the agent cannot
    // know as a release) boots, enrolls and has nothing to install.
    f.publish_as(&releases, false).await;
    let disk = work_dir().join(format!("derivative-{name}.img"));
    sh(std::process::Command::new(mkos())
        .arg("disk")
        .arg(&disk)
        .arg(&factory));
    say(&format!(
        "derivative {name}: server, images and disk ready in {:.1?}",
        f.started.elapsed()
    ));
    (f, disk)
}

/// Waits for GRUB to boot `slot` under `firmware` and for the system's
/// own report of what runs; prints how long the boot took.
async fn expect_booted(vm: &mut Vm, firmware: Firmware, slot: &str, version: &str, hello: bool) {
    let platform = match firmware {
        Firmware::Bios => "pc",
        Firmware::Uefi => "efi",
    };
    vm.expect(
        &format!("GRUB-SLUICE: booting slot {slot} ({platform})"),
        BOOT,
    )
    .await;
    let started = Instant::now();
    // p3 and p4 of the disk: the kernel mounted the slot GRUB picked.
    let device = if slot == "A" {
        "/dev/vda3"
    } else {
        "/dev/vda4"
    };
    let (greeting, motd) = if hello {
        ("Hello, world!", "customized")
    } else {
        ("none", "factory image")
    };
    vm.expect(
        &format!(
            "SLUICE-OS: slot {slot} root {device} version {version} hello \"{greeting}\" motd \"{motd}\""
        ),
        BOOT,
    )
    .await;
    say(&format!(
        "derivative: {platform} boot of slot {slot} ({version}) reached its report in {:.1?}",
        started.elapsed()
    ));
}

/// The agent is offered `version`, writes it into `slot` and stages it.
async fn expect_write(vm: &mut Vm, version: &str, slot: &str) {
    vm.expect(&format!("sluice-agent: update to {version}"), BOOT)
        .await;
    vm.expect(&format!("into slot {slot}"), BOOT).await;
    let started = Instant::now();
    vm.expect("ready -> staged", WRITE).await;
    say(&format!(
        "derivative: {version} written into slot {slot} in {:.1?}",
        started.elapsed()
    ));
}

/// One disk through a device's life, on both firmwares. Under SeaBIOS: the
/// factory boot from slot A and the upgrade to 2.0.0 (a customization layer
/// that adds a package, pushed with Docker's media types) into slot B;
/// 3.0.0, whose failed unit makes the default health check (`systemctl
/// is-system-running --wait`) fail, is marked bad and the device is back on
/// 2.0.0 (the gate counts it); 4.0.0 panics before its assessment and
/// GRUB's spent try brings 2.0.0 back. Then the power is cut while 5.0.0 is
/// written, and the disk comes back in an OVMF machine (its GRUB reads the
/// same environment block): 2.0.0 boots, and the agent completes the
/// upgrade to 5.0.0, which boots from slot A and is healthy. One machine at
/// a time: under TCG two of them on this machine's cores take as long as
/// one after the other, and most boots are SeaBIOS ones, the faster here.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn derivative_os_upgrades_and_lives_through_failures(pool: PgPool) {
    let (f, disk) = fleet(pool, "life").await;
    let fw = Firmware::Bios;
    let mut vm = Vm::boot(&disk, "derivative-bios", fw, MEMORY_MB);
    expect_booted(&mut vm, fw, "A", "1.0.0", false).await;
    // sluice-boot-assessment.service (`mark-good`) and the daemon start
    // together; either may print first.
    let at = vm.seen;
    vm.expect("slot A is good", BOOT).await;
    let good = vm.seen;
    vm.seen = at;
    vm.expect("sluice-agent: enrolled as device", BOOT).await;
    vm.seen = vm.seen.max(good);
    // The server knows the enrolled device, idle on a channel with nothing
    // to install yet (its slots are reported with its first event).
    let (view, events) = f.wait_device("the enrolled device", &vm, |_| true).await;
    assert_eq!(view["status"], "idle", "{view}");
    assert_eq!(view["head_status"]["reason"], "no_head", "{view}");
    assert!(events.is_empty(), "{events:?}");

    // 2.0.0: the upgrade.
    f.promote("2.0.0").await;
    expect_write(&mut vm, "2.0.0", "B").await;
    expect_booted(&mut vm, fw, "B", "2.0.0", true).await;
    vm.expect("slot B is good", BOOT).await;
    let (view, events) = f.wait_status("healthy", "2.0.0", &vm).await;
    assert_eq!(view["current_version"], "2.0.0", "{view}");
    assert_eq!(view["current_digest"], f.digests[1].as_str(), "{view}");
    assert_eq!(view["booted_slot"], "B", "{view}");
    assert_eq!(events, upgrade_events(&["healthy"]));

    // 3.0.0: a unit fails, so the system is degraded, the slot bad.
    f.rollout(serde_json::json!({"gate": {"max_failure_percent": 20, "min_reports": 1}}))
        .await;
    f.promote("3.0.0").await;
    expect_write(&mut vm, "3.0.0", "A").await;
    expect_booted(&mut vm, fw, "A", "3.0.0", true).await;
    vm.expect("marked bad, rebooting into slot B", BOOT).await;
    expect_booted(&mut vm, fw, "B", "2.0.0", true).await;
    f.expect_rolled_back(&vm, "3.0.0", "2.0.0", "B", 5).await;

    // 4.0.0 panics before the assessment: GRUB spent A's one try.
    f.rollout(serde_json::json!({"paused": false})).await;
    f.promote("4.0.0").await;
    expect_write(&mut vm, "4.0.0", "A").await;
    vm.expect("GRUB-SLUICE: booting slot A (pc)", BOOT).await;
    vm.expect("SLUICE-OS: crashing before the boot assessment", BOOT)
        .await;
    vm.expect("Kernel panic", BOOT).await;
    expect_booted(&mut vm, fw, "B", "2.0.0", true).await;
    let (view, events) = f.wait_status("rolled_back", "4.0.0", &vm).await;
    assert_eq!(view["current_version"], "2.0.0", "{view}");
    assert_eq!(events[11..], upgrade_events(&["rolled_back"]), "{events:?}");

    // 5.0.0: the power is cut while slot A is written.
    f.rollout(serde_json::json!({"paused": false})).await;
    f.promote("5.0.0").await;
    vm.expect("sluice-agent: update to 5.0.0", BOOT).await;
    vm.expect("-> writing", BOOT).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rest = vm.rest();
    vm.kill().await;
    assert!(
        !rest.contains("ready -> staged") && !rest.contains("-> rebooting"),
        "the write finished before the cut: {rest}"
    );
    let (_, events) = f.device().await;
    assert_eq!(events[16..], ["download_started"], "{events:?}");

    // The same disk in an OVMF machine: 2.0.0 boots, 5.0.0 is written
    // again from the start, boots and is healthy.
    let fw = Firmware::Uefi;
    let mut vm = Vm::boot(&disk, "derivative-uefi", fw, MEMORY_MB);
    expect_booted(&mut vm, fw, "B", "2.0.0", true).await;
    expect_write(&mut vm, "5.0.0", "A").await;
    expect_booted(&mut vm, fw, "A", "5.0.0", true).await;
    vm.expect("slot A is good", BOOT).await;
    let (view, events) = f.wait_status("healthy", "5.0.0", &vm).await;
    assert_eq!(view["current_digest"], f.digests[4].as_str(), "{view}");
    assert_eq!(view["booted_slot"], "A", "{view}");
    // The cut attempt's download, then the whole upgrade.
    assert_eq!(
        events[16..],
        [vec!["download_started"], upgrade_events(&["healthy"])].concat(),
        "{events:?}"
    );
    vm.kill().await;
    f.done();
}
