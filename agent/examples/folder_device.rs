//! Writes `DIR/agent.toml` for a device whose slots are the folders `DIR/a`
//! and `DIR/b` (`slots.kind = "dir"`), through the agent's own [`Config`]
//! type, as the tests do ([`Config::in_folder`]): the benchmarks' device
//! (`bench/agent.sh`). Makes the folders; the caller writes `DIR/cmdline`
//! and `DIR/boot_id`.
//!
//! ```text
//! folder_device DIR --server URL --product P --channel C --secret S
//!               [--keys FILE] [--machine-id ID] [--insecure HOST:PORT]...
//!               [--mirror HOST:PORT=HOST:PORT]...
//! ```

use anyhow::{Context, bail};
use sluice_agent::config::Config;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .context("usage: folder_device DIR --server URL ...")?,
    );
    let (mut server, mut product, mut channel) = (None, None, None);
    let (mut secret, mut keys, mut machine_id) = (None, None, None);
    let (mut insecure, mut mirrors) = (Vec::new(), Vec::new());
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--server" => server = Some(value),
            "--product" => product = Some(value),
            "--channel" => channel = Some(value),
            "--secret" => secret = Some(value),
            "--keys" => keys = Some(PathBuf::from(value)),
            "--machine-id" => machine_id = Some(value),
            "--insecure" => insecure.push(value),
            "--mirror" => mirrors.push(
                value
                    .split_once('=')
                    .map(|(from, to)| (from.to_string(), to.to_string()))
                    .with_context(|| format!("--mirror {value:?}: give FROM=TO"))?,
            ),
            other => bail!("unknown option {other:?}"),
        }
    }
    let need = |v: Option<String>, flag: &str| v.with_context(|| format!("{flag} is required"));
    let mut cfg = Config::in_folder(
        &dir,
        &need(server, "--server")?,
        &need(product, "--product")?,
        &need(channel, "--channel")?,
    );
    cfg.enrollment_secret = Some(need(secret, "--secret")?);
    cfg.machine_id = machine_id;
    if let Some(k) = keys {
        cfg.keys = k;
    }
    cfg.registry.insecure = insecure;
    cfg.registry.mirrors = mirrors.into_iter().collect();
    for d in [&cfg.slots.a, &cfg.slots.b, &cfg.state_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("making {}", d.display()))?;
    }
    let path = dir.join("agent.toml");
    cfg.write(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
