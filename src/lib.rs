//! graphcache: a caching reverse proxy sidecar for Meta's Graph API.
//!
//! The request path, top to bottom; each stage calls only those below it:
//!
//! 1. [`server`]: listeners, HTTP/1.1 and HTTP/2 connections, limits, drain;
//! 2. `proxy`: the edge ([`proxy::Proxy::handle`]) and the stages:
//!    classify once into a typed request → lookup (hit, protection) → read,
//!    bypass, write or client batch → settle in the cache → respond;
//! 3. `client_batch`: parse, plan and reply for client batch requests;
//! 4. `upstream`: one request builder and header policy, the pooled rustls
//!    client, the batch packer and single-flight;
//! 5. `cache`: the store behind a trait, keys, caller identities, entries;
//! 6. `graph`: Graph vocabulary (query, routes and objects, batch wire
//!    format, usage headers, paging links);
//! 7. `ratelimit`: usage headers into metrics, throttle protection state.
//!
//! Beside it: [`config`] (flags, environment, TOML), `metrics` and `admin`
//! (Prometheus, `/healthz`, `/readyz`), `error` (envelopes rendered once),
//! and the small pure helpers `headers`, `body` and `redact`.

pub mod config;
pub mod server;

pub(crate) mod admin;
pub(crate) mod body;
pub(crate) mod cache;
pub(crate) mod client_batch;
pub(crate) mod error;
pub(crate) mod fleet;
pub(crate) mod graph;
pub(crate) mod headers;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub(crate) mod ratelimit;
pub(crate) mod redact;
pub(crate) mod upstream;

pub use config::{Cli, Config};
pub use server::{Graphcache, Reloader};

/// Route rules, for embedders and tests that build a [`Config`] in code.
pub mod routes {
    pub use crate::graph::routes::{CachePolicy, RoutePolicies, RouteRule};
}
