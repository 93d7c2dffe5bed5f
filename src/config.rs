//! Configuration: defaults, then the TOML file, then `GRAPHCACHE_<KEY>`
//! environment variables, then command-line flags (later wins).
//!
//! The raw layers are merged as TOML tables and deserialised once into
//! [`RawConfig`], which rejects unknown keys; [`Config`] is the validated
//! runtime form with `Duration`s and parsed addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use http::Uri;
use serde::Deserialize;

use crate::graph::batch::MAX_ITEMS;
use crate::graph::routes::{CachePolicy, RoutePolicies, RouteRule};

/// Every default, in one place; `config/graphcache.toml` documents them.
/// Durations are seconds unless named otherwise.
pub mod default {
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
    pub const UPSTREAM: &str = "https://graph.facebook.com";
    pub const FRESH_TTL: u64 = 0;
    pub const MAX_STALE: u64 = 3600;
    pub const CACHE_MAX_BYTES: u64 = 256 << 20;
    pub const MAX_ENTRY_BYTES: u64 = 4 << 20;
    pub const MAX_HEADER_BYTES: u64 = 32 << 10;
    pub const MAX_BODY_BYTES: u64 = 64 << 20;
    pub const CONNECT_TIMEOUT: u64 = 5;
    pub const UPSTREAM_TIMEOUT: u64 = 60;
    pub const HEADER_READ_TIMEOUT: u64 = 10;
    pub const SHUTDOWN_GRACE: u64 = 25;
    pub const MAX_CONNECTIONS: u64 = 4096;
    pub const MAX_BUFFERED_BYTES: u64 = 64 << 20;
    pub const WRITE_SLOT_WAIT: u64 = 5;
    pub const ACCESS_LOG: bool = true;
    pub const LOG_FORMAT: &str = "text";
    pub const LOG_LEVEL: &str = "info";
    /// `coalesce_wait` defaults to `upstream_timeout`.
    pub const COALESCE: bool = true;
    pub const BATCH: bool = true;
    pub const BATCH_MAX_IN_FLIGHT: u64 = 4;
    pub const BATCH_WINDOW_MS: u64 = 0;
    pub const THROTTLE_BACKOFF: u64 = 60;
    pub const PRESSURE_THRESHOLD: f64 = 0.95;
    pub const THROTTLE_ANSWER_LOCALLY: bool = false;
    pub const QUOTA_AWARE_TTL: bool = false;
    pub const QUOTA_TTL_FROM: f64 = 0.75;
    pub const QUOTA_TTL_MAX: u64 = 300;
    pub const USAGE_LABEL_LIMIT: u64 = 100;
    pub const REWRITE_PAGING_LINKS: bool = true;
    pub const ASYNC_POLL_INTERVAL: u64 = 5;
    pub const REDIS_NAMESPACE: &str = "graphcache";
    pub const REDIS_TIMEOUT_MS: u64 = 50;
    pub const REDIS_DEGRADED_MAX_AGE: u64 = 2;
    pub const REDIS_LOCK_WAIT_MS: u64 = 5000;
    pub const REDIS_REQUIRED: bool = false;
}

/// Command line. The flag names are a contract with users: keep them.
#[derive(Debug, Default, Parser)]
#[command(
    name = "graphcache",
    version,
    about = "Caching reverse proxy for the Graph API"
)]
pub struct Cli {
    /// TOML config file (also GRAPHCACHE_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve clients on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The one upstream, e.g. https://graph.facebook.com.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Seconds a stored answer is served without asking upstream.
    #[arg(long, value_name = "SECONDS")]
    pub fresh_ttl: Option<u64>,
    /// Seconds a stored answer may be served when upstream fails.
    #[arg(long, value_name = "SECONDS")]
    pub max_stale: Option<u64>,
    /// Memory bound of the cache, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// Redis shared by a fleet of sidecars, e.g. redis://redis:6379/0.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// Errors in any configuration layer, rendered for an operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The configuration as written: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    upstream: Option<String>,
    fresh_ttl: Option<u64>,
    max_stale: Option<u64>,
    cache_max_bytes: Option<u64>,
    max_entry_bytes: Option<u64>,
    max_header_bytes: Option<u64>,
    max_body_bytes: Option<u64>,
    connect_timeout: Option<u64>,
    upstream_timeout: Option<u64>,
    header_read_timeout: Option<u64>,
    shutdown_grace: Option<u64>,
    max_connections: Option<u64>,
    max_buffered_bytes: Option<u64>,
    write_slot_wait: Option<u64>,
    access_log: Option<bool>,
    log_format: Option<String>,
    log_level: Option<String>,
    coalesce: Option<bool>,
    coalesce_wait: Option<u64>,
    batch: Option<bool>,
    batch_max_in_flight: Option<u64>,
    batch_max_items: Option<u64>,
    batch_window_ms: Option<u64>,
    throttle_backoff: Option<u64>,
    pressure_threshold: Option<f64>,
    throttle_answer_locally: Option<bool>,
    quota_aware_ttl: Option<bool>,
    quota_ttl_from: Option<f64>,
    quota_ttl_max: Option<u64>,
    usage_label_limit: Option<u64>,
    rewrite_paging_links: Option<bool>,
    async_poll_interval: Option<u64>,
    upstream_ca_file: Option<PathBuf>,
    redis_url: Option<String>,
    redis_namespace: Option<String>,
    redis_timeout_ms: Option<u64>,
    redis_degraded_max_age: Option<u64>,
    redis_lock_wait_ms: Option<u64>,
    redis_required: Option<bool>,
    fleet_secret: Option<String>,
    #[serde(default)]
    route: Vec<RawRoute>,
}

