//! The request path: classify a client request, answer it from the cache,
//! revalidate or fetch it upstream, pass writes through once and invalidate
//! what they change. Errors are rendered once, in [`Proxy::handle`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;

use crate::batch;
use crate::body::{collect_up_to, Collected, ResponseBody};
use crate::cache::{CachedResponse, Freshness, ReadTicket, Store};
use crate::coalesce::Flights;
use crate::config::Config;
use crate::dispatch::{Answer, GroupKey, Groups, UpstreamGet};
use crate::error::ProxyError;
use crate::headers::{
    accepts_gzip, age_value, client_cache_control, header_bytes, if_none_match_matches, is_encoded,
    is_media_type, strip_hop_by_hop, strip_per_call,
};
use crate::key::{authorization_credential, cache_key, CacheKey, QueryParams, TokenHasher};
use crate::metrics::{Metrics, Outcome};
use crate::ratelimit::Subject;
use crate::redact::redact_target;
use crate::routes::{objects_of, CachePolicy, ObjectId};
use crate::upstream::{BoxError, Upstream, UpstreamBody, UpstreamTimer};

/// Largest GET body read to tell an SDK's `{}` from a real body.
const MAX_GET_BODY: usize = 64 << 10;
/// Largest write body read for the object ids it names; larger ones stream.
const MAX_PARSED_WRITE_BODY: usize = 1 << 20;

const CACHE_STATUS: &str = "cache-status";
const HIT: HeaderValue = HeaderValue::from_static("graphcache; hit");

/// What identical reads must share to share an upstream call: the cache key,
/// the client's own conditional, and the write sequence when they started.
pub(crate) type FlightKey = (CacheKey, Option<HeaderValue>, u64);

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    /// Writes and client batches detached from their client's connection:
    /// shutdown waits for them, and their number is bounded.
    pub(crate) detached: Detached,
    /// Rewrites paging links back to graphcache, when configured.
    pub(crate) paging: Option<crate::paging::PagingRewriter>,
    pub(crate) limits: Arc<crate::ratelimit::RateLimits>,
    pub(crate) flights: Flights<FlightKey, Arc<FetchOutcome>>,
    pub(crate) groups: Groups,
    pub config: Arc<Config>,
    pub store: Store,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub tokens: TokenHasher,
}

/// A response plus what the cache did, for metrics and the access log.
pub(crate) struct Handled {
    response: Response<ResponseBody>,
    outcome: Outcome,
}

impl Handled {
    pub(crate) fn new(response: Response<ResponseBody>, outcome: Outcome) -> Self {
        Self { response, outcome }
    }
}

/// What a cacheable request's body turned out to be.
enum GetBody {
    /// None, empty, or the Node SDK's `{}`.
    Nothing,
    /// Anything else: forwarded, never cached.
    Some(Bytes),
}

