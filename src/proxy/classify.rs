//! Stage 1: every client request is classified once into a typed request.
//!
//! The head is checked against graphcache's limits, the query parsed, the
//! caller identified from every credential it carries, and the request
//! sorted into what the later stages do with it. Bodies are read here only
//! when that decides the kind (a write that may be a batch, a GET that may
//! carry a body); nothing downstream parses or derives any of it again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::body::{collect_up_to, Collected, ResponseBody};
use crate::cache::identity::{agreed, authorization_credential, Credentials};
use crate::cache::TokenIdentity;
use crate::cache::WriteScope;
use crate::client_batch::plan::BatchCredentials;
use crate::client_batch::ClientBatch;
use crate::config::Config;
use crate::error::ProxyError;
use crate::graph::query::QueryParams;
use crate::graph::routes::{objects_of, CachePolicy};
use crate::headers::{client_cache_control, header_bytes, is_media_type, ClientCacheControl};
use crate::proxy::Proxy;
use crate::upstream::{empty_body, full_body, limited_body, UpstreamBody};

/// Largest GET body read to tell an SDK's `{}` from a real body.
const MAX_GET_BODY: usize = 64 << 10;
/// Largest write body read for the object ids it names; larger ones stream.
const MAX_PARSED_WRITE_BODY: usize = 1 << 20;

/// One client request, classified.
pub(crate) struct Request<'a> {
    pub parts: &'a Parts,
    pub query: QueryParams<'a>,
    /// The caller, or None when its credentials are ambiguous (two tokens,
    /// two proofs, an empty one): such a request never touches the cache.
    pub caller: Option<TokenIdentity>,
    pub user_agent: &'a [u8],
    pub control: ClientCacheControl,
    /// The share of the buffered-body budget a GET body read holds.
    pub _budget: Option<Budget>,
}

/// A share of `max_buffered_bytes`, held while a buffered body lives.
pub(crate) type Budget = tokio::sync::OwnedSemaphorePermit;

/// What the stages below do with a request.
pub(crate) enum Kind {
    /// A cacheable GET or HEAD under this route policy, for this caller.
    Read {
        policy: CachePolicy,
        identity: TokenIdentity,
    },
    /// A GET or HEAD that must not touch the cache, with its real body.
    Bypass(Option<Bytes>),
    /// A write, relayed exactly once; on anything but a 4xx, `scope` is
    /// invalidated (None: a method that changes nothing graphcache keeps).
    Write {
        body: UpstreamBody,
        scope: Option<WriteScope>,
        budget: Option<Budget>,
    },
    /// A client batch, answered item by item.
    Batch(Box<BatchRequest>),
}

/// A client batch with everything its stage needs, owned so that a batch
/// with writes can finish in its own task after a disconnect.
pub(crate) struct BatchRequest {
    pub head: Parts,
    /// The configuration the request was classified under: the whole batch,
    /// in its own task too, runs under it even across a reload.
    pub config: Arc<Config>,
    pub batch: ClientBatch,
    pub credentials: Result<BatchCredentials, crate::cache::identity::Ambiguous>,
    /// Sent as `GET ...?method=post&batch=...`: `method` is not forwarded.
    pub method_override: bool,
    /// The share of the buffered-body budget its body held.
    pub budget: Option<Budget>,
}

/// What a GET's body turned out to be.
enum GetBody {
    /// None, empty, or the Node SDK's `{}`.
    Nothing,
    /// Anything else: forwarded, never cached.
    Some(Bytes),
}