/// One `[[route]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(rename = "match")]
    pattern: String,
    fresh_ttl: Option<u64>,
    max_stale: Option<u64>,
    cache: Option<bool>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Scheme and authority of the upstream; no path.
    pub upstream: Uri,
    pub routes: RoutePolicies,
    pub cache_max_bytes: u64,
    pub max_entry_bytes: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// Request body bytes buffered at once, over all requests (GET bodies,
    /// write bodies read for their ids); past it a 503.
    pub max_buffered_bytes: usize,
    /// How long a write waits for a free task slot before a 503.
    pub write_slot_wait: Duration,
    pub access_log: bool,
    pub log_format: LogFormat,
    pub log_level: String,
    pub coalesce: CoalesceSettings,
    pub packing: PackingSettings,
    pub throttle: ThrottleSettings,
    /// Point `paging.next`/`previous` links in answers back at graphcache.
    pub rewrite_paging_links: bool,
    /// How long the status of a running async job (a request set, a report
    /// run) is served from the cache: polls within it share one call.
    pub async_poll_interval: Duration,
    /// Extra roots trusted for the upstream's TLS certificate, besides the
    /// WebPKI roots (a private upstream, a test double).
    pub upstream_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// `GRAPHCACHE_*` variables that name no key (Kubernetes injects
    /// `GRAPHCACHE_SERVICE_HOST`, `GRAPHCACHE_PORT`, … for a Service named
    /// graphcache): ignored, and reported once at start-up.
    pub ignored_env: Vec<String>,
    /// Where each key that is not a default came from: `file`, `env` or
    /// `flag` (for `--check-config`).
    pub origins: std::collections::BTreeMap<String, &'static str>,
    /// `upstream_ca_file` as configured, for `--check-config`.
    pub upstream_ca_file: Option<PathBuf>,
    /// `quota_ttl_from` as configured, also while quota-aware TTLs are off.
    pub quota_ttl_from: f64,
    /// The shared tier of a fleet; None runs alone.
    pub fleet: Option<FleetSettings>,
}

/// A fleet of sidecars sharing one Redis (`redis_url`).
#[derive(Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `redis://` or `rediss://` (rustls), with credentials if any.
    pub url: String,
    /// Prefix of every key, so fleets can share a Redis.
    pub namespace: String,
    /// Bound on every Redis call; past it the call counts as failed.
    pub timeout: Duration,
    /// While Redis cannot be reached, in-process entries older than this
    /// are revalidated upstream instead of served.
    pub degraded_max_age: Duration,
    /// How long a miss waits for the replica fetching the same key.
    pub lock_wait: Duration,
    /// `/readyz` fails while Redis cannot be reached.
    pub required: bool,
    /// Keys caller identities fleet-wide; when None, one is kept in Redis.
    pub secret: Option<String>,
}

impl std::fmt::Debug for FleetSettings {
    // The URL may carry a password and the secret is one: neither is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSettings")
            .field("url", &redact_url(&self.url))
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .field("degraded_max_age", &self.degraded_max_age)
            .field("lock_wait", &self.lock_wait)
            .field("required", &self.required)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// `url` with any password replaced by `***`, for logs and `--check-config`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// Sharing of identical concurrent reads.
#[derive(Debug, Clone)]
pub struct CoalesceSettings {
    pub enabled: bool,
    /// How long a request waits for a shared call before a 504.
    pub wait: Duration,
}

/// Throttle protection settings.
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    /// How long a scope stays throttled when the answer names no time.
    pub backoff: Duration,
    /// Usage ratio (0..1) from which a scope is under pressure.
    pub pressure_threshold: f64,
    /// Answer GETs without an entry locally while throttled, with Graph's
    /// throttling envelope, instead of forwarding them.
    pub answer_locally: bool,
    /// Quota-aware freshness: from this usage ratio on, fresh TTLs stretch
    /// linearly up to `quota_ttl_max` at 100 %. None = off.
    pub quota_ttl_from: Option<f64>,
    pub quota_ttl_max: Duration,
    /// Distinct business and account ids kept as metric labels.
    pub label_limit: usize,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            backoff: Duration::from_secs(default::THROTTLE_BACKOFF),
            pressure_threshold: default::PRESSURE_THRESHOLD,
            answer_locally: default::THROTTLE_ANSWER_LOCALLY,
            quota_ttl_from: None,
            quota_ttl_max: Duration::from_secs(default::QUOTA_TTL_MAX),
            label_limit: default::USAGE_LABEL_LIMIT as usize,
        }
    }
}

/// Packing of distinct cacheable GETs into Graph batches.
#[derive(Debug, Clone)]
pub struct PackingSettings {
    pub enabled: bool,
    /// Upstream calls in flight per group before GETs queue for a batch.
    pub max_in_flight: usize,
    /// Items per batch, at most 50.
    pub max_items: usize,
    /// Optional wait to collect GETs into a batch; zero by default.
    pub window: Duration,
}

/// Every top-level key, for environment lookup and messages: derived from
/// [`RawConfig`] itself, so a new key cannot be forgotten here.
pub fn keys() -> &'static [&'static str] {
    serde_aux::serde_introspection::serde_introspect::<RawConfig>()
}

