//! The `sluice` client commands for CI and admins: each builds one REST call,
//! sends it to a running server, prints the JSON answer and exits with a code
//! per failure class, so a CI log and a script can both act on the outcome.

use clap::Args;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

/// Exit codes, as `sluice --help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Client commands (product, release, channel, token, keys, device, login) print
the server's JSON answer on stdout; the read commands (list, show) and `channel
promote` print a summary instead unless given --json. Warnings in the server's
answer go to stderr as `warning: <text>`. On failure they print
`error: <detail> (HTTP <status>)` on stderr and exit with:
  0  success
  1  any other failure (server-side commands: serve, migrate, admin, keys generate)
  2  usage: bad flags or values, unreadable --metadata file
  3  authentication or permission: no token, HTTP 401 or 403
  4  conflict: HTTP 409 (e.g. same version with another digest)
  5  rejected: HTTP 400, 404, 422 and other 4xx (not found, invalid)
  6  unavailable: server unreachable, HTTP 429 or 5xx (database or registry down); retry later";

/// Why a client command failed; each class has its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 2: the command line or a local input is wrong.
    Usage = 2,
    /// 3: no token, or the server answered 401 or 403.
    Auth = 3,
    /// 4: the server answered 409.
    Conflict = 4,
    /// 5: the server answered another 4xx.
    Rejected = 5,
    /// 6: the server is unreachable or answered 429 or 5xx.
    Unavailable = 6,
    /// 1: anything else.
    Other = 1,
}

/// A failed client command: what to print and how to exit.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    /// The exit class.
    pub exit: Exit,
    /// The one-line message (without the `error: ` prefix).
    pub message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
}

/// The exit class for an HTTP error status.
pub fn exit_for_status(status: u16) -> Exit {
    match status {
        401 | 403 => Exit::Auth,
        409 => Exit::Conflict,
        429 => Exit::Unavailable,
        400..=499 => Exit::Rejected,
        500..=599 => Exit::Unavailable,
        _ => Exit::Other,
    }
}

/// Turns an error answer (ideally `application/problem+json`) into a failure.
pub fn failure_from_response(status: u16, body: &str) -> Failure {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let text = |key: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let detail = text("detail").or_else(|| text("title")).unwrap_or_else(|| {
        let body = body.trim();
        if body.is_empty() {
            StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no detail")
                .to_owned()
        } else {
            body.chars().take(300).collect()
        }
    });
    Failure {
        exit: exit_for_status(status),
        message: format!("{detail} (HTTP {status})"),
    }
}

/// Where the server is and who we are; on every client command.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The server's base URL.
    #[arg(
        long,
        env = "SLUICE_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// Bearer token: an API token (`sluice token create`) or a login's (`sluice login`).
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

/// One REST call.
#[derive(Debug, PartialEq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// Path segments below the server URL, each escaped when joined.
    pub path: Vec<String>,
    /// The JSON body.
    pub body: Option<Value>,
    /// Whether the call needs `--token`.
    pub authenticated: bool,
    /// Query parameters.
    pub query: Vec<(String, String)>,
}

impl Request {
    fn new(method: Method, path: &[&str], body: Option<Value>) -> Self {
        Request {
            method,
            path: path.iter().map(|s| s.to_string()).collect(),
            body,
            authenticated: true,
            query: Vec::new(),
        }
    }
}

/// What a client command does: the call it makes, and how it prints the answer.
pub trait Call {
    /// The call to make, or why the command line is unusable.
    fn request(&self) -> Result<Request, Failure>;
    /// What goes to stdout on success.
    fn output(&self, answer: Value) -> String {
        pretty(&answer)
    }
    /// What goes to stdout when the answer has no body.
    fn no_content(&self) -> Option<String> {
        None
    }
}

/// A client command as parsed: the server and token every one takes (first
/// in its help), then its own flags.
#[derive(Debug, Args)]
pub struct Client<C: Args> {
    #[command(flatten)]
    remote: Remote,
    #[command(flatten)]
    call: C,
}

/// A client command, whatever its flags.
pub trait Command {
    /// Server and token.
    fn remote(&self) -> &Remote;
    /// What it sends and prints.
    fn call(&self) -> &dyn Call;
}

impl<C: Args + Call> Command for Client<C> {
    fn remote(&self) -> &Remote {
        &self.remote
    }
    fn call(&self) -> &dyn Call {
        &self.call
    }
}

fn pretty(answer: &Value) -> String {
    serde_json::to_string_pretty(answer).unwrap_or_else(|_| answer.to_string())
}

/// The strings of the answer's `warnings` array (none when it has none).
pub fn warnings(answer: &Value) -> Vec<&str> {
    answer
        .get("warnings")
        .and_then(Value::as_array)
        .map(|w| w.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Runs a client command and answers the process exit code.
pub async fn run(command: &dyn Command) -> i32 {
    let call = command.call();
    let outcome = match call.request() {
        Ok(request) => send(command.remote(), request).await,
        Err(f) => Err(f),
    };
    match outcome {
        Ok(Some(answer)) => {
            let warned: Vec<String> = warnings(&answer).into_iter().map(String::from).collect();
            println!("{}", call.output(answer));
            for w in warned {
                eprintln!("warning: {w}");
            }
            0
        }
        Ok(None) => {
            if let Some(line) = call.no_content() {
                println!("{line}");
            }
            0
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.exit as i32
        }
    }
}

/// The URL of `path` below the server's base URL (which may have a path prefix).
pub fn url(server: &str, path: &[String]) -> Result<Url, Failure> {
    let mut url = Url::parse(server).map_err(|e| {
        Failure::usage(format!(
            "invalid server URL {server:?} (--server or SLUICE_SERVER): {e}"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Failure::usage(format!(
            "server URL {server:?} must start with http:// or https://"
        )));
    }
    url.path_segments_mut()
        .map_err(|_| Failure::usage(format!("server URL {server:?} cannot have a path")))?
        .pop_if_empty()
        .extend(path);
    Ok(url)
}

/// Sends the call; `Ok(None)` for an answer without a body.
async fn send(remote: &Remote, request: Request) -> Result<Option<Value>, Failure> {
    let mut url = url(&remote.server, &request.path)?;
    if !request.query.is_empty() {
        url.query_pairs_mut().extend_pairs(&request.query);
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .user_agent(concat!("sluice-cli/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Failure {
            exit: Exit::Other,
            message: format!("cannot make an HTTP client: {e}"),
        })?;
    let mut builder = client.request(request.method.clone(), url.clone());
    if request.authenticated {
        let token = remote.token.as_deref().filter(|t| !t.is_empty()).ok_or_else(|| Failure {
            exit: Exit::Auth,
            message: "no token: set SLUICE_TOKEN or pass --token (an API token from `sluice token create`, or `sluice login`)".into(),
        })?;
        builder = builder.bearer_auth(token);
    }
    if let Some(body) = &request.body {
        builder = builder.json(body);
    }
    let response = builder.send().await.map_err(|e| Failure {
        exit: Exit::Unavailable,
        message: unreachable_message(&remote.server, &e),
    })?;
    let status = response.status();
    let text = response.text().await.map_err(|e| Failure {
        exit: Exit::Unavailable,
        message: format!(
            "the answer from {} broke off: {e} (HTTP {})",
            remote.server,
            status.as_u16()
        ),
    })?;
    if !status.is_success() {
        return Err(failure_from_response(status.as_u16(), &text));
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn unreachable_message(server: &str, e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause = format!("{cause}: {s}");
        source = s.source();
    }
    let what = if e.is_timeout() {
        "no answer in time from"
    } else {
        "cannot reach"
    };
    format!(
        "{what} the Sluice server at {server} ({cause}); is it running? Set --server or SLUICE_SERVER to its URL"
    )
}

/// A channel to publish into: `NAME` (100 %) or `NAME:PERCENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTarget {
    /// The channel's name.
    pub name: String,
    /// Percent of its devices that get the release.
    pub percent: u8,
}

/// Parses `--channel beta` or `--channel beta:10`.
pub fn parse_channel_target(s: &str) -> Result<ChannelTarget, String> {
    let (name, percent) = match s.split_once(':') {
        Some((name, p)) => {
            let percent =
                p.parse::<u8>().ok().filter(|p| *p <= 100).ok_or_else(|| {
                    format!("PERCENT in {s:?} must be a whole number from 0 to 100")
                })?;
            (name, percent)
        }
        None => (s, 100),
    };
    if name.is_empty() {
        return Err(format!(
            "{s:?} has no channel name: use NAME or NAME:PERCENT"
        ));
    }
    Ok(ChannelTarget {
        name: name.to_owned(),
        percent,
    })
}

fn parse_percent_f64(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
        .ok_or_else(|| format!("{s:?} is not a percentage from 0 to 100"))
}

/// `sluice release publish`.
pub type Publish = Client<PublishArgs>;

/// The flags of [`Publish`].
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The product.
    #[arg(long)]
    product: String,
    /// The release's SemVer version.
    #[arg(long)]
    version: String,
    /// The image, a tag or digest reference in the product's repository.
    #[arg(long)]
    image: String,
    /// A JSON file with build metadata (`git_commit`, `build_url`, `changelog`, ...); `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    metadata: Option<PathBuf>,
    /// Put the release at the head of this channel: `NAME` (100 %) or `NAME:PERCENT`; repeatable.
    #[arg(long = "channel", value_name = "C[:PERCENT]", value_parser = parse_channel_target)]
    channels: Vec<ChannelTarget>,
    /// A mandatory step: devices below it upgrade to it before anything newer.
    #[arg(long)]
    floor: bool,
}