impl Proxy {
    /// Classifies one request (see the module doc).
    pub(crate) async fn classify<'a>(
        &self,
        parts: &'a Parts,
        body: Incoming,
        config: &Arc<Config>,
    ) -> Result<(Request<'a>, Kind), ProxyError> {
        self.check_head(parts, config)?;
        let query = QueryParams::parse(parts.uri.query());
        let headers = &parts.headers;
        let authorization = authorization_credential(headers);
        let user_agent = headers
            .get(header::USER_AGENT)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let control = client_cache_control(headers);
        let reads = parts.method == Method::GET || parts.method == Method::HEAD;
        let override_post = query
            .get("method")
            .is_some_and(|m| m.eq_ignore_ascii_case("post"))
            && query.count("method") == 1;
        // The caller, from the query, a parsed body and `Authorization`: one
        // token and one proof at most, or no identity at all.
        let identify = |body: &[(String, String)]| {
            let body_value = |name: &'static str| {
                body.iter()
                    .filter(move |(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            let query_value = |name: &'static str| {
                query
                    .iter()
                    .filter(move |(k, _)| *k == name)
                    .map(|(_, v)| v)
            };
            let token = agreed(query_value("access_token"), body_value("access_token")).ok()?;
            let proof = agreed(
                query_value("appsecret_proof"),
                body_value("appsecret_proof"),
            )
            .ok()?;
            Some(self.tokens.identify(&Credentials {
                token,
                proof,
                authorization: authorization.clone(),
            }))
        };
        let mut body_params: Vec<(String, String)> = Vec::new();
        let mut budget = None;
        let kind = if reads && !query.overrides_to_write() {
            if !body.is_end_stream() {
                budget = Some(self.reserve(headers, MAX_GET_BODY)?);
            }
            match read_get_body(body, config.header_read_timeout).await? {
                GetBody::Some(bytes) => Kind::Bypass(Some(bytes)),
                GetBody::Nothing => {
                    let path = parts.uri.path();
                    let policy = self.jobs.policy(
                        path,
                        config.routes.policy_for(path),
                        config.async_poll_interval,
                    );
                    if control.no_store || !policy.cache || query.contains("callback") {
                        Kind::Bypass(None)
                    } else {
                        // A caller with ambiguous credentials never touches
                        // the cache.
                        match identify(&[]) {
                            Some(identity) => Kind::Read { policy, identity },
                            None => Kind::Bypass(None),
                        }
                    }
                }
            }
        } else {
            let is_write = reads
                || matches!(
                    parts.method,
                    Method::POST | Method::PUT | Method::DELETE | Method::PATCH
                );
            let may_batch = (parts.method == Method::POST || (reads && override_post))
                && !query.contains("callback");
            let max_body = config.max_body_bytes;
            let mut sniffed_batch = false;
            let upstream_body = if body.is_end_stream() {
                if may_batch {
                    if let Some(batch) = crate::client_batch::parse(&query, None, b"")? {
                        return Ok(self.batch_request(
                            parts,
                            config,
                            query,
                            batch,
                            override_post && reads,
                            None,
                        ));
                    }
                }
                empty_body()
            } else if is_write && sniffable_write_body(headers) {
                let cap = MAX_PARSED_WRITE_BODY.min(max_body);
                budget = Some(self.reserve(headers, cap)?);
                // A client trickling its body must not hold the request forever.
                let read = collect_up_to(body, MAX_PARSED_WRITE_BODY.min(max_body));
                match tokio::time::timeout(self.upstream.timeout, read)
                    .await
                    .map_err(|_| ProxyError::ClientTimeout)?
                    .map_err(|e| ProxyError::ClientBody(Arc::new(e)))?
                {
                    Collected::Complete(bytes) if parseable_write_body(headers) => {
                        if may_batch {
                            let content_type = headers.get(header::CONTENT_TYPE);
                            if let Some(batch) =
                                crate::client_batch::parse(&query, content_type, &bytes)?
                            {
                                if !batch.top_level.iter().any(|(k, _)| k == "callback") {
                                    return Ok(self.batch_request(
                                        parts,
                                        config,
                                        query,
                                        batch,
                                        override_post && reads,
                                        budget,
                                    ));
                                }
                                sniffed_batch = true;
                            }
                        }
                        body_params = write_body_params(headers, &bytes);
                        full_body(bytes)
                    }
                    Collected::Complete(bytes) => {
                        sniffed_batch = names_batch_part(&bytes);
                        full_body(bytes)
                    }
                    Collected::Overflow { prefix, rest } => {
                        // Past 1 MiB graphcache cannot see the ids a form or
                        // JSON body may name, nor whether a multipart body
                        // posted to the batch root holds a `batch` part:
                        // drop everything. A multipart upload to a node
                        // (ad images, videos) names only its node.
                        sniffed_batch = parseable_write_body(headers)
                            || names_batch_part(&prefix)
                            || crate::graph::routes::path_node(parts.uri.path()).is_none();
                        limited_body(
                            ResponseBody::Relay {
                                prefix: Some(prefix),
                                rest,
                                guard: None,
                            },
                            max_body,
                        )
                    }
                }
            } else {
                limited_body(body, max_body)
            };
            let scope = is_write.then(|| {
                // A batch graphcache does not serve item by item (files,
                // JSONP, a batch in the query beside another body), or a
                // form, JSON or multipart body too large to read whole,
                // changes objects it cannot see: it drops everything.
                if sniffed_batch
                    || query.contains("batch")
                    || body_params.iter().any(|(k, _)| k == "batch")
                {
                    return WriteScope::Everything;
                }
                WriteScope::of(objects_of(
                    parts.uri.path(),
                    query
                        .iter()
                        .chain(body_params.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                ))
            });
            Kind::Write {
                body: upstream_body,
                scope,
                budget: budget.take(),
            }
        };
        let caller = match &kind {
            Kind::Read { identity, .. } => Some(*identity),
            _ => identify(&body_params),
        };
        Ok((
            Request {
                parts,
                query,
                caller,
                user_agent,
                control,
                _budget: budget,
            },
            kind,
        ))
    }

    /// Refuses heads graphcache will not forward, before anything is read.
    fn check_head(&self, parts: &Parts, config: &Config) -> Result<(), ProxyError> {
        if parts.method == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        // Methods are case-sensitive (RFC 9110 §9.1): `get` is not GET, and
        // TRACE or an unknown token is nothing Graph serves.
        if !matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::POST
                | Method::PUT
                | Method::DELETE
                | Method::PATCH
                | Method::OPTIONS
        ) {
            return Err(ProxyError::MethodNotAllowed(parts.method.clone()));
        }
        // HTTP/1 absolute-form: only the upstream's own authority is
        // accepted, and even then the request goes to the configured upstream.
        if parts.version <= Version::HTTP_11 && !self.upstream.is_upstream_target(&parts.uri) {
            return Err(ProxyError::ForeignTarget);
        }
        if parts.uri.path() == "*" {
            // Asterisk-form (`OPTIONS *`) asks about the server itself, and
            // there is no path to forward it to.
            return Err(ProxyError::BadRequest(
                "asterisk-form request targets are not supported",
            ));
        }
        if header_bytes(&parts.headers) > config.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                limit: config.max_header_bytes,
            });
        }
        if content_length(&parts.headers).is_some_and(|n| n > config.max_body_bytes as u64) {
            return Err(ProxyError::BodyTooLarge {
                limit: config.max_body_bytes,
            });
        }
        Ok(())
    }

    /// Takes a share of the buffered-body budget for a body read up to
    /// `cap` bytes (its `Content-Length` when smaller), or refuses the
    /// request: nothing is read or forwarded.
    fn reserve(&self, headers: &HeaderMap, cap: usize) -> Result<Budget, ProxyError> {
        let want = content_length(headers).map_or(cap as u64, |n| n.min(cap as u64));
        let want = u32::try_from(want.max(1)).unwrap_or(u32::MAX);
        self.body_budget
            .clone()
            .try_acquire_many_owned(want)
            .map_err(|_| ProxyError::Overloaded("the buffered request body budget is spent"))
    }

    fn batch_request<'a>(
        &self,
        parts: &'a Parts,
        config: &Arc<Config>,
        query: QueryParams<'a>,
        batch: ClientBatch,
        method_override: bool,
        budget: Option<Budget>,
    ) -> (Request<'a>, Kind) {
        let authorization = authorization_credential(&parts.headers);
        let credentials = BatchCredentials::of(&query, &batch.top_level, authorization.as_deref());
        let caller = credentials.as_ref().ok().map(|c| c.identity(&self.tokens));
        let (mut head, ()) = http::Request::new(()).into_parts();
        head.method = parts.method.clone();
        head.uri = parts.uri.clone();
        head.version = parts.version;
        head.headers = parts.headers.clone();
        let request = Request {
            parts,
            query,
            caller,
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .map_or(&b""[..], HeaderValue::as_bytes),
            control: client_cache_control(&parts.headers),
            _budget: None,
        };
        let kind = Kind::Batch(Box::new(BatchRequest {
            head,
            config: config.clone(),
            batch,
            credentials,
            method_override,
            budget,
        }));
        (request, kind)
    }
}