const ENV_PREFIX: &str = "GRAPHCACHE_";

impl Config {
    /// Loads the configuration from `cli`, the given environment and the file
    /// it names. The environment is passed in so tests never touch the
    /// process environment.
    pub fn load(
        cli: &Cli,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let file = cli.config.clone().or_else(|| {
            env.iter()
                .find(|(k, _)| k == "GRAPHCACHE_CONFIG")
                .map(|(_, v)| PathBuf::from(v))
        });
        let mut table = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                // Deserialise the file on its own first, so errors point at
                // its own lines and keys.
                let file_error = |e: toml::de::Error| ConfigError::File {
                    path: path.clone(),
                    message: e.to_string(),
                };
                toml::from_str::<RawConfig>(&text).map_err(file_error)?;
                toml::from_str::<toml::Table>(&text).map_err(file_error)?
            }
            None => toml::Table::new(),
        };
        let mut origins: std::collections::BTreeMap<String, &'static str> =
            table.keys().map(|key| (key.clone(), "file")).collect();
        let mut ignored_env = Vec::new();
        for (name, value) in &env {
            let key = name[ENV_PREFIX.len()..].to_ascii_lowercase();
            if key == "config" {
                continue;
            }
            if !keys().contains(&key.as_str()) {
                ignored_env.push(name.clone());
                continue;
            }
            let value = env_value(value);
            let mut single = toml::Table::new();
            single.insert(key.clone(), value.clone());
            if let Err(e) = toml::Value::Table(single).try_into::<RawConfig>() {
                return Err(ConfigError::Env {
                    name: name.clone(),
                    message: format!("{key} = {value}: {}", e.message()),
                });
            }
            origins.insert(key.clone(), "env");
            table.insert(key, value);
        }
        let flags: [(&str, Option<toml::Value>); 7] = [
            ("listen", cli.listen.clone().map(toml::Value::String)),
            ("upstream", cli.upstream.clone().map(toml::Value::String)),
            (
                "admin_listen",
                cli.admin_listen.clone().map(toml::Value::String),
            ),
            ("fresh_ttl", cli.fresh_ttl.map(int_value)),
            ("max_stale", cli.max_stale.map(int_value)),
            ("cache_max_bytes", cli.cache_max_bytes.map(int_value)),
            ("redis_url", cli.redis_url.clone().map(toml::Value::String)),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                origins.insert(key.to_owned(), "flag");
                table.insert(key.to_owned(), value);
            }
        }
        let raw: RawConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    let message = e.message().to_owned();
                    match &file {
                        Some(path) => ConfigError::File {
                            path: path.clone(),
                            message,
                        },
                        None => ConfigError::Invalid(message),
                    }
                })?;
        let mut config = raw.validate()?;
        config.ignored_env = ignored_env;
        config.origins = origins;
        Ok(config)
    }

    /// The configuration a test or embedder starts from: all defaults.
    pub fn defaults() -> Self {
        RawConfig::default().validate().expect("defaults are valid")
    }
}