impl PublishArgs {
    fn metadata(&self) -> Result<Option<Value>, Failure> {
        let Some(path) = &self.metadata else {
            return Ok(None);
        };
        let mut text = String::new();
        let read = if path.as_os_str() == "-" {
            std::io::stdin().read_to_string(&mut text).map(|_| ())
        } else {
            std::fs::read_to_string(path).map(|t| text = t)
        };
        read.map_err(|e| {
            Failure::usage(format!("cannot read --metadata {}: {e}", path.display()))
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            Failure::usage(format!(
                "--metadata {} is not valid JSON: {e}",
                path.display()
            ))
        })?;
        if !value.is_object() {
            return Err(Failure::usage(format!(
                "--metadata {} must hold a JSON object",
                path.display()
            )));
        }
        Ok(Some(value))
    }
}

impl Call for PublishArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = json!({"version": self.version, "image": self.image});
        if let Some(metadata) = self.metadata()? {
            body["metadata"] = metadata;
        }
        if self.floor {
            body["floor"] = json!(true);
        }
        if !self.channels.is_empty() {
            body["channels"] = self
                .channels
                .iter()
                .map(|c| json!({"name": c.name, "percent": c.percent}))
                .collect();
        }
        Ok(Request::new(
            Method::POST,
            &["v1", "products", &self.product, "releases"],
            Some(body),
        ))
    }
}

/// `--product` and `--channel`: the channel a command acts on.
#[derive(Debug, Args)]
pub struct ChannelRef {
    /// The product.
    #[arg(long)]
    product: String,
    /// The channel.
    #[arg(long)]
    channel: String,
}

impl ChannelRef {
    /// `method /v1/products/{product}/channels/{channel}/{action}` with `body`.
    fn request(&self, method: Method, action: &str, body: Value) -> Request {
        Request::new(
            method,
            &[
                "v1",
                "products",
                &self.product,
                "channels",
                &self.channel,
                action,
            ],
            Some(body),
        )
    }
}

/// `sluice channel promote`.
pub type Promote = Client<PromoteArgs>;

/// The flags of [`Promote`].
#[derive(Debug, Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    at: ChannelRef,
    /// The release to make the channel's head.
    #[arg(long)]
    version: String,
    /// Percent of the channel's devices that get it at first: a staged
    /// rollout by default; raise it with `sluice channel rollout --percent`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
    percent: u8,
    /// Then raise the percent linearly to this ...
    #[arg(long, requires = "ramp_minutes", value_parser = clap::value_parser!(u8).range(0..=100))]
    ramp_to: Option<u8>,
    /// ... over this many minutes.
    #[arg(long, alias = "ramp-over-minutes", requires = "ramp_to",
          value_parser = clap::value_parser!(u32).range(1..=525_600))]
    ramp_minutes: Option<u32>,
    /// Roll out in waves instead, in order, repeatable:
    /// `SELECTOR[:PERCENT[:RAMP_MINUTES[:HOLD_MINUTES]]]`, e.g.
    /// `--wave ring=canary:100:0:60 --wave region=eu:100:120 --wave ''`
    /// (an empty selector is every device).
    #[arg(long = "wave", value_parser = parse_wave, conflicts_with_all = ["percent", "ramp_to"])]
    waves: Vec<Value>,
    /// Only print what the promote would do (which release becomes the
    /// base, which devices stay where they are); change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the server's JSON answer (the channel) instead of a summary.
    #[arg(long)]
    json: bool,
}

/// `SELECTOR[:PERCENT[:RAMP_MINUTES[:HOLD_MINUTES]]]` as a wave of `POST .../promote`.
fn parse_wave(s: &str) -> Result<Value, String> {
    let mut parts = s.split(':');
    let selector = parts.next().unwrap_or_default().trim();
    let mut wave = json!({ "selector": selector });
    for (name, part) in ["percent", "ramp_minutes", "hold_minutes"]
        .into_iter()
        .zip(parts.by_ref())
    {
        let n: f64 = part.trim().parse().map_err(|_| {
            format!("{name} {part:?} in wave {s:?} is not a number: write SELECTOR[:PERCENT[:RAMP_MINUTES[:HOLD_MINUTES]]]")
        })?;
        wave[name] = json!(n);
    }
    if parts.next().is_some() {
        return Err(format!(
            "wave {s:?} has too many parts: write SELECTOR[:PERCENT[:RAMP_MINUTES[:HOLD_MINUTES]]]"
        ));
    }
    Ok(wave)
}

impl Call for PromoteArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = match self.waves.is_empty() {
            true => json!({"version": self.version, "percent": self.percent}),
            false => json!({"version": self.version, "waves": self.waves}),
        };
        if let (Some(to), Some(over)) = (self.ramp_to, self.ramp_minutes) {
            if to < self.percent {
                return Err(Failure::usage(format!(
                    "--ramp-to {to} is below --percent {}: a ramp only raises the percent",
                    self.percent
                )));
            }
            body["ramp"] = json!({"to_percent": to, "over_minutes": over});
        }
        if self.dry_run {
            body["dry_run"] = json!(true);
        }
        Ok(self.at.request(Method::POST, "promote", body))
    }
    fn output(&self, answer: Value) -> String {
        if self.json {
            return pretty(&answer);
        }
        let plan = answer["plan"]["message"].as_str();
        if self.dry_run {
            return format!(
                "dry run, nothing was changed: {}",
                plan.unwrap_or("the server did not say what the promote would do")
            );
        }
        let head = text(&answer["head"]);
        let name = text(&answer["name"]);
        let rollout = &answer["rollout"];
        let percent = rollout["percent"].as_f64().unwrap_or(f64::NAN);
        let waves = &answer["waves"];
        let mut line = match waves["waves"].as_array() {
            Some(w) => format!(
                "{head} is head of {name}, rolling out in {} waves ({})",
                w.len(),
                w.iter()
                    .map(|w| match w["selector"].as_str() {
                        Some("") | None => "everyone",
                        Some(s) => s,
                    })
                    .collect::<Vec<_>>()
                    .join(", then ")
            ),
            None => format!("{head} is head of {name} at {} %", num(percent)),
        };
        if let Some(base) = answer["base"].as_str() {
            line += &format!(" (base {base})");
        }
        let ramp = &rollout["ramp"];
        if ramp.is_object() {
            line += &format!(
                ", ramping to {} % over {} min",
                num(ramp["to_percent"].as_f64().unwrap_or(f64::NAN)),
                num(ramp["over_minutes"].as_f64().unwrap_or(f64::NAN))
            );
        } else if percent < 100.0 && waves.is_null() {
            line += &format!(
                " (raise with `sluice channel rollout --product {} --channel {name} --percent N`)",
                self.at.product
            );
        }
        if let Some(plan) = plan {
            line += "\n";
            line += plan;
        }
        line
    }
}

/// `sluice channel rollout`: changes only what is given.
pub type Rollout = Client<RolloutArgs>;

/// The flags of [`Rollout`].
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").multiple(true).required(true)
    .args(["percent", "ramp_to", "pause", "resume", "gate_max_failure_percent"])))]
pub struct RolloutArgs {
    #[command(flatten)]
    at: ChannelRef,
    /// Percent of devices that get the head, now.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    percent: Option<u8>,
    /// Raise the percent linearly to this ...
    #[arg(long, requires = "ramp_over_minutes", value_parser = clap::value_parser!(u8).range(0..=100))]
    ramp_to: Option<u8>,
    /// ... over this many minutes.
    #[arg(long, visible_alias = "ramp-minutes", requires = "ramp_to", value_parser = clap::value_parser!(u32).range(1..))]
    ramp_over_minutes: Option<u32>,
    /// Admit no new device to the head.
    #[arg(long, conflicts_with = "resume")]
    pause: bool,
    /// Undo --pause (or a pause by the health gate).
    #[arg(long)]
    resume: bool,
    /// Health gate: pause when more than this percent of reporting devices failed ...
    #[arg(long, requires = "gate_min_reports", value_parser = parse_percent_f64)]
    gate_max_failure_percent: Option<f64>,
    /// ... once at least this many devices reported on the head.
    #[arg(long, requires = "gate_max_failure_percent")]
    gate_min_reports: Option<u32>,
}

impl Call for RolloutArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = json!({});
        if let Some(p) = self.percent {
            body["percent"] = json!(p);
        }
        if let (Some(to), Some(over)) = (self.ramp_to, self.ramp_over_minutes) {
            body["ramp"] = json!({"to_percent": to, "over_minutes": over});
        }
        if self.pause || self.resume {
            body["paused"] = json!(self.pause);
        }
        if let (Some(max), Some(min)) = (self.gate_max_failure_percent, self.gate_min_reports) {
            body["gate"] = json!({"max_failure_percent": max, "min_reports": min});
        }
        Ok(self.at.request(Method::PATCH, "rollout", body))
    }
}

