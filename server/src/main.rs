//! `sluice`: the server (`sluice serve`) and the CLI for CI and admins.
#![deny(unsafe_code)]

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_protocol::KeyRole;
use sluice_server::api::auth;
use sluice_server::infra::keystore as keys;
use sluice_server::{app, config::Config, db};
use std::path::PathBuf;

// mimalloc instead of glibc's malloc: the resolve path allocates a few small
// buffers per answer on two worker threads, and glibc's arenas spent about
// 15 % of the server's CPU on them under the benchmark (`BENCHMARKS.md`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: image-based OS releases for fleets of devices.
#[derive(Parser)]
#[command(name = "sluice", version, about, after_help = cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Config),
    /// Apply database migrations and exit.
    Migrate {
        /// PostgreSQL connection URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Manage people who log in.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Manage signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage products: create, list, show, rotate the enrollment secret.
    Product {
        #[command(subcommand)]
        command: ProductCommand,
    },
    /// Publish releases (CI), list and show them.
    Release {
        #[command(subcommand)]
        command: ReleaseCommand,
    },
    /// Show channels, promote releases and steer rollouts.
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// Manage API tokens for CI: create, list, revoke.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage enrolled devices: list, revoke, reset, delete.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Log in as a person and print the token (for SLUICE_TOKEN).
    Login(cli::Login),
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List devices (one page; pass --cursor for the next).
    List(cli::DeviceList),
    /// Refuse every token of a device at once; its machine id cannot enroll
    /// again until it is reset or deleted.
    Revoke(cli::DeviceAction),
    /// Forget a device's key and lift a revocation: the next enrollment of its
    /// machine id binds a new key to it.
    Reset(cli::DeviceAction),
    /// Delete a device and its events; its machine id may enroll again as a new device.
    Delete(cli::DeviceAction),
    /// Let a device try again a release it reported as failed or rolled back
    /// (all of them, or one --version or --digest).
    Retry(cli::DeviceRetry),
    /// Replace a device's labels (`ring=canary site=berlin`; none: remove all).
    Labels(cli::DeviceLabels),
}

#[derive(Subcommand)]
enum ProductCommand {
    /// Make a product; its enrollment secret is in the answer, shown this once.
    Create(cli::ProductCreate),
    /// List the products.
    List(cli::ProductList),
    /// Show one product.
    Show(cli::ProductShow),
    /// Replace the product's enrollment secret (--rotate) and print the new one.
    EnrollmentSecret(cli::EnrollmentSecret),
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Publish a build: the server resolves the image to a digest, signs it, stores it.
    Publish(cli::Publish),
    /// List a product's releases, newest first (one page; pass --cursor for the next).
    List(cli::ReleaseList),
    /// Show one release: digest, platforms and their signatures, metadata.
    Show(cli::ReleaseShow),
    /// Mark a release urgent: devices reboot into it outside their
    /// maintenance windows (--off gives the windows back).
    Urgent(cli::ReleaseUrgent),
}

