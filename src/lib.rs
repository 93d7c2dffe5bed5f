//! graphcache: a caching reverse proxy sidecar for Meta's Graph API.
//!
//! One module per stage of the request path:
//! - [`server`]: listeners, HTTP/1.1 and HTTP/2 connections, graceful drain;
//! - [`handler`]: classify each request, serve from cache, revalidate, fetch,
//!   pass writes through and invalidate;
//! - [`key`]: cache keys and token identities (blake3; tokens never stored);
//! - [`routes`]: per-route cache policy and the Graph objects a request touches;
//! - [`cache`]: the byte-bounded store and its object index;
//! - [`coalesce`]: identical concurrent reads share one upstream call;
//! - [`dispatch`]: reads go upstream alone, or packed into Graph batches;
//! - [`batch`]: the Graph batch wire format;
//! - [`client_batch`]: client batches answered item by item from the cache;
//! - [`upstream`]: the pooled rustls client for the one configured upstream;
//! - [`paging`]: optional rewriting of paging links back to graphcache;
//! - [`headers`], [`body`], [`redact`]: small pure helpers;
//! - [`error`]: errors graphcache makes, rendered as Graph error envelopes;
//! - [`usage`], [`ratelimit`]: Graph's usage headers and throttle protection;
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin listener;
//! - [`config`]: flags, environment, TOML file, validation.

pub mod admin;
pub mod batch;
pub mod body;
pub mod cache;
pub mod client_batch;
pub mod coalesce;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod handler;
pub mod headers;
pub mod key;
pub mod metrics;
pub mod paging;
pub mod ratelimit;
pub mod redact;
pub mod routes;
pub mod server;
pub mod upstream;
pub mod usage;

pub use config::{Cli, Config};
pub use server::Graphcache;