/// `sluice channel rollback`.
pub type Rollback = Client<RollbackArgs>;

/// The flags of [`Rollback`].
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    at: ChannelRef,
    /// The release to go back to (default: the channel's base, the release it
    /// last rolled out fully).
    #[arg(long)]
    version: Option<String>,
}

impl Call for RollbackArgs {
    fn request(&self) -> Result<Request, Failure> {
        let body = match &self.version {
            Some(v) => json!({"version": v}),
            None => json!({}),
        };
        Ok(self.at.request(Method::POST, "rollback", body))
    }
}

/// `sluice channel reboot-policy`: replaces the channel's reboot policy.
pub type RebootPolicy = Client<RebootPolicyArgs>;

/// The flags of [`RebootPolicy`].
#[derive(Debug, Args)]
pub struct RebootPolicyArgs {
    #[command(flatten)]
    at: ChannelRef,
    /// A maintenance window, repeatable: `DAYS HH:MM-HH:MM ZONE [SELECTOR]`,
    /// e.g. `"Sat 02:00-04:00 Europe/Berlin"`, `"Mon-Fri 22:00-02:00 UTC
    /// region=eu"`. Devices it applies to reboot into a staged release only
    /// while one of their windows is open. None: any time.
    #[arg(long = "window", value_parser = parse_window)]
    windows: Vec<Value>,
    /// Reboot leases: at most this many devices between reboot and boot
    /// assessment at once ...
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    lease_max: Option<u32>,
    /// ... or at most this percent of the group's devices (with both, the lower).
    #[arg(long, value_parser = parse_percent_f64)]
    lease_max_percent: Option<f64>,
    /// One lease group per value of this label (e.g. `site`), instead of one
    /// for the channel.
    #[arg(long)]
    lease_per_label: Option<String>,
    /// A lease not given back expires after this many minutes.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1440))]
    lease_ttl_minutes: u32,
}

/// `DAYS HH:MM-HH:MM ZONE [SELECTOR]` as a window of `PUT .../reboot-policy`.
fn parse_window(s: &str) -> Result<Value, String> {
    let usage = "write DAYS HH:MM-HH:MM ZONE [SELECTOR], e.g. \"Sat 02:00-04:00 Europe/Berlin\"";
    let words: Vec<&str> = s.split_whitespace().collect();
    let (days, times, zone, selector) = match words[..] {
        [d, t, z] => (d, t, z, ""),
        [d, t, z, sel] => (d, t, z, sel),
        _ => return Err(format!("window {s:?}: {usage}")),
    };
    let (start, end) = times
        .split_once(['-', '–'])
        .ok_or_else(|| format!("window {s:?}: the times must be HH:MM-HH:MM; {usage}"))?;
    Ok(json!({"days": days, "start": start, "end": end, "time_zone": zone, "selector": selector}))
}

impl Call for RebootPolicyArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = json!({ "windows": self.windows });
        if self.lease_max.is_some() || self.lease_max_percent.is_some() {
            body["lease"] = json!({
                "max_devices": self.lease_max,
                "max_percent": self.lease_max_percent,
                "per_label": self.lease_per_label,
                "ttl_minutes": self.lease_ttl_minutes,
            });
        } else if self.lease_per_label.is_some() {
            return Err(Failure::usage(
                "--lease-per-label needs --lease-max or --lease-max-percent",
            ));
        }
        Ok(self.at.request(Method::PUT, "reboot-policy", body))
    }
    fn output(&self, answer: Value) -> String {
        let policy = &answer["reboot_policy"];
        let specs = policy["windows"].as_array().cloned().unwrap_or_default();
        let windows: Vec<String> = policy["windows_described"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(specs.iter().map(|w| w["selector"].as_str().unwrap_or("")))
            .map(|(w, selector)| match selector {
                "" => text(w),
                s => format!("{} ({s})", text(w)),
            })
            .collect();
        let mut line = match windows.is_empty() {
            true => "devices reboot at any time".to_string(),
            false => format!("devices reboot in {}", windows.join("; ")),
        };
        let lease = &policy["lease"];
        if lease.is_object() {
            let limits: Vec<String> = [
                lease["max_devices"]
                    .as_u64()
                    .map(|n| format!("{n} devices")),
                lease["max_percent"]
                    .as_f64()
                    .map(|p| format!("{} %", num(p))),
            ]
            .into_iter()
            .flatten()
            .collect();
            line += &format!(
                "; at most {} between reboot and boot assessment{}, leases expiring after {} min",
                limits.join(" and "),
                lease["per_label"]
                    .as_str()
                    .map(|k| format!(" per {k}"))
                    .unwrap_or_default(),
                text(&lease["ttl_minutes"])
            );
        }
        line
    }
}

/// `sluice release urgent`.
pub type ReleaseUrgent = Client<ReleaseUrgentArgs>;

/// The flags of [`ReleaseUrgent`].
#[derive(Debug, Args)]
pub struct ReleaseUrgentArgs {
    /// The product.
    #[arg(long)]
    product: String,
    /// The release.
    #[arg(long)]
    version: String,
    /// Give the maintenance windows back (the release is no longer urgent).
    #[arg(long)]
    off: bool,
}

impl Call for ReleaseUrgentArgs {
    fn request(&self) -> Result<Request, Failure> {
        Ok(Request::new(
            Method::POST,
            &[
                "v1",
                "products",
                &self.product,
                "releases",
                &self.version,
                "urgent",
            ],
            Some(json!({"urgent": !self.off})),
        ))
    }
    fn output(&self, answer: Value) -> String {
        match answer["urgent"].as_bool() {
            Some(true) => format!(
                "{} is urgent: devices reboot into it outside their maintenance windows",
                self.version
            ),
            _ => format!("{} follows the maintenance windows", self.version),
        }
    }
}

/// `sluice device labels <id> key=value ...`: replaces a device's labels.
pub type DeviceLabels = Client<DeviceLabelsArgs>;

/// The flags of [`DeviceLabels`].
#[derive(Debug, Args)]
pub struct DeviceLabelsArgs {
    /// The device id.
    id: uuid::Uuid,
    /// The labels as `key=value`; they replace all the device had (none: remove all).
    #[arg(value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be key=value"))
}

impl Call for DeviceLabelsArgs {
    fn request(&self) -> Result<Request, Failure> {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        Ok(Request::new(
            Method::PUT,
            &["v1", "devices", &self.id.to_string(), "labels"],
            Some(json!({ "labels": labels })),
        ))
    }
    fn output(&self, answer: Value) -> String {
        let labels = answer["labels"]
            .as_object()
            .map(|l| {
                l.iter()
                    .map(|(k, v)| format!("{k}={}", text(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        match labels.is_empty() {
            true => format!("device {} has no labels", self.id),
            false => format!("device {} has labels {labels}", self.id),
        }
    }
}

/// `sluice token create`.
pub type TokenCreate = Client<TokenCreateArgs>;

/// The flags of [`TokenCreate`].
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// What it is for (`github-actions acme-os`).
    #[arg(long)]
    name: String,
    /// `publisher` (CI), `viewer` or `admin`.
    #[arg(long, default_value = "publisher", value_parser = ["publisher", "viewer", "admin"])]
    role: String,
    /// A product the token may publish to and promote in; repeatable.
    #[arg(long = "product", value_name = "PRODUCT")]
    products: Vec<String>,
    /// Lifetime in days (server default: 365).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    expires_in_days: Option<i64>,
}

impl Call for TokenCreateArgs {
    fn request(&self) -> Result<Request, Failure> {
        if self.role == "publisher" && self.products.is_empty() {
            return Err(Failure::usage(
                "a publisher token needs at least one --product",
            ));
        }
        let mut body = json!({"name": self.name, "role": self.role, "products": self.products});
        if let Some(d) = self.expires_in_days {
            body["expires_in_days"] = json!(d);
        }
        Ok(Request::new(Method::POST, &["v1", "tokens"], Some(body)))
    }
}

/// `sluice keys rotate`.
pub type KeysRotate = Client<KeysRotateArgs>;

/// The flags of [`KeysRotate`].
#[derive(Debug, Args)]
pub struct KeysRotateArgs {
    /// `image` or `response` (a new `next` key), or `root` (replaced at once).
    #[arg(long, value_parser = ["image", "response", "root"])]
    role: String,
}

/// `sluice keys activate`.
pub type KeysActivate = Client<KeysActivateArgs>;

/// The flags of [`KeysActivate`].
#[derive(Debug, Args)]
pub struct KeysActivateArgs {
    /// `image` or `response`.
    #[arg(long, value_parser = ["image", "response"])]
    role: String,
    /// Activate even though not enough devices hold the key yet.
    #[arg(long)]
    force: bool,
    /// Share of the devices seen in the last 30 days that must hold it (default 100).
    #[arg(long)]
    min_percent: Option<f64>,
}

impl Call for KeysActivateArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = json!({"force": self.force});
        if let Some(p) = self.min_percent {
            body["min_percent"] = json!(p);
        }
        Ok(Request::new(
            Method::POST,
            &["v1", "keys", &self.role, "activate"],
            Some(body),
        ))
    }
}

/// `sluice keys revoke`.
pub type KeysRevoke = Client<KeysRevokeArgs>;

/// The flags of [`KeysRevoke`].
#[derive(Debug, Args)]
pub struct KeysRevokeArgs {
    /// `image`, `response` or `root`.
    #[arg(long, value_parser = ["image", "response", "root"])]
    role: String,
    /// The key's id (`sluice keys status`).
    #[arg(long)]
    key_id: String,
}

impl Call for KeysRevokeArgs {
    fn request(&self) -> Result<Request, Failure> {
        Ok(Request::new(
            Method::POST,
            &["v1", "keys", &self.role, "revoke"],
            Some(json!({"key_id": self.key_id})),
        ))
    }
}

/// `sluice keys status`.
pub type KeysStatus = Client<KeysStatusArgs>;

/// The flags of [`KeysStatus`].
#[derive(Debug, Args)]
pub struct KeysStatusArgs {}

impl Call for KeysStatusArgs {
    fn request(&self) -> Result<Request, Failure> {
        Ok(Request::new(Method::GET, &["v1", "keys", "status"], None))
    }
}

impl Call for KeysRotateArgs {
    fn request(&self) -> Result<Request, Failure> {
        Ok(Request::new(
            Method::POST,
            &["v1", "keys", &self.role, "rotate"],
            None,
        ))
    }
}

/// `sluice device list`: the fleet, filtered (one page; `--cursor` for the next).
pub type DeviceList = Client<DeviceListArgs>;

/// The flags of [`DeviceList`].
#[derive(Debug, Args)]
pub struct DeviceListArgs {
    /// Only this product's devices.
    #[arg(long)]
    product: Option<String>,
    /// Only devices whose machine id or device id contains this.
    #[arg(long)]
    q: Option<String>,
    /// Only revoked devices (`true`) or only the others (`false`).
    #[arg(long)]
    revoked: Option<bool>,
    /// Only devices this label selector selects: `ring=canary,region!=us`.
    #[arg(long)]
    label: Option<String>,
    /// The `next_cursor` of the previous page.
    #[arg(long)]
    cursor: Option<String>,
}

impl Call for DeviceListArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut r = Request::new(Method::GET, &["v1", "devices"], None);
        let pairs = [
            ("product", self.product.clone()),
            ("q", self.q.clone()),
            ("revoked", self.revoked.map(|r| r.to_string())),
            ("label", self.label.clone()),
            ("cursor", self.cursor.clone()),
        ];
        r.query = pairs
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect();
        Ok(r)
    }
}