/// An environment value read as a TOML value (`60`, `true`, `[{...}]`), or as
/// a plain string when it is not one (`127.0.0.1:8080`).
fn env_value(value: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

fn int_value(n: u64) -> toml::Value {
    toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let addr = |key: &str, value: Option<String>, default: &str| {
            let value = value.unwrap_or_else(|| default.to_owned());
            value.parse::<SocketAddr>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "{key} = {value:?} is not a socket address; expected IP:PORT such as {default:?}"
                ))
            })
        };
        let secs = |v: Option<u64>, default: u64| Duration::from_secs(v.unwrap_or(default));
        let positive = |key: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            let v = v.unwrap_or(default);
            if v == 0 {
                Err(ConfigError::Invalid(format!(
                    "{key} = 0 is not allowed; expected a positive number"
                )))
            } else {
                Ok(v)
            }
        };
        let upstream = parse_upstream(self.upstream.as_deref().unwrap_or(default::UPSTREAM))?;
        let default_policy = CachePolicy {
            fresh_ttl: secs(self.fresh_ttl, default::FRESH_TTL),
            max_stale: secs(self.max_stale, default::MAX_STALE),
            cache: true,
            always_revalidate: false,
        };
        let mut rules = Vec::with_capacity(self.route.len());
        for (i, route) in self.route.into_iter().enumerate() {
            let pattern = route.pattern.trim();
            if pattern.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "route[{i}].match = {:?} is empty; expected a path pattern such as \"*/insights\"",
                    route.pattern
                )));
            }
            rules.push(RouteRule::new(
                pattern,
                route.fresh_ttl.map(Duration::from_secs),
                route.max_stale.map(Duration::from_secs),
                route.cache.unwrap_or(true),
            ));
        }
        let log_format = match self.log_format.as_deref().unwrap_or(default::LOG_FORMAT) {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "log_format = {other:?} is not allowed; expected \"text\" or \"json\""
                )))
            }
        };
        let log_level = self
            .log_level
            .unwrap_or_else(|| default::LOG_LEVEL.to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::Invalid(format!(
                "log_level = {log_level:?} is not a level or filter; expected e.g. \"info\" or \"graphcache=debug\""
            )));
        }
        let usize_of = |key: &str, v: u64| {
            usize::try_from(v)
                .map_err(|_| ConfigError::Invalid(format!("{key} = {v} is too large")))
        };
        let batch_max_items = positive("batch_max_items", self.batch_max_items, MAX_ITEMS as u64)?;
        if batch_max_items > MAX_ITEMS as u64 {
            return Err(ConfigError::Invalid(format!(
                "batch_max_items = {batch_max_items} is too large; Graph allows at most {} items per batch",
                MAX_ITEMS
            )));
        }
        let upstream_timeout = positive(
            "upstream_timeout",
            self.upstream_timeout,
            default::UPSTREAM_TIMEOUT,
        )?;
        let ratio = |key: &str, v: Option<f64>, default: f64| -> Result<f64, ConfigError> {
            let v = v.unwrap_or(default);
            if (0.0..=1.0).contains(&v) && v > 0.0 {
                Ok(v)
            } else {
                Err(ConfigError::Invalid(format!(
                    "{key} = {v} is not allowed; expected a usage ratio above 0 and at most 1, such as 0.95"
                )))
            }
        };
        let throttle = ThrottleSettings {
            backoff: Duration::from_secs(positive(
                "throttle_backoff",
                self.throttle_backoff,
                default::THROTTLE_BACKOFF,
            )?),
            pressure_threshold: ratio(
                "pressure_threshold",
                self.pressure_threshold,
                default::PRESSURE_THRESHOLD,
            )?,
            answer_locally: self
                .throttle_answer_locally
                .unwrap_or(default::THROTTLE_ANSWER_LOCALLY),
            quota_ttl_from: {
                // Validated even while off, so a bad value never waits to bite.
                let from = ratio(
                    "quota_ttl_from",
                    self.quota_ttl_from,
                    default::QUOTA_TTL_FROM,
                )?;
                self.quota_aware_ttl
                    .unwrap_or(default::QUOTA_AWARE_TTL)
                    .then_some(from)
            },
            quota_ttl_max: Duration::from_secs(positive(
                "quota_ttl_max",
                self.quota_ttl_max,
                default::QUOTA_TTL_MAX,
            )?),
            label_limit: usize_of(
                "usage_label_limit",
                positive(
                    "usage_label_limit",
                    self.usage_label_limit,
                    default::USAGE_LABEL_LIMIT,
                )?,
            )?,
        };
        let upstream_ca = match &self.upstream_ca_file {
            Some(path) => load_certificates(path)?,
            None => Vec::new(),
        };
        let fleet = match self.redis_url.filter(|u| !u.trim().is_empty()) {
            None => {
                let stray = [
                    ("redis_namespace", self.redis_namespace.is_some()),
                    ("redis_timeout_ms", self.redis_timeout_ms.is_some()),
                    (
                        "redis_degraded_max_age",
                        self.redis_degraded_max_age.is_some(),
                    ),
                    ("redis_lock_wait_ms", self.redis_lock_wait_ms.is_some()),
                    ("redis_required", self.redis_required.is_some()),
                    ("fleet_secret", self.fleet_secret.is_some()),
                ];
                if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::Invalid(format!(
                        "{key} is set but redis_url is not; set redis_url (fleet mode) or remove {key}"
                    )));
                }
                None
            }
            Some(url) => {
                let url = url.trim().to_owned();
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(ConfigError::Invalid(format!(
                        "redis_url = {:?} must use redis:// or rediss://; expected e.g. \"redis://redis:6379/0\"",
                        redact_url(&url)
                    )));
                }
                let namespace = self
                    .redis_namespace
                    .unwrap_or_else(|| default::REDIS_NAMESPACE.to_owned());
                if namespace.is_empty()
                    || !namespace
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(ConfigError::Invalid(format!(
                        "redis_namespace = {namespace:?} is not allowed; expected letters, digits, '-', '_' or '.'"
                    )));
                }
                if self.fleet_secret.as_ref().is_some_and(|s| s.len() < 16) {
                    return Err(ConfigError::Invalid(
                        "fleet_secret is too short; expected at least 16 characters".to_owned(),
                    ));
                }
                Some(FleetSettings {
                    url,
                    namespace,
                    timeout: Duration::from_millis(positive(
                        "redis_timeout_ms",
                        self.redis_timeout_ms,
                        default::REDIS_TIMEOUT_MS,
                    )?),
                    degraded_max_age: secs(
                        self.redis_degraded_max_age,
                        default::REDIS_DEGRADED_MAX_AGE,
                    ),
                    lock_wait: Duration::from_millis(
                        self.redis_lock_wait_ms
                            .unwrap_or(default::REDIS_LOCK_WAIT_MS),
                    ),
                    required: self.redis_required.unwrap_or(default::REDIS_REQUIRED),
                    secret: self.fleet_secret,
                })
            }
        };
        let config = Config {
            fleet,
            ignored_env: Vec::new(),
            origins: Default::default(),
            upstream_ca_file: self.upstream_ca_file.clone(),
            quota_ttl_from: self.quota_ttl_from.unwrap_or(default::QUOTA_TTL_FROM),
            upstream_ca,
            rewrite_paging_links: self
                .rewrite_paging_links
                .unwrap_or(default::REWRITE_PAGING_LINKS),
            async_poll_interval: Duration::from_secs(
                self.async_poll_interval
                    .unwrap_or(default::ASYNC_POLL_INTERVAL),
            ),
            throttle,
            coalesce: CoalesceSettings {
                enabled: self.coalesce.unwrap_or(default::COALESCE),
                wait: Duration::from_secs(positive(
                    "coalesce_wait",
                    self.coalesce_wait,
                    upstream_timeout,
                )?),
            },
            packing: PackingSettings {
                enabled: self.batch.unwrap_or(default::BATCH),
                max_in_flight: usize_of(
                    "batch_max_in_flight",
                    positive(
                        "batch_max_in_flight",
                        self.batch_max_in_flight,
                        default::BATCH_MAX_IN_FLIGHT,
                    )?,
                )?,
                max_items: batch_max_items as usize,
                window: Duration::from_millis(
                    self.batch_window_ms.unwrap_or(default::BATCH_WINDOW_MS),
                ),
            },
            listen: addr("listen", self.listen, default::LISTEN)?,
            admin_listen: addr("admin_listen", self.admin_listen, default::ADMIN_LISTEN)?,
            upstream,
            routes: RoutePolicies {
                default: default_policy,
                rules,
            },
            cache_max_bytes: positive(
                "cache_max_bytes",
                self.cache_max_bytes,
                default::CACHE_MAX_BYTES,
            )?,
            max_entry_bytes: usize_of(
                "max_entry_bytes",
                positive(
                    "max_entry_bytes",
                    self.max_entry_bytes,
                    default::MAX_ENTRY_BYTES,
                )?,
            )?,
            max_header_bytes: usize_of(
                "max_header_bytes",
                positive(
                    "max_header_bytes",
                    self.max_header_bytes,
                    default::MAX_HEADER_BYTES,
                )?,
            )?,
            max_body_bytes: usize_of(
                "max_body_bytes",
                positive(
                    "max_body_bytes",
                    self.max_body_bytes,
                    default::MAX_BODY_BYTES,
                )?,
            )?,
            connect_timeout: Duration::from_secs(positive(
                "connect_timeout",
                self.connect_timeout,
                default::CONNECT_TIMEOUT,
            )?),
            upstream_timeout: Duration::from_secs(upstream_timeout),
            header_read_timeout: Duration::from_secs(positive(
                "header_read_timeout",
                self.header_read_timeout,
                default::HEADER_READ_TIMEOUT,
            )?),
            shutdown_grace: secs(self.shutdown_grace, default::SHUTDOWN_GRACE),
            max_buffered_bytes: usize_of(
                "max_buffered_bytes",
                positive(
                    "max_buffered_bytes",
                    self.max_buffered_bytes,
                    default::MAX_BUFFERED_BYTES,
                )?,
            )?,
            write_slot_wait: Duration::from_secs(positive(
                "write_slot_wait",
                self.write_slot_wait,
                default::WRITE_SLOT_WAIT,
            )?),
            max_connections: usize_of(
                "max_connections",
                positive(
                    "max_connections",
                    self.max_connections,
                    default::MAX_CONNECTIONS,
                )?,
            )?,
            access_log: self.access_log.unwrap_or(default::ACCESS_LOG),
            log_format,
            log_level,
        };
        config.check_bounds()?;
        Ok(config)
    }
}

