//! Optional rewriting of paging links. Graph's `paging.next` and
//! `paging.previous` are absolute `https://graph.facebook.com/...` URLs; the
//! Node SDK's cursor follows them verbatim, so page 2 would leave the sidecar
//! (contract §6.4). With `rewrite_paging_links`, links to the upstream in
//! cached-path answers are pointed back at graphcache as the client reached it.

use bytes::{Bytes, BytesMut};
use http::header;
use http::uri::Authority;
use http::{HeaderMap, Uri};
use memchr::memmem::Finder;

/// Graph's own origin, which its links name whatever address the sidecar
/// reaches it by.
const GRAPH_ORIGIN: &str = "https://graph.facebook.com/";

/// Rewrites upstream links in the `next` and `previous` fields of JSON
/// bodies (Graph's paging links), plain and `\/`-escaped. Links anywhere
/// else (post messages, creative URLs) are user data and left alone.
pub struct PagingRewriter {
    /// (needle, field, escaped) for each field, origin and escaping.
    needles: Vec<(Finder<'static>, &'static str, bool)>,
}

/// The paging fields whose values are rewritten.
const FIELDS: [&str; 2] = ["next", "previous"];

impl PagingRewriter {
    /// For links to Graph and to `upstream` (scheme and authority only).
    pub fn new(upstream: &Uri) -> Self {
        let configured = format!(
            "{}://{}/",
            upstream.scheme_str().unwrap_or("https"),
            upstream.authority().map_or("", Authority::as_str)
        );
        let mut origins = vec![GRAPH_ORIGIN.to_owned()];
        if configured != GRAPH_ORIGIN {
            origins.push(configured);
        }
        let mut needles = Vec::new();
        for origin in &origins {
            for field in FIELDS {
                for escaped in [false, true] {
                    let needle = format!("\"{field}\":\"{}", escape(origin, escaped));
                    needles.push((Finder::new(needle.as_bytes()).into_owned(), field, escaped));
                }
            }
        }
        Self { needles }
    }

    /// The client-facing origin for a request: its `Host` (or HTTP/2
    /// authority), if it is a well-formed authority.
    pub fn client_origin(headers: &HeaderMap, uri: &Uri) -> Option<Authority> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(Authority::as_str))?;
        host.parse::<Authority>()
            .ok()
            .filter(|a| !a.as_str().contains('@'))
    }

    /// True when `body` holds a link to rewrite. Allocates nothing, so
    /// answers without paging links (most cache hits) cost a few scans.
    pub fn has_links(&self, body: &[u8]) -> bool {
        self.needles
            .iter()
            .any(|(needle, _, _)| needle.find(body).is_some())
    }

    /// `body` with its paging links pointed at `http://{client}/`; the same
    /// bytes (no copy) when there is none.
    pub fn rewrite(&self, body: &Bytes, client: &Authority) -> Bytes {
        if !self.has_links(body) {
            return body.clone();
        }
        let target = format!("http://{client}/");
        self.needles
            .iter()
            .fold(body.clone(), |body, (needle, field, escaped)| {
                let with = format!("\"{field}\":\"{}", escape(&target, *escaped));
                replace_all(&body, needle, with.as_bytes())
            })
    }
}

/// A URL prefix as it appears in JSON, optionally with `/` escaped as `\/`.
fn escape(url: &str, escaped: bool) -> String {
    if escaped {
        url.replace('/', "\\/")
    } else {
        url.to_owned()
    }
}

fn replace_all(body: &Bytes, needle: &Finder<'_>, with: &[u8]) -> Bytes {
    let mut matches = needle.find_iter(body).peekable();
    if matches.peek().is_none() {
        return body.clone();
    }
    let mut out = BytesMut::with_capacity(body.len());
    let mut at = 0;
    for start in matches {
        out.extend_from_slice(&body[at..start]);
        out.extend_from_slice(with);
        at = start + needle.needle().len();
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

/// True for a response whose body may hold paging links (Graph has sent
/// JSON as `text/javascript` in the past).
pub fn is_json(headers: &HeaderMap) -> bool {
    let content_type = headers.get(header::CONTENT_TYPE);
    crate::headers::is_media_type(content_type, "application/json")
        || crate::headers::is_media_type(content_type, "text/javascript")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_escaped_links_point_at_the_client_origin() {
        let r = PagingRewriter::new(&"https://graph.facebook.com".parse().unwrap());
        let client: Authority = "127.0.0.1:8080".parse().unwrap();
        let body = Bytes::from_static(
            br#"{"paging":{"next":"https://graph.facebook.com/v26.0/act_1/ads?after=x","previous":"https:\/\/graph.facebook.com\/v26.0\/act_1\/ads?before=y"}}"#,
        );
        let out = r.rewrite(&body, &client);
        assert_eq!(
            &out[..],
            &br#"{"paging":{"next":"http://127.0.0.1:8080/v26.0/act_1/ads?after=x","previous":"http:\/\/127.0.0.1:8080\/v26.0\/act_1\/ads?before=y"}}"#[..]
        );
        let untouched = Bytes::from_static(b"{\"id\":\"1\"}");
        assert_eq!(r.rewrite(&untouched, &client).as_ptr(), untouched.as_ptr());
        // Links that are user data stay as they are.
        let data = Bytes::from_static(br#"{"message":"see https://graph.facebook.com/docs","link":"https:\/\/graph.facebook.com\/x"}"#);
        assert_eq!(r.rewrite(&data, &client), data);
    }

    #[test]
    fn only_sane_hosts_are_used() {
        use http::HeaderValue;
        let uri: Uri = "/v26.0/me".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("sidecar:8080"));
        assert_eq!(
            PagingRewriter::client_origin(&h, &uri).unwrap().as_str(),
            "sidecar:8080"
        );
        h.insert(header::HOST, HeaderValue::from_static("evil.com/path"));
        assert!(PagingRewriter::client_origin(&h, &uri).is_none());
        h.insert(header::HOST, HeaderValue::from_static("user@evil.com"));
        assert!(PagingRewriter::client_origin(&h, &uri).is_none());
    }

    proptest::proptest! {
        /// Any body: no panic; rewriting twice is rewriting once; a body
        /// without a link comes back as the same bytes.
        #[test]
        fn rewriting_is_idempotent_and_leaves_other_bodies_alone(
            prefix in ".{0,40}", rest in ".{0,40}", escaped in proptest::bool::ANY,
        ) {
            let r = PagingRewriter::new(&"https://graph.facebook.com".parse().unwrap());
            let client: Authority = "127.0.0.1:8080".parse().unwrap();
            let link = if escaped { "https:\\/\\/graph.facebook.com\\/v26.0\\/x" } else { "https://graph.facebook.com/v26.0/x" };
            let body = Bytes::from(format!("{prefix}{{\"next\":\"{link}?after=1\"}}{rest}"));
            let once = r.rewrite(&body, &client);
            proptest::prop_assert_eq!(&r.rewrite(&once, &client), &once);
            proptest::prop_assert!(!r.has_links(&once));
            let plain = Bytes::from(format!("{prefix}{rest}"));
            if !r.has_links(&plain) {
                proptest::prop_assert_eq!(r.rewrite(&plain, &client), plain);
            }
        }
    }
}
