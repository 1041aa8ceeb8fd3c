//! The agent's configuration: command-line flags over an optional TOML file over
//! built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use super::procedures::CommandSpec;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7018";
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// How long a finished task no controller claimed (GET, then `terminate`) is kept.
pub const DEFAULT_KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600);

/// The TOML file (`--config`). Every key is optional; flags win over it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub controller: Option<String>,
    pub capacity: Option<u32>,
    /// `grace = "10s"`; `grace_secs` is the older spelling.
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub grace: Option<Duration>,
    pub grace_secs: Option<f64>,
    /// `keep_finished = "1d"`; `keep_finished_secs` is the older spelling.
    #[serde(default, deserialize_with = "crate::duration::deserialize_opt")]
    pub keep_finished: Option<Duration>,
    pub keep_finished_secs: Option<f64>,
    /// `store_cache = "8MiB"`: sled's page cache.
    #[serde(default, deserialize_with = "crate::durable::deserialize_cache_bytes")]
    pub store_cache: Option<u64>,
    /// `--tls-dir`, `--tls-name`, `--metrics` (the flags win).
    pub tls_dir: Option<PathBuf>,
    pub tls_name: Option<String>,
    pub metrics: Option<String>,
    #[serde(default, rename = "procedure")]
    pub procedures: Vec<CommandSpec>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// Everything an agent needs to run, resolved.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub controller: Option<String>,
    pub capacity: u32,
    pub grace: Duration,
    /// Finished tasks nobody claimed are dropped this long after they ended.
    pub keep_finished: Duration,
    /// sled's page cache for the task store.
    pub store_cache_bytes: u64,
    pub procedures: Vec<CommandSpec>,
    /// Where the TLS files are and the certificate's name, from a flag or the file
    /// (the daemon loads them into `tls`); the metrics address.
    pub tls_dir: Option<PathBuf>,
    pub tls_name: Option<String>,
    pub metrics: Option<String>,
    /// ARPCP over mutual TLS (`--tls-dir`): served to the gateway's certificate only,
    /// and SIGNALs and announcements sent with the agent's.
    pub tls: Option<crate::arpcp::tls::ArpcpTls>,
}

/// Flag values (None when not given on the command line).
#[derive(Debug, Default, Clone)]
pub struct AgentFlags {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub controller: Option<String>,
    pub config: Option<PathBuf>,
    pub capacity: Option<u32>,
    pub grace_secs: Option<f64>,
    pub keep_finished_secs: Option<f64>,
    /// `--store-cache`, already checked against its bounds.
    pub store_cache_bytes: Option<u64>,
    pub tls_dir: Option<PathBuf>,
    pub tls_name: Option<String>,
    pub metrics: Option<String>,
}

/// A non-negative, finite number of seconds from a flag or the file.
fn seconds(
    field: &'static str,
    v: Option<f64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if s >= 0.0 && s.is_finite() && s < 1e12 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(ConfigError::Invalid {
            field,
            message: format!("must be a non-negative number of seconds, got {s}"),
        }),
    }
}

impl AgentConfig {
    pub fn resolve(flags: AgentFlags) -> Result<AgentConfig, ConfigError> {
        let file = match &flags.config {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let listen = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen.parse().map_err(|e| ConfigError::Invalid {
            field: "listen",
            message: format!("{listen:?} is not an IP:port address ({e})"),
        })?;
        let capacity = flags
            .capacity
            .or(file.capacity)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        if capacity == 0 {
            return Err(ConfigError::Invalid {
                field: "capacity",
                message: "must be at least 1".into(),
            });
        }
        for (field, both) in [
            ("grace", file.grace.is_some() && file.grace_secs.is_some()),
            (
                "keep_finished",
                file.keep_finished.is_some() && file.keep_finished_secs.is_some(),
            ),
        ] {
            if both {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("give {field} or its older spelling {field}_secs, not both"),
                });
            }
        }
        let grace = seconds(
            "grace_secs",
            flags
                .grace_secs
                .or(file.grace.map(|d| d.as_secs_f64()))
                .or(file.grace_secs),
            DEFAULT_GRACE,
        )?;
        let keep_finished = seconds(
            "keep_finished_secs",
            flags
                .keep_finished_secs
                .or(file.keep_finished.map(|d| d.as_secs_f64()))
                .or(file.keep_finished_secs),
            DEFAULT_KEEP_FINISHED,
        )?;
        Ok(AgentConfig {
            listen,
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("arpcp-agent-data")),
            controller: flags.controller.or(file.controller),
            capacity,
            grace,
            keep_finished,
            store_cache_bytes: flags
                .store_cache_bytes
                .or(file.store_cache)
                .unwrap_or(super::store::DEFAULT_CACHE_BYTES),
            procedures: file.procedures,
            tls_dir: flags.tls_dir.or(file.tls_dir),
            tls_name: flags.tls_name.or(file.tls_name),
            metrics: flags.metrics.or(file.metrics),
            tls: None,
        })
    }
}
