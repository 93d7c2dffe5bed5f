//! Stage 3a: a cacheable GET or HEAD. Lookup → fresh → respond is the hit
//! path; everything else revalidates or fetches upstream, shared with
//! identical concurrent reads, settles the answer in the cache, and answers
//! the client's own conditional locally.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use http::request::Parts;

use crate::cache::identity::authorization_credential;
use crate::cache::key::cache_key;
use crate::cache::{CacheKey, CachedResponse, FillClaim, Secrets, Store, TokenIdentity};
use crate::error::ProxyError;
use crate::graph::batch;
use crate::graph::routes::CachePolicy;
use crate::metrics::Outcome;
use crate::proxy::classify::Request;
use crate::proxy::lookup::{Lookup, ReadKey};
use crate::proxy::respond::{
    answer_response, check_encoding, serve_entry, CacheStatus, Detail, Fwd, Handled, HitReason,
};
use crate::proxy::settle::{job_status_of, Cacheable, Settled, VaryCheck};
use crate::proxy::{GaugeGuard, Proxy};
use crate::ratelimit::Subject;
use crate::upstream::packer::{GroupKey, UpstreamGet};
use crate::upstream::request::{forward_headers, Exchange};
use crate::upstream::{Answer, UpstreamTimer};

/// What identical reads must share to share an upstream call: the cache key
/// and the write sequences (this replica's and, in a fleet, the fleet's)
/// when they started: a read that starts after a write, through any
/// replica, never joins a call that started before it.
pub(crate) type FlightKey = (CacheKey, u64, Option<crate::fleet::Stamp>);

/// What one upstream fetch came to; shared by every waiter of a flight.
#[derive(Debug)]
pub(crate) enum FetchOutcome {
    /// 304 to our revalidation: the refreshed entry.
    Revalidated {
        entry: Arc<CachedResponse>,
        fwd: Fwd,
        upstream_us: u64,
    },
    /// Another replica of the fleet fetched it while this one waited.
    Filled {
        entry: Arc<CachedResponse>,
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
        fwd: Fwd,
        detail: Option<Detail>,
        outcome: Outcome,
        vary: VaryCheck,
    },
    Failed(ProxyError),
}

impl FetchOutcome {
    fn upstream_us(&self) -> u64 {
        match self {
            Self::Revalidated { upstream_us, .. } | Self::Stale { upstream_us, .. } => *upstream_us,
            Self::Answer { answer, .. } => answer.upstream_us,
            Self::Filled { .. } | Self::Failed(_) => 0,
        }
    }

    /// True when this outcome may answer a request with `headers`: a joined
    /// request whose headers differ where the answer varies gets its own call.
    fn admits(&self, headers: &http::HeaderMap) -> bool {
        match self {
            Self::Revalidated { entry, .. }
            | Self::Stale { entry, .. }
            | Self::Filled { entry } => entry.matches_vary(headers),
            Self::Answer { vary, .. } => vary.admits(headers),
            Self::Failed(_) => true,
        }
    }
}

impl Proxy {
    /// Answers a cacheable read.
    pub(crate) async fn read(
        self: &Arc<Self>,
        request: &Request<'_>,
        policy: CachePolicy,
        identity: TokenIdentity,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let parts = request.parts;
        let path = parts.uri.path();
        let authorization = authorization_credential(&parts.headers);
        let read = ReadKey {
            key: cache_key(path, &request.query, request.user_agent, &identity),
            path,
            query: &request.query,
            identity,
            headers: &parts.headers,
            control: request.control,
            secrets: Secrets::of(
                request.query.get("access_token"),
                authorization.as_deref(),
                request.query.get("appsecret_proof"),
            ),
        };
        let now = Instant::now();
        let (entry, fwd, objects) = match self.lookup(&read, now).await {
            Lookup::Serve(entry, reason) => {
                return Ok(serve_entry(
                    parts,
                    &entry,
                    now,
                    reason.status(),
                    reason.outcome(),
                ))
            }
            Lookup::Refuse(error) => return Err(error),
            Lookup::Bypass => return self.bypass(parts, None, Some(identity), timer).await,
            Lookup::Fetch {
                entry,
                fwd,
                objects,
            } => (entry, fwd, objects),
        };
        let validator = entry.as_ref().and_then(|e| e.etag.clone());
        let cacheable = Cacheable {
            key: read.key,
            policy,
            objects,
            ticket: self.store.read_ticket().await,
            validated: validator.is_some(),
            entry,
            vary_basis: parts.headers.clone(),
            status_of: job_status_of(path, &request.query),
            secrets: read.secrets.to_owned(),
        };
        let get = self.upstream_get(request, identity, validator);
        let (outcome, joined) = self.fetch(cacheable, fwd, get).await?;
        timer.add(Duration::from_micros(outcome.upstream_us()));
        let filled = matches!(*outcome, FetchOutcome::Filled { .. });
        if (joined || filled) && !outcome.admits(&parts.headers) {
            // The shared answer (or a sibling replica's) varies on a header
            // this request differs in.
            return self.bypass(parts, None, Some(identity), timer).await;
        }
        self.respond(parts, &outcome)
    }

