//! The request path, one stage per module, each calling only those below:
//!
//! 1. [`classify`]: the request is checked and classified once into a typed
//!    [`classify::Request`]: read, bypass, write or client batch, with its
//!    query, caller identity, User-Agent and route policy;
//! 2. [`lookup`]: the hit decision and throttle protection, shared by single
//!    reads and batch items;
//! 3. the stage for its kind: [`read`], [`bypass`], [`write`], [`batch`];
//!    reads settle upstream answers in the cache through [`settle`];
//! 4. [`respond`]: every response builder and the typed `Cache-Status`.
//!
//! [`Proxy::handle`] is the edge: errors are rendered there, once, as
//! Graph envelopes, and every request is counted and logged there.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::cache::{TieredStore, TokenHasher};
use crate::config::Config;
use crate::error::ProxyError;
use crate::graph::paging::PagingRewriter;
use crate::metrics::{Metrics, Outcome};
use crate::ratelimit::RateLimits;
use crate::redact::redact_target;
use crate::upstream::flight::Flights;
use crate::upstream::packer::Packer;
use crate::upstream::{Upstream, UpstreamTimer};

mod batch;
mod bypass;
mod classify;
mod detached;
mod jobs;
mod lookup;
mod read;
mod respond;
mod settle;
mod write;

use classify::Kind;
use read::{FetchOutcome, FlightKey};
use respond::{rewrite_paging, Handled};

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    /// The running configuration; SIGHUP swaps it whole (see [`Proxy::reload`]).
    pub(crate) config: ArcSwap<Config>,
    /// The byte-bounded store and its object index, before the fleet's
    /// Redis when there is one.
    pub(crate) store: TieredStore,
    /// The pooled client for the one upstream.
    pub(crate) upstream: Arc<Upstream>,
    /// Sends cacheable GETs alone or packed into Graph batches.
    pub(crate) packer: Packer,
    /// Identical reads in flight, shared.
    pub(crate) flights: Flights<FlightKey, Arc<FetchOutcome>>,
    /// Graph's usage and throttle state.
    pub(crate) limits: Arc<RateLimits>,
    pub(crate) metrics: Arc<Metrics>,
    /// Hashes credentials into caller identities (per-process key).
    pub(crate) tokens: TokenHasher,
    /// Rewrites paging links back to graphcache (`rewrite_paging_links`).
    pub(crate) paging: PagingRewriter,
    /// Request body bytes buffered at once, over all requests.
    pub(crate) body_budget: Arc<tokio::sync::Semaphore>,
    /// Writes and client batches detached from their client's connection:
    /// shutdown waits for them, and their number is bounded.
    pub(crate) detached: detached::Detached,
    /// Async jobs learnt from Graph's answers (finished ones are final).
    pub(crate) jobs: jobs::Jobs,
}

impl Proxy {
    /// Builds the request path over its parts.
    pub(crate) fn new(
        config: Arc<Config>,
        store: TieredStore,
        tokens: TokenHasher,
        limits: Arc<RateLimits>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let upstream = Arc::new(Upstream::new(&config));
        let packer = Packer::new(
            config.packing.clone(),
            upstream.clone(),
            limits.clone(),
            metrics.clone(),
        );
        Self {
            detached: detached::Detached::new(config.max_connections),
            jobs: jobs::Jobs::new(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(config.max_buffered_bytes)),
            paging: PagingRewriter::new(&config.upstream),
            flights: Flights::default(),
            tokens,
            packer,
            upstream,
            limits,
            metrics,
            store,
            config: ArcSwap::new(config),
        }
    }

    /// Applies a reloaded configuration to new requests, atomically: routes,
    /// TTLs, limits, throttle, packing, coalescing and log settings. What is
    /// fixed at start-up keeps its running value; the keys it names are
    /// returned, to be logged as ignored.
    pub(crate) fn reload(&self, mut next: Config) -> Vec<&'static str> {
        let running = self.config.load_full();
        let ignored = next.keep_restart_only(&running);
        self.limits.set_settings(next.throttle.clone());
        self.packer.set_settings(next.packing.clone());
        self.store
            .set_longest_retention(next.routes.longest_retention());
        self.config.store(Arc::new(next));
        self.metrics.count_reload(true);
        ignored
    }

    /// Answers one client request. Never fails: errors become Graph envelopes.
    pub async fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let timer = UpstreamTimer::default();
        // One configuration for the whole request, even across a reload.
        let config = self.config.load_full();
        let (response, outcome, links) = match self.route(&parts, body, &config, &timer).await {
            Ok(handled) => (handled.response, handled.outcome, handled.links),
            Err(error) => {
                tracing::warn!(kind = error.kind(), error = %error, "request failed");
                (error.to_response(), Outcome::Error, false)
            }
        };
        let response = if config.rewrite_paging_links
            && links
            && parts.method == Method::GET
            && outcome != Outcome::Write
            && response.status() == StatusCode::OK
        {
            rewrite_paging(&self.paging, response, &parts)
        } else {
            response
        };
        self.metrics.count_request(outcome);
        if config.access_log {
            tracing::info!(
                target: "graphcache::access",
                method = %parts.method,
                target = %redact_target(parts.uri.path(), parts.uri.query()),
                status = response.status().as_u16(),
                cache = outcome.as_str(),
                upstream_us = timer.micros(),
                duration_us = started.elapsed().as_micros() as u64,
            );
        }
        response
    }

    /// Classifies the request and runs the stage for its kind.
    async fn route(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        body: Incoming,
        config: &Arc<Config>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let (request, kind) = self.classify(parts, body, config).await?;
        match kind {
            Kind::Read { policy, identity } => self.read(&request, policy, identity, timer).await,
            Kind::Bypass(body) => self.bypass(parts, body, request.caller, timer).await,
            Kind::Write {
                body,
                scope,
                budget,
            } => self.write(&request, body, scope, budget, timer).await,
            Kind::Batch(batch) => self.batch(batch, timer).await,
        }
    }

    /// Waits for detached writes and batches (shutdown).
    pub(crate) async fn drain(&self) {
        self.detached.drain().await;
    }
}

/// Holds a gauge up for as long as it lives.
pub(crate) struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