impl Proxy {
    /// Answers one client request. Never fails: errors become Graph envelopes.
    pub async fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let method = request.method().clone();
        let uri = request.uri().clone();
        let client_origin = self
            .paging
            .as_ref()
            .filter(|_| method == Method::GET)
            .and_then(|_| {
                crate::paging::PagingRewriter::client_origin(request.headers(), request.uri())
            });
        let timer = UpstreamTimer::default();
        let (response, outcome) = match self.route(request, &timer).await {
            Ok(handled) => (handled.response, handled.outcome),
            Err(error) => {
                tracing::warn!(kind = error.kind(), error = %error, "request failed");
                (error.to_response(), Outcome::Error)
            }
        };
        let response = match (&self.paging, client_origin) {
            (Some(rewriter), Some(origin))
                if outcome != Outcome::Write && response.status() == StatusCode::OK =>
            {
                rewrite_paging(rewriter, response, &origin)
            }
            _ => response,
        };
        self.metrics.count_request(outcome);
        if self.config.access_log {
            tracing::info!(
                target: "graphcache::access",
                method = %method,
                target = %redact_target(uri.path(), uri.query()),
                status = response.status().as_u16(),
                cache = outcome.as_str(),
                upstream_us = timer.micros(),
                duration_us = started.elapsed().as_micros() as u64,
            );
        }
        response
    }

    async fn route(
        self: &Arc<Self>,
        request: Request<Incoming>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        // HTTP/1 absolute-form: only the upstream's own host is accepted, and
        // even then the request goes to the configured upstream.
        if request.version() <= Version::HTTP_11 {
            if let Some(authority) = request.uri().authority() {
                if !self.upstream.is_upstream_host(authority) {
                    return Err(ProxyError::ForeignTarget);
                }
            }
        }
        if request.uri().path() == "*" {
            // Asterisk-form (`OPTIONS *`) asks about the server itself, and
            // there is no path to forward it to.
            return Err(ProxyError::BadRequest(
                "asterisk-form request targets are not supported",
            ));
        }
        if header_bytes(request.headers()) > self.config.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                limit: self.config.max_header_bytes,
            });
        }
        if content_length(request.headers()).is_some_and(|n| n > self.config.max_body_bytes as u64)
        {
            return Err(ProxyError::BodyTooLarge {
                limit: self.config.max_body_bytes,
            });
        }
        let uri = request.uri().clone();
        let params = QueryParams::parse(uri.query());
        let method = request.method().clone();
        if method == Method::GET || method == Method::HEAD {
            if params.overrides_to_write() {
                return self.write(request, &params, Outcome::Write, timer).await;
            }
            return self.read(request, &params, timer).await;
        }
        let outcome = if matches!(
            method,
            Method::POST | Method::PUT | Method::DELETE | Method::PATCH
        ) {
            Outcome::Write
        } else {
            Outcome::Pass
        };
        self.write(request, &params, outcome, timer).await
    }

    // === reads ===

    async fn read(
        self: &Arc<Self>,
        request: Request<Incoming>,
        params: &QueryParams<'_>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let (parts, body) = request.into_parts();
        let body = read_get_body(body, self.config.header_read_timeout).await?;
        let path = parts.uri.path();
        let control = client_cache_control(&parts.headers);
        let policy = self.config.routes.policy_for(path);
        if let GetBody::Some(bytes) = body {
            return self.bypass(parts, Some(bytes), timer).await;
        }
        // Two tokens in one query: which one Graph uses is not ours to guess.
        let ambiguous_token = params.count("access_token") > 1;
        if control.no_store || !policy.cache || params.contains("callback") || ambiguous_token {
            return self.bypass(parts, None, timer).await;
        }
        let identity = self.tokens.identify(
            params.get("access_token"),
            authorization_credential(&parts.headers).as_deref(),
        );
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let key = cache_key(path, params, user_agent, &identity);
        let entry = self.store.get(&key).await;
        let now = Instant::now();
        if let Some(entry) = &entry {
            if !control.no_cache && entry.freshness(now) == Freshness::Fresh {
                self.metrics.usage.avoided.fresh_hit.inc();
                return Ok(serve_entry(&parts, entry, now, HIT, Outcome::Hit));
            }
        }
        let objects: Arc<[ObjectId]> = objects_of(path, params.iter()).into();
        match self.protection(entry.as_deref(), &objects, identity, control.no_cache, now) {
            Protection::Forward => {}
            Protection::Serve(status, outcome) => {
                let entry = entry
                    .as_deref()
                    .expect("protection serves only a stored entry");
                return Ok(serve_entry(&parts, entry, now, status, outcome));
            }
            Protection::Refuse(error) => return Err(error),
        }
        let validator = entry.as_ref().and_then(|e| e.etag.clone());
        let get = self.upstream_get(
            &parts,
            params,
            identity,
            validator.as_ref(),
            entry.is_some(),
        );
        let fetch = Fetch {
            fwd: match (&entry, control.no_cache) {
                (None, _) => "uri-miss",
                (Some(_), true) => "request",
                (Some(_), false) => "stale",
            },
            cacheable: Cacheable {
                key,
                policy,
                objects,
                ticket: self.store.read_ticket(),
                validated: validator.is_some(),
                entry,
            },
        };
        let outcome = self.fetch(&parts, fetch, get).await?;
        timer.add(Duration::from_micros(outcome.upstream_us()));
        self.respond(&parts, &outcome)
    }

    /// Reads the usage headers and any throttling error of a collected
    /// upstream answer about `objects`.
    pub(crate) fn observe(&self, answer: &Answer, subject: &Subject) {
        self.limits.observe_answer(
            answer.status,
            &answer.headers,
            &answer.body,
            subject,
            &self.metrics,
        );
    }

    /// The subject of a request's answer, for its usage headers.
    fn subject_of(&self, parts: &Parts) -> Subject {
        let params = QueryParams::parse(parts.uri.query());
        let caller = self.tokens.identify(
            params.get("access_token"),
            authorization_credential(&parts.headers).as_deref(),
        );
        Subject::of_request(parts.uri.path(), Some(caller))
    }

    /// Drops every entry of `objects` after a write (that succeeded, or may
    /// have), and counts them.
    pub(crate) async fn invalidate(&self, objects: &[ObjectId]) {
        if objects.is_empty() {
            return;
        }
        let dropped = self.store.invalidate_objects(objects).await;
        self.metrics.count_invalidated(dropped);
    }

    /// Throttle protection for a read that would go upstream: while its
    /// scope is throttled or its quota nearly spent, a stored entry within
    /// max stale is served instead (and, with quota-aware freshness, an entry
    /// within its stretched TTL); while throttled, a read with no entry may
    /// be answered locally with Graph's throttling envelope. Routes that
    /// must always revalidate (async request sets) are only protected while
    /// throttled.
    pub(crate) fn protection(
        &self,
        entry: Option<&CachedResponse>,
        objects: &[ObjectId],
        caller: crate::key::TokenIdentity,
        revalidation_asked: bool,
        now: Instant,
    ) -> Protection {
        let verdict = self.limits.verdict(objects, Some(caller));
        if verdict.throttled.is_none() && verdict.usage == 0.0 {
            return Protection::Forward;
        }
        let avoided = &self.metrics.usage.avoided;
        let Some(entry) = entry.filter(|e| e.freshness(now) != Freshness::Expired) else {
            return match verdict.throttled {
                Some((remaining, code)) if self.limits.settings.answer_locally => {
                    avoided.throttled.inc();
                    Protection::Refuse(ProxyError::Throttled { code, remaining })
                }
                _ => Protection::Forward,
            };
        };
        let volatile = entry.policy.always_revalidate;
        let stretched = self
            .limits
            .stretched_ttl(entry.policy.fresh_ttl, verdict.usage);
        let (detail, outcome, counter) = if verdict.throttled.is_some() {
            (
                "graphcache; hit; detail=throttled",
                Outcome::Throttled,
                &avoided.throttled,
            )
        } else if volatile {
            return Protection::Forward;
        } else if verdict.usage >= self.limits.settings.pressure_threshold {
            (
                "graphcache; hit; detail=quota-pressure",
                Outcome::Pressure,
                &avoided.pressure,
            )
        } else if !revalidation_asked && entry.age(now) < stretched {
            (
                "graphcache; hit; detail=quota-ttl",
                Outcome::Pressure,
                &avoided.pressure,
            )
        } else {
            return Protection::Forward;
        };
        counter.inc();
        Protection::Serve(HeaderValue::from_static(detail), outcome)
    }

    /// The upstream GET for a cacheable read: a revalidation with the stored
    /// ETag when there is one, the client's own conditional when there is no
    /// entry, an unconditional fetch otherwise.
    fn upstream_get(
        &self,
        parts: &Parts,
        params: &QueryParams<'_>,
        identity: crate::key::TokenIdentity,
        validator: Option<&HeaderValue>,
        has_entry: bool,
    ) -> UpstreamGet {
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        for name in [
            header::ACCEPT_ENCODING,
            header::CACHE_CONTROL,
            header::PRAGMA,
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::IF_MODIFIED_SINCE,
        ] {
            headers.remove(name);
        }
        match validator {
            Some(tag) => {
                headers.insert(header::IF_NONE_MATCH, tag.clone());
            }
            // An entry without an ETag cannot be revalidated: fetch it anew.
            None if has_entry => {
                headers.remove(header::IF_NONE_MATCH);
            }
            None => {}
        }
        let path = parts.uri.path();
        UpstreamGet {
            path_and_query: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            group: GroupKey {
                version: batch::api_version(path).map(Into::into),
                identity,
                user_agent: headers.get(header::USER_AGENT).cloned(),
            },
            relative_url: batch::relative_url(path, parts.uri.query()),
            access_token: params.get("access_token").map(str::to_owned),
            appsecret_proof: params.get("appsecret_proof").map(str::to_owned),
            headers,
            subject: Subject::of_request(path, Some(identity)),
        }
    }

    /// Runs the upstream part of a cacheable read, shared with identical
    /// concurrent reads unless coalescing is off.
    async fn fetch(
        self: &Arc<Self>,
        parts: &Parts,
        fetch: Fetch,
        get: UpstreamGet,
    ) -> Result<Arc<FetchOutcome>, ProxyError> {
        let settings = &self.config.coalesce;
        if !settings.enabled {
            return Ok(Arc::new(self.run_fetch(fetch, get).await));
        }
        // Requests share a call only if they would send the same request (the
        // client's own conditional matters when there is no entry) and no
        // write landed since the call started: a read that starts after a
        // write must not get the answer of a read that started before it.
        let client_conditional = match &fetch.cacheable.entry {
            None => parts.headers.get(header::IF_NONE_MATCH).cloned(),
            Some(_) => None,
        };
        let flight_key = (
            fetch.cacheable.key,
            client_conditional,
            fetch.cacheable.ticket.sequence(),
        );
        let fallback = fetch.cacheable.usable_stale();
        let proxy = self.clone();
        let ticket = self.flights.join_or_start(flight_key, move || async move {
            Arc::new(proxy.run_fetch(fetch, get).await)
        });
        let metrics = &self.metrics.coalesce;
        if ticket.joined {
            metrics.joined.inc();
            self.metrics.usage.avoided.shared_call.inc();
        }
        // A guard, so a request dropped on client disconnect still counts down.
        let _waiting = GaugeGuard::new(&metrics.waiting);
        let error = match tokio::time::timeout(settings.wait, ticket.wait()).await {
            Ok(Some(outcome)) => return Ok(outcome),
            Ok(None) => ProxyError::FlightLost,
            Err(_) => ProxyError::CoalesceTimeout(settings.wait),
        };
        // The shared call is late or lost: a young enough entry still serves.
        match fallback {
            Some(entry) => Ok(Arc::new(FetchOutcome::Stale {
                entry,
                fwd_status: None,
                upstream_us: 0,
            })),
            None => Err(error),
        }
    }

    /// Goes upstream (alone or in a batch), then updates the cache: a 304
    /// refreshes the entry, a storable 200 replaces it, a 4xx drops it, and a
    /// failure falls back to the stale entry if it is young enough.
    async fn run_fetch(self: &Arc<Self>, fetch: Fetch, get: UpstreamGet) -> FetchOutcome {
        let Fetch { cacheable, fwd } = fetch;
        let answer = match self.dispatch(get).await {
            Ok(answer) => answer,
            Err(error) => {
                if let Some(entry) = cacheable.usable_stale() {
                    tracing::warn!(kind = error.kind(), error = %error, "serving stale after upstream failure");
                    return FetchOutcome::Stale {
                        entry,
                        fwd_status: None,
                        upstream_us: 0,
                    };
                }
                return FetchOutcome::Failed(error);
            }
        };
        let upstream_us = answer.upstream_us;
        match self.settle(&cacheable, &answer).await {
            Settled::Revalidated(entry) => FetchOutcome::Revalidated {
                entry,
                fwd,
                upstream_us,
            },
            Settled::Stale(entry) => FetchOutcome::Stale {
                entry,
                fwd_status: Some(answer.status.as_u16()),
                upstream_us,
            },
            Settled::Relay { stored, detail } => FetchOutcome::Answer {
                outcome: match (&cacheable.entry, stored) {
                    (Some(_), true) => Outcome::Refreshed,
                    _ => Outcome::Miss,
                },
                answer,
                stored,
                fwd,
                detail,
            },
        }
    }

    /// What an upstream answer to a cacheable read does to the cache, shared
    /// by single reads and client batch items: a 304 to graphcache's own
    /// validator refreshes the entry; a 5xx or a throttling answer falls back
    /// to a young enough entry; any other 4xx drops the entry (the object is
    /// gone or no longer readable with this token); a storable 200 replaces it.
    pub(crate) async fn settle(&self, cacheable: &Cacheable, answer: &Answer) -> Settled {
        let status = answer.status;
        if status == StatusCode::NOT_MODIFIED && cacheable.validated {
            if let Some(entry) = &cacheable.entry {
                let refreshed =
                    Arc::new(entry.revalidated(answer.headers.get(header::ETAG).cloned()));
                self.store
                    .put(cacheable.key, clone_entry(&refreshed), cacheable.ticket)
                    .await;
                return Settled::Revalidated(refreshed);
            }
        }
        let throttled =
            status.is_client_error() && crate::usage::throttle_error(&answer.body).is_some();
        if status.is_server_error() || throttled {
            if let Some(entry) = cacheable.usable_stale() {
                return Settled::Stale(entry);
            }
        }
        if status.is_client_error() && !throttled && cacheable.entry.is_some() {
            self.store.remove(&cacheable.key).await;
        }
        match self.storable_entry(answer, cacheable.policy, cacheable.objects.clone()) {
            Ok(entry) => Settled::Relay {
                stored: self.store.put(cacheable.key, entry, cacheable.ticket).await,
                detail: None,
            },
            Err(detail) => Settled::Relay {
                stored: false,
                detail,
            },
        }
    }

    /// The entry to store for an upstream answer, or why it is not stored
    /// (with an RFC 9211 detail when that is worth telling the client).
    pub(crate) fn storable_entry(
        &self,
        answer: &Answer,
        policy: CachePolicy,
        objects: Arc<[ObjectId]>,
    ) -> Result<CachedResponse, Option<&'static str>> {
        if answer.status != StatusCode::OK
            || !storable_head(&answer.headers)
            || policy.retention().is_zero()
        {
            return Err(None);
        }
        if answer.body.len() > self.config.max_entry_bytes {
            return Err(Some("too-large"));
        }
        if !storable_body(&answer.body) {
            return Err(None);
        }
        let mut headers = answer.headers.clone();
        strip_per_call(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        let etag = headers.get(header::ETAG).cloned();
        Ok(CachedResponse::new(
            headers,
            answer.body.clone(),
            etag,
            policy,
            objects,
        ))
    }

    /// One waiter's response from a (possibly shared) fetch outcome.
    fn respond(&self, parts: &Parts, outcome: &FetchOutcome) -> Result<Handled, ProxyError> {
        let now = Instant::now();
        match outcome {
            FetchOutcome::Revalidated { entry, fwd, .. } => Ok(serve_entry(
                parts,
                entry,
                now,
                cache_status(fwd, Some(304), false, None),
                Outcome::Revalidated,
            )),
            FetchOutcome::Stale {
                entry, fwd_status, ..
            } => Ok(serve_entry(
                parts,
                entry,
                now,
                cache_status("stale", *fwd_status, false, Some("stale-if-error")),
                Outcome::Stale,
            )),
            FetchOutcome::Failed(error) => Err(error.clone()),
            FetchOutcome::Answer {
                answer,
                stored,
                fwd,
                detail,
                outcome,
            } => {
                check_encoding(&parts.headers, &answer.headers)?;
                let status = cache_status(fwd, Some(answer.status.as_u16()), *stored, *detail);
                let matches = answer.status == StatusCode::OK
                    && answer
                        .headers
                        .get(header::ETAG)
                        .is_some_and(|tag| if_none_match_matches(&parts.headers, tag));
                if matches {
                    return Ok(Handled::new(
                        not_modified(&answer.headers, status),
                        *outcome,
                    ));
                }
                Ok(Handled::new(
                    answer_response(parts, answer, status),
                    *outcome,
                ))
            }
        }
    }

    /// Reads the usage headers of a relayed answer and, for an error, its
    /// body (up to 64 KiB, then relayed as read) for a throttling code.
    async fn observe_relayed(
        &self,
        response: Response<Incoming>,
        subject: &Subject,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        const ERROR_PEEK: usize = 64 << 10;
        let (head, body) = response.into_parts();
        if head.status.is_success() || head.status.is_redirection() {
            self.limits.observe(&head.headers, subject, &self.metrics);
            return Ok(Response::from_parts(head, body.into()));
        }
        let collected =
            tokio::time::timeout(self.upstream.timeout, collect_up_to(body, ERROR_PEEK))
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(self.upstream.timeout))?
                .map_err(|e| ProxyError::UpstreamBody(Arc::new(e)))?;
        let body = match collected {
            Collected::Complete(bytes) => {
                self.limits.observe_answer(
                    head.status,
                    &head.headers,
                    &bytes,
                    subject,
                    &self.metrics,
                );
                ResponseBody::full(bytes)
            }
            Collected::Overflow { prefix, rest } => {
                self.limits.observe(&head.headers, subject, &self.metrics);
                ResponseBody::Relay {
                    prefix: Some(prefix),
                    rest,
                }
            }
        };
        Ok(Response::from_parts(head, body))
    }

    /// Runs a client batch in its own task, so the writes in it are settled
    /// (and invalidate) even when the client disconnects.
    async fn client_batch_detached(
        self: &Arc<Self>,
        parts: &Parts,
        batch: crate::client_batch::ClientBatch,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        if !batch.items.iter().any(crate::client_batch::Item::is_write) {
            // Nothing to settle after a disconnect: run on the connection.
            let params = QueryParams::parse(parts.uri.query());
            return self.client_batch(parts, &params, batch, timer).await;
        }
        let (mut owned, ()) = Request::new(()).into_parts();
        owned.method = parts.method.clone();
        owned.uri = parts.uri.clone();
        owned.version = parts.version;
        owned.headers = parts.headers.clone();
        let proxy = self.clone();
        let task = self
            .detached
            .spawn(async move {
                let params = QueryParams::parse(owned.uri.query());
                let timer = UpstreamTimer::default();
                let result = proxy.client_batch(&owned, &params, batch, &timer).await;
                (result, timer.micros())
            })
            .await;
        let (result, upstream_us) = task.await.map_err(|_| ProxyError::FlightLost)?;
        if let Some(us) = upstream_us {
            timer.add(Duration::from_micros(us));
        }
        result
    }

    /// The client batch in a POST, if it is one graphcache serves: not
    /// multipart (files pass through untouched) and not JSONP.
    fn as_client_batch(
        &self,
        parts: &Parts,
        params: &QueryParams<'_>,
        body: &[u8],
    ) -> Result<Option<crate::client_batch::ClientBatch>, ProxyError> {
        if parts.method != Method::POST || params.contains("callback") {
            return Ok(None);
        }
        let content_type = parts.headers.get(header::CONTENT_TYPE);
        let batch =
            crate::client_batch::parse(params, content_type, body).map_err(ProxyError::BadBatch)?;
        Ok(batch.filter(|b| !b.top_level.iter().any(|(k, _)| k == "callback")))
    }

    /// A cacheable method that must not touch the cache.
    async fn bypass(
        &self,
        parts: Parts,
        body: Option<Bytes>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        headers.remove(header::ACCEPT_ENCODING);
        let mut request = Request::new(match body {
            Some(bytes) => full_body(bytes),
            None => {
                headers.remove(header::CONTENT_LENGTH);
                empty_body()
            }
        });
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = self.upstream.uri_for(parts.uri.path_and_query());
        *request.headers_mut() = headers;
        let response = self.upstream.send(request, &self.metrics, timer).await?;
        let response = self
            .observe_relayed(response, &self.subject_of(&parts))
            .await?;
        let status = cache_status("bypass", Some(response.status().as_u16()), false, None);
        check_encoding(&parts.headers, response.headers())?;
        Ok(relay(&parts, response, status, Outcome::Bypass))
    }

    // === writes and everything else ===

    /// Forwards a write (or any non-cacheable method) exactly once, streaming
    /// its body, and invalidates what a successful write changed.
    async fn write(
        self: &Arc<Self>,
        request: Request<Incoming>,
        params: &QueryParams<'_>,
        outcome: Outcome,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let (parts, body) = request.into_parts();
        let max_body = self.config.max_body_bytes;
        let mut body_params: Vec<(String, String)> = Vec::new();
        let upstream_body = if body.is_end_stream() {
            if let Some(batch) = self.as_client_batch(&parts, params, b"")? {
                return self.client_batch_detached(&parts, batch, timer).await;
            }
            empty_body()
        } else if outcome == Outcome::Write && parseable_write_body(&parts.headers) {
            // A client trickling its body must not hold the request forever.
            let read = collect_up_to(body, MAX_PARSED_WRITE_BODY.min(max_body));
            match tokio::time::timeout(self.upstream.timeout, read)
                .await
                .map_err(|_| ProxyError::ClientTimeout)?
                .map_err(|e| ProxyError::ClientBody(Arc::new(e)))?
            {
                Collected::Complete(bytes) => {
                    if let Some(batch) = self.as_client_batch(&parts, params, &bytes)? {
                        return self.client_batch_detached(&parts, batch, timer).await;
                    }
                    body_params = write_body_params(&parts.headers, &bytes);
                    full_body(bytes)
                }
                Collected::Overflow { prefix, rest } => limited_body(
                    ResponseBody::Relay {
                        prefix: Some(prefix),
                        rest,
                    },
                    max_body,
                ),
            }
        } else {
            limited_body(body, max_body)
        };
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        headers.remove(header::ACCEPT_ENCODING);
        let mut request = Request::new(upstream_body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = self.upstream.uri_for(parts.uri.path_and_query());
        *request.headers_mut() = headers;
        let objects = objects_of(
            parts.uri.path(),
            params
                .iter()
                .chain(body_params.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        );
        // The exchange and its invalidation run in their own task: a client
        // that disconnects mid-write cannot leave stale entries behind.
        let subject = self.subject_of(&parts);
        let proxy = self.clone();
        let is_write = outcome == Outcome::Write;
        let exchange = self
            .detached
            .spawn(async move {
                let timer = UpstreamTimer::default();
                let result = match proxy.upstream.send(request, &proxy.metrics, &timer).await {
                    Ok(response) => proxy.observe_relayed(response, &subject).await,
                    Err(error) => Err(error),
                };
                // Invalidate unless Graph rejected the write (4xx): a 2xx applied
                // it, and a 5xx, a timeout or a broken connection may have.
                let rejected = matches!(&result, Ok(r) if r.status().is_client_error());
                if is_write && !rejected {
                    proxy.invalidate(&objects).await;
                }
                (result, timer.micros())
            })
            .await;
        let (result, upstream_us) = exchange.await.map_err(|_| ProxyError::FlightLost)?;
        if let Some(us) = upstream_us {
            timer.add(Duration::from_micros(us));
        }
        let response = result.map_err(|error| match error {
            // The client's streamed body passed max_body_bytes mid-way.
            ProxyError::UpstreamUnreachable(e) if caused_by_length_limit(&*e) => {
                ProxyError::BodyTooLarge { limit: max_body }
            }
            other => other,
        })?;
        check_encoding(&parts.headers, response.headers())?;
        let status = cache_status("method", Some(response.status().as_u16()), false, None);
        Ok(relay(&parts, response, status, outcome))
    }
}

/// Holds a gauge up for as long as it lives.
struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Tasks that must finish even if their client leaves (writes, client
/// batches with writes): tracked for shutdown, bounded in number.
pub(crate) struct Detached {
    tracker: tokio_util::task::TaskTracker,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Detached {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            tracker: tokio_util::task::TaskTracker::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
        }
    }

    /// Spawns `task` once a slot is free (waiting for one if need be).
    async fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.tracker.spawn(async move {
            let output = task.await;
            drop(slot);
            output
        })
    }

    /// Stops taking tasks and waits for those running.
    pub(crate) async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// What throttle protection decides for a read (see [`Proxy::protection`]).
pub(crate) enum Protection {
    /// Go upstream as usual.
    Forward,
    /// Serve the stored entry, with this `Cache-Status` and outcome.
    Serve(HeaderValue, Outcome),
    /// Answer locally with Graph's throttling envelope.
    Refuse(ProxyError),
}

/// A cacheable read on its way upstream: where its answer goes in the cache.
pub(crate) struct Cacheable {
    pub key: CacheKey,
    pub policy: CachePolicy,
    pub objects: Arc<[ObjectId]>,
    pub ticket: ReadTicket,
    pub entry: Option<Arc<CachedResponse>>,
    /// The stored ETag went upstream as `If-None-Match`.
    pub validated: bool,
}

impl Cacheable {
    /// The stored entry, if it is young enough to serve when upstream fails.
    fn usable_stale(&self) -> Option<Arc<CachedResponse>> {
        self.entry
            .as_ref()
            .filter(|e| e.freshness(Instant::now()) != Freshness::Expired)
            .cloned()
    }
}

/// What an upstream answer did to the cache (see [`Proxy::settle`]).
pub(crate) enum Settled {
    /// 304 to graphcache's validator: the refreshed entry, to serve.
    Revalidated(Arc<CachedResponse>),
    /// Upstream failed or throttled: this entry is young enough to serve.
    Stale(Arc<CachedResponse>),
    /// Serve the answer as it came; `stored` says whether it was kept.
    Relay {
        stored: bool,
        detail: Option<&'static str>,
    },
}

/// A single cacheable read going upstream.
struct Fetch {
    cacheable: Cacheable,
    /// RFC 9211 `fwd` value: why the request went upstream.
    fwd: &'static str,
}

/// What one upstream fetch came to; shared by every waiter of a flight.
#[derive(Debug)]
pub(crate) enum FetchOutcome {
    /// 304 to our revalidation: the refreshed entry.
    Revalidated {
        entry: Arc<CachedResponse>,
        fwd: &'static str,
        upstream_us: u64,
    },
    /// Upstream failed; this entry is young enough to serve.
    Stale {
        entry: Arc<CachedResponse>,
        fwd_status: Option<u16>,
        upstream_us: u64,
    },
    /// Upstream answered; served as it came (and stored if `stored`).
    Answer {
        answer: Answer,
        stored: bool,
        fwd: &'static str,
        detail: Option<&'static str>,
        outcome: Outcome,
    },
    Failed(ProxyError),
}

impl FetchOutcome {
    fn upstream_us(&self) -> u64 {
        match self {
            Self::Revalidated { upstream_us, .. } | Self::Stale { upstream_us, .. } => *upstream_us,
            Self::Answer { answer, .. } => answer.upstream_us,
            Self::Failed(_) => 0,
        }
    }
}

/// Reads a GET body to tell "no body" (including the Node SDK's `{}`) from a
/// real one. Reading it also keeps the keep-alive connection healthy.
async fn read_get_body(body: Incoming, timeout: Duration) -> Result<GetBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(GetBody::Nothing);
    }
    let collected = tokio::time::timeout(timeout, collect_up_to(body, MAX_GET_BODY))
        .await
        .map_err(|_| ProxyError::ClientTimeout)?
        .map_err(|e| ProxyError::ClientBody(Arc::new(e)))?;
    match collected {
        Collected::Complete(bytes) => {
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() || trimmed == b"{}" {
                Ok(GetBody::Nothing)
            } else {
                Ok(GetBody::Some(bytes))
            }
        }
        Collected::Overflow { .. } => Err(ProxyError::BodyTooLarge {
            limit: MAX_GET_BODY,
        }),
    }
}

