//! A stored answer and the pure rules about it: freshness, `Vary`, and what a
//! 304 changes (RFC 9111 §4.1, §4.3.4).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use crate::graph::routes::{CachePolicy, ObjectId};
use crate::headers::{strip_hop_by_hop, strip_per_call};

/// Most objects one entry may depend on. A read naming more (an `ids=`
/// list, or junk `*_ids` parameters Graph ignores) is relayed, not stored:
/// always correct, and the index never grows with attacker-chosen lists.
pub const MAX_ENTRY_OBJECTS: usize = 100;

/// What an entry costs beyond its bytes, measured with `bench/memory.sh`
/// (RSS per entry, 2 KB answers): the entry, its `Arc`, moka's node, key
/// and deques, allocator slack.
const ENTRY_OVERHEAD: usize = 768;

/// Bytes a stored header costs beyond its name and value: its `HeaderMap`
/// bucket and index slot, and the value's own allocation.
const HEADER_OVERHEAD: usize = 128;

/// Bytes an object costs beyond its id: the list slot, and its record and
/// key slot in the object index.
const OBJECT_OVERHEAD: usize = 96;

/// The request header values an entry's `Vary` names, as the request that
/// filled it had them (None: absent).
pub type VaryValues = Box<[(HeaderName, Option<HeaderValue>)]>;

/// A stored 200 answer.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// End-to-end headers as Graph sent them, less hop-by-hop, per-call and
    /// length headers.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Graph's strong, quoted ETag, if it sent one.
    pub etag: Option<HeaderValue>,
    /// When the entry was stored or last validated upstream.
    pub stored_at: Instant,
    pub policy: CachePolicy,
    /// The objects whose writes invalidate this entry: those the request
    /// named and those its answer shows (listing members, nested objects).
    pub objects: Arc<[ObjectId]>,
    /// The answer shows more objects than an entry may be indexed under, so
    /// a write to one of them would not find it: it is always revalidated.
    pub members_unindexed: bool,
    /// False when its body is known to hold no paging link to rewrite, so a
    /// hit skips the scan (true: unknown, or it has some).
    pub paging_links: bool,
    /// What its `Vary` names, when it names anything graphcache honours.
    pub vary: Option<VaryValues>,
    /// In a fleet: the fleet's write sequence when the read that filled it
    /// started (None: Redis did not answer then, or no fleet). A write mark
    /// above it on one of `objects` means the entry is pre-write data.
    pub fleet_stamp: Option<crate::fleet::Stamp>,
    /// Distinguishes successive entries under one key in the index.
    pub(super) entry_id: u64,
}

/// How an entry may be used at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its fresh TTL: serve without asking upstream.
    Fresh,
    /// Past its fresh TTL but within max stale: revalidate; may be served if
    /// upstream fails.
    Stale,
    /// Past both: revalidate; never served on failure.
    Expired,
}

impl CachedResponse {
    pub fn new(
        headers: HeaderMap,
        body: Bytes,
        etag: Option<HeaderValue>,
        policy: CachePolicy,
        objects: Arc<[ObjectId]>,
    ) -> Self {
        Self {
            headers,
            body,
            etag,
            stored_at: Instant::now(),
            policy,
            objects,
            members_unindexed: false,
            paging_links: true,
            vary: None,
            fleet_stamp: None,
            entry_id: 0,
        }
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        classify(self.age(now), &self.policy)
    }

    /// True when `request` may be served this entry: it has the values the
    /// entry's `Vary` names. No `Vary`, no cost.
    pub fn matches_vary(&self, request: &HeaderMap) -> bool {
        match &self.vary {
            None => true,
            Some(values) => vary_matches(values, request),
        }
    }