/// `sluice device revoke|reset|delete <id>`.
pub type DeviceAction = Client<DeviceActionArgs>;

/// The flags of [`DeviceAction`].
#[derive(Debug, Args)]
pub struct DeviceActionArgs {
    /// The device id.
    id: uuid::Uuid,
    /// Why (revoke only; shown with the device and in the audit log).
    #[arg(long)]
    reason: Option<String>,
    #[arg(skip)]
    action: &'static str,
}

impl DeviceAction {
    /// The command for `action` (`revoke`, `reset` or `delete`).
    pub fn with_action(mut self, action: &'static str) -> Self {
        self.call.action = action;
        self
    }
}

impl Call for DeviceActionArgs {
    fn request(&self) -> Result<Request, Failure> {
        let id = self.id.to_string();
        if self.reason.is_some() && self.action != "revoke" {
            return Err(Failure::usage("--reason goes with `device revoke` only"));
        }
        Ok(match self.action {
            "delete" => Request::new(Method::DELETE, &["v1", "devices", &id], None),
            "revoke" => {
                let body = match &self.reason {
                    Some(r) => json!({"reason": r}),
                    None => json!({}),
                };
                Request::new(Method::POST, &["v1", "devices", &id, "revoke"], Some(body))
            }
            action => Request::new(Method::POST, &["v1", "devices", &id, action], None),
        })
    }
}

/// `sluice device retry <id>`.
pub type DeviceRetry = Client<DeviceRetryArgs>;

/// The flags of [`DeviceRetry`].
#[derive(Debug, Args)]
pub struct DeviceRetryArgs {
    /// The device id.
    id: uuid::Uuid,
    /// Only the failures of this release version.
    #[arg(long, conflicts_with = "digest")]
    version: Option<String>,
    /// Only this image digest (`sha256:...`).
    #[arg(long)]
    digest: Option<String>,
}

impl Call for DeviceRetryArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = json!({});
        if let Some(v) = &self.version {
            body["version"] = json!(v);
        }
        if let Some(d) = &self.digest {
            body["digest"] = json!(d);
        }
        let id = self.id.to_string();
        Ok(Request::new(
            Method::POST,
            &["v1", "devices", &id, "retry"],
            Some(body),
        ))
    }
    fn output(&self, answer: Value) -> String {
        let lines: Vec<String> = answer["retry"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| match f["version"].as_str() {
                        Some(v) => format!("{v} ({})", text(&f["digest"])),
                        None => text(&f["digest"]),
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "device {} will try again at its next check-in: {}",
            self.id,
            lines.join(", ")
        )
    }
}

/// `sluice login`: prints only the token, for `export SLUICE_TOKEN=$(sluice login ...)`.
pub type Login = Client<LoginArgs>;

/// The flags of [`Login`].
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// User name. The password comes from SLUICE_PASSWORD, else from the first
    /// line of stdin (no prompt, so scripts can pipe it).
    #[arg(long)]
    username: String,
}

impl Call for LoginArgs {
    fn request(&self) -> Result<Request, Failure> {
        let password = match std::env::var("SLUICE_PASSWORD") {
            Ok(p) if !p.is_empty() => p,
            _ => {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map_err(|e| {
                    Failure::usage(format!("cannot read the password from stdin: {e}"))
                })?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            }
        };
        if password.is_empty() {
            return Err(Failure::usage(
                "no password: set SLUICE_PASSWORD or write it on stdin",
            ));
        }
        let mut request = Request::new(
            Method::POST,
            &["v1", "auth", "login"],
            Some(json!({"username": self.username, "password": password})),
        );
        request.authenticated = false;
        Ok(request)
    }
    fn output(&self, answer: Value) -> String {
        match answer.get("token").and_then(Value::as_str) {
            Some(token) => token.to_owned(),
            None => answer.to_string(),
        }
    }
}

/// A JSON value as one word for a summary: strings bare, nothing as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(num).unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

/// A number without a trailing `.0`.
fn num(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else if x.is_finite() {
        format!("{x}")
    } else {
        "?".into()
    }
}