    /// The upstream GET for a cacheable read: graphcache's own validator
    /// when it has an entry with an ETag, unconditional otherwise (the
    /// client's conditional is answered locally once the answer is in).
    fn upstream_get(
        &self,
        request: &Request<'_>,
        identity: TokenIdentity,
        validator: Option<http::HeaderValue>,
    ) -> UpstreamGet {
        let parts = request.parts;
        let mut headers = forward_headers(&parts.headers, Exchange::Read);
        if let Some(tag) = validator {
            headers.insert(header::IF_NONE_MATCH, tag);
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
                origin: headers.get(header::ORIGIN).cloned(),
            },
            relative_url: batch::relative_url(path, parts.uri.query()),
            access_token: request.query.get("access_token").map(str::to_owned),
            appsecret_proof: request.query.get("appsecret_proof").map(str::to_owned),
            headers,
            subject: Subject::of_request(path, Some(identity)),
        }
    }

    /// Runs the upstream part of a cacheable read, shared with identical
    /// concurrent reads unless coalescing is off. Returns the outcome and
    /// whether this request joined a call another one started.
    async fn fetch(
        self: &Arc<Self>,
        cacheable: Cacheable,
        fwd: Fwd,
        get: UpstreamGet,
    ) -> Result<(Arc<FetchOutcome>, bool), ProxyError> {
        let settings = self.config.load().coalesce.clone();
        if !settings.enabled {
            return Ok((Arc::new(self.run_fetch(cacheable, fwd, get).await), false));
        }
        let flight_key = (
            cacheable.key,
            cacheable.ticket.sequence(),
            cacheable.ticket.fleet_stamp(),
        );
        let fallback = cacheable.usable_stale();
        let proxy = self.clone();
        let ticket = self.flights.join_or_start(flight_key, move || async move {
            Arc::new(proxy.run_fetch(cacheable, fwd, get).await)
        });
        let metrics = &self.metrics.coalesce;
        let joined = ticket.joined;
        if joined {
            metrics.joined.inc();
            self.metrics.usage.avoided.shared_call.inc();
        }
        // A guard, so a request dropped on client disconnect still counts down.
        let _waiting = GaugeGuard::new(&metrics.waiting);
        let error = match tokio::time::timeout(settings.wait, ticket.wait()).await {
            Ok(Some(outcome)) => return Ok((outcome, joined)),
            Ok(None) => ProxyError::FlightLost,
            Err(_) => ProxyError::CoalesceTimeout(settings.wait),
        };
        // The shared call is late or lost: a young enough entry still serves.
        match fallback {
            Some(entry) => Ok((
                Arc::new(FetchOutcome::Stale {
                    entry,
                    fwd_status: None,
                    upstream_us: 0,
                }),
                joined,
            )),
            None => Err(error),
        }
    }

    /// A cold miss first asks the fleet (one replica fetches, the others
    /// wait for its entry); then goes upstream and settles the answer, and
    /// only then lets the fleet's waiters look.
    async fn run_fetch(&self, cacheable: Cacheable, fwd: Fwd, get: UpstreamGet) -> FetchOutcome {
        let lock = if cacheable.entry.is_none() {
            match self
                .store
                .claim(&cacheable.key, cacheable.ticket, cacheable.secrets.borrow())
                .await
            {
                FillClaim::Filled(entry) => return FetchOutcome::Filled { entry },
                FillClaim::Fetch(lock) => lock,
            }
        } else {
            None
        };
        let outcome = self.fetch_upstream(cacheable, fwd, get).await;
        if let Some(lock) = lock {
            lock.release().await;
        }
        outcome
    }

    /// Goes upstream (alone or in a batch), then settles the answer.
    async fn fetch_upstream(
        &self,
        cacheable: Cacheable,
        fwd: Fwd,
        get: UpstreamGet,
    ) -> FetchOutcome {
        let answer = match self.packer.dispatch(get).await {
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
                return FetchOutcome::Failed(error.into());
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
            Settled::Relay {
                stored,
                detail,
                vary,
            } => FetchOutcome::Answer {
                outcome: match (&cacheable.entry, stored) {
                    (Some(_), true) => Outcome::Refreshed,
                    _ => Outcome::Miss,
                },
                answer,
                stored,
                fwd,
                detail,
                vary,
            },
        }
    }

    /// One waiter's response from a (possibly shared) fetch outcome.
    fn respond(&self, parts: &Parts, outcome: &FetchOutcome) -> Result<Handled, ProxyError> {
        let now = Instant::now();
        match outcome {
            FetchOutcome::Revalidated { entry, fwd, .. } => Ok(serve_entry(
                parts,
                entry,
                now,
                CacheStatus::forward(*fwd, 304),
                Outcome::Revalidated,
            )),
            FetchOutcome::Stale {
                entry, fwd_status, ..
            } => Ok(serve_entry(
                parts,
                entry,
                now,
                CacheStatus::Forward {
                    fwd: Fwd::Stale,
                    fwd_status: *fwd_status,
                    stored: false,
                    detail: Some(Detail::StaleIfError),
                },
                Outcome::Stale,
            )),
            FetchOutcome::Filled { entry } => Ok(serve_entry(
                parts,
                entry,
                now,
                HitReason::Fresh.status(),
                HitReason::Fresh.outcome(),
            )),
            FetchOutcome::Failed(error) => Err(error.clone()),
            FetchOutcome::Answer {
                answer,
                stored,
                fwd,
                detail,
                outcome,
                ..
            } => {
                check_encoding(&parts.headers, &answer.headers)?;
                let status = CacheStatus::Forward {
                    fwd: *fwd,
                    fwd_status: Some(answer.status.as_u16()),
                    stored: *stored,
                    detail: *detail,
                };
                Ok(Handled::new(
                    answer_response(parts, answer, status),
                    *outcome,
                ))
            }
        }
    }
}
