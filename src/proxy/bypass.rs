//! Stage 3b: a GET or HEAD that must not touch the cache (no-store, routes
//! with `cache = false`, JSONP, a real body, ambiguous credentials): relayed
//! once, its usage headers read on the way.

use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::Response;
use hyper::body::Incoming;

use crate::body::{collect_up_to, Collected, RelayGuard, ResponseBody};
use crate::cache::TokenIdentity;
use crate::error::ProxyError;
use crate::metrics::Outcome;
use crate::proxy::respond::{check_encoding, relay, CacheStatus, Fwd, Handled};
use crate::proxy::Proxy;
use crate::ratelimit::Subject;
use crate::upstream::request::{self, forward_headers, Exchange};
use crate::upstream::{empty_body, full_body, UpstreamError, UpstreamTimer};

impl Proxy {
    /// Relays a cacheable method without touching the cache.
    pub(crate) async fn bypass(
        &self,
        parts: &Parts,
        body: Option<Bytes>,
        caller: Option<TokenIdentity>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let mut headers = forward_headers(&parts.headers, Exchange::Relay);
        let body = match body {
            Some(bytes) => full_body(bytes),
            None => {
                headers.remove(header::CONTENT_LENGTH);
                empty_body()
            }
        };
        let upstream = request::build(
            &self.upstream,
            parts.method.clone(),
            parts.uri.path_and_query(),
            headers,
            body,
        );
        let (response, guard) = self.upstream.send(upstream, &self.metrics, timer).await?;
        let response = self
            .observe_relayed(
                response,
                guard,
                &Subject::of_request(parts.uri.path(), caller),
                Peek::Errors,
            )
            .await?;
        let status = CacheStatus::forward(Fwd::Bypass, response.status().as_u16());
        check_encoding(&parts.headers, response.headers())?;
        Ok(relay(parts, response, status, Outcome::Bypass))
    }

    /// Reads the usage headers of a relayed answer and, for an error (or
    /// any answer, with [`Peek::Whole`]), its body up to 64 KiB, then
    /// relayed as read, for a throttling code.
    pub(crate) async fn observe_relayed(
        &self,
        response: Response<Incoming>,
        guard: RelayGuard,
        subject: &Subject,
        peek: Peek,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        const ERROR_PEEK: usize = 64 << 10;
        let (head, body) = response.into_parts();
        let success = head.status.is_success() || head.status.is_redirection();
        if success && peek == Peek::Errors {
            self.limits.observe(&head.headers, subject, &self.metrics);
            return Ok(Response::from_parts(
                head,
                ResponseBody::relay(None, body, guard),
            ));
        }
        let collected = tokio::time::timeout_at(guard.deadline(), collect_up_to(body, ERROR_PEEK))
            .await
            .map_err(|_| UpstreamError::Timeout(self.upstream.timeout))?
            .map_err(|e| UpstreamError::Body(Arc::new(e)))?;
        let body = match collected {
            Collected::Complete(bytes) => {
                self.limits.observe_answer(
                    head.status,
                    &head.headers,
                    &bytes,
                    subject,
                    &self.metrics,
                );
                ResponseBody::full(bytes)
            }
            Collected::Overflow { prefix, rest } => {
                self.limits.observe(&head.headers, subject, &self.metrics);
                ResponseBody::relay(Some(prefix), rest, guard)
            }
        };
        Ok(Response::from_parts(head, body))
    }
}

/// Which relayed answers are read (up to 64 KiB) before they are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peek {
    /// Only errors, for their throttling codes; successes stream.
    Errors,
    /// Every answer: a write's answer is small, and reading it first means
    /// an upstream that breaks off mid-answer gets the client a clean
    /// 502/504 envelope instead of a truncated success.
    Whole,
}