/// Rows under a header, in columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c.to_string()
                } else {
                    format!("{c:<w$}", w = width[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    std::iter::once(line(header.to_vec()))
        .chain(
            rows.iter()
                .map(|r| line(r.iter().map(String::as_str).collect())),
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// `label  value` lines, labels padded to the longest.
fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The items of a list answer: a bare array, or a page's `items`.
fn items(answer: &Value) -> &[Value] {
    answer
        .as_array()
        .or_else(|| answer["items"].as_array())
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// `--json` on a read command.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print the server's JSON answer (for `jq`) instead of a summary.
    #[arg(long)]
    json: bool,
}

impl JsonFlag {
    /// The answer as JSON when --json is given, else the summary `summary` makes of it.
    fn or_summary(&self, answer: Value, summary: impl FnOnce(&Value) -> String) -> String {
        if self.json {
            pretty(&answer)
        } else {
            summary(&answer)
        }
    }
}

/// `sluice product create`.
pub type ProductCreate = Client<ProductCreateArgs>;

/// The flags of [`ProductCreate`].
#[derive(Debug, Args)]
pub struct ProductCreateArgs {
    /// Its name: 1–63 lowercase letters, digits and dashes.
    #[arg(long)]
    name: String,
    /// The OCI repository its images live in (`registry.example.com/acme/os`).
    #[arg(long)]
    repository: String,
    /// A line about it.
    #[arg(long)]
    description: Option<String>,
}

impl Call for ProductCreateArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = json!({"name": self.name, "repository": self.repository});
        if let Some(d) = &self.description {
            body["description"] = json!(d);
        }
        Ok(Request::new(Method::POST, &["v1", "products"], Some(body)))
    }
}

/// `sluice product list`.
pub type ProductList = Client<ProductListArgs>;

/// The flags of [`ProductList`].
#[derive(Debug, Args)]
pub struct ProductListArgs {
    #[command(flatten)]
    json: JsonFlag,
}

impl Call for ProductListArgs {
    fn request(&self) -> Result<Request, Failure> {
        Ok(Request::new(Method::GET, &["v1", "products"], None))
    }
    fn output(&self, answer: Value) -> String {
        self.json.or_summary(answer, |answer| {
            let rows: Vec<Vec<String>> = items(answer)
                .iter()
                .map(|p| {
                    ["name", "repository", "created_at", "description"]
                        .map(|k| text(&p[k]))
                        .to_vec()
                })
                .collect();
            if rows.is_empty() {
                return "no products yet: make one with `sluice product create`".into();
            }
            table(&["NAME", "REPOSITORY", "CREATED", "DESCRIPTION"], &rows)
        })
    }
}

/// `sluice product show`.
pub type ProductShow = Client<ProductShowArgs>;

/// The flags of [`ProductShow`].
#[derive(Debug, Args)]
pub struct ProductShowArgs {
    /// The product.
    product: String,
    #[command(flatten)]
    json: JsonFlag,
}

impl Call for ProductShowArgs {
    fn request(&self) -> Result<Request, Failure> {
        Ok(Request::new(
            Method::GET,
            &["v1", "products", &self.product],
            None,
        ))
    }
    fn output(&self, p: Value) -> String {
        self.json.or_summary(p, |p| {
            fields(&[
                ("product", text(&p["name"])),
                ("repository", text(&p["repository"])),
                ("description", text(&p["description"])),
                ("created", text(&p["created_at"])),
            ])
        })
    }
}

/// `sluice product enrollment-secret`.
pub type EnrollmentSecret = Client<EnrollmentSecretArgs>;

/// The flags of [`EnrollmentSecret`].
#[derive(Debug, Args)]
pub struct EnrollmentSecretArgs {
    /// The product.
    product: String,
    /// Replace the secret. The server keeps only its hash, so it cannot be
    /// shown again: rotating is the way to get one. Enrolled devices keep
    /// working; new enrollments need the new secret.
    #[arg(long)]
    rotate: bool,
    /// Print the server's JSON answer (the product with its new secret)
    /// instead of the secret alone.
    #[arg(long)]
    json: bool,
}

impl Call for EnrollmentSecretArgs {
    fn request(&self) -> Result<Request, Failure> {
        if !self.rotate {
            return Err(Failure::usage(format!(
                "the server keeps only a hash of product {}'s enrollment secret, so it cannot be shown again; \
                 pass --rotate to replace it with a new one (printed once; enrolled devices keep working, \
                 new enrollments need the new secret)",
                self.product
            )));
        }
        Ok(Request::new(
            Method::POST,
            &["v1", "products", &self.product, "enrollment-secret"],
            None,
        ))
    }
    fn output(&self, answer: Value) -> String {
        if self.json {
            return pretty(&answer);
        }
        match answer.get("enrollment_secret").and_then(Value::as_str) {
            Some(secret) => secret.to_owned(),
            None => answer.to_string(),
        }
    }
}

/// `sluice release list`.
pub type ReleaseList = Client<ReleaseListArgs>;

/// The flags of [`ReleaseList`].
#[derive(Debug, Args)]
pub struct ReleaseListArgs {
    /// The product.
    #[arg(long)]
    product: String,
    /// Releases per page (1–1000; server default 100).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: Option<u16>,
    /// The `next_cursor` of the previous page.
    #[arg(long)]
    cursor: Option<String>,
    #[command(flatten)]
    json: JsonFlag,
}

impl Call for ReleaseListArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut r = Request::new(
            Method::GET,
            &["v1", "products", &self.product, "releases"],
            None,
        );
        if let Some(l) = self.limit {
            r.query.push(("limit".into(), l.to_string()));
        }
        if let Some(c) = &self.cursor {
            r.query.push(("cursor".into(), c.clone()));
        }
        Ok(r)
    }
    fn output(&self, answer: Value) -> String {
        self.json.or_summary(answer, |answer| {
            let rows: Vec<Vec<String>> = items(answer)
                .iter()
                .map(|r| {
                    vec![
                        text(&r["version"]),
                        text(&r["state"]),
                        if r["floor"] == true { "floor" } else { "-" }.into(),
                        text(&r["created_at"]),
                        text(&r["publisher"]),
                        text(&r["digest"]),
                    ]
                })
                .collect();
            let mut out = if rows.is_empty() {
                format!(
                    "no releases in product {}: publish one with `sluice release publish`",
                    self.product
                )
            } else {
                table(
                    &["VERSION", "STATE", "FLOOR", "PUBLISHED", "BY", "DIGEST"],
                    &rows,
                )
            };
            if let Some(next) = answer["next_cursor"].as_str() {
                out += &format!("\n(more: add --cursor {next})");
            }
            out
        })
    }
}

/// What a `show` command names in a product.
trait Kind {
    /// `release` or `channel`; its collection in the URL is the plural.
    const WHAT: &'static str;
    /// The flag that names it.
    const FLAG: &'static str;
    /// The word that names it, in help and errors.
    const VALUE_NAME: &'static str;
    /// What the word is.
    const HELP: &'static str;
}

/// A release, named by its version.
#[derive(Debug)]
enum Release {}

impl Kind for Release {
    const WHAT: &'static str = "release";
    const FLAG: &'static str = "version";
    const VALUE_NAME: &'static str = "VERSION";
    const HELP: &'static str = "The release's version";
}

/// A channel, named by its name.
#[derive(Debug)]
enum Channel {}

impl Kind for Channel {
    const WHAT: &'static str = "channel";
    const FLAG: &'static str = "channel";
    const VALUE_NAME: &'static str = "CHANNEL";
    const HELP: &'static str = "The channel";
}

/// `--product` and the release or channel to show in it, named once: as a
/// word (`show stable`) or a flag (`show --channel stable`), as the other
/// commands name it.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["name", "name_flag"])))]
struct Named<K: Kind> {
    /// The product.
    #[arg(long)]
    product: String,
    #[arg(value_name = K::VALUE_NAME, help = K::HELP)]
    name: Option<String>,
    #[arg(long = K::FLAG, value_name = K::VALUE_NAME,
          help = format!("{} (instead of {})", K::HELP, K::VALUE_NAME))]
    name_flag: Option<String>,
    #[arg(skip)]
    kind: std::marker::PhantomData<K>,
}

impl<K: Kind> Named<K> {
    /// `GET /v1/products/{product}/{releases|channels}/{name}`.
    fn get(&self) -> Result<Request, Failure> {
        let name = self
            .name
            .as_deref()
            .or(self.name_flag.as_deref())
            .ok_or_else(|| Failure::usage(format!("name the {}: {}", K::WHAT, K::VALUE_NAME)))?;
        let collection = format!("{}s", K::WHAT);
        Ok(Request::new(
            Method::GET,
            &["v1", "products", &self.product, &collection, name],
            None,
        ))
    }
}

/// `sluice release show`.
pub type ReleaseShow = Client<ReleaseShowArgs>;

/// The flags of [`ReleaseShow`].
#[derive(Debug, Args)]
pub struct ReleaseShowArgs {
    #[command(flatten)]
    release: Named<Release>,
    #[command(flatten)]
    json: JsonFlag,
}

impl Call for ReleaseShowArgs {
    fn request(&self) -> Result<Request, Failure> {
        self.release.get()
    }
    fn output(&self, r: Value) -> String {
        self.json.or_summary(r, |r| {
            let mut out = fields(&[
                (
                    "release",
                    format!("{} of {}", text(&r["version"]), self.release.product),
                ),
                ("state", text(&r["state"])),
                ("image", text(&r["image"])),
                ("media type", text(&r["media_type"])),
                (
                    "floor",
                    if r["floor"] == true { "yes" } else { "no" }.into(),
                ),
                (
                    "published",
                    format!("{} by {}", text(&r["created_at"]), text(&r["publisher"])),
                ),
                ("revoked", text(&r["revoked_at"])),
                ("metadata", r["metadata"].to_string()),
            ]);
            let rows: Vec<Vec<String>> = items(&r["platforms"])
                .iter()
                .map(|p| {
                    let platform = match p["variant"].as_str() {
                        Some(v) => format!("{}/{}/{v}", text(&p["os"]), text(&p["architecture"])),
                        None => format!("{}/{}", text(&p["os"]), text(&p["architecture"])),
                    };
                    let signed: Vec<String> = items(&p["signed_by"]).iter().map(text).collect();
                    vec![
                        platform,
                        text(&p["size"]),
                        text(&p["digest"]),
                        if signed.is_empty() {
                            "-".into()
                        } else {
                            signed.join(",")
                        },
                    ]
                })
                .collect();
            if !rows.is_empty() {
                out += "\n\n";
                out += &table(&["PLATFORM", "BYTES", "DIGEST", "SIGNED BY"], &rows);
            }
            out
        })
    }
}

/// `sluice channel create`.
pub type ChannelCreate = Client<ChannelCreateArgs>;

/// The flags of [`ChannelCreate`].
#[derive(Debug, Args)]
pub struct ChannelCreateArgs {
    /// The product.
    #[arg(long)]
    product: String,
    /// The channel's name (`stable`, `beta`): 1–63 lowercase letters, digits
    /// and dashes.
    name: String,
    /// A line about it.
    #[arg(long)]
    description: Option<String>,
}

impl Call for ChannelCreateArgs {
    fn request(&self) -> Result<Request, Failure> {
        let mut body = json!({"name": self.name});
        if let Some(d) = &self.description {
            body["description"] = json!(d);
        }
        Ok(Request::new(
            Method::POST,
            &["v1", "products", &self.product, "channels"],
            Some(body),
        ))
    }
}

/// `sluice channel show`.
pub type ChannelShow = Client<ChannelShowArgs>;

/// The flags of [`ChannelShow`].
#[derive(Debug, Args)]
pub struct ChannelShowArgs {
    #[command(flatten)]
    channel: Named<Channel>,
    #[command(flatten)]
    json: JsonFlag,
}

