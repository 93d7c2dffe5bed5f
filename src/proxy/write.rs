//! Stage 3c: writes, and every method that is not a cacheable read, go
//! upstream exactly once, streaming their body; what a write may have
//! changed is invalidated before its answer reaches the client.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::WriteScope;
use crate::error::ProxyError;
use crate::metrics::Outcome;
use http::Response;

use crate::body::ResponseBody;
use crate::graph::jobs::{created_job, creates_job, JobState};
use crate::proxy::bypass::Peek;
use crate::proxy::classify::{Budget, Request};
use crate::proxy::respond::{check_encoding, relay, CacheStatus, Fwd, Handled};
use crate::proxy::Proxy;
use crate::ratelimit::Subject;
use crate::upstream::request::{self, forward_headers, Exchange};
use crate::upstream::{UpstreamBody, UpstreamError, UpstreamTimer};

impl Proxy {
    /// Forwards a write once; on anything but a 4xx, invalidates `scope`.
    pub(crate) async fn write(
        self: &Arc<Self>,
        request: &Request<'_>,
        body: UpstreamBody,
        scope: Option<WriteScope>,
        budget: Option<Budget>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let parts = request.parts;
        let upstream = request::build(
            &self.upstream,
            parts.method.clone(),
            parts.uri.path_and_query(),
            forward_headers(&parts.headers, Exchange::Relay),
            body,
        );
        let outcome = if scope.is_some() {
            Outcome::Write
        } else {
            Outcome::Pass
        };
        // The exchange and its invalidation run in their own task: a client
        // that disconnects mid-write cannot leave stale entries behind.
        let subject = Subject::of_request(parts.uri.path(), request.caller);
        let writes = scope.is_some();
        let proxy = self.clone();
        let wait = self.config.load().write_slot_wait;
        let exchange = self
            .detached
            .spawn(wait, async move {
                let _budget = budget;
                let timer = UpstreamTimer::default();
                let result = match proxy.upstream.send(upstream, &proxy.metrics, &timer).await {
                    Ok((response, guard)) => {
                        proxy
                            .observe_relayed(response, guard, &subject, Peek::Whole)
                            .await
                    }
                    Err(error) => Err(error.into()),
                };
                // Invalidate unless Graph rejected the write (4xx): a 2xx
                // applied it, and a 5xx, a timeout or a broken connection may have.
                let rejected = matches!(&result, Ok(r) if r.status().is_client_error());
                if let (Some(scope), false) = (&scope, rejected) {
                    proxy.invalidate(scope).await;
                }
                (result, timer.micros())
            })
            .await?;
        let (result, upstream_us) = match exchange.await {
            Ok(done) => done,
            Err(_) => {
                // The task died (a panic) after the write may have gone out.
                if writes {
                    self.invalidate(&WriteScope::Everything).await;
                }
                return Err(ProxyError::FlightLost);
            }
        };
        if let Some(us) = upstream_us {
            timer.add(Duration::from_micros(us));
        }
        let max_body = self.config.load().max_body_bytes;
        let response = result.map_err(|error| match error {
            // The client's streamed body passed max_body_bytes mid-way.
            ProxyError::Upstream(UpstreamError::Unreachable(e)) if caused_by_length_limit(&*e) => {
                ProxyError::BodyTooLarge { limit: max_body }
            }
            // The client's own body failed mid-stream (a malformed chunk, a
            // reset): the client's fault, not the upstream's.
            ProxyError::Upstream(UpstreamError::Unreachable(e)) if body_stream_failed(&*e) => {
                ProxyError::ClientBodyStream(e)
            }
            other => other,
        })?;
        check_encoding(&parts.headers, response.headers())?;
        self.learn_created_job(parts.uri.path(), &response);
        let status = CacheStatus::forward(Fwd::Method, response.status().as_u16());
        Ok(relay(parts, response, status, outcome))
    }

    /// A write that creates an async job (a request set, a report run)
    /// names it in its reply: from now on its status reads are polls.
    fn learn_created_job(&self, path: &str, response: &Response<ResponseBody>) {
        if !response.status().is_success() || !creates_job(path) {
            return;
        }
        if let ResponseBody::Full(Some(reply)) = response.body() {
            if let Some(id) = created_job(&reply[..]) {
                self.jobs.learn(id, JobState::Running);
            }
        }
    }

    /// Drops what a write (that succeeded, or may have) changed, and counts it.
    pub(crate) async fn invalidate(&self, scope: &WriteScope) {
        use crate::cache::Store;
        let dropped = match scope {
            WriteScope::Objects(objects) => self.store.invalidate_objects(objects).await,
            WriteScope::Everything => {
                tracing::info!("a write named no object graphcache can tell: dropping every entry");
                self.store.invalidate_all().await
            }
        };
        self.metrics.count_invalidated(dropped);
    }
}

/// True when `error`'s chain says the request body stream failed, which
/// for a relayed request is the client's body.
fn body_stream_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// True when `error`'s chain holds a body-limit error.
fn caused_by_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}
