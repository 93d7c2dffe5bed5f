//! Every response graphcache builds, and the RFC 9211 `Cache-Status` it
//! carries, typed so the outcome never travels as a string.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use crate::body::ResponseBody;
use crate::cache::CachedResponse;
use crate::error::ProxyError;
use crate::headers::{
    accepts_gzip, age_value, if_none_match_matches, is_encoded, strip_hop_by_hop, CACHE_STATUS,
};
use crate::metrics::Outcome;
use crate::upstream::Answer;

impl HitReason {
    /// The metrics outcome of an entry served for this reason.
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Self::Fresh => Outcome::Hit,
            Self::Throttled => Outcome::Throttled,
            Self::QuotaPressure | Self::QuotaTtl => Outcome::Pressure,
        }
    }

    pub(crate) fn status(self) -> CacheStatus {
        CacheStatus::Hit(self)
    }
}

/// Why a request went upstream: RFC 9211's `fwd` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fwd {
    /// No entry under the key.
    UriMiss,
    /// An entry, but for other values of the headers its `Vary` names.
    VaryMiss,
    /// The entry is past its fresh TTL.
    Stale,
    /// The client asked to revalidate (`no-cache`).
    Request,
    /// The method (or a write in the batch) is not cacheable.
    Method,
    /// The request must not touch the cache.
    Bypass,
    /// A client batch of which only some items went upstream.
    Partial,
}

impl Fwd {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Stale => "stale",
            Self::Request => "request",
            Self::Method => "method",
            Self::Bypass => "bypass",
            Self::Partial => "partial",
        }
    }
}

/// Why a stored entry was served without a fresh upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HitReason {
    /// Within its fresh TTL.
    Fresh,
    /// Graph throttles the request's scope.
    Throttled,
    /// The scope's quota is nearly spent.
    QuotaPressure,
    /// Within the TTL stretched by quota-aware freshness.
    QuotaTtl,
}

/// Why an answer was not, or not only, what upstream said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// Larger than `max_entry_bytes`: relayed, not stored.
    TooLarge,
    /// Upstream failed; a stored entry within max stale was served.
    StaleIfError,
    /// `local` of `total` batch items came from the cache.
    Cached { local: usize, total: usize },
}

/// One response's `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheStatus {
    /// Served from the cache.
    Hit(HitReason),
    /// Every item of a client batch served from the cache.
    BatchHit { items: usize },
    /// Went upstream.
    Forward {
        fwd: Fwd,
        fwd_status: Option<u16>,
        stored: bool,
        detail: Option<Detail>,
    },
}

impl CacheStatus {
    pub(crate) fn forward(fwd: Fwd, fwd_status: u16) -> Self {
        Self::Forward {
            fwd,
            fwd_status: Some(fwd_status),
            stored: false,
            detail: None,
        }
    }

    /// The header value; hits cost no allocation.
    pub(crate) fn header(&self) -> HeaderValue {
        match self {
            Self::Hit(HitReason::Fresh) => HeaderValue::from_static("graphcache; hit"),
            Self::Hit(HitReason::Throttled) => {
                HeaderValue::from_static("graphcache; hit; detail=throttled")
            }
            Self::Hit(HitReason::QuotaPressure) => {
                HeaderValue::from_static("graphcache; hit; detail=quota-pressure")
            }
            Self::Hit(HitReason::QuotaTtl) => {
                HeaderValue::from_static("graphcache; hit; detail=quota-ttl")
            }
            Self::BatchHit { items } => {
                text(format!("graphcache; hit; detail=cached-{items}-of-{items}"))
            }
            Self::Forward {
                fwd,
                fwd_status,
                stored,
                detail,
            } => {
                let mut value = String::with_capacity(64);
                value.push_str("graphcache; fwd=");
                value.push_str(fwd.as_str());
                if let Some(status) = fwd_status {
                    value.push_str("; fwd-status=");
                    value.push_str(&status.to_string());
                }
                if *stored {
                    value.push_str("; stored");
                }
                match detail {
                    None => {}
                    Some(Detail::TooLarge) => value.push_str("; detail=too-large"),
                    Some(Detail::StaleIfError) => value.push_str("; detail=stale-if-error"),
                    Some(Detail::Cached { local, total }) => {
                        value.push_str(&format!("; detail=cached-{local}-of-{total}"));
                    }
                }
                text(value)
            }
        }
    }
}

