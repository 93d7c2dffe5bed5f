//! Response bodies: one enum, so a cache hit serves its stored `Bytes` without
//! boxing, and a relayed upstream body streams without being copied.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::metrics::InFlight;

/// Error of a body sent to clients: an upstream failure, or the deadline.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Every body graphcache sends to clients.
#[derive(Debug)]
pub enum ResponseBody {
    /// No body (304, HEAD, errors without content).
    Empty,
    /// A complete body: cached data or a synthetic error.
    Full(Option<Bytes>),
    /// An upstream body relayed as it arrives, after `prefix` (the part that
    /// was read while deciding whether to store it). `guard` is set for
    /// upstream answers: it cuts the stream off at the exchange's deadline.
    Relay {
        prefix: Option<Bytes>,
        rest: Incoming,
        guard: Option<RelayGuard>,
    },
}

/// What an upstream body streamed to a client carries: the exchange's
/// deadline (a body the upstream has not finished sending by
/// `upstream_timeout` after the request went out is cut off,
/// which the client sees as a truncated message, never a complete one) and
/// the exchange's in-flight count, which ends when the stream does.
#[derive(Debug)]
pub struct RelayGuard {
    deadline: Pin<Box<tokio::time::Sleep>>,
    _in_flight: InFlight,
}

impl RelayGuard {
    pub fn new(deadline: tokio::time::Instant, in_flight: InFlight) -> Self {
        Self {
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            _in_flight: in_flight,
        }
    }

    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline.deadline()
    }
}

/// The relayed upstream body did not end within the exchange's deadline.
#[derive(Debug, thiserror::Error)]
#[error("the upstream body did not end within upstream_timeout; the stream was cut off")]
pub struct RelayDeadline;

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            Self::Empty
        } else {
            Self::Full(Some(bytes))
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Relay {
                prefix,
                rest,
                guard,
            } => {
                if let Some(bytes) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                // Data already here is passed on whatever the time: only
                // waiting on the upstream counts against the deadline, not
                // a slow client's download.
                let frame = Pin::new(rest).poll_frame(cx).map_err(Into::into);
                if frame.is_pending() {
                    if let Some(guard) = guard {
                        if guard.deadline.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Some(Err(RelayDeadline.into())));
                        }
                    }
                }
                frame
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(bytes) => bytes.is_none(),
            Self::Relay { prefix, rest, .. } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Relay { prefix, rest, .. } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

impl ResponseBody {
    /// An upstream body relayed as it arrives, within its exchange's guard.
    pub fn relay(prefix: Option<Bytes>, rest: Incoming, guard: RelayGuard) -> Self {
        ResponseBody::Relay {
            prefix,
            rest,
            guard: Some(guard),
        }
    }
}

/// Outcome of reading a body up to a limit.
pub enum Collected {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// The limit was passed: what was read so far, and the unread rest.
    Overflow { prefix: Bytes, rest: Incoming },
}

/// Reads `body` until its end or until more than `limit` bytes arrived.
pub async fn collect_up_to(mut body: Incoming, limit: usize) -> Result<Collected, hyper::Error> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    let mut first: Option<Bytes> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        // Most Graph answers arrive in one frame: keep it without copying.
        if first.is_none() && buf.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&data);
        }
        let read = first.as_ref().map_or(buf.len(), Bytes::len);
        if read > limit {
            let prefix = first.take().unwrap_or_else(|| buf.split().freeze());
            return Ok(Collected::Overflow { prefix, rest: body });
        }
    }
    Ok(Collected::Complete(first.unwrap_or_else(|| buf.freeze())))
}
