//! Building upstream requests: one function, one header policy.
//!
//! Every exchange drops hop-by-hop headers (RFC 9110 §7.6.1) and
//! `Accept-Encoding` (graphcache stores and serves identity). What else a
//! client header may carry upstream depends on what the exchange is for.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request};

use crate::headers::strip_hop_by_hop;
use crate::upstream::{Upstream, UpstreamBody};

/// What an upstream request is for; each has its own header policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// A cacheable GET, shared by every request of its key: nothing of one
    /// client's caching, ranges or conditionals rides along (graphcache sets
    /// its own `If-None-Match`), and no body headers.
    Read,
    /// A request relayed as sent, with its own body (bypass, writes).
    Relay,
    /// A client batch re-encoded as a form: no body or caching headers of
    /// the client's.
    Batch,
}

impl Exchange {
    /// Client headers this exchange never forwards, besides hop-by-hop and
    /// `Accept-Encoding`.
    fn dropped(self) -> &'static [HeaderName] {
        const READ: [HeaderName; 9] = [
            header::CACHE_CONTROL,
            header::PRAGMA,
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::IF_MODIFIED_SINCE,
            header::IF_NONE_MATCH,
            header::IF_RANGE,
            header::RANGE,
            header::IF_MATCH,
        ];
        const BATCH: [HeaderName; 4] = [
            header::CONTENT_LENGTH,
            header::CACHE_CONTROL,
            header::PRAGMA,
            header::CONTENT_TYPE,
        ];
        match self {
            Self::Read => &READ,
            Self::Relay => &[],
            Self::Batch => &BATCH,
        }
    }
}

/// The client headers that go upstream for `exchange`.
pub fn forward_headers(client: &HeaderMap, exchange: Exchange) -> HeaderMap {
    let mut headers = client.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::ACCEPT_ENCODING);
    for name in exchange.dropped() {
        headers.remove(name);
    }
    headers
}

/// An upstream request for `path_and_query` on the configured upstream.
pub fn build(
    upstream: &Upstream,
    method: Method,
    path_and_query: Option<&PathAndQuery>,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = upstream.uri_for(path_and_query);
    *request.headers_mut() = headers;
    request
}

/// `Content-Type` of the form bodies graphcache encodes.
pub const FORM: HeaderValue = HeaderValue::from_static("application/x-www-form-urlencoded");

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("range", "bytes=0-4"),
            ("if-range", "\"a\""),
            ("if-none-match", "\"a\""),
            ("accept-encoding", "gzip"),
            ("connection", "close"),
            ("content-type", "application/json"),
            ("user-agent", "sdk"),
            ("authorization", "OAuth t"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn shared_reads_carry_no_client_range_or_conditional() {
        let h = forward_headers(&client(), Exchange::Read);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["authorization", "user-agent"]);
    }

    #[test]
    fn relays_keep_everything_end_to_end() {
        let h = forward_headers(&client(), Exchange::Relay);
        assert!(h.contains_key("range") && h.contains_key("if-none-match"));
        assert!(h.contains_key("content-type"));
        assert!(!h.contains_key("accept-encoding") && !h.contains_key("connection"));
        let b = forward_headers(&client(), Exchange::Batch);
        assert!(!b.contains_key("content-type") && b.contains_key("user-agent"));
    }
}
