//! The upstream stage: everything that talks to the one configured upstream.
//!
//! - [`request`]: the one place upstream requests are built, with one header
//!   policy per kind of exchange;
//! - [`client`]: the pooled rustls client, timeouts, and collecting answers;
//! - [`packer`]: cacheable GETs go alone, or packed into Graph batches;
//! - [`flight`]: identical concurrent reads share one call.
//!
//! Errors here are [`UpstreamError`]; the edge renders them as envelopes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};

pub mod client;
pub mod flight;
pub mod packer;
pub mod request;

pub use client::Upstream;

/// Boxed error for request bodies of any origin.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of a request sent upstream.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Why an exchange with the upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream could not be reached: {0}")]
    Unreachable(#[source] Arc<hyper_util::client::legacy::Error>),
    #[error("the upstream failed while sending its answer: {0}")]
    Body(#[source] Arc<hyper::Error>),
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the upstream answer is larger than the configured limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("an upstream batch failed as a whole: {0}")]
    BatchFailed(#[source] BatchFailure),
    #[error("the shared upstream call for this request failed")]
    Lost,
}

/// How an upstream batch failed as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchFailure {
    #[error("the batch was answered {0}")]
    Status(StatusCode),
    #[error("{0}")]
    Reply(#[source] Arc<crate::graph::batch::BatchReplyError>),
}

impl UpstreamError {
    /// Short label for logs and the `x-graphcache-error` header.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "upstream_unreachable",
            Self::Body(_) => "upstream_body",
            Self::Timeout(_) => "upstream_timeout",
            Self::TooLarge { .. } => "upstream_too_large",
            Self::BatchFailed(_) => "batch_failed",
            Self::Lost => "flight_lost",
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }
}

/// A complete upstream answer to one GET (plain or batch item).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Microseconds spent waiting on upstream for it.
    pub upstream_us: u64,
}

/// Time one client request spent waiting on upstream response heads, for
/// the access log. Atomic only because request futures must be `Send`.
#[derive(Debug, Default)]
pub struct UpstreamTimer {
    micros: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicBool,
}

impl UpstreamTimer {
    pub fn add(&self, elapsed: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
        self.used.store(true, Relaxed);
    }

    /// Total upstream time in microseconds, or None if nothing went upstream.
    pub fn micros(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.used.load(Relaxed).then(|| self.micros.load(Relaxed))
    }
}

pub fn empty_body() -> UpstreamBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A streamed body cut off (with an error) past `limit` bytes.
pub fn limited_body<B>(body: B, limit: usize) -> UpstreamBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    Limited::new(body, limit).boxed()
}