/// A response from a stored entry: a 304 when the client's own
/// `If-None-Match` matches, else the stored body. Shares the body bytes.
fn serve_entry(
    parts: &Parts,
    entry: &CachedResponse,
    now: Instant,
    cache_status: HeaderValue,
    outcome: Outcome,
) -> Handled {
    let age = age_value(entry.age(now).as_secs());
    if entry
        .etag
        .as_ref()
        .is_some_and(|tag| if_none_match_matches(&parts.headers, tag))
    {
        let mut response = not_modified(&entry.headers, cache_status);
        response.headers_mut().insert(header::AGE, age);
        return Handled::new(response, outcome);
    }
    let mut response = Response::new(if parts.method == Method::HEAD {
        ResponseBody::Empty
    } else {
        ResponseBody::full(entry.body.clone())
    });
    let headers = response.headers_mut();
    headers.reserve(entry.headers.len() + 3);
    headers.extend(entry.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
    headers.insert(header::AGE, age);
    headers.insert(CACHE_STATUS, cache_status);
    if parts.method == Method::HEAD {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
    }
    Handled::new(response, outcome)
}

/// Points the paging links of a complete JSON answer back at graphcache.
fn rewrite_paging(
    rewriter: &crate::paging::PagingRewriter,
    mut response: Response<ResponseBody>,
    origin: &http::uri::Authority,
) -> Response<ResponseBody> {
    if !crate::paging::is_json(response.headers()) {
        return response;
    }
    let mut changed = false;
    if let ResponseBody::Full(Some(body)) = response.body_mut() {
        let rewritten = rewriter.rewrite(body, origin);
        changed = rewritten.len() != body.len();
        *body = rewritten;
    }
    if changed {
        let headers = response.headers_mut();
        // hyper sizes a complete body itself; a relayed length would lie.
        headers.remove(header::CONTENT_LENGTH);
        // The bytes now differ from what Graph's strong tag names.
        if let Some(weak) = headers.get(header::ETAG).and_then(weaken) {
            headers.insert(header::ETAG, weak);
        }
    }
    response
}

/// True when `error`'s chain holds a body-limit error.
fn caused_by_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// `W/"…"` for a strong tag (weak comparison, which `If-None-Match` uses,
/// still matches it).
fn weaken(tag: &HeaderValue) -> Option<HeaderValue> {
    if tag.as_bytes().starts_with(b"W/") {
        return None;
    }
    let mut weak = Vec::with_capacity(tag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(tag.as_bytes());
    HeaderValue::from_bytes(&weak).ok()
}

/// A 304 carrying the validator and caching headers of `headers`.
fn not_modified(headers: &HeaderMap, cache_status: HeaderValue) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Empty);
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    let out = response.headers_mut();
    for name in [
        header::ETAG,
        header::CACHE_CONTROL,
        header::EXPIRES,
        header::VARY,
    ] {
        if let Some(value) = headers.get(&name) {
            out.insert(name, value.clone());
        }
    }
    out.insert(CACHE_STATUS, cache_status);
    response
}