    /// The same entry, validated now by a 304 whose headers are `updated`:
    /// its end-to-end headers replace the stored ones (RFC 9111 §4.3.4),
    /// except per-call usage headers (never stored) and hop-by-hop and
    /// length headers. A 304 without an ETag keeps the stored one.
    pub fn revalidated(&self, updated: &HeaderMap) -> Self {
        let mut headers = self.headers.clone();
        let mut fresh = updated.clone();
        strip_hop_by_hop(&mut fresh);
        strip_per_call(&mut fresh);
        // Never stored from a 200 either.
        fresh.remove(header::SET_COOKIE);
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
            header::CONTENT_RANGE,
        ] {
            fresh.remove(name);
        }
        let mut last: Option<HeaderName> = None;
        for (name, value) in fresh {
            // An owned copy: a 304's values are slices of the upstream
            // connection's read buffer, which the entry would pin whole.
            let value = owned_value(&value);
            // `into_iter` names a header once, then yields its other values.
            match name {
                Some(name) => {
                    headers.insert(name.clone(), value);
                    last = Some(name);
                }
                None => {
                    if let Some(name) = &last {
                        headers.append(name.clone(), value);
                    }
                }
            }
        }
        let etag = headers
            .get(header::ETAG)
            .cloned()
            .or_else(|| self.etag.clone());
        Self {
            headers,
            body: self.body.clone(),
            etag,
            stored_at: Instant::now(),
            policy: self.policy,
            objects: self.objects.clone(),
            members_unindexed: self.members_unindexed,
            paging_links: self.paging_links,
            vary: self.vary.clone(),
            fleet_stamp: None,
            entry_id: 0,
        }
    }

    /// What the entry costs the cache's bound: body, headers, and its
    /// objects (the entry's own list and its records in the object index).
    pub(super) fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD)
            .sum();
        let objects: usize = self
            .objects
            .iter()
            .map(|o| o.as_str().len() + OBJECT_OVERHEAD)
            .sum();
        u32::try_from(self.body.len() + headers + objects + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
    }
}

/// Pure freshness rule, separate so it can be tested without clocks.
pub fn classify(age: Duration, policy: &CachePolicy) -> Freshness {
    if age < policy.fresh_ttl {
        Freshness::Fresh
    } else if age < policy.max_stale {
        Freshness::Stale
    } else {
        Freshness::Expired
    }
}

/// What an answer's `Vary` asks of the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Vary {
    /// Nothing graphcache must honour: serve to every request of the key.
    None,
    /// Serve only to requests with the same values of these headers.
    Headers(Vec<HeaderName>),
    /// `Vary: *`: never serve from the cache.
    Any,
}

/// Reads an answer's `Vary`. `Accept-Encoding` is left out: graphcache
/// always asks upstream for identity, so the answer cannot vary on it.
pub fn vary_of(headers: &HeaderMap) -> Vary {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            return Vary::Any;
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Vary::Any;
            }
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                return Vary::Any;
            };
            if name != header::ACCEPT_ENCODING && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if names.is_empty() {
        Vary::None
    } else {
        Vary::Headers(names)
    }
}

/// The values `names` have in `request`, to store with an entry (owned:
/// the request's are slices of the client connection's read buffer).
pub fn vary_values(names: &[HeaderName], request: &HeaderMap) -> VaryValues {
    names
        .iter()
        .map(|name| (name.clone(), request.get(name).map(owned_value)))
        .collect()
}

/// A copy of `headers` whose values own their bytes: values parsed by hyper
/// are slices of the connection's read buffer, which a stored entry would
/// otherwise keep alive whole (memory beyond `cache_max_bytes`).
pub fn owned_headers(headers: &HeaderMap) -> HeaderMap {
    let mut owned = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        owned.append(name.clone(), owned_value(value));
    }
    owned
}

/// `value` in a buffer of its own.
pub fn owned_value(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes())
        .expect("a header value's bytes are a valid header value");
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// True when `request` has exactly the recorded values.
pub fn vary_matches(values: &[(HeaderName, Option<HeaderValue>)], request: &HeaderMap) -> bool {
    values
        .iter()
        .all(|(name, value)| request.get(name) == value.as_ref())
}

