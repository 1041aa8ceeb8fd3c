//! The gateway's TOML configuration file (`arpcp gateway --config FILE`): the
//! flags' long names as keys, so a command line and a file read alike. Unknown keys
//! are refused, naming the key and the file: a misspelt key silently ignored would
//! leave a setting at its default without anyone knowing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

/// A configuration file larger than this is refused unread: the gateway's file is
/// a few lines; anything bigger is the wrong file.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Every key is optional; flags win over it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub grpc: Option<String>,
    pub arpcp: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub agents: Option<Vec<String>>,
    pub scan: Option<Vec<String>>,
    pub scan_port: Option<u16>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub echo_interval: Option<Duration>,
    pub max_misses: Option<u32>,
    pub advertise: Option<String>,
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub retention: Option<Duration>,
    pub retention_count: Option<usize>,
    #[serde(default, deserialize_with = "crate::durable::deserialize_cache_bytes")]
    pub store_cache: Option<u64>,
    pub tls_dir: Option<PathBuf>,
    /// `--metrics`.
    pub metrics: Option<String>,
}

impl GatewayFile {
    pub fn load(path: &Path) -> anyhow::Result<GatewayFile> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_FILE_BYTES + 1).read_to_string(&mut text))
            .with_context(|| format!("--config: cannot read {}", path.display()))?;
        if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
            anyhow::bail!(
                "--config {}: larger than {MAX_CONFIG_FILE_BYTES} bytes, not a gateway configuration",
                path.display()
            );
        }
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))
    }
}