fn text(value: String) -> HeaderValue {
    HeaderValue::from_str(&value).expect("cache-status is ASCII")
}

/// A response plus what the cache did, for metrics and the access log.
pub(crate) struct Handled {
    pub(crate) response: Response<ResponseBody>,
    pub(crate) outcome: Outcome,
    /// False when the body is known to hold no paging link: the edge skips
    /// the rewrite's scan (a stored entry, checked once when stored).
    pub(crate) links: bool,
}

impl Handled {
    pub(crate) fn new(response: Response<ResponseBody>, outcome: Outcome) -> Self {
        Self {
            response,
            outcome,
            links: true,
        }
    }
}

/// A response from a stored entry: a 304 when the client's own
/// `If-None-Match` matches, else the stored body. Shares the body bytes.
pub(crate) fn serve_entry(
    parts: &Parts,
    entry: &CachedResponse,
    now: std::time::Instant,
    status: CacheStatus,
    outcome: Outcome,
) -> Handled {
    let age = age_value(entry.age(now).as_secs());
    if entry
        .etag
        .as_ref()
        .is_some_and(|tag| if_none_match_matches(&parts.headers, tag))
    {
        let mut response =
            not_modified(|name| entry.headers.get_all(name.clone()), status.header());
        response.headers_mut().insert(header::AGE, age);
        return Handled::new(response, outcome);
    }
    let head = parts.method == Method::HEAD;
    let mut response = Response::new(if head {
        ResponseBody::Empty
    } else {
        ResponseBody::full(entry.body.clone())
    });
    let headers = response.headers_mut();
    // One reservation (`extend` would make a second).
    headers.reserve(entry.headers.len() + 3);
    for (name, value) in entry.headers.iter() {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(header::AGE, age);
    headers.insert(CACHE_STATUS, status.header());
    if head {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
    }
    Handled {
        links: entry.paging_links,
        ..Handled::new(response, outcome)
    }
}

/// A 304 carrying the validator and caching headers of `headers`.
pub(crate) fn not_modified<'h, I: Iterator<Item = &'h HeaderValue>>(
    header: impl Fn(&HeaderName) -> I,
    cache_status: HeaderValue,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Empty);
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    let out = response.headers_mut();
    for name in [
        header::ETAG,
        header::CACHE_CONTROL,
        header::EXPIRES,
        header::VARY,
    ] {
        for value in header(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(CACHE_STATUS, cache_status);
    response
}

/// A collected upstream answer sent to one client: a 304 when it is a 200
/// whose ETag the client's own `If-None-Match` matches.
pub(crate) fn answer_response(
    parts: &Parts,
    answer: &Answer,
    status: CacheStatus,
) -> Response<ResponseBody> {
    let matches = answer.status == StatusCode::OK
        && answer
            .headers
            .get(header::ETAG)
            .is_some_and(|tag| if_none_match_matches(&parts.headers, tag));
    if matches {
        return not_modified(|name| answer.headers.get_all(name).iter(), status.header());
    }
    collected(answer, parts.method == Method::HEAD, status)
}

/// A collected answer as it came, for a GET (or a HEAD: no body, its length).
fn collected(answer: &Answer, head: bool, status: CacheStatus) -> Response<ResponseBody> {
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
    headers.insert(CACHE_STATUS, status.header());
    response
}

/// Streams an upstream answer to the client, minus hop-by-hop headers.
pub(crate) fn relay<B>(
    parts: &Parts,
    response: Response<B>,
    status: CacheStatus,
    outcome: Outcome,
) -> Handled
where
    B: Into<ResponseBody>,
{
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    head.headers.insert(CACHE_STATUS, status.header());
    let body = if parts.method == Method::HEAD {
        ResponseBody::Empty
    } else {
        body.into()
    };
    Handled::new(Response::from_parts(head, body), outcome)
}

/// The reply to a client batch that failed as a whole upstream, as Graph
/// sent it.
pub(crate) fn whole_answer(answer: &Answer, status: CacheStatus) -> Response<ResponseBody> {
    collected(answer, false, status)
}

/// Refuses to relay an encoded body to a client that did not accept it.
/// graphcache asks upstream for identity, so this only trips on an upstream
/// that ignores `Accept-Encoding`.
pub(crate) fn check_encoding(request: &HeaderMap, response: &HeaderMap) -> Result<(), ProxyError> {
    if is_encoded(response) && !accepts_gzip(request) {
        return Err(ProxyError::UpstreamEncoding);
    }
    Ok(())
}

/// Points the paging links of a complete JSON answer back at graphcache,
/// as the client reached it. An answer without links costs no allocation.
pub(crate) fn rewrite_paging(
    rewriter: &crate::graph::paging::PagingRewriter,
    mut response: Response<ResponseBody>,
    request: &Parts,
) -> Response<ResponseBody> {
    let ResponseBody::Full(Some(body)) = response.body() else {
        return response;
    };
    if !crate::graph::paging::is_json(response.headers()) || !rewriter.has_links(body) {
        return response;
    }
    let Some(origin) =
        crate::graph::paging::PagingRewriter::client_origin(&request.headers, &request.uri)
    else {
        return response;
    };
    let mut changed = false;
    if let ResponseBody::Full(Some(body)) = response.body_mut() {
        let rewritten = rewriter.rewrite(body, &origin);
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

/// `W/"…"` for a strong tag (weak comparison, which `If-None-Match` uses,
/// still matches it).
pub(crate) fn weaken(tag: &HeaderValue) -> Option<HeaderValue> {
    if tag.as_bytes().starts_with(b"W/") {
        return None;
    }
    let mut weak = Vec::with_capacity(tag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(tag.as_bytes());
    HeaderValue::from_maybe_shared(Bytes::from(weak)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_modified_carries_every_value_of_its_headers() {
        let mut stored = HeaderMap::new();
        stored.insert(header::ETAG, HeaderValue::from_static("\"a\""));
        stored.append(header::VARY, HeaderValue::from_static("Origin"));
        stored.append(header::VARY, HeaderValue::from_static("X-Foo"));
        stored.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let response = not_modified(
            |name| stored.get_all(name).iter(),
            HeaderValue::from_static("graphcache; hit"),
        );
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        let h = response.headers();
        assert_eq!(h.get_all(header::VARY).iter().count(), 2);
        assert_eq!(h[header::ETAG], "\"a\"");
        assert!(!h.contains_key(header::CONTENT_TYPE));
        assert_eq!(h[CACHE_STATUS], "graphcache; hit");
    }

    #[test]
    fn cache_status_values() {
        let forward = |fwd, fwd_status, stored, detail| CacheStatus::Forward {
            fwd,
            fwd_status,
            stored,
            detail,
        };
        assert_eq!(
            forward(Fwd::Stale, Some(304), false, None).header(),
            "graphcache; fwd=stale; fwd-status=304"
        );
        assert_eq!(
            forward(Fwd::UriMiss, Some(200), true, None).header(),
            "graphcache; fwd=uri-miss; fwd-status=200; stored"
        );
        assert_eq!(
            forward(Fwd::Stale, None, false, Some(Detail::StaleIfError)).header(),
            "graphcache; fwd=stale; detail=stale-if-error"
        );
        assert_eq!(
            forward(
                Fwd::Partial,
                Some(200),
                false,
                Some(Detail::Cached { local: 1, total: 3 })
            )
            .header(),
            "graphcache; fwd=partial; fwd-status=200; detail=cached-1-of-3"
        );
        assert_eq!(
            CacheStatus::Hit(HitReason::Fresh).header(),
            "graphcache; hit"
        );
        assert_eq!(
            CacheStatus::Hit(HitReason::QuotaTtl).header(),
            "graphcache; hit; detail=quota-ttl"
        );
        assert_eq!(
            CacheStatus::BatchHit { items: 2 }.header(),
            "graphcache; hit; detail=cached-2-of-2"
        );
        assert_eq!(Fwd::VaryMiss.as_str(), "vary-miss");
    }

    #[test]
    fn weak_tags() {
        assert_eq!(
            weaken(&HeaderValue::from_static("\"a\"")).unwrap(),
            "W/\"a\""
        );
        assert!(weaken(&HeaderValue::from_static("W/\"a\"")).is_none());
    }
}