/// The certificates of a PEM file, for `upstream_ca_file`.
fn load_certificates(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| {
        ConfigError::Invalid(format!(
            "upstream_ca_file = {:?} {why}; expected a PEM file of CA certificates",
            path.display().to_string()
        ))
    };
    let certificates = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot be read ({e})")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("is not valid PEM ({e})")))?;
    if certificates.is_empty() {
        return Err(bad("holds no certificate".to_owned()));
    }
    Ok(certificates)
}

impl Config {
    /// The effective configuration as TOML, every key with where its value
    /// came from (`default`, `file`, `env`, `flag`). It holds no secret: the
    /// configuration carries no token, and the upstream URL no credentials.
    /// Read back as a file, it gives the same configuration.
    pub fn effective_toml(&self) -> String {
        use toml::Value;
        let secs = |d: Duration| Value::Integer(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let int = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let text = |s: String| Value::String(s);
        let upstream = self.upstream.to_string();
        let values: Vec<(&str, Value)> = vec![
            ("listen", text(self.listen.to_string())),
            ("admin_listen", text(self.admin_listen.to_string())),
            ("upstream", text(upstream.trim_end_matches('/').to_owned())),
            ("fresh_ttl", secs(self.routes.default.fresh_ttl)),
            ("max_stale", secs(self.routes.default.max_stale)),
            ("cache_max_bytes", int(self.cache_max_bytes)),
            ("max_entry_bytes", int(self.max_entry_bytes as u64)),
            ("max_header_bytes", int(self.max_header_bytes as u64)),
            ("max_body_bytes", int(self.max_body_bytes as u64)),
            ("connect_timeout", secs(self.connect_timeout)),
            ("upstream_timeout", secs(self.upstream_timeout)),
            ("header_read_timeout", secs(self.header_read_timeout)),
            ("shutdown_grace", secs(self.shutdown_grace)),
            ("max_connections", int(self.max_connections as u64)),
            ("max_buffered_bytes", int(self.max_buffered_bytes as u64)),
            ("write_slot_wait", secs(self.write_slot_wait)),
            ("access_log", Value::Boolean(self.access_log)),
            (
                "log_format",
                text(match self.log_format {
                    LogFormat::Text => "text".into(),
                    LogFormat::Json => "json".into(),
                }),
            ),
            ("log_level", text(self.log_level.clone())),
            ("coalesce", Value::Boolean(self.coalesce.enabled)),
            ("coalesce_wait", secs(self.coalesce.wait)),
            ("batch", Value::Boolean(self.packing.enabled)),
            (
                "batch_max_in_flight",
                int(self.packing.max_in_flight as u64),
            ),
            ("batch_max_items", int(self.packing.max_items as u64)),
            (
                "batch_window_ms",
                int(u64::try_from(self.packing.window.as_millis()).unwrap_or(u64::MAX)),
            ),
            ("throttle_backoff", secs(self.throttle.backoff)),
            (
                "pressure_threshold",
                Value::Float(self.throttle.pressure_threshold),
            ),
            (
                "throttle_answer_locally",
                Value::Boolean(self.throttle.answer_locally),
            ),
            (
                "quota_aware_ttl",
                Value::Boolean(self.throttle.quota_ttl_from.is_some()),
            ),
            ("quota_ttl_from", Value::Float(self.quota_ttl_from)),
            ("quota_ttl_max", secs(self.throttle.quota_ttl_max)),
            ("usage_label_limit", int(self.throttle.label_limit as u64)),
            (
                "rewrite_paging_links",
                Value::Boolean(self.rewrite_paging_links),
            ),
            ("async_poll_interval", secs(self.async_poll_interval)),
        ];
        let mut values = values;
        if let Some(fleet) = &self.fleet {
            let ms = |d: Duration| int(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            values.extend([
                ("redis_url", text(redact_url(&fleet.url))),
                ("redis_namespace", text(fleet.namespace.clone())),
                ("redis_timeout_ms", ms(fleet.timeout)),
                ("redis_degraded_max_age", secs(fleet.degraded_max_age)),
                ("redis_lock_wait_ms", ms(fleet.lock_wait)),
                ("redis_required", Value::Boolean(fleet.required)),
            ]);
        }
        let origin = |key: &str| self.origins.get(key).copied().unwrap_or("default");
        let mut out = String::new();
        for (key, value) in values {
            let line = format!("{key} = {value}");
            out.push_str(&format!(
                "{line:<48} # {}
",
                origin(key)
            ));
        }
        match &self.upstream_ca_file {
            Some(path) => {
                let line = format!("upstream_ca_file = {}", text(path.display().to_string()));
                out.push_str(&format!(
                    "{line:<48} # {}
",
                    origin("upstream_ca_file")
                ));
            }
            None => out.push_str(
                "# upstream_ca_file: none, WebPKI roots only    # default
",
            ),
        }
        for rule in &self.routes.rules {
            let head = "[[route]]";
            out.push_str(&format!(
                "
{head:<48} # {}
",
                origin("route")
            ));
            out.push_str(&format!(
                "match = {}
",
                text(rule.pattern.clone())
            ));
            if let Some(ttl) = rule.fresh_ttl {
                out.push_str(&format!(
                    "fresh_ttl = {}
",
                    secs(ttl)
                ));
            }
            if let Some(stale) = rule.max_stale {
                out.push_str(&format!(
                    "max_stale = {}
",
                    secs(stale)
                ));
            }
            out.push_str(&format!(
                "cache = {}
",
                rule.cache
            ));
        }
        out
    }

    /// Takes from `running` every setting fixed at start-up (listeners, the
    /// upstream and its client, the store's bound, connection limits, log
    /// format), so a reload changes only what it can change atomically.
    /// Returns the keys whose new value is thereby ignored.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut ignored = Vec::new();
        macro_rules! keep {
            ($($field:ident => $key:literal),* $(,)?) => {$(
                if self.$field != running.$field {
                    ignored.push($key);
                    self.$field = running.$field.clone();
                }
            )*};
        }
        keep!(
            listen => "listen",
            admin_listen => "admin_listen",
            upstream => "upstream",
            upstream_ca => "upstream_ca_file",
            connect_timeout => "connect_timeout",
            upstream_timeout => "upstream_timeout",
            header_read_timeout => "header_read_timeout",
            cache_max_bytes => "cache_max_bytes",
            max_body_bytes => "max_body_bytes",
            max_connections => "max_connections",
            max_buffered_bytes => "max_buffered_bytes",
            shutdown_grace => "shutdown_grace",
            log_format => "log_format",
            fleet => "redis_url",
        );
        ignored
    }
}

/// Longest timeout accepted: a day.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Longest TTL accepted: a year.
const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

impl Config {
    /// Durations are added to clocks: absurd values are refused here rather
    /// than overflowing at run time.
    fn check_bounds(&self) -> Result<(), ConfigError> {
        let mut checks = vec![
            ("connect_timeout", self.connect_timeout, MAX_TIMEOUT),
            ("upstream_timeout", self.upstream_timeout, MAX_TIMEOUT),
            ("header_read_timeout", self.header_read_timeout, MAX_TIMEOUT),
            ("shutdown_grace", self.shutdown_grace, MAX_TIMEOUT),
            ("write_slot_wait", self.write_slot_wait, MAX_TIMEOUT),
            ("async_poll_interval", self.async_poll_interval, MAX_TTL),
            (
                "redis_degraded_max_age",
                self.fleet
                    .as_ref()
                    .map_or(Duration::ZERO, |f| f.degraded_max_age),
                MAX_TIMEOUT,
            ),
            (
                "redis_lock_wait_ms",
                self.fleet.as_ref().map_or(Duration::ZERO, |f| f.lock_wait),
                MAX_TIMEOUT,
            ),
            (
                "redis_timeout_ms",
                self.fleet.as_ref().map_or(Duration::ZERO, |f| f.timeout),
                Duration::from_secs(10),
            ),
            ("coalesce_wait", self.coalesce.wait, MAX_TIMEOUT),
            ("throttle_backoff", self.throttle.backoff, MAX_TIMEOUT),
            ("batch_window_ms", self.packing.window, MAX_TIMEOUT),
            ("fresh_ttl", self.routes.default.fresh_ttl, MAX_TTL),
            ("max_stale", self.routes.default.max_stale, MAX_TTL),
            ("quota_ttl_max", self.throttle.quota_ttl_max, MAX_TTL),
        ];
        for rule in &self.routes.rules {
            checks.extend(rule.fresh_ttl.map(|d| ("route.fresh_ttl", d, MAX_TTL)));
            checks.extend(rule.max_stale.map(|d| ("route.max_stale", d, MAX_TTL)));
        }
        for (key, value, max) in checks {
            if value > max {
                return Err(ConfigError::Invalid(format!(
                    "{key} = {} is too large; expected at most {}",
                    if key.ends_with("_ms") {
                        value.as_millis()
                    } else {
                        value.as_secs() as u128
                    },
                    if key.ends_with("_ms") {
                        max.as_millis()
                    } else {
                        max.as_secs() as u128
                    }
                )));
            }
        }
        Ok(())
    }
}

/// Accepts `http(s)://host[:port]` with no path, query or credentials.
fn parse_upstream(value: &str) -> Result<Uri, ConfigError> {
    let bad = |why: &str| {
        ConfigError::Invalid(format!(
            "upstream = {value:?} {why}; expected a URL such as \"https://graph.facebook.com\""
        ))
    };
    let uri: Uri = value
        .trim_end_matches('/')
        .parse()
        .map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("must use http or https")),
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not carry credentials"));
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(bad("must not have a path or query"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(cli: Cli, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(
            &cli,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn file(text: &str) -> (tempdir::Guard, PathBuf) {
        tempdir::write(text)
    }

    /// A throwaway file under the target directory, removed on drop.
    mod tempdir {
        use std::path::PathBuf;
        pub struct Guard(PathBuf);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> (Guard, PathBuf) {
            let path = std::env::temp_dir()
                .join(format!("graphcache-test-{}.toml", rand::random::<u64>()));
            std::fs::write(&path, text).unwrap();
            (Guard(path.clone()), path)
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = Config::defaults();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.upstream.to_string(), "https://graph.facebook.com/");
        assert_eq!(c.routes.default.fresh_ttl, Duration::ZERO);
        assert_eq!(c.routes.default.max_stale, Duration::from_secs(3600));
        assert_eq!(c.cache_max_bytes, 256 << 20);
    }

    #[test]
    fn precedence_is_flag_then_env_then_file() {
        let (_g, path) = file("fresh_ttl = 1\nmax_stale = 2\ncache_max_bytes = 3\n");
        let cli = Cli {
            config: Some(path.clone()),
            fresh_ttl: Some(10),
            ..Cli::default()
        };
        let c = load(
            cli,
            &[
                ("GRAPHCACHE_FRESH_TTL", "20"),
                ("GRAPHCACHE_MAX_STALE", "30"),
            ],
        )
        .unwrap();
        assert_eq!(c.routes.default.fresh_ttl, Duration::from_secs(10));
        assert_eq!(c.routes.default.max_stale, Duration::from_secs(30));
        assert_eq!(c.cache_max_bytes, 3);
    }

    #[test]
    fn the_shipped_config_file_is_valid_and_documents_every_key() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/graphcache.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(keys().len(), 43);
        assert!(keys().contains(&"async_poll_interval"));
        assert!(keys().contains(&"route") && keys().contains(&"upstream_ca_file"));
        for key in keys() {
            assert!(
                text.contains(&format!("{key} ")) || text.contains(&format!("[[{key}]]")),
                "{key} undocumented"
            );
        }
        load(
            Cli {
                config: Some(path),
                ..Cli::default()
            },
            &[],
        )
        .unwrap();
    }

    #[test]
    fn fleet_keys_are_checked_and_their_secrets_never_printed() {
        let env = |pairs: &[(&str, &str)]| load(Cli::default(), pairs);
        let c = env(&[
            (
                "GRAPHCACHE_REDIS_URL",
                "redis://:hunter2hunter2@redis:6379/0",
            ),
            ("GRAPHCACHE_FLEET_SECRET", "0123456789abcdef-secret"),
        ])
        .unwrap();
        let fleet = c.fleet.as_ref().unwrap();
        assert_eq!(fleet.namespace, "graphcache");
        assert_eq!(fleet.timeout, Duration::from_millis(50));
        let printed = format!("{}{:?}", c.effective_toml(), c);
        assert!(
            printed.contains("redis_url = \"redis://:***@redis:6379/0\""),
            "{printed}"
        );
        assert!(!printed.contains("hunter2") && !printed.contains("abcdef-secret"));
        // The flag wins, as for every key.
        let flag = load(
            Cli {
                redis_url: Some("rediss://cache:6380".to_owned()),
                ..Cli::default()
            },
            &[("GRAPHCACHE_REDIS_URL", "redis://other:6379")],
        )
        .unwrap();
        assert_eq!(flag.fleet.unwrap().url, "rediss://cache:6380");
        for (pairs, needle) in [
            (&[("GRAPHCACHE_REDIS_URL", "http://redis")][..], "redis_url"),
            (
                &[("GRAPHCACHE_FLEET_SECRET", "0123456789abcdef")][..],
                "fleet_secret is set but redis_url is not",
            ),
            (
                &[
                    ("GRAPHCACHE_REDIS_URL", "redis://r"),
                    ("GRAPHCACHE_FLEET_SECRET", "short"),
                ][..],
                "fleet_secret is too short",
            ),
            (
                &[
                    ("GRAPHCACHE_REDIS_URL", "redis://r"),
                    ("GRAPHCACHE_REDIS_TIMEOUT_MS", "60000"),
                ][..],
                "redis_timeout_ms = 60000 is too large; expected at most 10000",
            ),
            (
                &[
                    ("GRAPHCACHE_REDIS_URL", "redis://r"),
                    ("GRAPHCACHE_REDIS_NAMESPACE", "a b"),
                ][..],
                "redis_namespace",
            ),
        ] {
            let err = env(pairs).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let (_g, path) = file("fresh_tll = 1\n");
        let err = load(
            Cli {
                config: Some(path),
                ..Cli::default()
            },
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fresh_tll"), "{err}");
        // A GRAPHCACHE_ variable that names no key is ignored (and reported):
        // Kubernetes injects several for a Service named graphcache.
        let config = load(
            Cli::default(),
            &[
                ("GRAPHCACHE_LISTNE", "x"),
                ("GRAPHCACHE_SERVICE_HOST", "10.96.0.12"),
                ("GRAPHCACHE_PORT", "tcp://10.96.0.12:8080"),
                ("GRAPHCACHE_PORT_8080_TCP_ADDR", "10.96.0.12"),
            ],
        )
        .unwrap();
        assert_eq!(config.ignored_env.len(), 4);
        assert!(config.ignored_env.contains(&"GRAPHCACHE_LISTNE".to_owned()));
        // A known key with a bad value stays an error.
        let err = load(Cli::default(), &[("GRAPHCACHE_FRESH_TTL", "soon")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("GRAPHCACHE_FRESH_TTL"), "{err}");
    }

    #[test]
    fn bad_values_name_key_value_and_what_is_allowed() {
        let err = load(
            Cli {
                listen: Some("nowhere".into()),
                ..Cli::default()
            },
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("listen") && err.contains("nowhere") && err.contains("IP:PORT"),
            "{err}"
        );
        let err = load(
            Cli {
                upstream: Some("ftp://x".into()),
                ..Cli::default()
            },
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ftp://x") && err.contains("http or https"),
            "{err}"
        );
        let err = load(Cli::default(), &[("GRAPHCACHE_LOG_FORMAT", "xml")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("log_format") && err.contains("xml"), "{err}");
        let err = load(Cli::default(), &[("GRAPHCACHE_FRESH_TTL", "soon")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fresh_ttl"), "{err}");
        let err = load(
            Cli {
                upstream: Some("http://h/path".into()),
                ..Cli::default()
            },
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("path"), "{err}");
    }

    #[test]
    fn absurd_durations_and_ratios_are_refused() {
        let err = load(
            Cli::default(),
            &[("GRAPHCACHE_UPSTREAM_TIMEOUT", "9223372036854775807")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("upstream_timeout") && err.contains("too large"),
            "{err}"
        );
        let err = load(
            Cli {
                fresh_ttl: Some(u64::MAX / 4),
                ..Cli::default()
            },
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fresh_ttl"), "{err}");
        // A bad ratio is refused even while the feature it tunes is off.
        let err = load(Cli::default(), &[("GRAPHCACHE_QUOTA_TTL_FROM", "5")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("quota_ttl_from") && err.contains("at most 1"),
            "{err}"
        );
    }

    #[test]
    fn routes_from_file_and_environment() {
        let (_g, path) = file("[[route]]\nmatch = \"*/insights\"\nfresh_ttl = 300\n[[route]]\nmatch = \"me\"\ncache = false\n");
        let c = load(
            Cli {
                config: Some(path),
                ..Cli::default()
            },
            &[],
        )
        .unwrap();
        assert_eq!(
            c.routes.policy_for("/v1.0/act_1/insights").fresh_ttl,
            Duration::from_secs(300)
        );
        assert!(!c.routes.policy_for("/me").cache);
        let c = load(
            Cli::default(),
            &[("GRAPHCACHE_ROUTE", "[{match = \"x\", cache = false}]")],
        )
        .unwrap();
        assert!(!c.routes.policy_for("/x").cache);
        let err = load(
            Cli::default(),
            &[("GRAPHCACHE_ROUTE", "[{match = \"x\", ttl = 1}]")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ttl"), "{err}");
    }

    proptest::proptest! {
        /// Whatever the environment holds, loading answers Ok or an error
        /// naming the variable; it never panics.
        #[test]
        fn any_environment_loads_or_names_the_variable(
            key in "[A-Z_]{1,24}", value in ".{0,40}",
        ) {
            let name = format!("GRAPHCACHE_{key}");
            if name == "GRAPHCACHE_CONFIG" {
                return Ok(());
            }
            match load(Cli::default(), &[(name.as_str(), value.as_str())]) {
                Ok(config) => {
                    let known = keys().contains(&key.to_ascii_lowercase().as_str());
                    proptest::prop_assert_eq!(config.ignored_env.is_empty(), known);
                }
                Err(error) => proptest::prop_assert!(error.to_string().contains(&name), "{}", error),
            }
        }
    }
}
