//! The admin listener: `/metrics`, `/healthz`, `/readyz`. Kept off the client
//! port so scraping never competes with, or is exposed like, proxy traffic.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::cache::MemoryStore;
use crate::metrics::Metrics;

/// What the admin endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub limits: Arc<crate::ratelimit::RateLimits>,
    pub store: MemoryStore,
    /// The fleet's shared tier, whose state `/readyz` reports.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// True while the proxy listener accepts; false once draining starts.
    pub ready: Arc<AtomicBool>,
}

impl Admin {
    pub async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
        }
        Ok(match request.uri().path() {
            "/metrics" => {
                let body = self
                    .metrics
                    .render(&self.store, self.limits.throttled_scopes())
                    .await;
                let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if !self.ready.load(Ordering::Acquire) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/readyz" => match &self.fleet {
                Some(fleet) if !fleet.is_healthy() && fleet.settings().required => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: fleet redis unreachable (redis_required)\n",
                ),
                Some(fleet) if !fleet.is_healthy() => text(
                    StatusCode::OK,
                    "ready (degraded: fleet redis unreachable; serving from memory and upstream)\n",
                ),
                _ => text(StatusCode::OK, "ready\n"),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz or /readyz\n",
            ),
        })
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
