//! What an upstream answer to a cacheable read does to the cache, the same
//! for a single GET and a client batch item.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

use crate::cache::entry::{
    vary_of_values, vary_values, StoredHeaders, Vary, VaryValues, MAX_ENTRY_OBJECTS,
};
use crate::cache::{CacheKey, CachedResponse, Freshness, OwnedSecrets, ReadTicket, Store};
use crate::graph::jobs::{job_read, job_state, JobRead};
use crate::graph::members::members_of;
use crate::graph::query::QueryParams;
use crate::graph::routes::{CachePolicy, ObjectId};
use crate::headers::{is_encoded, is_per_call};
use crate::proxy::respond::Detail;
use crate::proxy::Proxy;
use crate::upstream::Answer;

/// A cacheable read on its way upstream: where its answer goes in the cache.
pub(crate) struct Cacheable {
    pub key: CacheKey,
    pub policy: CachePolicy,
    pub objects: Arc<[ObjectId]>,
    pub ticket: ReadTicket,
    pub entry: Option<Arc<CachedResponse>>,
    /// The stored ETag went upstream as `If-None-Match`.
    pub validated: bool,
    /// The request headers the answer's `Vary` is judged against.
    pub vary_basis: HeaderMap,
    /// The node, when this reads a bare node that may be an async job's
    /// status: its answer says whether the job finished.
    pub status_of: Option<ObjectId>,
    /// The caller's credentials, for an entry another replica fills.
    pub secrets: OwnedSecrets,
}

/// The node of a read that could be an async job's status (`GET /<id>`).
/// A read that renames fields (`fields=x.as(is_completed)`) could dress any
/// object as a finished job, so it teaches nothing.
pub(crate) fn job_status_of(path: &str, query: &QueryParams<'_>) -> Option<ObjectId> {
    if query.get("fields").is_some_and(|f| f.contains(".as(")) {
        return None;
    }
    match job_read(path) {
        Some((node, JobRead::Status)) => ObjectId::parse(node),
        _ => None,
    }
}

impl Cacheable {
    /// The stored entry, if it is young enough to serve when upstream fails.
    pub(crate) fn usable_stale(&self) -> Option<Arc<CachedResponse>> {
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
        detail: Option<Detail>,
        /// Which requests may share the answer, by its `Vary`.
        vary: VaryCheck,
    },
}

/// Which requests an answer fetched for one request may serve.
#[derive(Debug, Clone)]
pub(crate) enum VaryCheck {
    /// Any request of the key.
    Any,
    /// Requests with these values of the headers the answer varies on.
    Values(VaryValues),
    /// `Vary: *`: only the request it was fetched for.
    Nobody,
}

impl VaryCheck {
    fn of<'a>(vary: impl IntoIterator<Item = &'a HeaderValue>, basis: &HeaderMap) -> Self {
        match vary_of_values(vary) {
            Vary::None => Self::Any,
            Vary::Headers(names) => Self::Values(vary_values(&names, basis)),
            Vary::Any => Self::Nobody,
        }
    }

    /// True when the answer may serve a request with `headers`.
    pub(crate) fn admits(&self, headers: &HeaderMap) -> bool {
        match self {
            Self::Any => true,
            Self::Values(values) => crate::cache::entry::vary_matches(values, headers),
            Self::Nobody => false,
        }
    }
}

impl Proxy {
    /// Settles an upstream answer in the cache: a 304 to graphcache's own
    /// validator refreshes the entry (with the 304's headers); a 5xx or a
    /// throttling answer falls back to a young enough entry; any other 4xx
    /// drops the entry (the object is gone or no longer readable with this
    /// token); a storable 200 replaces it.
    pub(crate) async fn settle(&self, cacheable: &Cacheable, answer: &Answer) -> Settled {
        let status = answer.status;
        let mut policy = cacheable.policy;
        if let (StatusCode::OK, Some(id)) = (status, &cacheable.status_of) {
            if let Some(state) = job_state(&answer.body, id.as_str()) {
                self.jobs.learn(id.clone(), state);
                // The policy was chosen before this answer said where the
                // job stands: a running job's status is stored as a poll.
                let poll = self.config.load().async_poll_interval;
                policy = self.jobs.poll_policy(state, policy, poll);
            }
        }
        if status == StatusCode::NOT_MODIFIED && cacheable.validated {
            if let Some(entry) = &cacheable.entry {
                let mut refreshed = entry.revalidated(&answer.headers);
                // The route's policy now, which a reload may have changed.
                refreshed.policy = entry_policy(cacheable.policy, entry.members_unindexed);
                if answer.headers.contains_key(header::VARY) {
                    // A 304 that changes `Vary` changes whom the entry serves.
                    match VaryCheck::of(
                        refreshed.headers.get_all(&header::VARY),
                        &cacheable.vary_basis,
                    ) {
                        VaryCheck::Any => refreshed.vary = None,
                        VaryCheck::Values(values) => refreshed.vary = Some(values),
                        VaryCheck::Nobody => {
                            self.store.remove(&cacheable.key).await;
                            return Settled::Revalidated(Arc::new(refreshed));
                        }
                    }
                }
                let (shared, _) = self
                    .store
                    .refresh_for(
                        cacheable.key,
                        entry,
                        refreshed,
                        cacheable.ticket,
                        cacheable.secrets.borrow(),
                    )
                    .await;
                return Settled::Revalidated(shared);
            }
        }
        let throttled =
            status.is_client_error() && crate::graph::usage::throttle_error(&answer.body).is_some();
        if status.is_server_error() || throttled {
            if let Some(entry) = cacheable.usable_stale() {
                return Settled::Stale(entry);
            }
        }
        if status.is_client_error() && !throttled && cacheable.entry.is_some() {
            self.store.remove(&cacheable.key).await;
        }
        let vary = VaryCheck::of(answer.headers.get_all(header::VARY), &cacheable.vary_basis);
        match self.storable_entry(answer, cacheable, policy, &vary) {
            Ok(entry) => Settled::Relay {
                stored: self
                    .store
                    .put_for(
                        cacheable.key,
                        entry,
                        cacheable.ticket,
                        cacheable.secrets.borrow(),
                    )
                    .await,
                detail: None,
                vary,
            },
            Err(detail) => Settled::Relay {
                stored: false,
                detail,
                vary,
            },
        }
    }

