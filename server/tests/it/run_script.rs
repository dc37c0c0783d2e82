//! README command 1, `scripts/run --demo`, as a new user runs it: it starts
//! PostgreSQL, a registry and the server (the `sluice` binary under test, so
//! no release build here), prints where everything is, including the
//! dashboard, seeds the demo without putting the admin password on any
//! command line, and stops everything on Ctrl-C.

use crate::common;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Loopback ports for one `scripts/run`: PostgreSQL's, the registry's and
/// the server's, then `replicas` more after the server's (`--replicas`
/// puts server i on SLUICE_PORT + i), all free now and below the ephemeral
/// range ([`common::free_ports`]).
fn run_ports(replicas: u16) -> (u16, u16, u16) {
    let base = common::free_ports(3 + replicas);
    (base, base + 1, base + 2)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Ctrl-C for `scripts/run` when the test ends, however it ends; then
/// SIGKILL for whatever it started that outlived it ([`leftovers`]), so a
/// failing test leaves no service behind holding cargo's output open.
struct Running {
    child: Child,
    state: PathBuf,
}

impl Running {
    /// Ctrl-C, as a terminal sends it.
    fn ctrl_c(&self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
    }

    /// Ctrl-C, then waits up to a minute for the script to end.
    fn interrupt(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        self.ctrl_c();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.interrupt();
        for (pid, _) in leftovers(&self.state) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The live processes that name `state` on their command line or in their
/// environment: what a `scripts/run` with that state folder started.
fn leftovers(state: &Path) -> Vec<(u32, String)> {
    let needle = state.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let read = |f: &str| {
            String::from_utf8_lossy(&std::fs::read(entry.path().join(f)).unwrap_or_default())
                .replace('\0', " ")
        };
        // A zombie has an empty command line; it holds nothing.
        let cmdline = read("cmdline");
        if !cmdline.is_empty() && (cmdline.contains(&needle) || read("environ").contains(&needle)) {
            found.push((pid, cmdline));
        }
    }
    found
}

#[test]
fn help_is_the_header_and_nothing_else() {
    let out = Command::new("bash")
        .arg(root().join("scripts/run"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("scripts/run [--demo]"), "{text}");
    assert!(text.contains("--demo seeds"), "{text}");
    assert!(
        !text.contains("set -") && !text.contains("ROOT="),
        "code in --help: {text}"
    );
    let out = Command::new("bash")
        .arg(root().join("scripts/run"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument --frobnicate"));
}

/// `scripts/run ARGS` with its state in `state` and the sluice binary under
/// test, on ports (PostgreSQL, registry, server); answers it running and its
/// output's lines.
fn start_run(
    state: &Path,
    args: &[&str],
    ports: (u16, u16, u16),
) -> (Running, mpsc::Receiver<String>) {
    start_run_reading_until(state, args, ports, None)
}

/// [`start_run`], but when `last` is given the output is read only up to
/// the first line starting with it (trimmed), then the pipe is closed, as
/// a terminal that went away would.
fn start_run_reading_until(
    state: &Path,
    args: &[&str],
    (pg, reg, port): (u16, u16, u16),
    last: Option<&'static str>,
) -> (Running, mpsc::Receiver<String>) {
    // SIGINT as a terminal gives it: a shell without job control starts its
    // background jobs with SIGINT ignored, and bash cannot trap a signal
    // ignored when it started.
    let mut child = Command::new("env")
        .args(["--default-signal=INT", "bash"])
        .arg(root().join("scripts/run"))
        .args(args)
        .env("SLUICE_STATE_DIR", state)
        .env("SLUICE_BIN", env!("CARGO_BIN_EXE_sluice"))
        .env("SLUICE_PG_PORT", pg.to_string())
        .env("SLUICE_REGISTRY_PORT", reg.to_string())
        .env("SLUICE_PORT", port.to_string())
        .env_remove("SLUICE_ADMIN_PASSWORD")
        .env_remove("SLUICE_WEB_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            let done = last.is_some_and(|l| line.trim_start().starts_with(l));
            if tx.send(line).is_err() || done {
                break;
            }
        }
    });
    let state = state.to_path_buf();
    (Running { child, state }, rx)
}

/// The lines up to the banner's last one (`servers` with `--replicas`, else `CLI`).
fn banner(rx: &mpsc::Receiver<String>, last: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !lines
        .iter()
        .any(|l: &String| l.trim_start().starts_with(last))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(e) => panic!("scripts/run printed no banner ({e}): {lines:#?}"),
        }
    }
    lines
}

/// The lines after Ctrl-C, up to the end of the output.
fn stopped(run: Running, rx: &mpsc::Receiver<String>) -> String {
    drop(run);
    let mut rest = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(30)) {
        rest.push(l);
    }
    rest.join("\n")
}

