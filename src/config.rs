//! Configuration, layered: built-in defaults → config file (TOML) → environment → flags, then one
//! validation pass. Secrets (the operator key, the PIN pepper) come from the environment or files,
//! never from the ledger database, and are never printed.

use crate::gateway::Settings;
use crate::pin::PinCost;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The config file's shape; every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `postgres://…`: the production ledger. Absent: the SQLite file in `data_dir`.
    pub ledger_url: Option<String>,
    /// `redis://…` (comma-separated URLs for a cluster): the production balance cache. Absent:
    /// balances in process.
    pub redis_url: Option<String>,
    /// Prepended to every Redis key, so several deployments can share one Redis.
    pub redis_prefix: Option<String>,
    /// A directory of region policy files; the built-in ones when absent.
    pub policy_dir: Option<PathBuf>,
    /// A file holding the first operator key (instead of `YIBAO_OPERATOR_KEY`).
    pub operator_key_file: Option<PathBuf>,
    /// A file holding the PIN pepper (instead of `YIBAO_PIN_PEPPER`).
    pub pepper_file: Option<PathBuf>,
    pub pin_cost: Option<PinCost>,
    pub hold_lease_ms: Option<u64>,
    pub commit_timeout_ms: Option<u64>,
    pub batch_len_max: Option<usize>,
    /// Money-moving requests in flight at most (admission control).
    pub in_flight_max: Option<usize>,
}

/// What `yibao serve` runs with, validated.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub ledger_url: Option<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub policy_dir: Option<PathBuf>,
    pub operator_key: Option<String>,
    pub pepper: Vec<u8>,
    pub pin_cost: PinCost,
    pub settings: Settings,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("ledger_url", &self.ledger_url.as_deref().map(redact_url))
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_prefix", &self.redis_prefix)
            .field("policy_dir", &self.policy_dir)
            .field("operator_key", &self.operator_key.as_ref().map(|_| "****"))
            .field("pepper", &"****")
            .field("pin_cost", &self.pin_cost)
            .field("settings", &self.settings)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: {1}")]
    File(String, String),
    #[error("{0}")]
    Invalid(String),
}

/// Flags (and the environment variables clap reads for them) for `yibao serve`.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub policy_dir: Option<PathBuf>,
    pub ledger_url: Option<String>,
    pub redis_url: Option<String>,
}

/// A URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:****{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

fn read_secret_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|e| ConfigError::Invalid(format!("cannot read {}: {e}", path.display())))
}

impl Config {
    /// The embedded default on `data_dir` with every other setting at its default: a starting point
    /// for tests, benchmarks and tools (a random pepper file, no operator key, OWASP PIN cost).
    pub fn embedded(data_dir: PathBuf) -> Config {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("default address"),
            data_dir,
            ledger_url: None,
            redis_url: None,
            redis_prefix: "yb:".into(),
            policy_dir: None,
            operator_key: None,
            pepper: Vec::new(),
            pin_cost: PinCost::OWASP,
            settings: Settings::default(),
        }
    }

    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = match &overrides.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::File(path.display().to_string(), e.to_string()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::File(path.display().to_string(), e.to_string()))?
            }
            None => FileConfig::default(),
        };
        let listen_text = overrides.listen.clone().or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_text.parse().map_err(|_| {
            ConfigError::Invalid(format!("listen: {listen_text:?} is not an address like 127.0.0.1:50051"))
        })?;
        let data_dir = overrides.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("data"));
        let operator_key = match std::env::var("YIBAO_OPERATOR_KEY").ok().filter(|k| !k.is_empty()) {
            Some(key) => Some(key),
            None => file.operator_key_file.as_deref().map(read_secret_file).transpose()?,
        };
        if let Some(key) = &operator_key {
            if key.len() < 16 {
                return Err(ConfigError::Invalid("the operator key must be at least 16 characters".into()));
            }
        }
        let pepper = match std::env::var("YIBAO_PIN_PEPPER").ok().filter(|p| !p.is_empty()) {
            Some(pepper) => pepper.into_bytes(),
            None => match &file.pepper_file {
                Some(path) => read_secret_file(path)?.into_bytes(),
                None => Vec::new(), // filled from the data directory at start (see app::pepper)
            },
        };
        let defaults = Settings::default();
        let settings = Settings {
            hold_lease_ms: file.hold_lease_ms.unwrap_or(defaults.hold_lease_ms),
            commit_timeout_ms: file.commit_timeout_ms.unwrap_or(defaults.commit_timeout_ms),
            batch_len_max: file.batch_len_max.unwrap_or(defaults.batch_len_max),
            commit_queue_max: defaults.commit_queue_max,
            in_flight_max: file.in_flight_max.unwrap_or(defaults.in_flight_max),
        };
        if settings.commit_timeout_ms >= settings.hold_lease_ms {
            return Err(ConfigError::Invalid("commit_timeout_ms must be shorter than hold_lease_ms".into()));
        }
        if settings.batch_len_max == 0 || settings.batch_len_max > 10_000 {
            return Err(ConfigError::Invalid("batch_len_max must be within 1..=10000".into()));
        }
        let ledger_url = overrides.ledger_url.clone().or(file.ledger_url).filter(|u| !u.is_empty());
        if let Some(url) = &ledger_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid(format!("ledger_url: {} is not a postgres:// URL", redact_url(url))));
            }
        }
        let redis_url = overrides.redis_url.clone().or(file.redis_url).filter(|u| !u.is_empty());
        if let Some(url) = &redis_url {
            if !url.split(',').all(|u| u.trim().starts_with("redis://") || u.trim().starts_with("rediss://")) {
                return Err(ConfigError::Invalid(format!("redis_url: {} is not a redis:// URL", redact_url(url))));
            }
        }
        Ok(Config {
            listen,
            data_dir,
            ledger_url,
            redis_url,
            redis_prefix: file.redis_prefix.unwrap_or_else(|| "yb:".into()),
            policy_dir: overrides.policy_dir.clone().or(file.policy_dir),
            operator_key,
            pepper,
            pin_cost: file.pin_cost.unwrap_or(PinCost::OWASP),
            settings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../deploy/yibao.example.toml");
        let file: FileConfig = toml::from_str(text).expect("deploy/yibao.example.toml is valid");
        assert_eq!(file.redis_prefix.as_deref(), Some("yb:"));
        assert!(file.ledger_url.unwrap().starts_with("postgres://"));
    }

    #[test]
    fn unknown_keys_are_refused_and_urls_redacted() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").unwrap_err().to_string().contains("lisen"));
        assert_eq!(redact_url("postgres://yibao:secret@db:5432/yibao"), "postgres://yibao:****@db:5432/yibao");
        assert_eq!(redact_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
    }
}