    /// The entry to store for an upstream answer, or why it is not stored
    /// (with an RFC 9211 detail when that is worth telling the client).
    fn storable_entry(
        &self,
        answer: &Answer,
        cacheable: &Cacheable,
        policy: CachePolicy,
        vary: &VaryCheck,
    ) -> Result<CachedResponse, Option<Detail>> {
        if answer.status != StatusCode::OK
            || !storable_head(&answer.headers)
            || policy.retention().is_zero()
            || matches!(vary, VaryCheck::Nobody)
        {
            return Err(None);
        }
        if answer.body.len() > self.config.load().max_entry_bytes {
            return Err(Some(Detail::TooLarge));
        }
        if !storable_body(&answer.body) {
            return Err(None);
        }
        let headers = StoredHeaders::copied_from(
            answer
                .headers
                .iter()
                .filter(|(name, _)| !is_per_call(name) && *name != header::CONTENT_LENGTH),
        );
        let etag = headers.get(header::ETAG).cloned();
        let (objects, unindexed) = indexed_objects(&cacheable.objects, &answer.body);
        // An exact-size copy: the answer's bytes may be a slice of a much
        // larger connection read buffer, which a stored slice would pin for
        // the entry's whole life (memory beyond `cache_max_bytes`).
        let mut entry = CachedResponse::new(
            headers,
            Bytes::copy_from_slice(&answer.body),
            etag,
            entry_policy(policy, unindexed),
            objects,
        );
        entry.members_unindexed = unindexed;
        entry.paging_links = self.paging.has_links(&entry.body);
        if let VaryCheck::Values(values) = vary {
            entry.vary = Some(values.clone());
        }
        Ok(entry)
    }
}

/// The objects an entry is indexed under: those the request named, then
/// those its answer shows (so a write to a listed ad drops the listing).
/// When that is more than an entry may carry, only the request's, and the
/// second value says the members went unindexed.
fn indexed_objects(named: &Arc<[ObjectId]>, body: &[u8]) -> (Arc<[ObjectId]>, bool) {
    let Some(members) = members_of(body, MAX_ENTRY_OBJECTS) else {
        return (named.clone(), true);
    };
    let extra: Vec<ObjectId> = members.into_iter().filter(|m| !named.contains(m)).collect();
    if extra.is_empty() {
        return (named.clone(), false);
    }
    if named.len() + extra.len() > MAX_ENTRY_OBJECTS {
        return (named.clone(), true);
    }
    (named.iter().cloned().chain(extra).collect(), false)
}

/// The policy an entry is stored with: the route's, except that an entry
/// whose members could not all be indexed is never fresh (a write to one of
/// them would not find it, so every read asks Graph, which answers 304 when
/// nothing changed).
fn entry_policy(route: CachePolicy, members_unindexed: bool) -> CachePolicy {
    if members_unindexed {
        CachePolicy {
            fresh_ttl: std::time::Duration::ZERO,
            always_revalidate: true,
            ..route
        }
    } else {
        route
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn only_plain_node_reads_can_teach_a_job_state() {
        let q = |s: &'static str| QueryParams::parse(Some(s));
        let id = |path, query| job_status_of(path, &q(query)).map(|o| o.as_str().to_owned());
        assert_eq!(
            id("/v26.0/6001", "fields=is_completed"),
            Some("6001".to_owned())
        );
        assert_eq!(id("/v26.0/6001/", ""), Some("6001".to_owned()));
        assert_eq!(id("/v26.0/6001/requests", ""), None);
        assert_eq!(id("/v26.0/act_1", ""), None);
        assert_eq!(
            id("/v26.0/555", "fields=is_archived.as(is_completed)"),
            None
        );
        assert_eq!(id("/v26.0/555", "fields=name.as%28async_status%29"), None);
    }

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
    fn vary_checks_admit_matching_requests_only() {
        let mut answer = HeaderMap::new();
        answer.insert("vary", HeaderValue::from_static("Foo"));
        let mut one = HeaderMap::new();
        one.insert("foo", HeaderValue::from_static("1"));
        let check = VaryCheck::of(answer.get_all(header::VARY), &one);
        assert!(check.admits(&one));
        assert!(!check.admits(&HeaderMap::new()));
        answer.insert("vary", HeaderValue::from_static("*"));
        assert!(!VaryCheck::of(answer.get_all(header::VARY), &one).admits(&one));
        assert!(
            VaryCheck::of(HeaderMap::new().get_all(header::VARY), &one).admits(&HeaderMap::new())
        );
    }
}
