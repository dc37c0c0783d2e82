//! The OCI registry: resolving a reference to a digest (and each platform of
//! an index), and pushing cosign signatures next to the image.

use crate::config::Config;

/// A client for the registries products live in.
pub struct Registry {
    insecure: Vec<String>,
}

impl Registry {
    /// A client configured from the server's settings.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Registry {
            insecure: config.insecure_registries.clone(),
        })
    }

    /// The registries reached over plain HTTP.
    pub fn insecure(&self) -> &[String] {
        &self.insecure
    }
}