#[tokio::test]
async fn run_demo_prints_the_dashboard_and_keeps_the_password_off_command_lines() {
    let state = tempfile::tempdir().unwrap();
    let (pg, reg, port) = run_ports(0);
    let (run, rx) = start_run(state.path(), &["--demo"], (pg, reg, port));
    let lines = banner(&rx, "CLI ");
    let text = lines.join("\n");
    let api = format!("http://127.0.0.1:{port}");
    let has = |want: &str| {
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == want)
    };
    assert!(has(&format!("dashboard {api}/")), "{text}");
    assert!(has(&format!("API {api}/v1")), "{text}");
    assert!(has(&format!("API docs {api}/docs/")), "{text}");
    let password = std::fs::read_to_string(state.path().join("admin-password")).unwrap();
    let password = password.trim();
    assert!(has(&format!("login admin / {password}")), "{text}");

    // The dashboard line leads to the dashboard, served by the binary itself.
    let page = reqwest::get(format!("{api}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<div id=\"root\">"));

    // The demo seed logs in and fills the server; meanwhile no process has
    // the password on its command line.
    let client = reqwest::Client::new();
    let seeded = Instant::now() + Duration::from_secs(120);
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                assert!(!cmd.contains(password), "password on a command line: {cmd}");
            }
        }
        let token = client
            .post(format!("{api}/v1/auth/login"))
            .json(&serde_json::json!({"username": "admin", "password": password}))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["token"]
            .as_str()
            .map(str::to_string)
            .expect("the printed password logs in");
        let devices: serde_json::Value = client
            .get(format!("{api}/v1/devices"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if devices["items"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < seeded,
            "the demo seeded no device in 120 s: {}",
            std::fs::read_to_string(state.path().join("demo.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Ctrl-C: everything stops, the data stays.
    let rest = stopped(run, &rx);
    assert!(rest.contains("stopped; data kept in"), "{rest}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(std::net::TcpStream::connect(("127.0.0.1", pg)).is_err());
    assert!(state.path().join("postgres/PG_VERSION").exists());
}

/// `scripts/run --replicas 2`: two servers on SLUICE_PORT + 1 and + 2
/// behind HAProxy on SLUICE_PORT, which sends requests to both; a token
/// issued through the balancer is good on each server (they share the JWT
/// secret); Ctrl-C stops the servers and the balancer.
#[tokio::test]
async fn run_replicas_puts_two_servers_behind_haproxy() {
    let state = tempfile::tempdir().unwrap();
    let (pg, reg, port) = run_ports(2);
    let (run, rx) = start_run(state.path(), &["--replicas", "2"], (pg, reg, port));
    let lines = banner(&rx, "servers ");
    let text = lines.join("\n");
    let api = format!("http://127.0.0.1:{port}");
    let servers = [port + 1, port + 2].map(|p| format!("http://127.0.0.1:{p}"));
    assert!(text.contains(&format!("API       {api}/v1")), "{text}");
    assert!(
        text.contains(&format!(
            "servers   2 behind HAProxy on {api}: 127.0.0.1:{} 127.0.0.1:{}",
            port + 1,
            port + 2
        )),
        "{text}"
    );

    // Round robin: both servers answer through the balancer.
    let client = reqwest::Client::new();
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = client.get(format!("{api}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        answered.insert(r.headers()["x-sluice-server"].to_str().unwrap().to_string());
    }
    assert_eq!(
        answered.into_iter().collect::<Vec<_>>(),
        ["sluice1", "sluice2"]
    );
    let password = std::fs::read_to_string(state.path().join("admin-password")).unwrap();
    let login: serde_json::Value = client
        .post(format!("{api}/v1/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": password.trim()}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"]
        .as_str()
        .expect("the printed password logs in");
    for s in &servers {
        let r = client
            .get(format!("{s}/v1/products"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "{s} takes the token issued through the balancer"
        );
    }

    let rest = stopped(run, &rx);
    assert!(rest.contains("stopped; data kept in"), "{rest}");
    for p in [port, port + 1, port + 2, pg] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "port {p} still open"
        );
    }
    assert!(!state.path().join("haproxy.pid").exists());
}

/// Ctrl-C still stops everything when nobody reads the output any more (a
/// closed terminal, `scripts/run | head`), and a second Ctrl-C while it
/// stops does not cut the stop short: either would otherwise end the script
/// (on SIGPIPE, on SIGINT) and leave the server, the registry and
/// PostgreSQL running.
#[test]
fn ctrl_c_with_nobody_reading_stops_everything() {
    let state = tempfile::tempdir().unwrap();
    let (pg, reg, port) = run_ports(0);
    let (mut run, rx) = start_run_reading_until(state.path(), &[], (pg, reg, port), Some("CLI "));
    banner(&rx, "CLI ");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    // The reader has closed its end of the pipe.
    while rx.recv_timeout(Duration::from_secs(5)).is_ok() {}
    run.ctrl_c();
    std::thread::sleep(Duration::from_millis(300));
    run.interrupt();
    let left = leftovers(state.path());
    assert!(left.is_empty(), "still running after Ctrl-C: {left:#?}");
    for p in [port, reg, pg] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "port {p} still open"
        );
    }
}
