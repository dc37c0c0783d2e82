//! Server configuration, from flags or the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

/// How `sluice serve` is configured.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Address to listen on.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Folder for keys and local state.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// Password given to user `admin` on first start with an empty database.
    #[arg(long, env = "SLUICE_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Passphrase that encrypts the private keys at rest.
    #[arg(long, env = "SLUICE_KEY_PASSPHRASE", hide_env_values = true)]
    pub key_passphrase: String,
    /// Registries (`host:port`) reached over plain HTTP, comma-separated.
    #[arg(
        long,
        env = "SLUICE_INSECURE_REGISTRIES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub insecure_registries: Vec<String>,
    /// Balancers in front of the server (addresses or CIDR blocks,
    /// comma-separated): for a request from one of them the client is the
    /// last address of its `X-Forwarded-For` header, which the per-address
    /// limits (login, enrollment) count. Empty: the peer is the client.
    #[arg(long, env = "SLUICE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpBlock>,
    /// Docker `config.json` with registry credentials.
    #[arg(long, env = "SLUICE_REGISTRY_AUTH")]
    pub registry_auth: Option<PathBuf>,
    /// How long devices wait between polls, in seconds.
    #[arg(long, env = "SLUICE_POLL_AFTER_S", default_value_t = 300)]
    pub poll_after_s: u64,
    /// How long a signed resolution answer stays valid, in seconds.
    #[arg(long, env = "SLUICE_RESPONSE_TTL_S", default_value_t = 3600)]
    pub response_ttl_s: u64,
    /// PEM certificate chain: when set (with the key), the server speaks HTTPS.
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often batched device check-ins are written, in milliseconds.
    #[arg(long, env = "SLUICE_CHECKIN_FLUSH_MS", default_value_t = 1000)]
    pub checkin_flush_ms: u64,
    /// Requests a device may make at once before it is answered 429.
    #[arg(long, env = "SLUICE_DEVICE_BURST", default_value_t = 60)]
    pub device_burst: u32,
    /// Requests per second a device's allowance grows back by.
    #[arg(long, env = "SLUICE_DEVICE_RATE", default_value_t = 1.0)]
    pub device_rate: f64,
    /// How long a device token lasts, in seconds (60 s to 7 days); devices
    /// renew theirs with their key before it ends.
    #[arg(long, env = "SLUICE_DEVICE_TOKEN_TTL_S", default_value_t = 6 * 3600)]
    pub device_token_ttl_s: u64,
    /// Enrollments one client address may make at once.
    #[arg(long, env = "SLUICE_ENROLL_BURST", default_value_t = 20)]
    pub enroll_burst: u32,
    /// Enrollments per second an address's allowance grows back by.
    #[arg(long, env = "SLUICE_ENROLL_RATE", default_value_t = 0.2)]
    pub enroll_rate: f64,
    /// Enrollments one product may take at once (counted once the secret is right).
    #[arg(long, env = "SLUICE_ENROLL_PRODUCT_BURST", default_value_t = 100)]
    pub enroll_product_burst: u32,
    /// Enrollments per second a product's allowance grows back by.
    #[arg(long, env = "SLUICE_ENROLL_PRODUCT_RATE", default_value_t = 1.0)]
    pub enroll_product_rate: f64,
    /// Serve the dashboard from this folder (a built `web/dist`) instead of
    /// the one built into the binary: for working on the dashboard.
    #[arg(long, env = "SLUICE_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
}

/// Longest device token lifetime accepted: the in-memory revocation list
/// keeps a reset device for this long.
pub const MAX_DEVICE_TOKEN_TTL_S: u64 = 7 * 86_400;

impl Config {
    /// Refuses settings the server cannot honour.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (60..=MAX_DEVICE_TOKEN_TTL_S).contains(&self.device_token_ttl_s),
            "SLUICE_DEVICE_TOKEN_TTL_S must be between 60 and {MAX_DEVICE_TOKEN_TTL_S} (7 days), not {}",
            self.device_token_ttl_s
        );
        Ok(())
    }

    /// Whether `host` (`host:port`) is to be reached over plain HTTP.
    pub fn is_insecure(&self, host: &str) -> bool {
        self.insecure_registries
            .iter()
            .any(|h| !h.is_empty() && h == host)
    }
}

/// An address or a CIDR block (`10.0.0.0/8`, `::1`): one of
/// [`Config::trusted_proxies`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpBlock {
    /// Whether `ip` is in the block (an IPv4 address mapped into IPv6 is
    /// taken as the IPv4 one).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl std::str::FromStr for IpBlock {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or a CIDR block like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?
        };
        Ok(IpBlock { addr, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::IpBlock;

    #[test]
    fn ip_blocks_hold_what_their_prefix_says() {
        let b = |s: &str| s.parse::<IpBlock>().unwrap();
        let ip = |s: &str| s.parse().unwrap();
        assert!(b("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!b("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(b("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!b("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(b("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(!b("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(b("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")), "mapped");
        assert!(b("2001:db8::/32").contains(ip("2001:db8:1::1")));
        assert!(!b("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(b("::1").contains(ip("::1")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "host",
            "10.0.0.0/x",
        ] {
            let err = bad.parse::<IpBlock>().unwrap_err();
            assert!(err.contains(bad) || bad.is_empty(), "{bad}: {err}");
        }
    }
}
