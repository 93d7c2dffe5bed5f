//! Small pure header functions used along the request path.

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;

/// RFC 9211's `Cache-Status`, as a name (a `&str` key is parsed and
/// validated on every insert).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy ones, never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
];

/// Per-call headers Graph sends that describe one upstream call, not the data:
/// serving them again from cache would mislead client throttling logic and bug
/// reports, so stored entries drop them.
const PER_CALL: [&str; 9] = [
    "x-app-usage",
    "x-ad-account-usage",
    "x-business-use-case-usage",
    "x-fb-ads-insights-throttle",
    "x-page-usage",
    "x-fb-debug",
    "x-fb-trace-id",
    "x-fb-request-id",
    "x-fb-rev",
];

/// Removes `Connection`, every header it names, and the fixed hop-by-hop list.
/// One pass over the names present, removing only those found: it runs on
/// every upstream exchange, and a `remove` per listed name hashes each one.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = {
        let hop = hop_by_hop_in(headers);
        headers.keys().filter(|name| hop(name)).cloned().collect()
    };
    for name in doomed {
        headers.remove(name);
    }
}

/// The test for a header `strip_hop_by_hop` removes from `headers`: the
/// fixed list, `Proxy-Connection`, and what their `Connection` names. It
/// reads their `Connection` once, for many names (and allocates only when
/// there is one).
pub fn hop_by_hop_in(headers: &HeaderMap) -> impl Fn(&HeaderName) -> bool + '_ {
    let named: Vec<&str> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // `HeaderName == str` ignores case, as `Connection`'s tokens do.
    move |name| {
        HOP_BY_HOP.contains(name) || name == "proxy-connection" || named.iter().any(|n| name == *n)
    }
}

/// True for a per-call header (usage, debug ids), which stored entries drop.
pub fn is_per_call(name: &HeaderName) -> bool {
    PER_CALL.iter().any(|p| name == *p)
}

/// Directives of a request's `Cache-Control` that change what graphcache does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClientCacheControl {
    /// `no-store`: bypass the cache entirely.
    pub no_store: bool,
    /// `no-cache` (or `max-age=0`): revalidate even a fresh entry.
    pub no_cache: bool,
}

/// Reads the client's `Cache-Control` and `Pragma: no-cache`.
pub fn client_cache_control(headers: &HeaderMap) -> ClientCacheControl {
    let mut cc = ClientCacheControl::default();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            if directive.eq_ignore_ascii_case("no-store") {
                cc.no_store = true;
            } else if directive.eq_ignore_ascii_case("no-cache")
                || directive.eq_ignore_ascii_case("max-age=0")
            {
                cc.no_cache = true;
            }
        }
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        cc.no_cache |= headers
            .get(header::PRAGMA)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
    }
    cc
}

/// True when an `If-None-Match` header value matches `etag` under the weak
/// comparison RFC 9110 §13.1.2 prescribes (a `W/` prefix is ignored).
pub fn if_none_match_matches(if_none_match: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = opaque_tag(etag.as_bytes());
    if_none_match
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .flat_map(|v| split_tags(v.as_bytes()))
        .any(|tag| tag == b"*" || opaque_tag(tag) == ours)
}

/// Splits a list of entity tags on commas outside quotes.
fn split_tags(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = list;
    std::iter::from_fn(move || {
        let mut in_quotes = false;
        let start = rest
            .iter()
            .position(|b| !b.is_ascii_whitespace() && *b != b',')?;
        rest = &rest[start..];
        let end = rest
            .iter()
            .position(|&b| {
                if b == b'"' {
                    in_quotes = !in_quotes;
                }
                b == b',' && !in_quotes
            })
            .unwrap_or(rest.len());
        let tag = rest[..end].trim_ascii();
        rest = &rest[end..];
        Some(tag)
    })
}

fn opaque_tag(tag: &[u8]) -> &[u8] {
    let tag = tag.trim_ascii();
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// Sum of header name and value lengths, as a limit on request head size.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// True when a `Content-Encoding` other than identity is present.
pub fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// True when the client listed `gzip` with a non-zero q-value.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !q_zero
        })
}

/// Ages with a value built once, so a hit's `Age` header costs no allocation.
const SHARED_AGES: u64 = 3600;

/// True when a `Content-Type` value names `media_type` (any parameters,
/// any case).
pub fn is_media_type(content_type: Option<&HeaderValue>, media_type: &str) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(media_type))
}

/// An `Age` header value (whole seconds).
pub fn age_value(seconds: u64) -> HeaderValue {
    static AGES: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    if seconds < SHARED_AGES {
        let ages = AGES.get_or_init(|| (0..SHARED_AGES).map(format_age).collect());
        return ages[seconds as usize].clone();
    }
    format_age(seconds)
}

fn format_age(seconds: u64) -> HeaderValue {
    let mut buf = itoa_buf(seconds);
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(buf.as_bytes_mut()))
        .expect("digits are a valid header value")
}