impl Call for ChannelShowArgs {
    fn request(&self) -> Result<Request, Failure> {
        self.channel.get()
    }
    fn output(&self, c: Value) -> String {
        self.json.or_summary(c, |c| {
            let r = &c["rollout"];
            let mut rollout = format!("{} %", text(&r["percent"]));
            if r["effective_percent"] != r["percent"] {
                rollout += &format!(" (now {} %)", text(&r["effective_percent"]));
            }
            if r["ramp"].is_object() {
                let ramp = &r["ramp"];
                rollout += &format!(
                    ", ramp from {} % to {} % over {} min since {}",
                    text(&ramp["from_percent"]),
                    text(&ramp["to_percent"]),
                    text(&ramp["over_minutes"]),
                    text(&ramp["started_at"])
                );
            }
            let paused = if r["paused"] == true {
                format!("yes: {}", text(&r["paused_reason"]))
            } else {
                "no".into()
            };
            let g = &c["gate"];
            let gate = format!(
                "{} ({} of {} reports failed; halts above {} % once {} devices reported)",
                if g["tripped"] == true {
                    "TRIPPED"
                } else {
                    "ok"
                },
                text(&g["failures"]),
                text(&g["reports"]),
                text(&g["max_failure_percent"]),
                text(&g["min_reports"])
            );
            let mut out = fields(&[
                (
                    "channel",
                    format!("{} of {}", text(&c["name"]), self.channel.product),
                ),
                ("head", text(&c["head"])),
                ("base", text(&c["base"])),
                (
                    "rolled back",
                    match (c["rolled_back"] == true, c["rolled_back_from"].as_str()) {
                        (true, Some(from)) => format!("yes, from {from}"),
                        (true, None) => "yes".into(),
                        (false, _) => "no".into(),
                    },
                ),
                ("rollout", rollout),
                ("paused", paused),
                ("gate", gate),
                ("serial", text(&c["serial"])),
                ("updated", text(&c["updated_at"])),
            ]);
            let rows: Vec<Vec<String>> = items(&c["devices"])
                .iter()
                .map(|d| vec![text(&d["version"]), text(&d["status"]), text(&d["count"])])
                .collect();
            out += "\n\n";
            if rows.is_empty() {
                out += "no devices on this channel yet";
            } else {
                out += &table(&["VERSION", "STATUS", "DEVICES"], &rows);
            }
            out
        })
    }
}

/// `sluice token list`.
pub type TokenList = Client<TokenListArgs>;

/// The flags of [`TokenList`].
#[derive(Debug, Args)]
pub struct TokenListArgs {
    #[command(flatten)]
    json: JsonFlag,
}

impl Call for TokenListArgs {
    fn request(&self) -> Result<Request, Failure> {
        Ok(Request::new(Method::GET, &["v1", "tokens"], None))
    }
    fn output(&self, answer: Value) -> String {
        self.json.or_summary(answer, |answer| {
            let rows: Vec<Vec<String>> = items(answer)
                .iter()
                .map(|t| {
                    let products: Vec<String> = items(&t["products"]).iter().map(text).collect();
                    let state = if t["revoked_at"].is_string() {
                        format!("revoked {}", text(&t["revoked_at"]))
                    } else {
                        format!("expires {}", text(&t["expires_at"]))
                    };
                    vec![
                        text(&t["id"]),
                        text(&t["name"]),
                        text(&t["role"]),
                        if products.is_empty() {
                            "-".into()
                        } else {
                            products.join(",")
                        },
                        text(&t["created_by"]),
                        state,
                    ]
                })
                .collect();
            if rows.is_empty() {
                return "no API tokens yet: make one with `sluice token create`".into();
            }
            table(
                &["ID", "NAME", "ROLE", "PRODUCTS", "CREATED BY", "STATE"],
                &rows,
            )
        })
    }
}

/// `sluice token revoke`.
pub type TokenRevoke = Client<TokenRevokeArgs>;

/// The flags of [`TokenRevoke`].
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's id (`sluice token list`).
    id: uuid::Uuid,
}