/// A collected upstream answer sent to one client.
fn answer_response(
    parts: &Parts,
    answer: &Answer,
    cache_status: HeaderValue,
) -> Response<ResponseBody> {
    let head = parts.method == Method::HEAD;
    let mut response = Response::new(if head {
        ResponseBody::Empty
    } else {
        ResponseBody::full(answer.body.clone())
    });
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.reserve(answer.headers.len() + 2);
    headers.extend(answer.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
    headers.remove(header::CONTENT_LENGTH);
    if head {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(answer.body.len()));
    }
    headers.insert(CACHE_STATUS, cache_status);
    response
}

/// Streams an upstream answer to the client, minus hop-by-hop headers.
fn relay<B>(
    parts: &Parts,
    response: Response<B>,
    cache_status: HeaderValue,
    outcome: Outcome,
) -> Handled
where
    B: Into<ResponseBody>,
{
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    head.headers.insert(CACHE_STATUS, cache_status);
    let body = if parts.method == Method::HEAD {
        ResponseBody::Empty
    } else {
        body.into()
    };
    Handled::new(Response::from_parts(head, body), outcome)
}

impl From<Incoming> for ResponseBody {
    fn from(rest: Incoming) -> Self {
        ResponseBody::Relay { prefix: None, rest }
    }
}