#[cfg(test)]
mod tests {
    #[test]
    fn revalidated_and_vary_values_own_their_bytes() {
        use bytes::Bytes;
        // A stand-in for a connection read buffer, with a header value in it.
        let buffer = Bytes::from(b"HTTP/1.1 304\r\netag: \"v2\"\r\nfoo: bar\r\n".to_vec());
        let at = |needle: &[u8]| {
            let start = buffer
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap();
            buffer.slice(start..start + needle.len())
        };
        let etag = HeaderValue::from_maybe_shared(at(b"\"v2\"")).unwrap();
        let foo = HeaderValue::from_maybe_shared(at(b"bar")).unwrap();
        let inside = |v: &HeaderValue| {
            let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
            range.contains(&(v.as_bytes().as_ptr() as usize))
        };
        assert!(
            inside(&etag) && inside(&foo),
            "the stand-in slices the buffer"
        );
        let mut updated = HeaderMap::new();
        updated.insert(header::ETAG, etag);
        let entry = super::CachedResponse::new(
            HeaderMap::new(),
            Bytes::from_static(b"{}"),
            None,
            crate::graph::routes::CachePolicy {
                fresh_ttl: Duration::ZERO,
                max_stale: Duration::from_secs(60),
                cache: true,
                always_revalidate: false,
            },
            std::sync::Arc::from(Vec::new()),
        );
        let refreshed = entry.revalidated(&updated);
        assert_eq!(refreshed.headers[header::ETAG], "\"v2\"");
        assert!(!inside(&refreshed.headers[header::ETAG]));
        assert!(!inside(refreshed.etag.as_ref().unwrap()));
        let mut request = HeaderMap::new();
        request.insert("foo", foo);
        let values = super::vary_values(&[HeaderName::from_static("foo")], &request);
        assert_eq!(values[0].1.as_ref().unwrap(), "bar");
        assert!(!inside(values[0].1.as_ref().unwrap()));
    }

    use super::*;

    use crate::graph::routes::CachePolicy;
    use crate::headers::header_map as map;

    fn policy(fresh: u64, stale: u64) -> CachePolicy {
        CachePolicy::ttls(fresh, stale)
    }
    #[test]
    fn freshness_boundaries() {
        let p = policy(10, 20);
        assert_eq!(classify(Duration::from_secs(9), &p), Freshness::Fresh);
        assert_eq!(classify(Duration::from_secs(10), &p), Freshness::Stale);
        assert_eq!(classify(Duration::from_secs(20), &p), Freshness::Expired);
        assert_eq!(classify(Duration::ZERO, &policy(0, 0)), Freshness::Expired);
    }

    #[test]
    fn vary_names_star_and_accept_encoding() {
        assert_eq!(vary_of(&HeaderMap::new()), Vary::None);
        assert_eq!(vary_of(&map(&[("vary", "Accept-Encoding")])), Vary::None);
        assert_eq!(
            vary_of(&map(&[
                ("vary", "Origin, accept-encoding"),
                ("vary", "Foo")
            ])),
            Vary::Headers(vec![
                HeaderName::from_static("origin"),
                HeaderName::from_static("foo")
            ])
        );
        assert_eq!(vary_of(&map(&[("vary", "Foo, *")])), Vary::Any);
        let values = vary_values(&[HeaderName::from_static("foo")], &map(&[("foo", "1")]));
        assert!(vary_matches(&values, &map(&[("foo", "1")])));
        assert!(!vary_matches(&values, &map(&[("foo", "2")])));
        assert!(!vary_matches(&values, &HeaderMap::new()));
    }

    #[test]
    fn a_304_replaces_end_to_end_headers_but_not_usage_or_length() {
        let mut entry = CachedResponse::new(
            map(&[
                ("date", "old"),
                ("etag", "\"a\""),
                ("x-kept", "1"),
                ("vary", "Origin"),
            ]),
            Bytes::from_static(b"{}"),
            Some(HeaderValue::from_static("\"a\"")),
            policy(0, 60),
            Arc::from(Vec::new()),
        );
        entry.stored_at -= Duration::from_secs(5);
        let updated = entry.revalidated(&map(&[
            ("date", "new"),
            ("x-app-usage", "{}"),
            ("content-length", "0"),
            ("connection", "close"),
            ("set-x", "a"),
            ("set-x", "b"),
            ("set-cookie", "datr=1"),
        ]));
        assert!(!updated.headers.contains_key("set-cookie"));
        assert_eq!(updated.headers["date"], "new");
        assert_eq!(updated.headers["x-kept"], "1");
        assert!(!updated.headers.contains_key("x-app-usage"));
        assert!(!updated.headers.contains_key("content-length"));
        assert_eq!(updated.headers.get_all("set-x").iter().count(), 2);
        assert_eq!(updated.etag.as_ref().unwrap(), "\"a\"");
        assert!(updated.age(Instant::now()) < Duration::from_secs(1));
        let retagged = entry.revalidated(&map(&[("etag", "\"b\"")]));
        assert_eq!(retagged.etag.as_ref().unwrap(), "\"b\"");
    }
}