#[derive(Subcommand)]
enum ChannelCommand {
    /// Make a channel in a product; it has no head until a release is
    /// published into it or promoted.
    Create(cli::ChannelCreate),
    /// Show a channel: head, base, rollout, health gate, devices by version.
    Show(cli::ChannelShow),
    /// Make a release the channel's head; the old head becomes its base if it was fully rolled out.
    Promote(cli::Promote),
    /// Change the channel's rollout: percent, ramp, pause, health gate.
    Rollout(cli::Rollout),
    /// Go back to the base (or --version) for every device, downgrading them.
    Rollback(cli::Rollback),
    /// Set when devices may reboot into a staged release (maintenance
    /// windows) and how many at once (reboot leases); replaces the policy.
    RebootPolicy(cli::RebootPolicy),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make an API token; its secret is printed this once.
    Create(cli::TokenCreate),
    /// List the API tokens (never their secrets).
    List(cli::TokenList),
    /// Revoke an API token: it stops working at once.
    Revoke(cli::TokenRevoke),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create (or reset the password of) a user, directly in the database.
    Create {
        /// PostgreSQL connection URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// User name.
        #[arg(long)]
        username: String,
        /// Password (read from SLUICE_NEW_PASSWORD if not given).
        #[arg(long, env = "SLUICE_NEW_PASSWORD", hide_env_values = true)]
        password: String,
        /// `admin` or `viewer`.
        #[arg(long, default_value = "admin")]
        role: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new key in the data folder while the server is stopped: current
    /// before the first key list, else listed as `next` when the server starts.
    Generate {
        /// Folder for keys and local state.
        #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
        data_dir: PathBuf,
        /// Passphrase that encrypts the private keys at rest.
        #[arg(long, env = "SLUICE_KEY_PASSPHRASE", hide_env_values = true)]
        key_passphrase: String,
        /// `image`, `response` or `root`.
        #[arg(long)]
        role: String,
    },
    /// Publish a new `next` image or response key (a new root key takes over at once).
    Rotate(cli::KeysRotate),
    /// Sign with the `next` key from now on; the current one is retired.
    Activate(cli::KeysActivate),
    /// Drop a key from the key list: devices stop trusting it.
    Revoke(cli::KeysRevoke),
    /// The key list, each key's state and how many devices hold it.
    Status(cli::KeysStatus),
}

/// The command as a client command (talks to a server), or back unchanged.
fn client_command(command: Command) -> Result<Box<dyn cli::Command>, Box<Command>> {
    Ok(match command {
        Command::Product { command } => match command {
            ProductCommand::Create(c) => Box::new(c),
            ProductCommand::List(c) => Box::new(c),
            ProductCommand::Show(c) => Box::new(c),
            ProductCommand::EnrollmentSecret(c) => Box::new(c),
        },
        Command::Release { command } => match command {
            ReleaseCommand::Publish(c) => Box::new(c),
            ReleaseCommand::List(c) => Box::new(c),
            ReleaseCommand::Show(c) => Box::new(c),
            ReleaseCommand::Urgent(c) => Box::new(c),
        },
        Command::Channel { command } => match command {
            ChannelCommand::Create(c) => Box::new(c),
            ChannelCommand::Show(c) => Box::new(c),
            ChannelCommand::Promote(c) => Box::new(c),
            ChannelCommand::Rollout(c) => Box::new(c),
            ChannelCommand::Rollback(c) => Box::new(c),
            ChannelCommand::RebootPolicy(c) => Box::new(c),
        },
        Command::Token { command } => match command {
            TokenCommand::Create(c) => Box::new(c),
            TokenCommand::List(c) => Box::new(c),
            TokenCommand::Revoke(c) => Box::new(c),
        },
        Command::Keys {
            command: KeysCommand::Rotate(c),
        } => Box::new(c),
        Command::Keys {
            command: KeysCommand::Activate(c),
        } => Box::new(c),
        Command::Keys {
            command: KeysCommand::Revoke(c),
        } => Box::new(c),
        Command::Keys {
            command: KeysCommand::Status(c),
        } => Box::new(c),
        Command::Device { command } => match command {
            DeviceCommand::List(c) => Box::new(c),
            DeviceCommand::Revoke(c) => Box::new(c.with_action("revoke")),
            DeviceCommand::Reset(c) => Box::new(c.with_action("reset")),
            DeviceCommand::Delete(c) => Box::new(c.with_action("delete")),
            DeviceCommand::Retry(c) => Box::new(c),
            DeviceCommand::Labels(c) => Box::new(c),
        },
        Command::Login(c) => Box::new(c),
        other => return Err(Box::new(other)),
    })
}

fn parse_role(role: &str) -> anyhow::Result<KeyRole> {
    keys::parse_role(role).map_err(anyhow::Error::msg)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match client_command(cli.command) {
        Ok(client) => cli::run(client.as_ref()).await,
        Err(command) => match run(*command).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
    };
    std::process::exit(code);
}

/// Runs a server-side command (one that is not a client command).
async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(config) => serve(config).await,
        Command::Migrate { database_url } => {
            let pool = db::connect(&database_url).await?;
            db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Admin {
            command:
                AdminCommand::Create {
                    database_url,
                    username,
                    password,
                    role,
                },
        } => {
            anyhow::ensure!(
                matches!(role.as_str(), "admin" | "viewer"),
                "role must be `admin` or `viewer`"
            );
            anyhow::ensure!(
                password.len() >= 8,
                "the password must have at least 8 characters"
            );
            let pool = db::connect(&database_url).await?;
            db::migrate(&pool).await?;
            sqlx::query(
                "INSERT INTO users (id, username, password_hash, role) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash, role = EXCLUDED.role",
            )
            .bind(uuid::Uuid::new_v4())
            .bind(&username)
            .bind(auth::hash_password(&password))
            .bind(&role)
            .execute(&pool)
            .await?;
            println!("user {username} ({role}) saved");
            Ok(())
        }
        Command::Keys {
            command:
                KeysCommand::Generate {
                    data_dir,
                    key_passphrase,
                    role,
                },
        } => {
            let public =
                keys::generate(&data_dir.join("keys"), &key_passphrase, parse_role(&role)?)?;
            println!("{}", serde_json::to_string_pretty(&public)?);
            Ok(())
        }
        Command::Keys {
            command:
                KeysCommand::Rotate(_)
                | KeysCommand::Activate(_)
                | KeysCommand::Revoke(_)
                | KeysCommand::Status(_),
        }
        | Command::Product { .. }
        | Command::Release { .. }
        | Command::Channel { .. }
        | Command::Token { .. }
        | Command::Device { .. }
        | Command::Login(_) => unreachable!("client commands run through cli::run"),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let listen = config.listen;
    let admin_password = config.admin_password.clone();
    let (tls_cert, tls_key) = (config.tls_cert.clone(), config.tls_key.clone());
    match &config.web_dir {
        Some(dir) => tracing::info!(dir = %dir.display(), "dashboard from SLUICE_WEB_DIR"),
        None if app::dashboard_embedded() => tracing::info!("dashboard built in, at /"),
        None => tracing::warn!(
            "this binary was built without its dashboard (web/dist was not built): \
             `/` answers 404; set SLUICE_WEB_DIR or rebuild after `npm run build` in web/"
        ),
    }
    let state = app::build_state(config).await?;
    if let Some(pw) = auth::bootstrap_admin(&state.db, admin_password.as_deref()).await? {
        println!(
            "created user admin with password: {pw}\n(shown once; change it with `sluice admin create`)"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    match (&tls_cert, &tls_key) {
        (Some(cert), Some(key)) => {
            let tls = sluice_server::infra::tls::server_config(cert, key)?;
            tracing::info!(%listen, "sluice serving HTTPS");
            app::run_tls(listener, tls, state, shutdown_signal()).await
        }
        _ => {
            tracing::info!(%listen, "sluice serving");
            app::run(listener, state, shutdown_signal()).await
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: draining requests");
}