impl Call for TokenRevokeArgs {
    fn request(&self) -> Result<Request, Failure> {
        let id = self.id.to_string();
        Ok(Request::new(Method::DELETE, &["v1", "tokens", &id], None))
    }
    fn no_content(&self) -> Option<String> {
        Some(format!("token {} revoked", self.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command as Top};
    use clap::Parser;

    /// The leaf command parsed from a command line, or clap's error.
    fn parse_args(args: &[&str]) -> Result<Box<dyn Command>, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied()))?;
        Ok(crate::client_command(cli.command)
            .unwrap_or_else(|_| panic!("{args:?} is not a client command")))
    }

    /// [`parse_args`] of a command line whose words are split at spaces.
    fn parse(line: &str) -> Result<Box<dyn Command>, clap::Error> {
        parse_args(&line.split_whitespace().collect::<Vec<_>>())
    }

    /// The call a command line that parses makes, or why it cannot.
    fn request(line: &str) -> Result<Request, Failure> {
        parse(line).unwrap().call().request()
    }

    fn body(line: &str) -> Value {
        request(line).unwrap().body.unwrap()
    }

    /// Asserts that clap refuses `line` as a usage error.
    fn refused(line: &str) {
        assert_eq!(
            parse(line).err().map(|e| e.exit_code()),
            Some(Exit::Usage as i32),
            "{line:?} was accepted"
        );
    }

    #[test]
    fn channel_without_percent_means_all_devices() {
        assert_eq!(
            parse_channel_target("stable"),
            Ok(ChannelTarget {
                name: "stable".into(),
                percent: 100
            })
        );
    }

    #[test]
    fn channel_with_percent() {
        assert_eq!(
            parse_channel_target("beta:10"),
            Ok(ChannelTarget {
                name: "beta".into(),
                percent: 10
            })
        );
        assert_eq!(parse_channel_target("beta:0").unwrap().percent, 0);
        assert_eq!(parse_channel_target("beta:100").unwrap().percent, 100);
    }

    /// A bad percent or a missing name is refused before anything is sent.
    #[test]
    fn channel_refuses_bad_values() {
        for bad in [
            "beta:101", "beta:-1", "beta:ten", "beta:", ":10", "", "beta:1.5",
        ] {
            assert!(parse_channel_target(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(exit_for_status(401), Exit::Auth);
        assert_eq!(exit_for_status(403), Exit::Auth);
        assert_eq!(exit_for_status(409), Exit::Conflict);
        assert_eq!(exit_for_status(400), Exit::Rejected);
        assert_eq!(exit_for_status(404), Exit::Rejected);
        assert_eq!(exit_for_status(422), Exit::Rejected);
        assert_eq!(exit_for_status(429), Exit::Unavailable);
        assert_eq!(exit_for_status(500), Exit::Unavailable);
        assert_eq!(exit_for_status(502), Exit::Unavailable);
        assert_eq!(exit_for_status(503), Exit::Unavailable);
        assert_eq!(exit_for_status(302), Exit::Other);
    }

    /// The codes are the documented ones: scripts depend on the numbers.
    #[test]
    fn exit_code_numbers() {
        let codes = [
            Exit::Other,
            Exit::Usage,
            Exit::Auth,
            Exit::Conflict,
            Exit::Rejected,
            Exit::Unavailable,
        ]
        .map(|e| e as i32);
        assert_eq!(codes, [1, 2, 3, 4, 5, 6]);
        for (code, line) in [
            (2, "  2  usage"),
            (3, "  3  authentication"),
            (4, "  4  conflict: HTTP 409"),
            (5, "  5  rejected"),
            (6, "  6  unavailable"),
        ] {
            assert!(EXIT_CODES_HELP.contains(line), "code {code} undocumented");
        }
    }

    #[test]
    fn problem_detail_is_the_message() {
        let body = r#"{"type":"about:blank","title":"Conflict","status":409,
            "detail":"version 1.2.0 exists with another digest"}"#;
        assert_eq!(
            failure_from_response(409, body),
            Failure {
                exit: Exit::Conflict,
                message: "version 1.2.0 exists with another digest (HTTP 409)".into()
            }
        );
    }

    /// A proxy's HTML page or an empty body still gives a useful line.
    #[test]
    fn non_problem_bodies() {
        let f = failure_from_response(502, "<html>Bad Gateway</html>\n");
        assert_eq!(f.exit, Exit::Unavailable);
        assert_eq!(f.message, "<html>Bad Gateway</html> (HTTP 502)");
        let f = failure_from_response(404, "");
        assert_eq!(f.exit, Exit::Rejected);
        assert_eq!(f.message, "Not Found (HTTP 404)");
        let f = failure_from_response(401, r#"{"title":"Unauthorized","status":401}"#);
        assert_eq!(f.message, "Unauthorized (HTTP 401)");
    }

    #[test]
    fn urls_escape_segments_and_keep_a_prefix() {
        let path: Vec<String> = ["v1", "products", "a b/c"].map(String::from).into();
        assert_eq!(
            url("http://h:8080", &path).unwrap().as_str(),
            "http://h:8080/v1/products/a%20b%2Fc"
        );
        assert_eq!(
            url("https://h/sluice/", &path[..2]).unwrap().as_str(),
            "https://h/sluice/v1/products"
        );
        assert_eq!(url("h:8080", &path).unwrap_err().exit, Exit::Usage);
        assert_eq!(url("not a url", &path).unwrap_err().exit, Exit::Usage);
    }

    #[test]
    fn publish_body() {
        let r = request(
            "release publish --product acme-os --version 1.2.0 --image reg/acme/os:1.2.0 \
             --channel beta:10 --channel dev --floor",
        )
        .unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, ["v1", "products", "acme-os", "releases"]);
        assert_eq!(
            r.body.unwrap(),
            json!({"version": "1.2.0", "image": "reg/acme/os:1.2.0", "floor": true,
                   "channels": [{"name": "beta", "percent": 10}, {"name": "dev", "percent": 100}]})
        );
    }

    #[test]
    fn publish_reads_metadata_file() {
        let dir = std::env::temp_dir().join(format!("sluice-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"git_commit": "abc", "x": [1]}"#).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "[1, 2]").unwrap();
        let with = |f: &std::path::Path| {
            request(&format!(
                "release publish --product p --version 1.0.0 --image r:t --metadata {}",
                f.display()
            ))
        };
        let metadata = with(&good).unwrap().body.unwrap()["metadata"].clone();
        assert_eq!(metadata, json!({"git_commit": "abc", "x": [1]}));
        assert_eq!(with(&bad).unwrap_err().exit, Exit::Usage);
        assert_eq!(
            with(&dir.join("missing.json")).unwrap_err().exit,
            Exit::Usage
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_channel_flag_is_a_usage_error() {
        refused("release publish --product p --version 1.0.0 --image r:t --channel beta:150");
    }

    #[test]
    fn rollout_sends_only_what_is_given() {
        let with = |extra: &str| {
            body(&format!(
                "channel rollout --product p --channel stable {extra}"
            ))
        };
        assert_eq!(with("--percent 25"), json!({"percent": 25}));
        assert_eq!(with("--pause"), json!({"paused": true}));
        assert_eq!(with("--resume"), json!({"paused": false}));
        assert_eq!(
            with("--ramp-to 50 --ramp-over-minutes 120"),
            json!({"ramp": {"to_percent": 50, "over_minutes": 120}})
        );
        assert_eq!(
            with("--gate-max-failure-percent 2.5 --gate-min-reports 20"),
            json!({"gate": {"max_failure_percent": 2.5, "min_reports": 20}})
        );
        let r = request("channel rollout --product p --channel stable --percent 5").unwrap();
        assert_eq!(r.method, Method::PATCH);
        assert_eq!(
            r.path,
            ["v1", "products", "p", "channels", "stable", "rollout"]
        );
    }

    /// Half a ramp or gate, both pause and resume, or no change at all: refused.
    #[test]
    fn rollout_usage_errors() {
        for extra in [
            "",
            "--ramp-to 50",
            "--ramp-over-minutes 5",
            "--pause --resume",
            "--gate-min-reports 3",
            "--gate-max-failure-percent 101 --gate-min-reports 3",
            "--percent 101",
        ] {
            refused(&format!(
                "channel rollout --product p --channel stable {extra}"
            ));
        }
    }

    #[test]
    fn promote_and_rollback_bodies() {
        let promote = |extra: &str| {
            format!("channel promote --product p --channel beta --version 2.0.0 {extra}")
        };
        // A staged rollout by default: 10 %.
        assert_eq!(
            body(&promote("")),
            json!({"version": "2.0.0", "percent": 10})
        );
        assert_eq!(
            body(&promote("--percent 100")),
            json!({"version": "2.0.0", "percent": 100})
        );
        assert_eq!(
            body(&promote("--ramp-to 100 --ramp-minutes 60")),
            json!({"version": "2.0.0", "percent": 10, "ramp": {"to_percent": 100, "over_minutes": 60}})
        );
        assert_eq!(
            body(&promote("--dry-run")),
            json!({"version": "2.0.0", "percent": 10, "dry_run": true})
        );
        // Half a ramp, a ramp downwards, a percent above 100: refused before sending.
        for extra in [
            "--ramp-to 50",
            "--ramp-minutes 5",
            "--ramp-to 101 --ramp-minutes 5",
            "--ramp-to 50 --ramp-minutes 0",
            "--percent 101",
        ] {
            refused(&promote(extra));
        }
        let down = request(&promote("--percent 50 --ramp-to 20 --ramp-minutes 5")).unwrap_err();
        assert_eq!(down.exit, Exit::Usage);
        assert!(down.message.contains("only raises"), "{}", down.message);
        let rollback = "channel rollback --product p --channel beta";
        assert_eq!(body(rollback), json!({}));
        assert_eq!(
            body(&format!("{rollback} --version 1.0.0")),
            json!({"version": "1.0.0"})
        );
    }

    #[test]
    fn device_commands() {
        let id = "6f1c2a9e-2b7d-4c47-9d55-0c8a7f0e2f11";
        let r = request(&format!("device revoke {id} --reason stolen")).unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, ["v1", "devices", id, "revoke"]);
        assert_eq!(r.body, Some(json!({"reason": "stolen"})));
        let r = request(&format!("device reset {id}")).unwrap();
        assert_eq!(
            (r.method, r.path),
            (
                Method::POST,
                vec![
                    "v1".to_string(),
                    "devices".into(),
                    id.into(),
                    "reset".into()
                ]
            )
        );
        let r = request(&format!("device delete {id}")).unwrap();
        assert_eq!((r.method, r.body), (Method::DELETE, None));
        // A reason only goes with revoke; an id must be a UUID.
        let f = request(&format!("device delete {id} --reason x")).unwrap_err();
        assert_eq!(f.exit, Exit::Usage);
        assert!(parse("device revoke not-a-uuid").is_err());
        let r = request("device list --product acme --revoked true").unwrap();
        assert_eq!(r.path, ["v1", "devices"]);
        assert_eq!(
            r.query,
            [
                ("product".to_string(), "acme".to_string()),
                ("revoked".into(), "true".into())
            ]
        );
    }

    #[test]
    fn token_create() {
        assert_eq!(
            body("token create --name ci --product a --product b --expires-in-days 30"),
            json!({"name": "ci", "role": "publisher", "products": ["a", "b"], "expires_in_days": 30})
        );
        let no_product = request("token create --name ci");
        assert_eq!(no_product.unwrap_err().exit, Exit::Usage);
    }

    /// The summary line says what was set and how to go on.
    #[test]
    fn promote_summary() {
        let promote = |extra: &str| {
            parse(&format!(
                "channel promote --product acme --channel stable --version 1.4.0 {extra}"
            ))
            .unwrap()
        };
        let output = |extra: &str, answer: Value| promote(extra).call().output(answer);
        let channel = |percent: f64, ramp: Value| {
            json!({"name": "stable", "head": "1.4.0", "base": "1.3.0",
                   "rollout": {"percent": percent, "effective_percent": percent, "ramp": ramp, "paused": false}})
        };
        assert_eq!(
            output("", channel(10.0, Value::Null)),
            "1.4.0 is head of stable at 10 % (base 1.3.0) (raise with `sluice channel rollout --product acme --channel stable --percent N`)"
        );
        assert_eq!(
            output("", channel(100.0, Value::Null)),
            "1.4.0 is head of stable at 100 % (base 1.3.0)"
        );
        assert_eq!(
            output(
                "",
                channel(
                    2.5,
                    json!({"from_percent": 2.5, "to_percent": 100.0, "over_minutes": 90.0})
                )
            ),
            "1.4.0 is head of stable at 2.5 % (base 1.3.0), ramping to 100 % over 90 min"
        );
        let raw = channel(10.0, Value::Null);
        let printed: Value = serde_json::from_str(&output("--json", raw.clone())).unwrap();
        assert_eq!(printed, raw);
        // The server's plan follows the summary; a dry run prints only the plan.
        let mut planned = channel(20.0, Value::Null);
        planned["plan"] = json!({"message": "1.4.0 becomes the head at 20 %. 1.3.0 was not fully rolled out (at 26 %), so the base stays 1.2.0."});
        assert_eq!(
            output("", planned.clone()),
            "1.4.0 is head of stable at 20 % (base 1.3.0) (raise with `sluice channel rollout --product acme --channel stable --percent N`)\n\
             1.4.0 becomes the head at 20 %. 1.3.0 was not fully rolled out (at 26 %), so the base stays 1.2.0."
        );
        assert_eq!(
            output("--dry-run", planned),
            "dry run, nothing was changed: 1.4.0 becomes the head at 20 %. 1.3.0 was not fully rolled out (at 26 %), so the base stays 1.2.0."
        );
    }

    #[test]
    fn warnings_are_the_strings_of_the_array() {
        assert_eq!(
            warnings(&json!({"warnings": ["no device runs 1.3.0", 7, "second"]})),
            ["no device runs 1.3.0", "second"]
        );
        assert!(warnings(&json!({"version": "1.0.0"})).is_empty());
        assert!(warnings(&json!({"warnings": "not an array"})).is_empty());
        assert!(warnings(&json!([1, 2])).is_empty());
    }

    #[test]
    fn read_commands() {
        let path = |line: &str| {
            let r = request(line).unwrap();
            assert_eq!(r.method, Method::GET, "{line}");
            assert!(r.body.is_none());
            (r.path, r.query)
        };
        assert_eq!(path("product list").0, ["v1", "products"]);
        assert_eq!(path("product show acme").0, ["v1", "products", "acme"]);
        assert_eq!(
            path("release list --product acme --limit 5 --cursor 10"),
            (
                ["v1", "products", "acme", "releases"]
                    .map(String::from)
                    .to_vec(),
                vec![
                    ("limit".to_string(), "5".to_string()),
                    ("cursor".into(), "10".into())
                ]
            )
        );
        // A release or a channel is named as a word or with its flag.
        for (line, collection, name) in [
            ("release show --product acme 1.2.0", "releases", "1.2.0"),
            (
                "release show --product acme --version 1.2.0",
                "releases",
                "1.2.0",
            ),
            (
                "channel show --product acme stable --json",
                "channels",
                "stable",
            ),
            (
                "channel show --product acme --channel stable",
                "channels",
                "stable",
            ),
        ] {
            assert_eq!(path(line).0, ["v1", "products", "acme", collection, name]);
        }
        assert_eq!(path("token list").0, ["v1", "tokens"]);
        // The thing to show must be named, once.
        for line in [
            "release show --product acme",
            "release show --product acme 1.0.0 --version 1.0.0",
            "channel show --product acme",
            "channel show --product acme stable --channel stable",
            "channel show stable",
            "product show",
            "release list --product acme --limit 0",
        ] {
            refused(line);
        }
    }

    #[test]
    fn product_and_token_changes() {
        let r = parse_args(&[
            "product",
            "create",
            "--name",
            "acme",
            "--repository",
            "r.example/acme",
            "--description",
            "Acme OS",
        ])
        .unwrap()
        .call()
        .request()
        .unwrap();
        assert_eq!(
            (r.method, r.path.clone()),
            (Method::POST, vec!["v1".to_string(), "products".into()])
        );
        assert_eq!(
            r.body,
            Some(json!({"name": "acme", "repository": "r.example/acme", "description": "Acme OS"}))
        );
        // Rotating is the only way to a secret, and must be asked for.
        let f = request("product enrollment-secret acme").unwrap_err();
        assert_eq!(f.exit, Exit::Usage);
        assert!(f.message.contains("--rotate"), "{}", f.message);
        let cmd = parse("product enrollment-secret acme --rotate").unwrap();
        let r = cmd.call().request().unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, ["v1", "products", "acme", "enrollment-secret"]);
        assert_eq!(
            cmd.call()
                .output(json!({"name": "acme", "enrollment_secret": "s3cret"})),
            "s3cret"
        );

        let id = "6f1c2a9e-2b7d-4c47-9d55-0c8a7f0e2f11";
        let cmd = parse(&format!("token revoke {id}")).unwrap();
        let r = cmd.call().request().unwrap();
        assert_eq!(
            (r.method, r.path),
            (
                Method::DELETE,
                vec!["v1".to_string(), "tokens".into(), id.into()]
            )
        );
        assert_eq!(
            cmd.call().no_content().unwrap(),
            format!("token {id} revoked")
        );
        assert!(parse("token revoke not-a-uuid").is_err());
    }

    #[test]
    fn tables_pad_columns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "y".into()],
                vec!["z".into(), "wwww".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    wwww");
        assert_eq!(num(10.0), "10");
        assert_eq!(num(2.5), "2.5");
        assert_eq!(text(&Value::Null), "-");
        assert_eq!(text(&json!(3)), "3");
    }

    #[test]
    fn keys_rotate_needs_a_known_role() {
        let r = request("keys rotate --role image").unwrap();
        assert_eq!(r.path, ["v1", "keys", "image", "rotate"]);
        assert!(r.body.is_none());
        assert!(parse("keys rotate --role other").is_err());
        let r = request("keys activate --role response --force").unwrap();
        assert_eq!(r.path, ["v1", "keys", "response", "activate"]);
        assert_eq!(r.body, Some(json!({"force": true})));
        assert!(parse("keys activate --role root").is_err());
        let r = request("keys revoke --role image --key-id abc").unwrap();
        assert_eq!(r.path, ["v1", "keys", "image", "revoke"]);
        assert_eq!(r.body, Some(json!({"key_id": "abc"})));
    }

    /// `--server`/`--token` work after the subcommand, and the server has a default.
    #[test]
    fn remote_flags() {
        let cmd = parse(
            "channel rollback --product p --channel c --server http://sluice:9000 --token t0k",
        )
        .unwrap();
        assert_eq!(cmd.remote().server, "http://sluice:9000");
        assert_eq!(cmd.remote().token.as_deref(), Some("t0k"));
    }

    #[test]
    fn login_prints_only_the_token() {
        let cli = Cli::try_parse_from(["sluice", "login", "--username", "admin"]).unwrap();
        let Top::Login(login) = cli.command else {
            panic!("not login")
        };
        assert_eq!(
            login
                .call()
                .output(json!({"token": "abc", "role": "admin"})),
            "abc"
        );
    }

    /// A real server (the whole router, a real Postgres) on a free port, with
    /// user `admin` / `correct horse battery`; answers its URL.
    async fn start_server(db: &sqlx::PgPool) -> String {
        use sqlx::ConnectOptions;
        #[derive(clap::Parser)]
        struct ServeArgs {
            #[command(flatten)]
            config: sluice_server::config::Config,
        }
        let dir = std::env::temp_dir().join(format!("sluice-cli-e2e-{}", uuid::Uuid::new_v4()));
        let url = db.connect_options().to_url_lossy().to_string();
        let args = ServeArgs::try_parse_from([
            "serve",
            "--database-url",
            &url,
            "--data-dir",
            dir.to_str().unwrap(),
            "--key-passphrase",
            "test passphrase",
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        let state = sluice_server::app::build_state(args.config).await.unwrap();
        sluice_server::api::auth::bootstrap_admin(&state.db, Some("correct horse battery"))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(sluice_server::app::run(
            listener,
            state,
            std::future::pending(),
        ));
        server
    }

    /// Against the real server: answers come back as JSON, and 401, 404 and
    /// 409 problems come back as their exit classes with the server's detail.
    #[sqlx::test(migrations = false)]
    async fn against_a_real_server(db: sqlx::PgPool) {
        let server = start_server(&db).await;
        let login = |password: &str| {
            let mut r = Request::new(
                Method::POST,
                &["v1", "auth", "login"],
                Some(json!({"username": "admin", "password": password})),
            );
            r.authenticated = false;
            r
        };
        let anonymous = Remote {
            server: server.clone(),
            token: None,
        };
        let f = send(&anonymous, login("wrong password")).await.unwrap_err();
        assert_eq!(f.exit, Exit::Auth);
        assert!(f.message.ends_with("(HTTP 401)"), "{}", f.message);
        let answer = send(&anonymous, login("correct horse battery"))
            .await
            .unwrap()
            .unwrap();
        let token = answer["token"].as_str().unwrap().to_owned();

        let run = |line: &str| {
            let cmd = parse(&format!("{line} --server {server} --token {token}")).unwrap();
            async move { send(cmd.remote(), cmd.call().request()?).await }
        };
        let key = run("keys rotate --role image").await.unwrap().unwrap();
        assert_eq!(key["role"], "image");
        let f = run("token create --name ci --product nope")
            .await
            .unwrap_err();
        assert_eq!(f.exit, Exit::Rejected);
        assert!(f.message.contains("nope"), "{}", f.message);

        let admin = Remote {
            server: server.clone(),
            token: Some(token.clone()),
        };
        let product = || {
            Request::new(
                Method::POST,
                &["v1", "products"],
                Some(json!({"name": "acme-os", "repository": "127.0.0.1:5000/acme/os"})),
            )
        };
        send(&admin, product()).await.unwrap();
        let created = run("token create --name ci --product acme-os")
            .await
            .unwrap()
            .unwrap();
        assert!(created["token"].as_str().is_some_and(|t| !t.is_empty()));
        let f = send(&admin, product()).await.unwrap_err();
        assert_eq!(f.exit, Exit::Conflict);
        assert!(f.message.ends_with("(HTTP 409)"), "{}", f.message);

        // A publisher token may not rotate keys.
        let publisher = Remote {
            server: server.clone(),
            token: created["token"].as_str().map(str::to_owned),
        };
        let f = send(&publisher, request("keys rotate --role image").unwrap())
            .await
            .unwrap_err();
        assert_eq!(f.exit, Exit::Auth);
        assert!(f.message.ends_with("(HTTP 403)"), "{}", f.message);
    }

    /// Without a token nothing is sent and the exit class is auth; an unreachable
    /// server names the URL and SLUICE_SERVER.
    #[tokio::test]
    async fn failures_before_and_at_the_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let server = format!("http://127.0.0.1:{port}");
        let request = || Request::new(Method::POST, &["v1", "tokens"], Some(json!({})));
        let no_token = Remote {
            server: server.clone(),
            token: None,
        };
        assert_eq!(
            send(&no_token, request()).await.unwrap_err().exit,
            Exit::Auth
        );
        let refused = Remote {
            server: server.clone(),
            token: Some("t".into()),
        };
        let f = send(&refused, request()).await.unwrap_err();
        assert_eq!(f.exit, Exit::Unavailable);
        assert!(f.message.contains(&server), "{}", f.message);
        assert!(f.message.contains("SLUICE_SERVER"), "{}", f.message);
    }
}