/// Reads a GET body to tell "no body" (including the Node SDK's `{}`) from a
/// real one. Reading it also keeps the keep-alive connection healthy.
async fn read_get_body(body: Incoming, timeout: Duration) -> Result<GetBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(GetBody::Nothing);
    }
    let collected = tokio::time::timeout(timeout, collect_up_to(body, MAX_GET_BODY))
        .await
        .map_err(|_| ProxyError::ClientTimeout)?
        .map_err(|e| ProxyError::ClientBody(Arc::new(e)))?;
    match collected {
        Collected::Complete(bytes) => {
            let trimmed = bytes.trim_ascii();
            if trimmed.is_empty() || trimmed == b"{}" {
                Ok(GetBody::Nothing)
            } else {
                Ok(GetBody::Some(bytes))
            }
        }
        Collected::Overflow { .. } => Err(ProxyError::BodyTooLarge {
            limit: MAX_GET_BODY,
        }),
    }
}

/// Form and JSON write bodies are parsed for the ids they name.
fn parseable_write_body(headers: &HeaderMap) -> bool {
    let content_type = headers.get(header::CONTENT_TYPE);
    is_media_type(content_type, "application/x-www-form-urlencoded")
        || is_media_type(content_type, "application/json")
}

/// Bodies read (up to 1 MiB) before forwarding: those parsed, and multipart
/// ones, which are only looked at for a `batch` part.
fn sniffable_write_body(headers: &HeaderMap) -> bool {
    parseable_write_body(headers)
        || is_media_type(headers.get(header::CONTENT_TYPE), "multipart/form-data")
}

/// True when a multipart body (as far as read) has a part named `batch`.
fn names_batch_part(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"name=\"batch\"").is_some()
        || memchr::memmem::find(body, b"name=batch").is_some()
}

/// Top-level parameters of a form or JSON write body, for object ids.
fn write_body_params(headers: &HeaderMap, body: &[u8]) -> Vec<(String, String)> {
    if !is_media_type(headers.get(header::CONTENT_TYPE), "application/json") {
        return form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_body_parameters_from_form_and_json() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert_eq!(
            write_body_params(&h, b"adset_id=5&name=x"),
            [("adset_id".into(), "5".into()), ("name".into(), "x".into())]
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(
            write_body_params(&h, br#"{"campaign_id":7}"#),
            [("campaign_id".into(), "7".into())]
        );
        assert!(write_body_params(&h, b"not json").is_empty());
    }

    #[test]
    fn multipart_batch_parts_are_noticed() {
        assert!(names_batch_part(
            b"--x\r\nContent-Disposition: form-data; name=\"batch\"\r\n\r\n[]"
        ));
        assert!(!names_batch_part(
            b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n"
        ));
    }
}