/// Formats an integer without going through `format!`.
fn itoa_buf(mut n: u64) -> DigitBuf {
    let mut buf = DigitBuf {
        bytes: [0; 20],
        start: 20,
    };
    loop {
        buf.start -= 1;
        buf.bytes[buf.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf
}

struct DigitBuf {
    bytes: [u8; 20],
    start: usize,
}

impl DigitBuf {
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..]
    }
}

/// A header map of `pairs`, in order, repeated names appended (tests).
#[cfg(test)]
pub(crate) fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::header_map as map;
    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret ,"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-keep", "yes"),
        ]);
        // The predicate and the strip agree, header by header.
        let names: Vec<HeaderName> = h.keys().cloned().collect();
        let hop: Vec<&str> = names
            .iter()
            .filter(|n| hop_by_hop_in(&h)(n))
            .map(HeaderName::as_str)
            .collect();
        assert_eq!(
            hop,
            [
                "connection",
                "x-secret",
                "keep-alive",
                "transfer-encoding",
                "proxy-connection",
                "te"
            ]
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-keep"], "yes");
        assert!(
            !hop_by_hop_in(&h)(&HeaderName::from_static("x-secret")),
            "named by no Connection"
        );
    }

    #[test]
    fn per_call_headers_are_removed_and_data_headers_kept() {
        let h = map(&[
            ("x-app-usage", "{}"),
            ("x-fb-debug", "abc"),
            ("etag", "\"a\""),
            ("content-type", "application/json"),
        ]);
        let per_call: Vec<bool> = h.keys().map(is_per_call).collect();
        assert_eq!(per_call, [true, true, false, false]);
        let kept: Vec<&str> = h
            .keys()
            .filter(|n| !is_per_call(n))
            .map(HeaderName::as_str)
            .collect();
        assert_eq!(kept.len(), 2);
        assert!(kept.contains(&"etag"));
    }

    #[test]
    fn client_cache_control_directives() {
        assert_eq!(
            client_cache_control(&map(&[("cache-control", "No-Store")])),
            ClientCacheControl {
                no_store: true,
                no_cache: false
            }
        );
        assert!(client_cache_control(&map(&[("cache-control", "max-age=0")])).no_cache);
        assert!(client_cache_control(&map(&[("pragma", "no-cache")])).no_cache);
        assert!(!client_cache_control(&map(&[("cache-control", "max-stale")])).no_cache);
    }

    #[test]
    fn if_none_match_weak_comparison_lists_and_star() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(if_none_match_matches(
            &map(&[("if-none-match", "\"abc\"")]),
            &etag
        ));
        assert!(if_none_match_matches(
            &map(&[("if-none-match", "W/\"abc\"")]),
            &etag
        ));
        assert!(if_none_match_matches(
            &map(&[("if-none-match", "\"x\", \"abc\"")]),
            &etag
        ));
        assert!(if_none_match_matches(
            &map(&[("if-none-match", "*")]),
            &etag
        ));
        assert!(!if_none_match_matches(
            &map(&[("if-none-match", "\"ab\"")]),
            &etag
        ));
        assert!(!if_none_match_matches(
            &map(&[("if-none-match", "abc")]),
            &etag
        ));
        assert!(!if_none_match_matches(&HeaderMap::new(), &etag));
        // A comma inside quotes is part of the tag.
        let odd = HeaderValue::from_static("\"a,b\"");
        assert!(if_none_match_matches(
            &map(&[("if-none-match", "\"a,b\"")]),
            &odd
        ));
    }

    #[test]
    fn gzip_acceptance() {
        assert!(accepts_gzip(&map(&[("accept-encoding", "gzip, deflate")])));
        assert!(accepts_gzip(&map(&[(
            "accept-encoding",
            "br;q=1, GZIP;q=0.5"
        )])));
        assert!(!accepts_gzip(&map(&[("accept-encoding", "gzip;q=0")])));
        assert!(!accepts_gzip(&map(&[("accept-encoding", "identity")])));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn encoded_bodies_are_detected() {
        assert!(is_encoded(&map(&[("content-encoding", "gzip")])));
        assert!(!is_encoded(&map(&[("content-encoding", "identity")])));
        assert!(!is_encoded(&HeaderMap::new()));
    }

    #[test]
    fn media_types() {
        let json = HeaderValue::from_static("Application/JSON; charset=utf-8");
        assert!(is_media_type(Some(&json), "application/json"));
        assert!(!is_media_type(
            Some(&json),
            "application/x-www-form-urlencoded"
        ));
        let jsonp = HeaderValue::from_static("application/jsonp");
        assert!(!is_media_type(Some(&jsonp), "application/json"));
        assert!(!is_media_type(None, "application/json"));
    }

    #[test]
    fn age_values() {
        assert_eq!(age_value(0), "0");
        assert_eq!(age_value(1234), "1234");
        assert_eq!(age_value(3599), "3599");
        assert_eq!(age_value(3600), "3600");
        assert_eq!(age_value(u64::MAX), "18446744073709551615");
    }
}