/// Refuses to relay an encoded body to a client that did not accept it.
/// graphcache asks upstream for identity, so this only trips on an upstream
/// that ignores `Accept-Encoding`.
fn check_encoding(request: &HeaderMap, response: &HeaderMap) -> Result<(), ProxyError> {
    if is_encoded(response) && !accepts_gzip(request) {
        return Err(ProxyError::UpstreamEncoding);
    }
    Ok(())
}

/// A 200 head that may be stored: no cookies, no content encoding.
fn storable_head(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::SET_COOKIE) && !is_encoded(headers)
}

/// A 200 body that may be stored: not an error envelope (Graph answers some
/// errors with 200, e.g. with `suppress_http_code=1`), and no paging links
/// minted for a batch (`_fb_batch_`), which fail when followed directly.
fn storable_body(body: &Bytes) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Option<serde::de::IgnoredAny>,
    }
    if memchr::memmem::find(body, b"_fb_batch_").is_some() {
        return false;
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(envelope) => envelope.error.is_none(),
        // Arrays and scalars are not envelopes; a malformed object is not kept.
        Err(_) => !body.trim_ascii_start().starts_with(b"{"),
    }
}

fn parseable_write_body(headers: &HeaderMap) -> bool {
    let content_type = headers.get(header::CONTENT_TYPE);
    is_media_type(content_type, "application/x-www-form-urlencoded")
        || is_media_type(content_type, "application/json")
}

