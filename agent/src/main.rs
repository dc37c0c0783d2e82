//! `sluice-agent`: run, check, apply, reboot, status, mark-good, rollback,
//! clear-failed, enroll.
#![deny(unsafe_code)]

use anyhow::Context;
use sluice_agent::agent::{Daemon, Device, Offered, Outcome, Turn};
use sluice_agent::config::{Config, DEFAULT_PATH};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: sluice-agent [--config PATH] <run|check|apply|reboot|status [--json]|mark-good|rollback|clear-failed [DIGEST]|enroll>";

/// `check`'s exit status when `apply` would write an update (as
/// `dnf check-update`): scripts tell "update available" from "up to date" (0)
/// and from a failure (1).
const UPDATE_AVAILABLE: u8 = 100;

const HELP: &str = "\
sluice-agent: keeps this device on the release its Sluice channel names,
through A/B slots and GRUB (agent/README.md in the Sluice sources).

usage: sluice-agent [--config PATH] <command> [--json]

commands:
  run        the daemon: assess the booted slot, then poll, apply and reboot
  check      ask the server once; print what it offers, change nothing
             (exit 100 when `apply` would install an update)
  apply      check, and write an offered release into the other slot; arm
             it and ask for the reboot when boot.reboot_policy and the
             server's maintenance windows allow it (else it waits, ready)
  reboot     boot the release that waits (ready) now, whatever the windows:
             takes the reboot lease when the server asks for one
  status     the slots (booted, staged, rollback), the state, the key list
             held; --json for the whole status as the server receives it
  mark-good  assess the booted slot now (health checks): keep it, or mark it
             bad and reboot into the other one
  rollback   boot the other slot's release next, on trial
  clear-failed [DIGEST]
             forget that a release failed its boot assessment here (all of
             them without DIGEST), so `apply` installs it again when offered;
             the server records who cleared what
  enroll     enroll with the server (done by the other commands when needed)

options:
  --config PATH  the configuration (default /etc/sluice/agent.toml, or
                 $SLUICE_AGENT_CONFIG)
  --json         with status: JSON
  -h, --help     this text
  -V, --version  the agent's version and wire version

