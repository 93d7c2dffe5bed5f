//! Stage 2: the hit decision, one function for single GETs and client batch
//! items alike: a fresh entry is served; otherwise throttle protection may
//! serve a stale one (or refuse); otherwise the read goes upstream.

use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;

use crate::cache::entry::MAX_ENTRY_OBJECTS;
use crate::cache::{CacheKey, CachedResponse, Freshness, Secrets, TokenIdentity};
use crate::error::ProxyError;
use crate::graph::query::QueryParams;
use crate::graph::routes::{objects_of, ObjectId};
use crate::headers::ClientCacheControl;
use crate::proxy::respond::{Fwd, HitReason};
use crate::proxy::Proxy;

/// What the cache does for one read.
pub(crate) enum Lookup {
    /// Serve this entry without going upstream.
    Serve(Arc<CachedResponse>, HitReason),
    /// Answer locally with Graph's throttling envelope.
    Refuse(ProxyError),
    /// Relay it uncached: it names more objects than an entry may hold.
    Bypass,
    /// Go upstream: revalidate `entry` if there is one, else fetch.
    Fetch {
        entry: Option<Arc<CachedResponse>>,
        fwd: Fwd,
        objects: Arc<[ObjectId]>,
    },
}

/// The read being looked up.
pub(crate) struct ReadKey<'a> {
    pub key: CacheKey,
    pub path: &'a str,
    pub query: &'a QueryParams<'a>,
    pub identity: TokenIdentity,
    /// The request headers an entry's `Vary` is matched against.
    pub headers: &'a HeaderMap,
    pub control: ClientCacheControl,
    /// The caller's credentials, which an entry from the fleet's Redis gets
    /// back in its links.
    pub secrets: Secrets<'a>,
}

impl Proxy {
    /// Decides how `read` is answered (see the module doc).
    pub(crate) async fn lookup(&self, read: &ReadKey<'_>, now: Instant) -> Lookup {
        let stored = self.store.get_for(&read.key, read.secrets).await;
        let vary_miss = stored
            .as_ref()
            .is_some_and(|e| !e.matches_vary(read.headers));
        let entry = stored.filter(|_| !vary_miss);
        if let Some(entry) = &entry {
            if !read.control.no_cache && entry.freshness(now) == Freshness::Fresh {
                self.metrics.usage.avoided.fresh_hit.inc();
                return Lookup::Serve(entry.clone(), HitReason::Fresh);
            }
        }
        let objects = objects_of(read.path, read.query.iter());
        if objects.len() > MAX_ENTRY_OBJECTS {
            return Lookup::Bypass;
        }
        let objects: Arc<[ObjectId]> = objects.into();
        match self.protection(
            entry.as_deref(),
            &objects,
            read.identity,
            read.control.no_cache,
            now,
        ) {
            Protection::Forward => {}
            Protection::Serve(reason) => {
                let entry = entry.expect("protection serves only a stored entry");
                return Lookup::Serve(entry, reason);
            }
            Protection::Refuse(error) => return Lookup::Refuse(error),
        }
        let fwd = match (&entry, read.control.no_cache) {
            (None, _) if vary_miss => Fwd::VaryMiss,
            (None, _) => Fwd::UriMiss,
            (Some(_), true) => Fwd::Request,
            (Some(_), false) => Fwd::Stale,
        };
        Lookup::Fetch {
            entry,
            fwd,
            objects,
        }
    }

    /// Throttle protection for a read that would go upstream: while its
    /// scope is throttled or its quota nearly spent, a stored entry within
    /// max stale is served instead (and, with quota-aware freshness, an entry
    /// within its stretched TTL); while throttled, a read with no entry may
    /// be answered locally with Graph's throttling envelope. Routes that
    /// must always revalidate (async request sets) are only protected while
    /// throttled.
    fn protection(
        &self,
        entry: Option<&CachedResponse>,
        objects: &[ObjectId],
        caller: TokenIdentity,
        revalidation_asked: bool,
        now: Instant,
    ) -> Protection {
        let verdict = self.limits.verdict(objects, Some(caller));
        let settings = self.limits.settings();
        if verdict.throttled.is_none() && verdict.usage == 0.0 {
            return Protection::Forward;
        }
        let avoided = &self.metrics.usage.avoided;
        let Some(entry) = entry.filter(|e| e.freshness(now) != Freshness::Expired) else {
            return match verdict.throttled {
                Some((remaining, code)) if settings.answer_locally => {
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
        let (reason, counter) = if verdict.throttled.is_some() {
            (HitReason::Throttled, &avoided.throttled)
        } else if volatile {
            return Protection::Forward;
        } else if verdict.usage >= settings.pressure_threshold {
            (HitReason::QuotaPressure, &avoided.pressure)
        } else if !revalidation_asked && entry.age(now) < stretched {
            (HitReason::QuotaTtl, &avoided.pressure)
        } else {
            return Protection::Forward;
        };
        counter.inc();
        Protection::Serve(reason)
    }
}

/// What throttle protection decides for a read.
enum Protection {
    /// Go upstream as usual.
    Forward,
    /// Serve the stored entry, for this reason.
    Serve(HitReason),
    /// Answer locally with Graph's throttling envelope.
    Refuse(ProxyError),
}