/// Top-level parameters of a form or JSON write body, for object ids.
fn write_body_params(headers: &HeaderMap, body: &[u8]) -> Vec<(String, String)> {
    if !is_media_type(headers.get(header::CONTENT_TYPE), "application/json") {
        return form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// An RFC 9211 `Cache-Status` value for a forwarded request.
pub(crate) fn cache_status(
    fwd: &str,
    fwd_status: Option<u16>,
    stored: bool,
    detail: Option<&str>,
) -> HeaderValue {
    let mut value = String::with_capacity(64);
    value.push_str("graphcache; fwd=");
    value.push_str(fwd);
    if let Some(status) = fwd_status {
        value.push_str("; fwd-status=");
        value.push_str(&status.to_string());
    }
    if stored {
        value.push_str("; stored");
    }
    if let Some(detail) = detail {
        value.push_str("; detail=");
        value.push_str(detail);
    }
    HeaderValue::from_str(&value).expect("cache-status is ASCII")
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(crate) fn empty_body() -> UpstreamBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn limited_body<B>(body: B, limit: usize) -> UpstreamBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    Limited::new(body, limit).boxed()
}

/// A copy of an entry's data for storing while the original is served.
pub(crate) fn clone_entry(entry: &CachedResponse) -> CachedResponse {
    let mut copy = CachedResponse::new(
        entry.headers.clone(),
        entry.body.clone(),
        entry.etag.clone(),
        entry.policy,
        entry.objects.clone(),
    );
    copy.stored_at = entry.stored_at;
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelopes_and_batch_links_are_not_stored() {
        assert!(storable_body(&Bytes::from_static(
            b"{\"id\":\"1\",\"name\":\"a\"}"
        )));
        assert!(storable_body(&Bytes::from_static(b"[1,2]")));
        assert!(storable_body(&Bytes::from_static(b"true")));
        assert!(!storable_body(&Bytes::from_static(
            b"{\"error\":{\"code\":190}}"
        )));
        assert!(!storable_body(&Bytes::from_static(b" {\"error\" : {}}")));
        assert!(!storable_body(&Bytes::from_static(
            b"{\"data\":[],\"paging\":{\"next\":\"https://x/?_fb_batch_child_request=1\"}}"
        )));
        // A field merely named like an error inside data is fine.
        assert!(storable_body(&Bytes::from_static(
            b"{\"data\":[{\"error\":1}]}"
        )));
    }

    #[test]
    fn cache_status_values() {
        assert_eq!(
            cache_status("stale", Some(304), false, None),
            "graphcache; fwd=stale; fwd-status=304"
        );
        assert_eq!(
            cache_status("uri-miss", Some(200), true, None),
            "graphcache; fwd=uri-miss; fwd-status=200; stored"
        );
        assert_eq!(
            cache_status("stale", None, false, Some("stale-if-error")),
            "graphcache; fwd=stale; detail=stale-if-error"
        );
    }

    #[test]
    fn write_body_parameters_from_form_and_json() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert_eq!(
            write_body_params(&h, b"adset_id=5&name=x"),
            [("adset_id".into(), "5".into()), ("name".into(), "x".into())]
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(
            write_body_params(&h, br#"{"campaign_id":7}"#),
            [("campaign_id".into(), "7".into())]
        );
        assert!(write_body_params(&h, b"not json").is_empty());
    }
}