Exit status: 0 done, 1 refused or failed (one line on stderr says why),
100 from `check` when an update is available.";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line a log or a script can act on.
            eprintln!(
                "sluice-agent: error: {}",
                format!("{e:#}").replace('\n', " ")
            );
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<u8> {
    let mut args = std::env::args().skip(1);
    let mut config = std::env::var_os("SLUICE_AGENT_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let mut cmd = None;
    let mut operand = None;
    let mut json = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = args.next().context("--config needs a path")?.into(),
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(0);
            }
            "-V" | "--version" => {
                println!(
                    "sluice-agent {} (wire {})",
                    env!("CARGO_PKG_VERSION"),
                    sluice_protocol::WIRE_VERSION
                );
                return Ok(0);
            }
            c if cmd.is_none() && !c.starts_with('-') => cmd = Some(c.to_string()),
            c if cmd.as_deref() == Some("clear-failed")
                && operand.is_none()
                && !c.starts_with('-') =>
            {
                operand = Some(c.to_string())
            }
            other => anyhow::bail!("unexpected argument {other:?}; {USAGE}"),
        }
    }
    let cmd = cmd.with_context(|| USAGE.to_string())?;
    let cfg = Config::load(&config)?;
    if cmd == "run" {
        run(cfg)?;
        return Ok(0);
    }
    let mut dev = Device::open(cfg)?;
    match cmd.as_str() {
        "enroll" => {
            let c = dev.enroll()?;
            println!("enrolled: device {}", c.device_id);
        }
        "check" => {
            let a = dev.check()?;
            let down = if a.downgrade { " (downgrade)" } else { "" };
            match dev.offer_in(&a)? {
                Offered::UpToDate => println!("up to date"),
                Offered::Update(t) => {
                    println!("update available: {} {}{down}", t.version, t.digest);
                    return Ok(UPDATE_AVAILABLE);
                }
                Offered::FailedHere(t) => println!(
                    "offered {} {}{down}, which failed its boot assessment on this device: \
                     not installed again until cleared (`sluice-agent clear-failed {}`, or \
                     `sluice device retry` on the server)",
                    t.version, t.digest, t.digest
                ),
            }
        }
        "apply" => match dev.apply()? {
            Outcome::UpToDate => println!("up to date"),
            Outcome::Rebooting(t) => println!("applied {} ({}); rebooting", t.version, t.digest),
            Outcome::Waiting { why, .. } => println!("{why}"),
            Outcome::Skipped(t) => println!(
                "not applying {} ({}): it failed its boot assessment on this device \
                 (`sluice-agent clear-failed {}` clears that)",
                t.version, t.digest, t.digest
            ),
        },
        "reboot" => {
            let t = dev.reboot_now()?;
            println!("rebooting into {} ({})", t.version, t.digest);
        }
        "status" => {
            let s = dev.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let slot = |v: &Option<sluice_protocol::SlotStatus>| match v {
                    None => "-".to_string(),
                    Some(v) => format!(
                        "slot {} {} ({})",
                        v.slot,
                        v.version.as_deref().unwrap_or("(unknown image)"),
                        serde_json::to_value(v.boot)
                            .ok()
                            .and_then(|b| b.as_str().map(str::to_string))
                            .unwrap_or_default()
                    ),
                };
                println!("booted:   {}", slot(&s.host.booted));
                match (&s.host.staged, s.host.state == "ready") {
                    (Some(st), true) => println!(
                        "staged:   slot {} {} (ready: not bootable until armed)",
                        st.slot,
                        st.version.as_deref().unwrap_or("(unknown image)")
                    ),
                    _ => println!("staged:   {}", slot(&s.host.staged)),
                }
                println!("rollback: {}", slot(&s.host.rollback));
                println!(
                    "state:    {}{}",
                    s.host.state,
                    if s.host.reboot_pending {
                        " (waiting for the reboot)"
                    } else {
                        ""
                    }
                );
                if let Some(w) = &s.waiting {
                    println!("waiting:  {w}");
                }
                if let Some(g) = &s.lease {
                    println!(
                        "lease:    reboot lease in group {g}, given back once the new slot is assessed"
                    );
                }
                match s.keys_version {
                    Some(v) => println!("keys:     signed key list version {v}"),
                    None => println!("keys:     the keys file (no signed key list fetched yet)"),
                }
                let failed = &dev.store.data.failed_digests;
                if !failed.is_empty() {
                    println!(
                        "failed:   {} (not installed again; clear-failed)",
                        failed.join(", ")
                    );
                }
                println!("last:     {}", s.last_result.as_deref().unwrap_or("-"));
            }
        }
        "mark-good" => match dev.awaited_reboot()? {
            // Staged (or failed) in this very boot: nothing booted the new
            // slot yet, so there is nothing to assess and nothing failed.
            Some(why) => println!(
                "nothing to assess: waiting for the reboot {why}; slot {} stays the slot to boot until then",
                dev.booted()?
            ),
            None => {
                dev.assess(true)?;
                println!("slot {} is good", dev.booted()?);
            }
        },
        "rollback" => {
            let s = dev.rollback()?;
            println!("rolling back to slot {s}");
        }
        "clear-failed" => {
            let cleared = dev.clear_failed(operand.as_deref())?;
            if cleared.is_empty() {
                println!("nothing to clear: no release failed on this device");
            } else {
                println!(
                    "cleared {}: installed again when offered",
                    cleared.join(", ")
                );
            }
        }
        other => anyhow::bail!("unknown command {other:?}; {USAGE}"),
    }
    Ok(0)
}

/// Jitter of ±10 % so a fleet does not poll in lockstep.
fn jitter(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    let r = u16::from_le_bytes(b) as f64 / u16::MAX as f64; // 0..1
    base.mul_f64(0.9 + 0.2 * r)
}

/// Set by SIGTERM or SIGINT: the daemon stops at its next wait.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing a signal handler")?;
    }
    Ok(stop)
}

/// Sleeps `d`, waking early when `stop` is set; answers whether it was.
fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return false;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(100)));
    }
    true
}

/// The daemon. The device (and with it the state folder's lock) is held for
/// a turn and let go while waiting: the next turn reads the state afresh, so
/// a `mark-good` or `clear-failed` run in between is neither missed nor
/// overwritten.
fn run(cfg: Config) -> anyhow::Result<()> {
    // A stop request lands between steps: an upgrade in progress finishes
    // (it is safe to kill anyway), a wait ends at once.
    let stop = stop_flag()?;
    let mut daemon = Daemon::start(&mut Device::open(cfg.clone())?);
    while !stop.load(Ordering::Relaxed) {
        let mut dev = Device::open(cfg.clone())?;
        let turn = daemon.turn(&mut dev);
        drop(dev);
        let wait = match turn {
            Turn::Poll(d) => jitter(d),
            Turn::PollAt(d) => d,
            Turn::AwaitReboot(Some(d)) => d,
            // Only the reboot (or a stop) ends this wait: exiting could
            // have a restart write what must wait for the reboot.
            Turn::AwaitReboot(None) => Duration::from_secs(3600),
        };
        if sleep_unless_stopped(wait, &stop) {
            break;
        }
    }
    sluice_agent::log("stopping on request");
    Ok(())
}
