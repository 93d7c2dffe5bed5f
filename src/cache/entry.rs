//! A stored answer and the pure rules about it: freshness, `Vary`, and what a
//! 304 changes (RFC 9111 §4.1, §4.3.4).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use crate::graph::routes::{CachePolicy, ObjectId};
use crate::headers::{hop_by_hop_in, is_per_call};

/// Most objects one entry may depend on. A read naming more (an `ids=`
/// list, or junk `*_ids` parameters Graph ignores) is relayed, not stored:
/// always correct, and the index never grows with attacker-chosen lists.
pub const MAX_ENTRY_OBJECTS: usize = 100;

/// What an entry costs beyond its bytes, measured with `bench/memory.sh`
/// (RSS per entry, 100,000 distinct 2 KB answers): the entry, its `Arc`,
/// its slot in the store (about 48 bytes), moka's node, key and deques, the
/// `Vary` values, allocator slack.
const ENTRY_OVERHEAD: usize = 950;

/// Bytes a stored header costs beyond its name and value: its slot in
/// [`StoredHeaders`] and the value's own allocation.
const HEADER_OVERHEAD: usize = 96;

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
    pub headers: StoredHeaders,
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

/// An entry's headers, compact: exactly the headers kept, each value in a
/// buffer of its own. A `HeaderMap` keeps room to grow (twelve buckets of
/// about 100 bytes for Graph's eight stored headers): with it, 100,000
/// entries of 2 KB cost 0.9 KB more RSS each (`bench/memory.sh`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredHeaders(Box<[(HeaderName, HeaderValue)]>);

impl StoredHeaders {
    /// A copy of `headers` that owns its bytes (hyper's values are slices of
    /// the connection's read buffer, which an entry would keep alive whole).
    #[cfg(test)]
    pub fn copied(headers: &HeaderMap) -> Self {
        Self::copied_from(headers.iter())
    }

