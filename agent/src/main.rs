//! `sluice-agent`: run, check, apply, status, mark-good, rollback, enroll.
#![deny(unsafe_code)]

use anyhow::Context;
use sluice_agent::agent::{Device, Outcome};
use sluice_agent::config::{Config, DEFAULT_PATH};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: sluice-agent [--config PATH] <run|check|apply|status [--json]|mark-good|rollback|enroll>";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
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

fn real_main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut config = std::env::var_os("SLUICE_AGENT_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let mut cmd = None;
    let mut json = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = args.next().context("--config needs a path")?.into(),
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            c if cmd.is_none() && !c.starts_with('-') => cmd = Some(c.to_string()),
            other => anyhow::bail!("unexpected argument {other:?}; {USAGE}"),
        }
    }
    let cmd = cmd.with_context(|| USAGE.to_string())?;
    let cfg = Config::load(&config)?;
    let mut dev = Device::open(cfg)?;
    match cmd.as_str() {
        "enroll" => {
            let c = dev.enroll()?;
            println!("enrolled: device {}", c.device_id);
        }
        "check" => {
            let a = dev.check()?;
            match (&a.release, a.update) {
                (Some(r), true) => println!(
                    "update available: {} {}{}",
                    r.version,
                    r.digest,
                    if a.downgrade { " (downgrade)" } else { "" }
                ),
                _ => println!("up to date"),
            }
        }
        "apply" => match dev.apply()? {
            Outcome::UpToDate => println!("up to date"),
            Outcome::Rebooting(t) => println!("applied {} ({}); rebooting", t.version, t.digest),
            Outcome::Skipped(t) => println!(
                "not applying {} ({}): it failed its boot assessment on this device",
                t.version, t.digest
            ),
        },
        "status" => {
            let s = dev.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let slot = |v: &serde_json::Value| {
                    if v.is_null() {
                        "-".to_string()
                    } else {
                        format!(
                            "slot {} {}",
                            v["slot"].as_str().unwrap_or("?"),
                            v["image"]["version"].as_str().unwrap_or("(unknown image)")
                        )
                    }
                };
                println!("booted:   {}", slot(&s["booted"]));
                println!("staged:   {}", slot(&s["staged"]));
                println!("rollback: {}", slot(&s["rollback"]));
                println!("state:    {}", s["state"].as_str().unwrap_or("?"));
                println!("last:     {}", s["last_result"].as_str().unwrap_or("-"));
            }
        }
        "mark-good" => {
            dev.assess(true)?;
            println!("slot {} is good", dev.booted()?);
        }
        "rollback" => {
            let s = dev.rollback()?;
            println!("rolling back to slot {s}");
        }
        "run" => run(&mut dev)?,
        other => anyhow::bail!("unknown command {other:?}; {USAGE}"),
    }
    Ok(())
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

fn run(dev: &mut Device) -> anyhow::Result<()> {
    // A stop request lands between steps: an upgrade in progress finishes
    // (it is safe to kill anyway), a wait ends at once.
    let stop = stop_flag()?;
    // First the boot assessment of a slot on trial.
    if let Err(e) = dev.assess(false) {
        sluice_agent::log(&format!("boot assessment: {e:#}"));
    }
    let mut backoff = Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        let wait = match dev.apply() {
            Ok(Outcome::Rebooting(_)) => return Ok(()),
            Ok(Outcome::UpToDate | Outcome::Skipped(_)) => {
                backoff = Duration::from_secs(10);
                // The server paces the fleet; 0 would mean a busy loop.
                let poll = dev
                    .store
                    .data
                    .last_poll_after_s
                    .unwrap_or(300)
                    .clamp(1, 86_400);
                Duration::from_secs(poll)
            }
            Err(e) => {
                sluice_agent::log(&format!(
                    "update failed: {e:#}; retrying in about {}s",
                    backoff.as_secs()
                ));
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(3600));
                w
            }
        };
        if sleep_unless_stopped(jitter(wait), &stop) {
            break;
        }
    }
    sluice_agent::log("stopping on request");
    Ok(())
}
