//! Helpers the unit tests of several stages share.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::graph::routes::CachePolicy;

/// A header map of `pairs`, in order, repeated names appended.
pub(crate) fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// A cacheable policy with these TTLs in seconds.
pub(crate) fn policy(fresh: u64, stale: u64) -> CachePolicy {
    CachePolicy {
        fresh_ttl: Duration::from_secs(fresh),
        max_stale: Duration::from_secs(stale),
        cache: true,
        always_revalidate: false,
    }
}