    /// A copy of these headers, in order, each value copied.
    pub fn copied_from<'a>(
        headers: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    ) -> Self {
        Self(headers.map(|(n, v)| (n.clone(), owned_value(v))).collect())
    }

    /// Headers whose values already own their bytes (decoded from Redis).
    pub(super) fn owned(list: Vec<(HeaderName, HeaderValue)>) -> Self {
        Self(list.into_boxed_slice())
    }

    /// The first value of `name`.
    pub fn get<N>(&self, name: N) -> Option<&HeaderValue>
    where
        HeaderName: PartialEq<N>,
    {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every value of `name`, in order.
    pub fn get_all<N>(&self, name: N) -> impl Iterator<Item = &HeaderValue>
    where
        HeaderName: PartialEq<N>,
    {
        self.0
            .iter()
            .filter(move |(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    #[cfg(test)]
    pub fn contains_key<N>(&self, name: N) -> bool
    where
        HeaderName: PartialEq<N>,
    {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&HeaderName, &HeaderValue)> + Clone {
        self.0.iter().map(|(n, v)| (n, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &HeaderValue> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// A `HeaderMap` of the same headers (sharing their bytes).
    #[cfg(test)]
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.0.len());
        for (name, value) in self.iter() {
            map.append(name.clone(), value.clone());
        }
        map
    }
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
        headers: StoredHeaders,
        body: Bytes,
        etag: Option<HeaderValue>,
        policy: CachePolicy,
        objects: Arc<[ObjectId]>,
    ) -> Self {
        // The stored copy's value where it is the same, so the ETag does not
        // pin a connection buffer either.
        let etag = etag.map(|tag| match headers.get(header::ETAG) {
            Some(stored) if *stored == tag => stored.clone(),
            _ => owned_value(&tag),
        });
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
        let hop_by_hop = hop_by_hop_in(updated);
        let replaces = |name: &HeaderName| {
            !hop_by_hop(name)
                && !is_per_call(name)
                // Never stored from a 200 either.
                && name != header::SET_COOKIE
                && name != header::CONTENT_LENGTH
                && name != header::CONTENT_ENCODING
                && name != header::CONTENT_RANGE
        };
        // One pass each (this runs on every revalidation): the stored
        // headers the 304 does not replace, then the 304's, copied so that
        // the entry does not keep the upstream connection's read buffer (a
        // value the entry already holds is shared instead: most of a 304's
        // headers repeat the 200's).
        let mut list = Vec::with_capacity(self.headers.len() + 2);
        for (name, value) in self.headers.iter() {
            if !(updated.contains_key(name) && replaces(name)) {
                list.push((name.clone(), value.clone()));
            }
        }
        for (name, value) in updated {
            if replaces(name) {
                let held = self
                    .headers
                    .iter()
                    .find(|(n, v)| *n == name && v.as_bytes() == value.as_bytes());
                let value = match held {
                    Some((_, held)) => held.clone(),
                    None => owned_value(value),
                };
                list.push((name.clone(), value));
            }
        }
        let headers = StoredHeaders(list.into_boxed_slice());
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
pub fn vary_of_values<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Vary {
    let mut names = Vec::new();
    for value in values {
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
    fn stored_headers_keep_order_and_copy_their_values() {
        let buffer = Bytes::from_static(b"etag: \"a\"\r\nset-x: 1\r\nset-x: 2\r\nx-s: k");
        let slice = |from: usize, len: usize| {
            HeaderValue::from_maybe_shared(buffer.slice(from..from + len)).unwrap()
        };
        let mut map = HeaderMap::new();
        map.insert(header::ETAG, slice(6, 3));
        map.append("set-x", slice(18, 1));
        map.append("set-x", slice(28, 1));
        let mut secret = slice(36, 1);
        secret.set_sensitive(true);
        map.insert("x-s", secret);
        let stored = StoredHeaders::copied(&map);
        assert_eq!(stored.len(), 4);
        assert_eq!(stored.get(header::ETAG).unwrap(), "\"a\"");
        assert_eq!(
            stored.get("ETag").unwrap(),
            "\"a\"",
            "names compare as names"
        );
        assert_eq!(stored.get_all("set-x").collect::<Vec<_>>(), ["1", "2"]);
        assert!(stored.get("x-s").unwrap().is_sensitive());
        assert!(stored.get("absent").is_none());
        let source = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        for value in stored.values() {
            let at = value.as_bytes().as_ptr() as usize;
            assert!(!source.contains(&at), "copied out of the source buffer");
        }
        assert_eq!(stored.to_map(), map);
    }

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
            StoredHeaders::default(),
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
        assert_eq!(refreshed.headers.get(header::ETAG).unwrap(), "\"v2\"");
        assert!(!inside(refreshed.headers.get(header::ETAG).unwrap()));
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
        assert_eq!(
            vary_of_values(HeaderMap::new().get_all(header::VARY)),
            Vary::None
        );
        assert_eq!(
            vary_of_values(map(&[("vary", "Accept-Encoding")]).get_all(header::VARY)),
            Vary::None
        );
        assert_eq!(
            vary_of_values(
                map(&[("vary", "Origin, accept-encoding"), ("vary", "Foo")]).get_all(header::VARY)
            ),
            Vary::Headers(vec![
                HeaderName::from_static("origin"),
                HeaderName::from_static("foo")
            ])
        );
        assert_eq!(
            vary_of_values(map(&[("vary", "Foo, *")]).get_all(header::VARY)),
            Vary::Any
        );
        let values = vary_values(&[HeaderName::from_static("foo")], &map(&[("foo", "1")]));
        assert!(vary_matches(&values, &map(&[("foo", "1")])));
        assert!(!vary_matches(&values, &map(&[("foo", "2")])));
        assert!(!vary_matches(&values, &HeaderMap::new()));
    }

    #[test]
    fn a_304_replaces_end_to_end_headers_but_not_usage_or_length() {
        let mut entry = CachedResponse::new(
            StoredHeaders::copied(&map(&[
                ("date", "old"),
                ("etag", "\"a\""),
                ("x-kept", "1"),
                ("vary", "Origin"),
            ])),
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
        assert_eq!(updated.headers.get("date").unwrap(), "new");
        assert_eq!(updated.headers.get("x-kept").unwrap(), "1");
        assert!(!updated.headers.contains_key("x-app-usage"));
        assert!(!updated.headers.contains_key("content-length"));
        assert_eq!(updated.headers.get_all("set-x").count(), 2);
        assert_eq!(updated.etag.as_ref().unwrap(), "\"a\"");
        assert!(updated.age(Instant::now()) < Duration::from_secs(1));
        let retagged = entry.revalidated(&map(&[("etag", "\"b\"")]));
        assert_eq!(retagged.etag.as_ref().unwrap(), "\"b\"");
    }
}
